"""The samplers that step between training timesteps, t → t' (DDPM's own view of the chain).

x is the DDPM sample x_t = √ᾱ_t x_0 + √(1 − ᾱ_t) ε itself, the network sees it as it is, and a plan
lists for every evaluation the t the step starts from and the t' it goes to (``plan.t``, ``plan.prev_t``).

    ddpm   DDPMScheduler                      ancestral steps (DDPM Algorithm 2)
    ddim   DDIMScheduler                      DDIM, η ∈ [0, 1]
    plms   PNDMScheduler, skip_prk_steps      Adams–Bashforth on ε (PNDM), N + 1 evaluations
"""

from __future__ import annotations

import dataclasses

import jax.numpy as jnp
import numpy as np

from sdjax.samplers.base import Plan, Sampler, f32
from sdjax.schedulers import (
    NoiseSchedule,
    ddim_step,
    ddpm_step,
    predict_eps,
    predict_x0,
    previous_timesteps,
    q_sample,
    timesteps,
)


@dataclasses.dataclass(frozen=True)
class TimestepSampler(Sampler):
    """A sampler on DDPM's x_t: noising is q(x_t | x_0), and x̂_0 comes from the output at t."""

    def add_noise(self, schedule, plan, i, x0, noise):
        """x = √ᾱ_t x_0 + √(1 − ᾱ_t) ε, t = plan.timesteps[i] (DDPM's q(x_t | x_0))."""
        t = jnp.asarray(plan.timesteps)[i].astype(jnp.int32)
        return q_sample(schedule, f32(x0), t, f32(noise))

    def predict_x0(self, schedule, plan, i, x, model_output):
        t = jnp.asarray(plan.timesteps)[i].astype(jnp.int32)  # (integral here)
        return predict_x0(schedule, f32(x), t, f32(model_output))

    def _t(self, plan: Plan, i):
        return jnp.asarray(plan.t)[i], jnp.asarray(plan.prev_t)[i]


@dataclasses.dataclass(frozen=True)
class DDPM(TimestepSampler):
    """DDPM's ancestral sampler: each step draws x_{t'} ∼ p_θ(x_{t'} | x_t) (:func:`sdjax.schedulers.ddpm_step`)."""

    name = "ddpm"
    prediction_types = ("epsilon", "v_prediction", "sample")
    diffusers_class = "DDPMScheduler"
    a1111_name = "DDPM"
    needs_noise = True

    def whole_plan(self, schedule):
        ts = timesteps(schedule, self.steps)
        return Plan.of(ts, t=ts, prev_t=previous_timesteps(ts))

    def step(self, schedule, plan, i, model_output, x, state, noise=None):
        self._require(noise)
        return ddpm_step(schedule, model_output, *self._t(plan, i), x, noise).x_prev, state


