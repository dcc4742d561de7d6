"""Sharded, atomic, resumable TFRecord builder (the records of :mod:`harl_tf.data.schema`).

``build_dataset(source, output_dir, ...)`` turns a source (:mod:`harl_tf.data.sources`)
into ``<split>-<index:05d>-of-<count:05d>.tfrecord`` shards plus ``manifest.json``.

Modules: :mod:`~harl_tf.data.example_processing` (one example → one record, in the
workers), :mod:`~harl_tf.data.shards` (the shard plan, sidecars, manifest) and this
module, the local runner over them (:mod:`harl_tf.data.beam_build` is the Beam one).

Data flow. The parent lists every split (sorted ids; random-access sources are then
permuted by ``shuffle_seed`` so every shard mixes classes), cuts each list into contiguous
shards, and hands the examples of the shards still to build to worker processes
(``spawn``; the workers never import TensorFlow). A worker reads the image bytes, checks
them by decoding with PIL (corrupt files, the pixel cap), reads/validates or computes the
mask, encodes the mask as PNG and serialises the ``tf.train.Example`` with the small
protobuf encoder of :mod:`harl_tf.data.example_encoding` (byte-for-byte what
``schema.serialize_example`` gives with sorted map keys). The parent writes the records in
order with ``tf.io.TFRecordWriter`` (C++ framing and CRC32C): no CRC32C package is
installed, and a table-driven pure-python CRC32C measured ~20 ms per 30 kB record here,
six times the whole per-image work (~3.5 ms CPU for a 500x375 JPEG with its mask).

Images. The original bytes are stored when they are an 8-bit JPEG or PNG with 1 or 3
channels (``schema.decode_image`` converts grey to RGB the same way the mask method saw
it); any other image (BMP, TIFF, GIF, WebP, palette, RGBA, 16-bit, CMYK) is converted
with ``harl_tf.masks.to_rgb_uint8`` (alpha dropped, 16-bit → 8-bit) and stored as PNG.
EXIF orientation is ignored everywhere (TensorFlow's decoders ignore it too), so the mask
always lines up with the stored pixels.

Masks. A mask read from the source must have its image's height and width (else an error
naming both files; ``resize_masks`` resizes with nearest neighbours and counts it). Masks
whose values are only ``{0, 1}`` or only ``{0, 255}`` are binary; any other mask is
thresholded at 128 and counted. With ``mask_method`` the source's masks are not read and
the method computes each mask from the RGB pixels; ``mask/method`` and ``mask/params``
record it.

Bad input. An unreadable or corrupt image, or one over ``max_pixels`` (decompression-bomb
guard), is logged with its path, skipped and listed in the manifest; ``strict`` stops the
build instead. A missing mask, a mask that does not decode, or a mask of another size
stops the build with a message naming both files. An empty split is an error.

Crash safety and resume. A shard is written under a hidden temporary name
(``.<shard>.tmp``) and renamed when complete; then its sidecar ``_shards/<shard>.json``
(sha256, size, record and class counts, skipped files, and a fingerprint of the shard's
ids and of every option that changes the bytes) is written the same way. A rerun skips a
shard whose file and sidecar agree (same fingerprint, same size and sha256) and rebuilds
every other one; a stale temporary file is simply overwritten.

Several machines. :mod:`harl_tf.data.beam_build` runs this same plan and per-example
code as an Apache Beam pipeline (any runner; the recommended way past one machine). Without
Beam, ``num_partitions`` / ``partition_index``: machine ``i`` builds the
shards whose index ``k`` satisfies ``k % num_partitions == i``. The shard plan depends only
on the source and the options, so the union of the partitions is the single-machine build,
shard for shard. Each machine writes ``manifest.json`` from the sidecars it can see;
``complete`` is true once every shard is present (rerun any partition's command in a
shared output folder to refresh it: finished shards are only verified).

Memory stays flat: examples stream through a bounded window of chunks; only the list of
ids (a few hundred bytes per example) is held.
"""
from __future__ import annotations

