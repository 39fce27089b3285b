"""LyCORIS adapters: LoHa and LoKr, the two LyCORIS algorithms whose update is not a plain low-rank product.

Both describe an update ΔW of a weight in PyTorch's layout, W_t (out, in) for a linear layer or (out, in, kh, kw)
for a convolution, flattened to a matrix (out, in·kh·kw) (the kernel's spatial dims go with its inputs):

* **LoHa** (Hadamard product of two low-rank matrices; FedPara, Hyeon-Woo et al. 2021, arXiv:2108.06098):

      ΔW = (α / r) · (w1a w1b) ⊙ (w2a w2b)        w1a, w2a (out, r); w1b, w2b (r, in·kh·kw)

  rank up to r² from 2 r (out + in) numbers.
* **LoKr** (Kronecker product; Edalati et al. 2022, arXiv:2212.10650):

      ΔW = c · w1 ⊗ w2        w1 (a, c₁), w2 (b, d·kh·kw), out = a b, in = c₁ d

  where either factor may itself be low rank in the file (``lokr_w1_a`` (a, r) ``lokr_w1_b`` (r, c₁), and
  the same for w2). c = α / r, r the inner width of the factored one; c = 1 when both are full (LyCORIS then
  ignores α). For a convolution, ``lokr_w2`` is either (b, d, kh, kw) or factored with ``lokr_w2_b``
  (r, d·kh·kw); the Kronecker product of the flattened matrices, reshaped to (out, in, kh, kw), is the
  same thing as LyCORIS's product of w1 (a, c₁, 1, 1) with w2 (b, d, kh, kw).

α = 0 or a missing α means α = r. The strength s multiplies ΔW, so the layer computes x (W + s ΔW) + b.

These adapters compute ΔW from their factors at call time (cheap next to the layer itself at SD's sizes), so
s stays array state: a new strength does not recompile, and :func:`sdjax.lora.fuse_lora` bakes ΔW in for
inference at the base model's cost. They hold what a file gives: sdjax loads LoHa and LoKr files
(:func:`sdjax.lora.load_lora`) and writes them back (``save_lora(..., format="kohya")``), but trains only
LoRA/LoCon (:class:`sdjax.lora.LoRALinear`). The factors are :class:`sdjax.lora.LoRAParam`, in the file's
(PyTorch) layout, under the file's names.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from sdjax.lora.layers import Adapter, LoRAParam

Array = jax.Array


def to_kernel_layout(delta: Array, kernel_shape: tuple[int, ...]) -> Array:
    """A PyTorch-layout update (out, in·kh·kw) as an sdjax kernel: (in, out), or (kh, kw, in, out)."""
    kh, kw, d_in, d_out = kernel_shape if len(kernel_shape) == 4 else (1, 1, *kernel_shape)
    return delta.reshape(d_out, d_in, kh, kw).transpose(2, 3, 1, 0).reshape(kernel_shape)


def torch_weight_shape(kernel_shape: tuple[int, ...]) -> tuple[int, ...]:
    """The PyTorch weight shape of an sdjax kernel: (in, out) → (out, in); (kh, kw, in, out) → (out, in, kh, kw)."""
    if len(kernel_shape) == 2:
        return kernel_shape[1], kernel_shape[0]
    kh, kw, d_in, d_out = kernel_shape
    return d_out, d_in, kh, kw


class _WeightDelta(Adapter):
    """An adapter that adds s · ΔW to W before the layer's own computation: y = x (W + s ΔW) + b."""

    def _factors(self, names: tuple[str, ...], tensors: dict[str, np.ndarray]) -> None:
        for name in names:
            value = tensors.get(name)
            setattr(self, name, None if value is None else LoRAParam(jnp.asarray(value, self.kernel.dtype)))

    def torch_delta(self) -> Array:
        """ΔW at s = 1 in PyTorch's layout, flattened: (out, in·kh·kw), float32."""
        raise NotImplementedError

    def delta(self, scale: float | Array) -> Array:
        update = jnp.asarray(scale, jnp.float32) * to_kernel_layout(self.torch_delta(), self.kernel.shape)
        return update.astype(self.kernel.dtype)

    def __call__(self, x: Array) -> Array:
        w = self.kernel[...]
        if self.fused_scale is None:
            w = w + self.delta(self.lora_scale[...])
        return self.base_forward(x, w)

    def file_tensors(self) -> dict[str, np.ndarray]:
        """The factors as the file names them (float32, PyTorch layout), and α."""
        factors = {name: getattr(self, name) for name in self.FACTORS}
        out = {name: np.asarray(p[...], np.float32) for name, p in factors.items() if p is not None}
        return out | {"alpha": np.array(self.alpha, np.float32)}


def _f32(p: LoRAParam) -> Array:
    return p[...].astype(jnp.float32)


