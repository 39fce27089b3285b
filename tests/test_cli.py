"""The command line: ``sdjax train-ae`` trains, saves, and resumes from its own checkpoint."""

import json
from pathlib import Path

import numpy as np
import pytest
from flax import nnx

from sdjax import io
from sdjax.cli import main
from sdjax.models import AutoencoderKL, VAEConfig


@pytest.mark.slow  # moved from the default run to keep it under 12 min on 2 cores (docs/testing.md)
def test_train_vae_from_the_command_line_and_resume(tmp_path, capsys):
    out = tmp_path / "vae"
    args = [
        "train-ae",
        "--model",
        "vae",
        "--dataset",
        "shapes",
        "--resolution",
        "16",
        "--num-images",
        "128",
        "--channels",
        "8",
        "16",
        "--steps",
        "4",
        "--batch-size",
        "8",
        "--out",
        str(out),
    ]
    assert main(args) == 0
    text = capsys.readouterr().out
    assert "compression 3.0×" in text and "held-out reconstruction MSE" in text
    for name in ("model.safetensors", "checkpoint.safetensors", "reconstructions.png"):
        assert (out / name).is_file()

    _, meta = io.read(out / "model.safetensors")
    cfg = VAEConfig(**{k: tuple(v) if isinstance(v, list) else v for k, v in meta["config"].items()})
    model = io.load_model(out / "model.safetensors", AutoencoderKL(cfg, rngs=nnx.Rngs(0)))
    assert np.isfinite(np.asarray(model.encode(np.zeros((1, 16, 16, 3), np.float32)).mean)).all()

    assert main([*args[:-4], "--steps", "6", "--out", str(out)]) == 0  # resumes at step 4, runs to 6
    assert "step 6:" in capsys.readouterr().out


def test_strip_solutions_command(tmp_path):
    root = Path(__file__).resolve().parents[1] / "notebooks"
    assert main(["strip-solutions", str(root), str(tmp_path)]) == 0
    stripped = sorted(tmp_path.glob("*.ipynb"))
    assert [p.name for p in stripped] == sorted(p.name for p in root.glob("*.ipynb"))
    for path in stripped:
        code = "".join("".join(c["source"]) for c in json.loads(path.read_text())["cells"] if c["cell_type"] == "code")
        assert "# BEGIN SOLUTION" not in code and "YOUR CODE HERE" in code, path.name


@pytest.mark.slow  # moved from the default run to keep it under 12 min on 2 cores (docs/testing.md)
def test_train_ddpm_quick_writes_loadable_weights(tmp_path, capsys):
    from sdjax import pretrained

    assert main(["train-ddpm", "--quick", "--out", str(tmp_path)]) == 0
    assert "step 10:" in capsys.readouterr().out
    model, schedule = pretrained.load("ddpm-digits16", path=tmp_path / "ddpm-digits16.safetensors")  # the default
    assert schedule == pretrained.DDPM_DIGITS16.schedule and model.config.in_channels == 1
    assert pretrained.info("ddpm-digits16", path=tmp_path / "ddpm-digits16.safetensors")["steps"] == 10
    assert (tmp_path / "samples.png").is_file()
