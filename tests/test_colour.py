"""The colour ops of harl_tf.data.colour equal TensorFlow's up to float rounding."""
import numpy as np
import tensorflow as tf

from harl_tf.data import colour


def _test_images(rng, side=16):
    """float32 [7, side, side, 3] in [0, 1]: random floats, 8-bit levels (what decoded
    JPEGs give), greys, black and white, 0/1 corners of the cube, saturated colours (a
    channel at 0 and one at 1), and values a float step from 0 and 1."""
    shape = (side, side, 3)
    uniform = rng.uniform(size=shape)
    levels = np.round(rng.uniform(size=shape) * 255) / 255
    greys = np.repeat(rng.uniform(size=shape[:2] + (1,)), 3, axis=-1)
    greys[0, :2] = [[0, 0, 0], [1, 1, 1]]
    corners = (rng.uniform(size=shape) < 0.5).astype(np.float64)
    saturated = rng.uniform(size=shape)
    pixels = np.arange(side * side)
    channels = rng.permuted(np.tile([0, 1, 2], (side * side, 1)), axis=1)
    flat = saturated.reshape(-1, 3)
    flat[pixels, channels[:, 0]] = 0.0
    flat[pixels, channels[:, 1]] = 1.0
    tiny = np.float32(np.finfo(np.float32).eps)
    edges = rng.choice([0.0, tiny, 1.0 - tiny, 1.0, 0.5], size=shape)
    return np.stack([uniform, levels, greys, corners, saturated, edges,
                     np.zeros(shape)]).astype(np.float32)


def _tf_hue_rounds_to_one(images):
    """Pixels where TF's saturation kernel loses the colour: red the max and blue above
    green by so little that TF's hue, 1 + (g − b)/(6·range) in float32, rounds to 1.0,
    which falls in no sextant of its HSV → RGB (it returns the min channel everywhere;
    (1, 0, 1e-9) becomes black even at factor 1). Needs b − g below ~2e-7 of the
    range: never on 8-bit levels (b − g >= 1/255)."""
    r, g, b = images[..., 0], images[..., 1], images[..., 2]
    high = images.max(-1)
    spread = high - images.min(-1)
    with np.errstate(divide="ignore", invalid="ignore"):
        hue = np.float32(1) / (np.float32(6) * spread) * (g - b)
    return (r == high) & (spread > 0) & (hue < 0) & (hue + np.float32(1) == 1)


def test_saturation_equals_tf_adjust_saturation_to_float_rounding():
    rng = np.random.default_rng(28)
    images = _test_images(rng)
    # The jitter's factors (1 ± 0.2, up to 1 ± 1 at a strength of 5), their ends, 0, and
    # factors far above 1, where every colour saturates.
    factors = np.concatenate([rng.uniform(0.0, 2.0, 150), [0.0, 0.8, 1.0, 1.2, 2.0, 7.5]])
    unsettled = _tf_hue_rounds_to_one(images)
    # Left out below: a few pixels of the float-step image, none of the others.
    assert unsettled[:5].sum() == 0 and unsettled.sum() < 0.01 * unsettled.size
    worst = 0.0
    for factor in factors.astype(np.float32):
        ours = colour.adjust_saturation(tf.constant(images), factor).numpy()
        theirs = tf.image.adjust_saturation(tf.constant(images), factor).numpy()
        worst = max(worst, float(np.abs(ours - theirs)[~unsettled].max()))
        # In [0, 1] up to rounding (the jitter clips after every op).
        assert ours.min() >= -1e-6 and ours.max() <= 1.0 + 1e-6
    assert worst <= 1e-5, worst


