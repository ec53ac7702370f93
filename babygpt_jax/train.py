"""Training in JAX: a pure `train_step(state, batch) -> (state, metrics)`, jitted once with shardings.

The mirror of `babygpt_torch/train.py`, where the step changes the model and optimizer in place.
Here the whole train state (parameters from `nnx.split`, optimizer state, RNG key, step) is one
pytree that goes in and comes out new (its buffers donated, so the update is in place on the device
after all). Accumulation is a `lax.scan` inside the step; `jax.jit` inserts the collectives from the
sharding annotations. Everything around the step is `babygpt.harness`, shared with torch.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx, struct
from jax.sharding import Mesh, NamedSharding

from babygpt import harness
from babygpt.config import Config, compute_dtype_name
from babygpt.data import eval_sequences, validation_batches
from babygpt.flops import peak_flops
from babygpt.run import generate_sample, pretrained_tensors
from babygpt_jax import parallel
from babygpt_jax.checkpoint import (
    checkpoint_manager,
    export_hf,
    latest_step,
    restore_checkpoint,
    save_checkpoint,
)
from babygpt_jax.data import GrainLoader, make_loaders
from babygpt_jax.generate import generate
from babygpt_jax.model import GPT, cross_entropy, load_hf_tensors
from babygpt_jax.optim import lr_schedule, make_optimizer


@struct.dataclass
class TrainState:
    """Everything a step changes, as one pytree: what is jitted, sharded, donated and checkpointed."""

    params: dict  # nnx.State as plain nested dicts (init_state says why)
    opt_state: optax.OptState
    rng: jax.Array  # the root of the dropout keys
    step: jax.Array  # optimizer steps taken, int32


def loss_fn(params, graphdef: nnx.GraphDef, rest, x, y, rng, dropout: bool):
    """The mean loss of one micro-batch x, y (B, T), as a pure function of the parameters."""
    model = nnx.merge(graphdef, params, rest, copy=True)  # fresh Variables, so reseed may update them
    if dropout:  # a fresh dropout mask per micro-step, derived from the step's key
        nnx.reseed(model, default=rng)
    _, loss = model(x, y)
    return loss


def train_step(state: TrainState, batch: dict, *, graphdef, rest, optimizer, schedule, dropout: bool):
    """One optimizer step over the micro-batches of `batch`, x and y.

    Pure: the state in; a new state and the step's loss, grad_norm and lr out.

    The gradient of the mean loss over the whole step, exactly as one big batch: every
    micro-batch has the same token count, so the mean of the micro-batch gradients is it.
    Accumulation is a `lax.scan`, not `optax.MultiSteps`: one compiled step is one optimizer
    update, and the accumulator lives only inside the step (no extra state to shard and save).
    """
    x, y = batch  # (micro_steps, B, T) each
    micro_steps = x.shape[0]
    lr = schedule(state.step)  # the rate this step's update uses
    rng = jax.random.fold_in(state.rng, state.step)  # this step's dropout keys
    grad_fn = jax.value_and_grad(loss_fn)  # the loss and its gradient, one pure function
    zeros = jax.tree.map(jnp.zeros_like, state.params)  # the gradient sum starts at zero

    def micro_step(grad_sum, i):  # each micro-batch's loss, and its gradient added to the sum
        key = jax.random.fold_in(rng, i)
        loss, grads = grad_fn(state.params, graphdef, rest, x[i], y[i], key, dropout)
        grad_sum = jax.tree.map(jnp.add, grad_sum, grads)
        return grad_sum, loss

    grad_sum, losses = jax.lax.scan(micro_step, zeros, jnp.arange(micro_steps))
    grads = jax.tree.map(lambda g: g / micro_steps, grad_sum)
    grad_norm = optax.global_norm(grads)  # before clipping, which is the optimizer's first stage
    updates, opt_state = optimizer.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    state = state.replace(params=params, opt_state=opt_state, step=state.step + 1)
    metrics = {"loss": jnp.mean(losses), "grad_norm": grad_norm, "lr": lr}
    return state, metrics


# XLA's autotuner may compile some of the step's matmuls as its own Triton kernels, fused with a
# neighbour, instead of cuBLAS calls; with cuBLAS for all of them the step was 1.4-1.9 ms faster
# (124M at B=32 on an H200, docs/benchmarks.md). A CPU ignores the option.
STEP_OPTIONS = {"xla_gpu_enable_triton_gemm": False}


def make_train_step(graphdef, rest, optimizer, schedule, mesh: Mesh, state_sharding, dropout: bool = False):
    """`train_step` jitted once: shardings fixed in and out, the state's buffers donated."""
    step = functools.partial(
        train_step, graphdef=graphdef, rest=rest, optimizer=optimizer, schedule=schedule, dropout=dropout
    )
    batch = (parallel.batch_sharding(mesh), parallel.batch_sharding(mesh))
    return jax.jit(
        step,
        in_shardings=(state_sharding, batch),
        out_shardings=(state_sharding, parallel.replicated(mesh)),
        donate_argnums=(0,),
        compiler_options=STEP_OPTIONS,
    )


