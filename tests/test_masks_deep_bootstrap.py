"""Mask bootstrapping: the plan of tool runs, skipping finished steps, resuming, the summary."""
import json
import os
import subprocess
import sys

import pytest

from harl_tf.masks.deep import bootstrap

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture
def layout(tmp_path):
    data = tmp_path / "data"
    for split in ("train", "test"):
        (data / split / "images" / "a").mkdir(parents=True)
    (data / "classes.txt").write_text("a\n")
    (tmp_path / "exact").mkdir()
    recipe = tmp_path / "recipe.cfg"
    recipe.write_text("--train_steps=3\n")
    return tmp_path


def _config(layout, **kw):
    return bootstrap.BootstrapConfig(
        data_dir=str(layout / "data"), work_dir=str(layout / "work"),
        recipe_flagfile=str(layout / "recipe.cfg"), **kw)


def _flag(step, name):
    values = [arg.split("=", 1)[1] for arg in step.command if arg.startswith(f"--{name}=")]
    assert len(values) == 1, (step.name, name, step.command)
    return values[0]


def test_plan_chains_masks_pretraining_and_heads_round_by_round(layout):
    config = _config(layout, rounds=2, exact_masks_dir=str(layout / "exact"),
                     conventional_masks_dir=str(layout / "exact"))
    steps = bootstrap.plan(config)
    names = [(s.round, s.name) for s in steps]
    per_round = ["records", "pretrain", "export", "knn", "linear", "head"]
    assert names == ([(-1, "eval_records"), (0, "quality")] + [(0, n) for n in per_round]
                     + [(1, "masks"), (1, "quality")] + [(1, n) for n in per_round]
                     + [(2, "masks"), (2, "quality")])
    by = {(s.round, s.name): s for s in steps}
    work = str(layout / "work")
    # Round 0 pretrains on the given conventional masks, round 1 on round 0's deep masks.
    assert _flag(by[0, "records"], "masks_dir") == str(layout / "exact")
    assert _flag(by[1, "masks"], "mask_model") == os.path.join(work, "round0", "saliency_model")
    assert _flag(by[1, "records"], "masks_dir") == os.path.join(work, "round1", "masks")
    assert _flag(by[1, "pretrain"], "train_files") == os.path.join(
        work, "round1", "records", "train-*.tfrecord")
    assert _flag(by[1, "knn"], "encoder") == os.path.join(work, "round1", "export")
    # Every head learns from the conventional masks (head_labels="conventional").
    assert {_flag(by[r, "head"], "pseudo_masks_dir") for r in (0, 1)} == {str(layout / "exact")}
    round_labels = bootstrap.plan(_config(layout, rounds=2, head_labels="round"))
    heads = [s for s in round_labels if s.name == "head"]
    assert _flag(heads[1], "pseudo_masks_dir") == os.path.join(work, "round1", "masks")
    # Without a conventional folder, round 0 computes it; without exact masks, no quality.
    first = bootstrap.plan(_config(layout, rounds=1))
    assert [(s.round, s.name) for s in first][:3] == [(-1, "eval_records"), (0, "masks"),
                                                       (0, "records")]
    assert "--method=conventional" in first[1].command
    assert not [s for s in first if s.name == "quality"]


def test_a_round0_export_replaces_round0s_pretraining(layout):
    (layout / "kept").mkdir()
    steps = bootstrap.plan(_config(layout, rounds=2, round0_export=str(layout / "kept"),
                                   conventional_masks_dir=str(layout / "exact")))
    names = [(s.round, s.name) for s in steps]
    assert names[:4] == [(-1, "eval_records"), (0, "knn"), (0, "linear"), (0, "head")]
    assert (1, "pretrain") in names and not {(0, "records"), (0, "pretrain"),
                                             (0, "export")} & set(names)
    by = {(s.round, s.name): s for s in steps}
    assert _flag(by[0, "knn"], "encoder") == _flag(by[0, "head"], "encoder") == str(
        layout / "kept")
    with pytest.raises(bootstrap.MissingPathError, match="round0_export"):
        _config(layout, round0_export=str(layout / "missing"))


def _fake_runner(ran, figures):
    """Writes each step's marker as its tool would (with the figures of summarize)."""
    def runner(step):
        ran.append((step.round, step.name))
        if step.stamp:
            return
        os.makedirs(os.path.dirname(step.marker), exist_ok=True)
        payload = figures.get(step.name, lambda r: {})(step.round)
        with open(step.marker, "w") as f:
            json.dump(payload, f)
    return runner


