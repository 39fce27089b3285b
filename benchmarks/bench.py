"""sdjax against diffusers (PyTorch) on the same machine, in one run, with the same random weights.

    python benchmarks/bench.py --size sd15                  # on a GPU: SD1.5's shapes, 512², bfloat16
    python benchmarks/bench.py --size tiny                  # on a CPU: a tiny SD, float32, a few minutes

(``--no-processes`` / ``--processes-only`` split a run in two, each part with its own report.)

One invocation builds Stable Diffusion with random weights in sdjax (:func:`sdjax.speed.random_components`),
converts the very same weights to diffusers' ``UNet2DConditionModel``, ``AutoencoderKL`` and transformers'
``CLIPTextModel`` (:mod:`sdjax.convert`'s names and layouts, checked by comparing one UNet output), and
times, on every side:

- the UNet forward at batch 2 (one CFG pair) and batch 16;
- txt2img, K steps (50) of DDIM with classifier-free guidance (w = 7.5), batch 1 and batch 8, text
  encoding and VAE decoding included, images returned to the host as NumPy arrays;
- the VAE decoding of one image;
- one training step of the UNet: AdamW, batch 8, float32 master weights with the forward and backward
  in the benchmark's dtype (sdjax casts the parameters inside the loss; PyTorch uses autocast), the
  diffusion loss on random latents (64² for SD1.5) and random text states (diffusers eager only);
- the first txt2img call of this process (compilation included), and in new processes the time to the
  first image with an empty and with a warm persistent compilation cache;
- on a GPU, each side's peak memory for one image at 512², 512×1024 and 1024² (SD1.5), each in a fresh
  process: jax's allocator peak (``memory_stats()["peak_bytes_in_use"]``, with preallocation off) and
  ``torch.cuda.max_memory_allocated``. On a CPU: n/a.

Timing: every measure is called once untimed (compilation, autotuning, caches), then ``--reps`` times;
the table gives the median, the min–max and the number of reps. GPU work is waited for before the
clock stops (``block_until_ready``, ``torch.cuda.synchronize``).

Utilisation: FLOPs come from XLA's cost analysis of sdjax's programs lowered on abstract shapes
(:func:`count_flops`; a multiply-add counts 2); the networks are the same on both sides, so the same count
divides each side's time. txt2img's count is composed from its parts, K · F_UNet(2N) + F_VAE(N), since the
cost analysis does not multiply a loop's body by its trip count. The ceiling is the best of a large matrix
product timed with jax and with torch in the benchmark's dtype.

Writes the markdown report to ``--out`` (default benchmarks/RESULTS.md on a GPU, RESULTS-cpu-tiny.md on a
CPU) and prints it; ``--raw`` keeps every result as JSON, rewritten after each measure.
"""

from __future__ import annotations

import os

# Before jax starts: allocate GPU memory as needed rather than 75 % up front, so torch can share the GPU
# and jax's peak-memory statistic means what it says.
os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")

import argparse  # noqa: E402
import dataclasses  # noqa: E402
import datetime  # noqa: E402
import functools  # noqa: E402
import gc  # noqa: E402
import json  # noqa: E402
import platform  # noqa: E402
import shlex  # noqa: E402
import statistics  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
import traceback  # noqa: E402
from collections.abc import Callable  # noqa: E402
from pathlib import Path  # noqa: E402

START = time.perf_counter()
PROMPT = "a photograph of an astronaut riding a horse on the moon"
GUIDANCE = 7.5
SIZES = {  # image size, training latent size, the sizes whose peak memory is measured (GPU)
    "sd15": dict(image=512, train_latent=64, memory=[(512, 512), (512, 1024), (1024, 1024)]),
    "tiny": dict(image=64, train_latent=8, memory=[(64, 64)]),
}
DTYPES = ("float32", "bfloat16", "float16")
# the targets for SD1.5 at 512² on one GPU (evaluated only for --size sd15 on a GPU)
TARGETS = {"unet_16_util": 0.60, "warm": 5.0}  # the absolute ones; the rest are ratios to diffusers (targets())


# ---------------------------------------------------------------------------------------------------
# Timing
# ---------------------------------------------------------------------------------------------------


@dataclasses.dataclass
class Timing:
    """Seconds of the first (untimed-for-the-median) call and of each timed rep."""

    first: float
    reps: list[float]

    @property
    def median(self) -> float:
        return statistics.median(self.reps)


def time_calls(fn: Callable[[], object], reps: int) -> Timing:
    """Call ``fn`` once (warm-up: compilation, autotuning), then ``reps`` times; each call must return
    only when its work is done."""
    t = time.perf_counter()
    fn()
    first = time.perf_counter() - t
    times = []
    for _ in range(reps):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return Timing(first, times)


# ---------------------------------------------------------------------------------------------------
# The two sides
# ---------------------------------------------------------------------------------------------------


def build_components(args):
    """The random-weight model in float32, in host memory (both sides are made from it)."""
    import jax

    from sdjax.speed import random_components

    with jax.default_device(jax.devices("cpu")[0]):
        return random_components(args.size, seed=0)


