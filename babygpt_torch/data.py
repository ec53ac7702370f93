"""Batches for PyTorch: `DataLoaderLite`, a plain iterator over the shared sample order.

The mirror of `babygpt_jax/data.py`, which feeds the same windows through grain. Both cut their
batches from `babygpt.data.TokenWindows` with `micro_batch_rows`, so for the same seed and position
they yield the same tokens; this loader's whole state is the number of samples consumed.
"""

from __future__ import annotations

import torch

from babygpt.config import Config
from babygpt.data import TokenWindows, dataset_dir, micro_batch_rows
from babygpt.run import BatchPlan


class DataLoaderLite:
    """One rank's micro-batches: rows `rank*B .. rank*B+B-1` of each global micro-step."""

    def __init__(self, windows: TokenWindows, plan: BatchPlan, rank: int, device: torch.device):
        self.windows = windows
        self.plan = plan
        self.rank = rank
        self.device = torch.device(device)
        self.position = 0  # global micro-steps consumed

    def next_batch(self) -> tuple[torch.Tensor, torch.Tensor]:
        B = self.plan.micro_batch_size
        rows = micro_batch_rows(self.position, self.plan.rows_per_micro_step, self.rank * B, B)
        tokens = torch.from_numpy(self.windows.rows(rows.start, len(rows))).long()  # (B, T+1)
        self.position += 1
        x, y = tokens[:, :-1], tokens[:, 1:]  # targets are the inputs shifted by one
        if self.device.type == "cuda":  # pinned memory lets the copy overlap the previous step
            return (
                x.pin_memory().to(self.device, non_blocking=True),
                y.pin_memory().to(self.device, non_blocking=True),
            )
        return x.contiguous(), y.contiguous()

    def reset(self) -> None:
        self.position = 0

    def state_dict(self) -> dict:
        # In samples, not micro-steps: a micro-step's size depends on the number of processes, and
        # a run may resume on another number (FSDP2 on 8 GPUs, then one process).
        return {"samples": self.position * self.plan.rows_per_micro_step}

    def load_state_dict(self, state: dict) -> None:
        if "samples" in state:
            self.position = int(state["samples"]) // self.plan.rows_per_micro_step
        else:  # written when the state was micro-steps, which resumed on the same processes only
            self.position = int(state["position"])


def make_loaders(
    config: Config, plan: BatchPlan, rank: int, device: torch.device
) -> tuple[DataLoaderLite, DataLoaderLite]:
    """Train (seeded shuffle) and validation (file order; `evaluate` rewinds it each time)."""
    data_dir = dataset_dir(config)
    T, seed = config.model.block_size, config.train.seed
    train = TokenWindows.from_dir(data_dir, "train", T, seed)
    val = TokenWindows.from_dir(data_dir, "val", T, seed)
    return DataLoaderLite(train, plan, rank, device), DataLoaderLite(val, plan, rank, device)
