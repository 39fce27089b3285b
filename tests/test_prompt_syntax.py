"""Long and weighted prompts (sdjax.prompt_syntax, sdjax.prompts) against their references.

* compel syntax: sdjax's parser against compel's own (the same fragments and weights), and the encodings
  against compel's (``Compel(...)(prompt)``) on the tiny SD1 pipeline's CLIP, float32: max abs error
  ≤ 1e-5 (measured ≤ 2e-6), for up- and down-weighting, groups, blends, conjunctions and compel's
  long-prompt mode; images through both pipelines within the pipeline tests' 1e-3.
* a1111 syntax: the parser against the web UI's documented examples; the encodings against a float64
  re-implementation of the web UI's rule written here from its documentation (each 77-token chunk's z
  scaled token by token, then rescaled to its original mean), with transformers' CLIP in float64: the
  float32 encodings agree to 1e-5 relative.
* long prompts: chunks of 75 tokens with the web UI's comma backtrack and BREAK; the negative prompt
  completed with the empty prompt's chunks; truncation on request, with a warning naming what is cut.
"""

import numpy as np
import pytest

import sdjax
from sdjax import prompt_syntax, prompts
from sdjax.prompt_syntax import BREAK, Blend, Fragment
from tests.helpers import SIZE, tiny_pipeline

torch = pytest.importorskip("torch")
compel = pytest.importorskip("compel")

ATOL = 1e-5


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """(diffusers pipeline, sdjax pipeline) of the same tiny random SD1 model."""
    folder = tmp_path_factory.mktemp("prompt-syntax")
    reference = tiny_pipeline(folder)
    # A random CLIP's final LayerNorm has bias 0, so its outputs average to ~0 and the web UI's mean restore
    # (a division by the mean) is ill-conditioned; trained CLIPs have a bias. Give it one.
    norm = reference.text_encoder.final_layer_norm
    with torch.no_grad():
        norm.bias.copy_(torch.linspace(-0.5, 0.3, norm.bias.numel()))
    reference.text_encoder.save_pretrained(folder / "model" / "text_encoder")
    return reference, sdjax.StableDiffusion.from_pretrained(folder / "model")


def long_text(sentences=14):
    """A prompt of 140 tokens in sentences of 10 (compel splits at the last full stop within 75)."""
    words = ["red", "star", "blue", "circle", "green", "square", "on", "a", "white", "field", "with", "light"]
    return " ".join(
        f"{words[i % 12]} {words[(i + 3) % 12]} {words[(i + 5) % 12]}, {words[(i + 7) % 12]} {words[(i + 1) % 12]} "
        f"and {words[(i + 2) % 12]} {words[(i + 9) % 12]}."
        for i in range(sentences)
    )


# ---------------------------------------------------------------------------------------------------
# parsing
# ---------------------------------------------------------------------------------------------------

COMPEL_PROMPTS = [
    "a red+ cat",
    "a (red cat)1.3 on a (blue mat)0.5",
    "well-known red-- dog, (big (red)++ cat)-",
    r"a \(literal\) paren",
    'cat. dog... "red fox"1.2, e.g. 1.5',
    "red+.",
    "(a, b. c)+",
    "",
    "a - b",
    "x (y)0.2 z",
    '("a red cat", "blue dog").blend(0.7, 0.3)',
    '("a (red)+ cat", "dog").and(1, 0.5)',
    '("a red cat", blue).and()',
]


def compel_parse(text):
    """compel's parse, as (parts, weights): a part is [(text, weight)] or ("blend", [[...]], weights)."""
    c = compel.Compel.parse_prompt_string(text)
    fragments = lambda p: [(f.text, f.weight) for f in p.children]  # noqa: E731
    parts = [("blend", [fragments(q) for q in p.prompts], list(p.weights)) if hasattr(p, "prompts") else fragments(p)
             for p in c.prompts]  # fmt: skip
    return parts, list(c.weights)


def sdjax_parse(text):
    c = prompt_syntax.parse_compel(text)
    fragments = lambda p: [(f.text, f.weight) for f in p]  # noqa: E731
    parts = [("blend", [fragments(q) for q in p.prompts], list(p.weights)) if isinstance(p, Blend) else fragments(p)
             for p in c.parts]  # fmt: skip
    return parts, list(c.weights)


