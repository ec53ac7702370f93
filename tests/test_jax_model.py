"""The Flax NNX GPT-2 on its own: shapes, GPT-2 init, causality, padded vocabulary, KV cache, bf16."""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from babygpt.config import ModelConfig
from babygpt_jax.model import GPT, RematBlock, _split_matmul

TINY = ModelConfig(n_layer=2, n_head=2, n_embd=32, block_size=16, vocab_size=100, vocab_multiple=64)


@pytest.fixture(scope="module")
def model() -> GPT:
    return GPT(TINY, rngs=nnx.Rngs(0))


@pytest.fixture(scope="module")
def forward(model):
    return nnx.jit(lambda m, idx, targets: m(idx, targets))


def _tokens(B: int, T: int, seed: int = 0, vocab: int = TINY.vocab_size) -> jnp.ndarray:
    return jnp.asarray(np.random.default_rng(seed).integers(0, vocab, (B, T)), dtype=jnp.int32)


def test_logits_shape_is_batch_time_vocab(model, forward):
    idx = _tokens(3, 16)
    logits, loss = forward(model, idx, idx)
    assert logits.shape == (3, 16, TINY.vocab_size)  # the padding (100 -> 128) stays inside
    assert loss.shape == ()


def test_with_targets_only_the_loss_carries_a_gradient(model):
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)

    def total(params, idx):
        logits, loss = nnx.merge(graphdef, params, rest)(idx, idx)
        return jnp.sum(logits), loss

    idx = _tokens(2, 8)
    grads = jax.jit(
        lambda p: (jax.grad(lambda p: total(p, idx)[0])(p), jax.grad(lambda p: total(p, idx)[1])(p))
    )
    through_logits, through_loss = grads(params)
    assert all(np.all(g == 0) for g in jax.tree.leaves(through_logits))
    assert any(np.any(g != 0) for g in jax.tree.leaves(through_loss))


def test_init_follows_gpt2(model):
    blocks = model.transformer.h
    proj_std = 0.02 / math.sqrt(2 * TINY.n_layer)
    # Sample std of n normal draws is within a few percent of the truth for n >= 1024; 15% is loose.
    for matrix, std in [
        (model.transformer.wte.embedding[...], 0.02),
        (model.transformer.wpe.embedding[...], 0.02),
        (np.concatenate([np.ravel(b.attn.c_attn.kernel[...]) for b in blocks]), 0.02),
        (np.concatenate([np.ravel(b.mlp.c_fc.kernel[...]) for b in blocks]), 0.02),
        (np.concatenate([np.ravel(b.attn.c_proj.kernel[...]) for b in blocks]), proj_std),
        (np.concatenate([np.ravel(b.mlp.c_proj.kernel[...]) for b in blocks]), proj_std),
    ]:
        assert abs(float(np.std(matrix)) - std) < 0.15 * std
        assert abs(float(np.mean(matrix))) < 0.15 * std
    for b in blocks:
        for linear in (b.attn.c_attn, b.attn.c_proj, b.mlp.c_fc, b.mlp.c_proj):
            assert not np.any(linear.bias[...])
        for ln in (b.ln_1, b.ln_2):
            assert np.all(ln.scale[...] == 1.0) and not np.any(ln.bias[...])


def test_future_tokens_do_not_change_past_logits(model, forward):
    a = _tokens(1, 16, seed=1)
    b = a.at[:, 10:].set(_tokens(1, 6, seed=2))
    la, _ = forward(model, a, a)
    lb, _ = forward(model, b, b)
    np.testing.assert_array_equal(la[:, :10], lb[:, :10])  # the same computation: bitwise equal
    assert not np.allclose(la[:, 10:, :100], lb[:, 10:, :100])


def test_the_head_gives_the_padding_minus_inf(model):
    logits = model.head(jnp.asarray(np.random.default_rng(0).normal(size=(2, 8, TINY.n_embd)), jnp.float32))
    assert logits.shape == (2, 8, TINY.padded_vocab_size)
    assert np.all(np.isneginf(logits[..., TINY.vocab_size :]))
    assert np.all(np.isfinite(logits[..., : TINY.vocab_size]))


def test_fresh_model_loss_is_log_vocab():
    # With the real vocabulary: a fresh model predicts nearly uniformly over 50257 tokens.
    config = ModelConfig(n_layer=2, n_head=2, n_embd=32, block_size=16)
    model = GPT(config, rngs=nnx.Rngs(0))
    idx = _tokens(4, 16, vocab=config.vocab_size)
    targets = _tokens(4, 16, seed=1, vocab=config.vocab_size)  # not idx: the tied wte favours the input
    _, loss = model(idx, targets)
    # Init logits are small (std ~0.1), moving the loss off ln(50257) by far less than 0.1 nats.
    assert abs(float(loss) - math.log(50257)) < 0.1


def test_kv_cache_logits_equal_full_forward(model, forward):
    idx = _tokens(2, 12, seed=3)
    full, _ = forward(model, idx, idx)
    decode = nnx.jit(lambda m, tok, cache, pos: m.decode(tok, cache, pos))
    cache = model.init_cache(2, TINY.block_size)
    logits, cache = decode(model, idx[:, :5], cache, 0)  # the prompt in one go
    steps = [logits]
    for t in range(5, 12):  # then one token at a time
        logits, cache = decode(model, idx[:, t : t + 1], cache, t)
        steps.append(logits)
    cached = jnp.concatenate(steps, axis=1)
    # float32 with a different summation order (masked full-cache attention): 1e-5 absolute.
    np.testing.assert_allclose(cached[..., :100], full[..., :100], atol=1e-5, rtol=1e-5)


