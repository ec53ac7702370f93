"""Train GPT-2 with either backend.

python train.py [--backend jax|torch] [--config configs/shakespeare.toml] [--resume] [section.key=value ...]

Options and overrides may come in any order.
"""

from __future__ import annotations

import argparse
import importlib

from babygpt.cli import run_cli
from babygpt.config import BACKENDS, BabyGPTError, load_config
from babygpt.data import check_vocab
from babygpt.harness import check_run_dir


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--backend", default=None, help="jax (default) or torch")
    parser.add_argument("--config", default="configs/shakespeare.toml", help="a TOML preset")
    parser.add_argument("--resume", action="store_true", help="continue the run from its latest checkpoint")
    parser.add_argument("overrides", nargs="*", help="section.key=value, e.g. train.max_steps=100")
    args = parser.parse_intermixed_args(argv)
    overrides = list(args.overrides)
    if args.backend is not None:
        if args.backend not in BACKENDS:
            raise BabyGPTError(f"unknown backend {args.backend!r}; choose --backend=jax or --backend=torch")
        overrides.append(f"run.backend={args.backend}")
    if args.resume:
        overrides.append("run.resume=true")
    config = load_config(args.config, overrides)
    check_vocab(config)
    check_run_dir(config)
    backend = importlib.import_module(f"babygpt_{config.run.backend}.train")
    backend.main(config)


if __name__ == "__main__":
    run_cli(main)
