"""Masks for a whole image folder, written into a mirrored mask folder.

``images_dir/a/b/x.jpg`` → ``masks_dir/a/b/x.png`` (single channel, 0 = background,
255 = foreground): the ``images_dir`` root is replaced by ``masks_dir`` and the extension
by ``.png``.

- **Sharding**: the sorted list of relative image paths is split round-robin, shard ``i``
  of ``n`` taking items ``i, i + n, i + 2n, …``; shards are disjoint, together cover every
  image, and do not depend on the machine.
- **Resume**: an existing output is skipped (unless ``overwrite``); outputs are written to a
  temporary file and renamed, so an interrupted run never leaves a partial PNG.
- **Errors**: an unreadable image is reported by path and counted; with ``strict`` the
  run stops at the first one.
- **Parallelism**: ``num_workers`` > 1 uses that many processes (``spawn``, one method
  instance each); use 1 for methods that hold a TensorFlow model.
- **Summary**: a JSON file with counts, fallbacks and the method's parameters, written
  atomically to ``summary_path`` (default ``masks_dir/summary.json``, or
  ``summary-<i>-of-<n>.json`` for a shard).
"""
from __future__ import annotations

import io
import multiprocessing
import os
import time
from typing import Any, Dict, Iterable, List, Optional, Tuple

import numpy as np

from harl_tf.atomic import write_bytes_atomic, write_json_atomic
from harl_tf.errors import ConfigError, DataError, MissingPathError
from harl_tf.masks import get_method, to_rgb_uint8

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff")


class CorruptImageError(DataError):
    """An image file could not be decoded; the message names the path."""


def list_images(images_dir: str) -> List[str]:
    """Sorted ``/``-separated paths, relative to ``images_dir``, of every image file below
    it (extensions ``IMAGE_EXTENSIONS``, any case)."""
    if not os.path.isdir(images_dir):
        raise MissingPathError(f"--images_dir {images_dir!r} does not exist or is not a "
                               "directory")
    found = []
    for directory, subdirs, files in os.walk(images_dir):
        subdirs.sort()
        for filename in files:
            if os.path.splitext(filename)[1].lower() in IMAGE_EXTENSIONS:
                rel = os.path.relpath(os.path.join(directory, filename), images_dir)
                found.append(rel.replace(os.sep, "/"))
    return sorted(found)


def shard(items: List[str], shard_index: int, num_shards: int) -> List[str]:
    """Round-robin shard ``shard_index`` of ``num_shards`` of the (already sorted) list."""
    if num_shards < 1:
        raise ConfigError(f"--num_shards must be >= 1, got {num_shards}")
    if not 0 <= shard_index < num_shards:
        raise ConfigError(f"--shard_index must be in [0, {num_shards - 1}], got {shard_index}")
    return items[shard_index::num_shards]


def mask_relpath(image_relpath: str) -> str:
    """``a/b/x.jpg`` → ``a/b/x.png``."""
    return os.path.splitext(image_relpath)[0] + ".png"


def read_image(path: str) -> np.ndarray:
    """Decodes an image file fully into ``uint8`` RGB ``[H, W, 3]`` (grey, alpha, palette,
    CMYK and 16-bit files are converted, see ``to_rgb_uint8``). Raises
    ``CorruptImageError`` naming ``path`` when it cannot be decoded (truncated too)."""
    from PIL import Image

    try:
        with Image.open(path) as image:
            image.load()
            if image.mode not in ("RGB", "RGBA", "L", "LA", "I;16", "I;16B", "I;16L", "I",
                                  "F", "1"):
                image = image.convert("RGB")
            array = np.asarray(image)
    except Exception as error:  # PIL raises several types for damaged files
        raise CorruptImageError(f"cannot decode image {path!r}: {error}") from error
    return to_rgb_uint8(array, name=path)


