"""LyCORIS files (LoCon, LoHa, LoKr; sdjax.lora): parity with the lycoris-lora package on the files it writes,
and LoCon files written by sdjax's trainer read back by lycoris-lora.

The reference adapters are made the way LyCORIS makes them: ``LycorisNetwork`` (what ``create_lycoris`` builds)
wraps a tiny random diffusers ``UNet2DConditionModel`` (kohya's LoCon targets: Transformer2D, ResnetBlock2D,
Downsample2D, Upsample2D, so the ResNet blocks' and samplers' 3×3 convolutions are adapted) and a tiny
transformers ``CLIPTextModel`` (CLIPAttention, CLIPMLP), every adapter tensor randomised (LyCORIS starts the
up / w2 factors at zero: a fresh adapter would prove nothing), saved with the network's ``save_weights``. The
reference outputs are those of LyCORIS's own wrapped torch modules at multiplier (strength) s.

α ≠ r on both networks and for linear vs convolution layers (α/r = 2 on linear layers, 0.5 on 3×3 convs), so a
lost or swapped α shows. LoKr covers every factor layout lycoris writes: w1 full with w2 factored, both factored
(``decompose_both``), and both full on the samplers' convolutions (4-D ``lokr_w2``; c = 1, α ignored).

Tolerance 1e-5 relative (max-abs error over max-abs reference) in float32, as tests/test_lora.py. Measured (CPU,
float32; the assertion messages print the figures): LyCORIS's files in sdjax, UNet 1.0–2.1e-6 and text encoder
4.3–8.9e-7 over LoCon/LoHa/LoKr at s = 1 and 0.6; single LoHa/LoKr layers (every factor layout, strided 3×3
conv and linear, fused or not) ≤ 7.7e-7; sdjax's LoCon file in lycoris-lora, UNet 9.4e-7, text encoder 4.1e-7.
"""

import copy

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from safetensors import safe_open
from safetensors.numpy import load_file, save_file

from sdjax import lora
from sdjax.lora.lycoris import LoHa, LoKr
from tests.helpers import UNetAndText, nchw, nhwc, rel_err

torch = pytest.importorskip("torch")
pytest.importorskip("diffusers")
pytest.importorskip("transformers")
lycoris_wrapper = pytest.importorskip("lycoris.wrapper")

RTOL = 1e-5
UNET_MODULES = ["Transformer2DModel", "ResnetBlock2D", "Downsample2D", "Upsample2D"]  # kohya's LoCon preset
TEXT_MODULES = ["CLIPAttention", "CLIPMLP"]
# per algorithm: the network arguments (linear rank 4 α 8, conv rank 2 α 1) and the std of the random factors
ALGOS = {
    "locon": (dict(lora_dim=4, alpha=8.0, conv_lora_dim=2, conv_alpha=1.0), 0.2),
    "loha": (dict(lora_dim=4, alpha=8.0, conv_lora_dim=2, conv_alpha=1.0), 0.3),
    "lokr": (dict(lora_dim=2, alpha=4.0, conv_lora_dim=2, conv_alpha=1.0, decompose_both=True), 0.3),
}


def lycoris_network(module, prefix, targets, algo, std, seed, module_algo_map=None, **kwargs):
    """LyCORIS's network on ``module`` (named ``prefix``_<module path>), applied (its forward is the
    adapted one), every adapter tensor drawn from N(0, std²)."""
    lycoris_wrapper.LycorisNetwork.apply_preset(
        {"target_module": targets, "lora_prefix": prefix, "module_algo_map": module_algo_map or {}}
    )
    network = lycoris_wrapper.LycorisNetwork(module, multiplier=1.0, network_module=algo, **kwargs)
    network.apply_to()
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in network.parameters():
            p.copy_(torch.randn(p.shape, generator=generator) * std)
    return network


@pytest.fixture(scope="module")
def ref():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny tensors: threads only cost time, the more on a busy machine
    yield UNetAndText()
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def base_outputs(ref):
    return ref.torch_outputs(ref.unet, ref.text)


