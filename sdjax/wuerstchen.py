"""Würstchen (Pernias et al. 2023, arXiv:2306.00637) at toy scale: text → a tiny *semantic* latent → stage A's
latent → pixels, three models trained one after the other on notebook 04's captioned ``shapes``.

Stable Diffusion's text-conditioned UNet works on an f = 8 latent. Its cost grows with the number of latent
positions (convolutions ∝ h·w, self-attention ∝ (h·w)²), so Würstchen moves the text-conditioned model to a
far smaller grid and gives the work of restoring detail to a second, cheaper diffusion model:

    stage C (the prior):   text c → s ∈ ℝ^{H/16 × W/16 × 16}          diffusion, cross-attention to CLIP(c), CFG
    stage B (the decoder): s, c → z ∈ ℝ^{H/4 × W/4 × 4}              diffusion on stage A's latent, s as input
    stage A (a VQGAN):     z → x ∈ ℝ^{H × W × 3}                      quantise to the codebook, decode

(the paper: 1024² images, s 24×24×16 — 42× smaller per side —, z 256×256×4). The semantic latent s is the
output of a *semantic compressor* E_s applied to the image; Würstchen's is an ImageNet-pretrained EfficientNetV2.
With no pretrained network offline, sdjax's is the shared convolutional ``Encoder`` (:mod:`sdjax.models.autoencoder`)
on a 2× box-filtered copy of the image (Würstchen shows its EfficientNet a 384² copy of the 1024² image), 4 levels,
so f = 2 · 8 = 16; it learns together with stage B from stage B's own loss — so s holds what stage B needs to
rebuild z, in a layer-normed vector per position (every vector has mean 0 and variance 1 over its 16 channels, the
unit scale diffusion wants; the paper standardises with a BatchNorm for the same reason).

Training (:func:`train`), each stage frozen once done:
  A. :class:`sdjax.models.vq.VQModel` with :func:`sdjax.models.vq.vq_loss`; then z_0 = κ · E_A(x), κ = 1/std;
  B. L_B = E ‖target − UNet_B([z_t, ↑s], t, c)‖² with s = E_s(x) in the loop (E_s trains too), c the caption;
  C. L_C = E ‖target − UNet_C(s_t, t, c)‖² on s = E_s(x) from the frozen compressor, 10 % of captions empty.
The losses are :func:`sdjax.tiny_sd.conditional_diffusion_loss`; the networks are sdjax's ``UNet2D`` and the text
encoder is the bundled model's CLIP (frozen), so stage C is notebook 04's UNet layout (narrower at its second level)
on a grid with 4× fewer positions.

    pipe = Wuerstchen.from_pretrained()                            # sdjax/weights/wuerstchen-shapes
    images = pipe("a red star and a blue circle", prior_guidance_scale=4.0, seed=0)
    stages = pipe(prompt, output_type="stages")                    # s, z and the images, for pictures
"""

from __future__ import annotations

import dataclasses
import functools
import os
from pathlib import Path
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from sdjax import chain as chain_lib
from sdjax import images, io, prompts, samplers, tiny_sd
from sdjax.models.autoencoder import AutoencoderConfig, Encoder
from sdjax.models.clip import CLIPTextModel
from sdjax.models.unet import UNet2D, UNetConfig
from sdjax.models.vq import VQConfig, VQModel, vq_loss
from sdjax.nn import count_params
from sdjax.schedulers import NoiseSchedule
from sdjax.tokenizer import CLIPTokenizer
from sdjax.train import FitResult, fit

Array = jax.Array
BUNDLE = Path(__file__).parent / "weights" / "wuerstchen-shapes"
WEIGHTS_FILE = "wuerstchen.safetensors"
FORMAT = "sdjax-wuerstchen"


def _cross_attention_unet(plain_levels: int = 0, **fields) -> UNetConfig:
    """A UNet2D that cross-attends to the bundled CLIP's 64-wide context (as TINY_SD's) at every level but the first
    ``plain_levels`` (ResnetBlocks only there)."""
    levels = len(fields["block_out_channels"])
    down = ("DownBlock2D",) * plain_levels + ("CrossAttnDownBlock2D",) * (levels - plain_levels)
    return UNetConfig(
        layers_per_block=1,
        down_block_types=down,
        up_block_types=tuple(t.replace("Down", "Up") for t in reversed(down)),
        mid_block_type="UNetMidBlock2DCrossAttn",
        num_attention_heads=4,
        cross_attention_dim=64,
        **fields,
    )


