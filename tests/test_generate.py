"""KV-cache generation in both backends: filters, seeds, cache vs full forward, batches, the sliding window.

One tiny random model is written as a Hugging Face directory and loaded into both backends, so
every test can hold the two generate() functions to the same answers.
"""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import nnx

import babygpt_jax.generate as jgen
import babygpt_torch.generate as tgen
from babygpt.config import BabyGPTError, ModelConfig
from babygpt.hf import write_hf_dir
from babygpt.sampling import (
    RowCollector,
    SamplingSettings,
    StreamDecoder,
    cache_length,
    cached_positions,
    crop_prompts,
    prefill_length,
)
from babygpt.tokenizer import get_tokenizer
from babygpt_jax.model import GPT as JaxGPT
from babygpt_torch.model import GPT as TorchGPT
from babygpt_torch.model import hf_tensors

BACKENDS = ("torch", "jax")
# Lengths 3, 6 and 1: rows that start decoding at different positions in one batch.
PROMPTS = [[5, 17, 42], [9, 8, 7, 6, 5, 4], [63]]


@pytest.fixture(scope="module")
def config() -> ModelConfig:
    # vocab 100 padded to 128: the padded logits are -inf and must never be sampled.
    return ModelConfig(n_layer=2, n_head=2, n_embd=32, block_size=16, vocab_size=100, vocab_multiple=64)


@pytest.fixture(scope="module")
def models(config, tmp_path_factory):
    """The same weights in both backends, through the Hugging Face directory format."""
    torch.manual_seed(0)
    hf_dir = write_hf_dir(tmp_path_factory.mktemp("hf") / "tiny", config, hf_tensors(TorchGPT(config)))
    return {"torch": TorchGPT.from_pretrained(hf_dir), "jax": JaxGPT.from_pretrained(hf_dir)}


@pytest.fixture(scope="module")
def lively_models(config, tmp_path_factory):
    """Another seed, and every weight matrix 15 times larger. At GPT-2's init scale a random model
    repeats one token after a few steps, which would hide a window that slid wrong; at this scale
    its greedy output keeps changing (and so depends on which tokens the window holds)."""
    torch.manual_seed(3)
    model = TorchGPT(config)
    with torch.no_grad():
        for param in model.parameters():
            if param.dim() == 2:
                param.mul_(15)
    hf_dir = write_hf_dir(tmp_path_factory.mktemp("hf") / "lively", config, hf_tensors(model))
    return {"torch": TorchGPT.from_pretrained(hf_dir), "jax": JaxGPT.from_pretrained(hf_dir)}


def generate(backend: str, models, prompts, max_new_tokens, **kwargs):
    module = tgen if backend == "torch" else jgen
    return module.generate(models[backend], prompts, max_new_tokens, **kwargs)


def full_forward_logits(backend: str, models, idx: np.ndarray) -> np.ndarray:
    """(B, T, V) logits of the plain forward pass, no cache."""
    if backend == "torch":
        with torch.no_grad():
            return models["torch"](torch.from_numpy(idx))[0].numpy()
    return np.asarray(_jax_forward(models["jax"], jnp.asarray(idx)))


@nnx.jit
def _jax_forward(model, idx):
    return model(idx)[0]


@nnx.jit
def _jax_decode(model, idx, cache, pos):
    return model.decode(idx, cache, pos)


# --- filters on hand-made distributions ------------------------------------------------------

# Probabilities 0.5, 0.2, 0.15, 0.1, 0.05 and one padded slot (-inf); the second row holds the same
# distribution in another order, so a mask that ignored the row would fail. No cumulative sum
# lands within float rounding of a threshold used below.
_PROBS = np.array([0.5, 0.2, 0.15, 0.1, 0.05])
_LOGITS = np.stack(
    [np.append(np.log(_PROBS), -np.inf), np.append(np.log(_PROBS[[3, 0, 4, 1, 2]]), -np.inf)]
).astype(np.float32)
_ORDER = [[0, 1, 2, 3, 4, 5], [1, 3, 4, 0, 2, 5]]  # token ids from most to least likely per row


