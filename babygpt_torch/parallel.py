"""Data parallelism in PyTorch: one process per GPU under `torchrun`; DDP, or FSDP2 with `train.fsdp`.

The mirror of `babygpt_jax/parallel.py`, where one process drives every local device through a
`Mesh` and sharding annotations. Here each process holds a slice of the batch and either a full
replica (DDP averages the gradients) or a shard of every parameter (FSDP2 gathers a Block's
weights just before it runs); the parallelism lives in the process group and in module wrappers.
"""

from __future__ import annotations

import contextlib
import copy
import gc
import logging
import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as torch_dist
import torch.nn as nn
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import FSDPModule, fully_shard
from torch.distributed.tensor import DTensor
from torch.nn.parallel import DistributedDataParallel as DDP

from babygpt.memory import host_memory
from babygpt.run import keep_freed_host_memory

log = logging.getLogger(__name__)

# How long a collective may wait for a peer before the job fails rather than hangs. Long enough
# for the slowest legitimate wait (rank 0 writing a large checkpoint while the others wait at the
# next collective; a first step that compiles); a dead peer is noticed by torchrun long before.
COLLECTIVE_TIMEOUT = timedelta(minutes=10)
# Whole tensors (FSDP2's shards gathered) on rank 0's CPU, the others left empty: GPU memory holds
# one shard only. A plain module is read as it is.
WHOLE_ON_RANK0 = StateDictOptions(full_state_dict=True, cpu_offload=True)


@dataclass(frozen=True)
class Dist:
    rank: int
    local_rank: int
    world_size: int
    device: torch.device


def setup_distributed(fsdp: bool = False) -> Dist:
    """Join the process group `torchrun` describes, or run alone; then set up this process.

    `RANK`, `LOCAL_RANK` and `WORLD_SIZE` describe the run (torchrun sets them); FSDP2 shards over
    a process group even when there is one process, so `fsdp` asks for a group of one where DDP
    needs none. A GPU gets TF32 for any matmul left in float32.
    A CPU gets glibc settings that keep large freed blocks for reuse (`keep_freed_host_memory`).
    Must run before anything touches a device.
    """
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    rank = int(os.environ.get("RANK", 0))
    world_size = int(os.environ.get("WORLD_SIZE", 1))
    cpu = not torch.cuda.is_available()
    if cpu:  # torch allocates its big blocks on this thread
        keep_freed_host_memory(one_arena=False)
    else:  # before init: NCCL binds each process to its own GPU; TF32 for matmuls left in float32
        torch.cuda.set_device(local_rank)
        torch.set_float32_matmul_precision("high")
    if (world_size > 1 or fsdp) and not torch_dist.is_initialized():
        # A lone process started without torchrun has no rendezvous address: an in-memory store.
        store = torch_dist.HashStore() if world_size == 1 and "MASTER_ADDR" not in os.environ else None
        group = dict(rank=rank, world_size=world_size, store=store, timeout=COLLECTIVE_TIMEOUT)
        torch_dist.init_process_group("gloo" if cpu else "nccl", **group)
        devices = (rank, world_size, 1)
        log.info("process %d of %d, %d local devices", *devices)
    # Process 0 narrates the run; the others speak only to warn.
    if world_size > 1 and rank > 0:
        for package in ("babygpt", "babygpt_torch"):
            logging.getLogger(package).setLevel(logging.WARNING)
    device = torch.device("cpu") if cpu else torch.device("cuda", local_rank)
    return Dist(rank=rank, local_rank=local_rank, world_size=world_size, device=device)


def is_main_process() -> bool:
    return not torch_dist.is_initialized() or torch_dist.get_rank() == 0


def shard_model(model: nn.Module, dist: Dist) -> nn.Module:
    """FSDP2, in place: every parameter becomes a DTensor holding this process's rows of it.

    Each Block is its own unit, so only one Block's weights are whole at a time (gathered before
    its forward and its backward); the root unit holds the embeddings, `ln_f` and the `lm_head`
    tied to `wte`. Call it before building the optimizer, which must see the sharded parameters.
    """
    mesh = init_device_mesh(dist.device.type, (dist.world_size,))
    for block in model.transformer.h:
        fully_shard(block, mesh=mesh)
    fully_shard(model, mesh=mesh)
    return model


def wrap_model(model: nn.Module, dist: Dist) -> nn.Module:
    """DDP all-reduces (averages) the gradients during backward; a single process needs nothing."""
    if dist.world_size == 1:
        return model
    device_ids = [dist.local_rank] if dist.device.type == "cuda" else None
    return DDP(model, device_ids=device_ids)


def make_global_batch(local, dist: Dist):
    """The global batch from this process's rows (a tensor, or a tuple of them such as x, y).

    DDP needs no global tensor: each process keeps its own rows, on its own device.
    """
    if isinstance(local, tuple):
        return tuple(make_global_batch(t, dist) for t in local)
    # Pinned memory lets the copy to a GPU overlap the previous step.
    return local.pin_memory().to(dist.device, non_blocking=True) if dist.device.type == "cuda" else local


