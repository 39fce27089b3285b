"""Two-stage DPM-Solver++ samplers (Lu et al. 2022, arXiv:2211.01095, §4 "singlestep"), on x = x_0 + σ ε.

Each step σ_k → σ_{k+1} evaluates the network twice: at x_k, and at a point x_mid half-way in
log σ (the midpoint of DPM-Solver++(2S), r = ½), whose x̂_0 then carries the whole step. Both are
ancestral: the step lands at σ_down < σ_{k+1} and fresh noise of std σ_up tops it up
(:func:`~sdjax.samplers.sigma.ancestral_sigmas`). With D = D(x; σ) the denoiser (:func:`denoised`),
a first-order DPM-Solver++ step from σ to σ' in the data-prediction form is exact for constant D:

    x' = D + (σ'/σ)(x − D)        (the exponential integrator: e^{−h} = σ'/σ, h = log σ − log σ')

    dpmpp_2s_a  (k-diffusion's sample_dpmpp_2s_ancestral; no diffusers class)
        σ_mid = √(σ_k σ_down):  x_mid = D_k + (σ_mid/σ_k)(x_k − D_k)
        x_{k+1} = D_mid + (σ_down/σ_k)(x_k − D_mid) + σ_up z
    dpmpp_sde   (diffusers' DPMSolverSDEScheduler; k-diffusion's sample_dpmpp_sde, r = ½)
        σ_mid = √(σ_k σ_{k+1});  the half step is itself ancestral, to σ_mid:
        x_mid = D_k + (σ'_down/σ_k)(x_k − D_k) + σ'_up n₁,   (σ'_down, σ'_up) for σ_k → σ_mid
        x_{k+1} = D_mid + (σ_down/σ_k)(x_k − D_mid) + σ_up n₂

The step to σ = 0 is one Euler evaluation (x_N = D), so a chain of N steps has K = 2N − 1 evaluations.

The noise of ``dpmpp_sde`` is a Brownian motion W in σ, as in k-diffusion and diffusers (which draw it
from torchsde's Brownian tree): n₁ is W's increment over [σ_mid, σ_k], n₂ over [σ_{k+1}, σ_k], each
divided by the square root of its length, so n₂ contains n₁. From the chain's two independent draws
z₁, z₂ (evaluations 2k and 2k + 1, :mod:`sdjax.chain`, per image):

    n₁ = z₁,    n₂ = (√(σ_k − σ_mid) z₁ + √(σ_mid − σ_{k+1}) z₂) / √(σ_k − σ_{k+1}).

The plan's σ's are the noise levels of the point the network sees at each evaluation,
[σ_0, σ_mid,0, σ_1, σ_mid,1, …, σ_{N−1}, 0], its timesteps t(σ) (:func:`sigma_to_t` at the midpoints),
and the step σ's (σ_0 … σ_{N−1}) are those of :class:`~sdjax.samplers.sigma.Euler`, Karras or not.
"""

from __future__ import annotations

import dataclasses

import jax.numpy as jnp
import numpy as np

from sdjax.samplers.base import f32
from sdjax.samplers.sigma import SigmaSampler, ancestral_sigmas, denoised, sigma_to_t


def dpmpp_two_stage_step(
    schedule, model_output, x, state, sigma, sigma_mid, sigma_next, second_half, noise, *, sde: bool
):
    """One evaluation of a two-stage step σ → σ_next through σ_mid (module docstring).

    First half (second_half=False): the network was evaluated at x = x_k, σ; returns x_mid, or x_N = the
    Euler step to 0 when σ_mid = 0 (the last evaluation). Second half: evaluated at x_mid, σ_mid; returns
    x_{k+1} from state["x"] = x_k.

    state: {"x": x_k, "z": the first half's noise} (float32, (B, ...)).
    Shapes: model_output, x, noise (B, ...); σ's () float32; second_half () bool →
    (x in model_output's dtype, state).
    """
    x, z = f32(x), f32(noise)
    D = denoised(schedule, model_output, x, jnp.where(second_half, sigma_mid, sigma))
    # first half: to the midpoint (ancestral for the SDE), or Euler to σ = 0
    if sde:
        down, up = ancestral_sigmas(sigma, sigma_mid)
        x_mid = D + (down / sigma) * (x - D) + up * z
    else:
        x_mid = D + (sigma_mid / sigma) * (x - D)
    x_mid = jnp.where(sigma_mid == 0, x + (x - D) / sigma * (0.0 - sigma), x_mid)
    # second half: the whole step from x_k with the midpoint's D, ancestral
    down, up = ancestral_sigmas(sigma, sigma_next)
    if sde:
        d1, d2 = jnp.maximum(sigma - sigma_mid, 0.0), jnp.maximum(sigma_mid - sigma_next, 0.0)
        z = (jnp.sqrt(d1) * state["z"] + jnp.sqrt(d2) * z) / jnp.sqrt(d1 + d2)
    x_next = D + (down / sigma) * (state["x"] - D) + up * z
    out = jnp.where(second_half, x_next, x_mid)
    new_state = {"x": jnp.where(second_half, state["x"], x), "z": jnp.where(second_half, state["z"], f32(noise))}
    return out.astype(model_output.dtype), new_state


