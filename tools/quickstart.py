r"""The quickstart: the whole HARL workflow on the embedded synthetic set, end to end.

  python -m tools.quickstart --work_dir=/tmp/harl_quickstart

Every step runs one of the project's real binaries or tools, in a subprocess, exactly as
a user would type it (the commands are printed):

1. ``tools.build_tfrecords``: the synthetic set's TFRecords with CONVENTIONAL heuristic
   masks (train and test splits), and once more with the exact ground-truth masks;
2. ``tools.mask_quality``: mean IoU of the conventional masks against the ground truth;
3. ``harl_tf.pretrain --flagfile=flags/quickstart.cfg``: HARL pretraining;
4. ``harl_tf.export --output_stride=keep``: the online encoder as a SavedModel, with the
   output stride it was trained with (8: a 4x4 map at 32 px) so the probes see the
   features pretraining shaped;
5. ``harl_tf.finetune --mode=linear`` and ``--mode=knn``: a linear probe (its weight decay
   chosen on a validation part of the train split) and a k-NN classifier on the pretrained
   encoder, and on a randomly initialised encoder of the same architecture, the baseline;

then prints a summary and writes it to ``<work_dir>/summary.json``. Rerunning with the
same ``--work_dir`` reuses finished shards and resumes pretraining.
"""
import json
import os
import shlex
import subprocess
import sys
import time

from absl import app, flags

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FLAGS = flags.FLAGS

flags.DEFINE_string("work_dir", "/tmp/harl_quickstart", "Where everything is written.")
flags.DEFINE_integer("num_images", 2000, "Synthetic training images.")
flags.DEFINE_integer("num_test_images", 800, "Synthetic held-out images (probe evaluation).")
flags.DEFINE_integer("image_size", 64, "Synthetic image size, px.")
flags.DEFINE_enum("synthetic_style", "upright", ["upright", "shapes"],
                  "Look of the synthetic set (harl_tf.data.synthetic.STYLES): upright "
                  "flat-coloured shapes, which minutes of pretraining learn, or the harder "
                  "cluttered shapes.")
flags.DEFINE_integer("data_seed", 0, "Seed of the synthetic set. Another seed draws an "
                     "independent sample of the same distribution: recipes are compared on "
                     "one (bench.experiments.sweep_quickstart) without reading the default set.")
flags.DEFINE_string("pretrain_flagfile", os.path.join(ROOT, "flags", "quickstart.cfg"),
                    "Pretraining flagfile.")
flags.DEFINE_string("linear_flagfile", os.path.join(ROOT, "flags", "quickstart_linear.cfg"),
                    "Linear-probe flagfile.")
flags.DEFINE_integer("train_steps", 0, "If > 0, overrides the flagfile's pretraining steps.")
flags.DEFINE_integer("num_workers", os.cpu_count() or 1, "Builder worker processes.")


def _step(title, argv, log_path):
    """Runs one binary, echoing its command; its output goes to the terminal and a log."""
    print(f"\n== {title}\n$ {' '.join(shlex.quote(a) for a in argv)}", flush=True)
    start = time.time()
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL=os.environ.get("TF_CPP_MIN_LOG_LEVEL", "2"))
    with open(log_path, "w", encoding="utf-8") as log:
        process = subprocess.Popen(argv, cwd=ROOT, env=env, stdout=subprocess.PIPE,
                                   stderr=subprocess.STDOUT, text=True, bufsize=1)
        for line in process.stdout:
            log.write(line)
            if not line.startswith(("I0000", "W0000", "WARNING: All log")):
                sys.stdout.write(line)
        returncode = process.wait()
    if returncode != 0:
        sys.exit(f"quickstart: step '{title}' failed with exit code {returncode}; "
                 f"full log: {log_path}")
    seconds = time.time() - start
    print(f"-- {title}: {seconds:.0f} s", flush=True)
    return seconds


