"""Eight samplers, each reproducing a diffusers scheduler (``X.from_config(config)``), one class each.

    name      class           diffusers class                     evaluations  idea
    ddpm      DDPM            DDPMScheduler                       N            ancestral steps (DDPM Algorithm 2)
    ddim      DDIM            DDIMScheduler                       N            DDIM, η ∈ [0, 1]
    plms      PLMS            PNDMScheduler, skip_prk_steps=True  N + 1        Adams–Bashforth on ε (PNDM)
    euler     Euler           EulerDiscreteScheduler              N            Euler on the probability-flow ODE
    euler_a   EulerAncestral  EulerAncestralDiscreteScheduler     N            Euler + fresh noise (ancestral)
    dpmpp_2m  DPMSolverPP2M   DPMSolverMultistepScheduler         N            DPM-Solver++(2M), 2nd-order multistep
    lms       LMS             LMSDiscreteScheduler                N            4th-order linear multistep on σ
    heun      Heun            HeunDiscreteScheduler               2N − 1       Heun's 2nd-order method (EDM Alg. 1)

They come in three families, each a module: :mod:`~sdjax.samplers.timestep` (ddpm, ddim, plms: steps
between training timesteps on DDPM's x_t), :mod:`~sdjax.samplers.sigma` (the σ samplers on x_0 + σ ε,
after Karras et al. 2022) and :mod:`~sdjax.samplers.dpm_solver`. The interface is
:class:`~sdjax.samplers.base.Sampler`: a host-side plan, a pure step, an explicit state, so that one
``lax.scan`` runs a whole chain (:mod:`sdjax.chain`):

    chain = make("dpmpp_2m", 20).chain(schedule)            # sampler, schedule, plan: one Chain
    x = chain.start(x_T)                                    # x_T ∼ N(0, I), scaled by init_noise_sigma
    state = chain.init_state(x)
    for i in range(len(chain)):
        out = unet(chain.model_input(i, x), chain.timestep(i), context)
        x, state = chain.step(i, out, x, state, noise_i)    # noise: ddpm, ddim η > 0, euler_a

A chain can also start part-way (img2img, inpainting): ``sampler.chain(schedule, start=s)`` keeps the
steps from s on, and ``chain.add_noise(0, x_0, ε)`` replaces the start from x_T — a clean x_0 taken to
the first kept noise level.

Arithmetic: steps run in float32 whatever the input dtype, and x comes back in the model output's dtype,
as in :mod:`sdjax.schedulers` (cast model outputs to float32 to keep x float32 across a chain); the state
is float32. For the N where diffusers' "trailing" arange has one point too many (N = 61, 103, …; see
:func:`sdjax.schedulers.timesteps`) we run the N real steps, diffusers N + 1.

Adding a sampler: write its class (plan, state, model input, step, x̂_0; its diffusers class and that
class's config defaults) in the module of its family, and add it to :data:`CLASSES`.
"""

from __future__ import annotations

import dataclasses

from sdjax.samplers.base import Chain, Plan, Sampler
from sdjax.samplers.dpm_solver import DPMSolverPP2M, dpmpp_2m_step
from sdjax.samplers.sigma import (
    LMS,
    Euler,
    EulerAncestral,
    Heun,
    denoised,
    euler_ancestral_step,
    euler_step,
    heun_step,
    karras_sigmas,
    lms_coefficients,
    lms_step,
    sigma_table,
    sigma_to_t,
)
from sdjax.samplers.timestep import DDIM, DDPM, PLMS, plms_step, pndm_transfer
from sdjax.schedulers import NoiseSchedule

# every sampler, in the order of the table above
CLASSES: dict[str, type[Sampler]] = {
    cls.name: cls for cls in (DDPM, DDIM, PLMS, Euler, EulerAncestral, DPMSolverPP2M, LMS, Heun)
}
SAMPLERS = tuple(CLASSES)
KARRAS_SAMPLERS = tuple(name for name, cls in CLASSES.items() if cls.takes_karras)  # diffusers' use_karras_sigmas
# With no scheduler config (single files, sdjax folders): PNDM, what the SD1.x releases ship with.
DEFAULT_SAMPLER = "plms"


def make(name: str, steps: int = 50, *, eta: float = 0.0, karras: bool = False) -> Sampler:
    """The sampler called ``name`` (one of :data:`SAMPLERS`) with ``steps`` steps.

    eta: DDIM's η (ddim only). karras: the Karras σ's (EDM eq. 5, ρ = 7) instead of the σ's of the
    spaced timesteps — diffusers' ``use_karras_sigmas=True`` (:data:`KARRAS_SAMPLERS` only).
    """
    if name not in CLASSES:
        raise ValueError(f"sampler {name!r}: expected one of {SAMPLERS}")
    cls = CLASSES[name]
    if eta != 0.0 and name != "ddim":
        raise ValueError(f"eta is DDIM's; {name} has none")
    if karras and not cls.takes_karras:
        raise ValueError(f"karras=True: only {KARRAS_SAMPLERS} take Karras sigmas (as in diffusers)")
    return cls(steps, **({"eta": eta} if eta else {}), **({"karras": True} if karras else {}))


def from_config(config: dict | None, name: str | None, steps: int, eta: float = 0.0) -> Sampler:
    """The sampler for a run: ``name`` if given, else the one of a diffusers scheduler config (a
    checkpoint's ``scheduler_config.json``; None: :data:`DEFAULT_SAMPLER`).

    As diffusers' ``X.from_config(config)`` carries ``use_karras_sigmas`` over to the new class, the
    config's Karras setting applies to whichever sampler takes Karras σ's. Unknown names and scheduler
    classes sdjax does not reproduce are ValueErrors that list the choices.
    """
    config = config or {}
    if name is None:
        cls_name = config.get("_class_name")
        by_class = {cls.diffusers_class: cls for cls in CLASSES.values()}
        if cls_name is None:
            name = DEFAULT_SAMPLER
        elif cls_name not in by_class:
            raise ValueError(
                f"the checkpoint's scheduler is {cls_name}, which sdjax does not implement; "
                f"pass scheduler= one of {SAMPLERS}"
            )
        else:
            name = by_class[cls_name].name
            getattr(by_class[cls_name], "check_config", lambda config: None)(config)
    elif name not in CLASSES:
        raise ValueError(f"unknown scheduler {name!r}: expected one of {SAMPLERS}")
    karras = bool(config.get("use_karras_sigmas", False)) and name in KARRAS_SAMPLERS
    return make(name, steps, eta=eta, karras=karras)


def schedule_for(sampler: Sampler, config: dict | None, default: NoiseSchedule) -> NoiseSchedule:
    """The noise schedule and settings ``sampler`` runs with: those of ``config`` (a diffusers
    scheduler_config.json) read as diffusers' ``X.from_config(config)`` reads them for the sampler's
    class X (its ``config_defaults``); ``default`` when there is no config."""
    if config is None:
        return default
    return NoiseSchedule.from_diffusers_config(sampler.config_defaults | config)
