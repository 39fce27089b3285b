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
:class:`LoRALinear` adapts those as well.

LyCORIS files (kohya layout, same layer names) are read too, the algorithm told apart by each layer's keys:

* LoCon: LoRA on convolutions of any size, ``lora_down.weight`` (r, in, kh, kw) with the layer's stride and
  padding, ``lora_up.weight`` (out, r, 1, 1): ΔW = (α / r) · up · down, i.e. (out, r) @ (r, in·kh·kw).
* LoHa: ``hada_w1_a``, ``hada_w1_b``, ``hada_w2_a``, ``hada_w2_b``; LoKr: ``lokr_w1`` or ``lokr_w1_a/_b``,
  ``lokr_w2`` or ``lokr_w2_a/_b`` (the formulas: :mod:`sdjax.lora.lycoris`).

Tucker/CP-decomposed convolutions (``lora_mid``, ``hada_t1``, ``lokr_t2``), DoRA (``dora_scale``), (IA)³, GLoRA,
OFT/BOFT, full/diff, norm and T-LoRA layers are refused by name.
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
from sdjax.lora.layers import (
    TEXT_PREFIX,
    Adapter,
    LoRALinear,
    adaptable_layers,
    adapters_of,
    file_prefix,
    replace_layer,
)
from sdjax.lora.lycoris import LoHa, LoKr, loha_shape, lokr_shape, torch_weight_shape

LORA_WEIGHT_FILES = ("pytorch_lora_weights.safetensors", "pytorch_lora_weights.bin")
METADATA_KEY = "lora_adapter_metadata"  # diffusers' safetensors header entry: peft's LoraConfig, per part
PARTS = ("unet", "text_encoder", "text_encoder_2")
KOHYA_PREFIXES = {"unet": "lora_unet_", "text_encoder": "lora_te_"}
KOHYA_PREFIXES_SDXL = {"unet": "lora_unet_", "text_encoder": "lora_te1_", "text_encoder_2": "lora_te2_"}


LORA_LEAVES = ("lora_down.weight", "lora_up.weight")
KOHYA_LEAVES = {"lora": LORA_LEAVES, "loha": LoHa.FACTORS, "lokr": LoKr.FACTORS}  # besides "alpha"
# what other adapter kinds' keys end with (kohya layout): refused with their names
FOREIGN_LEAVES = {
    "LyCORIS Tucker/CP-decomposed convolutions": ("lora_mid.weight", "hada_t1", "hada_t2", "lokr_t1", "lokr_t2"),
    "DoRA": ("dora_scale",),
    "(IA)³": ("on_input", "weight"),
    "GLoRA": ("a1.weight", "a2.weight", "b1.weight", "b2.weight", "bm.weight"),
    "OFT/BOFT": ("oft_blocks", "oft_diag", "rescale"),
    "LyCORIS full/diff": ("diff", "diff_b"),
    "LyCORIS norm": ("w_norm", "b_norm"),
    "T-LoRA": ("q_layer.weight", "p_layer.weight", "lambda_layer"),
}


def _to_torch(layer: LoRALinear) -> tuple[np.ndarray, np.ndarray]:
    """(down, up) = (Aᵀ (r, in), Bᵀ (out, r)) as float32; (r, in, kh, kw) and (out, r, 1, 1) for a convolution,
    as PyTorch's Conv2d LoRA / LoCon layers hold them."""
    a, up = (np.asarray(p[...], np.float32) for p in (layer.lora_A, layer.lora_B))
    up = up.T
    if layer.conv_args is None:
        down = a.T
    else:  # A (kh·kw·in, r) → (kh, kw, in, r) → (r, in, kh, kw)
        down = a.reshape(*layer.kernel.shape[:-1], layer.rank).transpose(3, 2, 0, 1)
        up = up[:, :, None, None]
    return np.ascontiguousarray(down), np.ascontiguousarray(up)


