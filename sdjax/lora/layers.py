"""The LoRA layer (:class:`LoRALinear`) and the functions that put adapters into a model, scale, fuse
and take them out again (the idea: :mod:`sdjax.lora`)."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from sdjax.convert import torch_name
from sdjax.models.clip import CLIPTextModel

Array = jax.Array

# Target presets (sdjax module names; see LoRAConfig.targets).
UNET_ATTENTION = ("to_q", "to_k", "to_v", "to_out")
UNET_FEED_FORWARD = ("ff",)  # ff.geglu.proj and ff.proj_out (diffusers' ff.net.0.proj and ff.net.2)
TEXT_ATTENTION = ("q_proj", "k_proj", "v_proj", "out_proj")
TEXT_MLP = ("fc1", "fc2")
# LoCon: every layer of the UNet's ResNet blocks (3×3 conv1/conv2, the 1×1 conv_shortcut, time_emb_proj) and of its
# down/upsamplers (3×3), as LyCORIS and kohya's LoCon adapt them
UNET_CONVS = ("resnets", "downsamplers", "upsamplers")

# What diffusers' save_lora_weights names its file in a folder, and what it looks for there.
TEXT_PREFIX = "text_model."  # transformers' CLIPTextModel wrapper level, which LoRA files name


@dataclasses.dataclass(frozen=True)
class LoRAConfig:
    """What :func:`add_lora` injects.

    rank: r, the inner width of the update A B.
    alpha: α; the update is scaled by α / r (None: α = r, scale 1).
    dropout: probability p of zeroing an input of the A B branch (only in training mode: call
        ``module.train()`` to turn it on, ``module.eval()`` off; the frozen path never drops).
    targets: which layers to adapt. A target matches every ``nnx.Linear`` (or ``nnx.Conv``: LoCon) whose
        sdjax path contains it as whole dot-separated segments: "to_q" matches ``...attn1.to_q``,
        "attn2" the four projections of every cross-attention, "ff" both feed-forward layers. The
        default adapts the attention projections of both SD's UNet (to_q, to_k, to_v, to_out) and its
        CLIP text encoder (q_proj, k_proj, v_proj, out_proj), so one config serves both; add
        :data:`UNET_FEED_FORWARD` or :data:`TEXT_MLP` for the feed-forward layers, :data:`UNET_CONVS` for
        the ResNet blocks' 3×3 convolutions and the down/upsamplers (LoCon).
    """

    rank: int = 4
    alpha: float | None = None
    dropout: float = 0.0
    targets: tuple[str, ...] = UNET_ATTENTION + TEXT_ATTENTION

    def __post_init__(self):
        if not (isinstance(self.rank, int) and self.rank >= 1):
            raise ValueError(f"LoRAConfig: rank must be a positive int, got {self.rank!r}")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"LoRAConfig: dropout must be in [0, 1), got {self.dropout}")
        if isinstance(self.targets, str) or not self.targets:
            raise ValueError(f"LoRAConfig: targets must be a non-empty tuple of names, got {self.targets!r}")


class LoRAParam(nnx.Param):
    """A LoRA factor (A or B): a parameter, trained while the base ``nnx.Param``s stay frozen."""


class LoRAScale(nnx.Variable):
    """An adapter's strength s or its α: array state, not a parameter (never trained, and changing it
    never recompiles a jitted model)."""


BASE = nnx.All(nnx.Param, nnx.Not(LoRAParam))  # filter: the frozen base parameters, without the adapters


def _is_pointwise_conv(layer) -> bool:
    """A 1×1, stride-1, unpadded, ungrouped convolution: a linear map of each pixel's channels."""
    return (
        _is_plain_conv(layer)
        and tuple(layer.kernel_size) == (1, 1)
        and layer.strides in (1, (1, 1))
        and layer.padding in ("VALID", ((0, 0), (0, 0)))
        and layer.kernel_dilation in (1, (1, 1))
    )


def _is_plain_conv(layer) -> bool:
    """A 2-D, ungrouped, unmasked convolution with zero padding (every convolution of SD's UNet): what
    LoCon adapts, whatever its kernel size, stride or padding."""
    return (
        isinstance(layer, nnx.Conv)
        and layer.kernel.ndim == 4
        and layer.feature_group_count == 1
        and layer.mask is None
        and layer.input_dilation in (1, (1, 1))
        and (not isinstance(layer.padding, str) or layer.padding in ("SAME", "VALID"))
    )


def _adaptable(layer) -> bool:
    return (isinstance(layer, nnx.Linear) and layer.kernel.ndim == 2) or _is_plain_conv(layer)


def _pairs(value, n: int = 2) -> tuple:
    """nnx.Conv's int-or-sequence arguments as a tuple of n."""
    return (value,) * n if isinstance(value, int) else tuple(value)


