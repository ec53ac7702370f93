"""Text generation with a KV cache in PyTorch: prefill once, then one token per step, in place.

The mirror of `babygpt_jax/generate.py`: the same filters and the same batch layout. The paradigm
shows in the cache (a buffer `decode` writes in place, here; a value returned by a jitted step,
there), the randomness (a seeded `torch.Generator` instead of a split `jax.random` key) and the
loop: Python steps through the positions, and on CUDA each step replays a CUDA graph
(`torch.compile(mode="reduce-overhead")`) over buffers at fixed addresses, where JAX compiles the
whole loop into one `lax.while_loop`.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F

from babygpt.kernel_blocks import BATCH_FROM, supported
from babygpt.sampling import RowCollector, cache_length, cached_positions, crop_prompts
from babygpt_torch.model import GPT

# Without a per-token callback, tokens stay on the device and the host looks for the stop token
# every this many steps (without a stop token, only at the end), so the GPU never waits for Python.
CHECK_EVERY = 8


def load_model(path: str | Path) -> GPT:
    """A Hugging Face GPT-2 directory, ready to sample: on a GPU if there is one (bfloat16 autocast)."""
    device = "cuda" if torch.cuda.is_available() else "cpu"
    return GPT.from_pretrained(path).to(device)


def wait_until_idle() -> None:
    """Return once the device has finished every kernel launched so far (on CUDA; the CPU runs
    each op to its end before Python continues). Called after a Ctrl-C, before the next sample."""
    if torch.cuda.is_initialized():
        torch.cuda.synchronize()


def filter_logits(logits: torch.Tensor, top_k: int | None = None, top_p: float | None = None) -> torch.Tensor:
    """(B, V) logits with every token outside the top-k, then outside the top-p nucleus, set to -inf.

    Exactly Hugging Face's `TopKLogitsWarper` then `TopPLogitsWarper` (min_tokens_to_keep=1): top-k
    cuts by value, so every token tied with the k-th most likely stays; top-p then drops, from the
    least likely up, each token whose probability and all smaller ones add up to at most 1 - top_p,
    always keeping the most likely; tied tokens are ordered by id (a stable sort). top_p = 1 is off,
    as in `generate`. One sort serves both.
    """
    V = logits.size(-1)
    k = V if top_k is None else min(max(top_k, 1), V)
    p = 1.0 if top_p is None else top_p
    order = torch.argsort(logits, dim=-1, stable=True)  # (B, V) ascending
    sorted_logits = logits.gather(-1, order)
    kth = sorted_logits[..., V - k, None]  # (B, 1) the k-th largest value
    sorted_logits = sorted_logits.masked_fill(sorted_logits < kth, float("-inf"))
    mass = torch.cumsum(F.softmax(sorted_logits, dim=-1), dim=-1)  # this token and all less likely
    drop = (sorted_logits == float("-inf")) | ((mass <= 1 - p) & (p < 1))
    drop[..., -1] = False
    drop = torch.zeros_like(drop).scatter(-1, order, drop)
    return logits.masked_fill(drop, float("-inf"))


def sample(
    logits: torch.Tensor,
    generator: torch.Generator | None,
    temperature: float = 1.0,
    top_k: int | None = None,
    top_p: float | None = None,
) -> torch.Tensor:
    """One token per row of (B, V) logits: argmax at temperature 0, else a draw from the filtered softmax.

    Eager: temperature is a Python number, so greedy returns before any draw is made.
    """
    logits = logits.float()
    if temperature == 0:
        return torch.argmax(logits, dim=-1)
    scaled = logits / temperature
    if top_k is not None or top_p is not None:
        scaled = filter_logits(scaled, top_k, top_p)
    sampled = torch.multinomial(F.softmax(scaled, dim=-1), 1, generator=generator)[:, 0]  # (B,)
    return sampled


@torch.inference_mode()
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
    through a full forward over the window (`window_logits`): the positions shift under every token,
    so no cached key or value stays valid. That costs a full forward per token (the tied head on
    the last position only, as nanoGPT): on the default model about 150 MFLOP against 11 MFLOP for
    a cached step, some milliseconds on a CPU core. An amortised
    re-prefill (refill the cache with the last half of the window every block_size / 2 tokens)
    would cost about two cached steps per token, but would condition on fewer tokens than nanoGPT
    does and give other text; exact is affordable here, so it is exact. Prompts keep their last `block_size` tokens
    (`babygpt.sampling.crop_prompts`), which is all the first new token can see anyway.
    `on_token(row, token)` is called for each new token as it is chosen; without it the host reads
    the in-context tokens every CHECK_EVERY steps (with a stop token) or once at the end of them
    (without one); past the context the host reads each token, one full forward per read.
    `compile` (default: on CUDA only) replays the decode step as a CUDA graph (`torch.compile`).
    `fused` makes that step the hand-written kernels of `babygpt_torch/kernels.py`, in a CUDA
    graph of their own: for a lone prompt, 6 a layer instead of ~12; from BATCH_FROM to 32 rows,
    a LayerNorm and tensor-core GEMM kernels around the attention kernel; past 32 rows, the
    attention kernel alone, inside the model's own modules (compiled as above). Default: on a
    GPU, for one row or BATCH_FROM and more, the cases where they were measured faster
    (docs/performance.md).
    """
    config = model.config
    prompts = crop_prompts(prompts, max_new_tokens, config.block_size)
    lengths = [len(p) for p in prompts]
    shortest = min(lengths)
    B, S = len(prompts), cache_length(prompts, max_new_tokens, config.block_size)
    cached_last, last = cached_positions(prompts, max_new_tokens, config.block_size)
    # Every row's token at every position: the prompts, then what decoding chooses. At least one
    # column more than the cache, because the last chosen token is never fed back.
    padded = torch.zeros(B, max(S, last) + 1, dtype=torch.long)
    for row, prompt in enumerate(prompts):
        padded[row, : len(prompt)] = torch.tensor(prompt)
    device = model.lm_head.weight.device
    on_gpu = device.type == "cuda"
    dtype = torch.bfloat16 if on_gpu else torch.float32
    compile = on_gpu if compile is None else compile
    fused = (
        compile and on_gpu and (B == 1 or B >= BATCH_FROM) and _kernels_fit(model) if fused is None else fused
    )
    buffers, (prepare, logits_at, commit, greedy_step, window_logits) = _compiled_steps(
        model, B, S, device, dtype, compile, fused
    )
    prepare()
    cache, tokens, lengths_t, pos_t = buffers
    tokens.copy_(padded[:, : S + 1])
    padded = padded.to(device)
    lengths_t.copy_(torch.tensor(lengths))
    generator = torch.Generator(device).manual_seed(seed)
    collector = RowCollector(lengths, max_new_tokens, stop_token, on_token)

    def step(pos: int) -> None:
        """Choose every row's token at pos + 1: greedy wholly in the step, else sampled after it."""
        pos_t.fill_(pos)
        if temperature == 0:
            greedy_step()
        else:
            commit(sample(logits_at(), generator, temperature, top_k, top_p))

    was_training = model.training
    model.eval()
    try:
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=on_gpu):
            logits, _ = model.decode(tokens[:, :shortest], cache, 0, at=shortest - 1)  # (B, 1, V)
            pos_t.fill_(shortest - 1)
            commit(sample(logits[:, 0], generator, temperature, top_k, top_p))
            seen = shortest  # the first position the collector has not read
            for pos in range(shortest, cached_last + 1):
                due = stop_token is not None and (pos + 1 - shortest) % CHECK_EVERY == 0
                if on_token is not None or due or pos == cached_last:
                    collector.add_block(seen, tokens[:, seen : pos + 1].tolist())
                    seen = pos + 1
                    if collector.finished:
                        break
                if pos == cached_last:
                    break
                step(pos)
            padded[:, : S + 1] = tokens

            # Past the context every row samples (prompts fit it), one full forward over its window each.
            for pos in range(cached_last + 1, last + 1):
                if collector.finished:
                    break
                window = padded[:, pos - config.block_size : pos]  # (B, block_size)
                padded[:, pos] = sample(window_logits(window), generator, temperature, top_k, top_p)
                collector.add(pos, padded[:, pos].tolist())
    finally:
        model.train(was_training)
    return collector.tokens


