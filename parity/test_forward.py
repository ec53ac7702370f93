"""Forward pass, loss and gradients: torch vs JAX vs `transformers.GPT2LMHeadModel`, same weights.

float32 on CPU, O(1)-scaled random weights (see conftest.py). Tolerances are relative to the
largest logit or gradient, because float32 rounding scales with the magnitude of what is summed.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from flax import nnx

from babygpt.hf import write_hf_dir
from parity.conftest import SHAPES
from parity.convert import jax_model, jax_params_to_tensors, to_hf, torch_grads, torch_model
from parity.weights import o1_tensors, random_batch

# float32 has a 6e-8 unit roundoff; dot products summed in different orders (XLA vs ATen vs HF's
# Conv1D) differ by ~5e-7 of the logits' scale here. 5e-6 is 10x that, and 20x below the change
# from swapping tanh-GELU for exact GELU (~1e-4, see test_tolerance_catches_exact_gelu).
LOGIT_RTOL = 5e-6
# Gradients (through softmax, LayerNorm and attention backward) differ by <= 7e-7 of each
# tensor's largest entry here; 1e-5 leaves 10x headroom, while a wrong term would be O(1).
GRAD_RTOL = 1e-5


def max_rel(a, b, scale=None) -> float:
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    scale = np.abs(b).max() if scale is None else scale
    return float(np.abs(a - b).max() / scale)


@pytest.fixture(scope="module", params=list(SHAPES))
def case(request, tmp_path_factory):
    """One shape: the weights in all three models, a batch shorter than block_size, and outputs."""
    config = SHAPES[request.param]
    tensors = o1_tensors(config, seed=0)
    idx, targets = random_batch(config, B=3, T=config.block_size - 5, seed=1)

    tm = torch_model(config, tensors)
    t_logits, t_loss = tm(torch.from_numpy(idx), torch.from_numpy(targets))
    t_loss.backward()

    jm = jax_model(config, tensors)
    graphdef, params, rest = nnx.split(jm, nnx.Param, ...)

    @jax.jit
    def loss_and_logits(params, idx, targets):
        model = nnx.merge(graphdef, params, rest)
        logits, loss = model(idx, targets)
        return loss, logits

    (j_loss, j_logits), j_grads = jax.value_and_grad(loss_and_logits, has_aux=True)(
        params, jnp.asarray(idx), jnp.asarray(targets)
    )

    from transformers import GPT2LMHeadModel

    hf_dir = write_hf_dir(tmp_path_factory.mktemp("hf") / "model", config, to_hf(tensors, config))
    hf = GPT2LMHeadModel.from_pretrained(hf_dir).eval()
    with torch.no_grad():
        hf_logits = hf(torch.from_numpy(idx)).logits

    return dict(
        config=config,
        idx=idx,
        targets=targets,
        torch_logits=t_logits.detach().numpy(),
        torch_loss=t_loss.item(),
        torch_grads=torch_grads(tm),
        jax_logits=np.asarray(j_logits),
        jax_loss=float(j_loss),
        jax_grads=jax_params_to_tensors(j_grads, config),
        hf_logits=hf_logits.numpy(),
        torch_model=tm,
    )


def test_activations_are_order_one(case):
    """The premise of the tolerances: logits spread over O(1), not GPT-2-init-small."""
    assert 1.0 < case["torch_logits"].std() < 100.0


def test_logits_torch_equal_jax(case):
    V = case["config"].vocab_size
    t, j = case["torch_logits"], case["jax_logits"]
    assert t.shape == j.shape == (3, case["config"].block_size - 5, V)  # the padding stays inside
    assert max_rel(j, t) < LOGIT_RTOL


def test_head_masks_the_padding_in_both(case):
    """The padded rows hold large weights (conftest); the head, which decoding samples from,
    must give them -inf in both backends, and the same logits elsewhere."""
    config, tm = case["config"], case["torch_model"]
    x = np.random.default_rng(2).normal(size=(4, config.n_embd)).astype(np.float32)
    with torch.no_grad():
        t = tm.head(torch.from_numpy(x)).numpy()
    j = np.asarray(jax_model(config, o1_tensors(config, seed=0)).head(jnp.asarray(x)))
    V = config.vocab_size
    assert np.all(np.isneginf(t[:, V:])) and np.all(np.isneginf(j[:, V:]))
    assert max_rel(j[:, :V], t[:, :V]) < LOGIT_RTOL


def test_logits_equal_transformers(case):
    V = case["config"].vocab_size
    hf = case["hf_logits"]
    assert hf.shape[-1] == V
    assert max_rel(case["torch_logits"][..., :V], hf) < LOGIT_RTOL
    assert max_rel(case["jax_logits"][..., :V], hf) < LOGIT_RTOL


def test_loss_torch_equal_jax_equal_transformers(case):
    hf_loss = F.cross_entropy(
        torch.from_numpy(case["hf_logits"]).flatten(0, 1), torch.from_numpy(case["targets"]).flatten()
    ).item()
    assert case["torch_loss"] > 1.0  # O(1) weights: far from a trivially small loss
    # a mean of log-probabilities of O(1-10): float32 rounding gives ~1e-6 relative
    np.testing.assert_allclose(case["jax_loss"], case["torch_loss"], rtol=1e-5)
    np.testing.assert_allclose(hf_loss, case["torch_loss"], rtol=1e-5)


def test_gradients_of_every_parameter_equal(case):
    t, j = case["torch_grads"], case["jax_grads"]
    assert sorted(t) == sorted(j)
    for name in t:
        assert t[name].shape == j[name].shape, name
        scale = np.abs(t[name]).max()
        assert scale > 0, f"{name}: zero gradient, the test would prove nothing"
        assert max_rel(j[name], t[name], scale) < GRAD_RTOL, name
    V = case["config"].vocab_size
    wte = "transformer.wte.weight"
    # padded vocabulary rows: never looked up, logits masked, so exactly no gradient
    assert not t[wte][V:].any() and not j[wte][V:].any()


def test_tolerance_catches_exact_gelu(case, monkeypatch):
    """The forward tolerance is tight enough to see exact GELU in place of GPT-2's tanh GELU."""
    import babygpt_torch.model as torch_gpt

    gelu = torch.nn.functional.gelu
    exact = lambda x, approximate="none": gelu(x)  # ignores approximate="tanh"
    monkeypatch.setattr(torch_gpt.F, "gelu", exact)
    with torch.no_grad():
        logits, _ = case["torch_model"](torch.from_numpy(case["idx"]))
    V = case["config"].vocab_size
    assert max_rel(logits.numpy()[..., :V], case["hf_logits"]) > 10 * LOGIT_RTOL


