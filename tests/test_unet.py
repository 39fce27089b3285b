"""The pixel-space UNet: shapes, config errors, and numerical parity with diffusers' ``UNet2DModel``.

Tolerance: the tiny UNets here stack ~20 convolutions, GroupNorms and attentions in float32; we
assert 1e-5 relative (max-abs error over max-abs reference value). A wrong skip order, padding,
head split or missing time embedding is off by orders of magnitude.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from sdjax.models.unet import UNet2D, UNetConfig
from tests.reference import load_torch_state, nchw, nhwc, rel_err

RTOL = 1e-5

TINY = dict(
    sample_size=16,
    in_channels=3,
    out_channels=3,
    block_out_channels=(32, 64),
    down_block_types=("DownBlock2D", "AttnDownBlock2D"),
    up_block_types=("AttnUpBlock2D", "UpBlock2D"),
    norm_num_groups=8,
    attention_head_dim=8,
)


def test_shapes():
    cfg = UNetConfig(**{**TINY, "out_channels": 5}, layers_per_block=1)
    model = UNet2D(cfg, rngs=nnx.Rngs(0))
    graphdef, state = nnx.split(model)
    # trace only (no compilation): shapes are all this test is about
    shape = lambda x, t: jax.eval_shape(lambda s, x, t: nnx.merge(graphdef, s)(x, t), state, x, t).shape
    x = jnp.zeros((2, 16, 16, 3))
    assert shape(x, jnp.array([1, 2])) == (2, 16, 16, 5)
    assert shape(x, 7) == (2, 16, 16, 5)  # a scalar t is broadcast over the batch
    assert shape(jnp.zeros((1, 8, 24, 3)), 0) == (1, 8, 24, 5)  # any multiple of 2^(L-1)
    assert len(model.up_blocks[0].resnets) == 2 and len(model.up_blocks[0].attentions) == 2
    assert len(model.down_blocks[0].attentions) == 0 and len(model.down_blocks[1].downsamplers) == 0


@pytest.mark.parametrize(
    "change,match",
    [
        (dict(up_block_types=("UpBlock2D",)), "one entry per level"),
        (dict(down_block_types=("DownBlock2D", "CrossAttnDownBlock2D")), "not supported"),
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


def test_input_size_must_fit_levels():
    model = UNet2D(UNetConfig(**TINY, layers_per_block=1), rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match="multiples"):
        model(jnp.zeros((1, 15, 16, 3)), 0)


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