def _kernels_fit(model) -> bool:
    try:
        from babygpt_torch import kernels  # noqa: F401 (whether triton is there)
    except ImportError:
        return False
    weights = model.lm_head.weight.dtype
    return weights in (torch.float32, torch.bfloat16) and supported(model.config)


@functools.lru_cache(maxsize=4)
def _compiled_steps(
    model,
    batch_size: int,
    cache_len: int,
    device: torch.device,
    dtype: torch.dtype,
    compile: bool,
    fused: bool = False,
):
    """The decode buffers and the (compiled) one-token decode step, built once per shape.

    Buffers: the KV cache, every row's token at every position (B, S + 1), the prompt lengths (B,)
    and the position the next step decodes (1,). Steps: `prepare()`, called once per generate
    (the fused kernels take their bfloat16 weights again, in case training changed them),
    `logits_at()`, `commit(token)`, which writes every row's token at the next position,
    `greedy_step()`, the two with argmax between, and `window_logits(window)`, past the context.
    Capturable as a CUDA graph: fixed shapes, the position a device tensor, no read back to the
    host, and every buffer at a fixed address, so a graph replays with new values, not new tensors.
    """
    cache = model.init_cache(batch_size, cache_len, dtype)
    tokens = torch.zeros(batch_size, cache_len + 1, dtype=torch.long, device=device)
    lengths = torch.zeros(batch_size, dtype=torch.long, device=device)
    pos = torch.zeros(1, dtype=torch.long, device=device)

    def logits_at() -> torch.Tensor:
        """(B, V) logits for the token after `pos`, from the token every row holds at `pos`."""
        logits, _ = model.decode(tokens.index_select(1, pos), cache, pos)  # (B, 1, V)
        return logits[:, -1].float()

    def commit(token: torch.Tensor) -> None:
        """Write every row's token at pos + 1: its prompt's while inside it, else `token`."""
        nxt = pos + 1
        prompt_token = tokens.index_select(1, nxt)[:, 0]
        tokens.index_copy_(1, nxt, torch.where(nxt < lengths, prompt_token, token)[:, None])

    def greedy_step() -> None:
        commit(torch.argmax(logits_at(), dim=-1))

    def window_logits(window: torch.Tensor) -> torch.Tensor:
        """(B, V) logits for the token after a (B, block_size) window, from a full forward: past the
        context. `GPT._logits` with the tied head on the last position only, as nanoGPT's
        `forward` does at inference: the head over every position would cost most of the forward
        on a small model. Eager: the forward over the whole window is the cost, not its launches."""
        h = model.transformer
        x = h.wte(window) + h.wpe(torch.arange(window.size(1), device=window.device))  # (B, T, C)
        for block in h.h:
            x, _ = block(x)
        return model.head(h.ln_f(x[:, -1])).float()  # (B, V)

    buffers = (cache, tokens, lengths, pos)
    static = [tokens, lengths, pos, *(t for layer in cache for t in layer)]
    if fused:
        from babygpt_torch import kernels
    if fused and batch_size >= BATCH_FROM and not kernels.rows_fit(model.config, batch_size):
        # a large batch: the model's modules around the attention kernel, compiled below
        y = torch.zeros(batch_size, model.config.n_embd, dtype=dtype, device=device)  # attention's output
        static.append(y)
        logits_at = lambda: kernels.batch_decode(model, tokens, pos, cache, y)  # noqa: F811
        greedy_step = lambda: kernels.greedy(logits_at(), tokens, lengths, pos)  # noqa: F811
    elif fused:  # the whole step in hand-written kernels, replayed as a CUDA graph (kernels.py)
        decoder = kernels.FusedDecoder(model, batch_size, cache_len)
        logits_at = lambda: decoder.logits(tokens, pos, cache)  # noqa: F811
        greedy_step = lambda: decoder.greedy(tokens, lengths, pos, cache)  # noqa: F811
        graphed = (kernels.cuda_graph(logits_at), kernels.cuda_graph(greedy_step))
        return buffers, (decoder.refresh, graphed[0], commit, graphed[1], window_logits)
    if not compile:
        return buffers, (lambda: None, logits_at, commit, greedy_step, window_logits)
    for buffer in static:
        torch._dynamo.mark_static_address(buffer)  # written in place by the graph, never moved
    # reduce-overhead: CUDA graphs; fullgraph: a host sync (a graph break) fails loudly, not slowly.
    options = dict(mode="reduce-overhead", fullgraph=True, dynamic=False)
    steps = (
        lambda: None,
        torch.compile(logits_at, **options),
        commit,
        torch.compile(greedy_step, **options),
        window_logits,
    )
    return buffers, steps
