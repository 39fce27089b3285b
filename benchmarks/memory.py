"""How much device memory XLA's compiled programs for Stable Diffusion need, without allocating the weights.

    python benchmarks/memory.py                                   # SD1.5, bfloat16: 512², 512×1024, 1024²
    python benchmarks/memory.py --dtype float32 --out /tmp/memory-fp32.md
    python benchmarks/memory.py --size tiny --sizes 64x64,64x128  # the tiny SD of sdjax.speed, in seconds

Nothing here runs a network. Each program is traced on abstract shapes only: the model graph comes from
``nnx.eval_shape`` (no parameter is ever materialised, so SD1.5's ~1 B parameters cost no memory), its
state and the inputs are ``jax.ShapeDtypeStruct``s in the chosen dtype, and

    jax.jit(f).lower(*abstract_args).compile().memory_analysis()

gives XLA's own buffer assignment for the compiled program: the bytes of its arguments (the weights it
reads, since jit drops unused arguments, and the inputs), its outputs, its temporaries (one arena sized by
XLA's heap simulation: the most that is live at once, after buffer reuse) and the bytes an output shares
with an argument (alias). ``sum`` in the table is arguments + temp + output − alias: what the program holds
while it runs. (The stats' ``peak_memory_in_bytes`` is left out: XLA's CPU backend counts no temporaries in
it, and reports a generated code size of 0.)

The programs, for each image size H×W (latents H/8 × W/8 × 4):

- the UNet forward at batch 2 (one classifier-free-guidance pair), a 77-token text context;
- the VAE decode of one image, as the pipeline's ``_decode`` does it (float32 latents in, float32 image out);
- the VAE decode of one ``--tile``² latent window (64² = 512² pixels, what a tiled decode compiles per
  window), once, whatever the image size;
- one UNet training step at batch ``--train-batch`` on ``--train-latent``² latents: ``value_and_grad`` of
  the MSE against a random target, no optimizer (``--no-train`` leaves it out; ``--train-remat`` adds it
  with ``UNet2D.remat`` on, each block's activations recomputed in the backward pass).

``--finetune`` measures instead what fine-tuning SD1.5 at ``--finetune-latent``² latents (64² = 512² pixels)
holds: the whole step of :mod:`sdjax.finetune` (``sdjax.train.make_train_step``: the loss of
``finetune._loss`` through the text encoder and the UNet, in bf16 compute on float32 master weights, its
gradient, the optimizer's update, the donated state), for LoRA (rank 4 on the UNet's attention, base frozen),
DreamBooth (the whole UNet; each batch holds as many class images as instance images, so twice the rows) and
full fine-tuning (the whole UNet), at batch 1 and 4, with and without remat, with Adam (two float32 moments per
weight) and, for full fine-tuning, Adafactor (``optax.adafactor``: a factored second moment, rows + columns per
matrix, no first moment).

These are XLA's figures for the backend jax runs on. On a CPU they are the CPU compiler's buffer
assignment for XLA's einsum-softmax-einsum attention (which writes the T×T scores); a GPU fuses
differently, adds convolution workspaces and (``--attention auto`` in half precision) runs cuDNN's flash
attention, which never writes the scores: estimates, not measurements.

Prints the markdown report; ``--out`` also writes it to a file.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import os
import shlex
import sys
import time
from collections.abc import Callable
from pathlib import Path

import flax
import jax
import jax.numpy as jnp
import jaxlib
import optax
from flax import nnx

from sdjax import attention
from sdjax.attention import ATTENTION_IMPLEMENTATIONS
from sdjax.models.unet import UNet2D
from sdjax.models.vae import AutoencoderKL
from sdjax.nn import set_attention_implementation
from sdjax.speed import CONFIGS

DEFAULT_SIZES = "512x512,512x1024,1024x1024"
DTYPES = ("bfloat16", "float32", "float16")
TEXT_TOKENS = 77  # CLIP's context length
GIB = 2**30


# ---------------------------------------------------------------------------------------------------
# Abstract models and XLA's memory analysis
# ---------------------------------------------------------------------------------------------------


def abstract_model(cls, config, dtype, attention: str = "auto") -> tuple[nnx.GraphDef, nnx.State]:
    """(graphdef, state) of ``cls(config)`` with no array allocated: the state's leaves are
    ``jax.ShapeDtypeStruct``s, floating ones in ``dtype`` (as ``Components.astype`` casts them)."""
    model = nnx.eval_shape(lambda: cls(config, rngs=nnx.Rngs(0)))
    set_attention_implementation(model, attention)
    graphdef, state = nnx.split(model)

    def cast(leaf):
        floating = jnp.issubdtype(leaf.dtype, jnp.floating)
        return jax.ShapeDtypeStruct(leaf.shape, dtype if floating else leaf.dtype)

    return graphdef, jax.tree.map(cast, state)


def count(state) -> int:
    """Number of scalars in an (abstract) state."""
    return sum(int(leaf.size) for leaf in jax.tree.leaves(state))


@dataclasses.dataclass
class Measured:
    """XLA's memory analysis of one compiled program (bytes), and how long it took to compile (s)."""

    program: str
    size: str
    arguments: int
    temp: int
    output: int
    alias: int
    code: int
    peak: int | None  # CompiledMemoryStats.peak_memory_in_bytes, where the backend sets it
    compile_s: float
    note: str = ""  # in place of the compile time: why this program was not compiled again

    @property
    def total(self) -> int:
        return self.arguments + self.temp + self.output - self.alias


