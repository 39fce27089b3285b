"""UniPC (Zhao et al. 2023, arXiv:2302.04867): diffusers' ``UniPCMultistepScheduler`` with its defaults
(solver_order=2, solver_type="bh2", predict_x0=True): a multistep predictor (UniP) followed, once the
network has been evaluated at the predicted point, by a corrector (UniC) that redoes the same step with
that new evaluation included, at no extra evaluation.

In the notation of :mod:`sdjax.samplers.dpm_solver` (α_t = 1/√(σ² + 1), σ_t = σ α_t, λ = log(α_t/σ_t),
m_i = x̂_0 at evaluation i), a step from t_{i} to t_{i+1}, h = λ_{i+1} − λ_i, B(h) = e^{−h} − 1 (bh2):

    UniP-2:  x_{i+1} = (σ_{t_{i+1}}/σ_{t_i}) x_i − α_{t_{i+1}} B(h) [m_i + ½ D_1],
             D_1 = (m_{i−1} − m_i)/r,  r = (λ_{i−1} − λ_i)/h
    UniC-2:  the step t_{i−1} → t_i redone with m_i known (h = λ_i − λ_{i−1}, r = (λ_{i−2} − λ_{i−1})/h):
             x_i^c = (σ_{t_i}/σ_{t_{i−1}}) x_{i−1}^c
                     − α_{t_i} B(h) [m_{i−1} + ρ_0 (m_{i−2} − m_{i−1})/r + ρ_1 (m_i − m_{i−1})]

with (ρ_0, ρ_1) solving [[1, 1], [r, 1]] ρ = (φ_2(−h)/B(h), 2 φ_3(−h)/B(h)), φ_{k+1}(z) = (φ_k(z) − 1/k!)/z,
hφ_1 = e^{−h} − 1 (the paper's Algorithms 2–3 with B(h) = e^{h} − 1 for the data prediction). First
order (UniP-1 = DPM-Solver++ 1, UniC-1 with ρ = ½) where there is not enough history: the predictor on
the first and last steps, the corrector on the second evaluation. The corrected x_i is what the
predictor starts from, and what the next corrector redoes the step from; m_i is computed from the
uncorrected x_i, the point the network actually saw.
"""

from __future__ import annotations

import dataclasses

import jax.numpy as jnp
import numpy as np

from sdjax.samplers.base import f32
from sdjax.samplers.dpm_solver import DPMSolverPP2M, alpha_sigma_lambda, x0_from_output


def unipc_coefficients(sigmas: np.ndarray) -> np.ndarray:
    """The history weights of each evaluation, from the plan's σ's (K + 1,) → (K, 4) float64:
    [ρ_0/r and ρ_1 of the corrector, ½/r of the predictor, 0], zero where the order leaves them out.

    Computed on the host in float64 because they are ill-conditioned in float32: for small h,
    2(φ_2(−h)/(−h) − ½)/B(h) ≈ −h/3 + … comes out of terms ≈ ½ (measured at 25 steps: 8e-5 relative
    error in float32 with XLA's expm1, 1.8e-5 with PyTorch's, which diffusers computes with).
    λ = log(α_t/σ_t) = −log σ.
    """
    lam = -np.log(np.asarray(sigmas, np.float64)[:-1])  # the last σ (0) is never a step's start
    K = len(sigmas) - 1
    coeffs = np.zeros((K, 4))
    if np.any(np.diff(lam) == 0):  # a step of length 0 (leading spacing with N ≥ T/2 repeats the top t)
        raise ValueError("UniPC needs distinct noise levels: fewer steps, or another timestep_spacing")
    for i in range(1, K):  # the corrector, from the second evaluation on
        h = lam[i] - lam[i - 1]
        B = np.expm1(-h)
        phi = B / -h - 1.0
        b = np.array([phi / B, (phi / -h - 0.5) * 2.0 / B])
        if i == 1:
            coeffs[i, :2] = 0.0, 0.5
        else:
            r = (lam[i - 2] - lam[i - 1]) / h
            rho = np.linalg.solve([[1.0, 1.0], [r, 1.0]], b)
            coeffs[i, :2] = rho[0] / r, rho[1]
    for i in range(1, K - 1):  # the second-order predictor (not on the last step, to σ = 0)
        coeffs[i, 2] = 0.5 / ((lam[i - 1] - lam[i]) / (lam[i + 1] - lam[i]))
    return coeffs


