"""The fair linear probe: its weight decay is chosen on a validation split of the train
features (never the evaluation split), with the same recipe as the Keras probe, and the
choice follows what the held-out data needs."""
import json
import os
import subprocess
import sys

import numpy as np
import pytest

from _export_helpers import write_records
from harl_tf import eval_config
from harl_tf.downstream import evaluation, linear, probe_selection

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ENV = dict(os.environ, PYTHONPATH=ROOT, TF_CPP_MIN_LOG_LEVEL="3", CUDA_VISIBLE_DEVICES="")
GRID = (0.0, 1e-3, 1e-2, 1e-1, 1.0)
RECIPE = dict(epochs=20, batch_size=32, learning_rate=0.1)


def noisy_labels(n_per_class, seed, dim=128, num_classes=4):
    """Weak class means in 128 channels, 20 % of the labels redrawn at random: a probe
    without decay fits the noise."""
    means = 0.15 * np.random.default_rng(100).normal(size=(num_classes, dim))
    rng = np.random.default_rng(seed)
    labels = np.repeat(np.arange(num_classes), n_per_class)
    features = means[labels] + rng.normal(size=(len(labels), dim))
    labels = np.where(rng.random(len(labels)) < 0.2,
                      rng.integers(0, num_classes, len(labels)), labels)
    return linear.Features(features.astype(np.float32), labels, np.arange(len(labels)))


def nuisance(n_per_class, seed, dim=128):
    """Two classes whose sign s is seen only as x0 = s + 3n next to x1 = n: the probe must
    learn large, opposite weights on x0 and x1 to cancel n, which a strong decay forbids."""
    rng = np.random.default_rng(seed)
    labels = np.repeat(np.arange(2), n_per_class)
    signal = (2 * labels - 1) + 0.5 * rng.normal(size=len(labels))
    noise = rng.normal(size=len(labels))
    features = np.concatenate([(signal + 3 * noise)[:, None], noise[:, None],
                               rng.normal(size=(len(labels), dim - 2))], axis=1)
    return linear.Features(features.astype(np.float32), labels, np.arange(len(labels)))


def test_grid_trainer_is_the_keras_probe_recipe():
    """Full batch (no shuffling to differ), the batched grid trainer and
    linear.train_linear_on_features give the same logits for the same weight decay."""
    rng = np.random.default_rng(0)
    labels = rng.integers(0, 4, 300)
    features = (rng.normal(size=(4, 16))[labels] + 2 * rng.normal(size=(300, 16)) + 3
                ).astype(np.float32)
    keras_probe = linear.train_linear_on_features(
        linear.Features(features, labels, np.arange(300)), 4, epochs=5, batch_size=300,
        learning_rate=0.5, weight_decay=0.1)
    grid = probe_selection.train_linear_grid(features, labels, 4, [0.0, 0.1], epochs=5,
                                             batch_size=300, learning_rate=0.5)(features)
    expected = keras_probe.predict(features, verbose=0)
    np.testing.assert_allclose(grid[1], expected, atol=1e-5)
    assert np.max(np.abs(grid[0] - expected)) > 1e-2  # and the decay does act


def test_validation_split_is_stratified_disjoint_and_seeded():
    labels = np.repeat(np.arange(5), [10, 20, 30, 40, 1])
    fit, held_out = probe_selection.validation_split(labels, 0.2, seed=0)
    assert not set(fit) & set(held_out)
    assert sorted(np.concatenate([fit, held_out])) == list(range(len(labels)))
    assert np.bincount(labels[held_out], minlength=5).tolist() == [2, 4, 6, 8, 0]
    again = probe_selection.validation_split(labels, 0.2, seed=0)
    other = probe_selection.validation_split(labels, 0.2, seed=1)
    assert np.array_equal(again[1], held_out) and not np.array_equal(other[1], held_out)
    with pytest.raises(ValueError, match="validation_fraction"):
        probe_selection.validation_split(labels, 1.0)


def test_parse_grid_sorts_and_names_the_flag():
    assert eval_config.parse_grid("1e-2, 0,1e-4,1e-2") == (0.0, 1e-4, 1e-2)
    assert eval_config.parse_grid("") == ()
    with pytest.raises(ValueError, match="--weight_decay_grid: 'x'"):
        eval_config.parse_grid("0,x")
    with pytest.raises(ValueError, match=">= 0"):
        eval_config.parse_grid("-1e-3")


