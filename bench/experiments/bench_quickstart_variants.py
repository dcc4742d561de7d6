r"""Can a few minutes of pretraining learn a procedural dataset? Quickstart-budget runs on
variants of the embedded synthetic set.

    python -m bench.experiments.bench_quickstart_variants --work_dir=/tmp/harl_qs_variants \
        [--variants=default,upright,upright_clean,upright_clutter] \
        [--extra_pretrain_flags=--base_learning_rate=3.0] [--results_name=NAME]

Each variant is 2,000 training and 800 held-out 64 px images with exact masks (the held-out
images come from another seed). Every variant runs the quickstart's own budget and
binaries: ``harl_tf.pretrain --flagfile=flags/quickstart.cfg`` (HARL hybrid, 400 steps of
batch 64, ResNet-18 at width 0.5 on 32 px views), ``harl_tf.export --output_stride=keep``,
then ``harl_tf.finetune`` with ``flags/quickstart_linear.cfg`` (linear probe, weight decay
chosen on a validation part of the train split) and k-NN (k = 20), for the pretrained
encoder and for a randomly initialised one of the same architecture. The gain is
pretrained minus random init, the quickstart's figure.

Variants (8 shape classes each; only the object's shape carries the class):

- ``default``: :mod:`harl_tf.data.synthetic` as shipped (any rotation, random colour and
  texture on the object, gradient + texture + 2-4 distractor blobs behind it).
- ``upright``: the same, with the object's rotation limited to 0 (canonical pose), so that
  the only within-class changes are ones the augmentations cover (position, scale) and the
  colours.
- ``upright_clean``: upright objects in one flat colour (random hue, strong contrast:
  light or dark) on a low-contrast two-colour gradient; rotation within +-10 degrees.
- ``upright_clutter``: ``upright_clean`` plus a background texture and 1-3 distractor
  blobs: :mod:`harl_tf.data.synthetic`'s ``style="upright"``, the quickstart's set.

Writes ``bench/results/<results_name>.json``.
"""
from __future__ import annotations

import json
import os
import sys
import time

from absl import app, flags

from bench import common

VARIANTS = ("default", "upright", "upright_clean", "upright_clutter")

FLAGS = flags.FLAGS
flags.DEFINE_string("work_dir", "/tmp/harl_qs_variants", "Records, models and probes.")
flags.DEFINE_list("variants", list(VARIANTS), f"Variants to run, from {VARIANTS}.")
flags.DEFINE_integer("num_images", 2000, "Training images per variant.")
flags.DEFINE_integer("num_test_images", 800, "Held-out images per variant.")
flags.DEFINE_string("extra_pretrain_flags", "",
                    "Flags appended to the pretraining command (space-separated).")
flags.DEFINE_string("results_name", "bench_quickstart_variants", "Results file name.")


def render(variant: str, index: int, side: int, seed: int):
    from harl_tf.data import synthetic
    if variant == "default":
        return synthetic.render(index, side, seed)
    if variant == "upright":
        return synthetic.render(index, side, seed, max_rotation=0.0)
    if variant == "upright_clutter":
        return synthetic.render(index, side, seed, style="upright")
    return synthetic._render_upright(index, side, side, seed, None, "random", clutter=False)


def write_records(variant: str, directory: str) -> None:
    from harl_tf.atomic import write_bytes_atomic
    if os.path.exists(os.path.join(directory, "done")):
        return
    for split, count, seed in (("train", FLAGS.num_images, 0),
                               ("test", FLAGS.num_test_images, 1)):
        common.write_example_records(
            os.path.join(directory, f"{split}-00000-of-00001.tfrecord"),
            ((f"{variant}/{seed}/{i}", *render(variant, i, 64, seed)) for i in range(count)),
            jpeg_quality=95)
    write_bytes_atomic(os.path.join(directory, "done"), b"ok\n")


def _run(argv, log_path):
    common.run(argv, log_path, env=dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2"))


def run_variant(variant: str) -> dict:
    work = os.path.join(FLAGS.work_dir, variant)
    records = os.path.join(FLAGS.work_dir, "records", variant)
    write_records(variant, records)
    train, test = (os.path.join(records, f"{s}-*.tfrecord") for s in ("train", "test"))
    py = sys.executable
    start = time.time()
    _run([py, "-m", "harl_tf.pretrain", "--flagfile=flags/quickstart.cfg",
          f"--train_files={train}", f"--model_dir={work}/model", "--synthetic_records=0",
          f"--num_train_examples={FLAGS.num_images}", *FLAGS.extra_pretrain_flags.split()],
         f"{work}.pretrain.log")
    pretrain_seconds = time.time() - start
    _run([py, "-m", "harl_tf.export", f"--model_dir={work}/model",
          f"--export_dir={work}/export", "--output_stride=keep", "--overwrite"],
         f"{work}.export.log")
    result = {"pretrain_seconds": round(pretrain_seconds, 1)}
    for encoder, encoder_flags in (("pretrained", [f"--encoder={work}/export"]),
                                   ("random_init", ["--encoder=random",
                                                    f"--encoder_config={work}/export"])):
        for mode, mode_flags in (("linear", []), ("knn", ["--mode=knn", "--knn_k=20"])):
            out = f"{work}/{mode}_{encoder}"
            _run([py, "-m", "harl_tf.finetune", "--flagfile=flags/quickstart_linear.cfg",
                  *mode_flags, *encoder_flags, f"--train_files={train}",
                  f"--eval_files={test}", f"--output_dir={out}", "--verbose=0"],
                 f"{out}.log")
            with open(os.path.join(out, "results.json")) as f:
                result[f"{mode}_{encoder}"] = json.load(f)["top1"]
    for mode in ("linear", "knn"):
        result[f"{mode}_gain"] = result[f"{mode}_pretrained"] - result[f"{mode}_random_init"]
    return result


def main(argv):
    del argv
    unknown = [v for v in FLAGS.variants if v not in VARIANTS]
    if unknown:
        raise app.UsageError(f"--variants: unknown {unknown}; choose from {VARIANTS}")
    machine = common.machine_info()
    print(common.describe_machine(machine), flush=True)
    results = {v: run_variant(v) for v in FLAGS.variants}
    rows = [[v, r["linear_random_init"], r["linear_pretrained"], r["linear_gain"],
             r["knn_random_init"], r["knn_pretrained"], r["knn_gain"]]
            for v, r in results.items()]
    print(common.table(rows, ["variant", "linear rand", "linear pre", "gain",
                              "kNN rand", "kNN pre", "gain"]))
    path = common.write_result(FLAGS.results_name, {
        "machine": machine, "extra_pretrain_flags": FLAGS.extra_pretrain_flags,
        "num_images": FLAGS.num_images, "num_test_images": FLAGS.num_test_images,
        "load_average_end": common.load_average(), "variants": results})
    print(f"wrote {path}")


if __name__ == "__main__":
    app.run(main)
