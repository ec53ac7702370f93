"""bfloat16 parity on a GPU: how far each backend's bf16 compute is from a float32 reference.

    python -m parity.gpu_check [--steps 40] [--small] [--json PATH]

Loads the same O(1)-scaled random weights (as `pytest parity` uses) into both backends, then
1. forward logits: torch and JAX in float32 (full-precision matmuls, no TF32) and in bf16
   compute (torch autocast / Flax `dtype=bfloat16`), each compared with the float32 torch logits;
2. training: each backend's real `train.main` with `train.dtype=bfloat16` from the same GPT-2
   init (`parity.compare.run_both`) on the same Shakespeare batches, and the difference between
   the two loss curves.
It prints a Markdown summary for docs/parity.md. About a minute on one H100; `--small` is a
CPU-sized version of the same script (a smoke test, not a measurement).
"""

from __future__ import annotations

import argparse
import json
import logging
import tempfile
import time
from pathlib import Path

import numpy as np

from babygpt.cli import run_cli
from babygpt.config import ModelConfig, load_config
from parity.compare import run_both
from parity.convert import jax_model, torch_model
from parity.weights import o1_tensors, random_batch

GPU_MODEL = ModelConfig(n_layer=6, n_head=8, n_embd=512, block_size=256)  # vocab 50257 -> 50304
SMALL_MODEL = ModelConfig(n_layer=2, n_head=4, n_embd=64, block_size=32)


def differences(x: np.ndarray, reference: np.ndarray) -> dict:
    """Max and mean absolute difference, both also relative to the reference's scale, and how
    often the top-1 token agrees."""
    x, reference = x.astype(np.float64), reference.astype(np.float64)
    diff = np.abs(x - reference)
    return {
        "max_abs": float(diff.max()),
        "max_rel": float(diff.max() / np.abs(reference).max()),
        "mean_rel": float(diff.mean() / np.abs(reference).mean()),
        "top1_agree": float((x.argmax(-1) == reference.argmax(-1)).mean()),
    }


def jax_logits(model, idx: np.ndarray) -> np.ndarray:
    """Float32 logits of a JAX GPT, jitted with the weights as arguments (not baked-in constants)."""
    import jax
    import jax.numpy as jnp
    from flax import nnx

    graphdef, state = nnx.split(model)
    logits = jax.jit(lambda state, i: nnx.merge(graphdef, state)(i)[0].astype(jnp.float32))
    return np.asarray(logits(state, jnp.asarray(idx)))


def forward_check(model: ModelConfig, seed: int = 0) -> dict:
    import jax
    import jax.numpy as jnp
    import torch

    tensors = o1_tensors(model, seed)
    V = model.vocab_size
    idx, _ = random_batch(model, B=8, T=model.block_size, seed=seed + 1)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    tm = torch_model(model, tensors).to(device)
    x = torch.from_numpy(idx).to(device)
    torch.backends.cuda.matmul.allow_tf32 = False  # the reference is true float32
    torch.backends.cudnn.allow_tf32 = False
    with torch.no_grad():
        ref = tm(x)[0][..., :V].float().cpu().numpy()
        with torch.autocast(device, dtype=torch.bfloat16):
            torch_bf16 = tm(x)[0][..., :V].float().cpu().numpy()
    with jax.default_matmul_precision("highest"):
        jax_fp32 = jax_logits(jax_model(model, tensors), idx)[..., :V]
    jax_bf16 = jax_logits(jax_model(model, tensors, dtype=jnp.bfloat16), idx)[..., :V]
    return {
        "logit_std": float(ref.std()),
        "jax float32 vs torch float32": differences(jax_fp32, ref),
        "torch bf16 vs torch float32": differences(torch_bf16, ref),
        "jax bf16 vs torch float32": differences(jax_bf16, ref),
        "jax bf16 vs torch bf16": differences(jax_bf16, torch_bf16),
    }


def training_check(model: ModelConfig, steps: int, root: Path, micro_batch: int) -> dict:
    """GPT-2's own init here (the run a user makes), written once so both backends start from it."""
    overrides = [f"model.{k}={getattr(model, k)}" for k in ("n_layer", "n_head", "n_embd", "block_size")]
    overrides += [
        f"train.max_steps={steps}",
        f"train.micro_batch_size={micro_batch}",
        f"train.total_batch_tokens={2 * micro_batch * model.block_size}",  # 2 micro-steps
        f"train.warmup_steps={max(1, steps // 10)}",
        "train.max_lr=1e-3",
        f"train.eval_interval={steps}",
        "train.eval_steps=4",
        f"train.checkpoint_interval={steps}",
        "train.log_interval=1",
        "train.sample_tokens=0",
        "train.dtype=bfloat16",
        "data.dataset=shakespeare",
        f"data.data_dir={root / 'data'}",
        f"run.out_dir={root / 'out'}",
        "run.name=bf16",
    ]
    result = run_both(load_config(None, overrides))
    torch_loss = [result["torch"]["loss"][s] for s in result["steps"]]
    jax_loss = [result["jax"]["loss"][s] for s in result["steps"]]
    return {
        "steps": len(result["steps"]),
        "first_loss": {"torch": torch_loss[0], "jax": jax_loss[0]},
        "last_loss": {"torch": torch_loss[-1], "jax": jax_loss[-1]},
        "max_abs_diff": result["max_abs_diff"],
        "max_rel_diff": result["max_rel_diff"],
        "val_loss": {b: result[b]["summary"]["val_loss"] for b in ("torch", "jax")},
        "curves": {"torch": torch_loss, "jax": jax_loss},
    }


def markdown(report: dict) -> str:
    lines = [
        f"Device: {report['device']}; model {report['model']}; {report['seconds']:.0f} s.",
        "",
        "| logits | max abs | max rel | mean rel | top-1 agree |",
        "| --- | --- | --- | --- | --- |",
    ]
    for name, d in report["forward"].items():
        if isinstance(d, dict):
            lines.append(
                f"| {name} | {d['max_abs']:.2e} | {d['max_rel']:.2e} | {d['mean_rel']:.2e}"
                f" | {d['top1_agree']:.2%} |"
            )
    t = report["training"]
    lines += [
        "",
        f"bf16 training, {t['steps']} steps (2 micro-steps each): loss {t['first_loss']['torch']:.4f} ->"
        f" torch {t['last_loss']['torch']:.4f} / jax {t['last_loss']['jax']:.4f};"
        f" max |loss difference| {t['max_abs_diff']:.2e} ({t['max_rel_diff']:.2e} relative);"
        f" val loss torch {t['val_loss']['torch']:.4f} / jax {t['val_loss']['jax']:.4f}.",
    ]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(
        prog="python -m parity.gpu_check",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--steps", type=int, default=40, help="training steps per backend")
    parser.add_argument("--small", action="store_true", help="a CPU-sized smoke test")
    parser.add_argument("--json", default=None, help="also write the full report here")
    args = parser.parse_args()
    logging.getLogger().setLevel(logging.WARNING)  # the two runs' progress lines are noise here
    import jax

    model = SMALL_MODEL if args.small else GPU_MODEL
    start = time.perf_counter()
    report = {"device": str(jax.devices()[0].device_kind), "model": str(model)}
    report["forward"] = forward_check(model)
    with tempfile.TemporaryDirectory() as root:
        report["training"] = training_check(model, args.steps, Path(root), 4 if args.small else 16)
    report["seconds"] = time.perf_counter() - start
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=2))
    print(markdown(report))


if __name__ == "__main__":
    run_cli(main)
