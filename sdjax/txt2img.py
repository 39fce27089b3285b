"""``sdjax txt2img`` and ``sdjax img2img``: CompVis's ``scripts/txt2img.py`` and ``img2img.py``, on sdjax.

    sdjax txt2img --prompt "a small green star on a black background"     # the bundled tiny model
    sdjax txt2img --ckpt MODEL --prompt "a red bicycle" [--n_samples 4 --n_iter 2 --plms ...]
    sdjax img2img --ckpt MODEL --init-img sketch.png --prompt "a red bicycle" [--strength 0.75 ...]

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
sampler, steps, scale, eta, size (W×H), model, dtype, prompt_syntax, truncate_prompts, sdjax_version
(img2img adds init_image and strength; the grid lists its prompts, one per line, and the run's first
seed), and all of it as one AUTOMATIC1111-style ``parameters`` text. A sample is regenerated exactly by
repeating its batch::

    pipe = StableDiffusion.from_pretrained(model, dtype=dtype)
    w, h = size.split("x")
    pipe(prompt, negative_prompt=negative_prompt, height=int(h), width=int(w), num_inference_steps=steps,
         guidance_scale=scale, scheduler=sampler, eta=eta, seed=seed, num_images_per_prompt=batch_size,
         prompt_syntax=prompt_syntax, truncate_prompts=truncate_prompts == "True")[index]

and an img2img sample by ``pipe.img2img(prompt, image, strength=strength, …)[index]`` with the same
arguments but height and width, ``image`` the init image resized to ``size`` with ``Image.LANCZOS``.
"""

from __future__ import annotations

import argparse
import re
from pathlib import Path

COMPVIS_PROMPT = "a painting of a virus monster playing guitar"  # txt2img.py's default
BUNDLED_PROMPT = "a large red circle at the top left and a small blue star at the bottom right on a white background"
PRECISIONS = {"full": "float32", "autocast": "bfloat16"}  # CompVis's --precision → the networks' dtype
PREPROCESSORS = ("none", "canny", "scribble", "threshold")  # --preprocess: sdjax.preprocessors' functions
SAMPLE_NAME, GRID_NAME = r"(\d{5})\.png", r"grid-(\d{4})\.png"  # outdir/samples/00000.png, outdir/grid-0000.png


def _checked_settings(args: argparse.Namespace) -> tuple[list[str], str]:
    """The prompts and the sampler of a txt2img/img2img run, after the checks that need no model."""
    from sdjax.samplers import resolve

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
    name, _ = resolve(sampler)  # an unknown name is refused here, before any model is loaded
    if args.ddim_eta != 0.0 and name != "ddim":
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
    from sdjax.samplers import a1111_name

    lines = [meta["prompt"]]
    if meta["negative_prompt"]:
        lines.append(f"Negative prompt: {meta['negative_prompt']}")
    settings = {
        "Steps": meta["steps"],
        "Sampler": a1111_name(meta["sampler"]),
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
        "prompt_syntax": args.prompt_syntax,
        "truncate_prompts": str(args.truncate_prompts),
        "sdjax_version": __version__,
    } | ({"controlnet": ";".join(args.controlnet), "control": ";".join(args.control)} if args.controlnet else {}) | (
        {"preprocess": ";".join(args.preprocess)} if args.controlnet and args.preprocess else {}
    )


def _options(args: argparse.Namespace, sampler: str) -> dict:
    """The pipeline's options (:class:`sdjax.pipeline.Options`) that CompVis's flags set, but the seed."""
    return dict(
        negative_prompt=args.negative_prompt,
        num_inference_steps=args.ddim_steps,
        guidance_scale=args.scale,
        scheduler=sampler,
        num_images_per_prompt=args.n_samples,
        output_type="pil",
        eta=args.ddim_eta,
        prompt_syntax=args.prompt_syntax,
        truncate_prompts=args.truncate_prompts,
    )


