"""A digit reader for 16-px ``digits`` images: is a generated picture a digit, and which?

Notebook 03's pixel DDPM draws handwritten digits. To count how many of its samples are real digits
rather than smudges, a small convolutional classifier reads each one. A plain 10-way classifier
would not do: softmax must pick *some* digit, and it can be sure of a blob. So the reader has an
eleventh class, **not a digit**, trained on made-up failures of the kinds a generator produces —
two digits overlaid, a digit with half of it missing, a digit blurred away, smooth random blobs,
an almost empty frame.

A sample is **valid** when the reader's most likely class is a digit with probability ≥
``confidence`` (0.9 by default). Real digits the reader never saw pass at the rate
:func:`evaluate` reports (the yardstick for the samples); its ``sdjax.data.load_digits`` split is the
training split of ``sdjax.pretrained.DDPM_DIGITS16``, so the DDPM's held-out digits are the reader's too.

Architecture (as :class:`sdjax.probe.ShapesProbe`, one channel in, one head out): conv 3×3 → SiLU,
level by level with stride 2 after the first, then dense → SiLU → 11 logits. Training images get a
random shift of up to one pixel and Gaussian noise of standard deviation ∼ U[0, ``noise``].

Shapes: images (N, 16, 16, 1) in [−1, 1], white ink on black.
"""

from __future__ import annotations

import os
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from sdjax import io
from sdjax.nn import conv
from sdjax.train import fit

Array = jax.Array
CLASSES = (*(str(d) for d in range(10)), "not a digit")
NOT_A_DIGIT = 10
RESOLUTION = 16


class DigitReader(nnx.Module):
    """images (N, 16, 16, 1) → logits (N, 11): the ten digits, then "not a digit"."""

    def __init__(self, channels: tuple[int, ...] = (32, 64, 64), hidden: int = 256, *, rngs: nnx.Rngs):
        widths = (1, *channels)
        self.convs = nnx.List(
            [conv(a, b, 3, rngs, stride=1 if i == 0 else 2) for i, (a, b) in enumerate(zip(widths, widths[1:]))]
        )
        side = RESOLUTION // 2 ** (len(channels) - 1)
        self.hidden = nnx.Linear(side * side * channels[-1], hidden, rngs=rngs)
        self.head = nnx.Linear(hidden, len(CLASSES), rngs=rngs)

    def __call__(self, x: Array) -> Array:
        for layer in self.convs:
            x = nnx.silu(layer(x))
        return self.head(nnx.silu(self.hidden(x.reshape(x.shape[0], -1))))


def make_failures(digits: np.ndarray, n: int, seed: int = 0) -> np.ndarray:
    """``n`` images that are not digits, made from ``digits`` (N, 16, 16, 1) in [−1, 1]; five kinds in turn:
    two different digits overlaid (the pixelwise maximum), a digit with a random half set to black, a digit
    blurred (box 5×5, twice) and dimmed, smooth random blobs (4×4 noise upsampled), a near-empty frame."""
    rng = np.random.default_rng(seed)
    pick = lambda: digits[rng.integers(len(digits))]  # noqa: E731
    out = np.empty((n, *digits.shape[1:]), np.float32)
    for i in range(n):
        kind = i % 5
        if kind == 0:
            a, b = rng.choice(len(digits), 2, replace=False)
            x = np.maximum(digits[a], digits[b])
        elif kind == 1:
            x = pick().copy()
            axis, side = rng.integers(2), rng.integers(2)
            sl = [slice(None)] * 2
            sl[axis] = slice(0, 8) if side else slice(8, 16)
            x[tuple(sl)] = -1.0
        elif kind == 2:
            x = pick()[..., 0]
            for _ in range(2):
                p = np.pad(x, 2, mode="edge")
                x = sum(p[a : a + 16, b : b + 16] for a in range(5) for b in range(5)) / 25
            x = (x * rng.uniform(0.3, 0.8) + rng.uniform(-0.6, -0.2))[..., None]
        elif kind == 3:
            blobs = rng.uniform(-1, 1, (4, 4)).repeat(4, 0).repeat(4, 1)
            x = np.where(blobs > rng.uniform(0.0, 0.6), 1.0, -1.0)[..., None]
        else:
            x = -np.ones(digits.shape[1:]) + rng.uniform(0, 0.3) * rng.random(digits.shape[1:])
        out[i] = np.clip(x, -1, 1)
    return out


def reader_loss(noise: float):
    """Cross-entropy in :func:`sdjax.train.fit`'s form, on images shifted by up to a pixel and noised."""

    def loss_fn(model, batch, key):
        x, labels = batch["image"], batch["label"]
        k_shift, k_std, k_noise = jax.random.split(key, 3)
        shift = jax.random.randint(k_shift, (x.shape[0], 2), 0, 3)
        padded = jnp.pad(x, ((0, 0), (1, 1), (1, 1), (0, 0)), constant_values=-1.0)
        x = jax.vmap(lambda im, s: jax.lax.dynamic_slice(im, (s[0], s[1], 0), x.shape[1:]))(padded, shift)
        std = jax.random.uniform(k_std, (x.shape[0], 1, 1, 1), maxval=noise)
        logits = model(x + std * jax.random.normal(k_noise, x.shape))
        loss = optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()
        return loss, {"accuracy": jnp.mean(logits.argmax(-1) == labels)}

    return loss_fn