def _hashable(value):
    """Lists in nnx.Conv's arguments as tuples (a module's static attributes must be hashable)."""
    return tuple(map(_hashable, value)) if isinstance(value, (list, tuple)) else value


def conv2d(x: Array, kernel: Array, conv_args: tuple) -> Array:
    """The convolution an ``nnx.Conv`` with ``conv_args`` = (kernel_size, strides, padding, kernel_dilation)
    computes, with another kernel (kh, kw, in, out). Shapes: x (B, H, W, in) → (B, H', W', out)."""
    _, strides, padding, dilation = conv_args
    if not isinstance(padding, str):
        padding = tuple((p, p) if isinstance(p, int) else tuple(p) for p in _pairs(padding))
    return jax.lax.conv_general_dilated(
        x, kernel, _pairs(strides), padding, rhs_dilation=_pairs(dilation), dimension_numbers=("NHWC", "HWIO", "NHWC")
    )


class Adapter(nnx.Module):
    """What every adapter shares: the frozen layer's ``kernel`` W and ``bias`` b, kept under their own
    names; α and the strength s as array state (:class:`LoRAScale`); fusing ΔW into W and back.

    Subclasses define ``rank``, :meth:`delta` (s · ΔW in the kernel's layout) and ``__call__``.
    :class:`LoRALinear` is one; LoHa and LoKr (:mod:`sdjax.lora.lycoris`) are the others. W is
    (in, out) for an ``nnx.Linear``, (kh, kw, in, out) for an ``nnx.Conv``.
    """

    def __init__(self, base: nnx.Linear | nnx.Conv, *, alpha: float, scale: float):
        if not _adaptable(base):
            raise TypeError(
                f"{type(self).__name__} adapts an nnx.Linear or an ungrouped 2-D nnx.Conv, not {type(base).__name__}"
            )
        self.kernel, self.bias = base.kernel, base.bias
        conv = isinstance(base, nnx.Conv)
        # nnx.Conv's own (kernel_size, strides, padding, kernel_dilation), kept to rebuild it; None: a Linear
        args = (base.kernel_size, base.strides, base.padding, base.kernel_dilation) if conv else None
        self.conv_args = _hashable(args)
        self.pointwise_conv = conv and _is_pointwise_conv(base)
        self.lora_alpha = LoRAScale(jnp.float32(alpha))
        self.lora_scale = LoRAScale(jnp.float32(scale))
        self.fused_scale: float | None = None  # the s fused into the kernel, None while not fused

    @property
    def rank(self) -> int:
        raise NotImplementedError

    @property
    def alpha(self) -> float:
        return float(self.lora_alpha[...])

    @property
    def spatial_conv(self) -> bool:
        """A convolution other than 1×1/stride 1/unpadded (LoCon's territory)."""
        return self.conv_args is not None and not self.pointwise_conv

    def delta(self, scale: float | Array) -> Array:
        """s · ΔW, in the kernel's layout and dtype."""
        raise NotImplementedError

    def base_forward(self, x: Array, kernel: Array) -> Array:
        """The wrapped layer's computation with ``kernel`` in place of W (and its bias)."""
        if self.spatial_conv:
            y = conv2d(x, kernel, self.conv_args)
        else:
            y = x @ kernel.reshape(kernel.shape[-2:])
        return y if self.bias is None else y + self.bias[...]

    def fuse(self) -> None:
        """W ← W + s · ΔW at the current s; the adapter then costs nothing at inference."""
        if self.fused_scale is not None:
            raise ValueError("this LoRA adapter is already fused; unfuse it first")
        scale = float(self.lora_scale[...])
        self.kernel.set_value(self.kernel[...] + self.delta(scale))
        self.fused_scale = scale

    def unfuse(self) -> None:
        """W ← W − s · ΔW with the s that was fused: the base W back, up to rounding."""
        if self.fused_scale is None:
            raise ValueError("this LoRA adapter is not fused")
        self.kernel.set_value(self.kernel[...] - self.delta(self.fused_scale))
        self.fused_scale = None

    def base_layer(self) -> nnx.Linear | nnx.Conv:
        """The plain layer this adapter wraps, holding the same kernel and bias variables (a fused
        update stays in the kernel)."""
        d_in, d_out = self.kernel.shape[-2:]
        bias = self.bias is not None
        if self.conv_args is not None:  # as it was built (sdjax.nn.conv)
            size, strides, padding, dilation = self.conv_args
            make = lambda: nnx.Conv(
                d_in, d_out, size, strides, padding=padding, kernel_dilation=dilation, use_bias=bias, rngs=nnx.Rngs(0)
            )
        else:
            make = lambda: nnx.Linear(d_in, d_out, use_bias=bias, rngs=nnx.Rngs(0))
        layer = nnx.eval_shape(make)  # no random init: its variables are replaced right away
        layer.kernel = self.kernel
        if self.bias is not None:
            layer.bias = self.bias
        return layer


