"""Completion log-likelihoods for PyTorch: the model half of the benchmark evaluations.

The mirror of `babygpt_jax/score.py`. `babygpt.eval.hellaswag` renders examples into (N, T) token
rows with a mask over the completion; this scores every row in one forward pass, under
`torch.no_grad` (eager autograd would otherwise record the graph), where JAX jits a pure function.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from babygpt_torch.model import GPT


def prepare_model(model: GPT) -> GPT:
    """Evaluation mode (no dropout), on the GPU when there is one."""
    return model.to("cuda" if torch.cuda.is_available() else "cpu").eval()


@torch.no_grad()
def completion_losses(model: GPT, tokens: np.ndarray, mask: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per row: the summed and the mean cross-entropy of the tokens where `mask` is 1.

    Position t's logits predict token t+1, so the loss of token t is read from row t-1's logits
    and the first token of a row is never scored. float32 throughout.
    """
    device = model.lm_head.weight.device
    idx = torch.as_tensor(tokens, dtype=torch.long, device=device)  # (N, T)
    scored = torch.as_tensor(mask, device=device)[:, 1:].float()  # (N, T-1)
    logits, _ = model(idx)  # (N, T, V)
    losses = F.cross_entropy(
        logits[:, :-1].float().flatten(0, 1), idx[:, 1:].flatten(), reduction="none"
    ).view_as(scored)  # (N, T-1)
    total = (losses * scored).sum(dim=1)
    mean = total / scored.sum(dim=1)
    return total.cpu().numpy(), mean.cpu().numpy()