def measure(program: str, size: str, fn: Callable, *args) -> Measured:
    """Lower ``jax.jit(fn)`` (or ``fn`` itself when it is jitted already, keeping its donation) on abstract ``args``,
    compile it and read XLA's memory analysis."""
    print(f"{program} {size}: compiling …", file=sys.stderr, flush=True)
    lowered = (fn if hasattr(fn, "lower") else jax.jit(fn)).lower(*args)
    start = time.perf_counter()
    compiled = lowered.compile()
    seconds = time.perf_counter() - start
    stats = compiled.memory_analysis()
    measured = Measured(
        program=program,
        size=size,
        arguments=stats.argument_size_in_bytes,
        temp=stats.temp_size_in_bytes,
        output=stats.output_size_in_bytes,
        alias=stats.alias_size_in_bytes,
        code=stats.generated_code_size_in_bytes,
        peak=getattr(stats, "peak_memory_in_bytes", None),
        compile_s=seconds,
    )
    peak = "" if measured.peak is None else f" (XLA's peak_memory_in_bytes: {measured.peak / GIB:.3f} GiB)"
    print(f"  temp {measured.temp / GIB:.3f} GiB, sum {measured.total / GIB:.3f} GiB{peak}, compiled in "
          f"{seconds:.1f} s", file=sys.stderr, flush=True)  # fmt: skip
    return measured


# ---------------------------------------------------------------------------------------------------
# The programs
# ---------------------------------------------------------------------------------------------------


