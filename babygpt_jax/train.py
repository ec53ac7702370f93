"""Training in JAX: a pure `train_step(params, opt_state, batch)`, jitted once with shardings.

The mirror of `babygpt_torch/train.py`, where the step mutates `.grad`s and the optimizer in
place. Here `nnx.split` turns the model into a static graph definition and a pytree of parameters;
the step takes parameters and optimizer state in and returns new ones (their buffers donated, so
the update happens in place on the device after all). Gradient accumulation is a `lax.scan` over
the micro-batches inside the step, and the collectives data parallelism needs are inserted by
`jax.jit` from the sharding annotations. The host loop only feeds batches, logs and checkpoints.
"""

from __future__ import annotations

import functools
import logging

import jax
import jax.numpy as jnp
import optax
from flax import nnx
from jax.sharding import Mesh, NamedSharding

from babygpt.config import BabyGPTError, Config
from babygpt.data import ensure_dataset
from babygpt.flops import peak_flops
from babygpt.hf import read_hf_dir, shape_mismatches
from babygpt.run import MetricsLog, Throughput, check_finite, plan_batch, prepare_run_dir
from babygpt.tokenizer import encode_prompt, get_tokenizer
from babygpt_jax.checkpoint import (
    checkpoint_manager,
    export_hf,
    latest_step,
    restore_checkpoint,
    save_checkpoint,
)
from babygpt_jax.data import GrainLoader, make_loaders
from babygpt_jax.model import GPT, load_hf_tensors
from babygpt_jax.optim import lr_schedule, make_optimizer
from babygpt_jax.parallel import (
    barrier,
    batch_sharding,
    is_main_process,
    make_global_batch,
    make_mesh,
    param_shardings,
    put_global,
    replicated,
    setup_distributed,
    shutdown,
)

logger = logging.getLogger(__name__)


def loss_fn(params, graphdef: nnx.GraphDef, rest, x, y, rng, dropout: bool):
    """The mean loss of one micro-batch x, y (B, T), as a pure function of the parameters."""
    model = nnx.merge(graphdef, params, rest, copy=True)  # fresh Variables, so reseed may update them
    if dropout:  # a fresh dropout mask per micro-step, derived from the step's key
        nnx.reseed(model, default=rng)
    _, loss = model(x, y)
    return loss


def train_step(params, opt_state, batch: dict, *, graphdef, rest, optimizer, dropout: bool):
    """One optimizer step over the micro-batches in `batch` (x, y: (micro_steps, rows, T); rng).

    Pure: parameters and optimizer state in, new ones and the step's metrics out.

    Accumulation is a `lax.scan` over the micro-batches, not `optax.MultiSteps`: one compiled step
    is one optimizer update, the accumulator lives only inside the step (no extra optimizer
    state to shard and checkpoint), and the host calls one function per step whatever the
    accumulation. Every micro-batch has the same token count, so the mean of the micro-batch
    means is the mean over all tokens of the step, exactly as one big batch.
    """
    x, y = batch["x"], batch["y"]
    micro_steps = x.shape[0]
    grad_fn = jax.value_and_grad(loss_fn)

    def micro_step(grad_sum, micro):
        x_m, y_m, i = micro  # (rows, T), (rows, T), ()
        loss, grads = grad_fn(params, graphdef, rest, x_m, y_m, jax.random.fold_in(batch["rng"], i), dropout)
        return jax.tree.map(jnp.add, grad_sum, grads), loss

    zeros = jax.tree.map(jnp.zeros_like, params)
    grad_sum, losses = jax.lax.scan(micro_step, zeros, (x, y, jnp.arange(micro_steps)))
    grads = jax.tree.map(lambda g: g / micro_steps, grad_sum)
    grad_norm = optax.global_norm(grads)  # before clipping, as torch's clip_grad_norm_ reports it
    updates, opt_state = optimizer.update(grads, opt_state, params)
    params = optax.apply_updates(params, updates)
    return params, opt_state, {"loss": jnp.mean(losses), "grad_norm": grad_norm}


def make_train_step(
    graphdef: nnx.GraphDef,
    rest,
    optimizer: optax.GradientTransformation,
    mesh: Mesh,
    param_sharding,
    opt_sharding,
    dropout: bool = False,
):
    """`train_step` jitted once: shardings fixed in and out, parameter and optimizer buffers donated."""
    step = functools.partial(train_step, graphdef=graphdef, rest=rest, optimizer=optimizer, dropout=dropout)
    batch = {"x": batch_sharding(mesh), "y": batch_sharding(mesh), "rng": replicated(mesh)}
    return jax.jit(
        step,
        in_shardings=(param_sharding, opt_sharding, batch),
        out_shardings=(param_sharding, opt_sharding, replicated(mesh)),
        donate_argnums=(0, 1),
    )


