"""The launch settings both backends' fused decode kernels share (`babygpt_{torch,jax}/kernels.py`).

Framework-free: Triton and Pallas (which lowers to Triton) take the same tiles, so one sweep on an
H200 chose them for both (docs/benchmarks.md, 2026-12-02). Decoding one token, each matmul is a
matrix times a vector: each program computes BLOCK_N output columns as dot products on CUDA cores
(a tensor-core tile needs 16 rows, 15 of them zeros at batch 1) over K in BLOCK_K chunks, unrolled
so that every chunk's load is in flight at once. At GPT-2 124M's shapes: 3.0 us for the QKV matmul
(cuBLAS's GEMV 3.2, 16 x 16 tensor-core tiles 6.4), 21 us for the head (cuBLAS 21.2).
"""

from __future__ import annotations

BLOCK_N = 4  # output columns per program: 576 programs for the QKV matmul, 12,576 for the head
BLOCK_K = 1024  # K per chunk; a chunk past K is masked (768 is one chunk, 3072 three)
LN_WARPS = 2  # warps per program: LayerNorm + matmul
RESIDUAL_WARPS = 4  # matmul + residual add
BLOCK_S = 64  # cache slots per attention program

# From BATCH_FROM rows a decode step is a batch: the matmuls are GEMMs (cuBLAS, XLA), whose
# tensor-core tiles read each weight once for every row, and the hand-written kernels are
# attention alone, one program per (row, head), which are enough programs to fill the GPU.
BATCH_FROM = 8
# Cache slots per step of a (row, head)'s walk. The one setting the backends do not share: on an
# H200 at batch 32, Triton's kernel was fastest with 128 (50,622 new tokens/s against 48,254 with
# 64), Pallas' with 64 (62,210 against 58,718 with 128), the same kernel lowered two ways.
ROWS_BLOCK_S = {"torch": 128, "jax": 64}
ROWS_WARPS = 4
# Blocks of the walk whose loads are in flight at once (Triton's software pipelining of the loop).
# On an H200 at batch 32, torch: Triton's default, 3, 49,730-50,284 new tokens/s; 2, 53,476 (same
# run). Pallas: 60,386 with the default, 61,592 with 2 (same run). 1 (no pipelining) not measured.
ROWS_STAGES = 2

# The training loss's two passes (`cross_entropy` in both kernels files): one program per row of
# logits, LOSS_BLOCK_V of its V entries a step, LOSS_WARPS warps. On an H200, the loss alone at
# 124M, B=32 (forward and backward, 32,768 rows of 50,304): Triton 2.96 ms with (4096, 4), 3.06
# with (2048, 4), 3.25 with (4096, 8); Pallas 3.13 with (2048, 4), 3.35 with (4096, 4), 3.54
# with (4096, 8); the written-out expression 4.59 (torch.compile) and 4.68 (XLA), same run.
LOSS_BLOCK_V = {"torch": 4096, "jax": 2048}
LOSS_WARPS = 4


def supported(config) -> bool:
    """Whether the kernels fit a model: widths in whole column blocks, a power-of-two head size."""
    hs = config.head_dim
    widths = (config.n_embd, config.padded_vocab_size)
    return config.bias and all(w % BLOCK_N == 0 for w in widths) and hs >= 16 and hs & (hs - 1) == 0
