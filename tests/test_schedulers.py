"""Noise schedules and samplers: parity with diffusers' DDPMScheduler / DDIMScheduler and float64 formulas.

Tolerances: a scheduler step is a handful of float32 multiply-adds with O(1) coefficients, so two
correct float32 implementations agree to a few ulp (measured: ≤ 5.1e-7 relative, i.e. max-abs error
over max-abs value). We assert 1e-6; a wrong coefficient, a swapped ᾱ_t / ᾱ_{t−1} or an off-by-one
timestep is off by 1e-4 or more. The β and ᾱ tables come out bit-identical to diffusers'.

One exception: x̂_0 = (x_t − √(1 − ᾱ_t) ε̂) / √ᾱ_t amplifies a 1-ulp difference in the numerator by
1/√ᾱ_t (up to 158 for the linear schedule at t = 999, 2·10⁴ for the cosine one), and XLA evaluates
x / c as x · (1/c) where PyTorch divides. Relative to x̂_0's own scale that cancels out — unless
``clip_sample`` caps the scale at 1; then x̂_0 is held to 1e-6 / √ᾱ_t.
"""

import dataclasses
import inspect

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from sdjax.schedulers import (
    NoiseSchedule,
    ddim_step,
    ddpm_step,
    predict_eps,
    predict_x0,
    previous_timesteps,
    q_sample,
    timesteps,
    training_target,
    v_target,
)
from tests.helpers import SD15_SCHEDULER as SD15_CONFIG  # runwayml/stable-diffusion-v1-5's, verbatim
from tests.helpers import nchw, nhwc, rel_err

torch = pytest.importorskip("torch", reason="the reference extra (pip install -e '.[reference]') provides torch")
diffusers = pytest.importorskip("diffusers")

RTOL = 1e-6
SHAPE = (2, 8, 8, 4)  # (B, H, W, C)


def reference(cls, schedule: NoiseSchedule):
    """The diffusers scheduler of class ``cls`` configured like ``schedule`` (each class takes a subset)."""
    accepted = inspect.signature(cls.__init__).parameters
    return cls(**{k: v for k, v in dataclasses.asdict(schedule).items() if k in accepted})


def randn(rng, shape=SHAPE):
    return rng.standard_normal(shape).astype(np.float32)


def torch_nchw(x):
    return torch.from_numpy(nchw(x))


# ---------------------------------------------------------------------------------------------------
# The schedule
# ---------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("beta_schedule", ["scaled_linear", "linear", "squaredcos_cap_v2"])
def test_schedule_matches_diffusers(beta_schedule):
    ours = NoiseSchedule.sd15(beta_schedule=beta_schedule)
    ref = reference(diffusers.DDIMScheduler, ours)
    for name in ("betas", "alphas", "alphas_cumprod"):
        got, want = getattr(ours, name), getattr(ref, name).numpy()
        assert got.dtype == np.float32 and got.shape == (1000,)
        # measured: 0 (bit-identical, for all three schedules)
        np.testing.assert_allclose(got, want, rtol=0, atol=1e-6)
    assert ours.final_alpha_cumprod == float(ref.final_alpha_cumprod)


def test_sd15_from_diffusers_config():
    schedule = NoiseSchedule.from_diffusers_config(SD15_CONFIG)  # _class_name, skip_prk_steps … ignored
    assert schedule == NoiseSchedule.sd15()
    assert schedule.final_alpha_cumprod == schedule.alphas_cumprod[0]
    assert NoiseSchedule.sd15(set_alpha_to_one=True).final_alpha_cumprod == 1.0
    v_model = NoiseSchedule.from_diffusers_config(SD15_CONFIG | {"prediction_type": "v_prediction"})
    assert v_model.prediction_type == "v_prediction"


@pytest.mark.parametrize(
    "option", [{"trained_betas": [0.1] * 1000}, {"rescale_betas_zero_snr": True}, {"thresholding": True}]
)
def test_unsupported_config_options_are_refused(option):
    with pytest.raises(NotImplementedError, match=next(iter(option))):
        NoiseSchedule.from_diffusers_config(SD15_CONFIG | option)


