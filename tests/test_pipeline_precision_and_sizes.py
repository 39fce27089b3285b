"""Sizes and precision, against diffusers' ``StableDiffusionPipeline`` where it has an answer (the tiny random
pipelines of :func:`tests.helpers.tiny_pipeline`, as in tests/test_pipeline.py):

* any multiple of 8: a 3-level UNet halves 48×64 and 72×56 images' latents to odd sizes, and the up path must
  resize to each skip connection as diffusers' does (measured: within 4e-6 of diffusers);
* no black images: non-finite latents raise a named error; a float16 VAE that overflows decodes in float32.
"""

import dataclasses
import warnings

import jax.numpy as jnp
import numpy as np
import pytest

import sdjax
from tests.helpers import NEGATIVES, PROMPTS, THREE_LEVEL_UNET, diffusers_images, tiny_pipeline

torch = pytest.importorskip("torch")
diffusers = pytest.importorskip("diffusers")

PARITY_ATOL = 1e-3


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    """The tiny 2-level pipeline's folder."""
    folder = tmp_path_factory.mktemp("pipeline")
    tiny_pipeline(folder)
    return folder / "model"


def start_latents(n=2, size=32, seed=0):
    return np.random.default_rng(seed).standard_normal((n, 4, size // 8, size // 8)).astype(np.float32)


@pytest.fixture(scope="module")
def three_levels(tmp_path_factory):
    """(diffusers pipeline, sdjax pipeline) with a 3-level UNet: latents halved twice."""
    folder = tmp_path_factory.mktemp("pipeline3")
    return tiny_pipeline(folder, unet=THREE_LEVEL_UNET), sdjax.StableDiffusion.from_pretrained(folder / "model")


@pytest.mark.parametrize(
    "height, width, scheduler",
    # the default run: each size and each sampler once; the other three pairs under -m slow
    [(48, 64, "ddim"), (72, 56, "euler"), (72, 56, "dpmpp_2m")]
    + [pytest.param(*c, marks=pytest.mark.slow) for c in [(48, 64, "euler"), (48, 64, "dpmpp_2m"), (72, 56, "ddim")]],
)
def test_any_multiple_of_8_matches_diffusers(three_levels, height, width, scheduler):
    """Sizes diffusers and the web UIs run and that a UNet cannot halve evenly twice (latents 6×8 → 3×4 → 2×2,
    9×7 → 5×4 → 3×2): the up path resizes to each skip connection, as diffusers' does."""
    reference, pipe = three_levels
    assert pipe.size_multiple == 8
    latents = np.random.default_rng(3).standard_normal((2, 4, height // 8, width // 8)).astype(np.float32)
    want = diffusers_images(reference, scheduler, height=height, width=width, num_inference_steps=3,
                            guidance_scale=7.5, latents=torch.from_numpy(latents))  # fmt: skip
    got = pipe(PROMPTS, negative_prompt=NEGATIVES, num_inference_steps=3, guidance_scale=7.5, scheduler=scheduler,
               latents=latents, height=height, width=width, output_type="np")  # fmt: skip
    assert got.shape == want.shape == (2, height, width, 3)
    error = float(np.max(np.abs(got - want)))
    print(f"{scheduler} {height}×{width}: max |sdjax − diffusers| = {error:.2e}")
    assert error <= PARITY_ATOL and np.ptp(want) > 0.01


def overflowing(folder, dtype, force_upcast):
    """The tiny pipeline with its decoder's first 1×1 convolution scaled 20,000×: its weights stay below float16's
    65,504, its outputs (latents up to ~25 after unscaling) do not."""
    pipe = sdjax.StableDiffusion.from_pretrained(folder, dtype=dtype)
    kernel = pipe.vae.post_quant_conv.kernel
    kernel.set_value(kernel[...] * 20_000)
    pipe.vae.config = dataclasses.replace(pipe.vae.config, force_upcast=force_upcast)
    return pipe


def test_float16_vae_overflow_is_decoded_in_float32(folder):
    """No black images: SD's VAE overflows float16; with ``force_upcast`` (diffusers' default, SD's config) the
    float16 pipeline decodes in float32, and without it a non-finite float16 decode is redone in float32, with a
    warning. Either way the images are the float32 pipeline's, to float16's precision in the UNet."""
    kwargs = dict(num_inference_steps=2, scheduler="ddim", latents=start_latents(), output_type="np")
    reference = overflowing(folder, "float32", True)(PROMPTS, **kwargs)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no warning: decoded in float32 from the start
        upcast = overflowing(folder, "float16", True)(PROMPTS, **kwargs)
    half = overflowing(folder, "float16", False)
    with pytest.warns(UserWarning, match="the VAE decoded non-finite values in float16: decoding again in float32"):
        retried = half(PROMPTS, **kwargs)
    for images in (upcast, retried):
        assert np.isfinite(images).all() and np.max(np.abs(images - reference)) < 0.05
    # the overflow is real: this VAE in float16, asked directly, decodes the final latents to non-finite values
    z = half(PROMPTS, **{**kwargs, "output_type": "latent"}).transpose(0, 2, 3, 1) / half.vae.config.scaling_factor
    assert not np.isfinite(np.asarray(half.vae.decode(jnp.asarray(z, jnp.float16)), np.float32)).all()


def test_non_finite_latents_raise_instead_of_black_images(folder):
    pipe = sdjax.StableDiffusion.from_pretrained(folder)
    bias = pipe.unet.conv_out.bias
    bias.set_value(bias[...].at[0].set(jnp.nan))
    message = r"2 of 2 images have non-finite latents after 3 steps of euler in float32; nothing was decoded"
    with pytest.raises(FloatingPointError, match=message):
        pipe(PROMPTS, num_inference_steps=3, scheduler="euler")
