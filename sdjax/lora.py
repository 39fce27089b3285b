"""LoRA: low-rank adapters for fine-tuning and for loading the LoRA files people share.

Fine-tuning all 860 M weights of SD's UNet to teach it one subject or style is costly, and the result
is a whole new checkpoint. LoRA (Hu et al. 2021, arXiv:2106.09685) freezes every weight W (in, out)
and learns a low-rank update beside it, in the layers that matter most (the attention projections):

    y = x W + b + s · (α / r) · (dropout(x) A) B          A (in, r), B (r, out), r ≪ min(in, out)

A starts random, B at zero, so a new adapter leaves the model exactly as it was; training moves
only A and B: r (in + out) numbers per layer instead of in · out (≈ 0.1–1 % of the UNet at r = 4–16),
and the file that holds them is megabytes, not gigabytes. α / r fixes the update's scale when r
changes (the same α works at any rank); the strength s scales the whole update when the adapter is
used (s = 0: the base model; s = 1: as trained; in between: a milder effect).

Using it::

    names = add_lora(unet, LoRAConfig(rank=8), rngs=nnx.Rngs(0))   # inject (returns diffusers names)
    graphdef, lora, frozen = nnx.split(unet, LoRAParam, ...)        # train `lora` only (or wrt=LoRAParam)
    save_lora("me.safetensors", unet)                               # diffusers format; format="kohya" too
    load_lora("someone.safetensors", unet, text_encoder, scale=0.8) # files from diffusers, kohya, A1111
    set_lora_scale(unet, 0.5)                                       # no recompilation: s is array state
    fuse_lora(unet); unfuse_lora(unet)                              # W ← W ± s·(α/r)·A B

:class:`LoRALinear` keeps the base layer's own ``kernel`` and ``bias`` variables under the same names,
so the frozen weights keep their paths (``...attn1.to_q.kernel``) and ``nnx.state(model, BASE)`` is the
base model's parameter tree, whatever adapters it carries. A and B are :class:`LoRAParam`, a subclass
of ``nnx.Param``: ``LoRAParam`` selects the adapters and :data:`BASE` everything else. (So a model with
adapters has more parameters than its checkpoint layout: to write it as a plain checkpoint with
:mod:`sdjax.convert`, bake the LoRA in with ``fuse_lora`` then ``remove_lora``, or drop it with ``remove_lora``.)

Files. Two layouts are in circulation, naming each adapted layer by its diffusers/transformers module
path (which sdjax shares, up to :func:`sdjax.convert.torch_name`):

* diffusers / peft (``pipeline.save_lora_weights``): ``unet.<module>.lora_A.weight`` (r, in) and
  ``.lora_B.weight`` (out, r); ``text_encoder.text_model.<module>...`` for CLIP. α is not a tensor: it
  is in the safetensors header (``lora_adapter_metadata``: peft's LoraConfig, ``unet.lora_alpha``,
  ``unet.alpha_pattern`` ...); older files have none, and then α = r (scale 1), as diffusers reads them.
* kohya / AUTOMATIC1111 (sd-scripts): ``lora_unet_<module with . → _>.lora_down.weight`` (r, in),
  ``.lora_up.weight`` (out, r) and ``.alpha`` (a scalar; absent or 0 means α = r, as sd-scripts reads
  it); ``lora_te_text_model_encoder_layers_0_self_attn_q_proj...`` for CLIP.

SD1's Transformer2D ``proj_in``/``proj_out`` are 1×1 convolutions, and kohya's LoRAs adapt them too,
with (r, in, 1, 1) tensors: a 1×1 convolution is a linear map of each pixel's channels, so
:class:`LoRALinear` adapts those as well. Larger kernels (LoCon / LyCORIS) are not supported.
"""

from __future__ import annotations

import collections
import dataclasses
import json
import os
import re
import warnings
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from safetensors import safe_open
from safetensors.numpy import save_file

from sdjax.convert import _listing, read_state_dict, torch_name
from sdjax.models.clip import CLIPTextModel

