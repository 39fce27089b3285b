"""Tests for sdjax.data. None of them touches the network."""

import os
import socket
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import datasets
import jax
import numpy as np
import pytest
from PIL import Image

from sdjax import data, devices
from sdjax.data import hub, shapes
from sdjax.data.shapes import ShapeObject, ShapesSample

SLOT_ATTRIBUTES = ("shape", "colour", "size", "position")


@pytest.fixture(scope="module")
def shapes32():
    return data.make_shapes(2000, resolution=32, seed=0)


# ImageDataset


def test_subset_keeps_everything_aligned(shapes32):
    first = shapes32.subset(5)
    assert len(first) == 5
    np.testing.assert_array_equal(first.images, shapes32.images[:5])
    picked = shapes32.subset([7, 2])
    assert picked.captions == [shapes32.captions[7], shapes32.captions[2]]
    assert picked.attributes == [shapes32.attributes[7], shapes32.attributes[2]]
    for key, value in picked.labels.items():
        np.testing.assert_array_equal(value, shapes32.labels[key][[7, 2]])
    assert picked.label_names == shapes32.label_names


def test_image_dataset_rejects_mismatched_lengths():
    with pytest.raises(ValueError, match="labels"):
        data.ImageDataset("x", np.zeros((3, 8, 8, 1), np.float32), labels={"y": np.zeros(2, int)})
    with pytest.raises(ValueError, match="captions"):
        data.ImageDataset("x", np.zeros((3, 8, 8, 1), np.float32), captions=["a", "b"])


# Shapes


def test_shapes_are_deterministic_from_seed():
    a, b, c = (data.make_shapes(64, seed=seed) for seed in (1, 1, 2))
    np.testing.assert_array_equal(a.images, b.images)
    assert a.captions == b.captions
    for key in a.labels:
        np.testing.assert_array_equal(a.labels[key], b.labels[key])
    assert a.captions != c.captions
    assert not np.array_equal(a.images, c.images)


@pytest.mark.parametrize("resolution", [32, 64])
def test_shapes_shape_dtype_and_range(resolution):
    ds = data.load("shapes", n=50, resolution=resolution, seed=0)
    assert len(ds) == 50
    assert ds.images.shape == (50, resolution, resolution, 3)
    assert ds.images.dtype == np.float32
    assert ds.images.min() >= -1.0 and ds.images.max() <= 1.0
    for key, value in ds.labels.items():
        assert value.shape == (50,) and np.issubdtype(value.dtype, np.integer), key
        assert set(ds.label_names) >= {key}


def test_shapes_reject_tiny_resolution():
    with pytest.raises(ValueError, match="resolution"):
        data.make_shapes(4, resolution=8)


def test_caption_round_trip(shapes32):
    for text, sample in zip(shapes32.captions, shapes32.attributes, strict=True):
        assert data.caption(sample) == text
        assert data.parse_caption(text) == sample
        assert data.caption(data.parse_caption(text)) == text


def test_caption_wording():
    sample = ShapesSample(
        (ShapeObject("circle", "red", "small", "top left"), ShapeObject("square", "blue", "large", "centre")),
        "grey",
    )
    assert data.caption(sample) == (
        "a small red circle at the top left and a large blue square in the centre on a grey background"
    )


def test_parse_caption_accepts_prompt_variants_and_rejects_garbage():
    expected = ShapesSample((ShapeObject("star", "orange", "large", "centre"),), "grey")
    assert data.parse_caption("A large orange star in the center on a gray background.") == expected
    for bad in (
        "a red circle",
        "a small red circle on a grey background",
        "a small red blob at the top on a grey background",
        "a small red circle at the top on a plaid background",
    ):
        with pytest.raises(ValueError):
            data.parse_caption(bad)


def test_labels_agree_with_captions(shapes32):
    names, labels = shapes32.label_names, shapes32.labels
    for i, text in enumerate(shapes32.captions):
        sample = data.parse_caption(text)
        assert labels["n_objects"][i] == len(sample.objects)
        assert names["background"][labels["background"][i]] == sample.background
        for k in range(2):
            for attr in SLOT_ATTRIBUTES:
                value = labels[f"{attr}_{k}"][i]
                if k < len(sample.objects):
                    assert names[f"{attr}_{k}"][value] == getattr(sample.objects[k], attr)
                else:
                    assert value == -1


