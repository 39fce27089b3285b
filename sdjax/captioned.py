"""Captioned image datasets for fine-tuning: N pairs (x_i, c_i) of an image and its caption, from any of
the layouts such sets are shared in, read lazily.

``load_captioned(source)`` decides by what ``source`` is:

==============================  ==============================================================================
``source``                      read as
==============================  ==============================================================================
a Hugging Face dataset name     ``datasets.load_dataset(name, split=split)`` (online; offline only when cached)
(``lambdalabs/pokemon-blip-
captions``)
a ``save_to_disk`` folder       ``datasets.load_from_disk`` (``state.json``, or ``dataset_dict.json`` and one
                                folder per split)
an ``imagefolder``              ``metadata.jsonl`` (in the folder or in ``FOLDER/SPLIT/``): one JSON object a
                                line, ``{"file_name": "0001.png", "text": "a drawing of ..."}``; the file is the
                                ``image`` column, every other key a column
parquet / arrow files           the Hub's layout (``data/train-00000-of-00001.parquet``) or loose ``.arrow``
                                files; the image column holds ``{"bytes": PNG/JPEG bytes, "path": ...}``
a folder of images              ``NAME.png`` + ``NAME.txt`` (kohya's layout), the caption in the text file
==============================  ==============================================================================

Every layout but the last has columns; ``image_column`` and ``caption_column`` name the two used (default
``image`` and ``text``, the pokemon-blip-captions layout). A column that holds several captions per image
gives its first. Only the captions (strings) are held in memory: an image is decoded when asked for, so a
set of any size costs memory for the one image in use (and, for parquet, the compressed bytes).

Local paths never touch the network (only a Hub name does).
"""

from __future__ import annotations

import io
import json
import os
from collections.abc import Callable, Sequence
from pathlib import Path

from PIL import Image

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp")
TABLE_SUFFIXES = (".parquet", ".arrow")
SPLITS = ("train", "validation", "test")


class CaptionedImages:
    """N (image, caption) pairs. ``captions`` is a list of N strings; ``image(i)`` decodes image i as an RGB
    PIL image of its own size. ``layout`` names where it came from (see the module docstring)."""

    def __init__(self, source: str, layout: str, captions: Sequence[str], image: Callable[[int], Image.Image]):
        self.source, self.layout, self.captions, self._image = source, layout, list(captions), image

    def __len__(self) -> int:
        return len(self.captions)

    def image(self, i: int) -> Image.Image:
        return self._image(i)

    def __getitem__(self, i: int) -> tuple[Image.Image, str]:
        return self.image(i), self.captions[i]

    def __repr__(self) -> str:
        return f"CaptionedImages({self.source!r}, {self.layout}, {len(self)} images)"


def load_captioned(
    source: str | os.PathLike,
    *,
    split: str = "train",
    image_column: str = "image",
    caption_column: str = "text",
    limit: int | None = None,
) -> CaptionedImages:
    """The (image, caption) pairs of ``source``: a local folder or file in one of the layouts of the module
    docstring, or else a Hugging Face dataset name. ``limit`` keeps the first ``limit`` pairs.

    Raises FileNotFoundError for a path that does not exist (or a Hub name that cannot be had offline), and
    ValueError for a folder without images, a missing column (naming the columns there are), or images
    without captions.
    """
    path = Path(source).expanduser()
    if path.exists():
        dataset = _read_local(path, split, image_column, caption_column)
    elif _looks_like_path(str(source)):
        raise FileNotFoundError(
            f"{source}: no such file or folder; give a folder of captioned images, a dataset saved with "
            "save_to_disk, parquet/arrow files, or a Hugging Face dataset name such as "
            "'lambdalabs/pokemon-blip-captions'"
        )
    else:
        dataset = _from_table(_hub(str(source), split), str(source), "hub", image_column, caption_column)
    if limit is not None:
        dataset = CaptionedImages(dataset.source, dataset.layout, dataset.captions[:limit], dataset._image)
    if not len(dataset):
        raise ValueError(f"{source} holds no images (split {split!r})")
    return dataset


def _looks_like_path(source: str) -> bool:
    """A Hub name is ``name`` or ``owner/name``; anything else that does not exist is a missing path."""
    return (
        source.startswith((".", "/", "~"))
        or source.count("/") > 1
        or Path(source).suffix.lower() in TABLE_SUFFIXES + IMAGE_SUFFIXES
    )


