"""SDXL base against diffusers' ``StableDiffusionXLPipeline``, image for image.

A tiny random SDXL-style pipeline with every structural feature of the real one: two text encoders (a CLIP
ViT-L-style ``CLIPTextModel`` and a bigG-style ``CLIPTextModelWithProjection``, both GELU, the second's
tokenizer padding with "!"), their penultimate hidden states side by side as the context (32 + 32 = 64), the
projected pooled vector and the six size numbers as added conditioning (``text_time``), a UNet with no
attention at its top level and two transformer layers at the next, Linear projections, SDXL's VAE scaling
factor (0.13025) with ``force_upcast``, and SDXL's scheduler config (Euler, "leading" spacing). It is saved
with ``save_pretrained`` and loaded by sdjax.

Images must match to 1e-3 (images in [0, 1], float32, as the SD1 pipeline tests; measured ≤ 3e-6) for euler
and dpmpp_2m at 32×32 and 48×64, with a negative prompt and without one (then c_∅ and its pooled vector are
zeros: ``force_zeros_for_empty_prompt``); three of the eight cases run by default (each sampler, each size,
both kinds of negative), all with ``-m slow``; likewise the kohya LoRA layout.
"""

import json

import numpy as np
import pytest

import sdjax
from sdjax import compvis
from sdjax.models import CLIPTextConfig, UNetConfig, VAEConfig
from sdjax.tokenizer import CLIPTokenizer
from tests.helpers import reference_vae, save_and_reload

torch = pytest.importorskip("torch")
diffusers = pytest.importorskip("diffusers")
transformers = pytest.importorskip("transformers")

# stabilityai/stable-diffusion-xl-base-1.0's scheduler/scheduler_config.json
SDXL_SCHEDULER = {
    "_class_name": "EulerDiscreteScheduler",
    "beta_end": 0.012,
    "beta_schedule": "scaled_linear",
    "beta_start": 0.00085,
    "clip_sample": False,
    "interpolation_type": "linear",
    "num_train_timesteps": 1000,
    "prediction_type": "epsilon",
    "sample_max_value": 1.0,
    "set_alpha_to_one": False,
    "skip_prk_steps": True,
    "steps_offset": 1,
    "timestep_spacing": "leading",
    "trained_betas": None,
    "use_karras_sigmas": False,
}
CLASSES = {"euler": "EulerDiscreteScheduler", "dpmpp_2m": "DPMSolverMultistepScheduler"}
TEXT = dict(vocab_size=49408, hidden_size=32, intermediate_size=37, num_attention_heads=4, num_hidden_layers=3,
            hidden_act="gelu", projection_dim=32)  # fmt: skip


@pytest.fixture(scope="module")
def sdxl(tmp_path_factory):
    """(diffusers pipeline, its folder, sdjax pipeline loaded from the folder)."""
    folder = tmp_path_factory.mktemp("sdxl")
    torch.manual_seed(0)
    unet = diffusers.UNet2DConditionModel(
        sample_size=4,
        block_out_channels=(32, 64),
        layers_per_block=2,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        attention_head_dim=(2, 4),
        use_linear_projection=True,
        addition_embed_type="text_time",
        addition_time_embed_dim=8,
        transformer_layers_per_block=(1, 2),
        projection_class_embeddings_input_dim=6 * 8 + 32,
        cross_attention_dim=64,
        norm_num_groups=8,
    ).eval()
    vae = reference_vae((8, 8, 16, 16), layers_per_block=1, norm_num_groups=4, scaling_factor=0.13025)
    config = transformers.CLIPTextConfig(**TEXT)
    for name, pad in (("tokenizer_src", "<|endoftext|>"), ("tokenizer_2_src", "!")):
        CLIPTokenizer.from_bpe_file(pad_token=pad).save_folder(folder / name)
    reference = diffusers.StableDiffusionXLPipeline(
        vae=vae,
        text_encoder=transformers.CLIPTextModel(config).eval(),
        text_encoder_2=transformers.CLIPTextModelWithProjection(config).eval(),
        tokenizer=transformers.CLIPTokenizer.from_pretrained(folder / "tokenizer_src"),
        tokenizer_2=transformers.CLIPTokenizer.from_pretrained(folder / "tokenizer_2_src"),
        unet=unet,
        scheduler=diffusers.EulerDiscreteScheduler.from_config(SDXL_SCHEDULER),
    )
    reference = save_and_reload(reference, folder / "model", SDXL_SCHEDULER)
    return reference, folder / "model", sdjax.StableDiffusion.from_pretrained(folder / "model")


