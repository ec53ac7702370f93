"""Multi-device and multi-host JAX: one `Mesh`, sharding annotations, `jax.distributed`.

The mirror of `babygpt_torch/parallel.py`, where each process holds a replica and DDP averages
gradients. Here one process drives all its local devices, and parallelism is declared rather than
programmed: the batch is sharded over every device, the parameters are replicated (data parallel)
or split over the "fsdp" axis, and `jax.jit` inserts the collectives these layouts imply.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.experimental import multihost_utils
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from babygpt.config import Config

log = logging.getLogger(__name__)

MESH_AXES = ("data", "fsdp")
BATCH_AXES = MESH_AXES  # every device takes its own rows of each micro-step

# How long the others wait for a process that stopped sending heartbeats (killed, crashed, its
# host lost) before they fail too. jax's default, which some users already find too short for
# hosts that stall for a while (jax-ml/jax#23599).
HEARTBEAT_TIMEOUT_S = 100
# How long a process leaving the run waits for the others in `jax.distributed.shutdown`, which jax
# also calls at exit. A finished run arrives there together (`shutdown` below starts with a
# barrier), so the wait runs out only when one process failed while the others were blocked in a
# collective with it; then they all fail after this long, rather than after jax's 5 minutes.
SHUTDOWN_TIMEOUT_S = 60


def setup_distributed() -> None:
    """Join the other processes of a multi-host run, or run alone.

    `JAX_COORDINATOR_ADDRESS`, `JAX_PROCESS_ID` and `JAX_NUM_PROCESSES` describe the run
    explicitly; under SLURM or Open MPI with several tasks, `jax.distributed` reads the cluster
    itself. `JAX_HEARTBEAT_TIMEOUT_SECONDS` and `JAX_SHUTDOWN_TIMEOUT_SECONDS` replace the two
    timeouts above (the tests shorten them). Must run before anything touches a device.
    """
    if jax.distributed.is_initialized():
        return
    timeouts = dict(
        heartbeat_timeout_seconds=int(os.environ.get("JAX_HEARTBEAT_TIMEOUT_SECONDS", HEARTBEAT_TIMEOUT_S)),
        shutdown_timeout_seconds=int(os.environ.get("JAX_SHUTDOWN_TIMEOUT_SECONDS", SHUTDOWN_TIMEOUT_S)),
    )
    if coordinator := os.environ.get("JAX_COORDINATOR_ADDRESS"):
        jax.distributed.initialize(
            coordinator_address=coordinator,
            num_processes=int(os.environ["JAX_NUM_PROCESSES"]),
            process_id=int(os.environ["JAX_PROCESS_ID"]),
            **timeouts,
        )
    elif int(os.environ.get("SLURM_NTASKS", 1)) > 1 or int(os.environ.get("OMPI_COMM_WORLD_SIZE", 1)) > 1:
        jax.distributed.initialize(**timeouts)
    else:
        return
    log.info(
        "process %d of %d, %d local devices",
        jax.process_index(),
        jax.process_count(),
        jax.local_device_count(),
    )
    if jax.process_index() > 0:  # process 0 narrates the run; the others speak only to warn
        for package in ("babygpt", "babygpt_jax"):
            logging.getLogger(package).setLevel(logging.WARNING)


def is_main_process() -> bool:
    return jax.process_index() == 0


def make_mesh(config: Config) -> Mesh:
    """All devices, in process order, as a (data, fsdp) grid: (n, 1) data parallel, (1, n) with fsdp.

    Process p's devices form one contiguous block, so its rows of the global batch are one
    contiguous block too, the rows its loader reads.
    """
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
    """A sharding per leaf of `params` (or of anything shaped like it, e.g. the optimizer state).

    Data parallel: everything replicated. FSDP: each array split along its largest dimension that
    the "fsdp" axis divides; arrays with no such dimension (small biases, scalars) replicated.
    """
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


def put_global(tree, shardings):
    """Host values that every process holds alike, as global arrays laid out by `shardings`.

    `jax.device_put` only reaches this process's devices; building each array from a callback
    lets every process fill its own shards, on one host or many.
    """

    def put(x, sharding):
        if jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key):  # typed keys travel as their data
            return jax.random.wrap_key_data(
                put(jax.random.key_data(x), sharding), impl=jax.random.key_impl(x)
            )
        host = np.asarray(x)
        return jax.make_array_from_callback(host.shape, sharding, lambda index: host[index])

    return jax.tree.map(put, tree, shardings)


def make_global_batch(local, sharding: NamedSharding):
    """Global arrays from every process's rows (an array, or a tuple of them, as x, y): each process
    passes only the rows it read."""
    return jax.tree.map(lambda a: jax.make_array_from_process_local_data(sharding, a), local)


def make_host_copy(model: nnx.Module, mesh: Mesh) -> Callable:
    """A function from the parameters to the whole model on process 0 (None elsewhere), for the
    export and the sample.

    Parameters sharded over processes are gathered whole onto every device by a jitted identity
    (a collective every process must join), then copied into `model`'s Variables on the host.
    """
    gather = jax.jit(lambda p: p, out_shardings=replicated(mesh))

    def host_copy(params) -> nnx.Module | None:
        weights = jax.device_get(gather(params))
        if not is_main_process():
            return None
        nnx.update(model, weights)
        return model

    return host_copy


def all_finite(params) -> bool:
    """Whether every parameter is finite, on every process: a jitted reduction over global arrays."""
    return bool(_all_finite(params))


@jax.jit
def _all_finite(params) -> jax.Array:
    return jnp.all(jnp.stack([jnp.isfinite(x).all() for x in jax.tree.leaves(params)]))


def any_process(flag: bool) -> bool:
    """True on every process if it is True on any: how the processes agree to stop at the same step."""
    if jax.process_count() == 1:
        return flag
    votes = multihost_utils.process_allgather(np.array([flag]))
    return bool(np.any(votes))


def barrier(name: str) -> None:
    """Wait for every process, e.g. while process 0 prepares the dataset the others will read."""
    if jax.process_count() > 1:
        multihost_utils.sync_global_devices(name)


def shutdown() -> None:
    """Leave a multi-process run once every process is done (process 0 may still be sampling)."""
    if jax.process_count() > 1:
        barrier("shutdown")
        jax.distributed.shutdown()
