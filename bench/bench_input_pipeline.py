"""Two-view pretraining input pipeline throughput, against SimCLR-tf2's on the same JPEGs.

Writes synthetic 500×375 JPEGs (quality 90) with PNG masks into TFRecord shards, then
times, in one process and alternating round by round (so that load from other processes
falls on every variant alike), two-view examples at 224 px, batch 64:

- ``harl_tf``: :func:`harl_tf.data.pipeline.pretrain_dataset` as pretraining runs it
  (masks included, full decode, bicubic resize);
- ``harl_tf_fused_crop``: the same with ``fused_crop=True`` (decode only each window);
- ``harl_tf_bilinear``: the same with a bilinear resize of the image (not BYOL's);
- ``harl_tf_plain_jitter``: the same with the colour jitter's ops as TensorFlow runs
  them, not XLA-compiled (``--augment_jit_compile=false``);
- ``simclr_tf2`` (with ``--simclr_dir``): google-research/simclr ``tf2/data_util.py``,
  read from a local checkout and run, never copied here. Two views per image, each
  ``preprocess_for_train`` (224 px, crop, flip, colour jitter strength 1.0, ``simclrv2``)
  then ``random_blur`` with p = 1.0 (view 1) and 0.1 (view 2) as in BYOL, clipped to
  [0, 1] as its ``batch_random_blur`` does. No masks. Fed the same JPEG bytes from memory
  (no record reading or parsing), decoded with ``tf.io.decode_jpeg``.

An example is one image with its two views (and, for harl-tf, two masks). Per variant:
median and best examples/s over the rounds, and process CPU ms per example (which load
from other processes leaves alone); the ratio harl_tf / simclr_tf2 of the medians and
the median of the per-round ratios. Writes ``bench/results/bench_input_pipeline.json``.

    python -m bench.bench_input_pipeline [--simclr_dir /work/peers/simclr]
        [--variants harl_tf,simclr_tf2] [--rounds 4] [--records_dir DIR]
"""
from __future__ import annotations

import dataclasses
import json
import os
import statistics
import tempfile
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import tensorflow as tf  # noqa: E402
from absl import app, flags  # noqa: E402

from bench import common  # noqa: E402
from harl_tf.data import augment, geometry, pipeline, schema  # noqa: E402

HARL_VARIANTS = ("harl_tf", "harl_tf_fused_crop", "harl_tf_bilinear", "harl_tf_plain_jitter")
PEER = "simclr_tf2"

FLAGS = flags.FLAGS
flags.DEFINE_integer("examples", 512, "Synthetic examples written (and shuffle buffer).")
flags.DEFINE_integer("shards", 4, "Record files.")
flags.DEFINE_integer("batch_size", 64, "Two-view examples per batch.")
flags.DEFINE_integer("image_size", 224, "View side, px.")
flags.DEFINE_integer("batches", 8, "Batches per timed round.")
flags.DEFINE_integer("warmup", 3, "Untimed batches first.")
flags.DEFINE_integer("rounds", 4, "Timed rounds per variant.")
flags.DEFINE_string("simclr_dir", None, "Root of a google-research/simclr checkout: adds "
                    "SimCLR-tf2's data_util as the baseline.")
flags.DEFINE_list("variants", [], f"Subset of {HARL_VARIANTS + (PEER,)} (default: all; "
                  f"{PEER} needs --simclr_dir).")
flags.DEFINE_bool("skip_decode_step", False,
                  "Skip the decode-and-crop-only measurement (fused vs full).")
flags.DEFINE_string("output", os.path.join(common.RESULTS_DIR, "bench_input_pipeline.json"),
                    "Results file.")
flags.DEFINE_string("records_dir", None, "Keep the records here and reuse them on the next "
                    "run (default: a temporary directory).")


# ----------------------------------------------------------------------------- variants


def harl_dataset(pattern: str, *, fused_crop: bool = pipeline.DEFAULT_FUSED_CROP,
                 resize_method: str = "bicubic", jit_compile: bool = True
                 ) -> tf.data.Dataset:
    configs = tuple(dataclasses.replace(c, resize_method=resize_method,
                                        jit_compile=jit_compile)
                    for c in augment.default_view_configs())
    return pipeline.pretrain_dataset(
        pattern, FLAGS.batch_size, FLAGS.image_size, seed=0, shuffle_buffer=FLAGS.examples,
        view_configs=configs, fused_crop=fused_crop)


