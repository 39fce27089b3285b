"""The denoising loop: a sampler's K model evaluations, for every model sdjax samples from.

One chain (:class:`sdjax.samplers.Chain`: a sampler, the noise schedule it runs on, its plan) turns a
starting x — pure noise x_T scaled by ``init_noise_sigma``, or a noised image (img2img) — into x_0.
Evaluation i shows the network the sampler's model input, and the sampler turns the network's output
into the next x:

    x, state = x_start, chain.init_state(x_start)
    for i in range(K):
        out = model(chain.model_input(i, x), chain.timestep(i), extra)        (guided: see below)
        x, state = chain.step(i, out, x, state, noise(i))                      (noise(i) ∼ N(0, I))
        x = blend(i, x)                                                        (inpainting; optional)

The same :func:`step` runs in two loops that give the same bits for the same inputs:

* :func:`run` — the whole chain as one ``lax.scan``, to be called inside ``jax.jit``: compiled once
  per (model, shapes, sampler), no step goes back to the host;
* :func:`iterate` — a Python loop over a jitted step, for watching an image emerge (it yields every
  step's x, the network's input and output).

Pixel DDPMs (:mod:`sdjax.diffusion`) and Stable Diffusion (:mod:`sdjax.pipeline`) both use them.

``model(x, t, extra)``: x (B, ...) in the sampler's model-input scale, t () float32 (the same for the
batch), ``extra`` the per-image inputs the model takes besides x, the same at every evaluation
(inpainting's mask and masked-image latents; None for none). Anything else it needs (a text context)
it closes over. Classifier-free guidance is a wrapper around such a function (:func:`guided`).

``noise(i)``: the stochastic samplers' fresh N(0, I) at evaluation i, (B, ...) float32: drawn from one
key for the batch (:func:`noise_from_key`) or from one key per image (:func:`noise_per_image`, so that
image n is the same whatever the batch it is drawn in).
"""

from __future__ import annotations

import contextlib
import sys
from collections.abc import Callable, Iterator
from typing import NamedTuple

import jax
import jax.numpy as jnp

from sdjax.samplers import Chain

Array = jax.Array
Model = Callable[[Array, Array, object], Array]
Noise = Callable[[Array], Array]


def classifier_free_guidance(out_uncond: Array, out_cond: Array, guidance_scale) -> Array:
    """ε̂ = ε̂(x_t, t, c_∅) + w (ε̂(x_t, t, c) − ε̂(x_t, t, c_∅)) (Ho & Salimans 2022, arXiv:2207.12598),
    for any prediction type: the combination is linear, so it is the same for ε, v or x_0. w = 1 is the
    conditional model alone, w = 0 the unconditional one, w > 1 extrapolates away from c_∅."""
    return out_uncond + guidance_scale * (out_cond - out_uncond)


def guided(model: Model, guidance_scale) -> Model:
    """Classifier-free guidance around ``model``: every image is evaluated twice in one batched pass,
    as the pair (x_n, x_n) — the model's context must hold each image's pair (c_∅,n, c_n) side by side,
    (2B, …) — and the two outputs are combined by :func:`classifier_free_guidance` in float32.

    ``extra`` (per image) is repeated along with x. Shapes: x (B, ...) → (B, ...) float32.
    """

    def model_fn(x: Array, t: Array, extra) -> Array:
        pairs, extra = jax.tree.map(lambda a: jnp.repeat(a, 2, axis=0), (x, extra))
        out = model(pairs, t, extra).astype(jnp.float32)
        out = out.reshape(x.shape[0], 2, *out.shape[1:])
        return classifier_free_guidance(out[:, 0], out[:, 1], guidance_scale)

    return model_fn


def noise_from_key(key: Array, shape: tuple[int, ...]) -> Noise:
    """z_i = N(0, I) of ``shape`` drawn from ``fold_in(key, i)``: one draw for the whole batch."""
    return lambda i: jax.random.normal(jax.random.fold_in(key, i), shape, jnp.float32)


def noise_per_image(keys: Array, shape: tuple[int, ...]) -> Noise:
    """z_i for image n drawn from ``fold_in(keys[n], i)``: keys (B, 2), shape one image's → (B, *shape)."""
    return lambda i: jax.vmap(lambda key: jax.random.normal(jax.random.fold_in(key, i), shape, jnp.float32))(keys)


