"""Downstream evaluation: the linear probe and k-NN classify what is linearly / locally
separable, label subsets are deterministic, balanced and disjoint from evaluation, and an
encoder loads with identical weights from an export and from its checkpoint."""
import json
import os
import subprocess
import sys

import numpy as np
import pytest

from _export_helpers import make_model_dir, write_records
from harl_tf import saved_encoder
from harl_tf.downstream import encoder_source, evaluation, knn, linear, subsets

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ENV = dict(os.environ, PYTHONPATH=ROOT, TF_CPP_MIN_LOG_LEVEL="3", CUDA_VISIBLE_DEVICES="")


def separable_features(num_per_class, num_classes=4, dim=16, seed=0):
    """Gaussian clusters (noise 0.3 per dimension) around orthonormal class means scaled
    by 3 (the same means for every seed), so the classes are linearly separable."""
    means = 3.0 * np.linalg.qr(np.random.default_rng(100).normal(size=(dim, dim)))[0][:num_classes]
    rng = np.random.default_rng(seed)
    labels = np.repeat(np.arange(num_classes), num_per_class)
    features = means[labels] + 0.3 * rng.normal(size=(len(labels), dim))
    return features.astype(np.float32), labels.astype(np.int64)


def test_topk_accuracy_counts_ranks():
    scores = np.array([[0.1, 0.7, 0.2], [0.5, 0.3, 0.2], [0.2, 0.3, 0.5]])
    labels = np.array([1, 2, 0])  # ranks 0, 2, 2
    assert linear.topk_accuracy(scores, labels, ks=(1, 2, 3)) == {
        "top1": 1 / 3, "top2": 1 / 3, "top3": 1.0}


def test_linear_probe_separates_linearly_separable_features():
    x_train, y_train = separable_features(50, seed=0)
    x_test, y_test = separable_features(50, seed=1)
    chance = linear.topk_accuracy(np.zeros((len(y_test), 4)) + np.arange(4), y_test)["top1"]
    model = linear.train_linear_on_features(
        linear.Features(x_train, y_train, np.arange(len(y_train))), num_classes=4,
        epochs=20, batch_size=32, learning_rate=0.1)
    accuracy = linear.topk_accuracy(model.predict(x_test, verbose=0), y_test)
    assert accuracy["top1"] >= 0.95 and chance == 0.25


def test_standardised_probe_is_invariant_to_feature_scale_and_offset():
    """Encoders differ in feature scale by orders of magnitude; the probe standardises
    with the train statistics, so x and 1000·x + 50 give the same classifier, while the
    unstandardised probe at the same learning rate fails on the rescaled features."""
    x_train, y_train = separable_features(50, seed=0)
    x_test, y_test = separable_features(50, seed=1)
    scores = {}
    for name, scale, offset, standardize in (("plain", 1.0, 0.0, True),
                                              ("scaled", 1000.0, 50.0, True),
                                              ("scaled_raw", 1000.0, 50.0, False)):
        model = linear.train_linear_on_features(
            linear.Features(scale * x_train + offset, y_train, np.arange(len(y_train))),
            num_classes=4, epochs=10, batch_size=32, learning_rate=0.1,
            standardize=standardize)
        scores[name] = model.predict(scale * x_test + offset, verbose=0)
    top1 = {k: linear.topk_accuracy(v, y_test)["top1"] for k, v in scores.items()}
    assert top1["plain"] >= 0.95
    np.testing.assert_allclose(scores["scaled"], scores["plain"], rtol=1e-3, atol=1e-3)
    assert np.max(np.abs(scores["scaled_raw"] - scores["plain"])) > 1.0


def test_feature_statistics_floor_the_variance_of_constant_channels():
    features = np.stack([np.arange(6.0), np.full(6, 7.0)], axis=1)
    mean, variance = linear.feature_statistics(features)
    np.testing.assert_allclose(mean, [2.5, 7.0])
    np.testing.assert_allclose(variance, [np.var(np.arange(6.0)), 1e-12], rtol=1e-6)