@pytest.mark.parametrize("make, num_classes", [(noisy_labels, 4), (nuisance, 2)])
def test_chosen_decay_is_what_unseen_data_needs(make, num_classes):
    """Noisy labels: a strong decay (>= 0.1) is chosen and beats no decay on 8,000 fresh
    examples by >= 1 point. Nuisance cancelling: a weak one (<= 0.01) is chosen, and the
    strongest decay would have lost >= 10 points on the fresh examples."""
    train, test = make(500, seed=0), make(2000, seed=10)
    choice = probe_selection.select_weight_decay(train, num_classes, GRID,
                                                 validation_fraction=0.25, **RECIPE)
    assert choice["weight_decay_grid"] == list(GRID)
    assert len(choice["validation_top1"]) == len(GRID)
    scores = probe_selection.train_linear_grid(train.features, train.labels, num_classes,
                                               GRID, **RECIPE)(test.features)
    test_top1 = [linear.topk_accuracy(s, test.labels, ks=(1,))["top1"] for s in scores]
    chosen = test_top1[GRID.index(choice["chosen_weight_decay"])]
    if make is noisy_labels:
        assert choice["chosen_weight_decay"] >= 0.1
        assert chosen >= test_top1[0] + 0.01
    else:
        assert choice["chosen_weight_decay"] <= 0.01
        assert test_top1[-1] <= chosen - 0.1


def test_ties_go_to_the_smaller_decay():
    """Perfectly separable clusters: every decay scores 1.0 on validation."""
    rng = np.random.default_rng(0)
    labels = np.repeat(np.arange(2), 40)
    features = (10.0 * labels[:, None] + rng.normal(size=(80, 4))).astype(np.float32)
    choice = probe_selection.select_weight_decay(
        linear.Features(features, labels, np.arange(80)), 2, (1e-2, 0.0, 1e-3),
        validation_fraction=0.25, **RECIPE)
    assert choice["validation_top1"] == [1.0, 1.0, 1.0]
    assert choice["chosen_weight_decay"] == 0.0


def test_evaluate_chooses_the_decay_without_reading_the_eval_files(tmp_path):
    """Two runs that differ only in their eval files (one with every label shifted by one
    class) make the same choice from the same validation scores; results.json records
    the grid, the scores and the choice, and the final probe uses it."""
    write_records(tmp_path / "train.tfrecord", 48, seed=0)
    data = write_records(tmp_path / "eval.tfrecord", 16, seed=1)
    write_records(tmp_path / "eval_wrong.tfrecord", 16, seed=1,
                  labels=(data.labels + 1) % 8)
    results = []
    for name in ("eval", "eval_wrong"):
        config = evaluation.EvaluationConfig(
            mode="linear", encoder="random",
            encoder_config={"depth": 18, "width_multiplier": 0.25, "small_stem": True},
            train_files=str(tmp_path / "train.tfrecord"),
            eval_files=str(tmp_path / f"{name}.tfrecord"), output_dir=str(tmp_path / name),
            image_size=32, batch_size=16, eval_batch_size=16, epochs=3, verbose=0,
            weight_decay_grid=(0.0, 1e-2, 1.0), validation_fraction=0.25)
        results.append(evaluation.evaluate(config))
    with open(tmp_path / "eval" / "results.json") as f:
        written = json.load(f)
    selection = written["weight_decay_selection"]
    assert selection == results[1]["weight_decay_selection"]
    assert selection["weight_decay_grid"] == [0.0, 1e-2, 1.0]
    assert len(selection["validation_top1"]) == 3
    assert selection["num_validation"] == 16  # 48 train records, 6 per class, 25 % held out
    assert written["weight_decay"] == selection["chosen_weight_decay"]


def test_cli_uses_the_grid_unless_a_weight_decay_is_given():
    """The grid is the default of --mode=linear on precomputed features (the quickstart's
    probe flagfile included); an explicit --weight_decay keeps the fixed recipe; both at
    once is an error; other modes use no grid."""
    script = (
        "import json, sys\n"
        "from absl import flags\n"
        "from harl_tf.cli import finetune\n"
        "out = []\n"
        "for args in json.loads(sys.argv[1]):\n"
        "    flags.FLAGS.unparse_flags()\n"
        "    flags.FLAGS(['finetune'] + args)\n"
        "    try:\n"
        "        out.append(list(finetune.weight_decay_grid()))\n"
        "    except ValueError as err:\n"
        "        out.append(str(err))\n"
        "print(json.dumps(out))\n")
    cases = [[], ["--weight_decay=1e-4"], ["--flagfile=flags/quickstart_linear.cfg"],
             ["--weight_decay_grid=0,0.5"], ["--weight_decay=0", "--weight_decay_grid=0,1"],
             ["--mode=knn"], ["--linear_augmentation"], ["--weight_decay_grid="]]
    result = subprocess.run([sys.executable, "-c", script, json.dumps(cases)],
                            capture_output=True, text=True, env=ENV, cwd=ROOT, timeout=120)
    assert result.returncode == 0, result.stderr[-2000:]
    grids = json.loads(result.stdout.strip().splitlines()[-1])
    assert grids[0] == list(eval_config.DEFAULT_GRID)
    assert grids[1] == []
    assert grids[2] == list(eval_config.DEFAULT_GRID)
    assert grids[3] == [0.0, 0.5]
    assert "not both" in grids[4]
    assert grids[5] == grids[6] == grids[7] == []