def eval_step(params, x, y, weights, *, graphdef, rest):
    """Sum of weight x mean loss of each sequence of x, y (1, rows, T), weights (1, rows); no dropout."""
    model = nnx.merge(graphdef, params, rest, copy=True)
    model.eval()
    logits, _ = model(x[0])  # (rows, T, V)
    losses = jax.vmap(lambda row, targets: cross_entropy(row, targets, model.config.vocab_size))(logits, y[0])
    return jnp.sum(losses * weights[0])  # over every device's rows


def make_eval_step(graphdef: nnx.GraphDef, rest, mesh: Mesh, param_sharding):
    step = functools.partial(eval_step, graphdef=graphdef, rest=rest)
    batch = (parallel.batch_sharding(mesh),) * 3  # x, y, weights
    return jax.jit(step, in_shardings=(param_sharding, *batch), out_shardings=parallel.replicated(mesh))


def evaluate(step_fn, params, val_loader: GrainLoader, sequences: int, sharding: NamedSharding) -> float:
    """Mean loss over validation samples 0 .. sequences-1: the same sequences on any device count."""
    total = jnp.zeros(())
    rows = (val_loader.plan.rows_per_micro_step, val_loader.first_row, val_loader.count)
    for samples, weights in validation_batches(sequences, *rows):  # this process's rows; padding weighs 0
        x, y, w = parallel.make_global_batch((*val_loader.read(samples), weights[None]), sharding)
        total += step_fn(params, x, y, w)  # weight x each sequence's mean loss, summed over all rows
    return float(total) / sequences


def init_state(model: GPT, optimizer: optax.GradientTransformation, mesh: Mesh, fsdp: bool, seed: int):
    """The functional split of `model` and a fresh `TrainState`, placed on `mesh`.

    Returns graphdef (static structure), rest (the RNG streams), the state, and the state's
    shardings that `make_train_step` fixes. The optimizer state is laid out like the parameters
    (replicated, or split under FSDP): sharding the parameters alone would save little memory, as
    AdamW's two moments are twice their size.
    """
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)
    # Plain dicts, which jit flattens in C++, where nnx.State is flattened by Python callbacks: with
    # the optimizer's two moments shaped alike, 1.7-2.6 ms a step of host time (an H200's host)
    # before the GPU could start (docs/performance.md).
    params = nnx.to_pure_dict(params)
    params, param_sharding = parallel.shard_model(params, mesh, fsdp)
    opt_sharding = parallel.param_shardings(mesh, jax.eval_shape(optimizer.init, params), fsdp)
    replicated = parallel.replicated(mesh)
    sharding = TrainState(param_sharding, opt_sharding, rng=replicated, step=replicated)
    opt_state = jax.jit(optimizer.init, out_shardings=opt_sharding)(params)
    rng, step = parallel.put_global((jax.random.PRNGKey(seed), np.int32(0)), (replicated, replicated))
    rest = parallel.put_global(rest, jax.tree.map(lambda _: replicated, rest))
    return graphdef, rest, TrainState(params, opt_state, rng, step), sharding


