"""Image to image and inpainting: where the chain starts, and what it keeps (:mod:`sdjax.pipeline`).

Image to image is SDEdit (Meng et al. 2021, arXiv:2108.01073): start the chain part-way, from the
image itself with noise added. The image is encoded, x_0 = s · z with z a sample of the VAE's posterior
q(z | image), and taken by the forward process,

    x_t = √ᾱ_t x_0 + √(1 − ᾱ_t) ε    (x_t = x_0 + σ_t ε for the σ samplers),    ε ∼ N(0, I),

to the noise level at which the last n = ⌊N · strength⌋ of the sampler's N steps begin, and only those
n steps are run (:func:`start_step`; ``sampler.chain(schedule, start)``, ``chain.add_noise``). The noise
drowns the image's fine detail but not its layout and colours, and the model redraws the detail after
the prompt: strength near 0 keeps the image, 1 redraws nearly all of it.

Inpainting repaints where the mask m is 1 (white) and keeps the rest, m binarised at 1/2 and taken to
latent size by nearest-neighbour sampling. Two ways, by UNet:

- An inpainting UNet (SD-inpainting: 9 input channels) is shown what to keep. At every evaluation
  its input is [x_t, m, E(image ⊙ (1 − m))] along channels — the latents, the mask, and the latents
  of the image with the hole blanked (0, mid-grey) — and it was fine-tuned to fill the hole to match.
- An ordinary UNet (4 channels) is made to keep it by latent blending (Blended Latent Diffusion,
  Avrahami et al. 2023, arXiv:2206.02779; :func:`sdjax.chain.blend`): after every step the outside of
  the hole is reset to the image's own latents, noised to the level the chain has reached,

      x ← (1 − m) · (√ᾱ_{t'} x_0 + √(1 − ᾱ_{t'}) ε) + m · x    (the clean x_0 after the last step),

  so the model always sees the true surroundings and denoises the hole into agreement with them.

Both start from pure noise at strength 1, and from the noised image (as img2img) below 1.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import numpy as np

from sdjax import latents
from sdjax.models.vae import AutoencoderKL, reparameterize

Array = jax.Array


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


class Pairs(NamedTuple):
    """How P prompts, K images and M masks make N images: each count is 1 (shared by all) or the
    largest, the pairs; each pair drawn ``copies`` times, image i belonging to pair i // copies."""

    prompts: list[str]
    negatives: list[str]
    n: int
    copies: int

    def source(self, k: int) -> np.ndarray:
        """(N,) for each image the index of its prompt, image, mask… among k of them (1 or the pairs)."""
        return np.arange(self.n) // self.copies % k


def pair_up(prompts: list[str], negatives: list[str], images: int, masks: int | None, copies: int) -> Pairs:
    """:class:`Pairs` of ``prompts`` (with their negatives), ``images`` images and ``masks`` masks (None:
    no masks); ValueError when the counts do not pair up."""
    counts = {"prompts": len(prompts), "images": images} | ({} if masks is None else {"masks": masks})
    pairs = max(counts.values())
    if any(count not in (1, pairs) for count in counts.values()):
        raise ValueError(f"{counts}: give as many of each, or one (shared by all)")
    return Pairs(prompts * (pairs // len(prompts)), negatives * (pairs // len(negatives)), pairs * copies, copies)


def encode(vae: AutoencoderKL, pixels: np.ndarray, which: np.ndarray, eps: Array, dtype, tile=None) -> Array:
    """x_0 = s · z, z = μ + σ ε ∼ q(z | pixels[which[i]]) for each image i (diffusers'
    ``latent_dist.sample()``): pixels (S, H, W, 3) in [−1, 1], each encoded once; which (N,);
    eps (N, h, w, c) the posterior's ε → (N, h, w, c) float32."""
    mean, logvar = latents.posterior(vae, pixels, dtype, tile)
    return vae.config.scaling_factor * reparameterize(mean[which], logvar[which], eps)


def masked_image(pixels: np.ndarray, masks: np.ndarray) -> np.ndarray:
    """The image with the hole blanked, what an inpainting UNet is shown: pixels (K, H, W, 3) in [−1, 1]
    set to 0 (mid-grey) where the mask (M, H, W) is 1 → (max(K, M), H, W, 3)."""
    return pixels * (masks[..., None] < 0.5)
