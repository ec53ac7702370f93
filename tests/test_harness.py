"""The run harness through the CLI, the same for both backends: a run directory is locked, checked
before anything is written, stopped by SIGTERM or SIGINT with a checkpoint, resumed bit for bit,
cleaned of a killed save's leftovers, and never checkpointed with non-finite weights.

Each backend gets one sequence of real `python train.py` processes on the tiny dataset, so that
the expensive start-up is paid a few times rather than once per property.
"""

from __future__ import annotations

import hashlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
OTHER = {"jax": "torch", "torch": "jax"}
HANG_GUARD = 240  # seconds; a real hang fails the test instead of the whole CI job


def _long(tiny_overrides: list[str], data_root: Path, out: Path, name: str, *extra: str) -> list[str]:
    """The tiny run at a constant learning rate, far longer than any test waits: its first steps
    are those of a short run with the same settings, so a short run is its reference."""
    return [
        *tiny_overrides,
        "train.max_steps=100000",
        "train.micro_batch_size=2",  # one micro-batch of 2 rows per device
        "train.warmup_steps=0",
        "train.min_lr=1e-2",
        "train.eval_interval=100000",
        "train.eval_steps=1",
        "train.checkpoint_interval=100000",
        f"data.data_dir={data_root}",
        f"run.out_dir={out}",
        f"run.name={name}",
        *extra,
    ]


def _env() -> dict[str, str]:
    return {**os.environ, "JAX_PLATFORMS": "cpu"}  # the eight devices of the root conftest.py


def _train(backend: str, args: list[str]) -> subprocess.CompletedProcess:
    command = [sys.executable, str(ROOT / "train.py"), f"--backend={backend}", *args]
    return subprocess.run(command, capture_output=True, text=True, env=_env(), timeout=HANG_GUARD)


def _start(backend: str, args: list[str], log: Path) -> subprocess.Popen:
    command = [sys.executable, str(ROOT / "train.py"), f"--backend={backend}", *args]
    return subprocess.Popen(command, stdout=log.open("w"), stderr=subprocess.STDOUT, text=True, env=_env())


def _wait_for_step(run_dir: Path, step: int, job: subprocess.Popen, log: Path) -> None:
    deadline = time.monotonic() + HANG_GUARD
    path = run_dir / "metrics.jsonl"
    while True:
        text = path.read_text() if path.exists() else ""
        complete = text.splitlines()[: text.count("\n")]  # the last line may be half written
        if any(json.loads(line)["step"] >= step for line in complete):
            return
        assert job.poll() is None, log.read_text()[-3000:]
        assert time.monotonic() < deadline, "training did not start"
        time.sleep(0.05)


def _losses(run_dir: Path) -> list[tuple[int, float]]:
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    return [(r["step"], r["loss"]) for r in map(json.loads, lines) if "loss" in r]


def _files(folder: Path) -> dict[str, str]:
    return {
        str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(folder.rglob("*"))
        if p.is_file()
    }


def _one_error_line(done: subprocess.CompletedProcess, *words: str) -> str:
    lines = done.stderr.strip().splitlines()
    assert done.returncode == 2 and len(lines) == 1 and lines[0].startswith("error: "), done.stderr[-3000:]
    assert all(w in lines[0] for w in words), lines[0]
    return lines[0]


def _latest(backend: str, run_dir: Path) -> int | None:
    if backend == "jax":
        from babygpt_jax.checkpoint import latest_step
    else:
        from babygpt_torch.checkpoint import latest_step
    return latest_step(run_dir)


