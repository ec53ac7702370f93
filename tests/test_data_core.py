"""Token shards and the sample order that both backends share (`babygpt.data`, `babygpt.run.plan_batch`)."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest

from babygpt.config import BabyGPTError, load_config
from babygpt.data import (
    TokenWindows,
    ensure_dataset,
    list_shards,
    load_shard,
    micro_batch_rows,
    prepare_shakespeare,
    read_meta,
    shard_path,
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


def _numbered_windows(seed: int, shuffle: bool = True) -> TokenWindows:
    """Shards whose token values are their positions, so each window names where it came from."""
    shards = [np.arange(0, 5 * T + 1), np.arange(1000, 1000 + 3 * T + 1), np.arange(2000, 2000 + 7 * T + 5)]
    return TokenWindows(shards, T, seed, shuffle)


def test_every_window_exactly_once_per_epoch():
    windows = _numbered_windows(seed=0)
    assert len(windows) == 5 + 3 + 7
    expected = {s + i * T for s, n in ((0, 5), (1000, 3), (2000, 7)) for i in range(n)}
    for epoch in range(3):
        starts = [int(windows.window(epoch * len(windows) + k)[0]) for k in range(len(windows))]
        assert sorted(starts) == sorted(expected)


def test_windows_are_contiguous_and_targets_are_inputs_shifted():
    windows = _numbered_windows(seed=0)
    rows = windows.rows(0, len(windows))
    assert rows.shape == (len(windows), T + 1)
    assert (np.diff(rows, axis=1) == 1).all()  # one contiguous run of T+1 tokens
    x, y = rows[:, :-1], rows[:, 1:]
    np.testing.assert_array_equal(x[:, 1:], y[:, :-1])


def test_order_is_fixed_by_the_seed():
    a, b, c = _numbered_windows(0), _numbered_windows(0), _numbered_windows(1)
    n = 3 * len(a)
    order = [int(a.window(k)[0]) for k in range(n)]
    assert order == [int(b.window(k)[0]) for k in range(n)]
    assert order != [int(c.window(k)[0]) for k in range(n)]
    first, second = order[: len(a)], order[len(a) : 2 * len(a)]
    assert first != second  # each epoch reshuffles


def test_validation_is_in_file_order():
    windows = _numbered_windows(seed=0, shuffle=False)
    starts = [int(windows.window(k)[0]) for k in range(len(windows))]
    assert starts == sorted(starts)


@pytest.mark.parametrize("devices, micro_batch_size", [(1, 8), (2, 2), (4, 1)])
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
    for step in range(3):
        seen = []
        for micro in range(plan.accumulation_steps):
            position = step * plan.accumulation_steps + micro
            for rank in range(devices):
                seen += micro_batch_rows(
                    position, plan.rows_per_micro_step, rank * micro_batch_size, micro_batch_size
                )
        assert sorted(seen) == list(range(step * global_batch, (step + 1) * global_batch))


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
