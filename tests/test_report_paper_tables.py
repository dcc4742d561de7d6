"""bench.report_paper_tables: its arithmetic (means, sd, pooled sd, verdicts, paired drops),
its skip / resume logic and its validation choices, on faked results (no TensorFlow run
except the validation carve of a few tiny records)."""
import dataclasses
import glob
import json
import math
import os
import socket
import subprocess
import sys

import numpy as np
import pytest

from bench import report_paper_tables as report
from bench.common import summarise
from harl_tf import errors


def _encoder(folder, weights: bytes):
    os.makedirs(folder, exist_ok=True)
    with open(os.path.join(folder, "encoder.weights.h5"), "wb") as f:
        f.write(weights)


def _layout(tmp_path, split="test"):
    """A layout whose kept encoders (fake weights files, the same bytes wherever the
    layout is) exist for seeds 0-2."""
    layout = report.Layout(encoders=str(tmp_path / "enc" / "s{seed}" / "{run}"),
                           records_dir=str(tmp_path / "records"),
                           unseen_dir=str(tmp_path / "unseen"),
                           transfer_dir=str(tmp_path / "transfer"),
                           work_dir=str(tmp_path / "work"), split=split)
    for method in ("harl", "byol"):
        for seed in range(3):
            _encoder(layout.encoder(method, seed), f"{method} {seed}".encode())
    return layout


# Arithmetic ---------------------------------------------------------------------------------

def test_pooled_sd_and_verdicts_by_hand():
    harl = summarise([0.40, 0.42, 0.44])   # mean 0.42, sd 0.02
    byol = summarise([0.36, 0.37, 0.38])   # mean 0.37, sd 0.01
    assert harl["mean"] == pytest.approx(0.42, abs=1e-12)
    assert harl["sd"] == pytest.approx(0.02, abs=1e-12) and byol["sd"] == pytest.approx(0.01)
    pooled = report.pooled_sd(harl, byol)
    assert pooled == pytest.approx(math.sqrt((0.02 ** 2 + 0.01 ** 2) / 2), abs=1e-12)  # 0.0158
    row = report.compare({"harl": harl, "byol": byol})
    assert row["difference"] == pytest.approx(0.05, abs=1e-12)
    assert row["verdict"] == "HARL leads"
    # 0.01 apart with a pooled sd of 0.0158: level; the other way round by 0.05: BYOL leads.
    assert report.compare({"harl": summarise([0.36, 0.38, 0.40]),
                           "byol": byol})["verdict"] == "level"
    assert report.compare({"harl": byol, "byol": harl})["verdict"] == "BYOL leads"
    # A drop: lower is better, so HARL dropping 0.05 less than BYOL leads.
    assert report.compare({"harl": byol, "byol": harl},
                          higher_is_better=False)["verdict"] == "HARL leads"
    # Exactly one pooled sd apart is not "more than one".
    assert report.verdict(0.02, 0.02) == "level" and report.verdict(-0.02, 0.02) == "level"
    assert report.verdict(0.0201, 0.02) == "HARL leads"


def test_one_seed_or_one_method_gives_no_verdict():
    one = report.compare({"harl": summarise([0.5]), "byol": summarise([0.4])})
    assert one["difference"] == pytest.approx(0.1) and one["pooled_sd"] is None
    assert one["verdict"].startswith("no verdict")
    assert report.compare({"harl": summarise([0.5, 0.6]), "byol": None})["verdict"] == "–"