def test_knn_classifies_clusters_and_weights_votes_by_similarity():
    x_train, y_train = separable_features(30, seed=2)
    x_test, y_test = separable_features(30, seed=3)
    assert knn.knn_evaluate(x_train, y_train, x_test, y_test, 4, k=5)["top1"] >= 0.95

    # One close neighbour of class 1 against two farther ones of class 0.
    train = np.array([[1.0, 0.0], [0.6, 0.8], [0.6, -0.8]])  # cos to query: 1.0, 0.6, 0.6
    labels = np.array([1, 0, 0])
    query = np.array([[1.0, 0.0]])
    sharp = knn.knn_scores(train, labels, query, 2, k=3, temperature=0.07)
    flat = knn.knn_scores(train, labels, query, 2, k=3, temperature=100.0)
    assert sharp.argmax() == 1  # exp(1/0.07) >> 2 exp(0.6/0.07)
    assert flat.argmax() == 0  # almost one vote each: majority wins
    np.testing.assert_allclose(sharp[0, 0] / sharp[0, 1], 2 * np.exp((0.6 - 1.0) / 0.07),
                               rtol=1e-6)


def test_label_subset_is_deterministic_balanced_and_disjoint():
    rng = np.random.default_rng(0)
    ids = np.array([f"img{i:04d}" for i in range(800)], dtype=object)
    labels = np.repeat(np.arange(8), 100)
    held_out = set(rng.choice(ids, 200, replace=False))  # ids also in the eval split
    chosen = subsets.label_subset(ids, labels, 0.1, exclude_ids=held_out, seed=0)
    counts = np.bincount(labels[[int(i[3:]) for i in chosen]], minlength=8)
    assert counts.tolist() == [10] * 8
    assert not set(chosen) & held_out
    order = rng.permutation(800)  # reading the files in another order changes nothing
    assert subsets.label_subset(ids[order], labels[order], 0.1, exclude_ids=held_out) == chosen
    assert subsets.label_subset(ids, labels, 0.1, exclude_ids=held_out, seed=1) != chosen
    smaller = subsets.label_subset(ids, labels, 0.05, exclude_ids=held_out)
    assert set(smaller) < set(chosen) and len(smaller) == 40
    with pytest.raises(ValueError, match="label_fraction"):
        subsets.label_subset(ids, labels, 0.0)


@pytest.fixture(scope="module")
def records(tmp_path_factory):
    root = tmp_path_factory.mktemp("records")
    write_records(root / "train.tfrecord", 32, seed=0)
    write_records(root / "eval.tfrecord", 16, seed=1)
    write_records(root / "unlabelled.tfrecord", 8, seed=2, labels=[-1] * 8)
    return root


def test_missing_labels_are_a_clear_error(records, tmp_path):
    with pytest.raises(subsets.MissingLabelsError,
                       match=r"--eval_files: .*unlabelled.tfrecord.*label -1"):
        subsets.read_ids_and_labels(str(records / "unlabelled.tfrecord"), flag="eval_files")
    config = evaluation.EvaluationConfig(
        mode="knn", encoder="random", encoder_config={"depth": 18},
        train_files=str(records / "unlabelled.tfrecord"),
        eval_files=str(records / "eval.tfrecord"), output_dir=str(tmp_path / "out"))
    with pytest.raises(subsets.MissingLabelsError, match="--train_files: .*label -1"):
        evaluation.evaluate(config)


def test_cli_flag_errors_are_one_line(records, tmp_path):
    result = subprocess.run(
        [sys.executable, "-m", "harl_tf.finetune", "--mode=knn", "--encoder=random",
         f"--train_files={records / 'train.tfrecord'}",
         f"--eval_files={records / 'eval.tfrecord'}"],
        capture_output=True, text=True, env=ENV, timeout=60)
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [
        "finetune: error: flag --output_dir=None: Flag --output_dir must have a value other "
        "than None."]


def test_a_bug_inside_the_evaluation_keeps_its_traceback(records, tmp_path):
    """Only the project's own errors become one line: a ValueError from deep inside Keras
    (here: raised by a stand-in evaluate) is a bug, shown with its traceback."""
    script = ("import sys\n"
              "from harl_tf.cli import finetune\n"
              "from harl_tf.downstream import evaluation\n"
              "def evaluate(config, strategy=None):\n"
              "    raise ValueError('Input 0 of layer dense is incompatible')\n"
              "evaluation.evaluate = evaluate\n"
              "sys.argv = ['finetune'] + sys.argv[1:]\n"
              "finetune.run()\n")
    result = subprocess.run(
        [sys.executable, "-c", script, "--mode=knn", "--encoder=random",
         "--encoder_config={\"depth\": 18}", f"--train_files={records / 'train.tfrecord'}",
         f"--eval_files={records / 'eval.tfrecord'}", f"--output_dir={tmp_path / 'out'}"],
        capture_output=True, text=True, env=ENV, timeout=120)
    assert result.returncode == 1, result.stderr[-2000:]
    assert "Traceback" in result.stderr and "in evaluate" in result.stderr
    assert "ValueError: Input 0 of layer dense is incompatible" in result.stderr
    assert "finetune: error" not in result.stderr


