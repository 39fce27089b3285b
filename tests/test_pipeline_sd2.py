"""SD 2.x end to end: the 768-v path (v-prediction, OpenCLIP-H-style text tower) against diffusers.

A tiny random SD2-style pipeline (tests/test_convert.py checks its parts one by one): GELU text encoder
padded with "!", Linear projections in the UNet's transformers, float32 attention (SD 2.1's
``upcast_attention``), and stabilityai/stable-diffusion-2-1's scheduler config (DDIM, v-prediction). It is
saved with ``save_pretrained`` and loaded by sdjax; its images must match diffusers' to 1e-3 (as the SD1
pipeline tests; measured ddim 2.7e-6, euler 2.7e-6, dpmpp_2m 4.6e-6). Written as a CompVis single file,
the same model loads with v-prediction by default and gives the same images. SD 2's depth and upscaler
models are refused with a message that says so.
"""

import json

import numpy as np
import pytest

import sdjax
from sdjax import compvis
from sdjax.models import CLIPTextConfig, UNetConfig, VAEConfig
from sdjax.tokenizer import CLIPTokenizer
from tests.helpers import reference_pipeline, reference_text_encoder, reference_unet, reference_vae, save_and_reload

torch = pytest.importorskip("torch")
diffusers = pytest.importorskip("diffusers")
transformers = pytest.importorskip("transformers")

SIZE = 32
# stabilityai/stable-diffusion-2-1's scheduler/scheduler_config.json
SD21_SCHEDULER = {
    "_class_name": "DDIMScheduler",
    "beta_end": 0.012,
    "beta_schedule": "scaled_linear",
    "beta_start": 0.00085,
    "clip_sample": False,
    "num_train_timesteps": 1000,
    "prediction_type": "v_prediction",
    "set_alpha_to_one": False,
    "skip_prk_steps": True,
    "steps_offset": 1,
    "trained_betas": None,
}
SD2_UNET = dict(attention_head_dim=(2, 4), cross_attention_dim=48, use_linear_projection=True, upcast_attention=True)
SD2_TEXT = dict(hidden_size=48, intermediate_size=96, num_attention_heads=4, hidden_act="gelu")


@pytest.fixture(scope="module")
def sd2(tmp_path_factory):
    """(diffusers pipeline, its folder, sdjax pipeline loaded from the folder)."""
    folder = tmp_path_factory.mktemp("sd2")
    torch.manual_seed(0)
    CLIPTokenizer.from_bpe_file(pad_token="!").save_folder(folder / "tokenizer_src")
    reference = reference_pipeline(
        unet=reference_unet(sample_size=SIZE // 8, block_out_channels=(16, 32), **SD2_UNET),
        vae=reference_vae((8, 8, 16, 16), layers_per_block=1, norm_num_groups=4),
        text_encoder=reference_text_encoder(**SD2_TEXT),
        tokenizer=transformers.CLIPTokenizer.from_pretrained(folder / "tokenizer_src"),
        scheduler=diffusers.DDIMScheduler.from_config(SD21_SCHEDULER),
    )
    reference = save_and_reload(reference, folder / "model", SD21_SCHEDULER)
    return reference, folder / "model", sdjax.StableDiffusion.from_pretrained(folder / "model")


def run(pipe, scheduler, latents, **kwargs):
    args = dict(negative_prompt="blurry", num_inference_steps=4, height=SIZE, width=SIZE, output_type="np", **kwargs)
    if isinstance(pipe, sdjax.StableDiffusion):
        return pipe("a red fox in the snow", scheduler=scheduler, latents=latents, **args)
    classes = {"ddim": "DDIMScheduler", "euler": "EulerDiscreteScheduler", "dpmpp_2m": "DPMSolverMultistepScheduler"}
    pipe.scheduler = getattr(diffusers, classes[scheduler]).from_config(SD21_SCHEDULER)
    with torch.no_grad():
        return pipe("a red fox in the snow", latents=torch.from_numpy(latents), **args).images


def start_latents():
    return np.random.default_rng(0).standard_normal((1, 4, SIZE // 8, SIZE // 8)).astype(np.float32)


@pytest.mark.parametrize("scheduler", ["ddim", "dpmpp_2m", pytest.param("euler", marks=pytest.mark.slow)])
def test_v_prediction_images_match_diffusers(sd2, scheduler):
    reference, _, pipe = sd2
    assert pipe.schedule.prediction_type == "v_prediction" and pipe.tokenizer.pad_id == 0
    latents = start_latents()
    expected, got = run(reference, scheduler, latents), run(pipe, scheduler, latents)
    error = float(np.abs(got - expected).max())
    print(f"{scheduler}: max abs error {error:.1e}")
    assert error < 1e-3


def test_single_file_loads_as_v_prediction_and_draws_the_same(sd2, tmp_path):
    """The CompVis file does not say what the UNet predicts: an SD2 file with a 4-channel UNet is read as
    768-v (v-prediction), as the released 2.x files are."""
    _, folder, pipe = sd2
    path = compvis.save_single_file(pipe.components, tmp_path / "sd2-768-v.safetensors")
    configs = dict(
        unet=UNetConfig.from_diffusers(json.loads((folder / "unet" / "config.json").read_text())),
        vae=VAEConfig.from_diffusers(json.loads((folder / "vae" / "config.json").read_text())),
        text_encoder=CLIPTextConfig.from_dict(json.loads((folder / "text_encoder" / "config.json").read_text())),
    )
    single = sdjax.StableDiffusion.from_pretrained(path, **configs)
    assert single.schedule.prediction_type == "v_prediction" and single.tokenizer.pad_id == 0
    latents = start_latents()
    np.testing.assert_allclose(run(single, "ddim", latents), run(pipe, "ddim", latents), atol=1e-6)


def test_depth_and_upscaler_models_are_refused(sd2, tmp_path):
    _, folder, pipe = sd2
    index = json.loads((folder / "model_index.json").read_text())
    for name, message in (
        ("StableDiffusionDepth2ImgPipeline", "depth-to-image, whose UNet takes a depth map"),
        ("StableDiffusionUpscalePipeline", "the x4 upscaler"),
    ):
        (folder / "model_index.json").write_text(json.dumps(index | {"_class_name": name}))
        try:
            with pytest.raises(ValueError, match=f"is a {name} model: .*{message}"):
                sdjax.StableDiffusion.from_pretrained(folder)
        finally:
            (folder / "model_index.json").write_text(json.dumps(index))
    # a single file whose UNet takes 5 channels: the depth model
    from safetensors.numpy import load_file, save_file

    path = compvis.save_single_file(pipe.components, tmp_path / "sd2.safetensors")
    ckpt = load_file(str(path))
    key = "model.diffusion_model.input_blocks.0.0.weight"
    ckpt[key] = np.concatenate([ckpt[key], ckpt[key][:, :1]], axis=1)
    save_file(ckpt, str(tmp_path / "depth.safetensors"))
    with pytest.raises(ValueError, match="SD 2 depth-to-image model .* sdjax does not implement depth conditioning"):
        compvis.load_single_file(tmp_path / "depth.safetensors", vae=pipe.vae.config)
