"""Data parallelism: a batch split over the devices, parameters copied to each; on one host or many.

Every program sdjax runs on several devices (training, :mod:`sdjax.train`; image generation,
:mod:`sdjax.pipeline`) is the same program as on one: jit sees arrays whose first (batch) axis is
split over a one-axis mesh named "data" and parameters that are replicated, and XLA runs each device's
share of the batch with no communication but what the program itself needs (a gradient's mean).

Several hosts (a TPU pod, a GPU cluster) run the same program as one: JAX's multi-controller runtime
starts one Python process per host (:func:`initialize`, a wrapper of ``jax.distributed.initialize``),
after which ``jax.devices()`` lists the D devices of all P processes and ``jax.local_devices()`` the
D/P of this one. :func:`global_mesh` puts them on one "data" axis, process by process, so a global
batch of B rows is cut into D blocks of B/D rows and process p's devices hold one contiguous slice of
B/P rows, :func:`host_rows`. Each process reads only those rows from its data and
:func:`shard_host_batch` assembles the global array from the P local pieces
(``jax.make_array_from_process_local_data``); no process ever holds the whole batch. Replicated values
(parameters, the loss, every scalar metric) have a full copy on each device, so any process can read them.
With one process all of this is single-host data parallelism: ``jax.devices() == jax.local_devices()``.
"""

from __future__ import annotations

import os

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import multihost_utils
from jax.sharding import Mesh, NamedSharding, PartitionSpec


def initialize(
    coordinator_address: str | None = None,
    num_processes: int | None = None,
    process_id: int | None = None,
    *,
    local_device_ids: list[int] | None = None,
    timeout_s: int = 300,
) -> None:
    """Join this process to a multi-process JAX run; call it on every host before any other JAX work.

    Arguments left out are read from the environment: ``JAX_COORDINATOR_ADDRESS`` ("host:port" of
    process 0, which also serves there), ``JAX_NUM_PROCESSES`` and ``JAX_PROCESS_ID``; what is still
    unset is detected by JAX on Cloud TPU, Slurm, Open MPI and Kubernetes. On CPU the processes' devices
    talk through gloo (jax's default CPU collectives). ``timeout_s`` bounds the wait for the other processes.
    """
    coordinator_address = coordinator_address or os.environ.get("JAX_COORDINATOR_ADDRESS")
    num_processes = _int_from_env("JAX_NUM_PROCESSES") if num_processes is None else num_processes
    process_id = _int_from_env("JAX_PROCESS_ID") if process_id is None else process_id
    try:
        jax.distributed.initialize(
            coordinator_address,
            num_processes,
            process_id,
            local_device_ids=local_device_ids,
            initialization_timeout=timeout_s,
        )
    except ValueError as error:
        raise ValueError(
            f"{error} Give coordinator_address, num_processes and process_id to sdjax.devices.initialize, or set "
            "JAX_COORDINATOR_ADDRESS, JAX_NUM_PROCESSES and JAX_PROCESS_ID (detected on Cloud TPU, Slurm, Open MPI)."
        ) from error


def _int_from_env(name: str) -> int | None:
    value = os.environ.get(name)
    if value is None or value == "":
        return None
    try:
        return int(value)
    except ValueError:
        raise ValueError(f"environment variable {name}={value!r} is not an integer; set it to e.g. 0") from None


def global_mesh(devices=None) -> Mesh:
    """A one-axis mesh named "data" over ``devices`` (default: every process's devices, ``jax.devices()``),
    ordered process by process, so that each process's devices hold one contiguous block of a batch.
    With one process this is :func:`local_mesh`."""
    devices = jax.devices() if devices is None else list(devices)
    return Mesh(np.array(sorted(devices, key=lambda d: d.process_index)), ("data",))


def local_mesh(devices=None) -> Mesh:
    """A one-axis mesh named "data" over ``devices`` (default: this host's devices)."""
    devices = jax.local_devices() if devices is None else list(devices)
    return Mesh(np.array(devices), ("data",))


