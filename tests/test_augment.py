"""Per-view augmentations (SPEC §2): each op against a numpy reference, each coin at its
probability, geometry shared by image and mask, colour never touching the mask."""
import dataclasses
import functools

import numpy as np
import pytest
import tensorflow as tf

from harl_tf.data import augment, colour, geometry, synthetic
from harl_tf.data.augment import ViewConfig

VIEW1, VIEW2 = augment.default_view_configs()


def _seeds(n, offset=0):
    return np.stack([np.full(n, 1234, np.int64), np.arange(offset, offset + n)], axis=1)


def _run_views(image, mask, config, image_size, seeds):
    """augment_view of one image under each seed → numpy images, masks, records."""
    image = tf.constant(image)
    mask = tf.constant(mask)

    def one(seed):
        view = augment.augment_view(image, mask, seed, config, image_size)
        return view.image, view.mask, view.record

    dataset = tf.data.Dataset.from_tensor_slices(seeds).map(
        one, num_parallel_calls=2, deterministic=True).batch(len(seeds))
    images, masks, record = next(iter(dataset))
    return images.numpy(), masks.numpy(), {k: v.numpy() for k, v in record.items()}


def _red_is_mask(index=5, size=(72, 96), seed=0):
    """A synthetic image whose red channel is 255 on the mask and 0 elsewhere; the other
    channels are random."""
    data = synthetic.generate(index + 1, size, seed=seed)
    mask = data.masks[index][..., None]
    rng = np.random.default_rng(0)
    image = rng.integers(0, 256, size=size + (3,), dtype=np.uint8)
    image[..., 0] = 255 * mask[..., 0]
    return image, mask


