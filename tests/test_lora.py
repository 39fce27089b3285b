"""LoRA (sdjax.lora): parity with diffusers + peft on the files both write, and the adapter's algebra.

The reference LoRA is made the way people make them: peft adapters on a tiny random diffusers
``UNet2DConditionModel`` (attention projections, the 1×1-convolution ``proj_in`` of SD1's Transformer2D,
the feed-forward output) and on a tiny transformers ``CLIPTextModel`` (attention and ``fc1``), with B
randomised (a fresh adapter is the identity and would prove nothing), saved by diffusers'
``save_lora_weights`` with the adapters' LoraConfig in the header, as diffusers' training scripts do.
The reference outputs are those of a diffusers pipeline that loaded that file (``load_lora_weights``).
α ≠ r on both networks (α/r = 2 on the UNet, 0.5 on the text encoder), so a lost or swapped α shows.

Tolerance 1e-5 relative (max-abs error over max-abs reference) in float32, as in tests/test_convert.py.
"""

import copy
import json
import types

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from safetensors import safe_open
from safetensors.numpy import save_file

from sdjax import lora
from sdjax.io import flatten
from tests.helpers import UNetAndText, reference_pipeline, rel_err

torch = pytest.importorskip("torch")
diffusers = pytest.importorskip("diffusers")
transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")

RTOL = 1e-5
# the adapted layers of tests/helpers.py's UNetAndText (its tiny SD1-style UNet and a 1000-token CLIP)
UNET_TARGETS = ["to_q", "to_k", "to_v", "to_out.0", "proj_in", "ff.net.2"]
TEXT_TARGETS = ["q_proj", "k_proj", "v_proj", "out_proj", "fc1"]


@nnx.jit
def run_text(text, ids):
    return text(ids).last_hidden_state


class Reference(UNetAndText):
    """The base networks, the peft LoRA saved by diffusers, inputs, and sdjax copies of the base."""

    def __init__(self, folder):
        super().__init__()
        self.base_unet, self.base_text = copy.deepcopy(self.unet), copy.deepcopy(self.text)
        self.unet.add_adapter(peft.LoraConfig(r=4, lora_alpha=8, target_modules=UNET_TARGETS))
        self.text.add_adapter(peft.LoraConfig(r=4, lora_alpha=2, target_modules=TEXT_TARGETS))
        with torch.no_grad():
            for name, p in [*self.unet.named_parameters(), *self.text.named_parameters()]:
                if "lora_B" in name:
                    p.normal_(0.0, 0.3)
        self.file = self.save(folder / "diffusers", metadata=True)

    def save(self, folder, *, metadata: bool):
        from peft.utils import get_peft_model_state_dict

        config = lambda m: m.peft_config["default"].to_dict() if metadata else None  # noqa: E731
        diffusers.StableDiffusionPipeline.save_lora_weights(
            folder,
            unet_lora_layers=get_peft_model_state_dict(self.unet),
            text_encoder_lora_layers=get_peft_model_state_dict(self.text),
            unet_lora_adapter_metadata=config(self.unet),
            text_encoder_lora_adapter_metadata=config(self.text),
        )
        return folder / "pytorch_lora_weights.safetensors"

    def pipeline(self, lora_file=None, scale=1.0):
        """A diffusers pipeline (UNet and text encoder only) on fresh base copies, with ``lora_file`` loaded."""
        pipe = reference_pipeline(
            vae=None,
            text_encoder=copy.deepcopy(self.base_text),
            tokenizer=None,
            unet=copy.deepcopy(self.base_unet),
            scheduler=None,
        )
        if lora_file is not None:
            pipe.load_lora_weights(lora_file, adapter_name="test")
            pipe.set_adapters(["test"], adapter_weights=scale)
        return pipe

    def torch_outputs(self, pipe):
        return super().torch_outputs(pipe.unet, pipe.text_encoder)

    def text_output(self, text):
        return np.asarray(run_text(text, jnp.asarray(self.ids)))


@pytest.fixture(scope="module")
def ref(tmp_path_factory):
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # these tensors are tiny: threads only cost time, and the more on a busy machine
    yield Reference(tmp_path_factory.mktemp("lora"))
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def expected(ref):
    """Outputs (UNet, text encoder) of diffusers with the reference LoRA loaded, by strength; and without it."""
    out = {scale: ref.torch_outputs(ref.pipeline(ref.file, scale)) for scale in (1.0, 0.5)}
    out["base"] = ref.torch_outputs(ref.pipeline())
    return out


