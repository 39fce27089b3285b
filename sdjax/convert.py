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

from sdjax.components import Components
from sdjax.io import check_fit, flatten, path_str, read, save_tree, unflatten_like
from sdjax.models.clip import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection
from sdjax.models.controlnet import ControlNet, ControlNetConfig
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


def load_state_dict(
    module: nnx.Module, state_dict: dict[str, np.ndarray], *, source: str = "checkpoint", consume: bool = False
) -> None:
    """Copy a PyTorch-named, PyTorch-layout ``state_dict`` (numpy arrays) into ``module``, in place, each
    tensor cast to its parameter's dtype.

    ``module`` may be abstract (built under ``nnx.eval_shape``): only its parameters' paths, shapes
    and dtypes are read. ``consume``: take the tensors out of ``state_dict`` as they are converted, so
    that a large checkpoint (SDXL's UNet is 10 GB in float32) is never held twice. Raises ValueError naming
    the missing tensors, the unexpected ones and every shape mismatch (both shapes, in the checkpoint's
    layout), the first few of each and counts.
    """
    template = nnx.state(module, nnx.Param)
    leaves, treedef = jax.tree_util.tree_flatten_with_path(template)
    paths = [path_str(path) for path, _ in leaves]
    names = [torch_name(p) for p in paths]
    check_fit(
        {n: to_torch_layout(p, np.empty(leaf.shape, np.uint8)).shape for n, p, (_, leaf) in zip(names, paths, leaves)},
        {n: np.shape(a) for n, a in state_dict.items()},
        source=source,
        target=type(module).__name__,
        hint="Is it a checkpoint of this model, with the config the model was built from?",
        ignored=IGNORED_SUFFIXES,
    )
    take = state_dict.pop if consume else state_dict.__getitem__
    arrays = [
        # NumPy casts, jax.device_put copies: no XLA program per tensor shape (jnp.asarray compiles one each)
        jax.device_put(to_sdjax_layout(path, np.asarray(take(name))).astype(leaf.dtype, copy=False))
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


def read_state_dict(path: str | os.PathLike, *, float32: bool = True) -> dict[str, np.ndarray]:
    """Every tensor of a checkpoint file as float32 (floating; ``float32=False``: as stored, so a float16
    file takes half the memory) or its own dtype, keyed by name.

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
        return _read_safetensors(path, float32)
    if path.suffix in PICKLE_SUFFIXES:
        return _read_pickle(path, float32)
    raise ValueError(f"{path}: unknown checkpoint format {path.suffix!r}; expected .safetensors or {PICKLE_SUFFIXES}")


def _read_safetensors(path: Path, float32: bool) -> dict[str, np.ndarray]:
    cast = _float32 if float32 else np.asarray
    try:
        with safe_open(str(path), framework="flax") as f:  # the flax reader understands bfloat16
            return {k: cast(np.asarray(f.get_tensor(k))) for k in f.keys()}  # noqa: SIM118
    except (SafetensorError, OSError, ValueError) as e:
        raise ValueError(f"{path} is not a readable safetensors file ({e}); it may be truncated or corrupt") from e


def _read_pickle(path: Path, float32: bool) -> dict[str, np.ndarray]:
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
    def to_numpy(v):  # numpy has no bfloat16: such tensors become float32
        keep = not v.is_floating_point() or (not float32 and v.dtype != torch.bfloat16)
        return v.numpy() if keep else v.float().numpy()

    return {k: to_numpy(v) for k, v in obj.items() if torch.is_tensor(v)}


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
            return read_state_dict(folder / name, float32=False)
    for index in sorted(folder.glob("*.index.json")):  # sharded: {"weight_map": {tensor: shard file}}
        shards = sorted(set(_read_json(index).get("weight_map", {}).values()))
        out = {}
        for shard in shards:
            out |= read_state_dict(folder / shard, float32=False)
        return out
    raise FileNotFoundError(
        f"no weights in {folder}: expected one of {', '.join(WEIGHT_FILES[:2])} (or .bin, fp16 variants, or a "
        f"sharded *.index.json); found {sorted(p.name for p in folder.iterdir())}"
    )


def load_unet(folder: str | os.PathLike, dtype=None) -> UNet2D:
    """A diffusers ``unet/`` folder (config.json + weights) as an sdjax UNet2D (parameters in ``dtype``,
    default float32)."""
    folder = Path(folder)
    model = abstract(UNet2D, UNetConfig.from_diffusers(_read_json(folder / "config.json")), dtype)
    load_state_dict(model, _component_state_dict(folder), source=str(folder), consume=True)
    return model


def load_vae(folder: str | os.PathLike, dtype=None) -> AutoencoderKL:
    """A diffusers ``vae/`` folder as an sdjax AutoencoderKL."""
    folder = Path(folder)
    model = abstract(AutoencoderKL, VAEConfig.from_diffusers(_read_json(folder / "config.json")), dtype)
    load_state_dict(model, _component_state_dict(folder), source=str(folder), consume=True)
    return model


def load_controlnet(path: str | os.PathLike, dtype=None, *, unet: UNetConfig | None = None, **options) -> ControlNet:
    """A ControlNet from a diffusers ``ControlNetModel`` folder (config.json + weights), or from a single
    file in the layout of the original release (lllyasviel's ``control_v11p_sd15_canny.pth``, with or
    without the ``control_model.`` prefix; :func:`sdjax.compvis.load_controlnet_single_file`, whose
    encoder config is ``unet``, default SD1.5's, and ``options`` the rest of its ControlNetConfig).
    Parameters in ``dtype`` (default float32)."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(
            f"no ControlNet at {path}: expected a diffusers ControlNetModel folder or a single .safetensors file"
        )
    if path.is_file():
        from sdjax import compvis  # (a module that builds on this one)

        return compvis.load_controlnet_single_file(path, unet=unet, dtype=dtype, **options)
    if unet is not None or options:
        raise ValueError(f"{path} is a diffusers folder: its config.json says the ControlNet's config, pass none")
    model = abstract(ControlNet, ControlNetConfig.from_diffusers(_read_json(path / "config.json")), dtype)
    load_state_dict(model, _component_state_dict(path), source=str(path), consume=True)
    return model


def save_controlnet(model: ControlNet, folder: str | os.PathLike, dtype=None) -> Path:
    """Write a ControlNet as a diffusers ``ControlNetModel`` folder (what :func:`load_controlnet` reads), its
    weights in ``dtype`` (default: as they are; "float16" halves the file, loading casts back)."""
    folder = Path(folder)
    weights = state_dict(model)
    if dtype is not None:
        weights = {k: v.astype(jnp.dtype(dtype)) for k, v in weights.items()}
    _write_component(folder, model.controlnet_config.to_diffusers(), weights, WEIGHT_FILES[0])
    return folder


def load_vq(folder: str | os.PathLike, dtype=None):
    """A diffusers ``VQModel`` folder (Würstchen's stage A, the LDM VQ-f4 autoencoders) as an sdjax
    :class:`~sdjax.models.vq.VQModel`."""
    from sdjax.models.vq import VQConfig, VQModel

    folder = Path(folder)
    model = abstract(VQModel, VQConfig.from_diffusers(_read_json(folder / "config.json")), dtype)
    load_state_dict(model, _component_state_dict(folder), source=str(folder), consume=True)
    return model


def save_vq(model, folder: str | os.PathLike) -> Path:
    """Write a :class:`~sdjax.models.vq.VQModel` as a diffusers ``VQModel`` folder."""
    folder = Path(folder)
    _write_component(folder, model.config.to_diffusers(), state_dict(model), WEIGHT_FILES[0])
    return folder


TEXT_ENCODERS = {"CLIPTextModel": CLIPTextModel, "CLIPTextModelWithProjection": CLIPTextModelWithProjection}


def load_text_encoder(folder: str | os.PathLike, dtype=None) -> CLIPTextModel:
    """A diffusers ``text_encoder/`` folder (a transformers ``CLIPTextModel``) as an sdjax CLIPTextModel, or
    SDXL's ``text_encoder_2/`` (a ``CLIPTextModelWithProjection``) as an sdjax CLIPTextModelWithProjection."""
    folder = Path(folder)
    config = _read_json(folder / "config.json")
    architecture = config.get("architectures", ["CLIPTextModel"])[0]
    if architecture not in TEXT_ENCODERS:
        raise ValueError(
            f"{folder} holds a {config['architectures']}, not a CLIPTextModel; sdjax loads SD1.x/2.x text encoders "
            "and SDXL's CLIPTextModelWithProjection"
        )
    model = abstract(TEXT_ENCODERS[architecture], CLIPTextConfig.from_dict(config), dtype)
    weights = {k.removeprefix("text_model."): v for k, v in _component_state_dict(folder).items()}
    load_state_dict(model, weights, source=str(folder), consume=True)
    return model


def abstract(cls, config, dtype=None):
    """A module of ``cls`` whose parameters are not initialised: they are about to be overwritten, and
    initialising 860 M random numbers only to throw them away costs seconds. ``dtype``: the parameters'
    (default float32), so that loading casts each tensor as it goes, never holding a float32 copy."""
    model = nnx.eval_shape(lambda: cls(config, rngs=_FixedKey()))
    if dtype is None or jnp.dtype(dtype) == jnp.float32:
        return model
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)
    params = jax.tree.map(lambda p: jax.ShapeDtypeStruct(p.shape, jnp.dtype(dtype)), params)
    return nnx.merge(graphdef, params, rest)


