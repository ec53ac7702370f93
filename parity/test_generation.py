"""Greedy generation: the same tokens from torch and JAX, with and without the KV cache, past the
context (nanoGPT's sliding window), and from `transformers`' `generate(do_sample=False)`, all from
the same O(1) random weights.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

import babygpt_jax.generate as jax_generate
import babygpt_torch.generate as torch_generate
from babygpt.hf import write_hf_dir
from parity.conftest import SHAPES
from parity.convert import jax_model, to_hf, torch_model
from parity.weights import o1_tensors

CONFIG = SHAPES["heads4-pad"]
PROMPTS = [[5, 17, 42], [99, 0, 63, 8, 21]]  # different lengths: the batch path pads
NEW = 10  # 5 + 10 <= block_size 16: all in the KV cache
PAST = 40  # 2.5 contexts: the cache, then the sliding window


def no_cache_greedy(logits_of, prompt: list[int], new: int = NEW) -> tuple[list[int], float]:
    """Greedy decoding by re-running the full forward on the last block_size tokens (no KV cache):
    nanoGPT's `generate`, sliding window included.

    A sequence shorter than the context is right-padded to block_size (attention is causal, so the
    padding cannot reach the positions read), which keeps one input shape: JAX compiles once. Also
    returns the smallest gap between the best and second-best logit: identical tokens across
    backends mean something only if no step was a near-tie that float32 noise decides.
    """
    seq, gap = list(prompt), np.inf
    for _ in range(new):
        window = seq[-CONFIG.block_size :]
        padded = np.zeros((1, CONFIG.block_size), np.int64)
        padded[0, : len(window)] = window
        last = np.asarray(logits_of(padded))[0, len(window) - 1]
        top2 = np.sort(last)[-2:]
        gap = min(gap, float(top2[1] - top2[0]))
        seq.append(int(np.argmax(last)))
    return seq[len(prompt) :], gap


def no_cache_both(tm, jm, new: int) -> tuple[list[list[int]], list[list[int]], float]:
    """`no_cache_greedy` of every prompt in torch and in JAX, and the smallest gap of all."""
    jax_forward = jax.jit(lambda x: jm(x)[0])
    with torch.no_grad():
        torch_runs = [no_cache_greedy(lambda x: tm(torch.from_numpy(x))[0], p, new) for p in PROMPTS]
    jax_runs = [no_cache_greedy(lambda x: jax_forward(jnp.asarray(x)), p, new) for p in PROMPTS]
    gap = min(gap for _, gap in torch_runs + jax_runs)
    return [tokens for tokens, _ in torch_runs], [tokens for tokens, _ in jax_runs], gap


@pytest.fixture(scope="module")
def outputs(tmp_path_factory):
    tensors = o1_tensors(CONFIG, seed=7)
    # Random weights make greedy decoding repeat one token (its own embedding wins the tied
    # head); larger position embeddings make the output change along the sequence instead.
    tensors["transformer.wpe.weight"] *= 4
    tm, jm = torch_model(CONFIG, tensors), jax_model(CONFIG, tensors)
    out = {
        "torch_cache": torch_generate.generate(tm, PROMPTS, NEW, temperature=0, stop_token=None),
        "jax_cache": jax_generate.generate(jm, PROMPTS, NEW, temperature=0, stop_token=None),
    }
    # Past the context the last position is always block_size - 1, so position embeddings no
    # longer steer the output; larger weights (not the position embeddings) make it depend on the
    # window's tokens instead of settling on one token.
    lively = {k: v if v.ndim != 2 or "wpe" in k else 8 * v for k, v in o1_tensors(CONFIG, seed=8).items()}
    tm_past, jm_past = torch_model(CONFIG, lively), jax_model(CONFIG, lively)
    out["torch_past"] = torch_generate.generate(tm_past, PROMPTS, PAST, temperature=0, stop_token=None)
    out["jax_past"] = jax_generate.generate(jm_past, PROMPTS, PAST, temperature=0, stop_token=None)
    out["torch_full"], out["jax_full"], gap = no_cache_both(tm, jm, NEW)
    out["torch_past_full"], out["jax_past_full"], past_gap = no_cache_both(tm_past, jm_past, PAST)
    out["min_gap"] = min(gap, past_gap)

    from transformers import GPT2LMHeadModel

    hf_dir = write_hf_dir(tmp_path_factory.mktemp("hf") / "model", CONFIG, to_hf(tensors, CONFIG))
    hf = GPT2LMHeadModel.from_pretrained(hf_dir).eval()
    out["transformers"] = []
    for prompt in PROMPTS:  # one at a time: GPT-2 batches need left padding and position ids
        ids = hf.generate(
            torch.tensor([prompt]),
            attention_mask=torch.ones(1, len(prompt), dtype=torch.long),
            max_new_tokens=NEW,
            do_sample=False,
            pad_token_id=0,
            eos_token_id=None,
        )
        out["transformers"].append(ids[0, len(prompt) :].tolist())
    return out


def test_no_step_is_a_near_tie(outputs):
    # float32 logits differ by ~1e-6 between backends (test_forward), ~1e-4 at the larger weights
    # used past the context (logits up to ~90); a gap of 1e-2 cannot flip
    assert outputs["min_gap"] > 1e-2


def test_greedy_tokens_torch_equal_jax_with_kv_cache(outputs):
    assert [len(t) for t in outputs["torch_cache"]] == [NEW, NEW]
    assert outputs["torch_cache"] == outputs["jax_cache"]


def test_kv_cache_equal_full_forward(outputs):
    assert outputs["torch_cache"] == outputs["torch_full"]
    assert outputs["jax_cache"] == outputs["jax_full"]


def test_greedy_past_the_context_torch_equal_jax_and_the_sliding_window(outputs):
    assert [len(t) for t in outputs["torch_past"]] == [PAST, PAST]
    assert outputs["torch_past"] == outputs["jax_past"]
    assert outputs["torch_past"] == outputs["torch_past_full"]
    assert outputs["jax_past"] == outputs["jax_past_full"]
    assert all(len(set(row[CONFIG.block_size :])) > 5 for row in outputs["torch_past"])  # not one token


def test_greedy_tokens_equal_transformers(outputs):
    assert outputs["transformers"] == outputs["torch_cache"]


def test_greedy_output_depends_on_the_prompt(outputs):
    # guards the test itself: random weights that always emit one token would prove little
    first, second = outputs["torch_cache"]
    assert first != second and len(set(first)) > 2 and len(set(second)) > 2
