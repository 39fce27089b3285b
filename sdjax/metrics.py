"""Measuring generated images: do they look like the data, and are they more than copies of it?

For the single-object ``shapes`` data the question has an exact answer, because the renderer is
deterministic: there are only 4,032 such images (``sdjax.data.catalogue``), and every training image
is one of them. So each sample is compared with its nearest catalogue image:

* **distance**: the RMS pixel distance d to the nearest catalogue image (pixels in [−1, 1]). A real
  image has d = 0. Two *different* catalogue images are typically ``spacing`` ≈ 0.04 apart at 16 px
  (a small diamond and a small cross of one colour differ in a few pixels), so a sample with d below
  half the median spacing is closer to one particular real image than real images are to each other:
  we call it **recognisable**, and the nearest image says what it shows.
* **held-out share**: the recipe of the shipped model (``sdjax.pretrained``) trains without every
  image of 10 % of the (colour, position, background) combinations. Among the recognisable samples,
  the share whose nearest image is one of those is the share of valid images the model *never saw*:
  0 for a model that only reproduces training images, about 10 % for one that has learned the
  factors (colour, place, background) independently, as the data were made.
* **distinct**: how many different catalogue images the recognisable samples hit, against the
  number n uniform draws from the catalogue would hit, K (1 − (1 − 1/K)^n) — a collapsed model
  repeats a few images.

For any image set, :func:`fid` is the Fréchet distance between Gaussians fitted to features of the real and
the generated images (Heusel et al. 2017), with the features of the ``shapes`` probe (:mod:`sdjax.probe`)
in place of Inception's: a domain FID that needs no download and knows what matters in these images.

Shapes: images (N, H, W, C) in [−1, 1].
"""

from __future__ import annotations

import dataclasses

import numpy as np


def nearest_neighbours(queries, references, *, batch_size: int = 256) -> tuple[np.ndarray, np.ndarray]:
    """For each query image its nearest reference image: (RMS distance (Q,), index (Q,)).

    d(q, r) = √(mean((q − r)²)) over all pixels and channels, computed in float64 as
    ‖q‖² + ‖r‖² − 2 q·r, a batch of queries at a time.
    """
    q = np.asarray(queries, np.float64).reshape(len(queries), -1)
    r = np.asarray(references, np.float64).reshape(len(references), -1)
    if q.shape[1] != r.shape[1]:
        raise ValueError(f"queries have {q.shape[1]} values per image, references {r.shape[1]}: compare like with like")
    r_sq = np.sum(r**2, axis=1)
    dist, idx = np.empty(len(q)), np.empty(len(q), np.int64)
    for start in range(0, len(q), batch_size):
        chunk = q[start : start + batch_size]
        sq = np.sum(chunk**2, axis=1)[:, None] + r_sq[None] - 2.0 * chunk @ r.T
        best = np.argmin(sq, axis=1)
        idx[start : start + batch_size] = best
        dist[start : start + batch_size] = np.sqrt(np.maximum(sq[np.arange(len(chunk)), best], 0.0) / q.shape[1])
    return dist, idx


def spacing(references) -> np.ndarray:
    """(R,) the distance from each reference image to its nearest *other* reference image."""
    r = np.asarray(references, np.float64).reshape(len(references), -1)
    sq = np.sum(r**2, axis=1)
    d2 = np.maximum(sq[:, None] + sq[None] - 2.0 * r @ r.T, 0.0) / r.shape[1]
    np.fill_diagonal(d2, np.inf)
    return np.sqrt(d2.min(axis=1))


def expected_distinct(n: int, k: int) -> float:
    """Expected number of distinct items among n uniform draws from k: k (1 − (1 − 1/k)^n)."""
    return k * (1.0 - (1.0 - 1.0 / k) ** n)


@dataclasses.dataclass(frozen=True)
class CatalogueReport:
    """How a set of images relates to the catalogue. See the module docstring for each number."""

    n: int
    median_distance: float
    recognisable: float  # fraction of images with distance < threshold
    held_out_share: float  # among the recognisable ones: fraction whose nearest image is held out
    distinct: int  # distinct catalogue images among the recognisable ones' nearest images
    expected_distinct: float  # the same for as many uniform draws from the catalogue
    threshold: float

    def row(self, name: str) -> str:
        return (
            f"| {name} | {self.n} | {self.median_distance:.4f} | {self.recognisable:.0%} | {self.held_out_share:.1%} "
            f"| {self.distinct} / {self.expected_distinct:.0f} |"
        )

    HEADER = (
        "| images | n | median distance to nearest real image | recognisable | held-out share of recognisable "
        "| distinct / expected |\n|---|---|---|---|---|---|"
    )