class Sdjax:
    """sdjax's pipeline and networks on jax's default device."""

    def __init__(self, components, args, attention: str):
        import jax
        import jax.numpy as jnp
        from flax import nnx

        from sdjax import StableDiffusion
        from sdjax.nn import set_attention_implementation

        self.name = "sdjax" if attention == "auto" else f"sdjax ({attention} attention)"
        self.args, self.dtype = args, jnp.dtype(args.dtype)
        self.device = jax.devices()[0]
        self.fp32 = components  # the training step's master weights
        half = components.astype(self.dtype)  # new modules (and arrays unless float32): set apart per column
        for module in (half.unet, half.vae, half.text_encoder):
            set_attention_implementation(module, attention)
            nnx.update(module, jax.device_put(nnx.state(module), self.device))
        self.pipe = StableDiffusion(half)
        self.pipe.progress, self.pipe.devices = False, [self.device]  # one device, as diffusers uses
        self.attention_kernels: dict[str, dict[str, int]] = {}

    def unet(self, batch: int):
        import jax
        import jax.numpy as jnp
        from flax import nnx

        unet = self.pipe.unet
        h = self.args.latent
        key = jax.random.PRNGKey(1)
        x = jax.random.normal(key, (batch, h, h, unet.config.in_channels), self.dtype)
        t = jnp.full((batch,), 500, jnp.int32)
        context = jax.random.normal(key, (batch, 77, unet.config.cross_attention_dim), self.dtype)
        graphdef, state = nnx.split(unet)
        f = jax.jit(lambda s, x, t, c: nnx.merge(graphdef, s)(x, t, c)).lower(state, x, t, context).compile()
        self.attention_kernels[f"unet_{batch}"] = cudnn_attention_calls(f.as_text())
        return lambda: jax.block_until_ready(f(state, x, t, context))

    def unet_output(self, x, t, context, *, float32: bool = False):
        """The UNet on NumPy inputs (NHWC) → float32 NumPy, for the checks: at the benchmark dtype, or
        the float32 master weights (``float32=True``)."""
        import jax
        import jax.numpy as jnp
        import numpy as np
        from flax import nnx

        unet, dtype = (self.fp32.unet, jnp.float32) if float32 else (self.pipe.unet, self.dtype)
        graphdef, state = nnx.split(unet)
        forward = jax.jit(lambda s, x, t, c: nnx.merge(graphdef, s)(x, t, c).astype(jnp.float32))
        state = jax.device_put(state, self.device)
        return np.asarray(forward(state, jnp.asarray(x, dtype), jnp.asarray(t), jnp.asarray(context, dtype)))

    def reset_peak(self) -> None:
        """jax keeps one peak per process: :meth:`peak_bytes` is the peak so far, not since a reset."""

    def peak_bytes(self) -> int | None:
        """jax's allocator peak of this process so far (None on a CPU)."""
        return (self.device.memory_stats() or {}).get("peak_bytes_in_use")

    def txt2img(self, batch: int):
        kwargs = dict(num_inference_steps=self.args.steps, guidance_scale=GUIDANCE, scheduler="ddim", output_type="np")
        return lambda: self.pipe([PROMPT] * batch, **kwargs)

    def vae_decode(self):
        import jax
        from flax import nnx

        vae = self.pipe.vae
        z = jax.random.normal(jax.random.PRNGKey(2), (1, self.args.latent, self.args.latent, 4), self.dtype)
        graphdef, state = nnx.split(vae)
        f = jax.jit(lambda s, z: nnx.merge(graphdef, s).decode(z)).lower(state, z).compile()
        return lambda: jax.block_until_ready(f(state, z))

    def train_step(self):
        """sdjax.train's jitted step on the float32 UNet, the loss computed in the benchmark's dtype."""
        import jax
        import jax.numpy as jnp
        import optax
        from flax import nnx

        from sdjax.schedulers import q_sample
        from sdjax.train import create_train_state, make_train_step

        dtype, schedule = self.dtype, self.pipe.schedule

        def loss_fn(model, batch, key):
            graphdef, params, rest = nnx.split(model, nnx.Param, ...)
            model = nnx.merge(graphdef, jax.tree.map(lambda p: p.astype(dtype), params), rest)
            key_t, key_eps = jax.random.split(key)
            x0 = batch["latents"]
            t = jax.random.randint(key_t, (len(x0),), 0, schedule.num_train_timesteps)
            eps = jax.random.normal(key_eps, x0.shape, jnp.float32)
            x_t = q_sample(schedule, x0, t, eps).astype(dtype)
            prediction = model(x_t, t, batch["context"].astype(dtype)).astype(jnp.float32)
            return jnp.mean((prediction - eps) ** 2), {}

        with jax.default_device(self.device):
            unet = self.fp32.unet
            optimizer = optax.adamw(1e-5, weight_decay=1e-2)
            graphdef, state, frozen = create_train_state(unet, optimizer, 0, None)
            state, frozen = jax.device_put((state, frozen), self.device)
            n, h = self.args.train_batch, self.args.train_latent
            key = jax.random.PRNGKey(3)
            batch = {
                "latents": jax.random.normal(key, (n, h, h, 4)),
                "context": jax.random.normal(key, (n, 77, unet.config.cross_attention_dim)),
            }
        step = make_train_step(graphdef, loss_fn, optimizer, None).lower(state, batch, frozen).compile()
        holder = {"state": state}

        def run():
            holder["state"], metrics = step(holder["state"], batch, frozen)
            jax.block_until_ready(metrics["loss"])

        return run


