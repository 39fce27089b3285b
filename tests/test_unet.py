"""The UNet: shapes, config errors, and numerical parity with diffusers' ``UNet2DModel`` (pixel DDPM)
and ``UNet2DConditionModel`` (Stable Diffusion's text-conditioned UNet, tiny SD1- and SD2-style configs).

Tolerance: the tiny UNets here stack ~20 convolutions, GroupNorms and attentions in float32; we
assert 1e-5 relative (max-abs error over max-abs reference value). A wrong skip order, padding,
head split or missing time embedding is off by orders of magnitude.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from sdjax.convert import abstract
from sdjax.models.unet import UNet2D, UNetConfig
from tests.helpers import PIXEL_UNET, SD1_UNET, load_torch_state, nchw, nhwc, reference_unet, rel_err

RTOL = 1e-5

TINY = PIXEL_UNET  # tests/helpers.py's pixel UNet: two levels, RGB, self-attention in the second


def test_shapes():
    cfg = UNetConfig(**{**TINY, "out_channels": 5}, layers_per_block=1)
    model = UNet2D(cfg, rngs=nnx.Rngs(0))
    graphdef, state = nnx.split(model)
    # trace only (no compilation): shapes are all this test is about
    shape = lambda x, t: jax.eval_shape(lambda s, x, t: nnx.merge(graphdef, s)(x, t), state, x, t).shape
    x = jnp.zeros((2, 16, 16, 3))
    assert shape(x, jnp.array([1, 2])) == (2, 16, 16, 5)
    assert shape(x, 7) == (2, 16, 16, 5)  # a scalar t is broadcast over the batch
    assert shape(jnp.zeros((1, 8, 24, 3)), 0) == (1, 8, 24, 5)
    assert shape(jnp.zeros((1, 9, 7, 3)), 0) == (1, 9, 7, 5)  # odd sizes: 9 → 5 → back to 9 via the skip's size
    assert len(model.up_blocks[0].resnets) == 2 and len(model.up_blocks[0].attentions) == 2
    assert len(model.down_blocks[0].attentions) == 0 and len(model.down_blocks[1].downsamplers) == 0


@pytest.mark.parametrize(
    "change,match",
    [
        (dict(up_block_types=("UpBlock2D",)), "one entry per level"),
        (dict(down_block_types=("DownBlock2D", "KDownBlock2D")), "not supported"),
        (dict(down_block_types=("DownBlock2D", "CrossAttnDownBlock2D")), "attend to text: set cross_attention_dim"),
        (dict(cross_attention_dim=16), "no block cross-attends"),
        (dict(num_attention_heads=(1, 2, 3)), "one entry per level"),
        (dict(norm_num_groups=24), "norm_num_groups=24 must divide"),
        (dict(attention_head_dim=24), "attention_head_dim=24 must divide"),
        (dict(time_embedding_type="fourier"), "time_embedding_type='fourier' is not implemented"),
        (dict(center_input_sample=True), "center_input_sample=True is not implemented"),
        (dict(add_attention=False), "add_attention=False is not implemented"),
        (dict(downsample_padding=2), "downsample_padding=2 is not implemented"),
    ],
)
def test_config_errors(change, match):
    with pytest.raises(ValueError, match=match):
        UNetConfig(**{**TINY, **change})


def test_input_must_be_nhwc_with_its_channels():
    model = UNet2D(UNetConfig(**TINY, layers_per_block=1), rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match=r"x must be \(B, H, W, 3\), got \(1, 3, 16, 16\)"):
        model(jnp.zeros((1, 3, 16, 16)), 0)


@pytest.mark.parametrize(
    "extra",
    [
        dict(layers_per_block=1),
        dict(layers_per_block=2),
        # the original DDPM checkpoints' conventions: sin first, shifted frequencies, one head, ε 1e-6,
        # asymmetric downsample padding
        dict(
            layers_per_block=1,
            flip_sin_to_cos=False,
            freq_shift=1,
            attention_head_dim=None,
            norm_eps=1e-6,
            downsample_padding=0,
        ),
    ],
    ids=["layers1", "layers2", "ddpm-style"],
)
def test_matches_diffusers(extra):
    torch = pytest.importorskip("torch", reason="the reference extra (pip install -e '.[reference]') provides torch")
    diffusers = pytest.importorskip("diffusers")

    kw = {**TINY, **extra}
    torch.manual_seed(0)
    ref = diffusers.UNet2DModel(**kw).eval()
    ours = UNet2D(UNetConfig(**kw), rngs=nnx.Rngs(0))
    load_torch_state(ours, ref.state_dict())

    x = np.asarray(jax.random.normal(jax.random.PRNGKey(0), (3, 16, 16, 3)))
    t = np.array([0, 500, 999])
    with torch.no_grad():
        want = nhwc(ref(torch.from_numpy(nchw(x)), torch.from_numpy(t)).sample.numpy())
    got = ours(jnp.asarray(x), jnp.asarray(t))
    err = rel_err(got, want)
    assert err < RTOL, f"relative error {err:.2e}"
    # t matters: a different step gives a clearly different output
    assert rel_err(ours(jnp.asarray(x), jnp.asarray(t[::-1])), want) > 1e-3


# tests/helpers.py's SD1-style UNet on 8 × 8 latents of 4 channels, with a 16-wide context; each test
# sets the heads (attention_head_dim)
COND = {**SD1_UNET, "sample_size": 8, "in_channels": 4, "out_channels": 4, "cross_attention_dim": 16}


@pytest.mark.parametrize(
    "extra",
    [
        dict(attention_head_dim=4),  # SD1.x: 1×1-conv projections, one head count everywhere
        dict(attention_head_dim=(2, 4), use_linear_projection=True),  # SD2.x: linear projections, heads per level
        dict(attention_head_dim=2, transformer_layers_per_block=2, upcast_attention=True),
    ],
    ids=["sd1-style", "sd2-style", "two-transformer-layers"],
)
def test_conditional_matches_diffusers(extra):
    """``UNet2DConditionModel`` in diffusers' legacy naming (attention_head_dim = heads), read through
    ``UNetConfig.from_diffusers``; the same blocks as the pixel UNet plus Transformer2D."""
    torch = pytest.importorskip("torch")
    pytest.importorskip("diffusers")

    torch.manual_seed(0)
    ref = reference_unet(**{**COND, **extra})
    ours = UNet2D(UNetConfig.from_diffusers(dict(ref.config)), rngs=nnx.Rngs(0))
    load_torch_state(ours, ref.state_dict())

    rng = np.random.default_rng(0)
    x = rng.standard_normal((2, 8, 8, 4)).astype(np.float32)
    context = rng.standard_normal((2, 7, 16)).astype(np.float32)
    t = np.array([10, 900])
    with torch.no_grad():
        want = nhwc(ref(torch.from_numpy(nchw(x)), torch.from_numpy(t), torch.from_numpy(context)).sample.numpy())
    step = nnx.jit(lambda m, x, t, c: m(x, t, c))
    err = rel_err(step(ours, jnp.asarray(x), jnp.asarray(t), jnp.asarray(context)), want)
    assert err < RTOL, f"relative error {err:.2e}"
    # the text matters: another context gives a clearly different output
    assert rel_err(step(ours, jnp.asarray(x), jnp.asarray(t), jnp.asarray(context[::-1])), want) > 1e-3


# three levels, so latents are halved twice: 9 → 5 → 3 and 6 → 3 → 2 need the up path's resize to the skips
THREE_LEVELS = {
    **COND,
    "block_out_channels": (32, 32, 64),
    "down_block_types": ("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
    "up_block_types": ("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
}


@pytest.mark.parametrize("hw", [(9, 7), (6, 8), (5, 5)])
def test_conditional_matches_diffusers_at_any_size(hw):
    """Latents of SD images that are multiples of 8 but not of 8 · 2^(L−1) (72×56 → 9×7, 48×64 → 6×8): diffusers
    resizes each upsampler's output to its skip connection's size (``forward_upsample_size``); so must sdjax."""
    torch = pytest.importorskip("torch")
    pytest.importorskip("diffusers")

    torch.manual_seed(0)
    ref = reference_unet(**THREE_LEVELS)
    ours = UNet2D(UNetConfig.from_diffusers(dict(ref.config)), rngs=nnx.Rngs(0))
    load_torch_state(ours, ref.state_dict())
    rng = np.random.default_rng(1)
    x = rng.standard_normal((2, *hw, 4)).astype(np.float32)
    context = rng.standard_normal((2, 7, 16)).astype(np.float32)
    t = np.array([10, 900])
    with torch.no_grad():
        want = nhwc(ref(torch.from_numpy(nchw(x)), torch.from_numpy(t), torch.from_numpy(context)).sample.numpy())
    got = nnx.jit(lambda m, x, t, c: m(x, t, c))(ours, jnp.asarray(x), jnp.asarray(t), jnp.asarray(context))
    assert got.shape == want.shape == (2, *hw, 4)
    err = rel_err(got, want)
    assert err < RTOL, f"{hw}: relative error {err:.2e}"


def test_conditional_needs_its_context():
    model = UNet2D(UNetConfig(**{**COND, "attention_head_dim": None, "num_attention_heads": 2}), rngs=nnx.Rngs(0))
    x = jnp.zeros((1, 8, 8, 4))
    with pytest.raises(ValueError, match=r"text-conditioned: pass context of shape \(B, S, 16\).*got None"):
        model(x, 0)
    with pytest.raises(ValueError, match=r"got \(1, 7, 12\)"):
        model(x, 0, jnp.zeros((1, 7, 12)))
    pixel = UNet2D(UNetConfig(**TINY, layers_per_block=1), rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match="not text-conditioned"):
        pixel(jnp.zeros((1, 16, 16, 3)), 0, jnp.zeros((1, 7, 16)))


@pytest.mark.parametrize(
    "config,params",
    [(UNetConfig.sd15(), 859_520_964), (UNetConfig.sd2(), 865_910_724)],
    ids=["sd15", "sd2"],
)
def test_stable_diffusion_configs(config, params):
    """The SD1.5 / SD2 UNets: parameter counts as published (diffusers builds the same numbers), and
    the config survives a trip through diffusers' config.json format. Shapes only, nothing allocated."""
    model = abstract(UNet2D, config)
    assert sum(p.size for p in jax.tree.leaves(nnx.state(model, nnx.Param))) == params
    assert UNetConfig.from_diffusers(config.to_diffusers()) == config