def test_invalid_settings_are_refused():
    with pytest.raises(ValueError, match="beta_schedule"):
        NoiseSchedule(beta_schedule="sigmoid")
    with pytest.raises(ValueError, match="variance_type"):
        NoiseSchedule(variance_type="learned_range")


def test_alpha_bar_and_snr():
    schedule = NoiseSchedule.sd15()
    t = np.array([0, 1, 500, 999])
    ab = schedule.alphas_cumprod[t].astype(np.float64)
    np.testing.assert_array_equal(schedule.alpha_bar(t), schedule.alphas_cumprod[t])
    np.testing.assert_allclose(schedule.snr(t), ab / (1 - ab), rtol=1e-5)  # 1 − ᾱ_0 ≈ 8.5e-4 costs 3 digits
    np.testing.assert_array_equal(schedule.alpha_bar(np.array([-1, 3]), final=0.5), [0.5, schedule.alphas_cumprod[3]])


# ---------------------------------------------------------------------------------------------------
# Timesteps
# ---------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("spacing,offset", [("leading", 1), ("leading", 0), ("trailing", 0), ("linspace", 0)])
def test_timesteps_match_diffusers(spacing, offset):
    """Every N from 1 to T, against ``set_timesteps`` — and the two places diffusers goes wrong."""
    schedule = NoiseSchedule.sd15(timestep_spacing=spacing, steps_offset=offset)
    ref = reference(diffusers.DDIMScheduler, schedule)
    overshoots = []
    for n in range(1, 1001):
        ref.set_timesteps(n)
        want = ref.timesteps.numpy()
        if want[0] >= 1000:
            # leading spacing with steps_offset=1 and N = T gives timestep T (out of range; diffusers
            # would fail later, indexing ᾱ); we refuse it up front.
            assert (spacing, offset, n) == ("leading", 1, 1000)
            with pytest.raises(ValueError, match="reaches t=1000"):
                timesteps(schedule, n)
            continue
        got = timesteps(schedule, n)
        assert got.dtype == np.int32 and got.shape == (n,)
        if len(want) == n + 1:
            # trailing spacing: np.arange(T, 0, −T/N) has one point too many for some N, which diffusers
            # turns into a final timestep −1 (and DDIM then reads ᾱ[−1] = ᾱ_999). We give the N real ones.
            assert want[-1] == -1
            overshoots.append(n)
            want = want[:n]
        np.testing.assert_array_equal(got, want)
    if spacing == "trailing":
        assert overshoots[:4] == [61, 103, 121, 122], overshoots
    else:
        assert not overshoots


@pytest.mark.parametrize("spacing", ["leading", "trailing", "linspace"])
@pytest.mark.parametrize("n", [10, 50, 61])
def test_chain_previous_timesteps_match_ddpm_scheduler(spacing, n):
    schedule = NoiseSchedule.sd15(timestep_spacing=spacing)
    ref = reference(diffusers.DDPMScheduler, schedule)
    ref.set_timesteps(n)
    ts = timesteps(schedule, n)
    want = [int(ref.previous_timestep(int(t))) for t in ts]
    np.testing.assert_array_equal(previous_timesteps(ts), want)


