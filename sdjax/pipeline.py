"""Stable Diffusion (Rombach et al. 2022, arXiv:2112.10752): text to image, image to image and
inpainting, as diffusers' ``StableDiffusionPipeline``, ``StableDiffusionImg2ImgPipeline`` and
``StableDiffusionInpaintPipeline`` run them. First the four stages of a txt2img run:

1. Encode the text. Each prompt becomes 77 CLIP token ids ([bos, tokens…, eos, pad…]; longer prompts
   are cut, with a warning), and the text encoder turns them into the context c = CLIP(ids), the
   last layer's hidden states, (77, D). The negative prompt (default "") gives the unconditional
   context c_∅ the same way.

2. Start from noise. The latent image is (h, w, 4) = (H/f, W/f, 4), f = 2^(levels − 1) the VAE's
   downsampling factor (8 for SD). Image i has its own key k_i = ``fold_in(PRNGKey(seed), i)``, split
   in two: x_T ∼ N(0, I) from the first half, the stochastic samplers' noise at evaluation j from
   ``fold_in(second half, j)`` — so image i is the same whatever the batch it is drawn in. x_T is
   scaled by the sampler's ``init_noise_sigma`` (1 for the DDPM-style samplers, σ_max or
   √(σ_max² + 1) for the σ samplers of :mod:`sdjax.samplers`).

3. Denoise with classifier-free guidance (Ho & Salimans 2022, arXiv:2207.12598). At each of the
   sampler's K evaluations the UNet predicts with and without the text, in one batched pass on
   each image's pair (x_i, x_i) with contexts (c_∅,i, c_i), and the two predictions are extrapolated
   away from the unconditional one:

       ε̂ = ε̂(x_t, t, c_∅) + w (ε̂(x_t, t, c) − ε̂(x_t, t, c_∅)),    w = guidance_scale

   (w = 1 is the conditional model alone; SD's usual w = 7.5 trades diversity for prompt fidelity.
   With w ≤ 1 the unconditional pass is skipped, as in diffusers.) The sampler turns ε̂ into the
   next x (:meth:`sdjax.samplers.Sampler.step`). The whole chain is one ``lax.scan`` in one
   ``jax.jit``, compiled once per (batch and latent shape, number of evaluations, sampler, guidance
   on/off) and reused after that: no step goes back to the host (``tests/test_speed.py`` counts the
   compilations of a second call: none).

4. Decode. SD's latents were multiplied by the VAE's ``scaling_factor`` s (0.18215) to have unit
   variance, so x̂ = Decoder(x_0 / s) ∈ [−1, 1], and the image is clip(x̂/2 + 1/2, 0, 1). With
   :meth:`StableDiffusion.enable_vae_tiling` the VAE encodes and decodes images larger than a tile in
   overlapping tiles (:func:`sdjax.models.vae.tiled`): its memory is then that of one tile.

Image to image (:meth:`StableDiffusion.img2img`) is SDEdit (Meng et al. 2021, arXiv:2108.01073): start
the chain part-way, from the image itself with noise added. The image is encoded, x_0 = s · z with z
a sample of the VAE's posterior q(z | image), and taken by the forward process,

    x_t = √ᾱ_t x_0 + √(1 − ᾱ_t) ε    (x_t = x_0 + σ_t ε for the σ samplers),    ε ∼ N(0, I),

to the noise level at which the last n = ⌊N · strength⌋ of the sampler's N steps begin, and only those
n steps are run. The noise drowns the image's fine detail but not its layout and
colours, and the model redraws the detail after the prompt: strength near 0 keeps the image, 1
redraws nearly all of it (:meth:`sdjax.samplers.Sampler.plan` with ``start``, ``Sampler.add_noise``).

Inpainting (:meth:`StableDiffusion.inpaint`) repaints where the mask m is 1 (white) and keeps the rest,
m binarised at 1/2 and taken to latent size by nearest-neighbour sampling. Two ways, by UNet:

- An inpainting UNet (SD-inpainting: 9 input channels) is shown what to keep. At every evaluation
  its input is [x_t, m, E(image ⊙ (1 − m))] along channels — the latents, the mask, and the latents
  of the image with the hole blanked (0, mid-grey) — and it was fine-tuned to fill the hole to match.
- An ordinary UNet (4 channels) is made to keep it by latent blending (Blended Latent Diffusion,
  Avrahami et al. 2023, arXiv:2206.02779): after every step the outside of the hole is reset to the
  image's own latents, noised to the level the chain has reached,

      x ← (1 − m) · (√ᾱ_{t'} x_0 + √(1 − ᾱ_{t'}) ε) + m · x    (the clean x_0 after the last step),

  so the model always sees the true surroundings and denoises the hole into agreement with them.

Both start from pure noise at strength 1, and from the noised image (as img2img) below 1.

Precision: the networks run in their parameters' dtype (float32 or bfloat16); the sampler's
arithmetic and the latents stay float32 throughout (model outputs are cast to float32).

Devices: the batch of images is split over all local devices (data parallelism over a 1-D mesh
"data", :func:`sdjax.data.loader.local_mesh`), the networks' parameters replicated on each: the chain
and the decoding of N images run N/D per device with no communication, because each image's
conditional and unconditional passes sit next to each other in the UNet's batch. A batch that D does
not divide is padded with copies of its last image, and the copies dropped at the end. On one device
this is the plain computation.
"""

from __future__ import annotations

import functools
import os
import sys
import warnings
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from sdjax import convert, lora, textual_inversion
from sdjax.data.loader import local_mesh, replicate, shard_batch
from sdjax.models.vae import DiagonalGaussian, reparameterize, tiled
from sdjax.samplers import KARRAS_SAMPLERS, SAMPLERS, Plan, Sampler
from sdjax.schedulers import NoiseSchedule

Array = jax.Array

