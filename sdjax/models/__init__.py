"""sdjax's networks: each model in one file, its config a frozen dataclass (the UNet's, the largest, in
unet_config.py)."""

from sdjax.models.autoencoder import Autoencoder, AutoencoderConfig, Decoder, Encoder, autoencoder_loss
from sdjax.models.clip import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection
from sdjax.models.unet import UNet2D, UNetConfig
from sdjax.models.vae import AutoencoderKL, DiagonalGaussian, VAEConfig, vae_loss

__all__ = [
    "Autoencoder",
    "AutoencoderConfig",
    "AutoencoderKL",
    "CLIPTextConfig",
    "CLIPTextModel",
    "CLIPTextModelWithProjection",
    "Decoder",
    "DiagonalGaussian",
    "Encoder",
    "UNet2D",
    "UNetConfig",
    "VAEConfig",
    "autoencoder_loss",
    "vae_loss",
]
