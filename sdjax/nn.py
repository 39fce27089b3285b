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

import math
from collections.abc import Callable

import jax
import jax.numpy as jnp
from flax import nnx

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


def upsample_nearest(x: Array) -> Array:
    """Nearest-neighbour ×2 upsampling: every pixel becomes a 2×2 block. (B, H, W, C) → (B, 2H, 2W, C)."""
    return jnp.repeat(jnp.repeat(x, 2, axis=1), 2, axis=2)


class Upsample(nnx.Module):
    """Double H and W: nearest-neighbour ×2 then a 3×3 convolution to smooth the blocks.

    Shapes: (B, H, W, C) → (B, 2H, 2W, C).
    """

    def __init__(self, channels: int, *, rngs: nnx.Rngs):
        self.conv = conv(channels, channels, 3, rngs)

    def __call__(self, x: Array) -> Array:
        return self.conv(upsample_nearest(x))


# Which kernel computes softmax(q kᵀ / √d) v (see :func:`attention_backend`).
ATTENTION_IMPLEMENTATIONS = ("auto", "xla", "cudnn")
HALF_DTYPES = (jnp.dtype(jnp.float16), jnp.dtype(jnp.bfloat16))


def accelerator() -> tuple[str, str | None]:
    """(platform, CUDA compute capability) of the default backend's first device: ("cuda", "9.0") on an
    H100, ("cpu", None), ("tpu", None), ("rocm", None). Read when a function is traced."""
    device = jax.local_devices()[0]
    if device.platform == "gpu":
        if "cuda" in device.client.platform_version.lower():
            return "cuda", device.compute_capability
        return "rocm", None
    return device.platform, None


def attention_backend(
    implementation: str,
    *,
    platform: str,
    dtype,
    head_dim: int,
    compute_capability: str | None = None,
    masked: bool = False,
) -> str:
    """The kernel :func:`attention` runs: "cudnn" (cuDNN's fused flash attention) or "xla" (XLA's
    portable einsum → softmax → einsum, on every platform).

    cuDNN's kernel never writes the (T × T) score matrix to memory: at SD's 64×64 latents (T = 4096
    tokens) that matrix alone is 8 heads × 4096² × 2 bytes = 268 MB per image, which XLA's path does
    write and read back. The kernel exists only for a CUDA GPU, float16/bfloat16 inputs and head dims
    d that are multiples of 8 up to 128 (256 from Hopper, compute capability 9.0, on): SD1.5's
    d = 40, 80, 160 all qualify on an H100; 160 does not on an A100.

    implementation: "auto" picks cudnn when all of that holds (and no ``mask`` array is given: CLIP's
    padding masks stay on XLA), xla otherwise; "xla" always xla; "cudnn" always cudnn, a ValueError
    naming the condition that fails when it cannot run.
    """
    if implementation not in ATTENTION_IMPLEMENTATIONS:
        raise ValueError(f"attention implementation {implementation!r}: expected one of {ATTENTION_IMPLEMENTATIONS}")
    if implementation == "xla":
        return "xla"
    limit = 256 if compute_capability and tuple(map(int, compute_capability.split("."))) >= (9, 0) else 128
    unmet = [
        reason
        for reason, failed in (
            (f"it needs a CUDA GPU (this is {platform})", platform != "cuda"),
            (f"it needs float16 or bfloat16 (got {jnp.dtype(dtype).name})", jnp.dtype(dtype) not in HALF_DTYPES),
            (f"the head dim must be a multiple of 8 and ≤ {limit} (got {head_dim})", head_dim % 8 or head_dim > limit),
        )
        if failed
    ]
    if implementation == "cudnn" and unmet:
        raise ValueError(f"attention implementation 'cudnn' cannot run: {'; '.join(unmet)}. Use 'auto' or 'xla'")
    return "cudnn" if implementation == "cudnn" or not (unmet or masked) else "xla"


# The most attention scores (batch · heads · T_q · T_k) the XLA path holds at once: 2²⁸ float32 = 1 GiB. Beyond
# it the queries go through in chunks. None: all at once (jax's path unchanged). Read when a function is traced.
MAX_ATTENTION_SCORES: int | None = 2**28