def test_saturation_keeps_the_max_channel_greys_and_the_hue():
    images = _test_images(np.random.default_rng(3))
    flat = images.reshape(-1, 3)
    high, low = flat.max(-1), flat.min(-1)
    grey = high == low
    for factor in (0.0, 0.5, 1.0, 1.7, 50.0):
        out = colour.adjust_saturation(tf.constant(flat), factor).numpy()
        np.testing.assert_allclose(out.max(-1), high, atol=1e-6)   # V is kept
        np.testing.assert_array_equal(out[grey], flat[grey])         # greys stay
        # The saturation (M − m)/M is multiplied by the factor and capped at 1.
        colourful = high - low > 1e-3
        s = (high - low)[colourful] / high[colourful]
        s_out = (out.max(-1) - out.min(-1))[colourful] / high[colourful]
        np.testing.assert_allclose(s_out, np.minimum(factor * s, 1.0), atol=1e-5)
    # Factor 1 leaves every pixel as it is, also where TF's kernel loses the colour.
    lost = np.array([[1.0, 0.0, 1e-9], [1.0, 0.5, np.nextafter(np.float32(0.5), 1)]],
                    np.float32)
    assert _tf_hue_rounds_to_one(lost).all()
    np.testing.assert_allclose(colour.adjust_saturation(tf.constant(lost), 1.0), lost,
                               atol=1e-6)


def test_grayscale_equals_tf_rgb_to_grayscale_on_three_channels():
    images = _test_images(np.random.default_rng(4))
    expected = tf.image.grayscale_to_rgb(tf.image.rgb_to_grayscale(images)).numpy()
    out = colour.to_grayscale(tf.constant(images)).numpy()
    assert out.shape == images.shape
    np.testing.assert_allclose(out, expected, atol=1e-6)
    np.testing.assert_allclose(colour.to_grayscale(tf.constant(images[1])), expected[1],
                               atol=1e-6)


def test_compiled_jitter_ops_equal_tensorflows_kernels_to_float_rounding():
    """Each op of the jitter, XLA-compiled with its clip (the pipeline's default), against
    TensorFlow's own kernel then a clip, on every kind of test pixel and factors across
    the jitter's ranges and beyond."""
    rng = np.random.default_rng(29)
    images = tf.constant(_test_images(rng))
    reference = (lambda x, f: x * f, tf.image.adjust_contrast, tf.image.adjust_saturation,
                 tf.image.adjust_hue)
    ranges = ((0.0, 2.0), (0.0, 2.0), (0.0, 2.0), (-0.5, 0.5))
    unsettled = _tf_hue_rounds_to_one(images.numpy())
    for code, (low, high) in enumerate(ranges):
        worst = 0.0
        for value in np.concatenate([rng.uniform(low, high, 12), [low, high]]):
            factors = tf.constant([1.0, 1.0, 1.0, 0.0], tf.float32)
            factors = tf.tensor_scatter_nd_update(factors, [[code]], [np.float32(value)])
            compiled = colour.jitter_ops(factors, jit_compile=True)[code](images).numpy()
            plain = colour.jitter_ops(factors, jit_compile=False)[code](images).numpy()
            expected = tf.clip_by_value(reference[code](images, factors[code]), 0.0,
                                        1.0).numpy()
            assert compiled.min() >= 0.0 and compiled.max() <= 1.0
            # The saturation's closed form keeps the colour where TF's kernel loses it.
            keep = ~unsettled if code == 2 else np.ones_like(unsettled)
            worst = max(worst, float(np.abs(compiled - expected)[keep].max()),
                        float(np.abs(compiled - plain).max()))
        assert worst <= 1e-5, (code, worst)


def test_compiled_jitter_in_random_order_equals_the_uncompiled_one():
    images = tf.constant(_test_images(np.random.default_rng(30)))
    for i in range(12):
        seed = tf.constant([5, i], tf.int64)
        compiled = colour.color_jitter(images, seed, brightness=0.4, contrast=0.4,
                                       saturation=0.2, hue=0.1, jit_compile=True)
        plain = colour.color_jitter(images, seed, brightness=0.4, contrast=0.4,
                                    saturation=0.2, hue=0.1, jit_compile=False)
        np.testing.assert_allclose(compiled, plain, atol=1e-5)
    # The jitter changed the images (the comparison is not of two identities).
    assert float(tf.reduce_max(tf.abs(compiled - images))) > 0.05
