"""Sharded, atomic, resumable TFRecord builder (the records of :mod:`harl_tf.data.schema`).

``build_dataset(source, output_dir, ...)`` turns a source (:mod:`harl_tf.data.sources`)
into ``<split>-<index:05d>-of-<count:05d>.tfrecord`` shards plus ``manifest.json``.

Data flow. The parent lists every split (sorted ids; random-access sources are then
permuted by ``shuffle_seed`` so every shard mixes classes), cuts each list into contiguous
shards, and hands the examples of the shards still to build to worker processes
(``spawn``; the workers never import TensorFlow). A worker reads the image bytes, checks
them by decoding with PIL (corrupt files, the pixel cap), reads/validates or computes the
mask, encodes the mask as PNG and serialises the ``tf.train.Example`` with the small
protobuf encoder below (byte-for-byte what ``schema.serialize_example`` gives with sorted
map keys). The parent writes the records in order with ``tf.io.TFRecordWriter`` (C++
framing and CRC32C): no CRC32C package is installed, and a table-driven pure-python
CRC32C measured ~20 ms per 30 kB record here, six times the whole per-image work (~3.5 ms
CPU for a 500x375 JPEG with its mask).

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
import hashlib
import io
import json
import logging
import os
import time
import warnings
from typing import Any, Callable, Dict, Iterable, Iterator, List, Mapping, Optional, Sequence

import numpy as np

from harl_tf import atomic
from harl_tf.data.mask_png import encode as encode_mask_png
from harl_tf.data.sources import (ExampleRef, RawExample, Source,
                                  estimate_num_shards, shard_bounds)
from harl_tf.errors import HarlError

logger = logging.getLogger(__name__)

BUILDER_VERSION = 1
DEFAULT_MAX_PIXELS = 89_478_485  # PIL's default decompression-bomb limit
MANIFEST_NAME = "manifest.json"
SIDECAR_DIR = "_shards"
_CHUNK = 16  # examples per worker task


class BuildError(HarlError):
    """The build cannot go on: names the file(s), flag or record, what was expected and
    what was found."""


# ------------------------------------------------------------------ protobuf, no TF


def _varint(value: int) -> bytes:
    value &= (1 << 64) - 1  # int64 as two's complement, as protobuf does
    out = bytearray()
    while value > 0x7F:
        out.append((value & 0x7F) | 0x80)
        value >>= 7
    out.append(value)
    return bytes(out)


def _length_delimited(field: int, payload: bytes) -> bytes:
    return _varint(field << 3 | 2) + _varint(len(payload)) + payload


def _bytes_feature(value: bytes) -> bytes:
    # Feature { bytes_list (1): BytesList { value (1): bytes } }
    return _length_delimited(1, _length_delimited(1, value))


def _int64_feature(value: int) -> bytes:
    # Feature { int64_list (3): Int64List { value (1): packed varint } }
    return _length_delimited(3, _length_delimited(1, _varint(int(value))))


def encode_example(*, image_bytes: bytes, image_format: str, height: int, width: int,
                   mask_png: bytes, label: int, example_id: str, mask_method: str,
                   mask_params: Mapping[str, Any], schema_version: int) -> bytes:
    """Serialises a ``tf.train.Example`` of the harl-tf schema without TensorFlow.

    Same fields and values as ``schema.serialize_example`` (``mask_params`` as JSON with
    sorted keys); map entries in sorted key order, which is what protobuf's deterministic
    serialisation gives, so the bytes equal ``SerializeToString(deterministic=True)``.
    """
    params = json.dumps(dict(mask_params or {}), sort_keys=True).encode()
    features = {
        "id": _bytes_feature(example_id.encode()),
        "image/encoded": _bytes_feature(image_bytes),
        "image/format": _bytes_feature(image_format.encode()),
        "image/height": _int64_feature(height),
        "image/width": _int64_feature(width),
        "label": _int64_feature(label),
        "mask/encoded": _bytes_feature(mask_png),
        "mask/method": _bytes_feature(mask_method.encode()),
        "mask/params": _bytes_feature(params),
        "schema_version": _int64_feature(schema_version),
    }
    entries = b"".join(
        _length_delimited(1, _length_delimited(1, key.encode()) + _length_delimited(2, value))
        for key, value in sorted(features.items()))
    return _length_delimited(1, entries)


# ----------------------------------------------------------------- per-example work


class _Skip(Exception):
    """This image is unusable; the builder skips and reports it."""


@contextlib.contextmanager
def _own_pixel_limit():
    """PIL's decompression-bomb check runs inside ``Image.open``; the builder applies its
    own ``max_pixels`` right after opening, so PIL's check is switched off meanwhile."""
    from PIL import Image
    saved = Image.MAX_IMAGE_PIXELS
    Image.MAX_IMAGE_PIXELS = None
    try:
        yield
    finally:
        Image.MAX_IMAGE_PIXELS = saved