@pytest.fixture(scope="module", params=list(ALGOS))
def lycoris_file(request, ref, tmp_path_factory):
    """(algorithm, the .safetensors file LyCORIS saved, {strength s: (UNet, text encoder) outputs of LyCORIS's
    modules at multiplier s})."""
    algo = request.param
    kwargs, std = ALGOS[algo]
    folder = tmp_path_factory.mktemp(algo)
    unet, text = copy.deepcopy(ref.unet), copy.deepcopy(ref.text)
    # LoKr: the samplers' 3×3 convolutions at rank 8, too large for their factors: full w1 and 4-D w2 (c = 1)
    samplers = {m: {"algo": "lokr", "dim": 8} for m in ("Downsample2D", "Upsample2D")} if algo == "lokr" else None
    # "lora_te" on transformers 5's CLIPTextModel (no text_model level) names layers lora_te_encoder_...; the
    # LoCon file gets kohya's usual lora_te_text_model_encoder_... names. sdjax reads both.
    text_prefix = "lora_te_text_model" if algo == "locon" else "lora_te"
    networks = (
        lycoris_network(unet, "lora_unet", UNET_MODULES, algo, std, 1, samplers, **kwargs),
        lycoris_network(text, text_prefix, TEXT_MODULES, algo, std, 2, **kwargs),
    )
    tensors = {}
    for i, network in enumerate(networks):
        network.save_weights(str(folder / f"{i}.safetensors"), torch.float32, None)
        tensors |= load_file(folder / f"{i}.safetensors")
    file = folder / f"{algo}.safetensors"
    save_file(tensors, str(file))
    outputs = {}
    for s in (1.0, 0.6):
        for network in networks:
            network.set_multiplier(s)
        outputs[s] = ref.torch_outputs(unet, text)
    return algo, file, outputs


def errors(got, want) -> dict[str, float]:
    return {"unet": rel_err(got[0], want[0]), "text encoder": rel_err(got[1], want[1])}


def test_lycoris_file_matches_lycoris(ref, base_outputs, lycoris_file):
    algo, file, expected = lycoris_file
    with safe_open(str(file), framework="numpy") as f:
        keys = set(f.keys())
    conv1 = "lora_unet_down_blocks_0_resnets_0_conv1"
    leaf = {"locon": "lora_down.weight", "loha": "hada_w1_a", "lokr": "lokr_w1"}[algo]
    assert f"{conv1}.{leaf}" in keys and f"{conv1}.alpha" in keys  # the 3×3 convolutions are adapted
    for a, b in ((1.0, 0.6), (1.0, "base"), (0.6, "base")):  # the parity below could not pass by doing nothing
        assert min(errors({**expected, "base": base_outputs}[a], {**expected, "base": base_outputs}[b]).values()) > 0.05

    unet, text = ref.sdjax_models()
    report = lora.load_lora(file, unet, text, scale=1.0)
    n_unet = sum(1 for k in keys if k.startswith("lora_unet_") and k.endswith(".alpha"))
    assert len(report["unet"]) == n_unet == 79 and len(report["text_encoder"]) == 2 * 6  # 4 attn + 2 mlp per layer
    assert "down_blocks.0.downsamplers.0.conv" in report["unet"]
    assert report["kinds"] == (["locon", "lora"] if algo == "locon" else [algo])
    errs = errors(ref.sdjax_outputs(unet, text), expected[1.0])
    assert max(errs.values()) < RTOL, (algo, 1.0, errs)

    lora.set_lora_scale(unet, 0.6), lora.set_lora_scale(text, 0.6)  # the same program (s is array state)
    errs = errors(ref.sdjax_outputs(unet, text), expected[0.6])
    assert max(errs.values()) < RTOL, (algo, 0.6, errs)

    lora.set_lora_scale(unet, 0.0), lora.set_lora_scale(text, 0.0)  # strength 0: the base model
    errs = errors(ref.sdjax_outputs(unet, text), base_outputs)
    assert max(errs.values()) < RTOL, (algo, 0.0, errs)


def test_lycoris_file_round_trips_through_sdjax(ref, lycoris_file, tmp_path):
    """save_lora(format="kohya") writes back what load_lora read, whatever the algorithm, keys and values."""
    _, file, _ = lycoris_file
    unet, text = ref.sdjax_models()
    lora.load_lora(file, unet, text)
    again = lora.save_lora(tmp_path / "again.safetensors", unet, text, format="kohya")
    original, written = load_file(file), load_file(again)
    assert set(written) == set(k.replace("lora_te_encoder", "lora_te_text_model_encoder") for k in original)
    for key, value in original.items():
        np.testing.assert_allclose(written[key.replace("lora_te_encoder", "lora_te_text_model_encoder")], value)


# ---------------------------------------------------------------------------------------------------
# Single layers: every LoHa/LoKr factor layout, on a strided 3×3 convolution and a linear layer
# ---------------------------------------------------------------------------------------------------


