"""One small training utility shared by every model in sdjax.

The pieces, in the style of Flax's examples:

* :class:`TrainState` — everything a run needs to continue: step, parameters, optimizer state, EMA
  parameters and the PRNG key. A plain pytree, so it can be jitted, sharded and saved.
* :func:`make_train_step` — a pure ``(state, batch, frozen) → (state, metrics)`` function, jitted once.
  What is trained is an nnx filter (default every ``nnx.Param``); the rest of the model — a frozen base
  under LoRA, the UNet under textual inversion — travels as ``frozen``, an argument and not a constant
  baked into the compiled program, and is neither differentiated nor stored in checkpoints.
* :func:`fit` — the loop: deterministic batches (a pure function of seed and step, see
  ``sdjax.data.loader``), data parallelism over all devices (of every host), a tqdm bar, a metrics
  history, and checkpoints that resume bit-for-bit.

A loss function has the signature ``loss_fn(model, batch, key) -> (loss, metrics)``, where ``model``
is an ``nnx.Module``, ``batch`` a dict of arrays and ``key`` a PRNG key unique to this step.

Data parallelism: the batch is split along its first axis over a 1-D device mesh (axis "data") and
the state is replicated. ``jax.jit`` sees the shardings and inserts the gradient all-reduce itself,
so the same code runs on one CPU, 8 GPUs or a TPU host. On several hosts (one process each, joined by
:func:`sdjax.devices.initialize`) the mesh spans every host's devices; each process reads only the rows
of every batch that its own devices hold, the new state and the metrics come out replicated (readable
on every host), and process 0 alone writes checkpoints, which must lie on a filesystem all hosts share.
"""

from __future__ import annotations

import dataclasses
import functools
import os
from collections.abc import Callable
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx
from jax.experimental import multihost_utils
from jax.sharding import Mesh, NamedSharding, PartitionSpec
from tqdm import tqdm

from sdjax.data.loader import iterate_batches
from sdjax.devices import global_mesh, host_rows, is_main_process, replicate, shard_host_batch, wait_for_all
from sdjax.io import read, save_tree, unflatten_like

Array = jax.Array
LossFn = Callable[[nnx.Module, dict, Array], tuple[Array, dict]]

CHECKPOINT_FORMAT = "sdjax-train-state-v1"


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class TrainState:
    """The complete state of a run. ``ema`` is None when EMA is off."""

    step: Array  # () int32, number of optimizer updates done
    params: nnx.State
    opt_state: optax.OptState
    ema: nnx.State | None
    key: Array  # (2,) uint32, the run's root PRNG key


def create_train_state(
    model: nnx.Module,
    optimizer: optax.GradientTransformation,
    seed: int,
    ema_decay: float | None,
    trainable: nnx.filterlib.Filter = nnx.Param,
):
    """Split ``model`` into its static graph, a fresh :class:`TrainState` of the ``trainable`` variables
    and the ``frozen`` rest (an empty state when everything trains). Returns (graphdef, state, frozen)."""
    graphdef, params, frozen = nnx.split(model, trainable, ...)
    if not jax.tree.leaves(params):
        raise ValueError(f"nothing to train: no variable of the model matches trainable={trainable!r}")
    params = jax.tree.map(jnp.copy, params)  # the step donates the state: keep the model's own arrays alive
    state = TrainState(
        step=jnp.zeros((), jnp.int32),
        params=params,
        opt_state=optimizer.init(params),
        ema=jax.tree.map(jnp.copy, params) if ema_decay is not None else None,
        key=jax.random.PRNGKey(seed),
    )
    return graphdef, state, frozen


