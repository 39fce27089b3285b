"""Checkpoint merging: new models made from the weights of old ones, one tensor at a time.

Fine-tunes of one base model stay close to it in weight space, so averaging their weights tends to give a
model that has some of each (the "model soup" observation; the web UIs' checkpoint merger). For every
tensor θ of the network, with weights α in [0, 1]:

    weighted sum      θ = (1 − α) θ_A + α θ_B            ("interpolate": α = 0 is A, α = 1 is B)
    add difference    θ = θ_A + α (θ_B − θ_C)            (B is a fine-tune of C: add what fine-tuning taught it to A)
    block-weighted    α = α_block(θ)                     one α per UNet block (the "MBW" convention)
    LoRA              W = W + s · Δ                      an adapter file baked into the weights (:func:`bake_lora`)

Block-weighted merges ("MBW", from the merge-block-weighted extensions of the SD web UI) give each block of
the UNet its own α, counted as the original CompVis code numbers them: ``input_blocks.0`` … ``11`` (IN00 …
IN11: conv_in, then per level two resnet(+attention) layers and a downsampler), ``middle_block`` (M00) and
``output_blocks.0`` … ``11`` (OUT00 … OUT11) — 25 weights for SD1/SD2 (19 for SDXL's 9 + 1 + 9). The 26-weight
form puts BASE first: the α of everything else (text encoder, VAE, the time embedding; the UNet's final
norm and conv count as OUT11). With 25 weights BASE is ``alpha``. Early input blocks hold composition, late
output blocks detail and texture: people take one model's layout and another's rendering this way.

Streaming: inputs are read tensor by tensor (from ``.safetensors`` files) and the output is written
tensor by tensor, so merging SD1.5 holds a few tensors in memory, not the models. (PyTorch pickles cannot
be streamed: a ``.ckpt`` input is read whole; convert it to ``.safetensors`` first for big models.)

All inputs must have one layout — CompVis single files (``.safetensors``/``.ckpt``), diffusers folders or
sdjax folders (``sdjax convert`` moves between them) — and one architecture: the same tensor names and shapes.
The output has the first model's layout, configs and tokenizer. Float tensors are merged in float32 and
written in the first model's dtype (or ``dtype``); integer tensors (e.g. ``position_ids``) are copied from A.
"""

from __future__ import annotations

import json
import os
import re
import shutil
from collections.abc import Callable, Sequence
from pathlib import Path

import ml_dtypes
import numpy as np
from tqdm.auto import tqdm

from sdjax.io import listing

Array = np.ndarray

# ---------------------------------------------------------------------------------------------------
# The two formulas. Both are evaluated in float32 exactly as torch does (so a merge here is bit for bit the
# one sd-mecha or the web UI's torch code writes; tests/test_merge.py checks against sd-mecha).
# ---------------------------------------------------------------------------------------------------


def weighted_sum(a: Array, b: Array, alpha: float) -> Array:
    """(1 − α) a + α b, as ``torch.lerp``: a + α (b − a) for α < ½, b − (1 − α)(b − a) otherwise, so that
    α = 0 gives a and α = 1 gives b exactly (the naive form rounds both)."""
    a, b = np.asarray(a, np.float32), np.asarray(b, np.float32)
    alpha = np.float32(alpha)
    if alpha == 0:
        return a
    if alpha == 1:
        return b
    d = b - a
    # torch's CPU kernel fuses the multiply-add (one rounding): float64 holds α·d exactly, then one rounding
    if alpha < 0.5:
        return (a.astype(np.float64) + np.float64(alpha) * d).astype(np.float32)
    return (b.astype(np.float64) - np.float64(np.float32(1) - alpha) * d).astype(np.float32)


def add_difference(a: Array, b: Array, c: Array, alpha: float) -> Array:
    """a + α (b − c): the difference b − c rounded to float32 first, then one fused multiply-add."""
    a = np.asarray(a, np.float32)
    if np.float32(alpha) == 0:
        return a
    d = np.asarray(b, np.float32) - np.asarray(c, np.float32)
    return (a.astype(np.float64) + np.float64(np.float32(alpha)) * d).astype(np.float32)


# ---------------------------------------------------------------------------------------------------
# Blocks (MBW): which α a tensor gets
# ---------------------------------------------------------------------------------------------------

_COMPVIS_UNET = re.compile(r"(?:^|\.)diffusion_model\.(input_blocks|middle_block|output_blocks)\.(\d+)\.")
_DIFFUSERS_UNET = re.compile(
    r"(?:^|\.)(down_blocks|up_blocks)\.(\d+)\.(resnets|attentions|downsamplers|upsamplers)\.(\d+)\."
)


