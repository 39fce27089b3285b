"""The checks of notebooks 04–08: CLIP's loss, cross-attention and guidance, the guided loop and the VAE's last
step, the Euler and Heun steps, LoRA's forward pass and merge, and vector quantisation (:mod:`sdjax.exercises` says
how checks work)."""

from __future__ import annotations

import functools
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np
import optax

from sdjax.chain import classifier_free_guidance
from sdjax.exercises.core import EPSILON, LINEAR, ExerciseError, check, inputs, register, run_answer
from sdjax.samplers import euler_step

# --- notebook 06 ------------------------------------------------------------------------------------



def _euler_step(x, x0_hat, sigma, sigma_next):
    """sdjax's answer to the exercise of notebook 06: :func:`sdjax.samplers.euler_step`, given ε̂ = (x − x̂_0)/σ
    under an ε-prediction schedule, so that its denoiser D is x0_hat. x, x0_hat (B, H, W, C); σ, σ_next floats."""
    return euler_step(EPSILON, (x - x0_hat) / sigma, x, jnp.float32(sigma), jnp.float32(sigma_next))


@register("06", 1, "euler_step", _euler_step)
def check_euler_step(fn: Callable) -> bool:
    """Exercise: one Euler step of the probability-flow ODE dx/dσ = (x − D(x; σ))/σ from σ to σ_next,
    ``fn(x, x0_hat, sigma, sigma_next)``:

        d = (x − x̂_0)/σ,    x_next = x + (σ_next − σ) d,

    x = x_0 + σ ε (the σ parametrisation), x0_hat = D(x; σ) the denoiser's estimate of x_0. x, x0_hat
    (B, H, W, C); sigma, sigma_next Python floats, σ > σ_next ≥ 0 → x_next (B, H, W, C). Compared with
    :func:`sdjax.samplers.euler_step` (given ε̂ = (x − x̂_0)/σ under an ε-prediction schedule, so that its
    D is x0_hat) for a large step and for the last step, to σ = 0.
    """
    x0_hat, eps = inputs(6, (2, 4, 4, 3), (2, 4, 4, 3))
    mistakes = [
        (
            lambda x, d0, s, s_next: x + (s - s_next) * (x - d0) / s,
            "the step goes the wrong way: σ decreases, so x_next = x + (σ_next − σ)·d with σ_next − σ < 0 and "
            "d = (x − x̂_0)/σ — the step moves x towards x̂_0.",
        ),
        (
            lambda x, d0, s, s_next: x + (s_next - s) * (x - d0),
            "the slope dx/dσ is (x − x̂_0)/σ: divide by σ.",
        ),
        (
            lambda x, d0, s, s_next: x + (s_next - s) * (x - d0) / s**2,
            "you divided by σ²: (x̂_0 − x)/σ² is the score ∇ log p; the ODE's slope is (x − x̂_0)/σ, σ times "
            "minus the score.",
        ),
        (
            lambda x, d0, s, s_next: x + (s_next - s) * (x - d0) / s_next,
            "explicit Euler evaluates the slope where you are, at σ, not at σ_next.",
        ),
        (
            lambda x, d0, s, s_next: d0 + s_next * (x - d0),
            "x − x̂_0 is σ·ε̂; re-noising to σ_next needs the noise itself, ε̂ = (x − x̂_0)/σ: x_next = x̂_0 + σ_next·ε̂.",
        ),
    ]
    ok = True
    for s, s_next in ((14.6, 3.1), (0.8, 0.0)):
        x = x0_hat + s * eps
        ok &= check(
            f"euler_step at σ={s} → {s_next}", fn, _euler_step, (x, x0_hat, s, s_next), mistakes, rtol=1e-5, atol=1e-5
        )
    return ok


def _heun_step(denoise, x, sigma, sigma_next):
    """sdjax's answer to exercise 2 of notebook 06: :func:`sdjax.samplers.heun_step`'s predictor and corrector
    (EDM Algorithm 1), given the denoiser D(x; σ) as a function. x (B, H, W, C); sigma, sigma_next floats."""
    from sdjax.samplers.sigma import heun_step

    def out(x, s):  # the ε-prediction whose D is ``denoise``: ε̂ = (x − D(x; σ)) / σ
        return (x - denoise(x, s)) / s

    state = {"d": jnp.zeros_like(x), "x": x}
    x_pred, state = heun_step(EPSILON, out(x, sigma), x, state, sigma, sigma, sigma_next, False)
    if sigma_next == 0:
        return x_pred
    return heun_step(EPSILON, out(x_pred, sigma_next), x_pred, state, sigma, sigma_next, sigma_next, True)[0]


