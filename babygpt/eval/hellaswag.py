"""HellaSwag: pick the most likely of four endings. The data handling, framework-free.

Each example becomes four rows `context + " " + ending` with a mask over the ending's tokens, as the
GPT-2 reproductions render it (karpathy/build-nanogpt). A backend's `score.py` (`babygpt_torch` and
`babygpt_jax` mirror each other) returns each row's summed and mean loss over the ending tokens;
`acc` picks the lowest sum, `acc_norm` the lowest mean, the number those reproductions report
(GPT-2 124M: about 0.294; lm-eval-harness normalizes by bytes instead and reports other numbers).

python -m babygpt.eval.hellaswag --checkpoint out/<run> [--backend jax|torch] [--data PATH] [--limit N]
"""

from __future__ import annotations

import argparse
import importlib
import json
import logging
import math
import urllib.error
import urllib.request
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from tqdm import tqdm

from babygpt.config import BACKENDS, BabyGPTError
from babygpt.files import atomic_open
from babygpt.tokenizer import get_tokenizer

log = logging.getLogger(__name__)

HELLASWAG_URL = "https://raw.githubusercontent.com/rowanz/hellaswag/master/data/hellaswag_val.jsonl"
DEFAULT_DATA = Path("data/hellaswag/hellaswag_val.jsonl")
PAD_MULTIPLE = 32  # rows are padded to a multiple of this, so a jitted scorer compiles a few shapes

# (N, T) tokens, (N, T) mask -> per-row summed loss, per-row mean loss over the masked tokens
ScoreFn = Callable[[np.ndarray, np.ndarray], tuple[np.ndarray, np.ndarray]]


@dataclass(frozen=True)
class Example:
    tokens: list[list[int]]  # four rows: context then " " + ending
    mask: list[list[int]]  # 1 over the ending's tokens, the ones that are scored
    label: int


def download(path: str | Path, url: str = HELLASWAG_URL, timeout: float = 30) -> Path:
    """Fetch the validation set to `path` atomically; one clear line when there is no network."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    log.info("downloading %s to %s", url, path)
    try:
        with atomic_open(path) as f, urllib.request.urlopen(url, timeout=timeout) as response:
            f.write(response.read())
    except (urllib.error.URLError, OSError) as e:
        raise BabyGPTError(
            f"cannot download HellaSwag from {url} ({getattr(e, 'reason', e)}); fetch it by hand to {path}"
        ) from None
    return path


def load_examples(path: str | Path, limit: int | None = None) -> list[dict]:
    """The official jsonl: `ctx`, four `endings`, `label` (other fields ignored)."""
    path = Path(path)
    if not path.exists():
        if path.name != DEFAULT_DATA.name:
            raise BabyGPTError(f"no such file: {path}")
        download(path)
    examples = []
    with open(path, encoding="utf-8") as f:
        for n, line in enumerate(f, start=1):
            if not line.strip():
                continue
            row = json.loads(line)
            if not {"ctx", "endings", "label"} <= row.keys() or len(row["endings"]) != 4:
                raise BabyGPTError(f"{path}:{n}: not a HellaSwag example (needs ctx, 4 endings, label)")
            examples.append(row)
            if limit is not None and len(examples) == limit:
                break
    return examples


def render_example(example: dict, block_size: int) -> Example:
    """Four rows of tokens; a row longer than the context window loses its oldest tokens."""
    enc = get_tokenizer()
    context = enc.encode_ordinary(example["ctx"])
    tokens, mask = [], []
    for ending in example["endings"]:
        ending_tokens = enc.encode_ordinary(" " + ending)  # the space belongs to the ending's first token
        row = (context + ending_tokens)[-block_size:]
        tokens.append(row)
        mask.append(([0] * len(context) + [1] * len(ending_tokens))[-block_size:])
    return Example(tokens, mask, int(example["label"]))


def pad_batch(examples: Sequence[Example], block_size: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Stack examples into (4 * len, T) tokens and mask, zero-padded on the right, and the labels."""
    rows = [row for e in examples for row in e.tokens]
    T = min(block_size, math.ceil(max(map(len, rows)) / PAD_MULTIPLE) * PAD_MULTIPLE)
    tokens = np.zeros((len(rows), T), dtype=np.int32)  # (4B, T)
    mask = np.zeros((len(rows), T), dtype=np.int32)
    for i, (row, m) in enumerate(zip(rows, (m for e in examples for m in e.mask))):
        tokens[i, : len(row)] = row
        mask[i, : len(m)] = m
    return tokens, mask, np.array([e.label for e in examples])


def accuracy(sum_loss: np.ndarray, mean_loss: np.ndarray, labels: np.ndarray) -> dict:
    """`acc` from the summed completion loss, `acc_norm` from the per-token mean; (E, 4) inputs."""
    return dict(
        acc=float(np.mean(np.argmin(sum_loss, axis=1) == labels)),
        acc_norm=float(np.mean(np.argmin(mean_loss, axis=1) == labels)),
        n=len(labels),
    )


def evaluate(score: ScoreFn, examples: Sequence[dict], block_size: int, batch_examples: int = 8) -> dict:
    """Accuracy of a scorer over raw examples, a batch of `batch_examples` (x4 rows) at a time."""
    rendered = [render_example(e, block_size) for e in examples]
    sums, means, labels = [], [], []
    for start in tqdm(range(0, len(rendered), batch_examples), desc="hellaswag", unit="batch", disable=None):
        tokens, mask, batch_labels = pad_batch(rendered[start : start + batch_examples], block_size)
        total, mean = score(tokens, mask)
        sums.append(np.asarray(total).reshape(-1, 4))  # (B, 4)
        means.append(np.asarray(mean).reshape(-1, 4))
        labels.append(batch_labels)
    return accuracy(np.concatenate(sums), np.concatenate(means), np.concatenate(labels))


def load_scorer(checkpoint: str | Path, backend: str) -> tuple[ScoreFn, int]:
    """A backend's model from a run directory or any HF GPT-2 directory, and its context window."""
    if backend not in BACKENDS:
        raise BabyGPTError(f"unknown backend {backend!r}; choose --backend=jax or --backend=torch")
    model = importlib.import_module(f"babygpt_{backend}.model").GPT.from_pretrained(checkpoint)
    score = importlib.import_module(f"babygpt_{backend}.score")
    model = score.prepare_model(model)
    return (lambda tokens, mask: score.completion_losses(model, tokens, mask)), model.config.block_size


def main() -> None:
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
    args = parser.parse_args()
    examples = load_examples(args.data, args.limit)
    score, block_size = load_scorer(args.checkpoint, args.backend)
    result = evaluate(score, examples, block_size, args.batch_examples)
    print(
        f"hellaswag ({result['n']} examples, {args.backend}): acc {result['acc']:.4f}"
        f"  acc_norm {result['acc_norm']:.4f}"
    )


if __name__ == "__main__":
    from babygpt.cli import run_cli

    run_cli(main)
