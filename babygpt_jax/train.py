"""Training in JAX: a pure `train_step(state, batch) -> (state, metrics)`, jitted once with shardings.

The mirror of `babygpt_torch/train.py`, where the step mutates the model's `.grad`s and the
optimizer in place. Here `nnx.split` turns the model into a static graph definition and a pytree
of parameters, and the whole train state (parameters, optimizer state, RNG key, step) is one
pytree that goes in and comes out new (its buffers donated, so the update happens in place on the
device after all). Gradient accumulation is a `lax.scan` over the micro-batches inside the step,
and the collectives data parallelism needs are inserted by `jax.jit` from the sharding
annotations. Everything around the step (the run directory, cadence, signals) is
`babygpt.harness`, shared with torch.
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
from babygpt.data import ensure_dataset
from babygpt.flops import peak_flops
from babygpt.run import generate_sample, plan_batch, pretrained_tensors
from babygpt_jax.checkpoint import (
    checkpoint_manager,
    export_hf,
    latest_step,
    restore_checkpoint,
    save_checkpoint,
)
from babygpt_jax.data import GrainLoader, make_loaders
from babygpt_jax.generate import generate
from babygpt_jax.model import GPT, load_hf_tensors
from babygpt_jax.optim import lr_schedule, make_optimizer
from babygpt_jax.parallel import (
    any_process,
    barrier,
    batch_sharding,
    is_main_process,
    make_global_batch,
    make_host_copy,
    make_mesh,
    param_shardings,
    put_global,
    replicated,
    setup_distributed,
    shutdown,
)


@struct.dataclass
class TrainState:
    """Everything a step changes, as one pytree: what is jitted, sharded, donated and checkpointed."""

    params: nnx.State
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
    """One optimizer step over the micro-batches of `batch` (x, y: (micro_steps, B, T)).

    Pure: the state in, a new state and the step's loss, grad_norm and lr out.

    Accumulation is a `lax.scan` over the micro-batches, not `optax.MultiSteps`: one compiled step
    is one optimizer update, the accumulator lives only inside the step (no extra optimizer
    state to shard and checkpoint), and the host calls one function per step whatever the
    accumulation. Every micro-batch has the same token count, so the mean of the micro-batch
    means is the mean over all tokens of the step, exactly as one big batch.
    """
    x, y = batch["x"], batch["y"]
    micro_steps = x.shape[0]
    lr = schedule(state.step)  # the rate this step's update uses
    rng = jax.random.fold_in(state.rng, state.step)
    grad_fn = jax.value_and_grad(loss_fn)

    def micro_step(grad_sum, micro):
        x_m, y_m, i = micro  # (B, T), (B, T), ()
        loss, grads = grad_fn(state.params, graphdef, rest, x_m, y_m, jax.random.fold_in(rng, i), dropout)
        return jax.tree.map(jnp.add, grad_sum, grads), loss

    zeros = jax.tree.map(jnp.zeros_like, state.params)
    grad_sum, losses = jax.lax.scan(micro_step, zeros, (x, y, jnp.arange(micro_steps)))
    grads = jax.tree.map(lambda g: g / micro_steps, grad_sum)
    grad_norm = optax.global_norm(grads)  # before clipping, as torch's clip_grad_norm_ reports it
    updates, opt_state = optimizer.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    state = state.replace(params=params, opt_state=opt_state, step=state.step + 1)
    return state, {"loss": jnp.mean(losses), "grad_norm": grad_norm, "lr": lr}


def make_train_step(graphdef, rest, optimizer, schedule, mesh: Mesh, state_sharding, dropout: bool = False):
    """`train_step` jitted once: shardings fixed in and out, the state's buffers donated."""
    step = functools.partial(
        train_step, graphdef=graphdef, rest=rest, optimizer=optimizer, schedule=schedule, dropout=dropout
    )
    batch = {"x": batch_sharding(mesh), "y": batch_sharding(mesh)}
    return jax.jit(
        step,
        in_shardings=(state_sharding, batch),
        out_shardings=(state_sharding, replicated(mesh)),
        donate_argnums=(0,),
    )


def eval_step(params, x, y, *, graphdef, rest):
    """The mean loss of one validation micro-batch, x, y: (1, B, T), dropout off."""
    model = nnx.merge(graphdef, params, rest, copy=True)
    model.eval()
    _, loss = model(x[0], y[0])
    return loss


def make_eval_step(graphdef: nnx.GraphDef, rest, mesh: Mesh, param_sharding):
    step = functools.partial(eval_step, graphdef=graphdef, rest=rest)
    return jax.jit(
        step,
        in_shardings=(param_sharding, batch_sharding(mesh), batch_sharding(mesh)),
        out_shardings=replicated(mesh),
    )


def evaluate(step_fn, params, val_loader: GrainLoader, steps: int, sharding: NamedSharding) -> float:
    """Mean loss over the first `steps` validation micro-batches (the same ones every time)."""
    val_loader.reset()
    total = jnp.zeros(())
    for _ in range(steps):
        x, y = val_loader.next_batch()
        total += step_fn(params, make_global_batch(x, sharding), make_global_batch(y, sharding))
    return float(total) / max(steps, 1)


