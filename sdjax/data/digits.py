"""Real handwritten digits that work offline.

scikit-learn ships the UCI optical-recognition digits inside the package: 1,797
images of 8x8 pixels with ink intensities 0..16. They are tiny, but real data,
and upsampled to 16 or 32 px they make a fast first dataset for a diffusion model.
"""

import jax
import numpy as np

from sdjax.data.dataset import ImageDataset


def load_digits(resolution: int = 32) -> ImageDataset:
    """The 1,797 scikit-learn digits, bilinearly upsampled to resolution x resolution.

    Returns images (1797, resolution, resolution, 1) float32 in [-1, 1] with
    white ink on black, like MNIST; labels {"digit": (1797,)}; captions such as
    "a handwritten 7".
    """
    if resolution < 8:
        raise ValueError(f"resolution must be >= 8 (the digits are 8x8), got {resolution}")
    from sklearn.datasets import load_digits as sklearn_digits  # scikit-learn loads in ~2 s: only when used

    bunch = sklearn_digits()
    small = (bunch.images / 16.0).astype(np.float32)[..., None]  # (N, 8, 8, 1) in [0, 1]
    images = jax.image.resize(small, (len(small), resolution, resolution, 1), method="bilinear")
    # Bilinear interpolation stays within the input range up to rounding; clip anyway
    # so the [-1, 1] contract holds exactly.
    images = np.clip(np.asarray(images), 0.0, 1.0) * 2.0 - 1.0
    digits = bunch.target.astype(np.int32)
    return ImageDataset(
        name="digits",
        images=images,
        labels={"digit": digits},
        label_names={"digit": tuple(str(d) for d in range(10))},
        captions=[f"a handwritten {d}" for d in digits],
    )
