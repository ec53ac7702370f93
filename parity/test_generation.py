"""Greedy generation: the same tokens from torch and JAX, with and without the KV cache, and from
`transformers`' `generate(do_sample=False)`, all from the same O(1) random weights.
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
NEW = 10  # 5 + 10 <= block_size 16, so no prompt is cropped


def no_cache_greedy(logits_of, prompt: list[int]) -> tuple[list[int], float]:
    """Greedy decoding by re-running the full forward on the growing sequence (no KV cache).

    The sequence is right-padded to block_size (attention is causal, so the padding cannot reach
    the positions read), which keeps one input shape: JAX compiles once. Also returns the smallest gap between the best and second-best logit: identical tokens
    across backends mean something only if no step was a near-tie that float32 noise decides.
    """
    seq, gap = list(prompt), np.inf
    for _ in range(NEW):
        padded = np.zeros((1, CONFIG.block_size), np.int64)
        padded[0, : len(seq)] = seq
        last = np.asarray(logits_of(padded))[0, len(seq) - 1]
        top2 = np.sort(last)[-2:]
        gap = min(gap, float(top2[1] - top2[0]))
        seq.append(int(np.argmax(last)))
    return seq[len(prompt) :], gap


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
    with torch.no_grad():
        torch_runs = [no_cache_greedy(lambda x: tm(torch.from_numpy(x))[0], p) for p in PROMPTS]
    jax_forward = jax.jit(lambda x: jm(x)[0])
    jax_runs = [no_cache_greedy(lambda x: jax_forward(jnp.asarray(x)), p) for p in PROMPTS]
    out["torch_full"] = [tokens for tokens, _ in torch_runs]
    out["jax_full"] = [tokens for tokens, _ in jax_runs]
    out["min_gap"] = min(gap for _, gap in torch_runs + jax_runs)

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
    # float32 logits differ by ~1e-6 between backends (test_forward); a gap of 1e-3 cannot flip
    assert outputs["min_gap"] > 1e-3


def test_greedy_tokens_torch_equal_jax_with_kv_cache(outputs):
    assert [len(t) for t in outputs["torch_cache"]] == [NEW, NEW]
    assert outputs["torch_cache"] == outputs["jax_cache"]


def test_kv_cache_equal_full_forward(outputs):
    assert outputs["torch_cache"] == outputs["torch_full"]
    assert outputs["jax_cache"] == outputs["jax_full"]


def test_greedy_tokens_equal_transformers(outputs):
    assert outputs["transformers"] == outputs["torch_cache"]


def test_greedy_output_depends_on_the_prompt(outputs):
    # guards the test itself: random weights that always emit one token would prove little
    first, second = outputs["torch_cache"]
    assert first != second and len(set(first)) > 2 and len(set(second)) > 2
