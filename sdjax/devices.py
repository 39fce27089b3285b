"""Data parallelism on one host: a batch split over the local devices, parameters copied to each.

Every program sdjax runs on several devices (training, :mod:`sdjax.train`; image generation,
:mod:`sdjax.pipeline`) is the same program as on one: jit sees arrays whose first (batch) axis is
split over a one-axis mesh named "data" and parameters that are replicated, and XLA runs each device's
share of the batch with no communication but what the program itself needs (a gradient's mean).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec


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


def replicate(tree, mesh: Mesh):
    """Put a full copy of a pytree (e.g. parameters) on every device of the mesh."""
    return jax.device_put(tree, NamedSharding(mesh, PartitionSpec()))


def padded_size(n: int, mesh: Mesh) -> int:
    """n rounded up to a multiple of the mesh's device count."""
    return -(-n // mesh.size) * mesh.size


def pad_batch(tree, n: int):
    """Every array of ``tree`` (None leaves stay None) grown along its first axis to ``n`` rows with
    copies of its last row: a batch that the device count does not divide, made one it does (the
    copies' results are dropped afterwards)."""
    return jax.tree.map(lambda a: jnp.pad(a, [(0, n - len(a))] + [(0, 0)] * (a.ndim - 1), mode="edge"), tree)
