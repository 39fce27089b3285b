#!/usr/bin/env python
"""Retrain sdjax's shipped teaching models on one GPU in a single run of a fixed wall-clock budget.

    PYTHONUNBUFFERED=1 python tools/gpu_train.py --out DIR --seconds 240      # on the GPU
    python tools/gpu_train.py --tiny --out /tmp/gt --seconds 60                # CPU dry run

Stages (each has a deadline measured from the start of the process, so one that ends early or fails
leaves its time to the next):

1. ``ddpm``: the pixel DDPM of ``sdjax.pretrained.DDPM_SHAPES16`` (same network, schedule, data, loss),
   resumed from the shipped weights, at a larger batch.
2. ``unet``: tiny-sd's stage C (the cross-attention UNet on 8×8×4 latents), resumed from the shipped
   bundle's UNet, with the shipped VAE and CLIP text encoder kept frozen.

Time-adaptive step counts: the step function (a ``lax.scan`` of ``--chunk`` optimizer steps, batches
drawn on the device from data held on the device) is compiled and timed on a throwaway copy of the state
(the calibration), then the run takes ``steps = min(max_steps, 0.92 · time left / time per step)``
(a multiple of the chunk). The learning rate (linear warm-up, then cosine to ``lr · end_factor``, as
the recipes') and the EMA decay are arguments of the compiled step, not constants in it, so choosing
the count after compiling costs no second compilation. If steps run slower than calibrated, the stage
stops at its deadline anyway (recorded as ``stopped_early``).

Writes to ``--out`` as it goes, and nothing else (at most 3 files, plus one transient ``*.tmp`` while a
file is being replaced):

* ``ddpm-shapes16.safetensors``: EMA weights, float16, ``sdjax.pretrained.save`` format
  (``pretrained.load("ddpm-shapes16", path=...)`` reads it);
* ``tiny-sd-unet.safetensors``: the EMA UNet alone, float16, keys ``unet.…`` as in the bundle's
  ``sdjax.safetensors`` (``tools/evaluate_weights.py`` puts it into the shipped bundle);
* ``gpu_train.json``: per-stage facts and the log's last lines, rewritten at every save.

Both weight files are written every ``--save-every`` seconds (the EMA so far) and at the end of the stage.
"""

from __future__ import annotations

import time

T0 = time.time()  # the budget counts from here, imports included

import argparse  # noqa: E402
import dataclasses  # noqa: E402
import datetime  # noqa: E402
import json  # noqa: E402
import os  # noqa: E402
import sys  # noqa: E402
import threading  # noqa: E402
import traceback  # noqa: E402
from pathlib import Path  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repo root, should PYTHONPATH lack it


def _preflight() -> None:
    """Fail in the first second, not after minutes, if a module the training needs is missing; stand in
    for the two that ``import sdjax`` pulls in but training never uses (sklearn: sdjax.data.digits;
    PIL: sdjax.data.hub), should the GPU machine lack them."""
    import importlib.util
    import types

    missing = [m for m in ("jax", "flax", "optax", "numpy", "safetensors", "regex", "tqdm")
               if importlib.util.find_spec(m) is None]
    if missing:
        sys.exit(f"gpu_train: missing modules {missing}: pip install {' '.join(missing)}")
    if importlib.util.find_spec("sklearn") is None:
        sklearn, datasets = types.ModuleType("sklearn"), types.ModuleType("sklearn.datasets")
        datasets.load_digits = lambda *a, **k: (_ for _ in ()).throw(ImportError("sklearn stub (gpu_train)"))
        sklearn.datasets = datasets
        sys.modules.update({"sklearn": sklearn, "sklearn.datasets": datasets})
        print("gpu_train: sklearn missing: stubbed (unused by training)", flush=True)
    if importlib.util.find_spec("PIL") is None:
        pil, image = types.ModuleType("PIL"), types.ModuleType("PIL.Image")
        pil.Image, image.Image = image, type("Image", (), {})  # (used in an annotation)
        sys.modules.update({"PIL": pil, "PIL.Image": image})
        print("gpu_train: PIL missing: stubbed (unused by training)", flush=True)


