"""The run harness: everything a training run does around its step, once for both backends.

Each backend's `train.main` builds its state and hands the harness its callables (`Backend`): the
step, evaluation, saving, sampling, and the process group's vote and barrier. The harness owns the
rest: the run directory's lifecycle (`RunDir`: a lock, the checks before anything is written, the
leftovers of a killed save, `metrics.jsonl` cut back on resume), the log / eval / checkpoint
cadence, throughput, the finite check, stop requests (SIGTERM, SIGINT) and the summary. It imports
no framework: the step's state is an opaque value passed back to the backend's callables.
"""

from __future__ import annotations

import dataclasses
import fcntl
import json
import logging
import os
import shutil
import signal
import socket
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from babygpt.config import BabyGPTError, Config, dump_toml, load_config
from babygpt.data import ensure_dataset
from babygpt.files import atomic_open
from babygpt.memory import check_fits
from babygpt.run import (
    BatchPlan,
    MetricsLog,
    Stopped,
    StopSignal,
    Throughput,
    check_finite,
    cluster_tasks,
    plan_batch,
)

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class Processes:
    """How the processes of one run agree: process 0 writes, every process votes and waits."""

    index: int = 0  # this process's rank; process 0 is the main one
    any_process: Callable[[bool], bool] = bool  # True on every process if True on any
    barrier: Callable[[str], None] = lambda name: None

    @property
    def is_main(self) -> bool:
        return self.index == 0


def plan_run(
    config: Config, processes: Processes, devices: int, memory: tuple[int, str], eager_loss: bool = False
) -> BatchPlan:
    """The dataset ready on every process (Shakespeare prepared once, by process 0), the batch plan,
    and the memory check (`memory`: one device's bytes and platform), before anything is allocated."""
    if processes.is_main:
        ensure_dataset(config)
    processes.barrier("dataset")
    if not processes.is_main:  # once process 0 has prepared it
        ensure_dataset(config)
    plan = plan_batch(config, devices)
    check_fits(config, plan.devices, *memory, eager_loss=eager_loss)
    return plan


def check_run_dir(config: Config) -> None:
    """`RunDir`'s checks, lock included, before a framework loads: a refusal in a moment, not after
    the seconds a backend takes to import. The backend's `RunDir` checks again, holding the lock.

    Only a process that is the whole run checks this early: in a group (torchrun, a JAX coordinator
    or cluster) the processes must refuse together, which needs the group the backend sets up.
    """
    # The variables each backend's setup_distributed reads to join a group.
    torchrun = int(os.environ.get("WORLD_SIZE", 1)) > 1
    if not torchrun and "JAX_COORDINATOR_ADDRESS" not in os.environ and cluster_tasks() == 1:
        # The backend's latest_step reads its own checkpoint format; any committed entry will do here.
        with RunDir(config, Processes(), latest_step=lambda path: 0) as run:
            run.open()


