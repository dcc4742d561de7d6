"""The conventional heuristic mask (FH segmentation + unsupervised regional saliency)."""
import json

import numpy as np
import pytest

from harl_tf.data import synthetic
from harl_tf.errors import ConfigError
from harl_tf.masks import (MaskResult, available_methods, get_method, register_method,
                           to_rgb_uint8)
from harl_tf.masks.conventional import (DEFAULT_PARAMS, REFERENCE_AREA, centred_ellipse,
                                        conventional_mask, saliency_map, segment)
from harl_tf.masks.quality import evaluate_arrays


@pytest.fixture(scope="module")
def shapes():
    return synthetic.generate(48, image_size=64, seed=0)


@pytest.fixture(scope="module")
def predictions(shapes):
    method = get_method("conventional")
    return [method.compute(image) for image in shapes.images]


def test_mean_iou_on_synthetic_shapes_beats_bound_and_centre_prior(shapes, predictions):
    # Measured 0.477 (48 images, 64 px, seed 0) against 0.273 for the centred ellipse.
    report = evaluate_arrays([r.mask for r in predictions], shapes.masks)
    prior = evaluate_arrays([centred_ellipse(64, 64)] * len(shapes), shapes.masks)
    assert report.mean_iou > 0.40
    assert report.mean_iou > prior.mean_iou + 0.10
    assert sum(r.used_fallback for r in predictions) <= 2


def test_masks_are_binary_uint8_at_input_resolution(shapes, predictions):
    for result in predictions:
        assert isinstance(result, MaskResult)
        assert result.mask.shape == (64, 64) and result.mask.dtype == np.uint8
        assert set(np.unique(result.mask)) <= {0, 1}


def test_same_image_gives_identical_mask_across_calls_and_instances(shapes):
    first = get_method("conventional")(shapes.images[3])
    other = get_method("conventional")
    other(shapes.images[5])  # advance any hidden state (OpenCV's RNG is used by GrabCut)
    second = other(shapes.images[3])
    np.testing.assert_array_equal(first, second)


def test_larger_minimum_size_gives_fewer_and_larger_segments(shapes):
    for image in shapes.images[:4]:
        counts, smallest = [], []
        for min_size in (250, 1000, 4000):
            sizes = np.bincount(segment(image, min_size=min_size).ravel())
            counts.append(len(sizes))
            smallest.append(sizes.min())
            # FH's guarantee, with min_size scaled from the reference area to 64x64.
            assert sizes.min() >= round(min_size * 64 * 64 / REFERENCE_AREA)
        assert counts[0] >= counts[1] >= counts[2] and counts[0] > counts[2]


def test_higher_fixed_threshold_gives_less_foreground(shapes):
    low = [conventional_mask(im, threshold=0.2, refine_iterations=0).mask.mean()
           for im in shapes.images[:12]]
    high = [conventional_mask(im, threshold=0.8, refine_iterations=0).mask.mean()
            for im in shapes.images[:12]]
    assert np.mean(high) < np.mean(low)


def test_saliency_map_is_in_unit_range_and_higher_on_the_object(shapes):
    inside, outside = [], []
    for image, mask in zip(shapes.images[:16], shapes.masks[:16]):
        saliency, labels = saliency_map(image)
        assert saliency.shape == labels.shape == (64, 64)
        assert saliency.min() >= 0.0 and saliency.max() <= 1.0
        inside.append(saliency[mask > 0].mean())
        outside.append(saliency[mask == 0].mean())
    assert np.mean(inside) > np.mean(outside) + 0.2


@pytest.mark.parametrize("image", [
    np.zeros((1, 1, 3), np.uint8),
    np.full((5, 7), 9, np.uint8),
    np.full((40, 30, 3), (10, 200, 30), np.uint8),
    np.full((12, 12, 4), 200, np.uint8),
    np.zeros((2, 3), bool),
], ids=["1x1", "grey-5x7", "uniform-rgb", "uniform-rgba", "bool-2x3"])
def test_images_without_structure_get_the_reported_ellipse_fallback(image):
    method = get_method("conventional")
    result = method.compute(image)
    height, width = image.shape[:2]
    assert result.fallback == "single_segment" and method.last_fallback == "single_segment"
    np.testing.assert_array_equal(result.mask, centred_ellipse(height, width, 0.6))
    assert result.mask[height // 2, width // 2] == 1


def test_grey_rgba_uint16_and_float_inputs_give_valid_masks(shapes):
    image = shapes.images[0]
    variants = {
        "grey": image.mean(-1).astype(np.uint8),
        "grey1": image[..., :1],
        "rgba": np.concatenate([image, np.full((64, 64, 1), 7, np.uint8)], -1),
        "uint16": image.astype(np.uint16) * 257,
        "float": image.astype(np.float32) / 255.0,
    }
    rgb = get_method("conventional")(image)
    for name, variant in variants.items():
        mask = get_method("conventional")(variant)
        assert mask.shape == (64, 64) and mask.dtype == np.uint8, name
        assert set(np.unique(mask)) <= {0, 1}, name
        if name in ("rgba", "uint16", "float"):  # same pixels after normalisation
            np.testing.assert_array_equal(mask, rgb, err_msg=name)


def test_to_rgb_uint8_conversions():
    np.testing.assert_array_equal(to_rgb_uint8(np.array([[0, 257, 65535]], np.uint16))[0],
                                  [[0, 0, 0], [1, 1, 1], [255, 255, 255]])
    np.testing.assert_array_equal(to_rgb_uint8(np.array([[0.0, 0.5, 1.0]]))[0, :, 0],
                                  [0, 128, 255])
    np.testing.assert_array_equal(to_rgb_uint8(np.array([[[1, 2, 3, 4]]], np.uint8)),
                                  [[[1, 2, 3]]])
    with pytest.raises(ValueError, match="expected an image"):
        to_rgb_uint8(np.zeros((2, 2, 5)), name="x.png")
    with pytest.raises(ValueError, match="no pixels"):
        to_rgb_uint8(np.zeros((0, 4, 3)))


def test_params_are_complete_json_and_validated():
    method = get_method("conventional", sigma=0.4, min_size=1500)
    assert method.name == "conventional"
    assert method.params["sigma"] == 0.4 and method.params["min_size"] == 1500
    assert set(method.params) == set(DEFAULT_PARAMS)
    assert json.loads(json.dumps(method.params)) == method.params
    # A bad parameter is the user's (--mask_params, a tool's flag): one ConfigError line.
    with pytest.raises(ConfigError, match="min_sizee"):
        get_method("conventional", min_sizee=10)
    with pytest.raises(ConfigError, match="threshold"):
        get_method("conventional", threshold="median")


def test_registry_lists_methods_and_registers_lazily(monkeypatch):
    import harl_tf.masks

    assert "conventional" in available_methods()
    with pytest.raises(ValueError, match="conventional"):
        get_method("no-such-method")
    monkeypatch.setattr(harl_tf.masks, "_REGISTRY", dict(harl_tf.masks._REGISTRY))
    register_method("test-lazy", "harl_tf.masks.conventional:ConventionalMethod")
    assert "test-lazy" in available_methods()
    assert get_method("test-lazy", sigma=0.2).params["sigma"] == 0.2
