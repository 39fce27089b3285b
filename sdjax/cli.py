"""The ``sdjax`` command line.

    sdjax train-ae --model vae --dataset shapes --steps 2000 --out runs/vae
    sdjax train-ddpm --out runs/ddpm
    sdjax convert SRC DST [--to sdjax|diffusers|compvis]
    sdjax strip-solutions notebooks/ exercises/
    sdjax txt2img --prompt "a small green star on a black background"     # the bundled tiny model
    sdjax txt2img --ckpt MODEL --prompt "a red bicycle" [--n_samples 4 --n_iter 2 --plms ...]
    sdjax img2img --ckpt MODEL --init-img sketch.png --prompt "a red bicycle" [--strength 0.75 ...]
    sdjax train-lora --images DIR --prompt "a sks shape" [--rank 4 --steps 300 --format kohya] --out lora.safetensors
    sdjax train-ti --images DIR --token "<sks>" --init-word ring --out learned_embeds.safetensors
    sdjax train-dreambooth --images DIR --prompt "a sks shape" --class-prompt "a shape" --out runs/dreambooth
    sdjax txt2img --lora lora.safetensors:0.8 --embedding learned_embeds.safetensors --prompt "a <sks> ..."

``train-ae`` trains the autoencoder of notebook 01 (``--model ae``) or the VAE of notebook 02
(``--model vae``) offline on ``shapes``/``digits`` or on a Hugging Face dataset when online. Run it
again with the same ``--out`` to resume from the checkpoint there.

``train-ddpm`` repeats the recipe of a model shipped in ``sdjax.pretrained`` (notebook 03's pixel
DDPM) and writes its weights in the shipped format, plus a grid of samples.

``train-lora``, ``train-ti`` and ``train-dreambooth`` fine-tune a model (default: the bundled one) on a
folder of images (``sdjax.finetune``: random crops and flips, one instance prompt or a ``NAME.txt`` caption
beside each image) and write the LoRA file, the embedding or the whole model; ``txt2img``/``img2img``
then take them with ``--lora PATH[:SCALE]`` and ``--embedding PATH``. Without ``--class-prompt``,
``train-dreambooth`` is a plain fine-tune of the UNet on the images and their captions.

``convert`` reads Stable Diffusion weights from a diffusers folder, a CompVis single file or an
sdjax folder, and writes them in any of the three layouts (see ``sdjax.convert``).

Without ``--ckpt``, ``txt2img`` and ``img2img`` run the tiny model that ships inside the package
(``sdjax/weights/tiny-sd-shapes``, :mod:`sdjax.tiny_sd`: 64-px images of the ``shapes`` captions) and
say so. ``txt2img`` and ``img2img`` take the flags of CompVis's ``scripts/txt2img.py``/``img2img.py`` and
write what they do: ``OUTDIR/samples/00000.png``… (numbering on from the files already there) and
``OUTDIR/grid-0000.png``…, a grid with ``--n_rows`` images per row (CompVis passes it as
torchvision's ``nrow``), one batch of ``--n_samples`` images per row by default. The run makes
``--n_iter`` rounds over the prompts, one batch of ``--n_samples`` images of one prompt each (CompVis
packs ``--from-file`` prompts n_samples to a batch instead; one prompt per batch lets a single call
redraw any sample). Batch b of the run (from 0) is drawn with seed ``--seed`` + b, its image i
from ``fold_in(PRNGKey(seed + b), i)`` (:class:`sdjax.StableDiffusion`).

Every PNG records how it was made in text chunks: prompt, negative_prompt, seed, index, batch_size,
sampler, steps, scale, eta, size (W×H), model, dtype, sdjax_version (img2img adds init_image and
strength; the grid lists its prompts, one per line, and the run's first seed), and all of it as one
AUTOMATIC1111-style ``parameters`` text. A sample is regenerated exactly by repeating its batch::

    pipe = StableDiffusion.from_pretrained(model, dtype=dtype)
    w, h = size.split("x")
    pipe(prompt, negative_prompt=negative_prompt, height=int(h), width=int(w), num_inference_steps=steps,
         guidance_scale=scale, scheduler=sampler, eta=eta, seed=seed, num_images_per_prompt=batch_size)[index]

and an img2img sample by ``pipe.img2img(prompt, image, strength=strength, …)[index]`` with the same
arguments but height and width, ``image`` the init image resized to ``size`` with ``Image.LANCZOS``.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import re
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


# sdjax sampler → the name AUTOMATIC1111's web UI gives it in a "parameters" text
A1111_SAMPLERS = {
    "ddpm": "DDPM",
    "ddim": "DDIM",
    "plms": "PLMS",
    "euler": "Euler",
    "euler_a": "Euler a",
    "dpmpp_2m": "DPM++ 2M",
    "lms": "LMS",
    "heun": "Heun",
}
COMPVIS_PROMPT = "a painting of a virus monster playing guitar"  # txt2img.py's default
BUNDLED_PROMPT = "a large red circle at the top left and a small blue star at the bottom right on a white background"
PRECISIONS = {"full": "float32", "autocast": "bfloat16"}  # CompVis's --precision → the networks' dtype
SAMPLE_NAME, GRID_NAME = r"(\d{5})\.png", r"grid-(\d{4})\.png"  # outdir/samples/00000.png, outdir/grid-0000.png


def _checked_settings(args: argparse.Namespace) -> tuple[list[str], str]:
    """The prompts and the sampler of a txt2img/img2img run, after the checks that need no model."""
    from sdjax.samplers import SAMPLERS

    if args.ckpt is None:
        from sdjax.tiny_sd import BUNDLE

        if not (BUNDLE / "sdjax.safetensors").is_file():
            raise FileNotFoundError(
                f"no --ckpt given and the bundled model is missing from {BUNDLE} (a broken install?): "
                "reinstall sdjax, or pass --ckpt a diffusers folder, an sdjax folder or a CompVis file"
            )
        args.ckpt = str(BUNDLE)
        print(
            f"no --ckpt: using the bundled tiny model ({BUNDLE}), 64-px images of coloured shapes, trained from "
            "scratch by sdjax.tiny_sd. For real Stable Diffusion pass --ckpt (notebooks/05_stable_diffusion.ipynb)."
        )
        if args.prompt is None:
            args.prompt = BUNDLED_PROMPT
    if args.prompt is None:
        args.prompt = COMPVIS_PROMPT
    for flag in ("n_samples", "n_iter", "ddim_steps", "n_rows"):
        if getattr(args, flag) is not None and getattr(args, flag) < 1:
            raise ValueError(f"--{flag} must be at least 1, got {getattr(args, flag)}")
    sampler = args.sampler or ("plms" if args.plms else "ddim")
    if sampler not in SAMPLERS:
        raise ValueError(f"unknown sampler {sampler!r}: expected one of {', '.join(SAMPLERS)}")
    if args.ddim_eta != 0.0 and sampler != "ddim":
        raise ValueError(f"--ddim_eta is DDIM's; the {sampler} sampler has none (leave it at 0 or use --sampler ddim)")
    if args.from_file is None:
        return [args.prompt], sampler
    path = Path(args.from_file)
    if not path.is_file():
        raise FileNotFoundError(f"no such prompt file: {path}")
    prompts = [line.strip() for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    if not prompts:
        raise ValueError(f"{path} holds no prompts: expected one prompt per line")
    return prompts, sampler


def _load_pipeline(args: argparse.Namespace):
    import time

    import jax

    from sdjax import StableDiffusion
    from sdjax.nn import set_attention_implementation
    from sdjax.speed import enable_compilation_cache

    if jax.config.jax_compilation_cache_dir is None:  # (JAX_COMPILATION_CACHE_DIR, if set, is kept)
        enable_compilation_cache()  # a second run of the same shapes loads its compiled programs from disk
    start = time.perf_counter()
    pipe = StableDiffusion.from_pretrained(args.ckpt, dtype=PRECISIONS[args.precision])
    if args.attention != "auto":
        set_attention_implementation(pipe.unet, args.attention)
        set_attention_implementation(pipe.vae, args.attention)
    if args.vae_tiling is not None:
        pipe.enable_vae_tiling(args.vae_tiling or None)
    print(
        f"loaded {args.ckpt} ({pipe.components.version.upper()}, {PRECISIONS[args.precision]}) "
        f"in {time.perf_counter() - start:.1f} s"
    )
    return pipe


def _next_number(folder: Path, pattern: str) -> int:
    """One past the highest number of the files in ``folder`` whose names fullmatch ``pattern``."""
    numbers = [int(m[1]) for p in folder.glob("*") if (m := re.fullmatch(pattern, p.name))]
    return max(numbers, default=-1) + 1


def _parameters(meta: dict[str, str]) -> str:
    """``meta`` as AUTOMATIC1111's web UI writes it (its "PNG info"): prompt, negative prompt, settings."""
    lines = [meta["prompt"]]
    if meta["negative_prompt"]:
        lines.append(f"Negative prompt: {meta['negative_prompt']}")
    settings = {
        "Steps": meta["steps"],
        "Sampler": A1111_SAMPLERS[meta["sampler"]],
        "CFG scale": meta["scale"],
        "Seed": meta["seed"],
        "Size": meta["size"],
        "Model": Path(meta["model"]).stem,
        "Batch size": meta["batch_size"],
    }
    if "index" in meta:
        settings["Batch pos"] = meta["index"]
    if "strength" in meta:
        settings["Denoising strength"] = meta["strength"]
    if float(meta["eta"]):
        settings["Eta DDIM"] = meta["eta"]
    settings["Version"] = f"sdjax {meta['sdjax_version']}"
    return "\n".join([*lines, ", ".join(f"{k}: {v}" for k, v in settings.items())])


