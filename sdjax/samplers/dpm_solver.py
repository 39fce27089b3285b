"""DPM-Solver++(2M) (Lu et al. 2022, arXiv:2211.01095): diffusers' ``DPMSolverMultistepScheduler`` with its
defaults (algorithm_type="dpmsolver++", solver_order=2), and its SDE variant (algorithm_type="sde-dpmsolver++");
and DPM-Solver++(3M) SDE as k-diffusion has it (:func:`dpmpp_3m_sde_step`, on the σ samplers' x_0 + σ ε).

It works on the VP sample x itself, as the DDPM-style samplers do, but plans in σ, as the σ samplers do
(:mod:`sdjax.samplers.sigma`): in the paper's notation α_t = √ᾱ_t = 1/√(σ² + 1), σ_t = √(1 − ᾱ_t) = σ α_t.
"""

from __future__ import annotations

import dataclasses
from typing import ClassVar

import jax
import jax.numpy as jnp
import numpy as np

from sdjax.samplers.base import Plan, Sampler, f32
from sdjax.samplers.sigma import SigmaSampler, denoised, karras_sigmas, sigma_table, sigma_to_t
from sdjax.schedulers import NoiseSchedule, timesteps

Array = jax.Array


def alpha_sigma_lambda(sigma):
    """(α_t, σ_t, λ_t = log(α_t / σ_t)) at noise level σ."""
    alpha = 1.0 / jnp.sqrt(sigma**2 + 1.0)
    sigma_t = sigma * alpha
    return alpha, sigma_t, jnp.log(alpha) - jnp.log(sigma_t)


def x0_from_output(schedule: NoiseSchedule, out: Array, x: Array, alpha, sigma_t) -> Array:
    """x̂_0 = (x − σ_t ε̂)/α_t, or α_t x − σ_t v̂ for v_prediction (float32 inputs)."""
    if schedule.prediction_type == "epsilon":
        return (x - sigma_t * out) / alpha
    return alpha * x - sigma_t * out


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


def dpmpp_2m_step(
    schedule: NoiseSchedule,
    model_output: Array,
    x: Array,
    state: dict,
    sigma_prev,
    sigma,
    sigma_next,
    second_order,
    noise=None,
) -> tuple[Array, dict]:
    """One step of DPM-Solver++(2M), Algorithm 2 of the paper, on the VP sample x (not x / √ᾱ); with
    ``noise``, of DPM-Solver++(2M) SDE.

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

    The SDE variant (diffusers' algorithm_type="sde-dpmsolver++" with the midpoint rule, k-diffusion's
    ``sample_dpmpp_2m_sde`` with η = 1; the paper's §5 and Appendix) solves the reverse SDE instead of
    the ODE: the same D, but e^{−2h} where the ODE has e^{−h}, and fresh noise z ∼ N(0, I),

        x_{t_i} = (σ_{t_i}/σ_{t_{i−1}}) e^{−h_i} x_{t_{i−1}} + α_{t_i} (1 − e^{−2h_i}) D_i + σ_{t_i} √(1 − e^{−2h_i}) z.

    state: {"x0": x̂_0 of the previous step, (B, ...) float32}.
    Shapes: model_output, x, noise (B, ...); sigma_prev, sigma, sigma_next () float32 (σ's, not σ_t's;
    σ_prev unused on first-order steps); second_order () bool → (x_next in model_output's dtype, state).
    """

    x, out = f32(x), f32(model_output)
    _, _, lambda_prev = alpha_sigma_lambda(sigma_prev)
    alpha_s, sigma_s, lambda_s = alpha_sigma_lambda(sigma)
    alpha_t, sigma_t, lambda_t = alpha_sigma_lambda(sigma_next)
    x0 = x0_from_output(schedule, out, x, alpha_s, sigma_s)
    h = lambda_t - lambda_s
    r = (lambda_s - lambda_prev) / h
    # D = x̂_0 + (x̂_0 − x̂_0_prev) / (2r); the weight is chosen as a scalar, so that the first and last
    # steps' r (0, or ±∞) never reaches the arrays.
    weight = jnp.where(second_order, 1.0 / (2.0 * r), 0.0)
    D = x0 + weight * (x0 - state["x0"])
    if noise is None:
        x_next = (sigma_t / sigma_s) * x - (alpha_t * (jnp.exp(-h) - 1.0)) * D
    else:
        decay = 1.0 - jnp.exp(-2.0 * h)
        x_next = (sigma_t / sigma_s * jnp.exp(-h)) * x + (alpha_t * decay) * D + sigma_t * jnp.sqrt(decay) * f32(noise)
    return x_next.astype(model_output.dtype), {"x0": x0}


