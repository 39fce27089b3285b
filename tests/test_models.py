"""The autoencoder and the VAE: shapes, the KL and reparameterisation maths, parity of the VAE with
diffusers' ``AutoencoderKL``, and that both models learn on ``shapes``."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from sdjax.data import make_shapes
from sdjax.models import Autoencoder, AutoencoderConfig, AutoencoderKL, VAEConfig, autoencoder_loss, vae_loss
from sdjax.models.vae import DiagonalGaussian, kl_divergence, reparameterize, tiled
from sdjax.train import fit
from tests.helpers import load_torch_state, nchw, nhwc, rel_err
from tests.helpers import reference_vae as diffusers_vae

TINY = dict(block_out_channels=(16, 32, 32), layers_per_block=1, latent_channels=4, norm_num_groups=8)


def test_autoencoder_shapes_and_compression():
    cfg = AutoencoderConfig(**TINY)
    model = Autoencoder(cfg, rngs=nnx.Rngs(0))
    x = jnp.zeros((2, 32, 32, 3))
    assert cfg.downsample_factor == 4
    # traced, not run: the shapes are the claim
    assert nnx.eval_shape(lambda m: m.encode(x), model).shape == (2, 8, 8, 4) == (2, *cfg.latent_shape(32, 32))
    assert nnx.eval_shape(lambda m: m(x), model).shape == x.shape


def test_vae_shapes_single_channel():
    cfg = VAEConfig(**TINY, in_channels=1, out_channels=1)
    model = AutoencoderKL(cfg, rngs=nnx.Rngs(0))
    x = jnp.zeros((3, 16, 16, 1))
    post = nnx.eval_shape(lambda m: m.encode(x), model)
    assert post.mean.shape == post.logvar.shape == (3, 4, 4, 4)
    x_hat, _ = nnx.eval_shape(lambda m: m(x, jax.random.PRNGKey(0)), model)
    assert x_hat.shape == x.shape


def test_config_errors_name_the_fix():
    with pytest.raises(ValueError, match="norm_num_groups=8 must divide"):
        AutoencoderConfig(block_out_channels=(12, 32), norm_num_groups=8)
    with pytest.raises(ValueError, match="not divisible by the downsampling factor f=4"):
        AutoencoderConfig(**TINY).latent_shape(30, 32)


def test_sd_config_is_stable_diffusions():
    cfg = VAEConfig.sd()
    assert cfg.downsample_factor == 8 and cfg.latent_shape(512, 512) == (64, 64, 4)
    assert cfg.scaling_factor == 0.18215


def test_kl_matches_float64_numpy():
    rng = np.random.default_rng(0)
    mean = rng.normal(size=(5, 4, 4, 3)) * 2
    logvar = rng.normal(size=(5, 4, 4, 3)) * 3
    want = 0.5 * np.sum(mean**2 + np.exp(logvar) - 1.0 - logvar, axis=(1, 2, 3))
    got = kl_divergence(jnp.asarray(mean, jnp.float32), jnp.asarray(logvar, jnp.float32))
    np.testing.assert_allclose(got, want, rtol=1e-5)
    # and it is zero for the prior itself
    np.testing.assert_allclose(kl_divergence(jnp.zeros((2, 3)), jnp.zeros((2, 3))), 0.0, atol=1e-7)


def test_kl_matches_closed_form_between_gaussians_by_monte_carlo():
    """E_q[log q(z) − log p(z)] estimated from samples agrees with the closed form."""
    mean, logvar = jnp.array([[0.7, -1.2]]), jnp.array([[-0.5, 0.8]])
    z = reparameterize(mean, logvar, jax.random.normal(jax.random.PRNGKey(0), (200_000, 2)))
    var = jnp.exp(logvar)
    log_q = -0.5 * (jnp.log(2 * jnp.pi * var) + (z - mean) ** 2 / var)
    log_p = -0.5 * (jnp.log(2 * jnp.pi) + z**2)
    mc = jnp.mean(jnp.sum(log_q - log_p, axis=1))
    np.testing.assert_allclose(mc, kl_divergence(mean, logvar)[0], rtol=2e-2)


def test_reparameterisation_gradient_flows():
    mean, logvar = jnp.array([0.3, -1.0]), jnp.array([0.2, -0.4])
    eps = jnp.array([1.5, -0.5])
    dmu, dlv = jax.grad(lambda m, lv: jnp.sum(reparameterize(m, lv, eps)), argnums=(0, 1))(mean, logvar)
    np.testing.assert_allclose(dmu, [1.0, 1.0])
    np.testing.assert_allclose(dlv, 0.5 * jnp.exp(0.5 * logvar) * eps, rtol=1e-6)  # ∂z/∂logvar = ½ σ ε


def test_vae_loss_gradient_reaches_the_encoder():
    model = AutoencoderKL(VAEConfig(**TINY), rngs=nnx.Rngs(0))
    x = jax.random.uniform(jax.random.PRNGKey(1), (2, 16, 16, 3), minval=-1, maxval=1)
    graphdef, params = nnx.split(model, nnx.Param)
    loss = lambda p: vae_loss(nnx.merge(graphdef, p), {"image": x}, jax.random.PRNGKey(2))[0]  # noqa: E731
    grads = jax.jit(jax.grad(loss))(params)  # one compiled program (eager would compile op by op)
    assert float(jnp.abs(grads["encoder"]["conv_in"]["kernel"][...]).max()) > 0
    assert float(jnp.abs(grads["quant_conv"]["kernel"][...]).max()) > 0


def test_logvar_is_clipped():
    post = DiagonalGaussian.from_moments(jnp.array([[0.0, 0.0, -100.0, 100.0]]))
    np.testing.assert_array_equal(post.logvar, [[-30.0, 20.0]])


def reference_vae():
    """(diffusers' AutoencoderKL in the TINY config, random; sdjax's with the same weights). Its
    sample_size of 32 pixels is also the tile size of its ``enable_tiling()`` (8 latents, f = 4)."""
    torch = pytest.importorskip("torch")
    pytest.importorskip("diffusers")
    torch.manual_seed(0)
    ref = diffusers_vae(**TINY, in_channels=3, out_channels=3, sample_size=32)
    ours = AutoencoderKL(VAEConfig(**TINY), rngs=nnx.Rngs(0))
    load_torch_state(ours, ref.state_dict())
    return ref, ours


def test_vae_matches_diffusers_autoencoder_kl():
    """Same weights, same input: sdjax's AutoencoderKL equals diffusers' (encode moments and decode)."""
    import torch

    ref, ours = reference_vae()
    x = np.asarray(jax.random.uniform(jax.random.PRNGKey(0), (2, 32, 32, 3), minval=-1, maxval=1))
    z = np.asarray(jax.random.normal(jax.random.PRNGKey(1), (2, 8, 8, 4)))
    with torch.no_grad():
        dist = ref.encode(torch.from_numpy(nchw(x))).latent_dist
        dec = ref.decode(torch.from_numpy(nchw(z))).sample.numpy()
    post = ours.encode(jnp.asarray(x))
    assert rel_err(post.mean, nhwc(dist.mean.numpy())) < 1e-5
    assert rel_err(post.logvar, nhwc(dist.logvar.numpy())) < 1e-5
    assert rel_err(ours.decode(jnp.asarray(z)), nhwc(dec)) < 1e-5


def test_tiled_vae_matches_diffusers_tiling():
    """diffusers' ``enable_tiling()`` (tiles of ``sample_size`` pixels, a quarter overlapping) on an image
    and latents that are not multiples of the tile, with windows cut short by both borders: sdjax's
    tiled encode and decode give the same numbers. Tiling changes the result (each window has its own
    GroupNorm statistics), so the untiled outputs are checked to differ: a tiling that did nothing fails."""
    import torch

    ref, ours = reference_vae()
    ref.enable_tiling()
    x = np.asarray(jax.random.uniform(jax.random.PRNGKey(0), (1, 56, 80, 3), minval=-1, maxval=1))
    z = np.asarray(jax.random.normal(jax.random.PRNGKey(1), (1, 14, 20, 4)))
    with torch.no_grad():
        dist = ref.encode(torch.from_numpy(nchw(x))).latent_dist
        dec = nhwc(ref.decode(torch.from_numpy(nchw(z))).sample.numpy())
        ref.disable_tiling()
        untiled_mean = nhwc(ref.encode(torch.from_numpy(nchw(x))).latent_dist.mean.numpy())
        untiled_dec = nhwc(ref.decode(torch.from_numpy(nchw(z))).sample.numpy())
    # each window a jitted call, as the pipeline runs them (eager calls would compile op by op)
    graphdef, state = nnx.split(ours)
    moments = jax.jit(lambda w: nnx.merge(graphdef, state).moments(w))
    decode = jax.jit(lambda w: nnx.merge(graphdef, state).decode(w))
    post = DiagonalGaussian.from_moments(tiled(moments, jnp.asarray(x), tile=32, tile_out=8))
    assert rel_err(post.mean, nhwc(dist.mean.numpy())) < 1e-5
    assert rel_err(post.logvar, nhwc(dist.logvar.numpy())) < 1e-5
    assert rel_err(tiled(decode, jnp.asarray(z), tile=8, tile_out=32), dec) < 1e-5
    assert rel_err(untiled_dec, dec) > 1e-2 and rel_err(untiled_mean, post.mean) > 1e-2


def test_tiling_a_small_input_is_the_plain_call_and_bad_overlaps_are_refused():
    model = AutoencoderKL(VAEConfig(**TINY), rngs=nnx.Rngs(0))
    z = jax.random.normal(jax.random.PRNGKey(1), (1, 8, 6, 4))
    np.testing.assert_array_equal(model.tiled_decode(z, tile=8), model.decode(z))
    with pytest.raises(ValueError, match="overlap"):
        model.tiled_decode(jnp.zeros((1, 16, 16, 4)), tile=8, overlap=0.3)


@pytest.fixture(scope="module")
def shapes_images():
    return make_shapes(512, resolution=16, seed=0).images


# the autoencoder trains by the same fit() as the VAE (and notebook 01 trains it in CI): under -m slow
@pytest.mark.parametrize("kind", [pytest.param("autoencoder", marks=pytest.mark.slow), "vae"])
def test_model_learns_shapes(kind, shapes_images):
    """60 Adam steps at lr 2e-3 (β = 1e-3 for the VAE) must more than halve the loss and bring the
    reconstruction MSE under 0.15. At random init the MSE is about the pixel variance of `shapes`
    (~0.3–0.6); the mean image alone scores ~0.5. A broken gradient, a loss that ignores the decoder
    or a KL term that swamps the reconstruction would all stay above these bounds."""
    if kind == "autoencoder":
        model, loss = Autoencoder(AutoencoderConfig(**TINY), rngs=nnx.Rngs(0)), autoencoder_loss
    else:
        model, loss = AutoencoderKL(VAEConfig(**TINY), rngs=nnx.Rngs(0)), functools.partial(vae_loss, kl_weight=1e-3)
    res = fit(
        model,
        loss,
        {"image": shapes_images},
        steps=60,
        batch_size=32,
        optimizer=optax.adam(2e-3),
        seed=0,
        progress=False,
    )
    first, last = np.mean(res.history["loss"][:5]), np.mean(res.history["loss"][-5:])
    assert last < 0.5 * first, (first, last)
    assert np.mean(res.history["mse"][-5:]) < 0.15
