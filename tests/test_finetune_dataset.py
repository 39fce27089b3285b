"""Fine-tuning on a captioned dataset (sdjax.captioned, finetune.dataset_training_data, `sdjax train-finetune`):
one small set of (image, caption) pairs written in every layout reads back as the same pairs without touching the
network; resize-and-crop views; min-SNR-γ weights against diffusers and float64; the weighted loss against a hand
computation; a short CLI run that learns, saves EMA weights that load back, and resumes bit-for-bit."""

import dataclasses
import json
import re
import shutil
import socket
import types

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from PIL import Image

from sdjax import StableDiffusion, captioned, cli, convert, finetune, tiny_sd
from sdjax.data import shapes
from sdjax.schedulers import NoiseSchedule
from tests.helpers import SD15_SCHEDULER

N = 6


@pytest.fixture(scope="module")
def pairs():
    """N crescent scenes (64 px, uint8; a shape the bundled model never saw) and their captions: the dataset
    every layout below holds."""
    samples = shapes.scenes_of("crescent", N, seed=0)
    images = [np.round((shapes.render(s, 64) + 1) * 127.5).astype(np.uint8) for s in samples]
    return images, [shapes.caption(s) for s in samples]


def _hf_dataset(images, captions):
    import datasets

    features = datasets.Features(image=datasets.Image(), text=datasets.Value("string"))
    return datasets.Dataset.from_dict({"image": [Image.fromarray(a) for a in images], "text": captions}, features)


@pytest.fixture(scope="module")
def layouts(pairs, tmp_path_factory):
    """The pairs in each local layout: {layout: path}."""
    import datasets

    images, captions = pairs
    root = tmp_path_factory.mktemp("layouts")
    table = _hf_dataset(images, captions)
    other = _hf_dataset(images[:2], ["a test caption", "another"])

    text = root / "text_folder"  # kohya: NAME.png + NAME.txt
    text.mkdir()
    for i, (a, c) in enumerate(zip(images, captions, strict=True)):
        Image.fromarray(a).save(text / f"{i}.png")
        (text / f"{i}.txt").write_text(c + "\n")

    imagefolder = root / "imagefolder"  # datasets' imagefolder: file_name relative to metadata.jsonl
    (imagefolder / "pictures").mkdir(parents=True)
    lines = []
    for i, (a, c) in enumerate(zip(images, captions, strict=True)):
        Image.fromarray(a).save(imagefolder / "pictures" / f"{i:04d}.png")
        lines.append(json.dumps({"file_name": f"pictures/{i:04d}.png", "text": c, "source": "shapes"}))
    (imagefolder / "metadata.jsonl").write_text("\n".join(lines) + "\n")

    table.save_to_disk(str(root / "saved"))
    datasets.DatasetDict(train=table, test=other).save_to_disk(str(root / "saved_dict"))

    parquet = root / "parquet"  # the Hub's layout, with a test split beside the train split
    (parquet / "data").mkdir(parents=True)
    table.to_parquet(str(parquet / "data" / "train-00000-of-00001.parquet"))
    other.to_parquet(str(parquet / "data" / "test-00000-of-00001.parquet"))

    arrow = root / "arrow"  # loose arrow files (what save_to_disk writes, without its json)
    arrow.mkdir()
    for f in (root / "saved").glob("*.arrow"):
        shutil.copy(f, arrow / f.name)
    return {
        "image + .txt folder": text,
        "imagefolder": imagefolder,
        "save_to_disk": root / "saved",
        "save_to_disk (DatasetDict)": root / "saved_dict",
        "parquet": parquet,
        "parquet (one file)": parquet / "data" / "train-00000-of-00001.parquet",
        "arrow": arrow,
    }


@pytest.fixture
def network_calls(monkeypatch):
    """Every attempt to open a connection, refused and recorded; a Hub lookup would make one (offline unset)."""
    calls = []

    def refuse(*args, **kwargs):
        calls.append(args)
        raise OSError("the network is off limits in this test")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)
    monkeypatch.delenv("SDJAX_OFFLINE", raising=False)
    return calls


