"""A tiny Stable Diffusion trained from scratch on captioned ``shapes``: the recipe, the three training
stages, and the packaging into the layout sdjax loads real SD from.

Stable Diffusion (Rombach et al. 2022, arXiv:2112.10752) is three networks trained separately:

A. an autoencoder (SD's ``AutoencoderKL``, :mod:`sdjax.models.vae`) that maps an image x (H, W, 3) to
   a latent z = E(x) (H/f, W/f, 4) and back, trained with the β-VAE loss; the latents are then scaled
   by s = 1/std(z) so that diffusion sees unit variance (SD's ``scaling_factor``, 0.18215 there);
B. a text encoder: CLIP (Radford et al. 2021, arXiv:2103.00020), trained contrastively — for a batch of
   B (image, caption) pairs, the image and text embeddings u_i, w_j (unit vectors) give logits
   ℓ_ij = exp(τ) u_i·w_j, and the loss is the cross-entropy of picking the right caption for each
   image and the right image for each caption:

       L_CLIP = ½ [ CE(ℓ, diag) + CE(ℓᵀ, diag) ].

   SD conditions on the text tower's last hidden states, the (77, D) *context*; the image tower is
   only needed to train it;
C. the denoiser: a ``UNet2DConditionModel`` (:mod:`sdjax.models.unet`) trained on z_0 = s·E(x) with the
   simplified diffusion loss (:mod:`sdjax.diffusion`) and cross-attention to the frozen context c of
   the caption. A fraction p of captions is replaced by the empty prompt ("caption dropout"), so the
   same network also learns the unconditional ε̂(z_t, t, c_∅) that classifier-free guidance needs.

:data:`TINY_SD` is the recipe of the model that ships with sdjax (``sdjax/weights/tiny-sd-shapes``, the
default of ``sdjax txt2img``): 64-px images, SD's 4-level VAE (f = 8: 8×8×4 latents), a 4-layer CLIP text
tower of width 64 on CLIP's real tokenizer, and a 2-level cross-attention UNet. :func:`train` runs the
stages (each resumes from its checkpoint) and returns the result as :class:`sdjax.components.Components`;
:func:`save_bundle` writes it in sdjax's layout, so that ``sdjax.StableDiffusion.from_pretrained`` and
``sdjax txt2img`` run it exactly like real SD. :func:`prompt_following` measures how well a model does what
its prompts say, with the attribute probe of :mod:`sdjax.probe` (notebook 04, section 6).

The shipped weights are this recipe's run on a 2-core CPU (``train_info.json``: 2 h 50 min), then stage C
continued on one H200 GPU (``tools/gpu_train.py``, 2026-12-04): from the CPU run's EMA UNet, 4,020 more steps
at batch 256 (1.03 M images against the CPU run's 320 k; 40 s of training), with the same VAE, text encoder,
data, loss and schedule. Prompts entirely right (300 prompts, DDIM 25, best guidance scale): 76 % → 90 %, shape
85 % → 93 %; real images 95 % (``tools/evaluate_weights.py``; ``train_info.json`` under ``unet_retrained``).
"""

from __future__ import annotations

import dataclasses
import functools
import os
from collections.abc import Callable
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from sdjax import convert, data, io, probe
from sdjax.components import Components
from sdjax.models.clip import CLIPTextConfig, CLIPTextModel
from sdjax.models.unet import UNet2D, UNetConfig
from sdjax.models.vae import AutoencoderKL, VAEConfig, vae_loss
from sdjax.nn import conv
from sdjax.schedulers import NoiseSchedule, q_sample, training_target
from sdjax.tokenizer import CLIPTokenizer
from sdjax.train import FitResult, fit

Array = jax.Array


# ---------------------------------------------------------------------------------------------------
# Stage B's image tower and the CLIP pair
# ---------------------------------------------------------------------------------------------------


class ImageEncoder(nnx.Module):
    """CLIP's image tower, small: stride-2 convolutions with SiLU, level by level, then a linear map of
    the flattened grid to the joint embedding. (B, H, W, 3) → (B, E)."""

    def __init__(self, resolution: int, channels: tuple[int, ...], embed_dim: int, *, rngs: nnx.Rngs):
        widths = (3, *channels)
        self.convs = nnx.List([conv(a, b, 3, rngs, stride=2) for a, b in zip(widths, widths[1:])])
        side = resolution // 2 ** len(channels)
        self.proj = nnx.Linear(side * side * channels[-1], embed_dim, rngs=rngs)

    def __call__(self, x: Array) -> Array:
        for layer in self.convs:
            x = nnx.silu(layer(x))
        return self.proj(x.reshape(x.shape[0], -1))


