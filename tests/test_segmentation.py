"""Dense evaluation (``finetune --mode=segmentation``): the IoU metric is the VOC formula on a
confusion matrix over the whole split (absent classes out of the mean), the targets are the
item's class inside its mask, a tiny encoder fine-tuned for a few steps segments far
better than predicting background everywhere, the probe leaves the encoder untouched, and
records without masks or labels end the binary with one line."""
import json
import os
import re
import subprocess
import sys

import numpy as np
import pytest
import tensorflow as tf

from harl_tf.data import schema, synthetic
from harl_tf.downstream import encoder_source, evaluation, segmentation
from harl_tf.downstream.segmentation_metrics import confusion_matrix, segmentation_scores

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ENV = dict(os.environ, PYTHONPATH=ROOT, TF_CPP_MIN_LOG_LEVEL="3", CUDA_VISIBLE_DEVICES="")
# TF / absl C++ start-up lines: not the program's own output (as in test_bad_flags).
_TF_LOG = re.compile(r"^(WARNING: All log messages before absl::InitializeLog|"
                     r"[IWE]\d{4} \d\d:\d\d:\d\d|INFO:tensorflow:|To enable the following)")
SIZE = 32
# ResNet-18, small stem, width 0.25 (C = 128), total stride 8: a 4x4 map at 32 px.
TINY = {"depth": 18, "width_multiplier": 0.25, "small_stem": True, "output_stride": 32}


def write_records(path, num_images, *, seed, labels=None, masks=True):
    """Synthetic images with exact masks, objects painted in their class's hue (so that a
    few steps can learn the classes); ``labels`` overrides them, ``masks=False`` writes
    records without a mask. Returns the set."""
    data = synthetic.generate(num_images, image_size=SIZE, seed=seed, object_colour="class")
    with tf.io.TFRecordWriter(str(path)) as writer:
        for i in range(num_images):
            writer.write(schema.serialize_example(
                image_bytes=tf.io.encode_png(data.images[i]).numpy(), image_format="png",
                height=SIZE, width=SIZE,
                mask_png=schema.encode_mask_png(data.masks[i]) if masks else b"",
                label=int(data.labels[i] if labels is None else labels[i]),
                example_id=f"{os.path.basename(str(path))}/{i:05d}",
                mask_method="ground_truth" if masks else ""))
    return data


@pytest.fixture(scope="module")
def records(tmp_path_factory):
    root = tmp_path_factory.mktemp("segmentation_records")
    write_records(root / "train.tfrecord", 256, seed=0)
    eval_set = write_records(root / "eval.tfrecord", 64, seed=1)
    write_records(root / "no_masks.tfrecord", 8, seed=2, masks=False)
    write_records(root / "no_labels.tfrecord", 8, seed=3, labels=[-1] * 8)
    return root, eval_set


def test_confusion_matrix_counts_target_prediction_pairs():
    targets = np.array([[0, 0, 1], [2, 2, 0]])
    predictions = np.array([[0, 1, 1], [2, 0, 0]])
    np.testing.assert_array_equal(confusion_matrix(targets, predictions, 3),
                                  [[2, 1, 0],    # target 0: two right, one called 1
                                   [0, 1, 0],
                                   [1, 0, 1]])   # target 2: one right, one called 0
    with pytest.raises(ValueError, match=r"predictions must be in \[0, 3\)"):
        confusion_matrix(targets, predictions + 1, 3)


def test_scores_of_a_hand_computed_confusion_matrix_leave_absent_classes_out():
    confusion = np.array([[5, 1, 0, 0, 2],
                          [2, 3, 0, 0, 0],
                          [0, 0, 0, 0, 0],    # class 2: never a target, never predicted
                          [1, 0, 0, 0, 0],    # class 3: a target, never predicted
                          [0, 0, 0, 0, 0]])   # class 4: predicted, never a target
    scores = segmentation_scores(confusion)
    # IoU = tp / (row + column - tp): 5 / (8 + 8 - 5), 3 / (5 + 4 - 3), -, 0 / 1, 0 / 2.
    expected = [5 / 11, 3 / 6, None, 0.0, 0.0]
    assert scores["per_class_iou"][2] is None
    np.testing.assert_allclose([v for v in scores["per_class_iou"] if v is not None],
                               [v for v in expected if v is not None], rtol=1e-12)
    assert scores["classes_in_mean"] == 4
    assert scores["mean_iou"] == pytest.approx((5 / 11 + 0.5) / 4, rel=1e-12)
    assert scores["pixel_accuracy"] == pytest.approx(8 / 14, rel=1e-12)
    assert scores["num_pixels"] == 14
    with pytest.raises(ValueError, match="no pixel"):
        segmentation_scores(np.zeros((3, 3)))


def test_targets_are_the_class_plus_one_inside_the_mask(records):
    root, eval_set = records
    dataset = segmentation.eval_segmentation_dataset(
        str(root / "eval.tfrecord"), 16, SIZE, crop_fraction=1.0)  # whole image, same size
    targets = np.concatenate([b["target"].numpy() for b in dataset])
    expected = eval_set.masks * (eval_set.labels + 1)[:, None, None]
    np.testing.assert_array_equal(targets, expected)


def test_aspp_rates_scale_deeplab_rates_to_the_map():
    assert segmentation.aspp_rates(33) == (6, 12, 18)
    assert segmentation.aspp_rates(8) == (1, 3, 4)
    assert segmentation.aspp_rates(2) == (1, 1, 1)


