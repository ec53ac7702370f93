"""Training in PyTorch: a stateful loop around autograd, DDP or FSDP2, and `torch.optim`.

The mirror of `babygpt_jax/train.py`, where `train_step` is a pure jitted function of
`(params, opt_state, batch)`. Here the step mutates the model's `.grad`s and the optimizer in
place; gradient accumulation is a Python loop of `backward()` calls, and DDP (or FSDP2) reduces
the gradients across processes on the last micro-step only (`no_sync` before it). SIGTERM stops
every process at the same step boundary, after a checkpoint.
"""

from __future__ import annotations

import contextlib
import copy
import ctypes
import logging

import torch
import torch.nn as nn
from torch.distributed.tensor import DTensor

from babygpt.config import BabyGPTError, Config
from babygpt.data import ensure_dataset
from babygpt.flops import peak_flops
from babygpt.hf import read_hf_dir, shape_mismatches
from babygpt.run import (
    BatchPlan,
    MetricsLog,
    Stopped,
    StopSignal,
    Throughput,
    check_finite,
    plan_batch,
    prepare_run_dir,
)
from babygpt.tokenizer import encode_prompt, get_tokenizer
from babygpt_torch.checkpoint import (
    checkpoint_path,
    export_hf,
    latest_step,
    restore_checkpoint,
    save_checkpoint,
)
from babygpt_torch.data import DataLoaderLite, make_loaders
from babygpt_torch.generate import generate
from babygpt_torch.model import GPT, load_hf_tensors
from babygpt_torch.optim import make_optimizer
from babygpt_torch.parallel import (
    Dist,
    all_reduce_mean,
    any_process,
    barrier,
    gather_model,
    no_sync,
    setup_distributed,
    shard_model,
    shutdown,
    wrap_model,
)

logger = logging.getLogger(__name__)


def train_step(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LRScheduler,
    loader: DataLoaderLite,
    plan: BatchPlan,
    dist: Dist,
    autocast_dtype: torch.dtype,
    grad_clip: float = 1.0,
) -> dict:
    """One optimizer step over `plan.accumulation_steps` micro-batches; returns loss, lr, grad_norm.

    Each micro-loss is divided by the number of micro-steps, so the summed gradient is the
    gradient of the mean loss over the whole step, exactly as one big batch.
    """
    model.train()
    lr = optimizer.param_groups[0]["lr"]
    n = plan.accumulation_steps
    optimizer.zero_grad(set_to_none=True)
    loss_sum = torch.zeros((), device=dist.device)
    for micro in range(n):
        x, y = loader.next_batch()  # (B, T) each
        # DDP and FSDP2 reduce during backward; only the last micro-step's backward needs to.
        sync = dist.world_size == 1 or micro == n - 1
        with contextlib.nullcontext() if sync else no_sync(model):
            with _autocast(dist.device, autocast_dtype):
                _, loss = model(x, y)
            loss = loss / n
            loss.backward()
        loss_sum += loss.detach()
    # max_norm=inf measures the norm without clipping
    grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), grad_clip or float("inf"))
    if isinstance(grad_norm, DTensor):  # FSDP2's gradients are shards: the norm's full value is global
        grad_norm = grad_norm.full_tensor()
    optimizer.step()
    scheduler.step()
    loss_sum = all_reduce_mean(loss_sum, dist)
    loss, norm = torch.stack([loss_sum, grad_norm.to(loss_sum)]).tolist()  # the step's one host sync
    return {"loss": loss, "lr": lr, "grad_norm": norm}


@torch.no_grad()
def evaluate(
    model: nn.Module,
    val_loader: DataLoaderLite,
    steps: int,
    autocast_dtype: torch.dtype,
    dist: Dist | None = None,
) -> float:
    """Mean loss over the first `steps` validation micro-batches (the same ones every time)."""
    model.eval()
    val_loader.reset()
    device = val_loader.device
    total = torch.zeros((), device=device)
    for _ in range(steps):
        x, y = val_loader.next_batch()
        with _autocast(device, autocast_dtype):
            _, loss = model(x, y)
        total += loss.float()
    model.train()
    mean = total / max(steps, 1)
    if dist is not None:
        mean = all_reduce_mean(mean, dist)
    return mean.item()


def generate_sample(model: GPT, config: Config) -> str:
    """A sample from the trained model: up to `train.sample_tokens` tokens after `train.sample_prompt`."""
    t = config.train
    prompt = encode_prompt(t.sample_prompt)[-config.model.block_size + 1 :]
    new_tokens = min(t.sample_tokens, config.model.block_size - len(prompt))  # the KV cache holds one context
    [tokens] = generate(model, [prompt], new_tokens, temperature=0.8, top_k=200, top_p=None, seed=t.seed)
    return get_tokenizer().decode(prompt + list(tokens))