def _png_info(meta: dict[str, str]):
    from PIL.PngImagePlugin import PngInfo

    info = PngInfo()
    for key, value in (meta | {"parameters": _parameters(meta)}).items():
        info.add_text(key, value)  # text outside Latin-1 goes in an iTXt chunk instead
    return info


def _generate(args: argparse.Namespace, prompts: list[str], draw, run: dict[str, str]) -> int:
    """The loop txt2img and img2img share: ``--n_iter`` rounds over the prompts, one batch of
    ``draw(prompt, seed)`` (``--n_samples`` PIL images) per prompt and round, each saved with its
    metadata (``run`` plus its own prompt, seed and place in the batch), then the grid."""
    import textwrap
    import time

    import numpy as np
    from PIL import Image

    from sdjax import viz

    outdir, sample_dir = Path(args.outdir), Path(args.outdir) / "samples"
    sample_dir.mkdir(parents=True, exist_ok=True)
    number = _next_number(sample_dir, SAMPLE_NAME)
    batches = [prompt for _ in range(args.n_iter) for prompt in prompts]
    saved, images = [], []
    for b, prompt in enumerate(batches):
        seed = args.seed + b
        start = time.perf_counter()
        batch = draw(prompt, seed)
        elapsed = time.perf_counter() - start
        print(
            f"batch {b + 1}/{len(batches)}: {len(batch)} × {textwrap.shorten(prompt, 50)!r}, seed {seed}, "
            f"{elapsed:.1f} s{' (compiling included)' if b == 0 else ''}"
        )
        if not args.skip_save:
            for index, image in enumerate(batch):
                meta = {"prompt": prompt, "seed": str(seed), "index": str(index)} | run
                path = sample_dir / f"{number + len(saved):05}.png"
                image.save(path, pnginfo=_png_info(meta))
                saved.append(path)
        images += batch
    if saved:
        print(f"wrote {len(saved)} images to {sample_dir}: {saved[0].name} … {saved[-1].name}")
    if not args.skip_grid:
        grid = viz.make_grid(np.stack(images) / 127.5 - 1, nrow=args.n_rows or args.n_samples)  # uint8 → [−1, 1]
        path = outdir / f"grid-{_next_number(outdir, GRID_NAME):04}.png"
        meta = {"prompt": "\n".join(prompts), "seed": str(args.seed)} | run
        Image.fromarray(grid).save(path, pnginfo=_png_info(meta))
        print(f"wrote the grid {path}")
    return 0


