"""Input pipelines end to end on tiny TFRecord files written with the schema."""
import os

import numpy as np
import pytest
import tensorflow as tf

from harl_tf import distribute

from harl_tf.data import augment, pipeline, schema, synthetic

SHARDS, PER_SHARD, HEIGHT, WIDTH = 4, 6, 40, 56


def _write(path, images, masks, labels, ids, image_format):
    with tf.io.TFRecordWriter(path) as writer:
        for image, mask, label, example_id in zip(images, masks, labels, ids):
            encode = (tf.io.encode_jpeg if image_format == "jpeg" else tf.io.encode_png)
            writer.write(schema.serialize_example(
                image_bytes=encode(image).numpy(), image_format=image_format,
                height=image.shape[0], width=image.shape[1],
                mask_png=schema.encode_mask_png(mask), label=int(label),
                example_id=example_id, mask_method="ground_truth"))


@pytest.fixture(scope="module")
def jpeg_records(tmp_path_factory):
    """4 JPEG shards of 6 examples; every example of shard k has label k, so the labels
    of a batch say which files it came from."""
    directory = tmp_path_factory.mktemp("jpeg")
    data = synthetic.generate(SHARDS * PER_SHARD, (HEIGHT, WIDTH), seed=0)
    for shard in range(SHARDS):
        part = slice(shard * PER_SHARD, (shard + 1) * PER_SHARD)
        _write(str(directory / f"train-{shard:05d}.tfrecord"), data.images[part],
               data.masks[part], [shard] * PER_SHARD,
               [f"s{shard}/{i}" for i in range(PER_SHARD)], "jpeg")
    return str(directory / "train-*.tfrecord")


@pytest.fixture(scope="module")
def red_png_records(tmp_path_factory):
    """Lossless PNG records whose red channel is 255 exactly on the mask."""
    directory = tmp_path_factory.mktemp("png")
    data = synthetic.generate(8, (HEIGHT, WIDTH), seed=1)
    images = data.images.copy()
    images[..., 0] = 255 * data.masks
    for shard in range(2):
        part = slice(shard * 4, (shard + 1) * 4)
        _write(str(directory / f"red-{shard}.tfrecord"), images[part], data.masks[part],
               data.labels[part], [f"red/{shard}/{i}" for i in range(4)], "png")
    return str(directory / "red-*.tfrecord")


def _take(dataset, count):
    return [{k: v.numpy() for k, v in batch.items()} for batch in dataset.take(count)]


def test_batches_have_the_contract_shapes_dtypes_and_ranges(jpeg_records):
    dataset = pipeline.pretrain_dataset(jpeg_records, 4, 32, seed=0, shuffle_buffer=8)
    spec = dataset.element_spec
    assert spec["view1"].shape.as_list() == [4, 32, 32, 3]
    assert spec["mask2"].shape.as_list() == [4, 32, 32, 1]
    assert spec["label"].dtype == tf.int64
    # 24 records, batches of 4: eight batches cross an epoch boundary (repeat).
    for batch in _take(dataset, 8):
        for key in ("view1", "view2"):
            assert batch[key].dtype == np.float32
            assert batch[key].min() >= 0.0 and batch[key].max() <= 1.0
        for key in ("mask1", "mask2"):
            assert batch[key].dtype == np.float32
            assert set(np.unique(batch[key])) <= {0.0, 1.0}
        assert set(batch["label"]) <= set(range(SHARDS))
        assert np.abs(batch["view1"] - batch["view2"]).mean() > 0.02  # two different views


def test_deterministic_mode_is_reproducible_and_fused_crop_uses_the_same_window(
        jpeg_records):
    def run(fused_crop):
        return _take(pipeline.pretrain_dataset(
            jpeg_records, 4, 16, seed=5, deterministic=True, shuffle_buffer=8,
            fused_crop=fused_crop), 7)  # 28 examples: crosses the epoch boundary
    first, second, full = run(True), run(True), run(False)
    for a, b in zip(first, second):
        for key in a:
            np.testing.assert_array_equal(a[key], b[key])
    for a, b in zip(first, full):
        np.testing.assert_array_equal(a["label"], b["label"])
        np.testing.assert_array_equal(a["mask1"], b["mask1"])
        np.testing.assert_array_equal(a["mask2"], b["mask2"])
        # libjpeg's cropped decode upsamples chroma at the window's edge slightly
        # differently; otherwise the pixels are the same.
        assert np.abs(a["view1"] - b["view1"]).mean() < 0.01


