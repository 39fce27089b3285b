"""The helpers the tests share, in one place: no test module imports another.

* Parity with PyTorch. :func:`load_torch_state` copies a live PyTorch module's ``state_dict`` into an
  sdjax module with :mod:`sdjax.convert`'s name and layout rules (the same code that loads real
  checkpoints), after dropping the aliases a live module can have: diffusers' ``Downsample2D``
  registers one convolution under two names (``conv`` and ``Conv2d_0``), so both appear in its state
  dict, sharing storage. :func:`nchw` and :func:`nhwc` change layouts; :func:`rel_err` measures.
* The tiny random reference networks the parity tests compare with (diffusers, transformers): base
  configs that a test overrides explicitly where its network differs (:data:`SD1_UNET`,
  :data:`PIXEL_UNET`, :data:`SD1_TEXT`), builders (:func:`reference_unet`, :func:`reference_vae`,
  :func:`reference_text_encoder`, :func:`reference_pipeline`), and the tiny SD1 pipeline saved with
  ``save_pretrained`` (:func:`tiny_pipeline`) with the prompts and samplers the pipeline tests share.
* SD1.5's scheduler config as released (:data:`SD15_SCHEDULER`).
* The toy training run of tests/test_train.py (:func:`run_fit`), which its child processes import.

torch, diffusers and transformers are optional (the ``reference`` extra): they are imported inside the
functions that use them, so this module imports without them. The test modules that need them skip
with ``pytest.importorskip``. The builders draw random weights from torch's global generator: seed it
(``torch.manual_seed``) first.
"""

from __future__ import annotations

import functools
import json

import numpy as np
from flax import nnx

from sdjax.convert import abstract, load_state_dict, state_dict_names

# ---------------------------------------------------------------------------------------------------
# parity with PyTorch
# ---------------------------------------------------------------------------------------------------


def load_torch_state(module: nnx.Module, state_dict: dict) -> None:
    """Copy a torch state_dict into ``module`` in place; every parameter must be matched."""
    expected = set(state_dict_names(module))
    used = {state_dict[name].data_ptr() for name in expected if name in state_dict}
    weights = {
        name: tensor.detach().cpu().numpy()
        for name, tensor in state_dict.items()
        if name in expected or tensor.data_ptr() not in used  # an alias of a matched tensor is dropped
    }
    load_state_dict(module, weights, source="reference state_dict")


@functools.partial(nnx.jit, static_argnames=("method",))
def apply(module: nnx.Module, *args, method: str = "__call__"):
    """``module.method(*args)`` compiled as one program (eager JAX compiles every operation on its own, which
    on a CPU costs seconds per network; a compiled program is also shared through the compilation cache)."""
    return getattr(module, method)(*args)


def nchw(x) -> np.ndarray:
    return np.array(np.asarray(x).transpose(0, 3, 1, 2))  # a writable copy, as torch.from_numpy wants


def nhwc(x) -> np.ndarray:
    return np.asarray(x).transpose(0, 2, 3, 1)


def rel_err(a, b) -> float:
    """max |a − b| / max |b|: a relative error that is robust to entries near zero."""
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.max(np.abs(a - b)) / max(np.max(np.abs(b)), 1e-12))


class BrownianPath:
    """A Brownian motion W in σ, built from given normals, as the noise of an SDE sampler: a reference's
    ``noise_sampler(σ, σ')`` (k-diffusion, diffusers' DPMSolverSDEScheduler) gets (W(σ') − W(σ)) / √(σ − σ').

    W(first σ asked) = 0; each σ' below every point so far extends the path by √(σ_low − σ') · :attr:`z`,
    z the normal the caller set for the current model evaluation. Over disjoint intervals that is z
    itself; over nested ones (dpmpp_sde) the increments are correlated as a Brownian motion's are.
    """

    def __init__(self, to_torch):
        self.to_torch = to_torch  # (B, H, W, C) numpy → the reference's tensor
        self.points: dict[float, np.ndarray] = {}
        self.z = None

    def __call__(self, sigma, sigma_next):
        a, b = float(sigma), float(sigma_next)
        if not self.points:
            self.points[a] = np.zeros_like(self.z, np.float64)
        if b not in self.points:
            low = min(self.points)
            assert b < low, (a, b, low)
            self.points[b] = self.points[low] + np.sqrt(low - b) * self.z.astype(np.float64)
        increment = (self.points[b] - self.points[a]) / np.sqrt(a - b)
        return self.to_torch(increment.astype(np.float32))


