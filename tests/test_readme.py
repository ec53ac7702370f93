"""The README, walked as a new user would: every command in its bash blocks runs as written, in order.

The walk happens in a fresh copy of the tracked files (no `out/`, no `data/`), so each command meets
what the ones before it left behind. Two things are added, both through syntax the README itself
documents: tiny step counts (`train.max_steps=...`, `train.eval_steps=...` overrides, `ARGS=` for
make) so that training takes seconds, and nothing else. A command the README marks with
`# needs: ...` (a GPU, the network, several hosts, files of your own) is listed, not run;
`make test` / `pytest` are the command running this walk.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
TINY = "train.max_steps=4 train.log_interval=2 train.eval_steps=2"  # the documented override syntax
MARKER = re.compile(r"#\s*needs:")


def readme_commands(text: str) -> list[tuple[str, str]]:
    """(command, trailing comment) for each command line of each ```bash block, in order."""
    commands = []
    for block in re.findall(r"```bash\n(.*?)```", text, flags=re.S):
        joined = re.sub(r"\\\n\s*", " ", block)  # continuation lines
        for line in joined.splitlines():
            line = line.strip()
            if not line or line.startswith("#"):
                continue
            command, comment = _split_comment(line)
            commands.append((command, comment))
    return commands


def _split_comment(line: str) -> tuple[str, str]:
    """Split at the first `#` that starts a word outside quotes."""
    in_quote = None
    for i, ch in enumerate(line):
        if in_quote:
            if ch == in_quote:
                in_quote = None
        elif ch in "'\"":
            in_quote = ch
        elif ch == "#" and (i == 0 or line[i - 1].isspace()):
            return line[:i].strip(), line[i:]
    return line, ""


TRAINS = re.compile(r"(^|\s)(train\.py|-m parity\.compare)(\s|$)")  # python, torchrun, env-prefixed
MAKE_ARGS = re.compile(r"""\bARGS=(?:'([^']*)'|"([^"]*)"|(\S+))""")


def with_tiny_steps(command: str) -> str:
    """The command as written, plus tiny step counts where it trains."""
    if command.startswith("make train"):
        given = MAKE_ARGS.search(command)
        if given is None:
            return f"{command} ARGS='{TINY}'"
        args = next(g for g in given.groups() if g is not None)  # make keeps only the last ARGS=
        return f"{command[: given.start()]}ARGS='{args} {TINY}'{command[given.end() :]}"
    if TRAINS.search(command):
        return f"{command} {TINY}"
    return command


def missing_files(command: str, repo: Path) -> list[str]:
    """The repository files a command names (scripts, `-m` modules, configs) that do not exist:
    checked for every command, so a stale name fails the walk even where it cannot run here."""
    words = command.split()
    missing = []
    for i, word in enumerate(words):
        if i and words[i - 1] == "-m":
            module = repo / word.replace(".", "/")
            if not (module.with_suffix(".py").is_file() or (module / "__main__.py").is_file()):
                if not word.startswith(("pytest", "pip", "torch.")):
                    missing.append(f"-m {word}")
        elif re.fullmatch(r"[\w./-]+\.(py|toml)", word) and not word.startswith(("out/", "data/")):
            if not (repo / word).is_file():
                missing.append(word)
    return missing


def test_readme_markers_parse():
    commands = readme_commands("```bash\nmake train   # trains\npython -m x 'a # b'  # needs: GPU\n```\n")
    assert commands == [("make train", "# trains"), ("python -m x 'a # b'", "# needs: GPU")]
    assert with_tiny_steps("make train BACKEND=torch") == f"make train BACKEND=torch ARGS='{TINY}'"
    assert with_tiny_steps("make train ARGS='run.name=q' X=1") == f"make train ARGS='run.name=q {TINY}' X=1"
    assert with_tiny_steps("make train ARGS=--resume") == f"make train ARGS='--resume {TINY}'"
    assert (
        with_tiny_steps("A=1 torchrun --nproc_per_node=2 train.py")
        == f"A=1 torchrun --nproc_per_node=2 train.py {TINY}"
    )
    assert with_tiny_steps("python prepare.py text x.txt") == "python prepare.py text x.txt"
    assert missing_files("python -m parity.nothing configs/nothing.toml train.py", ROOT) == [
        "-m parity.nothing",
        "configs/nothing.toml",
    ]


def test_every_readme_command_runs_in_order(tmp_path):
    venv = ROOT / ".venv"
    if not (venv / "bin" / ".installed").exists():
        pytest.skip("the walk runs `make`, which needs the project's .venv (make test creates it)")
    repo = tmp_path / "babygpt"
    files = subprocess.run(["git", "ls-files"], cwd=ROOT, capture_output=True, text=True, check=True)
    for name in files.stdout.splitlines():
        if (ROOT / name).is_file():
            (repo / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(ROOT / name, repo / name)  # mtimes kept: make sees the venv as up to date
    (repo / ".venv").symlink_to(venv)
    # The walk uses the virtualenv it is given (installing is `make test`'s part): make must not
    # take a pyproject.toml edited since that install for a reason to reinstall into it.
    installed = (venv / "bin" / ".installed").stat().st_mtime
    pyproject = repo / "pyproject.toml"
    if pyproject.stat().st_mtime > installed:
        os.utime(pyproject, (installed, installed))
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "XLA_FLAGS")}
    env["PATH"] = f"{venv / 'bin'}:{env['PATH']}"
    env["VIRTUAL_ENV"] = str(venv)
    skipped, ran, printed = [], [], {}
    for command, comment in readme_commands((repo / "README.md").read_text()):
        assert not missing_files(command, repo), f"the README names files that do not exist: {command}"
        if MARKER.search(comment) or command.startswith(("make test", "pytest", "source ")):
            skipped.append(command)
            continue
        line = with_tiny_steps(command)
        t0 = time.time()
        result = subprocess.run(
            ["bash", "-c", line],
            cwd=repo,
            env=env,
            stdin=subprocess.DEVNULL,  # an interactive command gets end-of-input, as from `< /dev/null`
            capture_output=True,
            text=True,
            timeout=600,
        )
        assert result.returncode == 0, (
            f"README command failed (exit {result.returncode}): {line}\n"
            f"--- stdout\n{result.stdout[-3000:]}\n--- stderr\n{result.stderr[-3000:]}"
        )
        assert "Traceback" not in result.stderr, f"{line}\n{result.stderr[-3000:]}"
        print(f"ran ({time.time() - t0:.0f} s): {line}", flush=True)
        ran.append(command)
        printed.setdefault(command, []).append(result.stdout + result.stderr)
    print(f"ran {len(ran)} README commands; marked as needing more than this CPU: {len(skipped)}")
    assert len(ran) >= 8, ran  # the walk must cover the Quickstart, Train, Sample and Parity blocks
    # `make train`, `make train BACKEND=torch`: two runs side by side; `make train` again says that
    # it continues the first, which is finished, and samples from it.
    assert (repo / "out/shakespeare-jax/model.safetensors").is_file()
    assert (repo / "out/shakespeare-torch/model.safetensors").is_file()
    first, again = printed["make train"][:2]
    assert "already holds a run" not in first and "sample from it with" in first
    assert "out/shakespeare-jax already holds a run" in again and "finished at step 4" in again
