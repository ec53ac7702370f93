"""Token shards on disk and the order in which both backends walk them.

A dataset is `data/<name>/{train,val}_<index:06d>.npy` (uint16 token ids) plus `meta.json`. Shards
are memory-mapped, never loaded whole. `TokenWindows` defines the sample order once, in numpy, so
the PyTorch `DataLoaderLite` and the grain source in JAX cut exactly the same windows from it.
"""

from __future__ import annotations

import functools
import json
import os
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path

import numpy as np

from babygpt.config import BabyGPTError, Config
from babygpt.files import atomic_open
from babygpt.tokenizer import EOT, asset_path, get_tokenizer

SPLITS = ("train", "val")
MAX_UINT16_TOKEN = 2**16 - 1


def shard_path(data_dir: str | Path, split: str, index: int) -> Path:
    return Path(data_dir) / f"{split}_{index:06d}.npy"


def write_shard(path: str | Path, tokens: Sequence[int] | np.ndarray) -> None:
    """Write uint16 tokens atomically: a killed writer never leaves a complete-looking shard."""
    tokens = np.asarray(tokens)
    if tokens.size and (tokens.min() < 0 or tokens.max() > MAX_UINT16_TOKEN):
        raise BabyGPTError(
            f"token id {int(tokens.max())} does not fit in uint16 shards (max 65535);"
            " use a tokenizer with fewer than 65,536 tokens"
        )
    with atomic_open(path) as f:
        np.save(f, tokens.astype(np.uint16))


def write_meta(data_dir: str | Path, **meta) -> None:
    path = Path(data_dir) / "meta.json"
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps({"tokenizer": "gpt2", "vocab_size": 50257, **meta}, indent=2))
    os.replace(tmp, path)


def read_meta(data_dir: str | Path) -> dict:
    return json.loads((Path(data_dir) / "meta.json").read_text())


def load_shard(path: str | Path) -> np.ndarray:
    """A shard, memory-mapped; a truncated, foreign or damaged file is one line naming the fix."""
    path = Path(path)
    try:
        tokens = np.load(path, mmap_mode="r")
    except (ValueError, OSError, EOFError) as e:  # bad header, pickled data, shorter than its header says
        reason = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise BabyGPTError(f"{path} is not a readable token shard ({reason}); {_reprepare(path)}") from None
    if tokens.dtype != np.uint16 or tokens.ndim != 1:
        raise BabyGPTError(
            f"{path} holds {tokens.dtype} of shape {tokens.shape}, not a row of uint16 tokens;"
            f" {_reprepare(path)}"
        )
    return tokens


def _prepare_command(data_dir: Path) -> str:
    name = data_dir.name
    if name in ("shakespeare", "fineweb"):
        return f"python prepare.py {name}"
    return f"python prepare.py text FILE... --name {name}"


def _reprepare(path: Path) -> str:
    """Preparing resumes: it rewrites only the files that are missing."""
    return f"delete {path} and rerun the command that prepared it, e.g. `{_prepare_command(path.parent)}`"


def dataset_dir(config: Config) -> Path:
    return Path(config.data.data_dir) / config.data.dataset


def list_shards(data_dir: str | Path, split: str) -> list[Path]:
    data_dir = Path(data_dir)
    shards = sorted(data_dir.glob(f"{split}_[0-9][0-9][0-9][0-9][0-9][0-9].npy"))
    if not shards:
        raise BabyGPTError(
            f"no {split} shards in {data_dir}; prepare them with `{_prepare_command(data_dir)}`"
        )
    return shards


def split_train_val(tokens: np.ndarray, val_fraction: float) -> tuple[np.ndarray, np.ndarray]:
    n_val = max(1, int(len(tokens) * val_fraction))
    return tokens[:-n_val], tokens[-n_val:]


def tokenize_documents(texts: Iterable[str]) -> np.ndarray:
    """`<|endoftext|>` before each document, as GPT-2 was trained."""
    enc = get_tokenizer()
    out: list[int] = []
    for text in texts:
        out.append(EOT)
        out.extend(enc.encode_ordinary(text))
    return np.asarray(out, dtype=np.int64)


