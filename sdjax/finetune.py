"""Fine-tuning: teach a trained Stable Diffusion a new subject or style from a few images.

Every method minimises the same denoising loss as training from scratch (Ho et al. 2020),

    L(θ) = E_{z_0, c, t, ε} ‖ε − ε̂_θ(√ᾱ_t z_0 + √(1 − ᾱ_t) ε, t, CLIP(c))‖²,

on latents z_0 = s · E(x) of the new images x and their prompts c. They differ only in *which* θ moves
(the rest stays frozen), and so in what they can learn and how big the result is:

============================  ===================================================  ==================
method                        what trains                                          file it makes
============================  ===================================================  ==================
``lora`` (Hu et al. 2021)     low-rank ΔW = (α/r) A B beside the attention         a few MB
                              projections W (``sdjax.lora``); W frozen
``textual_inversion``         one new token's embedding v* in CLIP's table         a few KB
(Gal et al. 2022)             (``sdjax.textual_inversion``); everything else
                              frozen: the concept must be expressible in words
``dreambooth``                the whole UNet, with prior preservation (below)      the whole UNet
(Ruiz et al. 2022)
``full``                      the whole UNet on a captioned dataset                the whole UNet
============================  ===================================================  ==================

DreamBooth's prior preservation: the instance prompt ("a sks dog") names a rare token plus the class
("dog"); fine-tuning on 3–5 photos would make the model forget what other dogs look like, so images the
model itself drew for the class prompt ("a dog") are trained on alongside, with weight λ:

    L = E ‖ε − ε̂(z_t, t, c_instance)‖² + λ E ‖ε − ε̂(z'_t, t, c_class)‖².

Here both kinds of example share one dataset, each with its weight (1 or λ), so a batch mixes them.

Few images, many views (:func:`random_views`): random crops at a random scale (scale jitter), resized
back to the training size, and horizontal flips. Crops matter — a model shown only whole images learns
the subject's silhouette and loses its detail — and flips double the data for free (unless the subject
is not mirror-symmetric: text, logos). The views are encoded by the VAE once, before training.

A captioned dataset (``full``, :func:`dataset_training_data`; the pokemon-blip-captions recipe): hundreds
of (image, caption) pairs read lazily by :mod:`sdjax.captioned`. Each image's shorter side is resized to
the training size R and an R × R square cut from it, at the centre (``center_crop``) or at a random place,
mirrored with probability 1/2 (``flip``). The views are drawn once, before training — ``views_per_image``
of them per image, each with its own crop and flip — and encoded to latents by the VAE, so only the
latents (R/8 × R/8 × 4 floats an image) stay in memory; the crops are not redrawn each epoch (raise
``views_per_image`` for more variety). Three options of the text-to-image recipe go with it:

* caption dropout: with probability p a caption is replaced by the empty prompt, so the unconditional
  prediction that classifier-free guidance needs keeps training;
* EMA (``ema_decay`` d): θ_ema ← d θ_ema + (1 − d) θ after every step; the pipeline ends with θ_ema, the
  weights that are saved (the raw ones are in the result's ``state.params``);
* min-SNR-γ weighting (Hang et al. 2023, ``min_snr_gamma`` γ): with SNR(t) = ᾱ_t / (1 − ᾱ_t), each
  example's squared error is multiplied by

      w(t) = min(SNR(t), γ) / SNR(t)        (ε-prediction),
      w(t) = min(SNR(t), γ) / (SNR(t) + 1)  (v-prediction),
      w(t) = min(SNR(t), γ)                  (x_0-prediction),

  all three the weight min(SNR, γ) on the error of the implied x̂_0, since ‖ε − ε̂‖² = SNR ‖x_0 − x̂_0‖² and
  ‖v − v̂‖² = (SNR + 1) ‖x_0 − x̂_0‖². The plain ε loss thus weighs nearly clean x_t (SNR ≫ 1) most; Hang
  et al. see the timesteps as tasks whose gradients conflict, cap the weight at γ, and report about 3.4×
  faster convergence with γ = 5.

Memory: ``dtype="bfloat16"`` runs the networks in bf16 while the optimizer keeps float32 master weights;
``remat=True`` recomputes each UNet block's activations in the backward pass (``jax.checkpoint``);
``sdjax.train.fit`` shards every batch over all local devices (data parallel).
"""