def test_weights_load_identically_from_export_and_checkpoint(tmp_path):
    make_model_dir(tmp_path / "run", steps=(5,))
    saved_encoder.export_from_model_dir(str(tmp_path / "run"), str(tmp_path / "export"))
    from_export = encoder_source.load_encoder(str(tmp_path / "export"))
    from_checkpoint = encoder_source.load_encoder(str(tmp_path / "run"))
    assert from_export.kind == "export" and from_checkpoint.kind == "model_dir"
    assert from_export.config == from_checkpoint.config
    assert from_export.config["output_stride"] == 16  # both as pretrained
    a = {v.path: v.numpy() for v in from_export.encoder.variables}
    b = {v.path: v.numpy() for v in from_checkpoint.encoder.variables}
    assert a.keys() == b.keys() and len(a) == 100
    assert all(np.array_equal(a[k], b[k]) for k in a)
    assert from_export.encoder.trainable_variables  # ready for fine-tuning
    assert from_checkpoint.description["step"] == 5


def test_evaluate_knn_and_linear_with_a_label_subset(records, tmp_path):
    common = dict(encoder="random", train_files=str(records / "train.tfrecord"),
                  eval_files=str(records / "eval.tfrecord"), image_size=32,
                  encoder_config={"depth": 18, "width_multiplier": 0.25, "small_stem": True},
                  batch_size=8, eval_batch_size=16, epochs=2, label_fraction=0.5,
                  verbose=0)
    knn_results = evaluation.evaluate(evaluation.EvaluationConfig(
        mode="knn", output_dir=str(tmp_path / "knn"), knn_k=3, **common))
    ids = subsets.read_ids(str(tmp_path / "knn" / "train_ids.txt"))
    assert knn_results["num_train"] == len(ids) == 16  # 0.5 * 32 / 8 classes = 2 per class
    assert knn_results["num_eval"] == 16 and knn_results["num_classes"] == 8
    assert 0.0 <= knn_results["top1"] <= knn_results["top5"] <= 1.0
    with open(tmp_path / "knn" / "results.json") as f:
        assert json.load(f)["top1"] == knn_results["top1"]

    linear_results = evaluation.evaluate(evaluation.EvaluationConfig(
        mode="linear", output_dir=str(tmp_path / "linear"), **common))
    assert subsets.read_ids(str(tmp_path / "linear" / "train_ids.txt")) == ids
    assert linear_results["num_train"] == 16
    assert os.path.exists(tmp_path / "linear" / "linear.weights.h5")
    with open(tmp_path / "linear" / "metrics.csv") as f:
        assert len(f.read().strip().splitlines()) == 1 + 2  # header + one row per epoch


def test_evaluate_finetune_trains_the_encoder(records, tmp_path):
    config = evaluation.EvaluationConfig(
        mode="finetune", encoder="random", train_files=str(records / "train.tfrecord"),
        eval_files=str(records / "eval.tfrecord"), output_dir=str(tmp_path / "ft"),
        encoder_config={"depth": 18, "width_multiplier": 0.25, "small_stem": True},
        image_size=32, batch_size=8, eval_batch_size=16, epochs=1, verbose=0)
    results = evaluation.evaluate(config)
    assert results["num_train"] == 32 and results["num_eval"] == 16
    assert results["details"]["steps_per_epoch"] == 4
    assert os.path.exists(tmp_path / "ft" / "classifier.weights.h5")


