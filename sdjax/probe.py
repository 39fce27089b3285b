"""An attribute probe for ``shapes`` images: what does a picture show, cell by cell?

Pixel distances (:mod:`sdjax.metrics`) ask whether a sample *is* a real image. The probe asks the
coarser question a person asks — is there a blue square in the bottom-right cell, on a grey
background? — so it can score generated images that are not pixel-perfect, and check a
text-to-image model against its prompt (notebook 04).

The probe is a small convolutional classifier trained on rendered ``shapes`` images, whose
attributes are known exactly. For each of the 9 grid cells it predicts

    what   (8 classes: empty, or one of the 7 shapes),
    colour (8), size (2)      — meaningful where the cell holds an object,

and for the whole image the background (4). Loss: the sum of the cross-entropies, the colour and
size terms counted only on occupied cells. Training images get Gaussian pixel noise of a random
standard deviation in [0, ``noise``] so that the probe also reads slightly imperfect images, as
samples are.

Reading an image: a cell is occupied when P(empty) < ½, and the probe's *reading* is the
:class:`~sdjax.data.ShapesSample` of the occupied cells' most likely attributes and the most likely
background. A reading is **confident** when every one of those decisions has probability ≥
``confidence`` (0.9 by default): a sample the probe reads confidently shows a definite scene.

Trained probes ship with sdjax (``load(resolution)``; ``sdjax/weights/probe-shapes{R}.safetensors``,
float16), made by :func:`train_probe` with its defaults (``python -m sdjax.probe R`` repeats it).

Shapes: images (N, H, W, 3) in [−1, 1]; H = W = the probe's resolution.
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

from sdjax import data, io
from sdjax.nn import conv
from sdjax.train import fit

Array = jax.Array

CELLS = len(data.POSITIONS)  # 9, in data.POSITIONS order (reading order)
WHAT = ("empty", *data.SHAPES)  # the classes of a cell's "what" head


@dataclasses.dataclass(frozen=True)
class ProbeConfig:
    """The probe's size. ``channels``: conv widths, each level after the first halves H and W."""

    resolution: int = 16
    channels: tuple[int, ...] = (32, 64, 64)
    hidden: int = 256


class ShapesProbe(nnx.Module):
    """conv → SiLU, level by level (stride 2 after the first) → flatten → dense → the four heads.

    __call__: images (N, H, W, 3) → dict of logits: "what" (N, 9, 8), "colour" (N, 9, 8),
    "size" (N, 9, 2), "background" (N, 4).
    """

    def __init__(self, config: ProbeConfig, *, rngs: nnx.Rngs):
        self.config = config
        widths = (3, *config.channels)
        self.convs = nnx.List(
            [
                conv(c_in, c_out, 3, rngs, stride=1 if i == 0 else 2)
                for i, (c_in, c_out) in enumerate(zip(widths, widths[1:]))
            ]
        )
        side = config.resolution
        for _ in config.channels[1:]:
            side = (side + 1) // 2
        self.hidden = nnx.Linear(side * side * config.channels[-1], config.hidden, rngs=rngs)
        self.heads = nnx.Linear(
            config.hidden, CELLS * (len(WHAT) + len(data.COLOURS) + len(data.SIZES)) + len(data.BACKGROUNDS), rngs=rngs
        )

    def features(self, x: Array) -> Array:
        """The penultimate layer, what the heads read: images (N, H, W, 3) → (N, hidden). The features of
        the domain FID (:func:`sdjax.metrics.fid`), as Inception's pool layer is FID's."""
        for layer in self.convs:
            x = nnx.silu(layer(x))
        return nnx.silu(self.hidden(x.reshape(x.shape[0], -1)))

    def __call__(self, x: Array) -> dict[str, Array]:
        x = self.features(x)
        out = self.heads(x)
        n = x.shape[0]
        sizes = [CELLS * len(WHAT), CELLS * len(data.COLOURS), CELLS * len(data.SIZES)]
        what, colour, size, background = jnp.split(out, np.cumsum(sizes), axis=-1)
        return {
            "what": what.reshape(n, CELLS, len(WHAT)),
            "colour": colour.reshape(n, CELLS, len(data.COLOURS)),
            "size": size.reshape(n, CELLS, len(data.SIZES)),
            "background": background,
        }


