"""Stable Diffusion (Rombach et al. 2022, arXiv:2112.10752): text to image, image to image and
inpainting, as diffusers' ``StableDiffusionPipeline``, ``StableDiffusionImg2ImgPipeline`` and
``StableDiffusionInpaintPipeline`` run them. The four stages of a txt2img run (:meth:`StableDiffusion.__call__`):

1. Encode the text (:mod:`sdjax.prompts`). Each prompt becomes 77 CLIP token ids and the text encoder
   turns them into the context c = CLIP(ids), (77, D) (a longer prompt: 77 for each chunk of 75 tokens,
   side by side; weights written in ``prompt_syntax`` scale the tokens' encodings); the negative prompt
   (default "") gives the unconditional context c_∅ the same way.

2. Start from noise. The latent image is (h, w, 4) = (H/f, W/f, 4), f = 2^(levels − 1) the VAE's
   downsampling factor (8 for SD). Image i has its own key k_i = ``fold_in(PRNGKey(seed), i)``, split
   in two: x_T ∼ N(0, I) from the first half, the stochastic samplers' noise at evaluation j from
   ``fold_in(second half, j)`` — so image i is the same whatever the batch it is drawn in. x_T is
   scaled by the sampler's ``init_noise_sigma`` (1 for the DDPM-style samplers, σ_max or
   √(σ_max² + 1) for the σ samplers of :mod:`sdjax.samplers`).

3. Denoise with classifier-free guidance (Ho & Salimans 2022, arXiv:2207.12598; :func:`sdjax.chain.guided`).
   At each of the sampler's K evaluations the UNet predicts with and without the text, in one batched
   pass on each image's pair (x_i, x_i) with contexts (c_∅,i, c_i), and the two predictions are
   extrapolated away from the unconditional one:

       ε̂ = ε̂(x_t, t, c_∅) + w (ε̂(x_t, t, c) − ε̂(x_t, t, c_∅)),    w = guidance_scale

   (w = 1 is the conditional model alone; SD's usual w = 7.5 trades diversity for prompt fidelity.
   With w ≤ 1 the unconditional pass is skipped, as in diffusers.) The sampler turns ε̂ into the
   next x. The whole chain is one ``lax.scan`` in one ``jax.jit`` (:func:`sdjax.chain.run`), compiled
   once per (batch and latent shape, number of evaluations, sampler, guidance on/off) and reused after
   that: no step goes back to the host. With a ``callback`` the same steps run one jitted step at a
   time (:func:`sdjax.chain.iterate`), to the same bits, and the callback sees every x on the way.

4. Decode (:mod:`sdjax.latents`): image = clip(D(x_0 / s)/2 + 1/2, 0, 1), s the VAE's scaling factor.

Image to image (:meth:`StableDiffusion.img2img`) and inpainting (:meth:`StableDiffusion.inpaint`) start
the chain part-way from the image, or keep part of it: :mod:`sdjax.img2img`.

Precision: the networks run in the components' dtype (float32, bfloat16 or float16); the sampler's
arithmetic and the latents stay float32 throughout (model outputs are cast to float32).

Devices: the batch of images is split over all local devices (:mod:`sdjax.devices`), the networks'
parameters replicated on each: the chain and the decoding of N images run N/D per device with no
communication, because each image's conditional and unconditional passes sit next to each other in the
UNet's batch. A batch that D does not divide is padded with copies of its last image, and the copies
dropped at the end. On one device this is the plain computation.
"""

from __future__ import annotations

import dataclasses
import functools
import os
import sys
import warnings
from collections.abc import Callable
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from sdjax import chain as chain_lib
from sdjax import control as control_lib
from sdjax import convert, devices, images, img2img, latents, prompt_syntax, prompts, samplers
from sdjax.adapters import Adapters
from sdjax.components import Components
from sdjax.samplers import Chain

Array = jax.Array

OUTPUT_TYPES = ("pil", "np", "latent")
_PACKAGE_DIR = os.path.dirname(os.path.abspath(__file__))
DTYPES = ("float32", "bfloat16", "float16")