def test_rows_pair_drops_by_seed():
    values = {("linear", "fmnist_scenes", "test", "global"):
              {"harl": {0: 0.41, 1: 0.43, 2: 0.45}, "byol": {0: 0.35, 1: 0.36, 2: 0.37}},
              ("linear", "fmnist_scenes", "unseen", "global"):
              {"harl": {0: 0.30, 1: 0.33}, "byol": {0: 0.20, 1: 0.22, 2: 0.21}}}
    rows = report.rows(values)
    assert [r["eval_set"] for r in rows] == ["test", "unseen", "drop test → unseen"]
    drop = rows[2]
    # HARL: seeds 0 and 1 only (seed 2 has no unseen score): 0.11, 0.10; BYOL 0.15 0.14 0.16.
    assert drop["statistics"]["harl"]["values"] == pytest.approx([0.11, 0.10])
    assert drop["statistics"]["byol"]["mean"] == pytest.approx(0.15)
    assert drop["difference"] == pytest.approx(0.105 - 0.15)
    assert drop["lower_is_better"] and drop["verdict"] == "HARL leads"
    assert rows[0]["statistics"]["random"] is None
    lines = report.markdown(rows, seeds=3).splitlines()
    cells = [[c.strip() for c in line.strip("|").split("|")] for line in lines]
    assert cells[0][3:] == ["HARL hybrid", "BYOL", "random init", "HARL − BYOL (pooled sd)",
                            "verdict"]
    assert cells[2] == ["linear probe", "fmnist_scenes, test", "global", "0.430 ± 0.020",
                        "0.360 ± 0.010", "–", "+0.070 (0.016)", "HARL leads"]
    assert cells[3][1] == "fmnist_scenes, unseen backgrounds"
    assert cells[3][3:5] == ["0.315 ± 0.021 (n=2)", "0.210 ± 0.010"]
    assert cells[4][1:3] == ["fmnist_scenes, drop test → unseen", "global"]
    assert cells[4][3:] == ["0.105 ± 0.007 (n=2)", "0.150 ± 0.010", "–", "-0.045 (0.009)",
                            "HARL leads"]


def test_the_summary_has_one_line_per_protocol_and_dataset():
    values = {("linear", "fmnist_scenes", "test", "global"):
              {"harl": {0: 0.41, 1: 0.43, 2: 0.45}, "byol": {0: 0.35, 1: 0.36, 2: 0.37},
               "random": {0: 0.20, 1: 0.21, 2: 0.22}},
              ("linear", "fmnist_scenes", "unseen", "global"):
              {"harl": {0: 0.30, 1: 0.33, 2: 0.34}, "byol": {0: 0.20, 1: 0.22, 2: 0.21}},
              ("linear", "fmnist_scenes", "test", "foreground"):
              {"harl": {0: 0.40, 1: 0.40, 2: 0.40}, "byol": {0: 0.41, 1: 0.41, 2: 0.41}},
              ("supervised", "fmnist_scenes", "test", "global"):
              {"random": {0: 0.39, 1: 0.41, 2: 0.40}},
              ("supervised", "fmnist_scenes", "unseen", "global"):
              {"random": {0: 0.19, 1: 0.21, 2: 0.20}},
              ("transfer_linear", "fashion_mnist", "test", "global"):
              {"harl": {0: 0.83, 1: 0.84}, "byol": {0: 0.83, 1: 0.84}},
              ("transfer_linear", "fashion_mnist", "test", "foreground"):
              {"harl": {0: 0.90, 1: 0.91, 2: 0.92}, "byol": {0: 0.88, 1: 0.89}}}
    lines = report.summary_markdown(report.rows(values), seeds=3).splitlines()
    cells = [[c.strip() for c in line.strip("|").split("|")] for line in lines]
    assert cells[0] == ["protocol", "HARL hybrid", "BYOL", "random init",
                        "HARL − BYOL (pooled sd)", "unseen backgrounds: HARL − BYOL",
                        "drop to unseen: HARL / BYOL / random",
                        "foreground embedding: HARL − BYOL"]
    assert len(cells) == 2 + 3       # header, rule, linear, supervised, transfer
    # linear: test 0.43 vs 0.36 (pooled sd 0.0158); unseen 0.3233 vs 0.21; drops paired by
    # seed 0.1067 vs 0.15 (lower is better); foreground 0.40 vs 0.41, sd 0: BYOL leads.
    assert cells[2][:5] == ["linear probe", "0.430 ± 0.020", "0.360 ± 0.010",
                            "0.210 ± 0.010", "+0.070 (0.016) HARL leads"]
    assert cells[2][5].startswith("+0.113 (") and cells[2][5].endswith("HARL leads")
    assert cells[2][6] == "0.107 / 0.150 / – HARL leads"
    assert cells[2][7] == "-0.010 (0.000) BYOL leads"
    # The supervised reference: random init only, its drop shown, no comparison.
    assert cells[3][1:5] == ["–", "–", "0.400 ± 0.010", "–"]
    assert cells[3][6] == "– / – / 0.200"
    # A transfer set: its name in the title, nothing measured on unseen backgrounds.
    assert cells[4][0] == "transfer, linear (fashion_mnist)"
    assert cells[4][1] == "0.835 ± 0.007 (n=2)" and cells[4][4] == "+0.000 (0.007) level"
    # Its foreground row: BYOL has two runs of three, which only the cell can say
    # (0.91 vs 0.885, pooled sd sqrt((0.01² + 0.00707²) / 2) = 0.0087).
    assert cells[4][5:] == ["–", "–", "+0.025 (0.009) HARL leads (BYOL n=2)"]