class Diffusers:
    """diffusers' StableDiffusionPipeline on the same weights, eager or under ``torch.compile``."""

    def __init__(self, components, args, compile_mode: str | None, shared: Diffusers | None = None):
        import torch

        self.name = "diffusers" if compile_mode is None else f"diffusers (torch.compile {compile_mode})"
        self.args, self.compile_mode = args, compile_mode
        self.device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        self.dtype = getattr(torch, args.dtype)
        self.fp32 = components
        self.pipe = shared.pipe if shared is not None else to_diffusers(components, self.device, self.dtype)
        self.unet_module = self.pipe.unet if compile_mode is None else torch.compile(self.pipe.unet, mode=compile_mode)
        self.flops: dict[str, float] = {}

    def sync(self):
        import torch

        if self.device.type == "cuda":
            torch.cuda.synchronize()

    def reset_peak(self) -> None:
        import torch

        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats()

    def peak_bytes(self) -> int | None:
        """torch's allocator peak since :meth:`reset_peak` (None on a CPU)."""
        import torch

        return torch.cuda.max_memory_allocated() if self.device.type == "cuda" else None

    def unet(self, batch: int):
        import torch

        cfg = self.pipe.unet.config
        gen = torch.Generator().manual_seed(1)
        h = self.args.latent
        x = torch.randn(batch, cfg.in_channels, h, h, generator=gen).to(self.device, self.dtype)
        t = torch.full((batch,), 500, device=self.device)
        context = torch.randn(batch, 77, cfg.cross_attention_dim, generator=gen).to(self.device, self.dtype)

        @torch.inference_mode()
        def run():
            self.unet_module(x, t, encoder_hidden_states=context)
            self.sync()

        return run

    def unet_output(self, x, t, context):
        import numpy as np
        import torch

        with torch.inference_mode():
            out = self.pipe.unet(
                torch.from_numpy(np.ascontiguousarray(x.transpose(0, 3, 1, 2))).to(self.device, self.dtype),
                torch.from_numpy(t).to(self.device),
                encoder_hidden_states=torch.from_numpy(context).to(self.device, self.dtype),
            ).sample
        return out.float().cpu().numpy().transpose(0, 2, 3, 1)

    def txt2img(self, batch: int):
        import torch

        def run():
            original, self.pipe.unet = self.pipe.unet, self.unet_module
            try:
                self.pipe(
                    [PROMPT] * batch,
                    num_inference_steps=self.args.steps,
                    guidance_scale=GUIDANCE,
                    output_type="np",
                    generator=torch.Generator(self.device).manual_seed(0),
                )
            finally:
                self.pipe.unet = original
            self.sync()

        return run

    def vae_decode(self):
        import torch

        gen = torch.Generator().manual_seed(2)
        z = torch.randn(1, 4, self.args.latent, self.args.latent, generator=gen).to(self.device, self.dtype)

        @torch.inference_mode()
        def run():
            self.pipe.vae.decode(z)
            self.sync()

        return run

    def train_step(self):
        """A float32 copy of the UNet, AdamW, the forward and backward under autocast to the dtype."""
        import diffusers
        import torch
        import torch.nn.functional as F

        unet = diffusers.UNet2DConditionModel.from_config(self.pipe.unet.config)
        unet.load_state_dict(torch_state(self.fp32.unet))
        unet = unet.to(self.device).train()
        optimizer = torch.optim.AdamW(unet.parameters(), lr=1e-5, weight_decay=1e-2)
        alphas_cumprod = self.pipe.scheduler.alphas_cumprod.to(self.device)
        n, h = self.args.train_batch, self.args.train_latent
        gen = torch.Generator().manual_seed(3)
        x0 = torch.randn(n, 4, h, h, generator=gen).to(self.device)
        context = torch.randn(n, 77, self.pipe.unet.config.cross_attention_dim, generator=gen).to(self.device)
        autocast = self.dtype != torch.float32

        def run():
            t = torch.randint(0, len(alphas_cumprod), (n,), device=self.device)
            eps = torch.randn_like(x0)
            a = alphas_cumprod[t].view(n, 1, 1, 1)
            x_t = a.sqrt() * x0 + (1 - a).sqrt() * eps
            with torch.autocast(self.device.type, dtype=self.dtype, enabled=autocast):
                prediction = unet(x_t, t, encoder_hidden_states=context).sample
            loss = F.mse_loss(prediction.float(), eps)
            loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            self.sync()

        return run


def free_torch_memory() -> None:
    """Hand torch's cached GPU blocks back, so new processes find the memory free."""
    import torch

    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def torch_state(module) -> dict:
    """An sdjax module's parameters as a torch state dict (:func:`sdjax.convert.state_dict`)."""
    import numpy as np
    import torch

    from sdjax import convert

    return {name: torch.from_numpy(np.array(array)) for name, array in convert.state_dict(module).items()}


def to_diffusers(components, device, dtype):
    """The same networks as diffusers/transformers modules, in a StableDiffusionPipeline with DDIM."""
    import diffusers
    import transformers

    unet = diffusers.UNet2DConditionModel.from_config(components.unet.config.to_diffusers())
    unet.load_state_dict(torch_state(components.unet))
    vae = diffusers.AutoencoderKL.from_config(components.vae.config.to_diffusers() | {"force_upcast": False})
    vae.load_state_dict(torch_state(components.vae))
    text = transformers.CLIPTextModel(
        transformers.CLIPTextConfig(**dataclasses.asdict(components.text_encoder.config))
    )
    prefix = "text_model." if any(k.startswith("text_model.") for k in text.state_dict()) else ""  # transformers < 5
    weights = {prefix + k: v for k, v in torch_state(components.text_encoder).items()}
    missing, unexpected = text.load_state_dict(weights, strict=False)
    if unexpected or [k for k in missing if not k.endswith("position_ids")]:
        raise RuntimeError(f"text encoder conversion: missing {missing}, unexpected {unexpected}")
    with tempfile.TemporaryDirectory() as folder:
        components.tokenizer.save_folder(folder)
        tokenizer = transformers.CLIPTokenizer.from_pretrained(folder)
    pipe = diffusers.StableDiffusionPipeline(
        vae=vae,
        text_encoder=text,
        tokenizer=tokenizer,
        unet=unet,
        scheduler=diffusers.DDIMScheduler.from_config(components.scheduler_config),
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    ).to(device, dtype)
    pipe.set_progress_bar_config(disable=True)
    return pipe


# ---------------------------------------------------------------------------------------------------
# Machine facts: device, versions, the matmul ceiling
# ---------------------------------------------------------------------------------------------------


def machine() -> dict:
    import diffusers
    import flax
    import jax
    import jaxlib
    import torch
    import transformers

    device = jax.devices()[0]
    facts = {
        "date": datetime.datetime.now().strftime("%Y-%m-%d %H:%M"),
        "jax device": f"{device.device_kind} ({device.platform}, {jax.device_count()} device(s))",
        "torch device": torch.cuda.get_device_name() if torch.cuda.is_available() else f"cpu ({os.cpu_count()} cores)",
        "cpu": f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores",
        "python": platform.python_version(),
        "jax / jaxlib / flax": f"{jax.__version__} / {jaxlib.__version__} / {flax.__version__}",
        "torch / diffusers / transformers": " / ".join(m.__version__ for m in (torch, diffusers, transformers)),
    }
    if torch.cuda.is_available():
        facts["CUDA / cuDNN (torch)"] = f"{torch.version.cuda} / {torch.backends.cudnn.version()}"
    settings = [f"{k}={os.environ[k]}" for k in ("OMP_NUM_THREADS", "XLA_FLAGS") if os.environ.get(k)]
    facts["environment"] = ", ".join(settings) or "no OMP_NUM_THREADS or XLA_FLAGS set"
    return facts


