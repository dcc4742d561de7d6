r"""The CPU-scale recipe sweep on fmnist-scenes, scored on a validation split carved from train.

    python -m bench.sweep_learning --records_dir=/tmp/hb/records --work_dir=/tmp/hb/sweep
    python -m bench.sweep_learning ... --configs=byol_solo,hybrid_solo --parallel=2

Every configuration is one ``python -m bench.bench_learning --dataset=fmnist_scenes
--eval_split=validation`` invocation with its own work dir (records are shared through
``--records_dir``): pretraining sees the 8,000 train images left after holding out 2,000
(a fixed permutation), and the k-NN and linear probes are fit on those 8,000 and scored on
the 2,000 held-out ones. The test split is never read. Every configuration runs the recipe
``flags/bench_fmnist_scenes_sweep.cfg`` plus its own pretraining flags (CONFIGS); the table
(written to ``bench/results/sweep_fmnist_scenes.json``) is what the recipe in
``flags/fmnist_scenes_*.cfg`` was chosen from. Each configuration is resumable
(bench_learning skips finished stages), so the sweep can be re-run with more ``--configs``.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import time

from absl import app, flags

from bench import common

FLAGS = flags.FLAGS
flags.DEFINE_string("records_dir", "/tmp/harl_bench_records", "Shared records.")
flags.DEFINE_string("work_dir", "/tmp/harl_sweep", "One sub-folder per configuration.")
flags.DEFINE_list("configs", [], "Configurations to run (default: all).")
flags.DEFINE_integer("parallel", 1, "Configurations run at once.")
flags.DEFINE_string("results_name", "sweep_fmnist_scenes", "Results file stem.")
flags.DEFINE_enum("eval_background", "original", ["original", "both"],
                  "both: also score every configuration on mixed_rand backgrounds (the held-out "
                  "images' objects on another class's background) and report the gap.")

# The budget every configuration shares; each adds its own harl_tf.pretrain flags.
RECIPE_FLAGFILE = "flags/bench_fmnist_scenes_sweep.cfg"
NO_BLUR_CROP025 = "--blur_prob_scale=0 --min_crop_area=0.25"

# name → (methods of bench_learning, harl_tf.pretrain flags after the recipe).
CONFIGS = {
    "random": (["random"], ""),
    "byol_imagenet_lars": (["byol"], "--base_learning_rate=0.5 --trust_coefficient=0.001 "
                                     "--weight_decay=1e-06"),
    "byol_solo": (["byol"], ""),
    "byol_solo_lr2": (["byol"], "--base_learning_rate=2.0"),
    "byol_solo_tau096": (["byol"], "--tau_base=0.96"),
    "hybrid_solo": (["hybrid_conventional"], ""),
    "hybrid_solo_alpha1": (["hybrid_conventional"], "--alpha_base=1.0"),
    "mask_solo": (["mask_conventional"], ""),
    "hybrid_solo_tau096": (["hybrid_conventional"], "--tau_base=0.96"),
    "byol_solo_cj4": (["byol"], "--color_jitter_strength=4"),
    "hybrid_solo_cj4": (["hybrid_conventional"], "--color_jitter_strength=4"),
    "byol_solo_cj2": (["byol"], "--color_jitter_strength=2"),
    "hybrid_solo_cj2": (["hybrid_conventional"], "--color_jitter_strength=2"),
    "hybrid_solo_validbn": (["hybrid_conventional"], "--valid_region_batchnorm"),
    "byol_solo_noblur": (["byol"], "--blur_prob_scale=0"),
    "hybrid_solo_noblur": (["hybrid_conventional"], "--blur_prob_scale=0"),
    "byol_solo_noblur_crop025": (["byol"], NO_BLUR_CROP025),
    "hybrid_solo_noblur_crop025": (["hybrid_conventional"], NO_BLUR_CROP025),
    # Feature-map size (issue #15, point 4): 64 px views, an 8x8 map (output stride 8) and a
    # 4x4 one (output stride 16, the resolution control), BYOL's views as in byol_solo.
    "random_64os8": (["random"], "--image_size=64 --output_stride=8"),
    "random_64os16": (["random"], "--image_size=64 --output_stride=16"),
    "byol_solo_64os8": (["byol"], "--image_size=64 --output_stride=8"),
    "hybrid_solo_64os8": (["hybrid_conventional"], "--image_size=64 --output_stride=8"),
    "byol_solo_64os16": (["byol"], "--image_size=64 --output_stride=16"),
    "hybrid_solo_64os16": (["hybrid_conventional"], "--image_size=64 --output_stride=16"),
    # alpha and lambda held at 0.7 (the cosine rise ends with the foreground term alone).
    "hybrid_solo_constant": (["hybrid_conventional"],
                             "--alpha_schedule=constant --lambda_schedule=constant"),
    # The views at the test tables' budget: BYOL's views against the quickstart's (no blur,
    # crop floor 0.25), 1,000 steps (16 epochs of the 8,000 images).
    "byol_solo_1000": (["byol"], "--train_steps=1000"),
    "hybrid_solo_1000": (["hybrid_conventional"], "--train_steps=1000"),
    "byol_solo_noblur_crop025_1000": (["byol"], f"--train_steps=1000 {NO_BLUR_CROP025}"),
    "hybrid_solo_noblur_crop025_1000": (["hybrid_conventional"],
                                        f"--train_steps=1000 {NO_BLUR_CROP025}"),
    # The 8x8 map (64 px views, output stride 8) with the quickstart's views at 1,000 steps:
    # where the foreground pool describes the object (bench.experiments.bench_background_leakage).
    "byol_solo_64os8_noblur_crop025_1000": (["byol"], "--image_size=64 --output_stride=8 "
                                            f"--train_steps=1000 {NO_BLUR_CROP025}"),
    "hybrid_solo_64os8_noblur_crop025_1000": (["hybrid_conventional"],
                                              "--image_size=64 --output_stride=8 "
                                              f"--train_steps=1000 {NO_BLUR_CROP025}"),
    "byol_solo_lr2_tau096": (["byol"], "--base_learning_rate=2.0 --tau_base=0.96"),
    "hybrid_solo_lr2_tau096": (["hybrid_conventional"],
                               "--base_learning_rate=2.0 --tau_base=0.96"),
}

# The two 8x8 configurations in bfloat16 mixed precision (0.65x the float32 step time of
# this encoder at 64 px, bench_training_speed_fmnist_8x8.json): does the cheaper step learn
# the same? Each is its float32 twin plus the one flag.
for _name in ("byol_solo_64os8_noblur_crop025_1000", "hybrid_solo_64os8_noblur_crop025_1000"):
    _methods, _flags = CONFIGS[_name]
    CONFIGS[_name + "_bf16"] = (_methods, _flags + " --mixed_precision=mixed_bfloat16")


def command(name: str) -> list:
    methods, extra = CONFIGS[name]
    return [sys.executable, "-m", "bench.bench_learning", "--dataset=fmnist_scenes",
            "--eval_split=validation", f"--records_dir={FLAGS.records_dir}",
            f"--work_dir={os.path.join(FLAGS.work_dir, name)}",
            f"--methods={','.join(methods)}", "--stages=build,pretrain,evaluate",
            f"--results_name=sweep_{name}", f"--eval_background={FLAGS.eval_background}",
            f"--recipe_flagfile={RECIPE_FLAGFILE}", f"--extra_pretrain_flags={extra}"]


def read_row(name: str):
    methods, extra = CONFIGS[name]
    evals = os.path.join(FLAGS.work_dir, name, "evals")
    row = {"config": name, "method": methods[0], "extra_pretrain_flags": extra}
    for mode in ("knn", "linear"):
        path = os.path.join(evals, f"{methods[0]}_{mode}", "results.json")
        if not os.path.exists(path):
            return None
        with open(path) as f:
            result = json.load(f)
        row[f"{mode}_top1"] = result["top1"]
        row.update(common.background_fields(mode, result))
    summary = os.path.join(FLAGS.work_dir, name, "runs", methods[0], "summary.json")
    if os.path.exists(summary):
        with open(summary) as f:
            s = json.load(f)
        row["pretrain_minutes"] = round(s["wall_seconds"] / 60, 2)
    return row


def main(argv) -> None:
    del argv
    names = common.chosen_configs(FLAGS.configs, list(CONFIGS))
    os.makedirs(FLAGS.work_dir, exist_ok=True)
    # Build the shared records once, before configurations run side by side.
    common.run([sys.executable, "-m", "bench.bench_learning", "--dataset=fmnist_scenes",
                "--eval_split=validation", f"--records_dir={FLAGS.records_dir}",
                f"--work_dir={os.path.join(FLAGS.work_dir, '_build')}", "--stages=build"],
               os.path.join(FLAGS.work_dir, "_build.log"))
    pending, running = [n for n in names if read_row(n) is None], []
    while pending or running:
        while pending and len(running) < FLAGS.parallel:
            name = pending.pop(0)
            log = open(os.path.join(FLAGS.work_dir, f"{name}.log"), "w")
            print(f"start {name} ({time.strftime('%H:%M:%S')})", flush=True)
            running.append((name, subprocess.Popen(command(name), stdout=log,
                                                   stderr=subprocess.STDOUT, cwd=common.ROOT),
                            log))
        time.sleep(5)
        for item in list(running):
            name, process, log = item
            if process.poll() is not None:
                log.close()
                running.remove(item)
                print(f"done {name}: exit {process.returncode} "
                      f"({time.strftime('%H:%M:%S')})", flush=True)
    rows = [r for r in (read_row(n) for n in CONFIGS) if r]
    table = common.table([[r["config"], r["knn_top1"], r["linear_top1"],
                           r.get("knn_background_gap", "–"),
                           r.get("linear_background_gap", "–"),
                           r.get("pretrain_minutes")] for r in rows],
                         ["config", "val k-NN top-1", "val linear top-1", "k-NN mixed_rand gap",
                          "linear mixed_rand gap", "pretrain min"])
    print(table)
    common.write_result(FLAGS.results_name, {
        "dataset": "fmnist_scenes", "split": "validation: 2,000 of the train images held out "
        "(fixed permutation, seed 0); pretraining and probe fitting on the other 8,000",
        "recipe_flagfile": RECIPE_FLAGFILE, "eval_background": FLAGS.eval_background, "rows": rows,
        "table_markdown": table,
        "parallel": FLAGS.parallel, "machine": common.machine_info()})


if __name__ == "__main__":
    app.run(main)
