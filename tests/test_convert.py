"""Loading real Stable Diffusion checkpoints, proven by parity with the reference implementations.

Real weights cannot be downloaded here, so each test builds the reference networks (diffusers'
``UNet2DConditionModel`` and ``AutoencoderKL``, transformers' ``CLIPTextModel``) with random weights in
tiny SD1-style and SD2-style configs, writes them in the real on-disk formats, loads them with
sdjax and compares outputs. Tolerance 1e-5 relative (max-abs error over max-abs reference) in
float32: the networks here are a few dozen layers deep and measure about 1e-6.

The CompVis single-file layout is checked against diffusers' own converter
(``diffusers.loaders.single_file_utils``): sdjax writes a single file, diffusers converts it back to
its names, and the result must equal the reference networks' weights exactly.
"""

import json
import pickle

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from sdjax import compvis, convert
from sdjax.models import UNetConfig, VAEConfig
from sdjax.tokenizer import CLIPTokenizer
from tests.helpers import apply, nchw, nhwc, reference_text_encoder, reference_unet, reference_vae, rel_err

torch = pytest.importorskip("torch")
diffusers = pytest.importorskip("diffusers")
transformers = pytest.importorskip("transformers")
single_file_utils = pytest.importorskip("diffusers.loaders.single_file_utils")

RTOL = 1e-5

# Tiny networks with every structural feature of the real ones: two levels, a downsampler, cross-
# attention in the first level and the mid block, 2 layers per block (so CompVis' flat numbering is
# exercised beyond the trivial case), 4 heads, and CLIP's real vocabulary size: tests/helpers.py's
# SD1-style UNet and text encoder with these changes.
VERSIONS = {
    "sd1": dict(
        unet=dict(attention_head_dim=4, cross_attention_dim=32),
        text=dict(hidden_size=32, intermediate_size=64, num_attention_heads=4, hidden_act="quick_gelu"),
        pad_token="<|endoftext|>",
    ),
    "sd2": dict(
        unet=dict(attention_head_dim=(2, 4), cross_attention_dim=48, use_linear_projection=True),
        text=dict(hidden_size=48, intermediate_size=96, num_attention_heads=4, hidden_act="gelu"),
        pad_token="!",
    ),
}


def reference_models(version: str, seed: int = 0):
    spec = VERSIONS[version]
    torch.manual_seed(seed)
    unet = reference_unet(layers_per_block=2, **spec["unet"])
    vae = reference_vae((32, 64), layers_per_block=2, norm_num_groups=8)
    text = reference_text_encoder(**spec["text"])
    return unet, vae, text


@pytest.fixture(scope="module", params=sorted(VERSIONS))
def checkpoint(request, tmp_path_factory):
    """A diffusers folder of the tiny reference models, as ``save_pretrained`` writes it."""
    version = request.param
    folder = tmp_path_factory.mktemp(version)
    unet, vae, text = reference_models(version)
    unet.save_pretrained(folder / "unet")
    vae.save_pretrained(folder / "vae")
    text.save_pretrained(folder / "text_encoder")
    CLIPTokenizer.from_bpe_file(pad_token=VERSIONS[version]["pad_token"]).save_folder(folder / "tokenizer")
    diffusers.DDIMScheduler(
        beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012, steps_offset=1, set_alpha_to_one=False
    ).save_pretrained(folder / "scheduler")
    return version, folder, (unet, vae, text)


def inputs(unet, text, seed=0):
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((2, 16, 16, 4)).astype(np.float32)
    t = np.array([3, 801])
    context = rng.standard_normal((2, 77, unet.config.cross_attention_dim)).astype(np.float32)
    ids = rng.integers(0, 49406, (2, 77))
    ids[:, 0], ids[:, 9:] = 49406, 49407  # <|startoftext|> … <|endoftext|> padding, as SD1 feeds it
    image = rng.uniform(-1, 1, (2, 32, 32, 3)).astype(np.float32)
    return x, t, context, ids, image


def assert_same_outputs(sd, unet, vae, text, rtol=RTOL):
    x, t, context, ids, image = inputs(unet, text)
    with torch.no_grad():
        eps = unet(torch.from_numpy(nchw(x)), torch.from_numpy(t), torch.from_numpy(context)).sample.numpy()
        moments = vae.quant_conv(vae.encoder(torch.from_numpy(nchw(image)))).numpy()
        decoded = vae.decode(torch.from_numpy(nchw(x))).sample.numpy()
        hidden = text(torch.from_numpy(ids)).last_hidden_state.numpy()
    posterior = apply(sd.vae, jnp.asarray(image), method="encode")
    errors = {
        "unet": rel_err(apply(sd.unet, jnp.asarray(x), jnp.asarray(t), jnp.asarray(context)), nhwc(eps)),
        "vae encode": rel_err(jnp.concatenate([posterior.mean, posterior.logvar], -1), nhwc(moments)),
        "vae decode": rel_err(apply(sd.vae, jnp.asarray(x), method="decode"), nhwc(decoded)),
        "text encoder": rel_err(apply(sd.text_encoder, jnp.asarray(ids)).last_hidden_state, hidden),
    }
    assert max(errors.values()) < rtol, errors
    return errors