def _read_local(path: Path, split: str, image_column: str, caption_column: str) -> CaptionedImages:
    if path.is_file():
        if path.suffix.lower() not in TABLE_SUFFIXES:
            raise ValueError(f"{path}: not a dataset file; give a .parquet or .arrow file, or a folder")
        return _from_table(_read_tables([path]), str(path), path.suffix[1:], image_column, caption_column)
    if (path / "state.json").is_file() or (path / "dataset_dict.json").is_file():
        return _from_table(_load_from_disk(path, split), str(path), "save_to_disk", image_column, caption_column)
    for metadata in (path / "metadata.jsonl", path / split / "metadata.jsonl"):
        if metadata.is_file():
            return _imagefolder(metadata, image_column, caption_column)
    tables = _split_files(path, split)
    if tables:
        return _from_table(_read_tables(tables), str(path), tables[0].suffix[1:], image_column, caption_column)
    if any(f.suffix.lower() in IMAGE_SUFFIXES for f in path.iterdir()):
        return _text_captions(path, image_column, caption_column)
    raise ValueError(
        f"{path} holds no images: expected a dataset saved with save_to_disk (state.json), an imagefolder "
        f"(metadata.jsonl), parquet/arrow files, or images ({', '.join(IMAGE_SUFFIXES)}) with NAME.txt captions"
    )


# ---------------------------------------------------------------------------------------------------
# Tables: a datasets.Dataset from the Hub, save_to_disk, parquet or arrow files
# ---------------------------------------------------------------------------------------------------


def _hub(name: str, split: str):
    """``datasets.load_dataset(name, split=split)``, offline from the cache only (sdjax.data.hub)."""
    import datasets

    from sdjax.data.hub import DatasetUnavailableError, hub_reachable, load_from_cache

    if hub_reachable():
        return datasets.load_dataset(name, split=split)
    try:
        return load_from_cache(name, split)
    except DatasetUnavailableError as error:
        raise FileNotFoundError(f"{error} Or give a local folder (see sdjax.captioned).") from error


def _load_from_disk(path: Path, split: str):
    import datasets

    dataset = datasets.load_from_disk(str(path))
    if isinstance(dataset, datasets.DatasetDict):
        if split not in dataset:
            raise ValueError(f"{path} has no split {split!r}; its splits are {sorted(dataset)}: pick one with split=")
        dataset = dataset[split]
    return dataset


def _split_files(folder: Path, split: str) -> list[Path]:
    """The parquet/arrow files under ``folder`` of ``split``: named ``SPLIT-*``/``SPLIT.*`` or in a folder
    ``SPLIT``; all of them when none is named after any split."""
    files = sorted(f for f in folder.rglob("*") if f.suffix.lower() in TABLE_SUFFIXES and f.is_file())

    def split_of(f: Path) -> str | None:
        names = [f.stem.split("-")[0], *f.relative_to(folder).parts[:-1]]
        return next((s for s in SPLITS if s in names), None)

    if not any(split_of(f) for f in files):
        return files
    chosen = [f for f in files if split_of(f) == split]
    if not chosen:
        found = sorted({split_of(f) for f in files} - {None})
        raise ValueError(f"{folder} has no {split!r} files; its splits are {found}: pick one with split=")
    return chosen


def _read_tables(files: list[Path]):
    """One ``datasets.Dataset`` over parquet (memory-mapped by pyarrow) or arrow files (memory-mapped by
    datasets), with the features their schema records (``datasets.Image`` decodes to PIL)."""
    import datasets
    import pyarrow as pa
    import pyarrow.parquet as pq

    if len({f.suffix.lower() for f in files}) > 1:
        raise ValueError(f"{files[0].parent}: both parquet and arrow files; keep the files of one dataset only")
    if files[0].suffix.lower() == ".arrow":
        return datasets.concatenate_datasets([datasets.Dataset.from_file(str(f)) for f in files])
    return datasets.Dataset(pa.concat_tables([pq.read_table(f, memory_map=True) for f in files]))


def _from_table(dataset, source: str, layout: str, image_column: str, caption_column: str) -> CaptionedImages:
    columns = list(dataset.column_names)
    for kind, column in (("image", image_column), ("caption", caption_column)):
        if column not in columns:
            raise ValueError(
                f"{source} has no {kind} column {column!r}; its columns are {columns}: "
                f"pick one with {kind}_column= (--{kind}-column)"
            )
    captions = [_caption(c) for c in dataset[caption_column]]
    _check_captions(source, captions, [f"row {i}" for i in range(len(captions))], "fill them in, or drop those rows")
    images = dataset.select_columns([image_column])
    return CaptionedImages(source, layout, captions, lambda i: _as_image(images[i][image_column], image_column))


def _caption(value) -> str | None:
    """A caption cell: a string, or a list of captions (the first is kept)."""
    if isinstance(value, list | tuple):
        value = value[0] if value else None
    return value.strip() if isinstance(value, str) else None