def _peft_config(adapters: dict[str, Adapter], name_prefix: str) -> dict:
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
    the header as peft's LoraConfig) or "kohya" (sd-scripts / AUTOMATIC1111 / ComfyUI / LyCORIS; α per
    layer as ``.alpha`` tensors; adapters of 3×3 convolutions are written as LoCon, LoHa/LoKr adapters as
    such). A ``.safetensors`` path is the file; any other path is a folder that gets
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
        lycoris = [n for n, layer in adapters.items() if not isinstance(layer, LoRALinear)]
        if lycoris and format == "diffusers":
            raise ValueError(
                f"save_lora: {len(lycoris)} of the {part}'s adapters are LoHa/LoKr ({lycoris[0]} ...), which the "
                "diffusers/peft layout cannot hold; save them with format='kohya' (the LyCORIS layout)"
            )
        for name, layer in adapters.items():
            if not isinstance(layer, LoRALinear):  # LoHa / LoKr: its factors as the file held them
                key = prefixes[part] + name.replace(".", "_")
                tensors |= {f"{key}.{leaf}": value for leaf, value in layer.file_tensors().items()}
                continue
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
    """One layer's adapter as a file holds it: LoRA's down (r, in[, kh, kw]) and up (out, r[, 1, 1]), or
    LoHa's/LoKr's factors by their names; α (None: not in the file)."""

    down: np.ndarray | None = None
    up: np.ndarray | None = None
    factors: dict[str, np.ndarray] = dataclasses.field(default_factory=dict)
    kinds: set[str] = dataclasses.field(default_factory=set)  # "lora", "loha", "lokr": one, or a broken file
    alpha: float | None = None
    keys: list[str] = dataclasses.field(default_factory=list)

    @property
    def kind(self) -> str:
        return next(iter(self.kinds)) if len(self.kinds) == 1 else "lora"


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
    kind_of = {leaf: kind for kind, leaves in KOHYA_LEAVES.items() for leaf in leaves}
    for key, value in state.items():
        layer, _, leaf = key.partition(".")
        part = next((p for p, prefix in prefixes.items() if layer.startswith(prefix)), None)
        if part is None or (leaf not in kind_of and leaf != "alpha"):
            unsupported.append(key)
            continue
        adapter = adapters[part, names[part].get(layer, layer)]
        adapter.keys.append(key)
        if leaf == "alpha":
            adapter.alpha = value.item() or None  # sd-scripts and LyCORIS read α = 0 as α = r
            continue
        adapter.kinds.add(kind_of[leaf])
        if leaf == "lora_down.weight":
            adapter.down = value
        elif leaf == "lora_up.weight":
            adapter.up = value
        else:
            adapter.factors[leaf] = value
    return dict(adapters), unsupported


def _unsupported_message(keys: list[str]) -> str:
    leaf = lambda k: k.partition(".")[2]  # noqa: E731
    kinds = {
        kind: [k for k in keys if leaf(k) in leaves and not k.startswith(PARTS)]
        for kind, leaves in FOREIGN_LEAVES.items()
        if kind != "DoRA"
    } | {
        "LyCORIS in the diffusers layout": [k for k in keys if k.startswith(PARTS) and re.search(r"\.(hada|lokr)_", k)],
        "DoRA": [k for k in keys if "dora_scale" in k or "lora_magnitude_vector" in k],
        "SDXL's (two text encoders; this model has one)": [
            k for k in keys if k.startswith(("lora_te1_", "lora_te2_", "text_encoder_2."))
        ],
    }
    found = [f"{kind}: {listing(ks, 2)}" for kind, ks in kinds.items() if ks]
    other = sorted(set(keys) - {k for ks in kinds.values() for k in ks})
    if other:
        found.append(f"unrecognised: {listing(other, 3)}")
    return (
        f"{len(keys)} tensors of a kind sdjax does not load ({'; '.join(found)}); sdjax loads LoRA, LoCon, LoHa "
        "and LoKr (without Tucker/CP decomposition or DoRA)"
    )


