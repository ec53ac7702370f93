"""The PyTorch GPT-2: shapes, GPT-2's initialization, weight tying, causality, padding, KV cache."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn as nn

from babygpt.config import ModelConfig
from babygpt.flops import num_params
from babygpt_torch.model import GPT, RematBlock


@pytest.fixture(scope="module")
def model() -> GPT:
    torch.manual_seed(0)
    config = ModelConfig(n_layer=2, n_head=2, n_embd=32, block_size=16, vocab_size=100, vocab_multiple=64)
    return GPT(config).eval()


def test_shapes(model):
    idx = torch.randint(0, 100, (3, 16))
    logits, loss = model(idx)
    assert logits.shape == (3, 16, 100)  # the padding (100 -> 128) stays inside
    assert loss is None
    logits, loss = model(idx, idx)
    assert loss.shape == () and loss.dtype == torch.float32
    assert logits.shape == (3, 16, 100) and not logits.requires_grad  # only the loss carries a gradient
    assert loss.requires_grad


def test_init_statistics_are_gpt2s():
    torch.manual_seed(0)
    config = ModelConfig(n_layer=4, n_head=4, n_embd=128, block_size=64, vocab_size=1000)
    m = GPT(config)
    residual_std = 0.02 / math.sqrt(2 * config.n_layer)
    for name, p in m.named_parameters():
        if name.endswith("c_proj.weight"):
            # >= 16k samples each: the sample std is within 1% of sigma; 5% leaves no flakiness
            assert p.std().item() == pytest.approx(residual_std, rel=0.05), name
        elif name.endswith(("c_attn.weight", "c_fc.weight", "wte.weight", "wpe.weight")):
            assert p.std().item() == pytest.approx(0.02, rel=0.05), name
            assert abs(p.mean().item()) < 1e-3, name
        elif "ln_" in name and name.endswith("weight"):
            assert torch.equal(p, torch.ones_like(p)), name
        elif name.endswith("bias"):
            assert torch.equal(p, torch.zeros_like(p)), name
        else:
            raise AssertionError(f"unexpected parameter {name}")


def _module_wise_init(model: GPT) -> None:
    """The init before it went by parameter name: nanoGPT's `apply` over modules, c_proj found by identity."""
    projections = {id(m) for b in model.transformer.h for m in (b.attn.c_proj, b.mlp.c_proj)}

    def init(module):
        if isinstance(module, nn.Linear):
            std = 0.02 * ((2 * model.config.n_layer) ** -0.5 if id(module) in projections else 1.0)
            nn.init.normal_(module.weight, mean=0.0, std=std)
            if module.bias is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, nn.Embedding):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)

    model.apply(init)


def test_init_by_name_draws_the_weights_module_wise_init_drew(monkeypatch):
    config = ModelConfig(n_layer=2, n_head=2, n_embd=32, block_size=16, vocab_size=100)
    torch.manual_seed(3)
    by_name = GPT(config)
    monkeypatch.setattr(GPT, "_init_weights", _module_wise_init)
    torch.manual_seed(3)
    module_wise = GPT(config)
    for (name, a), b in zip(by_name.state_dict().items(), module_wise.state_dict().values(), strict=True):
        assert torch.equal(a, b), name  # bit for bit: the same draws in the same order


def test_lm_head_is_tied_to_wte(model):
    assert model.lm_head.weight is model.transformer.wte.weight
    names = [n for n, _ in model.named_parameters()]
    assert "transformer.wte.weight" in names and "lm_head.weight" not in names  # counted once


def test_parameter_count_matches_the_flops_formula():
    with torch.device("meta"):  # GPT-2 124M without allocating it
        gpt2 = GPT(ModelConfig.preset("gpt2"))
    assert gpt2.num_params() == num_params(gpt2.config) == 124_475_904


@torch.no_grad()
def test_a_future_token_never_changes_an_earlier_logit(model):
    idx = torch.randint(0, 100, (2, 16))
    changed = idx.clone()
    changed[:, 10] = (idx[:, 10] + 1) % 100
    a, _ = model(idx)
    b, _ = model(changed)
    # positions before 10 compute the same sums over the same values: equal to float32 rounding
    torch.testing.assert_close(a[:, :10], b[:, :10], rtol=0, atol=1e-6)
    assert not torch.allclose(a[:, 10:], b[:, 10:])


