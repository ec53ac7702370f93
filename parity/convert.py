"""Lossless weight conversion between the PyTorch backend, the JAX backend and Hugging Face GPT-2.

The three meet in one layout: Hugging Face names and (in, out) Conv1D kernels, as written by each
backend's `hf_tensors` and read by its `load_hf_tensors` (the only places that know a backend's
layout). This module chains those, and adds what HF has no room for: the padded vocabulary rows.
A "full" tensor dict is the HF layout with `transformer.wte.weight` keeping all
`padded_vocab_size` rows, so torch <-> jax is bit-exact; the HF export drops the padded rows, which
never reach a logit (both backends mask them to -inf), so it computes the same function.

    python -m parity.convert SRC DST [--backend-of-src torch|jax|hf]

SRC: a Hugging Face directory, a run directory of either backend (its latest checkpoint, else its
export), a torch checkpoint `.pt`, or one orbax step directory. DST: a Hugging Face directory, or a
`.pt` file holding a torch `state_dict`. DST must be new (or an empty directory), and neither inside
SRC nor holding it: a conversion never removes or overwrites anything it did not create.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import shutil
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from babygpt.cli import run_cli
from babygpt.config import BabyGPTError, ModelConfig
from babygpt.files import atomic_open, staging_dir
from babygpt.hf import read_hf_dir, write_hf_dir

if TYPE_CHECKING:  # the backends are imported lazily: converting needs only the ones involved
    import babygpt_jax.model
    import babygpt_torch.model

WTE = "transformer.wte.weight"
SOURCE_KINDS = ("torch", "jax", "hf")

Tensors = dict[str, np.ndarray]


# --- PyTorch ---------------------------------------------------------------------------------


def torch_model(config: ModelConfig, tensors: Tensors) -> babygpt_torch.model.GPT:
    """A torch `GPT` holding `tensors` (full or HF layout; missing padded rows become zeros)."""
    from babygpt_torch.model import GPT, load_hf_tensors

    model = GPT(config)
    load_hf_tensors(model, tensors)
    return model.eval()


def torch_tensors(model: babygpt_torch.model.GPT) -> Tensors:
    """A torch `GPT`'s weights in the full layout."""
    from babygpt_torch.model import hf_tensors

    # copies: hf_tensors' arrays may share memory with the live parameters
    out = {name: array.copy() for name, array in hf_tensors(model).items()}
    out[WTE] = model.transformer.wte.weight.detach().float().cpu().numpy().copy()
    return out


def torch_grads(model: babygpt_torch.model.GPT) -> Tensors:
    """The `.grad` of every parameter, in the full layout (the same names and transposes)."""
    return torch_named_to_tensors(model.config, {n: p.grad for n, p in model.named_parameters()})


def torch_named_to_tensors(config: ModelConfig, named: dict) -> Tensors:
    """Per-parameter tensors keyed like `named_parameters()` (grads, Adam moments) in the full layout."""
    from babygpt_torch.model import GPT

    holder = GPT(config)
    for name, param in holder.named_parameters():  # the tied wte/lm_head tensor appears once
        param.data = named[name].detach().float().cpu().clone()
    return torch_tensors(holder)


def state_dict_to_tensors(state_dict: dict, config: ModelConfig) -> Tensors:
    """A torch `state_dict` (with or without the tied `lm_head.weight`) in the full layout."""
    from babygpt_torch.model import GPT

    model = GPT(config)
    state = dict(state_dict)
    state.setdefault("lm_head.weight", state[WTE])
    model.load_state_dict(state)
    return torch_tensors(model)


def tensors_to_state_dict(tensors: Tensors, config: ModelConfig) -> dict:
    return torch_model(config, tensors).state_dict()


# --- JAX -------------------------------------------------------------------------------------


def jax_model(config: ModelConfig, tensors: Tensors, dtype=None) -> babygpt_jax.model.GPT:
    """A JAX `GPT` holding `tensors`; `dtype` is the compute dtype (float32 by default)."""
    import jax.numpy as jnp
    from flax import nnx

    from babygpt_jax.model import GPT, load_hf_tensors

    model = GPT(config, rngs=nnx.Rngs(0), dtype=dtype or jnp.float32)
    load_hf_tensors(model, tensors)
    return model


