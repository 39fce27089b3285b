"""Textual inversion against diffusers' ``load_textual_inversion``, file format by file format.

A tiny random SD1-style diffusers pipeline (a 2-layer, 32-wide CLIP text encoder with CLIP's real
49,408-token vocabulary and tokenizer; a few-channel UNet and VAE that are never run) and an sdjax
text encoder holding the same weights load the same random embedding — single- and multi-vector,
saved as diffusers .safetensors and .bin, A1111 .pt and A1111 .safetensors. Both must give the same
token ids for prompts using the token (diffusers' ``maybe_convert_prompt`` then its tokenizer, against
:meth:`CLIPTokenizer.expand` then sdjax's), the same context (``encode_prompt``) and the same pooled vector,
in float32 to 1e-5 relative (max |a − b| / max |b|; measured ≤ 6.3e-7 for the context, ≤ 4.1e-7 pooled).
Embeddings saved by sdjax load in diffusers with the same result, and tokenizer folders with added
words round-trip through transformers both ways.
"""

import copy
import dataclasses
import sys

import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from sdjax import textual_inversion as ti
from sdjax.convert import abstract
from sdjax.models.clip import CLIPTextConfig, CLIPTextModel
from sdjax.tokenizer import CLIPTokenizer
from tests.helpers import (
    SD1_TEXT,
    load_torch_state,
    reference_pipeline,
    reference_text_encoder,
    reference_unet,
    reference_vae,
    rel_err,
)

torch = pytest.importorskip("torch")
diffusers = pytest.importorskip("diffusers")
transformers = pytest.importorskip("transformers")
safetensors_torch = pytest.importorskip("safetensors.torch")

RTOL = 1e-5
# tests/helpers.py's SD1-style text encoder with SD1's config: the legacy eos id 2, so pooled is read at
# each row's largest id
TEXT = {**SD1_TEXT, "bos_token_id": 0, "eos_token_id": 2, "pad_token_id": 1}
WIDTH = TEXT["hidden_size"]  # D of the tiny text encoder: 32


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    """(diffusers pipeline, tokenizer folder, sdjax text encoder): the same tokenizer and weights, nothing added."""
    torch.manual_seed(0)
    folder = CLIPTokenizer.from_bpe_file().save_folder(tmp_path_factory.mktemp("tokenizer"))
    unet = reference_unet(sample_size=4, block_out_channels=(8, 16), norm_num_groups=4, cross_attention_dim=WIDTH)
    vae = reference_vae((4,), norm_num_groups=2, layers_per_block=1)
    text = reference_text_encoder(**TEXT)
    pipe = reference_pipeline(
        vae=vae,
        text_encoder=text,
        tokenizer=transformers.CLIPTokenizer.from_pretrained(folder),
        unet=unet,
        scheduler=diffusers.DDIMScheduler(),
    )
    pipe.set_progress_bar_config(disable=True)
    ours = abstract(CLIPTextModel, CLIPTextConfig(**TEXT))  # weights come next
    load_torch_state(ours, getattr(text, "text_model", text).state_dict())  # transformers 4 wraps the layers
    return pipe, folder, ours


@pytest.fixture
def fresh(base):
    """Copies of the base models for one test (loading an embedding changes them in place)."""
    pipe, folder, text_encoder = base
    reference = diffusers.StableDiffusionPipeline(
        **{
            **pipe.components,
            "tokenizer": copy.deepcopy(pipe.tokenizer),
            "text_encoder": copy.deepcopy(pipe.text_encoder),
        },
        requires_safety_checker=False,
    )
    return reference, CLIPTokenizer.from_folder(folder), nnx.clone(text_encoder)


@nnx.jit
def encode(model, ids):
    out = model(ids)
    return out.last_hidden_state, out.pooled


