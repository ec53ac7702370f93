"""Checkpoints in PyTorch: one `torch.save` file per step, written to a temporary name and renamed.

The mirror of `babygpt_jax/checkpoint.py`, which uses orbax's `CheckpointManager`. A checkpoint
holds everything a resumed run needs to continue exactly: model, optimizer and scheduler state,
the data loader's position and the RNG state. `export_hf` writes the weights in the Hugging Face
layout that both backends (and `transformers`) load.

Model and optimizer state go through `torch.distributed.checkpoint.state_dict`, which gathers
FSDP2's shards whole and reads a plain module as it is: the file is the same whether one process,
DDP or FSDP2 wrote it, and any of them resumes it.
"""

from __future__ import annotations

import dataclasses
import re
from pathlib import Path

import torch
import torch.nn as nn
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_optimizer_state_dict,
    set_model_state_dict,
    set_optimizer_state_dict,
)

from babygpt.config import BabyGPTError
from babygpt.files import atomic_open
from babygpt.hf import MODEL_FIELDS, export_into_run_dir, shape_mismatches
from babygpt_torch.model import hf_tensors
from babygpt_torch.parallel import WHOLE_ON_RANK0, is_main_process

_NAME = re.compile(r"^step_(\d{8})\.pt$")
# The fields that fix the shape of the weights; dropout may change between runs.
_SHAPE_FIELDS = (*MODEL_FIELDS, "vocab_multiple")  # the stored tables are padded too


def checkpoint_dir(run_dir: str | Path) -> Path:
    return Path(run_dir) / "checkpoints"


def checkpoint_path(run_dir: str | Path, step: int) -> Path:
    return checkpoint_dir(run_dir) / f"step_{step:08d}.pt"


def _steps(run_dir: str | Path) -> list[int]:
    folder = checkpoint_dir(run_dir)
    if not folder.is_dir():
        return []
    return sorted(int(m.group(1)) for p in folder.iterdir() if (m := _NAME.match(p.name)))


def save_checkpoint(
    run_dir: str | Path,
    step: int,
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LRScheduler,
    loader_state: dict,
    rng_state: dict,
    keep: int = 2,
) -> Path:
    """Write checkpoints/step_{step:08d}.pt atomically, then delete all but the newest `keep`.

    Every process calls it (under FSDP2 they all take part in gathering the state); rank 0 writes.
    The optimizer state is keyed by parameter name, not by torch's position in the param groups.
    """
    path = checkpoint_path(run_dir, step)
    weights = get_model_state_dict(model, options=WHOLE_ON_RANK0)
    optimizer_state = get_optimizer_state_dict(model, optimizer, options=WHOLE_ON_RANK0)
    if not is_main_process():
        return path
    weights["lm_head.weight"] = weights["transformer.wte.weight"]  # tied: store the matrix once
    path.parent.mkdir(parents=True, exist_ok=True)
    state = {
        "step": step,
        "model_config": dataclasses.asdict(model.config),
        "model": weights,
        "optimizer": optimizer_state,
        "scheduler": scheduler.state_dict(),
        "loader": dict(loader_state),
        "rng": rng_state,
    }
    try:
        with atomic_open(path) as f:
            torch.save(state, f)
    except (OSError, RuntimeError) as e:  # torch reports a full disk from its zip writer, in C++
        reason = "No space left on device" if "No space left" in str(e) else getattr(e, "strerror", None) or e
        raise BabyGPTError(
            f"cannot write {path} ({reason}); free space or choose another run.out_dir"
        ) from None
    for old in _steps(run_dir)[: -max(keep, 1)]:
        checkpoint_path(run_dir, old).unlink(missing_ok=True)
    return path


def latest_step(run_dir: str | Path) -> int | None:
    """The newest committed checkpoint's step (a file is committed by its rename into place)."""
    steps = _steps(run_dir)
    return steps[-1] if steps else None


def restore_checkpoint(
    run_dir: str | Path,
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LRScheduler,
) -> dict:
    """Load the latest checkpoint into model, optimizer and scheduler (in place), on every process.

    Returns {"step", "loader", "rng"}: the step to continue from, the loader state and the RNG
    state, which the caller applies. Any unreadable or mismatched file is one `BabyGPTError`.
    """
    step = latest_step(run_dir)
    if step is None:
        raise BabyGPTError(f"no checkpoint in {checkpoint_dir(run_dir)}; drop --resume to start a new run")
    path = checkpoint_path(run_dir, step)
    fix = "delete it to resume from the one before"
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
        keys = ("step", "model_config", "model", "optimizer", "scheduler", "loader", "rng")
        missing = [k for k in keys if k not in state]
    except Exception as e:  # a truncated or foreign file raises anything from pickle to zipfile
        raise BabyGPTError(
            f"checkpoint {path} is corrupt or unreadable ({type(e).__name__}); {fix}"
        ) from None
    if missing:
        raise BabyGPTError(f"checkpoint {path} is not a babyGPT torch checkpoint (no {missing[0]!r})")
    diffs = shape_mismatches(state["model_config"], model.config, "the checkpoint", _SHAPE_FIELDS)
    if diffs:
        raise BabyGPTError(f"checkpoint {path} does not fit this model: {'; '.join(diffs)}")
    options = StateDictOptions(full_state_dict=True)  # whole tensors in; each process keeps its shard
    try:
        set_model_state_dict(model, state["model"], options=options)
        set_optimizer_state_dict(
            model, optimizer, _by_name(state["optimizer"], model, optimizer), options=options
        )
    except (RuntimeError, ValueError, KeyError) as e:
        first = str(e).strip().splitlines()[0]
        raise BabyGPTError(f"checkpoint {path} does not fit this model or optimizer ({first})") from None
    scheduler.load_state_dict(state["scheduler"])
    return {"step": state["step"], "loader": state["loader"], "rng": state["rng"]}


def _by_name(optimizer_state: dict, model: nn.Module, optimizer: torch.optim.Optimizer) -> dict:
    """Optimizer state keyed by parameter name; files written before FSDP2 support key it by index."""
    groups = optimizer_state["param_groups"]
    if all(isinstance(key, str) for group in groups for key in group["params"]):
        return optimizer_state
    names = {p: n for n, p in model.named_parameters()}
    order = [names[p] for group in optimizer.param_groups for p in group["params"]]
    return {
        "state": {order[i]: s for i, s in optimizer_state["state"].items()},
        "param_groups": [{**group, "params": [order[i] for i in group["params"]]} for group in groups],
    }


def export_hf(run_dir: str | Path, model: nn.Module) -> Path:
    """Write run_dir/model.safetensors + run_dir/config.json (Hugging Face GPT-2 layout).

    The pair is written complete into a hidden directory first, then moved in (weights first), so
    `GPT.from_pretrained(run_dir)` never sees a half-written file.
    """
    return export_into_run_dir(run_dir, model.config, hf_tensors(model))