def matmul_ceiling(dtype: str, on_gpu: bool) -> dict[str, float]:
    """FLOP/s of an n×n by n×n product in ``dtype`` (n = 8192 on a GPU, 1024 on a CPU), jax and torch."""
    import jax
    import jax.numpy as jnp
    import torch

    n = 8192 if on_gpu else 1024
    flops = 2 * n**3
    a = jax.random.normal(jax.random.PRNGKey(0), (n, n), jnp.dtype(dtype))
    f = jax.jit(lambda a: a @ a)
    jax_t = time_calls(lambda: jax.block_until_ready(f(a)), 10)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    b = torch.randn(n, n, device=device, dtype=getattr(torch, dtype))

    def torch_mm():
        b @ b
        if device == "cuda":
            torch.cuda.synchronize()

    torch_t = time_calls(torch_mm, 10)
    return {"jax": flops / min(jax_t.reps), "torch": flops / min(torch_t.reps)}


def count_flops(args) -> dict[str, float]:
    """FLOPs per call of each measure (a multiply-add counts 2), the same for both sides: XLA's cost
    analysis of sdjax's programs lowered on abstract shapes (``benchmarks/memory.py``'s models, nothing
    compiled or allocated, a second or two for SD1.5), with XLA's attention in one piece so that no loop
    hides FLOPs. Not the compiled GPU program's analysis: that leaves out the convolutions and matmuls XLA
    hands to cuDNN and cuBLAS (it gave 131 GFLOP for SD1.5's batch-2 UNet pass on the H200, and 231 for
    batch 16, against 1,581 and 12,649 here). txt2img is composed as K · F_UNet(2N) + F_VAE(N) (the text
    encoder's share, under 0.1 % for SD1.5, left out); training is value_and_grad of the loss (the AdamW
    update, a few FLOPs per parameter, left out)."""
    import jax
    import jax.numpy as jnp
    from flax import nnx

    from sdjax import attention
    from sdjax.models.unet import UNet2D
    from sdjax.models.vae import AutoencoderKL
    from sdjax.speed import CONFIGS

    sys.path.insert(0, str(Path(__file__).parent))
    from memory import abstract_model

    dtype, sds = jnp.dtype(args.dtype), jax.ShapeDtypeStruct
    unet_cfg, vae_cfg, _ = CONFIGS[args.size]
    unet_graph, unet_state = abstract_model(UNet2D, unet_cfg, dtype, "xla")
    vae_graph, vae_state = abstract_model(AutoencoderKL, vae_cfg, dtype, "xla")

    def flops(fn, *abstract) -> float:
        return float((jax.jit(fn).lower(*abstract).cost_analysis() or {}).get("flops", float("nan")))

    def unet_inputs(n: int, h: int):
        return (sds((n, h, h, unet_cfg.in_channels), dtype), sds((n,), jnp.int32),
                sds((n, 77, unet_cfg.cross_attention_dim), dtype))  # fmt: skip

    def loss(state, x, t, context):
        return jnp.mean(nnx.merge(unet_graph, state)(x, t, context).astype(jnp.float32) ** 2)

    forward = lambda s, x, t, c: nnx.merge(unet_graph, s)(x, t, c)  # noqa: E731
    saved, attention.MAX_ATTENTION_SCORES = attention.MAX_ATTENTION_SCORES, None
    try:
        out = {f"unet_{n}": flops(forward, unet_state, *unet_inputs(n, args.latent)) for n in (2, 16)}
        latents = sds((1, args.latent, args.latent, vae_cfg.latent_channels), dtype)
        out["vae"] = flops(lambda s, z: nnx.merge(vae_graph, s).decode(z), vae_state, latents)
        train_inputs = unet_inputs(args.train_batch, args.train_latent)
        out["train"] = flops(jax.value_and_grad(loss), unet_state, *train_inputs)
    finally:
        attention.MAX_ATTENTION_SCORES = saved
    for n in (1, 8):  # K · F_UNet(2N) + F_VAE(N)
        out[f"txt2img_{n}"] = args.steps * out["unet_2"] * n + out["vae"] * n
    return out


def cudnn_attention_calls(hlo: str) -> dict[str, int]:
    """How many of a compiled program's attentions run as cuDNN's fused kernel: custom calls to
    ``__cudnn$fmha…`` in the optimised HLO, and how many of those take the 77 text tokens as keys (the
    cross-attentions). SD1.5's UNet has 16 transformer blocks, so 32 attentions, 16 of them cross."""
    calls = [line for line in hlo.splitlines() if 'custom_call_target="__cudnn$fmha' in line]
    return {"fused": len(calls), "cross": sum(",77," in line for line in calls)}


def probe_cudnn(dtype: str) -> str | None:
    """None if jax's cuDNN attention runs SD1.5's shapes (self-attention at 4,096 tokens, head dims 40 and
    160, cross-attention to 77 tokens, forward and backward); else the error, so the run can fall back
    to XLA's attention instead of losing every sdjax measure."""
    import jax
    import jax.numpy as jnp

    try:
        for tq, tk, d in ((4096, 4096, 40), (4096, 77, 40), (256, 77, 160)):
            q = jax.random.normal(jax.random.PRNGKey(0), (2, tq, 8, d), jnp.dtype(dtype))
            k = jax.random.normal(jax.random.PRNGKey(1), (2, tk, 8, d), jnp.dtype(dtype))
            f = jax.jit(jax.grad(lambda q, k: jax.nn.dot_product_attention(q, k, k, implementation="cudnn")
                                 .astype(jnp.float32).sum()))  # fmt: skip
            jax.block_until_ready(f(q, k))
    except Exception as error:  # noqa: BLE001 (any failure means: do not rely on it in this run)
        return f"{type(error).__name__}: {(str(error).splitlines() or [''])[0][:160]}"
    return None


# ---------------------------------------------------------------------------------------------------
# New processes: time to first image (compilation cache cold and warm) and peak memory
# ---------------------------------------------------------------------------------------------------


def parse_images(text: str) -> list[tuple[int, int, bool]]:
    """'512x512,1024x1024t' → [(512, 512, False), (1024, 1024, True)]: a trailing t turns the tiled VAE on."""
    return [(*map(int, item.rstrip("t").split("x")), item.endswith("t")) for item in text.split(",") if item]


