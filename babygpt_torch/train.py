"""Training in PyTorch: `train_step(state, batch) -> (state, metrics)` around autograd and `torch.optim`.

The mirror of `babygpt_jax/train.py`, where `train_step` is a pure jitted function of one train
state pytree. Here the state is the model, its optimizer and its scheduler, objects the step
changes in place: it mutates the model's `.grad`s, then the optimizer's buffers. Gradient
accumulation is a Python loop of `backward()` calls, and DDP (or FSDP2) reduces the gradients
across processes on the last micro-step only (`no_sync` before it). Everything around the step
(the run directory, cadence, signals) is `babygpt.harness`, shared with JAX.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from babygpt import harness
from babygpt.config import Config, compute_dtype_name
from babygpt.data import eval_sequences, validation_batches
from babygpt.flops import peak_flops
from babygpt.run import generate_sample, pretrained_tensors
from babygpt_torch import parallel
from babygpt_torch.checkpoint import export_hf, latest_step, restore_checkpoint, save_checkpoint
from babygpt_torch.data import DataLoaderLite, make_loaders
from babygpt_torch.generate import generate
from babygpt_torch.model import GPT, load_hf_tensors
from babygpt_torch.optim import make_optimizer


@dataclass
class TrainState:
    """Everything a step changes: objects that hold their own tensors and update them in place."""

    model: nn.Module  # as the step calls it: compiled, DDP-wrapped or FSDP2-sharded
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler
    # No key and no step: torch's RNG is global state, and the scheduler counts the steps.


def loss_fn(model: nn.Module, x: torch.Tensor, y: torch.Tensor, autocast_dtype: torch.dtype):
    """The mean loss of one micro-batch x, y (B, T), a graph that `backward()` differentiates."""
    with _autocast(x.device, autocast_dtype):
        _, loss = model(x, y)
    return loss


def train_step(state: TrainState, batch: dict, *, autocast_dtype: torch.dtype, grad_clip: float):
    """One optimizer step over the micro-batches of `batch`, x and y.

    In place: the model's weights and the optimizer move on; the step's loss, grad_norm and lr out.

    The gradient of the mean loss over the whole step, exactly as one big batch: each
    micro-loss is divided by the number of micro-steps, so the summed gradients are it.
    Accumulation is a loop of `backward()` calls into the `.grad`s; DDP and FSDP2 reduce them
    during backward, and only the last micro-step's backward needs to (`parallel.no_sync` before it).
    """
    x, y = batch  # (micro_steps, B, T) each
    micro_steps = x.shape[0]
    lr = state.optimizer.param_groups[0]["lr"]  # the rate this step's update uses
    state.model.train()  # dropout on
    state.optimizer.zero_grad(set_to_none=True)  # the .grads the backward passes add into
    loss_sum = torch.zeros((), device=x.device, dtype=torch.float64)  # for the log: float64 keeps every digit

    for i in range(micro_steps):  # each micro-batch's loss, and its gradient added to the .grads
        with parallel.no_sync(state.model, sync=i == micro_steps - 1):
            loss = loss_fn(state.model, x[i], y[i], autocast_dtype) / micro_steps
            loss.backward()
        loss_sum += loss.detach()

    loss = parallel.all_reduce_mean(loss_sum)  # the mean over processes, for the log
    grad_norm = parallel.clip_grad_norm(state.model, grad_clip)  # before clipping, as optax.global_norm
    state.optimizer.step()  # the update, in place
    state.scheduler.step()  # the next step's rate
    metrics = {"loss": loss, "grad_norm": grad_norm, "lr": lr}
    return state, metrics


@torch.no_grad()
def evaluate(model: nn.Module, val_loader: DataLoaderLite, sequences: int, autocast_dtype, dist) -> float:
    """Mean loss over validation samples 0 .. sequences-1: the same sequences on any process count."""
    model.eval()
    total = torch.zeros((), device=dist.device, dtype=torch.float64)
    rows = (val_loader.plan.rows_per_micro_step, val_loader.first_row, val_loader.count)
    for samples, weights in validation_batches(sequences, *rows):  # this process's rows; padding weighs 0
        x, y, w = parallel.make_global_batch((*val_loader.read(samples), torch.tensor(weights[None])), dist)
        with _autocast(dist.device, autocast_dtype):
            logits, _ = model(x[0])  # (rows, T, V)
        logits = logits.to(torch.promote_types(logits.dtype, torch.float32))  # float64 stays
        losses = F.cross_entropy(logits.transpose(1, 2), y[0], reduction="none")  # (rows, T)
        total += (losses.mean(1) * w[0]).sum()  # weight x each sequence's mean loss, summed over rows
    model.train()
    return (parallel.all_reduce_mean(total) * dist.world_size).item() / sequences  # summed over processes


def init_state(model: GPT, config: Config, dist: parallel.Dist) -> TrainState:
    """The model placed on this process's device (sharded under FSDP2), its optimizer and scheduler.

    bfloat16 under FSDP2 comes from the same autocast as under DDP, not from a
    MixedPrecisionPolicy: casting the parameters themselves would also put the embeddings, the
    residual stream and LayerNorm's weights in bfloat16, a different computation from DDP's and
    JAX's. The price is all-gathering float32 weights, twice the bytes.
    """
    t = config.train
    model.to(dist.device)
    if t.fsdp:  # before the optimizer, which must hold the sharded parameters
        parallel.shard_model(model, dist)
    optimizer, scheduler = make_optimizer(model, t, dist.device.type)
    step_model = torch.compile(model) if t.compile else model
    return TrainState(step_model if t.fsdp else parallel.wrap_model(step_model, dist), optimizer, scheduler)


def main(config: Config) -> dict:
    """Train as `config` says, resuming if asked; return a summary of the run."""
    dist = parallel.setup_distributed(config.train.fsdp)
    return harness.run(config, functools.partial(_train, dist=dist), parallel.shutdown)


def _train(config: Config, dist: parallel.Dist) -> dict:
    t = config.train
    processes = harness.Processes(dist.rank, parallel.any_process, parallel.barrier)
    with harness.RunDir(config, processes, latest_step) as run:
        resume_step = run.open()  # checks the run directory and locks it; writes nothing yet
        plan = harness.plan_run(config, processes, dist.world_size, parallel.device_memory(), not t.compile)
        autocast_dtype = getattr(torch, compute_dtype_name(t.dtype, dist.device.type))
        torch.manual_seed(t.seed)  # every rank builds the same initial model
        model = _build_model(config)
        host_copy = parallel.make_host_copy(model, dist, t.fsdp)  # before FSDP2 shards it
        state = init_state(model, config, dist)
        train_loader, val_loader = make_loaders(config, plan, dist.rank)
        val_sequences = eval_sequences(config, len(val_loader.windows))  # 0: evaluation off
        if resume_step is not None:
            restored = restore_checkpoint(run.path, model, state.optimizer, state.scheduler)
            _set_rng_state(restored["rng"])
            train_loader.load_state_dict(restored["loader"])
        run.begin(resume_step or 0)  # every check passed: only now is the run directory written
        step_fn = functools.partial(train_step, autocast_dtype=autocast_dtype, grad_clip=t.grad_clip)

        def save(state: TrainState, step: int) -> None:
            loader_state = train_loader.state_dict()
            save_checkpoint(
                run.path,
                step,
                model,
                state.optimizer,
                state.scheduler,
                loader_state,
                _rng_state(),
                keep=t.keep_checkpoints,
            )
            if (whole := host_copy()) is not None:  # rank 0 exports
                export_hf(run.path, whole)

        def sample(state: TrainState) -> str | None:
            whole = host_copy()
            return generate_sample(generate, whole, config) if whole is not None else None

        cuda = dist.device.type == "cuda"
        backend = harness.Backend(
            name="torch",
            step=step_fn,
            next_batch=lambda: parallel.make_global_batch(train_loader.next_batch(), dist),
            to_host=lambda metrics: {k: float(v) for k, v in metrics.items()},
            finite=lambda state: parallel.all_finite(model),
            save=save,
            evaluate=lambda state: evaluate(state.model, val_loader, val_sequences, autocast_dtype, dist),
            sample=sample,
            peak_memory=lambda: parallel.peak_memory_gib(dist.device),
            description=f"{model.num_params():,} parameters | {dist.world_size} x {dist.device.type}",
        )
        peak = peak_flops(torch.cuda.get_device_name(dist.device)) if cuda else None
        return harness.train(
            config, run, backend, state, resume_step or 0, plan, peak, str(autocast_dtype)[6:]
        )


def _build_model(config: Config) -> GPT:
    """A fresh GPT-2 from `config.model`, or the weights of `train.init_from` in that shape."""
    model = GPT(config.model, remat=config.train.remat)
    if (tensors := pretrained_tensors(config)) is not None:
        load_hf_tensors(model, tensors)
    if config.train.dtype == "float64":  # every weight and every op (for parity checks on a CPU)
        model = model.to(torch.float64)
    return model


def _autocast(device: torch.device, dtype: torch.dtype):
    """bfloat16 matmuls under autocast; float32 and float64 need no autocast at all."""
    return torch.autocast(device.type, dtype=dtype, enabled=dtype == torch.bfloat16)


def _rng_state() -> dict:
    state = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
