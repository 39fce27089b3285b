"""Procedural captioned shapes: a text-to-image dataset that needs no download.

Each image holds one or more coloured shapes on a plain or gradient background,
and its caption says exactly what is where:

    "a small red circle at the top left and a large blue square at the bottom
     right on a grey background"

Because every caption is generated from attributes (`ShapesSample`), and
`parse_caption` turns a caption back into those attributes, a prompt can be
turned into a target we can check a generated image against: is there a blue
square in the bottom-right cell?

Rendering: each (shape, size, position, resolution) mask is drawn once at 4x
resolution with vectorised inside-tests (circle and ring: distance; polygons:
half-plane tests, with the concave star and cross as unions of convex pieces),
average-pooled to anti-aliased coverage, and cached. An image is then a
background composited with a few cached masks, so generation is cheap: 10,000
images at 32 px take about 0.7 s on one CPU core, mask building included
(about 2 s at 64 px).
"""

import functools
from dataclasses import dataclass

import numpy as np

from sdjax.data.dataset import ImageDataset

SHAPES = ("circle", "ring", "square", "triangle", "star", "diamond", "cross")
COLOURS = ("red", "orange", "yellow", "green", "cyan", "blue", "purple", "pink")
SIZES = ("small", "large")
POSITIONS = (
    "top left", "top", "top right",
    "left", "centre", "right",
    "bottom left", "bottom", "bottom right",
)  # fmt: skip
BACKGROUNDS = ("white", "black", "grey", "gradient")
# Shapes outside the vocabulary: `sample_attributes`, and so every dataset and the bundled text-to-image
# model trained on them, never draw them. Notebook 07 teaches the model one from a few images.
NOVEL_SHAPES = ("crescent",)

# Saturated hues, far apart from each other and from every background colour
# (tests/test_data.py checks the distances).
COLOUR_RGB = {
    "red": (220, 40, 40),
    "orange": (245, 140, 20),
    "yellow": (245, 220, 40),
    "green": (40, 170, 70),
    "cyan": (40, 200, 220),
    "blue": (40, 80, 220),
    "purple": (140, 60, 190),
    "pink": (245, 130, 190),
}
# (top, bottom) RGB; plain backgrounds have top == bottom.
BACKGROUND_RGB = {
    "white": ((255, 255, 255), (255, 255, 255)),
    "black": ((0, 0, 0), (0, 0, 0)),
    "grey": ((128, 128, 128), (128, 128, 128)),
    "gradient": ((30, 40, 80), (180, 190, 215)),
}

_POSITION_PHRASE = {
    "top left": "at the top left",
    "top": "at the top",
    "top right": "at the top right",
    "left": "on the left",
    "centre": "in the centre",
    "right": "on the right",
    "bottom left": "at the bottom left",
    "bottom": "at the bottom",
    "bottom right": "at the bottom right",
}
_PHRASE_POSITION = {phrase: position for position, phrase in _POSITION_PHRASE.items()}
# American spellings a user might type into a prompt.
_WORD_ALIASES = {"center": "centre", "gray": "grey"}

# Object radius as a fraction of the image side. The grid cells are 1/3 wide, so
# even a large object (extent <= 1.1 radii) stays inside its own cell and two
# objects never overlap.
_SIZE_RADIUS = {"small": 0.10, "large": 0.15}
_SUPERSAMPLE = 4


@dataclass(frozen=True)
class ShapeObject:
    """One object: each field is a word from the matching vocabulary tuple."""

    shape: str
    colour: str
    size: str
    position: str

    def __post_init__(self):
        for value, vocab in (
            (self.shape, SHAPES + NOVEL_SHAPES),
            (self.colour, COLOURS),
            (self.size, SIZES),
            (self.position, POSITIONS),
        ):
            if value not in vocab:
                raise ValueError(f"{value!r} is not one of {vocab}")


@dataclass(frozen=True)
class ShapesSample:
    """Everything needed to render (and caption) one image."""

    objects: tuple[ShapeObject, ...]
    background: str

    def __post_init__(self):
        if self.background not in BACKGROUNDS:
            raise ValueError(f"{self.background!r} is not one of {BACKGROUNDS}")


