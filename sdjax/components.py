"""The parts of one Stable Diffusion checkpoint, the things a pipeline is built from.

:mod:`sdjax.convert` reads them from diffusers folders, CompVis single files and sdjax folders,
:mod:`sdjax.tiny_sd` trains a small set of them, :mod:`sdjax.speed` makes random ones of SD1.5's size;
:class:`sdjax.pipeline.StableDiffusion` runs them.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
from flax import nnx

from sdjax.models.clip import CLIPTextModel, CLIPTextModelWithProjection
from sdjax.models.unet import UNet2D
from sdjax.models.vae import AutoencoderKL
from sdjax.schedulers import NoiseSchedule
from sdjax.tokenizer import CLIPTokenizer

NETWORKS = ("unet", "vae", "text_encoder", "text_encoder_2")


@dataclasses.dataclass
class Components:
    """The networks of one checkpoint as sdjax modules, its tokenizer and its noise schedule.

    ``scheduler_config`` is a diffusers folder's ``scheduler_config.json`` as read (its ``_class_name``
    and options such as ``use_karras_sigmas`` say which sampler the checkpoint ships with,
    :func:`sdjax.samplers.from_config`); None for the layouts that do not record one.

    SDXL has a second text encoder and tokenizer (``text_encoder_2``, OpenCLIP bigG with its projection;
    ``tokenizer_2``), None for SD 1.x/2.x; ``force_zeros_for_empty_prompt`` (SDXL's model_index.json): with
    no negative prompt, c_∅ and the pooled c_∅ are zeros rather than the empty prompt's encoding.

    ``dtype`` (not an argument): the dtype of the networks' parameters, float32 or bfloat16 — the one
    dtype all of them share (:meth:`astype` casts them together).
    """

    unet: UNet2D
    vae: AutoencoderKL
    text_encoder: CLIPTextModel
    tokenizer: CLIPTokenizer
    schedule: NoiseSchedule
    scheduler_config: dict | None = None
    text_encoder_2: CLIPTextModelWithProjection | None = None
    tokenizer_2: CLIPTokenizer | None = None
    force_zeros_for_empty_prompt: bool = False
    dtype: jnp.dtype = dataclasses.field(init=False)

    def __post_init__(self):
        if (self.text_encoder_2 is None) != (self.tokenizer_2 is None):
            raise ValueError("an SDXL model needs both text_encoder_2 and tokenizer_2")
        dtypes = {name: _param_dtype(getattr(self, name)) for name in self.networks}
        if len(set(dtypes.values())) > 1:
            raise ValueError(f"the networks' parameters have different dtypes {dtypes}: cast them with astype(dtype)")
        self.dtype = dtypes["unet"]

    @property
    def networks(self) -> tuple[str, ...]:
        """The names of the networks this model has (``text_encoder_2`` only for SDXL)."""
        return tuple(name for name in NETWORKS if getattr(self, name) is not None)

    @property
    def version(self) -> str:
        """ "sd1", "sd2" or "sdxl": SDXL has a second text encoder; SD1 and SD2 are told apart by theirs,
        OpenAI's CLIP ViT-L/14 (SD1, quick_gelu) or OpenCLIP's ViT-H/14 (SD2, exact gelu)."""
        if self.text_encoder_2 is not None:
            return "sdxl"
        return "sd2" if self.text_encoder.config.hidden_act == "gelu" else "sd1"

    def astype(self, dtype) -> Components:
        """The same model with its networks' parameters cast to ``dtype`` (e.g. jnp.bfloat16)."""
        return dataclasses.replace(self, **{name: _cast(getattr(self, name), dtype) for name in self.networks})


def _param_dtype(module: nnx.Module) -> jnp.dtype:
    return jnp.dtype(jax.tree.leaves(nnx.state(module, nnx.Param))[0].dtype)


def _cast(module: nnx.Module, dtype) -> nnx.Module:
    graphdef, params, rest = nnx.split(module, nnx.Param, ...)
    return nnx.merge(graphdef, _cast_leaves(params, jnp.dtype(dtype)), rest)


@functools.partial(jax.jit, static_argnums=1)
def _cast_leaves(tree, dtype: jnp.dtype):
    """Every leaf of ``tree`` cast to ``dtype``, as one compiled program (cast one by one, each tensor shape
    would compile a program of its own: dozens for one network)."""
    return jax.tree.map(lambda p: p.astype(dtype), tree)