def _unet_part(key: str) -> str | None:
    """The UNet-relative name of ``key`` for each layout (None: not a UNet tensor)."""
    for prefix in ("model.diffusion_model.", "unet/", "unet."):
        if key.startswith(prefix):
            return key[len(prefix):]
    return None


def block_of(key: str, layers_per_block: int = 2, n_blocks: int = 12) -> str:
    """The MBW block of a tensor name: "BASE", "IN00" …, "M00", "OUT00" …, for CompVis names
    (``model.diffusion_model.input_blocks.4.1.proj_in.weight``), diffusers folders' names
    (``unet/down_blocks.1.attentions.0.proj_in.weight``) and sdjax's (``unet.down_blocks…kernel``).

    diffusers numbers per level: with L = ``layers_per_block`` layers, ``down_blocks.i.resnets.j`` (and its
    attention) is input block 1 + i(L + 1) + j, its downsampler 1 + i(L + 1) + L; ``up_blocks.i.*.j`` is
    output block i(L + 1) + j and its upsampler sits in the last one, i(L + 1) + L. The UNet's final norm and
    conv count as the last output block, OUT{n_blocks − 1} (OUT11 for SD1/SD2), as in the web UI's extensions.
    """
    last = f"OUT{n_blocks - 1:02}"
    inner = _unet_part(key)
    if inner is None:
        return "BASE"  # text encoders, VAE
    if key.startswith("model.diffusion_model."):
        m = _COMPVIS_UNET.search(key)
        if m is None:  # time_embed, label_emb: before the input blocks; out.*: after the output blocks
            return last if inner.startswith("out.") else "BASE"
        kind, n = m[1], int(m[2])
        return {"input_blocks": f"IN{n:02}", "middle_block": "M00", "output_blocks": f"OUT{n:02}"}[kind]
    if inner.startswith("conv_in."):
        return "IN00"
    if inner.startswith("mid_block."):
        return "M00"
    if inner.startswith(("conv_norm_out.", "conv_out.")):
        return last
    m = _DIFFUSERS_UNET.match("." + inner)
    if m is None:  # time_embedding, add_embedding
        return "BASE"
    level, kind, j = int(m[2]), m[3], int(m[4])
    L = layers_per_block
    if m[1] == "down_blocks":
        return f"IN{1 + level * (L + 1) + (L if kind == 'downsamplers' else j):02}"
    return f"OUT{level * (L + 1) + (L if kind == 'upsamplers' else j):02}"


def block_names(n_blocks: int) -> list[str]:
    """BASE, IN00 … IN{n−1}, M00, OUT00 … OUT{n−1}: the order of the 26 (SD1: n = 12) weights."""
    return ["BASE"] + [f"IN{i:02}" for i in range(n_blocks)] + ["M00"] + [f"OUT{i:02}" for i in range(n_blocks)]


def parse_block_weights(weights: str | Sequence[float], n_blocks: int, alpha: float) -> dict[str, float]:
    """{block: α} from 2n + 1 weights (IN…, M00, OUT…; BASE gets ``alpha``) or 2n + 2 (BASE first).
    ``weights``: numbers or one comma-separated string ("0,0,0,…,1")."""
    if isinstance(weights, str):
        try:
            weights = [float(w) for w in weights.replace(" ", "").split(",") if w]
        except ValueError as e:
            raise ValueError(f"block weights {weights!r}: expected comma-separated numbers ({e})") from None
    weights = [float(w) for w in weights]
    names = block_names(n_blocks)
    if len(weights) == len(names) - 1:
        weights = [alpha, *weights]
    if len(weights) != len(names):
        raise ValueError(
            f"{len(weights)} block weights for a UNet with {n_blocks} input and {n_blocks} output blocks: give "
            f"{len(names) - 1} (IN00…IN{n_blocks - 1:02}, M00, OUT00…OUT{n_blocks - 1:02}) or {len(names)} (BASE first)"
        )
    return dict(zip(names, weights, strict=True))


# ---------------------------------------------------------------------------------------------------
# Reading and writing without holding a model: a minimal safetensors reader/writer (the format is an
# 8-byte little-endian header length, a JSON header {name: {dtype, shape, data_offsets}}, then the bytes)
# ---------------------------------------------------------------------------------------------------

_DTYPES = {
    "F64": np.float64, "F32": np.float32, "F16": np.float16, "BF16": ml_dtypes.bfloat16,
    "I64": np.int64, "I32": np.int32, "I16": np.int16, "I8": np.int8, "U8": np.uint8, "BOOL": np.bool_,
}  # fmt: skip
_CODES = {np.dtype(v): k for k, v in _DTYPES.items()}