# diffusers scheduler class → sdjax sampler name (each sampler reproduces that class; sdjax.samplers)
SCHEDULER_CLASSES = {
    "PNDMScheduler": "plms",
    "DDIMScheduler": "ddim",
    "DDPMScheduler": "ddpm",
    "EulerDiscreteScheduler": "euler",
    "EulerAncestralDiscreteScheduler": "euler_a",
    "DPMSolverMultistepScheduler": "dpmpp_2m",
    "LMSDiscreteScheduler": "lms",
    "HeunDiscreteScheduler": "heun",
}
# With no scheduler config (single files, sdjax folders): PNDM, what the SD1.x releases ship with.
DEFAULT_SAMPLER = "plms"
# diffusers' X.from_config(config) fills the keys a scheduler_config.json lacks with X's own defaults,
# not those of the class that wrote the file. These are the defaults that differ from NoiseSchedule's
# (DDPM's and DDIM's). SD1.5's file, for one, has no timestep_spacing: PNDM and DDIM read it as
# "leading", Euler, LMS, Heun and DPM-Solver as "linspace".
CLASS_DEFAULTS = {
    "ddpm": {},
    "ddim": {},
    "plms": {"set_alpha_to_one": False},
    "euler": {"timestep_spacing": "linspace"},
    "euler_a": {"timestep_spacing": "linspace"},
    "dpmpp_2m": {"timestep_spacing": "linspace"},
    "lms": {"timestep_spacing": "linspace"},
    "heun": {"timestep_spacing": "linspace", "clip_sample": False, "beta_start": 0.00085, "beta_end": 0.012},
}
OUTPUT_TYPES = ("pil", "np", "latent")


def sampler_from_config(config: dict | None, name: str | None, steps: int, eta: float) -> Sampler:
    """The :class:`Sampler` for a run: ``name`` if given, else the one of the folder's scheduler config.

    As diffusers' ``X.from_config(config)`` carries ``use_karras_sigmas`` over to the new class, the
    config's Karras setting applies to whichever sampler takes Karras σ's. Unknown names and
    scheduler classes sdjax does not reproduce are ValueErrors that list the choices.
    """
    config = config or {}
    if name is None:
        cls = config.get("_class_name")
        if cls is None:
            name = DEFAULT_SAMPLER
        elif cls not in SCHEDULER_CLASSES:
            raise ValueError(
                f"the checkpoint's scheduler is {cls}, which sdjax does not implement; "
                f"pass scheduler= one of {SAMPLERS}"
            )
        else:
            name = SCHEDULER_CLASSES[cls]
            if name == "dpmpp_2m":
                variant = (config.get("algorithm_type", "dpmsolver++"), config.get("solver_order", 2))
                if variant != ("dpmsolver++", 2):
                    raise ValueError(
                        f"the checkpoint's DPMSolverMultistepScheduler is algorithm_type={variant[0]!r}, "
                        f"solver_order={variant[1]}; sdjax implements DPM-Solver++(2M) only: pass scheduler= "
                        f"one of {SAMPLERS}"
                    )
    elif name not in SAMPLERS:
        raise ValueError(f"unknown scheduler {name!r}: expected one of {SAMPLERS}")
    karras = bool(config.get("use_karras_sigmas", False)) and name in KARRAS_SAMPLERS
    return Sampler(name, steps, eta, karras)


def schedule_for(sampler: Sampler, config: dict | None, default: NoiseSchedule) -> NoiseSchedule:
    """The noise schedule and settings ``sampler`` runs with: those of ``config`` (a diffusers
    scheduler_config.json) read as diffusers' ``X.from_config(config)`` reads them for the sampler's
    class X (:data:`CLASS_DEFAULTS`); ``default`` when there is no config."""
    if config is None:
        return default
    return NoiseSchedule.from_diffusers_config(CLASS_DEFAULTS[sampler.name] | config)


def start_step(num_inference_steps: int, strength: float) -> int:
    """The step an img2img or inpainting chain of N steps starts at: N − min(⌊N · strength⌋, N), the
    first of the last ⌊N · strength⌋ (diffusers' ``get_timesteps``). ValueError for a strength outside
    (0, 1] or one that leaves no step to run."""
    if not 0.0 < strength <= 1.0:
        raise ValueError(f"strength={strength} must be in (0, 1]: the share of the steps to redraw the image with")
    kept = min(int(num_inference_steps * strength), num_inference_steps)
    if kept < 1:
        raise ValueError(
            f"strength={strength} with num_inference_steps={num_inference_steps} runs int({num_inference_steps} · "
            f"{strength}) = 0 steps; raise strength or num_inference_steps"
        )
    return num_inference_steps - kept


def _as_list(prompt: str | list[str], what: str) -> list[str]:
    prompts = [prompt] if isinstance(prompt, str) else list(prompt)
    if not prompts or not all(isinstance(p, str) for p in prompts):
        raise ValueError(f"{what} must be a string or a non-empty list of strings, got {prompt!r}")
    return prompts


def _prompt_lists(prompt: str | list[str], negative_prompt: str | list[str] | None) -> tuple[list[str], list[str]]:
    """The prompts, and one negative prompt for each ("" by default, as diffusers)."""
    prompts = _as_list(prompt, "prompt")
    negatives = _as_list("" if negative_prompt is None else negative_prompt, "negative_prompt")
    if len(negatives) == 1:
        negatives = negatives * len(prompts)
    if len(negatives) != len(prompts):
        raise ValueError(f"{len(negatives)} negative prompts for {len(prompts)} prompts: give one, or one each")
    return prompts, negatives


def _pil_or_list_of_pil(x) -> list | None:
    """x as a list of PIL images if it is one or a list of them, else None."""
    from PIL import Image

    if isinstance(x, Image.Image):
        return [x]
    if isinstance(x, (list, tuple)) and x and all(isinstance(im, Image.Image) for im in x):
        return list(x)
    return None


