"""Input pipelines: two-view pretraining, linear-evaluation training, evaluation.

Pretraining (per worker): list the files → keep this worker's share of the FILES (through
``tf.distribute.InputContext``) → for each epoch e: shuffle the files, interleave their
records, permute them in blocks of ``shuffle_buffer``, all seeded by (seed, e) → number
each record → parse (:mod:`harl_tf.data.schema`) and make two views
(:mod:`harl_tf.data.augment`) → batch per replica, drop the remainder → prefetch.

Views are drawn from a per-example seed ``fold_in([seed, worker], n)``, n the record's
position in this worker's stream, so with ``deterministic=True`` and a ``seed`` every run
yields the same batches, and a resumed run (``start_example``) continues the stream of
the run it resumes. Nothing is cached: records are read and decoded every epoch.
"""
from __future__ import annotations

import contextlib
import json
import os
import random
import re
from typing import List, Optional, Sequence

import tensorflow as tf

from harl_tf.data import augment, builder, geometry, schema
from harl_tf.errors import ConfigError, DataError, MissingPathError

AUTOTUNE = tf.data.AUTOTUNE
# Serialized records permuted together as one block; about 110 kB each on ImageNet (JPEG +
# PNG mask), so about 1 GB per block, and up to two blocks (one emptying, one filling) per
# worker.
DEFAULT_SHUFFLE_BUFFER = 10_000
# Full decode then crop: two views need two crops, and two cropped JPEG decodes cost more
# CPU than one full decode (bench.bench_input_pipeline, 500x375 JPEGs, decode-and-crop
# step: 0.86 vs 1.16 CPU ms per example; end to end 5.2 vs 5.7 CPU ms).
DEFAULT_FUSED_CROP = False
_MAX_CYCLE_LENGTH = 16


def list_files(file_pattern: str, input_context: Optional[tf.distribute.InputContext] = None,
               *, caller: str = "pipeline") -> List[str]:
    """The sorted files matching ``file_pattern`` (a glob, or comma-separated globs), and
    of them this input pipeline's share ``files[id::num_input_pipelines]``.

    Raises FileNotFoundError naming the pattern when nothing matches, and ValueError
    naming both numbers when there are fewer files than input pipelines.
    """
    files: List[str] = []
    for pattern in str(file_pattern).split(","):
        if pattern.strip():
            files.extend(tf.io.gfile.glob(pattern.strip()))
    files = sorted(set(files))
    if not files:
        raise MissingPathError(
            f"{caller}: no file matches file_pattern {file_pattern!r}; build records with "
            f"tools/build_tfrecords.py or fix the pattern")
    if input_context is not None:
        count = input_context.num_input_pipelines
        if len(files) < count:
            raise ConfigError(
                f"{caller}: {len(files)} file(s) match {file_pattern!r} but there are "
                f"{count} input pipelines (workers); each worker reads whole files, so "
                f"write at least {count} shards")
        files = files[input_context.input_pipeline_id::count]
    return files


class CorruptRecordError(DataError):
    """A TFRecord file is truncated or corrupt; the message names the file and the record."""


def locate_corrupt_record(file_pattern: str, error: Optional[Exception] = None) -> str:
    """Which file (and record) of ``file_pattern`` a ``tf.errors.DataLossError`` came from.

    TFRecordDataset's message gives the byte offset ("corrupted record at 5680",
    "truncated record at 5668") but not the file. Only files longer than that offset can
    hold it; they are read (framing and CRCs only, nothing decoded) until one fails. Cost:
    one read of those files, on the failure path only. Returns a one-line description.
    """
    message = "" if error is None else getattr(error, "message", str(error))
    found = re.search(r"record at (\d+)", message)
    offset = int(found.group(1)) if found else -1
    files = list_files(file_pattern, caller="locate_corrupt_record")
    for path in files:
        if tf.io.gfile.stat(path).length <= offset:
            continue
        try:
            for _ in schema.iterate_records(path):
                pass
        except schema.SchemaError as err:
            return str(err)
    what = f" ({message.strip().splitlines()[-1]})" if message.strip() else ""
    return (f"a record of {file_pattern!r} is corrupt or truncated{what}, but none of its "
            f"{len(files)} file(s) fails when read again (was a file replaced?)")


