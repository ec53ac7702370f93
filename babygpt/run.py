"""What a training run is, apart from the framework: its batch plan, its log, its stop, its sample.

The pieces `babygpt.harness` and both backends' `train.py` use, so that a `metrics.jsonl` line, a
progress line and a stop look the same whichever backend wrote them; `read_metrics` reads what
`MetricsLog` writes.
"""

from __future__ import annotations

import ctypes
import json
import math
import os
import signal
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from tqdm.auto import tqdm

from babygpt.config import BabyGPTError, Config, TrainConfig, load_config
from babygpt.flops import mfu
from babygpt.hf import read_pretrained
from babygpt.tokenizer import encode_prompt, get_tokenizer


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


def cluster_tasks() -> int:
    """How many tasks the SLURM or Open MPI job this process belongs to has (1 outside one): with
    several, `jax.distributed` finds the other processes through the cluster itself."""
    return max(int(os.environ.get("SLURM_NTASKS", 1)), int(os.environ.get("OMPI_COMM_WORLD_SIZE", 1)))


def keep_freed_host_memory(one_arena: bool) -> None:
    """Keep glibc from handing large freed blocks back to the operating system between CPU steps.

    The logits and their gradients (B*T x 50,304 floats: 100 MB at the default config) are above
    glibc's mmap threshold, so each was mmapped, unmapped when freed and page-faulted (zeroed) in
    again at the next step: a third to a half of the CPU time went to the kernel. Raising the
    thresholds keeps such blocks in the heap for reuse. XLA's CPU runtime allocates on its worker
    threads, and glibc gives each thread an arena of its own whose heap holds at most 64 MiB, so
    there a 100 MB block is mmapped whatever the threshold: `one_arena` makes every thread share
    the main heap (measured in docs/benchmarks.md). Call it before any other thread allocates.
    """
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:  # not glibc (macOS, musl): nothing to tune
        return
    if one_arena:
        libc.mallopt(-8, 1)  # M_ARENA_MAX
    libc.mallopt(-3, 1 << 30)  # M_MMAP_THRESHOLD: blocks up to 1 GiB come from the heap
    libc.mallopt(-1, 1 << 31)  # M_TRIM_THRESHOLD: keep up to 2 GiB of freed heap


# libgomp's spin count before an idle OpenMP worker sleeps (its documented default is 300,000).
# The choice of 1,000 is measured in docs/benchmarks.md (issue 21).
OPENMP_SPIN_COUNT = "1000"


def let_openmp_threads_sleep() -> None:
    """Make torch's OpenMP workers (libgomp) sleep almost at once when they run out of work.

    By default a worker that finishes its share of a parallel region spins 300,000 times waiting
    for the next one. On a CPU that another process shares, the spinning worker takes the
    core its partner needs to finish the region, and every small op waits a whole scheduler slice:
    the default run fell to a fifth of its idle speed beside a JAX run. A short spin keeps the
    idle speed and shares the cores. libgomp reads its environment once, when torch loads it, so
    this runs before `import torch` (babygpt_torch/__init__.py) and leaves a policy the user chose
    (OMP_WAIT_POLICY or GOMP_SPINCOUNT) alone. Does nothing once torch is imported.
    """
    if "torch" in sys.modules or "OMP_WAIT_POLICY" in os.environ or "GOMP_SPINCOUNT" in os.environ:
        return
    os.environ["GOMP_SPINCOUNT"] = OPENMP_SPIN_COUNT


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
        self.total_steps, self.start_step = total_steps, start_step
        self.started = time.perf_counter()
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
            if self.bar.disable:  # a log file: the line says what the bar would show
                progress = _elapsed_and_eta(self.started, step - self.start_step, self.total_steps - step)
                self.info(f"step {step:>6}/{self.total_steps} | {format_metrics(metrics)} | {progress}")

    def info(self, message: str) -> None:
        if self.enabled:
            tqdm.write(message, file=sys.stdout)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def read_metrics(run_dir: str | Path) -> tuple[dict[int, float], dict[int, float]]:
    """{step: train loss} and {step: val loss} from a run's metrics.jsonl, as `MetricsLog` wrote it."""
    train, val = {}, {}
    for line in (Path(run_dir) / "metrics.jsonl").read_text().splitlines():
        record = json.loads(line)
        if "loss" in record:
            train[record["step"]] = record["loss"]
        if "val_loss" in record:
            val[record["step"]] = record["val_loss"]
    return train, val