def compare(reference, tokenizer, text_encoder, prompts):
    """Both sides' ids, context and pooled vector for ``prompts``; asserts they agree, returns (ids, errors)."""
    hf_tok = reference.tokenizer
    hf_ids = hf_tok(
        reference.maybe_convert_prompt(prompts, hf_tok), padding="max_length", max_length=77, truncation=True
    ).input_ids
    ids = tokenizer(tokenizer.expand(prompts))
    np.testing.assert_array_equal(ids, np.array(hf_ids))
    with torch.no_grad():
        hf_context = reference.encode_prompt(prompts, "cpu", 1, False)[0].numpy()
        hf_pooled = reference.text_encoder(torch.tensor(hf_ids)).pooler_output.numpy()
    context, pooled = encode(text_encoder, jnp.asarray(ids))
    errors = rel_err(context, hf_context), rel_err(pooled, hf_pooled)
    assert max(errors) <= RTOL, errors
    return ids, errors


def random_vectors(n, seed, width=WIDTH):
    return np.random.default_rng(seed).standard_normal((n, width)).astype(np.float32)


def write(kind, folder, token, vectors):
    """An embedding file as diffusers' trainer or A1111 writes it; returns its path."""
    tensor = torch.from_numpy(vectors)
    if kind == "diffusers-safetensors":  # diffusers' train_textual_inversion.py: {token: (n, D)} in a folder
        folder.mkdir(parents=True, exist_ok=True)
        safetensors_torch.save_file({token: tensor}, folder / "learned_embeds.safetensors")
        return folder
    if kind == "diffusers-1d":  # the sd-concepts-library files: {token: (D,)}
        path = folder / "concept.safetensors"
        safetensors_torch.save_file({token: tensor[0]}, path)
        return path
    if kind == "diffusers-bin":
        torch.save({token: tensor}, folder / "learned_embeds.bin")
        return folder / "learned_embeds.bin"
    if kind == "a1111-pt":
        data = {
            "string_to_token": {"*": 265},
            "string_to_param": {"*": tensor.clone().requires_grad_(True)},
            "name": token,
            "step": 1500,
            "sd_checkpoint": "cc6cb27103",
            "sd_checkpoint_name": "v1-5-pruned-emaonly",
        }
        torch.save(data, folder / "some-file-name.pt")
        return folder / "some-file-name.pt"
    if kind == "a1111-safetensors":  # no name inside: the file's stem is the token
        safetensors_torch.save_file({"emb_params": tensor}, folder / f"{token}.safetensors")
        return folder / f"{token}.safetensors"
    raise ValueError(kind)


# (file kind, token, number of vectors)
CASES = {
    "diffusers-safetensors-folder": ("diffusers-safetensors", "<cat-toy>", 1),
    "diffusers-safetensors-multi": ("diffusers-safetensors", "<style>", 3),
    "diffusers-1d": ("diffusers-1d", "<concept>", 1),
    "diffusers-bin": ("diffusers-bin", "<bin-cat>", 2),
    "a1111-pt": ("a1111-pt", "charturnerv2", 1),
    "a1111-pt-multi": ("a1111-pt", "<turner>", 4),
    "a1111-safetensors": ("a1111-safetensors", "easyneg", 2),
}


@pytest.mark.parametrize("case", CASES)
def test_loaded_embedding_matches_diffusers(case, fresh, tmp_path):
    reference, tokenizer, text_encoder = fresh
    kind, token, n = CASES[case]
    vectors = random_vectors(n, seed=len(case))
    path = write(kind, tmp_path / "emb", token, vectors) if kind == "diffusers-safetensors" else None
    path = path or write(kind, tmp_path, token, vectors)
    embeddings = ti.load_embeddings(path)
    assert list(embeddings) == [token]  # named by the file's key, "name", or stem
    np.testing.assert_array_equal(embeddings[token], vectors)
    # diffusers names an A1111 .safetensors "emb_params": give it the token, as its docs say
    reference.load_textual_inversion(str(path), token=token if kind == "a1111-safetensors" else None)
    added = ti.add_embeddings(tokenizer, text_encoder, embeddings)
    assert added == [token] + [f"{token}_{i}" for i in range(1, n)]
    assert tokenizer.vocab_size == len(reference.tokenizer) == text_encoder.config.vocab_size == 49408 + n

    prompts = [f"a photo of {token}", f"{token} and {token} on a beach, by {token}", "no new word here"]
    ids, _ = compare(reference, tokenizer, text_encoder, prompts)
    new_ids = list(range(49408, 49408 + n))
    assert ids[0, 4 : 4 + n].tolist() == new_ids  # the token, all n of its vectors, in place
    assert (ids[1] >= 49408).sum() == 3 * n and not (ids[2] >= 49408).any()
    np.testing.assert_array_equal(ti.read_embeddings(tokenizer, text_encoder, token)[token], vectors)


