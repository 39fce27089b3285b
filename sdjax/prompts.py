"""Prompts to the contexts the UNet attends to: step 1 of a Stable Diffusion run (:mod:`sdjax.pipeline`).

Each prompt becomes CLIP token ids, 77 at a time ([bos, tokens…, eos, pad…]), and the text encoder turns
them into the context c = CLIP(ids), the last layer's hidden states, (77, D). A prompt of more than 75
tokens is encoded in chunks, c = [c¹; c²; …] (77·k, D), as the AUTOMATIC1111 web UI and compel do, or, with
``truncate``, cut to 75 tokens with a warning naming what was dropped, as diffusers does. The text may
carry weights (:mod:`sdjax.prompt_syntax`): the web UI's ``(word:1.3)`` or compel's ``word++``, applied to
the encodings by each tool's own rule (:func:`_a1111`, :func:`_compel`).

The negative prompt (default "") gives the unconditional context c_∅ the same way. Under classifier-free
guidance each image's pair (c_∅,n, c_n) sits side by side, (2N, T, D), the layout
:func:`sdjax.chain.guided` evaluates; all contexts of one call are completed to the same T with chunks of
the empty prompt's encoding.
"""

from __future__ import annotations

import functools
import math
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from sdjax import prompt_syntax
from sdjax.components import Components
from sdjax.models.clip import CLIPTextModel
from sdjax.tokenizer import CONTEXT_LENGTH, CLIPTokenizer

Array = jax.Array


def as_list(prompt: str | list[str], what: str = "prompt") -> list[str]:
    """One string or a non-empty list of strings, as a list; ValueError naming ``what`` otherwise."""
    prompts = [prompt] if isinstance(prompt, str) else list(prompt)
    if not prompts or not all(isinstance(p, str) for p in prompts):
        raise ValueError(f"{what} must be a string or a non-empty list of strings, got {prompt!r}")
    return prompts


def prompt_lists(prompt: str | list[str], negative_prompt: str | list[str] | None) -> tuple[list[str], list[str]]:
    """The prompts, and one negative prompt for each ("" by default, as diffusers)."""
    prompts = as_list(prompt, "prompt")
    negatives = as_list("" if negative_prompt is None else negative_prompt, "negative_prompt")
    if len(negatives) == 1:
        negatives = negatives * len(prompts)
    if len(negatives) != len(prompts):
        raise ValueError(f"{len(negatives)} negative prompts for {len(prompts)} prompts: give one, or one each")
    return prompts, negatives


# ---------------------------------------------------------------------------------------------------
# Long prompts: chunks of 75 tokens
# ---------------------------------------------------------------------------------------------------
#
# CLIP reads 77 positions, so a longer prompt is cut into chunks of at most 75 tokens, each encoded on its
# own as [bos, tokens…, eos, pad…] and the encodings concatenated: c = [c¹; c²; …], (77·k, D). The UNet's
# cross-attention takes any number of keys, so nothing else changes; the negative prompt's encoding is
# padded to the same k with chunks of the empty prompt's c_∅ (compel's rule, and the web UI's
# "pad prompt/negative prompt to be same length" setting).

CHUNK = CONTEXT_LENGTH - 2  # tokens of the prompt in one chunk; bos and eos take the other two
COMMA_BACKTRACK = 20  # the web UI's comma_padding_backtrack
SENTENCE_ENDS, PHRASE_ENDS = (".</w>",), (".</w>", ",</w>", ";</w>", ":</w>")


class Chunk(NamedTuple):
    """One chunk's 77 token ids, the weight of each, and the prompt fragment each came from (−1 for
    bos/eos/pad)."""

    ids: list[int]
    weights: list[float]
    fragment: list[int]