# ---------------------------------------------------------------------------------------------------
# tiny reference networks
# ---------------------------------------------------------------------------------------------------

# An SD1-style text-conditioned UNet (diffusers' UNet2DConditionModel, legacy naming: attention_head_dim
# is the number of heads) at a few channels per layer: two levels, cross-attention in the first level
# and the mid block, a downsampler.
SD1_UNET = dict(
    sample_size=16,
    block_out_channels=(32, 64),
    layers_per_block=1,
    down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
    up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
    norm_num_groups=8,
    attention_head_dim=4,
    cross_attention_dim=32,
)
# A pixel-space DDPM UNet (diffusers' UNet2DModel; sdjax's UNetConfig takes the same fields): RGB in
# and out, self-attention in the second level.
PIXEL_UNET = dict(
    sample_size=16,
    in_channels=3,
    out_channels=3,
    block_out_channels=(32, 64),
    down_block_types=("DownBlock2D", "AttnDownBlock2D"),
    up_block_types=("AttnUpBlock2D", "UpBlock2D"),
    norm_num_groups=8,
    attention_head_dim=8,
)
# An SD1-style CLIP text encoder (transformers' CLIPTextConfig; sdjax's takes the same fields): 2 layers
# of width 32, CLIP's real vocabulary and context length, quick GELU.
SD1_TEXT = dict(
    vocab_size=49408,
    hidden_size=32,
    intermediate_size=64,
    num_attention_heads=4,
    num_hidden_layers=2,
    max_position_embeddings=77,
    hidden_act="quick_gelu",
)


def reference_unet(**changes):
    """diffusers' ``UNet2DConditionModel`` in the :data:`SD1_UNET` config with ``changes``, random, in eval mode."""
    import diffusers

    return diffusers.UNet2DConditionModel(**{**SD1_UNET, **changes}).eval()


def reference_vae(block_out_channels: tuple[int, ...], **config):
    """diffusers' ``AutoencoderKL`` with one plain encoder and decoder block per entry of
    ``block_out_channels`` (a VAE of L levels scales by 2^(L−1)), random, in eval mode."""
    import diffusers

    levels = len(block_out_channels)
    return diffusers.AutoencoderKL(
        block_out_channels=block_out_channels,
        down_block_types=("DownEncoderBlock2D",) * levels,
        up_block_types=("UpDecoderBlock2D",) * levels,
        **config,
    ).eval()


def reference_text_encoder(**changes):
    """transformers' ``CLIPTextModel`` in the :data:`SD1_TEXT` config with ``changes``, random, in eval mode."""
    import transformers

    return transformers.CLIPTextModel(transformers.CLIPTextConfig(**{**SD1_TEXT, **changes})).eval()


# the adapter tests' text encoder: the tiny SD1 one with 1000 tokens and SD1's legacy special ids
ADAPTER_TEXT = {**SD1_TEXT, "vocab_size": 1000, "bos_token_id": 0, "eos_token_id": 2, "pad_token_id": 1}


@nnx.jit
def unet_and_text(unet, text, x, t, context, ids):
    """An sdjax UNet and text encoder in one compiled program (eager JAX compiles every op on its own: seconds).
    Adapter strengths are array state, so every strength of one adapter structure shares the program."""
    return unet(x, t, context), text(ids).last_hidden_state


