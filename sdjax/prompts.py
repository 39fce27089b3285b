"""Prompts to the contexts the UNet attends to: step 1 of a Stable Diffusion run (:mod:`sdjax.pipeline`).

Each prompt becomes 77 CLIP token ids ([bos, tokens…, eos, pad…]; a longer prompt is cut, and
:func:`truncated` says what was lost), and the text encoder turns them into the context
c = CLIP(ids), the last layer's hidden states, (77, D). The negative prompt (default "") gives the
unconditional context c_∅ the same way. Under classifier-free guidance each image's pair
(c_∅,n, c_n) sits side by side, (2N, 77, D), the layout :func:`sdjax.chain.guided` evaluates.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from flax import nnx

from sdjax.models.clip import CLIPTextModel
from sdjax.tokenizer import CLIPTokenizer

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


def truncated(tokenizer: CLIPTokenizer, prompts: list[str]) -> list[str]:
    """One message for every prompt over CLIP's 77 tokens, naming the tokens that will be dropped."""
    messages = []
    for text in prompts:
        dropped = tokenizer.num_truncated(text)
        if dropped:
            lost = tokenizer.decode(tokenizer.encode(text)[-dropped:])
            messages.append(
                f"prompt {text[:40]!r}{'...' if len(text) > 40 else ''} is over CLIP's {tokenizer.model_max_length} "
                f"tokens: its last {dropped} tokens were dropped ({lost!r})"
            )
    return messages


@functools.partial(jax.jit, static_argnames=("graphdef",))
def _encode_ids(graphdef, state, ids: Array) -> Array:
    """ids (B, 77) int32 → context (B, 77, D) in the text encoder's dtype."""
    return nnx.merge(graphdef, state)(ids).last_hidden_state


def encode(tokenizer: CLIPTokenizer, text_encoder: CLIPTextModel, prompts: list[str]) -> Array:
    """Prompts → contexts (B, 77, D), textual-inversion tokens with several vectors spelled out first."""
    prompts = tokenizer.expand(prompts)
    return _encode_ids(*nnx.split(text_encoder), jnp.asarray(tokenizer(prompts)))


def contexts(
    tokenizer: CLIPTokenizer,
    text_encoder: CLIPTextModel,
    prompts: list[str],
    negatives: list[str],
    copies: int,
    guided: bool,
) -> Array:
    """Each prompt's context repeated for its ``copies`` images: (N, 77, D), or under guidance each
    image's pair (c_∅,n, c_n) side by side, (2N, 77, D)."""
    context = jnp.repeat(encode(tokenizer, text_encoder, prompts), copies, axis=0)
    if guided:
        uncond = jnp.repeat(encode(tokenizer, text_encoder, negatives), copies, axis=0)
        context = jnp.stack([uncond, context], axis=1).reshape(-1, *context.shape[1:])
    return context
