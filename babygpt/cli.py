"""What every command-line entry point shares: one line per user error, never a traceback."""

from __future__ import annotations

import logging
import sys
from collections.abc import Callable

from babygpt.config import BabyGPTError


def run_cli(main: Callable[[], int | None]) -> None:
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    try:
        code = main()
    except BabyGPTError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        sys.exit(130)
    sys.exit(code or 0)