def test_token_argument_overrides_the_files_name(fresh, tmp_path):
    reference, tokenizer, text_encoder = fresh
    path = write("a1111-pt", tmp_path, "<inside>", random_vectors(2, seed=1))
    reference.load_textual_inversion(str(path), token="<mine>")
    ti.add_embeddings(tokenizer, text_encoder, ti.load_embeddings(path, token="<mine>"))
    ids, _ = compare(reference, tokenizer, text_encoder, ["a <mine> cat", "<inside>"])
    assert ids[0, 2:4].tolist() == [49408, 49409] and (ids[1] < 49408).all()


@pytest.mark.parametrize("fmt", ["diffusers", "a1111"])
def test_saved_by_sdjax_loads_in_diffusers(fmt, fresh, tmp_path):
    reference, tokenizer, text_encoder = fresh
    vectors = random_vectors(3, seed=7)
    ti.add_embeddings(tokenizer, text_encoder, {"<sdjax>": vectors})
    learned = ti.read_embeddings(tokenizer, text_encoder, ["<sdjax>"])
    path = ti.save_embeddings(tmp_path / f"<sdjax>.{fmt}.safetensors", learned, format=fmt)
    reference.load_textual_inversion(str(path), token=None if fmt == "diffusers" else "<sdjax>")
    compare(reference, tokenizer, text_encoder, ["a <sdjax> in the snow", "<sdjax>"])
    again = ti.load_embeddings(path, token=None if fmt == "diffusers" else "<sdjax>")
    np.testing.assert_array_equal(again["<sdjax>"], vectors)


def test_expand_prompt_ignores_case_and_spacing(fresh, tmp_path):
    # diffusers expands only the exact spelling (and never a token added with capitals), so the
    # reference gets the prompt spelled as added; the tokenizer lowercases anyway: the same ids.
    reference, tokenizer, text_encoder = fresh
    path = write("diffusers-safetensors", tmp_path / "emb", "<my style>", random_vectors(2, seed=3))
    reference.load_textual_inversion(str(path))
    ti.add_embeddings(tokenizer, text_encoder, ti.load_embeddings(path))
    ours = tokenizer(tokenizer.expand(["A <MY  STYLE> dog", "<my\tstyle>"]))
    hf = reference.tokenizer(
        reference.maybe_convert_prompt(["A <my style> dog", "<my style>"], reference.tokenizer),
        padding="max_length",
        max_length=77,
    ).input_ids
    np.testing.assert_array_equal(ours, np.array(hf))
    assert ours[0, 2:4].tolist() == [49408, 49409]


# ---------------------------------------------------------------- the tokenizer's added words


NEW_WORDS = ["<My-Cat>", "<dog>", "<dog>_1", "my  Cat", "<é>", "zzqx"]
TRICKY = [
    "a photo of <My-Cat>",
    "A <MY-CAT>, <my-cat>!",
    "x<my-cat>y <my-cat>s",
    "<dog> <dog>_1 <dog>_10 <dog>_",
    "MY \t CAT and my cat, mycat",
    "café <é> <É> <é>x",
    "zzqx zzqxzzqx azzqx",
    "<|endoftext|> <my-cat><|startoftext|>",
    "",
]


def test_add_tokens_matches_transformers(base):
    ours, hf = CLIPTokenizer.from_folder(base[1]), copy.deepcopy(base[0].tokenizer)
    assert not any(w in ours.vocab for w in NEW_WORDS)
    assert ours.add_tokens(NEW_WORDS) == list(range(49408, 49408 + len(NEW_WORDS)))
    assert hf.add_tokens(NEW_WORDS) == len(NEW_WORDS)
    np.testing.assert_array_equal(ours(TRICKY), np.array(hf(TRICKY, padding="max_length", max_length=77).input_ids))
    ids = ours("a <my-cat> photo")[0]
    assert ours.decode(ids) == "a <My-Cat>photo"  # transformers: "a <my-cat>photo"
    assert ours.decode(ours("<é> zzqx")[0]) == "<é>zzqx"


