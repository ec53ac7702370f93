"""Text generation with a KV cache in PyTorch: prefill once, then one token per step, in place.

The mirror of `babygpt_jax/generate.py`: the same filters, the same batch layout and the same loop.
The paradigm shows in the cache (a buffer `decode` writes in place, here; a value returned by a
jitted step, there), the randomness (a seeded `torch.Generator` instead of a split `jax.random`
key) and compilation (an optional `torch.compile` of the decode step instead of `jax.jit`).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F

from babygpt.sampling import RowCollector, cache_length, crop_prompts

# Without a per-token callback, tokens stay on the device and the host checks for stop tokens
# every this many steps, so a GPU is not made to wait for Python after every token.
CHECK_EVERY = 8


def filter_logits(logits: torch.Tensor, top_k: int | None = None, top_p: float | None = None) -> torch.Tensor:
    """(B, V) logits with every token outside the top-k and outside the top-p nucleus set to -inf.

    top-k applies first; top-p then keeps the smallest set of the most likely tokens whose
    probability adds up to at least top_p (at least one token). One sort serves both; tokens tied
    with the last kept one are kept too.
    """
    V = logits.size(-1)
    k = V if top_k is None else min(top_k, V)
    p = 1.0 if top_p is None else top_p
    sorted_logits = torch.sort(logits, dim=-1, descending=True).values  # (B, V)
    rank = torch.arange(V, device=logits.device)
    sorted_logits = sorted_logits.masked_fill(rank >= k, float("-inf"))
    probs = F.softmax(sorted_logits, dim=-1)
    mass_before = torch.cumsum(probs, dim=-1) - probs
    keep = (rank < k) & (sorted_logits > float("-inf")) & ((mass_before < p) | (p >= 1.0))
    n_keep = keep.sum(dim=-1, keepdim=True).clamp(min=1)  # (B, 1)
    threshold = sorted_logits.gather(-1, n_keep - 1)
    return logits.masked_fill(logits < threshold, float("-inf"))


def sample(
    logits: torch.Tensor,
    generator: torch.Generator | None,
    temperature: float = 1.0,
    top_k: int | None = None,
    top_p: float | None = None,
) -> torch.Tensor:
    """One token per row of (B, V) logits: argmax at temperature 0, else a draw from the filtered softmax."""
    logits = logits.float()
    if temperature == 0:
        return torch.argmax(logits, dim=-1)
    if top_k is not None or top_p is not None:
        logits = filter_logits(logits / temperature, top_k, top_p)
    else:
        logits = logits / temperature
    probs = F.softmax(logits, dim=-1)
    return torch.multinomial(probs, 1, generator=generator)[:, 0]  # (B,)


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
    compile: bool = False,
) -> list[list[int]]:
    """The new tokens of each prompt (at most max_new_tokens, ending before stop_token).

    Batch layout: prompts are right-padded and every row steps through the same positions,
    starting after the shortest prompt; a row still inside its own (longer) prompt is fed its next
    prompt token instead of a sample. So each row sees exactly its own tokens at its own positions,
    and a batch gives each prompt's greedy output alone. Prompts longer than
    `block_size - max_new_tokens` keep their last tokens (`babygpt.sampling.crop_prompts`).
    `on_token(row, token)` is called for each new token as it is chosen.
    """
    config = model.config
    prompts = crop_prompts(prompts, max_new_tokens, config.block_size)
    lengths = [len(p) for p in prompts]
    shortest, longest = min(lengths), max(lengths)
    B, S = len(prompts), cache_length(prompts, max_new_tokens, config.block_size)
    device = model.lm_head.weight.device
    on_gpu = device.type == "cuda"
    cache = model.init_cache(B, S, torch.bfloat16 if on_gpu else torch.float32)
    padded = torch.zeros(B, longest, dtype=torch.long)
    for row, prompt in enumerate(prompts):
        padded[row, : len(prompt)] = torch.tensor(prompt)
    padded = padded.to(device)  # (B, T)
    lengths_t = torch.tensor(lengths, device=device)
    generator = torch.Generator(device).manual_seed(seed)
    decode = torch.compile(model.decode) if compile else model.decode

    def choose(logits: torch.Tensor, pos: int) -> torch.Tensor:
        """The token every row holds at `pos`: its prompt's while inside it, else a sample."""
        sampled = sample(logits, generator, temperature, top_k, top_p)
        if pos >= longest:
            return sampled
        return torch.where(pos < lengths_t, padded[:, pos], sampled)

    was_training = model.training
    model.eval()
    collector = RowCollector(lengths, max_new_tokens, stop_token, on_token)
    try:
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=on_gpu):
            logits, cache = decode(padded[:, :shortest], cache, 0)
            token = choose(logits[:, -1], shortest)  # (B,)
            last = longest + max_new_tokens - 1  # the last position any row needs
            pending = []
            for pos in range(shortest, last + 1):
                pending.append((pos, token))
                if on_token is not None or len(pending) == CHECK_EVERY or pos == last:
                    for p, t in pending:
                        collector.add(p, t.tolist())
                    pending.clear()
                    if collector.finished:
                        break
                if pos == last:
                    break
                logits, cache = decode(token[:, None], cache, pos)
                token = choose(logits[:, -1], pos + 1)
    finally:
        model.train(was_training)
    return collector.tokens