def _mask(keep_most_likely: int) -> np.ndarray:
    out = np.zeros(_LOGITS.shape, bool)
    for row, order in enumerate(_ORDER):
        out[row, order[:keep_most_likely]] = True
    return out


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize(
    "top_k, top_p, kept",
    [
        (2, None, 2),
        (1, None, 1),
        (10, None, 5),  # more than the vocabulary: every finite logit stays, the padded one does not
        (None, 0.45, 1),  # the first token alone holds 0.5 >= 0.45
        (None, 0.6, 2),  # 0.5 + 0.2 = 0.7 >= 0.6: the smallest set reaching top_p
        (None, 0.8, 3),  # 0.85 >= 0.8
        (None, 1e-6, 1),  # always at least one token
        (None, 1.0, 5),
        (3, 0.8, 2),  # top-k first: renormalized 0.59 + 0.24 = 0.82 >= 0.8, where top-p alone keeps 3
    ],
)
def test_filter_logits_keeps_exactly_top_k_then_nucleus(backend, top_k, top_p, kept):
    if backend == "torch":
        out = tgen.filter_logits(torch.from_numpy(_LOGITS), top_k, top_p).numpy()
    else:
        out = np.asarray(jgen.filter_logits(jnp.asarray(_LOGITS), top_k, top_p))
    np.testing.assert_array_equal(np.isfinite(out), _mask(kept))
    np.testing.assert_array_equal(out[np.isfinite(out)], _LOGITS[_mask(kept)])  # survivors unchanged


# --- sampling -------------------------------------------------------------------------------


@pytest.mark.parametrize("backend", BACKENDS)
def test_seeded_sampling_is_reproducible(backend, models):
    kwargs = dict(temperature=1.0, top_k=50, top_p=0.95, stop_token=None)
    first = generate(backend, models, PROMPTS, 8, seed=3, **kwargs)
    assert generate(backend, models, PROMPTS, 8, seed=3, **kwargs) == first
    assert generate(backend, models, PROMPTS, 8, seed=4, **kwargs) != first
    assert all(len(row) == 8 and all(0 <= t < 100 for t in row) for row in first)  # never a padded id


@pytest.mark.parametrize("backend", BACKENDS)
def test_top_k_one_samples_the_greedy_tokens(backend, models):
    greedy = generate(backend, models, PROMPTS, 6, temperature=0.0, stop_token=None)
    assert generate(backend, models, PROMPTS, 6, temperature=1.5, top_k=1, seed=7, stop_token=None) == greedy


# --- the KV cache ---------------------------------------------------------------------------


@pytest.mark.parametrize("backend", BACKENDS)
def test_kv_cache_logits_equal_full_forward(backend, models, config):
    idx = np.random.default_rng(0).integers(0, 100, (2, config.block_size))
    expected = full_forward_logits(backend, models, idx)  # (B, T, V)
    model, prefill = models[backend], 5
    got = []
    if backend == "torch":
        cache = model.init_cache(2, config.block_size)
        with torch.no_grad():
            logits, cache = model.decode(torch.from_numpy(idx[:, :prefill]), cache, 0)
            got.append(logits.numpy())
            for pos in range(prefill, config.block_size):
                logits, cache = model.decode(torch.from_numpy(idx[:, pos : pos + 1]), cache, pos)
                got.append(logits.numpy())
    else:
        cache = model.init_cache(2, config.block_size)
        logits, cache = _jax_decode(model, jnp.asarray(idx[:, :prefill]), cache, 0)
        got.append(np.asarray(logits))
        for pos in range(prefill, config.block_size):
            logits, cache = _jax_decode(model, jnp.asarray(idx[:, pos : pos + 1]), cache, pos)
            got.append(np.asarray(logits))
    got = np.concatenate(got, axis=1)  # (B, T, padded V): decoding keeps the padding, at -inf
    assert np.all(np.isneginf(got[..., config.vocab_size :]))
    got = got[..., : config.vocab_size]
    finite = np.isfinite(expected)
    np.testing.assert_array_equal(np.isfinite(got), finite)
    # float32, same operations in another grouping (masked attention over the cache): rounding only.
    np.testing.assert_allclose(got[finite], expected[finite], rtol=0, atol=1e-5)


@pytest.mark.parametrize("backend", BACKENDS)
def test_a_prefill_for_one_column_gives_that_columns_logits_and_the_whole_cache(backend, models, config):
    idx = np.random.default_rng(1).integers(0, 100, (2, 6))
    model, at = models[backend], 3
    if backend == "torch":
        with torch.no_grad():
            every, every_cache = model.decode(torch.from_numpy(idx), model.init_cache(2, 8), 0)
            one, one_cache = model.decode(torch.from_numpy(idx), model.init_cache(2, 8), 0, at=at)
    else:
        every, every_cache = _jax_decode(model, jnp.asarray(idx), model.init_cache(2, 8), 0)
        one, one_cache = nnx.jit(lambda m, i, c, a: m.decode(i, c, 0, at=a))(
            model,
            jnp.asarray(idx),
            model.init_cache(2, 8),
            jnp.int32(at),  # traced, as in the JAX prefill
        )
    assert np.asarray(one).shape == (2, 1, config.padded_vocab_size)
    np.testing.assert_allclose(np.asarray(one)[:, 0], np.asarray(every)[:, at], rtol=0, atol=1e-6)
    for layer, expected in zip(one_cache, every_cache):
        for got, want in zip(layer, expected):
            np.testing.assert_array_equal(np.asarray(got), np.asarray(want))


