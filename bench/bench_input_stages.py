"""CPU cost of each stage of the two-view pretraining input pipeline, one stage at a time.

On the records of ``bench.bench_input_pipeline`` (synthetic 500×375 JPEGs, quality 90,
PNG masks), each stage of :func:`harl_tf.data.pipeline.pretrain_dataset`'s map function
runs on its own over inputs made by the stages before it and held in memory, so that it
sees what it sees in the pipeline (the blur gets jittered, sometimes grey views; the
coins are the ones the pipeline draws). Per stage: process CPU ms per two-view example,
minus the cost of passing the same inputs through an identity map; min and median over
``--repeats``. Stages: record parse, image decode, mask decode, seeds and coins, crop
windows, crop + resize of the image, crop + resize (+ flip) of the mask, flip of the
image, colour jitter (its probability and random order included), grayscale, blur,
solarize, final clip, batching; then the whole map function end to end, to compare with
the sum. Beside them, not in the sum: the jitter's ops and the grayscale one by one on
every view (``colour_op/*``), as TensorFlow runs them and XLA-compiled (``*_xla``; the
pipeline compiles the saturation only), with TensorFlow's saturation and grayscale
kernels, which the closed forms of :mod:`harl_tf.data.colour` replace, for comparison
(``*_tf``). With
``--simclr_dir``, SimCLR-tf2's matching stages too (decode and convert,
crop + resize, flip, colour jitter + grayscale, blur), on the same JPEGs.

    python -m bench.bench_input_stages [--records_dir DIR] [--examples 128] [--repeats 5]
        [--simclr_dir /work/peers/simclr]

Writes ``bench/results/bench_input_stages.json``.
"""
from __future__ import annotations

import json
import os
import statistics
import tempfile
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import tensorflow as tf  # noqa: E402
from absl import app, flags  # noqa: E402

from bench import common  # noqa: E402
from harl_tf.data import augment, colour, geometry, pipeline, schema  # noqa: E402

RESULTS = os.path.join(common.RESULTS_DIR, "bench_input_stages.json")

FLAGS = flags.FLAGS
flags.DEFINE_integer("examples", 128, "Records measured (each stage passes over them all).")
flags.DEFINE_integer("records", 512, "Records written when --records_dir holds none.")
flags.DEFINE_integer("shards", 4, "Record files written.")
flags.DEFINE_integer("image_size", 224, "View side, px.")
flags.DEFINE_integer("repeats", 5, "Timed passes per stage (min and median reported).")
flags.DEFINE_string("simclr_dir", None, "Root of a google-research/simclr checkout: time its "
                    "stages too.")
flags.DEFINE_string("records_dir", None, "Keep the records here and reuse them.")
flags.DEFINE_string("output", RESULTS, "Results JSON.")
_fold_in = tf.random.experimental.stateless_fold_in


def _probe(outputs) -> tf.Tensor:
    """One float from every output tensor (its first element, or a string's length), so
    that no output can be pruned as unused and nothing else is added to the cost."""
    values = []
    for t in tf.nest.flatten(outputs):
        if t.dtype == tf.string:
            t = tf.strings.length(t)
        values.append(tf.cast(tf.reshape(t, [-1])[0], tf.float32))
    return tf.add_n(values)


def _cpu_seconds(dataset: tf.data.Dataset) -> float:
    start = time.process_time()
    dataset.reduce(tf.constant(0.0), lambda total, x: total + x).numpy()
    return time.process_time() - start


# Passes over the cached inputs per measurement: enough work that the cheapest stages
# stand out of the noise of the process's other threads.
PASSES = 8


def stage_cost(inputs: tf.data.Dataset, fn, count: int, repeats: int) -> dict:
    """CPU ms per example of ``fn`` over the (cached) ``inputs``, minus an identity map
    over the same inputs: min and median over ``repeats``, each ``PASSES`` passes."""
    timed = inputs.repeat(PASSES).map(lambda *x: _probe(fn(*x)), num_parallel_calls=1)
    identity = inputs.repeat(PASSES).map(lambda *x: _probe(x), num_parallel_calls=1)
    _cpu_seconds(inputs.map(lambda *x: _probe(fn(*x))))  # traces and warms up
    costs = []
    for _ in range(repeats):
        base = _cpu_seconds(identity)
        costs.append(1000.0 * (_cpu_seconds(timed) - base) / (count * PASSES))
    return {"min": round(min(costs), 3), "median": round(statistics.median(costs), 3)}


def _cached(dataset: tf.data.Dataset) -> tf.data.Dataset:
    dataset = dataset.cache()
    for _ in dataset:  # fills the cache
        pass
    return dataset


