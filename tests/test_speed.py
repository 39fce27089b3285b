"""The speed features, checked on the CPU: the attention kernel's choice and its fallback, one compiled
program per denoising chain (no recompilation, no host call per step, the latents donated), the
persistent compilation cache across processes, and bfloat16 within its tolerance of float32.

bf16 has an 8-bit significand: each rounding is off by up to u = 2⁻⁸ ≈ 3.9e-3 relative, and the errors
of the few dozen layers of the tiny random SD add up: one UNet pass measured 1.7e-2 relative (max |Δ| /
max |ref|, about 4u); the tolerance is 3e-2. The float32 path it is compared with is the one
tests/test_unet.py holds to diffusers within 1e-5 (and tests/test_pipeline.py its images within 1e-3).
The whole bf16 pipeline against float32 is test_pipeline's ``test_bfloat16_stays_close_to_float32``
(images within 0.05): guidance and chaining amplify the
error there (4 guided DDIM steps on this file's model: 3.7e-2 relative on the final latents).

Pipelines here run on one device (tests/test_multidevice.py covers eight), with one set of call shapes,
so that the jitted programs compile once for the whole file.
"""

import json
import os
import subprocess
import sys
import textwrap

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from sdjax import StableDiffusion, attention, pipeline
from sdjax.attention import accelerator, attention_backend
from sdjax.nn import Attention, BasicTransformerBlock, set_attention_implementation
from sdjax.speed import CompileCounter, random_components

ON_CPU = jax.default_backend() == "cpu"
# XLA's cheapest code generation for the programs this file compiles itself (same results, faster compile)
FAST_COMPILE = {"xla_backend_optimization_level": 0, "xla_llvm_disable_expensive_passes": True}


@pytest.fixture(scope="module")
def components():
    return random_components("tiny", seed=0)


PROMPTS = ["a red fox", "a blue bird"]
CALL = dict(num_inference_steps=4, scheduler="ddim", guidance_scale=7.5)


def pipeline_of(components) -> StableDiffusion:
    sd = StableDiffusion(components)
    sd.progress, sd.devices = False, jax.devices()[:1]
    return sd


@pytest.fixture(scope="module")
def pipe(components):
    return pipeline_of(components)


def rel_err(a, b) -> float:
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.max(np.abs(a - b)) / np.max(np.abs(b)))


# ---------------------------------------------------------------------------------------------------
# Attention: cuDNN where it can run, XLA everywhere else
# ---------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "implementation, platform, dtype, head_dim, capability, masked, expected",
    [
        ("auto", "cuda", jnp.bfloat16, 40, "9.0", False, "cudnn"),  # SD1.5's first level on an H100
        ("auto", "cuda", jnp.float16, 160, "9.0", False, "cudnn"),  # its lowest level: d = 160 ≤ 256 on Hopper
        ("auto", "cuda", jnp.bfloat16, 160, "8.0", False, "xla"),  # ... but > 128 on an A100
        ("auto", "cuda", jnp.float32, 40, "9.0", False, "xla"),  # cuDNN's kernel is half precision only
        ("auto", "cuda", jnp.bfloat16, 36, "9.0", False, "xla"),  # d not a multiple of 8
        ("auto", "cuda", jnp.bfloat16, 64, "9.0", True, "xla"),  # a mask array: XLA
        ("auto", "cpu", jnp.bfloat16, 40, None, False, "xla"),
        ("auto", "tpu", jnp.bfloat16, 128, None, False, "xla"),
        ("auto", "rocm", jnp.float16, 64, None, False, "xla"),
        ("xla", "cuda", jnp.bfloat16, 40, "9.0", False, "xla"),  # forced
        ("cudnn", "cuda", jnp.bfloat16, 64, "8.0", True, "cudnn"),  # forced, and possible
    ],
)
def test_attention_backend_choice(implementation, platform, dtype, head_dim, capability, masked, expected):
    choice = attention_backend(
        implementation, platform=platform, dtype=dtype, head_dim=head_dim, compute_capability=capability, masked=masked
    )
    assert choice == expected


def test_odd_sequence_lengths_stay_on_xla():
    """jax's cuDNN path refused SD1.5's cross-attention (4,096 queries, 77 keys) when differentiated, on
    the H200 (bench.py's first GPU run): an odd length goes to XLA, and forcing cuDNN says why."""
    gpu = dict(platform="cuda", dtype=jnp.bfloat16, head_dim=40, compute_capability="9.0")
    assert attention_backend("auto", **gpu, lengths=(4096, 4096)) == "cudnn"
    assert attention_backend("auto", **gpu, lengths=(4096, 77)) == "xla"
    assert attention_backend("auto", **gpu, lengths=(77, 77)) == "xla"
    with pytest.raises(ValueError, match=r"sequence lengths must be even \(got \(4096, 77\)\)"):
        attention_backend("cudnn", **gpu, lengths=(4096, 77))