def eval_step(params, x, y, *, graphdef, rest):
    """The mean loss of one validation micro-batch, x, y: (1, rows, T), dropout off."""
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


def generate_sample(model: GPT, config: Config) -> str:
    """A sample from the trained model: `train.sample_tokens` tokens after `train.sample_prompt`."""
    from babygpt_jax.generate import generate

    t = config.train
    prompt = encode_prompt(t.sample_prompt)[-config.model.block_size + 1 :]
    new_tokens = min(t.sample_tokens, config.model.block_size - len(prompt))  # the KV cache holds one context
    [tokens] = generate(model, [prompt], new_tokens, temperature=0.8, top_k=200, top_p=None, seed=t.seed)
    return get_tokenizer().decode(prompt + list(tokens))


def init_state(model: GPT, optimizer: optax.GradientTransformation, mesh: Mesh, fsdp: bool):
    """The functional split of `model`, placed on `mesh`, and a fresh optimizer state beside it.

    Returns graphdef (static structure), params (what trains), rest (the RNG streams), opt_state,
    and the parameter and optimizer-state shardings that `make_train_step` fixes.
    """
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)
    param_sharding = param_shardings(mesh, params, fsdp)
    params = put_global(params, param_sharding)
    opt_sharding = param_shardings(mesh, jax.eval_shape(optimizer.init, params), fsdp)
    opt_state = jax.jit(optimizer.init, out_shardings=opt_sharding)(params)
    rest = put_global(rest, jax.tree.map(lambda _: replicated(mesh), rest))
    return graphdef, params, rest, opt_state, param_sharding, opt_sharding


def main(config: Config) -> dict:
    """Train as `config` says, resuming if asked; return a summary of the run."""
    logging.getLogger("absl").setLevel(logging.WARNING)  # orbax narrates every save at INFO
    setup_distributed()
    summary = _train(config)
    # Only a finished run leaves through `shutdown`, whose barrier waits for every process: after a
    # failure the others may be blocked in a collective with this process and never come. jax still
    # shuts down at exit; if the others do not come within SHUTDOWN_TIMEOUT_S, that fails them too.
    shutdown()
    return summary


