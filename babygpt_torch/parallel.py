"""Data parallelism in PyTorch: one process per GPU under `torchrun`, gradients averaged by DDP.

The mirror of `babygpt_jax/parallel.py`, where one process drives every local device through a
`Mesh` and sharding annotations. Here each process holds a full replica and a slice of the batch;
the parallelism lives in the process group and in the `DistributedDataParallel` wrapper.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as torch_dist
import torch.nn as nn
from torch.nn.parallel import DistributedDataParallel as DDP


@dataclass(frozen=True)
class Dist:
    rank: int
    local_rank: int
    world_size: int
    device: torch.device


def setup_distributed() -> Dist:
    """Join the process group `torchrun` describes (RANK, LOCAL_RANK, WORLD_SIZE), or run alone."""
    rank = int(os.environ.get("RANK", 0))
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    world_size = int(os.environ.get("WORLD_SIZE", 1))
    if torch.cuda.is_available():
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)  # before init: NCCL binds each process to its own GPU
    else:
        device = torch.device("cpu")
    if world_size > 1 and not torch_dist.is_initialized():
        backend = "nccl" if device.type == "cuda" else "gloo"
        torch_dist.init_process_group(backend=backend, rank=rank, world_size=world_size)
    return Dist(rank=rank, local_rank=local_rank, world_size=world_size, device=device)


def is_main_process() -> bool:
    return not torch_dist.is_initialized() or torch_dist.get_rank() == 0


def wrap_model(model: nn.Module, dist: Dist) -> nn.Module:
    """DDP all-reduces (averages) the gradients during backward; a single process needs nothing."""
    if dist.world_size == 1:
        return model
    device_ids = [dist.local_rank] if dist.device.type == "cuda" else None
    return DDP(model, device_ids=device_ids)


def all_reduce_mean(tensor: torch.Tensor, dist: Dist) -> torch.Tensor:
    if dist.world_size > 1:
        tensor = tensor.clone()
        torch_dist.all_reduce(tensor, op=torch_dist.ReduceOp.SUM)
        tensor /= dist.world_size
    return tensor


def barrier(dist: Dist) -> None:
    """Wait for every process, e.g. while rank 0 prepares the dataset the others will read."""
    if dist.world_size > 1:
        torch_dist.barrier()


def shutdown(dist: Dist) -> None:
    if dist.world_size > 1 and torch_dist.is_initialized():
        torch_dist.destroy_process_group()
