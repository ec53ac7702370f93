"""Checkpoints in JAX: orbax's `CheckpointManager`, asynchronous, restoring onto the current mesh.

The mirror of `babygpt_torch/checkpoint.py`, which writes one `torch.save` file per step. Here a
checkpoint is a directory `checkpoints/<step>/` that orbax commits atomically. It holds what a
resumed run needs to continue exactly: parameters, optimizer state and RNG key (arrays), the step,
loader position and model shape (JSON). `export_hf` writes the weights in the Hugging Face layout.

Orbax writes in the background (the devices keep training), and every process takes part, each
writing its own shards: the directory is the same whatever mesh wrote it, and any mesh restores
it, whole or sharded.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
from collections.abc import Iterator
from pathlib import Path

import jax
import orbax.checkpoint as ocp
from flax import nnx

from babygpt.config import BabyGPTError, ModelConfig
from babygpt.files import require_space
from babygpt.hf import MODEL_FIELDS, export_into_run_dir, shape_mismatches
from babygpt_jax.model import GPT, hf_tensors

# The fields that fix the shape of the weights; dropout may change between runs.
_SHAPE_FIELDS = (*MODEL_FIELDS, "vocab_multiple")  # the stored tables are padded too


def checkpoint_dir(run_dir: str | Path) -> Path:
    return Path(run_dir).absolute() / "checkpoints"


def checkpoint_manager(run_dir: str | Path, keep: int = 2, read_only: bool = False) -> ocp.CheckpointManager:
    """One manager per run: it keeps the newest `keep` checkpoints and saves asynchronously.

    Call `wait_until_finished()` (or `close()`) before the process exits, or the last save is lost.
    """
    settings = dict(max_to_keep=max(keep, 1), create=not read_only, read_only=read_only)
    # The arrays through orbax's PyTree handler, not its Standard one: only it takes the setting.
    registry = ocp.handlers.DefaultCheckpointHandlerRegistry()
    pinned = pinned_host_copies(jax.local_devices()[0])
    state, meta = ocp.PyTreeCheckpointHandler(enable_pinned_host_transfer=pinned), ocp.JsonCheckpointHandler()
    registry.add("state", ocp.args.PyTreeSave, state)
    registry.add("state", ocp.args.PyTreeRestore, state)
    registry.add("meta", ocp.args.JsonSave, meta)
    registry.add("meta", ocp.args.JsonRestore, meta)
    with _quiet_orbax():  # a read-only manager warns of each setting it ignores
        options = ocp.CheckpointManagerOptions(**settings, enable_async_checkpointing=True)
        return ocp.CheckpointManager(checkpoint_dir(run_dir), options=options, handler_registry=registry)


def pinned_host_copies(device) -> bool | None:
    """Whether orbax copies the arrays off `device` through pinned host memory: None leaves it to
    orbax, which pins on a GPU (once warm, an 8 GB save blocked the step 0.17 s, against 4.2-4.8 s
    through ordinary memory; H200, docs/benchmarks.md). Not under an allocator that keeps no statistics:
    XLA's VMM allocator, which its SKIP_TEMP command-buffer mode selects, segfaults on a copy into
    pinned host memory (jaxlib 0.11.2)."""
    return None if device.platform == "cpu" or device.memory_stats() is not None else False


@contextlib.contextmanager
def _quiet_orbax() -> Iterator[None]:
    """Orbax's absl warnings silenced: a corrupt checkpoint is our one line, not a screenful first."""
    absl, level = logging.getLogger("absl"), logging.getLogger("absl").level
    absl.setLevel(logging.ERROR)
    try:
        yield
    finally:
        absl.setLevel(level)


def save_checkpoint(
    manager: ocp.CheckpointManager,
    step: int,
    params,
    opt_state,
    loader_state: dict,
    rng: jax.Array,
    model_config: ModelConfig,
) -> None:
    """Start saving checkpoints/<step>/ in the background; the manager keeps the newest `keep`.

    Every process calls it, each writing its own shards. It returns once the arrays are copied off
    the devices, so that the next (donating) train step may overwrite them.
    """
    state = {"params": params, "opt_state": opt_state, "rng": rng}
    meta = {"step": step, "loader": dict(loader_state), "model_config": dataclasses.asdict(model_config)}
    # The checkpoint, and the export of the parameters beside it, must fit before orbax starts:
    # its background threads report a full disk as hundreds of lines, not one.
    size = sum(x.nbytes for x in jax.tree.leaves(state)) + sum(x.nbytes for x in jax.tree.leaves(params))
    require_space(manager.directory, int(1.05 * size) + 2**20)
    args = ocp.args.Composite(state=ocp.args.PyTreeSave(state), meta=ocp.args.JsonSave(meta))
    try:
        with _quiet_orbax():
            manager.save(step, args=args, force=True)
    except OSError as e:  # a full disk or a read-only directory, met before the background part
        where = f"{manager.directory}/{step}"
        raise BabyGPTError(
            f"cannot write {where} ({e.strerror}); free space or choose another run.out_dir"
        ) from None