@register("06", 2, "heun_step", _heun_step)
def check_heun_step(fn: Callable) -> bool:
    """Exercise: one step of Heun's method on the probability-flow ODE, ``fn(denoise, x, sigma, sigma_next)``,
    ``denoise(x, σ)`` the denoiser D(x; σ):

        d = (x − D(x; σ)) / σ,   x̃ = x + (σ_next − σ) d                        (Euler: the predictor)
        d' = (x̃ − D(x̃; σ_next)) / σ_next,   x_next = x + (σ_next − σ) (d + d') / 2   (the corrector)

    and the Euler step alone when σ_next = 0 (d' would divide by 0). Checked against
    :func:`sdjax.samplers.heun_step` with a stand-in denoiser, for σ = 2.5 → 1.2 and for a last step 0.4 → 0.
    """
    (x,) = inputs(17, (2, 4, 4, 3))
    x = 2.5 * x

    def denoise(x, s):  # a stand-in denoiser: shrinks towards a σ-dependent target
        return jnp.tanh(x / (1 + s)) * (1 - 0.1 * s)

    def slope(x, s):
        return (x - denoise(x, s)) / s

    def euler(d, x, s, s1):
        return x + (s1 - s) * slope(x, s)

    def heun(d, x, s, s1, second=lambda x_e, s, s1: slope(x_e, s1), mix=lambda d1, d2: (d1 + d2) / 2):
        if s1 == 0:
            return euler(d, x, s, s1)
        return x + (s1 - s) * mix(slope(x, s), second(euler(d, x, s, s1), s, s1))

    mistakes = [
        (euler, "that is Euler's step alone: evaluate the slope again at the predicted x̃ and σ_next, and step from x "
         "with the average (d + d') / 2."),
        (lambda d, x, s, s1: heun(d, x, s, s1, second=lambda x_e, s, s1: slope(x_e, s)), "the corrector's slope d' is "
         "evaluated at the *new* noise level: D(x̃; σ_next), not D(x̃; σ)."),
        (lambda d, x, s, s1: heun(d, x, s, s1, mix=lambda d1, d2: d2), "average the two slopes, (d + d') / 2: the "
         "second one alone is a backward-Euler guess, first order again."),
        (lambda d, x, s, s1: euler(d, x, s, s1) + (s1 - s) * (slope(x, s) + slope(euler(d, x, s, s1), s1)) / 2
         if s1 else euler(d, x, s, s1), "the corrector starts from x, not from the predicted x̃: x_next = x + (σ_next "
         "− σ)(d + d')/2."),
    ]  # fmt: skip
    ok = check("heun_step at σ = 2.5 → 1.2", fn, _heun_step, (denoise, x, 2.5, 1.2), mistakes, atol=1e-5)
    got = run_answer("heun_step", fn, (denoise, x, 0.4, 0.0))
    if not np.all(np.isfinite(got)):
        raise ExerciseError("heun_step at σ_next = 0: the result is not finite. The last step is Euler's alone: "
                            "d' = (x̃ − D(x̃; 0)) / 0 divides by zero.")  # fmt: skip
    return ok & check("heun_step at σ = 0.4 → 0", fn, _heun_step, (denoise, x, 0.4, 0.0), mistakes, atol=1e-5)


# --- notebook 04 ------------------------------------------------------------------------------------


def _matching_cross_entropy(logits):
    """CE(ℓ, diag) = mean_i (log Σ_j exp ℓ_ij − ℓ_ii): row i's right answer is column i. (B, B) → ()."""
    return optax.softmax_cross_entropy_with_integer_labels(logits, jnp.arange(len(logits))).mean()


def _clip_loss(u, w, scale):
    """sdjax's answer to exercise 1 of notebook 04: :func:`sdjax.tiny_sd.clip_loss`'s formula on the embeddings,
    u, w (B, E) → ()."""
    return 0.5 * (_matching_cross_entropy(scale * u @ w.T) + _matching_cross_entropy(scale * w @ u.T))