def unipc_step(schedule, model_output, x, state, sigmas, coeffs, corrects):
    """Evaluation i of UniPC-2 (module docstring): correct x_i, then predict x_{i+1}.

    sigmas: (σ_{i−1}, σ_i, σ_{i+1}) () float32 (σ_{i−1} unused at i = 0); coeffs: (4,) float32, the
    row of :func:`unipc_coefficients`; corrects () bool: i > 0.
    state: {"x0": (2, B, ...) m_{i−1}, m_{i−2}; "x": x_{i−1}^c (B, ...)}, float32.
    Shapes: model_output, x (B, ...) → (x_{i+1} in model_output's dtype, state).
    """
    x = f32(x)
    _, sigma_p, lambda_p = alpha_sigma_lambda(sigmas[0])
    alpha_i, sigma_i, lambda_i = alpha_sigma_lambda(sigmas[1])
    alpha_n, sigma_n, lambda_n = alpha_sigma_lambda(sigmas[2])
    m = x0_from_output(schedule, f32(model_output), x, alpha_i, sigma_i)
    m1, m2 = state["x0"][0], state["x0"][1]

    # UniC: t_{i−1} → t_i again, with m_i
    B = jnp.expm1(-(lambda_i - lambda_p))
    correction = coeffs[0] * (m2 - m1) + coeffs[1] * (m - m1)
    x_c = (sigma_i / sigma_p) * state["x"] - (alpha_i * B) * m1 - (alpha_i * B) * correction
    x = jnp.where(corrects, x_c, x)

    # UniP: t_i → t_{i+1}
    B = jnp.expm1(-(lambda_n - lambda_i))
    x_next = (sigma_n / sigma_i) * x - (alpha_n * B) * m - (alpha_n * B) * (coeffs[2] * (m1 - m))
    return x_next.astype(model_output.dtype), {"x0": jnp.stack([m, m1]), "x": x}


@dataclasses.dataclass(frozen=True)
class UniPC(DPMSolverPP2M):
    """UniPC, bh2, order 2 (:func:`unipc_step`); the plan of DPM-Solver++(2M) with the history weights
    of :func:`unipc_coefficients` (a cut plan gets its own: its history starts afresh)."""

    name = "unipc"
    diffusers_class = "UniPCMultistepScheduler"
    a1111_name = "UniPC"
    variant = {"solver_order": 2, "solver_type": "bh2", "predict_x0": True, "lower_order_final": True}
    variant_defaults = variant
    rounds_cosine_karras = True

    def whole_plan(self, schedule):
        plan = super().whole_plan(schedule)
        return plan._replace(coeffs=unipc_coefficients(plan.sigmas).astype(np.float32))

    def cut(self, plan, k, schedule):
        plan = super().cut(plan, k, schedule)
        return plan._replace(coeffs=unipc_coefficients(plan.sigmas).astype(np.float32))

    def init_state(self, x):
        return {"x0": jnp.zeros((2, *x.shape), jnp.float32), "x": jnp.zeros(x.shape, jnp.float32)}

    def step(self, schedule, plan, i, model_output, x, state, noise=None):
        sigmas, i = jnp.asarray(plan.sigmas), jnp.asarray(i)
        three = sigmas[jnp.stack([jnp.maximum(i - 1, 0), i, i + 1])]
        return unipc_step(schedule, model_output, x, state, three, jnp.asarray(plan.coeffs)[i], i > 0)