def _random_image(side):
    image = np.random.default_rng(8).integers(0, 256, (side, side, 3), dtype=np.uint8)
    mask = np.zeros((side, side, 1), np.uint8)
    mask[:, : side // 2] = 1
    return image, mask


_IMAGES = {"red": _red_is_mask, "random24": lambda: _random_image(24)}


@functools.lru_cache(maxsize=None)
def _cached_views(image_name, config, image_size, n):
    """Views shared between tests (the same geometry-only views serve several)."""
    image, mask = _IMAGES[image_name]()
    return _run_views(image, mask, config, image_size, _seeds(n))


# ----------------------------------------------------------------------------- blur


@pytest.mark.parametrize("sigma", [0.1, 0.7, 2.0])
def test_gaussian_kernel_sums_to_one_and_matches_formula(sigma):
    radius = colour.blur_radius(224)
    assert 2 * radius + 1 == 23  # BYOL: 23 taps at 224 px, about 10 % of the side
    kernel = colour.gaussian_kernel(sigma, radius).numpy()
    x = np.arange(-radius, radius + 1, dtype=np.float64)
    expected = np.exp(-x ** 2 / (2 * sigma ** 2))
    expected /= expected.sum()
    assert kernel.sum() == pytest.approx(1.0, abs=1e-6)
    np.testing.assert_allclose(kernel, expected, atol=1e-7)
    assert kernel.argmax() == radius


def _blur_reference(image, sigma, radius):
    x = np.arange(-radius, radius + 1, dtype=np.float64)
    kernel = np.exp(-x ** 2 / (2 * sigma ** 2))
    kernel /= kernel.sum()
    padded = np.pad(image.astype(np.float64), [(radius, radius), (radius, radius), (0, 0)],
                    mode="symmetric")
    h, w, _ = image.shape
    rows = sum(kernel[i] * padded[i:i + h] for i in range(2 * radius + 1))
    return sum(kernel[j] * rows[:, j:j + w] for j in range(2 * radius + 1))


@pytest.mark.parametrize("sigma", [0.3, 1.0, 2.0])
def test_gaussian_blur_matches_numpy_reference(sigma):
    image = np.random.default_rng(1).uniform(size=(30, 41, 3)).astype(np.float32)
    radius = colour.blur_radius(64)
    out = colour.gaussian_blur(tf.constant(image), sigma, radius).numpy()
    np.testing.assert_allclose(out, _blur_reference(image, sigma, radius), atol=1e-5)


def test_gaussian_blur_matches_scipy():
    ndimage = pytest.importorskip("scipy.ndimage")
    image = np.random.default_rng(2).uniform(size=(40, 40, 3)).astype(np.float32)
    sigma, radius = 1.5, 11
    out = colour.gaussian_blur(tf.constant(image), sigma, radius).numpy()
    # truncate = radius / sigma gives scipy the same 23 taps; 'reflect' = edge repeat.
    expected = ndimage.gaussian_filter(image.astype(np.float64), sigma=(sigma, sigma, 0),
                                       mode="reflect", truncate=radius / sigma)
    np.testing.assert_allclose(out, expected, atol=1e-5)


def test_gaussian_blur_keeps_constant_image_constant_at_the_border():
    image = tf.fill([20, 20, 3], 0.6)
    out = colour.gaussian_blur(image, 2.0, 11).numpy()
    np.testing.assert_allclose(out, 0.6, atol=1e-6)


def _blur_2d_reference(image, sigma, radius):
    """The blur as one 2-D depthwise convolution with the outer-product kernel (not
    separable), after tf.pad's symmetric padding."""
    kernel = colour.gaussian_kernel(sigma, radius)
    taps = tf.tile((kernel[:, None] * kernel[None, :])[:, :, None, None],
                   [1, 1, image.shape[-1], 1])
    padded = tf.pad(image[None], [[0, 0], [radius, radius], [radius, radius], [0, 0]],
                    mode="SYMMETRIC")
    return tf.nn.depthwise_conv2d(padded, taps, [1, 1, 1, 1], "VALID")[0].numpy()


@pytest.mark.parametrize("shape,radius", [((224, 224, 3), 11), ((30, 41, 3), 3),
                                          ((8, 8, 3), 1), ((33, 17, 1), 5)])
def test_blocked_blur_equals_the_2d_convolution(shape, radius):
    # The blur runs as blocked matrix products on a [rows, W*C] layout; any height, width
    # (not only multiples of the block) and channel count gives the 2-D blur.
    image = np.random.default_rng(shape[0]).uniform(size=shape).astype(np.float32)
    for sigma in (0.1, 0.9, 2.0):
        out = colour.gaussian_blur(tf.constant(image), sigma, radius).numpy()
        assert out.shape == shape
        np.testing.assert_allclose(out, _blur_2d_reference(tf.constant(image), sigma,
                                                           radius), atol=1e-5)


def test_blur_with_unknown_shapes_in_a_graph():
    blur = tf.function(lambda x, s: colour.gaussian_blur(x, s, 4),
                       input_signature=[tf.TensorSpec([None, None, 3]), tf.TensorSpec([])])
    image = np.random.default_rng(3).uniform(size=(21, 50, 3)).astype(np.float32)
    np.testing.assert_allclose(blur(image, 1.2).numpy(),
                               _blur_2d_reference(tf.constant(image), 1.2, 4), atol=1e-5)


def test_symmetric_indices_repeat_the_edge_as_np_pad_does():
    for size, radius in ((10, 3), (5, 5), (224, 11)):
        expected = np.pad(np.arange(size), radius, mode="symmetric")
        np.testing.assert_array_equal(colour.symmetric_indices(size, radius), expected)


def test_mask_resize_by_gather_is_tf_nearest_resize_bit_for_bit():
    # Downsampling, upsampling and odd ratios, flipped or not: the gathered mask is
    # exactly tf.image.resize(method="nearest") (then tf.reverse for a flip).
    rng = np.random.default_rng(11)
    for _ in range(40):
        height, width = rng.integers(1, 400, size=2)
        size = int(rng.choice([7, 16, 32, 97, 224]))
        mask = (rng.uniform(size=(height, width, 1)) < 0.4).astype(np.uint8)
        expected = tf.image.resize(tf.cast(mask, tf.float32), [size, size],
                                   method="nearest").numpy()
        for flip in (False, True):
            out = geometry.resize_mask(tf.constant(mask), size, tf.constant(flip)).numpy()
            assert out.dtype == np.float32 and out.shape == (size, size, 1)
            np.testing.assert_array_equal(out, expected[:, ::-1] if flip else expected)


# ------------------------------------------------------------------ colour ops


def test_solarize_matches_numpy():
    image = np.random.default_rng(3).uniform(size=(17, 19, 3)).astype(np.float32)
    # The threshold itself and its float neighbours too (0.5 is computed as a minimum).
    image[0, :4, 0] = [0.5, np.nextafter(0.5, 0), np.nextafter(0.5, 1), 1.0]
    for threshold in (0.5, 0.3):
        out = colour.solarize(tf.constant(image), threshold).numpy()
        np.testing.assert_array_equal(out, np.where(image < threshold, image, 1.0 - image))


def test_grayscale_matches_numpy_luma():
    image = np.random.default_rng(4).uniform(size=(9, 11, 3)).astype(np.float32)
    out = colour.to_grayscale(tf.constant(image)).numpy()
    luma = image @ np.array([0.2989, 0.5870, 0.1140], np.float32)
    assert out.shape == (9, 11, 3)
    for channel in range(3):
        np.testing.assert_allclose(out[..., channel], luma, atol=1e-4)


def test_brightness_is_multiplicative_within_range():
    image = np.random.default_rng(5).uniform(0.05, 0.5, size=(8, 8, 3)).astype(np.float32)
    factors = []
    for i in range(40):
        out = colour.color_jitter(tf.constant(image), tf.constant([7, i], tf.int64),
                                   brightness=0.4, contrast=0.0, saturation=0.0,
                                   hue=0.0).numpy()
        ratio = out / image
        np.testing.assert_allclose(ratio, ratio.mean(), rtol=1e-4)  # one factor
        factors.append(ratio.mean())
    assert 0.6 - 1e-5 <= min(factors) < 0.75 and 1.25 < max(factors) <= 1.4 + 1e-5


def test_jitter_with_zero_strengths_is_identity_and_stays_in_range():
    image = np.random.default_rng(6).uniform(size=(12, 12, 3)).astype(np.float32)
    seed = tf.constant([1, 2], tf.int64)
    same = colour.color_jitter(tf.constant(image), seed, brightness=0.0, contrast=0.0,
                                saturation=0.0, hue=0.0).numpy()
    np.testing.assert_allclose(same, image, atol=1e-5)
    for i in range(10):
        out = colour.color_jitter(tf.constant(image), tf.constant([1, i], tf.int64),
                                   brightness=0.4, contrast=0.4, saturation=0.2,
                                   hue=0.1).numpy()
        assert out.min() >= 0.0 and out.max() <= 1.0
        assert np.abs(out - image).mean() > 1e-3


def test_jitter_order_is_a_uniform_random_permutation():
    n = 2400
    orders = tf.data.Dataset.from_tensor_slices(_seeds(n)).map(
        colour.jitter_order).batch(n)
    orders = next(iter(orders)).numpy()
    assert (np.sort(orders, axis=1) == np.arange(4)).all()
    _, counts = np.unique(orders, axis=0, return_counts=True)
    assert len(counts) == 24  # all 4! orders occur ...
    assert all(_binomial_ok(c, n, 1 / 24) for c in counts)  # ... equally often


def test_jitter_follows_the_drawn_order():
    # Saturation before hue is not hue before saturation once clipping and the HSV round
    # trip interact; check the composition against tf.image in the drawn order.
    image = tf.random.stateless_uniform([10, 10, 3], [9, 9])
    seed = tf.constant([3, 4], tf.int64)
    ops = {0: lambda x, f: x * f, 1: tf.image.adjust_contrast,
           2: tf.image.adjust_saturation, 3: tf.image.adjust_hue}
    factors, order = colour.jitter_draws(seed, brightness=0.4, contrast=0.4,
                                          saturation=0.2, hue=0.1)
    for factor, (low, high) in zip(factors.numpy(), [(0.6, 1.4), (0.6, 1.4), (0.8, 1.2),
                                                     (-0.1, 0.1)]):
        assert low <= factor <= high
    np.testing.assert_array_equal(order, colour.jitter_order(seed))
    expected = image
    for op in order.numpy():
        expected = tf.clip_by_value(ops[op](expected, factors[op]), 0.0, 1.0)
    out = colour.color_jitter(image, seed, brightness=0.4, contrast=0.4, saturation=0.2,
                               hue=0.1)
    np.testing.assert_allclose(out.numpy(), expected.numpy(), atol=1e-6)


# ------------------------------------------------------------------- geometry


def test_crop_window_area_and_aspect_within_configured_ranges():
    config = ViewConfig()
    shape = tf.constant([375, 500, 3])
    windows = tf.data.Dataset.from_tensor_slices(_seeds(3000)).map(
        lambda s: geometry.sample_crop_window(shape, s, config)).batch(3000)
    y, x, h, w = next(iter(windows)).numpy().T
    assert (y >= 0).all() and (x >= 0).all()
    assert (y + h <= 375).all() and (x + w <= 500).all()
    area = h * w / (375 * 500)
    aspect = w / h
    fallback = (h == 375) & (w == 500)  # TF's whole-image fallback; aspect 4/3 anyway
    assert fallback.mean() < 0.05
    assert area.min() >= 0.08 - 2e-3 and area.max() <= 1.0
    assert aspect.min() >= 0.75 * 0.98 and aspect.max() <= 4 / 3 * 1.02
    # The whole range is used, not a corner of it.
    assert area.min() < 0.09 and area.max() > 0.95
    assert aspect.min() < 0.77 and aspect.max() > 1.3
    # TF draws the crop's height uniformly, not its area (as in SimCLR's and BYOL's TF
    # code; torchvision draws the area), so areas lean small: median about 0.32 here.
    assert 0.25 < np.median(area) < 0.4


def test_geometry_keeps_the_mask_on_the_same_content():
    # Red channel = mask; geometry only: after crop + flip + resize, the mask must still
    # mark the red pixels.
    images, masks, record = _cached_views("red", VIEW1.geometry_only(), 32, 48)
    assert 0.3 < record["flip"].mean() < 0.7  # both flipped and unflipped views seen
    agreement = (masks[..., 0] == (images[..., 0] > 0.5)).mean(axis=(1, 2))
    assert agreement.min() >= 0.99, agreement.min()
    assert set(np.unique(masks)) <= {0.0, 1.0}
    # Not trivially empty: the object appears in most views.
    assert (masks.mean(axis=(1, 2, 3)) > 0).mean() > 0.5


@pytest.mark.parametrize("config", [VIEW1, VIEW2], ids=["view1", "view2"])
def test_colour_ops_leave_the_mask_untouched(config):
    full_images, full_masks, full_record = _cached_views("red", config, 32, 48)
    geo_images, geo_masks, geo_record = _cached_views("red", config.geometry_only(), 32,
                                                      48)
    np.testing.assert_array_equal(full_masks, geo_masks)
    np.testing.assert_array_equal(full_record["crop_window"], geo_record["crop_window"])
    np.testing.assert_array_equal(full_record["flip"], geo_record["flip"])
    # ... while the colour ops did change the images.
    changed = np.abs(full_images - geo_images).mean(axis=(1, 2, 3)) > 1e-3
    assert changed.mean() > 0.8


def test_same_seed_same_view_and_different_seeds_differ():
    image, mask = _red_is_mask()
    seeds = np.concatenate([_seeds(8), _seeds(8), _seeds(8, offset=100)])
    images, masks, _ = _run_views(image, mask, VIEW2, 32, seeds)
    np.testing.assert_array_equal(images[:8], images[8:16])
    np.testing.assert_array_equal(masks[:8], masks[8:16])
    assert np.abs(images[:8] - images[16:]).mean() > 0.02


# --------------------------------------------------------------- probabilities


def _binomial_ok(count, n, p):
    sigma = np.sqrt(n * p * (1 - p))
    return abs(count - n * p) <= 4 * sigma + 1e-9


@pytest.mark.parametrize("config,name", [(VIEW1, "view1"), (VIEW2, "view2")])
def test_each_op_fires_with_its_probability(config, name):
    n = 2000
    image = np.random.default_rng(7).integers(0, 256, (16, 16, 3), dtype=np.uint8)
    mask = np.ones((16, 16, 1), np.uint8)
    _, _, record = _run_views(image, mask, config, 8, _seeds(n))
    expected = {"flip": config.flip_prob, "jitter": config.jitter_prob,
                "grayscale": config.grayscale_prob, "blur": config.blur_prob,
                "solarize": config.solarize_prob}
    for op, p in expected.items():
        count = int(record[op].sum())
        assert _binomial_ok(count, n, p), f"{name}: {op} fired {count}/{n}, p={p}"
    sigma = record["blur_sigma"]
    assert sigma.min() >= 0.1 and sigma.max() <= 2.0
    assert sigma.min() < 0.15 and sigma.max() > 1.95


@pytest.mark.parametrize("op", ["flip", "grayscale", "solarize", "blur", "jitter"])
def test_the_record_says_which_op_was_applied(op):
    # Only `op` enabled, at probability 0.5, against the geometry-only view of the same
    # seed: where the record says it fired, the image is exactly op(base); elsewhere base.
    base_config = VIEW1.geometry_only()
    probability = {"flip": "flip_prob", "grayscale": "grayscale_prob",
                   "solarize": "solarize_prob", "blur": "blur_prob",
                   "jitter": "jitter_prob"}[op]
    if op == "flip":
        base_config = dataclasses.replace(base_config, flip_prob=0.0)
    config = dataclasses.replace(base_config, **{probability: 0.5})
    base, base_masks, _ = _cached_views("random24", base_config, 16, 24)
    out, out_masks, record = _cached_views("random24", config, 16, 24)
    fired = record[op]
    assert 0 < fired.sum() < len(fired)
    for i in range(len(fired)):
        if not fired[i]:
            np.testing.assert_array_equal(out[i], base[i])
            continue
        if op == "flip":
            np.testing.assert_array_equal(out[i], base[i][:, ::-1])
            np.testing.assert_array_equal(out_masks[i], base_masks[i][:, ::-1])
        elif op == "grayscale":
            np.testing.assert_allclose(out[i], colour.to_grayscale(base[i]).numpy(),
                                       atol=1e-6)
        elif op == "solarize":
            np.testing.assert_array_equal(out[i], np.where(base[i] < 0.5, base[i],
                                                           1 - base[i]))
        elif op == "blur":
            radius = colour.blur_radius(16)
            expected = _blur_reference(base[i], record["blur_sigma"][i], radius)
            np.testing.assert_allclose(out[i], np.clip(expected, 0, 1), atol=1e-5)
        else:
            assert np.abs(out[i] - base[i]).mean() > 1e-3


# ----------------------------------------------------------------- config


@pytest.mark.parametrize("field,value", [("blur_prob", 1.5), ("crop_area", (0.5, 0.2)),
                                         ("resize_method", "lanczos9")])
def test_view_config_rejects_bad_values_naming_the_field(field, value):
    with pytest.raises(ValueError, match=field):
        ViewConfig(**{field: value})


def test_default_views_follow_spec():
    v1, v2 = augment.default_view_configs()
    assert (v1.blur_prob, v1.solarize_prob) == (1.0, 0.0)
    assert (v2.blur_prob, v2.solarize_prob) == (0.1, 0.2)
    for v in (v1, v2):
        assert (v.jitter_prob, v.grayscale_prob, v.flip_prob) == (0.8, 0.2, 0.5)
        assert (v.brightness, v.contrast, v.saturation, v.hue) == (0.4, 0.4, 0.2, 0.1)
        assert v.crop_area == (0.08, 1.0) and v.crop_aspect == (3 / 4, 4 / 3)
        assert v.blur_sigma == (0.1, 2.0)


def test_blur_scale_and_min_crop_area_reach_the_views():
    """blur_prob_scale multiplies both views' blur probabilities (1.0, 0.1 → 0.5, 0.05; 0
    turns blur off) and min_crop_area sets the crop's lower area bound; nothing else
    moves. PretrainConfig's flags reach the views, and a crop window drawn with a 0.5
    floor never covers less than half the image (up to whole-pixel rounding)."""
    from harl_tf.config import PretrainConfig
    spec = augment.default_view_configs()
    half = augment.scaled_view_configs(blur_prob_scale=0.5, min_crop_area=0.5)
    assert [v.blur_prob for v in half] == pytest.approx([0.5, 0.05])
    for view, base in zip(half, spec):
        assert view.crop_area == (0.5, 1.0)
        assert dataclasses.replace(view, blur_prob=base.blur_prob,
                                   crop_area=base.crop_area) == base
    off = augment.view_configs_from(PretrainConfig(
        train_files="x", model_dir="y", blur_prob_scale=0.0, min_crop_area=0.3))
    assert [v.blur_prob for v in off] == [0.0, 0.0]
    assert [v.crop_area for v in off] == [(0.3, 1.0), (0.3, 1.0)]
    assert augment.view_configs_from(PretrainConfig(train_files="x", model_dir="y")) == spec
    areas = [float(tf.reduce_prod(tf.cast(geometry.sample_crop_window(
        tf.constant([40, 60, 3]), tf.constant([i, 7], tf.int64), half[0])[2:], tf.float32)))
        / (40 * 60) for i in range(200)]
    assert min(areas) >= 0.5 - 2 * (40 + 60) / (40 * 60) and max(areas) <= 1.0
    for bad in (dict(blur_prob_scale=1.5), dict(blur_prob_scale=-0.1),
                dict(min_crop_area=0.0), dict(min_crop_area=1.2)):
        with pytest.raises(ValueError, match=next(iter(bad))):
            augment.scaled_view_configs(**bad)


def test_colour_jitter_strength_scales_byols_distortion():
    """Strength 1 with grayscale 0.2 is SPEC §2 exactly; strength s multiplies BYOL's
    brightness, contrast, saturation and hue (clipped to 1 and 0.5) and leaves geometry,
    blur and solarisation alone; a stronger jitter spreads the hue of one image's views."""
    assert augment.scaled_view_configs(1.0, 0.2) == augment.default_view_configs()
    v1, v2 = augment.scaled_view_configs(3.0, 0.5)
    for view, spec in zip((v1, v2), augment.default_view_configs()):
        assert (view.brightness, view.contrast, view.saturation) == pytest.approx(
            (1.0, 1.0, 0.6))
        assert view.hue == pytest.approx(0.3) and view.grayscale_prob == 0.5
        assert (view.crop_area, view.blur_prob, view.solarize_prob) == (
            spec.crop_area, spec.blur_prob, spec.solarize_prob)
    with pytest.raises(ValueError, match="color_jitter_strength"):
        augment.scaled_view_configs(-1.0)

    red = tf.constant(np.tile([[[0.8, 0.2, 0.2]]], (16, 16, 1)), tf.float32)

    def hue_spread(strength):
        config = dataclasses.replace(augment.scaled_view_configs(strength, 0.0)[0],
                                     jitter_prob=1.0, blur_prob=0.0)
        hues = [tf.image.rgb_to_hsv(augment.finish_view(
            red, None, tf.constant([i, 7], tf.int64), config, 16).image)[0, 0, 0].numpy()
            for i in range(40)]
        angles = 2 * np.pi * np.asarray(hues)
        return 1.0 - np.hypot(np.cos(angles).mean(), np.sin(angles).mean())
    assert hue_spread(4.0) > 3 * hue_spread(1.0)
