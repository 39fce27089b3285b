"""Saving and loading pytrees (model weights, training state) as safetensors files.

A pytree is flattened to ``{"path.to.leaf": array}`` — the same dotted names people see in diffusers
checkpoints — and written with ``safetensors`` (no pickle: loading a file can never run code).
Loading always goes *into a template* of the expected structure, so a missing, unexpected or
wrongly-shaped tensor is an error that names it, never silently random weights.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import jax
import numpy as np
from flax import nnx
from safetensors import SafetensorError, safe_open
from safetensors.numpy import load_file, save_file


def _key_str(entry) -> str:
    for attr in ("key", "name", "idx"):
        if hasattr(entry, attr):
            return str(getattr(entry, attr))
    return str(entry)


def path_str(path) -> str:
    """A pytree path as the dotted name checkpoints use ("encoder.conv_in.kernel")."""
    # An nnx Variable (Param ...) is a pytree node whose array sits in its ``.value`` attribute; leave
    # that step out so names read "encoder.conv_in.kernel", as in every other checkpoint format.
    return ".".join(_key_str(k) for k in path if not (isinstance(k, jax.tree_util.GetAttrKey) and k.name == "value"))


def listing(names: list[str], limit: int = 5) -> str:
    """The first ``limit`` of ``names`` for an error message: "a, b, c and 4 more"."""
    more = f" and {len(names) - limit} more" if len(names) > limit else ""
    return ", ".join(names[:limit]) + more


def check_fit(
    expected: dict[str, tuple], found: dict[str, tuple], *, source: str, target: str, hint: str, ignored=()
) -> None:
    """One ValueError naming every tensor a model expects that ``source`` lacks, every one it has that the
    model does not (names ending in ``ignored`` aside), and every shape mismatch; nothing if all fit.

    expected, found: {name: shape}, the model's and the file's, in the same naming and layout.
    """
    missing = sorted(n for n in expected if n not in found)
    unexpected = sorted(n for n in found if n not in expected and not n.endswith(tuple(ignored)))
    mismatched = [
        f"{n}: checkpoint {tuple(found[n])} vs model {tuple(shape)}"
        for n, shape in expected.items()
        if n in found and tuple(found[n]) != tuple(shape)
    ]
    problems = [
        f"{len(names)} {what} ({listing(names, limit)})"
        for names, what, limit in (
            (missing, "tensors missing", 5),
            (unexpected, "unexpected tensors", 5),
            (mismatched, "shape mismatches", 3),
        )
        if names
    ]
    if problems:
        raise ValueError(f"{source} does not fit {target}: " + "; ".join(problems) + f". {hint}")


def flatten(tree) -> dict[str, np.ndarray]:
    """{"a.b.0.kernel": np.ndarray} for every array leaf of ``tree`` (None leaves are skipped)."""
    return {path_str(path): np.asarray(leaf) for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]}


def _dtype(leaf) -> np.dtype:
    """A template leaf's dtype: an array's, or a jax.ShapeDtypeStruct's (an abstract model, nnx.eval_shape)."""
    return np.dtype(leaf.dtype) if hasattr(leaf, "dtype") else np.asarray(leaf).dtype


def unflatten_like(template, flat: dict[str, np.ndarray], *, source: str = "checkpoint"):
    """Fill ``template``'s structure with the arrays of ``flat`` (as produced by :func:`flatten`), each cast
    to its template leaf's dtype. The template may be abstract (``jax.ShapeDtypeStruct`` leaves).

    Raises ValueError naming every missing/unexpected key and every shape mismatch.
    """
    paths_leaves, treedef = jax.tree_util.tree_flatten_with_path(template)
    names = [path_str(path) for path, _ in paths_leaves]
    check_fit(
        {n: np.shape(leaf) for n, (_, leaf) in zip(names, paths_leaves)},
        {n: a.shape for n, a in flat.items()},
        source=source,
        target="the model it is loaded into",
        hint="Was it saved from a model with a different config? Build the model with the config it was saved with.",
    )
    leaves = [np.asarray(flat[n]).astype(_dtype(leaf), copy=False) for n, (_, leaf) in zip(names, paths_leaves)]
    return jax.tree_util.tree_unflatten(treedef, leaves)


def save_tree(path: str | os.PathLike, tree, metadata: dict | None = None) -> None:
    """Write ``tree`` to a safetensors file atomically (a crash mid-write leaves the old file intact).

    ``metadata`` is any JSON-serialisable dict, stored in the file header.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    flat = {k: np.array(v, order="C") for k, v in flatten(tree).items()}  # (ascontiguousarray makes 0-d 1-d)
    save_file(flat, str(tmp), metadata={"sdjax": json.dumps(metadata or {})})
    umask = os.umask(0)  # safetensors creates the file owner-only; give it the usual permissions
    os.umask(umask)
    os.chmod(tmp, 0o666 & ~umask)
    os.replace(tmp, path)


def read(path: str | os.PathLike) -> tuple[dict[str, np.ndarray], dict]:
    """The flat ``{name: array}`` dict and sdjax metadata of a safetensors file, with clear errors."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no such file: {path}. Check the path (a directory is not a weights file).")
    try:
        flat = load_file(str(path))
        with safe_open(str(path), framework="numpy") as f:
            metadata = json.loads((f.metadata() or {}).get("sdjax", "{}"))
    except (SafetensorError, ValueError, OSError) as e:
        raise ValueError(
            f"{path} is not a readable safetensors file ({e}); it may be truncated or another format."
        ) from e
    return flat, metadata


def load_tree(path: str | os.PathLike, template) -> tuple[object, dict]:
    """Read a file written by :func:`save_tree` into ``template``'s structure. Returns (tree, metadata)."""
    flat, metadata = read(path)
    return unflatten_like(template, flat, source=str(path)), metadata


def save_model(path: str | os.PathLike, model: nnx.Module, metadata: dict | None = None) -> None:
    """Save a model's parameters (``nnx.Param`` leaves) to safetensors."""
    save_tree(path, nnx.state(model, nnx.Param), metadata)


def load_model(path: str | os.PathLike, model: nnx.Module) -> nnx.Module:
    """Load parameters saved by :func:`save_model` into ``model`` (built with the same config), in place."""
    params, _ = load_tree(path, nnx.state(model, nnx.Param))
    nnx.update(model, params)
    return model
