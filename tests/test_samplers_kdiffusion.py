"""The σ samplers against k-diffusion, the implementation the web UIs (AUTOMATIC1111, ComfyUI) run.

k-diffusion's samplers take a denoiser D(x; σ) on x = x_0 + σ ε and a list of σ's. Here D wraps the
same fake network as tests/test_samplers.py, tanh(input) · c_i + r_i at evaluation i, shown
x / √(σ² + 1) as an SD denoiser wrapper shows it (ε-prediction: D = x − σ ε̂), and each run gets the σ's
of the sdjax plan (the step σ's: the plan lists midpoints and Heun's repeats too) and the same noise:
sdjax's z_i of each evaluation, handed to k-diffusion through its ``noise_sampler`` as the increments of
a Brownian path (tests.helpers.BrownianPath; over the disjoint intervals of the one-noise-per-step
samplers, that is z_i itself).

Compared: what the network is shown at every evaluation, and the final x (at σ = 0 the sdjax
samplers' x, VP or not, is x_0). Relative error ≤ 2e-6, as for the chains against diffusers (float32
rounding differences along up to 19 evaluations; measured ≤ 6.7e-7).

k-diffusion is installed without its dependencies (README: its metadata pulls a CUDA torch, torchvision
and numpy < 2), so its package ``__init__`` cannot be imported: :func:`k_sampling` loads the one module
this needs, ``k_diffusion/sampling.py``, whose only use of the rest of the package is ``utils.append_dims``.
"""

import importlib.util
import sys
import types
from pathlib import Path

import jax.numpy as jnp
import numpy as np
import pytest

from sdjax.samplers import make
from sdjax.schedulers import NoiseSchedule
from tests.helpers import SD15_SCHEDULER, BrownianPath, rel_err

torch = pytest.importorskip("torch", reason="the reference extra (pip install -e '.[reference]') provides torch")
pytest.importorskip("torchsde", reason="the reference extra provides torchsde")
if importlib.util.find_spec("k_diffusion") is None:
    pytest.skip("k-diffusion: pip install --no-deps k-diffusion==0.1.1.post1 (README)", allow_module_level=True)

RTOL = 2e-6
SHAPE = (2, 8, 8, 4)
# k-diffusion's function for each sdjax sampler
K_SAMPLERS = {
    "euler": "sample_euler",
    "euler_a": "sample_euler_ancestral",
    "heun": "sample_heun",
    "lms": "sample_lms",
    "dpmpp_2m": "sample_dpmpp_2m",
    "dpmpp_2m_sde": "sample_dpmpp_2m_sde",
    "dpmpp_sde": "sample_dpmpp_sde",
    "dpmpp_2s_a": "sample_dpmpp_2s_ancestral",
    "dpmpp_3m_sde": "sample_dpmpp_3m_sde",
}


@pytest.fixture(scope="module")
def k_sampling():
    """k_diffusion.sampling, loaded on its own under a stand-in package whose ``utils`` has the one
    function it uses (k-diffusion's own definition: append trailing singleton axes up to ndim)."""
    location = Path(importlib.util.find_spec("k_diffusion").submodule_search_locations[0])
    package, utils = types.ModuleType("k_diffusion"), types.ModuleType("k_diffusion.utils")
    package.__path__, package.utils = [str(location)], utils
    utils.append_dims = lambda x, ndim: x[(...,) + (None,) * (ndim - x.ndim)]
    saved = {name: sys.modules.pop(name, None) for name in ("k_diffusion", "k_diffusion.utils")}
    sys.modules.update({"k_diffusion": package, "k_diffusion.utils": utils})
    try:
        spec = importlib.util.spec_from_file_location("k_diffusion.sampling", location / "sampling.py")
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
    finally:
        for name, old in saved.items():
            sys.modules.pop(name, None)
            if old is not None:
                sys.modules[name] = old
    return module


def nchw_torch(x):
    return torch.from_numpy(np.array(np.asarray(x).transpose(0, 3, 1, 2)))