class RunDir:
    """out/<name>/ for the life of one run: checked, locked, and written only once every check passed.

    `open()` (every process) checks what the directory holds against what was asked and, on process
    0, takes an exclusive lock (`fcntl.flock` on `out/.<name>.lock`, beside the run directory so
    that the directory itself stays untouched; the kernel releases it on any exit, even a kill). The backend then builds its state and restores a
    checkpoint (the shape check); only `begin()` writes: it removes a killed save's leftovers,
    cuts `metrics.jsonl` back to the step the run continues from and saves config.toml.
    """

    def __init__(self, config: Config, processes: Processes, latest_step: Callable[[Path], int | None]):
        self.config = config
        self.path = config.run_dir
        self.processes = processes
        self.latest_step = latest_step
        self._lock_fd: int | None = None

    def open(self) -> int | None:
        """Check the directory and lock it; return the checkpoint step to resume from (None: start)."""
        error = None
        try:
            if self.processes.is_main:
                self._lock()
            resume_step = self._check()
        except BabyGPTError as e:
            error, resume_step = e, None
        if self.processes.any_process(error is not None):  # every process leaves, process 0 says why
            self.close()
            if not self.processes.is_main:
                raise SystemExit(2)
            raise error or BabyGPTError(f"another process of this run cannot use {self.path}; see its output")
        return resume_step

    def _lock(self) -> None:
        out = self.path.parent
        if out.exists() and not out.is_dir():
            raise BabyGPTError(f"run.out_dir={out} is a file, not a directory; choose another run.out_dir")
        if self.path.exists() and not self.path.is_dir():
            raise BabyGPTError(f"{self.path} is a file, not a run directory; choose another run.name")
        try:
            out.mkdir(parents=True, exist_ok=True)
            fd = os.open(out / f".{self.path.name}.lock", os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as e:
            raise BabyGPTError(
                f"cannot create {self.path} ({e.strerror}); choose another run.out_dir"
            ) from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.read(fd, 200).decode(errors="replace").strip() or "another process"
            os.close(fd)
            raise BabyGPTError(
                f"{self.path} is in use by {holder}; wait for it to finish or stop it first"
            ) from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"pid {os.getpid()} on {socket.gethostname()}\n".encode(), 0)
        self._lock_fd = fd

    def _check(self) -> int | None:
        saved, name = self.path / "config.toml", self.config.run.name
        others = _checkpoint_entries(self.path)
        step = self.latest_step(self.path) if others else None
        if saved.exists():
            made_by = _saved_backend(saved)
            if made_by != self.config.run.backend and self.config.run.resume:
                raise BabyGPTError(
                    f"{self.path} was trained by the {made_by} backend; resume it with --backend={made_by}, or start"
                    f" a {self.config.run.backend} run from its weights: python -m parity.convert {self.path}"
                    f" {self.path}-hf, then train.init_from={self.path}-hf run.name={name}-{self.config.run.backend}"
                )
        elif others:
            raise BabyGPTError(
                f"{self.path} holds checkpoints but no config.toml, so it cannot be resumed safely;"
                " choose another run.name"
            )
        if self.config.run.resume:
            if step is None:
                raise BabyGPTError(f"no checkpoint to resume in {self.path}; drop --resume to start over")
            return step
        if others:
            raise BabyGPTError(
                f"{self.path} already holds a run; pass --resume to continue it,"
                " or run.name=<new name> to start another"
            )
        if saved.exists() and self.processes.is_main:
            logger.info(
                f"{self.path} holds no checkpoint (a run stopped before its first save); starting over"
            )
        return None

    def begin(self, start_step: int) -> None:
        """Every check passed: clean up after a killed save, cut the log back, save the config."""
        if not self.processes.is_main:
            return
        try:
            self.path.mkdir(exist_ok=True)
            for leftover in _leftovers(self.path):
                if leftover.is_dir():
                    shutil.rmtree(leftover, ignore_errors=True)
                else:
                    leftover.unlink(missing_ok=True)
            _truncate_metrics(self.path / "metrics.jsonl", start_step)
            run = dataclasses.replace(self.config.run, resume=False)  # the run, not the command line
            with atomic_open(self.path / "config.toml") as f:
                f.write(dump_toml(dataclasses.replace(self.config, run=run)).encode())
        except OSError as e:  # a read-only or full run directory
            raise BabyGPTError(
                f"cannot write into {self.path} ({e.strerror}); choose another run.out_dir"
            ) from None

    def close(self) -> None:
        if self._lock_fd is not None:
            os.close(self._lock_fd)  # closing the descriptor releases the lock
            self._lock_fd = None

    def __enter__(self) -> RunDir:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def _saved_backend(path: Path) -> str:
    try:
        return load_config(path).run.backend
    except BabyGPTError as e:
        raise BabyGPTError(f"{path} is unreadable ({e}); fix it or choose another run.name") from None


def _checkpoint_entries(run_dir: Path) -> list[Path]:
    """Committed checkpoints of either backend (temporaries start with '.' or name 'tmp')."""
    folder = run_dir / "checkpoints"
    if not folder.is_dir():
        return []
    return [p for p in folder.iterdir() if not p.name.startswith(".") and "tmp" not in p.name]