@dataclasses.dataclass(frozen=True)
class DPMSolverPP2M(Sampler):
    """DPM-Solver++(2M) (:func:`dpmpp_2m_step`); karras: Karras σ's over the whole σ table."""

    karras: bool = False

    takes_karras = True
    name = "dpmpp_2m"
    diffusers_class = "DPMSolverMultistepScheduler"
    a1111_name = "DPM++ 2M"
    config_defaults = {"timestep_spacing": "linspace"}

    variant = {"algorithm_type": "dpmsolver++", "solver_order": 2, "solver_type": "midpoint"}
    variant_defaults = variant
    rounds_cosine_karras: ClassVar[bool] = False

    def whole_plan(self, schedule):
        ts = _dpm_timesteps(schedule, self.steps)
        if self.karras:
            # over the whole table, whatever the spacing: σ_max = σ_{T−1}, σ_min = σ_0
            table = sigma_table(schedule)
            sigmas = karras_sigmas(float(table[0]), float(table[-1]), self.steps)
            ts = sigma_to_t(sigmas, schedule)
            # diffusers rounds, except DPMSolverMultistepScheduler for this one schedule
            if self.rounds_cosine_karras or schedule.beta_schedule != "squaredcos_cap_v2":
                ts = np.round(ts)
        else:
            sigmas = np.interp(ts, np.arange(schedule.num_train_timesteps), sigma_table(schedule))
        return Plan.of(ts, sigmas=np.append(sigmas, 0.0).astype(np.float32))

    def add_noise(self, schedule, plan, i, x0, noise):
        """x = α x_0 + σ α ε, α = 1/√(σ_i² + 1) (DDPM's q(x_t | x_0), VP form)."""
        sigma = jnp.asarray(plan.sigmas)[i]
        alpha = 1.0 / jnp.sqrt(sigma**2 + 1.0)
        return alpha * f32(x0) + (sigma * alpha) * f32(noise)

    def predict_x0(self, schedule, plan, i, x, model_output):
        alpha, sigma_t, _ = alpha_sigma_lambda(jnp.asarray(plan.sigmas)[i])
        return x0_from_output(schedule, f32(model_output), f32(x), alpha, sigma_t)

    def init_state(self, x):
        return {"x0": jnp.zeros(x.shape, jnp.float32)}

    def step(self, schedule, plan, i, model_output, x, state, noise=None):
        sigmas, i = jnp.asarray(plan.sigmas), jnp.asarray(i)
        sigma_prev = sigmas[jnp.maximum(i - 1, 0)]  # (at i = 0: σ_0, unused)
        second_order = (i > 0) & (i < len(plan.timesteps) - 1)
        if self.needs_noise:
            self._require(noise)
        return dpmpp_2m_step(
            schedule, model_output, x, state, sigma_prev, sigmas[i], sigmas[i + 1], second_order, noise
        )


@dataclasses.dataclass(frozen=True)
class DPMSolverPP2MSDE(DPMSolverPP2M):
    """DPM-Solver++(2M) SDE, midpoint rule (:func:`dpmpp_2m_step` with noise)."""

    name = "dpmpp_2m_sde"
    a1111_name = "DPM++ 2M SDE"
    needs_noise = True
    variant = {"algorithm_type": "sde-dpmsolver++", "solver_order": 2, "solver_type": "midpoint"}