def write_mask_png(path: str, mask: np.ndarray) -> None:
    """Writes ``mask`` (``{0, 1}`` or ``{0, 255}`` ``[H, W]``) as a single-channel 0/255 PNG,
    atomically (:mod:`harl_tf.atomic`)."""
    from PIL import Image

    buffer = io.BytesIO()
    Image.fromarray(np.where(np.asarray(mask) > 0, 255, 0).astype(np.uint8), mode="L").save(
        buffer, format="PNG")
    write_bytes_atomic(path, buffer.getvalue())



# One method instance per worker process (set by _init_worker).
_WORKER: Dict[str, Any] = {}


def _init_worker(method: str, method_params: Dict[str, Any], images_dir: str,
                 masks_dir: str) -> None:
    import cv2
    cv2.setNumThreads(1)  # one process per core; no oversubscription
    _WORKER.update(method=get_method(method, **method_params), images_dir=images_dir,
                   masks_dir=masks_dir)


def _process(rel: str) -> Tuple[str, str, Optional[str]]:
    return process_image(_WORKER, rel)


def process_image(worker: Dict[str, Any], rel: str) -> Tuple[str, str, Optional[str]]:
    """Computes and writes the mask of one image; ``worker`` holds ``method``,
    ``images_dir`` and ``masks_dir``. Returns ``(rel, status, detail)``; status
    ``"written"`` (detail: fallback reason or None) or ``"corrupt"`` (detail: the error
    message)."""
    method = worker["method"]
    source = os.path.join(worker["images_dir"], *rel.split("/"))
    try:
        image = read_image(source)
    except CorruptImageError as error:
        return rel, "corrupt", str(error)
    if hasattr(method, "compute"):
        result = method.compute(image)
        mask, fallback = result.mask, result.fallback
    else:
        mask, fallback = method(image), None
    write_mask_png(os.path.join(worker["masks_dir"], *mask_relpath(rel).split("/")), mask)
    return rel, "written", fallback


def mask_exists(masks_dir: str, rel: str) -> bool:
    """Whether the mask of image ``rel`` is already in ``masks_dir`` (resume)."""
    return os.path.isfile(os.path.join(masks_dir, *mask_relpath(rel).split("/")))


def new_summary(method: str, params: Dict[str, Any], images_dir: str, masks_dir: str,
                shard_index: int, num_shards: int) -> Dict[str, Any]:
    """The summary with every count at zero (see :func:`generate_mask_folder`)."""
    return dict(method=method, params=params, images_dir=os.path.abspath(images_dir),
                masks_dir=os.path.abspath(masks_dir), shard_index=shard_index,
                num_shards=num_shards, num_images=0, written=0, skipped_existing=0,
                corrupt=0, corrupt_paths=[], fallbacks=0, fallback_reasons={})


def count_result(summary: Dict[str, Any], rel: str, status: str, detail: Optional[str]
                 ) -> None:
    """Adds one ``(rel, status, detail)`` of :func:`process_image` to ``summary``."""
    if status == "corrupt":
        summary["corrupt"] += 1
        summary["corrupt_paths"].append(os.path.join(summary["images_dir"], rel))
        return
    summary["written"] += 1
    if detail is not None:
        summary["fallbacks"] += 1
        summary["fallback_reasons"][detail] = summary["fallback_reasons"].get(detail, 0) + 1


def default_summary_path(masks_dir: str, shard_index: int, num_shards: int) -> str:
    """``masks_dir/summary.json``, or ``summary-<i>-of-<n>.json`` for a shard."""
    name = ("summary.json" if num_shards == 1
            else f"summary-{shard_index:05d}-of-{num_shards:05d}.json")
    return os.path.join(masks_dir, name)


