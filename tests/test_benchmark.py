"""benchmarks/bench.py runs end to end at the tiny size on the CPU and writes its table.

A smoke test: 2 sampler steps, 1 timed rep per measure, no new-process measures (each would start
Python, jax and torch again; tests/test_speed.py covers the persistent cache they time), XLA's cheapest
code generation and one torch thread, so it compiles fast and leaves the CPU to itself. No timing is
asserted; the table must hold a number for sdjax and for diffusers in every row, and the same-weights
check between them must hold at float32.
"""

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("torch")
pytest.importorskip("diffusers")

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
