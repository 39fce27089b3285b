"""Test-session set-up.

Four virtual CPU devices, so data-parallel code paths run for real on a machine with one CPU: XLA
reads this flag once, when JAX starts, hence before anything imports jax.

A persistent compilation cache (``JAX_COMPILATION_CACHE_DIR``, default ``~/.cache/sdjax/jax-tests``), so that
the identical programs many tests compile (the same tiny models, the same chains) compile once per run and
a second run reads them back. Every program counts, however fast it compiled. The cache is keyed on the
program, the compiler options and the jax version, so a stale entry is never used; CI points it elsewhere.
"""

import os
from pathlib import Path

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=4")
os.environ.setdefault("SDJAX_OFFLINE", "1")  # tests never touch the network
if "JAX_COMPILATION_CACHE_DIR" not in os.environ:
    cache = Path.home() / ".cache" / "sdjax" / "jax-tests"
    cache.mkdir(mode=0o700, parents=True, exist_ok=True)  # compiled code: a folder only its owner can write
    os.environ["JAX_COMPILATION_CACHE_DIR"] = str(cache)
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")


# Under `--dist loadfile` each file runs whole on one worker, in collection order as workers free up. The files
# that take longest go first, so that no worker is left alone with a long file at the end (with 2 workers the
# cold-cache run spent its last 8 of 14 minutes on 16 % of the tests). Longest first, by the 2026-12-04 runs.
HEAVY_FIRST = (
    "test_diffusion.py", "test_finetune.py", "test_convert.py", "test_benchmark.py", "test_pipeline.py",
    "test_img2img.py", "test_tiny_sd.py", "test_multidevice.py", "test_cli.py", "test_cli_finetune.py",
    "test_textual_inversion.py", "test_lora.py", "test_cli_txt2img.py", "test_bundled_model.py", "test_samplers.py",
    "test_speed.py", "test_train.py",
)  # fmt: skip


def pytest_collection_modifyitems(config, items):
    rank = {name: i for i, name in enumerate(HEAVY_FIRST)}
    items.sort(key=lambda item: rank.get(item.path.name, len(rank)))  # stable: the order within a file stays
