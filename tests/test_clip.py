"""CLIP's text encoder: numerical parity with transformers' ``CLIPTextModel``, pooling rules, clip skip,
bf16, full-size parameter counts and config errors.

Tolerance: tiny random-init models (D = 48, 3 layers) in float32; we assert 1e-5 relative (max-abs
error over max-abs reference value) on every hidden state, the final output and the pooled vector.
A missing causal mask, a tanh-GELU instead of erf-GELU, a post-LN block or a wrong pooling index is
off by orders of magnitude.
"""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from sdjax.convert import abstract
from sdjax.models.clip import CLIPTextConfig, CLIPTextModel, eos_positions
from sdjax.nn import count_params
from tests.helpers import load_torch_state, rel_err

RTOL = 1e-5
VOCAB = 1000

TINY = dict(
    vocab_size=VOCAB,
    hidden_size=48,
    intermediate_size=96,
    num_hidden_layers=3,
    num_attention_heads=4,
    max_position_embeddings=77,
)

# (config fields, then the ids the tokenizer writes: start-of-text, end-of-text, padding)
CASES = {
    # SD1: quick_gelu; eos_token_id=2 → legacy pooling at the largest id, so end-of-text is the
    # vocabulary's last id (49407 in CLIP, start-of-text 49406); SD1's tokenizer pads with end-of-text
    "sd1-legacy": (dict(hidden_act="quick_gelu", bos_token_id=0, eos_token_id=2, pad_token_id=1), (998, 999, 999)),
    # SD2: exact gelu, still the legacy rule; OpenCLIP's tokenizer pads with "!" (id 0)
    "sd2-legacy": (dict(hidden_act="gelu", bos_token_id=0, eos_token_id=2, pad_token_id=1), (998, 999, 0)),
    # a config with a real eos id in the middle of the vocabulary: pooled at its first occurrence,
    # while larger ids appear in the prompts, so the argmax rule would pool elsewhere
    "gelu-eos-id": (dict(hidden_act="gelu", bos_token_id=3, eos_token_id=500, pad_token_id=500), (3, 500, 500)),
}


def prompts(rng, lengths, t, special):
    """Right-padded token rows: [bos, random tokens, eos, pad ...]; lengths count bos and eos.

    Returns ids (B, t) int32 and attention_mask (B, t) (1 on the prompt, 0 on padding).
    """
    bos, eos, pad = special
    ids = np.full((len(lengths), t), pad, np.int32)
    mask = np.zeros((len(lengths), t), np.int32)
    for row, n in enumerate(lengths):
        body = rng.choice(np.setdiff1d(np.arange(4, VOCAB), special), n - 2)  # ordinary tokens
        ids[row, :n] = np.concatenate([[bos], body, [eos]])
        mask[row, :n] = 1
    return ids, mask


CLIP_SKIPS = (0, 1, TINY["num_hidden_layers"])


@nnx.jit
def run(model, ids, mask):
    """model(ids, mask) with every hidden state, and model.encode at each of CLIP_SKIPS.

    Compiled as one program: run eagerly, JAX would compile every op on its own, which takes
    seconds on a busy CPU.
    """
    return model(ids, mask, output_hidden_states=True), [model.encode(ids, mask, clip_skip=k) for k in CLIP_SKIPS]


def build_pair(fields):
    """A random-init transformers CLIPTextModel and an sdjax model holding the same weights."""
    torch = pytest.importorskip("torch", reason="the reference extra (pip install -e '.[reference]') provides torch")
    transformers = pytest.importorskip("transformers")

    kw = {**TINY, **fields}
    torch.manual_seed(0)
    ref = transformers.CLIPTextModel(transformers.CLIPTextConfig(**kw)).eval()
    ours = CLIPTextModel(CLIPTextConfig(**kw), rngs=nnx.Rngs(0))
    # transformers ≥ 5 holds the layers directly; 4.x wraps them in ``text_model``
    load_torch_state(ours, getattr(ref, "text_model", ref).state_dict())
    return ref, ours


