"""The PyTorch training path: schedule, decay mask, accumulation, real DDP, checkpoints, the CLI."""

from __future__ import annotations

import copy
import dataclasses
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.numpy import load_file

from babygpt.config import BabyGPTError, Config, TrainConfig, dump_toml, load_config
from babygpt.data import shard_path, write_shard
from babygpt.run import generate_sample, plan_batch
from babygpt_torch.checkpoint import export_hf, latest_step, restore_checkpoint, save_checkpoint
from babygpt_torch.data import make_loaders
from babygpt_torch.generate import generate
from babygpt_torch.model import GPT
from babygpt_torch.optim import lr_schedule, make_optimizer, weight_decay_mask
from babygpt_torch.parallel import Dist, all_finite, peak_memory_gib
from babygpt_torch.train import TrainState, evaluate, main, train_step

ROOT = Path(__file__).parent.parent
CPU = Dist(rank=0, local_rank=0, world_size=1, device=torch.device("cpu"))


def _with(config: Config, section: str = "train", **changes) -> Config:
    return dataclasses.replace(config, **{section: dataclasses.replace(getattr(config, section), **changes)})


def _metrics(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def _losses(run_dir: Path) -> dict[int, float]:
    return {r["step"]: r["loss"] for r in _metrics(run_dir) if "loss" in r}


# ---------------------------------------------------------------- optimizer


def test_lr_schedule_at_key_steps():
    lr = lr_schedule(TrainConfig(max_lr=6e-4, warmup_steps=10, max_steps=110))
    assert lr(0) == 0.0  # warmup starts from 0, as optax's warmup_cosine_decay_schedule
    assert lr(5) == pytest.approx(3e-4, rel=1e-12)
    assert lr(10) == pytest.approx(6e-4, rel=1e-12)
    assert lr(60) == pytest.approx((6e-4 + 6e-5) / 2, rel=1e-12)  # half way down the cosine
    assert lr(110) == pytest.approx(6e-5, rel=1e-12)  # min_lr defaults to max_lr / 10
    assert lr(500) == pytest.approx(6e-5, rel=1e-12)  # constant after max_steps
    no_warmup = lr_schedule(TrainConfig(max_lr=1e-3, min_lr=0.0, warmup_steps=0, max_steps=100))
    assert no_warmup(0) == 1e-3 and no_warmup(100) == 0.0


def test_scheduler_gives_the_optimizer_the_schedules_rate_at_every_step(tiny_model_config):
    train = TrainConfig(max_lr=1e-2, warmup_steps=3, max_steps=10)
    optimizer, scheduler = make_optimizer(GPT(tiny_model_config), train, "cpu")
    lr = lr_schedule(train)
    for step in range(14):
        assert optimizer.param_groups[0]["lr"] == pytest.approx(lr(step), rel=1e-12, abs=1e-15)
        optimizer.step()
        scheduler.step()


def test_weight_decay_only_on_matrices_and_embeddings(tiny_model_config):
    model = GPT(tiny_model_config)
    mask = weight_decay_mask(model)
    decayed = sorted(n for n, d in mask.items() if d)
    assert decayed == sorted(
        ["transformer.wte.weight", "transformer.wpe.weight"]
        + [
            f"transformer.h.{i}.{m}.weight"
            for i in range(2)
            for m in ("attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj")
        ]
    )
    assert "lm_head.weight" not in mask  # tied to wte: one tensor, one entry
    optimizer, _ = make_optimizer(model, TrainConfig(weight_decay=0.1), "cpu")
    decay, no_decay = optimizer.param_groups
    assert (decay["weight_decay"], no_decay["weight_decay"]) == (0.1, 0.0)
    assert len(decay["params"]) == 10 and len(decay["params"]) + len(no_decay["params"]) == len(mask)


# ---------------------------------------------------------------- data and the step


def test_loader_yields_shifted_targets_and_resumes_from_its_position(tiny_config):
    plan = plan_batch(tiny_config, 1)
    train, val = make_loaders(tiny_config, plan, 0)
    x, y = train.next_batch()
    assert x.shape == y.shape == (1, 4, 16) and x.dtype == torch.int64  # one step of one micro-batch
    assert torch.equal(x[..., 1:], y[..., :-1])
    state = train.state_dict()
    assert state == {"samples": 4}  # one micro-step of 4 rows
    after = [train.next_batch() for _ in range(3)]
    train.load_state_dict(state)
    assert all(torch.equal(a[0], train.next_batch()[0]) for a in after)


def test_gradient_accumulation_equals_one_big_batch(tiny_config):
    torch.manual_seed(0)
    base = GPT(tiny_config.model)
    results = []
    for micro_batch, accumulation in ((8, 1), (2, 4)):
        config = _with(tiny_config, micro_batch_size=micro_batch, total_batch_tokens=8 * 16)
        plan = plan_batch(config, 1)
        assert plan.accumulation_steps == accumulation
        model = copy.deepcopy(base)
        optimizer, scheduler = make_optimizer(model, config.train, "cpu")
        loader, _ = make_loaders(config, plan, 0)
        x, y = loader.next_batch()
        _, metrics = train_step(
            TrainState(model, optimizer, scheduler),
            (x, y),
            autocast_dtype=torch.float32,
            grad_clip=0.0,
        )
        metrics = {k: float(v) for k, v in metrics.items()}
        grads = {n: p.grad.clone() for n, p in model.named_parameters()}
        results.append((metrics, grads, model))
    (big, big_grads, big_model), (acc, acc_grads, acc_model) = results
    # same sum over the same 8 sequences in a different order: float32 rounding only
    for name in big_grads:
        torch.testing.assert_close(acc_grads[name], big_grads[name], rtol=1e-5, atol=1e-7, msg=name)
    assert acc["loss"] == pytest.approx(big["loss"], rel=1e-6)
    assert acc["grad_norm"] == pytest.approx(big["grad_norm"], rel=1e-5)
    for (name, a), b in zip(acc_model.named_parameters(), big_model.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6, msg=name)


def test_clipping_reports_the_norm_before_clipping(tiny_config):
    torch.manual_seed(0)
    plan = plan_batch(tiny_config, 1)
    norms = []
    for clip in (0.0, 1e-3):
        torch.manual_seed(0)
        model = GPT(tiny_config.model)
        optimizer, scheduler = make_optimizer(model, tiny_config.train, "cpu")
        loader, _ = make_loaders(tiny_config, plan, 0)
        x, y = loader.next_batch()
        _, metrics = train_step(
            TrainState(model, optimizer, scheduler),
            (x, y),
            autocast_dtype=torch.float32,
            grad_clip=clip,
        )
        metrics = {k: float(v) for k, v in metrics.items()}
        after = math.sqrt(sum(p.grad.pow(2).sum().item() for p in model.parameters()))
        norms.append((metrics["grad_norm"], after))
    (unclipped, unclipped_after), (reported, clipped_after) = norms
    assert reported == pytest.approx(unclipped, rel=1e-6) == pytest.approx(unclipped_after, rel=1e-5)
    assert clipped_after == pytest.approx(1e-3, rel=1e-4)


def test_evaluate_reads_the_same_batches_every_time(tiny_config):
    torch.manual_seed(0)
    model = GPT(tiny_config.model)
    _, val = make_loaders(tiny_config, plan_batch(tiny_config, 1), 0)
    first = evaluate(model, val, 2, torch.float32, CPU)
    assert evaluate(model, val, 2, torch.float32, CPU) == first
    assert first == pytest.approx(math.log(100), abs=0.1)  # untrained: near uniform over 100 tokens


# ---------------------------------------------------------------- checkpoints


def _saved_run(run_dir: Path, config: Config, steps=(3,)):
    torch.manual_seed(0)
    model = GPT(config.model)
    optimizer, scheduler = make_optimizer(model, config.train, "cpu")
    for step in steps:
        save_checkpoint(
            run_dir, step, model, optimizer, scheduler, {"position": step}, {"torch": torch.get_rng_state()}
        )
    return model


def test_checkpoints_are_atomic_and_only_the_newest_are_kept(tmp_path, tiny_config):
    _saved_run(tmp_path, tiny_config, steps=(1, 2, 3, 4))
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == [
        "step_00000003.pt",
        "step_00000004.pt",
    ]
    assert latest_step(tmp_path) == 4
    assert latest_step(tmp_path / "elsewhere") is None


def test_corrupt_checkpoint_is_a_clear_error(tmp_path, tiny_config):
    model = _saved_run(tmp_path, tiny_config)
    path = tmp_path / "checkpoints" / "step_00000003.pt"
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])  # a truncated write
    optimizer, scheduler = make_optimizer(model, tiny_config.train, "cpu")
    with pytest.raises(BabyGPTError, match="step_00000003.pt is corrupt"):
        restore_checkpoint(tmp_path, model, optimizer, scheduler)


