"""The shipped DDPM weights, their recipe, and the sample-quality measures of sdjax.metrics."""

import dataclasses

import jax
import numpy as np
import pytest
from flax import nnx

from sdjax import metrics, pretrained, probe
from sdjax.data import catalogue, load_digits, make_shapes
from sdjax.diffusion import sample
from sdjax.samplers import make

RECIPE = pretrained.DDPM_SHAPES16
DIGITS = pretrained.DDPM_DIGITS16  # notebook 03's recipe (its weights are not tested here)


@pytest.fixture(scope="module")
def cat():
    return catalogue(RECIPE.resolution)


# --- metrics --------------------------------------------------------------------------------------


def test_nearest_neighbours_matches_brute_force():
    rng = np.random.default_rng(0)
    q, r = rng.normal(size=(37, 4, 4, 3)), rng.normal(size=(50, 4, 4, 3))
    dist, idx = metrics.nearest_neighbours(q, r, batch_size=8)
    d = np.sqrt(((q.reshape(37, 1, -1) - r.reshape(1, 50, -1)) ** 2).mean(-1))
    np.testing.assert_array_equal(idx, d.argmin(1))
    np.testing.assert_allclose(dist, d.min(1), rtol=1e-10)
    with pytest.raises(ValueError, match="values per image"):
        metrics.nearest_neighbours(q, r[:, :2])


def test_expected_distinct():
    assert metrics.expected_distinct(1, 10) == pytest.approx(1.0)
    assert metrics.expected_distinct(100_000, 10) == pytest.approx(10.0)
    rng = np.random.default_rng(0)  # against simulation: 300 draws from 1000
    sim = np.mean([len(np.unique(rng.integers(1000, size=300))) for _ in range(200)])
    assert sim == pytest.approx(metrics.expected_distinct(300, 1000), rel=0.01)


def test_catalogue_is_every_single_object_image(cat):
    assert len(cat) == 7 * 8 * 2 * 9 * 4
    assert len(np.unique(cat.images.reshape(len(cat), -1), axis=0)) == len(cat)  # all distinct
    drawn = make_shapes(300, resolution=RECIPE.resolution, seed=3, max_objects=1)
    dist, idx = metrics.nearest_neighbours(drawn.images, cat.images)
    assert np.all(dist < 1e-6)
    assert [cat.captions[i] for i in idx] == drawn.captions


def test_report_on_real_images_and_on_a_copy_machine(cat):
    held_out = RECIPE.is_held_out(cat.labels)
    assert held_out.sum() == 406  # 29 of the 288 (colour, position, background) combinations × 14
    fresh = make_shapes(2000, resolution=RECIPE.resolution, seed=5, max_objects=1).images
    real = metrics.catalogue_report(fresh, cat.images, held_out)
    assert real.median_distance < 1e-6 and real.recognisable == 1.0
    assert 0.07 < real.held_out_share < 0.13  # 406 / 4032 = 10.1 %, ± 3 standard errors
    copies = metrics.catalogue_report(RECIPE.data(2000).images, cat.images, held_out)
    assert copies.held_out_share == 0.0  # training images never show a held-out combination
    noise = metrics.catalogue_report(np.random.default_rng(0).normal(size=(50, 16, 16, 3)), cat.images, held_out)
    assert noise.recognisable == 0.0


def test_training_data_leaves_out_the_held_out_combinations():
    ds = RECIPE.data(3000)
    assert not RECIPE.is_held_out(ds.labels).any()
    assert 0.85 * 3000 < len(ds) < 0.95 * 3000
    assert (ds.labels["n_objects"] == 1).all()


# --- the digits recipe ----------------------------------------------------------------------------


def test_digits_splits_are_disjoint_and_together_all_digits():
    """Compared by image bytes (the 1,797 digits are all different images, checked first)."""
    every = load_digits(DIGITS.resolution)
    train, held = DIGITS.data(), DIGITS.held_out_data()
    as_bytes = lambda ds: [image.tobytes() for image in ds.images]  # noqa: E731
    assert len(set(as_bytes(every))) == len(every) == 1797
    assert not set(as_bytes(train)) & set(as_bytes(held))
    assert sorted(as_bytes(train) + as_bytes(held)) == sorted(as_bytes(every))
    label = dict(zip(as_bytes(every), every.labels["digit"], strict=True))  # each image keeps its label
    for split in (train, held):
        assert [label[b] for b in as_bytes(split)] == list(split.labels["digit"])
    assert len(held) / 1797 == pytest.approx(0.15, abs=0.5 / 1797)
    assert len(DIGITS.data(num_images=100)) == 100


def test_digits_held_out_is_a_fixed_random_share_of_every_digit():
    held = DIGITS.digits_held_out()
    assert held.shape == (1797,) and held.dtype == bool
    np.testing.assert_array_equal(DIGITS.digits_held_out(), held)  # the same on every call
    labels = load_digits(DIGITS.resolution).labels["digit"]
    share = np.array([held[labels == d].mean() for d in range(10)])
    # every digit in both splits, each near 15 % (measured 12.8–17.7 %; binomial sd ≈ 2.7 points)
    assert (share > 0.05).all() and (share < 0.3).all(), share
    assert set(DIGITS.data().labels["digit"]) == set(DIGITS.held_out_data().labels["digit"]) == set(range(10))
    first, last = np.flatnonzero(held)[[0, -1]]  # spread over the set, not a block at one end
    assert first < 100 and last > 1697, (first, last)


