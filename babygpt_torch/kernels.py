"""Fused decode kernels in Triton: one token per row through a GPT-2 layer in 6 kernels, not ~12.

Decoding a token at batch 1 to 32 is latency-bound: each of the ~150 kernels `model.decode` runs
per token (split across LayerNorm, GEMV, bias, GELU, residual add, cache write, attention, mask)
takes ~3 us whatever it reads (docs/performance.md). Here a layer is six kernels:

    ln_linear        LayerNorm, then the QKV matmul and its bias          (B, C) -> (B, 3C)
    decode_attention the new key and value into the cache; each block of cache slots' share
                     of attention (flash-decoding), then the shares combined  (B, 3C) -> (B, C)
    linear_residual  the output projection and its bias, into the residual stream
    ln_linear        LayerNorm, then the MLP's first matmul, bias and GELU (B, C) -> (B, 4C)
    linear_residual  the MLP's second matmul and bias, into the residual stream

plus `embed` before the layers, `ln_linear` with the tied table as the head and, greedy, `greedy`
after it (the argmax and the token's write, 2 kernels for torch's 6). Each matmul is a matrix
times one vector per row, computed as dot products on CUDA cores, BLOCK_N columns a
program (`babygpt/kernel_blocks.py` says why and how fast). Each kernel computes the same
expression as the module it replaces under bfloat16 autocast: LayerNorm and the residual stream
in float32, bfloat16 matmul inputs and outputs, float32 sums (tested against those expressions in
tests/test_kernels.py). The mirror of `babygpt_jax/kernels.py` (Pallas): the same kernels, the
same blocks. Not a lesson file: `babygpt_torch/generate.py` uses `FusedDecoder` for a lone prompt
on a GPU (3,671 against 1,917 new tokens/s on an H200: docs/performance.md).

A GEMV reads each weight once per row, so from BATCH_FROM to ROWS_UP_TO rows `FusedDecoder`
takes each matmul as a GEMM on tensor-core tiles of 32 rows (`rows_linear`: the bias, GELU or
residual add in its epilogue, K split over programs for the last one), after a LayerNorm kernel
of its own (`layer_norm_rows`), around `_decode_attention_rows_kernel` (one program per (row,
head), no combine). Past ROWS_UP_TO, `batch_decode`: the model's own modules (cuBLAS GEMMs,
compiled by torch.compile) around the same attention kernel. JAX has no mirror of the GEMMs: XLA
makes split-K Triton GEMMs, launched dependently, from the plain modules by itself. Between 1 and
BATCH_FROM rows,
`model.decode`.

Every kernel `FusedDecoder` launches waits for the one before it and then lets the next one be
scheduled (`_after_previous`: programmatic dependent launch, Hopper on), so the ~90 kernels a
token overlap their launches instead of leaving the GPU idle between them. On an H200 (GPT-2
124M, prompt 128, 256 new tokens): 3,364 -> 3,861 new tokens/s for one row; at 32 rows, today's
kernels 61,507 against 53,839 for the compiled modules (docs/benchmarks.md, 2026-12-03).

And one thing for training: the loss's two passes over the (B·T, V) logits, `cross_entropy`, which
`model.training_loss` takes on a GPU in place of the written-out expression (the lesson, and the
reference the tests hold these to). `_logsumexp_kernel` reads each row once with a running
maximum; `_cross_entropy_grad_kernel` reads it once more and writes (softmax - one_hot) * g / N.
torch.compile's kernels for the expression took 4.6 ms at 124M, B=32, these 3.0
(docs/performance.md).

Without CUDA the kernels run in Triton's interpreter (TRITON_INTERPRET=1), which is how the tests
check them on a CPU. The interpreter rounds to bfloat16 by truncating where a GPU rounds to
nearest: the tests check the indexing, masking and arithmetic to a few bfloat16 steps, the GPU run
checks the compiled kernels.
"""

from __future__ import annotations

import os
import weakref

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")  # read when triton.jit wraps a kernel
INTERPRETED = os.environ.get("TRITON_INTERPRET") == "1"
import triton  # noqa: E402
import triton.language as tl  # noqa: E402

from babygpt.kernel_blocks import (  # noqa: E402
    BATCH_FROM,
    BLOCK_K,
    BLOCK_N,
    BLOCK_S,
    LN_WARPS,
    LOSS_BLOCK_V,
    LOSS_WARPS,
    RESIDUAL_WARPS,
    ROWS_BLOCK_S,
    ROWS_STAGES,
    ROWS_WARPS,
)
from babygpt_torch.model import GPT  # noqa: E402


@triton.jit
def _gelu_tanh(x):
    inner = 0.7978845608028654 * (x + 0.044715 * x * x * x)  # sqrt(2 / pi)
    return 0.5 * x * (1.0 + (2.0 * tl.sigmoid(2.0 * inner) - 1.0))  # tanh(u) = 2 sigmoid(2u) - 1


@triton.jit
def _after_previous(PDL: tl.constexpr):
    """Programmatic dependent launch (Hopper on): a kernel launched with `launch_pdl` is scheduled
    while the one before it still runs, and waits here until that one's writes are visible (1),
    then (2) lets the next kernel be scheduled in turn. Everything a kernel reads or writes comes
    after this, so kernels still run one after another; what overlaps is the launch."""
    if PDL >= 1:
        tl.extra.cuda.gdc_wait()
    if PDL >= 2:
        tl.extra.cuda.gdc_launch_dependents()