def test_checkpoint_of_another_shape_says_which_config_differs(tmp_path, tiny_config):
    _saved_run(tmp_path, tiny_config)
    other = GPT(dataclasses.replace(tiny_config.model, n_embd=64))
    optimizer, scheduler = make_optimizer(other, tiny_config.train, "cpu")
    with pytest.raises(BabyGPTError, match="model.n_embd=32 in the checkpoint but 64 in the config"):
        restore_checkpoint(tmp_path, other, optimizer, scheduler)


def test_checkpoint_from_before_fsdp2_support_still_resumes(tmp_path, tiny_config):
    # Those files held torch's own optimizer.state_dict(), keyed by index, and loader micro-steps.
    torch.manual_seed(0)
    model = GPT(tiny_config.model)
    optimizer, scheduler = make_optimizer(model, tiny_config.train, "cpu")
    idx = torch.randint(0, 100, (2, 16))
    model(idx, idx)[1].backward()
    optimizer.step()
    old = {
        "step": 3,
        "model_config": dataclasses.asdict(model.config),
        "model": model.state_dict(),
        "optimizer": optimizer.state_dict(),
        "scheduler": scheduler.state_dict(),
        "loader": {"position": 3},
        "rng": {"torch": torch.get_rng_state()},
    }
    (tmp_path / "checkpoints").mkdir()
    torch.save(old, tmp_path / "checkpoints" / "step_00000003.pt")
    fresh = GPT(tiny_config.model)
    fresh_optimizer, fresh_scheduler = make_optimizer(fresh, tiny_config.train, "cpu")
    restored = restore_checkpoint(tmp_path, fresh, fresh_optimizer, fresh_scheduler)
    saved, loaded = optimizer.state_dict()["state"], fresh_optimizer.state_dict()["state"]
    for i in saved:
        for key in ("exp_avg", "exp_avg_sq"):
            torch.testing.assert_close(loaded[i][key], saved[i][key], rtol=0, atol=0)
    loader, _ = make_loaders(tiny_config, plan_batch(tiny_config, 1), 0)
    loader.load_state_dict(restored["loader"])
    assert loader.position == 3


