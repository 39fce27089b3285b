"""SDXL's UNet: numerical parity with diffusers' ``UNet2DConditionModel`` in tiny SDXL-style configs (no
attention at the highest level, transformer layers per level, the "text_time" added conditioning), loading
from a ``save_pretrained`` folder, the full-size config, and the errors.

Tolerance: as tests/test_unet.py, float32 throughout, 1e-5 relative (max-abs error over max-abs reference
value). The added conditioning enters every ResnetBlock through t_emb, so concatenating [time features,
text_embeds] in the wrong order, a sin/cos swap or a missing add_embedding is off by orders of magnitude.
"""

import dataclasses

import jax
import numpy as np
import pytest
from flax import nnx

from sdjax.convert import abstract, load_unet
from sdjax.models.unet import UNet2D, UNetConfig
from tests.helpers import SD1_UNET, load_torch_state, nchw, nhwc, reference_unet, rel_err

RTOL = 1e-5
POOLED = 24  # D_pool, the width of the (tiny) second text encoder's projected pooled output
TIME_DIM = 8  # addition_time_embed_dim (SDXL: 256)

# SDXL base's structure at a few channels per layer (on top of tests/helpers.py's SD1_UNET): a plain
# highest level, cross-attention below it with 2 transformer layers (the mid block takes the last
# level's 2), heads per level in diffusers' legacy "attention_head_dim" (16 channels per head, as
# SDXL's (5, 10, 20) gives 64), linear projections, the text_time embedding of 6 numbers, and
# upcast_attention null as SDXL's config.json stores it.
SDXL_UNET = dict(
    sample_size=8,
    in_channels=4,
    out_channels=4,
    block_out_channels=(32, 64),
    layers_per_block=2,
    down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
    up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
    transformer_layers_per_block=(1, 2),
    attention_head_dim=(2, 4),
    use_linear_projection=True,
    upcast_attention=None,
    addition_embed_type="text_time",
    addition_time_embed_dim=TIME_DIM,
    projection_class_embeddings_input_dim=POOLED + 6 * TIME_DIM,
)
# three levels, SDXL's block types exactly, 1/1/2 transformer layers: latents halve twice, so odd and
# non-square sizes (9 × 7 → 5 × 4 → 3 × 2) need the up path's resize to the skips
SDXL_THREE_LEVELS = {
    **SDXL_UNET,
    "block_out_channels": (32, 32, 64),
    "down_block_types": ("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
    "up_block_types": ("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
    "transformer_layers_per_block": (1, 1, 2),
    "attention_head_dim": (2, 2, 4),
}


def inputs(seed, hw, batch=2):
    """Latents x (B, H, W, 4), timesteps (B,), context (B, 7, 32), and added_cond: text_embeds (B, D_pool)
    and time_ids (B, 6) = (original H, W, crop top, left, target H, W) in pixels, as SDXL passes them."""
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((batch, *hw, 4)).astype(np.float32)
    t = np.array([10, 900][:batch])
    context = rng.standard_normal((batch, 7, 32)).astype(np.float32)
    text_embeds = rng.standard_normal((batch, POOLED)).astype(np.float32)
    time_ids = np.array([[1024, 1024, 0, 0, 1024, 1024], [768, 1344, 64, 32, 896, 1152]][:batch], np.float32)
    return x, t, context, {"text_embeds": text_embeds, "time_ids": time_ids}


def reference_output(ref, x, t, context, added):
    """diffusers' UNet2DConditionModel on the same inputs (NCHW in, NHWC out)."""
    import torch

    with torch.no_grad():
        out = ref(
            torch.from_numpy(nchw(x)),
            torch.from_numpy(t),
            torch.from_numpy(context),
            added_cond_kwargs={k: torch.from_numpy(v) for k, v in added.items()},
        )
    return nhwc(out.sample.numpy())


@nnx.jit
def step(model, x, t, context, added):
    return model(x, t, context, added)


@pytest.fixture(scope="module")
def reference():
    """The tiny SDXL-style diffusers UNet (random init) and an sdjax UNet2D holding its weights."""
    torch = pytest.importorskip("torch", reason="the reference extra (pip install -e '.[reference]') provides torch")
    pytest.importorskip("diffusers")
    torch.manual_seed(0)
    ref = reference_unet(**SDXL_UNET)
    ours = UNet2D(UNetConfig.from_diffusers(dict(ref.config)), rngs=nnx.Rngs(0))
    load_torch_state(ours, ref.state_dict())
    return ref, ours


def test_matches_diffusers(reference):
    ref, ours = reference
    assert ours.config.transformer_layers_per_block == (1, 2) and ours.config.upcast_attention is False
    assert len(ours.down_blocks[0].attentions) == 0  # no attention at the highest level
    assert len(ours.mid_block.attentions[0].transformer_blocks) == 2  # the last level's count
    x, t, context, added = inputs(0, (8, 8))
    want = reference_output(ref, x, t, context, added)
    err = rel_err(step(ours, x, t, context, added), want)
    assert err < RTOL, f"relative error {err:.2e}"
    # both added inputs matter: other text_embeds, or other sizes, give a clearly different output
    other_text = {**added, "text_embeds": added["text_embeds"][::-1]}
    other_sizes = {**added, "time_ids": added["time_ids"] + 64}
    assert rel_err(step(ours, x, t, context, other_text), want) > 1e-3
    assert rel_err(step(ours, x, t, context, other_sizes), want) > 1e-3


def test_loads_a_save_pretrained_folder(reference, tmp_path):
    """``sdjax.convert.load_unet`` reads the folder diffusers writes: its config.json (SDXL's keys, a null
    upcast_attention) and safetensors weights, add_embedding.linear_1/2 included."""
    ref, ours = reference
    ref.save_pretrained(tmp_path / "unet")
    loaded = load_unet(tmp_path / "unet")
    assert loaded.config == ours.config
    np.testing.assert_array_equal(loaded.add_embedding.linear_1.kernel[...], ours.add_embedding.linear_1.kernel[...])
    x, t, context, added = inputs(1, (8, 8))
    err = rel_err(step(loaded, x, t, context, added), reference_output(ref, x, t, context, added))
    assert err < RTOL, f"relative error {err:.2e}"


@pytest.mark.parametrize("hw", [(9, 7), (6, 10)])
def test_matches_diffusers_at_non_square_sizes(hw):
    torch = pytest.importorskip("torch")
    pytest.importorskip("diffusers")
    torch.manual_seed(0)
    ref = reference_unet(**SDXL_THREE_LEVELS)
    ours = UNet2D(UNetConfig.from_diffusers(dict(ref.config)), rngs=nnx.Rngs(0))
    load_torch_state(ours, ref.state_dict())
    x, t, context, added = inputs(2, hw)
    want = reference_output(ref, x, t, context, added)
    got = step(ours, x, t, context, added)
    assert got.shape == want.shape == (2, *hw, 4)
    err = rel_err(got, want)
    assert err < RTOL, f"{hw}: relative error {err:.2e}"


def sdjax_config(**changes) -> UNetConfig:
    """sdjax's config of the reference UNet in :data:`SDXL_UNET` with ``changes``, read as diffusers' config.json."""
    return UNetConfig.from_diffusers({"_class_name": "UNet2DConditionModel", **SD1_UNET, **SDXL_UNET, **changes})


# stabilityai/stable-diffusion-xl-base-1.0's unet/config.json
SDXL_BASE_CONFIG = {
    "_class_name": "UNet2DConditionModel",
    "_diffusers_version": "0.19.0.dev0",
    "act_fn": "silu",
    "addition_embed_type": "text_time",
    "addition_embed_type_num_heads": 64,
    "addition_time_embed_dim": 256,
    "attention_head_dim": [5, 10, 20],
    "block_out_channels": [320, 640, 1280],
    "center_input_sample": False,
    "class_embed_type": None,
    "class_embeddings_concat": False,
    "conv_in_kernel": 3,
    "conv_out_kernel": 3,
    "cross_attention_dim": 2048,
    "cross_attention_norm": None,
    "down_block_types": ["DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"],
    "downsample_padding": 1,
    "dual_cross_attention": False,
    "encoder_hid_dim": None,
    "encoder_hid_dim_type": None,
    "flip_sin_to_cos": True,
    "freq_shift": 0,
    "in_channels": 4,
    "layers_per_block": 2,
    "mid_block_only_cross_attention": None,
    "mid_block_scale_factor": 1,
    "mid_block_type": "UNetMidBlock2DCrossAttn",
    "norm_eps": 1e-05,
    "norm_num_groups": 32,
    "num_attention_heads": None,
    "num_class_embeds": None,
    "only_cross_attention": False,
    "out_channels": 4,
    "projection_class_embeddings_input_dim": 2816,
    "resnet_out_scale_factor": 1.0,
    "resnet_skip_time_act": False,
    "resnet_time_scale_shift": "default",
    "sample_size": 128,
    "time_cond_proj_dim": None,
    "time_embedding_act_fn": None,
    "time_embedding_dim": None,
    "time_embedding_type": "positional",
    "timestep_post_act": None,
    "transformer_layers_per_block": [1, 2, 10],
    "up_block_types": ["CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"],
    "upcast_attention": None,
    "use_linear_projection": True,
}
SDXL_PARAMS = 2_567_463_684


def test_sdxl_base_config():
    """``UNetConfig.sdxl()`` is the released config.json read by ``from_diffusers``, and survives a trip through
    ``to_diffusers``."""
    config = UNetConfig.sdxl()
    assert UNetConfig.from_diffusers(SDXL_BASE_CONFIG) == config
    assert UNetConfig.from_diffusers(config.to_diffusers()) == config


def test_sdxl_parameter_count():
    """SDXL base builds its 2.57 B parameters, as diffusers does from the released config (both as shapes only:
    sdjax under nnx.eval_shape, diffusers on torch's meta device). ~6 s (sdjax's part 1.3 s); it took 40 s, under
    ``-m slow``, while the shapes were traced with a real ``nnx.Rngs`` (``convert.abstract`` says why)."""
    config = UNetConfig.sdxl()
    model = abstract(UNet2D, config)
    assert sum(p.size for p in jax.tree.leaves(nnx.state(model, nnx.Param))) == SDXL_PARAMS
    assert [len(a.transformer_blocks) for a in model.up_blocks[0].attentions] == [10, 10, 10]
    torch = pytest.importorskip("torch")
    diffusers = pytest.importorskip("diffusers")
    for released in (True, False):  # the released config, and sdjax's export of its own (as save_diffusers writes it)
        with torch.device("meta"):
            ref = diffusers.UNet2DConditionModel.from_config(SDXL_BASE_CONFIG if released else config.to_diffusers())
        assert sum(p.numel() for p in ref.parameters()) == SDXL_PARAMS


@pytest.mark.parametrize(
    "change,match",
    [
        (dict(addition_embed_type="text"), "addition_embed_type='text' is not implemented"),
        (dict(addition_time_embed_dim=None), "needs addition_time_embed_dim and projection_class_embeddings_input_dim"),
        (dict(transformer_layers_per_block=(1, 2, 3)), r"one int ≥ 1 or one per level \(2\); got \(1, 2, 3\)"),
        (dict(transformer_layers_per_block=((1, 1), (2, 2))), "per-layer nesting is not implemented"),
        (dict(transformer_layers_per_block=0), "one int ≥ 1"),
    ],
)
def test_config_errors(change, match):
    with pytest.raises(ValueError, match=match):
        sdjax_config(**change)


def traced_shape(cfg):
    """``shape(*args)``: the output shape of a UNet2D of ``cfg`` on ``args``, traced only (no parameters, no
    compilation)."""
    graphdef, state = nnx.split(abstract(UNet2D, cfg))
    return lambda *args: jax.eval_shape(lambda s, *a: nnx.merge(graphdef, s)(*a), state, *args).shape


def test_added_cond_errors():
    cfg = sdjax_config()
    shape = traced_shape(cfg)
    x, t, context, added = inputs(0, (8, 8))
    assert shape(x, t, context, added) == x.shape
    with pytest.raises(ValueError, match=r"pass added_cond=.*got None"):
        shape(x, t, context)
    with pytest.raises(ValueError, match=r"got \['text_embeds'\]"):
        shape(x, t, context, {"text_embeds": added["text_embeds"]})
    with pytest.raises(ValueError, match=r"must be projection_class_embeddings_input_dim = 72; got D_pool = 24, n = 5"):
        shape(x, t, context, {**added, "time_ids": added["time_ids"][:, :5]})
    with pytest.raises(ValueError, match=r"time_ids \(B, n\); got \(2, 24\) and \(1, 6\)"):
        shape(x, t, context, {**added, "time_ids": added["time_ids"][:1]})
    plain = dataclasses.replace(
        cfg, addition_embed_type=None, addition_time_embed_dim=None, projection_class_embeddings_input_dim=None
    )
    with pytest.raises(ValueError, match="no added conditioning"):
        traced_shape(plain)(x, t, context, added)
