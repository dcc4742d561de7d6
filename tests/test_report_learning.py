"""bench.report_learning's inputs: methods taken from chosen files, and a seed counted twice
or a run of another recipe refused."""
import json

import pytest
from absl import app

from bench import report_learning

BUDGET = {"steps": 1000, "batch_size": 128, "seed": 0}
EVALUATION = {"knn": {"k": 20}}


def _result(tmp_path, name, seed, methods, **budget):
    path = tmp_path / f"{name}.json"
    path.write_text(json.dumps({
        "budget": dict(BUDGET, seed=seed, **budget), "evaluation": EVALUATION,
        "methods": {m: {"knn_top1": v, "linear_top1": v + 0.1} for m, v in methods.items()}}))
    return str(path)


def test_methods_are_taken_from_the_files_named_and_a_seed_counts_once(tmp_path):
    kept = [_result(tmp_path, f"kept{s}", s, {"hybrid_conventional": 0.26 + s / 100,
                                               "byol": 0.2}) for s in range(3)]
    deep0 = _result(tmp_path, "deep0", 0, {"hybrid_conventional": 0.9, "hybrid_deep": 0.25})
    deep1 = _result(tmp_path, "deep1", 1, {"hybrid_deep": 0.27})
    runs = report_learning.load_runs([k + ":hybrid_conventional" for k in kept]
                                      + [deep0 + ":hybrid_deep", deep1])
    conventional = [r["methods"]["hybrid_conventional"]["knn_top1"] for r in runs
                    if "hybrid_conventional" in r["methods"]]
    deep = [r["methods"]["hybrid_deep"]["knn_top1"] for r in runs if "hybrid_deep" in r["methods"]]
    assert conventional == pytest.approx([0.26, 0.27, 0.28]) and deep == [0.25, 0.27]
    assert all("byol" not in r["methods"] for r in runs)

    with pytest.raises(app.UsageError, match="hybrid_conventional seed 0 is in both .*kept0"
                                             ".*deep0"):
        report_learning.load_runs(kept + [deep0])
    with pytest.raises(app.UsageError, match=r"has no method \['mask_conventional'\]"):
        report_learning.load_runs([deep1 + ":mask_conventional"])


def test_runs_of_another_recipe_or_a_missing_file_are_refused(tmp_path):
    a = _result(tmp_path, "a", 0, {"byol": 0.2})
    b = _result(tmp_path, "b", 1, {"byol": 0.2}, steps=300)
    with pytest.raises(app.UsageError, match="b.json was run with another recipe"):
        report_learning.load_runs([a, b])
    with pytest.raises(app.UsageError, match="cannot read .*missing.json"):
        report_learning.load_runs([a, str(tmp_path / "missing.json")])
