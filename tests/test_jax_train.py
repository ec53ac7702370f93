"""The JAX training path: schedule, decay mask, accumulation, sharding, grain loader, orbax, CLI."""

from __future__ import annotations

import dataclasses
import json
import math
import os
import shutil
import subprocess
import sys
from pathlib import Path

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest
from flax import nnx
from jax.sharding import Mesh

from babygpt.config import BabyGPTError, ModelConfig, TrainConfig, load_config
from babygpt.data import TokenWindows, dataset_dir, micro_batch_rows
from babygpt.run import BatchPlan
from babygpt_jax.checkpoint import (
    checkpoint_manager,
    latest_step,
    pinned_host_copies,
    restore_checkpoint,
    save_checkpoint,
)
from babygpt_jax.data import make_loaders
from babygpt_jax.model import GPT
from babygpt_jax.optim import lr_schedule, make_optimizer, weight_decay_mask
from babygpt_jax.parallel import (
    MESH_AXES,
    all_finite,
    batch_sharding,
    device_memory,
    make_global_batch,
    peak_memory_gib,
)
from babygpt_jax.train import init_state, make_train_step

ROOT = Path(__file__).resolve().parents[1]
TINY = ModelConfig(n_layer=2, n_head=2, n_embd=32, block_size=16, vocab_size=100, vocab_multiple=64)
TRAIN = TrainConfig(max_steps=10, warmup_steps=2, max_lr=1e-2)


def _mesh(n: int, fsdp: bool = False) -> Mesh:
    devices = np.asarray(jax.devices()[:n])
    return Mesh(devices.reshape((1, n) if fsdp else (n, 1)), MESH_AXES)


def _steps(mesh: Mesh, fsdp: bool = False):
    """A fresh tiny model on `mesh` and its jitted train step (same init every time: seed 0)."""
    graphdef, rest, state, sharding = init_state(
        GPT(TINY, rngs=nnx.Rngs(0)), make_optimizer(TRAIN), mesh, fsdp, 0
    )
    step = make_train_step(graphdef, rest, make_optimizer(TRAIN), lr_schedule(TRAIN), mesh, sharding)
    return step, state


def _batch(x: np.ndarray, y: np.ndarray, mesh: Mesh) -> tuple:
    return make_global_batch((x, y), batch_sharding(mesh))


def _run(step, state, batches, mesh):
    losses = []
    for x, y in batches:
        state, metrics = step(state, _batch(x, y, mesh))
        losses.append(float(metrics["loss"]))
    assert int(state.step) == len(batches)
    return losses, jax.device_get(state.params)


@pytest.fixture(scope="module")
def batches():
    """Three steps of 16 sequences each, as one micro-batch of 16 rows: (1, 16, T)."""
    rng = np.random.default_rng(0)
    tokens = rng.integers(0, TINY.vocab_size, (3, 1, 16, TINY.block_size + 1)).astype(np.int32)
    return [(t[..., :-1], t[..., 1:]) for t in tokens]


@pytest.fixture(scope="module")
def one_device(batches):
    mesh = _mesh(1)
    step, state = _steps(mesh)
    return _run(step, state, batches, mesh)


def test_lr_schedule_warms_up_linearly_then_cosine_decays_to_min_lr():
    train = TrainConfig(max_steps=100, warmup_steps=10, max_lr=1e-3, min_lr=1e-4)
    lr = lr_schedule(train)
    # float32 inside optax: 1e-6 relative
    for s, expected in [
        (0, 0.0),
        (5, 5e-4),
        (10, 1e-3),
        (55, 1e-4 + 0.9e-3 * 0.5 * (1 + math.cos(math.pi * 45 / 90))),
        (100, 1e-4),
        (150, 1e-4),
    ]:
        assert float(lr(s)) == pytest.approx(expected, rel=1e-6, abs=1e-12)
    no_warmup = lr_schedule(TrainConfig(max_steps=10, warmup_steps=0, max_lr=1e-3))
    assert float(no_warmup(0)) == pytest.approx(1e-3, rel=1e-6)


