"""The README's picture of the bundled model: one image per prompt, captioned, from `sdjax txt2img`'s defaults.

    python tools/readme_figure.py            # writes docs/images/tiny-sd-shapes.png
"""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")

from sdjax import StableDiffusion, tiny_sd  # noqa: E402
from sdjax.viz import show_captioned  # noqa: E402

PROMPTS = [
    "a large red circle in the centre on a white background",
    "a small blue star at the bottom right on a black background",
    "a large yellow triangle at the top left on a grey background",
    "a small green square on the left and a large purple ring on the right on a white background",
    "a large orange diamond at the bottom on a gradient background",
    "a small pink cross at the top right and a large red star at the bottom left on a grey background",
    "a large cyan ring in the centre on a black background",
    "a small yellow circle at the top and a large blue triangle at the bottom on a white background",
]


def main() -> None:
    pipe = StableDiffusion.from_pretrained(tiny_sd.BUNDLE)
    pipe.progress = False
    images = pipe(PROMPTS, num_inference_steps=25, guidance_scale=4.0, seed=0, output_type="np")
    fig = show_captioned(images * 2 - 1, PROMPTS, ncol=4, width=26, scale=1.6)  # viz takes [-1, 1]
    out = Path(__file__).resolve().parents[1] / "docs" / "images" / "tiny-sd-shapes.png"
    fig.savefig(out, dpi=80, bbox_inches="tight")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