@dataclasses.dataclass(frozen=True)
class Options:
    """The settings every generating call takes, as keyword arguments (txt2img, img2img, inpaint).

    negative_prompt: what to steer away from, one string for all prompts or one per prompt (None: "",
      as diffusers). Used only with guidance_scale > 1.
    num_inference_steps: N, the sampler's steps. guidance_scale: w (module docstring; ≤ 1: no guidance).
    scheduler: a name of :data:`sdjax.samplers.SAMPLERS`; None: the checkpoint's own
      (:func:`sdjax.samplers.from_config`). eta: DDIM's η (ddim only).
    seed: image i (prompt-major: prompt p's copies are images p·n … p·n + n − 1) starts from noise
      drawn from ``fold_in(PRNGKey(seed), i)``, whatever the batch size.
    num_images_per_prompt: n, images drawn for each prompt (or prompt-image pair).
    output_type: "pil" → list of N PIL images; "np" → (N, H, W, 3) float32 in [0, 1]; "latent" → the
      final latents (N, 4, h, w) float32, diffusers' layout.
    callback: ``callback(i, t, latents)`` after every model evaluation i, with its timestep t and the
      latents x after the step, (N, 4, h, w) float32 numpy (diffusers' layout). The chain then runs one
      jitted step at a time instead of one compiled loop: the same images, to the bit.
    prompt_syntax: how prompts are read: "none" (literally), "a1111" (``(word:1.3)``, ``[word]``, BREAK) or
      "compel" (``word++``, ``(words)0.8``, ``.blend()``, ``.and()``); :mod:`sdjax.prompt_syntax`.
    truncate_prompts: cut prompts to CLIP's 75 tokens with a warning, as diffusers does, instead of
      encoding longer ones whole in 75-token chunks (:mod:`sdjax.prompts`).
    original_size, crops_coords_top_left, target_size: SDXL's size conditioning, (height, width) pairs in
      pixels, as diffusers takes them: the size the image "came from", the crop's top-left corner, the
      size it is meant to be (default: the output's size, (0, 0), the output's size). SDXL only.
    controlnet, control_image, controlnet_conditioning_scale, guess_mode, control_guidance_start/end: a
      ControlNet or a list, its condition image(s) at the output's size (which they set if height/width
      are not given), its scale, guess mode and the fraction of the steps it acts in (:mod:`sdjax.control`).
    """

    negative_prompt: str | list[str] | None = None
    num_inference_steps: int = 50
    guidance_scale: float = 7.5
    scheduler: str | None = None
    eta: float = 0.0
    seed: int = 0
    num_images_per_prompt: int = 1
    output_type: str = "pil"
    callback: Callable[[int, float, np.ndarray], None] | None = None
    prompt_syntax: str = "none"
    truncate_prompts: bool = False
    original_size: tuple[int, int] | None = None
    crops_coords_top_left: tuple[int, int] = (0, 0)
    target_size: tuple[int, int] | None = None
    controlnet: object = None
    control_image: object = None
    controlnet_conditioning_scale: float | list[float] = 1.0
    guess_mode: bool = False
    control_guidance_start: float | list[float] = 0.0
    control_guidance_end: float | list[float] = 1.0

    def __post_init__(self):
        if self.prompt_syntax not in prompt_syntax.SYNTAXES:
            raise ValueError(f"prompt_syntax={self.prompt_syntax!r}: expected one of {prompt_syntax.SYNTAXES}")
        if self.output_type not in OUTPUT_TYPES:
            raise ValueError(f"output_type={self.output_type!r}: expected one of {OUTPUT_TYPES}")
        if self.num_images_per_prompt < 1:
            raise ValueError(f"num_images_per_prompt must be at least 1, got {self.num_images_per_prompt}")

    @classmethod
    def of(cls, options: dict) -> Options:
        unknown = sorted(set(options) - {f.name for f in dataclasses.fields(cls)})
        if unknown:
            raise TypeError(f"unknown options {unknown}: expected {[f.name for f in dataclasses.fields(cls)]}")
        return cls(**options)

    @property
    def guided(self) -> bool:
        return self.guidance_scale > 1.0


