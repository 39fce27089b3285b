"""Datasets and batching for sdjax.

Every source returns an `ImageDataset`: NHWC float32 images in [-1, 1] plus
labels, class names and (where there are any) captions.

Offline, with nothing to download:
    load("shapes", n=10_000)   procedural coloured shapes with exact captions,
                               the default text-to-image dataset
    load("digits")             1,797 real handwritten digits shipped with scikit-learn

Online, from the Hugging Face Hub (then cached locally):
    load("mnist"), load("fashion_mnist"), load("cifar10"), or an image-caption
    set such as load("lambdalabs/naruto-blip-captions", resolution=64)

When the Hub cannot be reached and the dataset is not cached, `load` raises
`DatasetUnavailableError` straight away instead of waiting on the network.
Set SDJAX_OFFLINE=1 to skip even the quick reachability check.
"""

from sdjax.data.dataset import ImageDataset
from sdjax.data.digits import load_digits
from sdjax.data.hub import DatasetUnavailableError, hub_reachable, load_hf
from sdjax.data.loader import (
    batch_indices,
    epoch_permutation,
    iterate_batches,
    num_batches,
)
from sdjax.data.shapes import (
    BACKGROUNDS,
    COLOURS,
    POSITIONS,
    SHAPES,
    SIZES,
    ShapeObject,
    ShapesSample,
    caption,
    catalogue,
    from_samples,
    make_shapes,
    parse_caption,
    render,
    sample_attributes,
)


def load(name: str, **kwargs) -> ImageDataset:
    """Load a dataset by name: "shapes" -> make_shapes (n defaults to 10,000),
    "digits" -> load_digits, anything else -> load_hf (a Hub dataset)."""
    if name == "shapes":
        kwargs.setdefault("n", 10_000)
        return make_shapes(**kwargs)
    if name == "digits":
        return load_digits(**kwargs)
    return load_hf(name, **kwargs)


__all__ = [
    "BACKGROUNDS",
    "COLOURS",
    "POSITIONS",
    "SHAPES",
    "SIZES",
    "DatasetUnavailableError",
    "ImageDataset",
    "ShapeObject",
    "ShapesSample",
    "batch_indices",
    "caption",
    "catalogue",
    "epoch_permutation",
    "from_samples",
    "hub_reachable",
    "iterate_batches",
    "load",
    "load_digits",
    "load_hf",
    "make_shapes",
    "num_batches",
    "render",
    "parse_caption",
    "sample_attributes",
]
