"""Helpers for parity tests against the PyTorch reference implementations (diffusers).

``load_torch_state`` copies a PyTorch ``state_dict`` into an sdjax module, translating names and
layouts: sdjax names follow diffusers, except that Flax calls a weight ``kernel`` (convolutions
(kh, kw, in, out), linears (in, out)) or ``scale`` (norms), and ``to_out`` is one Linear rather than
diffusers' ``to_out = [Linear, Dropout]``.
"""

from __future__ import annotations

import numpy as np
from flax import nnx

from sdjax.io import flatten, unflatten_like


def torch_name(path: str) -> str:
    parts = path.split(".")
    *body, leaf = parts
    body = [p + ".0" if p == "to_out" else p for p in body]
    return ".".join(body + ["weight" if leaf in ("kernel", "scale") else leaf])


def to_flax_layout(name: str, w: np.ndarray) -> np.ndarray:
    if name.endswith("kernel"):
        if w.ndim == 4:  # conv (out, in, kh, kw) → (kh, kw, in, out)
            return w.transpose(2, 3, 1, 0)
        if w.ndim == 2:  # linear (out, in) → (in, out)
            return w.T
    return w


def load_torch_state(module: nnx.Module, state_dict: dict) -> None:
    """Copy a torch state_dict into ``module`` in place; every parameter must be matched."""
    template = nnx.state(module, nnx.Param)
    sd = {k: v.detach().cpu().numpy() for k, v in state_dict.items()}
    used = set()
    flat = {}
    for name in flatten(template):
        key = torch_name(name)
        assert key in sd, f"{key} (for {name}) not in the torch state dict"
        flat[name] = to_flax_layout(name, sd[key])
        used.add(state_dict[key].data_ptr())
    # a module registered under two names (diffusers' Downsample2D: conv and Conv2d_0) shares storage
    left = [k for k, v in state_dict.items() if v.data_ptr() not in used]
    assert not left, f"torch tensors left unmatched: {left[:5]}"
    nnx.update(module, unflatten_like(template, flat))


def nchw(x) -> np.ndarray:
    return np.array(np.asarray(x).transpose(0, 3, 1, 2))  # a writable copy, as torch.from_numpy wants


def nhwc(x) -> np.ndarray:
    return np.asarray(x).transpose(0, 2, 3, 1)


def rel_err(a, b) -> float:
    """max |a − b| / max |b|: a relative error that is robust to entries near zero."""
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.max(np.abs(a - b)) / max(np.max(np.abs(b)), 1e-12))


__all__ = ["load_torch_state", "nchw", "nhwc", "rel_err"]
