"""What the pipeline takes from and gives back to a user: images, masks and latents, checked.

Images are float32 in [0, 1] (or PIL images, 8-bit values divided by 255 as diffusers'
``VaeImageProcessor`` does); latents a user passes or receives are in diffusers' layout (N, C, h, w),
sdjax's own being NHWC. Every bad input is a ValueError that names it and says what was expected.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

Array = jax.Array


def _pil_or_list_of_pil(x) -> list | None:
    """x as a list of PIL images if it is one or a list of them, else None."""
    from PIL import Image

    if isinstance(x, Image.Image):
        return [x]
    if isinstance(x, (list, tuple)) and x and all(isinstance(im, Image.Image) for im in x):
        return list(x)
    return None


def _same_size(pils: list, what: str) -> None:
    if len({im.size for im in pils}) > 1:
        raise ValueError(f"{what} of different sizes {[im.size for im in pils]}: give {what} of one size")


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
    PIL images of one size, or a NumPy array of floats in [0, 1], (H, W, 3) or (K, H, W, 3)."""
    pils = _pil_or_list_of_pil(image)
    if pils is not None:
        _same_size(pils, "images")
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
        _same_size(pils, "masks")
        array = np.stack([np.array(im.convert("L")).astype(np.float32) / 255.0 for im in pils])
    else:
        array = _float_array(mask, "mask", "(H, W) or (M, H, W)")
        array = array[None] if array.ndim == 2 else array
        if array.ndim != 3:
            raise ValueError(f"mask of shape {array.shape}: expected (H, W) or (M, H, W), one channel")
    return (array >= 0.5).astype(np.float32)


def latent_mask(masks: np.ndarray, f: int) -> np.ndarray:
    """Masks (M, H, W) at latent size (M, H/f, W/f, 1), as torch's ``interpolate(mode="nearest")`` takes
    them for a factor f (diffusers' inpainting): the top-left pixel of each f × f block."""
    return masks[:, ::f, ::f, None]


def user_latents(value, what: str, expected: tuple[int, ...]) -> Array:
    """A user's (N, C, h, w) latent-space array (diffusers' layout) as (N, h, w, C) float32, shape-checked."""
    if tuple(np.shape(value)) != expected:
        raise ValueError(f"{what} of shape {tuple(np.shape(value))}: expected {expected} (N, C, h, w)")
    return jnp.asarray(np.asarray(value, np.float32).transpose(0, 2, 3, 1))


def to_user_latents(x) -> np.ndarray:
    """sdjax's (N, h, w, C) latents in diffusers' layout, (N, C, h, w) float32 numpy."""
    return np.asarray(x, np.float32).transpose(0, 3, 1, 2)


def to_pil(images: np.ndarray) -> list:
    """(N, H, W, 3) float32 in [0, 1] → N PIL images (values ×255, rounded)."""
    from PIL import Image

    return [Image.fromarray(np.round(image * 255).astype(np.uint8)) for image in images]