def test_diffusers_folder_matches_reference(checkpoint):
    version, folder, (unet, vae, text) = checkpoint
    sd = convert.load_diffusers(folder)
    assert sd.version == version
    assert sd.unet.config.use_linear_projection == (version == "sd2")
    assert sd.tokenizer.pad_id == (0 if version == "sd2" else 49407)
    assert sd.schedule.steps_offset == 1 and sd.schedule.beta_schedule == "scaled_linear"
    assert_same_outputs(sd, unet, vae, text)


def test_pickled_bin_weights_load_like_safetensors(checkpoint, tmp_path):
    """The older diffusers layout (``diffusion_pytorch_model.bin``, read with weights_only=True)."""
    _, _, (unet, _, _) = checkpoint
    unet.save_pretrained(tmp_path, safe_serialization=False)
    assert (tmp_path / "diffusion_pytorch_model.bin").is_file()
    model = convert.load_unet(tmp_path)
    x, t, context, _, _ = inputs(unet, None)
    with torch.no_grad():
        ref = unet(torch.from_numpy(nchw(x)), torch.from_numpy(t), torch.from_numpy(context)).sample.numpy()
    assert rel_err(apply(model, jnp.asarray(x), jnp.asarray(t), jnp.asarray(context)), nhwc(ref)) < RTOL


def test_compvis_layout_agrees_with_diffusers_converter(checkpoint, tmp_path):
    """sdjax → single file → diffusers' own single-file conversion gives back the reference weights, exactly."""
    version, folder, (unet, vae, text) = checkpoint
    sd = convert.load_diffusers(folder)
    path = compvis.save_single_file(sd, tmp_path / "model.safetensors")
    from safetensors.torch import load_file

    ckpt = load_file(str(path))
    converted = {
        "unet": single_file_utils.convert_ldm_unet_checkpoint(ckpt, dict(unet.config)),
        "vae": single_file_utils.convert_ldm_vae_checkpoint(ckpt, dict(vae.config)),
        "text": (
            single_file_utils.convert_open_clip_checkpoint(text, ckpt)
            if version == "sd2"
            else single_file_utils.convert_ldm_clip_checkpoint(ckpt)
        ),
    }
    # transformers 5 names CLIPTextModel's tensors without the "text_model." level diffusers writes
    names = lambda sd: {k.removeprefix("text_model."): v for k, v in sd.items() if not k.endswith("position_ids")}  # noqa: E731
    for name, ref in (("unet", unet), ("vae", vae), ("text", text)):
        want, got = names(ref.state_dict()), names(converted[name])
        assert set(got) == set(want), (name, sorted(set(got) ^ set(want))[:5])
        for k in want:
            assert torch.equal(got[k], want[k]), (name, k)


def test_single_file_round_trip_is_lossless(checkpoint, tmp_path):
    version, folder, (unet, vae, text) = checkpoint
    sd = convert.load_diffusers(folder)
    first = compvis.save_single_file(sd, tmp_path / "a.safetensors")
    loaded = compvis.load_single_file(
        first, unet=sd.unet.config, vae=sd.vae.config, text_encoder=sd.text_encoder.config, schedule=sd.schedule
    )
    assert loaded.version == version
    second = compvis.save_single_file(loaded, tmp_path / "b.safetensors")
    a, b = convert.read_state_dict(first), convert.read_state_dict(second)
    assert a.keys() == b.keys() and all(np.array_equal(a[k], b[k]) for k in a)
    assert_same_outputs(loaded, unet, vae, text)


