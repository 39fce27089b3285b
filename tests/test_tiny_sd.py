"""The tiny-SD recipe (sdjax.tiny_sd): CLIP's loss against a float64 formula, the frozen text encoder
and caption dropout of stage C, and the three stages end to end at a tiny size, loaded back by the
same pipeline that runs real Stable Diffusion."""

import dataclasses

import jax
import numpy as np
import optax
import pytest
from flax import nnx

import sdjax
from sdjax import tiny_sd
from sdjax.convert import abstract
from sdjax.models import AutoencoderKL, CLIPTextConfig, CLIPTextModel
from sdjax.models.unet import UNet2D
from sdjax.nn import count_params
from sdjax.train import fit

# the recipe's structure at a few channels per layer, on 32-px images (4×4 latents)
TINY = dataclasses.replace(
    tiny_sd.TINY_SD,
    resolution=32,
    vae=dataclasses.replace(tiny_sd.TINY_SD.vae, block_out_channels=(8, 8, 8, 8), norm_num_groups=4),
    text=CLIPTextConfig(hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2),
    image_channels=(8, 8),
    embed_dim=8,
    unet=dataclasses.replace(
        tiny_sd.TINY_SD.unet,
        sample_size=4,
        block_out_channels=(16, 16),
        num_attention_heads=2,
        cross_attention_dim=16,
        norm_num_groups=8,
    ),
    vae_batch=8,
    clip_batch=8,
    unet_batch=8,
)


def test_clip_loss_matches_float64_formula():
    ds = TINY.data(8)
    ids = tiny_sd.tokenize(TINY.tokenizer(), ds.captions)
    model = tiny_sd.CLIP(TINY.text, TINY.resolution, TINY.image_channels, TINY.embed_dim, rngs=nnx.Rngs(0))
    loss, metrics = tiny_sd.clip_loss(model, {"image": ds.images, "ids": ids}, None)
    u = np.asarray(model.embed_image(ds.images), np.float64)
    w = np.asarray(model.embed_text(ids), np.float64)
    np.testing.assert_allclose(np.linalg.norm(u, axis=1), 1.0, rtol=1e-5)
    logits = (1 / 0.07) * u @ w.T

    def xent(x):  # mean over rows of −log softmax(x)_ii
        x = x - x.max(axis=1, keepdims=True)
        return np.mean(np.log(np.exp(x).sum(axis=1)) - np.diag(x))

    np.testing.assert_allclose(float(loss), 0.5 * (xent(logits) + xent(logits.T)), rtol=1e-5)
    assert float(metrics["accuracy"]) == np.mean(np.argmax(logits, axis=1) == np.arange(8))


@pytest.mark.slow  # moved from the default run to keep it under 12 min on 2 cores (docs/testing.md)
def test_stage_c_trains_the_unet_only_and_drops_captions():
    tokenizer = TINY.tokenizer()
    clip = tiny_sd.CLIP(TINY.text, TINY.resolution, TINY.image_channels, TINY.embed_dim, rngs=nnx.Rngs(0))
    text_before = jax.tree.map(np.asarray, nnx.state(clip.text_model, nnx.Param))
    model = tiny_sd.TextToLatent(UNet2D(TINY.unet, rngs=nnx.Rngs(1)), clip.text_model)
    unet_before = jax.tree.map(np.asarray, nnx.state(model.unet, nnx.Param))
    ds = TINY.data(16)
    batch = {"latent": np.random.default_rng(0).normal(size=(16, 4, 4, 4)).astype(np.float32),
             "ids": tiny_sd.tokenize(tokenizer, ds.captions)}  # fmt: skip
    empty = tiny_sd.tokenize(tokenizer, [""])[0]
    fit(model, tiny_sd.conditional_diffusion_loss(TINY.schedule, empty, 0.1), batch, steps=3, batch_size=8,
        optimizer=optax.adam(1e-2), progress=False)  # fmt: skip
    after = nnx.state(clip.text_model, nnx.Param)
    jax.tree.map(np.testing.assert_array_equal, text_before, jax.tree.map(np.asarray, after))
    moved = jax.tree.map(lambda a, b: np.abs(np.asarray(b) - a).max(), unet_before, nnx.state(model.unet, nnx.Param))
    assert max(jax.tree.leaves(moved)) > 1e-3

    # dropout 1: every caption is the empty prompt, so the loss is that of the empty prompt's batch
    key = jax.random.PRNGKey(0)
    all_dropped = tiny_sd.conditional_diffusion_loss(TINY.schedule, empty, 1.0)(model, batch, key)[0]
    empty_batch = dict(batch, ids=np.repeat(empty[None], 16, axis=0))
    kept = tiny_sd.conditional_diffusion_loss(TINY.schedule, empty, 0.0)(model, empty_batch, key)[0]
    np.testing.assert_allclose(float(all_dropped), float(kept), rtol=1e-6)


@pytest.mark.slow  # 50 s; as the Würstchen and Matryoshka train() runs. Stage C's loss and dropout, CLIP's loss and the
# shipped bundle's loading stay in the default run (above, and tests/test_bundled_model.py)
def test_three_stages_end_to_end_and_the_pipeline_runs_the_result(tmp_path):
    trained = tiny_sd.train(TINY, num_images=64, steps={"vae": 2, "clip": 2, "unet": 2}, workdir=tmp_path / "runs",
                            progress=False)  # fmt: skip
    sd = trained.components
    assert sd.vae.config.scaling_factor > 0 and sorted(trained.histories) == ["clip", "unet", "vae"]
    assert (tmp_path / "runs" / "unet.safetensors").is_file()  # a rerun resumes from here
    folder = tiny_sd.save_bundle(sd, tmp_path / "model", {"note": "test"}, clip=trained.clip)
    pipe = sdjax.StableDiffusion.from_pretrained(folder)
    assert pipe.components.scheduler_config["_class_name"] == "DDIMScheduler"  # the bundle's own sampler
    prompt = "a large red circle in the centre on a white background"
    a = pipe(prompt, num_inference_steps=3, seed=1, output_type="np")
    b = pipe(prompt, num_inference_steps=3, seed=1, output_type="np", scheduler="ddim")
    assert a.shape == (1, 32, 32, 3) and np.array_equal(a, b)

    # CLIP comes back whole (float16 on disk: the embeddings agree to f16 precision)
    clip = tiny_sd.load_clip(pipe.text_encoder, folder)
    ds = TINY.data(4)
    ids = tiny_sd.tokenize(TINY.tokenizer(), ds.captions)
    np.testing.assert_allclose(clip.embed_image(ds.images), trained.clip.embed_image(ds.images), atol=5e-3)
    np.testing.assert_allclose(clip.embed_text(ids), trained.clip.embed_text(ids), atol=5e-3)
    assert float(clip.logit_scale[...]) == float(np.float16(trained.clip.logit_scale[...]))


def test_recipe_captions_are_the_training_captions():
    assert TINY.captions(50) == TINY.data(50).captions


def test_recipe_sizes():
    """The shipped recipe's networks: the bundle must stay under 20 MB in float16."""
    r = tiny_sd.TINY_SD
    counts = {
        name: count_params(abstract(cls, cfg))
        for name, cls, cfg in (("unet", UNet2D, r.unet), ("vae", AutoencoderKL, r.vae), ("text", CLIPTextModel, r.text))
    }  # fmt: skip
    assert 2 * sum(counts.values()) + 1.5e6 < 20e6, counts  # + the tokenizer's vocab.json and merges.txt
    assert r.resolution // r.vae.downsample_factor == r.unet.sample_size
    assert r.text.hidden_size == r.unet.cross_attention_dim
