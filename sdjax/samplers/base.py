"""What every sampler is: a plan computed on the host, and a step that is a pure function of arrays.

A :class:`Sampler` is a frozen, hashable description (static under ``jax.jit``): which method, how many
steps, its options. On the host, :meth:`Sampler.plan` computes the whole chain once (:class:`Plan`:
the timesteps the network sees, the σ's, per-step constants); on the device, :meth:`Sampler.step` is a
pure function of arrays, with a multistep method's history in an explicit ``state`` pytree of fixed
shapes, so that a ``lax.scan`` can run the K model evaluations (:mod:`sdjax.chain`).

:class:`Chain` binds the three — the sampler, the noise schedule it runs on, its plan — into the one
object the denoising loop takes, always in that order.
"""

from __future__ import annotations

import dataclasses
from typing import ClassVar, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from sdjax.schedulers import NoiseSchedule

Array = jax.Array


def f32(x) -> Array:
    return jnp.asarray(x, jnp.float32)


class Plan(NamedTuple):
    """A sampling run of K model evaluations, computed on the host; a pytree of arrays.

    timesteps: (K,) float32 — the t the network is given at evaluation i. Fractional for the σ
      samplers where σ_i falls between training timesteps (Karras σ's; linspace spacing).
    sigmas: (K + 1,) float32 — σ samplers: σ_i, the noise level of x at evaluation i, then the final
      σ (0). Heun's is diffusers' doubled list [σ_0, σ_1, σ_1, …, σ_{N−1}, σ_{N−1}, 0]. Else (0,).
    t, prev_t: (K,) int32 — ddpm, ddim, plms: the step at evaluation i goes from ᾱ_t to ᾱ_{prev_t}
      (prev_t < 0: past the end). Else (0,).
    coeffs: (K, 4) float32 — per-step constants of a multistep method (lms: the c_ij of
      :func:`sdjax.samplers.sigma.lms_coefficients`). Else (0, 4).
    init_noise_sigma: () float32 — the scale of the starting noise, x = init_noise_sigma · x_T.
    """

    timesteps: np.ndarray
    sigmas: np.ndarray
    t: np.ndarray
    prev_t: np.ndarray
    coeffs: np.ndarray
    init_noise_sigma: np.ndarray

    @classmethod
    def of(cls, timesteps, *, sigmas=None, t=None, prev_t=None, coeffs=None, init_noise_sigma=1.0) -> Plan:
        """A plan with the arrays a sampler does not use empty (they stay so when a plan is cut)."""
        ints, floats = np.zeros(0, np.int32), np.zeros(0, np.float32)
        return cls(
            np.asarray(timesteps, np.float32),
            floats if sigmas is None else np.asarray(sigmas, np.float32),
            ints if t is None else np.asarray(t, np.int32),
            ints if prev_t is None else np.asarray(prev_t, np.int32),
            np.zeros((0, 4), np.float32) if coeffs is None else np.asarray(coeffs, np.float32),
            np.float32(init_noise_sigma),
        )