def test_export_loads_back_with_from_pretrained(tmp_path, tiny_config):
    run_dir = tmp_path / "run"
    model = _saved_run(run_dir, tiny_config).eval()
    export_hf(run_dir, model)
    assert sorted(p.name for p in run_dir.iterdir()) == ["checkpoints", "config.json", "model.safetensors"]
    loaded = GPT.from_pretrained(run_dir).eval()
    idx = torch.randint(0, 100, (2, 16))
    with torch.no_grad():
        torch.testing.assert_close(loaded(idx)[0], model(idx)[0], rtol=0, atol=0)  # same float32 weights


def test_resume_after_a_kill_continues_the_same_run(tiny_config):
    # The uninterrupted run checkpoints at steps 3 and 6. Deleting step 6 leaves exactly what a
    # run killed between those two checkpoints leaves on disk.
    full = main(tiny_config)
    run_dir = Path(full["run_dir"])
    expected = _losses(run_dir)
    before = _metrics(run_dir)
    (run_dir / "checkpoints" / "step_00000006.pt").unlink()
    resumed = main(_with(tiny_config, "run", resume=True))
    assert resumed["steps"] == 3
    after = _metrics(run_dir)  # cut back to step 3, then steps 4-6 again: no step twice
    assert [(r["step"], "loss" in r) for r in after] == [(r["step"], "loss" in r) for r in before]
    got = _losses(run_dir)
    for step in got:  # the same batches, optimizer state and schedule: bit-identical in float32
        assert got[step] == pytest.approx(expected[step], rel=1e-6, abs=0)
    assert resumed["val_loss"] == pytest.approx(full["val_loss"], rel=1e-6)


# ---------------------------------------------------------------- real DDP and the CLI


def _cli(args: list[str], cwd: Path, **env) -> subprocess.CompletedProcess:
    return subprocess.run(
        args, cwd=cwd, capture_output=True, text=True, timeout=300, env={**os.environ, **env}
    )


def test_two_process_ddp_matches_one_process(tmp_path, tiny_config):
    # Same global batch (8 sequences): one process x 4 micro-steps of 2, or two x 2 micro-steps of 2.
    config = _with(
        tiny_config, micro_batch_size=2, total_batch_tokens=8 * 16, max_steps=4, checkpoint_interval=4
    )
    single = main(_with(config, "run", name="single"))
    config_file = tmp_path / "ddp.toml"
    config_file.write_text(dump_toml(_with(config, "run", name="ddp", backend="torch")))
    done = _cli(
        [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--standalone",
            "--nproc_per_node=2",
            str(ROOT / "train.py"),
            f"--config={config_file}",
        ],
        cwd=tmp_path,
        OMP_NUM_THREADS="1",
    )
    assert done.returncode == 0, done.stderr[-3000:]
    ddp_dir = Path(single["run_dir"]).parent / "ddp"
    single_losses, ddp_losses = _losses(Path(single["run_dir"])), _losses(ddp_dir)
    assert sorted(ddp_losses) == [1, 2, 3, 4]
    # the same sums split differently across processes and micro-steps: float32 rounding only
    for step in ddp_losses:
        assert ddp_losses[step] == pytest.approx(single_losses[step], rel=1e-5)
    a, b = load_file(Path(single["run_dir"]) / "model.safetensors"), load_file(ddp_dir / "model.safetensors")
    for name in a:
        np.testing.assert_allclose(b[name], a[name], rtol=1e-4, atol=1e-5, err_msg=name)