def _png_bit_depth(data: bytes) -> int:
    return data[24] if len(data) > 24 else 0  # IHDR: 8 signature + 8 header + 8 w/h


def _container_problem(data: bytes, image_format: str) -> Optional[str]:
    """Why TensorFlow's decoder would refuse bytes that PIL decoded, or ``None``.

    PIL is more lenient than TensorFlow's libpng / libjpeg readers: it does not check the
    CRC of PNG IDAT chunks, and it pads a JPEG whose marker segment runs past the end of
    the data. A record holding such bytes would stop training mid-epoch, so the builder
    checks the container before storing the original bytes (tests/test_fuzz.py).
    """
    import zlib
    if image_format == "png":
        position, end = 8, len(data)
        while position + 12 <= end:
            length = int.from_bytes(data[position:position + 4], "big")
            kind = data[position + 4:position + 8]
            stop = position + 8 + length
            if stop + 4 > end:
                return f"PNG chunk {kind!r} at byte {position} runs past the end of the file"
            crc = int.from_bytes(data[stop:stop + 4], "big")
            if zlib.crc32(data[position + 4:stop]) != crc:
                return f"PNG chunk {kind!r} at byte {position} fails its CRC check"
            if kind == b"IEND":
                return None
            position = stop + 4
        return "PNG file has no IEND chunk (truncated)"
    if image_format == "jpeg":
        position, end = 2, len(data)  # after SOI
        while position < end:
            if data[position] != 0xFF:  # entropy-coded data of a scan: skip to a marker
                position = data.find(b"\xff", position)
                if position < 0:
                    break
                continue
            marker = data[position + 1] if position + 1 < end else None
            if marker is None:
                break
            if marker == 0xD9:  # EOI
                return None
            if marker in (0x00, 0xFF) or 0xD0 <= marker <= 0xD7 or marker == 0x01:
                position += 1 if marker == 0xFF else 2  # stuffing, fill, RSTn, TEM
                continue
            if position + 4 > end:
                break
            length = int.from_bytes(data[position + 2:position + 4], "big")
            if length < 2 or position + 2 + length > end:
                return (f"JPEG marker 0x{marker:02X} at byte {position} has length {length},"
                        f" past the end of the file ({end} bytes)")
            position += 2 + length
        # TensorFlow refuses a JPEG that ends before its end-of-image marker.
        return "JPEG file ends before its end-of-image marker (truncated)"
    return None


def _pil_to_rgb(image) -> np.ndarray:
    from harl_tf.masks import to_rgb_uint8
    if image.mode not in ("1", "L", "LA", "RGB", "RGBA", "I", "I;16", "I;16B", "I;16L", "F"):
        image = image.convert("RGB")  # palette, CMYK, YCbCr, LAB, ...
    return to_rgb_uint8(np.asarray(image))


def _encode_png(array: np.ndarray) -> bytes:
    import cv2
    if array.ndim == 3:
        array = array[..., ::-1]  # OpenCV writes BGR
    ok, encoded = cv2.imencode(".png", np.ascontiguousarray(array),
                               [cv2.IMWRITE_PNG_COMPRESSION, 3])
    if not ok:
        raise BuildError(f"OpenCV could not encode a PNG of shape {array.shape}")
    return encoded.tobytes()