@pytest.mark.parametrize("backend", BACKENDS)
def test_greedy_generate_equals_argmax_of_full_forward(backend, models, config):
    """No recomputation of the prefix, and no drift from it either."""
    prompt, out = PROMPTS[1], generate(backend, models, PROMPTS[1:2], 7, temperature=0.0, stop_token=None)[0]
    seq = np.zeros((1, config.block_size), np.int64)  # one shape: causal, so the padding is never seen
    seq[0, : len(prompt)] = prompt
    for pos in range(len(prompt), len(prompt) + 7):
        seq[0, pos] = full_forward_logits(backend, models, seq)[0, pos - 1].argmax()
    assert out == seq[0, len(prompt) : len(prompt) + 7].tolist()


def test_greedy_output_identical_across_backends(models):
    kwargs = dict(temperature=0.0, stop_token=None)
    assert generate("torch", models, PROMPTS, 10, **kwargs) == generate("jax", models, PROMPTS, 10, **kwargs)


@pytest.mark.parametrize("backend", BACKENDS)
def test_batched_greedy_equals_one_by_one(backend, models):
    kwargs = dict(temperature=0.0, stop_token=None)
    batched = generate(backend, models, PROMPTS, 6, **kwargs)
    assert batched == [generate(backend, models, [p], 6, **kwargs)[0] for p in PROMPTS]


@pytest.mark.parametrize("backend", BACKENDS)
def test_stop_token_ends_a_row_and_is_not_returned(backend, models):
    free = generate(backend, models, PROMPTS, 8, temperature=0.0, stop_token=None)
    stop = free[0][-1]
    cut = generate(backend, models, PROMPTS, 8, temperature=0.0, stop_token=stop)
    assert cut == [row[: row.index(stop)] if stop in row else row for row in free]


@pytest.mark.parametrize("backend", BACKENDS)
def test_on_token_sees_every_new_token_in_order(backend, models):
    seen = [[] for _ in PROMPTS]
    out = generate(backend, models, PROMPTS, 5, temperature=0.0, on_token=lambda r, t: seen[r].append(t))
    assert seen == out


# --- the decode loop without a callback ------------------------------------------------------
# Without on_token the loop runs without the host: JAX compiles it into one lax.while_loop, torch
# reads the tokens back only at the end (or every CHECK_EVERY steps to see a stop token). With
# on_token both step one token at a time and hand each over. The tokens must not differ.


def _streamed(backend, models, prompts, max_new_tokens, **kwargs):
    return generate(backend, models, prompts, max_new_tokens, on_token=lambda row, token: None, **kwargs)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize(
    "kwargs",
    [
        dict(temperature=0.0),
        dict(temperature=1.3, seed=2),
        dict(temperature=0.9, top_k=20, top_p=0.9, seed=5),
    ],
    ids=["greedy", "sampled", "filtered"],
)
def test_device_loop_equals_the_step_by_step_loop(backend, models, kwargs):
    stepped = _streamed(backend, models, PROMPTS, 12, stop_token=None, **kwargs)
    assert generate(backend, models, PROMPTS, 12, stop_token=None, **kwargs) == stepped
    assert all(len(row) == 12 for row in stepped)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("at", [0, 2, 10], ids=["first-token", "third-token", "eleventh-token"])
@pytest.mark.parametrize("rows", [3, 1], ids=["batch", "one-row"])
def test_device_loop_stops_at_the_stop_token(backend, models, at, rows):
    """Stop at row 0's new token `at` (sampled, so tokens vary): each row ends at its first stop.

    With one row, every row is done at once and the loop ends early (at once at the first token).
    """
    kwargs = dict(temperature=1.3, seed=2)
    free = generate(backend, models, PROMPTS[:rows], 12, stop_token=None, **kwargs)
    stop = free[0][at]
    expected = [row[: row.index(stop)] if stop in row else row for row in free]
    assert generate(backend, models, PROMPTS[:rows], 12, stop_token=stop, **kwargs) == expected
    assert _streamed(backend, models, PROMPTS[:rows], 12, stop_token=stop, **kwargs) == expected