class CLIP(nnx.Module):
    """The pair of towers and the learned temperature τ (initialised to log(1/0.07), as in CLIP).

    ``embed_text(ids)`` (B, 77) → (B, E) and ``embed_image(images)`` (B, H, W, 3) → (B, E), unit vectors.
    The text embedding is the pooled (end-of-text) state times W_text, CLIP's ``text_projection``.
    """

    def __init__(self, text: CLIPTextConfig, resolution: int, image_channels: tuple[int, ...], embed_dim: int, *, rngs):
        self.resolution, self.image_channels, self.embed_dim = resolution, tuple(image_channels), embed_dim
        self.text_model = CLIPTextModel(text, rngs=rngs)
        self.text_projection = nnx.Linear(text.hidden_size, embed_dim, use_bias=False, rngs=rngs)
        self.image_model = ImageEncoder(resolution, image_channels, embed_dim, rngs=rngs)
        self.logit_scale = nnx.Param(jnp.asarray(np.log(1 / 0.07), jnp.float32))

    def embed_text(self, ids: Array) -> Array:
        w = self.text_projection(self.text_model(ids).pooled)
        return w / jnp.linalg.norm(w, axis=-1, keepdims=True)

    def embed_image(self, images: Array) -> Array:
        u = self.image_model(images)
        return u / jnp.linalg.norm(u, axis=-1, keepdims=True)


def clip_loss(model: CLIP, batch: dict, key: Array) -> tuple[Array, dict]:
    """L_CLIP (module docstring) over the batch; metrics: the share of images whose best caption is theirs."""
    del key
    u, w = model.embed_image(batch["image"]), model.embed_text(batch["ids"])
    logits = jnp.exp(jnp.minimum(model.logit_scale[...], np.log(100.0))) * u @ w.T  # CLIP caps exp(τ) at 100
    labels = jnp.arange(len(u))
    loss = 0.5 * (
        optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()
        + optax.softmax_cross_entropy_with_integer_labels(logits.T, labels).mean()
    )
    return loss, {"accuracy": jnp.mean(jnp.argmax(logits, axis=1) == labels)}


# ---------------------------------------------------------------------------------------------------
# The recipe
# ---------------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class TinySDRecipe:
    """Everything that decides the bundled model: data, the three networks, and each stage's training."""

    name: str = "tiny-sd-shapes"
    resolution: int = 64
    max_objects: int = 2
    num_images: int = 50_000
    seed: int = 0
    # A. the autoencoder: SD's AutoencoderKL with 4 levels (f = 8), narrow
    vae: VAEConfig = VAEConfig(block_out_channels=(16, 32, 64, 64), latent_channels=4, norm_num_groups=8)
    vae_steps: int = 5_000
    vae_batch: int = 16
    vae_kl_weight: float = 1e-4
    # B. CLIP: SD1's tokenizer and text-tower layout, 4 layers of width 64
    text: CLIPTextConfig = CLIPTextConfig(
        hidden_size=64, intermediate_size=256, num_hidden_layers=4, num_attention_heads=4
    )
    image_channels: tuple[int, ...] = (32, 64, 64, 128)
    embed_dim: int = 64
    clip_steps: int = 1_200
    clip_batch: int = 256
    # C. the denoiser on 8×8×4 latents, cross-attending to the 64-wide context
    unet: UNetConfig = UNetConfig(
        sample_size=8,
        in_channels=4,
        out_channels=4,
        block_out_channels=(64, 128),
        layers_per_block=1,
        down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
        mid_block_type="UNetMidBlock2DCrossAttn",
        num_attention_heads=4,
        cross_attention_dim=64,
        norm_num_groups=16,
    )
    # v-prediction on the cosine schedule, as notebook 03's pixel model (why: notebook 03, section 2)
    schedule: NoiseSchedule = NoiseSchedule(
        beta_schedule="squaredcos_cap_v2",
        prediction_type="v_prediction",
        timestep_spacing="trailing",
        clip_sample=False,
    )
    caption_dropout: float = 0.1
    unet_steps: int = 5_000
    unet_batch: int = 64
    unet_lr: float = 1e-3
    ema_decay: float = 0.999

    def data(self, n: int | None = None) -> data.ImageDataset:
        """The training images and captions (seed ``seed``), 1 … max_objects objects each."""
        return data.make_shapes(
            n or self.num_images, resolution=self.resolution, seed=self.seed, max_objects=self.max_objects
        )

    def captions(self, n: int | None = None) -> list[str]:
        """The captions of :meth:`data` without rendering the images (the same draws, so it is cheap to
        ask whether a prompt was in the training set)."""
        rng = np.random.default_rng(self.seed)
        return [data.caption(data.sample_attributes(rng, self.max_objects)) for _ in range(n or self.num_images)]

    def tokenizer(self) -> CLIPTokenizer:
        return CLIPTokenizer.from_bpe_file()


