"""GPT-2 in PyTorch: stateful modules, autograd, in-place KV cache.

The mirror of `babygpt_jax/model.py`: same classes, same attribute names (the Hugging Face GPT-2
layout), same order. Where the two differ it is the paradigm: `nn.Linear` stores weights as
(out, in) and autocast chooses the compute dtype from outside, while Flax stores kernels as
(in, out) and takes `dtype` as an argument.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from babygpt.config import ModelConfig
from babygpt.hf import CONV1D_WEIGHTS, pad_vocab, read_hf_dir, unpad_vocab

KVCache = list[tuple[torch.Tensor, torch.Tensor]]  # per layer: keys, values (B, nh, S, hs)


class CausalSelfAttention(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        self.n_head = config.n_head
        self.n_embd = config.n_embd
        self.c_attn = nn.Linear(config.n_embd, 3 * config.n_embd, bias=config.bias)
        self.c_proj = nn.Linear(config.n_embd, config.n_embd, bias=config.bias)
        self.resid_dropout = nn.Dropout(config.dropout)

    def forward(self, x, kv_cache=None, pos=None):
        B, T, C = x.size()
        q, k, v = self.c_attn(x).split(self.n_embd, dim=2)
        # torch's SDPA wants heads before time: (B, nh, T, hs)
        q = q.view(B, T, self.n_head, C // self.n_head).transpose(1, 2)
        k = k.view(B, T, self.n_head, C // self.n_head).transpose(1, 2)
        v = v.view(B, T, self.n_head, C // self.n_head).transpose(1, 2)
        if kv_cache is None:
            y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        else:
            # Decoding: write this step's keys/values at pos..pos+T-1 of the preallocated cache
            # (in place), then attend over the whole cache with a mask hiding unwritten slots.
            k_cache, v_cache = kv_cache  # (B, nh, S, hs)
            index = pos + torch.arange(T, device=x.device)
            k_cache.index_copy_(2, index, k.to(k_cache.dtype))
            v_cache.index_copy_(2, index, v.to(v_cache.dtype))
            mask = torch.arange(k_cache.size(2), device=x.device)[None, :] <= index[:, None]  # (T, S)
            y = F.scaled_dot_product_attention(q, k_cache.to(q.dtype), v_cache.to(q.dtype), attn_mask=mask)
        y = y.transpose(1, 2).contiguous().view(B, T, C)  # re-assemble all head outputs side by side
        return self.resid_dropout(self.c_proj(y)), kv_cache


class MLP(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        self.c_fc = nn.Linear(config.n_embd, 4 * config.n_embd, bias=config.bias)
        self.c_proj = nn.Linear(4 * config.n_embd, config.n_embd, bias=config.bias)
        self.dropout = nn.Dropout(config.dropout)

    def forward(self, x):
        x = F.gelu(self.c_fc(x), approximate="tanh")  # GPT-2 used the tanh approximation
        return self.dropout(self.c_proj(x))


class Block(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        self.ln_1 = nn.LayerNorm(config.n_embd, eps=config.layer_norm_epsilon, bias=config.bias)
        self.attn = CausalSelfAttention(config)
        self.ln_2 = nn.LayerNorm(config.n_embd, eps=config.layer_norm_epsilon, bias=config.bias)
        self.mlp = MLP(config)

    def forward(self, x, kv_cache=None, pos=None):
        y, kv_cache = self.attn(self.ln_1(x), kv_cache, pos)
        x = x + y
        x = x + self.mlp(self.ln_2(x))
        return x, kv_cache


class RematBlock(Block):
    """A Block that keeps only its input for the backward pass and runs again for the rest (train.remat)."""

    def forward(self, x, kv_cache=None, pos=None):
        return torch.utils.checkpoint.checkpoint(super().forward, x, kv_cache, pos, use_reentrant=False)


class GPT(nn.Module):
    def __init__(self, config: ModelConfig, *, remat: bool = False):
        super().__init__()
        self.config = config
        V = config.padded_vocab_size
        block = RematBlock if remat else Block  # remat: less memory, a second forward in backward
        self.transformer = nn.ModuleDict(
            dict(
                wte=nn.Embedding(V, config.n_embd),
                wpe=nn.Embedding(config.block_size, config.n_embd),
                drop=nn.Dropout(config.dropout),
                h=nn.ModuleList([block(config) for _ in range(config.n_layer)]),
                ln_f=nn.LayerNorm(config.n_embd, eps=config.layer_norm_epsilon, bias=config.bias),
            )
        )
        self.lm_head = nn.Linear(config.n_embd, V, bias=False)
        self.transformer.wte.weight = self.lm_head.weight  # weight tying
        self._init_weights()

    @torch.no_grad()
    def _init_weights(self):
        """GPT-2's init by parameter name: normal(0, 0.02), zero biases, LayerNorm left at (1, 0).

        The tied table is met twice (as wte, then as lm_head, whose draw it keeps): the draws of
        nanoGPT's module-by-module init in the same order, so a seed gives the same weights.
        """
        for name, param in self.named_parameters(remove_duplicate=False):
            if name.endswith("c_proj.weight"):  # GPT-2: scale the residual projections
                nn.init.normal_(param, mean=0.0, std=0.02 * (2 * self.config.n_layer) ** -0.5)
            elif name.endswith(".bias"):
                nn.init.zeros_(param)
            elif param.dim() == 2:  # Linear and Embedding weights
                nn.init.normal_(param, mean=0.0, std=0.02)

    def forward(self, idx, targets=None):
        """(logits, loss): the logits over the tokenizer's vocabulary (B, T, vocab_size), a view
        without the padding, and with targets the mean loss, which carries the gradient. Then the
        logits come back detached: a gradient path through them would cost the compiled backward a
        zero-filled tangent and a pass over it, logits-sized (3 GiB at 124M, B=32)."""
        logits, _ = self._logits(idx, mask=False)  # (B, T, V), the padding not masked
        if targets is None:
            return logits[..., : self.config.vocab_size], None
        # The loss in float32 whatever the compute dtype. It masks the padding itself, inside its
        # own passes over the logits, so no masked copy is stored for the backward pass.
        loss = training_loss(logits, targets, self.config.vocab_size)
        return logits[..., : self.config.vocab_size].detach(), loss

    def decode(self, idx, kv_cache: KVCache, pos, at=None):
        """Logits for idx at positions pos.., reading and extending kv_cache (in place). With `at`,
        only those of idx's column `at` (B, 1, V): all a sampler reads after a prefill. The head
        over every column would be a third of a 124M prefill's FLOPs and a (B, T, V) buffer."""
        return self._logits(idx, kv_cache, pos, at=at)

    def _logits(self, idx, kv_cache=None, pos=0, mask=True, at=None):
        B, T = idx.size()
        positions = pos + torch.arange(T, device=idx.device)
        x = self.transformer.drop(self.transformer.wte(idx) + self.transformer.wpe(positions))  # (B, T, C)
        for i, block in enumerate(self.transformer.h):
            x, _ = block(x, None if kv_cache is None else kv_cache[i], pos)
        if at is not None:
            x = x.narrow(1, at, 1)  # (B, 1, C)
        logits = self.head(self.transformer.ln_f(x), mask)  # (B, T, V)
        return logits, kv_cache

    def head(self, x, mask=True):
        """The tied lm_head: logits over the padded vocabulary; the padded entries -inf (mask=False
        leaves them to the loss, which masks them itself)."""
        logits = self.lm_head(x)  # (..., V)
        return mask_padding(logits, self.config.vocab_size) if mask else logits

    def init_cache(self, batch_size: int, max_len: int, dtype=torch.float32) -> KVCache:
        c = self.config
        shape = (batch_size, c.n_head, max_len, c.head_dim)
        device = self.lm_head.weight.device
        return [
            (torch.zeros(shape, dtype=dtype, device=device), torch.zeros(shape, dtype=dtype, device=device))
            for _ in range(c.n_layer)
        ]

    def num_params(self) -> int:
        return sum(p.numel() for p in self.parameters())  # tied wte/lm_head counted once

    @classmethod
    def from_pretrained(cls, hf_dir: str | Path) -> GPT:
        """A Hugging Face GPT-2 directory (config.json + model.safetensors), e.g. OpenAI's weights."""
        config, tensors = read_hf_dir(hf_dir)
        model = cls(config)
        load_hf_tensors(model, tensors)
        return model


