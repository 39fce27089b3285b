"""Condition images for ControlNet without a downloaded model: Canny edges, a threshold, scribbles, and the
segmentation map of a ``shapes`` scene.

A ControlNet reads a picture of the *structure* wanted (edges, a mask, a pose) and the prompt supplies the
rest. The web UIs call the functions that make such pictures "preprocessors" (ControlNet's repository:
"annotators"); the ones here need no network and no weights:

==================  =====================================================================  ==================
preprocessor        what it keeps of the image                                              reference
==================  =====================================================================  ==================
:func:`canny`       thin edges: Sobel gradients, non-maximum suppression, hysteresis        ``cv2.Canny``
:func:`threshold`   a binary mask: grey level above ``level``                               ``cv2.threshold``
:func:`scribble`    thick strokes along the edges, as a person would draw them               (canny + dilation)
:func:`segmentation` one flat colour per object class of a ``shapes`` scene                  the renderer
==================  =====================================================================  ==================

Each takes what the pipeline takes for an image (a PIL image, a list of them, or floats in [0, 1],
(H, W, 3) or (K, H, W, 3)) and returns a control image: (K, H, W, 3) float32 in [0, 1], white structure
on black, ready for ``pipe(prompt, controlnet=cn, control_image=...)``. :func:`canny_edges` and
:func:`grey` work on 8-bit arrays and give OpenCV's results bit for bit (tests/test_preprocessors.py).
"""

from __future__ import annotations

import numpy as np

from sdjax import images
from sdjax.data import shapes

# OpenCV's fixed point for the non-maximum suppression's direction test: tan(22.5°) · 2^15, rounded
_SHIFT = 15
_TAN22 = int(0.4142135623730950488 * (1 << _SHIFT) + 0.5)


def to_uint8(image) -> np.ndarray:
    """A pipeline image (PIL, list of PIL, or floats in [0, 1]) as (K, H, W, 3) uint8: round(255 x)."""
    return np.round(images.load_images(image) * 255.0).astype(np.uint8)


def as_condition(maps: np.ndarray) -> np.ndarray:
    """(K, H, W) 8-bit maps (0 or 255) → (K, H, W, 3) float32 in [0, 1], the three channels equal."""
    return np.repeat(maps[..., None].astype(np.float32) / 255.0, 3, axis=-1)


def grey(rgb: np.ndarray) -> np.ndarray:
    """(…, 3) uint8 RGB → (…) uint8 luma Y = 0.299 R + 0.587 G + 0.114 B, rounded in 15-bit fixed point as
    OpenCV 4 does (``cv2.cvtColor(x, cv2.COLOR_RGB2GRAY)``): (9798 R + 19235 G + 3735 B + 2^14) >> 15.
    (The 14-bit constants of older OpenCV round 16 of 6,000 random pixels the other way.)"""
    rgb = np.asarray(rgb).astype(np.int32)
    return ((9798 * rgb[..., 0] + 19235 * rgb[..., 1] + 3735 * rgb[..., 2] + (1 << 14)) >> 15).astype(np.uint8)