class Conditioning(NamedTuple):
    """SDXL's conditioning, in the pair layout of a context: the context (2N, T, 2048), the pooled text
    embedding ``text_embeds`` (2N, 1280) and the size numbers ``time_ids`` (2N, 6): (original height, width,
    crop top, left, target height, width) (:meth:`sdjax.models.unet.UNet2D.added_embedding`)."""

    context: Array
    text_embeds: Array
    time_ids: Array


class Inputs(NamedTuple):
    """What the chain over N images takes besides x, per image (padded and split over devices together).

    context: (2N, T, D) each image's pair (c_∅,n, c_n) under guidance, else (N, T, D); T = 77 per chunk.
      For SDXL a :class:`Conditioning` of such arrays.
    keys: (N, 2) each image's step-noise key. extra: (N, h, w, C) the channels an inpainting UNet takes
    after x's (the mask and the masked image's latents, C = 5), or None. blend: latent blending, or None.
    control: the ControlNets' condition images and weights (:class:`sdjax.control.Control`), or None.
    """

    context: Array | Conditioning
    keys: Array
    extra: Array | None = None
    blend: chain_lib.Blend | None = None
    control: control_lib.Control | None = None

    def extra_at(self, i):
        """What the model takes besides x and t at evaluation i: (inpainting channels, control images,
        control weights (N, M)), Nones where unused."""
        if self.control is None:
            return self.extra, None, None
        return self.extra, self.control.images, self.control.weights[:, i]


def _unet_model(networks, context: Array | Conditioning, dtype, guidance_scale, guess_mode) -> chain_lib.Model:
    """The UNet (and its ControlNets: ``networks`` = (unet, controlnets)) as the chain calls a model
    (:mod:`sdjax.chain`; extra: :meth:`Inputs.extra_at`), guided when ``guidance_scale`` is given."""
    unet, controlnets = networks

    def model(x: Array, t: Array, extra) -> Array:
        channels, control_images, weights = extra
        x = x.astype(dtype)
        added = None
        if isinstance(context, Conditioning):
            added = {"text_embeds": context.text_embeds, "time_ids": context.time_ids}
        text = context.context if added else context
        control = None
        if controlnets:
            guided = guidance_scale is not None
            control = control_lib.residuals(
                controlnets, x, t, text, control_images, weights, guess_mode=guess_mode, guided=guided, added=added
            )
        if channels is not None:
            x = jnp.concatenate([x, channels.astype(dtype)], axis=-1)
        return unet(x, t, text, added_cond=added, control=control)

    return model if guidance_scale is None else chain_lib.guided(model, guidance_scale)


@functools.partial(jax.jit, static_argnames=("graphdef", "dtype", "progress", "guess"), donate_argnames=("x",))
def _denoise(graphdef, state, dtype, progress: bool, chain: Chain, x: Array, inputs: Inputs, guidance, guess=False):
    """The chain over latents x (N, h, w, 4) float32 (donated: its buffer becomes the result's) as one
    ``lax.scan``, ticking the progress bar after every evaluation when ``progress``. Returns x_0."""
    model = _unet_model(nnx.merge(graphdef, state), inputs.context, dtype, guidance, guess)
    noise = chain_lib.noise_per_image(inputs.keys, x.shape[1:])
    tick = chain_lib.Progress.tick if progress else None
    return chain_lib.run(model, chain, x, extra=inputs.extra_at, noise=noise, blend_with=inputs.blend, on_step=tick)


@functools.partial(jax.jit, static_argnames=("graphdef", "dtype", "guess"))
def _denoise_step(graphdef, state, dtype, inputs: Inputs, guidance, chain: Chain, i, x, sampler_state, guess=False):
    """Evaluation i of :func:`_denoise`'s chain, alone (:func:`sdjax.chain.iterate`)."""
    model = _unet_model(nnx.merge(graphdef, state), inputs.context, dtype, guidance, guess)
    noise = chain_lib.noise_per_image(inputs.keys, x.shape[1:])
    return chain_lib.step(
        model, chain, i, x, sampler_state, extra=inputs.extra_at, noise=noise, blend_with=inputs.blend
    )


