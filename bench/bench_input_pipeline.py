"""Two-view pretraining input pipeline throughput, against SimCLR-tf2's on the same JPEGs.

Writes synthetic 500×375 JPEGs (quality 90) with PNG masks into TFRecord shards, then
times, in one process and alternating round by round (so that load from other processes
falls on every variant alike), two-view examples at 224 px, batch 64:

- ``harl_tf``: :func:`harl_tf.data.pipeline.pretrain_dataset` as pretraining runs it
  (masks included, full decode, bicubic resize);
- ``harl_tf_fused_crop``: the same with ``fused_crop=True`` (decode only each window);
- ``harl_tf_bilinear``: the same with a bilinear resize of the image (not BYOL's);
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

    python bench/bench_input_pipeline.py [--simclr_dir /work/peers/simclr]
        [--variants harl_tf,simclr_tf2] [--rounds 4] [--records_dir DIR]
"""
from __future__ import annotations

import argparse
import dataclasses
import importlib.util
import json
import os
import platform
import statistics
import sys
import tempfile
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402

from bench import common  # noqa: E402
from harl_tf.data import augment, pipeline, schema, synthetic  # noqa: E402

RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results",
                       "bench_input_pipeline.json")
HARL_VARIANTS = ("harl_tf", "harl_tf_fused_crop", "harl_tf_bilinear")
PEER = "simclr_tf2"