@pytest.mark.parametrize("text", COMPEL_PROMPTS)
def test_compel_parser_matches_compel(models, text):
    """Same fragments, same weights; fragment texts compared as token ids (compel keeps "dog," where
    sdjax writes "dog ,": CLIP tokenizes both the same)."""
    tokenizer = models[1].tokenizer

    def tokens(parsed):
        def frag(fs):
            return [(tokenizer.encode(t), pytest.approx(w, rel=1e-12)) for t, w in fs]

        parts, weights = parsed
        return [(p[0], [frag(q) for q in p[1]], p[2]) if isinstance(p, tuple) else frag(p) for p in parts], weights

    assert tokens(sdjax_parse(text)) == tokens(compel_parse(text))


def test_a1111_parser_documented_examples():
    """The examples of the web UI's documentation of ``parse_prompt_attention``."""
    f = prompt_syntax.parse_a1111
    assert f("normal text") == [Fragment("normal text", 1.0)]
    assert f("an (important) word") == [Fragment("an ", 1.0), Fragment("important", 1.1), Fragment(" word", 1.0)]
    assert f("(unbalanced") == [Fragment("unbalanced", 1.1)]
    assert f(r"\(literal\]") == [Fragment("(literal]", 1.0)]
    assert f("(unnecessary)(parens)") == [Fragment("unnecessaryparens", 1.1)]
    got = f("a (((house:1.3)) [on] a (hill:0.5), sun, (((sky))).")
    expected = [("a ", 1.0), ("house", 1.1 * 1.1 * 1.3), (" ", 1.1), ("on", 1.0), (" a ", 1.1), ("hill", 0.55),
                (", sun, ", 1.1), ("sky", 1.1**4), (".", 1.1)]  # fmt: skip
    assert [t for t, _ in got] == [t for t, _ in expected]
    np.testing.assert_allclose([w for _, w in got], [w for _, w in expected], rtol=1e-12)


def test_a1111_parser_edge_cases():
    f = prompt_syntax.parse_a1111
    assert f("") == [Fragment("", 1.0)]
    assert f("a BREAK b") == [Fragment("a", 1.0), BREAK, Fragment("b", 1.0)]
    assert f("stray) bracket] x:1.2)") == [Fragment("stray) bracket] x:1.2)", 1.0)]  # unmatched: literal
    assert f("[[low]]")[0].weight == pytest.approx(1 / 1.1**2)
    assert f("(a:0.5) [b:2]") == [Fragment("a", 0.5), Fragment(" ", 1.0), Fragment("b:2", 1 / 1.1)]
    with pytest.raises(ValueError, match=r"'1\.2\.3' is not a number"):
        f("(a:1.2.3)")


def test_compel_errors_name_the_problem():
    with pytest.raises(ValueError, match=r"unclosed '\('.*escape a literal bracket"):
        prompt_syntax.parse_compel("a (red cat")
    with pytest.raises(ValueError, match=r"unmatched '\)'"):
        prompt_syntax.parse_compel("a red) cat")
    with pytest.raises(ValueError, match=r"compel's '\.swap' is not supported"):
        prompt_syntax.parse_compel("a cat.swap(dog)")
    with pytest.raises(ValueError, match="2 prompts to blend but 3 weights"):
        prompt_syntax.parse_compel('("a", "b").blend(1, 2, 3)')
    with pytest.raises(ValueError, match=r"prompt_syntax='sd'.*expected one of \('none', 'a1111', 'compel'\)"):
        prompt_syntax.parse("a cat", "sd")


# ---------------------------------------------------------------------------------------------------
# chunking
# ---------------------------------------------------------------------------------------------------


