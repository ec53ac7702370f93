"""Prepare token shards.

python prepare.py shakespeare                 the bundled tiny Shakespeare (train.py does this itself)
python prepare.py text FILE... --name NAME    any local text files, one document each
"""

from __future__ import annotations

import argparse
from pathlib import Path

from babygpt.cli import run_cli
from babygpt.config import BabyGPTError
from babygpt.data import prepare_shakespeare, tokenize_documents, write_split_dataset


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--data-dir", default="data", help="where datasets go (default: data)")
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("shakespeare", help="the bundled tiny Shakespeare")
    text = sub.add_parser("text", help="local text files")
    text.add_argument("files", nargs="+")
    text.add_argument("--name", required=True, help="dataset name: data/<name>/")
    text.add_argument("--val-fraction", type=float, default=0.1)
    args = parser.parse_args()
    if args.command == "shakespeare":
        meta = prepare_shakespeare(args.data_dir)
        print(f"data/shakespeare: {meta['train_tokens']:,} train and {meta['val_tokens']:,} val tokens")
    elif args.command == "text":
        missing = [f for f in args.files if not Path(f).is_file()]
        if missing:
            raise BabyGPTError(f"no such file: {missing[0]}")
        tokens = tokenize_documents(Path(f).read_text(encoding="utf-8") for f in args.files)
        meta = write_split_dataset(
            Path(args.data_dir) / args.name, tokens, args.val_fraction, ", ".join(args.files)
        )
        print(f"data/{args.name}: {meta['train_tokens']:,} train and {meta['val_tokens']:,} val tokens")


if __name__ == "__main__":
    run_cli(main)
