"""Framework-free pieces of text generation that both `generate.py` files share.

`SamplingSettings` (validated once, for the CLI and the REPL), the context policy (a sliding window
of `block_size` tokens, as nanoGPT's `generate`: the KV cache while the sequence fits, a full forward
over the window past it), the static cache and prefill lengths that keep JAX from recompiling, the
cut at the stop token, and `StreamDecoder`, which turns token ids into text that is safe to print
as it comes (a character split across tokens is held back until its last byte arrives).
"""

from __future__ import annotations

import codecs
import dataclasses
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from babygpt.config import BabyGPTError

# The cache length is rounded up to this, so that JAX compiles one decode step for every prompt
# whose total length falls in the same bucket.
CACHE_MULTIPLE = 64


@dataclass(frozen=True)
class SamplingSettings:
    """How to pick each next token. temperature 0 is greedy; top_k / top_p None turn a filter off."""

    temperature: float = 1.0
    top_k: int | None = None
    top_p: float | None = None
    max_tokens: int = 100
    seed: int = 0

    def __post_init__(self) -> None:
        if not math.isfinite(self.temperature) or self.temperature < 0:
            raise BabyGPTError(
                f"temperature must be >= 0 (0 is greedy), got {self.temperature}; try --temperature 0.8"
            )
        if self.top_k is not None and self.top_k < 1:
            raise BabyGPTError(f"top-k must be >= 1, got {self.top_k}; try --top-k 50, or leave it out")
        if self.top_p is not None and not 0 < self.top_p <= 1:
            raise BabyGPTError(
                f"top-p must be in (0, 1], got {self.top_p}; try --top-p 0.95, or leave it out"
            )
        if self.max_tokens < 1:
            raise BabyGPTError(f"max tokens must be >= 1, got {self.max_tokens}; try --max-tokens 100")

    def replace(self, **changes) -> SamplingSettings:
        return dataclasses.replace(self, **changes)

    def describe(self) -> str:
        """In words, for people: "temperature 0.8, top-k 50, top-p off, 100 new tokens, seed 0"."""
        temperature = (
            "greedy (temperature 0)" if self.temperature == 0 else f"temperature {self.temperature:g}"
        )
        top_k = "off" if self.top_k is None else self.top_k
        top_p = "off" if self.top_p is None else f"{self.top_p:g}"
        return f"{temperature}, top-k {top_k}, top-p {top_p}, {self.max_tokens} new tokens, seed {self.seed}"


def crop_prompts(prompts: Sequence[Sequence[int]], max_new_tokens: int, block_size: int) -> list[list[int]]:
    """The context policy: keep the last `block_size` tokens of each prompt; any number of new tokens.

    As nanoGPT's `generate`, every new token is conditioned on the last `block_size` tokens of its
    row: while the sequence fits the context, through the KV cache; past it, through a full forward
    over the sliding window (`generate`). The first new token then sees the prompt's last
    `block_size` tokens, which is all nanoGPT lets it see, so the crop changes no output.
    """
    if max_new_tokens < 1:
        raise BabyGPTError(f"max new tokens must be >= 1, got {max_new_tokens}")
    if not prompts:
        raise BabyGPTError("no prompts to generate from")
    if any(len(p) == 0 for p in prompts):
        raise BabyGPTError("a prompt is empty; give every prompt at least one token")
    return [list(p)[-block_size:] for p in prompts]


def cache_length(prompts: Sequence[Sequence[int]], max_new_tokens: int, block_size: int) -> int:
    """Slots the KV cache needs (the last sampled token is never fed back), rounded up to a bucket.

    Never more than the context: positions past it are decoded by the sliding window, not the cache.
    """
    needed = max(len(p) for p in prompts) + max_new_tokens - 1
    return min(block_size, math.ceil(needed / CACHE_MULTIPLE) * CACHE_MULTIPLE)


def cached_positions(
    prompts: Sequence[Sequence[int]], max_new_tokens: int, block_size: int
) -> tuple[int, int]:
    """(the last position the KV cache decodes, the last position any row needs).

    The cache holds positions 0..block_size-1, so it chooses tokens up to position block_size; each
    token after that is chosen by a full forward over the `block_size` tokens before it.
    """
    last = max(len(p) for p in prompts) + max_new_tokens - 1
    return min(last, block_size), last


def prefill_length(shortest_prompt: int, cache_len: int) -> int:
    """The prefill's static width: the shortest prompt rounded up to a power of two, within the cache.

    The padded tail writes keys and values past the prompt, but every decode step overwrites its own
    slot before reading it, and the attention mask hides slots not yet reached.
    """
    return min(cache_len, 1 << max(shortest_prompt - 1, 0).bit_length())


class StreamDecoder:
    """Feed token ids, get printable text; multi-byte characters split across tokens wait until whole.

    At the end `flush()` returns what is left, with an incomplete character as U+FFFD, so the
    concatenated output equals `tokenizer.decode(tokens)` (tiktoken's errors="replace").
    """

    def __init__(self, token_bytes: Callable[[int], bytes]):
        self._token_bytes = token_bytes
        self._decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")

    @classmethod
    def for_tokenizer(cls, tokenizer) -> StreamDecoder:
        return cls(tokenizer.decode_single_token_bytes)

    def feed(self, token: int) -> str:
        return self._decoder.decode(self._token_bytes(token))

    def flush(self) -> str:
        return self._decoder.decode(b"", final=True)


class RowCollector:
    """The new tokens of each row, read off the batch's token stream a position or a block at a time.

    Rows are right-padded and step together from the shortest prompt's length (see `generate`), so
    at position `pos` a row whose prompt is longer is still being fed its own prompt; its new tokens
    start at its own length. A row ends at `max_new_tokens` or at the stop token (not kept).
    """

    def __init__(
        self,
        lengths: Sequence[int],
        max_new_tokens: int,
        stop_token: int | None,
        on_token: Callable[[int, int], None] | None = None,
    ):
        self.lengths = list(lengths)
        self.max_new_tokens = max_new_tokens
        self.stop_token = stop_token
        self.on_token = on_token
        self.tokens: list[list[int]] = [[] for _ in self.lengths]
        self.done = [False] * len(self.lengths)

    def add(self, pos: int, column: Sequence[int]) -> None:
        """The token every row holds at position `pos`."""
        self.add_block(pos, [[token] for token in column])

    def add_block(self, start: int, rows: Sequence[Sequence[int]]) -> None:
        """Every row's tokens from position `start` on: rows[r] holds row r's at start, start + 1, ...

        A row at a time, in slices: a decode loop that reads its tokens back once, at its end,
        hands over 32 rows x 256 tokens, which token by token took ~3 ms of Python."""
        for row, tokens in enumerate(rows):
            if self.done[row]:
                continue
            new = [int(token) for token in tokens[max(self.lengths[row] - start, 0) :]]
            if self.stop_token in new:
                new, self.done[row] = new[: new.index(self.stop_token)], True
            room = self.max_new_tokens - len(self.tokens[row])
            if len(new) >= room:
                new, self.done[row] = new[:room], True
            self.tokens[row].extend(new)
            if self.on_token is not None:
                for token in new:
                    self.on_token(row, token)

    @property
    def finished(self) -> bool:
        return all(self.done)
