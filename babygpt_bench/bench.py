"""Side-by-side benchmark of the two backends: the full training step, or KV-cache decoding.

    python -m parity.bench --backend jax,torch --preset gpt2 --batch 32 --seq 1024 --steps 30
    python -m parity.bench --mode generate --backend jax,torch,hf --batch 1,32 --prompt-len 128 --new-tokens 256

Each backend runs in its own subprocess (so JAX's and torch's allocators never share a GPU) and
times the step each backend's `train.py` runs: forward, backward, gradient clipping and the AdamW
update, on random tokens, after warm-up and compilation, synchronizing the device after every
step. Prints one row per backend and writes `bench.json` and a bar chart to --out.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

from babygpt.cli import run_cli
from babygpt.config import BabyGPTError, Config, ModelConfig, TrainConfig, require_positive
from babygpt.flops import flops_per_token, peak_flops
from babygpt.memory import check_fits
from babygpt_bench.profile import format_summary, profile_jax, profile_torch

TRAIN_BACKENDS = ("jax", "torch")
BENCH_FLAGS = {"micro_batch_size": "--batch {}", "remat": "--remat"}  # check_fits's fixes, as flags
GENERATE_BACKENDS = ("jax", "torch", "hf")


@dataclasses.dataclass
class Row:
    backend: str
    mode: str
    preset: str
    batch: int
    seq: int
    device: str
    ms_median: float
    ms_min: float
    ms_max: float
    tokens_per_s: float
    mfu: float | None
    peak_mem_gb: float | None
    compile_s: float
    extra: dict = dataclasses.field(default_factory=dict)


def _stats(times: list[float]) -> tuple[float, float, float]:
    ms = [1000 * t for t in times]
    return statistics.median(ms), min(ms), max(ms)


def _config(args) -> Config:
    model = ModelConfig.preset(args.preset, block_size=args.seq)
    train = TrainConfig(
        max_steps=10_000,
        micro_batch_size=args.batch_list[0],
        warmup_steps=10,
        remat=args.remat,
        fsdp=args.fsdp,
        compile=bool(args.compile),
    )
    return Config(model=model, train=train)


# ---------------------------------------------------------------------------------------------
# training step


def bench_train_torch(args) -> Row:
    import torch

    from babygpt_torch.model import GPT
    from babygpt_torch.parallel import device_memory, peak_memory_gib, setup_distributed
    from babygpt_torch.train import init_state, train_step

    if args.compile is None:  # as train.py's presets: the GPU ones compile, the CPU default does not
        args.compile = torch.cuda.is_available()
    config = _config(args)
    check_fits(config, 1, *device_memory(), flags=BENCH_FLAGS, eager_loss=not args.compile)
    dist = setup_distributed(args.fsdp)  # FSDP2 shards over a process group, here of one
    cuda = dist.device.type == "cuda"
    torch.manual_seed(0)
    model = GPT(config.model, remat=args.remat)
    state = init_state(model, config, dist)  # placed, sharded and compiled as train.py does
    B, T = args.batch_list[0], args.seq
    # One optimizer step of one micro-batch, on fixed random tokens: speed does not depend on them.
    x = torch.randint(0, config.model.vocab_size, (1, B, T), device=dist.device)
    y = torch.randint(0, config.model.vocab_size, (1, B, T), device=dist.device)
    batch = (x, y)
    dtype = torch.bfloat16 if cuda and args.dtype == "bfloat16" else torch.float32

    metrics = {}

    def launch():
        metrics.update(train_step(state, batch, autocast_dtype=dtype, grad_clip=1.0)[1])

    def wait():  # the host reads the step's loss, as nanoGPT's bench.py does (`loss.item()`)
        float(metrics["loss"])

    def step():
        launch()
        wait()

    t0 = time.perf_counter()
    for _ in range(args.warmup):
        step()
    compile_s = time.perf_counter() - t0
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    times, dispatch = _waited_steps(launch, wait, args.steps)
    name = torch.cuda.get_device_name() if cuda else "cpu"
    peak_mem = peak_memory_gib(dist.device)
    row = _train_row("torch", args, config, name, times, compile_s, peak_mem)
    row.extra["ms_dispatch"] = dispatch
    row.extra["ms_pipelined"] = _pipelined_ms(launch, wait, args.steps)
    row.extra["compiled"] = args.compile
    if args.profile:
        row.extra["profile"] = profile_torch(step, args.profile_steps, Path(args.profile) / "torch")
    return row


def bench_train_jax(args) -> Row:
    import jax
    import jax.numpy as jnp
    import numpy as np
    from flax import nnx

    from babygpt_jax.model import GPT
    from babygpt_jax.optim import lr_schedule, make_optimizer
    from babygpt_jax.parallel import (
        batch_sharding,
        device_memory,
        make_global_batch,
        make_mesh,
        peak_memory_gib,
    )
    from babygpt_jax.train import init_state, make_train_step

    config = _config(args)
    check_fits(config, 1, *device_memory(), flags=BENCH_FLAGS)  # the batch on one device: at most
    gpu = jax.default_backend() == "gpu"
    dtype = jnp.bfloat16 if gpu and args.dtype == "bfloat16" else jnp.float32
    mesh = make_mesh(config)
    model = GPT(config.model, rngs=nnx.Rngs(0), dtype=dtype, remat=args.remat)
    optimizer = make_optimizer(config.train)
    graphdef, rest, state, sharding = init_state(model, optimizer, mesh, args.fsdp, 0)
    step_fn = make_train_step(graphdef, rest, optimizer, lr_schedule(config.train), mesh, sharding)
    B, T = args.batch_list[0], args.seq
    rng = np.random.default_rng(0)
    batches = batch_sharding(mesh)
    # One optimizer step of one micro-batch, on fixed random tokens: speed does not depend on them.
    x = make_global_batch(rng.integers(0, config.model.vocab_size, (1, B, T), dtype=np.int32), batches)
    y = make_global_batch(rng.integers(0, config.model.vocab_size, (1, B, T), dtype=np.int32), batches)
    batch = (x, y)
    states = [state]  # the step donates the state: each call takes the last one's result
    metrics = {}

    def launch():
        new_state, new_metrics = step_fn(states.pop(), batch)
        states.append(new_state)
        metrics.update(new_metrics)

    def wait():  # until the step's loss is ready, as nanoGPT's bench.py waits (`loss.item()`)
        # One array, not the state's ~1,350: an XLA program's outputs are all ready at its end, and
        # waiting on each of them took ~0.7 ms a step of host time; reading the value, float(), ~0.5
        # ms more (H200 host, docs/benchmarks.md).
        jax.block_until_ready(metrics["loss"])

    def step():
        launch()
        wait()

    t0 = time.perf_counter()
    for _ in range(args.warmup):
        step()
    compile_s = time.perf_counter() - t0
    times, dispatch = _waited_steps(launch, wait, args.steps)
    device = jax.devices()[0]
    peak_mem = peak_memory_gib(device)
    row = _train_row("jax", args, config, device.device_kind if gpu else "cpu", times, compile_s, peak_mem)
    row.extra["ms_dispatch"] = dispatch
    row.extra["ms_pipelined"] = _pipelined_ms(launch, wait, args.steps)
    if args.profile:
        row.extra["profile"] = profile_jax(step, args.profile_steps, Path(args.profile) / "jax")
    return row


def _waited_steps(launch, wait, steps: int) -> tuple[list[float], float]:
    """Seconds per step, each launched and then waited for, and the median milliseconds until the
    launch returned: the host's dispatch. On a GPU both frameworks return before the device is
    done, so a launch that takes a large share of the step shows a host that blocks inside the
    call (JAX's jitted step at 350M and 1.5B on an H200, docs/benchmarks.md); on a CPU torch
    computes inside the call."""
    times, dispatch = [], []
    for _ in range(steps):
        t = time.perf_counter()
        launch()
        dispatch.append(time.perf_counter() - t)
        wait()
        times.append(time.perf_counter() - t)
    return times, 1000 * statistics.median(dispatch)


def _pipelined_ms(launch, wait, steps: int) -> float:
    """Milliseconds per step when steps are launched back to back and waited for once, as the
    harness runs them (it waits only at log lines). The per-step times above wait after every step,
    as nanoGPT's bench.py does (`loss.item()`), which exposes the host's dispatch of each step."""
    t = time.perf_counter()
    for _ in range(steps):
        launch()
    wait()
    return 1000 * (time.perf_counter() - t) / steps


def _train_row(backend, args, config, device, times, compile_s, peak_mem) -> Row:
    med, lo, hi = _stats(times)
    tokens = args.batch_list[0] * args.seq
    tps = tokens / (med / 1000)
    peak = peak_flops(device) if device != "cpu" else None
    mfu = tps * flops_per_token(config.model, args.seq) / peak if peak else None
    return Row(
        backend,
        "train",
        args.preset,
        args.batch_list[0],
        args.seq,
        device,
        med,
        lo,
        hi,
        tps,
        mfu,
        peak_mem,
        compile_s,
    )


# ---------------------------------------------------------------------------------------------
# decoding


def bench_generate(args) -> list[Row]:
    """New tokens per second for a batch of prompts: prefill once, then `new_tokens` decode steps."""
    import numpy as np

    model_config = ModelConfig.preset(args.preset)
    rows = []
    for batch in args.batch_list:
        prompts = np.random.default_rng(0).integers(0, 50000, (batch, args.prompt_len)).tolist()
        run, device, peak_mem = _generator(args, model_config)
        t0 = time.perf_counter()
        run(prompts)  # warm-up and compilation
        compile_s = time.perf_counter() - t0
        times = []
        for _ in range(args.steps):
            t = time.perf_counter()
            run(prompts)
            times.append(time.perf_counter() - t)
        med, lo, hi = _stats(times)
        tps = batch * args.new_tokens / (med / 1000)
        extra = {"new_tokens": args.new_tokens}
        if args.backend in ("jax", "torch") and args.fused is not None:
            extra["fused"] = args.fused
        if args.profile and args.backend in ("jax", "torch"):  # kernels per new token, this batch size
            profiler = profile_jax if args.backend == "jax" else profile_torch
            folder = Path(args.profile) / f"{args.backend}-generate-b{batch}"
            extra["profile"] = profiler(functools.partial(run, prompts), 1, folder, per_step=args.new_tokens)
            extra["profile"]["unit"] = f"new token at batch {batch}"
        rows.append(
            Row(
                args.backend,
                "generate",
                args.preset,
                batch,
                args.prompt_len,
                device,
                med,
                lo,
                hi,
                tps,
                None,
                peak_mem(),
                compile_s,
                extra,
            )
        )
    return rows


def _generator(args, model_config: ModelConfig):
    """(run(prompts), device name, peak memory fn) for one backend, with random GPT-2 weights."""
    n = args.new_tokens
    if args.backend == "torch":
        import torch

        from babygpt_torch.generate import generate
        from babygpt_torch.model import GPT
        from babygpt_torch.parallel import peak_memory_gib

        cuda = torch.cuda.is_available()
        torch.manual_seed(0)
        model = GPT(model_config).to("cuda" if cuda else "cpu").eval()
        if cuda:
            model = model.to(torch.bfloat16)  # inference holds the weights in bf16: half the bytes per step

        def run(prompts):
            generate(model, prompts, n, temperature=0.0, stop_token=None, fused=args.fused)
            if cuda:
                torch.cuda.synchronize()

        name = torch.cuda.get_device_name() if cuda else "cpu"
        return run, name, lambda: peak_memory_gib(torch.device("cuda" if cuda else "cpu"))
    if args.backend == "jax":
        import jax
        import jax.numpy as jnp
        from flax import nnx

        from babygpt_jax.generate import generate
        from babygpt_jax.model import GPT
        from babygpt_jax.parallel import peak_memory_gib

        gpu = jax.default_backend() == "gpu"
        model = GPT(model_config, rngs=nnx.Rngs(0), dtype=jnp.bfloat16 if gpu else jnp.float32)
        if gpu:  # bf16 weights, as for torch
            state = nnx.state(model, nnx.Param)
            nnx.update(model, jax.tree.map(lambda p: p.astype(jnp.bfloat16), state))

        def run(prompts):
            return generate(model, prompts, n, temperature=0.0, stop_token=None, fused=args.fused)

        device = jax.devices()[0]
        return (
            run,
            device.device_kind if gpu else "cpu",
            lambda: peak_memory_gib(device),
        )
    if args.backend == "hf":
        import torch
        from transformers import GPT2Config, GPT2LMHeadModel

        from babygpt_torch.parallel import peak_memory_gib

        cuda = torch.cuda.is_available()
        hf_config = GPT2Config(
            n_layer=model_config.n_layer,
            n_head=model_config.n_head,
            n_embd=model_config.n_embd,
            n_positions=model_config.block_size,
        )
        model = (
            GPT2LMHeadModel(hf_config)
            .to("cuda" if cuda else "cpu", torch.bfloat16 if cuda else torch.float32)
            .eval()
        )

        def run(prompts):
            ids = torch.tensor(prompts, device=model.device)
            model.generate(
                ids,
                attention_mask=torch.ones_like(ids),
                max_new_tokens=n,
                min_new_tokens=n,
                do_sample=False,
                cache_implementation=args.hf_cache,
                pad_token_id=50256,
            )
            if cuda:
                torch.cuda.synchronize()

        name = torch.cuda.get_device_name() if cuda else "cpu"
        return run, name, lambda: peak_memory_gib(model.device)
    raise BabyGPTError(
        f"unknown backend {args.backend!r} for --mode generate; choose from {', '.join(GENERATE_BACKENDS)}"
    )


# ---------------------------------------------------------------------------------------------
# the parent: one subprocess per backend, then the table, bench.json and the plot


def _child(args) -> None:
    if args.mode == "train":
        rows = [bench_train_jax(args) if args.backend == "jax" else bench_train_torch(args)]
    else:
        rows = bench_generate(args)
    print("BENCH_JSON " + json.dumps([dataclasses.asdict(r) for r in rows]), flush=True)


def _label(row: dict) -> str:
    """The backend, with transformers' cache or whether decoding took the fused kernels."""
    extra = row["extra"]
    if extra.get("hf_cache"):
        return f"{row['backend']}/{extra['hf_cache']}"
    if "fused" in extra:
        return f"{row['backend']}/{'fused' if extra['fused'] else 'plain'}"
    return row["backend"]


def format_table(rows: list[dict]) -> str:
    head = f"{'backend':<11} {'mode':<8} {'preset':<12} {'batch':>5} {'seq':>5} {'ms/step (min-max)':>22} {'tokens/s':>12} {'MFU':>6} {'peak GiB':>8} {'warm-up s':>9} {'dispatch ms':>11} {'pipelined ms':>12}"
    lines = [head, "-" * len(head)]
    for r in rows:
        spread = f"{r['ms_median']:.2f} ({r['ms_min']:.1f}-{r['ms_max']:.1f})"
        mfu = f"{r['mfu']:.1%}" if r["mfu"] is not None else "-"
        mem = f"{r['peak_mem_gb']:.1f}" if r["peak_mem_gb"] is not None else "-"
        label = _label(r)
        pipelined = f"{r['extra']['ms_pipelined']:.2f}" if "ms_pipelined" in r["extra"] else "-"
        dispatch = f"{r['extra']['ms_dispatch']:.2f}" if "ms_dispatch" in r["extra"] else "-"
        lines.append(
            f"{label:<11} {r['mode']:<8} {r['preset']:<12} {r['batch']:>5} {r['seq']:>5} {spread:>22} {r['tokens_per_s']:>12,.0f} {mfu:>6} {mem:>8} {r['compile_s']:>9.1f} {dispatch:>11} {pipelined:>12}"
        )
    return "\n".join(lines)


def plot(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    labels = [f"{_label(r)}\n{r['preset']} b{r['batch']}" for r in rows]
    values = [r["tokens_per_s"] for r in rows]
    fig, ax = plt.subplots(figsize=(max(4, 1.3 * len(rows)), 3.5))
    bars = ax.bar(
        labels,
        values,
        color=[
            "#4c72b0" if r["backend"] == "jax" else "#dd8452" if r["backend"] == "torch" else "#55a868"
            for r in rows
        ],
    )
    ax.bar_label(bars, labels=[f"{v:,.0f}" for v in values], fontsize=8)
    if values and max(values) > 10 * min(values):  # batch 1 beside batch 32: both readable
        ax.set_yscale("log")
    mode = rows[0]["mode"] if rows else ""
    ax.set_ylabel("new tokens/s" if mode == "generate" else "training tokens/s")
    ax.set_title(f"babyGPT {mode} throughput on {rows[0]['device'] if rows else ''}")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--backend", default="jax,torch", help="comma-separated: jax, torch (and hf for --mode generate)"
    )
    parser.add_argument("--mode", choices=("train", "generate"), default="train")
    parser.add_argument(
        "--preset", default="gpt2", help="gpt2, gpt2-medium, gpt2-large, gpt2-xl, small, tiny"
    )
    parser.add_argument(
        "--batch", default="32", help="micro batch (train) or comma-separated batch sizes (generate)"
    )
    parser.add_argument("--seq", type=int, default=1024)
    parser.add_argument("--steps", type=int, default=30, help="timed repetitions")
    parser.add_argument("--warmup", type=int, default=3, help="untimed steps first (compilation)")
    parser.add_argument(
        "--dtype",
        choices=("bfloat16", "float32"),
        default="bfloat16",
        help="compute dtype on GPU (CPU: float32)",
    )
    parser.add_argument(
        "--compile",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="torch.compile the torch model (default: on a GPU; on a CPU inductor's C++ build of the"
        " step takes about a minute)",
    )
    parser.add_argument("--remat", action="store_true", help="activation checkpointing")
    parser.add_argument(
        "--fsdp", action="store_true", help="shard params and optimizer state (torch: FSDP2; jax: the mesh)"
    )
    parser.add_argument(
        "--fused",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="generate: decode in the hand-written kernels (kernels.py; default: on a GPU where they fit)",
    )
    parser.add_argument("--prompt-len", type=int, default=128)
    parser.add_argument("--new-tokens", type=int, default=256)
    parser.add_argument(
        "--hf-cache", default="static", help="transformers cache_implementation (static or dynamic)"
    )
    parser.add_argument("--out", default="out/bench", help="where bench.json and bench.png go")
    parser.add_argument(
        "--profile",
        default="",
        help="also profile (train: --profile-steps steps; generate: one call per batch size, summed per"
        " new token), traces in this folder",
    )
    parser.add_argument("--profile-steps", type=int, default=5)
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    try:
        args.batch_list = [int(b) for b in args.batch.split(",")]
    except ValueError:
        raise BabyGPTError(f"--batch {args.batch!r}: expected integers separated by commas") from None
    for option, value in (
        ("--seq", args.seq),
        ("--steps", args.steps),
        ("--profile-steps", args.profile_steps),
    ):
        require_positive(option, value)
    for batch in args.batch_list:
        require_positive("--batch", batch)
    if args.mode == "generate" and args.hf_cache == "dynamic":
        args.hf_cache = None  # transformers' default
    if args.child:
        return _child(args)

    known = TRAIN_BACKENDS if args.mode == "train" else GENERATE_BACKENDS
    backends = [b.strip() for b in args.backend.split(",") if b.strip()]
    if not backends:
        raise BabyGPTError(f"--backend {args.backend!r}: name at least one of {', '.join(known)}")
    for b in backends:
        if b not in known:
            raise BabyGPTError(
                f"unknown backend {b!r} for --mode {args.mode}; choose from {', '.join(known)}"
            )
    ModelConfig.preset(args.preset)  # fail early on a bad name
    rows = []
    child_args, skip = [], False
    for a in sys.argv[1:]:  # everything but --backend, which each child gets alone
        if skip or a.startswith("--backend"):
            skip = a == "--backend"
            continue
        child_args.append(a)
    for backend in backends:
        cmd = [sys.executable, "-m", "babygpt_bench.bench", *child_args, f"--backend={backend}", "--child"]
        proc = subprocess.run(
            cmd, capture_output=True, text=True, env={**os.environ, "PYTHONUNBUFFERED": "1"}
        )
        found = [line for line in proc.stdout.splitlines() if line.startswith("BENCH_JSON ")]
        last = (proc.stderr.strip().splitlines() or [""])[-1]
        if proc.returncode == 2 and last.startswith("error: "):  # the child's one line, e.g. memory
            raise BabyGPTError(last.removeprefix("error: "))
        if proc.returncode != 0 or not found:
            tail = (proc.stderr or proc.stdout).strip().splitlines()[-15:]
            print(f"{backend}: failed (exit {proc.returncode})\n  " + "\n  ".join(tail), file=sys.stderr)
            continue
        for row in json.loads(found[-1][len("BENCH_JSON ") :]):
            if backend == "hf":
                row["extra"]["hf_cache"] = args.hf_cache or "dynamic"
            rows.append(row)
    if not rows:
        raise BabyGPTError("no backend produced a result (see the errors above)")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "bench.json").write_text(json.dumps({"command": " ".join(sys.argv), "rows": rows}, indent=2))
    plot(rows, out / "bench.png")
    print(format_table(rows))
    for row in rows:
        if "profile" in row["extra"]:
            print(format_summary(row["backend"], row["extra"]["profile"]))
    print(f"wrote {out / 'bench.json'} and {out / 'bench.png'}")


if __name__ == "__main__":
    run_cli(main)