@contextlib.contextmanager
def naming_corrupt_files(file_pattern: str):
    """Turns a ``tf.errors.DataLossError`` raised while iterating a dataset of
    ``file_pattern`` (in a loop or in Keras ``fit``) into :class:`CorruptRecordError`
    naming the file and the record index::

        with pipeline.naming_corrupt_files(config.train_files):
            model.fit(dataset, ...)
    """
    try:
        yield
    except tf.errors.DataLossError as err:
        raise CorruptRecordError(locate_corrupt_record(file_pattern, err)) from None


def _check_sizes(caller: str, batch_size: int, image_size: int) -> None:
    if int(batch_size) <= 0:
        raise ValueError(f"{caller}: batch_size must be positive, got {batch_size}")
    if int(image_size) <= 0:
        raise ValueError(f"{caller}: image_size must be positive, got {image_size}")


def _options(deterministic: bool, sharded_by_us: bool) -> tf.data.Options:
    options = tf.data.Options()
    options.deterministic = deterministic
    # One thread per op inside the map functions: the map already runs examples in
    # parallel, and splitting each small image op over the cores as well cost about
    # 1 CPU ms of 6 per two-view example in thread hand-offs (bench.bench_input_stages).
    options.threading.max_intra_op_parallelism = 1
    if sharded_by_us:
        options.experimental_distribute.auto_shard_policy = (
            tf.data.experimental.AutoShardPolicy.OFF)
    return options


def count_records(files: Sequence[str]) -> int:
    """Records in ``files``: from the builder's ``manifest.json`` next to each file when it
    lists the file, else by reading the file (records only, nothing is decoded)."""
    manifests: dict = {}
    total = 0
    for path in files:
        directory, name = os.path.split(path)
        if directory not in manifests:
            manifests[directory] = _manifest_counts(directory)
        if name in manifests[directory]:
            total += manifests[directory][name]
        else:
            total += int(tf.data.TFRecordDataset(path).reduce(
                tf.constant(0, tf.int64), lambda n, _: n + 1))
    return total


def _manifest_counts(directory: str) -> dict:
    path = os.path.join(directory, builder.MANIFEST_NAME)
    try:
        with tf.io.gfile.GFile(path) as f:
            manifest = json.load(f)
        return {shard["file"]: int(shard["num_records"])
                for split in manifest.get("splits", {}).values()
                for shard in split.get("shards", [])}
    except (tf.errors.NotFoundError, OSError, ValueError, KeyError, TypeError):
        return {}     # no manifest, or not one of ours: the files are counted instead


