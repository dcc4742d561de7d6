"""Background reliance (mixed_rand, Xiao et al. 2021): each object keeps its exact pixels
on the filled background of an image of another class, no pixel of the donor's own object
survives, the shift is deterministic, the records keep their schema, ids, labels and
masks, and harl_tf.finetune reports both top-1s and their gap."""
import json
import os
import subprocess
import sys

import numpy as np
import pytest
import tensorflow as tf
from scipy import ndimage

from _export_helpers import write_records
from harl_tf.data import background_shift, schema, synthetic
from harl_tf import eval_config
from harl_tf.downstream import evaluation

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ENV = dict(os.environ, PYTHONPATH=ROOT, TF_CPP_MIN_LOG_LEVEL="3", CUDA_VISIBLE_DEVICES="")


@pytest.fixture(scope="module")
def scenes():
    return synthetic.generate(40, image_size=48, seed=3)


def dilated(mask, pixels):
    """The mask grown by ``pixels`` in the 8-neighbourhood (a 3x3 square per step)."""
    return ndimage.binary_dilation(mask.astype(bool), np.ones((3, 3), bool),
                                   iterations=pixels)


def test_object_pixels_are_exact_and_the_background_is_another_classes(scenes):
    shifted, donors = background_shift.mixed_rand(scenes.images, scenes.masks,
                                                  scenes.labels, seed=0)
    assert np.all(scenes.labels[donors] != scenes.labels)
    for i, donor in enumerate(donors):
        obj = scenes.masks[i].astype(bool)
        assert np.array_equal(shifted[i][obj], scenes.images[i][obj])
        # Outside the object and away from the donor's filled hole: the donor's pixels.
        untouched = ~obj & ~dilated(scenes.masks[donor], 1)
        assert untouched.sum() > 100
        assert np.array_equal(shifted[i][untouched], scenes.images[donor][untouched])


def test_no_pixel_of_the_donors_object_survives(scenes):
    """Each filled pixel lies within the per-channel colour range of the donor's
    background pixels around its hole; and a pure red object on a background without red
    leaves no red at all."""
    for image, mask in zip(scenes.images[:10], scenes.masks[:10]):
        filled = background_shift.fill_background(image, mask)
        hole = dilated(mask, 1)
        ring = dilated(mask, 1 + background_shift.INPAINT_RADIUS + 1) & ~hole
        low, high = image[ring].min(axis=0), image[ring].max(axis=0)
        assert np.all((filled[hole] >= low) & (filled[hole] <= high))
        assert np.array_equal(filled[~hole], image[~hole])

    y, x = np.mgrid[:40, :40]
    image = np.stack([np.full((40, 40), 10), 4 * y + 20, 4 * x + 20], -1).astype(np.uint8)
    mask = ((y - 20) ** 2 + (x - 18) ** 2 < 81).astype(np.uint8)
    image[mask == 1] = (255, 0, 0)
    filled = background_shift.fill_background(image, mask)
    assert filled[..., 0].max() == 10
    assert np.all(filled[..., 1][mask == 1] >= 20) and np.all(filled[..., 2][mask == 1] >= 20)


def test_mixed_rand_is_deterministic_by_seed(scenes):
    first, donors = background_shift.mixed_rand(scenes.images, scenes.masks, scenes.labels, 7)
    again, same = background_shift.mixed_rand(scenes.images, scenes.masks, scenes.labels, 7)
    _, other = background_shift.mixed_rand(scenes.images, scenes.masks, scenes.labels, 8)
    assert np.array_equal(donors, same)
    assert all(np.array_equal(a, b) for a, b in zip(first, again))
    assert not np.array_equal(donors, other)


def test_donors_are_uniform_over_the_other_classes():
    labels = np.repeat([0, 1, 2], [1000, 2000, 3000])
    donors = background_shift.choose_donors(labels, seed=0)
    assert np.all(labels[donors] != labels)
    from_class_0 = np.bincount(labels[donors][labels == 0], minlength=3) / 1000
    np.testing.assert_allclose(from_class_0, [0, 0.4, 0.6], atol=0.05)  # 2000 : 3000
    assert len(np.unique(donors)) > 0.55 * len(labels)  # spread, not one donor for all
    with pytest.raises(ValueError, match="two classes"):
        background_shift.choose_donors([1, 1, 1], seed=0)


def test_a_donor_of_another_size_is_resized_to_the_object_image():
    small = synthetic.generate(2, image_size=(24, 32), seed=0)
    large = synthetic.generate(2, image_size=(48, 40), seed=5)
    images = [small.images[0], large.images[0]]
    masks = [small.masks[0], large.masks[0]]
    labels = [0, 1]
    shifted, donors = background_shift.mixed_rand(images, masks, labels, seed=0)
    assert donors.tolist() == [1, 0]
    assert shifted[0].shape == (24, 32, 3) and shifted[1].shape == (48, 40, 3)
    for i in range(2):
        obj = masks[i].astype(bool)
        assert np.array_equal(shifted[i][obj], images[i][obj])


def test_an_empty_mask_is_an_error_naming_the_record(scenes):
    masks = scenes.masks.copy()
    masks[3] = 0
    ids = [f"img{i}" for i in range(len(masks))]
    with pytest.raises(background_shift.EmptyMaskError,
                       match="record 'img3' has an empty mask"):
        background_shift.mixed_rand(scenes.images, masks, scenes.labels, 0, ids=ids)


