"""Text generation with a KV cache in JAX: prefill once, then the whole decode loop on the device.

The mirror of `babygpt_torch/generate.py`: the same filters and the same batch layout.
The paradigm shows in the cache (a value each jitted step takes and returns, donated so XLA updates
it in place, rather than a buffer written in place), the randomness (a `jax.random` key folded with
the position, sampled inside the jit) and compilation: the model is `nnx.split` once into a static
graph and its parameters, and the steps are compiled for static shapes (the cache length and the
prefill width are rounded up to buckets, `babygpt.sampling`), so a new prompt length, a new
temperature, top-k or top-p does not recompile. Without a per-token callback the decode loop itself
is compiled (`lax.while_loop`), so the host waits once per call, not once per token.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from babygpt.kernel_blocks import BATCH_FROM, supported
from babygpt.sampling import RowCollector, cache_length, cached_positions, crop_prompts, prefill_length
from babygpt_jax.model import GPT

# The fewest rows decoded at once, per JAX backend (a batch of one is padded with copies).
MIN_ROWS = {"gpu": 4}
# On a GPU, XLA replays the decode loop's body as a CUDA graph, but by default returns to the host
# for each loop test; with WHILE and CONDITIONAL the whole loop is one graph (XLA's defaults plus
# those two; a CPU ignores them). docs/performance.md has the measurement.
LOOP_OPTIONS = {
    "xla_gpu_enable_command_buffer": "FUSION,CUBLAS,CUBLASLT,CUSTOM_CALL,CUDNN,DYNAMIC_SLICE_FUSION,WHILE,CONDITIONAL"
}


def load_model(path: str | Path) -> GPT:
    """A Hugging Face GPT-2 directory, ready to sample: bfloat16 compute on a GPU, float32 on CPU."""
    dtype = jnp.bfloat16 if jax.default_backend() == "gpu" else jnp.float32
    return GPT.from_pretrained(path, dtype=dtype)


def wait_until_idle() -> None:
    """Return once the device has finished every computation dispatched so far.

    After a Ctrl-C the host stops, but a dispatched step may still be running; tearing the
    interpreter (and XLA's runtime) down under it crashed with a segmentation fault. Waiting on
    every live array waits on every computation that can still write one (a donated array is
    deleted, not waited on: its computation writes the array that replaced it).
    """
    jax.block_until_ready([a for a in jax.live_arrays() if not a.is_deleted()])


def filter_logits(logits: jax.Array, top_k: int | jax.Array | None = None, top_p=None) -> jax.Array:
    """(B, V) logits with every token outside the top-k, then outside the top-p nucleus, set to -inf.

    Exactly Hugging Face's `TopKLogitsWarper` then `TopPLogitsWarper` (min_tokens_to_keep=1): top-k
    cuts by value, so every token tied with the k-th most likely stays; top-p then drops, from the
    least likely up, each token whose probability and all smaller ones add up to at most 1 - top_p,
    always keeping the most likely; tied tokens are ordered by id (a stable sort). top_p = 1 is off,
    as in `generate`. One sort serves both. top_k and top_p may be traced: no recompile per value.
    """
    V = logits.shape[-1]
    k = V if top_k is None else jnp.clip(top_k, 1, V)
    p = 1.0 if top_p is None else top_p
    order = jnp.argsort(logits, axis=-1, stable=True)  # (B, V) ascending
    sorted_logits = jnp.take_along_axis(logits, order, axis=-1)
    kth = sorted_logits[..., V - k, None]  # (B, 1) the k-th largest value
    sorted_logits = jnp.where(sorted_logits < kth, -jnp.inf, sorted_logits)
    mass = jnp.cumsum(jax.nn.softmax(sorted_logits, axis=-1), axis=-1)  # this token and all less likely
    drop = (sorted_logits == -jnp.inf) | ((mass <= 1 - p) & (p < 1))
    drop = drop.at[..., -1].set(False)
    drop = jnp.put_along_axis(jnp.zeros_like(drop), order, drop, axis=-1, inplace=False)
    return jnp.where(drop, -jnp.inf, logits)


def sample(
    logits: jax.Array,
    key: jax.Array,
    temperature=1.0,
    top_k: int | jax.Array | None = None,
    top_p=None,
) -> jax.Array:
    """One token per row of (B, V) logits: argmax at temperature 0, else a draw from the filtered softmax.

    Traceable: temperature may be an array, so greedy and sampled are both computed and one chosen.
    """
    logits = logits.astype(jnp.float32)
    greedy = jnp.argmax(logits, axis=-1)
    scaled = logits / jnp.where(temperature > 0, temperature, 1.0)
    if top_k is not None or top_p is not None:
        scaled = filter_logits(scaled, top_k, top_p)
    sampled = jax.random.categorical(key, scaled, axis=-1)  # (B,)
    return jnp.where(temperature > 0, sampled, greedy)


def generate(
    model,
    prompts: list[list[int]],
    max_new_tokens: int,
    *,
    temperature: float = 1.0,
    top_k: int | None = None,
    top_p: float | None = None,
    seed: int = 0,
    stop_token: int | None = 50256,
    on_token: Callable[[int, int], None] | None = None,
    compile: bool | None = None,
    fused: bool | None = None,
) -> list[list[int]]:
    """The new tokens of each prompt (at most max_new_tokens, ending before stop_token).

    Batch layout: prompts are right-padded and every row steps through the same positions,
    starting after the shortest prompt; a row still inside its own (longer) prompt is fed its next
    prompt token instead of a sample. So each row sees exactly its own tokens at its own positions,
    and a batch gives each prompt's greedy output alone.
    Past the context: exactly nanoGPT's sliding window. Each token is conditioned on the last
    `block_size` tokens of its row; while the sequence fits, through the KV cache, and after that
    through a full forward over the window (`window_step`): the positions shift under every token,
    so no cached key or value stays valid. That costs a full forward per token (the tied head on
    the last position only, as nanoGPT): on the default model about 150 MFLOP against 11 MFLOP for
    a cached step, some milliseconds on a CPU core. An amortised
    re-prefill (refill the cache with the last half of the window every block_size / 2 tokens)
    would cost about two cached steps per token, but would condition on fewer tokens than nanoGPT
    does and give other text; exact is affordable here, so it is exact. Prompts keep their last `block_size` tokens
    (`babygpt.sampling.crop_prompts`), which is all the first new token can see anyway.
    `on_token(row, token)` is called for each new token as it is chosen; without it the whole
    in-context decode loop runs on the device in one call, and the host reads the tokens once at
    the end of it; past the context the host reads each token, one full forward per read.
    `compile` is torch's switch for CUDA graphs; JAX always compiles its steps, so it changes nothing.
    `fused` makes the decode step the hand-written kernels of `babygpt_jax/kernels.py`: for a
    lone prompt, 6 a layer instead of ~20 XLA fusions; from BATCH_FROM rows, the attention
    kernel alone, inside the model's own GEMMs. Default: on a GPU in bfloat16, for one row or
    BATCH_FROM and more, the cases where they were measured faster (docs/performance.md).
    """
    config = model.config
    prompts = crop_prompts(prompts, max_new_tokens, config.block_size)
    B = len(prompts)
    fused = (B == 1 or B >= BATCH_FROM) and _kernels_fit(model) if fused is None else fused
    # XLA turns a one-row matmul into a multiply and a reduction, which on a GPU is slower than
    # the matrix kernel it uses for a few rows (docs/performance.md): a lone prompt is decoded
    # beside copies of itself, which are done from the start and dropped (the fused kernels pad
    # rows themselves).
    prompts = prompts + prompts[:1] * ((1 if fused else MIN_ROWS.get(jax.default_backend(), 1)) - B)
    lengths = [len(p) for p in prompts]
    shortest = min(lengths)
    rows, S = len(prompts), cache_length(prompts, max_new_tokens, config.block_size)
    cached_last, last = cached_positions(prompts, max_new_tokens, config.block_size)
    # Every row's token at every position: the prompts, then what decoding chooses. At least one
    # column more than the cache, because the last chosen token is never fed back.
    padded = np.zeros((rows, max(S, last) + 1), np.int32)
    for row, prompt in enumerate(prompts):
        padded[row, : len(prompt)] = prompt
    # A Module is a pytree: the jitted steps take it whole (flattening GPT-2 124M takes ~1 ms on a
    # 2-core CPU, where nnx.split walks its object graph in Python in ~5 ms: a cost on every call).
    prefill, step, decode_loop, window_step, weights_of = _compiled_steps(
        temperature == 0, top_k is not None or top_p is not None, fused
    )
    tokens, lengths_arr = jnp.asarray(padded[:, : S + 1]), jnp.asarray(lengths, jnp.int32)
    chunk = tokens[:, : prefill_length(shortest, S)]
    # Traced, so a new value reuses the compiled steps.
    settings = (
        jnp.float32(temperature),
        jnp.int32(config.padded_vocab_size if top_k is None else top_k),
        jnp.float32(1.0 if top_p is None else top_p),
    )
    key = jax.random.key(seed)
    collector = RowCollector(lengths[:B], max_new_tokens, stop_token, on_token)

    if on_token is None:
        ends = (lengths_arr + max_new_tokens - 1).at[B:].set(-1)  # each row's last position
        stop = jnp.int32(-1 if stop_token is None else stop_token)  # -1: no token id matches
        padded[:, : S + 1] = decode_loop(
            model,
            chunk,
            jnp.int32(shortest),
            jnp.int32(cached_last),
            tokens,
            lengths_arr,
            ends,
            stop,
            key,
            settings,
        )
        collector.add_block(shortest, padded[:B, shortest : cached_last + 1].tolist())
    else:
        cache = model.init_cache(rows, S, model.dtype)
        cache, token = prefill(model, cache, chunk, jnp.int32(shortest), tokens, lengths_arr, key, settings)
        weights = weights_of(model, rows)  # once per call, not once per token
        for pos in range(shortest, cached_last + 1):
            padded[:, pos] = np.asarray(token)
            collector.add(pos, padded[:B, pos].tolist())
            if collector.finished or pos == cached_last:
                break
            cache, token = step(
                model, weights, cache, token, jnp.int32(pos), tokens, lengths_arr, key, settings
            )

    # Past the context every row samples (prompts fit it), one full forward over its window each.
    for pos in range(cached_last + 1, last + 1):
        if collector.finished:
            break
        window = jnp.asarray(padded[:, pos - config.block_size : pos])  # (B, block_size)
        padded[:, pos] = np.asarray(window_step(model, window, jnp.int32(pos), key, settings))
        collector.add(pos, padded[:B, pos].tolist())
    return collector.tokens


def _kernels_fit(model) -> bool:
    return jax.default_backend() == "gpu" and model.dtype == jnp.bfloat16 and supported(model.config)


@functools.cache
def _compiled_steps(greedy: bool, filtered: bool, fused: bool = False):
    """The jitted prefill, decode step, whole decode loop and window step (greedy or sampled, and
    filters), each taking the model as its first argument (jax.jit compiles them once per model
    structure), and `weights_of(model, rows)`: what the fused kernels read (None without them). Greedy
    is compiled apart: a greedy step draws no random numbers."""
    from babygpt_jax import kernels

    def eval_mode(model):
        """A copy of the traced model without dropout; the caller's model keeps its mode. Runs
        while tracing only: the split and merge cost nothing per call."""
        model = nnx.merge(*nnx.split(model))  # a copy this trace may change
        model.eval()
        return model

    def choose(logits, pos, tokens, lengths, key, settings):
        """The token every row holds at `pos`: its prompt's while inside it, else a sample."""
        temperature, top_k, top_p = settings
        filters = (top_k, top_p) if filtered else (None, None)
        if greedy:
            sampled = jnp.argmax(logits, axis=-1)
        else:
            sampled = sample(logits, jax.random.fold_in(key, pos), temperature, *filters)
        prompt_token = jnp.take(tokens, pos, axis=1, mode="clip")
        return jnp.where(pos < lengths, prompt_token, sampled).astype(jnp.int32)

    def prefill(model, cache, chunk, n, tokens, lengths, key, settings):
        # chunk (B, width) is the prompts past the shortest one's n tokens too: their keys and
        # values are overwritten by the decode steps before any step can attend to them.
        logits, cache = eval_mode(model).decode(chunk, cache, 0, at=n - 1)  # (B, 1, V)
        return cache, choose(logits[:, 0], n, tokens, lengths, key, settings)

    def weights_of(model, rows: int):
        # A batch's fused path (BATCH_FROM rows) reads the model's own weights, not these copies.
        return kernels.decode_weights(eval_mode(model)) if fused and rows < BATCH_FROM else None

    def step(model, weights, cache, token, pos, tokens, lengths, key, settings):
        if fused:  # the same step in hand-written kernels (kernels.py)
            logits, cache = kernels.fused_decode(eval_mode(model), weights, token, cache, pos)  # (B, V)
        else:
            logits, cache = eval_mode(model).decode(token[:, None], cache, pos)  # (B, 1, V)
            logits = logits[:, 0]
        return cache, choose(logits, pos + 1, tokens, lengths, key, settings)

    def decode_loop(model, chunk, n, last, tokens, lengths, ends, stop, key, settings):
        """Prefill, then decode steps in a `lax.while_loop` until position `last` or every row is done.

        The cache is made and consumed inside, so it never leaves the device; the loop carries it,
        the (B, S + 1) tokens, a done-mask and the position. Returns the tokens.
        """
        B, S = tokens.shape[0], tokens.shape[1] - 1
        model = eval_mode(model)

        def write(tokens, token, pos):
            done = (pos >= ends) | ((pos >= lengths) & (token == stop))  # (B,)
            return jax.lax.dynamic_update_index_in_dim(tokens, token, pos, axis=1), done

        cache, token = prefill(
            model, model.init_cache(B, S, model.dtype), chunk, n, tokens, lengths, key, settings
        )
        tokens, done = write(tokens, token, n)
        weights = weights_of(model, B)

        def not_done(carry):
            pos, _, _, done = carry
            return (pos < last) & ~jnp.all(done)

        def body(carry):
            pos, cache, tokens, done = carry
            token = jax.lax.dynamic_index_in_dim(tokens, pos, axis=1, keepdims=False)
            cache, token = step(model, weights, cache, token, pos, tokens, lengths, key, settings)
            tokens, now_done = write(tokens, token, pos + 1)
            return pos + 1, cache, tokens, done | now_done

        return jax.lax.while_loop(not_done, body, (n, cache, tokens, done))[2]

    def window_step(model, window, pos, key, settings):
        """The token every row holds at `pos`, from a full forward over the (B, block_size) window
        of tokens before it: past the context, where every row samples."""
        temperature, top_k, top_p = settings
        filters = (top_k, top_p) if filtered else (None, None)
        model = eval_mode(model)
        h = model.transformer
        # GPT._logits with the tied head on the last position only, as nanoGPT's forward does at
        # inference: the head over every position would cost most of the forward on a small model.
        x = h.wte(window) + h.wpe(jnp.arange(window.shape[1]))  # (B, T, C)
        for block in h.h:
            x, _ = block(x)
        logits = model.head(h.ln_f(x[:, -1]))  # (B, V)
        return sample(logits, jax.random.fold_in(key, pos), temperature, *filters).astype(jnp.int32)

    return (
        jax.jit(prefill, donate_argnums=1),
        jax.jit(step, donate_argnums=2),
        jax.jit(decode_loop, donate_argnums=4, compiler_options=LOOP_OPTIONS),
        jax.jit(window_step),
        jax.jit(weights_of, static_argnums=1),
    )
