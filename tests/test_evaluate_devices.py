"""Validation that means the same on any hardware: both backends' `evaluate`, for the same weights,
report the plain mean loss over the same validation sequences: on 1 and 8 JAX devices, on 2 torch
gloo ranks, and as 1 and 8 torch ranks' shares; whatever the micro-batch size and the padding it needs."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import jax
import numpy as np
import pytest
import torch
import torch.distributed as torch_dist
import torch.multiprocessing as mp
from flax import nnx
from jax.sharding import Mesh

from babygpt.config import Config
from babygpt.data import TokenWindows, dataset_dir, eval_sequences
from babygpt.run import plan_batch
from babygpt_jax.data import make_loaders as jax_loaders
from babygpt_jax.model import GPT as JaxGPT
from babygpt_jax.optim import make_optimizer
from babygpt_jax.parallel import MESH_AXES, batch_sharding
from babygpt_jax.train import evaluate as jax_evaluate
from babygpt_jax.train import init_state, make_eval_step
from babygpt_torch.data import make_loaders as torch_loaders
from babygpt_torch.model import GPT as TorchGPT
from babygpt_torch.parallel import Dist
from babygpt_torch.train import evaluate as torch_evaluate

SEQUENCES = 13  # a prime: every split below pads its last micro-step


def _config(tiny_config: Config, micro_batch_size: int, **train) -> Config:
    """The tiny run evaluating SEQUENCES windows of 16 tokens (train.eval_tokens), however split."""
    train = dataclasses.replace(
        tiny_config.train, micro_batch_size=micro_batch_size, eval_tokens=SEQUENCES * 16, **train
    )
    return dataclasses.replace(tiny_config, train=train)


def _val_tokens(config: Config) -> np.ndarray:
    """The first SEQUENCES validation windows, (SEQUENCES, T+1): what every split must average."""
    return TokenWindows.from_dir(dataset_dir(config), "val", 16, config.train.seed).rows(0, SEQUENCES)


@pytest.mark.parametrize(
    "devices, micro_batch_size, fsdp",
    [(1, 4, False), (8, 1, False), (8, 2, True)],  # 16 rows, 3 padded; 8 x 2 rows, 3 padded, sharded weights
)
def test_jax_val_loss_is_the_mean_over_the_same_sequences_on_1_and_8_devices(
    tiny_config, devices, micro_batch_size, fsdp
):
    assert jax.device_count() == 8  # the root conftest.py's XLA_FLAGS
    config = _config(tiny_config, micro_batch_size, fsdp=fsdp)
    tokens = _val_tokens(config)
    _, expected = JaxGPT(config.model, rngs=nnx.Rngs(0))(tokens[:, :-1], tokens[:, 1:])  # one batch
    grid = (1, devices) if fsdp else (devices, 1)
    mesh = Mesh(np.asarray(jax.devices()[:devices]).reshape(grid), MESH_AXES)
    graphdef, rest, state, sharding = init_state(
        JaxGPT(config.model, rngs=nnx.Rngs(0)), make_optimizer(config.train), mesh, fsdp, 0
    )
    _, val = jax_loaders(config, plan_batch(config, devices), 0, devices)
    assert eval_sequences(config, len(val.source)) == SEQUENCES
    eval_fn = make_eval_step(graphdef, rest, mesh, sharding.params)
    got = jax_evaluate(eval_fn, state.params, val, SEQUENCES, batch_sharding(mesh))
    assert got == pytest.approx(float(expected), rel=1e-5)


def _torch_rank(rank: int, world_size: int, config: Config, store: str, out: Path) -> None:
    """One gloo rank: the same weights on every rank (seed 0), its rows, the all-reduced val loss."""
    torch_dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=world_size)
    try:
        torch.set_num_threads(1)  # eight ranks share the machine's cores
        torch.manual_seed(0)
        model = TorchGPT(config.model)
        _, val = torch_loaders(config, plan_batch(config, world_size), rank)
        dist = Dist(rank=rank, local_rank=rank, world_size=world_size, device=torch.device("cpu"))
        (out / f"{rank}.txt").write_text(repr(torch_evaluate(model, val, SEQUENCES, torch.float32, dist)))
    finally:
        torch_dist.destroy_process_group()


def test_torch_val_loss_is_the_mean_over_the_same_sequences_on_1_2_and_8_ranks(tiny_config, tmp_path):
    torch.manual_seed(0)
    model = TorchGPT(tiny_config.model)
    tokens = torch.from_numpy(_val_tokens(tiny_config)).long()
    with torch.no_grad():
        expected = model(tokens[:, :-1], tokens[:, 1:].contiguous())[1].item()  # one batch
    # Two real gloo ranks, 3 micro-steps of 2 x 3 rows (5 padded): each reports the all-reduced loss.
    config, out = _config(tiny_config, 3), tmp_path / "ranks"
    out.mkdir()
    mp.spawn(_torch_rank, args=(2, config, str(tmp_path / "store"), out), nprocs=2, join=True)
    got = {2: [float((out / f"{rank}.txt").read_text()) for rank in range(2)]}
    # One rank (16 rows, 3 padded), and eight ranks' shares (2 x 8 rows, 3 padded) added up here
    # as the all-reduce adds them: each share is its rows' weighted sum / SEQUENCES.
    alone = Dist(rank=0, local_rank=0, world_size=1, device=torch.device("cpu"))  # no all-reduce
    for ranks, micro_batch_size in [(1, 4), (8, 1)]:
        config = _config(tiny_config, micro_batch_size)
        loaders = [torch_loaders(config, plan_batch(config, ranks), rank)[1] for rank in range(ranks)]
        got[ranks] = [sum(torch_evaluate(model, val, SEQUENCES, torch.float32, alone) for val in loaders)]
    for ranks, losses in got.items():
        assert losses == pytest.approx([expected] * len(losses), rel=1e-5), ranks