def _float_array(x, what: str, shapes: str) -> np.ndarray:
    """An array of floats (or booleans) in [0, 1] as float32; ValueError naming ``what`` otherwise."""
    array = np.asarray(x)
    if not (np.issubdtype(array.dtype, np.floating) or array.dtype == bool):
        raise ValueError(
            f"{what} must be a PIL image or an array of floats in [0, 1] {shapes}; got an array of {array.dtype}"
            + (" (divide 8-bit values by 255)" if np.issubdtype(array.dtype, np.integer) else "")
        )
    array = array.astype(np.float32)
    if array.size and not (array.min() >= 0.0 and array.max() <= 1.0):
        raise ValueError(f"{what} values must be in [0, 1]; got [{array.min():g}, {array.max():g}]")
    return array


def load_images(image) -> np.ndarray:
    """``image`` as (K, H, W, 3) float32 in [0, 1]. Accepted: a PIL image (any mode, made RGB), a list of
    PIL images of one size, or a NumPy array of floats in [0, 1], (H, W, 3) or (K, H, W, 3). PIL's 8-bit
    values are divided by 255, as diffusers' ``VaeImageProcessor`` does."""
    pils = _pil_or_list_of_pil(image)
    if pils is not None:
        if len({im.size for im in pils}) > 1:
            raise ValueError(f"images of different sizes {[im.size for im in pils]}: give images of one size")
        return np.stack([np.array(im.convert("RGB")).astype(np.float32) / 255.0 for im in pils])
    array = _float_array(image, "image", "(H, W, 3) or (K, H, W, 3)")
    array = array[None] if array.ndim == 3 else array
    if array.ndim != 4 or array.shape[-1] != 3:
        raise ValueError(f"image of shape {array.shape}: expected (H, W, 3) or (K, H, W, 3), RGB")
    return array


def load_masks(mask) -> np.ndarray:
    """``mask`` as (M, H, W) float32 of 0s and 1s (1: repaint). Accepted: a PIL image (any mode, made
    grey, "L"), a list of them, or an array of floats in [0, 1], (H, W) or (M, H, W). Binarised at 1/2,
    as diffusers' mask processor does: m = 1 where the value is ≥ 0.5."""
    pils = _pil_or_list_of_pil(mask)
    if pils is not None:
        if len({im.size for im in pils}) > 1:
            raise ValueError(f"masks of different sizes {[im.size for im in pils]}: give masks of one size")
        array = np.stack([np.array(im.convert("L")).astype(np.float32) / 255.0 for im in pils])
    else:
        array = _float_array(mask, "mask", "(H, W) or (M, H, W)")
        array = array[None] if array.ndim == 2 else array
        if array.ndim != 3:
            raise ValueError(f"mask of shape {array.shape}: expected (H, W) or (M, H, W), one channel")
    return (array >= 0.5).astype(np.float32)


class Blend(NamedTuple):
    """Latent blending for a 4-channel UNet's inpainting (module docstring), arrays for :func:`_denoise`.

    mask: (N, h, w, 1) float32, 1 where the model paints. x0: (N, h, w, c) the image's latents.
    noise: (N, h, w, c) the ε that takes x0 to each noise level.
    """

    mask: Array
    x0: Array
    noise: Array


@functools.partial(jax.jit, static_argnames=("graphdef",))
def _encode_text(graphdef, state, ids: Array) -> Array:
    """ids (B, 77) int32 → context (B, 77, D) in the text encoder's dtype."""
    return nnx.merge(graphdef, state)(ids).last_hidden_state


class _Progress:
    """The progress bar of the running chain: the compiled loop ticks it from the device, one
    ``jax.debug.callback`` per model evaluation (a host call per step, negligible next to a UNet pass)."""

    bar = None

    @classmethod
    def tick(cls) -> None:
        if cls.bar is not None:
            cls.bar.update(1)


def _interactive() -> bool:
    """A terminal or a Jupyter kernel is watching: show progress bars there, not in logs and tests."""
    return "ipykernel" in sys.modules or sys.stderr.isatty()


def classifier_free_guidance(out_uncond: Array, out_cond: Array, guidance_scale) -> Array:
    """ε̂ = ε̂(x_t, t, c_∅) + w (ε̂(x_t, t, c) − ε̂(x_t, t, c_∅)) (the module docstring's step 3), for any
    prediction type: the combination is linear, so it is the same for ε, v or x_0. w = 1 is the
    conditional model alone, w = 0 the unconditional one, w > 1 extrapolates away from c_∅."""
    return out_uncond + guidance_scale * (out_cond - out_uncond)