def make_train_step(
    graphdef,
    loss_fn: LossFn,
    optimizer: optax.GradientTransformation,
    ema_decay: float | None,
    mesh: Mesh | None = None,
):
    """Build the jitted update ``(state, batch) → (state, metrics)``.

    One step: g = ∇_θ L(θ; batch), (u, s) = optimizer(g, s), θ ← θ + u, and optionally the
    exponential moving average θ_ema ← d·θ_ema + (1 − d)·θ, which averages out the noise of the
    last ~1/(1 − d) steps and gives smoother samples for generative models.

    With a ``mesh``, the new state and the metrics are replicated on it: a full copy on every device,
    so that each process of a multi-host run can read the metrics and the next step's state is laid out
    as this one's.
    """
    out_shardings = None if mesh is None else NamedSharding(mesh, PartitionSpec())

    def loss_of_params(params, frozen, batch, key):
        # fresh Variables at this trace level, so that layers may update their own state while they run
        # (dropout's rng count); the updates are not kept: ``frozen`` stays as it came in
        frozen = jax.tree.map(lambda a: a, frozen)
        return loss_fn(nnx.merge(graphdef, params, frozen), batch, key)

    # donate_argnums=0: the old state's buffers are reused for the new one, so a step holds one copy of
    # parameters and optimizer moments, not two (≈10 GB less at SD1.5 size with Adam in float32)
    @functools.partial(jax.jit, donate_argnums=0, out_shardings=out_shardings)
    def train_step(state: TrainState, batch: dict, frozen: nnx.State) -> tuple[TrainState, dict]:
        step_key = jax.random.fold_in(jax.random.fold_in(state.key, 1), state.step)
        (loss, metrics), grads = jax.value_and_grad(loss_of_params, has_aux=True)(
            state.params, frozen, batch, step_key
        )
        updates, opt_state = optimizer.update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
        ema = state.ema
        if ema is not None:
            ema = jax.tree.map(lambda e, p: ema_decay * e + (1.0 - ema_decay) * p, ema, params)
        new_state = TrainState(step=state.step + 1, params=params, opt_state=opt_state, ema=ema, key=state.key)
        return new_state, {"loss": loss, **metrics}

    return train_step


def data_key(state_key: Array) -> Array:
    """The key that orders the data. Batches depend only on (seed, step), so a resumed run sees the
    exact batches an uninterrupted one would."""
    return jax.random.fold_in(state_key, 0)


def save_checkpoint(path: str | os.PathLike, state: TrainState, history: dict[str, list]) -> None:
    """Atomically write the train state and metrics history to one safetensors file.

    Every process calls it; in a multi-process run process 0 writes and the others wait until it has.
    """
    host_state = jax.device_get(state)  # replicated: every process holds a full copy
    if is_main_process():
        save_tree(path, host_state, {"format": CHECKPOINT_FORMAT, "history": history})
    wait_for_all(f"sdjax checkpoint at step {int(host_state.step)}")


def restore_checkpoint(path: str | os.PathLike, template: TrainState) -> tuple[TrainState, dict[str, list]]:
    """Read a checkpoint written by :func:`save_checkpoint` into the structure of ``template``."""
    flat, meta = read(path)
    if meta.get("format") != CHECKPOINT_FORMAT:
        raise ValueError(
            f"{path} is not an sdjax training checkpoint (format {meta.get('format')!r}, expected "
            f"{CHECKPOINT_FORMAT!r}). Model weights load with sdjax.io.load_model instead."
        )
    return unflatten_like(template, flat, source=str(path)), meta["history"]


def _checkpoint_exists(path: str | os.PathLike) -> bool:
    """Whether to resume from ``path``: the same answer in every process, or a clear error."""
    exists = Path(path).exists()
    if jax.process_count() > 1:
        seen = multihost_utils.process_allgather(np.int32(exists)).tolist()
        if len(set(seen)) > 1:
            raise ValueError(
                f"checkpoint {path} exists for processes {[i for i, s in enumerate(seen) if s]} only: in a "
                "multi-process run it must lie on a filesystem every host shares (process 0 writes it)"
            )
    return exists


@dataclasses.dataclass
class FitResult:
    """What :func:`fit` returns. ``model`` holds the trained parameters, ``ema_model`` the EMA ones."""

    model: nnx.Module
    ema_model: nnx.Module | None
    state: TrainState
    history: dict[str, list]


