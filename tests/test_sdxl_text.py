"""SDXL's text side: the second text encoder (transformers' ``CLIPTextModelWithProjection``), the raw penultimate
hidden state SDXL conditions on, loading from a ``save_pretrained`` folder, and the whole of diffusers'
``StableDiffusionXLPipeline.encode_prompt`` rebuilt from sdjax's two encoders.

Tolerance: as tests/test_clip.py, tiny random-init models in float32, 1e-5 relative (max-abs error over
max-abs reference value) on every compared array. A transposed projection, the final LayerNorm applied
(or not) to the penultimate state, or pooling at the wrong token is off by orders of magnitude.
"""

import dataclasses

import numpy as np
import pytest
from flax import nnx

from sdjax.convert import abstract, load_text_encoder
from sdjax.models.clip import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection
from sdjax.nn import count_params
from tests.helpers import SD1_TEXT, load_torch_state, rel_err

RTOL = 1e-5
VOCAB = 1000

# bigG's shape at a few channels per layer: exact GELU, a projection narrower than D (so a transposed
# W_proj cannot go unnoticed)
TINY = dict(
    vocab_size=VOCAB,
    hidden_size=48,
    intermediate_size=96,
    num_hidden_layers=3,
    num_attention_heads=4,
    max_position_embeddings=77,
    hidden_act="gelu",
    projection_dim=40,
)
# (config fields, then the ids the tokenizer writes: start-of-text, end-of-text, padding)
CASES = {
    # SDXL's configs: eos_token_id=2, transformers' legacy rule (pool at the largest id, end-of-text
    # being the vocabulary's last); SDXL's tokenizer_2 pads with "!" (id 0)
    "legacy-eos": (dict(bos_token_id=0, eos_token_id=2, pad_token_id=1), (998, 999, 0)),
    # a real eos id mid-vocabulary: pooled at its first occurrence, though larger ids follow
    "eos-id": (dict(bos_token_id=3, eos_token_id=500, pad_token_id=500), (3, 500, 500)),
}


def prompts(lengths, special, t=77):
    """Right-padded rows [bos, random tokens, eos, pad ...] (lengths count bos and eos): (B, t) int32."""
    rng = np.random.default_rng(0)
    bos, eos, pad = special
    ids = np.full((len(lengths), t), pad, np.int32)
    for row, n in enumerate(lengths):
        ids[row, :n] = [bos, *rng.choice(np.setdiff1d(np.arange(4, VOCAB), special), n - 2), eos]
    return ids


def text_model_weights(ref) -> dict:
    """A transformers text encoder's state dict under the names of its saved checkpoint's text model:
    ``text_model.`` dropped (transformers ≥ 5 keeps CLIPTextModel's layers at the top, the WithProjection
    model under ``text_model``), ``text_projection.weight`` as it is."""
    return {k.removeprefix("text_model."): v for k, v in ref.state_dict().items()}


@nnx.jit
def run(model, ids):
    """Every output with every hidden state, and the raw (not layer-normed) states 1 and 2 layers from the top."""
    return model(ids, output_hidden_states=True), [model.encode(ids, clip_skip=k, final_norm=False) for k in (1, 2)]


def check(got, penultimate, want):
    """sdjax's outputs against transformers' ``CLIPTextModelWithProjection`` outputs ``want``."""
    for i, (g, w) in enumerate(zip(got.hidden_states, want.hidden_states, strict=True)):
        assert rel_err(g, w.numpy()) < RTOL, f"hidden_states[{i}]: relative error {rel_err(g, w.numpy()):.2e}"
    assert rel_err(got.last_hidden_state, want.last_hidden_state.numpy()) < RTOL
    err = rel_err(got.text_embeds, want.text_embeds.numpy())
    assert got.text_embeds.shape == (len(got.pooled), TINY["projection_dim"]) and err < RTOL, f"text_embeds: {err:.2e}"
    # SDXL's context: hidden_states[-2] (and [-3] for its clip_skip=1) as they are, no final_layer_norm
    for k, state in zip((1, 2), penultimate, strict=True):
        assert rel_err(state, want.hidden_states[-(k + 1)].numpy()) < RTOL, f"clip_skip={k}, final_norm=False"


@pytest.mark.parametrize("case", list(CASES))
def test_matches_transformers(case):
    torch = pytest.importorskip("torch", reason="the reference extra (pip install -e '.[reference]') provides torch")
    transformers = pytest.importorskip("transformers")

    fields, special = CASES[case]
    kw = {**TINY, **fields}
    torch.manual_seed(0)
    ref = transformers.CLIPTextModelWithProjection(transformers.CLIPTextConfig(**kw)).eval()
    ours = CLIPTextModelWithProjection(CLIPTextConfig(**kw), rngs=nnx.Rngs(0))
    load_torch_state(ours, text_model_weights(ref))

    ids = prompts([5, 77, 30], special)
    with torch.no_grad():
        want = ref(torch.from_numpy(ids).long(), output_hidden_states=True)
    check(*run(ours, ids), want)