def test_diffusers_export_loads_in_diffusers(checkpoint, tmp_path):
    """save_diffusers writes folders the reference libraries load, with identical weights."""
    _, folder, (unet, vae, text) = checkpoint
    out = convert.save_diffusers(convert.load_diffusers(folder), tmp_path / "export")
    for ref, loaded in (
        (unet, diffusers.UNet2DConditionModel.from_pretrained(out / "unet")),
        (vae, diffusers.AutoencoderKL.from_pretrained(out / "vae")),
        (text, transformers.CLIPTextModel.from_pretrained(out / "text_encoder")),
    ):
        want, got = ref.state_dict(), loaded.state_dict()
        assert all(torch.equal(got[k], want[k]) for k in want)
    hf = transformers.CLIPTokenizer.from_pretrained(out / "tokenizer")
    assert hf("a photo of a cat", padding="max_length", max_length=77).input_ids == (
        convert.load_diffusers(out).tokenizer("a photo of a cat")[0].tolist()
    )


# the cast is the same code for both versions; sd2 under -m slow (default run under 12 min, docs/testing.md)
@pytest.mark.parametrize("checkpoint", ["sd1", pytest.param("sd2", marks=pytest.mark.slow)], indirect=True)
def test_bfloat16_stays_within_bf16_error(checkpoint):
    """bf16 weights and activations: 8 mantissa bits, ε = 2⁻⁸ ≈ 0.004 per rounding; through a few
    dozen layers the outputs stay within a few percent of float32. (The noise schedule arithmetic
    stays float32 in the samplers; this is the networks alone.)"""
    _, folder, _ = checkpoint
    sd = convert.load_diffusers(folder)
    half = sd.astype(jnp.bfloat16)
    rng = np.random.default_rng(1)
    x = jnp.asarray(rng.standard_normal((1, 16, 16, 4)), jnp.float32)
    context = jnp.asarray(rng.standard_normal((1, 77, sd.unet.config.cross_attention_dim)), jnp.float32)
    ids = jnp.asarray(sd.tokenizer("an astronaut riding a horse"))
    t = jnp.asarray(500)
    full = apply(sd.unet, x, t, context)
    low = apply(half.unet, x.astype(jnp.bfloat16), t, context.astype(jnp.bfloat16))
    assert low.dtype == jnp.bfloat16
    assert rel_err(low.astype(jnp.float32), full) < 3e-2
    decoded = apply(half.vae, x.astype(jnp.bfloat16), method="decode").astype(jnp.float32)
    assert rel_err(decoded, apply(sd.vae, x, method="decode")) < 3e-2
    text_low = apply(half.text_encoder, ids).last_hidden_state.astype(jnp.float32)
    assert rel_err(text_low, apply(sd.text_encoder, ids).last_hidden_state) < 3e-2


@pytest.mark.parametrize("checkpoint", ["sd2"], indirect=True)  # the loading path is the same for both versions
def test_loading_in_a_dtype_casts_tensor_by_tensor(checkpoint, tmp_path):
    """convert.load(dtype=bfloat16) (what from_pretrained does) gives the float32 model cast afterwards, bit for
    bit, from a diffusers folder and from a float16 single file, without building the float32 model first."""
    _, folder, _ = checkpoint
    full = convert.load_diffusers(folder)

    def leaves(sd):
        return [np.asarray(a, np.float32) for a in jax.tree.leaves([nnx.state(getattr(sd, n)) for n in sd.networks])]

    half = convert.load(folder, dtype="bfloat16")
    assert half.dtype == jnp.bfloat16
    for a, b in zip(leaves(half), leaves(full.astype(jnp.bfloat16)), strict=True):
        np.testing.assert_array_equal(a, b)
    # a float16 file (as released) read as stored, then cast: the same as reading it as float32 first
    path = compvis.save_single_file(full.astype(jnp.float16), tmp_path / "half.safetensors")
    assert convert.read_state_dict(path, float32=False)["first_stage_model.quant_conv.weight"].dtype == np.float16
    configs = dict(unet=full.unet.config, vae=full.vae.config, text_encoder=full.text_encoder.config)
    direct = convert.load(path, dtype="bfloat16", **configs)
    via32 = convert.load(path, **configs).astype(jnp.bfloat16)
    for a, b in zip(leaves(direct), leaves(via32), strict=True):
        np.testing.assert_array_equal(a, b)


# ----------------------------------------------------------------------------------------------------
# Errors a person can act on: each names the problem and the fix.
# ----------------------------------------------------------------------------------------------------


def test_wrong_path_is_named(tmp_path):
    with pytest.raises(FileNotFoundError, match="no such folder: .*nowhere"):
        convert.load_diffusers(tmp_path / "nowhere")
    with pytest.raises(FileNotFoundError, match="no such checkpoint file: .*missing.safetensors"):
        compvis.load_single_file(tmp_path / "missing.safetensors")
    with pytest.raises(ValueError, match="is a folder"):
        convert.read_state_dict(tmp_path)
    (tmp_path / "model.onnx").write_bytes(b"x")
    with pytest.raises(ValueError, match="unknown checkpoint format '.onnx'"):
        convert.read_state_dict(tmp_path / "model.onnx")