@dataclasses.dataclass(frozen=True)
class WuerstchenRecipe:
    """Everything that decides the toy Würstchen: the data (notebook 04's: :data:`sdjax.tiny_sd.TINY_SD`'s images
    and captions), the three stages' networks and their training."""

    name: str = "wuerstchen-shapes"
    data: tiny_sd.TinySDRecipe = tiny_sd.TINY_SD
    # A. a VQ autoencoder with f = 4: 64² × 3 → 16² × 4, codebook of 256 codes
    stage_a: VQConfig = VQConfig(
        block_out_channels=(16, 32, 64), latent_channels=4, num_vq_embeddings=256, norm_num_groups=8,
        mid_block_attention=False, legacy=False,
    )  # fmt: skip
    stage_a_steps: int = 1_200
    stage_a_batch: int = 16
    # the semantic compressor, f = 16 overall: the image box-filtered 2× (as Würstchen shows its EfficientNet a
    # 384² copy of a 1024² image), then 4 levels: 64² × 3 → 32² × 3 → 4² × 16
    semantic: AutoencoderConfig = AutoencoderConfig(
        block_out_channels=(16, 32, 64, 64), latent_channels=16, norm_num_groups=8, mid_block_attention=False
    )
    semantic_pool: int = 2
    # B. the decoder's denoiser on 16² × 4 latents, with ↑s (16 channels) concatenated to its input; cross-attention
    # at its 8² level only
    stage_b: UNetConfig = _cross_attention_unet(
        plain_levels=1, sample_size=16, in_channels=4 + 16, out_channels=4, block_out_channels=(32, 64),
        norm_num_groups=8,
    )
    stage_b_steps: int = 4_000
    stage_b_batch: int = 16
    # C. the prior on 4² × 16 semantic latents: TINY_SD's UNet layout, narrower at the second level (96 channels
    # against 128, so that the shipped file stays under 10 MB), on a grid 4× smaller
    stage_c: UNetConfig = _cross_attention_unet(
        sample_size=4, in_channels=16, out_channels=16, block_out_channels=(64, 96), norm_num_groups=16
    )
    stage_c_steps: int = 4_000
    stage_c_batch: int = 64
    lr: float = 1e-3
    caption_dropout: float = 0.1
    # EMA θ_ema ← d θ_ema + (1 − d) θ from the initial weights: after n steps d^n of them is left, so d suits the
    # run's length (0.995^4000 = 2e-9; TINY_SD's 0.999 would leave 2 % of the random start in a 4,000-step run)
    ema_decay: float = 0.995
    schedule: NoiseSchedule = tiny_sd.TINY_SD.schedule


WUERSTCHEN = WuerstchenRecipe()


# ---------------------------------------------------------------------------------------------------
# The networks
# ---------------------------------------------------------------------------------------------------


