"""Textual inversion: a new word for the text encoder, learned as one or a few embedding vectors.

Gal et al. 2022 (arXiv:2208.01618) teach a frozen Stable Diffusion a concept — a cat, a style — from
3–5 images without touching any network. A new pseudo-word S* ("<my-cat>") enters the tokenizer and
gets a fresh row v* in CLIP's token-embedding table E (D wide: 768 in SD1, 1024 in SD2); only v* is
trained, on the usual denoising loss, with prompts such as "a photo of S*":

    v* = argmin_v  E_{z, y, ε, t} ‖ ε − ε_θ(z_t, t, c_θ(y; E[S*] = v)) ‖²

so the result is a few kilobytes that any copy of the same base model can load. Starting v from the
embedding of a related word ("cat") is the usual initialisation (:func:`initialize_from`). An
embedding may also hold n vectors: then S* stands for n tokens in a row, which diffusers names
S*, S*_1, …, S*_{n−1} and writes into every prompt that mentions S* (:meth:`sdjax.tokenizer.CLIPTokenizer.expand`).

The files, all read by :func:`load_embeddings` as {token: (n, D) float32}:

    diffusers  learned_embeds.safetensors / .bin   {token: (D,) or (n, D)}
    A1111      name.pt                              {"string_to_param": {"*": (n, D)}, "name": token, ...}
    A1111      name.safetensors                     {"emb_params": (n, D)}   (the token is the file's name)

Usage:

    emb = load_embeddings("learned_embeds.safetensors")      # {"<cat-toy>": (1, 768)}
    add_embeddings(sd.tokenizer, sd.text_encoder, emb)       # new ids, new rows of E
    ids = sd.tokenizer(sd.tokenizer.expand("a <cat-toy> backpack"))

    add_token(sd.tokenizer, sd.text_encoder, "<my-cat>", init_word="cat")   # to train one: rows from "cat",
    mask = new_rows_mask(sd.tokenizer, sd.text_encoder, ["<my-cat>"])       # (V,) True on the rows to update
    save_embeddings("my-cat.safetensors", read_embeddings(sd.tokenizer, sd.text_encoder, ["<my-cat>"]))

One side effect of SD's text-encoder configs: their ``eos_token_id`` is the legacy 2, so CLIP's pooled
output is read at the largest id of each row (:func:`sdjax.models.clip.eos_positions`), which is a new
token's whenever a prompt uses one — as in transformers. SD1/SD2 condition on the per-token states,
not on the pooled vector, so images are unaffected.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Mapping, Sequence
from pathlib import Path

import jax.numpy as jnp
import numpy as np
from flax import nnx
from safetensors.numpy import save_file

from sdjax.convert import read_state_dict
from sdjax.models.clip import CLIPTextModel
from sdjax.tokenizer import CLIPTokenizer

DIFFUSERS_FILES = ("learned_embeds.safetensors", "learned_embeds.bin")  # what diffusers looks for in a folder
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt")
A1111_KEY = "emb_params"  # the one tensor of an A1111 .safetensors embedding
# Token-vector width D -> the text encoder that has it, for error messages.
ENCODERS = {
    768: "SD1.x: OpenAI CLIP ViT-L/14",
    1024: "SD2.x: OpenCLIP ViT-H/14",
    1280: "SDXL's second text encoder: OpenCLIP ViT-bigG/14",
}


# ---------------------------------------------------------------------------------------------------
# Files
# ---------------------------------------------------------------------------------------------------


def load_embeddings(path: str | os.PathLike, token: str | None = None) -> dict[str, np.ndarray]:
    """A textual-inversion file (or a folder holding ``learned_embeds.safetensors``/``.bin``) ->
    {token: (n_vectors, D) float32}.

    The token is ``token`` if given, else what the file says: a diffusers file's key, an A1111 ``.pt``'s
    "name" — both as diffusers' ``load_textual_inversion`` decides — or, for an A1111 ``.safetensors``
    (which stores no name), the file's stem, as A1111 does (diffusers would call it "emb_params").
    Pickles (.bin, .pt) are read with ``torch.load(weights_only=True)``, so they need PyTorch and
    cannot run code; ``.safetensors`` needs neither.
    """
    path = Path(path)
    if path.is_dir():
        found = [path / name for name in DIFFUSERS_FILES if (path / name).is_file()]
        if not found:
            raise FileNotFoundError(
                f"{path} holds no {' or '.join(DIFFUSERS_FILES)}; pass the embedding file itself "
                "(.safetensors, .pt, .bin)"
            )
        path = found[0]
    if not path.is_file():
        raise FileNotFoundError(f"no such textual-inversion file: {path}. Check the path.")
    if path.suffix in PICKLE_SUFFIXES:
        data = _torch_load(path)
    elif path.suffix == ".safetensors":
        data = read_state_dict(path)
    else:
        raise ValueError(
            f"{path}: unknown embedding format {path.suffix!r}; expected .safetensors or {PICKLE_SUFFIXES}"
        )
    name, vectors = _token_and_vectors(data, path)
    if token is None and name is None:
        raise ValueError(f"{path} holds a bare tensor with no token name: pass token='<your-token>'")
    vectors = np.asarray(vectors, np.float32)
    vectors = vectors[None] if vectors.ndim == 1 else vectors
    if vectors.ndim != 2:
        raise ValueError(f"{path}: the embedding has shape {vectors.shape}; expected (D,) or (n_vectors, D)")
    return {token or name: vectors}


def _token_and_vectors(data, path: Path) -> tuple[str | None, np.ndarray]:
    """The token a file names (None if it names none) and its vectors, for each known layout."""
    if isinstance(data, np.ndarray):  # a bare tensor saved with torch.save
        return None, data
    if not isinstance(data, dict):
        raise ValueError(f"{path} holds a {type(data).__name__}, not a textual-inversion embedding")
    if "string_to_param" in data:  # A1111 .pt
        params = data["string_to_param"]
        if len(params) != 1:
            raise ValueError(f"{path} holds {len(params)} embeddings ({sorted(params)}); sdjax reads files with one")
        name = data.get("name")
        return (name if isinstance(name, str) and name else path.stem), next(iter(params.values()))
    if A1111_KEY in data:  # A1111 .safetensors
        return path.stem, data[A1111_KEY]
    if {"clip_l", "clip_g"} <= data.keys():
        raise ValueError(f"{path} is an SDXL embedding (clip_l + clip_g); sdjax runs SD1.x/2.x, which take one")
    if len(data) == 1:  # diffusers: {token: vectors}
        return next(iter(data.items()))
    raise ValueError(
        f"{path} is not a textual-inversion embedding: expected one {{token: tensor}} (diffusers), "
        f"'string_to_param' (A1111 .pt) or '{A1111_KEY}' (A1111 .safetensors); found keys {sorted(data)[:8]}"
    )


def _torch_load(path: Path):
    """A PyTorch pickle through ``torch.load(weights_only=True)``, its tensors as float32 numpy arrays."""
    try:
        import torch
    except ImportError as e:
        raise ImportError(
            f"{path.name} is a PyTorch pickle and reading one needs PyTorch (pip install torch), which sdjax "
            "itself does not use. Convert it to .safetensors once where PyTorch is installed: "
            f"save_embeddings('{path.stem}.safetensors', load_embeddings('{path.name}'))"
        ) from e
    import pickle

    try:
        obj = torch.load(str(path), map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        raise ValueError(
            f"{path} holds Python objects besides tensors, and sdjax only loads pickles with "
            "torch.load(weights_only=True) so that a file cannot run code. Use a .safetensors version of it."
        ) from e
    except (RuntimeError, EOFError, OSError) as e:
        raise ValueError(f"{path} could not be read as a PyTorch file ({e}); it may be truncated or corrupt") from e

    def to_numpy(x):
        if torch.is_tensor(x):
            return x.detach().float().numpy()
        return {k: to_numpy(v) for k, v in x.items()} if isinstance(x, dict) else x

    return to_numpy(obj)


def save_embeddings(path: str | os.PathLike, embeddings: Mapping[str, np.ndarray], format: str = "diffusers") -> Path:
    """Write one embedding {token: (n, D) or (D,)} as ``.safetensors``; returns the path.

    format="diffusers": {token: (n, D)} float32, what diffusers' ``load_textual_inversion`` reads
    (name it ``learned_embeds.safetensors`` for a folder). format="a1111": {"emb_params": (n, D)};
    A1111 names the embedding after the file, so save it as ``<token>.safetensors``.
    """
    path = Path(path)
    if format not in ("diffusers", "a1111"):
        raise ValueError(f'format must be "diffusers" or "a1111", got {format!r}')
    if path.suffix != ".safetensors":
        raise ValueError(f"{path}: sdjax writes embeddings as .safetensors only (no pickles); use that suffix")
    if len(embeddings) != 1:
        raise ValueError(
            f"a textual-inversion file holds one embedding, got {len(embeddings)} ({sorted(embeddings)}): "
            "save one file per token"
        )
    ((token, vectors),) = embeddings.items()
    vectors = np.asarray(vectors, np.float32)
    vectors = np.ascontiguousarray(vectors[None] if vectors.ndim == 1 else vectors)
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file({token if format == "diffusers" else A1111_KEY: vectors}, str(path))
    return path


# ---------------------------------------------------------------------------------------------------
# Tokenizer and text encoder
# ---------------------------------------------------------------------------------------------------


def _table(text_encoder: CLIPTextModel) -> nnx.Param:
    return text_encoder.embeddings.token_embedding.embedding


def _ids(tokenizer: CLIPTokenizer, tokens: str | Sequence[str]) -> list[int]:
    """The rows of ``tokens``, each with all its vectors."""
    tokens = [tokens] if isinstance(tokens, str) else tokens
    missing = [t for t in tokens if t not in tokenizer.added_tokens]
    if missing:
        raise ValueError(f"{missing} are not added tokens of this tokenizer; add them first (add_embeddings/add_token)")
    return [tokenizer.vocab[name] for t in tokens for name in tokenizer.vector_tokens(t)]


def _set_rows(text_encoder: CLIPTextModel, ids: Sequence[int], vectors: np.ndarray) -> None:
    """E[ids] = vectors (n, D), growing E (V, D) with zero rows up to max(ids) + 1; the config follows."""
    table = np.asarray(_table(text_encoder)[...])  # in NumPy: no XLA compilation for a one-off edit
    rows = max(table.shape[0], max(ids, default=-1) + 1)
    grown = np.zeros((rows, table.shape[1]), table.dtype)
    grown[: table.shape[0]] = table
    grown[list(ids)] = vectors
    embed = text_encoder.embeddings.token_embedding
    embed.embedding, embed.num_embeddings = nnx.Param(jnp.asarray(grown)), rows
    if rows != text_encoder.config.vocab_size:
        text_encoder.config = dataclasses.replace(text_encoder.config, vocab_size=rows)


def _describe(width: int) -> str:
    return f"{width} wide ({ENCODERS[width]})" if width in ENCODERS else f"{width} wide"


def add_embeddings(
    tokenizer: CLIPTokenizer, text_encoder: CLIPTextModel, embeddings: Mapping[str, np.ndarray]
) -> list[str]:
    """Add each {token: (n, D) or (D,)} to the tokenizer and its vectors to the text encoder's table, in place.

    A token of n vectors becomes the n tokens token, token_1, ..., token_{n−1}
    (:meth:`sdjax.tokenizer.CLIPTokenizer.expand` makes prompts use all of them); their ids are the
    tokenizer's next free ones, and E grows to match. Returns the tokens added, in order. Checks
    everything before changing anything: every vector must be D wide, D of the encoder, and no token
    may exist already.
    """
    table = _table(text_encoder)
    width = table.shape[1]
    tokens, rows = [], []
    for token, vectors in embeddings.items():
        vectors = np.asarray(vectors, np.float32)
        vectors = vectors[None] if vectors.ndim == 1 else vectors
        if vectors.ndim != 2 or vectors.shape[1] != width:
            got = f"{_describe(vectors.shape[-1])} vectors" if vectors.ndim == 2 else f"shape {vectors.shape}"
            raise ValueError(
                f"embedding {token!r} has {got}, but this text encoder's token vectors are {_describe(width)}: "
                "an embedding works only with the kind of model it was trained for; use one made for this model"
            )
        tokens += [token] + [f"{token}_{i}" for i in range(1, len(vectors))]
        rows.append(vectors)
    last = max(tokenizer.id_to_token)
    if last >= table.shape[0]:
        raise ValueError(
            f"the tokenizer has ids up to {last} but the text encoder's table has only {table.shape[0]} rows: "
            "they do not belong to the same model"
        )
    ids = tokenizer.add_tokens(tokens)  # raises, adding nothing, if any token exists
    _set_rows(text_encoder, ids, np.concatenate(rows) if rows else np.zeros((0, width), np.float32))
    return tokens


def read_embeddings(
    tokenizer: CLIPTokenizer, text_encoder: CLIPTextModel, tokens: str | Sequence[str]
) -> dict[str, np.ndarray]:
    """The current vectors of added tokens, {token: (n, D) float32}: what :func:`save_embeddings` writes
    after training (the inverse of :func:`add_embeddings`)."""
    tokens = [tokens] if isinstance(tokens, str) else tokens
    table = np.asarray(_table(text_encoder)[...], np.float32)
    return {t: table[_ids(tokenizer, t)] for t in tokens}


def _word_vector(tokenizer: CLIPTokenizer, text_encoder: CLIPTextModel, word: str) -> np.ndarray:
    """E[id] of a word the tokenizer keeps as one token: (D,)."""
    ids = tokenizer.encode(word)
    if len(ids) != 1:
        pieces = [tokenizer.decode([i], skip_special_tokens=False) for i in ids]
        raise ValueError(
            f"init_word {word!r} is {len(ids)} tokens ({pieces}), not one: pick a word the tokenizer keeps whole "
            "(a common English word such as 'cat', 'dog' or 'painting')"
        )
    return np.asarray(_table(text_encoder)[ids[0]], np.float32)


def initialize_from(tokenizer: CLIPTokenizer, text_encoder: CLIPTextModel, token: str, init_word: str) -> None:
    """Copy the embedding of ``init_word`` (one token, e.g. "cat") into every vector of the added ``token``."""
    ids = _ids(tokenizer, token)
    vector = _word_vector(tokenizer, text_encoder, init_word)
    _set_rows(text_encoder, ids, np.tile(vector, (len(ids), 1)))


def add_token(
    tokenizer: CLIPTokenizer, text_encoder: CLIPTextModel, token: str, *, init_word: str, num_vectors: int = 1
) -> list[str]:
    """A new concept to train: ``token`` with ``num_vectors`` vectors, each a copy of ``init_word``'s embedding.

    :func:`add_embeddings` then :func:`initialize_from`, with ``init_word`` checked first so that a bad
    one changes nothing. Returns the tokens added.
    """
    if num_vectors < 1:
        raise ValueError(f"num_vectors must be at least 1, got {num_vectors}")
    vector = _word_vector(tokenizer, text_encoder, init_word)
    return add_embeddings(tokenizer, text_encoder, {token: np.tile(vector, (num_vectors, 1))})


def new_rows_mask(tokenizer: CLIPTokenizer, text_encoder: CLIPTextModel, tokens: str | Sequence[str]) -> np.ndarray:
    """(V,) bool over the rows of E, True on every vector of ``tokens``: the rows a trainer updates.

    With it the other V − n rows stay fixed, e.g. E ← m ⊙ E + (1 − m) ⊙ stop_gradient(E) in the loss
    (m = mask[:, None]), or the update multiplied by m. ``np.flatnonzero(mask)`` gives the row ids.
    """
    mask = np.zeros(_table(text_encoder).shape[0], bool)
    mask[_ids(tokenizer, tokens)] = True
    return mask


__all__ = [
    "add_embeddings",
    "add_token",
    "initialize_from",
    "load_embeddings",
    "new_rows_mask",
    "read_embeddings",
    "save_embeddings",
]
