"""ControlNet (Zhang, Rao & Agrawala 2023, arXiv:2302.05543): a trainable copy of the UNet's encoder half
that reads a condition image (edges, a pose, a depth or segmentation map) and adds what it sees to the
frozen UNet's skip connections.

    c_img (B, 8h, 8w, 3) ─ conditioning embedding (convs, ×⅛) ─┐
    z_t (B, h, w, 4) ─ conv_in ───────────────────────────────── + ─ down levels ─ mid ─→ zero convs
                                                                     │ skips          ↓  (1×1, init 0)
    UNet:  z_t ─ conv_in ─ down ─ mid ───────────── + r_mid ─ up ────┼─ + r_i ←───── r_i · scale
                               └─ skips ─ + r_i ─────────────────────┘

The copy starts as the UNet's own encoder (:meth:`ControlNet.from_unet`) and its outputs pass through
"zero convolutions", 1×1 convolutions initialised to 0, so that at the start of training the residuals
r_i are 0 and the UNet is untouched; the gradient of a zero conv's weights is not 0, so training moves
them (the paper's §3.1). The encoder is built by the UNet's own code (:class:`UNetEncoder`), so a
ControlNet for SD1.x, SD2.x or SDXL is the same class with that model's :class:`UNetConfig`.

At sampling time, ``conditioning_scale`` multiplies every residual; guess mode scales them from 0.1 at
the highest resolution to 1 at the middle block, log-spaced (diffusers' ``guess_mode``); several
ControlNets' residuals add up. Module names follow diffusers' ``ControlNetModel`` so its checkpoints map
name for name (:func:`sdjax.convert.load_controlnet`).
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
from flax import nnx

from sdjax.models.unet import UNetEncoder
from sdjax.models.unet_config import UNetConfig
from sdjax.nn import conv

Array = jax.Array

# keys of a diffusers ControlNetModel config.json that are the ControlNet's own, not its UNet encoder's
_OWN_KEYS = (
    "conditioning_channels",
    "conditioning_embedding_out_channels",
    "global_pool_conditions",
    "controlnet_conditioning_channel_order",
)
_UP = {"CrossAttnDownBlock2D": "CrossAttnUpBlock2D", "DownBlock2D": "UpBlock2D", "AttnDownBlock2D": "AttnUpBlock2D"}


@dataclasses.dataclass(frozen=True)
class ControlNetConfig:
    """unet: the encoder's config, that of the UNet the ControlNet controls (its up-path fields unused).
    conditioning_channels: channels of the condition image (3). conditioning_embedding_out_channels: the
    widths of the condition embedding's levels, each but the last followed by a stride-2 conv: 4 levels
    → the condition image is 8× the latent's size. global_pool_conditions: residuals averaged over the
    image (the "shuffle" ControlNet). channel_order: "rgb", or "bgr" for a model trained on BGR images.
    """

    unet: UNetConfig
    conditioning_channels: int = 3
    conditioning_embedding_out_channels: tuple[int, ...] = (16, 32, 96, 256)
    global_pool_conditions: bool = False
    channel_order: str = "rgb"

    def __post_init__(self):
        if self.channel_order not in ("rgb", "bgr"):
            raise ValueError(f"controlnet_conditioning_channel_order={self.channel_order!r}: expected 'rgb' or 'bgr'")

    @property
    def downscale(self) -> int:
        """How many times larger the condition image is than the latent: 2^(levels − 1)."""
        return 2 ** (len(self.conditioning_embedding_out_channels) - 1)

    @classmethod
    def from_diffusers(cls, config: dict) -> ControlNetConfig:
        """The config of a diffusers ``ControlNetModel`` (its ``config.json``)."""
        if config.get("_class_name", "ControlNetModel") != "ControlNetModel":
            raise ValueError(
                f"the config is a {config['_class_name']}, not a ControlNetModel (sdjax loads ControlNetModel only)"
            )
        own = {k: config[k] for k in _OWN_KEYS if k in config}
        unet = {k: v for k, v in config.items() if k not in _OWN_KEYS and k != "_class_name"}
        unet["up_block_types"] = [_UP.get(kind, kind) for kind in reversed(unet.get("down_block_types", []))]
        unet.setdefault("cross_attention_dim", 1280)  # the key that marks a text-conditioned UNet config
        unet.setdefault("in_channels", 4)
        unet["out_channels"] = unet["in_channels"]
        kwargs = {
            "conditioning_channels": own.get("conditioning_channels", 3),
            "global_pool_conditions": bool(own.get("global_pool_conditions", False)),
            "channel_order": own.get("controlnet_conditioning_channel_order", "rgb"),
        }
        if "conditioning_embedding_out_channels" in own:
            kwargs["conditioning_embedding_out_channels"] = tuple(own["conditioning_embedding_out_channels"])
        return cls(UNetConfig.from_diffusers({"_class_name": "UNet2DConditionModel", **unet}), **kwargs)

    def to_diffusers(self) -> dict:
        """This config as a diffusers ``ControlNetModel`` ``config.json``."""
        unet = self.unet.to_diffusers()
        for key in ("_class_name", "up_block_types", "out_channels", "sample_size", "center_input_sample"):
            unet.pop(key, None)
        return {
            "_class_name": "ControlNetModel",
            **unet,
            "conditioning_channels": self.conditioning_channels,
            "conditioning_embedding_out_channels": list(self.conditioning_embedding_out_channels),
            "global_pool_conditions": self.global_pool_conditions,
            "controlnet_conditioning_channel_order": self.channel_order,
        }


class ConditioningEmbedding(nnx.Module):
    """The condition image to the latent's size and conv_in's width (diffusers'
    ``ControlNetConditioningEmbedding``): a 3×3 conv, then per level a 3×3 conv and a stride-2 3×3 conv
    to the next width, SiLU after each, then a zero-initialised 3×3 conv.

    Shapes: (B, 8h, 8w, conditioning_channels) → (B, h, w, C_0) with 4 levels (sizes: ⌈/2⌉ per stride).
    """

    def __init__(self, c_in: int, widths: tuple[int, ...], c_out: int, *, rngs: nnx.Rngs):
        self.conv_in = conv(c_in, widths[0], 3, rngs)
        blocks = []
        for a, b in zip(widths[:-1], widths[1:]):
            blocks += [conv(a, a, 3, rngs), conv(a, b, 3, rngs, stride=2)]
        self.blocks = nnx.List(blocks)
        self.conv_out = zero(conv(widths[-1], c_out, 3, rngs))

    def __call__(self, x: Array) -> Array:
        x = jax.nn.silu(self.conv_in(x))
        for block in self.blocks:
            x = jax.nn.silu(block(x))
        return self.conv_out(x)


def zero(layer: nnx.Conv) -> nnx.Conv:
    """``layer`` with its weights and bias set to 0: a "zero convolution"."""
    layer.kernel[...] = jnp.zeros_like(layer.kernel[...])
    layer.bias[...] = jnp.zeros_like(layer.bias[...])
    return layer


class ControlNet(UNetEncoder):
    """The encoder copy, the condition embedding and the zero convs (module docstring).

    Call: x (B, h, w, in_channels), t, context as the UNet's, ``cond`` the condition image (B, 8h, 8w,
    conditioning_channels) in [0, 1], ``conditioning_scale`` () or (B,) → (down residuals, one per UNet skip
    connection and of its shape; mid residual (B, h/8, w/8, C_last)), to hand to ``UNet2D(..., control=...)``.
    """

    def __init__(self, cfg: ControlNetConfig, *, rngs: nnx.Rngs):
        super().__init__(cfg.unet, rngs=rngs)
        self.controlnet_config = cfg
        ch = cfg.unet.block_out_channels
        self.controlnet_cond_embedding = ConditioningEmbedding(
            cfg.conditioning_channels, cfg.conditioning_embedding_out_channels, ch[0], rngs=rngs
        )
        self.controlnet_down_blocks = nnx.List([zero(conv(c, c, 1, rngs)) for c in self.skip_channels])
        self.controlnet_mid_block = zero(conv(ch[-1], ch[-1], 1, rngs))

    @classmethod
    def from_unet(cls, unet: UNetEncoder, cfg: ControlNetConfig | None = None, *, rngs: nnx.Rngs) -> ControlNet:
        """A ControlNet for ``unet`` whose encoder starts as a copy of the UNet's (the paper's
        initialisation; diffusers' ``ControlNetModel.from_unet``), condition embedding random, zero convs 0."""
        cfg = cfg or ControlNetConfig(unet.config)
        if cfg.unet != unet.config:
            raise ValueError("ControlNet.from_unet: cfg.unet must be the UNet's own config")
        model = cls(cfg, rngs=rngs)
        shared = ("time_embedding", "add_embedding", "conv_in", "down_blocks", "mid_block")
        for name in shared:
            if hasattr(unet, name):
                nnx.update(getattr(model, name), jax.tree.map(jnp.copy, nnx.state(getattr(unet, name), nnx.Param)))
        return model

    def __call__(
        self,
        x: Array,
        t: Array | float,
        context: Array | None,
        cond: Array,
        *,
        conditioning_scale: float | Array = 1.0,
        guess_mode: bool = False,
        added_cond=None,
    ) -> tuple[list[Array], Array]:
        cfg = self.controlnet_config
        expected = (x.shape[0], x.shape[1] * cfg.downscale, x.shape[2] * cfg.downscale, cfg.conditioning_channels)
        if cond.ndim != 4 or tuple(cond.shape) != expected:
            raise ValueError(
                f"ControlNet: the condition image must be (B, H, W, {cfg.conditioning_channels}) at the image's size, "
                f"{cfg.downscale}× the latent's: {expected}; got {tuple(cond.shape)}"
            )
        if cfg.channel_order == "bgr":
            cond = cond[..., ::-1]
        temb = self.embed_time(x, t, context, added_cond)
        h, skips = self.encode(x, temb, context, self.controlnet_cond_embedding(cond.astype(x.dtype)))
        down = [zero_conv(s) for zero_conv, s in zip(self.controlnet_down_blocks, skips)]
        mid = self.controlnet_mid_block(h)
        scale = jnp.asarray(conditioning_scale, jnp.float32)
        scale = scale.reshape(-1, 1, 1, 1) if scale.ndim == 1 else scale  # one per image
        if guess_mode and not cfg.global_pool_conditions:
            # from 0.1 at the first skip to 1 at the middle block, evenly in log scale
            levels = jnp.logspace(-1.0, 0.0, len(down) + 1)
            down = [r * (levels[i] * scale).astype(r.dtype) for i, r in enumerate(down)]
            mid = mid * (levels[-1] * scale).astype(mid.dtype)
        else:
            down = [r * scale.astype(r.dtype) for r in down]
            mid = mid * scale.astype(mid.dtype)
        if cfg.global_pool_conditions:
            down = [jnp.mean(r, axis=(1, 2), keepdims=True) for r in down]
            mid = jnp.mean(mid, axis=(1, 2), keepdims=True)
        return down, mid
