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
either model's diffusers ``config.json`` (:mod:`sdjax.models.unet_config`).

SDXL's UNet (``UNetConfig.sdxl()``) is the same skeleton again, with more transformer layers at the
lower levels, none at the highest, and one more input added to the time embedding: the pooled text
embedding and the image's size and crop numbers (``added_cond``, see :meth:`UNet2D.added_embedding`):

    t_emb = time_embedding(sinusoidal(t)) + add_embedding([text_embeds, sinusoidal(time_ids)])
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence

import jax
import jax.numpy as jnp
from flax import nnx

from sdjax.models.unet_config import UNetConfig
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


class TimestepEmbedding(nnx.Module):
    """The time MLP: t_emb = W_2 · SiLU(W_1 · sinusoidal(t) + b_1) + b_2.   (B, D_in) → (B, D_t).

    The sinusoidal features are fixed; this learned map turns them into whatever per-step signal the
    ResnetBlocks find useful. SDXL's ``add_embedding`` is a second one, whose input is the pooled text
    embedding and the size/crop features.
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


class UNetEncoder(nnx.Module):
    """The encoder half of a UNet: time embedding, conv_in, the down levels and the middle block — what
    :class:`UNet2D` and a ControlNet (:mod:`sdjax.models.controlnet`, a trainable copy of this half)
    share, built by the same code from the same :class:`UNetConfig`.

    :meth:`embed_time` gives the time embedding every block takes; :meth:`encode` runs the encoder and
    returns the middle block's output and the skip connections, in the order they were pushed.
    """

    def __init__(self, cfg: UNetConfig, *, rngs: nnx.Rngs):
        self.config = cfg
        ch, g, eps = cfg.block_out_channels, cfg.norm_num_groups, cfg.norm_eps
        d_t, last = cfg.time_embed_dim, len(ch) - 1
        self.time_embedding = TimestepEmbedding(ch[0], d_t, rngs=rngs)
        if cfg.addition_embed_type == "text_time":
            self.add_embedding = TimestepEmbedding(cfg.projection_class_embeddings_input_dim, d_t, rngs=rngs)
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
                    attention=self.attention(kind, i, rngs),
                    downsample=i < last,
                    groups=g,
                    eps=eps,
                    asymmetric_pad=cfg.downsample_padding == 0,
                    rngs=rngs,
                )
            )
            skip_channels += [ch[i]] * (cfg.layers_per_block + (i < last))
        self.down_blocks = nnx.List(down_blocks)
        self.skip_channels = tuple(skip_channels)  # of every skip connection, in the order pushed

        self.mid_block = MidBlock(
            ch[-1], attention=self.attention(cfg.mid_block_type, last, rngs), temb_dim=d_t, groups=g, eps=eps, rngs=rngs
        )
        # Rematerialisation for training (``jax.checkpoint``): each block's activations are recomputed in
        # the backward pass instead of kept from the forward one — memory for about a third more compute.
        self.remat = False

    def attention(self, kind: str, level: int, rngs: nnx.Rngs) -> Callable[[int], nnx.Module] | None:
        """What a level of this kind attends with: nothing, the image (Attn…), or the text (CrossAttn…)."""
        cfg, heads = self.config, self.config.heads(level)
        g, eps = cfg.norm_num_groups, cfg.norm_eps
        if kind.startswith("Attn") or kind == "UNetMidBlock2D":
            return lambda c: SelfAttention(c, heads=heads, groups=g, eps=eps, rngs=rngs)
        if "CrossAttn" in kind:
            return lambda c: Transformer2D(
                c,
                heads=heads,
                context_dim=cfg.cross_attention_dim,
                layers=cfg.transformer_layers(level),
                groups=g,
                linear_projection=cfg.use_linear_projection,
                upcast=cfg.upcast_attention,
                rngs=rngs,
            )
        return None

    def time_proj(self, t: Array) -> Array:
        """Fixed sinusoidal features of the timesteps: (B,) → (B, block_out_channels[0])."""
        cfg = self.config
        return sinusoidal_embedding(
            t, cfg.block_out_channels[0], flip_sin_to_cos=cfg.flip_sin_to_cos, freq_shift=cfg.freq_shift
        )

    def added_embedding(self, text_embeds: Array, time_ids: Array, dtype=jnp.float32) -> Array:
        """SDXL's added conditioning, diffusers' "text_time" ``add_embedding``: (B, D_pool), (B, n) → (B, D_t).

            features = sinusoidal(time_ids flattened, addition_time_embed_dim) reshaped (B, n · addition_time_embed_dim)
            aug_emb = add_embedding([text_embeds, features])      (concatenated in this order)

        text_embeds: the second text encoder's projected pooled output (SDXL: (B, 1280)); time_ids: per
        image, n numbers in pixels (SDXL: original_size + crop top-left + target_size, n = 6), each
        given the same kind of sinusoidal features as t. The MLP runs in ``dtype`` (the network's: diffusers
        casts its input to the time embedding's dtype).
        """
        cfg = self.config
        b, width = text_embeds.shape[0], cfg.projection_class_embeddings_input_dim
        if text_embeds.ndim != 2 or time_ids.ndim != 2 or time_ids.shape[0] != b:
            raise ValueError(
                f"added_cond: text_embeds must be (B, D_pool) and time_ids (B, n); got {tuple(text_embeds.shape)} "
                f"and {tuple(time_ids.shape)}"
            )
        if text_embeds.shape[1] + time_ids.shape[1] * cfg.addition_time_embed_dim != width:
            raise ValueError(
                f"added_cond: D_pool + n · {cfg.addition_time_embed_dim} must be projection_class_embeddings_input_dim"
                f" = {width}; got D_pool = {text_embeds.shape[1]}, n = {time_ids.shape[1]}"
            )
        features = sinusoidal_embedding(
            time_ids.reshape(-1),
            cfg.addition_time_embed_dim,
            flip_sin_to_cos=cfg.flip_sin_to_cos,
            freq_shift=cfg.freq_shift,
        ).reshape(b, -1)
        return self.add_embedding(
            jnp.concatenate([text_embeds.astype(features.dtype), features], axis=-1).astype(dtype)
        )

    def embed_time(
        self, x: Array, t: Array | float, context: Array | None, added_cond: Mapping[str, Array] | None
    ) -> Array:
        """Check the inputs against the config and return the time embedding t_emb (B, D_t) in x's dtype
        (with SDXL's added conditioning folded in)."""
        cfg = self.config
        if x.ndim != 4 or x.shape[-1] != cfg.in_channels:
            raise ValueError(f"{type(self).__name__}: x must be (B, H, W, {cfg.in_channels}), got {tuple(x.shape)}")
        if cfg.cross_attention_dim is None and context is not None:
            raise ValueError("this UNet2D is not text-conditioned (cross_attention_dim=None): call it without context")
        if cfg.cross_attention_dim is not None:
            if context is None or context.ndim != 3 or context.shape[-1] != cfg.cross_attention_dim:
                got = None if context is None else tuple(context.shape)
                raise ValueError(
                    f"this UNet2D is text-conditioned: pass context of shape (B, S, {cfg.cross_attention_dim}) "
                    f"(the text encoder's hidden states); got {got}"
                )
        text_time = cfg.addition_embed_type == "text_time"
        if text_time and (added_cond is None or set(added_cond) != {"text_embeds", "time_ids"}):
            got = None if added_cond is None else sorted(added_cond)
            raise ValueError(
                'this UNet2D has addition_embed_type="text_time" (SDXL): pass added_cond={"text_embeds": (B, D_pool), '
                f'"time_ids": (B, n)}}; got {got}'
            )
        if not text_time and added_cond is not None:
            raise ValueError(
                "this UNet2D has no added conditioning (addition_embed_type=None): call it without added_cond"
            )
        t = jnp.broadcast_to(jnp.asarray(t), (x.shape[0],))
        temb = self.time_embedding(self.time_proj(t).astype(x.dtype))  # a bf16 network stays bf16
        if text_time:
            temb = temb + self.added_embedding(added_cond["text_embeds"], added_cond["time_ids"], x.dtype)
        return temb

    def encode(self, x: Array, temb: Array, context: Array | None, cond: Array | None = None) -> tuple[Array, list]:
        """conv_in (plus ``cond``, a ControlNet's embedded condition image, same shape), the down levels,
        the middle block: (B, H, W, in_channels) → (middle output, the skips in the order pushed)."""
        h = self.conv_in(x)
        if cond is not None:
            h = h + cond
        skips = [h]
        for block in self.down_blocks:
            h, pushed = self._run(block, h, temb, context)
            skips.extend(pushed)
        return self._run(self.mid_block, h, temb, context), skips

    def _run(self, block: nnx.Module, *args, **static):
        """``block(*args, **static)``, under ``nnx.remat`` when :attr:`remat` is on (``static``: Python values,
        such as a size, that stay out of the traced arguments)."""
        if self.remat:
            return nnx.remat(lambda b, *a: b(*a, **static))(block, *args)
        return block(*args, **static)


class UNet2D(UNetEncoder):
    """The denoiser ε_θ(x_t, t[, c]): diffusers' ``UNet2DModel``, or with a ``cross_attention_dim``
    in its config Stable Diffusion's text-conditioned ``UNet2DConditionModel``.

    Shapes: x (B, H, W, in_channels), t (B,) or a scalar, context (B, S, cross_attention_dim) for a
    text-conditioned config → (B, H, W, out_channels), for any H and W: a level of odd size halves to
    ⌈H/2⌉, and the up path resizes to each skip connection's size (diffusers' ``upsample_size``), so
    SD's 8× latents of any multiple-of-8 image work (600×800 → 75×100).

    With ``addition_embed_type="text_time"`` (SDXL) the call also takes ``added_cond``, diffusers'
    ``added_cond_kwargs``: {"text_embeds": (B, D_pool), "time_ids": (B, n)} (:meth:`added_embedding`).
    With ``control`` (a ControlNet's output) its residuals are added to the skips and the middle output.
    """

    def __init__(self, cfg: UNetConfig, *, rngs: nnx.Rngs):
        super().__init__(cfg, rngs=rngs)
        ch, g, eps = cfg.block_out_channels, cfg.norm_num_groups, cfg.norm_eps
        d_t, last = cfg.time_embed_dim, len(ch) - 1
        skip_channels = list(self.skip_channels)
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
                    attention=self.attention(kind, last - i, rngs),
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

    def __call__(
        self,
        x: Array,
        t: Array | float,
        context: Array | None = None,
        added_cond: Mapping[str, Array] | None = None,
        control: tuple[Sequence[Array], Array] | None = None,
    ) -> Array:
        """x (B, H, W, in_channels), t (B,) or scalar, context (B, S, D_c) or None, added_cond (SDXL:
        {"text_embeds": (B, D_pool), "time_ids": (B, n)}) or None, control: (down residuals, one per skip,
        each of its skip's shape; mid residual) or None → ε̂ (B, H, W, out_channels)."""
        temb = self.embed_time(x, t, context, added_cond)
        h, skips = self.encode(x, temb, context)
        if control is not None:  # ControlNet: residuals added to what the encoder hands the decoder
            down, mid = control
            if len(down) != len(skips):
                raise ValueError(f"control: {len(down)} down residuals for this UNet's {len(skips)} skip connections")
            skips = [s + r.astype(s.dtype) for s, r in zip(skips, down)]
            h = h + mid.astype(h.dtype)
        return self.output(self.decode(h, skips, temb, context))

    def decode(self, h: Array, skips: list[Array], temb: Array, context: Array | None) -> Array:
        """The up levels: the middle output and the encoder's skips → features (B, H, W, block_out_channels[0])
        before the output head (a NestedUNet, :mod:`sdjax.models.nested_unet`, hands them to its outer levels)."""
        for block in self.up_blocks:
            n = len(block.resnets)  # the skips this block consumes, handed over as a list of its own
            skips, taken = skips[:-n], skips[-n:]
            size = skips[-1].shape[1:3] if skips else None  # where the upsampler must land: the next skip
            h = self._run(block, h, taken, temb, context, size=size)
        return h

    def output(self, h: Array) -> Array:
        """The output head: GroupNorm, SiLU, conv_out.   (B, H, W, block_out_channels[0]) → (B, H, W, out_channels)."""
        return self.conv_out(jax.nn.silu(self.conv_norm_out(h)))