def catalogue_report(images, catalogue_images, held_out, *, threshold: float | None = None) -> CatalogueReport:
    """Compare ``images`` (N, H, W, C) with the catalogue (K, H, W, C); ``held_out`` (K,) bool marks
    catalogue images absent from training. ``threshold`` defaults to half the catalogue's median spacing."""
    held_out = np.asarray(held_out, bool)
    if len(held_out) != len(catalogue_images):
        raise ValueError(f"held_out has {len(held_out)} entries, the catalogue {len(catalogue_images)} images")
    if threshold is None:
        threshold = 0.5 * float(np.median(spacing(catalogue_images)))
    dist, idx = nearest_neighbours(images, catalogue_images)
    ok = dist < threshold
    matched = idx[ok]
    return CatalogueReport(
        n=len(dist),
        median_distance=float(np.median(dist)),
        recognisable=float(ok.mean()),
        held_out_share=float(held_out[matched].mean()) if ok.any() else 0.0,
        distinct=len(np.unique(matched)),
        expected_distinct=expected_distinct(int(ok.sum()), len(catalogue_images)),
        threshold=threshold,
    )


def object_iou(images, samples) -> np.ndarray:
    """How exactly each image draws its sample's first object: the intersection over union

        IoU = |P ∩ T| / |P ∪ T|

    of T, the pixels the object covers (coverage ≥ ½ in the renderer), and P, the pixels whose colour is
    nearer the object's colour than the background's colour there. A shape-blind score of the outline:
    1 for a perfect drawing; a disk drawn where a crescent should be gets about 0.5 (notebook 07), a
    missing object 0. Images (N, H, W, 3) in [−1, 1]; samples: N ``ShapesSample`` → (N,) float.
    """
    from sdjax.data import shapes

    images = np.asarray(images, np.float32)
    resolution = images.shape[1]
    scores = np.empty(len(images))
    for i, (image, sample) in enumerate(zip(images, samples, strict=True)):
        obj = sample.objects[0]
        target = shapes.object_coverage(obj, resolution) >= 0.5
        colour = np.asarray(shapes.COLOUR_RGB[obj.colour], np.float32) / 127.5 - 1.0
        background = shapes.background_image(sample.background, resolution)
        drawn = np.sum((image - colour) ** 2, -1) < np.sum((image - background) ** 2, -1)
        scores[i] = np.sum(drawn & target) / max(np.sum(drawn | target), 1)
    return scores


def frechet_distance(mu1, sigma1, mu2, sigma2) -> float:
    """The Fréchet (2-Wasserstein) distance between N(μ₁, Σ₁) and N(μ₂, Σ₂), in float64:

        d² = ‖μ₁ − μ₂‖² + tr Σ₁ + tr Σ₂ − 2 tr (Σ₁^{½} Σ₂ Σ₁^{½})^{½}.

    The last trace equals tr (Σ₁Σ₂)^{½} (the form FID code computes with ``scipy.linalg.sqrtm``), but both
    matrices under the root here are symmetric positive semi-definite, so an eigendecomposition does it with
    no complex parts to discard: Σ₁^{½} = V diag(√λ) Vᵀ, then the eigenvalues of Σ₁^{½} Σ₂ Σ₁^{½}, clipped
    at 0 against rounding. Shapes: mu (D,), sigma (D, D) → float.
    """
    mu1, mu2 = np.asarray(mu1, np.float64), np.asarray(mu2, np.float64)
    sigma1, sigma2 = np.asarray(sigma1, np.float64), np.asarray(sigma2, np.float64)
    values, vectors = np.linalg.eigh(sigma1)
    root1 = (vectors * np.sqrt(np.clip(values, 0.0, None))) @ vectors.T
    inner = root1 @ sigma2 @ root1
    cross = np.sum(np.sqrt(np.clip(np.linalg.eigvalsh((inner + inner.T) / 2), 0.0, None)))
    return float(np.sum((mu1 - mu2) ** 2) + np.trace(sigma1) + np.trace(sigma2) - 2.0 * cross)


def feature_statistics(features) -> tuple[np.ndarray, np.ndarray]:
    """(μ, Σ) of features (N, D), float64, Σ with the N − 1 normalisation (as FID code)."""
    features = np.asarray(features, np.float64)
    if features.ndim != 2 or len(features) < 2:
        raise ValueError(f"features of shape {features.shape}: need (N, D) with N ≥ 2")
    return features.mean(axis=0), np.cov(features, rowvar=False)


def fid(images, reference, probe_model=None, *, batch_size: int = 512) -> float:
    """The domain FID between two image sets (N, H, W, 3) and (M, H, W, 3) in [−1, 1]: the Fréchet distance
    of Gaussians fitted to the ``shapes`` probe's penultimate features (images k× the probe's side are
    box-filtered to it, as :func:`sdjax.probe.read` does). ``probe_model``: default the shipped 16-px probe.

    Lower is closer; two independent sets of real images give the floor (sampling noise, which grows as
    N shrinks: compare FIDs of equal-sized sets only).
    """
    from sdjax import probe

    model = probe_model or probe.load(16)
    stats = [feature_statistics(_probe_features(model, x, batch_size)) for x in (images, reference)]
    return frechet_distance(*stats[0], *stats[1])


def _probe_features(model, images, batch_size: int) -> np.ndarray:
    import jax.numpy as jnp

    from sdjax import probe

    images = probe.to_probe_size(model, images)
    return np.concatenate(
        [np.asarray(model.features(jnp.asarray(images[i : i + batch_size]))) for i in range(0, len(images), batch_size)]
    )