def test_folder_missing_a_part(checkpoint, tmp_path):
    _, folder, _ = checkpoint
    for part in ("unet", "tokenizer", "scheduler"):
        (tmp_path / part).symlink_to(folder / part)
    with pytest.raises(FileNotFoundError, match=r"missing \['vae', 'text_encoder'\]"):
        convert.load_diffusers(tmp_path)


def test_component_without_weights_or_config(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps(UNetConfig.sd15().to_diffusers()))
    with pytest.raises(FileNotFoundError, match="no weights in .*diffusion_pytorch_model.safetensors"):
        convert.load_unet(tmp_path)
    with pytest.raises(FileNotFoundError, match="config.json is missing"):
        convert.load_vae(tmp_path / "nothing")


def test_truncated_safetensors(checkpoint, tmp_path):
    _, folder, _ = checkpoint
    data = (folder / "vae" / "diffusion_pytorch_model.safetensors").read_bytes()
    (tmp_path / "config.json").write_bytes((folder / "vae" / "config.json").read_bytes())
    (tmp_path / "diffusion_pytorch_model.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(ValueError, match="not a readable safetensors file .* truncated or corrupt"):
        convert.load_vae(tmp_path)


def test_truncated_pickle(checkpoint, tmp_path):
    _, _, (unet, _, _) = checkpoint
    torch.save({"state_dict": {"w": torch.zeros(1000)}}, tmp_path / "full.ckpt")
    data = (tmp_path / "full.ckpt").read_bytes()
    (tmp_path / "cut.ckpt").write_bytes(data[: len(data) // 2])
    with pytest.raises(ValueError, match="could not be read as a PyTorch checkpoint.*truncated or corrupt"):
        convert.read_state_dict(tmp_path / "cut.ckpt")


class NotATensor:
    pass


def test_pickle_with_code_is_refused(tmp_path):
    """weights_only=True: a pickle that would construct arbitrary objects is not unpickled."""
    with open(tmp_path / "evil.ckpt", "wb") as f:
        torch.save({"state_dict": {"w": torch.zeros(2)}, "payload": NotATensor()}, f, pickle_module=pickle)
    message = r"besides tensors \(tests.test_convert.NotATensor\).*weights_only=True.*safetensors"
    with pytest.raises(ValueError, match=message):
        convert.read_state_dict(tmp_path / "evil.ckpt")


def test_ckpt_state_dict_is_unwrapped(tmp_path):
    torch.save({"state_dict": {"a": torch.ones(2, dtype=torch.float16)}, "global_step": 10}, tmp_path / "m.ckpt")
    sd = convert.read_state_dict(tmp_path / "m.ckpt")
    assert list(sd) == ["a"] and sd["a"].dtype == np.float32


def test_missing_unexpected_and_misshapen_tensors_are_listed(checkpoint, tmp_path):
    version, folder, (unet, _, _) = checkpoint
    weights = {k: v.numpy() for k, v in unet.state_dict().items()}
    model = convert.abstract(convert.UNet2D, convert.UNetConfig.from_diffusers(dict(unet.config)))
    broken = dict(weights)
    del broken["conv_in.weight"], broken["mid_block.resnets.0.conv1.bias"]
    broken["lora_up.weight"] = np.zeros(3)
    broken["conv_out.weight"] = np.zeros((4, 32, 1, 1))
    with pytest.raises(ValueError) as e:
        convert.load_state_dict(model, broken, source="my.safetensors")
    message = str(e.value)
    assert "my.safetensors does not fit UNet2D" in message
    assert "2 tensors missing (conv_in.weight, mid_block.resnets.0.conv1.bias)" in message
    assert "1 unexpected tensors (lora_up.weight)" in message
    assert "conv_out.weight: checkpoint (4, 32, 1, 1) vs model (4, 32, 3, 3)" in message


def test_folder_of_another_shape(checkpoint, tmp_path):
    """A config.json that does not describe the weights beside it: shapes named, nothing loaded."""
    _, folder, _ = checkpoint
    config = json.loads((folder / "unet" / "config.json").read_text())
    config["block_out_channels"] = [16, 64]
    (tmp_path / "config.json").write_text(json.dumps(config))
    weights = "diffusion_pytorch_model.safetensors"
    (tmp_path / weights).symlink_to(folder / "unet" / weights)
    message = r"shape mismatches \(.*conv_in.weight: checkpoint \(32, 4, 3, 3\) vs model \(16,"
    with pytest.raises(ValueError, match=message):
        convert.load_unet(tmp_path)


def test_unsupported_config_options_are_named():
    with pytest.raises(ValueError, match="class_embed_type='timestep'"):
        UNetConfig.from_diffusers({"_class_name": "UNet2DConditionModel", "class_embed_type": "timestep"})
    with pytest.raises(ValueError, match="frobnicate \\(unknown key\\)"):
        UNetConfig.from_diffusers({"frobnicate": 1})
    with pytest.raises(ValueError, match="shift_factor=0.1159"):
        VAEConfig.from_diffusers({"shift_factor": 0.1159})


def test_foreign_single_file_is_refused(tmp_path):
    from safetensors.numpy import save_file

    save_file({"conditioner.embedders.0.transformer.x": np.zeros(2, np.float32)}, str(tmp_path / "sdxl.safetensors"))
    with pytest.raises(ValueError, match=r"not a Stable Diffusion 1.x/2.x/XL single-file checkpoint.*conditioner"):
        compvis.load_single_file(tmp_path / "sdxl.safetensors")


def test_incomplete_single_file_lists_what_is_missing(checkpoint, tmp_path):
    _, folder, _ = checkpoint
    sd = convert.load_diffusers(folder)
    ckpt = compvis.to_compvis(sd)
    del ckpt["model.diffusion_model.out.2.weight"]
    from safetensors.numpy import save_file

    save_file(ckpt, str(tmp_path / "partial.safetensors"))
    with pytest.raises(ValueError, match=r"lacks 1 tensors .*model.diffusion_model.out.2.weight"):
        compvis.load_single_file(
            tmp_path / "partial.safetensors",
            unet=sd.unet.config,
            vae=sd.vae.config,
            text_encoder=sd.text_encoder.config,
        )


def test_text_encoder_folder_of_another_model(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"architectures": ["T5EncoderModel"]}))
    with pytest.raises(ValueError, match="T5EncoderModel.*not a CLIPTextModel"):
        convert.load_text_encoder(tmp_path)


@pytest.mark.parametrize("checkpoint", ["sd1"], indirect=True)  # the layouts' code is the same for both versions
def test_sdjax_layout_and_cli_round_trip(checkpoint, tmp_path, capsys):
    """`sdjax convert`: diffusers folder → sdjax folder → CompVis file → diffusers folder, outputs unchanged."""
    from sdjax.cli import main

    version, folder, (unet, vae, text) = checkpoint
    assert main(["convert", str(folder), str(tmp_path / "native")]) == 0
    assert f"{version.upper()}, unet" in capsys.readouterr().out
    assert main(["convert", str(tmp_path / "native"), str(tmp_path / "one.safetensors")]) == 0
    assert (tmp_path / "one.safetensors").is_file()
    # a single file does not record configs: the tiny ones are passed here (the CLI assumes SD's own)
    sd = convert.load_sdjax(tmp_path / "native")
    single = compvis.load_single_file(
        tmp_path / "one.safetensors",
        unet=sd.unet.config,
        vae=sd.vae.config,
        text_encoder=sd.text_encoder.config,
        schedule=sd.schedule,
        tokenizer=sd.tokenizer,
    )
    convert.save(single, tmp_path / "back", "diffusers")
    assert_same_outputs(convert.load(tmp_path / "back"), unet, vae, text)
    assert_same_outputs(sd, unet, vae, text)
    # the diffusers folder's scheduler config survives the sdjax layout and a diffusers export; a single
    # file has none, so its export gets SD1.x's PNDM on its schedule
    original = convert.load_diffusers(folder).scheduler_config
    assert original and sd.scheduler_config == original
    convert.save(sd, tmp_path / "again", "diffusers")
    assert convert.load(tmp_path / "again").scheduler_config == original
    exported = convert.load(tmp_path / "back").scheduler_config
    assert exported["_class_name"] == "PNDMScheduler" and exported["beta_schedule"] == sd.schedule.beta_schedule
    diffusers.PNDMScheduler.from_pretrained(tmp_path / "back" / "scheduler")  # diffusers reads it


def test_sharded_weights_load(checkpoint, tmp_path):
    """Large components are saved as shards listed in ``*.index.json``; every shard is read."""
    _, _, (unet, _, _) = checkpoint
    unet.save_pretrained(tmp_path, max_shard_size="1MB")
    assert len(list(tmp_path.glob("*.safetensors"))) > 1 and list(tmp_path.glob("*.index.json"))
    model = convert.load_unet(tmp_path)
    assert all(np.array_equal(v, unet.state_dict()[k].numpy()) for k, v in convert.state_dict(model).items())