def _elapsed_and_eta(started: float, steps_done: int, steps_left: int) -> str:
    """`12s elapsed, ETA 1m05s`, for progress lines in a log file where no bar shows the time."""
    elapsed = time.perf_counter() - started
    eta = f", ETA {_duration(elapsed / steps_done * steps_left)}" if steps_done > 0 else ""
    return f"{_duration(elapsed)} elapsed{eta}"


def _duration(seconds: float) -> str:
    minutes, s = divmod(int(seconds), 60)
    hours, m = divmod(minutes, 60)
    return f"{hours}h{m:02d}m{s:02d}s" if hours else f"{m}m{s:02d}s" if m else f"{s}s"


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


def check_finite(loss: float, step: int, train: TrainConfig) -> None:
    if not math.isfinite(loss):
        clip = "" if 0 < train.grad_clip <= 1.0 else " or clip the gradients with train.grad_clip=1.0"
        raise BabyGPTError(
            f"loss became {loss} at step {step}; stopped, the last good checkpoint is kept;"
            f" try a lower learning rate, e.g. train.max_lr={train.max_lr / 3:.2g}{clip}"
        )


class Stopped(Exception):
    """Training stopped on a signal after saving a checkpoint; the CLI exits with `exit_code`."""

    def __init__(self, signum: int):
        super().__init__(f"stopped by {signal.Signals(signum).name}")
        self.exit_code = 128 + signum  # what a shell reports for a process that signal killed: 143


class StopSignal:
    """SIGTERM and SIGINT as requests to stop at the next step boundary, rather than to die mid-step.

    torchrun forwards SIGTERM to every worker and SLURM sends it before preempting a job; Ctrl-C
    sends SIGINT to every process of the terminal's group. The training loop polls `received`
    between steps: the processes agree on a step, checkpoint it and exit. A second SIGTERM changes
    nothing, because under SLURM a worker gets one from SLURM and one from torchrun; a second
    Ctrl-C interrupts at once, for a user who will not wait for the save. A process blocked in a
    collective runs the handler only once the collective returns, so a signal alone no longer ends
    it; what does is the collective failing (a dead peer, the process-group timeout) or torchrun's
    SIGKILL, sent when its grace period (30 s) runs out.
    The REPL (inference.py) takes SIGINT alone, polled between tokens and while it waits for a line.
    """

    SIGNALS = (signal.SIGTERM, signal.SIGINT)

    def __init__(self, signals: tuple[int, ...] = SIGNALS):
        self.signals = signals
        self.signum: int | None = None  # the first stop request's signal
        self._previous: dict = {}  # the handlers to put back on exit

    @property
    def received(self) -> bool:
        return self.signum is not None

    def raise_if_received(self) -> None:
        """A polling point for an interactive loop: a request since the last one, as KeyboardInterrupt.

        Raised here, in the caller's own code, rather than by the handler wherever the main thread
        happened to be (inside a library, which may catch it: one CI run lost a Ctrl-C so).
        """
        if self.signum is not None:
            self.signum = None
            raise KeyboardInterrupt

    def __enter__(self) -> StopSignal:
        if threading.current_thread() is threading.main_thread():  # the only thread Python signals
            for signum in self.signals:
                self._previous[signum] = (
                    signal.getsignal(signum) or signal.SIG_DFL
                )  # None: set outside Python
                signal.signal(signum, self._handle)
        return self

    def __exit__(self, *exc) -> None:
        for signum, previous in self._previous.items():
            signal.signal(signum, previous)
        self._previous = {}

    def _handle(self, signum, frame) -> None:
        if signum == signal.SIGINT and self.signum == signal.SIGINT:
            raise KeyboardInterrupt
        if self.signum is None:
            self.signum = signum


def pretrained_tensors(config: Config) -> dict | None:
    """The Hugging Face tensors of `train.init_from` (None when the run starts from scratch),
    refused in one line when their shape is not `config.model`'s."""
    if not config.train.init_from:
        return None
    return read_pretrained(config.train.init_from, config.model)


def generate_sample(generate: Callable, model, config: Config) -> str:
    """A sample from the trained model: up to `train.sample_tokens` tokens after `train.sample_prompt`.

    `generate` is the backend's `generate(model, prompts, new_tokens, ...)`.
    """
    t = config.train
    prompt = encode_prompt(t.sample_prompt)
    # Any length: past the context, each token sees the last block_size tokens (a sliding window).
    [tokens] = generate(model, [prompt], t.sample_tokens, temperature=0.8, top_k=200, top_p=None, seed=t.seed)
    return get_tokenizer().decode(prompt + list(tokens))