def init_state(model: GPT, optimizer: optax.GradientTransformation, mesh: Mesh, fsdp: bool, seed: int):
    """The functional split of `model` and a fresh `TrainState`, placed on `mesh`.

    Returns graphdef (static structure), rest (the RNG streams), the state, and the state's
    shardings that `make_train_step` fixes.
    """
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)
    param_sharding = param_shardings(mesh, params, fsdp)
    opt_sharding = param_shardings(mesh, jax.eval_shape(optimizer.init, params), fsdp)
    sharding = TrainState(
        params=param_sharding, opt_state=opt_sharding, rng=replicated(mesh), step=replicated(mesh)
    )
    params = put_global(params, param_sharding)
    state = TrainState(
        params=params,
        opt_state=jax.jit(optimizer.init, out_shardings=opt_sharding)(params),
        rng=put_global(jax.random.PRNGKey(seed), replicated(mesh)),
        step=put_global(np.int32(0), replicated(mesh)),
    )
    rest = put_global(rest, jax.tree.map(lambda _: replicated(mesh), rest))
    return graphdef, rest, state, sharding


def main(config: Config) -> dict:
    """Train as `config` says, resuming if asked; return a summary of the run."""
    setup_distributed()
    try:
        summary = _train(config)
    except harness.Stopped:
        shutdown()  # every process stopped at the same step: as clean as a finished run
        raise
    # Only a finished or stopped run leaves through `shutdown`, whose barrier waits for every
    # process: after a failure the others may be blocked in a collective with this process.
    shutdown()
    return summary


def _train(config: Config) -> dict:
    t = config.train
    processes = harness.Processes(is_main_process(), any_process, barrier)
    with harness.RunDir(config, processes, latest_step) as run:
        resume_step = run.open()  # checks the run directory and locks it; writes nothing yet
        if processes.is_main:  # shakespeare prepares itself once, on process 0
            ensure_dataset(config)
        barrier("dataset")
        ensure_dataset(config)
        plan, mesh = plan_batch(config, jax.device_count()), make_mesh(config)
        dtype = jnp.dtype(compute_dtype_name(t.dtype, jax.default_backend())).type
        model = _build_model(config, dtype)
        optimizer = make_optimizer(t)
        graphdef, rest, state, sharding = init_state(model, optimizer, mesh, t.fsdp, t.seed)
        train_loader, val_loader = make_loaders(config, plan, jax.process_index(), jax.local_device_count())
        if resume_step is not None:
            restored = restore_checkpoint(run.path, state.params, state.opt_state, state.rng, config.model)
            step = put_global(np.int32(restored["step"]), replicated(mesh))
            state = TrainState(restored["params"], restored["opt_state"], restored["rng"], step)
            train_loader.load_state_dict(restored["loader"])
        run.begin(resume_step or 0)  # every check passed: only now is the run directory written
        step_fn = make_train_step(
            graphdef, rest, optimizer, lr_schedule(t), mesh, sharding, config.model.dropout > 0
        )
        eval_fn = make_eval_step(graphdef, rest, mesh, sharding.params)
        batches, host_copy = batch_sharding(mesh), make_host_copy(model, mesh)
        manager = checkpoint_manager(run.path, t.keep_checkpoints)
        all_finite = jax.jit(
            lambda p: jnp.all(jnp.stack([jnp.isfinite(x).all() for x in jax.tree.leaves(p)]))
        )

        def next_batch() -> dict:
            x, y = train_loader.next_batch()  # (micro_steps, rows of this process, T)
            return {"x": make_global_batch(x, batches), "y": make_global_batch(y, batches)}

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
            next_batch=next_batch,
            to_host=lambda metrics: {k: float(v) for k, v in jax.device_get(metrics).items()},
            finite=lambda state: bool(all_finite(state.params)),
            save=save,
            evaluate=lambda state: evaluate(eval_fn, state.params, val_loader, t.eval_steps, batches),
            sample=sample,
            peak_memory=lambda: device.memory_stats()["peak_bytes_in_use"] / 2**30 if gpu else None,
            description=f"{model.num_params():,} parameters | {jax.device_count()} x {device.platform}"
            f" ({jax.process_count()} process{'es' if jax.process_count() > 1 else ''})",
        )
        try:
            peak = peak_flops(device.device_kind) if gpu else None
            return harness.train(
                config, run, backend, state, resume_step or 0, plan, peak, jnp.dtype(dtype).name
            )
        finally:
            manager.wait_until_finished()  # the last save is asynchronous
            manager.close()


def _build_model(config: Config, dtype) -> GPT:
    """A fresh GPT-2 from `config.model`, or the weights of `train.init_from` in that shape."""
    model = GPT(config.model, rngs=nnx.Rngs(config.train.seed), dtype=dtype)
    model.remat = config.train.remat
    if (tensors := pretrained_tensors(config)) is not None:
        load_hf_tensors(model, tensors)
    return model