import collections
import contextlib
import dataclasses
import logging
import os
import time
from typing import Any, Callable, Dict, Iterable, Iterator, List, Mapping, Optional, Sequence

from harl_tf import atomic
from harl_tf.data.example_processing import ExampleProcessor, init_worker, process_chunk
from harl_tf.data import shards as shard_files
from harl_tf.data.shards import BUILDER_VERSION, MANIFEST_NAME, SIDECAR_DIR, Shard, plan_split
from harl_tf.data.sources import Source
from harl_tf.errors import BuildError

logger = logging.getLogger(__name__)

__all__ = ["BuildError", "BuildSetup", "DEFAULT_MAX_PIXELS", "MANIFEST_NAME", "SIDECAR_DIR",
           "build_dataset", "build_shards", "naming_write_errors", "prepare_build"]

DEFAULT_MAX_PIXELS = 89_478_485  # PIL's default decompression-bomb limit
_CHUNK = 16  # examples per worker task


def _batched(items: Iterable[Any], size: int) -> Iterator[List[Any]]:
    batch: List[Any] = []
    for item in items:
        batch.append(item)
        if len(batch) == size:
            yield batch
            batch = []
    if batch:
        yield batch


def _ordered_map(function: Callable, tagged_chunks: Iterable[tuple], pool,
                 max_inflight: int) -> Iterator[tuple]:
    """``(tag, function(chunk))`` in input order; with a pool, at most ``max_inflight``
    chunks are in flight, so memory does not grow with the dataset."""
    if pool is None:
        for tag, chunk in tagged_chunks:
            yield tag, function(chunk)
        return
    window: collections.deque = collections.deque()
    for tag, chunk in tagged_chunks:
        window.append((tag, pool.apply_async(function, (chunk,))))
        if len(window) >= max_inflight:
            tag_out, result = window.popleft()
            yield tag_out, result.get()
    while window:
        tag_out, result = window.popleft()
        yield tag_out, result.get()


@dataclasses.dataclass
class BuildSetup:
    """The checked options of one build, shared by the local builder and the Beam pipeline
    (:mod:`harl_tf.data.beam_build`): ``processor_kwargs`` rebuild the per-example
    ``ExampleProcessor`` in any process; ``options`` enter every shard's fingerprint."""
    splits: List[str]
    need_masks: bool
    processor_kwargs: Dict[str, Any]
    processor: "ExampleProcessor"
    mask_info: Dict[str, Any]
    options: Dict[str, Any]


def prepare_build(source: Source, *, splits: Optional[Sequence[str]],
                  mask_method: Optional[str], mask_params: Optional[Mapping[str, Any]],
                  given_mask_method: Optional[str], num_shards: Optional[int],
                  resize_masks: bool, max_pixels: int) -> BuildSetup:
    """Checks the options before any work (bad values raise :class:`BuildError` naming the
    flag) and builds the mask method once, so its recorded name and parameters come from
    the method itself."""
    from harl_tf.data.schema import SCHEMA_VERSION
    if num_shards is not None and num_shards < 1:
        raise BuildError(f"--num_shards must be >= 1, got {num_shards}")
    if max_pixels < 1:
        raise BuildError(f"--max_pixels must be >= 1, got {max_pixels}")
    splits = list(splits) if splits else source.split_names()
    unknown = [s for s in splits if s not in source.split_names()]
    if unknown:
        raise BuildError(f"splits {unknown} are not in the source (it has "
                         f"{source.split_names()})")
    need_masks = not mask_method
    if need_masks and not source.has_masks:
        raise BuildError(f"the {source.kind} source has no masks: pass --mask_method")
    processor_kwargs = dict(
        mask_method=mask_method or None, mask_params=dict(mask_params or {}),
        given_mask_method=given_mask_method or source.default_mask_method,
        resize_masks=bool(resize_masks), max_pixels=int(max_pixels),
        schema_version=SCHEMA_VERSION)
    processor = ExampleProcessor(source, **processor_kwargs)
    mask_info = {"method": processor.mask_name, "params": processor.mask_params}
    options = {"schema_version": SCHEMA_VERSION, "builder_version": BUILDER_VERSION,
               "mask": mask_info, "resize_masks": bool(resize_masks),
               "max_pixels": int(max_pixels), "source": source.content_options()}
    return BuildSetup(splits, need_masks, processor_kwargs, processor, mask_info, options)