def sample_attributes(rng: np.random.Generator, max_objects: int = 2) -> ShapesSample:
    """Draw 1..max_objects objects in distinct grid cells, listed in reading order."""
    n = int(rng.integers(1, max_objects + 1))
    positions = sorted(rng.permutation(len(POSITIONS))[:n].tolist())
    shapes = rng.integers(len(SHAPES), size=n)
    colours = rng.integers(len(COLOURS), size=n)
    sizes = rng.integers(len(SIZES), size=n)
    objects = tuple(
        ShapeObject(SHAPES[s], COLOURS[c], SIZES[z], POSITIONS[p])
        for s, c, z, p in zip(shapes, colours, sizes, positions, strict=True)
    )
    return ShapesSample(objects, BACKGROUNDS[rng.integers(len(BACKGROUNDS))])


def scenes_of(shape: str, n: int, seed: int = 0) -> list[ShapesSample]:
    """n one-object scenes of one ``shape`` (e.g. a novel one), every other attribute drawn uniformly:
    the few images of a new concept, and held-out scenes to test it on (notebook 07)."""
    rng = np.random.default_rng(seed)
    return [
        ShapesSample(
            (ShapeObject(shape, COLOURS[rng.integers(8)], SIZES[rng.integers(2)], POSITIONS[rng.integers(9)]),),
            BACKGROUNDS[rng.integers(4)],
        )
        for _ in range(n)
    ]


def caption(sample: ShapesSample) -> str:
    """e.g. "a small red circle at the top left and a large blue square on the right on a grey background"."""
    objects = " and ".join(f"a {o.size} {o.colour} {o.shape} {_POSITION_PHRASE[o.position]}" for o in sample.objects)
    return f"{objects} on a {sample.background} background"


def parse_caption(text: str) -> ShapesSample:
    """Inverse of `caption`; also accepts any case, a trailing full stop, "center" and "gray"."""
    words = [_WORD_ALIASES.get(w, w) for w in text.lower().strip().rstrip(".").split()]
    objects_text, sep, background_text = " ".join(words).rpartition(" on a ")
    if not sep or not background_text.endswith(" background"):
        raise ValueError(f"cannot parse {text!r}: expected it to end in 'on a <background> background'")
    return ShapesSample(
        objects=tuple(_parse_object(part, text) for part in objects_text.split(" and ")),
        background=background_text.removesuffix(" background"),
    )


def _parse_object(part: str, text: str) -> ShapeObject:
    words = part.split()
    position = _PHRASE_POSITION.get(" ".join(words[4:]))
    if len(words) < 5 or words[0] != "a" or position is None:
        raise ValueError(f"cannot parse {part!r} in {text!r}: expected 'a <size> <colour> <shape> <position>'")
    return ShapeObject(shape=words[3], colour=words[2], size=words[1], position=position)


def render(sample: ShapesSample, resolution: int = 32) -> np.ndarray:
    """Draw a sample. Returns (resolution, resolution, 3) float32 in [-1, 1]."""
    image = _background(sample.background, resolution).copy()
    # Painter's algorithm with the anti-aliased coverage as alpha, in place:
    # image = (1 - alpha) * image + alpha * colour.
    for obj in sample.objects:
        alpha = _coverage(obj.shape, obj.size, obj.position, resolution)[..., None]
        image += alpha * (_COLOUR_UNIT[obj.colour] - image)
    return image


def make_shapes(n: int, resolution: int = 32, seed: int = 0, max_objects: int = 2) -> ImageDataset:
    """Generate n captioned shape images, deterministically from seed.

    Labels (int32, shape (n,)): for each object slot k < max_objects,
    "shape_k", "colour_k", "size_k", "position_k" index into SHAPES, COLOURS,
    SIZES, POSITIONS (-1 when the image has fewer than k + 1 objects); plus
    "n_objects" and "background" (index into BACKGROUNDS).
    """
    if not 1 <= max_objects <= len(POSITIONS):
        raise ValueError(f"max_objects must be in 1..{len(POSITIONS)}, got {max_objects}")
    rng = np.random.default_rng(seed)
    return from_samples([sample_attributes(rng, max_objects) for _ in range(n)], resolution, max_objects)