from __future__ import annotations

import dataclasses
import functools
import os
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx
from PIL import Image

from sdjax import convert, lora, textual_inversion
from sdjax.captioned import CaptionedImages, image_files
from sdjax.pipeline import StableDiffusion
from sdjax.schedulers import NoiseSchedule, q_sample, training_target
from sdjax.tiny_sd import TextToLatent, conditional_diffusion_loss, encode_means
from sdjax.train import FitResult, fit

Array = jax.Array
METHODS = ("lora", "textual_inversion", "dreambooth", "full")


@dataclasses.dataclass
class FinetuneConfig:
    """How to fine-tune. The defaults suit a few 64-px images on the bundled tiny model; for SD1.5 at
    512 px the usual values are lr 1e-4 (LoRA), 5e-4 (textual inversion), 2e-6 (DreamBooth)."""

    method: str = "lora"
    steps: int = 300
    batch_size: int = 8
    learning_rate: float | None = None  # None: the method's default (DEFAULT_LR)
    # LoRA
    rank: int = 4
    alpha: float | None = None  # None: α = r, so the update is A B itself
    lora_dropout: float = 0.0
    lora_text_encoder: bool = False  # also adapt CLIP's attention projections
    lora_convs: bool = False  # LoCon: also the UNet's ResNet and sampler convolutions (3×3 too; lora.UNET_CONVS)
    # textual inversion: the new token and the word whose embedding it starts from
    token: str | None = None
    init_word: str | None = None
    num_vectors: int = 1
    # DreamBooth
    prior_loss_weight: float = 1.0  # λ
    # data
    views_per_image: int = 32
    crop_scale: tuple[float, float] = (0.5, 1.0)  # side of a crop as a fraction of the image side
    flip: bool = True
    caption_dropout: float = 0.0  # train the unconditional prediction too (needed by full fine-tunes)
    center_crop: bool = False  # captioned datasets: centre (else random) crop after resizing the shorter side
    # training
    ema_decay: float | None = None  # d: keep θ_ema and end with it (the weights saved)
    min_snr_gamma: float | None = None  # γ of min-SNR-γ loss weighting (Hang et al. 2023; 5 in the paper)
    # memory
    dtype: str = "float32"
    remat: bool = False
    optimizer: str = "adam"  # or "adafactor": a factored second moment, no first (full fine-tuning in 16 GB)
    seed: int = 0

    def __post_init__(self):
        if self.method not in METHODS:
            raise ValueError(f"method={self.method!r}: expected one of {METHODS}")
        if self.method == "textual_inversion" and not (self.token and self.init_word):
            raise ValueError(
                "textual inversion needs token= (a new, rare string, e.g. '<sks>') and init_word= (an existing "
                "word close to the concept, e.g. 'ring', whose embedding the new one starts from)"
            )
        lo, hi = self.crop_scale
        if not 0 < lo <= hi <= 1:
            raise ValueError(f"crop_scale={self.crop_scale}: expected 0 < low ≤ high ≤ 1 (fractions of the side)")
        if self.dtype not in ("float32", "bfloat16"):
            raise ValueError(f"dtype={self.dtype!r}: expected 'float32' or 'bfloat16'")
        if self.optimizer not in OPTIMIZERS:
            raise ValueError(f"optimizer={self.optimizer!r}: expected one of {sorted(OPTIMIZERS)}")
        if not 0 <= self.caption_dropout <= 1:
            raise ValueError(f"caption_dropout={self.caption_dropout}: expected a probability in [0, 1]")
        if self.ema_decay is not None and not 0 <= self.ema_decay < 1:
            raise ValueError(f"ema_decay={self.ema_decay}: expected 0 ≤ d < 1 (e.g. 0.9999), or None for no EMA")
        if self.min_snr_gamma is not None and not self.min_snr_gamma > 0:
            raise ValueError(f"min_snr_gamma={self.min_snr_gamma}: expected γ > 0 (e.g. 5), or None for no weighting")

    @property
    def lr(self) -> float:
        return self.learning_rate if self.learning_rate is not None else DEFAULT_LR[self.method]