def test_shift_records_keeps_schema_ids_labels_masks_and_object_pixels(tmp_path):
    data = write_records(tmp_path / "test-a.tfrecord", 12, seed=0)
    write_records(tmp_path / "test-b.tfrecord", 6, seed=1)
    summary = background_shift.shift_records(str(tmp_path / "test-*"), str(tmp_path / "out"),
                                             seed=0)
    assert summary["num_records"] == 18 and summary["records_per_output"] == [12, 6]
    assert sorted(os.listdir(tmp_path / "out")) == [
        background_shift.SUMMARY_NAME, "test-a.tfrecord", "test-b.tfrecord"]
    before = list(schema.read_examples(str(tmp_path / "test-a.tfrecord")))
    after = list(schema.read_examples(str(tmp_path / "out" / "test-a.tfrecord")))
    for old, new in zip(before, after):
        assert (new["id"], new["label"], new["mask_method"]) == (
            old["id"], old["label"], old["mask_method"])
        assert np.array_equal(new["mask_array"], old["mask_array"])
        obj = old["mask_array"].astype(bool)
        assert np.array_equal(new["image_array"][obj], old["image_array"][obj])
        assert not np.array_equal(new["image_array"], old["image_array"])
        assert new["image_format"] == "png"
    donor_labels = {r["id"]: r["label"] for r in before}
    donor_labels.update({r["id"]: r["label"] for r in
                         schema.read_examples(str(tmp_path / "test-b.tfrecord"))})
    assert all(donor_labels[d] != donor_labels[i] for i, d in summary["donor_of"].items())
    assert data.labels.tolist() == [r["label"] for r in after]


def test_the_tool_names_an_empty_mask_or_skips_it(tmp_path):
    data = synthetic.generate(6, image_size=32, seed=0)
    with tf.io.TFRecordWriter(str(tmp_path / "in.tfrecord")) as writer:
        for i in range(6):
            mask = data.masks[i] if i != 2 else np.zeros_like(data.masks[i])
            writer.write(schema.serialize_example(
                image_bytes=tf.io.encode_png(data.images[i]).numpy(), image_format="png",
                height=32, width=32, mask_png=schema.encode_mask_png(mask),
                label=int(data.labels[i]), example_id=f"photo_{i}",
                mask_method="ground_truth"))
    command = [sys.executable, "-m", "tools.shift_backgrounds",
               f"--input_files={tmp_path / 'in.tfrecord'}", f"--output_dir={tmp_path / 'out'}"]
    failed = subprocess.run(command, capture_output=True, text=True, env=ENV, cwd=ROOT,
                            timeout=120)
    assert failed.returncode == 2
    assert failed.stderr.strip().splitlines()[-1:] == [
        "shift_backgrounds: error: record 'photo_2' has an empty mask: there is no object to "
        "paste onto another background. Skip such records (tools.shift_backgrounds "
        "--skip_empty_masks) or give them masks."]
    assert not os.path.exists(tmp_path / "out" / "in.tfrecord")
    # --skip_empty_masks is this library argument (in-process: no second TF start-up).
    summary = background_shift.shift_records(str(tmp_path / "in.tfrecord"),
                                             str(tmp_path / "out"), skip_empty_masks=True)
    with open(tmp_path / "out" / background_shift.SUMMARY_NAME) as f:
        assert json.load(f) == summary
    assert summary["num_records"] == 5 and summary["skipped_ids"] == ["photo_2"]
    ids = [r["id"] for r in schema.read_examples(str(tmp_path / "out" / "in.tfrecord"),
                                                 decode=False)]
    assert ids == ["photo_0", "photo_1", "photo_3", "photo_4", "photo_5"]


@pytest.mark.parametrize("mode", ["knn", "linear"])
def test_finetune_reports_original_mixed_rand_and_their_gap(tmp_path, mode):
    """Backgrounds painted in their class's colour, objects in random colours: a
    classifier on a random encoder's pooled features reads the label off the background,
    so it is right on the original images and wrong on mixed_rand (where the background
    belongs to another class), a gap of at least 0.5."""
    rng = np.random.default_rng(0)
    for name, count, seed in (("train", 64, 0), ("eval", 32, 1)):
        data = synthetic.generate(count, image_size=32, seed=seed)
        with tf.io.TFRecordWriter(str(tmp_path / f"{name}.tfrecord")) as writer:
            for i in range(count):
                colour = 255 * synthetic.CLASS_COLOURS[data.labels[i]]
                background = colour + rng.normal(0, 8, (32, 32, 3))
                image = np.where(data.masks[i][..., None] == 1, data.images[i],
                                 np.clip(background, 0, 255)).astype(np.uint8)
                writer.write(schema.serialize_example(
                    image_bytes=tf.io.encode_png(image).numpy(), image_format="png",
                    height=32, width=32, mask_png=schema.encode_mask_png(data.masks[i]),
                    label=int(data.labels[i]), example_id=f"{name}/{i}",
                    mask_method="ground_truth"))
    config = evaluation.EvaluationConfig(
        mode=mode, encoder="random",
        encoder_config={"depth": 18, "width_multiplier": 0.25, "small_stem": True},
        train_files=str(tmp_path / "train.tfrecord"),
        eval_files=str(tmp_path / "eval.tfrecord"), output_dir=str(tmp_path / "out"),
        image_size=32, crop_fraction=1.0, batch_size=16,
        eval_batch_size=16, epochs=10, knn_k=5, verbose=0, eval_background="both")
    results = evaluation.evaluate(config)
    with open(tmp_path / "out" / "results.json") as f:
        written = json.load(f)["background"]
    assert written == results["background"]
    original, shifted = written["original"]["top1"], written["mixed_rand"]["top1"]
    assert results["top1"] == original and results["num_eval"] == 32
    assert written["gap_top1"] == pytest.approx(original - shifted)
    assert original >= 0.8 and shifted <= 0.3 and written["gap_top1"] >= 0.5
    assert os.path.exists(tmp_path / "out" / eval_config.SHIFTED_EVAL_DIR / "eval.tfrecord")