def fit(
    model: nnx.Module,
    loss_fn: LossFn,
    data: dict[str, np.ndarray],
    *,
    steps: int,
    batch_size: int,
    optimizer: optax.GradientTransformation | None = None,
    seed: int = 0,
    ema_decay: float | None = None,
    checkpoint: str | os.PathLike | None = None,
    checkpoint_every: int | None = None,
    devices: list | None = None,
    progress: bool = True,
    desc: str = "train",
    trainable: nnx.filterlib.Filter = nnx.Param,
) -> FitResult:
    """Train ``model`` until ``steps`` optimizer updates have been made in total.

    Args:
      model: an ``nnx.Module``; updated in place with the trained parameters.
      loss_fn: ``(model, batch, key) -> (loss, metrics)``.
      data: dict of arrays sharing their first axis (e.g. ``{"image": (N, H, W, C)}``); batches are
        drawn by ``sdjax.data.iterate_batches`` (reshuffled each epoch, a pure function of seed and step).
      steps: the total number of steps of the run; with a checkpoint, training resumes where it
        stopped and runs up to ``steps``.
      batch_size: global batch, split over ``devices`` (must be divisible by their number); with several
        processes each reads only its devices' rows of it.
      optimizer: an optax transformation (default Adam, lr 1e-3).
      seed: fixes initial PRNG key, data order and every random draw of the loss.
      ema_decay: keep an exponential moving average of the parameters (e.g. 0.999).
      checkpoint: file to resume from if it exists, and to save to every ``checkpoint_every`` steps
        and at the end (by process 0; with several hosts, on a filesystem they all see).
      devices: devices for data parallelism (default: all devices, ``jax.devices()``; of every process
        in a multi-process run, see :func:`sdjax.devices.initialize`).
      trainable: the nnx filter of what is trained (default every ``nnx.Param``); the rest of the
        model stays as it is (e.g. ``sdjax.lora.LoRAParam`` trains the adapters of a frozen model).
    """
    optimizer = optimizer or optax.adam(1e-3)
    graphdef, state, frozen = create_train_state(model, optimizer, seed, ema_decay, trainable)
    history: dict[str, list] = {}
    if checkpoint is not None and _checkpoint_exists(checkpoint):
        state, history = restore_checkpoint(checkpoint, state)
    start, dkey = int(state.step), data_key(state.key)
    mesh = global_mesh(devices)
    rows = host_rows(batch_size, mesh)  # this process's share of every batch
    state, frozen = replicate(state, mesh), replicate(frozen, mesh)
    train_step = make_train_step(graphdef, loss_fn, optimizer, ema_decay, mesh)

    pending: list[tuple[int, dict]] = []  # metrics still on device: fetched in bulk, not every step

    def flush():
        for done, m in jax.device_get(pending):
            history.setdefault("step", []).append(done)
            for k, v in m.items():
                history.setdefault(k, []).append(float(v))
        pending.clear()

    batches = iterate_batches(data, batch_size, dkey, start_step=start, num_steps=max(steps - start, 0), rows=rows)
    show = progress and is_main_process()  # one bar per run, not one per host
    bar = tqdm(batches, initial=start, total=steps, desc=desc, disable=not show, mininterval=1.0)
    for done, batch in enumerate(bar, start=start + 1):
        state, metrics = train_step(state, shard_host_batch(batch, mesh, batch_size), frozen)
        pending.append((done, metrics))
        if len(pending) > 1:  # one step in flight at most, so the bar counts finished steps
            jax.block_until_ready(pending[-2][1])
        if len(pending) >= 50 or done == steps:
            flush()
            bar.set_postfix(loss=f"{history['loss'][-1]:.4g}")
        if checkpoint is not None and checkpoint_every and done % checkpoint_every == 0 and done != steps:
            flush()
            save_checkpoint(checkpoint, state, history)
    bar.close()
    if checkpoint is not None:
        save_checkpoint(checkpoint, state, history)

    nnx.update(model, state.params)
    ema_model = None
    if state.ema is not None:
        ema_model = nnx.merge(graphdef, state.ema, frozen)
    return FitResult(model=model, ema_model=ema_model, state=state, history=history)