def harl_stages(serialized: tf.data.Dataset, count: int, image_size: int,
                repeats: int, report) -> None:
    """Times the stages of :func:`augment.two_views` and the batching after it."""
    configs = augment.default_view_configs()
    base_seed = tf.constant([0, 0], tf.int64)
    numbered = _cached(serialized.enumerate().map(
        lambda n, record: (record, _fold_in(base_seed, n))))
    report("record_parse", stage_cost(numbered, lambda r, s: schema.parse_example(r),
                                      count, repeats))
    parsed = _cached(numbered.map(lambda r, s: (schema.parse_example(r), s)))
    report("image_decode", stage_cost(parsed, lambda p, s: schema.decode_image(p), count,
                                      repeats))
    report("mask_decode", stage_cost(parsed, lambda p, s: schema.decode_mask(p), count,
                                     repeats))

    def seeds_and_coins(s):
        seeds = tuple(augment.view_seeds(s, 2))
        return seeds, tuple(augment.view_coins(v, c) for v, c in zip(seeds, configs))

    report("seeds_and_coins", stage_cost(parsed, lambda p, s: seeds_and_coins(s), count,
                                         repeats))

    def decoded_fn(p, s):
        seeds, coins = seeds_and_coins(s)
        return schema.decode_image(p), schema.decode_mask(p), seeds, coins

    decoded = _cached(parsed.map(decoded_fn))

    def windows_of(image, seeds):
        return tuple(augment.view_crop_window(tf.shape(image), v, c)
                     for v, c in zip(seeds, configs))

    report("crop_windows", stage_cost(decoded, lambda i, m, v, c: windows_of(i, v), count,
                                      repeats))
    windowed = _cached(decoded.map(lambda i, m, v, c: (i, m, v, c, windows_of(i, v))))
    report("crop_resize_image", stage_cost(windowed, lambda i, m, v, c, w: [
        geometry.resize_image(geometry.crop(i, w[k]), image_size, configs[k].resize_method)
        for k in range(2)], count, repeats))
    report("crop_resize_flip_mask", stage_cost(windowed, lambda i, m, v, c, w: [
        geometry.resize_mask(geometry.crop(m, w[k]), image_size, c[k]["flip"])
        for k in range(2)], count, repeats))
    resized = _cached(windowed.map(lambda i, m, v, c, w: (tuple(
        geometry.resize_image(geometry.crop(i, w[k]), image_size, configs[k].resize_method)
        for k in range(2)), v, c)))

    def flip(images, coins):
        return tuple(tf.cond(coins[k]["flip"], lambda k=k: geometry.flip_left_right(
            images[k]), lambda k=k: tf.identity(images[k])) for k in range(2))

    report("flip_image", stage_cost(resized, lambda x, v, c: flip(x, c), count, repeats))
    images = _cached(resized.map(lambda x, v, c: (flip(x, c), v, c)))
    colour_op_stages(images, configs, count, repeats, report)
    for name, step in augment.COLOUR_STEPS:
        def run(x, v, c, step=step):
            return tuple(step(x[k], v[k], c[k], configs[k], image_size) for k in range(2))
        report(name, stage_cost(images, run, count, repeats))
        images = _cached(images.map(lambda x, v, c, run=run: (run(x, v, c), v, c)))
    report("final_clip", stage_cost(images, lambda x, v, c: tuple(
        tf.clip_by_value(x[k], 0.0, 1.0) for k in range(2)), count, repeats))
    del images, resized, windowed, decoded

    def example(record, seed):
        return augment.two_views(schema.parse_example(record), seed, image_size,
                                 fused_crop=pipeline.DEFAULT_FUSED_CROP)

    report("end_to_end_map", stage_cost(numbered, example, count, repeats))
    # Batching: whole batches of 64 of the same examples against the examples unbatched.
    total = max(64, count - count % 64)
    examples = _cached(numbered.map(example).repeat().take(total))
    batched = examples.batch(64, drop_remainder=True).map(_probe)
    unbatched = examples.map(_probe)
    costs = []
    for _ in range(repeats):
        base = _cpu_seconds(unbatched.repeat(PASSES))
        costs.append(1000.0 * (_cpu_seconds(batched.repeat(PASSES)) - base) /
                     (total * PASSES))
    report("batching_64", {"min": round(min(costs), 3),
                           "median": round(statistics.median(costs), 3)})


