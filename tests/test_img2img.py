"""img2img and inpainting against diffusers' ``StableDiffusionImg2ImgPipeline`` and
``StableDiffusionInpaintPipeline``, image for image.

The tiny random SD1-style models of :func:`tests.helpers.tiny_pipeline` (32 × 32 images, 4 × 4
latents), once with an ordinary UNet (img2img; inpainting by latent blending) and once with an
inpainting UNet (9 input channels). Both libraries draw random numbers twice before denoising: the
VAE posterior's ε (the image is encoded to a *sample* z = μ + σ ε, in both) and the forward
process's ε. diffusers draws them with ``randn_tensor``, which the tests replace by a function
handing out known arrays (:func:`known_noise`); sdjax is given the same arrays as ``vae_noise`` and
``noise``. The samplers compared are the deterministic ones, so the runs are then the same
computation, and images must agree within 1e-3 (images in [0, 1], float32; 4 steps, guidance 7.5).
Measured, img2img at strength 0.6: ddim 3.1e-6, plms 2.9e-6, euler 5.3e-6, dpmpp_2m 2.3e-6, lms
6.8e-6, heun 3.0e-6; euler at 1.0 2.2e-6; the single file as the folder. Inpainting UNet: ddim 8e-7,
euler 1.4e-6; latent blending: plms 2.9e-6, heun 1.1e-6, dpmpp_2m 3.0e-6.
"""

import dataclasses

import numpy as np
import pytest

import sdjax
from sdjax import compvis, convert
from sdjax.images import load_masks
from sdjax.img2img import start_step
from sdjax.samplers import make
from tests.helpers import NEGATIVES, PROMPTS, SCHEDULERS, SIZE, THREE_LEVEL_UNET, diffusers_images, tiny_pipeline

torch = pytest.importorskip("torch")
diffusers = pytest.importorskip("diffusers")
pytest.importorskip("transformers")

