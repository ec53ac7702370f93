"""`python -m parity.gpu_check`, kept as an entry point: the check lives in `babygpt_bench.gpu_check`."""

from babygpt.cli import run_cli
from babygpt_bench.gpu_check import main

if __name__ == "__main__":
    run_cli(main)
