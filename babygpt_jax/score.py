"""Completion log-likelihoods for JAX: the model half of the benchmark evaluations.

The mirror of `babygpt_torch/score.py`. `babygpt.eval.hellaswag` renders examples into (N, T) token
rows with a mask over the completion; this scores every row in one forward pass of a jitted pure
function of (graphdef, params, tokens, mask), where torch runs the module eagerly under no_grad.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from babygpt_jax.model import GPT


def prepare_model(model: GPT) -> GPT:
    """Evaluation mode (no dropout); jax places the parameters on the default device itself."""
    model.eval()
    return model


@functools.partial(jax.jit, static_argnums=0)
def _completion_losses(graphdef, state, tokens, mask):
    model = nnx.merge(graphdef, state)
    logits, _ = model(tokens)  # (N, T, V)
    logits = logits[:, :-1].astype(jnp.float32)  # (N, T-1, V)
    targets = tokens[:, 1:]
    losses = (
        jax.nn.logsumexp(logits, axis=-1) - jnp.take_along_axis(logits, targets[..., None], axis=-1)[..., 0]
    )
    scored = mask[:, 1:].astype(jnp.float32)  # (N, T-1)
    total = (losses * scored).sum(axis=1)
    return total, total / scored.sum(axis=1)


def completion_losses(model: GPT, tokens: np.ndarray, mask: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per row: the summed and the mean cross-entropy of the tokens where `mask` is 1.

    Position t's logits predict token t+1, so the loss of token t is read from row t-1's logits
    and the first token of a row is never scored. float32 throughout.
    """
    graphdef, state = nnx.split(model)
    total, mean = _completion_losses(graphdef, state, jnp.asarray(tokens, jnp.int32), jnp.asarray(mask))
    return np.asarray(total), np.asarray(mean)