# ------------------------------------------------------------------------- builder


def build_dataset(source: Source, output_dir: str, *, splits: Optional[Sequence[str]] = None,
                  mask_method: Optional[str] = None,
                  mask_params: Optional[Mapping[str, Any]] = None,
                  given_mask_method: Optional[str] = None,
                  num_shards: Optional[int] = None, target_shard_mb: float = 128.0,
                  min_shards: int = 8, shuffle_seed: Optional[int] = 0,
                  num_partitions: int = 1, partition_index: int = 0,
                  num_workers: int = 1, resize_masks: bool = False, strict: bool = False,
                  max_pixels: int = DEFAULT_MAX_PIXELS,
                  progress: bool = True) -> Dict[str, Any]:
    """Builds (or resumes) the TFRecord shards of ``source`` in ``output_dir``.

    Args:
      source: a :class:`harl_tf.data.sources.Source`.
      splits: split names (default: all of the source's splits).
      mask_method / mask_params: compute masks with ``harl_tf.masks.get_method(name,
        **params)`` instead of reading the source's masks.
      given_mask_method: the ``mask/method`` recorded for masks read from the source
        (default: the source's, ``ground_truth`` for synthetic, ``given`` otherwise).
      num_shards: shards per split; default ``ceil(estimated bytes / target_shard_mb)``,
        at least ``min_shards``; never more than the split's examples.
      shuffle_seed: permutation of random-access sources before sharding (``None``: keep
        the sorted order).
      num_partitions / partition_index: build only the shards ``k`` with ``k %
        num_partitions == partition_index`` (several machines, one dataset).
      num_workers: worker processes (``<= 1``: all in this process).
      resize_masks, strict, max_pixels: see the module docstring.
      progress: show a progress bar (images/s; :mod:`harl_tf.progress`).

    Returns the manifest (also written to ``output_dir/manifest.json``).
    Raises :class:`BuildError` / :class:`SourceError` (both ``ValueError``).
    """
    import tensorflow as tf

    started = time.time()
    if not 0 <= partition_index < num_partitions:
        raise BuildError(f"--partition_index must be in [0, --num_partitions={num_partitions}),"
                         f" got {partition_index}")
    setup = prepare_build(source, splits=splits, mask_method=mask_method,
                          mask_params=mask_params, given_mask_method=given_mask_method,
                          num_shards=num_shards, resize_masks=resize_masks,
                          max_pixels=max_pixels)
    processor_kwargs, options = setup.processor_kwargs, setup.options
    parent_processor, mask_info = setup.processor, setup.mask_info

    os.makedirs(os.path.join(output_dir, SIDECAR_DIR), exist_ok=True)
    plan: Dict[str, List[Shard]] = {
        split: plan_split(source, split, options, need_masks=setup.need_masks,
                          num_shards=num_shards, target_shard_mb=target_shard_mb,
                          min_shards=min_shards, shuffle_seed=shuffle_seed)
        for split in setup.splits}

    pending = []
    for shards in plan.values():
        for shard in shards:
            if shard.index % num_partitions != partition_index:
                continue
            if shard_files.is_finished(output_dir, shard):
                logger.info("%s: already built, skipped", shard.name)
            else:
                pending.append(shard)

    total = sum(len(s.refs) for s in pending)
    with naming_write_errors(output_dir):
        written = build_shards(source, output_dir, pending, processor_kwargs,
                                parent_processor, num_workers=num_workers, strict=strict,
                                progress=progress, total=total,
                                writer_factory=tf.io.TFRecordWriter)
        seconds = time.time() - started
        manifest = shard_files.manifest(output_dir, source, plan, options, mask_info,
                                        num_partitions, partition_index)
        manifest["last_run"] = {
            "shards_built": len(pending), "images_processed": written,
            "seconds": round(seconds, 3), "num_workers": int(num_workers),
            "images_per_second": round(written / seconds, 2) if seconds > 0 else None}
        atomic.write_json_atomic(os.path.join(output_dir, MANIFEST_NAME), manifest)
    logger.info("built %d shards (%d images) in %.1f s (%.1f images/s); manifest %s",
                len(pending), written, seconds, written / max(seconds, 1e-9),
                os.path.join(output_dir, MANIFEST_NAME))
    return manifest


