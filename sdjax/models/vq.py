"""A vector-quantised autoencoder (VQ-VAE, van den Oord et al. 2017, arXiv:1711.00937; the VQGAN of Esser et al.
2021 is the same model trained with a perceptual and an adversarial loss) — diffusers' ``VQModel``, Würstchen's
stage A.

The KL autoencoder (``vae.py``) keeps a continuous latent and pulls it towards N(0, I). A VQ autoencoder keeps a
*discrete* one: every latent vector z_e(x) at each position is replaced by its nearest entry of a learned codebook
{e_1, …, e_K} ⊂ ℝ^D,

    k* = argmin_k ‖z_e − e_k‖²,     z_q = e_{k*},

so an image becomes a grid of code indices (log₂ K bits each) that the decoder turns back into pixels. The argmin
has no gradient, so the decoder's gradient is copied straight through to the encoder (Bengio et al. 2013):

    z_st = z_e + sg(z_q − z_e)        (forward: z_q; backward: ∂z_st/∂z_e = I)

and two terms train the codebook and keep the encoder near it (sg = stop-gradient, β ≈ 0.25):

    L = ‖x − D(z_st)‖² + ‖sg(z_e) − z_q‖² (codebook) + β ‖z_e − sg(z_q)‖² (commitment).

The encoder and decoder are the KL autoencoder's own (``autoencoder.py``; only the latent differs), and the names
follow diffusers' ``VQModel`` (``quantize.embedding.weight``), so its checkpoints map name for name
(tests/test_vq.py). Codes that no latent picks stop training ("dead codes"); :func:`restart_dead_codes` moves
them onto encoder outputs, the usual fix.
"""

from __future__ import annotations

import dataclasses
from typing import NamedTuple

import jax
import jax.numpy as jnp
from flax import nnx

from sdjax.models.autoencoder import AutoencoderConfig, Decoder, Encoder
from sdjax.nn import conv

Array = jax.Array


@dataclasses.dataclass(frozen=True)
class VQConfig(AutoencoderConfig):
    """An :class:`AutoencoderConfig` plus the codebook: ``num_vq_embeddings`` codes K of width ``vq_embed_dim``
    (default latent_channels), commitment weight ``beta``. ``legacy``: diffusers' default loss, which (for
    compatibility with the original taming-transformers code) puts β on the codebook term and 1 on the
    commitment term — the reverse of the paper; False gives the paper's."""

    num_vq_embeddings: int = 256
    vq_embed_dim: int | None = None
    beta: float = 0.25
    legacy: bool = True
    scaling_factor: float = 1.0

    @property
    def embed_dim(self) -> int:
        return self.vq_embed_dim or self.latent_channels

    @classmethod
    def from_diffusers(cls, config: dict) -> VQConfig:
        """The config of a diffusers ``VQModel`` (its ``config.json``); options sdjax does not implement
        (spatial norm, codebook lookup on decode) must have their defaults."""
        for key, default in (("norm_type", "group"), ("act_fn", "silu"), ("lookup_from_codebook", False)):
            if config.get(key, default) != default:
                raise ValueError(f"VQModel config {key}={config[key]!r}: sdjax implements {key}={default!r} only")
        return cls(
            in_channels=config.get("in_channels", 3),
            out_channels=config.get("out_channels", 3),
            block_out_channels=tuple(config.get("block_out_channels", (64,))),
            layers_per_block=config.get("layers_per_block", 1),
            latent_channels=config.get("latent_channels", 3),
            norm_num_groups=config.get("norm_num_groups", 32),
            mid_block_attention=config.get("mid_block_add_attention", True),
            num_vq_embeddings=config.get("num_vq_embeddings", 256),
            vq_embed_dim=config.get("vq_embed_dim"),
            scaling_factor=config.get("scaling_factor", 0.18215),
        )

    def to_diffusers(self) -> dict:
        """The diffusers ``VQModel`` config.json of this architecture."""
        return {
            "_class_name": "VQModel",
            **self.diffusers_fields(),
            "act_fn": "silu",
            "num_vq_embeddings": self.num_vq_embeddings,
            "vq_embed_dim": self.vq_embed_dim,
            "scaling_factor": self.scaling_factor,
            "norm_type": "group",
        }


class Quantized(NamedTuple):
    """What the quantiser returns. z: the straight-through latent z_e + sg(z_q − z_e) (equal to z_q);
    indices: (B, h, w) int32 codes; codebook_loss ‖sg(z_e) − z_q‖², commitment_loss ‖z_e − sg(z_q)‖² (means
    over every element); loss: the two weighted as the config says."""

    z: Array
    indices: Array
    codebook_loss: Array
    commitment_loss: Array
    loss: Array


