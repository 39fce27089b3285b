"""Test-session set-up.

One CPU device and LLVM's quickest optimisation level (below): XLA reads these flags once, when JAX starts,
hence before anything imports jax. A test marked ``@pytest.mark.devices(n)`` needs n devices: it runs in a
subprocess whose XLA has n virtual CPU devices (:func:`pytest_pyfunc_call`), so the data-parallel code
paths run for real on a machine with one CPU while every other test runs unsharded, as on one GPU
(four virtual devices for the whole session cost a fifth of its time: a batch of one image was padded to
four, and every training step compiled for four devices).

A persistent compilation cache (``JAX_COMPILATION_CACHE_DIR``, default ``~/.cache/sdjax/jax-tests``), so that
the identical programs many tests compile (the same tiny models, the same chains) compile once per run and
a second run reads them back. Every program counts, however fast it compiled. The cache is keyed on the
program, the compiler options and the jax version, so a stale entry is never used; CI points it elsewhere.
"""

import os
import subprocess
import sys
from pathlib import Path

import pytest

# LLVM's optimisation level 0 for the compiled CPU code: compiles about a fifth faster, runs a little slower,
# computes the same operations (the level changes how XLA's kernels are optimised, not what they compute;
# float rounding may differ, which every tolerance already allows).
# Measured cold on test_convert/img2img/tiny_sd/pipeline, one process: 370 s at the default level, 305 s here.
# The notebooks, the benchmarks and the CLI keep XLA's defaults, so CI still runs the optimised code.
OPTIMISATION = "--xla_backend_optimization_level=0"
os.environ.setdefault("XLA_FLAGS", OPTIMISATION)
os.environ.setdefault("SDJAX_OFFLINE", "1")  # tests never touch the network
if "JAX_COMPILATION_CACHE_DIR" not in os.environ:
    cache = Path.home() / ".cache" / "sdjax" / "jax-tests"
    cache.mkdir(mode=0o700, parents=True, exist_ok=True)  # compiled code: a folder only its owner can write
    os.environ["JAX_COMPILATION_CACHE_DIR"] = str(cache)
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")

# The files that take longest with an empty cache (seconds, all their tests together, from `pytest --junitxml`,
# 2026-12-05, fourth session), run first: pytest-xdist (`--dist loadfile`) hands whole files to whichever worker
# is free, in collection order, so a long file collected last keeps one worker busy while the other waits. Longest first
# lets the short files fill in at the end and the two workers finish together.
LONGEST_FIRST = {
    "test_convert.py": 132, "test_img2img.py": 123, "test_finetune.py": 97, "test_diffusion.py": 88,
    "test_pipeline.py": 85, "test_controlnet.py": 76, "test_pipeline_sdxl.py": 71, "test_cli_txt2img.py": 70,
    "test_train.py": 66, "test_tiny_sd.py": 9, "test_models.py": 57, "test_pipeline_precision_and_sizes.py": 49,
    "test_cli_finetune.py": 47, "test_unet.py": 46, "test_controlnet_training.py": 40, "test_multidevice.py": 37,
    "test_bundled_model.py": 31, "test_matryoshka.py": 30, "test_wuerstchen.py": 30, "test_sdxl_unet.py": 24,
    # 2026-12-05 (sixth session), one worker on a busy machine: the model-sharing files
    "test_merge.py": 60, "test_finetune_dataset.py": 40, "test_distributed.py": 40, "test_lycoris.py": 36,
    "test_hypernetwork.py": 21,
    "test_exercises.py": 23,
    "test_samplers.py": 23, "test_vq.py": 19, "test_speed.py": 17, "test_pipeline_sd2.py": 16, "test_lora.py": 16,
    "test_prompt_syntax.py": 13, "test_samplers_kdiffusion.py": 13, "test_pretrained.py": 12,
    "test_textual_inversion.py": 11,
}  # fmt: skip


def pytest_collection_modifyitems(items):
    """Order the files longest first (:data:`LONGEST_FIRST`; the rest after them, in their usual order)."""
    items.sort(key=lambda item: -LONGEST_FIRST.get(Path(str(item.fspath)).name, 0))


@pytest.hookimpl(tryfirst=True)
def pytest_pyfunc_call(pyfuncitem):
    """Run a test marked ``devices(n)`` in a fresh ``pytest`` process with n virtual CPU devices, unless this
    process already has n; its output is shown if it fails."""
    marker = pyfuncitem.get_closest_marker("devices")
    if marker is None:
        return None
    import jax

    n = marker.args[0]
    if jax.device_count() == n:
        return None  # run here, as usual
    flags = f"--xla_force_host_platform_device_count={n} {OPTIMISATION}"
    argv = [sys.executable, "-m", "pytest", "-q", "-n0", "-p", "no:cacheprovider", pyfuncitem.nodeid]
    done = subprocess.run(argv, cwd=pyfuncitem.config.rootpath, env=os.environ | {"XLA_FLAGS": flags},
                          capture_output=True, text=True)  # fmt: skip
    if done.returncode != 0 or "1 passed" not in done.stdout:  # (a test skipped there has not passed here)
        pytest.fail(f"on {n} virtual devices (XLA_FLAGS={flags!r}):\n{done.stdout[-4000:]}", pytrace=False)
    return True