@dataclasses.dataclass(frozen=True)
class DDIM(TimestepSampler):
    """DDIM (:func:`sdjax.schedulers.ddim_step`); eta: η ∈ [0, 1], 0 deterministic, 1 DDPM's variance."""

    eta: float = 0.0

    name = "ddim"
    prediction_types = ("epsilon", "v_prediction", "sample")
    diffusers_class = "DDIMScheduler"
    a1111_name = "DDIM"

    def __post_init__(self):
        super().__post_init__()
        if not 0.0 <= self.eta <= 1.0:
            raise ValueError(f"DDIM's eta must be in [0, 1], got {self.eta}")

    @property
    def needs_noise(self) -> bool:
        return self.eta > 0

    def whole_plan(self, schedule):
        ts = timesteps(schedule, self.steps)
        return Plan.of(ts, t=ts, prev_t=previous_timesteps(ts, stride=schedule.num_train_timesteps // self.steps))

    def step(self, schedule, plan, i, model_output, x, state, noise=None):
        if self.needs_noise:
            self._require(noise)
        return ddim_step(schedule, model_output, *self._t(plan, i), x, noise, self.eta).x_prev, state


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


def pndm_transfer(schedule: NoiseSchedule, eps, x, t, prev_t):
    """PNDM's transfer φ(x_t, ε, t, t') (eq. 9), the DDIM (η = 0) step written with ᾱ only:

        x_{t'} = √(ᾱ_{t'}/ᾱ_t) x_t − (ᾱ_{t'} − ᾱ_t) / (ᾱ_t √(1 − ᾱ_{t'}) + √(ᾱ_t (1 − ᾱ_t) ᾱ_{t'})) · ε

    with ᾱ_{t'} = ``schedule.final_alpha_cumprod`` for t' < 0. Shapes: eps, x (B, ...) float32;
    t, prev_t () int → (B, ...) float32.
    """
    alpha_bar = schedule.alpha_bar(t)
    alpha_bar_prev = schedule.alpha_bar(prev_t, final=schedule.final_alpha_cumprod)
    denominator = alpha_bar * jnp.sqrt(1.0 - alpha_bar_prev) + jnp.sqrt(alpha_bar * (1.0 - alpha_bar) * alpha_bar_prev)
    return jnp.sqrt(alpha_bar_prev / alpha_bar) * x - (alpha_bar_prev - alpha_bar) * eps / denominator


def plms_step(schedule: NoiseSchedule, model_output, x, state: dict, i, t, prev_t):
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
    out = f32(model_output)
    w = jnp.asarray(_PLMS_WEIGHTS)[jnp.minimum(i, len(_PLMS_WEIGHTS) - 1)]
    history = state["outputs"]
    combined = w[0] * out + w[1] * history[0] + w[2] * history[1] + w[3] * history[2]
    redo = i == 1
    start = jnp.where(redo, state["x_first"], f32(x))
    eps = predict_eps(schedule, start, t, combined)
    x_next = pndm_transfer(schedule, eps, start, t, prev_t)
    new_state = {
        "outputs": jnp.where(redo, history, jnp.concatenate([out[None], history[:-1]])),
        "x_first": jnp.where(i == 0, f32(x), state["x_first"]),
    }
    return x_next.astype(model_output.dtype), new_state


@dataclasses.dataclass(frozen=True)
class PLMS(TimestepSampler):
    """PLMS (:func:`plms_step`): N + 1 evaluations, the network seeing [t_0, t_1, t_1, t_2, …, t_{N−1}]."""

    name = "plms"
    diffusers_class = "PNDMScheduler"
    a1111_name = "PLMS"
    config_defaults = {"set_alpha_to_one": False}

    def whole_plan(self, schedule):
        ts = timesteps(schedule, self.steps)
        seen = np.concatenate([ts[:1], ts[1:2], ts[1:]]).astype(np.int32)  # just [t_0] for N = 1
        return Plan.of(seen, **_plms_steps(seen, schedule.num_train_timesteps // self.steps))

    def cut(self, plan, k, schedule):
        """diffusers' PNDM steps by a counter of its own evaluations, not by position, so the kept
        evaluations are re-read as a chain of their own (:func:`_plms_steps`)."""
        seen = plan.timesteps[k:]
        return plan._replace(
            timesteps=seen, **_plms_steps(seen.astype(np.int32), schedule.num_train_timesteps // self.steps)
        )

    def init_state(self, x):
        return {"outputs": jnp.zeros((3, *x.shape), jnp.float32), "x_first": jnp.zeros(x.shape, jnp.float32)}

    def step(self, schedule, plan, i, model_output, x, state, noise=None):
        return plms_step(schedule, model_output, x, state, i, *self._t(plan, i))


def _plms_steps(seen: np.ndarray, stride: int) -> dict[str, np.ndarray]:
    """Where PNDMScheduler's ``step_plms`` goes from and to at each of the evaluations at ``seen``, as it
    decides it: by its counter j of evaluations, not by the timesteps. Evaluation j steps from seen[j] to
    seen[j] − stride (DDIM's rule), except j = 1, which redoes step 0 from seen[1] + stride (= t_0 for
    leading and trailing spacing) to seen[1].

    For one chain cut at img2img's start (diffusers slices the list [t_0, t_1, t_1, t_2, …]) it is what
    diffusers runs, oddities included: the cut [t_1, t_2, t_3] steps t_1 → t_2, redoes t_1 → t_2, then
    steps from t_3 (not t_2) → t_3 − stride.
    Shapes: (K,) int32 → {"t", "prev_t"}, each (K,) int32.
    """
    t, prev_t = seen.copy(), seen - np.int32(stride)
    if len(seen) > 1:
        t[1], prev_t[1] = seen[1] + stride, seen[1]
    return {"t": t, "prev_t": prev_t}
