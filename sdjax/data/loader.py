"""Shuffled minibatches that are a pure function of (key, step), and data parallelism.

Which examples form the batch of global step `step` depends only on the PRNG
key, the dataset size, the batch size and `step`: epoch `e` uses the
permutation `jax.random.permutation(jax.random.fold_in(key, e), n)`. So a run
resumed from a checkpoint at step k sees exactly the batches an uninterrupted
run would have seen, with no iterator state to save.

Every epoch has `n // batch_size` full batches (the remainder is dropped), so
all batches have the same shape and a jitted train step compiles once.

Data parallelism (a batch split over the devices) is :mod:`sdjax.devices`. On several hosts each
process reads only its own rows of every batch (``rows``, from :func:`sdjax.devices.host_rows`): all
processes compute the same permutation, each indexes its data with its slice of it.
"""

from collections.abc import Iterator

import jax
import numpy as np


def num_batches(n: int, batch_size: int, drop_last: bool = True) -> int:
    """Batches per epoch: full batches only, or also a final partial one."""
    return n // batch_size if drop_last else -(-n // batch_size)


def epoch_permutation(key: jax.Array, n: int, epoch: int) -> np.ndarray:
    """The order in which epoch `epoch` visits the n examples, (n,) int."""
    return np.asarray(jax.random.permutation(jax.random.fold_in(key, epoch), n))


def batch_indices(key: jax.Array, n: int, batch_size: int, step: int) -> np.ndarray:
    """Indices of the examples in the batch of global step `step`, (batch_size,) int."""
    epoch, i = divmod(step, _batches_per_epoch(n, batch_size))
    return epoch_permutation(key, n, epoch)[i * batch_size : (i + 1) * batch_size]


def iterate_batches(
    data,
    batch_size: int,
    key: jax.Array,
    *,
    start_step: int = 0,
    num_steps: int | None = None,
    epochs: int | None = None,
    rows: slice | None = None,
) -> Iterator:
    """Yield the batches of steps start_step, start_step + 1, ...

    data is an array or a pytree (e.g. dict) of arrays sharing their first dim
    n; each batch has the same structure with leaves of first dim batch_size.
    Stops after `num_steps` batches, or at the end of epoch `epochs` counted
    from step 0 (so a resumed run stops where the original would have), or
    never if neither is given. Batch i equals `batch_indices(key, n, batch_size, i)`
    applied to every leaf. With ``rows`` (a slice of range(batch_size)) only those rows of each batch
    are read and yielded: this process's share of a global batch.
    """
    if num_steps is not None and epochs is not None:
        raise ValueError("give num_steps or epochs, not both")
    leaves = jax.tree.leaves(data)
    n = len(leaves[0])
    if any(len(leaf) != n for leaf in leaves):
        raise ValueError(f"all arrays must share their first dim, got {[len(leaf) for leaf in leaves]}")
    per_epoch = _batches_per_epoch(n, batch_size)
    if num_steps is not None:
        stop = start_step + num_steps
    elif epochs is not None:
        stop = epochs * per_epoch
    else:
        stop = None

    step, permutation, permutation_epoch = start_step, None, None
    while stop is None or step < stop:
        epoch, i = divmod(step, per_epoch)
        # Same indices as batch_indices(key, n, batch_size, step), but the
        # permutation is computed once per epoch rather than once per step.
        if epoch != permutation_epoch:
            permutation, permutation_epoch = epoch_permutation(key, n, epoch), epoch
        indices = permutation[i * batch_size : (i + 1) * batch_size]
        yield _take(data, indices if rows is None else indices[rows])
        step += 1


def _take(data, indices: np.ndarray):
    """Index the first dim of every leaf of a pytree."""
    return jax.tree.map(lambda leaf: leaf[indices], data)


def _batches_per_epoch(n: int, batch_size: int) -> int:
    per_epoch = num_batches(n, batch_size)
    if per_epoch == 0:
        raise ValueError(f"batch size {batch_size} is larger than the dataset ({n} examples)")
    return per_epoch
