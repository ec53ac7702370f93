"""Fused decode kernels in Pallas: one token per row through a GPT-2 layer in 6 kernels, not ~20.

Decoding a token at batch 1 to 32 is latency-bound: each of the ~250 kernels XLA makes of
`model.decode` per token takes ~3 us whatever it reads (docs/performance.md). Here a layer is six
kernels:

    ln_linear        LayerNorm, then the QKV matmul and its bias          (B, C) -> (B, 3C)
    decode_attention the new key and value into the cache; each block of cache slots' share
                     of attention (flash-decoding), then the shares combined  (B, 3C) -> (B, C)
    linear_residual  the output projection and its bias, into the residual stream
    ln_linear        LayerNorm, then the MLP's first matmul, bias and GELU (B, C) -> (B, 4C)
    linear_residual  the MLP's second matmul and bias, into the residual stream

plus the embedding (left to XLA, which fuses it into one kernel) and `ln_linear` with the tied
table as the head. Each matmul is a matrix times one vector per row, computed as dot products on
CUDA cores, BLOCK_N columns a program (`babygpt/kernel_blocks.py` says why and how fast). Each
kernel computes the same expression as the module it replaces in bfloat16: LayerNorm and the
residual stream in float32, bfloat16 matmul inputs and outputs, float32 sums (tested against those
expressions in tests/test_kernels.py). The mirror of `babygpt_torch/kernels.py` (Triton): the same
kernels, the same blocks; Pallas lowers them to Triton on a GPU. Not a lesson file:
`babygpt_jax/generate.py` uses `fused_decode` for a lone prompt on a GPU (3,428 against
2,082 new tokens/s on an H200: docs/performance.md). A GEMV reads each weight once per row, so from
BATCH_FROM rows `batch_decode` keeps the model's own modules, whose XLA GEMMs read it once for all
rows, and replaces only attention, by `_decode_attention_rows_kernel` (63,604 against 49,122 at
batch 32). Between, `model.decode`.

And one thing for training: the loss's two passes over the (B·T, V) logits, `cross_entropy`, which
`model.training_loss` takes on one GPU in place of the written-out expression (the lesson, and
the reference the tests hold these to). `_logsumexp_kernel` reads each row once with a running
maximum; `_cross_entropy_grad_kernel` reads it once more and writes (softmax - one_hot) * g / N
over it, in place. XLA's fusions of the expression took 4.7 ms at 124M, B=32, these 3.1
(docs/performance.md).

Without a GPU the kernels run in Pallas' interpret mode, which is how the tests check them on a CPU.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from babygpt.kernel_blocks import (
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

_BF16, _F32 = jnp.bfloat16, jnp.float32


def _call(kernel, num_warps=4, num_stages=None, **kwargs):
    """pl.pallas_call, compiled to Triton on a GPU and interpreted elsewhere."""
    gpu = jax.default_backend() == "gpu"
    params = plgpu.CompilerParams(num_warps=num_warps, num_stages=num_stages) if gpu else None
    return pl.pallas_call(kernel, interpret=not gpu, compiler_params=params, **kwargs)


def _gelu_tanh(x):
    return 0.5 * x * (1.0 + jnp.tanh(0.7978845608028654 * (x + 0.044715 * x * x * x)))  # sqrt(2 / pi)


def _chunk(ref, k0, *rows):
    """ref[*rows, k0 : k0 + BLOCK_K] as float32, 0 past K. Pallas refuses a static slice that
    starts inside the ref and ends past it, so a last chunk that would pass K is read as the
    BLOCK_K columns ending at K, its overlap with the chunk before masked (Triton masks instead)."""
    K = ref.shape[-1]
    start = max(min(k0, K - BLOCK_K), 0)  # K < BLOCK_K: one chunk from 0, masked past K
    cols = start + jnp.arange(BLOCK_K)
    shape = (*ref.shape[len(rows) : -1], BLOCK_K)
    at = ref.at[(*rows, *(slice(None),) * (len(shape) - 1), pl.ds(start, BLOCK_K))]
    keep = jnp.broadcast_to((cols >= k0) & (cols < K), shape)
    return plgpu.load(at, mask=keep, other=0.0).astype(_F32)


def _ln_linear_kernel(x_ref, g_ref, b_ref, w_ref, *refs, eps, gelu, valid_n):
    """out[:, n-block] = act(LayerNorm(x) @ w[n-block].T + bias): one program per BN output columns."""
    *bias_ref, out_ref = refs
    (B, K), BN = x_ref.shape, w_ref.shape[0]
    cols = pl.program_id(0) * BN + jnp.arange(BN)

    def row_body(row, carry):  # one row at batch 1; a few rows re-read w from the cache
        # LayerNorm statistics, recomputed by each program (a row is a few KB), in one pass.
        total, squares = jnp.float32(0), jnp.float32(0)
        for k0 in range(0, K, BLOCK_K):
            x = _chunk(x_ref, k0, row)
            total, squares = total + x.sum(), squares + (x * x).sum()
        mean = total / K
        rstd = lax.rsqrt(squares / K - mean * mean + eps)
        acc = jnp.zeros(BN, _F32)
        for k0 in range(0, K, BLOCK_K):  # unrolled: every chunk's load in flight at once
            w = _chunk(w_ref, k0)  # (BN, BK): rows of an (N, K) weight
            x = (_chunk(x_ref, k0, row) - mean) * rstd * _chunk(g_ref, k0) + _chunk(b_ref, k0)  # 0 past K
            acc += (w * x.astype(_BF16).astype(_F32)[None, :]).sum(axis=1)  # bfloat16 products, float32 sums
        if bias_ref:  # the bias added in bfloat16, as torch's autocast does
            acc += bias_ref[0][...].astype(_BF16).astype(_F32)
        out = acc.astype(_BF16).astype(_F32)  # the bfloat16 matmul output
        if gelu:
            out = _gelu_tanh(out).astype(_BF16).astype(_F32)
        if valid_n is not None:  # the head: padded vocabulary entries get no probability
            out = jnp.where(cols < valid_n, out, -jnp.inf)
        out_ref[row, :] = out.astype(out_ref.dtype)
        return carry

    lax.fori_loop(0, B, row_body, 0)


def _linear_residual_kernel(h_ref, w_ref, bias_ref, x_ref, out_ref):
    """x[:, n-block] + h @ w[n-block].T + bias, written over x (aliased): each program reads and
    writes only its columns."""
    (B, K), BN = h_ref.shape, w_ref.shape[0]

    def row_body(row, carry):
        acc = jnp.zeros(BN, _F32)
        for k0 in range(0, K, BLOCK_K):
            acc += (_chunk(w_ref, k0) * _chunk(h_ref, k0, row)[None, :]).sum(axis=1)
        acc += bias_ref[...].astype(_BF16).astype(_F32)
        out_ref[row, :] = x_ref[row, :] + acc.astype(_BF16).astype(_F32)
        return carry

    lax.fori_loop(0, B, row_body, 0)


def _decode_attention_kernel(qkv_ref, pos_ref, k_ref, v_ref, part_ref, k_out, v_out, *, block_s):
    """One (row, head, block of block_s cache slots): this block's share of attention for the new token.

    The block holding pos first writes the new key and value into the (B, S, nh, hs) cache,
    aliased: read through k_ref, written through k_out, one buffer on a GPU. It reads slot pos
    from registers, not from the cache just written. Each block stores its largest score, its
    softmax normaliser and its weighted sum of values (flash-decoding: the slots of one head are
    split across programs, so a batch of one still fills the GPU); `_combine_kernel` merges them.
    A block wholly past pos stores (-inf, 0, 0).
    """
    row, head, block = pl.program_id(0), pl.program_id(1), pl.program_id(2)
    HS = k_ref.shape[3]
    C = HS * k_ref.shape[2]
    pos = pos_ref[()]
    at = lambda part: qkv_ref[row, pl.ds(part * C + head * HS, HS)]
    q, k_new, v_new = at(0).astype(_F32), at(1), at(2)

    @pl.when(block == pos // block_s)  # the block that holds pos
    def _():
        k_out[row, pos, head, :] = k_new
        v_out[row, pos, head, :] = v_new

    slots = block * block_s + jnp.arange(block_s)
    seen = jnp.broadcast_to((slots < pos)[:, None], (block_s, HS))
    cached = pl.ds(pl.multiple_of(block * block_s, block_s), block_s)
    k = jnp.where(seen, plgpu.load(k_ref.at[row, cached, head, :], mask=seen, other=0.0), k_new[None, :])
    v = jnp.where(seen, plgpu.load(v_ref.at[row, cached, head, :], mask=seen, other=0.0), v_new[None, :])
    scores = (q[None, :] * k.astype(_F32)).sum(axis=1) * HS**-0.5  # (BS,)
    scores = jnp.where(slots <= pos, scores, -jnp.inf)
    m = scores.max()
    p = jnp.exp(scores - jnp.where(m > -jnp.inf, m, 0.0))  # all 0 in a block past pos
    cols = pl.ds(head * HS, HS)  # part is (3, blocks, B, C): max, normaliser, weighted sum
    part_ref[0, block, row, cols] = jnp.zeros(HS, _F32) + m
    part_ref[1, block, row, cols] = jnp.zeros(HS, _F32) + p.sum()
    part_ref[2, block, row, cols] = (p[:, None] * v.astype(_F32)).sum(axis=0)


def _decode_attention_rows_kernel(qkv_ref, pos_ref, k_ref, v_ref, y_ref, k_out, v_out, *, block_s):
    """One (row, head) of a batch: the new key and value into the (B, S, nh, hs) cache (aliased, as
    in `_decode_attention_kernel`), then attention over slots 0..pos in blocks of block_s, with a
    running maximum and normaliser (online softmax). A batch has B x nh programs already, so a
    head's slots are not split and nothing is left to combine."""
    row, head = pl.program_id(0), pl.program_id(1)
    HS = k_ref.shape[3]
    C = HS * k_ref.shape[2]
    pos = pos_ref[()]
    at = lambda part: qkv_ref[row, pl.ds(part * C + head * HS, HS)]
    q, k_new, v_new = at(0).astype(_F32), at(1), at(2)
    k_out[row, pos, head, :] = k_new
    v_out[row, pos, head, :] = v_new

    def body(block, carry):
        m, norm, acc = carry  # the largest score so far, the softmax normaliser, the weighted sum
        slots = block * block_s + jnp.arange(block_s)
        seen = jnp.broadcast_to((slots < pos)[:, None], (block_s, HS))  # slot pos from registers
        cached = pl.ds(pl.multiple_of(block * block_s, block_s), block_s)
        k = jnp.where(seen, plgpu.load(k_ref.at[row, cached, head, :], mask=seen, other=0.0), k_new[None, :])
        v = jnp.where(seen, plgpu.load(v_ref.at[row, cached, head, :], mask=seen, other=0.0), v_new[None, :])
        scores = (q[None, :] * k.astype(_F32)).sum(axis=1) * HS**-0.5  # (BS,)
        scores = jnp.where(slots <= pos, scores, -jnp.inf)
        m_new = jnp.maximum(m, scores.max())  # finite: block 0 holds slot 0
        p, old = jnp.exp(scores - m_new), jnp.exp(m - m_new)
        return m_new, norm * old + p.sum(), acc * old + (p[:, None] * v.astype(_F32)).sum(axis=0)

    start = (jnp.float32(-jnp.inf), jnp.float32(0), jnp.zeros(HS, _F32))
    _, norm, acc = lax.fori_loop(0, pos // block_s + 1, body, start)
    y_ref[row, pl.ds(head * HS, HS)] = (acc / norm).astype(y_ref.dtype)


def _combine_kernel(part_ref, pos_ref, y_ref, *, block_s, head_size):
    """One (row, head): the blocks' shares merged into softmax(scores) @ values, as bfloat16."""
    row, head = pl.program_id(0), pl.program_id(1)
    cols = pl.ds(head * head_size, head_size)
    at = lambda block: (
        part_ref[0, block, row, cols],
        part_ref[1, block, row, cols],
        part_ref[2, block, row, cols],
    )

    def body(block, carry):
        m, norm, acc = carry
        m_b, norm_b, acc_b = at(block)
        m_new = jnp.maximum(m, m_b)
        old, new = jnp.exp(m - m_new), jnp.exp(m_b - m_new)
        return m_new, norm * old + norm_b * new, acc * old + acc_b * new

    # from block 0, which always holds slot 0, through the blocks up to pos
    _, norm, acc = lax.fori_loop(1, pos_ref[()] // block_s + 1, body, at(0))
    y_ref[row, cols] = (acc / norm).astype(y_ref.dtype)


def _logsumexp_kernel(logits_ref, logz_ref, *, vocab, block_v):
    """logz[row] = log(sum(exp(logits[row, :vocab]))) in one read of the row: a running maximum
    and a sum rescaled whenever it grows (online softmax). The padding is never read."""
    row = pl.program_id(0)

    def body(block, carry):
        m, total = carry
        start = pl.multiple_of(block * block_v, block_v)
        v = start + jnp.arange(block_v)
        at = logits_ref.at[row, pl.ds(start, block_v)]
        x = plgpu.load(at, mask=v < vocab, other=-jnp.inf).astype(_F32)
        m_new = jnp.maximum(m, x.max())
        return m_new, total * jnp.exp(m - m_new) + jnp.exp(x - m_new).sum()

    m, total = lax.fori_loop(0, pl.cdiv(vocab, block_v), body, (jnp.float32(-jnp.inf), jnp.float32(0)))
    logz_ref[row] = m + jnp.log(total)


def _cross_entropy_grad_kernel(logits_ref, targets_ref, logz_ref, scale_ref, grad_ref, *, vocab, block_v):
    """grad[row] = (softmax(logits[row]) - one_hot(target)) * scale over all V entries, 0 on the
    padding: one read of the row and one write."""
    row = pl.program_id(0)
    V = logits_ref.shape[1]
    logz, target, scale = logz_ref[row], targets_ref[row], scale_ref[()]

    def body(block, carry):
        start = pl.multiple_of(block * block_v, block_v)
        v = start + jnp.arange(block_v)
        x = plgpu.load(logits_ref.at[row, pl.ds(start, block_v)], mask=v < vocab, other=-jnp.inf)
        g = (jnp.exp(x.astype(_F32) - logz) - (v == target).astype(_F32)) * scale
        plgpu.store(grad_ref.at[row, pl.ds(start, block_v)], g.astype(grad_ref.dtype), mask=v < V)
        return carry

    lax.fori_loop(0, pl.cdiv(V, block_v), body, 0)


def cross_entropy(logits, targets, vocab_size: int, block_v=LOSS_BLOCK_V["jax"], num_warps=LOSS_WARPS):
    """`model.cross_entropy` in two kernels, one a pass over the logits: the forward's logsumexp
    and the backward's gradient, each reading the (N, V) logits once, where XLA's fusions of the
    written-out expression take about twice as long (docs/performance.md). Float32 logz and loss;
    the gradient in the logits' dtype."""
    rows = logits.reshape(-1, logits.shape[-1])  # (N, V)
    return _rows_cross_entropy(rows, targets.reshape(-1), vocab_size, block_v, num_warps)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3, 4))