class LoHa(_WeightDelta):
    """LoHa:   ΔW = (α / r) · (w1a w1b) ⊙ (w2a w2b), from a file's ``hada_w1_a`` (out, r), ``hada_w1_b``
    (r, in·kh·kw), ``hada_w2_a``, ``hada_w2_b`` (PyTorch layout; see the module docstring)."""

    FACTORS = ("hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b")

    def __init__(self, base, tensors: dict[str, np.ndarray], *, alpha: float | None = None, scale: float = 1.0):
        rank = tensors["hada_w1_b"].shape[0]
        super().__init__(base, alpha=rank if not alpha else alpha, scale=scale)
        self._factors(self.FACTORS, tensors)

    @property
    def rank(self) -> int:
        return self.hada_w1_b.shape[0]

    def torch_delta(self) -> Array:
        w1 = _f32(self.hada_w1_a) @ _f32(self.hada_w1_b)
        w2 = _f32(self.hada_w2_a) @ _f32(self.hada_w2_b)
        return (self.lora_alpha[...] / self.rank) * (w1 * w2)


class LoKr(_WeightDelta):
    """LoKr:   ΔW = c · w1 ⊗ w2, from a file's ``lokr_w1`` (a, c₁) or ``lokr_w1_a`` ``lokr_w1_b``, and
    ``lokr_w2`` (b, d[, kh, kw]) or ``lokr_w2_a`` (b, r) ``lokr_w2_b`` (r, d·kh·kw); c = α / r with r the
    factored pair's inner width, 1 when both are full (see the module docstring)."""

    FACTORS = ("lokr_w1", "lokr_w1_a", "lokr_w1_b", "lokr_w2", "lokr_w2_a", "lokr_w2_b")

    def __init__(self, base, tensors: dict[str, np.ndarray], *, alpha: float | None = None, scale: float = 1.0):
        rank = lokr_rank(tensors)
        super().__init__(base, alpha=alpha or rank or 1.0, scale=scale)  # (unused when both are full)
        self.factored_rank = rank  # None: both factors full, c = 1
        self._factors(self.FACTORS, tensors)

    @property
    def rank(self) -> int:
        return self.factored_rank or 1

    def _part(self, full: LoRAParam | None, a: LoRAParam | None, b: LoRAParam | None) -> Array:
        w = _f32(full) if full is not None else _f32(a) @ _f32(b).reshape(b.shape[0], -1)
        return w.reshape(w.shape[0], -1)

    def torch_delta(self) -> Array:
        w1 = self._part(self.lokr_w1, self.lokr_w1_a, self.lokr_w1_b)
        w2 = self._part(self.lokr_w2, self.lokr_w2_a, self.lokr_w2_b)
        c = 1.0 if self.factored_rank is None else self.lora_alpha[...] / self.factored_rank
        return c * jnp.kron(w1, w2)


def lokr_rank(tensors: dict[str, np.ndarray]) -> int | None:
    """r of a LoKr layer: the inner width of its factored w1 (else w2) pair; None when both are full."""
    for name in ("lokr_w1_a", "lokr_w2_a"):
        if name in tensors:
            return tensors[name].shape[1]
    return None


def loha_shape(t: dict[str, np.ndarray]) -> tuple[int, int]:
    """The flattened (out, in·kh·kw) a LoHa layer's factors make (raises ValueError if they do not chain)."""
    missing = [n for n in LoHa.FACTORS if n not in t]
    if missing:
        raise ValueError(f"LoHa needs {', '.join(missing)} too")
    w1a, w1b, w2a, w2b = (t[n] for n in LoHa.FACTORS)
    if not (w1a.ndim == w1b.ndim == 2 and w1a.shape == w2a.shape and w1b.shape == w2b.shape):
        raise ValueError(f"LoHa factors of mismatched shapes {[t[n].shape for n in LoHa.FACTORS]}")
    if w1a.shape[1] != w1b.shape[0]:
        raise ValueError(f"hada_w1_a {w1a.shape} and hada_w1_b {w1b.shape} do not chain (ranks differ)")
    return w1a.shape[0], w1b.shape[1]


def lokr_shape(t: dict[str, np.ndarray]) -> tuple[int, int]:
    """The flattened (out, in·kh·kw) a LoKr layer's factors make (raises ValueError if they do not chain)."""
    sides = []
    for i in ("1", "2"):
        full, a, b = (t.get(f"lokr_w{i}{s}") for s in ("", "_a", "_b"))
        if full is not None:
            sides.append((full.shape[0], int(np.prod(full.shape[1:]))))
        elif a is not None and b is not None and a.ndim == 2 and a.shape[1] == b.shape[0]:
            sides.append((a.shape[0], int(np.prod(b.shape[1:]))))
        else:
            shapes = {n: t[n].shape for n in (f"lokr_w{i}_a", f"lokr_w{i}_b") if n in t}
            raise ValueError(f"LoKr's w{i} needs lokr_w{i} or a chaining lokr_w{i}_a, lokr_w{i}_b (found {shapes})")
    (a, c1), (b, m) = sides
    return a * b, c1 * m
