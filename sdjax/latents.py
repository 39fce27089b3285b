"""Pixels ↔ Stable Diffusion's latents through the VAE, whole or in tiles.

SD's latents were multiplied by the VAE's ``scaling_factor`` s (0.18215) to have unit variance: an
image is encoded to x_0 = s · z with z from the posterior q(z | image), and decoded as
image = clip(D(x_0 / s)/2 + 1/2, 0, 1), D the VAE's decoder with outputs in about [−1, 1].

With a tile size (:meth:`sdjax.pipeline.StableDiffusion.enable_vae_tiling`) images larger than a tile
go through the VAE in overlapping tiles (:func:`sdjax.models.vae.tiled`): its memory is that of one
tile. Each tile shape is one jitted call, so there is one compiled program per tile shape.

The networks run in ``dtype`` (their parameters'); inputs and outputs are float32.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from flax import nnx

from sdjax.models.vae import AutoencoderKL, DiagonalGaussian, tiled

Array = jax.Array


def vae_scale_factor(vae: AutoencoderKL) -> int:
    """f: the VAE halves H and W once per level but the last (diffusers' ``vae_scale_factor``, 8 for SD)."""
    return 2 ** (len(vae.config.block_out_channels) - 1)


@functools.partial(jax.jit, static_argnames=("graphdef", "dtype"))
def _moments(graphdef, state, dtype, images: Array) -> Array:
    """Images (B, H, W, 3) float32 in [−1, 1] → the encoder's (B, H/f, W/f, 2c) float32 moments."""
    return nnx.merge(graphdef, state).moments(images.astype(dtype)).astype(jnp.float32)


@functools.partial(jax.jit, static_argnames=("graphdef", "dtype"))
def _decoded(graphdef, state, dtype, z: Array) -> Array:
    """Unscaled latents (N, h, w, c) float32 → the decoder's (N, h·f, w·f, 3) float32, about [−1, 1], computed in
    ``dtype``: the weights are cast to it inside the compiled function (a float16 VAE decodes in float32 this way)."""
    state = jax.tree.map(lambda a: a.astype(dtype) if jnp.issubdtype(a.dtype, jnp.floating) else a, state)
    return nnx.merge(graphdef, state).decode(z.astype(dtype)).astype(jnp.float32)


def posterior(vae: AutoencoderKL, images: Array, dtype, tile: int | None = None) -> tuple[Array, Array]:
    """Images (B, H, W, 3) float32 in [−1, 1] → q(z | image): its mean and log-variance, each
    (B, H/f, W/f, c) float32 (unscaled); in tile × tile pixel windows when ``tile`` is given."""
    moments = functools.partial(_moments, *nnx.split(vae), dtype)
    f = vae_scale_factor(vae)
    gaussian = DiagonalGaussian.from_moments(
        moments(images) if tile is None else tiled(moments, images, tile=tile, tile_out=tile // f)
    )
    return gaussian.mean, gaussian.logvar


def decode(vae: AutoencoderKL, latents: Array, dtype, tile: int | None = None) -> Array:
    """Latents x_0 (N, h, w, c) float32 → images (N, h·f, w·f, 3) float32 in [0, 1]; in windows of
    ``tile`` pixels (tile / f latents) when it is given."""
    decoded, z = functools.partial(_decoded, *nnx.split(vae), dtype), latents / vae.config.scaling_factor
    x = decoded(z) if tile is None else tiled(decoded, z, tile=tile // vae_scale_factor(vae), tile_out=tile)
    return jnp.clip(x / 2 + 0.5, 0.0, 1.0)