def test_run_skips_done_steps_resumes_and_summarizes(layout):
    config = _config(layout, rounds=2, exact_masks_dir=str(layout / "exact"))
    figures = {"quality": lambda r: {"mean_iou": [0.7, 0.71, 0.72][r]},
               "knn": lambda r: {"top1": [0.30, 0.31][r]},
               "linear": lambda r: {"top1": [0.40, 0.41][r]}}
    ran = []
    summary = bootstrap.run(config, runner=_fake_runner(ran, figures), echo=lambda _: None)
    assert len(ran) == len(bootstrap.plan(config)) == 19
    rounds = summary["rounds"]
    assert [r["mask_mean_iou"] for r in rounds] == [0.7, 0.71, 0.72]
    assert [r["knn_top1"] for r in rounds[:2]] == [0.30, 0.31]
    assert [r["linear_top1"] for r in rounds[:2]] == [0.40, 0.41]
    assert "knn_top1" not in rounds[2]  # the last masks have no pretraining of their own
    with open(os.path.join(config.work_dir, bootstrap.SUMMARY_FILE)) as f:
        assert json.load(f)["rounds"] == rounds
    stamp = os.path.join(config.work_dir, "round1", "model", bootstrap.PRETRAINED_STAMP)
    assert os.path.isfile(stamp)  # written by run(), not by the tool

    # Everything done: a rerun runs nothing.
    again = []
    bootstrap.run(config, runner=_fake_runner(again, figures), echo=lambda _: None)
    assert again == []
    # A stopped run (round 1's pretraining never finished): only what follows reruns.
    os.remove(stamp)
    for name in ("export", "knn"):
        marker = next(s.marker for s in bootstrap.plan(config) if (s.round, s.name) == (1, name))
        os.remove(marker)
    resumed = []
    bootstrap.run(config, runner=_fake_runner(resumed, figures), echo=lambda _: None)
    assert resumed == [(1, "pretrain"), (1, "export"), (1, "knn")]


def test_a_step_without_its_marker_stops_the_run(layout):
    config = _config(layout, rounds=1)

    def runner(step):  # "succeeds" but writes nothing
        pass

    with pytest.raises(bootstrap.StepFailed, match=r"eval_records: finished without writing"):
        bootstrap.run(config, runner=runner, echo=lambda _: None)


def test_bad_config_is_named(layout):
    with pytest.raises(ValueError, match="rounds must be >= 1"):
        _config(layout, rounds=0)
    with pytest.raises(ValueError, match="head_labels"):
        _config(layout, head_labels="exact")
    with pytest.raises(ValueError, match="eval_train_files and eval_test_files"):
        _config(layout, eval_train_files="x-*")
    with pytest.raises(FileNotFoundError, match="saliency_flagfile"):
        _config(layout, saliency_flagfile=str(layout / "missing.cfg"))


def test_tool_error_is_one_line(layout):
    tool = [sys.executable, "-m", "tools.bootstrap_masks"]
    bad = subprocess.run(tool + [f"--data_dir={layout / 'nowhere'}",
                                 f"--work_dir={layout / 'work'}",
                                 f"--recipe_flagfile={layout / 'recipe.cfg'}", "--dry_run"],
                         cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert bad.returncode != 0
    assert [line for line in bad.stderr.splitlines() if "error:" in line] == [
        f"bootstrap_masks: error: bootstrap: data_dir {layout / 'nowhere'} does not exist"]


@pytest.mark.parametrize("module,flagfile,expect", [
    ("harl_tf.cli.bootstrap_masks", "bootstrap_fmnist_scenes",
     {"rounds": 2, "recipe_flagfile": "flags/fmnist_scenes_harl_8x8.cfg"}),
    ("harl_tf.cli.train_saliency_head", "saliency_fmnist_scenes_paper",
     {"refine": "none", "threshold": 0.5, "input_sizes": []}),
    ("harl_tf.cli.train_saliency_head", "saliency_fmnist_scenes",
     {"refine": "grabcut", "input_sizes": ["64", "128"], "head": "context",
      "fuse_conventional": ["sigma0.4", "no_grabcut"], "refine_iterations": 3,
      "refine_sure": 0.05, "threshold": 0.8}),
])
def test_shipped_flagfiles_parse(module, flagfile, expect):
    # A fresh process each: absl flags are process-global and the two tools share names.
    script = (f"import json, sys; from {module} import FLAGS\n"
              "FLAGS(['tool', '--flagfile=' + sys.argv[1]])\n"
              f"print(json.dumps({{k: FLAGS[k].value for k in {sorted(expect)!r}}}))\n")
    out = subprocess.run([sys.executable, "-c", script,
                          os.path.join("flags", flagfile + ".cfg")], cwd=ROOT,
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert json.loads(out.stdout.strip().splitlines()[-1]) == expect