class _FixedKey:
    """Stands in for ``nnx.Rngs`` while a module is built under ``nnx.eval_shape``: every stream (``rngs()``,
    ``rngs.params()``, …) hands out one fixed key. Nothing is drawn there, only traced; the real ``nnx.Rngs``
    counts its draws in a variable, and under tracing each update of it costs time proportional to the trace
    so far (flax 0.12 asks the traced count for its sharding, and JAX's answer searches the trace for the
    value's origin): quadratic in the model's size, 6.7 s against 0.7 s for SD1.5's UNet on a CPU."""

    def __init__(self):
        self.key = jax.random.key(0)

    def __call__(self) -> jax.Array:
        return self.key

    def __getattr__(self, stream: str) -> _FixedKey:
        if stream.startswith("_"):  # not a stream name: copy's __deepcopy__ probe and the like
            raise AttributeError(stream)
        return self


# diffusers pipelines whose folders look like SD's but need parts sdjax does not implement
UNSUPPORTED_PIPELINES = {
    "StableDiffusionDepth2ImgPipeline": "SD 2 depth-to-image, whose UNet takes a depth map (from a MiDaS/DPT "
    "depth estimator sdjax does not have) as a 5th input channel; sdjax runs SD 1.x/2.x text-to-image, img2img "
    "and inpainting",
    "StableDiffusionUpscalePipeline": "the x4 upscaler, whose UNet takes the low-resolution image and a noise "
    "level; sdjax does not implement it",
    "StableDiffusionLatentUpscalePipeline": "the latent x2 upscaler (a different UNet and conditioning); sdjax "
    "does not implement it",
    "StableDiffusionXLImg2ImgPipeline": "SDXL's refiner (one text encoder, bigG, and an aesthetic-score "
    "conditioning); sdjax runs SDXL base",
}