def make_host_copy(model: nn.Module, dist: Dist, fsdp: bool) -> Callable[[], nn.Module | None]:
    """A function returning the whole model on rank 0 (None elsewhere), for export and sampling.

    Without FSDP that is the model itself. Under FSDP no process holds the whole model: rank 0
    keeps a plain copy on the CPU (taken now, before sharding) that each call refreshes from the
    shards, a collective every process must join.
    """
    if not fsdp:
        return lambda: model if dist.rank == 0 else None
    whole = copy.deepcopy(model).cpu() if dist.rank == 0 else None

    def host_copy() -> nn.Module | None:
        weights = get_model_state_dict(model, options=WHOLE_ON_RANK0)
        if whole is not None:
            whole.load_state_dict(weights)
        return whole

    return host_copy


def no_sync(model: nn.Module, sync: bool) -> contextlib.AbstractContextManager:
    """Skip the gradient collective of a micro-step whose gradients only accumulate (`sync` False):
    DDP's all-reduce or FSDP2's reduce-scatter runs once, in the last micro-step's backward."""
    if sync or not torch_dist.is_initialized() or torch_dist.get_world_size() == 1:
        return contextlib.nullcontext()
    if isinstance(model, DDP):
        return model.no_sync()
    module = getattr(model, "_orig_mod", model)  # the module under torch.compile's wrapper
    if isinstance(module, FSDPModule):
        return _no_gradient_sync(module)
    return contextlib.nullcontext()


@contextlib.contextmanager
def _no_gradient_sync(model: FSDPModule) -> Iterator[None]:
    model.set_requires_gradient_sync(False)
    try:
        yield
    finally:
        model.set_requires_gradient_sync(True)


def clip_grad_norm(model: nn.Module, max_norm: float) -> torch.Tensor:
    """Clip the gradients to a global norm (`max_norm` 0: measure only); return the norm before.

    FSDP2's gradients are shards, so its norm is a DTensor whose full value is global.
    """
    grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), max_norm or float("inf"))
    if isinstance(grad_norm, DTensor):
        grad_norm = grad_norm.full_tensor()
    return grad_norm


def all_reduce_mean(tensor: torch.Tensor) -> torch.Tensor:
    """The mean over processes of a value each computed on its own rows (the loss, for the log)."""
    if torch_dist.is_initialized() and torch_dist.get_world_size() > 1:
        tensor = tensor.clone()
        torch_dist.all_reduce(tensor, op=torch_dist.ReduceOp.SUM)
        tensor /= torch_dist.get_world_size()
    return tensor


def all_finite(model: nn.Module) -> bool:
    """Whether every parameter is finite, on every process: each checks its own (shards), with one
    read back to the host (not one per parameter), then votes."""
    local = [p.to_local() if isinstance(p, DTensor) else p for p in model.parameters()]
    finite = torch.stack([torch.isfinite(p).all() for p in local]).all()
    return not any_process(not bool(finite))


def any_process(flag: bool) -> bool:
    """True on every process if it is True on any: how the processes agree to stop at the same step."""
    if not torch_dist.is_initialized() or torch_dist.get_world_size() == 1:
        return flag
    votes = torch.tensor([int(flag)], device="cuda" if torch_dist.get_backend() == "nccl" else "cpu")
    torch_dist.all_reduce(votes, op=torch_dist.ReduceOp.MAX)
    return bool(votes.item())


def barrier(name: str = "") -> None:
    """Wait for every process, e.g. while rank 0 prepares the dataset the others will read."""
    if torch_dist.is_initialized() and torch_dist.get_world_size() > 1:
        torch_dist.barrier()  # `name` mirrors JAX's: a process group matches barriers by order


def shutdown() -> None:
    """Leave the process group together: only after a finished or an agreed stop, never a failure.

    The barrier keeps a process from closing its connections while a peer still writes the last
    checkpoint and talks to it; the group's background threads then have nothing left to abort on.
    """
    if torch_dist.is_initialized():
        barrier("shutdown")
        # FSDP2's parameters hold the group through their device mesh, in reference cycles that
        # outlive the training function: collected here, the group is torn down now rather than
        # during interpreter exit, where a gloo thread could abort the process (SIGABRT).
        gc.collect()
        torch_dist.destroy_process_group()


def device_memory() -> tuple[int, str]:
    """(bytes one device may use, its platform): on a GPU its total memory (torch's caching
    allocator may take all of it), on a CPU the host's RAM shared by the processes torchrun started
    on this machine."""
    if torch.cuda.is_available():
        index = torch.cuda.current_device()
        return torch.cuda.get_device_properties(index).total_memory, "cuda"
    return host_memory() // int(os.environ.get("LOCAL_WORLD_SIZE", "1")), "cpu"


def peak_memory_gib(device: torch.device) -> float | None:
    """The most `device` has held at once, in GiB, as torch's caching allocator counts it; None on a
    CPU."""
    return torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None