class SafetensorsFile:
    """Lazy view of a ``.safetensors`` file: ``specs`` {name: (dtype, shape)}, ``metadata``, and ``[name]``, which
    reads that one tensor from disk."""

    def __init__(self, path: Path):
        self.path = path
        size = path.stat().st_size
        try:
            with open(path, "rb") as f:
                n = int.from_bytes(f.read(8), "little")
                if not 2 <= n <= size - 8:
                    raise ValueError(f"header length {n} does not fit a {size}-byte file")
                header = json.loads(f.read(n))
            self.metadata = header.pop("__metadata__", None) or {}
            self._entries = {
                k: (np.dtype(_DTYPES[v["dtype"]]), tuple(v["shape"]), v["data_offsets"]) for k, v in header.items()
            }
        except (ValueError, KeyError, TypeError, UnicodeDecodeError) as e:
            raise ValueError(
                f"{path} is not a readable safetensors file ({e}); it may be truncated or another format"
            ) from None
        end = max((o[1] for *_, o in self._entries.values()), default=0)
        if 8 + n + end > size:
            raise ValueError(f"{path} is truncated: its header describes {8 + n + end} bytes, the file has {size}")
        self._start = 8 + n

    @property
    def specs(self) -> dict[str, tuple[np.dtype, tuple]]:
        return {k: (dtype, shape) for k, (dtype, shape, _) in self._entries.items()}

    def __getitem__(self, key: str) -> Array:
        dtype, shape, (lo, hi) = self._entries[key]
        return np.fromfile(self.path, dtype, (hi - lo) // dtype.itemsize, offset=self._start + lo).reshape(shape)


class _PickleFile:
    """A PyTorch pickle (``.ckpt``/``.bin``), read whole with ``torch.load(weights_only=True)``."""

    def __init__(self, path: Path):
        from sdjax.convert import read_state_dict

        self.path, self.metadata = path, {}
        self._tensors = read_state_dict(path, float32=False)

    @property
    def specs(self) -> dict[str, tuple[np.dtype, tuple]]:
        return {k: (v.dtype, v.shape) for k, v in self._tensors.items()}

    def __getitem__(self, key: str) -> Array:
        return self._tensors[key]


def write_safetensors(path: Path, specs: dict[str, tuple[np.dtype, tuple]], tensors, metadata: dict | None = None):
    """Write a safetensors file tensor by tensor: the header from ``specs`` first, then each array that the
    iterable ``tensors`` yields as (name, array), in ``specs``' order. Atomic (a temporary file, renamed)."""
    header, offset = {}, 0
    for k, (dtype, shape) in specs.items():
        n = int(np.prod(shape, dtype=np.int64)) * np.dtype(dtype).itemsize
        header[k] = {"dtype": _CODES[np.dtype(dtype)], "shape": list(shape), "data_offsets": [offset, offset + n]}
        offset += n
    if metadata:
        header["__metadata__"] = {k: str(v) for k, v in metadata.items()}
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)  # the data starts 8-byte aligned
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as f:
        f.write(len(raw).to_bytes(8, "little") + raw)
        for (k, (dtype, shape)), (name, a) in zip(specs.items(), tensors, strict=True):
            a = np.ascontiguousarray(a, dtype)
            if name != k or a.shape != tuple(shape):
                raise RuntimeError(f"writer got {name} {a.shape}, expected {k} {tuple(shape)}")
            f.write(a.tobytes())
    os.replace(tmp, path)


def _open_file(path: Path):
    if path.suffix == ".safetensors":
        return SafetensorsFile(path)
    from sdjax.convert import PICKLE_SUFFIXES

    if path.suffix in PICKLE_SUFFIXES:
        return _PickleFile(path)
    raise ValueError(f"{path}: unknown checkpoint format {path.suffix!r}; expected .safetensors or {PICKLE_SUFFIXES}")