def catalogue(resolution: int = 32) -> ImageDataset:
    """Every single-object image there is: 7 shapes × 8 colours × 2 sizes × 9 positions × 4
    backgrounds = 4,032 images, in that nested order. Rendering is deterministic, so a
    ``make_shapes(..., max_objects=1)`` image is always one of these: the reference against which
    generated samples can be checked (sdjax.metrics)."""
    samples = [
        ShapesSample((ShapeObject(shape, colour, size, position),), background)
        for shape in SHAPES
        for colour in COLOURS
        for size in SIZES
        for position in POSITIONS
        for background in BACKGROUNDS
    ]
    return from_samples(samples, resolution, max_objects=1)


def from_samples(samples: list[ShapesSample], resolution: int = 32, max_objects: int | None = None) -> ImageDataset:
    """Render and label given attribute sets (labels as :func:`make_shapes`; ``max_objects`` slots,
    default the most objects any sample has)."""
    if resolution < 16:
        raise ValueError(f"resolution must be >= 16 for shapes to stay recognisable, got {resolution}")
    n = len(samples)
    max_objects = max_objects or max(len(s.objects) for s in samples)
    images = np.empty((n, resolution, resolution, 3), np.float32)
    for i, sample in enumerate(samples):
        images[i] = render(sample, resolution)

    novel = any(o.shape in NOVEL_SHAPES for s in samples for o in s.objects)  # then labels index both
    slot_vocab = {
        "shape": SHAPES + NOVEL_SHAPES if novel else SHAPES,
        "colour": COLOURS,
        "size": SIZES,
        "position": POSITIONS,
    }
    index = {attr: {word: i for i, word in enumerate(vocab)} for attr, vocab in slot_vocab.items()}
    labels = {f"{attr}_{k}": np.full(n, -1, np.int32) for k in range(max_objects) for attr in slot_vocab}
    for i, sample in enumerate(samples):
        for k, obj in enumerate(sample.objects):
            for attr in slot_vocab:
                labels[f"{attr}_{k}"][i] = index[attr][getattr(obj, attr)]
    labels["n_objects"] = np.array([len(s.objects) for s in samples], np.int32)
    labels["background"] = np.array([BACKGROUNDS.index(s.background) for s in samples], np.int32)

    label_names = {f"{attr}_{k}": vocab for k in range(max_objects) for attr, vocab in slot_vocab.items()}
    label_names["n_objects"] = tuple(str(i) for i in range(max_objects + 1))
    label_names["background"] = BACKGROUNDS
    return ImageDataset(
        name="shapes",
        images=images,
        labels=labels,
        label_names=label_names,
        captions=[caption(s) for s in samples],
        attributes=list(samples),
    )


def object_coverage(obj: ShapeObject, resolution: int) -> np.ndarray:
    """Fraction of each pixel the object covers, (resolution, resolution) float32 in [0, 1].

    Handy for checks: pixels with coverage 1 show exactly the object's colour.
    """
    return _coverage(obj.shape, obj.size, obj.position, resolution).copy()


def position_centre(position: str) -> tuple[float, float]:
    """(x, y) centre of a grid cell as a fraction of the image side, y pointing down."""
    row, col = divmod(POSITIONS.index(position), 3)
    return (col + 0.5) / 3, (row + 0.5) / 3


def background_image(name: str, resolution: int) -> np.ndarray:
    """The bare background. Returns (resolution, resolution, 3) float32 in [-1, 1]."""
    return _background(name, resolution).copy()


def _to_unit(rgb) -> np.ndarray:
    """0..255 RGB -> float32 in [-1, 1]."""
    return np.asarray(rgb, np.float32) / 127.5 - 1.0


_COLOUR_UNIT = {name: _to_unit(rgb) for name, rgb in COLOUR_RGB.items()}


@functools.cache
def _background(name: str, resolution: int) -> np.ndarray:
    top, bottom = (_to_unit(rgb) for rgb in BACKGROUND_RGB[name])
    t = ((np.arange(resolution, dtype=np.float32) + 0.5) / resolution)[:, None, None]
    image = np.broadcast_to(top * (1 - t) + bottom * t, (resolution, resolution, 3)).copy()
    image.flags.writeable = False  # cached: callers must not modify it in place
    return image