def test_masks_stay_on_their_content_and_colour_never_touches_them(red_png_records):
    # Red channel = mask. Geometry only: the mask marks the red pixels after crop, flip
    # and resize. Full views with the same seed: the same masks, different images.
    geometry = tuple(c.geometry_only() for c in augment.default_view_configs())
    kwargs = dict(seed=2, deterministic=True, shuffle_buffer=8)
    geo = _take(pipeline.pretrain_dataset(red_png_records, 4, 32, view_configs=geometry,
                                          **kwargs), 4)
    for batch in geo:
        for view, mask in (("view1", "mask1"), ("view2", "mask2")):
            agreement = (batch[mask][..., 0] == (batch[view][..., 0] > 0.5)).mean()
            assert agreement >= 0.99
    full = _take(pipeline.pretrain_dataset(red_png_records, 4, 32, **kwargs), 4)
    for a, b in zip(full, geo):
        np.testing.assert_array_equal(a["mask1"], b["mask1"])
        np.testing.assert_array_equal(a["mask2"], b["mask2"])
        assert np.abs(a["view1"] - b["view1"]).mean() > 0.01


def _context(pipeline_id, count=2):
    return tf.distribute.InputContext(num_input_pipelines=count,
                                      input_pipeline_id=pipeline_id,
                                      num_replicas_in_sync=count)


def test_two_workers_read_disjoint_files(jpeg_records):
    seen = []
    for worker in range(2):
        files = pipeline.list_files(jpeg_records, _context(worker))
        batches = _take(pipeline.pretrain_dataset(
            jpeg_records, 3, 16, input_context=_context(worker), seed=0,
            shuffle_buffer=4), 8)  # 24 examples = two passes over the worker's 12
        labels = set(np.concatenate([b["label"] for b in batches]).tolist())
        assert labels == {int(os.path.basename(f)[6:11]) for f in files}
        seen.append(labels)
    assert seen[0] == {0, 2} and seen[1] == {1, 3}


def test_no_matching_file_is_a_clear_error(tmp_path):
    pattern = str(tmp_path / "nothing-*.tfrecord")
    with pytest.raises(FileNotFoundError, match="nothing-"):
        pipeline.pretrain_dataset(pattern, 2, 16)
    with pytest.raises(FileNotFoundError, match="nothing-"):
        pipeline.eval_dataset(pattern, 2, 16)


def test_fewer_files_than_workers_is_a_clear_error(jpeg_records):
    with pytest.raises(ValueError, match=r"4 file\(s\).*8 input pipelines"):
        pipeline.pretrain_dataset(jpeg_records, 2, 16, input_context=_context(0, 8))


def test_deterministic_without_seed_is_refused(jpeg_records):
    with pytest.raises(ValueError, match="seed"):
        pipeline.pretrain_dataset(jpeg_records, 2, 16, deterministic=True)


def test_eval_keeps_file_and_record_order_in_one_pass(jpeg_records):
    batches = _take(pipeline.eval_dataset(jpeg_records, 5, 24), 100)
    ids = [i.decode() for b in batches for i in b["id"]]
    assert ids == [f"s{s}/{i}" for s in range(SHARDS) for i in range(PER_SHARD)]
    assert [len(b["id"]) for b in batches] == [5, 5, 5, 5, 4]  # keeps the remainder
    assert all(b["image"].shape[1:] == (24, 24, 3) for b in batches)
    labels = np.concatenate([b["label"] for b in batches])
    np.testing.assert_array_equal(labels, np.repeat(np.arange(SHARDS), PER_SHARD))


def test_eval_centre_crop_matches_numpy(tmp_path):
    # 40x60 PNG, crop_fraction 0.5: central 20x20 square at rows 10..29, cols 20..39;
    # resized to 20 px, which is the identity.
    image = np.random.default_rng(0).integers(0, 256, (40, 60, 3), dtype=np.uint8)
    path = str(tmp_path / "eval.tfrecord")
    _write(path, [image], [np.zeros((40, 60), np.uint8)], [3], ["one"], "png")
    (batch,) = _take(pipeline.eval_dataset(path, 1, 20, crop_fraction=0.5), 1)
    np.testing.assert_allclose(batch["image"][0], image[10:30, 20:40] / 255.0, atol=1e-6)
    assert batch["label"][0] == 3


def test_eval_shards_records_between_workers(jpeg_records):
    ids = []
    for worker in range(2):
        batches = _take(pipeline.eval_dataset(jpeg_records, 8, 16,
                                              input_context=_context(worker)), 100)
        ids.append([i.decode() for b in batches for i in b["id"]])
    assert not set(ids[0]) & set(ids[1])
    assert len(ids[0]) + len(ids[1]) == SHARDS * PER_SHARD


