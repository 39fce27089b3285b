"""A convolutional autoencoder: the encoder and decoder that Stable Diffusion's VAE is made of.

An autoencoder learns two maps, E: image → latent and D: latent → image, trained so that
D(E(x)) ≈ x. The latent z = E(x) is a small grid of feature vectors: with L resolution levels the
encoder halves H and W (L − 1) times, so the *downsampling factor* is f = 2^(L−1) and

    x: (B, H, W, 3)  →  z: (B, H/f, W/f, c)        compression = (H · W · 3) / (H/f · W/f · c) = 3f²/c

Stable Diffusion uses f = 8, c = 4 (a 512² image becomes a 64×64×4 latent: 48× fewer numbers), which
keeps the diffusion model's work small while the decoder restores the fine detail.

The Encoder/Decoder here are exactly the ones of SD's ``AutoencoderKL`` (see ``vae.py``): the toy
autoencoder of notebook 01 and SD's VAE differ only in their config. Attribute names follow diffusers'
``Encoder``/``Decoder`` (``down_blocks[i].resnets[j]``, ``mid_block.attentions[0]`` ...).
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
from flax import nnx

from sdjax.nn import Downsample, MidBlock, ResnetBlock, Upsample, conv, group_norm

Array = jax.Array


@dataclasses.dataclass(frozen=True)
class AutoencoderConfig:
    """Shape of an encoder/decoder pair.

    block_out_channels: channels at each resolution level, highest resolution first; its length L
        sets the downsampling factor f = 2^(L−1).
    layers_per_block: ResnetBlocks per level in the encoder (the decoder uses one more, as SD does).
    latent_channels: c, the channels of the latent grid.
    norm_num_groups: GroupNorm groups; must divide every entry of block_out_channels.
    mid_block_attention: a SelfAttention between the two mid-block ResnetBlocks (SD has one).
    """

    in_channels: int = 3
    out_channels: int = 3
    block_out_channels: tuple[int, ...] = (32, 64, 64)
    layers_per_block: int = 1
    latent_channels: int = 4
    norm_num_groups: int = 16
    mid_block_attention: bool = True

    def __post_init__(self):
        bad = [c for c in self.block_out_channels if c % self.norm_num_groups]
        if bad:
            raise ValueError(
                f"norm_num_groups={self.norm_num_groups} must divide every block_out_channels entry; "
                f"{bad} are not multiples of it. Pick a common divisor such as 8."
            )

    @property
    def downsample_factor(self) -> int:
        """f: how many pixels along each side one latent cell stands for."""
        return 2 ** (len(self.block_out_channels) - 1)

    def diffusers_fields(self) -> dict:
        """The encoder/decoder part of a diffusers autoencoder config.json (``AutoencoderKL``, ``VQModel``)."""
        levels = len(self.block_out_channels)
        return {
            "in_channels": self.in_channels,
            "out_channels": self.out_channels,
            "down_block_types": ["DownEncoderBlock2D"] * levels,
            "up_block_types": ["UpDecoderBlock2D"] * levels,
            "block_out_channels": list(self.block_out_channels),
            "layers_per_block": self.layers_per_block,
            "latent_channels": self.latent_channels,
            "norm_num_groups": self.norm_num_groups,
            "mid_block_add_attention": self.mid_block_attention,
        }

    def latent_shape(self, height: int, width: int) -> tuple[int, int, int]:
        """(H/f, W/f, c) for an image of the given size; errors if f does not divide it."""
        f = self.downsample_factor
        if height % f or width % f:
            raise ValueError(
                f"image size {height}×{width} is not divisible by the downsampling factor f={f}; "
                f"use a size that is a multiple of {f}"
            )
        return height // f, width // f, self.latent_channels


class EncoderBlock(nnx.Module):
    """``layers`` ResnetBlocks, then (except at the last level) a ×½ Downsample."""

    def __init__(self, c_in: int, c_out: int, *, layers: int, downsample: bool, groups: int, rngs: nnx.Rngs):
        self.resnets = nnx.List(
            [ResnetBlock(c_in if j == 0 else c_out, c_out, groups=groups, rngs=rngs) for j in range(layers)]
        )
        self.downsamplers = nnx.List([Downsample(c_out, asymmetric_pad=True, rngs=rngs)] if downsample else [])

    def __call__(self, x: Array) -> Array:
        for block in (*self.resnets, *self.downsamplers):
            x = block(x)
        return x


class DecoderBlock(nnx.Module):
    """``layers`` ResnetBlocks, then (except at the last level) a ×2 Upsample."""

    def __init__(self, c_in: int, c_out: int, *, layers: int, upsample: bool, groups: int, rngs: nnx.Rngs):
        self.resnets = nnx.List(
            [ResnetBlock(c_in if j == 0 else c_out, c_out, groups=groups, rngs=rngs) for j in range(layers)]
        )
        self.upsamplers = nnx.List([Upsample(c_out, rngs=rngs)] if upsample else [])

    def __call__(self, x: Array) -> Array:
        for block in (*self.resnets, *self.upsamplers):
            x = block(x)
        return x


class Encoder(nnx.Module):
    """Image → latent features.  (B, H, W, in_channels) → (B, H/f, W/f, out_channels).

    ``out_channels`` is c for a plain autoencoder and 2c for a VAE (mean and log-variance).
    """

    def __init__(self, cfg: AutoencoderConfig, out_channels: int, *, rngs: nnx.Rngs):
        ch, g = cfg.block_out_channels, cfg.norm_num_groups
        self.conv_in = conv(cfg.in_channels, ch[0], 3, rngs)
        self.down_blocks = nnx.List(
            [
                EncoderBlock(
                    ch[max(i - 1, 0)],
                    ch[i],
                    layers=cfg.layers_per_block,
                    downsample=i < len(ch) - 1,
                    groups=g,
                    rngs=rngs,
                )
                for i in range(len(ch))
            ]
        )
        self.mid_block = MidBlock(ch[-1], attention=cfg.mid_block_attention, groups=g, rngs=rngs)
        self.conv_norm_out = group_norm(ch[-1], g, 1e-6, rngs)
        self.conv_out = conv(ch[-1], out_channels, 3, rngs)

    def __call__(self, x: Array) -> Array:
        h = self.conv_in(x)
        for block in self.down_blocks:
            h = block(h)
        h = self.mid_block(h)
        return self.conv_out(jax.nn.silu(self.conv_norm_out(h)))


class Decoder(nnx.Module):
    """Latent → image.  (B, h, w, latent_channels) → (B, h·f, w·f, out_channels)."""

    def __init__(self, cfg: AutoencoderConfig, *, rngs: nnx.Rngs):
        ch, g = tuple(reversed(cfg.block_out_channels)), cfg.norm_num_groups
        self.conv_in = conv(cfg.latent_channels, ch[0], 3, rngs)
        self.mid_block = MidBlock(ch[0], attention=cfg.mid_block_attention, groups=g, rngs=rngs)
        self.up_blocks = nnx.List(
            [
                DecoderBlock(
                    ch[max(i - 1, 0)],
                    ch[i],
                    layers=cfg.layers_per_block + 1,
                    upsample=i < len(ch) - 1,
                    groups=g,
                    rngs=rngs,
                )
                for i in range(len(ch))
            ]
        )
        self.conv_norm_out = group_norm(ch[-1], g, 1e-6, rngs)
        self.conv_out = conv(ch[-1], cfg.out_channels, 3, rngs)

    def __call__(self, z: Array) -> Array:
        h = self.mid_block(self.conv_in(z))
        for block in self.up_blocks:
            h = block(h)
        return self.conv_out(jax.nn.silu(self.conv_norm_out(h)))


class Autoencoder(nnx.Module):
    """A deterministic autoencoder: z = E(x), x̂ = D(z).  (B, H, W, C) → (B, H, W, C)."""

    def __init__(self, cfg: AutoencoderConfig, *, rngs: nnx.Rngs):
        self.config = cfg
        self.encoder = Encoder(cfg, cfg.latent_channels, rngs=rngs)
        self.decoder = Decoder(cfg, rngs=rngs)

    def encode(self, x: Array) -> Array:
        """(B, H, W, C) → (B, H/f, W/f, c)."""
        return self.encoder(x)

    def decode(self, z: Array) -> Array:
        """(B, h, w, c) → (B, h·f, w·f, C)."""
        return self.decoder(z)

    def __call__(self, x: Array) -> Array:
        return self.decode(self.encode(x))


def reconstruction_loss(x: Array, x_hat: Array) -> Array:
    """Mean squared error over every pixel and channel: (1/N) Σ (x − x̂)². Scalar."""
    return jnp.mean((x - x_hat) ** 2)


def autoencoder_loss(model: Autoencoder, batch: dict, key: Array) -> tuple[Array, dict]:
    """Training loss for :func:`sdjax.train.fit`: the reconstruction MSE of ``batch["image"]``.

    ``key`` is unused (the autoencoder is deterministic) but keeps the signature every loss shares.
    """
    del key
    x = batch["image"]
    loss = reconstruction_loss(x, model(x))
    return loss, {"mse": loss}
