"""The domain FID (sdjax.metrics.fid): the Fréchet distance against SciPy's matrix square root in float64,
a set against itself, and the probe features it reads."""

import numpy as np
import pytest
import scipy.linalg

from sdjax import metrics, probe
from sdjax.data import make_shapes


def scipy_frechet(mu1, s1, mu2, s2) -> float:
    """The formula as FID code writes it: ‖μ₁ − μ₂‖² + tr(Σ₁ + Σ₂ − 2 sqrtm(Σ₁Σ₂)), real part."""
    root = scipy.linalg.sqrtm(s1 @ s2).real
    return float(np.sum((mu1 - mu2) ** 2) + np.trace(s1 + s2 - 2.0 * root))


@pytest.mark.parametrize("d, n", [(4, 50), (32, 200), (256, 1000)])
def test_frechet_distance_against_scipy(d, n):
    rng = np.random.default_rng(d)
    a = rng.standard_normal((n, d)) @ rng.standard_normal((d, d))
    b = 0.5 + rng.standard_normal((n, d)) @ rng.standard_normal((d, d)) * 0.8
    stats_a, stats_b = metrics.feature_statistics(a), metrics.feature_statistics(b)
    ours = metrics.frechet_distance(*stats_a, *stats_b)
    want = scipy_frechet(*stats_a, *stats_b)
    assert abs(ours - want) <= 1e-6 * abs(want), (ours, want)
    assert abs(metrics.frechet_distance(*stats_a, *stats_a)) <= 1e-8 * np.trace(stats_a[1])


def test_closed_form_for_diagonal_gaussians():
    """Diagonal Σ's: d² = ‖μ₁ − μ₂‖² + Σ_i (√s1_i − √s2_i)²."""
    mu1, mu2 = np.array([0.0, 1.0, 2.0]), np.array([1.0, 1.0, 0.0])
    s1, s2 = np.array([1.0, 4.0, 9.0]), np.array([4.0, 1.0, 1.0])
    want = 1.0 + 0.0 + 4.0 + (1 - 2) ** 2 + (2 - 1) ** 2 + (3 - 1) ** 2
    assert metrics.frechet_distance(mu1, np.diag(s1), mu2, np.diag(s2)) == pytest.approx(want, rel=1e-12)


def test_fid_on_images():
    """Real vs real is small; real vs the same images noised or shuffled pixels is large; one set vs
    itself is 0; the probe's features are what its heads read."""
    reader = probe.load(16)
    a = np.asarray(make_shapes(600, resolution=16, seed=1).images)
    b = np.asarray(make_shapes(600, resolution=16, seed=2).images)
    noisy = np.clip(a + 0.5 * np.random.default_rng(0).standard_normal(a.shape), -1, 1)
    assert metrics.fid(a, a, reader) == pytest.approx(0.0, abs=1e-6)
    floor, damaged = metrics.fid(a, b, reader), metrics.fid(noisy, b, reader)
    print(f"FID real vs real {floor:.3f}, noised vs real {damaged:.3f}")
    assert damaged > 5 * floor
    big = np.asarray(make_shapes(8, resolution=64, seed=3).images)  # 64 px: box-filtered to the probe's 16
    features = metrics._probe_features(reader, big, 512)
    assert features.shape == (8, reader.config.hidden)
    with pytest.raises(ValueError, match="square"):
        metrics.fid(big[:, :60], big, reader)
