"""The ``sdjax`` command line.

    sdjax train-ae --model vae --dataset shapes --steps 2000 --out runs/vae
    sdjax train-ddpm --out runs/ddpm
    sdjax convert SRC DST [--to sdjax|diffusers|compvis]
    sdjax strip-solutions notebooks notebooks/exercises                 # the student editions
    sdjax txt2img --prompt "a small green star on a black background"     # the bundled tiny model
    sdjax txt2img --ckpt MODEL --prompt "a red bicycle" [--n_samples 4 --n_iter 2 --plms ...]
    sdjax img2img --ckpt MODEL --init-img sketch.png --prompt "a red bicycle" [--strength 0.75 ...]
    sdjax train-lora --images DIR --prompt "a sks shape" [--rank 4 --steps 300 --format kohya] --out lora.safetensors
    sdjax train-ti --images DIR --token "<sks>" --init-word ring --out learned_embeds.safetensors
    sdjax train-dreambooth --images DIR --prompt "a sks shape" --class-prompt "a shape" --out runs/dreambooth
    sdjax txt2img --lora lora.safetensors:0.8 --embedding learned_embeds.safetensors --prompt "a <sks> ..."
    sdjax train-finetune --dataset lambdalabs/pokemon-blip-captions --ckpt MODEL [--ema-decay 0.9999 --min-snr-gamma 5]

``train-ae`` trains the autoencoder of notebook 01 (``--model ae``) or the VAE of notebook 02
(``--model vae``) offline on ``shapes``/``digits`` or on a Hugging Face dataset when online. Run it
again with the same ``--out`` to resume from the checkpoint there.

``train-ddpm`` repeats the recipe of a model shipped in ``sdjax.pretrained`` (``--recipe ddpm-digits16``,
notebook 03's pixel DDPM, or ``ddpm-shapes16``) and writes its weights in the shipped format, plus a grid of samples.

``train-lora``, ``train-ti`` and ``train-dreambooth`` fine-tune a model (default: the bundled one) on a
folder of images (``sdjax.finetune``: random crops and flips, one instance prompt or a ``NAME.txt`` caption
beside each image) and write the LoRA file, the embedding or the whole model; ``txt2img``/``img2img``
then take them with ``--lora PATH[:SCALE]`` and ``--embedding PATH``. Without ``--class-prompt``,
``train-dreambooth`` is a plain fine-tune of the UNet on the images and their captions.

``train-finetune`` fine-tunes the whole UNet on a captioned dataset (the text-to-image recipe): a Hugging Face
dataset name, a folder written by ``save_to_disk``, an ``imagefolder`` with ``metadata.jsonl``, parquet/arrow files
or a folder of images with ``NAME.txt`` captions (:mod:`sdjax.captioned`); ``--checkpoint`` resumes an interrupted
run, and with ``--ema-decay`` the EMA weights are the ones written.

``convert`` reads Stable Diffusion weights from a diffusers folder, a CompVis single file or an
sdjax folder, and writes them in any of the three layouts (see ``sdjax.convert``).

``txt2img`` and ``img2img`` (:mod:`sdjax.txt2img`) take the flags of CompVis's scripts and write numbered PNGs
that record how they were made.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import sys
from pathlib import Path

from sdjax import txt2img


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
    from sdjax.diffusion import sample
    from sdjax.nn import count_params
    from sdjax.samplers import DDIM

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
    r, (n, sampler) = recipe.resolution, ((16, DDIM(10)) if args.quick else (64, DDIM(50)))
    images = sample(
        result.ema_model, recipe.schedule, jax.random.PRNGKey(0), (n, r, r, recipe.unet.in_channels), sampler=sampler
    )
    viz.save_grid(out / "samples.png", images, nrow=16)
    print(f"step {steps}: mean loss of the last 200 steps {loss:.4f}; {minutes:.1f} min")
    print(f"wrote {weights} and {out / 'samples.png'} (EMA weights, {n} samples, DDIM {sampler.steps} steps)")
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


def merge_models(args: argparse.Namespace) -> int:
    """sdjax merge: weighted sum / add difference / per-block weights (sdjax.merge.merge), or LoRAs baked in."""
    from sdjax import merge

    if args.lora:
        if len(args.models) != 1 or args.blocks:
            raise ValueError("--lora bakes adapters into one model: give one model and no --blocks (merge first)")
        loras = []
        for spec in args.lora:
            path, _, strength = spec.partition(":") if not Path(spec).exists() else (spec, "", "")
            loras.append((path, float(strength) if strength else 1.0))
        out = merge.bake_lora(args.models[0], loras, args.output)
        print(f"wrote {out}: {args.models[0]} with {', '.join(f'{p} × {s}' for p, s in loras)} baked in")
        return 0
    out = merge.merge(args.models, args.output, alpha=args.alpha, block_weights=args.blocks, dtype=args.dtype)
    how = "weighted sum (1 − α)A + αB" if len(args.models) == 2 else "add difference A + α(B − C)"
    print(f"wrote {out}: {how}, " + (f"block weights {args.blocks}" if args.blocks else f"α = {args.alpha}"))
    return 0


def strip_solutions(args: argparse.Namespace) -> int:
    """Write the student edition of each notebook (``sdjax.editions.student_edition``), or with ``--check`` only
    compare them with the ones already written: exit status 1 if any is missing or out of date."""
    import json

    from sdjax.editions import student_edition, write_notebook

    src, dst = Path(args.src), Path(args.dst)
    notebooks = sorted(src.glob("*.ipynb")) if src.is_dir() else [src]
    if not notebooks:
        print(f"no notebooks found at {src}", file=sys.stderr)
        return 1
    stale = []
    for nb in notebooks:
        target = dst / nb.name if src.is_dir() or dst.suffix != ".ipynb" else dst
        edition = student_edition(nb, target)
        names = ", ".join(e.name for e in edition.exercises) or "none"
        if args.check:
            current = target.exists() and json.loads(target.read_text(encoding="utf-8")) == edition.notebook
            print(f"{target}: {'up to date' if current else 'OUT OF DATE'} (from {nb}; exercises: {names})")
            stale += [] if current else [target]
            continue
        write_notebook(edition.notebook, target)
        print(
            f"{nb} → {target}: exercises {names}; cells with solutions stripped: {edition.stripped}, exercise and "
            f"check cells cleared: {edition.cleared}, the other cells' outputs kept"
        )
    if stale:
        print(
            f"{len(stale)} student edition{'s' * (len(stale) > 1)} missing or out of date: "
            f"run `sdjax strip-solutions {args.src} {args.dst}` and commit the result",
            file=sys.stderr,
        )
        return 1
    return 0


def _finetune(args: argparse.Namespace, method: str) -> int:
    """train-lora, train-ti, train-dreambooth: fine-tune a model on a folder of images (sdjax.finetune)."""
    import time

    import numpy as np

    from sdjax import finetune

    images, captions = finetune.load_image_folder(args.images)
    prompt = args.prompt or captions
    if method == "textual_inversion":
        prompt = args.prompt or f"a {args.token}"
    if prompt is None:
        raise ValueError(
            f"no --prompt and no captions in {args.images} (NAME.txt beside each NAME.png): give an instance prompt "
            "with a rare token, e.g. --prompt 'a sks dog'"
        )
    if method == "dreambooth" and not args.class_prompt:
        method = "full"  # no prior to preserve: a plain fine-tune on the images and their prompts
    config = finetune.FinetuneConfig(
        method=method,
        steps=args.steps,
        batch_size=args.batch_size,
        learning_rate=args.lr,
        views_per_image=args.views_per_image,
        crop_scale=(1.0, 1.0) if args.no_crops else (args.min_crop, 1.0),
        flip=not args.no_flip,
        dtype="bfloat16" if args.bf16 else "float32",
        remat=args.remat,
        optimizer=args.optimizer,
        seed=args.seed,
        **_method_options(args, method),
    )
    pipe = _pipeline_to_finetune(args.ckpt)
    what = f"'{prompt}'" if isinstance(prompt, str) else "their captions"
    print(f"{len(images)} images × {config.views_per_image} views, {what}; {method}, {config.steps} steps")
    start = time.perf_counter()
    result = finetune.run(
        pipe,
        images,
        prompt,
        config,
        class_prompt=getattr(args, "class_prompt", None),
        num_class_images=getattr(args, "num_class_images", 0) if method == "dreambooth" else 0,
    )
    path = finetune.save(pipe, config, args.out, format=args.format)
    loss = result.history["loss"]
    print(
        f"trained in {time.perf_counter() - start:.0f} s (loss {np.mean(loss[:10]):.4f} → {np.mean(loss[-10:]):.4f}); "
        f"wrote {path}"
    )
    return 0


def _pipeline_to_finetune(ckpt: str | None):
    """The model a fine-tuning command starts from (default: the bundled tiny model)."""
    from sdjax import StableDiffusion

    if ckpt is None:
        from sdjax.tiny_sd import BUNDLE

        ckpt = str(BUNDLE)
        print(f"no --ckpt: fine-tuning the bundled tiny model ({BUNDLE})")
    pipe = StableDiffusion.from_pretrained(ckpt)
    pipe.progress = False
    return pipe


def _finetune_dataset(args: argparse.Namespace, method: str) -> int:
    """train-finetune: the whole UNet on a captioned dataset (sdjax.captioned, finetune.dataset_training_data)."""
    import time

    import numpy as np

    from sdjax import captioned, finetune

    config = finetune.FinetuneConfig(
        method=method,
        steps=args.max_train_steps,
        batch_size=args.batch_size,
        learning_rate=args.lr,
        views_per_image=args.views_per_image,
        center_crop=args.center_crop,
        flip=not args.no_flip,
        caption_dropout=args.caption_dropout,
        ema_decay=args.ema_decay,
        min_snr_gamma=args.min_snr_gamma,
        dtype="bfloat16" if args.bf16 else "float32",
        remat=args.remat,
        optimizer=args.optimizer,
        seed=args.seed,
    )
    dataset = captioned.load_captioned(
        args.dataset,
        split=args.split,
        image_column=args.image_column,
        caption_column=args.caption_column,
        limit=args.max_samples,
    )
    print(f"{args.dataset} ({dataset.layout}): {len(dataset)} captioned images, e.g. {dataset.captions[0]!r}")
    pipe = _pipeline_to_finetune(args.ckpt)
    start = time.perf_counter()
    data = finetune.dataset_training_data(pipe, dataset, config, resolution=args.resolution)
    print(
        f"{len(data['latent'])} views ({config.views_per_image} per image, "
        f"{'centre' if config.center_crop else 'random'} crops{', flips' if config.flip else ''}) encoded to latents "
        f"{data['latent'].shape[1:]} in {time.perf_counter() - start:.0f} s"
    )
    if args.checkpoint and Path(args.checkpoint).exists():
        print(f"resuming from {args.checkpoint}")
    start = time.perf_counter()
    result = finetune.finetune(pipe, data, config, checkpoint=args.checkpoint, checkpoint_every=args.checkpoint_every)
    path = finetune.save(pipe, config, args.out, format=args.format)
    loss = result.history["loss"]
    weights = f"EMA weights (decay {config.ema_decay})" if config.ema_decay is not None else "weights"
    print(
        f"trained to step {result.history['step'][-1]} in {time.perf_counter() - start:.0f} s "
        f"(loss {np.mean(loss[:10]):.4f} → {np.mean(loss[-10:]):.4f}); wrote the {weights} to {path}"
    )
    return 0


def _method_options(args: argparse.Namespace, method: str) -> dict:
    if method == "lora":
        return {"rank": args.rank, "alpha": args.alpha, "lora_text_encoder": args.text_encoder}
    if method == "textual_inversion":
        return {"token": args.token, "init_word": args.init_word, "num_vectors": args.num_vectors}
    if method == "dreambooth":
        return {"prior_loss_weight": args.prior_loss_weight}
    return {}


def _finetune_arguments(p: argparse.ArgumentParser, out: str, steps: int, formats: list[str]) -> None:
    """The flags train-lora, train-ti and train-dreambooth share."""
    p.add_argument("--images", required=True, metavar="DIR", help="a folder of training images (NAME.txt: captions)")
    p.add_argument("--prompt", help="the instance prompt for every image, with a rare token (e.g. 'a sks dog')")
    p.add_argument("--ckpt", metavar="PATH", help="the model to fine-tune (default: the bundled tiny model)")
    p.add_argument("--out", default=out, help="where the result goes (%(default)s)")
    p.add_argument("--format", choices=formats, default=None, help=f"file layout (default: {formats[0]})")
    p.add_argument("--steps", type=int, default=steps, help="optimizer steps (%(default)s)")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--lr", type=float, default=None, help="learning rate (default: the method's)")
    p.add_argument("--views-per-image", type=int, default=32, help="augmented views of each image (%(default)s)")
    p.add_argument("--min-crop", type=float, default=0.5, help="smallest crop side, share of the image (%(default)s)")
    p.add_argument("--no-crops", action="store_true", help="train on whole images only (no random crops)")
    p.add_argument("--no-flip", action="store_true", help="no left-right flips (text, asymmetric subjects)")
    p.add_argument("--bf16", action="store_true", help="compute in bfloat16 (float32 master weights)")
    p.add_argument("--remat", action="store_true", help="recompute UNet activations in the backward pass: less memory")
    p.add_argument(
        "--optimizer",
        choices=["adam", "adafactor"],
        default="adam",
        help="adafactor: factored optimizer state, megabytes instead of 2× the weights (%(default)s)",
    )
    p.add_argument("--seed", type=int, default=0)


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
    p.add_argument("--recipe", choices=sorted(RECIPES), default="ddpm-digits16", help="default: notebook 03's")
    p.add_argument("--steps", type=int, default=None, help="default: the recipe's")
    p.add_argument("--out", default="runs/ddpm")
    p.add_argument("--quick", action="store_true", help="a few steps on a little data, to check the set-up")
    p.set_defaults(func=train_ddpm)

    p = sub.add_parser("convert", help="convert Stable Diffusion weights between diffusers, CompVis and sdjax layouts")
    p.add_argument("src", help="a diffusers folder, an sdjax folder, or a CompVis .safetensors/.ckpt file")
    p.add_argument("dst", help="output: a .safetensors file (CompVis layout) or a folder (sdjax layout)")
    p.add_argument("--to", choices=["sdjax", "diffusers", "compvis"], default=None, help="override the layout")
    p.set_defaults(func=convert)

    p = sub.add_parser("merge", help="merge checkpoints (weighted sum, add difference, per-block α) or bake in LoRAs")
    p.add_argument(
        "models", nargs="+", metavar="MODEL",
        help="A B: weighted sum (1 − α)A + αB; A B C: add difference A + α(B − C); one model with --lora",
    )  # fmt: skip
    p.add_argument("-o", "--output", required=True, help="a .safetensors file (CompVis inputs) or a folder")
    p.add_argument("--alpha", type=float, default=0.5, help="α (%(default)s); BASE's α when --blocks has 25 weights")
    p.add_argument("--blocks", metavar="W,W,…", help="one α per UNet block: 25 (IN00…IN11, M00, OUT00…OUT11) or 26 "
                   "(BASE first) for SD1/SD2")  # fmt: skip
    p.add_argument("--lora", action="append", metavar="FILE[:STRENGTH]", help="bake a LoRA/LyCORIS file in (repeats)")
    p.add_argument("--dtype", choices=["float32", "float16", "bfloat16"], help="output dtype (default: A's)")
    p.set_defaults(func=merge_models)

    p = sub.add_parser("strip-solutions", help="write learners' copies of notebooks with exercise solutions removed")
    p.add_argument("src", help="a notebook or a folder of notebooks")
    p.add_argument("dst", help="output notebook or folder")
    p.add_argument("--check", action="store_true", help="write nothing; exit 1 if a copy in DST is out of date")
    p.set_defaults(func=strip_solutions)

    txt2img.add_commands(sub)

    p = sub.add_parser("train-lora", help="teach a model a subject or style from a few images with LoRA (notebook 07)")
    _finetune_arguments(p, "lora.safetensors", 300, ["diffusers", "kohya"])
    p.add_argument("--rank", type=int, default=4, help="r, the rank of the update (%(default)s)")
    p.add_argument("--alpha", type=float, default=None, help="α; the update is scaled by α/r (default: α = r)")
    p.add_argument("--text-encoder", action="store_true", help="also adapt the text encoder's attention")
    p.set_defaults(func=functools.partial(_finetune, method="lora"))

    p = sub.add_parser("train-ti", help="learn a new token's embedding from a few images (textual inversion)")
    _finetune_arguments(p, "learned_embeds.safetensors", 300, ["diffusers", "a1111"])
    p.add_argument("--token", required=True, help="the new token, a string not in the vocabulary (e.g. '<my-cat>')")
    p.add_argument("--init-word", required=True, help="an existing one-token word to start from (e.g. 'cat')")
    p.add_argument("--num-vectors", type=int, default=1, help="embedding vectors behind the token (%(default)s)")
    p.set_defaults(func=functools.partial(_finetune, method="textual_inversion"))

    p = sub.add_parser(
        "train-dreambooth",
        help="fine-tune the whole UNet on a few images, with prior preservation (DreamBooth), or on a captioned folder",
    )
    _finetune_arguments(p, "runs/dreambooth", 300, ["sdjax", "diffusers", "compvis"])
    p.add_argument("--class-prompt", help="the class without the token, e.g. 'a dog' (turns prior preservation on)")
    p.add_argument("--num-class-images", type=int, default=50, help="images drawn for the prior (%(default)s)")
    p.add_argument("--prior-loss-weight", type=float, default=1.0, help="λ (%(default)s)")
    p.set_defaults(func=functools.partial(_finetune, method="dreambooth"))

    p = sub.add_parser(
        "train-finetune", help="fine-tune the whole UNet on a captioned dataset (Hugging Face name or local folder)"
    )
    p.add_argument("--dataset", required=True, metavar="NAME_OR_PATH", help="Hub name, or a local folder/file")
    p.add_argument("--split", default="train", help="the split to train on (%(default)s)")
    p.add_argument("--image-column", default="image", help="the column of the images (%(default)s)")
    p.add_argument("--caption-column", default="text", help="the column of the captions (%(default)s)")
    p.add_argument("--max-samples", type=int, default=None, help="train on the first N images only")
    p.add_argument("--ckpt", metavar="PATH", help="the model to fine-tune (default: the bundled tiny model)")
    p.add_argument("--out", default="runs/finetune", help="where the model goes (%(default)s)")
    p.add_argument("--format", choices=["sdjax", "diffusers", "compvis"], default=None,
                   help="layout of --out (default: compvis for a .safetensors path, else sdjax)")  # fmt: skip
    p.add_argument("--resolution", type=int, default=None, help="training size (default: the model's)")
    p.add_argument("--center-crop", action="store_true", help="centre crops (default: random crops)")
    p.add_argument("--no-flip", action="store_true", help="no random left-right flips")
    p.add_argument("--views-per-image", type=int, default=1, help="crops drawn (once) per image (%(default)s)")
    p.add_argument("--max-train-steps", type=int, default=500, help="optimizer steps in all (%(default)s)")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--lr", type=float, default=None, help="learning rate (default 1e-4; SD1.5: 1e-5)")
    p.add_argument("--caption-dropout", type=float, default=0.0, help="share of empty captions (e.g. 0.1)")
    p.add_argument("--ema-decay", type=float, default=None, help="keep an EMA (e.g. 0.9999): it is what is saved")
    p.add_argument("--min-snr-gamma", type=float, default=None, help="min-SNR-γ loss weighting (e.g. 5)")
    p.add_argument("--bf16", action="store_true", help="compute in bfloat16 (float32 master weights)")
    p.add_argument("--remat", action="store_true", help="recompute UNet activations in the backward pass: less memory")
    p.add_argument(
        "--optimizer",
        choices=["adam", "adafactor"],
        default="adam",
        help="adafactor: factored optimizer state, megabytes instead of 2× the weights (%(default)s)",
    )
    p.add_argument("--checkpoint", metavar="FILE", help="resume from FILE if it exists; save the train state there")
    p.add_argument("--checkpoint-every", type=int, default=500, help="steps between checkpoints (%(default)s)")
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(func=functools.partial(_finetune_dataset, method="full"))

    args = parser.parse_args(argv)
    if isinstance(args.func, functools.partial):
        try:
            return args.func(args)
        except (ValueError, FileNotFoundError) as e:
            print(f"sdjax {args.command}: error: {e}", file=sys.stderr)
            return 2
    if args.func not in (txt2img.txt2img, txt2img.img2img, merge_models):
        return args.func(args)
    try:
        return args.func(args)
    # how bad flags, files and models are reported, and a run that diverged (non-finite latents); others: bugs
    except (ValueError, FileNotFoundError, FloatingPointError) as e:
        print(f"sdjax {args.command}: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