Array = jax.Array

# Target presets (sdjax module names; see LoRAConfig.targets).
UNET_ATTENTION = ("to_q", "to_k", "to_v", "to_out")
UNET_FEED_FORWARD = ("ff",)  # ff.geglu.proj and ff.proj_out (diffusers' ff.net.0.proj and ff.net.2)
TEXT_ATTENTION = ("q_proj", "k_proj", "v_proj", "out_proj")
TEXT_MLP = ("fc1", "fc2")

# What diffusers' save_lora_weights names its file in a folder, and what it looks for there.
LORA_WEIGHT_FILES = ("pytorch_lora_weights.safetensors", "pytorch_lora_weights.bin")
METADATA_KEY = "lora_adapter_metadata"  # diffusers' safetensors header entry: peft's LoraConfig, per part
PARTS = ("unet", "text_encoder")
KOHYA_PREFIXES = {"unet": "lora_unet_", "text_encoder": "lora_te_"}
TEXT_PREFIX = "text_model."  # transformers' CLIPTextModel wrapper level, which LoRA files name


@dataclasses.dataclass(frozen=True)
class LoRAConfig:
    """What :func:`add_lora` injects.

    rank: r, the inner width of the update A B.
    alpha: α; the update is scaled by α / r (None: α = r, scale 1).
    dropout: probability p of zeroing an input of the A B branch (only in training mode: call
        ``module.train()`` to turn it on, ``module.eval()`` off; the frozen path never drops).
    targets: which layers to adapt. A target matches every ``nnx.Linear`` (or 1×1 ``nnx.Conv``) whose
        sdjax path contains it as whole dot-separated segments: "to_q" matches ``...attn1.to_q``,
        "attn2" the four projections of every cross-attention, "ff" both feed-forward layers. The
        default adapts the attention projections of both SD's UNet (to_q, to_k, to_v, to_out) and its
        CLIP text encoder (q_proj, k_proj, v_proj, out_proj), so one config serves both; add
        :data:`UNET_FEED_FORWARD` or :data:`TEXT_MLP` for the feed-forward layers.
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
        isinstance(layer, nnx.Conv)
        and tuple(layer.kernel_size) == (1, 1)
        and layer.strides in (1, (1, 1))
        and layer.padding in ("VALID", ((0, 0), (0, 0)))
        and layer.feature_group_count == 1
        and layer.input_dilation in (1, (1, 1))
        and layer.kernel_dilation in (1, (1, 1))
    )


def _adaptable(layer) -> bool:
    return (isinstance(layer, nnx.Linear) and layer.kernel.ndim == 2) or _is_pointwise_conv(layer)


class LoRALinear(nnx.Module):
    """A frozen linear layer plus a low-rank update:   y = x W + b + s · (α / r) · (dropout(x) A) B.

    Built from the ``nnx.Linear`` (or 1×1 ``nnx.Conv``) it replaces, whose ``kernel`` and ``bias``
    variables it keeps, under the same names. A (in, r) ~ U(−1/√in, 1/√in) (what peft and kohya
    draw: PyTorch's default Linear init), B (r, out) = 0, so a new adapter computes the base layer;
    ``rngs=None`` leaves A at zero too, for factors about to be loaded. s and α are array state
    (:class:`LoRAScale`), so neither a new strength nor another LoRA's α recompiles a jitted model.
    While fused (:meth:`fuse`), W already holds the update and the branch is skipped.

    Shapes: x (..., in) → (..., out); a 1×1 convolution's kernel is (1, 1, in, out), its x (B, H, W, in).
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
        if not _adaptable(base):
            raise TypeError(f"LoRALinear adapts an nnx.Linear or a 1×1 nnx.Conv, not {type(base).__name__}")
        if dropout > 0 and rngs is None:
            raise ValueError("LoRALinear: dropout draws random masks; pass rngs")
        self.kernel, self.bias = base.kernel, base.bias
        self.pointwise_conv = isinstance(base, nnx.Conv)  # remembered to give the layer back (remove_lora)
        d_in, d_out = self.kernel.shape[-2:]
        dtype, bound = self.kernel.dtype, 1.0 / np.sqrt(d_in)
        if rngs is None:
            a = jnp.zeros((d_in, rank), dtype)
        else:
            a = jax.random.uniform(rngs.params(), (d_in, rank), dtype, -bound, bound)
        self.lora_A = LoRAParam(a)
        self.lora_B = LoRAParam(jnp.zeros((rank, d_out), dtype))
        self.lora_alpha = LoRAScale(jnp.float32(rank if alpha is None else alpha))
        self.lora_scale = LoRAScale(jnp.float32(scale))
        self.dropout = nnx.Dropout(dropout, deterministic=True, rngs=rngs) if dropout > 0 else None
        self.fused_scale: float | None = None  # the s fused into the kernel, None while not fused

    @property
    def rank(self) -> int:
        return self.lora_A.shape[1]

    @property
    def alpha(self) -> float:
        return float(self.lora_alpha[...])

    def delta(self, scale: float | Array) -> Array:
        """The update the adapter adds to W at strength s: s · (α / r) · A B, in the kernel's layout."""
        c = jnp.asarray(scale, jnp.float32) * self.lora_alpha[...] / self.rank
        update = c * (self.lora_A[...] @ self.lora_B[...])
        return update.reshape(self.kernel.shape).astype(self.kernel.dtype)

    def __call__(self, x: Array) -> Array:
        w = self.kernel[...]
        y = x @ w.reshape(w.shape[-2:])
        if self.bias is not None:
            y = y + self.bias[...]
        if self.fused_scale is None:
            h = x if self.dropout is None else self.dropout(x)
            c = self.lora_scale[...] * self.lora_alpha[...] / self.rank  # s · α / r, applied on the r-wide side
            h = (h @ self.lora_A[...]) * c.astype(h.dtype)
            y = y + (h @ self.lora_B[...]).astype(y.dtype)
        return y

    def fuse(self) -> None:
        """W ← W + s · (α / r) · A B at the current s; the branch then costs nothing at inference."""
        if self.fused_scale is not None:
            raise ValueError("this LoRA adapter is already fused; unfuse it first")
        scale = float(self.lora_scale[...])
        self.kernel.set_value(self.kernel[...] + self.delta(scale))
        self.fused_scale = scale

    def unfuse(self) -> None:
        """W ← W − s · (α / r) · A B with the s that was fused: the base W back, up to rounding."""
        if self.fused_scale is None:
            raise ValueError("this LoRA adapter is not fused")
        self.kernel.set_value(self.kernel[...] - self.delta(self.fused_scale))
        self.fused_scale = None

    def base_layer(self) -> nnx.Linear | nnx.Conv:
        """The plain layer this adapter wraps, holding the same kernel and bias variables (a fused
        update stays in the kernel)."""
        d_in, d_out = self.kernel.shape[-2:]
        bias = self.bias is not None
        if self.pointwise_conv:  # as sdjax.nn.conv builds it
            make = lambda: nnx.Conv(d_in, d_out, (1, 1), padding=((0, 0), (0, 0)), use_bias=bias, rngs=nnx.Rngs(0))
        else:
            make = lambda: nnx.Linear(d_in, d_out, use_bias=bias, rngs=nnx.Rngs(0))
        layer = nnx.eval_shape(make)  # no random init: its variables are replaced right away
        layer.kernel = self.kernel
        if self.bias is not None:
            layer.bias = self.bias
        return layer


# ---------------------------------------------------------------------------------------------------
# Adding, scaling, fusing and removing adapters
# ---------------------------------------------------------------------------------------------------


def _name_prefix(module: nnx.Module) -> str:
    """LoRA files name CLIP's layers under transformers' ``text_model.`` level; sdjax's CLIPTextModel has none."""
    return TEXT_PREFIX if isinstance(module, CLIPTextModel) else ""


def _layers(module: nnx.Module) -> dict[str, tuple[tuple, nnx.Module]]:
    """{diffusers/transformers module name: (sdjax path, layer)} for every layer LoRA can adapt, adapted or not."""
    prefix, out = _name_prefix(module), {}
    for path, layer in nnx.iter_modules(module):
        if isinstance(layer, LoRALinear) or _adaptable(layer):
            sdjax_path = ".".join(map(str, path))
            out[prefix + torch_name(f"{sdjax_path}.kernel").removesuffix(".weight")] = (path, layer)
    return out


def lora_layers(module: nnx.Module) -> dict[str, LoRALinear]:
    """The adapters of ``module``, by diffusers/transformers module name (the names LoRA files use)."""
    return {name: layer for name, (_, layer) in _layers(module).items() if isinstance(layer, LoRALinear)}


def lora_params(module: nnx.Module) -> nnx.State:
    """The adapters' A and B: what fine-tuning trains (``nnx.state(module, LoRAParam)``)."""
    return nnx.state(module, LoRAParam)


def _replace(module: nnx.Module, path: tuple, layer: nnx.Module) -> None:
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
    layers = _layers(module)
    chosen = {n: (p, m) for n, (p, m) in layers.items() if any(_matches(p, t) for t in config.targets)}
    if not chosen:
        examples = [".".join(map(str, p)) for p, _ in list(layers.values())[:6]]
        raise ValueError(
            f"add_lora: no layer of this {type(module).__name__} matches targets {config.targets}; "
            f"its adaptable layers have sdjax paths like {examples}"
        )
    taken = [n for n, (_, m) in chosen.items() if isinstance(m, LoRALinear)]
    if taken:
        raise ValueError(f"add_lora: {len(taken)} layers already have adapters ({taken[:3]} ...); remove_lora first")
    for path, layer in chosen.values():
        _replace(
            module, path, LoRALinear(layer, rank=config.rank, alpha=config.alpha, dropout=config.dropout, rngs=rngs)
        )
    return list(chosen)


def _adapters(module: nnx.Module, what: str) -> dict[str, LoRALinear]:
    adapters = lora_layers(module)
    if not adapters:
        raise ValueError(f"{what}: this {type(module).__name__} has no LoRA adapters (add_lora or load_lora first)")
    return adapters


def set_lora_scale(module: nnx.Module, scale: float) -> None:
    """Set the strength s of every adapter in ``module``. s lives in array state, so a jitted function
    that takes the module's state sees the new value without recompiling."""
    adapters = _adapters(module, "set_lora_scale")
    fused = [n for n, layer in adapters.items() if layer.fused_scale is not None]
    if fused:
        raise ValueError(f"set_lora_scale: {len(fused)} adapters are fused ({fused[0]} ...); unfuse_lora first")
    for layer in adapters.values():
        layer.lora_scale.set_value(jnp.float32(scale))


def fuse_lora(module: nnx.Module) -> list[str]:
    """Merge every adapter into its kernel, W ← W + s · (α / r) · A B: the model then runs at the
    base model's cost. Returns the fused layers' names. :func:`unfuse_lora` undoes it."""
    adapters = _adapters(module, "fuse_lora")
    fused = [n for n, layer in adapters.items() if layer.fused_scale is not None]
    if fused:
        raise ValueError(f"fuse_lora: {len(fused)} adapters are already fused ({fused[0]} ...); unfuse_lora first")
    for layer in adapters.values():
        layer.fuse()
    return list(adapters)


def unfuse_lora(module: nnx.Module) -> list[str]:
    """Take the fused updates back out of the kernels (the base weights, up to float rounding)."""
    fused = {n: layer for n, layer in _adapters(module, "unfuse_lora").items() if layer.fused_scale is not None}
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
    for name, (path, layer) in _layers(module).items():
        if isinstance(layer, LoRALinear):
            _replace(module, path, layer.base_layer())
            removed.append(name)
    return removed


# ---------------------------------------------------------------------------------------------------
# LoRA files
# ---------------------------------------------------------------------------------------------------


def _to_torch(layer: LoRALinear) -> tuple[np.ndarray, np.ndarray]:
    """(down, up) = (Aᵀ (r, in), Bᵀ (out, r)) as float32; (r, in, 1, 1) and (out, r, 1, 1) for a 1×1 conv,
    as PyTorch's Conv2d LoRA layers hold them."""
    down, up = (np.asarray(p[...], np.float32).T for p in (layer.lora_A, layer.lora_B))
    if layer.pointwise_conv:
        down, up = down[:, :, None, None], up[:, :, None, None]
    return np.ascontiguousarray(down), np.ascontiguousarray(up)


def _peft_config(adapters: dict[str, LoRALinear], name_prefix: str) -> dict:
    """peft LoraConfig fields that rebuild these adapters: the most common r and α, with patterns for the rest.

    Module names drop CLIP's ``text_model.`` level: peft matches them as suffixes, which then works whether
    the transformers model in diffusers has that level (transformers 4) or not (5).
    """
    names = {n: n.removeprefix(name_prefix) for n in adapters}
    ranks = {names[n]: layer.rank for n, layer in adapters.items()}
    alphas = {names[n]: layer.alpha for n, layer in adapters.items()}
    r = collections.Counter(ranks.values()).most_common(1)[0][0]
    alpha = collections.Counter(alphas.values()).most_common(1)[0][0]
    return {
        "r": r,
        "lora_alpha": alpha,
        "target_modules": sorted(names.values()),
        "rank_pattern": {n: v for n, v in ranks.items() if v != r},
        "alpha_pattern": {n: v for n, v in alphas.items() if v != alpha},
    }


def save_lora(
    path: str | os.PathLike,
    unet: nnx.Module | None = None,
    text_encoder: nnx.Module | None = None,
    *,
    format: str = "diffusers",
) -> Path:
    """Write the adapters of ``unet`` and/or ``text_encoder`` as a LoRA file; returns its path.

    ``format``: "diffusers" (what ``pipeline.load_lora_weights`` and peft read; r and α per layer go in
    the header as peft's LoraConfig) or "kohya" (sd-scripts / AUTOMATIC1111 / ComfyUI; α per layer as
    ``.alpha`` tensors). A ``.safetensors`` path is the file; any other path is a folder that gets
    ``pytorch_lora_weights.safetensors``, the name diffusers looks for. Tensors are float32; the
    strength s is not saved (it is chosen when loading).
    """
    if format not in ("diffusers", "kohya"):
        raise ValueError(f"save_lora: format={format!r}; choose 'diffusers' or 'kohya'")
    path = Path(path)
    if path.suffix != ".safetensors":
        path = path / LORA_WEIGHT_FILES[0]
    tensors, metadata = {}, {"format": "pt"}
    peft_configs = {}
    for part, module in zip(PARTS, (unet, text_encoder)):
        if module is None:
            continue
        adapters = _adapters(module, f"save_lora ({part})")
        for name, layer in adapters.items():
            down, up = _to_torch(layer)
            if format == "diffusers":
                tensors[f"{part}.{name}.lora_A.weight"], tensors[f"{part}.{name}.lora_B.weight"] = down, up
            else:
                key = KOHYA_PREFIXES[part] + name.replace(".", "_")
                tensors[f"{key}.lora_down.weight"], tensors[f"{key}.lora_up.weight"] = down, up
                tensors[f"{key}.alpha"] = np.array(layer.alpha, np.float32)  # a 0-d tensor, as sd-scripts writes
        peft_configs |= {f"{part}.{k}": v for k, v in _peft_config(adapters, _name_prefix(module)).items()}
    if not tensors:
        raise ValueError("save_lora: pass unet= and/or text_encoder= (the modules whose adapters to save)")
    if format == "diffusers":
        metadata[METADATA_KEY] = json.dumps(peft_configs, sort_keys=True)
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(path), metadata=metadata)
    return path


