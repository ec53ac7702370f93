"""How much memory a training run needs, estimated before it starts, and a refusal in one line.

Framework-free: both backends' `train.py` and the benchmark call `check_fits` with the device's
memory from their `parallel.device_memory()` (host RAM on a CPU, the accelerator's on a GPU), so
that a GPU-sized command on a CPU stops with the estimate and the fix instead of an out-of-memory
traceback or the kernel's OOM killer.

The estimate, per device, for one optimizer step at the configured micro-batch:
- parameters (float32), their gradients and AdamW's two moments: 16 bytes a parameter, divided
  over the devices under `train.fsdp`; plus a bfloat16 copy of the weights when compute is bf16;
- activations kept for the backward pass, per token and layer: the float32 residual stream and
  LayerNorm inputs (8·C bytes) and the compute-dtype tensors the matmuls save (14·C values:
  LayerNorm outputs, q, k, v, the attention output, the MLP's 4C hidden before and after GELU);
  with `train.remat` only each block's input is kept, plus one block recomputed at a time;
- the attention scores and probabilities (B·n_head·T² float32, twice, per layer) off a GPU, where
  attention is not fused;
- the logits: B·T·padded_vocab values in the compute dtype, their float32 log-softmax for the loss
  and their gradient in the compute dtype (the largest tensors at GPT-2's vocabulary);
- a fixed allowance for the runtime itself (the framework, its compiled code, the data).

Calibration (the ratio is estimate / measured peak). GPU, bf16, fused attention, from
docs/benchmarks.md (H100 / H200): GPT-2 124M at 32 × 1024, 21.3–23.9 GiB measured, estimate
25.5 GiB (1.07–1.20; 18.2–18.5 GiB since the loss's gradient is written out, 2026-12-02: 1.38;
JAX 15.5 GiB since its loss kernel writes the gradient into the logits' buffer: 1.65); 774M at
8 × 1024, 25.4–28.1 GiB, estimate 29.7 GiB (1.06–1.17); 1.5B at 8 × 1024, 43.5–48.7 GiB,
estimate 51.3 GiB (1.05–1.18). CPU, float32, peak resident memory of 3-step runs of `train.py`
(`/usr/bin/time -v`, this 2-core 24 GiB machine, 2026-12-01; torch
eager), measured / estimate in GiB:

    preset, micro-batch x T    JAX                  torch
    tiny, 8 x 64               1.13 / 1.34 (1.18)   1.01 / 1.73 (1.72)
    tiny, 32 x 64              1.75 / 2.22 (1.27)   3.49 / 3.76 (1.08)
    default, 4 x 128           1.55 / 1.39 (0.89)   1.20 / 1.77 (1.48)
    default, 16 x 128          1.88 / 2.31 (1.23)   3.08 / 3.84 (1.25)
    small, 8 x 128             1.91 / 1.73 (0.91)   1.73 / 2.50 (1.44)
    small, 32 x 128            3.28 / 3.60 (1.10)   6.63 / 6.67 (1.01)

So the estimate is 0.9–1.7 times the peak, and 1.0–1.3 times it where the batch dominates (below
1 only for runs of about 1.5 GiB, where JAX's runtime is more than the 1 GiB allowance).
`check_fits` refuses only when the estimate exceeds `FITS` (90%) of the device's memory: the
README's GPU runs pass on an 80 GB GPU (tests/test_memory.py), and on this CPU GPT-2 124M at
16 or 32 × 1024 (39 and 75 GiB estimated; JAX asked for a single 55 GB buffer) is refused.
"""

from __future__ import annotations

import dataclasses
import os

from babygpt.config import BabyGPTError, Config, compute_dtype_name
from babygpt.flops import num_params

FITS = 0.9  # refuse when the estimate exceeds this share of the device's memory
# Bytes per logit when torch runs the loss head eagerly: the lm_head's output, its masked copy, the
# log-softmax and the three gradients are float32 tensors alive at once (plus what glibc keeps of
# them, `keep_freed_host_memory`): measured 21-28 on CPU (CPU_CALIBRATION), where a compiled or
# jitted head keeps about 12.
EAGER_LOGITS = 28
RUNTIME_BYTES = 1 << 30  # the framework, its compiled code, the data loader: about 1 GiB
GIB = 1 << 30