def colour_op_stages(images: tf.data.Dataset, configs, count: int, repeats: int,
                     report) -> None:
    """The colour jitter's ops one by one, and the grayscale, on both views of every
    example (always, not with their probabilities), each with its clip; the view's own
    jitter factors. Each jitter op as TensorFlow runs it and XLA-compiled (``*_xla``; the
    pipeline compiles the saturation only); beside the closed-form saturation and the
    one-product grayscale, TensorFlow's kernels they replace (``*_tf`` stages), on the same
    inputs."""
    with_factors = _cached(images.map(lambda x, v, c: (x, tuple(
        augment.view_jitter_draws(v[k], configs[k])[0] for k in range(2)))))
    stages = {"saturation_tf": lambda x, f: tf.clip_by_value(
        tf.image.adjust_saturation(x, f[2]), 0.0, 1.0)}
    for code, name in enumerate(("brightness", "contrast", "saturation", "hue")):
        op = colour.CLIPPED_JITTER_OPS[code]
        compiled = tf.function(op, jit_compile=True)
        stages[name] = lambda x, f, code=code, op=op: op(x, f[code])
        stages[f"{name}_xla"] = lambda x, f, code=code, op=compiled: op(x, f[code])
    stages["grayscale"] = lambda x, f: tf.clip_by_value(colour.to_grayscale(x), 0.0, 1.0)
    stages["grayscale_tf"] = lambda x, f: tf.clip_by_value(
        tf.image.grayscale_to_rgb(tf.image.rgb_to_grayscale(x)), 0.0, 1.0)
    for name, op in stages.items():
        report(f"colour_op/{name}", stage_cost(with_factors, lambda x, f, op=op: tuple(
            op(x[k], f[k]) for k in range(2)), count, repeats))


def simclr_stages(images: list, data_util, image_size: int, repeats: int, report) -> None:
    """SimCLR-tf2's stages for two views: decode + convert, crop + resize, flip, colour
    (jitter p 0.8 inside random_color_jitter, grayscale 0.2), blur (p 1.0 and 0.1)."""
    count = len(images)
    encoded = _cached(tf.data.Dataset.from_tensor_slices(images))

    def decode(b):
        return tf.image.convert_image_dtype(tf.io.decode_jpeg(b, channels=3), tf.float32)

    report("simclr/decode_and_convert", stage_cost(encoded, decode, count, repeats))
    decoded = _cached(encoded.map(decode))
    size = image_size
    report("simclr/crop_resize", stage_cost(decoded, lambda x: [
        data_util.random_crop_with_resize(x, size, size) for _ in range(2)], count, repeats))
    views = _cached(decoded.map(lambda x: tuple(
        data_util.random_crop_with_resize(x, size, size) for _ in range(2))))
    report("simclr/flip", stage_cost(views, lambda a, b: [
        tf.image.random_flip_left_right(v) for v in (a, b)], count, repeats))
    report("simclr/colour_jitter_and_grayscale", stage_cost(views, lambda a, b: [
        data_util.random_color_jitter(v, strength=1.0, impl="simclrv2") for v in (a, b)],
        count, repeats))
    coloured = _cached(views.map(lambda a, b: tuple(
        data_util.random_color_jitter(v, strength=1.0, impl="simclrv2") for v in (a, b))))
    report("simclr/blur", stage_cost(coloured, lambda a, b: [
        data_util.random_blur(a, size, size, p=1.0),
        data_util.random_blur(b, size, size, p=0.1)], count, repeats))


def main(argv) -> dict:
    del argv
    args = FLAGS
    machine = common.machine_info()
    # One thread per op: a stage's cost is its work, not the spinning of an op's helper
    # threads (the pipeline runs several examples at once instead).
    tf.config.threading.set_intra_op_parallelism_threads(1)

    stages = {}

    def report(name, cost):
        stages[name] = cost
        print(f"{name:38} {cost['min']:7.3f} ms (median {cost['median']:.3f})", flush=True)

    with tempfile.TemporaryDirectory() as temporary:
        pattern = common.ensure_synthetic_records(args.records_dir or temporary,
                                                  args.records, args.shards)
        files = sorted(tf.io.gfile.glob(pattern))
        serialized = tf.data.TFRecordDataset(files).take(args.examples)
        harl_stages(serialized, args.examples, args.image_size, args.repeats, report)
        if args.simclr_dir:
            data_util = common.load_simclr_data_util(args.simclr_dir)
            images = common.jpeg_bytes(pattern)[:args.examples]
            simclr_stages(images, data_util, args.image_size, args.repeats, report)

    # Stages with a "/" are the peer's, or the colour ops one by one (in colour_jitter).
    parts = [name for name in stages if "/" not in name and
             name not in ("end_to_end_map", "batching_64")]
    result = {
        "benchmark": "CPU ms per two-view example of each input-pipeline stage, in "
                     "isolation (min over repeats; identity map subtracted)",
        "command": common.command_line(),
        "image_source": "harl_tf.data.synthetic 500x375, JPEG quality 90, PNG mask",
        "examples": args.examples, "image_size": args.image_size, "repeats": args.repeats,
        "stages_cpu_ms_per_example": stages,
        "sum_of_map_stages_min": round(sum(stages[n]["min"] for n in parts), 3),
        "machine": {**machine, "load_average_at_end": common.load_average()},
        "time_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
    print(f"sum of the map's stages: {result['sum_of_map_stages_min']:.3f} ms; end to end: "
          f"{stages['end_to_end_map']['min']:.3f} ms", flush=True)
    common.write_json_atomic(args.output, result)
    print(json.dumps({k: v for k, v in result.items() if k != "stages_cpu_ms_per_example"},
                     indent=1))
    return result


if __name__ == "__main__":
    app.run(main)
