"""CLIP tokenizer: id-for-id parity with transformers' CLIPTokenizer on the same vocabulary, plus sdjax's own API.

The reference is built without any hub: this file derives vocab.json and merges.txt from the BPE file
in data/ by itself, the way open_clip does, and transformers loads that folder; a second reference
loads the folder sdjax's ``save_folder`` wrote. Both must hold all 49,408 ids, so a tokenizer that
silently came up (nearly) empty cannot make the comparisons pass.

In transformers 5, ``CLIPTokenizer`` is backed by the Rust ``tokenizers`` library and
``CLIPTokenizerFast`` is the same class. In transformers 4, ``CLIPTokenizer`` was a Python class whose
text cleaning depended on whether ftfy was installed (ftfy is not installed here); the
tokenizers-backed class was ``CLIPTokenizerFast``, which sdjax matches, so that is the reference there.
"""

import gzip
import json
import random

import numpy as np
import pytest
import transformers
from tokenizers.pre_tokenizers import ByteLevel

from sdjax.tokenizer import BYTE_TO_CHAR, DEFAULT_BPE_PATH, CLIPTokenizer, bytes_to_unicode

TRANSFORMERS_5 = int(transformers.__version__.split(".")[0]) >= 5
Reference = transformers.CLIPTokenizer if TRANSFORMERS_5 else transformers.CLIPTokenizerFast
VOCAB_SIZE = 49408
EOS_ID, BOS_ID = 49407, 49406

PROMPTS = [
    # everyday prompts and case
    "a photo of a cat",
    "An astronaut riding a horse on Mars, highly detailed, 8k",
    "A painting of a fox in the style of Van Gogh",
    "portrait of a woman, oil on canvas, by John Singer Sargent",
    "MiXeD CaSe PrOmPt",
    "ALL CAPS SHOUTING",
    "camelCaseWord and snake_case_word",
    # punctuation
    "hello, world!",
    "wait... what?!",
    "a--b__c~~d",
    "\"quoted\" and 'single' and `backticks`",
    "(((very))) [[[nested]]] {{{braces}}}",
    "email@example.com http://x.org/a?b=c#d",
    "$100 & 50% off * 2 + 3 = #5",
    "semi;colon:colon/slash\\backslash|pipe",
    # contractions (and near misses)
    "don't it's we're they've I'm you'll he'd",
    "DON'T IT'S WE'RE",
    "rock 'n' roll, ''s, ' s, it'ſ",
    # numbers: every digit is its own word
    "1024x768",
    "3.14159",
    "1,000,000 people in the year 2023",
    "½ ² ³ Ⅻ ① ٣",
    # Stable Diffusion prompt syntax
    "(masterpiece:1.2), best quality, (worst quality:0.8)",
    "[cat|dog] in a [forest:city:0.5]",
    "<lora:add_detail:0.5> a castle",
    "a cat AND a dog BREAK blue sky",
    "{red|green|blue} car",
    "embedding:EasyNegative, (bad hands:1.4)",
    # HTML stays as typed (OpenAI's tokenizer would unescape it)
    "fish &amp; chips",
    "&lt;b&gt;bold&lt;/b&gt; &#39;x&#39; &quot;y&quot;",
    "<b>html tags</b> <br/>",
    # whitespace and control characters
    "",
    " ",
    "   \t\n  ",
    "line one\nline two\n\nline three",
    "tab\tseparated\tvalues",
    "  leading and trailing  ",
    "non\u00a0breaking\u2003em\u3000ideographic spaces",
    "a\x85next line\u2028line separator",
    "zero\u200bwidth\ufeffbom",
    "file\x1cseparator\x1fcontrols\x00nul\x07bell",
    # Latin-script Unicode: accents, case mappings, compatibility characters
    "café naïve résumé",
    "Straße and ß and ẞ",
    "İstanbul ıi Iİ",
    "ΟΔΟΣ Σίσυφος",
    "e\u0301 vs é (combining vs precomposed), a\u0308\u0301",
    "Ångström Å Å",
    "ﬁne ﬂower ﬃ ligatures",
    "Ǆemal ǅ ǆ",
    "Ｆｕｌｌｗｉｄｔｈ ＡＢＣ １２３",
    # other scripts
    "東京タワーの夜景",
    "一只可爱的猫",
    "한국어 프롬프트",
    "Привет, мир! Ёлка",
    "مرحبا بالعالم",
    "שלום עולם",
    "नमस्ते दुनिया",
    "ภาษาไทย",
    "Ελληνικά γράμματα",
    # emoji
    "🐱 cat emoji",
    "👍🏽 skin tone",
    "👨‍👩‍👧 family zwj",
    "🇫🇷 flag",
    "❤️ red heart with vs16",
    "✨sparkles✨",
    # special tokens typed into a prompt
    "<|startoftext|>",
    "a <|endoftext|> b",
    "<|ENDOFTEXT|> upper",
    "!<|endoftext|>",
    "<|startoftext|><|endoftext|>",
    # repeated punctuation
    "!!!!!!!!",
    "........",
    "?!?!?!",
    "a!!!b???c",
    "--==--==",
    # longer than 77 tokens
    ", ".join(["a very long prompt"] * 30),
    "x" * 500,
    "word " * 100,
    "supercalifragilisticexpialidocious " * 10,
    "🐱" * 80,
]
ASCII_PROMPTS = [p for p in PROMPTS if p.isascii()]