def cell_targets(ds: data.ImageDataset) -> dict[str, np.ndarray]:
    """A shapes dataset's labels per cell: "what" (N, 9) (0 = empty, 1 + shape index), "colour" and
    "size" (N, 9) (−1 where empty), "background" (N,)."""
    n = len(ds)
    what = np.zeros((n, CELLS), np.int32)
    colour, size = np.full((n, CELLS), -1, np.int32), np.full((n, CELLS), -1, np.int32)
    rows = np.arange(n)
    slots = sorted({int(k.rsplit("_", 1)[1]) for k in ds.labels if k.startswith("position_")})
    for k in slots:
        pos = ds.labels[f"position_{k}"]
        has = pos >= 0
        what[rows[has], pos[has]] = ds.labels[f"shape_{k}"][has] + 1
        colour[rows[has], pos[has]] = ds.labels[f"colour_{k}"][has]
        size[rows[has], pos[has]] = ds.labels[f"size_{k}"][has]
    return {"what": what, "colour": colour, "size": size, "background": ds.labels["background"].astype(np.int32)}


def probe_loss(noise: float):
    """The training loss in :func:`sdjax.train.fit`'s form; pixel noise of std ∼ U[0, noise] per image."""

    def loss_fn(model, batch, key):
        x = batch["image"]
        k_std, k_noise = jax.random.split(key)
        std = jax.random.uniform(k_std, (x.shape[0], 1, 1, 1), maxval=noise)
        logits = model(x + std * jax.random.normal(k_noise, x.shape))

        def xent(name, mask=None):
            labels = batch[name]
            ce = optax.softmax_cross_entropy_with_integer_labels(logits[name], jnp.maximum(labels, 0))
            if mask is None:
                return jnp.mean(ce)
            return jnp.sum(ce * mask) / jnp.maximum(jnp.sum(mask), 1.0)

        occupied = (batch["what"] > 0).astype(jnp.float32)
        losses = {
            "what": xent("what"),
            "colour": xent("colour", occupied),
            "size": xent("size", occupied),
            "background": xent("background"),
        }
        return sum(losses.values()), losses

    return loss_fn


