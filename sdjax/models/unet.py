"""The denoising UNet: DDPM's pixel-space noise predictor ε_θ(x_t, t), diffusers' ``UNet2DModel``.

A diffusion model is trained to undo noise: given x_t = √ᾱ_t x_0 + √(1 − ᾱ_t) ε and the step t, the
network predicts ε (Ho et al. 2020, arXiv:2006.11239). Input and output have the same shape, so the
network is a UNet (Ronneberger et al. 2015): an encoder that halves the resolution level by level, a
decoder that doubles it back, and *skip connections* that hand every encoder feature map to the
decoder at the same resolution, so fine detail need not squeeze through the bottleneck.

    x (B, H, W, C) ─ conv_in ─ down_blocks ─ mid_block ─ up_blocks ─ norm, SiLU, conv_out ─ ε̂ (B, H, W, C)
                                   │  skips (a stack: push on the way down, pop on the way up)  ↑
                                   └─────────────────────────────────────────────────────────────┘
    t (B,) ─ sinusoidal_embedding ─ time_embedding (MLP) ─ t_emb (B, D_t) ─ into every ResnetBlock

Every ResnetBlock adds a projection of t_emb to its features, which is how one network learns to
denoise at every noise level. Some levels also have SelfAttention after each ResnetBlock, letting
every pixel see the whole image (the DDPM paper puts it at the 16×16 level).

The modules and their attribute names are exactly diffusers' (``down_blocks[i].resnets[j]``,
``down_blocks[i].attentions[j]``, ``down_blocks[i].downsamplers[0]``, ``mid_block``,
``up_blocks[i].upsamplers[0]`` ...), so a ``UNet2DModel`` checkpoint maps onto it name for name.
Stable Diffusion's ``UNet2DConditionModel`` is the same skeleton with text cross-attention
transformer blocks in place of the SelfAttention; it extends this file.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
from flax import nnx

from sdjax.nn import (
    Downsample,
    MidBlock,
    ResnetBlock,
    SelfAttention,
    Upsample,
    conv,
    group_norm,
    sinusoidal_embedding,
)

Array = jax.Array

DOWN_BLOCK_TYPES = ("DownBlock2D", "AttnDownBlock2D")
UP_BLOCK_TYPES = ("UpBlock2D", "AttnUpBlock2D")


@dataclasses.dataclass(frozen=True)
class UNetConfig:
    """Shape of a :class:`UNet2D`; the field names and defaults are diffusers' ``UNet2DModel`` config.

    sample_size: the H = W the model is trained at (informative; any size divisible by 2^(L−1) works).
    block_out_channels: channels at each resolution level, highest resolution first; L = its length.
    layers_per_block: ResnetBlocks per down level (each up level has one more, to consume the extra
        skip connection the downsampler pushed).
    down_block_types / up_block_types: per level, "DownBlock2D"/"UpBlock2D" (ResnetBlocks only) or
        "AttnDownBlock2D"/"AttnUpBlock2D" (a SelfAttention after every ResnetBlock). Up blocks are
        listed lowest resolution first, as in diffusers.
    attention_head_dim: d per attention head, so heads = channels // d; None means one head spanning
        all channels. (Careful when porting SD configs: diffusers' ``UNet2DConditionModel`` reuses
        this name for the number of heads.)
    norm_num_groups, norm_eps: GroupNorm groups and ε of every ResnetBlock, SelfAttention and the
        output norm.
    flip_sin_to_cos, freq_shift: the sinusoidal timestep features (see :func:`sdjax.nn.sinusoidal_embedding`).
    downsample_padding: 1 pads the stride-2 convolutions on all sides (diffusers' default); 0 pads
        only bottom/right, as the original DDPM checkpoints (google/ddpm-*) do.

    The remaining fields exist so a diffusers config reads across unchanged; only the values listed
    are implemented, others raise ValueError: center_input_sample=False, time_embedding_type=
    "positional", add_attention=True (the mid block always has its SelfAttention).
    """

    sample_size: int = 32
    in_channels: int = 3
    out_channels: int = 3
    block_out_channels: tuple[int, ...] = (64, 128, 256, 256)
    layers_per_block: int = 2
    down_block_types: tuple[str, ...] = ("DownBlock2D", "DownBlock2D", "AttnDownBlock2D", "DownBlock2D")
    up_block_types: tuple[str, ...] = ("UpBlock2D", "AttnUpBlock2D", "UpBlock2D", "UpBlock2D")
    attention_head_dim: int | None = 8
    norm_num_groups: int = 32
    norm_eps: float = 1e-5
    flip_sin_to_cos: bool = True
    freq_shift: float = 0.0
    downsample_padding: int = 1
    center_input_sample: bool = False
    time_embedding_type: str = "positional"
    add_attention: bool = True

    def __post_init__(self):
        levels = len(self.block_out_channels)
        if len(self.down_block_types) != levels or len(self.up_block_types) != levels:
            raise ValueError(
                f"block_out_channels, down_block_types and up_block_types need one entry per level; got "
                f"{levels}, {len(self.down_block_types)} and {len(self.up_block_types)}"
            )
        for kind, types, allowed in (
            ("down_block_types", self.down_block_types, DOWN_BLOCK_TYPES),
            ("up_block_types", self.up_block_types, UP_BLOCK_TYPES),
        ):
            bad = [t for t in types if t not in allowed]
            if bad:
                raise ValueError(f"{kind}: {bad} not supported; use {allowed}")
        bad = [c for c in self.block_out_channels if c % self.norm_num_groups]
        if bad:
            raise ValueError(
                f"norm_num_groups={self.norm_num_groups} must divide every block_out_channels entry; "
                f"{bad} are not multiples of it"
            )
        d = self.attention_head_dim
        attended = {self.block_out_channels[-1]}  # the mid block
        attended |= {c for c, t in zip(self.block_out_channels, self.down_block_types) if t.startswith("Attn")}
        attended |= {c for c, t in zip(self.block_out_channels[::-1], self.up_block_types) if t.startswith("Attn")}
        if d is not None and any(c % d for c in attended):
            raise ValueError(
                f"attention_head_dim={d} must divide the channels of every level with attention: {sorted(attended)}"
            )
        unsupported = {
            "downsample_padding": (self.downsample_padding, (0, 1)),
            "center_input_sample": (self.center_input_sample, (False,)),
            "time_embedding_type": (self.time_embedding_type, ("positional",)),
            "add_attention": (self.add_attention, (True,)),
        }
        for name, (value, allowed) in unsupported.items():
            if value not in allowed:
                raise ValueError(f"{name}={value!r} is not implemented in sdjax's UNet2D; supported: {allowed}")

    @property
    def time_embed_dim(self) -> int:
        """D_t, the width of the time embedding every ResnetBlock receives: 4 × block_out_channels[0]."""
        return 4 * self.block_out_channels[0]

    def heads(self, channels: int) -> int:
        """Attention heads at a level with ``channels`` channels (diffusers: channels // head_dim)."""
        return 1 if self.attention_head_dim is None else channels // self.attention_head_dim

    @property
    def downsample_factor(self) -> int:
        """2^(L−1): H and W must be multiples of it."""
        return 2 ** (len(self.block_out_channels) - 1)


class TimestepEmbedding(nnx.Module):
    """The time MLP: t_emb = W_2 · SiLU(W_1 · sinusoidal(t) + b_1) + b_2.   (B, D_in) → (B, D_t).

    The sinusoidal features are fixed; this learned map turns them into whatever per-step signal the
    ResnetBlocks find useful.
    """

    def __init__(self, in_dim: int, time_embed_dim: int, *, rngs: nnx.Rngs):
        self.linear_1 = nnx.Linear(in_dim, time_embed_dim, rngs=rngs)
        self.linear_2 = nnx.Linear(time_embed_dim, time_embed_dim, rngs=rngs)

    def __call__(self, x: Array) -> Array:
        return self.linear_2(jax.nn.silu(self.linear_1(x)))


class DownBlock(nnx.Module):
    """One encoder level: ``layers`` × (ResnetBlock [→ SelfAttention]), then an optional ×½ Downsample.

    diffusers' ``DownBlock2D`` (no attention) and ``AttnDownBlock2D``. Returns the output and the
    skip connections it pushes: every resnet(+attention) output and the downsampler's output.

    Shapes: x (B, H, W, C_in), t_emb (B, D_t) → (B, H', W', C_out) and ``layers`` (+1) skips,
    H' = H/2 with a downsampler, H otherwise.
    """

    def __init__(
        self,
        c_in: int,
        c_out: int,
        *,
        temb_dim: int,
        layers: int,
        attention: bool,
        downsample: bool,
        heads: int,
        groups: int,
        eps: float,
        asymmetric_pad: bool = False,
        rngs: nnx.Rngs,
    ):
        self.resnets = nnx.List(
            [
                ResnetBlock(c_in if j == 0 else c_out, c_out, temb_dim=temb_dim, groups=groups, eps=eps, rngs=rngs)
                for j in range(layers)
            ]
        )
        self.attentions = nnx.List(
            [SelfAttention(c_out, heads=heads, groups=groups, eps=eps, rngs=rngs) for _ in range(layers)]
            if attention
            else []
        )
        self.downsamplers = nnx.List(
            [Downsample(c_out, asymmetric_pad=asymmetric_pad, rngs=rngs)] if downsample else []
        )

    def __call__(self, x: Array, temb: Array) -> tuple[Array, tuple[Array, ...]]:
        skips = []
        for j, resnet in enumerate(self.resnets):
            x = resnet(x, temb)
            if self.attentions:
                x = self.attentions[j](x)
            skips.append(x)
        for down in self.downsamplers:
            x = down(x)
            skips.append(x)
        return x, tuple(skips)


class UpBlock(nnx.Module):
    """One decoder level: per resnet, pop a skip, concatenate it on channels, ResnetBlock
    [→ SelfAttention]; then an optional ×2 Upsample.

    diffusers' ``UpBlock2D`` and ``AttnUpBlock2D``. ``skip_channels[j]`` is the channel count of the
    skip resnet j consumes (the last ones pushed are consumed first), so resnet j maps
    (C_prev or C_out) + skip_channels[j] → C_out.

    Shapes: x (B, h, w, C_prev), skips (as pushed by the encoder), t_emb (B, D_t) → (B, h', w', C_out),
    h' = 2h with an upsampler, h otherwise.
    """

    def __init__(
        self,
        c_prev: int,
        c_out: int,
        *,
        skip_channels: tuple[int, ...],
        temb_dim: int,
        attention: bool,
        upsample: bool,
        heads: int,
        groups: int,
        eps: float,
        rngs: nnx.Rngs,
    ):
        self.resnets = nnx.List(
            [
                ResnetBlock(
                    (c_prev if j == 0 else c_out) + c_skip, c_out, temb_dim=temb_dim, groups=groups, eps=eps, rngs=rngs
                )
                for j, c_skip in enumerate(skip_channels)
            ]
        )
        self.attentions = nnx.List(
            [SelfAttention(c_out, heads=heads, groups=groups, eps=eps, rngs=rngs) for _ in skip_channels]
            if attention
            else []
        )
        self.upsamplers = nnx.List([Upsample(c_out, rngs=rngs)] if upsample else [])

    def __call__(self, x: Array, skips: list[Array], temb: Array) -> Array:
        """Consumes ``len(self.resnets)`` arrays from the end of ``skips`` (popped in place)."""
        for j, resnet in enumerate(self.resnets):
            x = resnet(jnp.concatenate([x, skips.pop()], axis=-1), temb)
            if self.attentions:
                x = self.attentions[j](x)
        for up in self.upsamplers:
            x = up(x)
        return x


class UNet2D(nnx.Module):
    """The pixel-space denoiser ε_θ(x_t, t) — diffusers' ``UNet2DModel``.

    Shapes: x (B, H, W, in_channels), t (B,) or a scalar → (B, H, W, out_channels);
    H and W must be multiples of ``cfg.downsample_factor``.
    """

    def __init__(self, cfg: UNetConfig, *, rngs: nnx.Rngs):
        self.config = cfg
        ch, g, eps = cfg.block_out_channels, cfg.norm_num_groups, cfg.norm_eps
        d_t, last = cfg.time_embed_dim, len(ch) - 1
        self.time_embedding = TimestepEmbedding(ch[0], d_t, rngs=rngs)
        self.conv_in = conv(cfg.in_channels, ch[0], 3, rngs)

        # Build the encoder while recording the channels of every skip it will push, so the decoder
        # can size each resnet's input: conv_in's output, each resnet's output, each downsampler's.
        skip_channels = [ch[0]]
        down_blocks = []
        for i, kind in enumerate(cfg.down_block_types):
            down_blocks.append(
                DownBlock(
                    ch[max(i - 1, 0)],
                    ch[i],
                    temb_dim=d_t,
                    layers=cfg.layers_per_block,
                    attention=kind == "AttnDownBlock2D",
                    downsample=i < last,
                    heads=cfg.heads(ch[i]),
                    groups=g,
                    eps=eps,
                    asymmetric_pad=cfg.downsample_padding == 0,
                    rngs=rngs,
                )
            )
            skip_channels += [ch[i]] * (cfg.layers_per_block + (i < last))
        self.down_blocks = nnx.List(down_blocks)

        self.mid_block = MidBlock(ch[-1], temb_dim=d_t, heads=cfg.heads(ch[-1]), groups=g, eps=eps, rngs=rngs)

        rev = ch[::-1]
        up_blocks = []
        for i, kind in enumerate(cfg.up_block_types):
            n = cfg.layers_per_block + 1
            skip_channels, popped = skip_channels[:-n], skip_channels[-n:]
            up_blocks.append(
                UpBlock(
                    rev[max(i - 1, 0)],
                    rev[i],
                    skip_channels=tuple(reversed(popped)),
                    temb_dim=d_t,
                    attention=kind == "AttnUpBlock2D",
                    upsample=i < last,
                    heads=cfg.heads(rev[i]),
                    groups=g,
                    eps=eps,
                    rngs=rngs,
                )
            )
        assert not skip_channels, "every skip connection is consumed exactly once"
        self.up_blocks = nnx.List(up_blocks)

        self.conv_norm_out = group_norm(ch[0], g, eps, rngs)
        self.conv_out = conv(ch[0], cfg.out_channels, 3, rngs)

    def time_proj(self, t: Array) -> Array:
        """Fixed sinusoidal features of the timesteps: (B,) → (B, block_out_channels[0])."""
        cfg = self.config
        return sinusoidal_embedding(
            t, cfg.block_out_channels[0], flip_sin_to_cos=cfg.flip_sin_to_cos, freq_shift=cfg.freq_shift
        )

    def __call__(self, x: Array, t: Array | float) -> Array:
        f = self.config.downsample_factor
        if x.shape[1] % f or x.shape[2] % f:
            raise ValueError(f"UNet2D: H×W = {x.shape[1]}×{x.shape[2]} must be multiples of 2^(L−1) = {f}")
        t = jnp.broadcast_to(jnp.asarray(t), (x.shape[0],))
        temb = self.time_embedding(self.time_proj(t))

        h = self.conv_in(x)
        skips = [h]
        for block in self.down_blocks:
            h, pushed = block(h, temb)
            skips.extend(pushed)
        h = self.mid_block(h, temb)
        for block in self.up_blocks:
            h = block(h, skips, temb)
        return self.conv_out(jax.nn.silu(self.conv_norm_out(h)))
