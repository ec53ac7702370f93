"""FLOPs per token of this GPT-2 and model FLOPs utilization (MFU) against known accelerators.

The count is the one nanoGPT and the PaLM paper use: 6 FLOPs per matmul parameter per token for
forward + backward (the tied lm_head counted once as a matmul), plus 12 * n_layer * T * C for the
attention scores and their weighted sum (full, not causal-halved, T x T matrices).
"""

from __future__ import annotations

import os

from babygpt.config import ModelConfig

# Dense bfloat16 tensor-core peaks from the vendors' datasheets, in FLOP/s. Matched by substring
# of the device name, most specific first.
PEAK_BF16_FLOPS: dict[str, float] = {
    "H200": 989e12,
    "H100 PCIe": 756e12,
    "H100": 989e12,
    "GH200": 989e12,
    "B200": 2250e12,
    "A100": 312e12,
    "A10G": 125e12,
    "L40S": 362e12,
    "L4": 121e12,
    "RTX 4090": 165e12,
    "RTX 3090": 71e12,
    "V100": 125e12,
    "TPU v4": 275e12,
    "TPU v5 lite": 197e12,
    "TPU v5": 459e12,
}


def matmul_params(config: ModelConfig) -> int:
    """Parameters that take part in a matmul per token: the blocks' linears and the lm_head."""
    per_layer = 12 * config.n_embd**2  # c_attn 3C^2 + c_proj C^2 + c_fc 4C^2 + mlp.c_proj 4C^2
    return config.n_layer * per_layer + config.n_embd * config.padded_vocab_size


def num_params(config: ModelConfig) -> int:
    """All trainable parameters, counting the tied wte / lm_head matrix once."""
    C, L = config.n_embd, config.n_layer
    bias = 1 if config.bias else 0
    per_layer = 12 * C * C + bias * (3 * C + C + 4 * C + C) + 2 * C * (1 + bias)
    embeddings = config.padded_vocab_size * C + config.block_size * C
    return L * per_layer + embeddings + C * (1 + bias)


def flops_per_token(config: ModelConfig, seq_len: int | None = None, training: bool = True) -> float:
    T = seq_len or config.block_size
    forward = 2 * matmul_params(config) + 4 * config.n_layer * T * config.n_embd
    return 3 * forward if training else forward


def peak_flops(device_name: str) -> float | None:
    """Peak bf16 FLOP/s for a device name; BABYGPT_PEAK_FLOPS overrides; None when unknown."""
    if override := os.environ.get("BABYGPT_PEAK_FLOPS"):
        return float(override)
    for key, value in PEAK_BF16_FLOPS.items():
        if key.lower() in device_name.lower():
            return value
    return None


def mfu(tokens_per_second: float, config: ModelConfig, seq_len: int, peak: float | None) -> float | None:
    """Fraction of the peak that the model's FLOPs reach; None without a known peak (CPU)."""
    if not peak:
        return None
    return tokens_per_second * flops_per_token(config, seq_len) / peak
