"""The small-data comparison with nanoGPT (issue 19): our Shakespeare split, one recipe, three curves.

    python scripts/compare_nanogpt.py --out out/nanogpt-curve          # GPU: GPT-2 124M, 300 steps
    python scripts/compare_nanogpt.py --tiny --out /tmp/nanogpt-tiny   # CPU: a tiny model, 4 steps
    python scripts/compare_nanogpt.py --parts jax --out out/nanogpt-curve   # one curve, the rest kept
    python scripts/compare_nanogpt.py --replot out/nanogpt-curve/curves.json   # table and plot again

nanoGPT is not part of this repository: put a copy in `.nanogpt/` first (ignored by git; the GPU
machine has no internet, so it travels with the working tree), e.g.
`git clone https://github.com/karpathy/nanoGPT .nanogpt`.

The script writes `data/shakespeare` (prepared if missing) as nanoGPT's `train.bin` / `val.bin`
(uint16) under `.nanogpt/data/babygpt_shakespeare/`, runs nanoGPT's own `train.py` with the recipe
of `configs/shakespeare-gpt2.toml` (GPT-2 124M, 16 x 1024 x 8 tokens per step, lr 6e-4 -> 6e-5,
30 warm-up steps, 300 steps, bf16, compiled), then both backends with that config, and writes
`curves.json`, `curves.png` (the three validation curves) and `table.md` into `--out`.

nanoGPT evaluates on 200 random batches of 16 x 1024 from the val split (its default `eval_iters`);
babyGPT on its fixed validation windows. Both are estimates of the same split's loss.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from babygpt.data import list_shards, load_shard, prepare_shakespeare  # noqa: E402
from babygpt.run import read_metrics  # noqa: E402

CONFIG = "configs/shakespeare-gpt2.toml"
DATASET = "babygpt_shakespeare"
CURVES = ("nanogpt", "torch", "jax")
LABELS = {"nanogpt": "nanoGPT", "torch": "babyGPT torch", "jax": "babyGPT JAX"}

# configs/shakespeare-gpt2.toml in nanoGPT's names (its train.py globals).
NANOGPT_RECIPE = dict(
    n_layer=12,
    n_head=12,
    n_embd=768,
    block_size=1024,
    batch_size=16,
    gradient_accumulation_steps=8,
    max_iters=300,
    lr_decay_iters=300,
    warmup_iters=30,
    learning_rate=6e-4,
    min_lr=6e-5,
    eval_interval=50,
    eval_iters=200,
    log_interval=10,
    dtype="bfloat16",
    compile=True,
    dropout=0.0,
    bias=True,
    weight_decay=0.1,
    beta2=0.95,
    grad_clip=1.0,
    always_save_checkpoint=False,
    wandb_log=False,
)
BABYGPT_RECIPE = ["train.eval_interval=50"]

# --tiny: the same pipeline in a minute on a CPU, for the test; the curves mean nothing.
NANOGPT_TINY = dict(
    n_layer=2,
    n_head=2,
    n_embd=64,
    block_size=64,
    batch_size=4,
    gradient_accumulation_steps=1,
    max_iters=4,
    lr_decay_iters=4,
    warmup_iters=1,
    eval_interval=2,
    eval_iters=2,
    dtype="float32",
    compile=False,
    device="cpu",
)
BABYGPT_TINY = [
    "model.n_layer=2",
    "model.n_head=2",
    "model.n_embd=64",
    "model.block_size=64",
    "train.micro_batch_size=4",
    "train.total_batch_tokens=0",
    "train.max_steps=4",
    "train.warmup_steps=1",
    "train.eval_interval=2",
    "train.eval_steps=2",
    "train.checkpoint_interval=1000",
    "train.dtype=float32",
    "train.compile=false",
    "train.sample_tokens=0",
]

_EVAL_LINE = re.compile(r"^step (\d+): train loss (\S+), val loss (\S+)$")


def write_nanogpt_data(data_dir: Path, out_dir: Path) -> dict[str, int]:
    """Our train and val shards, each concatenated in shard order, as nanoGPT's uint16 .bin files."""
    out_dir.mkdir(parents=True, exist_ok=True)
    sizes = {}
    for split in ("train", "val"):
        tokens = np.concatenate([load_shard(p) for p in list_shards(data_dir, split)]).astype(np.uint16)
        tokens.tofile(out_dir / f"{split}.bin")
        sizes[split] = len(tokens)
    return sizes


