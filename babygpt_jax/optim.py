"""AdamW with linear warmup and cosine decay, in JAX: a chain of optax gradient transformations.

The mirror of `babygpt_torch/optim.py`, which builds the same thing from `torch.optim.AdamW` and a
`LambdaLR`. Here the schedule is optax's `warmup_cosine_decay_schedule`, the decay mask is a pytree
of booleans shaped like the parameters, and the optimizer is a pure `(init, update)` pair whose
state is a pytree the train step carries, shards and checkpoints like the parameters.
"""

from __future__ import annotations

import jax
import optax

from babygpt.config import TrainConfig


def lr_schedule(train: TrainConfig) -> optax.Schedule:
    """The learning rate at optimizer step s: linear warmup from 0, cosine decay to `final_lr`."""
    return optax.warmup_cosine_decay_schedule(
        init_value=0.0,
        peak_value=train.max_lr,
        warmup_steps=train.warmup_steps,
        decay_steps=max(train.max_steps, train.warmup_steps + 1),  # optax refuses an empty decay
        end_value=train.final_lr,
    )


def weight_decay_mask(params) -> object:
    """True for the parameters that decay: matrices and embeddings (rank >= 2), not biases or LayerNorms.

    JAX has no lm_head parameter (the tied head reuses wte's table), so wte appears once, as in torch.
    """
    return jax.tree.map(lambda p: p.ndim >= 2, params)


def make_optimizer(train: TrainConfig) -> optax.GradientTransformation:
    """Clip by global norm (when `grad_clip` > 0), then AdamW on the warmup-cosine schedule.

    optax counts its own steps inside the optimizer state, so the schedule needs no scheduler
    object: the state saved in a checkpoint carries the step the next update uses.
    """
    adamw = optax.adamw(
        lr_schedule(train),
        b1=train.beta1,
        b2=train.beta2,
        eps=train.eps,
        weight_decay=train.weight_decay,
        mask=weight_decay_mask,
    )
    if train.grad_clip > 0:
        return optax.chain(optax.clip_by_global_norm(train.grad_clip), adamw)
    return adamw
