"""The fused decode kernels' launch settings, swept: where `babygpt/kernel_blocks.py` came from.

    python -m babygpt_bench.kernel_sweep [--preset gpt2] [--out out/kernel-sweep]

Times the batch-1 matmul kernels of `babygpt_torch/kernels.py` at a preset's shapes (LayerNorm +
matmul for QKV, for FC + GELU and for the head; matmul + residual add for both projections) under
every BLOCK_N x BLOCK_K x warps setting, each as 100 launches in one CUDA graph, beside cuBLAS's
`F.linear` on the same bfloat16 row. Prints the fastest settings per shape and writes
`sweep.json`. Triton only: `babygpt_jax/kernels.py` is lowered to the same Triton and takes the
same settings. Every setting is checked against `F.linear` before it is timed. Without CUDA it
checks two settings on the preset with a 200-token vocabulary in Triton's interpreter and times
nothing (what the tests run).
"""

from __future__ import annotations

import argparse
import itertools
import json
from pathlib import Path

import torch
import torch.nn.functional as F

from babygpt.cli import run_cli
from babygpt.config import ModelConfig

GPU_GRID = list(itertools.product((4, 8, 16, 32), (256, 1024), (2, 4, 8)))  # BLOCK_N, BLOCK_K, warps
CPU_GRID = [(4, 1024, 2), (8, 32, 4)]  # one chunk wider than K; several chunks


def time_us(fn, launches: int = 100, replays: int = 10) -> float:
    """Microseconds per call of fn, recorded `launches` times in one CUDA graph and replayed."""
    fn()  # compile
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for _ in range(launches):
            fn()
    graph.replay()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(replays):
        graph.replay()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) * 1000 / (launches * replays)


def _cases(config: ModelConfig, device: str):
    """(shape, K, N, run, result, reference, cuBLAS) for each matmul of a decode step, batch 1."""
    from babygpt_torch import kernels

    C, V = config.n_embd, config.padded_vocab_size
    gen = torch.Generator(device).manual_seed(0)
    randn = lambda *shape: torch.randn(*shape, generator=gen, device=device)
    for name, K, N, gelu in (("qkv", C, 3 * C, False), ("fc", C, 4 * C, True), ("head", C, V, False)):
        x, ln = randn(1, K), torch.nn.LayerNorm(K, device=device)
        weight, bias = (0.02 * randn(N, K)).bfloat16(), None if name == "head" else 0.02 * randn(N)
        out = torch.zeros(1, N, device=device, dtype=torch.float32 if bias is None else torch.bfloat16)
        with torch.no_grad():
            row = ln(x).bfloat16()
            expected = F.linear(row, weight, None if bias is None else bias.bfloat16()).float()
            expected = F.gelu(expected, approximate="tanh") if gelu else expected
        run = lambda x=x, ln=ln, w=weight, b=bias, out=out, gelu=gelu: kernels.ln_linear(
            x, ln, w, b, out, gelu=gelu
        )
        yield (
            name,
            K,
            N,
            run,
            lambda out=out: out.float(),
            expected,
            lambda row=row, w=weight: F.linear(row, w),
        )
    for name, K, N in (("proj", C, C), ("mlp_proj", 4 * C, C)):
        h, weight, bias, x0 = (
            randn(1, K).bfloat16(),
            (0.02 * randn(N, K)).bfloat16(),
            0.02 * randn(N),
            randn(1, N),
        )
        x = x0.clone()
        expected = x0 + F.linear(h, weight, bias.bfloat16()).float()

        def run(h=h, w=weight, b=bias, x=x, x0=x0):
            x.copy_(x0)  # from the same residual each time: the result is checked after one call
            return kernels.linear_residual(h, w, b, x)

        yield name, K, N, run, lambda x=x: x, expected, lambda h=h, w=weight: F.linear(h, w)


def sweep(config: ModelConfig, grid, cuda: bool) -> list[dict]:
    from babygpt_torch import kernels

    saved = {k: getattr(kernels, k) for k in ("BLOCK_N", "BLOCK_K", "LN_WARPS", "RESIDUAL_WARPS")}
    rows = []
    try:
        for shape, K, N, run, result, expected, cublas in _cases(config, "cuda" if cuda else "cpu"):
            for block_n, block_k, warps in grid:
                if N % block_n:
                    continue
                kernels.BLOCK_N, kernels.BLOCK_K = block_n, block_k
                kernels.LN_WARPS = kernels.RESIDUAL_WARPS = warps
                run()
                error = ((result() - expected).abs().max() / expected.abs().max()).item()
                us = time_us(run) if cuda else None
                rows.append(dict(shape=shape, K=K, N=N, kernel="triton", block_n=block_n, block_k=block_k,
                                 warps=warps, us=us, rel_error=error))  # fmt: skip
            rows.append(dict(shape=shape, K=K, N=N, kernel="cublas", us=time_us(cublas) if cuda else None))
    finally:
        for name, value in saved.items():
            setattr(kernels, name, value)
    return rows


def summary(rows: list[dict], best: int = 3) -> str:
    lines = [f"{'shape':<9} {'K -> N':>13} {'kernel':<24} {'us':>7}"]
    for shape in dict.fromkeys(r["shape"] for r in rows):
        mine = [r for r in rows if r["shape"] == shape and r["us"] is not None]
        for r in sorted(mine, key=lambda r: r["us"])[:best] + [r for r in mine if r["kernel"] == "cublas"]:
            what = (
                "cuBLAS F.linear"
                if r["kernel"] == "cublas"
                else "N {block_n} K {block_k} warps {warps}".format(**r)
            )
            lines.append(f"{shape:<9} {r['K']:>6} -> {r['N']:<5} {what:<24} {r['us']:>7.2f}")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--preset", default="gpt2", help="gpt2, gpt2-medium, gpt2-large, gpt2-xl, small, tiny"
    )
    parser.add_argument("--out", default="out/kernel-sweep", help="where sweep.json goes")
    args = parser.parse_args()
    cuda = torch.cuda.is_available()
    config = ModelConfig.preset(args.preset, **({} if cuda else {"vocab_size": 200}))
    rows = sweep(config, GPU_GRID if cuda else CPU_GRID, cuda)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    device = torch.cuda.get_device_name() if cuda else "cpu (Triton's interpreter: checked, not timed)"
    (out / "sweep.json").write_text(
        json.dumps({"preset": args.preset, "device": device, "rows": rows}, indent=1)
    )
    if cuda:
        print(summary(rows))
    worst = max(r["rel_error"] for r in rows if r["kernel"] == "triton")
    print(
        f"{len(rows)} rows, largest error against F.linear {worst:.1e} of the largest output; wrote {out / 'sweep.json'}"
    )


if __name__ == "__main__":
    run_cli(main)