class SemanticCompressor(nnx.Module):
    """E_s: images (B, H, W, 3) in [−1, 1] → s (B, H/f, W/f, c), f = pool · 2^(levels − 1): the image averaged over
    pool × pool blocks, the encoder, then each vector layer-normed over its c channels (no learned scale or shift:
    mean 0, variance 1 per position)."""

    def __init__(self, cfg: AutoencoderConfig, pool: int = 1, *, rngs: nnx.Rngs):
        self.config, self.pool = cfg, pool
        self.encoder = Encoder(cfg, cfg.latent_channels, rngs=rngs)

    @property
    def downsample_factor(self) -> int:
        return self.pool * self.config.downsample_factor

    def __call__(self, x: Array) -> Array:
        b, hgt, wid, c = x.shape
        x = x.reshape(b, hgt // self.pool, self.pool, wid // self.pool, self.pool, c).mean(axis=(2, 4))
        h = self.encoder(x).astype(jnp.float32)
        mean, var = jnp.mean(h, axis=-1, keepdims=True), jnp.var(h, axis=-1, keepdims=True)
        return (h - mean) * jax.lax.rsqrt(var + 1e-6)


def upsample_semantic(s: Array, size: tuple[int, int]) -> Array:
    """↑s: s (B, h, w, c) repeated to (B, H, W, c) (nearest neighbour; H, W multiples of h, w)."""
    fy, fx = size[0] // s.shape[1], size[1] // s.shape[2]
    return jnp.repeat(jnp.repeat(s, fy, axis=1), fx, axis=2)


class StageB(nnx.Module):
    """The decoder's trainee: the compressor E_s, stage B's UNet and the frozen text encoder, so that one ``fit``
    call trains E_s and UNet_B together. (z_t (B, h, w, 4), t (B,), ids (B, 77), image (B, H, W, 3) uint8) →
    UNet_B([z_t, ↑E_s(x)], t, CLIP(ids)) (B, h, w, 4)."""

    def __init__(self, compressor: SemanticCompressor, unet: UNet2D, text_encoder: CLIPTextModel):
        self.compressor, self.unet, self.text_encoder = compressor, unet, text_encoder

    def __call__(self, z_t: Array, t: Array, ids: Array, image: Array) -> Array:
        context = jax.lax.stop_gradient(self.text_encoder(ids).last_hidden_state)
        s = self.compressor(image.astype(jnp.float32) / 127.5 - 1.0)
        return self.unet(jnp.concatenate([z_t, upsample_semantic(s, z_t.shape[1:3])], axis=-1), t, context)


@dataclasses.dataclass
class WuerstchenModel:
    """The trained parts: stage A (``latent_scale`` κ = its ``scaling_factor``), the compressor, the two UNets,
    the text encoder and tokenizer (the bundled SD's; ``text_encoder_2`` None, so :mod:`sdjax.prompts` reads
    prompts for it as for SD1) and the schedule both diffusion stages were trained on."""

    stage_a: VQModel
    compressor: SemanticCompressor
    stage_b: UNet2D
    stage_c: UNet2D
    text_encoder: CLIPTextModel
    tokenizer: CLIPTokenizer
    schedule: NoiseSchedule
    text_encoder_2: None = None

    NETWORKS = ("stage_a", "compressor", "stage_b", "stage_c")

    def parameters(self) -> dict[str, int]:
        """Parameter counts per network."""
        return {name: count_params(getattr(self, name)) for name in (*self.NETWORKS, "text_encoder")}


# ---------------------------------------------------------------------------------------------------
# Training
# ---------------------------------------------------------------------------------------------------


@nnx.jit
def _encode_a(vq: VQModel, x: Array) -> Array:
    return vq.encode(x)


@nnx.jit
def _encode_s(compressor: SemanticCompressor, x: Array) -> Array:
    return compressor(x)


def encode(module, images: np.ndarray, batch_size: int = 256) -> np.ndarray:
    """Stage A's z_e (unscaled) or the compressor's s of images (N, H, W, 3) in [−1, 1] (float or uint8 pixels)."""
    fn = _encode_a if isinstance(module, VQModel) else _encode_s
    out = []
    for i in range(0, len(images), batch_size):
        x = np.asarray(images[i : i + batch_size])
        x = x.astype(np.float32) / 127.5 - 1.0 if x.dtype == np.uint8 else x.astype(np.float32)
        out.append(np.asarray(fn(module, jnp.asarray(x))))
    return np.concatenate(out)


def train_stage_a(recipe: WuerstchenRecipe, pixels: np.ndarray, *, steps=None, checkpoint=None, progress=True):
    """Stage A on the images (N, H, W, 3) float32 in [−1, 1]; then κ = 1/std(z_e). Returns (VQModel, FitResult)."""
    steps = recipe.stage_a_steps if steps is None else steps
    vq = VQModel(recipe.stage_a, rngs=nnx.Rngs(recipe.data.seed))
    result = fit(
        vq, vq_loss, {"image": pixels}, steps=steps, batch_size=recipe.stage_a_batch,
        optimizer=tiny_sd._adam(recipe.lr, steps), seed=recipe.data.seed, checkpoint=checkpoint,
        checkpoint_every=500, progress=progress, desc="A · VQ",
    )  # fmt: skip
    vq.config = dataclasses.replace(vq.config, scaling_factor=float(1.0 / np.std(encode(vq, pixels[:2048]))))
    return vq, result


def train_stage_b(recipe, latents, ids, pixels_uint8, text_encoder, empty_ids, *, steps=None, checkpoint=None,
                  progress=True) -> tuple[SemanticCompressor, UNet2D, FitResult]:  # fmt: skip
    """Stage B and the compressor together on z_0 = κ E_A(x) (N, h, w, 4), caption ids (N, 77) and the images as
    uint8 (N, H, W, 3). Returns (the compressor, the EMA UNet_B, FitResult)."""
    steps = recipe.stage_b_steps if steps is None else steps
    rngs = nnx.Rngs(recipe.data.seed)
    compressor = SemanticCompressor(recipe.semantic, recipe.semantic_pool, rngs=rngs)
    model = StageB(compressor, UNet2D(recipe.stage_b, rngs=rngs), text_encoder)
    result = fit(
        model, tiny_sd.conditional_diffusion_loss(recipe.schedule, empty_ids, 0.0, inputs=("image",)),
        {"latent": latents, "ids": ids, "image": pixels_uint8}, steps=steps, batch_size=recipe.stage_b_batch,
        optimizer=tiny_sd._adam(recipe.lr, steps), seed=recipe.data.seed, ema_decay=recipe.ema_decay,
        checkpoint=checkpoint, checkpoint_every=500, progress=progress, desc="B · decoder",
    )  # fmt: skip
    return result.ema_model.compressor, result.ema_model.unet, result


def train_stage_c(recipe, semantic, ids, text_encoder, empty_ids, *, steps=None, checkpoint=None, progress=True):
    """Stage C on s = E_s(x) (N, h/4, w/4, 16) and caption ids, caption dropout for CFG. Returns (UNet_C, FitResult)."""
    steps = recipe.stage_c_steps if steps is None else steps
    model = tiny_sd.TextToLatent(UNet2D(recipe.stage_c, rngs=nnx.Rngs(recipe.data.seed)), text_encoder)
    result = fit(
        model, tiny_sd.conditional_diffusion_loss(recipe.schedule, empty_ids, recipe.caption_dropout),
        {"latent": semantic, "ids": ids}, steps=steps, batch_size=recipe.stage_c_batch,
        optimizer=tiny_sd._adam(recipe.lr, steps), seed=recipe.data.seed, ema_decay=recipe.ema_decay,
        checkpoint=checkpoint, checkpoint_every=500, progress=progress, desc="C · prior",
    )  # fmt: skip
    return result.ema_model.unet, result


@dataclasses.dataclass
class Trained:
    """What :func:`train` returns: the model, each stage's ``fit`` history and wall-clock seconds."""

    model: WuerstchenModel
    histories: dict[str, dict]
    seconds: dict[str, float]


def train(
    recipe: WuerstchenRecipe = WUERSTCHEN,
    *,
    workdir: str | os.PathLike | None = None,
    num_images: int | None = None,
    steps: dict[str, int] | None = None,
    text_folder: str | os.PathLike = tiny_sd.BUNDLE,
    progress: bool = True,
) -> Trained:
    """Stages A, B, C in order on ``recipe.data``'s images (the first ``num_images``), the text encoder and
    tokenizer from ``text_folder`` (the bundled SD). With ``workdir`` each stage checkpoints there and a rerun
    resumes, adding its wall time to the earlier runs' (``wall_seconds.json``); ``steps`` overrides step counts
    ({"a": …, "b": …, "c": …})."""
    import json
    import time

    from sdjax import convert

    steps = steps or {}
    ckpt = (lambda name: Path(workdir) / f"{name}.safetensors") if workdir else (lambda name: None)
    times = Path(workdir) / "wall_seconds.json" if workdir else None
    seconds = json.loads(times.read_text()) if times is not None and times.exists() else {}

    def timed(stage: str, start: float) -> float:
        seconds[stage] = seconds.get(stage, 0.0) + time.time() - start
        if times is not None:
            times.write_text(json.dumps(seconds))
        return time.time()

    sd = convert.load(text_folder)
    ds = recipe.data.data(num_images)
    pixels = np.asarray(ds.images, np.float32)
    ids = tiny_sd.tokenize(sd.tokenizer, ds.captions)
    empty = tiny_sd.tokenize(sd.tokenizer, [""])[0]
    start = time.time()
    vq, fit_a = train_stage_a(recipe, pixels, steps=steps.get("a"), checkpoint=ckpt("stage_a"), progress=progress)
    start = timed("a", start)
    latents = encode(vq, pixels) * vq.config.scaling_factor
    uint8 = np.round((pixels + 1.0) * 127.5).astype(np.uint8)
    del pixels
    compressor, unet_b, fit_b = train_stage_b(
        recipe, latents, ids, uint8, sd.text_encoder, empty, steps=steps.get("b"), checkpoint=ckpt("stage_b"),
        progress=progress,
    )  # fmt: skip
    start = timed("b", start)
    semantic = encode(compressor, uint8)
    unet_c, fit_c = train_stage_c(
        recipe, semantic, ids, sd.text_encoder, empty, steps=steps.get("c"), checkpoint=ckpt("stage_c"),
        progress=progress,
    )  # fmt: skip
    timed("c", start)
    model = WuerstchenModel(vq, compressor, unet_b, unet_c, sd.text_encoder, sd.tokenizer, recipe.schedule)
    histories = {"a": fit_a.history, "b": fit_b.history, "c": fit_c.history}
    return Trained(model, histories, seconds)


# ---------------------------------------------------------------------------------------------------
# Saving and loading
# ---------------------------------------------------------------------------------------------------


def save(model: WuerstchenModel, folder: str | os.PathLike = BUNDLE, info: dict | None = None) -> Path:
    """Write the four networks (float16) and their configs to ``folder/wuerstchen.safetensors``, ``info`` as
    ``train_info.json``. The text encoder is not copied: the file names the bundled SD it comes from."""
    import json

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    trees = {name: nnx.state(getattr(model, name), nnx.Param) for name in model.NETWORKS}
    trees = jax.tree.map(lambda p: np.asarray(p, np.float16), trees)
    metadata = {
        "format": FORMAT,
        "stage_a": dataclasses.asdict(model.stage_a.config),
        "compressor": {**dataclasses.asdict(model.compressor.config), "pool": model.compressor.pool},
        "stage_b": model.stage_b.config.to_diffusers(),
        "stage_c": model.stage_c.config.to_diffusers(),
        "schedule": dataclasses.asdict(model.schedule),
        "text_encoder": "tiny-sd-shapes",
    }
    io.save_tree(folder / WEIGHTS_FILE, trees, metadata)
    (folder / "train_info.json").write_text(json.dumps(info or {}, indent=1) + "\n")
    return folder


def _tuples(config: dict) -> dict:
    return {k: tuple(v) if isinstance(v, list) else v for k, v in config.items()}


def load(folder: str | os.PathLike = BUNDLE, text_folder: str | os.PathLike = tiny_sd.BUNDLE) -> WuerstchenModel:
    """A folder written by :func:`save` (parameters in float32), with the text encoder of ``text_folder``."""
    from sdjax import convert

    path = Path(folder) / WEIGHTS_FILE
    if not path.is_file():
        raise FileNotFoundError(f"{path} does not exist: give the folder sdjax.wuerstchen.save wrote")
    flat, meta = io.read(path)
    if meta.get("format") != FORMAT:
        raise ValueError(f"{path} is not an sdjax Würstchen file (written by sdjax.wuerstchen.save)")
    rngs = nnx.Rngs(0)
    parts = {
        "stage_a": VQModel(VQConfig(**_tuples(meta["stage_a"])), rngs=rngs),
        "compressor": SemanticCompressor(AutoencoderConfig(**_tuples({k: v for k, v in meta["compressor"].items()
                                         if k != "pool"})), meta["compressor"]["pool"], rngs=rngs),
        "stage_b": UNet2D(UNetConfig.from_diffusers(meta["stage_b"]), rngs=rngs),
        "stage_c": UNet2D(UNetConfig.from_diffusers(meta["stage_c"]), rngs=rngs),
    }
    trees = io.unflatten_like({k: nnx.state(m, nnx.Param) for k, m in parts.items()}, flat, source=str(path))
    for name, module in parts.items():
        nnx.update(module, jax.tree.map(lambda a: jnp.asarray(a, jnp.float32), trees[name]))
    sd = convert.load(text_folder)
    return WuerstchenModel(**parts, text_encoder=sd.text_encoder, tokenizer=sd.tokenizer,
                           schedule=NoiseSchedule(**meta["schedule"]))  # fmt: skip


# ---------------------------------------------------------------------------------------------------
# Sampling
# ---------------------------------------------------------------------------------------------------


@functools.partial(jax.jit, static_argnames=("graphdef", "progress"))
def _prior(graphdef, state, progress: bool, chain, x: Array, context: Array, keys: Array, guidance) -> Array:
    """Stage C's chain over s (N, h, w, 16), with classifier-free guidance at scale ``guidance`` (context: the
    (c_∅, c) pairs, 2N), or without (None; context: the prompts', N)."""
    unet = nnx.merge(graphdef, state)
    conditional = lambda x, t, extra: unet(x, t, context)  # noqa: E731
    model = conditional if guidance is None else chain_lib.guided(conditional, guidance)
    noise = chain_lib.noise_per_image(keys, x.shape[1:])
    return chain_lib.run(model, chain, x, noise=noise, on_step=chain_lib.Progress.tick if progress else None)


@functools.partial(jax.jit, static_argnames=("graphdef", "progress"))
def _decoder(graphdef, state, progress: bool, chain, x: Array, semantic: Array, context: Array, keys: Array) -> Array:
    """Stage B's chain over z (N, H/4, W/4, 4) given ↑s and the prompts' contexts (N)."""
    unet = nnx.merge(graphdef, state)
    up = upsample_semantic(semantic, x.shape[1:3])
    model = lambda x, t, extra: unet(jnp.concatenate([x, up], axis=-1), t, context)  # noqa: E731
    noise = chain_lib.noise_per_image(keys, x.shape[1:])
    return chain_lib.run(model, chain, x, noise=noise, on_step=chain_lib.Progress.tick if progress else None)


@nnx.jit
def _decode_a(vq: VQModel, z: Array) -> Array:
    return jnp.clip(vq.decode(z / vq.config.scaling_factor) / 2 + 0.5, 0.0, 1.0)


class Stages(NamedTuple):
    """Every stage's output (``output_type="stages"``): semantic s (N, H/16, W/16, 16), stage A latents
    z (N, H/4, W/4, 4) (scaled by κ) and the images (N, H, W, 3) in [0, 1]."""

    semantic: np.ndarray
    latents: np.ndarray
    images: np.ndarray


class Wuerstchen:
    """Text → image through stages C, B, A (module docstring). Build with :meth:`from_pretrained` (the shipped toy
    model by default) or from a :class:`WuerstchenModel`. ``progress``: a bar over each stage's steps."""

    def __init__(self, model: WuerstchenModel):
        self.model = model
        self.progress = chain_lib.interactive()

    @classmethod
    def from_pretrained(cls, folder: str | os.PathLike = BUNDLE, text_folder=tiny_sd.BUNDLE) -> Wuerstchen:
        return cls(load(folder, text_folder))

    def __call__(
        self,
        prompt: str | list[str],
        *,
        negative_prompt: str | list[str] | None = None,
        num_images_per_prompt: int = 1,
        height: int = 64,
        width: int = 64,
        prior_guidance_scale: float = 4.0,
        prior_num_inference_steps: int = 25,
        prior_scheduler: str = "ddim",
        decoder_num_inference_steps: int = 12,
        decoder_scheduler: str = "ddim",
        seed: int = 0,
        semantic: np.ndarray | None = None,
        output_type: str = "pil",
    ):
        """Images for ``prompt``: stage C draws s under guidance ``prior_guidance_scale`` (w; 1 turns guidance off)
        with ``prior_scheduler`` (any name of :mod:`sdjax.samplers`), stage B draws z given s, stage A decodes.
        ``semantic`` (N, H/16, W/16, 16) skips stage C (e.g. E_s of a real image: a reconstruction through B and A).
        Image i's noise comes from ``fold_in(PRNGKey(seed), i)``. ``output_type``: "pil", "np" ((N, H, W, 3) in
        [0, 1]) or "stages" (:class:`Stages`)."""
        m = self.model
        texts, negatives = prompts.prompt_lists(prompt, negative_prompt)
        if output_type not in ("pil", "np", "stages"):
            raise ValueError(f"output_type={output_type!r}: use 'pil', 'np' or 'stages'")
        f_a, f_s = m.stage_a.config.downsample_factor, m.compressor.downsample_factor
        for name, value in (("height", height), ("width", width)):
            if value % f_s:
                raise ValueError(f"{name}={value} is not a multiple of {f_s}, the semantic latent's factor: e.g. 64")
        n = len(texts) * num_images_per_prompt
        guided = prior_guidance_scale != 1.0
        keys = jax.vmap(lambda i: jax.random.split(jax.random.fold_in(jax.random.PRNGKey(seed), i), 4))(jnp.arange(n))

        # stage C: text → s
        if semantic is None:
            encoded = prompts.contexts(m, texts, negatives, num_images_per_prompt, guided)
            chain = samplers.make(prior_scheduler, prior_num_inference_steps).chain(m.schedule)
            x = chain.start(jax.vmap(lambda k: jax.random.normal(k, (height // f_s, width // f_s, 16)))(keys[:, 0]))
            with chain_lib.Progress.shown(chain, self.progress):
                semantic = _prior(*nnx.split(m.stage_c), self.progress, chain, x, encoded.context, keys[:, 1],
                                  jnp.float32(prior_guidance_scale) if guided else None)  # fmt: skip
                semantic = jax.block_until_ready(semantic)
        else:
            expected = (n, height // f_s, width // f_s, m.compressor.config.latent_channels)
            if np.shape(semantic) != expected:
                raise ValueError(f"semantic of shape {np.shape(semantic)}: expected {expected} (N, H/16, W/16, 16)")
        # stage B: s, text → z
        context = prompts.contexts(m, texts, None, num_images_per_prompt, False).context
        chain = samplers.make(decoder_scheduler, decoder_num_inference_steps).chain(m.schedule)
        x = chain.start(jax.vmap(lambda k: jax.random.normal(k, (height // f_a, width // f_a, 4)))(keys[:, 2]))
        with chain_lib.Progress.shown(chain, self.progress):
            z = _decoder(*nnx.split(m.stage_b), self.progress, chain, x, jnp.asarray(semantic), context, keys[:, 3])
            z = jax.block_until_ready(z)
        # stage A: z → pixels
        pixels = np.asarray(_decode_a(m.stage_a, z))
        if output_type == "stages":
            return Stages(np.asarray(semantic), np.asarray(z), pixels)
        return pixels if output_type == "np" else images.to_pil(pixels)


def main(argv: list[str] | None = None) -> None:
    """``python -m sdjax.wuerstchen --workdir runs/wuerstchen``: train the shipped toy Würstchen (resuming from the
    workdir's checkpoints) and write it (float16) with ``train_info.json``."""
    import argparse
    import datetime
    import sys

    parser = argparse.ArgumentParser(description=main.__doc__)
    parser.add_argument("--workdir", default="runs/wuerstchen")
    parser.add_argument("--out", default=str(BUNDLE))
    args = parser.parse_args(argv)
    trained = train(WUERSTCHEN, workdir=args.workdir)
    device = jax.devices()[0]
    r = WUERSTCHEN
    info = {
        "recipe": r.name,
        "images": r.data.num_images,
        "steps": {"a": r.stage_a_steps, "b": r.stage_b_steps, "c": r.stage_c_steps},
        "batch": {"a": r.stage_a_batch, "b": r.stage_b_batch, "c": r.stage_c_batch},
        "final_loss": {k: float(np.mean(h["loss"][-200:])) for k, h in trained.histories.items() if h},
        "wall_minutes": {k: round(s / 60, 1) for k, s in trained.seconds.items()},
        "parameters": trained.model.parameters(),
        "latent_scale": trained.model.stage_a.config.scaling_factor,
        "device": f"{device.platform}: {device.device_kind} ×{jax.device_count()}",
        "date": datetime.date.today().isoformat(),
        "command": "python -m sdjax.wuerstchen " + " ".join(argv if argv is not None else sys.argv[1:]),
    }
    print(f"wrote {save(trained.model, args.out, info)}: {info}")


if __name__ == "__main__":
    main()
