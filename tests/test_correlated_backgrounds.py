"""harl_tf.data.correlated_backgrounds: backgrounds re-drawn so that they predict the class."""
import numpy as np
import pytest

from harl_tf.data import background_shift, correlated_backgrounds as cb

# Four background colours far apart in lightness and hue; the first RGB channel is also
# what the tests read back from a background pixel.
COLOURS = np.array([[20, 40, 200], [90, 200, 30], [170, 60, 60], [250, 240, 120]], np.uint8)


def _scene(rng, colour, label, size=24):
    """A noisy flat background of ``colour`` with a square object whose grey level is
    the label's, at a random place."""
    image = np.clip(COLOURS[colour].astype(int) + rng.integers(-6, 7, (size, size, 3)),
                    0, 255).astype(np.uint8)
    mask = np.zeros((size, size), np.uint8)
    y, x = rng.integers(2, size - 10, 2)
    mask[y:y + 8, x:x + 8] = 255
    image[mask > 0] = 30 + 50 * label
    return image, mask


def _dataset(n=160, classes=4, seed=0):
    """Backgrounds independent of the label: colour i % 4, label (i // 4) % classes."""
    rng = np.random.default_rng(seed)
    images, masks, labels, colours = [], [], [], []
    for i in range(n):
        label, colour = (i // 4) % classes, i % 4
        image, mask = _scene(rng, colour, label)
        images.append(image), masks.append(mask), labels.append(label), colours.append(colour)
    return images, masks, np.array(labels), np.array(colours)


def _background_colour(image, mask):
    """Index of the COLOURS entry nearest to the median background pixel."""
    pixel = np.median(image[mask == 0], axis=0)
    return int(np.argmin(((COLOURS.astype(float) - pixel) ** 2).sum(-1)))


def test_kmeans_recovers_separated_groups_and_is_deterministic():
    rng = np.random.default_rng(1)
    centres = np.array([[0, 0], [10, 0], [0, 10]], float)
    truth = np.repeat(np.arange(3), 50)
    x = centres[truth] + rng.normal(0, 0.5, (150, 2))
    groups = cb.kmeans(x, 3, seed=0)
    # One group per true cluster (a permutation), every point in its cluster's group.
    assert len(set(zip(truth.tolist(), groups.tolist()))) == 3
    assert sorted(np.bincount(groups).tolist()) == [50, 50, 50]
    np.testing.assert_array_equal(cb.kmeans(x, 3, seed=0), groups)
    with pytest.raises(ValueError, match="k = 4 groups for 3 points"):
        cb.kmeans(x[:3], 4, seed=0)


def test_full_correlation_gives_each_class_one_background_and_keeps_objects():
    images, masks, labels, colours = _dataset()
    # Before: each class shows all four background colours.
    before = {c: {_background_colour(i, m) for i, m, l in zip(images, masks, labels) if l == c}
              for c in range(4)}
    assert all(len(s) == 4 for s in before.values())

    out, donors, info = cb.class_correlated(images, masks, labels, 1.0, seed=3)
    assert (donors >= 0).all() and len(out) == len(images)
    after = {c: {_background_colour(i, m) for i, m, l in zip(out, masks, labels) if l == c}
             for c in range(4)}
    # After: one background colour per class, a different one for each class.
    assert all(len(s) == 1 for s in after.values())
    assert len(set.union(*after.values())) == 4
    # The grouping found the four colours, and the donor of each example is in its class's
    # group; classes get groups in order of lightness.
    assert sorted(info["group_sizes"]) == [40, 40, 40, 40]
    group_of_class = {c: g for g, c in info["class_of_group"].items()}
    assert all(info["groups"][d] == group_of_class[l] for d, l in zip(donors, labels))
    lightness = [np.mean(COLOURS[colours[info["groups"] == group_of_class[c]][0]])
                 for c in range(4)]
    assert lightness == sorted(lightness)
    # Objects unchanged, backgrounds really moved.
    for original, new, mask in zip(images, out, masks):
        np.testing.assert_array_equal(new[mask > 0], original[mask > 0])
    assert sum(_background_colour(i, m) != _background_colour(o, m)
               for i, o, m in zip(images, out, masks)) >= 100


def test_partial_correlation_moves_that_share_and_zero_keeps_everything():
    images, masks, labels, _ = _dataset(n=400)
    out, donors, _ = cb.class_correlated(images, masks, labels, 0.5, seed=0)
    moved = (donors >= 0).mean()
    assert 0.42 <= moved <= 0.58, moved   # binomial(400, 0.5): sd 0.025
    for image, new, donor in zip(images, out, donors):
        if donor < 0:
            np.testing.assert_array_equal(new, image)
    out0, donors0, _ = cb.class_correlated(images, masks, labels, 0.0, seed=0)
    assert (donors0 == -1).all()
    assert all(np.array_equal(a, b) for a, b in zip(images, out0))


def test_same_seed_same_result_and_bad_input_is_named():
    images, masks, labels, _ = _dataset(n=40)
    a, da, _ = cb.class_correlated(images, masks, labels, 0.7, seed=5)
    b, db, _ = cb.class_correlated(images, masks, labels, 0.7, seed=5)
    np.testing.assert_array_equal(da, db)
    assert all(np.array_equal(x, y) for x, y in zip(a, b))
    with pytest.raises(ValueError, match=r"correlation must be in \[0, 1\], got 1.5"):
        cb.class_correlated(images, masks, labels, 1.5, seed=0)
    with pytest.raises(ValueError, match="at least two classes"):
        cb.class_correlated(images, masks, np.zeros(40, int), 0.5, seed=0)
    empty = [m.copy() for m in masks]
    empty[7][:] = 0
    ids = [f"img{i}" for i in range(40)]
    with pytest.raises(background_shift.EmptyMaskError, match="'img7'"):
        cb.class_correlated(images, empty, labels, 0.5, seed=0, ids=ids)
