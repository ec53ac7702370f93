"""Set before any test module (tests/ and parity/ alike) imports jax, and inherited by every
subprocess the tests start: one JAX compilation cache for the whole test session.

The suite runs `train.py`, `inference.py` and the README's commands as fresh processes, each of
which compiles the same small train and decode steps again; on a 2-core CPU the compiles are most
of their time. JAX's persistent cache serves the compiled executables of the earlier processes
(measured: `tests/test_harness.py::test_run_directory_lifecycle[jax]` 122 s -> 87 s). It is a
fresh directory per session, so no result of an earlier session or of another checkout is reused.
Under pytest-xdist the controller sets it before it starts the workers, which inherit it: one cache
for all of them.
"""

from __future__ import annotations

import atexit
import os
import shutil
import tempfile

# Eight virtual CPU devices for the sharding tests, before any test module imports jax; every
# subprocess inherits them (a multi-process test gives each process its own count, keeping the rest).
# LLVM at -O0 for XLA's CPU kernels: the tests' models are tiny, so optimising the generated code is
# most of each compile and saves nothing when it runs (tests/test_jax_distributed.py: 373 -> 266
# CPU-s). The README walk and the bench test drop XLA_FLAGS, running as a user's commands do.
os.environ.setdefault(
    "XLA_FLAGS", "--xla_force_host_platform_device_count=8 --xla_backend_optimization_level=0"
)
os.environ.setdefault("JAX_PLATFORMS", "cpu")

if "JAX_COMPILATION_CACHE_DIR" not in os.environ:
    cache = tempfile.mkdtemp(prefix="babygpt-test-jax-cache-")
    atexit.register(shutil.rmtree, cache, ignore_errors=True)
    os.environ["JAX_COMPILATION_CACHE_DIR"] = cache
    os.environ["JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS"] = "0"  # the tiny steps compile in < 1 s
    os.environ["JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES"] = "0"


# The longest tests start first: under pytest-xdist (`make test` runs two or more workers) the
# suite ends when its slowest worker does, and a five-minute test handed out last would run alone.
SLOW_FIRST = (
    "tests/test_readme.py::test_every_readme_command_runs_in_order",
    "tests/test_harness.py::test_run_directory_lifecycle",
    "tests/test_jax_distributed.py::test_sigterm_to_process_1",
    "tests/test_compare_nanogpt.py",
)


def pytest_collection_modifyitems(config, items):
    def rank(item):
        return next(
            (i for i, prefix in enumerate(SLOW_FIRST) if item.nodeid.startswith(prefix)), len(SLOW_FIRST)
        )

    items.sort(key=rank)  # stable: every other test keeps its order