def _leftovers(run_dir: Path) -> list[Path]:
    """What a killed save leaves: torch's `.step_*.pt.*.tmp`, orbax's `*.orbax-checkpoint-tmp-*`
    directories, the export's `..export.*` staging directory and its `.export`."""
    found = [*run_dir.glob("..export.*"), *run_dir.glob(".export"), *run_dir.glob(".config.toml.*.tmp")]
    folder = run_dir / "checkpoints"
    if folder.is_dir():
        found += [p for p in folder.iterdir() if p.name.startswith(".") or "tmp" in p.name]
    return found


def _truncate_metrics(path: Path, step: int) -> None:
    """Keep the lines of steps up to `step`: a resumed run logs the steps after it again."""
    if not path.exists():
        return
    kept = [
        line for line in path.read_text().splitlines() if line and json.loads(line).get("step", 0) <= step
    ]
    with atomic_open(path) as f:
        f.write("".join(line + "\n" for line in kept).encode())


@dataclass(frozen=True)
class Backend:
    """A backend's side of a run: its state's operations, each a collective where the group needs it.

    `step(state, batch) -> (state, metrics)` is the backend's `train_step`; `next_batch()` the
    loader; `to_host(metrics)` the metrics as floats (the host waits for the devices only there);
    `finite(state)` whether every parameter is finite; `save(state, step)` a checkpoint and the
    export; `evaluate(state)` the validation loss; `sample(state)` the text sampled at the end
    (None off process 0); `peak_memory()` the accelerator's peak, in GiB, or None.
    """

    name: str
    step: Callable[[Any, Any], tuple[Any, dict]]
    next_batch: Callable[[], Any]
    to_host: Callable[[dict], dict]
    finite: Callable[[Any], bool]
    save: Callable[[Any, int], None]
    evaluate: Callable[[Any], float]
    sample: Callable[[Any], str | None]
    peak_memory: Callable[[], float | None]
    description: str  # the model's size and the devices, for the run's first line


def run(config: Config, train: Callable[[Config], dict], shutdown: Callable[[], None]) -> dict:
    """`train(config)`, then leave the process group: after a finished run or an agreed stop only.

    Every process stopped at the same step is as clean as a finished run. After a failure there is
    no teardown: the others may be blocked in a collective with this process and never come to
    the shutdown's barrier; the process exits and the operating system releases the group.
    """
    try:
        summary = train(config)
    except Stopped:
        shutdown()
        raise
    shutdown()
    return summary


def train(
    config: Config,
    run: RunDir,
    backend: Backend,
    state: Any,
    start_step: int,
    plan: BatchPlan,
    peak: float | None,
    dtype: str,
) -> dict:
    """Train from `start_step` to `train.max_steps`, then evaluate, sample and return the summary."""
    t, processes = config.train, run.processes
    log = MetricsLog(run.path, config, t.max_steps, start_step, enabled=processes.is_main)
    log.info(
        f"{backend.name} | {backend.description} | {'fsdp' if t.fsdp else 'data parallel'}"
        f" | {plan.tokens_per_step:,} tokens/step ({plan.accumulation_steps} micro-steps) | {dtype} compute"
    )
    if start_step >= t.max_steps:
        log.info(
            f"{run.path} finished at step {start_step} (train.max_steps={t.max_steps}); nothing to train"
        )
    clock = _Clock(config, plan.tokens_per_step, peak, start_step)
    try:
        state, train_loss, val_loss = _loop(config, run, backend, state, start_step, log, clock)
    finally:
        log.close()
    if val_loss is None and t.eval_steps:  # nothing left to train: a resumed, finished run
        val_loss = backend.evaluate(state)
    summary = {
        "train_loss": train_loss,
        "val_loss": val_loss,
        "tokens_per_s": clock.tokens_per_s(),
        "steps": max(t.max_steps - start_step, 0),
        "run_dir": str(run.path),
    }
    if (peak_gib := backend.peak_memory()) is not None:
        summary["peak_memory_gib"] = peak_gib
        log.info(f"peak memory {peak_gib:.2f} GiB")
    if t.sample_tokens and (sample := backend.sample(state)) is not None:
        summary["sample"] = sample
        log.info(sample)
    log.info(f"the run is in {run.path}; sample from it with: python inference.py --checkpoint {run.path}")
    return summary


