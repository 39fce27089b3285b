"""The eight samplers of sdjax.samplers against the diffusers schedulers they reproduce.

Each chain is driven the way a pipeline drives it: x_T scaled by init_noise_sigma, then for each model
evaluation i the model input (``scale_model_input``), a model output, and a step. The "model" is a
deterministic function of (model input, i), tanh(input) · c_i + r_i with random c_i, r_i, computed in
numpy from each implementation's own model input.

Two comparisons of every intermediate x along each chain (relative error = max |ours − diffusers| /
max |diffusers|):

* step by step, 1e-6: each of our steps starts from diffusers' x but carries *our* state (history,
  saved x) from our own previous steps, so plan, input scaling, step and state are all checked, and
  float32 rounding does not compound. Measured ≤ 3.8e-7, and ≤ 6.9e-7 for LMS, whose diffusers
  coefficients come from a quadrature of a float32 integrand (see test_lms_coefficients…).
* independent chains, 2e-6: ours runs on its own x throughout. Rounding differences of ≤ 1 ulp per
  operation — diffusers' σ table (PyTorch's float32 sqrt is not correctly rounded, see
  sdjax.samplers), XLA's x / σ = x · (1/σ), different exp/log — then add up along the chain like a
  random walk: measured ≤ 1.2e-6 after up to 49 evaluations.

A wrong coefficient, σ or timestep is off by 1e-4 or more.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from sdjax import samplers
from sdjax.samplers import CLASSES, KARRAS_SAMPLERS, SAMPLERS, Sampler, lms_coefficients, make, sigma_table
from sdjax.schedulers import NoiseSchedule
from tests.helpers import SD15_SCHEDULER as RELEASED_SD15_CONFIG
from tests.helpers import BrownianPath, nchw, nhwc, rel_err

torch = pytest.importorskip("torch", reason="the reference extra (pip install -e '.[reference]') provides torch")
diffusers = pytest.importorskip("diffusers")

RTOL = 1e-6
CHAIN_RTOL = 2e-6
SHAPE = (2, 8, 8, 4)  # (B, H, W, C); diffusers gets (2, 4, 8, 8)

# runwayml/stable-diffusion-v1-5's scheduler_config.json (tests/helpers.py), plus the timestep_spacing
# that a pipeline's PNDMScheduler config carries (PNDM's default), so that the usual
# ``X.from_config(pipe.scheduler.config)`` gives "leading" — not the "linspace" default of most classes.
SD15_CONFIG = {**RELEASED_SD15_CONFIG, "timestep_spacing": "leading"}
CONFIGS = {
    "sd15": SD15_CONFIG,
    "v": SD15_CONFIG | {"prediction_type": "v_prediction"},
    "v-trailing": SD15_CONFIG | {"prediction_type": "v_prediction", "timestep_spacing": "trailing"},
    # most classes' default spacing: fractional timesteps (euler, lms, heun), PLMS's redo from t_1 + T/N ≠ t_0
    "linspace": SD15_CONFIG | {"timestep_spacing": "linspace"},
}

# the samplers with a diffusers scheduler (dpmpp_2s_a and dpmpp_3m_sde: tests/test_samplers_kdiffusion.py)
DIFFUSERS_SAMPLERS = tuple(name for name in SAMPLERS if CLASSES[name].diffusers_class)
TWO_STAGE = ("dpmpp_sde",)  # diffusers lists σ_{k+1} twice where the plan has the midpoint σ


def reference(name: str, config: dict, karras: bool = False):
    """The diffusers scheduler for sampler ``name``, created as a user would: ``X.from_config(config)``
    with the settings that select the variant (algorithm_type="sde-dpmsolver++", …)."""
    cls = CLASSES[name]
    return getattr(diffusers, cls.diffusers_class).from_config(
        config | cls.variant | ({"use_karras_sigmas": True} if karras else {})
    )


def diffusers_sigma_table(schedule: NoiseSchedule) -> np.ndarray:
    """diffusers' σ_t, computed with PyTorch's float32 sqrt."""
    alphas_cumprod = torch.from_numpy(schedule.alphas_cumprod)
    return (((1 - alphas_cumprod) / alphas_cumprod) ** 0.5).numpy()


def torch_nchw(x):
    return torch.from_numpy(nchw(x))


def same_noise(i: int) -> tuple[np.ndarray, torch.Generator]:
    """z for evaluation i, (B, H, W, C), and a generator from which diffusers' ``randn_tensor`` (for a
    CPU generator: torch.randn(shape, generator=g)) draws the same numbers."""
    z = torch.randn(nchw(np.zeros(SHAPE)).shape, generator=torch.Generator().manual_seed(i))
    return nhwc(z.numpy()), torch.Generator().manual_seed(i)


class FakeModel:
    """model(input, i) = tanh(input) · c_i + r_i, (B, H, W, C) float32 in numpy."""

    def __init__(self, evaluations: int, seed: int = 0):
        rng = np.random.default_rng(seed)
        self.c = rng.uniform(0.5, 1.5, evaluations).astype(np.float32)
        self.r = rng.standard_normal((evaluations, *SHAPE)).astype(np.float32)

    def __call__(self, model_input, i: int) -> np.ndarray:
        return np.tanh(np.asarray(model_input, np.float32)) * self.c[i] + self.r[i]


def run_chains(sampler: Sampler, config: dict, *, other_noise: bool = False) -> tuple[float, float]:
    """diffusers' chain, ours step by step from diffusers' x, and ours on its own, side by side.

    Returns the largest relative error of each of ours over all intermediate x. ``other_noise``:
    ours gets other z than diffusers (to show that the match depends on it).
    """
    schedule = NoiseSchedule.from_diffusers_config(config)
    ref = reference(sampler.name, config, sampler.karras)
    ref.set_timesteps(sampler.steps)
    plan = sampler.plan(schedule)
    K = len(plan.timesteps)
    assert len(ref.timesteps) == K
    assert plan.init_noise_sigma == pytest.approx(float(ref.init_noise_sigma), rel=2.4e-7)

    model = FakeModel(K)
    x_T = np.random.default_rng(1).standard_normal(SHAPE).astype(np.float32)
    x_start = x_T * np.float32(plan.init_noise_sigma)
    x_ref, x = torch_nchw(x_start), jnp.asarray(x_start)
    state, forced_state = sampler.init_state(x), sampler.init_state(x)
    worst_step = worst_chain = 0.0
    if sampler.name == "dpmpp_sde":  # its noise is W's increments, not a generator's draws
        ref.noise_sampler = path = BrownianPath(torch_nchw)
    for i, t in enumerate(ref.timesteps):
        assert float(t) == pytest.approx(plan.timesteps[i], rel=0, abs=1e-4)  # exact but for Karras (plan test)
        kwargs, noise = {}, None
        if sampler.needs_noise:
            z, kwargs["generator"] = same_noise(i)
            noise = jnp.asarray(same_noise(1000 + i)[0] if other_noise else z)
            if sampler.name == "dpmpp_sde":
                path.z = z
                del kwargs["generator"]
        if sampler.name == "ddim":
            kwargs["eta"] = sampler.eta
        x_given = jnp.asarray(nhwc(x_ref.numpy()))
        input_ref = ref.scale_model_input(x_ref, t)
        x_ref = ref.step(torch_nchw(model(nhwc(input_ref.numpy()), i)), t, x_ref, **kwargs).prev_sample
        want = nhwc(x_ref.numpy())

        model_input = sampler.model_input(plan, i, x_given)
        assert rel_err(model_input, nhwc(input_ref.numpy())) < RTOL
        out = jnp.asarray(model(model_input, i))
        x_next, forced_state = sampler.step(schedule, plan, i, out, x_given, forced_state, noise)
        worst_step = max(worst_step, rel_err(x_next, want))

        out = jnp.asarray(model(sampler.model_input(plan, i, x), i))
        x, state = sampler.step(schedule, plan, i, out, x, state, noise)
        assert x.dtype == jnp.float32
        worst_chain = max(worst_chain, rel_err(x, want))
    return worst_step, worst_chain


# ---------------------------------------------------------------------------------------------------
# Plans: timesteps, σ's and the initial noise scale
# ---------------------------------------------------------------------------------------------------

STEP_COUNTS = (1, 2, 3, 7, 10, 25, 50, 100, 999)  # not 61, 103, …: diffusers' trailing overshoot (module doc)


@pytest.mark.parametrize("spacing", ["leading", "trailing", "linspace"])
@pytest.mark.parametrize(
    "name,karras",
    [(name, False) for name in DIFFUSERS_SAMPLERS[2:]]
    + [(name, True) for name in KARRAS_SAMPLERS if name in DIFFUSERS_SAMPLERS],
)
def test_plan_matches_set_timesteps(name, karras, spacing, monkeypatch):
    """timesteps (what the network sees), σ's (K + 1, ending at 0) and init_noise_sigma, for many N.

    With diffusers' σ_t table in place of ours, timesteps and σ's are bit-identical: the plan
    arithmetic is the same. With ours (correctly rounded σ_t, diffusers' is up to 1 ulp off): σ's
    within 1 ulp (measured 1.2e-7 relative), and Karras timesteps, interpolated in log σ_t, within
    6.1e-5 (1 ulp at t ≥ 512); the others are integers or linspace points, still exact. dpmpp_sde's
    midpoint timesteps are interpolated too: √(σ σ') against diffusers' exp(−(t + h/2)), within 1 ulp.
    init_noise_sigma: √(σ² + 1) also goes through PyTorch's sqrt, measured ≤ 1.5e-7.
    """
    interpolated = karras or name in TWO_STAGE
    config = SD15_CONFIG | {"timestep_spacing": spacing}
    schedule = NoiseSchedule.from_diffusers_config(config)
    ref = reference(name, config, karras)
    for n in STEP_COUNTS:
        if name == "unipc" and n == 999 and spacing == "leading" and not karras:  # t = 1000, 999: both σ_999
            with pytest.raises(ValueError, match="distinct noise levels"):
                make(name, n, karras=karras).plan(schedule)
            continue
        ref.set_timesteps(n)
        want_t = ref.timesteps.numpy().astype(np.float32)
        plan = make(name, n, karras=karras).plan(schedule)
        with monkeypatch.context() as m:
            for module in (samplers.sigma, samplers.dpm_solver):  # where the plans look the table up
                m.setattr(module, "sigma_table", diffusers_sigma_table)
            same_table = make(name, n, karras=karras).plan(schedule)
        if name in TWO_STAGE:
            np.testing.assert_allclose(same_table.timesteps, want_t, rtol=0, atol=6.2e-5, err_msg=f"N={n}")
        else:
            np.testing.assert_array_equal(same_table.timesteps, want_t, err_msg=f"N={n}")
        assert plan.timesteps.dtype == np.float32 and plan.timesteps.shape == want_t.shape
        np.testing.assert_allclose(plan.timesteps, want_t, rtol=0, atol=6.2e-5 if interpolated else 0, err_msg=f"N={n}")
        if name == "plms":
            continue
        assert plan.sigmas.dtype == np.float32 and plan.sigmas.shape == (len(plan.timesteps) + 1,)
        want_sigmas, ours, ours_same_table = ref.sigmas.numpy(), plan.sigmas, same_table.sigmas
        if name in TWO_STAGE:  # the σ_k at the even evaluations (the odd ones: the timesteps above)
            want_sigmas, ours, ours_same_table = want_sigmas[0::2], ours[0::2], ours_same_table[0::2]
        np.testing.assert_array_equal(ours_same_table, want_sigmas, err_msg=f"N={n}")
        np.testing.assert_allclose(ours, want_sigmas, rtol=1.2e-7, atol=0, err_msg=f"N={n}")
        assert plan.sigmas[-1] == 0
        assert plan.init_noise_sigma == pytest.approx(float(ref.init_noise_sigma), rel=2.4e-7)


def test_plan_quirks():
    """Three diffusers behaviours the plans reproduce, on SD1.5 with 10 steps."""
    schedule = NoiseSchedule.from_diffusers_config(SD15_CONFIG)
    # PLMS: 11 evaluations, t_1 twice; evaluation 1 redoes step 0 (901 → 801), then DDIM's t − T/N
    plms = make("plms", 10).plan(schedule)
    np.testing.assert_array_equal(plms.timesteps[:4], [901, 801, 801, 701])
    np.testing.assert_array_equal(plms.t[:4], [901, 901, 801, 701])
    np.testing.assert_array_equal(plms.prev_t[:4], [801, 801, 701, 601])
    assert plms.prev_t[-1] == 1 - 100  # past the end: ᾱ = ᾱ_0 (set_alpha_to_one=False)
    # DPM-Solver++ spaces N + 1 points with leading spacing: ⌊1000/11⌋ = 90 apart, not 100
    np.testing.assert_array_equal(make("dpmpp_2m", 10).plan(schedule).timesteps[:3], [901, 811, 721])
    # leading spacing: x_T ∼ N(0, (σ_max² + 1) I), the other spacings N(0, σ_max² I)
    euler = make("euler", 10).plan(schedule)
    assert euler.init_noise_sigma == pytest.approx(np.sqrt(euler.sigmas[0] ** 2 + 1), rel=1e-7)
    trailing = NoiseSchedule.from_diffusers_config(SD15_CONFIG | {"timestep_spacing": "trailing"})
    euler_trailing = make("euler", 10).plan(trailing)
    assert euler_trailing.init_noise_sigma == euler_trailing.sigmas[0]
    # Heun: 2N − 1 evaluations, the σ's and timesteps of the corrector steps repeated
    heun = make("heun", 3).plan(schedule)
    np.testing.assert_array_equal(heun.timesteps, [667, 334, 334, 1, 1])
    np.testing.assert_array_equal(heun.sigmas[[1, 3]], heun.sigmas[[2, 4]])


def test_sigma_table():
    schedule = NoiseSchedule.sd15()
    ab = schedule.alphas_cumprod.astype(np.float64)
    np.testing.assert_allclose(sigma_table(schedule), np.sqrt((1 - ab) / ab), rtol=1.2e-7)


@pytest.mark.parametrize("karras", [False, True])
def test_lms_coefficients_match_diffusers_quadrature(karras):
    """Our exact (Gauss–Legendre) integrals against diffusers' scipy quad of a float32 integrand,
    and against the polynomial integrated symbolically."""
    ref = reference("lms", SD15_CONFIG, karras)
    ref.set_timesteps(25)
    ours = lms_coefficients(ref.sigmas.numpy())
    for i in range(25):
        order = min(i + 1, 4)
        want = [ref.get_lms_coefficient(order, i, j) for j in range(order)]
        # measured ≤ 1.4e-7 of the step's largest coefficient
        np.testing.assert_allclose(ours[i, :order], want, rtol=0, atol=3e-7 * np.max(np.abs(want)))
        assert not ours[i, order:].any()
    s = ref.sigmas.numpy().astype(np.float64)
    i = 10
    for j in range(4):
        basis = np.poly1d([1.0])
        for k in set(range(4)) - {j}:
            basis *= np.poly1d([1.0, -s[i - k]]) / (s[i - j] - s[i - k])
        antiderivative = basis.integ()
        assert ours[i, j] == pytest.approx(antiderivative(s[i + 1]) - antiderivative(s[i]), rel=1e-12)


# ---------------------------------------------------------------------------------------------------
# Whole chains
# ---------------------------------------------------------------------------------------------------


# UniPC: diffusers computes the corrector's weights ρ in float32, where 2(φ_2(−h)/(−h) − ½)/B(h) cancels
# (1.8e-5 relative error at 25 steps against float64); sdjax computes them in float64
# (sdjax.samplers.unipc.unipc_coefficients). Measured ≤ 1.3e-6 step by step.
STEP_RTOL = {"unipc": 2e-6}


def assert_chains_match(sampler: Sampler, config: dict):
    worst_step, worst_chain = run_chains(sampler, config)
    assert worst_step < STEP_RTOL.get(sampler.name, RTOL), worst_step
    assert worst_chain < CHAIN_RTOL, worst_chain


@pytest.mark.parametrize("steps", [10, 25])
@pytest.mark.parametrize("config", list(CONFIGS))
@pytest.mark.parametrize("name", DIFFUSERS_SAMPLERS)
def test_chain_matches_diffusers(name, config, steps):
    """ddpm and ddim too: they run through the same interface."""
    assert_chains_match(make(name, steps), CONFIGS[config])


@pytest.mark.parametrize("steps", [10, 25])
@pytest.mark.parametrize("config", ["sd15", "v", "v-trailing"])  # the spacing only moves Karras' σ_max, σ_min
@pytest.mark.parametrize("name", [name for name in KARRAS_SAMPLERS if name in DIFFUSERS_SAMPLERS])
def test_karras_chain_matches_diffusers(name, config, steps):
    assert_chains_match(make(name, steps, karras=True), CONFIGS[config])


def test_ddim_with_eta_chain_matches_diffusers():
    assert_chains_match(make("ddim", 10, eta=0.7), SD15_CONFIG)


def test_heun_clip_sample_matches_diffusers():
    """HeunDiscreteScheduler is the one σ scheduler with clip_sample: it clips D(x; σ)."""
    assert_chains_match(make("heun", 10), SD15_CONFIG | {"clip_sample": True, "clip_sample_range": 0.5})


@pytest.mark.parametrize("name", ["euler_a", "ddpm", "dpmpp_2m_sde", "dpmpp_sde"])
def test_stochastic_chains_depend_on_the_noise(name):
    """The matches above are with the same z as diffusers': with other z, ours ends elsewhere."""
    worst_step, worst_chain = run_chains(make(name, 10), SD15_CONFIG, other_noise=True)
    assert worst_step > 1e-2 and worst_chain > 1e-2


# ---------------------------------------------------------------------------------------------------
# Under jit, bf16, errors
# ---------------------------------------------------------------------------------------------------

ALL = [make(name, 6) for name in SAMPLERS] + [make("ddim", 6, eta=0.5)]


def random_chain_inputs(K: int):
    """x_T, K model outputs and K noises, (B, H, W, C) float32."""
    rng = np.random.default_rng(0)
    return (jnp.asarray(rng.standard_normal(shape).astype(np.float32)) for shape in (SHAPE, (K, *SHAPE), (K, *SHAPE)))


@pytest.mark.parametrize("sampler", ALL, ids=lambda s: s.name + ("-eta" if s.eta else ""))
def test_scan_matches_python_loop(sampler):
    """The whole chain in one jitted lax.scan (i and the plan traced) against the eager loop."""
    schedule = NoiseSchedule.from_diffusers_config(CONFIGS["v"])
    plan = sampler.plan(schedule)
    K = len(plan.timesteps)
    x_T, outputs, noises = random_chain_inputs(K)

    @jax.jit
    def scan(plan, x):
        def body(carry, inputs):
            x, state = carry
            i, out, z = inputs
            return sampler.step(schedule, plan, i, out, x, state, z if sampler.needs_noise else None), None

        return jax.lax.scan(body, (x, sampler.init_state(x)), (jnp.arange(K), outputs, noises))[0][0]

    x = x_T * plan.init_noise_sigma
    state = sampler.init_state(x)
    for i in range(K):
        x, state = sampler.step(schedule, plan, i, outputs[i], x, state, noises[i] if sampler.needs_noise else None)
    # XLA may fuse and reorder the float32 arithmetic of the compiled chain
    assert rel_err(scan(jax.tree.map(jnp.asarray, plan), x_T * plan.init_noise_sigma), x) < RTOL


@pytest.mark.parametrize("sampler", ALL, ids=lambda s: s.name + ("-eta" if s.eta else ""))
def test_bf16_model_outputs_are_stepped_in_float32(sampler):
    """bf16 model output and x: the result is the float32 computation rounded to bf16 once, and the
    state is the float32 state — along a chain, each step compared on the same inputs."""
    schedule = NoiseSchedule.from_diffusers_config(CONFIGS["v"])
    plan = sampler.plan(schedule)
    x_T, outputs, noises = random_chain_inputs(len(plan.timesteps))
    x = (x_T * plan.init_noise_sigma).astype(jnp.bfloat16)
    state = sampler.init_state(x)
    for i in range(len(plan.timesteps)):
        out, z = outputs[i].astype(jnp.bfloat16), noises[i] if sampler.needs_noise else None
        assert sampler.model_input(plan, i, x).dtype == jnp.bfloat16
        got, got_state = sampler.step(schedule, plan, i, out, x, state, z)
        want, want_state = sampler.step(schedule, plan, i, out.astype(jnp.float32), x.astype(jnp.float32), state, z)
        assert got.dtype == jnp.bfloat16
        np.testing.assert_array_equal(np.asarray(got, np.float32), np.asarray(want.astype(jnp.bfloat16), np.float32))
        for g, w in zip(jax.tree.leaves(got_state), jax.tree.leaves(want_state)):
            assert g.dtype == jnp.float32
            np.testing.assert_array_equal(g, w)
        x, state = got, got_state


def test_invalid_samplers_are_refused():
    with pytest.raises(ValueError, match="expected one of"):
        make("deis")
    with pytest.raises(ValueError, match="Karras"):
        make("euler_a", karras=True)  # EulerAncestralDiscreteScheduler has no use_karras_sigmas
    with pytest.raises(ValueError, match="eta"):
        make("euler", eta=0.5)
    with pytest.raises(ValueError, match="prediction_type"):
        make("heun").plan(NoiseSchedule.sd15(prediction_type="sample"))
    with pytest.raises(ValueError, match="steps"):
        make("euler", 0).plan(NoiseSchedule.sd15(timestep_spacing="linspace"))
    x = jnp.zeros(SHAPE)
    sampler = make("euler_a", 10)
    with pytest.raises(ValueError, match="needs noise"):
        sampler.step(NoiseSchedule.sd15(), sampler.plan(NoiseSchedule.sd15()), 0, x, x, {})
