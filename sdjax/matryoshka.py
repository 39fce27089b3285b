"""Matryoshka Diffusion (Gu et al. 2023, arXiv:2310.15111) at toy scale: text → 16, 32 and 64-px images at once, in
pixel space, from one :class:`~sdjax.models.nested_unet.NestedUNet` trained progressively on notebook 04's captioned
``shapes``.

Pixel diffusion at high resolution is slow to train and to run: every step of every sample touches every pixel.
Cascades (Imagen, DeepFloyd IF) split the work into separately trained models, each upsampling the last; latent
diffusion (SD) moves it into an autoencoder's small latent and lives with what the decoder can draw. MDM keeps one
model in pixel space and makes the high resolutions cheap to *learn*: the same picture at R resolutions, each the
2× box-filtered copy of the next,

    x⁽ʳ⁾ = ↓(x⁽²ʳ⁾)                                  (16 ← 32 ← 64 px; 2 × 2 blocks averaged)

is noised at one noise level t with independent noise per resolution (MDM's "shared" schedule: the same ᾱ_t for all;
the paper shifts it per resolution, we do not — see :class:`MatryoshkaRecipe`),

    x_t⁽ʳ⁾ = √ᾱ_t x⁽ʳ⁾ + √(1 − ᾱ_t) ε⁽ʳ⁾,        ε⁽ʳ⁾ ∼ N(0, I) independent,

and the NestedUNet predicts every resolution's target together, with a loss per resolution summed with weights w_r:

    L(θ) = E_{x, t, ε} Σ_r w_r · mean_pixels ‖ target⁽ʳ⁾ − f_θ(x_t⁽ʳ⁰⁾, …, x_t⁽ʳᴿ⁻¹⁾, t, c)⁽ʳ⁾ ‖²

(target: v, as notebook 03's pixel model). Training is *progressive*: stage 1 trains the 16-px core alone (the
NestedUNet called with one image); stage 2 grows the 32-px shell around it and trains both on the 16 + 32 loss;
stage 3 adds the 64-px shell. Each stage starts from the last one's weights (EMA), and the shell's zero-initialised
inward convolution means that growing changes nothing at first (:mod:`sdjax.models.nested_unet`).

Sampling runs any sampler of :mod:`sdjax.samplers` on the *joint* state: the R images packed into one vector per
sample (:func:`pack`), so every step updates all resolutions with one network evaluation; classifier-free guidance
as in SD.

    pipe = Matryoshka.from_pretrained()                                   # sdjax/weights/matryoshka-shapes
    images = pipe("a red star and a blue circle", guidance_scale=4.0)     # 64-px PIL images
    x16, x32, x64 = pipe(prompt, output_type="levels")                    # every resolution, (N, r, r, 3) in [0, 1]
"""

from __future__ import annotations

import dataclasses
import functools
import json
import os
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from sdjax import chain as chain_lib
from sdjax import images, io, prompts, samplers, tiny_sd
from sdjax.models.clip import CLIPTextModel
from sdjax.models.nested_unet import NestedUNet, NestedUNetConfig
from sdjax.models.unet_config import UNetConfig
from sdjax.nn import count_params
from sdjax.schedulers import NoiseSchedule, q_sample, training_target
from sdjax.tokenizer import CLIPTokenizer
from sdjax.train import FitResult, fit

Array = jax.Array
BUNDLE = Path(__file__).parent / "weights" / "matryoshka-shapes"
WEIGHTS_FILE = "matryoshka.safetensors"
FORMAT = "sdjax-matryoshka"