@dataclasses.dataclass(frozen=True)
class Sampler:
    """One sampling method with its number of steps: everything about a chain but the noise schedule.

    steps: N, the number of steps; the network is evaluated K times (N for most, N + 1 for plms,
      2N − 1 for heun). Timesteps follow ``schedule.timestep_spacing`` and ``steps_offset``.

    A subclass is one sampler: its ``name``, the diffusers scheduler class it reproduces (and that
    class's config defaults), how it plans, and its step. The x it works on is its own: the DDPM
    sample √ᾱ_t x_0 + √(1 − ᾱ_t) ε (ddpm, ddim, plms, dpmpp_2m) or x_0 + σ ε (the σ samplers);
    :meth:`model_input` is what the network is shown.
    """

    steps: int = 50

    name: ClassVar[str]
    diffusers_class: ClassVar[str | None]  # None: diffusers has no scheduler for it
    a1111_name: ClassVar[str]  # what AUTOMATIC1111's web UI calls it (the "Sampler" of its PNG info)
    # diffusers' X.from_config(config) fills the keys a scheduler_config.json lacks with X's own defaults,
    # not those of the class that wrote the file: these are X's defaults that differ from NoiseSchedule's
    config_defaults: ClassVar[dict] = {}
    # the settings of the diffusers class that select this method (algorithm_type, solver_order, …), and
    # that class's defaults for them: a scheduler_config.json with other settings is another method
    variant: ClassVar[dict] = {}
    variant_defaults: ClassVar[dict] = {}
    order: ClassVar[int] = 1  # model evaluations per step in the timestep list (diffusers' scheduler.order)
    prediction_types: ClassVar[tuple[str, ...]] = ("epsilon", "v_prediction")  # the network outputs it can step on
    needs_noise: ClassVar[bool] = False  # whether step takes fresh N(0, I) noise (the stochastic samplers)
    eta = 0.0  # DDIM's η; the other samplers have none (a class attribute, a field only in DDIM)
    karras = False  # Karras σ's (EDM eq. 5); a field in the samplers that can take them (``takes_karras``)
    takes_karras: ClassVar[bool] = False

    def __post_init__(self):
        if self.steps < 1:
            raise ValueError(f"steps={self.steps}: a chain needs at least one step")
        if self.karras and not self.takes_karras:
            raise ValueError(f"karras=True: {self.name} takes no Karras sigmas ({self.diffusers_class} has none)")

    @classmethod
    def variant_of(cls, config: dict) -> dict:
        """The values a diffusers scheduler config gives the settings of :attr:`variant`."""
        return {key: config.get(key, cls.variant_defaults[key]) for key in cls.variant}

    def plan(self, schedule: NoiseSchedule, start: int = 0) -> Plan:
        """The chain, as diffusers' ``set_timesteps`` builds it (see :class:`Plan`).

        start: run only the steps from ``start`` on (0 ≤ start < N): the chain of img2img and inpainting
          (SDEdit), which begins at an intermediate noise level. As diffusers' ``get_timesteps`` does it,
          the plan's evaluations from index k = start · :attr:`order` on are kept, each with the σ, t and
          coefficients it has in the whole chain, and :meth:`init_state` starts the multistep history
          afresh (:meth:`cut`).
        """
        if not 0 <= start < self.steps:
            raise ValueError(f"start={start}: expected 0 ≤ start < steps={self.steps}")
        if schedule.prediction_type not in self.prediction_types:
            raise ValueError(f"{self.name}: prediction_type {schedule.prediction_type!r} is not supported")
        plan = self.whole_plan(schedule)
        return plan if start == 0 else self.cut(plan, start * self.order, schedule)

    def whole_plan(self, schedule: NoiseSchedule) -> Plan:
        """The plan of all N steps."""
        raise NotImplementedError

    def cut(self, plan: Plan, k: int, schedule: NoiseSchedule) -> Plan:
        """The plan from evaluation k on: every per-evaluation array sliced."""
        del schedule
        return plan._replace(
            timesteps=plan.timesteps[k:],
            sigmas=plan.sigmas[k:],
            t=plan.t[k:],
            prev_t=plan.prev_t[k:],
            coeffs=plan.coeffs[k:],
        )

    def chain(self, schedule: NoiseSchedule, start: int = 0) -> Chain:
        """This sampler on ``schedule``, planned from step ``start``: what :mod:`sdjax.chain` runs."""
        return Chain(self, schedule, jax.tree.map(jnp.asarray, self.plan(schedule, start)))

    def init_state(self, x: Array) -> dict:
        """The state before the first step (float32, x's shape); {} for one-step methods."""
        return {}

    def add_noise(self, schedule: NoiseSchedule, plan: Plan, i, x0: Array, noise: Array) -> Array:
        """x_0 taken to the noise level of evaluation i: the x the chain would have there (diffusers'
        ``scheduler.add_noise``), in this sampler's parametrisation. Shapes: x0, noise (B, ...); i () int,
        may be traced → (B, ...) float32."""
        raise NotImplementedError

    def model_input(self, plan: Plan, i, x: Array) -> Array:
        """What the network is given at evaluation i ((B, ...) in x's dtype; i may be traced): x itself
        unless the sampler works on another scale than the one the network was trained on."""
        return x

    def step(
        self, schedule: NoiseSchedule, plan: Plan, i, model_output: Array, x: Array, state: dict, noise=None
    ) -> tuple[Array, dict]:
        """Evaluation i's step: x (the x that :meth:`model_input` scaled) → the next x, and the new state.

        Shapes: model_output, x, noise (B, ...); i () int, may be traced → ((B, ...) in model_output's
        dtype, state). ``noise`` is N(0, I), required exactly when :attr:`needs_noise`.
        """
        raise NotImplementedError

    def predict_x0(self, schedule: NoiseSchedule, plan: Plan, i, x: Array, model_output: Array) -> Array:
        """The network's estimate x̂_0 at evaluation i, from the sampler's x and the model's output:
        (B, ...) float32 (clipping aside: :meth:`Chain.predict_x0`)."""
        raise NotImplementedError

    def _require(self, noise) -> None:
        if noise is None:
            raise ValueError(f"{self.name} needs noise: pass N(0, I) of x's shape to step")


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class Chain:
    """A sampler, the noise schedule it runs on, and its plan: the one argument the denoising loop
    (:mod:`sdjax.chain`) takes. A pytree whose leaves are the plan's arrays (the sampler and the schedule
    are static), so it passes through ``jax.jit`` as it is; index i may be traced everywhere.
    """

    sampler: Sampler = dataclasses.field(metadata={"static": True})
    schedule: NoiseSchedule = dataclasses.field(metadata={"static": True})
    plan: Plan

    def __len__(self) -> int:
        """K, the number of model evaluations."""
        return len(self.plan.timesteps)

    @property
    def needs_noise(self) -> bool:
        return self.sampler.needs_noise

    def timestep(self, i) -> Array:
        """The t the network is given at evaluation i, () float32."""
        return self.plan.timesteps[i]

    def start(self, x_T: Array) -> Array:
        """The chain's starting x from pure noise x_T ∼ N(0, I): x_T · init_noise_sigma."""
        return x_T * self.plan.init_noise_sigma

    def init_state(self, x: Array) -> dict:
        return self.sampler.init_state(x)

    def model_input(self, i, x: Array) -> Array:
        return self.sampler.model_input(self.plan, i, x)

    def step(self, i, model_output: Array, x: Array, state: dict, noise=None) -> tuple[Array, dict]:
        return self.sampler.step(self.schedule, self.plan, i, model_output, x, state, noise)

    def add_noise(self, i, x0: Array, noise: Array) -> Array:
        return self.sampler.add_noise(self.schedule, self.plan, i, x0, noise)

    def predict_x0(self, i, x: Array, model_output: Array) -> Array:
        """x̂_0 at evaluation i, clipped to [−r, r] when the schedule clips (``clip_sample``)."""
        x0 = self.sampler.predict_x0(self.schedule, self.plan, i, x, model_output)
        if self.schedule.clip_sample:
            x0 = jnp.clip(x0, -self.schedule.clip_sample_range, self.schedule.clip_sample_range)
        return x0