def test_forcing_cudnn_where_it_cannot_run_says_why():
    reasons = r"needs a CUDA GPU \(this is cpu\); it needs float16 or bfloat16 \(got float32"
    with pytest.raises(ValueError, match=reasons):
        attention_backend("cudnn", platform="cpu", dtype=jnp.float32, head_dim=40)
    with pytest.raises(ValueError, match=r"head dim must be a multiple of 8 and ≤ 128 \(got 160\)"):
        attention_backend("cudnn", platform="cuda", dtype=jnp.bfloat16, head_dim=160, compute_capability="8.6")
    with pytest.raises(ValueError, match="expected one of"):
        attention_backend("flash", platform="cuda", dtype=jnp.bfloat16, head_dim=64)


@pytest.mark.parametrize("shape", [(1, 1, 4096, 4096), (2, 8, 4096, 4096), (2, 8, 16384, 16384), (3, 5, 49, 77)])
def test_query_chunks_divide_the_queries_and_bound_the_scores(shape):
    b, heads, tq, tk = shape
    bound = 2**20 if tq < 100 else attention.MAX_ATTENTION_SCORES
    for max_scores in (bound, 1000, 1):
        n = attention.query_chunks(b, heads, tq, tk, max_scores)
        assert tq % n == 0 and (b * heads * (tq // n) * tk <= max_scores or n == tq)
        assert n == 1 or b * heads * (tq // (n - 1) if tq % (n - 1) == 0 else tq) * tk > max_scores
    assert attention.query_chunks(b, heads, tq, tk, None) == 1
    # SD1.5: one CFG pair at 512² stays whole; at 1024² its 16 GiB of scores go in 16 chunks
    assert attention.query_chunks(2, 8, 4096, 4096, attention.MAX_ATTENTION_SCORES) == 1
    assert attention.query_chunks(2, 8, 16384, 16384, attention.MAX_ATTENTION_SCORES) == 16


def test_chunked_xla_attention_equals_the_whole_and_holds_fewer_scores(monkeypatch):
    """Queries in chunks (6 here, a bound of 1/5 of the scores): the same output and gradients as jax's
    attention in one piece (float32, 1e-6), and XLA's buffer assignment for the chunked program needs
    less temporary memory than for the whole one."""
    keys = jax.random.split(jax.random.PRNGKey(0), 3)
    q = jax.random.normal(keys[0], (2, 96, 4, 8))
    k, v = (jax.random.normal(key, (2, 50, 4, 8)) for key in keys[1:])
    loss = lambda q, k, v: jnp.sum(jnp.sin(attention.attention(q, k, v, implementation="xla")))  # noqa: E731

    def run():
        f = jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2)))
        compiled = f.lower(q, k, v).compile()
        return f(q, k, v), compiled.memory_analysis().temp_size_in_bytes, compiled.as_text()

    monkeypatch.setattr(attention, "MAX_ATTENTION_SCORES", None)
    (whole_loss, whole_grads), whole_temp, _ = run()
    np.testing.assert_allclose(attention.attention(q, k, v), jax.nn.dot_product_attention(q, k, v), rtol=0, atol=0)
    monkeypatch.setattr(attention, "MAX_ATTENTION_SCORES", 2 * 4 * 96 * 50 // 5)
    assert attention.query_chunks(2, 4, 96, 50, attention.MAX_ATTENTION_SCORES) == 6
    (chunked_loss, chunked_grads), chunked_temp, hlo = run()
    assert "while" in hlo  # the chunks are a loop, not six copies side by side
    assert abs(float(chunked_loss - whole_loss)) <= 1e-6 * abs(float(whole_loss))
    for got, want in zip(chunked_grads, whole_grads, strict=True):
        assert float(jnp.max(jnp.abs(got - want)) / jnp.max(jnp.abs(want))) < 1e-6
    print(f"temp bytes: whole {whole_temp}, in 6 chunks {chunked_temp}")
    assert chunked_temp < whole_temp


@pytest.mark.skipif(not ON_CPU, reason="checks the fallback of the CPU backend")
def test_attention_falls_back_to_xla_on_the_cpu():
    """On this CPU a bf16 layer on "auto" compiles XLA's attention (no cuDNN call in the program) and
    gives exactly what "xla" gives; forcing "cudnn" fails with the reason."""
    assert accelerator() == ("cpu", None)
    layer = Attention(64, heads=4, head_dim=16, rngs=nnx.Rngs(0))
    graphdef, state = nnx.split(layer)
    state = jax.tree.map(lambda p: p.astype(jnp.bfloat16), state)
    x = jax.random.normal(jax.random.PRNGKey(1), (2, 16, 64), jnp.bfloat16)

    def run(implementation):
        model = nnx.merge(graphdef, state)
        set_attention_implementation(model, implementation)
        f = jax.jit(lambda s, x: nnx.merge(*nnx.split(model)[:1], s)(x))
        return f.lower(state, x).as_text(), f(state, x)

    (auto_hlo, auto), (_, xla) = run("auto"), run("xla")
    assert "cudnn" not in auto_hlo.lower() and "custom_call" not in auto_hlo
    np.testing.assert_array_equal(np.asarray(auto, np.float32), np.asarray(xla, np.float32))
    with pytest.raises(ValueError, match=r"attention implementation 'cudnn' cannot run: it needs a CUDA GPU"):
        run("cudnn")


def test_set_attention_implementation_reaches_every_layer_and_recompiles(components):
    unet = nnx.merge(*nnx.split(components.unet))  # a copy: the fixture stays on "auto"
    layers = [m for _, m in nnx.iter_modules(unet) if isinstance(m, Attention)]
    assert set_attention_implementation(unet, "xla") == len(layers) == 8  # 1 + 1 + 2 blocks × (self, cross)
    assert {m.implementation for m in layers} == {"xla"}
    with pytest.raises(ValueError, match="expected one of"):
        set_attention_implementation(unet, "flash")

    block = BasicTransformerBlock(32, heads=4, context_dim=32, rngs=nnx.Rngs(0))
    x, context = jnp.zeros((1, 16, 32)), jnp.zeros((1, 77, 32))
    forward = nnx.jit(lambda model, x, c: model(x, c))
    forward(block, x, context)
    with CompileCounter() as same:
        forward(block, x, context)
    set_attention_implementation(block, "xla")
    with CompileCounter() as changed:
        forward(block, x, context)
    assert (same.count, changed.count) == (0, 1)  # the choice is part of the compiled program's key


# ---------------------------------------------------------------------------------------------------
# One compiled chain: no recompiles, no host round trips, donated latents
# ---------------------------------------------------------------------------------------------------


def test_second_call_compiles_nothing(pipe):
    """Everything a txt2img call compiles is reused by the next call with the same shapes, whatever the
    prompts and seed (that the counter counts: the test above)."""
    with CompileCounter() as first:
        pipe(PROMPTS, seed=0, output_type="latent", **CALL)
    with CompileCounter() as again:
        pipe(["a blue bird on a branch", "a cat"], seed=7, negative_prompt="blurry", output_type="latent", **CALL)
    print(f"compilations: first call {first.count}, second call {again.count}")
    assert again.count == 0


def test_the_chain_has_no_host_calls_and_donates_its_latents(pipe, monkeypatch):
    """The compiled chain (one lax.scan) calls the host only for the progress bar, and only when it is
    on; its starting latents are donated (their buffer is reused for the result)."""
    real, seen = pipeline._denoise, []

    def spy(*args, **kwargs):
        x = args[5]  # StableDiffusion._denoise passes (graphdef, state, dtype, progress, chain, x, …)
        hlo = real.lower(*args, **kwargs).as_text()
        out = real(*args, **kwargs)
        seen.append(
            {"callbacks": hlo.count("callback"), "loops": hlo.count("stablehlo.while"), "donated": x.is_deleted()}
        )
        return out

    monkeypatch.setattr(pipeline, "_denoise", spy)
    pipe(PROMPTS, output_type="latent", **CALL)
    pipe.progress = True
    try:
        pipe(PROMPTS, output_type="latent", **CALL)
    finally:
        pipe.progress = False
    quiet, ticking = seen
    assert quiet == {"callbacks": 0, "loops": 1, "donated": True}
    assert ticking["callbacks"] > 0


# ---------------------------------------------------------------------------------------------------
# The persistent compilation cache, across processes
# ---------------------------------------------------------------------------------------------------

FIRST_IMAGE = textwrap.dedent(
    """
    import json, sys, time
    import jax
    from sdjax.speed import enable_compilation_cache, random_components
    enable_compilation_cache(sys.argv[1])
    events = {}
    jax.monitoring.register_event_listener(lambda event, **_: events.__setitem__(event, events.get(event, 0) + 1))
    from sdjax import StableDiffusion
    pipe = StableDiffusion(random_components("tiny"))
    pipe.progress = False
    start = time.perf_counter()
    pipe("a red fox", num_inference_steps=2, output_type="np")
    seconds = time.perf_counter() - start
    count = lambda name: events.get("/jax/compilation_cache/" + name, 0)
    print(json.dumps({"seconds": seconds, "hits": count("cache_hits"), "misses": count("cache_misses")}))
    """
)


@pytest.mark.slow  # moved from the default run to keep it under 12 min on 2 cores (docs/testing.md)
def test_a_second_process_reads_every_program_from_the_cache(tmp_path):
    """Two fresh processes make the same image with sdjax.speed.enable_compilation_cache(path): the first
    compiles and writes every program, the second reads them all back and compiles none. (The time to
    the first image, at XLA's default optimisation and jax's default 1 s threshold for what is cached,
    is measured in benchmarks/NOTES.md.)"""
    # one CPU device, like a user's run; XLA's cheapest CPU code generation (the programs compile about
    # twice as fast, and the flags are part of the cache key, the same in both processes)
    env = os.environ | {"XLA_FLAGS": " ".join(f"--{k}={str(v).lower()}" for k, v in FAST_COMPILE.items())}

    def first_image() -> dict:
        done = subprocess.run(
            [sys.executable, "-c", FIRST_IMAGE, str(tmp_path / "cache")], capture_output=True, text=True, env=env
        )
        assert done.returncode == 0, done.stderr[-2000:]
        return json.loads(done.stdout.strip().splitlines()[-1])

    cold, warm = first_image(), first_image()
    print(f"time to first image: empty cache {cold['seconds']:.2f} s, warm cache {warm['seconds']:.2f} s")
    assert cold["misses"] > 0 and cold["hits"] == 0
    assert warm["hits"] == cold["misses"] and warm["misses"] == 0
    assert any((tmp_path / "cache").iterdir())


# ---------------------------------------------------------------------------------------------------
# bfloat16 within its tolerance of float32
# ---------------------------------------------------------------------------------------------------


def test_bf16_unet_stays_within_tolerance_of_float32(components):
    rng = np.random.default_rng(0)
    x = rng.standard_normal((2, 8, 8, 4), np.float32)
    t = np.array([10, 900])
    context = rng.standard_normal((2, 77, 32), np.float32)

    def forward(unet, dtype):
        graphdef, state = nnx.split(unet)
        args = (state, jnp.asarray(x, dtype), jnp.asarray(t), jnp.asarray(context, dtype))
        f = jax.jit(lambda s, x, t, c: nnx.merge(graphdef, s)(x, t, c))
        return f.lower(*args).compile(compiler_options=FAST_COMPILE)(*args)

    full = forward(components.unet, jnp.float32)
    low = forward(components.astype(jnp.bfloat16).unet, jnp.bfloat16)
    assert low.dtype == jnp.bfloat16
    error = rel_err(low.astype(jnp.float32), full)
    print(f"UNet bf16 vs fp32: {error:.2e} relative")
    assert 1e-4 < error < 3e-2  # above 1e-4: it did compute in bf16


def test_flop_counts_come_from_the_program_shapes():
    """count_flops: a (m, k) × (k, n) product is 2mnk FLOPs (a multiply-add counts 2), from shapes alone, and the
    attention-chunking limit it lifts while counting is put back. unet_flops: with 4× the positions a UNet's
    convolutions cost 4× and its mid block's self-attention 16× (every position against every other), so the whole
    lies strictly between."""
    from sdjax import speed
    from sdjax.models.unet import UNetConfig

    sds = jax.ShapeDtypeStruct
    assert speed.count_flops(jnp.matmul, sds((6, 5), jnp.float32), sds((5, 7), jnp.float32)) == 2 * 6 * 5 * 7
    assert attention.MAX_ATTENTION_SCORES is not None  # restored after counting
    config = UNetConfig(block_out_channels=(8, 16), down_block_types=("DownBlock2D",) * 2,
                        up_block_types=("UpBlock2D",) * 2, norm_num_groups=4)  # fmt: skip
    small, large = speed.unet_flops(config, 8, 8), speed.unet_flops(config, 16, 16)
    assert 4.0 < large / small < 16.0


def test_nested_unet_flops_add_the_shells_to_the_core():
    """nested_unet_flops: one level is the core UNet's own count; each shell adds a positive amount, less than the
    core UNet would cost run at that shell's resolution (the shells have no attention and are narrower)."""
    from sdjax import speed
    from sdjax.models.nested_unet import NestedUNetConfig
    from sdjax.models.unet import UNetConfig

    core = UNetConfig(sample_size=8, block_out_channels=(8, 16), down_block_types=("DownBlock2D", "AttnDownBlock2D"),
                      up_block_types=("AttnUpBlock2D", "UpBlock2D"), norm_num_groups=4)  # fmt: skip
    config = NestedUNetConfig(core, shell_channels=(8, 4), norm_num_groups=4)
    one, two, three = (speed.nested_unet_flops(config, k) for k in (1, 2, 3))
    assert one == speed.unet_flops(core, 8, 8)
    assert one < two < three
    assert three - two < speed.unet_flops(core, 32, 32)