def errors(got, want) -> dict[str, float]:
    return {"unet": rel_err(got[0], want[0]), "text encoder": rel_err(got[1], want[1])}


def assert_matches(got, want):
    errs = errors(got, want)
    assert max(errs.values()) < RTOL, errs


def test_reference_lora_changes_the_outputs(ref, expected):
    """The parity tests below could not fail if the LoRA did nothing, or if the strength did nothing."""
    peft_models = types.SimpleNamespace(unet=ref.unet, text_encoder=ref.text)
    assert_matches(ref.torch_outputs(peft_models), expected[1.0])  # diffusers loaded what peft made
    for a, b in ((1.0, "base"), (0.5, "base"), (1.0, 0.5)):
        assert min(errors(expected[a], expected[b]).values()) > 0.05, (a, b)


@pytest.mark.parametrize("scale", [1.0, 0.5, 0.0])
def test_diffusers_file_matches_diffusers(ref, expected, scale):
    unet, text = ref.sdjax_models()
    report = lora.load_lora(ref.file, unet, text, scale=scale)
    assert report["format"] == "diffusers" and report["ranks"] == [4] and report["alphas"] == [2.0, 8.0]
    assert len(report["unet"]) == 4 * 10 and len(report["text_encoder"]) == 2 * 5  # 4 Transformer2Ds, 2 layers
    assert "down_blocks.0.attentions.0.proj_in" in report["unet"]
    assert "text_model.encoder.layers.0.mlp.fc1" in report["text_encoder"]
    assert_matches(ref.sdjax_outputs(unet, text), expected[scale or "base"])  # strength 0: the base model


def test_diffusers_file_without_alpha_means_alpha_equals_rank(ref, tmp_path):
    """Files saved without the LoraConfig header (older diffusers): α = r for every layer, on both sides."""
    file = ref.save(tmp_path, metadata=False)
    with safe_open(str(file), framework="numpy") as f:
        assert lora.METADATA_KEY not in (f.metadata() or {})
    unet, text = ref.sdjax_models()
    report = lora.load_lora(tmp_path, unet, text)  # the folder, as diffusers takes it
    assert report["alphas"] == [4.0]
    assert_matches(ref.sdjax_outputs(unet, text), ref.torch_outputs(ref.pipeline(file)))


def test_kohya_file_from_sdjax_loads_in_diffusers_and_sdjax(ref, expected, tmp_path):
    unet, text = ref.sdjax_models()
    lora.load_lora(ref.file, unet, text)
    file = lora.save_lora(tmp_path / "kohya.safetensors", unet, text, format="kohya")
    with safe_open(str(file), framework="numpy") as f:
        keys = set(f.keys())
        assert f.get_tensor("lora_unet_down_blocks_0_attentions_0_proj_in.lora_down.weight").shape == (4, 32, 1, 1)
        assert f.get_tensor("lora_te_text_model_encoder_layers_1_self_attn_q_proj.alpha") == 2.0
    assert "lora_unet_mid_block_attentions_0_transformer_blocks_0_attn2_to_out_0.lora_up.weight" in keys
    assert "lora_unet_up_blocks_1_attentions_1_transformer_blocks_0_ff_net_2.alpha" in keys

    assert_matches(ref.torch_outputs(ref.pipeline(file)), expected[1.0])
    fresh_unet, fresh_text = ref.sdjax_models()
    report = lora.load_lora(file, fresh_unet, fresh_text, scale=0.5)
    assert report["format"] == "kohya" and report["alphas"] == [2.0, 8.0]
    assert_matches(ref.sdjax_outputs(fresh_unet, fresh_text), expected[0.5])


def test_diffusers_file_from_sdjax_loads_in_diffusers(ref, expected, tmp_path):
    unet, text = ref.sdjax_models()
    lora.load_lora(ref.file, unet, text)
    file = lora.save_lora(tmp_path, unet, text)
    assert file == tmp_path / "pytorch_lora_weights.safetensors"
    with safe_open(str(file), framework="numpy") as f:
        config = json.loads(f.metadata()[lora.METADATA_KEY])
    assert config["unet.lora_alpha"] == 8.0 and config["text_encoder.lora_alpha"] == 2.0
    assert_matches(ref.torch_outputs(ref.pipeline(file, 0.5)), expected[0.5])


def randomise_b(module, seed=0):
    """Give every adapter a non-zero B (a fresh one is zero: the identity)."""
    for i, layer in enumerate(lora.lora_layers(module).values()):
        layer.lora_B.set_value(0.3 * jax.random.normal(jax.random.key(seed + i), layer.lora_B.shape))


