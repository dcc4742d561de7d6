"""TFRecords and mask folders on Apache Beam: the same outputs as the local tools, on any
runner (DirectRunner here; Dataflow, Flink, Spark at scale). Needs the ``beam`` extra.

``build_dataset_beam`` is :func:`harl_tf.data.builder.build_dataset` as a pipeline::

    splits ─ListAndPlan─▶ shards (ids only) ─Reshuffle─▶ WriteShards ─ToList─▶ WriteManifest

- *ListAndPlan* lists each split and cuts it into shards with the builder's own
  :func:`~harl_tf.data.shards.plan_split` (sorted ids, ``shuffle_seed`` permutation,
  contiguous runs, fingerprints), so the plan is the local builder's, shard for shard.
  One worker lists one split; only ids travel (a few hundred bytes per example).
- *WriteShards* builds one shard per element with the builder's per-example code
  (``example_processing.ExampleProcessor``: read, check, compute or validate the mask,
  serialise with the one schema) and its shard writer. Image bytes never cross a shuffle:
  a worker reads, encodes and writes its shard, so worker memory is one shard's ids plus
  one example. The shards are therefore byte-identical to a local build's. Workers write
  the TFRecord framing themselves (CRC32C from ``google-crc32c``) and never import
  TensorFlow unless the mask method or the TFDS source needs it.
- *WriteManifest* runs once, after every shard: it reads the shard sidecars back from
  ``output_dir`` and writes ``manifest.json``.

The steps call the builder's own helpers (example_processing, shards, builder) on purpose:
one implementation of each step, whichever runner drives it.

Atomicity: this module writes through temporary files renamed into place, not through a
Beam sink. A shard is written as ``.<shard>.tmp`` and renamed when complete, then its
sidecar; ``manifest.json`` is renamed into place last. A failed or retried bundle leaves at
most a hidden ``.tmp`` file, which the retry overwrites; a rerun skips shards whose file and
sidecar agree (the local builder's resume). Two live attempts at one shard (speculative
execution, off by default on Spark and absent on Dataflow batch) would share the temporary
name; keep speculation off. Renames need a POSIX file system that every
worker mounts (local disk for the DirectRunner; NFS / Filestore, or a bucket mounted with
gcsfuse, on a cluster); ``gs://`` paths are not supported.

Bad input as in the local builder: a corrupt or oversized image is skipped, logged and
listed in the manifest; with ``strict`` the pipeline fails and :class:`PipelineError` says
which file. ``generate_mask_folder_beam`` is :func:`harl_tf.masks.folder.generate_mask_folder`
the same way (one element per image; summary by a combiner, written last).
"""
from __future__ import annotations

import contextlib
import json
import logging
import os
import re
import shlex
import struct
import time
from typing import Any, Dict, List, Mapping, Optional, Sequence, Union

import apache_beam as beam
from apache_beam.options.pipeline_options import PipelineOptions

from harl_tf import atomic
from harl_tf.data import builder, example_processing, shards
from harl_tf.data.sources import Source
from harl_tf.errors import HarlError, MissingPathError
from harl_tf.masks import folder

logger = logging.getLogger(__name__)

DIRECT_TWO_WORKERS = ("--runner=DirectRunner --direct_num_workers=2 "
                      "--direct_running_mode=multi_processing")
# Errors whose message is meant for people (they name the file); anything else is a bug.
_OWN_ERRORS = ("BuildError", "SourceError", "SchemaError", "CorruptImageError",
               "HarlError")


class PipelineError(HarlError):
    """The pipeline failed; the message is the failing step's own one-line error."""


# ------------------------------------------------------------------------ records


class _RecordFile:
    """A TFRecord file writer without TensorFlow: each record is its length (uint64),
    the masked CRC32C of the length, the data and the masked CRC32C of the data (all
    little-endian) — the bytes ``tf.io.TFRecordWriter`` writes. CRC32C comes from
    ``google-crc32c`` (C); without it TensorFlow's writer is used instead."""

    def __init__(self, path: str):
        import google_crc32c
        self._crc = google_crc32c.value
        self._file = open(path, "wb")

    def _masked(self, data: bytes) -> bytes:
        crc = self._crc(data)
        return struct.pack("<I", (((crc >> 15) | (crc << 17)) + 0xA282EAD8) & 0xFFFFFFFF)

    def write(self, record: bytes) -> None:
        length = struct.pack("<Q", len(record))
        self._file.write(b"".join((length, self._masked(length), record,
                                   self._masked(record))))

    def close(self) -> None:
        self._file.close()