def test_extra_eval_sets_are_scored_by_the_trained_model_and_kept_out_of_training(
        records, tmp_path):
    """One fine-tuned model scores --eval_files and each extra set: the same records as an
    extra set score exactly the same; records whose ids are training ids are left out of
    training (8 of the 32) and scored on their own."""
    (tmp_path / "copy").mkdir()
    overlap = tmp_path / "copy" / "train.tfrecord"  # ids train.tfrecord/00000-00007, as train's
    write_records(overlap, 8, seed=5)
    eval_file = str(records / "eval.tfrecord")
    config = evaluation.EvaluationConfig(
        mode="finetune", encoder="random", train_files=str(records / "train.tfrecord"),
        eval_files=eval_file, output_dir=str(tmp_path / "ft"),
        extra_eval_files=(("again", eval_file), ("overlap", str(overlap))),
        encoder_config={"depth": 18, "width_multiplier": 0.25, "small_stem": True},
        image_size=32, batch_size=8, eval_batch_size=16, epochs=1, verbose=0)
    results = evaluation.evaluate(config)
    extra = results["extra_eval"]
    assert results["num_train"] == 24 and results["num_eval"] == 16
    assert extra["again"] == {"top1": results["top1"], "top5": results["top5"],
                              "num_eval": 16}
    assert extra["overlap"]["num_eval"] == 8 and 0 <= extra["overlap"]["top1"] <= 1
    trained = set(subsets.read_ids(str(tmp_path / "ft" / "train_ids.txt")))
    assert len(trained) == 24 and not trained & {f"train.tfrecord/{i:05d}" for i in range(8)}
    assert results["background"] is None
    with open(tmp_path / "ft" / "results.json") as f:
        assert json.load(f)["extra_eval"] == extra


def test_protocol_flagfiles_parse_and_encode_the_paper_protocols():
    script = (
        "import json, sys\n"
        "from absl import flags\n"
        "import harl_tf.cli.finetune\n"
        "out = {}\n"
        "for name in sys.argv[1:]:\n"
        "    flags.FLAGS.unparse_flags()\n"
        "    flags.FLAGS(['finetune', f'--flagfile=flags/{name}.cfg'])\n"
        "    out[name] = {k: flags.FLAGS[k].value for k in ('mode', 'label_fraction', "
        "'epochs', 'linear_augmentation', 'encoder', 'num_classes')}\n"
        "print(json.dumps(out))\n")
    names = ["linear_eval_imagenet", "semi_supervised_1pct", "semi_supervised_10pct",
             "transfer_linear", "transfer_finetune", "quickstart_linear"]
    result = subprocess.run([sys.executable, "-c", script, *names], capture_output=True,
                            text=True, env=ENV, cwd=ROOT, timeout=60)
    assert result.returncode == 0, result.stderr[-2000:]
    parsed = json.loads(result.stdout.strip().splitlines()[-1])
    assert parsed["linear_eval_imagenet"]["mode"] == "linear"
    assert parsed["linear_eval_imagenet"]["linear_augmentation"] is True
    assert parsed["linear_eval_imagenet"]["num_classes"] == 1000
    for name, fraction, epochs in (("semi_supervised_1pct", 0.01, 60),
                                   ("semi_supervised_10pct", 0.1, 30)):
        protocol = parsed[name]
        assert (protocol["mode"], protocol["label_fraction"], protocol["epochs"]) == (
            "finetune", fraction, epochs)
    assert parsed["transfer_linear"]["linear_augmentation"] is False
    assert parsed["transfer_finetune"]["mode"] == "finetune"
    assert parsed["quickstart_linear"]["encoder"] == "/tmp/harl_quickstart/export"


def test_interrupted_training_resumes_from_the_last_epoch(tmp_path, monkeypatch):
    x, y = separable_features(20, seed=4)
    features = linear.Features(x, y, np.arange(len(y)))

    class Preempted(Exception):
        pass

    class PreemptAfterEpoch(linear.keras.callbacks.Callback):
        def on_epoch_end(self, epoch, logs=None):
            if epoch == 1:
                raise Preempted()

    callbacks = linear.training_callbacks
    with monkeypatch.context() as patch:
        patch.setattr(linear, "training_callbacks", lambda d: callbacks(d) + [PreemptAfterEpoch()])
        with pytest.raises(Preempted):
            linear.train_linear_on_features(features, 4, epochs=4, batch_size=16,
                                            output_dir=str(tmp_path))
    assert os.listdir(tmp_path / "backup")  # the state after epoch 1 was kept
    linear.train_linear_on_features(features, 4, epochs=4, batch_size=16,
                                    output_dir=str(tmp_path))
    with open(tmp_path / "metrics.csv") as f:
        epochs = [int(line.split(",")[0]) for line in f.read().splitlines()
                  if line[:1].isdigit()]
    assert epochs == [0, 1, 2, 3]  # epochs 0-1 in the first run, only 2-3 in the second
    assert not os.path.exists(tmp_path / "backup")  # removed after a complete run