@dataclasses.dataclass(frozen=True)
class _TwoStage(SigmaSampler):
    """A two-stage sampler: the plan interleaves the midpoints; one call per evaluation."""

    order = 2
    needs_noise = True
    sde = False

    def midpoint(self, sigma: np.ndarray, sigma_next: np.ndarray) -> np.ndarray:
        """σ_mid of each step σ → σ_next (float64)."""
        raise NotImplementedError

    def whole_plan(self, schedule):
        plan = super().whole_plan(schedule)
        _, sigmas = self.spaced_sigmas(schedule)  # float64, without the final 0
        mids = self.midpoint(sigmas[:-1], sigmas[1:])
        mid_ts = sigma_to_t(mids, schedule).astype(np.float32)
        # [σ_0, mid_0, σ_1, mid_1, …, σ_{N−1}], then the final 0
        n = len(sigmas)
        order = np.empty(2 * n - 1, np.float64)
        order[0::2], order[1::2] = sigmas, mids
        ts = np.empty(2 * n - 1, np.float32)
        ts[0::2], ts[1::2] = plan.timesteps, mid_ts
        return plan._replace(timesteps=ts, sigmas=np.append(order, 0.0).astype(np.float32))

    def init_state(self, x):
        return {"x": jnp.zeros(x.shape, jnp.float32), "z": jnp.zeros(x.shape, jnp.float32)}

    def step(self, schedule, plan, i, model_output, x, state, noise=None):
        self._require(noise)
        sigmas, i = jnp.asarray(plan.sigmas), jnp.asarray(i)
        k = i - i % 2  # the evaluation at σ_k, where the step starts
        last = len(plan.sigmas) - 1
        sigma, sigma_mid, sigma_next = sigmas[k], sigmas[k + 1], sigmas[jnp.minimum(k + 2, last)]
        return dpmpp_two_stage_step(
            schedule, model_output, x, state, sigma, sigma_mid, sigma_next, i % 2 == 1, noise, sde=self.sde
        )


@dataclasses.dataclass(frozen=True)
class DPMSolverPP2SAncestral(_TwoStage):
    """DPM-Solver++(2S) with ancestral noise, midpoint between σ_k and σ_down (k-diffusion only)."""

    name = "dpmpp_2s_a"
    diffusers_class = None  # diffusers has no scheduler for it: tested against k-diffusion
    a1111_name = "DPM++ 2S a"

    def midpoint(self, sigma, sigma_next):
        down = np.sqrt(sigma_next**2 - sigma_next**2 * (sigma**2 - sigma_next**2) / sigma**2)
        return np.sqrt(sigma * down)


@dataclasses.dataclass(frozen=True)
class DPMSolverPPSDE(_TwoStage):
    """DPM-Solver++ (stochastic), midpoint between σ_k and σ_{k+1}, Brownian noise (module docstring)."""

    name = "dpmpp_sde"
    diffusers_class = "DPMSolverSDEScheduler"
    a1111_name = "DPM++ SDE"
    config_defaults = SigmaSampler.config_defaults | {"clip_sample": False, "beta_start": 0.00085, "beta_end": 0.012}
    timestep_dtype = np.float64
    sde = True

    def midpoint(self, sigma, sigma_next):
        return np.sqrt(sigma * sigma_next)