def record_writer_factory():
    """``_RecordFile`` when ``google-crc32c`` is installed, else ``tf.io.TFRecordWriter``."""
    try:
        import google_crc32c  # noqa: F401
        return _RecordFile
    except ImportError:
        import tensorflow as tf
        return tf.io.TFRecordWriter


def _plan(split: str, source: Source, options: Dict[str, Any], plan_kwargs: Dict[str, Any]):
    yield from shards.plan_split(source, split, options, **plan_kwargs)


class _WriteShard(beam.DoFn):
    """Builds one planned shard (skipped when a previous run finished it); yields the
    shard without its ids, whether it was built, and the images processed."""

    def __init__(self, source: Source, processor_kwargs: Dict[str, Any], output_dir: str,
                 strict: bool):
        self._source, self._kwargs = source, processor_kwargs
        self._output_dir, self._strict = output_dir, strict

    def setup(self):
        self._processor = example_processing.ExampleProcessor(self._source, **self._kwargs)
        self._writer = record_writer_factory()

    def process(self, shard):
        if shards.is_finished(self._output_dir, shard):
            yield shard.without_refs(), False, 0
            return
        with builder.naming_write_errors(self._output_dir):
            processed = builder.build_shards(
                self._source, self._output_dir, [shard], self._kwargs, self._processor,
                num_workers=1, strict=self._strict, progress=False, total=shard.size,
                writer_factory=self._writer)
        yield shard.without_refs(), True, processed


def _write_manifest(results: List[tuple], source: Source, splits: List[str],
                    options: Dict[str, Any], output_dir: str, started: float,
                    runner: str) -> None:
    plan = {split: sorted((shard for shard, _, _ in results if shard.split == split),
                          key=lambda shard: shard.index) for split in splits}
    manifest = shards.manifest(output_dir, source, plan, options, options["mask"],
                                 num_partitions=1, partition_index=0)
    seconds = time.time() - started
    processed = sum(count for _, _, count in results)
    manifest["last_run"] = {
        "runner": runner, "shards_built": sum(1 for _, built, _ in results if built),
        "images_processed": processed, "seconds": round(seconds, 3),
        "images_per_second": round(processed / seconds, 2) if seconds > 0 else None}
    atomic.write_json_atomic(os.path.join(output_dir, shards.MANIFEST_NAME), manifest)


def build_dataset_beam(source: Source, output_dir: str, *,
                       pipeline_options: Union[str, Sequence[str], None] = None,
                       splits: Optional[Sequence[str]] = None,
                       mask_method: Optional[str] = None,
                       mask_params: Optional[Mapping[str, Any]] = None,
                       given_mask_method: Optional[str] = None,
                       num_shards: Optional[int] = None, target_shard_mb: float = 128.0,
                       min_shards: int = 8, shuffle_seed: Optional[int] = 0,
                       resize_masks: bool = False, strict: bool = False,
                       max_pixels: int = builder.DEFAULT_MAX_PIXELS) -> Dict[str, Any]:
    """Builds (or resumes) the TFRecord shards of ``source`` in ``output_dir`` with a Beam
    pipeline. ``pipeline_options``: Beam's command-line options (a string or a list), e.g.
    :data:`DIRECT_TWO_WORKERS` or ``--runner=DataflowRunner --project=... --region=...
    --setup_file=./setup.py`` (``None``: Beam's defaults, the DirectRunner in this
    process); every other argument means what it means in
    :func:`harl_tf.data.builder.build_dataset`.

    Returns the manifest (read back from ``output_dir/manifest.json``). Options are checked
    and the mask method is built once here, before the pipeline starts. Raises
    :class:`~harl_tf.data.builder.BuildError` for bad options, :class:`PipelineError` when
    a step fails (its message names the file).
    """
    started = time.time()
    output_dir = os.path.abspath(output_dir)
    setup = builder.prepare_build(source, splits=splits, mask_method=mask_method,
                                  mask_params=mask_params,
                                  given_mask_method=given_mask_method,
                                  num_shards=num_shards, resize_masks=resize_masks,
                                  max_pixels=max_pixels)
    os.makedirs(os.path.join(output_dir, shards.SIDECAR_DIR), exist_ok=True)
    manifest_path = os.path.join(output_dir, shards.MANIFEST_NAME)
    with contextlib.suppress(FileNotFoundError):  # a stale manifest must not look current
        os.remove(manifest_path)
    plan_kwargs = dict(need_masks=setup.need_masks, num_shards=num_shards,
                       target_shard_mb=target_shard_mb, min_shards=min_shards,
                       shuffle_seed=shuffle_seed)
    options = make_pipeline_options(pipeline_options)
    runner = options.get_all_options().get("runner") or "DirectRunner"
    with _naming_pipeline_errors():
        with beam.Pipeline(options=options) as pipeline:
            _ = (pipeline
                 | "Splits" >> beam.Create(setup.splits)
                 | "ListAndPlan" >> beam.FlatMap(_plan, source, setup.options, plan_kwargs)
                 | "Spread" >> beam.Reshuffle()
                 | "WriteShards" >> beam.ParDo(_WriteShard(
                     source, setup.processor_kwargs, output_dir, strict))
                 | "Gather" >> beam.combiners.ToList()
                 | "WriteManifest" >> beam.Map(_write_manifest, source, setup.splits,
                                               setup.options, output_dir, started, runner))
    with open(manifest_path, encoding="utf-8") as handle:
        return json.load(handle)