def finish_summary(summary: Dict[str, Any], seconds: float,
                   summary_path: Optional[str]) -> Dict[str, Any]:
    """Adds the timing and writes the summary JSON atomically (default path: in
    ``masks_dir``, named after the shard)."""
    summary["seconds"] = round(seconds, 3)
    summary["images_per_second"] = round(summary["written"] / seconds, 3) if seconds else 0.0
    if summary_path is None:
        summary_path = default_summary_path(summary["masks_dir"], summary["shard_index"],
                                            summary["num_shards"])
    write_json_atomic(summary_path, summary)
    return summary


def generate_mask_folder(images_dir: str, masks_dir: str, *, method: str = "conventional",
                         method_params: Optional[Dict[str, Any]] = None, num_workers: int = 1,
                         shard_index: int = 0, num_shards: int = 1, overwrite: bool = False,
                         strict: bool = False, progress: bool = True,
                         summary_path: Optional[str] = None) -> Dict[str, Any]:
    """Writes the mask of every image of shard ``shard_index``/``num_shards`` under
    ``images_dir`` into the mirrored path under ``masks_dir`` (rules in the module
    docstring). Returns the summary dict (also written as JSON):

    ``method``, ``params``, ``images_dir``, ``masks_dir``, ``shard_index``, ``num_shards``,
    ``num_images`` (in this shard), ``written``, ``skipped_existing``, ``corrupt``,
    ``corrupt_paths``, ``fallbacks``, ``fallback_reasons`` ({reason: count}),
    ``seconds``, ``images_per_second`` (written images / wall time).
    """
    method_params = dict(method_params or {})
    instance = get_method(method, **method_params)  # validates before any work
    params = dict(instance.params)
    if num_workers < 1:
        raise ConfigError(f"--num_workers must be >= 1, got {num_workers}")
    todo_all = shard(list_images(images_dir), shard_index, num_shards)
    os.makedirs(masks_dir, exist_ok=True)

    todo = todo_all if overwrite else [rel for rel in todo_all
                                       if not mask_exists(masks_dir, rel)]
    summary = new_summary(method, params, images_dir, masks_dir, shard_index, num_shards)
    summary.update(num_images=len(todo_all), skipped_existing=len(todo_all) - len(todo))
    start = time.perf_counter()
    bar = _progress_bar(len(todo), progress, f"masks ({method})")
    try:
        for rel, status, detail in _run(todo, instance, method, method_params, images_dir,
                                        masks_dir, num_workers):
            count_result(summary, rel, status, detail)
            if status == "corrupt":
                if bar is not None:
                    bar.write(f"corrupt image skipped: {detail}")
                if strict:
                    raise CorruptImageError(f"{detail} (stopping: --strict)")
            if bar is not None:
                bar.update(1)
                elapsed = max(time.perf_counter() - start, 1e-9)
                bar.set_postfix(img_per_s=f"{summary['written'] / elapsed:.1f}",
                                corrupt=summary["corrupt"], refresh=False)
    finally:
        if bar is not None:
            bar.close()
    return finish_summary(summary, time.perf_counter() - start, summary_path)


def _progress_bar(total: int, enabled: bool, description: str):
    if not enabled:
        return None
    from harl_tf.progress import progress
    return progress(total=total, desc=description, unit="img")


def _run(todo: List[str], instance: Any, method: str, method_params: Dict[str, Any],
         images_dir: str, masks_dir: str, num_workers: int
         ) -> Iterable[Tuple[str, str, Optional[str]]]:
    if num_workers == 1 or len(todo) <= 1:  # in this process, with the caller's instance
        _WORKER.update(method=instance, images_dir=images_dir, masks_dir=masks_dir)
        for rel in todo:
            yield _process(rel)
        return
    context = multiprocessing.get_context("spawn")  # safe with TensorFlow in the parent
    with context.Pool(num_workers, initializer=_init_worker,
                      initargs=(method, method_params, images_dir, masks_dir)) as pool:
        chunksize = max(1, min(16, len(todo) // (4 * num_workers)))
        yield from pool.imap_unordered(_process, todo, chunksize=chunksize)
