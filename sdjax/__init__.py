"""sdjax: Stable Diffusion from scratch in JAX/Flax (NNX), taught through notebooks.

Modules, in the order the learning path meets them:

    sdjax.nn         building blocks (ResnetBlock, Downsample, Upsample, SelfAttention, embeddings)
    sdjax.data       offline datasets (shapes, digits), Hugging Face loader, batching, sharding
    sdjax.train      the shared training loop: jitted step, EMA, checkpoints, data parallelism
    sdjax.models     Autoencoder, AutoencoderKL (the VAE of notebook 02 and of Stable Diffusion), UNet2D
                     (pixel DDPM and SD's text-conditioned UNet), CLIPTextModel (SD's text encoder)
    sdjax.schedulers noise schedules, the forward process q(x_t|x_0), DDPM and DDIM steps
    sdjax.diffusion  the diffusion training loss and the sampling loops (compiled and step by step)
    sdjax.samplers   eight samplers behind one interface (DDPM, DDIM, PLMS, Euler, Euler a, DPM++ 2M, LMS, Heun)
    sdjax.pretrained small trained models shipped with sdjax, and the recipes that made them
    sdjax.metrics    sample quality: nearest real images, held-out share, coverage
    sdjax.viz        grids, loss curves, latent-space pictures
    sdjax.tokenizer  CLIP's byte-level BPE tokenizer
    sdjax.convert    Stable Diffusion weights in and out: diffusers folders, CompVis single files
    sdjax.pipeline   StableDiffusion: text to image (encode the prompt, denoise with guidance, decode),
                     image to image (SDEdit) and inpainting
    sdjax.exercises  checks for the notebooks' exercises
    sdjax.io         safetensors save/load of pytrees and models
"""

from sdjax.pipeline import StableDiffusion

__version__ = "0.1.0"

__all__ = ["StableDiffusion"]