def jax_tensors(model: babygpt_jax.model.GPT) -> Tensors:
    """A JAX `GPT`'s weights in the full layout."""
    from babygpt_jax.model import hf_tensors

    out = {
        name: np.array(array, dtype=np.float32) for name, array in hf_tensors(model).items()
    }  # writable copies
    out[WTE] = np.array(model.transformer.wte.embedding[...], dtype=np.float32)
    return out


def jax_params_to_tensors(params, config: ModelConfig) -> Tensors:
    """An `nnx.State` of the model's `nnx.Param`s (weights, or gradients of the same shape)."""
    from flax import nnx

    from babygpt_jax.model import GPT

    model = GPT(config, rngs=nnx.Rngs(0))
    nnx.update(model, params)
    return jax_tensors(model)


def tensors_to_jax_params(tensors: Tensors, config: ModelConfig):
    from flax import nnx

    return nnx.state(jax_model(config, tensors), nnx.Param)


# --- Hugging Face ----------------------------------------------------------------------------


def to_hf(tensors: Tensors, config: ModelConfig) -> Tensors:
    """The full layout minus the padded vocabulary rows: what `model.safetensors` holds."""
    out = dict(tensors)
    out[WTE] = tensors[WTE][: config.vocab_size]
    return out


# --- Reading a source, writing a destination -------------------------------------------------


def detect_kind(src: Path) -> str:
    if src.suffix == ".pt":
        return "torch"
    if (src / "_CHECKPOINT_METADATA").exists() or (src.parent.name == "checkpoints" and src.is_dir()):
        return "jax"  # one orbax step directory
    ckpts = src / "checkpoints"
    if ckpts.is_dir():
        if any(p.suffix == ".pt" for p in ckpts.iterdir()):
            return "torch"
        if any(p.is_dir() and p.name.isdigit() for p in ckpts.iterdir()):
            return "jax"
    if (src / "config.json").exists() and (src / "model.safetensors").exists():
        return "hf"
    raise BabyGPTError(
        f"{src} is neither a Hugging Face directory, a run directory nor a checkpoint;"
        " pass --backend-of-src torch|jax|hf if it is one of them"
    )


def _torch_checkpoint(src: Path) -> tuple[ModelConfig, Tensors]:
    import torch

    from babygpt_torch import checkpoint

    path = src
    if src.is_dir():
        step = checkpoint.latest_step(src)
        if step is None:
            if (src / "model.safetensors").exists():
                return read_hf_dir(src)
            raise BabyGPTError(f"no torch checkpoint in {checkpoint.checkpoint_dir(src)}")
        path = checkpoint.checkpoint_path(src, step)
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # a truncated or foreign file raises anything from pickle to zipfile
        raise BabyGPTError(f"{path} is not a readable torch checkpoint ({type(e).__name__})") from None
    if "model" in state and "model_config" in state:
        config = ModelConfig(**state["model_config"])
        return config, state_dict_to_tensors(state["model"], config)
    raise BabyGPTError(
        f"{path} is a bare state_dict without its model config; convert its run directory instead"
    )


def _jax_checkpoint(src: Path) -> tuple[ModelConfig, Tensors]:
    """The latest orbax checkpoint of a JAX run (a run directory, or its newest step directory)."""
    import jax
    from flax import nnx

    from babygpt.run import load_run_config
    from babygpt_jax import checkpoint
    from babygpt_jax.model import GPT
    from babygpt_jax.optim import make_optimizer

    run_dir = src.parent.parent if src.parent.name == "checkpoints" else src
    step = checkpoint.latest_step(run_dir)
    if step is None:
        if (run_dir / "model.safetensors").exists():
            return read_hf_dir(run_dir)
        raise BabyGPTError(f"no orbax checkpoint in {checkpoint.checkpoint_dir(run_dir)}")
    if src != run_dir and src.name != str(step):
        raise BabyGPTError(f"{src} is not the newest checkpoint of {run_dir}; convert {run_dir} instead")
    config = load_run_config(run_dir)
    # restore_checkpoint wants the full training state as its target (shapes and shardings only)
    params = nnx.to_pure_dict(nnx.state(GPT(config.model, rngs=nnx.Rngs(0)), nnx.Param))
    opt_state = make_optimizer(config.train).init(params)
    rng = np.asarray(jax.random.PRNGKey(config.train.seed))
    restored = checkpoint.restore_checkpoint(run_dir, params, opt_state, rng, config.model)
    return config.model, jax_params_to_tensors(restored["params"], config.model)