def _tokens(tokenizer: CLIPTokenizer, fragments) -> tuple[list[int], list[float], list[int]]:
    """Each fragment tokenized on its own (textual-inversion tokens spelled out), then concatenated:
    token ids, their weights, and their fragment index; A1111's BREAK becomes token id −1."""
    ids, weights, which = [], [], []
    for k, (text, weight) in enumerate(fragments):
        tokens = [-1] if (text, weight) == prompt_syntax.BREAK else tokenizer.encode(tokenizer.expand(text))
        ids += tokens
        weights += [weight] * len(tokens)
        which += [k] * len(tokens)
    return ids, weights, which


def _chunk(tokenizer: CLIPTokenizer, ids, weights, which) -> Chunk:
    """[bos, tokens…, eos, pad…] (77) with weight 1 on the markers."""
    pad = CONTEXT_LENGTH - len(ids) - 2
    return Chunk(
        [tokenizer.bos_id, *ids, tokenizer.eos_id] + [tokenizer.pad_id] * pad,
        [1.0, *weights, 1.0] + [1.0] * pad,
        [-1, *which, -1] + [-1] * pad,
    )


def chunks_a1111(tokenizer: CLIPTokenizer, ids, weights, which) -> list[Chunk]:
    """The web UI's split (``tokenize_line``): fill chunks of 75; a BREAK (id −1) ends one early; when a
    chunk is full and its last comma is at most 20 tokens back, the tokens after that comma move to the
    next chunk, so a phrase is not cut in two. A prompt of no tokens is one chunk."""
    comma = tokenizer.vocab[",</w>"]
    chunks: list[Chunk] = []
    current: list[tuple[int, float, int]] = []
    last_comma = -1
    for token in zip(ids, weights, which):
        if token[0] == -1:  # BREAK
            chunks.append(_chunk(tokenizer, *zip(*current)) if current else _chunk(tokenizer, [], [], []))
            current, last_comma = [], -1
            continue
        if token[0] == comma:
            last_comma = len(current)
        elif len(current) == CHUNK and last_comma != -1 and len(current) - last_comma <= COMMA_BACKTRACK:
            chunks.append(_chunk(tokenizer, *zip(*current[: last_comma + 1])))
            current, last_comma = current[last_comma + 1 :], -1
        if len(current) == CHUNK:
            chunks.append(_chunk(tokenizer, *zip(*current)))
            current, last_comma = [], -1
        current.append(token)
    if current or not chunks:
        chunks.append(_chunk(tokenizer, *zip(*current)) if current else _chunk(tokenizer, [], [], []))
    return chunks


def chunks_compel(tokenizer: CLIPTokenizer, ids, weights, which) -> list[Chunk]:
    """compel's split (long-prompt mode): each chunk ends after the last sentence end (".") among the next
    75 tokens, else after the last phrase end (. , ; :), else after the last whole word, else at 75."""

    def split_point(rest: list[int]) -> int:
        if len(rest) <= CHUNK:
            return CHUNK
        text = [tokenizer.id_to_token[i] for i in rest[:CHUNK]]
        for ends in (lambda t: t in SENTENCE_ENDS, lambda t: t in PHRASE_ENDS, lambda t: t.endswith("</w>")):
            hits = [i for i, t in enumerate(text) if ends(t)]
            if hits:
                return hits[-1] + 1
        return CHUNK

    chunks, start = [], 0
    while True:
        end = start + split_point(ids[start:])
        chunks.append(_chunk(tokenizer, ids[start:end], weights[start:end], which[start:end]))
        start = end
        if start >= len(ids):
            return chunks


def _truncate(tokenizer: CLIPTokenizer, ids, weights, which) -> list[Chunk]:
    """One chunk of the first 75 tokens (BREAKs dropped), as diffusers and compel's default do."""
    kept = [t for t in zip(ids, weights, which) if t[0] != -1][:CHUNK]
    return [_chunk(tokenizer, *zip(*kept)) if kept else _chunk(tokenizer, [], [], [])]


# ---------------------------------------------------------------------------------------------------
# Encoding and weighting
# ---------------------------------------------------------------------------------------------------