@triton.jit
def _ln_linear_kernel(
    x_ptr, g_ptr, b_ptr, w_ptr, bias_ptr, out_ptr, eps, rows,
    K: tl.constexpr, N: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr,
    HAS_BIAS: tl.constexpr, GELU: tl.constexpr, VALID_N: tl.constexpr,
    PDL: tl.constexpr,
):  # fmt: skip
    """out[:, n-block] = act(LayerNorm(x) @ w[n-block].T + bias): one program per BN output columns."""
    _after_previous(PDL)
    cols = tl.program_id(0) * BN + tl.arange(0, BN)
    for row in range(rows):  # one row at batch 1; a few rows re-read w from the cache
        x_row = x_ptr + row * K
        # LayerNorm statistics, recomputed by each program (a row is a few KB), in one pass.
        total, squares = tl.zeros((), tl.float32), tl.zeros((), tl.float32)
        for k0 in tl.static_range(0, K, BK):
            ks = k0 + tl.arange(0, BK)
            x = tl.load(x_row + ks, mask=ks < K, other=0.0)
            total += tl.sum(x, axis=0)
            squares += tl.sum(x * x, axis=0)
        mean = total / K
        rstd = 1.0 / tl.sqrt(squares / K - mean * mean + eps)
        acc = tl.zeros((BN,), tl.float32)
        for k0 in tl.static_range(0, K, BK):  # unrolled: every chunk's load in flight at once
            ks = k0 + tl.arange(0, BK)
            inside = ks < K  # the last chunk may pass K
            w = tl.load(w_ptr + cols[:, None] * K + ks[None, :], mask=inside[None, :], other=0.0)  # (BN, BK)
            x = tl.load(x_row + ks, mask=inside, other=0.0)
            g, b = tl.load(g_ptr + ks, mask=inside, other=0.0), tl.load(b_ptr + ks, mask=inside, other=0.0)
            x = ((x - mean) * rstd * g + b).to(tl.bfloat16).to(tl.float32)  # 0 past K, where g and b are
            acc += tl.sum(w.to(tl.float32) * x[None, :], axis=1)  # bfloat16 products, float32 sums
        if HAS_BIAS:  # autocast adds the bias in bfloat16
            acc += tl.load(bias_ptr + cols).to(tl.bfloat16).to(tl.float32)
        out = acc.to(tl.bfloat16).to(tl.float32)  # autocast's bfloat16 matmul output
        if GELU:
            out = _gelu_tanh(out).to(tl.bfloat16).to(tl.float32)
        if VALID_N < N:  # the head: padded vocabulary entries get no probability
            out = tl.where(cols < VALID_N, out, float("-inf"))
        tl.store(out_ptr + row * N + cols, out.to(out_ptr.dtype.element_ty))


@triton.jit
def _linear_residual_kernel(
    h_ptr, w_ptr, bias_ptr, x_ptr, rows,
    K: tl.constexpr, N: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr, PDL: tl.constexpr,
):  # fmt: skip
    """x[:, n-block] += h @ w[n-block].T + bias, in place: each program reads and writes only its columns."""
    _after_previous(PDL)
    cols = tl.program_id(0) * BN + tl.arange(0, BN)
    for row in range(rows):
        acc = tl.zeros((BN,), tl.float32)
        for k0 in tl.static_range(0, K, BK):
            ks = k0 + tl.arange(0, BK)
            inside = ks < K
            w = tl.load(w_ptr + cols[:, None] * K + ks[None, :], mask=inside[None, :], other=0.0)
            h = tl.load(h_ptr + row * K + ks, mask=inside, other=0.0)
            acc += tl.sum(w.to(tl.float32) * h.to(tl.float32)[None, :], axis=1)
        acc += tl.load(bias_ptr + cols).to(tl.bfloat16).to(tl.float32)
        x = x_ptr + row * N + cols
        tl.store(x, tl.load(x) + acc.to(tl.bfloat16).to(tl.float32))


