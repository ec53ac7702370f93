"""The optimizer: each backend's `make_optimizer` and `lr_schedule` give the same updates.

AdamW steps with clipping active, weight decay on the rank >= 2 tensors only, and the
warmup-cosine schedule, from the same O(1) weights and batch; then the schedule alone at every
step of a run, including the rate torch's `LambdaLR` actually sets on the optimizer.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
import torch
from flax import nnx

import babygpt_jax.optim as jax_optim
import babygpt_torch.optim as torch_optim
from babygpt.config import TrainConfig
from parity.conftest import SHAPES
from parity.convert import (
    jax_model,
    jax_params_to_tensors,
    torch_model,
    torch_named_to_tensors,
    torch_tensors,
)
from parity.weights import o1_tensors, random_batch

# Large weight decay and learning rate, so a wrong mask or a wrong lr moves the params visibly.
TRAIN = TrainConfig(max_steps=6, warmup_steps=2, max_lr=1e-2, weight_decay=0.5, grad_clip=1.0)
STEPS = 4  # lr 0 (moments only), max_lr / 2, max_lr, then decaying


@pytest.fixture(scope="module")
def trajectories():
    """Both backends take STEPS AdamW steps on the same batch; params after each, in full layout."""
    config = SHAPES["heads4-pad"]
    tensors = o1_tensors(config, seed=0)
    idx, targets = random_batch(config, B=4, T=config.block_size, seed=2)

    tm = torch_model(config, tensors).train()
    optimizer, scheduler = torch_optim.make_optimizer(tm, TRAIN, "cpu")
    torch_params, torch_norms, torch_lrs = [], [], []
    for _ in range(STEPS):
        optimizer.zero_grad(set_to_none=True)
        _, loss = tm(torch.from_numpy(idx), torch.from_numpy(targets))
        loss.backward()
        torch_lrs.append(optimizer.param_groups[0]["lr"])
        # as babygpt_torch.train.train_step: clipping is applied outside the optimizer
        torch_norms.append(torch.nn.utils.clip_grad_norm_(tm.parameters(), TRAIN.grad_clip).item())
        optimizer.step()
        scheduler.step()
        torch_params.append(torch_tensors(tm))
    named = dict(tm.named_parameters())
    torch_moments = {
        key: torch_named_to_tensors(config, {n: optimizer.state[p][key] for n, p in named.items()})
        for key in ("exp_avg", "exp_avg_sq")
    }

    jm = jax_model(config, tensors)
    graphdef, params, rest = nnx.split(jm, nnx.Param, ...)
    tx = jax_optim.make_optimizer(TRAIN)
    opt_state = tx.init(params)

    @jax.jit
    def step(params, opt_state, idx, targets):
        def loss_fn(p):
            return nnx.merge(graphdef, p, rest)(idx, targets)[1]

        grads = jax.grad(loss_fn)(params)
        updates, opt_state = tx.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, optax.global_norm(grads)

    jax_params, jax_norms = [], []
    for _ in range(STEPS):
        params, opt_state, norm = step(params, opt_state, jnp.asarray(idx), jnp.asarray(targets))
        jax_params.append(jax_params_to_tensors(params, config))
        jax_norms.append(float(norm))
    jax_moments = {
        "exp_avg": jax_params_to_tensors(optax.tree_utils.tree_get(opt_state, "mu"), config),
        "exp_avg_sq": jax_params_to_tensors(optax.tree_utils.tree_get(opt_state, "nu"), config),
    }
    return dict(
        initial=tensors,
        torch=torch_params,
        jax=jax_params,
        torch_norms=torch_norms,
        jax_norms=jax_norms,
        torch_lrs=torch_lrs,
        torch_moments=torch_moments,
        jax_moments=jax_moments,
        jax_mask=jax_optim.weight_decay_mask(nnx.state(jm, nnx.Param)),
        torch_mask=torch_optim.weight_decay_mask(tm),
    )


def test_clipping_is_active(trajectories):
    # the pre-clip gradient norm is well above grad_clip, so clipping changes every step
    assert min(trajectories["torch_norms"]) > 3 * TRAIN.grad_clip
    # the same norm in both (float32 sums of ~30k squares: ~1e-6 relative)
    np.testing.assert_allclose(trajectories["jax_norms"], trajectories["torch_norms"], rtol=1e-5)


def test_adam_moments_equal_so_clipping_happened_in_both(trajectories):
    """The first moment is a mean of clipped gradients: an unclipped backend's would be ~10x."""
    for key in ("exp_avg", "exp_avg_sq"):
        t, j = trajectories["torch_moments"][key], trajectories["jax_moments"][key]
        for name in t:
            scale = np.abs(t[name]).max()
            # moments are averages of gradients, which agree to ~1e-6 of their scale
            assert np.abs(j[name] - t[name]).max() < 1e-4 * scale, (key, name)
    norm = np.sqrt(sum((m**2).sum() for m in trajectories["torch_moments"]["exp_avg"].values()))
    assert norm < TRAIN.grad_clip  # a (1 - beta1)-weighted mix of gradients of norm <= grad_clip