LAYOUTS = [
    "image + .txt folder",
    "imagefolder",
    "save_to_disk",
    "save_to_disk (DatasetDict)",
    "parquet",
    "parquet (one file)",
    "arrow",
]


@pytest.mark.parametrize("layout", LAYOUTS)
def test_every_layout_reads_the_same_pairs_offline(layout, layouts, pairs, network_calls):
    images, captions = pairs
    dataset = captioned.load_captioned(layouts[layout])
    assert len(dataset) == N and dataset.captions == captions
    for i in range(N):
        image, caption = dataset[i]
        assert image.mode == "RGB" and caption == captions[i]
        np.testing.assert_array_equal(np.asarray(image), images[i])  # PNG: lossless, pixel for pixel
    assert network_calls == []


def test_splits_limit_and_the_hub_branch(layouts, pairs, monkeypatch):
    images, captions = pairs
    for layout in ("parquet", "save_to_disk (DatasetDict)"):
        test = captioned.load_captioned(layouts[layout], split="test")
        assert test.captions == ["a test caption", "another"]
        with pytest.raises(ValueError, match=r"no .*'validation'.*\['test', 'train'\]"):
            captioned.load_captioned(layouts[layout], split="validation")
    assert captioned.load_captioned(layouts["imagefolder"], limit=2).captions == captions[:2]
    # a name that is not a path goes to datasets.load_dataset (here a stand-in: the tests stay offline)
    asked = []

    def load_dataset(name, split):
        asked.append((name, split))
        return _hf_dataset(images, captions)

    monkeypatch.setattr("sdjax.data.hub.hub_reachable", lambda: True)
    monkeypatch.setattr("datasets.load_dataset", load_dataset)
    hub = captioned.load_captioned("someone/captioned-shapes", split="train")
    assert asked == [("someone/captioned-shapes", "train")] and hub.layout == "hub" and hub.captions == captions


def test_errors_name_the_thing_and_the_fix(layouts, tmp_path):
    with pytest.raises(FileNotFoundError, match="no such file or folder"):
        captioned.load_captioned(tmp_path / "missing")
    with pytest.raises(FileNotFoundError, match="unavailable.*Or give a local folder"):  # offline (conftest)
        captioned.load_captioned("nobody/no-such-dataset")
    with pytest.raises(ValueError, match="holds no images"):
        captioned.load_captioned(tmp_path)
    with pytest.raises(ValueError, match=r"no caption column 'caption'; its columns are \['image', 'text'\]"):
        captioned.load_captioned(layouts["parquet"], caption_column="caption")
    with pytest.raises(ValueError, match=r"no image column 'img'; its columns are \['image', 'text'\]"):
        captioned.load_captioned(layouts["save_to_disk"], image_column="img")
    with pytest.raises(ValueError, match=r"its columns are \['image', 'text', 'source'\]"):
        captioned.load_captioned(layouts["imagefolder"], caption_column="caption")
    with pytest.raises(ValueError, match="holds str, not images"):
        captioned.load_captioned(layouts["arrow"], image_column="text").image(0)

    text = tmp_path / "text"
    shutil.copytree(layouts["image + .txt folder"], text)
    (text / "3.txt").unlink()
    with pytest.raises(ValueError, match=r"1 of 6 images have no caption \(3.png\): write NAME.txt"):
        captioned.load_captioned(text)
    folder = tmp_path / "imagefolder"
    shutil.copytree(layouts["imagefolder"], folder)
    Image.new("RGB", (8, 8)).save(folder / "pictures" / "stray.png")
    with pytest.raises(ValueError, match=r"1 of 7 images have no caption \(pictures/stray.png\)"):
        captioned.load_captioned(folder)
    (folder / "pictures" / "0000.png").unlink()
    with pytest.raises(FileNotFoundError, match="names 1 files that are not there"):
        captioned.load_captioned(folder)


