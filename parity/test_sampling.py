"""Sampling filters against Hugging Face: `filter_logits` of both backends = transformers' warpers.

`transformers` defines temperature, top-k and top-p as `TemperatureLogitsWarper` ->
`TopKLogitsWarper` -> `TopPLogitsWarper`. Both backends' `filter_logits` must keep exactly the
tokens those keep, ties included (top-k cuts by value; top-p orders tied tokens by id), and give
them the same probabilities. Ties are the hard case and common in practice: logits computed in
bfloat16, as both backends decode on a GPU, have 8 bits of mantissa.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from transformers.generation.logits_process import (
    LogitsProcessorList,
    TemperatureLogitsWarper,
    TopKLogitsWarper,
    TopPLogitsWarper,
)

from babygpt_jax import generate as jgen
from babygpt_torch import generate as tgen

V, PAD = 300, 20  # vocabulary, and padded columns (-inf) as the backends' logits carry
TEMPERATURE = 0.8
TOP_K = [1, 50, V, V + PAD + 5, None]
# float32 values: the JAX decode loop carries top_p as a traced float32, and where the cumulative mass
# lands exactly on 1 - top_p (tied logits make that common) the rounding of top_p decides the cut.
TOP_P = [float(np.float32(p)) for p in (1e-6, 0.9, 1.0)] + [None]


def hf_filter(logits: np.ndarray, top_k: int | None, top_p: float | None) -> np.ndarray:
    """transformers' chain, as `generate` builds it (top_k None and top_p 1 add no warper)."""
    warpers = LogitsProcessorList([TemperatureLogitsWarper(TEMPERATURE)])
    if top_k is not None:
        warpers.append(TopKLogitsWarper(top_k))
    if top_p is not None and top_p < 1.0:
        warpers.append(TopPLogitsWarper(top_p))
    return warpers(None, torch.from_numpy(logits)).numpy()


def rows(kind: str, dtype: str) -> np.ndarray:
    """(B, V) float32 logits: random, or with many ties; bfloat16 rounds them as a GPU computes them."""
    rng = np.random.default_rng(0)
    if kind == "random":
        logits = rng.normal(0, 3, (48, V))
    else:  # a few distinct values, each shared by many tokens, so ties straddle every cut
        logits = rng.integers(-4, 5, (48, V)) * 0.75 + rng.integers(0, 2, (48, 1)) * 0.1
    logits = torch.from_numpy(logits.astype(np.float32))
    if dtype == "bfloat16":
        logits = logits.to(torch.bfloat16).float()  # the decode loops upcast before filtering
    return logits.numpy()


@pytest.fixture(scope="module")
def jax_filter():
    """One jitted filter with traced top_k / top_p, as the decode loop calls it."""
    return jax.jit(lambda logits, k, p: jgen.filter_logits(logits / TEMPERATURE, k, p))


def ours(backend: str, jax_filter, logits: np.ndarray, top_k, top_p) -> np.ndarray:
    """The backend's filter on padded logits (padding -inf, as the model returns them), unpadded."""
    padded = np.concatenate([logits, np.full((len(logits), PAD), -np.inf, np.float32)], axis=1)
    if backend == "torch":
        out = tgen.filter_logits(torch.from_numpy(padded) / TEMPERATURE, top_k, top_p).numpy()
    else:  # as generate passes them: the padded vocabulary for "no top-k", 1.0 for "no top-p"
        k = jnp.int32(V + PAD if top_k is None else top_k)
        out = np.asarray(jax_filter(jnp.asarray(padded), k, jnp.float32(1.0 if top_p is None else top_p)))
    assert np.all(out[:, V:] == -np.inf)  # a padded token is never kept
    return out[:, :V]


def softmax(x: np.ndarray) -> np.ndarray:
    e = np.exp(x - x.max(axis=-1, keepdims=True))
    return e / e.sum(axis=-1, keepdims=True)