def test_all_vocabulary_appears(shapes32):
    vocabularies = {"shape": data.SHAPES, "colour": data.COLOURS, "size": data.SIZES, "position": data.POSITIONS}
    for attr, vocab in vocabularies.items():
        used = set()
        for k in range(2):
            used |= {vocab[v] for v in shapes32.labels[f"{attr}_{k}"] if v >= 0}
        assert used == set(vocab), attr
    assert {data.BACKGROUNDS[v] for v in shapes32.labels["background"]} == set(data.BACKGROUNDS)
    assert set(shapes32.labels["n_objects"]) == {1, 2}
    # Objects in one image never share a grid cell.
    assert all(len({o.position for o in s.objects}) == len(s.objects) for s in shapes32.attributes)


def test_vocabulary_sizes():
    assert len(data.SHAPES) >= 6 and len(data.COLOURS) >= 8 and len(data.POSITIONS) == 9


def test_colours_are_distinguishable():
    colours = np.array(list(shapes.COLOUR_RGB.values()), float)
    pairwise = np.linalg.norm(colours[:, None] - colours[None], axis=-1)
    assert pairwise[~np.eye(len(colours), dtype=bool)].min() > 75
    for top, bottom in shapes.BACKGROUND_RGB.values():
        for t in np.linspace(0, 1, 11):
            background = (1 - t) * np.array(top) + t * np.array(bottom)
            assert np.linalg.norm(colours - background, axis=-1).min() > 75


@pytest.mark.parametrize("resolution", [32, 64])
def test_rendered_image_shows_the_captioned_objects(shapes32, resolution):
    ds = shapes32 if resolution == 32 else data.make_shapes(200, resolution=resolution, seed=0)
    grid = (np.arange(resolution) + 0.5) / resolution
    for image, sample in zip(ds.images[:200], ds.attributes[:200], strict=True):
        np.testing.assert_array_equal(image, data.render(sample, resolution))
        far_from_objects = np.ones((resolution, resolution), bool)
        for obj in sample.objects:
            colour = np.array(shapes.COLOUR_RGB[obj.colour]) / 127.5 - 1
            cx, cy = shapes.position_centre(obj.position)
            if obj.shape != "ring":  # a ring's centre is its hole
                row, col = int(cy * resolution), int(cx * resolution)
                np.testing.assert_allclose(image[row, col], colour, atol=1e-5)
            covered = shapes.object_coverage(obj, resolution) == 1.0
            assert covered.sum() >= 4
            np.testing.assert_allclose(image[covered], np.broadcast_to(colour, image[covered].shape), atol=1e-5)
            # Objects stay inside their grid cell (half-width 1/6 of the image side).
            distance = np.maximum(abs(grid[None, :] - cx), abs(grid[:, None] - cy))
            far_from_objects &= distance > 0.19
        background = shapes.background_image(sample.background, resolution)
        np.testing.assert_array_equal(image[far_from_objects], background[far_from_objects])


def test_large_objects_are_larger_than_small_ones():
    for shape in data.SHAPES:
        small, large = (
            shapes.object_coverage(ShapeObject(shape, "red", size, "centre"), 64).sum() for size in data.SIZES
        )
        assert large > 1.5 * small, shape


# Digits


@pytest.mark.parametrize("resolution", [16, 32])
def test_digits(resolution):
    ds = data.load("digits", resolution=resolution)
    assert ds.images.shape == (1797, resolution, resolution, 1)
    assert ds.images.dtype == np.float32
    assert ds.images.min() >= -1.0 and ds.images.max() <= 1.0
    assert ds.images.max() > 0.9 and ds.images.min() < -0.9  # ink and background both present
    digits = ds.labels["digit"]
    assert set(digits) == set(range(10))
    assert ds.label_names["digit"] == tuple("0123456789")
    assert ds.captions[:3] == [f"a handwritten {d}" for d in digits[:3]]


# Hugging Face Hub


@pytest.fixture
def no_network(monkeypatch):
    """Make any attempt to open a connection or call load_dataset fail the test loudly."""

    def refuse(*args, **kwargs):
        raise AssertionError("a test tried to use the network")

    monkeypatch.setattr(socket, "create_connection", refuse)
    monkeypatch.setattr(datasets, "load_dataset", refuse)