@functools.cache
def _coverage(shape: str, size: str, position: str, resolution: int) -> np.ndarray:
    """Fraction of each pixel covered by the object, (resolution, resolution) float32 in [0, 1]."""
    fine = resolution * _SUPERSAMPLE
    grid = (np.arange(fine, dtype=np.float32) + 0.5) / fine  # sub-pixel centres, image units
    cx, cy = position_centre(position)
    radius = _SIZE_RADIUS[size]
    # Coordinates in units of the object radius, centred on the object; x is a
    # row vector and y a column vector, so the tests below broadcast to (fine, fine).
    x = (grid[None, :] - cx) / radius
    y = (grid[:, None] - cy) / radius
    if shape in ("circle", "ring"):
        squared_distance = x**2 + y**2
        mask = squared_distance <= 1.0
        if shape == "ring":
            mask &= squared_distance >= 0.5**2  # hole of half the radius
    elif shape == "crescent":
        # the unit disk less a disk of radius 0.8 centred at (0.5, 0): its horns end at x = 0.61, so
        # the bounding box spans x ∈ [−1, 0.61], centred by moving it 0.195 to the right
        x = x - 0.195
        mask = (x**2 + y**2 <= 1.0) & ((x - 0.5) ** 2 + y**2 >= 0.8**2)
    else:
        mask = np.zeros((fine, fine), bool)
        for polygon in _UNIT_POLYGONS[shape]:
            mask |= _inside_convex_polygon(x, y, polygon)
    coverage = mask.reshape(resolution, _SUPERSAMPLE, resolution, _SUPERSAMPLE).mean(axis=(1, 3))
    coverage = coverage.astype(np.float32)
    coverage.flags.writeable = False
    return coverage


def _inside_convex_polygon(x: np.ndarray, y: np.ndarray, vertices: np.ndarray) -> np.ndarray:
    """A point is inside a convex polygon iff it is on the same side of every edge.

    x, y broadcast against each other; vertices is (V, 2) in either winding order.
    """
    start = vertices[:, :, None, None]  # (V, 2, 1, 1) against (fine, fine) points
    edge = np.roll(vertices, -1, axis=0)[:, :, None, None] - start
    # z-component of edge x (point - start): its sign says which side the point is on.
    cross = edge[:, 0] * (y - start[:, 1]) - edge[:, 1] * (x - start[:, 0])
    return np.all(cross >= 0, axis=0) | np.all(cross <= 0, axis=0)


def _regular_polygon(n: int, radius: float, start_angle: float) -> np.ndarray:
    angles = start_angle + 2 * np.pi * np.arange(n) / n
    return np.stack([radius * np.cos(angles), radius * np.sin(angles)], axis=-1)


def _unit_polygons() -> dict[str, list[np.ndarray]]:
    """Each polygon shape as a union of convex polygons, in units of the object radius.

    Sizes are tuned so the shapes look about equally big, and each shape's
    bounding box is centred so it stays inside its grid cell. Angles use image
    coordinates (y down), so -pi/2 points up.
    """
    up = -np.pi / 2
    tips = _regular_polygon(5, 1.15, up)
    inner = _regular_polygon(5, 0.5, up + np.pi / 5)  # inner[k] sits between tips k and k+1
    polygons = {
        "square": [_regular_polygon(4, 0.85 * np.sqrt(2), np.pi / 4)],
        "triangle": [_regular_polygon(3, 1.25, up)],
        "diamond": [np.array([[0.0, -1.1], [0.9, 0.0], [0.0, 1.1], [-0.9, 0.0]])],
        # A star is concave, so split it into five convex kites (centre, inner, tip, inner).
        "star": [np.array([[0.0, 0.0], inner[k - 1], tips[k], inner[k]]) for k in range(5)],
        # A cross is concave too: the union of a horizontal and a vertical bar.
        "cross": [
            np.array([[-1.0, -0.36], [1.0, -0.36], [1.0, 0.36], [-1.0, 0.36]]),
            np.array([[-0.36, -1.0], [0.36, -1.0], [0.36, 1.0], [-0.36, 1.0]]),
        ],
    }
    for parts in polygons.values():
        points = np.concatenate(parts)
        shift = (points.max(axis=0) + points.min(axis=0)) / 2
        for part in parts:
            part -= shift
    return polygons


_UNIT_POLYGONS = _unit_polygons()