def training_set(digits, seed: int = 0) -> dict[str, np.ndarray]:
    """The real digits (labels 0–9) and as many made-up failures (label 10), as ``fit`` wants them."""
    failures = make_failures(digits.images, len(digits.images), seed)
    return {
        "image": np.concatenate([digits.images, failures]),
        "label": np.concatenate([digits.labels["digit"], np.full(len(failures), NOT_A_DIGIT)]).astype(np.int32),
    }


def train_reader(steps: int = 3000, *, batch_size: int = 128, noise: float = 0.1, seed: int = 0, progress=True):
    """Train a reader on the training split of ``sdjax.pretrained.DDPM_DIGITS16`` (its held-out digits stay unseen)."""
    from sdjax.pretrained import DDPM_DIGITS16

    model = DigitReader(rngs=nnx.Rngs(seed))
    schedule = optax.warmup_cosine_decay_schedule(0.0, 2e-3, min(200, steps // 10), steps)
    fit(
        model,
        reader_loss(noise),
        training_set(DDPM_DIGITS16.data(), seed),
        steps=steps,
        batch_size=batch_size,
        optimizer=optax.adamw(schedule, weight_decay=1e-4),
        seed=seed,
        progress=progress,
        desc="digit reader",
    )
    return model


def weights_path() -> Path:
    return Path(__file__).parent / "weights" / "reader-digits16.safetensors"


def save(path: str | os.PathLike, model: DigitReader, info: dict | None = None) -> None:
    """Write the reader's parameters in float16, with ``info`` (accuracy, date …) as metadata."""
    params = jax.tree.map(lambda p: p.astype(jnp.float16), nnx.state(model, nnx.Param))
    io.save_tree(path, params, {"reader": "digits16"} | (info or {}))


def load(path: str | os.PathLike | None = None) -> DigitReader:
    """The shipped reader, or the one saved at ``path``."""
    path = Path(path) if path is not None else weights_path()
    if not path.is_file():
        raise FileNotFoundError(f"no digit reader at {path}; train one with `python -m sdjax.digit_reader`")
    flat, meta = io.read(path)
    if meta.get("reader") != "digits16":
        raise ValueError(
            f"{path} is not a digit reader (metadata {sorted(meta)}): it was not written by sdjax.digit_reader.save"
        )
    model = nnx.eval_shape(lambda: DigitReader(rngs=nnx.Rngs(0)))  # shapes only, filled below
    params = io.unflatten_like(nnx.state(model, nnx.Param), flat, source=str(path))
    nnx.update(model, jax.tree.map(jax.device_put, params))
    return model


@nnx.jit
def _probabilities(model: DigitReader, images: Array) -> Array:
    return jax.nn.softmax(model(images), axis=-1)


def read(model: DigitReader, images, *, confidence: float = 0.9, batch_size: int = 512) -> dict[str, np.ndarray]:
    """Read (N, 16, 16, 1) images. Returns "label" (N,) (0–9, or 10 = not a digit), "p" (N,) its probability,
    "valid" (N,) bool (a digit with p ≥ ``confidence``), "probs" (N, 11)."""
    images = np.asarray(images, np.float32)
    if images.ndim != 4 or images.shape[1:] != (RESOLUTION, RESOLUTION, 1):
        raise ValueError(f"the digit reader reads (N, 16, 16, 1) images in [-1, 1]; got shape {images.shape}")
    images = np.clip(images, -1.0, 1.0)
    probs = np.concatenate(
        [np.asarray(_probabilities(model, images[i : i + batch_size])) for i in range(0, len(images), batch_size)]
    )
    label, p = probs.argmax(-1), probs.max(-1)
    return {"label": label, "p": p, "valid": (label != NOT_A_DIGIT) & (p >= confidence), "probs": probs}


def evaluate(model: DigitReader, seed: int = 1) -> dict[str, float]:
    """On the DDPM's held-out digits (never seen by the reader) and on fresh made-up failures: accuracy, the
    share read valid, and the share of failures wrongly read as valid digits."""
    from sdjax.pretrained import DDPM_DIGITS16

    held = DDPM_DIGITS16.held_out_data()
    real = read(model, held.images)
    fake = read(model, make_failures(held.images, 1000, seed))
    return {
        "accuracy": float(np.mean(real["label"] == held.labels["digit"])),
        "valid": float(np.mean(real["valid"])),
        "failures_read_valid": float(np.mean(fake["valid"])),
    }


if __name__ == "__main__":  # python -m sdjax.digit_reader: retrain the shipped reader
    import datetime

    reader = train_reader()
    scores = evaluate(reader)
    print({k: round(v, 4) for k, v in scores.items()})
    save(
        weights_path(),
        reader,
        {k: round(v, 4) for k, v in scores.items()} | {"date": datetime.date.today().isoformat()},
    )
    print(f"wrote {weights_path()}")