class LoRALinear(Adapter):
    """A frozen linear layer or convolution plus a low-rank update:   y = x W + b + s · (α / r) · (dropout(x) A) B.

    Built from the ``nnx.Linear`` or ``nnx.Conv`` it replaces, whose ``kernel`` and ``bias``
    variables it keeps, under the same names. A (in, r) ~ U(−1/√in, 1/√in) (what peft and kohya
    draw: PyTorch's default Linear init), B (r, out) = 0, so a new adapter computes the base layer;
    ``rngs=None`` leaves A at zero too, for factors about to be loaded. s and α are array state
    (:class:`LoRAScale`), so neither a new strength nor another LoRA's α recompiles a jitted model.
    While fused (:meth:`fuse`), W already holds the update and the branch is skipped.

    LoCon: on a kh × kw convolution, "x A" is a convolution of x with A (kh, kw, in, r) with the base
    layer's stride and padding (A is held flat, (kh·kw·in, r), fan-in kh·kw·in), then B (r, out) is a
    1×1 convolution: ΔW = A B reshaped to (kh, kw, in, out). A 1×1 convolution is a plain matrix product.

    Shapes: x (..., in) → (..., out); a convolution's kernel is (kh, kw, in, out), its x (B, H, W, in).
    """

    def __init__(
        self,
        base: nnx.Linear | nnx.Conv,
        *,
        rank: int,
        alpha: float | None = None,
        dropout: float = 0.0,
        scale: float = 1.0,
        rngs: nnx.Rngs | None,
    ):
        super().__init__(base, alpha=rank if alpha is None else alpha, scale=scale)
        if dropout > 0 and rngs is None:
            raise ValueError("LoRALinear: dropout draws random masks; pass rngs")
        fan_in, d_out = int(np.prod(self.kernel.shape[:-1])), self.kernel.shape[-1]
        dtype, bound = self.kernel.dtype, 1.0 / np.sqrt(fan_in)
        if rngs is None:
            a = jnp.zeros((fan_in, rank), dtype)
        else:
            a = jax.random.uniform(rngs.params(), (fan_in, rank), dtype, -bound, bound)
        self.lora_A = LoRAParam(a)
        self.lora_B = LoRAParam(jnp.zeros((rank, d_out), dtype))
        self.dropout = nnx.Dropout(dropout, deterministic=True, rngs=rngs) if dropout > 0 else None

    @property
    def rank(self) -> int:
        return self.lora_A.shape[1]

    def delta(self, scale: float | Array) -> Array:
        """The update the adapter adds to W at strength s: s · (α / r) · A B, in the kernel's layout."""
        c = jnp.asarray(scale, jnp.float32) * self.lora_alpha[...] / self.rank
        update = c * (self.lora_A[...] @ self.lora_B[...])
        return update.reshape(self.kernel.shape).astype(self.kernel.dtype)

    def __call__(self, x: Array) -> Array:
        y = self.base_forward(x, self.kernel[...])
        if self.fused_scale is None:
            h = x if self.dropout is None else self.dropout(x)
            c = self.lora_scale[...] * self.lora_alpha[...] / self.rank  # s · α / r, applied on the r-wide side
            a = self.lora_A[...]
            if self.spatial_conv:
                h = conv2d(h, a.reshape(*self.kernel.shape[:-1], self.rank), self.conv_args)
            else:
                h = h @ a
            h = h * c.astype(h.dtype)
            y = y + (h @ self.lora_B[...]).astype(y.dtype)
        return y


# ---------------------------------------------------------------------------------------------------
# Adding, scaling, fusing and removing adapters
# ---------------------------------------------------------------------------------------------------


def file_prefix(module: nnx.Module) -> str:
    """LoRA files name CLIP's layers under transformers' ``text_model.`` level; sdjax's CLIPTextModel has none."""
    return TEXT_PREFIX if isinstance(module, CLIPTextModel) else ""


def adaptable_layers(module: nnx.Module) -> dict[str, tuple[tuple, nnx.Module]]:
    """{diffusers/transformers module name: (sdjax path, layer)} for every layer LoRA can adapt, adapted or not."""
    prefix, out = file_prefix(module), {}
    for path, layer in nnx.iter_modules(module):
        if isinstance(layer, Adapter) or _adaptable(layer):
            sdjax_path = ".".join(map(str, path))
            out[prefix + torch_name(f"{sdjax_path}.kernel").removesuffix(".weight")] = (path, layer)
    return out


def lora_layers(module: nnx.Module) -> dict[str, Adapter]:
    """The adapters of ``module`` (LoRA/LoCon, LoHa, LoKr), by diffusers/transformers module name (the names LoRA
    files use)."""
    return {name: layer for name, (_, layer) in adaptable_layers(module).items() if isinstance(layer, Adapter)}


