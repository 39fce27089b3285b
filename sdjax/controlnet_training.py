"""Training a ControlNet on a trained Stable Diffusion (Zhang, Rao & Agrawala 2023, arXiv:2302.05543, §3.3).

The objective is the model's own denoising loss with the ControlNet in the loop, and only the ControlNet's
weights θ_c free (the UNet, the VAE and the text encoder stay frozen):

    L(θ_c) = E_{z_0, t, c_t, c_f, ε} ‖target − ε̂(z_t, t, c_t, ControlNet_θc(z_t, t, c_t, c_f))‖²,

c_t the prompt and c_f the condition image: here a preprocessor's picture of the training image itself
(:mod:`sdjax.preprocessors`, Canny edges by default), so the pair (image, edges) costs nothing to make. Half of
the prompts are replaced by the empty prompt (the paper's 50 %): with no text to lean on, the ControlNet has to
read the structure from c_f.

The ControlNet starts as a copy of the UNet's encoder with its zero convolutions at 0
(:meth:`sdjax.models.controlnet.ControlNet.from_unet`), so at step 0 the model is exactly the frozen one, and
training can only add what the condition image explains. The loss is :func:`sdjax.tiny_sd.conditional_diffusion_loss`
with the condition image as one more input, and :func:`sdjax.train.fit` trains with
``trainable = nnx.PathContains("controlnet")``.

    data = controlnet_training.training_data(pipe, images, prompts)          # latents, ids, edges
    controlnet, fit = controlnet_training.train(pipe, data, ControlNetTrainConfig(steps=2000))
    pipe(prompt, controlnet=controlnet, control_image=preprocessors.canny(new_image))
"""

from __future__ import annotations

import dataclasses
import os
import sys
from pathlib import Path

import jax
import numpy as np
import optax
from flax import nnx

from sdjax import convert, preprocessors
from sdjax.finetune import encode_latents
from sdjax.models.controlnet import ControlNet, ControlNetConfig
from sdjax.pipeline import StableDiffusion
from sdjax.tiny_sd import conditional_diffusion_loss
from sdjax.train import FitResult, fit

Array = jax.Array
TRAINABLE = nnx.All(nnx.Param, nnx.PathContains("controlnet"))  # what ``train`` moves in a ControlledUNet


@dataclasses.dataclass
class ControlNetTrainConfig:
    """steps, batch_size, lr: the run (Adam; the paper uses 1e-5 on SD1.5, a toy model takes a larger step).
    caption_dropout: the share of prompts replaced by "" (the paper's 0.5). seed: fixes the ControlNet's
    random condition embedding, the data order and every draw of the loss."""

    steps: int = 2000
    batch_size: int = 32
    lr: float = 3e-4
    caption_dropout: float = 0.5
    seed: int = 0


class ControlledUNet(nnx.Module):
    """The frozen text encoder and UNet with the ControlNet in the loop, so one ``fit`` call sees all three:
    (z_t (B, h, w, 4), t (B,), ids (B, 77), cond (B, 8h, 8w, 3) uint8) → the UNet's prediction (B, h, w, 4).
    The condition images are kept as 8-bit pixels (a quarter of the memory of float32) and read as x / 255."""

    def __init__(self, unet, text_encoder, controlnet: ControlNet):
        self.unet, self.text_encoder, self.controlnet = unet, text_encoder, controlnet

    def __call__(self, z_t: Array, t: Array, ids: Array, cond: Array) -> Array:
        context = jax.lax.stop_gradient(self.text_encoder(ids).last_hidden_state)
        z_t = z_t.astype(context.dtype)
        control = self.controlnet(z_t, t, context, cond.astype(context.dtype) / 255.0)
        return self.unet(z_t, t, context, control=control)


def training_data(
    sd: StableDiffusion, images: np.ndarray, prompts: list[str], preprocessor=preprocessors.canny
) -> dict[str, np.ndarray]:
    """``fit``'s data: images (N, H, W, 3) in [−1, 1] and their prompts → {"latent": z_0 = s · E(x) (N, H/8,
    W/8, 4), "ids": (N, 77), "cond": preprocessor((x + 1) / 2) as (N, H, W, 3) uint8}."""
    images = np.asarray(images, np.float32)
    if len(prompts) != len(images):
        raise ValueError(f"{len(prompts)} prompts for {len(images)} images: give one prompt per image")
    cond = preprocessor(np.clip((images + 1.0) / 2.0, 0.0, 1.0))
    return {
        "latent": encode_latents(sd, images),
        "ids": np.asarray(sd.tokenizer(list(prompts)), np.int32),
        "cond": np.round(cond * 255.0).astype(np.uint8),
    }