def test_the_markdown_file_opens_with_its_seeds_and_failures():
    text = report.preamble([0, 1], [])
    assert text.startswith("# The paper's evaluations in miniature\n")
    assert "encoders of seeds 0, 1:" in text and "failed" not in text
    text = report.preamble([0, 1, 2], ["/w/evals/a", "/w/evals/b"])
    assert "seeds 0, 1, 2:" in text
    assert text.rstrip().endswith("**2 runs failed** and are left out: /w/evals/a, /w/evals/b.")


# Plan, skip and resume ----------------------------------------------------------------------

def _fake_runner(values, calls, fail=()):
    """Writes results.json with the run's value (by output_dir leaf prefix) and each
    --extra_eval_files set's value, or fails."""
    def run(argv, log_path):
        output_dir = next(a.split("=", 1)[1] for a in argv if a.startswith("--output_dir="))
        extra = [a.split("=")[1] for a in argv if a.startswith("--extra_eval_files=")]
        calls.append(output_dir)
        if any(f in output_dir for f in fail):
            raise SystemExit(f"failed (1): {argv[0]}")
        os.makedirs(output_dir, exist_ok=True)
        metric = "mean_iou" if "/seg_" in output_dir else "top1"
        results = {metric: values(output_dir)}
        if extra:
            results["extra_eval"] = {name: {metric: values(output_dir, name)}
                                     for name in extra}
        with open(os.path.join(output_dir, "results.json"), "w") as f:
            json.dump(results, f)
        return 0.0
    return run


def _value(output_dir, eval_set="test"):
    leaf = os.path.basename(output_dir)
    method, seed = leaf.split("-")[0].split("_s")
    base = {"harl": 0.5, "byol": 0.4, "random": 0.1}[method]
    return base + 0.01 * int(seed) - (0.1 if eval_set == "unseen" else 0.0)


def test_plan_covers_every_cell():
    runs = report.plan("test", [p.name for p in report.PROTOCOLS], report.METHODS, [0, 1, 2])
    count = lambda **kw: sum(all(getattr(r, k) == v for k, v in kw.items())  # noqa: E731
                             for r in runs)
    assert count(protocol="linear") == 2 * 2 * 3 * 3      # test/unseen x embeddings x 3 x 3
    assert count(protocol="supervised") == 2 * 3          # random only, global only
    assert count(protocol="seg_fcn", embedding="foreground") == 0
    assert count(protocol="transfer_linear", eval_set="unseen") == 0
    assert count(protocol="transfer_finetune", dataset="digits_scenes") == 2 * 3 * 3
    validation = report.plan("validation", ["knn", "supervised"], ["harl", "byol"], [0])
    assert {r.candidate[1] for r in validation if r.protocol == "knn"} == {10, 20, 50}
    assert {r.method for r in validation if r.protocol == "supervised"} == {"random"}
    assert {r.embedding for r in validation} == {"global"}