@functools.partial(jax.jit, static_argnames=("graphdef", "clip_skip", "final_norm"))
def _encode_ids(graphdef, state, ids: Array, mask: Array | None, clip_skip: int, final_norm: bool) -> Array:
    """ids (K, 77) int32, mask None or (K, 77) of 0/1 → encodings (K, 77, D) in float32."""
    model = nnx.merge(graphdef, state)
    return model.encode(ids, mask, clip_skip=clip_skip, final_norm=final_norm).astype(jnp.float32)


@functools.partial(jax.jit, static_argnames=("graphdef",))
def _text_embeds(graphdef, state, ids: Array) -> Array:
    """ids (K, 77) → SDXL's pooled conditioning, bigG's projected end-of-text state (K, P), float32."""
    return nnx.merge(graphdef, state)(ids).text_embeds.astype(jnp.float32)


class _Encoder:
    """Runs one text encoder over chunks, each (ids, mask) pair once; c_∅'s chunk is the empty prompt's.
    ``clip_skip``, ``final_norm``: which hidden state is the context (:meth:`CLIPTextModel.encode`)."""

    def __init__(self, tokenizer: CLIPTokenizer, text_encoder: CLIPTextModel, clip_skip=0, final_norm=True):
        self.tokenizer, self.split = tokenizer, nnx.split(text_encoder)
        self.clip_skip, self.final_norm = clip_skip, final_norm
        self.dtype = jax.tree.leaves(self.split[1])[0].dtype

    def __call__(self, chunks: list[Chunk], masks: list[np.ndarray | None] | None = None) -> Array:
        """Chunks (and optional key masks) → their encodings side by side, (77·k, D)."""
        ids = jnp.asarray([c.ids for c in chunks], jnp.int32)
        if masks is not None:
            full = np.ones(CONTEXT_LENGTH, np.int32)
            masks = jnp.asarray([full if m is None else m for m in masks])
        z = _encode_ids(*self.split, ids, masks, self.clip_skip, self.final_norm)
        return z.reshape(-1, z.shape[-1])

    @functools.cached_property
    def empty(self) -> Array:
        """c_∅ of one chunk, (77, D): [bos, eos, pad…] (no weights)."""
        return self([_chunk(self.tokenizer, [], [], [])])


def _encoders(sd: Components) -> list[_Encoder]:
    """SD 1.x/2.x: CLIP's last layer, layer-normed. SDXL: ViT-L's and bigG's penultimate layers as they
    are, side by side on the feature axis (768 + 1280 = 2048), as diffusers' SDXL pipeline reads them."""
    if sd.text_encoder_2 is None:
        return [_Encoder(sd.tokenizer, sd.text_encoder)]
    pairs = ((sd.tokenizer, sd.text_encoder), (sd.tokenizer_2, sd.text_encoder_2))
    return [_Encoder(tokenizer, encoder, clip_skip=1, final_norm=False) for tokenizer, encoder in pairs]


def _a1111(encoder: _Encoder, chunks: list[Chunk], weighted: bool) -> Array:
    """The web UI's emphasis ("Original"): each chunk's z scaled token by token, then rescaled so its mean
    over all 77 × D numbers is what it was:   z' = z ⊙ w · mean(z) / mean(z ⊙ w)."""
    z = encoder(chunks).reshape(len(chunks), CONTEXT_LENGTH, -1)
    if not weighted:
        return z.reshape(-1, z.shape[-1])
    w = jnp.asarray([c.weights for c in chunks], jnp.float32)[..., None]
    zw = z * w
    zw = zw * (z.mean(axis=(1, 2), keepdims=True) / zw.mean(axis=(1, 2), keepdims=True))
    return zw.reshape(-1, z.shape[-1])