_preflight()

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402
from flax import nnx  # noqa: E402

from sdjax import convert, io, pretrained, tiny_sd  # noqa: E402
from sdjax.diffusion import diffusion_loss  # noqa: E402
from sdjax.schedulers import q_sample, training_target  # noqa: E402
from sdjax.train import TrainState  # noqa: E402

DDPM_FILE = "ddpm-shapes16.safetensors"
UNET_FILE = "tiny-sd-unet.safetensors"
JSON_FILE = "gpu_train.json"
UNET_FORMAT = "sdjax-tiny-sd-unet"  # the metadata "format" of UNET_FILE

LOG: list[str] = []
REPORT: dict = {}


def log(msg: str) -> None:
    line = f"[{time.time() - T0:7.1f} s] {msg}"
    print(line, flush=True)
    LOG.append(line)


def write_json(out: Path) -> None:
    REPORT["log"] = LOG[-300:]
    REPORT["elapsed_s"] = round(time.time() - T0, 1)
    tmp = out / (JSON_FILE + ".tmp")
    tmp.write_text(json.dumps(REPORT, indent=1, default=str) + "\n")
    os.replace(tmp, out / JSON_FILE)


# ---------------------------------------------------------------------------------------------------
# The generic time-boxed trainer
# ---------------------------------------------------------------------------------------------------


def lr_at(step, total, warmup, peak, end):
    """optax.warmup_cosine_decay_schedule(0, peak, warmup, total, end) with traced total and warmup."""
    step = step.astype(jnp.float32)
    warm = peak * step / jnp.maximum(warmup, 1.0)
    frac = jnp.clip((step - warmup) / jnp.maximum(total - warmup, 1.0), 0.0, 1.0)
    cosine = end + (peak - end) * 0.5 * (1.0 + jnp.cos(jnp.pi * frac))
    return jnp.where(step < warmup, warm, cosine)


class Trainer:
    """Adam (with global-norm clipping) on ``loss_fn(model, batch, key) -> (loss, metrics)``, batches of
    ``batch`` rows drawn uniformly (with replacement) on the device from ``data`` (a dict of device
    arrays), ``chunk`` steps per compiled call, EMA of the parameters. The state layout is
    ``sdjax.train.TrainState``; the step key is derived as in ``sdjax.train``."""

    def __init__(self, model, loss_fn, data: dict, batch: int, chunk: int, seed: int = 0, grad_clip: float = 1.0):
        self.graphdef, params, self.frozen = nnx.split(model, nnx.Param, ...)
        self.params0 = jax.tree.map(jnp.copy, params)
        self.data, self.batch, self.chunk, self.seed = data, batch, chunk, seed
        self.tx = optax.chain(optax.clip_by_global_norm(grad_clip), optax.scale_by_adam())
        n = len(jax.tree.leaves(data)[0])
        graphdef, tx = self.graphdef, self.tx

        def loss_of_params(params, frozen, batch, key):
            return loss_fn(nnx.merge(graphdef, params, jax.tree.map(lambda a: a, frozen)), batch, key)

        def one_step(state: TrainState, hp, data, frozen):
            key = jax.random.fold_in(jax.random.fold_in(state.key, 1), state.step)
            key_idx, key_loss = jax.random.split(key)
            idx = jax.random.randint(key_idx, (batch,), 0, n)
            b = jax.tree.map(lambda a: a[idx], data)
            (loss, _), grads = jax.value_and_grad(loss_of_params, has_aux=True)(state.params, frozen, b, key_loss)
            direction, opt_state = tx.update(grads, state.opt_state, state.params)
            lr = lr_at(state.step, hp["total"], hp["warmup"], hp["peak"], hp["end"])
            params = jax.tree.map(lambda p, u: p - lr * u, state.params, direction)
            d = hp["ema"]
            ema = jax.tree.map(lambda e, p: d * e + (1.0 - d) * p, state.ema, params)
            return TrainState(state.step + 1, params, opt_state, ema, state.key), (loss, lr)

        def run_chunk(state, hp, data, frozen):
            return jax.lax.scan(lambda s, _: one_step(s, hp, data, frozen), state, None, length=chunk)

        self.run_chunk = jax.jit(run_chunk, donate_argnums=0)

    def fresh_state(self) -> TrainState:
        params = jax.tree.map(jnp.copy, self.params0)
        return TrainState(
            step=jnp.zeros((), jnp.int32),
            params=params,
            opt_state=self.tx.init(params),
            ema=jax.tree.map(jnp.copy, self.params0),
            key=jax.random.PRNGKey(self.seed),
        )

    @staticmethod
    def hyper(total, warmup, peak, end, ema) -> dict:
        f = np.float32
        return {k: jnp.asarray(f(v)) for k, v in dict(total=total, warmup=warmup, peak=peak, end=end, ema=ema).items()}

    def ema_model(self, ema_params):
        return nnx.merge(self.graphdef, jax.tree.map(jnp.asarray, ema_params), self.frozen)


