"""``sdjax txt2img`` and ``sdjax img2img`` end to end, in process, on a tiny random model.

The model has SD1's structure with a few channels per layer (a 4-level VAE, so latents are H/8 ×
W/8; a 2-level cross-attention UNet, so sizes are multiples of 16; a 2-layer CLIP text encoder
with CLIP's real tokenizer), built in sdjax and saved in sdjax's own format: no torch needed.
Images are 32 × 32, two sampling steps.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from PIL import Image

import sdjax
from sdjax import convert, preprocessors, tiny_sd
from sdjax.cli import main
from sdjax.models.clip import CLIPTextConfig, CLIPTextModel
from sdjax.models.unet import UNet2D, UNetConfig
from sdjax.models.vae import AutoencoderKL, VAEConfig
from sdjax.schedulers import NoiseSchedule
from sdjax.tokenizer import CLIPTokenizer

SIZE = 32  # the tiny model's native size: latents 4 × 4
STEPS = ["--ddim_steps", "2"]
FULL = ["--precision", "full"]  # every run that samples is float32, to share compilations (the default is bf16)
SAMPLE_KEYS = {"prompt", "negative_prompt", "seed", "index", "batch_size", "sampler", "steps", "scale", "eta", "size"}
SAMPLE_KEYS |= {"model", "dtype", "prompt_syntax", "truncate_prompts", "sdjax_version", "parameters"}


def random_module(cls, config, rng: np.random.Generator):
    """``cls(config)`` with random weights drawn by NumPy (Flax's eager initialisation compiles a
    kernel per parameter shape: 40 s for these three networks on the 2-core CPU)."""
    module = convert.abstract(cls, config)

    def draw(path, leaf):
        name = path[-2].key  # the path ends [..., name, .value]
        if name == "scale":
            return jnp.ones(leaf.shape)
        std = {"bias": 0.02, "embedding": 0.02}.get(name, 1 / np.sqrt(np.prod(leaf.shape[:-1])))  # kernels: 1/√fan-in
        return jnp.asarray(std * rng.standard_normal(leaf.shape), jnp.float32)

    nnx.update(module, jax.tree_util.tree_map_with_path(draw, nnx.state(module, nnx.Param)))
    return module


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    """The path of a tiny random SD1-style model saved with ``convert.save_sdjax``."""
    rng = np.random.default_rng(0)
    unet = UNetConfig(
        sample_size=SIZE // 8,
        in_channels=4,
        out_channels=4,
        block_out_channels=(16, 32),
        layers_per_block=1,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        mid_block_type="UNetMidBlock2DCrossAttn",
        attention_head_dim=None,
        num_attention_heads=4,
        norm_num_groups=8,
        cross_attention_dim=32,
    )
    vae = VAEConfig(block_out_channels=(8, 8, 16, 16), norm_num_groups=4, scaling_factor=0.18215)
    text = CLIPTextConfig(hidden_size=32, intermediate_size=64, num_attention_heads=4, num_hidden_layers=2)
    components = convert.Components(
        unet=random_module(UNet2D, unet, rng),
        vae=random_module(AutoencoderKL, vae, rng),
        text_encoder=random_module(CLIPTextModel, text, rng),
        tokenizer=CLIPTokenizer.from_bpe_file(),
        schedule=NoiseSchedule.sd15(),
    )
    return str(convert.save_sdjax(components, tmp_path_factory.mktemp("cli") / "tiny-sd"))


def pngs(folder):
    return sorted(p.name for p in folder.glob("*.png"))


def read_png(path) -> tuple[np.ndarray, dict[str, str]]:
    """Pixels and text chunks."""
    with Image.open(path) as image:
        return np.asarray(image), dict(image.text)


def regenerate(meta: dict[str, str]) -> np.ndarray:
    """A sample drawn again from nothing but its metadata (the recipe of sdjax.txt2img's docstring)."""
    pipe = sdjax.StableDiffusion.from_pretrained(meta["model"], dtype=meta["dtype"])
    size = tuple(map(int, meta["size"].split("x")))
    kwargs = dict(
        negative_prompt=meta["negative_prompt"],
        num_inference_steps=int(meta["steps"]),
        guidance_scale=float(meta["scale"]),
        scheduler=meta["sampler"],
        eta=float(meta["eta"]),
        seed=int(meta["seed"]),
        num_images_per_prompt=int(meta["batch_size"]),
        prompt_syntax=meta["prompt_syntax"],
        truncate_prompts=meta["truncate_prompts"] == "True",
    )
    if "init_image" in meta:
        with Image.open(meta["init_image"]) as init:
            image = init.convert("RGB").resize(size, Image.LANCZOS)
        images = pipe.img2img(meta["prompt"], image, strength=float(meta["strength"]), **kwargs)
    else:
        images = pipe(meta["prompt"], width=size[0], height=size[1], **kwargs)
    return np.asarray(images[int(meta["index"])])


def test_txt2img_samples_grid_metadata_and_regeneration(model, tmp_path, capsys):
    out = tmp_path / "out"
    args = ["txt2img", "--ckpt", model, "--outdir", str(out), "--prompt", "a red bicycle", *STEPS, *FULL]
    assert main([*args, "--negative_prompt", "blurry", "--n_samples", "2", "--n_iter", "2", "--seed", "7"]) == 0
    text = capsys.readouterr().out
    assert "batch 1/2: 2 × 'a red bicycle', seed 7" in text and "batch 2/2: 2 × 'a red bicycle', seed 8" in text
    assert f"wrote 4 images to {out / 'samples'}: 00000.png … 00003.png" in text
    assert f"wrote the grid {out / 'grid-0000.png'}" in text

    assert pngs(out / "samples") == [f"{i:05}.png" for i in range(4)]
    pixels, metas = zip(*(read_png(out / "samples" / f"{i:05}.png") for i in range(4)))
    run = {
        "prompt": "a red bicycle",
        "negative_prompt": "blurry",
        "batch_size": "2",
        "sampler": "ddim",  # CompVis's default
        "steps": "2",
        "scale": "7.5",
        "eta": "0.0",
        "size": f"{SIZE}x{SIZE}",
        "model": model,
        "dtype": "float32",
        "prompt_syntax": "none",
        "truncate_prompts": "False",
        "sdjax_version": sdjax.__version__,
    }
    for i, meta in enumerate(metas):
        assert pixels[i].shape == (SIZE, SIZE, 3)
        assert meta.pop("parameters").startswith("a red bicycle\nNegative prompt: blurry\nSteps: 2, ")
        assert meta == run | {"seed": str(7 + i // 2), "index": str(i % 2)}
    assert read_png(out / "samples" / "00003.png")[1]["parameters"] == (
        "a red bicycle\nNegative prompt: blurry\nSteps: 2, Sampler: DDIM, CFG scale: 7.5, Seed: 8, "
        f"Size: 32x32, Model: tiny-sd, Batch size: 2, Batch pos: 1, Version: sdjax {sdjax.__version__}"
    )

    # from its metadata alone, bit for bit; and the images do differ
    np.testing.assert_array_equal(regenerate(metas[3]), pixels[3])
    assert np.abs(pixels[3].astype(int) - pixels[2]).max() > 10 and np.ptp(pixels[3]) > 50

    # the grid: n_rows (default n_samples) images per row, so one batch per row, 1-pixel borders
    grid, meta = read_png(out / "grid-0000.png")
    assert grid.shape == (2 * (SIZE + 1) + 1, 2 * (SIZE + 1) + 1, 3)
    assert meta.pop("parameters") and meta == run | {"seed": "7"}
    np.testing.assert_array_equal(grid[SIZE + 2 : 2 * SIZE + 2, SIZE + 2 : 2 * SIZE + 2], pixels[3])

    # a second run numbers on; --n_rows 1 stacks its two images
    assert main([*args, "--n_samples", "2", "--n_rows", "1"]) == 0
    assert pngs(out / "samples") == [f"{i:05}.png" for i in range(6)]
    assert pngs(out) == ["grid-0000.png", "grid-0001.png"]
    assert read_png(out / "grid-0001.png")[0].shape == (2 * (SIZE + 1) + 1, SIZE + 2, 3)


def test_prompts_from_file_skip_grid_and_skip_save(model, tmp_path, capsys):
    prompts = ["a red bicycle", "café au lait ☕", "a photo of an astronaut riding a horse on the moon"]
    (tmp_path / "prompts.txt").write_text("\n".join(prompts[:2]) + "\n\n" + prompts[2] + "\n", encoding="utf-8")
    common = ["txt2img", "--ckpt", model, "--from-file", str(tmp_path / "prompts.txt"), "--n_samples", "2", *STEPS]
    out = tmp_path / "out"
    assert main([*common, "--outdir", str(out), "--skip_grid", *FULL, "--plms"]) == 0
    assert pngs(out) == []
    assert pngs(out / "samples") == [f"{i:05}.png" for i in range(6)]
    pixels, metas = zip(*(read_png(out / "samples" / f"{i:05}.png") for i in range(6)))
    assert [(m["prompt"], m["seed"], m["index"]) for m in metas] == [
        (prompt, str(42 + b), str(i)) for b, prompt in enumerate(prompts) for i in range(2)
    ]
    assert {(m["sampler"], m["dtype"]) for m in metas} == {("plms", "float32")}
    np.testing.assert_array_equal(regenerate(metas[3]), pixels[3])  # its non-Latin-1 prompt went in an iTXt chunk

    out = tmp_path / "grid-only"
    assert main([*common, "--outdir", str(out), "--skip_save", *FULL, "--plms"]) == 0
    assert pngs(out / "samples") == [] and pngs(out) == ["grid-0000.png"]
    grid, meta = read_png(out / "grid-0000.png")
    assert grid.shape == (3 * (SIZE + 1) + 1, 2 * (SIZE + 1) + 1, 3)  # one prompt's batch per row
    assert meta["prompt"] == "\n".join(prompts)
    assert "wrote the grid" in capsys.readouterr().out


def test_prompt_syntax_flag_is_recorded_and_regenerates(model, tmp_path):
    """--prompt-syntax a1111 weights "(red:1.4)": a different image from the literal text, and its metadata
    redraws it."""
    common = ["txt2img", "--ckpt", model, "--prompt", "a (red:1.4) bicycle", "--skip_grid", *STEPS, *FULL]
    for syntax in ("a1111", "none"):
        assert main([*common, "--outdir", str(tmp_path / syntax), "--prompt-syntax", syntax]) == 0
    (weighted, meta), (literal, _) = (read_png(tmp_path / s / "samples" / "00000.png") for s in ("a1111", "none"))
    assert meta["prompt_syntax"] == "a1111" and meta["truncate_prompts"] == "False"
    assert np.abs(weighted.astype(int) - literal).max() > 0
    np.testing.assert_array_equal(regenerate(meta), weighted)


def test_web_ui_sampler_names(model, tmp_path):
    """--sampler "DPM++ 2M Karras": the sampler the web UIs call so (dpmpp_2m on Karras σ's), written
    into the PNG info under that name, and redrawn from the metadata."""
    common = ["txt2img", "--ckpt", model, "--prompt", "a red bicycle", "--skip_grid", *STEPS, *FULL]
    assert main([*common, "--outdir", str(tmp_path / "karras"), "--sampler", "DPM++ 2M Karras"]) == 0
    assert main([*common, "--outdir", str(tmp_path / "plain"), "--sampler", "dpmpp_2m"]) == 0
    (karras, meta), (plain, _) = (read_png(tmp_path / d / "samples" / "00000.png") for d in ("karras", "plain"))
    assert meta["sampler"] == "DPM++ 2M Karras" and ", Sampler: DPM++ 2M Karras, " in meta["parameters"]
    assert np.abs(karras.astype(int) - plain).max() > 0  # other σ's, another image
    np.testing.assert_array_equal(regenerate(meta), karras)


def test_controlnet_flags(model, tmp_path):
    """--controlnet PATH:SCALE with --control IMAGE: the pipeline's ControlNet call (same pixels), the size taken
    from the condition image, both recorded in the PNG (mismatched counts: test_input_errors_are_one_line)."""
    from sdjax.convert import load_controlnet, save_controlnet
    from sdjax.models.controlnet import ControlNet, ControlNetConfig

    pipe = sdjax.StableDiffusion.from_pretrained(model)
    cfg = ControlNetConfig(pipe.unet.config, conditioning_embedding_out_channels=(4, 8, 8, 16))
    folder = save_controlnet(random_module(ControlNet, cfg, np.random.default_rng(3)), tmp_path / "cn")
    cond = np.random.default_rng(4).integers(0, 256, (SIZE, SIZE, 3), dtype=np.uint8)
    Image.fromarray(cond).save(tmp_path / "edges.png")
    common = ["txt2img", "--ckpt", model, "--prompt", "a red bicycle", "--skip_grid", *STEPS, *FULL]
    flags = ["--controlnet", f"{folder}:0.7", "--control", str(tmp_path / "edges.png")]
    assert main([*common, "--outdir", str(tmp_path / "on"), *flags]) == 0
    assert main([*common, "--outdir", str(tmp_path / "off")]) == 0
    (on, meta), (off, _) = (read_png(tmp_path / d / "samples" / "00000.png") for d in ("on", "off"))
    assert meta["controlnet"] == f"{folder}:0.7" and meta["control"] == str(tmp_path / "edges.png")
    want = pipe("a red bicycle", controlnet=load_controlnet(folder), control_image=cond / 255.0,
                controlnet_conditioning_scale=0.7, num_inference_steps=2, scheduler="ddim", seed=42)[0]  # fmt: skip
    np.testing.assert_array_equal(on, np.asarray(want))
    assert np.abs(on.astype(int) - off).max() > 0
    # --preprocess canny: the condition is the picture's Canny edges (sdjax.preprocessors), recorded too
    assert main([*common, "--outdir", str(tmp_path / "canny"), *flags, "--preprocess", "canny"]) == 0
    edged, meta = read_png(tmp_path / "canny" / "samples" / "00000.png")
    assert meta["preprocess"] == "canny"
    want = pipe("a red bicycle", controlnet=load_controlnet(folder), control_image=preprocessors.canny(cond / 255.0),
                controlnet_conditioning_scale=0.7, num_inference_steps=2, scheduler="ddim", seed=42)[0]  # fmt: skip
    np.testing.assert_array_equal(edged, np.asarray(want))


def test_hires_fix(model, tmp_path):
    """hires_fix = txt2img, Lanczos ×scale, img2img at strength; --hires SCALE:STRENGTH runs it and records it."""
    from sdjax.hires import hires_fix

    pipe = sdjax.StableDiffusion.from_pretrained(model)
    kwargs = dict(num_inference_steps=2, scheduler="ddim", seed=42)
    got = hires_fix(pipe, "a red bicycle", scale=1.5, strength=0.5, output_type="np", **kwargs)
    assert got.shape == (1, 48, 48, 3)
    small = pipe("a red bicycle", output_type="pil", **kwargs)[0].resize((48, 48), Image.LANCZOS)
    want = pipe.img2img(["a red bicycle"], np.asarray(small, np.float32)[None] / 255.0, strength=0.5, output_type="np",
                        **kwargs)  # fmt: skip
    np.testing.assert_array_equal(got, want)
    with pytest.raises(ValueError, match="enlarge by more than 1"):
        hires_fix(pipe, "a red bicycle", scale=1.0)
    common = ["txt2img", "--ckpt", model, "--prompt", "a red bicycle", "--skip_grid", *STEPS, *FULL]
    assert main([*common, "--outdir", str(tmp_path), "--hires", "1.5:0.5"]) == 0
    image, meta = read_png(tmp_path / "samples" / "00000.png")
    assert image.shape == (48, 48, 3) and meta["hires"] == "1.5:0.5"


def test_img2img(model, tmp_path, capsys):
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 256, (37, 50, 3), np.uint8)).save(tmp_path / "init.png")
    out = tmp_path / "out"
    args = ["img2img", "--ckpt", model, "--init-img", str(tmp_path / "init.png"), "--outdir", str(out), *STEPS]
    assert main([*args, "--n_samples", "2", "--strength", "0.5", *FULL]) == 0
    assert "init image 50×37 resized to 48×32 (this model takes multiples of 8)" in capsys.readouterr().out
    assert pngs(out / "samples") == ["00000.png", "00001.png"] and pngs(out) == ["grid-0000.png"]
    pixels, meta = read_png(out / "samples" / "00001.png")
    assert pixels.shape == (32, 48, 3)
    assert set(meta) == SAMPLE_KEYS | {"init_image", "strength"}
    assert (meta["init_image"], meta["strength"], meta["size"]) == (str(tmp_path / "init.png"), "0.5", "48x32")
    assert "Denoising strength: 0.5" in meta["parameters"]
    np.testing.assert_array_equal(regenerate(meta), pixels)


def run_error(capsys, args):
    """(exit code, stderr) of a run expected to fail on its input, which must be one line."""
    code = main(args)
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "Traceback" not in err, err
    return code, err.strip()


def test_input_errors_are_one_line(model, tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(tiny_sd, "BUNDLE", tmp_path / "no-bundle")  # a broken install: no --ckpt cannot fall back
    (tmp_path / "empty.txt").write_text("\n  \n")
    (tmp_path / "bad.safetensors").write_bytes(b"not a safetensors file")
    (tmp_path / "not-a-model").mkdir()
    (tmp_path / "not-an-image.png").write_text("hello")
    txt2img = ["txt2img", "--outdir", str(tmp_path / "out"), *STEPS]
    run = [*txt2img, "--ckpt", model]
    cases = {
        "no --ckpt given and the bundled model is missing from": txt2img,
        "no such checkpoint file: ": [*txt2img, "--ckpt", str(tmp_path / "missing.safetensors")],
        "bad.safetensors is not a readable safetensors file": [*txt2img, "--ckpt", str(tmp_path / "bad.safetensors")],
        "not-a-model is not a complete diffusers Stable Diffusion folder": [
            *txt2img,
            *("--ckpt", str(tmp_path / "not-a-model")),
        ],
        "unknown sampler 'k_euler': expected one of ddpm, ddim,": [*run, "--sampler", "k_euler"],
        "--ddim_eta is DDIM's; the plms sampler has none": [*run, "--plms", "--ddim_eta", "0.5"],
        "empty.txt holds no prompts": [*run, "--from-file", str(tmp_path / "empty.txt")],
        "no such prompt file: ": [*run, "--from-file", str(tmp_path / "prompts.txt")],
        "--n_samples must be at least 1, got 0": [*run, "--n_samples", "0"],
        "--n_rows must be at least 1, got -1": [*run, "--n_rows", "-1"],
        "VAE tile size 20: use a multiple of 32": [*run, "--vae-tiling", "20"],
        "1 --controlnet and 0 --control: give one condition image per ControlNet": [*run, "--controlnet", "cn"],
        "no ControlNet at ": [*run, "--controlnet", str(tmp_path / "no-cn"), "--control", "x.png"],
        "2 --preprocess for 1 --control: give one, or one per --control": [
            *(*run, "--controlnet", "cn", "--control", "x.png"),
            *("--preprocess", "canny", "--preprocess", "threshold"),
        ],
    }
    for message, args in cases.items():
        code, err = run_error(capsys, args)
        assert code == 2 and err.startswith("sdjax txt2img: error: ") and message in err, (message, err)
    # the pipeline's own checks come out the same way; the model was loaded in CompVis's default precision
    assert main([*run, "--H", "44"]) == 2
    out, err = capsys.readouterr()
    assert err == "sdjax txt2img: error: height=44 is not a multiple of 8; the nearest valid sizes are 40 or 48\n"
    assert f"loaded {model} (SD1, bfloat16)" in out

    img2img = ["img2img", "--ckpt", model, "--outdir", str(tmp_path / "out"), *STEPS]
    bad_image = [*img2img, "--init-img", str(tmp_path / "not-an-image.png")]
    cases = {
        "--init-img is required": img2img,
        "no such init image: ": [*img2img, "--init-img", str(tmp_path / "missing.png")],
        "not-an-image.png could not be read as an image": bad_image,
        "--strength must be in (0, 1] (near 0 keeps the init image, 1 redraws it), got 1.5": [
            *bad_image,
            *("--strength", "1.5"),
        ],
    }
    for message, args in cases.items():
        code, err = run_error(capsys, args)
        assert code == 2 and err.startswith("sdjax img2img: error: ") and message in err, (message, err)
    assert pngs(tmp_path / "out" / "samples") == []


def test_bugs_still_raise(monkeypatch, tmp_path):
    """Only ValueError and FileNotFoundError become one-line errors; anything else keeps its traceback."""

    def broken(*args, **kwargs):
        raise RuntimeError("a bug")

    monkeypatch.setattr(sdjax.StableDiffusion, "from_pretrained", broken)
    with pytest.raises(RuntimeError, match="a bug"):
        main(["txt2img", "--ckpt", str(tmp_path), "--outdir", str(tmp_path / "out")])
