"""lerp and slerp against float64 NumPy formulas: exact endpoints, shapes, and the norm-keeping
property of slerp that is the reason to use it for Gaussian latents."""

import jax.numpy as jnp
import numpy as np
import pytest

from sdjax.interpolate import lerp, slerp


def _pair(shape=(4, 4, 3), seed=0):
    rng = np.random.default_rng(seed)
    return rng.standard_normal(shape).astype(np.float32), rng.standard_normal(shape).astype(np.float32)


def _lerp64(z0, z1, n):
    t = np.linspace(0.0, 1.0, n).reshape((n,) + (1,) * z0.ndim)
    return (1 - t) * z0.astype(np.float64) + t * z1.astype(np.float64)


def _slerp64(z0, z1, n):
    a, b = z0.astype(np.float64), z1.astype(np.float64)
    omega = np.arccos(np.sum(a * b) / (np.linalg.norm(a) * np.linalg.norm(b)))
    t = np.linspace(0.0, 1.0, n).reshape((n,) + (1,) * z0.ndim)
    return (np.sin((1 - t) * omega) * a + np.sin(t * omega) * b) / np.sin(omega)


@pytest.mark.parametrize("fn, ref", [(lerp, _lerp64), (slerp, _slerp64)], ids=["lerp", "slerp"])
@pytest.mark.parametrize("shape", [(8,), (4, 4, 3)])
def test_matches_float64_formula(fn, ref, shape):
    z0, z1 = _pair(shape)
    got = np.asarray(fn(jnp.asarray(z0), jnp.asarray(z1), 7))
    assert got.shape == (7, *shape)
    np.testing.assert_allclose(got, ref(z0, z1, 7), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("fn", [lerp, slerp])
def test_endpoints_are_exact(fn):
    z0, z1 = _pair(seed=1)
    path = np.asarray(fn(z0, z1, 5))
    np.testing.assert_array_equal(path[0], z0)
    np.testing.assert_array_equal(path[-1], z1)


def test_slerp_keeps_the_norm_of_equal_norm_inputs():
    z0, z1 = _pair((64,), seed=2)
    z1 = z1 * (np.linalg.norm(z0) / np.linalg.norm(z1))
    norms = np.linalg.norm(np.asarray(slerp(z0, z1, 11)).reshape(11, -1), axis=1)
    np.testing.assert_allclose(norms, np.linalg.norm(z0.astype(np.float64)), rtol=1e-5)
    # ... which lerp does not: its midpoint is shorter (cutting through the sphere).
    assert np.linalg.norm(np.asarray(lerp(z0, z1, 11))[5]) < 0.9 * np.linalg.norm(z0)


def test_slerp_of_parallel_vectors_falls_back_to_lerp():
    z0 = np.arange(1.0, 7.0, dtype=np.float32)
    got = np.asarray(slerp(z0, 2 * z0, 5))
    assert np.all(np.isfinite(got))
    np.testing.assert_allclose(got, _lerp64(z0, 2 * z0, 5), rtol=1e-6)


def test_bad_arguments():
    z0, z1 = _pair((3,))
    with pytest.raises(ValueError, match="same shape"):
        lerp(z0, z1[:2], 3)
    with pytest.raises(ValueError, match="n >= 2"):
        slerp(z0, z1, 1)