def simclr_dataset(images: list, data_util) -> tf.data.Dataset:
    """SimCLR-tf2's two-view augmentation of ``images`` (JPEG bytes, from memory), with
    BYOL's blur probabilities; batches {"view1", "view2": float32 [B, S, S, 3]}."""
    size = FLAGS.image_size

    def two_views(image_bytes):
        image = tf.io.decode_jpeg(image_bytes, channels=3)
        image = tf.image.convert_image_dtype(image, tf.float32)  # as its preprocess_image
        views = {}
        for name, blur_prob in (("view1", 1.0), ("view2", 0.1)):
            view = data_util.preprocess_for_train(
                image, size, size, color_jitter_strength=1.0, crop=True, flip=True,
                impl="simclrv2")
            view = data_util.random_blur(view, size, size, p=blur_prob)
            views[name] = tf.clip_by_value(view, 0.0, 1.0)
        return views

    dataset = tf.data.Dataset.from_tensor_slices(images).repeat()
    dataset = dataset.map(two_views, num_parallel_calls=tf.data.AUTOTUNE,
                          deterministic=False)
    dataset = dataset.batch(FLAGS.batch_size, drop_remainder=True)
    return dataset.prefetch(tf.data.AUTOTUNE)


# ----------------------------------------------------------------------------- timing


def time_dataset(make_dataset):
    """(examples/s, CPU ms per example) in steady state: a fresh iterator (so that no
    other variant fills its buffers in the background), ``warmup`` batches read, then
    ``batches`` batches timed, read back to back with the warm-up so the prefetch buffers
    hold no head start."""
    iterator = iter(make_dataset())
    for _ in range(FLAGS.warmup):
        next(iterator)
    start = time.perf_counter()
    start_cpu = _process_cpu_seconds()
    for _ in range(FLAGS.batches):
        batch = next(iterator)
    batch["view1"].numpy()  # the last batch is really there
    cpu = _process_cpu_seconds() - start_cpu
    examples = FLAGS.batches * FLAGS.batch_size
    rate = examples / (time.perf_counter() - start)
    del iterator  # stops its background threads before the next variant runs
    return rate, 1000.0 * cpu / examples


def decode_cpu_ms(pattern: str, fused: bool, repeats: int = 3, count: int = 256) -> float:
    """CPU ms per example of the decode-and-crop step alone (two crop windows, as in
    pretraining): the only step in which full and fused decode differ. Median of
    ``repeats``."""
    encoded = [schema.parse_example(r)["image"] for r in
               tf.data.TFRecordDataset(tf.io.gfile.glob(pattern)).take(count)]
    config = augment.ViewConfig()

    @tf.function
    def two_crops(image_bytes, seed):
        fns = [lambda shape, v=v: geometry.sample_crop_window(
            shape, tf.random.experimental.stateless_fold_in(seed, v), config)
            for v in range(2)]
        crops, _, _ = geometry.decode_and_crop(image_bytes, fns, fused=fused)
        return [tf.shape(c) for c in crops]

    two_crops(encoded[0], tf.constant([0, 0], tf.int64))
    results = []
    for r in range(repeats):
        start = _process_cpu_seconds()
        for i, image_bytes in enumerate(encoded):
            two_crops(image_bytes, tf.constant([r, i], tf.int64))
        results.append(1000.0 * (_process_cpu_seconds() - start) / len(encoded))
    return statistics.median(results)


def _process_cpu_seconds() -> float:
    """User + system CPU time of this process (all threads): unlike wall time, it does
    not grow when other processes take the cores."""
    return time.process_time()


