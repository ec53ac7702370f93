"""The README, walked as a new user would: every command in its bash blocks runs as written, in order.

The walk happens in a fresh copy of the tracked files (no `out/`, no `data/`), so each command meets
what the ones before it left behind. Two things are added, both through syntax the README itself
documents: tiny step counts (`train.max_steps=...` overrides, `ARGS=` for make) so that training
takes seconds, and nothing else. A command the README marks with `# needs: ...` (a GPU, the
network, several hosts, files of your own) is listed, not run; `make test` / `pytest` are the
command running this walk.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
TINY = "train.max_steps=4 train.log_interval=2"  # the documented override syntax, nothing more
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


def with_tiny_steps(command: str) -> str:
    """The command as written, plus tiny step counts where it trains."""
    if command.startswith("make train"):
        return f"{command} ARGS='{TINY}'"
    if (
        command.startswith(("python train.py", "python -m parity.compare"))
        and "--config configs/fine" not in command
    ):
        return f"{command} {TINY}"
    return command


def test_readme_markers_parse():
    commands = readme_commands("```bash\nmake train   # trains\npython -m x 'a # b'  # needs: GPU\n```\n")
    assert commands == [("make train", "# trains"), ("python -m x 'a # b'", "# needs: GPU")]
    assert with_tiny_steps("make train BACKEND=torch") == f"make train BACKEND=torch ARGS='{TINY}'"


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
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "XLA_FLAGS")}
    env["PATH"] = f"{venv / 'bin'}:{env['PATH']}"
    env["VIRTUAL_ENV"] = str(venv)
    skipped, ran = [], []
    for command, comment in readme_commands((repo / "README.md").read_text()):
        if MARKER.search(comment) or command.startswith(("make test", "pytest", "source ")):
            skipped.append(command)
            continue
        line = with_tiny_steps(command)
        result = subprocess.run(
            ["bash", "-c", line], cwd=repo, env=env, capture_output=True, text=True, timeout=600
        )
        assert result.returncode == 0, (
            f"README command failed (exit {result.returncode}): {line}\n"
            f"--- stdout\n{result.stdout[-3000:]}\n--- stderr\n{result.stderr[-3000:]}"
        )
        assert "Traceback" not in result.stderr, f"{line}\n{result.stderr[-3000:]}"
        ran.append(command)
    print(f"ran {len(ran)} README commands; marked as needing more than this CPU: {len(skipped)}")
    assert len(ran) >= 8, ran  # the walk must cover the Quickstart, Train, Sample and Parity blocks
