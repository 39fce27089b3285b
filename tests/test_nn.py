"""The shared blocks: shapes, and numerical parity with diffusers' blocks and NumPy float64 formulas.

Tolerances: fp32 through a few convolutions and GroupNorms agrees with PyTorch to ~1e-6 relative;
we assert 1e-5 (max-abs error over max-abs value), which any real mistake (a transposed kernel, a
wrong padding, a missing residual) exceeds by orders of magnitude.
"""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from sdjax.nn import (
    Attention,
    Downsample,
    ResnetBlock,
    SelfAttention,
    Upsample,
    record_cross_attention,
    sinusoidal_embedding,
    upsample_nearest,
)
from tests.helpers import load_torch_state, nchw, nhwc, rel_err

torch = pytest.importorskip("torch", reason="the reference extra (pip install -e '.[reference]') provides torch")
diffusers = pytest.importorskip("diffusers")

RTOL = 1e-5


def x_of(shape, seed=0):
    return np.asarray(jax.random.normal(jax.random.PRNGKey(seed), shape))


def test_shapes():
    r = nnx.Rngs(0)
    x = jnp.zeros((2, 8, 8, 16))
    assert ResnetBlock(16, 32, groups=8, rngs=r)(x).shape == (2, 8, 8, 32)
    assert ResnetBlock(16, 16, temb_dim=10, groups=8, rngs=r)(x, jnp.zeros((2, 10))).shape == (2, 8, 8, 16)
    assert Downsample(16, rngs=r)(x).shape == (2, 4, 4, 16)
    assert Downsample(16, asymmetric_pad=True, rngs=r)(x).shape == (2, 4, 4, 16)
    assert Upsample(16, rngs=r)(x).shape == (2, 16, 16, 16)
    assert SelfAttention(16, heads=2, groups=8, rngs=r)(x).shape == (2, 8, 8, 16)
    assert sinusoidal_embedding(jnp.arange(3), 7).shape == (3, 7)


def test_time_conditioned_block_needs_temb():
    block = ResnetBlock(8, 8, temb_dim=4, groups=4, rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match="temb"):
        block(jnp.zeros((1, 4, 4, 8)))


def test_attention_heads_must_divide_channels():
    with pytest.raises(ValueError, match="heads=3 must divide channels=16"):
        SelfAttention(16, heads=3, groups=8, rngs=nnx.Rngs(0))


@pytest.mark.parametrize("flip", [True, False])
@pytest.mark.parametrize("shift", [0.0, 1.0])
@pytest.mark.parametrize("dim", [32, 7])
def test_sinusoidal_embedding_matches_float64_formula(flip, shift, dim):
    t = np.array([0, 1, 10, 999.5, 250])
    half = dim // 2
    freqs = np.exp(-math.log(10_000.0) * np.arange(half, dtype=np.float64) / (half - shift))
    ang = t[:, None].astype(np.float64) * freqs[None]
    want = np.concatenate([np.cos(ang), np.sin(ang)] if flip else [np.sin(ang), np.cos(ang)], axis=1)
    if dim % 2:
        want = np.pad(want, ((0, 0), (0, 1)))
    got = sinusoidal_embedding(jnp.asarray(t), dim, flip_sin_to_cos=flip, freq_shift=shift)
    # float32 angles up to ~1e3 rad: sin/cos carry ~1e-4 absolute rounding of the argument
    np.testing.assert_allclose(got, want, atol=2e-4)


def test_sinusoidal_embedding_matches_diffusers():
    from diffusers.models.embeddings import get_timestep_embedding

    t = np.array([1, 81, 500, 999])
    want = get_timestep_embedding(torch.tensor(t), 320, flip_sin_to_cos=True, downscale_freq_shift=0).numpy()
    # Both compute in float32; exp() may differ by 1 ulp between XLA and PyTorch, which moves an angle
    # t·ω by up to 999 · 6e-8 ≈ 6e-5 rad — the same size as either's error against float64.
    np.testing.assert_allclose(sinusoidal_embedding(jnp.asarray(t), 320), want, atol=1e-4)


def test_upsample_nearest_values():
    x = jnp.arange(4.0).reshape(1, 2, 2, 1)
    np.testing.assert_array_equal(
        upsample_nearest(x)[0, :, :, 0], [[0, 0, 1, 1], [0, 0, 1, 1], [2, 2, 3, 3], [2, 2, 3, 3]]
    )


@pytest.mark.parametrize("c_in,c_out,temb", [(16, 16, None), (16, 32, None), (16, 32, 24)])
def test_resnet_block_matches_diffusers(c_in, c_out, temb):
    from diffusers.models.resnet import ResnetBlock2D

    torch.manual_seed(0)
    ref = ResnetBlock2D(in_channels=c_in, out_channels=c_out, temb_channels=temb, groups=8, eps=1e-6).eval()
    ours = ResnetBlock(c_in, c_out, temb_dim=temb, groups=8, eps=1e-6, rngs=nnx.Rngs(0))
    load_torch_state(ours, ref.state_dict())
    x = x_of((2, 8, 8, c_in))
    t = x_of((2, temb), seed=1) if temb else None
    with torch.no_grad():
        want = ref(torch.from_numpy(nchw(x)), torch.tensor(t) if temb else None).numpy()
    got = ours(jnp.asarray(x), None if t is None else jnp.asarray(t))
    assert rel_err(got, nhwc(want)) < RTOL


