"""Preview contact sheets: masks overlaid on images, and the pipeline's augmented views."""
import os
import subprocess
import sys

import numpy as np
import pytest
import tensorflow as tf
from PIL import Image

from harl_tf import viz
from harl_tf.data import schema, synthetic

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINTED_GREY = [170, 55, 55]  # round(0.55 * 100 + 0.45 * (255, 0, 0))


def _run_preview(*args):
    # a subprocess: tools define absl flags (e.g. --images_dir) that other tools define too
    done = subprocess.run([sys.executable, os.path.join(REPO, "tools", "preview.py"), *args],
                          capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-2000:]
    return done


def _tile(sheet, row, column, tile_size, gap=4, titled=True):
    y = (viz.TITLE_HEIGHT if titled else 0) + gap + row * (tile_size + gap)
    x = gap + column * (tile_size + gap)
    return sheet[y:y + tile_size, x:x + tile_size]


def test_overlay_tints_the_foreground_and_outlines_it():
    image = np.full((12, 12, 3), 100, np.uint8)
    mask = np.zeros((12, 12), np.uint8)
    mask[3:9, 3:9] = 1
    out = viz.overlay(image, mask)
    np.testing.assert_array_equal(out[mask == 0], image[mask == 0])  # background untouched
    np.testing.assert_array_equal(out[4:8, 4:8].reshape(-1, 3), [TINTED_GREY] * 16)
    edge = viz.contour(mask)
    assert edge.sum() == 20 and edge[3, 3] and not edge[4, 4]  # the 6×6 square's outline
    np.testing.assert_array_equal(out[edge], [viz.CONTOUR] * 20)
    # float [0, 1] views and [H, W, 1] masks, as the pipeline gives them, work the same
    np.testing.assert_array_equal(viz.overlay(image / 255.0, mask[..., None] * 1.0), out)
    with pytest.raises(ValueError, match="view1 0"):
        viz.overlay(image, mask[:5], name="view1 0")


def test_contact_sheet_places_tiles_on_a_grid():
    red, blue = np.zeros((5, 5, 3), np.uint8), np.zeros((9, 7, 3), np.uint8)
    red[..., 0], blue[..., 2] = 255, 255
    sheet = viz.contact_sheet([[red, blue], [blue]], tile_size=16, gap=4, titles=("a", "b"))
    assert sheet.shape[:2] == viz.sheet_size(2, 2, tile_size=16, gap=4) == (2 * 16 + 3 * 4 + 14,
                                                                             2 * 16 + 3 * 4)
    assert (_tile(sheet, 0, 0, 16) == [255, 0, 0]).all()
    assert (_tile(sheet, 0, 1, 16) == [0, 0, 255]).all()
    assert (_tile(sheet, 1, 0, 16) == [0, 0, 255]).all()
    assert (_tile(sheet, 1, 1, 16) == viz.BACKGROUND).all()  # a short row leaves a blank


def test_preview_of_a_mask_folder(tmp_path):
    for i in range(5):
        image = np.full((20 + i, 30, 3), 100, np.uint8)
        mask = np.zeros((20 + i, 30), np.uint8)
        mask[5:15, 10:20] = 255
        (tmp_path / "images" / "cls").mkdir(parents=True, exist_ok=True)
        (tmp_path / "masks" / "cls").mkdir(parents=True, exist_ok=True)
        Image.fromarray(image).save(tmp_path / "images" / "cls" / f"{i}.jpg", quality=100)
        Image.fromarray(mask).save(tmp_path / "masks" / "cls" / f"{i}.png")
    output = str(tmp_path / "out" / "sheet.png")
    done = _run_preview(f"--images_dir={tmp_path / 'images'}", f"--output={output}",
                        "--rows=2", "--per_row=2", "--tile_size=60")
    assert "sheet.png (260x146 px, 2 rows)" in done.stdout
    assert os.listdir(tmp_path / "out") == ["sheet.png"]  # written atomically, no leftovers
    sheet = np.asarray(Image.open(output).convert("RGB"))
    assert sheet.shape[:2] == viz.sheet_size(2, 4, tile_size=60)
    image_tile, mask_tile = _tile(sheet, 0, 0, 60), _tile(sheet, 0, 1, 60)
    # the object's middle is tinted red in the mask tile only; the corners are unchanged
    assert np.abs(image_tile[30, 30].astype(int) - 100).max() <= 2
    assert np.abs(mask_tile[30, 30].astype(int) - TINTED_GREY).max() <= 2
    np.testing.assert_array_equal(mask_tile[2, 2], image_tile[2, 2])
    assert (mask_tile == viz.CONTOUR).all(axis=-1).sum() > 20  # the outline is drawn


@pytest.fixture(scope="module")
def records(tmp_path_factory):
    path = str(tmp_path_factory.mktemp("records") / "train-00000-of-00001.tfrecord")
    data = synthetic.generate(6, 48, seed=1)
    with tf.io.TFRecordWriter(path) as writer:
        for i in range(len(data)):
            writer.write(schema.serialize_example(
                image_bytes=tf.io.encode_png(data.images[i]).numpy(), image_format="png",
                height=48, width=48, mask_png=schema.encode_mask_png(data.masks[i]),
                label=int(data.labels[i]), example_id=f"synthetic/{i}",
                mask_method="ground_truth", mask_params={}))
    return path, data


def test_preview_of_records_shows_their_masks(records, tmp_path):
    path, data = records
    examples = list(viz.record_examples(path))
    assert len(examples) == 6
    np.testing.assert_array_equal(examples[0][0], data.images[0])
    np.testing.assert_array_equal(examples[0][1], data.masks[0])
    sheet = viz.contact_sheet(viz.mask_rows(iter(examples), 3), tile_size=48,
                              titles=viz.MASK_TITLES)
    assert sheet.shape[:2] == viz.sheet_size(3, 4, tile_size=48)
    np.testing.assert_array_equal(_tile(sheet, 0, 1, 48), viz.overlay(data.images[0],
                                                                      data.masks[0]))


def test_preview_of_pipeline_views_overlays_each_views_mask(records, tmp_path):
    path, _ = records
    batch = viz.pipeline_views(path, 3, 32, seed=0)
    rows = viz.view_rows(batch, 3)
    assert len(rows) == 3 and all(len(row) == 4 for row in rows)
    seen_objects = 0
    for i, row in enumerate(rows):
        for view, tinted, key in ((row[0], row[1], "mask1"), (row[2], row[3], "mask2")):
            mask = batch[key][i, ..., 0] > 0.5
            seen_objects += int(mask.any())
            changed = (tinted != viz.overlay(view, np.zeros_like(mask))).any(axis=-1)
            np.testing.assert_array_equal(changed & ~mask, np.zeros_like(mask))
            assert not mask.any() or changed[mask].mean() > 0.5  # the tint covers the mask
    assert seen_objects >= 3  # the synthetic objects are large: most crops keep some
    output = str(tmp_path / "views.png")
    viz.write_png(viz.contact_sheet(rows, tile_size=32, titles=viz.VIEW_TITLES), output)
    sheet = np.asarray(Image.open(output).convert("RGB"))
    assert sheet.shape[:2] == viz.sheet_size(3, 4, tile_size=32)
    np.testing.assert_array_equal(_tile(sheet, 0, 1, 32), rows[0][1])
