"""How many lines of sdjax a Stable Diffusion txt2img run reads: the modules that loading a diffusers
folder with ``StableDiffusion.from_pretrained`` and drawing one image import, with their line counts.

    python tools/inference_path.py

It writes a tiny random SD model as a diffusers folder in one process, then loads and runs it in a
fresh one, and lists every sdjax module that second process imported. (The full-size model runs the
same code: the modules do not depend on the size.)
"""

from __future__ import annotations

import subprocess
import sys
import tempfile
from pathlib import Path

WRITE = """
import sys
from sdjax import convert
from sdjax.speed import random_components
convert.save_diffusers(random_components("tiny"), sys.argv[1])
"""
RUN = """
import sys
from sdjax import StableDiffusion
pipe = StableDiffusion.from_pretrained(sys.argv[1])
pipe.progress = False
pipe("a red fox", num_inference_steps=2, output_type="np")
print("\\n".join(sorted(m.__file__ for n, m in sys.modules.items() if n.startswith("sdjax") and m.__file__)))
"""


def modules() -> list[Path]:
    with tempfile.TemporaryDirectory() as folder:
        subprocess.run([sys.executable, "-c", WRITE, folder], check=True, capture_output=True)
        done = subprocess.run([sys.executable, "-c", RUN, folder], check=True, capture_output=True, text=True)
    return [Path(line) for line in done.stdout.split()]


def main() -> None:
    files = modules()
    root = files[0].parents[1] if files[0].parent.name == "sdjax" else files[0].parents[2]
    total = 0
    for path in files:
        lines = len(path.read_text().splitlines())
        total += lines
        print(f"{lines:6,d}  {path.relative_to(root)}")
    print(f"{total:6,d}  lines in {len(files)} modules")


if __name__ == "__main__":
    main()