def test_stride_and_chain_rules_agree_on_alpha_bar_for_leading_spacing():
    """DDIM's prev_t = t − ⌊T/N⌋ and DDPM's "next timestep of the chain" give the same ᾱ_{t'} with
    leading spacing (the last step can differ in prev_t, −19 against −1, but both mean "past the end")."""
    schedule = NoiseSchedule.sd15()
    for n in (10, 20, 50, 100, 250):
        ts = timesteps(schedule, n)
        by_stride = schedule.alpha_bar(previous_timesteps(ts, stride=1000 // n), final=schedule.final_alpha_cumprod)
        by_chain = schedule.alpha_bar(previous_timesteps(ts), final=schedule.final_alpha_cumprod)
        np.testing.assert_array_equal(by_stride, by_chain)


# ---------------------------------------------------------------------------------------------------
# DDPM
# ---------------------------------------------------------------------------------------------------


def assert_step_matches(schedule, t, got, want):
    """(x_prev, x̂_0) against diffusers' (prev_sample, pred_original_sample); see the module docstring."""
    x0_tolerance = RTOL / np.sqrt(schedule.alphas_cumprod[t]) if schedule.clip_sample else RTOL
    assert rel_err(got.x_prev, nhwc(want.prev_sample.numpy())) < RTOL, t
    assert rel_err(got.x0_pred, nhwc(want.pred_original_sample.numpy())) < x0_tolerance, t


def assert_ddpm_matches(schedule, ts, prev_ts, num_inference_steps=None):
    """DDPMScheduler.step against ddpm_step along (ts, prev_ts), with fresh random inputs at each step."""
    ref = reference(diffusers.DDPMScheduler, schedule)
    if num_inference_steps:
        ref.set_timesteps(num_inference_steps)
    rng = np.random.default_rng(0)
    for i, (t, prev_t) in enumerate(zip(ts, prev_ts)):
        x, out = randn(rng), randn(rng)
        # DDPMScheduler.step draws its own noise, randn_tensor(shape, generator=g), which for a single
        # CPU generator is torch.randn(shape, generator=g). Handing it a generator seeded with i and
        # drawing from another generator seeded with i gives both implementations the same z.
        want = ref.step(torch_nchw(out), int(t), torch_nchw(x), generator=torch.Generator().manual_seed(i))
        z = nhwc(torch.randn(nchw(x).shape, generator=torch.Generator().manual_seed(i)).numpy())
        got = ddpm_step(schedule, jnp.asarray(out), t, prev_t, jnp.asarray(x), jnp.asarray(z))
        assert_step_matches(schedule, t, got, want)


@pytest.mark.parametrize("variance_type", ["fixed_small", "fixed_large"])
@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction", "sample"])
def test_ddpm_step_matches_diffusers_full_schedule(prediction_type, variance_type):
    schedule = NoiseSchedule.sd15(prediction_type=prediction_type, variance_type=variance_type)
    ts = np.array([999, 998, 900, 500, 100, 2, 1, 0])
    assert_ddpm_matches(schedule, ts, ts - 1)  # measured ≤ 1.7e-7


@pytest.mark.parametrize("variance_type", ["fixed_small", "fixed_large"])
@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
def test_ddpm_step_matches_diffusers_50_steps(prediction_type, variance_type):
    """A shortened chain: DDPMScheduler then steps to the next timestep of the chain, with the
    compound β = 1 − ᾱ_t/ᾱ_{t'} of the jump (and adds noise on its last step, from t = 1)."""
    schedule = NoiseSchedule.sd15(prediction_type=prediction_type, variance_type=variance_type)
    ts = timesteps(schedule, 50)
    assert_ddpm_matches(schedule, ts, previous_timesteps(ts), num_inference_steps=50)  # measured ≤ 2.3e-7


@pytest.mark.parametrize("beta_schedule", ["linear", "squaredcos_cap_v2"])
def test_ddpm_step_matches_diffusers_pixel_space_configs(beta_schedule):
    """The original DDPM set-up: x̂_0 clipped to [−1, 1]."""
    schedule = NoiseSchedule(beta_schedule=beta_schedule, clip_sample=True)
    ts = np.array([999, 998, 500, 10, 0])
    assert_ddpm_matches(schedule, ts, ts - 1)


# ---------------------------------------------------------------------------------------------------
# DDIM
# ---------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("eta", [0.0, 0.7])
@pytest.mark.parametrize(
    "schedule",
    [
        NoiseSchedule.sd15(),
        NoiseSchedule.sd15(prediction_type="v_prediction"),
        NoiseSchedule.sd15(prediction_type="sample"),
        NoiseSchedule(beta_schedule="squaredcos_cap_v2", clip_sample=True, timestep_spacing="trailing"),
    ],
    ids=["sd15-epsilon", "sd15-v", "sd15-sample", "cosine-clipped-trailing"],
)
def test_ddim_step_matches_diffusers_50_steps(schedule, eta):
    """Every step of a 50-step chain with random model outputs, given diffusers' x_t and the same z.

    The two chains are also run independently; float32 rounding then accumulates over 50 steps
    (measured ≤ 1e-6 at the end), hence 1e-5 for that comparison.
    """
    ref = reference(diffusers.DDIMScheduler, schedule)
    ref.set_timesteps(50)
    ts = timesteps(schedule, 50)
    prev_ts = previous_timesteps(ts, stride=schedule.num_train_timesteps // 50)
    rng = np.random.default_rng(0)
    x_ref = torch_nchw(randn(rng))
    x_ours = jnp.asarray(nhwc(x_ref.numpy()))
    for t, prev_t in zip(ts, prev_ts):
        out, z = randn(rng), randn(rng)
        want = ref.step(torch_nchw(out), int(t), x_ref, eta=eta, variance_noise=torch_nchw(z))
        got = ddim_step(schedule, jnp.asarray(out), t, prev_t, jnp.asarray(nhwc(x_ref.numpy())), jnp.asarray(z), eta)
        assert_step_matches(schedule, t, got, want)  # measured ≤ 5.1e-7 (x̂_0 of the clipped cosine: 1.9e-6)
        x_ref = want.prev_sample
        x_ours = ddim_step(schedule, jnp.asarray(out), t, prev_t, x_ours, jnp.asarray(z), eta).x_prev
    assert rel_err(x_ours, nhwc(x_ref.numpy())) < 10 * RTOL


def test_ddim_with_eta_needs_noise():
    x = jnp.zeros(SHAPE)
    ddim_step(NoiseSchedule.sd15(), x, 981, 961, x)  # η = 0: deterministic, no noise needed
    with pytest.raises(ValueError, match="needs noise"):
        ddim_step(NoiseSchedule.sd15(), x, 981, 961, x, eta=0.5)


# ---------------------------------------------------------------------------------------------------
# The forward process and the prediction types
# ---------------------------------------------------------------------------------------------------


def test_q_sample_matches_float64_formula_and_diffusers():
    schedule = NoiseSchedule.sd15()
    rng = np.random.default_rng(0)
    x0, eps = randn(rng, (4, 8, 8, 4)), randn(rng, (4, 8, 8, 4))
    t = np.array([0, 1, 500, 999])
    ab = schedule.alphas_cumprod[t].astype(np.float64)[:, None, None, None]
    want = np.sqrt(ab) * x0 + np.sqrt(1 - ab) * eps
    got = q_sample(schedule, jnp.asarray(x0), jnp.asarray(t), jnp.asarray(eps))
    assert got.dtype == jnp.float32
    # two float32 products and a sum of O(1) terms: a few ulp, ≤ 3e-7 relative
    assert rel_err(got, want) < RTOL
    ref = reference(diffusers.DDPMScheduler, schedule).add_noise(torch_nchw(x0), torch_nchw(eps), torch.tensor(t))
    assert rel_err(got, nhwc(ref.numpy())) < RTOL


def test_q_sample_bf16_computes_in_float32():
    """bf16 in, bf16 out — but the arithmetic in float32: in bf16, ᾱ_0 = 0.99915 rounds to 1 and the
    noise at t = 0 would vanish altogether."""
    schedule = NoiseSchedule.sd15()
    assert jnp.asarray(schedule.alphas_cumprod[0], jnp.bfloat16) == 1
    rng = np.random.default_rng(0)
    x0, eps = jnp.asarray(randn(rng), jnp.bfloat16), jnp.asarray(randn(rng), jnp.bfloat16)
    t = jnp.array([0, 700])
    got = q_sample(schedule, x0, t, eps)
    assert got.dtype == jnp.bfloat16
    want = q_sample(schedule, x0.astype(jnp.float32), t, eps.astype(jnp.float32)).astype(jnp.bfloat16)
    np.testing.assert_array_equal(np.asarray(got, np.float32), np.asarray(want, np.float32))
    assert not jnp.array_equal(got[0], x0[0])  # t = 0 still adds its (small) noise


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction", "sample"])
def test_predictions_round_trip(prediction_type):
    """x_t = q_sample(x_0, t, ε), target = training_target(x_0, t, ε)  ⇒  predict_x0 = x_0, predict_eps = ε.

    Against the float64 x_0 and ε the float32 error is ~1e-7 times the conditioning of the inversion:
    dividing by √ᾱ_t (x̂_0 from ε at t = 999: ×15) or by √(1 − ᾱ_t) (ε̂ from x_0 at t = 0: ×34).
    """
    schedule = NoiseSchedule.sd15(prediction_type=prediction_type)
    rng = np.random.default_rng(0)
    x0, eps = randn(rng, (4, 8, 8, 4)), randn(rng, (4, 8, 8, 4))
    t = np.array([0, 1, 500, 999])
    ab = schedule.alphas_cumprod[t].astype(np.float64)
    x_t = q_sample(schedule, jnp.asarray(x0), t, jnp.asarray(eps))
    target = training_target(schedule, jnp.asarray(x0), t, jnp.asarray(eps))
    if prediction_type == "v_prediction":
        v64 = np.sqrt(ab)[:, None, None, None] * eps - np.sqrt(1 - ab)[:, None, None, None] * x0
        assert rel_err(v_target(schedule, jnp.asarray(x0), t, jnp.asarray(eps)), v64) < RTOL
    conditioning = np.maximum(1 / np.sqrt(ab), 1 / np.sqrt(1 - ab))
    for got, want in [(predict_x0(schedule, x_t, t, target), x0), (predict_eps(schedule, x_t, t, target), eps)]:
        for b in range(len(t)):
            assert rel_err(got[b], want[b]) < RTOL * conditioning[b], (b, rel_err(got[b], want[b]))


# ---------------------------------------------------------------------------------------------------
# Under jit, per-example t, bf16
# ---------------------------------------------------------------------------------------------------


def test_ddim_sampling_loop_under_jit():
    """The whole 50-step chain in one jitted lax.scan, t and prev_t traced, against the eager loop."""
    schedule = NoiseSchedule.sd15()
    ts = timesteps(schedule, 50)
    prev_ts = previous_timesteps(ts, stride=20)
    rng = np.random.default_rng(0)
    x_T = jnp.asarray(randn(rng))
    outs, zs = jnp.asarray(randn(rng, (50, *SHAPE))), jnp.asarray(randn(rng, (50, *SHAPE)))

    @jax.jit
    def sample(x):
        def body(x, step):
            t, prev_t, out, z = step
            return ddim_step(schedule, out, t, prev_t, x, z, 0.7).x_prev, None

        return jax.lax.scan(body, x, (jnp.asarray(ts), jnp.asarray(prev_ts), outs, zs))[0]

    x = x_T
    for i in range(50):
        x = ddim_step(schedule, outs[i], ts[i], prev_ts[i], x, zs[i], 0.7).x_prev
    assert rel_err(sample(x_T), x) < RTOL  # XLA may fuse/reorder the float32 arithmetic


def test_ddpm_step_under_jit_with_per_example_t():
    """t of shape (B,): each example steps from its own timestep, exactly as if stepped alone."""
    schedule = NoiseSchedule.sd15(variance_type="fixed_large")
    rng = np.random.default_rng(0)
    x, out, z = (jnp.asarray(randn(rng)) for _ in range(3))
    t = jnp.array([500, 0])
    step = jax.jit(ddpm_step, static_argnums=0)
    got = step(schedule, out, t, t - 1, x, z)
    for b in range(2):
        alone = ddpm_step(schedule, out[b : b + 1], int(t[b]), int(t[b]) - 1, x[b : b + 1], z[b : b + 1])
        assert rel_err(got.x_prev[b], alone.x_prev[0]) < RTOL
        assert rel_err(got.x0_pred[b], alone.x0_pred[0]) < RTOL


@pytest.mark.parametrize("step", ["ddpm", "ddim"])
def test_steps_compute_in_float32_for_bf16_model_outputs(step):
    schedule = NoiseSchedule.sd15()
    rng = np.random.default_rng(0)
    x, out, z = (jnp.asarray(randn(rng), jnp.bfloat16) for _ in range(3))

    def run(out, x, z):
        if step == "ddpm":
            return ddpm_step(schedule, out, 1, 0, x, z)
        return ddim_step(schedule, out, 21, 1, x, z, 0.7)

    got = run(out, x, z)
    want = run(*(a.astype(jnp.float32) for a in (out, x, z)))
    for g, w in zip(got, want):
        assert g.dtype == jnp.bfloat16
        np.testing.assert_array_equal(np.asarray(g, np.float32), np.asarray(w.astype(jnp.bfloat16), np.float32))
