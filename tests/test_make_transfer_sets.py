"""bench.make_transfer_sets: the transfer datasets are folders the TFRecord builder reads,
with exact masks, disjoint train / test objects and a README; tiny inputs (sklearn's
bundled digits, fake idx files, stand-in photographs)."""
import gzip
import os

import cv2
import numpy as np
import pytest

from bench import make_transfer_sets as transfer
from bench.common.data import FASHION_MNIST_CLASSES, PHOTOS
from harl_tf.data import sources


def _photos(folder):
    os.makedirs(folder)
    for i, photo in enumerate(PHOTOS):
        cv2.imwrite(os.path.join(folder, photo.name), np.full((80, 100, 3), 10 + i, np.uint8))
    return folder


def test_render_digit_mask_is_the_opaque_stroke():
    digit = np.zeros((8, 8))
    digit[1:7, 3:5] = 16  # a bar: a "one"
    background = np.full((64, 64, 3), 100, np.uint8)
    image, mask = transfer.render_digit(digit, background, np.random.default_rng(0))
    assert image.shape == (64, 64, 3) and set(np.unique(mask)) <= {0, 255}
    ys, xs = np.nonzero(mask)
    assert 0.3 * 64 <= ys.max() - ys.min() + 1 <= 0.9 * 64  # the box is 0.5-0.9 of the side
    assert xs.max() - xs.min() < ys.max() - ys.min()        # tall and thin, as drawn
    # Beyond two pixels of the mask the background is untouched (no halo of faint strokes).
    near = cv2.dilate(mask, np.ones((5, 5), np.uint8)) > 0
    assert (image[~near] == 100).all()
    # Inside the mask the tinted stroke: alpha > 0.5, so at least half of the colour.
    assert np.abs(image[mask > 0].astype(int) - 100).max() > 20


def test_split_digits_is_stratified_and_disjoint():
    labels = np.repeat(np.arange(3), [10, 20, 7])
    train, test = transfer.split_digits(labels, 0.3)
    assert not set(train) & set(test) and len(train) + len(test) == len(labels)
    assert [int((labels[test] == c).sum()) for c in range(3)] == [3, 6, 2]
    again = transfer.split_digits(labels, 0.3)
    np.testing.assert_array_equal(again[1], test)


def test_digits_scenes_folder_builds(tmp_path):
    pytest.importorskip("sklearn", reason="the digits ship with scikit-learn (extra bench)")
    out = str(tmp_path / "digits_scenes")
    summary = transfer.write_digits_scenes(
        out, photos_dir=_photos(str(tmp_path / "photos")), seed=0, test_fraction=0.3,
        copies={"train": 2, "test": 1}, limit=60)
    assert summary["images"] == {"train": 2 * summary["digits"]["train"],
                                 "test": summary["digits"]["test"]}
    source = sources.FolderSource(out)  # what tools.build_tfrecords --source=folder reads
    assert source.class_names() == list(transfer.DIGIT_CLASSES)
    train = source.list_refs("train")   # raises if a mask is missing
    test = source.list_refs("test")
    digit = lambda ref: ref.id.split("/")[-1].split("_")[0]  # noqa: E731
    assert not {digit(r) for r in train} & {digit(r) for r in test}
    assert len({r.label for r in test}) == 10
    mask = cv2.imread(os.path.join(out, "test", "masks", test[0].id.split("/", 2)[2]
                                   .rsplit(".", 1)[0] + ".png"), cv2.IMREAD_GRAYSCALE)
    assert mask is not None and 0 < (mask > 0).mean() < 0.6
    assert "load_digits" in open(os.path.join(out, "README.md")).read()


def _idx(path, array, magic):
    header = np.array([magic, *array.shape], ">i4").tobytes()
    with gzip.open(path, "wb") as f:
        f.write(header + array.astype(np.uint8).tobytes())


def test_fashion_mnist_folder(tmp_path):
    src = tmp_path / "fmnist"
    src.mkdir()
    rng = np.random.default_rng(0)
    for prefix, n in (("train", 6), ("t10k", 4)):
        images = np.zeros((n, 28, 28), np.uint8)
        images[:, 8:20, 10:18] = rng.integers(1, 256, (n, 12, 8))
        _idx(str(src / f"{prefix}-images-idx3-ubyte.gz"), images, 2051)
        _idx(str(src / f"{prefix}-labels-idx1-ubyte.gz"), np.arange(n) % 10, 2049)
    out = str(tmp_path / "out" / "fashion_mnist")
    summary = transfer.write_fashion_mnist(out, src=str(src), num_train=5, num_test=4)
    assert summary["images"] == {"train": 5, "test": 4}
    source = sources.FolderSource(out)
    assert source.class_names() == list(FASHION_MNIST_CLASSES)
    refs = source.list_refs("test")
    assert sorted(r.label for r in refs) == [0, 1, 2, 3]
    mask = cv2.imread(source.mask_path(source.image_path(refs[0])), cv2.IMREAD_GRAYSCALE)
    # pixel > 0 at 28 px (a 12 x 8 block), nearest-neighbour to 64 px.
    assert abs((mask > 0).sum() - 12 * 8 * (64 / 28) ** 2) < 60
    assert "Fashion-MNIST" in open(os.path.join(out, "README.md")).read()


def test_missing_photographs_stop_digits_scenes(tmp_path):
    from harl_tf import errors
    with pytest.raises(errors.MissingPathError, match="apt-get install"):
        transfer.write_digits_scenes(str(tmp_path / "d"), photos_dir=str(tmp_path), seed=0,
                                     test_fraction=0.3, copies={"train": 1, "test": 1})
    assert not os.path.exists(tmp_path / "d")
