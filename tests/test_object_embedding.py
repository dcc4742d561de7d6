"""The object embedding as an evaluation option (``finetune --embedding``): the feature map
pooled over the records' masks is exactly HARL's pooling of it, k-NN / linear / fine-tuning
read it, and records without masks are one clear error. (The export's masked signature is
tested with the other signatures in test_export.py.)"""
import os

import numpy as np
import pytest
import tensorflow as tf

from _export_helpers import write_records
from harl_tf.data import pipeline, schema
from harl_tf.downstream import encoder_source, evaluation, knn, linear, subsets

# 32 px, small stem, output stride 32: a 4 x 4 feature map of 8 x 8 pixel cells.
ENCODER = {"depth": 18, "width_multiplier": 0.25, "small_stem": True, "output_stride": 32}
SIZE = 32


def numpy_pool(feature_map, masks, region):
    """Plain numpy SPEC section 4: m = the mask's block mean over each feature cell,
    fg = Σ h·m / (Σ m + 1e-6), bg = Σ h·(1 − m) / (Σ (1 − m) + 1e-6)."""
    b, h, w, _ = feature_map.shape
    m = masks.reshape(b, h, SIZE // h, w, SIZE // w).mean(axis=(2, 4))[..., None]
    m = m.astype(np.float64) if region == "foreground" else 1.0 - m.astype(np.float64)
    return (feature_map * m).sum(axis=(1, 2)) / (m.sum(axis=(1, 2)) + 1e-6)


@pytest.fixture(scope="module")
def records(tmp_path_factory):
    root = tmp_path_factory.mktemp("records")
    train = write_records(root / "train.tfrecord", 32, image_size=SIZE, seed=0)
    evaluation_set = write_records(root / "eval.tfrecord", 16, image_size=SIZE, seed=1)
    return root, train, evaluation_set


def random_encoder(seed=0):
    return encoder_source.load_encoder("random", encoder_config=ENCODER, seed=seed).encoder


def eval_batches(path, batch_size=16):
    return pipeline.eval_dataset(str(path), batch_size, SIZE, crop_fraction=1.0,
                                 with_mask=True)


def numpy_features(encoder, path, region):
    """Region features of every record of ``path`` computed outside the library: the
    encoder's feature map, pooled in numpy over the records' exact masks."""
    features = []
    for batch in eval_batches(path):
        feature_map = encoder(batch["image"], training=False).numpy().astype(np.float64)
        features.append(numpy_pool(feature_map, batch["mask"].numpy(), region))
    return np.concatenate(features)


def test_pooled_evaluation_features_equal_a_numpy_pooling(records):
    root, _, evaluation_set = records
    # The evaluation batches carry the records' masks, aligned with their images.
    batch = next(iter(eval_batches(root / "eval.tfrecord")))
    np.testing.assert_array_equal(batch["mask"].numpy()[..., 0], evaluation_set.masks)
    encoder = random_encoder()
    pooled = {}
    for region in ("global", "foreground", "background"):
        got = linear.extract_features(encoder, eval_batches(root / "eval.tfrecord"),
                                      embedding=region)
        pooled[region] = got.features
        if region == "global":
            assert got.region_fractions is None
            continue
        want = numpy_features(encoder, root / "eval.tfrecord", region)
        np.testing.assert_allclose(got.features, want, rtol=1e-4, atol=1e-6)
        fraction = evaluation_set.masks.mean(axis=(1, 2))
        np.testing.assert_allclose(got.region_fractions,
                                   fraction if region == "foreground" else 1 - fraction,
                                   atol=1e-6)
    # The three embeddings are different vectors (by far more than the tolerance).
    scale = np.abs(pooled["global"]).max()
    assert np.abs(pooled["foreground"] - pooled["global"]).max() > 0.05 * scale
    assert np.abs(pooled["foreground"] - pooled["background"]).max() > 0.05 * scale


def test_knn_on_the_foreground_embedding_is_knn_on_numpy_pooled_features(records, tmp_path):
    root = records[0]
    config = evaluation.EvaluationConfig(
        mode="knn", embedding="foreground", encoder="random", encoder_config=ENCODER,
        train_files=str(root / "train.tfrecord"), eval_files=str(root / "eval.tfrecord"),
        output_dir=str(tmp_path / "knn"), image_size=SIZE, crop_fraction=1.0, knn_k=3,
        eval_batch_size=16, seed=0, verbose=0)
    results = evaluation.evaluate(config)
    encoder = random_encoder(seed=0)  # the same weights as evaluate's (same seed)
    train = numpy_features(encoder, root / "train.tfrecord", "foreground")
    queries = numpy_features(encoder, root / "eval.tfrecord", "foreground")
    labels = {name: np.array([int(r["label"]) for r in schema.read_examples(
        str(root / f"{name}.tfrecord"))]) for name in ("train", "eval")}
    want = knn.knn_evaluate(train, labels["train"], queries, labels["eval"], 8, k=3)
    assert (results["top1"], results["top5"]) == (want["top1"], want["top5"])
    assert results["embedding"] == {
        "name": "foreground",
        "mask_methods": {"train": {"ground_truth": 32}, "eval_original": {"ground_truth": 16}},
        "empty_regions": {"train": 0, "eval_original": 0}}


def test_finetune_reads_the_foreground_and_trains_the_encoder_through_it(records, tmp_path):
    root = records[0]
    batch = next(iter(pipeline.train_classifier_dataset(
        str(root / "train.tfrecord"), 8, SIZE, seed=0, with_mask=True)))
    masks = batch["mask"].numpy()
    assert masks.shape == (8, SIZE, SIZE, 1) and set(np.unique(masks)) == {0.0, 1.0}
    model = linear.Classifier(random_encoder(), 8, freeze_encoder=False,
                              embedding="foreground")
    model.build()
    rng = np.random.default_rng(0)
    model.head.kernel.assign(rng.normal(size=model.head.kernel.shape).astype(np.float32))
    inputs = model.inputs_of(batch)
    logits = model(inputs, training=False).numpy()
    feature_map = model.encoder(batch["image"], training=False).numpy().astype(np.float64)
    want = numpy_pool(feature_map, masks, "foreground") @ model.head.kernel.numpy()
    np.testing.assert_allclose(logits, want + model.head.bias.numpy(), rtol=1e-4, atol=1e-5)
    # Another mask, the same images: other logits; the gradient reaches the encoder.
    other = model((batch["image"], 1.0 - batch["mask"]), training=False).numpy()
    assert np.abs(other - logits).max() > 1e-2 * np.abs(logits).max()
    with tf.GradientTape() as tape:
        loss = tf.reduce_mean(tf.nn.sparse_softmax_cross_entropy_with_logits(
            batch["label"], model(inputs, training=True)))
    grads = tape.gradient(loss, model.encoder.trainable_variables)
    assert all(g is not None for g in grads) and sum(float(tf.norm(g)) for g in grads) > 0

    results = evaluation.evaluate(evaluation.EvaluationConfig(
        mode="finetune", embedding="foreground", encoder="random", encoder_config=ENCODER,
        train_files=str(root / "train.tfrecord"), eval_files=str(root / "eval.tfrecord"),
        output_dir=str(tmp_path / "ft"), image_size=SIZE, batch_size=8, eval_batch_size=16,
        epochs=1, verbose=0))
    assert results["num_train"] == 32 and results["num_eval"] == 16
    assert results["embedding"]["name"] == "foreground"
    assert os.path.exists(tmp_path / "ft" / "classifier.weights.h5")


def test_records_without_masks_are_one_clear_error(records, tmp_path):
    root = records[0]
    with tf.io.TFRecordWriter(str(tmp_path / "nomask.tfrecord")) as writer:
        image = np.zeros((SIZE, SIZE, 3), np.uint8)
        for i in range(4):
            writer.write(schema.serialize_example(
                image_bytes=tf.io.encode_png(image).numpy(), image_format="png",
                height=SIZE, width=SIZE, mask_png=b"", label=i % 2, example_id=f"nm/{i}"))
    config = evaluation.EvaluationConfig(
        mode="linear", embedding="background", encoder="random", encoder_config=ENCODER,
        train_files=str(root / "train.tfrecord"), eval_files=str(tmp_path / "nomask.tfrecord"),
        output_dir=str(tmp_path / "out"), image_size=SIZE, verbose=0)
    with pytest.raises(subsets.MissingMasksError) as e:
        evaluation.evaluate(config)
    message = str(e.value)
    assert "\n" not in message and "--embedding=background" in message
    assert "--eval_files" in message and "nomask.tfrecord" in message and "'nm/0'" in message
