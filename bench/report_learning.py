r"""Seeds of the fmnist-scenes learning benchmark, side by side: mean ± sd per method.

    python -m bench.report_learning \
        --inputs=bench/results/bench_learning_fmnist_scenes_s0.json,...s1.json,...s2.json

Each input is one ``python -m bench.bench_learning --dataset=fmnist_scenes`` result (one seed,
scored on the test split), or ``FILE:METHOD+METHOD`` to take only those methods from it —
for sets pretrained in different runs, such as the kept conventional encoders beside the
deep-mask ones:

    python -m bench.report_learning --results_name=bench_learning_fmnist_scenes_8x8_deep \
        --inputs=KEPT_S0.json:hybrid_conventional,...,DEEP_S0.json:hybrid_deep,DEEP_S1.json,...

(docs/results.md has it in full).

A method given twice for one seed is an error naming both files: a seed counted twice
would shrink the sd. For every method and metric the table gives the mean over the
seeds that ran it, the sample standard deviation and the count; the comparisons give the
difference of means and the pooled standard deviation of the two methods' seeds,
sqrt((s_a² + s_b²) / 2), which the issue's "more than one pooled sd apart" is measured
against. Writes ``bench/results/<results_name>.json``.
"""
from __future__ import annotations

import json
import math

from absl import app, flags

from bench import common

FLAGS = flags.FLAGS
flags.DEFINE_list("inputs", [], "bench_learning result JSON files, one per seed.")
flags.DEFINE_string("results_name", "bench_learning_fmnist_scenes", "Results file stem.")
flags.DEFINE_list("compare", ["hybrid_conventional:byol", "byol:random",
                              "hybrid_conventional:random", "hybrid_ground_truth:byol",
                              "mask_conventional:byol", "hybrid_deep:hybrid_conventional"],
                  "a:b pairs whose difference of means is reported.")

METRICS = ("knn_top1", "linear_top1", "knn_mixed_rand_top1", "linear_mixed_rand_top1",
           "knn_background_gap", "linear_background_gap", "supervised_top1")


def _recipe(run: dict) -> dict:
    return {k: v for k, v in run["budget"].items() if k != "seed"}


def load_runs(inputs) -> list:
    """The bench_learning results named by ``inputs`` (``FILE`` or ``FILE:M1+M2``), each
    with only the methods asked for. Raises UsageError for a method absent from its file
    or one seed of a method given twice, and for runs of other budgets or evaluations
    (recipes that differ beyond the seed are not seeds of one method)."""
    runs, seen, first = [], {}, inputs[0].partition(":")[0]
    for item in inputs:
        path, _, wanted = item.partition(":")
        try:
            with open(path) as f:
                run = json.load(f)
        except (OSError, ValueError) as e:
            raise app.UsageError(f"--inputs: cannot read {path}: {e}") from None
        if runs and (_recipe(run) != _recipe(runs[0])
                     or run["evaluation"] != runs[0]["evaluation"]):
            raise app.UsageError(f"--inputs: {path} was run with another recipe or "
                                 f"evaluation than {first}")
        if wanted:
            wanted = wanted.split("+")
            missing = [m for m in wanted if m not in run["methods"]]
            if missing:
                raise app.UsageError(f"--inputs: {path} has no method {missing}; it has "
                                     f"{sorted(run['methods'])}")
            run["methods"] = {m: run["methods"][m] for m in wanted}
        seed = run["budget"]["seed"]
        for method in run["methods"]:
            if (method, seed) in seen:
                raise app.UsageError(
                    f"--inputs: {method} seed {seed} is in both {seen[method, seed]} and "
                    f"{path}; take it from one (FILE:METHOD+METHOD)")
            seen[method, seed] = path
        runs.append(run)
    return runs


def main(argv) -> None:
    del argv
    if not FLAGS.inputs:
        raise app.UsageError("--inputs: give at least one bench_learning result file")
    runs = load_runs(FLAGS.inputs)
    methods = []
    for run in runs:
        methods += [m for m in run["methods"] if m not in methods]
    stats = {m: {k: common.summarise([r["methods"][m].get(k) for r in runs
                                      if m in r["methods"]])
                 for k in METRICS} for m in methods}
    cell = common.format_summary
    rows = [[m, cell(stats[m]["knn_top1"]),
             cell(stats[m]["linear_top1"] or stats[m]["supervised_top1"]),
             cell(stats[m]["knn_mixed_rand_top1"]), cell(stats[m]["knn_background_gap"]),
             cell(stats[m]["linear_mixed_rand_top1"]), cell(stats[m]["linear_background_gap"])]
            for m in methods]
    table = common.table(rows, ["method", "k-NN top-1", "linear top-1",
                                "k-NN mixed_rand", "k-NN gap", "linear mixed_rand",
                                "linear gap"])
    print(table)
    comparisons = {}
    for pair in FLAGS.compare:
        a, b = pair.split(":")
        if a not in stats or b not in stats:
            continue
        comparisons[pair] = {}
        for k in ("knn_top1", "linear_top1", "knn_background_gap", "linear_background_gap"):
            sa, sb = stats[a][k], stats[b][k]
            if sa is None or sb is None:
                continue
            pooled = (math.sqrt(((sa["sd"] or 0.0) ** 2 + (sb["sd"] or 0.0) ** 2) / 2)
                      if sa["sd"] is not None and sb["sd"] is not None else None)
            comparisons[pair][k] = {"difference": sa["mean"] - sb["mean"],
                                    "pooled_sd": pooled}
            print(f"{pair:<34} {k:<22} {sa['mean'] - sb['mean']:+.3f}"
                  + (f"  (pooled sd {pooled:.3f})" if pooled is not None else ""))
    common.write_result(FLAGS.results_name, {
        "inputs": FLAGS.inputs, "seeds": sorted({r["budget"]["seed"] for r in runs}),
        "budget": runs[0]["budget"], "evaluation": runs[0]["evaluation"],
        "statistics": stats, "comparisons": comparisons, "table_markdown": table,
        "machine": common.machine_info()})


if __name__ == "__main__":
    app.run(main)
