"""AdamW with linear warmup and cosine decay, in JAX: a chain of optax gradient transformations.

The mirror of `babygpt_torch/optim.py`, which builds the same thing from `torch.optim.AdamW` and a
`LambdaLR`. Here the schedule is a function of the traced step, the decay mask is a pytree
of booleans shaped like the parameters, and the optimizer is a pure `(init, update)` pair whose
state is a pytree the train step carries, shards and checkpoints like the parameters.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import optax

from babygpt.config import TrainConfig


def lr_schedule(train: TrainConfig) -> optax.Schedule:
    """The learning rate at optimizer step s: linear warmup from 0, cosine decay to `final_lr`.

    Written out as torch's is rather than taken from optax: `warmup_cosine_decay_schedule` writes the
    warmup as (0 - max_lr) * (1 - s / warmup) + max_lr, which in float32 loses up to 2e-6 of the rate
    to cancellation in the first steps; written this way the two backends' rates agree to ~1e-7.
    """
    max_lr, final_lr, warmup = train.max_lr, train.final_lr, train.warmup_steps
    decay_steps = max(1, train.max_steps - warmup)  # 1 gives final_lr at once

    def lr(step):
        step = jnp.asarray(step, float)  # float32 (float64 under jax_enable_x64)
        progress = jnp.minimum(step - warmup, decay_steps) / decay_steps  # final_lr past max_steps
        cosine = final_lr + (max_lr - final_lr) * 0.5 * (1.0 + jnp.cos(jnp.pi * progress))
        return jnp.where(step < warmup, max_lr * step / warmup, cosine)

    return lr


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
