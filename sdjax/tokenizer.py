"""CLIP's tokenizer: byte-level BPE, from text prompts to the (B, 77) token ids of the text encoder.

Byte-level BPE in four steps:

1. Bytes, not characters. A prompt is encoded as UTF-8, so any text — accents, CJK, emoji — is a
   sequence of bytes from an alphabet of only 256 symbols: no prompt can contain an unknown token.
   Each byte is drawn as a printable stand-in character (:func:`bytes_to_unicode`), so BPE symbols
   and vocabulary entries stay readable strings ("a", "Ã©" for the two bytes of "é").
2. Words. The cleaned text is cut into words by a regex: runs of letters, single digits, runs of
   other non-space characters, and the English contractions 's 't 're 've 'm 'll 'd. Whitespace only
   separates; it never becomes a token.
3. Merges. A word starts as its byte symbols, the last one marked with "</w>" (end of word), so "a"
   inside "cat" and the word "a" are different tokens. A ranked list of symbol pairs, learned once
   from data (most frequent first), is then applied greedily: of the adjacent pairs in the word,
   merge the one with the best rank, everywhere it occurs, and repeat until no adjacent pair has a
   rank. Frequent words end as one symbol ("cat</w>"), rare ones as a few pieces.
4. Ids. Each final symbol is looked up in the vocabulary: 256 bytes + the same 256 with "</w>" +
   48,894 merged symbols + <|startoftext|> and <|endoftext|> = 49,408 ids. The text encoder reads
   exactly 77: <|startoftext|>, up to 75 word pieces, <|endoftext|>, then padding.

The reference is ``transformers.CLIPTokenizer`` — the tokenizer every diffusers Stable Diffusion
pipeline uses — of transformers 5, which is backed by the Rust ``tokenizers`` library (there,
``CLIPTokenizerFast`` is the same class). The tests check identical ids on a wide range of prompts.
Where it differs from OpenAI's original CLIP tokenizer (and open_clip's, which copies it), we follow
transformers:

- Cleaning. OpenAI runs ``ftfy.fix_text``, unescapes HTML twice, collapses whitespace and lowercases.
  transformers 5 applies Unicode NFC, collapses whitespace (which cannot change ids) and lowercases
  character by character: no ftfy, no HTML unescaping ("&amp;" stays "&", "amp", ";"), and a final
  capital sigma becomes "σ", not "ς" (``str.lower`` would give "ς"). transformers 4's *slow* class
  depended on whether ``ftfy`` was installed: with it, OpenAI's cleaning; without it, BERT's
  BasicTokenizer (which also splits CJK characters apart and drops control characters). transformers
  5 never uses ftfy (it is not installed on the project's machines either).
- Special tokens. The tokenizer's added tokens (bos, eos, pad) are cut out of the raw prompt before
  cleaning, case-sensitively — unless the folder's config marks one "normalized", in which case it is
  matched after cleaning (SD's folders do so for <|startoftext|>). OpenAI instead finds them with
  the word regex after lowercasing, so "<|ENDOFTEXT|>" is an end token there and six pieces here.
- SD2's tokenizer pads with "!" (id 0) and registers it as an added token, so every "!" typed in
  a prompt becomes id 0 rather than the "!</w>" (id 256) open_clip would give. diffusers sees the
  same ids; :meth:`CLIPTokenizer.from_folder` reproduces it.
- Unicode versions. Letters and digits are classified with the ``regex`` module's tables (newer than
  Python's), NFC and lowercasing use Python's ``unicodedata`` (Unicode 14 on Python 3.11); Rust's
  tables differ from both for some characters assigned in Unicode 15 and later, where a prompt using
  them may tokenize differently. (Stdlib ``re`` is not used: it lacks \\p{L}, and its \\s also matches
  the separators U+001C..U+001F, which are not Unicode whitespace.)

New words. :meth:`CLIPTokenizer.add_tokens` adds whole-word tokens, as transformers' ``add_tokens`` does:
each gets the next free id and is cut out of a prompt before BPE, so "a photo of <my-cat>" ends in one id
for "<my-cat>" however BPE would have split it. They are matched after cleaning, so case does not matter
("<My-Cat>" in a prompt is the same token) and any whitespace run in a prompt matches a space in the
token. This is how textual inversion (:mod:`sdjax.textual_inversion`) gives a learned concept its own
row of the text encoder's embedding table.

Usage:

    tok = CLIPTokenizer.from_folder("stable-diffusion-v1-5/tokenizer")   # or CLIPTokenizer.from_bpe_file()
    ids = tok(["a photo of a cat", "an astronaut riding a horse"])      # np.ndarray (2, 77) int32
"""