def _sobel(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """3×3 Sobel derivatives of (K, H, W, C) integers, border pixels replicated (OpenCV's BORDER_REPLICATE):

        ∂x = [−1 0 1; −2 0 2; −1 0 1] ⋆ x,    ∂y = ∂xᵀ ⋆ x   (y pointing down)."""
    p = np.pad(x.astype(np.int64), ((0, 0), (1, 1), (1, 1), (0, 0)), mode="edge")
    h, w = x.shape[1:3]

    def at(dy: int, dx: int) -> np.ndarray:
        return p[:, 1 + dy : 1 + dy + h, 1 + dx : 1 + dx + w]

    gx = (at(-1, 1) + 2 * at(0, 1) + at(1, 1)) - (at(-1, -1) + 2 * at(0, -1) + at(1, -1))
    gy = (at(1, -1) + 2 * at(1, 0) + at(1, 1)) - (at(-1, -1) + 2 * at(-1, 0) + at(-1, 1))
    return gx, gy


def _dilate(mask: np.ndarray, radius: int = 1) -> np.ndarray:
    """(K, H, W) booleans grown by ``radius`` pixels in the 8 directions (a (2r+1)² square)."""
    h, w = mask.shape[1:]
    p = np.pad(mask, ((0, 0), (radius, radius), (radius, radius)))
    out = np.zeros_like(mask)
    for dy in range(2 * radius + 1):
        for dx in range(2 * radius + 1):
            out |= p[:, dy : dy + h, dx : dx + w]
    return out


def canny_edges(pixels: np.ndarray, low: float = 100.0, high: float = 200.0, l2_gradient: bool = False) -> np.ndarray:
    """Canny's edge detector (Canny 1986) on 8-bit images, as OpenCV's ``cv2.Canny(x, low, high)`` (aperture 3).

    pixels: (H, W), (H, W, C), (K, H, W) or (K, H, W, C) uint8 → (K, H, W) uint8, 255 on edges, 0 elsewhere.

    1. Gradient g = (∂x, ∂y) by the Sobel filters; its magnitude |g| = |∂x| + |∂y| (L1), or ∂x² + ∂y² with
       ``l2_gradient`` (then the thresholds are squared). With several channels each pixel keeps the
       channel of the largest magnitude (the first on a tie).
    2. Non-maximum suppression: a pixel stays a candidate if |g| > low and it is a maximum along the
       gradient, its direction rounded to one of four (0°, 45°, 90°, 135°) with tan 22.5° in 15-bit fixed
       point; the comparison is strict on one side (>) and not on the other (≥) so a plateau two pixels
       wide keeps exactly one.
    3. Hysteresis: candidates with |g| > high are edges, and so is every candidate joined to an edge by a
       chain of 8-connected candidates (grown here until nothing changes).
    """
    x = np.asarray(pixels)
    if x.dtype != np.uint8:
        raise ValueError(f"canny_edges takes 8-bit images (uint8); got {x.dtype} (use canny() for pipeline images)")
    if x.ndim == 2:
        x = x[None, ..., None]
    elif x.ndim == 3:  # (H, W, C) with a few channels, or (K, H, W)
        x = x[None] if x.shape[-1] in (1, 3, 4) else x[..., None]
    if x.ndim != 4:
        raise ValueError(f"canny_edges: images of shape {np.shape(pixels)}; expected (H, W[, C]) or (K, H, W[, C])")
    if low > high:
        low, high = high, low
    gx, gy = _sobel(x)
    norm = gx * gx + gy * gy if l2_gradient else np.abs(gx) + np.abs(gy)
    if l2_gradient:
        low, high = (min(v, 32767.0) ** 2 if v > 0 else v for v in (low, high))
    low, high = int(np.floor(low)), int(np.floor(high))
    best = np.argmax(norm, axis=-1)[..., None]  # first channel on a tie, as OpenCV's strict ">"
    m, gx, gy = (np.take_along_axis(a, best, axis=-1)[..., 0] for a in (norm, gx, gy))

    k, h, w = m.shape
    p = np.pad(m, ((0, 0), (1, 1), (1, 1)))  # magnitude 0 outside the image

    def at(dy, dx):  # the magnitude at (i + dy, j + dx); dx may be an array of ±1
        rows = np.arange(h)[None, :, None] + 1 + dy
        cols = np.arange(w)[None, None, :] + 1 + dx
        return p[np.arange(k)[:, None, None], rows, cols]

    ax, ay = np.abs(gx), np.abs(gy) << _SHIFT
    tan22 = ax * _TAN22
    tan67 = tan22 + (ax << (_SHIFT + 1))  # tan 67.5° = tan 22.5° + 2
    horizontal, vertical = ay < tan22, ay > tan67
    s = np.where((gx ^ gy) < 0, -1, 1)  # the diagonal the gradient points along
    maximum = np.where(
        horizontal,
        (m > at(0, -1)) & (m >= at(0, 1)),
        np.where(vertical, (m > at(-1, 0)) & (m >= at(1, 0)), (m > at(-1, -s)) & (m > at(1, s))),
    )
    candidate = maximum & (m > low)
    edges = candidate & (m > high)
    while True:
        grown = _dilate(edges) & candidate
        if np.array_equal(grown, edges):
            return np.where(edges, 255, 0).astype(np.uint8)
        edges = grown


def canny(image, low: float = 100.0, high: float = 200.0) -> np.ndarray:
    """Canny edges of a pipeline image (ControlNet's "canny" preprocessor; 100/200 are its defaults):
    → (K, H, W, 3) float32, 1 on the edges. The edges of all three colour channels count."""
    return as_condition(canny_edges(to_uint8(image), low, high))


def threshold(image, level: int = 127) -> np.ndarray:
    """1 where the grey level is above ``level``, else 0 (``cv2.threshold(grey, level, 255, THRESH_BINARY)``,
    ControlNet's "binary" preprocessor) → (K, H, W, 3) float32."""
    return as_condition(np.where(grey(to_uint8(image)) > level, 255, 0).astype(np.uint8))


def scribble(image, width: int = 3, low: float = 100.0, high: float = 200.0) -> np.ndarray:
    """Strokes ``width`` pixels wide along the Canny edges: the kind of drawing a "scribble" ControlNet was
    trained on (its own preprocessor runs a network, HED, and thickens its lines the same way)
    → (K, H, W, 3) float32."""
    if width < 1:
        raise ValueError(f"scribble width={width}: need at least 1 pixel")
    edges = canny_edges(to_uint8(image), low, high) > 0
    return as_condition(np.where(_dilate(edges, (width - 1) // 2) if width > 1 else edges, 255, 0).astype(np.uint8))


# One colour per shape class, far from black (the background's label): the first rows of ADE20K's palette,
# which segmentation ControlNets were trained on.
SEGMENT_RGB = {
    "circle": (120, 120, 120),
    "ring": (180, 120, 120),
    "square": (6, 230, 230),
    "triangle": (80, 50, 50),
    "star": (4, 200, 3),
    "diamond": (120, 120, 80),
    "cross": (140, 140, 140),
    "crescent": (204, 5, 255),
}


def segmentation(samples: shapes.ShapesSample | list[shapes.ShapesSample], resolution: int = 64) -> np.ndarray:
    """The segmentation map of ``shapes`` scenes, drawn from their attributes: each object's pixels
    (the renderer's coverage ≥ ½) in its shape class's colour (``SEGMENT_RGB``), black elsewhere; the
    colour of an object is not in the map, only its class, place and outline → (K, R, R, 3) float32."""
    samples = [samples] if isinstance(samples, shapes.ShapesSample) else list(samples)
    out = np.zeros((len(samples), resolution, resolution, 3), np.float32)
    for k, sample in enumerate(samples):
        for obj in sample.objects:
            inside = shapes.object_coverage(obj, resolution) >= 0.5
            out[k][inside] = np.asarray(SEGMENT_RGB[obj.shape], np.float32) / 255.0
    return out