def write_records(directory: str, examples: int, shards: int,
                  height: int = 375, width: int = 500) -> str:
    """Synthetic JPEG (quality 90) + PNG mask records in ``shards`` files; returns the
    glob."""
    per_shard = -(-examples // shards)
    for shard in range(shards):
        indices = range(shard * per_shard, min(examples, (shard + 1) * per_shard))
        path = os.path.join(directory, f"bench-{shard:05d}-of-{shards:05d}.tfrecord")
        with tf.io.TFRecordWriter(path) as writer:
            for i, image, mask, label in synthetic.iterate(indices, (height, width)):
                writer.write(schema.serialize_example(
                    image_bytes=tf.io.encode_jpeg(image, quality=90).numpy(),
                    image_format="jpeg", height=height, width=width,
                    mask_png=schema.encode_mask_png(mask), label=label,
                    example_id=f"synthetic/{i}", mask_method="ground_truth"))
    return os.path.join(directory, "bench-*.tfrecord")


def ensure_records(directory: str, examples: int, shards: int) -> str:
    """The records' glob in ``directory``, written first unless ``shards`` files are
    there already."""
    pattern = os.path.join(directory, "bench-*.tfrecord")
    if len(tf.io.gfile.glob(pattern)) != shards:
        os.makedirs(directory, exist_ok=True)
        start = time.perf_counter()
        write_records(directory, examples, shards)
        print(f"wrote {examples} examples in {shards} shards "
              f"({time.perf_counter() - start:.1f} s)", flush=True)
    return pattern


def jpeg_bytes(pattern: str) -> list:
    """The image bytes of every record of ``pattern``, in file order."""
    return [schema.parse_example(r)["image"].numpy() for r in
            tf.data.TFRecordDataset(sorted(tf.io.gfile.glob(pattern)))]


# ----------------------------------------------------------------------------- variants


def harl_dataset(pattern: str, args, *, fused_crop: bool = pipeline.DEFAULT_FUSED_CROP,
                 resize_method: str = "bicubic") -> tf.data.Dataset:
    configs = tuple(dataclasses.replace(c, resize_method=resize_method)
                    for c in augment.default_view_configs())
    return pipeline.pretrain_dataset(
        pattern, args.batch_size, args.image_size, seed=0, shuffle_buffer=args.examples,
        view_configs=configs, fused_crop=fused_crop)


def load_simclr_data_util(simclr_dir: str):
    """google-research/simclr ``tf2/data_util.py`` from the checkout ``simclr_dir``,
    imported as a module of its own. It reads no absl flag (``data.py`` does; it is not
    needed here), so none is set."""
    path = os.path.join(simclr_dir, "tf2", "data_util.py")
    if not os.path.isfile(path):
        raise FileNotFoundError(
            f"--simclr_dir {simclr_dir!r}: no tf2/data_util.py there; pass the root of a "
            f"google-research/simclr checkout")
    spec = importlib.util.spec_from_file_location("simclr_tf2_data_util", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def simclr_dataset(images: list, data_util, args) -> tf.data.Dataset:
    """SimCLR-tf2's two-view augmentation of ``images`` (JPEG bytes, from memory), with
    BYOL's blur probabilities; batches {"view1", "view2": float32 [B, S, S, 3]}."""
    size = args.image_size

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
    dataset = dataset.batch(args.batch_size, drop_remainder=True)
    return dataset.prefetch(tf.data.AUTOTUNE)


# ----------------------------------------------------------------------------- timing


def time_dataset(make_dataset, args):
    """(examples/s, CPU ms per example) in steady state: a fresh iterator (so that no
    other variant fills its buffers in the background), ``warmup`` batches read, then
    ``batches`` batches timed, read back to back with the warm-up so the prefetch buffers
    hold no head start."""
    iterator = iter(make_dataset())
    for _ in range(args.warmup):
        next(iterator)
    start = time.perf_counter()
    start_cpu = _process_cpu_seconds()
    for _ in range(args.batches):
        batch = next(iterator)
    batch["view1"].numpy()  # the last batch is really there
    cpu = _process_cpu_seconds() - start_cpu
    examples = args.batches * args.batch_size
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
        fns = [lambda shape, v=v: augment.sample_crop_window(
            shape, tf.random.experimental.stateless_fold_in(seed, v), config)
            for v in range(2)]
        crops, _, _ = augment.decode_and_crop(image_bytes, fns, fused=fused)
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


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--examples", type=int, default=512)
    parser.add_argument("--shards", type=int, default=4)
    parser.add_argument("--batch_size", type=int, default=64)
    parser.add_argument("--image_size", type=int, default=224)
    parser.add_argument("--batches", type=int, default=8, help="batches per timed round")
    parser.add_argument("--warmup", type=int, default=3, help="untimed batches first")
    parser.add_argument("--rounds", type=int, default=4, help="timed rounds per variant")
    parser.add_argument("--simclr_dir", default=None,
                        help="root of a google-research/simclr checkout: adds SimCLR-tf2's "
                             "data_util as the baseline")
    parser.add_argument("--variants", default=None,
                        help=f"comma-separated subset of {HARL_VARIANTS + (PEER,)} "
                             f"(default: all; {PEER} needs --simclr_dir)")
    parser.add_argument("--skip_decode_step", action="store_true",
                        help="skip the decode-and-crop-only measurement (fused vs full)")
    parser.add_argument("--output", default=RESULTS)
    parser.add_argument("--records_dir", default=None,
                        help="keep the records here and reuse them on the next run "
                             "(default: a temporary directory)")
    args = parser.parse_args(argv)

    variants = (args.variants.split(",") if args.variants else
                list(HARL_VARIANTS) + ([PEER] if args.simclr_dir else []))
    unknown = sorted(set(variants) - set(HARL_VARIANTS + (PEER,)))
    if unknown:
        parser.error(f"--variants: unknown {unknown}; choose from {HARL_VARIANTS + (PEER,)}")
    if PEER in variants and not args.simclr_dir:
        parser.error(f"--variants {PEER} needs --simclr_dir (a google-research/simclr "
                     f"checkout)")
    load_start = common.load_average()

    with tempfile.TemporaryDirectory() as temporary:
        pattern = ensure_records(args.records_dir or temporary, args.examples, args.shards)
        factories = {
            "harl_tf": lambda: harl_dataset(pattern, args),
            "harl_tf_fused_crop": lambda: harl_dataset(pattern, args, fused_crop=True),
            "harl_tf_bilinear": lambda: harl_dataset(pattern, args,
                                                     resize_method="bilinear"),
        }
        if PEER in variants:
            data_util = load_simclr_data_util(args.simclr_dir)
            images = jpeg_bytes(pattern)
            factories[PEER] = lambda: simclr_dataset(images, data_util, args)

        decode_ms = {}
        if not args.skip_decode_step:
            decode_runs = {True: [], False: []}
            for _ in range(2):  # alternate, so that both see the same background load
                for fused in (True, False):
                    decode_runs[fused].append(decode_cpu_ms(pattern, fused))
            decode_ms = {fused: min(runs) for fused, runs in decode_runs.items()}
            print(f"decode and crop only: fused {decode_ms[True]:.2f}, full "
                  f"{decode_ms[False]:.2f} CPU ms/example", flush=True)

        rates = {name: [] for name in variants}
        cpu_ms = {name: [] for name in variants}
        for round_index in range(args.rounds):
            # Rotate the order each round, so no variant always runs first or last.
            shift = round_index % len(variants)
            for name in variants[shift:] + variants[:shift]:
                rate, cpu = time_dataset(factories[name], args)
                rates[name].append(rate)
                cpu_ms[name].append(cpu)
                print(f"round {round_index}: {name:20} {rate:7.1f} two-view examples/s  "
                      f"{cpu:5.2f} CPU ms/example", flush=True)

    cores = os.cpu_count() or 1
    result = {
        "benchmark": "two-view pretraining input pipeline (harl-tf with masks) vs "
                     "SimCLR-tf2 data_util (no masks)",
        "command": "python " + " ".join([os.path.relpath(__file__)] + list(
            sys.argv[1:] if argv is None else argv)),
        "image_source": "harl_tf.data.synthetic 500x375, JPEG quality 90, PNG mask",
        "examples": args.examples, "shards": args.shards, "batch_size": args.batch_size,
        "image_size": args.image_size, "batches_per_round": args.batches,
        "warmup_batches": args.warmup, "rounds": args.rounds, "variants": variants,
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
        "machine": {"cpu_count": os.cpu_count(), "cpu_model": common.cpu_model(),
                    "load_average_1_5_15_at_start": load_start,
                    "load_average_1_5_15_at_end": common.load_average(),
                    "tensorflow": tf.__version__, "numpy": np.__version__,
                    "python": platform.python_version()},
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
        result["simclr_dir"] = args.simclr_dir
    print(json.dumps(result, indent=2))
    common.write_json_atomic(args.output, result)
    return result


if __name__ == "__main__":
    main()
