"""Eight samplers behind one interface, each reproducing a diffusers scheduler (``X.from_config(config)``).

    name       diffusers class                       model evaluations   idea
    ddpm       DDPMScheduler                         N                   ancestral steps (DDPM Algorithm 2)
    ddim       DDIMScheduler                         N                   DDIM, η ∈ [0, 1]
    plms       PNDMScheduler, skip_prk_steps=True    N + 1               Adams–Bashforth on ε (PNDM)
    euler      EulerDiscreteScheduler                N                   Euler on the probability-flow ODE
    euler_a    EulerAncestralDiscreteScheduler       N                   Euler + fresh noise (ancestral)
    dpmpp_2m   DPMSolverMultistepScheduler           N                   DPM-Solver++(2M), 2nd-order multistep
    lms        LMSDiscreteScheduler                  N                   4th-order linear multistep on σ
    heun       HeunDiscreteScheduler                 2N − 1              Heun's 2nd-order method (EDM Alg. 1)

:mod:`sdjax.schedulers` works with timesteps t and ᾱ_t (the DDPM view). Most of the samplers here work
with the noise level instead (Karras et al. 2022, "EDM", arXiv:2206.00364): divide x_t = √ᾱ_t x_0 +
√(1 − ᾱ_t) ε by √ᾱ_t and

    x = x_0 + σ ε,    σ_t = √((1 − ᾱ_t) / ᾱ_t),

a variance-exploding process whose probability-flow ODE is dx/dσ = (x − D(x; σ)) / σ, with D(x; σ) the
denoiser's estimate of x_0 (EDM §2, with σ(t) = t). The network was trained on the VP sample, so it
is fed x / √(σ² + 1) (:meth:`Sampler.model_input`, diffusers' ``scale_model_input``), and its output
becomes D = c_skip x + c_out · output (EDM's preconditioning, §5 and Table 1):

    epsilon:       D(x; σ) = x − σ ε̂                               (c_skip = 1, c_out = −σ: EDM's VP/VE)
    v_prediction:  D(x; σ) = x / (σ² + 1) − σ / √(σ² + 1) · v̂      (EDM's own, σ_data = 1, F = −v̂)

Interface: a :class:`Sampler` is a frozen, hashable description (static under ``jax.jit``). On the
host, :meth:`Sampler.plan` computes the whole chain once (:class:`Plan`: the timesteps the network sees,
the σ's, and per-step constants); on the device, :meth:`Sampler.step` is a pure function of arrays,
with the multistep history in an explicit ``state`` pytree of fixed shapes, so a ``lax.scan`` over
the K model evaluations works:

    plan = sampler.plan(schedule)
    x = plan.init_noise_sigma * x_T                        # x_T ∼ N(0, I)
    state = sampler.init_state(x)
    for i in range(len(plan.timesteps)):
        out = unet(sampler.model_input(plan, i, x), plan.timesteps[i], context)
        x, state = sampler.step(schedule, plan, i, out, x, state, noise_i)    # noise: ddpm, ddim η > 0, euler_a

A chain can also start part-way (img2img, inpainting): ``sampler.plan(schedule, start=s)`` keeps the
steps from s on, and ``sampler.add_noise(schedule, plan, 0, x_0, ε)`` replaces ``init_noise_sigma · x_T``
as the starting x — a clean x_0 taken to the first kept noise level.

Arithmetic: steps run in float32 whatever the input dtype, and x comes back in the model output's
dtype, as in :mod:`sdjax.schedulers` (cast model outputs to float32 to keep x float32 across a chain);
the state is float32. Plans are built in numpy with diffusers' dtypes: σ interpolation, Karras σ's and
σ → t in float64 (diffusers does those in numpy float64), the results stored as float32.

Known differences from diffusers: σ_t is the correctly rounded float32 square root, PyTorch's CPU
float32 sqrt is not — diffusers' table is 1 ulp off for about a fifth of t (6e-8 relative). For the N
where diffusers' "trailing" arange has one point too many (N = 61, 103, …; see
:func:`sdjax.schedulers.timesteps`) we run the N real steps, diffusers N + 1.
"""

from __future__ import annotations

import dataclasses
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from sdjax.schedulers import (
    NoiseSchedule,
    ddim_step,
    ddpm_step,
    predict_eps,
    previous_timesteps,
    q_sample,
    timesteps,
)

Array = jax.Array

SAMPLERS = ("ddpm", "ddim", "plms", "euler", "euler_a", "dpmpp_2m", "lms", "heun")
SIGMA_SAMPLERS = ("euler", "euler_a", "dpmpp_2m", "lms", "heun")  # plan in σ; the rest in (t, prev_t)
KARRAS_SAMPLERS = ("euler", "dpmpp_2m", "lms", "heun")  # the diffusers classes with use_karras_sigmas
KARRAS_RHO = 7.0  # ρ of the Karras schedule, the value of EDM §3 (and diffusers, k-diffusion)
LMS_ORDER = 4