# -------------------------------------------------------------------------- masks


def _list_masks_todo(images_dir: str, masks_dir: str, shard_index: int, num_shards: int,
                     overwrite: bool):
    for rel in folder.shard(folder.list_images(images_dir), shard_index, num_shards):
        existing = not overwrite and folder.mask_exists(masks_dir, rel)
        yield rel, existing


class _WriteMask(beam.DoFn):
    """Computes and writes one image's mask; yields ``(rel, status, detail)`` as
    :func:`harl_tf.masks.folder.process_image`, status ``existing`` for a kept mask."""

    def __init__(self, method: str, method_params: Dict[str, Any], images_dir: str,
                 masks_dir: str, strict: bool):
        self._method, self._params = method, method_params
        self._images_dir, self._masks_dir, self._strict = images_dir, masks_dir, strict

    def setup(self):
        import cv2
        from harl_tf.masks import get_method
        cv2.setNumThreads(1)  # one process per core, as the local pool
        self._worker = {"method": get_method(self._method, **self._params),
                        "images_dir": self._images_dir, "masks_dir": self._masks_dir}

    def process(self, item):
        rel, existing = item
        if existing:
            yield rel, "existing", None
            return
        rel, status, detail = folder.process_image(self._worker, rel)
        if status == "corrupt" and self._strict:
            raise folder.CorruptImageError(f"{detail} (stopping: --strict)")
        yield rel, status, detail


class _CountMasks(beam.CombineFn):
    """Sums the per-image results into the summary of ``folder.new_summary``."""

    def __init__(self, blank: Dict[str, Any]):
        self._blank = blank

    def create_accumulator(self):
        return {**self._blank, "corrupt_paths": [], "fallback_reasons": {}}

    def add_input(self, summary, result):
        rel, status, detail = result
        summary["num_images"] += 1
        if status == "existing":
            summary["skipped_existing"] += 1
        else:
            folder.count_result(summary, rel, status, detail)
        return summary

    def merge_accumulators(self, summaries):
        summaries = list(summaries)
        total = summaries[0]
        for other in summaries[1:]:
            for key in ("num_images", "written", "skipped_existing", "corrupt", "fallbacks"):
                total[key] += other[key]
            total["corrupt_paths"].extend(other["corrupt_paths"])
            for reason, count in other["fallback_reasons"].items():
                total["fallback_reasons"][reason] = total["fallback_reasons"].get(reason, 0) + count
        return total

    def extract_output(self, summary):
        summary["corrupt_paths"].sort()
        return summary