def test_resize_and_crop():
    """A 128 × 64 image at 64 px: the shorter side already fits, so a centre crop is the middle square exactly and a
    random crop some 64-wide window, mirrored about half of the time; at 32 px it is resized first."""
    rng = np.random.default_rng(0)
    array = rng.integers(0, 256, (64, 128, 3), dtype=np.uint8)
    image, pixels = Image.fromarray(array), array.astype(np.float32) / 127.5 - 1
    centre = finetune.resize_and_crop(image, 64, rng, center_crop=True, flip=False)
    np.testing.assert_array_equal(centre, pixels[:, 32:96])
    windows = [pixels[:, k : k + 64] for k in range(65)]
    flips = []
    for _ in range(20):
        view = finetune.resize_and_crop(image, 64, rng, center_crop=False, flip=True)
        flipped = not any(np.array_equal(view, w) for w in windows)
        assert any(np.array_equal(view[:, ::-1] if flipped else view, w) for w in windows)
        flips.append(flipped)
    assert 0 < sum(flips) < 20
    small = finetune.resize_and_crop(image, 32, rng, center_crop=True, flip=False)
    assert small.shape == (32, 32, 3) and np.abs(small - pixels[::2, ::2][:, 16:48]).mean() < 0.5


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction", "sample"])
def test_min_snr_weights_match_diffusers_and_float64(prediction_type):
    """w(t) at all 1000 timesteps of SD1.5's schedule, γ = 5. Against diffusers' compute_snr (float32 torch) with
    the weighting of its train_text_to_image.py: measured max relative error 2.2e-7 (ε) and 2.9e-7 (v), tolerance
    1e-6. Against float64 NumPy from the β's in float64: measured 2.6e-5 (ε, v) and 2.3e-6 (x_0), tolerance 1e-4 —
    1 − ᾱ_t in float32 loses digits at small t, where ᾱ_t ≈ 0.999 (both sdjax and diffusers compute it so)."""
    gamma, t = 5.0, np.arange(1000)
    schedule = NoiseSchedule.from_diffusers_config(SD15_SCHEDULER | {"prediction_type": prediction_type})
    ours = np.asarray(finetune.min_snr_weight(schedule, jnp.asarray(t), gamma), np.float64)

    betas = np.linspace(0.00085**0.5, 0.012**0.5, 1000, dtype=np.float64) ** 2
    snr = np.cumprod(1 - betas) / (1 - np.cumprod(1 - betas))
    expected = {"epsilon": np.minimum(snr, gamma) / snr, "v_prediction": np.minimum(snr, gamma) / (snr + 1)}
    expected["sample"] = np.minimum(snr, gamma)
    np.testing.assert_allclose(ours, expected[prediction_type], rtol=1e-4)
    assert ours.min() < ours.max() and (ours[snr < gamma] > 0).all()
    if prediction_type == "sample":
        return
    torch = pytest.importorskip("torch")
    diffusers = pytest.importorskip("diffusers")
    from diffusers.training_utils import compute_snr

    scheduler = diffusers.DDPMScheduler.from_config({**SD15_SCHEDULER, "prediction_type": prediction_type})
    reference_snr = compute_snr(scheduler, torch.arange(1000))
    reference = torch.stack([reference_snr, gamma * torch.ones(1000)], dim=1).min(dim=1)[0]
    reference = reference / (reference_snr if prediction_type == "epsilon" else reference_snr + 1)
    np.testing.assert_allclose(ours, reference.double().numpy(), rtol=1e-6)


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
def test_min_snr_loss_is_the_hand_computation(prediction_type):
    """The fine-tuning loss with min-SNR-γ (γ = 1: 6 of the 16 timesteps drawn are clipped) and per-example weights,
    on a stand-in model ε̂ = x_t / 2 that records (x_t, t): mean_i weight_i · w(t_i) · mean ‖target_i − ε̂_i‖²,
    recomputed in float64 from the recorded draws. Measured relative error 4.1e-8 (ε), 3.6e-9 (v); tolerance 1e-6."""
    schedule = NoiseSchedule.sd15(prediction_type=prediction_type)
    sd = types.SimpleNamespace(schedule=schedule, tokenizer=lambda texts: np.zeros((len(texts), 77), np.int32))
    config = finetune.FinetuneConfig(method="full", min_snr_gamma=1.0)
    seen = {}

    def model(x_t, t, ids):
        seen.update(x_t=np.asarray(x_t, np.float64), t=np.asarray(t))
        return x_t / 2

    z0 = np.asarray(jax.random.normal(jax.random.PRNGKey(0), (16, 8, 8, 4)), np.float64)
    weight = np.linspace(0.5, 2.0, 16)
    batch = {"latent": jnp.asarray(z0, jnp.float32), "ids": jnp.zeros((16, 77), jnp.int32), "weight": weight}
    loss, _ = finetune._loss(sd, config, None)(model, batch, jax.random.PRNGKey(1))

    x_t, t = seen["x_t"], seen["t"]
    alpha_bar = schedule.alphas_cumprod[t].astype(np.float64)[:, None, None, None]
    eps = (x_t - np.sqrt(alpha_bar) * z0) / np.sqrt(1 - alpha_bar)
    target = eps if prediction_type == "epsilon" else np.sqrt(alpha_bar) * eps - np.sqrt(1 - alpha_bar) * z0
    snr = (alpha_bar / (1 - alpha_bar)).ravel()
    assert (snr > 1).any() and (snr < 1).any()  # both sides of γ are drawn
    w = np.minimum(snr, 1.0) / (snr if prediction_type == "epsilon" else snr + 1)
    expected = np.mean(weight * w * np.mean((target - x_t / 2) ** 2, axis=(1, 2, 3)))
    np.testing.assert_allclose(float(loss), expected, rtol=1e-6)
    plain = finetune._loss(sd, dataclasses.replace(config, min_snr_gamma=None), None)
    assert not np.isclose(float(plain(model, batch, jax.random.PRNGKey(1))[0]), expected, rtol=1e-3)  # it weighs