def _f32(x) -> Array:
    return jnp.asarray(x, jnp.float32)


# ---------------------------------------------------------------------------------------------------
# The plan: everything about the chain that is known before the first model evaluation
# ---------------------------------------------------------------------------------------------------


class Plan(NamedTuple):
    """A sampling run of K model evaluations, computed on the host; a pytree of arrays (pass it to jit).

    timesteps: (K,) float32 — the t the network is given at evaluation i. Fractional for the σ
      samplers where σ_i falls between training timesteps (Karras σ's; linspace spacing).
    sigmas: (K + 1,) float32 — σ samplers: σ_i, the noise level of x at evaluation i, then the final
      σ (0). Heun's is diffusers' doubled list [σ_0, σ_1, σ_1, …, σ_{N−1}, σ_{N−1}, 0]. Else (0,).
    t, prev_t: (K,) int32 — ddpm, ddim, plms: the step at evaluation i goes from ᾱ_t to ᾱ_{prev_t}
      (prev_t < 0: past the end). Else (0,).
    lms_coeffs: (K, 4) float32 — lms: the coefficients c_ij of :func:`lms_coefficients`. Else (0, 4).
    init_noise_sigma: () float32 — the scale of the starting noise, x = init_noise_sigma · x_T.
    """

    timesteps: np.ndarray
    sigmas: np.ndarray
    t: np.ndarray
    prev_t: np.ndarray
    lms_coeffs: np.ndarray
    init_noise_sigma: np.ndarray


def sigma_table(schedule: NoiseSchedule) -> np.ndarray:
    """σ_t = √((1 − ᾱ_t) / ᾱ_t) for t = 0 … T − 1: (T,) float32, increasing in t."""
    alphas_cumprod = schedule.alphas_cumprod
    return np.sqrt((np.float32(1.0) - alphas_cumprod) / alphas_cumprod)


def karras_sigmas(sigma_min: float, sigma_max: float, n: int) -> np.ndarray:
    """The noise levels of EDM eq. 5: n points from σ_max down to σ_min, evenly spaced in σ^{1/ρ},

        σ_i = (σ_max^{1/ρ} + i/(n − 1) · (σ_min^{1/ρ} − σ_max^{1/ρ}))^ρ,    ρ = 7,

    which packs the steps towards low noise, where the ODE's solution changes fastest relative to σ.
    Returns (n,) float64 (n = 1: just σ_max).
    """
    ramp = np.linspace(0.0, 1.0, n)
    max_inv_rho, min_inv_rho = sigma_max ** (1.0 / KARRAS_RHO), sigma_min ** (1.0 / KARRAS_RHO)
    return (max_inv_rho + ramp * (min_inv_rho - max_inv_rho)) ** KARRAS_RHO


def sigma_to_t(sigmas: np.ndarray, schedule: NoiseSchedule) -> np.ndarray:
    """The (fractional) timestep of each noise level: linear interpolation of t against log σ_t.

    σ below σ_0 maps to 0 and above σ_{T−1} to T − 1. As in diffusers, the table is float32
    (log σ_t and the difference of two neighbours rounded in float32) and the rest float64.
    Shapes: (n,) → (n,) float64.
    """
    log_table = np.log(sigma_table(schedule))
    log_sigma = np.log(np.maximum(np.asarray(sigmas, np.float64), 1e-10))
    low = np.clip(np.searchsorted(log_table.astype(np.float64), log_sigma, side="right") - 1, 0, len(log_table) - 2)
    w = (log_table[low].astype(np.float64) - log_sigma) / (log_table[low] - log_table[low + 1]).astype(np.float64)
    w = np.clip(w, 0.0, 1.0)
    return (1.0 - w) * low + w * (low + 1)


def _sigma_sampler_timesteps(schedule: NoiseSchedule, n: int) -> np.ndarray:
    """Euler, Euler a, LMS and Heun: leading/trailing as :func:`timesteps`, but linspace left
    unrounded (fractional t): (n,) float32, descending."""
    if schedule.timestep_spacing == "linspace":
        if not 1 <= n <= schedule.num_train_timesteps:
            raise ValueError(f"steps={n} must be between 1 and num_train_timesteps={schedule.num_train_timesteps}")
        return np.linspace(0, schedule.num_train_timesteps - 1, n)[::-1].astype(np.float32)
    return timesteps(schedule, n).astype(np.float32)