@pytest.fixture(scope="module")
def cli_run(tmp_path_factory, tiny_overrides):
    """`python train.py --backend=torch` on the tiny config, run once as a user would."""
    tmp_path = tmp_path_factory.mktemp("cli")
    rng = np.random.default_rng(0)
    write_shard(shard_path(tmp_path / "data" / "tiny", "train", 0), rng.integers(0, 100, 3000))
    write_shard(shard_path(tmp_path / "data" / "tiny", "val", 0), rng.integers(0, 100, 1000))
    config = load_config(
        None, [*tiny_overrides, f"data.data_dir={tmp_path / 'data'}", f"run.out_dir={tmp_path / 'out'}"]
    )
    config_file = tmp_path / "tiny.toml"
    config_file.write_text(dump_toml(config))
    done = _cli(
        [sys.executable, str(ROOT / "train.py"), "--backend=torch", f"--config={config_file}"], cwd=tmp_path
    )
    return done, config_file, config.run_dir


def test_cli_trains_logs_and_exports(cli_run):
    done, _, run_dir = cli_run
    assert done.returncode == 0, done.stderr[-3000:]
    records = _metrics(run_dir)
    assert [r["step"] for r in records if "loss" in r] == [1, 2, 3, 4, 5, 6]
    assert [r["step"] for r in records if "val_loss" in r] == [3, 6]
    timed = [r for r in records if "loss" in r][1]  # the first step warms up and is not timed
    assert {"loss", "lr", "grad_norm", "tokens_per_s", "mfu", "step_ms"} <= set(timed)
    assert timed["mfu"] is None  # no known peak on CPU
    assert (run_dir / "model.safetensors").exists() and (run_dir / "config.json").exists()
    assert GPT.from_pretrained(run_dir).config.n_embd == 32


def test_cli_refuses_to_overwrite_a_run(cli_run):
    _, config_file, run_dir = cli_run
    before = {p: p.read_bytes() for p in run_dir.rglob("*") if p.is_file()}
    done = _cli(
        [sys.executable, str(ROOT / "train.py"), "--backend=torch", f"--config={config_file}"], cwd=run_dir
    )
    assert done.returncode == 2
    assert done.stderr.strip().splitlines() == [
        f"error: {run_dir} already holds a run; pass --resume to continue it, or run.name=<new name> to start another"
    ]
    assert {p: p.read_bytes() for p in run_dir.rglob("*") if p.is_file()} == before


@pytest.mark.parametrize(
    "args, message",
    [
        (["--backend=torch", "train.max_step=3"], "did you mean 'train.max_steps'"),
        (["--backend=tensorflow"], "unknown backend 'tensorflow'"),
        (["--backend=torch", "data.dataset=nothere"], "python prepare.py text FILE... --name nothere"),
    ],
)
def test_cli_errors_are_one_line_and_exit_2(tmp_path, tiny_config, args, message):
    config_file = tmp_path / "tiny.toml"
    config_file.write_text(dump_toml(tiny_config))
    done = _cli([sys.executable, str(ROOT / "train.py"), f"--config={config_file}", *args], cwd=tmp_path)
    assert done.returncode == 2
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and message in lines[0], done.stderr
    assert not (tiny_config.run_dir / "metrics.jsonl").exists()


def test_generate_sample_runs_past_the_context(tiny_config):
    # 50 tokens after the prompt do not fit a 16-token context: all 50 come, through the window
    config = _with(tiny_config, sample_tokens=50, sample_prompt="ROMEO:")
    config = _with(config, "model", vocab_size=50257)  # the prompt is real GPT-2 tokens
    torch.manual_seed(0)
    model = GPT(config.model).eval()
    lengths = []

    def counted(*args, **kwargs):
        samples = generate(*args, **kwargs)
        lengths.append(len(samples[0]))
        return samples

    text = generate_sample(counted, model, config)
    assert text.startswith("ROMEO:") and len(text) > len("ROMEO:")
    assert lengths == [50]  # no end-of-text among them at this seed
    assert generate_sample(generate, model, config) == text  # seeded by train.seed


def test_peak_memory_is_none_on_a_cpu():
    # torch counts only its CUDA allocator's bytes; a CPU run reports no figure rather than 0 GiB.
    assert peak_memory_gib(torch.device("cpu")) is None


def test_all_finite_finds_one_non_finite_parameter(tiny_model_config):
    model = GPT(tiny_model_config)
    assert all_finite(model)
    weight = model.transformer.h[1].mlp.c_fc.weight
    for bad in (float("nan"), float("inf")):
        with torch.no_grad():
            saved, weight[5, 3] = weight[5, 3].item(), bad
        assert not all_finite(model)
        with torch.no_grad():
            weight[5, 3] = saved
    assert all_finite(model)
