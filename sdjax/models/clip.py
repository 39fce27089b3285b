"""CLIP's text encoder: the transformer that turns a prompt into Stable Diffusion's conditioning.

Stable Diffusion never reads text. A tokenizer turns the prompt into 77 integer ids (``<|startoftext|>``,
the prompt's BPE tokens, ``<|endoftext|>``, then padding), and this network maps them to 77 vectors,
one per position: a (77, 768) *context* for SD1 (OpenAI's CLIP ViT-L/14 text tower), (77, 1024) for SD2
(OpenCLIP ViT-H/14). Every cross-attention layer of the UNet then lets image positions query those
77 vectors, which is how "a red cube" ends up steering the pixels. The text encoder is frozen: SD
was trained on top of a CLIP already trained contrastively on image–caption pairs (Radford et al.
2021, arXiv:2103.00020), so its token vectors already carry visual meaning.

The architecture is a GPT-2-style pre-LayerNorm transformer (Vaswani et al. 2017; Radford et al. 2019):

    ids (B, T) ─ token_embedding + position_embedding ─ h⁰ (B, T, D)
                ─ L × [ h ← h + Attn(LN₁(h)),  h ← h + MLP(LN₂(h)) ] ─ hᴸ
                ─ final_layer_norm ─ last_hidden_state (B, T, D)   ← SD's context (clip_skip = 0)
                                     └─ state at the <|endoftext|> position ─ pooled (B, D)

Attention is *causal*: position i sees only positions j ≤ i, a leftover of CLIP's text tower being
built like a language model. One consequence: the padding after a prompt can never change the
vectors of the prompt's own tokens; it only shapes the padding positions' vectors (which SD's UNet
does attend to). The <|endoftext|> position is the first that has seen the whole prompt, so CLIP
summarises the text there: that is ``pooled``, the input of CLIP's text projection (SD1/SD2 do not
use it; SDXL conditions on its projection).

SDXL has two text encoders: SD1's (OpenAI ViT-L/14, :meth:`CLIPTextConfig.sd1`) and OpenCLIP ViT-bigG/14
with its projection (:class:`CLIPTextModelWithProjection`, :meth:`CLIPTextConfig.sdxl_bigg`). It conditions
its UNet on both encoders' *penultimate* hidden states, not layer-normed, concatenated on the feature axis
(768 + 1280 = 2048 per token), and on bigG's projected pooled vector, ``text_embeds`` (B, 1280):

    context     = [ h¹¹(ViT-L),  h³¹(bigG) ]        each encoder's encode(ids, clip_skip=1, final_norm=False)
    text_embeds = final_layer_norm(h³²(bigG))[eos] W_proj           bigG(ids).text_embeds

Modules and attribute names are transformers' (``embeddings.token_embedding``,
``encoder.layers[i].self_attn.q_proj``, ``encoder.layers[i].mlp.fc1``, ``final_layer_norm`` ...), so
the ``text_model.*`` tensors of an SD ``text_encoder`` checkpoint map onto them name for name.

Shapes use B = batch, T = tokens (≤ max_position_embeddings = 77), D = hidden_size,
H = num_attention_heads, d = D / H.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
from flax import nnx

from sdjax.attention import attention

Array = jax.Array


def quick_gelu(x: Array) -> Array:
    """x · σ(1.702 x): OpenAI CLIP's sigmoid approximation of GELU (SD1's text encoder was trained with it)."""
    return x * jax.nn.sigmoid(1.702 * x)


# hidden_act → function. transformers' "gelu" is the exact GELU, x · Φ(x) with the Gaussian CDF Φ
# computed through erf (torch.nn.functional.gelu's default), not the tanh approximation.
ACTIVATIONS = {
    "quick_gelu": quick_gelu,
    "gelu": functools.partial(jax.nn.gelu, approximate=False),
}

# transformers' pooling rule for configs whose eos_token_id is this placeholder: see ``eos_positions``
LEGACY_EOS_TOKEN_ID = 2


@dataclasses.dataclass(frozen=True)
class CLIPTextConfig:
    """Shape of a :class:`CLIPTextModel`; field names are transformers' ``CLIPTextConfig``, the defaults
    the values in SD1.x's ``text_encoder/config.json``, OpenAI CLIP ViT-L/14's text tower (transformers'
    own defaults describe the smaller ViT-B/32).

    vocab_size: number of token ids: 49408 = 512 byte symbols (with and without end-of-word mark)
        + 48,894 BPE merges + <|startoftext|> and <|endoftext|>.
    hidden_size: D, the width of every token vector (the context width SD's UNet cross-attends to).
    intermediate_size: width of the MLP's hidden layer (4·D).
    num_hidden_layers, num_attention_heads: L transformer layers with H heads each; H must divide D.
    max_position_embeddings: rows of the learned position table, so the longest input (77).
    hidden_act: the MLP nonlinearity, "quick_gelu" (OpenAI CLIP, SD1) or "gelu" (OpenCLIP, SD2).
    layer_norm_eps: ε of every LayerNorm.
    eos_token_id: decides where ``pooled`` is read (see :func:`eos_positions`). SD1/SD2/SDXL configs
        store 2, which selects transformers' legacy rule (pool at the highest id); any other value
        pools at the first occurrence of that id.
    projection_dim: output width of ``text_projection``, which only :class:`CLIPTextModelWithProjection`
        has (SDXL's bigG: 1280); SD1/SD2 configs record one their CLIPTextModel does not use.
    bos_token_id, pad_token_id: the tokenizer's; recorded so a config round-trips, unused by the model.
    """

    vocab_size: int = 49408
    hidden_size: int = 768
    intermediate_size: int = 3072
    num_hidden_layers: int = 12
    num_attention_heads: int = 12
    max_position_embeddings: int = 77
    hidden_act: str = "quick_gelu"
    layer_norm_eps: float = 1e-5
    bos_token_id: int = 0
    eos_token_id: int = LEGACY_EOS_TOKEN_ID
    pad_token_id: int = 1
    projection_dim: int = 768

    def __post_init__(self):
        if self.hidden_size % self.num_attention_heads:
            raise ValueError(
                f"num_attention_heads={self.num_attention_heads} must divide hidden_size={self.hidden_size}"
            )
        if self.hidden_act not in ACTIVATIONS:
            raise ValueError(f"hidden_act={self.hidden_act!r} is not supported; use one of {tuple(ACTIVATIONS)}")
        if not isinstance(self.eos_token_id, int):
            raise ValueError(f"eos_token_id must be a single int, got {self.eos_token_id!r}")

    @classmethod
    def sd1(cls) -> CLIPTextConfig:
        """SD1.x's text encoder: OpenAI CLIP ViT-L/14's text tower, D = 768, 12 layers (123,060,480 parameters)."""
        return cls()

    @classmethod
    def sd2(cls) -> CLIPTextConfig:
        """SD2.x's text encoder: OpenCLIP ViT-H/14's text tower, D = 1024, exact GELU (340,387,840 parameters).

        The OpenCLIP tower has 24 layers; SD2 conditions on the penultimate one, so diffusers'
        conversion keeps only 23 and the final LayerNorm (its ``last_hidden_state`` is then SD2's context).
        """
        return cls(
            hidden_size=1024,
            intermediate_size=4096,
            num_hidden_layers=23,
            num_attention_heads=16,
            hidden_act="gelu",
            projection_dim=512,
        )

    @classmethod
    def sdxl_bigg(cls) -> CLIPTextConfig:
        """SDXL's second text encoder, ``text_encoder_2``: OpenCLIP ViT-bigG/14's text tower, D = 1280, all 32
        layers, exact GELU, a 1280 → 1280 projection (a :class:`CLIPTextModelWithProjection`, 694,659,840
        parameters). SDXL's first encoder is SD1's, :meth:`sd1`."""
        return cls(
            hidden_size=1280,
            intermediate_size=5120,
            num_hidden_layers=32,
            num_attention_heads=20,
            hidden_act="gelu",
            projection_dim=1280,
        )

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> CLIPTextConfig:
        """Build from a transformers ``config.json`` dict (an SD checkpoint's ``text_encoder/config.json``).

        Keys that do not change the forward pass (architectures, torch_dtype, initializer_*, dropout
        rates ...) are ignored; a missing key takes the SD1 default above, not
        transformers' default (a saved config.json lists every field, so this only matters for
        hand-written dicts). A full ``CLIPConfig`` dict (model_type "clip") is refused: pass its
        ``text_config``.
        """
        model_type = d.get("model_type", "clip_text_model")
        if model_type != "clip_text_model":
            raise ValueError(
                f"expected a CLIP text config (model_type 'clip_text_model'), got {model_type!r}; "
                "for a full CLIPConfig pass its 'text_config'"
            )
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in names})


class CLIPTextOutput(NamedTuple):
    """What :class:`CLIPTextModel` returns.

    last_hidden_state: (B, T, D), the last layer's output after ``final_layer_norm``; SD's context.
    pooled: (B, D), ``last_hidden_state`` at each sequence's end-of-text token (transformers: ``pooler_output``).
    hidden_states: with ``output_hidden_states=True``, L + 1 arrays of (B, T, D): the embedding output,
        then every layer's output, none of them through ``final_layer_norm``; otherwise None.
    text_embeds: (B, projection_dim), ``text_projection(pooled)``, from a :class:`CLIPTextModelWithProjection`
        (transformers' ``text_embeds``; SDXL's pooled conditioning); None from a :class:`CLIPTextModel`.
    """

    last_hidden_state: Array
    pooled: Array
    hidden_states: tuple[Array, ...] | None
    text_embeds: Array | None = None


def layer_norm(dim: int, eps: float, rngs: nnx.Rngs) -> nnx.LayerNorm:
    """LayerNorm over the last axis, with PyTorch's variance E[(x − μ)²] (see :func:`sdjax.nn.group_norm`)."""
    return nnx.LayerNorm(dim, epsilon=eps, use_fast_variance=False, rngs=rngs)


def eos_positions(input_ids: Array, eos_token_id: int) -> Array:
    """Index of each sequence's end-of-text token, where ``pooled`` is read: (B, T) ints → (B,).

    Two rules, exactly as transformers picks them:

    * eos_token_id == 2 (the legacy rule, every SD1/SD2 config): early transformers CLIP configs
      stored the placeholder 2 instead of CLIP's real <|endoftext|> id 49407. Rather than break
      them, transformers kept OpenAI's original trick: <|endoftext|> is the *largest* id of CLIP's
      vocabulary, so argmax over the ids finds it (its first occurrence when SD1's tokenizer pads
      with it too). It silently fails if tokens with larger ids were added to the vocabulary.
    * any other eos_token_id: the first position holding that id. If a sequence has none, argmax of
      an all-False row is 0 and the first token is pooled, as transformers does.
    """
    if eos_token_id == LEGACY_EOS_TOKEN_ID:
        return jnp.argmax(input_ids, axis=-1)
    return jnp.argmax(input_ids == eos_token_id, axis=-1)


class CLIPTextEmbeddings(nnx.Module):
    """Token vector plus learned absolute-position vector:   h⁰_t = E_tok[id_t] + E_pos[t].

    Shapes: input_ids (B, T) ints, T ≤ max_position_embeddings → (B, T, D).
    """

    def __init__(self, cfg: CLIPTextConfig, *, rngs: nnx.Rngs):
        self.token_embedding = nnx.Embed(cfg.vocab_size, cfg.hidden_size, rngs=rngs)
        self.position_embedding = nnx.Embed(cfg.max_position_embeddings, cfg.hidden_size, rngs=rngs)

    def __call__(self, input_ids: Array) -> Array:
        t, limit = input_ids.shape[-1], self.position_embedding.num_embeddings
        if t > limit:
            raise ValueError(f"input has T={t} tokens but CLIP's text encoder has positions for at most {limit}")
        # Rows are read from the tables directly, so h⁰ has the tables' dtype: the whole network then
        # runs in the dtype its weights are cast to (nnx.Embed's __call__ would stay in the dtype it
        # was built with).
        tokens = jnp.take(self.token_embedding.embedding[...], input_ids, axis=0)
        return tokens + self.position_embedding.embedding[:t]


class CLIPAttention(nnx.Module):
    """Causal multi-head self-attention (transformers' ``CLIPAttention`` used with a causal mask).

        Q, K, V = x W_q + b_q, x W_k + b_k, x W_v + b_v            split into H heads of width d
        head_h = softmax(Q_h K_hᵀ / √d + M) V_h,   M_ij = 0 if j ≤ i (and key j is not padding), −∞ otherwise
        y = concat_h(head_h) W_o + b_o

    Shapes: x (B, T, D), mask None or boolean (B, 1, 1, T) with False at padding keys → (B, T, D).
    """

    def __init__(self, cfg: CLIPTextConfig, *, rngs: nnx.Rngs):
        self.heads = cfg.num_attention_heads
        d = cfg.hidden_size
        self.q_proj = nnx.Linear(d, d, rngs=rngs)
        self.k_proj = nnx.Linear(d, d, rngs=rngs)
        self.v_proj = nnx.Linear(d, d, rngs=rngs)
        self.out_proj = nnx.Linear(d, d, rngs=rngs)

    def __call__(self, x: Array, mask: Array | None = None) -> Array:
        b, t, d = x.shape
        split = lambda y: y.reshape(b, t, self.heads, d // self.heads)  # noqa: E731
        out = attention(split(self.q_proj(x)), split(self.k_proj(x)), split(self.v_proj(x)), mask=mask, is_causal=True)
        return self.out_proj(out.reshape(b, t, d))


class CLIPMLP(nnx.Module):
    """Position-wise feed-forward network:   y = W₂ · act(W₁ x + b₁) + b₂.   (B, T, D) → (B, T, D)."""

    def __init__(self, cfg: CLIPTextConfig, *, rngs: nnx.Rngs):
        self.act = ACTIVATIONS[cfg.hidden_act]
        self.fc1 = nnx.Linear(cfg.hidden_size, cfg.intermediate_size, rngs=rngs)
        self.fc2 = nnx.Linear(cfg.intermediate_size, cfg.hidden_size, rngs=rngs)

    def __call__(self, x: Array) -> Array:
        return self.fc2(self.act(self.fc1(x)))


class CLIPEncoderLayer(nnx.Module):
    """One pre-LayerNorm transformer layer: each sublayer reads a normalised copy, writes a residual.

        h ← h + Attn(LN₁(h))
        h ← h + MLP(LN₂(h))

    Normalising *before* each sublayer (not after, as the 2017 transformer did) leaves the residual
    stream h an untouched sum of updates, which keeps deep stacks trainable without learning-rate
    warm-up tricks (Xiong et al. 2020, arXiv:2002.04745).

    Shapes: h (B, T, D), mask as in :class:`CLIPAttention` → (B, T, D).
    """

    def __init__(self, cfg: CLIPTextConfig, *, rngs: nnx.Rngs):
        self.layer_norm1 = layer_norm(cfg.hidden_size, cfg.layer_norm_eps, rngs)
        self.self_attn = CLIPAttention(cfg, rngs=rngs)
        self.layer_norm2 = layer_norm(cfg.hidden_size, cfg.layer_norm_eps, rngs)
        self.mlp = CLIPMLP(cfg, rngs=rngs)

    def __call__(self, h: Array, mask: Array | None = None) -> Array:
        h = h + self.self_attn(self.layer_norm1(h), mask)
        return h + self.mlp(self.layer_norm2(h))


class CLIPEncoder(nnx.Module):
    """The stack of L :class:`CLIPEncoderLayer`.

    Returns every hidden state, [h⁰, h¹, ..., hⁿ] for the first n = ``num_layers`` layers (all L by
    default): clip skip reads one of the earlier ones, so running the last layers would be wasted.

    Shapes: h⁰ (B, T, D) → n + 1 arrays of (B, T, D).
    """

    def __init__(self, cfg: CLIPTextConfig, *, rngs: nnx.Rngs):
        self.layers = nnx.List([CLIPEncoderLayer(cfg, rngs=rngs) for _ in range(cfg.num_hidden_layers)])

    def __call__(self, h: Array, mask: Array | None = None, *, num_layers: int | None = None) -> list[Array]:
        states = [h]
        for layer in list(self.layers)[:num_layers]:
            states.append(layer(states[-1], mask))
        return states


class CLIPTextModel(nnx.Module):
    """CLIP's text transformer, transformers' ``CLIPTextModel`` (see the module docstring).

    ``model(input_ids, attention_mask)`` gives a :class:`CLIPTextOutput`; ``model.encode(input_ids,
    clip_skip=k)`` gives the context a Stable Diffusion pipeline conditions on.

    attention_mask: optional (B, T) of 1 (token) / 0 (padding). Padding keys are hidden on top of the
    causal mask. SD1/SD2 pipelines pass none (their configs do not ask for it), so to reproduce
    their contexts leave it out. A row that starts with padding would leave its first queries with
    no visible key at all; transformers' attention backends disagree on what that gives, so pad on
    the right, as CLIP's tokenizer does.
    """

    def __init__(self, cfg: CLIPTextConfig, *, rngs: nnx.Rngs):
        self.config = cfg
        self.embeddings = CLIPTextEmbeddings(cfg, rngs=rngs)
        self.encoder = CLIPEncoder(cfg, rngs=rngs)
        self.final_layer_norm = layer_norm(cfg.hidden_size, cfg.layer_norm_eps, rngs)

    def _hidden_states(self, input_ids: Array, attention_mask: Array | None, num_layers: int) -> list[Array]:
        h = self.embeddings(input_ids)
        # (B, T) → (B, 1, 1, T): the same key mask for every head and every query
        mask = None if attention_mask is None else attention_mask.astype(bool)[:, None, None, :]
        return self.encoder(h, mask, num_layers=num_layers)

    def __call__(
        self, input_ids: Array, attention_mask: Array | None = None, *, output_hidden_states: bool = False
    ) -> CLIPTextOutput:
        """input_ids (B, T) ints, attention_mask (B, T) or None → :class:`CLIPTextOutput`."""
        states = self._hidden_states(input_ids, attention_mask, self.config.num_hidden_layers)
        last = self.final_layer_norm(states[-1])
        pooled = last[jnp.arange(last.shape[0]), eos_positions(input_ids, self.config.eos_token_id)]
        return CLIPTextOutput(last, pooled, tuple(states) if output_hidden_states else None)

    def encode(
        self, input_ids: Array, attention_mask: Array | None = None, *, clip_skip: int = 0, final_norm: bool = True
    ) -> Array:
        """The prompt encoding an SD pipeline conditions its UNet on: (B, T) ids → (B, T, D).

            context = final_layer_norm(hidden_states[−(clip_skip + 1)])      (final_norm=True, SD1/SD2)
            context = hidden_states[−(clip_skip + 1)]                        (final_norm=False, SDXL)

        clip_skip = 0 is ``last_hidden_state``; clip_skip = 1 skips the last layer and normalises
        the penultimate one's output, and so on up to L (the embeddings alone). This is diffusers'
        ``encode_prompt(clip_skip=...)`` (its None is 0 here); other UIs count from 1 ("clip skip 2"
        there is clip_skip = 1 here). Only the layers needed are run.

        SDXL reads the penultimate layer's output as it is, with no final LayerNorm: its context is
        clip_skip=1, final_norm=False, and diffusers' SDXL ``clip_skip=k`` is clip_skip = k + 1 here.
        """
        n_layers = self.config.num_hidden_layers
        if not 0 <= clip_skip <= n_layers:
            raise ValueError(f"clip_skip={clip_skip} must be in [0, {n_layers}] (the model has {n_layers} layers)")
        states = self._hidden_states(input_ids, attention_mask, n_layers - clip_skip)
        return self.final_layer_norm(states[-1]) if final_norm else states[-1]


class CLIPTextModelWithProjection(CLIPTextModel):
    """CLIP's text transformer with its projection into the joint text–image space, transformers'
    ``CLIPTextModelWithProjection`` (SDXL's ``text_encoder_2``):

        text_embeds = pooled W_proj        W_proj (D, projection_dim), no bias

    Its output's ``text_embeds`` is that (B, projection_dim) vector; the rest is :class:`CLIPTextModel`'s. The
    weights are transformers' ``text_model.*`` as in CLIPTextModel, plus ``text_projection.weight``.
    """

    def __init__(self, cfg: CLIPTextConfig, *, rngs: nnx.Rngs):
        super().__init__(cfg, rngs=rngs)
        self.text_projection = nnx.Linear(cfg.hidden_size, cfg.projection_dim, use_bias=False, rngs=rngs)

    def __call__(
        self, input_ids: Array, attention_mask: Array | None = None, *, output_hidden_states: bool = False
    ) -> CLIPTextOutput:
        """input_ids (B, T) ints, attention_mask (B, T) or None → :class:`CLIPTextOutput` with ``text_embeds``."""
        out = super().__call__(input_ids, attention_mask, output_hidden_states=output_hidden_states)
        return out._replace(text_embeds=self.text_projection(out.pooled))