@dataclasses.dataclass
class _Adapter:
    """One layer's LoRA as a file holds it: down (r, in), up (out, r), α (None: not in the file)."""

    down: np.ndarray | None = None
    up: np.ndarray | None = None
    alpha: float | None = None
    keys: list[str] = dataclasses.field(default_factory=list)


def _lora_file(path: Path) -> Path:
    if path.is_dir():
        for name in LORA_WEIGHT_FILES:
            if (path / name).is_file():
                return path / name
        found = sorted(p.name for p in path.iterdir())
        raise FileNotFoundError(
            f"{path} is a folder without {' or '.join(LORA_WEIGHT_FILES)} (found {found}); pass the LoRA file itself"
        )
    if not path.is_file():
        raise FileNotFoundError(f"no such LoRA file: {path}")
    return path


def _header(path: Path) -> dict:
    if path.suffix != ".safetensors":
        return {}
    with safe_open(str(path), framework="numpy") as f:
        return f.metadata() or {}


def _peft_alpha(config: dict, name: str) -> float | None:
    """α of module ``name`` under a peft LoraConfig dict: its alpha_pattern entry (keys are regexes
    matched against the end of the name, as peft does), else lora_alpha; None without a config."""
    for key, alpha in (config.get("alpha_pattern") or {}).items():
        if re.fullmatch(rf"(.*\.)?({key})", name):
            return float(alpha)
    return None if config.get("lora_alpha") is None else float(config["lora_alpha"])


