"""Paths between two latents: linear (lerp) and spherical (slerp) interpolation.

Decoding the points of a path z(t), t ∈ [0, 1], from z₀ to z₁ shows how smooth a latent space is:
in a VAE the images morph gradually, in a plain autoencoder they can jump or pass through garbage.

Which path? Under a Gaussian prior N(0, I) in d dimensions almost all the mass lies near the sphere
‖z‖ ≈ √d. The straight line between two such points cuts inside that shell (for independent
z₀, z₁ its midpoint has ‖z‖ ≈ √(d/2)), where the decoder has seen few latents. Slerp walks along
the great circle instead and keeps the norm (White 2016, "Sampling Generative Networks",
arXiv:1609.04468). Latent diffusion models interpolate their starting noise this way.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

Array = jax.Array


def _times(n: int, dtype) -> Array:
    """(n,) evenly spaced t from 0 to 1, both ends included (exactly 0.0 and 1.0)."""
    if n < 2:
        raise ValueError(f"an interpolation path needs n >= 2 points (both ends), got {n}")
    return jnp.linspace(0.0, 1.0, n, dtype=dtype)


def _check_pair(z0: Array, z1: Array) -> tuple[Array, Array]:
    z0, z1 = jnp.asarray(z0), jnp.asarray(z1)
    if z0.shape != z1.shape:
        raise ValueError(f"z0 and z1 must have the same shape, got {z0.shape} and {z1.shape}")
    dtype = jnp.result_type(z0, z1, jnp.float32)
    return z0.astype(dtype), z1.astype(dtype)


def lerp(z0: Array, z1: Array, n: int) -> Array:
    """Linear interpolation: n evenly spaced points on the straight line from z0 to z1.

    Args:
      z0, z1: one latent each, any shape S (e.g. (h, w, c)); both the same shape.
      n: number of points, including both ends (n >= 2).
    Returns:
      (n, *S) array; element 0 is exactly z0 and element n − 1 exactly z1.
    """
    z0, z1 = _check_pair(z0, z1)
    t = _times(n, z0.dtype).reshape((n,) + (1,) * z0.ndim)
    # z(t) = (1 − t)·z₀ + t·z₁
    return (1.0 - t) * z0 + t * z1


def slerp(z0: Array, z1: Array, n: int, *, eps: float = 1e-6) -> Array:
    """Spherical linear interpolation: n points along the great circle from z0 to z1.

    The angle Ω between z0 and z1 is taken over all their elements (each latent is one vector).
    When ‖z0‖ = ‖z1‖ every point of the path has that same norm; otherwise the norm changes
    smoothly between the two. When z0 and z1 are (anti)parallel, sin Ω ≈ 0 and the great circle is
    not unique; then the path falls back to :func:`lerp`.

    Args:
      z0, z1: one latent each, any shape S; both the same shape.
      n: number of points, including both ends (n >= 2).
      eps: below this sin Ω the vectors count as parallel.
    Returns:
      (n, *S) array; element 0 is exactly z0 and element n − 1 exactly z1.
    """
    z0, z1 = _check_pair(z0, z1)
    t = _times(n, z0.dtype).reshape((n,) + (1,) * z0.ndim)
    # cos Ω = ⟨z₀, z₁⟩ / (‖z₀‖ ‖z₁‖)
    # z(t) = sin((1 − t)Ω) / sin Ω · z₀  +  sin(tΩ) / sin Ω · z₁
    norms = jnp.linalg.norm(z0.ravel()) * jnp.linalg.norm(z1.ravel())
    cos_omega = jnp.clip(jnp.vdot(z0.ravel(), z1.ravel()) / jnp.maximum(norms, jnp.finfo(z0.dtype).tiny), -1.0, 1.0)
    omega = jnp.arccos(cos_omega)
    sin_omega = jnp.sin(omega)
    parallel = sin_omega < eps
    safe_sin = jnp.where(parallel, 1.0, sin_omega)
    w0 = jnp.where(parallel, 1.0 - t, jnp.sin((1.0 - t) * omega) / safe_sin)
    w1 = jnp.where(parallel, t, jnp.sin(t * omega) / safe_sin)
    path = w0 * z0 + w1 * z1
    # sin(Ω)/sin(Ω) is 1 only up to rounding of two separately computed sines: pin the ends.
    return path.at[0].set(z0).at[-1].set(z1)