def _rows_cross_entropy(rows, targets, vocab_size, block_v, num_warps):  # (N, V), (N,)
    return _cross_entropy_fwd(rows, targets, vocab_size, block_v, num_warps)[0]


def _cross_entropy_fwd(rows, targets, vocab_size, block_v, num_warps):
    logz = _call(
        functools.partial(_logsumexp_kernel, vocab=vocab_size, block_v=block_v),
        num_warps=num_warps,
        grid=(rows.shape[0],),
        out_shape=jax.ShapeDtypeStruct((rows.shape[0],), _F32),
    )(rows)
    target_logit = jnp.take_along_axis(rows, targets[:, None], axis=1)[:, 0].astype(_F32)
    return jnp.mean(logz - target_logit), (rows, targets, logz)


def _cross_entropy_bwd(vocab_size, block_v, num_warps, saved, g):
    rows, targets, logz = saved
    grad = _call(
        functools.partial(_cross_entropy_grad_kernel, vocab=vocab_size, block_v=block_v),
        num_warps=num_warps,
        grid=(rows.shape[0],),
        out_shape=jax.ShapeDtypeStruct(rows.shape, rows.dtype),
        input_output_aliases={0: 0},  # into the logits' buffer: each block is read, then written
    )(rows, targets, logz, (g / targets.size).astype(_F32))
    return grad, None  # integer targets have no gradient


