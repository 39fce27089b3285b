"""The toy Würstchen (sdjax.wuerstchen): each stage's shapes, the compressor's normalisation against its float64
formula, the pipeline's stage C (guided) and stage B chains against a loop of diffusers' DDIMScheduler around the
same networks, training (the compressor learns with stage B; the text encoder stays frozen), saving and loading,
the errors, and the shipped model's prompt following."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from sdjax import convert, data, probe, tiny_sd, wuerstchen
from sdjax.models.autoencoder import AutoencoderConfig
from sdjax.models.unet import UNet2D
from sdjax.models.vq import VQConfig, VQModel
from tests.helpers import nchw, nhwc, rel_err

TINY = dataclasses.replace(
    wuerstchen.WUERSTCHEN,
    stage_a=VQConfig(block_out_channels=(8, 16, 16), latent_channels=4, num_vq_embeddings=32, norm_num_groups=4,
                     mid_block_attention=False, legacy=False),  # fmt: skip
    semantic=AutoencoderConfig(block_out_channels=(8,) * 4, latent_channels=16, norm_num_groups=4,
                               mid_block_attention=False),  # fmt: skip
    stage_b=wuerstchen._cross_attention_unet(sample_size=16, in_channels=20, out_channels=4,
                                             block_out_channels=(16, 32), norm_num_groups=8),  # fmt: skip
    stage_c=wuerstchen._cross_attention_unet(sample_size=4, in_channels=16, out_channels=16,
                                             block_out_channels=(16, 32), norm_num_groups=8),  # fmt: skip
    stage_a_batch=8, stage_b_batch=8, stage_c_batch=8,
)  # fmt: skip


@pytest.fixture(scope="module")
def text():
    return convert.load(tiny_sd.BUNDLE)


@pytest.fixture(scope="module")
def model(text):
    """A randomly initialised toy Würstchen (TINY's networks) on the bundled SD's text encoder."""
    rngs = nnx.Rngs(3)
    vq = VQModel(dataclasses.replace(TINY.stage_a, scaling_factor=0.5), rngs=rngs)
    return wuerstchen.WuerstchenModel(
        vq, wuerstchen.SemanticCompressor(TINY.semantic, TINY.semantic_pool, rngs=rngs),
        UNet2D(TINY.stage_b, rngs=rngs), UNet2D(TINY.stage_c, rngs=rngs), text.text_encoder, text.tokenizer,
        TINY.schedule,
    )  # fmt: skip


def test_shapes_at_every_stage(model):
    """64² × 3 → stage A z 16² × 4 (f = 4) and E_s's s 4² × 16 (f = 16); UNet_B maps [z_t, ↑s] to z's shape,
    UNet_C maps s to its own (the pipeline's outputs: test_pipeline_against_a_diffusers_ddim_loop)."""
    x = jax.random.uniform(jax.random.PRNGKey(0), (2, 64, 64, 3), minval=-1.0, maxval=1.0)
    z, s = model.stage_a.encode(x), model.compressor(x)
    assert z.shape == (2, 16, 16, 4) and s.shape == (2, 4, 4, 16)
    context = model.text_encoder(jnp.asarray(model.tokenizer(["a red star", ""]))).last_hidden_state
    up = wuerstchen.upsample_semantic(s, (16, 16))
    assert model.stage_b(jnp.concatenate([z, up], -1), jnp.array([5, 900]), context).shape == z.shape
    assert model.stage_c(s, jnp.array([5, 900]), context).shape == s.shape


def test_compressor_normalises_each_position(model):
    x = jax.random.uniform(jax.random.PRNGKey(1), (2, 64, 64, 3), minval=-1.0, maxval=1.0)
    pooled = np.asarray(x).reshape(2, 32, 2, 32, 2, 3).mean(axis=(2, 4))  # the 2 × 2 box filter
    h = np.asarray(model.compressor.encoder(jnp.asarray(pooled)), np.float64)
    want = (h - h.mean(-1, keepdims=True)) / np.sqrt(h.var(-1, keepdims=True) + 1e-6)
    assert rel_err(model.compressor(x), want) < 1e-5


def test_upsampled_semantic_is_nearest_neighbour():
    s = np.random.default_rng(0).standard_normal((2, 4, 4, 3)).astype(np.float32)
    want = np.kron(s, np.ones((1, 4, 4, 1)))
    np.testing.assert_array_equal(np.asarray(wuerstchen.upsample_semantic(jnp.asarray(s), (16, 16))), want)


def ddim_loop(unet, x, steps, schedule, model_fn):
    """x_0 from x_T by diffusers' DDIMScheduler, the network called as model_fn(unet, x (B, h, w, c), t)."""
    torch = pytest.importorskip("torch")
    from diffusers import DDIMScheduler

    scheduler = DDIMScheduler.from_config(tiny_sd.ddim_scheduler_config(schedule))
    scheduler.set_timesteps(steps)
    x = torch.from_numpy(nchw(x))
    for t in scheduler.timesteps:
        out = model_fn(unet, jnp.asarray(nhwc(x.numpy())), jnp.float32(t))
        x = scheduler.step(torch.from_numpy(nchw(out)), t, x).prev_sample
    return nhwc(x.numpy())


def test_pipeline_against_a_diffusers_ddim_loop(model):
    """Stage C under guidance w (c_∅ = the negative prompt), then stage B on its s, then stage A: each against
    the same networks stepped by diffusers' DDIMScheduler, from the starting noise the docstring promises
    (image i: fold_in(PRNGKey(seed), i) split in 4; s from the first key, z from the third)."""
    prompt, negative, w, seed = ["a red star", "two blue circles"], "green", 3.0, 7
    out = wuerstchen.Wuerstchen(model)(prompt, negative_prompt=negative, prior_guidance_scale=w, seed=seed,
                                       prior_num_inference_steps=4, decoder_num_inference_steps=3,
                                       output_type="stages")  # fmt: skip
    keys = [jax.random.split(jax.random.fold_in(jax.random.PRNGKey(seed), i), 4) for i in range(2)]

    def encode(texts):
        return model.text_encoder(jnp.asarray(model.tokenizer(texts))).last_hidden_state

    c, c_neg = encode(prompt), encode([negative] * 2)

    def prior(unet, x, t):
        u, v = unet(x, t, c_neg), unet(x, t, c)
        return u + w * (v - u)

    s_T = np.stack([np.asarray(jax.random.normal(k[0], (4, 4, 16))) for k in keys])
    s = ddim_loop(model.stage_c, s_T, 4, model.schedule, prior)
    assert rel_err(out.semantic, s) < 1e-5

    up = wuerstchen.upsample_semantic(jnp.asarray(out.semantic), (16, 16))
    z_T = np.stack([np.asarray(jax.random.normal(k[2], (16, 16, 4))) for k in keys])
    z = ddim_loop(model.stage_b, z_T, 3, model.schedule, lambda unet, x, t: unet(jnp.concatenate([x, up], -1), t, c))
    assert rel_err(out.latents, z) < 1e-5
    pixels = np.clip(np.asarray(model.stage_a.decode(jnp.asarray(out.latents) / 0.5)) / 2 + 0.5, 0, 1)
    assert rel_err(out.images, pixels) < 1e-5  # jitted vs eager decode: float32 rounding (2e-6 seen)
    assert out.semantic.shape == (2, 4, 4, 16) and out.latents.shape == (2, 16, 16, 4)
    assert out.images.shape == (2, 64, 64, 3) and 0.0 <= out.images.min() <= out.images.max() <= 1.0

    # w = 1: no guidance, the prior conditioned on the prompts alone
    plain = wuerstchen.Wuerstchen(model)(prompt, prior_guidance_scale=1.0, seed=seed, prior_num_inference_steps=4,
                                         decoder_num_inference_steps=3, output_type="stages")  # fmt: skip
    assert rel_err(plain.semantic, ddim_loop(model.stage_c, s_T, 4, model.schedule, lambda u, x, t: u(x, t, c))) < 1e-5


def test_stage_b_loss_reaches_the_compressor_and_not_the_text_encoder(text):
    """Stage B's loss (the one train_stage_b minimises) has a gradient for E_s — the two learn together, as
    Würstchen's stage B and its compressor — and exactly zero for the text encoder, which Adam turns into exactly zero
    updates (train_stage_b itself runs in the slow test_train_runs_the_three_stages)."""
    rngs = nnx.Rngs(0)
    trainee = wuerstchen.StageB(wuerstchen.SemanticCompressor(TINY.semantic, TINY.semantic_pool, rngs=rngs),
                                UNet2D(TINY.stage_b, rngs=rngs), text.text_encoder)  # fmt: skip
    pixels = np.asarray(data.make_shapes(4, resolution=64, seed=1).images)
    ids = tiny_sd.tokenize(text.tokenizer, ["a red star"] * 4)
    uint8 = np.round((pixels + 1.0) * 127.5).astype(np.uint8)
    latents = np.random.default_rng(0).standard_normal((4, 16, 16, 4)).astype(np.float32)
    batch = {"latent": jnp.asarray(latents), "ids": jnp.asarray(ids), "image": jnp.asarray(uint8)}
    loss_fn = tiny_sd.conditional_diffusion_loss(TINY.schedule, ids[0], 0.0, inputs=("image",))
    grads = nnx.jit(nnx.grad(lambda m: loss_fn(m, batch, jax.random.PRNGKey(0))[0]))(trainee)
    largest = lambda tree: max(float(jnp.abs(g).max()) for g in jax.tree.leaves(tree))  # noqa: E731
    assert largest(grads.compressor) > 0.0 and largest(grads.unet) > 0.0
    assert largest(grads.text_encoder) == 0.0


def test_save_and_load_round_trip(model, tmp_path):
    folder = wuerstchen.save(model, tmp_path / "w", {"note": "test"})
    loaded = wuerstchen.load(folder)
    for name in loaded.NETWORKS:
        want = jax.tree.map(lambda p: np.asarray(p, np.float16), nnx.state(getattr(model, name), nnx.Param))
        got = jax.tree.map(lambda p: np.asarray(p, np.float16), nnx.state(getattr(loaded, name), nnx.Param))
        jax.tree.map(np.testing.assert_array_equal, want, got)
    assert loaded.stage_a.config == model.stage_a.config and loaded.compressor.pool == model.compressor.pool
    for name in ("stage_b", "stage_c"):  # the same diffusers config (sdjax's dataclass may spell heads differently)
        assert getattr(loaded, name).config.to_diffusers() == getattr(model, name).config.to_diffusers()


@pytest.mark.slow
def test_train_runs_the_three_stages(tmp_path):
    """train() end to end for 2 steps a stage (about a minute: three programs to compile), and what it returns
    generates."""
    trained = wuerstchen.train(TINY, workdir=tmp_path, num_images=16, steps={"a": 2, "b": 2, "c": 2}, progress=False)
    assert set(trained.histories) == {"a", "b", "c"} and all(len(h["loss"]) == 2 for h in trained.histories.values())
    assert 0.0 < trained.model.stage_a.config.scaling_factor < np.inf
    assert {p.name for p in tmp_path.iterdir()} == {f"stage_{k}.safetensors" for k in "abc"} | {"wall_seconds.json"}
    images = wuerstchen.Wuerstchen(trained.model)("a red star", prior_num_inference_steps=2,
                                                  decoder_num_inference_steps=2, output_type="np")  # fmt: skip
    assert images.shape == (1, 64, 64, 3) and np.isfinite(images).all()


def test_clear_errors(model, tmp_path):
    pipe = wuerstchen.Wuerstchen(model)
    with pytest.raises(ValueError, match="height=72 is not a multiple of 16, the semantic latent.s factor"):
        pipe("a red star", height=72)
    with pytest.raises(ValueError, match=r"semantic of shape \(1, 2, 2, 16\): expected \(1, 4, 4, 16\)"):
        pipe("a red star", semantic=np.zeros((1, 2, 2, 16)))
    with pytest.raises(ValueError, match="output_type='latent'"):
        pipe("a red star", output_type="latent")
    with pytest.raises(FileNotFoundError, match="wuerstchen.safetensors does not exist"):
        wuerstchen.load(tmp_path)
    from sdjax import io

    io.save_tree(tmp_path / wuerstchen.WEIGHTS_FILE, {"x": np.zeros(2, np.float32)}, {"format": "something-else"})
    with pytest.raises(ValueError, match="not an sdjax Würstchen file"):
        wuerstchen.load(tmp_path)


@pytest.mark.slow  # notebook 08 measures the shipped model in CI's quick run (and in full, 256 prompts)
def test_shipped_model_follows_prompts():
    """The shipped toy Würstchen (sdjax/weights/wuerstchen-shapes) on 24 held-out prompts: the probe finds the
    prompted background and objects where the prompts put them, and shapes and colours far above what the same images
    score against the prompts in reverse order. (Measured at commit time: background 100 %, present 95 %, shape 40 %,
    colour 51 %; reversed 17 %, 11 %, 0 %, 0 %. Its shapes are the weak part: notebook 08 traces them to stage A.)"""
    pipe = wuerstchen.Wuerstchen.from_pretrained()
    prompts = tiny_sd.evaluation_prompts(24, seed=5)
    pixels = pipe(prompts, prior_guidance_scale=4.0, seed=0, output_type="np")
    reading = probe.read(probe.load(16), pixels * 2.0 - 1.0)
    wanted = [data.parse_caption(p) for p in prompts]
    score, reversed_ = probe.score_prompts(reading, wanted), probe.score_prompts(reading, wanted[::-1])
    print(score.row("wuerstchen"), reversed_.row("reversed prompts"), sep="\n")
    assert score.background >= 0.9 and score.present >= 0.85
    assert score.shape >= reversed_.shape + 0.25 and score.colour >= reversed_.colour + 0.3