def test_classifier_training_batches(jpeg_records):
    dataset = pipeline.train_classifier_dataset(jpeg_records, 4, 24, seed=0,
                                                shuffle_buffer=8)
    assert set(dataset.element_spec) == {"image", "label"}
    for batch in _take(dataset, 3):
        assert batch["image"].shape == (4, 24, 24, 3)
        assert batch["image"].min() >= 0.0 and batch["image"].max() <= 1.0


def test_distributed_dataset_gives_each_replica_its_share(jpeg_records):
    strategy = distribute.make_strategy("mirrored", devices=["/cpu:0", "/cpu:1"])
    dataset = pipeline.distributed_pretrain_dataset(strategy, jpeg_records, 4, 16, seed=0,
                                                    shuffle_buffer=4)
    batch = next(iter(dataset))
    shards = strategy.experimental_local_results(batch["view1"])
    assert len(shards) == 2 and all(s.shape == (2, 16, 16, 3) for s in shards)
    with pytest.raises(ValueError, match="divisible"):
        pipeline.distributed_pretrain_dataset(strategy, jpeg_records, 3, 16)


def test_eval_fused_and_full_decode_agree(jpeg_records):
    fused = _take(pipeline.eval_dataset(jpeg_records, 8, 24, fused_crop=True), 100)
    full = _take(pipeline.eval_dataset(jpeg_records, 8, 24, fused_crop=False), 100)
    for a, b in zip(fused, full):
        np.testing.assert_array_equal(a["id"], b["id"])
        assert np.abs(a["image"] - b["image"]).mean() < 0.01


def test_a_resumed_stream_continues_the_uninterrupted_one(jpeg_records):
    """start_example = k gives exactly the uninterrupted stream from record k on, views
    included, in the epoch of k and after it; every epoch is one whole pass."""
    def stream(start, batches):
        return _take(pipeline.pretrain_dataset(
            jpeg_records, 4, 16, seed=3, deterministic=True, shuffle_buffer=8,
            start_example=start), batches)
    whole = stream(0, 15)                          # 60 records: epochs 0, 1 and half of 2
    epoch_labels = np.concatenate([b["label"] for b in whole])[:48].reshape(2, 24)
    for labels in epoch_labels:                    # each shard's 6 records once per epoch
        assert np.bincount(labels, minlength=SHARDS).tolist() == [PER_SHARD] * SHARDS
    assert not np.array_equal(epoch_labels[0], epoch_labels[1])   # a new order each epoch
    for first_batch in (3, 7, 12):                 # mid epoch 0, mid epoch 1, epoch 2
        resumed = stream(4 * first_batch, 15 - first_batch)
        assert len(resumed) == 15 - first_batch
        for a, b in zip(whole[first_batch:], resumed):
            for key in a:
                np.testing.assert_array_equal(a[key], b[key], err_msg=(first_batch, key))


def test_a_resumed_distributed_stream_continues_per_step(jpeg_records):
    """Two replicas: start_step = s skips s global batches of the one input pipeline."""
    strategy = distribute.make_strategy("mirrored", devices=["/cpu:0", "/cpu:1"])

    def steps(start_step, count):
        dataset = pipeline.distributed_pretrain_dataset(
            strategy, jpeg_records, 4, 16, seed=1, deterministic=True, shuffle_buffer=8,
            start_step=start_step)
        iterator = iter(dataset)
        return [np.concatenate([s.numpy() for s in strategy.experimental_local_results(
            next(iterator)["view1"])]) for _ in range(count)]
    whole, resumed = steps(0, 9), steps(5, 4)      # step 5 starts at record 20 of 24
    for a, b in zip(whole[5:], resumed):
        np.testing.assert_array_equal(a, b)


def test_records_are_counted_from_the_manifest_or_by_reading(jpeg_records, tmp_path):
    from harl_tf.data.builder import build_dataset
    from harl_tf.data.sources import SyntheticSource
    assert pipeline.count_records(pipeline.list_files(jpeg_records)) == SHARDS * PER_SHARD
    build_dataset(SyntheticSource(21, image_size=16), str(tmp_path), splits=["train"],
                  min_shards=3, progress=False)
    files = pipeline.list_files(str(tmp_path / "train-*.tfrecord"))
    read = sum(1 for f in files for _ in tf.data.TFRecordDataset(f))
    assert len(files) == 3 and read == 21
    assert pipeline.count_records(files) == 21
    os.remove(tmp_path / "manifest.json")
    assert pipeline.count_records(files) == 21
    with pytest.raises(ValueError, match="start must be >= 0"):
        pipeline.pretrain_dataset(jpeg_records, 4, 16, seed=0, start_example=-1)