def _parse_diffusers(state: dict[str, np.ndarray], header: dict) -> tuple[dict, list[str]]:
    """{(part, module name): _Adapter} of a diffusers/peft file, and its keys sdjax cannot use."""
    configs = json.loads(header.get(METADATA_KEY) or "{}")
    adapters, unsupported = collections.defaultdict(_Adapter), []
    for key, value in state.items():
        part, _, rest = key.partition(".")
        name, _, leaf = rest.rpartition(".lora_")
        if part not in PARTS or leaf not in ("A.weight", "B.weight"):
            unsupported.append(key)
            continue
        if part == "text_encoder" and not name.startswith(TEXT_PREFIX):
            name = TEXT_PREFIX + name  # files written with transformers 5 lack CLIP's text_model. level
        adapter = adapters[part, name]
        adapter.keys.append(key)
        if leaf == "A.weight":
            adapter.down = value
        else:
            adapter.up = value
    for part in PARTS:
        config = {k.removeprefix(f"{part}."): v for k, v in configs.items() if k.startswith(f"{part}.")}
        flags = [f for f in ("use_dora", "use_rslora", "lora_bias") if config.get(f)]
        if flags:
            raise ValueError(
                f"this LoRA's {part} was trained with peft's {', '.join(flags)}, which changes the update's form; "
                "sdjax loads plain LoRA only"
            )
        for (p, name), adapter in adapters.items():
            if p == part:
                adapter.alpha = _peft_alpha(config, name.removeprefix(TEXT_PREFIX))
    return dict(adapters), unsupported


