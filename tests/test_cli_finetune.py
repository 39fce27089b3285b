"""sdjax train-lora / train-ti / train-dreambooth on a folder of images, and txt2img with what they wrote."""

import numpy as np
import pytest
from PIL import Image

from sdjax import cli, lora, textual_inversion
from sdjax.data import shapes


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    """Three crescent images with kohya-style captions beside them."""
    root = tmp_path_factory.mktemp("crescents")
    for i, (colour, position) in enumerate([("red", "top left"), ("blue", "centre"), ("green", "bottom right")]):
        sample = shapes.ShapesSample((shapes.ShapeObject("crescent", colour, "large", position),), "grey")
        pixels = np.round((shapes.render(sample, 64) + 1) * 127.5).astype(np.uint8)
        Image.fromarray(pixels).save(root / f"{i}.png")
        (root / f"{i}.txt").write_text(shapes.caption(sample).replace("crescent", "sks"))
    return root


QUICK = ["--steps", "2", "--batch-size", "4", "--views-per-image", "2"]


def test_train_lora_then_txt2img_with_it(folder, tmp_path, capsys):
    out = tmp_path / "lora.safetensors"
    assert cli.main(["train-lora", "--images", str(folder), "--out", str(out), "--format", "kohya", *QUICK]) == 0
    assert "their captions" in capsys.readouterr().out  # the .txt captions were used
    assert lora.load_lora(out, _unet())["format"] == "kohya"
    samples = tmp_path / "samples"
    argv = ["txt2img", "--prompt", "a large red sks in the centre on a grey background", "--lora", f"{out}:0.5"]
    assert cli.main([*argv, "--ddim_steps", "2", "--outdir", str(samples), "--skip_grid"]) == 0
    assert "strength 0.5" in capsys.readouterr().out
    assert len(list((samples / "samples").glob("*.png"))) == 1


def test_train_ti_then_txt2img_with_it(folder, tmp_path, capsys):
    out = tmp_path / "sks.safetensors"
    argv = ["train-ti", "--images", str(folder), "--token", "<sks>", "--init-word", "ring", "--out", str(out)]
    assert cli.main([*argv, "--prompt", "a large <sks> on a grey background", *QUICK]) == 0
    assert set(textual_inversion.load_embeddings(out)) == {"<sks>"}
    samples = tmp_path / "samples"
    argv = ["txt2img", "--prompt", "a large red <sks> in the centre", "--embedding", str(out), "--ddim_steps", "2"]
    assert cli.main([*argv, "--outdir", str(samples), "--skip_grid"]) == 0
    assert "added <sks>" in capsys.readouterr().out


@pytest.mark.slow  # moved from the default run to keep it under 12 min on 2 cores (docs/testing.md)
def test_train_dreambooth_with_prior(folder, tmp_path, capsys):
    out = tmp_path / "model"
    argv = ["train-dreambooth", "--images", str(folder), "--class-prompt", "a large ring", "--num-class-images", "2"]
    assert cli.main([*argv, "--out", str(out), *QUICK]) == 0
    assert (out / "sdjax.safetensors").is_file()
    assert "dreambooth, 2 steps" in capsys.readouterr().out


def test_finetune_errors_name_the_fix(tmp_path, capsys):
    assert cli.main(["train-lora", "--images", str(tmp_path / "missing")]) == 2
    assert "not a folder" in capsys.readouterr().err
    Image.new("RGB", (64, 64)).save(tmp_path / "a.png")  # an image without a caption and no --prompt
    assert cli.main(["train-lora", "--images", str(tmp_path)]) == 2
    assert "--prompt 'a sks dog'" in capsys.readouterr().err


def _unet():
    from sdjax import convert, tiny_sd

    return convert.load(tiny_sd.BUNDLE).unet