def main(config: Config) -> dict:
    """Train as `config` says, resuming if asked; return a summary of the run."""
    dist = setup_distributed(config.train.fsdp)
    try:
        summary = _train(config, dist)
    except Stopped:
        shutdown(dist)  # every process stopped at the same step: as clean as a finished run
        raise
    # No teardown after a failure: NCCL's waits for every peer, and a failed peer never comes.
    # The process exits and the operating system releases the group.
    shutdown(dist)
    return summary


def _reuse_freed_cpu_memory() -> None:
    """Keep glibc from handing large freed blocks back to the operating system between steps.

    The logits and their gradients (B*T x 50,304 floats: 100 MB at the default config) are above
    glibc's mmap threshold, so each is mmapped, unmapped when freed, and page-faulted (zeroed) in
    again at the next step: half the CPU step time went to the kernel. Raising both thresholds
    keeps such blocks in the heap for reuse. JAX's CPU runtime has its own allocator.
    """
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:  # not glibc (macOS, musl): nothing to tune
        return
    libc.mallopt(-3, 1 << 30)  # M_MMAP_THRESHOLD: blocks up to 1 GiB come from the heap
    libc.mallopt(-1, 1 << 31)  # M_TRIM_THRESHOLD: keep up to 2 GiB of freed heap