# Adam keeps two float32 moments per trained weight (6.9 GB for SD1.5's UNet); Adafactor (Shazeer & Stern
# 2018) keeps, per matrix, one row and one column of its second moment and no first moment: megabytes.
OPTIMIZERS = {"adam": optax.adam, "adafactor": optax.adafactor}
DEFAULT_LR = {"lora": 1e-3, "textual_inversion": 5e-3, "dreambooth": 1e-4, "full": 1e-4}


# ---------------------------------------------------------------------------------------------------
# Data: a folder of images, and many views of a few images
# ---------------------------------------------------------------------------------------------------


def load_image_folder(path: str | os.PathLike) -> tuple[list[Image.Image], list[str] | None]:
    """Every image in a folder (sorted by name) as RGB PIL images of any size, and their captions when
    each image has one beside it in a text file of the same name (``cat1.png`` + ``cat1.txt``, the layout
    kohya's scripts and most captioned fine-tuning sets use), else None."""
    files = image_files(path)
    texts = [f.with_suffix(".txt") for f in files]
    captions = [t.read_text(encoding="utf-8").strip() for t in texts] if all(t.is_file() for t in texts) else None
    return [Image.open(f).convert("RGB") for f in files], captions


def _as_pil(image) -> Image.Image:
    """A PIL image, or an (H, W, 3) float array in [−1, 1] (sdjax's convention), as an RGB PIL image."""
    if isinstance(image, Image.Image):
        return image.convert("RGB")
    array = np.asarray(image, np.float32)
    return Image.fromarray(np.round((np.clip(array, -1, 1) + 1) * 127.5).astype(np.uint8))


def random_views(
    images, n: int, resolution: int, seed: int = 0, crop_scale=(0.5, 1.0), flip: bool = True
) -> np.ndarray:
    """``n`` augmented views of the images (cycled in order): a random square crop whose side is a
    fraction u ∼ U(crop_scale) of the image's shorter side, at a uniformly random place, resized to
    ``resolution`` (Lanczos), mirrored left–right with probability 1/2 when ``flip``.

    ``images``: PIL images or (N, H, W, 3) floats in [−1, 1]. Returns (n, resolution, resolution, 3)
    float32 in [−1, 1]. crop_scale=(1, 1) and flip=False give centre crops of the whole images.
    """
    pils = [_as_pil(im) for im in images]
    rng = np.random.default_rng(seed)
    views = np.empty((n, resolution, resolution, 3), np.float32)
    for i in range(n):
        im = pils[i % len(pils)]
        w, h = im.size
        side = max(1, int(round(rng.uniform(*crop_scale) * min(w, h))))
        left, top = rng.integers(0, w - side + 1), rng.integers(0, h - side + 1)
        view = im.crop((left, top, left + side, top + side)).resize((resolution, resolution), Image.LANCZOS)
        if flip and rng.random() < 0.5:
            view = view.transpose(Image.FLIP_LEFT_RIGHT)
        views[i] = np.asarray(view, np.float32) / 127.5 - 1.0
    return views


def encode_latents(sd: StableDiffusion, images: np.ndarray) -> np.ndarray:
    """z_0 = s · E(x): (N, H, W, 3) in [−1, 1] → the scaled posterior means (N, H/f, W/f, 4), float32."""
    vae = sd.vae
    return encode_means(vae, images.astype(sd.dtype)).astype(np.float32) * vae.config.scaling_factor


