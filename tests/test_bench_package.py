"""The benchmarks as a package: modules run from the repository root (``python -m
bench.<name>``) with no import-path edits, and recipes read from flagfiles only — the
learning benchmark's runs get exactly the pretraining flags they got when the budget was
declared as the benchmark's own options."""
import json
import pathlib
import subprocess
import sys

import pytest

from harl_tf import config

ROOT = pathlib.Path(__file__).resolve().parents[1]

# The budget bench_learning spelled out flag by flag before it read flags/bench_cutouts_base.cfg
# (its defaults then: --steps=200 --batch_size=64 --image_size=64 ... --lambda_base=0.7).
FORMER_CUTOUTS_BUDGET = [
    "--image_size=64", "--depth=18", "--width_multiplier=1.0", "--small_stem=false",
    "--output_stride=16", "--projector_hidden_dim=1024", "--projection_dim=256",
    "--predictor_hidden_dim=1024", "--alpha_base=0.7", "--alpha_schedule=cosine",
    "--lambda_base=0.7", "--lambda_schedule=cosine", "--batch_size=64", "--train_steps=200",
    "--base_learning_rate=0.5", "--warmup_epochs=1.0", "--weight_decay=1e-06",
    "--trust_coefficient=0.001", "--tau_base=0.99", "--probe_learning_rate=0.001"]
# The sweep's former BASE dict, as bench_learning turned it into flags.
FORMER_SWEEP_BUDGET = [
    "--image_size=32", "--depth=18", "--width_multiplier=0.5", "--small_stem=false",
    "--output_stride=8", "--projector_hidden_dim=1024", "--projection_dim=256",
    "--predictor_hidden_dim=1024", "--alpha_base=0.7", "--alpha_schedule=cosine",
    "--lambda_base=0.7", "--lambda_schedule=cosine", "--batch_size=128", "--train_steps=400",
    "--base_learning_rate=1.0", "--warmup_epochs=1.0", "--weight_decay=1e-05",
    "--trust_coefficient=0.02", "--tau_base=0.99", "--probe_learning_rate=0.001"]

# One method's pretraining flags as bench_learning builds them (nothing is run).
_PRETRAIN_FLAGS = """
import json, sys
from absl import flags
from bench import bench_learning
flags.FLAGS(["bench_learning", *json.loads(sys.argv[1])])
bench_learning._num_train = lambda: int(sys.argv[2])  # instead of reading a manifest
print(json.dumps(bench_learning.pretrain_flags("hybrid_conventional")))
"""
_SWEEP_COMMAND = """
import json, sys
from absl import flags
from bench import sweep_learning
flags.FLAGS(["sweep_learning", "--records_dir=/tmp/r", "--work_dir=/tmp/w"])
print(json.dumps(sweep_learning.command(sys.argv[1])))
"""