def _run_metadata(args: argparse.Namespace, sampler: str, width: int, height: int) -> dict[str, str]:
    """What every PNG of a run records, besides its prompt, seed and index."""
    from sdjax import __version__

    return {
        "negative_prompt": args.negative_prompt,
        "batch_size": str(args.n_samples),
        "sampler": sampler,
        "steps": str(args.ddim_steps),
        "scale": str(args.scale),
        "eta": str(args.ddim_eta),
        "size": f"{width}x{height}",
        "model": args.ckpt,
        "dtype": PRECISIONS[args.precision],
        "sdjax_version": __version__,
    }


def txt2img(args: argparse.Namespace) -> int:
    prompts, sampler = _checked_settings(args)
    pipe = _load_pipeline(args)
    _add_finetuned(args, pipe)
    native = pipe.unet.config.sample_size * pipe.vae_scale_factor
    height, width = args.H or native, args.W or native

    def draw(prompt: str, seed: int) -> list:
        return pipe(
            prompt,
            negative_prompt=args.negative_prompt,
            height=height,
            width=width,
            num_inference_steps=args.ddim_steps,
            guidance_scale=args.scale,
            scheduler=sampler,
            seed=seed,
            num_images_per_prompt=args.n_samples,
            output_type="pil",
            eta=args.ddim_eta,
        )

    return _generate(args, prompts, draw, _run_metadata(args, sampler, width, height))


