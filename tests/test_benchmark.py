"""benchmarks/bench.py runs end to end at the tiny size on the CPU and writes its table; its verdicts on
the issue's targets (judged only for SD1.5 on a GPU) follow from the measures.

The end-to-end test is a smoke test: 2 sampler steps, 1 timed rep per measure, no new-process measures
(each would start Python, jax and torch again; tests/test_speed.py covers the persistent cache they
time), XLA's cheapest code generation and one torch thread, so it compiles fast and leaves the CPU to
itself. No timing is asserted; the table must hold a number for sdjax and for diffusers in every row,
and the same-weights check between them must hold at float32. The verdict tests feed made-up timings
to the report's functions.
"""

import importlib.util
import os
import re
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest

BENCH = Path(__file__).parent.parent / "benchmarks" / "bench.py"
MEASURES = (
    "UNet forward, batch 2",
    "UNet forward, batch 16",
    "txt2img 2 steps + CFG, batch 1",
    "txt2img 2 steps + CFG, batch 8",
    "VAE decode",
    "training step",
)
NUMBER = r"[0-9.e+-]+ \([0-9.e+-]+–[0-9.e+-]+, 1\)"  # median (min–max, reps)


def test_tiny_benchmark_writes_a_table_with_both_sides(tmp_path):
    pytest.importorskip("torch")
    pytest.importorskip("diffusers")
    out = tmp_path / "RESULTS.md"
    env = os.environ | {
        "XLA_FLAGS": "--xla_backend_optimization_level=0 --xla_llvm_disable_expensive_passes=true",  # one device
        "OMP_NUM_THREADS": "1",
    }
    command = [sys.executable, str(BENCH), "--size", "tiny", "--steps", "2", "--reps", "1", "--no-processes",
               "--out", str(out)]  # fmt: skip
    done = subprocess.run(command, capture_output=True, text=True, env=env)
    assert done.returncode == 0, done.stderr[-3000:]
    table = out.read_text()
    assert table in done.stdout  # printed as written
    assert "| measure | sdjax | diffusers |" in table
    for measure in MEASURES:
        row = next(line for line in table.splitlines() if line.startswith(f"| {measure}"))
        cells = [c.strip() for c in row.strip("|").split("|")][1:]
        assert len(cells) == 2 and all(re.fullmatch(NUMBER, c) for c in cells), row
    parity = float(re.search(r"max \|Δ\| / max \|ref\| = ([0-9.]+e[+-][0-9]+)", table).group(1))
    assert parity < 1e-5  # float32: the same weights on both sides
    assert "Compilations during a second txt2img call with the same shapes (sdjax): 0." in table


def load_bench():
    spec = importlib.util.spec_from_file_location("bench", BENCH)
    bench = importlib.util.module_from_spec(spec)
    sys.modules["bench"] = bench  # its dataclasses look their module up
    spec.loader.exec_module(bench)
    return bench