def test_execute_skips_what_is_done_and_resumes(tmp_path):
    layout = _layout(tmp_path)
    runs = report.plan("test", ["knn", "seg_probe"], report.METHODS, [0, 1])
    assert len(runs) == 2 * 2 * 3 * 2 + 2 * 3 * 2          # knn 24, seg_probe 12
    trainings = len(runs) // 2     # one run scores both the test and the unseen split
    calls = []
    # Some results are there before: a former, interrupted report.
    first = _fake_runner(_value, [])
    for run in runs[:5]:
        argv = report.command(run, layout)
        assert f"--extra_eval_files=unseen={layout.records('fmnist_scenes', 'gt', 'unseen')}" \
            in argv or run.embedding == "foreground"
        first(argv + [f"--output_dir={layout.output_dir(run, argv)}"], "")
    before = len({report.results_path(r, layout) for r in runs if os.path.exists(
        report.results_path(r, layout))})
    assert 1 <= before <= 5
    done = report.execute(runs, layout, runner=_fake_runner(_value, calls), keep_going=True)
    assert done["skipped"] == before and len(done["ran"]) == trainings - before == len(calls)
    again = report.execute(runs, layout, runner=_fake_runner(_value, calls))
    assert again["skipped"] == trainings and again["ran"] == []
    values = report.collect(runs, layout)
    knn = values[("knn", "fmnist_scenes", "test", "global")]
    assert knn["harl"] == {0: 0.5, 1: pytest.approx(0.51)}
    seg = values[("seg_probe", "fmnist_scenes", "unseen", "global")]
    assert seg["random"] == {0: pytest.approx(0.0), 1: pytest.approx(0.01)}
    drop = next(r for r in report.rows(values) if r["protocol"] == "knn"
                and r["eval_set"].startswith("drop") and r["embedding"] == "foreground")
    assert drop["statistics"]["byol"]["mean"] == pytest.approx(0.1)
    assert drop["statistics"]["byol"]["sd"] == pytest.approx(0.0, abs=1e-12)


def test_the_store_carries_finished_runs_to_another_machine(tmp_path):
    """Runs finished under one work and records folder are found, through the store, by a
    report whose folders, encoders' included, are elsewhere (a new machine): nothing
    reruns, same values."""
    store = str(tmp_path / "store")
    first = dataclasses.replace(_layout(tmp_path / "a"), store_dir=store)
    runs = report.plan("test", ["linear", "seg_probe"], ["harl", "byol"], [0, 1])
    report.execute(runs, first, runner=_fake_runner(_value, []))
    kept = [os.path.join(d, f) for d, _, files in os.walk(store) for f in files]
    assert len(kept) == len(runs) // 2 and all(k.endswith("results.json") for k in kept)
    elsewhere = dataclasses.replace(_layout(tmp_path / "b"), store_dir=store)
    calls = []
    done = report.execute(runs, elsewhere, runner=_fake_runner(_value, calls))
    assert calls == [] and done["skipped"] == len(runs) // 2
    assert report.collect(runs, elsewhere) == report.collect(runs, first)
    linear = report.collect(runs, elsewhere)[("linear", "fmnist_scenes", "unseen", "global")]
    assert linear["harl"] == {0: pytest.approx(0.4), 1: pytest.approx(0.41)}
    # Without the store, the new machine has nothing.
    assert report.read_value(runs[0], dataclasses.replace(elsewhere, store_dir=None)) is None


def test_reports_side_by_side_share_the_runs(tmp_path):
    """A second report started while the first is running its first run passes over that
    run (claimed) and runs the rest; the first then finds them finished and runs nothing
    more: every training runs once, and no claim is left behind."""
    layout = _layout(tmp_path)
    runs = report.plan("test", ["linear"], ["harl", "byol"], [0, 1])
    trainings = len(runs) // 2
    first_calls, second_calls, second = [], [], {}
    inner = _fake_runner(_value, first_calls)

    def first_runner(argv, log_path):
        if not second:    # the other report starts while this run is under way
            second.update(report.execute(runs, layout,
                                         runner=_fake_runner(_value, second_calls)))
        inner(argv, log_path)

    first = report.execute(runs, layout, runner=first_runner)
    assert len(first_calls) == 1 and len(second_calls) == trainings - 1
    assert first["ran"] == first_calls and second["ran"] == second_calls
    assert second["elsewhere"] == first_calls
    assert sorted(first["elsewhere"]) == sorted(second_calls)
    assert not set(first_calls) & set(second_calls)
    assert glob.glob(os.path.join(layout.work_dir, "**", "*.claim"), recursive=True) == []
    assert len(report.collect(runs, layout)[("linear", "fmnist_scenes", "test", "global")]
               ["harl"]) == 2


