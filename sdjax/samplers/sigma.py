"""The samplers on σ, the noise level (Karras et al. 2022, "EDM", arXiv:2206.00364).

:mod:`sdjax.schedulers` works with timesteps t and ᾱ_t (the DDPM view). These samplers work with the
noise level instead: divide x_t = √ᾱ_t x_0 + √(1 − ᾱ_t) ε by √ᾱ_t and

    x = x_0 + σ ε,    σ_t = √((1 − ᾱ_t) / ᾱ_t),

a variance-exploding process whose probability-flow ODE is dx/dσ = (x − D(x; σ)) / σ, with D(x; σ) the
denoiser's estimate of x_0 (EDM §2, with σ(t) = t). The network was trained on the VP sample, so it
is fed x / √(σ² + 1) (:meth:`SigmaSampler.model_input`, diffusers' ``scale_model_input``), and its
output becomes D = c_skip x + c_out · output (EDM's preconditioning, §5 and Table 1):

    epsilon:       D(x; σ) = x − σ ε̂                               (c_skip = 1, c_out = −σ: EDM's VP/VE)
    v_prediction:  D(x; σ) = x / (σ² + 1) − σ / √(σ² + 1) · v̂      (EDM's own, σ_data = 1, F = −v̂)

    euler     EulerDiscreteScheduler            Euler on the probability-flow ODE
    euler_a   EulerAncestralDiscreteScheduler   Euler + fresh noise (ancestral)
    lms       LMSDiscreteScheduler              4th-order linear multistep on σ
    heun      HeunDiscreteScheduler             Heun's 2nd-order method (EDM Alg. 1), 2N − 1 evaluations

Plans are built in numpy with diffusers' dtypes: σ interpolation, Karras σ's and σ → t in float64
(diffusers does those in numpy float64), the results stored as float32. σ_t is the correctly rounded
float32 square root; PyTorch's CPU float32 sqrt is not — diffusers' table is 1 ulp off for about a
fifth of t (6e-8 relative).
"""

from __future__ import annotations

import dataclasses
from typing import ClassVar

import jax
import jax.numpy as jnp
import numpy as np

from sdjax.samplers.base import Plan, Sampler, f32
from sdjax.schedulers import NoiseSchedule, timesteps

Array = jax.Array

KARRAS_RHO = 7.0  # ρ of the Karras schedule, the value of EDM §3 (and diffusers, k-diffusion)
LMS_ORDER = 4


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


def _sigma_sampler_timesteps(schedule: NoiseSchedule, n: int, dtype=np.float32) -> np.ndarray:
    """Euler, Euler a, LMS and Heun: leading/trailing as :func:`timesteps`, but linspace left
    unrounded (fractional t): (n,) descending, in ``dtype`` (the σ's are interpolated at these t:
    float32 for those classes, float64 for DPMSolverSDEScheduler)."""
    if schedule.timestep_spacing == "linspace":
        if not 1 <= n <= schedule.num_train_timesteps:
            raise ValueError(f"steps={n} must be between 1 and num_train_timesteps={schedule.num_train_timesteps}")
        return np.linspace(0, schedule.num_train_timesteps - 1, n)[::-1].astype(dtype)
    return timesteps(schedule, n).astype(dtype)


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


def denoised(schedule: NoiseSchedule, model_output: Array, x: Array, sigma) -> Array:
    """D(x; σ), the estimate of x_0 from the network's output at noise level σ (module docstring).

    Shapes: model_output, x (B, ...); sigma () → (B, ...) float32.
    """
    out, x, sigma = f32(model_output), f32(x), f32(sigma)
    if schedule.prediction_type == "epsilon":
        return x - sigma * out
    return x / (sigma**2 + 1.0) + (-sigma / jnp.sqrt(sigma**2 + 1.0)) * out


def euler_step(schedule: NoiseSchedule, model_output: Array, x: Array, sigma, sigma_next) -> Array:
    """One Euler step of the probability-flow ODE from σ to σ_next (the predictor of EDM Algorithm 1):

        d = (x − D(x; σ)) / σ,    x_next = x + (σ_next − σ) d

    Shapes: model_output, x (B, ...); sigma, sigma_next () → (B, ...) in model_output's dtype.
    """
    d = (f32(x) - denoised(schedule, model_output, x, sigma)) / sigma
    return (f32(x) + d * (sigma_next - sigma)).astype(model_output.dtype)