def derive_vocab_and_merges() -> tuple[dict[str, int], list[str]]:
    """vocab.json and merges.txt lines as open_clip derives them from the BPE file; independent of sdjax."""
    # Bytes that are printable, non-space Latin-1 characters stand for themselves; the rest, in byte
    # order, for U+0100, U+0101, ...
    keep = [b for b in range(256) if chr(b).isprintable() and b != ord(" ")]
    shifted = [b for b in range(256) if b not in keep]
    stand_in = {b: chr(b) for b in keep} | {b: chr(256 + n) for n, b in enumerate(shifted)}
    lines = gzip.decompress(DEFAULT_BPE_PATH.read_bytes()).decode("utf-8").split("\n")
    merges = lines[1 : 49152 - 256 - 2 + 1]
    symbols = list(stand_in.values())
    symbols += [s + "</w>" for s in symbols] + [m.replace(" ", "") for m in merges]
    symbols += ["<|startoftext|>", "<|endoftext|>"]
    return {s: i for i, s in enumerate(symbols)}, merges


def write_folder(folder, vocab, merges, **configs):
    """A tokenizer folder: vocab.json, merges.txt and any {file stem: dict} config files."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False), encoding="utf-8")
    (folder / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n", encoding="utf-8")
    for stem, config in configs.items():
        (folder / f"{stem}.json").write_text(json.dumps(config), encoding="utf-8")
    return folder


def load_reference(folder):
    tok = Reference.from_pretrained(folder)
    assert len(tok) == VOCAB_SIZE, f"transformers built a {len(tok)}-token tokenizer from {folder}"
    return tok


def reference_ids(tok, texts, max_length=77, padding="max_length"):
    return np.array(tok(texts, padding=padding, max_length=max_length, truncation=True)["input_ids"])


@pytest.fixture(scope="module")
def derived():
    return derive_vocab_and_merges()


@pytest.fixture(scope="module")
def ours():
    return CLIPTokenizer.from_bpe_file()


@pytest.fixture(scope="module")
def hf(tmp_path_factory, derived):
    return load_reference(write_folder(tmp_path_factory.mktemp("derived"), *derived))


@pytest.fixture(scope="module")
def hf_from_saved(tmp_path_factory, ours):
    return load_reference(ours.save_folder(tmp_path_factory.mktemp("saved")))


# ---------------------------------------------------------------- vocabulary


def test_vocabulary_matches_open_clip_derivation(ours, derived):
    vocab, merges = derived
    assert ours.vocab_size == len(ours.vocab) == VOCAB_SIZE
    assert ours.vocab == vocab
    assert [f"{a} {b}" for a, b in ours.merges] == merges
    assert (ours.bos_id, ours.eos_id, ours.pad_id) == (BOS_ID, EOS_ID, EOS_ID)


def test_byte_table_is_reversible_and_matches_tokenizers():
    table = bytes_to_unicode()
    assert sorted(table) == list(range(256)) and len(set(table.values())) == 256
    assert set(table.values()) == set(ByteLevel.alphabet())
    assert table[ord("a")] == "a" and table[ord(" ")] == "Ġ" and table[0] == "Ā"
    assert list(table.values())[0] == "!"  # the byte order of the table is the order of ids 0..255


def test_save_folder_round_trip(ours, tmp_path):
    again = CLIPTokenizer.from_folder(ours.save_folder(tmp_path / "tok"))
    assert again.vocab == ours.vocab and again.merges == ours.merges
    assert (again.bos_id, again.eos_id, again.pad_id, again.model_max_length) == (BOS_ID, EOS_ID, EOS_ID, 77)
    assert again.added_tokens == ours.added_tokens
    np.testing.assert_array_equal(again(PROMPTS), ours(PROMPTS))


# ---------------------------------------------------------------- parity with transformers


@pytest.mark.parametrize("reference", ["hf", "hf_from_saved"])
def test_padded_ids_match_transformers(ours, reference, request):
    hf = request.getfixturevalue(reference)
    ids = ours(PROMPTS)
    assert ids.shape == (len(PROMPTS), 77) and ids.dtype == np.int32
    np.testing.assert_array_equal(ids, reference_ids(hf, PROMPTS))


@pytest.mark.parametrize("i", range(len(PROMPTS)))
def test_encode_matches_transformers(ours, hf, i):
    text = PROMPTS[i]
    assert ours.encode(text) == hf(text, add_special_tokens=False)["input_ids"], repr(text)


def test_random_strings_match_transformers(ours, hf):
    # Random character soup and random runs of vocabulary pieces: exercise the word regex and the merge
    # loop on far more words than the hand-written prompts.
    rng = random.Random(0)
    alphabet = list("abcxyzABCXYZ019 .,;:!?'\"()[]{}<>|/\\-_=+*&#@~\n\t") + list("éßçñøİıΣσςжأ中文日本語한국ไทย")
    alphabet += ["\u0301", "\u200b", "\x1c", "\x85", "\u3000", "🐱", "👍🏽", "…", "’"]
    pieces = [s.removesuffix("</w>") for s in ours.vocab]
    texts = ["".join(rng.choices(alphabet, k=rng.randint(0, 30))) for _ in range(2000)]
    texts += [" ".join(rng.choices(pieces, k=rng.randint(1, 5))) for _ in range(2000)]
    expected = hf(texts, add_special_tokens=False)["input_ids"]
    mismatches = [t for t, e in zip(texts, expected) if ours.encode(t) != e]
    assert not mismatches, f"{len(mismatches)} of {len(texts)} differ, e.g. {mismatches[:3]}"


def test_padding_longest_and_short_max_length_match_transformers(ours, hf):
    batch = ["a cat", "a photo of a dog on a beach", ""]
    np.testing.assert_array_equal(ours(batch, padding="longest"), reference_ids(hf, batch, padding="longest"))
    np.testing.assert_array_equal(ours(batch, max_length=6), reference_ids(hf, batch, max_length=6))


def test_fast_tokenizer_agrees(ours, tmp_path, derived):
    # In transformers 5 CLIPTokenizerFast is CLIPTokenizer (an alias); the check has teeth on 4.x.
    if not hasattr(transformers, "CLIPTokenizerFast"):
        pytest.skip("this transformers has no CLIPTokenizerFast")
    fast = transformers.CLIPTokenizerFast.from_pretrained(write_folder(tmp_path / "tok", *derived))
    assert len(fast) == VOCAB_SIZE
    np.testing.assert_array_equal(ours(PROMPTS), reference_ids(fast, PROMPTS))


# ---------------------------------------------------------------- Stable Diffusion tokenizer folders


def _added(content, normalized):
    return {"content": content, "lstrip": False, "normalized": normalized, "rstrip": False, "single_word": False}


# The config files of SD's tokenizer folders (as on the hub). SD1.x: padding with <|endoftext|>.
# SD2.x: the same tokenizer_config, but special_tokens_map.json pads with "!" (id 0). SDXL's second
# tokenizer: a newer config listing added_tokens_decoder, also padding with "!".
_SD1_CONFIG = {
    "bos_token": {"__type": "AddedToken", **_added("<|startoftext|>", True)},
    "eos_token": {"__type": "AddedToken", **_added("<|endoftext|>", True)},
    "unk_token": {"__type": "AddedToken", **_added("<|endoftext|>", True)},
    "pad_token": "<|endoftext|>",
    "do_lower_case": True,
    "errors": "replace",
    "model_max_length": 77,
    "tokenizer_class": "CLIPTokenizer",
}
_SD1_MAP = {
    "bos_token": _added("<|startoftext|>", True),
    "eos_token": _added("<|endoftext|>", True),
    "unk_token": _added("<|endoftext|>", True),
    "pad_token": "<|endoftext|>",
}
_SDXL2_CONFIG = {
    "added_tokens_decoder": {
        "0": {**_added("!", False), "special": True},
        "49406": {**_added("<|startoftext|>", True), "special": False},
        "49407": {**_added("<|endoftext|>", False), "special": False},
    },
    "bos_token": "<|startoftext|>",
    "eos_token": "<|endoftext|>",
    "unk_token": "<|endoftext|>",
    "pad_token": "!",
    "model_max_length": 77,
    "tokenizer_class": "CLIPTokenizer",
}
_DECODER_WITHOUT_PAD = {i: t for i, t in _SDXL2_CONFIG["added_tokens_decoder"].items() if i != "0"}
SD_FOLDERS = {
    "sd1": ({"tokenizer_config": _SD1_CONFIG, "special_tokens_map": _SD1_MAP}, EOS_ID),
    "sd2": ({"tokenizer_config": _SD1_CONFIG, "special_tokens_map": _SD1_MAP | {"pad_token": "!"}}, 0),
    "sdxl-2": ({"tokenizer_config": _SDXL2_CONFIG, "special_tokens_map": _SD1_MAP | {"pad_token": "!"}}, 0),
    # added_tokens_decoder without the pad token: transformers still registers "!" as an added token
    "decoder-without-pad": ({"tokenizer_config": _SDXL2_CONFIG | {"added_tokens_decoder": _DECODER_WITHOUT_PAD}}, 0),
}
SPECIAL_PROMPTS = ["hi!!", "a cat!", "<|STARTOFTEXT|> x", "<|ENDOFTEXT|> y", "!<|StartOfText|>", "<|endoftext|>!"]


@pytest.mark.parametrize("name", SD_FOLDERS)
def test_sd_folders_pad_and_match_transformers(name, derived, tmp_path):
    configs, pad_id = SD_FOLDERS[name]
    folder = write_folder(tmp_path / name, *derived, **configs)
    ours, hf = CLIPTokenizer.from_folder(folder), load_reference(folder)
    assert (ours.pad_id, ours.eos_id, ours.model_max_length) == (pad_id, EOS_ID, 77) and hf.pad_token_id == pad_id
    texts = PROMPTS + SPECIAL_PROMPTS
    np.testing.assert_array_equal(ours(texts), reference_ids(hf, texts))
    row = ours("a photo of a cat")[0]  # bos, 5 words, eos, then padding
    assert row[0] == BOS_ID and row[6] == EOS_ID and (row[7:] == pad_id).all()


def test_sd2_turns_typed_exclamation_marks_into_padding_ids(derived, tmp_path):
    # The quirk from_folder must reproduce: SD2 registers its pad token "!" as an added token.
    sd1 = CLIPTokenizer.from_folder(write_folder(tmp_path / "sd1", *derived, **SD_FOLDERS["sd1"][0]))
    sd2 = CLIPTokenizer.from_folder(write_folder(tmp_path / "sd2", *derived, **SD_FOLDERS["sd2"][0]))
    assert sd1.encode("hi!!") == [1883, 748]  # "hi</w>", "!!</w>"
    assert sd2.encode("hi!!") == [1883, 0, 0]


# ---------------------------------------------------------------- truncation and errors


def test_truncation_keeps_eos_last_and_counts_what_was_cut(ours, hf):
    text = "word " * 100
    ids = ours(text)[0]
    assert ids[0] == BOS_ID and ids[-1] == EOS_ID
    assert ids[1:-1].tolist() == ours.encode(text)[:75]
    assert ours.num_truncated(text) == 100 + 2 - 77
    assert ours.num_truncated(text, max_length=10) == 100 + 2 - 10
    assert ours.num_truncated("a photo of a cat") == 0
    full = hf(text, add_special_tokens=True)["input_ids"]
    assert ours.num_truncated(text) == len(full) - 77


def test_too_long_prompt_without_truncation_names_count_limit_and_fix(ours):
    text = "word " * 100
    with pytest.raises(ValueError, match=r"102 tokens long .* limit of 77: shorten it, or pass truncation=True"):
        ours(text, truncation=False)
    with pytest.raises(ValueError, match=r"prompt 1 .* 102 tokens"):
        ours(["a cat", text], truncation=False)
    assert ours("a cat", truncation=False).shape == (1, 77)  # a prompt that fits passes


def test_bad_arguments_are_refused(ours):
    with pytest.raises(ValueError, match="padding"):
        ours("a cat", padding="do_not_pad")
    with pytest.raises(ValueError, match="max_length"):
        ours("a cat", max_length=1)


def test_missing_files_name_the_path(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"nowhere.*vocab\.json and merges\.txt"):
        CLIPTokenizer.from_folder(tmp_path / "nowhere")
    missing = tmp_path / "missing_bpe.txt.gz"
    with pytest.raises(FileNotFoundError, match=r"missing_bpe\.txt\.gz.*pip download --no-deps open_clip_torch"):
        CLIPTokenizer.from_bpe_file(missing)


# ---------------------------------------------------------------- decoding


def test_decode_round_trips_simple_prompts(ours):
    for text in ["a photo of a cat", "an astronaut riding a horse on mars", "portrait oil painting"]:
        assert ours.decode(ours.encode(text)) == text
        assert ours.decode(ours(text)[0]) == text  # bos, eos and padding are dropped
    # Words come back separated by spaces, lowercased: the "</w>" markers keep where words ended.
    assert ours.decode(ours.encode("A Cat, 4K!")) == "a cat , 4 k !"
    assert ours.decode(ours.encode("café 東京 🐱")) == "café 東京 🐱"


def test_decode_matches_transformers(ours, hf):
    for text in ASCII_PROMPTS:
        ids = ours(text)[0]
        expected = hf.decode(ids, skip_special_tokens=True, clean_up_tokenization_spaces=False)
        assert ours.decode(ids) == expected, repr(text)
        expected = hf.decode(ids, skip_special_tokens=False, clean_up_tokenization_spaces=False)
        assert ours.decode(ids, skip_special_tokens=False) == expected, repr(text)


def test_byte_to_char_covers_every_vocabulary_symbol(ours):
    # Every non-special symbol is made of byte stand-ins (plus the end-of-word marker): decodable.
    chars = set(BYTE_TO_CHAR.values())
    plain = [s.removesuffix("</w>") for s in ours.vocab if s not in ours.added_tokens]
    assert all(set(s) <= chars for s in plain)


def test_folder_saved_by_transformers_5(tmp_path):
    """transformers 5 writes only tokenizer.json (vocab, merges and added tokens inside) and a config;
    from_folder reads that layout too, and gives transformers' ids."""
    CLIPTokenizer.from_bpe_file(pad_token="!").save_folder(tmp_path / "ours")
    hf = transformers.CLIPTokenizer.from_pretrained(tmp_path / "ours")
    hf.save_pretrained(tmp_path / "saved")
    assert not (tmp_path / "saved" / "vocab.json").exists() and (tmp_path / "saved" / "tokenizer.json").is_file()
    tok = CLIPTokenizer.from_folder(tmp_path / "saved")
    assert tok.vocab_size == 49408 and tok.pad_id == 0
    for prompt in ("a photo of a cat!!", "(masterpiece:1.2), <lora:x:0.5> Ünïcödé 123", ""):
        assert tok(prompt)[0].tolist() == hf(prompt, padding="max_length", max_length=77).input_ids