def query_chunks(batch: int, heads: int, queries: int, keys: int, max_scores: int | None) -> int:
    """How many equal chunks the queries are split into so that one chunk's scores, batch · heads ·
    (queries / n) · keys, stay within ``max_scores``: the smallest such n that divides ``queries``."""
    if max_scores is None:
        return 1
    n = min(queries, max(1, -(-batch * heads * queries * keys // max_scores)))  # one query a chunk at most
    while queries % n:
        n += 1
    return n


def _xla_attention(q: Array, k: Array, v: Array, mask: Array | None, is_causal: bool) -> Array:
    """XLA's einsum → softmax → einsum, in query chunks when the T_q × T_k scores would be too many.

    Softmax normalises each query's row of scores over the keys alone, so the rows can be computed a
    chunk of queries at a time and the outputs concatenated: the same numbers, with only one chunk's
    scores (float32 in jax's path, even for bf16 inputs) in memory. At 1024² SD1.5's first UNet level
    has T = 16,384 tokens: one CFG pair's scores are 2 · 8 · 16,384² · 4 bytes = 16 GiB per layer,
    several such buffers live at once; in chunks of 1 GiB the whole UNet pass needs a few GiB.
    The chunks run one after the other (``lax.map``); each is rematerialised in the backward pass
    (``jax.checkpoint``), so training keeps no chunk's scores either. Masks and causal attention
    (CLIP's 77 tokens, never large) are not chunked.
    """
    b, tq, heads, d = q.shape
    n = query_chunks(b, heads, tq, k.shape[1], MAX_ATTENTION_SCORES)
    if n == 1 or mask is not None or is_causal:
        return jax.nn.dot_product_attention(q, k, v, mask=mask, is_causal=is_causal, implementation="xla")

    @jax.checkpoint
    def chunk(q_chunk: Array) -> Array:
        return jax.nn.dot_product_attention(q_chunk, k, v, implementation="xla")

    chunks = q.reshape(b, n, tq // n, heads, d).swapaxes(0, 1)  # (n, B, T_q/n, heads, d)
    return jax.lax.map(chunk, chunks).swapaxes(0, 1).reshape(q.shape[:3] + v.shape[-1:])


def attention(
    q: Array, k: Array, v: Array, *, mask: Array | None = None, is_causal: bool = False, implementation: str = "auto"
) -> Array:
    """Scaled dot-product attention, softmax(q kᵀ / √d) v, over (B, T, heads, d) inputs.

    ``mask``: optional boolean array broadcastable to (B, heads, T_q, T_k); True where query i may
    attend to key j (e.g. (B, 1, 1, T_k) to hide padding tokens). ``is_causal``: query i sees only
    keys j ≤ i, as in a language model (CLIP's text encoder). Both together allow the logical AND.

    ``implementation``: "auto", "xla" or "cudnn", resolved by :func:`attention_backend` for the
    default backend when the function is traced (auto: cuDNN's fused kernel on a CUDA GPU in half
    precision, XLA's portable path on CPU and TPU). XLA's path splits the queries into chunks when the
    scores would exceed :data:`MAX_ATTENTION_SCORES` (:func:`_xla_attention`).
    """
    platform, capability = accelerator()
    backend = attention_backend(
        implementation,
        platform=platform,
        dtype=q.dtype,
        head_dim=q.shape[-1],
        compute_capability=capability,
        masked=mask is not None,
    )
    if backend == "xla":
        return _xla_attention(q, k, v, mask, is_causal)
    return jax.nn.dot_product_attention(q, k, v, mask=mask, is_causal=is_causal, implementation=backend)


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

    def attend(self, x: Array, context: Array | None = None) -> Array:
        """The attention output before the residual: (B, T, D_q), (B, S, D_c) → (B, T, D_q)."""
        context = x if context is None else context
        q, k, v = self.to_q(x), self.to_k(context), self.to_v(context)
        split = lambda t: t.reshape(*t.shape[:2], self.heads, t.shape[-1] // self.heads)  # noqa: E731
        dtype = jnp.float32 if self.upcast else x.dtype  # one dtype for all three (a float32 context
        q, k, v = (split(a).astype(dtype) for a in (q, k, v))  # under a bf16 network would promote k, v)
        out = attention(q, k, v, implementation=self.implementation).astype(x.dtype)
        return self.to_out(out.reshape(*x.shape[:2], -1))

    def __call__(self, x: Array, context: Array | None = None) -> Array:
        return self.attend(x, context)


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