def _compel(encoder: _Encoder, chunks: list[Chunk], long: bool, counts: dict[int, int]) -> Array:
    """compel's weighting. Each token's encoding moves away from the empty prompt's by its weight,
    z_w = c_∅ + w (z − c_∅). A fragment of weight w < 1 is also made to fade: the prompt is encoded again
    with that fragment's tokens hidden from attention (its first to last position; in long mode the chunk
    markers at each chunk's first and last position stay visible), and the result is the normalised
    average of the versions, the full one with weight 1 and each hidden one with tan((1 − w)π/2), so
    w = ½ is halfway and w → 0 is the prompt without the fragment. ``counts``: each fragment's number of
    tokens; one that truncation cut is hidden up to the chunk's last position, as compel does."""
    ids = [i for c in chunks for i in c.ids]
    w = jnp.asarray([x for c in chunks for x in c.weights], jnp.float32)[:, None]
    which = np.array([f for c in chunks for f in c.fragment])
    empty = jnp.tile(encoder.empty, (len(chunks), 1))

    def weighted(masks=None) -> Array:
        return empty + (encoder(chunks, masks) - empty) * w

    versions, lerp = [weighted()], [1.0]
    fragment_weights = {f: x for c in chunks for f, x in zip(c.fragment, c.weights) if f >= 0}
    for f, weight in sorted(fragment_weights.items()):
        if weight >= 1:
            continue
        positions = np.flatnonzero(which == f)
        last = positions[-1] if len(positions) == counts[f] else CONTEXT_LENGTH - 1
        mask = np.ones(len(ids), np.int32)
        mask[positions[0] : last + 1] = 0
        if long:
            mask[0::CONTEXT_LENGTH] = mask[CONTEXT_LENGTH - 1 :: CONTEXT_LENGTH] = 1
        versions.append(weighted(list(mask.reshape(len(chunks), CONTEXT_LENGTH))))
        lerp.append(math.tan((1.0 - max(weight, 1e-5)) * math.pi / 2))
    lerp = jnp.asarray(lerp, jnp.float32) / sum(lerp)
    return jnp.einsum("v,vtd->td", lerp, jnp.stack(versions))


def _dropped(tokenizer: CLIPTokenizer, text: str, ids: list[int]) -> str | None:
    """The warning for a prompt that truncation cuts, naming what it drops (None if it fits)."""
    kept = [i for i in ids if i != -1]
    if len(kept) <= CHUNK:
        return None
    return (
        f"prompt {text[:40]!r}{'...' if len(text) > 40 else ''} is over CLIP's {CONTEXT_LENGTH} tokens: its last "
        f"{len(kept) - CHUNK} tokens were dropped ({tokenizer.decode(kept[CHUNK:])!r}); leave truncation off "
        "(truncate_prompts=False) to encode it whole, in 75-token chunks"
    )