@pytest.mark.parametrize("asymmetric", [True, False])
def test_downsample_matches_diffusers(asymmetric):
    from diffusers.models.downsampling import Downsample2D

    torch.manual_seed(0)
    ref = Downsample2D(16, use_conv=True, out_channels=16, padding=0 if asymmetric else 1).eval()
    ours = Downsample(16, asymmetric_pad=asymmetric, rngs=nnx.Rngs(0))
    load_torch_state(ours, ref.state_dict())
    x = x_of((2, 8, 8, 16))
    with torch.no_grad():
        want = ref(torch.from_numpy(nchw(x))).numpy()
    assert rel_err(ours(jnp.asarray(x)), nhwc(want)) < RTOL


def test_upsample_matches_diffusers():
    from diffusers.models.upsampling import Upsample2D

    torch.manual_seed(0)
    ref = Upsample2D(16, use_conv=True).eval()
    ours = Upsample(16, rngs=nnx.Rngs(0))
    load_torch_state(ours, ref.state_dict())
    x = x_of((2, 4, 4, 16))
    with torch.no_grad():
        want = ref(torch.from_numpy(nchw(x))).numpy()
    assert rel_err(ours(jnp.asarray(x)), nhwc(want)) < RTOL


@pytest.mark.parametrize("heads", [1, 4])
def test_self_attention_matches_diffusers(heads):
    """diffusers' ``Attention`` configured as in SD's VAE mid-block (group norm, residual)."""
    from diffusers.models.attention_processor import Attention

    c = 32
    torch.manual_seed(0)
    ref = Attention(
        query_dim=c,
        heads=heads,
        dim_head=c // heads,
        eps=1e-6,
        norm_num_groups=8,
        residual_connection=True,
        bias=True,
        upcast_softmax=True,
        _from_deprecated_attn_block=True,
    ).eval()
    ours = SelfAttention(c, heads=heads, groups=8, eps=1e-6, rngs=nnx.Rngs(0))
    load_torch_state(ours, ref.state_dict())
    x = x_of((2, 6, 6, c))
    with torch.no_grad():
        want = ref(torch.from_numpy(nchw(x))).numpy()
    assert rel_err(ours(jnp.asarray(x)), nhwc(want)) < RTOL


def test_recorded_cross_attention_is_the_float64_softmax_and_changes_nothing():
    attn = Attention(8, heads=2, head_dim=4, context_dim=6, rngs=nnx.Rngs(0))
    x, c = jax.random.normal(jax.random.PRNGKey(1), (2, 5, 8)), jax.random.normal(jax.random.PRNGKey(2), (2, 7, 6))
    plain = attn(x, c)
    with record_cross_attention() as weights:
        recorded = attn(x, c)
        Attention(8, heads=2, head_dim=4, rngs=nnx.Rngs(3))(x)  # self-attention: not recorded
    assert len(weights) == 1 and weights[0].shape == (2, 2, 5, 7)
    np.testing.assert_array_equal(np.asarray(recorded), np.asarray(plain))
    # the formula in float64 NumPy: softmax over the keys of Q_h K_hᵀ / √d
    q = np.asarray(x, np.float64) @ np.asarray(attn.to_q.kernel[...], np.float64)
    k = np.asarray(c, np.float64) @ np.asarray(attn.to_k.kernel[...], np.float64)
    scores = np.einsum("bthd,bshd->bhts", q.reshape(2, 5, 2, 4), k.reshape(2, 7, 2, 4)) / 2.0
    want = np.exp(scores - scores.max(-1, keepdims=True))
    want /= want.sum(-1, keepdims=True)
    np.testing.assert_allclose(np.asarray(weights[0]), want, rtol=1e-5, atol=1e-6)
    assert Attention.attend.__name__ == "attend"  # put back after the block


@pytest.mark.parametrize("size", [(4, 6), (3, 5), (5, 9), (9, 7), (2, 2)])
def test_upsample_to_a_size_matches_torch_nearest(size):
    """``upsample_nearest(x, size)`` is PyTorch's ``F.interpolate(x, size, mode="nearest")`` (what diffusers'
    Upsample2D does with ``output_size``), index for index."""
    x = np.random.default_rng(0).standard_normal((2, 2, 3, 4)).astype(np.float32)  # (B, H, W, C) = 2×3
    want = torch.nn.functional.interpolate(torch.from_numpy(nchw(x)), size=size, mode="nearest").numpy()
    np.testing.assert_array_equal(np.asarray(upsample_nearest(jnp.asarray(x), size)), nhwc(want))