def _add_finetuned(args: argparse.Namespace, pipe) -> None:
    """--embedding and --lora: what fine-tuning made, added to the loaded model."""
    for path in args.embedding or []:
        print(f"textual inversion {path}: added {', '.join(pipe.load_textual_inversion(path))}")
    if args.lora:
        path, _, scale = args.lora.rpartition(":") if re.fullmatch(r".+:[0-9.]+", args.lora) else (args.lora, "", "1")
        report = pipe.load_lora(path, scale=float(scale))
        print(f"LoRA {path} ({report['format']} layout) at strength {float(scale):g}")


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
        seed=args.seed,
        **_method_options(args, method),
    )
    if args.ckpt is None:
        from sdjax.tiny_sd import BUNDLE

        args.ckpt = str(BUNDLE)
        print(f"no --ckpt: fine-tuning the bundled tiny model ({BUNDLE})")
    from sdjax import StableDiffusion

    pipe = StableDiffusion.from_pretrained(args.ckpt)
    pipe.progress = False
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
    p.add_argument("--seed", type=int, default=0)


def _read_init_image(path: str | None):
    from PIL import Image

    if path is None:
        raise ValueError("--init-img is required: the image to start from")
    if not Path(path).is_file():
        raise FileNotFoundError(f"no such init image: {path}")
    try:
        with Image.open(path) as image:
            return image.convert("RGB")
    except OSError as e:
        raise ValueError(f"{path} could not be read as an image ({e})") from e


def _fit(image, multiple: int):
    """``image`` cut down to sides that are multiples of ``multiple`` (64 for SD), resized as CompVis does."""
    from PIL import Image

    w, h = image.size
    size = (w - w % multiple, h - h % multiple)
    if 0 in size:
        raise ValueError(f"the init image is {w}×{h}; this model needs sides of at least {multiple} pixels")
    if size != image.size:
        print(f"init image {w}×{h} resized to {size[0]}×{size[1]} (this model takes multiples of {multiple})")
        image = image.resize(size, Image.LANCZOS)
    return image


def img2img(args: argparse.Namespace) -> int:
    if not 0.0 < args.strength <= 1.0:
        raise ValueError(
            f"--strength must be in (0, 1] (near 0 keeps the init image, 1 redraws it), got {args.strength}"
        )
    prompts, sampler = _checked_settings(args)
    image = _read_init_image(args.init_img)
    pipe = _load_pipeline(args)
    _add_finetuned(args, pipe)
    image = _fit(image, pipe.size_multiple)

    def draw(prompt: str, seed: int) -> list:
        return pipe.img2img(
            prompt,
            image,
            strength=args.strength,
            negative_prompt=args.negative_prompt,
            num_inference_steps=args.ddim_steps,
            guidance_scale=args.scale,
            scheduler=sampler,
            seed=seed,
            num_images_per_prompt=args.n_samples,
            output_type="pil",
            eta=args.ddim_eta,
        )

    run = _run_metadata(args, sampler, *image.size) | {"init_image": args.init_img, "strength": str(args.strength)}
    return _generate(args, prompts, draw, run)


