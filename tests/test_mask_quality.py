"""Mask quality: IoU / precision / recall / F-measure, per image and aggregated."""
import json
import os
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from harl_tf.masks.quality import (F_BETA_SQUARED, evaluate, evaluate_arrays,
                                   evaluate_folders, mask_scores)

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _mask(rows):
    return np.array(rows, np.uint8)


# 3 predicted pixels, 4 true pixels, 2 in common: tp=2, fp=1, fn=2.
PRED = _mask([[1, 1, 0, 0], [1, 0, 0, 0], [0, 0, 0, 0], [0, 0, 0, 0]])
GT = _mask([[1, 0, 0, 0], [1, 1, 0, 0], [0, 1, 0, 0], [0, 0, 0, 0]])


def test_scores_match_a_hand_computed_example():
    scores = mask_scores(PRED, GT)
    assert scores["iou"] == pytest.approx(2 / 5)
    assert scores["precision"] == pytest.approx(2 / 3)
    assert scores["recall"] == pytest.approx(2 / 4)
    # F = 1.3 * (2/3) * (1/2) / (0.3 * 2/3 + 1/2) = 0.4333 / 0.7
    assert F_BETA_SQUARED == 0.3
    assert scores["f_measure"] == pytest.approx(1.3 * (2 / 3) * 0.5 / (0.3 * 2 / 3 + 0.5))


def test_0_255_masks_score_like_0_1_masks():
    assert mask_scores(PRED * 255, GT[..., None] * 255) == mask_scores(PRED, GT)


def test_empty_masks_both_empty_is_perfect_one_empty_is_zero():
    empty = np.zeros((4, 4), np.uint8)
    assert mask_scores(empty, empty) == dict(iou=1.0, precision=1.0, recall=1.0,
                                             f_measure=1.0)
    assert mask_scores(empty, GT)["iou"] == 0.0 and mask_scores(PRED, empty)["iou"] == 0.0
    assert mask_scores(empty, GT)["precision"] == 0.0


def test_shape_mismatch_names_the_example():
    with pytest.raises(ValueError, match="cat/7.*differs"):
        mask_scores(np.zeros((4, 4)), np.zeros((4, 5)), name="cat/7")


def test_means_per_class_and_class_mean():
    full = np.ones((4, 4), np.uint8)
    items = [("a", "cat", PRED, GT), ("b", "cat", full, full), ("c", "dog", GT, GT),
             ("d", "dog", None, GT)]
    report = evaluate(items)
    assert report.num_images == 3 and report.missing == ["d"]
    assert report.mean_iou == pytest.approx((0.4 + 1 + 1) / 3)
    per_class = report.per_class()
    assert per_class["cat"]["iou"] == pytest.approx(0.7) and per_class["cat"]["count"] == 2
    assert per_class["dog"]["iou"] == pytest.approx(1.0)
    assert report.class_mean_iou == pytest.approx(0.85)
    assert json.loads(json.dumps(report.summary()))["num_missing"] == 1
    assert "cat" in report.table() and "0.7000" in report.table()


def test_evaluate_arrays_checks_lengths():
    assert evaluate_arrays([PRED], [GT]).mean_iou == pytest.approx(0.4)
    with pytest.raises(ValueError, match="1 predictions but 2"):
        evaluate_arrays([PRED], [GT, GT])


def _write_png(path, mask):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    Image.fromarray(mask.astype(np.uint8) * 255).save(path)


@pytest.fixture()
def folders(tmp_path):
    gt_dir, pred_dir = tmp_path / "gt", tmp_path / "pred"
    _write_png(str(gt_dir / "cat" / "1.png"), GT)
    _write_png(str(pred_dir / "cat" / "1.png"), PRED)
    _write_png(str(gt_dir / "dog" / "2.png"), GT)
    _write_png(str(pred_dir / "dog" / "2.png"), GT)
    _write_png(str(gt_dir / "dog" / "3.png"), GT)  # no prediction
    return str(pred_dir), str(gt_dir)


def test_folder_evaluation_matches_paths_and_classes(folders):
    report = evaluate_folders(*folders)
    assert {r["id"]: r["iou"] for r in report.rows} == pytest.approx(
        {"cat/1": 0.4, "dog/2": 1.0})
    assert report.missing == ["dog/3"]


def test_quality_tool_prints_table_writes_json_and_flags_missing(folders, tmp_path):
    pred_dir, gt_dir = folders
    out = str(tmp_path / "q.json")
    command = [sys.executable, os.path.join(REPO, "tools", "mask_quality.py"),
               f"--pred_dir={pred_dir}", f"--gt_dir={gt_dir}", f"--output_json={out}"]
    failed = subprocess.run(command, capture_output=True, text=True)
    assert failed.returncode == 2 and "Traceback" not in failed.stderr
    last = failed.stderr.strip().splitlines()[-1]
    assert last.startswith("mask_quality: error: 1 ground-truth masks have no prediction")
    assert "dog/3" in last and "--allow_missing" in last
    done = subprocess.run(command + ["--allow_missing"], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert "class-mean IoU 0.7000" in done.stdout
    summary = json.load(open(out))
    assert summary["mean_iou"] == pytest.approx(0.7) and summary["num_missing"] == 1


def _write_records(path, masks, ids, labels):
    import tensorflow as tf

    from harl_tf.data import schema
    with tf.io.TFRecordWriter(str(path)) as writer:
        for mask, example_id, label in zip(masks, ids, labels):
            image = tf.io.encode_png(np.zeros(mask.shape + (3,), np.uint8)).numpy()
            writer.write(schema.serialize_example(
                image_bytes=image, image_format="png", height=mask.shape[0],
                width=mask.shape[1], mask_png=schema.encode_mask_png(mask), label=label,
                example_id=example_id))


def test_record_masks_are_scored_against_records_and_folders(tmp_path):
    """Masks inside TFRecords score the hand-computed IoU, matched by id to ground truth
    held in other records or in a cut-outs style mask folder."""
    from PIL import Image

    from harl_tf.masks.quality import evaluate, iter_record_pairs
    pred = np.zeros((4, 4), np.uint8)
    pred[:2, :2] = 1                      # 4 pixels
    gt = np.zeros((4, 4), np.uint8)
    gt[:2, :] = 1                         # 8 pixels, overlap 4 -> IoU 0.5
    ids = ["test/images/cat/1.jpg"]
    _write_records(tmp_path / "pred.tfrecord", [pred], ids, [1])
    _write_records(tmp_path / "gt.tfrecord", [gt], ids, [1])
    by_records = evaluate(iter_record_pairs(str(tmp_path / "pred.tfrecord"),
                                            gt_records=str(tmp_path / "gt.tfrecord"),
                                            class_names=["dog", "cat"]))
    assert by_records.mean("iou") == pytest.approx(0.5)
    assert list(by_records.per_class()) == ["cat"]
    (tmp_path / "data/test/masks/cat").mkdir(parents=True)
    Image.fromarray(gt * 255).save(tmp_path / "data/test/masks/cat/1.png")
    by_folder = evaluate(iter_record_pairs(str(tmp_path / "pred.tfrecord"),
                                           gt_dir=str(tmp_path / "data")))
    assert by_folder.mean("iou") == pytest.approx(0.5)
    with pytest.raises(FileNotFoundError, match="no TFRecord file matches"):
        list(iter_record_pairs(str(tmp_path / "none-*"), gt_dir=str(tmp_path)))