def child(args) -> None:
    """``--child SIDE --images HxW[t],…``: build the model, then make one image (batch 1) at each size in
    turn (``t``: with the tiled VAE), printing a JSON line after each: seconds to that image (the first
    call at its size, so compilation included), seconds since the process started, and the side's peak
    device memory (None on a CPU). torch's peak is reset before each image; jax's is the process's peak
    so far, so list the sizes from the smallest need to the largest."""
    if args.child == "sdjax" and args.cache_dir:
        from sdjax.speed import enable_compilation_cache

        enable_compilation_cache(args.cache_dir)
    components = build_components(args)
    side = Sdjax(components, args, "auto") if args.child == "sdjax" else Diffusers(components, args, None)
    del components
    gc.collect()
    for height, width, tiled in parse_images(args.images):
        size = dict(height=height, width=width)
        if args.child == "sdjax":
            side.pipe.enable_vae_tiling() if tiled else side.pipe.disable_vae_tiling()
            kwargs = dict(num_inference_steps=args.steps, guidance_scale=GUIDANCE, scheduler="ddim", output_type="np")
            run = functools.partial(side.pipe, [PROMPT], **size, **kwargs)
        else:
            side.pipe.vae.enable_tiling() if tiled else side.pipe.vae.disable_tiling()
            generate = functools.partial(side.pipe, [PROMPT], **size, num_inference_steps=args.steps,
                                         guidance_scale=GUIDANCE, output_type="np")  # fmt: skip
            run = functools.partial(lambda generate: (generate(), side.sync()), generate)

        side.reset_peak()
        t = time.perf_counter()
        try:
            run()
            result = {"first_image_s": time.perf_counter() - t, "process_s": time.perf_counter() - START,
                      "peak_bytes": side.peak_bytes()}  # fmt: skip
        except Exception as error:  # out of memory at one size: report it, try the next
            result = {"error": f"{type(error).__name__}: {(str(error).splitlines() or [''])[0][:200]}"}
        size = f"{height}²" if height == width else f"{height}×{width}"
        print("RESULT " + json.dumps({"size": size, "tiled": tiled, **result}), flush=True)
        gc.collect()
        free_torch_memory() if args.child == "diffusers" else None


def run_child(args, side: str, images: str, cache_dir: str | None) -> list[dict]:
    """One :func:`child` in a new Python process: its results, one per image, and an {"error": …} for
    those it did not reach when it fails (e.g. out of memory, killed)."""
    command = [sys.executable, __file__, "--child", side, "--size", args.size, "--dtype", args.dtype,
               "--steps", str(args.steps), "--images", images]  # fmt: skip
    if cache_dir:
        command += ["--cache-dir", cache_dir]
    done = subprocess.run(command, capture_output=True, text=True)
    lines = done.stdout.splitlines()
    results = [json.loads(line.removeprefix("RESULT ")) for line in lines if line.startswith("RESULT ")]
    tail = (done.stderr.strip().splitlines() or ["no output"])[-1]
    for height, width, tiled in parse_images(images)[len(results) :]:
        size = f"{height}²" if height == width else f"{height}×{width}"
        results.append({"size": size, "tiled": tiled, "error": f"exit {done.returncode}: {tail[:200]}"})
    return results


# ---------------------------------------------------------------------------------------------------
# The report
# ---------------------------------------------------------------------------------------------------


def cell(timing: Timing | None, per: int | None = None, unit: str = "ms") -> str:
    """'median (min–max, n reps)': in ms, or in images/s when ``per`` images are made per call."""
    if timing is None:
        return "–"
    if per is None:
        scale = 1000.0 if unit == "ms" else 1.0
        values = [t * scale for t in timing.reps]
        return f"{statistics.median(values):.4g} ({min(values):.4g}–{max(values):.4g}, {len(values)})"
    rates = [per / t for t in timing.reps]
    return f"{statistics.median(rates):.4g} ({min(rates):.4g}–{max(rates):.4g}, {len(rates)})"


def gib(n: float | None) -> str:
    return "n/a" if n is None else f"{n / 2**30:.2f} GiB"


@dataclasses.dataclass
class InProcess:
    """What :func:`in_process` measured: each column's {measure: Timing}, FLOPs per call, and the checks."""

    results: dict[str, dict[str, Timing]]
    flops: dict[str, float]
    parity: float
    low_precision: float | None
    recompiles: int | None
    failed: dict[tuple[str, str], str] = dataclasses.field(default_factory=dict)  # (column, measure): error
    peaks: dict[str, int | None] = dataclasses.field(default_factory=dict)  # column: peak bytes after training
    attention: dict[str, dict[str, int]] = dataclasses.field(default_factory=dict)  # unet_N: cuDNN call counts
    notes: list[str] = dataclasses.field(default_factory=list)


