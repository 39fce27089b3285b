"""LoRA files. Two layouts are in circulation, naming each adapted layer by its diffusers/transformers module
path (which sdjax shares, up to :func:`sdjax.convert.torch_name`):

* diffusers / peft (``pipeline.save_lora_weights``): ``unet.<module>.lora_A.weight`` (r, in) and
  ``.lora_B.weight`` (out, r); ``text_encoder.text_model.<module>...`` for CLIP. α is not a tensor: it
  is in the safetensors header (``lora_adapter_metadata``: peft's LoraConfig, ``unet.lora_alpha``,
  ``unet.alpha_pattern`` ...); older files have none, and then α = r (scale 1), as diffusers reads them.
* kohya / AUTOMATIC1111 (sd-scripts): ``lora_unet_<module with . → _>.lora_down.weight`` (r, in),
  ``.lora_up.weight`` (out, r) and ``.alpha`` (a scalar; absent or 0 means α = r, as sd-scripts reads
  it); ``lora_te_text_model_encoder_layers_0_self_attn_q_proj...`` for CLIP.

SDXL's files also adapt its second text encoder: ``text_encoder_2.text_model.<module>...`` (diffusers), and
kohya names the two ``lora_te1_`` and ``lora_te2_`` (``lora_te_`` is SD1/SD2's one text encoder).

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

import jax.numpy as jnp
import numpy as np
from flax import nnx
from safetensors import safe_open
from safetensors.numpy import save_file

from sdjax.convert import read_state_dict
from sdjax.io import listing
from sdjax.lora.layers import TEXT_PREFIX, LoRALinear, adaptable_layers, adapters_of, file_prefix, replace_layer

LORA_WEIGHT_FILES = ("pytorch_lora_weights.safetensors", "pytorch_lora_weights.bin")
METADATA_KEY = "lora_adapter_metadata"  # diffusers' safetensors header entry: peft's LoraConfig, per part
PARTS = ("unet", "text_encoder", "text_encoder_2")
KOHYA_PREFIXES = {"unet": "lora_unet_", "text_encoder": "lora_te_"}
KOHYA_PREFIXES_SDXL = {"unet": "lora_unet_", "text_encoder": "lora_te1_", "text_encoder_2": "lora_te2_"}


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
    text_encoder_2: nnx.Module | None = None,
) -> Path:
    """Write the adapters of ``unet`` and/or ``text_encoder`` (and SDXL's ``text_encoder_2``) as a LoRA file;
    returns its path.

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
    prefixes = KOHYA_PREFIXES_SDXL if text_encoder_2 is not None else KOHYA_PREFIXES
    for part, module in zip(PARTS, (unet, text_encoder, text_encoder_2)):
        if module is None:
            continue
        adapters = adapters_of(module, f"save_lora ({part})")
        for name, layer in adapters.items():
            down, up = _to_torch(layer)
            if format == "diffusers":
                tensors[f"{part}.{name}.lora_A.weight"], tensors[f"{part}.{name}.lora_B.weight"] = down, up
            else:
                key = prefixes[part] + name.replace(".", "_")
                tensors[f"{key}.lora_down.weight"], tensors[f"{key}.lora_up.weight"] = down, up
                tensors[f"{key}.alpha"] = np.array(layer.alpha, np.float32)  # a 0-d tensor, as sd-scripts writes
        peft_configs |= {f"{part}.{k}": v for k, v in _peft_config(adapters, file_prefix(module)).items()}
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
        if part.startswith("text_encoder") and not name.startswith(TEXT_PREFIX):
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


def _parse_kohya(state: dict[str, np.ndarray], names: dict[str, dict[str, str]], prefixes) -> tuple[dict, list[str]]:
    """{(part, module name): _Adapter} of a kohya file, and its keys sdjax cannot use. ``names`` maps
    each part's kohya layer names (module name with . → _) back to module names; a layer the model
    lacks keeps its kohya name (reported by the caller). ``prefixes``: SD's or SDXL's part prefixes."""
    adapters, unsupported = collections.defaultdict(_Adapter), []
    for key, value in state.items():
        layer, _, leaf = key.partition(".")
        part = next((p for p, prefix in prefixes.items() if layer.startswith(prefix)), None)
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
        "SDXL's (two text encoders; this model has one)": [
            k for k in keys if k.startswith(("lora_te1_", "lora_te2_", "text_encoder_2."))
        ],
    }
    found = [f"{kind}: {listing(ks, 2)}" for kind, ks in kinds.items() if ks]
    other = sorted(set(keys) - {k for ks in kinds.values() for k in ks})
    if other:
        found.append(f"unrecognised: {listing(other, 3)}")
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
            f"{len(unknown)} LoRA layers name modules this model does not have ({listing(unknown)}): {other_model}"
        )
    if shape:
        problems.append(f"{len(shape)} LoRA layers do not fit their layer's shape ({listing(shape, 2)}): {other_model}")
    if conv:
        problems.append(
            f"{len(conv)} convolution LoRA layers (LoCon/LyCORIS, kernels larger than 1×1: {listing(conv, 2)}) "
            "are not supported; sdjax loads LoRA of linear and 1×1 layers only"
        )
    if rank:
        problems.append(f"{len(rank)} LoRA layers whose down and up ranks differ ({listing(rank, 2)}): a corrupt file")
    if broken:
        problems.append(
            f"{len(broken)} LoRA layers lack their down or up tensor, or have no matrix shape ({listing(broken)})"
        )
    return problems


