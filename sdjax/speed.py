"""Speed helpers: the persistent compilation cache, a compilation counter, and random-weight models.

Why a compilation cache. ``jax.jit`` traces a function and hands it to XLA, which compiles it for the
device; SD's denoising chain (50 UNet evaluations in one ``lax.scan``) can take XLA tens of seconds on a
GPU. The compiled program is kept in memory for the process, so the second image costs no compile,
but a new process (each ``sdjax txt2img`` run) compiles again. :func:`enable_compilation_cache` keeps
the programs on disk, keyed by a hash of the program, the jax/XLA versions, the device and the flags,
so a later process with the same shapes reads them back instead of compiling.

Why count compilations. A compiled program is reused only when its static arguments and input shapes
match; a changed Python value that reaches a static argument, or a shape that varies from call to
call, silently compiles again. :class:`CompileCounter` counts XLA compilations inside a ``with`` block:
the second run of a pipeline with the same shapes must count none.

Random-weight models (:func:`random_components`): Stable Diffusion's networks in SD1.5's shapes or in
a tiny configuration, with random weights, for benchmarks and tests that must not download anything.
Speed and memory do not depend on the values of the weights.
"""

from __future__ import annotations

import os
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from sdjax import convert
from sdjax.components import Components
from sdjax.io import path_str
from sdjax.models.clip import CLIPTextConfig, CLIPTextModel
from sdjax.models.unet import UNet2D, UNetConfig
from sdjax.models.vae import AutoencoderKL, VAEConfig
from sdjax.schedulers import NoiseSchedule
from sdjax.tokenizer import CLIPTokenizer

DEFAULT_CACHE_DIR = Path("~/.cache/sdjax/jax")
# the event jax records around every XLA compilation (or persistent-cache read) of a jitted program
BACKEND_COMPILE_EVENT = "/jax/core/compile/backend_compile_duration"

# SD1.x's scheduler_config.json (DDIM): the schedule both sides of a benchmark sample with
SD_SCHEDULER = {
    "_class_name": "DDIMScheduler",
    "beta_schedule": "scaled_linear",
    "beta_start": 0.00085,
    "beta_end": 0.012,
    "clip_sample": False,
    "set_alpha_to_one": False,
    "steps_offset": 1,
    "num_train_timesteps": 1000,
}

# (UNet, VAE, text encoder) configs. "sd15": Stable Diffusion 1.5 (860 M + 84 M + 123 M parameters).
# "tiny": the same structure with a few channels per layer and fewer layers (a 4-level VAE, so latents are
# H/8 × W/8 as in SD; a 2-level UNet with cross-attention in its first level and the mid block; a 2-layer
# CLIP with CLIP's real vocabulary): 2.5 M parameters, 1.6 M of them the token embedding.
CONFIGS = {
    "sd15": (UNetConfig.sd15(), VAEConfig.sd(), CLIPTextConfig.sd1()),
    "tiny": (
        UNetConfig(
            sample_size=8,
            in_channels=4,
            out_channels=4,
            block_out_channels=(32, 64),
            layers_per_block=1,
            down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
            up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
            mid_block_type="UNetMidBlock2DCrossAttn",
            attention_head_dim=None,
            num_attention_heads=4,
            cross_attention_dim=32,
            norm_num_groups=8,
        ),
        VAEConfig(
            block_out_channels=(8, 8, 16, 16),
            layers_per_block=1,
            latent_channels=4,
            norm_num_groups=4,
            scaling_factor=0.18215,
        ),
        CLIPTextConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4),
    ),
}


def enable_compilation_cache(path: str | os.PathLike | None = None, *, min_compile_time_secs: float = 0.0) -> Path:
    """Keep every compiled XLA program under ``path`` and read it back in later processes.

    path: default ``$SDJAX_COMPILATION_CACHE`` if set, else ``~/.cache/sdjax/jax``; created if missing.
    min_compile_time_secs: programs that compiled faster than this are not written (jax's default is
      1 s; 0 keeps the many small ones too, which together still cost a cold start seconds).
    Call it before the first compilation if possible; called later, it resets jax's cache so the new
    directory takes effect. The cache is trusted code: do not point it at a folder others can write.
    Returns the directory.
    """
    from jax.experimental.compilation_cache import compilation_cache

    path = Path(path or os.environ.get("SDJAX_COMPILATION_CACHE") or DEFAULT_CACHE_DIR).expanduser()
    path.mkdir(parents=True, exist_ok=True)
    jax.config.update("jax_compilation_cache_dir", str(path))
    jax.config.update("jax_persistent_cache_min_compile_time_secs", min_compile_time_secs)
    compilation_cache.reset_cache()
    return path


class CompileCounter:
    """Counts XLA compilations (and persistent-cache reads, which take their place) in a ``with`` block.

        with CompileCounter() as compiles:
            pipe("a red fox")
        compiles.count, compiles.seconds      # programs compiled, and the seconds it took
    """

    def __enter__(self) -> CompileCounter:
        self.count, self.seconds = 0, 0.0
        jax.monitoring.register_event_duration_secs_listener(self._listen)
        return self

    def _listen(self, event: str, duration: float, **_) -> None:
        if event == BACKEND_COMPILE_EVENT:
            self.count += 1
            self.seconds += duration

    def __exit__(self, *exc) -> None:
        jax.monitoring.unregister_event_duration_listener(self._listen)