def training_data(
    sd: StableDiffusion,
    images,
    prompt: str | list[str],
    config: FinetuneConfig,
    *,
    class_images=None,
    class_prompt: str | None = None,
    resolution: int | None = None,
) -> dict[str, np.ndarray]:
    """``fit``'s data for fine-tuning: {"latent": (M, h, w, 4), "ids": (M, 77), "weight": (M,)}.

    ``images`` get ``views_per_image`` augmented views each, all with ``prompt`` (one string, or one per
    image). ``class_images`` with ``class_prompt`` (DreamBooth's prior; see :func:`draw_class_images`) join
    as they are, with weight λ = ``prior_loss_weight``. ``resolution``: the training size (default
    the UNet's ``sample_size`` × the VAE's factor, the size the model was trained at).
    """
    resolution = resolution or sd.unet.config.sample_size * sd.vae_scale_factor
    prompts = [prompt] * len(images) if isinstance(prompt, str) else list(prompt)
    if len(prompts) != len(images):
        raise ValueError(f"{len(prompts)} prompts for {len(images)} images: give one prompt, or one per image")
    n = config.views_per_image * len(images)
    views = random_views(images, n, resolution, config.seed, config.crop_scale, config.flip)
    latents, texts, weights = [encode_latents(sd, views)], [prompts[i % len(images)] for i in range(n)], [np.ones(n)]
    if class_images is not None:
        if not class_prompt:
            raise ValueError("class_images need their class_prompt (e.g. 'a shape' for instance prompt 'a sks shape')")
        prior = random_views(class_images, len(class_images), resolution, config.seed + 1, (1.0, 1.0), False)
        latents.append(encode_latents(sd, prior))
        texts += [class_prompt] * len(prior)
        weights.append(np.full(len(prior), config.prior_loss_weight))
    return {
        "latent": np.concatenate(latents),
        "ids": np.asarray(sd.tokenizer(sd.tokenizer.expand(texts)), np.int32),
        "weight": np.concatenate(weights).astype(np.float32),
    }


def draw_class_images(sd: StableDiffusion, class_prompt: str, n: int, seed: int = 0, **sampling) -> np.ndarray:
    """DreamBooth's prior: ``n`` images the model itself draws for the class prompt, before fine-tuning.
    Returns (n, H, W, 3) in [−1, 1]."""
    images = sd([class_prompt], num_images_per_prompt=n, seed=seed, output_type="np", **sampling)
    return images * 2.0 - 1.0


def resize_and_crop(
    image: Image.Image, resolution: int, rng: np.random.Generator, center_crop: bool = False, flip: bool = True
) -> np.ndarray:
    """One training view of a dataset image: the shorter side resized to ``resolution`` (Lanczos), a
    ``resolution``² square cut at the centre or at a uniformly random place along the longer side, mirrored
    left–right with probability 1/2 when ``flip``. Returns (resolution, resolution, 3) float32 in [−1, 1]."""
    image = _as_pil(image)
    w, h = image.size
    scale = resolution / min(w, h)
    w, h = max(resolution, round(w * scale)), max(resolution, round(h * scale))
    image = image.resize((w, h), Image.LANCZOS)
    if center_crop:
        left, top = (w - resolution) // 2, (h - resolution) // 2
    else:
        left, top = rng.integers(0, w - resolution + 1), rng.integers(0, h - resolution + 1)
    view = image.crop((left, top, left + resolution, top + resolution))
    if flip and rng.random() < 0.5:
        view = view.transpose(Image.FLIP_LEFT_RIGHT)
    return np.asarray(view, np.float32) / 127.5 - 1.0