def load_diffusers(folder: str | os.PathLike, dtype=None) -> Components:
    """A diffusers Stable Diffusion folder (``unet/ vae/ text_encoder/ tokenizer/ scheduler/``; SDXL base adds
    ``text_encoder_2/ tokenizer_2/``), the networks' parameters in ``dtype`` (default float32)."""
    folder = Path(folder)
    if not folder.is_dir():
        raise FileNotFoundError(f"no such folder: {folder}. Pass a diffusers model folder (one with model_index.json)")
    index = folder / "model_index.json"
    pipeline = _read_json(index).get("_class_name") if index.is_file() else None
    if pipeline in UNSUPPORTED_PIPELINES:
        raise ValueError(f"{folder} is a {pipeline} model: {UNSUPPORTED_PIPELINES[pipeline]}")
    missing = [p for p in PARTS if not (folder / p).is_dir()]
    if missing:
        raise FileNotFoundError(
            f"{folder} is not a complete diffusers Stable Diffusion folder: missing {missing} "
            f"(found {sorted(p.name for p in folder.iterdir())}). Download or copy the whole folder."
        )
    scheduler = _read_json(folder / "scheduler" / "scheduler_config.json")
    sdxl = (folder / "text_encoder_2").is_dir()
    if sdxl and not (folder / "tokenizer_2").is_dir():
        raise FileNotFoundError(f"{folder} has text_encoder_2/ but no tokenizer_2/: copy the whole SDXL folder")
    return Components(
        unet=load_unet(folder / "unet", dtype),
        vae=load_vae(folder / "vae", dtype),
        text_encoder=load_text_encoder(folder / "text_encoder", dtype),
        tokenizer=CLIPTokenizer.from_folder(folder / "tokenizer"),
        schedule=NoiseSchedule.from_diffusers_config(scheduler),
        scheduler_config=scheduler,
        text_encoder_2=load_text_encoder(folder / "text_encoder_2", dtype) if sdxl else None,
        tokenizer_2=CLIPTokenizer.from_folder(folder / "tokenizer_2") if sdxl else None,
        force_zeros_for_empty_prompt=sdxl and bool(_read_json(index).get("force_zeros_for_empty_prompt", True)),
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


def state_dict_names(module: nnx.Module) -> list[str]:
    """The PyTorch names of ``module``'s parameters, without touching their values."""
    leaves = jax.tree_util.tree_flatten_with_path(nnx.state(module, nnx.Param))[0]
    return [torch_name(path_str(path)) for path, _ in leaves]


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
        "unet": abstract(UNet2D, UNetConfig.from_diffusers(meta["unet"])),
        "vae": abstract(AutoencoderKL, VAEConfig.from_diffusers(meta["vae"])),
        "text_encoder": abstract(CLIPTextModel, CLIPTextConfig.from_dict(meta["text_encoder"])),
    }
    template = {name: nnx.state(m, nnx.Param) for name, m in models.items()}
    template = jax.tree.map(lambda a: np.empty(a.shape, a.dtype), template)  # shapes only; never filled
    trees = unflatten_like(template, flat, source=str(folder / SDJAX_FILE))
    for name, model in models.items():
        nnx.update(model, jax.tree.map(jax.device_put, trees[name]))
    return Components(
        **models,
        tokenizer=CLIPTokenizer.from_folder(folder / "tokenizer"),
        schedule=NoiseSchedule(**meta["schedule"]),
        scheduler_config=meta.get("scheduler_config"),
    )


