"""Files written so that nobody ever sees half of one: a temporary name beside the target, then a rename.

Shards, checkpoints, exports and downloads all go through `atomic_open`, so a killed process leaves
either the old file or the new one, never a complete-looking partial one. The temporaries are made
with the usual mode (0o666 / 0o777 less the umask), not `tempfile`'s private 0o600 / 0o700, because
the rename keeps the mode: a run or a data set shared with colleagues must stay readable by them.
"""

from __future__ import annotations

import contextlib
import os
import secrets
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import BinaryIO

from babygpt.config import BabyGPTError


def _unique(parent: Path, prefix: str, suffix: str, create) -> Path:
    """A new name in `parent` made by `create(path)`, retried on the (unlikely) collision."""
    for _ in range(100):
        path = parent / f"{prefix}{secrets.token_hex(4)}{suffix}"
        try:
            create(path)
        except FileExistsError:
            continue
        return path
    raise FileExistsError(f"no free temporary name in {parent}")


@contextlib.contextmanager
def atomic_open(path: str | Path) -> Iterator[BinaryIO]:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    # O_EXCL with mode 0o666: the kernel applies the umask, as for any ordinary new file.
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_BINARY", 0)
    fds = []
    tmp = _unique(path.parent, f".{path.name}.", ".tmp", lambda p: fds.append(os.open(p, flags, 0o666)))
    try:
        with os.fdopen(fds[0], "wb") as f:
            yield f
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)  # gone already after a successful rename


def staging_dir(path: str | Path) -> Path:
    """A new empty hidden directory beside `path` (mode 0o777 less the umask), to build it in whole."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    return _unique(path.parent, f".{path.name}.", ".tmp", lambda p: p.mkdir(0o777))


def umask() -> int:
    """The process's umask, read without changing it where Linux shows it, else set and put back."""
    with contextlib.suppress(OSError):
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def set_usual_mode(path: str | Path) -> None:
    """The mode a new file (0o666) or directory (0o777) gets under the umask, for what a library
    or `tempfile` created private (safetensors writes 0o600, `mkdtemp` makes 0o700)."""
    os.chmod(path, (0o777 if Path(path).is_dir() else 0o666) & ~umask())


def require_space(path: str | Path, nbytes: int) -> None:
    """One line, before writing, when the disk under `path` cannot hold `nbytes` more.

    For writers whose own failure on a full disk is a screenful (orbax's background threads).
    """
    free = shutil.disk_usage(path).free
    if free < nbytes:
        raise BabyGPTError(
            f"{path} has {free / 2**20:,.0f} MiB free but this save needs about {nbytes / 2**20:,.0f} MiB;"
            " free space or choose another run.out_dir"
        )
