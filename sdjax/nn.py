"""The building blocks every sdjax model is made of.

One implementation of each block, shared by the toy models of the first notebooks and the full
Stable Diffusion networks: the autoencoder, the VAE (= SD's ``AutoencoderKL``) and the UNets are
all stacks of these.

Layout is NHWC everywhere inside sdjax (JAX/XLA's native convolution layout); converters to and from
PyTorch checkpoints (NCHW) transpose at the boundary. Attribute names follow diffusers
(``norm1``, ``conv1``, ``time_emb_proj``, ``to_q`` ...) so a weight's path reads the same in both.

Shapes in docstrings use B = batch, H/W = height/width, C = channels, T = tokens, D = embedding dim.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Iterator

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from sdjax.attention import ATTENTION_IMPLEMENTATIONS, attention

Array = jax.Array


def count_params(module: nnx.Module) -> int:
    """Number of trainable parameters (``nnx.Param`` entries) of a module."""
    return sum(p.size for p in jax.tree.leaves(nnx.state(module, nnx.Param)))


def sinusoidal_embedding(
    t: Array,
    dim: int,
    *,
    max_period: float = 10_000.0,
    flip_sin_to_cos: bool = True,
    freq_shift: float = 0.0,
) -> Array:
    """Transformer-style sinusoidal features of a scalar per example (a diffusion timestep).

    With half = dim // 2 and frequencies ω_i = max_period^(−i / (half − freq_shift)), i < half:

        emb(t) = [cos(ω_i t) ..., sin(ω_i t) ...]     (flip_sin_to_cos=True, Stable Diffusion)
        emb(t) = [sin(ω_i t) ..., cos(ω_i t) ...]     (flip_sin_to_cos=False, the DDPM paper)

    Low i are fast-changing features, high i slow ones, so nearby timesteps get similar vectors and
    the network can tell every step apart. (Vaswani et al. 2017, §3.5; Ho et al. 2020, App. B.)

    Args:
      t: (B,) timesteps, any real dtype (fractional t is fine).
      dim: output width D (odd D gets one zero column, as diffusers does).
    Returns:
      (B, D) float32.
    """
    half = dim // 2
    exponent = -math.log(max_period) * jnp.arange(half, dtype=jnp.float32) / (half - freq_shift)
    angles = t.astype(jnp.float32)[:, None] * jnp.exp(exponent)[None, :]
    sin, cos = jnp.sin(angles), jnp.cos(angles)
    emb = jnp.concatenate([cos, sin] if flip_sin_to_cos else [sin, cos], axis=-1)
    if dim % 2:
        emb = jnp.pad(emb, ((0, 0), (0, 1)))
    return emb


def group_norm(channels: int, groups: int, eps: float, rngs: nnx.Rngs) -> nnx.GroupNorm:
    """GroupNorm over (H, W, C/groups) per group, as ``torch.nn.GroupNorm``.

    ``use_fast_variance=False`` computes Var = E[(x − μ)²] rather than E[x²] − μ², which is what
    PyTorch does and is the numerically safe form in float32.
    """
    return nnx.GroupNorm(channels, num_groups=groups, epsilon=eps, use_fast_variance=False, rngs=rngs)


def conv(c_in: int, c_out: int, kernel: int, rngs: nnx.Rngs, *, stride: int = 1, padding=None) -> nnx.Conv:
    """A 2-D convolution with PyTorch's symmetric padding (k // 2 on each side unless given)."""
    if padding is None:
        padding = ((kernel // 2, kernel // 2),) * 2
    return nnx.Conv(c_in, c_out, (kernel, kernel), strides=stride, padding=padding, rngs=rngs)


class ResnetBlock(nnx.Module):
    """Pre-activation residual block, optionally conditioned on a time embedding.

        h = conv1(SiLU(GroupNorm(x)))
        h = h + W_t · SiLU(t_emb)                 (time-conditioned only; broadcast over H, W)
        h = conv2(SiLU(GroupNorm(h)))
        y = shortcut(x) + h                        (shortcut = 1×1 conv when C_in ≠ C_out)

    This is diffusers' ``ResnetBlock2D`` (the block of DDPM's UNet, SD's VAE and SD's UNet).

    Shapes: x (B, H, W, C_in), t_emb (B, D_t) → (B, H, W, C_out).
    """

    def __init__(
        self,
        c_in: int,
        c_out: int,
        *,
        temb_dim: int | None = None,
        groups: int = 32,
        eps: float = 1e-6,
        rngs: nnx.Rngs,
    ):
        self.norm1 = group_norm(c_in, groups, eps, rngs)
        self.conv1 = conv(c_in, c_out, 3, rngs)
        self.time_emb_proj = nnx.Linear(temb_dim, c_out, rngs=rngs) if temb_dim else None
        self.norm2 = group_norm(c_out, groups, eps, rngs)
        self.conv2 = conv(c_out, c_out, 3, rngs)
        self.conv_shortcut = conv(c_in, c_out, 1, rngs) if c_in != c_out else None

    def __call__(self, x: Array, temb: Array | None = None) -> Array:
        h = self.conv1(jax.nn.silu(self.norm1(x)))
        if self.time_emb_proj is not None:
            if temb is None:
                raise ValueError("this ResnetBlock is time-conditioned: pass temb of shape (B, D_t)")
            h = h + self.time_emb_proj(jax.nn.silu(temb))[:, None, None, :]
        h = self.conv2(jax.nn.silu(self.norm2(h)))
        shortcut = x if self.conv_shortcut is None else self.conv_shortcut(x)
        return shortcut + h


class Downsample(nnx.Module):
    """Halve H and W with a stride-2 3×3 convolution.

    ``asymmetric_pad=True`` pads only bottom/right by one pixel before an unpadded convolution — the
    variant in SD's VAE encoder (diffusers ``Downsample2D(padding=0)``); the UNet pads 1 on all sides.
    Both give ceil(H/2) for even H; they differ in which pixels the kernel sees, so checkpoints care.

    Shapes: (B, H, W, C) → (B, H/2, W/2, C).
    """

    def __init__(self, channels: int, *, asymmetric_pad: bool = False, rngs: nnx.Rngs):
        padding = ((0, 1), (0, 1)) if asymmetric_pad else ((1, 1), (1, 1))
        self.conv = conv(channels, channels, 3, rngs, stride=2, padding=padding)

    def __call__(self, x: Array) -> Array:
        return self.conv(x)


def upsample_nearest(x: Array, size: tuple[int, int] | None = None) -> Array:
    """Nearest-neighbour upsampling: ×2, every pixel a 2×2 block, (B, H, W, C) → (B, 2H, 2W, C); or to ``size``
    = (H', W'), output pixel i copying input pixel ⌊i · H / H'⌋ (PyTorch's ``interpolate(mode="nearest")``, the
    ratio in float32 as there). A UNet's up path uses ``size`` where a level of odd size was halved (5 → 3):
    doubling back would give 6, and the skip connection it meets is 5."""
    if size is None or tuple(size) == (2 * x.shape[1], 2 * x.shape[2]):
        return jnp.repeat(jnp.repeat(x, 2, axis=1), 2, axis=2)

    def source(n_in: int, n_out: int) -> np.ndarray:
        ratio = np.float32(n_in) / np.float32(n_out)
        return np.minimum(np.floor(np.arange(n_out, dtype=np.float32) * ratio).astype(np.int64), n_in - 1)

    return x[:, source(x.shape[1], size[0])][:, :, source(x.shape[2], size[1])]


class Upsample(nnx.Module):
    """Double H and W: nearest-neighbour ×2 then a 3×3 convolution to smooth the blocks.

    Shapes: (B, H, W, C) → (B, 2H, 2W, C), or (B, H', W', C) for ``size`` = (H', W') (:func:`upsample_nearest`).
    """

    def __init__(self, channels: int, *, rngs: nnx.Rngs):
        self.conv = conv(channels, channels, 3, rngs)

    def __call__(self, x: Array, size: tuple[int, int] | None = None) -> Array:
        return self.conv(upsample_nearest(x, size))


def set_attention_implementation(module: nnx.Module, implementation: str) -> int:
    """Make every :class:`Attention` inside ``module`` use ``implementation`` ("auto", "xla" or "cudnn").

    The choice is a static attribute of each layer, part of the model's graph, so a jitted function
    that takes the model compiles anew after a change instead of running the old kernel. Returns the
    number of layers set. (CLIP's text encoder has its own attention and always runs "auto".)
    """
    if implementation not in ATTENTION_IMPLEMENTATIONS:
        raise ValueError(f"attention implementation {implementation!r}: expected one of {ATTENTION_IMPLEMENTATIONS}")
    layers = [m for _, m in nnx.iter_modules(module) if isinstance(m, Attention)]
    for layer in layers:
        layer.implementation = implementation
    return len(layers)


class Attention(nnx.Module):
    """Multi-head attention of queries from x over keys/values from a context (Vaswani et al. 2017):

        Q = x W_q,  K = c W_k,  V = c W_v,   out = W_o · concat_h softmax(Q_h K_hᵀ / √d) V_h

    with c = x (self-attention) or c = a text encoding (cross-attention, SD's UNet). diffusers'
    ``Attention``: SD's UNet projects q, k, v without bias (``bias=False``), the VAE with bias.

    ``upcast``: compute the softmax(QKᵀ)V in float32 even when the weights are bf16/fp16
    (SD2.1's ``upcast_attention``: its attention logits overflow half precision).
    ``implementation``: the kernel, "auto", "xla" or "cudnn" (:func:`attention_backend`;
    :func:`set_attention_implementation` changes it in a built model).

    Shapes: x (B, T, D_q), context (B, S, D_c) or None → (B, T, D_q); inner width = heads · head_dim.
    """

    def __init__(
        self,
        query_dim: int,
        *,
        heads: int,
        head_dim: int,
        context_dim: int | None = None,
        bias: bool = False,
        upcast: bool = False,
        implementation: str = "auto",
        rngs: nnx.Rngs,
    ):
        inner, context_dim = heads * head_dim, context_dim or query_dim
        self.heads, self.upcast, self.implementation = heads, upcast, implementation
        self.to_q = nnx.Linear(query_dim, inner, use_bias=bias, rngs=rngs)
        self.to_k = nnx.Linear(context_dim, inner, use_bias=bias, rngs=rngs)
        self.to_v = nnx.Linear(context_dim, inner, use_bias=bias, rngs=rngs)
        self.to_out = nnx.Linear(inner, query_dim, rngs=rngs)
        self.hypernetwork = nnx.data(None)  # a web-UI hypernetwork: rewrites the context of K, V (sdjax.hypernetwork)

    def key_value_contexts(self, context: Array) -> tuple[Array, Array]:
        """The contexts K and V are projected from: (c, c), or a hypernetwork's (c + s f_k(c), c + s f_v(c))."""
        return (context, context) if self.hypernetwork is None else self.hypernetwork(context)

    def attend(self, x: Array, context: Array | None = None) -> Array:
        """The attention output before the residual: (B, T, D_q), (B, S, D_c) → (B, T, D_q)."""
        context_k, context_v = self.key_value_contexts(x if context is None else context)
        q, k, v = self.to_q(x), self.to_k(context_k), self.to_v(context_v)
        split = lambda t: t.reshape(*t.shape[:2], self.heads, t.shape[-1] // self.heads)  # noqa: E731
        dtype = jnp.float32 if self.upcast else x.dtype  # one dtype for all three (a float32 context
        q, k, v = (split(a).astype(dtype) for a in (q, k, v))  # under a bf16 network would promote k, v)
        out = attention(q, k, v, implementation=self.implementation).astype(x.dtype)
        return self.to_out(out.reshape(*x.shape[:2], -1))

    def __call__(self, x: Array, context: Array | None = None) -> Array:
        return self.attend(x, context)


@contextlib.contextmanager
def record_cross_attention() -> Iterator[list[Array]]:
    """Record the weights of every cross-attention computed inside the ``with`` block: which token each position
    looks at. Yields a list that fills, call by call, with the (B, heads, T, S) softmax(Q Kᵀ / √d) of each
    :class:`Attention` given a context (self-attention is not recorded), in the order the network calls them.

        with record_cross_attention() as weights:
            unet(x_t, t, context)          # eagerly: under jax.jit the list would hold tracers
        maps = weights[0].mean(axis=1)     # (B, T = H·W, 77) for the first layer, averaged over heads

    The weights are recomputed from the layer's own projections (the attention kernels never materialise them),
    so recording costs one extra Q Kᵀ per call; the network's outputs are unchanged.
    """
    weights: list[Array] = []
    attend = Attention.attend

    def recording(self: Attention, x: Array, context: Array | None = None) -> Array:
        if context is not None:
            q, k = self.to_q(x), self.to_k(self.key_value_contexts(context)[0])
            q, k = (a.reshape(*a.shape[:2], self.heads, -1).astype(jnp.float32) for a in (q, k))
            scores = jnp.einsum("bthd,bshd->bhts", q, k) / math.sqrt(q.shape[-1])
            weights.append(jax.nn.softmax(scores, axis=-1))
        return attend(self, x, context)

    Attention.attend = recording
    try:
        yield weights
    finally:
        Attention.attend = attend


class SelfAttention(Attention):
    """Spatial self-attention with a residual connection, as in SD's VAE mid-block and the pixel UNet.

    Every pixel is a token: x (B, H, W, C) is normalised, flattened to (B, H·W, C), and each token
    attends to all others (:class:`Attention` with biases, context = the image itself):

        y = x + W_o · softmax(Q Kᵀ / √d) V,   Q, K, V = GroupNorm(x) W_{q,k,v}

    Shapes: (B, H, W, C) → (B, H, W, C). ``heads`` must divide C.
    """

    def __init__(self, channels: int, *, heads: int = 1, groups: int = 32, eps: float = 1e-6, rngs: nnx.Rngs):
        if channels % heads:
            raise ValueError(f"SelfAttention: heads={heads} must divide channels={channels}")
        self.group_norm = group_norm(channels, groups, eps, rngs)
        super().__init__(channels, heads=heads, head_dim=channels // heads, bias=True, rngs=rngs)

    def __call__(self, x: Array) -> Array:
        b, h, w, c = x.shape
        return x + self.attend(self.group_norm(x).reshape(b, h * w, c)).reshape(b, h, w, c)


class GEGLU(nnx.Module):
    """The gated GELU of SD's feed-forward (Shazeer 2020): [h, g] = x W + b, out = h ⊙ GELU(g).

    Shapes: (B, T, D) → (B, T, D_inner).
    """

    def __init__(self, dim: int, inner: int, *, rngs: nnx.Rngs):
        self.proj = nnx.Linear(dim, 2 * inner, rngs=rngs)

    def __call__(self, x: Array) -> Array:
        h, gate = jnp.split(self.proj(x), 2, axis=-1)
        return h * jax.nn.gelu(gate, approximate=False)


class FeedForward(nnx.Module):
    """The transformer's per-token MLP: D → GEGLU → 4D → D.  (B, T, D) → (B, T, D).

    diffusers keeps these in a list ``ff.net = [GEGLU, Dropout, Linear]``; sdjax names them
    ``geglu`` and ``proj_out`` (sdjax.convert maps the names).
    """

    def __init__(self, dim: int, *, mult: int = 4, rngs: nnx.Rngs):
        self.geglu = GEGLU(dim, mult * dim, rngs=rngs)
        self.proj_out = nnx.Linear(mult * dim, dim, rngs=rngs)

    def __call__(self, x: Array) -> Array:
        return self.proj_out(self.geglu(x))


class BasicTransformerBlock(nnx.Module):
    """Self-attention, cross-attention to the text, feed-forward; each pre-LayerNorm and residual:

        x = x + SelfAttn(LN₁(x))              pixels exchange information with each other
        x = x + CrossAttn(LN₂(x), c)          each pixel queries the text: K, V come from c
        x = x + FF(LN₃(x))

    Shapes: x (B, T, D) with T = H·W pixel tokens, context c (B, S, D_c) → (B, T, D).
    """

    def __init__(self, dim: int, *, heads: int, context_dim: int, upcast: bool = False, rngs: nnx.Rngs):
        ln = lambda: nnx.LayerNorm(dim, epsilon=1e-5, use_fast_variance=False, rngs=rngs)  # noqa: E731
        self.norm1 = ln()
        self.attn1 = Attention(dim, heads=heads, head_dim=dim // heads, upcast=upcast, rngs=rngs)
        self.norm2 = ln()
        self.attn2 = Attention(
            dim, heads=heads, head_dim=dim // heads, context_dim=context_dim, upcast=upcast, rngs=rngs
        )
        self.norm3 = ln()
        self.ff = FeedForward(dim, rngs=rngs)

    def __call__(self, x: Array, context: Array) -> Array:
        x = x + self.attn1(self.norm1(x))
        x = x + self.attn2(self.norm2(x), context)
        return x + self.ff(self.norm3(x))


class Transformer2D(nnx.Module):
    """The text-conditioned attention of SD's UNet: the feature map as a sequence of pixel tokens,
    through BasicTransformerBlocks, back to a map, plus the input (diffusers' ``Transformer2DModel``):

        h = proj_in(GroupNorm(x))  →  reshape (B, H·W, C)  →  blocks(h, c)  →  reshape  →  proj_out  →  + x

    proj_in/proj_out are 1×1 convolutions (SD1.x) or, equivalently on tokens, Linear layers (SD2.x,
    ``linear_projection=True``); the two store their weights in different layouts.

    Shapes: x (B, H, W, C), context (B, S, D_c) → (B, H, W, C).
    """

    def __init__(
        self,
        channels: int,
        *,
        heads: int,
        context_dim: int,
        layers: int = 1,
        groups: int = 32,
        linear_projection: bool = False,
        upcast: bool = False,
        rngs: nnx.Rngs,
    ):
        self.linear_projection = linear_projection
        proj = (
            (lambda: nnx.Linear(channels, channels, rngs=rngs))
            if linear_projection
            else (lambda: conv(channels, channels, 1, rngs))
        )
        self.norm = group_norm(channels, groups, 1e-6, rngs)
        self.proj_in = proj()
        self.transformer_blocks = nnx.List(
            [
                BasicTransformerBlock(channels, heads=heads, context_dim=context_dim, upcast=upcast, rngs=rngs)
                for _ in range(layers)
            ]
        )
        self.proj_out = proj()

    def __call__(self, x: Array, context: Array) -> Array:
        b, h, w, c = x.shape
        tokens = lambda a: a.reshape(b, h * w, c)  # noqa: E731
        grid = lambda a: a.reshape(b, h, w, c)  # noqa: E731
        y = self.norm(x)
        y = tokens(self.proj_in(tokens(y))) if self.linear_projection else tokens(self.proj_in(y))
        for block in self.transformer_blocks:
            y = block(y, context)
        y = grid(self.proj_out(y)) if self.linear_projection else self.proj_out(grid(y))
        return x + y


class MidBlock(nnx.Module):
    """ResnetBlock → attention → ResnetBlock at the lowest resolution: the bottleneck of SD's VAE
    (no time input), of the pixel UNet (time-conditioned resnets; diffusers' ``UNetMidBlock2D``) and
    of SD's UNet (its attention a text-conditioned transformer; ``UNetMidBlock2DCrossAttn``).

    Attention sits here because its cost grows with (H·W)², smallest at the lowest resolution, and
    it gives every position a view of the whole image that convolutions alone lack.

    ``attention``: True for a :class:`SelfAttention`, False for none, or a function that builds the
    attention for ``channels`` (SD's UNet passes one that builds a Transformer2D, called as
    ``attention(x, context)``).

    Shapes: x (B, h, w, C), t_emb (B, D_t) or None, context (B, S, D_c) or None → (B, h, w, C).
    """

    def __init__(
        self,
        channels: int,
        *,
        attention: bool | Callable[[int], nnx.Module] = True,
        temb_dim: int | None = None,
        heads: int = 1,
        groups: int = 32,
        eps: float = 1e-6,
        rngs: nnx.Rngs,
    ):
        self.resnets = nnx.List(
            [ResnetBlock(channels, channels, temb_dim=temb_dim, groups=groups, eps=eps, rngs=rngs) for _ in range(2)]
        )
        if attention is True:
            attention = lambda c: SelfAttention(c, heads=heads, groups=groups, eps=eps, rngs=rngs)  # noqa: E731
        self.attentions = nnx.List([attention(channels)] if attention else [])

    def __call__(self, x: Array, temb: Array | None = None, context: Array | None = None) -> Array:
        x = self.resnets[0](x, temb)
        for attn in self.attentions:
            x = attn(x) if context is None else attn(x, context)
        return self.resnets[1](x, temb)
