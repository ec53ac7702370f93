"""The fused decode kernels' launch settings, swept: where `babygpt/kernel_blocks.py` came from.

    python -m babygpt_bench.kernel_sweep [--preset gpt2] [--attention] [--out out/kernel-sweep]

Times the batch-1 matmul kernels of `babygpt_torch/kernels.py` at a preset's shapes (LayerNorm +
matmul for QKV, for FC + GELU and for the head; matmul + residual add for both projections) under
every BLOCK_N x BLOCK_K x warps setting, each as 100 launches in one CUDA graph, beside cuBLAS's
`F.linear` on the same bfloat16 row. Prints the fastest settings per shape and writes
`sweep.json`. Triton only: `babygpt_jax/kernels.py` is lowered to the same Triton and takes the
same settings. Every setting is checked against `F.linear` before it is timed. Without CUDA it
checks two settings on the preset with a 200-token vocabulary in Triton's interpreter and times
nothing (what the tests run).

`--attention` sweeps the batch attention kernel instead (`_decode_attention_rows_kernel`, one
program per (row, head), used from BATCH_FROM rows) over ROWS_BLOCK_S x warps x ROWS_STAGES (blocks
whose loads are in flight at once) at batch 32 and a 384-slot cache (prompt 128 + 256 new tokens),
at three positions, beside SDPA as `model.decode`
calls it and the split kernels with their combine; writes `sweep-attention.json`. These times
are lower than inside a decode step (12.7 against 19.1 us a layer on an H200, blocks of 64),
likely because alone the cache (38 MB at GPT-2 124M) fits mostly in the 50 MB L2: the settings in
`kernel_blocks.py` are the ones the whole decode measured fastest, per backend.
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
ROWS_GPU_GRID = list(itertools.product((32, 64, 128, 256), (2, 4, 8), (1, 2, 3)))  # block, warps, stages
ROWS_CPU_GRID = [(64, 4, 2), (128, 4, 1)]


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


def _rel_error(actual: torch.Tensor, expected: torch.Tensor) -> float:
    """The largest |actual - expected| as a fraction of the largest |expected|."""
    return ((actual.float() - expected).abs().max() / expected.abs().max()).item()


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
                error = _rel_error(result(), expected)
                us = time_us(run) if cuda else None
                rows.append(dict(shape=shape, K=K, N=N, kernel="triton", block_n=block_n, block_k=block_k,
                                 warps=warps, us=us, rel_error=error))  # fmt: skip
            rows.append(dict(shape=shape, K=K, N=N, kernel="cublas", us=time_us(cublas) if cuda else None))
    finally:
        for name, value in saved.items():
            setattr(kernels, name, value)
    return rows


def attention_sweep(config: ModelConfig, grid, cuda: bool, batch: int, cache_len: int) -> list[dict]:
    """The batch attention kernel under each (ROWS_BLOCK_S, warps, stages), SDPA and the split kernels,
    at three positions; every result checked against SDPA in float32 first."""
    from babygpt_torch import kernels

    device = "cuda" if cuda else "cpu"
    nh, hs, C = config.n_head, config.head_dim, config.n_embd
    gen = torch.Generator(device).manual_seed(0)
    randn = lambda *shape: torch.randn(*shape, generator=gen, device=device).bfloat16()
    qkv, k_cache, v_cache = (
        randn(batch, 3 * C),
        randn(batch, nh, cache_len, hs),
        randn(batch, nh, cache_len, hs),
    )
    y = torch.zeros(batch, C, dtype=torch.bfloat16, device=device)
    NB = kernels.attention_blocks(cache_len)
    part = torch.zeros(3, NB, batch, C, device=device)
    q = qkv[:, :C].reshape(batch, nh, 1, hs)

    def at(pos: int) -> list[dict]:
        p = torch.tensor([pos], device=device)
        k_cache[:, :, pos], v_cache[:, :, pos] = (
            qkv[:, C : 2 * C].view(batch, nh, hs),
            qkv[:, 2 * C :].view(batch, nh, hs),
        )
        mask = (torch.arange(cache_len, device=device) <= pos)[None, :]
        expected = F.scaled_dot_product_attention(q.float(), k_cache.float(), v_cache.float(), attn_mask=mask)
        expected = expected.reshape(batch, C)
        rows = []

        def add(kernel, run, result, **setting):
            run()
            error = _rel_error(result(), expected)
            us = time_us(run) if cuda else None
            rows.append(dict(shape="attention", batch=batch, cache=cache_len, pos=pos, kernel=kernel, **setting,
                             us=us, rel_error=error))  # fmt: skip

        sdpa = lambda: F.scaled_dot_product_attention(q, k_cache, v_cache, attn_mask=mask)  # as model.decode
        add("sdpa", sdpa, lambda: sdpa().reshape(batch, C))

        def split():  # the kernels' last argument, PDL, 0: plain launches, each timed alone
            kernels._decode_attention_kernel[(batch, nh, NB)](
                qkv, k_cache, v_cache, p, part, hs**-0.5, batch, C, cache_len, hs, kernels.BLOCK_S, NB, 0
            )
            kernels._combine_kernel[(batch, nh)](part, p, y, batch, C, hs, kernels.BLOCK_S, NB, 0)

        add("split", split, lambda: y, block_s=kernels.BLOCK_S)
        for block_s, warps, stages in grid:
            run = lambda s=block_s, w=warps, n=stages: kernels._decode_attention_rows_kernel[(batch, nh)](
                qkv, k_cache, v_cache, p, y, hs**-0.5, C, cache_len, hs, s, n, 0, num_warps=w
            )
            add("rows", run, lambda: y, block_s=block_s, warps=warps, stages=stages)
        return rows

    return [row for pos in (cache_len // 3, 2 * cache_len // 3 - 1, cache_len - 1) for row in at(pos)]


def attention_summary(rows: list[dict]) -> str:
    positions = list(dict.fromkeys(r["pos"] for r in rows))
    lines = [
        f"{'kernel':<37}"
        + "".join(f"{'pos ' + str(p):>10}" for p in positions)
        + f"{'mean':>10}  (us a call)"
    ]
    key = lambda r: (r["kernel"], r.get("block_s"), r.get("warps"), r.get("stages"))
    for setting in dict.fromkeys(key(r) for r in rows):
        us = [r["us"] for r in rows if key(r) == setting]
        kernel, block_s, warps, stages = setting
        name = (
            kernel
            + ("" if block_s is None else f" slots {block_s}")
            + ("" if warps is None else f" warps {warps}")
            + ("" if stages is None else f" stages {stages}")
        )
        lines.append(f"{name:<37}" + "".join(f"{u:>10.2f}" for u in us) + f"{sum(us) / len(us):>10.2f}")
    return "\n".join(lines)


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
    parser.add_argument(
        "--attention", action="store_true", help="sweep the batch attention kernel instead of the matmuls"
    )
    parser.add_argument(
        "--out", default="out/kernel-sweep", help="where sweep.json (or sweep-attention.json) goes"
    )
    args = parser.parse_args()
    cuda = torch.cuda.is_available()
    config = ModelConfig.preset(args.preset, **({} if cuda else {"vocab_size": 200}))
    if args.attention:
        from babygpt.kernel_blocks import BATCH_FROM

        batch, cache_len = (32, 384) if cuda else (BATCH_FROM, 192)
        rows = attention_sweep(config, ROWS_GPU_GRID if cuda else ROWS_CPU_GRID, cuda, batch, cache_len)
        name, report, reference = "sweep-attention.json", attention_summary, "SDPA"
    else:
        rows = sweep(config, GPU_GRID if cuda else CPU_GRID, cuda)
        name, report, reference = "sweep.json", summary, "F.linear"
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    device = torch.cuda.get_device_name() if cuda else "cpu (Triton's interpreter: checked, not timed)"
    (out / name).write_text(json.dumps({"preset": args.preset, "device": device, "rows": rows}, indent=1))
    if cuda:
        print(report(rows))
    worst = max(r["rel_error"] for r in rows if "rel_error" in r)  # cuBLAS rows are the reference
    print(
        f"{len(rows)} rows, largest error against {reference} {worst:.1e} of the largest output; wrote {out / name}"
    )


if __name__ == "__main__":
    run_cli(main)