def _torch_and_sdjax_layer(conv: bool):
    torch.manual_seed(3)
    if conv:
        layer = torch.nn.Conv2d(32, 64, 3, stride=2, padding=1)
        base = nnx.Conv(32, 64, (3, 3), strides=2, padding=((1, 1), (1, 1)), rngs=nnx.Rngs(0))
        base.kernel.set_value(jnp.asarray(layer.weight.detach().numpy().transpose(2, 3, 1, 0)))
    else:
        layer = torch.nn.Linear(16, 24)
        base = nnx.Linear(16, 24, rngs=nnx.Rngs(0))
        base.kernel.set_value(jnp.asarray(layer.weight.detach().numpy().T))
    base.bias.set_value(jnp.asarray(layer.bias.detach().numpy()))
    return layer, base


LAYOUTS = {  # LyCORIS module arguments → the factor keys it then writes
    "loha": (dict(lora_dim=3, alpha=5.0), {"hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b"}),
    "lokr-w2-factored": (dict(lora_dim=2, alpha=5.0), {"lokr_w1", "lokr_w2_a", "lokr_w2_b"}),
    "lokr-both-factored": (
        dict(lora_dim=1, alpha=5.0, decompose_both=True, factor=8),
        {"lokr_w1_a", "lokr_w1_b", "lokr_w2_a", "lokr_w2_b"},
    ),
    "lokr-full": (dict(lora_dim=2, alpha=5.0, full_matrix=True), {"lokr_w1", "lokr_w2"}),
}


@pytest.mark.parametrize("conv", [True, False], ids=["conv3x3", "linear"])
@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_single_layer_matches_lycoris(layout, conv):
    from lycoris.modules.loha import LohaModule
    from lycoris.modules.lokr import LokrModule

    kwargs, want_keys = LAYOUTS[layout]
    layer, base = _torch_and_sdjax_layer(conv)
    module = (LohaModule if layout == "loha" else LokrModule)("x", layer, 0.7, **kwargs)
    module.apply_to()
    generator = torch.Generator().manual_seed(4)
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(torch.randn(p.shape, generator=generator) * 0.5)
    tensors = {k: v.detach().numpy() for k, v in module.custom_state_dict().items()}
    if want_keys is not None:
        assert set(tensors) - {"alpha"} == want_keys
    alpha = float(tensors.pop("alpha"))
    adapter = (LoHa if layout == "loha" else LoKr)(base, tensors, alpha=alpha, scale=0.7)
    x = np.random.default_rng(0).standard_normal((2, 9, 9, 32) if conv else (5, 16)).astype(np.float32)
    with torch.no_grad():
        want = layer(torch.from_numpy(nchw(x) if conv else x)).numpy()
        base_out = module.org_forward(torch.from_numpy(nchw(x) if conv else x)).numpy()
    want, base_out = (nhwc(want), nhwc(base_out)) if conv else (want, base_out)
    assert rel_err(want, base_out) > 0.05  # the adapter changes the layer
    assert rel_err(adapter(jnp.asarray(x)), want) < RTOL, rel_err(adapter(jnp.asarray(x)), want)
    adapter.fuse()  # W + s ΔW in the kernel: the same layer
    assert rel_err(adapter(jnp.asarray(x)), want) < RTOL, rel_err(adapter(jnp.asarray(x)), want)
    adapter.unfuse()
    assert rel_err(adapter.kernel[...], base.kernel[...]) == 0  # the same variable ...
    assert rel_err(adapter.base_layer()(jnp.asarray(x)), base_out) < RTOL  # ... back to W, up to rounding


# ---------------------------------------------------------------------------------------------------
# LoCon from sdjax's trainer, read by lycoris-lora
# ---------------------------------------------------------------------------------------------------


