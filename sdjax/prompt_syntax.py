"""Prompt weighting syntax: the text a user types → weighted fragments (:mod:`sdjax.prompts` encodes them).

Two grammars are in common use, and sdjax reads both (``prompt_syntax=`` of the pipeline, ``--prompt-syntax``
of the CLI); "none" takes the text literally.

**a1111** — the AUTOMATIC1111 web UI's attention syntax (its wiki, "Attention/emphasis"):

    (word)       weight × 1.1            [word]      weight ÷ 1.1
    (word:1.3)   weight × 1.3            ((word))    × 1.1² (brackets nest and multiply)
    \\( \\) \\[ \\] \\\\   literal brackets / backslash
    BREAK        (upper case, a word of its own) ends the current 75-token chunk

An unmatched closing bracket is literal text; brackets still open at the end apply to the rest of the
prompt. Neighbouring pieces of equal weight are merged, so ``"a (b) c"`` gives [("a ", 1), ("b", 1.1), (" c", 1)].

**compel** — the syntax of the compel library (its docs, "Prompt syntax"):

    word+  word++  word-      weight × 1.1 per +, × 0.9 per −  (no space before the signs)
    (some words)1.3  "quoted words"0.5  (group)++   a group with a number or signs right after it
    ("a cat", "a dog").blend(0.7, 0.3)    a weighted average of the two prompts' encodings
    ("a cat", "a painting").and()          the encodings side by side (one context, 154 tokens)
    \\( \\) \\"                               literal characters

Nested groups multiply. Words of equal weight next to each other are merged into one fragment, as compel
does (it matters for down-weighting, which hides each fragment separately: :mod:`sdjax.prompts`). compel's
``.swap()``, ``.attend()`` and ``withLora()`` are refused with a message (sdjax does not implement them).

Both parsers return a :class:`Conjunction`: a list of parts, each a fragment list or a :class:`Blend`.
"""

from __future__ import annotations

import dataclasses
import re
from typing import NamedTuple

SYNTAXES = ("none", "a1111", "compel")
A1111_UP, COMPEL_PLUS, COMPEL_MINUS = 1.1, 1.1, 0.9


class Fragment(NamedTuple):
    """A piece of the prompt and the weight its tokens get."""

    text: str
    weight: float = 1.0


# A1111's chunk break: a fragment of its own, never merged (weight −1 is what the web UI uses for it too)
BREAK = Fragment("BREAK", -1.0)


@dataclasses.dataclass(frozen=True)
class Blend:
    """compel's ``(p₁, p₂, …).blend(w₁, w₂, …)``: c = Σ wᵢ c(pᵢ) / Σ wᵢ (no division with ``no_normalize``)."""

    prompts: tuple[tuple[Fragment, ...], ...]
    weights: tuple[float, ...]
    normalize: bool = True


@dataclasses.dataclass(frozen=True)
class Conjunction:
    """What a prompt parses to: parts whose encodings are concatenated along the tokens (one part unless
    compel's ``.and()`` made several), part k's taken as c_∅ + wₖ (c(partₖ) − c_∅)."""

    parts: tuple[tuple[Fragment, ...] | Blend, ...]
    weights: tuple[float, ...]


def parse(text: str, syntax: str = "none") -> Conjunction:
    """``text`` in ``syntax`` (one of :data:`SYNTAXES`) → :class:`Conjunction`."""
    if syntax not in SYNTAXES:
        raise ValueError(f"prompt_syntax={syntax!r}: expected one of {SYNTAXES}")
    if syntax == "compel":
        return parse_compel(text)
    fragments = parse_a1111(text) if syntax == "a1111" else [Fragment(text)]
    return Conjunction((tuple(fragments),), (1.0,))


# ---------------------------------------------------------------------------------------------------
# AUTOMATIC1111
# ---------------------------------------------------------------------------------------------------

_A1111_WEIGHT = re.compile(r":\s*([+-]?[.\d]+)\s*\)")  # ":1.3)" closes a round bracket with its weight
_A1111_PLAIN = re.compile(r"[^\\()\[\]:]+")
_A1111_BREAK = re.compile(r"\s*\bBREAK\b\s*", re.S)