def test_a_claim_of_a_dead_process_is_taken_over(tmp_path):
    folder = str(tmp_path / "run")
    assert report.claim(folder) and not report.claim(folder)   # held by this live process
    report.release(folder)
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    with open(folder + ".claim", "w") as f:
        f.write(f"{socket.gethostname()} {dead.pid}")
    assert report.claim(folder)
    with open(folder + ".claim") as f:
        assert f.read() == f"{socket.gethostname()} {os.getpid()}"
    with open(folder + ".claim", "w") as f:    # another machine's claim is left alone
        f.write(f"elsewhere.example {dead.pid}")
    assert not report.claim(folder)


def test_failed_runs_are_listed_or_stop(tmp_path):
    layout = _layout(tmp_path)
    runs = report.plan("test", ["linear"], ["harl", "byol"], [0])
    calls = []
    done = report.execute(runs, layout, runner=_fake_runner(_value, calls, fail=("byol_s0",)))
    assert len(done["failed"]) == 2 and len(done["ran"]) == 2   # 2 embeddings, each
    # training scoring the test and the unseen-backgrounds splits
    assert all("byol_s0" in path for path in done["failed"])
    row = report.rows(report.collect(runs, layout))[0]
    assert row["statistics"]["byol"] is None and row["verdict"] == "–"
    with pytest.raises(SystemExit):
        report.execute(runs, layout, keep_going=False,
                       runner=_fake_runner(_value, [], fail=("byol_s0",)))
    # The failed runs are retried by the next report; the successful ones are not.
    retried = []
    report.execute(runs, layout, runner=_fake_runner(_value, retried))
    assert len(retried) == 2 and all("byol_s0" in path for path in retried)


def test_run_folder_follows_settings_not_comments(tmp_path, monkeypatch):
    layout = _layout(tmp_path)
    text = {"knn": "# k-NN\n--mode=knn\n--knn_k=20\n--image_size=64\n"}
    monkeypatch.setattr(report, "_flagfile_text", lambda name: text[name])
    run = report.Run("knn", "fmnist_scenes", "test", "global", "harl", 0)
    grid = report.Run("knn", "fmnist_scenes", "val", "global", "harl", 0, ("knn_k", 10))
    folder = lambda r: layout.output_dir(r, report.command(r, layout))  # noqa: E731
    before, before_grid = folder(run), folder(grid)
    text["knn"] = "# k-NN, another comment\n# Validation: chosen\n--mode=knn\n--knn_k=50\n" \
                  "--image_size=64\n"
    assert folder(grid) == before_grid     # the grid run overrides --knn_k anyway
    assert folder(run) != before           # a new setting is a new run
    text["knn"] = "# only comments changed\n--mode=knn\n--knn_k=20\n--image_size=64\n"
    assert folder(run) == before
    assert "knn_k=10" in os.path.basename(before_grid)


def test_a_retrained_encoder_is_a_new_run_and_a_recorded_one_is_found_without_its_weights(
        tmp_path):
    import hashlib
    layout = _layout(tmp_path)
    runs = report.plan("test", ["linear"], ["harl", "random"], [0])
    harl = next(r for r in runs if r.method == "harl")
    rand = next(r for r in runs if r.method == "random")
    folder = lambda r, lay=layout: lay.output_dir(r, report.command(r, lay))  # noqa: E731
    before, before_random = folder(harl), folder(rand)
    report.execute(runs, layout, runner=_fake_runner(_value, []))
    assert report.read_value(harl, layout) == pytest.approx(0.5)
    # Retrained: other weights at the same path. Its runs are new; random init (whose
    # weights the seed fixes, whatever HARL's are) keeps its results.
    _encoder(layout.encoder("harl", 0), b"harl 0, retrained")
    retrained = dataclasses.replace(layout, identities={})
    assert folder(harl, retrained) != before and folder(rand, retrained) == before_random
    assert report.read_value(harl, retrained) is None
    assert report.read_value(rand, retrained) == pytest.approx(0.1)
    # The encoder absent, its record (bench.keep_encoders' provenance) names the weights.
    elsewhere = dataclasses.replace(_layout(tmp_path / "b"), identities={},
                                    encoder_records=str(tmp_path / "rec" / "s{seed}" /
                                                        "{run}.json"))
    os.remove(os.path.join(elsewhere.encoder("harl", 0), "encoder.weights.h5"))
    os.rmdir(elsewhere.encoder("harl", 0))
    with pytest.raises(errors.MissingPathError, match="s0/hybrid_conventional.*no record"):
        folder(harl, elsewhere)
    sha = hashlib.sha256(b"harl 0").hexdigest()
    record = elsewhere.record("harl", 0)
    os.makedirs(os.path.dirname(record))
    with open(record, "w") as f:
        json.dump({"files": {"encoder.weights.h5": {"bytes": 6, "sha256": sha}}}, f)
    assert elsewhere.identity("harl", 0) == sha
    assert os.path.basename(folder(harl, elsewhere)) == os.path.basename(before)