@pytest.mark.parametrize("backend", ["jax", "torch"])
def test_run_directory_lifecycle(backend, tmp_path, tiny_dataset, tiny_overrides):
    out = tmp_path / "out"
    run_dir = out / "life"
    args = _long(tiny_overrides, tiny_dataset, out, "life")

    # A run, and while it trains a second process on the same directory: refused, naming the holder.
    log = tmp_path / "first.log"
    job = _start(backend, args, log)
    _wait_for_step(run_dir, 3, job, log)
    _one_error_line(_train(backend, ["--resume", *args]), "in use by", f"pid {job.pid}")

    # SIGTERM: every step trained is saved, and the process exits as a signalled one.
    job.send_signal(signal.SIGTERM)
    assert job.wait(HANG_GUARD) == 143, log.read_text()[-3000:]
    stopped = _latest(backend, run_dir)
    assert stopped is not None and stopped == max(s for s, _ in _losses(run_dir))
    assert f"stopped by SIGTERM after step {stopped} and saved" in log.read_text()

    # What a save killed half way leaves behind; the next start that passes its checks removes it.
    leftovers = [run_dir / "..export.x1y2", run_dir / "checkpoints" / f".step_{stopped + 9:08d}.pt.ab.tmp"]
    leftovers.append(run_dir / "checkpoints" / f"{stopped + 9}.orbax-checkpoint-tmp-123")
    for path in leftovers:
        path.mkdir() if path.suffix != ".tmp" else path.write_bytes(b"half")
    before = _files(run_dir)

    # Refused in one line, each leaving every file byte-identical: the other backend, another shape,
    # an --out_dir that is a file.
    _one_error_line(
        _train(OTHER[backend], ["--resume", *args]), f"trained by the {backend} backend", "parity.convert"
    )
    _one_error_line(_train(backend, ["--resume", *args, "model.n_embd=64"]), "does not fit")
    (tmp_path / "a-file").write_text("")
    _one_error_line(_train(backend, [*args, f"run.out_dir={tmp_path / 'a-file'}"]), "is a file")
    assert _files(run_dir) == before

    # Resume two steps: the same losses as one uninterrupted run, bit for bit; no step logged twice.
    short = [f"train.max_steps={stopped + 2}"]
    resumed = _train(backend, ["--resume", *args, *short])
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert not any(path.exists() for path in leftovers)
    reference = _train(backend, [*_long(tiny_overrides, tiny_dataset, out, "reference"), *short])
    assert reference.returncode == 0, reference.stderr[-3000:]
    assert _losses(run_dir) == _losses(out / "reference")
    assert [s for s, _ in _losses(run_dir)] == list(range(1, stopped + 3))
    assert "resume = true" not in (run_dir / "config.toml").read_text()  # the run, not the flags

    # A finished run resumed says so, and still evaluates and gives the summary.
    finished = _train(backend, ["--resume", *args, *short])
    assert finished.returncode == 0 and f"finished at step {stopped + 2}" in finished.stdout
    assert f"python inference.py --checkpoint {run_dir}" in finished.stdout

    # SIGINT (Ctrl-C) saves too, exits 130, and the log still holds every step once.
    log = tmp_path / "interrupted.log"
    job = _start(backend, ["--resume", *args], log)
    _wait_for_step(run_dir, stopped + 4, job, log)
    job.send_signal(signal.SIGINT)
    assert job.wait(HANG_GUARD) == 130, log.read_text()[-3000:]
    interrupted = _latest(backend, run_dir)
    assert f"stopped by SIGINT after step {interrupted} and saved" in log.read_text()
    assert [s for s, _ in _losses(run_dir)] == list(range(1, interrupted + 1))

    # Checkpoints without a config.toml are nobody's run to resume.
    orphan = out / "orphan"
    orphan.mkdir()
    (run_dir / "checkpoints").rename(orphan / "checkpoints")
    _one_error_line(_train(backend, ["--resume", *args[:-1], "run.name=orphan"]), "no config.toml")


@pytest.mark.parametrize("backend", ["jax", "torch"])
def test_a_refused_run_directory_is_refused_before_the_framework_loads(backend, tmp_path, tiny_overrides):
    # A run directory holding a run, asked for without --resume: train.py refuses from the files
    # alone (babygpt.harness.check_run_dir), without the seconds the backend takes to import.
    run_dir = tmp_path / "out" / "taken"
    (run_dir / "checkpoints" / "2").mkdir(parents=True)
    (run_dir / "config.toml").write_text(f'[run]\nbackend = "{backend}"\n')
    argv = [
        "train.py",
        f"--backend={backend}",
        *tiny_overrides,
        f"run.out_dir={run_dir.parent}",
        "run.name=taken",
    ]
    code = (
        f"import runpy, sys; sys.argv = {argv!r}\n"
        "try:\n    runpy.run_path('train.py', run_name='__main__')\n"
        "except SystemExit as e:\n    print(e.code, sorted({'jax', 'torch'} & set(sys.modules)))"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, env=_env())
    assert done.stdout.split() == ["2", "[]"], done.stdout + done.stderr[-3000:]
    assert "already holds a run; pass --resume" in done.stderr


@pytest.mark.parametrize(
    "group", [{"WORLD_SIZE": "2"}, {"JAX_COORDINATOR_ADDRESS": "127.0.0.1:1"}, {"SLURM_NTASKS": "4"}]
)
def test_a_process_of_a_group_leaves_the_check_to_the_group(group, tmp_path, monkeypatch, tiny_config):
    # The same taken directory that a lone process refuses at once; one of several processes must
    # not refuse alone (the others would wait for it), so the early check steps aside.
    from babygpt.config import BabyGPTError
    from babygpt.harness import check_run_dir

    (tiny_config.run_dir / "checkpoints" / "2").mkdir(parents=True)
    for name in ("WORLD_SIZE", "JAX_COORDINATOR_ADDRESS", "SLURM_NTASKS", "OMPI_COMM_WORLD_SIZE"):
        monkeypatch.delenv(name, raising=False)
    with pytest.raises(BabyGPTError, match="no config.toml"):
        check_run_dir(tiny_config)
    for name, value in group.items():
        monkeypatch.setenv(name, value)
    check_run_dir(tiny_config)