def assert_same_filter(got: np.ndarray, expected: np.ndarray, scaled: np.ndarray, where: str) -> int:
    """The same kept tokens, but for which ids of a tied group top-p cuts through; returns such rows.

    transformers orders tied tokens by `torch.sort`, which is not stable: which of several tokens of
    equal probability survive a top-p cut depends on its sort kernel. Ours keep the later ids (a
    stable sort). So: per row, the same number of kept tokens of each value (hence the same
    distribution over values), and exactly the same kept ids outside a group the cut splits.
    """
    split_rows = 0
    for row, (g, e, x) in enumerate(zip(got, expected, scaled)):
        kept_g, kept_e = np.isfinite(g), np.isfinite(e)
        # the kept logits divided by the temperature: XLA multiplies by the reciprocal, 1 ulp apart
        np.testing.assert_allclose(
            np.sort(g[kept_g]), np.sort(e[kept_e]), rtol=1e-6, err_msg=f"{where} row {row}"
        )
        split = [v for v in np.unique(x[kept_e]) if not kept_e[x == v].all()]
        free = ~np.isin(x, split)
        np.testing.assert_array_equal(kept_g[free], kept_e[free], err_msg=f"{where} row {row}")
        split_rows += bool(split)
    return split_rows


@pytest.mark.parametrize("backend", ["torch", "jax"])
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
@pytest.mark.parametrize("kind", ["random", "tied"])
def test_filter_logits_keeps_what_transformers_keeps(backend, dtype, kind, jax_filter):
    logits = rows(kind, dtype)
    split_rows, scaled = 0, hf_filter(logits, None, None)
    for top_k in TOP_K:
        for top_p in TOP_P:
            expected = hf_filter(logits, top_k, top_p)
            got = ours(backend, jax_filter, logits, top_k, top_p)
            where = f"{backend} {dtype} {kind} top_k={top_k} top_p={top_p}"
            split_rows += assert_same_filter(got, expected, scaled, where)
            # probabilities of O(1/V) summed in float32: 1e-6 absolute is ~1000 ulps of headroom
            np.testing.assert_allclose(
                np.sort(softmax(got)), np.sort(softmax(expected)), atol=1e-6, err_msg=where
            )
    if kind == "tied":  # the grid must exercise a top-p cut through a tie, or it proves little
        assert split_rows > 0
    if dtype == "float32" and kind == "random":  # no ties: the very same ids
        assert split_rows == 0
    if backend == "jax":  # top_k and top_p are traced values: one compilation served every setting
        assert jax_filter._cache_size() == 1


def test_the_cases_filter_logits_used_to_get_wrong(jax_filter):
    """The issue's minimal case, and a tie the grid must contain to mean anything."""
    logits = np.array([[2.0, 1.0, 0.0, 0.0]], np.float32) * TEMPERATURE  # top-k 3 keeps the tie at 0
    hf = np.isfinite(hf_filter(logits, 3, 0.64))[0]
    assert hf.tolist() == [True, True, False, False]  # p(2) = 0.61 < 0.64, so 1 is needed too
    for backend in ("torch", "jax"):
        padded = np.concatenate([logits, np.full((1, 4), -np.inf, np.float32)], axis=1)
        if backend == "torch":
            kept = np.isfinite(tgen.filter_logits(torch.from_numpy(padded) / TEMPERATURE, 3, 0.64).numpy())
        else:
            kept = np.isfinite(np.asarray(jax_filter(jnp.asarray(padded), jnp.int32(3), jnp.float32(0.64))))
        assert kept[0].tolist() == [True, True, False, False, False, False, False, False], backend
    # top-p cutting through a tie: transformers keeps the later ids of the tied group, as do we
    tie = np.array([[1.0, 1.0, 1.0, 1.0]], np.float32) * TEMPERATURE
    assert np.isfinite(hf_filter(tie, None, 0.5))[0].tolist() == [False, False, True, True]
    assert np.isfinite(tgen.filter_logits(torch.from_numpy(tie) / TEMPERATURE, None, 0.5).numpy())[
        0
    ].tolist() == [False, False, True, True]
