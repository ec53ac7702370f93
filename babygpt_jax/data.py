"""Batches for JAX: a grain pipeline over the shared sample order, one optimizer step at a time.

The mirror of `babygpt_torch/data.py` (`DataLoaderLite`). Both cut their batches from
`babygpt.data.TokenWindows` with `micro_batch_rows`, so for the same seed and position they yield
the same tokens; the loader's whole state is the number of samples consumed. Where torch hands out
one micro-batch per rank, this loader hands one process every micro-batch of a step at once,
(accumulation_steps, rows, T), because the jitted step scans over them on the devices.
"""

from __future__ import annotations

import grain
import numpy as np

from babygpt.config import Config
from babygpt.data import TokenWindows, dataset_dir, micro_batch_rows
from babygpt.run import BatchPlan

_ENDLESS = 2**62  # micro-steps: the stream never ends, epochs are TokenWindows' business


class TokenWindowsSource:
    """A grain `RandomAccessDataSource`: record k is sample k of the shared order, (T+1,) tokens.

    Indices past `len` are later epochs (TokenWindows reshuffles each), so the pipeline below reads
    the source directly rather than through `MapDataset.source`, which would wrap them modulo len.
    """

    def __init__(self, windows: TokenWindows):
        self.windows = windows

    def __len__(self) -> int:
        return len(self.windows)

    def __getitem__(self, k: int) -> np.ndarray:
        return self.windows.window(k)

    def __repr__(self) -> str:  # grain keys checkpoints and logs on it
        w = self.windows
        return f"TokenWindowsSource(windows={w.total}, seq_len={w.seq_len}, seed={w.seed})"


class GrainLoader:
    """One process's share of each optimizer step: rows `first_row .. first_row+count-1` of every
    global micro-step, `micro_steps` micro-steps per batch.

    A grain `MapDataset` maps each global micro-step position to this process's rows and batches
    them; the iterator reads ahead in background threads while the devices compute.
    """

    def __init__(self, windows: TokenWindows, plan: BatchPlan, first_row: int, count: int, micro_steps: int):
        self.source = TokenWindowsSource(windows)
        self.plan = plan
        self.first_row = first_row
        self.count = count
        self.micro_steps = micro_steps
        self.position = 0  # global micro-steps consumed
        self._iterator = None

    def _micro_batch(self, position: int) -> np.ndarray:
        rows = micro_batch_rows(position, self.plan.rows_per_micro_step, self.first_row, self.count)
        return np.stack([self.source[k] for k in rows])  # (count, T+1)

    def _split(self, tokens: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        return tokens[..., :-1], tokens[..., 1:]  # targets are the inputs shifted by one

    def _start(self):
        dataset = (
            grain.MapDataset.range(self.position, _ENDLESS)
            .map(self._micro_batch)
            .batch(self.micro_steps)  # (micro_steps, count, T+1)
            .map(self._split)
        )
        return iter(dataset.to_iter_dataset(grain.ReadOptions(num_threads=2, prefetch_buffer_size=4)))

    def next_batch(self) -> tuple[np.ndarray, np.ndarray]:
        """x, y int32 of shape (micro_steps, count, T)."""
        if self._iterator is None:
            self._iterator = self._start()
        x, y = next(self._iterator)
        self.position += self.micro_steps
        return x, y

    def read(self, samples) -> tuple[np.ndarray, np.ndarray]:
        """The given samples of the order as one micro-step: x, y int32 of shape (1, len(samples), T)."""
        return self._split(self.source.windows.take(samples)[None])  # from (1, rows, T+1)

    def state_dict(self) -> dict:
        # In samples, not micro-steps: a micro-step's size depends on the number of devices, and a
        # run may resume on another number (two processes of four GPUs, then one GPU).
        return {"samples": self.position * self.plan.rows_per_micro_step}

    def load_state_dict(self, state: dict) -> None:
        if "samples" in state:
            self.position = int(state["samples"]) // self.plan.rows_per_micro_step
        else:  # written when the state was micro-steps, which resumed on the same devices only
            self.position = int(state["position"])
        self._iterator = None  # the next batch restarts the pipeline at the new position


def make_loaders(
    config: Config, plan: BatchPlan, process_index: int, local_devices: int
) -> tuple[GrainLoader, GrainLoader]:
    """Train (seeded shuffle, whole steps) and validation (file order; `evaluate` reads the samples
    `validation_batches` names). Process p reads rows p*L*B .. (p+1)*L*B-1 of each micro-step."""
    data_dir = dataset_dir(config)
    T, seed = config.model.block_size, config.train.seed
    train = TokenWindows.from_dir(data_dir, "train", T, seed, config.data.order)
    val = TokenWindows.from_dir(data_dir, "val", T, seed)
    count = local_devices * plan.micro_batch_size
    first_row = process_index * count
    return (
        GrainLoader(train, plan, first_row, count, plan.accumulation_steps),
        GrainLoader(val, plan, first_row, count, 1),
    )