def _load(path):
    with open(path, encoding="utf-8") as f:
        return json.load(f)


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    work = os.path.abspath(FLAGS.work_dir)
    logs = os.path.join(work, "logs")
    os.makedirs(logs, exist_ok=True)
    py = sys.executable
    records, records_gt = os.path.join(work, "records"), os.path.join(work, "records_gt")
    model_dir, export_dir = os.path.join(work, "model"), os.path.join(work, "export")
    train_files = os.path.join(records, "train-*.tfrecord")
    test_files = os.path.join(records, "test-*.tfrecord")
    synthetic = [f"--source=synthetic", f"--num_images={FLAGS.num_images}",
                 f"--num_test_images={FLAGS.num_test_images}",
                 f"--image_size={FLAGS.image_size}", f"--seed={FLAGS.data_seed}",
                 f"--synthetic_style={FLAGS.synthetic_style}",
                 f"--num_workers={FLAGS.num_workers}"]
    timings = {}
    start = time.time()

    timings["build_records"] = _step(
        "1/6 TFRecords of the synthetic set with conventional heuristic masks",
        [py, "-m", "tools.build_tfrecords", *synthetic, "--mask_method=conventional",
         f"--output_dir={records}"], os.path.join(logs, "build_records.log"))
    timings["build_ground_truth"] = _step(
        "2/6 the same images with their exact ground-truth masks (for mask quality only)",
        [py, "-m", "tools.build_tfrecords", *synthetic, f"--output_dir={records_gt}",
         "--noprogress"], os.path.join(logs, "build_ground_truth.log"))
    quality_json = os.path.join(work, "mask_quality.json")
    timings["mask_quality"] = _step(
        "3/6 conventional masks against the ground truth",
        [py, "-m", "tools.mask_quality", f"--pred_records={train_files}",
         f"--gt_records={os.path.join(records_gt, 'train-*.tfrecord')}",
         f"--output_json={quality_json}"], os.path.join(logs, "mask_quality.log"))
    pretrain = [py, "-m", "harl_tf.pretrain", f"--flagfile={FLAGS.pretrain_flagfile}",
                f"--train_files={train_files}", f"--model_dir={model_dir}",
                f"--num_train_examples={FLAGS.num_images}"]
    if FLAGS.train_steps > 0:
        pretrain.append(f"--train_steps={FLAGS.train_steps}")
    timings["pretrain"] = _step("4/6 HARL pretraining", pretrain,
                                os.path.join(logs, "pretrain.log"))
    timings["export"] = _step(
        "5/6 export of the online encoder",
        [py, "-m", "harl_tf.export", f"--model_dir={model_dir}",
         f"--export_dir={export_dir}", "--output_stride=keep", "--overwrite"],
        os.path.join(logs, "export.log"))
    probes = {}
    for mode, extra in (("linear", []), ("knn", ["--mode=knn", "--knn_k=20"])):
        for name, encoder in (("pretrained", [f"--encoder={export_dir}"]),
                              ("random_init", ["--encoder=random",
                                               f"--encoder_config={export_dir}"])):
            output = os.path.join(work, f"{mode}_{name}")
            timings[f"{mode}_{name}"] = _step(
                f"6/6 {'linear probe' if mode == 'linear' else 'k-NN'} of the "
                f"{name.replace('_', ' ')} encoder",
                [py, "-m", "harl_tf.finetune", f"--flagfile={FLAGS.linear_flagfile}",
                 *extra, *encoder, f"--train_files={train_files}",
                 f"--eval_files={test_files}", f"--output_dir={output}", "--verbose=0"],
                os.path.join(logs, f"{mode}_{name}.log"))
            probes[(mode, name)] = _load(os.path.join(output, "results.json"))

    quality = _load(quality_json)
    pretrain_summary_path = os.path.join(model_dir, "summary.json")
    pretrain_summary = (_load(pretrain_summary_path)
                        if os.path.exists(pretrain_summary_path) else {})
    summary = {
        "mask_mean_iou_conventional_vs_ground_truth": quality["mean_iou"],
        "linear_probe_top1_pretrained": probes[("linear", "pretrained")].get("top1"),
        "linear_probe_top1_random_init": probes[("linear", "random_init")].get("top1"),
        "knn_top1_pretrained": probes[("knn", "pretrained")].get("top1"),
        "knn_top1_random_init": probes[("knn", "random_init")].get("top1"),
        "pretraining": pretrain_summary,
        "seconds": {**{k: round(v, 1) for k, v in timings.items()},
                    "total": round(time.time() - start, 1)},
        "paths": {"records": records, "model_dir": model_dir, "export": export_dir,
                  "linear_pretrained": os.path.join(work, "linear_pretrained"),
                  "linear_random_init": os.path.join(work, "linear_random_init"),
                  "knn_pretrained": os.path.join(work, "knn_pretrained"),
                  "knn_random_init": os.path.join(work, "knn_random_init"),
                  "logs": logs},
    }
    with open(os.path.join(work, "summary.json.tmp"), "w", encoding="utf-8") as f:
        json.dump(summary, f, indent=2)
    os.replace(os.path.join(work, "summary.json.tmp"), os.path.join(work, "summary.json"))

    print("\n== HARL quickstart summary")
    print(f"conventional mask mean IoU vs ground truth: {quality['mean_iou']:.3f} "
          f"({quality['num_images']} training images)")
    print("held-out top-1 (chance 0.125)   pretrained HARL   random init   gain")
    for mode, label in (("linear_probe", "linear probe"), ("knn", "k-NN (k = 20)")):
        pre, rnd = summary[f"{mode}_top1_pretrained"], summary[f"{mode}_top1_random_init"]
        print(f"  {label:<28} {pre:>15.3f} {rnd:>13.3f} {pre - rnd:>+6.3f}")
    print("  (same architecture and probe for both encoders; one short run on 2,000 "
          "images, so a few points\n   either way are noise: "
          "python -m bench.experiments.bench_quickstart_variants and the fmnist-scenes\n"
          "   benchmark in docs/results.md measure learning with seeds and larger budgets.)")
    print(f"total time: {summary['seconds']['total']:.0f} s")
    for name, path in summary["paths"].items():
        print(f"  {name:<20} {path}")
    print(f"  {'summary':<20} {os.path.join(work, 'summary.json')}")


def run():
    app.run(main)


if __name__ == "__main__":
    run()
