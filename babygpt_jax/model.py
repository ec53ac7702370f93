"""GPT-2 in Flax NNX: modules that hold their parameters, used through pure functions.

The mirror of `babygpt_torch/model.py`: same classes, same attribute names (the Hugging Face GPT-2
layout), same order. Where the two differ it is the paradigm: Flax kernels are (in, out) like HF's
Conv1D, the compute dtype is an argument rather than an autocast context, and the KV cache is a
value passed in and returned rather than a buffer written in place.
"""

from __future__ import annotations

from functools import partial
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from flax.nnx.nn import dtypes

from babygpt.config import ModelConfig
from babygpt.hf import pad_vocab, read_hf_dir, unpad_vocab

KVCache = list[tuple[jax.Array, jax.Array]]  # per layer: keys, values (B, S, nh, hs)


def attention_implementation(dtype) -> str:
    """cuDNN flash attention on GPU in half precision; XLA's reference path otherwise.

    jax's default (None) picks the slow XLA path even on an H100, so ask for cuDNN explicitly.
    """
    return "cudnn" if jax.default_backend() == "gpu" and jnp.dtype(dtype).itemsize == 2 else "xla"


def _split_matmul(linear: nnx.Linear, x, parts: int) -> list[jax.Array]:
    """`jnp.split(linear(x), parts, axis=-1)`, computed as `parts` matmuls over the kernel's column blocks.

    Each matmul writes its own dense array. XLA hands a custom call such as cuDNN's attention only
    dense operands, so slices of one (B, T, 3C) output would each be copied out first (at 124M,
    B=32 on an H200: 0.87 ms of copies, 0.5 ms a step; docs/benchmarks.md). torch's SDPA takes
    the strided views.
    """
    kernel = linear.kernel[...]
    bias = linear.bias[...] if linear.bias is not None else None
    x, kernel, bias = dtypes.promote_dtype((x, kernel, bias), dtype=linear.dtype)
    biases = jnp.split(bias, parts) if bias is not None else [0] * parts
    return [x @ w + b for w, b in zip(jnp.split(kernel, parts, axis=1), biases)]


def _normal(std: float):
    return nnx.initializers.normal(stddev=std)


