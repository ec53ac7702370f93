"""Token shards on disk and the order in which both backends walk them.

A dataset is `data/<name>/{train,val}_<index:06d>.npy` (uint16 token ids) plus `meta.json`. Shards
are memory-mapped, never loaded whole. `TokenWindows` defines the sample order once, in numpy, so
the PyTorch `DataLoaderLite` and the grain source in JAX cut exactly the same windows from it.
"""

from __future__ import annotations

import functools
import json
import os
from collections.abc import Iterable, Sequence
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
    """Shakespeare prepares itself on first use; any other dataset must have been prepared."""
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
    """All contiguous windows of `seq_len + 1` tokens, in the one order both backends use.

    Window `i` of a shard is tokens `[i*T, i*T + T + 1)`; inputs are its first T tokens, targets
    its last T. Sample `k` of the stream is window `k mod N` of epoch `k // N`. With `shuffle`,
    each epoch visits the shards in a seeded order and each shard's windows in a seeded order;
    without it (validation), everything is in file order.
    """

    def __init__(self, shards: Sequence[np.ndarray], seq_len: int, seed: int, shuffle: bool):
        self.shards = list(shards)
        self.seq_len = seq_len
        self.seed = seed
        self.shuffle = shuffle
        self.counts = np.array([max(0, (len(s) - 1) // seq_len) for s in self.shards])
        self.total = int(self.counts.sum())
        if self.total == 0:
            raise BabyGPTError(
                f"the dataset is shorter than one window of {seq_len + 1} tokens;"
                " lower model.block_size or add data"
            )

    @classmethod
    def from_dir(cls, data_dir: str | Path, split: str, seq_len: int, seed: int) -> TokenWindows:
        shards = [load_shard(p) for p in list_shards(data_dir, split)]
        return cls(shards, seq_len, seed, shuffle=(split == "train"))

    def __len__(self) -> int:
        return self.total

    @functools.lru_cache(maxsize=2)
    def _shard_order(self, epoch: int) -> tuple[np.ndarray, np.ndarray]:
        order = np.arange(len(self.shards))
        if self.shuffle:
            order = np.random.default_rng([self.seed, epoch]).permutation(order)
        return order, np.cumsum(self.counts[order])

    @functools.lru_cache(maxsize=4)
    def _window_order(self, epoch: int, shard: int) -> np.ndarray:
        return np.random.default_rng([self.seed, epoch, shard]).permutation(self.counts[shard])

    def window(self, k: int) -> np.ndarray:
        """Sample k (any k >= 0) as an int32 array of seq_len + 1 tokens."""
        epoch, j = divmod(int(k), self.total)
        order, ends = self._shard_order(epoch)
        slot = int(np.searchsorted(ends, j, side="right"))
        shard = int(order[slot])
        i = j - (int(ends[slot - 1]) if slot else 0)
        if self.shuffle:
            i = int(self._window_order(epoch, shard)[i])
        start = i * self.seq_len
        return np.asarray(self.shards[shard][start : start + self.seq_len + 1], dtype=np.int32)

    def rows(self, first: int, count: int) -> np.ndarray:
        """Samples first .. first + count - 1, stacked: (count, seq_len + 1)."""
        return np.stack([self.window(k) for k in range(first, first + count)])


def micro_batch_rows(position: int, rows_per_micro_step: int, first_row: int, count: int) -> range:
    """Sample indices of one rank's share of global micro-step `position`.

    A global micro-step takes `rows_per_micro_step` consecutive samples (micro batch x all
    devices); rank r reads `count` of them starting at `first_row`. So whatever the device count,
    optimizer step s covers samples [s*G, (s+1)*G) with G the global batch in sequences.
    """
    start = position * rows_per_micro_step + first_row
    return range(start, start + count)