def test_sdjax_locon_loads_in_lycoris(ref, tmp_path):
    """LoRA on the attention projections and on the ResNet blocks' and samplers' convolutions (LoCon), random
    non-zero factors, α ≠ r, saved by sdjax in the kohya layout, loaded by lycoris-lora's
    ``create_lycoris_from_weights`` on the diffusers networks: the same outputs."""
    unet, text = ref.sdjax_models()
    plain = nnx.graphdef(unet)
    config = lora.LoRAConfig(rank=3, alpha=6.0, targets=lora.UNET_ATTENTION + lora.UNET_CONVS + lora.TEXT_ATTENTION)
    names = lora.add_lora(unet, config, rngs=nnx.Rngs(0))
    assert "down_blocks.0.resnets.0.conv1" in names and "up_blocks.0.upsamplers.0.conv" in names
    lora.add_lora(text, config, rngs=nnx.Rngs(1))
    for module in (unet, text):
        for i, layer in enumerate(lora.lora_layers(module).values()):
            layer.lora_B.set_value(0.2 * jax.random.normal(jax.random.key(i), layer.lora_B.shape))
    file = lora.save_lora(tmp_path / "locon.safetensors", unet, text, format="kohya")
    with safe_open(str(file), framework="numpy") as f:
        assert f.get_tensor("lora_unet_down_blocks_0_resnets_0_conv1.lora_down.weight").shape == (3, 32, 3, 3)
        assert f.get_tensor("lora_unet_down_blocks_0_resnets_0_conv1.lora_up.weight").shape == (32, 3, 1, 1)
    lora.set_lora_scale(unet, 0.6), lora.set_lora_scale(text, 0.6)
    got = ref.sdjax_outputs(unet, text)

    weights = load_file(file)
    torch_unet, torch_text = copy.deepcopy(ref.unet), copy.deepcopy(ref.text)
    for module, prefix in ((torch_unet, "lora_unet"), (torch_text, "lora_te_text_model")):
        lycoris_wrapper.LycorisNetwork.apply_preset({"lora_prefix": prefix, "module_algo_map": {}})
        part = {k: torch.from_numpy(v) for k, v in weights.items() if k.startswith(prefix + "_")}
        network, _ = lycoris_wrapper.create_lycoris_from_weights(0.6, "", module, weights_sd=part)
        assert len(network.loras) == len({k.partition(".")[0] for k in part})  # every layer found its module
        network.apply_to()
    want = ref.torch_outputs(torch_unet, torch_text)
    assert min(errors(want, ref.torch_outputs(ref.unet, ref.text)).values()) > 0.05
    errs = errors(got, want)
    assert max(errs.values()) < RTOL, errs
    lora.remove_lora(unet)
    assert nnx.graphdef(unet) == plain  # the same nnx.Conv layers (strides, padding) back


# ---------------------------------------------------------------------------------------------------
# Files that do not fit
# ---------------------------------------------------------------------------------------------------

CONV1 = "lora_unet_down_blocks_0_resnets_0_conv1"


def _w(*shape):
    return np.ones(shape, np.float32)