def test_check_encoders_names_only_the_encoders_the_runs_read(tmp_path):
    layout = _layout(tmp_path)
    os.remove(os.path.join(layout.encoder("harl", 1), "encoder.weights.h5"))
    os.rmdir(layout.encoder("harl", 1))
    report.check_encoders(layout, report.plan("test", ["linear"], ["byol"], [0, 1]))
    report.check_encoders(layout, report.plan("test", ["supervised"], ["random"], [0]))
    with pytest.raises(errors.MissingPathError, match=r"1 encoders missing \(.*s1/hybrid_"):
        report.check_encoders(layout, report.plan("test", ["supervised"], ["random"], [1]))
    with pytest.raises(errors.MissingPathError, match="1 encoders missing"):
        report.check_encoders(layout, report.plan("test", ["knn"], report.METHODS, [0, 1]))


def test_encoder_weights_of_each_layout(tmp_path):
    export = tmp_path / "export" / "variables"
    export.mkdir(parents=True)
    (export / "variables.data-00000-of-00001").write_bytes(b"v")
    assert report.encoder_weights(str(tmp_path / "export")) == [
        str(export / "variables.data-00000-of-00001")]
    ckpt = tmp_path / "model_dir" / "checkpoints"
    ckpt.mkdir(parents=True)
    for step in (500, 1000):
        (ckpt / f"ckpt-{step}.data-00000-of-00001").write_bytes(b"c")
    (ckpt / "checkpoint").write_text('model_checkpoint_path: "ckpt-1000"\n'
                                     'all_model_checkpoint_paths: "ckpt-500"\n')
    assert report.encoder_weights(str(tmp_path / "model_dir")) == [
        str(ckpt / "ckpt-1000.data-00000-of-00001")]
    (tmp_path / "empty").mkdir()
    with pytest.raises(errors.MissingPathError, match="empty: no encoder weights"):
        report.encoder_weights(str(tmp_path / "empty"))


# Validation -------------------------------------------------------------------------------