def test_target_verdicts_follow_the_measures():
    """The verdict table of an SD1.5 GPU run, from made-up timings on either side of each target. sdjax
    is judged on its first column, against diffusers' columns only: the second sdjax column here trains
    fastest of all and must not count as the competitor."""
    bench = load_bench()
    args = SimpleNamespace(size="sd15", on_gpu=True, image=512, train_batch=8)

    def timing(seconds):
        return bench.Timing(first=10 * seconds, reps=[0.9 * seconds, seconds, 1.1 * seconds])

    gflop = 1e9
    results = {
        "sdjax": dict(txt2img_1=timing(0.300), txt2img_8=timing(1.2), unet_16=timing(0.040),
                      vae=timing(0.020), train=timing(0.5)),  # fmt: skip
        "sdjax (xla attention)": dict(txt2img_1=timing(0.6), txt2img_8=timing(2.0), unet_16=timing(0.05),
                                      vae=timing(0.020), train=timing(0.1)),  # fmt: skip
        "diffusers": dict(txt2img_1=timing(1.3), txt2img_8=timing(2.8), unet_16=timing(0.053),
                          vae=timing(0.023), train=timing(0.6)),  # fmt: skip
        "diffusers (torch.compile default)": dict(txt2img_1=timing(1.26), unet_16=timing(0.037)),  # no training
    }
    flops = dict(unet_16=16 * 803 * gflop)
    measured = bench.InProcess(results, flops, parity=1e-3, low_precision=1e-2, recompiles=0)
    best = 700e12  # the matmul ceiling: 321 TFLOP/s at 40 ms is 45.9 %
    gib = 2**30
    children = [
        ("sdjax, empty cache", "512²", dict(first_image_s=40.0, process_s=60.0, peak_bytes=4 * gib)),
        ("sdjax, warm cache", "512²", dict(first_image_s=3.0, process_s=20.0, peak_bytes=3 * gib)),
        ("diffusers", "512²", dict(first_image_s=2.0, process_s=20.0, peak_bytes=int(3.5 * gib))),
        ("sdjax", "512×1024", dict(first_image_s=5.0, process_s=25.0, peak_bytes=6 * gib)),
        ("diffusers", "512×1024", dict(first_image_s=5.0, process_s=25.0, peak_bytes=7 * gib)),
        ("sdjax", "1024×1024", dict(error="exit 1: RESOURCE_EXHAUSTED")),
    ]
    lines = bench.targets(args, measured, best, children)
    assert lines[0] == "| target | sdjax | verdict |"
    verdicts = {}
    for line in lines[2:]:
        target, value, verdict = (c.strip() for c in line.strip("|").split("|"))
        verdicts[target] = (value, verdict)
    assert verdicts == {
        "txt2img batch 1 ≤ 350 ms": ("300 ms", "met"),
        "txt2img batch 8 ≥ 5 images/s": ("6.67", "met"),
        "UNet batch 16 ≥ 60 % of the matmul ceiling": ("45.9 %", "**not met**"),
        "VAE decode ≤ 15 ms": ("20.0 ms", "**not met**"),
        "training step faster than diffusers'": ("16 vs 13.3 images/s", "met"),
        "cold compile ≤ 30 s": ("40.0 s", "**not met**"),
        "warm cache ≤ 5 s to first image": ("3.0 s", "met"),
        "peak memory ≤ diffusers' at 512² batch 1": ("3.00 GiB vs 3.50 GiB", "met"),
        "512×1024 and 1024² run on one GPU": ("512×1024 6.00 GiB, 1024×1024 failed", "**not met**"),
    }

    # a run that only timed the new processes judges only their targets; a CPU run or the tiny size, none
    assert len(bench.targets(args, None, best, children)) == 2 + 4
    cpu = SimpleNamespace(size="sd15", on_gpu=False, image=512, train_batch=8)
    assert "not evaluated" in bench.targets(cpu, measured, best, children)[0]


def test_a_failed_measure_is_reported_and_the_rest_still_judged():
    """A measure that raised (out of memory, say) shows as 'failed' in the table and the targets, with its
    error listed, instead of losing the whole run."""
    bench = load_bench()
    args = SimpleNamespace(size="sd15", on_gpu=True, image=512, latent=64, train_batch=8, train_latent=64, steps=50,
                           dtype="bfloat16", command="python benchmarks/bench.py --size sd15")  # fmt: skip
    ok = bench.Timing(first=1.0, reps=[0.3])
    results = {"sdjax": dict(txt2img_1=ok, txt2img_8=ok, unet_2=ok, unet_16=ok, train=ok),
               "diffusers": dict(txt2img_1=ok, txt2img_8=ok, unet_2=ok, unet_16=ok, vae=ok)}  # fmt: skip
    failed = {("sdjax", "vae"): "XlaRuntimeError: RESOURCE_EXHAUSTED: out of memory",
              ("diffusers", "train"): "OutOfMemoryError: CUDA out of memory"}  # fmt: skip
    flops = dict.fromkeys(("unet_2", "unet_16", "vae", "train", "txt2img_1", "txt2img_8"), 1e12)
    measured = bench.InProcess(results, flops, parity=1e-3, low_precision=1e-2, recompiles=0, failed=failed)
    text = bench.report(args, {"jax device": "gpu"}, {"jax": 7e14, "torch": 7e14}, measured, [])
    vae_row = next(line for line in text.splitlines() if line.startswith("| VAE decode, 1 image, ms"))
    assert [c.strip() for c in vae_row.strip("|").split("|")][1:] == ["failed", "300 (300–300, 1)"]
    assert "- sdjax, vae: `XlaRuntimeError: RESOURCE_EXHAUSTED: out of memory`" in text
    assert "| VAE decode ≤ 15 ms | failed | n/a |" in text
    assert "| training step faster than diffusers' | 26.7 vs failed images/s | n/a |" in text
    assert "| txt2img batch 1 ≤ 350 ms | 300 ms | met |" in text
