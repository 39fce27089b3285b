"""Text to image with Stable Diffusion: the four stages of a txt2img run, as diffusers'
``StableDiffusionPipeline`` runs them (Rombach et al. 2022, arXiv:2112.10752).

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
   [x; x] with contexts [c_∅; c], and the two predictions are extrapolated away from the
   unconditional one:

       ε̂ = ε̂(x_t, t, c_∅) + w (ε̂(x_t, t, c) − ε̂(x_t, t, c_∅)),    w = guidance_scale

   (w = 1 is the conditional model alone; SD's usual w = 7.5 trades diversity for prompt fidelity.
   With w ≤ 1 the unconditional pass is skipped, as in diffusers.) The sampler turns ε̂ into the
   next x (:meth:`sdjax.samplers.Sampler.step`). The whole chain is one ``lax.scan`` in one
   ``jax.jit``, compiled once per (batch and latent shape, number of evaluations, sampler, guidance
   on/off) and reused after that.

4. Decode. SD's latents were multiplied by the VAE's ``scaling_factor`` s (0.18215) to have unit
   variance, so x̂ = Decoder(x_0 / s) ∈ [−1, 1], and the image is clip(x̂/2 + 1/2, 0, 1).

Precision: the networks run in their parameters' dtype (float32 or bfloat16); the sampler's
arithmetic and the latents stay float32 throughout (model outputs are cast to float32).
"""

from __future__ import annotations

import functools
import os
import warnings

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from sdjax import convert
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


def _as_list(prompt: str | list[str], what: str) -> list[str]:
    prompts = [prompt] if isinstance(prompt, str) else list(prompt)
    if not prompts or not all(isinstance(p, str) for p in prompts):
        raise ValueError(f"{what} must be a string or a non-empty list of strings, got {prompt!r}")
    return prompts


@functools.partial(jax.jit, static_argnames=("graphdef",))
def _encode_text(graphdef, state, ids: Array) -> Array:
    """ids (B, 77) int32 → context (B, 77, D) in the text encoder's dtype."""
    return nnx.merge(graphdef, state)(ids).last_hidden_state


@functools.partial(jax.jit, static_argnames=("graphdef", "schedule", "sampler", "guided"))
def _denoise(
    graphdef,
    state,
    schedule: NoiseSchedule,
    sampler: Sampler,
    guided: bool,
    plan: Plan,
    x: Array,
    context: Array,
    guidance_scale: Array,
    keys: Array,
) -> Array:
    """The sampler's K evaluations over latents ``x`` as one ``lax.scan``.

    x: (N, h, w, 4) float32, already scaled by init_noise_sigma. context: (2N, 77, D) = [c_∅; c] when
    ``guided``, else (N, 77, D) = c. keys: (N, 2) image i's step-noise key; step i draws N(0, I) for
    image n from ``fold_in(keys[n], i)``, so each image's noise is independent of the batch.
    Returns the final latents (N, h, w, 4) float32.
    """
    unet = nnx.merge(graphdef, state)
    dtype = context.dtype

    def body(carry, i):
        x, sampler_state = carry
        x_in = sampler.model_input(plan, i, x).astype(dtype)
        t = jnp.asarray(plan.timesteps)[i]
        if guided:
            # one pass on [x; x] with [c_∅; c], then ε̂ = ε̂_∅ + w (ε̂_c − ε̂_∅)
            out = unet(jnp.concatenate([x_in, x_in]), t, context).astype(jnp.float32)
            out_uncond, out_cond = jnp.split(out, 2)
            out = out_uncond + guidance_scale * (out_cond - out_uncond)
        else:
            out = unet(x_in, t, context).astype(jnp.float32)
        noise = None
        if sampler.needs_noise:
            draw = lambda key: jax.random.normal(jax.random.fold_in(key, i), x.shape[1:], jnp.float32)  # noqa: E731
            noise = jax.vmap(draw)(keys)
        x, sampler_state = sampler.step(schedule, plan, i, out, x, sampler_state, noise)
        return (x, sampler_state), None

    (x, _), _ = jax.lax.scan(body, (x, sampler.init_state(x)), jnp.arange(len(plan.timesteps)))
    return x


@functools.partial(jax.jit, static_argnames=("graphdef",))
def _decode(graphdef, state, latents: Array, scaling_factor: float) -> Array:
    """Latents (N, h, w, 4) float32 → images (N, h·f, w·f, 3) float32 in [0, 1]."""
    vae = nnx.merge(graphdef, state)
    dtype = jax.tree.leaves(state)[0].dtype
    x = vae.decode((latents / scaling_factor).astype(dtype)).astype(jnp.float32)
    return jnp.clip(x / 2 + 0.5, 0.0, 1.0)


