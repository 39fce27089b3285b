"""The condition-image preprocessors (sdjax.preprocessors) against OpenCV, bit for bit, on shapes scenes
(anti-aliased outlines, gradient backgrounds) and on uniform noise (every gradient direction and tie)."""

import cv2
import numpy as np
import pytest
from PIL import Image

from sdjax import preprocessors
from sdjax.data import make_shapes, shapes


@pytest.fixture(scope="module")
def scenes():
    ds = make_shapes(48, resolution=64, seed=3)
    return np.round((np.asarray(ds.images) + 1.0) * 127.5).astype(np.uint8), ds


@pytest.fixture(scope="module")
def noise():
    return np.random.default_rng(0).integers(0, 256, (4, 40, 50, 3), dtype=np.uint8)


@pytest.mark.parametrize(
    "low, high, l2",
    [(100, 200, False), (50, 150, False), (10, 30, False), (200, 100, False), (100, 200, True), (0, 0, False)],
)
def test_canny_equals_opencv_on_scenes(scenes, low, high, l2):
    pixels, _ = scenes
    ours = preprocessors.canny_edges(pixels, low, high, l2_gradient=l2)
    reference = np.stack([cv2.Canny(im, low, high, L2gradient=l2) for im in pixels])
    assert (reference > 0).sum() > 1000  # the scenes do have edges
    assert np.array_equal(ours, reference), f"{(ours != reference).sum()} pixels differ"


@pytest.mark.parametrize("low, high, l2", [(100, 200, False), (300, 600, False), (100, 300, True)])
def test_canny_equals_opencv_on_noise(noise, low, high, l2):
    ours = preprocessors.canny_edges(noise, low, high, l2_gradient=l2)
    reference = np.stack([cv2.Canny(im, low, high, L2gradient=l2) for im in noise])
    assert np.array_equal(ours, reference), f"{(ours != reference).sum()} pixels differ"


def test_canny_single_channel_and_shapes(noise):
    grey = cv2.cvtColor(noise[0], cv2.COLOR_RGB2GRAY)
    assert np.array_equal(preprocessors.canny_edges(grey)[0], cv2.Canny(grey, 100, 200))
    assert preprocessors.canny_edges(noise[0]).shape == (1, 40, 50)
    with pytest.raises(ValueError, match="uint8"):
        preprocessors.canny_edges(noise.astype(np.float32))


def test_grey_equals_opencv(noise):
    levels = np.arange(0, 256, 3, dtype=np.uint8)
    cube = np.stack(np.meshgrid(levels, levels, levels, indexing="ij"), -1).reshape(1, -1, 3)
    for pixels in (noise[0], cube[0][None]):
        assert np.array_equal(preprocessors.grey(pixels), cv2.cvtColor(pixels, cv2.COLOR_RGB2GRAY))


@pytest.mark.parametrize("level", [0, 127, 200])
def test_threshold_equals_opencv(noise, level):
    ours = preprocessors.threshold(noise / 255.0, level)
    grey = [cv2.cvtColor(im, cv2.COLOR_RGB2GRAY) for im in noise]
    reference = np.stack([cv2.threshold(g, level, 255, cv2.THRESH_BINARY)[1] for g in grey]) / 255.0
    assert ours.shape == (*noise.shape[:3], 3) and ours.dtype == np.float32
    assert np.array_equal(ours[..., 0], reference) and np.array_equal(ours[..., 2], reference)


def test_pipeline_images_in_and_out(scenes):
    """PIL images and floats in [0, 1] give the same control image, (K, H, W, 3) in [0, 1]."""
    pixels, _ = scenes
    from_pil = preprocessors.canny([Image.fromarray(im) for im in pixels[:3]])
    from_float = preprocessors.canny(pixels[:3] / 255.0)
    assert from_pil.shape == (3, 64, 64, 3) and np.array_equal(from_pil, from_float)
    assert set(np.unique(from_pil)) == {0.0, 1.0}
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        preprocessors.canny(pixels[:3].astype(np.float32))  # 0–255 floats, not divided by 255


def test_scribble_is_the_dilated_edges(scenes):
    pixels, _ = scenes
    edges = preprocessors.canny_edges(pixels) > 0
    kernel = np.ones((3, 3), np.uint8)
    reference = np.stack([cv2.dilate(e.astype(np.uint8), kernel) for e in edges]) > 0
    strokes = preprocessors.scribble(pixels / 255.0, width=3)[..., 0] > 0
    assert np.array_equal(strokes, reference)
    assert np.array_equal(preprocessors.scribble(pixels / 255.0, width=1)[..., 0] > 0, edges)
    with pytest.raises(ValueError, match="width"):
        preprocessors.scribble(pixels / 255.0, width=0)


def test_segmentation_marks_each_object_by_class(scenes):
    """Every object's covered pixels carry its class colour; everything else is black."""
    _, ds = scenes
    maps = preprocessors.segmentation(ds.attributes, resolution=64)
    assert maps.shape == (48, 64, 64, 3)
    for sample, seg in zip(ds.attributes, maps):
        expected = np.zeros((64, 64, 3), np.float32)
        for obj in sample.objects:
            inside = shapes.object_coverage(obj, 64) >= 0.5
            assert inside.sum() > 10
            expected[inside] = np.asarray(preprocessors.SEGMENT_RGB[obj.shape]) / 255.0
        np.testing.assert_array_equal(seg, expected)
    colours = list(preprocessors.SEGMENT_RGB.values())
    assert len(set(colours)) == len(colours) and (0, 0, 0) not in colours
    assert set(preprocessors.SEGMENT_RGB) == set(shapes.SHAPES) | set(shapes.NOVEL_SHAPES)