def report(args, facts, ceiling, measured: InProcess | None, children: list) -> str:
    """The markdown report of what was run (the in-process measures, the new processes, or both)."""
    steps = args.steps
    rows = [
        ("UNet forward, batch 2 (one CFG pair), ms", "unet_2", None),
        ("UNet forward, batch 16, ms", "unet_16", None),
        (f"txt2img {steps} steps + CFG, batch 1, ms per image", "txt2img_1", None),
        (f"txt2img {steps} steps + CFG, batch 8, images/s", "txt2img_8", 8),
        ("VAE decode, 1 image, ms", "vae", None),
        (f"training step (AdamW, batch {args.train_batch}, {args.train_latent}² latents), images/s", "train",
         args.train_batch),
    ]  # fmt: skip
    lines = [
        f"# sdjax vs diffusers: `{args.size}`, {args.dtype}, {facts['jax device']}",
        "",
        f"`{args.command}`",
        "",
        "| | |",
        "|---|---|",
        *[f"| {k} | {v} |" for k, v in facts.items()],
        f"| model | `{args.size}` random weights (sdjax.speed.random_components), the same on both sides |",
        f"| images | {args.image}², latents {args.latent}², DDIM, guidance {GUIDANCE} |",
    ]
    best = max(ceiling.values())
    if measured is not None:
        results, flops = measured.results, measured.flops
        names = list(results)
        lines += [
            "",
            "Each cell: median (min–max, reps). The first call of each measure is not in the median (compile,",
            "autotune); it is the 'first call' row for txt2img.",
            "",
            "| measure | " + " | ".join(names) + " |",
            "|---|" + "---|" * len(names),
        ]
        for label, key, per in rows:
            cells = ["failed" if (n, key) in measured.failed else cell(results[n].get(key), per) for n in names]
            lines.append(f"| {label} | " + " | ".join(cells) + " |")
        first = [results[n].get("txt2img_1") for n in names]
        lines.append("| first txt2img call in this process (compile included), s | " + " | ".join(
            "–" if t is None else f"{t.first:.3g}" for t in first) + " |")  # fmt: skip
        lines += [
            "",
            f"FLOPs: XLA's cost analysis of sdjax's programs lowered on abstract shapes (count_flops; the same "
            f"networks on both sides); txt2img composed as {steps} · F_UNet(2N) + F_VAE(N). Ceiling: an n×n "
            f"matmul in {args.dtype}, "
            f"jax {ceiling['jax'] / 1e12:.4g} TFLOP/s, torch {ceiling['torch'] / 1e12:.4g} TFLOP/s; "
            "utilisation = FLOPs / median time / the better of the two.",
            "",
            "| measure | GFLOP per call | " + " | ".join(f"{n} TFLOP/s (% of ceiling)" for n in names) + " |",
            "|---|---|" + "---|" * len(names),
        ]
        for label, key, _ in rows:
            cells = []
            for n in names:
                t = results[n].get(key)
                rate = flops[key] / t.median if t else None
                cells.append("–" if rate is None else f"{rate / 1e12:.3g} ({100 * rate / best:.1f} %)")
            lines.append(f"| {label.rsplit(',', 1)[0]} | {flops[key] / 1e9:.4g} | " + " | ".join(cells) + " |")
        low = measured.low_precision
        lines += [
            "",
            f"Same weights: the UNet's output on one input, sdjax vs diffusers at {args.dtype}: max |Δ| / max |ref| "
            f"= {measured.parity:.2e}." + ("" if low is None else f" sdjax at {args.dtype} vs float32: {low:.2e}."),
            f"Compilations during a second txt2img call with the same shapes (sdjax): {measured.recompiles}.",
        ]
        if measured.peaks:
            lines.append("Peak device memory of the training step: " + "; ".join(
                f"{n} {gib(b)}" for n, b in measured.peaks.items()) + " (jax: the process's peak so far; torch: "
                "since the step's model was built).")  # fmt: skip
        for key, calls in measured.attention.items():
            lines.append(f"sdjax's compiled {key}: {calls['fused']} attentions on cuDNN's fused kernel, "
                         f"{calls['cross']} of them cross-attentions to the 77 text tokens (SD1.5: 32, 16 cross).")
        lines += [note.rstrip(".") + "." for note in measured.notes]
        if measured.failed:
            lines += ["", "Failed measures (the traceback is in this run's stderr):", ""]
            lines += [f"- {name}, {key}: `{error}`" for (name, key), error in measured.failed.items()]
    if children:
        lines += ["", "New processes, one image at batch 1 (the model built first, not timed):", ""]
        lines += ["| process | size | time to first image, s | whole process, s | peak device memory |"]
        lines += ["|---|---|---|---|---|"]
        for label, size, out in children:
            if "error" in out:
                lines.append(f"| {label} | {size} | failed: {out['error']} | | |")
            else:
                first, whole = out["first_image_s"], out["process_s"]
                lines.append(f"| {label} | {size} | {first:.3g} | {whole:.3g} | {gib(out['peak_bytes'])} |")
    lines += ["", *targets(args, measured, best, children)]
    return "\n".join(lines) + "\n"


def targets(args, measured: InProcess | None, best: float, children: list) -> list[str]:
    """The issue's targets (issue 18), met or not: ratios to diffusers in the same run, so they hold on any
    GPU. SD1.5 on a GPU only; "n/a" where a measure it needs failed or was not reached."""
    if args.size != "sd15" or not args.on_gpu:
        return ["Targets: the issue's targets are for SD1.5 at 512² on a GPU; not evaluated for this run."]
    rows, name = [], "sdjax"

    def ratio_row(target: str, ours: float | None, theirs: float | None, unit: str, least: float, higher=True):
        """sdjax's figure against the competitor's: met when ours / theirs ≥ least (higher is better) or
        theirs / ours ≥ least (lower is better, e.g. ms)."""
        if ours is None or theirs is None:
            shown = " vs ".join("not measured" if v is None else f"{v:.4g} {unit}" for v in (ours, theirs))
            return target, shown, None
        factor = ours / theirs if higher else theirs / ours
        return target, f"{ours:.4g} vs {theirs:.4g} {unit} ({factor:.2f}×)", factor >= least

    if measured is not None:
        results = measured.results
        name = next(n for n in results if n.startswith("sdjax"))  # --attention's first choice

        def median(column: str | None, key: str, per: int | None = None) -> float | None:
            """ms per call, or images/s when ``per`` images are made per call; None if not measured."""
            timing = results.get(column, {}).get(key) if column else None
            return None if timing is None else (per / timing.median if per else 1000 * timing.median)

        compiled = next((n for n in results if n.startswith("diffusers (torch.compile")), None)
        peaks = measured.peaks
        train_rows = ratio_row(f"training ≥ 1.5× diffusers' images/s (batch {args.train_batch})",
                               median(name, "train", args.train_batch), median("diffusers", "train", args.train_batch),
                               "images/s", 1.5)  # fmt: skip
        ours_peak, their_peak = peaks.get(name), peaks.get("diffusers")
        memory_ok = None if None in (ours_peak, their_peak) else ours_peak <= their_peak
        util = None
        if median(name, "unet_16") is not None:
            util = 100 * measured.flops["unet_16"] / (median(name, "unet_16") / 1000) / best
        rows += [
            ratio_row("txt2img batch 1 ≥ 2.5× faster than diffusers eager", median(name, "txt2img_1"),
                      median("diffusers", "txt2img_1"), "ms", 2.5, higher=False),
            ratio_row("txt2img batch 1 faster than torch.compile", median(name, "txt2img_1"),
                      median(compiled, "txt2img_1"), "ms", 1.0, higher=False),
            ratio_row("txt2img batch 8 ≥ 1.3× diffusers compiled", median(name, "txt2img_8", 8),
                      median(compiled, "txt2img_8", 8), "images/s", 1.3),
            ("UNet batch 16 ≥ 60 % of the matmul ceiling", "not measured" if util is None else f"{util:.1f} %",
             None if util is None else util >= 100 * TARGETS["unet_16_util"]),
            train_rows,
            ("training at no more memory than diffusers", f"{gib(ours_peak)} vs {gib(their_peak)}", memory_ok),
        ]  # fmt: skip
    if children:
        warm = next((out.get("first_image_s") for label, size, out in children if label == "sdjax, warm cache"), None)
        shown = "not measured" if warm is None else f"{warm:.1f} s"
        rows.append((f"warm-cache start ≤ {TARGETS['warm']:.0f} s to the first image", shown,
                     None if warm is None else warm <= TARGETS["warm"]))  # fmt: skip

    def verdict(ok: bool | None) -> str:
        return "n/a" if ok is None else ("met" if ok else "**not met**")

    return [f"| target | {name} | verdict |", "|---|---|---|", *[f"| {a} | {b} | {verdict(c)} |" for a, b, c in rows]]


