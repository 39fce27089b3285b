"""Training a diffusion model and sampling from it: the simplified loss and the denoising loop.

Training (DDPM, Ho et al. 2020, arXiv:2006.11239, Algorithm 1): draw a clean image x_0, a step
t ∼ Uniform{0, …, T − 1} and noise ε ∼ N(0, I), form x_t = √ᾱ_t x_0 + √(1 − ᾱ_t) ε, and regress the
network's output on its target (ε, v or x_0 — ``schedule.prediction_type``):

    L_simple(θ) = E_{x_0, t, ε} ‖ target − f_θ(x_t, t) ‖²                                  (eq. 14)

Predicting ε is the same as predicting x_0 up to a t-dependent weight (x̂_0 follows from ε̂ through
eq. 4), but keeps the regression target of unit scale at every t, and the uniform weighting over t
drops the full bound's large weights on the nearly noiseless steps, which makes samples better.

Sampling (Algorithm 2, and DDIM, Song et al. 2020, arXiv:2010.02502): start from x_T ∼ N(0, I) and
apply a reverse step for each timestep of a descending chain — any of the eight samplers of
:mod:`sdjax.samplers` (DDPM, DDIM, PLMS, Euler, …; default DDIM with 50 steps), run by the denoising
loop of :mod:`sdjax.chain`. Its two loops run the *same* step function and give the same samples for
the same key:

* :func:`sample` — the whole chain in one ``jax.jit`` with ``lax.scan``: compiled once per
  (model, shape, sampler), then the fastest way to draw images;
* :func:`sample_loop` — a Python loop over a jitted single step, with a progress bar and a record of
  x_t and x̂_0 along the way, for watching an image emerge from the noise.

Randomness: ``key`` splits into one key for x_T and one from which step i draws its noise as
``fold_in(step_key, i)`` (:func:`step_noise`), so the two loops see identical random numbers.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from tqdm import tqdm

from sdjax import chain as chain_lib
from sdjax.samplers import DDIM, Chain, Sampler
from sdjax.schedulers import NoiseSchedule, q_sample, training_target

Array = jax.Array

DEFAULT_SAMPLER = DDIM(50)


# ---------------------------------------------------------------------------------------------------
# Training
# ---------------------------------------------------------------------------------------------------


def diffusion_loss(schedule: NoiseSchedule, *, image_key: str = "image") -> Callable:
    """The simplified loss L_simple as a :func:`sdjax.train.fit` loss: ``(model, batch, key) -> (loss, metrics)``.

    ``model(x_t, t)`` maps (B, H, W, C) and (B,) int timesteps to (B, H, W, C). ``batch[image_key]``
    holds x_0 in [−1, 1]. The loss is the mean squared error per element, so with ε-prediction an
    untrained network that outputs 0 scores 1.0 (the variance of ε) and a perfect one 0.
    """

    def loss_fn(model, batch, key):
        x0 = batch[image_key]
        key_t, key_eps = jax.random.split(key)
        t = jax.random.randint(key_t, (x0.shape[0],), 0, schedule.num_train_timesteps)
        eps = jax.random.normal(key_eps, x0.shape, jnp.float32)
        x_t = q_sample(schedule, x0, t, eps)
        target = training_target(schedule, x0, t, eps)
        prediction = model(x_t, t)
        loss = jnp.mean((prediction.astype(jnp.float32) - target) ** 2)
        return loss, {}

    return loss_fn


def reference_losses(images, schedule: NoiseSchedule) -> dict[str, float]:
    """Two yardsticks for the value of :func:`diffusion_loss` on data like ``images`` (N, H, W, C).

    "zero": the loss of a network that always outputs 0 — it knows nothing (1.0 for ε-prediction).
    "gaussian": the loss of the best predictor that knows only each pixel's mean μ_i and variance s_i²,
    i.e. the exact posterior mean if x_0 were independent Gaussian pixels. With a = ᾱ_t, the error
    of E[ε | x_t] is a s²/(a s² + 1 − a) per pixel; v = (ε − √(1 − a) x_t)/√a and
    x_0 = (x_t − √(1 − a) ε)/√a turn it into s²/(a s² + 1 − a) for v and (1 − a) s²/(a s² + 1 − a)
    for x_0. Both are averaged over pixels and uniformly over t, in float64. A network below
    "gaussian" has learned structure beyond per-pixel statistics.
    """
    x = np.asarray(images, np.float64).reshape(len(images), -1)
    s2, m2 = x.var(axis=0), np.mean(x**2, axis=0)
    a = np.asarray(schedule.alphas_cumprod, np.float64)[:, None]
    eps_error = a * s2 / (a * s2 + 1.0 - a)
    kind = schedule.prediction_type
    if kind == "epsilon":
        zero, gaussian = np.ones_like(eps_error), eps_error
    elif kind == "v_prediction":
        zero, gaussian = a + (1.0 - a) * m2, eps_error / a
    else:
        zero, gaussian = np.broadcast_to(m2, eps_error.shape), eps_error * (1.0 - a) / a
    return {"zero": float(np.mean(zero)), "gaussian": float(np.mean(gaussian))}


# ---------------------------------------------------------------------------------------------------
# Sampling
# ---------------------------------------------------------------------------------------------------


def _pixel_model(model) -> chain_lib.Model:
    """A pixel UNet as the denoising loop calls a model: ``model(x, t, extra)``, t the same for the batch."""
    return lambda x, t, extra: model(x, jnp.full((x.shape[0],), t))


def step_noise(key: Array, shape: tuple[int, ...]) -> chain_lib.Noise:
    """The stochastic samplers' z_i: N(0, I) of ``shape`` from ``fold_in(second half of key, i)``."""
    return chain_lib.noise_from_key(jax.random.split(key)[1], shape)