def train_probe(
    resolution: int = 16,
    *,
    max_objects: int = 2,
    num_images: int = 50_000,
    steps: int = 6_000,
    batch_size: int = 128,
    noise: float = 0.05,
    seed: int = 0,
    config: ProbeConfig | None = None,
    progress: bool = True,
) -> ShapesProbe:
    """Train a probe on ``num_images`` freshly rendered shapes images (1 … ``max_objects`` objects each,
    seed ``seed`` + 1000 so that the images differ from the generative models' training sets)."""
    config = config or ProbeConfig(resolution=resolution)
    ds = data.make_shapes(num_images, resolution=resolution, seed=seed + 1000, max_objects=max_objects)
    model = ShapesProbe(config, rngs=nnx.Rngs(seed))
    schedule = optax.warmup_cosine_decay_schedule(0.0, 2e-3, min(200, steps // 10), steps)
    fit(
        model,
        probe_loss(noise),
        {"image": ds.images, **cell_targets(ds)},
        steps=steps,
        batch_size=batch_size,
        optimizer=optax.adamw(schedule, weight_decay=1e-4),
        seed=seed,
        progress=progress,
        desc="probe",
    )
    return model


def weights_path(resolution: int) -> Path:
    """Where the shipped probe for ``resolution``-pixel images lives inside the package."""
    return Path(__file__).parent / "weights" / f"probe-shapes{resolution}.safetensors"


def save(path: str | os.PathLike, model: ShapesProbe, info: dict | None = None) -> None:
    """Write the probe's parameters in float16, with its config and ``info`` as metadata."""
    params = jax.tree.map(lambda p: p.astype(jnp.float16), nnx.state(model, nnx.Param))
    io.save_tree(path, params, {"probe": dataclasses.asdict(model.config)} | (info or {}))


def load(resolution: int = 16, path: str | os.PathLike | None = None) -> ShapesProbe:
    """The shipped probe for ``resolution``-pixel images, or the one saved at ``path``."""
    path = Path(path) if path is not None else weights_path(resolution)
    if not path.is_file():
        shipped = sorted(p.stem.removeprefix("probe-shapes") for p in weights_path(resolution).parent.glob("probe-*"))
        raise FileNotFoundError(
            f"no probe weights at {path} (shipped resolutions: {', '.join(shipped) or 'none'}); train one with "
            f"sdjax.probe.train_probe({resolution}) or `python -m sdjax.probe {resolution}`"
        )
    flat, meta = io.read(path)
    if "probe" not in meta:
        raise ValueError(f"{path} holds no probe config: it was not written by sdjax.probe.save")
    config = ProbeConfig(**{k: tuple(v) if isinstance(v, list) else v for k, v in meta["probe"].items()})
    model = nnx.eval_shape(lambda: ShapesProbe(config, rngs=nnx.Rngs(0)))  # shapes only, filled below
    params = io.unflatten_like(nnx.state(model, nnx.Param), flat, source=str(path))  # (back to float32)
    nnx.update(model, jax.tree.map(jax.device_put, params))
    return model


@nnx.jit
def _probabilities(model: ShapesProbe, images: Array) -> dict[str, Array]:
    return {name: jax.nn.softmax(logits, axis=-1) for name, logits in model(images).items()}


@dataclasses.dataclass
class Reading:
    """What the probe sees in N images.

    probs: the four heads' probabilities, as :class:`ShapesProbe` returns logits.
    occupied: (N, 9) bool, P(empty) < ½. what, colour, size: (N, 9) int, the most likely object
    attributes of each cell (what: 1 + shape index; meaningful where occupied). background: (N,) int.
    confident: (N,) bool — every decision (each cell empty or not, each occupied cell's shape, colour
    and size, the background) has probability ≥ the threshold.
    """

    probs: dict[str, np.ndarray]
    occupied: np.ndarray
    what: np.ndarray
    colour: np.ndarray
    size: np.ndarray
    background: np.ndarray
    confident: np.ndarray

    def sample(self, i: int) -> data.ShapesSample | None:
        """Image i's reading as attributes (None when the probe sees no object)."""
        objects = tuple(
            data.ShapeObject(
                data.SHAPES[self.what[i, c] - 1],
                data.COLOURS[self.colour[i, c]],
                data.SIZES[self.size[i, c]],
                data.POSITIONS[c],
            )
            for c in np.flatnonzero(self.occupied[i])
        )
        return data.ShapesSample(objects, data.BACKGROUNDS[self.background[i]]) if objects else None

    def subset(self, index) -> Reading:
        """The reading of the images ``index`` picks (an index array, a list or a boolean mask)."""
        index = np.asarray(index)
        return Reading({k: v[index] for k, v in self.probs.items()},
                       *(getattr(self, f.name)[index] for f in dataclasses.fields(self)[1:]))  # fmt: skip

    def caption(self, i: int) -> str:
        reading = self.sample(i)
        return data.caption(reading) if reading else f"nothing on a {data.BACKGROUNDS[self.background[i]]} background"


def to_probe_size(model: ShapesProbe, images) -> np.ndarray:
    """Images (N, k·r, k·r, 3) → (N, r, r, 3) float32, r the probe's resolution: k×k blocks averaged (a box
    filter). ValueError for images that are not square multiples of r."""
    images = np.asarray(images, np.float32)
    r = model.config.resolution
    if images.ndim != 4 or images.shape[-1] != 3 or images.shape[1] != images.shape[2] or images.shape[1] % r:
        raise ValueError(
            f"the probe reads square (k·{r}, k·{r}, 3) images for an integer k, got an array of shape {images.shape}"
        )
    k = images.shape[1] // r
    return images.reshape(len(images), r, k, r, k, 3).mean(axis=(2, 4))


def read(model: ShapesProbe, images, *, confidence: float = 0.9, batch_size: int = 512) -> Reading:
    """Run the probe on images (N, H, W, 3) in [−1, 1] and decide what each shows (:class:`Reading`).

    Images k times the probe's resolution (H = W = k·r) are first averaged over k×k blocks down to r×r
    (a box filter). Rendering at r and box-filtering a k·r rendering differ at the shapes' edges, so
    measure the probe on real k·r images before trusting it there (tests/test_probe.py does for 64 px).
    """
    images = to_probe_size(model, images)
    chunks = [_probabilities(model, jnp.asarray(images[i : i + batch_size])) for i in range(0, len(images), batch_size)]
    probs = {k: np.concatenate([np.asarray(c[k]) for c in chunks]) for k in chunks[0]}
    p_empty = probs["what"][..., 0]
    occupied = p_empty < 0.5
    what = 1 + np.argmax(probs["what"][..., 1:], axis=-1)
    colour, size = np.argmax(probs["colour"], axis=-1), np.argmax(probs["size"], axis=-1)
    background = np.argmax(probs["background"], axis=-1)

    def top(p):
        return np.max(p, axis=-1)

    sure_cell = np.where(
        occupied,
        (top(probs["what"]) >= confidence) & (top(probs["colour"]) >= confidence) & (top(probs["size"]) >= confidence),
        p_empty >= confidence,
    )
    confident = sure_cell.all(axis=1) & (top(probs["background"]) >= confidence)
    return Reading(probs, occupied, what, colour, size, background, confident)


@dataclasses.dataclass(frozen=True)
class PromptScore:
    """How often generated images show what their prompts asked for (each a fraction in [0, 1]).

    background: the background is the prompted one. For each prompted object, over all objects:
    present (its cell is occupied), shape, colour, size (each given present: the probe's reading
    of that cell). exact_count: exactly the prompted cells are occupied. all: the probe's whole
    reading equals the prompt.
    """

    n: int
    background: float
    present: float
    shape: float
    colour: float
    size: float
    exact_count: float
    all: float

    HEADER = (
        "| images | n | background | object present | shape | colour | size | no extra objects | everything |\n"
        "|---|---|---|---|---|---|---|---|---|"
    )

    def row(self, name: str) -> str:
        values = (self.background, self.present, self.shape, self.colour, self.size, self.exact_count, self.all)
        return f"| {name} | {self.n} | " + " | ".join(f"{v:.0%}" for v in values) + " |"


def score_prompts(reading: Reading, prompts: list[data.ShapesSample]) -> PromptScore:
    """Compare the probe's reading of N images with the N scenes they were meant to show."""
    if len(prompts) != len(reading.background):
        raise ValueError(f"{len(prompts)} prompts for {len(reading.background)} images")
    present, shape, colour, size, exact, everything = [], [], [], [], [], []
    for i, want in enumerate(prompts):
        cells = {data.POSITIONS.index(o.position): o for o in want.objects}
        for c, obj in cells.items():
            here = bool(reading.occupied[i, c])
            present.append(here)
            if here:
                shape.append(data.SHAPES[reading.what[i, c] - 1] == obj.shape)
                colour.append(data.COLOURS[reading.colour[i, c]] == obj.colour)
                size.append(data.SIZES[reading.size[i, c]] == obj.size)
        exact.append(set(np.flatnonzero(reading.occupied[i]).tolist()) == set(cells))
        seen = reading.sample(i)
        everything.append(
            seen is not None and set(seen.objects) == set(want.objects) and seen.background == want.background
        )
    background = [data.BACKGROUNDS[b] == p.background for b, p in zip(reading.background, prompts, strict=True)]

    def share(values):
        return float(np.mean(values)) if values else 0.0

    return PromptScore(
        len(prompts),
        share(background),
        share(present),
        share(shape),
        share(colour),
        share(size),
        share(exact),
        share(everything),
    )


if __name__ == "__main__":  # python -m sdjax.probe 16: retrain and save the shipped probe for 16-pixel images
    import sys
    import time

    resolution = int(sys.argv[1]) if len(sys.argv) > 1 else 16
    start = time.time()
    probe = train_probe(resolution)
    test = data.make_shapes(2000, resolution=resolution, seed=7777, max_objects=2)
    score = score_prompts(read(probe, test.images), test.attributes)
    print(PromptScore.HEADER + "\n" + score.row("fresh real images"))
    save(
        weights_path(resolution), probe, {"minutes": round((time.time() - start) / 60, 1), "test_everything": score.all}
    )
    print(f"saved {weights_path(resolution)}")