def _check(adapters: dict, layers: dict[str, dict[str, tuple]]) -> list[str]:
    """Every problem that stops ``adapters`` from loading into ``layers``, as messages naming the keys."""
    unknown, broken, rank, mixed, shape = [], [], [], [], []
    for (part, name), a in adapters.items():
        key = a.keys[0]
        if len(a.kinds) > 1:
            mixed.append(f"{key} ({' + '.join(sorted(a.kinds))})")
            continue
        if name not in layers[part]:
            unknown.append(key)
            continue
        weight = torch_weight_shape(tuple(layers[part][name][1].kernel.shape))  # (out, in[, kh, kw])
        if a.kind != "lora":  # LoHa, LoKr: their flattened (out, in·kh·kw)
            try:
                update = (loha_shape if a.kind == "loha" else lokr_shape)(a.factors)
            except (KeyError, ValueError) as e:
                broken.append(f"{key}: {e}")
                continue
            if update != (weight[0], int(np.prod(weight[1:]))):
                shape.append(f"{key}: its update is {update} (out, in·kh·kw), the layer's weight {weight}")
            continue
        factors = [w for w in (a.down, a.up) if w is not None]
        if len(factors) < 2 or any(w.ndim not in (2, 4) for w in factors) or a.up.shape[2:] not in ((), (1, 1)):
            broken.append(f"{key} {[w.shape for w in factors]}")
        elif a.down.shape[0] != a.up.shape[1]:
            rank.append(f"{key}: down {a.down.shape} has rank {a.down.shape[0]}, up {a.up.shape} has {a.up.shape[1]}")
        elif (a.up.shape[0], *a.down.shape[1:]) not in (weight, weight + (1, 1)):  # a 2-D down on a 1×1 conv fits
            (d_in, *k), d_out = a.down.shape[1:], a.up.shape[0]
            if len(weight) == 2 and not k:
                shape.append(f"{key}: the LoRA maps {d_in} → {d_out} features, the layer {weight[1]} → {weight[0]}")
            else:
                shape.append(f"{key}: its update is {(d_out, d_in, *k)} (out, in, kh, kw), the layer's weight {weight}")
    other_model = "the LoRA was made for another model (e.g. SDXL, or SD2 on SD1); use one made for this architecture"
    problems = []
    if unknown:
        problems.append(
            f"{len(unknown)} LoRA layers name modules this model does not have ({listing(unknown)}): {other_model}"
        )
    if shape:
        problems.append(f"{len(shape)} LoRA layers do not fit their layer's shape ({listing(shape, 2)}): {other_model}")
    if rank:
        problems.append(f"{len(rank)} LoRA layers whose down and up ranks differ ({listing(rank, 2)}): a corrupt file")
    if mixed:
        problems.append(f"{len(mixed)} layers mix several adapter kinds' tensors ({listing(mixed, 2)}): a corrupt file")
    if broken:
        problems.append(
            f"{len(broken)} LoRA layers lack their down or up tensor, or have no matrix shape, or LoHa/LoKr factors "
            f"that do not fit together ({listing(broken)})"
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
    layers the model lacks (a LoRA for another architecture), rank or shape mismatches, adapter kinds
    sdjax does not implement (Tucker, DoRA, (IA)³, OFT ...) raise ValueError naming the keys.

    LyCORIS files (kohya layout) load the same way: LoCon layers (LoRA on 3×3 convolutions) become
    :class:`LoRALinear` adapters computing their branch at call time; LoHa and LoKr layers become
    :class:`sdjax.lora.lycoris.LoHa` / ``LoKr`` adapters that add s · ΔW to W at call time. Either way the
    strength stays array state (:func:`set_lora_scale` does not recompile) and :func:`fuse_lora` bakes it in.

    Returns a report: {"format", "kinds" (of "lora", "locon", "loha", "lokr"), "unet": [layer names],
    "text_encoder": [layer names], "text_encoder_2": [layer names], "ranks", "alphas", "scale"}.
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
        if isinstance(m, Adapter) and m.fused_scale is not None
    ]
    if fused:
        raise ValueError(f"{len(fused)} adapters are fused ({fused[0]} ...): unfuse_lora before loading another LoRA")
    if state and all(k.startswith("lora_") for k in state):
        fmt = "kohya"
        # text encoders' layers also without CLIP's text_model. level (LyCORIS on a transformers 5 CLIPTextModel)
        kohya_names = {
            p: {prefix + m.replace(".", "_"): n for n in layers[p] for m in {n, n.removeprefix(TEXT_PREFIX)}}
            for p, prefix in prefixes.items()
        }
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

    report = {"format": fmt, "kinds": set(), **{part: [] for part in PARTS}, "ranks": set(), "alphas": set()}
    for part, module in modules.items():
        for name, (path_in_module, layer) in layers[part].items():
            adapter = adapters.get((part, name))
            if adapter is None:
                if isinstance(layer, Adapter):
                    replace_layer(module, path_in_module, layer.base_layer())
                continue
            base = layer.base_layer() if isinstance(layer, Adapter) else layer
            if adapter.kind == "lora":
                layer = _lora_layer(layer, base, adapter)
                kind = "locon" if layer.spatial_conv else "lora"
            else:
                kind = adapter.kind
                layer = (LoHa if kind == "loha" else LoKr)(base, adapter.factors, alpha=adapter.alpha)
            layer.lora_scale.set_value(jnp.float32(scale))
            replace_layer(module, path_in_module, layer)
            report[part].append(name)
            report["kinds"].add(kind)
            report["ranks"].add(layer.rank)
            report["alphas"].add(layer.alpha)
    return report | {key: sorted(report[key]) for key in ("kinds", "ranks", "alphas")} | {"scale": scale}


def _lora_layer(layer, base, adapter: _Adapter) -> LoRALinear:
    """``layer`` (an adapter of the right rank, reused) or a new :class:`LoRALinear` on ``base``, holding
    ``adapter``'s down (r, in[, kh, kw]) and up (out, r[, 1, 1]) as A (kh·kw·in, r) and B (r, out)."""
    down, up = adapter.down, adapter.up.reshape(adapter.up.shape[:2])
    r = down.shape[0]
    if down.ndim == 2:
        down = down[:, :, None, None]
    if not isinstance(layer, LoRALinear) or layer.rank != r:
        layer = LoRALinear(base, rank=r, rngs=None)
    dtype = layer.kernel.dtype
    layer.lora_A.set_value(jnp.asarray(down.transpose(2, 3, 1, 0).reshape(-1, r), dtype))  # (kh, kw, in, r), flat
    layer.lora_B.set_value(jnp.asarray(up.T, dtype))
    layer.lora_alpha.set_value(jnp.float32(r if adapter.alpha is None else adapter.alpha))
    return layer