@pytest.mark.parametrize("streamed", [False, True], ids=["device-loop", "streamed"])
def test_jax_pads_a_lone_prompt_with_copies_that_change_nothing(lively_models, monkeypatch, streamed):
    """On a GPU a batch of one is decoded beside copies (MIN_ROWS): greedy output, the stop token
    and the sliding window past the context are what the lone row gives alone."""
    run = _streamed if streamed else generate
    kwargs = dict(temperature=0.0, stop_token=None)
    alone = run("jax", lively_models, PROMPTS[1:2], PAST, **kwargs)
    monkeypatch.setitem(jgen.MIN_ROWS, "cpu", 3)
    assert run("jax", lively_models, PROMPTS[1:2], PAST, **kwargs) == alone
    stop = alone[0][5]
    assert run("jax", lively_models, PROMPTS[1:2], PAST, temperature=0.0, stop_token=stop) == [
        alone[0][: alone[0].index(stop)]
    ]


# --- the context window ---------------------------------------------------------------------


def sliding_window_greedy(backend: str, models, prompt: list[int], new: int, block_size: int):
    """nanoGPT's `generate` at temperature 0, no cache: each token the argmax of a full forward over
    the last block_size tokens. Also the smallest gap between the two best logits, so that a test
    can tell a real difference from a near-tie that float32 rounding decides."""
    seq, gap = list(prompt), np.inf
    for _ in range(new):
        window = np.array([seq[-block_size:]])
        last = full_forward_logits(backend, models, window)[0, -1]
        top2 = np.sort(last[np.isfinite(last)])[-2:]
        gap = min(gap, float(top2[1] - top2[0]))
        seq.append(int(last.argmax()))
    return seq[len(prompt) :], gap


# 2.5 contexts of new tokens after prompts of 3, 6 and 1 tokens: the cache, then the window.
PAST = 40


@pytest.mark.parametrize("backend", BACKENDS)
def test_greedy_past_the_context_equals_a_sliding_window_of_full_forwards(backend, lively_models, config):
    out = generate(backend, lively_models, PROMPTS, PAST, temperature=0.0, stop_token=None)
    for prompt, row in zip(PROMPTS, out):
        expected, gap = sliding_window_greedy(backend, lively_models, prompt, PAST, config.block_size)
        assert gap > 1e-2  # the cache and the forward differ by rounding only: no step is a coin toss
        assert row == expected
        assert len(set(row[config.block_size :])) > 3  # the test itself: the output keeps changing


def test_greedy_past_the_context_identical_across_backends(lively_models):
    kwargs = dict(temperature=0.0, stop_token=None)
    torch_out = generate("torch", lively_models, PROMPTS, PAST, **kwargs)
    assert torch_out == generate("jax", lively_models, PROMPTS, PAST, **kwargs)
    assert all(len(row) == PAST for row in torch_out)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize(
    "kwargs", [dict(temperature=0.0), dict(temperature=1.3, top_k=20, seed=2)], ids=["greedy", "sampled"]
)
def test_streaming_past_the_context_equals_the_device_loop(backend, lively_models, kwargs):
    models = lively_models
    streamed = _streamed(backend, models, PROMPTS, PAST, stop_token=None, **kwargs)
    assert generate(backend, models, PROMPTS, PAST, stop_token=None, **kwargs) == streamed
    stop = next(t for t in streamed[0][20:] if t not in streamed[0][:20])  # first seen past the context
    expected = [row[: row.index(stop)] if stop in row else row for row in streamed]
    assert len(expected[0]) >= 20  # row 0 stops past the context (3 + 20 > 16)
    assert generate(backend, models, PROMPTS, PAST, stop_token=stop, **kwargs) == expected
    assert _streamed(backend, models, PROMPTS, PAST, stop_token=stop, **kwargs) == expected


@pytest.mark.parametrize("backend", BACKENDS)
def test_prompt_past_the_context_keeps_its_last_block_size_tokens(backend, lively_models, config):
    models = lively_models
    long_prompt = [int(t) for t in np.random.default_rng(1).integers(0, 100, 3 * config.block_size)]
    kwargs = dict(temperature=0.0, stop_token=None)
    out = generate(backend, models, [long_prompt], 20, **kwargs)
    assert out == generate(backend, models, [long_prompt[-config.block_size :]], 20, **kwargs)
    assert out[0] == sliding_window_greedy(backend, models, long_prompt, 20, config.block_size)[0]