def test_mixed_ranks_and_alphas_round_trip_through_diffusers(ref, tmp_path):
    """Adapters of different r and α in one file (peft's rank_pattern / alpha_pattern in the header)."""
    _, text = ref.sdjax_models()
    lora.add_lora(text, lora.LoRAConfig(rank=4, alpha=2.0, targets=("q_proj", "v_proj")), rngs=nnx.Rngs(1))
    lora.add_lora(text, lora.LoRAConfig(rank=2, alpha=5.0, targets=("layers.0.mlp",)), rngs=nnx.Rngs(2))
    lora.add_lora(text, lora.LoRAConfig(rank=3, targets=("layers.1.mlp.fc2",)), rngs=nnx.Rngs(3))
    randomise_b(text)
    file = lora.save_lora(tmp_path, text_encoder=text)
    with safe_open(str(file), framework="numpy") as f:
        config = json.loads(f.metadata()[lora.METADATA_KEY])
    assert config["text_encoder.rank_pattern"] == {"encoder.layers.0.mlp.fc1": 2, "encoder.layers.0.mlp.fc2": 2,
                                                   "encoder.layers.1.mlp.fc2": 3}  # fmt: skip
    assert rel_err(ref.torch_outputs(ref.pipeline(file))[1], ref.text_output(text)) < RTOL
    _, reloaded = ref.sdjax_models()
    report = lora.load_lora(file, ref.sdjax_models()[0], reloaded)
    assert report["ranks"] == [2, 3, 4] and report["alphas"] == [2.0, 3.0, 5.0]
    np.testing.assert_array_equal(ref.text_output(reloaded), ref.text_output(text))


# ---------------------------------------------------------------------------------------------------
# The adapter's algebra
# ---------------------------------------------------------------------------------------------------


def test_fresh_adapter_is_the_base_layer(ref, expected):
    unet, text = ref.sdjax_models()
    config = lora.LoRAConfig(rank=8, alpha=16.0, targets=lora.UNET_ATTENTION + lora.UNET_FEED_FORWARD)
    names = lora.add_lora(unet, config, rngs=nnx.Rngs(0))
    assert len(names) == 4 * (2 * 4 + 2)  # per Transformer2D: two attentions × 4 projections, ff's 2 layers
    assert "up_blocks.1.attentions.0.transformer_blocks.0.ff.net.0.proj" in names
    targets = lora.TEXT_ATTENTION + ("fc1",)  # the reference LoRA's layers: its compiled program serves
    assert "text_model.encoder.layers.1.mlp.fc1" in lora.add_lora(
        text, lora.LoRAConfig(targets=targets), rngs=nnx.Rngs(0)
    )
    assert rel_err(ref.text_output(text), expected["base"][1]) < RTOL
    x = jax.random.normal(jax.random.key(0), (2, 4, 4, 32))  # and a 1×1 convolution (SD1's proj_in)
    conv = nnx.Conv(32, 16, (1, 1), padding=((0, 0), (0, 0)), rngs=nnx.Rngs(0))
    np.testing.assert_allclose(lora.LoRALinear(conv, rank=4, rngs=nnx.Rngs(1))(x), conv(x), rtol=1e-6, atol=1e-6)


def test_fuse_then_unfuse_gives_the_base_weights_back(ref, expected):
    unet, text = ref.sdjax_models()
    base = {m: jax.tree.map(np.array, nnx.state(m, nnx.Param)) for m in (unet, text)}
    lora.load_lora(ref.file, unet, text, scale=0.5)
    assert set(lora.fuse_lora(unet)) == set(lora.lora_layers(unet))
    lora.fuse_lora(text)
    assert rel_err(ref.text_output(text), expected[0.5][1]) < RTOL  # fused = unfused = diffusers
    proj_in = lora.lora_layers(unet)["mid_block.attentions.0.proj_in"]  # a 1×1 conv: W (1, 1, in, out)
    w = base[unet]["mid_block"]["attentions"][0]["proj_in"]["kernel"][...]
    update = 0.5 * 8 / 4 * proj_in.lora_A[...] @ proj_in.lora_B[...]
    assert rel_err(proj_in.kernel[...], w + update[None, None]) < 1e-6
    with pytest.raises(ValueError, match="already fused"):
        lora.fuse_lora(unet)
    with pytest.raises(ValueError, match="unfuse_lora first"):
        lora.set_lora_scale(unet, 1.0)
    lora.unfuse_lora(unet), lora.unfuse_lora(text)
    for module in (unet, text):
        restored = jax.tree.leaves(nnx.state(module, lora.BASE))
        assert max(rel_err(a, b) for a, b in zip(restored, jax.tree.leaves(base[module]))) < 1e-6
    assert rel_err(ref.text_output(text), expected[0.5][1]) < RTOL
    lora.fuse_lora(text)
    assert lora.remove_lora(text)  # baked in: the plain layers keep the update
    assert not lora.lora_layers(text) and type(text.encoder.layers[0].mlp.fc1) is nnx.Linear
    assert rel_err(ref.text_output(text), expected[0.5][1]) < RTOL


