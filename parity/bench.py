"""`python -m parity.bench`, kept as an entry point: the benchmark lives in `babygpt_bench.bench`."""

from babygpt.cli import run_cli
from babygpt_bench.bench import main

if __name__ == "__main__":
    run_cli(main)