def random_init(cls, config, rng: np.random.Generator, dtype=jnp.float32) -> nnx.Module:
    """A ``cls(config)`` module with random weights drawn on the host by NumPy (initialising through jax
    compiles one small program per parameter shape: minutes for SD on a 2-core CPU, against seconds):

        kernels W (…, fan_in-sized axes, out):  N(0, 1/fan_in)      (unit-variance activations)
        embeddings:  N(0, 0.02²);   norm scales: 1;   biases: N(0, 0.02²)
    """
    model = convert.abstract(cls, config)
    abstract = nnx.state(model, nnx.Param)

    def draw(path, leaf) -> jax.Array:
        name = path_str(path).rsplit(".", 1)[-1]
        if name == "scale":
            return jnp.ones(leaf.shape, dtype)
        std = 1.0 / np.sqrt(np.prod(leaf.shape[:-1])) if name == "kernel" else 0.02
        return jnp.asarray(rng.standard_normal(leaf.shape, np.float32) * np.float32(std), dtype)

    nnx.update(model, jax.tree_util.tree_map_with_path(draw, abstract))
    return model


def random_components(size: str = "tiny", *, seed: int = 0, dtype=jnp.float32) -> Components:
    """Stable Diffusion with random weights (:func:`random_init`): :data:`CONFIGS` [``size``] ("tiny" or
    "sd15"), parameters in ``dtype``, CLIP's real tokenizer and SD's schedule with a DDIM scheduler config.

    The arrays go where jax puts new arrays by default (wrap the call in
    ``jax.default_device(jax.devices("cpu")[0])`` to build SD1.5 in host memory).
    """
    if size not in CONFIGS:
        raise ValueError(f"size={size!r}: expected one of {sorted(CONFIGS)}")
    rng = np.random.default_rng(seed)
    unet_cfg, vae_cfg, text_cfg = CONFIGS[size]
    return Components(
        unet=random_init(UNet2D, unet_cfg, rng, dtype),
        vae=random_init(AutoencoderKL, vae_cfg, rng, dtype),
        text_encoder=random_init(CLIPTextModel, text_cfg, rng, dtype),
        tokenizer=CLIPTokenizer.from_bpe_file(),
        schedule=NoiseSchedule.from_diffusers_config(SD_SCHEDULER),
        scheduler_config=dict(SD_SCHEDULER),
    )


def count_flops(fn, *args) -> float:
    """FLOPs of one call ``fn(*args)`` (a multiply-add counts 2): XLA's cost analysis of the program lowered on the
    arguments' shapes (arrays or ``jax.ShapeDtypeStruct``; nothing is compiled or computed), with attention in one
    piece (:data:`sdjax.attention.MAX_ATTENTION_SCORES` off) so that no loop hides FLOPs."""
    from sdjax import attention

    saved, attention.MAX_ATTENTION_SCORES = attention.MAX_ATTENTION_SCORES, None
    try:
        return float((jax.jit(fn).lower(*args).cost_analysis() or {}).get("flops", float("nan")))
    finally:
        attention.MAX_ATTENTION_SCORES = saved


def unet_flops(config: UNetConfig, height: int, width: int, *, batch: int = 1, context_length: int = 77) -> float:
    """FLOPs of one evaluation of a UNet of ``config`` on a (batch, height, width, in_channels) latent (and a
    context of ``context_length`` tokens when it cross-attends), from its shapes alone (:func:`count_flops`)."""
    graphdef, state = nnx.split(convert.abstract(UNet2D, config))
    sds = jax.ShapeDtypeStruct
    x, t = sds((batch, height, width, config.in_channels), jnp.float32), sds((batch,), jnp.float32)
    context = None
    if config.cross_attention_dim is not None:
        context = sds((batch, context_length, config.cross_attention_dim), jnp.float32)
    return count_flops(lambda state, x, t, c: nnx.merge(graphdef, state)(x, t, c), state, x, t, context)


def nested_unet_flops(config, levels: int | None = None, *, batch: int = 1, context_length: int = 77) -> float:
    """FLOPs of one evaluation of a :class:`sdjax.models.nested_unet.NestedUNet` of ``config`` on its first ``levels``
    resolutions (default all), from its shapes alone (:func:`count_flops`)."""
    from sdjax.models.nested_unet import NestedUNet

    graphdef, state = nnx.split(convert.abstract(NestedUNet, config))
    sds, core = jax.ShapeDtypeStruct, config.core
    res = config.resolutions[: levels or len(config.resolutions)]
    xs = [sds((batch, r, r, core.in_channels), jnp.float32) for r in res]
    t = sds((batch,), jnp.float32)
    context = None if core.cross_attention_dim is None else sds((batch, context_length, core.cross_attention_dim),
                                                                 jnp.float32)  # fmt: skip
    return count_flops(lambda state, xs, t, c: nnx.merge(graphdef, state)(xs, t, c), state, xs, t, context)