def parse_nanogpt_log(text: str) -> tuple[dict[int, float], dict[int, float]]:
    """{step: train loss} and {step: val loss} from nanoGPT's "step N: train loss X, val loss Y" lines."""
    train, val = {}, {}
    for line in text.splitlines():
        match = _EVAL_LINE.match(line.strip())
        if match:
            step = int(match[1])
            train[step], val[step] = float(match[2]), float(match[3])
    return train, val


def nanogpt_args(recipe: dict, out_dir: Path) -> list[str]:
    """`--key=value` for nanoGPT's configurator, which checks each value's type against its default."""
    values = {**recipe, "dataset": DATASET, "out_dir": str(out_dir)}
    return [f"--{k}={v}" for k, v in values.items()]


def _best(curve: dict[int, float]) -> tuple[int, float] | None:
    finite = [(s, v) for s, v in curve.items() if math.isfinite(v)]
    return min(finite, key=lambda sv: sv[1]) if finite else None


def markdown_table(curves: dict[str, dict[int, float]]) -> str:
    """step | nanoGPT val | torch val | JAX val, then the best of each curve and its last step."""
    fmt = lambda v: "—" if v is None else f"{v:.3f}"  # noqa: E731
    steps = sorted({s for c in curves.values() for s in c})
    lines = ["| step | nanoGPT val | torch val | JAX val |", "| --- | --- | --- | --- |"]
    for step in steps:
        lines.append(f"| {step} | " + " | ".join(fmt(curves[c].get(step)) for c in CURVES) + " |")
    best = [_best(curves[c]) for c in CURVES]
    lines.append(
        "| best | " + " | ".join("—" if b is None else f"{b[1]:.3f} (step {b[0]})" for b in best) + " |"
    )
    last = max(steps) if steps else None
    lines.append(f"| last ({last}) | " + " | ".join(fmt(curves[c].get(last)) for c in CURVES) + " |")
    return "\n".join(lines)


