"""sdjax's networks: each model in one file, its config a frozen dataclass."""

from sdjax.models.autoencoder import Autoencoder, AutoencoderConfig, Decoder, Encoder, autoencoder_loss
from sdjax.models.vae import AutoencoderKL, DiagonalGaussian, VAEConfig, vae_loss

__all__ = [
    "Autoencoder",
    "AutoencoderConfig",
    "AutoencoderKL",
    "Decoder",
    "DiagonalGaussian",
    "Encoder",
    "VAEConfig",
    "autoencoder_loss",
    "vae_loss",
]