@register("04", 1, "clip_loss", _clip_loss)
def check_clip_loss(fn: Callable) -> bool:
    """Exercise: CLIP's symmetric contrastive loss, ``fn(u, w, scale)``: u (B, E) image and w (B, E) text
    embeddings, unit vectors, pair i matching; scale = exp(τ), a float. Logits ℓ = scale · u wᵀ (B, B), and

        L = ½ [ CE(ℓ, diag) + CE(ℓᵀ, diag) ],   CE(ℓ, diag) = mean_i (log Σ_j exp ℓ_ij − ℓ_ii)

    → a scalar. Compared with :func:`sdjax.tiny_sd.clip_loss`'s formula.
    """
    u, w = inputs(7, (6, 8), (6, 8))
    u, w = u / jnp.linalg.norm(u, axis=1, keepdims=True), w / jnp.linalg.norm(w, axis=1, keepdims=True)
    ce = _matching_cross_entropy
    mistakes = [
        (lambda u, w, s: ce(s * u @ w.T), "that is one direction only (each image picks its caption); CLIP also "
         "asks each caption to pick its image: average CE(ℓ, diag) and CE(ℓᵀ, diag)."),
        (lambda u, w, s: 0.5 * (ce(u @ w.T) + ce(w @ u.T)), "multiply the cosine similarities by the scale "
         "exp(τ) before the softmax: without it the logits lie in [−1, 1] and the softmax can never be sharp."),
        (lambda u, w, s: ce(s * u @ w.T) + ce(s * w @ u.T), "the two cross-entropies are averaged (½ each), not "
         "summed."),
        (lambda u, w, s: -jnp.mean(jnp.diag(s * u @ w.T)), "maximising the matching pairs' similarity alone "
         "ignores the other captions in the batch: the loss is a cross-entropy over all B of them."),
    ]  # fmt: skip
    return check("clip_loss", fn, _clip_loss, (u, w, 14.3), mistakes, rtol=1e-5, atol=1e-5)


def _cross_attention(x, context, wq, wk, wv, wo, heads):
    """sdjax's answer to exercise 3 of notebook 04: the projections of SD's cross-attention around
    :func:`sdjax.attention.attention`. x (B, N, D), context (B, M, D_c) → (B, N, D)."""
    from sdjax.attention import attention

    def split(h):  # (B, T, D) → (B, T, heads, D / heads)
        return h.reshape(*h.shape[:2], heads, -1)

    out = attention(split(x @ wq), split(context @ wk), split(context @ wv), implementation="xla")
    return out.reshape(*x.shape[:2], -1) @ wo


