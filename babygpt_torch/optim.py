"""AdamW with linear warmup and cosine decay, in PyTorch: `torch.optim.AdamW` plus a `LambdaLR`.

The mirror of `babygpt_jax/optim.py`, which builds the same thing from optax transformations. The
schedule is written out by hand in both, the same formula (optax's `warmup_cosine_decay_schedule`
gives the same rates, less precisely in float32).
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
import torch.nn as nn

from babygpt.config import TrainConfig


def lr_schedule(train: TrainConfig) -> Callable[[int], float]:
    """The learning rate at optimizer step s: linear warmup from 0, cosine decay to `final_lr`."""
    max_lr, final_lr, warmup = train.max_lr, train.final_lr, train.warmup_steps
    decay_steps = max(1, train.max_steps - warmup)  # optax refuses 0; 1 gives final_lr at once

    def lr(step: int) -> float:
        if step < warmup:
            return max_lr * step / warmup
        progress = min(step - warmup, decay_steps) / decay_steps  # constant final_lr past max_steps
        return final_lr + (max_lr - final_lr) * 0.5 * (1.0 + math.cos(math.pi * progress))

    return lr


def weight_decay_mask(model: nn.Module) -> dict[str, bool]:
    """True for the parameters that decay: matrices and embeddings (rank >= 2), not biases or LayerNorms.

    `named_parameters` yields each tensor once, so the tied wte / lm_head matrix appears once, as
    `transformer.wte.weight`.
    """
    return {name: p.dim() >= 2 for name, p in model.named_parameters() if p.requires_grad}


def make_optimizer(
    model: nn.Module, train: TrainConfig, device_type: str
) -> tuple[torch.optim.AdamW, torch.optim.lr_scheduler.LambdaLR]:
    """AdamW over two parameter groups (decay / no decay) and its learning-rate scheduler.

    The optimizer's lr is `max_lr` and the scheduler multiplies it by `lr_schedule(s) / max_lr`,
    so `optimizer.param_groups[0]["lr"]` is always the rate the next `optimizer.step()` uses.
    """
    mask = weight_decay_mask(model)
    params = dict(model.named_parameters())
    groups = [
        {"params": [params[n] for n, decay in mask.items() if decay], "weight_decay": train.weight_decay},
        {"params": [params[n] for n, decay in mask.items() if not decay], "weight_decay": 0.0},
    ]
    optimizer = torch.optim.AdamW(
        groups,
        lr=train.max_lr,
        betas=(train.beta1, train.beta2),
        eps=train.eps,
        fused=device_type == "cuda",  # one kernel for the whole update on GPU
    )
    schedule = lr_schedule(train)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: schedule(step) / train.max_lr)
    return optimizer, scheduler