def mask_padding(logits, vocab_size: int):
    """-inf at the entries past the tokenizer's vocabulary (they exist only to make V a multiple of
    64), so that they take no probability mass. A copy with its last columns overwritten: on a CPU,
    `masked_fill` with a (V,) mask took three times as long over the default run's logits."""
    masked = logits.clone()
    masked[..., vocab_size:] = float("-inf")
    return masked


def training_loss(logits, targets, vocab_size: int):
    """cross_entropy below, or on a GPU the same two passes over the logits as two hand-written
    kernels (`babygpt_torch/kernels.py`), each reading them once: faster than what torch.compile
    makes of the expression (docs/performance.md). They sum in float32, so float64 keeps the
    expression."""
    if logits.is_cuda and logits.dtype != torch.float64:
        from babygpt_torch import kernels  # Triton comes with torch's CUDA builds

        return kernels.cross_entropy(logits, targets, vocab_size)
    return cross_entropy(logits, targets, vocab_size)


def cross_entropy(logits, targets, vocab_size: int):
    """The mean of -log softmax(logits)[target] over the first vocab_size entries, in float32
    (float64 under float64) whatever the logits' dtype. Its gradient is written out,
    (softmax - one_hot) / N, as in the JAX model, where autodiff kept float32 copies of the
    logits; here F.cross_entropy is a fused op already, but under torch.compile the written-out
    form measured 0.85 ms a step faster at 124M, B=32 (docs/performance.md)."""
    return _CrossEntropy.apply(logits, targets, vocab_size)