def load_lora(
    path: str | os.PathLike,
    unet: nnx.Module,
    text_encoder: nnx.Module | None = None,
    *,
    scale: float = 1.0,
    text_encoder_2: nnx.Module | None = None,
) -> dict:
    """Load a LoRA file (diffusers/peft or kohya/A1111 layout, told apart by its keys) into ``unet``
    and ``text_encoder`` (and SDXL's ``text_encoder_2``), in place, at strength ``scale``.

    Adapters are added where missing (or rebuilt where the rank differs) and filled; adapters the
    modules had on layers the file does not name are removed, so the modules then hold exactly this
    LoRA. ``path``: a ``.safetensors`` (or pickled ``.bin``) file, or a folder holding
    ``pytorch_lora_weights.safetensors``. Nothing changes unless the whole file fits: unknown layouts,
    layers the model lacks (a LoRA for another architecture), convolution LoRA, rank or shape
    mismatches raise ValueError naming the keys.

    Returns a report: {"format", "unet": [layer names], "text_encoder": [layer names], "text_encoder_2":
    [layer names], "ranks", "alphas", "scale"}.
    """
    file = _lora_file(Path(path))
    state = read_state_dict(file)
    sdxl = text_encoder_2 is not None
    modules = {"unet": unet, "text_encoder": text_encoder, "text_encoder_2": text_encoder_2}
    layers = {part: adaptable_layers(m) if m is not None else {} for part, m in modules.items()}
    prefixes = KOHYA_PREFIXES_SDXL if sdxl else KOHYA_PREFIXES
    fused = [
        n
        for part in PARTS
        for n, (_, m) in layers[part].items()
        if isinstance(m, LoRALinear) and m.fused_scale is not None
    ]
    if fused:
        raise ValueError(f"{len(fused)} adapters are fused ({fused[0]} ...): unfuse_lora before loading another LoRA")
    if state and all(k.startswith("lora_") for k in state):
        fmt = "kohya"
        kohya_names = {p: {prefix + n.replace(".", "_"): n for n in layers[p]} for p, prefix in prefixes.items()}
        adapters, unsupported = _parse_kohya(state, kohya_names, prefixes)
    elif state and all(k.split(".")[0] in PARTS for k in state):
        fmt = "diffusers"
        adapters, unsupported = _parse_diffusers(state, _header(file))
        if not sdxl:  # an SDXL file on an SD model: its text_encoder_2 tensors are reported as such
            unsupported += [key for (part, _), a in adapters.items() if part == "text_encoder_2" for key in a.keys]
            adapters = {k: a for k, a in adapters.items() if k[0] != "text_encoder_2"}
    else:
        raise ValueError(
            f"{file}: not a LoRA layout sdjax understands. It reads diffusers/peft files (unet.<module>.lora_A.weight"
            ", text_encoder.<module>.lora_B.weight ...) and kohya/AUTOMATIC1111 files (lora_unet_<module>.lora_down"
            f".weight, lora_te_<module>.lora_up.weight, .alpha); this one has keys like {listing(sorted(state), 4)}"
        )
    if unsupported:
        raise ValueError(f"{file}: {_unsupported_message(unsupported)}")
    if text_encoder is None:
        skipped = [key for (part, _), a in adapters.items() if part != "unet" for key in a.keys]
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

    report = {"format": fmt, **{part: [] for part in PARTS}, "ranks": set(), "alphas": set(), "scale": scale}
    for part, module in modules.items():
        for name, (path_in_module, layer) in layers[part].items():
            adapter = adapters.get((part, name))
            if adapter is None:
                if isinstance(layer, LoRALinear):
                    replace_layer(module, path_in_module, layer.base_layer())
                continue
            down, up = adapter.down.reshape(adapter.down.shape[:2]), adapter.up.reshape(adapter.up.shape[:2])
            r = down.shape[0]
            if not isinstance(layer, LoRALinear) or layer.rank != r:
                base = layer.base_layer() if isinstance(layer, LoRALinear) else layer
                layer = LoRALinear(base, rank=r, rngs=None)
                replace_layer(module, path_in_module, layer)
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
