"""What a training run is, apart from the framework: its directory, its batch plan, its log, its stop.

Both backends' `train.py` use these, so a run directory, a `metrics.jsonl` line and a progress bar
look the same whichever backend wrote them.
"""

from __future__ import annotations

import json
import math
import signal
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path

from tqdm.auto import tqdm

from babygpt.config import BabyGPTError, Config, dump_toml, load_config
from babygpt.flops import mfu


@dataclass(frozen=True)
class BatchPlan:
    micro_batch_size: int  # sequences per device per micro-step
    devices: int  # data-parallel replicas (GPUs, or virtual CPU devices)
    seq_len: int
    accumulation_steps: int

    @property
    def rows_per_micro_step(self) -> int:
        return self.micro_batch_size * self.devices

    @property
    def tokens_per_step(self) -> int:
        return self.rows_per_micro_step * self.seq_len * self.accumulation_steps


def plan_batch(config: Config, devices: int) -> BatchPlan:
    """Derive the accumulation steps from `total_batch_tokens`; fail in one line if it won't divide."""
    t, T = config.train, config.model.block_size
    per_micro_step = t.micro_batch_size * T * devices
    if t.total_batch_tokens == 0:
        return BatchPlan(t.micro_batch_size, devices, T, 1)
    if t.total_batch_tokens % per_micro_step:
        raise BabyGPTError(
            f"train.total_batch_tokens={t.total_batch_tokens} is not a multiple of micro_batch_size"
            f" x block_size x devices = {t.micro_batch_size} x {T} x {devices} = {per_micro_step};"
            f" try train.total_batch_tokens={max(1, round(t.total_batch_tokens / per_micro_step)) * per_micro_step}"
        )
    return BatchPlan(t.micro_batch_size, devices, T, t.total_batch_tokens // per_micro_step)


def prepare_run_dir(config: Config, is_main: bool = True) -> Path:
    """Create out/<name>/ with the resolved config; never silently reuse a finished run."""
    run_dir = config.run_dir
    saved = run_dir / "config.toml"
    if config.run.resume:
        if not saved.exists():
            raise BabyGPTError(f"nothing to resume in {run_dir}; drop --resume to start a new run")
    elif saved.exists():
        raise BabyGPTError(
            f"{run_dir} already holds a run; pass --resume to continue it,"
            f" or run.name=<new name> to start another"
        )
    if is_main:
        run_dir.mkdir(parents=True, exist_ok=True)
        saved.write_text(dump_toml(config))
    return run_dir


def load_run_config(run_dir: str | Path) -> Config:
    path = Path(run_dir) / "config.toml"
    if not path.exists():
        raise BabyGPTError(f"{run_dir} is not a run directory (no config.toml); check --checkpoint")
    return load_config(path)


class MetricsLog:
    """One JSON line per logged step in metrics.jsonl, and a progress bar on a terminal."""

    def __init__(self, run_dir: Path, config: Config, total_steps: int, start_step: int, enabled: bool):
        self.enabled = enabled
        self.config = config
        self.path = run_dir / "metrics.jsonl"
        self.bar = None
        if enabled:
            self.bar = tqdm(
                total=total_steps,
                initial=start_step,
                desc=f"{config.run.backend} {config.run.name}",
                dynamic_ncols=True,
                disable=None,  # off when stdout is not a terminal (CI, pipes)
                file=sys.stdout,
            )

    def write(self, record: dict) -> None:
        if not self.enabled:
            return
        with self.path.open("a") as f:
            f.write(json.dumps(record) + "\n")

    def step(self, step: int, metrics: dict, n_steps: int = 1) -> None:
        if not self.enabled:
            return
        self.write({"step": step, **metrics})
        if self.bar is not None:
            if not self.bar.disable:
                self.bar.set_postfix_str(format_metrics(metrics), refresh=False)
            self.bar.update(n_steps)
            if self.bar.disable:
                self.info(f"step {step:>6} | {format_metrics(metrics)}")

    def info(self, message: str) -> None:
        if self.enabled:
            tqdm.write(message, file=sys.stdout)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def format_metrics(metrics: dict) -> str:
    parts = []
    for key, fmt in (
        ("loss", "loss {:.4f}"),
        ("val_loss", "val {:.4f}"),
        ("lr", "lr {:.2e}"),
        ("grad_norm", "norm {:.3f}"),
        ("tokens_per_s", "{:,.0f} tok/s"),
        ("mfu", "mfu {:.1%}"),
    ):
        if metrics.get(key) is not None:
            parts.append(fmt.format(metrics[key]))
    return " | ".join(parts)


class Throughput:
    """Tokens per second and MFU over the steps since the last call."""

    def __init__(self, config: Config, tokens_per_step: int, peak: float | None):
        self.config = config
        self.tokens_per_step = tokens_per_step
        self.peak = peak
        self.t0 = time.perf_counter()

    def measure(self, n_steps: int) -> dict:
        now = time.perf_counter()
        dt = max(now - self.t0, 1e-9)
        self.t0 = now
        tps = self.tokens_per_step * n_steps / dt
        m = mfu(tps, self.config.model, self.config.model.block_size, self.peak)
        return {"tokens_per_s": tps, "mfu": m, "step_ms": 1000 * dt / n_steps}


def check_finite(loss: float, step: int) -> None:
    if not math.isfinite(loss):
        raise BabyGPTError(
            f"loss became {loss} at step {step}; stopped, the last good checkpoint is kept"
            " (try a lower train.max_lr or train.grad_clip=1.0)"
        )


class Stopped(Exception):
    """Training stopped on a signal after saving a checkpoint; the CLI exits with `exit_code`."""

    def __init__(self, signum: int):
        super().__init__(f"stopped by {signal.Signals(signum).name}")
        self.exit_code = 128 + signum  # what a shell reports for a process that signal killed: 143


class StopSignal:
    """SIGTERM as a request to stop at the next step boundary, rather than to die mid-step.

    torchrun forwards SIGTERM to every worker and SLURM sends it before preempting a job, so the
    training loop polls `received` between steps: the processes agree on a step, checkpoint it and
    exit. A second SIGTERM changes nothing, because under SLURM a worker gets one from SLURM and
    one from torchrun. A process blocked in a collective runs the handler only once the collective
    returns, so SIGTERM alone no longer ends it; what does is the collective failing (a dead peer,
    the process-group timeout) or torchrun's SIGKILL, sent when its grace period (30 s) runs out.
    """

    def __init__(self, signum: int = signal.SIGTERM):
        self.signum = signum
        self.received = False
        self._previous = None  # the handler to put back on exit; None while none is replaced

    def __enter__(self) -> StopSignal:
        if threading.current_thread() is threading.main_thread():  # the only thread Python signals
            self._previous = signal.getsignal(self.signum) or signal.SIG_DFL  # None: set outside Python
            signal.signal(self.signum, self._handle)
        return self

    def __exit__(self, *exc) -> None:
        if self._previous is not None:
            signal.signal(self.signum, self._previous)
            self._previous = None

    def _handle(self, signum, frame) -> None:
        self.received = True