def test_tokenizer_folder_round_trips_with_transformers(base, tmp_path):
    ours = CLIPTokenizer.from_folder(base[1])
    ours.add_tokens(NEW_WORDS)
    expected = ours(TRICKY)

    # sdjax -> transformers: the words keep their ids and are normalized, not special
    hf = transformers.CLIPTokenizer.from_pretrained(ours.save_folder(tmp_path / "ours"))
    assert len(hf) == ours.vocab_size
    np.testing.assert_array_equal(np.array(hf(TRICKY, padding="max_length", max_length=77).input_ids), expected)
    flags = {t.content: (i, t.normalized, t.special) for i, t in hf.added_tokens_decoder.items()}
    assert all(flags[w] == (ours.vocab[w], True, False) for w in NEW_WORDS)
    again = CLIPTokenizer.from_folder(tmp_path / "ours")
    assert again.vocab == ours.vocab and again.added_tokens == ours.added_tokens
    assert again.special_tokens == ours.special_tokens

    # transformers 5 -> sdjax: tokenizer.json only, the words listed there with their ids
    hf.save_pretrained(tmp_path / "hf")
    assert not (tmp_path / "hf" / "vocab.json").exists()
    from_hf = CLIPTokenizer.from_folder(tmp_path / "hf")
    assert from_hf.vocab == ours.vocab
    np.testing.assert_array_equal(from_hf(TRICKY), expected)

    # transformers 4 (before added_tokens_decoder): vocab.json, merges.txt, added_tokens.json
    old = tmp_path / "old"
    old.mkdir()
    for name in ("vocab.json", "merges.txt", "added_tokens.json"):
        (old / name).write_bytes((tmp_path / "ours" / name).read_bytes())
    hf_old, ours_old = transformers.CLIPTokenizer.from_pretrained(old), CLIPTokenizer.from_folder(old)
    np.testing.assert_array_equal(
        ours_old(TRICKY), np.array(hf_old(TRICKY, padding="max_length", max_length=77).input_ids)
    )
    np.testing.assert_array_equal(ours_old(TRICKY), expected)


def test_pipeline_tokenizer_saved_by_diffusers_loads_in_sdjax(fresh, tmp_path):
    reference, tokenizer, text_encoder = fresh
    path = write("a1111-pt", tmp_path, "<turner>", random_vectors(3, seed=5))
    reference.load_textual_inversion(str(path))
    reference.tokenizer.save_pretrained(tmp_path / "saved")
    loaded = CLIPTokenizer.from_folder(tmp_path / "saved")
    assert loaded.vector_tokens("<turner>") == ["<turner>", "<turner>_1", "<turner>_2"]
    prompts = ["a <turner> of a knight", "<turner>"]
    hf = reference.tokenizer(reference.maybe_convert_prompt(prompts, reference.tokenizer), padding="max_length")
    np.testing.assert_array_equal(loaded(loaded.expand(prompts)), np.array(hf.input_ids))


# ---------------------------------------------------------------- training helpers


def test_add_token_initialises_from_a_word_and_masks_its_rows(fresh):
    _, tokenizer, text_encoder = fresh
    before = np.asarray(text_encoder.embeddings.token_embedding.embedding[...])
    cat = tokenizer.encode("cat")
    assert ti.add_token(tokenizer, text_encoder, "<my-cat>", init_word="cat", num_vectors=2) == [
        "<my-cat>",
        "<my-cat>_1",
    ]
    table = np.asarray(text_encoder.embeddings.token_embedding.embedding[...])
    assert table.shape == (49410, WIDTH) and text_encoder.config.vocab_size == 49410
    np.testing.assert_array_equal(table[:49408], before)  # old rows untouched
    np.testing.assert_array_equal(table[49408:], before[cat * 2])
    mask = ti.new_rows_mask(tokenizer, text_encoder, ["<my-cat>"])
    assert mask.shape == (49410,) and np.flatnonzero(mask).tolist() == [49408, 49409]

    ti.add_embeddings(tokenizer, text_encoder, {"<other>": random_vectors(1, seed=0)})
    ti.initialize_from(tokenizer, text_encoder, "<other>", "dog")
    np.testing.assert_array_equal(
        ti.read_embeddings(tokenizer, text_encoder, "<other>")["<other>"], before[tokenizer.encode("dog")]
    )
    assert np.flatnonzero(ti.new_rows_mask(tokenizer, text_encoder, ["<my-cat>", "<other>"])).tolist() == [
        49408,
        49409,
        49410,
    ]