class Checkpoint:
    """A model on disk in one of the three layouts, as named weight files ({part: file}) read lazily.

    * "compvis": one file, part "" (``model.diffusion_model.…``, ``first_stage_model.…``, ``cond_stage_model.…``);
    * "diffusers": a folder with ``unet/``, ``vae/``, ``text_encoder/`` (``text_encoder_2/``), part = the subfolder;
    * "sdjax": a folder with ``sdjax.safetensors`` (``unet.…``, ``vae.…``, ``text_encoder.…``), part "".
    """

    def __init__(self, path: str | os.PathLike):
        from sdjax.convert import SDJAX_FILE, WEIGHT_FILES

        self.path = path = Path(path)
        if not path.exists():
            raise FileNotFoundError(f"no such model: {path}. Check the path.")
        if path.is_file():
            self.layout, self.files = "compvis", {"": _open_file(path)}
        elif (path / SDJAX_FILE).is_file():
            self.layout, self.files = "sdjax", {"": SafetensorsFile(path / SDJAX_FILE)}
        elif (path / "model_index.json").is_file() or (path / "unet").is_dir():
            self.layout, self.files = "diffusers", {}
            for part in ("unet", "text_encoder", "text_encoder_2", "vae"):
                found = [path / part / f for f in WEIGHT_FILES if (path / part / f).is_file()]
                if found:
                    self.files[part] = _open_file(found[0])
            if "unet" not in self.files:
                raise ValueError(f"{path} is a diffusers folder without UNet weights (unet/{WEIGHT_FILES[0]})")
        else:
            raise ValueError(
                f"{path} is a folder but neither an sdjax model ({SDJAX_FILE}) nor a diffusers one (model_index.json, "
                "unet/); pass the model's folder or a CompVis single file"
            )

    def keys(self) -> dict[str, tuple[str, str]]:
        """{name: (part, key in the part's file)}; names carry the part ("unet/conv_in.weight") for diffusers."""
        return {(f"{part}/{k}" if part else k): (part, k) for part, f in self.files.items() for k in f.specs}

    def spec(self, name: str) -> tuple[np.dtype, tuple]:
        part, key = self.keys()[name] if "/" in name else ("", name)
        return self.files[part].specs[key]

    def __getitem__(self, name: str) -> Array:
        part, key = name.split("/", 1) if self.layout == "diffusers" else ("", name)
        return self.files[part][key]

    def layers_per_block(self) -> int:
        """L of the UNet: the number of resnets in its first down block (CompVis files: from the index of the
        first downsampler, input_blocks.(L + 1))."""
        names = list(self.keys())
        js = [int(m[1]) for n in names if (m := re.search(r"down_blocks\.0\.resnets\.(\d+)\.", n))]
        if js:
            return max(js) + 1
        ops = [int(m[1]) for n in names if (m := re.search(r"input_blocks\.(\d+)\.0\.op\.", n))]
        if ops:
            return min(ops) - 1
        raise ValueError(f"{self.path}: no UNet down blocks found, so its blocks cannot be counted for block weights")

    def n_blocks(self) -> int:
        """Input blocks of the UNet, IN00 … IN{n−1} (SD1/SD2: 12, SDXL: 9)."""
        L = self.layers_per_block()
        found = [block_of(n, L) for n in self.keys()]
        ins = [int(b[2:]) for b in found if b.startswith("IN")]
        return max(ins) + 1


def _check_compatible(models: list[Checkpoint]) -> None:
    a = models[0]
    names_a = a.keys()
    for other in models[1:]:
        if other.layout != a.layout:
            raise ValueError(
                f"{a.path} is a {a.layout} model and {other.path} a {other.layout} one: merge models of one layout "
                f"(convert one first: sdjax convert {other.path} OUT --to {a.layout})"
            )
        names = other.keys()
        missing = [n for n in names_a if n not in names and np.issubdtype(a.spec(n)[0], np.inexact)]
        if missing:
            raise ValueError(
                f"{other.path} lacks {len(missing)} tensors that {a.path} has ({listing(missing)}): they are not the "
                "same architecture (e.g. SD1 and SD2, or an inpainting model); merge models of one base"
            )
        for n in names_a:
            if n in names and a.spec(n)[1] != other.spec(n)[1]:
                raise ValueError(
                    f"{n} is {a.spec(n)[1]} in {a.path} but {other.spec(n)[1]} in {other.path}: not the same "
                    "architecture; merge models of one base"
                )


def _output_dtype(dtype: np.dtype, override: str | None) -> np.dtype:
    if not np.issubdtype(dtype, np.inexact):
        return dtype
    return np.dtype(ml_dtypes.bfloat16 if override == "bfloat16" else override) if override else dtype