def _mask_to_array(data: bytes, mask_name: str, image_name: str) -> np.ndarray:
    from PIL import Image
    from harl_tf.masks import to_rgb_uint8
    try:
        with _own_pixel_limit():
            mask = Image.open(io.BytesIO(data))
            mask.load()
    except Exception as err:  # noqa: BLE001 - PIL raises many types for bad files
        raise BuildError(f"mask {mask_name} (of image {image_name}) is not a readable "
                         f"image: {err}") from None
    if mask.mode in ("I", "I;16", "I;16B", "I;16L", "F"):
        return to_rgb_uint8(np.asarray(mask))[..., 0]
    if mask.mode not in ("1", "L"):
        mask = mask.convert("L")
    return np.asarray(mask, dtype=np.uint8)


class _Processor:
    """Turns a :class:`RawExample` into a serialised record or a skip (one per process)."""

    def __init__(self, source: Optional[Source], *, mask_method: Optional[str],
                 mask_params: Mapping[str, Any], given_mask_method: str,
                 resize_masks: bool, max_pixels: int, schema_version: int):
        self.source = source
        self.method = None
        if mask_method:
            from harl_tf.masks import get_method
            self.method = get_method(mask_method, **dict(mask_params))
            self.mask_name, self.mask_params = self.method.name, dict(self.method.params)
        else:
            self.mask_name, self.mask_params = given_mask_method, {}
        self.resize_masks, self.max_pixels = resize_masks, int(max_pixels)
        self.schema_version = schema_version

    def __call__(self, item) -> tuple:
        if isinstance(item, ExampleRef):
            item = self.source.load(item, with_mask=self.method is None)
        try:
            return self._process(item)
        except _Skip as skip:
            return ("skip", item.id, item.label, item.image_name, str(skip))

    def _open(self, raw: RawExample):
        from PIL import Image
        if raw.error:
            raise _Skip(raw.error)
        try:
            with _own_pixel_limit(), warnings.catch_warnings():
                warnings.simplefilter("ignore")
                image = Image.open(io.BytesIO(raw.image_bytes))
                width, height = image.size
                if width * height > self.max_pixels:
                    raise _Skip(f"{width}x{height} = {width * height} pixels is over "
                                f"max_pixels={self.max_pixels} (decompression-bomb guard; "
                                f"raise --max_pixels to accept it)")
                image.load()
        except _Skip:
            raise
        except Exception as err:  # noqa: BLE001 - corrupt files raise many types
            raise _Skip(f"not a readable image ({type(err).__name__}: {err})") from None
        return image

    def _process(self, raw: RawExample) -> tuple:
        image = self._open(raw)
        width, height = image.size
        counts: Dict[str, Any] = {}
        keep = image.mode in ("L", "RGB") and (
            image.format == "JPEG"
            or (image.format == "PNG" and _png_bit_depth(raw.image_bytes) == 8))
        rgb = None
        if keep:
            image_bytes, image_format = raw.image_bytes, image.format.lower()
            problem = _container_problem(image_bytes, image_format)
            if problem:
                raise _Skip(f"corrupt image: {problem}")
        else:
            rgb = _pil_to_rgb(image)
            image_bytes, image_format = _encode_png(rgb), "png"
            counts["reencoded_images"] = 1

        if self.method is not None:
            if rgb is None:
                rgb = _pil_to_rgb(image)
            mask, fallback = self._compute_mask(rgb, raw)
            if fallback:
                counts["mask_fallbacks"] = {fallback: 1}
        else:
            mask = self._given_mask(raw, height, width, counts)
        record = encode_example(
            image_bytes=image_bytes, image_format=image_format, height=height, width=width,
            mask_png=encode_mask_png(mask), label=raw.label,
            example_id=raw.id, mask_method=self.mask_name, mask_params=self.mask_params,
            schema_version=self.schema_version)
        return ("ok", raw.id, raw.label, record, counts)

    def _compute_mask(self, rgb: np.ndarray, raw: RawExample):
        try:
            if hasattr(self.method, "compute"):
                result = self.method.compute(rgb)
                mask, fallback = result.mask, result.fallback
            else:
                mask, fallback = self.method(rgb), None
        except Exception as err:  # noqa: BLE001 - name the image, keep the cause
            raise BuildError(f"mask method {self.mask_name!r} failed on image "
                             f"{raw.image_name}: {type(err).__name__}: {err}") from err
        mask = np.asarray(mask)
        if mask.shape != rgb.shape[:2]:
            raise BuildError(f"mask method {self.mask_name!r} returned a mask of shape "
                             f"{mask.shape} for image {raw.image_name} of shape "
                             f"{rgb.shape[:2]}; expected the image's [H, W]")
        return (mask > 0).astype(np.uint8), fallback

    def _given_mask(self, raw: RawExample, height: int, width: int,
                    counts: Dict[str, Any]) -> np.ndarray:
        if raw.mask is not None:
            mask = np.asarray(raw.mask)
            if mask.ndim == 3 and mask.shape[-1] == 1:
                mask = mask[..., 0]
        elif raw.mask_bytes is not None:
            mask = _mask_to_array(raw.mask_bytes, raw.mask_name, raw.image_name)
        else:
            raise BuildError(f"image {raw.image_name} has no mask and no --mask_method was "
                             f"given")
        top = int(mask.max(initial=0))
        if top <= 1:
            binary = mask.astype(np.uint8)
        elif not np.any((mask != 0) & (mask != 255)):
            binary = (mask == 255).astype(np.uint8)
        else:
            binary = (mask >= 128).astype(np.uint8)
            counts["thresholded_masks"] = 1
        if binary.shape != (height, width):
            if not self.resize_masks:
                found = f"{binary.shape[1]}x{binary.shape[0]}" if binary.ndim == 2 else (
                    f"shape {binary.shape}")
                raise BuildError(
                    f"mask {raw.mask_name} is {found} but its image {raw.image_name} is "
                    f"{width}x{height} (width x height); fix the mask, or pass "
                    f"--resize_masks to resize masks to their image (nearest neighbour)")
            import cv2
            binary = cv2.resize(binary, (width, height), interpolation=cv2.INTER_NEAREST)
            counts["resized_masks"] = 1
        return binary


