"""The txt2img pipeline against diffusers' ``StableDiffusionPipeline``, image for image.

A tiny random SD1-style model (the structure of the real one, with a few channels per layer: a
4-level VAE, so latents are H/8 × W/8 as in SD, a 2-level cross-attention UNet, a 2-layer CLIP text
encoder with CLIP's real vocabulary and tokenizer: :func:`tests.helpers.tiny_pipeline`) is built in
diffusers, saved with ``save_pretrained``, and loaded by sdjax. Both pipelines get the same prompts,
negative prompts and starting latents; each deterministic sampler must give the same images to
within 1e-3 (images in [0, 1], float32; measured, 4 steps, guidance 7.5: ddim 1.9e-6, plms 1.2e-6,
euler 1.5e-6, dpmpp_2m 1.4e-6, lms 2.0e-6, heun 1.1e-6, unipc 1.2e-6; euler without guidance 6e-7).
"""


import jax.numpy as jnp
import numpy as np
import pytest

import sdjax
from sdjax import compvis, samplers
from sdjax.samplers import from_config as sampler_from_config
from sdjax.samplers import make
from tests.helpers import (
    NEGATIVES,
    PROMPTS,
    SCHEDULERS,
    SIZE,
    BrownianPath,
    diffusers_images,
    nchw,
    nhwc,
    tiny_pipeline,
)

torch = pytest.importorskip("torch")
diffusers = pytest.importorskip("diffusers")
transformers = pytest.importorskip("transformers")

PARITY_ATOL = 1e-3


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """(diffusers pipeline, its folder, sdjax pipeline loaded from the folder)."""
    folder = tmp_path_factory.mktemp("pipeline")
    reference = tiny_pipeline(folder)
    return reference, folder / "model", sdjax.StableDiffusion.from_pretrained(folder / "model")