class UNetAndText:
    """What the adapter tests (LoRA, LyCORIS) compare on: the tiny reference UNet and a CLIP text encoder in
    :data:`ADAPTER_TEXT`'s config (random, seeded with ``torch.manual_seed(0)`` first), fixed inputs, and sdjax copies
    of both networks holding the same weights (built abstract, filled once; :meth:`sdjax_models` hands out clones)."""

    def __init__(self):
        import torch

        from sdjax.models.clip import CLIPTextConfig, CLIPTextModel
        from sdjax.models.unet import UNet2D
        from sdjax.models.unet_config import UNetConfig

        torch.manual_seed(0)
        self.unet = reference_unet()
        self.text = reference_text_encoder(**ADAPTER_TEXT)
        rng = np.random.default_rng(0)
        self.x = rng.standard_normal((2, 16, 16, 4)).astype(np.float32)
        self.t = np.array([3, 801])
        self.context = rng.standard_normal((2, 77, 32)).astype(np.float32)
        self.ids = rng.integers(3, 1000, (2, 77))
        self.ids[:, 0], self.ids[:, 9:] = 0, 2
        config = UNetConfig.from_diffusers(dict(self.unet.config))
        self._sdjax_unet = abstract(UNet2D, config)
        load_torch_state(self._sdjax_unet, self.unet.state_dict())
        self._sdjax_text = abstract(CLIPTextModel, CLIPTextConfig(**ADAPTER_TEXT))
        load_torch_state(self._sdjax_text, self.text.state_dict())

    def sdjax_models(self):
        """sdjax's UNet and text encoder holding the base weights (no adapters): fresh copies."""
        return nnx.clone(self._sdjax_unet), nnx.clone(self._sdjax_text)

    def sdjax_outputs(self, unet, text) -> tuple[np.ndarray, np.ndarray]:
        """(ε (B, H, W, 4), text states (B, 77, D)) of sdjax's networks on the fixed inputs."""
        eps, hidden = unet_and_text(unet, text, *(np.asarray(a) for a in (self.x, self.t, self.context, self.ids)))
        return np.asarray(eps), np.asarray(hidden)

    def torch_outputs(self, unet, text) -> tuple[np.ndarray, np.ndarray]:
        """The same of PyTorch networks (diffusers' UNet and transformers' CLIP, with whatever wraps them)."""
        import torch

        with torch.no_grad():
            eps = unet(torch.from_numpy(nchw(self.x)), torch.from_numpy(self.t), torch.from_numpy(self.context))
            hidden = text(torch.from_numpy(self.ids)).last_hidden_state
        return nhwc(eps.sample.numpy()), hidden.numpy()


def reference_pipeline(**components):
    """diffusers' ``StableDiffusionPipeline`` of ``components`` (vae, text_encoder, tokenizer, unet,
    scheduler; any may be None), without safety checker."""
    import diffusers

    return diffusers.StableDiffusionPipeline(
        **components, safety_checker=None, feature_extractor=None, requires_safety_checker=False
    )


# ---------------------------------------------------------------------------------------------------
# SD1.5's scheduler; the tiny pipeline and what the pipeline tests ask of it
# ---------------------------------------------------------------------------------------------------

# runwayml/stable-diffusion-v1-5's scheduler/scheduler_config.json, verbatim: no timestep_spacing, so
# each diffusers scheduler class reads it with its own default ("leading" for PNDM and DDIM, "linspace"
# for the σ samplers)
SD15_SCHEDULER = {
    "_class_name": "PNDMScheduler",
    "_diffusers_version": "0.6.0",
    "beta_end": 0.012,
    "beta_schedule": "scaled_linear",
    "beta_start": 0.00085,
    "num_train_timesteps": 1000,
    "set_alpha_to_one": False,
    "skip_prk_steps": True,
    "steps_offset": 1,
    "trained_betas": None,
    "clip_sample": False,
}

SIZE = 32  # pixels of the tiny pipeline's images; latents 4 × 4
PROMPTS = ["a photo of an astronaut riding a horse", "a red bicycle"]
NEGATIVES = ["blurry, low quality", ""]
# the deterministic samplers: the diffusers scheduler class each is compared with
SCHEDULERS = {
    "ddim": "DDIMScheduler",
    "plms": "PNDMScheduler",
    "euler": "EulerDiscreteScheduler",
    "dpmpp_2m": "DPMSolverMultistepScheduler",
    "lms": "LMSDiscreteScheduler",
    "heun": "HeunDiscreteScheduler",
    "unipc": "UniPCMultistepScheduler",
}