def initial_noise(key: Array, shape: tuple[int, ...]) -> Array:
    """x_T ∼ N(0, I) as both loops draw it: from the first half of ``key``."""
    return jax.random.normal(jax.random.split(key)[0], shape, jnp.float32)


@functools.partial(jax.jit, static_argnames=("graphdef",))
def _sample_scan(graphdef, state, chain: Chain, x_T: Array, key: Array) -> Array:
    model = _pixel_model(nnx.merge(graphdef, state))
    return chain_lib.run(model, chain, chain.start(x_T), noise=step_noise(key, x_T.shape))


@functools.partial(jax.jit, static_argnames=("graphdef",))
def _sample_one_step(graphdef, state, key: Array, chain: Chain, i, x: Array, sampler_state: dict) -> chain_lib.Step:
    """One evaluation, as :func:`_sample_scan` runs it."""
    model = _pixel_model(nnx.merge(graphdef, state))
    return chain_lib.step(model, chain, i, x, sampler_state, noise=step_noise(key, x.shape))


def _start(key, shape, x_T):
    if x_T is None:
        if shape is None:
            raise ValueError("sample: give the output shape (B, H, W, C) or the starting noise x_T")
        x_T = initial_noise(key, tuple(shape))
    return jnp.asarray(x_T, jnp.float32)


def sample(
    model,
    schedule: NoiseSchedule,
    key: Array,
    shape: tuple[int, ...] | None = None,
    *,
    sampler: Sampler = DEFAULT_SAMPLER,
    x_T: Array | None = None,
) -> Array:
    """Draw samples with the whole denoising chain compiled into one ``lax.scan`` (:func:`sdjax.chain.run`).

    ``sampler``: any of :data:`sdjax.samplers.SAMPLERS` (default DDIM, 50 steps). ``x_T`` (B, H, W, C)
    ∼ N(0, I) overrides the starting noise (otherwise drawn from ``key`` with ``shape``), which lets
    different samplers start from the same point; σ samplers scale it by their ``init_noise_sigma``.
    The network runs in whatever dtype its parameters have; the chain's arithmetic and x stay float32.
    Returns x_0, (B, H, W, C) float32.
    """
    x_T = _start(key, shape, x_T)
    graphdef, state = nnx.split(model)
    return _sample_scan(graphdef, state, sampler.chain(schedule), x_T, key)


@dataclasses.dataclass
class Trajectory:
    """What :func:`sample_loop` returns.

    samples: x_0, (B, H, W, C). steps: the recorded timesteps t (descending; fractional for σ
    samplers between training steps), and for each, x_t (what the network saw, on the DDPM scale
    √ᾱ_t x_0 + √(1 − ᾱ_t) ε) and x0_pred (its estimate x̂_0, clipped as the schedule clips it), each
    (B, H, W, C), on the host.
    """

    samples: Array
    steps: list[int]
    x_t: list[np.ndarray]
    x0_pred: list[np.ndarray]


def sample_loop(
    model,
    schedule: NoiseSchedule,
    key: Array,
    shape: tuple[int, ...] | None = None,
    *,
    sampler: Sampler = DEFAULT_SAMPLER,
    x_T: Array | None = None,
    record_every: int | None = None,
    progress: bool = True,
) -> Trajectory:
    """Draw samples one step at a time (:func:`sdjax.chain.iterate`), for teaching: same arguments and
    samples, to the bit, as :func:`sample`.

    ``record_every`` = k keeps x_t and x̂_0 of every k-th step and the last one (None: only the last).
    """
    chain = sampler.chain(schedule)
    graphdef, state = nnx.split(model)
    one_step = functools.partial(_sample_one_step, graphdef, state, key)
    traj = Trajectory(samples=chain.start(_start(key, shape, x_T)), steps=[], x_t=[], x0_pred=[])
    ts, last = np.asarray(chain.plan.timesteps), len(chain) - 1
    steps = tqdm(chain_lib.iterate(one_step, chain, traj.samples), total=len(chain), disable=not progress)
    steps.set_description(f"{sampler.name} {sampler.steps} steps")
    for i, result in enumerate(steps):
        if (record_every and i % record_every == 0) or i == last:
            traj.steps.append(float(ts[i]) if ts[i] % 1 else int(ts[i]))
            traj.x_t.append(np.asarray(result.model_input))
            traj.x0_pred.append(np.asarray(chain.predict_x0(i, traj.samples, result.model_output)))
        traj.samples = result.x
    return traj