def test_weight_decay_mask_selects_matrices_and_embeddings_only():
    params = nnx.state(GPT(TINY, rngs=nnx.Rngs(0)), nnx.Param)
    mask = dict(nnx.to_flat_state(weight_decay_mask(params)))
    flat = {".".join(map(str, k)): v.get_value() for k, v in mask.items()}
    assert flat["transformer.wte.embedding"] and flat["transformer.wpe.embedding"]
    assert flat["transformer.h.0.attn.c_attn.kernel"] and flat["transformer.h.1.mlp.c_proj.kernel"]
    assert not flat["transformer.h.0.attn.c_attn.bias"] and not flat["transformer.h.0.ln_1.scale"]
    assert not flat["transformer.ln_f.bias"]
    assert sum(flat.values()) == 2 + 4 * TINY.n_layer  # wte, wpe, four kernels per block


def test_accumulation_equals_one_big_batch(batches, one_device):
    mesh = _mesh(1)
    step, state = _steps(mesh)
    split = [(x.reshape(4, 4, -1), y.reshape(4, 4, -1)) for x, y in batches]  # 4 micro-steps of 4 rows
    losses, params = _run(step, state, split, mesh)
    ref_losses, ref_params = one_device
    # Same math, different float32 summation order: losses agree to ~1e-6 relative. Parameters: Adam
    # divides by sqrt(v), so entries whose gradient is near zero turn round-off into updates of up to
    # a few 1e-6; 2e-5 absolute is 0.2% of the learning rate.
    np.testing.assert_allclose(losses, ref_losses, rtol=1e-5)
    for a, b in zip(jax.tree.leaves(params), jax.tree.leaves(ref_params), strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=2e-5)


@pytest.mark.parametrize("fsdp", [False, True], ids=["data_parallel", "fsdp"])
def test_eight_device_step_matches_one_device(batches, one_device, fsdp):
    mesh = _mesh(8, fsdp)
    step, state = _steps(mesh, fsdp)
    if fsdp:  # the big matrices really are split over the devices
        wte = state.params["transformer"]["wte"]["embedding"][...]
        assert wte.sharding.spec[0] == "fsdp" and len(wte.addressable_shards[0].data) == 128 // 8
    losses, params = _run(step, state, batches, mesh)
    ref_losses, ref_params = one_device
    # All-reduces change the float32 summation order only; the same tolerances as for accumulation.
    np.testing.assert_allclose(losses, ref_losses, rtol=1e-5)
    for a, b in zip(jax.tree.leaves(params), jax.tree.leaves(ref_params), strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=2e-5)


def test_grain_loader_reads_token_windows_order_and_resumes(tiny_config):
    config = tiny_config
    plan = BatchPlan(micro_batch_size=2, devices=4, seq_len=16, accumulation_steps=3)
    windows = TokenWindows.from_dir(dataset_dir(config), "train", 16, config.train.seed)
    # Process 1 of 2, each with 2 local devices: rows 4..7 of each 8-row micro-step.
    train, val = make_loaders(config, plan, process_index=1, local_devices=2)
    seen = [train.next_batch() for _ in range(40)]  # 120 micro-steps: past one epoch of 311 windows
    for s, (x, y) in enumerate(seen):
        assert x.shape == y.shape == (3, 4, 16)
        for m in range(3):
            rows = micro_batch_rows(3 * s + m, plan.rows_per_micro_step, 4, 4)
            expected = windows.rows(rows.start, len(rows))
            np.testing.assert_array_equal(x[m], expected[:, :-1])
            np.testing.assert_array_equal(y[m], expected[:, 1:])
    assert train.state_dict() == {"samples": 120 * 8}  # micro-steps of 8 rows
    resumed, _ = make_loaders(config, plan, process_index=1, local_devices=2)
    resumed.load_state_dict({"samples": 3 * 25 * 8})
    np.testing.assert_array_equal(resumed.next_batch()[0], seen[25][0])
    # Validation: file order, one micro-step per batch, restarted from sample 0.
    first = val.next_batch()[0]
    val_windows = TokenWindows.from_dir(dataset_dir(config), "val", 16, config.train.seed)
    np.testing.assert_array_equal(first[0], val_windows.rows(4, 4)[:, :-1])
    val.next_batch()
    val.load_state_dict({"samples": 0})
    np.testing.assert_array_equal(val.next_batch()[0], first)


