"""Image datasets from the Hugging Face Hub, failing fast and clearly when offline.

Online, `load_hf("mnist")`, `load_hf("cifar10")` or an image-caption set such as
`load_hf("lambdalabs/naruto-blip-captions")` download through `datasets` (and
are cached). Offline, only the local `datasets` cache is tried, with the
libraries switched to offline mode so nothing waits on network timeouts; if the
dataset is not cached, `DatasetUnavailableError` says so at once and points to
the datasets that always work offline: `sdjax.data.load("shapes")` and
`sdjax.data.load("digits")`.
"""

import contextlib
import os
import socket
import threading
import urllib.parse

import numpy as np
from PIL import Image

from sdjax.data.dataset import ImageDataset

# Checked in this order when no caption column is given.
CAPTION_COLUMNS = ("text", "caption", "captions", "prompt", "sentence", "description")
_OFFLINE_VARIABLES = ("SDJAX_OFFLINE", "HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE")
_TRUE_VALUES = ("1", "true", "yes", "on")


class DatasetUnavailableError(RuntimeError):
    """The requested dataset is neither reachable on the Hub nor in the local cache."""


def hub_reachable(timeout: float = 3.0) -> bool:
    """Whether the Hub can be reached, answered within about `timeout` seconds.

    False without trying when SDJAX_OFFLINE, HF_HUB_OFFLINE or HF_DATASETS_OFFLINE
    is set to a true value; otherwise tries a TCP connection to the Hub
    (huggingface.co, or the host in HF_ENDPOINT).
    """
    if any(os.environ.get(var, "").strip().lower() in _TRUE_VALUES for var in _OFFLINE_VARIABLES):
        return False
    endpoint = urllib.parse.urlparse(os.environ.get("HF_ENDPOINT", "https://huggingface.co"))
    address = (endpoint.hostname, endpoint.port or (443 if endpoint.scheme == "https" else 80))
    connected = threading.Event()

    def connect():
        with contextlib.suppress(OSError), socket.create_connection(address, timeout=timeout):
            connected.set()

    # The socket timeout does not cover the DNS lookup, which can stall for much
    # longer on a badly configured offline machine; waiting on a daemon thread
    # bounds the whole check.
    threading.Thread(target=connect, daemon=True).start()
    return connected.wait(timeout)


def load_hf(
    name: str,
    split: str = "train",
    resolution: int = 32,
    image_column: str | None = None,
    label_column: str | None = None,
    caption_column: str | None = None,
    limit: int | None = None,
    channels: int | None = None,
) -> ImageDataset:
    """Load a Hub image dataset as (N, resolution, resolution, channels) float32 in [-1, 1].

    Columns are detected from the dataset's features unless given: the image
    column is the first `datasets.Image` feature, the label column the first
    `ClassLabel` (its class names become `label_names`), the caption column the
    first of CAPTION_COLUMNS present. Images are centre-cropped to a square and
    resized with PIL. `channels` is 1 or 3; by default 1 if the first image is
    greyscale, else 3. `limit` keeps the first `limit` examples.

    Raises DatasetUnavailableError quickly when the Hub is unreachable and the
    dataset is not in the local cache.
    """
    # datasets is slow to import (pyarrow, pandas), so only pay for it here.
    import datasets

    if hub_reachable():
        dataset = datasets.load_dataset(name, split=split)
    else:
        dataset = load_from_cache(name, split)
    if limit is not None:
        dataset = dataset.select(range(min(limit, len(dataset))))

    features = dataset.features
    image_column = image_column or _first_column(features, datasets.Image)
    if image_column is None:
        raise ValueError(f"{name!r} has no image column; its features are {dict(features)}")
    label_column = label_column or _first_column(features, datasets.ClassLabel)
    caption_column = caption_column or next((c for c in CAPTION_COLUMNS if c in features), None)

    # Rows of just the image column, so iterating does not decode anything else.
    image_rows = dataset.select_columns([image_column])
    if channels is None:
        channels = 1 if image_rows[0][image_column].mode in ("1", "L", "LA", "I", "I;16", "F") else 3
    if channels not in (1, 3):
        raise ValueError(f"channels must be 1 or 3, got {channels}")
    mode = "L" if channels == 1 else "RGB"
    images = np.empty((len(dataset), resolution, resolution, channels), np.float32)
    for i, row in enumerate(image_rows):
        images[i] = _to_array(row[image_column], resolution, mode)

    labels, label_names = {}, {}
    if label_column is not None:
        labels[label_column] = np.asarray(dataset[label_column], np.int32)
        if isinstance(features[label_column], datasets.ClassLabel):
            label_names[label_column] = tuple(features[label_column].names)
    captions = None
    if caption_column is not None:
        # Some sets store several captions per image; keep the first.
        captions = [c if isinstance(c, str) else c[0] for c in dataset[caption_column]]
    return ImageDataset(name=name, images=images, labels=labels, label_names=label_names, captions=captions)


def load_from_cache(name: str, split: str):
    """Load from the local `datasets` cache only, or raise DatasetUnavailableError."""
    import datasets
    import huggingface_hub.constants

    # Both libraries read their offline flag from the environment once, at
    # import, and consult these module attributes on each call; flipping them
    # makes `load_dataset` go straight to the cache instead of retrying the network.
    modules = (datasets.config, huggingface_hub.constants)
    previous = [module.HF_HUB_OFFLINE for module in modules]
    try:
        for module in modules:
            module.HF_HUB_OFFLINE = True
        return datasets.load_dataset(name, split=split)
    except Exception as error:
        raise DatasetUnavailableError(
            f"Dataset {name!r} (split {split!r}) is unavailable: the Hugging Face Hub is "
            "unreachable (no network, or SDJAX_OFFLINE/HF_HUB_OFFLINE is set) and the "
            "dataset is not in the local datasets cache. Datasets that work offline: "
            'sdjax.data.load("shapes") (captioned procedural shapes) and '
            'sdjax.data.load("digits") (handwritten digits from scikit-learn).'
        ) from error
    finally:
        for module, value in zip(modules, previous, strict=True):
            module.HF_HUB_OFFLINE = value


def _first_column(features, feature_type) -> str | None:
    return next((column for column, feature in features.items() if isinstance(feature, feature_type)), None)


def _to_array(image: Image.Image, resolution: int, mode: str) -> np.ndarray:
    """PIL image -> (resolution, resolution, 1 or 3) float32 in [-1, 1]."""
    image = image.convert(mode)
    # Centre-crop to a square first so non-square photos are not squashed.
    width, height = image.size
    side = min(width, height)
    left, top = (width - side) // 2, (height - side) // 2
    # PIL's resize filters are antialiased when downsampling.
    image = image.crop((left, top, left + side, top + side))
    image = image.resize((resolution, resolution), Image.Resampling.BICUBIC)
    array = np.asarray(image, np.float32) / 127.5 - 1.0
    return array.reshape(resolution, resolution, -1)
