"""Hires fix, as the web UIs do it: draw the image at the size the model was trained at, enlarge it, then
redraw the enlarged image with img2img at a moderate strength.

A model trained on 512-pixel images, asked for 1024 pixels directly, lays out its composition at the
scale of its training images: two heads, repeated objects. Drawing at 512 first fixes the composition;
img2img at the large size (SDEdit, :mod:`sdjax.img2img`) then adds detail at that size while keeping the
layout, the more so the lower ``strength``:

    x_small = txt2img(prompt, h, w)                 the composition
    x_big   = resize(x_small, (s·h, s·w))           Lanczos, in pixels
    image   = img2img(prompt, x_big, strength)      the detail

The enlargement is in pixel space (the web UIs' "Lanczos" upscaler); their "Latent" upscalers, which
resize the latents instead, are not implemented.
"""

from __future__ import annotations

import numpy as np
from PIL import Image


def hires_fix(pipe, prompt, *, height: int | None = None, width: int | None = None, scale: float = 2.0,
              strength: float = 0.55, **options):  # fmt: skip
    """``pipe(prompt, height, width)``, enlarged ``scale`` times (each side rounded down to a multiple of
    ``pipe.size_multiple``), redrawn by ``pipe.img2img(prompt, …, strength)``. ``options``: the
    pipeline's (:class:`sdjax.pipeline.Options`), used by both passes; returns what ``output_type`` asks for.
    """
    if scale <= 1.0:
        raise ValueError(f"hires fix scale={scale}: enlarge by more than 1 (2 is usual)")
    output_type = options.pop("output_type", "pil")
    first = pipe(prompt, height=height, width=width, output_type="np", **options)
    m = pipe.size_multiple
    h, w = first.shape[1:3]
    size = (int(w * scale) // m * m, int(h * scale) // m * m)
    big = [Image.fromarray(np.round(image * 255).astype(np.uint8)).resize(size, Image.LANCZOS) for image in first]
    pixels = np.stack([np.asarray(image, np.float32) / 255.0 for image in big])
    # each first-pass image is redrawn once: its own prompt, one copy
    copies = options.pop("num_images_per_prompt", 1)
    texts = [prompt] if isinstance(prompt, str) else list(prompt)
    prompts = [text for text in texts for _ in range(copies)]
    negative = options.pop("negative_prompt", None)
    if isinstance(negative, list):
        negative = [n for n in negative for _ in range(copies)]
    return pipe.img2img(prompts, pixels, strength=strength, negative_prompt=negative, output_type=output_type,
                        **options)  # fmt: skip
