"""Token shards and the sample order that both backends share (`babygpt.data`, `babygpt.run.plan_batch`)."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest

from babygpt.config import BabyGPTError, load_config
from babygpt.data import (
    TokenWindows,
    ensure_dataset,
    eval_sequences,
    list_shards,
    load_shard,
    micro_batch_rows,
    prepare_shakespeare,
    read_meta,
    shard_path,
    validation_batches,
    write_shard,
)
from babygpt.run import plan_batch

T = 16


def test_shard_round_trip_is_uint16_and_memory_mapped(tmp_path):
    path = shard_path(tmp_path, "train", 3)
    assert path.name == "train_000003.npy"
    tokens = np.array([0, 1, 50256, 65535])
    write_shard(path, tokens)
    shard = load_shard(path)
    assert isinstance(shard, np.memmap) and shard.dtype == np.uint16
    np.testing.assert_array_equal(shard, tokens)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["train_000003.npy"]  # no temp file left


def test_shard_refuses_ids_past_uint16_and_writes_nothing(tmp_path):
    path = shard_path(tmp_path, "train", 0)
    with pytest.raises(BabyGPTError, match="does not fit in uint16"):
        write_shard(path, [1, 65536])
    assert list(tmp_path.iterdir()) == []


SHARD_SPECS = ((0, 5 * T + 1), (1000, 3 * T + 1), (2000, 7 * T + 5), (3000, T + 3), (4000, T - 2))


def _numbered_windows(seed: int, shuffle: bool = True, order: str = "epochs") -> TokenWindows:
    """Shards whose token values are their positions plus a base, so each window names where it
    came from. The last two: a shard with one window whatever the offset, and one too short for any."""
    shards = [np.arange(base, base + n) for base, n in SHARD_SPECS]
    return TokenWindows(shards, T, seed, shuffle, order)


def _epoch_windows(windows: TokenWindows, epoch: int) -> np.ndarray:
    first, end = windows.epoch_start(epoch), windows.epoch_start(epoch + 1)
    return windows.rows(first, end - first)  # (samples of the epoch, T+1)


def test_window_starts_move_between_epochs_and_stay_in_bounds():
    windows = _numbered_windows(seed=0)
    assert len(windows) == 5 + 3 + 7 + 1 + 0  # the offset-0 grid
    lengths, starts = [], []
    for epoch in range(8):
        rows = _epoch_windows(windows, epoch)
        # Whole windows only (rows would not stack otherwise), each one contiguous run inside a shard.
        assert (np.diff(rows, axis=1) == 1).all()
        for base, n in SHARD_SPECS:
            inside = rows[(rows[:, 0] >= base) & (rows[:, 0] < base + n)]
            assert (inside[:, -1] < base + n).all()  # never past the shard's end
        assert len(windows) - len(SHARD_SPECS) <= len(rows) <= len(windows)
        lengths.append(len(rows))
        starts.append(frozenset(rows[:, 0].tolist()))
        assert {windows.locate(windows.epoch_start(epoch) + k)[0] for k in range(len(rows))} == {epoch}
    assert len(set(starts)) == len(starts)  # fresh boundaries every epoch
    assert len(set(lengths)) > 1  # epochs of different lengths, which the cumulative counts handle
    assert all(any(3000 <= s < 3000 + T + 3 for s in epoch) for epoch in starts)  # the 1-window shard
    offsets = {int(min(s for s in epoch if 2000 <= s < 3000)) - 2000 for epoch in starts}
    assert len(offsets) > 4 and max(offsets) < T


def test_each_token_is_an_input_and_a_target_at_most_once_per_epoch():
    windows = _numbered_windows(seed=3)
    for epoch in range(6):
        rows = _epoch_windows(windows, epoch)
        inputs, targets = rows[:, :-1].ravel(), rows[:, 1:].ravel()
        assert len(np.unique(inputs)) == len(inputs)
        assert len(np.unique(targets)) == len(targets)
        for base, n in SHARD_SPECS[:4]:  # what an epoch reads of a shard: one run after its offset
            read = np.sort(inputs[(inputs >= base) & (inputs < base + n)])
            assert len(read) and (np.diff(read) == 1).all()
            assert read[0] - base < T and base + n - 1 - (read[-1] + 1) < T  # less than a window left


def test_windows_are_contiguous_and_targets_are_inputs_shifted():
    windows = _numbered_windows(seed=0)
    rows = windows.rows(0, len(windows))
    assert rows.shape == (len(windows), T + 1)
    assert (np.diff(rows, axis=1) == 1).all()  # one contiguous run of T+1 tokens
    x, y = rows[:, :-1], rows[:, 1:]
    np.testing.assert_array_equal(x[:, 1:], y[:, :-1])
    np.testing.assert_array_equal(windows.take([5, 2, 5]), rows[[5, 2, 5]])


def test_order_is_fixed_by_the_seed():
    a, b, c = _numbered_windows(0), _numbered_windows(0), _numbered_windows(1)
    n = 3 * len(a)
    order = [int(a.window(k)[0]) for k in range(n)]
    assert order == [int(b.window(k)[0]) for k in range(n)]
    assert order != [int(c.window(k)[0]) for k in range(n)]
    first, second = order[: len(a)], order[len(a) : 2 * len(a)]
    assert first != second  # each epoch reshuffles


def test_resume_mid_epoch_continues_the_order_exactly():
    """A loader's whole state is the samples consumed: a fresh object (no caches, no epoch counts)
    asked for sample n onward reads what the first one read, across epochs of different lengths."""
    walked = _numbered_windows(seed=7)
    reference = walked.rows(0, 6 * len(walked))
    for n in (len(walked) // 2, walked.epoch_start(3) + 4, walked.epoch_start(5) - 1):
        resumed = _numbered_windows(seed=7)
        np.testing.assert_array_equal(resumed.rows(n, len(reference) - n), reference[n:])


def test_random_order_is_nanogpts_uniform_starts_in_bounds_and_fixed_by_the_seed():
    windows = _numbered_windows(seed=0, order="random")
    n = 4000
    rows = windows.rows(0, n)
    assert (np.diff(rows, axis=1) == 1).all()  # whole windows, each inside one shard
    bases = np.array([base for base, _ in SHARD_SPECS])
    shard = np.searchsorted(bases, rows[:, 0], side="right") - 1
    ends = np.array([base + size for base, size in SHARD_SPECS])[shard]
    assert (rows[:, -1] < ends).all()  # never past a shard's end
    assert 4 not in set(shard.tolist())  # the shard shorter than a window is never read
    # Every start 0 .. n - T - 1 of a shard is equally likely, and shards by their number of starts.
    counts = np.bincount(shard, minlength=len(SHARD_SPECS))
    starts = np.array([max(0, size - T) for _, size in SHARD_SPECS])
    np.testing.assert_allclose(counts / n, starts / starts.sum(), atol=0.03)
    offsets = rows[shard == 2, 0] - 2000
    assert offsets.min() < T and offsets.max() > 6 * T  # starts anywhere, not on a grid
    assert len(np.unique(rows[:, 0])) < n  # with replacement: some sequences come again
    # A pure function of (seed, k): another object, a resume at any k, reads the same.
    np.testing.assert_array_equal(_numbered_windows(0, order="random").rows(1234, 50), rows[1234:1284])
    assert not np.array_equal(_numbered_windows(1, order="random").rows(0, 50), rows[:50])
    assert not np.array_equal(_numbered_windows(0).rows(0, 50), rows[:50])  # not the epochs order


def test_random_order_leaves_validation_on_the_grid():
    grid = _numbered_windows(seed=0, shuffle=False)
    random = _numbered_windows(seed=0, shuffle=False, order="random")
    np.testing.assert_array_equal(random.rows(0, 2 * len(grid)), grid.rows(0, 2 * len(grid)))


def test_validation_is_the_offset_zero_grid_in_file_order():
    windows = _numbered_windows(seed=0, shuffle=False)
    starts = [int(windows.window(k)[0]) for k in range(2 * len(windows))]
    grid = [base + i * T for base, n in SHARD_SPECS for i in range((n - 1) // T)]
    assert starts == grid + grid  # every evaluation pass reads the same windows


@pytest.mark.parametrize("devices, micro_batch_size", [(1, 8), (2, 2), (4, 1), (8, 1)])
def test_each_step_covers_the_same_samples_on_any_device_count(tiny_config, devices, micro_batch_size):
    global_batch = 8  # sequences per optimizer step, fixed by total_batch_tokens
    config = dataclasses.replace(
        tiny_config,
        train=dataclasses.replace(
            tiny_config.train, micro_batch_size=micro_batch_size, total_batch_tokens=global_batch * T
        ),
    )
    plan = plan_batch(config, devices)
    assert plan.rows_per_micro_step * plan.accumulation_steps == global_batch
    windows = _numbered_windows(seed=0)
    one_device = windows.rows(0, 8 * global_batch)
    for step in range(8):  # past the first epoch (16 windows)
        seen = []
        for micro in range(plan.accumulation_steps):
            position = step * plan.accumulation_steps + micro
            for rank in range(devices):
                seen += micro_batch_rows(
                    position, plan.rows_per_micro_step, rank * micro_batch_size, micro_batch_size
                )
        assert sorted(seen) == list(range(step * global_batch, (step + 1) * global_batch))
        tokens = windows.take(seen)  # what the ranks read, in rank/micro-step order
        expected = one_device[step * global_batch : (step + 1) * global_batch]
        assert sorted(map(tuple, tokens.tolist())) == sorted(map(tuple, expected.tolist()))


def _fake_losses(tokens: np.ndarray) -> np.ndarray:
    """A per-sequence mean loss, float32, that depends on every token of the window."""
    return (np.sin(tokens[:, 1:].astype(np.float32)) + 2.0).mean(axis=1)


@pytest.mark.parametrize("n_sequences", [1, 7, 16, 80])
def test_validation_mean_is_the_same_on_1_2_and_8_devices(n_sequences):
    shards = [np.arange(100 * T + 1) * 7 % 997]  # 100 windows
    windows = TokenWindows(shards, T, seed=0, shuffle=False)
    expected = float(_fake_losses(windows.rows(0, n_sequences)).mean(dtype=np.float64))
    for devices, micro_batch_size in [(1, 4), (1, 16), (2, 4), (8, 1), (8, 4)]:
        rows_per_micro_step = devices * micro_batch_size
        total, read, weight = np.float32(0), [], 0.0
        for rank in range(devices):  # each rank's share, then the all-reduce: a sum
            for samples, weights in validation_batches(
                n_sequences, rows_per_micro_step, rank * micro_batch_size, micro_batch_size
            ):
                assert samples.shape == weights.shape == (micro_batch_size,)
                assert (samples < n_sequences).all()  # padding repeats real windows
                total += np.sum(weights * _fake_losses(windows.take(samples)), dtype=np.float32)
                read += samples[weights == 1].tolist()
                weight += float(weights.sum())
        assert sorted(read) == list(range(n_sequences))  # each chosen sequence counted once
        assert weight == n_sequences
        np.testing.assert_allclose(float(total) / n_sequences, expected, rtol=1e-6)


def test_eval_sequences_count_tokens_not_devices(tiny_config):
    def count(*overrides, available=1000):
        config = load_config(None, [f"{k}={v}" for k, v in overrides])
        return eval_sequences(config, available)

    # eval_tokens=0: what one device read before, eval_steps x micro_batch x block (the CPU default's 20 x 4 x 128).
    assert count(("train.eval_steps", 20), ("train.micro_batch_size", 4), ("model.block_size", 128)) == 80
    assert count(("train.eval_tokens", 10_000), ("model.block_size", 128)) == 78  # whole windows
    assert count(("train.eval_tokens", 50), ("model.block_size", 128)) == 1  # at least one
    assert count(("train.eval_tokens", 10**9), ("model.block_size", 128), available=33) == 33  # the split
    assert count(("train.eval_steps", 0), ("train.eval_tokens", 10_000)) == 0  # evaluation off
    with pytest.raises(BabyGPTError, match=r"train.eval_tokens=-1 must be >= 0"):
        load_config(None, ["train.eval_tokens=-1"])


def test_batch_that_does_not_divide_names_a_valid_total(tiny_config):
    config = dataclasses.replace(
        tiny_config, train=dataclasses.replace(tiny_config.train, total_batch_tokens=100)
    )
    with pytest.raises(BabyGPTError, match=r"try train.total_batch_tokens=128"):
        plan_batch(config, 2)  # 4 x 16 x 2 = 128 tokens per micro-step


@pytest.mark.parametrize(
    "dataset, command",
    [
        ("shakespeare", "python prepare.py shakespeare"),
        ("fineweb", "python prepare.py fineweb"),
        ("mybooks", "python prepare.py text FILE... --name mybooks"),
    ],
)
def test_missing_data_names_the_prepare_command(tmp_path, dataset, command):
    with pytest.raises(BabyGPTError, match=f"no train shards in .*{command}"):
        list_shards(tmp_path / dataset, "train")


def test_ensure_dataset_refuses_an_unprepared_dataset(tmp_path):
    config = load_config(None, ["data.dataset=fineweb", f"data.data_dir={tmp_path}"])
    with pytest.raises(BabyGPTError, match="python prepare.py fineweb"):
        ensure_dataset(config)


def test_prepare_shakespeare_token_counts(tmp_path):
    meta = prepare_shakespeare(tmp_path)
    assert (meta["train_tokens"], meta["val_tokens"]) == (304_223, 33_802)
    assert read_meta(tmp_path / "shakespeare")["train_tokens"] == 304_223
    assert len(load_shard(shard_path(tmp_path / "shakespeare", "train", 0))) == 304_223
    assert len(load_shard(shard_path(tmp_path / "shakespeare", "val", 0))) == 33_802