def load_source(src: str | Path, kind: str | None = None) -> tuple[ModelConfig, Tensors]:
    """The model config and full-layout tensors of any source `python -m parity.convert` accepts."""
    src = Path(src)
    if not src.exists():
        raise BabyGPTError(f"{src} does not exist")
    kind = kind or detect_kind(src)
    if kind not in SOURCE_KINDS:
        raise BabyGPTError(f"unknown source kind {kind!r}; choose one of {', '.join(SOURCE_KINDS)}")
    if kind == "hf":
        return read_hf_dir(src)
    if kind == "torch":
        return _torch_checkpoint(src)
    return _jax_checkpoint(src)


def save_state_dict(path: str | Path, config: ModelConfig, tensors: Tensors) -> Path:
    """A torch checkpoint-like `.pt` ({"model_config", "model"}), written to a temporary name first."""
    import torch

    path = Path(path)
    state = {"model_config": dataclasses.asdict(config), "model": tensors_to_state_dict(tensors, config)}
    with atomic_open(path) as f:
        torch.save(state, f)
    return path


def save_hf_dir(path: Path, config: ModelConfig, tensors: Tensors) -> Path:
    """The HF directory built whole in a staging directory beside `path`, then moved in by one rename.

    The rename replaces at most an empty directory (checked before, and refused by the OS should
    something have appeared meanwhile): a conversion never removes what it did not create.
    """
    stage = staging_dir(path)
    try:
        os.replace(write_hf_dir(stage / path.name, config, to_hf(tensors, config)), path)
    finally:
        shutil.rmtree(stage, ignore_errors=True)
    return path


def check_destination(src: str | Path, dst: str | Path) -> None:
    """Refuse, before any work, every destination whose writing could touch what is already there."""
    src, dst = Path(src).resolve(), Path(dst).resolve()
    if dst == src or src in dst.parents:
        raise BabyGPTError(f"{dst} is inside the source {src}; choose a destination outside it")
    if dst in src.parents:
        raise BabyGPTError(f"{dst} holds the source {src}; choose a new destination outside it")
    blocker = next((p for p in dst.parents if p.exists() and not p.is_dir()), None)
    if blocker is not None:
        raise BabyGPTError(f"{blocker} is a file, so {dst} cannot be made; choose another destination")
    if dst.is_dir() and any(dst.iterdir()):
        raise BabyGPTError(f"{dst} exists and is not empty; choose a new destination or empty it first")
    if dst.exists() and not dst.is_dir():
        raise BabyGPTError(f"{dst} already exists; choose a new destination or remove it first")
    if dst.suffix == ".pt" and dst.is_dir():
        raise BabyGPTError(f"{dst} is a directory; a .pt destination must be a new file")


def convert(src: str | Path, dst: str | Path, kind: str | None = None) -> Path:
    check_destination(src, dst)
    config, tensors = load_source(src, kind)
    dst = Path(dst)
    try:
        if dst.suffix == ".pt":
            return save_state_dict(dst, config, tensors)
        return save_hf_dir(dst, config, tensors)
    except OSError as e:  # a read-only or full disk, or something that appeared at dst meanwhile
        raise BabyGPTError(f"cannot write {dst}: {e.strerror or e}; choose another destination") from None


def main() -> None:
    parser = argparse.ArgumentParser(
        prog="python -m parity.convert",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("src", help="HF dir, run dir, torch .pt checkpoint or orbax step dir")
    parser.add_argument("dst", help="a Hugging Face directory, or a .pt file for a torch state_dict")
    parser.add_argument("--backend-of-src", choices=SOURCE_KINDS, default=None, help="skip auto-detection")
    args = parser.parse_args()
    out = convert(args.src, args.dst, args.backend_of_src)
    print(f"wrote {out}")


if __name__ == "__main__":
    run_cli(main)