def training_bytes(
    config: Config, devices: int, compute_dtype: str, gpu: bool, eager_loss: bool = False
) -> dict[str, int]:
    """Bytes per device of one training step, by part: params_and_optimizer, activations,
    attention, logits, runtime (and their total). `compute_dtype` is "float32", "bfloat16" or
    "float64" (everything float32 holds, twice over); `eager_loss`: the loss head runs op by op
    (torch without torch.compile), see EAGER_LOGITS."""
    if compute_dtype == "float64":
        single = training_bytes(config, devices, "float32", gpu, eager_loss)
        return {part: 2 * n for part, n in single.items()}
    m, t = config.model, config.train
    P, C, L = num_params(m), m.n_embd, m.n_layer
    B, T = t.micro_batch_size, m.block_size
    s = 2 if compute_dtype == "bfloat16" else 4
    shards = devices if t.fsdp else 1
    states = 16 * P // shards + (2 * P if s == 2 else 0)
    per_layer = B * T * (8 * C + 14 * s * C)  # what one block keeps for its backward
    if t.remat:  # each block's input (float32), and one block's activations while it is recomputed
        activations = L * B * T * 4 * C + per_layer
    else:
        activations = L * per_layer
    scores = 0 if gpu else 2 * 4 * B * m.n_head * T * T  # scores and probabilities, float32
    attention = scores if t.remat else L * scores
    logits = B * T * m.padded_vocab_size * (EAGER_LOGITS if eager_loss else 2 * s + 4)
    parts = {
        "params_and_optimizer": states,
        "activations": activations,
        "attention": attention,
        "logits": logits,
        "runtime": RUNTIME_BYTES,
    }
    return {**parts, "total": sum(parts.values())}


CONFIG_FLAGS = {"micro_batch_size": "train.micro_batch_size={}", "remat": "train.remat=true"}


def check_fits(
    config: Config,
    devices: int,
    memory: int,
    device: str,
    flags: dict[str, str] = CONFIG_FLAGS,
    eager_loss: bool = False,
) -> dict[str, int]:
    """The estimate, or a BabyGPTError in one line naming it, the device's memory and the fix.

    `memory` is one device's bytes (`parallel.device_memory()`); `device` is the framework's
    platform name (cpu, gpu, cuda), which decides the compute dtype as `train.dtype` does. `flags`
    spells the fixes the caller's way (overrides for train.py, flags for the benchmark).
    """
    budget = dict(gpu=device in ("gpu", "cuda"), eager_loss=eager_loss)
    dtype = compute_dtype_name(config.train.dtype, device)
    estimate = training_bytes(config, devices, dtype, **budget)
    if _fits(config, devices, dtype, memory, **budget):
        return estimate
    t = config.train
    fixes = []
    smaller = _largest_micro_batch(config, devices, dtype, memory, budget)
    if smaller:
        keeps = " (the step keeps its size: more accumulation)" if t.total_batch_tokens else ""
        fixes.append(flags["micro_batch_size"].format(smaller) + keeps)
    if not t.remat and _fits(_with(config, remat=True), devices, dtype, memory, **budget):
        fixes.append(flags["remat"])
    fixes.append("a GPU" if not budget["gpu"] else "more GPUs with train.fsdp=true")
    where = "host RAM" if not budget["gpu"] else "GPU memory"
    raise BabyGPTError(
        f"this run needs about {estimate['total'] / GIB:.1f} GiB per device"
        f" (micro-batch {t.micro_batch_size} x {config.model.block_size} tokens, {dtype};"
        f" logits alone {estimate['logits'] / GIB:.1f} GiB) but this {device} device has {memory / GIB:.1f} GiB"
        f" of {where}; try {', or '.join(fixes)}"
    )


def _largest_micro_batch(config: Config, devices: int, dtype: str, memory: int, budget: dict) -> int:
    """The largest micro-batch (the asked one halved, and again) that fits, or 0 if none does."""
    B = config.train.micro_batch_size // 2
    while B >= 1 and not _fits(_with(config, micro_batch_size=B), devices, dtype, memory, **budget):
        B //= 2
    return B


def _with(config: Config, **train) -> Config:
    return dataclasses.replace(config, train=dataclasses.replace(config.train, **train))


def _fits(config: Config, devices: int, dtype: str, memory: int, **budget) -> bool:
    return training_bytes(config, devices, dtype, **budget)["total"] <= FITS * memory


def host_memory() -> int:
    """Bytes of RAM on this machine: a CPU device's memory."""
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