def main(config: Config) -> dict:
    """Train as `config` says, resuming if asked; return a summary of the run."""
    parallel.setup_distributed()
    return harness.run(config, _train, parallel.shutdown)


def _train(config: Config) -> dict:
    t = config.train
    processes = harness.Processes(jax.process_index(), parallel.any_process, parallel.barrier)
    dtype = jnp.dtype(compute_dtype_name(t.dtype, jax.default_backend())).type
    # JAX makes float64 arrays only under x64 (train.dtype=float64, for parity checks), and only here.
    with jax.enable_x64(dtype == jnp.float64), harness.RunDir(config, processes, latest_step) as run:
        resume_step = run.open()  # checks the run directory and locks it; writes nothing yet
        plan = harness.plan_run(config, processes, jax.device_count(), parallel.device_memory())
        mesh = parallel.make_mesh(config)
        model = _build_model(config, dtype)
        optimizer = make_optimizer(t)
        graphdef, rest, state, sharding = init_state(model, optimizer, mesh, t.fsdp, t.seed)
        train_loader, val_loader = make_loaders(config, plan, jax.process_index(), jax.local_device_count())
        val_sequences = eval_sequences(config, len(val_loader.source))  # 0: evaluation off
        if resume_step is not None:
            restored = restore_checkpoint(run.path, state.params, state.opt_state, state.rng, config.model)
            step = parallel.put_global(np.int32(restored["step"]), parallel.replicated(mesh))
            state = TrainState(restored["params"], restored["opt_state"], restored["rng"], step)
            train_loader.load_state_dict(restored["loader"])
        run.begin(resume_step or 0)  # every check passed: only now is the run directory written
        dropout = config.model.dropout > 0
        step_fn = make_train_step(graphdef, rest, optimizer, lr_schedule(t), mesh, sharding, dropout)
        eval_fn = make_eval_step(graphdef, rest, mesh, sharding.params)
        batches, host_copy = parallel.batch_sharding(mesh), parallel.make_host_copy(model, mesh)
        manager = checkpoint_manager(run.path, t.keep_checkpoints)

        def save(state: TrainState, step: int) -> None:
            loader_state = train_loader.state_dict()
            save_checkpoint(
                manager, step, state.params, state.opt_state, loader_state, state.rng, config.model
            )
            if (whole := host_copy(state.params)) is not None:  # process 0 exports
                export_hf(run.path, whole)

        def sample(state: TrainState) -> str | None:
            whole = host_copy(state.params)
            return generate_sample(generate, whole, config) if whole is not None else None

        device = jax.devices()[0]
        gpu = device.platform == "gpu"
        backend = harness.Backend(
            name="jax",
            step=step_fn,
            next_batch=lambda: parallel.make_global_batch(train_loader.next_batch(), batches),
            to_host=lambda metrics: {k: float(v) for k, v in jax.device_get(metrics).items()},
            finite=lambda state: parallel.all_finite(state.params),
            save=save,
            evaluate=lambda state: evaluate(eval_fn, state.params, val_loader, val_sequences, batches),
            sample=sample,
            peak_memory=lambda: parallel.peak_memory_gib(device),
            description=f"{model.num_params():,} parameters | {jax.device_count()} x {device.platform}"
            f" ({jax.process_count()} process{'es' if jax.process_count() > 1 else ''})",
        )
        peak = peak_flops(device.device_kind) if gpu else None
        with manager:  # closing waits for the last save, which is asynchronous
            return harness.train(config, run, backend, state, resume_step or 0, plan, peak, dtype.__name__)


def _build_model(config: Config, dtype) -> GPT:
    """A fresh GPT-2 from `config.model`, or the weights of `train.init_from` in that shape."""
    model = GPT(config.model, rngs=nnx.Rngs(config.train.seed), dtype=dtype, remat=config.train.remat)
    if (tensors := pretrained_tensors(config)) is not None:
        load_hf_tensors(model, tensors)
    return model