def test_bfloat16_compute_keeps_float32_params(model, forward):
    bf16 = GPT(TINY, rngs=nnx.Rngs(0), dtype=jnp.bfloat16)
    idx = _tokens(2, 16)
    logits, loss = forward(bf16, idx, idx)
    _, ref_loss = forward(model, idx, idx)
    assert logits.dtype == jnp.bfloat16
    assert loss.dtype == jnp.float32
    assert all(p.dtype == jnp.float32 for p in jax.tree.leaves(nnx.state(bf16, nnx.Param)))
    # bfloat16 has ~3 significant digits; the loss of a fresh model moves by far less than 1%.
    assert abs(float(loss) - float(ref_loss)) < 0.01 * float(ref_loss)


def test_remat_computes_the_same_loss_and_gradients(model):
    idx = _tokens(2, 16, seed=4)
    remat = GPT(TINY, rngs=nnx.Rngs(0), remat=True)  # the same draws: the same weights as `model`
    assert isinstance(remat.transformer.h[0], RematBlock)
    assert not isinstance(model.transformer.h[0], RematBlock)

    @nnx.jit
    def loss_and_grads(m):
        return nnx.value_and_grad(lambda m: m(idx, idx)[1])(m)

    loss, grads = loss_and_grads(model)
    remat_loss, remat_grads = loss_and_grads(remat)
    # Recomputation replays the same float32 ops: equal up to XLA fusion differences.
    np.testing.assert_allclose(remat_loss, loss, rtol=1e-6)
    for a, b in zip(jax.tree.leaves(remat_grads), jax.tree.leaves(grads), strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7)


def test_attention_implementation_is_chosen_at_construction(model):
    # On CPU (the tests' backend) XLA's path; cuDNN only for half precision on a GPU.
    assert jax.default_backend() == "cpu"
    assert {block.attn.implementation for block in model.transformer.h} == {"xla"}
    bf16 = GPT(TINY, rngs=nnx.Rngs(0), dtype=jnp.bfloat16)
    assert bf16.transformer.h[0].attn.implementation == "xla"


@pytest.mark.parametrize(
    "dtype, bias, tol", [(jnp.float32, True, 1e-6), (jnp.bfloat16, True, 0), (jnp.float32, False, 1e-6)]
)
def test_split_matmul_is_the_linear_split_in_three(dtype, bias, tol):
    """q, k, v from three matmuls over the kernel's column blocks are c_attn(x) split in three, with
    the same dtype promotion; only the summation order may differ in float32 (bf16 rounds alike)."""
    linear = nnx.Linear(32, 96, use_bias=bias, dtype=dtype, param_dtype=jnp.float32, rngs=nnx.Rngs(0))
    if bias:  # init puts zeros there, which would hide a bias taken from the wrong block
        linear.bias[...] = jnp.arange(96, dtype=jnp.float32) / 10
    x = jax.random.normal(jax.random.key(1), (2, 5, 32))
    parts = _split_matmul(linear, x, 3)
    for got, want in zip(parts, jnp.split(linear(x), 3, axis=-1)):
        assert got.shape == (2, 5, 32) and got.dtype == want.dtype == dtype
        np.testing.assert_allclose(
            np.asarray(got, np.float32), np.asarray(want, np.float32), rtol=tol, atol=tol
        )


def test_rngs_are_explicit():
    with pytest.raises(TypeError, match="rngs"):
        GPT(TINY)  # no hidden nnx.Rngs(0): the caller says where the randomness comes from
    a, b = (nnx.state(GPT(TINY, rngs=nnx.Rngs(seed)), nnx.Param) for seed in (1, 2))
    wte = (a["transformer"]["wte"]["embedding"][...], b["transformer"]["wte"]["embedding"][...])
    assert not np.array_equal(*wte)  # the seed is the caller's


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_cross_entropy_gradient_is_softmax_minus_one_hot(dtype):
    """The loss's written-out gradient against autodiff of the same formula over the masked
    logits: the loss is given them unmasked and ignores the padding itself."""
    from babygpt_jax.model import cross_entropy

    def autodiff_loss(logits, targets):
        wide = logits.astype(jnp.float32)
        logz = jax.nn.logsumexp(wide, axis=-1)
        return jnp.mean(logz - jnp.take_along_axis(wide, targets[..., None], axis=-1)[..., 0])

    rng = np.random.default_rng(0)
    logits = jnp.asarray(3 * rng.normal(size=(2, 5, TINY.padded_vocab_size)), dtype)  # padding finite
    targets = _tokens(2, 5, seed=1)
    loss, grad = jax.jit(jax.value_and_grad(cross_entropy), static_argnums=2)(
        logits, targets, TINY.vocab_size
    )
    masked = jnp.where(jnp.arange(TINY.padded_vocab_size) >= TINY.vocab_size, -jnp.inf, logits)
    want_loss, want_grad = jax.value_and_grad(autodiff_loss)(masked, targets)
    assert grad.dtype == dtype  # the gradient in the logits' dtype, as autodiff gives it
    assert abs(float(loss) - float(want_loss)) < 1e-6
    tol = 1e-7 if dtype == jnp.float32 else 2e-3  # bf16: one rounding of values below 1/10
    np.testing.assert_allclose(np.asarray(grad, np.float32), np.asarray(want_grad, np.float32), atol=tol)
    assert not np.any(np.asarray(grad[..., TINY.vocab_size :], np.float32))  # no gradient into the padding