@pytest.mark.parametrize("head", ["probe", "fcn", "aspp"])
def test_every_head_gives_logits_per_pixel_of_the_image(head):
    encoder = encoder_source.random_encoder(TINY, seed=0).encoder
    model = segmentation.SegmentationModel(encoder, 9, head=head, map_side=SIZE // 8)
    images = tf.random.stateless_uniform([2, SIZE, SIZE, 3], seed=[0, 1])
    assert model(images, training=False).shape == (2, SIZE, SIZE, 9)
    # The probe trains its 1x1 classifier only (standardisation has no trainable weights);
    # the decoders train with the encoder: conv kernel + BatchNorm gamma, beta per conv
    # (2 convs in fcn; 1x1, 3 rates, pooling and fusion in aspp).
    parts = [model.classifier] + ([] if head == "probe" else [encoder, *model.decoder])
    expected = {id(v) for part in parts for v in part.trainable_variables}
    assert {id(v) for v in model.trainable_variables} == expected
    decoder_variables = {"probe": 0, "fcn": 6, "aspp": 18}[head]
    encoder_variables = 0 if head == "probe" else len(encoder.trainable_variables)
    assert len(expected) == 2 + decoder_variables + encoder_variables


def _config(root, out, **overrides):
    values = dict(mode="segmentation", encoder="random", encoder_config=TINY,
                  train_files=str(root / "train.tfrecord"),
                  eval_files=str(root / "eval.tfrecord"), output_dir=str(out),
                  image_size=SIZE, crop_fraction=1.0, min_crop_area=0.5, batch_size=16,
                  eval_batch_size=64, epochs=6, learning_rate=0.05, verbose=0)
    values.update(overrides)
    return evaluation.EvaluationConfig(**values)


def test_fine_tuned_fcn_segments_far_better_than_all_background(records, tmp_path):
    root, eval_set = records
    results = evaluation.evaluate(_config(root, tmp_path, segmentation_head="fcn"))
    targets = eval_set.masks * (eval_set.labels + 1)[:, None, None]
    baseline = segmentation_scores(confusion_matrix(targets, np.zeros_like(targets), 9))
    # All background: IoU_bg = background share, 0 for the 8 object classes present.
    assert baseline["mean_iou"] == pytest.approx(np.mean(eval_set.masks == 0) / 9)
    # 96 steps reach about 0.35 (0.355 when written) against about 0.095.
    assert results["mean_iou"] > baseline["mean_iou"] + 0.15, (results, baseline)
    assert results["per_class_iou"][0] > 0.8  # the background, from the masks
    on_disk = json.loads((tmp_path / "results.json").read_text())
    assert on_disk["mean_iou"] == results["mean_iou"]
    assert np.sum(on_disk["confusion_matrix"]) == targets.size == on_disk["num_eval_pixels"]
    assert on_disk["mask_methods"] == {"train": {"ground_truth": 256},
                                       "original": {"ground_truth": 64}}
    assert on_disk["details"]["encoder_trainable"] is True


def test_probe_trains_the_head_only_and_scores_mixed_rand_too(records, tmp_path,
                                                               monkeypatch):
    root, _ = records
    captured = {}
    original = segmentation.fit_segmentation

    def fit_and_keep(model, *args, **kwargs):
        history = original(model, *args, **kwargs)
        captured.update(model=model, history=history)
        return history

    monkeypatch.setattr(segmentation, "fit_segmentation", fit_and_keep)
    reference = encoder_source.random_encoder(TINY, seed=0).encoder
    results = evaluation.evaluate(_config(
        root, tmp_path, epochs=1, batch_size=128, eval_background="both",
        extra_eval_files=(("again", str(root / "eval.tfrecord")),)))
    model = captured["model"]
    again = results["extra_eval"]["again"]  # the same probe, the same records
    assert again["mean_iou"] == results["mean_iou"] and again["num_eval"] == 64
    assert again["confusion_matrix"] == results["confusion_matrix"]
    assert "again" not in results["background"]
    assert results["details"]["encoder_trainable"] is False
    shifted = results["background"]  # the same probe on the mixed_rand eval records
    assert shifted["original"]["mean_iou"] == results["mean_iou"]
    assert shifted["gap_mean_iou"] == pytest.approx(
        results["mean_iou"] - shifted["mixed_rand"]["mean_iou"])
    assert results["mask_methods"]["mixed_rand"] == {"ground_truth": 64}
    assert not model.encoder.trainable_weights and model.trainable_weights
    for got, want in zip(model.encoder.variables, reference.variables):  # stats too
        np.testing.assert_array_equal(got.numpy(), want.numpy())


def test_records_without_masks_or_labels_end_the_binary_with_one_line(records, tmp_path):
    root, _ = records
    expected = {"no_masks": "--train_files: .*no_masks.tfrecord has records without a mask",
                "no_labels": "--train_files: .*no_labels.tfrecord has records without a "
                             "label"}
    runs = {split: subprocess.Popen(  # both at once: each is mostly TensorFlow's import
        [sys.executable, "-m", "harl_tf.finetune", "--mode=segmentation", "--encoder=random",
         f"--encoder_config={json.dumps(TINY)}", f"--train_files={root / split}.tfrecord",
         f"--eval_files={root / 'eval.tfrecord'}", f"--output_dir={tmp_path / split}"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=ENV)
        for split in expected}
    for split, process in runs.items():
        _, stderr = process.communicate(timeout=120)
        lines = [line for line in stderr.splitlines()
                 if line.strip() and not _TF_LOG.match(line)]
        assert process.returncode == 2 and len(lines) == 1, stderr
        assert re.match(f"finetune: error: {expected[split]}", lines[0]), lines[0]
