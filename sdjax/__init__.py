"""sdjax: Stable Diffusion from scratch in JAX/Flax (NNX), taught through notebooks.

Modules, in the order the learning path meets them (``import sdjax.X`` loads X and what it needs, no more;
``sdjax.StableDiffusion`` imports the pipeline on first use):

    sdjax.nn            the building blocks: ResnetBlock, Down/Upsample, attention layers, the transformer
    sdjax.attention     which kernel computes attention (cuDNN or XLA) and how it fits in memory
    sdjax.data          offline datasets (shapes, digits), Hugging Face datasets, shuffled batches
    sdjax.devices       data parallelism on one host or many (jax.distributed): a batch split over the devices
    sdjax.train         the shared training loop: jitted step, EMA, checkpoints
    sdjax.io            safetensors save/load of pytrees and models
    sdjax.models        Autoencoder, AutoencoderKL, VQModel, UNet2D (pixel DDPM, SD), NestedUNet, CLIP, ControlNet
    sdjax.viz           grids, loss curves, latent-space pictures
    sdjax.interpolate   lerp and slerp between latents
    sdjax.schedulers    noise schedules, the forward process q(x_t|x_0), DDPM and DDIM steps
    sdjax.samplers      thirteen samplers as small classes (DDIM, PLMS, Euler a, DPM++ 2M and SDE, UniPC, …)
    sdjax.chain         the denoising loop every model samples with (compiled, or step by step)
    sdjax.diffusion     the diffusion training loss; sampling a pixel model
    sdjax.pretrained    small trained models shipped with sdjax, and the recipes that made them
    sdjax.probe         the attribute probe that reads what a shapes image shows
    sdjax.digit_reader  the reader that says whether a 16-px image is a digit, and which
    sdjax.metrics       sample quality: nearest real images, held-out share, coverage, IoU, the domain FID
    sdjax.tokenizer     CLIP's byte-level BPE tokenizer
    sdjax.prompts       prompts to text-encoder contexts: long prompts in chunks, weights applied
    sdjax.prompt_syntax the web UI's and compel's prompt weighting grammars
    sdjax.components    the networks, tokenizer and schedule of one checkpoint
    sdjax.convert       weights in and out: PyTorch names and layouts, diffusers folders, sdjax folders
    sdjax.compvis       CompVis single-file checkpoints (.ckpt/.safetensors)
    sdjax.control       ControlNet in the pipeline: condition images, per-step weights, residuals
    sdjax.preprocessors condition images without a model: Canny edges, scribbles, thresholds, segmentation
    sdjax.latents       pixels ↔ latents through the VAE, whole or tiled
    sdjax.images        images, masks and latents a user passes in, checked
    sdjax.img2img       image to image (SDEdit) and inpainting: where the chain starts, what it keeps
    sdjax.hires         hires fix: draw small, enlarge, redraw with img2img (the web UIs' two passes)
    sdjax.pipeline      StableDiffusion: text to image, image to image, inpainting
    sdjax.tiny_sd       the small text-to-image model trained from scratch and bundled with sdjax
    sdjax.lora          LoRA, LoCon, LoHa and LoKr layers and files (diffusers/peft, kohya/LyCORIS)
    sdjax.textual_inversion  learned token embeddings (diffusers and AUTOMATIC1111 files)
    sdjax.adapters      LoRA and textual inversion as pipeline methods
    sdjax.hypernetwork  AUTOMATIC1111 hypernetworks: MLPs on attention's key/value context; load, train, save
    sdjax.captioned     captioned image datasets (Hub, save_to_disk, imagefolder, parquet, .txt) read lazily
    sdjax.finetune      LoRA, textual inversion, DreamBooth and full fine-tuning (on a captioned dataset too)
    sdjax.merge         checkpoint merging (weighted sum, add difference, per-block α, LoRA baking), streamed
    sdjax.controlnet_training  training a ControlNet on a frozen model; the shipped Canny ControlNet
    sdjax.wuerstchen    Würstchen at toy scale: VQ stage A, a semantic latent, stages B and C, the pipeline
    sdjax.matryoshka    Matryoshka diffusion at toy scale: 16/32/64 px jointly, a NestedUNet, progressive training
    sdjax.speed         the compilation cache, compile counting, FLOPs from XLA, random SD-size weights
    sdjax.exercises     checks for the notebooks' exercises
    sdjax.editions      student editions of the notebooks (solutions out, reference figures kept)
    sdjax.notebook      the notebooks' first cell: quick/full mode, online/offline
    sdjax.cli           the ``sdjax`` command (training, conversion, student editions)
    sdjax.txt2img       ``sdjax txt2img`` / ``img2img``: CompVis's flags, numbered files, PNG metadata
"""

__version__ = "0.1.0"

__all__ = ["StableDiffusion"]


def __getattr__(name: str):
    """``sdjax.StableDiffusion`` imports the pipeline on first use, so that ``import sdjax.nn`` (or any
    other module) loads only what that module needs."""
    if name == "StableDiffusion":
        from sdjax.pipeline import StableDiffusion

        return StableDiffusion
    raise AttributeError(f"module 'sdjax' has no attribute {name!r}")