class _CrossEntropy(torch.autograd.Function):
    # XLA fuses JAX's expression into one pass over the (B, T, V) logits; eager torch runs each op
    # as a pass of its own into a fresh logits-sized buffer. So the masked copy is the one buffer,
    # and the rest happens in it, in place (on a CPU, most of the step is these passes).

    @staticmethod
    def forward(ctx, logits, targets, vocab_size):
        wide = mask_padding(logits.to(torch.promote_types(logits.dtype, torch.float32)), vocab_size)
        target_logit = wide.gather(-1, targets[..., None])[..., 0]  # (B, T)
        top = wide.amax(dim=-1, keepdim=True)  # logsumexp, in place: wide is not needed after it
        logz = wide.sub_(top).exp_().sum(dim=-1).log_() + top[..., 0]  # (B, T)
        ctx.save_for_backward(logits, targets, logz)
        ctx.vocab_size = vocab_size
        return (logz - target_logit).mean()

    @staticmethod
    def backward(ctx, g):
        logits, targets, logz = ctx.saved_tensors
        wide = mask_padding(logits.to(logz.dtype), ctx.vocab_size)
        softmax = wide.sub_(logz[..., None]).exp_()  # the padding: exp(-inf) = 0
        minus_one = torch.full_like(targets[..., None], -1, dtype=softmax.dtype)
        grad = softmax.scatter_add_(-1, targets[..., None], minus_one)  # - one_hot, at the targets only
        grad.mul_(g / targets.numel())  # (B, T, V)
        return grad.to(logits.dtype), None, None  # integer targets have no gradient


def hf_tensors(model: GPT) -> dict[str, np.ndarray]:
    """The weights in Hugging Face GPT-2 layout: Conv1D (in, out) kernels, unpadded vocabulary."""
    out = {}
    for name, tensor in model.state_dict().items():
        if name == "lm_head.weight":
            continue  # tied to transformer.wte.weight
        array = tensor.detach().float().cpu().numpy().copy()  # a snapshot, not a view of live weights
        out[name] = np.ascontiguousarray(array.T if name.endswith(CONV1D_WEIGHTS) else array)
    return unpad_vocab(out, model.config)


def load_hf_tensors(model: GPT, tensors: dict[str, np.ndarray]) -> None:
    tensors = pad_vocab(tensors, model.config)
    state = {}
    for name in model.state_dict():
        if name == "lm_head.weight":
            continue
        array = tensors[name].T if name.endswith(CONV1D_WEIGHTS) else tensors[name]
        state[name] = torch.from_numpy(np.ascontiguousarray(array, dtype=np.float32))
    state["lm_head.weight"] = state["transformer.wte.weight"]
    model.load_state_dict(state)
