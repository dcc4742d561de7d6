"""The embedded synthetic dataset: deterministic, balanced, with exact masks."""
import numpy as np
import pytest

from harl_tf.data import synthetic


def test_same_seed_is_byte_identical():
    a = synthetic.generate(24, 32, seed=7)
    b = synthetic.generate(24, 32, seed=7)
    assert a.images.tobytes() == b.images.tobytes()
    assert a.masks.tobytes() == b.masks.tobytes()
    assert a.labels.tobytes() == b.labels.tobytes()


def test_different_seed_differs():
    a = synthetic.generate(16, 32, seed=0)
    b = synthetic.generate(16, 32, seed=1)
    assert (a.images != b.images).mean() > 0.5
    assert (a.masks != b.masks).any()


def test_prefix_property():
    small = synthetic.generate(10, 32, seed=3)
    large = synthetic.generate(30, 32, seed=3)
    np.testing.assert_array_equal(small.images, large.images[:10])
    np.testing.assert_array_equal(small.labels, large.labels[:10])


@pytest.mark.parametrize("size", [32, 64, (48, 80)])
def test_sizes_and_dtypes(size):
    data = synthetic.generate(9, size, seed=0)
    h, w = (size, size) if isinstance(size, int) else size
    assert data.images.shape == (9, h, w, 3) and data.images.dtype == np.uint8
    assert data.masks.shape == (9, h, w) and data.masks.dtype == np.uint8
    assert data.labels.shape == (9,) and data.labels.dtype == np.int64
    assert set(np.unique(data.masks)) <= {0, 1}
    assert data.labels.min() >= 0 and data.labels.max() < synthetic.NUM_CLASSES


def test_labels_are_balanced_and_not_periodic():
    labels = synthetic.generate(203, 16, seed=5).labels
    counts = np.bincount(labels, minlength=synthetic.NUM_CLASSES)
    assert counts.max() - counts.min() <= 1
    assert synthetic.NUM_CLASSES >= 6
    # Not simply index % K: the order inside blocks is shuffled.
    assert not np.array_equal(labels[:16], np.arange(16) % synthetic.NUM_CLASSES)


def _assert_mask_is_where_the_object_was_drawn(index, seed, **style):
    """Painting the object in a flat marker colour changes exactly the masked pixels.
    Returns the unmarked ``(image, mask, label)``."""
    image, mask, label = synthetic.render(index, 48, seed, **style)
    marked, marked_mask, _ = synthetic.render(index, 48, seed, object_fill=(1.0, 0.0, 1.0),
                                              **style)
    np.testing.assert_array_equal(marked_mask, mask)
    on = mask.astype(bool)
    assert 0 < on.sum() < on.size
    assert (marked[on] == [255, 0, 255]).all()
    np.testing.assert_array_equal(marked[~on], image[~on])
    return image, mask, label


def test_mask_equals_the_pixels_where_the_object_was_drawn():
    for index in range(12):
        _assert_mask_is_where_the_object_was_drawn(index, 11)


def test_classes_differ_in_shape_not_only_colour():
    """Canonical shapes of different classes disagree on a good share of the unit square."""
    grid = np.linspace(-1.1, 1.1, 101)
    u, v = np.meshgrid(grid, grid)
    shapes = [synthetic.shape_mask(k, u, v) for k in range(synthetic.NUM_CLASSES)]
    for i in range(len(shapes)):
        for j in range(i + 1, len(shapes)):
            disagreement = (shapes[i] != shapes[j]).mean()
            assert disagreement > 0.04, (synthetic.CLASS_NAMES[i], synthetic.CLASS_NAMES[j])


def test_backgrounds_are_cluttered():
    """Backgrounds hold several distinct colour regions (gradient, texture, distractors),
    not a flat field a mask method could trivially separate."""
    data = synthetic.generate(16, 64, seed=0)
    for image, mask in zip(data.images, data.masks):
        background = image[mask == 0]
        assert background.std(axis=0).mean() > 15
        coarse = np.unique(background // 32, axis=0)
        assert len(coarse) >= 4


def test_class_colour_variant_changes_only_the_object_colour():
    """The easy variant keeps every mask, label and background pixel; inside the object
    the mean colour sits near its class's hue (jitter ±0.05, texture ±0.2 averaging out)."""
    default = synthetic.generate(64, 32, seed=3)
    easy = synthetic.generate(64, 32, seed=3, object_colour="class")
    np.testing.assert_array_equal(easy.masks, default.masks)
    np.testing.assert_array_equal(easy.labels, default.labels)
    background = default.masks == 0
    np.testing.assert_array_equal(easy.images[background], default.images[background])
    errors = []
    for image, mask, label in zip(easy.images, easy.masks, easy.labels):
        mean = image[mask == 1].mean(axis=0) / 255.0
        errors.append(np.abs(mean - synthetic.CLASS_COLOURS[label]).max())
    assert np.median(errors) < 0.1
    with pytest.raises(ValueError, match="object_colour"):
        synthetic.generate(2, 32, object_colour="rainbow")


def test_max_rotation_zero_draws_upright_objects_over_the_same_background():
    squares = [i for i in range(80) if synthetic.label_for(i, 0) == 1][:6]
    fills_upright, fills_any = [], []
    for i in squares:
        upright_image, upright_mask, _ = synthetic.render(i, 64, 0, max_rotation=0.0)
        image, mask, _ = synthetic.render(i, 64, 0)
        for m, fills in ((upright_mask, fills_upright), (mask, fills_any)):
            rows, cols = np.nonzero(m)
            box = (np.ptp(rows) + 1) * (np.ptp(cols) + 1)
            fills.append(m.sum() / box)
        # Only the object moved: outside both objects the pixels are identical.
        outside = (upright_mask == 0) & (mask == 0)
        np.testing.assert_array_equal(upright_image[outside], image[outside])
    assert min(fills_upright) > 0.95  # an axis-aligned square fills its bounding box
    assert min(fills_any) < 0.8       # rotated squares do not


def test_upright_style_is_deterministic_with_exact_masks_and_flat_upright_objects():
    data = synthetic.generate(24, 48, seed=3, style="upright")
    again = synthetic.generate(30, 48, seed=3, style="upright")
    np.testing.assert_array_equal(data.images, again.images[:24])  # a prefix, byte-identical
    np.testing.assert_array_equal(data.masks, again.masks[:24])
    np.testing.assert_array_equal(data.labels, [synthetic.label_for(i, 3) for i in range(24)])
    assert not np.array_equal(data.images, synthetic.generate(24, 48, seed=3).images)
    for index in range(24):
        image, mask, label = _assert_mask_is_where_the_object_was_drawn(
            index, 3, style="upright")
        assert len(np.unique(image[mask.astype(bool)], axis=0)) == 1  # one flat colour
        if synthetic.CLASS_NAMES[label] == "square":  # within 10 degrees of upright
            rows, cols = np.nonzero(mask)
            assert mask.sum() / ((np.ptp(rows) + 1) * (np.ptp(cols) + 1)) > 0.72


def test_unknown_style_is_named():
    with pytest.raises(ValueError, match="style must be one of.*'tilted'"):
        synthetic.render(0, 32, style="tilted")
    with pytest.raises(ValueError, match="style"):
        synthetic.generate(2, 32, style="tilted")
