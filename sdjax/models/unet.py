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
Stable Diffusion's ``UNet2DConditionModel`` is the same skeleton, conditioned on text as well as t:
its attention levels hold a :class:`sdjax.nn.Transformer2D` in place of the SelfAttention, whose
cross-attention lets every pixel read the prompt's CLIP encoding (Rombach et al. 2022, §3.3):

    ε_θ(z_t, t, c):   c = CLIP(prompt) (B, 77, D_c) ─ into every Transformer2D as keys and values

The same classes build both; a config with ``cross_attention_dim`` set and "CrossAttn…" block types
(``UNetConfig.sd15()``, ``UNetConfig.sd2()``) is SD's UNet, and ``UNetConfig.from_diffusers`` reads
either model's diffusers ``config.json``.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import jax
import jax.numpy as jnp
from flax import nnx

from sdjax.nn import (
    Downsample,
    MidBlock,
    ResnetBlock,
    SelfAttention,
    Transformer2D,
    Upsample,
    conv,
    group_norm,
    sinusoidal_embedding,
)

Array = jax.Array

DOWN_BLOCK_TYPES = ("DownBlock2D", "AttnDownBlock2D", "CrossAttnDownBlock2D")
UP_BLOCK_TYPES = ("UpBlock2D", "AttnUpBlock2D", "CrossAttnUpBlock2D")
MID_BLOCK_TYPES = ("UNetMidBlock2D", "UNetMidBlock2DCrossAttn")