@pytest.mark.parametrize(
    "name,karras", [(name, False) for name in K_SAMPLERS] + [(name, True) for name in K_SAMPLERS if name != "euler_a"]
)
def test_chain_matches_k_diffusion(k_sampling, name, karras):
    schedule = NoiseSchedule.from_diffusers_config(SD15_SCHEDULER | {"timestep_spacing": "linspace"})
    sampler = make(name, 10, karras=karras)
    plan = sampler.plan(schedule)
    K = len(plan.timesteps)
    rng = np.random.default_rng(0)
    c = rng.uniform(0.5, 1.5, K).astype(np.float32)
    r = rng.standard_normal((K, *SHAPE)).astype(np.float32)
    z = rng.standard_normal((K, *SHAPE)).astype(np.float32)
    x_T = rng.standard_normal(SHAPE).astype(np.float32)

    # sdjax's chain, recording what the network is shown
    x = jnp.asarray(x_T * plan.init_noise_sigma)
    state, shown = sampler.init_state(x), []
    for i in range(K):
        model_input = np.asarray(sampler.model_input(plan, i, x))
        shown.append(model_input)
        out = jnp.asarray(np.tanh(model_input) * c[i] + r[i])
        x, state = sampler.step(schedule, plan, i, out, x, state, jnp.asarray(z[i]) if sampler.needs_noise else None)

    # k-diffusion's, on the plan's step σ's, from the same start in its x_0 + σ ε form (dpmpp_2m and
    # dpmpp_2m_sde work on the VP sample, the network's own input: x_VE = x_VP · √(σ_0² + 1))
    step_sigmas = plan.sigmas if sampler.order == 1 else np.append(plan.sigmas[0::2], 0.0)
    sigmas = torch.from_numpy(np.asarray(step_sigmas, np.float32))
    path, k_shown = BrownianPath(nchw_torch), []

    def denoiser(x, sigma):
        i = len(k_shown)
        s = sigma[0]
        model_input = x / (s**2 + 1) ** 0.5
        k_shown.append(model_input.numpy().transpose(0, 2, 3, 1))
        eps = torch.tanh(model_input) * float(c[i]) + nchw_torch(r[i])
        path.z = z[i]  # the noise drawn after this evaluation
        return x - s * eps

    kwargs = {} if name in ("euler", "heun", "lms", "dpmpp_2m") else {"noise_sampler": path}
    x_k = getattr(k_sampling, K_SAMPLERS[name])(
        denoiser, nchw_torch(shown[0]) * (sigmas[0] ** 2 + 1) ** 0.5, sigmas, disable=True, **kwargs
    )

    assert len(k_shown) == K
    inputs_error = max(rel_err(ours, theirs) for ours, theirs in zip(shown, k_shown))
    final_error = rel_err(x, x_k.numpy().transpose(0, 2, 3, 1))
    print(f"{name} karras={karras}: network inputs {inputs_error:.1e}, final x {final_error:.1e}")
    assert inputs_error < RTOL and final_error < RTOL


@pytest.mark.parametrize("name", ["dpmpp_2s_a", "dpmpp_3m_sde"])
def test_pipeline_matches_k_diffusion(k_sampling, tmp_path, name):
    """End to end for the samplers diffusers has no scheduler for: the tiny SD pipeline of tests.helpers,
    guidance 7.5 with negative prompts, 4 steps, against k-diffusion's function driving diffusers' own
    UNet, text encoder and VAE (as a web UI's CFG denoiser does: D = x − σ ε̂, ε̂ = ε̂_∅ + w (ε̂_c − ε̂_∅)),
    on sdjax's σ's and timesteps and with sdjax's per-image step noise. Images within 1e-3 (the pipeline
    tests' bound; measured 2.2e-6 and 2.0e-6)."""
    import sdjax
    from sdjax import chain as chain_lib
    from sdjax.pipeline import _image_keys
    from tests.helpers import NEGATIVES, PROMPTS, nchw, tiny_pipeline

    reference = tiny_pipeline(tmp_path)
    pipe = sdjax.StableDiffusion.from_pretrained(tmp_path / "model")
    steps, seed, w = 4, 3, 7.5
    latents = np.random.default_rng(0).standard_normal((2, 4, 4, 4)).astype(np.float32)
    got = pipe(PROMPTS, negative_prompt=NEGATIVES, num_inference_steps=steps, scheduler=name, latents=latents,
               seed=seed, guidance_scale=w, output_type="np")  # fmt: skip

    chain = pipe._chain(sdjax.pipeline.Options(scheduler=name, num_inference_steps=steps))  # the run's own plan
    plan = chain.plan
    step_sigmas = plan.sigmas if chain.sampler.order == 1 else np.append(plan.sigmas[0::2], 0.0)
    noise = chain_lib.noise_per_image(_image_keys(seed, 2, 2)[1], (4, 4, 4))
    with torch.no_grad():
        positive, negative = reference.encode_prompt(PROMPTS, "cpu", 1, True, NEGATIVES)
        context = torch.cat([negative, positive])
        path, calls = BrownianPath(lambda z: torch.from_numpy(nchw(z))), []

        def denoiser(x, sigma):
            i, s = len(calls), sigma[0]
            calls.append(i)
            model_input = torch.cat([x, x]) / (s**2 + 1) ** 0.5
            eps_uncond, eps_text = reference.unet(model_input, float(plan.timesteps[i]), context).sample.chunk(2)
            path.z = np.asarray(noise(i))  # the noise sdjax draws after evaluation i
            return x - s * (eps_uncond + w * (eps_text - eps_uncond))

        sigmas = torch.from_numpy(np.array(step_sigmas, np.float32))
        x = torch.from_numpy(latents) * float(plan.init_noise_sigma)
        x = getattr(k_sampling, K_SAMPLERS[name])(denoiser, x, sigmas, disable=True, noise_sampler=path)
        decoded = reference.vae.decode(x / reference.vae.config.scaling_factor).sample
        want = (decoded / 2 + 0.5).clamp(0, 1).numpy().transpose(0, 2, 3, 1)
    assert len(calls) == len(plan.timesteps)
    error = float(np.max(np.abs(got - want)))
    print(f"{name} in the pipeline: max |sdjax − k-diffusion| = {error:.2e}")
    assert error <= 1e-3 and np.ptp(want) > 0.01