def loss_curve(loss: np.ndarray, chunk: int, points: int = 100) -> list[float]:
    """The loss averaged over ≤ ``points`` equal spans of the run (each a whole number of chunks)."""
    if not len(loss):
        return []
    per_chunk = loss[: len(loss) // chunk * chunk].reshape(-1, chunk).mean(1)
    span = -(-len(per_chunk) // points)
    spans = [per_chunk[i : i + span].mean() for i in range(0, len(per_chunk), span)]
    return [round(float(x), 5) for x in spans]


def ema_decay_for(steps: int, lo: float, hi: float) -> float:
    """EMA over about the last 10 % of the run: d = 1 − 10/steps, kept in [lo, hi]."""
    return float(np.clip(1.0 - 10.0 / max(steps, 1), lo, hi))


def train_timeboxed(name: str, trainer: Trainer, facts: dict, args, *, deadline: float, max_steps: int,
                    peak: float, end_factor: float, warmup_max: int, save) -> None:
    """Calibrate, choose the step count, train until done or the deadline, saving the EMA as it goes.
    ``save(ema_params, info)`` writes the weights; ``facts`` (this stage's JSON entry) is filled in."""
    chunk, out = trainer.chunk, Path(args.out)
    # calibration on a throwaway copy: the first call compiles, the next ones are timed
    hp = Trainer.hyper(1000, 10, peak, peak * end_factor, 0.999)
    t = time.time()
    cal, _ = trainer.run_chunk(trainer.fresh_state(), hp, trainer.data, trainer.frozen)
    jax.block_until_ready(cal)
    facts["compile_s"] = round(time.time() - t, 1)
    t = time.time()
    for _ in range(args.calibration_chunks):
        cal, (losses, _) = trainer.run_chunk(cal, hp, trainer.data, trainer.frozen)
    jax.block_until_ready(losses)
    step_s = (time.time() - t) / (args.calibration_chunks * chunk)
    first_loss = float(np.mean(np.asarray(losses)))
    del cal
    left = deadline - time.time() - args.reserve
    steps = int(min(max_steps, 0.92 * left / step_s)) // chunk * chunk
    warmup = min(warmup_max, max(steps // 10, 1))
    decay = ema_decay_for(steps, args.ema_min, args.ema_max)
    facts.update(
        calibration_steps=args.calibration_chunks * chunk, step_ms=round(1000 * step_s, 3),
        calibration_loss=round(first_loss, 5), seconds_left_after_calibration=round(left, 1),
        steps_planned=steps, warmup=warmup, peak_lr=peak, end_lr=peak * end_factor, ema_decay=decay,
    )
    log(f"{name}: compiled in {facts['compile_s']} s; {1000 * step_s:.2f} ms/step "
        f"({trainer.batch / step_s:,.0f} images/s); {left:.0f} s left → {steps} steps "
        f"(cap {max_steps}), warm-up {warmup}, lr {peak:g} → {peak * end_factor:g}, EMA {decay}")
    if steps < chunk:
        raise RuntimeError(f"no time left for {name} ({left:.0f} s, {1000 * step_s:.1f} ms/step)")
    hp = Trainer.hyper(steps, warmup, peak, peak * end_factor, decay)
    state = trainer.fresh_state()
    losses_all: list[np.ndarray] = []
    pending: list = []
    done, start, last_save, last_print, stopped_early = 0, time.time(), time.time(), time.time(), False

    def record(final: bool):
        if pending:
            losses_all.extend(np.asarray(x) for x in jax.device_get(pending))
            pending.clear()
        loss = np.concatenate(losses_all) if losses_all else np.zeros(0)
        train_s = time.time() - start
        facts.update(
            steps_done=done, train_seconds=round(train_s, 1),
            images_per_s=round(done * trainer.batch / max(train_s, 1e-9), 1),
            images_seen=done * trainer.batch,
            final_loss=float(np.mean(loss[-200:])) if len(loss) else None,
            first_loss=float(np.mean(loss[:200])) if len(loss) else None,
            loss_curve=loss_curve(loss, chunk),
            finished=final,
            stopped_early=stopped_early,
        )
        return loss

    while done < steps:
        state, (losses, lrs) = trainer.run_chunk(state, hp, trainer.data, trainer.frozen)
        done += chunk
        pending.append(losses)
        if len(pending) > 1:
            jax.block_until_ready(pending[-2])  # one chunk in flight at most
        now = time.time()
        if now - last_print > args.print_every or done == steps:
            loss = record(final=False)
            last_print = now
            log(f"{name}: step {done}/{steps}  loss(last 200) {np.mean(loss[-200:]):.5f}  lr {float(lrs[-1]):.2e}  "
                f"{done * trainer.batch / (now - start):,.0f} images/s")
        if done < steps and now + 1.5 * chunk * step_s > deadline - args.reserve:
            stopped_early = True
            log(f"{name}: deadline reached at step {done} of {steps}: stopping early (LR not fully annealed)")
            break
        if done < steps and now - last_save > args.save_every:
            ema = jax.device_get(state.ema)  # before the next call donates the state
            record(final=False)
            facts["saved_at_step"] = done
            save(ema, facts)
            write_json(out)
            last_save = time.time()
            log(f"{name}: saved EMA at step {done}")
    ema = jax.device_get(state.ema)
    record(final=True)
    facts["saved_at_step"] = done
    save(ema, facts)
    write_json(out)
    log(f"{name}: done, {done} steps, final loss {facts['final_loss']:.5f}, saved")


# ---------------------------------------------------------------------------------------------------
# Stage 1: the pixel DDPM
# ---------------------------------------------------------------------------------------------------


def stage_ddpm(args, facts: dict, deadline: float) -> None:
    recipe = pretrained.DDPM_SHAPES16
    t = time.time()
    ds = recipe.data(args.ddpm_images)
    images = jnp.asarray(ds.images)
    facts.update(images=len(ds), data_seconds=round(time.time() - t, 1), batch=args.ddpm_batch)
    log(f"ddpm: {len(ds):,} training images rendered in {facts['data_seconds']} s")
    # Resumed from the shipped weights, not from scratch: the budget is a few minutes on a GPU of unknown
    # speed for this small network, and the shipped EMA weights already hold 10,000 × 64 images of
    # training. Resuming spends all of the budget on improving them (a warm restart: Adam's moments are
    # rebuilt during the warm-up, then the cosine anneals again), while a from-scratch run must first
    # redo the CPU run before it can beat it; if the GPU turns out slow, it would not. --ddpm-from-scratch
    # gives the clean recipe run instead (worth it only when the calibration shows ≳ 20k steps fit).
    if args.ddpm_from_scratch:
        model, start_from = recipe.model(), "scratch"
    else:
        model, _ = pretrained.load(recipe.name)
        start_from = "shipped sdjax/weights/ddpm-shapes16.safetensors"
    facts["start_from"] = start_from
    loss = diffusion_loss(recipe.schedule)
    trainer = Trainer(model, lambda m, b, k: loss(m, b, k), {"image": images}, args.ddpm_batch, args.chunk,
                      seed=recipe.seed)
    out = Path(args.out)

    def save(ema_params, facts):
        info = {
            "steps": int(facts.get("saved_at_step", 0)), "batch_size": args.ddpm_batch,
            "final_loss": facts.get("final_loss"), "device": REPORT["device"], "date": REPORT["date"],
            "start_from": start_from, "run": "tools/gpu_train.py",
            "lr": [facts.get("peak_lr"), facts.get("end_lr")], "ema_decay": facts.get("ema_decay"),
        }
        pretrained.save(out / DDPM_FILE, trainer.ema_model(ema_params), recipe, info)

    train_timeboxed("ddpm", trainer, facts, args, deadline=deadline, max_steps=args.ddpm_max_steps,
                    peak=args.ddpm_lr, end_factor=0.01, warmup_max=recipe.warmup, save=save)
    facts["file"] = DDPM_FILE


# ---------------------------------------------------------------------------------------------------
# Stage 2: tiny-sd's UNet
# ---------------------------------------------------------------------------------------------------


def render_tiny_sd(n: int, box: dict) -> None:
    """(In a thread, during stage 1.) The recipe's images and caption ids."""
    try:
        t = time.time()
        ds = tiny_sd.TINY_SD.data(n)
        box["images"] = ds.images
        box["ids"] = tiny_sd.tokenize(tiny_sd.TINY_SD.tokenizer(), ds.captions)
        box["seconds"] = round(time.time() - t, 1)
    except BaseException as e:  # noqa: BLE001 - reported by stage 2
        box["error"] = e


def unet_loss(schedule, empty_context, dropout: float):
    """tiny_sd.conditional_diffusion_loss with the frozen text encoder's context precomputed: batch
    {"latent": z_0 (B, 8, 8, 4) scaled, "context": (B, 77, 64)}; with probability ``dropout`` a caption's
    context is replaced by the empty prompt's. The same draws of t, ε and dropout, the same target."""

    def loss_fn(unet, batch, key):
        z0, context = batch["latent"], batch["context"]
        key_t, key_eps, key_drop = jax.random.split(key, 3)
        drop = jax.random.bernoulli(key_drop, dropout, (z0.shape[0], 1, 1))
        context = jnp.where(drop, empty_context[None], context)
        t = jax.random.randint(key_t, (z0.shape[0],), 0, schedule.num_train_timesteps)
        eps = jax.random.normal(key_eps, z0.shape, jnp.float32)
        prediction = unet(q_sample(schedule, z0, t, eps), t, context)
        return jnp.mean((prediction.astype(jnp.float32) - training_target(schedule, z0, t, eps)) ** 2), {}

    return loss_fn


@nnx.jit
def _context(text_encoder, ids):
    return text_encoder(ids).last_hidden_state


def stage_unet(args, facts: dict, deadline: float, box: dict, render_thread: threading.Thread) -> None:
    recipe = tiny_sd.TINY_SD
    t = time.time()
    render_thread.join()
    if "error" in box:
        raise box["error"]
    facts.update(images=len(box["images"]), render_seconds=box["seconds"],
                 waited_for_render_s=round(time.time() - t, 1), batch=args.unet_batch)
    # Keep the shipped VAE and text encoder: the UNet is trained on z = s·E(x) and on the context c of
    # the caption, and at sampling time it is paired with exactly this decoder D and this text encoder.
    # A new VAE would change the latent space (and s), a new CLIP the meaning of every context vector;
    # the UNet would have to be trained from scratch, which this budget does not allow. Kept frozen,
    # they let stage C resume from the shipped UNet and only the UNet file need replacing.
    comps = convert.load_sdjax(tiny_sd.BUNDLE)
    # train what ships; a difference from the recipe is only reported (loading gives attention_head_dim
    # None where the recipe says 8 (its default), with num_attention_heads=4 the same network)
    shipped, wanted = dataclasses.asdict(comps.unet.config), dataclasses.asdict(recipe.unet)
    diff = {k: (shipped.get(k), wanted.get(k)) for k in wanted if shipped.get(k) != wanted.get(k)}
    if diff or comps.schedule != recipe.schedule:
        log(f"unet: note: shipped UNet config differs from tiny_sd.TINY_SD in {diff}; "
            f"schedule equal: {comps.schedule == recipe.schedule}")
    t = time.time()
    scale = comps.vae.config.scaling_factor
    latents = jnp.asarray(tiny_sd.encode_means(comps.vae, box["images"], batch_size=512) * scale)
    ids = box["ids"]
    context = jnp.concatenate([_context(comps.text_encoder, jnp.asarray(ids[i : i + 1024]))
                               for i in range(0, len(ids), 1024)])
    empty = _context(comps.text_encoder, jnp.asarray(tiny_sd.tokenize(comps.tokenizer, [""])))[0]
    jax.block_until_ready((latents, context))
    del box["images"]
    facts.update(encode_seconds=round(time.time() - t, 1), scaling_factor=scale,
                 latent_std=round(float(jnp.std(latents)), 4), start_from="shipped tiny-sd-shapes UNet")
    log(f"unet: {len(ids):,} images (rendered in {box['seconds']} s, waited {facts['waited_for_render_s']} s), "
        f"encoded to latents (std {facts['latent_std']}) and contexts {tuple(context.shape)} in "
        f"{facts['encode_seconds']} s")
    loss = unet_loss(comps.schedule, empty, recipe.caption_dropout)
    trainer = Trainer(comps.unet, loss, {"latent": latents, "context": context}, args.unet_batch, args.chunk,
                      seed=recipe.seed)
    out = Path(args.out)
    unet_config = comps.unet.config.to_diffusers()

    def save(ema_params, facts):
        tree = {"unet": jax.tree.map(lambda p: np.asarray(p, np.float16), ema_params)}
        info = {k: facts.get(k) for k in ("saved_at_step", "batch", "peak_lr", "end_lr", "ema_decay", "final_loss")}
        meta = {"format": UNET_FORMAT, "unet": unet_config, "recipe": recipe.name, "device": REPORT["device"],
                "date": REPORT["date"], "run": "tools/gpu_train.py", **info}
        io.save_tree(out / UNET_FILE, tree, meta)

    train_timeboxed("unet", trainer, facts, args, deadline=deadline, max_steps=args.unet_max_steps,
                    peak=args.unet_lr, end_factor=0.05, warmup_max=500, save=save)
    facts["file"] = UNET_FILE


# ---------------------------------------------------------------------------------------------------


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", required=True, help="folder for the (≤ 3) output files")
    p.add_argument("--seconds", type=float, default=240, help="wall-clock budget from process start")
    p.add_argument("--ddpm-share", type=float, default=0.4, help="stage 1's share of --seconds; stage 2 gets the rest")
    p.add_argument("--stages", default="ddpm,unet")
    p.add_argument("--tiny", action="store_true", help="CPU dry run: tiny data, batches and step caps")
    p.add_argument("--chunk", type=int, default=10, help="optimizer steps per compiled call")
    p.add_argument("--calibration-chunks", type=int, default=3, help="timed calls after the compiling one")
    p.add_argument("--reserve", type=float, default=4.0, help="seconds kept free at a stage's end for saving")
    p.add_argument("--save-every", type=float, default=60.0)
    p.add_argument("--print-every", type=float, default=10.0)
    p.add_argument("--ema-min", type=float, default=0.999)
    p.add_argument("--ema-max", type=float, default=0.9999)
    p.add_argument("--ddpm-batch", type=int, default=256)
    p.add_argument("--ddpm-lr", type=float, default=5e-4)
    p.add_argument("--ddpm-max-steps", type=int, default=40_000)
    p.add_argument("--ddpm-images", type=int, default=None, help="default: the recipe's 20,000 draws")
    p.add_argument("--ddpm-from-scratch", action="store_true")
    p.add_argument("--unet-batch", type=int, default=256)
    p.add_argument("--unet-lr", type=float, default=1e-3)
    p.add_argument("--unet-max-steps", type=int, default=60_000)
    p.add_argument("--unet-images", type=int, default=None, help="default: the recipe's 50,000")
    args = p.parse_args(argv)
    if args.tiny:
        args.chunk, args.calibration_chunks, args.reserve = 5, 1, 1.0
        args.save_every, args.print_every = min(args.save_every, 8.0), 3.0
        args.ddpm_batch, args.unet_batch = min(args.ddpm_batch, 16), min(args.unet_batch, 16)
        args.ddpm_max_steps, args.unet_max_steps = min(args.ddpm_max_steps, 40), min(args.unet_max_steps, 40)
        args.ddpm_images, args.unet_images = args.ddpm_images or 512, args.unet_images or 512
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    stages = [s.strip() for s in args.stages.split(",") if s.strip()]
    device = jax.devices()[0]
    REPORT.update(
        device=f"{device.platform}: {device.device_kind} ×{jax.device_count()}",
        jax=jax.__version__, flax=getattr(__import__("flax"), "__version__", "?"), optax=optax.__version__,
        python=sys.version.split()[0], date=datetime.datetime.now().isoformat(timespec="seconds"),
        args=vars(args), stages={},
    )
    log(f"gpu_train: {REPORT['device']}, jax {jax.__version__}; budget {args.seconds:.0f} s; stages {stages}")
    write_json(out)

    box: dict = {}
    render = threading.Thread(target=render_tiny_sd, args=(args.unet_images, box), daemon=True)
    if "unet" in stages:
        render.start()  # 50,000 64-px images take ~11 s of one CPU core: overlapped with stage 1

    deadlines = {"ddpm": T0 + args.ddpm_share * args.seconds, "unet": T0 + args.seconds}
    if "ddpm" not in stages:
        deadlines["unet"] = T0 + args.seconds
    for name in stages:
        facts = REPORT["stages"].setdefault(name, {})
        start = time.time()
        try:
            if name == "ddpm":
                stage_ddpm(args, facts, deadlines["ddpm"])
            elif name == "unet":
                stage_unet(args, facts, deadlines["unet"], box, render)
            else:
                raise ValueError(f"unknown stage {name!r}")
            facts["status"] = "ok"
        except Exception as e:  # noqa: BLE001 - one stage's failure must not cost the other
            facts["status"] = "error"
            facts["error"] = f"{type(e).__name__}: {e}"
            facts["traceback"] = traceback.format_exc()[-4000:]
            log(f"{name}: FAILED: {type(e).__name__}: {e}\n{traceback.format_exc()}")
        facts["stage_seconds"] = round(time.time() - start, 1)
        write_json(out)
    log(f"gpu_train: finished in {time.time() - T0:.0f} s; files: {sorted(f.name for f in out.iterdir())}")
    write_json(out)


if __name__ == "__main__":
    main()
