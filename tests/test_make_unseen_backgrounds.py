"""bench.make_unseen_backgrounds: fmnist-scenes' test objects on held-out photographs.

A tiny fmnist-scenes-like folder (2 classes x 3 images) and stand-in photographs under the
held-out photographs' names: the object keeps its pixels, the background is a crop of a
held-out photograph, masks and ids are the source's, the output depends on the seed only,
and missing photographs stop the run with the apt-get line."""
import os
import subprocess
import sys

import cv2
import numpy as np
import pytest

from bench import make_unseen_backgrounds as unseen
from bench.common.data import PHOTOS
from harl_tf import errors

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _scenes(root, rng):
    """root/{classes.txt, test/images/<c>/<i>.jpg, test/masks/<c>/<i>.png}: a flat
    colour square object on a grey gradient."""
    with open(os.path.join(root, "classes.txt"), "w") as f:
        f.write("a\nb\n")
    for c in ("a", "b"):
        for i in range(3):
            image = np.tile(np.linspace(90, 160, 64, dtype=np.uint8)[None, :, None], (64, 1, 3))
            mask = np.zeros((64, 64), np.uint8)
            y, x = rng.integers(4, 30, 2)
            mask[y:y + 30, x:x + 24] = 255
            image[mask > 0] = rng.integers(0, 256, 3)
            for kind, array, ext in (("images", image, ".jpg"), ("masks", mask, ".png")):
                path = os.path.join(root, "test", kind, c, f"{c}{i}{ext}")
                os.makedirs(os.path.dirname(path), exist_ok=True)
                cv2.imwrite(path, array)


def _photos(folder, rng):
    """Uniform-colour stand-ins, far from the objects' grey background."""
    os.makedirs(folder)
    for photo in PHOTOS:
        colour = rng.integers(0, 60, 3).astype(np.uint8)
        cv2.imwrite(os.path.join(folder, photo.name), np.full((90, 120, 3), colour))


@pytest.fixture
def folders(tmp_path):
    rng = np.random.default_rng(0)
    src, photos = tmp_path / "data" / "scenes", tmp_path / "photos"
    src.mkdir(parents=True)
    _scenes(str(src), rng)
    _photos(str(photos), rng)
    return str(src), str(photos), tmp_path


def _read(path, flag=cv2.IMREAD_COLOR):
    return cv2.imread(path, flag)


def test_objects_on_held_out_photographs(folders):
    src, photos, tmp = folders
    out = str(tmp / "out")
    summary = unseen.make(src, out, photos_dir=photos, seed=3)
    assert summary["images"] == 6 and summary["per_class"] == {"a": 3, "b": 3}
    for c in ("a", "b"):
        for i in range(3):
            rel = os.path.join(c, f"{c}{i}")
            with open(os.path.join(src, "test", "masks", rel + ".png"), "rb") as f:
                source_mask = f.read()
            with open(os.path.join(out, "test", "masks", rel + ".png"), "rb") as f:
                assert f.read() == source_mask  # masks copied byte for byte
            mask = _read(os.path.join(out, "test", "masks", rel + ".png"),
                         cv2.IMREAD_GRAYSCALE) > 0
            before = _read(os.path.join(src, "test", "images", rel + ".jpg")).astype(float)
            after = _read(os.path.join(out, "test", "images", rel + ".jpg")).astype(float)
            inside = np.abs(after - before)[mask].mean()
            # Away from the edge (JPEG ringing), the background is the dark photograph,
            # not the source's grey gradient (90-160).
            far = cv2.erode((~mask).astype(np.uint8), np.ones((7, 7), np.uint8)) > 0
            assert inside < 6.0, inside
            assert after[far].max() < 75 and before[far].min() > 80
    with open(os.path.join(out, "classes.txt")) as f:
        assert f.read() == "a\nb\n"
    readme = open(os.path.join(out, "README.md")).read()
    assert all(p.name in readme for p in PHOTOS) and "lomiri-wallpapers-16.04" in readme


def test_composite_is_exact_and_seeded():
    rng = np.random.default_rng(1)
    images = [rng.integers(0, 256, (64, 64, 3), dtype=np.uint8) for _ in range(4)]
    masks = [np.zeros((64, 64), np.uint8) for _ in range(4)]
    for m in masks:
        m[10:40, 20:50] = 1
    photos = [np.full((100, 150, 3), v, np.uint8) for v in (7, 200)]
    out, draws = unseen.unseen_background_images(images, masks, photos, seed=5)
    for image, mask, result, (k, (x, y, side)) in zip(images, masks, out, draws):
        np.testing.assert_array_equal(result[mask > 0], image[mask > 0])
        assert (result[mask == 0] == photos[k][0, 0]).all()
        assert 30 <= side <= 100 and 0 <= x <= 150 - side and 0 <= y <= 100 - side
    again, _ = unseen.unseen_background_images(images[:2], masks[:2], photos, seed=5)
    np.testing.assert_array_equal(again[1], out[1])  # image i depends on (seed, i) only
    other = unseen.unseen_background_images(images, masks, photos, seed=6)[1]
    assert other != draws


def test_missing_photographs_name_the_packages(folders):
    src, photos, tmp = folders
    os.remove(os.path.join(photos, PHOTOS[-1].name))
    with pytest.raises(errors.MissingPathError, match="apt-get install lomiri-wallpapers-20.04"):
        unseen.make(src, str(tmp / "out"), photos_dir=photos, seed=0)
    assert not os.path.exists(tmp / "out")


def test_refuses_the_repository_and_the_source_folder(folders):
    src, photos, _ = folders
    for out in (os.path.join(ROOT, "unseen_out"), os.path.join(os.path.dirname(src), "x")):
        with pytest.raises(errors.ConfigError, match="inside"):
            unseen.make(src, out, photos_dir=photos, seed=0)


def test_binary_reports_one_line(folders):
    src, _, tmp = folders
    run = subprocess.run([sys.executable, "-m", "bench.make_unseen_backgrounds", f"--src={src}",
                          f"--output_dir={tmp / 'out'}", f"--photos_dir={tmp / 'none'}"],
                         cwd=ROOT, capture_output=True, text=True)
    assert run.returncode == 2
    assert run.stderr.strip().startswith("make_unseen_backgrounds: error: --photos_dir=")
    assert len(run.stderr.strip().splitlines()) == 1
