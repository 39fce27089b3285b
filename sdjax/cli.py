"""The ``sdjax`` command line.

    sdjax train-ae --model vae --dataset shapes --steps 2000 --out runs/vae
    sdjax train-ddpm --out runs/ddpm
    sdjax convert SRC DST [--to sdjax|diffusers|compvis]
    sdjax strip-solutions notebooks/ exercises/

``train-ae`` trains the autoencoder of notebook 01 (``--model ae``) or the VAE of notebook 02
(``--model vae``) offline on ``shapes``/``digits`` or on a Hugging Face dataset when online. Run it
again with the same ``--out`` to resume from the checkpoint there.

``train-ddpm`` repeats the recipe of a model shipped in ``sdjax.pretrained`` (notebook 03's pixel
DDPM) and writes its weights in the shipped format, plus a grid of samples.

``convert`` reads Stable Diffusion weights from a diffusers folder, a CompVis single file or an
sdjax folder, and writes them in any of the three layouts (see ``sdjax.convert``).
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import sys
from pathlib import Path


def _load_dataset(name: str, resolution: int, num_images: int, seed: int):
    from sdjax import data

    if name == "shapes":
        return data.make_shapes(num_images, resolution=resolution, seed=seed)
    if name == "digits":
        return data.load_digits(resolution=resolution)
    return data.load_hf(name, resolution=resolution, limit=num_images)


def train_ae(args: argparse.Namespace) -> int:
    import numpy as np
    import optax
    from flax import nnx

    from sdjax import io, viz
    from sdjax.models import (
        Autoencoder,
        AutoencoderConfig,
        AutoencoderKL,
        VAEConfig,
        autoencoder_loss,
        vae_loss,
    )
    from sdjax.nn import count_params
    from sdjax.train import fit

    if args.quick:
        args.steps, args.num_images = min(args.steps, 60), min(args.num_images, 512)
    ds = _load_dataset(args.dataset, args.resolution, args.num_images, args.seed)
    images = ds.images[np.random.default_rng(args.seed).permutation(len(ds))]  # a random held-out split
    n_val = max(len(images) // 10, 8)
    train, val = images[n_val:], images[:n_val]
    channels = images.shape[-1]
    common = dict(
        in_channels=channels,
        out_channels=channels,
        block_out_channels=tuple(args.channels),
        latent_channels=args.latent_channels,
        norm_num_groups=8,
    )
    rngs = nnx.Rngs(args.seed)
    if args.model == "ae":
        cfg = AutoencoderConfig(**common)
        model, loss_fn = Autoencoder(cfg, rngs=rngs), autoencoder_loss
    else:
        cfg = VAEConfig(**common)
        model, loss_fn = AutoencoderKL(cfg, rngs=rngs), functools.partial(vae_loss, kl_weight=args.kl_weight)
    h, w, c = cfg.latent_shape(*images.shape[1:3])
    print(
        f"{args.model}: {len(train)} training images {images.shape[1:]} → latents {(h, w, c)}, "
        f"compression {images[0].size / (h * w * c):.1f}×, "
        f"{count_params(model):,} parameters"
    )

    out = Path(args.out)
    result = fit(
        model,
        loss_fn,
        {"image": train},
        steps=args.steps,
        batch_size=args.batch_size,
        optimizer=optax.adam(args.lr),
        seed=args.seed,
        checkpoint=out / "checkpoint.safetensors",
        checkpoint_every=args.checkpoint_every,
    )
    io.save_model(out / "model.safetensors", model, {"model": args.model, "config": dataclasses.asdict(cfg)})

    recon = np.asarray(model(val) if args.model == "ae" else model(val)[0])  # the VAE decodes the posterior mean
    val_mse = float(np.mean((recon - val) ** 2))
    viz.save_grid(out / "reconstructions.png", np.concatenate([val[:8], recon[:8]]), nrow=8)
    print(
        f"step {result.history['step'][-1]}: train loss {result.history['loss'][-1]:.4g}, "
        f"held-out reconstruction MSE {val_mse:.4g}"
    )
    print(f"wrote {out / 'model.safetensors'}, {out / 'reconstructions.png'} (top: input, bottom: reconstruction)")
    return 0


def train_ddpm(args: argparse.Namespace) -> int:
    import datetime
    import time

    import jax

    from sdjax import pretrained, viz
    from sdjax.diffusion import Sampler, sample
    from sdjax.nn import count_params

    recipe = pretrained.RECIPES[args.recipe]
    steps, num_images = (min(recipe.steps, 10), 512) if args.quick else (args.steps or recipe.steps, None)
    out = Path(args.out)
    print(f"{recipe.name}: {count_params(recipe.model()):,} parameters, {steps} steps of batch {recipe.batch_size}")
    start = time.time()
    result = pretrained.train(recipe, steps=steps, num_images=num_images, checkpoint=out / "checkpoint.safetensors")
    minutes = (time.time() - start) / 60
    loss = pretrained.final_loss(result.history)
    weights = out / f"{recipe.name}.safetensors"
    device = jax.devices()[0]
    pretrained.save(
        weights,
        result.ema_model,
        recipe,
        {
            "steps": steps,
            "final_loss": loss,
            "device": f"{device.platform}: {device.device_kind} ×{jax.device_count()}",
            "minutes_this_session": round(minutes, 1),
            "date": datetime.date.today().isoformat(),
        },
    )
    r = recipe.resolution
    images = sample(
        result.ema_model, recipe.schedule, jax.random.PRNGKey(0), (64, r, r, 3), sampler=Sampler("ddim", 50)
    )
    viz.save_grid(out / "samples.png", images, nrow=16)
    print(f"step {steps}: mean loss of the last 200 steps {loss:.4f}; {minutes:.1f} min")
    print(f"wrote {weights} and {out / 'samples.png'} (EMA weights, DDIM 50 steps)")
    return 0


def convert(args: argparse.Namespace) -> int:
    import time

    from sdjax import convert
    from sdjax.nn import count_params

    start = time.time()
    sd = convert.load(args.src)
    loaded = time.time() - start
    counts = {name: count_params(getattr(sd, name)) for name in ("unet", "vae", "text_encoder")}
    print(f"read {args.src}: {sd.version.upper()}, " + ", ".join(f"{k} {v / 1e6:.1f} M" for k, v in counts.items()))
    out = convert.save(sd, args.dst, args.to)
    written = time.time() - start - loaded
    print(f"wrote {out} ({args.to or 'default'} layout); {loaded:.1f} s to read, {written:.1f} s to write")
    return 0


def strip_solutions(args: argparse.Namespace) -> int:
    from sdjax.exercises import strip_notebook

    src, dst = Path(args.src), Path(args.dst)
    notebooks = sorted(src.glob("*.ipynb")) if src.is_dir() else [src]
    if not notebooks:
        print(f"no notebooks found at {src}", file=sys.stderr)
        return 1
    for nb in notebooks:
        target = dst / nb.name if src.is_dir() or dst.suffix != ".ipynb" else dst
        print(f"{nb} → {target}: {strip_notebook(nb, target)} exercise cells stripped")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="sdjax", description="Stable Diffusion from scratch in JAX.")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("train-ae", help="train the autoencoder (notebook 01) or the VAE (notebook 02)")
    p.add_argument("--model", choices=["ae", "vae"], default="ae")
    p.add_argument("--dataset", default="shapes", help="shapes, digits (offline) or a Hugging Face dataset name")
    p.add_argument("--resolution", type=int, default=32)
    p.add_argument("--num-images", type=int, default=4096, help="images to generate (shapes) or load (hub)")
    p.add_argument("--channels", type=int, nargs="+", default=[16, 32, 64], help="block_out_channels")
    p.add_argument("--latent-channels", type=int, default=4)
    p.add_argument("--kl-weight", type=float, default=1e-3, help="β, the KL weight (--model vae)")
    p.add_argument("--steps", type=int, default=1000)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--checkpoint-every", type=int, default=500)
    p.add_argument("--out", default="runs/ae")
    p.add_argument("--quick", action="store_true", help="a few steps on a little data, to check the set-up")
    p.set_defaults(func=train_ae)

    from sdjax.pretrained import RECIPES

    p = sub.add_parser("train-ddpm", help="train notebook 03's pixel-space DDPM (the recipe of the shipped weights)")
    p.add_argument("--recipe", choices=sorted(RECIPES), default="ddpm-shapes16")
    p.add_argument("--steps", type=int, default=None, help="default: the recipe's")
    p.add_argument("--out", default="runs/ddpm")
    p.add_argument("--quick", action="store_true", help="a few steps on a little data, to check the set-up")
    p.set_defaults(func=train_ddpm)

    p = sub.add_parser("convert", help="convert Stable Diffusion weights between diffusers, CompVis and sdjax layouts")
    p.add_argument("src", help="a diffusers folder, an sdjax folder, or a CompVis .safetensors/.ckpt file")
    p.add_argument("dst", help="output: a .safetensors file (CompVis layout) or a folder (sdjax layout)")
    p.add_argument("--to", choices=["sdjax", "diffusers", "compvis"], default=None, help="override the layout")
    p.set_defaults(func=convert)

    p = sub.add_parser("strip-solutions", help="write learners' copies of notebooks with exercise solutions removed")
    p.add_argument("src", help="a notebook or a folder of notebooks")
    p.add_argument("dst", help="output notebook or folder")
    p.set_defaults(func=strip_solutions)

    args = parser.parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