_WORKER: Optional[_Processor] = None


def _init_worker(source, processor_kwargs) -> None:
    global _WORKER
    _WORKER = _Processor(source, **processor_kwargs)


def _process_chunk(chunk: Sequence[Any]) -> List[tuple]:
    return [_WORKER(item) for item in chunk]


# ---------------------------------------------------------------------- shard plan


@dataclasses.dataclass
class _Shard:
    split: str
    index: int
    count: int
    refs: List[ExampleRef]
    fingerprint: str = ""
    size: int = -1  # examples listed for the shard (kept when ``refs`` is dropped)

    def __post_init__(self):
        if self.size < 0:
            self.size = len(self.refs)

    @property
    def name(self) -> str:
        return f"{self.split}-{self.index:05d}-of-{self.count:05d}.tfrecord"

    def without_refs(self) -> "_Shard":
        """What the manifest needs of a shard (name, size, fingerprint), without its ids."""
        return dataclasses.replace(self, refs=[])


def shard_name(split: str, index: int, count: int) -> str:
    """``<split>-<index:05d>-of-<count:05d>.tfrecord``."""
    return f"{split}-{index:05d}-of-{count:05d}.tfrecord"


def _sha256(path: str) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _read_sidecar(output_dir: str, shard: _Shard) -> Optional[Dict[str, Any]]:
    path = os.path.join(output_dir, SIDECAR_DIR, shard.name + ".json")
    try:
        with open(path, encoding="utf-8") as handle:
            sidecar = json.load(handle)
    except (OSError, ValueError):
        return None
    if sidecar.get("fingerprint") != shard.fingerprint:
        return None
    return sidecar


def _is_finished(output_dir: str, shard: _Shard) -> Optional[Dict[str, Any]]:
    """The sidecar when the shard file exists and matches it (size and sha256)."""
    sidecar = _read_sidecar(output_dir, shard)
    path = os.path.join(output_dir, shard.name)
    if sidecar is None or not os.path.isfile(path):
        return None
    if os.path.getsize(path) != sidecar.get("bytes") or _sha256(path) != sidecar.get("sha256"):
        return None
    return sidecar


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


def _merge_counts(total: Dict[str, Any], counts: Mapping[str, Any]) -> None:
    for key, value in counts.items():
        if isinstance(value, dict):
            _merge_counts(total.setdefault(key, {}), value)
        else:
            total[key] = total.get(key, 0) + value


