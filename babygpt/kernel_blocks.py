"""The block arithmetic both backends' fused decode kernels share (`babygpt_{torch,jax}/kernels.py`).

Framework-free: which models the kernels fit, how many rows a tile holds and how wide a K block is.
Triton and Pallas both need power-of-two tiles, so these answers are the same for both.
"""

from __future__ import annotations

BLOCK_K = 64  # every GPT-2 width (768, 1024, 1280, 1600, and 3C, 4C, the padded vocabulary) divides by 64


def _next_power_of_2(n: int) -> int:
    return 1 << max(n - 1, 0).bit_length()


def supported(config) -> bool:
    """Whether the kernels fit a model: widths in whole K blocks, a power-of-two head size."""
    hs = config.head_dim
    return config.bias and config.n_embd % BLOCK_K == 0 and hs >= 16 and hs & (hs - 1) == 0


def block_rows(batch_size: int) -> int:
    """Rows every buffer holds: the batch rounded up to a tensor-core tile (16) or a power of two.
    The padded rows are computed in registers but never read from or written to memory."""
    return max(16, _next_power_of_2(batch_size))


def block_k(K: int, max_block_k: int) -> int:
    """K in one block where it fits max_block_k (masked past K), else the widest block dividing K."""
    whole = _next_power_of_2(K)
    if whole <= max_block_k:
        return whole
    return next(b for b in (1024, 512, 256, 128, BLOCK_K) if b <= max_block_k and K % b == 0)