def ancestral_sigmas(sigma, sigma_next):
    """(σ_down, σ_up) of an ancestral step σ → σ_next (k-diffusion's ``get_ancestral_step``, η = 1):

        σ_up = σ_next √(σ² − σ_next²) / σ,    σ_down = √(σ_next² − σ_up²),

    so that a deterministic step down to σ_down plus fresh noise of std σ_up lands at σ_next. Shapes: () → ().
    """
    sigma_up = jnp.sqrt(sigma_next**2 * (sigma**2 - sigma_next**2) / sigma**2)
    # ≥ 0 in exact arithmetic; the clamp only guards against a rounding dip below
    sigma_down = jnp.sqrt(jnp.maximum(sigma_next**2 - sigma_up**2, 0.0))
    return sigma_down, sigma_up


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
    sigma_down, sigma_up = ancestral_sigmas(sigma, sigma_next)
    d = (f32(x) - denoised(schedule, model_output, x, sigma)) / sigma
    x_next = f32(x) + d * (sigma_down - sigma) + sigma_up * f32(noise)
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
    d = (f32(x) - denoised(schedule, model_output, x, sigma)) / sigma
    history = state["d"]
    increment = coeffs[0] * d + coeffs[1] * history[0] + coeffs[2] * history[1] + coeffs[3] * history[2]
    x_next = f32(x) + increment
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
    x = f32(x)
    x0 = denoised(schedule, model_output, x, sigma)
    if schedule.clip_sample:
        x0 = jnp.clip(x0, -schedule.clip_sample_range, schedule.clip_sample_range)
    d = (x - x0) / sigma
    start = jnp.where(corrector, state["x"], x)
    slope = jnp.where(corrector, (state["d"] + d) / 2, d)
    dt = jnp.where(corrector, sigma - sigma_prev, sigma_next - sigma)
    return (start + slope * dt).astype(model_output.dtype), {"d": d, "x": x}


# ---------------------------------------------------------------------------------------------------
# The samplers
# ---------------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class SigmaSampler(Sampler):
    """A sampler on x = x_0 + σ ε: the plan's σ's at the spaced timesteps (or Karras σ's), the network
    shown x / √(σ² + 1), x̂_0 = D(x; σ). karras: Karras σ's, where the diffusers class takes them."""

    karras: bool = False

    takes_karras = True
    config_defaults = {"timestep_spacing": "linspace"}
    timestep_dtype: ClassVar[type] = np.float32  # of the spaced t the σ's are interpolated at

    def spaced_sigmas(self, schedule: NoiseSchedule) -> tuple[np.ndarray, np.ndarray]:
        """The N timesteps ((N,) float32) and their σ's ((N,) float64, before the final 0)."""
        ts = _sigma_sampler_timesteps(schedule, self.steps, self.timestep_dtype)
        sigmas = np.interp(ts, np.arange(schedule.num_train_timesteps), sigma_table(schedule))  # float64
        if self.karras:
            # between the σ's of the first and last spaced timesteps (unlike dpmpp_2m's)
            sigmas = karras_sigmas(sigmas[-1], sigmas[0], self.steps)
            ts = sigma_to_t(sigmas, schedule)
        return ts.astype(np.float32), sigmas

    def whole_plan(self, schedule):
        ts, sigmas = self.spaced_sigmas(schedule)
        sigmas = np.append(sigmas, 0.0).astype(np.float32)
        # diffusers' x_T scale: σ_max, or √(σ_max² + 1) for leading spacing (the std of x_0 + σ ε for
        # unit-variance x_0) — the two conventions coexist in diffusers, keyed on the spacing.
        init_noise_sigma = sigmas.max()
        if schedule.timestep_spacing == "leading":
            init_noise_sigma = np.sqrt(init_noise_sigma**2 + np.float32(1.0))
        return Plan.of(ts, sigmas=sigmas, init_noise_sigma=init_noise_sigma)

    def add_noise(self, schedule, plan, i, x0, noise):
        """x = x_0 + σ_i ε (EDM's form)."""
        return f32(x0) + f32(noise) * jnp.asarray(plan.sigmas)[i]

    def model_input(self, plan, i, x):
        """x / √(σ_i² + 1): back on the DDPM scale the network was trained on."""
        sigma = jnp.asarray(plan.sigmas)[i]
        return (f32(x) / jnp.sqrt(sigma**2 + 1.0)).astype(x.dtype)

    def predict_x0(self, schedule, plan, i, x, model_output):
        return denoised(schedule, model_output, x, jnp.asarray(plan.sigmas)[i])

    def _sigmas(self, plan: Plan, i):
        sigmas = jnp.asarray(plan.sigmas)
        return sigmas[i], sigmas[i + 1]