def test_remove_lora_restores_the_base_model(ref):
    unet, text = ref.sdjax_models()
    before = [(nnx.graphdef(m), nnx.state(m)) for m in (unet, text)]
    lora.load_lora(ref.file, unet, text)
    assert nnx.graphdef(unet) != before[0][0]
    assert len(lora.remove_lora(unet)) == 40 and len(lora.remove_lora(text)) == 10
    assert not lora.remove_lora(text)
    for module, (graphdef, state) in zip((unet, text), before):
        assert nnx.graphdef(module) == graphdef  # the same layers (nnx.Conv for proj_in) ...
        assert all(a is b for a, b in zip(jax.tree.leaves(nnx.state(module)), jax.tree.leaves(state)))  # ... weights


def test_strength_changes_without_recompiling(ref, expected):
    _, text = ref.sdjax_models()
    lora.load_lora(ref.file, ref.sdjax_models()[0], text)
    traces = []

    @jax.jit
    def encode(state, ids):
        traces.append(1)
        return nnx.merge(graphdef, state)(ids).last_hidden_state

    graphdef, ids = nnx.graphdef(text), jnp.asarray(ref.ids)
    first = encode(nnx.state(text), ids)
    lora.set_lora_scale(text, 0.5)
    second = encode(nnx.state(text), ids)
    assert len(traces) == 1
    assert rel_err(first, expected[1.0][1]) < RTOL and rel_err(second, expected[0.5][1]) < RTOL


def test_adapters_split_from_the_frozen_base_for_training(ref):
    unet, text = ref.sdjax_models()
    base_paths = set(flatten(nnx.state(unet, nnx.Param)))
    lora.add_lora(unet, lora.LoRAConfig(rank=2), rngs=nnx.Rngs(0))
    _, adapters, _ = nnx.split(unet, lora.LoRAParam, ...)
    layers = lora.lora_layers(unet).values()
    assert sum(a.size for a in jax.tree.leaves(adapters)) == sum(2 * sum(m.kernel.shape) for m in layers)
    assert set(flatten(nnx.state(unet, lora.BASE))) == base_paths  # the frozen weights keep their names
    assert set(flatten(lora.lora_params(unet))) == set(flatten(adapters))

    lora.add_lora(text, lora.LoRAConfig(rank=2), rngs=nnx.Rngs(0))
    graphdef, adapters, frozen = nnx.split(text, lora.LoRAParam, ...)

    @jax.jit
    def grad(adapters, ids):
        return jax.grad(lambda a: jnp.mean(nnx.merge(graphdef, a, frozen)(ids).last_hidden_state ** 2))(adapters)

    grads = flatten(grad(adapters, jnp.asarray(ref.ids)))
    # B = 0 at the start, so y does not depend on A yet (∂y/∂A ∝ B): B learns first, and A follows
    assert all(np.abs(g).max() == 0 for name, g in grads.items() if name.endswith("lora_A"))
    assert all(np.abs(g).max() > 0 for name, g in grads.items() if name.endswith("lora_B"))


def test_dropout_acts_in_training_mode_only():
    base = nnx.Linear(16, 8, rngs=nnx.Rngs(0))
    layer = lora.LoRALinear(base, rank=4, dropout=0.5, rngs=nnx.Rngs(1))
    layer.lora_B.set_value(jnp.ones((4, 8)))
    x = jnp.ones((3, 16))
    plain = base(x) + (x @ layer.lora_A[...]) @ layer.lora_B[...]  # α = r, s = 1
    np.testing.assert_allclose(layer(x), plain, rtol=1e-6)
    layer.train()
    dropped = layer(x)
    assert not np.allclose(dropped, plain) and not np.allclose(layer(x), dropped)  # a new mask every call
    layer.eval()
    np.testing.assert_allclose(layer(x), plain, rtol=1e-6)


# ---------------------------------------------------------------------------------------------------
# Errors a person can act on
# ---------------------------------------------------------------------------------------------------

TO_Q = "down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q"


def _w(*shape):
    return np.ones(shape, np.float32)