@torch.no_grad()
def test_padded_logits_are_minus_inf_and_never_win(model):
    logits = model.head(torch.randn(2, 16, model.config.n_embd))  # what decoding samples from
    assert logits.shape == (2, 16, 128)
    assert torch.isneginf(logits[..., 100:]).all()
    assert torch.isfinite(logits[..., :100]).all()
    assert (logits.argmax(-1) < 100).all()


@torch.no_grad()
def test_fresh_model_loss_is_ln_vocab():
    torch.manual_seed(0)
    config = ModelConfig(n_layer=2, n_head=2, n_embd=32, block_size=16)  # the real 50257 vocabulary
    m = GPT(config).eval()
    idx = torch.randint(0, 50257, (4, 16))
    _, loss = m(idx, torch.randint(0, 50257, (4, 16)))
    # small init gives near-uniform predictions over the 50257 real tokens (padding takes no mass)
    assert loss.item() == pytest.approx(math.log(50257), abs=0.1)


@torch.no_grad()
def test_kv_cache_decode_equals_full_forward(model):
    idx = torch.randint(0, 100, (2, 12))
    full, _ = model(idx)
    cache = model.init_cache(2, 16)
    prefix, cache = model.decode(idx[:, :5], cache, 0)  # the prompt in one call
    steps = [prefix]
    for t in range(5, 12):  # then one token at a time
        logits, cache = model.decode(idx[:, t : t + 1], cache, t)
        steps.append(logits)
    decoded = torch.cat(steps, dim=1)
    # same math, different summation order in attention over the cache: float32 rounding only
    torch.testing.assert_close(decoded[..., :100], full[..., :100], rtol=1e-5, atol=1e-5)


def test_remat_computes_the_same_loss_and_gradients(model):
    remat = GPT(model.config, remat=True).eval()
    remat.load_state_dict(model.state_dict())
    assert isinstance(remat.transformer.h[0], RematBlock)
    assert not isinstance(model.transformer.h[0], RematBlock)
    idx = torch.randint(0, 100, (2, 16))
    losses, grads = [], []
    for m in (model, remat):
        m.zero_grad()
        _, loss = m(idx, idx)
        loss.backward()
        losses.append(loss.item())
        grads.append([p.grad.clone() for p in m.parameters()])
    # Recomputation replays the same float32 ops in the same order: equal bit for bit.
    assert losses[0] == losses[1]
    for a, b in zip(*grads, strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    model.zero_grad(set_to_none=True)


@torch.no_grad()
def test_non_contiguous_targets_are_accepted(model):
    idx = torch.randint(0, 100, (2, 16))
    targets = torch.randint(0, 100, (16, 2)).T  # a transposed view, as transformers accepts
    assert not targets.is_contiguous()
    _, loss = model(idx, targets)
    _, expected = model(idx, targets.contiguous())
    assert loss.item() == expected.item()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cross_entropy_gradient_is_softmax_minus_one_hot(dtype):
    """The loss's written-out gradient against F.cross_entropy's autograd over the masked logits:
    the loss is given them unmasked and ignores the padding itself."""
    from babygpt_torch.model import cross_entropy

    g = torch.Generator().manual_seed(0)
    logits = (3 * torch.randn(2, 5, 128, generator=g)).to(dtype).requires_grad_()  # padding finite
    targets = torch.randint(0, 100, (2, 5), generator=g)
    loss = cross_entropy(logits, targets, 100)
    (grad,) = torch.autograd.grad(loss, logits)
    masked = logits.detach().float().masked_fill(torch.arange(128) >= 100, float("-inf"))
    reference = masked.requires_grad_()
    want_loss = torch.nn.functional.cross_entropy(reference.reshape(-1, 128), targets.reshape(-1))
    (want_grad,) = torch.autograd.grad(want_loss, reference)
    assert grad.dtype == dtype  # the gradient in the logits' dtype, as autograd gives it
    assert abs(loss.item() - want_loss.item()) < 1e-6
    tol = 1e-7 if dtype == torch.float32 else 2e-3  # bf16: one rounding of values below 1/10
    torch.testing.assert_close(grad.float(), want_grad.to(grad.dtype).float(), atol=tol, rtol=0)
    assert not grad[..., 100:].any()  # no gradient into the padding