def merge(
    models: Sequence[str | os.PathLike],
    output: str | os.PathLike,
    *,
    alpha: float = 0.5,
    block_weights: str | Sequence[float] | None = None,
    dtype: str | None = None,
    progress: bool = True,
) -> Path:
    """Merge two models (weighted sum) or three (add difference, A + α(B − C)) into ``output``.

    Args:
      models: [A, B] or [A, B, C], paths in one layout (CompVis file, diffusers folder, sdjax folder).
      output: a ``.safetensors`` file for CompVis inputs, a folder otherwise (created; A's configs and tokenizer
        are copied into it).
      alpha: α of the formula (every tensor), or BASE's α when ``block_weights`` has 2n + 1 entries.
      block_weights: one α per UNet block (see :func:`parse_block_weights`); None: ``alpha`` everywhere.
      dtype: "float32", "float16" or "bfloat16" for the output's float tensors (default: A's).
    Returns the output path.
    """
    if len(models) not in (2, 3):
        raise ValueError(f"{len(models)} models: merge two (weighted sum) or three (add difference A + α(B − C))")
    if dtype not in (None, "float32", "float16", "bfloat16"):
        raise ValueError(f"dtype={dtype!r}: expected float32, float16 or bfloat16")
    ckpts = [Checkpoint(m) for m in models]
    _check_compatible(ckpts)
    a = ckpts[0]
    if block_weights is not None:
        L, n = a.layers_per_block(), a.n_blocks()
        table = parse_block_weights(block_weights, n, alpha)

        def alpha_of(name: str) -> float:
            return table[block_of(name, L, n)]
    else:

        def alpha_of(name: str) -> float:
            return alpha

    if len(ckpts) == 2:

        def combine(name, xs):
            return weighted_sum(xs[0], xs[1], alpha_of(name))
    else:

        def combine(name, xs):
            return add_difference(xs[0], xs[1], xs[2], alpha_of(name))

    return _write_like(a, output, lambda name: combine(name, [c[name] for c in ckpts]), dtype, progress)


def _write_like(a: Checkpoint, output, merged: Callable[[str], Array], dtype: str | None, progress: bool) -> Path:
    """Write a model of A's layout to ``output``: every float tensor from ``merged(name)``, the others A's."""
    output = Path(output)
    if a.layout == "compvis":
        if output.suffix != ".safetensors":
            raise ValueError(f"output {output}: a merge of single files is written as one .safetensors file")
        targets = {"": output}
    else:
        if output.suffix in (".safetensors", ".ckpt", ".pt", ".bin"):
            raise ValueError(f"output {output}: a merge of {a.layout} folders is written as a folder (no suffix)")
        if output.resolve() == a.path.resolve():
            raise ValueError(f"output {output} is the first model's folder; write the merge to a new one")
        weights = shutil.ignore_patterns("*.safetensors", "*.bin", "*.ckpt", "*.pt")
        shutil.copytree(a.path, output, dirs_exist_ok=True, ignore=weights)  # configs, tokenizer, scheduler
        # the safetensors name diffusers/transformers look for first (a .bin or .fp16 input is written as that)
        stem = lambda f: {"pytorch_model": "model"}.get(f.path.stem.split(".")[0], f.path.stem.split(".")[0])  # noqa: E731
        targets = {part: output / part / f"{stem(f)}.safetensors" for part, f in a.files.items()}
    bar = tqdm(total=len(a.keys()), desc="merge", disable=not progress, unit="tensor", mininterval=1.0)
    for part, f in a.files.items():
        specs = {k: (_output_dtype(d, dtype), s) for k, (d, s) in f.specs.items()}

        def tensors(part=part, f=f, specs=specs):
            for k, (d, _) in specs.items():
                name = f"{part}/{k}" if part else k
                x = merged(name) if np.issubdtype(d, np.inexact) else f[k]
                bar.update()
                yield k, np.asarray(x, np.float32).astype(d) if np.issubdtype(d, np.inexact) else x

        targets[part].parent.mkdir(parents=True, exist_ok=True)
        write_safetensors(targets[part], specs, tensors(), f.metadata)
    bar.close()
    return output


def bake_lora(
    model: str | os.PathLike,
    loras: Sequence[tuple[str | os.PathLike, float]],
    output: str | os.PathLike,
    *,
    layout: str | None = None,
) -> Path:
    """``model`` with LoRA files baked in, W ← W + s Δ for each (file, strength s), written to ``output``.

    The files are read as :func:`sdjax.lora.load_lora` reads them (diffusers/peft and kohya layouts, both the
    UNet's and the text encoder's adapters, and the LyCORIS kinds it supports); the result is a plain model
    that needs no adapter at run time. ``layout``: "compvis", "diffusers" or "sdjax" (default: the input's).
    """
    from sdjax import convert, lora

    sd = convert.load(model)
    for path, strength in loras:
        lora.load_lora(path, sd.unet, sd.text_encoder, scale=strength)
        for module in (m for m in (sd.unet, sd.text_encoder) if lora.lora_layers(m)):
            lora.fuse_lora(module)
            lora.remove_lora(module)
    return convert.save(sd, output, layout=layout or Checkpoint(model).layout)