def _cli(args: list[str], cwd: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "JAX_PLATFORMS": "cpu"}  # the eight devices of the root conftest.py
    return subprocess.run(
        [sys.executable, str(ROOT / "train.py"), *args], cwd=cwd, env=env, capture_output=True, text=True
    )


def _overrides(tiny_overrides: list[str], tmp: Path, data_root: Path) -> list[str]:
    return [
        *tiny_overrides,
        "model.dropout=0.1",  # exercises the dropout keys that a resume must restore
        "train.micro_batch_size=1",
        "train.total_batch_tokens=256",  # 2 micro-steps of 8 devices x 1 row x 16 tokens
        f"data.data_dir={data_root}",
        f"run.out_dir={tmp / 'out'}",
    ]


@pytest.fixture(scope="module")
def cli_run(tmp_path_factory, tiny_overrides):
    """One real `python train.py --backend=jax` run on a tiny random dataset, 6 steps."""
    tmp = tmp_path_factory.mktemp("cli")
    rng = np.random.default_rng(0)
    from babygpt.data import shard_path, write_meta, write_shard

    data = tmp / "data" / "tiny"
    write_shard(shard_path(data, "train", 0), rng.integers(0, 100, 3000))
    write_shard(shard_path(data, "val", 0), rng.integers(0, 100, 1000))
    write_meta(data, source="random", train_tokens=3000, val_tokens=1000)
    overrides = _overrides(tiny_overrides, tmp, tmp / "data")
    result = _cli(["--backend=jax", *overrides], cwd=ROOT)
    return tmp, overrides, result


