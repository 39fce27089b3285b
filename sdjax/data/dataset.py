"""The one container every data source in sdjax returns.

An `ImageDataset` is deliberately just arrays in memory: the datasets used for
teaching (procedural shapes, digits, MNIST-sized Hub sets) fit comfortably in
RAM, and plain numpy arrays are the easiest thing to inspect, slice and feed to
`jax.device_put`.
"""

from dataclasses import dataclass, field

import numpy as np


@dataclass
class ImageDataset:
    """Images plus whatever describes them.

    Attributes:
        name: where the data came from, e.g. "shapes" or "mnist".
        images: (N, H, W, C) float32 in [-1, 1], NHWC like everything in sdjax.
        labels: integer arrays keyed by label name, each with first dim N
            (e.g. {"digit": (N,)}). -1 marks "absent" where a source uses it.
        label_names: class names per label key, so `label_names[k][labels[k][i]]`
            names the label of sample i.
        captions: N strings describing the images, or None.
        attributes: N source-specific objects that generated each sample
            (e.g. `ShapesSample`), or None.
    """

    name: str
    images: np.ndarray
    labels: dict[str, np.ndarray] = field(default_factory=dict)
    label_names: dict[str, tuple[str, ...]] = field(default_factory=dict)
    captions: list[str] | None = None
    attributes: list | None = None

    def __post_init__(self):
        # Catch mismatched lengths here, not as a confusing shape error deep in
        # a training step.
        if self.images.ndim != 4:
            raise ValueError(f"images must be (N, H, W, C), got shape {self.images.shape}")
        n = len(self.images)
        for key, value in self.labels.items():
            if len(value) != n:
                raise ValueError(f"labels[{key!r}] has {len(value)} rows, images has {n}")
        for what, values in (("captions", self.captions), ("attributes", self.attributes)):
            if values is not None and len(values) != n:
                raise ValueError(f"{what} has {len(values)} entries, images has {n}")

    def __len__(self) -> int:
        return len(self.images)

    def subset(self, n_or_indices) -> "ImageDataset":
        """A new dataset with the first n samples, or the samples at the given indices.

        Used by notebooks' quick mode to train on a small slice.
        """
        if isinstance(n_or_indices, (int, np.integer)):
            indices = np.arange(min(int(n_or_indices), len(self)))
        else:
            indices = np.asarray(n_or_indices, dtype=np.int64)
        return ImageDataset(
            name=self.name,
            images=self.images[indices],
            labels={key: value[indices] for key, value in self.labels.items()},
            label_names=dict(self.label_names),
            captions=None if self.captions is None else [self.captions[i] for i in indices],
            attributes=None if self.attributes is None else [self.attributes[i] for i in indices],
        )
