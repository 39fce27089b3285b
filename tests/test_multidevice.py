"""Data parallelism on eight devices gives what one device gives: txt2img and a training step.

The test session has four virtual CPU devices (tests/conftest.py); this file needs eight, and XLA reads
its device count once per process, so the work runs in a subprocess started with
``XLA_FLAGS=--xla_force_host_platform_device_count=8`` (and XLA's cheapest code generation, which only
makes it compile faster). In it:

- txt2img (tiny random SD, 3 prompts, Euler ancestral so the per-image step noise is exercised, w = 7.5)
  on one device and split over eight. 3 images on 8 devices is the uneven case: the batch is padded to
  8 with copies of the last image and cut back. Only the summation order inside a device's convolutions
  and matmuls may differ (per-device batch 1 instead of 3), so float32 reassociation is all that
  separates them. Tolerances: final latents 1e-4 relative (max |Δ| / max |ref|; measured 3.0e-6), images
  1e-4 absolute in [0, 1] (measured 5.4e-6). A second call compiles nothing. With the VAE in 32-pixel
  tiles the images also agree to 1e-4 (measured 3.7e-6; each window of the sharded batch decoded where it lies).
- one step of :func:`sdjax.train.fit` on a small UNet with sdjax's diffusion loss, batch 8, on one device
  and on eight (each holds one example, the gradient all-reduced by XLA). SGD, so that the update is the
  gradient itself, −η g (Adam's first step is ≈ −η sign(g), which flips for gradient entries that are
  0 up to rounding). Tolerance 1e-4 relative on the update and the loss (measured 6.9e-6 and 8.6e-7).
"""

import json
import os
import subprocess
import sys
import textwrap

SCRIPT = textwrap.dedent(
    """
    import json
    import jax, numpy as np, optax
    from flax import nnx
    from sdjax import StableDiffusion, pipeline
    from sdjax.diffusion import diffusion_loss
    from sdjax.models.unet import UNet2D, UNetConfig
    from sdjax.speed import CompileCounter, random_components, random_init
    from sdjax.train import fit

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

    # one training step: one device, then all eight
    config = UNetConfig(sample_size=8, in_channels=3, out_channels=3, block_out_channels=(16, 32),
                        layers_per_block=1, down_block_types=("DownBlock2D",) * 2, up_block_types=("UpBlock2D",) * 2,
                        norm_num_groups=8)
    images = np.random.default_rng(1).uniform(-1, 1, (16, 8, 8, 3)).astype(np.float32)
    runs = []
    for devices in (jax.devices()[:1], jax.devices()):
        model = random_init(UNet2D, config, np.random.default_rng(0))
        before = jax.tree.map(np.asarray, nnx.state(model, nnx.Param))
        result = fit(model, diffusion_loss(pipe.schedule), {"image": images}, steps=1, batch_size=8,
                     optimizer=optax.sgd(0.1), devices=devices, progress=False)
        after = jax.tree.map(np.asarray, nnx.state(model, nnx.Param))
        update = np.concatenate([(a - b).ravel() for a, b in zip(jax.tree.leaves(after), jax.tree.leaves(before))])
        runs.append((update, result.history["loss"][0]))
    (update_1, loss_1), (update_8, loss_8) = runs
    out["update"] = rel(update_8, update_1)
    out["loss"] = abs(loss_8 - loss_1) / abs(loss_1)
    out["update norm"] = float(np.linalg.norm(update_1))
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
    assert out["update norm"] > 0 and out["update"] < 1e-4 and out["loss"] < 1e-4
