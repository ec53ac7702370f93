"""Batches for PyTorch: `DataLoaderLite`, a plain iterator over the shared sample order.

The mirror of `babygpt_jax/data.py`, which feeds the same windows through grain. Both cut their
batches from `babygpt.data.TokenWindows` with `micro_batch_rows`, so for the same seed and position
they yield the same tokens; this loader's whole state is the number of samples consumed. Both
hand out one optimizer step at a time, (accumulation_steps, rows, T): the step loops over its
micro-batches where JAX's scans over them.
"""

from __future__ import annotations

import numpy as np
import torch

from babygpt.config import Config
from babygpt.data import TokenWindows, dataset_dir, micro_batch_rows
from babygpt.run import BatchPlan


class DataLoaderLite:
    """One rank's share of each optimizer step: rows `first_row .. first_row+count-1` of every
    global micro-step, `micro_steps` micro-steps per batch, as CPU tensors (the step moves them)."""

    def __init__(self, windows: TokenWindows, plan: BatchPlan, first_row: int, count: int, micro_steps: int):
        self.windows = windows
        self.plan = plan
        self.first_row = first_row
        self.count = count
        self.micro_steps = micro_steps
        self.position = 0  # global micro-steps consumed

    def _split(self, tokens: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
        tokens = torch.from_numpy(tokens).long()
        x, y = tokens[..., :-1], tokens[..., 1:]  # targets are the inputs shifted by one
        return x.contiguous(), y.contiguous()

    def next_batch(self) -> tuple[torch.Tensor, torch.Tensor]:
        """x, y int64 of shape (micro_steps, count, T)."""
        micro_batches = []
        for position in range(self.position, self.position + self.micro_steps):
            rows = micro_batch_rows(position, self.plan.rows_per_micro_step, self.first_row, self.count)
            micro_batches.append(self.windows.rows(rows.start, len(rows)))  # (count, T+1)
        self.position += self.micro_steps
        return self._split(np.stack(micro_batches))  # from (micro_steps, count, T+1)

    def read(self, samples) -> tuple[torch.Tensor, torch.Tensor]:
        """The given samples of the order as one micro-step: x, y int64 of shape (1, len(samples), T)."""
        return self._split(self.windows.take(samples)[None])  # from (1, rows, T+1)

    def state_dict(self) -> dict:
        # In samples, not micro-steps: a micro-step's size depends on the number of processes, and
        # a run may resume on another number (FSDP2 on 8 GPUs, then one process).
        return {"samples": self.position * self.plan.rows_per_micro_step}

    def load_state_dict(self, state: dict) -> None:
        if "samples" in state:
            self.position = int(state["samples"]) // self.plan.rows_per_micro_step
        else:  # written when the state was micro-steps, which resumed on the same processes only
            self.position = int(state["position"])


def make_loaders(config: Config, plan: BatchPlan, rank: int) -> tuple[DataLoaderLite, DataLoaderLite]:
    """Train (seeded shuffle, whole steps) and validation (file order; `evaluate` reads the samples
    `validation_batches` names). Rank r reads rows r*B .. (r+1)*B-1 of each micro-step."""
    data_dir = dataset_dir(config)
    T, seed = config.model.block_size, config.train.seed
    train = TokenWindows.from_dir(data_dir, "train", T, seed, config.data.order)
    val = TokenWindows.from_dir(data_dir, "val", T, seed)
    count = plan.micro_batch_size
    first_row = rank * count
    return (
        DataLoaderLite(train, plan, first_row, count, plan.accumulation_steps),
        DataLoaderLite(val, plan, first_row, count, 1),
    )