def lora_params(module: nnx.Module) -> nnx.State:
    """The adapters' A and B: what fine-tuning trains (``nnx.state(module, LoRAParam)``)."""
    return nnx.state(module, LoRAParam)


def replace_layer(module: nnx.Module, path: tuple, layer: nnx.Module) -> None:
    parent = module
    for key in path[:-1]:
        parent = parent[key] if isinstance(key, int) else getattr(parent, key)
    if isinstance(path[-1], int):
        parent[path[-1]] = layer
    else:
        setattr(parent, path[-1], layer)


def _matches(path: tuple, target: str) -> bool:
    """Whether ``target``'s dot-separated segments occur as a contiguous run in ``path``."""
    want, have = target.split("."), [str(k) for k in path]
    return any(have[i : i + len(want)] == want for i in range(len(have) - len(want) + 1))


def add_lora(module: nnx.Module, config: LoRAConfig | None = None, *, rngs: nnx.Rngs) -> list[str]:
    """Wrap every layer of ``module`` that ``config.targets`` names in a fresh :class:`LoRALinear`, in place
    (``config`` None: ``LoRAConfig()``).

    Returns the adapted layers' diffusers/transformers names (``down_blocks.0.attentions.0.
    transformer_blocks.0.attn1.to_q`` ..., ``text_model.encoder.layers.0.self_attn.q_proj`` ...). The
    model computes exactly what it did before (B = 0) until the adapters are trained or loaded.
    """
    config = config or LoRAConfig()
    layers = adaptable_layers(module)
    chosen = {n: (p, m) for n, (p, m) in layers.items() if any(_matches(p, t) for t in config.targets)}
    if not chosen:
        examples = [".".join(map(str, p)) for p, _ in list(layers.values())[:6]]
        raise ValueError(
            f"add_lora: no layer of this {type(module).__name__} matches targets {config.targets}; "
            f"its adaptable layers have sdjax paths like {examples}"
        )
    taken = [n for n, (_, m) in chosen.items() if isinstance(m, Adapter)]
    if taken:
        raise ValueError(f"add_lora: {len(taken)} layers already have adapters ({taken[:3]} ...); remove_lora first")
    for path, layer in chosen.values():
        replace_layer(
            module, path, LoRALinear(layer, rank=config.rank, alpha=config.alpha, dropout=config.dropout, rngs=rngs)
        )
    return list(chosen)


def adapters_of(module: nnx.Module, what: str) -> dict[str, Adapter]:
    adapters = lora_layers(module)
    if not adapters:
        raise ValueError(f"{what}: this {type(module).__name__} has no LoRA adapters (add_lora or load_lora first)")
    return adapters


def set_lora_scale(module: nnx.Module, scale: float) -> None:
    """Set the strength s of every adapter in ``module``. s lives in array state, so a jitted function
    that takes the module's state sees the new value without recompiling."""
    adapters = adapters_of(module, "set_lora_scale")
    fused = [n for n, layer in adapters.items() if layer.fused_scale is not None]
    if fused:
        raise ValueError(f"set_lora_scale: {len(fused)} adapters are fused ({fused[0]} ...); unfuse_lora first")
    for layer in adapters.values():
        layer.lora_scale.set_value(jnp.float32(scale))


def fuse_lora(module: nnx.Module) -> list[str]:
    """Merge every adapter into its kernel, W ← W + s · ΔW (LoRA: ΔW = (α / r) · A B): the model then runs at the
    base model's cost. Returns the fused layers' names. :func:`unfuse_lora` undoes it."""
    adapters = adapters_of(module, "fuse_lora")
    fused = [n for n, layer in adapters.items() if layer.fused_scale is not None]
    if fused:
        raise ValueError(f"fuse_lora: {len(fused)} adapters are already fused ({fused[0]} ...); unfuse_lora first")
    for layer in adapters.values():
        layer.fuse()
    return list(adapters)


def unfuse_lora(module: nnx.Module) -> list[str]:
    """Take the fused updates back out of the kernels (the base weights, up to float rounding)."""
    fused = {n: layer for n, layer in adapters_of(module, "unfuse_lora").items() if layer.fused_scale is not None}
    if not fused:
        raise ValueError("unfuse_lora: no adapter of this module is fused")
    for layer in fused.values():
        layer.unfuse()
    return list(fused)


def remove_lora(module: nnx.Module) -> list[str]:
    """Put the plain layers back in place of the adapters; returns the names of the layers restored.

    A fused adapter's update stays in its kernel (how a LoRA is baked into a model for good); call
    :func:`unfuse_lora` first to get the base weights back.
    """
    removed = []
    for name, (path, layer) in adaptable_layers(module).items():
        if isinstance(layer, Adapter):
            replace_layer(module, path, layer.base_layer())
            removed.append(name)
    return removed