def start_latents(n=2, seed=0):
    return np.random.default_rng(seed).standard_normal((n, 4, SIZE // 8, SIZE // 8)).astype(np.float32)


def reference_images(reference, scheduler, latents, steps, guidance_scale):
    return diffusers_images(
        reference,
        scheduler,
        height=SIZE,
        width=SIZE,
        num_inference_steps=steps,
        guidance_scale=guidance_scale,
        latents=torch.from_numpy(latents),
    )


@pytest.mark.parametrize(
    "scheduler, guidance_scale",
    [(name, 7.5) for name in SCHEDULERS] + [("euler", 1.0)],  # 1.0: no unconditional pass, in both
)
def test_images_match_diffusers(models, scheduler, guidance_scale):
    reference, _, pipe = models
    latents = start_latents()
    want = reference_images(reference, scheduler, latents, 4, guidance_scale)
    got = pipe(
        PROMPTS,
        negative_prompt=NEGATIVES,
        num_inference_steps=4,
        guidance_scale=guidance_scale,
        scheduler=scheduler,
        latents=latents,
        output_type="np",
    )
    assert got.shape == want.shape == (2, SIZE, SIZE, 3) and got.dtype == np.float32
    error = float(np.max(np.abs(got - want)))
    print(f"{scheduler} w={guidance_scale}: max |sdjax − diffusers| = {error:.2e}")
    assert error <= PARITY_ATOL
    assert np.ptp(want) > 0.01  # the comparison is not between two constant images


@pytest.mark.parametrize("scheduler", ["dpmpp_2m_sde", "dpmpp_sde"])
def test_stochastic_samplers_match_diffusers(models, scheduler, monkeypatch):
    """The SDE samplers with the step noise sdjax draws (per image, from the seed) handed to diffusers:
    as variance_noise (DPMSolverMultistepScheduler), or as a Brownian path's increments in place of its
    torchsde tree (DPMSolverSDEScheduler). Measured 4 steps, guidance 7.5: 1.6e-6 and 2.0e-6."""
    from sdjax import chain as chain_lib
    from sdjax.pipeline import _image_keys

    reference, _, pipe = models
    latents, steps, seed = start_latents(), 4, 3
    evaluations = len(make(scheduler, steps).plan(pipe.components.schedule).timesteps)
    noise = chain_lib.noise_per_image(_image_keys(seed, 2, 2)[1], latents.shape[2:] + latents.shape[1:2])
    Z = [torch.from_numpy(nchw(noise(i))) for i in range(evaluations)]

    def pipeline_with_our_noise():
        reference.scheduler = getattr(diffusers, samplers.CLASSES[scheduler].diffusers_class).from_config(
            reference.scheduler.config | samplers.CLASSES[scheduler].variant
        )
        step, calls, path = reference.scheduler.step, [], BrownianPath(lambda z: torch.from_numpy(nchw(z)))

        def step_with_noise(model_output, t, sample, **kwargs):
            i = len(calls)
            calls.append(t)
            if scheduler == "dpmpp_2m_sde":
                kwargs["variance_noise"] = Z[i]
            else:
                path.z, reference.scheduler.noise_sampler = nhwc(Z[i].numpy()), path
            return step(model_output, t, sample, **kwargs)

        monkeypatch.setattr(reference.scheduler, "step", step_with_noise)
        with torch.no_grad():
            images = reference(
                PROMPTS, negative_prompt=NEGATIVES, num_inference_steps=steps, latents=torch.from_numpy(latents),
                output_type="np",
            ).images
        assert len(calls) == evaluations
        return images

    want = pipeline_with_our_noise()
    got = pipe(PROMPTS, negative_prompt=NEGATIVES, num_inference_steps=steps, scheduler=scheduler, latents=latents,
               seed=seed, output_type="np")
    error = float(np.max(np.abs(got - want)))
    print(f"{scheduler}: max |sdjax − diffusers| = {error:.2e}")
    assert error <= PARITY_ATOL
    other_seed = pipe(PROMPTS, negative_prompt=NEGATIVES, num_inference_steps=steps, scheduler=scheduler,
                      latents=latents, seed=seed + 1, output_type="np")
    assert float(np.max(np.abs(other_seed - want))) > 10 * PARITY_ATOL  # the match is the noise's doing


def test_checkpoint_scheduler_and_output_types(models):
    """scheduler=None runs the folder's own (PNDM → plms); "latent" and "pil" outputs agree with "np"."""
    _, _, pipe = models
    assert pipe.components.scheduler_config["_class_name"] == "PNDMScheduler"
    kwargs = dict(negative_prompt=NEGATIVES, num_inference_steps=4, latents=start_latents())
    images = pipe(PROMPTS, output_type="np", **kwargs)
    np.testing.assert_array_equal(images, pipe(PROMPTS, scheduler="plms", output_type="np", **kwargs))
    final = pipe(PROMPTS, output_type="latent", **kwargs)
    assert final.shape == (2, 4, SIZE // 8, SIZE // 8) and final.dtype == np.float32
    pil = pipe(PROMPTS, output_type="pil", **kwargs)
    assert [im.size for im in pil] == [(SIZE, SIZE)] * 2
    np.testing.assert_array_equal(np.asarray(pil[1]), np.round(images[1] * 255).astype(np.uint8))


def test_sampler_from_config():
    assert sampler_from_config(None, None, 10, 0.0) == make("plms", 10)
    euler = {"_class_name": "EulerDiscreteScheduler", "use_karras_sigmas": True}
    assert sampler_from_config(euler, None, 10, 0.0) == make("euler", 10, karras=True)
    assert sampler_from_config(euler, "euler_a", 10, 0.0) == make("euler_a", 10)  # no Karras σ's there
    with pytest.raises(ValueError, match="DEISMultistepScheduler, which sdjax does not implement"):
        sampler_from_config({"_class_name": "DEISMultistepScheduler"}, None, 10, 0.0)
    with pytest.raises(ValueError, match="'algorithm_type': 'dpmsolver'"):
        sampler_from_config({"_class_name": "DPMSolverMultistepScheduler", "algorithm_type": "dpmsolver"}, None, 10, 0)
    with pytest.raises(ValueError, match="'solver_order': 3"):
        sampler_from_config({"_class_name": "DPMSolverMultistepScheduler", "solver_order": 3}, None, 10, 0)
    # a class with two variants; the web UIs' names, with their Karras setting over the config's
    sde = {"_class_name": "DPMSolverMultistepScheduler", "algorithm_type": "sde-dpmsolver++"}
    assert sampler_from_config(sde, None, 10, 0.0) == make("dpmpp_2m_sde", 10)
    assert sampler_from_config({"_class_name": "UniPCMultistepScheduler"}, None, 10, 0.0) == make("unipc", 10)
    assert sampler_from_config(None, "DPM++ 2M Karras", 10, 0.0) == make("dpmpp_2m", 10, karras=True)
    assert sampler_from_config(euler, "Euler", 10, 0.0) == make("euler", 10)
    assert sampler_from_config(euler, "euler", 10, 0.0) == make("euler", 10, karras=True)
    assert samplers.a1111_name("dpmpp_sde", karras=True) == "DPM++ SDE Karras"
    with pytest.raises(ValueError, match="web-UI name"):
        sampler_from_config(None, "DPM++ 2M Krras", 10, 0.0)


def test_single_file_gives_the_same_images(models, tmp_path):
    _, _, pipe = models
    sd = pipe.components
    path = compvis.save_single_file(sd, tmp_path / "model.safetensors")
    single = sdjax.StableDiffusion.from_pretrained(
        path, unet=sd.unet.config, vae=sd.vae.config, text_encoder=sd.text_encoder.config, schedule=sd.schedule
    )
    kwargs = dict(negative_prompt=NEGATIVES, num_inference_steps=4, scheduler="ddim", output_type="np")
    np.testing.assert_array_equal(single(PROMPTS, **kwargs), pipe(PROMPTS, **kwargs))


def test_seeds_and_batch_independence(models):
    """Same seed, same images; image i does not depend on how many are drawn with it (euler_a: its
    per-step noise is per image too). Compared on the final latents: decoding is per image."""
    _, _, pipe = models
    run = lambda n, seed=0: pipe(  # noqa: E731
        PROMPTS[0], num_inference_steps=2, scheduler="euler_a", num_images_per_prompt=n, seed=seed, output_type="latent"
    )
    four = run(4)
    np.testing.assert_array_equal(four, run(4))
    # the same random numbers; XLA's kernels may round differently for another batch shape (measured
    # 6e-5 on latents of magnitude up to 16: 3e-5 relative)
    np.testing.assert_allclose(run(1)[0], four[0], rtol=1e-4, atol=1e-4)
    assert np.max(np.abs(four[0] - four[1])) > 1e-3  # different keys, different images
    assert np.max(np.abs(run(1, seed=1)[0] - four[0])) > 1e-3


def test_bfloat16_stays_close_to_float32(models):
    """bf16 networks (8-bit mantissa), float32 sampler arithmetic: images within 0.05 of float32
    (measured: 0.026)."""
    _, folder, pipe = models
    half = sdjax.StableDiffusion.from_pretrained(folder, dtype="bfloat16")
    assert half.dtype == jnp.bfloat16
    latents = start_latents()
    kwargs = dict(negative_prompt=NEGATIVES, num_inference_steps=4, scheduler="ddim", latents=latents)
    low, full = half(PROMPTS, output_type="np", **kwargs), pipe(PROMPTS, output_type="np", **kwargs)
    assert low.dtype == np.float32
    error = float(np.max(np.abs(low - full)))
    print(f"bf16 vs fp32: max abs difference {error:.2e}")
    assert error < 0.05


def test_errors_and_warnings(models):
    _, _, pipe = models
    with pytest.raises(ValueError, match="height=44 is not a multiple of 8; the nearest valid sizes are 40 or 48"):
        pipe("a cat", height=44)
    with pytest.raises(ValueError, match="width=6 .* nearest valid sizes are 8"):
        pipe("a cat", width=6)
    with pytest.raises(ValueError, match="unknown sampler 'k_euler'"):
        pipe("a cat", scheduler="k_euler")
    with pytest.raises(ValueError, match=r"latents of shape \(1, 4, 8, 8\): expected \(2, 4, 4, 4\)"):
        pipe(PROMPTS, latents=np.zeros((1, 4, 8, 8), np.float32))
    with pytest.warns(UserWarning, match="its last 25 tokens were dropped"):
        pipe("cat " * 100, num_inference_steps=2, scheduler="euler_a", output_type="latent", truncate_prompts=True)
    with pytest.raises(ValueError, match=r"prompt_syntax='A1111': expected one of \('none', 'a1111', 'compel'\)"):
        pipe("a cat", prompt_syntax="A1111")


def test_progress_bar_counts_every_evaluation_and_changes_nothing(models, capsys):
    """The compiled chain ticks a bar once per model evaluation (heun: 2N − 1) and gives the same image."""
    ours = models[2]
    args = dict(prompt=PROMPTS[0], num_inference_steps=3, scheduler="heun", output_type="np", seed=3)
    ours.progress = False
    quiet = ours(**args)
    capsys.readouterr()
    ours.progress = True
    try:
        shown = ours(**args)
    finally:
        ours.progress = False
    np.testing.assert_array_equal(quiet, shown)
    err = capsys.readouterr().err
    assert "heun 3 steps: 100%" in err and "5/5" in err, err


@pytest.mark.parametrize("scheduler", ["euler_a", "heun", "dpmpp_2m"])
def test_stepwise_chain_is_the_compiled_chain_to_the_bit(models, scheduler):
    """With a callback the chain runs one jitted step at a time (sdjax.chain.iterate) instead of one
    lax.scan: the same latents, bit for bit (euler_a: with its per-image step noise; heun: 2N − 1
    evaluations), and the callback sees every evaluation's timestep and latents."""
    _, _, pipe = models
    kwargs = dict(negative_prompt=NEGATIVES, num_inference_steps=3, scheduler=scheduler, seed=1, output_type="latent")
    seen = []
    stepwise = pipe(PROMPTS, callback=lambda i, t, latents: seen.append((i, t, latents)), **kwargs)
    compiled = pipe(PROMPTS, **kwargs)
    np.testing.assert_array_equal(stepwise, compiled)
    timesteps = samplers.make(scheduler, 3).plan(pipe.schedule).timesteps  # (the folder's schedule: same t here)
    assert [i for i, _, _ in seen] == list(range(len(timesteps)))
    assert all(latents.shape == compiled.shape for _, _, latents in seen)
    np.testing.assert_array_equal(seen[-1][2], compiled)
    assert np.max(np.abs(seen[0][2] - compiled)) > 1e-3  # the first step's latents are not the last's
