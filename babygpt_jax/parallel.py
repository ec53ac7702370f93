"""Multi-device and multi-host JAX: one `Mesh`, sharding annotations, `jax.distributed`.

The mirror of `babygpt_torch/parallel.py`, where each process holds a replica and DDP averages
gradients. Here one process drives all its local devices, and parallelism is declared rather than
programmed: the batch is sharded over every device, the parameters are replicated (data parallel)
or split over the "fsdp" axis, and `jax.jit` inserts the collectives these layouts imply.
"""

from __future__ import annotations

import importlib.util
import logging
import os
import sys
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.experimental import multihost_utils
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from babygpt.config import Config
from babygpt.memory import host_memory
from babygpt.run import cluster_tasks, keep_freed_host_memory

log = logging.getLogger(__name__)

MESH_AXES = ("data", "fsdp")
BATCH_AXES = MESH_AXES  # every device takes its own rows of each micro-step

# How long the others wait for a process that stopped sending heartbeats (killed, crashed, its
# host lost) before they fail too. jax's default, which some users already find too short for
# hosts that stall for a while (jax-ml/jax#23599).
HEARTBEAT_TIMEOUT_S = 100
# How long a process leaving the run waits for the others in `jax.distributed.shutdown` (also called
# at exit). A finished run arrives together (`shutdown` starts with a barrier): the wait runs out
# only when a process failed while the others were blocked in a collective with it.
SHUTDOWN_TIMEOUT_S = 60


def setup_distributed() -> None:
    """Join the other processes of a multi-host run, or run alone; then set up this process.

    `JAX_COORDINATOR_ADDRESS`, `JAX_PROCESS_ID` and `JAX_NUM_PROCESSES` describe the run (under
    SLURM or Open MPI with several tasks, `jax.distributed` reads the cluster itself);
    `JAX_HEARTBEAT_TIMEOUT_SECONDS` and `JAX_SHUTDOWN_TIMEOUT_SECONDS` replace the timeouts above.
    A CPU gets glibc settings that keep large freed blocks for reuse (`keep_freed_host_memory`).
    Must run before anything touches a device.
    """
    coordinator = os.environ.get("JAX_COORDINATOR_ADDRESS")
    rank = int(os.environ.get("JAX_PROCESS_ID", 0))
    world_size = int(os.environ.get("JAX_NUM_PROCESSES", 1))
    # jax picks its platform when first touched: asked for, or CPU when no accelerator plugin is installed
    plugin = importlib.util.find_spec("jax_plugins") or importlib.util.find_spec("libtpu")
    cpu = (jax.config.jax_platforms or ("" if plugin else "cpu")).startswith("cpu")
    if cpu:  # before XLA's CPU runtime starts its threads, which allocate the big blocks
        keep_freed_host_memory(one_arena=True)
    cluster = cluster_tasks() > 1
    heartbeat = int(os.environ.get("JAX_HEARTBEAT_TIMEOUT_SECONDS", HEARTBEAT_TIMEOUT_S))
    patience = int(os.environ.get("JAX_SHUTDOWN_TIMEOUT_SECONDS", SHUTDOWN_TIMEOUT_S))
    if (coordinator or cluster) and not jax.distributed.is_initialized():
        # Given a coordinator, the variables say who is who; in a cluster, jax asks the cluster.
        given = dict(coordinator_address=coordinator, num_processes=world_size, process_id=rank)
        group = dict(heartbeat_timeout_seconds=heartbeat, shutdown_timeout_seconds=patience)
        jax.distributed.initialize(**(given if coordinator else {}), **group)
        devices = (jax.process_index(), jax.process_count(), jax.local_device_count())
        log.info("process %d of %d, %d local devices", *devices)
    # Process 0 narrates the run; the others speak only to warn.
    if jax.process_count() > 1 and jax.process_index() > 0:
        for package in ("babygpt", "babygpt_jax"):
            logging.getLogger(package).setLevel(logging.WARNING)


def is_main_process() -> bool:
    return jax.process_index() == 0


def make_mesh(config: Config) -> Mesh:
    """All devices as a (data, fsdp) grid, (n, 1) or with fsdp (1, n), in process order: process p's
    devices form one block, so its rows of the global batch are the one block its loader reads."""
    devices = sorted(jax.devices(), key=lambda d: (d.process_index, d.id))
    n = len(devices)
    shape = (1, n) if config.train.fsdp else (n, 1)
    return Mesh(np.asarray(devices).reshape(shape), MESH_AXES)


def batch_sharding(mesh: Mesh) -> NamedSharding:
    """Batches are (micro_steps, rows, T): the rows split over every device of the mesh."""
    return NamedSharding(mesh, P(None, BATCH_AXES))


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, P())


