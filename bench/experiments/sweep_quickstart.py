r"""Recipe sweep for the quickstart, on an independent sample of the synthetic set.

    python -m bench.experiments.sweep_quickstart --work_dir=/tmp/harl_sweep_qs \
        [--configs=base,no_blur]

Every configuration is one ``python -m tools.quickstart --data_seed=1`` run (the quickstart's
own binaries, budget and probes) with ``flags/quickstart.cfg`` plus the configuration's
flags. ``--data_seed=1`` renders a training and a held-out split of their own from the same
distribution as the quickstart's default set (seed 0), so the default set's held-out split
is never read while choosing. The records are built once, by the first configuration, and
shared. Each configuration reports the linear-probe and k-NN top-1 of its pretrained encoder
and of the random-init encoder; ``bench/results/sweep_quickstart.json`` holds the table
the quickstart's flags were chosen from (BENCHMARKS.md, "Quickstart").
"""
from __future__ import annotations

import json
import os
import sys
import time

from absl import app, flags

from bench import common

FLAGS = flags.FLAGS
flags.DEFINE_string("work_dir", "/tmp/harl_sweep_quickstart", "One sub-folder per config.")
flags.DEFINE_list("configs", [], "Configurations to run (default: all).")
flags.DEFINE_integer("data_seed", 1, "Seed of the synthetic sample the sweep uses (the "
                     "quickstart's own set is seed 0).")
flags.DEFINE_string("results_name", "sweep_quickstart", "Results file stem.")

# name → flags added after flags/quickstart.cfg.
CONFIGS = {
    "base": [],
    "no_blur": ["--blur_prob_scale=0"],
    "crop_0.25": ["--min_crop_area=0.25"],
    "no_blur_crop_0.25": ["--blur_prob_scale=0", "--min_crop_area=0.25"],
    "tau_0.996": ["--tau_base=0.996"],
    "lr_0.5": ["--base_learning_rate=0.5"],
}


def run_config(name: str, extra: list, shared_records: str) -> dict:
    work = os.path.join(FLAGS.work_dir, name)
    os.makedirs(work, exist_ok=True)
    for kind in ("records", "records_gt"):  # build once, share (the builder resumes)
        source, target = os.path.join(shared_records, kind), os.path.join(work, kind)
        if os.path.isdir(source) and not os.path.exists(target) and source != target:
            os.symlink(source, target)
    flagfile = os.path.join(work, "pretrain.cfg")
    with open(flagfile, "w", encoding="utf-8") as handle:
        recipe = os.path.join(common.ROOT, "flags", "quickstart.cfg")
        handle.write("\n".join([f"--flagfile={recipe}", *extra]) + "\n")
    summary_path = os.path.join(work, "summary.json")
    if not os.path.exists(summary_path):
        command = [sys.executable, "-m", "tools.quickstart", f"--work_dir={work}",
                   f"--data_seed={FLAGS.data_seed}", f"--pretrain_flagfile={flagfile}"]
        common.run(command, os.path.join(FLAGS.work_dir, f"{name}.log"))
    with open(summary_path, encoding="utf-8") as handle:
        summary = json.load(handle)
    row = {"flags": extra,
           "linear_pretrained": summary["linear_probe_top1_pretrained"],
           "linear_random_init": summary["linear_probe_top1_random_init"],
           "knn_pretrained": summary["knn_top1_pretrained"],
           "knn_random_init": summary["knn_top1_random_init"],
           "pretrain_seconds": summary["seconds"]["pretrain"]}
    row["linear_gain"] = round(row["linear_pretrained"] - row["linear_random_init"], 4)
    row["knn_gain"] = round(row["knn_pretrained"] - row["knn_random_init"], 4)
    print(name, json.dumps(row), flush=True)
    return row


def main(argv) -> None:
    del argv
    names = common.chosen_configs(FLAGS.configs, list(CONFIGS))
    os.makedirs(FLAGS.work_dir, exist_ok=True)
    shared = os.path.join(FLAGS.work_dir, names[0])
    machine = common.machine_info()
    started = time.time()
    rows = {name: run_config(name, CONFIGS[name], shared) for name in names}
    path = os.path.join(common.RESULTS_DIR, f"{FLAGS.results_name}.json")
    previous = {}
    if os.path.exists(path):  # keep configurations of earlier invocations
        with open(path, encoding="utf-8") as handle:
            previous = json.load(handle).get("configs", {})
    previous.update(rows)
    common.write_result(FLAGS.results_name, {
        "data_seed": FLAGS.data_seed, "machine": machine,
        "seconds": round(time.time() - started, 1), "configs": previous})
    print(common.table(
        [[name, f"{r['linear_pretrained']:.3f} / {r['linear_random_init']:.3f}",
          f"{100 * r['linear_gain']:+.1f}",
          f"{r['knn_pretrained']:.3f} / {r['knn_random_init']:.3f}",
          f"{100 * r['knn_gain']:+.1f}"] for name, r in previous.items()],
        ["config", "linear pretrained / random", "gain", "k-NN pretrained / random", "gain"]))


if __name__ == "__main__":
    app.run(main)
