#!/usr/bin/env python
"""Compare candidate weights (from tools/gpu_train.py) with the shipped ones, on the CPU, with the
measures notebooks 03 and 04 report; optionally install the candidates into sdjax/weights/.

    python tools/evaluate_weights.py --ddpm OUT/ddpm-shapes16.safetensors --unet OUT/tiny-sd-unet.safetensors
    python tools/evaluate_weights.py --quick ...        # a smoke run on fewer images
    python tools/evaluate_weights.py --install ...      # copy the candidates in (only when told)

Pixel DDPM on shapes (``ddpm-shapes16``, the model notebook 03 used before it moved to digits, and
the one notebooks 06 and 09 use): 500 DDIM-50 samples from PRNGKey(7); the probe's
reading (read confidently; confidently one object — a valid single-object scene, the issue's ≥ 90 %;
held-out share of those) and the catalogue report (median distance to the nearest real image,
recognisable, held-out share of recognisable, distinct / expected). Notebook 03 computes no FID.

tiny-sd (notebook 04, section 6): ``tiny_sd.prompt_following`` on ``evaluation_prompts(300, seed=1)`` at
w = 1, 2, 4, 7.5, 12, DDIM 25 steps, scored by the shipped probe ("everything" = prompt entirely right,
the issue's ≥ 88 % at the best w; shape ≥ 93 %), with the real-image row on top.
"""

from __future__ import annotations

import argparse
import datetime
import json
import shutil
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repo root, should PYTHONPATH lack it

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from flax import nnx  # noqa: E402

from sdjax import StableDiffusion, convert, data, diffusion, io, metrics, pretrained, probe, tiny_sd  # noqa: E402
from sdjax.samplers import DDIM  # noqa: E402

UNET_FORMAT = "sdjax-tiny-sd-unet"  # tools/gpu_train.py's UNet file
SCALES = [1.0, 2.0, 4.0, 7.5, 12.0]  # notebook 04's


def log(msg: str) -> None:
    print(msg, flush=True)


# ---------------------------------------------------------------------------------------------------
# Pixel DDPM (notebook 03)
# ---------------------------------------------------------------------------------------------------


