"""What every command-line entry point shares: one line per user error, never a traceback."""

from __future__ import annotations

import logging
import sys
from collections.abc import Callable

from babygpt.config import BabyGPTError
from babygpt.run import Stopped


def run_cli(main: Callable[[], int | None]) -> None:
    # Our own messages at INFO; libraries only when they warn (orbax narrates every save at INFO,
    # through absl). Set here once, for every entry point, rather than in a backend.
    logging.basicConfig(level=logging.WARNING, format="%(message)s")
    for package in ("babygpt", "babygpt_jax", "babygpt_torch", "parity", "inference", "__main__"):
        logging.getLogger(package).setLevel(logging.INFO)
    for library in ("absl", "orbax", "jax"):
        logging.getLogger(library).setLevel(logging.WARNING)
    try:
        code = main()
    except BabyGPTError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        sys.exit(130)
    except Stopped as e:  # the backend has said where it stopped and how to resume
        sys.exit(e.exit_code)
    sys.exit(code or 0)