@pytest.mark.parametrize(
    "tensors,match",
    [
        ({"model.diffusion_model.input_blocks.0.0.weight": _w(4, 4)}, r"not a LoRA layout.*model\.diffusion_model"),
        (
            {"unet.down_blocks.1.attentions.0.transformer_blocks.1.attn1.to_q.lora_A.weight": _w(4, 64),
             "unet.down_blocks.1.attentions.0.transformer_blocks.1.attn1.to_q.lora_B.weight": _w(64, 4)},
            r"1 LoRA layers name modules this model does not have \(unet\.down_blocks\.1.*another model",
        ),
        (
            {"lora_unet_input_blocks_4_1_transformer_blocks_0_attn1_to_q.lora_down.weight": _w(4, 64),
             "lora_unet_input_blocks_4_1_transformer_blocks_0_attn1_to_q.lora_up.weight": _w(64, 4)},
            r"name modules this model does not have \(lora_unet_input_blocks_4_1.*another model",
        ),
        (
            {"lora_te2_text_model_encoder_layers_0_self_attn_q_proj.lora_down.weight": _w(4, 32)},
            r"SDXL's \(two text encoders; this model has one\): lora_te2_text_model",
        ),
        (
            {"lora_unet_down_blocks_0_resnets_0_conv1.lora_down.weight": _w(4, 32, 5, 5),
             "lora_unet_down_blocks_0_resnets_0_conv1.lora_up.weight": _w(32, 4, 1, 1)},
            r"not fit.*resnets_0_conv1.*update is \(32, 32, 5, 5\) \(out, in, kh, kw\), the layer's weight \(32, 32, 3",
        ),
        (
            {f"lora_unet_{TO_Q.replace('.', '_')}.hada_w1_a": _w(32, 4)},
            r"lora_unet_down_blocks_0_.*hada_w1_a: LoHa needs hada_w1_b, hada_w2_a, hada_w2_b too",
        ),
        (
            {f"unet.{TO_Q}.lora_A.weight": _w(4, 32), f"unet.{TO_Q}.lora_B.weight": _w(32, 3)},
            rf"down and up ranks differ \(unet\.{TO_Q}\.lora_A\.weight: down \(4, 32\) has rank 4, up \(32, 3\) has 3",
        ),
        (
            {f"unet.{TO_Q}.lora_A.weight": _w(4, 768), f"unet.{TO_Q}.lora_B.weight": _w(32, 4)},
            r"do not fit their layer's shape \(unet\.down_blocks.*maps 768 → 32 features, the layer 32 → 32.*another",
        ),
        ({f"unet.{TO_Q}.lora_A.weight": _w(4, 32)}, r"lack their down or up tensor.*\(unet\.down_blocks"),
        ({f"unet.{TO_Q}.lora.down.weight": _w(4, 32)}, r"unrecognised: unet\.down_blocks.*lora\.down\.weight"),
    ],
    ids=["not-lora", "sdxl-diffusers", "sdxl-kohya", "sdxl-te2", "locon", "loha", "rank", "shape", "half", "old"],
)  # fmt: skip
def test_files_that_do_not_fit_are_refused_by_name(ref, tmp_path, tensors, match):
    unet, text = ref.sdjax_models()
    save_file(tensors, str(tmp_path / "bad.safetensors"))
    with pytest.raises(ValueError, match=match):
        lora.load_lora(tmp_path / "bad.safetensors", unet, text)
    assert not lora.lora_layers(unet) and not lora.lora_layers(text)  # nothing half-loaded


def test_other_misuse_is_refused(ref, tmp_path):
    unet, text = ref.sdjax_models()
    with pytest.warns(UserWarning, match=r"also adapts the text encoder \(20 tensors\).*pass text_encoder="):
        report = lora.load_lora(ref.file, unet)
    assert report["text_encoder"] == [] and report["unet"]
    lora.fuse_lora(unet)
    with pytest.raises(ValueError, match="fused .*unfuse_lora before loading"):
        lora.load_lora(ref.file, unet)
    with pytest.raises(ValueError, match=r"no layer of this CLIPTextModel matches targets \('to_q',\)"):
        lora.add_lora(text, lora.LoRAConfig(targets=("to_q",)), rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match="has no LoRA adapters"):
        lora.set_lora_scale(text, 0.5)
    with pytest.raises(FileNotFoundError, match="a folder without pytorch_lora_weights.safetensors"):
        lora.load_lora(tmp_path, unet)
    with pytest.raises(ValueError, match="format='ckpt'; choose 'diffusers' or 'kohya'"):
        lora.save_lora(tmp_path, unet, format="ckpt")