def _train(config: Config, dist: Dist) -> dict:
    t = config.train
    if dist.device.type == "cpu":
        _reuse_freed_cpu_memory()
    is_main = dist.rank == 0
    torch.manual_seed(t.seed)  # every rank builds the same initial model
    # Every rank checks the run directory before rank 0 writes into it, so all ranks agree.
    if not is_main:
        prepare_run_dir(config, is_main=False)
    barrier(dist)
    run_dir = prepare_run_dir(config, is_main=True) if is_main else config.run_dir
    if is_main:  # shakespeare prepares itself once, on rank 0
        ensure_dataset(config)
    barrier(dist)
    ensure_dataset(config)
    plan = plan_batch(config, dist.world_size)

    model = _build_model(config)
    # Under FSDP no process holds the whole model: rank 0 keeps a plain copy on the CPU for the
    # export and the sample, refreshed from the shards when they are needed.
    whole = copy.deepcopy(model) if t.fsdp and is_main else None
    model.remat = t.remat
    model.to(dist.device)
    device_type = dist.device.type
    # bfloat16 under FSDP2 comes from the same autocast as under DDP, not from a
    # MixedPrecisionPolicy: casting the parameters themselves would also put the embeddings, the
    # residual stream and LayerNorm's weights in bfloat16, a different computation from DDP's and
    # JAX's. The price is all-gathering float32 weights, twice the bytes.
    autocast_dtype = _compute_dtype(t.dtype, device_type)
    if device_type == "cuda":
        torch.set_float32_matmul_precision("high")  # TF32 for any matmul left in float32
    if t.fsdp:  # before the optimizer, which must hold the sharded parameters
        shard_model(model, dist)
    optimizer, scheduler = make_optimizer(model, t, device_type)
    train_loader, val_loader = make_loaders(config, plan, dist.rank, dist.device)

    start_step = 0
    if config.run.resume and latest_step(run_dir) is not None:
        restored = restore_checkpoint(run_dir, model, optimizer, scheduler)
        start_step = restored["step"]
        train_loader.load_state_dict(restored["loader"])
        _set_rng_state(restored["rng"])
        if is_main:
            logger.info("resumed %s at step %d", run_dir, start_step)

    step_model = torch.compile(model) if t.compile else model
    if not t.fsdp:
        step_model = wrap_model(step_model, dist)

    peak = peak_flops(torch.cuda.get_device_name(dist.device)) if device_type == "cuda" else None
    log = MetricsLog(run_dir, config, t.max_steps, start_step, enabled=is_main)
    throughput = Throughput(config, plan.tokens_per_step, peak)
    if is_main:
        log.info(
            f"torch | {model.num_params():,} parameters | {dist.world_size} x {device_type}"
            f" ({'fsdp' if t.fsdp else 'data parallel'})"
            f" | {plan.tokens_per_step:,} tokens/step ({plan.accumulation_steps} micro-steps)"
        )

    def host_model() -> GPT | None:
        """The whole model on rank 0 (None elsewhere under FSDP); every process must call it."""
        if not t.fsdp:
            return model
        gather_model(model, into=whole)
        return whole

    def checkpoint(step: int) -> None:
        # Every process takes part: under FSDP each holds a shard of the state; rank 0 writes.
        save_checkpoint(
            run_dir,
            step,
            model,
            optimizer,
            scheduler,
            train_loader.state_dict(),
            _rng_state(),
            keep=t.keep_checkpoints,
        )
        exported = host_model()
        if is_main:
            export_hf(run_dir, exported)

    train_loss = val_loss = None
    timed_steps, timed_seconds = 0, 0.0
    logged_step = timed_from = start_step
    throughput = Throughput(config, plan.tokens_per_step, peak)
    step = start_step
    with StopSignal() as stop:  # still installed while the except clauses below report
        try:
            for step in range(start_step, t.max_steps):
                metrics = train_step(
                    step_model, optimizer, scheduler, train_loader, plan, dist, autocast_dtype, t.grad_clip
                )
                done, train_loss = step + 1, metrics["loss"]
                check_finite(train_loss, done)  # before any checkpoint: the last good one is kept
                last = done == t.max_steps
                if step == start_step:  # the first step warms up (and compiles): keep it out of tokens/s
                    throughput, timed_from = Throughput(config, plan.tokens_per_step, peak), done
                if done % t.log_interval == 0 or last:
                    speed = throughput.measure(done - timed_from) if done > timed_from else {}
                    if speed:
                        timed_steps += done - timed_from
                        timed_seconds += speed["step_ms"] * (done - timed_from) / 1000
                    log.step(done, {**metrics, **speed}, done - logged_step)
                    logged_step = timed_from = done
                paused = saved = False
                if t.eval_steps and (done % t.eval_interval == 0 or last):
                    val_loss = evaluate(step_model, val_loader, t.eval_steps, autocast_dtype, dist)
                    log.write({"step": done, "val_loss": val_loss})
                    log.info(f"step {done:>6} | val {val_loss:.4f}")
                    paused = True
                if done % t.checkpoint_interval == 0 or last:
                    checkpoint(done)
                    paused = saved = True
                if paused:  # evaluation and saving are not training throughput
                    throughput, timed_from = Throughput(config, plan.tokens_per_step, peak), done
                # A SIGTERM reaches the processes at different moments; they stop at the first
                # step boundary where any of them has seen it, all at the same step.
                if any_process(stop.received, dist):
                    if not saved:
                        checkpoint(done)
                    if is_main:
                        logger.warning(
                            f"stopped by SIGTERM after step {done} and saved"
                            f" {checkpoint_path(run_dir, done)}; run the same command with --resume"
                            " to continue"
                        )
                    raise Stopped(stop.signum)
        except (BabyGPTError, Stopped):
            raise
        except Exception as e:
            # No checkpoint: the state may be half-updated, and gathering it could wait on a dead peer.
            latest = latest_step(run_dir)
            since = f"from step {latest}" if latest else "from the start (no checkpoint yet)"
            reason = str(e).strip().splitlines()[0] if str(e).strip() else ""
            logger.error(
                f"rank {dist.rank} failed in step {step + 1} ({type(e).__name__}: {reason});"
                f" run the same command with --resume to continue {since}"
            )
            raise
        finally:
            log.close()

    if val_loss is None and t.eval_steps:  # nothing left to train: a resumed, finished run
        val_loss = evaluate(step_model, val_loader, t.eval_steps, autocast_dtype, dist)
    steps_run = t.max_steps - start_step
    summary = {
        "train_loss": train_loss,
        "val_loss": val_loss,
        "tokens_per_s": timed_steps * plan.tokens_per_step / timed_seconds if timed_seconds else None,
        "steps": steps_run,
        "run_dir": str(run_dir),
    }
    if device_type == "cuda":
        summary["peak_memory_gib"] = torch.cuda.max_memory_allocated(dist.device) / 2**30
        if is_main:
            log.info(f"peak memory {summary['peak_memory_gib']:.2f} GiB")
    if t.sample_tokens:
        sampled = host_model()
        if is_main:
            summary["sample"] = generate_sample(sampled, config)
            log.info(summary["sample"])
    return summary


def _build_model(config: Config) -> GPT:
    """A fresh GPT-2 from `config.model`, or the weights of `train.init_from` in that shape."""
    model = GPT(config.model)
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


def _compute_dtype(dtype: str, device_type: str) -> torch.dtype:
    if dtype == "auto":
        return torch.bfloat16 if device_type == "cuda" else torch.float32
    return getattr(torch, dtype)


def _autocast(device: torch.device, dtype: torch.dtype):
    """bfloat16 matmuls under autocast; float32 needs no autocast at all."""
    return torch.autocast(device.type, dtype=dtype, enabled=dtype != torch.float32)


def _rng_state() -> dict:
    state = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