def _parse_kohya(state: dict[str, np.ndarray], names: dict[str, dict[str, str]]) -> tuple[dict, list[str]]:
    """{(part, module name): _Adapter} of a kohya file, and its keys sdjax cannot use. ``names`` maps
    each part's kohya layer names (module name with . → _) back to module names; a layer the model
    lacks keeps its kohya name (reported by the caller)."""
    adapters, unsupported = collections.defaultdict(_Adapter), []
    for key, value in state.items():
        layer, _, leaf = key.partition(".")
        part = next((p for p, prefix in KOHYA_PREFIXES.items() if layer.startswith(prefix)), None)
        if part is None or leaf not in ("lora_down.weight", "lora_up.weight", "alpha"):
            unsupported.append(key)
            continue
        adapter = adapters[part, names[part].get(layer, layer)]
        adapter.keys.append(key)
        if leaf == "alpha":
            adapter.alpha = value.item() or None  # sd-scripts reads α = 0 as α = r
        elif leaf == "lora_down.weight":
            adapter.down = value
        else:
            adapter.up = value
    return dict(adapters), unsupported


def _unsupported_message(keys: list[str]) -> str:
    kinds = {
        "LyCORIS (LoHa/LoKr/...)": [k for k in keys if re.search(r"\.(hada_|lokr_|lora_mid\.)", k)],
        "DoRA": [k for k in keys if "dora_scale" in k or "lora_magnitude_vector" in k],
        "SDXL (a second text encoder)": [
            k for k in keys if k.startswith(("lora_te1_", "lora_te2_", "text_encoder_2."))
        ],
    }
    found = [f"{kind}: {_listing(ks, 2)}" for kind, ks in kinds.items() if ks]
    other = sorted(set(keys) - {k for ks in kinds.values() for k in ks})
    if other:
        found.append(f"unrecognised: {_listing(other, 3)}")
    return f"{len(keys)} tensors of a kind sdjax does not load ({'; '.join(found)}); sdjax loads plain LoRA only"