def _numbered_records(files: Sequence[str], *, seed: int, deterministic: bool,
                      shuffle_buffer: int, repeat: bool, start: int = 0) -> tf.data.Dataset:
    """(n int64, serialized record): epochs of shuffled files, interleaved, then shuffled in
    blocks of ``shuffle_buffer`` records (each block permuted as a whole; a block as large
    as the dataset gives a full permutation per epoch).

    Every permutation is stateless, seeded by (seed, epoch, block), so the stream can start
    at record ``start`` of the endless stream: at epoch start // N (N records in
    ``files``), skipping the rest by reading them (at most one epoch of records, none
    decoded). With ``deterministic`` that is the uninterrupted stream's tail, numbers
    included. (``Dataset.shuffle`` cannot do this: its order depends on the iterations
    before, and it rejects a seed tensor when the global seed is 0.)
    """
    start = int(start)
    if start < 0:
        raise ValueError(f"pipeline: start must be >= 0, got {start}")
    first_epoch, skip = 0, start
    if start:
        size = count_records(files)
        if size == 0:
            raise DataError(f"pipeline: the files hold no records: {list(files)[:3]}")
        first_epoch, skip = divmod(start, size)
    seeds = tf.constant([seed, 0x5EED], tf.int64)
    file_names = tf.constant(list(files))
    fold_in = tf.random.experimental.stateless_fold_in

    @tf.autograph.experimental.do_not_convert
    def epoch_records(epoch):
        epoch_seed = fold_in(seeds, epoch)
        order = tf.random.experimental.stateless_shuffle(file_names, seed=epoch_seed)
        dataset = tf.data.Dataset.from_tensor_slices(order).interleave(
            tf.data.TFRecordDataset, cycle_length=min(len(files), _MAX_CYCLE_LENGTH),
            block_length=1, num_parallel_calls=AUTOTUNE, deterministic=deterministic)
        if shuffle_buffer > 1:
            dataset = dataset.batch(int(shuffle_buffer)).enumerate().map(
                lambda block, records: tf.random.experimental.stateless_shuffle(
                    records, seed=fold_in(epoch_seed, block + 1))).unbatch()
        return dataset

    last_epoch = tf.int64.max if repeat else 1
    dataset = tf.data.Dataset.range(first_epoch, last_epoch).flat_map(epoch_records)
    if skip:
        dataset = dataset.skip(skip)
    return dataset.enumerate(start=start)


def _base_seed(seed: Optional[int], deterministic: bool, caller: str) -> int:
    if seed is None:
        if deterministic:
            raise ValueError(f"{caller}: deterministic=True needs a seed (got seed=None)")
        return random.SystemRandom().randrange(2 ** 31)
    return int(seed)


def pretrain_dataset(file_pattern: str, batch_size: int, image_size: int, *,
                     input_context: Optional[tf.distribute.InputContext] = None,
                     seed: Optional[int] = None, deterministic: bool = False,
                     shuffle_buffer: int = DEFAULT_SHUFFLE_BUFFER,
                     view_configs: Optional[Sequence[augment.ViewConfig]] = None,
                     fused_crop: bool = DEFAULT_FUSED_CROP,
                     repeat: bool = True, start_example: int = 0) -> tf.data.Dataset:
    """Two-view pretraining batches.

    Args:
      file_pattern: glob (or comma-separated globs) of TFRecord files in
        :mod:`harl_tf.data.schema`.
      batch_size: examples per batch — per replica when ``input_context`` is given
        (``input_context.get_per_replica_batch_size(global)``, as
        :func:`distributed_pretrain_dataset` does).
      image_size: side S of the views.
      input_context: this worker's input pipeline; files are split between pipelines.
      seed: seeds file order, record shuffling and the views. None: a fresh random seed.
      deterministic: keep element order fixed (needs ``seed``); identical batches across
        runs. False lets parallel stages reorder for speed.
      shuffle_buffer: records permuted together (held in memory as one block).
      view_configs: (view 1, view 2) :class:`augment.ViewConfig`; default SPEC §2.
      fused_crop: decode only each crop window of a JPEG (True) or the whole image.
      repeat: repeat forever (training is step-based).
      start_example: begin at this record of this worker's endless stream (a resumed run:
        steps done × examples per step and worker). Epoch orders depend on the seed and
        the epoch only, so with ``deterministic`` the batches are the ones an
        uninterrupted run would see from there; getting there reads (does not decode)
        up to one epoch of records.
    Returns:
      Dataset of {"view1", "view2": float32 [B, S, S, 3] in [0, 1], "mask1", "mask2":
      float32 [B, S, S, 1] in {0, 1}, "label": int64 [B]}.
    """
    configs = tuple(view_configs or augment.default_view_configs())

    def make_views(serialized, example_seed):
        return augment.two_views(schema.parse_example(serialized), example_seed,
                                 image_size, view_configs=configs, fused_crop=fused_crop)

    return _augmented_batches(
        "pretrain_dataset", file_pattern, make_views, batch_size, image_size,
        input_context=input_context, seed=seed, deterministic=deterministic,
        shuffle_buffer=shuffle_buffer, repeat=repeat, start_example=start_example)


