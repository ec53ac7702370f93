"""Shared fixtures: tiny configs and a tiny prepared dataset, so every test runs in seconds on CPU."""

from __future__ import annotations

import os

# XLA_FLAGS (eight virtual CPU devices) and JAX_PLATFORMS: the root conftest.py, loaded first.
import torch

# Without a GPU the fused decode kernels run in Triton's interpreter (tests/test_kernels.py);
# triton reads this when first imported, which torch.compile does, so it is set before any test.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import numpy as np
import pytest

from babygpt.config import Config, ModelConfig, load_config
from babygpt.data import shard_path, write_meta, write_shard


@pytest.fixture
def tiny_model_config() -> ModelConfig:
    return ModelConfig(n_layer=2, n_head=2, n_embd=32, block_size=16, vocab_size=100, vocab_multiple=64)


@pytest.fixture
def tiny_dataset(tmp_path):
    """A random-token dataset 'tiny' under tmp_path/data with two train shards and one val shard."""
    rng = np.random.default_rng(0)
    root = tmp_path / "data"
    d = root / "tiny"
    write_shard(shard_path(d, "train", 0), rng.integers(0, 100, 3000))
    write_shard(shard_path(d, "train", 1), rng.integers(0, 100, 2000))
    write_shard(shard_path(d, "val", 0), rng.integers(0, 100, 1000))
    write_meta(d, source="random", train_tokens=5000, val_tokens=1000)
    return root


# The tiny run every training test starts from: 2 layers, a 16-token context, a few steps; tests add
# their own `section.key=value` overrides after it (later ones win).
TINY_OVERRIDES = (
    "model.n_layer=2",
    "model.n_head=2",
    "model.n_embd=32",
    "model.block_size=16",
    "model.vocab_size=100",
    "train.max_steps=6",
    "train.micro_batch_size=4",
    "train.warmup_steps=2",
    "train.max_lr=1e-2",
    "train.eval_interval=3",
    "train.eval_steps=2",
    "train.checkpoint_interval=3",
    "train.log_interval=1",
    "train.sample_tokens=0",
    "data.dataset=tiny",
    "run.name=tiny",
)


@pytest.fixture(scope="session")
def tiny_overrides() -> list[str]:
    """The tiny run's overrides, without its data and output directories."""
    return list(TINY_OVERRIDES)


@pytest.fixture
def tiny_config(tmp_path, tiny_dataset) -> Config:
    """A complete run config on the tiny dataset: 2 layers, 16-token context, a few steps."""
    return load_config(
        None, [*TINY_OVERRIDES, f"data.data_dir={tiny_dataset}", f"run.out_dir={tmp_path / 'out'}"]
    )