def _loop(config: Config, run: RunDir, backend: Backend, state: Any, start_step: int, log, clock) -> tuple:
    """The steps, and at their intervals log, evaluate and save; stop on a signal, saved."""
    t, processes = config.train, run.processes
    train_loss = val_loss = None
    step = start_step
    with StopSignal() as stop:
        try:
            for step in range(start_step, t.max_steps):
                state, metrics = backend.step(state, backend.next_batch())  # dispatched, maybe not awaited
                done = step + 1
                last = done == t.max_steps
                if step == start_step:  # the first step compiles: keep it out of tokens/s
                    backend.to_host(metrics)
                    clock.restart(done)
                if done % t.log_interval == 0 or last:
                    values = backend.to_host(metrics)  # the host waits for the devices only here
                    train_loss = values["loss"]
                    check_finite(train_loss, done, t)
                    record = {"loss": train_loss, "lr": values["lr"], "grad_norm": values["grad_norm"]}
                    speed = clock.measure(done)
                    log.step(done, {**record, **speed}, clock.logged(done))
                paused = False
                if t.eval_steps and (done % t.eval_interval == 0 or last):
                    val_loss = backend.evaluate(state)
                    log.write({"step": done, "val_loss": val_loss})
                    log.info(f"step {done:>6} | val {val_loss:.4f}")
                    paused = True
                # A signal reaches the processes at different moments; they stop at the first step
                # boundary where any of them has seen it, all at the same step.
                stopping = processes.any_process(stop.received)
                if done % t.checkpoint_interval == 0 or last or stopping:
                    _save(backend, state, done, processes)
                    paused = True
                if paused:  # evaluation and saving are not training throughput
                    clock.restart(done)
                if stopping:
                    signum = stop.signum or signal.SIGTERM  # a peer's signal: stop as it does
                    if processes.is_main:
                        logger.warning(
                            f"stopped by {signal.Signals(signum).name} after step {done} and saved it;"
                            " run the same command with --resume to continue"
                        )
                    raise Stopped(signum)
        except (BabyGPTError, Stopped):
            raise
        except Exception as e:
            # No checkpoint: the state may be half-updated, and gathering it could wait on a dead peer.
            latest = run.latest_step(run.path)
            since = f"from step {latest}" if latest else "from the start (no checkpoint yet)"
            reason = (str(e).strip().splitlines() or [""])[0]
            logger.error(
                f"process {processes.index} failed in step {step + 1} ({type(e).__name__}: {reason});"
                f" run the same command with --resume to continue {since}"
            )
            raise
    return state, train_loss, val_loss


def _save(backend: Backend, state: Any, step: int, processes: Processes) -> None:
    """Checkpoint and export `state`, only if every parameter is finite: the last good one stays good."""
    if processes.any_process(not backend.finite(state)):
        raise BabyGPTError(
            f"the parameters became non-finite in step {step}; stopped, the last good checkpoint is kept"
            " (try a lower train.max_lr)"
        )
    backend.save(state, step)


class _Clock:
    """Tokens per second over the timed steps: the compile step, evaluations and saves left out."""

    def __init__(self, config: Config, tokens_per_step: int, peak: float | None, start_step: int):
        self.config, self.tokens_per_step, self.peak = config, tokens_per_step, peak
        self.throughput = Throughput(config, tokens_per_step, peak)
        self.timed_from = self.logged_step = start_step
        self.timed_steps, self.timed_seconds = 0, 0.0

    def restart(self, step: int) -> None:
        self.throughput, self.timed_from = Throughput(self.config, self.tokens_per_step, self.peak), step

    def measure(self, step: int) -> dict:
        """Tokens/s, MFU and step time since the last measure or restart; {} if no step was timed."""
        speed = self.throughput.measure(step - self.timed_from) if step > self.timed_from else {}
        if speed:
            self.timed_steps += step - self.timed_from
            self.timed_seconds += speed["step_ms"] * (step - self.timed_from) / 1000
        self.timed_from = step
        return speed

    def logged(self, step: int) -> int:
        """Steps since the last logged one (the progress bar's advance)."""
        n, self.logged_step = step - self.logged_step, step
        return n

    def tokens_per_s(self) -> float | None:
        return self.timed_steps * self.tokens_per_step / self.timed_seconds if self.timed_seconds else None
