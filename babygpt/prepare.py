"""From a corpus to token shards: read documents, tokenize them in parallel, write uint16 shards.

Framework-free, used by `prepare.py` for FineWeb (streamed from the Hugging Face hub) and for local
text, jsonl and parquet files alike. Documents are tokenized in order (`<|endoftext|>` before each,
as GPT-2 was trained) and the token stream is cut into shards of exactly `shard_tokens` tokens, the
last one shorter. The first shard is the validation split (`val_000000.npy`), the others train
(`train_000001.npy`, ...), which is what `babygpt.data.TokenWindows.from_dir` reads.

Resuming: the stream is deterministic, so which tokens land in which shard is too. A shard is
finished when it exists under its final name (`write_shard` writes a temporary file and renames
it), and `meta.json` records after each shard where the next one starts (document, token offset),
so a rerun skips the finished documents without tokenizing them and writes only missing shards.
"""

from __future__ import annotations

import functools
import itertools
import json
import logging
import multiprocessing
import re
from collections.abc import Callable, Iterable, Iterator, Sequence
from pathlib import Path

import numpy as np
from tqdm import tqdm

from babygpt.config import BabyGPTError
from babygpt.data import MAX_UINT16_TOKEN, load_shard, read_meta, shard_path, write_meta, write_shard
from babygpt.tokenizer import EOT, get_tokenizer

log = logging.getLogger(__name__)

DEFAULT_SHARD_TOKENS = 100_000_000
FINEWEB = "HuggingFaceFW/fineweb"
# Approximate GPT-2 token counts of the FineWeb samples, for the progress bar's estimate only.
FINEWEB_TOKENS = {
    "sample-10BT": 10_000_000_000,
    "sample-100BT": 100_000_000_000,
    "sample-350BT": 350_000_000_000,
}
_CHUNKSIZE = 64  # documents per task sent to a worker: amortizes the pickling and the pipe


def parse_count(text: str) -> int:
    """`100M`, `10k`, `1_000_000`, `2e6` -> an integer count."""
    match = re.fullmatch(r"\s*([0-9_.eE+]+)\s*([kKmMgGbB]?)\s*", str(text))
    scale = {"": 1, "k": 10**3, "m": 10**6, "g": 10**9, "b": 10**9}
    try:
        value = float(match.group(1).replace("_", "")) * scale[match.group(2).lower()]
    except (AttributeError, ValueError):
        raise BabyGPTError(f"cannot read {text!r} as a count; write e.g. 100M, 500k or 1000000") from None
    if value < 1 or value != int(value):
        raise BabyGPTError(f"{text!r} is not a positive whole count")
    return int(value)


# ----------------------------------------------------------------------------- reading documents


def _check_files(paths: Sequence[str | Path]) -> list[Path]:
    paths = [Path(p) for p in paths]
    for p in paths:
        if not p.exists() or p.is_dir():
            raise BabyGPTError(f"no such file: {p}")
    return paths


def read_text_files(paths: Sequence[str | Path]) -> Iterator[str]:
    """One document per file."""
    return map(_read_text, _check_files(paths))


def _read_text(path: Path) -> str:
    try:
        return path.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise BabyGPTError(_not_utf8(path, e)) from None


def _not_utf8(path: Path, e: UnicodeDecodeError) -> str:
    return f"{path} is not UTF-8 text (byte {e.start}); convert it first, e.g. `iconv -t utf-8`"


def read_jsonl(paths: Sequence[str | Path], field: str = "text") -> Iterator[str]:
    """One JSON object per line; the document is `object[field]`."""
    return _jsonl_documents(_check_files(paths), field)


def _jsonl_documents(paths: list[Path], field: str) -> Iterator[str]:
    for path in paths:
        with open(path, "rb") as f:
            for n, raw in enumerate(f, start=1):
                try:
                    line = raw.decode("utf-8")
                except UnicodeDecodeError as e:
                    raise BabyGPTError(f"line {n} of {_not_utf8(path, e)}") from None
                if not line.strip():
                    continue
                try:
                    row = json.loads(line)
                except json.JSONDecodeError as e:
                    raise BabyGPTError(f"{path}:{n}: not valid JSON ({e.msg})") from None
                if not isinstance(row, dict) or not isinstance(row.get(field), str):
                    raise BabyGPTError(
                        f"{path}:{n}: no string field {field!r}; name the field with --text-field"
                    )
                yield row[field]