@pytest.mark.parametrize("variable", ["SDJAX_OFFLINE", "HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE"])
def test_hub_unreachable_when_offline_variable_set(monkeypatch, no_network, variable):
    monkeypatch.setenv(variable, "1")
    assert not data.hub_reachable()


def test_hub_reachable_uses_a_quick_socket_check(monkeypatch):
    for variable in ("SDJAX_OFFLINE", "HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "HF_ENDPOINT"):
        monkeypatch.delenv(variable, raising=False)
    addresses = []

    def fake_connect(address, timeout):
        addresses.append(address)
        return socket.socket()  # unconnected; only closed by the caller

    monkeypatch.setattr(socket, "create_connection", fake_connect)
    assert data.hub_reachable(timeout=1.0)
    assert addresses == [("huggingface.co", 443)]

    def fail_to_connect(address, timeout):
        raise OSError("unreachable")

    monkeypatch.setattr(socket, "create_connection", fail_to_connect)
    assert not data.hub_reachable(timeout=1.0)


def test_load_hf_offline_raises_quickly_and_names_alternatives(monkeypatch, no_network):
    monkeypatch.setenv("SDJAX_OFFLINE", "1")
    offline_flag = datasets.config.HF_HUB_OFFLINE
    start = time.perf_counter()
    with pytest.raises(data.DatasetUnavailableError) as error:
        data.load("mnist")
    assert time.perf_counter() - start < 5
    assert isinstance(error.value, RuntimeError)
    message = str(error.value)
    for expected in ("'mnist'", "unreachable", 'sdjax.data.load("shapes")', 'sdjax.data.load("digits")'):
        assert expected in message
    assert datasets.config.HF_HUB_OFFLINE == offline_flag  # cache-only mode was undone


def _fake_hub_dataset(mode: str) -> datasets.Dataset:
    colours = {"L": [255, 0, 128], "RGB": [(255, 0, 0), (0, 0, 255), (0, 255, 0)]}[mode]
    return datasets.Dataset.from_dict(
        {
            "img": [Image.new(mode, (40, 30), colour) for colour in colours],
            "fine_label": [2, 0, 1],
            "text": ["first", "second", "third"],
        },
        features=datasets.Features(
            {
                "img": datasets.Image(),
                "fine_label": datasets.ClassLabel(names=["cat", "dog", "fox"]),
                "text": datasets.Value("string"),
            }
        ),
    )


@pytest.mark.parametrize("mode, channels", [("RGB", 3), ("L", 1)])
def test_load_hf_detects_columns_and_converts_images(monkeypatch, mode, channels):
    monkeypatch.setattr(hub, "hub_reachable", lambda timeout=3.0: True)
    monkeypatch.setattr(datasets, "load_dataset", lambda name, split: _fake_hub_dataset(mode))
    ds = data.load("someone/fake-set", resolution=16, limit=2)
    assert ds.name == "someone/fake-set"
    assert ds.images.shape == (2, 16, 16, channels)
    assert ds.images.dtype == np.float32
    expected_first_pixel = [1.0, -1.0, -1.0] if mode == "RGB" else [1.0]
    np.testing.assert_allclose(ds.images[0], np.broadcast_to(expected_first_pixel, (16, 16, channels)))
    np.testing.assert_array_equal(ds.labels["fine_label"], [2, 0])
    assert ds.label_names == {"fine_label": ("cat", "dog", "fox")}
    assert ds.captions == ["first", "second"]


# Batching


def test_num_batches():
    assert data.num_batches(103, 10) == 10
    assert data.num_batches(103, 10, drop_last=False) == 11
    assert data.num_batches(100, 10, drop_last=False) == 10


def test_batch_indices_cover_each_index_once_per_epoch():
    key = jax.random.key(0)
    for epoch in range(3):
        steps = range(10 * epoch, 10 * (epoch + 1))
        indices = np.concatenate([data.batch_indices(key, 100, 10, step) for step in steps])
        assert sorted(indices.tolist()) == list(range(100))
    # With a remainder, the dropped examples differ between epochs but nothing repeats.
    epoch0 = np.concatenate([data.batch_indices(key, 103, 10, step) for step in range(10)])
    assert len(set(epoch0.tolist())) == 100 and epoch0.max() < 103
    assert not np.array_equal(data.batch_indices(key, 100, 10, 0), data.batch_indices(key, 100, 10, 10))


def test_batch_indices_are_reproducible():
    np.testing.assert_array_equal(
        data.batch_indices(jax.random.key(3), 100, 10, 17), data.batch_indices(jax.random.key(3), 100, 10, 17)
    )
    np.testing.assert_array_equal(  # old-style raw uint32 keys work too
        data.batch_indices(jax.random.PRNGKey(3), 100, 10, 17), data.batch_indices(jax.random.PRNGKey(3), 100, 10, 17)
    )
    assert not np.array_equal(
        data.batch_indices(jax.random.key(3), 100, 10, 17), data.batch_indices(jax.random.key(4), 100, 10, 17)
    )


def test_iterate_batches_resumes_exactly():
    key = jax.random.key(1)
    arrays = {"x": np.arange(50, dtype=np.float32)[:, None] * np.ones(3, np.float32), "y": np.arange(50)}
    full = list(data.iterate_batches(arrays, 8, key, num_steps=20))  # 6 batches per epoch: crosses epochs
    resumed = list(data.iterate_batches(arrays, 8, key, start_step=7, num_steps=13))
    assert len(full) == 20 and len(resumed) == 13
    for a, b in zip(full[7:], resumed, strict=True):
        np.testing.assert_array_equal(a["x"], b["x"])
        np.testing.assert_array_equal(a["y"], b["y"])
    for step, batch in enumerate(full):
        assert batch["x"].shape == (8, 3) and isinstance(batch["y"], np.ndarray)
        np.testing.assert_array_equal(batch["y"], data.batch_indices(key, 50, 8, step))
        np.testing.assert_array_equal(batch["x"][:, 0], batch["y"])  # leaves stay aligned


def test_iterate_batches_epochs_and_plain_arrays():
    key = jax.random.key(2)
    assert len(list(data.iterate_batches(np.arange(50), 8, key, epochs=2))) == 12
    assert len(list(data.iterate_batches(np.arange(50), 8, key, start_step=5, epochs=2))) == 7
    with pytest.raises(ValueError):
        next(data.iterate_batches(np.arange(50), 8, key, num_steps=1, epochs=1))
    with pytest.raises(ValueError, match="first dim"):
        next(data.iterate_batches({"a": np.arange(5), "b": np.arange(6)}, 2, key))


@pytest.mark.devices(4)
def test_shard_batch_and_replicate_on_local_devices():
    """On all four local devices, and on one of them."""
    for mesh in (devices.local_mesh(), devices.local_mesh(jax.local_devices()[:1])):
        n_devices = mesh.shape["data"]
        batch = {"x": np.arange(n_devices * 4 * 3, dtype=np.float32).reshape(n_devices * 4, 3)}
        sharded = devices.shard_batch(batch, mesh)
        np.testing.assert_array_equal(np.asarray(sharded["x"]), batch["x"])
        assert sharded["x"].sharding.spec == jax.sharding.PartitionSpec("data")
        params = devices.replicate({"w": np.ones((2, 2), np.float32)}, mesh)
        assert params["w"].sharding.is_fully_replicated


def test_shard_batch_splits_across_devices_and_explains_bad_batch_sizes():
    # Four fake CPU devices need a fresh process: XLA reads the flag at start-up.
    script = textwrap.dedent(
        """
        import jax, numpy as np
        from sdjax.devices import local_mesh, shard_batch
        mesh = local_mesh()
        assert mesh.shape["data"] == 4, mesh
        x = shard_batch(np.zeros((8, 5), np.float32), mesh)
        assert [s.data.shape for s in x.addressable_shards] == [(2, 5)] * 4
        try:
            shard_batch({"x": np.zeros((6, 5), np.float32)}, mesh)
        except ValueError as error:
            print(error)
        """
    )
    root = str(Path(__file__).resolve().parents[1])
    env = {
        **os.environ,
        "JAX_PLATFORMS": "cpu",
        "XLA_FLAGS": "--xla_force_host_platform_device_count=4",
        "PYTHONPATH": os.pathsep.join([root, os.environ.get("PYTHONPATH", "")]),
    }
    result = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    message = result.stdout
    for expected in ("batch size 6", "4 devices", "multiple of 4", "e.g. 8"):
        assert expected in message