def _metrics(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def test_cli_trains_logs_checkpoints_and_exports(cli_run):
    tmp, _, result = cli_run
    assert result.returncode == 0, result.stderr[-2000:]
    run_dir = tmp / "out" / "tiny"
    records = _metrics(run_dir)
    steps = [r for r in records if "loss" in r]
    assert [r["step"] for r in steps] == [1, 2, 3, 4, 5, 6]
    assert {"loss", "lr", "grad_norm"} <= steps[0].keys()
    assert {"tokens_per_s", "mfu", "step_ms"} <= steps[-1].keys()
    assert [r["step"] for r in records if "val_loss" in r] == [3, 6]
    assert latest_step(run_dir) == 6
    model = GPT.from_pretrained(run_dir)  # the export loads back
    assert model.config.n_embd == 32 and (run_dir / "model.safetensors").exists()


def test_resume_after_kill_reproduces_the_next_losses(cli_run):
    tmp, overrides, result = cli_run
    assert result.returncode == 0, result.stderr[-2000:]
    run_dir = tmp / "resume"
    shutil.copytree(tmp / "out" / "tiny", run_dir)
    uninterrupted = _metrics(run_dir)
    # A run killed during step 6: its last committed checkpoint is step 3's, its log has all 6 steps.
    shutil.rmtree(run_dir / "checkpoints" / "6")
    from babygpt_jax.train import main

    # The run's own resolved config: the CLI run read configs/shakespeare.toml under its overrides.
    config = load_config(
        run_dir / "config.toml", [f"run.out_dir={tmp}", "run.name=resume", "run.resume=true"]
    )
    summary = main(config)
    assert summary["steps"] == 3
    resumed = _metrics(run_dir)  # cut back to step 3, then steps 4-6 again: no step twice
    assert [(r["step"], "loss" in r) for r in resumed] == [(r["step"], "loss" in r) for r in uninterrupted]
    for a, b in zip(resumed, uninterrupted, strict=True):
        for key in ("loss", "grad_norm", "val_loss", "lr"):
            if key in b:
                # Same program, same inputs, same device count: equal to float32 round-off.
                assert a[key] == pytest.approx(b[key], rel=1e-5), (a, b)


def test_corrupt_or_mismatched_checkpoint_is_one_clear_error(cli_run, tmp_path):
    tmp, _, result = cli_run
    assert result.returncode == 0, result.stderr[-2000:]
    run_dir = tmp_path / "run"
    shutil.copytree(tmp / "out" / "tiny", run_dir)
    mesh = _mesh(1)
    _, _, state, _ = init_state(GPT(TINY, rngs=nnx.Rngs(0)), make_optimizer(TRAIN), mesh, False, 0)
    params, opt_state, rng = state.params, state.opt_state, state.rng
    wider = ModelConfig(n_layer=2, n_head=2, n_embd=64, block_size=16, vocab_size=100)
    with pytest.raises(BabyGPTError, match="model.n_embd=32 in the checkpoint but 64"):
        restore_checkpoint(run_dir, params, opt_state, rng, wider)
    for path in (run_dir / "checkpoints" / "6" / "state").rglob("*"):
        if path.is_file():
            path.write_bytes(b"not a checkpoint")
    with pytest.raises(BabyGPTError, match="corrupt"):
        restore_checkpoint(run_dir, params, opt_state, rng, TINY)


def test_a_checkpoint_written_through_orbaxs_standard_handler_still_restores(tmp_path):
    """Until 2026-12-03 the train state went through orbax's StandardCheckpointHandler; the PyTree
    handler that replaced it (for its pinned-host setting) reads those files bit for bit."""
    _, _, state, _ = init_state(GPT(TINY, rngs=nnx.Rngs(3)), make_optimizer(TRAIN), _mesh(1), False, 0)
    opt_state = jax.tree.map(lambda x: x + 1, state.opt_state)  # not the zeros a fresh init has
    saved = {"params": state.params, "opt_state": opt_state, "rng": state.rng}
    meta = {"step": 4, "loader": {"samples": 9}, "model_config": dataclasses.asdict(TINY)}
    options = ocp.CheckpointManagerOptions(max_to_keep=2)
    old = ocp.CheckpointManager(tmp_path / "checkpoints", options=options, item_names=("state", "meta"))
    old.save(4, args=ocp.args.Composite(state=ocp.args.StandardSave(saved), meta=ocp.args.JsonSave(meta)))
    old.close()  # waits for the save
    _, _, fresh, _ = init_state(GPT(TINY, rngs=nnx.Rngs(0)), make_optimizer(TRAIN), _mesh(1), False, 0)
    restored = restore_checkpoint(tmp_path, fresh.params, fresh.opt_state, fresh.rng, TINY)
    assert restored["step"] == 4 and restored["loader"] == {"samples": 9}
    for name in ("params", "opt_state", "rng"):
        for got, want in zip(jax.tree.leaves(restored[name]), jax.tree.leaves(saved[name]), strict=True):
            np.testing.assert_array_equal(np.asarray(got), np.asarray(want), err_msg=name)


def test_a_checkpoint_from_before_the_plain_dict_state_still_restores(tmp_path):
    """Until 2026-12-02 the parameters and AdamW's moments were nnx.States of nnx.Params, which
    orbax stores one level deeper; such a checkpoint restores into today's plain dicts as it was."""
    model, optimizer = GPT(TINY, rngs=nnx.Rngs(3)), make_optimizer(TRAIN)
    old_params = nnx.state(model, nnx.Param)
    old_opt_state = optimizer.init(old_params)
    old_opt_state = jax.tree.map(lambda x: x + 1, old_opt_state)  # not the zeros a fresh init has
    rng = jax.random.PRNGKey(7)
    manager = checkpoint_manager(tmp_path)
    save_checkpoint(manager, 5, old_params, old_opt_state, {"epoch": 0}, rng, TINY)
    manager.close()
    _, _, state, _ = init_state(GPT(TINY, rngs=nnx.Rngs(0)), optimizer, _mesh(1), False, 0)
    restored = restore_checkpoint(tmp_path, state.params, state.opt_state, state.rng, TINY)
    assert restored["step"] == 5
    expected = {"params": nnx.to_pure_dict(old_params), "opt_state": old_opt_state, "rng": rng}
    got = {key: restored[key] for key in expected}
    assert jax.tree.structure(got["params"]) == jax.tree.structure(state.params)
    assert len(jax.tree.leaves(got)) == len(jax.tree.leaves(expected))
    for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(expected), strict=True):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_cli_refuses_to_overwrite_an_existing_run(cli_run):
    tmp, overrides, result = cli_run
    assert result.returncode == 0, result.stderr[-2000:]
    run_dir = tmp / "out" / "tiny"
    before = (run_dir / "metrics.jsonl").read_bytes()
    again = _cli(["--backend=jax", *overrides], cwd=ROOT)
    assert again.returncode == 2
    lines = again.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error:") and "--resume" in lines[0]
    assert (run_dir / "metrics.jsonl").read_bytes() == before
    assert latest_step(run_dir) == 6