def test_layer_norm_epsilon_of_a_transformers_directory_is_computed(tmp_path):
    """A GPT-2 saved by transformers with layer_norm_epsilon=1e-2 loads into both backends as itself."""
    from transformers import GPT2Config, GPT2LMHeadModel

    import babygpt_jax.model as jax_gpt
    import babygpt_torch.model as torch_gpt

    torch.manual_seed(0)
    shape = dict(n_layer=2, n_head=2, n_embd=32, n_positions=16, vocab_size=100)
    hf = GPT2LMHeadModel(GPT2Config(**shape, layer_norm_epsilon=1e-2)).eval()
    hf.save_pretrained(tmp_path)
    idx = np.random.default_rng(0).integers(0, 100, (2, 16))
    with torch.no_grad():
        expected = hf(torch.from_numpy(idx)).logits.numpy()
        torch_logits = torch_gpt.GPT.from_pretrained(tmp_path).eval()(torch.from_numpy(idx))[0].numpy()
    jax_logits = np.asarray(jax_gpt.GPT.from_pretrained(tmp_path)(jnp.asarray(idx))[0])
    assert torch_gpt.GPT.from_pretrained(tmp_path).config.layer_norm_epsilon == 1e-2
    # At GPT-2's init scale the residual stream's variance is ~1e-3, so epsilon 1e-2 against 1e-5
    # moves the logits by a large fraction of themselves; the same float32 tolerance as above.
    assert max_rel(torch_logits[..., :100], expected) < LOGIT_RTOL
    assert max_rel(jax_logits[..., :100], expected) < LOGIT_RTOL
    with torch.no_grad():
        default_eps = GPT2LMHeadModel(GPT2Config(**shape)).eval()
        default_eps.load_state_dict(hf.state_dict())
        assert max_rel(default_eps(torch.from_numpy(idx)).logits.numpy(), expected) > 100 * LOGIT_RTOL