def ddpm_rows(models: dict[str, Path | None], n: int, reader) -> str:
    recipe = pretrained.DDPM_SHAPES16
    catalogue = data.catalogue(recipe.resolution)
    held_out = recipe.is_held_out(catalogue.labels)
    real = data.make_shapes(n, resolution=16, seed=99, max_objects=1).images
    rows = [
        "| images | n | read confidently | confidently one object (valid scene) | held-out share of those "
        "| median distance to nearest real | recognisable | held-out share of recognisable | distinct / expected |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    sets = {"real images (all combinations)": real}
    for name, path in models.items():
        model, schedule = pretrained.load(recipe.name, path=path)
        t = time.perf_counter()
        sets[name] = np.asarray(diffusion.sample(model, schedule, jax.random.PRNGKey(7), (n, 16, 16, 3),
                                                 sampler=DDIM(50)))
        log(f"  ddpm {name}: {n} DDIM-50 samples in {time.perf_counter() - t:.0f} s")
    for name, x in sets.items():
        r = probe.read(reader, np.clip(x, -1, 1))
        one = r.confident & (r.occupied.sum(axis=1) == 1)
        cell = np.argmax(r.occupied, axis=1)
        labels = {"colour_0": r.colour[np.arange(len(x)), cell], "position_0": cell, "background": r.background}
        novel = recipe.is_held_out(labels)[one]
        c = metrics.catalogue_report(x, catalogue.images, held_out)
        rows.append(
            f"| {name} | {len(x)} | {r.confident.mean():.1%} | {one.mean():.1%} | "
            + (f"{novel.mean():.1%}" if one.any() else "–")
            + f" | {c.median_distance:.4f} | {c.recognisable:.1%} | {c.held_out_share:.1%} "
            f"| {c.distinct} / {c.expected_distinct:.0f} |"
        )
    return "\n".join(rows)


# ---------------------------------------------------------------------------------------------------
# tiny-sd (notebook 04)
# ---------------------------------------------------------------------------------------------------


def read_unet_file(path: Path) -> tuple[dict[str, np.ndarray], dict]:
    flat, meta = io.read(path)
    if meta.get("format") != UNET_FORMAT:
        raise ValueError(f"{path} is not a UNet file of tools/gpu_train.py (format {meta.get('format')!r})")
    if any(not k.startswith("unet.") for k in flat):
        raise ValueError(f"{path} holds keys outside unet.: {sorted(k for k in flat if not k.startswith('unet.'))[:5]}")
    return flat, meta


def pipe_with_unet(unet_path: Path | None) -> StableDiffusion:
    """The shipped bundle, with its UNet's parameters replaced by those in ``unet_path`` (if given)."""
    comps = convert.load_sdjax(tiny_sd.BUNDLE)
    if unet_path is not None:
        flat, meta = read_unet_file(unet_path)
        template = {"unet": nnx.state(comps.unet, nnx.Param)}
        tree = io.unflatten_like(template, flat, source=str(unet_path))
        nnx.update(comps.unet, jax.tree.map(jnp.asarray, tree["unet"]))
    pipe = StableDiffusion(comps)
    pipe.progress = False
    return pipe


def tiny_sd_tables(models: dict[str, Path | None], n: int, reader) -> tuple[str, str]:
    prompts = tiny_sd.evaluation_prompts(n, seed=1)
    real = data.from_samples([data.parse_caption(p) for p in prompts], tiny_sd.TINY_SD.resolution)
    real_score = probe.score_prompts(probe.read(reader, real.images), real.attributes)
    full = [probe.PromptScore.HEADER, real_score.row("real images")]
    summary = ["| model | best w | everything at best w | shape | colour | size | background | object present |",
               "|---|---|---|---|---|---|---|---|"]
    for name, path in models.items():
        pipe = pipe_with_unet(path)
        t = time.perf_counter()
        sweep = tiny_sd.prompt_following(pipe, prompts, SCALES, reader=reader, num_inference_steps=25)
        log(f"  tiny-sd {name}: {len(SCALES)} × {n} images in {time.perf_counter() - t:.0f} s")
        for w in SCALES:
            full += [sweep.scores[w].row(f"{name}, w = {w:g}"), sweep.shuffled[w].row(f"{name}, w = {w:g}, shuffled")]
        best = max(SCALES, key=lambda w: sweep.scores[w].all)
        s = sweep.scores[best]
        summary.append(f"| {name} | {best:g} | {s.all:.1%} | {s.shape:.1%} | {s.colour:.1%} | {s.size:.1%} "
                       f"| {s.background:.1%} | {s.present:.1%} |")
    summary.append(f"| real images | – | {real_score.all:.1%} | {real_score.shape:.1%} | {real_score.colour:.1%} "
                   f"| {real_score.size:.1%} | {real_score.background:.1%} | {real_score.present:.1%} |")
    return "\n".join(summary), "\n".join(full)


# ---------------------------------------------------------------------------------------------------
# Installing
# ---------------------------------------------------------------------------------------------------


def install_ddpm(path: Path) -> None:
    pretrained.load(pretrained.DDPM_SHAPES16.name, path=path)  # refuses a file of another network
    dest = pretrained.weights_path(pretrained.DDPM_SHAPES16.name)
    shutil.copyfile(path, dest)
    log(f"installed {path} → {dest}")


def install_unet(path: Path) -> None:
    """Merge the candidate UNet into the float16 bundle file and record the run in train_info.json."""
    flat_new, meta_new = read_unet_file(path)
    bundle_file = tiny_sd.BUNDLE / convert.SDJAX_FILE
    flat, meta = io.read(bundle_file)
    old_keys = {k for k in flat if k.startswith("unet.")}
    if old_keys != set(flat_new):
        raise ValueError(f"{path}: its UNet keys differ from the bundle's ({len(flat_new)} vs {len(old_keys)})")
    for k, v in flat_new.items():
        if v.shape != flat[k].shape:
            raise ValueError(f"{path}: {k} has shape {v.shape}, the bundle's {flat[k].shape}")
        flat[k] = np.asarray(v, np.float16)
    io.save_tree(bundle_file, flat, meta)  # flat names are their own paths: the same file layout
    convert.load_sdjax(tiny_sd.BUNDLE)  # still loads
    info_file = tiny_sd.BUNDLE / "train_info.json"
    info = json.loads(info_file.read_text())
    info["unet_retrained"] = {
        "what": "stage C resumed from the CPU-trained UNet above, VAE and text encoder unchanged (tools/gpu_train.py)",
        **{k: meta_new.get(k) for k in ("saved_at_step", "batch", "peak_lr", "end_lr", "ema_decay", "final_loss",
                                        "device", "date")},
        "installed": datetime.date.today().isoformat(),
    }
    info_file.write_text(json.dumps(info, indent=1) + "\n")
    log(f"installed {path} into {bundle_file}; train_info.json updated")


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--ddpm", type=Path, help="candidate ddpm-shapes16.safetensors")
    p.add_argument("--unet", type=Path, help="candidate tiny-sd-unet.safetensors")
    p.add_argument("--quick", action="store_true", help="64 DDPM samples and 32 prompts instead of 500 and 300")
    p.add_argument("--skip-shipped", action="store_true", help="measure the candidates only")
    p.add_argument("--install", action="store_true", help="copy the candidates into sdjax/weights/ (no measuring)")
    args = p.parse_args(argv)
    if args.install:
        if args.ddpm:
            install_ddpm(args.ddpm)
        if args.unet:
            install_unet(args.unet)
        return
    start = time.perf_counter()
    reader = probe.load(16)
    n_ddpm, n_prompts = (64, 32) if args.quick else (500, 300)
    log(f"evaluate_weights: {jax.devices()[0].platform}, DDPM n = {n_ddpm}, prompts n = {n_prompts}")

    def models(candidate):
        shipped = {} if args.skip_shipped else {"shipped": None}
        return shipped | ({"candidate": candidate} if candidate else {})

    out = []
    if args.ddpm or not args.unet:
        out += ["### pixel DDPM (notebook 03: DDIM 50, PRNGKey(7))", "", ddpm_rows(models(args.ddpm), n_ddpm, reader)]
    if args.unet or not args.ddpm:
        summary, full = tiny_sd_tables(models(args.unet), n_prompts, reader)
        out += ["", "### tiny-sd prompt following (notebook 04: DDIM 25, w = 1, 2, 4, 7.5, 12)", "", summary,
                "", full]
    print("\n" + "\n".join(out))
    print(f"\nevaluate_weights: {time.perf_counter() - start:.0f} s")


if __name__ == "__main__":
    main()
