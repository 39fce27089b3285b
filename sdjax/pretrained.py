"""Small trained models that ship inside sdjax, and the exact recipes that made them.

A notebook should show good samples without an hour of training first, so sdjax carries a few MB
of weights for its teaching models, each with the recipe that produced it. ``train(recipe)`` repeats
the run (``sdjax train-ddpm`` on the command line); ``load(name)`` gives the shipped result.

    model, schedule = sdjax.pretrained.load("ddpm-digits16")   # notebook 03's: 16-px grey digits
    images = sdjax.diffusion.sample(model, schedule, key, (16, 16, 16, 1))

Weights are stored in float16 (half the bytes) and loaded into float32 models. Measured for
ddpm-shapes16 against its float32 EMA weights: at most 9.8e-4 of each tensor's largest value, and
64 DDIM-50 samples from the same key differ by at most 0.006 (under one 8-bit grey level).
"""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from sdjax import io
from sdjax.data import BACKGROUNDS, COLOURS, POSITIONS, ImageDataset, load_digits, make_shapes
from sdjax.diffusion import diffusion_loss
from sdjax.models.unet import UNet2D, UNetConfig
from sdjax.schedulers import NoiseSchedule

WEIGHTS_DIR = Path(__file__).parent / "weights"


@dataclasses.dataclass(frozen=True)
class DDPMRecipe:
    """Everything that determines a trained pixel-space DDPM: data, network, schedule, optimisation.

    ``dataset`` is ``"shapes"`` (single objects from sdjax.data.make_shapes, ``num_images`` draws) or
    ``"digits"`` (the 1,797 scikit-learn digits, upsampled; ``num_images`` is ignored).

    Held-out images: to tell a model that composes what it learned from one that copies training
    images, the training set leaves out some images. For ``shapes``, every image of
    ``holdout_fraction`` of the (colour, position, background) combinations (all shapes and sizes
    of them): a sample showing one of those combinations is an image the model never saw
    (sdjax.metrics.catalogue_report). For ``digits``, a random ``holdout_fraction`` of the images: a
    model that copies sits closer to its training digits than these unseen digits do.

    The optimiser is Adam with gradient clipping and a learning rate that warms up linearly for
    ``warmup`` steps to ``lr`` and then follows a cosine down to lr/100 at ``steps``.
    """

    name: str
    unet: UNetConfig
    schedule: NoiseSchedule
    dataset: str = "shapes"
    resolution: int = 16
    num_images: int = 20_000
    data_seed: int = 0
    holdout_fraction: float = 0.1
    steps: int = 4000
    batch_size: int = 64
    lr: float = 5e-4
    warmup: int = 200
    grad_clip: float = 1.0
    ema_decay: float = 0.999
    seed: int = 0

    def __post_init__(self):
        if self.dataset not in ("shapes", "digits"):
            raise ValueError(f"recipe {self.name!r}: dataset must be 'shapes' or 'digits', got {self.dataset!r}")

    def data(self, num_images: int | None = None) -> ImageDataset:
        """The training set. ``shapes``: ``num_images`` draws of single objects at ``resolution`` px,
        less those of a held-out combination (so slightly fewer than ``num_images``). ``digits``: the
        digits not held out (``num_images``, if given, keeps the first that many of them)."""
        if self.dataset == "digits":
            keep = np.flatnonzero(~self.digits_held_out())
            return load_digits(self.resolution).subset(keep if num_images is None else keep[:num_images])
        n = self.num_images if num_images is None else num_images
        ds = make_shapes(n, resolution=self.resolution, seed=self.data_seed, max_objects=1)
        return ds.subset(np.flatnonzero(~self.is_held_out(ds.labels)))

    def held_out_data(self) -> ImageDataset:
        """``digits`` only: the digits the model never sees in training, to compare its samples with."""
        if self.dataset != "digits":
            raise ValueError(f"{self.name} holds out combinations, not images: use held_out_combinations()")
        return load_digits(self.resolution).subset(np.flatnonzero(self.digits_held_out()))

    def digits_held_out(self) -> np.ndarray:
        """(1797,) bool: which of the scikit-learn digits are held out (a fixed random ``holdout_fraction``)."""
        n = 1797
        rng = np.random.default_rng(self.data_seed + 1)
        return np.isin(np.arange(n), rng.choice(n, round(self.holdout_fraction * n), replace=False))

    def held_out_combinations(self) -> np.ndarray:
        """Indices c = (colour · 9 + position) · 4 + background of the held-out combinations, sorted."""
        total = len(COLOURS) * len(POSITIONS) * len(BACKGROUNDS)
        rng = np.random.default_rng(self.data_seed + 1)
        return np.sort(rng.choice(total, round(self.holdout_fraction * total), replace=False))

    def is_held_out(self, labels: dict[str, np.ndarray]) -> np.ndarray:
        """(N,) bool: does each image (labels as sdjax.data.make_shapes gives them) show a held-out combination?"""
        combination = (labels["colour_0"] * len(POSITIONS) + labels["position_0"]) * len(BACKGROUNDS)
        return np.isin(combination + labels["background"], self.held_out_combinations())

    def model(self, seed: int | None = None) -> UNet2D:
        """A freshly initialised network of the recipe's shape."""
        return UNet2D(self.unet, rngs=nnx.Rngs(self.seed if seed is None else seed))

    def optimizer(self, steps: int | None = None) -> optax.GradientTransformation:
        steps = self.steps if steps is None else steps
        warmup = min(self.warmup, max(steps // 10, 1))
        lr = optax.warmup_cosine_decay_schedule(0.0, self.lr, warmup, max(steps, warmup + 1), self.lr / 100)
        return optax.chain(optax.clip_by_global_norm(self.grad_clip), optax.adam(lr))


DDPM_SHAPES16 = DDPMRecipe(
    name="ddpm-shapes16",
    # Two attention levels at 8×8 and 4×4; 2.8 M parameters. At 16 px the 16×16 level is cheap
    # enough to need no attention, and the widths grow where the feature maps shrink.
    unet=UNetConfig(
        sample_size=16,
        block_out_channels=(32, 64, 128),
        layers_per_block=1,
        down_block_types=("DownBlock2D", "AttnDownBlock2D", "AttnDownBlock2D"),
        up_block_types=("AttnUpBlock2D", "AttnUpBlock2D", "UpBlock2D"),
        attention_head_dim=None,
        norm_num_groups=8,
    ),
    # The cosine schedule (Nichol & Dhariwal 2021, 2102.09672) rather than DDPM's linear β: at 16 px
    # the linear schedule leaves almost nothing of the image after t ≈ 600, so ~40 % of training
    # draws teach only "predict the mean"; the cosine ᾱ_t falls evenly and spends those draws at the
    # noise levels where the shape is decided. x̂_0 is clipped to the pixel range, and "trailing"
    # spacing makes even a 10-step DDIM chain start from pure noise at t = 999.
    # v-prediction: with ε-prediction the 4,000-step linear-schedule model trained as expected (loss
    # 0.012) but its DDIM samples were grey blurs (78 % grey backgrounds, none white or black): at
    # large t an ε error is multiplied by √(1 − ᾱ_t)/√ᾱ_t in x̂_0, so the global decisions made there
    # (background, where the shape goes) were barely trained. v = √ᾱ_t ε − √(1 − ᾱ_t) x_0 weights
    # x̂_0 errors evenly over t, and stays well defined where ᾱ_t → 0 at the end of the cosine schedule.
    schedule=NoiseSchedule(
        beta_schedule="squaredcos_cap_v2",
        timestep_spacing="trailing",
        prediction_type="v_prediction",
    ),
    steps=10_000,
    # The shipped weights are this run, on a 2-core CPU. Continuing it on an H200 (tools/gpu_train.py,
    # 2026-12-04: 3,790 more steps at batch 256) was not shipped: valid scenes read by the probe 48.6 % vs
    # 45.6 % and confident readings 62.4 % vs 66.2 % on 500 samples (±2.2 points), so not clearly better.
)

DDPM_DIGITS16 = dataclasses.replace(
    DDPM_SHAPES16,
    name="ddpm-digits16",
    # Notebook 03's model: the same network with one (grey) channel, on the scikit-learn digits at
    # 16 px. Every digit fills its frame, so there is no "empty background" answer for the model to
    # fall back on, and a 16-px digit reader (sdjax.digit_reader) can say whether a sample
    # is a digit. The shapes model above needs far more training to place its small objects reliably.
    # The shipped weights are this run on the 2-core CPU (51.9 min, 2026-12-05): the digit reader accepts
    # 97.0 % of 500 DDIM-50 samples as digits, against 98.1 % of the 270 held-out real digits.
    unet=dataclasses.replace(DDPM_SHAPES16.unet, in_channels=1, out_channels=1),
    dataset="digits",
    holdout_fraction=0.15,
    lr=1e-3,
    steps=6_000,
)

RECIPES = {r.name: r for r in (DDPM_SHAPES16, DDPM_DIGITS16)}


def _recipe(name: str) -> DDPMRecipe:
    if name not in RECIPES:
        raise ValueError(f"unknown pretrained model {name!r}; available: {sorted(RECIPES)}")
    return RECIPES[name]


def weights_path(name: str) -> Path:
    """Where the shipped weights of ``name`` live inside the package."""
    return WEIGHTS_DIR / f"{_recipe(name).name}.safetensors"


def save(path: str | os.PathLike, model: nnx.Module, recipe: DDPMRecipe, info: dict) -> None:
    """Write ``model``'s parameters in float16, with the recipe and ``info`` (steps, loss …) as metadata."""
    params = jax.tree.map(lambda p: p.astype(jnp.float16), nnx.state(model, nnx.Param))
    meta = {
        "recipe": recipe.name,
        "unet": dataclasses.asdict(recipe.unet),
        "schedule": dataclasses.asdict(recipe.schedule),
    }
    io.save_tree(path, params, meta | info)


def load(name: str = "ddpm-shapes16", path: str | os.PathLike | None = None) -> tuple[UNet2D, NoiseSchedule]:
    """The trained model and its noise schedule: the shipped weights, or those at ``path``.

    The file's recorded network config must be the recipe's; a file from another recipe is refused.
    """
    recipe = _recipe(name)
    path = Path(path) if path is not None else weights_path(name)
    if not path.is_file():
        raise FileNotFoundError(
            f"no weights for {name!r} at {path}. The package ships them under sdjax/weights/; if they are "
            f"missing, reinstall sdjax or retrain them with `sdjax train-ddpm --out {path.parent}`."
        )
    model = nnx.eval_shape(recipe.model)  # shapes only: every parameter is about to be overwritten
    flat, meta = io.read(path)
    # Fields added to UNetConfig after a file was written take their defaults.
    saved = {k: tuple(v) if isinstance(v, list) else v for k, v in meta.get("unet", {}).items()}
    try:
        same = UNetConfig(**saved) == recipe.unet
    except (TypeError, ValueError):  # keys this sdjax does not know, or an invalid config
        same = False
    if not same:
        raise ValueError(f"{path} holds a network of another shape than recipe {name!r} (config {meta.get('unet')})")
    params = io.unflatten_like(nnx.state(model, nnx.Param), flat, source=str(path))
    nnx.update(model, jax.tree.map(jax.device_put, params))  # no XLA program per shape, as jnp.asarray
    return model, NoiseSchedule(**meta["schedule"])


def info(name: str = "ddpm-shapes16", path: str | os.PathLike | None = None) -> dict:
    """The metadata stored with the weights (how long they were trained, final loss, device …)."""
    return io.read(Path(path) if path is not None else weights_path(name))[1]


def train(
    recipe: DDPMRecipe = DDPM_SHAPES16,
    *,
    steps: int | None = None,
    num_images: int | None = None,
    checkpoint: str | os.PathLike | None = None,
    progress: bool = True,
):
    """Run ``recipe`` (optionally shortened) with :func:`sdjax.train.fit`. Returns the FitResult;
    ``result.ema_model`` is the model to sample from."""
    from sdjax.train import fit

    steps = recipe.steps if steps is None else steps
    ds = recipe.data(num_images)
    return fit(
        recipe.model(),
        diffusion_loss(recipe.schedule),
        {"image": ds.images},
        steps=steps,
        batch_size=recipe.batch_size,
        optimizer=recipe.optimizer(steps),
        seed=recipe.seed,
        ema_decay=recipe.ema_decay,
        checkpoint=checkpoint,
        checkpoint_every=500 if checkpoint is not None else None,
        progress=progress,
        desc=recipe.name,
    )


def final_loss(history: dict, last: int = 200) -> float:
    """The mean training loss over the last ``last`` steps: the per-step loss is noisy (t is random)."""
    return float(np.mean(history["loss"][-last:]))