# A 3-level UNet for tiny_pipeline(unet=...): latents are halved twice, so image sizes that are multiples of 8 but
# not of 32 (48×64, 72×56) give odd sizes on the way down.
THREE_LEVEL_UNET = dict(
    block_out_channels=(16, 16, 32),
    down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
    up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
)


def tiny_pipeline(folder, in_channels=4, unet=None):
    """A random diffusers StableDiffusionPipeline with SD1.5's scheduler config, saved in
    ``folder / "model"`` and loaded back from there. ``in_channels=9``: an inpainting UNet's; ``unet``:
    changes to the UNet's config (e.g. :data:`THREE_LEVEL_UNET`).

    SD1's structure with a few channels per layer: a 4-level VAE (latents H/8 × W/8), a 2-level
    cross-attention UNet, a 2-layer CLIP text encoder with CLIP's real vocabulary and tokenizer."""
    import diffusers
    import torch
    import transformers

    from sdjax.tokenizer import CLIPTokenizer

    torch.manual_seed(0)
    unet = reference_unet(
        **{"sample_size": SIZE // 8, "in_channels": in_channels, "block_out_channels": (16, 32), **(unet or {})}
    )
    vae = reference_vae((8, 8, 16, 16), layers_per_block=1, norm_num_groups=4)
    text = reference_text_encoder()
    CLIPTokenizer.from_bpe_file().save_folder(folder / "tokenizer_src")
    pipe = reference_pipeline(
        vae=vae,
        text_encoder=text,
        tokenizer=transformers.CLIPTokenizer.from_pretrained(folder / "tokenizer_src"),
        unet=unet,
        scheduler=diffusers.PNDMScheduler.from_config(SD15_SCHEDULER),
    )
    return save_and_reload(pipe, folder / "model", SD15_SCHEDULER)


def save_and_reload(pipe, folder, scheduler_config: dict):
    """A diffusers pipeline saved with ``save_pretrained`` in ``folder``, its scheduler config written verbatim
    (as released, without the keys diffusers adds), and loaded back from there, progress bar off."""
    pipe.save_pretrained(folder)
    (folder / "scheduler" / "scheduler_config.json").write_text(json.dumps(scheduler_config))
    pipe = type(pipe).from_pretrained(folder)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def diffusers_images(reference, scheduler: str, **kwargs) -> np.ndarray:
    """The images (N, H, W, 3) in [0, 1] of the diffusers pipeline ``reference`` for :data:`PROMPTS` and
    :data:`NEGATIVES`, sampled by the diffusers class of the sdjax sampler ``scheduler``."""
    import diffusers
    import torch

    from sdjax.samplers import CLASSES

    cls = CLASSES[scheduler]
    reference.scheduler = getattr(diffusers, cls.diffusers_class).from_config(reference.scheduler.config | cls.variant)
    with torch.no_grad():
        return reference(PROMPTS, negative_prompt=NEGATIVES, output_type="np", **kwargs).images


# ---------------------------------------------------------------------------------------------------
# the toy training run of tests/test_train.py (its child processes import it from here)
# ---------------------------------------------------------------------------------------------------


def toy_autoencoder(seed=0):
    from sdjax.models import Autoencoder, AutoencoderConfig

    config = AutoencoderConfig(block_out_channels=(8, 16), layers_per_block=1, latent_channels=2, norm_num_groups=4)
    return Autoencoder(config, rngs=nnx.Rngs(seed))


def toy_data(n=64):
    x = np.random.default_rng(0).uniform(-1, 1, (n, 8, 8, 3)).astype(np.float32)
    return {"image": x}


def run_fit(steps, checkpoint=None, devices=None, ema=0.9, checkpoint_every=None, optimizer=None):
    import optax

    from sdjax.models import autoencoder_loss
    from sdjax.train import fit

    return fit(
        toy_autoencoder(),
        autoencoder_loss,
        toy_data(),
        steps=steps,
        batch_size=8,
        optimizer=optimizer or optax.adam(1e-2),
        seed=3,
        ema_decay=ema,
        checkpoint=checkpoint,
        checkpoint_every=checkpoint_every,
        devices=devices,
        progress=False,
    )


def leaves(tree):
    import jax

    return [np.asarray(x) for x in jax.tree.leaves(tree)]
