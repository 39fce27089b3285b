"""The parts of one Stable Diffusion checkpoint, the things a pipeline is built from.

:mod:`sdjax.convert` reads them from diffusers folders, CompVis single files and sdjax folders,
:mod:`sdjax.tiny_sd` trains a small set of them, :mod:`sdjax.speed` makes random ones of SD1.5's size;
:class:`sdjax.pipeline.StableDiffusion` runs them.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
from flax import nnx

from sdjax.models.clip import CLIPTextModel
from sdjax.models.unet import UNet2D
from sdjax.models.vae import AutoencoderKL
from sdjax.schedulers import NoiseSchedule
from sdjax.tokenizer import CLIPTokenizer

NETWORKS = ("unet", "vae", "text_encoder")


@dataclasses.dataclass
class Components:
    """The networks of one checkpoint as sdjax modules, its tokenizer and its noise schedule.

    ``scheduler_config`` is a diffusers folder's ``scheduler_config.json`` as read (its ``_class_name``
    and options such as ``use_karras_sigmas`` say which sampler the checkpoint ships with,
    :func:`sdjax.samplers.from_config`); None for the layouts that do not record one.

    ``dtype`` (not an argument): the dtype of the networks' parameters, float32 or bfloat16 — the one
    dtype all three share (:meth:`astype` casts them together).
    """

    unet: UNet2D
    vae: AutoencoderKL
    text_encoder: CLIPTextModel
    tokenizer: CLIPTokenizer
    schedule: NoiseSchedule
    scheduler_config: dict | None = None
    dtype: jnp.dtype = dataclasses.field(init=False)

    def __post_init__(self):
        dtypes = {name: _param_dtype(getattr(self, name)) for name in NETWORKS}
        if len(set(dtypes.values())) > 1:
            raise ValueError(f"the networks' parameters have different dtypes {dtypes}: cast them with astype(dtype)")
        self.dtype = dtypes["unet"]

    @property
    def version(self) -> str:
        """ "sd1" or "sd2", told apart by the text encoder: OpenAI's CLIP ViT-L/14 (SD1, quick_gelu) or
        OpenCLIP's ViT-H/14 (SD2, exact gelu)."""
        return "sd2" if self.text_encoder.config.hidden_act == "gelu" else "sd1"

    def astype(self, dtype) -> Components:
        """The same model with its networks' parameters cast to ``dtype`` (e.g. jnp.bfloat16)."""
        return dataclasses.replace(self, **{name: _cast(getattr(self, name), dtype) for name in NETWORKS})


def _param_dtype(module: nnx.Module) -> jnp.dtype:
    return jnp.dtype(jax.tree.leaves(nnx.state(module, nnx.Param))[0].dtype)


def _cast(module: nnx.Module, dtype) -> nnx.Module:
    graphdef, params, rest = nnx.split(module, nnx.Param, ...)
    return nnx.merge(graphdef, jax.tree.map(lambda p: p.astype(dtype), params), rest)