def param_shardings(mesh: Mesh, params, fsdp: bool):
    """A sharding per leaf of `params` (or of anything shaped like it, e.g. the optimizer state):
    replicated, or with FSDP split along the largest dimension the "fsdp" axis divides (if any)."""
    size = mesh.shape["fsdp"]

    def sharding(x) -> NamedSharding:
        if not fsdp or size == 1:
            return replicated(mesh)
        dims = [d for d in sorted(range(x.ndim), key=lambda d: -x.shape[d]) if x.shape[d] % size == 0]
        if not dims:
            return replicated(mesh)
        spec = [None] * len(x.shape)
        spec[dims[0]] = "fsdp"
        return NamedSharding(mesh, P(*spec))

    return jax.tree.map(sharding, params)


def shard_model(params, mesh: Mesh, fsdp: bool):
    """The parameters placed on `mesh`: whole on every device (data parallel) or split (FSDP).

    Each process fills its own devices' shards; nothing is wrapped, the arrays carry their layout.
    Returns the placed parameters and their shardings, which `jax.jit` keeps in and out of the
    step. Place the optimizer state after: `param_shardings` of its shape lays it out the same.
    """
    shardings = param_shardings(mesh, params, fsdp)
    return put_global(params, shardings), shardings


def put_global(tree, shardings):
    """Host values that every process holds alike, as global arrays laid out by `shardings`: built
    from a callback, so that every process fills its own shards (`jax.device_put` reaches only its own)."""

    def put(x, sharding):
        if jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key):  # typed keys travel as their data
            return jax.random.wrap_key_data(
                put(jax.random.key_data(x), sharding), impl=jax.random.key_impl(x)
            )
        host = np.asarray(x)
        return jax.make_array_from_callback(host.shape, sharding, lambda index: host[index])

    return jax.tree.map(put, tree, shardings)


def make_global_batch(local, sharding: NamedSharding):
    """The global batch from this process's rows (an array, or a tuple of them such as x, y).

    Each process passes only the rows it read; the result is one array over every device.
    """
    if isinstance(local, tuple):
        return tuple(make_global_batch(a, sharding) for a in local)
    # Each process's rows become its own devices' shards of one array.
    return jax.make_array_from_process_local_data(sharding, local)


def make_host_copy(model: nnx.Module, mesh: Mesh) -> Callable:
    """A function returning the whole model on process 0 (None elsewhere), for export and sampling.

    The parameters, sharded over devices and processes, are gathered whole onto every device (a
    collective every process must join), then copied into `model`'s Variables on the host, where
    the export and `generate` read them.
    """
    # A jitted identity whose output is replicated: jit inserts the all-gathers.
    gather = jax.jit(lambda p: p, out_shardings=replicated(mesh))

    def host_copy(params) -> nnx.Module | None:
        weights = jax.device_get(gather(params))
        if is_main_process():
            nnx.update(model, weights)
        return model if is_main_process() else None

    return host_copy


def all_finite(params) -> bool:
    """Whether every parameter is finite, on every process: one reduction over the global arrays,
    one read back to the host (not one per parameter, each compiled for its shape)."""
    return bool(_all_finite(params))


@jax.jit
def _all_finite(params) -> jax.Array:
    return jnp.stack([jnp.isfinite(p).all() for p in jax.tree.leaves(params)]).all()


def any_process(flag: bool) -> bool:
    """True on every process if it is True on any: how the processes agree to stop at the same step."""
    if jax.process_count() == 1:
        return flag
    local = np.array([flag])
    votes = multihost_utils.process_allgather(local)  # every process's flag, on every process
    return bool(np.any(votes))


def barrier(name: str) -> None:
    """Wait for every process, e.g. while process 0 prepares the dataset the others will read."""
    if jax.process_count() > 1:
        multihost_utils.sync_global_devices(name)


def shutdown() -> None:
    """Leave a multi-process run together: only after a finished or an agreed stop, never a failure.

    The barrier keeps a process from leaving while process 0 still samples or exports: jax's own
    shutdown at exit would give up on it after SHUTDOWN_TIMEOUT_S and fail the run.
    """
    if jax.process_count() > 1:
        barrier("shutdown")
        jax.distributed.shutdown()


def device_memory() -> tuple[int, str]:
    """(bytes one device may use, its platform): on a GPU what XLA's allocator may take (75% of it
    unless XLA_PYTHON_CLIENT_MEM_FRACTION says otherwise), on a CPU the host's RAM shared by this
    process's (virtual) devices. An allocator that keeps no statistics (the VMM allocator, which
    XLA's SKIP_TEMP command-buffer mode selects) gives no limit: then no run is refused beforehand,
    and XLA's own out-of-memory error is the one the user sees."""
    device = jax.devices()[0]
    if device.platform != "cpu":
        limit = (device.memory_stats() or {}).get("bytes_limit", sys.maxsize)
        return int(limit), device.platform
    return host_memory() // jax.local_device_count(), "cpu"


def peak_memory_gib(device) -> float | None:
    """The most `device` has held at once, in GiB, as XLA's allocator counts it; None on a CPU and
    where the allocator keeps no count."""
    if device.platform == "cpu":
        return None
    peak = (device.memory_stats() or {}).get("peak_bytes_in_use")
    return None if peak is None else peak / 2**30