def _train(config: Config) -> dict:
    t = config.train
    is_main = is_main_process()
    # Every process checks the run directory before process 0 writes into it, so all agree.
    if not is_main:
        prepare_run_dir(config, is_main=False)
    barrier("run_dir")
    run_dir = prepare_run_dir(config, is_main=True) if is_main else config.run_dir
    if is_main:  # shakespeare prepares itself once, on process 0
        ensure_dataset(config)
    barrier("dataset")
    ensure_dataset(config)
    plan = plan_batch(config, jax.device_count())
    mesh = make_mesh(config)

    dtype = _compute_dtype(t.dtype)
    model = _build_model(config, dtype)
    model.remat = t.remat
    optimizer = make_optimizer(t)
    graphdef, params, rest, opt_state, param_sharding, opt_sharding = init_state(
        model, optimizer, mesh, t.fsdp
    )
    rng = put_global(jax.random.PRNGKey(t.seed), replicated(mesh))  # the root of the dropout keys
    train_loader, val_loader = make_loaders(config, plan, jax.process_index(), jax.local_device_count())

    start_step = 0
    if config.run.resume and latest_step(run_dir) is not None:
        restored = restore_checkpoint(run_dir, params, opt_state, rng, config.model)
        params, opt_state, rng = restored["params"], restored["opt_state"], restored["rng"]
        start_step = restored["step"]
        train_loader.load_state_dict(restored["loader"])
        if is_main:
            logger.info("resumed %s at step %d", run_dir, start_step)

    step_fn = make_train_step(
        graphdef, rest, optimizer, mesh, param_sharding, opt_sharding, config.model.dropout > 0
    )
    eval_fn = make_eval_step(graphdef, rest, mesh, param_sharding)
    schedule = jax.jit(lr_schedule(t))  # for the log; jitted so that it compiles once, here
    schedule(start_step)
    batches = batch_sharding(mesh)
    manager = checkpoint_manager(run_dir, t.keep_checkpoints)

    device = jax.devices()[0]
    peak = peak_flops(device.device_kind) if device.platform == "gpu" else None
    log = MetricsLog(run_dir, config, t.max_steps, start_step, enabled=is_main)
    if is_main:
        log.info(
            f"jax | {model.num_params():,} parameters | {jax.device_count()} x {device.platform}"
            f" ({jax.process_count()} process{'es' if jax.process_count() > 1 else ''},"
            f" {'fsdp' if t.fsdp else 'data parallel'}) | {plan.tokens_per_step:,} tokens/step"
            f" ({plan.accumulation_steps} micro-steps) | {jnp.dtype(dtype).name} compute"
        )

    gather = jax.jit(lambda p: p, out_shardings=replicated(mesh))  # whole on every device

    def host_params():
        """The parameters gathered whole onto every process, as numpy, for export and sampling."""
        return jax.device_get(gather(params))

    def checkpoint(step: int) -> None:
        save_checkpoint(manager, step, params, opt_state, train_loader.state_dict(), rng, config.model)
        weights = host_params()
        if is_main:
            nnx.update(model, weights)
            export_hf(run_dir, model)

    train_loss = val_loss = metrics = None
    timed_steps, timed_seconds = 0, 0.0
    logged_step = timed_from = start_step
    throughput = Throughput(config, plan.tokens_per_step, peak)
    try:
        for step in range(start_step, t.max_steps):
            x, y = train_loader.next_batch()  # (micro_steps, rows of this process, T)
            batch = {
                "x": make_global_batch(x, batches),
                "y": make_global_batch(y, batches),
                "rng": jax.random.fold_in(rng, step),
            }
            params, opt_state, metrics = step_fn(params, opt_state, batch)  # dispatched, not awaited
            done = step + 1
            last = done == t.max_steps
            if step == start_step:  # the first step compiles: keep it out of tokens/s
                jax.block_until_ready(metrics)
                throughput, timed_from = Throughput(config, plan.tokens_per_step, peak), done
            if done % t.log_interval == 0 or last:
                values = jax.device_get(metrics)  # the host waits for the devices only here
                train_loss = float(values["loss"])
                check_finite(train_loss, done)
                speed = throughput.measure(done - timed_from) if done > timed_from else {}
                if speed:
                    timed_steps += done - timed_from
                    timed_seconds += speed["step_ms"] * (done - timed_from) / 1000
                record = {
                    "loss": train_loss,
                    "lr": float(schedule(step)),
                    "grad_norm": float(values["grad_norm"]),
                }
                log.step(done, {**record, **speed}, done - logged_step)
                logged_step = timed_from = done
            paused = False
            if t.eval_steps and (done % t.eval_interval == 0 or last):
                val_loss = evaluate(eval_fn, params, val_loader, t.eval_steps, batches)
                log.write({"step": done, "val_loss": val_loss})
                log.info(f"step {done:>6} | val {val_loss:.4f}")
                paused = True
            if done % t.checkpoint_interval == 0 or last:
                check_finite(float(metrics["loss"]), done)  # never checkpoint a diverged model
                checkpoint(done)
                paused = True
            if paused:  # evaluation and saving are not training throughput
                throughput, timed_from = Throughput(config, plan.tokens_per_step, peak), done
    finally:
        manager.wait_until_finished()  # the last save is asynchronous
        manager.close()
        log.close()

    if val_loss is None and t.eval_steps:  # nothing left to train: a resumed, finished run
        val_loss = evaluate(eval_fn, params, val_loader, t.eval_steps, batches)
    steps_run = t.max_steps - start_step
    summary = {
        "train_loss": train_loss,
        "val_loss": val_loss,
        "tokens_per_s": timed_steps * plan.tokens_per_step / timed_seconds if timed_seconds else None,
        "steps": steps_run,
        "run_dir": str(run_dir),
    }
    stats = device.memory_stats() if device.platform == "gpu" else None
    if stats and "peak_bytes_in_use" in stats:
        summary["peak_memory_gib"] = stats["peak_bytes_in_use"] / 2**30
        log.info(f"peak memory {summary['peak_memory_gib']:.2f} GiB")
    if t.sample_tokens:
        weights = host_params()
        if is_main:
            nnx.update(model, weights)
            summary["sample"] = generate_sample(model, config)
            log.info(summary["sample"])
    return summary


def _build_model(config: Config, dtype) -> GPT:
    """A fresh GPT-2 from `config.model`, or the weights of `train.init_from` in that shape."""
    model = GPT(config.model, rngs=nnx.Rngs(config.train.seed), dtype=dtype)
    if config.train.init_from:
        pretrained, tensors = read_hf_dir(config.train.init_from)
        diffs = shape_mismatches(pretrained, config.model)
        if diffs:
            raise BabyGPTError(
                f"train.init_from={config.train.init_from} has {', '.join(diffs)};"
                " set the [model] section to match"
            )
        load_hf_tensors(model, tensors)
    return model


def _compute_dtype(dtype: str):
    """bfloat16 matmuls on GPU by default; float32 on CPU, where bfloat16 is slow and imprecise."""
    if dtype == "auto":
        return jnp.bfloat16 if jax.default_backend() == "gpu" else jnp.float32
    return jnp.dtype(dtype).type