@pytest.mark.parametrize("stop_token", [None, 7])
def test_a_block_of_positions_collects_what_one_position_at_a_time_does(stop_token):
    rng = np.random.default_rng(0)
    lengths, start, max_new = [3, 5, 13, 4], 3, 4
    stream = rng.integers(0, 7, size=(len(lengths), 12)).tolist()  # positions 3..14, no 7
    stream[1][4] = 7  # row 1 meets the stop token at position 7, inside its first 4 new tokens
    by_position, by_block = ([] for _ in range(2))
    one = RowCollector(lengths, max_new, stop_token, lambda row, token: by_position.append((row, token)))
    for offset, column in enumerate(zip(*stream)):
        one.add(start + offset, list(column))
    block = RowCollector(lengths, max_new, stop_token, lambda row, token: by_block.append((row, token)))
    block.add_block(start, [row[:5] for row in stream])  # in two blocks
    block.add_block(start + 5, [row[5:] for row in stream])
    assert block.tokens == one.tokens
    assert block.done == one.done == [True, True, False, True]  # row 2 has 2 of its 4 tokens
    assert sorted(by_block) == sorted(by_position)  # every token once; rows in turn, not interleaved
    assert [t for row, t in by_block if row == 0] == one.tokens[0]
    if stop_token is None:
        assert one.tokens[1] == stream[1][2:6]
    else:
        assert one.tokens[1] == stream[1][2:4]  # cut before the stop token, which is not kept


def test_crop_and_bucket_lengths():
    assert crop_prompts([[1, 2, 3, 4, 5]], 200, 3) == [[3, 4, 5]]  # any number of new tokens
    assert crop_prompts([[1, 2]], 2, 5) == [[1, 2]]
    assert cache_length([[1] * 3, [1] * 9], 4, 1024) == 64  # 9 + 4 - 1 = 12 slots, one bucket
    assert cache_length([[1] * 100], 100, 150) == 150  # never past the context
    assert cached_positions([[1] * 3, [1] * 9], 4, 1024) == (12, 12)  # all in the cache
    assert cached_positions([[1] * 3], 200, 128) == (128, 202)  # positions 129..202: the window
    assert [prefill_length(n, 64) for n in (1, 2, 3, 9, 40)] == [1, 2, 4, 16, 64]
    with pytest.raises(BabyGPTError, match="prompt is empty"):
        crop_prompts([[1], []], 2, 16)


def test_jax_steps_compile_once_per_bucket(models):
    """A new prompt length, max_new_tokens, stop token or sampling value in the same bucket reuses
    the compiled steps, the whole decode loop included."""
    steps = jgen._compiled_steps(False, True, False)
    generate("jax", models, PROMPTS, 3, top_k=5, seed=1)
    before = [f._cache_size() for f in steps]
    generate("jax", models, [[1], [2, 3], [4, 5, 6, 7, 8]], 5, top_k=9, top_p=0.5, temperature=0.3, seed=2)
    generate("jax", models, [[7], [8, 9], [1, 2, 3]], 9, top_k=3, temperature=1.5, stop_token=None)
    assert [f._cache_size() for f in steps] == before


# --- the framework-free core ----------------------------------------------------------------


@pytest.mark.parametrize(
    "changes, message",
    [
        (dict(temperature=-0.1), "temperature must be >= 0"),
        (dict(top_p=0.0), "top-p must be in"),
        (dict(top_p=1.5), "top-p must be in"),
        (dict(top_k=0), "top-k must be >= 1"),
        (dict(max_tokens=0), "max tokens must be >= 1"),
    ],
)
def test_sampling_settings_reject_bad_values_in_one_line(changes, message):
    with pytest.raises(BabyGPTError, match=message) as info:
        SamplingSettings(**changes)
    assert "\n" not in str(info.value)
    assert SamplingSettings(temperature=0.0, top_p=1.0, top_k=1).temperature == 0.0


def test_stream_decoder_holds_a_split_emoji_until_complete():
    enc = get_tokenizer()
    tokens = enc.encode(" smile 😀 ok")  # the emoji's four bytes come in two tokens
    assert [enc.decode_single_token_bytes(t) for t in tokens][1:3] == [b" \xf0\x9f\x98", b"\x80"]
    decoder = StreamDecoder.for_tokenizer(enc)
    pieces = [decoder.feed(t) for t in tokens]
    assert pieces == [" smile", " ", "😀", " ok"]
    assert "".join(pieces) + decoder.flush() == enc.decode(tokens)
    cut = StreamDecoder.for_tokenizer(enc)
    assert cut.feed(tokens[1]) + cut.flush() == enc.decode(tokens[1:2])  # an unfinished character: U+FFFD