def nearest_codes(z: Array, codebook: Array) -> Array:
    """argmin_k ‖z − e_k‖² for every vector of z (…, D) against codebook (K, D) → (…) int32.

    ‖z − e‖² = ‖z‖² − 2 z·e + ‖e‖²: one matrix product instead of a (…, K, D) difference tensor; ‖z‖² is the
    same for every k and is left out of the argmin."""
    scores = jnp.sum(codebook**2, axis=-1) - 2.0 * jnp.einsum("...d,kd->...k", z, codebook)
    return jnp.argmin(scores, axis=-1).astype(jnp.int32)


class VectorQuantizer(nnx.Module):
    """The codebook and the nearest-code lookup with the straight-through estimator (module docstring).
    Shapes: z_e (B, h, w, D) → :class:`Quantized`."""

    def __init__(self, num_codes: int, dim: int, *, beta: float = 0.25, legacy: bool = True, rngs: nnx.Rngs):
        # diffusers' init: uniform(−1/K, 1/K)
        init = nnx.initializers.uniform(scale=2.0 / num_codes)
        self.embedding = nnx.Embed(num_codes, dim, embedding_init=lambda k, s, d: init(k, s, d) - 1.0 / num_codes,
                                   rngs=rngs)  # fmt: skip
        self.beta, self.legacy = beta, legacy

    def __call__(self, z_e: Array) -> Quantized:
        codebook = self.embedding.embedding[...]
        indices = nearest_codes(z_e, codebook)
        z_q = codebook[indices]
        codebook_loss = jnp.mean((jax.lax.stop_gradient(z_e) - z_q) ** 2)
        commitment_loss = jnp.mean((z_e - jax.lax.stop_gradient(z_q)) ** 2)
        if self.legacy:
            loss = commitment_loss + self.beta * codebook_loss
        else:
            loss = codebook_loss + self.beta * commitment_loss
        z_st = z_e + jax.lax.stop_gradient(z_q - z_e)
        return Quantized(z_st, indices, codebook_loss, commitment_loss, loss)

    def lookup(self, indices: Array) -> Array:
        """Codes (B, h, w) → their vectors (B, h, w, D)."""
        return self.embedding.embedding[...][indices]


class VQModel(nnx.Module):
    """Encoder → quant_conv → quantize → post_quant_conv → decoder (diffusers' ``VQModel``).

    ``encode``: x (B, H, W, in) → z_e (B, H/f, W/f, D), before quantisation (as diffusers' ``encode``);
    ``decode``: z_e → quantised and decoded (B, H, W, out); ``__call__``: x → (x̂, :class:`Quantized`).
    """

    def __init__(self, cfg: VQConfig, *, rngs: nnx.Rngs):
        self.config = cfg
        d = cfg.embed_dim
        self.encoder = Encoder(cfg, cfg.latent_channels, rngs=rngs)
        self.quant_conv = conv(cfg.latent_channels, d, 1, rngs)
        self.quantize = VectorQuantizer(cfg.num_vq_embeddings, d, beta=cfg.beta, legacy=cfg.legacy, rngs=rngs)
        self.post_quant_conv = conv(d, cfg.latent_channels, 1, rngs)
        self.decoder = Decoder(cfg, rngs=rngs)

    def encode(self, x: Array) -> Array:
        return self.quant_conv(self.encoder(x))

    def decode_quantized(self, z_q: Array) -> Array:
        return self.decoder(self.post_quant_conv(z_q))

    def decode(self, z_e: Array) -> Array:
        return self.decode_quantized(self.quantize(z_e).z)

    def __call__(self, x: Array) -> tuple[Array, Quantized]:
        q = self.quantize(self.encode(x))
        return self.decode_quantized(q.z), q


def vq_loss(model: VQModel, batch: dict, key: Array) -> tuple[Array, dict]:
    """``fit``'s loss for stage A: ‖x − x̂‖² (mean over pixels) + the quantiser's loss; the codes used go into
    the metrics (how many distinct codes the batch picked: a falling count means dead codes)."""
    x = batch["image"]
    x_hat, q = model(x)
    reconstruction = jnp.mean((x_hat - x) ** 2)
    used = jnp.sum(jnp.bincount(q.indices.reshape(-1), length=model.config.num_vq_embeddings) > 0)
    return reconstruction + q.loss, {"reconstruction": reconstruction, "codes_used": used}


def restart_dead_codes(codebook: Array, counts: Array, z_e: Array, key: Array) -> Array:
    """Codes that no latent picked (``counts`` (K,) == 0) are moved onto randomly chosen encoder outputs
    (z_e (…, D)), so that they take part again; the others stay. → the new codebook (K, D)."""
    flat = z_e.reshape(-1, z_e.shape[-1])
    picks = flat[jax.random.randint(key, (codebook.shape[0],), 0, flat.shape[0])]
    return jnp.where((counts == 0)[:, None], picks, codebook)