def test_a1111_chunks_backtrack_to_a_comma_and_break(models):
    tokenizer = models[1].tokenizer
    comma, word = tokenizer.vocab[",</w>"], tokenizer.vocab["cat</w>"]
    # 70 words, a comma (position 70), 10 words: the chunk is full at 75 with its comma 5 back, so the 5 words
    # after the comma move to the second chunk (which then holds 5 + 5)
    ids = [word] * 70 + [comma] + [word] * 10
    chunks = prompts.chunks_a1111(tokenizer, ids, [1.0] * len(ids), [0] * len(ids))
    assert [c.ids[1:].index(tokenizer.eos_id) for c in chunks] == [71, 10]
    assert all(len(c.ids) == 77 and c.ids[0] == tokenizer.bos_id for c in chunks)
    # a comma more than 20 tokens back: a plain cut at 75
    ids = [word] * 50 + [comma] + [word] * 40
    chunks = prompts.chunks_a1111(tokenizer, ids, [1.0] * len(ids), [0] * len(ids))
    assert [c.ids[1:].index(tokenizer.eos_id) for c in chunks] == [75, 16]
    # BREAK (−1) ends a chunk early; "" is one empty chunk
    ids = [word] * 3 + [-1] + [word] * 2
    chunks = prompts.chunks_a1111(tokenizer, ids, [1.0] * len(ids), [0] * len(ids))
    assert [c.ids[1:].index(tokenizer.eos_id) for c in chunks] == [3, 2]
    assert len(prompts.chunks_a1111(tokenizer, [], [], [])) == 1


def test_long_prompt_is_chunked_and_negative_padded_with_empty_chunks(models):
    pipe = models[1]
    text = long_text()
    n = len(pipe.tokenizer.encode(text))
    assert n == 140, n
    context = pipe.encode_prompt([text, "a cat"])
    assert context.shape[:2] == (2, 77 * 2)
    empty = pipe.encode_prompt([""])[0]
    np.testing.assert_array_equal(context[1, :77], pipe.encode_prompt(["a cat"])[0])
    np.testing.assert_array_equal(context[1, 77:], empty)


def test_truncation_on_request_warns_with_what_was_cut(models):
    pipe = models[1]
    text = "cat " * 100
    with pytest.warns(UserWarning, match=r"its last 25 tokens were dropped \('cat cat") as record:
        context = pipe.encode_prompt([text], truncate_prompts=True)
    assert record[0].filename == __file__  # at the caller's line
    assert context.shape[1] == 77


# ---------------------------------------------------------------------------------------------------
# encodings: compel
# ---------------------------------------------------------------------------------------------------

COMPEL_ENCODED = [
    "a red star++ on a white field",
    "a (red star)1.4 on a (blue)0.6 field, (light)--",
    "(big (red)++ cat)- on a mat",
    '("a red star", "a blue circle").blend(0.7, 0.3)',
    '("a red star", "on a white field").and(1, 0.8)',
]


def reference_compel(reference, texts, long=False):
    build = compel.Compel(tokenizer=reference.tokenizer, text_encoder=reference.text_encoder,
                          truncate_long_prompts=not long)  # fmt: skip
    with torch.no_grad():
        return build(texts).numpy()


@pytest.mark.parametrize("text", COMPEL_ENCODED)
def test_compel_encodings_match_compel(models, text):
    reference, pipe = models
    expected = reference_compel(reference, [text])
    got = np.asarray(pipe.encode_prompt([text], prompt_syntax="compel", truncate_prompts=True))
    assert got.shape == expected.shape
    err = np.abs(got - expected).max()
    print(f"{text!r}: max abs error {err:.1e}")
    assert err < ATOL


@pytest.mark.parametrize(
    "text, chunks",
    [(long_text(), 2), (long_text(15), 3), (long_text().replace(".", "") + " (blue)0.5 light", 2)],
    ids=["140-tokens", "150-tokens", "phrases-downweighted"],
)
def test_compel_long_prompts_match_compel(models, text, chunks):
    """compel's long-prompt mode: chunks ending at a full stop (or a comma, a word end; 150 tokens in sentences
    of 10 make chunks of 70, 70 and 10), down-weighting masks across the chunks."""
    reference, pipe = models
    expected = reference_compel(reference, [text], long=True)
    got = np.asarray(pipe.encode_prompt([text], prompt_syntax="compel"))
    assert got.shape == expected.shape and got.shape[1] == chunks * 77, got.shape
    assert np.abs(got - expected).max() < ATOL


