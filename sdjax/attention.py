"""Which kernel computes attention, softmax(q kᵀ / √d) v, and how it fits in memory.

:class:`sdjax.nn.Attention` (every attention layer of the UNet and the VAE) and CLIP's text encoder call
:func:`attention`. What it runs is an engineering choice, not part of the model — the same numbers to
float rounding whichever path runs:

* cuDNN's fused "flash" kernel on a CUDA GPU in half precision: it never writes the T × T score matrix
  to memory (:func:`attention_backend` says when it can run);
* XLA's portable einsum → softmax → einsum everywhere else (CPU, TPU, float32), split into chunks of
  queries when the scores would not fit (:func:`query_chunks`).

Shapes: (B, T, heads, d) for q, k, v, as ``jax.nn.dot_product_attention`` takes them.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

Array = jax.Array

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
    lengths: tuple[int, int] | None = None,
) -> str:
    """The kernel :func:`attention` runs: "cudnn" (cuDNN's fused flash attention) or "xla" (XLA's
    portable einsum → softmax → einsum, on every platform).

    cuDNN's kernel never writes the (T × T) score matrix to memory: at SD's 64×64 latents (T = 4096
    tokens) that matrix alone is 8 heads × 4096² × 2 bytes = 268 MB per image, which XLA's path does
    write and read back. The kernel exists only for a CUDA GPU, float16/bfloat16 inputs and head dims
    d that are multiples of 8 up to 128 (256 from Hopper, compute capability 9.0, on): SD1.5's
    d = 40, 80, 160 all qualify on an H100; 160 does not on an A100.

    ``lengths`` (T_q, T_k), when given, must both be even: jax's cuDNN path refuses an odd sequence length
    when it is differentiated ("Unsupported sequence length Q 4096, KV 77", jax 0.11.2 on an H200, the
    first GPU run of benchmarks/bench.py), and a trace cannot tell whether it will be. So SD's
    cross-attention to the 77 text tokens runs on XLA; its scores are small (T_q × 77).

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
            (f"the sequence lengths must be even (got {lengths})", lengths is not None and any(n % 2 for n in lengths)),
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
        lengths=(q.shape[1], k.shape[1]),
    )
    if backend == "xla":
        if platform == "cpu" and q.dtype == jnp.float16:  # XLA:CPU has no float16 dot with float32 accumulation
            f32 = (a.astype(jnp.float32) for a in (q, k, v))
            return _xla_attention(*f32, mask, is_causal).astype(jnp.float16)
        return _xla_attention(q, k, v, mask, is_causal)
    return jax.nn.dot_product_attention(q, k, v, mask=mask, is_causal=is_causal, implementation=backend)