def without_key_bias(name: str, array: np.ndarray) -> np.ndarray:
    """Drop the attention key bias: it adds q.b_k to every score of a query, which softmax
    cancels, so its true gradient is 0 and each backend's is float32 noise (~1e-9) that Adam's
    m / sqrt(v) blows up to +-lr. Neither the function nor the loss depends on it."""
    if name.endswith("attn.c_attn.bias"):
        C = array.shape[0] // 3
        return np.concatenate([array[:C], array[2 * C :]])
    return array


def test_adamw_steps_give_the_same_params(trajectories):
    initial = trajectories["initial"]
    for s, (t, j) in enumerate(zip(trajectories["torch"], trajectories["jax"])):
        lr = trajectories["torch_lrs"][s]
        for name in t:
            moved = np.abs(t[name] - initial[name]).max()
            if lr == 0:  # the first step's lr is 0: neither backend moves
                assert moved == 0 and np.array_equal(j[name], initial[name]), name
                continue
            assert moved > 0.1 * lr, name
            diff = np.abs(without_key_bias(name, j[name]) - without_key_bias(name, t[name])).max()
            # Adam divides each entry by its own gradient scale, so an entry whose gradient nearly
            # cancels carries its float32 noise into the update: seen up to 5e-4 of lr. 2e-3 of
            # lr is still 100x below a bias wrongly decayed (lr * weight_decay * |b| ~ 0.25 lr).
            assert diff < 2e-3 * lr, name


def test_weight_decay_mask_is_rank_two_and_up_in_both(trajectories):
    decays = {name for name, d in trajectories["torch_mask"].items() if d}
    expected = {name for name, a in trajectories["initial"].items() if a.ndim >= 2}
    assert decays == expected
    jax_flags = jax.tree.leaves(trajectories["jax_mask"])
    assert sorted(jax_flags) == sorted(trajectories["torch_mask"].values())


@pytest.mark.parametrize(
    "train",
    [
        TrainConfig(max_steps=50, warmup_steps=10, max_lr=6e-4),
        TrainConfig(max_steps=40, warmup_steps=0, max_lr=1e-3, min_lr=0.0),
        TrainConfig(max_steps=30, warmup_steps=30, max_lr=3e-3, min_lr=1e-4),
    ],
    ids=["warmup10", "no-warmup", "all-warmup"],
)
def test_lr_schedule_equal_at_every_step(train):
    """Both `lr_schedule`s and the lr torch's scheduler sets, at every step and past the end."""
    torch_lr = torch_optim.lr_schedule(train)
    jax_lr = jax_optim.lr_schedule(train)
    model = torch.nn.Linear(2, 2)
    optimizer, scheduler = torch_optim.make_optimizer(model, train, "cpu")
    steps = np.arange(train.max_steps + 5)
    applied = []
    for _ in steps:
        applied.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        scheduler.step()
    expected = np.array([torch_lr(int(s)) for s in steps])
    # JAX evaluates the schedule in float32: errors ~1e-7 of max_lr (relative near min_lr=0)
    jax_lrs = np.array([jax_lr(s) for s in steps])
    np.testing.assert_allclose(jax_lrs, expected, rtol=1e-6, atol=2e-7 * train.max_lr)
    np.testing.assert_allclose(applied, expected, rtol=1e-12, atol=1e-15)  # float64 in both
    assert expected[0] == (0.0 if train.warmup_steps else train.max_lr)
    assert expected[train.warmup_steps] == pytest.approx(train.max_lr)
    assert expected[-1] == pytest.approx(train.final_lr)