def dataset_training_data(
    sd: StableDiffusion,
    dataset: CaptionedImages,
    config: FinetuneConfig,
    *,
    resolution: int | None = None,
    chunk: int = 32,
    progress: bool = True,
) -> dict[str, np.ndarray]:
    """``fit``'s data for fine-tuning on a captioned dataset (:func:`sdjax.captioned.load_captioned`):
    {"latent": (N·V, h, w, 4), "ids": (N·V, 77)}, V = ``views_per_image`` views of each image
    (:func:`resize_and_crop` with ``center_crop`` and ``flip``; drawn once, from ``seed``), with its caption.
    (The config's default V = 32 suits a few images; for a dataset of hundreds V = 1 is the usual choice.)

    Images are read one at a time and encoded about ``chunk`` views at a time, so memory holds the latents
    and a chunk of views in pixels, never the whole set. ``resolution``: as in :func:`training_data`.
    """
    from tqdm import tqdm

    resolution = resolution or sd.unet.config.sample_size * sd.vae_scale_factor
    rng = np.random.default_rng(config.seed)
    latents, views = [], []
    for i in tqdm(range(len(dataset)), desc="encode", disable=not progress, mininterval=1.0):
        image = dataset.image(i)
        views += [
            resize_and_crop(image, resolution, rng, config.center_crop, config.flip)
            for _ in range(config.views_per_image)
        ]
        if len(views) >= chunk or i == len(dataset) - 1:
            latents.append(encode_latents(sd, np.stack(views)))
            views = []
    captions = [c for c in dataset.captions for _ in range(config.views_per_image)]
    return {
        "latent": np.concatenate(latents),
        "ids": np.asarray(sd.tokenizer(sd.tokenizer.expand(captions)), np.int32),
    }


# ---------------------------------------------------------------------------------------------------
# Training
# ---------------------------------------------------------------------------------------------------


def _trainable(config: FinetuneConfig):
    """The nnx filter of what a method trains, in the (unet, text_encoder) model :func:`finetune` builds."""
    if config.method == "lora":
        return lora.LoRAParam
    if config.method == "textual_inversion":
        return nnx.All(nnx.Param, nnx.PathContains("token_embedding"))
    return nnx.All(nnx.Param, nnx.PathContains("unet"))


def min_snr_weight(schedule: NoiseSchedule, t: Array, gamma: float) -> Array:
    """Min-SNR-γ loss weights (Hang et al. 2023) at timesteps t (B,) int: min(SNR, γ)/SNR for ε-prediction,
    min(SNR, γ)/(SNR + 1) for v-prediction, min(SNR, γ) for x_0-prediction. (B,) float32."""
    snr = schedule.snr(t)
    clipped = jnp.minimum(snr, gamma)
    if schedule.prediction_type == "epsilon":
        return clipped / snr
    if schedule.prediction_type == "v_prediction":
        return clipped / (snr + 1.0)
    return clipped


def _loss(sd: StableDiffusion, config: FinetuneConfig, new_rows: np.ndarray | None):
    """The weighted denoising loss (tiny_sd.conditional_diffusion_loss; min-SNR-γ weighted with
    ``min_snr_gamma``), with two wrappers:

    * textual inversion: the embedding table E trains as a whole, but rows other than the new tokens'
      pass through ``stop_gradient``, so their gradient is exactly 0 and Adam leaves them unchanged:
      E' = m ⊙ E + (1 − m) ⊙ sg(E), m = 1 on the new rows.
    * bf16: the networks run on bf16 copies of the float32 master weights (mixed precision).

    With LoRA dropout the adapters' dropout keys are folded with a number drawn from the step's key, so
    every step draws new masks (the rng state lives in the frozen part of the model, which a step does not
    return).
    """
    empty_ids = np.asarray(sd.tokenizer([""]), np.int32)[0]
    gamma = config.min_snr_gamma
    weight = None if gamma is None else functools.partial(min_snr_weight, sd.schedule, gamma=gamma)
    base = conditional_diffusion_loss(sd.schedule, empty_ids, config.caption_dropout, timestep_weight=weight)
    dtype = jnp.dtype(config.dtype)

    def loss_fn(model: TextToLatent, batch, key):
        if config.lora_dropout:  # fresh dropout masks each step (the frozen rng state is not carried over)
            graphdef, keys, rest = nnx.split(model, nnx.RngKey, ...)
            salt = jax.random.randint(jax.random.fold_in(key, 1), (), 0, jnp.iinfo(jnp.int32).max)
            model = nnx.merge(graphdef, jax.tree.map(lambda k: jax.random.fold_in(k, salt), keys), rest)
        if new_rows is not None:
            table = model.text_encoder.embeddings.token_embedding.embedding
            mask = jnp.asarray(new_rows)[:, None]
            table[...] = jnp.where(mask, table[...], jax.lax.stop_gradient(table[...]))
        if dtype != jnp.float32:
            graphdef, state = nnx.split(model)
            state = jax.tree.map(lambda a: a.astype(dtype) if jnp.issubdtype(a.dtype, jnp.floating) else a, state)
            model = nnx.merge(graphdef, state)
        return base(model, batch, key)

    return loss_fn