# diffusers config options sdjax does not implement, and the values (the defaults) they must have.
_MUST_BE = {
    "only_cross_attention": (False,),
    "dual_cross_attention": (False,),
    "mid_block_only_cross_attention": (None, False),
    "mid_block_scale_factor": (1,),
    "act_fn": ("silu",),
    "resnet_time_scale_shift": ("default",),
    "resnet_skip_time_act": (False,),
    "resnet_out_scale_factor": (1,),
    "class_embed_type": (None,),
    "num_class_embeds": (None,),
    "class_embeddings_concat": (False,),
    "addition_embed_type": (None,),
    "addition_time_embed_dim": (None,),
    "projection_class_embeddings_input_dim": (None,),
    "encoder_hid_dim": (None,),
    "encoder_hid_dim_type": (None,),
    "time_embedding_dim": (None,),
    "time_embedding_act_fn": (None,),
    "timestep_post_act": (None,),
    "time_cond_proj_dim": (None,),
    "conv_in_kernel": (3,),
    "conv_out_kernel": (3,),
    "attention_type": ("default",),
    "cross_attention_norm": (None,),
    "reverse_transformer_layers_per_block": (None,),
    "downsample_type": ("conv",),
    "upsample_type": ("conv",),
    "attn_norm_num_groups": (None,),
}
# diffusers config keys with no effect on inference.
_INFERENCE_IRRELEVANT = {"dropout", "num_train_timesteps", "addition_embed_type_num_heads"}


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
        this name for the number of heads; :meth:`from_diffusers` translates.)
    num_attention_heads: heads per level (one int for all, or one per level), overriding
        attention_head_dim: SD1.x has 8 heads everywhere, SD2.x 5/10/20/20 (64 channels per head).
    norm_num_groups, norm_eps: GroupNorm groups and ε of every ResnetBlock, SelfAttention and the
        output norm.
    flip_sin_to_cos, freq_shift: the sinusoidal timestep features (see :func:`sdjax.nn.sinusoidal_embedding`).
    downsample_padding: 1 pads the stride-2 convolutions on all sides (diffusers' default); 0 pads
        only bottom/right, as the original DDPM checkpoints (google/ddpm-*) do.

    Text conditioning (SD's ``UNet2DConditionModel``):
    cross_attention_dim: D_c, the width of the text encoding; None for an unconditional UNet.
        "CrossAttnDownBlock2D"/"CrossAttnUpBlock2D" levels and the "UNetMidBlock2DCrossAttn" mid
        block put a :class:`Transformer2D` after each ResnetBlock.
    transformer_layers_per_block: BasicTransformerBlocks in each Transformer2D (SD: 1).
    use_linear_projection: Transformer2D's proj_in/proj_out are Linear layers (SD2.x), not 1×1 convs (SD1.x).
    upcast_attention: attention in float32 under a bf16/fp16 network (SD2.1 needs it).

    The remaining fields exist so a diffusers config reads across unchanged; only the values listed
    are implemented, others raise ValueError: center_input_sample=False, time_embedding_type=
    "positional", add_attention=True (the mid block always has its attention).
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
    num_attention_heads: int | tuple[int, ...] | None = None
    mid_block_type: str = "UNetMidBlock2D"
    cross_attention_dim: int | None = None
    transformer_layers_per_block: int = 1
    use_linear_projection: bool = False
    upcast_attention: bool = False

    @classmethod
    def sd15(cls) -> UNetConfig:
        """Stable Diffusion 1.x's UNet: 64×64×4 latents, CLIP ViT-L/14 context (768), 8 heads; 860 M parameters."""
        return cls(
            sample_size=64,
            in_channels=4,
            out_channels=4,
            block_out_channels=(320, 640, 1280, 1280),
            layers_per_block=2,
            down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
            up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3,
            mid_block_type="UNetMidBlock2DCrossAttn",
            attention_head_dim=None,
            num_attention_heads=8,
            cross_attention_dim=768,
        )

    @classmethod
    def sd2(cls) -> UNetConfig:
        """Stable Diffusion 2.x (768-v): OpenCLIP ViT-H context (1024), 64 channels per head, linear
        projections in the transformers; 865 M parameters. (SD2.1 also sets upcast_attention.)"""
        return dataclasses.replace(
            cls.sd15(),
            sample_size=96,
            num_attention_heads=(5, 10, 20, 20),
            cross_attention_dim=1024,
            use_linear_projection=True,
        )

    @classmethod
    def from_diffusers(cls, config: dict) -> UNetConfig:
        """The config of a diffusers ``UNet2DModel`` or ``UNet2DConditionModel`` (its ``config.json``).

        Options sdjax does not implement must have their default values; anything else is a
        ValueError naming them, rather than a network that silently computes something else.
        """
        fields = {f.name for f in dataclasses.fields(cls)}
        conditional = config.get("_class_name") == "UNet2DConditionModel" or "cross_attention_dim" in config
        kwargs, unsupported, unknown = {}, [], []
        for key, value in config.items():
            if key.startswith("_") or key in _INFERENCE_IRRELEVANT:
                continue
            if key in _MUST_BE:
                if value not in _MUST_BE[key]:
                    unsupported.append(f"{key}={value!r}")
            elif key in fields:
                kwargs[key] = tuple(value) if isinstance(value, list) else value
            else:
                unknown.append(key)
        if unsupported or unknown:
            raise ValueError(
                "this diffusers UNet config uses options sdjax's UNet2D does not implement: "
                + ", ".join(unsupported + [f"{k} (unknown key)" for k in unknown])
            )
        if conditional:
            # UNet2DConditionModel's legacy naming: "attention_head_dim" there is the number of heads.
            heads = kwargs.pop("num_attention_heads", None) or kwargs.pop("attention_head_dim", 8)
            kwargs |= {"num_attention_heads": heads, "attention_head_dim": None}
            kwargs.setdefault("cross_attention_dim", 1280)  # diffusers' default
            kwargs.setdefault("mid_block_type", "UNetMidBlock2DCrossAttn")
        if kwargs.get("mid_block_type") is None:
            kwargs.pop("mid_block_type", None)
        return cls(**kwargs)

    def to_diffusers(self) -> dict:
        """This config as a diffusers ``config.json`` (``UNet2DConditionModel`` when text-conditioned)."""
        out = {k: list(v) if isinstance(v, tuple) else v for k, v in dataclasses.asdict(self).items()}
        if self.cross_attention_dim is None:
            for k in ("num_attention_heads", "cross_attention_dim", "transformer_layers_per_block"):
                out.pop(k)
            for k in ("use_linear_projection", "upcast_attention"):
                out.pop(k)
            return {"_class_name": "UNet2DModel", **out}
        # UNet2DConditionModel's legacy naming: heads go in "attention_head_dim".
        out["attention_head_dim"] = out.pop("num_attention_heads")
        for k in ("time_embedding_type", "add_attention"):
            out.pop(k)
        return {"_class_name": "UNet2DConditionModel", **out}

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
            ("mid_block_type", (self.mid_block_type,), MID_BLOCK_TYPES),
        ):
            bad = [t for t in types if t not in allowed]
            if bad:
                raise ValueError(f"{kind}: {bad} not supported; use {allowed}")
        cross = [t for t in (*self.down_block_types, *self.up_block_types, self.mid_block_type) if "CrossAttn" in t]
        if cross and self.cross_attention_dim is None:
            raise ValueError(
                f"{sorted(set(cross))} attend to text: set cross_attention_dim (768 for SD1.x, 1024 for SD2.x)"
            )
        if self.cross_attention_dim is not None and not cross:
            raise ValueError("cross_attention_dim is set but no block cross-attends; use CrossAttn… block types")
        heads = self.num_attention_heads
        if isinstance(heads, tuple) and len(heads) != levels:
            raise ValueError(f"num_attention_heads needs one entry per level ({levels}); got {heads}")
        if not isinstance(self.transformer_layers_per_block, int):
            raise ValueError("transformer_layers_per_block: only one int for all levels is implemented")
        bad = [c for c in self.block_out_channels if c % self.norm_num_groups]
        if bad:
            raise ValueError(
                f"norm_num_groups={self.norm_num_groups} must divide every block_out_channels entry; "
                f"{bad} are not multiples of it"
            )
        last = levels - 1
        attended = {last}  # the mid block
        attended |= {i for i, t in enumerate(self.down_block_types) if "Attn" in t}
        attended |= {last - i for i, t in enumerate(self.up_block_types) if "Attn" in t}
        channels = sorted({self.block_out_channels[i] for i in attended})
        d = self.attention_head_dim
        if heads is None and d is not None and any(c % d for c in channels):
            raise ValueError(
                f"attention_head_dim={d} must divide the channels of every level with attention: {channels}"
            )
        if heads is not None and any(self.block_out_channels[i] % self.heads(i) for i in attended):
            raise ValueError(f"num_attention_heads={heads} must divide the channels of every level with attention")
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

    def heads(self, level: int) -> int:
        """Attention heads at level ``level`` (0 = highest resolution; −1 = the mid block)."""
        heads, channels = self.num_attention_heads, self.block_out_channels[level]
        if heads is not None:
            return heads[level] if isinstance(heads, tuple) else heads
        if self.attention_head_dim is None:
            return 1
        return max(channels // self.attention_head_dim, 1)

    @property
    def downsample_factor(self) -> int:
        """2^(L−1), from the input to the lowest level (a size that is not a multiple of it is resized on the
        way up: :class:`UNet2D`)."""
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


def _attend(attn: nnx.Module, x: Array, context: Array | None) -> Array:
    """Apply a level's attention: SelfAttention takes the image only, Transformer2D also the text."""
    return attn(x) if context is None else attn(x, context)


class DownBlock(nnx.Module):
    """One encoder level: ``layers`` × (ResnetBlock [→ attention]), then an optional ×½ Downsample.

    diffusers' ``DownBlock2D`` (no attention), ``AttnDownBlock2D`` (SelfAttention) and
    ``CrossAttnDownBlock2D`` (Transformer2D): ``attention`` builds the attention for a width, or is
    None. Returns the output and the skip connections it pushes: every resnet(+attention) output and
    the downsampler's output.

    Shapes: x (B, H, W, C_in), t_emb (B, D_t), context (B, S, D_c) or None → (B, H', W', C_out) and
    ``layers`` (+1) skips, H' = H/2 with a downsampler, H otherwise.
    """

    def __init__(
        self,
        c_in: int,
        c_out: int,
        *,
        temb_dim: int,
        layers: int,
        attention: Callable[[int], nnx.Module] | None,
        downsample: bool,
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
        self.attentions = nnx.List([attention(c_out) for _ in range(layers)] if attention else [])
        self.downsamplers = nnx.List(
            [Downsample(c_out, asymmetric_pad=asymmetric_pad, rngs=rngs)] if downsample else []
        )

    def __call__(self, x: Array, temb: Array, context: Array | None = None) -> tuple[Array, tuple[Array, ...]]:
        skips = []
        for j, resnet in enumerate(self.resnets):
            x = resnet(x, temb)
            if self.attentions:
                x = _attend(self.attentions[j], x, context)
            skips.append(x)
        for down in self.downsamplers:
            x = down(x)
            skips.append(x)
        return x, tuple(skips)


class UpBlock(nnx.Module):
    """One decoder level: per resnet, pop a skip, concatenate it on channels, ResnetBlock
    [→ attention]; then an optional ×2 Upsample.

    diffusers' ``UpBlock2D``, ``AttnUpBlock2D`` and ``CrossAttnUpBlock2D``. ``skip_channels[j]`` is
    the channel count of the skip resnet j consumes (the last ones pushed are consumed first), so
    resnet j maps (C_prev or C_out) + skip_channels[j] → C_out.

    Shapes: x (B, h, w, C_prev), skips (as pushed by the encoder), t_emb (B, D_t), context (B, S, D_c)
    or None → (B, h', w', C_out), h' = 2h with an upsampler, h otherwise.
    """

    def __init__(
        self,
        c_prev: int,
        c_out: int,
        *,
        skip_channels: tuple[int, ...],
        temb_dim: int,
        attention: Callable[[int], nnx.Module] | None,
        upsample: bool,
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
        self.attentions = nnx.List([attention(c_out) for _ in skip_channels] if attention else [])
        self.upsamplers = nnx.List([Upsample(c_out, rngs=rngs)] if upsample else [])

    def __call__(
        self, x: Array, skips: list[Array], temb: Array, context: Array | None = None, size: tuple | None = None
    ) -> Array:
        """Consumes ``len(self.resnets)`` arrays from the end of ``skips`` (popped in place); ``size`` = (H', W'),
        the next level's skip size, which the upsampler meets (2h, 2w unless the encoder halved an odd size)."""
        for j, resnet in enumerate(self.resnets):
            x = resnet(jnp.concatenate([x, skips.pop()], axis=-1), temb)
            if self.attentions:
                x = _attend(self.attentions[j], x, context)
        for up in self.upsamplers:
            x = up(x, size)
        return x


class UNet2D(nnx.Module):
    """The denoiser ε_θ(x_t, t[, c]): diffusers' ``UNet2DModel``, or with a ``cross_attention_dim``
    in its config Stable Diffusion's text-conditioned ``UNet2DConditionModel``.

    Shapes: x (B, H, W, in_channels), t (B,) or a scalar, context (B, S, cross_attention_dim) for a
    text-conditioned config → (B, H, W, out_channels), for any H and W: a level of odd size halves to
    ⌈H/2⌉, and the up path resizes to each skip connection's size (diffusers' ``upsample_size``), so
    SD's 8× latents of any multiple-of-8 image work (600×800 → 75×100).
    """

    def __init__(self, cfg: UNetConfig, *, rngs: nnx.Rngs):
        self.config = cfg
        ch, g, eps = cfg.block_out_channels, cfg.norm_num_groups, cfg.norm_eps
        d_t, last = cfg.time_embed_dim, len(ch) - 1
        self.time_embedding = TimestepEmbedding(ch[0], d_t, rngs=rngs)
        self.conv_in = conv(cfg.in_channels, ch[0], 3, rngs)

        def attention(kind: str, level: int) -> Callable[[int], nnx.Module] | None:
            """What a level of this kind attends with: nothing, the image (Attn…), or the text (CrossAttn…)."""
            heads = cfg.heads(level)
            if kind.startswith("Attn") or kind == "UNetMidBlock2D":
                return lambda c: SelfAttention(c, heads=heads, groups=g, eps=eps, rngs=rngs)
            if "CrossAttn" in kind:
                return lambda c: Transformer2D(
                    c,
                    heads=heads,
                    context_dim=cfg.cross_attention_dim,
                    layers=cfg.transformer_layers_per_block,
                    groups=g,
                    linear_projection=cfg.use_linear_projection,
                    upcast=cfg.upcast_attention,
                    rngs=rngs,
                )
            return None

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
                    attention=attention(kind, i),
                    downsample=i < last,
                    groups=g,
                    eps=eps,
                    asymmetric_pad=cfg.downsample_padding == 0,
                    rngs=rngs,
                )
            )
            skip_channels += [ch[i]] * (cfg.layers_per_block + (i < last))
        self.down_blocks = nnx.List(down_blocks)

        self.mid_block = MidBlock(
            ch[-1], attention=attention(cfg.mid_block_type, last), temb_dim=d_t, groups=g, eps=eps, rngs=rngs
        )

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
                    attention=attention(kind, last - i),
                    upsample=i < last,
                    groups=g,
                    eps=eps,
                    rngs=rngs,
                )
            )
        assert not skip_channels, "every skip connection is consumed exactly once"
        self.up_blocks = nnx.List(up_blocks)

        self.conv_norm_out = group_norm(ch[0], g, eps, rngs)
        self.conv_out = conv(ch[0], cfg.out_channels, 3, rngs)
        # Rematerialisation for training (``jax.checkpoint``): each block's activations are recomputed in
        # the backward pass instead of kept from the forward one — memory for about a third more compute.
        self.remat = False

    def time_proj(self, t: Array) -> Array:
        """Fixed sinusoidal features of the timesteps: (B,) → (B, block_out_channels[0])."""
        cfg = self.config
        return sinusoidal_embedding(
            t, cfg.block_out_channels[0], flip_sin_to_cos=cfg.flip_sin_to_cos, freq_shift=cfg.freq_shift
        )

    def __call__(self, x: Array, t: Array | float, context: Array | None = None) -> Array:
        cfg = self.config
        if x.ndim != 4 or x.shape[-1] != cfg.in_channels:
            raise ValueError(f"UNet2D: x must be (B, H, W, {cfg.in_channels}), got {tuple(x.shape)}")
        if cfg.cross_attention_dim is None and context is not None:
            raise ValueError("this UNet2D is not text-conditioned (cross_attention_dim=None): call it without context")
        if cfg.cross_attention_dim is not None:
            if context is None or context.ndim != 3 or context.shape[-1] != cfg.cross_attention_dim:
                got = None if context is None else tuple(context.shape)
                raise ValueError(
                    f"this UNet2D is text-conditioned: pass context of shape (B, S, {cfg.cross_attention_dim}) "
                    f"(the text encoder's hidden states); got {got}"
                )
        t = jnp.broadcast_to(jnp.asarray(t), (x.shape[0],))
        temb = self.time_embedding(self.time_proj(t).astype(x.dtype))  # a bf16 network stays bf16

        h = self.conv_in(x)
        skips = [h]
        for block in self.down_blocks:
            h, pushed = self._run(block, h, temb, context)
            skips.extend(pushed)
        h = self._run(self.mid_block, h, temb, context)
        for block in self.up_blocks:
            n = len(block.resnets)  # the skips this block consumes, handed over as a list of its own
            skips, taken = skips[:-n], skips[-n:]
            size = skips[-1].shape[1:3] if skips else None  # where the upsampler must land: the next skip
            h = self._run(block, h, taken, temb, context, size=size)
        return self.conv_out(jax.nn.silu(self.conv_norm_out(h)))

    def _run(self, block: nnx.Module, *args, **static):
        """``block(*args, **static)``, under ``nnx.remat`` when :attr:`remat` is on (``static``: Python values,
        such as a size, that stay out of the traced arguments)."""
        if self.remat:
            return nnx.remat(lambda b, *a: b(*a, **static))(block, *args)
        return block(*args, **static)
