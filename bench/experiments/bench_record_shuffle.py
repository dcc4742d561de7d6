r"""What the restartable record order costs: stateless block permutation vs ``Dataset.shuffle``.

    python -m bench.experiments.bench_record_shuffle

The pretraining stream (``harl_tf.data.pipeline._numbered_records``) permutes each epoch's
records in stateless blocks so that a resumed run can continue it exactly. This measures,
in one process and alternating the two, the raw record rate (serialized records, nothing
decoded) of that stream against the ``Dataset.shuffle(reshuffle_each_iteration) .repeat()``
stream it replaced, on the same files and buffer size; and the time to the first record
of a stream resumed half-way through an epoch (the records it reads to get there) against
one started at 0. For scale, the full two-view pipeline makes a few hundred examples/s per
core (BENCHMARKS.md, input pipeline). Records: the embedded synthetic set at
``--image_size`` (``--records``), or any ``--files`` glob. Writes
``bench/results/bench_record_shuffle.json``.
"""
from __future__ import annotations

import os
import tempfile
import time

from absl import app, flags

from bench import common

FLAGS = flags.FLAGS
flags.DEFINE_string("files", "", "TFRecord glob (default: build the synthetic set).")
flags.DEFINE_integer("records", 3000, "Synthetic records to build when --files is empty.")
flags.DEFINE_integer("image_size", 64, "Synthetic image side, px.")
flags.DEFINE_integer("shuffle_buffer", 3000, "Records per block / shuffle buffer.")
flags.DEFINE_integer("epochs", 4, "Epochs read per measurement.")
flags.DEFINE_integer("repeats", 3, "Alternating measurements of each stream.")


def main(argv):
    del argv
    machine = common.machine_info()
    print(common.describe_machine(machine), flush=True)
    import tensorflow as tf
    from harl_tf.data import pipeline
    scratch = tempfile.mkdtemp(prefix="harl_bench_shuffle_")
    pattern = FLAGS.files
    if not pattern:
        from harl_tf.data.builder import build_dataset
        from harl_tf.data.sources import SyntheticSource
        build_dataset(SyntheticSource(FLAGS.records, image_size=FLAGS.image_size), scratch,
                      splits=["train"], min_shards=8, progress=False)
        pattern = os.path.join(scratch, "train-*.tfrecord")
    files = pipeline.list_files(pattern)
    size = pipeline.count_records(files)
    buffer = FLAGS.shuffle_buffer

    def baseline():
        d = tf.data.Dataset.from_tensor_slices(files).shuffle(len(files), seed=0)
        d = d.interleave(tf.data.TFRecordDataset, cycle_length=min(len(files), 16),
                         num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
        return d.shuffle(buffer, seed=1).repeat().enumerate()

    def stateless(start=0):
        return pipeline._numbered_records(files, seed=0, deterministic=True,
                                          shuffle_buffer=buffer, repeat=True, start=start)

    def rate(dataset):
        count = FLAGS.epochs * size
        started = time.perf_counter()
        n = sum(1 for _ in dataset.take(count))
        return n / (time.perf_counter() - started)

    def first_record_seconds(dataset):
        started = time.perf_counter()
        next(iter(dataset))
        return time.perf_counter() - started

    rates = {"dataset_shuffle": [], "stateless_blocks": []}
    first = {"start_0": [], "start_half_epoch": []}
    for _ in range(FLAGS.repeats):
        rates["dataset_shuffle"].append(rate(baseline()))
        rates["stateless_blocks"].append(rate(stateless()))
        first["start_0"].append(first_record_seconds(stateless()))
        first["start_half_epoch"].append(first_record_seconds(stateless(3 * size + size // 2)))
    medians = {k: common.median(v) for k, v in {**rates, **first}.items()}
    ratio = medians["stateless_blocks"] / medians["dataset_shuffle"]
    print(common.table([
        ("Dataset.shuffle + repeat (records/s)", medians["dataset_shuffle"]),
        ("stateless blocks (records/s)", medians["stateless_blocks"]),
        ("ratio stateless / Dataset.shuffle", ratio),
        ("first record, start 0 (s)", medians["start_0"]),
        ("first record, resumed mid epoch 3 (s)", medians["start_half_epoch"]),
    ], ["measure", "median"]))
    common.write_result("bench_record_shuffle", {
        "machine": machine, "files": len(files), "records": size,
        "bytes": sum(os.path.getsize(f) for f in files), "shuffle_buffer": buffer,
        "epochs_per_measurement": FLAGS.epochs, "records_per_second": rates,
        "first_record_seconds": first, "medians": medians,
        "ratio_stateless_over_dataset_shuffle": ratio})


if __name__ == "__main__":
    app.run(main)