def shard_batch(batch, mesh: Mesh):
    """Put a pytree of arrays on the mesh, each split along its first (batch) axis; None leaves stay None."""
    n_devices = mesh.shape["data"]
    sharding = NamedSharding(mesh, PartitionSpec("data"))

    def put(leaf):
        if leaf.shape[0] % n_devices:
            multiple = -(-leaf.shape[0] // n_devices) * n_devices
            raise ValueError(
                f"batch size {leaf.shape[0]} is not divisible by the {n_devices} devices in the "
                f"mesh; use a batch size that is a multiple of {n_devices} (e.g. {multiple})"
            )
        return jax.device_put(leaf, sharding)

    return jax.tree.map(put, batch)


def host_rows(batch_size: int, mesh: Mesh) -> slice:
    """The rows of a global batch of ``batch_size`` that this process's devices of ``mesh`` hold.

    Device k of the mesh holds rows [k·B/D, (k+1)·B/D); this process's devices must be one run of the
    mesh (as in :func:`global_mesh`), so their rows are one slice of B·(its devices)/D rows.
    """
    n_devices = mesh.shape["data"]
    if batch_size % n_devices:
        raise ValueError(
            f"batch size {batch_size} is not divisible by the {n_devices} devices in the mesh; use a batch "
            f"size that is a multiple of {n_devices} (e.g. {-(-batch_size // n_devices) * n_devices})"
        )
    mine = [k for k, d in enumerate(mesh.devices.flat) if d.process_index == jax.process_index()]
    if not mine:
        raise ValueError(
            f"the mesh has no device of process {jax.process_index()}: in a multi-process run every process "
            "trains, so give devices of every process (default jax.devices())"
        )
    if mine != list(range(mine[0], mine[-1] + 1)):
        raise ValueError(
            f"process {jax.process_index()}'s devices are not next to each other in the mesh (positions {mine}); "
            "build it with sdjax.devices.global_mesh, which orders the devices process by process"
        )
    per_device = batch_size // n_devices
    return slice(mine[0] * per_device, (mine[-1] + 1) * per_device)


def shard_host_batch(batch, mesh: Mesh, batch_size: int):
    """The global batch (first axis ``batch_size``, split on the mesh) from this process's rows of it,
    ``host_rows(batch_size, mesh)``: a pytree of arrays (None leaves stay None) whose first axis holds
    exactly those rows. Every process calls it with its own rows, at the same step."""
    rows = host_rows(batch_size, mesh)
    sharding = NamedSharding(mesh, PartitionSpec("data"))

    def put(leaf):
        if leaf.shape[0] != rows.stop - rows.start:
            raise ValueError(
                f"this process holds rows {rows.start}:{rows.stop} of a batch of {batch_size}, so its part of "
                f"the batch has {rows.stop - rows.start} rows, not {leaf.shape[0]}; read them with "
                "iterate_batches(..., rows=host_rows(batch_size, mesh))"
            )
        return jax.make_array_from_process_local_data(sharding, np.asarray(leaf), (batch_size, *leaf.shape[1:]))

    return jax.tree.map(put, batch)


def is_main_process() -> bool:
    """True in process 0, the one that writes files (checkpoints) in a multi-process run."""
    return jax.process_index() == 0


def wait_for_all(name: str) -> None:
    """Block until every process has reached the barrier called ``name`` (nothing to wait for with one)."""
    if jax.process_count() > 1:
        multihost_utils.sync_global_devices(name)


def replicate(tree, mesh: Mesh):
    """Put a full copy of a pytree (e.g. parameters) on every device of the mesh. With several processes,
    each passes the same values (the same seed, the same checkpoint) and fills its own devices."""
    return jax.device_put(tree, NamedSharding(mesh, PartitionSpec()))


def padded_size(n: int, mesh: Mesh) -> int:
    """n rounded up to a multiple of the mesh's device count."""
    return -(-n // mesh.size) * mesh.size


def pad_batch(tree, n: int):
    """Every array of ``tree`` (None leaves stay None) grown along its first axis to ``n`` rows with
    copies of its last row: a batch that the device count does not divide, made one it does (the
    copies' results are dropped afterwards)."""
    return jax.tree.map(lambda a: jnp.pad(a, [(0, n - len(a))] + [(0, 0)] * (a.ndim - 1), mode="edge"), tree)