def test_loads_a_save_pretrained_folder(tmp_path):
    """``sdjax.convert.load_text_encoder`` reads SDXL's ``text_encoder_2`` layout: architectures
    ["CLIPTextModelWithProjection"], ``text_model.*`` plus a top-level ``text_projection.weight``."""
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")

    fields, special = CASES["legacy-eos"]
    torch.manual_seed(1)
    ref = transformers.CLIPTextModelWithProjection(transformers.CLIPTextConfig(**TINY, **fields)).eval()
    ref.save_pretrained(tmp_path)
    ours = load_text_encoder(tmp_path)
    assert type(ours) is CLIPTextModelWithProjection and ours.config == CLIPTextConfig(**TINY, **fields)
    ids = prompts([9, 40], special)
    with torch.no_grad():
        want = ref(torch.from_numpy(ids).long(), output_hidden_states=True)
    check(*run(ours, ids), want)


def test_sdxl_encode_prompt_matches_diffusers(tmp_path):
    """diffusers' ``StableDiffusionXLPipeline.encode_prompt`` (text side only) on two tiny encoders, SD1-style and
    bigG-style, with CLIP's real tokenizer (tokenizer_2 padding with "!"), rebuilt from sdjax's encoders:

        prompt_embeds = [ enc1.encode(ids1, clip_skip=1 + s, final_norm=False),
                          enc2.encode(ids2, clip_skip=1 + s, final_norm=False) ]      (B, 77, D1 + D2)
        pooled_prompt_embeds = enc2(ids2).text_embeds                                 (B, projection_dim)

    for diffusers' clip_skip None (s = 0) and 1 (s = 1)."""
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    diffusers = pytest.importorskip("diffusers")
    from sdjax.tokenizer import CLIPTokenizer

    CLIPTokenizer.from_bpe_file().save_folder(tmp_path / "tokenizer")
    tokenizers = [
        transformers.CLIPTokenizer.from_pretrained(tmp_path / "tokenizer"),  # pads with <|endoftext|>
        transformers.CLIPTokenizer.from_pretrained(tmp_path / "tokenizer", pad_token="!"),  # SDXL's tokenizer_2
    ]
    legacy = dict(bos_token_id=0, eos_token_id=2, pad_token_id=1)  # both SDXL encoders' configs
    configs = [{**SD1_TEXT, **legacy}, {**TINY, **legacy, "vocab_size": SD1_TEXT["vocab_size"]}]
    torch.manual_seed(2)
    refs = [
        transformers.CLIPTextModel(transformers.CLIPTextConfig(**configs[0])).eval(),
        transformers.CLIPTextModelWithProjection(transformers.CLIPTextConfig(**configs[1])).eval(),
    ]
    ours = [
        CLIPTextModel(CLIPTextConfig(**configs[0]), rngs=nnx.Rngs(0)),
        CLIPTextModelWithProjection(CLIPTextConfig(**configs[1]), rngs=nnx.Rngs(0)),
    ]
    for model, ref in zip(ours, refs, strict=True):
        load_torch_state(model, text_model_weights(ref))
    pipe = diffusers.StableDiffusionXLPipeline(
        vae=None,
        text_encoder=refs[0],
        text_encoder_2=refs[1],
        tokenizer=tokenizers[0],
        tokenizer_2=tokenizers[1],
        unet=None,
        scheduler=None,
    )

    texts = ["a photo of an astronaut riding a horse", "a red cube"]
    ids = [np.asarray(tok(texts, padding="max_length", max_length=77).input_ids, np.int32) for tok in tokenizers]
    assert (ids[0][1, 5:] == 49407).all() and (ids[1][1, 5:] == 0).all()  # the two paddings
    encode = nnx.jit(lambda m, ids, k: m.encode(ids, clip_skip=k, final_norm=False), static_argnums=2)
    pooled = nnx.jit(lambda m, ids: m(ids).text_embeds)(ours[1], ids[1])
    for skip in (None, 1):
        with torch.no_grad():
            want, _, want_pooled, _ = pipe.encode_prompt(
                texts, device="cpu", do_classifier_free_guidance=False, clip_skip=skip
            )
        k = 1 + (skip or 0)
        got = np.concatenate([encode(m, i, k) for m, i in zip(ours, ids, strict=True)], axis=-1)
        assert got.shape == tuple(want.shape) == (2, 77, SD1_TEXT["hidden_size"] + TINY["hidden_size"])
        assert rel_err(got, want.numpy()) < RTOL, f"clip_skip={skip}: relative error {rel_err(got, want.numpy()):.2e}"
        assert rel_err(pooled, want_pooled.numpy()) < RTOL


def test_sdxl_bigg_parameter_count():
    """bigG with its projection, as SDXL's text_encoder_2: 694,659,840 parameters, as transformers builds it
    (both shapes only: nnx.eval_shape, torch's meta device)."""
    cfg = CLIPTextConfig.sdxl_bigg()
    expected = 694_659_840
    assert count_params(abstract(CLIPTextModelWithProjection, cfg)) == expected
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    with torch.device("meta"):
        ref = transformers.CLIPTextModelWithProjection(transformers.CLIPTextConfig(**dataclasses.asdict(cfg)))
    assert sum(p.numel() for p in ref.parameters()) == expected


def test_from_dict_reads_the_projection_width():
    fields = dataclasses.asdict(CLIPTextConfig.sdxl_bigg())
    config = {"architectures": ["CLIPTextModelWithProjection"], "model_type": "clip_text_model", **fields}
    assert CLIPTextConfig.from_dict(config) == CLIPTextConfig.sdxl_bigg()
    assert CLIPTextConfig.from_dict({**config, "projection_dim": 512}).projection_dim == 512