PARITY_ATOL = 1e-3
STEPS = 4
LATENT = (4, SIZE // 8, SIZE // 8)


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """An ordinary UNet: (diffusers img2img pipeline, diffusers inpainting pipeline, sdjax pipeline)."""
    folder = tmp_path_factory.mktemp("img2img")
    reference = tiny_pipeline(folder)
    return (
        pipeline(diffusers.StableDiffusionImg2ImgPipeline, reference),
        pipeline(diffusers.StableDiffusionInpaintPipeline, reference),
        sdjax.StableDiffusion.from_pretrained(folder / "model"),
    )


@pytest.fixture(scope="module")
def inpainting_models(tmp_path_factory):
    """An inpainting UNet (9 input channels): (diffusers inpainting pipeline, sdjax pipeline)."""
    folder = tmp_path_factory.mktemp("inpainting")
    reference = tiny_pipeline(folder, in_channels=9)
    return (
        pipeline(diffusers.StableDiffusionInpaintPipeline, reference),
        sdjax.StableDiffusion.from_pretrained(folder / "model"),
    )


def pipeline(cls, reference):
    pipe = cls(**reference.components, requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def inputs(n_images=2, seed=0):
    """(images (K, H, W, 3) in [0, 1], noise (2, 4, h, w), vae_noise (2, 4, h, w)) for the 2 prompts."""
    rng = np.random.default_rng(seed)
    images = rng.uniform(size=(n_images, SIZE, SIZE, 3)).astype(np.float32)
    noise, vae_noise = rng.standard_normal((2, 2, *LATENT)).astype(np.float32)
    return images, noise, vae_noise


def a_mask():
    """(H, W) float: a hole not aligned with the VAE's 8 × 8 blocks, plus values either side of 0.5."""
    mask = np.zeros((SIZE, SIZE), np.float32)
    mask[5:21, 10:28] = 0.8
    mask[24:, :6] = 0.4  # binarised to 0: kept
    return mask


@pytest.fixture
def known_noise(monkeypatch):
    """known_noise(module, array): diffusers' ``randn_tensor`` in ``module`` returns the first rows of
    ``array`` (as many as asked for) instead of random numbers."""

    def patch(module: str, array: np.ndarray):
        def randn_tensor(shape, generator=None, device=None, dtype=None, layout=None):
            assert tuple(shape)[1:] == array.shape[1:], (shape, array.shape)
            return torch.from_numpy(array[: shape[0]].copy())

        monkeypatch.setattr(f"diffusers.{module}.randn_tensor", randn_tensor)

    return patch


def reference_img2img(reference, known_noise, scheduler, images, noise, vae_noise, strength):
    known_noise("models.autoencoders.vae", vae_noise)  # the posterior sample's ε
    known_noise("pipelines.stable_diffusion.pipeline_stable_diffusion_img2img", noise)
    return diffusers_images(reference, scheduler, image=images, strength=strength, num_inference_steps=STEPS)


def reference_inpaint(reference, known_noise, scheduler, image, mask, noise, vae_noise, strength):
    known_noise("models.autoencoders.vae", vae_noise)
    known_noise("pipelines.stable_diffusion.pipeline_stable_diffusion_inpaint", noise)
    return diffusers_images(
        reference,
        scheduler,
        image=image,
        mask_image=mask,
        height=SIZE,
        width=SIZE,
        strength=strength,
        num_inference_steps=STEPS,
    )


def sdjax_inpaint(pipe, scheduler, image, mask, noise, vae_noise, strength):
    """``pipe.inpaint`` of :data:`PROMPTS` with the inputs diffusers got in :func:`reference_inpaint`."""
    kwargs = dict(negative_prompt=NEGATIVES, num_inference_steps=STEPS, scheduler=scheduler, output_type="np")
    vae_noise = np.repeat(vae_noise[:1], 2, axis=0)  # diffusers encodes the one image once
    return pipe.inpaint(PROMPTS, image, mask, strength=strength, noise=noise, vae_noise=vae_noise, **kwargs)


def check(got, want, label):
    assert got.shape == want.shape == (2, SIZE, SIZE, 3) and got.dtype == np.float32
    error = float(np.max(np.abs(got - want)))
    print(f"{label}: max |sdjax − diffusers| = {error:.2e}")
    assert error <= PARITY_ATOL
    assert np.ptp(want) > 0.01  # not two constant images


# ---------------------------------------------------------------------------------------------------
# img2img
# ---------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "scheduler, strength",
    # 0.6 of 4 steps: the last 2 (heun: 3 evaluations; plms: diffusers' cut [t_1, t_2, t_3] of its
    # [t_0, t_1, t_1, t_2, t_3]). 1.0: all the steps, still from the noised image (x_0 + σ_max ε).
    [(name, 0.6) for name in SCHEDULERS] + [("euler", 1.0)],
)
def test_img2img_matches_diffusers(models, known_noise, scheduler, strength):
    reference, _, pipe = models
    images, noise, vae_noise = inputs()
    want = reference_img2img(reference, known_noise, scheduler, images, noise, vae_noise, strength)
    got = pipe.img2img(
        PROMPTS,
        images,
        strength=strength,
        negative_prompt=NEGATIVES,
        num_inference_steps=STEPS,
        scheduler=scheduler,
        output_type="np",
        noise=noise,
        vae_noise=vae_noise,
    )
    check(got, want, f"img2img {scheduler} strength {strength}")


def test_img2img_single_file(models, known_noise, tmp_path):
    """The same weights as a CompVis single file: the same images as diffusers' (and as the folder's)."""
    reference, _, pipe = models
    sd = pipe.components
    path = compvis.save_single_file(sd, tmp_path / "model.safetensors")
    single = sdjax.StableDiffusion.from_pretrained(
        path, unet=sd.unet.config, vae=sd.vae.config, text_encoder=sd.text_encoder.config, schedule=sd.schedule
    )
    images, noise, vae_noise = inputs()
    want = reference_img2img(reference, known_noise, "ddim", images, noise, vae_noise, 0.6)
    kwargs = dict(
        strength=0.6, negative_prompt=NEGATIVES, num_inference_steps=STEPS, scheduler="ddim", output_type="np"
    )
    got = single.img2img(PROMPTS, images, noise=noise, vae_noise=vae_noise, **kwargs)
    check(got, want, "img2img single file ddim")
    np.testing.assert_array_equal(got, pipe.img2img(PROMPTS, images, noise=noise, vae_noise=vae_noise, **kwargs))


def test_img2img_inputs_and_posterior_sample(models):
    """A PIL image is its 8-bit values / 255; one image serves every prompt; by default the image is
    encoded to a posterior sample (as diffusers), not to its mean (vae_noise = 0)."""
    from PIL import Image

    _, _, pipe = models
    images, noise, _ = inputs(n_images=1)
    pixels = np.round(images[0] * 255).astype(np.uint8)
    # (the chain of test_img2img_matches_diffusers[ddim-0.6], already compiled)
    kwargs = dict(strength=0.6, num_inference_steps=STEPS, scheduler="ddim", output_type="latent", noise=noise)
    from_pil = pipe.img2img(PROMPTS, Image.fromarray(pixels), **kwargs)
    np.testing.assert_array_equal(from_pil, pipe.img2img(PROMPTS, pixels / np.float32(255), **kwargs))
    mean = pipe.img2img(PROMPTS, images, vae_noise=np.zeros((2, *LATENT), np.float32), **kwargs)
    sample = pipe.img2img(PROMPTS, images, **kwargs)
    assert np.max(np.abs(sample - mean)) > 1e-3
    np.testing.assert_array_equal(sample, pipe.img2img(PROMPTS, images, **kwargs))


def test_vae_tiling_matches_diffusers(models, known_noise):
    """img2img at 48×80 with VAE tiling on in both (tiles of 32 pixels, 4 latents: the tiny VAE's
    sample_size): the image is encoded and the result decoded in overlapping, blended tiles, some cut
    short by the borders. The same images as diffusers with ``vae.enable_tiling()``; tiling off differs."""
    reference, _, pipe = models
    rng = np.random.default_rng(3)
    images = rng.uniform(size=(2, 48, 80, 3)).astype(np.float32)
    noise, vae_noise = rng.standard_normal((2, 2, 4, 6, 10)).astype(np.float32)
    kwargs = dict(strength=0.6, negative_prompt=NEGATIVES, num_inference_steps=STEPS, output_type="np")
    known_noise("models.autoencoders.vae", vae_noise)
    known_noise("pipelines.stable_diffusion.pipeline_stable_diffusion_img2img", noise)
    reference.scheduler = diffusers.DDIMScheduler.from_config(reference.scheduler.config)
    reference.vae.enable_tiling()
    pipe.enable_vae_tiling()
    try:
        with torch.no_grad():
            want = reference(PROMPTS, image=images, **kwargs).images
        got = pipe.img2img(PROMPTS, images, scheduler="ddim", noise=noise, vae_noise=vae_noise, **kwargs)
    finally:
        reference.vae.disable_tiling()
        pipe.disable_vae_tiling()
    untiled = pipe.img2img(PROMPTS, images, scheduler="ddim", noise=noise, vae_noise=vae_noise, **kwargs)
    assert got.shape == want.shape == (2, 48, 80, 3)
    error = float(np.max(np.abs(got - want)))
    print(f"img2img with VAE tiling: max |sdjax − diffusers| = {error:.2e}; untiled differs by "
          f"{np.max(np.abs(untiled - want)):.2e}")  # fmt: skip
    assert error <= PARITY_ATOL < np.max(np.abs(untiled - want))
    with pytest.raises(ValueError, match="VAE tile size 20: use a multiple of 32"):
        pipe.enable_vae_tiling(20)


def test_start_step_and_plan_cut():
    """diffusers' get_timesteps: the last int(N · strength) steps; the cut plan keeps each evaluation's t."""
    assert [start_step(4, s) for s in (0.25, 0.6, 0.75, 1.0)] == [3, 2, 1, 0]
    assert start_step(50, 0.8) == 10
    from sdjax.schedulers import NoiseSchedule

    schedule = NoiseSchedule.sd15()
    whole, cut = make("heun", 4).plan(schedule), make("heun", 4).plan(schedule, start=2)
    np.testing.assert_array_equal(cut.timesteps, whole.timesteps[4:])  # 2 steps of 2 evaluations each…
    np.testing.assert_array_equal(cut.sigmas, whole.sigmas[4:])  # …but the last is 1: 3 evaluations
    assert len(cut.timesteps) == 3
    plms = make("plms", 4).plan(schedule, start=2)  # PNDM's list [751, 501, 501, 251, 1] cut at 2
    np.testing.assert_array_equal(plms.timesteps, [501, 251, 1])
    np.testing.assert_array_equal(plms.t, [501, 501, 1])  # evaluation 1 redoes 501 → 251
    np.testing.assert_array_equal(plms.prev_t, [251, 251, -249])
    plms = make("plms", 4).plan(schedule, start=1)  # cut inside the doubled evaluation
    np.testing.assert_array_equal(plms.timesteps, [501, 501, 251, 1])
    np.testing.assert_array_equal(plms.t, [501, 751, 251, 1])  # evaluation 1 "redoes" 751 → 501
    np.testing.assert_array_equal(plms.prev_t, [251, 501, 1, -249])
    with pytest.raises(ValueError, match="start=4: expected 0 ≤ start < steps=4"):
        make("ddim", 4).plan(schedule, start=4)


# ---------------------------------------------------------------------------------------------------
# inpainting
# ---------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("scheduler, strength", [("ddim", 1.0), ("euler", 0.75)])
def test_inpainting_unet_matches_diffusers(inpainting_models, known_noise, scheduler, strength):
    """The 9-channel UNet sees [x, mask, masked-image latents]; one image and mask for both prompts."""
    reference, pipe = inpainting_models
    images, noise, vae_noise = inputs(n_images=1)
    mask = a_mask()
    want = reference_inpaint(reference, known_noise, scheduler, images, mask, noise, vae_noise, strength)
    got = sdjax_inpaint(pipe, scheduler, images, mask, noise, vae_noise, strength)
    check(got, want, f"inpaint (9 channels) {scheduler} strength {strength}")


# the three ways of noising the image to the next step: √ᾱ x_0 + √(1 − ᾱ) ε (plms), x_0 + σ ε (heun, which
# blends after its predictor and its corrector alike), α x_0 + σ α ε (dpmpp_2m)
@pytest.mark.parametrize("scheduler, strength", [("plms", 0.6), ("heun", 1.0), ("dpmpp_2m", 0.6)])
def test_latent_blending_matches_diffusers(models, known_noise, scheduler, strength):
    """A 4-channel UNet: latent blending with the image noised to each next step (PIL mask, RGB)."""
    from PIL import Image

    _, reference, pipe = models
    images, noise, vae_noise = inputs(n_images=1)
    mask = Image.fromarray(np.round(a_mask() * 255).astype(np.uint8)).convert("RGB")
    want = reference_inpaint(reference, known_noise, scheduler, images, mask, noise, vae_noise, strength)
    got = sdjax_inpaint(pipe, scheduler, images, mask, noise, vae_noise, strength)
    check(got, want, f"inpaint (blending) {scheduler} strength {strength}")


def test_inpainting_single_file(inpainting_models, known_noise, tmp_path):
    """A CompVis single file of an inpainting model: the 9 input channels are read off the file (the
    config given says 4), and the file round-trips."""
    reference, pipe = inpainting_models
    sd = pipe.components
    path = compvis.save_single_file(sd, tmp_path / "inpainting.safetensors")
    ckpt = convert.read_state_dict(path)
    assert ckpt["model.diffusion_model.input_blocks.0.0.weight"].shape[1] == 9
    assert compvis.unet_in_channels(ckpt) == 9
    single = sdjax.StableDiffusion.from_pretrained(
        path,
        unet=dataclasses.replace(sd.unet.config, in_channels=4),
        vae=sd.vae.config,
        text_encoder=sd.text_encoder.config,
        schedule=sd.schedule,
    )
    assert single.unet.config.in_channels == 9 and single.is_inpainting_model
    assert compvis.to_compvis(single.components).keys() == ckpt.keys()
    for name, weight in compvis.to_compvis(single.components).items():
        np.testing.assert_array_equal(weight, ckpt[name], err_msg=name)

    images, noise, vae_noise = inputs(n_images=1)
    want = reference_inpaint(reference, known_noise, "ddim", images, a_mask(), noise, vae_noise, 1.0)
    got = sdjax_inpaint(single, "ddim", images, a_mask(), noise, vae_noise, 1.0)  # 1.0: the default
    check(got, want, "inpaint single file ddim")


def test_mask_preprocessing():
    """Binarised at 0.5 (≥ 0.5: repaint), from PIL (any mode, as grey) or arrays; latent size by nearest."""
    from PIL import Image

    mask = a_mask()
    want = (mask >= 0.5).astype(np.float32)[None]
    np.testing.assert_array_equal(load_masks(mask), want)
    np.testing.assert_array_equal(load_masks(Image.fromarray(np.round(mask * 255).astype(np.uint8))), want)
    np.testing.assert_array_equal(load_masks(np.stack([mask, 1 - mask])), np.concatenate([want, 1 - want]))


# ---------------------------------------------------------------------------------------------------
# seeds, batches, errors
# ---------------------------------------------------------------------------------------------------


def test_seeds_and_batch_independence(inpainting_models):
    """Same seed, same images; image i does not depend on how many are drawn with it. Inpainting with the
    9-channel UNet below strength 1 uses every part of the image's key (ε, step noise: euler_a, the
    posterior ε of the image and of the masked image); img2img runs the same code with fewer parts."""
    _, pipe = inpainting_models
    images, _, _ = inputs(n_images=1)
    run = lambda n, seed=0: pipe.inpaint(  # noqa: E731
        PROMPTS[0], images, a_mask(), strength=0.75, num_inference_steps=STEPS, scheduler="euler_a", seed=seed,
        num_images_per_prompt=n, output_type="latent",
    )  # fmt: skip
    four = run(4)
    np.testing.assert_array_equal(four, run(4))
    # the same random numbers; XLA may round differently for another batch shape (as in test_pipeline)
    np.testing.assert_allclose(run(1)[0], four[0], rtol=1e-4, atol=1e-4)
    assert np.max(np.abs(four[0] - four[1])) > 1e-3  # different keys, different images
    assert np.max(np.abs(run(1, seed=1)[0] - four[0])) > 1e-3


def test_errors(models, inpainting_models):
    _, _, pipe = models
    _, inpainter = inpainting_models
    images, _, _ = inputs(n_images=1)
    for strength in (0.0, 1.5, -0.2):
        with pytest.raises(ValueError, match=rf"strength={strength} must be in \(0, 1\]"):
            pipe.img2img("a cat", images, strength=strength)
    with pytest.raises(ValueError, match=r"strength=0.2 with num_inference_steps=4 runs int\(4 · 0.2\) = 0 steps"):
        pipe.inpaint("a cat", images, a_mask(), strength=0.2, num_inference_steps=4)
    with pytest.raises(ValueError, match="height=36 is not a multiple of 8; the nearest valid sizes are 32 or 40"):
        pipe.img2img("a cat", np.zeros((36, 32, 3), np.float32))
    with pytest.raises(ValueError, match="width=20 is not a multiple of 8; the nearest valid sizes are 16 or 24"):
        pipe.inpaint("a cat", np.zeros((32, 20, 3), np.float32), np.zeros((32, 20), np.float32))
    with pytest.raises(ValueError, match=r"the mask is 16×32 \(W×H\) and the image 32×32"):
        pipe.inpaint("a cat", images, np.zeros((32, 16), np.float32))
    with pytest.raises(ValueError, match="an array of uint8 .divide 8-bit values by 255"):
        pipe.img2img("a cat", np.zeros((32, 32, 3), np.uint8))
    with pytest.raises(ValueError, match=r"image values must be in \[0, 1\]; got \[-1, 1\]"):
        pipe.img2img("a cat", np.linspace(-1, 1, 32 * 32 * 3, dtype=np.float32).reshape(32, 32, 3))
    with pytest.raises(ValueError, match=r"\{'prompts': 2, 'images': 3\}: give as many of each, or one"):
        pipe.img2img(PROMPTS, np.zeros((3, 32, 32, 3), np.float32))
    with pytest.raises(ValueError, match=r"noise of shape \(1, 4, 4, 4\): expected \(2, 4, 4, 4\)"):
        pipe.img2img(PROMPTS, images, noise=np.zeros((1, *LATENT), np.float32))
    with pytest.raises(ValueError, match="give latents or noise, not both"):
        pipe.inpaint("a cat", images, a_mask(), latents=np.zeros((1, *LATENT)), noise=np.zeros((1, *LATENT)))
    with pytest.raises(ValueError, match="takes 9 input channels, not the latents' 4, so it cannot run img2img; it is"):
        inpainter.img2img("a cat", images)
    with pytest.raises(ValueError, match="cannot run txt2img; it is an inpainting model: use inpaint"):
        inpainter("a cat")


def test_stepwise_inpainting_is_the_compiled_chain_to_the_bit(models, inpainting_models):
    """The step-by-step chain (a callback) runs the same steps as the compiled one, to the bit, with
    latent blending (a 4-channel UNet) and with an inpainting UNet's extra input channels."""
    images, noise, vae_noise = inputs(n_images=1)
    kwargs = dict(strength=0.6, num_inference_steps=STEPS, scheduler="euler_a", output_type="latent", seed=2)
    for pipe in (models[2], inpainting_models[1]):
        seen = []
        stepwise = pipe.inpaint(PROMPTS, images, a_mask(), callback=lambda i, t, x, seen=seen: seen.append(i), **kwargs)
        np.testing.assert_array_equal(stepwise, pipe.inpaint(PROMPTS, images, a_mask(), **kwargs))
        assert seen == list(range(len(seen))) and len(seen) > 1


# ---------------------------------------------------------------------------------------------------
# any multiple of 8, for img2img and inpainting too
# ---------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def three_level_models(tmp_path_factory):
    """A 3-level UNet (latents halved twice, so 48×64 and 72×56 images reach odd sizes): (diffusers img2img,
    diffusers inpainting, sdjax)."""
    folder = tmp_path_factory.mktemp("img2img3")
    reference = tiny_pipeline(folder, unet=THREE_LEVEL_UNET)
    return (
        pipeline(diffusers.StableDiffusionImg2ImgPipeline, reference),
        pipeline(diffusers.StableDiffusionInpaintPipeline, reference),
        sdjax.StableDiffusion.from_pretrained(folder / "model"),
    )


@pytest.mark.parametrize("task, height, width, scheduler", [("img2img", 48, 64, "ddim"), ("inpaint", 72, 56, "euler")])
def test_odd_latent_sizes_match_diffusers(three_level_models, known_noise, task, height, width, scheduler):
    img2img, inpaint, pipe = three_level_models
    rng = np.random.default_rng(5)
    images = rng.uniform(size=(1, height, width, 3)).astype(np.float32)
    noise, vae_noise = rng.standard_normal((2, 2, 4, height // 8, width // 8)).astype(np.float32)
    kwargs = dict(negative_prompt=NEGATIVES, num_inference_steps=STEPS, scheduler=scheduler, output_type="np")
    known_noise("models.autoencoders.vae", vae_noise)
    if task == "img2img":
        known_noise("pipelines.stable_diffusion.pipeline_stable_diffusion_img2img", noise)
        images = images.repeat(2, axis=0)  # one image per prompt
        want = diffusers_images(img2img, scheduler, image=images, strength=0.6, num_inference_steps=STEPS)
        got = pipe.img2img(PROMPTS, images, strength=0.6, noise=noise, vae_noise=vae_noise, **kwargs)
    else:
        mask = np.zeros((height, width), np.float32)
        mask[10:50, 7:40] = 1.0
        known_noise("pipelines.stable_diffusion.pipeline_stable_diffusion_inpaint", noise)
        want = diffusers_images(inpaint, scheduler, image=images, mask_image=mask, height=height, width=width,
                                strength=0.75, num_inference_steps=STEPS)  # fmt: skip
        got = pipe.inpaint(PROMPTS, images, mask, strength=0.75, noise=noise, vae_noise=vae_noise[:1].repeat(2, 0),
                           **kwargs)  # fmt: skip
    assert got.shape == want.shape == (2, height, width, 3)
    error = float(np.max(np.abs(got - want)))
    print(f"{task} {height}×{width} {scheduler}: max |sdjax − diffusers| = {error:.2e}")
    assert error <= PARITY_ATOL and np.ptp(want) > 0.01
