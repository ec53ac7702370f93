"""N training steps through each backend's real `train.main`: the same loss curve.

Both runs start from the same O(1) weights (`train.init_from`) and see the same batches; the
curves come from each run's metrics.jsonl (conftest.py's `trained_runs`). `parity.compare`, which
runs them, also draws the plot tested here.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
from PIL import Image

from parity.compare import plot

STEPS = 8
# float64 runs, measured: <= 9.7e-9 relative over the 8 steps, all of it JAX's attention softmax,
# which jax.nn.dot_product_attention computes in float32 whatever the input dtype (these O(1)
# weights make attention sharp); the float32 runs differ by up to 2e-7.
RTOL_FLOAT64 = 5e-8


def test_both_runs_logged_every_step(trained_runs):
    assert trained_runs["steps"] == list(range(1, STEPS + 1))


def test_loss_curves_equal(trained_runs):
    torch_loss = np.array([trained_runs["torch"]["loss"][s] for s in trained_runs["steps"]])
    jax_loss = np.array([trained_runs["jax"]["loss"][s] for s in trained_runs["steps"]])
    assert torch_loss[-1] < torch_loss[0] - 0.5  # it trains: the curve is not flat
    # Step 1 is the same function of the same weights and batch: float32 rounding only.
    np.testing.assert_allclose(jax_loss[0], torch_loss[0], rtol=1e-5)
    # Later steps add Adam updates whose float32 noise compounds (see test_optim): measured
    # <= 2e-7 relative over 8 steps; 1e-5 leaves 50x headroom and is 1e-4 of a step's change.
    np.testing.assert_allclose(jax_loss, torch_loss, rtol=1e-5)


def test_lr_and_grad_norm_logged_equal(trained_runs):
    torch_metrics, jax_metrics = trained_runs["torch"], trained_runs["jax"]

    np.testing.assert_allclose(_column(jax_metrics, "lr"), _column(torch_metrics, "lr"), rtol=1e-6)
    # pre-clip global norms: clipping is active at every step (O(1) weights)
    torch_norms = np.array(_column(torch_metrics, "grad_norm"))
    assert torch_norms.min() > 1.0
    # a float32 sum of ~30k squares, after the same few steps: ~1e-6 relative
    np.testing.assert_allclose(_column(jax_metrics, "grad_norm"), torch_norms, rtol=1e-5)


def test_compare_plots_both_curves(trained_runs, tmp_path):
    png = plot(trained_runs, tmp_path / "curves.png", "parity")
    image = np.asarray(Image.open(png).convert("RGB"))
    assert image.shape[0] > 200 and image.shape[1] > 200
    assert trained_runs["max_abs_diff"] < 1e-4  # what run_both reports agrees with the curves


def test_float64_runs_agree_far_closer_than_float32(trained_runs_float64, trained_runs):
    """`train.dtype=float64`: every weight and op in float64 in both backends (but JAX's attention
    softmax, see RTOL_FLOAT64), so the curves differ by far less than float32's rounding."""
    import jax.numpy as jnp

    runs, steps = trained_runs_float64, trained_runs_float64["steps"]
    torch_loss = np.array([runs["torch"]["loss"][s] for s in steps])
    jax_loss = np.array([runs["jax"]["loss"][s] for s in steps])
    assert steps == list(range(1, STEPS + 1))
    float32 = np.array([trained_runs["torch"]["loss"][s] for s in steps])
    assert np.abs(torch_loss - float32).max() > 1e-9  # it did not run in float32
    np.testing.assert_allclose(jax_loss, torch_loss, rtol=RTOL_FLOAT64)
    val = [(runs[b]["val_loss"][4], runs[b]["val_loss"][8]) for b in ("torch", "jax")]
    np.testing.assert_allclose(val[1], val[0], rtol=RTOL_FLOAT64)
    lrs = [_column(runs[b], "lr") for b in ("torch", "jax")]
    np.testing.assert_allclose(lrs[1], lrs[0], rtol=1e-14)  # one formula, float64 in both
    assert jnp.zeros(()).dtype == jnp.float32  # x64 was on for the JAX run only


def _column(run: dict, key: str) -> list[float]:
    lines = (Path(run["run_dir"]) / "metrics.jsonl").read_text().splitlines()
    return [r[key] for r in map(json.loads, lines) if key in r]
