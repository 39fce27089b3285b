"""Weights in and out of sdjax: PyTorch state dicts, diffusers folders, CompVis single files.

sdjax's modules carry diffusers' and transformers' attribute names, so a parameter's path reads the
same in both worlds up to three systematic differences, which this module undoes:

1. Leaf names: Flax calls a weight ``kernel`` (Conv, Linear), ``scale`` (GroupNorm, LayerNorm) or
   ``embedding`` (Embed); PyTorch calls all of them ``weight``.
2. Layouts: sdjax is NHWC. A PyTorch convolution weight is (out, in, kh, kw), a Flax one
   (kh, kw, in, out); a PyTorch Linear weight is (out, in), a Flax one (in, out).
3. A few containers: diffusers wraps some layers in lists with a dropout in between
   (``to_out = [Linear, Dropout]``, ``ff.net = [GEGLU, Dropout, Linear]``); sdjax keeps the layers
   only, as ``to_out``, ``ff.geglu`` and ``ff.proj_out`` (:data:`RENAMES`).

Loading always goes into a model built from the checkpoint's config, and every tensor must find its
place: a missing, unexpected or wrongly-shaped tensor is an error that names it (in the checkpoint's
own names), never a model left with some random weights.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from safetensors import SafetensorError, safe_open
from safetensors.numpy import save_file

from sdjax.io import _path_str, flatten, read, save_tree, unflatten_like
from sdjax.models.clip import CLIPTextConfig, CLIPTextModel
from sdjax.models.unet import UNet2D, UNetConfig
from sdjax.models.vae import AutoencoderKL, VAEConfig
from sdjax.schedulers import NoiseSchedule
from sdjax.tokenizer import CLIPTokenizer

# sdjax path segments → diffusers path segments (matched as whole segments, in order).
RENAMES = (
    (("to_out",), ("to_out", "0")),
    (("ff", "geglu"), ("ff", "net", "0")),
    (("ff", "proj_out"), ("ff", "net", "2")),
)
# Buffers some checkpoints carry that are not parameters (transformers' CLIP position ids: arange(77)).
IGNORED_SUFFIXES = (".position_ids",)


def torch_name(path: str) -> str:
    """The diffusers/transformers name of the sdjax parameter at ``path`` ("a.b.kernel" → "a.b.weight")."""
    *body, leaf = path.split(".")
    out, i = [], 0
    while i < len(body):
        for pattern, replacement in RENAMES:
            if tuple(body[i : i + len(pattern)]) == pattern:
                out += replacement
                i += len(pattern)
                break
        else:
            out.append(body[i])
            i += 1
    return ".".join(out + ["weight" if leaf in ("kernel", "scale", "embedding") else leaf])


def to_sdjax_layout(path: str, w: np.ndarray) -> np.ndarray:
    """A PyTorch tensor in the layout of the sdjax parameter at ``path``."""
    if path.endswith("kernel"):
        if w.ndim == 4:  # conv (out, in, kh, kw) → (kh, kw, in, out)
            return w.transpose(2, 3, 1, 0)
        if w.ndim == 2:  # linear (out, in) → (in, out)
            return w.T
    return w


def to_torch_layout(path: str, w: np.ndarray) -> np.ndarray:
    """The inverse of :func:`to_sdjax_layout`."""
    if path.endswith("kernel"):
        if w.ndim == 4:  # (kh, kw, in, out) → (out, in, kh, kw)
            return w.transpose(3, 2, 0, 1)
        if w.ndim == 2:
            return w.T
    return w


def _listing(names: list[str], limit: int = 5) -> str:
    more = f" and {len(names) - limit} more" if len(names) > limit else ""
    return ", ".join(names[:limit]) + more


def load_state_dict(module: nnx.Module, state_dict: dict[str, np.ndarray], *, source: str = "checkpoint") -> None:
    """Copy a PyTorch-named, PyTorch-layout ``state_dict`` (numpy arrays) into ``module``, in place.

    ``module`` may be abstract (built under ``nnx.eval_shape``): only its parameters' paths, shapes
    and dtypes are read. Raises ValueError naming the missing tensors, the unexpected ones and
    every shape mismatch (both shapes, in the checkpoint's layout), the first few of each and counts.
    """
    template = nnx.state(module, nnx.Param)
    leaves, treedef = jax.tree_util.tree_flatten_with_path(template)
    paths = [_path_str(path) for path, _ in leaves]
    names = [torch_name(p) for p in paths]
    missing = sorted(n for n in names if n not in state_dict)
    unexpected = sorted(set(state_dict) - set(names) - {k for k in state_dict if k.endswith(IGNORED_SUFFIXES)})
    mismatched = []
    for name, path, (_, leaf) in zip(names, paths, leaves):
        want = to_torch_layout(path, np.empty(leaf.shape, np.uint8)).shape
        if name in state_dict and tuple(state_dict[name].shape) != want:
            mismatched.append(f"{name}: checkpoint {tuple(state_dict[name].shape)} vs model {want}")
    problems = []
    if missing:
        problems.append(f"{len(missing)} tensors missing ({_listing(missing)})")
    if unexpected:
        problems.append(f"{len(unexpected)} unexpected tensors ({_listing(unexpected)})")
    if mismatched:
        problems.append(f"{len(mismatched)} shape mismatches ({_listing(mismatched, 3)})")
    if problems:
        raise ValueError(
            f"{source} does not fit {type(module).__name__}: "
            + "; ".join(problems)
            + ". Is it a checkpoint of this model, with the config the model was built from?"
        )
    arrays = [
        jnp.asarray(to_sdjax_layout(path, np.asarray(state_dict[name])), dtype=leaf.dtype)
        for name, path, (_, leaf) in zip(names, paths, leaves)
    ]
    nnx.update(module, jax.tree_util.tree_unflatten(treedef, arrays))


def state_dict(module: nnx.Module) -> dict[str, np.ndarray]:
    """``module``'s parameters with PyTorch names and layouts (float32 numpy arrays as stored)."""
    return {
        torch_name(p): np.ascontiguousarray(to_torch_layout(p, a))
        for p, a in flatten(nnx.state(module, nnx.Param)).items()
    }


# ---------------------------------------------------------------------------------------------------
# Reading checkpoint files
# ---------------------------------------------------------------------------------------------------

PICKLE_SUFFIXES = (".ckpt", ".bin", ".pt", ".pth")


def read_state_dict(path: str | os.PathLike) -> dict[str, np.ndarray]:
    """Every tensor of a checkpoint file as float32 (floating) or its own dtype, keyed by name.

    ``.safetensors`` is read without any code execution. ``.ckpt``/``.bin``/``.pt`` are PyTorch
    pickles: they are opened with ``torch.load(weights_only=True)``, which refuses anything but
    tensors and plain containers, so a malicious file cannot run code. A CompVis ``.ckpt`` keeps its
    tensors under ``"state_dict"``; that level is unwrapped.
    """
    path = Path(path)
    if path.is_dir():
        raise ValueError(f"{path} is a folder; pass a weights file, or load a diffusers folder with load_diffusers")
    if not path.is_file():
        raise FileNotFoundError(f"no such checkpoint file: {path}. Check the path.")
    if path.suffix == ".safetensors":
        return _read_safetensors(path)
    if path.suffix in PICKLE_SUFFIXES:
        return _read_pickle(path)
    raise ValueError(f"{path}: unknown checkpoint format {path.suffix!r}; expected .safetensors or {PICKLE_SUFFIXES}")


def _read_safetensors(path: Path) -> dict[str, np.ndarray]:
    try:
        with safe_open(str(path), framework="flax") as f:  # the flax reader understands bfloat16
            return {k: _float32(np.asarray(f.get_tensor(k))) for k in f.keys()}  # noqa: SIM118
    except (SafetensorError, OSError, ValueError) as e:
        raise ValueError(f"{path} is not a readable safetensors file ({e}); it may be truncated or corrupt") from e


def _read_pickle(path: Path) -> dict[str, np.ndarray]:
    try:
        import torch
    except ImportError as e:
        raise ImportError(
            f"reading {path.name} (a PyTorch pickle) needs PyTorch: pip install torch. "
            "Or use the checkpoint's .safetensors version, which sdjax reads without it."
        ) from e
    import pickle

    try:
        obj = torch.load(str(path), map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        found = re.search(r"Unsupported global: GLOBAL (\S+)", str(e))
        raise ValueError(
            f"{path} holds Python objects besides tensors{f' ({found[1]})' if found else ''}, and sdjax only "
            "loads pickles with torch.load(weights_only=True) so that a checkpoint cannot run code. "
            "Use a .safetensors version of this checkpoint."
        ) from e
    except (RuntimeError, EOFError, OSError) as e:
        raise ValueError(
            f"{path} could not be read as a PyTorch checkpoint ({e}); it may be truncated or corrupt"
        ) from e
    if isinstance(obj, dict) and isinstance(obj.get("state_dict"), dict):
        obj = obj["state_dict"]
    if not isinstance(obj, dict):
        raise ValueError(f"{path} holds a {type(obj).__name__}, not a dict of tensors")
    return {
        k: _float32(v.float().numpy() if v.is_floating_point() else v.numpy())
        for k, v in obj.items()
        if torch.is_tensor(v)
    }


def _float32(a: np.ndarray) -> np.ndarray:
    return a.astype(np.float32) if np.issubdtype(a.dtype, np.floating) or a.dtype.name == "bfloat16" else a


# ---------------------------------------------------------------------------------------------------
# diffusers folders
# ---------------------------------------------------------------------------------------------------

PARTS = ("unet", "vae", "text_encoder", "tokenizer", "scheduler")
WEIGHT_FILES = (  # in order of preference: safetensors first, then pickles
    "diffusion_pytorch_model.safetensors",
    "model.safetensors",
    "diffusion_pytorch_model.fp16.safetensors",
    "model.fp16.safetensors",
    "diffusion_pytorch_model.bin",
    "pytorch_model.bin",
    "diffusion_pytorch_model.fp16.bin",
    "pytorch_model.fp16.bin",
)


@dataclasses.dataclass
class Components:
    """The components of one Stable Diffusion checkpoint: its networks as sdjax modules, its tokenizer
    and its noise schedule (what a sampling pipeline is built from).

    ``version`` is "sd1" or "sd2", told apart by the text encoder: OpenAI's CLIP ViT-L/14 (SD1,
    quick_gelu) or OpenCLIP's ViT-H/14 (SD2, exact gelu). In a single file the tensors' names say it
    (:func:`detect_version`).

    ``scheduler_config`` is a diffusers folder's ``scheduler_config.json`` as read (its ``_class_name``
    and options such as ``use_karras_sigmas`` say which sampler the checkpoint ships with); None for
    the layouts that do not record one.
    """

    unet: UNet2D
    vae: AutoencoderKL
    text_encoder: CLIPTextModel
    tokenizer: CLIPTokenizer
    schedule: NoiseSchedule
    scheduler_config: dict | None = None

    @property
    def version(self) -> str:
        return "sd2" if self.text_encoder.config.hidden_act == "gelu" else "sd1"

    def astype(self, dtype) -> Components:
        """The same model with its networks' parameters cast to ``dtype`` (e.g. jnp.bfloat16)."""
        return dataclasses.replace(
            self, **{name: _cast(getattr(self, name), dtype) for name in ("unet", "vae", "text_encoder")}
        )


def _cast(module: nnx.Module, dtype) -> nnx.Module:
    graphdef, params, rest = nnx.split(module, nnx.Param, ...)
    return nnx.merge(graphdef, jax.tree.map(lambda p: p.astype(dtype), params), rest)


def _read_json(path: Path) -> dict:
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing; a diffusers model folder has a config.json beside its weights")
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"{path} is not valid JSON ({e})") from e


def _component_state_dict(folder: Path) -> dict[str, np.ndarray]:
    """The weights of one diffusers component folder (single file, or shards listed in an index)."""
    for name in WEIGHT_FILES:
        if (folder / name).is_file():
            return read_state_dict(folder / name)
    for index in sorted(folder.glob("*.index.json")):  # sharded: {"weight_map": {tensor: shard file}}
        shards = sorted(set(_read_json(index).get("weight_map", {}).values()))
        out = {}
        for shard in shards:
            out |= read_state_dict(folder / shard)
        return out
    raise FileNotFoundError(
        f"no weights in {folder}: expected one of {', '.join(WEIGHT_FILES[:2])} (or .bin, fp16 variants, or a "
        f"sharded *.index.json); found {sorted(p.name for p in folder.iterdir())}"
    )


def load_unet(folder: str | os.PathLike) -> UNet2D:
    """A diffusers ``unet/`` folder (config.json + weights) as an sdjax UNet2D."""
    folder = Path(folder)
    model = _abstract(UNet2D, UNetConfig.from_diffusers(_read_json(folder / "config.json")))
    load_state_dict(model, _component_state_dict(folder), source=str(folder))
    return model


def load_vae(folder: str | os.PathLike) -> AutoencoderKL:
    """A diffusers ``vae/`` folder as an sdjax AutoencoderKL."""
    folder = Path(folder)
    model = _abstract(AutoencoderKL, VAEConfig.from_diffusers(_read_json(folder / "config.json")))
    load_state_dict(model, _component_state_dict(folder), source=str(folder))
    return model


def load_text_encoder(folder: str | os.PathLike) -> CLIPTextModel:
    """A diffusers ``text_encoder/`` folder (a transformers ``CLIPTextModel``) as an sdjax CLIPTextModel."""
    folder = Path(folder)
    config = _read_json(folder / "config.json")
    if "CLIPTextModel" not in config.get("architectures", ["CLIPTextModel"]):
        raise ValueError(
            f"{folder} holds a {config['architectures']}, not a CLIPTextModel; sdjax loads SD1.x/2.x text encoders"
        )
    model = _abstract(CLIPTextModel, CLIPTextConfig.from_dict(config))
    weights = {k.removeprefix("text_model."): v for k, v in _component_state_dict(folder).items()}
    load_state_dict(model, weights, source=str(folder))
    return model


def _abstract(cls, config):
    """A module of ``cls`` whose parameters are not initialised: they are about to be overwritten, and
    initialising 860 M random numbers only to throw them away costs seconds."""
    return nnx.eval_shape(lambda: cls(config, rngs=nnx.Rngs(0)))


def load_diffusers(folder: str | os.PathLike) -> Components:
    """A diffusers Stable Diffusion folder (``unet/ vae/ text_encoder/ tokenizer/ scheduler/``)."""
    folder = Path(folder)
    if not folder.is_dir():
        raise FileNotFoundError(f"no such folder: {folder}. Pass a diffusers model folder (one with model_index.json)")
    missing = [p for p in PARTS if not (folder / p).is_dir()]
    if missing:
        raise FileNotFoundError(
            f"{folder} is not a complete diffusers Stable Diffusion folder: missing {missing} "
            f"(found {sorted(p.name for p in folder.iterdir())}). Download or copy the whole folder."
        )
    scheduler = _read_json(folder / "scheduler" / "scheduler_config.json")
    return Components(
        unet=load_unet(folder / "unet"),
        vae=load_vae(folder / "vae"),
        text_encoder=load_text_encoder(folder / "text_encoder"),
        tokenizer=CLIPTokenizer.from_folder(folder / "tokenizer"),
        schedule=NoiseSchedule.from_diffusers_config(scheduler),
        scheduler_config=scheduler,
    )


def _write_component(folder: Path, config: dict, weights: dict[str, np.ndarray], filename: str) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.json").write_text(json.dumps(config, indent=2))
    save_file({k: np.ascontiguousarray(v) for k, v in weights.items()}, str(folder / filename))


def save_diffusers(sd: Components, folder: str | os.PathLike) -> Path:
    """Write ``sd`` as a diffusers folder that ``StableDiffusionPipeline.from_pretrained`` can load."""
    folder = Path(folder)
    _write_component(folder / "unet", sd.unet.config.to_diffusers(), state_dict(sd.unet), WEIGHT_FILES[0])
    _write_component(folder / "vae", sd.vae.config.to_diffusers(), state_dict(sd.vae), WEIGHT_FILES[0])
    text = {f"text_model.{k}": v for k, v in state_dict(sd.text_encoder).items()}
    text_config = {"architectures": ["CLIPTextModel"], "model_type": "clip_text_model"}
    _write_component(
        folder / "text_encoder", text_config | dataclasses.asdict(sd.text_encoder.config), text, WEIGHT_FILES[1]
    )
    sd.tokenizer.save_folder(folder / "tokenizer")
    (folder / "scheduler").mkdir(parents=True, exist_ok=True)
    # the checkpoint's own scheduler config when it came with one; else SD1.x's PNDM (sdjax's default
    # sampler, plms) on the checkpoint's schedule
    scheduler = sd.scheduler_config or {
        "_class_name": "PNDMScheduler",
        "skip_prk_steps": True,
        **dataclasses.asdict(sd.schedule),
    }
    (folder / "scheduler" / "scheduler_config.json").write_text(json.dumps(scheduler, indent=2))
    index = {
        "_class_name": "StableDiffusionPipeline",
        "unet": ["diffusers", "UNet2DConditionModel"],
        "vae": ["diffusers", "AutoencoderKL"],
        "text_encoder": ["transformers", "CLIPTextModel"],
        "tokenizer": ["transformers", "CLIPTokenizer"],
        "scheduler": ["diffusers", scheduler["_class_name"]],
        "safety_checker": [None, None],
        "feature_extractor": [None, None],
        "requires_safety_checker": False,
    }
    (folder / "model_index.json").write_text(json.dumps(index, indent=2))
    return folder


# ---------------------------------------------------------------------------------------------------
# CompVis single files (the original ``ldm`` layout of SD1.x/2.x .ckpt/.safetensors files)
# ---------------------------------------------------------------------------------------------------
#
# One file holds all three networks under prefixes, with the original latent-diffusion code's names:
#
#     model.diffusion_model.*        the UNet:  input_blocks / middle_block / output_blocks
#     first_stage_model.*            the VAE:   encoder.down[i].block[j] / mid.block_1 / decoder.up[n-1-i] ...
#     cond_stage_model.transformer.* SD1's text encoder (transformers names)
#     cond_stage_model.model.*       SD2's text encoder (OpenCLIP names; q, k, v stored as one in_proj)
#
# Below, each network's names are derived from its config, as a map from module paths in diffusers'
# names to module paths in CompVis names; the leaves (weight, bias) are the same on both sides.

UNET_PREFIX, VAE_PREFIX = "model.diffusion_model.", "first_stage_model."
SD1_TEXT_PREFIX, SD2_TEXT_PREFIX = "cond_stage_model.transformer.", "cond_stage_model.model."

_UNET_RESNET = {"norm1": "in_layers.0", "conv1": "in_layers.2", "time_emb_proj": "emb_layers.1",
                "norm2": "out_layers.0", "conv2": "out_layers.3", "conv_shortcut": "skip_connection"}  # fmt: skip
_VAE_RESNET = {"conv_shortcut": "nin_shortcut"}
_VAE_ATTENTION = {"group_norm": "norm", "to_q": "q", "to_k": "k", "to_v": "v", "to_out.0": "proj_out"}


def _unet_modules(cfg: UNetConfig) -> dict[str, tuple[str, dict]]:
    """diffusers module path → (CompVis module path, renames inside it) for a UNet of config ``cfg``.

    CompVis numbers the UNet's layers as one flat list per half: ``input_blocks[0]`` is conv_in, then
    each level contributes L = layers_per_block (resnet[, attention]) entries and one downsampler;
    ``output_blocks`` has L + 1 entries per level, the last also holding the upsampler.
    """
    n, L = len(cfg.block_out_channels), cfg.layers_per_block
    attends = lambda kind: "Attn" in kind  # noqa: E731
    m = {"time_embedding.linear_1": ("time_embed.0", {}), "time_embedding.linear_2": ("time_embed.2", {}),
         "conv_in": ("input_blocks.0.0", {}), "conv_norm_out": ("out.0", {}), "conv_out": ("out.2", {})}  # fmt: skip
    for i, kind in enumerate(cfg.down_block_types):
        for j in range(L):
            k = 1 + i * (L + 1) + j
            m[f"down_blocks.{i}.resnets.{j}"] = (f"input_blocks.{k}.0", _UNET_RESNET)
            if attends(kind):
                m[f"down_blocks.{i}.attentions.{j}"] = (f"input_blocks.{k}.1", {})
        if i < n - 1:
            m[f"down_blocks.{i}.downsamplers.0.conv"] = (f"input_blocks.{(i + 1) * (L + 1)}.0.op", {})
    m["mid_block.resnets.0"] = ("middle_block.0", _UNET_RESNET)
    m["mid_block.attentions.0"] = ("middle_block.1", {})
    m["mid_block.resnets.1"] = ("middle_block.2", _UNET_RESNET)
    for i, kind in enumerate(cfg.up_block_types):
        for j in range(L + 1):
            k = i * (L + 1) + j
            m[f"up_blocks.{i}.resnets.{j}"] = (f"output_blocks.{k}.0", _UNET_RESNET)
            if attends(kind):
                m[f"up_blocks.{i}.attentions.{j}"] = (f"output_blocks.{k}.1", {})
        if i < n - 1:
            m[f"up_blocks.{i}.upsamplers.0.conv"] = (
                f"output_blocks.{i * (L + 1) + L}.{2 if attends(kind) else 1}.conv",
                {},
            )
    return m


def _vae_modules(cfg: VAEConfig) -> dict[str, tuple[str, dict]]:
    """diffusers module path → (CompVis module path, renames inside it) for an AutoencoderKL.

    The CompVis decoder numbers its levels from the lowest resolution up (``up[n-1]`` runs first),
    diffusers in the order they run: diffusers ``up_blocks[i]`` is CompVis ``up[n-1-i]``.
    """
    n, L = len(cfg.block_out_channels), cfg.layers_per_block
    m = {"quant_conv": ("quant_conv", {}), "post_quant_conv": ("post_quant_conv", {})}
    for part in ("encoder", "decoder"):
        m |= {f"{part}.conv_in": (f"{part}.conv_in", {}), f"{part}.conv_out": (f"{part}.conv_out", {}),
              f"{part}.conv_norm_out": (f"{part}.norm_out", {}),
              f"{part}.mid_block.resnets.0": (f"{part}.mid.block_1", _VAE_RESNET),
              f"{part}.mid_block.attentions.0": (f"{part}.mid.attn_1", _VAE_ATTENTION),
              f"{part}.mid_block.resnets.1": (f"{part}.mid.block_2", _VAE_RESNET)}  # fmt: skip
    for i in range(n):
        for j in range(L):
            m[f"encoder.down_blocks.{i}.resnets.{j}"] = (f"encoder.down.{i}.block.{j}", _VAE_RESNET)
        for j in range(L + 1):
            m[f"decoder.up_blocks.{i}.resnets.{j}"] = (f"decoder.up.{n - 1 - i}.block.{j}", _VAE_RESNET)
        if i < n - 1:
            m[f"encoder.down_blocks.{i}.downsamplers.0.conv"] = (f"encoder.down.{i}.downsample.conv", {})
            m[f"decoder.up_blocks.{i}.upsamplers.0.conv"] = (f"decoder.up.{n - 1 - i}.upsample.conv", {})
    return m


def _rename(name: str, modules: dict[str, tuple[str, dict]]) -> str:
    """Translate one diffusers tensor name through a module map (longest matching module path wins)."""
    parts = name.split(".")
    for cut in range(len(parts) - 1, 0, -1):
        head = ".".join(parts[:cut])
        if head in modules:
            target, inner = modules[head]
            rest = ".".join(parts[cut:])
            for old, new in inner.items():
                if rest.startswith(old + "."):
                    rest = new + rest[len(old) :]
                    break
            return f"{target}.{rest}"
    return name  # same name on both sides (the transformer blocks inside attentions)


_OPENCLIP_RENAMES = (
    ("encoder.layers.", "transformer.resblocks."),
    ("layer_norm1", "ln_1"),
    ("layer_norm2", "ln_2"),
    ("self_attn.out_proj", "attn.out_proj"),
    ("mlp.fc1", "mlp.c_fc"),
    ("mlp.fc2", "mlp.c_proj"),
)


def _openclip_name(name: str) -> str:
    """transformers CLIP text name → OpenCLIP name (SD2's text encoder), except the q/k/v projections."""
    name = name.removeprefix("text_model.")
    fixed = {"embeddings.token_embedding.weight": "token_embedding.weight",
             "embeddings.position_embedding.weight": "positional_embedding",
             "final_layer_norm.weight": "ln_final.weight", "final_layer_norm.bias": "ln_final.bias"}  # fmt: skip
    if name in fixed:
        return fixed[name]
    for old, new in _OPENCLIP_RENAMES:
        name = name.replace(old, new)
    return name


def to_compvis(sd: Components) -> dict[str, np.ndarray]:
    """All of ``sd``'s weights in one CompVis-layout state dict (what a single-file checkpoint holds)."""
    out = {}
    unet_map, vae_map = _unet_modules(sd.unet.config), _vae_modules(sd.vae.config)
    for name, w in state_dict(sd.unet).items():
        out[UNET_PREFIX + _rename(name, unet_map)] = w
    for name, w in state_dict(sd.vae).items():
        compvis = _rename(name, vae_map)
        if ".mid.attn_1." in compvis and w.ndim == 2:
            w = w[:, :, None, None]  # CompVis stores the VAE attention's projections as 1×1 convolutions
        out[VAE_PREFIX + compvis] = w
    text = state_dict(sd.text_encoder)
    if sd.version == "sd1":
        out |= {f"{SD1_TEXT_PREFIX}text_model.{k}": w for k, w in text.items()}
    else:
        for name, w in text.items():
            if ".self_attn.q_proj." in name:  # OpenCLIP: in_proj = [W_q; W_k; W_v] stacked on the output axis
                leaf = name.rsplit(".", 1)[1]
                qkv = [text[name.replace("q_proj", p)] for p in ("q_proj", "k_proj", "v_proj")]
                layer = _openclip_name(name.split(".self_attn.")[0])
                out[f"{SD2_TEXT_PREFIX}{layer}.attn.in_proj_{leaf}"] = np.concatenate(qkv, axis=0)
            elif "_proj." not in name or "out_proj" in name:
                out[SD2_TEXT_PREFIX + _openclip_name(name)] = w
    return out


def _from_compvis(ckpt: dict[str, np.ndarray], unet_cfg: UNetConfig, vae_cfg: VAEConfig, text_cfg: CLIPTextConfig):
    """Split a CompVis state dict into diffusers-named state dicts for the three networks.

    Returns (unet, vae, text, missing): ``missing`` lists the CompVis names the networks need and
    the file lacks. Tensors the networks do not use (EMA copies, the SD2 text tower's last layer
    and projection, CLIP's logit scale, training-time buffers such as ``alphas_cumprod`` ...) are
    left out.
    """
    missing = []

    def take(key: str):
        if key not in ckpt:
            missing.append(key)
        return ckpt.get(key)

    unet_map, vae_map = _unet_modules(unet_cfg), _vae_modules(vae_cfg)
    unet = {d: take(UNET_PREFIX + _rename(d, unet_map)) for d in _names(UNet2D, unet_cfg)}
    vae = {}
    for d in _names(AutoencoderKL, vae_cfg):
        c = VAE_PREFIX + _rename(d, vae_map)
        w = take(c)
        vae[d] = w[:, :, 0, 0] if w is not None and ".mid.attn_1." in c and w.ndim == 4 else w
    text = {}
    sd2 = any(k.startswith(SD2_TEXT_PREFIX) for k in ckpt)
    for d in _names(CLIPTextModel, text_cfg):
        if sd2 and "_proj." in d and "out_proj" not in d:  # q/k/v: a third of the layer's in_proj each
            layer, rest = d.split(".self_attn.")
            proj, leaf = rest.split(".")
            w = take(f"{SD2_TEXT_PREFIX}{_openclip_name(layer)}.attn.in_proj_{leaf}")
            if w is not None:
                third = w.shape[0] // 3
                text[d] = w[("q_proj", "k_proj", "v_proj").index(proj) * third :][:third]
        elif sd2:
            text[d] = take(SD2_TEXT_PREFIX + _openclip_name(d))
        else:  # older SD1 files have no "text_model." level under the prefix
            old = SD1_TEXT_PREFIX + d
            text[d] = ckpt[old] if old in ckpt else take(f"{SD1_TEXT_PREFIX}text_model.{d}")
    drop_missing = lambda sd: {k: v for k, v in sd.items() if v is not None}  # noqa: E731
    return drop_missing(unet), drop_missing(vae), drop_missing(text), missing


def detect_version(ckpt: dict[str, np.ndarray], source: str = "checkpoint") -> str:
    """ "sd1" or "sd2" from the tensors of a CompVis state dict; ValueError for anything else."""
    if not any(k.startswith(UNET_PREFIX) for k in ckpt):
        prefixes = sorted({k.split(".")[0] for k in ckpt})
        raise ValueError(
            f"{source} is not a Stable Diffusion 1.x/2.x single-file checkpoint: it has no {UNET_PREFIX}* tensors "
            f"(top-level names: {_listing(prefixes)}). SDXL, LoRA and VAE-only files are different formats."
        )
    if any(k.startswith(SD2_TEXT_PREFIX) for k in ckpt):
        return "sd2"
    if any(k.startswith(SD1_TEXT_PREFIX) for k in ckpt):
        return "sd1"
    raise ValueError(f"{source} has a UNet but no cond_stage_model.* text encoder; it is not a full SD1.x/2.x file")


def unet_in_channels(ckpt: dict[str, np.ndarray], default: int = 4) -> int:
    """The input channels of a CompVis state dict's UNet, read off its first convolution
    (``input_blocks.0.0.weight``, (out, in, 3, 3)): 4 for the latents alone, 9 for an inpainting model
    (latents, mask, masked-image latents). ``default`` when the file lacks that tensor."""
    weight = ckpt.get(UNET_PREFIX + "input_blocks.0.0.weight")
    return default if weight is None or weight.ndim != 4 else int(weight.shape[1])


def load_single_file(
    path: str | os.PathLike,
    *,
    unet: UNetConfig | None = None,
    vae: VAEConfig | None = None,
    text_encoder: CLIPTextConfig | None = None,
    schedule: NoiseSchedule | None = None,
    tokenizer: CLIPTokenizer | None = None,
) -> Components:
    """A CompVis single-file checkpoint (``.safetensors``, or ``.ckpt`` read with weights_only=True).

    The file says whether it is SD1 or SD2 (OpenCLIP names under ``cond_stage_model.model``); the
    networks' configs default to that version's (``UNetConfig.sd15()``/``sd2()`` ...), and any of
    them can be given instead (tiny test models, or a fine-tune of another shape). The UNet's input
    channels are the file's whatever the config (:func:`unet_in_channels`: 9 for an inpainting model).
    The file does not say what the UNet predicts: SD1.x, SD2 512-base and SD2 inpainting predict ε,
    SD2 768-v predicts v — the default for SD2's 4-channel UNets here; pass
    ``schedule=NoiseSchedule.sd15()`` for an SD2 ε-model.
    """
    ckpt = read_state_dict(path)
    version = detect_version(ckpt, str(path))
    sd2 = version == "sd2"
    unet = unet or (UNetConfig.sd2() if sd2 else UNetConfig.sd15())
    unet = dataclasses.replace(unet, in_channels=unet_in_channels(ckpt, default=unet.in_channels))
    vae = vae or VAEConfig.sd()
    text_encoder = text_encoder or (CLIPTextConfig.sd2() if sd2 else CLIPTextConfig.sd1())
    v_prediction = sd2 and unet.in_channels == vae.latent_channels
    schedule = schedule or NoiseSchedule.sd15(prediction_type="v_prediction" if v_prediction else "epsilon")
    tokenizer = tokenizer or CLIPTokenizer.from_bpe_file(pad_token="!" if sd2 else "<|endoftext|>")
    unet_sd, vae_sd, text_sd, missing = _from_compvis(ckpt, unet, vae, text_encoder)
    if missing:
        raise ValueError(
            f"{path} lacks {len(missing)} tensors a {version.upper()} model with these configs needs "
            f"({_listing(missing)}). Is the file complete (not truncated, not a pruned/partial export), and are "
            "the configs right for it?"
        )
    models = {}
    for name, cls, config, weights in (
        ("unet", UNet2D, unet, unet_sd),
        ("vae", AutoencoderKL, vae, vae_sd),
        ("text_encoder", CLIPTextModel, text_encoder, text_sd),
    ):
        models[name] = _abstract(cls, config)
        load_state_dict(models[name], weights, source=f"{path} ({name})")
    return Components(**models, tokenizer=tokenizer, schedule=schedule)


def save_single_file(sd: Components, path: str | os.PathLike) -> Path:
    """Write ``sd`` as a CompVis single-file ``.safetensors`` (the layout of SD1.x/2.x release files)."""
    path = Path(path)
    if path.suffix != ".safetensors":
        raise ValueError(f"{path}: sdjax writes single files as .safetensors only (no pickles); use that suffix")
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file({k: np.ascontiguousarray(v) for k, v in to_compvis(sd).items()}, str(path))
    return path


def _names(cls, config) -> list[str]:
    return list(state_dict_names(_abstract(cls, config)))


def state_dict_names(module: nnx.Module) -> list[str]:
    """The PyTorch names of ``module``'s parameters, without touching their values."""
    leaves = jax.tree_util.tree_flatten_with_path(nnx.state(module, nnx.Param))[0]
    return [torch_name(_path_str(path)) for path, _ in leaves]


# ---------------------------------------------------------------------------------------------------
# sdjax's own format, and loading whatever a path holds
# ---------------------------------------------------------------------------------------------------

SDJAX_FILE = "sdjax.safetensors"


def save_sdjax(sd: Components, folder: str | os.PathLike) -> Path:
    """sdjax's format: ``sdjax.safetensors`` (parameters under their sdjax paths, ``unet.…``, ``vae.…``,
    ``text_encoder.…``, with the configs, the schedule and any diffusers scheduler config in the header)
    and ``tokenizer/``. Loading it
    needs no renaming or transposing."""
    folder = Path(folder)
    trees = {name: nnx.state(getattr(sd, name), nnx.Param) for name in ("unet", "vae", "text_encoder")}
    metadata = {
        "format": "sdjax-stable-diffusion",
        "unet": sd.unet.config.to_diffusers(),
        "vae": sd.vae.config.to_diffusers(),
        "text_encoder": dataclasses.asdict(sd.text_encoder.config),
        "schedule": dataclasses.asdict(sd.schedule),
        "scheduler_config": sd.scheduler_config,
    }
    save_tree(folder / SDJAX_FILE, trees, metadata)
    sd.tokenizer.save_folder(folder / "tokenizer")
    return folder


def load_sdjax(folder: str | os.PathLike) -> Components:
    """A folder written by :func:`save_sdjax`."""
    folder = Path(folder)
    flat, meta = read(folder / SDJAX_FILE)
    if meta.get("format") != "sdjax-stable-diffusion":
        raise ValueError(f"{folder / SDJAX_FILE} is not an sdjax Stable Diffusion file (written by save_sdjax)")
    models = {
        "unet": _abstract(UNet2D, UNetConfig.from_diffusers(meta["unet"])),
        "vae": _abstract(AutoencoderKL, VAEConfig.from_diffusers(meta["vae"])),
        "text_encoder": _abstract(CLIPTextModel, CLIPTextConfig.from_dict(meta["text_encoder"])),
    }
    template = {name: nnx.state(m, nnx.Param) for name, m in models.items()}
    template = jax.tree.map(lambda a: np.empty(a.shape, a.dtype), template)  # shapes only; never filled
    trees = unflatten_like(template, flat, source=str(folder / SDJAX_FILE))
    for name, model in models.items():
        nnx.update(model, jax.tree.map(jnp.asarray, trees[name]))
    return Components(
        **models,
        tokenizer=CLIPTokenizer.from_folder(folder / "tokenizer"),
        schedule=NoiseSchedule(**meta["schedule"]),
        scheduler_config=meta.get("scheduler_config"),
    )


def load(path: str | os.PathLike, **single_file_options) -> Components:
    """Stable Diffusion from any layout sdjax reads: an sdjax folder, a diffusers folder, or a CompVis
    single file (``single_file_options`` go to :func:`load_single_file`)."""
    path = Path(path)
    if path.is_dir():
        return load_sdjax(path) if (path / SDJAX_FILE).is_file() else load_diffusers(path)
    return load_single_file(path, **single_file_options)


def save(sd: Components, path: str | os.PathLike, layout: str | None = None) -> Path:
    """Write ``sd`` as ``layout`` "sdjax", "diffusers" or "compvis" (default: compvis for a
    ``.safetensors`` path, sdjax for a folder)."""
    path = Path(path)
    layout = layout or ("compvis" if path.suffix == ".safetensors" else "sdjax")
    writers = {"sdjax": save_sdjax, "diffusers": save_diffusers, "compvis": save_single_file}
    if layout not in writers:
        raise ValueError(f"unknown layout {layout!r}; choose one of {sorted(writers)}")
    return writers[layout](sd, path)