def _generation_arguments(p: argparse.ArgumentParser, outdir: str) -> None:
    """The flags txt2img and img2img share, with CompVis's names and defaults."""
    from sdjax.samplers import SAMPLERS

    p.add_argument(
        "--prompt", help=f"the prompt to render (default: {BUNDLED_PROMPT!r} for the bundled model, else CompVis's)"
    )
    p.add_argument("--negative_prompt", default="", help="what to steer away from (default: none)")
    p.add_argument("--from-file", metavar="FILE", help="prompts, one per line (instead of --prompt)")
    p.add_argument(
        "--ckpt",
        metavar="PATH",
        help="the model: a diffusers folder, an sdjax folder or a CompVis file (default: the bundled tiny model)",
    )
    p.add_argument("--outdir", metavar="DIR", default=outdir, help="where samples/ and the grids go (%(default)s)")
    p.add_argument("--skip_grid", action="store_true", help="do not save a grid")
    p.add_argument("--skip_save", action="store_true", help="do not save the individual samples")
    p.add_argument("--ddim_steps", type=int, default=50, help="sampling steps, whatever the sampler (%(default)s)")
    p.add_argument("--plms", action="store_true", help="sample with PLMS instead of DDIM")
    p.add_argument("--sampler", metavar="NAME", help=f"one of {', '.join(SAMPLERS)}; overrides --plms (default: ddim)")
    p.add_argument("--ddim_eta", type=float, default=0.0, help="DDIM's η (0: deterministic); ddim only")
    p.add_argument("--n_iter", type=int, default=1, help="batches per prompt (%(default)s)")
    p.add_argument("--n_samples", type=int, default=1, help="images per batch (%(default)s)")
    p.add_argument("--n_rows", type=int, default=None, help="images per grid row (default: n_samples)")
    p.add_argument("--scale", type=float, default=7.5, help="classifier-free guidance scale (%(default)s)")
    p.add_argument(
        "--seed", type=int, default=42, help="batch b of the run (from 0) is drawn with seed + b (%(default)s)"
    )
    p.add_argument(
        "--precision",
        choices=sorted(PRECISIONS),
        default="autocast",
        help="full: float32; autocast: bfloat16 (%(default)s)",
    )
    p.add_argument(
        "--attention",
        choices=["auto", "xla", "cudnn"],
        default="auto",
        help="attention kernel: cuDNN's fused one on a GPU in bf16/fp16 (auto), or XLA's everywhere (%(default)s)",
    )
    p.add_argument(
        "--vae-tiling",
        type=int,
        nargs="?",
        const=0,
        metavar="PIXELS",
        help="encode/decode images larger than PIXELS (default: the model's size, 512 for SD) in overlapping "
        "tiles: the VAE's memory of one tile, tiny seams",
    )
    p.add_argument("--lora", metavar="PATH[:SCALE]", help="a LoRA file (diffusers or kohya) at strength SCALE (1)")
    p.add_argument("--embedding", metavar="PATH", action="append", help="a textual-inversion embedding (repeatable)")


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

    saved = (
        "Writes DIR/samples/00000.png… and DIR/grid-0000.png…, numbering on from the files there; every PNG "
        "records its prompt, seed and settings in text chunks, enough to regenerate it."
    )
    p = sub.add_parser(
        "txt2img",
        help="text to image with a Stable Diffusion model (CompVis's scripts/txt2img.py)",
        description=f"Text to image, with the flags of CompVis's scripts/txt2img.py. {saved}",
    )
    _generation_arguments(p, "outputs/txt2img-samples")
    p.add_argument("--H", type=int, default=None, help="image height in pixels (default: the model's, 512 for SD1.x)")
    p.add_argument("--W", type=int, default=None, help="image width in pixels (default: the model's)")
    p.set_defaults(func=txt2img)

    p = sub.add_parser(
        "img2img",
        help="redraw an image after a prompt (CompVis's scripts/img2img.py)",
        description=f"Image to image (SDEdit), with the flags of CompVis's scripts/img2img.py. {saved}",
    )
    _generation_arguments(p, "outputs/img2img-samples")
    p.add_argument(
        "--init-img", metavar="PATH", help="the image to start from (required); resized to multiples of 64 px for SD"
    )
    p.add_argument(
        "--strength", type=float, default=0.75, help="in (0, 1]: near 0 keeps the image, 1 redraws it (%(default)s)"
    )
    p.set_defaults(func=img2img)

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

    args = parser.parse_args(argv)
    if isinstance(args.func, functools.partial):
        try:
            return args.func(args)
        except (ValueError, FileNotFoundError) as e:
            print(f"sdjax {args.command}: error: {e}", file=sys.stderr)
            return 2
    if args.func not in (txt2img, img2img):
        return args.func(args)
    try:
        return args.func(args)
    except (ValueError, FileNotFoundError) as e:  # how bad flags, files and models are reported; others: bugs
        print(f"sdjax {args.command}: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
