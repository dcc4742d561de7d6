"""Per-example work of the TFRecord builder: one source example → one record or a skip.

:class:`ExampleProcessor` reads the image bytes, checks them by decoding with PIL (corrupt
files, the pixel cap, containers TensorFlow's decoders would refuse), reads and validates
the source's mask or computes one with a mask method, encodes the mask as PNG and
serialises the record (:mod:`harl_tf.data.example_encoding`). It runs in the builder's
worker processes (``init_worker`` / ``process_chunk``) and in Beam workers alike, and never
imports TensorFlow. What it accepts and refuses: :mod:`harl_tf.data.builder`'s docstring.
"""
from __future__ import annotations

import contextlib
import io
import warnings
from typing import Any, Dict, List, Mapping, Optional, Sequence

import numpy as np

from harl_tf.data.example_encoding import encode_example
from harl_tf.data.mask_png import encode as encode_mask_png
from harl_tf.data.sources import ExampleRef, RawExample, Source
from harl_tf.errors import BuildError


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


def container_problem(data: bytes, image_format: str) -> Optional[str]:
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


class ExampleProcessor:
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
            problem = container_problem(image_bytes, image_format)
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


_WORKER: Optional[ExampleProcessor] = None


def init_worker(source, processor_kwargs) -> None:
    global _WORKER
    _WORKER = ExampleProcessor(source, **processor_kwargs)


def process_chunk(chunk: Sequence[Any]) -> List[tuple]:
    return [_WORKER(item) for item in chunk]
