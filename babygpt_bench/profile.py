"""Where a training step's device time goes: each backend's own profiler, one summary for both.

`python -m parity.bench ... --profile DIR` runs a few extra steps under `jax.profiler.trace` or
`torch.profiler`, keeps the trace in DIR (open it in Perfetto or TensorBoard), and prints the kernel
time per step grouped into the categories below, so the two backends read the same way. Both
profilers write Chrome-trace JSON, which is all this module parses.
"""

from __future__ import annotations

import gzip
import json
import re
from collections import defaultdict
from pathlib import Path

# First match wins. Kernel names differ across cuBLAS / cuDNN / XLA / Triton versions, so these are
# substrings seen in H100 traces of both backends, lower-cased. Fused kernels are split by what
# bounds them: Triton names reductions triton_red_/triton_per_ and pointwise kernels triton_poi_;
# XLA names its reduction fusions *reduce*.
CATEGORIES = (
    ("attention", ("flash", "fmha", "sdpa", "attention", "_attn")),
    ("matmul", ("gemm", "nvjet", "cutlass", "xmma", "cublas")),
    ("optimizer", ("adam", "multi_tensor")),
    ("fused reduction", ("triton_red", "triton_per", "reduce")),
    ("fused elementwise", ("triton_poi", "fusion", "elementwise", "vectorized")),
    ("copy", ("memcpy", "memset", "copy")),
)


def categorize(kernel: str) -> str:
    name = kernel.lower()
    for category, needles in CATEGORIES:
        if any(n in name for n in needles):
            return category
    return "other"


def _load(path: Path) -> dict:
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rt") as f:
        trace = json.load(f)
    return trace if isinstance(trace, dict) else {"traceEvents": trace}


def device_kernels(trace: dict) -> list[tuple[str, float]]:
    """(name, microseconds) of every device kernel in a Chrome trace from either profiler.

    torch marks kernels with cat "kernel". JAX's trace puts each GPU in its own process
    ("/device:GPU:0") whose threads are CUDA streams; its other rows ("XLA Ops", "XLA Modules")
    overlap the kernels, so only the stream rows count.
    """
    events = trace.get("traceEvents", [])
    if any(e.get("cat") == "kernel" for e in events):
        return [(e["name"], float(e.get("dur", 0))) for e in events if e.get("cat") == "kernel"]
    process, thread = {}, {}
    for e in events:
        if e.get("ph") == "M" and e.get("name") == "process_name":
            process[e["pid"]] = e.get("args", {}).get("name", "")
        if e.get("ph") == "M" and e.get("name") == "thread_name":
            thread[(e["pid"], e.get("tid"))] = e.get("args", {}).get("name", "")
    devices = {pid for pid, name in process.items() if re.search(r"/device:(gpu|cuda)", name, re.I)}
    return [
        (e["name"], float(e.get("dur", 0)))
        for e in events
        if e.get("ph") == "X"
        and e.get("pid") in devices
        and thread.get((e["pid"], e.get("tid")), "").lower().startswith("stream")
    ]


def summarize(kernels: list[tuple[str, float]], steps: int, top: int = 40) -> dict:
    """Milliseconds per step by category and for the `top` most expensive kernels."""
    by_category: dict[str, float] = defaultdict(float)
    by_kernel: dict[str, float] = defaultdict(float)
    counts: dict[str, int] = defaultdict(int)
    for name, us in kernels:
        by_category[categorize(name)] += us / 1000 / steps
        by_kernel[name] += us / 1000 / steps
        counts[name] += 1
    heaviest = sorted(by_kernel.items(), key=lambda kv: -kv[1])[:top]
    return {
        "steps": steps,
        "kernel_ms_per_step": sum(by_category.values()),
        "kernels_per_step": len(kernels) / steps,
        "categories": dict(sorted(by_category.items(), key=lambda kv: -kv[1])),
        "top_kernels": [
            {
                "name": name,
                "ms_per_step": ms,
                "calls_per_step": counts[name] / steps,
                "category": categorize(name),
            }
            for name, ms in heaviest
        ],
    }


def format_summary(backend: str, summary: dict) -> str:
    unit = summary.get("unit", "step")
    lines = [
        f"{backend}: {summary['kernel_ms_per_step']:.3f} ms of kernels per {unit},"
        f" {summary['kernels_per_step']:.0f} kernels per {unit}"
    ]
    for category, ms in summary["categories"].items():
        lines.append(f"  {category:<20} {ms:8.3f} ms")
    lines.append(f"  heaviest kernels (ms/{unit}, calls/{unit}):")
    for k in summary["top_kernels"][:15]:
        lines.append(f"    {k['ms_per_step']:7.3f} {k['calls_per_step']:5.1f}  {k['name'][:110]}")
    return "\n".join(lines)


def profile_torch(step, steps: int, out: Path, per_step: int = 1) -> dict:
    """Trace `steps` calls of `step`; the summary is per unit of work, `per_step` units per call
    (1 for a training step, the new tokens for a generate call)."""
    import torch

    activities = [torch.profiler.ProfilerActivity.CPU]
    if torch.cuda.is_available():
        activities.append(torch.profiler.ProfilerActivity.CUDA)
    with torch.profiler.profile(activities=activities) as prof:
        for _ in range(steps):
            step()
    out.mkdir(parents=True, exist_ok=True)
    path = out / "torch_trace.json"
    prof.export_chrome_trace(str(path))
    # The host's side, for a step slower than its kernels: which ops the CPU spends its time in
    table = prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=30)
    (out / "torch_ops.txt").write_text(table)
    return summarize(device_kernels(_load(path)), steps * per_step)


def profile_jax(step, steps: int, out: Path, per_step: int = 1) -> dict:
    import jax

    with jax.profiler.trace(str(out), create_perfetto_trace=True):
        for _ in range(steps):
            step()
    path = max(out.rglob("perfetto_trace.json.gz"), key=lambda p: p.stat().st_mtime)
    return summarize(device_kernels(_load(path)), steps * per_step)
