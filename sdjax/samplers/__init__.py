"""Thirteen samplers, each reproducing a diffusers scheduler (``X.from_config(config)``) or, where diffusers
has none, k-diffusion's function; one class each.

    name          diffusers class (or reference)               evaluations  idea
    ddpm          DDPMScheduler                                N            ancestral steps (DDPM Algorithm 2)
    ddim          DDIMScheduler                                N            DDIM, η ∈ [0, 1]
    plms          PNDMScheduler, skip_prk_steps=True           N + 1        Adams–Bashforth on ε (PNDM)
    euler         EulerDiscreteScheduler                       N            Euler on the probability-flow ODE
    euler_a       EulerAncestralDiscreteScheduler              N            Euler + fresh noise (ancestral)
    dpmpp_2m      DPMSolverMultistepScheduler                  N            DPM-Solver++(2M), 2nd-order multistep
    lms           LMSDiscreteScheduler                         N            4th-order linear multistep on σ
    heun          HeunDiscreteScheduler                        2N − 1       Heun's 2nd-order method (EDM Alg. 1)
    dpmpp_2m_sde  DPMSolverMultistepScheduler, sde-dpmsolver++ N            DPM-Solver++(2M) on the reverse SDE
    dpmpp_sde     DPMSolverSDEScheduler                        2N − 1       2-stage DPM-Solver++, Brownian noise
    dpmpp_2s_a    (k-diffusion's sample_dpmpp_2s_ancestral)    2N − 1       DPM-Solver++(2S) + ancestral noise
    unipc         UniPCMultistepScheduler                      N            predictor–corrector UniP-2/UniC-2
    dpmpp_3m_sde  (k-diffusion's sample_dpmpp_3m_sde)          N            DPM-Solver++(3M) on the reverse SDE

The web UIs' names (AUTOMATIC1111: "DPM++ 2M Karras", "Euler a", …) are in :data:`A1111_NAMES`;
:func:`resolve` turns one into a sampler name and a Karras setting, and the pipeline's ``scheduler``
option and the CLI's ``--sampler`` take either form. The table with what each is is docs/samplers.md.

They come in families, each a module: :mod:`~sdjax.samplers.timestep` (ddpm, ddim, plms: steps
between training timesteps on DDPM's x_t), :mod:`~sdjax.samplers.sigma` (the σ samplers on x_0 + σ ε,
after Karras et al. 2022), :mod:`~sdjax.samplers.dpm_solver` (the DPM-Solver++ multistep methods),
:mod:`~sdjax.samplers.singlestep` (the two-stage DPM-Solver++ ones) and :mod:`~sdjax.samplers.unipc`. The interface is
:class:`~sdjax.samplers.base.Sampler`: a host-side plan, a pure step, an explicit state, so that one
``lax.scan`` runs a whole chain (:mod:`sdjax.chain`):

    chain = make("dpmpp_2m", 20).chain(schedule)            # sampler, schedule, plan: one Chain
    x = chain.start(x_T)                                    # x_T ∼ N(0, I), scaled by init_noise_sigma
    state = chain.init_state(x)
    for i in range(len(chain)):
        out = unet(chain.model_input(i, x), chain.timestep(i), context)
        x, state = chain.step(i, out, x, state, noise_i)    # noise: the stochastic samplers

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
from sdjax.samplers.dpm_solver import DPMSolverPP2M, DPMSolverPP2MSDE, DPMSolverPP3MSDE, dpmpp_2m_step
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
from sdjax.samplers.singlestep import DPMSolverPP2SAncestral, DPMSolverPPSDE
from sdjax.samplers.timestep import DDIM, DDPM, PLMS, plms_step, pndm_transfer
from sdjax.samplers.unipc import UniPC
from sdjax.schedulers import NoiseSchedule

# every sampler, in the order of the table above
CLASSES: dict[str, type[Sampler]] = {
    cls.name: cls
    for cls in (
        *(DDPM, DDIM, PLMS, Euler, EulerAncestral, DPMSolverPP2M, LMS, Heun),
        *(DPMSolverPP2MSDE, DPMSolverPPSDE, DPMSolverPP2SAncestral, UniPC, DPMSolverPP3MSDE),
    )
}
SAMPLERS = tuple(CLASSES)
KARRAS_SAMPLERS = tuple(name for name, cls in CLASSES.items() if cls.takes_karras)  # diffusers' use_karras_sigmas
# AUTOMATIC1111's sampler names (its "Sampler" setting and PNG info) → (sdjax name, Karras σ's)
A1111_NAMES: dict[str, tuple[str, bool]] = {
    **{cls.a1111_name: (name, False) for name, cls in CLASSES.items()},
    **{cls.a1111_name + " Karras": (name, True) for name, cls in CLASSES.items() if cls.takes_karras},
}
# With no scheduler config (single files, sdjax folders): PNDM, what the SD1.x releases ship with.
DEFAULT_SAMPLER = "plms"


def resolve(name: str) -> tuple[str, bool | None]:
    """A sampler name as sdjax or AUTOMATIC1111 writes it → (sdjax name, karras): karras is None for an
    sdjax name (the checkpoint's config decides, as in diffusers), True/False for an A1111 name. Unknown
    names are a ValueError that lists both kinds."""
    if name in CLASSES:
        return name, None
    if name in A1111_NAMES:
        return A1111_NAMES[name]
    raise ValueError(
        f"unknown sampler {name!r}: expected one of {', '.join(SAMPLERS)}, or a web-UI name: "
        f"{', '.join(repr(n) for n in A1111_NAMES)} (docs/samplers.md)"
    )


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
    karras = None
    if name is None:
        name = _from_class(config)
    else:
        name, karras = resolve(name)
    if karras is None:
        karras = bool(config.get("use_karras_sigmas", False)) and name in KARRAS_SAMPLERS
    return make(name, steps, eta=eta, karras=karras)


def _from_class(config: dict) -> str:
    """The sampler of a diffusers scheduler config: its class, and within a class its variant settings
    (DPMSolverMultistepScheduler's algorithm_type, …)."""
    cls_name = config.get("_class_name")
    if cls_name is None:
        return DEFAULT_SAMPLER
    candidates = [cls for cls in CLASSES.values() if cls.diffusers_class == cls_name]
    for cls in candidates:
        if cls.variant_of(config) == cls.variant:
            return cls.name
    if candidates:
        raise ValueError(
            f"the checkpoint's {cls_name} has {candidates[0].variant_of(config)}; sdjax implements "
            f"{' and '.join(str(cls.variant) for cls in candidates)}: pass scheduler= one of {SAMPLERS}"
        )
    raise ValueError(
        f"the checkpoint's scheduler is {cls_name}, which sdjax does not implement; pass scheduler= one of {SAMPLERS}"
    )


def a1111_name(name: str, karras: bool = False) -> str:
    """What AUTOMATIC1111 calls a sampler (an sdjax or A1111 name; ``karras`` for an sdjax name)."""
    name, from_name = resolve(name)
    karras = karras if from_name is None else from_name
    return CLASSES[name].a1111_name + (" Karras" if karras else "")


def schedule_for(sampler: Sampler, config: dict | None, default: NoiseSchedule) -> NoiseSchedule:
    """The noise schedule and settings ``sampler`` runs with: those of ``config`` (a diffusers
    scheduler_config.json) read as diffusers' ``X.from_config(config)`` reads them for the sampler's
    class X (its ``config_defaults``); ``default`` when there is no config."""
    if config is None:
        return default
    return NoiseSchedule.from_diffusers_config(sampler.config_defaults | config)