def _check(adapters: dict, layers: dict[str, dict[str, tuple]]) -> list[str]:
    """Every problem that stops ``adapters`` from loading into ``layers``, as messages naming the keys."""
    conv, unknown, broken, rank, shape = [], [], [], [], []
    for (part, name), a in adapters.items():
        key, factors = a.keys[0], [w for w in (a.down, a.up) if w is not None]
        if any(w.ndim == 4 and w.shape[2:] != (1, 1) for w in factors):
            conv.append(f"{key} {factors[0].shape}")
        elif name not in layers[part]:
            unknown.append(key)
        elif len(factors) < 2 or any(w.ndim not in (2, 4) for w in factors):
            broken.append(f"{key} {[w.shape for w in factors]}")
        else:
            (r, d_in), (d_out, r_up) = a.down.shape[:2], a.up.shape[:2]
            layer_shape = tuple(layers[part][name][1].kernel.shape[-2:])
            if r != r_up:
                rank.append(f"{key}: down {a.down.shape} has rank {r}, up {a.up.shape} has {r_up}")
            elif (d_in, d_out) != layer_shape:
                shape.append(
                    f"{key}: the LoRA maps {d_in} → {d_out} features, the layer {layer_shape[0]} → {layer_shape[1]}"
                )
    other_model = "the LoRA was made for another model (e.g. SDXL, or SD2 on SD1); use one made for this architecture"
    problems = []
    if unknown:
        problems.append(
            f"{len(unknown)} LoRA layers name modules this model does not have ({_listing(unknown)}): {other_model}"
        )
    if shape:
        problems.append(
            f"{len(shape)} LoRA layers do not fit their layer's shape ({_listing(shape, 2)}): {other_model}"
        )
    if conv:
        problems.append(
            f"{len(conv)} convolution LoRA layers (LoCon/LyCORIS, kernels larger than 1×1: {_listing(conv, 2)}) "
            "are not supported; sdjax loads LoRA of linear and 1×1 layers only"
        )
    if rank:
        problems.append(f"{len(rank)} LoRA layers whose down and up ranks differ ({_listing(rank, 2)}): a corrupt file")
    if broken:
        problems.append(
            f"{len(broken)} LoRA layers lack their down or up tensor, or have no matrix shape ({_listing(broken)})"
        )
    return problems


