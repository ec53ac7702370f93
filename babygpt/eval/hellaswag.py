"""HellaSwag: pick the most likely of four endings. The data handling, framework-free.

Each example becomes four rows `context + " " + ending` with a mask over the ending's tokens, as the
GPT-2 reproductions render it (karpathy/build-nanogpt). A backend's `score.py` (`babygpt_torch` and
`babygpt_jax` mirror each other) returns each row's summed and mean loss over the ending tokens;
`acc` picks the lowest sum, `acc_norm` the lowest mean, the number those reproductions report
(GPT-2 124M: about 0.294; lm-eval-harness normalizes by bytes instead and reports other numbers).
The command line and the loading of a backend's model live in the top-level `hellaswag.py`, since
the core imports no backend:

python hellaswag.py --checkpoint out/<run> [--backend jax|torch] [--data PATH] [--limit N]
"""

from __future__ import annotations

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

from babygpt.config import BabyGPTError
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
    """The official jsonl: `ctx`, four `endings`, `label` 0-3 (other fields ignored).

    Every line is checked as it is read, so a damaged file is one line naming the line at fault.
    """
    path = Path(path)
    if not path.exists():
        if path.name != DEFAULT_DATA.name:
            raise BabyGPTError(f"no such file: {path}")
        download(path)
    examples = []
    with open(path, "rb") as f:
        for n, raw in enumerate(f, start=1):
            if not raw.strip():
                continue
            examples.append(_example(raw, f"{path}:{n}"))
            if limit is not None and len(examples) == limit:
                break
    if not examples:
        raise BabyGPTError(f"{path} holds no examples; point --data at the HellaSwag jsonl")
    return examples


def _example(raw: bytes, where: str) -> dict:
    fix = "each line must be a JSON object with ctx, 4 endings and a label 0-3"
    try:
        row = json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        reason = e.msg if isinstance(e, json.JSONDecodeError) else "not UTF-8"
        raise BabyGPTError(f"{where}: not valid JSON ({reason}); {fix}") from None
    if not isinstance(row, dict) or not {"ctx", "endings", "label"} <= row.keys():
        raise BabyGPTError(f"{where}: not a HellaSwag example; {fix}")
    endings, label = row["endings"], row["label"]
    if not isinstance(row["ctx"], str) or not (
        isinstance(endings, list) and len(endings) == 4 and all(isinstance(e, str) for e in endings)
    ):
        raise BabyGPTError(f"{where}: ctx must be a string and endings 4 strings; {fix}")
    if isinstance(label, str) and label.strip().isdigit():  # some copies store the label as text
        label = int(label)
    if isinstance(label, bool) or not isinstance(label, int) or not 0 <= label <= 3:
        raise BabyGPTError(f"{where}: label {row['label']!r} is not 0, 1, 2 or 3; {fix}")
    return {**row, "label": label}


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


if __name__ == "__main__":  # the old entry point: the command moved out of the core with the model loading
    import sys

    print(
        "error: run HellaSwag with `python hellaswag.py --checkpoint ...` from the repository root",
        file=sys.stderr,
    )
    sys.exit(2)