# ---------------------------------------------------------------------------------------------------
# Training on the bundled tiny model, uninterrupted through the API and interrupted through the CLI, with one set
# of options (so one compiled step): the CLI's TRAIN flags are the API's CONFIG.
# ---------------------------------------------------------------------------------------------------

STEPS = 8
TRAIN = ["--batch-size", "4", "--lr", "1e-4", "--ema-decay", "0.8", "--min-snr-gamma", "5", "--center-crop"]
CONFIG = dict(method="full", steps=STEPS, batch_size=4, learning_rate=1e-4, ema_decay=0.8, min_snr_gamma=5.0,
              center_crop=True, views_per_image=1)  # fmt: skip


@pytest.fixture(scope="module")
def uninterrupted(layouts):
    """STEPS steps on the parquet layout without a break: (fine-tuned pipeline, fit result, base UNet weights)."""
    pipe = StableDiffusion.from_pretrained(tiny_sd.BUNDLE)
    pipe.progress = False
    config = finetune.FinetuneConfig(**CONFIG)
    data = finetune.dataset_training_data(pipe, captioned.load_captioned(layouts["parquet"]), config, progress=False)
    assert data["latent"].shape == (N, 8, 8, 4) and data["ids"].shape == (N, 77)
    base = _weights(pipe.unet)
    return pipe, finetune.finetune(pipe, data, config, progress=False), base


def _weights(module) -> dict[str, np.ndarray]:
    return {k: np.asarray(v) for k, v in convert.state_dict(module).items()}


def test_finetune_learns_and_keeps_the_ema_weights(uninterrupted, pairs):
    """8 steps on the 6 crescents lower the denoising loss of those very images at fixed noise
    (finetune.heldout_loss, 8 timesteps): measured 0.484 → 0.287 (−41 %) with the EMA weights; asserted below
    0.8 × before. The training losses are finite; the pipeline holds θ_ema (the fit state's ``ema``, bit for bit),
    not the raw θ, and its text encoder is untouched."""
    pipe, result, _ = uninterrupted
    assert len(result.history["loss"]) == STEPS and np.isfinite(result.history["loss"]).all()
    jax.tree.map(np.testing.assert_array_equal, nnx.state(pipe.unet, nnx.Param), result.state.ema["unet"])
    raw = jax.tree.leaves(result.state.params["unet"])
    kept = jax.tree.leaves(nnx.state(pipe.unet, nnx.Param))
    assert all(not np.array_equal(a, b) for a, b in zip(kept, raw, strict=True))
    images, captions = pairs
    pixels = np.stack(images).astype(np.float32) / 127.5 - 1
    base = StableDiffusion.from_pretrained(tiny_sd.BUNDLE)
    before, after = finetune.heldout_loss(base, pixels, captions), finetune.heldout_loss(pipe, pixels, captions)
    assert np.isfinite(after) and after < 0.8 * before, (before, after)
    jax.tree.map(np.testing.assert_array_equal, nnx.state(pipe.text_encoder), nnx.state(base.text_encoder))


