"""The memory estimate before training: its arithmetic, its calibration against measured peaks,
the verdict on the README's commands for known devices, and the one-line refusal on this machine.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from babygpt.config import BabyGPTError, Config, ModelConfig, TrainConfig, load_config
from babygpt.flops import num_params
from babygpt.memory import EAGER_LOGITS, FITS, GIB, check_fits, host_memory, training_bytes

ROOT = Path(__file__).resolve().parent.parent
# What each framework reports for one GPU: torch's total_memory; JAX's allocator limit is 75% of it.
H100 = 85_520_809_984  # "80 GB" H100 SXM: 79.6 GiB
H200 = 150_754_820_096  # 143,771 MiB
CPU_24_GIB = 24 * GIB


def _config(preset: str, batch: int, seq: int = 1024, **train) -> Config:
    model = ModelConfig.preset(preset, block_size=seq)
    return Config(model=model, train=TrainConfig(micro_batch_size=batch, **train))


def test_parts_follow_the_model_and_the_batch():
    config = _config("gpt2", 8)
    P, B, T, V = num_params(config.model), 8, 1024, config.model.padded_vocab_size
    fp32 = training_bytes(config, 1, "float32", gpu=False)
    bf16 = training_bytes(config, 1, "bfloat16", gpu=True)
    assert fp32["params_and_optimizer"] == 16 * P  # weights, gradients, two AdamW moments
    assert bf16["params_and_optimizer"] == 18 * P  # and a bfloat16 copy of the weights
    assert fp32["logits"] == B * T * V * 12 and bf16["logits"] == B * T * V * 8
    assert bf16["attention"] == 0 < fp32["attention"]  # fused on a GPU, materialized on a CPU
    eager = training_bytes(config, 1, "float32", gpu=False, eager_loss=True)
    assert eager["logits"] == B * T * V * EAGER_LOGITS  # torch's loss head, op by op
    assert fp32["total"] == sum(v for k, v in fp32.items() if k != "total")
    double = training_bytes(_config("gpt2", 16), 1, "float32", gpu=False)
    for part in ("activations", "attention", "logits"):
        assert double[part] == 2 * fp32[part]
    assert double["params_and_optimizer"] == fp32["params_and_optimizer"]
    fp64 = training_bytes(config, 1, "float64", gpu=False)  # train.dtype=float64: all of it, twice
    assert fp64 == {part: 2 * n for part, n in fp32.items()}


def test_fsdp_divides_the_states_and_remat_keeps_one_block():
    plain, fsdp = _config("gpt2", 8), _config("gpt2", 8, fsdp=True)
    assert training_bytes(fsdp, 8, "bfloat16", True)["params_and_optimizer"] == (
        16 * num_params(plain.model) // 8 + 2 * num_params(plain.model)
    )
    assert training_bytes(plain, 8, "bfloat16", True) == training_bytes(plain, 1, "bfloat16", True)
    remat = training_bytes(_config("gpt2", 8, remat=True), 1, "bfloat16", True)
    full = training_bytes(plain, 1, "bfloat16", True)
    assert remat["activations"] < full["activations"] / 4
    assert remat["logits"] == full["logits"]  # the loss head is not recomputed


# Measured peaks on one GPU, bf16 (docs/benchmarks.md): (preset, micro-batch, GiB low, GiB high).
GPU_PEAKS = [("gpt2", 32, 21.3, 23.9), ("gpt2-large", 8, 25.4, 28.1), ("gpt2-xl", 8, 44.4, 48.7)]


@pytest.mark.parametrize("preset, batch, low, high", GPU_PEAKS)
def test_the_estimate_errs_high_by_at_most_a_third_of_the_measured_gpu_peaks(preset, batch, low, high):
    estimate = training_bytes(_config(preset, batch), 1, "bfloat16", gpu=True)["total"] / GIB
    assert 1.0 < estimate / high and estimate / low < 1.35


@pytest.mark.parametrize(
    "path, overrides",
    [
        ("configs/shakespeare-gpt2.toml", []),
        ("configs/fineweb-124m.toml", []),
        ("configs/fineweb-124m.toml", ["train.fsdp=true"]),
        ("configs/gpt2-774m.toml", []),
    ],
)
@pytest.mark.parametrize(
    "memory", [H100, 0.75 * H100, H200, 0.75 * H200], ids=["h100", "h100-jax", "h200", "h200-jax"]
)
def test_the_readme_gpu_runs_pass_on_an_80_gb_gpu_and_are_refused_on_this_cpu(path, overrides, memory):
    config = load_config(ROOT / path, overrides)
    check_fits(config, 8 if "fsdp" in str(overrides) else 1, int(memory), "gpu")
    with pytest.raises(BabyGPTError, match="GiB of host RAM"):
        check_fits(config, 1, CPU_24_GIB, "cpu")


def test_the_bench_command_passes_on_an_80_gb_gpu():
    config = _config("gpt2", 32)  # python -m parity.bench --preset gpt2 --batch 32 --seq 1024
    for memory, device in ((H100, "cuda"), (int(0.75 * H100), "gpu")):
        check_fits(config, 1, memory, device)


def test_the_default_and_the_test_configs_are_small():
    default = load_config(ROOT / "configs/shakespeare.toml")
    assert check_fits(default, 1, CPU_24_GIB, "cpu")["total"] < 2 * GIB
    assert check_fits(_config("tiny", 8, 64), 1, 4 * GIB, "cpu")["total"] < 1.5 * GIB  # 1 of it the runtime


def test_the_refusal_is_one_line_naming_the_estimate_the_memory_and_fixes_that_fit():
    with pytest.raises(BabyGPTError) as info:
        check_fits(_config("gpt2", 16), 1, CPU_24_GIB, "cpu")
    message = str(info.value)
    assert "\n" not in message
    assert (
        "needs about 39.1 GiB per device" in message and "this cpu device has 24.0 GiB of host RAM" in message
    )
    # Each fix offered fits on its own: half the micro-batch does, and so does remat here.
    assert "try train.micro_batch_size=8, or train.remat=true, or a GPU" in message
    check_fits(_config("gpt2", 8), 1, CPU_24_GIB, "cpu")
    check_fits(_config("gpt2", 16, remat=True), 1, CPU_24_GIB, "cpu")
    with pytest.raises(BabyGPTError, match="try a GPU$"):  # nothing smaller fits 1 GiB
        check_fits(_config("gpt2", 16), 1, GIB, "cpu")


def test_host_memory_is_this_machines_ram():
    meminfo = Path("/proc/meminfo").read_text().split("\n")[0].split()  # MemTotal: N kB
    assert abs(host_memory() - int(meminfo[1]) * 1024) < 64 << 20


GPT2_B32 = _config("gpt2", 32)


@pytest.mark.skipif(
    training_bytes(GPT2_B32, 1, "float32", gpu=False)["total"] <= FITS * host_memory(),
    reason="this machine has the RAM for GPT-2 124M at 32 x 1024",
)
@pytest.mark.parametrize(
    "command",
    [
        [
            "train.py",
            "--backend=torch",
            "--config",
            "configs/shakespeare-gpt2.toml",
            "train.micro_batch_size=32",
        ],
        ["-m", "parity.bench", "--backend", "torch", "--preset", "gpt2", "--batch", "32", "--seq", "1024"],
    ],
    ids=["train", "bench"],
)
def test_a_gpt2_run_at_32_x_1024_is_refused_on_this_cpu_in_one_line(command, tmp_path):
    out = ["run.out_dir=" + str(tmp_path)] if command[0] == "train.py" else ["--out", str(tmp_path)]
    result = subprocess.run(
        [sys.executable, *command, *out], capture_output=True, text=True, cwd=ROOT, timeout=300
    )
    assert result.returncode == 2, result.stderr
    assert result.stderr.count("\n") == 1 and result.stderr.startswith("error: this run needs about")
    assert "GiB of host RAM; try " in result.stderr and "a GPU" in result.stderr
    # Refused before anything was written: no run directory (the run's lock file sits beside it).
    assert [p.name for p in tmp_path.iterdir() if not p.name.endswith(".lock")] == []