TINY_SD = TinySDRecipe()


# ---------------------------------------------------------------------------------------------------
# The stages
# ---------------------------------------------------------------------------------------------------


def _adam(lr: float, steps: int) -> optax.GradientTransformation:
    schedule = optax.warmup_cosine_decay_schedule(0.0, lr, min(500, max(steps // 10, 1)), max(steps, 2), lr / 20)
    return optax.chain(optax.clip_by_global_norm(1.0), optax.adam(schedule))


def train_vae(recipe: TinySDRecipe, ds: data.ImageDataset, *, steps: int | None = None, checkpoint=None, progress=True):
    """Stage A: the β-VAE loss on the images, then s = 1/std of the posterior means. Returns the VAE
    with ``config.scaling_factor`` set to s, and the :class:`~sdjax.train.FitResult`."""
    steps = recipe.vae_steps if steps is None else steps
    vae = AutoencoderKL(recipe.vae, rngs=nnx.Rngs(recipe.seed))
    result = fit(
        vae,
        functools.partial(vae_loss, kl_weight=recipe.vae_kl_weight),
        {"image": ds.images},
        steps=steps,
        batch_size=recipe.vae_batch,
        optimizer=_adam(1e-3, steps),
        seed=recipe.seed,
        checkpoint=checkpoint,
        checkpoint_every=500,
        progress=progress,
        desc="A · VAE",
    )
    means = encode_means(vae, ds.images[:2048])
    vae.config = dataclasses.replace(recipe.vae, scaling_factor=float(1.0 / np.std(means)))
    return vae, result


@nnx.jit
def _posterior_mean(vae: AutoencoderKL, images: Array) -> Array:
    return vae.encode(images).mean


def encode_means(vae: AutoencoderKL, images: np.ndarray, batch_size: int = 256) -> np.ndarray:
    """The posterior means E(x), unscaled: (N, H, W, 3) → (N, H/f, W/f, 4)."""
    return np.concatenate(
        [np.asarray(_posterior_mean(vae, images[i : i + batch_size])) for i in range(0, len(images), batch_size)]
    )


def tokenize(tokenizer: CLIPTokenizer, captions: list[str]) -> np.ndarray:
    """Captions → (N, 77) int32 ids (every shapes caption fits in 77 tokens)."""
    return np.asarray(tokenizer(captions), np.int32)


def train_clip(
    recipe: TinySDRecipe, ds: data.ImageDataset, ids: np.ndarray, *, steps=None, checkpoint=None, progress=True
):
    """Stage B: contrastive training of both towers on (image, caption) pairs. Returns (CLIP, FitResult)."""
    steps = recipe.clip_steps if steps is None else steps
    model = CLIP(recipe.text, recipe.resolution, recipe.image_channels, recipe.embed_dim, rngs=nnx.Rngs(recipe.seed))
    result = fit(
        model,
        clip_loss,
        {"image": ds.images, "ids": ids},
        steps=steps,
        batch_size=recipe.clip_batch,
        optimizer=_adam(1e-3, steps),
        seed=recipe.seed,
        checkpoint=checkpoint,
        checkpoint_every=500,
        progress=progress,
        desc="B · CLIP",
    )
    return model, result


class TextToLatent(nnx.Module):
    """Stage C's trainee and its text encoder, so one ``fit`` call sees both.

    ``(z_t, t, ids) → unet(z_t, t, CLIP(ids))``. With ``freeze_text`` the context is under
    ``stop_gradient``: the text encoder gets zero gradients, which Adam turns into exactly zero updates,
    so it stays as stage B left it. Fine-tuning (:mod:`sdjax.finetune`) lets gradients through to it
    and chooses what trains with ``fit``'s ``trainable`` filter instead.
    """

    def __init__(self, unet: UNet2D, text_encoder: CLIPTextModel, freeze_text: bool = True):
        self.unet, self.text_encoder, self.freeze_text = unet, text_encoder, freeze_text

    def __call__(self, z_t: Array, t: Array, ids: Array) -> Array:
        context = self.text_encoder(ids).last_hidden_state
        if self.freeze_text:
            context = jax.lax.stop_gradient(context)
        return self.unet(z_t.astype(context.dtype), t, context)


def conditional_diffusion_loss(
    schedule: NoiseSchedule,
    empty_ids: np.ndarray,
    dropout: float,
    inputs: tuple[str, ...] = (),
    timestep_weight: Callable[[Array], Array] | None = None,
):
    """L_simple with caption dropout, in ``fit``'s form: batch {"latent": z_0 (B, h, w, 4) scaled,
    "ids": (B, 77)}; each caption is replaced by the empty prompt's ``empty_ids`` with probability ``dropout``.
    An optional "weight" (B,) weighs each example's squared error (DreamBooth's prior-preservation λ):
    L = mean_i w_i ‖ε_i − ε̂_i‖² / (h·w·4). ``inputs``: names of further batch entries the model takes after
    the ids (a ControlNet's condition image, :mod:`sdjax.controlnet_training`). ``timestep_weight``: t (B,) →
    a weight (B,) for each example's squared error too (min-SNR-γ, :func:`sdjax.finetune.min_snr_weight`)."""
    empty = jnp.asarray(empty_ids, jnp.int32)

    def loss_fn(model: TextToLatent, batch, key):
        z0, ids = batch["latent"], batch["ids"]
        key_t, key_eps, key_drop = jax.random.split(key, 3)
        drop = jax.random.bernoulli(key_drop, dropout, (z0.shape[0], 1))
        ids = jnp.where(drop, empty[None], ids)
        t = jax.random.randint(key_t, (z0.shape[0],), 0, schedule.num_train_timesteps)
        eps = jax.random.normal(key_eps, z0.shape, jnp.float32)
        prediction = model(q_sample(schedule, z0, t, eps), t, ids, *(batch[name] for name in inputs))
        error = (prediction.astype(jnp.float32) - training_target(schedule, z0, t, eps)) ** 2
        if "weight" not in batch and timestep_weight is None:
            return jnp.mean(error), {}
        weight = batch.get("weight", 1.0) * (1.0 if timestep_weight is None else timestep_weight(t))
        return jnp.mean(weight * jnp.mean(error, axis=(1, 2, 3))), {}

    return loss_fn


def train_unet(
    recipe: TinySDRecipe,
    latents: np.ndarray,
    ids: np.ndarray,
    text_encoder: CLIPTextModel,
    tokenizer: CLIPTokenizer,
    *,
    steps=None,
    checkpoint=None,
    progress=True,
) -> tuple[UNet2D, FitResult]:
    """Stage C on scaled latents (N, h, w, 4) and caption ids (N, 77). Returns (EMA UNet, FitResult)."""
    steps = recipe.unet_steps if steps is None else steps
    model = TextToLatent(UNet2D(recipe.unet, rngs=nnx.Rngs(recipe.seed)), text_encoder)
    result = fit(
        model,
        conditional_diffusion_loss(recipe.schedule, tokenize(tokenizer, [""])[0], recipe.caption_dropout),
        {"latent": latents, "ids": ids},
        steps=steps,
        batch_size=recipe.unet_batch,
        optimizer=_adam(recipe.unet_lr, steps),
        seed=recipe.seed,
        ema_decay=recipe.ema_decay,
        checkpoint=checkpoint,
        checkpoint_every=500,
        progress=progress,
        desc="C · UNet",
    )
    return result.ema_model.unet, result


@dataclasses.dataclass
class Trained:
    """What :func:`train` returns: the assembled model and each stage's training history."""

    components: Components
    clip: CLIP
    histories: dict[str, dict]


def train(
    recipe: TinySDRecipe = TINY_SD,
    *,
    workdir: str | os.PathLike | None = None,
    num_images: int | None = None,
    steps: dict[str, int] | None = None,
    progress: bool = True,
) -> Trained:
    """Run stages A, B, C in order. With ``workdir``, each stage checkpoints there and a rerun resumes.
    ``steps`` overrides a stage's step count ({"vae": …, "clip": …, "unet": …}, e.g. for a quick demo)."""
    steps = steps or {}
    ckpt = (lambda name: Path(workdir) / f"{name}.safetensors") if workdir else (lambda name: None)
    ds = recipe.data(num_images)
    tokenizer = recipe.tokenizer()
    ids = tokenize(tokenizer, ds.captions)
    vae, vae_fit = train_vae(recipe, ds, steps=steps.get("vae"), checkpoint=ckpt("vae"), progress=progress)
    clip, clip_fit = train_clip(recipe, ds, ids, steps=steps.get("clip"), checkpoint=ckpt("clip"), progress=progress)
    latents = encode_means(vae, ds.images) * vae.config.scaling_factor
    unet, unet_fit = train_unet(
        recipe,
        latents,
        ids,
        clip.text_model,
        tokenizer,
        steps=steps.get("unet"),
        checkpoint=ckpt("unet"),
        progress=progress,
    )
    components = Components(
        unet=unet,
        vae=vae,
        text_encoder=clip.text_model,
        tokenizer=tokenizer,
        schedule=recipe.schedule,
        scheduler_config=ddim_scheduler_config(recipe.schedule),
    )
    return Trained(components, clip, {"vae": vae_fit.history, "clip": clip_fit.history, "unet": unet_fit.history})


# ---------------------------------------------------------------------------------------------------
# The bundle that ships with sdjax
# ---------------------------------------------------------------------------------------------------

BUNDLE = Path(__file__).parent / "weights" / "tiny-sd-shapes"
CLIP_IMAGE_FILE = "clip_image_tower.safetensors"  # stage B's image side, for retrieval demos (SD never uses it)


def ddim_scheduler_config(schedule: NoiseSchedule) -> dict:
    """The diffusers ``scheduler_config.json`` that makes DDIM on ``schedule`` the model's own sampler."""
    return {"_class_name": "DDIMScheduler", **dataclasses.asdict(schedule)}


def save_bundle(
    components: Components, folder: str | os.PathLike = BUNDLE, info: dict | None = None, clip: CLIP | None = None
) -> Path:
    """Write the model in sdjax's layout with float16 parameters (loading casts them back to float32),
    ``info`` (training times, losses, device) as ``train_info.json``, and with ``clip`` its image tower,
    projection and temperature (``clip_image_tower.safetensors``; :func:`load_clip` puts CLIP back together)."""
    import json

    folder = convert.save_sdjax(components.astype(jnp.float16), folder)
    (folder / "train_info.json").write_text(json.dumps(info or {}, indent=1) + "\n")
    if clip is not None:
        tree = jax.tree.map(lambda p: np.asarray(p, np.float16), _image_side(clip))
        config = {"resolution": clip.resolution, "image_channels": clip.image_channels, "embed_dim": clip.embed_dim}
        io.save_tree(folder / CLIP_IMAGE_FILE, tree, {"clip": config})
    return folder


def _image_side(clip: CLIP) -> dict:
    return {
        "image_model": nnx.state(clip.image_model, nnx.Param),
        "text_projection": nnx.state(clip.text_projection, nnx.Param),
        "logit_scale": clip.logit_scale[...],
    }


def load_clip(text_encoder: CLIPTextModel, folder: str | os.PathLike = BUNDLE) -> CLIP:
    """The whole CLIP of a bundle: its text encoder (the model's, loaded) and the image side saved beside it."""
    path = Path(folder) / CLIP_IMAGE_FILE
    flat, meta = io.read(path)
    if "clip" not in meta:
        raise ValueError(f"{path} holds no CLIP config: it was not written by sdjax.tiny_sd.save_bundle")
    c = meta["clip"]
    clip = CLIP(text_encoder.config, c["resolution"], tuple(c["image_channels"]), c["embed_dim"], rngs=nnx.Rngs(0))
    clip.text_model = text_encoder
    tree = io.unflatten_like(_image_side(clip), flat, source=str(path))
    nnx.update(clip.image_model, jax.tree.map(jax.device_put, tree["image_model"]))
    nnx.update(clip.text_projection, jax.tree.map(jax.device_put, tree["text_projection"]))
    clip.logit_scale[...] = jnp.asarray(tree["logit_scale"], jnp.float32)
    return clip


# ---------------------------------------------------------------------------------------------------
# Measuring prompt following
# ---------------------------------------------------------------------------------------------------


def evaluation_prompts(n: int, seed: int = 1, max_objects: int = 2) -> list[str]:
    """n captions drawn as the training data's are (1 … max_objects objects), from another seed."""
    rng = np.random.default_rng(seed)
    return [data.caption(data.sample_attributes(rng, max_objects)) for _ in range(n)]


@dataclasses.dataclass
class GuidanceSweep:
    """What :func:`prompt_following` measured: per guidance scale w, the images (N, H, W, 3) in [−1, 1],
    the probe's score of them against their own prompts, and against a shuffled copy of the prompts
    (another image's prompt: what a model that ignored the text would score, the chance level)."""

    prompts: list[str]
    images: dict[float, np.ndarray]
    scores: dict[float, probe.PromptScore]
    shuffled: dict[float, probe.PromptScore]

    def table(self, real: probe.PromptScore | None = None) -> str:
        """A markdown table: one row per scale, its chance row under it, and ``real`` (real images) on top."""
        rows = [probe.PromptScore.HEADER]
        if real is not None:
            rows.append(real.row("real images"))
        for w, score in self.scores.items():
            rows += [score.row(f"w = {w:g}"), self.shuffled[w].row(f"w = {w:g}, shuffled prompts")]
        return "\n".join(rows)


def prompt_following(
    pipe,
    prompts: list[str],
    guidance_scales: list[float],
    *,
    reader: probe.ShapesProbe | None = None,
    num_inference_steps: int = 25,
    scheduler: str | None = "ddim",
    seed: int = 0,
    negative_prompt: str | None = None,
    batch_size: int = 100,
) -> GuidanceSweep:
    """Generate one image per prompt at each guidance scale (the same seeds, so the same starting noise
    for every scale) and score them with the attribute probe (the shipped 16-px one by default).
    ``pipe`` is a :class:`sdjax.StableDiffusion`; the prompts must be shapes captions."""
    reader = reader or probe.load(16)
    wanted = [data.parse_caption(p) for p in prompts]
    shuffled = [wanted[i] for i in np.random.default_rng(seed).permutation(len(wanted))]
    images, scores, chance = {}, {}, {}
    for w in guidance_scales:
        parts = [
            pipe(
                prompts[i : i + batch_size],
                negative_prompt=negative_prompt,
                num_inference_steps=num_inference_steps,
                guidance_scale=w,
                scheduler=scheduler,
                seed=seed + i,
                output_type="np",
            )
            for i in range(0, len(prompts), batch_size)
        ]
        images[w] = np.concatenate(parts) * 2.0 - 1.0
        reading = probe.read(reader, images[w])
        scores[w], chance[w] = probe.score_prompts(reading, wanted), probe.score_prompts(reading, shuffled)
    return GuidanceSweep(list(prompts), images, scores, chance)


def main(argv: list[str] | None = None) -> None:
    """``python -m sdjax.tiny_sd --workdir runs/tiny-sd``: train the bundled model (resuming), then write it."""
    import argparse
    import datetime
    import time

    parser = argparse.ArgumentParser(description=main.__doc__)
    parser.add_argument("--workdir", default="runs/tiny-sd", help="checkpoints of the three stages")
    parser.add_argument("--out", default=str(BUNDLE), help="where to write the trained model")
    args = parser.parse_args(argv)
    start = time.time()
    trained = train(TINY_SD, workdir=args.workdir)
    device = jax.devices()[0]
    info = {
        "recipe": TINY_SD.name,
        "images": TINY_SD.num_images,
        "steps": {"vae": TINY_SD.vae_steps, "clip": TINY_SD.clip_steps, "unet": TINY_SD.unet_steps},
        "final_loss": {stage: float(np.mean(h["loss"][-200:])) for stage, h in trained.histories.items() if h},
        "minutes_this_session": round((time.time() - start) / 60, 1),
        "device": f"{device.platform}: {device.device_kind} ×{jax.device_count()}",
        "date": datetime.date.today().isoformat(),
    }
    print(f"wrote {save_bundle(trained.components, args.out, info, clip=trained.clip)}: {info}")


if __name__ == "__main__":
    main()