class Blend(NamedTuple):
    """Latent blending (inpainting with an ordinary UNet, :mod:`sdjax.pipeline`): after every step the
    outside of the mask is reset to the known image's x_0, noised to the level the chain has reached.

    mask: (B, h, w, 1) float32, 1 where the model paints. x0: (B, h, w, c) the known image.
    noise: (B, h, w, c) the ε that takes x0 to each noise level.
    """

    mask: Array
    x0: Array
    noise: Array


def blend(chain: Chain, i, x: Array, b: Blend) -> Array:
    """x after evaluation i with the outside of the mask replaced by the known image at the noise level
    of the next evaluation, the clean x_0 after the last (diffusers' ``add_noise(init_latents, noise,
    timesteps[i + 1])``):  x ← (1 − m) · x_{known} + m · x."""
    last = len(chain) - 1
    known = chain.add_noise(jnp.minimum(i + 1, last), b.x0, b.noise)
    known = jnp.where(i < last, known, b.x0)
    return (1.0 - b.mask) * known + b.mask * x


class Step(NamedTuple):
    """One evaluation's result: the next x and sampler state, and what the network saw and said."""

    x: Array
    state: dict
    model_input: Array
    model_output: Array


def step(
    model: Model, chain: Chain, i, x: Array, state: dict, *, extra=None, noise: Noise | None = None, blend_with=None
) -> Step:
    """Evaluation i of ``chain`` (module docstring): the network on x, the sampler's step, the blend.

    The network runs in whatever dtype its parameters have; its output is cast to float32, so the
    step's arithmetic and x stay float32 across the chain. Shapes: x (B, ...) float32; i () int, may be
    traced. ``noise`` is needed by the stochastic samplers (``chain.needs_noise``). ``extra``: what the model
    takes besides x and t, or a function of i giving it (what changes along the chain, such as a
    ControlNet's weight at each step).
    """
    x_in = chain.model_input(i, x)
    out = model(x_in, chain.timestep(i), extra(i) if callable(extra) else extra).astype(jnp.float32)
    x_next, state = chain.step(i, out, x, state, noise(i) if chain.needs_noise else None)
    if blend_with is not None:
        x_next = blend(chain, i, x_next, blend_with)
    return Step(x_next, state, x_in, out)


def run(
    model: Model,
    chain: Chain,
    x: Array,
    *,
    extra=None,
    noise: Noise | None = None,
    blend_with: Blend | None = None,
    on_step: Callable[[], None] | None = None,
) -> Array:
    """The whole chain from the starting x as one ``lax.scan`` (call it inside ``jax.jit``); returns x_0.

    on_step: a host function called after every evaluation (``jax.debug.callback``: a progress bar).
    """

    def body(carry, i):
        x, state = carry
        result = step(model, chain, i, x, state, extra=extra, noise=noise, blend_with=blend_with)
        if on_step is not None:
            jax.debug.callback(on_step)
        return (result.x, result.state), None

    (x, _), _ = jax.lax.scan(body, (x, chain.init_state(x)), jnp.arange(len(chain)))
    return x


def iterate(one_step: Callable[[Chain, Array, Array, dict], Step], chain: Chain, x: Array) -> Iterator[Step]:
    """The chain step by step: yields the :class:`Step` of every evaluation, the last one's x being x_0.

    ``one_step(chain, i, x, state)`` is a jitted function that calls :func:`step` with the same model
    and options as a :func:`run` would; then the two loops give the same bits.
    """
    state = chain.init_state(x)
    for i in range(len(chain)):
        result = one_step(chain, jnp.int32(i), x, state)
        yield result
        x, state = result.x, result.state


class Progress:
    """The progress bar of the running chain: the compiled loop ticks it from the device, one
    ``jax.debug.callback`` per model evaluation (a host call per step, negligible next to a UNet pass)."""

    bar = None

    @classmethod
    def tick(cls) -> None:
        if cls.bar is not None:
            cls.bar.update(1)

    @classmethod
    @contextlib.contextmanager
    def shown(cls, chain: Chain, enabled: bool = True):
        """A bar over the chain's evaluations while the block runs (none when not ``enabled``)."""
        if enabled:
            from tqdm import tqdm  # text, as fit's and sample_loop's: it reads the same in a saved notebook

            cls.bar = tqdm(total=len(chain), desc=f"{chain.sampler.name} {chain.sampler.steps} steps")
        try:
            yield
        finally:
            if cls.bar is not None:
                cls.bar.close()
            cls.bar = None


def interactive() -> bool:
    """A terminal or a Jupyter kernel is watching: show progress bars there, not in logs and tests."""
    return "ipykernel" in sys.modules or sys.stderr.isatty()