def _as_image(value, column: str) -> Image.Image:
    """An image cell — a PIL image (``datasets.Image``) or ``{"bytes", "path"}`` (the stored form) — as RGB."""
    if isinstance(value, dict) and (value.get("bytes") or value.get("path")):
        value = Image.open(io.BytesIO(value["bytes"]) if value.get("bytes") else value["path"])
    if not isinstance(value, Image.Image):
        raise ValueError(f"column {column!r} holds {type(value).__name__}, not images: pick one with image_column=")
    return value.convert("RGB")


def _check_captions(source: str, captions: list[str | None], names: list[str], fix: str) -> None:
    missing = [name for name, c in zip(names, captions, strict=True) if not c]
    if missing:
        shown = ", ".join(missing[:5]) + (f" and {len(missing) - 5} more" if len(missing) > 5 else "")
        raise ValueError(f"{source}: {len(missing)} of {len(captions)} images have no caption ({shown}): {fix}")


# ---------------------------------------------------------------------------------------------------
# Folders of image files: an imagefolder (metadata.jsonl), or NAME.png + NAME.txt
# ---------------------------------------------------------------------------------------------------


def image_files(folder: str | os.PathLike) -> list[Path]:
    """The images directly in ``folder``, sorted by name."""
    folder = Path(folder)
    if not folder.is_dir():
        raise FileNotFoundError(f"{folder}: not a folder; give a folder holding the training images")
    files = sorted(f for f in folder.iterdir() if f.suffix.lower() in IMAGE_SUFFIXES)
    if not files:
        raise ValueError(f"{folder} holds no images ({', '.join(IMAGE_SUFFIXES)})")
    return files


def _open(path: Path) -> Image.Image:
    with Image.open(path) as image:
        return image.convert("RGB")


def _imagefolder(metadata: Path, image_column: str, caption_column: str) -> CaptionedImages:
    """datasets' imagefolder: ``file_name`` (relative to metadata.jsonl) is the ``image`` column."""
    folder = metadata.parent
    rows = []
    for number, line in enumerate(metadata.read_text(encoding="utf-8").splitlines(), start=1):
        if line.strip():
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError as error:
                raise ValueError(f"{metadata}, line {number}: not JSON ({error})") from None
    if not rows or "file_name" not in rows[0]:
        raise ValueError(f'{metadata}: expected one {{"file_name": ..., "{caption_column}": ...}} per line')
    columns = ["image"] + [k for k in rows[0] if k != "file_name"]
    if image_column != "image":
        raise ValueError(f"{metadata}: an imagefolder's image column is 'image' (file_name), not {image_column!r}")
    if caption_column not in columns:
        raise ValueError(
            f"{metadata} has no caption column {caption_column!r}; its columns are {columns}: "
            "pick one with caption_column= (--caption-column)"
        )
    files = [folder / row.get("file_name", "") for row in rows]
    absent = [str(f) for f in files if not f.is_file()]
    if absent:
        raise FileNotFoundError(f"{metadata} names {len(absent)} files that are not there, e.g. {absent[0]}")
    listed = {f.resolve() for f in files}
    every = sorted(f for f in folder.rglob("*") if f.suffix.lower() in IMAGE_SUFFIXES)
    unlisted = [str(f.relative_to(folder)) for f in every if f.resolve() not in listed]
    captions = [_caption(row.get(caption_column)) for row in rows] + [None] * len(unlisted)
    fix = f'give each image a line {{"file_name": ..., "{caption_column}": ...}}'
    _check_captions(str(metadata), captions, [str(row.get("file_name")) for row in rows] + unlisted, fix)
    return CaptionedImages(str(folder), "imagefolder", captions, lambda i: _open(files[i]))


def _text_captions(folder: Path, image_column: str, caption_column: str) -> CaptionedImages:
    """NAME.png + NAME.txt: the caption is the text file's content."""
    if (image_column, caption_column) != ("image", "text"):
        raise ValueError(
            f"{folder} is a folder of images with NAME.txt captions: it has no columns to pick, "
            "leave image_column/caption_column at their defaults"
        )
    files = image_files(folder)
    texts = [f.with_suffix(".txt") for f in files]
    captions = [t.read_text(encoding="utf-8").strip() if t.is_file() else None for t in texts]
    _check_captions(
        str(folder), captions, [f.name for f in files], "write NAME.txt beside each NAME.png, or a metadata.jsonl"
    )
    return CaptionedImages(str(folder), "image + .txt folder", captions, lambda i: _open(files[i]))
