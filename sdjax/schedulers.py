"""Noise schedules, the forward (noising) process, and the DDPM and DDIM samplers.

Notation follows DDPM (Ho et al. 2020, arXiv:2006.11239): the forward process adds Gaussian noise of
variance β_t at step t,

    q(x_t | x_{t−1}) = N(√α_t x_{t−1}, β_t I),    α_t = 1 − β_t,    ᾱ_t = ∏_{s ≤ t} α_s,

so that any x_t can be drawn from x_0 in one go (eq. 4): x_t = √ᾱ_t x_0 + √(1 − ᾱ_t) ε, ε ∼ N(0, I).
A sampler runs this backwards with a network that predicts ε (or v, or x_0) from (x_t, t). DDIM
(Song et al. 2020, arXiv:2010.02502) writes α_t for DDPM's ᾱ_t; here ᾱ always means the product.

Timesteps are 0-indexed as in diffusers and in SD's checkpoints: t ∈ {0, …, T − 1}, t = 0 the least
noisy (the paper's t = 1). A sampler visits a descending subset of them; each step goes from t to the
next one, prev_t, and prev_t < 0 means "past the end": ᾱ there is a fixed value (1, or ᾱ_0 for DDIM
with ``set_alpha_to_one=False``).

Design: a :class:`NoiseSchedule` is a frozen, hashable dataclass — pass it as a static argument (or
close over it) under ``jax.jit``. Everything that depends on the step (t, prev_t, x_t, noise) is an
array and may be traced. The chain of (t, prev_t) pairs is computed once, on the host:

    ts = timesteps(schedule, 50)
    prev_ts = previous_timesteps(ts, stride=schedule.num_train_timesteps // 50)   # DDIM's rule
    for t, prev_t in zip(ts, prev_ts):
        x = ddim_step(schedule, unet(x, t), t, prev_t, x).x_prev

All scheduler arithmetic is float32 whatever the input dtype, and results come back in the input's
(the model output's) dtype: in bfloat16, ᾱ_0 = 0.99915 rounds to 1, so 1 − ᾱ_t loses all its digits
at small t — the cause of the NaNs and black images of half-precision schedules.

Shapes: x (B, H, W, C) images or latents (any (B, ...) works); t an int array of shape () (one
timestep for the batch) or (B,) (one per example), broadcast over the trailing axes.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Mapping
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

Array = jax.Array

BETA_SCHEDULES = ("linear", "scaled_linear", "squaredcos_cap_v2")
PREDICTION_TYPES = ("epsilon", "v_prediction", "sample")
TIMESTEP_SPACINGS = ("leading", "trailing", "linspace")
VARIANCE_TYPES = ("fixed_small", "fixed_large")

# diffusers options this module does not implement, with the value that means "off": a config that
# turns one on is refused rather than silently sampled differently.
_UNSUPPORTED_OPTIONS = {"trained_betas": None, "rescale_betas_zero_snr": False, "thresholding": False}


@dataclasses.dataclass(frozen=True)
class NoiseSchedule:
    """The β schedule a model was trained with, plus the sampler settings of a diffusers scheduler config.

    Defaults are those of diffusers' ``DDPMScheduler`` / ``DDIMScheduler``, so a config dict that
    omits a key means the same here as there.

    Training (fixed by the checkpoint):
      num_train_timesteps: T, the number of forward steps.
      beta_schedule: "linear" (β linear in t, DDPM), "scaled_linear" (√β linear in t, Stable
        Diffusion) or "squaredcos_cap_v2" (the cosine schedule of Nichol & Dhariwal 2021).
      beta_start, beta_end: β_0 and β_{T−1} of the two linear schedules.
      prediction_type: what the network outputs — "epsilon" (ε), "v_prediction" (v, Salimans & Ho
        2022) or "sample" (x_0).
    Sampling:
      timestep_spacing, steps_offset: how :func:`timesteps` picks N of the T steps.
      clip_sample, clip_sample_range: clip the x_0 estimate to [−r, r] (pixel-space models; SD: off).
      set_alpha_to_one: DDIM's ᾱ past the last step: 1 if True, else ᾱ_0.
      variance_type: DDPM's reverse-step variance, "fixed_small" (β̃_t) or "fixed_large" (β_t).
    """

    num_train_timesteps: int = 1000
    beta_schedule: str = "linear"
    beta_start: float = 0.0001
    beta_end: float = 0.02
    prediction_type: str = "epsilon"
    timestep_spacing: str = "leading"
    steps_offset: int = 0
    clip_sample: bool = True
    clip_sample_range: float = 1.0
    set_alpha_to_one: bool = True
    variance_type: str = "fixed_small"

    def __post_init__(self):
        for name, allowed in [
            ("beta_schedule", BETA_SCHEDULES),
            ("prediction_type", PREDICTION_TYPES),
            ("timestep_spacing", TIMESTEP_SPACINGS),
            ("variance_type", VARIANCE_TYPES),
        ]:
            if getattr(self, name) not in allowed:
                raise ValueError(f"{name}={getattr(self, name)!r}: expected one of {allowed}")

    @classmethod
    def sd15(cls, **overrides) -> NoiseSchedule:
        """Stable Diffusion 1.x: T = 1000, √β linear from √0.00085 to √0.012, ε-prediction, offset 1."""
        settings = dict(
            num_train_timesteps=1000,
            beta_schedule="scaled_linear",
            beta_start=0.00085,
            beta_end=0.012,
            steps_offset=1,
            set_alpha_to_one=False,
            clip_sample=False,
        )
        return cls(**(settings | overrides))

    @classmethod
    def from_diffusers_config(cls, config: Mapping) -> NoiseSchedule:
        """From a diffusers ``scheduler_config.json`` dict (of any scheduler class).

        Keys this dataclass has no field for (``_class_name``, ``skip_prk_steps`` …) are ignored;
        options that would change the numbers but are not implemented here raise NotImplementedError.
        """
        for key, off in _UNSUPPORTED_OPTIONS.items():
            if config.get(key, off) != off:
                raise NotImplementedError(f"scheduler option {key}={config[key]!r} is not supported")
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in config.items() if k in names})

    @functools.cached_property
    def betas(self) -> np.ndarray:
        """β_t, (T,) float32, bit for bit as diffusers builds them."""
        T = self.num_train_timesteps
        if self.beta_schedule == "linear":
            return _torch_linspace_f32(self.beta_start, self.beta_end, T)
        if self.beta_schedule == "scaled_linear":
            return np.square(_torch_linspace_f32(self.beta_start**0.5, self.beta_end**0.5, T))
        # Cosine schedule (Nichol & Dhariwal 2021, eq. 17): ᾱ(s) = cos²((s + 0.008)/1.008 · π/2) for
        # s = t/T ∈ [0, 1], and β_t = 1 − ᾱ(t+1)/ᾱ(t), capped at 0.999 so the last steps (where ᾱ → 0)
        # do not become singular. Computed in float64, stored in float32.
        s = np.arange(T + 1, dtype=np.float64) / T
        f = np.cos((s + 0.008) / 1.008 * np.pi / 2) ** 2
        return np.minimum(1.0 - f[1:] / f[:-1], 0.999).astype(np.float32)

    @functools.cached_property
    def alphas(self) -> np.ndarray:
        """α_t = 1 − β_t, (T,) float32."""
        return np.float32(1.0) - self.betas

    @functools.cached_property
    def alphas_cumprod(self) -> np.ndarray:
        """ᾱ_t = ∏_{s ≤ t} α_s, (T,) float32. The product runs in float64 (as PyTorch's CPU cumprod
        does), so a thousand float32 roundings do not pile up."""
        return np.cumprod(self.alphas.astype(np.float64)).astype(np.float32)

    @property
    def final_alpha_cumprod(self) -> float:
        """DDIM's ᾱ for prev_t < 0: 1 (a clean x_0) if ``set_alpha_to_one``, else ᾱ_0 (SD's choice)."""
        return 1.0 if self.set_alpha_to_one else float(self.alphas_cumprod[0])

    def alpha_bar(self, t, *, final: float = 1.0) -> Array:
        """ᾱ_t gathered at integer timesteps t (any shape, may be traced); ``final`` where t < 0.

        float32, same shape as t.
        """
        t = jnp.asarray(t)
        alphas_cumprod = jnp.asarray(self.alphas_cumprod)
        return jnp.where(t >= 0, alphas_cumprod[jnp.maximum(t, 0)], jnp.float32(final))

    def snr(self, t) -> Array:
        """Signal-to-noise ratio of x_t: SNR(t) = ᾱ_t / (1 − ᾱ_t) (Kingma et al. 2021). float32, shape of t."""
        alpha_bar = self.alpha_bar(t)
        return alpha_bar / (1.0 - alpha_bar)


def _torch_linspace_f32(start: float, stop: float, n: int) -> np.ndarray:
    """``torch.linspace(start, stop, n, dtype=torch.float32)`` bit for bit: a float32 step, each point
    rounded once from start + i·step (PyTorch uses a fused multiply-add), the second half counted
    back from stop so both ends are exact. (np.linspace in float64 then cast differs in the last bit
    for about a third of the points.)"""
    a, b = np.float32(start), np.float32(stop)
    step = np.float64((b - a) / np.float32(n - 1))
    i = np.arange(n, dtype=np.float64)
    points = np.where(i < n // 2, np.float64(a) + step * i, np.float64(b) - step * (n - 1 - i))
    return points.astype(np.float32)


def _f32(x) -> Array:
    return jnp.asarray(x, jnp.float32)


def _per_example(c: Array, x: Array) -> Array:
    """Append unit axes to a per-timestep coefficient, () or (B,), so it broadcasts over (B, ...)."""
    return c.reshape(c.shape + (1,) * (x.ndim - c.ndim))


# ---------------------------------------------------------------------------------------------------
# The forward process and what the network predicts
# ---------------------------------------------------------------------------------------------------


def q_sample(schedule: NoiseSchedule, x0: Array, t, noise: Array) -> Array:
    """Draw x_t ∼ q(x_t | x_0) (DDPM eq. 4, reparameterised):

        x_t = √ᾱ_t x_0 + √(1 − ᾱ_t) ε

    Shapes: x0, noise (B, ...); t () or (B,) int → (B, ...) in x0's dtype (computed in float32).
    """
    alpha_bar = _per_example(schedule.alpha_bar(t), x0)
    x_t = jnp.sqrt(alpha_bar) * _f32(x0) + jnp.sqrt(1.0 - alpha_bar) * _f32(noise)
    return x_t.astype(x0.dtype)


def v_target(schedule: NoiseSchedule, x0: Array, t, noise: Array) -> Array:
    """The velocity v = √ᾱ_t ε − √(1 − ᾱ_t) x_0 (Salimans & Ho 2022, arXiv:2202.00512, §4).

    With φ_t the angle cos φ_t = √ᾱ_t, x_t = cos φ x_0 + sin φ ε and v = dx_t/dφ: the network's
    target stays of unit scale at both ends of the schedule, where ε- and x_0-targets degenerate.
    Shapes as :func:`q_sample`.
    """
    alpha_bar = _per_example(schedule.alpha_bar(t), x0)
    v = jnp.sqrt(alpha_bar) * _f32(noise) - jnp.sqrt(1.0 - alpha_bar) * _f32(x0)
    return v.astype(x0.dtype)


def training_target(schedule: NoiseSchedule, x0: Array, t, noise: Array) -> Array:
    """What the network learns to output for x_t = q_sample(x0, t, noise): ε, v or x_0 by
    ``schedule.prediction_type``. Shapes as :func:`q_sample`."""
    if schedule.prediction_type == "epsilon":
        return noise
    if schedule.prediction_type == "v_prediction":
        return v_target(schedule, x0, t, noise)
    return x0


def predict_x0(schedule: NoiseSchedule, x_t: Array, t, model_output: Array) -> Array:
    """The network's estimate x̂_0 of the clean sample, from its output at (x_t, t).

        epsilon:       x̂_0 = (x_t − √(1 − ᾱ_t) ε̂) / √ᾱ_t       (eq. 4 solved for x_0; DDIM eq. 9)
        v_prediction:  x̂_0 = √ᾱ_t x_t − √(1 − ᾱ_t) v̂
        sample:        x̂_0 = model_output

    Shapes: x_t, model_output (B, ...); t () or (B,) → (B, ...) in model_output's dtype.
    """
    alpha_bar = _per_example(schedule.alpha_bar(t), x_t)
    x, out = _f32(x_t), _f32(model_output)
    if schedule.prediction_type == "epsilon":
        x0 = (x - jnp.sqrt(1.0 - alpha_bar) * out) / jnp.sqrt(alpha_bar)
    elif schedule.prediction_type == "v_prediction":
        x0 = jnp.sqrt(alpha_bar) * x - jnp.sqrt(1.0 - alpha_bar) * out
    else:
        x0 = out
    return x0.astype(model_output.dtype)


def predict_eps(schedule: NoiseSchedule, x_t: Array, t, model_output: Array) -> Array:
    """The network's estimate ε̂ of the noise in x_t, from its output at (x_t, t).

        epsilon:       ε̂ = model_output
        v_prediction:  ε̂ = √ᾱ_t v̂ + √(1 − ᾱ_t) x_t
        sample:        ε̂ = (x_t − √ᾱ_t x̂_0) / √(1 − ᾱ_t)

    Shapes as :func:`predict_x0`.
    """
    alpha_bar = _per_example(schedule.alpha_bar(t), x_t)
    x, out = _f32(x_t), _f32(model_output)
    if schedule.prediction_type == "epsilon":
        eps = out
    elif schedule.prediction_type == "v_prediction":
        eps = jnp.sqrt(alpha_bar) * out + jnp.sqrt(1.0 - alpha_bar) * x
    else:
        eps = (x - jnp.sqrt(alpha_bar) * out) / jnp.sqrt(1.0 - alpha_bar)
    return eps.astype(model_output.dtype)


# ---------------------------------------------------------------------------------------------------
# Which timesteps a sampler visits
# ---------------------------------------------------------------------------------------------------


def timesteps(
    schedule: NoiseSchedule,
    num_inference_steps: int,
    *,
    spacing: str | None = None,
    steps_offset: int | None = None,
) -> np.ndarray:
    """The N timesteps a sampler visits, descending, as diffusers' ``set_timesteps`` picks them.

    With T = num_train_timesteps and N = num_inference_steps (Lin et al. 2023, arXiv:2305.08891, Table 2):

        leading:   k · ⌊T/N⌋ + steps_offset,  k = N−1 … 0        (SD1.x/2.x; N = 50 starts at 981)
        trailing:  round(T − k · T/N) − 1,    k = 0 … N−1        (always starts at T − 1)
        linspace:  round(k · (T − 1)/(N − 1)), k = N−1 … 0       (both ends: T − 1 and 0)

    ``spacing`` and ``steps_offset`` default to the schedule's. Returns (N,) int32, on the host.
    """
    spacing = schedule.timestep_spacing if spacing is None else spacing
    steps_offset = schedule.steps_offset if steps_offset is None else steps_offset
    T, N = schedule.num_train_timesteps, num_inference_steps
    if not 1 <= N <= T:
        raise ValueError(f"num_inference_steps={N} must be between 1 and num_train_timesteps={T}")
    if spacing == "leading":
        ts = np.arange(N - 1, -1, -1) * (T // N) + steps_offset
    elif spacing == "trailing":
        # diffusers writes this as a float arange from T down by T/N; for some N (61, 103, …) rounding
        # in arange's length gives one extra point, which rounds to 0 and becomes timestep −1. We keep
        # the same arange, so the other N points agree to the bit, and drop that extra point.
        ts = np.round(np.arange(T, 0, -T / N))[:N] - 1
    elif spacing == "linspace":
        ts = np.round(np.linspace(0, T - 1, N))[::-1]
    else:
        raise ValueError(f"spacing={spacing!r}: expected one of {TIMESTEP_SPACINGS}")
    ts = ts.astype(np.int32)
    if ts[0] >= T:
        raise ValueError(f"{spacing} spacing with N={N} and steps_offset={steps_offset} reaches t={ts[0]} ≥ T={T}")
    return ts


def previous_timesteps(ts: np.ndarray, *, stride: int | None = None) -> np.ndarray:
    """prev_t for each t of a descending chain ``ts``: where each step of a sampler lands.

    stride=None: the chain's next timestep, and −1 after the last — diffusers' ``DDPMScheduler`` rule.
    stride=k: t − k — diffusers' ``DDIMScheduler`` (and PNDM) rule with k = T // N, whatever the
        spacing. With "leading" spacing the two rules differ only on the last step, and there only
        in name (−k + steps_offset against −1: both "past the end") unless k ≤ steps_offset. With
        "linspace", and "trailing" when N does not divide T, t − k is not the chain's next timestep.

    Shapes: (N,) → (N,) int32.
    """
    ts = np.asarray(ts, np.int32)
    if stride is None:
        return np.append(ts[1:], np.int32(-1))
    return ts - np.int32(stride)


# ---------------------------------------------------------------------------------------------------
# Reverse steps
# ---------------------------------------------------------------------------------------------------


class StepOutput(NamedTuple):
    """One reverse step's result, both (B, ...) in the model output's dtype.

    x_prev: the sample at prev_t (diffusers' ``prev_sample``).
    x0_pred: the step's estimate x̂_0 of the clean sample (diffusers' ``pred_original_sample``).
    """

    x_prev: Array
    x0_pred: Array


def _x0_estimate(schedule: NoiseSchedule, x_t: Array, t, model_output: Array) -> Array:
    """x̂_0 as every sampler uses it: :func:`predict_x0`, clipped to [−r, r] if ``clip_sample``."""
    x0 = predict_x0(schedule, x_t, t, model_output)
    if schedule.clip_sample:
        x0 = jnp.clip(x0, -schedule.clip_sample_range, schedule.clip_sample_range)
    return x0


def ddpm_step(schedule: NoiseSchedule, model_output: Array, t, prev_t, x_t: Array, noise: Array) -> StepOutput:
    """One ancestral step x_t → x_{t'} ∼ p_θ(x_{t'} | x_t), t' = prev_t (DDPM Algorithm 2).

    With ᾱ_{t'} = 1 for t' < 0, α = ᾱ_t / ᾱ_{t'} and β = 1 − α — the one-step α_t and β_t when
    t' = t − 1, the compound ones of the jump when a shortened chain skips steps:

        x̂_0 = predict_x0(x_t, t, model_output)                 (clipped if ``clip_sample``)
        μ̃   = √ᾱ_{t'} β / (1 − ᾱ_t) · x̂_0 + √α (1 − ᾱ_{t'}) / (1 − ᾱ_t) · x_t     (eq. 7)
        σ²  = β̃ = (1 − ᾱ_{t'}) / (1 − ᾱ_t) · β, at least 1e-20   ("fixed_small")
        σ²  = β                                                    ("fixed_large")
        x_{t'} = μ̃ + σ z,  z = noise,  no noise when t = 0

    β̃ is the variance of the true posterior q(x_{t'} | x_t, x_0), optimal when x_0 is a single point;
    β is optimal for x_0 ∼ N(0, I) — the two extremes of DDPM §3.2, which found both sample equally well.

    As in diffusers, the noise is switched off by the *current* t being 0, not by t' < 0: a chain
    that ends at t = 1 (leading spacing, steps_offset = 1) adds σ z on its final step too — of size
    1e-10 for fixed_small, but √(1 − ᾱ_1) ≈ 0.04 for fixed_large.

    Shapes: model_output, x_t, noise (B, ...); t, prev_t () or (B,) int (may be traced).
    """
    x, out = _f32(x_t), _f32(model_output)
    alpha_bar_t = _per_example(schedule.alpha_bar(t), x)
    alpha_bar_prev = _per_example(schedule.alpha_bar(prev_t), x)
    alpha = alpha_bar_t / alpha_bar_prev
    beta = 1.0 - alpha
    x0 = _x0_estimate(schedule, x, t, out)
    mean = (jnp.sqrt(alpha_bar_prev) * beta / (1.0 - alpha_bar_t)) * x0 + (
        jnp.sqrt(alpha) * (1.0 - alpha_bar_prev) / (1.0 - alpha_bar_t)
    ) * x
    if schedule.variance_type == "fixed_small":
        variance = jnp.maximum((1.0 - alpha_bar_prev) / (1.0 - alpha_bar_t) * beta, 1e-20)
    else:
        variance = beta
    sigma = jnp.where(_per_example(jnp.asarray(t), x) > 0, jnp.sqrt(variance), 0.0)
    x_prev = mean + sigma * _f32(noise)
    return StepOutput(x_prev.astype(model_output.dtype), x0.astype(model_output.dtype))


def ddim_step(
    schedule: NoiseSchedule,
    model_output: Array,
    t,
    prev_t,
    x_t: Array,
    noise: Array | None = None,
    eta: float = 0.0,
) -> StepOutput:
    """One DDIM step x_t → x_{t'}, t' = prev_t (DDIM eq. 12, in DDPM's ᾱ notation):

        x_{t'} = √ᾱ_{t'} x̂_0  +  √(1 − ᾱ_{t'} − σ²) ε̂  +  σ z
                 "predicted x_0"  "direction pointing to x_t"  random noise

        σ = η √((1 − ᾱ_{t'}) / (1 − ᾱ_t)) √(1 − ᾱ_t / ᾱ_{t'})                        (eq. 16)

    η = 0 is the deterministic DDIM sampler; η = 1 has DDPM's posterior variance β̃. x̂_0 and ε̂ come
    from the model output (:func:`predict_x0`, :func:`predict_eps`); with ``clip_sample`` only x̂_0 is
    clipped, ε̂ is kept as predicted (diffusers' default). For t' < 0, ᾱ_{t'} is
    ``schedule.final_alpha_cumprod``.

    Shapes: model_output, x_t, noise (B, ...); t, prev_t () or (B,) int (may be traced). ``noise``
    may be None only when η is the Python number 0.
    """
    if noise is None and (isinstance(eta, jax.Array) or eta != 0):
        raise ValueError("ddim_step with eta > 0 needs noise")
    x, out = _f32(x_t), _f32(model_output)
    alpha_bar_t = _per_example(schedule.alpha_bar(t), x)
    alpha_bar_prev = _per_example(schedule.alpha_bar(prev_t, final=schedule.final_alpha_cumprod), x)
    eps = predict_eps(schedule, x, t, out)
    x0 = _x0_estimate(schedule, x, t, out)
    variance = (1.0 - alpha_bar_prev) / (1.0 - alpha_bar_t) * (1.0 - alpha_bar_t / alpha_bar_prev)
    sigma = eta * jnp.sqrt(variance)
    # 1 − ᾱ_{t'} − σ² ≥ 0 in exact arithmetic (σ² ≤ 1 − ᾱ_{t'} for η ≤ 1); rounding at η = 1 can dip below.
    direction = jnp.sqrt(jnp.maximum(1.0 - alpha_bar_prev - sigma**2, 0.0)) * eps
    x_prev = jnp.sqrt(alpha_bar_prev) * x0 + direction
    if noise is not None:
        x_prev = x_prev + sigma * _f32(noise)
    return StepOutput(x_prev.astype(model_output.dtype), x0.astype(model_output.dtype))