from __future__ import annotations

import gzip
import json
import os
import re
import unicodedata
from collections.abc import Collection, Iterator, Mapping, Sequence
from pathlib import Path

import numpy as np
import regex

CONTEXT_LENGTH = 77  # tokens the CLIP text encoder reads, bos and eos included
BOS = "<|startoftext|>"
EOS = "<|endoftext|>"
END_OF_WORD = "</w>"
DEFAULT_BPE_PATH = Path(__file__).resolve().parent.parent / "data" / "bpe_simple_vocab_16e6.txt.gz"
# CLIP keeps the first 48,894 merges of the 262k in the BPE file: 512 byte symbols + 48,894 merged
# symbols + 2 special tokens = 49,408, the text encoder's vocabulary size.
NUM_MERGES = 49408 - 2 * 256 - 2
# The config fields naming a special token, in the order transformers resolves them: where two name
# the same string with different "normalized" flags, the later one wins.
SPECIAL_TOKEN_FIELDS = {"bos_token": BOS, "eos_token": EOS, "unk_token": EOS, "pad_token": EOS}

# Step 2's word regex. Tried left to right at each position: a contraction, a run of letters (\p{L}),
# ONE digit (\p{N}: "1024" is four words), a run of anything else that is not whitespace ("!!!",
# "(", ":1.2" starts with ":"). Whitespace matches no branch, so it separates words and is dropped.
# Cleaning has lowercased the text, hence no case-insensitive flag ("'S" is already "'s"). regex's \s
# is Unicode's White_Space property, as in Rust.
WORD_PATTERN = regex.compile(r"'s|'t|'re|'ve|'m|'ll|'d|\p{L}+|\p{N}|[^\s\p{L}\p{N}]+")


def bytes_to_unicode() -> dict[int, str]:
    """The reversible map byte (0..255) -> one printable character that stands for it in BPE symbols.

    The 188 bytes that are printable Latin-1 characters ("!".."~", "¡".."¬", "®".."ÿ") stand for
    themselves; the other 68 (control characters, space, soft hyphen) are shifted to U+0100 onwards
    in byte order, so the space byte 0x20 is drawn "Ġ". Returns {byte: character}, printable bytes
    first: this order is the order of the first 256 vocabulary ids ("!" is id 0).
    """
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    table = {b: chr(b) for b in printable}
    shifted = [b for b in range(256) if b not in table]
    table.update({b: chr(256 + n) for n, b in enumerate(shifted)})
    return table


BYTE_TO_CHAR = bytes_to_unicode()
CHAR_TO_BYTE = {c: b for b, c in BYTE_TO_CHAR.items()}


def clean_text(text: str) -> str:
    """transformers' CLIP normalisation: Unicode NFC (composed accents), then lowercase per character.

    Lowercasing character by character (as the Rust ``tokenizers`` library does) keeps a final "Σ" as
    "σ"; ``str.lower`` would apply the Greek final-sigma rule and give "ς", another token.
    transformers also turns each whitespace run into one space; that cannot change a single id, since
    whitespace only separates words (:data:`WORD_PATTERN`), so it is left out here.
    """
    return "".join(ch.lower() for ch in unicodedata.normalize("NFC", text))


def pre_tokenize(text: str) -> list[str]:
    """Step 2: cleaned text -> its words, e.g. "(cat:1.2)" -> ["(", "cat", ":", "1", ".", "2", ")"]."""
    return WORD_PATTERN.findall(text)


def _split_on(text: str, pattern: re.Pattern | None) -> Iterator[tuple[str, bool]]:
    """Cut ``text`` around the matches of ``pattern`` (a capturing alternation of added tokens).

    Yields (segment, is_added_token) in order, skipping empty segments. ``re.split`` with one group
    returns [text, match, text, match, ..., text], so odd positions are the tokens.
    """
    parts = pattern.split(text) if pattern is not None else [text]
    for i, part in enumerate(parts):
        if part:
            yield part, i % 2 == 1