def latest_step(run_dir: str | Path) -> int | None:
    """The newest committed checkpoint's step (orbax ignores unfinished, temporary directories)."""
    if not checkpoint_dir(run_dir).is_dir():
        return None
    with contextlib.closing(checkpoint_manager(run_dir, read_only=True)) as manager, _quiet_orbax():
        return manager.latest_step()


def restore_checkpoint(
    run_dir: str | Path,
    params,
    opt_state,
    rng: jax.Array,
    model_config: ModelConfig,
) -> dict:
    """Read the latest checkpoint onto the shardings of `params`, `opt_state` and `rng`.

    Returns {"step", "loader", "params", "opt_state", "rng"}: the three arguments are only the target
    (shapes, dtypes, this mesh's shardings). Any unreadable or mismatched checkpoint is one `BabyGPTError`.
    """
    step = latest_step(run_dir)
    if step is None:
        raise BabyGPTError(f"no checkpoint in {checkpoint_dir(run_dir)}; drop --resume to start a new run")
    path = checkpoint_dir(run_dir) / str(step)
    fix = "delete it to resume from the one before"
    manager = checkpoint_manager(run_dir, read_only=True)
    with contextlib.closing(manager), _quiet_orbax():
        try:
            meta = manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))["meta"]
            saved = meta["model_config"]
        except Exception as e:  # a truncated or foreign directory fails anywhere inside orbax
            raise BabyGPTError(
                f"checkpoint {path} is corrupt or unreadable ({type(e).__name__}); {fix}"
            ) from None
        diffs = shape_mismatches(saved, model_config, "the checkpoint", _SHAPE_FIELDS)
        if diffs:
            raise BabyGPTError(f"checkpoint {path} does not fit this model: {'; '.join(diffs)}")
        target = jax.tree.map(
            ocp.utils.to_shape_dtype_struct, {"params": params, "opt_state": opt_state, "rng": rng}
        )
        try:
            try:
                state = _restore_state(manager, step, target)
            except ValueError:  # written before the train state held plain dicts?
                state = _plain(_restore_state(manager, step, _as_variables(target, params)))
        except Exception as e:
            first = (str(e).strip().splitlines() or [""])[0][:200]
            raise BabyGPTError(
                f"checkpoint {path} is corrupt or does not fit this model or optimizer"
                f" ({type(e).__name__}: {first}); {fix}"
            ) from None
    return {"step": int(meta["step"]), "loader": meta["loader"], **state}


def _restore_state(manager: ocp.CheckpointManager, step: int, target) -> dict:
    """Checkpoint `step`'s train state as exactly `target`'s tree, each array onto its shape, dtype
    and sharding."""
    state = ocp.args.PyTreeRestore(target, restore_args=ocp.checkpoint_utils.construct_restore_args(target))
    return manager.restore(step, args=ocp.args.Composite(state=state))["state"]


def _as_variables(target: dict, params) -> dict:
    """`target` laid out as checkpoints were until 2026-12-02, when the parameters and the AdamW
    moments shaped like them were `nnx.State`s of `nnx.Param`s, which orbax stores one level
    deeper (under "value")."""
    shape = jax.tree.structure(params)
    like_params = lambda x: isinstance(x, dict) and x and jax.tree.structure(x) == shape
    wrap = lambda x: jax.tree.map(nnx.Param, x) if like_params(x) else x
    return jax.tree.map(wrap, target, is_leaf=like_params)


def _plain(state: dict) -> dict:
    """The arrays out of the `nnx.Param`s that `_as_variables` put in."""
    return jax.tree.map(
        lambda x: x.get_value() if isinstance(x, nnx.Variable) else x,
        state,
        is_leaf=lambda x: isinstance(x, nnx.Variable),
    )


def export_hf(run_dir: str | Path, model: GPT) -> Path:
    """Write run_dir/model.safetensors + run_dir/config.json (Hugging Face GPT-2 layout).

    The pair is written complete into a hidden directory first, then moved in (weights first), so
    `GPT.from_pretrained(run_dir)` never sees a half-written file. The caller makes the weights
    addressable here (gathered, when sharded over processes) and calls this on process 0 only.
    """
    return export_into_run_dir(run_dir, model.config, hf_tensors(model))
