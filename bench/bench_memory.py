r"""Peak memory (RSS) of the TFRecord builder and of a short pretraining, as subprocesses.

    python -m bench.bench_memory \
        --records='/tmp/harl_bench_learning/records/cutouts_gt/train-*.tfrecord'

Each case runs the real binary (``python -m tools.build_tfrecords`` / ``python -m
harl_tf.pretrain``) under a small wrapper process, and is measured two ways:

- ``peak_rss_mb``: ``resource.getrusage(RUSAGE_CHILDREN).ru_maxrss`` read by the wrapper
  after the binary exits: the largest peak RSS of any ONE process of the run (the binary or
  one of its workers) — what the kernel accounts, no sampling gaps;
- ``peak_tree_rss_mb``: the binary and all its descendants' RSS summed, sampled every 50 ms
  from /proc (psutil, ``common.PeakRss``) — what the run needs at once (shared pages
  counted in each process, so an upper bound when workers fork).

Builder: a folder of the first N and 2N images (+ exact masks) of a cutouts split
(symlinks), masks read from the folder and masks computed by ``--mask_method=conventional``,
2 workers: the peak should not grow with N (the builder streams). Pretraining: the
``bench_learning`` configuration (ResNet-18, 64 px, batch 64 and 128) and ResNet-50 at
112 px, batch 16 (SPEC heads 4096/512), a few steps each.
Writes ``bench/results/bench_memory.json``.
"""
from __future__ import annotations

import glob
import json
import os
import shutil
import subprocess
import sys
import tempfile

from absl import app, flags

from bench import common

FLAGS = flags.FLAGS
flags.DEFINE_string("cutouts_dir", "../shared/data/cutouts", "cutouts dataset root.")
flags.DEFINE_string("split", "train", "Split whose first images the builder cases use.")
flags.DEFINE_integer("n", 500, "N (the builder runs N and 2N images).")
flags.DEFINE_string("records", "/tmp/harl_bench_learning/records/cutouts_gt/train-*.tfrecord",
                    "Records for the pretraining cases (built on the fly when none match).")
flags.DEFINE_integer("pretrain_steps", 10, "Steps of each pretraining case.")
flags.DEFINE_list("cases", ["builder", "pretrain"], "builder, pretrain.")
flags.DEFINE_string("results_name", "bench_memory", "Results file stem.")

# Runs argv[1:], then prints the children's peak RSS (KiB on Linux) as JSON.
_WRAPPER = ("import json, resource, subprocess, sys, time; t = time.time(); "
            "code = subprocess.run(sys.argv[1:]).returncode; "
            "print(json.dumps({'code': code, 'seconds': time.time() - t, 'maxrss_kb': "
            "resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss}))")

PRETRAIN_CASES = {
    # name: flags (the bench_learning configuration, then ResNet-50 with SPEC heads)
    "resnet18_64px_batch64": ["--depth=18", "--image_size=64", "--output_stride=16",
                              "--batch_size=64", "--projector_hidden_dim=1024",
                              "--projection_dim=256", "--predictor_hidden_dim=1024"],
    "resnet18_64px_batch128": ["--depth=18", "--image_size=64", "--output_stride=16",
                               "--batch_size=128", "--projector_hidden_dim=1024",
                               "--projection_dim=256", "--predictor_hidden_dim=1024"],
    "resnet50_112px_batch16": ["--depth=50", "--image_size=112", "--output_stride=32",
                               "--batch_size=16", "--projector_hidden_dim=4096",
                               "--projection_dim=512", "--predictor_hidden_dim=4096"],
}


def measure(command, log_path) -> dict:
    """Runs ``command`` under the wrapper; returns seconds and both peak RSS figures."""
    print(f"$ {' '.join(command)}", flush=True)
    with open(log_path, "w") as log:
        wrapper = subprocess.Popen([sys.executable, "-c", _WRAPPER] + command,
                                   stdout=subprocess.PIPE, stderr=log, text=True,
                                   cwd=common.ROOT)
        # The binary and its descendants, not the wrapper itself.
        with common.PeakRss(wrapper.pid, include_self=False) as peak:
            out, _ = wrapper.communicate()
    lines = [line for line in out.splitlines() if line.startswith("{\"code\"")]
    if wrapper.returncode != 0 or not lines:
        raise SystemExit(f"wrapper failed: {' '.join(command)} (log {log_path})")
    figures = json.loads(lines[-1])
    if figures["code"] != 0:
        with open(log_path) as f:
            tail = f.read()[-2000:]
        raise SystemExit(f"failed ({figures['code']}): {' '.join(command)}\n{tail}")
    return {"seconds": round(figures["seconds"], 1),
            "peak_rss_mb": round(figures["maxrss_kb"] / 1024, 1),
            "peak_tree_rss_mb": round(peak.tree / 2**20, 1)}