@pytest.mark.parametrize("backend", ["jax", "torch"])
def test_divergence_keeps_no_checkpoint_and_the_next_run_starts_over(
    backend, tmp_path, tiny_dataset, tiny_overrides
):
    out = tmp_path / "out"
    run_dir = out / "diverged"
    args = _long(
        tiny_overrides, tiny_dataset, out, "diverged", "train.max_steps=4", "train.checkpoint_interval=2"
    )
    done = _train(
        backend, [*args, "train.max_lr=1e30"]
    )  # finite, so the config takes it; the weights blow up
    assert done.returncode == 2 and ("non-finite" in done.stderr or "became" in done.stderr), done.stderr[
        -3000:
    ]
    assert _latest(backend, run_dir) is None and not (run_dir / "model.safetensors").exists()
    # config.toml and no checkpoint: no run to protect, so the same command starts over.
    again = _train(backend, args)
    assert again.returncode == 0, again.stderr[-3000:]
    assert "holds no checkpoint" in again.stdout + again.stderr
    assert _latest(backend, run_dir) == 4


@pytest.fixture
def small_disk(tmp_path):
    """A 192 KiB file system (tmpfs), too small for a checkpoint of the tiny model; skipped where
    this process may not mount (not root, or no CAP_SYS_ADMIN)."""
    mount = tmp_path / "small-disk"
    mount.mkdir()
    made = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=192k", "tmpfs", str(mount)], capture_output=True
    )
    if made.returncode != 0:
        pytest.skip(f"cannot mount a small tmpfs here: {made.stderr.decode().strip()}")
    yield mount
    subprocess.run(["umount", str(mount)], check=True)


@pytest.mark.parametrize("backend", ["jax", "torch"])
def test_a_full_disk_during_a_save_is_one_line(backend, small_disk, tiny_dataset, tiny_overrides):
    args = _long(tiny_overrides, tiny_dataset, small_disk, "full", "train.max_steps=2")
    done = _train(backend, args)
    assert done.returncode == 2, done.stderr[-3000:]
    assert done.stderr.count("\n") == 1 and done.stderr.startswith("error: "), done.stderr[-3000:]
    assert "free space or choose another run.out_dir" in done.stderr
    assert _latest(backend, small_disk / "full") is None


@pytest.mark.parametrize("backend", ["jax", "torch"])
def test_a_read_only_output_directory_is_one_line(backend, small_disk, tiny_dataset, tiny_overrides):
    subprocess.run(["mount", "-o", "remount,ro", str(small_disk)], check=True)  # even root cannot write
    done = _train(backend, _long(tiny_overrides, tiny_dataset, small_disk, "ro", "train.max_steps=2"))
    assert done.returncode == 2, done.stderr[-3000:]
    assert done.stderr.count("\n") == 1 and done.stderr.startswith("error: "), done.stderr[-3000:]
    assert not any(small_disk.iterdir())


# ---------------------------------------------------------------------------------------------
# the CPU runtime: torch's OpenMP workers sleep instead of spinning (issue 21)


def _spin_count_after(code: str, **env) -> str:
    clean = {k: v for k, v in os.environ.items() if k not in ("OMP_WAIT_POLICY", "GOMP_SPINCOUNT")}
    result = subprocess.run(
        [sys.executable, "-c", code + "; import os; print(os.environ.get('GOMP_SPINCOUNT', 'unset'))"],
        capture_output=True, text=True, env={**clean, **env}, cwd=ROOT,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    return result.stdout.split()[-1]


def test_importing_the_torch_backend_sets_a_short_openmp_spin_before_torch_loads():
    from babygpt.run import OPENMP_SPIN_COUNT

    code = "import babygpt_torch, sys; assert 'torch' not in sys.modules; import babygpt_torch.model"
    assert _spin_count_after(code) == OPENMP_SPIN_COUNT


def test_a_users_openmp_wait_policy_is_left_alone():
    assert _spin_count_after("import babygpt_torch.model", OMP_WAIT_POLICY="active") == "unset"
    assert _spin_count_after("import babygpt_torch.model", GOMP_SPINCOUNT="50") == "50"


def test_too_late_once_torch_is_loaded_so_nothing_is_set():
    assert _spin_count_after("import torch, babygpt_torch.model") == "unset"


def test_a_polled_ctrl_c_is_raised_once_where_the_loop_polls():
    """The REPL's Ctrl-C (StopSignal over SIGINT alone): the handler only records it; the loop's
    poll raises it, once; a second Ctrl-C before a poll raises at once; SIGTERM is left alone."""
    from babygpt.run import StopSignal

    # Whatever they were: SIGINT is SIG_IGN in a job started in the background.
    before = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}
    with StopSignal(signals=(signal.SIGINT,)) as ctrl_c:
        assert signal.getsignal(signal.SIGTERM) is before[signal.SIGTERM]
        ctrl_c.raise_if_received()  # nothing yet
        signal.raise_signal(signal.SIGINT)  # the handler runs in this (the main) thread
        assert ctrl_c.received
        with pytest.raises(KeyboardInterrupt):
            ctrl_c.raise_if_received()
        ctrl_c.raise_if_received()  # taken: not raised again
        signal.raise_signal(signal.SIGINT)
        with pytest.raises(KeyboardInterrupt):  # a second one before the poll: at once
            signal.raise_signal(signal.SIGINT)
    assert signal.getsignal(signal.SIGINT) is before[signal.SIGINT]
