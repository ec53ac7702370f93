"""Fixtures for `pytest parity`: O(1)-scaled random weights, tiny model shapes and a tiny dataset.

At GPT-2's init scale (std 0.02) activations are tiny and an approximation can hide under float32
noise (exact vs tanh GELU moves the logits by ~1e-5), so the parity tests use weights scaled so
every activation is O(1) and LayerNorm scales and biases are far from 1 and 0.
"""

from __future__ import annotations

import os

# The same settings as tests/conftest.py (whichever conftest is imported first decides for jax).
os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("HF_HUB_OFFLINE", "1")  # transformers loads only what the tests write
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

import numpy as np
import pytest

from babygpt.config import ModelConfig
from babygpt.data import shard_path, write_meta, write_shard

# Several shapes: n_head > 1, a padded vocabulary (100 -> 128), no padding, bias off.
SHAPES = {
    "heads4-pad": ModelConfig(n_layer=2, n_head=4, n_embd=32, block_size=16, vocab_size=100),
    "nobias": ModelConfig(
        n_layer=2, n_head=2, n_embd=32, block_size=16, vocab_size=64, bias=False, vocab_multiple=32
    ),
}


def o1_tensors(config: ModelConfig, seed: int) -> dict[str, np.ndarray]:
    """Random weights in the full layout (HF names, padded wte) with O(1) activations.

    Kernels ~ N(0, 1/fan_in) keep each layer's output O(1); LayerNorm scales ~ 1 +- 0.5 and
    biases ~ +-0.5 so a swapped or dropped LayerNorm parameter shows; the padded vocabulary rows
    are large, so a backend that forgot to mask them would pick them.
    """
    import torch

    from babygpt_torch.model import GPT
    from parity.convert import torch_tensors

    torch.manual_seed(seed)
    shapes = {k: v.shape for k, v in torch_tensors(GPT(config)).items()}
    rng = np.random.default_rng(seed)
    out = {}
    for name, shape in shapes.items():
        if name == "transformer.wte.weight":
            w = rng.normal(0.0, 0.5, shape)  # logits = x @ wte.T: std ~ 0.5 * sqrt(n_embd)
            w[config.vocab_size :] = 10.0
        elif name == "transformer.wpe.weight":
            w = rng.normal(0.0, 0.5, shape)
        elif name.endswith(".bias"):
            w = rng.normal(0.0, 0.5, shape)
        elif len(shape) == 1:  # LayerNorm scale
            w = 1.0 + rng.normal(0.0, 0.5, shape)
        else:  # (in, out) kernel
            w = rng.normal(0.0, shape[0] ** -0.5, shape)
        out[name] = w.astype(np.float32)
    return out


def random_batch(config: ModelConfig, B: int, T: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """(inputs, targets) token ids, both (B, T), in the tokenizer's (unpadded) vocabulary."""
    rng = np.random.default_rng(seed)
    tokens = rng.integers(0, config.vocab_size, (B, T + 1))
    return tokens[:, :-1].astype(np.int64), tokens[:, 1:].astype(np.int64)


@pytest.fixture(scope="module")
def tiny_dataset(tmp_path_factory):
    """A random-token dataset 'tiny' (vocab 100): two train shards and one val shard."""
    rng = np.random.default_rng(0)
    root = tmp_path_factory.mktemp("parity-data")
    d = root / "tiny"
    write_shard(shard_path(d, "train", 0), rng.integers(0, 100, 3000))
    write_shard(shard_path(d, "train", 1), rng.integers(0, 100, 2000))
    write_shard(shard_path(d, "val", 0), rng.integers(0, 100, 1000))
    write_meta(d, source="random", train_tokens=5000, val_tokens=1000)
    return root


@pytest.fixture(scope="session")
def trained_runs(tmp_path_factory):
    """Both backends' real `train.main`, 8 steps from the same O(1) weights on the same batches.

    JAX runs on the 8 virtual CPU devices (one micro-batch row each, 2 micro-steps), torch in one
    process (1 row, 16 micro-steps): the same 16 sequences per step either way, by design of
    `babygpt.data.micro_batch_rows`. Returns `parity.compare.run_both`'s result.
    """
    from babygpt.config import load_config
    from babygpt.hf import write_hf_dir
    from parity.compare import run_both
    from parity.convert import to_hf

    root = tmp_path_factory.mktemp("parity-runs")
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
            f"train.init_from={init}",
            "data.dataset=tiny",
            f"data.data_dir={root / 'data'}",
            f"run.out_dir={root / 'out'}",
            "run.name=parity",
        ],
    )
    return {"config": config, **run_both(config)}