def _folder(root: str, count: int) -> str:
    """First ``count`` images (sorted, classes interleaved) of the split, as symlinks."""
    split = os.path.join(FLAGS.cutouts_dir, FLAGS.split)
    images = sorted(glob.glob(os.path.join(split, "images", "*", "*.jpg")))
    # Interleave classes so every class is present whatever N.
    by_class = {}
    for path in images:
        by_class.setdefault(os.path.basename(os.path.dirname(path)), []).append(path)
    chosen = [p for group in zip(*by_class.values()) for p in group][:count]
    if len(chosen) < count:
        raise SystemExit(f"{split} has only {len(chosen)} images interleaved; lower --n.")
    out = os.path.join(root, f"folder{count}")
    for path in chosen:
        mask = path.replace(f"{os.sep}images{os.sep}", f"{os.sep}masks{os.sep}")[:-4] + ".png"
        for src in (path, mask):
            dst = os.path.join(out, os.path.relpath(src, split))
            os.makedirs(os.path.dirname(dst), exist_ok=True)
            os.symlink(src, dst)
    return out


def builder_cases(work: str) -> list:
    runs = []
    for count in (FLAGS.n, 2 * FLAGS.n):
        folder = _folder(work, count)
        for masks, extra in (("given", ["--mask_method_name=ground_truth"]),
                             ("conventional", ["--mask_method=conventional"])):
            out = os.path.join(work, f"records_{count}_{masks}")
            figures = measure([sys.executable, "-m", "tools.build_tfrecords", "--source=folder",
                               f"--images_dir={folder}", f"--output_dir={out}",
                               "--num_workers=2", "--noprogress"] + extra,
                              os.path.join(work, f"build_{count}_{masks}.log"))
            figures.update(case="build_tfrecords", masks=masks, images=count, workers=2)
            print(json.dumps(figures), flush=True)
            runs.append(figures)
            shutil.rmtree(out, ignore_errors=True)
    return runs


def pretrain_cases(work: str) -> list:
    records = FLAGS.records
    if not glob.glob(records):
        folder = _folder(work, FLAGS.n)
        out = os.path.join(work, "pretrain_records")
        common.run([sys.executable, "-m", "tools.build_tfrecords", "--source=folder",
                    f"--images_dir={folder}", f"--output_dir={out}",
                    "--mask_method_name=ground_truth", "--noprogress"],
                   os.path.join(work, "build_pretrain_records.log"))
        records = os.path.join(out, "train-*.tfrecord")
    runs = []
    for name, case_flags in PRETRAIN_CASES.items():
        model_dir = os.path.join(work, f"model_{name}")
        figures = measure([sys.executable, "-m", "harl_tf.pretrain", f"--train_files={records}",
                           f"--model_dir={model_dir}", "--loss_mode=hybrid",
                           f"--train_steps={FLAGS.pretrain_steps}", "--num_train_examples=3000",
                           "--shuffle_buffer=3000", "--seed=0", "--num_classes=8",
                           "--log_every_steps=5", "--checkpoint_every_steps=1000",
                           "--image_summaries=0"] + case_flags,
                          os.path.join(work, f"pretrain_{name}.log"))
        with open(os.path.join(model_dir, "summary.json")) as f:
            summary = json.load(f)
        figures.update(case="pretrain", config=name, flags=case_flags,
                       steps=summary["final_step"],
                       images_per_second=round(summary["images_per_second"], 2))
        print(json.dumps(figures), flush=True)
        runs.append(figures)
        shutil.rmtree(model_dir, ignore_errors=True)
    return runs


def main(argv) -> None:
    del argv
    machine = common.machine_info()
    print(common.describe_machine(machine), flush=True)
    runs = []
    work = tempfile.mkdtemp(prefix="harl_bench_memory_")
    try:
        if "builder" in FLAGS.cases:
            runs += builder_cases(work)
        if "pretrain" in FLAGS.cases:
            runs += pretrain_cases(work)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    rows = [[r["case"], r.get("masks") or r.get("config"), r.get("images", r.get("steps")),
             r["peak_rss_mb"], r["peak_tree_rss_mb"], r["seconds"]] for r in runs]
    print(common.table(rows, ["binary", "case", "images / steps", "peak RSS MB (largest "
                              "process)", "peak tree RSS MB (sampled sum)", "seconds"]))
    common.write_result(FLAGS.results_name, {
        "method": {"peak_rss_mb": "getrusage(RUSAGE_CHILDREN).ru_maxrss in a wrapper: the "
                                  "largest single process of the run",
                   "peak_tree_rss_mb": "sum of RSS over the process tree, sampled every "
                                       "50 ms (psutil)"},
        "runs": runs, "machine": machine})


if __name__ == "__main__":
    app.run(main)