def finetune(
    sd: StableDiffusion,
    data: dict[str, np.ndarray],
    config: FinetuneConfig,
    *,
    progress: bool = True,
    checkpoint: str | os.PathLike | None = None,
    checkpoint_every: int | None = None,
) -> FitResult:
    """Fine-tune ``sd`` in place on ``data`` (from :func:`training_data`) by ``config.method``.

    Before training, ``lora`` adds fresh adapters (B = 0, so the model starts unchanged) to the UNet's
    attention projections (and CLIP's with ``lora_text_encoder``), unless the UNet has adapters already
    (they train on). ``textual_inversion`` needs ``config.token`` added first
    (``textual_inversion.add_token``; :func:`run` does it) and prompts in ``data`` that use it. With
    ``config.ema_decay``, ``sd`` ends with the EMA weights (the last raw ones are in ``result.state.params``).
    ``checkpoint``: a file to resume from if it exists and to save to (every ``checkpoint_every`` steps and
    at the end); resuming with the same config and data gives the weights of an uninterrupted run. Returns
    ``fit``'s result (its ``history`` holds the loss).
    """
    if sd.dtype != jnp.float32:
        raise ValueError(
            "fine-tune a float32 pipeline (weights are the optimizer's masters); use dtype='bfloat16' "
            "in the FinetuneConfig for bf16 compute"
        )
    new_rows = None
    if config.method == "lora" and not lora.lora_layers(sd.unet):  # (existing adapters train on)
        targets = lora.LoRAConfig.targets + (lora.UNET_CONVS if config.lora_convs else ())
        cfg = lora.LoRAConfig(rank=config.rank, alpha=config.alpha, dropout=config.lora_dropout, targets=targets)
        lora.add_lora(sd.unet, cfg, rngs=nnx.Rngs(params=config.seed, dropout=config.seed))
        if config.lora_text_encoder:
            lora.add_lora(sd.text_encoder, cfg, rngs=nnx.Rngs(params=config.seed + 1, dropout=config.seed + 1))
    elif config.method == "textual_inversion":
        if config.token not in sd.tokenizer.added_tokens:
            raise ValueError(
                f"{config.token!r} is not in the tokenizer yet: add it with textual_inversion.add_token(sd.tokenizer, "
                f"sd.text_encoder, {config.token!r}, init_word={config.init_word!r}) before building the data (or "
                "let sdjax.finetune.run do both)"
            )
        new_rows = textual_inversion.new_rows_mask(sd.tokenizer, sd.text_encoder, config.token)
        if not np.isin(np.flatnonzero(new_rows), data["ids"]).any():
            raise ValueError(
                f"no training prompt uses {config.token!r}: name it in the prompt, e.g. 'a {config.token}'"
            )
    sd.unet.remat = config.remat
    model = TextToLatent(sd.unet, sd.text_encoder, freeze_text=False)
    model.train()  # LoRA's dropout acts in training mode only
    try:
        result = fit(
            model,
            _loss(sd, config, new_rows),
            data,
            steps=config.steps,
            batch_size=config.batch_size,
            optimizer=OPTIMIZERS[config.optimizer](config.lr),
            seed=config.seed,
            ema_decay=config.ema_decay,
            checkpoint=checkpoint,
            checkpoint_every=checkpoint_every,
            progress=progress,
            desc=f"fine-tune · {config.method}",
            trainable=_trainable(config),
        )
    finally:
        sd.unet.remat = False
        model.eval()
    if result.state.ema is not None:
        nnx.update(model, result.state.ema)  # the pipeline keeps (and save writes) the EMA weights
    return result