@pytest.mark.parametrize(
    "case,masked",
    [("sd1-legacy", False), ("sd1-legacy", True), ("sd2-legacy", False), ("gelu-eos-id", True)],
    ids=["sd1-legacy", "sd1-legacy-mask", "sd2-legacy", "gelu-eos-id-mask"],
)
def test_matches_transformers(case, masked):
    import torch

    fields, special = CASES[case]
    ref, ours = build_pair(fields)
    # SD's 77 tokens (with a full-length row) for the SD configs; T = 20 < 77 positions for the last
    t, lengths = (20, [6, 20, 11]) if case == "gelu-eos-id" else (77, [5, 77, 30])
    ids, mask = prompts(np.random.default_rng(0), lengths, t, special)
    am = mask if masked else None

    with torch.no_grad():
        want = ref(
            torch.from_numpy(ids).long(),
            attention_mask=None if am is None else torch.from_numpy(am),
            output_hidden_states=True,
        )
    got, encoded = run(ours, ids, am)

    assert len(got.hidden_states) == len(want.hidden_states) == TINY["num_hidden_layers"] + 1
    for i, (g, w) in enumerate(zip(got.hidden_states, want.hidden_states)):
        assert rel_err(g, w.numpy()) < RTOL, f"hidden_states[{i}]: relative error {rel_err(g, w.numpy()):.2e}"
    assert rel_err(got.last_hidden_state, want.last_hidden_state.numpy()) < RTOL
    assert rel_err(got.pooled, want.pooler_output.numpy()) < RTOL

    # pooled sits at the first end-of-text token, whichever rule found it
    np.testing.assert_array_equal(eos_positions(ids, ours.config.eos_token_id), np.array(lengths) - 1)
    if case == "gelu-eos-id":  # the test discriminates: the legacy argmax rule would pool elsewhere
        assert (np.argmax(ids, axis=-1) != np.array(lengths) - 1).any()

    # clip skip, diffusers' recipe: final_layer_norm(hidden_states[-(k + 1)])
    for k, context in zip(CLIP_SKIPS, encoded):
        with torch.no_grad():
            w = ref.final_layer_norm(want.hidden_states[-(k + 1)]).numpy()
        assert rel_err(context, w) < RTOL, f"clip_skip={k}"


def test_mask_only_changes_padding_positions():
    # causal attention: tokens never see the padding after them, so hiding it changes only the
    # padding positions' own vectors
    fields, special = CASES["sd1-legacy"]
    model = CLIPTextModel(CLIPTextConfig(**TINY, **fields), rngs=nnx.Rngs(0))
    ids, mask = prompts(np.random.default_rng(1), [4, 77, 9], 77, special)
    plain, masked = run(model, ids, None)[0].last_hidden_state, run(model, ids, mask)[0].last_hidden_state
    real = mask.astype(bool)
    np.testing.assert_allclose(plain[real], masked[real], rtol=0, atol=1e-6)
    assert rel_err(plain[~real], masked[~real]) > 1e-3


def test_bfloat16():
    # Casting the weights is all it takes: the embedding rows come out in bf16 and every later op
    # follows. bf16 keeps 8 significant bits, so neighbouring numbers are 2⁻⁸ ≈ 4e-3 apart relative
    # to their binade: the output's own final rounding already costs up to 2⁻⁹ of the largest entry,
    # and rounding every weight and activation through 3 layers and 4 LayerNorms compounds that to
    # ≈ 1e-2 at worst (0.9–1.8e-2 over seeds) and 2e-3 on average. Bounds: 2⁻⁵ ≈ 3e-2 worst case and
    # 2⁻⁸ on average, far below what a wrong op or a lost dtype costs (order 1).
    fields, special = CASES["sd1-legacy"]
    model = CLIPTextModel(CLIPTextConfig(**TINY, **fields), rngs=nnx.Rngs(0))
    ids, _ = prompts(np.random.default_rng(2), [7, 77, 16], 77, special)
    want = run(model, ids, None)[0]
    nnx.update(model, jax.tree.map(lambda p: p.astype(jnp.bfloat16), nnx.state(model, nnx.Param)))
    got = run(model, ids, None)[0]
    assert got.last_hidden_state.dtype == got.pooled.dtype == jnp.bfloat16
    assert rel_err(got.last_hidden_state, want.last_hidden_state) < 2**-5
    assert rel_err(got.pooled, want.pooled) < 2**-5
    err = np.abs(np.asarray(got.last_hidden_state, np.float32) - np.asarray(want.last_hidden_state))
    assert err.mean() / np.abs(want.last_hidden_state).max() < 2**-8