class StableDiffusion:
    """A Stable Diffusion 1.x/2.x text-to-image pipeline (module docstring).

    Build it with :meth:`from_pretrained`, or from :class:`sdjax.convert.Components` directly, then
    call it with prompts.
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

    @property
    def dtype(self) -> jnp.dtype:
        return jax.tree.leaves(nnx.state(self.unet, nnx.Param))[0].dtype

    def encode_prompt(self, prompts: list[str]) -> Array:
        """Prompts → contexts (B, 77, D), warning about every prompt cut to fit 77 tokens."""
        for text in prompts:
            dropped = self.tokenizer.num_truncated(text)
            if dropped:
                lost = self.tokenizer.decode(self.tokenizer.encode(text)[-dropped:])
                warnings.warn(
                    f"prompt {text[:40]!r}{'...' if len(text) > 40 else ''} is over CLIP's "
                    f"{self.tokenizer.model_max_length} tokens: its last {dropped} tokens were dropped ({lost!r})",
                    stacklevel=3,
                )
        graphdef, state = nnx.split(self.text_encoder)
        return _encode_text(graphdef, state, jnp.asarray(self.tokenizer(prompts)))

    def _check_size(self, name: str, value: int) -> None:
        m = self.size_multiple
        if value <= 0 or value % m:
            below, above = value // m * m, (value // m + 1) * m
            nearest = f"{below} or {above}" if below > 0 else f"{above}"
            raise ValueError(f"{name}={value} is not a multiple of {m}; the nearest valid sizes are {nearest}")

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
        prompts = _as_list(prompt, "prompt")
        negatives = _as_list("" if negative_prompt is None else negative_prompt, "negative_prompt")
        if len(negatives) == 1:
            negatives = negatives * len(prompts)
        if len(negatives) != len(prompts):
            raise ValueError(f"{len(negatives)} negative prompts for {len(prompts)} prompts: give one, or one each")
        if num_images_per_prompt < 1:
            raise ValueError(f"num_images_per_prompt must be at least 1, got {num_images_per_prompt}")
        f = self.vae_scale_factor
        height = height or self.unet.config.sample_size * f
        width = width or self.unet.config.sample_size * f
        self._check_size("height", height)
        self._check_size("width", width)
        sampler = sampler_from_config(self.components.scheduler_config, scheduler, num_inference_steps, eta)
        schedule = schedule_for(sampler, self.components.scheduler_config, self.schedule)
        plan = sampler.plan(schedule)
        guided = guidance_scale > 1.0

        # 1. text → contexts, each prompt's repeated for its images: [c_∅; c] under guidance
        n = len(prompts) * num_images_per_prompt
        context = jnp.repeat(self.encode_prompt(prompts), num_images_per_prompt, axis=0)
        if guided:
            uncond = jnp.repeat(self.encode_prompt(negatives), num_images_per_prompt, axis=0)
            context = jnp.concatenate([uncond, context])

        # 2. x_T, image i's from its own key; latents are NHWC inside sdjax
        shape = (n, height // f, width // f, self.unet.config.in_channels)
        image_keys = jax.vmap(lambda i: jax.random.fold_in(jax.random.PRNGKey(seed), i))(jnp.arange(n))
        start_keys, noise_keys = jax.vmap(jax.random.split, out_axes=1)(image_keys)
        if latents is None:
            x = jax.vmap(lambda key: jax.random.normal(key, shape[1:], jnp.float32))(start_keys)
        else:
            expected = (n, shape[3], shape[1], shape[2])
            if tuple(np.shape(latents)) != expected:
                raise ValueError(f"latents of shape {tuple(np.shape(latents))}: expected {expected} (N, C, h, w)")
            x = jnp.asarray(np.asarray(latents, np.float32).transpose(0, 2, 3, 1))
        x = x * plan.init_noise_sigma

        # 3. the denoising chain
        graphdef, state = nnx.split(self.unet)
        x = _denoise(
            graphdef,
            state,
            schedule,
            sampler,
            guided,
            jax.tree.map(jnp.asarray, plan),
            x,
            context,
            jnp.float32(guidance_scale),
            noise_keys,
        )
        if output_type == "latent":
            return np.asarray(x).transpose(0, 3, 1, 2)

        # 4. decode
        graphdef, state = nnx.split(self.vae)
        images = np.asarray(_decode(graphdef, state, x, self.vae.config.scaling_factor))
        if output_type == "np":
            return images
        from PIL import Image

        return [Image.fromarray(np.round(image * 255).astype(np.uint8)) for image in images]
