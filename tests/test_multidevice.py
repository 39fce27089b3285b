"""Data parallelism on eight devices gives what one device gives: txt2img.

The test session has one CPU device (tests/conftest.py); this file needs eight, and XLA reads its device
count once per process, so the work runs in a subprocess started with
``XLA_FLAGS=--xla_force_host_platform_device_count=8`` (and XLA's cheapest code generation, which only
makes it compile faster). In it:

- txt2img (tiny random SD, 3 prompts, Euler ancestral so the per-image step noise is exercised, w = 7.5)
  on one device and split over eight. 3 images on 8 devices is the uneven case: the batch is padded to
  8 with copies of the last image and cut back. Only the summation order inside a device's convolutions
  and matmuls may differ (per-device batch 1 instead of 3), so float32 reassociation is all that
  separates them. Tolerances: final latents 1e-4 relative (max |Δ| / max |ref|; measured 3.0e-6), images
  1e-4 absolute in [0, 1] (measured 5.4e-6). A second call compiles nothing. With the VAE in 32-pixel
  tiles the images also agree to 1e-4 (measured 3.7e-6; each window of the sharded batch decoded where it lies).
- training on several devices is checked in tests/test_train.py (four devices against one) and
  tests/test_distributed.py (two processes of two devices against one process of four, and of one).
"""

import json
import os
import subprocess
import sys
import textwrap

SCRIPT = textwrap.dedent(
    """
    import json
    import jax, numpy as np
    from sdjax import StableDiffusion, pipeline
    from sdjax.speed import CompileCounter, random_components

    def rel(a, b):
        return float(np.max(np.abs(np.asarray(a) - np.asarray(b))) / np.max(np.abs(np.asarray(b))))

    out = {"devices": jax.device_count()}

    # txt2img: one device, then all eight
    pipe = StableDiffusion(random_components("tiny"))
    pipe.progress = False
    shardings = []
    real = pipeline._denoise
    def spy(*args, **kwargs):
        shardings.append(args[5].sharding)  # x: (graphdef, state, dtype, progress, chain, x, …)
        return real(*args, **kwargs)
    pipeline._denoise = spy
    prompts = ["a red fox", "a blue bird on a branch", "a green tree"]
    kwargs = dict(num_inference_steps=3, scheduler="euler_a", guidance_scale=7.5, seed=5)
    pipe.devices = jax.devices()[:1]
    one = {kind: pipe(prompts, output_type=kind, **kwargs) for kind in ("latent", "np")}
    pipe.devices = None
    eight = {kind: pipe(prompts, output_type=kind, **kwargs) for kind in ("latent", "np")}
    with CompileCounter() as again:
        pipe(prompts, output_type="np", **kwargs)
    out["chain devices"] = [len(s.device_set) for s in shardings[:4:2]]
    out["split on data"] = shardings[-1].spec == jax.sharding.PartitionSpec("data")
    out["latents"] = rel(eight["latent"], one["latent"])
    out["images"] = float(np.max(np.abs(eight["np"] - one["np"])))
    out["shape"] = list(eight["np"].shape)
    out["recompiles"] = again.count
    # the VAE in 32-pixel tiles (9 windows of the 64² images): the windows of a sharded batch
    pipe.enable_vae_tiling(32)
    pipe.devices = jax.devices()[:1]
    tiled_one = pipe(prompts, output_type="np", **kwargs)
    pipe.devices = None
    tiled_eight = pipe(prompts, output_type="np", **kwargs)
    out["tiled images"] = float(np.max(np.abs(tiled_eight - tiled_one)))
    out["tiling changes images"] = float(np.max(np.abs(tiled_eight - eight["np"])))

    print("RESULT " + json.dumps(out))
    """
)


def test_eight_devices_equal_one():
    env = os.environ | {
        "XLA_FLAGS": "--xla_force_host_platform_device_count=8 --xla_backend_optimization_level=0 "
        "--xla_llvm_disable_expensive_passes=true"
    }
    done = subprocess.run([sys.executable, "-c", SCRIPT], capture_output=True, text=True, env=env)
    assert done.returncode == 0, done.stderr[-3000:]
    line = next(x for x in done.stdout.splitlines() if x.startswith("RESULT "))
    out = json.loads(line.removeprefix("RESULT "))
    print(out)
    assert out["devices"] == 8
    assert out["chain devices"] == [1, 8] and out["split on data"]  # it did split the batch
    assert out["shape"] == [3, 64, 64, 3]  # the padding is gone
    assert out["latents"] < 1e-4 and out["images"] < 1e-4
    assert out["recompiles"] == 0
    assert out["tiled images"] < 1e-4 < out["tiling changes images"]