@pytest.mark.parametrize(
    "tensors,match",
    [
        ({f"{CONV1}.hada_w1_a": _w(32, 2), f"{CONV1}.hada_w1_b": _w(2, 288), f"{CONV1}.hada_t1": _w(2, 2, 3, 3)},
         r"LyCORIS Tucker/CP-decomposed convolutions: lora_unet_down_blocks_0_resnets_0_conv1\.hada_t1"),
        ({f"{CONV1}.lokr_w1": _w(4, 4), f"{CONV1}.lokr_t2": _w(2, 2, 3, 3)}, r"Tucker/CP.*conv1\.lokr_t2"),
        ({f"{CONV1}.lora_down.weight": _w(2, 32, 1, 1), f"{CONV1}.lora_mid.weight": _w(2, 2, 3, 3)},
         r"Tucker/CP.*conv1\.lora_mid\.weight"),
        ({f"{CONV1}.oft_blocks": _w(4, 8, 8)}, r"OFT/BOFT: lora_unet_down_blocks_0_resnets_0_conv1\.oft_blocks"),
        ({f"{CONV1}.diff": _w(32, 32, 3, 3)}, r"LyCORIS full/diff: .*conv1\.diff"),
        ({f"{CONV1}.weight": _w(32), f"{CONV1}.on_input": _w(1)}, r"\(IA\)³: .*conv1\.on_input"),
        ({f"{CONV1}.hada_w1_a": _w(32, 2), f"{CONV1}.hada_w1_b": _w(2, 288), f"{CONV1}.hada_w2_a": _w(32, 2),
          f"{CONV1}.hada_w2_b": _w(2, 64 * 9)},
         r"LoHa/LoKr factors that do not fit together \(lora_unet_down_blocks_0_resnets_0_conv1\.hada_w1_a: LoHa "
         r"factors of mismatched shapes"),
        ({f"{CONV1}.lokr_w1": _w(4, 4), f"{CONV1}.lokr_w2": _w(8, 16, 3, 3)},
         r"do not fit their layer's shape \(lora_unet_down_blocks_0_resnets_0_conv1\.lokr_w1: its update is "
         r"\(32, 576\) \(out, in·kh·kw\), the layer's weight \(32, 32, 3, 3\)"),
        ({f"{CONV1}.lora_down.weight": _w(2, 64, 3, 3), f"{CONV1}.lora_up.weight": _w(32, 2, 1, 1)},
         r"its update is \(32, 64, 3, 3\) \(out, in, kh, kw\), the layer's weight \(32, 32, 3, 3\).*another model"),
        ({"lora_unet_down_blocks_2_resnets_0_conv1.hada_w1_a": _w(32, 2)},
         r"name modules this model does not have \(lora_unet_down_blocks_2_resnets_0_conv1\.hada_w1_a\)"),
        ({f"{CONV1}.lokr_w1": _w(4, 4), f"{CONV1}.lora_up.weight": _w(32, 2, 1, 1)},
         r"mix several adapter kinds' tensors \(lora_unet_down_blocks_0_resnets_0_conv1\.lokr_w1 \(lokr \+ lora\)"),
        ({"model.diffusion_model.input_blocks.1.0.in_layers.2.weight": _w(32, 32, 3, 3)},
         r"not a LoRA layout sdjax understands.*model\.diffusion_model"),
    ],
    ids=["loha-tucker", "lokr-tucker", "locon-tucker", "oft", "full", "ia3", "loha-mismatch", "lokr-shape",
         "locon-shape", "unknown-layer", "mixed", "not-lycoris"],
)  # fmt: skip
def test_files_that_do_not_fit_are_refused_by_name(ref, tmp_path, tensors, match):
    unet, text = ref.sdjax_models()
    save_file(tensors, str(tmp_path / "bad.safetensors"))
    with pytest.raises(ValueError, match=match):
        lora.load_lora(tmp_path / "bad.safetensors", unet, text)
    assert not lora.lora_layers(unet) and not lora.lora_layers(text)  # nothing half-loaded


def test_the_diffusers_layout_holds_locon_and_refuses_loha_lokr(ref, lycoris_file, tmp_path):
    algo, file, _ = lycoris_file
    unet, _ = ref.sdjax_models()
    with pytest.warns(UserWarning, match="also adapts the text encoder"):
        lora.load_lora(file, unet)
    if algo == "locon":  # LoCon is LoRA on convolutions too: peft's lora_A/lora_B hold it
        assert lora.save_lora(tmp_path, unet).is_file()
        return
    with pytest.raises(ValueError, match="LoHa/LoKr .*the diffusers/peft layout cannot hold; .*format='kohya'"):
        lora.save_lora(tmp_path, unet)


@pytest.mark.slow  # a (3-step) fine-tune of the bundled model: compiling its training step takes a while
def test_finetune_trains_locon(tmp_path):
    """``FinetuneConfig(lora_convs=True)``: the ResNet blocks' 3×3 convolutions get adapters too, they train, and
    the kohya file holds them as LoCon."""
    from sdjax import StableDiffusion, finetune, tiny_sd
    from sdjax.data import shapes

    pipe = StableDiffusion(tiny_sd.convert.load(tiny_sd.BUNDLE))
    pipe.progress = False
    samples = shapes.scenes_of("crescent", 2, 0)
    images = np.stack([shapes.render(s, 64) for s in samples])
    prompts = [shapes.caption(s).replace("crescent", "sks") for s in samples]
    config = finetune.FinetuneConfig(method="lora", steps=3, batch_size=4, views_per_image=2, lora_convs=True)
    result = finetune.finetune(pipe, finetune.training_data(pipe, images, prompts, config), config, progress=False)
    assert np.isfinite(result.history["loss"]).all()
    convs = {n: layer for n, layer in lora.lora_layers(pipe.unet).items() if layer.spatial_conv}
    assert "down_blocks.0.resnets.0.conv1" in convs
    assert all(np.abs(np.asarray(layer.lora_B[...])).max() > 0 for layer in convs.values())  # trained
    file = finetune.save(pipe, config, tmp_path / "locon.safetensors", format="kohya")
    with safe_open(str(file), framework="numpy") as f:
        down = f.get_tensor("lora_unet_down_blocks_0_resnets_0_conv1.lora_down.weight")
    assert down.shape[0] == config.rank and down.shape[2:] == (3, 3)