def load(path: str | os.PathLike, dtype=None, **single_file_options) -> Components:
    """Stable Diffusion from any layout sdjax reads: an sdjax folder, a diffusers folder, or a CompVis
    single file (``single_file_options`` go to :func:`sdjax.compvis.load_single_file`). ``dtype``: the
    networks' parameters (default float32), cast tensor by tensor while loading from a diffusers folder or a
    single file (SDXL's UNet in bfloat16 then never exists in float32)."""
    path = Path(path)
    if path.is_dir():
        return load_sdjax(path) if (path / SDJAX_FILE).is_file() else load_diffusers(path, dtype)
    from sdjax import compvis  # (a module that builds on this one)

    return compvis.load_single_file(path, dtype=dtype, **single_file_options)


def save(sd: Components, path: str | os.PathLike, layout: str | None = None) -> Path:
    """Write ``sd`` as ``layout`` "sdjax", "diffusers" or "compvis" (default: compvis for a
    ``.safetensors`` path, sdjax for a folder)."""
    from sdjax import compvis  # (which builds on this module)

    path = Path(path)
    layout = layout or ("compvis" if path.suffix == ".safetensors" else "sdjax")
    writers = {"sdjax": save_sdjax, "diffusers": save_diffusers, "compvis": compvis.save_single_file}
    if layout not in writers:
        raise ValueError(f"unknown layout {layout!r}; choose one of {sorted(writers)}")
    if sd.version == "sdxl":
        raise NotImplementedError(
            "sdjax does not write SDXL models yet (it reads them): keep the diffusers folder or single file you have"
        )
    return writers[layout](sd, path)