def test_choose_takes_the_best_mean_of_a_complete_grid(tmp_path):
    layout = _layout(tmp_path, "validation")
    runs = report.plan("validation", ["knn", "linear"], ["harl", "byol"], [0])
    scores = {10: 0.30, 20: 0.34, 50: 0.34, 0.1: 0.2, 0.3: 0.25, 0.9: 0.1}

    def value(output_dir):
        leaf = os.path.basename(output_dir).split("-")[0]
        flag_value = float(leaf.split("=")[1])
        return scores[flag_value] + (0.02 if leaf.startswith("harl") else -0.02)
    runner = _fake_runner(value, [], fail=("linear/fmnist_scenes/val/global/byol_s0_"
                                           "learning_rate=0.9",))
    report.execute(runs, layout, runner=runner)
    scores_read = report.validation_scores(runs, layout)
    chosen = report.choose(scores_read)
    assert set(chosen) == {"knn"}          # linear's grid is incomplete: not chosen
    assert chosen["knn"]["value"] == 20    # tied with 50: the first listed
    assert chosen["knn"]["means"][10] == pytest.approx(0.30)
    assert chosen["knn"]["runs_per_value"] == 2
    assert chosen["knn"]["methods"] == ["harl", "byol"]   # the methods that were scored
    assert not chosen["knn"]["at_edge"]    # 20: inside the grid 10, 20, 50
    table = report.validation_markdown(scores_read, chosen)
    cells = [[c.strip() for c in line.strip("|").split("|")] for line in table.splitlines()]
    assert cells[0][2:5] == ["HARL hybrid", "BYOL", "mean"]   # no random column
    assert cells[2] == ["k-NN", "--knn_k=10", "0.3200", "0.2800", "0.3000", ""]
    assert cells[3] == ["k-NN", "--knn_k=20", "0.3600", "0.3200", "0.3400", "**chosen**"]
    assert cells[4][4:] == ["0.3400", ""]
    assert cells[7] == ["linear probe", "--learning_rate=0.9", "0.1200", "–", "–",
                        "grid incomplete"]
    scores[50] = 0.35                      # now the largest value is best: at the edge
    elsewhere = _layout(tmp_path / "b", "validation")
    report.execute(runs, elsewhere, runner=runner)
    scores_elsewhere = report.validation_scores(runs, elsewhere)
    edge = report.choose(scores_elsewhere)["knn"]
    assert edge["value"] == 50 and edge["at_edge"]
    edge_table = report.validation_markdown(scores_elsewhere, {"knn": edge})
    assert edge_table.splitlines()[4].rstrip(" |").endswith("**chosen**, at the grid's edge")


def test_update_flagfile():
    text = "# k-NN\n--mode=knn\n--knn_k=20\n--image_size=64\n"
    once = report.update_flagfile(text, "knn_k", 50, "chosen on validation: 50 best")
    assert once == ("# k-NN\n--mode=knn\n# Validation: chosen on validation: 50 best\n"
                    "--knn_k=50\n--image_size=64\n")
    twice = report.update_flagfile(once, "knn_k", 10, "again")
    assert twice.count("# Validation:") == 1 and "--knn_k=10\n" in twice
    assert "--knn_k=50" not in twice
    with pytest.raises(errors.ConfigError, match="--learning_rate"):
        report.update_flagfile(text, "learning_rate", 0.1, "x")


def test_shipped_flagfiles_fit_their_protocols(monkeypatch):
    report.check_flagfiles([p.name for p in report.PROTOCOLS])
    wrong = report.Protocol("seg_probe", "x", "flags/eval_segmentation_fcn.cfg",
                            "segmentation", ("learning_rate", (0.1,)), head="probe")
    monkeypatch.setitem(report.BY_NAME, "seg_probe", wrong)
    with pytest.raises(errors.ConfigError, match="eval_segmentation_fcn.cfg.*probe"):
        report.check_flagfiles(["seg_probe"])


def test_carve_validation_is_class_balanced_and_disjoint(tmp_path):
    from bench.common.data import write_example_records
    from harl_tf.downstream import subsets
    layout = _layout(tmp_path, "validation")
    test_layout = _layout(tmp_path)
    rng = np.random.default_rng(0)
    labels = np.repeat(np.arange(3), 20)
    for masks in ("gt", "conventional"):
        path = test_layout.records("digits_scenes", masks, "train").replace("*", "00000")
        examples = [(f"train/{i:03d}", rng.integers(0, 255, (8, 8, 3), dtype=np.uint8),
                     np.ones((8, 8), np.uint8), int(label)) for i, label in enumerate(labels)]
        write_example_records(path, examples, jpeg_quality=90)
    counts = report.carve_validation(layout, ["digits_scenes"], 0.2)
    assert counts == {"digits_scenes": {"train": 48, "val": 12}}
    parts = {}
    for masks in ("gt", "conventional"):
        for part in ("train", "val"):
            ids, part_labels = subsets.read_ids_and_labels(
                layout.records("digits_scenes", masks, part))
            parts[masks, part] = set(ids)
            if part == "val":
                assert np.bincount(part_labels).tolist() == [4, 4, 4]
    assert parts["gt", "val"] == parts["conventional", "val"]      # one split, both masks
    assert not parts["gt", "val"] & parts["gt", "train"]
    assert len(parts["gt", "val"] | parts["gt", "train"]) == 60