@pytest.mark.slow  # a training step's compilation (14 s); tests/test_memory_estimate.py measures the state too
def test_adafactor_state_is_factored(layouts):
    """FinetuneConfig(optimizer="adafactor") trains with a factored second moment: its optimizer state is a fraction
    of the trained weights where Adam's is twice them, and the weights move. (Measured 0.22×: optax factors only
    matrices whose two largest dimensions are both ≥ 128, which few of the tiny model's are; SD1.5's state is
    megabytes, benchmarks/MEMORY.md.)"""
    pipe = StableDiffusion.from_pretrained(tiny_sd.BUNDLE)
    pipe.progress = False
    config = finetune.FinetuneConfig(**{**CONFIG, "steps": 2, "ema_decay": None, "optimizer": "adafactor"})
    data = finetune.dataset_training_data(pipe, captioned.load_captioned(layouts["parquet"]), config, progress=False)
    base = _weights(pipe.unet)
    result = finetune.finetune(pipe, data, config, progress=False)
    size = lambda tree: sum(np.size(a) for a in jax.tree.leaves(tree))  # noqa: E731
    assert size(result.state.opt_state) < 0.5 * size(result.state.params)
    assert any(not np.array_equal(v, base[k]) for k, v in _weights(pipe.unet).items())


@pytest.mark.slow  # 18 s; fit's resume is bit for bit in the default run (tests/test_train.py)
def test_cli_interrupted_and_resumed_writes_the_uninterrupted_weights(uninterrupted, layouts, tmp_path, capsys):
    """`sdjax train-finetune` for STEPS/2 steps, stopped, then resumed from --checkpoint to STEPS: the model it writes
    loads back with the uninterrupted run's EMA weights, bit for bit (same data, same batches and draws by step, the
    optimizer and EMA state restored), and the text encoder and VAE it started from."""
    checkpoint, out = tmp_path / "state.safetensors", tmp_path / "resumed"
    argv = ["train-finetune", "--dataset", str(layouts["parquet"]), "--out", str(out), "--checkpoint", str(checkpoint)]
    assert cli.main([*argv, "--max-train-steps", str(STEPS // 2), *TRAIN]) == 0
    printed = capsys.readouterr().out
    assert "(parquet): 6 captioned images" in printed and "wrote the EMA weights (decay 0.8)" in printed
    first, last = map(float, re.search(r"loss (\S+) → (\S+)\)", printed).groups())
    assert np.isfinite([first, last]).all()
    assert cli.main([*argv, "--max-train-steps", str(STEPS), *TRAIN]) == 0
    assert f"resuming from {checkpoint}" in capsys.readouterr().out
    pipe, _, _ = uninterrupted
    written = convert.load(out)
    for name in ("unet", "text_encoder", "vae"):
        expected, loaded = _weights(getattr(pipe, name)), _weights(getattr(written, name))
        assert expected.keys() == loaded.keys()
        for k in expected:
            np.testing.assert_array_equal(loaded[k], expected[k], err_msg=f"{name}: {k}")


def test_cli_finetune_errors(layouts, tmp_path, capsys):
    assert cli.main(["train-finetune", "--dataset", str(tmp_path / "missing")]) == 2
    assert "no such file or folder" in capsys.readouterr().err
    assert cli.main(["train-finetune", "--dataset", str(layouts["parquet"]), "--caption-column", "caption"]) == 2
    assert "its columns are ['image', 'text']" in capsys.readouterr().err
    assert cli.main(["train-finetune", "--dataset", str(layouts["parquet"]), "--min-snr-gamma", "0"]) == 2
    assert "min_snr_gamma=0.0: expected γ > 0" in capsys.readouterr().err