def write_results(curves: dict[str, dict[int, float]], out: Path, title: str) -> str:
    """curves.json, curves.png and table.md in `out`; returns the table."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out.mkdir(parents=True, exist_ok=True)
    (out / "curves.json").write_text(
        json.dumps(
            {"title": title, "val_loss": {c: {str(s): v for s, v in curves[c].items()} for c in CURVES}},
            indent=2,
        )
    )
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for c in CURVES:
        steps = sorted(curves[c])
        ax.plot(steps, [curves[c][s] for s in steps], marker="o", label=LABELS[c])
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("validation loss")
    ax.set_title(title, fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(out / "curves.png", dpi=120)
    plt.close(fig)
    table = markdown_table(curves)
    (out / "table.md").write_text(table + "\n")
    return table


def read_curves(path: Path) -> tuple[dict[str, dict[int, float]], str]:
    data = json.loads(Path(path).read_text())
    return {c: {int(s): v for s, v in data["val_loss"][c].items()} for c in CURVES}, data["title"]


def _run(command: list[str], cwd: Path, log: Path, env: dict | None = None) -> str:
    """Run to the end, keeping the whole output in `log`; a failure stops the script with its tail."""
    print("$", " ".join(command), flush=True)
    done = subprocess.run(command, cwd=cwd, env=env, capture_output=True, text=True)
    text = done.stdout + done.stderr
    log.write_text(text)
    if done.returncode:
        sys.exit(f"{command[1]} failed (exit {done.returncode}); the end of {log}:\n{text[-3000:]}")
    return text


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=ROOT / "out" / "nanogpt-curve")
    parser.add_argument("--nanogpt", type=Path, default=ROOT / ".nanogpt", help="a copy of nanoGPT")
    parser.add_argument("--data-dir", type=Path, default=ROOT / "data", help="our datasets' root")
    parser.add_argument(
        "--runs", type=Path, default=Path("/tmp/nanogpt-curve"), help="scratch: each part's run starts afresh"
    )
    parser.add_argument("--tiny", action="store_true", help="a tiny float32 model for a few CPU steps")
    parser.add_argument(
        "--parts", default=",".join(CURVES), help="which curves to run now; the others are kept from --out"
    )
    parser.add_argument("--replot", type=Path, help="only redraw table and plot from a curves.json")
    parser.add_argument(
        "overrides", nargs="*", help="section.key=value for both backends' runs, e.g. data.order=random"
    )
    args = parser.parse_args(argv)

    if args.replot:
        curves, title = read_curves(args.replot)
        print(write_results(curves, args.replot.parent, title))
        return
    parts = args.parts.split(",")
    if unknown := set(parts) - set(CURVES):
        parser.error(f"--parts: unknown {', '.join(sorted(unknown))}; choose from {','.join(CURVES)}")
    if "nanogpt" in parts and not (args.nanogpt / "train.py").is_file():
        parser.error(
            f"no nanoGPT in {args.nanogpt}; git clone https://github.com/karpathy/nanoGPT {args.nanogpt}"
        )
    data_dir = args.data_dir.resolve()
    if not (data_dir / "shakespeare" / "meta.json").exists():
        prepare_shakespeare(data_dir)
    args.out.mkdir(parents=True, exist_ok=True)
    runs = args.runs.resolve()
    saved = args.out / "curves.json"  # parts run in separate sessions add up in one --out
    curves = read_curves(saved)[0] if saved.exists() else {c: {} for c in CURVES}

    title = (
        "--tiny pipeline check" if args.tiny else "tiny Shakespeare, GPT-2 124M, 16 x 1024 x 8 tokens/step"
    ) + "".join(f", {o}" for o in args.overrides)
    for part in parts:  # in the order given; the results are saved after each, so a cut run keeps them
        if part == "nanogpt":
            sizes = write_nanogpt_data(data_dir / "shakespeare", args.nanogpt / "data" / DATASET)
            print(f"nanoGPT data: {sizes['train']:,} train and {sizes['val']:,} val tokens")
            recipe = {**NANOGPT_RECIPE, **NANOGPT_TINY} if args.tiny else NANOGPT_RECIPE
            log = _run(
                [sys.executable, "train.py", *nanogpt_args(recipe, runs / "nanogpt")],
                cwd=args.nanogpt,
                log=args.out / "nanogpt.log",
            )
            curves["nanogpt"] = parse_nanogpt_log(log)[1]
            if not curves["nanogpt"]:
                sys.exit(f"no 'step N: ... val loss' line in {args.out / 'nanogpt.log'}")
        else:
            curves[part] = run_babygpt(part, args, data_dir, runs)
        table = write_results(curves, args.out, title)
    print(table)


def run_babygpt(backend: str, args, data_dir: Path, runs: Path) -> dict[int, float]:
    """One backend's run of the recipe; its validation curve."""
    overrides = BABYGPT_RECIPE + (BABYGPT_TINY if args.tiny else []) + list(args.overrides)
    name = f"{backend}{'-tiny' if args.tiny else ''}"
    shutil.rmtree(runs / name, ignore_errors=True)  # a part run again replaces its curve
    _run(
        [
            sys.executable,
            "train.py",
            f"--backend={backend}",
            "--config",
            CONFIG,
            *overrides,
            f"data.data_dir={data_dir}",
            f"run.out_dir={runs}",
            f"run.name={name}",
        ],
        cwd=ROOT,
        log=args.out / f"{backend}.log",
        env={**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])},
    )
    return read_metrics(runs / name)[1]


if __name__ == "__main__":
    main()