def test_shapes_recipe_has_no_held_out_images():
    with pytest.raises(ValueError, match="held_out_combinations"):
        RECIPE.held_out_data()
    with pytest.raises(ValueError, match="'shapes' or 'digits', got 'mnist'"):
        dataclasses.replace(DIGITS, dataset="mnist")


def test_digits_recipe_is_the_shapes_network_with_one_channel():
    assert DIGITS.name == "ddpm-digits16" and pretrained.RECIPES["ddpm-digits16"] is DIGITS
    assert DIGITS.dataset == "digits" and RECIPE.dataset == "shapes"
    assert DIGITS.unet.in_channels == DIGITS.unet.out_channels == 1
    assert RECIPE.unet.in_channels == RECIPE.unet.out_channels == 3
    assert dataclasses.replace(DIGITS.unet, in_channels=3, out_channels=3) == RECIPE.unet
    assert DIGITS.schedule == RECIPE.schedule and DIGITS.resolution == RECIPE.resolution
    model = nnx.eval_shape(DIGITS.model)  # shapes only: no weights are drawn, no program runs
    x = jax.ShapeDtypeStruct((2, 16, 16, 1), np.float32)
    assert nnx.eval_shape(lambda m, x: m(x, np.zeros(2, np.float32)), model, x).shape == (2, 16, 16, 1)
    assert pretrained.weights_path("ddpm-digits16").name == "ddpm-digits16.safetensors"


# --- the shipped weights --------------------------------------------------------------------------


def test_shipped_weights_load_and_record_their_recipe():
    model, schedule = pretrained.load("ddpm-shapes16")
    assert schedule == RECIPE.schedule
    info = pretrained.info("ddpm-shapes16")
    assert info["recipe"] == "ddpm-shapes16" and info["steps"] == RECIPE.steps
    assert pretrained.weights_path("ddpm-shapes16").stat().st_size < 8e6  # a few MB (float16)


def test_shipped_digits_model_draws_digits():
    """Notebook 03's model: its weights load into the recipe's one-channel network and record the recipe, and its
    samples are digits. A regression check on the notebook's figure (section 7: 97.0 % of 500 DDIM-50 samples
    read valid by the digit reader); here 64 DDIM-20 samples from key 0, measured 96.9 % valid, all ten digits.
    A model that draws smudges, or one digit only, fails."""
    from sdjax import digit_reader

    model, schedule = pretrained.load("ddpm-digits16")
    assert schedule == DIGITS.schedule and model.config == DIGITS.unet
    info = pretrained.info("ddpm-digits16")
    assert info["recipe"] == "ddpm-digits16" and info["steps"] == DIGITS.steps
    images = np.asarray(sample(model, schedule, jax.random.PRNGKey(0), (64, 16, 16, 1), sampler=make("ddim", 20)))
    reading = digit_reader.read(digit_reader.load(), images)
    assert reading["valid"].mean() >= 0.8, reading["valid"].mean()
    assert len(set(reading["label"][reading["valid"]])) >= 8  # most of the ten digits, not one


@pytest.mark.slow  # moved from the default run to keep it under 12 min on 2 cores (docs/testing.md)
def test_shipped_model_draws_every_background_evenly(cat):
    """A regression check on the shipped weights, on what they do get right (notebook 03, section 7):
    the backgrounds of the samples' nearest real images are spread like the data's, 25 % each (the
    ε-prediction version of the recipe gave 78 % grey, 22 % gradient and no white or black), and the
    attribute probe reads most samples confidently. The samples are not yet pixel-exact images."""
    model, schedule = pretrained.load()
    images = np.asarray(sample(model, schedule, jax.random.PRNGKey(0), (100, 16, 16, 3), sampler=make("ddim", 50)))
    dist, idx = metrics.nearest_neighbours(images, cat.images)
    shares = np.bincount(cat.labels["background"][idx], minlength=4) / len(idx)
    # measured over 500 samples in notebook 03: 21/23/32/24 %; here (100, key 0) 12/19/37/32 %. The bounds catch the
    # failure this guards against (no white or black at all), not the model's mild lean towards grey.
    assert shares.min() > 0.08 and shares.max() < 0.45, shares
    assert np.median(dist) < 0.1, np.median(dist)  # notebook 03: 0.068 over 500; pure noise would be ~1
    reading = probe.read(probe.load(16), np.clip(images, -1, 1))
    one_object = reading.confident & (reading.occupied.sum(axis=1) == 1)
    assert reading.confident.mean() > 0.45 and one_object.mean() > 0.25, (reading.confident.mean(), one_object.mean())
    # notebook 03 over 500: 66 % and 46 %; real images 99 %, noise 0 %


def test_save_load_round_trip_and_errors(tmp_path):
    model = RECIPE.model(seed=1)
    pretrained.save(tmp_path / "w.safetensors", model, RECIPE, {"steps": 0})
    loaded, _ = pretrained.load(path=tmp_path / "w.safetensors")
    a = jax.tree.leaves(model)[0]
    b = jax.tree.leaves(loaded)[0]
    np.testing.assert_allclose(np.asarray(b), np.asarray(a), rtol=1e-3, atol=1e-6)  # float16 storage

    with pytest.raises(FileNotFoundError, match="sdjax train-ddpm"):
        pretrained.load(path=tmp_path / "missing.safetensors")
    with pytest.raises(ValueError, match="available"):
        pretrained.load("stable-diffusion-9")
    other = dataclasses.replace(RECIPE, unet=dataclasses.replace(RECIPE.unet, block_out_channels=(16, 32, 64)))
    pretrained.save(tmp_path / "other.safetensors", other.model(), other, {})
    with pytest.raises(ValueError, match="another shape"):
        pretrained.load(path=tmp_path / "other.safetensors")
