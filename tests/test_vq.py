"""Stage A of Würstchen, the VQ autoencoder (sdjax.models.vq): the nearest-code lookup against a float64
brute force, the straight-through gradient, the losses against their formulas, dead-code restarts, and the
whole model against diffusers' ``VQModel`` (random weights, saved with ``save_pretrained``, loaded by sdjax)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from sdjax import convert
from sdjax.models.vq import VectorQuantizer, nearest_codes, restart_dead_codes
from tests.helpers import nchw, nhwc, rel_err


def test_nearest_codes_against_brute_force():
    rng = np.random.default_rng(0)
    z, codebook = rng.standard_normal((3, 5, 7, 6)), rng.standard_normal((40, 6))
    want = np.argmin(((z[..., None, :] - codebook) ** 2).sum(-1), axis=-1)  # every distance, float64
    got = np.asarray(nearest_codes(jnp.asarray(z, jnp.float32), jnp.asarray(codebook, jnp.float32)))
    np.testing.assert_array_equal(got, want)


def quantizer(legacy=True, seed=0):
    vq = VectorQuantizer(16, 4, beta=0.25, legacy=legacy, rngs=nnx.Rngs(seed))
    vq.embedding.embedding[...] = jax.random.normal(jax.random.PRNGKey(seed), (16, 4))
    return vq


def test_straight_through_gradient_is_the_identity():
    """Forward: z_q, the nearest codes; backward: d z_st / d z_e = I (the decoder's gradient reaches the
    encoder unchanged), and the codes get no gradient from the straight-through path."""
    vq = quantizer()
    z = jax.random.normal(jax.random.PRNGKey(1), (2, 3, 3, 4))
    w = jax.random.normal(jax.random.PRNGKey(2), z.shape)
    q = vq(z)
    np.testing.assert_allclose(np.asarray(q.z), np.asarray(vq.lookup(q.indices)), atol=1e-6)
    grad = jax.grad(lambda z: jnp.sum(w * vq(z).z))(z)
    np.testing.assert_array_equal(np.asarray(grad), np.asarray(w))
    assert code_gradient(vq, lambda q: jnp.sum(w * q.z)) == 0.0


def code_gradient(vq, of) -> float:
    """max |∂ of(vq(z)) / ∂ codebook| for a fixed z."""
    z = jax.random.normal(jax.random.PRNGKey(1), (2, 3, 3, 4))
    grads = nnx.grad(lambda m: of(m(z)))(vq)
    return float(jnp.abs(grads.embedding.embedding[...]).max())


@pytest.mark.parametrize("legacy", [True, False])
def test_losses_against_float64(legacy):
    vq = quantizer(legacy)
    z = jax.random.normal(jax.random.PRNGKey(3), (2, 4, 4, 4))
    q = vq(z)
    z64, table = np.asarray(z, np.float64), np.asarray(vq.embedding.embedding[...], np.float64)
    zq = table[np.argmin(((z64[..., None, :] - table) ** 2).sum(-1), axis=-1)]
    mse = float(np.mean((z64 - zq) ** 2))
    for value in (q.codebook_loss, q.commitment_loss):  # equal forward values, different gradients
        assert float(value) == pytest.approx(mse, rel=1e-5)
    assert float(q.loss) == pytest.approx(1.25 * mse, rel=1e-5)
    # the gradients say which side each term trains: codebook → the codes, commitment → the encoder
    g_enc = jax.grad(lambda zz: vq(zz).commitment_loss)(z)
    np.testing.assert_allclose(np.asarray(g_enc), 2 * (z64 - zq) / z64.size, rtol=1e-4, atol=1e-7)
    assert code_gradient(vq, lambda q: q.codebook_loss) > 0 and code_gradient(vq, lambda q: q.commitment_loss) == 0
    assert float(jnp.abs(jax.grad(lambda zz: vq(zz).codebook_loss)(z)).max()) == 0.0
    loss_grad = jax.grad(lambda zz: vq(zz).loss)(z)
    weight = 1.0 if legacy else 0.25  # commitment's weight: diffusers' legacy loss puts β on the codebook term
    np.testing.assert_allclose(np.asarray(loss_grad), weight * 2 * (z64 - zq) / z64.size, rtol=1e-4, atol=1e-7)


def test_restart_dead_codes():
    codebook = jnp.arange(12.0).reshape(4, 3)
    counts = jnp.array([3, 0, 5, 0])
    z = jnp.full((2, 2, 2, 3), 7.5)
    new = np.asarray(restart_dead_codes(codebook, counts, z, jax.random.PRNGKey(0)))
    np.testing.assert_array_equal(new[[0, 2]], np.asarray(codebook)[[0, 2]])
    np.testing.assert_array_equal(new[[1, 3]], np.full((2, 3), 7.5))


def test_vq_model_matches_diffusers(tmp_path):
    torch = pytest.importorskip("torch")
    diffusers = pytest.importorskip("diffusers")
    torch.manual_seed(0)
    reference = diffusers.VQModel(
        block_out_channels=(8, 16), down_block_types=("DownEncoderBlock2D",) * 2,
        up_block_types=("UpDecoderBlock2D",) * 2, latent_channels=4, norm_num_groups=4, num_vq_embeddings=16,
        vq_embed_dim=3,
    ).eval()  # fmt: skip
    with torch.no_grad():
        reference.quantize.embedding.weight.normal_()  # codes spread out, so the argmin is not a near-tie
    reference.save_pretrained(tmp_path / "vq")
    ours = convert.load_vq(tmp_path / "vq")
    x = np.random.default_rng(0).uniform(-1, 1, (2, 16, 16, 3)).astype(np.float32)
    with torch.no_grad():
        h = reference.encode(torch.from_numpy(nchw(x))).latents
        quant, commit, (_, _, indices) = reference.quantize(h)
        decoded = reference.decode(h).sample
    z_e = ours.encode(jnp.asarray(x))
    encode_error, decode_error = rel_err(z_e, nhwc(h.numpy())), rel_err(ours.decode(z_e), nhwc(decoded.numpy()))
    print(f"VQModel: encode {encode_error:.1e}, decode {decode_error:.1e} relative")
    assert encode_error < 1e-5
    q = ours.quantize(z_e)
    np.testing.assert_array_equal(np.asarray(q.indices).reshape(-1), indices.numpy().reshape(-1))
    assert float(q.loss) == pytest.approx(float(commit), rel=1e-5)
    assert decode_error < 1e-5
    convert.save_vq(ours, tmp_path / "back")
    again = diffusers.VQModel.from_pretrained(tmp_path / "back")
    for name, p in reference.state_dict().items():
        np.testing.assert_array_equal(again.state_dict()[name].numpy(), p.numpy())


def test_stage_a_trains_on_shapes():
    """vq_loss with sdjax.train.fit: 40 steps on 16-px shapes lower the reconstruction error, and the
    metrics count the codes in use."""
    import optax

    from sdjax.data import make_shapes
    from sdjax.models.vq import VQConfig, VQModel, vq_loss
    from sdjax.train import fit

    cfg = VQConfig(block_out_channels=(8, 16), latent_channels=4, norm_num_groups=4, num_vq_embeddings=32,
                   mid_block_attention=False)  # fmt: skip
    model = VQModel(cfg, rngs=nnx.Rngs(0))
    images = np.asarray(make_shapes(128, resolution=16, seed=0).images)
    result = fit(model, vq_loss, {"image": images}, steps=40, batch_size=16, optimizer=optax.adam(3e-3),
                 progress=False)  # fmt: skip
    history = result.history
    assert np.mean(history["reconstruction"][-10:]) < 0.5 * np.mean(history["reconstruction"][:5])
    assert 1 <= history["codes_used"][-1] <= 32