def draw(pipe, scheduler, size, negative, seed=0):
    height, width = size
    latents = np.random.default_rng(seed).standard_normal((1, 4, height // 8, width // 8)).astype(np.float32)
    args = dict(negative_prompt=negative, num_inference_steps=4, height=height, width=width, output_type="np",
                guidance_scale=5.0)  # fmt: skip
    if isinstance(pipe, sdjax.StableDiffusion):
        return pipe("a red fox in the snow", scheduler=scheduler, latents=latents, **args)
    pipe.scheduler = getattr(diffusers, CLASSES[scheduler]).from_config(SDXL_SCHEDULER)
    with torch.no_grad():
        return pipe("a red fox in the snow", latents=torch.from_numpy(latents), **args).images


CASES = [("euler", (32, 32), None), ("euler", (48, 64), "blurry"), ("dpmpp_2m", (32, 32), "blurry")]
SLOW_CASES = [("dpmpp_2m", (48, 64), None), ("euler", (32, 32), "blurry"), ("euler", (48, 64), None),
              ("dpmpp_2m", (32, 32), None), ("dpmpp_2m", (48, 64), "blurry")]  # fmt: skip


@pytest.mark.parametrize(
    "scheduler, size, negative", CASES + [pytest.param(*case, marks=pytest.mark.slow) for case in SLOW_CASES]
)
def test_images_match_diffusers(sdxl, scheduler, size, negative):
    reference, _, pipe = sdxl
    assert pipe.components.version == "sdxl" and pipe.components.force_zeros_for_empty_prompt
    expected, got = draw(reference, scheduler, size, negative), draw(pipe, scheduler, size, negative)
    error = float(np.abs(got - expected).max())
    print(f"{scheduler} {size} negative={negative!r}: max abs error {error:.1e}")
    assert error < 1e-3


def test_size_conditioning_matches_diffusers(sdxl):
    """original_size, crops_coords_top_left and target_size reach the UNet as diffusers passes them."""
    reference, _, pipe = sdxl
    latents = np.random.default_rng(1).standard_normal((1, 4, 4, 4)).astype(np.float32)
    sizes = dict(original_size=(64, 96), crops_coords_top_left=(8, 16), target_size=(32, 32))
    args = dict(num_inference_steps=3, height=32, width=32, output_type="np", guidance_scale=5.0)
    reference.scheduler = diffusers.EulerDiscreteScheduler.from_config(SDXL_SCHEDULER)
    with torch.no_grad():
        expected = reference("a cat", latents=torch.from_numpy(latents), **sizes, **args).images
    got = pipe("a cat", latents=latents, scheduler="euler", **sizes, **args)
    assert np.abs(got - expected).max() < 1e-3
    assert np.abs(got - pipe("a cat", latents=latents, scheduler="euler", **args)).max() > 1e-4  # they matter
    with pytest.raises(ValueError, match="SDXL's; this is an SD model"):
        sdjax.StableDiffusion(pipe.components.__class__(
            unet=pipe.unet, vae=pipe.vae, text_encoder=pipe.text_encoder, tokenizer=pipe.tokenizer,
            schedule=pipe.schedule))("a cat", original_size=(64, 64))  # fmt: skip


def test_single_file_layout_agrees_with_diffusers_converter(sdxl, tmp_path):
    """sdjax → SDXL single file → diffusers' own single-file conversion gives back the reference weights,
    exactly: the UNet with its label_emb, the VAE, ViT-L under conditioner.embedders.0.transformer and bigG
    (OpenCLIP names, the projection stored transposed) under conditioner.embedders.1.model."""
    from safetensors.torch import load_file

    single_file_utils = pytest.importorskip("diffusers.loaders.single_file_utils")
    reference, _, pipe = sdxl
    path = compvis.save_single_file(pipe.components, tmp_path / "sdxl.safetensors")
    ckpt = load_file(str(path))
    assert compvis.detect_version({k: None for k in ckpt}) == "sdxl"
    converted = {
        "unet": single_file_utils.convert_ldm_unet_checkpoint(ckpt, dict(reference.unet.config)),
        "vae": single_file_utils.convert_ldm_vae_checkpoint(ckpt, dict(reference.vae.config)),
        "text_encoder": single_file_utils.convert_ldm_clip_checkpoint(ckpt, "conditioner.embedders.0.transformer."),
        "text_encoder_2": single_file_utils.convert_open_clip_checkpoint(
            reference.text_encoder_2, ckpt, prefix="conditioner.embedders.1.model."
        ),
    }
    names = lambda sd: {k.removeprefix("text_model."): v for k, v in sd.items() if not k.endswith("position_ids")}  # noqa: E731
    for name, got in converted.items():
        want, got = names(getattr(reference, name).state_dict()), names(got)
        assert set(got) == set(want), (name, sorted(set(got) ^ set(want))[:5])
        assert all(torch.equal(got[k], want[k]) for k in want), name


def test_single_file_draws_what_the_folder_draws(sdxl, tmp_path):
    _, folder, pipe = sdxl
    path = compvis.save_single_file(pipe.components, tmp_path / "sdxl.safetensors")
    read = lambda part: json.loads((folder / part / "config.json").read_text())  # noqa: E731
    single = sdjax.StableDiffusion.from_pretrained(
        path,
        unet=UNetConfig.from_diffusers(read("unet")),
        vae=VAEConfig.from_diffusers(read("vae")),
        text_encoder=CLIPTextConfig.from_dict(read("text_encoder")),
        text_encoder_2=CLIPTextConfig.from_dict(read("text_encoder_2")),
    )
    assert single.components.version == "sdxl" and single.components.scheduler_config["_class_name"] == (
        "EulerDiscreteScheduler"
    )
    for negative in (None, "blurry"):
        np.testing.assert_allclose(
            draw(single, "euler", (32, 32), negative), draw(pipe, "euler", (32, 32), negative), atol=1e-6
        )


def test_refiner_and_unknown_files_are_refused(sdxl, tmp_path):
    _, folder, pipe = sdxl
    with pytest.raises(ValueError, match="SDXL's refiner .* sdjax runs SDXL base"):
        compvis.detect_version({"model.diffusion_model.x": None, "conditioner.embedders.0.model.ln_final.weight": None})
    index = json.loads((folder / "model_index.json").read_text())
    (folder / "model_index.json").write_text(json.dumps(index | {"_class_name": "StableDiffusionXLImg2ImgPipeline"}))
    try:
        with pytest.raises(ValueError, match="StableDiffusionXLImg2ImgPipeline model: SDXL's refiner"):
            sdjax.StableDiffusion.from_pretrained(folder)
    finally:
        (folder / "model_index.json").write_text(json.dumps(index))
    with pytest.raises(NotImplementedError, match="does not write SDXL models yet"):
        sdjax.convert.save(pipe.components, tmp_path / "out")


@pytest.mark.parametrize("layout", ["diffusers", pytest.param("kohya", marks=pytest.mark.slow)])
def test_lora_files_load_in_diffusers_and_sdjax(sdxl, tmp_path, layout):
    """A LoRA on the UNet and both text encoders, written by sdjax in each layout (kohya names the encoders
    lora_te1_ / lora_te2_), loaded by diffusers' StableDiffusionXLPipeline.load_lora_weights and by a fresh
    sdjax pipeline: the same images as the pipeline that made it."""
    import jax
    from flax import nnx

    from sdjax import lora

    _, folder, plain = sdxl
    pipe = sdjax.StableDiffusion.from_pretrained(folder)
    for i, module in enumerate((pipe.unet, pipe.text_encoder, pipe.text_encoder_2)):
        lora.add_lora(module, lora.LoRAConfig(rank=2, alpha=4.0), rngs=nnx.Rngs(i))
        for j, layer in enumerate(lora.lora_layers(module).values()):
            layer.lora_B.set_value(0.2 * jax.random.normal(jax.random.key(10 * i + j), layer.lora_B.shape))
    path = tmp_path / f"{layout}.safetensors"
    lora.save_lora(path, pipe.unet, pipe.text_encoder, format=layout, text_encoder_2=pipe.text_encoder_2)
    from safetensors import safe_open

    with safe_open(str(path), framework="numpy") as f:
        prefixes = {k.split(".")[0] if layout == "diffusers" else k[:9] for k in f.keys()}
    assert prefixes == ({"unet", "text_encoder", "text_encoder_2"} if layout == "diffusers" else
                        {"lora_unet", "lora_te1_", "lora_te2_"})  # fmt: skip

    expected = draw(pipe, "euler", (32, 32), "blurry")
    assert np.abs(expected - draw(plain, "euler", (32, 32), "blurry")).max() > 1e-3  # the LoRA changes the image
    reference = diffusers.StableDiffusionXLPipeline.from_pretrained(folder)
    reference.set_progress_bar_config(disable=True)
    reference.load_lora_weights(str(path))
    assert np.abs(draw(reference, "euler", (32, 32), "blurry") - expected).max() < 1e-3
    fresh = sdjax.StableDiffusion.from_pretrained(folder)
    report = fresh.load_lora(path)
    assert report["format"] == layout and report["text_encoder_2"] and report["text_encoder"]
    assert np.abs(draw(fresh, "euler", (32, 32), "blurry") - expected).max() < 1e-5


def test_img2img_matches_diffusers(sdxl, monkeypatch):
    """SDXL base as image to image (diffusers' StableDiffusionXLImg2ImgPipeline on the same components, no
    aesthetic score: the size numbers are the image's), the posterior's and the start's noise given to both."""
    reference, _, pipe = sdxl
    img2img = diffusers.StableDiffusionXLImg2ImgPipeline(**reference.components)
    img2img.set_progress_bar_config(disable=True)
    img2img.scheduler = diffusers.EulerDiscreteScheduler.from_config(SDXL_SCHEDULER)
    rng = np.random.default_rng(2)
    image = rng.uniform(size=(1, 48, 64, 3)).astype(np.float32)
    noise, vae_noise = rng.standard_normal((2, 1, 4, 6, 8)).astype(np.float32)
    for module, array in (("models.autoencoders.vae", vae_noise),
                          ("pipelines.stable_diffusion_xl.pipeline_stable_diffusion_xl_img2img", noise)):  # fmt: skip
        monkeypatch.setattr(f"diffusers.{module}.randn_tensor", lambda shape, a=array, **_: torch.from_numpy(a.copy()))
    args = dict(strength=0.6, num_inference_steps=4, guidance_scale=5.0, output_type="np")
    with torch.no_grad():
        expected = img2img("a red fox in the snow", image=image, **args).images
    got = pipe.img2img("a red fox in the snow", image, scheduler="euler", noise=noise, vae_noise=vae_noise, **args)
    error = float(np.abs(got - expected).max())
    print(f"SDXL img2img 48×64: max abs error {error:.1e}")
    assert got.shape == (1, 48, 64, 3) and error < 1e-3


def test_cli_runs_an_sdxl_folder(sdxl, tmp_path, capsys):
    """``sdjax txt2img --ckpt`` on an SDXL folder: detected, drawn, its metadata redraws it."""
    from PIL import Image

    from sdjax.cli import main

    _, folder, pipe = sdxl
    out = tmp_path / "out"
    args = ["txt2img", "--ckpt", str(folder), "--prompt", "a (red:1.2) fox", "--prompt-syntax", "a1111", "--H", "32",
            "--W", "32", "--ddim_steps", "2", "--sampler", "euler", "--scale", "5", "--precision", "full",
            "--outdir", str(out), "--skip_grid"]  # fmt: skip
    assert main(args) == 0
    assert "(SDXL, float32)" in capsys.readouterr().out
    with Image.open(out / "samples" / "00000.png") as image:
        pixels, meta = np.asarray(image), dict(image.text)
    redrawn = pipe(meta["prompt"], prompt_syntax=meta["prompt_syntax"], negative_prompt=meta["negative_prompt"],
                   guidance_scale=float(meta["scale"]), num_inference_steps=2, scheduler="euler", height=32, width=32,
                   seed=int(meta["seed"]))[0]  # fmt: skip
    np.testing.assert_array_equal(np.asarray(redrawn), pixels)
