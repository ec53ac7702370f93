"""JAX across real processes: `jax.distributed` on localhost, two processes of two virtual CPU
devices each, against one process of four. The same losses, checkpoints that move between process
counts, a quiet process 1, and how the run ends when one process dies or fails.

Every run goes through `python train.py --backend=jax`, as a user starts it (README, "Several GPUs,
several hosts"): one process sees every device; two are told the coordinator, their number and
their id in `JAX_COORDINATOR_ADDRESS`, `JAX_NUM_PROCESSES` and `JAX_PROCESS_ID`.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from safetensors.numpy import load_file

from babygpt.data import shard_path, write_meta, write_shard
from babygpt_jax.checkpoint import latest_step

ROOT = Path(__file__).resolve().parents[1]
# Every run here takes seconds; this long is a hang, which is what these tests guard against.
HANG_GUARD = 120
# A dead or failed process is noticed after `HEARTBEAT_TIMEOUT_S` (100 s) or `SHUTDOWN_TIMEOUT_S`
# (60 s) in `babygpt_jax/parallel.py`; the failure tests shorten both to this and wait at most
# FAILURE_GUARD, shorter than either, so a run that ignored them fails the test.
FAILURE_TIMEOUT_S = 5
FAILURE_GUARD = 45
# Nothing inherited may make a process join another job (a cluster's variables, a JAX_ one):
# each test says how its processes run.
ENV = {k: v for k, v in os.environ.items() if not k.startswith(("JAX_", "SLURM_", "OMPI_"))}
ENV["JAX_PLATFORMS"] = "cpu"


def _overrides(root: Path, name: str, *extra: str) -> list[str]:
    """The tiny run: 8 sequences of 16 tokens per step, as 2 micro-steps over 4 devices."""
    return [
        "model.n_layer=2",
        "model.n_head=2",
        "model.n_embd=32",
        "model.block_size=16",
        "model.vocab_size=100",
        "train.max_steps=4",
        "train.micro_batch_size=1",
        "train.total_batch_tokens=128",
        "train.warmup_steps=2",
        "train.max_lr=1e-2",
        "train.eval_interval=2",
        "train.eval_steps=2",
        "train.checkpoint_interval=2",
        "train.log_interval=1",
        "train.sample_tokens=0",
        "data.dataset=tiny",
        f"data.data_dir={root / 'data'}",
        f"run.out_dir={root / 'out'}",
        f"run.name={name}",
        *extra,
    ]


def _long(root: Path, name: str, *extra: str) -> list[str]:
    """A run far longer than any test waits for, with nothing but training steps."""
    return _overrides(
        root,
        name,
        "train.max_steps=100000",
        "train.eval_interval=100000",
        "train.checkpoint_interval=100000",
        *extra,
    )


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Job:
    """`python train.py --backend=jax` in the background, its output in files (a pipe nobody
    reads would block it)."""

    def __init__(self, args: list[str], folder: Path, name: str, env: dict[str, str]):
        self.out, self.err = folder / f"{name}.out", folder / f"{name}.err"
        with self.out.open("w") as out, self.err.open("w") as err:
            self.proc = subprocess.Popen(
                [sys.executable, str(ROOT / "train.py"), "--backend=jax", *args],
                cwd=ROOT,
                stdout=out,
                stderr=err,
                env={**ENV, **env},
            )

    def wait(self, timeout: float = HANG_GUARD) -> int:
        try:
            return self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
            raise

    def output(self) -> str:
        return self.out.read_text() + self.err.read_text()


def _start(args: list[str], folder: Path, name: str, processes: int, devices: int, **env: str) -> list[Job]:
    """One process with `devices` devices, or `processes` of them joined through a coordinator."""
    # The session's other XLA flags (the root conftest's), with this run's device count.
    flags = re.sub(r"--xla_force_host_platform_device_count=\d+", "", os.environ.get("XLA_FLAGS", ""))
    env = {"XLA_FLAGS": f"{flags} --xla_force_host_platform_device_count={devices}".strip(), **env}
    if processes == 1:
        return [Job(args, folder, name, env)]
    port = str(_free_port())
    joined = {"JAX_COORDINATOR_ADDRESS": f"127.0.0.1:{port}", "JAX_NUM_PROCESSES": str(processes)}
    return [
        Job(args, folder, f"{name}.{p}", {**env, **joined, "JAX_PROCESS_ID": str(p)})
        for p in range(processes)
    ]


def _train(args: list[str], folder: Path, name: str, processes: int, devices: int, **env: str) -> list[Job]:
    jobs = _start(args, folder, name, processes, devices, **env)
    codes = [job.wait() for job in jobs]
    assert codes == [0] * processes, "\n".join(job.output()[-3000:] for job in jobs)
    return jobs


def _lines(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def _records(run_dir: Path) -> dict[int, dict]:
    """step -> its training line and its validation line, merged."""
    records: dict[int, dict] = {}
    for line in _lines(run_dir):
        records.setdefault(line["step"], {}).update(line)
    return records


def _same_run(
    got: dict[int, dict], expected: dict[int, dict], keys=("loss", "grad_norm", "val_loss")
) -> None:
    # The same sums, split differently over devices, processes and micro-steps: float32 rounding
    # only (gloo reduces across processes in another order than XLA within one).
    for step in got:
        for key in keys:
            if key in expected[step]:
                assert got[step][key] == pytest.approx(expected[step][key], rel=1e-5), (step, key)


def _resumable_copy(run_dir: Path, name: str, step: int) -> Path:
    """A copy of a finished run as a run killed just after its checkpoint at `step` leaves it."""
    copy = run_dir.parent / name
    shutil.copytree(run_dir, copy)
    for later in range(step + 1, latest_step(copy) + 1):
        shutil.rmtree(copy / "checkpoints" / str(later), ignore_errors=True)
    (copy / "metrics.jsonl").write_text("")
    return copy


@pytest.fixture(scope="module")
def root(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("jax-distributed")
    rng = np.random.default_rng(0)
    data = root / "data" / "tiny"
    write_shard(shard_path(data, "train", 0), rng.integers(0, 100, 3000))
    write_shard(shard_path(data, "val", 0), rng.integers(0, 100, 1000))
    write_meta(data, source="random", train_tokens=3000, val_tokens=1000)
    return root


@pytest.fixture(scope="module")
def reference(root) -> Path:
    """The tiny run in one process with four devices."""
    _train(_overrides(root, "one"), root, "one", processes=1, devices=4)
    return root / "out" / "one"


@pytest.fixture(scope="module", params=[False, True], ids=["data_parallel", "fsdp"])
def two_processes(request, root) -> tuple[Path, list[Job], bool]:
    """The same run as two processes of two devices each.

    It ends with a sample, which process 0 alone draws (and compiles for) while process 1 waits.
    A shutdown timeout of 1 s, shorter than that, shows that process 1 waits at a barrier of ours,
    not in `jax.distributed.shutdown`, which would give up on process 0 and fail the run.
    """
    fsdp = request.param
    name = "two-fsdp" if fsdp else "two"
    args = _overrides(root, name, f"train.fsdp={str(fsdp).lower()}", "train.sample_tokens=15")
    jobs = _train(args, root, name, processes=2, devices=2, JAX_SHUTDOWN_TIMEOUT_SECONDS="1")
    return root / "out" / name, jobs, fsdp


def test_two_processes_train_as_one_process_with_the_same_devices(reference, two_processes):
    run_dir, _, _ = two_processes
    got, expected = _records(run_dir), _records(reference)
    assert sorted(got) == [1, 2, 3, 4]
    _same_run(got, expected)
    # Adam divides by sqrt(v): where a gradient is near zero, round-off becomes an update of up to
    # a few 1e-6; 2e-5 absolute is 0.2% of the learning rate (as in test_jax_train).
    a, b = load_file(reference / "model.safetensors"), load_file(run_dir / "model.safetensors")
    for name in a:
        np.testing.assert_allclose(b[name], a[name], rtol=1e-4, atol=2e-5, err_msg=name)


def test_process_0_alone_logs_and_writes_the_run(two_processes):
    run_dir, (first, second), fsdp = two_processes
    lines = _lines(run_dir)
    assert [r["step"] for r in lines if "loss" in r] == [1, 2, 3, 4]  # once each: one writer
    assert [r["step"] for r in lines if "val_loss" in r] == [2, 4]
    assert latest_step(run_dir) == 4
    header = f"4 x cpu (2 processes) | {'fsdp' if fsdp else 'data parallel'}"
    assert header in first.output() and "step      4/4 | loss" in first.output()
    assert "ROMEO:" in first.output()  # the sample (configs/shakespeare.toml's prompt)
    quiet = second.output()
    assert "process 1 of 2" in quiet  # it did join, and says so
    # no header, no progress (the bar prints these lines where stdout is not a terminal), no INFO,
    # no sample
    for said in ("jax |", "step ", "loss", "attention implementation", "ROMEO:"):
        assert said not in quiet, said


def test_two_process_checkpoint_resumes_in_one_process(root, reference, two_processes):
    run_dir, _, fsdp = two_processes
    # Data parallel: the same four devices in one process. FSDP: one device, which must gather
    # every shard that the two processes wrote, and read the samples in 8 micro-steps, not 2.
    devices = 1 if fsdp else 4
    name = f"{run_dir.name}-then-one-of-{devices}"
    copy = _resumable_copy(run_dir, name, step=2)
    _train([*_overrides(root, name), "--resume"], root, name, processes=1, devices=devices)
    got = _records(copy)
    assert sorted(got) == [3, 4]
    # One device evaluates the same validation sequences as four (babygpt.data.validation_batches).
    keys = ("loss", "grad_norm", "val_loss") if devices == 4 else ("loss", "val_loss")
    _same_run(got, _records(reference), keys=keys)


def test_one_process_checkpoint_resumes_in_two_processes(root, reference):
    # Under fsdp each process restores only its own shards of the one-process checkpoint.
    copy = _resumable_copy(reference, "one-then-two", step=2)
    args = [*_overrides(root, "one-then-two", "train.fsdp=true"), "--resume"]
    _train(args, root, "one-then-two", processes=2, devices=2)
    got = _records(copy)
    assert sorted(got) == [3, 4]
    _same_run(got, _records(reference))


def _wait_for_step(run_dir: Path, step: int, jobs: list[Job]) -> None:
    """Until process 0 has logged `step`: training is under way in both processes."""
    deadline = time.monotonic() + HANG_GUARD
    path = run_dir / "metrics.jsonl"
    while not (path.exists() and any(r.get("step", 0) >= step for r in _lines(run_dir))):
        for job in jobs:
            assert job.proc.poll() is None, job.output()[-3000:]
        assert time.monotonic() < deadline, "training did not start"
        time.sleep(0.05)


def test_sigterm_to_process_1_stops_both_at_one_step_saved_and_the_run_resumes_bit_for_bit(root):
    # A constant learning rate, so that a short run with the same settings is the long run's
    # reference. Only process 1 is signalled: process 0 learns of it at the step boundary.
    constant = ("train.warmup_steps=0", "train.min_lr=1e-2")
    jobs = _start(_long(root, "stopped", *constant), root, "stopped", processes=2, devices=2)
    first, second = jobs
    _wait_for_step(root / "out" / "stopped", 2, jobs)
    second.proc.send_signal(signal.SIGTERM)
    assert [job.wait() for job in jobs] == [143, 143], "\n".join(job.output()[-3000:] for job in jobs)
    stopped = latest_step(root / "out" / "stopped")
    assert stopped == max(_records(root / "out" / "stopped"))  # every step trained is saved
    assert f"stopped by SIGTERM after step {stopped} and saved" in first.output()
    assert "stopped by SIGTERM" not in second.output()  # one line, from process 0

    short = _overrides(root, "stopped", *constant, f"train.max_steps={stopped + 2}")
    _train([*short, "--resume"], root, "resumed", processes=2, devices=2)
    reference = _overrides(root, "uninterrupted", *constant, f"train.max_steps={stopped + 2}")
    _train(reference, root, "uninterrupted", processes=2, devices=2)
    got, expected = _lines(root / "out" / "stopped"), _lines(root / "out" / "uninterrupted")
    assert [r["loss"] for r in got if "loss" in r] == [r["loss"] for r in expected if "loss" in r]


def test_when_process_1_dies_process_0_exits_too(root):
    # SIGKILL: no handler runs, the process is gone (out of memory, a lost host); the coordinator
    # notices the missing heartbeats.
    sig = signal.SIGKILL
    name = signal.Signals(sig).name.lower()
    timeouts = {
        k: str(FAILURE_TIMEOUT_S) for k in ("JAX_HEARTBEAT_TIMEOUT_SECONDS", "JAX_SHUTDOWN_TIMEOUT_SECONDS")
    }
    jobs = _start(_long(root, name), root, name, processes=2, devices=2, **timeouts)
    first, second = jobs
    try:
        _wait_for_step(root / "out" / name, 2, jobs)
        second.proc.send_signal(sig)
        assert first.wait(timeout=FAILURE_GUARD) != 0
        assert second.wait(timeout=FAILURE_GUARD) != 0
    finally:
        for job in jobs:
            job.proc.kill()