def read_parquet(paths: Sequence[str | Path], field: str = "text") -> Iterator[str]:
    """Column `field` of each file, a record batch at a time (never a whole file in memory)."""
    import pyarrow
    import pyarrow.parquet as pq

    files = _check_files(paths)
    for path in files:
        try:
            names = pq.read_schema(path).names
        except pyarrow.ArrowException as e:
            reason = str(e).splitlines()[0]
            raise BabyGPTError(
                f"{path} is not a parquet file ({reason}); for text use `prepare.py text`"
            ) from None
        if field not in names:
            raise BabyGPTError(
                f"{path} has no column {field!r} (it has {', '.join(names)}); name the column with --text-field"
            )
    return (
        text
        for path in files
        for batch in pq.ParquetFile(path).iter_batches(columns=[field], batch_size=1024)
        for text in batch.column(0).to_pylist()
    )


def stream_fineweb(subset: str = "sample-10BT") -> Iterator[str]:
    """FineWeb's documents, streamed from the Hugging Face hub in the dataset's own fixed order."""
    try:
        import datasets
    except ImportError:
        raise BabyGPTError(
            "prepare.py fineweb streams through Hugging Face datasets: pip install datasets"
        ) from None
    log_library_messages_once()
    try:
        rows = datasets.load_dataset(FINEWEB, name=subset, split="train", streaming=True)
    except (OSError, ConnectionError, ValueError) as e:  # offline, or an unknown subset name
        raise BabyGPTError(f"cannot stream {FINEWEB} {subset}: {e}".splitlines()[0]) from None
    return (row["text"] for row in rows)


def log_library_messages_once() -> None:
    """huggingface_hub logs through a handler of its own and also passes each record up to the root
    logger, which `run_cli` gives a handler too: every hub retry printed twice. Keep its own."""
    for name in ("huggingface_hub", "datasets"):
        logger = logging.getLogger(name)
        if logger.handlers:
            logger.propagate = False


# ----------------------------------------------------------------------------- tokenizing


def document_tokens(text: str, encode: Callable[[str], list[int]] | None = None) -> np.ndarray:
    """`<|endoftext|>` then the document, as uint16; runs in the worker processes."""
    ids = (encode or get_tokenizer().encode_ordinary)(text)
    tokens = np.empty(len(ids) + 1, dtype=np.int64)
    tokens[0] = EOT
    tokens[1:] = ids
    if tokens.max() > MAX_UINT16_TOKEN or tokens.min() < 0:
        raise BabyGPTError(
            f"token id {int(tokens.max())} does not fit in uint16 shards (max 65535);"
            " use a tokenizer with fewer than 65,536 tokens"
        )
    return tokens.astype(np.uint16)


def tokenize_stream(
    documents: Iterable[str], workers: int = 1, encode: Callable[[str], list[int]] | None = None
) -> Iterator[np.ndarray]:
    """Each document's tokens, in document order, computed by `workers` processes."""
    tokenize = functools.partial(document_tokens, encode=encode)
    if workers <= 1:
        yield from map(tokenize, documents)
        return
    # imap keeps document order (the shards must not depend on the worker count) and the pipe to
    # the workers bounds how far reading can run ahead of tokenizing. Spawned, not forked: a caller
    # may have JAX or torch loaded, whose threads a fork would copy mid-lock (a deadlock).
    with multiprocessing.get_context("spawn").Pool(workers) as pool:
        yield from pool.imap(tokenize, documents, chunksize=_CHUNKSIZE)


# ----------------------------------------------------------------------------- writing shards


def shard_name(index: int) -> str:
    """Shard 0 is the validation split, every later shard is training data."""
    return shard_path(".", "val" if index == 0 else "train", index).name


def _remove_stale_temporaries(out_dir: Path) -> None:
    # A killed `write_shard` / `write_meta` can leave these; they never look like finished shards.
    for stale in itertools.chain(out_dir.glob(".*_[0-9]*.npy.*.tmp"), out_dir.glob("meta.json.tmp")):
        stale.unlink(missing_ok=True)