# ---------------------------------------------------------------------------------------------------
# Main
# ---------------------------------------------------------------------------------------------------


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size", choices=sorted(SIZES), default="tiny")
    parser.add_argument("--dtype", choices=DTYPES, help="default: bfloat16 on a GPU, float32 on a CPU")
    parser.add_argument("--steps", type=int, default=50, help="sampler steps of txt2img")
    parser.add_argument("--reps", type=int, help="timed calls per measure (default 10 on a GPU, 3 on a CPU)")
    parser.add_argument("--train-batch", type=int, default=8)
    parser.add_argument(
        "--attention", default="auto",
        help="sdjax columns, comma-separated: auto, xla, cudnn; a column after the first may name its measures, "
             "e.g. xla:unet_2+unet_16 (default: all)",
    )  # fmt: skip
    parser.add_argument(
        "--torch-compile", default=None,
        help="diffusers columns besides eager, comma-separated torch.compile modes (default, reduce-overhead), each "
             "optionally with its measures as for --attention; default: 'default' on a GPU, none on a CPU",
    )  # fmt: skip
    parts = parser.add_mutually_exclusive_group()
    parts.add_argument("--no-processes", action="store_true", help="skip the new-process measures")
    parts.add_argument("--processes-only", action="store_true", help="only the new-process measures")
    parser.add_argument(
        "--large-sizes", metavar="HxW,…",
        help="new processes at these image sizes for peak memory, on a GPU; '' for none (default: 512x1024,1024x1024 "
             "for sd15, none for tiny)",
    )  # fmt: skip
    parser.add_argument("--tiled-vae", action="store_true", help="at the large sizes, also both sides with a tiled VAE")
    parser.add_argument("--no-base", action="store_true", help="skip the new processes at the base size")
    parser.add_argument("--out", help="default: benchmarks/RESULTS.md on a GPU, benchmarks/RESULTS-cpu-tiny.md else")
    # a new process of :func:`child`
    parser.add_argument("--child", choices=("sdjax", "diffusers"), help=argparse.SUPPRESS)
    parser.add_argument("--images", help=argparse.SUPPRESS)
    parser.add_argument("--cache-dir", help=argparse.SUPPRESS)
    parser.add_argument("--raw", help="also write every result so far as JSON to this file, after each measure")
    parser.add_argument("--render", metavar="RAW", help="only write the report of a --raw file (no measuring)")
    parser.add_argument("--recount-flops", action="store_true", help="with --render: count the FLOPs again")
    args = parser.parse_args(argv)
    if args.render:
        if not args.out:
            parser.error("--render needs --out")
        return args
    if args.large_sizes is None:
        args.large_sizes = SIZES[args.size]["memory"][1:]
    else:
        try:
            args.large_sizes = [tuple(int(n) for n in hw.split("x")) for hw in args.large_sizes.split(",") if hw]
        except ValueError:
            parser.error(f"--large-sizes {args.large_sizes!r}: expected sizes like 512x1024,1024x1024")

    import jax

    args.on_gpu = jax.devices()[0].platform == "gpu"
    args.dtype = args.dtype or ("bfloat16" if args.on_gpu else "float32")
    args.reps = args.reps or (10 if args.on_gpu else 3)
    if args.torch_compile is None:
        args.torch_compile = "default" if args.on_gpu else ""
    args.out = args.out or str(Path(__file__).parent / ("RESULTS.md" if args.on_gpu else "RESULTS-cpu-tiny.md"))
    args.image = SIZES[args.size]["image"]
    args.latent = args.image // 8
    args.train_latent = SIZES[args.size]["train_latent"]
    args.command = "python benchmarks/bench.py " + shlex.join(sys.argv[1:] if argv is None else argv)
    return args


MEASURES = ("txt2img_1", "unet_2", "unet_16", "txt2img_8", "vae", "train")  # txt2img_1 first: the cold start


def columns(spec: str) -> list[tuple[str, tuple[str, ...]]]:
    """'auto,xla:unet_2+unet_16' → [("auto", MEASURES), ("xla", ("unet_2", "unet_16"))]."""
    out = []
    for item in filter(None, spec.split(",")):
        name, _, measures = item.partition(":")
        chosen = tuple(measures.split("+")) if measures else MEASURES
        if set(chosen) - set(MEASURES):
            raise SystemExit(f"unknown measure in {item!r}: expected some of {MEASURES}")
        out.append((name, chosen))
    return out