def load_lora(
    path: str | os.PathLike,
    unet: nnx.Module,
    text_encoder: nnx.Module | None = None,
    *,
    scale: float = 1.0,
) -> dict:
    """Load a LoRA file (diffusers/peft or kohya/A1111 layout, told apart by its keys) into ``unet``
    and ``text_encoder``, in place, at strength ``scale``.

    Adapters are added where missing (or rebuilt where the rank differs) and filled; adapters the
    modules had on layers the file does not name are removed, so the modules then hold exactly this
    LoRA. ``path``: a ``.safetensors`` (or pickled ``.bin``) file, or a folder holding
    ``pytorch_lora_weights.safetensors``. Nothing changes unless the whole file fits: unknown layouts,
    layers the model lacks (a LoRA for another architecture), convolution LoRA, rank or shape
    mismatches raise ValueError naming the keys.

    Returns a report: {"format", "unet": [layer names], "text_encoder": [layer names], "ranks", "alphas",
    "scale"}.
    """
    file = _lora_file(Path(path))
    state = read_state_dict(file)
    modules = {"unet": unet, "text_encoder": text_encoder}
    layers = {part: _layers(m) if m is not None else {} for part, m in modules.items()}
    if state and all(k.startswith("lora_") for k in state):
        fmt = "kohya"
        kohya_names = {p: {KOHYA_PREFIXES[p] + n.replace(".", "_"): n for n in layers[p]} for p in PARTS}
        adapters, unsupported = _parse_kohya(state, kohya_names)
    elif state and all(k.split(".")[0] in (*PARTS, "text_encoder_2") for k in state):
        fmt = "diffusers"
        adapters, unsupported = _parse_diffusers(state, _header(file))
    else:
        raise ValueError(
            f"{file}: not a LoRA layout sdjax understands. It reads diffusers/peft files (unet.<module>.lora_A.weight"
            ", text_encoder.<module>.lora_B.weight ...) and kohya/AUTOMATIC1111 files (lora_unet_<module>.lora_down"
            f".weight, lora_te_<module>.lora_up.weight, .alpha); this one has keys like {_listing(sorted(state), 4)}"
        )
    if unsupported:
        raise ValueError(f"{file}: {_unsupported_message(unsupported)}")
    if text_encoder is None:
        skipped = [key for (part, _), a in adapters.items() if part == "text_encoder" for key in a.keys]
        if skipped:
            warnings.warn(
                f"{file} also adapts the text encoder ({len(skipped)} tensors), which were not loaded: "
                "pass text_encoder= to load them",
                stacklevel=2,
            )
        adapters = {k: a for k, a in adapters.items() if k[0] == "unet"}
    problems = _check(adapters, layers)
    if problems:
        raise ValueError(f"{file} does not fit this model: " + "; ".join(problems))
    fused = [
        n
        for part in PARTS
        for n, (_, m) in layers[part].items()
        if isinstance(m, LoRALinear) and m.fused_scale is not None
    ]
    if fused:
        raise ValueError(f"{len(fused)} adapters are fused ({fused[0]} ...): unfuse_lora before loading another LoRA")

    report = {"format": fmt, "unet": [], "text_encoder": [], "ranks": set(), "alphas": set(), "scale": scale}
    for part, module in modules.items():
        for name, (path_in_module, layer) in layers[part].items():
            adapter = adapters.get((part, name))
            if adapter is None:
                if isinstance(layer, LoRALinear):
                    _replace(module, path_in_module, layer.base_layer())
                continue
            down, up = adapter.down.reshape(adapter.down.shape[:2]), adapter.up.reshape(adapter.up.shape[:2])
            r = down.shape[0]
            if not isinstance(layer, LoRALinear) or layer.rank != r:
                base = layer.base_layer() if isinstance(layer, LoRALinear) else layer
                layer = LoRALinear(base, rank=r, rngs=None)
                _replace(module, path_in_module, layer)
            dtype = layer.kernel.dtype
            layer.lora_A.set_value(jnp.asarray(down.T, dtype))
            layer.lora_B.set_value(jnp.asarray(up.T, dtype))
            layer.lora_alpha.set_value(jnp.float32(r if adapter.alpha is None else adapter.alpha))
            layer.lora_scale.set_value(jnp.float32(scale))
            report[part].append(name)
            report["ranks"].add(r)
            report["alphas"].add(layer.alpha)
    report["ranks"], report["alphas"] = sorted(report["ranks"]), sorted(report["alphas"])
    return report