@functools.partial(
    jax.jit, static_argnames=("graphdef", "schedule", "sampler", "guided", "progress"), donate_argnames=("x",)
)
def _denoise(
    graphdef,
    state,
    schedule: NoiseSchedule,
    sampler: Sampler,
    guided: bool,
    progress: bool,
    plan: Plan,
    x: Array,
    context: Array,
    guidance_scale: Array,
    keys: Array,
    cond: Array | None = None,
    blend: Blend | None = None,
) -> Array:
    """The sampler's K evaluations over latents ``x`` as one ``lax.scan``.

    x: (N, h, w, 4) float32, the starting latents (x_T scaled by init_noise_sigma, or a noised image);
    donated: its buffer becomes the result's.
    context: (2N, 77, D) = [c_∅,0, c_0, c_∅,1, c_1, …] (each image's pair side by side, so that a batch
    split over devices keeps pairs together) when ``guided``, else (N, 77, D) = c. keys: (N, 2) image i's
    step-noise key; step i draws N(0, I) for image n from ``fold_in(keys[n], i)``, so each image's noise
    is independent of the batch.
    cond: (N, h, w, C) channels the UNet takes after x's, the same at every evaluation (an inpainting
    UNet's mask and masked-image latents, C = 5); None for none.
    blend: latent blending after every step (:class:`Blend`); None for none.
    progress: tick :class:`_Progress` after every evaluation.
    Returns the final latents (N, h, w, 4) float32.
    """
    unet = nnx.merge(graphdef, state)
    dtype = context.dtype
    last = len(plan.timesteps) - 1

    def body(carry, i):
        x, sampler_state = carry
        x_in = sampler.model_input(plan, i, x)
        if cond is not None:
            x_in = jnp.concatenate([x_in, cond], axis=-1)
        x_in = x_in.astype(dtype)
        t = jnp.asarray(plan.timesteps)[i]
        if guided:
            # one pass on (x_0, x_0, x_1, x_1, …) with (c_∅,0, c_0, …), then ε̂ = ε̂_∅ + w (ε̂_c − ε̂_∅)
            out = unet(jnp.repeat(x_in, 2, axis=0), t, context).astype(jnp.float32)
            out = out.reshape(x.shape[0], 2, *out.shape[1:])
            out = classifier_free_guidance(out[:, 0], out[:, 1], guidance_scale)
        else:
            out = unet(x_in, t, context).astype(jnp.float32)
        noise = None
        if sampler.needs_noise:
            draw = lambda key: jax.random.normal(jax.random.fold_in(key, i), x.shape[1:], jnp.float32)  # noqa: E731
            noise = jax.vmap(draw)(keys)
        x, sampler_state = sampler.step(schedule, plan, i, out, x, sampler_state, noise)
        if blend is not None:
            # outside the mask: the image's latents at the noise level of the next evaluation, the
            # clean ones after the last (diffusers' add_noise(init_latents, noise, timesteps[i + 1]))
            known = sampler.add_noise(schedule, plan, jnp.minimum(i + 1, last), blend.x0, blend.noise)
            known = jnp.where(i < last, known, blend.x0)
            x = (1.0 - blend.mask) * known + blend.mask * x
        if progress:
            jax.debug.callback(_Progress.tick)
        return (x, sampler_state), None

    (x, _), _ = jax.lax.scan(body, (x, sampler.init_state(x)), jnp.arange(len(plan.timesteps)))
    return x


@functools.partial(jax.jit, static_argnames=("graphdef",))
def _moments(graphdef, state, images: Array) -> Array:
    """Images (B, H, W, 3) float32 in [−1, 1] → the VAE encoder's (B, H/f, W/f, 2c) float32 moments."""
    dtype = jax.tree.leaves(state)[0].dtype
    return nnx.merge(graphdef, state).moments(images.astype(dtype)).astype(jnp.float32)


@functools.partial(jax.jit, static_argnames=("graphdef",))
def _decoded(graphdef, state, z: Array) -> Array:
    """Unscaled latents (N, h, w, c) float32 → the VAE decoder's (N, h·f, w·f, 3) float32, about [−1, 1]."""
    dtype = jax.tree.leaves(state)[0].dtype
    return nnx.merge(graphdef, state).decode(z.astype(dtype)).astype(jnp.float32)