def in_process(args, save: Callable[[InProcess], None] = lambda measured: None) -> InProcess:
    """Every column's measures in this process, and the same-weights and bf16 checks; ``save(measured)``
    after each, so that a run cut short keeps what it measured. Order: sdjax's first column, diffusers
    eager, the other sdjax columns, the torch.compile columns (the most important first)."""
    import numpy as np

    from sdjax.speed import CompileCounter

    measured = InProcess({}, dict.fromkeys(MEASURES, float("nan")), float("nan"), None, None)
    sdjax_columns = columns(args.attention)
    if args.on_gpu and any(a == "auto" for a, _ in sdjax_columns):
        error = probe_cudnn(args.dtype)
        measured.notes.append("cuDNN attention on SD1.5's shapes (forward and backward): " + (error or "runs"))
        if error:
            sdjax_columns = [("xla" if a == "auto" else a, m) for a, m in sdjax_columns]
    components = build_components(args)
    sdjax_sides = [(Sdjax(components, args, a), m) for a, m in sdjax_columns]
    eager = Diffusers(components, args, None)
    compiled = [(Diffusers(components, args, mode, shared=eager), m) for mode, m in columns(args.torch_compile)]
    sides = [sdjax_sides[0], (eager, MEASURES), *sdjax_sides[1:], *compiled]
    ours = sdjax_sides[0][0]
    measured.results = {side.name: {} for side, _ in sides}
    measured.flops = count_flops(args)

    # the same weights on both sides: one UNet output compared
    rng = np.random.default_rng(0)
    x = rng.standard_normal((1, args.latent, args.latent, 4)).astype(np.float32)
    context = rng.standard_normal((1, 77, components.unet.config.cross_attention_dim)).astype(np.float32)
    t = np.array([500])
    ref, out = eager.unet_output(x, t, context), ours.unet_output(x, t, context)
    measured.parity = float(np.abs(out - ref).max() / np.abs(ref).max())
    save(measured)

    make = {
        "txt2img_1": lambda s: s.txt2img(1),
        "unet_2": lambda s: s.unet(2),
        "unet_16": lambda s: s.unet(16),
        "txt2img_8": lambda s: s.txt2img(8),
        "vae": lambda s: s.vae_decode(),
        "train": lambda s: s.train_step(),
    }
    for side, measures in sides:
        for key in measures:
            if key == "train" and getattr(side, "compile_mode", None):
                continue  # training is compared with diffusers' eager step (autocast), as the issue asks
            print(f"{time.perf_counter() - START:7.1f} s  {key}: {side.name}", file=sys.stderr, flush=True)
            try:  # one measure that fails (out of memory, a compiler error) is reported, the others still run
                side.reset_peak() if key == "train" else None
                fn = make[key](side)
                measured.results[side.name][key] = time_calls(fn, args.reps)
                if key == "train":
                    measured.peaks[side.name] = side.peak_bytes()
                if key == "txt2img_1" and side is ours:
                    with CompileCounter() as compiles:
                        fn()
                    measured.recompiles = compiles.count
            except Exception as error:
                traceback.print_exc()
                first_line = (str(error).splitlines() or [""])[0][:160]
                measured.failed[side.name, key] = f"{type(error).__name__}: {first_line}"
            fn = None
            gc.collect()
            free_torch_memory()
            measured.attention = ours.attention_kernels
            save(measured)

    if args.dtype != "float32":  # sdjax's own float32 against the benchmark's dtype (last: one more compile)
        full = ours.unet_output(x, t, context, float32=True)
        measured.low_precision = float(np.abs(out - full).max() / np.abs(full).max())
        save(measured)
    return measured


def new_processes(args, save: Callable[[list], None] = lambda children: None) -> list[tuple[str, str, dict]]:
    """(label, size, result) for: sdjax with an empty then a warm compilation cache, and diffusers, at the
    base size (unless --no-base); the warm-cache sdjax process and the diffusers one go on to each of
    --large-sizes (on a GPU), first with the tiled VAE if --tiled-vae, then without (jax's peak is the
    process's so far, so the smaller need comes first). ``save(children)`` after each process."""
    cache = tempfile.mkdtemp(prefix="sdjax-bench-cache-")
    large = ",".join(f"{h}x{w}t,{h}x{w}" if args.tiled_vae else f"{h}x{w}" for h, w in args.large_sizes)
    large = large if args.on_gpu else ""
    base = "" if args.no_base else f"{args.image}x{args.image}"
    plan = [("sdjax, empty cache", "sdjax", base, cache)] if base else []
    plan += [("sdjax, warm cache", "sdjax", ",".join(filter(None, (base, large))), cache),
             ("diffusers", "diffusers", ",".join(filter(None, (base, large))), None)]  # fmt: skip
    children = []
    for label, side, images, cache_dir in plan:
        if not images:
            continue
        for i, out in enumerate(run_child(args, side, images, cache_dir)):
            at_base = i == 0 and base
            name = label if at_base else side + (", tiled VAE" if out["tiled"] else "")
            children.append((name, out["size"], out))
        save(children)
    return children


def to_raw(args, facts, ceiling, measured: InProcess | None, children: list) -> dict:
    """Everything a report is made from, as JSON (``--raw``; ``--render`` makes the report again from it)."""
    keep = ("size", "dtype", "steps", "reps", "train_batch", "train_latent", "image", "latent", "command", "on_gpu")
    raw = {"args": {k: getattr(args, k) for k in keep}, "facts": facts, "ceiling": ceiling, "children": children}
    if measured is not None:
        m = dataclasses.asdict(measured)
        m["failed"] = [[n, k, e] for (n, k), e in measured.failed.items()]
        raw["measured"] = m
    return raw


def from_raw(raw: dict):
    """(args, facts, ceiling, measured, children) of a :func:`to_raw` dict."""
    args = argparse.Namespace(**raw["args"])
    measured = None
    if "measured" in raw:
        m = dict(raw["measured"])
        m["results"] = {n: {k: Timing(**t) for k, t in r.items()} for n, r in m["results"].items()}
        m["failed"] = {(n, k): e for n, k, e in m["failed"]}
        measured = InProcess(**m)
    children = [tuple(c) for c in raw["children"]]
    return args, raw["facts"], raw["ceiling"], measured, children


def main(argv=None) -> str:
    args = parse_args(argv)
    if args.render:
        args_, facts, ceiling, measured, children = from_raw(json.loads(Path(args.render).read_text()))
        if args.recount_flops and measured is not None:
            measured.flops = count_flops(args_)
        text = report(args_, facts, ceiling, measured, children)
        Path(args.out).write_text(text)
        print(text)
        return text
    if args.child:
        child(args)
        return ""
    facts = machine()
    ceiling = matmul_ceiling(args.dtype, args.on_gpu)
    state = {"measured": None, "children": []}

    def save(**update) -> None:
        state.update(update)
        if args.raw:
            Path(args.raw).write_text(json.dumps(to_raw(args, facts, ceiling, **state), indent=1))
        Path(args.out).write_text(report(args, facts, ceiling, **state))

    save()
    if not args.processes_only:
        in_process(args, lambda measured: save(measured=measured))
    gc.collect()
    free_torch_memory()
    if not args.no_processes:
        new_processes(args, lambda children: save(children=children))
    text = report(args, facts, ceiling, **state)
    Path(args.out).write_text(text)
    print(text)
    return text


if __name__ == "__main__":
    main()