def write_split_dataset(data_dir: str | Path, tokens: np.ndarray, val_fraction: float, source: str) -> dict:
    train, val = split_train_val(tokens, val_fraction)
    write_shard(shard_path(data_dir, "train", 0), train)
    write_shard(shard_path(data_dir, "val", 0), val)
    meta = dict(source=source, train_tokens=int(len(train)), val_tokens=int(len(val)))
    write_meta(data_dir, **meta)
    return meta


def prepare_shakespeare(data_root: str | Path = "data") -> dict:
    """The bundled tiny Shakespeare: one document, the first 90% for training, the last 10% val."""
    text = Path(asset_path("shakespeare", "input.txt")).read_text(encoding="utf-8")
    tokens = np.asarray(get_tokenizer().encode_ordinary(text), dtype=np.int64)
    return write_split_dataset(
        Path(data_root) / "shakespeare", tokens, 0.1, "babygpt/assets/shakespeare/input.txt"
    )


def ensure_dataset(config: Config) -> Path:
    """Shakespeare prepares itself on first use; any other dataset must have been prepared and fit the model."""
    data_dir = dataset_dir(config)
    if config.data.dataset == "shakespeare" and not (data_dir / "meta.json").exists():
        try:
            prepare_shakespeare(config.data.data_dir)
        except OSError as e:  # a read-only or full disk
            raise BabyGPTError(
                f"cannot prepare {data_dir} ({e.strerror}); set data.data_dir to a writable directory"
            ) from None
    for split in SPLITS:
        list_shards(data_dir, split)
    check_vocab(config)  # every shard opens, and its tokens fit the model
    return data_dir


def check_vocab(config: Config) -> None:
    """Before anything runs: every shard opens, and the dataset's tokens fit `model.vocab_size`.

    meta.json records the tokenizer's vocabulary (50257 for GPT-2; the bundled Shakespeare, before
    it is prepared, is GPT-2 tokens too). Where that exceeds `model.vocab_size`, the shards
    themselves decide, a chunk at a time, stopping at the first token that does not fit: a data
    set that declares a larger vocabulary than it uses (tests' random tokens) still trains.
    """
    data_dir, vocab_size = dataset_dir(config), config.model.vocab_size
    if not (data_dir / "meta.json").exists():
        declared = get_tokenizer().n_vocab
        if config.data.dataset == "shakespeare" and declared > vocab_size:  # prepared on first use
            raise BabyGPTError(_vocab_message(data_dir, declared - 1, vocab_size, declared))
        return  # not prepared: ensure_dataset says how
    try:
        declared = int(read_meta(data_dir).get("vocab_size", 0))
    except (ValueError, TypeError, AttributeError, OSError) as e:  # json's errors are ValueErrors
        raise BabyGPTError(
            f"{data_dir / 'meta.json'} is unreadable ({e}); {_reprepare(data_dir / 'meta.json')}"
        ) from None
    shards = [load_shard(path) for split in SPLITS for path in list_shards(data_dir, split)]
    if declared <= vocab_size:
        return
    chunk = 1 << 24
    for tokens in shards:
        for start in range(0, len(tokens), chunk):
            largest = int(tokens[start : start + chunk].max(initial=0))
            if largest >= vocab_size:
                raise BabyGPTError(_vocab_message(data_dir, largest, vocab_size, declared))


def _vocab_message(data_dir: Path, token: int, vocab_size: int, declared: int) -> str:
    return (
        f"{data_dir} holds token id {token} but model.vocab_size={vocab_size};"
        f" set model.vocab_size={declared} (its tokenizer's vocabulary)"
    )