def _encode(graphdef, state, images: Array, f: int, tile: int | None) -> tuple[Array, Array]:
    """Images (B, H, W, 3) float32 in [−1, 1] → the VAE's posterior q(z | x): its mean and log-variance,
    each (B, H/f, W/f, c) float32; in tile × tile pixel windows when ``tile`` is given."""
    moments = functools.partial(_moments, graphdef, state)
    posterior = DiagonalGaussian.from_moments(
        moments(images) if tile is None else tiled(moments, images, tile=tile, tile_out=tile // f)
    )
    return posterior.mean, posterior.logvar


def _decode(graphdef, state, latents: Array, scaling_factor: float, f: int, tile: int | None) -> Array:
    """Latents (N, h, w, c) float32 → images (N, h·f, w·f, 3) float32 in [0, 1]; in windows of tile
    pixels (tile / f latents) when ``tile`` is given."""
    decoded, z = functools.partial(_decoded, graphdef, state), latents / scaling_factor
    x = decoded(z) if tile is None else tiled(decoded, z, tile=tile // f, tile_out=tile)
    return jnp.clip(x / 2 + 0.5, 0.0, 1.0)


def _caller_outside_this_module() -> int:
    """The ``stacklevel`` at which a warning raised by the caller of this function names the user's line:
    the first frame up the stack outside this file (txt2img, img2img and inpaint reach encode_prompt
    through different depths)."""
    frame, level = sys._getframe(1), 1
    while frame is not None and frame.f_code.co_filename == __file__:
        frame, level = frame.f_back, level + 1
    return level


def _image_keys(seed: int, n: int, parts: int) -> Array:
    """(parts, n, 2): image i's key ``fold_in(PRNGKey(seed), i)`` split in ``parts``, whatever n is."""
    keys = jax.vmap(lambda i: jax.random.fold_in(jax.random.PRNGKey(seed), i))(jnp.arange(n))
    return jax.vmap(lambda key: jax.random.split(key, parts), out_axes=1)(keys)


def _normal(keys: Array, shape: tuple[int, ...]) -> Array:
    """One N(0, I) draw of ``shape`` per key: keys (n, 2) → (n, *shape) float32."""
    return jax.vmap(lambda key: jax.random.normal(key, shape, jnp.float32))(keys)


def _round_up(n: int, multiple: int) -> int:
    return -(-n // multiple) * multiple


def _pad(tree, n: int):
    """Every array of ``tree`` (None leaves stay None) grown along its first axis to ``n`` rows with
    copies of its last row."""
    return jax.tree.map(lambda a: jnp.pad(a, [(0, n - len(a))] + [(0, 0)] * (a.ndim - 1), mode="edge"), tree)


def _nhwc(value, what: str, expected: tuple[int, ...]) -> Array:
    """A user's (N, C, h, w) latent-space array (diffusers' layout) as (N, h, w, C) float32, shape-checked."""
    if tuple(np.shape(value)) != expected:
        raise ValueError(f"{what} of shape {tuple(np.shape(value))}: expected {expected} (N, C, h, w)")
    return jnp.asarray(np.asarray(value, np.float32).transpose(0, 2, 3, 1))


class StableDiffusion:
    """A Stable Diffusion 1.x/2.x pipeline: txt2img (call it), :meth:`img2img`, :meth:`inpaint` (module
    docstring).

    Build it with :meth:`from_pretrained`, or from :class:`sdjax.convert.Components` directly, then
    call it with prompts. ``progress``: show a progress bar over the denoising steps (default: in a
    terminal or notebook, not in logs); turning it on or off compiles the chain once more.
    ``devices``: the devices a batch of images is split over (default None: all local devices; module
    docstring).
    """

    def __init__(self, components: convert.Components):
        self.components = components
        self.unet, self.vae, self.text_encoder = components.unet, components.vae, components.text_encoder
        self.tokenizer, self.schedule = components.tokenizer, components.schedule
        # the VAE halves H and W once per level but the last (diffusers' vae_scale_factor)
        self.vae_scale_factor = 2 ** (len(self.vae.config.block_out_channels) - 1)
        # image sizes must be multiples of 8 (diffusers' rule) and give latents the UNet can halve
        # (levels − 1) times: multiples of lcm(8, f · 2^(UNet levels − 1)) — 64 for SD itself
        self.size_multiple = int(np.lcm(8, self.vae_scale_factor * self.unet.config.downsample_factor))
        self.progress = _interactive()
        self.devices: list | None = None
        self.vae_tile: int | None = None  # pixels; see enable_vae_tiling

    @classmethod
    def from_pretrained(
        cls, path: str | os.PathLike, dtype: str | jnp.dtype = "float32", **single_file_options
    ) -> StableDiffusion:
        """Load whatever :func:`sdjax.convert.load` reads (a diffusers folder, a CompVis single file, an
        sdjax folder), the networks' parameters cast to ``dtype`` ("float32" or "bfloat16").
        ``single_file_options`` (unet=, vae=, text_encoder=, schedule=, tokenizer=) configure a single file.
        """
        dtype = jnp.dtype(dtype)
        if dtype not in (jnp.float32, jnp.bfloat16):
            raise ValueError(f"dtype={dtype.name}: expected float32 or bfloat16")
        components = convert.load(path, **single_file_options)
        if dtype != jnp.float32:
            components = components.astype(dtype)
        return cls(components)

    def enable_vae_tiling(self, tile_size: int | None = None) -> None:
        """Encode and decode images larger than ``tile_size`` pixels (default: the model's own size, 512
        for SD) in overlapping tiles, as diffusers' ``vae.enable_tiling()``: the VAE's memory becomes
        that of one tile whatever the image size, at the price of a slightly different image (each tile
        normalises on its own; the overlaps are blended, :func:`sdjax.models.vae.tiled`). ``tile_size``
        must be a multiple of 4·f (32 for SD) so that a quarter of a tile is whole pixels and latents."""
        f = self.vae_scale_factor
        tile = tile_size or self.unet.config.sample_size * f
        if tile < 4 * f or tile % (4 * f):
            raise ValueError(f"VAE tile size {tile}: use a multiple of {4 * f} (4 × the VAE's factor {f}), e.g. 512")
        self.vae_tile = tile

    def disable_vae_tiling(self) -> None:
        """Encode and decode every image whole again (the default)."""
        self.vae_tile = None

    @property
    def dtype(self) -> jnp.dtype:
        return jax.tree.leaves(nnx.state(self.unet, nnx.Param))[0].dtype

    @property
    def is_inpainting_model(self) -> bool:
        """Whether the UNet takes the mask and masked-image latents besides x (SD-inpainting's 9 channels)."""
        return self.unet.config.in_channels == 2 * self.vae.config.latent_channels + 1

    def encode_prompt(self, prompts: list[str]) -> Array:
        """Prompts → contexts (B, 77, D), warning about every prompt cut to fit 77 tokens."""
        for text in prompts:
            dropped = self.tokenizer.num_truncated(text)
            if dropped:
                lost = self.tokenizer.decode(self.tokenizer.encode(text)[-dropped:])
                warnings.warn(
                    f"prompt {text[:40]!r}{'...' if len(text) > 40 else ''} is over CLIP's "
                    f"{self.tokenizer.model_max_length} tokens: its last {dropped} tokens were dropped ({lost!r})",
                    stacklevel=_caller_outside_this_module(),
                )
        graphdef, state = nnx.split(self.text_encoder)
        prompts = textual_inversion.expand_prompt(prompts, self.tokenizer)  # multi-vector embeddings' tokens
        return _encode_text(graphdef, state, jnp.asarray(self.tokenizer(prompts)))

    def _check_size(self, name: str, value: int) -> None:
        m = self.size_multiple
        if value <= 0 or value % m:
            below, above = value // m * m, (value // m + 1) * m
            nearest = f"{below} or {above}" if below > 0 else f"{above}"
            raise ValueError(f"{name}={value} is not a multiple of {m}; the nearest valid sizes are {nearest}")

    def _check_unet(self, task: str) -> None:
        """txt2img and img2img need a UNet that takes the latents alone."""
        if self.unet.config.in_channels != self.vae.config.latent_channels:
            what = "it is an inpainting model: use inpaint()" if self.is_inpainting_model else "sdjax cannot run it"
            raise ValueError(
                f"this checkpoint's UNet takes {self.unet.config.in_channels} input channels, not the latents' "
                f"{self.vae.config.latent_channels}, so it cannot run {task}; {what}"
            )

    def _sampler(self, scheduler: str | None, steps: int, eta: float, start: int = 0):
        """(sampler, its schedule, its plan from step ``start``) for a run."""
        sampler = sampler_from_config(self.components.scheduler_config, scheduler, steps, eta)
        schedule = schedule_for(sampler, self.components.scheduler_config, self.schedule)
        return sampler, schedule, sampler.plan(schedule, start)

    def _contexts(self, prompts: list[str], negatives: list[str], copies: int, guided: bool) -> Array:
        """Each prompt's context repeated for its ``copies`` images: (N, 77, D), or under guidance each
        image's pair (c_∅,i, c_i) side by side, (2N, 77, D) (:func:`_denoise`)."""
        context = jnp.repeat(self.encode_prompt(prompts), copies, axis=0)
        if guided:
            uncond = jnp.repeat(self.encode_prompt(negatives), copies, axis=0)
            context = jnp.stack([uncond, context], axis=1).reshape(-1, *context.shape[1:])
        return context

    def _run_chain(self, schedule, sampler, guided, plan, x, context, guidance_scale, keys, cond=None, blend=None):
        """:func:`_denoise` with this pipeline's UNet, the batch split over the local devices (module
        docstring), under a progress bar when :attr:`progress` is on. Returns the final latents
        (N', h, w, 4) of the padded batch, N' = N rounded up to a multiple of the device count, sharded."""
        mesh = local_mesh(self.devices)
        n, padded = len(x), _round_up(len(x), mesh.size)
        per_image = lambda a: a.reshape(n, -1, *a.shape[1:])  # noqa: E731  (kN, …) → (N, k, …)
        x, keys, cond, blend = shard_batch(_pad((x, keys, cond, blend), padded), mesh)
        context = shard_batch(_pad(per_image(context), padded).reshape(-1, *context.shape[1:]), mesh)
        graphdef, state = nnx.split(self._replicated(self.unet, mesh))
        plan = jax.tree.map(jnp.asarray, plan)
        arrays = (plan, x, context, jnp.float32(guidance_scale), keys, cond, blend)
        if not self.progress:
            return _denoise(graphdef, state, schedule, sampler, guided, False, *arrays)
        from tqdm.auto import tqdm

        _Progress.bar = tqdm(total=len(plan.timesteps), desc=f"{sampler.name} {sampler.steps} steps")
        try:
            return jax.block_until_ready(_denoise(graphdef, state, schedule, sampler, guided, True, *arrays))
        finally:
            _Progress.bar.close()
            _Progress.bar = None

    @staticmethod
    def _replicated(module: nnx.Module, mesh) -> nnx.Module:
        """``module`` with its parameters on every device of ``mesh``, put there in place on first use
        (``jax.device_put`` returns an array already placed so as it is, so later calls copy nothing)."""
        nnx.update(module, replicate(nnx.state(module), mesh))
        return module

    def _output(self, x: Array, output_type: str, n: int):
        """Final latents (N', h, w, 4) of a padded, sharded batch → what ``output_type`` asks for (see
        :meth:`__call__`) for its first ``n`` images; the decoding runs on the devices that hold them."""
        if output_type == "latent":
            return np.asarray(x)[:n].transpose(0, 3, 1, 2)
        graphdef, state = nnx.split(self._replicated(self.vae, local_mesh(self.devices)))
        scale, f = self.vae.config.scaling_factor, self.vae_scale_factor
        images = np.asarray(_decode(graphdef, state, x, scale, f, self.vae_tile))[:n]
        if output_type == "np":
            return images
        from PIL import Image

        return [Image.fromarray(np.round(image * 255).astype(np.uint8)) for image in images]

    def __call__(
        self,
        prompt: str | list[str],
        negative_prompt: str | list[str] | None = None,
        height: int | None = None,
        width: int | None = None,
        num_inference_steps: int = 50,
        guidance_scale: float = 7.5,
        scheduler: str | None = None,
        seed: int = 0,
        num_images_per_prompt: int = 1,
        latents: np.ndarray | None = None,
        output_type: str = "pil",
        eta: float = 0.0,
    ):
        """Generate images for ``prompt`` (one string or a list).

        negative_prompt: what to steer away from, one string for all prompts or one per prompt
          (None: "", as diffusers). Used only with guidance_scale > 1.
        height, width: image size, default ``unet.config.sample_size`` · f; multiples of
          :attr:`size_multiple` (64 for SD).
        scheduler: a name of :data:`sdjax.samplers.SAMPLERS`; None: the checkpoint's own
          (:func:`sampler_from_config`). eta: DDIM's η (ddim only).
        seed: image i (prompt-major: prompt p's copies are images p·n … p·n + n − 1) starts from
          noise drawn from ``fold_in(PRNGKey(seed), i)``, whatever the batch size.
        latents: (N, 4, h, w) starting noise in diffusers' layout, N = len(prompts)·num_images_per_prompt;
          scaled by the sampler's init_noise_sigma, as diffusers does.
        output_type: "pil" → list of N PIL images; "np" → (N, H, W, 3) float32 in [0, 1];
          "latent" → the final latents (N, 4, h, w) float32, diffusers' layout.
        """
        if output_type not in OUTPUT_TYPES:
            raise ValueError(f"output_type={output_type!r}: expected one of {OUTPUT_TYPES}")
        prompts, negatives = _prompt_lists(prompt, negative_prompt)
        if num_images_per_prompt < 1:
            raise ValueError(f"num_images_per_prompt must be at least 1, got {num_images_per_prompt}")
        self._check_unet("txt2img")
        f = self.vae_scale_factor
        height = height or self.unet.config.sample_size * f
        width = width or self.unet.config.sample_size * f
        self._check_size("height", height)
        self._check_size("width", width)
        sampler, schedule, plan = self._sampler(scheduler, num_inference_steps, eta)
        guided = guidance_scale > 1.0

        # 1. text → contexts, each prompt's repeated for its images: [c_∅; c] under guidance
        n = len(prompts) * num_images_per_prompt
        context = self._contexts(prompts, negatives, num_images_per_prompt, guided)

        # 2. x_T, image i's from its own key; latents are NHWC inside sdjax
        shape = (n, height // f, width // f, self.unet.config.in_channels)
        start_keys, noise_keys = _image_keys(seed, n, 2)
        if latents is None:
            x = _normal(start_keys, shape[1:])
        else:
            x = _nhwc(latents, "latents", (n, shape[3], shape[1], shape[2]))
        x = x * plan.init_noise_sigma

        # 3. the denoising chain
        x = self._run_chain(schedule, sampler, guided, plan, x, context, guidance_scale, noise_keys)

        # 4. decode
        return self._output(x, output_type, n)

    def img2img(
        self,
        prompt: str | list[str],
        image,
        strength: float = 0.8,
        negative_prompt: str | list[str] | None = None,
        num_inference_steps: int = 50,
        guidance_scale: float = 7.5,
        scheduler: str | None = None,
        seed: int = 0,
        num_images_per_prompt: int = 1,
        output_type: str = "pil",
        eta: float = 0.0,
        noise: np.ndarray | None = None,
        vae_noise: np.ndarray | None = None,
    ):
        """Redraw ``image`` after ``prompt``, SDEdit (module docstring); diffusers' ``StableDiffusionImg2ImgPipeline``.

        image: a PIL image (made RGB), a list of PIL images of one size, or a NumPy array of floats in
          [0, 1], (H, W, 3) or (K, H, W, 3) (:func:`load_images`). H and W, the output size, must be
          multiples of :attr:`size_multiple`. Prompts and images pair up: K images and P prompts with
          K = P, or either of them 1 (shared by all).
        strength: in (0, 1], how much to redraw: the chain runs the last ⌊num_inference_steps · strength⌋
          of its steps (:func:`start_step`), from the image noised to where they begin.
        seed: image i's key ``fold_in(PRNGKey(seed), i)`` is split in four: the forward-process ε, the
          stochastic samplers' step noise, the VAE posterior's ε (the fourth is inpainting's) — image i
          is the same whatever the batch.
        noise: (N, 4, h, w) the forward process's ε in diffusers' layout, instead of drawing it from the
          seed; h = H/f, w = W/f, N = max(P, K) · num_images_per_prompt.
        vae_noise: (N, 4, h, w) the ε of the posterior sample z = μ + σ ε each image is encoded to
          (diffusers' ``latent_dist.sample()``), instead of drawing it from the seed. With ``noise``,
          what makes a run comparable with diffusers' for the same random numbers.
        The rest as :meth:`__call__`. Returns as :meth:`__call__`.
        """
        self._check_unet("img2img")
        return self._from_image(
            prompt, image, None, strength=strength, negative_prompt=negative_prompt,
            num_inference_steps=num_inference_steps, guidance_scale=guidance_scale, scheduler=scheduler, seed=seed,
            num_images_per_prompt=num_images_per_prompt, output_type=output_type, eta=eta, latents=None,
            noise=noise, vae_noise=vae_noise,
        )  # fmt: skip

    def inpaint(
        self,
        prompt: str | list[str],
        image,
        mask,
        strength: float = 1.0,
        negative_prompt: str | list[str] | None = None,
        num_inference_steps: int = 50,
        guidance_scale: float = 7.5,
        scheduler: str | None = None,
        seed: int = 0,
        num_images_per_prompt: int = 1,
        output_type: str = "pil",
        eta: float = 0.0,
        latents: np.ndarray | None = None,
        noise: np.ndarray | None = None,
        vae_noise: np.ndarray | None = None,
    ):
        """Repaint ``image`` where ``mask`` is white, after ``prompt`` (module docstring); diffusers'
        ``StableDiffusionInpaintPipeline``, with an inpainting UNet (9 input channels: the mask and the
        masked image's latents go in with x) or an ordinary one (4: latent blending).

        image: as :meth:`img2img`. mask: a PIL image (made grey, "L") or list of them, or a NumPy array
          of floats in [0, 1], (H, W) or (M, H, W), of the image's size; 1 (white) = repaint, 0 = keep,
          binarised at 0.5 (:func:`load_masks`). Prompts, images and masks pair up, each count 1 or equal.
        strength: in (0, 1]. 1: start from pure noise (the image enters only through what is kept);
          below 1: from the image noised, running the last ⌊num_inference_steps · strength⌋ steps.
        latents: (N, 4, h, w) diffusers' ``latents``: the start is latents · init_noise_sigma whatever
          the strength, and latents is also the ε of the blending. Not with ``noise``.
        noise: (N, 4, h, w) the ε diffusers draws in its ``prepare_latents``: the start is
          init_noise_sigma · ε at strength 1, the image noised with ε below; the blending's ε.
        vae_noise: (N, 4, h, w) the posterior ε of every image encoding (the image's and the masked
          image's), as :meth:`img2img`.
        seed: as :meth:`img2img`, the masked image's posterior ε from the fourth part of the key.
        The rest as :meth:`__call__`. Returns as :meth:`__call__`.
        """
        latent_channels = self.vae.config.latent_channels
        if self.unet.config.in_channels != latent_channels and not self.is_inpainting_model:
            raise ValueError(
                f"this checkpoint's UNet takes {self.unet.config.in_channels} input channels; inpainting needs "
                f"{latent_channels} (latent blending) or {2 * latent_channels + 1} (an inpainting UNet)"
            )
        if latents is not None and noise is not None:
            raise ValueError("give latents or noise, not both: as in diffusers, latents is also the blending's noise")
        return self._from_image(
            prompt, image, mask, strength=strength, negative_prompt=negative_prompt,
            num_inference_steps=num_inference_steps, guidance_scale=guidance_scale, scheduler=scheduler, seed=seed,
            num_images_per_prompt=num_images_per_prompt, output_type=output_type, eta=eta, latents=latents,
            noise=noise, vae_noise=vae_noise,
        )  # fmt: skip

    def _from_image(
        self,
        prompt,
        image,
        mask,
        *,
        strength: float,
        negative_prompt,
        num_inference_steps: int,
        guidance_scale: float,
        scheduler: str | None,
        seed: int,
        num_images_per_prompt: int,
        output_type: str,
        eta: float,
        latents,
        noise,
        vae_noise,
    ):
        """img2img (mask None) and inpaint: the arguments as theirs."""
        if output_type not in OUTPUT_TYPES:
            raise ValueError(f"output_type={output_type!r}: expected one of {OUTPUT_TYPES}")
        if num_images_per_prompt < 1:
            raise ValueError(f"num_images_per_prompt must be at least 1, got {num_images_per_prompt}")
        start = start_step(num_inference_steps, strength)
        prompts, negatives = _prompt_lists(prompt, negative_prompt)
        images = load_images(image)
        height, width = images.shape[1:3]
        self._check_size("height", height)
        self._check_size("width", width)
        masks = None if mask is None else load_masks(mask)
        if masks is not None and masks.shape[1:] != images.shape[1:3]:
            raise ValueError(
                f"the mask is {masks.shape[2]}×{masks.shape[1]} (W×H) and the image {width}×{height}: "
                "give a mask of the image's size"
            )

        # pairs: prompts, images (and masks) broadcast together, each count 1 or the largest
        counts = {"prompts": len(prompts), "images": len(images)} | ({} if masks is None else {"masks": len(masks)})
        pairs = max(counts.values())
        if any(count not in (1, pairs) for count in counts.values()):
            raise ValueError(f"{counts}: give as many of each, or one (shared by all)")
        prompts, negatives = prompts * (pairs // len(prompts)), negatives * (pairs // len(negatives))
        n = pairs * num_images_per_prompt

        def source(k: int) -> np.ndarray:
            """(N,) for each image the index of its image, mask, … among k of them (k = 1 or pairs): image i
            belongs to pair i // num_images_per_prompt."""
            return np.arange(n) // num_images_per_prompt % k

        sampler, schedule, plan = self._sampler(scheduler, num_inference_steps, eta, start)
        guided = guidance_scale > 1.0
        context = self._contexts(prompts, negatives, num_images_per_prompt, guided)

        f, c = self.vae_scale_factor, self.vae.config.latent_channels
        shape = (height // f, width // f, c)
        expected = (n, c, height // f, width // f)
        start_keys, noise_keys, image_keys, masked_keys = _image_keys(seed, n, 4)
        if latents is not None:
            eps = _nhwc(latents, "latents", expected)
        elif noise is not None:
            eps = _nhwc(noise, "noise", expected)
        else:
            eps = _normal(start_keys, shape)
        given_vae_eps = None if vae_noise is None else _nhwc(vae_noise, "vae_noise", expected)
        graphdef, state = nnx.split(self.vae)

        def encode(pixels: np.ndarray, which: np.ndarray, keys: Array) -> Array:
            """x_0 = s · z, z ∼ q(z | pixels[which[i]]) for each image i: pixels (S, H, W, 3) in [−1, 1]
            (each encoded once), which (N,) → (N, h, w, c) float32."""
            mean, logvar = _encode(graphdef, state, jnp.asarray(pixels), f, self.vae_tile)
            vae_eps = _normal(keys, shape) if given_vae_eps is None else given_vae_eps
            return self.vae.config.scaling_factor * reparameterize(mean[which], logvar[which], vae_eps)

        # the start: the image noised to the first kept step (img2img always, as diffusers; inpainting
        # below strength 1), else pure noise as txt2img's
        pixels = 2.0 * images - 1.0  # the VAE's range
        from_noise = masks is not None and (strength == 1.0 or latents is not None)
        blending = masks is not None and not self.is_inpainting_model
        x0 = encode(pixels, source(len(images)), image_keys) if blending or not from_noise else None
        x = eps * plan.init_noise_sigma if from_noise else sampler.add_noise(schedule, plan, 0, x0, eps)

        cond = blend = None
        if masks is not None:
            # the mask at latent size, as torch's interpolate(mode="nearest") takes it for a factor f:
            # the top-left pixel of each f × f block
            latent_mask = jnp.asarray(masks[:, ::f, ::f, None])[source(len(masks))]
            if blending:
                blend = Blend(latent_mask, x0, eps)
            else:
                # [x, m, E(image · (1 − m))]: the masked image's pixels are 0 (grey) in the hole
                masked = pixels * (masks[..., None] < 0.5)  # (S, H, W, 3), S = the larger of K and M
                cond = jnp.concatenate([latent_mask, encode(masked, source(len(masked)), masked_keys)], axis=-1)

        x = self._run_chain(schedule, sampler, guided, plan, x, context, guidance_scale, noise_keys, cond, blend)
        return self._output(x, output_type, n)

    # Fine-tuned additions (notebook 07, sdjax.finetune): LoRA files and textual-inversion embeddings

    def load_lora(self, path: str | os.PathLike, scale: float = 1.0) -> dict:
        """Load a LoRA file — diffusers/peft (``save_lora_weights``) or kohya/AUTOMATIC1111 layout, told apart
        by its keys — into the UNet and, if the file adapts it, the text encoder, at strength ``scale``
        (:func:`sdjax.lora.load_lora`). It replaces any LoRA loaded before. Returns the loader's report."""
        return lora.load_lora(path, self.unet, self.text_encoder, scale=scale)

    def set_lora_scale(self, scale: float) -> None:
        """The LoRA strength s: W + s · (α/r) · A B (0: the base model; no recompilation)."""
        modules = [m for m in (self.unet, self.text_encoder) if lora.lora_layers(m)]
        if not modules:
            raise ValueError("set_lora_scale: no LoRA is loaded (pipe.load_lora(path) first)")
        for module in modules:
            lora.set_lora_scale(module, scale)

    def unload_lora(self) -> None:
        """Take the LoRA out: the plain base layers back in the UNet and the text encoder."""
        lora.remove_lora(self.unet)
        lora.remove_lora(self.text_encoder)

    def load_textual_inversion(self, path: str | os.PathLike, token: str | None = None) -> list[str]:
        """Add a textual-inversion embedding (diffusers' ``learned_embeds.safetensors``/``.bin``, AUTOMATIC1111's
        ``.pt``/``.safetensors``) as a new token, usable in prompts and negative prompts; ``token`` overrides
        the name the file gives (:mod:`sdjax.textual_inversion`). Returns the tokens added."""
        embeddings = textual_inversion.load_embeddings(path, token)
        return textual_inversion.add_embeddings(self.tokenizer, self.text_encoder, embeddings)
