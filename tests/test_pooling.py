"""Mask pooling (SPEC §4) against plain numpy on fixed tensors."""
import numpy as np
import pytest
import tensorflow as tf

from harl_tf.models import pooling


def _np_block_mean(mask, h, w):
    b, H, W = mask.shape
    return mask.reshape(b, h, H // h, w, W // w).mean(axis=(2, 4))


def _np_pool(features, m, eps):
    fg = (features * m[..., None]).sum((1, 2)) / (m.sum((1, 2))[:, None] + eps)
    bg = (features * (1 - m)[..., None]).sum((1, 2)) / ((1 - m).sum((1, 2))[:, None] + eps)
    return fg, bg, features.mean((1, 2))


@pytest.fixture
def fixed():
    rng = np.random.default_rng(0)
    features = rng.normal(size=(3, 4, 4, 5)).astype(np.float32)
    mask = np.zeros((3, 16, 16), np.float32)
    mask[0, 2:11, 3:13] = 1          # partial cells -> soft mask
    mask[1] = 1                      # all foreground -> no background
    mask[2, 0:2, 0:2] = 1            # a quarter of one cell: below the floor
    return features, mask


def test_downsample_is_area_average(fixed):
    _, mask = fixed
    soft = pooling.downsample_mask(mask[..., None], (4, 4)).numpy()[..., 0]
    np.testing.assert_allclose(soft, _np_block_mean(mask, 4, 4), atol=1e-6)
    assert soft[0, 3, 3] == 0.0 and soft[0, 0, 0] == 0.125 and soft[0, 0, 1] == 0.5


def test_pooling_matches_numpy(fixed):
    features, mask = fixed
    out = pooling.pool_regions(tf.constant(features), mask[..., None], epsilon=1e-6)
    fg, bg, glob = _np_pool(features, _np_block_mean(mask, 4, 4), 1e-6)
    np.testing.assert_allclose(out.fg.numpy(), fg, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(out.bg.numpy(), bg, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(out.glob.numpy(), glob, rtol=1e-5, atol=1e-6)
    # Example 1 is all foreground: its fg equals the global mean, its empty bg is zero.
    np.testing.assert_allclose(out.fg.numpy()[1], glob[1], rtol=1e-5)
    np.testing.assert_allclose(out.bg.numpy()[1], 0.0, atol=1e-6)
    np.testing.assert_allclose(out.fg_fraction.numpy(), mask.mean((1, 2)), atol=1e-6)


def test_validity_floor_is_one_feature_cell_by_default(fixed):
    features, mask = fixed
    out = pooling.pool_regions(tf.constant(features), mask[..., None])
    # fractions: ex0 90/256, ex1 1.0, ex2 4/256 < 1/16.
    np.testing.assert_array_equal(out.fg_valid.numpy(), [1, 1, 0])
    np.testing.assert_array_equal(out.bg_valid.numpy(), [1, 0, 1])
    exactly_one_cell = np.zeros((1, 16, 16, 1), np.float32)
    exactly_one_cell[0, 4:8, 8:12] = 1
    one = pooling.pool_regions(tf.constant(features[:1]), exactly_one_cell)
    assert one.fg_valid.numpy()[0] == 1.0
    everything = pooling.pool_regions(tf.constant(features), mask[..., None], min_fraction=0.0)
    np.testing.assert_array_equal(everything.fg_valid.numpy(), [1, 1, 1])


def test_literal_pooling_is_gap_of_masked_map(fixed):
    features, mask = fixed
    m = _np_block_mean(mask, 4, 4)
    out = pooling.pool_regions(tf.constant(features), mask[..., None], literal=True)
    np.testing.assert_allclose(out.fg.numpy(), (features * m[..., None]).mean((1, 2)),
                               rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(out.bg.numpy(), (features * (1 - m)[..., None]).mean((1, 2)),
                               rtol=1e-5, atol=1e-6)
    # literal = normalised pooling times the area fraction.
    normal = pooling.pool_regions(tf.constant(features), mask[..., None], epsilon=0.0)
    a = m.mean((1, 2))[:, None]
    np.testing.assert_allclose(out.fg.numpy()[:1], (normal.fg.numpy() * a)[:1], rtol=1e-5)


def test_pooling_is_float32_for_half_precision_features(fixed):
    features, mask = fixed
    for dtype in (tf.bfloat16, tf.float16):
        out = pooling.pool_regions(tf.cast(features, dtype), mask[..., None])
        assert out.fg.dtype == tf.float32 and out.glob.dtype == tf.float32
        fg, _, _ = _np_pool(features, _np_block_mean(mask, 4, 4), 1e-6)
        np.testing.assert_allclose(out.fg.numpy(), fg, atol=0.05)