_rows_cross_entropy.defvjp(_cross_entropy_fwd, _cross_entropy_bwd)


def ln_linear(x, ln_scale, ln_bias, weight, bias, *, eps, gelu=False, valid_n=None, out_dtype=_BF16):
    """act(LayerNorm(x) @ weight.T + bias): x (B, K) float32, weight (N, K) bfloat16 -> (B, N)."""
    (B, K), N = x.shape, weight.shape[0]
    whole = lambda *shape: pl.BlockSpec(shape, lambda j: (0,) * len(shape))
    in_specs = [whole(B, K), whole(K), whole(K), pl.BlockSpec((BLOCK_N, K), lambda j: (j, 0))]
    args = [x, ln_scale, ln_bias, weight]
    if bias is not None:
        in_specs.append(pl.BlockSpec((BLOCK_N,), lambda j: (j,)))
        args.append(bias)
    valid_n = valid_n if valid_n is not None and valid_n < N else None
    return _call(
        functools.partial(_ln_linear_kernel, eps=eps, gelu=gelu, valid_n=valid_n),
        num_warps=LN_WARPS,
        grid=(N // BLOCK_N,),
        in_specs=in_specs,
        out_specs=pl.BlockSpec((B, BLOCK_N), lambda j: (0, j)),
        out_shape=jax.ShapeDtypeStruct((B, N), out_dtype),
    )(*args)


def linear_residual(h, weight, bias, x):
    """x + h @ weight.T + bias, in x's buffer: h (B, K) bfloat16, weight (N, K), x (B, N) float32."""
    (B, K), N = h.shape, weight.shape[0]
    columns = pl.BlockSpec((B, BLOCK_N), lambda j: (0, j))
    return _call(
        _linear_residual_kernel,
        num_warps=RESIDUAL_WARPS,
        grid=(N // BLOCK_N,),
        in_specs=[
            pl.BlockSpec((B, K), lambda j: (0, 0)),
            pl.BlockSpec((BLOCK_N, K), lambda j: (j, 0)),
            pl.BlockSpec((BLOCK_N,), lambda j: (j,)),
            columns,
        ],
        out_specs=columns,
        out_shape=jax.ShapeDtypeStruct(x.shape, x.dtype),
        input_output_aliases={3: 0},
    )(h, weight, bias, x)


def attention_blocks(cache_len: int) -> int:
    return pl.cdiv(cache_len, BLOCK_S)


def decode_attention(qkv, k_cache, v_cache, pos):
    """(y (B, C), k_cache, v_cache): attention for qkv (B, 3C) over the (B, S, nh, hs) cache,
    which gains this position's keys and values (in place: the caches are aliased). Below
    BATCH_FROM rows each head's slots are split across programs, then combined."""
    B, S, n_head, hs = k_cache.shape
    C = n_head * hs
    caches = tuple(jax.ShapeDtypeStruct(c.shape, c.dtype) for c in (k_cache, v_cache))  # aliased
    if B >= BATCH_FROM:  # one program per (row, head), nothing to combine
        return _call(
            functools.partial(_decode_attention_rows_kernel, block_s=ROWS_BLOCK_S["jax"]),
            num_warps=ROWS_WARPS,
            num_stages=ROWS_STAGES,
            grid=(B, n_head),
            out_shape=(jax.ShapeDtypeStruct((B, C), qkv.dtype), *caches),
            input_output_aliases={2: 1, 3: 2},
        )(qkv, pos, k_cache, v_cache)
    NB = attention_blocks(S)
    part, k_cache, v_cache = _call(
        functools.partial(_decode_attention_kernel, block_s=BLOCK_S),
        grid=(B, n_head, NB),
        out_shape=(jax.ShapeDtypeStruct((3, NB, B, C), _F32), *caches),
        input_output_aliases={2: 1, 3: 2},
    )(qkv, pos, k_cache, v_cache)
    y = _call(
        functools.partial(_combine_kernel, block_s=BLOCK_S, head_size=hs),
        grid=(B, n_head),
        out_shape=jax.ShapeDtypeStruct((B, C), qkv.dtype),
    )(part, pos)
    return y, k_cache, v_cache


def decode_weights(model) -> dict:
    """bfloat16 copies of every matrix as (out, in), the layout the kernels read (torch's)."""
    h = model.transformer
    weights = {"head": h.wte.embedding[...].astype(_BF16)}  # the tied table, (V, C) already
    for i, block in enumerate(h.h):
        for name, dense in (
            ("c_attn", block.attn.c_attn),
            ("attn_proj", block.attn.c_proj),
            ("c_fc", block.mlp.c_fc),
            ("mlp_proj", block.mlp.c_proj),
        ):
            weights[f"{i}.{name}"] = dense.kernel[...].T.astype(_BF16)
    return weights


def batch_decode(model, token, kv_cache, pos):
    """`model.decode(token[:, None], kv_cache, pos)` for a batch: the model's own modules, whose
    GEMMs read each weight once for all rows and which XLA fuses with their LayerNorms, biases,
    GELU and residual adds, around `decode_attention`, which extends the cache in place. (B, V)
    float32 logits and the cache."""
    h = model.transformer
    x = h.wte(token) + h.wpe(pos)  # (B, C)
    new_cache = []
    for block, (k_cache, v_cache) in zip(h.h, kv_cache):
        y, k_cache, v_cache = decode_attention(block.attn.c_attn(block.ln_1(x)), k_cache, v_cache, pos)
        x = x + block.attn.c_proj(y)
        x = x + block.mlp(block.ln_2(x))
        new_cache.append((k_cache, v_cache))
    return model.head(h.ln_f(x)).astype(_F32), new_cache


def fused_decode(model, weights: dict, token, kv_cache, pos):
    """`model.decode(token[:, None], kv_cache, pos)` in the kernels above: (B, V) float32 logits
    for one token per row (B,) at position pos, and the cache extended by it. From BATCH_FROM
    rows, `batch_decode` (weights unused)."""
    if token.shape[0] >= BATCH_FROM:
        return batch_decode(model, token, kv_cache, pos)
    c, h = model.config, model.transformer
    x = h.wte.embedding[...][token].astype(_F32) + h.wpe.embedding[...][pos].astype(_F32)  # (B, C)
    ln = lambda norm: (norm.scale[...], norm.bias[...])
    eps = c.layer_norm_epsilon
    new_cache = []
    for i, (block, (k_cache, v_cache)) in enumerate(zip(h.h, kv_cache)):
        attn, mlp = block.attn, block.mlp
        qkv = ln_linear(x, *ln(block.ln_1), weights[f"{i}.c_attn"], attn.c_attn.bias[...], eps=eps)
        y, k_cache, v_cache = decode_attention(qkv, k_cache, v_cache, pos)
        x = linear_residual(y, weights[f"{i}.attn_proj"], attn.c_proj.bias[...], x)
        hidden = ln_linear(x, *ln(block.ln_2), weights[f"{i}.c_fc"], mlp.c_fc.bias[...], eps=eps, gelu=True)
        x = linear_residual(hidden, weights[f"{i}.mlp_proj"], mlp.c_proj.bias[...], x)
        new_cache.append((k_cache, v_cache))
    logits = ln_linear(x, *ln(h.ln_f), weights["head"], None, eps=eps, valid_n=c.vocab_size, out_dtype=_F32)
    return logits, new_cache