def generate_mask_folder_beam(images_dir: str, masks_dir: str, *,
                              pipeline_options: Union[str, Sequence[str], None] = None,
                              method: str = "conventional",
                              method_params: Optional[Dict[str, Any]] = None,
                              shard_index: int = 0, num_shards: int = 1,
                              overwrite: bool = False, strict: bool = False,
                              summary_path: Optional[str] = None) -> Dict[str, Any]:
    """:func:`harl_tf.masks.folder.generate_mask_folder` as a Beam pipeline (one element
    per image; ``num_workers`` is the runner's business). Writes the same masks and the
    same summary JSON (last step, atomically) and returns the summary."""
    from harl_tf.masks import get_method
    started = time.time()
    method_params = dict(method_params or {})
    params = dict(get_method(method, **method_params).params)  # validates before any work
    images_dir, masks_dir = os.path.abspath(images_dir), os.path.abspath(masks_dir)
    folder.shard([], shard_index, num_shards)  # checks the shard flags
    if not os.path.isdir(images_dir):
        raise MissingPathError(f"--images_dir {images_dir!r} does not exist or is not a "
                               "directory")
    os.makedirs(masks_dir, exist_ok=True)
    blank = folder.new_summary(method, params, images_dir, masks_dir, shard_index, num_shards)
    with _naming_pipeline_errors():
        with beam.Pipeline(options=make_pipeline_options(pipeline_options)) as pipeline:
            _ = (pipeline
                 | "Root" >> beam.Create([images_dir])
                 | "List" >> beam.FlatMap(_list_masks_todo, masks_dir, shard_index,
                                          num_shards, overwrite)
                 | "Spread" >> beam.Reshuffle()
                 | "WriteMasks" >> beam.ParDo(_WriteMask(method, method_params, images_dir,
                                                         masks_dir, strict))
                 | "Count" >> beam.CombineGlobally(_CountMasks(blank))
                 | "WriteSummary" >> beam.Map(lambda summary: folder.finish_summary(
                     summary, time.time() - started, summary_path)))
    path = summary_path or folder.default_summary_path(masks_dir, shard_index, num_shards)
    with open(path, encoding="utf-8") as handle:
        return json.load(handle)


# ------------------------------------------------------------------------ helpers


def make_pipeline_options(pipeline_options: Union[str, Sequence[str], None]) -> PipelineOptions:
    """Beam's options from a command-line string (shell quoting) or a list; any runner's
    options pass through untouched. No ``--runner``: the DirectRunner, whose workers then
    log only critical messages unless ``--default_sdk_harness_log_level`` says otherwise."""
    if pipeline_options is None:
        pipeline_options = []
    if isinstance(pipeline_options, str):
        pipeline_options = shlex.split(pipeline_options)
    arguments = list(pipeline_options)
    options = PipelineOptions(arguments)
    given = options.get_all_options(drop_default=True)
    if (given.get("runner") in (None, "DirectRunner", "direct")
            and "default_sdk_harness_log_level" not in given):
        # Local workers share this terminal: without this, each prints its start-up and
        # every error's traceback, while the launcher already reports the error in one
        # line and the manifest lists skipped files.
        options = PipelineOptions(arguments + ["--default_sdk_harness_log_level=CRITICAL"])
    return options


@contextlib.contextmanager
def _naming_pipeline_errors():
    """A failing step becomes a :class:`PipelineError` carrying that step's own one-line
    message (a runner reports worker errors as text, e.g. a ``RuntimeError`` holding the
    remote traceback)."""
    # The DirectRunner relays every worker log line, and a worker's traceback, through
    # these loggers; the error itself comes back below as one line.
    quiet = {"apache_beam": logging.WARNING,
             "apache_beam.runners.portability.local_job_service": logging.CRITICAL}
    saved = {name: logging.getLogger(name).level for name in quiet}
    for name, level in quiet.items():
        logging.getLogger(name).setLevel(max(level, logging.getLogger(name).level))
    try:
        yield
    except Exception as err:  # noqa: BLE001 - runners wrap worker errors in many types
        message = own_error_message(err)
        if message is None:
            raise
        raise PipelineError(message) from None
    finally:
        for name, level in saved.items():
            logging.getLogger(name).setLevel(level)


def own_error_message(err: BaseException) -> Optional[str]:
    """The last harl-tf error line (``BuildError: …`` etc.) in ``err``'s text, without
    Beam's ``[while running '…']`` suffix; ``None`` when there is none."""
    suffix = re.compile(r"(?: \[while running '[^']*'\])+\s*$")
    if isinstance(err, HarlError):  # raised in this process
        return suffix.sub("", str(err).strip())
    pattern = re.compile(r"(?:^|[\s.])(?:%s): (.+)$" % "|".join(_OWN_ERRORS))
    found = None
    for line in str(err).splitlines():
        match = pattern.search(line)
        if match:
            found = suffix.sub("", match.group(1).strip())
    return found
