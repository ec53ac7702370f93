"""Prepare token shards: data/<name>/val_000000.npy, train_000001.npy, ... and meta.json.

python prepare.py shakespeare                       the bundled tiny Shakespeare (train.py does this itself)
python prepare.py fineweb [--name sample-10BT]      FineWeb streamed from Hugging Face into data/fineweb
python prepare.py text FILE... --name NAME          local text files, one document each
python prepare.py jsonl FILE... --name NAME         one JSON object per line, the document in "text"
python prepare.py parquet FILE... --name NAME       the "text" column of parquet files

Options may come before or after the command (`prepare.py text FILE --data-dir X`). The first shard
is the validation split. Rerunning an interrupted command resumes it.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import time
from pathlib import Path

from babygpt.cli import run_cli
from babygpt.config import BabyGPTError
from babygpt.data import prepare_shakespeare
from babygpt.prepare import (
    DEFAULT_SHARD_TOKENS,
    FINEWEB,
    FINEWEB_TOKENS,
    parse_count,
    read_jsonl,
    read_parquet,
    read_text_files,
    stream_fineweb,
    write_dataset,
)


def _add_data_dir(parser: argparse.ArgumentParser, default) -> None:
    parser.add_argument("--data-dir", default=default, help="where datasets go (default: data)")


def _dataset_name(option: str, name: str) -> str:
    if not name.strip() or name in (".", "..") or any(sep in name for sep in "/\\"):
        raise BabyGPTError(
            f"{option} {name!r} must be a plain directory name: the data goes to --data-dir/NAME"
        )
    return name


def _val_fraction(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = float("nan")
    if not 0 < value < 1:
        raise BabyGPTError(f"--val-fraction {text}: must be a fraction between 0 and 1, e.g. 0.1")
    return value


def _add_shard_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--shard-tokens",
        type=parse_count,
        default=DEFAULT_SHARD_TOKENS,
        help="tokens per shard, e.g. 100M (default); the first shard is the validation split",
    )
    parser.add_argument(
        "--workers", type=int, default=os.cpu_count(), help="tokenizer processes (default: all CPU cores)"
    )


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    _add_data_dir(parser, "data")
    sub = parser.add_subparsers(dest="command", required=True)
    shakespeare = sub.add_parser("shakespeare", help="the bundled tiny Shakespeare")
    fineweb = sub.add_parser("fineweb", help=f"stream {FINEWEB} (needs `pip install datasets`)")
    fineweb.add_argument("--name", default="sample-10BT", help="the FineWeb subset (default: sample-10BT)")
    fineweb.add_argument("--dataset", default="fineweb", help="write data/<dataset>/ (default: fineweb)")
    _add_shard_options(fineweb)
    for kind, what in [
        ("text", "text files, one document each"),
        ("jsonl", "jsonl files"),
        ("parquet", "parquet files"),
    ]:
        local = sub.add_parser(kind, help=f"local {what}")
        local.add_argument("files", nargs="+")
        local.add_argument("--name", required=True, help="dataset name: data/<name>/")
        if kind != "text":
            local.add_argument(
                "--text-field", default="text", help="the field holding each document (default: text)"
            )
        local.add_argument(
            "--val-fraction",
            type=_val_fraction,
            default=0.1,
            help="for a corpus shorter than one shard: the share of its tokens held out (default: 0.1)",
        )
        _add_shard_options(local)
        _add_data_dir(local, argparse.SUPPRESS)  # after the command too; SUPPRESS keeps the one given before
    for command in (shakespeare, fineweb):
        _add_data_dir(command, argparse.SUPPRESS)
    args = parser.parse_args(argv)
    try:
        _prepare(args)
    except OSError as e:  # a read-only or full disk
        raise BabyGPTError(
            f"cannot write {e.filename or args.data_dir}: {e.strerror}; choose a writable --data-dir"
        ) from None


def _prepare(args: argparse.Namespace) -> None:
    if args.command == "shakespeare":
        meta = prepare_shakespeare(args.data_dir)
        print(f"data/shakespeare: {meta['train_tokens']:,} train and {meta['val_tokens']:,} val tokens")
        return
    if args.command == "fineweb":
        name = _dataset_name("--dataset", args.dataset)
        documents = stream_fineweb(args.name)
        extra = dict(source=f"{FINEWEB} {args.name}", total_tokens=FINEWEB_TOKENS.get(args.name))
    else:
        name = _dataset_name("--name", args.name)
        if args.command == "text":
            documents = read_text_files(args.files)
        else:
            reader = read_jsonl if args.command == "jsonl" else read_parquet
            documents = reader(args.files, args.text_field)
        extra = dict(source=f"{args.command}: {', '.join(args.files)}", val_fraction=args.val_fraction)
    out_dir = Path(args.data_dir) / name
    made = [p for p in (out_dir, *out_dir.parents) if not p.exists()]  # deepest first
    start = time.perf_counter()
    try:
        meta = write_dataset(
            documents, out_dir, shard_tokens=args.shard_tokens, workers=max(1, args.workers), **extra
        )
    except BaseException:
        for directory in made:  # a corpus refused before its first shard leaves no empty directories
            with contextlib.suppress(OSError):
                directory.rmdir()  # only ever succeeds on an empty directory
        raise
    seconds = time.perf_counter() - start
    tokens = meta["train_tokens"] + meta["val_tokens"]
    print(
        f"{out_dir}: {meta['train_tokens']:,} train and {meta['val_tokens']:,} val tokens"
        f" in {len(meta['shards'])} shards, from {meta['documents']:,} documents"
        f" ({seconds:.1f} s, {tokens / seconds:,.0f} tokens/s)"
    )


if __name__ == "__main__":
    run_cli(main)