@dataclasses.dataclass(frozen=True)
class MatryoshkaRecipe:
    """Everything that decides the toy Matryoshka model: data (notebook 04's 64-px captioned shapes), the NestedUNet,
    the loss weights and the three progressive stages.

    The noise schedule is notebook 03's (v-prediction, cosine, x̂_0 clipped to [−1, 1]), the same ᾱ_t at every
    resolution. MDM (after Hoogeboom et al.'s simple diffusion) shifts the schedule per resolution so that a 64-px
    image, whose neighbouring pixels carry redundant signal, is noised harder at the same t; sdjax's samplers step
    one ᾱ table, so we keep one — at 16 → 64 px the shift would be 2 ln 4 ≈ 2.8 in log-SNR at the top level.
    """

    name: str = "matryoshka-shapes"
    data: tiny_sd.TinySDRecipe = tiny_sd.TINY_SD
    # the core: a 16-px text-conditioned UNet2D, cross-attention at its 8×8 level (as notebook 04's UNet on latents)
    nested: NestedUNetConfig = NestedUNetConfig(
        core=UNetConfig(
            sample_size=16, in_channels=3, out_channels=3, block_out_channels=(48, 96), layers_per_block=1,
            down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
            up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"), mid_block_type="UNetMidBlock2DCrossAttn",
            num_attention_heads=4, cross_attention_dim=64, norm_num_groups=8,
        ),
        shell_channels=(32, 16),
    )  # fmt: skip
    loss_weights: tuple[float, ...] = (1.0, 1.0, 1.0)  # w_r, lowest resolution first
    # per stage (1: 16 px; 2: 16 + 32; 3: 16 + 32 + 64): steps, batch, peak learning rate
    steps: tuple[int, ...] = (2_700, 500, 500)
    batch: tuple[int, ...] = (64, 32, 16)
    lr: tuple[float, ...] = (1e-3, 5e-4, 5e-4)
    caption_dropout: float = 0.1
    # EMA from each stage's start: 0.99^500 = 7e-3 of the starting weights is left at the end of the shortest stage
    ema_decay: float = 0.99
    schedule: NoiseSchedule = dataclasses.replace(tiny_sd.TINY_SD.schedule, clip_sample=True)


MATRYOSHKA = MatryoshkaRecipe()


# ---------------------------------------------------------------------------------------------------
# The multi-resolution diffusion
# ---------------------------------------------------------------------------------------------------