@contextlib.contextmanager
def naming_write_errors(output_dir: str):
    """A full disk, a quota or a read-only folder while writing: a :class:`BuildError`
    (the shard being written has already been removed; finished shards stay valid)."""
    import errno
    import sys
    tf = sys.modules.get("tensorflow")  # Beam workers write without TensorFlow
    exhausted = (tf.errors.ResourceExhaustedError,) if tf is not None else ()
    try:
        yield
    except exhausted as err:  # TFRecordWriter: no space left
        raise BuildError(f"cannot write to --output_dir {output_dir}: {err.message}; free "
                         f"space and rerun (finished shards are kept and skipped)") from None
    except OSError as err:
        if err.errno not in (errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EACCES):
            raise
        raise BuildError(f"cannot write to --output_dir {output_dir}: {err}; free space "
                         f"and rerun (finished shards are kept and skipped)") from None


def build_shards(source: Source, output_dir: str, pending: List[Shard],
                  processor_kwargs: Dict[str, Any], parent_processor: ExampleProcessor, *,
                  num_workers: int, strict: bool, progress: bool, total: int,
                  writer_factory) -> int:
    from harl_tf.progress import progress as progress_bar

    need_masks = not processor_kwargs["mask_method"]

    def tagged_chunks():
        for shard in pending:
            if source.random_access:
                items: Iterable[Any] = shard.refs
            else:
                items = source.read(shard.split, shard.refs, with_mask=need_masks)
            for chunk in _batched(items, _CHUNK):
                yield shard, chunk

    pool = None
    if num_workers > 1 and pending:
        import multiprocessing
        worker_source = source if source.random_access else None
        pool = multiprocessing.get_context("spawn").Pool(
            num_workers, initializer=init_worker, initargs=(worker_source, processor_kwargs))
        function: Callable = process_chunk
    else:
        function = lambda chunk: [parent_processor(item) for item in chunk]  # noqa: E731

    processed = 0
    current: Optional[Shard] = None
    state: Dict[str, Any] = {}
    bar = progress_bar(total=total, unit="img", desc="build_tfrecords", disable=not progress,
                       smoothing=0.1)
    try:
        for shard, results in _ordered_map(function, tagged_chunks(), pool,
                                           max_inflight=4 * max(num_workers, 1)):
            if shard is not current:
                if current is not None:
                    shard_files.finish_shard(output_dir, current, state)
                current = shard
                state = shard_files.open_shard(output_dir, shard, writer_factory)
            for result in results:
                shard_files.record_result(result, state, shard, strict)
            processed += len(results)
            bar.update(len(results))
        if current is not None:
            shard_files.finish_shard(output_dir, current, state)
            current = None
    finally:
        bar.close()
        if pool is not None:
            pool.terminate()
            pool.join()
        if current is not None:  # failed mid-shard: leave no partial file behind
            with contextlib.suppress(Exception):
                state["writer"].close()
            with contextlib.suppress(OSError):
                os.remove(state["temporary"])
    return processed