@triton.jit
def _decode_attention_kernel(
    qkv_ptr, k_cache_ptr, v_cache_ptr, pos_ptr, part_ptr, scale, B,
    C: tl.constexpr, S: tl.constexpr, HS: tl.constexpr, BS: tl.constexpr, NB: tl.constexpr, PDL: tl.constexpr,
):  # fmt: skip
    """One (row, head, block of BS cache slots): this block's share of attention for the new token.

    The block holding pos first writes the new key and value into the (B, nh, S, hs) cache, and
    reads slot pos from registers, not from the cache just written. Each block stores its largest
    score, its softmax normaliser and its weighted sum of values (flash-decoding: the slots of one
    head are split across programs, so a batch of one still fills the GPU); `_combine_kernel`
    merges them. A block wholly past pos stores (-inf, 0, 0).
    """
    _after_previous(PDL)
    row, head, block = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    d = tl.arange(0, HS)
    pos = tl.load(pos_ptr)
    base = qkv_ptr + row * 3 * C + head * HS + d
    q = tl.load(base).to(tl.float32)
    k_new, v_new = tl.load(base + C), tl.load(base + 2 * C)
    cache = (row * (C // HS) + head) * S * HS  # this (row, head)'s first slot
    owner = d * 0 + block == pos // BS  # (hs,): whether this block holds pos
    tl.store(k_cache_ptr + cache + pos * HS + d, k_new, mask=owner)
    tl.store(v_cache_ptr + cache + pos * HS + d, v_new, mask=owner)
    slots = block * BS + tl.arange(0, BS)
    offsets = cache + slots[:, None] * HS + d[None, :]  # (BS, hs)
    seen = slots[:, None] < pos
    k = tl.where(seen, tl.load(k_cache_ptr + offsets, mask=seen, other=0.0), k_new[None, :])
    v = tl.where(seen, tl.load(v_cache_ptr + offsets, mask=seen, other=0.0), v_new[None, :])
    scores = tl.sum(q[None, :] * k.to(tl.float32), axis=1) * scale  # (BS,)
    scores = tl.where(slots <= pos, scores, float("-inf"))
    m = tl.max(scores, axis=0)
    p = tl.exp(scores - tl.where(m > float("-inf"), m, 0.0))  # all 0 in a block past pos
    out = part_ptr + (block * B + row) * C + head * HS + d  # part is (3, NB, B, C): max, normaliser, sum
    tl.store(out, tl.zeros((HS,), tl.float32) + m)
    tl.store(out + NB * B * C, tl.zeros((HS,), tl.float32) + tl.sum(p, axis=0))
    tl.store(out + 2 * NB * B * C, tl.sum(p[:, None] * v.to(tl.float32), axis=0))


@triton.jit
def _decode_attention_rows_kernel(
    qkv_ptr, k_cache_ptr, v_cache_ptr, pos_ptr, y_ptr,
    SCALE: tl.constexpr, C: tl.constexpr, S: tl.constexpr, HS: tl.constexpr, BS: tl.constexpr,
    STAGES: tl.constexpr, PDL: tl.constexpr,
):  # fmt: skip
    """One (row, head) of a batch: the new key and value into the cache, then attention over slots
    0..pos in blocks of BS, with a running maximum and normaliser (online softmax), the loads of
    STAGES blocks in flight. A batch has B x nh programs already, so a head's slots are not split
    and nothing is left to combine."""
    _after_previous(PDL)
    row, head = tl.program_id(0), tl.program_id(1)
    d = tl.arange(0, HS)
    pos = tl.load(pos_ptr)
    base = qkv_ptr + row * 3 * C + head * HS + d
    q = tl.load(base).to(tl.float32)
    k_new, v_new = tl.load(base + C), tl.load(base + 2 * C)
    cache = (row * (C // HS) + head) * S * HS
    tl.store(k_cache_ptr + cache + pos * HS + d, k_new)
    tl.store(v_cache_ptr + cache + pos * HS + d, v_new)
    m = tl.full((), float("-inf"), tl.float32)  # the largest score so far
    norm, acc = tl.zeros((), tl.float32), tl.zeros((HS,), tl.float32)  # softmax normaliser, weighted sum
    for block in tl.range(0, pos // BS + 1, num_stages=STAGES):
        slots = block * BS + tl.arange(0, BS)
        offsets = cache + slots[:, None] * HS + d[None, :]  # (BS, hs)
        seen = slots[:, None] < pos  # slot pos from registers, not from the cache just written
        k = tl.where(seen, tl.load(k_cache_ptr + offsets, mask=seen, other=0.0), k_new[None, :])
        v = tl.where(seen, tl.load(v_cache_ptr + offsets, mask=seen, other=0.0), v_new[None, :])
        # SCALE a constant: under torch.compile a float argument arrives as float64
        scores = tl.sum(q[None, :] * k.to(tl.float32), axis=1) * SCALE  # (BS,)
        scores = tl.where(slots <= pos, scores, float("-inf"))
        m_new = tl.maximum(m, tl.max(scores, axis=0))  # finite: block 0 holds slot 0
        p, old = tl.exp(scores - m_new), tl.exp(m - m_new)
        norm = norm * old + tl.sum(p, axis=0)
        acc = acc * old + tl.sum(p[:, None] * v.to(tl.float32), axis=0)
        m = m_new
    tl.store(y_ptr + row * C + head * HS + d, (acc / norm).to(y_ptr.dtype.element_ty))


@triton.jit
def _combine_kernel(
    part_ptr, pos_ptr, y_ptr, B,
    C: tl.constexpr, HS: tl.constexpr, BS: tl.constexpr, NB: tl.constexpr, PDL: tl.constexpr,
):  # fmt: skip
    """One (row, head): the blocks' shares merged into softmax(scores) @ values, as bfloat16."""
    _after_previous(PDL)
    row, head = tl.program_id(0), tl.program_id(1)
    d = tl.arange(0, HS)
    at = part_ptr + row * C + head * HS + d  # block 0, which always holds slot 0
    m, norm, acc = tl.load(at), tl.load(at + NB * B * C), tl.load(at + 2 * NB * B * C)
    for block in range(1, tl.load(pos_ptr) // BS + 1):  # the blocks up to pos
        at = part_ptr + (block * B + row) * C + head * HS + d
        m_b, norm_b, acc_b = tl.load(at), tl.load(at + NB * B * C), tl.load(at + 2 * NB * B * C)
        m_new = tl.maximum(m, m_b)
        old, new = tl.exp(m - m_new), tl.exp(m_b - m_new)
        norm, acc, m = norm * old + norm_b * new, acc * old + acc_b * new, m_new
    tl.store(y_ptr + row * C + head * HS + d, (acc / norm).to(tl.bfloat16))


@triton.jit
def _embed_kernel(
    tokens_ptr, pos_ptr, wte_ptr, wpe_ptr, x_ptr, stride, C: tl.constexpr, BK: tl.constexpr, PDL: tl.constexpr
):
    """x[row] = wte[tokens[row, pos]] + wpe[pos]."""
    _after_previous(PDL)
    row = tl.program_id(0)
    pos = tl.load(pos_ptr)
    token = tl.load(tokens_ptr + row * stride + pos)
    for k0 in tl.static_range(0, C, BK):
        d = k0 + tl.arange(0, BK)
        inside = d < C
        wte, wpe = tl.load(wte_ptr + token * C + d, mask=inside), tl.load(wpe_ptr + pos * C + d, mask=inside)
        tl.store(x_ptr + row * C + d, wte + wpe, mask=inside)


@triton.jit
def _argmax_blocks_kernel(
    logits_ptr, best_ptr, at_ptr, V: tl.constexpr, BV: tl.constexpr, NBV: tl.constexpr, PDL: tl.constexpr
):
    """One (row, block of BV logits): the block's largest logit and where it is (the first, if tied)."""
    _after_previous(PDL)
    row, block = tl.program_id(0), tl.program_id(1)
    v = block * BV + tl.arange(0, BV)
    values = tl.load(logits_ptr + row * V + v, mask=v < V, other=float("-inf"))
    tl.store(best_ptr + row * NBV + block, tl.max(values, axis=0))
    tl.store(at_ptr + row * NBV + block, block * BV + tl.argmax(values, axis=0, tie_break_left=True))


@triton.jit
def _greedy_kernel(
    best_ptr, at_ptr, tokens_ptr, lengths_ptr, pos_ptr, stride,
    NBV: tl.constexpr, BB: tl.constexpr, PDL: tl.constexpr,
):  # fmt: skip
    """tokens[row, pos + 1] = the row's prompt token while inside its prompt, else its argmax: the
    first block holding the largest logit, that block's first (as torch.argmax and jnp.argmax)."""
    _after_previous(PDL)
    row = tl.program_id(0)
    b = tl.arange(0, BB)
    best = tl.load(best_ptr + row * NBV + b, mask=b < NBV, other=float("-inf"))
    token = tl.load(at_ptr + row * NBV + tl.argmax(best, axis=0, tie_break_left=True))
    at = tokens_ptr + row * stride + tl.load(pos_ptr) + 1
    inside = tl.load(pos_ptr) + 1 < tl.load(lengths_ptr + row)
    tl.store(at, tl.where(inside, tl.load(at), token.to(tl.int64)))


@triton.jit
def _layer_norm_rows_kernel(
    x_ptr, g_ptr, b_ptr, out_ptr, eps, C: tl.constexpr, BC: tl.constexpr, PDL: tl.constexpr
):
    """out[row] = LayerNorm(x[row]) in bfloat16, the input of a GEMM: one program per row."""
    _after_previous(PDL)
    row = tl.program_id(0)
    d = tl.arange(0, BC)
    inside = d < C
    x = tl.load(x_ptr + row * C + d, mask=inside, other=0.0).to(tl.float32)
    mean = tl.sum(x, axis=0) / C
    centred = tl.where(inside, x - mean, 0.0)
    rstd = 1.0 / tl.sqrt(tl.sum(centred * centred, axis=0) / C + eps)
    g, b = tl.load(g_ptr + d, mask=inside, other=0.0), tl.load(b_ptr + d, mask=inside, other=0.0)
    tl.store(out_ptr + row * C + d, (centred * rstd * g + b).to(tl.bfloat16), mask=inside)


@triton.jit
def _rows_epilogue(acc, bias_ptr, out_ptr, rm, rn, M, N: tl.constexpr, HAS_BIAS: tl.constexpr,
                   GELU: tl.constexpr, RESIDUAL: tl.constexpr, VALID_N: tl.constexpr):  # fmt: skip
    """What autocast's F.linear and the module around it do to a float32 tile of a @ w.T: the
    bias (bfloat16) added before the one rounding to bfloat16, then GELU, or the residual add into
    a float32 stream, or the vocabulary's padding set to -inf."""
    if HAS_BIAS:
        acc += tl.load(bias_ptr + rn).to(tl.bfloat16).to(tl.float32)[None, :]
    out = acc.to(tl.bfloat16).to(tl.float32)
    if GELU:
        out = _gelu_tanh(out).to(tl.bfloat16).to(tl.float32)
    at, rows = rm[:, None] * N + rn[None, :], rm[:, None] < M
    if RESIDUAL:
        out += tl.load(out_ptr + at, mask=rows, other=0.0)
    if VALID_N < N:
        out = tl.where(rn[None, :] < VALID_N, out, float("-inf"))
    tl.store(out_ptr + at, out.to(out_ptr.dtype.element_ty), mask=rows)


@triton.jit
def _rows_linear_kernel(
    a_ptr, w_ptr, bias_ptr, out_ptr, part_ptr, count_ptr, M,
    K: tl.constexpr, N: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr,
    SPLIT: tl.constexpr, STAGES: tl.constexpr, HAS_BIAS: tl.constexpr, GELU: tl.constexpr,
    RESIDUAL: tl.constexpr, VALID_N: tl.constexpr, FLOAT_DOT: tl.constexpr, PDL: tl.constexpr,
):  # fmt: skip
    """A (BM rows, BN columns) tile of epilogue(a @ w.T) on tensor cores, over K / SPLIT of K.

    a (M, K) bfloat16, w (N, K) bfloat16. With SPLIT > 1 each of a tile's SPLIT programs stores
    its float32 partial sum, and the last to finish (a counter per tile) adds them up in order of
    K, so the result does not depend on which finished first, then runs the epilogue and resets
    the counter for the next call."""
    _after_previous(PDL)
    pid_n, pid_m, pid_k = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    rm = pid_m * BM + tl.arange(0, BM)
    rn = pid_n * BN + tl.arange(0, BN)
    rk = tl.arange(0, BK)
    k0 = pid_k * (K // SPLIT)
    acc = tl.zeros((BM, BN), tl.float32)
    for k in tl.range(k0, k0 + K // SPLIT, BK, num_stages=STAGES):
        a = tl.load(a_ptr + rm[:, None] * K + (k + rk)[None, :], mask=rm[:, None] < M, other=0.0)  # (BM, BK)
        w = tl.load(w_ptr + rn[None, :] * K + (k + rk)[:, None])  # (BK, BN)
        if FLOAT_DOT:  # Triton's interpreter multiplies bfloat16 tiles wrongly; float32 is exact here
            a, w = a.to(tl.float32), w.to(tl.float32)
        acc = tl.dot(a, w, acc)
    if SPLIT == 1:
        _rows_epilogue(acc, bias_ptr, out_ptr, rm, rn, M, N, HAS_BIAS, GELU, RESIDUAL, VALID_N)
    else:
        tile = pid_m * (N // BN) + pid_n
        part = (
            part_ptr + (tile * SPLIT) * BM * BN + tl.arange(0, BM)[:, None] * BN + tl.arange(0, BN)[None, :]
        )
        tl.store(part + pid_k * BM * BN, acc)
        if tl.atomic_add(count_ptr + tile, 1, sem="acq_rel") == SPLIT - 1:  # the last of the tile's programs
            total = tl.zeros((BM, BN), tl.float32)
            for s in range(SPLIT):
                total += tl.load(part + s * BM * BN, cache_modifier=".cg")  # from the L2, not a stale L1
            _rows_epilogue(total, bias_ptr, out_ptr, rm, rn, M, N, HAS_BIAS, GELU, RESIDUAL, VALID_N)
            tl.store(count_ptr + tile, 0)


@triton.jit
def _logsumexp_kernel(logits_ptr, logz_ptr, stride, VOCAB: tl.constexpr, BV: tl.constexpr):
    """logz[row] = log(sum(exp(logits[row, :VOCAB]))) in one read of the row: a running maximum
    and a sum rescaled whenever it grows (online softmax). The padding is never read."""
    row = tl.program_id(0)
    at = logits_ptr + row.to(tl.int64) * stride
    m = tl.full((), float("-inf"), tl.float32)
    total = tl.zeros((), tl.float32)
    for start in range(0, VOCAB, BV):
        v = start + tl.arange(0, BV)
        x = tl.load(at + v, mask=v < VOCAB, other=float("-inf")).to(tl.float32)
        m_new = tl.maximum(m, tl.max(x, axis=0))
        total = total * tl.exp(m - m_new) + tl.sum(tl.exp(x - m_new), axis=0)
        m = m_new
    tl.store(logz_ptr + row, m + tl.log(total))


@triton.jit
def _cross_entropy_grad_kernel(
    logits_ptr, targets_ptr, logz_ptr, scale_ptr, grad_ptr, stride, VOCAB: tl.constexpr, V: tl.constexpr,
    BV: tl.constexpr,
):  # fmt: skip
    """grad[row] = (softmax(logits[row]) - one_hot(target)) * scale over all V entries, 0 on the
    padding: one read of the row and one write."""
    row = tl.program_id(0)
    logz, target, scale = tl.load(logz_ptr + row), tl.load(targets_ptr + row), tl.load(scale_ptr)
    at = row.to(tl.int64) * stride
    for start in range(0, V, BV):
        v = start + tl.arange(0, BV)
        x = tl.load(logits_ptr + at + v, mask=v < VOCAB, other=float("-inf")).to(tl.float32)
        g = (tl.exp(x - logz) - (v == target).to(tl.float32)) * scale
        tl.store(grad_ptr + at + v, g.to(grad_ptr.dtype.element_ty), mask=v < V)


class _CrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, rows, targets, vocab_size, block_v, num_warps):  # (N, V), (N,)
        logz = torch.empty(rows.size(0), dtype=torch.float32, device=rows.device)
        _logsumexp_kernel[(rows.size(0),)](
            rows, logz, rows.stride(0), vocab_size, block_v, num_warps=num_warps
        )
        target_logit = rows.gather(1, targets[:, None])[:, 0].float()
        ctx.save_for_backward(rows, targets, logz)
        ctx.launch = vocab_size, block_v, num_warps
        return (logz - target_logit).mean()

    @staticmethod
    def backward(ctx, g):
        rows, targets, logz = ctx.saved_tensors
        vocab_size, block_v, num_warps = ctx.launch
        scale = (g / targets.numel()).float()  # on the device: no wait for the host
        grad = torch.empty_like(rows)
        _cross_entropy_grad_kernel[(rows.size(0),)](
            rows, targets, logz, scale, grad, rows.stride(0), vocab_size, rows.size(1), block_v,
            num_warps=num_warps,
        )  # fmt: skip
        return grad, None, None, None, None


def cross_entropy(
    logits, targets, vocab_size: int, block_v=LOSS_BLOCK_V["torch"], num_warps=LOSS_WARPS
) -> torch.Tensor:
    """`model.cross_entropy` in two kernels, one a pass over the logits: the forward's logsumexp
    and the backward's gradient, each reading the (N, V) logits once, where torch.compile's kernels
    for the written-out expression take about twice as long (docs/performance.md). Float32 logz
    and loss; the gradient in the logits' dtype."""
    rows = logits.reshape(-1, logits.size(-1)).contiguous()  # (N, V)
    return _CrossEntropy.apply(rows, targets.reshape(-1).contiguous(), vocab_size, block_v, num_warps)


# Programmatic dependent launch for `FusedDecoder`'s kernels: 0 off, 1 wait only, 2 wait and
# trigger (`_after_previous`). Hopper (sm_90) and later.
PDL = 2 if torch.cuda.is_available() and torch.cuda.get_device_capability()[0] >= 9 else 0


def _launch(pdl: int) -> dict:
    """Triton's launch option for `_after_previous`; none at all where it is off, as under
    torch.compile, which launches the kernels it calls itself and knows no such option."""
    return {"launch_pdl": True} if pdl else {}


def ln_linear(x, ln, weight, bias, out, *, gelu=False, valid_n=None, pdl=0) -> torch.Tensor:
    """out = act(LayerNorm(x) @ weight.T + bias): x (B, K) float32, weight (N, K) bfloat16, out (B, N)."""
    (B, K), N = x.shape, weight.shape[0]
    _ln_linear_kernel[(N // BLOCK_N,)](
        x, ln.weight, ln.bias, weight, weight if bias is None else bias, out, ln.eps, B,
        K, N, BLOCK_N, BLOCK_K, bias is not None, gelu, N if valid_n is None else valid_n, pdl,
        num_warps=LN_WARPS, **_launch(pdl),
    )  # fmt: skip
    return out


def linear_residual(h, weight, bias, x, pdl=0) -> torch.Tensor:
    """x += h @ weight.T + bias, in place: h (B, K) bfloat16, weight (N, K), x (B, N) float32."""
    (B, K), N = h.shape, weight.shape[0]
    _linear_residual_kernel[(N // BLOCK_N,)](
        h, weight, bias, x, B, K, N, BLOCK_N, BLOCK_K, pdl, num_warps=RESIDUAL_WARPS, **_launch(pdl)
    )
    return x


def attention_blocks(cache_len: int) -> int:
    return triton.cdiv(cache_len, BLOCK_S)


def decode_attention(qkv, k_cache, v_cache, pos, y, part=None, pdl=0) -> torch.Tensor:
    """y (B, C) from qkv (B, 3C) and the (B, nh, S, hs) cache, which gains this position's keys
    and values. Below BATCH_FROM rows each head's slots are split across programs, and part is
    (3, attention_blocks(S), B, C) float32 scratch for their shares; from it, unused."""
    B, n_head, S, hs = k_cache.shape
    C = n_head * hs
    if B >= BATCH_FROM:
        rows_block = ROWS_BLOCK_S["torch"]
        _decode_attention_rows_kernel[(B, n_head)](
            qkv, k_cache, v_cache, pos, y, hs**-0.5, C, S, hs, rows_block, ROWS_STAGES, pdl,
            num_warps=ROWS_WARPS, **_launch(pdl),
        )  # fmt: skip
        return y
    NB = part.shape[1]
    _decode_attention_kernel[(B, n_head, NB)](
        qkv, k_cache, v_cache, pos, part, hs**-0.5, B, C, S, hs, BLOCK_S, NB, pdl, **_launch(pdl)
    )
    _combine_kernel[(B, n_head)](part, pos, y, B, C, hs, BLOCK_S, NB, pdl, **_launch(pdl))
    return y


def embed(tokens, pos, wte, wpe, x, pdl=0) -> torch.Tensor:
    """x (B, C) float32: every row's token at pos (tokens is (B, S + 1)) embedded, plus pos's embedding."""
    _embed_kernel[(x.shape[0],)](
        tokens, pos, wte, wpe, x, tokens.stride(0), x.shape[1], BLOCK_K, pdl, **_launch(pdl)
    )
    return x


def greedy(logits, tokens, lengths, pos, pdl=0) -> torch.Tensor:
    """Write every row's token at pos + 1 (tokens is (B, S + 1)): its prompt's while inside it,
    else the argmax of its logits (B, V). Two kernels for what is 6 in torch (the argmax, one block
    of the GPU for 50k logits, then the prompt-or-choice write); XLA fuses JAX's on its own."""
    B, V = logits.shape
    NBV = triton.cdiv(V, BLOCK_K)
    best = torch.empty(B, NBV, device=logits.device)  # in a CUDA graph, from the graph's own pool
    at = torch.empty(B, NBV, dtype=torch.int32, device=logits.device)
    _argmax_blocks_kernel[(B, NBV)](logits, best, at, V, BLOCK_K, NBV, pdl, **_launch(pdl))
    BB = triton.next_power_of_2(NBV)
    _greedy_kernel[(B,)](best, at, tokens, lengths, pos, tokens.stride(0), NBV, BB, pdl, **_launch(pdl))
    return tokens


# Each matmul of a batch's step (GPT-2 124M at 32 rows on an H200): (BLOCK_N, BLOCK_K, stages,
# warps, split of K). The fastest of a sweep of each alone (weights from memory, cuBLAS 3.9 / 3.5 /
# 5.1 / 7.3 / 24.2 us, these 4.0 / 3.7 / 5.1 / 8.6 / 22.9), then checked one knob at a time in the
# whole call, where three changes came out ahead of every re-timing of the old settings (by
# 0.4-1.5%; 2-3% above their mean, about the re-timings' own spread): the attention projection's
# 16 columns a program, the last matmul's 4 warps and the LayerNorm's 1 (docs/benchmarks.md,
# 2026-12-03).
ROWS_GEMM = {
    "qkv": (32, 256, 3, 4, 1),
    "proj": (16, 256, 3, 4, 1),
    "fc": (32, 256, 3, 4, 1),
    "proj2": (32, 128, 3, 4, 8),
    "head": (128, 64, 3, 4, 1),
}
ROWS_LN_WARPS = 1  # per row of `layer_norm_rows`
ROWS_BM = 32  # rows per tile: a tensor-core tile wants 16 or more
# Past 32 rows (two tiles of rows, each reading every weight), cuBLAS's GEMMs in the compiled step
# were faster: at 64 rows 84,297 against 79,047 new tokens/s (docs/benchmarks.md, 2026-12-03).
ROWS_UP_TO = 32


def layer_norm_rows(x, ln, out, pdl=0) -> torch.Tensor:
    """out (B, C) bfloat16 = LayerNorm(x), x (B, C) float32."""
    B, C = x.shape
    _layer_norm_rows_kernel[(B,)](
        x, ln.weight, ln.bias, out, ln.eps, C, triton.next_power_of_2(C), pdl,
        num_warps=ROWS_LN_WARPS, **_launch(pdl),
    )  # fmt: skip
    return out


def rows_linear(a, weight, bias, out, scratch, *, gemm, gelu=False, residual=False, valid_n=None, pdl=0):
    """out = epilogue(a @ weight.T + bias) for a (B, K) bfloat16: out (B, N) bfloat16, or with
    residual, out (B, N) float32 += it; `scratch` = (partial sums, counters) for a split K."""
    (M, K), N = a.shape, weight.shape[0]
    BN, BK, stages, warps, split = ROWS_GEMM[gemm]
    parts, counts = scratch
    grid = (N // BN, triton.cdiv(M, ROWS_BM), split)
    _rows_linear_kernel[grid](
        a, weight, weight if bias is None else bias, out, parts, counts, M, K, N, ROWS_BM, BN, BK, split,
        stages, bias is not None, gelu, residual, N if valid_n is None else valid_n,
        INTERPRETED, pdl, num_warps=warps, **_launch(pdl),
    )  # fmt: skip
    return out


def rows_fit(config, batch_size: int) -> bool:
    """Whether `FusedDecoder` takes a batch's matmuls as `rows_linear` GEMMs: BATCH_FROM to
    ROWS_UP_TO rows, and tiles that divide every matmul of the model."""
    if not BATCH_FROM <= batch_size <= ROWS_UP_TO:
        return False
    return all(
        n % ROWS_GEMM[g][0] == 0 and k % (ROWS_GEMM[g][1] * ROWS_GEMM[g][4]) == 0
        for g, (n, k) in _rows_shapes(config).items()
    )


def _rows_shapes(config) -> dict[str, tuple[int, int]]:
    """Each matmul's (N, K): columns out, the width summed over."""
    C, V = config.n_embd, config.padded_vocab_size
    return {"qkv": (3 * C, C), "proj": (C, C), "fc": (4 * C, C), "proj2": (C, 4 * C), "head": (V, C)}


_WEIGHTS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # model -> its bfloat16 matrices


def decode_weights(model: GPT) -> dict[str, torch.Tensor]:
    """bfloat16 copies of every matrix as (out, in), torch's own layout: one set per model,
    shared by the decoders of every batch size and cache length (1.5B's are 3 GB)."""
    if model not in _WEIGHTS:
        _WEIGHTS[model] = {
            n: p.detach().to(torch.bfloat16) for n, p in model.named_parameters() if p.dim() == 2
        }
    return _WEIGHTS[model]


def batch_decode(model: GPT, tokens, pos, cache, y) -> torch.Tensor:
    """`model.decode` for a batch's token at pos (tokens is (B, S + 1)): (B, V) float32 logits.

    The model's own modules, whose GEMMs read each weight once for all rows and which
    torch.compile fuses with their LayerNorms, biases, GELU and residual adds, around
    `decode_attention`, which writes the (B, nh, S, hs) cache in place. y is (B, C), the
    attention's output in the compute dtype, at a fixed address (for a CUDA graph)."""
    h = model.transformer
    x = h.wte(tokens.index_select(1, pos)[:, 0]) + h.wpe(pos)  # (B, C)
    for block, (k_cache, v_cache) in zip(h.h, cache):
        decode_attention(block.attn.c_attn(block.ln_1(x)), k_cache, v_cache, pos, y)
        x = x + block.attn.c_proj(y)
        x = x + block.mlp(block.ln_2(x))
    return model.head(h.ln_f(x)).float()


class FusedDecoder:
    """`model.decode` for one token per row at `pos`, in the kernels above, over fixed buffers.

    Reads the model's bfloat16 weights (`refresh()` takes them again: call it after training)
    and keeps every intermediate at a fixed address, so a CUDA graph of `logits()` replays with new
    tokens and positions. The cache is the caller's, (B, nh, S, hs) bfloat16, written in place.
    """

    def __init__(self, model: GPT, batch_size: int, cache_len: int):
        c = model.config
        self.model = model
        B, C, device = batch_size, c.n_embd, model.lm_head.weight.device
        new = lambda *shape, dtype=torch.bfloat16: torch.zeros(shape, dtype=dtype, device=device)
        self.x = new(B, C, dtype=torch.float32)  # the residual stream
        self.qkv, self.y, self.h = new(B, 3 * C), new(B, C), new(B, 4 * C)
        self.part = new(3, attention_blocks(cache_len), B, C, dtype=torch.float32)  # attention's blocks
        self.out = new(B, c.padded_vocab_size, dtype=torch.float32)  # logits
        self.weights = decode_weights(model)
        self.pdl = PDL if device.type == "cuda" else 0
        # From BATCH_FROM rows, GEMMs on tensor-core tiles (`rows_linear`) after a LayerNorm of their own
        self.rows = rows_fit(c, B)
        if self.rows:
            self.xn = new(B, C)  # LayerNorm's output
            # the split matmuls' partial sums, SPLIT per (BM, BN) tile, and a counter per tile
            tiles = {
                g: n // ROWS_GEMM[g][0] * triton.cdiv(B, ROWS_BM) for g, (n, _) in _rows_shapes(c).items()
            }
            split = [(t, *ROWS_GEMM[g]) for g, t in tiles.items() if ROWS_GEMM[g][4] > 1]
            parts = max([t * bn * ROWS_BM * s for t, bn, _, _, _, s in split], default=1)
            counts = max([t for t, *_ in split], default=1)
            self.scratch = (
                new(parts, dtype=torch.float32),
                new(counts, dtype=torch.int32),
            )  # counters: 0, left 0

    @torch.no_grad()
    def refresh(self) -> None:
        for name, param in self.model.named_parameters():
            if name in self.weights:
                self.weights[name].copy_(param)

    def logits(self, tokens: torch.Tensor, pos: torch.Tensor, cache) -> torch.Tensor:
        """(B, V) float32 logits for the token every row of tokens (B, S + 1) holds at pos (1,)."""
        h, w, c = self.model.transformer, self.weights, self.model.config
        pdl = self.pdl
        x = embed(tokens, pos, h.wte.weight, h.wpe.weight, self.x, pdl)  # float32 tables, as in decode
        if self.rows:
            return self._rows_logits(x, tokens, pos, cache)
        for i, (block, (k_cache, v_cache)) in enumerate(zip(h.h, cache)):
            p = f"transformer.h.{i}."
            ln_linear(x, block.ln_1, w[p + "attn.c_attn.weight"], block.attn.c_attn.bias, self.qkv, pdl=pdl)
            decode_attention(self.qkv, k_cache, v_cache, pos, self.y, self.part, pdl)
            linear_residual(self.y, w[p + "attn.c_proj.weight"], block.attn.c_proj.bias, x, pdl)
            ln_linear(
                x, block.ln_2, w[p + "mlp.c_fc.weight"], block.mlp.c_fc.bias, self.h, gelu=True, pdl=pdl
            )
            linear_residual(self.h, w[p + "mlp.c_proj.weight"], block.mlp.c_proj.bias, x, pdl)
        head = w["transformer.wte.weight"]  # the tied table
        return ln_linear(x, h.ln_f, head, None, self.out, valid_n=c.vocab_size, pdl=pdl)

    def _rows_logits(self, x, tokens, pos, cache) -> torch.Tensor:
        h, w, c, pdl = self.model.transformer, self.weights, self.model.config, self.pdl
        xn, scratch = self.xn, self.scratch
        for i, (block, (k_cache, v_cache)) in enumerate(zip(h.h, cache)):
            p = f"transformer.h.{i}."
            attn, mlp = block.attn, block.mlp
            layer_norm_rows(x, block.ln_1, xn, pdl)
            rows_linear(
                xn, w[p + "attn.c_attn.weight"], attn.c_attn.bias, self.qkv, scratch, gemm="qkv", pdl=pdl
            )
            decode_attention(self.qkv, k_cache, v_cache, pos, self.y, pdl=pdl)
            rows_linear(
                self.y,
                w[p + "attn.c_proj.weight"],
                attn.c_proj.bias,
                x,
                scratch,
                gemm="proj",
                residual=True,
                pdl=pdl,
            )
            layer_norm_rows(x, block.ln_2, xn, pdl)
            rows_linear(
                xn, w[p + "mlp.c_fc.weight"], mlp.c_fc.bias, self.h, scratch, gemm="fc", gelu=True, pdl=pdl
            )
            rows_linear(
                self.h,
                w[p + "mlp.c_proj.weight"],
                mlp.c_proj.bias,
                x,
                scratch,
                gemm="proj2",
                residual=True,
                pdl=pdl,
            )
        layer_norm_rows(x, h.ln_f, xn, pdl)
        head = w["transformer.wte.weight"]
        return rows_linear(xn, head, None, self.out, scratch, gemm="head", valid_n=c.vocab_size, pdl=pdl)

    def greedy(self, tokens: torch.Tensor, lengths: torch.Tensor, pos: torch.Tensor, cache) -> None:
        """Every row's token at pos + 1: its prompt's (lengths (B,)) while inside it, else the argmax."""
        greedy(self.logits(tokens, pos, cache), tokens, lengths, pos, self.pdl)


def cuda_graph(fn):
    """fn replayed as a CUDA graph: the first call runs it (compiling its kernels), the second
    records it and replays the record, every later call replays it. fn must read and write only
    tensors at fixed addresses (its result included), as `FusedDecoder` and the decode buffers do.
    Without CUDA (the interpreter, in tests) fn itself."""
    if not torch.cuda.is_available():
        return fn
    graph, result, calls = None, None, 0

    def replay():
        nonlocal graph, result, calls
        calls += 1
        if calls == 1:
            return fn()
        if graph is None:
            graph = torch.cuda.CUDAGraph()
            torch.cuda.synchronize()
            with torch.cuda.graph(graph):
                result = fn()
        graph.replay()
        return result

    return replay
