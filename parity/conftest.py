"""Fixtures for `pytest parity`: the tiny model shapes, and both backends' training runs.

The random weights (O(1)-scaled, see parity/weights.py) and the runs are float32 on CPU.
"""

from __future__ import annotations

import os
from pathlib import Path

# XLA_FLAGS (eight virtual CPU devices) and JAX_PLATFORMS: the root conftest.py, loaded first.
# float32 on CPU for torch too: on a GPU machine torch's train.main would otherwise pick CUDA
# (and bfloat16 autocast, TF32), while JAX stays on the CPU above.
os.environ.setdefault("CUDA_VISIBLE_DEVICES", "")
os.environ.setdefault("HF_HUB_OFFLINE", "1")  # transformers loads only what the tests write
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

import numpy as np
import pytest

from babygpt.config import ModelConfig
from babygpt.data import shard_path, write_meta, write_shard
from parity.weights import o1_tensors

# Several shapes: n_head > 1, a padded vocabulary (100 -> 128), no padding, bias off.
SHAPES = {
    "heads4-pad": ModelConfig(n_layer=2, n_head=4, n_embd=32, block_size=16, vocab_size=100),
    "nobias": ModelConfig(n_layer=2, n_head=2, n_embd=32, block_size=16, vocab_size=64, bias=False),
}


@pytest.fixture(scope="session")
def trained_runs(tmp_path_factory):
    """Both backends' real `train.main`, 8 steps from the same O(1) weights on the same batches.

    JAX runs on the 8 virtual CPU devices (one micro-batch row each, 2 micro-steps), torch in one
    process (1 row, 16 micro-steps): the same 16 sequences per step either way, by design of
    `babygpt.data.micro_batch_rows`. Returns `parity.compare.run_both`'s result.
    """
    return _train_both(tmp_path_factory.mktemp("parity-runs"), "float32")


@pytest.fixture(scope="session")
def trained_runs_float64(tmp_path_factory):
    """The same two runs with `train.dtype=float64`: every weight and every op in float64."""
    return _train_both(tmp_path_factory.mktemp("parity-runs-float64"), "float64")


def _train_both(root: Path, dtype: str) -> dict:
    from babygpt.config import load_config
    from babygpt.hf import write_hf_dir
    from parity.compare import run_both
    from parity.convert import to_hf

    rng = np.random.default_rng(0)
    data = root / "data" / "tiny"
    write_shard(shard_path(data, "train", 0), rng.integers(0, 100, 3000))
    write_shard(shard_path(data, "train", 1), rng.integers(0, 100, 2000))
    write_shard(shard_path(data, "val", 0), rng.integers(0, 100, 1000))
    write_meta(data, source="random", train_tokens=5000, val_tokens=1000)
    model = SHAPES["heads4-pad"]
    init = write_hf_dir(root / "init", model, to_hf(o1_tensors(model, seed=3), model))
    config = load_config(
        None,
        [
            f"model.n_layer={model.n_layer}",
            f"model.n_head={model.n_head}",
            f"model.n_embd={model.n_embd}",
            f"model.block_size={model.block_size}",
            f"model.vocab_size={model.vocab_size}",
            "train.max_steps=8",
            "train.micro_batch_size=1",
            f"train.total_batch_tokens={16 * model.block_size}",
            "train.warmup_steps=2",
            "train.max_lr=1e-2",
            "train.eval_interval=4",
            "train.eval_steps=2",
            "train.checkpoint_interval=8",
            "train.log_interval=1",
            "train.sample_tokens=0",
            f"train.dtype={dtype}",
            f"train.init_from={init}",
            "data.dataset=tiny",
            f"data.data_dir={root / 'data'}",
            f"run.out_dir={root / 'out'}",
            "run.name=parity",
        ],
    )
    return {"config": config, **run_both(config)}