def _resume_point(out_dir: Path, settings: dict) -> tuple[list[dict], int]:
    """The shards recorded by an earlier run and the first one to (re)compute."""
    if not (out_dir / "meta.json").exists():
        return [], 0
    meta = read_meta(out_dir)
    earlier = {k: meta.get(k) for k in settings}
    if earlier != settings:
        changed = ", ".join(
            f"{k} {earlier[k]!r} -> {settings[k]!r}" for k in settings if earlier[k] != settings[k]
        )
        raise BabyGPTError(
            f"{out_dir} was prepared with other settings ({changed}); delete it or use another --name"
        )
    shards = list(meta.get("shards", []))
    start = next((i for i, s in enumerate(shards) if not (out_dir / s["file"]).exists()), len(shards))
    while start and shards[start - 1]["next_doc"] is None:  # no known point to restart from
        start -= 1
    return shards[:start], start


def write_dataset(
    documents: Iterable[str],
    out_dir: str | Path,
    *,
    source: str,
    shard_tokens: int = DEFAULT_SHARD_TOKENS,
    workers: int = 1,
    val_fraction: float = 0.1,
    total_tokens: int | None = None,
    encode: Callable[[str], list[int]] | None = None,
) -> dict:
    """Tokenize `documents` into `out_dir`'s shards and `meta.json`; resumes a killed run.

    A corpus shorter than one shard is split instead: the first `val_fraction` of its tokens
    validation, the rest train, so a small local corpus needs no tuning of `shard_tokens`.
    Returns the final meta.
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    _remove_stale_temporaries(out_dir)
    settings = dict(source=source, shard_tokens=shard_tokens)
    shards, start = _resume_point(out_dir, settings)
    if shards and start == len(shards) and read_meta(out_dir).get("complete"):
        log.info("%s is already prepared", out_dir)
        return read_meta(out_dir)
    next_doc, offset = (shards[-1]["next_doc"], shards[-1]["next_offset"]) if shards else (0, 0)
    if start:
        log.info("resuming %s at shard %d (document %d)", out_dir, start, next_doc)

    def flush(index: int, tokens: np.ndarray, next_doc: int | None, next_offset: int | None) -> None:
        path = out_dir / shard_name(index)
        if path.exists():  # finished by an earlier run: the same tokens, since the stream is deterministic
            if len(load_shard(path)) != len(tokens):
                raise BabyGPTError(f"{path} does not match this corpus; delete {out_dir} and prepare again")
        else:
            write_shard(path, tokens)
        shards[index:] = [
            dict(file=path.name, tokens=len(tokens), next_doc=next_doc, next_offset=next_offset)
        ]
        write_meta(out_dir, **settings, complete=False, shards=shards)

    buffer = np.empty(shard_tokens, dtype=np.uint16)
    filled, index, n_docs = 0, start, next_doc
    bar = tqdm(total=total_tokens, initial=start * shard_tokens, unit="tok", unit_scale=True, disable=None)
    stream = tokenize_stream(itertools.islice(documents, next_doc, None), workers, encode)
    with bar:
        for doc, tokens in enumerate(stream, start=next_doc):
            i = offset if doc == next_doc else 0
            while i < len(tokens):
                # A full buffer is written only once more tokens exist, so the one-shard case
                # below still sees its tokens; the next shard starts at token i of document doc.
                if filled == shard_tokens:
                    flush(index, buffer, doc, i)
                    index, filled = index + 1, 0
                n = min(shard_tokens - filled, len(tokens) - i)
                buffer[filled : filled + n] = tokens[i : i + n]
                filled, i = filled + n, i + n
                bar.update(n)
            n_docs = doc + 1
    if index == 0:
        if filled < 2:
            raise BabyGPTError(
                f"the corpus has {filled} tokens; it needs at least 2 to split into val and train"
            )
        n_val = min(filled - 1, max(1, int(filled * val_fraction)))
        flush(0, buffer[:n_val], None, None)  # a resume recomputes the split from the start
        flush(1, buffer[n_val:filled], n_docs, 0)
    elif filled:
        flush(index, buffer[:filled], n_docs, 0)
    counts = {
        split: sum(s["tokens"] for s in shards if s["file"].startswith(split)) for split in ("train", "val")
    }
    meta = dict(
        **settings,
        complete=True,
        documents=n_docs,
        train_tokens=counts["train"],
        val_tokens=counts["val"],
        shards=shards,
    )
    write_meta(out_dir, **meta)
    return read_meta(out_dir)