def dpmpp_3m_sde_step(
    schedule: NoiseSchedule, model_output: Array, x: Array, state: dict, sigma, sigma_next, order, noise: Array
) -> tuple[Array, dict]:
    """One step of DPM-Solver++(3M) SDE as k-diffusion's ``sample_dpmpp_3m_sde`` (η = 1) runs it — the
    "DPM++ 3M SDE" of the web UIs — on x = x_0 + σ ε (the σ samplers' form, not the VP sample).

    With h = log σ − log σ_next (λ = −log σ) and the denoiser's outputs D, D₁, D₂ at this step and the
    two before (steps h₁, h₂ long), the SDE's exponential integrator with D expanded in λ:

        x' = e^{−2h} x + (1 − e^{−2h}) D + φ₂ d₁ − φ₃ d₂ + σ_next √(1 − e^{−2h}) z,
        r₀ = h₁/h, r₁ = h₂/h,  d₁,₀ = (D − D₁)/r₀,  d₁,₁ = (D₁ − D₂)/r₁,
        d₁ = d₁,₀ + r₀/(r₀ + r₁) (d₁,₀ − d₁,₁),  d₂ = (d₁,₀ − d₁,₁)/(r₀ + r₁),
        φ₂ = 1 − (1 − e^{−2h})/(2h),  φ₃ = φ₂/(2h) − ½,

    (d₁ ≈ h D′ and d₂ ≈ h² D″/2 in λ). ``order`` () int: 1 on the first step (no history), 2 on the
    second (the d₁ term only, with d = (D − D₁)/r₀), 3 after. The step to σ = 0 is x' = D.

    diffusers' DPMSolverMultistepScheduler(solver_order=3, algorithm_type="sde-dpmsolver++") is not this
    method: its D₂ weight, (1 − e^{−2h} − 2h)/(2h)² − ½, tends to −1 (not 0) as h → 0, and it takes the
    second-order step by the midpoint rule (docs/samplers.md), so sdjax follows k-diffusion here.

    state: {"D": (2, B, ...) the last two D's, "h": (2,) their steps h₁, h₂}. Shapes: model_output, x,
    noise (B, ...); sigma, sigma_next () → (x_next in model_output's dtype, state).
    """
    x, D = f32(x), denoised(schedule, model_output, x, sigma)
    D1, D2 = state["D"][0], state["D"][1]
    h1, h2 = state["h"][0], state["h"][1]
    last = sigma_next == 0
    safe_next = jnp.where(last, 1.0, sigma_next)
    h = jnp.log(sigma) - jnp.log(safe_next)
    h_eta = 2.0 * h
    x_next = jnp.exp(-h_eta) * x - jnp.expm1(-h_eta) * D
    phi_2 = jnp.expm1(-h_eta) / h_eta + 1.0
    # third order (the weights as scalars, so that the unused branches never reach the arrays)
    r0, r1 = h1 / h, h2 / h
    d1_0, d1_1 = (D - D1) / jnp.where(order >= 2, r0, 1.0), (D1 - D2) / jnp.where(order >= 3, r1, 1.0)
    d1 = d1_0 + (d1_0 - d1_1) * jnp.where(order >= 3, r0 / (r0 + r1), 0.0)
    d2 = (d1_0 - d1_1) * jnp.where(order >= 3, 1.0 / (r0 + r1), 0.0)
    phi_3 = phi_2 / h_eta - 0.5
    x_next = x_next + jnp.where(order >= 2, phi_2, 0.0) * d1 - jnp.where(order >= 3, phi_3, 0.0) * d2
    x_next = x_next + f32(noise) * (safe_next * jnp.sqrt(-jnp.expm1(-2.0 * h)))
    x_next = jnp.where(last, D, x_next)
    new_state = {"D": jnp.stack([D, D1]), "h": jnp.stack([h, h1])}
    return x_next.astype(model_output.dtype), new_state


@dataclasses.dataclass(frozen=True)
class DPMSolverPP3MSDE(SigmaSampler):
    """DPM-Solver++(3M) SDE (:func:`dpmpp_3m_sde_step`) on the σ samplers' plan (Euler's σ's, Karras or not)."""

    name = "dpmpp_3m_sde"
    diffusers_class = None  # diffusers' 3M SDE is another method (dpmpp_3m_sde_step): tested against k-diffusion
    a1111_name = "DPM++ 3M SDE"
    needs_noise = True

    def init_state(self, x):
        return {"D": jnp.zeros((2, *x.shape), jnp.float32), "h": jnp.ones((2,), jnp.float32)}

    def step(self, schedule, plan, i, model_output, x, state, noise=None):
        self._require(noise)
        sigma, sigma_next = self._sigmas(plan, i)
        order = jnp.minimum(jnp.asarray(i), 2) + 1
        return dpmpp_3m_sde_step(schedule, model_output, x, state, sigma, sigma_next, order, noise)