def _augmented_batches(caller, file_pattern, map_fn, batch_size, image_size, *,
                       input_context, seed, deterministic, shuffle_buffer, repeat,
                       start_example):
    """The pipeline shared by the training datasets: checks, this worker's files,
    numbered shuffled records → ``map_fn(serialized, example_seed)`` → full batches →
    prefetch. ``example_seed`` = fold_in([seed, worker], record number): a stateless seed
    per example, so the views do not depend on parallelism or order of the map."""
    _check_sizes(caller, batch_size, image_size)
    files = list_files(file_pattern, input_context, caller=caller)
    base = _base_seed(seed, deterministic, caller)
    worker = 0 if input_context is None else input_context.input_pipeline_id
    base_seed = tf.constant([base, worker], tf.int64)

    @tf.autograph.experimental.do_not_convert  # plain tf ops; tracing stays fast
    def numbered_map(index, serialized):
        return map_fn(serialized, tf.random.experimental.stateless_fold_in(base_seed, index))

    dataset = _numbered_records(files, seed=base, deterministic=deterministic,
                                shuffle_buffer=shuffle_buffer, repeat=repeat,
                                start=start_example)
    dataset = dataset.map(numbered_map, num_parallel_calls=AUTOTUNE,
                          deterministic=deterministic)
    dataset = dataset.batch(int(batch_size), drop_remainder=True)
    dataset = dataset.prefetch(AUTOTUNE)
    return dataset.with_options(_options(deterministic, input_context is not None))


def distributed_pretrain_dataset(strategy: tf.distribute.Strategy, file_pattern: str,
                                 global_batch_size: int, image_size: int, *,
                                 start_step: int = 0, **kwargs):
    """:func:`pretrain_dataset` on every worker through
    ``strategy.distribute_datasets_from_function``; each replica gets
    ``global_batch_size / num_replicas`` examples. ``start_step``: steps already trained
    (a resumed run); every worker's stream continues where those steps left it.
    ``kwargs`` go to pretrain_dataset."""
    replicas = strategy.num_replicas_in_sync
    if global_batch_size % replicas:
        raise ValueError(f"distributed_pretrain_dataset: global_batch_size "
                         f"{global_batch_size} is not divisible by the {replicas} replicas")

    def dataset_fn(input_context: tf.distribute.InputContext) -> tf.data.Dataset:
        per_replica = input_context.get_per_replica_batch_size(global_batch_size)
        replicas_here = replicas // input_context.num_input_pipelines
        return pretrain_dataset(
            file_pattern, per_replica, image_size, input_context=input_context,
            start_example=int(start_step) * per_replica * replicas_here, **kwargs)

    return strategy.distribute_datasets_from_function(dataset_fn)