def _token_matcher(tokens: Sequence[str]) -> re.Pattern | None:
    # Longest first, so that at any position the longest added token wins (as in tokenizers).
    if not tokens:
        return None
    return re.compile("(" + "|".join(re.escape(t) for t in sorted(tokens, key=len, reverse=True)) + ")")


def normalize_token(token: str) -> str:
    """An added token as it is matched in a cleaned prompt: cleaned, each whitespace run one space
    ("<My  Cat>" -> "<my cat>"). transformers normalizes a "normalized" added token the same way."""
    return regex.sub(r"\s+", " ", clean_text(token))


def _normalized_token_matcher(forms: Sequence[str]) -> regex.Pattern | None:
    # As _token_matcher, over normalized forms; a space in a form matches any whitespace run of the
    # cleaned prompt, which clean_text does not collapse.
    if not forms:
        return None
    patterns = [r"\s+".join(map(regex.escape, f.split(" "))) for f in sorted(forms, key=len, reverse=True)]
    return regex.compile("(" + "|".join(patterns) + ")")


class CLIPTokenizer:
    """CLIP's byte-level BPE tokenizer, id-for-id equal to ``transformers.CLIPTokenizer`` (version 5).

    Args:
      vocab: {symbol: id}, 49,408 entries for CLIP (vocab.json).
      merges: the ranked symbol pairs, best first (merges.txt).
      bos_token, eos_token, pad_token: special token strings; SD1.x pads with eos, SD2.x with "!".
      model_max_length: default ``max_length`` of :meth:`__call__` (77).
      added_tokens: {token string: normalized}: strings cut out of a prompt and mapped straight to
        their id — matched in the raw prompt, or in the cleaned one if normalized. Default: bos, eos
        and pad, raw, as transformers builds them from a bare vocab.json + merges.txt.
      special_tokens: the added tokens that :meth:`decode` leaves out; default all of them. bos, eos
        and pad always are. Words added by :meth:`add_tokens` are not special.
    """

    def __init__(
        self,
        vocab: Mapping[str, int],
        merges: Sequence[tuple[str, str]],
        *,
        bos_token: str = BOS,
        eos_token: str = EOS,
        pad_token: str = EOS,
        model_max_length: int = CONTEXT_LENGTH,
        added_tokens: Mapping[str, bool] | None = None,
        special_tokens: Collection[str] | None = None,
    ):
        self.vocab = dict(vocab)
        self.id_to_token = {i: t for t, i in self.vocab.items()}
        self.merges = [tuple(m) for m in merges]
        self.ranks = {pair: rank for rank, pair in enumerate(self.merges)}
        self.bos_token, self.eos_token, self.pad_token = bos_token, eos_token, pad_token
        self.model_max_length = model_max_length
        if added_tokens is None:
            added_tokens = {bos_token: False, eos_token: False, pad_token: False}
        self.added_tokens = dict(added_tokens)
        special = set(self.added_tokens) if special_tokens is None else set(special_tokens)
        self.special_tokens = special | {bos_token, eos_token, pad_token}
        missing = [t for t in (*self.added_tokens, *self.special_tokens) if t not in self.vocab]
        if missing:
            raise ValueError(f"special/added tokens {missing} are not in the vocabulary")
        self._cache: dict[str, list[str]] = {}  # word -> its BPE symbols; prompts repeat words a lot
        self._build_matchers()

    def _build_matchers(self) -> None:
        """Index the added tokens for :meth:`encode` (raw ones by their text, normalized ones by
        :func:`normalize_token`) and :meth:`decode` (a non-special one decodes to its own text)."""
        self._raw_added = _token_matcher([t for t, normalized in self.added_tokens.items() if not normalized])
        self._normalized_ids = {normalize_token(t): self.vocab[t] for t, norm in self.added_tokens.items() if norm}
        self._normalized_added = _normalized_token_matcher(list(self._normalized_ids))
        self._decode_symbols = {  # the token's UTF-8 bytes as stand-ins, with no end-of-word mark
            t: "".join(BYTE_TO_CHAR[b] for b in t.encode("utf-8"))
            for t in self.added_tokens
            if t not in self.special_tokens
        }

    # ---------------------------------------------------------------- construction and saving

    @classmethod
    def from_bpe_file(cls, path: str | os.PathLike | None = None, *, pad_token: str = EOS) -> CLIPTokenizer:
        """Build vocabulary and merges from OpenAI's ``bpe_simple_vocab_16e6.txt.gz``, as CLIP and open_clip do.

        The file is a header line then one merge per line ("i n", "t h", ...), best first. The
        vocabulary is derived, not stored: the 256 byte symbols, the same with "</w>", one symbol per
        merge (the pair joined), then <|startoftext|> and <|endoftext|>. Default path: sdjax's
        ``data/bpe_simple_vocab_16e6.txt.gz``. ``pad_token``: SD1.x pads with <|endoftext|> (the
        default), SD2.x with "!".
        """
        path = Path(path) if path is not None else DEFAULT_BPE_PATH
        if not path.is_file():
            raise FileNotFoundError(
                f"CLIP BPE vocabulary not found: {path}. It ships in the data/ folder of the sdjax repository; "
                "to fetch it again run `pip download --no-deps open_clip_torch -d /tmp/oc` and unzip "
                f"open_clip/bpe_simple_vocab_16e6.txt.gz from the wheel to {DEFAULT_BPE_PATH}"
            )
        lines = gzip.decompress(path.read_bytes()).decode("utf-8").split("\n")
        merges = [tuple(line.split()) for line in lines[1 : 1 + NUM_MERGES]]
        byte_symbols = list(BYTE_TO_CHAR.values())
        symbols = byte_symbols + [s + END_OF_WORD for s in byte_symbols] + ["".join(m) for m in merges] + [BOS, EOS]
        return cls({s: i for i, s in enumerate(symbols)}, merges, pad_token=pad_token)

    @classmethod
    def from_folder(cls, path: str | os.PathLike) -> CLIPTokenizer:
        """Load a diffusers/transformers ``tokenizer/`` folder: vocab.json, merges.txt and optional configs
        (or, as transformers 5 saves it, tokenizer.json holding vocab, merges and the added tokens).

        Special tokens and ``model_max_length`` come from tokenizer_config.json, overridden by
        special_tokens_map.json (SD 2.x sets ``pad_token: "!"`` only there), unless the config lists
        its ``added_tokens_decoder`` — then that list, with its ids and "normalized" and "special"
        flags, is authoritative. Without it, added words (:meth:`add_tokens`) come from tokenizer.json's
        list or, as transformers 4 saved them, from added_tokens.json ({token: id}). This is how
        transformers 5 resolves them; missing fields take CLIP's defaults.
        """
        folder = Path(path)
        fast = folder / "tokenizer.json"  # transformers 5 saves only this (vocab and merges inside)
        missing = [name for name in ("vocab.json", "merges.txt") if not (folder / name).is_file()]
        if missing and fast.is_file():
            model = json.loads(fast.read_text(encoding="utf-8"))
            vocab = model["model"]["vocab"]
            merges = [tuple(m.split() if isinstance(m, str) else m) for m in model["model"]["merges"]]
            fast_added = {str(t["id"]): t for t in model.get("added_tokens", [])}
        elif missing:
            raise FileNotFoundError(
                f"{folder} is not a CLIP tokenizer folder: {' and '.join(missing)} (or tokenizer.json) not found. "
                "Pass a diffusers model's tokenizer/ folder, or make one with "
                "CLIPTokenizer.from_bpe_file().save_folder(path)"
            )
        else:
            vocab = json.loads((folder / "vocab.json").read_text(encoding="utf-8"))
            merges = []
            for line in (folder / "merges.txt").read_text(encoding="utf-8").splitlines():
                if line.strip() and not line.startswith("#version"):
                    merges.append(tuple(line.split()))
            fast_added = None

        def read_json(name: str) -> dict:
            file = folder / name
            return json.loads(file.read_text(encoding="utf-8")) if file.is_file() else {}

        config = read_json("tokenizer_config.json")
        fields = {name: config.get(name) or default for name, default in SPECIAL_TOKEN_FIELDS.items()}
        if "added_tokens_decoder" not in config:
            special_map = read_json("special_tokens_map.json")
            fields.update({name: special_map[name] for name in SPECIAL_TOKEN_FIELDS if special_map.get(name)})
        # A field is either the token string or a dict {"content": string, "normalized": bool, ...}.
        content = {name: value["content"] if isinstance(value, dict) else value for name, value in fields.items()}
        # token -> (saved id or None, normalized, special)
        listed = config.get("added_tokens_decoder", fast_added)
        if listed is not None:  # the saved list of added tokens is authoritative
            flags = {
                t["content"]: (int(i), t.get("normalized", False), t.get("special", False)) for i, t in listed.items()
            }
        else:  # added words only in added_tokens.json ({token: id}, as transformers 4 saved them), then the
            # special-token fields: one entry per distinct string, a later field overwriting an earlier one's flag
            flags = {t: (i, True, False) for t, i in read_json("added_tokens.json").items()}
            for name, value in fields.items():
                flags[content[name]] = (None, isinstance(value, dict) and value.get("normalized", False), True)
        for token in content.values():
            flags.setdefault(token, (None, False, True))
        vocab = dict(vocab)  # added words have ids past the BPE vocabulary: give each its saved id
        owner = {i: t for t, i in vocab.items()}
        for token, (i, _, _) in flags.items():
            if token in vocab or i is None:
                continue
            if i in owner:
                raise ValueError(
                    f"{folder}: added token {token!r} is saved with id {i}, which {owner[i]!r} already has; "
                    "the folder's files disagree (edited by hand?)"
                )
            vocab[token] = owner[i] = i
        return cls(
            vocab,
            merges,
            bos_token=content["bos_token"],
            eos_token=content["eos_token"],
            pad_token=content["pad_token"],
            model_max_length=config.get("model_max_length", CONTEXT_LENGTH),
            added_tokens={token: normalized for token, (_, normalized, _) in flags.items()},
            special_tokens={token for token, (_, _, special) in flags.items() if special},
        )

    def save_folder(self, path: str | os.PathLike) -> Path:
        """Write vocab.json, merges.txt and tokenizer_config.json, readable by ``transformers.CLIPTokenizer``.

        Returns the folder. The config lists every added token with its id and "normalized" and
        "special" flags, so both :meth:`from_folder` and transformers load back exactly this tokenizer.
        Words added by :meth:`add_tokens` are kept out of vocab.json and also listed in
        added_tokens.json, as transformers 4 stored them (transformers 5 reads either list).
        """
        folder = Path(path)
        folder.mkdir(parents=True, exist_ok=True)
        words = {t: self.vocab[t] for t in self.added_tokens if t not in self.special_tokens}
        vocab = {t: i for t, i in self.vocab.items() if t not in words}
        (folder / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False), encoding="utf-8")
        merges = "".join(f"{a} {b}\n" for a, b in self.merges)
        (folder / "merges.txt").write_text("#version: 0.2\n" + merges, encoding="utf-8")
        added_tokens_decoder = {
            str(self.vocab[token]): {
                "content": token,
                "lstrip": False,
                "normalized": normalized,
                "rstrip": False,
                "single_word": False,
                "special": token in self.special_tokens,
            }
            for token, normalized in self.added_tokens.items()
        }
        config = {
            "tokenizer_class": "CLIPTokenizer",
            "model_max_length": self.model_max_length,
            "bos_token": self.bos_token,
            "eos_token": self.eos_token,
            "unk_token": self.eos_token,  # byte-level BPE never needs it; transformers wants one
            "pad_token": self.pad_token,
            "added_tokens_decoder": added_tokens_decoder,
        }
        (folder / "tokenizer_config.json").write_text(
            json.dumps(config, ensure_ascii=False, indent=2), encoding="utf-8"
        )
        if words:
            (folder / "added_tokens.json").write_text(json.dumps(words, ensure_ascii=False, indent=2), encoding="utf-8")
        return folder

    def add_tokens(self, tokens: str | Sequence[str]) -> list[int]:
        """Add whole-word tokens (transformers' ``add_tokens``); returns their ids, the next free ones in order.

        Each is cut out of a prompt before BPE and becomes its one id (the text encoder needs a row
        for it: :func:`sdjax.textual_inversion.add_embeddings` adds both). Matching is on the cleaned
        prompt, so "<My-Cat>" and "<my-cat>" are one token, and it applies inside words too:
        "<cat>s" is "<cat>" then "s". A string that is already a token is refused, as is one that would
        match the same text as an added token; nothing is added unless all are new.
        """
        tokens = [tokens] if isinstance(tokens, str) else list(tokens)
        twice = sorted({t for t in tokens if tokens.count(t) > 1})
        if twice:
            raise ValueError(f"tokens {twice} are listed more than once; add each once")
        taken = {normalize_token(t): t for t, normalized in self.added_tokens.items() if normalized}
        for token in tokens:
            if not isinstance(token, str) or not token.strip():
                raise ValueError(f"a token must be a non-empty string, got {token!r}")
            if token in self.vocab:
                raise ValueError(
                    f"{token!r} is already in the tokenizer's vocabulary (id {self.vocab[token]}), so it cannot be a "
                    'new token: pick a rarer string, e.g. "<my-cat>"'
                )
            form = normalize_token(token)
            if form in taken:
                raise ValueError(
                    f"{token!r} would match the same text as the token {taken[form]!r} (prompts are matched "
                    f"lowercased, as {form!r}): pick another string, or use {taken[form]!r}"
                )
            taken[form] = token
        first = max(self.id_to_token) + 1
        for i, token in enumerate(tokens, start=first):
            self.vocab[token], self.id_to_token[i], self.added_tokens[token] = i, token, True
        self._build_matchers()
        return list(range(first, first + len(tokens)))

    def vector_tokens(self, token: str) -> list[str]:
        """The tokens of an added multi-vector token, in order: [token, token_1, ..., token_{n−1}]
        (diffusers' naming for a textual-inversion embedding of n vectors)."""
        names = [token]
        while f"{token}_{len(names)}" in self.added_tokens:
            names.append(f"{token}_{len(names)}")
        return names

    def expand(self, prompt: str | Sequence[str]) -> str | list[str]:
        """Spell out multi-vector tokens: "a <style> cat" -> "a <style> <style>_1 <style>_2 cat".

        What diffusers' ``maybe_convert_prompt`` does before tokenizing: each added token with n > 1
        vectors that the prompt uses becomes its n tokens (:meth:`vector_tokens`). Apply it to every prompt
        (and negative prompt) before tokenizing; prompts without such tokens come back unchanged. Matching
        ignores case and spacing, as the tokenizer does (diffusers replaces only the exact spelling).
        """
        if not isinstance(prompt, str):
            return [self.expand(p) for p in prompt]
        used = set(self.encode(prompt))
        for token in self.added_tokens:
            names = self.vector_tokens(token)
            if len(names) > 1 and self.vocab[token] in used:
                pattern = r"\s+".join(map(regex.escape, normalize_token(token).split(" ")))
                spelled_out = " ".join(names)
                prompt = regex.sub(pattern, lambda _, text=spelled_out: text, prompt, flags=regex.IGNORECASE)
        return prompt

    # ---------------------------------------------------------------- properties

    @property
    def vocab_size(self) -> int:
        return len(self.vocab)

    @property
    def bos_id(self) -> int:
        return self.vocab[self.bos_token]

    @property
    def eos_id(self) -> int:
        return self.vocab[self.eos_token]

    @property
    def pad_id(self) -> int:
        return self.vocab[self.pad_token]

    # ---------------------------------------------------------------- encoding

    def bpe(self, word: str) -> list[str]:
        """Step 3 on one word (already in byte symbols) -> its final BPE symbols.

        "photos" -> ["photos</w>"]; a rare word keeps several: "supercalifragilistic" -> ["super", "cali",
        "frag", "ili", "stic</w>"]. Results are cached per word.
        """
        if word in self._cache:
            return self._cache[word]
        symbols = [*word[:-1], word[-1] + END_OF_WORD]
        while len(symbols) > 1:
            # The adjacent pair that was merged earliest in training (lowest rank); stop when none is mergeable.
            pair = min(zip(symbols, symbols[1:]), key=lambda p: self.ranks.get(p, float("inf")))
            if pair not in self.ranks:
                break
            # Merge every occurrence of that pair, scanning left to right ("a a a" -> "aa a").
            merged, i = [], 0
            while i < len(symbols):
                if i + 1 < len(symbols) and (symbols[i], symbols[i + 1]) == pair:
                    merged.append(symbols[i] + symbols[i + 1])
                    i += 2
                else:
                    merged.append(symbols[i])
                    i += 1
            symbols = merged
        self._cache[word] = symbols
        return symbols

    def _encode_cleaned(self, text: str) -> Iterator[int]:
        for segment, is_added in _split_on(text, self._normalized_added):
            if is_added:
                yield self._normalized_ids[regex.sub(r"\s+", " ", segment)]
                continue
            for word in pre_tokenize(segment):
                byte_word = "".join(BYTE_TO_CHAR[b] for b in word.encode("utf-8"))
                yield from (self.vocab[symbol] for symbol in self.bpe(byte_word))

    def encode(self, text: str) -> list[int]:
        """Token ids of one prompt, without bos/eos, padding or truncation.

        Added tokens are cut out of the raw text first, each other segment is cleaned
        (:func:`clean_text`), then split into words, each word BPE-encoded.
        """
        ids = []
        for segment, is_added in _split_on(text, self._raw_added):
            ids.extend([self.vocab[segment]] if is_added else self._encode_cleaned(clean_text(segment)))
        return ids

    def num_truncated(self, text: str, max_length: int | None = None) -> int:
        """How many of the prompt's tokens do not fit in ``max_length`` (default 77) with bos and eos; 0 if it fits.

        A pipeline can warn with it; the cut tokens are ``encode(text)[max_length - 2:]``.
        """
        max_length = self.model_max_length if max_length is None else max_length
        return max(0, len(self.encode(text)) + 2 - max_length)

    def __call__(
        self,
        texts: str | Sequence[str],
        *,
        max_length: int | None = None,
        padding: str = "max_length",
        truncation: bool = True,
    ) -> np.ndarray:
        """Prompts -> token ids, np.ndarray (B, max_length) int32 (B = 1 for a single string).

        Each row is [bos, tokens..., eos, pad, pad, ...]. A prompt longer than ``max_length`` (default
        ``model_max_length``, 77) is cut to its first ``max_length - 2`` tokens, eos still last, as
        transformers does — or, with ``truncation=False``, refused with a ValueError.
        ``padding="longest"`` pads only up to the longest row of the batch instead.
        """
        max_length = self.model_max_length if max_length is None else max_length
        if max_length < 2:
            raise ValueError(f"max_length must leave room for bos and eos (>= 2), got {max_length}")
        if padding not in ("max_length", "longest"):
            raise ValueError(f'padding must be "max_length" or "longest", got {padding!r}')
        texts = [texts] if isinstance(texts, str) else list(texts)
        rows = []
        for i, text in enumerate(texts):
            ids = self.encode(text)
            if len(ids) + 2 > max_length:
                if not truncation:
                    shown = repr(text if len(text) <= 40 else text[:40] + "...")
                    which = f"prompt {i} ({shown})" if len(texts) > 1 else f"prompt {shown}"
                    raise ValueError(
                        f"{which} is {len(ids) + 2} tokens long with bos and eos, over the limit of {max_length}: "
                        f"shorten it, or pass truncation=True to keep its first {max_length - 2} tokens"
                    )
                ids = ids[: max_length - 2]
            rows.append([self.bos_id, *ids, self.eos_id])
        width = max_length if padding == "max_length" else max((len(r) for r in rows), default=2)
        out = np.full((len(rows), width), self.pad_id, dtype=np.int32)
        for i, row in enumerate(rows):
            out[i, : len(row)] = row
        return out

    # ---------------------------------------------------------------- decoding

    def decode(self, ids: Sequence[int] | np.ndarray, *, skip_special_tokens: bool = True) -> str:
        """Token ids (a list or a 1-D array) -> text: the cleaned prompt, a space after every word.

        Words come back separated by spaces even where the prompt had none ("cat," -> "cat ,"): the
        "</w>" markers say where a word ended, not what followed it. With ``skip_special_tokens``
        the special tokens (bos, eos, padding) are left out. A word added by :meth:`add_tokens` comes
        back as it was added, with no space after it (transformers gives it lowercased).
        """
        skip = {self.vocab[t] for t in self.special_tokens} if skip_special_tokens else set()
        tokens = [self.id_to_token[int(i)] for i in np.asarray(ids).reshape(-1) if int(i) not in skip]
        symbols = "".join(self._decode_symbols.get(t, t) for t in tokens)
        # Back from stand-in characters to bytes, then UTF-8; a cut multi-byte character becomes U+FFFD.
        text = bytes(CHAR_TO_BYTE[c] for c in symbols).decode("utf-8", errors="replace")
        return text.replace(END_OF_WORD, " ").strip()