def run(
    sd: StableDiffusion,
    images,
    prompt: str | list[str],
    config: FinetuneConfig,
    *,
    class_prompt: str | None = None,
    num_class_images: int = 0,
    progress: bool = True,
) -> FitResult:
    """Everything in order: add the token (textual inversion), draw the class images (DreamBooth prior,
    ``num_class_images`` > 0, before any weight changes), build the views, fine-tune."""
    if config.method == "textual_inversion" and config.token not in sd.tokenizer.added_tokens:
        textual_inversion.add_token(
            sd.tokenizer, sd.text_encoder, config.token, init_word=config.init_word, num_vectors=config.num_vectors
        )
    prior = draw_class_images(sd, class_prompt, num_class_images, seed=config.seed) if num_class_images else None
    data = training_data(sd, images, prompt, config, class_images=prior, class_prompt=class_prompt)
    return finetune(sd, data, config, progress=progress)


def save(sd: StableDiffusion, config: FinetuneConfig, path: str | os.PathLike, format: str | None = None) -> Path:
    """Write what fine-tuning learned, in the file people share:

    * lora: the adapters (``format`` "diffusers", default, or "kohya"; :func:`sdjax.lora.save_lora`);
    * textual_inversion: the token's vectors (``format`` "diffusers", default, or "a1111"), a few KB;
    * dreambooth/full: the whole model, in ``format`` "sdjax", "diffusers" or "compvis" (default: a CompVis
      single file for a ``.safetensors`` path, an sdjax folder otherwise; :func:`sdjax.convert.save`).
    """
    if config.method == "lora":
        text = sd.text_encoder if config.lora_text_encoder else None
        return lora.save_lora(path, unet=sd.unet, text_encoder=text, format=format or "diffusers")
    if config.method == "textual_inversion":
        vectors = textual_inversion.read_embeddings(sd.tokenizer, sd.text_encoder, config.token)
        return textual_inversion.save_embeddings(path, vectors, format=format or "diffusers")
    return convert.save(sd.components, path, layout=format)


@functools.partial(jax.jit, static_argnames=("graphdef", "schedule"))
def _fixed_noise_loss(graphdef, state, schedule, z0: Array, ids: Array, t: Array, eps: Array) -> Array:
    """mean ‖target − model(q_sample(z_0, t, ε), t, ids)‖² for given t and ε (no randomness)."""
    model = nnx.merge(graphdef, state)
    prediction = model(q_sample(schedule, z0, t, eps), t, ids).astype(jnp.float32)
    return jnp.mean((prediction - training_target(schedule, z0, t, eps)) ** 2)


def heldout_loss(sd: StableDiffusion, images: np.ndarray, prompts: list[str], *, seed: int = 0, n_t: int = 8) -> float:
    """The denoising loss on held-out images at fixed noise: ``n_t`` evenly spaced timesteps, one fixed
    ε per (image, t). Deterministic, so before/after fine-tuning are compared on the very same draws —
    how much closer the model has come to the new concept, in the loss it trains on."""
    latents = jnp.asarray(encode_latents(sd, np.asarray(images, np.float32)))
    ids = jnp.asarray(np.asarray(sd.tokenizer(sd.tokenizer.expand(prompts)), np.int32))
    n, T = len(latents), sd.schedule.num_train_timesteps
    ts = np.linspace(0, T - 1, n_t + 2)[1:-1].round().astype(np.int32)
    graphdef, state = nnx.split(TextToLatent(sd.unet, sd.text_encoder))
    keys = jax.random.split(jax.random.PRNGKey(seed), n_t)
    eps = [jax.random.normal(k, latents.shape) for k in keys]
    losses = [
        _fixed_noise_loss(graphdef, state, sd.schedule, latents, ids, jnp.full((n,), t), e)
        for t, e in zip(ts, eps, strict=True)
    ]
    return float(np.mean(losses))