def parse_size(text: str) -> tuple[int, int]:
    """'512x1024' → (512, 1024): height × width in pixels."""
    try:
        height, width = (int(v) for v in text.lower().replace("×", "x").split("x"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"image size {text!r}: expected HxW, e.g. 512x1024") from None
    return height, width


def size_label(height: int, width: int) -> str:
    return f"{height}²" if height == width else f"{height}×{width}"


def measure_all(args) -> tuple[list[Measured], dict[str, int]]:
    """Every program of this run, measured; and the parameter counts of the networks."""
    dtype = jnp.dtype(args.dtype)
    unet_cfg, vae_cfg, _ = CONFIGS[args.size]
    unet_graph, unet_state = abstract_model(UNet2D, unet_cfg, dtype, args.attention)
    vae_graph, vae_state = abstract_model(AutoencoderKL, vae_cfg, dtype, args.attention)
    # jax.jit drops the arguments a program never reads: the decode's are the decoder's weights only
    decoder = count([vae_state[k] for k in ("decoder", "post_quant_conv") if k in vae_state])
    params = {"UNet": count(unet_state), "VAE decoder": decoder}
    f = 2 ** (len(vae_cfg.block_out_channels) - 1)  # the VAE's downsampling: latents are H/f × W/f
    context_dim, channels = unet_cfg.cross_attention_dim, unet_cfg.in_channels
    latent_channels, scaling = vae_cfg.latent_channels, vae_cfg.scaling_factor
    sds = jax.ShapeDtypeStruct

    def unet_forward(state, x, t, context):
        return nnx.merge(unet_graph, state)(x, t, context)

    def vae_decode(state, latents):
        # sdjax.pipeline._decode: float32 latents, the network in its dtype, a float32 image in [0, 1]
        vae = nnx.merge(vae_graph, state)
        image = vae.decode((latents / scaling).astype(dtype)).astype(jnp.float32)
        return jnp.clip(image / 2 + 0.5, 0.0, 1.0)

    def mse(graphdef):
        def loss(state, x, t, context, target):
            prediction = nnx.merge(graphdef, state)(x, t, context).astype(jnp.float32)
            return jnp.mean((prediction - target) ** 2)

        return loss

    results = []
    batch = 2  # one CFG pair
    for height, width in args.sizes:
        h, w, label = height // f, width // f, size_label(height, width)
        x = sds((batch, h, w, channels), dtype)
        t = sds((batch,), jnp.int32)
        context = sds((batch, TEXT_TOKENS, context_dim), dtype)
        results.append(measure(f"UNet forward, batch {batch}", label, unet_forward, unet_state, x, t, context))
        latents = sds((1, h, w, latent_channels), jnp.float32)
        results.append(measure("VAE decode, 1 image", label, vae_decode, vae_state, latents))
    tile, name = args.tile, f"VAE decode, one {args.tile}² latent tile"
    same = [r for r in results if r.program.startswith("VAE") and r.size == size_label(tile * f, tile * f)]
    if same:  # the very program measured above (jax would hand back the compiled one): not compiled again
        results.append(dataclasses.replace(same[0], program=name, note=f"as the {same[0].size} decode"))
    else:
        latents = sds((1, tile, tile, latent_channels), jnp.float32)
        results.append(measure(name, size_label(tile * f, tile * f), vae_decode, vae_state, latents))
    if args.train:
        n, hw = args.train_batch, args.train_latent
        x = sds((n, hw, hw, channels), dtype)
        t = sds((n,), jnp.int32)
        context = sds((n, TEXT_TOKENS, context_dim), dtype)
        target = sds((n, hw, hw, unet_cfg.out_channels), jnp.float32)
        graphs = [("", unet_graph)]
        if args.train_remat:  # UNet2D.remat: every block under jax.checkpoint, recomputed in the backward pass
            model = nnx.merge(unet_graph, unet_state)
            model.remat = True
            graphs.append((", remat", nnx.split(model)[0]))
        for suffix, graphdef in graphs:
            results.append(measure(f"UNet value_and_grad, batch {n}{suffix}", size_label(hw * f, hw * f),
                                   jax.value_and_grad(mse(graphdef)), unet_state, x, t, context, target))  # fmt: skip
    return results, params


# ---------------------------------------------------------------------------------------------------
# Fine-tuning: the whole training step of sdjax.finetune
# ---------------------------------------------------------------------------------------------------

FINETUNE_METHODS = ("lora", "dreambooth", "full")
OPTIMIZERS = {"adam": lambda: optax.adam(1e-5), "adafactor": lambda: optax.adafactor(1e-5)}


def finetune_step(method: str, batch: int, latent: int, remat: bool, optimizer: str, size: str):
    """(jitted step, abstract state, abstract batch, abstract frozen) of sdjax.finetune's training step for SD's
    UNet + text encoder of ``CONFIGS[size]``: float32 master weights, bf16 compute, what ``finetune`` builds."""
    from types import SimpleNamespace

    import numpy as np

    from sdjax import finetune, lora
    from sdjax.models.clip import CLIPTextModel
    from sdjax.schedulers import NoiseSchedule
    from sdjax.speed import SD_SCHEDULER
    from sdjax.tiny_sd import TextToLatent
    from sdjax.tokenizer import CLIPTokenizer
    from sdjax.train import create_train_state, make_train_step

    unet_cfg, _, text_cfg = CONFIGS[size]
    config = finetune.FinetuneConfig(method=method, dtype="bfloat16", remat=remat)
    opt = OPTIMIZERS[optimizer]()

    def build():
        unet = UNet2D(unet_cfg, rngs=nnx.Rngs(0))
        if method == "lora":
            lora.add_lora(unet, lora.LoRAConfig(rank=config.rank), rngs=nnx.Rngs(0))
        unet.remat = remat
        return TextToLatent(unet, CLIPTextModel(text_cfg, rngs=nnx.Rngs(1)), freeze_text=False)

    trainable = finetune._trainable(config)
    graphdef = nnx.split(nnx.eval_shape(build), trainable, ...)[0]
    state, frozen = jax.eval_shape(lambda: create_train_state(build(), opt, 0, None, trainable)[1:])
    schedule = NoiseSchedule.from_diffusers_config(SD_SCHEDULER)
    sd = SimpleNamespace(tokenizer=CLIPTokenizer.from_bpe_file(), schedule=schedule)
    step = make_train_step(graphdef, finetune._loss(sd, config, None), opt, None)
    rows = 2 * batch if method == "dreambooth" else batch  # DreamBooth: instance + class images
    sds = jax.ShapeDtypeStruct
    data = {"latent": sds((rows, latent, latent, unet_cfg.in_channels), jnp.float32),
            "ids": sds((rows, TEXT_TOKENS), jnp.int32)}  # fmt: skip
    if method == "dreambooth":
        data["weight"] = sds((rows,), jnp.float32)  # λ on the class images
    trained = sum(int(np.prod(a.shape)) for a in jax.tree.leaves(state.params))
    return step, state, data, frozen, trained


def measure_finetune(args) -> tuple[list[Measured], dict[str, int]]:
    results, trained = [], {}
    f = 8
    for method in args.finetune_methods:
        for optimizer in args.optimizers:
            if method != "full" and optimizer != "adam":
                continue  # LoRA's optimizer state is megabytes anyway; DreamBooth's is full fine-tuning's
            for batch in args.finetune_batches:
                for remat in (False, True):
                    step, state, data, frozen, n = finetune_step(method, batch, args.finetune_latent, remat, optimizer,
                                                                 args.size)  # fmt: skip
                    trained[method] = n
                    label = f"{method}, {optimizer}, batch {batch}{', remat' if remat else ''}"
                    size = size_label(args.finetune_latent * f, args.finetune_latent * f)
                    results.append(measure(label, size, step, state, data, frozen))
    return results, trained


# ---------------------------------------------------------------------------------------------------
# The report
# ---------------------------------------------------------------------------------------------------


def gib(n: int) -> str:
    return f"{n / GIB:.3f}"


def caveat(platform: str, attention: str, dtype: str) -> str:
    if platform == "cpu":
        return (
            "these are XLA's CPU buffer-assignment figures for the XLA-attention path (einsum → softmax → einsum, "
            "the T×T scores written out); on a GPU, fusion, convolution workspaces and cuDNN attention change "
            "them, so they estimate, not measure, a GPU's memory."
        )
    return (
        f"XLA's {platform} buffer assignment for attention '{attention}' at {dtype}: what the compiled programs "
        "need; the allocator's fragmentation, other live arrays and the runtime's own reserve come on top."
    )


def heading(title: str, command: str, facts: dict[str, str]) -> list[str]:
    """A report's title, the command that made it and its table of facts (markdown lines)."""
    return [f"# XLA memory estimate: {title}", "", f"`{command}`", "", "| | |", "|---|---|",
            *[f"| {k} | {v} |" for k, v in facts.items()], ""]  # fmt: skip


def scores_note() -> str:
    return "all scores at once" if attention.MAX_ATTENTION_SCORES is None else (
        f"at most {attention.MAX_ATTENTION_SCORES:,} scores at once (query chunks)")  # fmt: skip


def report(args, results: list[Measured], params: dict[str, int]) -> str:
    device = jax.devices()[0]
    train = f"batch {args.train_batch}, {args.train_latent}² latents" if args.train else "not measured"
    facts = {
        "date": datetime.datetime.now().strftime("%Y-%m-%d %H:%M"),
        "jax / jaxlib / flax": f"{jax.__version__} / {jaxlib.__version__} / {flax.__version__}",
        "backend": f"{device.platform} ({device.device_kind}), {os.cpu_count()} CPU cores",
        "model": f"`{args.size}` (sdjax.speed.CONFIGS), parameters: "
        + ", ".join(f"{k} {v / 1e6:.4g} M" for k, v in params.items()),
        "dtype / attention": f"{args.dtype} weights and activations / '{args.attention}', XLA's path with "
        + scores_note(),
        "inputs": f"UNet: batch 2 (one CFG pair), {TEXT_TOKENS}-token context; VAE: 1 image, float32 latents; "
        f"training step: {train}",
        "caveat": caveat(device.platform, args.attention, args.dtype),
    }
    lines = [
        *heading(f"`{args.size}`, {args.dtype}, {device.platform}", args.command, facts),
        "From `jax.jit(f).lower(*abstract_args).compile().memory_analysis()`; GiB = 2³⁰ bytes. arguments: the "
        "weights a program reads (jit drops the others: a decode's are the decoder's) and its inputs; temp: "
        "XLA's arena of intermediates (the most live at once); sum = arguments + temp + output − alias; compile s: "
        "XLA's compilation alone (tracing and lowering not included).",
        "",
        "| program | size | arguments GiB | temp GiB | output GiB | alias GiB | sum GiB | compile s |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in results:
        lines.append(f"| {r.program} | {r.size} | {gib(r.arguments)} | {gib(r.temp)} | {gib(r.output)} | "
                     f"{gib(r.alias)} | {gib(r.total)} | {r.note or f'{r.compile_s:.1f}'} |")  # fmt: skip
    code = {r.code for r in results}
    if code != {0}:
        lines += ["", "Generated code: " + ", ".join(f"{r.program} {r.size} {r.code / 2**20:.1f} MiB" for r in results)]
    return "\n".join(lines) + "\n"


def finetune_report(args, results: list[Measured], trained: dict[str, int]) -> str:
    device = jax.devices()[0]
    facts = {
        "date": datetime.datetime.now().strftime("%Y-%m-%d %H:%M"),
        "jax / jaxlib / flax / optax": f"{jax.__version__} / {jaxlib.__version__} / {flax.__version__} / "
        f"{optax.__version__}",
        "backend": f"{device.platform} ({device.device_kind}), {os.cpu_count()} CPU cores",
        "model": f"`{args.size}` UNet + text encoder, float32 master weights, bfloat16 compute "
        "(`FinetuneConfig(dtype='bfloat16')`); trained parameters: "
        + ", ".join(f"{k} {v / 1e6:.4g} M" for k, v in trained.items()),
        "step": f"sdjax.train.make_train_step with sdjax.finetune's loss: {args.finetune_latent}² latents, "
        f"{TEXT_TOKENS}-token captions through the text encoder, value_and_grad, the optimizer, the state donated",
        "attention": "XLA's path with " + scores_note(),
        "caveat": caveat(device.platform, args.attention, "bfloat16"),
    }  # fmt: skip
    lines = [
        *heading(f"fine-tuning `{args.size}`, {device.platform}", args.command, facts),
        "arguments: the train state (trained weights, optimizer moments), the frozen weights and the batch; temp: "
        "XLA's arena of intermediates (activations kept for the backward pass, gradients, the bf16 copies of the "
        "weights); output − alias: what the donated state does not absorb; sum = what the step holds. GiB = 2³⁰ "
        "bytes. DreamBooth's batch n is n instance + n class images.",
        "",
        "| method, optimizer, batch | size | arguments GiB | temp GiB | output GiB | alias GiB | sum GiB | ≤ 16 GiB | "
        "compile s |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in results:
        fits = "yes" if r.total <= 16 * GIB else "no"
        lines.append(f"| {r.program} | {r.size} | {gib(r.arguments)} | {gib(r.temp)} | {gib(r.output)} | "
                     f"{gib(r.alias)} | {gib(r.total)} | {fits} | {r.compile_s:.1f} |")  # fmt: skip
    return "\n".join(lines) + "\n"


# ---------------------------------------------------------------------------------------------------
# Main
# ---------------------------------------------------------------------------------------------------


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size", choices=sorted(CONFIGS), default="sd15", help="the model's shapes")
    parser.add_argument("--dtype", choices=DTYPES, default="bfloat16")
    parser.add_argument("--sizes", default=DEFAULT_SIZES, help=f"image sizes HxW, comma-separated ({DEFAULT_SIZES})")
    parser.add_argument("--tile", type=int, default=64, help="latent side of the tiled-decode window (64)")
    parser.add_argument("--train-batch", type=int, default=8)
    parser.add_argument("--train-latent", type=int, default=64, help="latent side of the training step (64)")
    parser.add_argument("--no-train", dest="train", action="store_false", help="leave the training step out")
    parser.add_argument("--train-remat", action="store_true", help="also the training step with UNet2D.remat on")
    parser.add_argument("--attention", choices=ATTENTION_IMPLEMENTATIONS, default="auto")
    parser.add_argument(
        "--whole-attention", action="store_true",
        help="XLA's attention with all scores at once (attention.MAX_ATTENTION_SCORES = None), not in query chunks",
    )  # fmt: skip
    parser.add_argument("--finetune", action="store_true", help="measure fine-tuning steps (LoRA, DreamBooth, full)")
    parser.add_argument("--finetune-methods", default=",".join(FINETUNE_METHODS), help="comma-separated (%(default)s)")
    parser.add_argument("--finetune-batches", default="1,4", help="comma-separated batch sizes (%(default)s)")
    parser.add_argument("--finetune-latent", type=int, default=64, help="latent side (64: 512² pixels)")
    parser.add_argument("--optimizers", default="adam,adafactor", help=f"comma-separated, of {sorted(OPTIMIZERS)}")
    parser.add_argument("--out", help="also write the report here (default: print only)")
    args = parser.parse_args(argv)
    args.finetune_methods = [m for m in args.finetune_methods.split(",") if m]
    args.finetune_batches = [int(b) for b in args.finetune_batches.split(",") if b]
    args.optimizers = [o for o in args.optimizers.split(",") if o]
    bad = [m for m in args.finetune_methods if m not in FINETUNE_METHODS] + [
        o for o in args.optimizers if o not in OPTIMIZERS]  # fmt: skip
    if bad:
        parser.error(f"unknown {bad}: methods are {FINETUNE_METHODS}, optimizers {sorted(OPTIMIZERS)}")
    args.sizes = [parse_size(s) for s in args.sizes.split(",") if s.strip()]
    unet_cfg, vae_cfg, _ = CONFIGS[args.size]
    multiple = 2 ** (len(vae_cfg.block_out_channels) - 1) * unet_cfg.downsample_factor
    bad = [f"{h}x{w}" for h, w in args.sizes if h % multiple or w % multiple]
    if bad:
        parser.error(f"image sizes {bad}: height and width must be multiples of {multiple} for `{args.size}`")
    if args.tile <= 0 or args.train_latent % unet_cfg.downsample_factor:
        parser.error(f"--tile must be positive and --train-latent a multiple of {unet_cfg.downsample_factor}")
    args.command = "python benchmarks/memory.py " + shlex.join(sys.argv[1:] if argv is None else argv)
    return args


@dataclasses.dataclass
class Report:
    text: str
    results: list[Measured]


def main(argv=None) -> Report:
    args = parse_args(argv)
    bound = attention.MAX_ATTENTION_SCORES
    try:
        if args.whole_attention:
            attention.MAX_ATTENTION_SCORES = None
        if args.finetune:
            results, trained = measure_finetune(args)
            text = finetune_report(args, results, trained)
        else:
            results, params = measure_all(args)
            text = report(args, results, params)
    finally:
        attention.MAX_ATTENTION_SCORES = bound
    if args.out:
        Path(args.out).write_text(text)
    print(text)
    return Report(text, results)


if __name__ == "__main__":
    main()