def txt2img(args: argparse.Namespace) -> int:
    prompts, sampler = _checked_settings(args)
    pipe = _load_pipeline(args)
    _add_finetuned(args, pipe)
    control = _control(args, pipe)
    native = pipe.unet.config.sample_size * pipe.vae_scale_factor
    if control:  # without --H/--W, the condition image's size (as diffusers)
        native_w, native_h = control["control_image"][0].size
    else:
        native_w = native_h = native
    height, width = args.H or native_h, args.W or native_w

    def draw(prompt: str, seed: int) -> list:
        if args.hires:
            from sdjax.hires import hires_fix

            scale, strength = args.hires
            options = _options(args, sampler)
            return hires_fix(pipe, prompt, height=height, width=width, scale=scale, strength=strength, seed=seed,
                             **options)  # fmt: skip
        return pipe(prompt, height=height, width=width, seed=seed, **_options(args, sampler), **control)

    run = _run_metadata(args, sampler, width, height)
    if args.hires:
        if control:
            raise ValueError("--hires with --controlnet: the condition image fits one of the two passes only")
        run |= {"hires": f"{args.hires[0]:g}:{args.hires[1]:g}"}
    return _generate(args, prompts, draw, run)


def _add_finetuned(args: argparse.Namespace, pipe) -> None:
    """--embedding, --lora and --hypernetwork: what fine-tuning made, added to the loaded model."""
    for path in args.embedding or []:
        print(f"textual inversion {path}: added {', '.join(pipe.load_textual_inversion(path))}")
    if args.lora:
        path, _, scale = args.lora.rpartition(":") if re.fullmatch(r".+:[0-9.]+", args.lora) else (args.lora, "", "1")
        report = pipe.load_lora(path, scale=float(scale))
        print(f"LoRA {path} ({report['format']} layout) at strength {float(scale):g}")
    if getattr(args, "hypernetwork", None):  # (a Namespace built by hand may lack it)
        from sdjax.hypernetwork import load_hypernetwork

        spec = args.hypernetwork
        path, _, scale = spec.rpartition(":") if re.fullmatch(r".+:[0-9.]+", spec) else (spec, "", "1")
        net = load_hypernetwork(path, pipe.unet, strength=float(scale))
        print(f"hypernetwork {path} (context widths {list(net.widths)}) at strength {float(scale):g}")


def _control(args: argparse.Namespace, pipe) -> dict:
    """--controlnet/--control: the pipeline's ControlNet options (none without the flags)."""
    from sdjax.convert import load_controlnet

    nets, images = args.controlnet or [], args.control or []
    if len(nets) != len(images):
        raise ValueError(
            f"{len(nets)} --controlnet and {len(images)} --control: give one condition image per ControlNet"
        )
    if not nets:
        return {}
    paths, scales = [], []
    for spec in nets:
        path, _, scale = spec.rpartition(":") if re.fullmatch(r".+:[0-9.]+", spec) else (spec, "", "1")
        paths.append(path)
        scales.append(float(scale))
    steps = args.preprocess or ["none"]
    if len(steps) not in (1, len(images)):
        raise ValueError(f"{len(steps)} --preprocess for {len(images)} --control: give one, or one per --control")
    steps = steps * len(images) if len(steps) == 1 else steps
    controlnets = []
    for path, scale in zip(paths, scales):
        controlnets.append(load_controlnet(path, dtype=pipe.dtype))
        print(f"ControlNet {path} at scale {scale:g}")
    return {
        "controlnet": controlnets,
        "control_image": [_preprocess(_read_image(path, "control image"), s) for path, s in zip(images, steps)],
        "controlnet_conditioning_scale": scales,
    }


def _preprocess(image, name: str):
    """--preprocess NAME: the control image made from a photo by :mod:`sdjax.preprocessors` (or as it is)."""
    import numpy as np
    from PIL import Image

    from sdjax import preprocessors

    if name == "none":
        return image
    made = getattr(preprocessors, name)(image)[0]
    return Image.fromarray(np.round(made * 255.0).astype(np.uint8))


def _read_image(path: str, what: str):
    from PIL import Image

    if not Path(path).is_file():
        raise FileNotFoundError(f"no such {what}: {path}")
    try:
        with Image.open(path) as image:
            return image.convert("RGB")
    except OSError as e:
        raise ValueError(f"{path} could not be read as an image ({e})") from e


def _read_init_image(path: str | None):
    if path is None:
        raise ValueError("--init-img is required: the image to start from")
    return _read_image(path, "init image")


def _fit(image, multiple: int):
    """``image`` cut down to sides that are multiples of ``multiple`` (8 for SD; CompVis's script cuts to 64, which its
    UNet needed), resized as CompVis does."""
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
    control = _control(args, pipe)

    def draw(prompt: str, seed: int) -> list:
        return pipe.img2img(prompt, image, strength=args.strength, seed=seed, **_options(args, sampler), **control)

    run = _run_metadata(args, sampler, *image.size) | {"init_image": args.init_img, "strength": str(args.strength)}
    return _generate(args, prompts, draw, run)


