"""HellaSwag accuracy of a trained run or a Hugging Face GPT-2 directory, with either backend.

python hellaswag.py --checkpoint out/<run> [--backend jax|torch] [--data PATH] [--limit N] [--batch-examples N]

Without --data, the validation set is fetched once to data/hellaswag/hellaswag_val.jsonl. The data
and the two accuracies are framework-free (`babygpt/eval/hellaswag.py`); this script loads the
model with the chosen backend and scores the endings with its `score.py`.
"""

from __future__ import annotations

import argparse
import importlib
from pathlib import Path

from babygpt.cli import run_cli
from babygpt.config import BACKENDS, BabyGPTError, require_positive
from babygpt.eval.hellaswag import DEFAULT_DATA, ScoreFn, evaluate, load_examples


def load_scorer(checkpoint: str | Path, backend: str) -> tuple[ScoreFn, int]:
    """A backend's model from a run directory or any HF GPT-2 directory, and its context window."""
    if backend not in BACKENDS:
        raise BabyGPTError(f"unknown backend {backend!r}; choose --backend=jax or --backend=torch")
    model = importlib.import_module(f"babygpt_{backend}.model").GPT.from_pretrained(checkpoint)
    score = importlib.import_module(f"babygpt_{backend}.score")
    model = score.prepare_model(model)
    return (lambda tokens, mask: score.completion_losses(model, tokens, mask)), model.config.block_size


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--checkpoint", "--model-path", required=True, help="a run directory or HF GPT-2 directory"
    )
    parser.add_argument("--backend", default="jax", help="jax (default) or torch")
    parser.add_argument(
        "--data", default=str(DEFAULT_DATA), help=f"HellaSwag jsonl (default: {DEFAULT_DATA})"
    )
    parser.add_argument("--limit", type=int, default=None, help="only the first N examples")
    parser.add_argument("--batch-examples", type=int, default=8, help="examples per forward pass (x4 rows)")
    args = parser.parse_args(argv)
    require_positive("--batch-examples", args.batch_examples)
    if args.limit is not None:
        require_positive("--limit", args.limit)
    examples = load_examples(args.data, args.limit)
    score, block_size = load_scorer(args.checkpoint, args.backend)
    result = evaluate(score, examples, block_size, args.batch_examples)
    print(
        f"hellaswag ({result['n']} examples, {args.backend}): acc {result['acc']:.4f}"
        f"  acc_norm {result['acc_norm']:.4f}"
    )


if __name__ == "__main__":
    run_cli(main)