class _Gpu:
    """A GPU device as the memory figures see it: `memory_stats()` is None where XLA's allocator
    keeps no statistics (the VMM allocator that XLA's SKIP_TEMP command-buffer mode
    selects; measured on jaxlib 0.11.2, docs/benchmarks.md)."""

    platform = "gpu"

    def __init__(self, stats):
        self.stats = stats

    def memory_stats(self):
        return self.stats


def test_peak_memory_is_none_where_the_allocator_keeps_no_count():
    assert peak_memory_gib(jax.devices()[0]) is None  # a CPU has no figure
    assert peak_memory_gib(_Gpu(None)) is None
    assert peak_memory_gib(_Gpu({"peak_bytes_in_use": 3 * 2**29})) == 1.5


def test_checkpoints_leave_a_gpu_through_pinned_memory_unless_the_allocator_keeps_no_count():
    assert pinned_host_copies(jax.devices()[0]) is None  # orbax's own choice: none on a CPU
    assert pinned_host_copies(_Gpu({"bytes_in_use": 0})) is None  # orbax pins on a GPU
    assert pinned_host_copies(_Gpu(None)) is False  # the VMM allocator: pinned copies segfault


def test_without_allocator_statistics_no_run_is_refused_beforehand(monkeypatch):
    monkeypatch.setattr(jax, "devices", lambda: [_Gpu({"bytes_limit": 80 * 2**30})])
    assert device_memory() == (80 * 2**30, "gpu")
    monkeypatch.setattr(jax, "devices", lambda: [_Gpu(None)])  # used to raise a TypeError
    memory, platform = device_memory()
    assert platform == "gpu" and memory > 2**60


@pytest.mark.parametrize("fsdp", [False, True], ids=["data_parallel", "fsdp"])
def test_all_finite_finds_one_non_finite_parameter_among_sharded_ones(fsdp):
    _, _, state, _ = init_state(GPT(TINY, rngs=nnx.Rngs(0)), make_optimizer(TRAIN), _mesh(8, fsdp), fsdp, 0)
    assert all_finite(state.params)
    for bad in (np.nan, np.inf):
        params = jax.tree.map(lambda x: x, state.params)  # a new tree over the same arrays
        fc = params["transformer"]["h"][1]["mlp"]["c_fc"]
        fc["kernel"] = fc["kernel"].at[3, 5].set(bad)
        assert not all_finite(params)