@dataclasses.dataclass
class BuildSetup:
    """The checked options of one build, shared by the local builder and the Beam pipeline
    (:mod:`harl_tf.data.beam_build`): ``processor_kwargs`` rebuild the per-example
    ``_Processor`` in any process; ``options`` enter every shard's fingerprint."""
    splits: List[str]
    need_masks: bool
    processor_kwargs: Dict[str, Any]
    processor: "_Processor"
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
    processor = _Processor(source, **processor_kwargs)
    mask_info = {"method": processor.mask_name, "params": processor.mask_params}
    options = {"schema_version": SCHEMA_VERSION, "builder_version": BUILDER_VERSION,
               "mask": mask_info, "resize_masks": bool(resize_masks),
               "max_pixels": int(max_pixels), "source": source.content_options()}
    return BuildSetup(splits, need_masks, processor_kwargs, processor, mask_info, options)


def plan_split(source: Source, split: str, options: Dict[str, Any], *, need_masks: bool,
               num_shards: Optional[int], target_shard_mb: float, min_shards: int,
               shuffle_seed: Optional[int]) -> List[_Shard]:
    """Lists one split and cuts it into shards: sorted ids, permuted by ``shuffle_seed``
    (random-access sources), contiguous runs; each shard's fingerprint covers its ids and
    labels and every option that changes the bytes. Depends only on the source and the
    options, so every machine and every runner plans the same shards."""
    refs = source.list_refs(split, need_masks=need_masks)
    if len({r.id for r in refs}) != len(refs):
        raise BuildError(f"split {split!r}: example ids are not unique")
    if source.random_access and shuffle_seed is not None:
        order = np.random.default_rng(shuffle_seed).permutation(len(refs))
        refs = [refs[i] for i in order]
    count = num_shards
    if count is None:
        step = max(1, len(refs) // 32)
        count = estimate_num_shards(source.sample_bytes(refs[::step][:32]), len(refs),
                                    target_shard_mb, min_shards)
    count = min(count, len(refs))
    shards = []
    for index, (start, stop) in enumerate(shard_bounds(len(refs), count)):
        shard = _Shard(split, index, count, refs[start:stop])
        shard.fingerprint = hashlib.sha256(json.dumps(
            {"options": options, "examples": [(r.id, r.label) for r in shard.refs]},
            sort_keys=True).encode()).hexdigest()
        shards.append(shard)
    return shards


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
    plan: Dict[str, List[_Shard]] = {
        split: plan_split(source, split, options, need_masks=setup.need_masks,
                          num_shards=num_shards, target_shard_mb=target_shard_mb,
                          min_shards=min_shards, shuffle_seed=shuffle_seed)
        for split in setup.splits}

    pending = []
    for shards in plan.values():
        for shard in shards:
            if shard.index % num_partitions != partition_index:
                continue
            if _is_finished(output_dir, shard):
                logger.info("%s: already built, skipped", shard.name)
            else:
                pending.append(shard)

    total = sum(len(s.refs) for s in pending)
    with _naming_write_errors(output_dir):
        written = _build_shards(source, output_dir, pending, processor_kwargs,
                                parent_processor, num_workers=num_workers, strict=strict,
                                progress=progress, total=total,
                                writer_factory=tf.io.TFRecordWriter)
        seconds = time.time() - started
        manifest = _manifest(output_dir, source, plan, options, mask_info, num_partitions,
                             partition_index)
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
def _naming_write_errors(output_dir: str):
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


def _build_shards(source: Source, output_dir: str, pending: List[_Shard],
                  processor_kwargs: Dict[str, Any], parent_processor: _Processor, *,
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
            num_workers, initializer=_init_worker, initargs=(worker_source, processor_kwargs))
        function: Callable = _process_chunk
    else:
        function = lambda chunk: [parent_processor(item) for item in chunk]  # noqa: E731

    processed = 0
    current: Optional[_Shard] = None
    state: Dict[str, Any] = {}
    bar = progress_bar(total=total, unit="img", desc="build_tfrecords", disable=not progress,
                       smoothing=0.1)
    try:
        for shard, results in _ordered_map(function, tagged_chunks(), pool,
                                           max_inflight=4 * max(num_workers, 1)):
            if shard is not current:
                if current is not None:
                    _finish_shard(output_dir, current, state)
                current = shard
                state = _open_shard(output_dir, shard, writer_factory)
            for result in results:
                _record(result, state, shard, strict)
            processed += len(results)
            bar.update(len(results))
        if current is not None:
            _finish_shard(output_dir, current, state)
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


def _open_shard(output_dir: str, shard: _Shard, writer_factory) -> Dict[str, Any]:
    temporary = os.path.join(output_dir, f".{shard.name}.tmp")
    return {"temporary": temporary, "writer": writer_factory(temporary), "records": 0,
            "class_counts": {}, "skipped": [], "counts": {}, "started": time.time()}


def _record(result: tuple, state: Dict[str, Any], shard: _Shard, strict: bool) -> None:
    if result[0] == "ok":
        _, example_id, label, record, counts = result
        state["writer"].write(record)
        state["records"] += 1
        key = str(label)
        state["class_counts"][key] = state["class_counts"].get(key, 0) + 1
        _merge_counts(state["counts"], counts)
        return
    _, example_id, label, image_name, reason = result
    if strict:
        raise BuildError(f"{image_name}: {reason} (--strict stops the build; without it the "
                         f"image is skipped and listed in the manifest)")
    logger.warning("skipped %s: %s", image_name, reason)
    state["skipped"].append({"id": example_id, "path": image_name, "reason": reason})


def _finish_shard(output_dir: str, shard: _Shard, state: Dict[str, Any]) -> None:
    state["writer"].close()
    temporary, final = state["temporary"], os.path.join(output_dir, shard.name)
    atomic.commit(temporary, final)
    sidecar = {
        "file": shard.name, "split": shard.split, "index": shard.index,
        "num_shards": shard.count, "num_examples": len(shard.refs),
        "num_records": state["records"], "num_skipped": len(state["skipped"]),
        "bytes": os.path.getsize(final), "sha256": _sha256(final),
        "fingerprint": shard.fingerprint, "class_counts": state["class_counts"],
        "counts": state["counts"], "skipped": state["skipped"],
        "seconds": round(time.time() - state["started"], 3),
    }
    atomic.write_json_atomic(os.path.join(output_dir, SIDECAR_DIR, shard.name + ".json"), sidecar)


def _manifest(output_dir: str, source: Source, plan: Dict[str, List[_Shard]],
              options: Dict[str, Any], mask_info: Dict[str, Any], num_partitions: int,
              partition_index: int) -> Dict[str, Any]:
    class_names = source.class_names()

    def class_name(label: str) -> str:
        index = int(label)
        if index < 0:
            return "unlabelled"
        return class_names[index] if index < len(class_names) else label

    splits: Dict[str, Any] = {}
    skipped: List[Dict[str, Any]] = []
    complete = True
    for split, shards in plan.items():
        entry = {"num_shards": len(shards), "num_examples_listed": sum(s.size for s in shards),
                 "num_records": 0, "num_skipped": 0, "class_counts": {}, "counts": {},
                 "shards": [], "missing_shards": []}
        for shard in shards:
            sidecar = _read_sidecar(output_dir, shard)
            if sidecar is None or not os.path.isfile(os.path.join(output_dir, shard.name)):
                entry["missing_shards"].append(shard.name)
                complete = False
                continue
            entry["num_records"] += sidecar["num_records"]
            entry["num_skipped"] += sidecar["num_skipped"]
            for label, count in sidecar["class_counts"].items():
                name = class_name(label)
                entry["class_counts"][name] = entry["class_counts"].get(name, 0) + count
            _merge_counts(entry["counts"], sidecar["counts"])
            skipped.extend({"split": split, **item} for item in sidecar["skipped"])
            entry["shards"].append({key: sidecar[key] for key in (
                "file", "index", "num_records", "num_skipped", "bytes", "sha256")})
        splits[split] = entry
    return {
        "schema_version": options["schema_version"], "builder_version": BUILDER_VERSION,
        "created_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "source": source.describe(), "mask": mask_info, "class_names": class_names,
        "options": {k: v for k, v in options.items() if k not in ("mask", "source")},
        "partition": {"num_partitions": num_partitions, "partition_index": partition_index},
        "complete": complete, "splits": splits, "skipped": skipped,
    }