def add_arguments(p: argparse.ArgumentParser, outdir: str) -> None:
    """The flags txt2img and img2img share, with CompVis's names and defaults."""

    p.add_argument(
        "--prompt", help=f"the prompt to render (default: {BUNDLED_PROMPT!r} for the bundled model, else CompVis's)"
    )
    p.add_argument("--negative_prompt", default="", help="what to steer away from (default: none)")
    p.add_argument(
        "--prompt-syntax",
        choices=["none", "a1111", "compel"],
        default="none",
        help="read weights in the prompts: a1111 '(word:1.3) [word] BREAK', compel 'word++ (words)0.8 "
        "(\"a\", \"b\").blend(0.7, 0.3)'; none: the text as it is (%(default)s)",
    )
    p.add_argument(
        "--truncate-prompts",
        action="store_true",
        help="cut prompts to CLIP's 75 tokens, with a warning, as diffusers does (default: longer prompts are "
        "encoded whole, in 75-token chunks, as the web UI and compel do)",
    )
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
    p.add_argument(
        "--sampler",
        metavar="NAME",
        help='an sdjax name (dpmpp_2m, euler_a, …) or a web-UI one ("DPM++ 2M Karras", "Euler a", …: '
        "docs/samplers.md); overrides --plms (default: ddim)",
    )
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
    p.add_argument(
        "--hypernetwork",
        metavar="PATH[:STRENGTH]",
        help="an AUTOMATIC1111 hypernetwork .pt at strength STRENGTH (1), applied to the UNet's attention",
    )
    p.add_argument(
        "--controlnet",
        metavar="PATH[:SCALE]",
        action="append",
        help="a ControlNet (diffusers folder or single file) at conditioning scale SCALE (1); repeatable, "
        "each with its --control",
    )
    p.add_argument("--control", metavar="IMAGE", action="append", help="the condition image of each --controlnet")
    p.add_argument(
        "--preprocess",
        choices=PREPROCESSORS,
        action="append",
        help="make each --control image from a picture first (sdjax.preprocessors): canny edges, scribble strokes, "
        "a threshold mask; one for all, or one per --control (default none: the image is the condition)",
    )


def _hires(spec: str) -> tuple[float, float]:
    """--hires SCALE[:STRENGTH] → (scale, strength); strength 0.55 by default."""
    scale, _, strength = spec.partition(":")
    try:
        return float(scale), float(strength or 0.55)
    except ValueError:
        raise argparse.ArgumentTypeError(f"--hires {spec!r}: expected SCALE[:STRENGTH], e.g. 2 or 2:0.5") from None


def add_commands(sub) -> None:
    """The ``txt2img`` and ``img2img`` sub-commands of the ``sdjax`` parser (:mod:`sdjax.cli`)."""
    saved = (
        "Writes DIR/samples/00000.png… and DIR/grid-0000.png…, numbering on from the files there; every PNG "
        "records its prompt, seed and settings in text chunks, enough to regenerate it."
    )
    p = sub.add_parser(
        "txt2img",
        help="text to image with a Stable Diffusion model (CompVis's scripts/txt2img.py)",
        description=f"Text to image, with the flags of CompVis's scripts/txt2img.py. {saved}",
    )
    add_arguments(p, "outputs/txt2img-samples")
    p.add_argument("--H", type=int, default=None, help="image height in pixels (default: the model's, 512 for SD1.x)")
    p.add_argument("--W", type=int, default=None, help="image width in pixels (default: the model's)")
    p.add_argument(
        "--hires",
        type=_hires,
        metavar="SCALE[:STRENGTH]",
        help="hires fix: draw at --H×--W, enlarge SCALE times, redraw with img2img at STRENGTH (0.55)",
    )
    p.set_defaults(func=txt2img)

    p = sub.add_parser(
        "img2img",
        help="redraw an image after a prompt (CompVis's scripts/img2img.py)",
        description=f"Image to image (SDEdit), with the flags of CompVis's scripts/img2img.py. {saved}",
    )
    add_arguments(p, "outputs/img2img-samples")
    p.add_argument(
        "--init-img", metavar="PATH", help="the image to start from (required); resized to multiples of 64 px for SD"
    )
    p.add_argument(
        "--strength", type=float, default=0.75, help="in (0, 1]: near 0 keeps the image, 1 redraws it (%(default)s)"
    )
    p.set_defaults(func=img2img)