@pytest.mark.parametrize(
    "config,expected", [("sd1", 123_060_480), ("sd2", 340_387_840)], ids=["sd1-vit-l", "sd2-openclip-h"]
)
def test_full_size_parameter_counts(config, expected):
    cfg = getattr(CLIPTextConfig, config)()
    # shapes only: nothing is allocated
    model = abstract(CLIPTextModel, cfg)
    assert count_params(model) == expected
    # and the same count from transformers' model, built on the meta device (no memory either)
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    with torch.device("meta"):
        ref = transformers.CLIPTextModel(transformers.CLIPTextConfig(**dataclasses.asdict(cfg)))
    assert sum(p.numel() for p in ref.parameters()) == expected


def test_from_dict_reads_sd_configs():
    # SD1.5's text_encoder/config.json as transformers saved it, and SD2's with the fields that differ
    sd1 = {
        "_name_or_path": "openai/clip-vit-large-patch14",
        "architectures": ["CLIPTextModel"],
        "attention_dropout": 0.0,
        "bos_token_id": 0,
        "dropout": 0.0,
        "eos_token_id": 2,
        "hidden_act": "quick_gelu",
        "hidden_size": 768,
        "initializer_factor": 1.0,
        "initializer_range": 0.02,
        "intermediate_size": 3072,
        "layer_norm_eps": 1e-05,
        "max_position_embeddings": 77,
        "model_type": "clip_text_model",
        "num_attention_heads": 12,
        "num_hidden_layers": 12,
        "pad_token_id": 1,
        "projection_dim": 768,
        "torch_dtype": "float32",
        "transformers_version": "4.22.0.dev0",
        "vocab_size": 49408,
    }
    sd2 = {
        **sd1,
        "hidden_act": "gelu",
        "hidden_size": 1024,
        "intermediate_size": 4096,
        "num_attention_heads": 16,
        "num_hidden_layers": 23,
        "projection_dim": 512,
    }
    assert CLIPTextConfig.from_dict(sd1) == CLIPTextConfig.sd1() == CLIPTextConfig()
    assert CLIPTextConfig.from_dict(sd2) == CLIPTextConfig.sd2()
    with pytest.raises(ValueError, match="got 'clip'; for a full CLIPConfig pass its 'text_config'"):
        CLIPTextConfig.from_dict({"model_type": "clip", "text_config": sd1})


@pytest.mark.parametrize(
    "change,match",
    [
        (dict(num_attention_heads=5), "num_attention_heads=5 must divide hidden_size=48"),
        (dict(hidden_act="gelu_new"), r"hidden_act='gelu_new' is not supported; use one of \('quick_gelu', 'gelu'\)"),
        (dict(eos_token_id=[2, 49407]), "eos_token_id must be a single int"),
    ],
)
def test_config_errors(change, match):
    with pytest.raises(ValueError, match=match):
        CLIPTextConfig(**{**TINY, **change})


def test_input_errors():
    model = CLIPTextModel(CLIPTextConfig(**TINY), rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match="T=78 tokens .* at most 77"):
        model(jnp.zeros((1, 78), jnp.int32))
    with pytest.raises(ValueError, match=r"clip_skip=4 must be in \[0, 3\]"):
        model.encode(jnp.zeros((1, 77), jnp.int32), clip_skip=4)
    with pytest.raises(ValueError, match=r"clip_skip=-1 must be in \[0, 3\]"):
        model.encode(jnp.zeros((1, 77), jnp.int32), clip_skip=-1)