@dataclasses.dataclass(frozen=True)
class Euler(SigmaSampler):
    """Euler on the probability-flow ODE (:func:`euler_step`)."""

    name = "euler"
    diffusers_class = "EulerDiscreteScheduler"
    a1111_name = "Euler"

    def step(self, schedule, plan, i, model_output, x, state, noise=None):
        return euler_step(schedule, model_output, x, *self._sigmas(plan, i)), state


@dataclasses.dataclass(frozen=True)
class EulerAncestral(SigmaSampler):
    """Euler with fresh noise after every step (:func:`euler_ancestral_step`)."""

    name = "euler_a"
    diffusers_class = "EulerAncestralDiscreteScheduler"
    a1111_name = "Euler a"
    needs_noise = True
    takes_karras = False

    def step(self, schedule, plan, i, model_output, x, state, noise=None):
        self._require(noise)
        return euler_ancestral_step(schedule, model_output, x, *self._sigmas(plan, i), noise), state


@dataclasses.dataclass(frozen=True)
class LMS(SigmaSampler):
    """The 4th-order linear multistep method (:func:`lms_step`)."""

    name = "lms"
    diffusers_class = "LMSDiscreteScheduler"
    a1111_name = "LMS"

    def whole_plan(self, schedule):
        plan = super().whole_plan(schedule)
        return plan._replace(coeffs=lms_coefficients(plan.sigmas).astype(np.float32))

    def init_state(self, x):
        return {"d": jnp.zeros((3, *x.shape), jnp.float32)}

    def step(self, schedule, plan, i, model_output, x, state, noise=None):
        sigma = jnp.asarray(plan.sigmas)[i]
        return lms_step(schedule, model_output, x, state, sigma, jnp.asarray(plan.coeffs)[i])


@dataclasses.dataclass(frozen=True)
class Heun(SigmaSampler):
    """Heun's method (:func:`heun_step`), one call per evaluation: predictor, corrector, …, predictor
    (the last, to σ = 0)."""

    name = "heun"
    diffusers_class = "HeunDiscreteScheduler"
    a1111_name = "Heun"
    config_defaults = SigmaSampler.config_defaults | {"clip_sample": False, "beta_start": 0.00085, "beta_end": 0.012}
    order = 2

    def whole_plan(self, schedule):
        plan = super().whole_plan(schedule)
        sigmas, ts = plan.sigmas, plan.timesteps
        # each σ_i between the ends twice: for the corrector into it, the predictor out of it
        return plan._replace(
            sigmas=np.concatenate([sigmas[:1], np.repeat(sigmas[1:-1], 2), sigmas[-1:]]),
            timesteps=np.concatenate([ts[:1], np.repeat(ts[1:], 2)]),
        )

    def init_state(self, x):
        return {"d": jnp.zeros(x.shape, jnp.float32), "x": jnp.zeros(x.shape, jnp.float32)}

    def step(self, schedule, plan, i, model_output, x, state, noise=None):
        sigmas = jnp.asarray(plan.sigmas)
        sigma_prev = sigmas[jnp.maximum(i - 1, 0)]  # (at i = 0: σ_0, unused)
        return heun_step(schedule, model_output, x, state, sigma_prev, *self._sigmas(plan, i), i % 2 == 1)