class CausalSelfAttention(nnx.Module):
    def __init__(self, config: ModelConfig, *, rngs: nnx.Rngs, dtype=jnp.float32):
        C, proj_std = config.n_embd, 0.02 * (2 * config.n_layer) ** -0.5
        self.n_head = config.n_head
        self.n_embd = config.n_embd
        self.implementation = attention_implementation(dtype)  # chosen once, for the training forward
        dense = dict(use_bias=config.bias, dtype=dtype, param_dtype=_master(dtype), rngs=rngs)
        self.c_attn = nnx.Linear(C, 3 * C, kernel_init=_normal(0.02), **dense)
        self.c_proj = nnx.Linear(C, C, kernel_init=_normal(proj_std), **dense)  # GPT-2: scaled residual init
        self.resid_dropout = nnx.Dropout(config.dropout, rngs=rngs)

    def __call__(self, x, kv_cache=None, pos=None):
        B, T, C = x.shape
        q, k, v = _split_matmul(self.c_attn, x, 3)  # (B, T, C) each: c_attn(x) split in three
        # jax's attention wants time before heads: (B, T, nh, hs), no transpose needed
        q = q.reshape(B, T, self.n_head, C // self.n_head)
        k = k.reshape(B, T, self.n_head, C // self.n_head)
        v = v.reshape(B, T, self.n_head, C // self.n_head)
        if kv_cache is None:
            y = jax.nn.dot_product_attention(q, k, v, is_causal=True, implementation=self.implementation)
        else:
            # Decoding: a new cache with this step's keys/values at pos..pos+T-1, attended over
            # whole with a mask hiding unwritten slots. The caller keeps the returned cache.
            k_cache, v_cache = kv_cache  # (B, S, nh, hs)
            k_cache = jax.lax.dynamic_update_slice_in_dim(k_cache, k.astype(k_cache.dtype), pos, axis=1)
            v_cache = jax.lax.dynamic_update_slice_in_dim(v_cache, v.astype(v_cache.dtype), pos, axis=1)
            index = pos + jnp.arange(T)
            mask = jnp.arange(k_cache.shape[1])[None, :] <= index[:, None]  # (T, S)
            y = jax.nn.dot_product_attention(
                q, k_cache.astype(q.dtype), v_cache.astype(q.dtype), mask=mask[None, None]
            )
            kv_cache = (k_cache, v_cache)
        y = y.reshape(B, T, C)  # re-assemble all head outputs side by side
        return self.resid_dropout(self.c_proj(y)), kv_cache


class MLP(nnx.Module):
    def __init__(self, config: ModelConfig, *, rngs: nnx.Rngs, dtype=jnp.float32):
        C, proj_std = config.n_embd, 0.02 * (2 * config.n_layer) ** -0.5
        dense = dict(use_bias=config.bias, dtype=dtype, param_dtype=_master(dtype), rngs=rngs)
        self.c_fc = nnx.Linear(C, 4 * C, kernel_init=_normal(0.02), **dense)
        self.c_proj = nnx.Linear(
            4 * C, C, kernel_init=_normal(proj_std), **dense
        )  # GPT-2: scaled residual init
        self.dropout = nnx.Dropout(config.dropout, rngs=rngs)

    def __call__(self, x):
        # GPT-2 used the tanh approximation. Rematerialised: autodiff would keep each of its
        # intermediates for the backward, several (B, T, 4C) arrays per layer; recomputing them
        # from the input costs no time on a GPU and saves 2.3 GiB at GPT-2 124M, B=32
        # (torch.compile's partitioner makes that choice by itself).
        x = jax.checkpoint(partial(nnx.gelu, approximate=True))(self.c_fc(x))
        return self.dropout(self.c_proj(x))


def _layer_norm(config: ModelConfig, rngs: nnx.Rngs, dtype) -> nnx.LayerNorm:
    # Statistics in float32 whatever the compute dtype (float64 in float64); the next Linear casts down.
    return nnx.LayerNorm(
        config.n_embd,
        epsilon=config.layer_norm_epsilon,
        use_bias=config.bias,
        dtype=_master(dtype),
        param_dtype=_master(dtype),
        rngs=rngs,
    )


def _master(dtype):
    """The dtype of weights, LayerNorm and the loss: float32 under bfloat16 or float32 compute
    (fp32 master weights), float64 under float64 (`train.dtype=float64`, for parity checks)."""
    return jnp.promote_types(dtype, jnp.float32)


class Block(nnx.Module):
    def __init__(self, config: ModelConfig, *, rngs: nnx.Rngs, dtype=jnp.float32):
        self.ln_1 = _layer_norm(config, rngs, dtype)
        self.attn = CausalSelfAttention(config, rngs=rngs, dtype=dtype)
        self.ln_2 = _layer_norm(config, rngs, dtype)
        self.mlp = MLP(config, rngs=rngs, dtype=dtype)

    def __call__(self, x, kv_cache=None, pos=None):
        y, kv_cache = self.attn(self.ln_1(x), kv_cache, pos)
        x = x + y
        x = x + self.mlp(self.ln_2(x))
        return x, kv_cache


class RematBlock(Block):
    """A Block that keeps only its input for the backward pass and runs again for the rest (train.remat)."""

    def __call__(self, x, kv_cache=None, pos=None):
        return nnx.remat(Block.__call__)(self, x, kv_cache, pos)


class GPT(nnx.Module):
    def __init__(self, config: ModelConfig, *, rngs: nnx.Rngs, dtype=jnp.float32, remat: bool = False):
        self.config = config
        self.dtype = dtype
        V = config.padded_vocab_size
        block = RematBlock if remat else Block  # remat: less memory, a second forward in backward
        embed = dict(
            embedding_init=_normal(0.02), dtype=_master(dtype), param_dtype=_master(dtype), rngs=rngs
        )
        self.transformer = nnx.Dict(
            wte=nnx.Embed(V, config.n_embd, **embed),
            wpe=nnx.Embed(config.block_size, config.n_embd, **embed),
            drop=nnx.Dropout(config.dropout, rngs=rngs),
            h=nnx.List([block(config, rngs=rngs, dtype=dtype) for _ in range(config.n_layer)]),
            ln_f=_layer_norm(config, rngs, dtype),
        )
        # No lm_head module: weight tying is reusing wte's table in `head`.

    def __call__(self, idx, targets=None):
        """(logits, loss): the logits over the tokenizer's vocabulary (B, T, vocab_size), without
        the padding, and with targets the mean loss, which carries the gradient. Then the logits
        come back without one (as in the torch model, where a gradient path through them costs the
        backward a pass; under jit XLA drops what nothing reads either way)."""
        logits, _ = self._logits(idx, mask=False)  # (B, T, V), the padding not masked
        if targets is None:
            return logits[..., : self.config.vocab_size], None
        # The loss in float32 whatever the compute dtype. It masks the padding itself, inside its
        # own passes over the logits, so no masked copy is stored for the backward pass.
        loss = training_loss(logits, targets, self.config.vocab_size)
        return jax.lax.stop_gradient(logits[..., : self.config.vocab_size]), loss

    def decode(self, idx, kv_cache: KVCache, pos, at=None):
        """Logits for idx at positions pos.., and the kv_cache extended by them (a new value). With
        `at`, only those of idx's column `at` (B, 1, V): all a sampler reads after a prefill. The
        head over every column would be a third of a 124M prefill's FLOPs and a (B, T, V) buffer."""
        return self._logits(idx, kv_cache, pos, at=at)

    def _logits(self, idx, kv_cache=None, pos=0, mask=True, at=None):
        B, T = idx.shape
        positions = pos + jnp.arange(T)
        x = self.transformer.drop(self.transformer.wte(idx) + self.transformer.wpe(positions))  # (B, T, C)
        new_cache = []
        for i, block in enumerate(self.transformer.h):
            x, layer_cache = block(x, None if kv_cache is None else kv_cache[i], pos)
            new_cache.append(layer_cache)
        if at is not None:
            x = jax.lax.dynamic_slice_in_dim(x, at, 1, axis=1)  # (B, 1, C)
        logits = self.head(self.transformer.ln_f(x), mask)  # (B, T, V)
        return logits, None if kv_cache is None else new_cache

    def head(self, x, mask=True):
        """The tied lm_head: logits over the padded vocabulary, from wte's table; the padded entries
        -inf (mask=False leaves them to the loss, which masks them itself)."""
        wte = self.transformer.wte.embedding[...]
        logits = x.astype(self.dtype) @ wte.astype(self.dtype).T  # (..., V)
        return mask_padding(logits, self.config.vocab_size) if mask else logits

    def init_cache(self, batch_size: int, max_len: int, dtype=jnp.float32) -> KVCache:
        c = self.config
        shape = (batch_size, max_len, c.n_head, c.head_dim)
        return [(jnp.zeros(shape, dtype), jnp.zeros(shape, dtype)) for _ in range(c.n_layer)]

    def num_params(self) -> int:
        params = nnx.state(self, nnx.Param)
        return sum(x.size for x in jax.tree_util.tree_leaves(params))

    @classmethod
    def from_pretrained(cls, hf_dir: str | Path, dtype=jnp.float32) -> GPT:
        """A Hugging Face GPT-2 directory (config.json + model.safetensors), e.g. OpenAI's weights."""
        config, tensors = read_hf_dir(hf_dir)
        model = cls(config, rngs=nnx.Rngs(0), dtype=dtype)  # every weight is overwritten next
        load_hf_tensors(model, tensors)
        return model


def mask_padding(logits, vocab_size: int):
    """-inf at the entries past the tokenizer's vocabulary (they exist only to make V a multiple of
    64), so that they take no probability mass."""
    padding = jnp.arange(logits.shape[-1]) >= vocab_size
    return jnp.where(padding, -jnp.inf, logits)


def training_loss(logits, targets, vocab_size: int):
    """cross_entropy below, or on one GPU the same two passes over the logits as two hand-written
    kernels (`babygpt_jax/kernels.py`), each reading them once: faster than XLA's fusions of the
    expression (docs/performance.md). Over several devices the expression, which XLA splits along
    the batch; a kernel is one custom call that it would run whole on every device. The kernels
    sum in float32, so float64 keeps the expression too."""
    if jax.default_backend() == "gpu" and jax.device_count() == 1 and logits.dtype != jnp.float64:
        from babygpt_jax import kernels

        return kernels.cross_entropy(logits, targets, vocab_size)
    return cross_entropy(logits, targets, vocab_size)


@partial(jax.custom_vjp, nondiff_argnums=(2,))
def cross_entropy(logits, targets, vocab_size: int):
    """The mean of -log softmax(logits)[target] over the first vocab_size entries, in float32
    (float64 under float64) whatever the logits' dtype. Its gradient is written out,
    (softmax - one_hot) / N, rather than derived by autodiff, which kept float32 copies of the
    (B, T, V) logits, scattered the target's -1 into a zero tensor of that size and stored the
    masked logits: one fused pass over the logits, and nothing logits-sized kept but them (at
    124M, B=32: 2.7 ms and 3.1 GiB less a step, docs/performance.md)."""
    return _cross_entropy_fwd(logits, targets, vocab_size)[0]


def _cross_entropy_fwd(logits, targets, vocab_size):
    wide = mask_padding(logits.astype(_master(logits.dtype)), vocab_size)
    logz = jax.nn.logsumexp(wide, axis=-1)  # (B, T)
    target_logit = jnp.take_along_axis(wide, targets[..., None], axis=-1)[..., 0]  # (B, T)
    return jnp.mean(logz - target_logit), (logits, targets, logz)


def _cross_entropy_bwd(vocab_size, saved, g):
    logits, targets, logz = saved
    wide = mask_padding(logits.astype(logz.dtype), vocab_size)
    softmax = jnp.exp(wide - logz[..., None])  # the padding: exp(-inf) = 0
    one_hot = jnp.arange(logits.shape[-1]) == targets[..., None]
    grad = (softmax - one_hot) * (g / targets.size)  # (B, T, V)
    return grad.astype(logits.dtype), None  # integer targets have no gradient


cross_entropy.defvjp(_cross_entropy_fwd, _cross_entropy_bwd)


# Flax names the HF tensors differently: kernel / scale / embedding instead of weight.
_LEAF_NAMES = {"kernel": "weight", "scale": "weight", "embedding": "weight", "bias": "bias"}


def _hf_name(path: tuple) -> str:
    *parents, leaf = (str(p) for p in path)
    return ".".join([*parents, _LEAF_NAMES[leaf]])


def hf_tensors(model: GPT) -> dict[str, np.ndarray]:
    """The weights in Hugging Face GPT-2 layout: (in, out) kernels already, unpadded vocabulary."""
    state = nnx.to_flat_state(nnx.state(model, nnx.Param))
    out = {_hf_name(path): np.asarray(param[...], dtype=np.float32) for path, param in state}
    return unpad_vocab(out, model.config)


def load_hf_tensors(model: GPT, tensors: dict[str, np.ndarray]) -> None:
    tensors = pad_vocab(tensors, model.config)
    state = nnx.state(model, nnx.Param)
    for path, param in nnx.to_flat_state(state):
        param[...] = jnp.asarray(tensors[_hf_name(path)], dtype=param.dtype)
    nnx.update(model, state)