class TokenWindows:
    """All windows of `seq_len + 1` tokens at stride `seq_len`, in the one order both backends use.

    Inputs are a window's first T tokens, targets its last T; consecutive windows of a shard share
    one token (the last target of one is the first input of the next).

    Training (`shuffle`): every epoch draws, from the seed, an order of the shards, for each shard
    an offset `o` in `[0, min(T, n - T))` and an order of that shard's windows, which then start at
    `o + i*T` for `i < (n - 1 - o) // T`. The offset moves every window boundary each epoch, so a
    small dataset read for many epochs is not seen as the same sequences at the same positions
    (what nanoGPT gets from a random start per sequence). One offset per shard, rather than one per
    sequence, keeps the windows of an epoch disjoint: within an epoch each token is an input at
    most once and a target at most once (the shared boundary token is the target of one window and
    the input of the next), and the first `o` tokens and the tail past the last whole window are
    not read that epoch. The offset's bound keeps at least one window in every shard that has one.

    Validation (no `shuffle`): offset 0, file order, the same windows every time.

    `order="random"` (training only) is nanoGPT's order instead: sample k starts at a uniformly
    random token of a shard drawn in proportion to its starts, from `(seed, k)` alone, with
    replacement; an "epoch" is then just `len()` samples. Each token is seen about as often,
    but not exactly once per epoch: on a small dataset read for hundreds of epochs this
    memorises more slowly (docs/benchmarks.md, issue 19).

    Sample `k` of the stream is a pure function of `(seed, k)`: `locate` maps it to (epoch, shard,
    start) through the cumulative window counts of the epochs before it, which differ by at most
    one window per shard. So any device count reading `micro_batch_rows` reads the same samples,
    and a loader resumes exactly from the number of samples consumed. `len()` is the number of
    windows on the offset-0 grid: the validation set, and the most any training epoch holds.
    """

    def __init__(
        self, shards: Sequence[np.ndarray], seq_len: int, seed: int, shuffle: bool, order: str = "epochs"
    ):
        self.shards = list(shards)
        self.seq_len = seq_len
        self.seed = seed
        self.shuffle = shuffle
        self.random = shuffle and order == "random"
        self.lengths = np.array([len(s) for s in self.shards], dtype=np.int64)
        self.counts = np.maximum(0, (self.lengths - 1) // seq_len)
        self.total = int(self.counts.sum())
        if self.total == 0:
            raise BabyGPTError(
                f"the dataset is shorter than one window of {seq_len + 1} tokens;"
                " lower model.block_size or add data"
            )
        # At most n - T - 1: a shard with a window on the grid keeps at least one in every epoch.
        self._offset_bounds = np.clip(self.lengths - seq_len, 1, seq_len)
        self._starts = np.maximum(0, self.lengths - seq_len)  # random order: starts 0 .. n - T - 1
        self._shard_weights = self._starts / self._starts.sum()  # random order: a shard by its starts
        self._epoch_ends = np.zeros(0, dtype=np.int64)  # samples before the end of each epoch

    @classmethod
    def from_dir(
        cls, data_dir: str | Path, split: str, seq_len: int, seed: int, order: str = "epochs"
    ) -> TokenWindows:
        shards = [load_shard(p) for p in list_shards(data_dir, split)]
        return cls(shards, seq_len, seed, shuffle=(split == "train"), order=order)

    def __len__(self) -> int:
        return self.total

    def _draw(self, epoch: int) -> tuple[np.ndarray, np.ndarray]:
        """The shard order and each shard's offset (indexed by shard) for one epoch."""
        if not self.shuffle:
            return np.arange(len(self.shards)), np.zeros(len(self.shards), dtype=np.int64)
        rng = np.random.default_rng([self.seed, epoch])
        return rng.permutation(len(self.shards)), rng.integers(0, self._offset_bounds)

    def _counts(self, offsets: np.ndarray) -> np.ndarray:
        return np.maximum(0, (self.lengths - 1 - offsets) // self.seq_len)

    @functools.lru_cache(maxsize=2)
    def _epoch(self, epoch: int) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        """Shard order, cumulative window counts in that order, offsets and counts per shard."""
        order, offsets = self._draw(epoch)
        counts = self._counts(offsets)
        return order, np.cumsum(counts[order]), offsets, counts

    @functools.lru_cache(maxsize=4)
    def _window_order(self, epoch: int, shard: int, count: int) -> np.ndarray:
        return np.random.default_rng([self.seed, epoch, shard]).permutation(count)

    def epoch_start(self, epoch: int) -> int:
        """The first sample of `epoch`."""
        if not self.shuffle or self.random:
            return epoch * self.total
        self._count_epochs(epoch)
        return int(self._epoch_ends[epoch - 1]) if epoch else 0

    def _count_epochs(self, epoch: int) -> None:
        """Extend the cumulative epoch lengths through `epoch`. Reader threads may race here: each
        computes the same numbers and swaps in a whole new array, so every reader sees a valid prefix."""
        ends = self._epoch_ends
        if len(ends) > epoch:
            return
        more = range(len(ends), max(epoch + 1, 2 * len(ends)))
        lengths = [int(self._counts(self._draw(e)[1]).sum()) for e in more]
        last = int(ends[-1]) if len(ends) else 0
        self._epoch_ends = np.concatenate([ends, last + np.cumsum(lengths, dtype=np.int64)])

    def _epoch_of(self, k: int) -> int:
        if not self.shuffle or self.random:
            return k // self.total
        while not len(self._epoch_ends) or self._epoch_ends[-1] <= k:
            self._count_epochs(2 * len(self._epoch_ends))
        return int(np.searchsorted(self._epoch_ends, k, side="right"))

    def locate(self, k: int) -> tuple[int, int, int]:
        """Sample k (any k >= 0) as (epoch, shard, first token's index in the shard)."""
        k = int(k)
        epoch = self._epoch_of(k)
        if self.random:
            rng = np.random.default_rng([self.seed, k])
            shard = int(rng.choice(len(self.shards), p=self._shard_weights))
            return epoch, shard, int(rng.integers(0, self._starts[shard]))
        j = k - self.epoch_start(epoch)
        order, ends, offsets, counts = self._epoch(epoch)
        slot = int(np.searchsorted(ends, j, side="right"))
        shard = int(order[slot])
        i = j - (int(ends[slot - 1]) if slot else 0)
        if self.shuffle:
            i = int(self._window_order(epoch, shard, int(counts[shard]))[i])
        return epoch, shard, int(offsets[shard]) + i * self.seq_len

    def window(self, k: int) -> np.ndarray:
        """Sample k (any k >= 0) as an int32 array of seq_len + 1 tokens."""
        _, shard, start = self.locate(k)
        return np.asarray(self.shards[shard][start : start + self.seq_len + 1], dtype=np.int32)

    def take(self, samples: Iterable[int]) -> np.ndarray:
        """The given samples, stacked: (len(samples), seq_len + 1)."""
        return np.stack([self.window(k) for k in samples])

    def rows(self, first: int, count: int) -> np.ndarray:
        """Samples first .. first + count - 1, stacked: (count, seq_len + 1)."""
        return self.take(range(first, first + count))


def micro_batch_rows(position: int, rows_per_micro_step: int, first_row: int, count: int) -> range:
    """Sample indices of one rank's share of global micro-step `position`.

    A global micro-step takes `rows_per_micro_step` consecutive samples (micro batch x all
    devices); rank r reads `count` of them starting at `first_row`. So whatever the device count,
    optimizer step s covers samples [s*G, (s+1)*G) with G the global batch in sequences.
    """
    start = position * rows_per_micro_step + first_row
    return range(start, start + count)


def eval_sequences(config: Config, available: int) -> int:
    """How many validation windows one evaluation reads; 0 when `train.eval_steps=0` turns it off.

    `train.eval_tokens` in whole windows of `block_size`, or when it is 0 the
    `eval_steps x micro_batch_size x block_size` tokens that one device read before the setting
    existed; at least one window, at most the `available` ones (the whole split). The device count
    plays no part, so every machine evaluates the same sequences.
    """
    t, T = config.train, config.model.block_size
    if t.eval_steps == 0:
        return 0
    tokens = t.eval_tokens or t.eval_steps * t.micro_batch_size * T
    return min(available, max(1, tokens // T))


def validation_batches(
    n_sequences: int, rows_per_micro_step: int, first_row: int = 0, count: int | None = None
) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """One rank's (samples, weights) per global validation micro-step, both (count,).

    Samples 0 .. n_sequences-1 of the fixed validation order fill the global micro-steps in order
    (row r of micro-step m is sample m*R + r, R = `rows_per_micro_step` = micro batch x devices);
    the rows past the last real one repeat real windows (sample index modulo n_sequences), so every
    row is a real sequence of the same shape, and weigh 0; the others weigh 1. Rank r takes rows
    `first_row .. first_row+count-1` of each, as in `micro_batch_rows`. So the validation loss,
    sum(weight x per-sequence mean loss) over all micro-steps and ranks / n_sequences, is the mean
    over exactly the same sequences for any device count and micro-batch size.
    """
    count = rows_per_micro_step - first_row if count is None else count
    for start in range(0, n_sequences, rows_per_micro_step):
        rows = np.arange(start + first_row, start + first_row + count)
        yield rows % n_sequences, (rows < n_sequences).astype(np.float32)