def test_images_with_compel_prompts_match_diffusers(models):
    """A weighted prompt and a longer negative one through both pipelines: diffusers given compel's
    embeddings (padded to one length, as compel's docs say), sdjax given the text."""
    reference, pipe = models
    text, negative = "a (red star)1.3 on a white++ field", long_text()
    build = compel.Compel(tokenizer=reference.tokenizer, text_encoder=reference.text_encoder,
                          truncate_long_prompts=False)  # fmt: skip
    with torch.no_grad():
        c, c_neg = build.pad_conditioning_tensors_to_same_length([build(text), build(negative)])
    latents = np.random.default_rng(0).standard_normal((1, 4, SIZE // 8, SIZE // 8)).astype(np.float32)
    run = dict(num_inference_steps=3, height=SIZE, width=SIZE, output_type="np")
    with torch.no_grad():
        expected = reference(prompt_embeds=c, negative_prompt_embeds=c_neg, latents=torch.from_numpy(latents), **run)
    got = pipe(text, negative_prompt=negative, prompt_syntax="compel", latents=latents, scheduler="plms", **run)
    assert np.abs(got.astype(np.float32) - expected.images).max() < 1e-3


# ---------------------------------------------------------------------------------------------------
# encodings: the web UI's rule, in float64
# ---------------------------------------------------------------------------------------------------


def a1111_float64(reference, fragments, chunks_of_words):
    """The web UI's emphasis written out: each fragment tokenized alone, the tokens laid into 77-token
    chunks at the given split points, each chunk encoded by transformers' CLIP in float64, scaled token by
    token and rescaled to its original mean."""
    tok, encoder = reference.tokenizer, reference.text_encoder.double()
    ids, weights = [], []
    for text, weight in fragments:
        new = tok(text, add_special_tokens=False)["input_ids"]
        ids, weights = ids + new, weights + [weight] * len(new)
    out, start = [], 0
    for length in chunks_of_words:
        pad = 75 - length
        chunk = [tok.bos_token_id, *ids[start : start + length], tok.eos_token_id] + [tok.pad_token_id] * pad
        w = np.array([1.0, *weights[start : start + length], 1.0] + [1.0] * pad)
        with torch.no_grad():
            z = encoder(torch.tensor([chunk])).last_hidden_state[0].numpy()  # (77, D) float64
        zw = z * w[:, None]
        out.append(zw * (z.mean() / zw.mean()))
        start += length
    reference.text_encoder.float()
    return np.concatenate(out)


@pytest.mark.parametrize(
    "text",
    ["a (red star:1.3) on a [white] field", "((big)) [[blue]] circle (light:0.4), (green square:1.7)"],
)
def test_a1111_weighting_matches_float64_rule(models, text):
    reference, pipe = models
    fragments = prompt_syntax.parse_a1111(text)
    expected = a1111_float64(reference, fragments, [sum(len(pipe.tokenizer.encode(t)) for t, _ in fragments)])
    got = np.asarray(pipe.encode_prompt([text], prompt_syntax="a1111")[0], np.float64)
    assert got.shape == expected.shape
    err = np.abs(got - expected).max() / np.abs(expected).max()
    print(f"{text!r}: max error {err:.1e} of the largest value")
    assert err < ATOL


def test_a1111_long_weighted_prompt_matches_float64_rule(models):
    """Two chunks (150 tokens, no commas: a plain cut at 75), weights in both."""
    reference, pipe = models
    text = " ".join(f"(red:1.2) star [blue] circle{'' if i % 3 else ' (green:0.7)'}" for i in range(30))
    fragments = prompt_syntax.parse_a1111(text)
    total = sum(len(pipe.tokenizer.encode(t)) for t, _ in fragments)
    assert 75 < total <= 150, total
    expected = a1111_float64(reference, fragments, [75, total - 75])
    got = np.asarray(pipe.encode_prompt([text], prompt_syntax="a1111")[0], np.float64)
    assert got.shape == expected.shape == (154, expected.shape[1])
    assert np.abs(got - expected).max() / np.abs(expected).max() < ATOL


def test_plain_prompts_are_unchanged(models):
    """A prompt with no weights is the plain encoding (diffusers') under every syntax."""
    reference, pipe = models
    text = "a red star on a white field"
    with torch.no_grad():
        expected = reference.encode_prompt(text, "cpu", 1, False)[0].numpy()
    for syntax in ("none", "a1111", "compel"):
        np.testing.assert_allclose(pipe.encode_prompt([text], prompt_syntax=syntax), expected, atol=ATOL)