def parse_a1111(text: str) -> list[Fragment]:
    """A1111 attention syntax → fragments with weights (module docstring); BREAK gives :data:`BREAK`."""
    pieces: list[list] = []  # [text, weight], weights multiplied in place as brackets close
    round_open: list[int] = []  # for each open bracket, the index of the first piece inside it
    square_open: list[int] = []

    def scale(start: int, factor: float) -> None:
        for piece in pieces[start:]:
            piece[1] *= factor

    def literal(s: str) -> None:
        for i, part in enumerate(_A1111_BREAK.split(s)):
            if i:
                pieces.append(list(BREAK))
            pieces.append([part, 1.0])

    i = 0
    while i < len(text):
        c = text[i]
        if c == "\\":
            nxt = text[i + 1 : i + 2]
            literal(nxt if nxt in ("(", ")", "[", "]", "\\") else "\\")
            i += 2 if nxt in ("(", ")", "[", "]", "\\") else 1
        elif c == "(":
            round_open.append(len(pieces))
            i += 1
        elif c == "[":
            square_open.append(len(pieces))
            i += 1
        elif c == ":" and (m := _A1111_WEIGHT.match(text, i)):
            if round_open:
                try:
                    scale(round_open.pop(), float(m.group(1)))
                except ValueError:
                    raise ValueError(f"prompt {text!r}: {m.group(1)!r} is not a number (in {m.group(0)!r})") from None
            else:
                literal(m.group(0))
            i = m.end()
        elif c == ")" and round_open:
            scale(round_open.pop(), A1111_UP)
            i += 1
        elif c == "]" and square_open:
            scale(square_open.pop(), 1 / A1111_UP)
            i += 1
        elif c in ":)]":
            literal(c)
            i += 1
        else:
            m = _A1111_PLAIN.match(text, i)
            literal(m.group(0))
            i = m.end()
    for start in round_open:
        scale(start, A1111_UP)
    for start in square_open:
        scale(start, 1 / A1111_UP)

    merged: list[list] = []
    for piece in pieces or [["", 1.0]]:
        if merged and merged[-1][1] == piece[1]:
            merged[-1][0] += piece[0]
        else:
            merged.append(piece)
    return [Fragment(t, w) for t, w in merged]


# ---------------------------------------------------------------------------------------------------
# compel
# ---------------------------------------------------------------------------------------------------

_NUMBER = re.compile(r"-?(?:\d+\.\d*|\.\d+|\d+)")
_OPERATOR = re.compile(r"\.(blend|and|add)\(([^()]*)\)\s*$")
_UNSUPPORTED = re.compile(r"\.(swap|attend)\(|\b(withLora|useLora)\(")


class _CompelParser:
    """Recursive descent over one prompt: items are words (with +/− suffixes), runs of , and ., and
    groups in parentheses or double quotes (with a number or +/− suffix)."""

    def __init__(self, text: str, source: str):
        self.text, self.source, self.i = text, source, 0

    def error(self, what: str) -> ValueError:
        return ValueError(
            f"prompt {self.source!r}: {what} at character {self.i} of {self.text!r} (compel syntax; escape a "
            'literal bracket or quote as \\( \\) \\")'
        )

    def prompt(self, weight: float = 1.0, until: str = "") -> list[Fragment]:
        out: list[Fragment] = []
        text = self.text
        while self.i < len(text):
            c = text[self.i]
            if c.isspace():
                self.i += 1
            elif c == until:
                return out
            elif c in '()"' and c not in '("':
                raise self.error(f"unmatched {c!r}")
            elif c in '("':
                self.i += 1
                inner = self.prompt(until=")" if c == "(" else '"')
                if self.i >= len(text):
                    raise self.error(f"unclosed {c!r}")
                self.i += 1
                factor = self.suffix(numbers=True)
                out += [Fragment(f.text, f.weight * factor * weight) for f in inner]
            elif c in ",.":
                start = self.i
                while self.i < len(text) and text[self.i] in ",.":
                    self.i += 1
                out.append(Fragment(text[start : self.i], weight))
            else:
                word = self.word()
                factor = self.suffix(numbers=False) if word else 1.0
                if word:
                    out.append(Fragment(word, weight * factor))
                else:  # signs with no word before them are text
                    out.append(Fragment(self.signs(), weight))
        if until:
            raise self.error(f"unclosed {'(' if until == ')' else until!r}")
        return out

    def word(self) -> str:
        """Characters up to whitespace, a bracket, a quote, , or . (escapes taken literally). A run of + or −
        signs ends the word when what follows it would end it too: those signs are its weight (:meth:`suffix`);
        elsewhere they are text ("well-known")."""
        text, chars = self.text, []
        while self.i < len(text) and not text[self.i].isspace() and text[self.i] not in '()",.':
            c = text[self.i]
            if c == "\\" and self.i + 1 < len(text):
                self.i += 1
            elif c in "+-":
                end = self.i
                while end < len(text) and text[end] in "+-":
                    end += 1
                if end == len(text) or text[end].isspace() or text[end] in '()",.':
                    break
            chars.append(text[self.i])
            self.i += 1
        return "".join(chars)

    def signs(self) -> str:
        start = self.i
        while self.i < len(self.text) and self.text[self.i] in "+-":
            self.i += 1
        return self.text[start : self.i]

    def suffix(self, numbers: bool) -> float:
        """The weight written right after a word (+ or − signs) or a group (signs or a number)."""
        signs = self.signs()
        if signs:
            if len(set(signs)) > 1:
                raise self.error(f"mixed signs {signs!r}")
            return (COMPEL_PLUS if signs[0] == "+" else COMPEL_MINUS) ** len(signs)
        if numbers and (m := _NUMBER.match(self.text, self.i)):
            self.i = m.end()
            return float(m.group(0))
        return 1.0