def _dpm_timesteps(schedule: NoiseSchedule, n: int) -> np.ndarray:
    """DPMSolverMultistepScheduler's own spacing: (n,) int32, descending.

    diffusers spaces n + 1 points and drops the last (t = 0) for leading and linspace:

        leading:   k · ⌊T/(n + 1)⌋ + steps_offset,  k = n … 1    (SD1.5, n = 10: 901, 811, …, 91)
        linspace:  round(k · (T − 1)/n),              k = n … 1
        trailing:  as :func:`sdjax.schedulers.timesteps`
    """
    T = schedule.num_train_timesteps
    if not 1 <= n <= T:
        raise ValueError(f"steps={n} must be between 1 and num_train_timesteps={T}")
    if schedule.timestep_spacing == "leading":
        ts = np.arange(n, 0, -1) * (T // (n + 1)) + schedule.steps_offset
    elif schedule.timestep_spacing == "linspace":
        ts = np.round(np.linspace(0, T - 1, n + 1))[:0:-1]
    else:
        ts = timesteps(schedule, n)
    return ts.astype(np.int32)


def lms_coefficients(sigmas: np.ndarray, order: int = LMS_ORDER) -> np.ndarray:
    """The linear multistep coefficients of :func:`lms_step` for a chain σ_0 > … > σ_N (float64).

    Step i integrates the polynomial through the last p = min(i + 1, order) derivatives d_{i−j},
    placed at σ_{i−j}, from σ_i to σ_{i+1} (Adams–Bashforth on a non-uniform grid, as in k-diffusion):

        c_ij = ∫_{σ_i}^{σ_{i+1}} ℓ_j(τ) dτ,    ℓ_j(τ) = ∏_{k<p, k≠j} (τ − σ_{i−k}) / (σ_{i−j} − σ_{i−k}),

    ℓ_j the Lagrange basis polynomial (degree p − 1 ≤ 3). The two-point Gauss–Legendre rule
    ∫_a^b f = (b − a)/2 · [f(m − h) + f(m + h)], m = (a + b)/2, h = (b − a)/(2√3), is exact for
    cubics, so this is the integral itself, up to float64 rounding. (diffusers integrates the same
    polynomials with scipy's adaptive quadrature and a float32 integrand: 1e-7 relative apart.)

    Shapes: sigmas (N + 1,) → (N, order); c_ij = 0 for j ≥ p.
    """
    s = np.asarray(sigmas, np.float64)
    coeffs = np.zeros((len(s) - 1, order))
    for i in range(len(s) - 1):
        p = min(i + 1, order)
        a, b = s[i], s[i + 1]
        tau = (a + b) / 2 + (b - a) / (2 * np.sqrt(3.0)) * np.array([-1.0, 1.0])
        for j in range(p):
            basis = np.ones(2)
            for k in range(p):
                if k != j:
                    basis *= (tau - s[i - k]) / (s[i - j] - s[i - k])
            coeffs[i, j] = (b - a) / 2 * basis.sum()
    return coeffs


# ---------------------------------------------------------------------------------------------------
# Steps on σ (Karras et al. 2022): Euler, Euler ancestral, LMS, Heun
# ---------------------------------------------------------------------------------------------------


def denoised(schedule: NoiseSchedule, model_output: Array, x: Array, sigma) -> Array:
    """D(x; σ), the estimate of x_0 from the network's output at noise level σ (module docstring).

    Shapes: model_output, x (B, ...); sigma () → (B, ...) float32.
    """
    out, x, sigma = _f32(model_output), _f32(x), _f32(sigma)
    if schedule.prediction_type == "epsilon":
        return x - sigma * out
    return x / (sigma**2 + 1.0) + (-sigma / jnp.sqrt(sigma**2 + 1.0)) * out


def euler_step(schedule: NoiseSchedule, model_output: Array, x: Array, sigma, sigma_next) -> Array:
    """One Euler step of the probability-flow ODE from σ to σ_next (the predictor of EDM Algorithm 1):

        d = (x − D(x; σ)) / σ,    x_next = x + (σ_next − σ) d

    Shapes: model_output, x (B, ...); sigma, sigma_next () → (B, ...) in model_output's dtype.
    """
    d = (_f32(x) - denoised(schedule, model_output, x, sigma)) / sigma
    return (_f32(x) + d * (sigma_next - sigma)).astype(model_output.dtype)


def euler_ancestral_step(
    schedule: NoiseSchedule, model_output: Array, x: Array, sigma, sigma_next, noise: Array
) -> Array:
    """One ancestral step σ → σ_next: an Euler step down to σ_down, then fresh noise of std σ_up,

        σ_up = σ_next √(σ² − σ_next²) / σ,    σ_down = √(σ_next² − σ_up²),
        x_next = x + (σ_down − σ) d + σ_up z,    d = (x − D(x; σ)) / σ,    z = noise,

    σ_up² + σ_down² = σ_next², so x_next has the right noise level; σ_up² is the variance of DDPM's
    posterior q(x_{t'} | x_t, x_0) in σ terms (k-diffusion's ``get_ancestral_step`` with η = 1).
    The last step (σ_next = 0) adds no noise.

    Shapes: model_output, x, noise (B, ...); sigma, sigma_next () → (B, ...) in model_output's dtype.
    """
    sigma_up = jnp.sqrt(sigma_next**2 * (sigma**2 - sigma_next**2) / sigma**2)
    # ≥ 0 in exact arithmetic; the clamp only guards against a rounding dip below
    sigma_down = jnp.sqrt(jnp.maximum(sigma_next**2 - sigma_up**2, 0.0))
    d = (_f32(x) - denoised(schedule, model_output, x, sigma)) / sigma
    x_next = _f32(x) + d * (sigma_down - sigma) + sigma_up * _f32(noise)
    return x_next.astype(model_output.dtype)


def lms_step(
    schedule: NoiseSchedule, model_output: Array, x: Array, state: dict, sigma, coeffs: Array
) -> tuple[Array, dict]:
    """One step of the linear multistep method on the ODE (k-diffusion's ``sample_lms``):

        d_i = (x_i − D(x_i; σ_i)) / σ_i,    x_{i+1} = x_i + Σ_j c_ij d_{i−j}

    with c_ij from :func:`lms_coefficients` (zero where there is no history yet).

    state: {"d": (3, B, ...) float32} — d_{i−1}, d_{i−2}, d_{i−3}, newest first (zeros at the start).
    Shapes: model_output, x (B, ...); sigma (); coeffs (4,) → (x_{i+1} in model_output's dtype, state).
    """
    d = (_f32(x) - denoised(schedule, model_output, x, sigma)) / sigma
    history = state["d"]
    increment = coeffs[0] * d + coeffs[1] * history[0] + coeffs[2] * history[1] + coeffs[3] * history[2]
    x_next = _f32(x) + increment
    return x_next.astype(model_output.dtype), {"d": jnp.concatenate([d[None], history[:-1]])}


def heun_step(
    schedule: NoiseSchedule, model_output: Array, x: Array, state: dict, sigma_prev, sigma, sigma_next, corrector
) -> tuple[Array, dict]:
    """Half of a Heun step, EDM Algorithm 1 (S_churn = 0): one call per model evaluation.

    Predictor (corrector=False), the network evaluated at x_i, σ = σ_i:
        d_i = (x_i − D(x_i; σ_i)) / σ_i,    x̃ = x_i + (σ_{i+1} − σ_i) d_i                (Euler)
    Corrector (corrector=True), the network evaluated at x̃, σ = σ_{i+1}; sigma_prev = σ_i:
        d'  = (x̃ − D(x̃; σ_{i+1})) / σ_{i+1},    x_{i+1} = x_i + (σ_{i+1} − σ_i) (d_i + d')/2

    The step to σ = 0 is predictor only (d' would divide by 0). With ``schedule.clip_sample``,
    D is clipped to [−r, r] (diffusers' HeunDiscreteScheduler option).

    state: {"d": d, "x": x} of the last evaluation, float32 (B, ...) — what a corrector reads.
    Shapes: model_output, x (B, ...); sigmas () float32; corrector () bool →
    (x̃ or x_{i+1} in model_output's dtype, state).
    """
    x = _f32(x)
    x0 = denoised(schedule, model_output, x, sigma)
    if schedule.clip_sample:
        x0 = jnp.clip(x0, -schedule.clip_sample_range, schedule.clip_sample_range)
    d = (x - x0) / sigma
    start = jnp.where(corrector, state["x"], x)
    slope = jnp.where(corrector, (state["d"] + d) / 2, d)
    dt = jnp.where(corrector, sigma - sigma_prev, sigma_next - sigma)
    return (start + slope * dt).astype(model_output.dtype), {"d": d, "x": x}


# ---------------------------------------------------------------------------------------------------
# DPM-Solver++(2M) (Lu et al. 2022, arXiv:2211.01095)
# ---------------------------------------------------------------------------------------------------


def dpmpp_2m_step(
    schedule: NoiseSchedule,
    model_output: Array,
    x: Array,
    state: dict,
    sigma_prev,
    sigma,
    sigma_next,
    second_order,
) -> tuple[Array, dict]:
    """One step of DPM-Solver++(2M), Algorithm 2 of the paper, on the VP sample x (not x / √ᾱ).

    In the paper's notation α_t = √ᾱ_t = 1/√(σ² + 1) and σ_t = √(1 − ᾱ_t) = σ α_t, the half-log-SNR
    λ_t = log(α_t / σ_t), and x̂_0 = (x − σ_t ε̂)/α_t (or α_t x − σ_t v̂). Going from t_{i−1} to t_i
    with h_i = λ_{t_i} − λ_{t_{i−1}}:

        1st order (DPM-Solver++1, = DDIM):  x_{t_i} = (σ_{t_i}/σ_{t_{i−1}}) x_{t_{i−1}} − α_{t_i} (e^{−h_i} − 1) D_i,
                                            D_i = x̂_0(t_{i−1})
        2nd order (2M):                     D_i = (1 + 1/(2r_i)) x̂_0(t_{i−1}) − 1/(2r_i) x̂_0(t_{i−2}),
                                            r_i = h_{i−1}/h_i

    i.e. the exact solution of the ODE in λ with x̂_0 extrapolated linearly from the last two steps.
    diffusers' defaults (solver_order=2, lower_order_final, final σ = 0) give first order on the first
    step (no history) and on the last, to σ = 0 (λ = ∞, e^{−h} = 0: x_next = D, and r = 0).

    state: {"x0": x̂_0 of the previous step, (B, ...) float32}.
    Shapes: model_output, x (B, ...); sigma_prev, sigma, sigma_next () float32 (σ's, not σ_t's; σ_prev
    unused on first-order steps); second_order () bool → (x_next in model_output's dtype, state).
    """

    def alpha_sigma_lambda(sig):
        alpha = 1.0 / jnp.sqrt(sig**2 + 1.0)
        sigma_t = sig * alpha
        return alpha, sigma_t, jnp.log(alpha) - jnp.log(sigma_t)

    x, out = _f32(x), _f32(model_output)
    _, _, lambda_prev = alpha_sigma_lambda(sigma_prev)
    alpha_s, sigma_s, lambda_s = alpha_sigma_lambda(sigma)
    alpha_t, sigma_t, lambda_t = alpha_sigma_lambda(sigma_next)
    if schedule.prediction_type == "epsilon":
        x0 = (x - sigma_s * out) / alpha_s
    else:
        x0 = alpha_s * x - sigma_s * out
    h = lambda_t - lambda_s
    r = (lambda_s - lambda_prev) / h
    # D = x̂_0 + (x̂_0 − x̂_0_prev) / (2r); the weight is chosen as a scalar, so that the first and last
    # steps' r (0, or ±∞) never reaches the arrays.
    weight = jnp.where(second_order, 1.0 / (2.0 * r), 0.0)
    D = x0 + weight * (x0 - state["x0"])
    x_next = (sigma_t / sigma_s) * x - (alpha_t * (jnp.exp(-h) - 1.0)) * D
    return x_next.astype(model_output.dtype), {"x0": x0}


# ---------------------------------------------------------------------------------------------------
# PLMS (PNDM with skip_prk_steps; Liu et al. 2022, arXiv:2202.09778)
# ---------------------------------------------------------------------------------------------------

# The weights of ε' = Σ_j w_j ε_{i−j} at evaluation i (row min(i, 4)), on the current output and the
# 3 stored ones, newest first. Rows 2–4 are the Adams–Bashforth formulas of orders 2–4, row 4 PNDM's
# pseudo linear multistep formula. Row 1 redoes step 0 with the average of the two slopes (S-PNDM's
# pseudo improved Euler start).
_PLMS_WEIGHTS = np.array(
    [
        [1.0, 0.0, 0.0, 0.0],
        [1 / 2, 1 / 2, 0.0, 0.0],
        [3 / 2, -1 / 2, 0.0, 0.0],
        [23 / 12, -16 / 12, 5 / 12, 0.0],
        [55 / 24, -59 / 24, 37 / 24, -9 / 24],
    ],
    np.float32,
)


def pndm_transfer(schedule: NoiseSchedule, eps: Array, x: Array, t, prev_t) -> Array:
    """PNDM's transfer φ(x_t, ε, t, t') (eq. 9), the DDIM (η = 0) step written with ᾱ only:

        x_{t'} = √(ᾱ_{t'}/ᾱ_t) x_t − (ᾱ_{t'} − ᾱ_t) / (ᾱ_t √(1 − ᾱ_{t'}) + √(ᾱ_t (1 − ᾱ_t) ᾱ_{t'})) · ε

    with ᾱ_{t'} = ``schedule.final_alpha_cumprod`` for t' < 0. Shapes: eps, x (B, ...) float32;
    t, prev_t () int → (B, ...) float32.
    """
    alpha_bar = schedule.alpha_bar(t)
    alpha_bar_prev = schedule.alpha_bar(prev_t, final=schedule.final_alpha_cumprod)
    denominator = alpha_bar * jnp.sqrt(1.0 - alpha_bar_prev) + jnp.sqrt(alpha_bar * (1.0 - alpha_bar) * alpha_bar_prev)
    return jnp.sqrt(alpha_bar_prev / alpha_bar) * x - (alpha_bar_prev - alpha_bar) * eps / denominator


def plms_step(schedule: NoiseSchedule, model_output: Array, x: Array, state: dict, i, t, prev_t) -> tuple[Array, dict]:
    """Evaluation i of PLMS, the pseudo linear multistep method: ε' = Σ_j w_j ε_{i−j}, x_{t'} = φ(x_t, ε', t, t').

    diffusers' schedule of the N + 1 evaluations (``_PLMS_WEIGHTS``; plan.t, plan.prev_t):
      i = 0:  ε' = ε_0, a DDIM step from t_0; x_{t_0} is kept.
      i = 1:  the network saw the result, at t_1; step 0 is redone from the kept x_{t_0} with
              ε' = (ε_0 + ε_1)/2. ε_1 is not stored: the history stays [ε_0].
      i ≥ 2:  Adams–Bashforth of order min(i, 4) on the stored outputs, each stored after use.
    For v_prediction the *outputs* are combined and then turned into ε at the step's (x_t, t).

    state: {"outputs": (3, B, ...) the last stored model outputs, newest first; "x_first": x_{t_0}},
    float32, zeros at the start.
    Shapes: model_output, x (B, ...); i, t, prev_t () int → (x_{t'} in model_output's dtype, state).
    """
    i = jnp.asarray(i)
    out = _f32(model_output)
    w = jnp.asarray(_PLMS_WEIGHTS)[jnp.minimum(i, len(_PLMS_WEIGHTS) - 1)]
    history = state["outputs"]
    combined = w[0] * out + w[1] * history[0] + w[2] * history[1] + w[3] * history[2]
    redo = i == 1
    start = jnp.where(redo, state["x_first"], _f32(x))
    eps = predict_eps(schedule, start, t, combined)
    x_next = pndm_transfer(schedule, eps, start, t, prev_t)
    new_state = {
        "outputs": jnp.where(redo, history, jnp.concatenate([out[None], history[:-1]])),
        "x_first": jnp.where(i == 0, _f32(x), state["x_first"]),
    }
    return x_next.astype(model_output.dtype), new_state


# ---------------------------------------------------------------------------------------------------
# The uniform interface
# ---------------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Sampler:
    """Which sampler, with how many steps: everything but the noise schedule (module docstring).

    name: one of ``SAMPLERS``.
    steps: N, the number of steps; the network is evaluated K times (N, N + 1 for plms, 2N − 1 for
      heun). Timesteps follow ``schedule.timestep_spacing`` and ``steps_offset``.
    eta: DDIM's η (ddim only).
    karras: the Karras σ's (EDM eq. 5, ρ = 7) instead of the σ's of the spaced timesteps — diffusers'
      ``use_karras_sigmas=True`` (euler, dpmpp_2m, lms, heun).

    :class:`sdjax.diffusion.Sampler` (ddpm and ddim for :mod:`sdjax.diffusion`'s sampling loops) has
    the same fields; this one puts all eight behind the plan / step interface.
    """

    name: str = "plms"
    steps: int = 50
    eta: float = 0.0
    karras: bool = False

    def __post_init__(self):
        if self.name not in SAMPLERS:
            raise ValueError(f"sampler {self.name!r}: expected one of {SAMPLERS}")
        if self.eta != 0.0 and self.name != "ddim":
            raise ValueError(f"eta is DDIM's; {self.name} has none")
        if not 0.0 <= self.eta <= 1.0:
            raise ValueError(f"DDIM's eta must be in [0, 1], got {self.eta}")
        if self.karras and self.name not in KARRAS_SAMPLERS:
            raise ValueError(f"karras=True: only {KARRAS_SAMPLERS} take Karras sigmas (as in diffusers)")

    @property
    def needs_noise(self) -> bool:
        """Whether :meth:`step` takes fresh N(0, I) noise: ddpm, ddim with η > 0, euler_a."""
        return self.name in ("ddpm", "euler_a") or (self.name == "ddim" and self.eta > 0)

    @property
    def order(self) -> int:
        """Model evaluations per step in the plan's list of timesteps: 2 for heun, else 1 (diffusers'
        ``scheduler.order``; PLMS's extra evaluation does not count)."""
        return 2 if self.name == "heun" else 1

    def plan(self, schedule: NoiseSchedule, start: int = 0) -> Plan:
        """The chain, as diffusers' ``set_timesteps`` builds it (see :class:`Plan`).

        start: run only the steps from ``start`` on (0 ≤ start < N): the chain of img2img and inpainting
          (SDEdit), which begins at an intermediate noise level. As diffusers' ``get_timesteps`` does it,
          the plan's evaluations from index k = start · :attr:`order` on are kept, each with the σ, t and
          coefficients it has in the whole chain, and :meth:`init_state` starts the multistep history
          afresh. (So LMS's first kept step weighs its one derivative by the whole chain's 4th-order
          coefficient, the missing history counting as zeros; DPM-Solver++ restarts at first order.)
          PLMS is the exception: diffusers' PNDM steps by a counter of its own evaluations, not by
          position, so the kept evaluations are re-read as a chain of their own (:func:`_plms_steps`).
        """
        if not 0 <= start < self.steps:
            raise ValueError(f"start={start}: expected 0 ≤ start < steps={self.steps}")
        plan = self._whole_plan(schedule)
        if start == 0:
            return plan
        k = start * self.order
        if self.name == "plms":
            t, prev_t = _plms_steps(plan.timesteps[k:].astype(np.int32), schedule.num_train_timesteps // self.steps)
            return plan._replace(timesteps=plan.timesteps[k:], t=t, prev_t=prev_t)
        # the arrays a sampler does not use are empty, and stay so
        return plan._replace(
            timesteps=plan.timesteps[k:],
            sigmas=plan.sigmas[k:],
            t=plan.t[k:],
            prev_t=plan.prev_t[k:],
            lms_coeffs=plan.lms_coeffs[k:],
        )

    def _whole_plan(self, schedule: NoiseSchedule) -> Plan:
        name, n = self.name, self.steps
        if name not in ("ddpm", "ddim") and schedule.prediction_type not in ("epsilon", "v_prediction"):
            raise ValueError(f"{name}: prediction_type {schedule.prediction_type!r} is not supported")
        no_ints, no_floats, no_coeffs = np.zeros(0, np.int32), np.zeros(0, np.float32), np.zeros((0, 4), np.float32)
        one = np.float32(1.0)
        if name in ("ddpm", "ddim", "plms"):
            ts = timesteps(schedule, n)
            if name == "ddpm":
                t, prev_t = ts, previous_timesteps(ts)
            elif name == "ddim":
                t, prev_t = ts, previous_timesteps(ts, stride=schedule.num_train_timesteps // n)
            else:
                ts, t, prev_t = _plms_chain(ts, schedule.num_train_timesteps // n)
            return Plan(ts.astype(np.float32), no_floats, t, prev_t, no_coeffs, one)

        if name == "dpmpp_2m":
            ts = _dpm_timesteps(schedule, n)
            if self.karras:
                # over the whole table, whatever the spacing: σ_max = σ_{T−1}, σ_min = σ_0
                table = sigma_table(schedule)
                sigmas = karras_sigmas(float(table[0]), float(table[-1]), n)
                ts = sigma_to_t(sigmas, schedule)
                if schedule.beta_schedule != "squaredcos_cap_v2":  # diffusers rounds, except for this one
                    ts = np.round(ts)
            else:
                sigmas = np.interp(ts, np.arange(schedule.num_train_timesteps), sigma_table(schedule))
            sigmas = np.append(sigmas, 0.0).astype(np.float32)
            return Plan(ts.astype(np.float32), sigmas, no_ints, no_ints, no_coeffs, one)

        ts = _sigma_sampler_timesteps(schedule, n)
        sigmas = np.interp(ts, np.arange(schedule.num_train_timesteps), sigma_table(schedule))  # float64
        if self.karras:
            # between the σ's of the first and last spaced timesteps (unlike dpmpp_2m's)
            sigmas = karras_sigmas(sigmas[-1], sigmas[0], n)
            ts = sigma_to_t(sigmas, schedule).astype(np.float32)
        sigmas = np.append(sigmas, 0.0).astype(np.float32)
        # diffusers' x_T scale: σ_max, or √(σ_max² + 1) for leading spacing (the std of x_0 + σ ε for
        # unit-variance x_0) — the two conventions coexist in diffusers, keyed on the spacing.
        init_noise_sigma = sigmas.max()
        if schedule.timestep_spacing == "leading":
            init_noise_sigma = np.sqrt(init_noise_sigma**2 + np.float32(1.0))
        coeffs = lms_coefficients(sigmas).astype(np.float32) if name == "lms" else no_coeffs
        if name == "heun":  # each σ_i between the ends twice: for the corrector into it, the predictor out
            sigmas = np.concatenate([sigmas[:1], np.repeat(sigmas[1:-1], 2), sigmas[-1:]])
            ts = np.concatenate([ts[:1], np.repeat(ts[1:], 2)])
        return Plan(ts, sigmas, no_ints, no_ints, coeffs, init_noise_sigma)

    def init_state(self, x: Array) -> dict:
        """The state before the first step: zeros, float32, x's shape (B, ...) with a history axis of 3
        for plms and lms; {} for the one-step samplers."""
        zeros = jnp.zeros(x.shape, jnp.float32)
        history = jnp.zeros((3, *x.shape), jnp.float32)
        return {
            "plms": {"outputs": history, "x_first": zeros},
            "dpmpp_2m": {"x0": zeros},
            "lms": {"d": history},
            "heun": {"d": zeros, "x": zeros},
        }.get(self.name, {})

    def add_noise(self, schedule: NoiseSchedule, plan: Plan, i, x0: Array, noise: Array) -> Array:
        """x_0 taken to the noise level of evaluation i: the x the chain would have there (diffusers'
        ``scheduler.add_noise`` at that point of the chain), in the sampler's own parametrisation:

            ddpm, ddim, plms:  x = √ᾱ_t x_0 + √(1 − ᾱ_t) ε,    t = plan.timesteps[i]     (DDPM's q(x_t | x_0))
            dpmpp_2m:          x = α x_0 + σ α ε,              α = 1/√(σ_i² + 1)         (the same, VP form)
            the other σ ones:  x = x_0 + σ_i ε                                          (x_0 + σ ε, EDM's form)

        Shapes: x0, noise (B, ...); i () int, may be traced → (B, ...) float32.
        """
        if self.name in ("ddpm", "ddim", "plms"):
            t = jnp.asarray(plan.timesteps)[i].astype(jnp.int32)
            return q_sample(schedule, _f32(x0), t, _f32(noise))
        sigma = jnp.asarray(plan.sigmas)[i]
        if self.name == "dpmpp_2m":
            alpha = 1.0 / jnp.sqrt(sigma**2 + 1.0)
            return alpha * _f32(x0) + (sigma * alpha) * _f32(noise)
        return _f32(x0) + _f32(noise) * sigma

    def model_input(self, plan: Plan, i, x: Array) -> Array:
        """What the network is given at evaluation i: x / √(σ_i² + 1) for the σ samplers that work on
        x_0 + σ ε, x itself for the rest. (B, ...) in x's dtype; i may be traced."""
        if self.name not in SIGMA_SAMPLERS or self.name == "dpmpp_2m":
            return x
        sigma = jnp.asarray(plan.sigmas)[i]
        return (_f32(x) / jnp.sqrt(sigma**2 + 1.0)).astype(x.dtype)

    def step(
        self,
        schedule: NoiseSchedule,
        plan: Plan,
        i,
        model_output: Array,
        x: Array,
        state: dict,
        noise: Array | None = None,
    ) -> tuple[Array, dict]:
        """Evaluation i's step: x (the x that :meth:`model_input` scaled) → the next x, and the new state.

        Shapes: model_output, x, noise (B, ...); i () int, may be traced → ((B, ...) in model_output's
        dtype, state). ``noise`` is N(0, I), required exactly when :attr:`needs_noise`.
        """
        if self.needs_noise and noise is None:
            raise ValueError(f"{self.name} needs noise")
        name = self.name
        if name in ("ddpm", "ddim", "plms"):
            t, prev_t = jnp.asarray(plan.t)[i], jnp.asarray(plan.prev_t)[i]
            if name == "ddpm":
                return ddpm_step(schedule, model_output, t, prev_t, x, noise).x_prev, state
            if name == "ddim":
                return ddim_step(schedule, model_output, t, prev_t, x, noise, self.eta).x_prev, state
            return plms_step(schedule, model_output, x, state, i, t, prev_t)
        sigmas = jnp.asarray(plan.sigmas)
        sigma, sigma_next = sigmas[i], sigmas[i + 1]
        if name == "euler":
            return euler_step(schedule, model_output, x, sigma, sigma_next), state
        if name == "euler_a":
            return euler_ancestral_step(schedule, model_output, x, sigma, sigma_next, noise), state
        if name == "lms":
            return lms_step(schedule, model_output, x, state, sigma, jnp.asarray(plan.lms_coeffs)[i])
        sigma_prev = sigmas[jnp.maximum(i - 1, 0)]  # (at i = 0: σ_0, unused)
        if name == "heun":  # evaluations alternate predictor, corrector, …, predictor (the last, to σ = 0)
            return heun_step(schedule, model_output, x, state, sigma_prev, sigma, sigma_next, i % 2 == 1)
        i = jnp.asarray(i)
        second_order = (i > 0) & (i < len(plan.timesteps) - 1)
        return dpmpp_2m_step(schedule, model_output, x, state, sigma_prev, sigma, sigma_next, second_order)


def _plms_chain(ts: np.ndarray, stride: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """PNDMScheduler's chain (skip_prk_steps) from the spaced timesteps t_0 > … > t_{N−1}.

    The network sees [t_0, t_1, t_1, t_2, …, t_{N−1}] (N + 1 evaluations; just [t_0] for N = 1). Each
    step goes from t to t − stride (DDIM's rule), except evaluation 1, which redoes step 0: from
    t_1 + stride (= t_0 for leading and trailing spacing) to t_1.
    Returns (timesteps, t, prev_t), each (K,) int32.
    """
    seen = np.concatenate([ts[:1], ts[1:2], ts[1:]]).astype(np.int32)
    return (seen, *_plms_steps(seen, stride))


def _plms_steps(seen: np.ndarray, stride: int) -> tuple[np.ndarray, np.ndarray]:
    """Where PNDMScheduler's ``step_plms`` goes from and to at each of the evaluations at ``seen``, as it
    decides it: by its counter j of evaluations, not by the timesteps. Evaluation j steps from seen[j] to
    seen[j] − stride, except j = 1, which redoes step 0 from seen[1] + stride to seen[1].

    For a whole chain this is the chain of :func:`_plms_chain`. For one cut at img2img's start (diffusers
    slices the list [t_0, t_1, t_1, t_2, …]) it is what diffusers runs, oddities included: the cut
    [t_1, t_2, t_3] steps t_1 → t_2, redoes t_1 → t_2, then steps from t_3 (not t_2) → t_3 − stride.
    Shapes: (K,) int32 → (t, prev_t), each (K,) int32.
    """
    t, prev_t = seen.copy(), seen - np.int32(stride)
    if len(seen) > 1:
        t[1], prev_t[1] = seen[1] + stride, seen[1]
    return t, prev_t
