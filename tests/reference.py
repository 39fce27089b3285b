"""Helpers for parity tests against the PyTorch reference implementations (diffusers, transformers).

``load_torch_state`` copies a live PyTorch module's ``state_dict`` into an sdjax module with
:mod:`sdjax.convert`'s name and layout rules (the same code that loads real checkpoints), after
dropping the aliases a live module can have: diffusers' ``Downsample2D`` registers one convolution
under two names (``conv`` and ``Conv2d_0``), so both appear in its state dict, sharing storage.
"""

from __future__ import annotations

import numpy as np
from flax import nnx

from sdjax.convert import load_state_dict, state_dict_names


def load_torch_state(module: nnx.Module, state_dict: dict) -> None:
    """Copy a torch state_dict into ``module`` in place; every parameter must be matched."""
    expected = set(state_dict_names(module))
    used = {state_dict[name].data_ptr() for name in expected if name in state_dict}
    weights = {
        name: tensor.detach().cpu().numpy()
        for name, tensor in state_dict.items()
        if name in expected or tensor.data_ptr() not in used  # an alias of a matched tensor is dropped
    }
    load_state_dict(module, weights, source="reference state_dict")


def nchw(x) -> np.ndarray:
    return np.array(np.asarray(x).transpose(0, 3, 1, 2))  # a writable copy, as torch.from_numpy wants


def nhwc(x) -> np.ndarray:
    return np.asarray(x).transpose(0, 2, 3, 1)


def rel_err(a, b) -> float:
    """max |a − b| / max |b|: a relative error that is robust to entries near zero."""
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.max(np.abs(a - b)) / max(np.max(np.abs(b)), 1e-12))


__all__ = ["load_torch_state", "nchw", "nhwc", "rel_err"]