def _attend(q, k, v, heads, scale=None, softmax_axis=-1):
    """Multi-head attention written out, with the knobs the mistakes turn: (B, T, D) each → (B, N, D)."""
    b, n, d = q.shape
    q, k, v = (h.reshape(b, h.shape[1], heads, d // heads).transpose(0, 2, 1, 3) for h in (q, k, v))
    scores = q @ k.transpose(0, 1, 3, 2) * (scale if scale is not None else (d // heads) ** -0.5)
    return (jax.nn.softmax(scores, axis=softmax_axis) @ v).transpose(0, 2, 1, 3).reshape(b, n, d)


@register("04", 3, "cross_attention", _cross_attention)
def check_cross_attention(fn: Callable) -> bool:
    """Exercise: multi-head cross-attention, ``fn(x, context, wq, wk, wv, wo, heads)`` → (B, N, D): queries from the
    image tokens x (B, N, D), keys and values from the text context (B, M, D_c),

        Q = x W_q,  K = c W_k,  V = c W_v,   split D into ``heads`` heads of d = D / heads,
        head_h = softmax(Q_h K_hᵀ / √d) V_h   (softmax over the M keys),   out = concat(heads) W_o,

    W_q, W_o (D, D), W_k, W_v (D_c, D); no biases. Checked against :func:`sdjax.attention.attention`.
    """
    x, c, wq, wk, wv, wo = inputs(15, (2, 6, 8), (2, 5, 12), (8, 8), (12, 8), (12, 8), (8, 8))
    heads = 2

    def attn(x, c, **kw):
        return _attend(x @ wq, c @ wk, c @ wv, heads, **kw) @ wo

    mistakes = [
        (lambda x, c, *_: attn(x, c, scale=1.0), "scale the scores by 1/√d before the softmax (d = D / heads = 4): "
         "without it the softmax saturates as d grows."),
        (lambda x, c, *_: attn(x, c, scale=1 / 4), "the scores are divided by √d, not d."),
        (lambda x, c, *_: attn(x, c, scale=1 / jnp.sqrt(8.0)), "d is the width of one head, D / heads = 4, not the "
         "full width D = 8."),
        (lambda x, c, *_: _attend(x @ wq, c @ wk, c @ wv, 1, scale=0.5) @ wo, "that is one head of width D; split "
         "Q, K and V into `heads` heads of width D / heads, attend in each, and concatenate."),
        (lambda x, c, *_: attn(x, c, softmax_axis=-2), "the softmax runs over the keys (the M text tokens, the last "
         "axis of the scores): each image token's weights over the prompt sum to 1."),
        (lambda x, c, *_: _attend(x @ wq, c @ wk, c @ wv, heads), "the output projection W_o is missing."),
    ]  # fmt: skip
    return check("cross_attention", fn, _cross_attention, (x, c, wq, wk, wv, wo, heads), mistakes, atol=1e-5)


@register("04", 2, "guidance", classifier_free_guidance)
def check_guidance(fn: Callable) -> bool:
    """Exercise: classifier-free guidance, ``fn(out_uncond, out_cond, w)`` → ε̂_∅ + w (ε̂_c − ε̂_∅), the
    arrays (B, h, w, 4), w a float. Compared with :func:`sdjax.chain.classifier_free_guidance`."""
    uncond, cond = inputs(8, (2, 4, 4, 4), (2, 4, 4, 4))
    mistakes = [
        (lambda u, c, w: c + w * (c - u), "that is the paper's convention, (1 + w) ε̂_c − w ε̂_∅, where w = 0 means no "
         "guidance; Stable Diffusion's guidance_scale is 1 + that w: ε̂_∅ + w (ε̂_c − ε̂_∅), so w = 1 means none."),
        (lambda u, c, w: u + w * (u - c), "the sign is flipped: this steers *away* from the prompt. Start from the "
         "unconditional prediction and move towards the conditional one: ε̂_∅ + w (ε̂_c − ε̂_∅)."),
        (lambda u, c, w: w * c, "guidance mixes the two predictions: ε̂_∅ + w (ε̂_c − ε̂_∅), not a rescaled ε̂_c."),
    ]  # fmt: skip
    ok = True
    for w in (7.5, 1.0):
        ok &= check(f"guidance at w = {w}", fn, classifier_free_guidance, (uncond, cond, w), mistakes)
    return ok


# --- notebook 05 ------------------------------------------------------------------------------------


def _guided_loop(eps_fn, x_T, timesteps, cond, uncond, w, step):
    """sdjax's answer to exercise 1 of notebook 05: the loop of :func:`sdjax.chain` written out, with one batched
    network call per step and :func:`sdjax.chain.classifier_free_guidance`."""
    x = x_T
    for i, t in enumerate(timesteps):
        t_prev = timesteps[i + 1] if i + 1 < len(timesteps) else -1
        out = eps_fn(jnp.concatenate([x, x]), t, jnp.concatenate([uncond, cond]))
        out_uncond, out_cond = jnp.split(out, 2)
        x = step(x, classifier_free_guidance(out_uncond, out_cond, w), t, t_prev)
    return x


@register("05", 1, "guided_loop", _guided_loop)
def check_guided_loop(fn: Callable) -> bool:
    """Exercise: the denoising loop with classifier-free guidance, ``fn(eps_fn, x_T, timesteps, cond, uncond, w,
    step)`` → x_0. ``eps_fn(x, t, context)`` is the UNet (ε̂ for a batch of latents and contexts), ``timesteps`` a
    descending list of ints, ``cond`` and ``uncond`` the contexts (B, 77, D) of the prompt and of "", ``step(x, eps,
    t, t_prev)`` a sampler's update from t to the next timestep t_prev (−1 after the last: "to x_0"). At each t:

        ε̂ = ε̂(x, t, c_∅) + w (ε̂(x, t, c) − ε̂(x, t, c_∅)),    x ← step(x, ε̂, t, t_prev).

    Checked with a stand-in network and DDIM's step on DDPM's linear schedule. (Both predictions from one call on the
    doubled batch, as SD pipelines do, halves the number of network calls; two calls give the same result.)
    """
    x_T, cond, uncond = inputs(16, (2, 3, 3, 4), (2, 5, 4), (2, 5, 4))
    ab = jnp.asarray(LINEAR.alphas_cumprod)
    timesteps = [500, 350, 200, 50]
    calls = []

    def eps_fn(x, t, context):  # a stand-in UNet: depends on x, t and the context
        calls.append(len(x))
        return jnp.tanh(x + jnp.mean(context, axis=(1, 2))[:, None, None, None] * (1 + t / 1000))

    def step(x, eps, t, t_prev):  # DDIM, η = 0
        a, a_prev = ab[t], ab[t_prev] if t_prev >= 0 else 1.0
        x0 = (x - jnp.sqrt(1 - a) * eps) / jnp.sqrt(a)
        return jnp.sqrt(a_prev) * x0 + jnp.sqrt(1 - a_prev) * eps

    def loop(guide, last=True, next_t=None, carry=True):
        x = x_T
        for i, t in enumerate(timesteps if last else timesteps[:-1]):
            t_prev = (timesteps[i + 1] if i + 1 < len(timesteps) else -1) if next_t is None else next_t(t)
            x = step(x, guide(eps_fn(x if carry else x_T, t, uncond), eps_fn(x if carry else x_T, t, cond)), t, t_prev)
        return x

    mistakes = [
        (lambda *_: loop(lambda u, c: c), "the guidance is missing: that samples with ε̂(x, t, c) alone (w = 1). "
         "Combine both predictions: ε̂_∅ + w (ε̂_c − ε̂_∅)."),
        (lambda *_: loop(lambda u, c: u + 7.5 * (u - c)), "the guidance points away from the prompt: ε̂_∅ + w (ε̂_c − "
         "ε̂_∅), from the unconditional prediction towards the conditional one."),
        (lambda *_: loop(lambda u, c: c + 7.5 * (c - u)), "that is the paper's (1 + w) ε̂_c − w ε̂_∅; SD's scale w "
         "is ε̂_∅ + w (ε̂_c − ε̂_∅)."),
        (lambda *_: loop(lambda u, c: u + 7.5 * (c - u), last=False), "the last step is missing: the chain ends at "
         "the last timestep of the list instead of x_0; step from it too, to t_prev = −1."),
        (lambda *_: loop(lambda u, c: u + 7.5 * (c - u), next_t=lambda t: t - 1), "step to the *next timestep of the "
         "list* (t_prev = timesteps[i + 1]), not to t − 1: here 500 → 350 → 200 → 50 → x_0."),
        (lambda *_: loop(lambda u, c: u + 7.5 * (c - u), carry=False), "x must carry over from step to step: each "
         "step starts where the previous one ended, not from x_T."),
    ]  # fmt: skip
    ok = check("guided_loop", fn, _guided_loop, (eps_fn, x_T, timesteps, cond, uncond, 7.5, step), mistakes)
    calls.clear()
    fn(eps_fn, x_T, timesteps, cond, uncond, 7.5, step)
    if len(calls) == 2 * len(timesteps):
        print("  (two network calls per step; one call on the doubled batch, jnp.concatenate([x, x]) with "
              "jnp.concatenate([uncond, cond]), gives the same result in half the calls.)")
    return ok


def _latents_to_image(decode, z, scaling_factor):
    """sdjax's answer to exercise 2 of notebook 05: what :class:`sdjax.StableDiffusion` does to its final
    latents, images = clip((D(z / s) + 1) / 2, 0, 1). z (N, h, w, 4) → (N, 8h, 8w, 3) in [0, 1]."""
    return jnp.clip((decode(z / scaling_factor) + 1) / 2, 0.0, 1.0)


@register("05", 2, "latents_to_image", _latents_to_image)
def check_latents_to_image(fn: Callable) -> bool:
    """Exercise: SD's last stage, ``fn(decode, z, scaling_factor)`` → images in [0, 1]: undo the scaling,
    decode, and map the decoder's [−1, 1] to pixel values,

        x = D(z / s),    image = clip((x + 1) / 2, 0, 1),

    z (N, h, w, 4) the final latents, ``decode`` the VAE decoder D: (N, h, w, 4) → (N, 8h, 8w, 3). Checked
    with a stand-in decoder whose outputs go slightly past [−1, 1], so that the clipping matters.
    """
    (z,) = inputs(9, (2, 2, 2, 4))
    z = 0.3 * z

    def decode(latents):  # a stand-in for the VAE: 8× nearest upsampling of 3 channels, a little past ±1
        x = jnp.repeat(jnp.repeat(latents[..., :3], 8, axis=1), 8, axis=2)
        return 1.2 * jnp.tanh(x)

    mistakes = [
        (lambda d, z, s: jnp.clip((d(z * s) + 1) / 2, 0, 1), "the latents were multiplied by s when they were "
         "encoded (z = s·E(x)); to decode, divide: D(z / s)."),
        (lambda d, z, s: jnp.clip((d(z) + 1) / 2, 0, 1), "undo the scaling factor first: the decoder expects "
         "E(x) = z / s, not the scaled z."),
        (lambda d, z, s: jnp.clip(d(z / s), 0, 1), "the decoder's output lies in [−1, 1]: map it to [0, 1] with "
         "(x + 1) / 2 before clipping (clipping alone turns every dark value black)."),
        (lambda d, z, s: (d(z / s) + 1) / 2, "clip to [0, 1]: the decoder can overshoot ±1 a little, and an image "
         "library would wrap or reject those values."),
    ]  # fmt: skip
    return check("latents_to_image", fn, _latents_to_image, (decode, z, 0.18215), mistakes)


def _lora_forward(x, W, b, A, B, alpha, scale):
    """sdjax's answer to exercise 1 of notebook 07: :class:`sdjax.lora.LoRALinear` itself, built around the frozen
    layer (W, b) with the adapter (A, B). x (N, d_in), W (d_in, d_out), b (d_out,), A (d_in, r), B (r, d_out)."""
    from flax import nnx

    from sdjax import lora

    base = nnx.Linear(*W.shape, rngs=nnx.Rngs(0))
    base.kernel.set_value(W)
    base.bias.set_value(b)
    layer = lora.LoRALinear(base, rank=A.shape[1], alpha=alpha, scale=scale, rngs=None)
    layer.lora_A.set_value(A)
    layer.lora_B.set_value(B)
    return layer(x)


@register("07", 1, "lora_forward", _lora_forward)
def check_lora_forward(fn: Callable) -> bool:
    """Exercise: a LoRA layer's forward pass, ``fn(x, W, b, A, B, alpha, scale)`` → y:

        y = x W + b + s · (α / r) · (x A) B,    r = A.shape[1] (the rank),

    x (N, d_in), W (d_in, d_out) and b (d_out,) the frozen layer, A (d_in, r) and B (r, d_out) the adapter,
    α its alpha and s the strength. Checked against :class:`sdjax.lora.LoRALinear` itself.
    """
    x, w, b, a, bb = inputs(10, (3, 6), (6, 5), (5,), (6, 2), (2, 5))
    alpha, scale = 4.0, 0.7
    r = 2
    mistakes = [
        (lambda x, w, b, a, bb, al, s: x @ w + b + s * (x @ a) @ bb, "scale the update by α / r as well as by s: "
         "with α = r it is 1, here α = 4 and r = 2."),
        (lambda x, w, b, a, bb, al, s: x @ w + b + s * al * (x @ a) @ bb, "divide α by the rank r = A.shape[1]: "
         "the update is s · (α / r) · x A B."),
        (lambda x, w, b, a, bb, al, s: s * al / r * (x @ a) @ bb, "LoRA adds to the frozen layer: keep x W + b."),
        (lambda x, w, b, a, bb, al, s: x @ (w + s * al / r * a @ bb), "the bias b of the frozen layer is missing."),
    ]  # fmt: skip
    return check("lora_forward", fn, _lora_forward, (x, w, b, a, bb, alpha, scale), mistakes)


def _merge_lora(W, A, B, alpha, scale):
    """sdjax's answer to exercise 2 of notebook 07: the kernel :meth:`sdjax.lora.LoRALinear.fuse` leaves,
    W + s · (α / r) · A B. W (d_in, d_out), A (d_in, r), B (r, d_out) → (d_in, d_out)."""
    from flax import nnx

    from sdjax import lora

    base = nnx.Linear(*W.shape, use_bias=False, rngs=nnx.Rngs(0))
    base.kernel.set_value(W)
    layer = lora.LoRALinear(base, rank=A.shape[1], alpha=alpha, scale=scale, rngs=None)
    layer.lora_A.set_value(A)
    layer.lora_B.set_value(B)
    layer.fuse()
    return layer.kernel[...]


@register("07", 2, "merge_lora", _merge_lora)
def check_merge_lora(fn: Callable) -> bool:
    """Exercise: merge (fuse) an adapter into its layer's kernel, ``fn(W, A, B, alpha, scale)`` → W',

        W' = W + s · (α / r) · A B,    r = A.shape[1],

    so that x W' + b is the LoRA layer's output (exercise 1) and the adapter costs nothing at inference.
    W (d_in, d_out), A (d_in, r), B (r, d_out). Checked against :meth:`sdjax.lora.LoRALinear.fuse`.
    """
    w, a, bb = inputs(18, (6, 5), (6, 2), (2, 5))
    alpha, scale = 4.0, 0.7
    mistakes = [
        (lambda w, a, b, al, s: w + s * a @ b, "scale the update by α / r as well as by s (α = 4, r = 2 here)."),
        (lambda w, a, b, al, s: w + s * al * a @ b, "divide α by the rank r = A.shape[1]: W + s · (α / r) · A B."),
        (lambda w, a, b, al, s: w + al / 2 * a @ b, "the strength s is missing: W + s · (α / r) · A B (s = 0 must "
         "give the base W back)."),
        (lambda w, a, b, al, s: w - s * al / 2 * a @ b, "the update is added: subtracting it is what *unfusing* "
         "does."),
        (lambda w, a, b, al, s: s * al / 2 * a @ b, "the merged kernel keeps the frozen W: W' = W + ΔW, not ΔW alone."),
    ]  # fmt: skip
    got = run_answer("merge_lora", fn, (w, a, bb, alpha, scale))
    if got.shape == (5, 6):
        raise ExerciseError(
            "merge_lora: the result has shape (d_out, d_in) = (5, 6); in sdjax's layout (y = x W) the kernel is "
            "(d_in, d_out) = (6, 5) and the update is A @ B, not (A @ B)ᵀ or B.T @ A.T."
        )
    return check("merge_lora", fn, _merge_lora, (w, a, bb, alpha, scale), mistakes)


# --- notebook 08 ------------------------------------------------------------------------------------


def _quantize(z, codebook):
    """sdjax's answer to the exercise of notebook 08: the nearest codes of :func:`sdjax.models.vq.nearest_codes`,
    passed straight through as :class:`sdjax.models.vq.VectorQuantizer` does."""
    from sdjax.models.vq import nearest_codes

    z_q = codebook[nearest_codes(z, codebook)]
    return z + jax.lax.stop_gradient(z_q - z)


@register("08", 1, "quantize", _quantize)
def check_quantize(fn: Callable) -> bool:
    """Exercise: vector quantisation with the straight-through estimator, ``fn(z, codebook)`` → z_st,

        k* = argmin_k ‖z − e_k‖²,    z_q = e_{k*},    z_st = z + sg(z_q − z),

    for every vector of z (B, h, w, D) against the codebook (K, D): forward z_st = z_q, backward ∂z_st/∂z = I.
    Checked: the values against sdjax's (:class:`sdjax.models.vq.VectorQuantizer`), then the gradient of
    Σ w · z_st with respect to z, which must be w itself (the decoder's gradient reaches the encoder unchanged).
    """
    z, codebook, w = inputs(81, (2, 3, 3, 4), (12, 4), (2, 3, 3, 4))
    codebook = codebook * 1.5 + 0.3  # codes of different norms: a lookup by the largest dot product picks others

    def by_dot_product(z, e):
        return e[jnp.argmax(jnp.einsum("...d,kd->...k", z, e), axis=-1)]

    mistakes = [
        (lambda z, e: e[jnp.argmax(jnp.sum((z[..., None, :] - e) ** 2, -1), -1)],
         "that is the *farthest* code: the nearest one is the argmin of ‖z − e_k‖²."),
        (by_dot_product, "the largest dot product z·e_k is not the nearest code when the codes have different "
         "norms: ‖z − e‖² = ‖z‖² − 2 z·e + ‖e‖² keeps the ‖e‖² term."),
        (lambda z, e: z, "z_st must take the values of the nearest codes (the forward pass is z_q)."),
    ]  # fmt: skip
    if not check("quantize", fn, _quantize, (z, codebook), mistakes):
        return False
    try:
        grad = jax.grad(lambda z: jnp.sum(w * jnp.asarray(fn(z, codebook))))(z)
    except Exception as e:  # the learner's code: name what failed
        raise ExerciseError(f"quantize: jax.grad could not go through your function ({type(e).__name__}); write it "
                            "with jax.numpy so that it can be differentiated.") from e  # fmt: skip
    if np.allclose(np.asarray(grad), 0.0):
        raise ExerciseError("quantize: the values are right but no gradient reaches z: the lookup has none. Pass it "
                            "straight through: return z + jax.lax.stop_gradient(z_q - z).")  # fmt: skip
    if not np.allclose(np.asarray(grad), np.asarray(w), rtol=1e-5, atol=1e-6):
        raise ExerciseError("quantize: the gradient with respect to z is not the identity: put the whole "
                            "difference z_q − z under jax.lax.stop_gradient, and add z outside it.")  # fmt: skip
    print("✓ quantize: the gradient is the identity too.")
    return True


# --- notebook 09 ------------------------------------------------------------------------------------


def _noisy_pyramid(x, t, noises, alphas_cumprod):
    """sdjax's answer to the exercise of notebook 09: :func:`sdjax.matryoshka.pyramid`, then DDPM's q_sample at every
    level with the same ᾱ_t."""
    from sdjax.matryoshka import pyramid

    a = jnp.asarray(alphas_cumprod)[t][:, None, None, None]
    return [jnp.sqrt(a) * x0 + jnp.sqrt(1.0 - a) * eps for x0, eps in zip(pyramid(x, len(noises)), noises)]


def _packed(fn: Callable) -> Callable:
    """``fn``'s list of levels as one (B, Σ) array, so the comparison sees every level at once (None stays None)."""

    @functools.wraps(fn)  # the source, for spotting the placeholder, stays the learner's
    def packed(*args):
        out = fn(*args)
        if out is None:
            return None
        return jnp.concatenate([jnp.asarray(level).reshape(len(level), -1) for level in out], axis=1)

    return packed


@register("09", 1, "noisy_pyramid", _noisy_pyramid)
def check_noisy_pyramid(fn: Callable) -> bool:
    """Exercise: the inputs of Matryoshka diffusion, ``fn(x, t, noises, alphas_cumprod)`` → [x_t⁽ʳ⁰⁾, …] lowest
    resolution first: x (B, H, W, C) the full-resolution images, t (B,) one step per image, ``noises`` the ε of each
    level lowest first ((B, H/2^(R−1), …), …, (B, H, W, C)), each level the 2 × 2 block average of the next, noised
    with the same ᾱ_t: x_t⁽ʳ⁾ = √ᾱ_t x⁽ʳ⁾ + √(1 − ᾱ_t) ε⁽ʳ⁾."""
    from sdjax.matryoshka import pyramid

    x, *noises = inputs(91, (2, 8, 8, 3), (2, 2, 2, 3), (2, 4, 4, 3), (2, 8, 8, 3))
    t = jnp.array([50, 700])
    ab = jnp.asarray(LINEAR.alphas_cumprod)

    def noised(levels, noises, ab_t, noise_scale=jnp.sqrt):
        ab_t = ab_t[:, None, None, None]
        return [jnp.sqrt(ab_t) * x0 + noise_scale(1 - ab_t) * e for x0, e in zip(levels, noises)]

    mistakes = [
        (lambda x, t, n, a: noised([x[:, :: 2**k, :: 2**k] for k in reversed(range(len(n)))], n, a[t]),
         "a level must be the 2 × 2 *block average* of the next, not every other pixel (that aliases)."),
        (lambda x, t, n, a: noised(pyramid(x, len(n)), pyramid(n[-1], len(n)), a[t]),
         "every level gets its own ε (the noises given); the box-filtered full-resolution ε has variance 1/4 at the "
         "next level down, so the low levels would be four times less noisy than ᾱ_t says."),
        (lambda x, t, n, a: [noised([x0], [e], a[t + 100 * k])[0] for k, (x0, e) in enumerate(zip(pyramid(x, 3), n))],
         "one t for every level: the same ᾱ_t multiplies every resolution."),
        (lambda x, t, n, a: noised(pyramid(x, len(n)), n, a[t], noise_scale=lambda v: v),
         "the noise is scaled by √(1 − ᾱ_t), not (1 − ᾱ_t)."),
    ]  # fmt: skip
    return check("noisy_pyramid", _packed(fn), _packed(_noisy_pyramid), (x, t, noises, ab),
                 [(_packed(wrong), why) for wrong, why in mistakes])  # fmt: skip