def _fuse(fragments: list[Fragment]) -> tuple[Fragment, ...]:
    """compel's flattening: neighbours of equal weight become one fragment, joined by a space."""
    fused: list[Fragment] = []
    for f in fragments:
        if fused and fused[-1].weight == f.weight:
            fused[-1] = Fragment(f"{fused[-1].text} {f.text}", f.weight)
        else:
            fused.append(f)
    return tuple(fused)


def _split_arguments(text: str, source: str) -> list[str]:
    """The comma-separated arguments of ``(a, "b, c", (d e))`` (commas inside quotes or brackets kept)."""
    args, depth, quoted, start = [], 0, False, 0
    for i, c in enumerate(text):
        if c == '"' and text[i - 1 : i] != "\\":
            quoted = not quoted
        elif not quoted and c == "(":
            depth += 1
        elif not quoted and c == ")":
            depth -= 1
        elif not quoted and depth == 0 and c == ",":
            args.append(text[start:i].strip())
            start = i + 1
    args.append(text[start:].strip())
    if any(not a for a in args):
        raise ValueError(f"prompt {source!r}: an empty argument in ({text})")
    return args


def _operator_weights(options: str, source: str) -> tuple[list[float], bool]:
    parts = [o.strip() for o in options.split(",") if o.strip()]
    normalize = "no_normalize" not in parts
    try:
        return [float(p) for p in parts if p != "no_normalize"], normalize
    except ValueError:
        raise ValueError(f"prompt {source!r}: the weights ({options}) must be numbers") from None


def parse_compel(text: str) -> Conjunction:
    """compel syntax → :class:`Conjunction` (module docstring)."""
    if m := _UNSUPPORTED.search(text):
        raise ValueError(f"prompt {text!r}: compel's {m.group(0)[:-1]!r} is not supported by sdjax")
    spaced = re.sub(r",(\S)", r", \1", text)  # compel puts a space after every comma first
    op = _OPERATOR.search(spaced)
    body = spaced[: op.start()].strip() if op else ""
    if op and body.startswith("(") and body.endswith(")"):
        prompts = []
        for arg in _split_arguments(body[1:-1], text):
            inner = arg[1:-1] if len(arg) > 1 and arg[0] == '"' == arg[-1] else arg
            prompts.append(_fuse(_CompelParser(inner, text).prompt()) or (Fragment(""),))
        weights, normalize = _operator_weights(op.group(2), text)
        if op.group(1) == "blend":
            weights = weights or [1.0] * len(prompts)
            if len(weights) != len(prompts):
                raise ValueError(f"prompt {text!r}: {len(prompts)} prompts to blend but {len(weights)} weights")
            return Conjunction((Blend(tuple(prompts), tuple(weights), normalize),), (1.0,))
        weights = weights or [1.0] * len(prompts)
        if len(weights) != len(prompts):
            raise ValueError(f"prompt {text!r}: {len(prompts)} prompts joined by .and() but {len(weights)} weights")
        return Conjunction(tuple(prompts), tuple(weights))
    fragments = _fuse(_CompelParser(spaced, text).prompt()) if spaced.strip() else ()
    return Conjunction((fragments or (Fragment(""),),), (1.0,))