def main(argv) -> None:
    del argv
    variants = FLAGS.variants or (list(HARL_VARIANTS) + ([PEER] if FLAGS.simclr_dir else []))
    unknown = sorted(set(variants) - set(HARL_VARIANTS + (PEER,)))
    if unknown:
        raise app.UsageError(f"--variants: unknown {unknown}; choose from "
                             f"{HARL_VARIANTS + (PEER,)}")
    if PEER in variants and not FLAGS.simclr_dir:
        raise app.UsageError(f"--variants {PEER} needs --simclr_dir (a google-research/simclr "
                             f"checkout)")
    machine = common.machine_info()

    with tempfile.TemporaryDirectory() as temporary:
        pattern = common.ensure_synthetic_records(FLAGS.records_dir or temporary,
                                                  FLAGS.examples, FLAGS.shards)
        factories = {
            "harl_tf": lambda: harl_dataset(pattern),
            "harl_tf_fused_crop": lambda: harl_dataset(pattern, fused_crop=True),
            "harl_tf_bilinear": lambda: harl_dataset(pattern, resize_method="bilinear"),
            "harl_tf_plain_jitter": lambda: harl_dataset(pattern, jit_compile=False),
        }
        if PEER in variants:
            data_util = common.load_simclr_data_util(FLAGS.simclr_dir)
            images = common.jpeg_bytes(pattern)
            factories[PEER] = lambda: simclr_dataset(images, data_util)

        decode_ms = {}
        if not FLAGS.skip_decode_step:
            decode_runs = {True: [], False: []}
            for _ in range(2):  # alternate, so that both see the same background load
                for fused in (True, False):
                    decode_runs[fused].append(decode_cpu_ms(pattern, fused))
            decode_ms = {fused: min(runs) for fused, runs in decode_runs.items()}
            print(f"decode and crop only: fused {decode_ms[True]:.2f}, full "
                  f"{decode_ms[False]:.2f} CPU ms/example", flush=True)

        rates = {name: [] for name in variants}
        cpu_ms = {name: [] for name in variants}
        for round_index in range(FLAGS.rounds):
            # Rotate the order each round, so no variant always runs first or last.
            shift = round_index % len(variants)
            for name in variants[shift:] + variants[:shift]:
                rate, cpu = time_dataset(factories[name])
                rates[name].append(rate)
                cpu_ms[name].append(cpu)
                print(f"round {round_index}: {name:20} {rate:7.1f} two-view examples/s  "
                      f"{cpu:5.2f} CPU ms/example", flush=True)

    cores = os.cpu_count() or 1
    result = {
        "benchmark": "two-view pretraining input pipeline (harl-tf with masks) vs "
                     "SimCLR-tf2 data_util (no masks)",
        "command": common.command_line(),
        "image_source": "harl_tf.data.synthetic 500x375, JPEG quality 90, PNG mask",
        "examples": FLAGS.examples, "shards": FLAGS.shards, "batch_size": FLAGS.batch_size,
        "image_size": FLAGS.image_size, "batches_per_round": FLAGS.batches,
        "warmup_batches": FLAGS.warmup, "rounds": FLAGS.rounds, "variants": variants,
        "examples_per_s": {
            name: {"rounds": [round(r, 1) for r in rates[name]],
                   "best": round(max(rates[name]), 1),
                   "median": round(statistics.median(rates[name]), 1)}
            for name in variants},
        # CPU time per example is what contention from other processes leaves alone;
        # cores / CPU time is the rate a variant would reach with the cores to itself.
        "cpu_ms_per_example": {
            name: {"rounds": [round(c, 2) for c in cpu_ms[name]],
                   "median": round(statistics.median(cpu_ms[name]), 2),
                   "implied_examples_per_s_on_all_cores": round(
                       1000.0 * cores / statistics.median(cpu_ms[name]), 1)}
            for name in variants},
        "default_fused_crop": pipeline.DEFAULT_FUSED_CROP,
        "machine": {**machine, "load_average_at_end": common.load_average()},
        "time_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
    if decode_ms:
        result["decode_and_crop_cpu_ms_per_example"] = {
            "fused_crop": round(decode_ms[True], 3), "full_decode": round(decode_ms[False], 3)}
    if "harl_tf" in variants and PEER in variants:
        per_round = [h / s for h, s in zip(rates["harl_tf"], rates[PEER])]
        result["harl_tf_over_simclr_tf2"] = {
            "ratio_of_median_examples_per_s": round(
                statistics.median(rates["harl_tf"]) / statistics.median(rates[PEER]), 3),
            "median_of_per_round_ratios": round(statistics.median(per_round), 3),
            "per_round_ratios": [round(r, 3) for r in per_round],
            "ratio_of_median_cpu_ms": round(
                statistics.median(cpu_ms[PEER]) / statistics.median(cpu_ms["harl_tf"]), 3),
            "target": 1.2}
        result["simclr_dir"] = FLAGS.simclr_dir
    print(json.dumps(result, indent=2))
    common.write_json_atomic(FLAGS.output, result)


if __name__ == "__main__":
    app.run(main)