def train_classifier_dataset(file_pattern: str, batch_size: int, image_size: int, *,
                             input_context: Optional[tf.distribute.InputContext] = None,
                             seed: Optional[int] = None, deterministic: bool = False,
                             shuffle_buffer: int = DEFAULT_SHUFFLE_BUFFER,
                             crop_area=(0.08, 1.0), flip_prob: float = 0.5,
                             fused_crop: bool = DEFAULT_FUSED_CROP,
                             repeat: bool = True, start_example: int = 0,
                             with_mask: bool = False) -> tf.data.Dataset:
    """Training batches for linear evaluation / fine-tuning (SPEC §8): Inception crop
    (area ``crop_area``, aspect 3/4–4/3) and horizontal flip, no colour.

    Returns a dataset of {"image": float32 [B, S, S, 3] in [0, 1], "label": int64 [B]},
    and with ``with_mask`` "mask": float32 [B, S, S, 1] in {0, 1} (the record's mask, same
    crop and flip); arguments as in :func:`pretrain_dataset`.
    """
    config = augment.ViewConfig(crop_area=tuple(crop_area),
                                flip_prob=flip_prob).geometry_only()

    def make_view(serialized, example_seed):
        parsed = schema.parse_example(serialized)
        (view,) = augment.record_views(parsed, example_seed, [config], image_size,
                                       fused_crop=fused_crop, with_mask=with_mask)
        batch = {"image": view.image, "label": parsed["label"]}
        if with_mask:
            batch["mask"] = view.mask
        return batch

    return _augmented_batches(
        "train_classifier_dataset", file_pattern, make_view, batch_size, image_size,
        input_context=input_context, seed=seed, deterministic=deterministic,
        shuffle_buffer=shuffle_buffer, repeat=repeat, start_example=start_example)


def eval_dataset(file_pattern: str, batch_size: int, image_size: int, *,
                 crop_fraction: float = 0.875,
                 input_context: Optional[tf.distribute.InputContext] = None,
                 fused_crop: bool = DEFAULT_FUSED_CROP,
                 with_mask: bool = False) -> tf.data.Dataset:
    """Evaluation batches: one pass, in file order (sorted file names, then record order),
    no augmentation. Each image is cut to its central square of side
    ``floor(crop_fraction · min(H, W))`` and resized (bicubic) to S × S; with
    ``with_mask`` its mask too (same window, nearest neighbour).

    With ``input_context``, pipeline i keeps records i, i + n, ... (records, not files, so
    that every record is seen exactly once whatever the number of files). The last batch
    may be smaller.

    Returns a dataset of {"image": float32 [B, S, S, 3] in [0, 1], "label": int64 [B],
    "id": string [B]} and with ``with_mask`` "mask": float32 [B, S, S, 1] in {0, 1}.
    """
    caller = "eval_dataset"
    _check_sizes(caller, batch_size, image_size)
    if not 0.0 < crop_fraction <= 1.0:
        raise ValueError(f"{caller}: crop_fraction must be in (0, 1], got {crop_fraction}")
    files = list_files(file_pattern, None, caller=caller)
    dataset = tf.data.TFRecordDataset(files)
    if input_context is not None:
        dataset = dataset.shard(input_context.num_input_pipelines,
                                input_context.input_pipeline_id)

    @tf.autograph.experimental.do_not_convert
    def center(serialized):
        parsed = schema.parse_example(serialized)
        (cropped,), (window,), shape = geometry.decode_and_crop(
            parsed["image"], [lambda shape: geometry.central_crop_window(shape, crop_fraction)],
            fused=fused_crop)
        image = geometry.resize_image(cropped, image_size, "bicubic")
        image.set_shape([image_size, image_size, 3])
        batch = {"image": image, "label": parsed["label"], "id": parsed["id"]}
        if with_mask:
            mask = schema.decode_mask(parsed)
            check = tf.debugging.Assert(  # the window was drawn on the image's shape
                tf.reduce_all(tf.equal(tf.shape(mask)[:2], shape[:2])),
                ["harl-tf record: the mask and the image differ in size (rebuild the "
                 "record); id, mask shape, image shape:", parsed["id"], tf.shape(mask), shape])
            with tf.control_dependencies([check]):
                mask = geometry.resize_mask(geometry.crop(mask, window), image_size)
            mask.set_shape([image_size, image_size, 1])
            batch["mask"] = mask
        return batch

    dataset = dataset.map(center, num_parallel_calls=AUTOTUNE, deterministic=True)
    dataset = dataset.batch(int(batch_size), drop_remainder=False)
    dataset = dataset.prefetch(AUTOTUNE)
    return dataset.with_options(_options(True, input_context is not None))
