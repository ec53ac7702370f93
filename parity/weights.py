"""Random GPT-2 weights for parity checks, scaled so every activation is O(1).

At GPT-2's init scale (std 0.02) activations are tiny and an approximation can hide under float32
noise (exact vs tanh GELU moves the logits by ~1e-5), so `pytest parity` and `parity.gpu_check`
use these instead. Framework-light: numpy, plus torch only to learn the tensor shapes.
"""

from __future__ import annotations

import numpy as np

from babygpt.config import ModelConfig


def o1_tensors(config: ModelConfig, seed: int) -> dict[str, np.ndarray]:
    """Random weights in the full layout (HF names, padded wte) with O(1) activations.

    Kernels ~ N(0, 1/fan_in) keep each layer's output O(1); LayerNorm scales ~ 1 +- 0.5 and
    biases ~ +-0.5 so a swapped or dropped LayerNorm parameter shows; the padded vocabulary rows
    are large, so a backend that forgot to mask them would pick them.
    """
    import torch

    from babygpt_torch.model import GPT
    from parity.convert import torch_tensors

    torch.manual_seed(seed)
    shapes = {k: v.shape for k, v in torch_tensors(GPT(config)).items()}
    rng = np.random.default_rng(seed)
    out = {}
    for name, shape in shapes.items():
        if name == "transformer.wte.weight":
            w = rng.normal(0.0, 0.5, shape)  # logits = x @ wte.T: std ~ 0.5 * sqrt(n_embd)
            w[config.vocab_size :] = 10.0
        elif name == "transformer.wpe.weight":
            w = rng.normal(0.0, 0.5, shape)
        elif name.endswith(".bias"):
            w = rng.normal(0.0, 0.5, shape)
        elif len(shape) == 1:  # LayerNorm scale
            w = 1.0 + rng.normal(0.0, 0.5, shape)
        else:  # (in, out) kernel
            w = rng.normal(0.0, shape[0] ** -0.5, shape)
        out[name] = w.astype(np.float32)
    return out


def random_batch(config: ModelConfig, B: int, T: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """(inputs, targets) token ids, both (B, T), in the tokenizer's (unpadded) vocabulary."""
    rng = np.random.default_rng(seed)
    tokens = rng.integers(0, config.vocab_size, (B, T + 1))
    return tokens[:, :-1].astype(np.int64), tokens[:, 1:].astype(np.int64)