def _image_keys(seed: int, n: int, parts: int) -> Array:
    """(parts, n, 2): image i's key ``fold_in(PRNGKey(seed), i)`` split in ``parts``, whatever n is."""
    keys = jax.vmap(lambda i: jax.random.fold_in(jax.random.PRNGKey(seed), i))(jnp.arange(n))
    return jax.vmap(lambda key: jax.random.split(key, parts), out_axes=1)(keys)


def _normal(keys: Array, shape: tuple[int, ...]) -> Array:
    """One N(0, I) draw of ``shape`` per key: keys (n, 2) → (n, *shape) float32."""
    return jax.vmap(lambda key: jax.random.normal(key, shape, jnp.float32))(keys)


class StableDiffusion(Adapters):
    """A Stable Diffusion 1.x/2.x pipeline: txt2img (call it), :meth:`img2img`, :meth:`inpaint` (module
    docstring), and LoRA / textual inversion (:class:`sdjax.adapters.Adapters`).

    Build it with :meth:`from_pretrained`, or from :class:`sdjax.components.Components` directly, then
    call it with prompts. ``progress``: show a progress bar over the denoising steps (default: in a
    terminal or notebook, not in logs); turning it on or off compiles the chain once more.
    ``devices``: the devices a batch of images is split over (default None: all local devices).
    """

    def __init__(self, components: Components):
        self.components = components
        self.unet, self.vae, self.text_encoder = components.unet, components.vae, components.text_encoder
        self.tokenizer, self.schedule, self.dtype = components.tokenizer, components.schedule, components.dtype
        self.text_encoder_2, self.tokenizer_2 = components.text_encoder_2, components.tokenizer_2  # SDXL's, else None
        self.vae_scale_factor = latents.vae_scale_factor(self.vae)
        # image sizes must be multiples of 8 (diffusers' rule) and of the VAE's factor f, so that the
        # latents are whole; the UNet takes latents of any size (its up path resizes to each skip)
        self.size_multiple = int(np.lcm(8, self.vae_scale_factor))
        self.progress = chain_lib.interactive()
        self.devices: list | None = None
        self.vae_tile: int | None = None  # pixels; see enable_vae_tiling

    @classmethod
    def from_pretrained(cls, path: str | os.PathLike, dtype: str = "float32", **single_file_options) -> StableDiffusion:
        """Load whatever :func:`sdjax.convert.load` reads (a diffusers folder, a CompVis single file, an
        sdjax folder), the networks' parameters cast to ``dtype`` (one of :data:`DTYPES`; float16 for
        GPUs without bfloat16, such as a T4). ``single_file_options`` (unet=, vae=, text_encoder=,
        schedule=, tokenizer=) configure a single file.
        """
        if jnp.dtype(dtype).name not in DTYPES:
            raise ValueError(f"dtype={jnp.dtype(dtype).name}: expected one of {DTYPES}")
        components = convert.load(path, dtype=dtype, **single_file_options)
        return cls(components if components.dtype == jnp.dtype(dtype) else components.astype(dtype))

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
    def is_inpainting_model(self) -> bool:
        """Whether the UNet takes the mask and masked-image latents besides x (SD-inpainting's 9 channels)."""
        return self.unet.config.in_channels == 2 * self.vae.config.latent_channels + 1

    def encode_prompt(self, texts: list[str], *, prompt_syntax: str = "none", truncate_prompts: bool = False) -> Array:
        """Prompts → contexts (B, 77·k, D) (:mod:`sdjax.prompts`; k = 1 up to 75 tokens), with the options'
        meanings of :class:`Options`."""
        encoded = prompts.encode(self.components, texts, syntax=prompt_syntax, truncate=truncate_prompts)
        self._warn(encoded.messages)
        return encoded.context

    # ---------------------------------------------------------------------------------------------
    # Text to image
    # ---------------------------------------------------------------------------------------------

    def __call__(
        self,
        prompt: str | list[str],
        *,
        height: int | None = None,
        width: int | None = None,
        latents: np.ndarray | None = None,
        **options,
    ):
        """Generate images for ``prompt`` (one string or a list), with the settings of :class:`Options`.

        height, width: image size, default ``unet.config.sample_size`` · f; multiples of
          :attr:`size_multiple` (8 for SD: 600×800 works, as in diffusers).
        latents: (N, 4, h, w) starting noise in diffusers' layout, N = len(prompts)·num_images_per_prompt;
          scaled by the sampler's init_noise_sigma, as diffusers does.
        Returns what ``output_type`` asks for (:class:`Options`).
        """
        opts = Options.of(options)
        texts, negatives = prompts.prompt_lists(prompt, opts.negative_prompt)
        self._check_unet("txt2img")
        f = self.vae_scale_factor
        chain = self._chain(opts)
        n = len(texts) * opts.num_images_per_prompt
        size = None if height is None and width is None else (height, width)
        controlnets, control, size = control_lib.prepare(opts.controlnet, opts.control_image, opts, len(chain), n, size)
        height = (size and size[0]) or self.unet.config.sample_size * f
        width = (size and size[1]) or self.unet.config.sample_size * f
        self._check_size("height", height)
        self._check_size("width", width)

        # 1. text → contexts, each prompt's repeated for its images: [c_∅; c] pairs under guidance
        context = self._contexts(texts, negatives, opts, (height, width))

        # 2. x_T, image i's from its own key; latents are NHWC inside sdjax
        shape = (n, height // f, width // f, self.unet.config.in_channels)
        start_keys, noise_keys = _image_keys(opts.seed, n, 2)
        if latents is None:
            x = _normal(start_keys, shape[1:])
        else:
            x = images.user_latents(latents, "latents", (n, shape[3], shape[1], shape[2]))

        # 3. the denoising chain, 4. decode
        x = self._denoise(chain, chain.start(x), Inputs(context, noise_keys, control=control), opts, controlnets)
        return self._output(x, opts.output_type, n, chain)

    # ---------------------------------------------------------------------------------------------
    # Image to image, inpainting (sdjax.img2img)
    # ---------------------------------------------------------------------------------------------

    def img2img(
        self,
        prompt: str | list[str],
        image,
        *,
        strength: float = 0.8,
        noise: np.ndarray | None = None,
        vae_noise: np.ndarray | None = None,
        **options,
    ):
        """Redraw ``image`` after ``prompt``, SDEdit (:mod:`sdjax.img2img`): diffusers'
        ``StableDiffusionImg2ImgPipeline``.

        image: a PIL image (made RGB), a list of PIL images of one size, or a NumPy array of floats in
          [0, 1], (H, W, 3) or (K, H, W, 3) (:func:`sdjax.images.load_images`). H and W, the output size,
          must be multiples of :attr:`size_multiple`. Prompts and images pair up: K images and P prompts
          with K = P, or either of them 1 (shared by all).
        strength: in (0, 1], how much to redraw: the chain runs the last ⌊num_inference_steps · strength⌋
          of its steps (:func:`sdjax.img2img.start_step`), from the image noised to where they begin.
        noise: (N, 4, h, w) the forward process's ε in diffusers' layout, instead of drawing it from the
          seed; h = H/f, w = W/f, N = max(P, K) · num_images_per_prompt.
        vae_noise: (N, 4, h, w) the ε of the posterior sample z = μ + σ ε each image is encoded to
          (diffusers' ``latent_dist.sample()``), instead of drawing it from the seed. With ``noise``,
          what makes a run comparable with diffusers' for the same random numbers.
        options: as :class:`Options`; seed: image i's key ``fold_in(PRNGKey(seed), i)`` is split in four:
          the forward-process ε, the stochastic samplers' step noise, the VAE posterior's ε (the fourth
          is inpainting's) — image i is the same whatever the batch. Returns as :meth:`__call__`.
        """
        opts = Options.of(options)
        texts, negatives = prompts.prompt_lists(prompt, opts.negative_prompt)
        self._check_unet("img2img")
        return self._from_image(texts, negatives, image, None, strength, opts, None, noise, vae_noise)

    def inpaint(
        self,
        prompt: str | list[str],
        image,
        mask,
        *,
        strength: float = 1.0,
        latents: np.ndarray | None = None,
        noise: np.ndarray | None = None,
        vae_noise: np.ndarray | None = None,
        **options,
    ):
        """Repaint ``image`` where ``mask`` is white, after ``prompt`` (:mod:`sdjax.img2img`); diffusers'
        ``StableDiffusionInpaintPipeline``, with an inpainting UNet (9 input channels: the mask and the
        masked image's latents go in with x) or an ordinary one (4: latent blending).

        image: as :meth:`img2img`. mask: a PIL image (made grey, "L") or list of them, or a NumPy array
          of floats in [0, 1], (H, W) or (M, H, W), of the image's size; 1 (white) = repaint, 0 = keep,
          binarised at 0.5 (:func:`sdjax.images.load_masks`). Prompts, images and masks pair up, each
          count 1 or equal.
        strength: in (0, 1]. 1: start from pure noise (the image enters only through what is kept);
          below 1: from the image noised, running the last ⌊num_inference_steps · strength⌋ steps.
        latents: (N, 4, h, w) diffusers' ``latents``: the start is latents · init_noise_sigma whatever
          the strength, and latents is also the ε of the blending. Not with ``noise``.
        noise: (N, 4, h, w) the ε diffusers draws in its ``prepare_latents``: the start is
          init_noise_sigma · ε at strength 1, the image noised with ε below; the blending's ε.
        vae_noise: (N, 4, h, w) the posterior ε of every image encoding (the image's and the masked
          image's), as :meth:`img2img`.
        options: as :meth:`img2img`, the masked image's posterior ε from the fourth part of the key.
        Returns as :meth:`__call__`.
        """
        opts = Options.of(options)
        texts, negatives = prompts.prompt_lists(prompt, opts.negative_prompt)
        latent_channels = self.vae.config.latent_channels
        if self.unet.config.in_channels != latent_channels and not self.is_inpainting_model:
            raise ValueError(
                f"this checkpoint's UNet takes {self.unet.config.in_channels} input channels; inpainting needs "
                f"{latent_channels} (latent blending) or {2 * latent_channels + 1} (an inpainting UNet)"
            )
        if latents is not None and noise is not None:
            raise ValueError("give latents or noise, not both: as in diffusers, latents is also the blending's noise")
        return self._from_image(texts, negatives, image, mask, strength, opts, latents, noise, vae_noise)

    def _from_image(self, texts, negatives, image, mask, strength, opts: Options, latents, noise, vae_noise):
        """img2img (mask None) and inpaint: the arguments as theirs."""
        start = img2img.start_step(opts.num_inference_steps, strength)
        pixels = images.load_images(image)
        height, width = pixels.shape[1:3]
        self._check_size("height", height)
        self._check_size("width", width)
        masks = None if mask is None else images.load_masks(mask)
        if masks is not None and masks.shape[1:] != pixels.shape[1:3]:
            raise ValueError(
                f"the mask is {masks.shape[2]}×{masks.shape[1]} (W×H) and the image {width}×{height}: "
                "give a mask of the image's size"
            )
        pairs = img2img.pair_up(
            texts, negatives, len(pixels), None if masks is None else len(masks), opts.num_images_per_prompt
        )
        n, chain = pairs.n, self._chain(opts, start)
        context = self._contexts(pairs.prompts, pairs.negatives, opts, (height, width))
        controlnets, control, _ = control_lib.prepare(
            opts.controlnet, opts.control_image, opts, len(chain), n, (height, width)
        )

        f, c = self.vae_scale_factor, self.vae.config.latent_channels
        shape, expected = (height // f, width // f, c), (n, c, height // f, width // f)
        start_keys, noise_keys, image_keys, masked_keys = _image_keys(opts.seed, n, 4)
        if latents is not None:
            eps = images.user_latents(latents, "latents", expected)
        elif noise is not None:
            eps = images.user_latents(noise, "noise", expected)
        else:
            eps = _normal(start_keys, shape)
        given_vae_eps = None if vae_noise is None else images.user_latents(vae_noise, "vae_noise", expected)

        def encode(pixels: np.ndarray, keys: Array) -> Array:
            """x_0 of each image i (sdjax.img2img.encode): pixels (S, H, W, 3) in [−1, 1], S = 1 or the pairs."""
            vae_eps = _normal(keys, shape) if given_vae_eps is None else given_vae_eps
            vae = self._replicated(self.vae)
            return img2img.encode(
                vae, jnp.asarray(pixels), pairs.source(len(pixels)), vae_eps, self.dtype, self.vae_tile
            )

        # the start: the image noised to the first kept step (img2img always, as diffusers; inpainting
        # below strength 1), else pure noise as txt2img's
        pixels = 2.0 * pixels - 1.0  # the VAE's range
        from_noise = masks is not None and (strength == 1.0 or latents is not None)
        blending = masks is not None and not self.is_inpainting_model
        x0 = encode(pixels, image_keys) if blending or not from_noise else None
        x = chain.start(eps) if from_noise else chain.add_noise(0, x0, eps)

        inputs = Inputs(context, noise_keys, control=control)
        if masks is not None:
            latent_mask = jnp.asarray(images.latent_mask(masks, f))[pairs.source(len(masks))]
            if blending:
                inputs = inputs._replace(blend=chain_lib.Blend(latent_mask, x0, eps))
            else:  # [x, m, E(image · (1 − m))]
                masked = encode(img2img.masked_image(pixels, masks), masked_keys)
                inputs = inputs._replace(extra=jnp.concatenate([latent_mask, masked], axis=-1))
        return self._output(self._denoise(chain, x, inputs, opts, controlnets), opts.output_type, n, chain)

    # ---------------------------------------------------------------------------------------------
    # The parts every call shares
    # ---------------------------------------------------------------------------------------------

    @staticmethod
    def _warn(messages: list[str]) -> None:
        """Warn about every prompt truncation cut, at the first line outside sdjax (the user's call)."""
        level, frame = 1, sys._getframe(0)
        while frame is not None and frame.f_code.co_filename.startswith(_PACKAGE_DIR):
            level, frame = level + 1, frame.f_back
        for message in messages:
            warnings.warn(message, stacklevel=level)

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

    def _chain(self, opts: Options, start: int = 0) -> Chain:
        """The run's sampler (the checkpoint's own unless ``scheduler`` names one) on its schedule, from
        step ``start``."""
        config = self.components.scheduler_config
        sampler = samplers.from_config(config, opts.scheduler, opts.num_inference_steps, opts.eta)
        return sampler.chain(samplers.schedule_for(sampler, config, self.schedule), start)

    def _contexts(self, texts: list[str], negatives: list[str], opts: Options, size: tuple[int, int]):
        """The contexts in the chain's pair layout (:class:`Inputs`): an array, or SDXL's :class:`Conditioning`
        with the size numbers of an image of ``size`` (height, width)."""
        sdxl = self.components.version == "sdxl"
        sizes = (opts.original_size, opts.target_size, opts.crops_coords_top_left != (0, 0))
        if not sdxl and any(sizes):
            raise ValueError("original_size, crops_coords_top_left and target_size are SDXL's; this is an SD model")
        zeros = sdxl and self.components.force_zeros_for_empty_prompt and opts.negative_prompt is None
        encoded = prompts.contexts(
            self.components, texts, None if zeros else negatives, opts.num_images_per_prompt, opts.guided,
            syntax=opts.prompt_syntax, truncate=opts.truncate_prompts,
        )  # fmt: skip
        self._warn(encoded.messages)
        if not sdxl:
            return encoded.context
        # (original size, crop corner, target size): diffusers' _get_add_time_ids, the same for c_∅ and c
        time_ids = [*(opts.original_size or size), *opts.crops_coords_top_left, *(opts.target_size or size)]
        time_ids = jnp.tile(jnp.asarray([time_ids], jnp.float32), (len(encoded.pooled), 1))  # sizes exact in any dtype
        return Conditioning(encoded.context, encoded.pooled, time_ids)

    def _replicated(self, module: nnx.Module) -> nnx.Module:
        """``module`` with its parameters on every device, put there in place on first use
        (``jax.device_put`` returns an array already placed so as it is, so later calls copy nothing)."""
        nnx.update(module, devices.replicate(nnx.state(module), devices.local_mesh(self.devices)))
        return module

    def _denoise(self, chain: Chain, x: Array, inputs: Inputs, opts: Options, controlnets: tuple = ()) -> Array:
        """The chain over x (N, h, w, 4) with the UNet, the batch split over the local devices (module
        docstring): one compiled loop, or step by step with ``opts.callback``; a progress bar when
        :attr:`progress` is on. Returns the final latents (N', h, w, 4) of the padded batch, N' = N
        rounded up to a multiple of the device count, sharded."""
        mesh = devices.local_mesh(self.devices)
        n, padded = len(x), devices.padded_size(len(x), mesh)
        pairs = jax.tree.map(lambda c: c.reshape(n, -1, *c.shape[1:]), inputs.context)  # (kN, …) → (N, k, …)
        x, inputs = devices.shard_batch(devices.pad_batch((x, inputs._replace(context=pairs)), padded), mesh)
        inputs = inputs._replace(context=jax.tree.map(lambda c: c.reshape(-1, *c.shape[2:]), inputs.context))
        networks = nnx.split((self._replicated(self.unet), tuple(self._replicated(c) for c in controlnets)))
        guidance_scale = jnp.float32(opts.guidance_scale) if opts.guided else None
        guess = bool(opts.guess_mode or any(c.controlnet_config.global_pool_conditions for c in controlnets))
        if opts.callback is not None:
            one_step = functools.partial(_denoise_step, *networks, self.dtype, inputs, guidance_scale, guess=guess)
            with chain_lib.Progress.shown(chain, self.progress):
                for i, result in enumerate(chain_lib.iterate(one_step, chain, x)):
                    chain_lib.Progress.tick()
                    opts.callback(i, float(chain.plan.timesteps[i]), images.to_user_latents(result.x[:n]))
                    x = result.x
            return x
        with chain_lib.Progress.shown(chain, self.progress):
            x = _denoise(*networks, self.dtype, self.progress, chain, x, inputs, guidance_scale, guess=guess)
            return jax.block_until_ready(x)

    def _output(self, x: Array, output_type: str, n: int, chain: Chain):
        """Final latents (N', h, w, 4) of a padded, sharded batch → what ``output_type`` asks for (see
        :class:`Options`) for its first ``n`` images; the decoding runs on the devices that hold them.

        No black images: non-finite latents raise FloatingPointError naming the run, rather than becoming
        black PNGs; a float16 VAE whose config says ``force_upcast`` (SD's and SDXL's do) decodes in
        float32, as diffusers does, and any other half-precision decode that overflows is redone in float32.
        """
        finite = np.asarray(jnp.isfinite(x[:n]).all(axis=(1, 2, 3)))
        if not finite.all():
            raise FloatingPointError(
                f"{int((~finite).sum())} of {n} images have non-finite latents after {len(chain)} steps of "
                f"{chain.sampler.name} in {jnp.dtype(self.dtype).name}; nothing was decoded. Try float32 (or "
                "bfloat16, which has float32's range), fewer or other steps, or a lower guidance scale."
            )
        if output_type == "latent":
            return images.to_user_latents(np.asarray(x)[:n])
        half = jnp.dtype(self.dtype) != jnp.float32
        upcast = jnp.dtype(self.dtype) == jnp.float16 and self.vae.config.force_upcast
        vae = self._replicated(self.vae)
        decoded = np.asarray(latents.decode(vae, x, jnp.float32 if upcast else self.dtype, self.vae_tile))[:n]
        if half and not upcast and not np.isfinite(decoded).all():
            warnings.warn(
                f"the VAE decoded non-finite values in {jnp.dtype(self.dtype).name}: decoding again in float32",
                stacklevel=3,
            )
            decoded = np.asarray(latents.decode(vae, x, jnp.float32, self.vae_tile))[:n]
        return decoded if output_type == "np" else images.to_pil(decoded)