def _python(code, *args):
    done = subprocess.run([sys.executable, "-c", code, *args], cwd=ROOT, capture_output=True,
                          text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


def _values(argv):
    """{flag: value} harl_tf.pretrain would run with (flagfiles resolved from the root)."""
    return config.parse_argv(config.PretrainConfig, [
        a.replace("--flagfile=flags/", f"--flagfile={ROOT}/flags/") for a in argv]).flag_values()


def _run_flags(work, records, loss_mode, num_train, num_classes, seed, checkpoint_every):
    return [f"--train_files={records}/train-*.tfrecord",
            f"--model_dir={work}/runs/hybrid_conventional", f"--loss_mode={loss_mode}",
            f"--num_train_examples={num_train}", f"--num_classes={num_classes}",
            f"--shuffle_buffer={num_train}", f"--seed={seed}", "--deterministic",
            "--strategy=default", f"--checkpoint_every_steps={checkpoint_every}",
            "--keep_checkpoints=1", "--log_every_steps=10", "--image_summaries=0"]


def test_no_import_path_edits():
    offenders = [str(path.relative_to(ROOT)) for folder in ("bench", "tools", "harl_tf")
                 for path in (ROOT / folder).rglob("*.py") if "sys.path" in path.read_text()]
    assert offenders == []
    for package in ("bench", "bench/experiments", "bench/common"):
        assert (ROOT / package / "__init__.py").is_file(), package


@pytest.mark.parametrize("args, budget, seed, checkpoint_every", [
    ([], FORMER_CUTOUTS_BUDGET, 0, 100),
    # --steps=600 --output_stride=8 --alpha_base=1.0 --seed=1 before
    (["--extra_pretrain_flags=--train_steps=600 --output_stride=8 --alpha_base=1.0",
      "--seed=1"],
     FORMER_CUTOUTS_BUDGET + ["--train_steps=600", "--output_stride=8", "--alpha_base=1.0"],
     1, 300)])
def test_bench_learning_runs_the_former_cutouts_budget(tmp_path, args, budget, seed,
                                                       checkpoint_every):
    work = tmp_path / "work"
    argv = _python(_PRETRAIN_FLAGS, json.dumps([f"--work_dir={work}", *args]), "3000")
    assert argv[0] == f"--flagfile={ROOT}/flags/bench_cutouts_base.cfg"
    former = budget + _run_flags(work, f"{work}/records/cutouts_conventional", "hybrid", 3000,
                                 8, seed, checkpoint_every)
    assert _values(argv) == _values(former)


def test_sweep_configuration_runs_the_former_flags():
    name = "hybrid_solo_64os8_noblur_crop025_1000_bf16"
    command = _python(_SWEEP_COMMAND, name)
    assert command[1:3] == ["-m", "bench.bench_learning"]
    argv = _python(_PRETRAIN_FLAGS, json.dumps(command[3:]), "8000")
    work = f"/tmp/w/{name}"
    former = (FORMER_SWEEP_BUDGET
              + ["--image_size=64", "--output_stride=8", "--train_steps=1000"]
              + _run_flags(work, "/tmp/r/fmnist_scenes_validation_conventional", "hybrid",
                           8000, 10, 0, 500)
              + ["--blur_prob_scale=0", "--min_crop_area=0.25",
                 "--mixed_precision=mixed_bfloat16"])
    values = _values(argv)
    assert values == _values(former)
    assert (values["train_steps"], values["image_size"], values["mixed_precision"]) == (
        1000, 64, "mixed_bfloat16")


def test_cutouts_objects_are_grouped_by_mask_shape_and_kept_out_of_selection():
    """bench_masks_deep --select_unseen_objects: the same cut-out at other sizes, places
    and flips is one group, another shape or class another; no group is on both sides."""
    import numpy as np
    from bench.common import splits

    def paste(shape, scale, top, left, flip=False):
        mask = np.zeros((64, 64), np.uint8)
        rows = (np.arange(int(shape.shape[0] * scale)) / scale).astype(int)
        cols = (np.arange(int(shape.shape[1] * scale)) / scale).astype(int)
        piece = shape[rows][:, cols]
        piece = piece[:, ::-1] if flip else piece
        mask[top:top + piece.shape[0], left:left + piece.shape[1]] = piece
        return mask

    ell = np.zeros((10, 8), np.uint8)
    ell[:, :3] = ell[7:, :] = 1                                # an L
    disc = (np.hypot(*np.mgrid[-5:5, -5:5] + 0.5) < 5).astype(np.uint8)
    masks = [paste(ell, 2, 3, 4), paste(ell, 4, 10, 20, flip=True), paste(ell, 3, 0, 30),
             paste(disc, 3, 5, 5), paste(disc, 2, 30, 30), paste(ell, 2, 3, 4)]
    classes = ["a", "a", "a", "a", "a", "b"]
    groups = splits.object_groups(masks, classes)
    assert groups[:3] == [0, 0, 0] and groups[3] == groups[4] == 1 and groups[5] == 2
    relative = [f"x/{i}.jpg" for i in range(6)]
    head, select = splits.split_by_object(relative, groups, train_limit=10,
                                              select_limit=2, seed=0)
    by_name = dict(zip(relative, groups))
    assert not {by_name[r] for r in head} & {by_name[r] for r in select}
    assert sorted(head + select) == sorted(relative) and len(select) >= 2


_DEEP_SOURCE = """
import json, sys
from absl import app, flags
from bench import bench_learning
flags.FLAGS(["bench_learning", "--dataset=fmnist_scenes", *json.loads(sys.argv[1])])
bench_learning._num_train = lambda: 10000
out = {"train_files": [a for a in bench_learning.pretrain_flags("hybrid_deep")
                       if a.startswith("--train_files=")]}
tree = sys.argv[2]
bench_learning._check_deep_source(tree)
bench_learning._check_deep_source(tree)          # the same masks again: fine
flags.FLAGS.deep_masks_dir = "/elsewhere"
try:
    bench_learning._check_deep_source(tree)
except app.UsageError as e:
    out["error"] = str(e)
print(json.dumps(out))
"""


def test_bench_learning_pretrains_on_deep_masks_from_their_own_records(tmp_path):
    """hybrid_deep reads the deep masks' records; a records_dir that holds one set of deep
    masks refuses another (its records would silently be the first)."""
    out = _python(_DEEP_SOURCE, json.dumps([f"--records_dir={tmp_path}/r",
                                            "--deep_masks_dir=/deep/v1"]), str(tmp_path / "t"))
    assert out["train_files"] == [f"--train_files={tmp_path}/r/fmnist_scenes_test_deep/"
                                  "train-*.tfrecord"]
    assert out["error"].startswith("--records_dir holds records of the deep masks in "
                                   "/deep/v1, not /elsewhere")