def pyramid(x: Array, levels: int) -> list[Array]:
    """x (B, H, W, C) → [x⁽ᴴ/²ᴸ⁻¹⁾, …, x⁽ᴴ/²⁾, x]: each level the 2 × 2 block average of the next, lowest first."""
    out = [x]
    for _ in range(levels - 1):
        b, h, w, c = out[0].shape
        out.insert(0, out[0].reshape(b, h // 2, 2, w // 2, 2, c).mean(axis=(2, 4)))
    return out


class NestedTextModel(nnx.Module):
    """The trainee: a NestedUNet and the (frozen) text encoder. (xs_t, t (B,), ids (B, 77)) → one output per level."""

    def __init__(self, nested: NestedUNet, text_encoder: CLIPTextModel):
        self.nested, self.text_encoder = nested, text_encoder

    def __call__(self, xs: list[Array], t: Array, ids: Array) -> list[Array]:
        context = jax.lax.stop_gradient(self.text_encoder(ids).last_hidden_state)
        return self.nested(xs, t, context)


def nested_loss(schedule: NoiseSchedule, weights, levels: int, empty_ids: np.ndarray, dropout: float):
    """The joint loss (module docstring) over the first ``levels`` resolutions, in ``fit``'s form: batch
    {"image": (B, H, W, 3) uint8 at the top resolution of the *full* model, "ids": (B, 77)}. Metrics: each
    resolution's term, "loss_16" …"""
    empty = jnp.asarray(empty_ids, jnp.int32)
    weights = tuple(weights)

    def loss_fn(model: NestedTextModel, batch, key):
        full = pyramid(batch["image"].astype(jnp.float32) / 127.5 - 1.0, len(weights))
        x0 = full[:levels]
        key_t, key_drop, *keys = jax.random.split(key, 2 + levels)
        b = x0[0].shape[0]
        ids = jnp.where(jax.random.bernoulli(key_drop, dropout, (b, 1)), empty[None], batch["ids"])
        t = jax.random.randint(key_t, (b,), 0, schedule.num_train_timesteps)
        eps = [jax.random.normal(k, x.shape, jnp.float32) for k, x in zip(keys, x0)]
        outs = model([q_sample(schedule, x, t, e) for x, e in zip(x0, eps)], t, ids)
        terms = [jnp.mean((o.astype(jnp.float32) - training_target(schedule, x, t, e)) ** 2)
                 for o, x, e in zip(outs, x0, eps)]  # fmt: skip
        loss = sum(w * term for w, term in zip(weights, terms))
        return loss, {f"loss_{x.shape[1]}": term for x, term in zip(x0, terms)}

    return loss_fn


def stage_filter(stage: int) -> nnx.filterlib.Filter:
    """What progressive stage k (1, 2, …) trains: the core and the first k − 1 shells — never the text encoder."""

    def grown(path, _) -> bool:
        where = tuple(path[:2])
        return where == ("nested", "core") or (where == ("nested", "shells") and path[2] < stage - 1)

    return nnx.All(nnx.Param, grown)


# ---------------------------------------------------------------------------------------------------
# Training
# ---------------------------------------------------------------------------------------------------


def train_stage(recipe: MatryoshkaRecipe, model: NestedTextModel, stage: int, data: dict, empty_ids, *, steps=None,
                checkpoint=None, progress=True) -> FitResult:  # fmt: skip
    """Progressive stage ``stage`` (1 …) on data {"image": (N, 64, 64, 3) uint8, "ids": (N, 77)}: trains
    :func:`stage_filter`'s parameters of ``model`` on the loss of the first ``stage`` resolutions."""
    k = stage - 1
    steps = recipe.steps[k] if steps is None else steps
    return fit(
        model, nested_loss(recipe.schedule, recipe.loss_weights, stage, empty_ids, recipe.caption_dropout), data,
        steps=steps, batch_size=recipe.batch[k], optimizer=tiny_sd._adam(recipe.lr[k], steps),
        seed=recipe.data.seed + k, ema_decay=recipe.ema_decay, checkpoint=checkpoint, checkpoint_every=250,
        progress=progress,
        desc=f"stage {stage} · {'+'.join(str(r) for r in recipe.nested.resolutions[:stage])} px",
        trainable=stage_filter(stage),
    )  # fmt: skip


@dataclasses.dataclass
class Trained:
    """What :func:`train` returns: the model, and per stage its ``fit`` history and wall-clock seconds."""

    model: MatryoshkaModel
    histories: dict[str, dict]
    seconds: dict[str, float]


def train(
    recipe: MatryoshkaRecipe = MATRYOSHKA,
    *,
    workdir: str | os.PathLike | None = None,
    num_images: int | None = None,
    steps: tuple[int, ...] | None = None,
    text_folder: str | os.PathLike = tiny_sd.BUNDLE,
    progress: bool = True,
) -> Trained:
    """The progressive stages in order, each from the last one's EMA weights, with the bundled SD's text encoder
    (frozen) and tokenizer. With ``workdir`` each stage checkpoints there and a rerun resumes, adding its wall time
    to the earlier runs' (``wall_seconds.json``); ``steps`` overrides the stages' step counts."""
    from sdjax import convert

    ckpt = (lambda name: Path(workdir) / f"{name}.safetensors") if workdir else (lambda name: None)
    times = Path(workdir) / "wall_seconds.json" if workdir else None
    seconds = json.loads(times.read_text()) if times is not None and times.exists() else {}
    sd = convert.load(text_folder)
    ds = recipe.data.data(num_images)
    data = {"image": np.round((np.asarray(ds.images) + 1.0) * 127.5).astype(np.uint8),
            "ids": tiny_sd.tokenize(sd.tokenizer, ds.captions)}  # fmt: skip
    del ds
    empty = tiny_sd.tokenize(sd.tokenizer, [""])[0]
    model = NestedTextModel(NestedUNet(recipe.nested, rngs=nnx.Rngs(recipe.data.seed)), sd.text_encoder)
    histories = {}
    for stage in range(1, len(recipe.nested.resolutions) + 1):
        start = time.time()
        result = train_stage(recipe, model, stage, data, empty, steps=None if steps is None else steps[stage - 1],
                             checkpoint=ckpt(f"stage{stage}"), progress=progress)  # fmt: skip
        model = result.ema_model
        histories[str(stage)] = result.history
        seconds[str(stage)] = seconds.get(str(stage), 0.0) + time.time() - start
        if times is not None:
            times.write_text(json.dumps(seconds))
    return Trained(MatryoshkaModel(model.nested, sd.text_encoder, sd.tokenizer, recipe.schedule), histories, seconds)


# ---------------------------------------------------------------------------------------------------
# The model, saving and loading
# ---------------------------------------------------------------------------------------------------


@dataclasses.dataclass
class MatryoshkaModel:
    """The trained NestedUNet, the text encoder and tokenizer it was trained with (the bundled SD's;
    ``text_encoder_2`` None, so :mod:`sdjax.prompts` reads prompts as for SD1) and its noise schedule."""

    nested: NestedUNet
    text_encoder: CLIPTextModel
    tokenizer: CLIPTokenizer
    schedule: NoiseSchedule
    text_encoder_2: None = None

    def parameters(self) -> dict[str, int]:
        """Parameter counts: the core, each shell, the text encoder."""
        res = self.nested.config.resolutions
        shells = {f"shell {r} px": count_params(s) for r, s in zip(res[1:], self.nested.shells)}
        text = count_params(self.text_encoder)
        return {f"core {res[0]} px": count_params(self.nested.core), **shells, "text_encoder": text}


def save(model: MatryoshkaModel, folder: str | os.PathLike = BUNDLE, info: dict | None = None) -> Path:
    """Write the NestedUNet (float16) and its config to ``folder/matryoshka.safetensors``, ``info`` as
    ``train_info.json``; the text encoder is not copied (the file names the bundled SD it comes from)."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    tree = jax.tree.map(lambda p: np.asarray(p, np.float16), nnx.state(model.nested, nnx.Param))
    cfg = model.nested.config
    metadata = {
        "format": FORMAT,
        "core": cfg.core.to_diffusers(),
        "nested": {f.name: getattr(cfg, f.name) for f in dataclasses.fields(cfg) if f.name != "core"},
        "schedule": dataclasses.asdict(model.schedule),
        "text_encoder": "tiny-sd-shapes",
    }
    io.save_tree(folder / WEIGHTS_FILE, tree, metadata)
    (folder / "train_info.json").write_text(json.dumps(info or {}, indent=1) + "\n")
    return folder


def load(folder: str | os.PathLike = BUNDLE, text_folder: str | os.PathLike = tiny_sd.BUNDLE) -> MatryoshkaModel:
    """A folder written by :func:`save` (parameters in float32), with the text encoder of ``text_folder``."""
    from sdjax import convert

    path = Path(folder) / WEIGHTS_FILE
    if not path.is_file():
        raise FileNotFoundError(f"{path} does not exist: give the folder sdjax.matryoshka.save wrote")
    flat, meta = io.read(path)
    if meta.get("format") != FORMAT:
        raise ValueError(f"{path} is not an sdjax Matryoshka file (written by sdjax.matryoshka.save)")
    nested = meta["nested"]
    cfg = NestedUNetConfig(UNetConfig.from_diffusers(meta["core"]), **{
        k: tuple(v) if isinstance(v, list) else v for k, v in nested.items()})  # fmt: skip
    model = NestedUNet(cfg, rngs=nnx.Rngs(0))
    tree = io.unflatten_like(nnx.state(model, nnx.Param), flat, source=str(path))
    nnx.update(model, jax.tree.map(lambda a: jnp.asarray(a, jnp.float32), tree))
    sd = convert.load(text_folder)
    return MatryoshkaModel(model, sd.text_encoder, sd.tokenizer, NoiseSchedule(**meta["schedule"]))


# ---------------------------------------------------------------------------------------------------
# Sampling
# ---------------------------------------------------------------------------------------------------


def pack(xs: list[Array]) -> Array:
    """The joint state: [(B, r_k, r_k, C)] → (B, Σ_k r_k² C), each image flattened, lowest resolution first."""
    return jnp.concatenate([x.reshape(x.shape[0], -1) for x in xs], axis=1)


def unpack(flat: Array, shapes: list[tuple[int, ...]]) -> list[Array]:
    """The inverse of :func:`pack` for per-image ``shapes`` [(r_k, r_k, C)]."""
    sizes = np.cumsum([int(np.prod(s)) for s in shapes])[:-1]
    return [part.reshape(flat.shape[0], *s) for part, s in zip(jnp.split(flat, sizes, axis=1), shapes)]


def denoiser(nested: NestedUNet, shapes: list[tuple[int, ...]], context: Array, guidance) -> chain_lib.Model:
    """The NestedUNet as the denoising loop calls a model, on the packed joint state: ``(x (B, D), t, extra) →
    (B, D)``; under classifier-free guidance at scale ``guidance`` (``context`` the (c_∅, c) pairs, 2B) or not
    (None; context B)."""
    conditional = lambda x, t, extra: pack(nested(unpack(x, shapes), t, context))  # noqa: E731
    return conditional if guidance is None else chain_lib.guided(conditional, guidance)


@functools.partial(jax.jit, static_argnames=("graphdef", "shapes", "progress"))
def _sample(graphdef, state, shapes, progress: bool, chain, x: Array, context: Array, keys: Array, guidance) -> Array:
    """The whole chain over the packed state as one ``lax.scan``; image n's step noise from ``fold_in(keys[n], i)``."""
    model = denoiser(nnx.merge(graphdef, state), list(shapes), context, guidance)
    noise = chain_lib.noise_per_image(keys, x.shape[1:])
    return chain_lib.run(model, chain, x, noise=noise, on_step=chain_lib.Progress.tick if progress else None)


class Matryoshka:
    """Text → images at every resolution of a NestedUNet (module docstring). Build with :meth:`from_pretrained`
    (the shipped toy model by default) or from a :class:`MatryoshkaModel`. ``progress``: a bar over the steps."""

    def __init__(self, model: MatryoshkaModel):
        self.model = model
        self.progress = chain_lib.interactive()

    @classmethod
    def from_pretrained(cls, folder: str | os.PathLike = BUNDLE, text_folder=tiny_sd.BUNDLE) -> Matryoshka:
        return cls(load(folder, text_folder))

    def __call__(
        self,
        prompt: str | list[str],
        *,
        negative_prompt: str | list[str] | None = None,
        num_images_per_prompt: int = 1,
        guidance_scale: float = 4.0,
        num_inference_steps: int = 25,
        scheduler: str = "ddim",
        levels: int | None = None,
        seed: int = 0,
        output_type: str = "pil",
    ):
        """Images for ``prompt`` under guidance ``guidance_scale`` (w; 1 turns it off) with ``scheduler`` (any name
        of :mod:`sdjax.samplers`). ``levels``: how many resolutions to denoise (default all; 1 runs the core alone,
        as stage 1 trained it). Image i's noise comes from ``fold_in(PRNGKey(seed), i)``. ``output_type``: "pil" or
        "np" (the highest resolution; np: (N, r, r, 3) in [0, 1]) or "levels" (every resolution's, lowest first)."""
        m = self.model
        res = m.nested.config.resolutions
        levels = len(res) if levels is None else levels
        if not 1 <= levels <= len(res):
            raise ValueError(f"levels={levels}: this model has {len(res)} resolutions {res}; give 1 to {len(res)}")
        if output_type not in ("pil", "np", "levels"):
            raise ValueError(f"output_type={output_type!r}: use 'pil', 'np' or 'levels'")
        texts, negatives = prompts.prompt_lists(prompt, negative_prompt)
        n = len(texts) * num_images_per_prompt
        guided = guidance_scale != 1.0
        encoded = prompts.contexts(m, texts, negatives, num_images_per_prompt, guided)
        shapes = tuple((r, r, m.nested.config.core.in_channels) for r in res[:levels])
        keys = jax.vmap(lambda i: jax.random.split(jax.random.fold_in(jax.random.PRNGKey(seed), i)))(jnp.arange(n))
        chain = samplers.make(scheduler, num_inference_steps).chain(m.schedule)
        size = sum(int(np.prod(s)) for s in shapes)
        x = chain.start(jax.vmap(lambda k: jax.random.normal(k, (size,)))(keys[:, 0]))
        with chain_lib.Progress.shown(chain, self.progress):
            flat = _sample(*nnx.split(m.nested), shapes, self.progress, chain, x, encoded.context, keys[:, 1],
                           jnp.float32(guidance_scale) if guided else None)  # fmt: skip
            flat = jax.block_until_ready(flat)
        outs = [np.asarray(jnp.clip(x / 2 + 0.5, 0.0, 1.0)) for x in unpack(flat, list(shapes))]
        if output_type == "levels":
            return outs
        return outs[-1] if output_type == "np" else images.to_pil(outs[-1])


def main(argv: list[str] | None = None) -> None:
    """``python -m sdjax.matryoshka --workdir runs/matryoshka``: train the shipped toy model progressively (resuming
    from the workdir's checkpoints) and write it (float16) with ``train_info.json``."""
    import argparse
    import datetime
    import sys

    parser = argparse.ArgumentParser(description=main.__doc__)
    parser.add_argument("--workdir", default="runs/matryoshka")
    parser.add_argument("--out", default=str(BUNDLE))
    args = parser.parse_args(argv)
    Path(args.workdir).mkdir(parents=True, exist_ok=True)
    trained = train(MATRYOSHKA, workdir=args.workdir)
    device = jax.devices()[0]
    r = MATRYOSHKA
    info = {
        "recipe": r.name,
        "images": r.data.num_images,
        "resolutions": list(r.nested.resolutions),
        "steps": list(r.steps),
        "batch": list(r.batch),
        "final_loss": {
            k: {m: float(np.mean(v[-100:])) for m, v in h.items() if m.startswith("loss")}
            for k, h in trained.histories.items()
        },
        "loss_per_50_steps": {
            k: {m: [round(float(np.mean(c)), 5) for c in np.array_split(np.asarray(v), max(1, len(v) // 50))]
                for m, v in h.items() if m.startswith("loss")}
            for k, h in trained.histories.items()
        },  # fmt: skip
        "wall_minutes": {k: round(s / 60, 1) for k, s in trained.seconds.items()},
        "parameters": trained.model.parameters(),
        "device": f"{device.platform}: {device.device_kind} ×{jax.device_count()}",
        "date": datetime.date.today().isoformat(),
        "command": "python -m sdjax.matryoshka " + " ".join(argv if argv is not None else sys.argv[1:]),
    }
    print(f"wrote {save(trained.model, args.out, info)}: {info}")


if __name__ == "__main__":
    main()