def train(
    sd: StableDiffusion,
    data: dict[str, np.ndarray],
    config: ControlNetTrainConfig | None = None,
    *,
    controlnet: ControlNet | None = None,
    checkpoint: str | os.PathLike | None = None,
    progress: bool = True,
) -> tuple[ControlNet, FitResult]:
    """Train a ControlNet for ``sd`` on ``data`` (:func:`training_data`); ``sd`` is not changed. A new
    ControlNet starts from the UNet's encoder (``from_unet``) unless ``controlnet`` is given (it trains on).
    Returns (the trained ControlNet, ``fit``'s result, whose ``history`` holds the loss)."""
    config = config or ControlNetTrainConfig()
    if sd.dtype != np.float32:
        raise ValueError("train a ControlNet on a float32 pipeline (its weights are the optimizer's masters)")
    if controlnet is None:
        controlnet = ControlNet.from_unet(sd.unet, ControlNetConfig(sd.unet.config), rngs=nnx.Rngs(config.seed))
    model = ControlledUNet(sd.unet, sd.text_encoder, controlnet)
    empty_ids = np.asarray(sd.tokenizer([""]), np.int32)[0]
    result = fit(
        model,
        conditional_diffusion_loss(sd.schedule, empty_ids, config.caption_dropout, inputs=("cond",)),
        data,
        steps=config.steps,
        batch_size=config.batch_size,
        optimizer=optax.adam(config.lr),
        seed=config.seed,
        checkpoint=checkpoint,
        progress=progress,
        desc="ControlNet",
        trainable=TRAINABLE,
    )
    return controlnet, result


CANNY_SHAPES = Path(__file__).parent / "weights" / "controlnet-canny-shapes"


def load_canny_shapes(dtype=None) -> ControlNet:
    """The shipped Canny ControlNet of the bundled model (:func:`main` made it; its ``train_info.json`` says
    how), its float16 weights loaded in ``dtype`` (default float32)."""
    return convert.load_controlnet(CANNY_SHAPES, dtype=dtype)


def main(argv: list[str] | None = None) -> None:
    """``python -m sdjax.controlnet_training``: train the shipped Canny ControlNet of the bundled model
    (sdjax/weights/tiny-sd-shapes) on fresh ``shapes`` scenes and their Canny edges, and write it in float16
    with ``train_info.json`` (the run's settings, loss, time, device)."""
    import argparse
    import datetime
    import json
    import time

    from sdjax import tiny_sd
    from sdjax.data import make_shapes

    parser = argparse.ArgumentParser(description=main.__doc__)
    parser.add_argument("--out", default=str(CANNY_SHAPES), help="the folder to write (a diffusers ControlNetModel)")
    parser.add_argument("--images", type=int, default=8000, help="training scenes (64 px, 1–2 objects)")
    parser.add_argument("--data-seed", type=int, default=11, help="seed of the scenes (the bundle's own is 0)")
    parser.add_argument("--steps", type=int, default=3000)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--lr", type=float, default=3e-4)
    parser.add_argument("--checkpoint", help="resume from and save to this file")
    args = parser.parse_args(argv)
    start = time.time()
    pipe = StableDiffusion.from_pretrained(tiny_sd.BUNDLE)
    scenes = make_shapes(args.images, resolution=64, seed=args.data_seed)
    data = training_data(pipe, np.asarray(scenes.images), list(scenes.captions))
    config = ControlNetTrainConfig(steps=args.steps, batch_size=args.batch_size, lr=args.lr)
    controlnet, result = train(pipe, data, config, checkpoint=args.checkpoint)
    folder = convert.save_controlnet(controlnet, args.out, dtype="float16")
    device = jax.devices()[0]
    info = {
        "base": "tiny-sd-shapes (sdjax/weights/tiny-sd-shapes)",
        "condition": "Canny edges, sdjax.preprocessors.canny (OpenCV's defaults 100/200)",
        "images": args.images,
        "data_seed": args.data_seed,
        **dataclasses.asdict(config),
        "final_loss": float(np.mean(result.history["loss"][-200:])),
        "loss_per_50_steps": [round(float(np.mean(chunk)), 5) for chunk in np.array_split(
            np.asarray(result.history["loss"]), max(1, len(result.history["loss"]) // 50))],  # fmt: skip
        "minutes": round((time.time() - start) / 60, 1),
        "device": f"{device.platform}: {device.device_kind} ×{jax.device_count()}",
        "date": datetime.date.today().isoformat(),
        "command": "python -m sdjax.controlnet_training " + " ".join(argv if argv is not None else sys.argv[1:]),
    }
    (folder / "train_info.json").write_text(json.dumps(info, indent=1) + "\n")
    print(f"wrote {folder}: {info}")


if __name__ == "__main__":
    main()