# ---------------------------------------------------------------- errors


def test_width_mismatch_names_both_widths_and_models(base):
    tokenizer = CLIPTokenizer.from_folder(base[1])
    sd2 = CLIPTextConfig.sd2()
    sd2 = dataclasses.replace(sd2, vocab_size=49408, num_hidden_layers=1, intermediate_size=8)  # only D matters
    sd2 = abstract(CLIPTextModel, sd2)  # shapes only: the check reads no weights
    with pytest.raises(ValueError, match=r"'<sd1-style>' has 768 wide \(SD1\.x.*1024 wide \(SD2\.x"):
        ti.add_embeddings(tokenizer, sd2, {"<sd1-style>": np.zeros((2, 768), np.float32)})
    assert "<sd1-style>" not in tokenizer.vocab  # nothing added


def test_existing_tokens_are_refused_and_nothing_changes(fresh):
    _, tokenizer, text_encoder = fresh
    ti.add_embeddings(tokenizer, text_encoder, {"<cat-toy>": random_vectors(3, seed=0)})
    size = tokenizer.vocab_size
    for token in ("<cat-toy>", "<cat-toy>_2", "<|endoftext|>"):
        with pytest.raises(ValueError, match=f"{token!r} is already in the tokenizer's vocabulary.*<my-cat>"):
            ti.add_embeddings(tokenizer, text_encoder, {token: random_vectors(1, seed=0)})
    with pytest.raises(ValueError, match=r"'<Cat-Toy>' would match the same text as the token '<cat-toy>'"):
        tokenizer.add_tokens(["<new>", "<Cat-Toy>"])
    with pytest.raises(ValueError, match="listed more than once"):
        tokenizer.add_tokens(["<twice>", "<twice>"])
    with pytest.raises(ValueError, match=r"init_word 'supercalifragilistic' is \d tokens"):
        ti.add_token(tokenizer, text_encoder, "<x>", init_word="supercalifragilistic")
    assert tokenizer.vocab_size == size == text_encoder.config.vocab_size and "<new>" not in tokenizer.vocab
    with pytest.raises(ValueError, match=r"\['<never-added>'\] are not added tokens"):
        ti.new_rows_mask(tokenizer, text_encoder, ["<never-added>"])


def test_file_errors(tmp_path, monkeypatch):
    torch.save(torch.ones(2, 8), tmp_path / "bare.pt")
    with pytest.raises(ValueError, match="bare tensor with no token name: pass token="):
        ti.load_embeddings(tmp_path / "bare.pt")
    assert ti.load_embeddings(tmp_path / "bare.pt", token="<b>")["<b>"].shape == (2, 8)
    safetensors_torch.save_file(
        {"clip_l": torch.ones(1, 768), "clip_g": torch.ones(1, 1280)}, tmp_path / "xl.safetensors"
    )
    with pytest.raises(ValueError, match="SDXL embedding"):
        ti.load_embeddings(tmp_path / "xl.safetensors")
    with pytest.raises(FileNotFoundError, match="learned_embeds.safetensors or learned_embeds.bin"):
        ti.load_embeddings(tmp_path)
    with pytest.raises(ValueError, match="one file per token"):
        ti.save_embeddings(tmp_path / "two.safetensors", {"<a>": np.ones(4), "<b>": np.ones(4)})
    with pytest.raises(ValueError, match="as .safetensors only"):
        ti.save_embeddings(tmp_path / "a.pt", {"<a>": np.ones(4)})
    monkeypatch.setitem(sys.modules, "torch", None)  # as if PyTorch were not installed
    with pytest.raises(ImportError, match=r"needs PyTorch.*save_embeddings\('bare.safetensors'"):
        ti.load_embeddings(tmp_path / "bare.pt", token="<b>")
