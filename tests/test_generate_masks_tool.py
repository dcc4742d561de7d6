"""Mask generation for a folder: mirrored paths, resume, shards, corrupt files, CLI."""
import json
import os
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from harl_tf.data import synthetic
from harl_tf.masks import get_method
from harl_tf.masks.folder import (CorruptImageError, generate_mask_folder, list_images,
                                  mask_relpath, read_image, shard)

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NUM_GOOD = 9


@pytest.fixture()
def images_dir(tmp_path):
    """9 synthetic images in class folders (JPEG and PNG), plus one truncated JPEG."""
    root = tmp_path / "images"
    data = synthetic.generate(NUM_GOOD, image_size=48, seed=3)
    for i, (image, label) in enumerate(zip(data.images, data.labels)):
        folder = root / data.class_names[label]
        folder.mkdir(parents=True, exist_ok=True)
        Image.fromarray(image).save(folder / (f"{i:03d}.jpg" if i % 3 else f"{i:03d}.png"),
                                    quality=95)
    good = (root / data.class_names[data.labels[1]] / "001.jpg").read_bytes()
    (root / "broken").mkdir()
    (root / "broken" / "cut.jpg").write_bytes(good[: len(good) // 2])
    return str(root)


def _masks(masks_dir):
    found = {}
    for directory, _, files in os.walk(masks_dir):
        for name in files:
            if name.endswith(".png"):
                rel = os.path.relpath(os.path.join(directory, name), masks_dir)
                found[rel] = np.asarray(Image.open(os.path.join(directory, name)))
    return found


def test_masks_mirror_image_paths_as_0_255_pngs(images_dir, tmp_path):
    masks_dir = str(tmp_path / "masks")
    summary = generate_mask_folder(images_dir, masks_dir, progress=False)
    good = [p for p in list_images(images_dir) if not p.startswith("broken/")]
    masks = _masks(masks_dir)
    assert sorted(masks) == sorted(mask_relpath(p) for p in good)
    method = get_method("conventional")
    for rel in good:
        mask = masks[mask_relpath(rel)]
        assert mask.shape == (48, 48) and set(np.unique(mask)) <= {0, 255}
        expected = method(read_image(os.path.join(images_dir, rel)))
        np.testing.assert_array_equal(mask, expected * 255)
    assert summary["written"] == NUM_GOOD and summary["num_images"] == NUM_GOOD + 1
    assert summary["params"] == method.params
    assert json.load(open(os.path.join(masks_dir, "summary.json")))["written"] == NUM_GOOD


def test_corrupt_jpeg_is_counted_by_path_and_strict_stops(images_dir, tmp_path):
    summary = generate_mask_folder(images_dir, str(tmp_path / "m1"), progress=False)
    assert summary["corrupt"] == 1
    assert summary["corrupt_paths"] == [os.path.join(images_dir, "broken/cut.jpg")]
    with pytest.raises(CorruptImageError, match="cut.jpg"):
        generate_mask_folder(images_dir, str(tmp_path / "m2"), strict=True, progress=False)


def test_second_run_resumes_without_rewriting(images_dir, tmp_path):
    masks_dir = str(tmp_path / "masks")
    generate_mask_folder(images_dir, masks_dir, progress=False)
    good = [p for p in list_images(images_dir) if not p.startswith("broken/")]
    victim = os.path.join(masks_dir, mask_relpath(good[0]))
    os.remove(victim)
    marker = os.path.join(masks_dir, mask_relpath(good[1]))
    Image.fromarray(np.zeros((48, 48), np.uint8)).save(marker)  # must survive a resume
    summary = generate_mask_folder(images_dir, masks_dir, progress=False)
    assert summary["written"] == 1 and summary["skipped_existing"] == NUM_GOOD - 1
    assert os.path.exists(victim)
    assert np.asarray(Image.open(marker)).max() == 0
    assert not [n for n in os.listdir(os.path.dirname(victim)) if n.endswith(".tmp")]


def test_shards_are_disjoint_and_cover_everything(images_dir, tmp_path):
    everything = list_images(images_dir)
    parts = [shard(everything, i, 3) for i in range(3)]
    assert sorted(sum(parts, [])) == everything
    assert sum(len(p) for p in parts) == len(set(sum(parts, [])))
    written = []
    for i in range(3):
        masks_dir = str(tmp_path / f"shard{i}")
        summary = generate_mask_folder(images_dir, masks_dir, shard_index=i, num_shards=3,
                                       progress=False)
        assert os.path.exists(os.path.join(masks_dir, f"summary-{i:05d}-of-00003.json"))
        written += [p for p in _masks(masks_dir)]
        assert summary["num_images"] == len(parts[i])
    assert sorted(written) == sorted(mask_relpath(p) for p in everything
                                     if not p.startswith("broken/"))
    with pytest.raises(ValueError, match="shard_index"):
        shard(everything, 3, 3)


def test_two_worker_processes_write_the_same_masks(images_dir, tmp_path):
    one, two = str(tmp_path / "one"), str(tmp_path / "two")
    generate_mask_folder(images_dir, one, num_workers=1, progress=False)
    summary = generate_mask_folder(images_dir, two, num_workers=2, progress=False)
    assert summary["written"] == NUM_GOOD and summary["corrupt"] == 1
    first, second = _masks(one), _masks(two)
    assert sorted(first) == sorted(second)
    for rel in first:
        np.testing.assert_array_equal(first[rel], second[rel], err_msg=rel)


def test_cli_passes_method_flags_and_writes_summary(images_dir, tmp_path):
    masks_dir = str(tmp_path / "masks")
    command = [sys.executable, os.path.join(REPO, "tools", "generate_masks.py"),
               f"--images_dir={images_dir}", f"--masks_dir={masks_dir}", "--sigma=0.4",
               "--min_size=1500", "--threshold=0.5", "--progress=false"]
    done = subprocess.run(command, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout.strip().splitlines()[-1])["written"] == NUM_GOOD
    assert "broken/cut.jpg" in done.stderr
    params = json.load(open(os.path.join(masks_dir, "summary.json")))["params"]
    assert (params["sigma"], params["min_size"], params["threshold"]) == (0.4, 1500, 0.5)
    strict = subprocess.run(command + ["--strict", f"--masks_dir={tmp_path / 'm2'}"],
                            capture_output=True, text=True)
    assert strict.returncode == 2 and "Traceback" not in strict.stderr
    last = strict.stderr.strip().splitlines()[-1]
    assert last.startswith("generate_masks: error: ") and "cut.jpg" in last


def test_uniform_image_fallback_is_counted_and_16_bit_png_is_read(tmp_path):
    import cv2

    images_dir = tmp_path / "odd"
    images_dir.mkdir()
    Image.fromarray(np.full((20, 30, 3), 90, np.uint8)).save(images_dir / "flat.png")
    ramp = (np.arange(24 * 24, dtype=np.uint32).reshape(24, 24) * 113).astype(np.uint16)
    cv2.imwrite(str(images_dir / "deep16.png"), ramp)
    np.testing.assert_array_equal(read_image(str(images_dir / "deep16.png"))[..., 1],
                                  ((ramp.astype(np.uint32) * 255 + 32767) // 65535))
    summary = generate_mask_folder(str(images_dir), str(tmp_path / "masks"), progress=False)
    assert summary["written"] == 2 and summary["fallbacks"] >= 1
    assert summary["fallback_reasons"].get("single_segment") == 1