def _encode_one(encoder: _Encoder, text: str, syntax: str, truncate: bool, messages: list[str]) -> Array:
    """One prompt in ``syntax`` → its context (77·k, D), float32."""
    tokenizer = encoder.tokenizer
    conjunction = prompt_syntax.parse(text, syntax)

    def fragments(fragments) -> Array:
        ids, weights, which = _tokens(tokenizer, fragments)
        if truncate and (message := _dropped(tokenizer, text, ids)):
            messages.append(message)
        if syntax != "compel":
            chunks = (_truncate if truncate else chunks_a1111)(tokenizer, ids, weights, which)
            return _a1111(encoder, chunks, weighted=syntax == "a1111")
        chunks = (_truncate if truncate else chunks_compel)(tokenizer, ids, weights, which)
        return _compel(encoder, chunks, not truncate, {f: which.count(f) for f in set(which)})

    parts = []
    for part, weight in zip(conjunction.parts, conjunction.weights):
        if isinstance(part, prompt_syntax.Blend):
            blended = padded(encoder.empty, [fragments(p) for p in part.prompts])
            w = jnp.asarray(part.weights, jnp.float32) / (sum(part.weights) if part.normalize else 1.0)
            c = jnp.einsum("p,ptd->td", w, blended)
        else:
            c = fragments(part)
        if weight != 1:  # an .and() part's weight: c_∅ + w (c − c_∅)
            empty = jnp.tile(encoder.empty, (c.shape[0] // CONTEXT_LENGTH, 1))
            c = empty + (c - empty) * weight
        parts.append(c)
    return jnp.concatenate(parts, axis=0)


def padded(empty: Array, contexts: list[Array]) -> Array:
    """Contexts of 77·kᵢ tokens → (B, 77·max k, D), each completed with ``empty``, the empty prompt's chunk."""
    k = max(c.shape[0] for c in contexts) // CONTEXT_LENGTH
    return jnp.stack([jnp.concatenate([c, *[empty] * (k - c.shape[0] // CONTEXT_LENGTH)], axis=0) for c in contexts])


def _pooled(encoder: _Encoder, text: str, syntax: str, truncate: bool) -> Array:
    """SDXL's text_embeds of one prompt, (P,): bigG's projected state at the end of the prompt's first chunk
    (its 75 tokens, weights not applied, as the web UI and diffusers); compel pools the raw text, cut to 75."""
    tokenizer = encoder.tokenizer
    if syntax == "compel":
        ids = tokenizer([text])
    else:
        fragments = prompt_syntax.parse(text, syntax).parts[0]
        ids = [(_truncate if truncate else chunks_a1111)(tokenizer, *_tokens(tokenizer, fragments))[0].ids]
    return _text_embeds(*encoder.split, jnp.asarray(ids, jnp.int32))[0]


class Encoded(NamedTuple):
    """Prompts encoded: ``context`` (B, 77·k, D) in the text encoders' dtype; ``pooled`` (B, P), SDXL's
    text_embeds, None for SD 1.x/2.x; ``messages``: a warning for each prompt truncation cut."""

    context: Array
    pooled: Array | None
    messages: list[str]


def encode(sd: Components, prompts: list[str], *, syntax: str = "none", truncate: bool = False) -> Encoded:
    """Prompts → :class:`Encoded`, with the text encoders of ``sd`` (one, or SDXL's two side by side).

    syntax: how the text is read (:mod:`sdjax.prompt_syntax`): "none" literally, "a1111" or "compel" weighting.
    truncate: keep each prompt's first 75 tokens (diffusers' behaviour, with a warning naming what is
      dropped) instead of encoding all of it in chunks. k is the largest number of chunks of any prompt;
      prompts of fewer are completed with the empty prompt's chunk (module notes above).
    """
    encoders, messages = _encoders(sd), []
    contexts = [
        jnp.concatenate(
            [_encode_one(e, text, syntax, truncate, [] if k else messages) for k, e in enumerate(encoders)], -1
        )
        for text in prompts
    ]
    context = padded(jnp.concatenate([e.empty for e in encoders], axis=-1), contexts).astype(encoders[0].dtype)
    if len(encoders) == 1:
        return Encoded(context, None, messages)
    pooled = jnp.stack([_pooled(encoders[1], text, syntax, truncate) for text in prompts])
    return Encoded(context, pooled.astype(encoders[1].dtype), messages)


def contexts(
    sd: Components,
    prompts: list[str],
    negatives: list[str] | None,
    copies: int,
    guided: bool,
    *,
    syntax: str = "none",
    truncate: bool = False,
) -> Encoded:
    """Each prompt's context (and pooled vector) repeated for its ``copies`` images: (N, T, D), or under
    guidance each image's pair (c_∅,n, c_n) side by side, (2N, T, D), with T = 77·k the same for all
    (:func:`encode`). ``negatives`` None: c_∅ and its pooled vector are zeros (SDXL's
    ``force_zeros_for_empty_prompt``)."""
    texts = prompts + (negatives if guided and negatives is not None else [])
    both = encode(sd, texts, syntax=syntax, truncate=truncate)

    def layout(x: Array | None) -> Array | None:
        if x is None:
            return None
        cond = jnp.repeat(x[: len(prompts)], copies, axis=0)
        if not guided:
            return cond
        uncond = jnp.zeros_like(cond) if negatives is None else jnp.repeat(x[len(prompts) :], copies, axis=0)
        return jnp.stack([uncond, cond], axis=1).reshape(-1, *cond.shape[1:])

    return Encoded(layout(both.context), layout(both.pooled), both.messages)
