"""The shape of sdjax's UNet: :class:`UNetConfig`, diffusers' ``UNet2DModel`` / ``UNet2DConditionModel`` config.

A frozen dataclass with diffusers' field names, so a ``config.json`` reads across key for key
(:meth:`UNetConfig.from_diffusers`) and back (:meth:`UNetConfig.to_diffusers`); the published
configs are classmethods (:meth:`UNetConfig.sd15`, :meth:`UNetConfig.sd2`, :meth:`UNetConfig.sdxl`).
The network it shapes is :class:`sdjax.models.unet.UNet2D`.
"""

from __future__ import annotations

import dataclasses

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
ADDITION_EMBED_TYPES = (None, "text_time")
# diffusers config keys with no effect on inference.
_INFERENCE_IRRELEVANT = {"dropout", "num_train_timesteps", "addition_embed_type_num_heads"}


@dataclasses.dataclass(frozen=True)
class UNetConfig:
    """Shape of a :class:`sdjax.models.unet.UNet2D`; the field names and defaults are diffusers' ``UNet2DModel`` config.

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
        block put a :class:`sdjax.nn.Transformer2D` after each ResnetBlock.
    transformer_layers_per_block: BasicTransformerBlocks in each Transformer2D, one int for all levels
        (SD1/SD2: 1) or one per level, highest resolution first (SDXL: (1, 2, 10)); the mid block
        takes the last level's, and up blocks mirror the down blocks (:meth:`transformer_layers`).
    use_linear_projection: Transformer2D's proj_in/proj_out are Linear layers (SD2.x), not 1×1 convs (SD1.x).
    upcast_attention: attention in float32 under a bf16/fp16 network (SD2.1 needs it).

    Added conditioning (SDXL's "micro-conditioning", Podell et al. 2023, arXiv:2307.01952, §2.2):
    addition_embed_type: None, or "text_time": the UNet also takes the pooled, projected text
        embedding of the second text encoder (B, D_pool) and n size/crop numbers ``time_ids`` (B, n),
        SDXL's (original H, W, crop top, left, target H, W). Each number gets sinusoidal features of
        width addition_time_embed_dim (as t does, same flip_sin_to_cos and freq_shift); the
        concatenation [text_embeds, features] goes through an MLP like the time one (``add_embedding``)
        and is added to t_emb, so every ResnetBlock sees it.
    addition_time_embed_dim: the features' width per number (SDXL: 256).
    projection_class_embeddings_input_dim: the MLP's input width, D_pool + n · addition_time_embed_dim
        (SDXL: 1280 + 6 · 256 = 2816).

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
    transformer_layers_per_block: int | tuple[int, ...] = 1
    use_linear_projection: bool = False
    upcast_attention: bool = False
    addition_embed_type: str | None = None
    addition_time_embed_dim: int | None = None
    projection_class_embeddings_input_dim: int | None = None

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
    def sdxl(cls) -> UNetConfig:
        """Stable Diffusion XL base: 128×128×4 latents (1024² images), three levels, no attention at the
        highest resolution, 1/2/10 transformer layers per level (10 in the mid block), 64 channels per
        head, context = both text encoders' hidden states side by side (768 + 1280 = 2048), plus the
        "text_time" added conditioning; 2,567,463,684 parameters (stabilityai/stable-diffusion-xl-base-1.0)."""
        return cls(
            sample_size=128,
            in_channels=4,
            out_channels=4,
            block_out_channels=(320, 640, 1280),
            layers_per_block=2,
            down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
            up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
            mid_block_type="UNetMidBlock2DCrossAttn",
            attention_head_dim=None,
            num_attention_heads=(5, 10, 20),
            cross_attention_dim=2048,
            transformer_layers_per_block=(1, 2, 10),
            use_linear_projection=True,
            addition_embed_type="text_time",
            addition_time_embed_dim=256,
            projection_class_embeddings_input_dim=2816,
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
            kwargs["upcast_attention"] = bool(kwargs.get("upcast_attention"))  # SDXL's config.json stores null
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
            for k in ("addition_embed_type", "addition_time_embed_dim", "projection_class_embeddings_input_dim"):
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
        layers = self.transformer_layers_per_block
        per_level = layers if isinstance(layers, tuple) else (layers,) * levels
        if len(per_level) != levels or not all(isinstance(n, int) and n >= 1 for n in per_level):
            raise ValueError(
                f"transformer_layers_per_block must be one int ≥ 1 or one per level ({levels}); got {layers} "
                "(diffusers' per-layer nesting is not implemented)"
            )
        self._check_addition_embedding()
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

    def _check_addition_embedding(self):
        kind = self.addition_embed_type
        if kind not in ADDITION_EMBED_TYPES:
            raise ValueError(
                f"addition_embed_type={kind!r} is not implemented in sdjax's UNet2D; supported: {ADDITION_EMBED_TYPES}"
            )
        dims = (self.addition_time_embed_dim, self.projection_class_embeddings_input_dim)
        if kind == "text_time" and None in dims:
            raise ValueError(
                'addition_embed_type="text_time" needs addition_time_embed_dim and '
                f"projection_class_embeddings_input_dim (SDXL: 256 and 2816); got {dims}"
            )

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

    def transformer_layers(self, level: int) -> int:
        """BasicTransformerBlocks per Transformer2D at level ``level`` (0 = highest resolution; −1 = the mid block)."""
        layers = self.transformer_layers_per_block
        return layers[level] if isinstance(layers, tuple) else layers

    @property
    def downsample_factor(self) -> int:
        """2^(L−1), from the input to the lowest level (a size that is not a multiple of it is resized on the
        way up: :class:`sdjax.models.unet.UNet2D`)."""
        return 2 ** (len(self.block_out_channels) - 1)
