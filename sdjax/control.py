"""ControlNet in the pipeline: the condition images, the per-step weights, and the UNet called with the
ControlNets' residuals (the model is :mod:`sdjax.models.controlnet`; diffusers'
``StableDiffusionControlNetPipeline`` and its img2img and inpaint variants).

    pipe(prompt, controlnet=cn, control_image=edges)                         one ControlNet
    pipe(prompt, controlnet=[cn_a, cn_b], control_image=[a, b],
         controlnet_conditioning_scale=[1.0, 0.5], control_guidance_end=[1.0, 0.6])    several

At evaluation i of K, ControlNet m's residuals are multiplied by

    w_{i,m} = conditioning_scale_m · [start_m ≤ i/K and (i + 1)/K ≤ end_m]

(diffusers' ``controlnet_keep``), and the residuals of all ControlNets are summed before the UNet adds
them to its skips. Guess mode: the unconditional half of a guided batch gets no residuals, and each
ControlNet scales its own from 0.1 to 1 across the levels (:class:`sdjax.models.controlnet.ControlNet`).
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from sdjax import images

Array = jax.Array


class Control(NamedTuple):
    """The ControlNets' per-image inputs, batched with the images (padded and split with them).

    images: per ControlNet, (N, H, W, C) float32 in [0, 1] at the output's size. weights: (N, K, M) the
    scale w_{i,m} of ControlNet m at evaluation i (the same for every image).
    """

    images: tuple[Array, ...]
    weights: Array


def _per_controlnet(value, m: int, name: str) -> list:
    values = list(value) if isinstance(value, (list, tuple)) else [value] * m
    if len(values) != m:
        raise ValueError(f"{name}: {len(values)} values for {m} ControlNets; give one, or one per ControlNet")
    return values


def prepare(controlnets, control_image, opts, evaluations: int, n: int, size: tuple[int, int] | None):
    """Check the ControlNet options and build the :class:`Control` of a run of ``n`` images (prompt-major,
    ``opts.num_images_per_prompt`` per prompt) and ``evaluations`` model evaluations; ``size`` (height,
    width) the output's, or None to take the control image's. Returns (controlnets tuple, Control or None,
    size)."""
    if controlnets is None:
        if control_image is not None:
            raise ValueError("control_image needs controlnet=: the ControlNet model(s) that read it")
        return (), None, size
    controlnets = tuple(controlnets) if isinstance(controlnets, (list, tuple)) else (controlnets,)
    if control_image is None:
        raise ValueError("controlnet= needs control_image=: the condition image(s) it reads")
    m = len(controlnets)
    if m > 1 and not (isinstance(control_image, (list, tuple)) and len(control_image) == m):
        raise ValueError(f"{m} ControlNets need a list of {m} control images (one image or batch per ControlNet)")
    loaded = [images.load_images(image) for image in (control_image if m > 1 else [control_image])]
    size = tuple(given or own for given, own in zip(size or (None, None), loaded[0].shape[1:3]))
    per_prompt, copies = n // opts.num_images_per_prompt, opts.num_images_per_prompt
    batch = []
    for k, (pixels, cn) in enumerate(zip(loaded, controlnets)):
        channels = cn.controlnet_config.conditioning_channels
        if pixels.shape[1:3] != tuple(size) or pixels.shape[3] != channels:
            raise ValueError(
                f"control image {k} is {pixels.shape[2]}×{pixels.shape[1]} (W×H) with {pixels.shape[3]} channels; "
                f"this run needs {size[1]}×{size[0]}, {channels} channels: resize it to the output's size"
            )
        if len(pixels) not in (1, per_prompt):
            raise ValueError(f"control image {k}: {len(pixels)} images for {per_prompt} prompts; give 1 or one each")
        batch.append(jnp.asarray(np.repeat(np.broadcast_to(pixels, (per_prompt, *pixels.shape[1:])), copies, 0)))
    scale = _per_controlnet(opts.controlnet_conditioning_scale, m, "controlnet_conditioning_scale")
    start = _per_controlnet(opts.control_guidance_start, m, "control_guidance_start")
    end = _per_controlnet(opts.control_guidance_end, m, "control_guidance_end")
    for s, e in zip(start, end):
        if not 0.0 <= s < e <= 1.0:
            raise ValueError(f"control_guidance_start={s}, control_guidance_end={e}: need 0 ≤ start < end ≤ 1")
    i = np.arange(evaluations)[:, None]
    keep = ~((i / evaluations < np.array(start)) | ((i + 1) / evaluations > np.array(end)))
    weights = (keep * np.array(scale, np.float32)).astype(np.float32)  # (K, M)
    return controlnets, Control(tuple(batch), jnp.asarray(np.broadcast_to(weights, (n, *weights.shape)))), size


def residuals(
    controlnets, x: Array, t, context, control_images, weights: Array, *, guess_mode: bool, guided: bool, added=None
):
    """The summed residuals of the ControlNets at one evaluation: x (B, h, w, 4) as the UNet sees it (B
    rows, pairs under guidance), weights (B, M) this evaluation's w_{·,m} → (down residuals, mid residual).
    In guess mode under guidance the unconditional rows (even: the pair layout (c_∅, c)) get none.
    added: SDXL's added conditioning, which an SDXL ControlNet takes as its UNet does."""
    down_sum = mid_sum = None
    for m, cn in enumerate(controlnets):
        down, mid = cn(
            x, t, context, control_images[m], conditioning_scale=weights[:, m], guess_mode=guess_mode, added_cond=added
        )
        down_sum = down if down_sum is None else [a + b for a, b in zip(down_sum, down)]
        mid_sum = mid if mid_sum is None else mid_sum + mid
    if guess_mode and guided:
        rows = (jnp.arange(x.shape[0]) % 2 == 1).astype(mid_sum.dtype)[:, None, None, None]
        down_sum, mid_sum = [r * rows for r in down_sum], mid_sum * rows
    return down_sum, mid_sum
