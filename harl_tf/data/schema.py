"""The one TFRecord schema: an image and its heuristic mask travel in the same example.

One ``tf.train.Example`` per image:

==================  =======  =====================================================
key                 type     meaning
==================  =======  =====================================================
image/encoded       bytes    the original JPEG or PNG bytes (re-encoded only when
                             the source was neither)
image/format        bytes    ``jpeg`` or ``png``
image/height        int64    pixels
image/width         int64    pixels
mask/encoded        bytes    single-channel PNG, 0 = background, 255 = foreground,
                             same height and width as the image
mask/method         bytes    how the mask was made (``conventional``, ``deep``,
                             ``ground_truth``, ...)
mask/params         bytes    JSON object of the method's parameters
label               int64    class index, -1 when unknown
id                  bytes    stable id: relative path or source key
schema_version      int64    :data:`SCHEMA_VERSION`
==================  =======  =====================================================

A record written under another schema version is refused with a message that says which
version was found and which was expected.
"""
from __future__ import annotations

import json
from typing import Any, Dict, Iterator, Mapping

import numpy as np
import tensorflow as tf

from harl_tf.data import mask_png
from harl_tf.errors import DataError

SCHEMA_VERSION = 1

IMAGE_FORMATS = ("jpeg", "png")


class SchemaError(DataError):
    """A record or an example does not follow this schema."""


# Every feature has a default so that a foreign record parses far enough for the version
# check to name the problem; records of this version always carry every feature.
_FEATURES = {
    "image/encoded": tf.io.FixedLenFeature([], tf.string, default_value=b""),
    "image/format": tf.io.FixedLenFeature([], tf.string, default_value=b""),
    "image/height": tf.io.FixedLenFeature([], tf.int64, default_value=0),
    "image/width": tf.io.FixedLenFeature([], tf.int64, default_value=0),
    "mask/encoded": tf.io.FixedLenFeature([], tf.string, default_value=b""),
    "mask/method": tf.io.FixedLenFeature([], tf.string, default_value=b""),
    "mask/params": tf.io.FixedLenFeature([], tf.string, default_value=b"{}"),
    "label": tf.io.FixedLenFeature([], tf.int64, default_value=-1),
    "id": tf.io.FixedLenFeature([], tf.string, default_value=b""),
    "schema_version": tf.io.FixedLenFeature([], tf.int64, default_value=0),
}

# Parsed-dict key -> serialized feature key.
_KEYS = {
    "image": "image/encoded",
    "image_format": "image/format",
    "height": "image/height",
    "width": "image/width",
    "mask": "mask/encoded",
    "mask_method": "mask/method",
    "mask_params": "mask/params",
    "label": "label",
    "id": "id",
    "schema_version": "schema_version",
}


def _bytes(value: bytes) -> tf.train.Feature:
    return tf.train.Feature(bytes_list=tf.train.BytesList(value=[value]))


def _int(value: int) -> tf.train.Feature:
    return tf.train.Feature(int64_list=tf.train.Int64List(value=[int(value)]))


def serialize_example(*, image_bytes: bytes, image_format: str, height: int, width: int,
                      mask_png: bytes, label: int = -1, example_id: str = "",
                      mask_method: str = "", mask_params: Mapping[str, Any] | None = None
                      ) -> bytes:
    """Serialises one example. ``mask_png`` is a single-channel PNG (0/255) of the image's
    height and width; ``mask_params`` is stored as JSON (sorted keys, so equal parameters
    give equal bytes)."""
    if image_format not in IMAGE_FORMATS:
        raise SchemaError(
            f"image_format must be one of {IMAGE_FORMATS}, got {image_format!r} "
            f"(example {example_id!r}); re-encode other formats as PNG first")
    if height <= 0 or width <= 0:
        raise SchemaError(f"example {example_id!r}: height and width must be positive, "
                          f"got {height}x{width}")
    params = json.dumps(dict(mask_params or {}), sort_keys=True).encode()
    feature = {
        "image/encoded": _bytes(image_bytes),
        "image/format": _bytes(image_format.encode()),
        "image/height": _int(height),
        "image/width": _int(width),
        "mask/encoded": _bytes(mask_png),
        "mask/method": _bytes(mask_method.encode()),
        "mask/params": _bytes(params),
        "label": _int(label),
        "id": _bytes(example_id.encode()),
        "schema_version": _int(SCHEMA_VERSION),
    }
    example = tf.train.Example(features=tf.train.Features(feature=feature))
    return example.SerializeToString()


def parse_example(serialized: tf.Tensor) -> Dict[str, tf.Tensor]:
    """Parses one serialized example into a dict of scalar tensors (graph-safe, for
    ``tf.data``): ``image``, ``image_format``, ``height``, ``width``, ``mask``,
    ``mask_method``, ``mask_params``, ``label``, ``id``, ``schema_version``.

    Raises ``tf.errors.InvalidArgumentError`` naming both versions when the record was
    written under another schema version (or is not a harl-tf record at all).
    """
    raw = tf.io.parse_single_example(serialized, _FEATURES)
    parsed = {name: raw[key] for name, key in _KEYS.items()}
    check = tf.debugging.assert_equal(
        parsed["schema_version"], tf.constant(SCHEMA_VERSION, tf.int64),
        message=(f"harl-tf TFRecord schema version mismatch: this code reads version "
                 f"{SCHEMA_VERSION}; rebuild the records with tools/build_tfrecords.py "
                 f"(version 0 means the record is not a harl-tf record). Found version:"))
    with tf.control_dependencies([check]):
        parsed["schema_version"] = tf.identity(parsed["schema_version"])
    return parsed


def decode_image(parsed: Mapping[str, tf.Tensor]) -> tf.Tensor:
    """The image as ``uint8 [H, W, 3]``."""
    image = tf.io.decode_image(parsed["image"], channels=3, expand_animations=False)
    image.set_shape([None, None, 3])
    return image


def decode_mask(parsed: Mapping[str, tf.Tensor]) -> tf.Tensor:
    """The mask as ``uint8 {0, 1} [H, W, 1]`` (stored 0/255; anything >= 128 is
    foreground)."""
    mask = tf.io.decode_png(parsed["mask"], channels=1)
    return tf.cast(mask >= 128, tf.uint8)


def encode_mask_png(mask: np.ndarray) -> bytes:
    """``{0,1}`` or ``{0,255}`` mask ``[H, W]`` or ``[H, W, 1]`` → single-channel PNG bytes
    (0/255), written for fast decoding (:func:`harl_tf.data.mask_png.encode`). Raises
    SchemaError for any other shape."""
    try:
        return mask_png.encode(mask)
    except ValueError as err:
        raise SchemaError(str(err)) from None


def _to_python(name: str, value: tf.Tensor) -> Any:
    value = value.numpy()
    if name in ("image", "mask"):
        return value
    if isinstance(value, bytes):
        try:
            text = value.decode()
            return json.loads(text) if name == "mask_params" else text
        except ValueError as err:  # UnicodeDecodeError, JSONDecodeError
            raise SchemaError(f"feature {_KEYS[name]!r} is not valid "
                              f"{'JSON' if name == 'mask_params' else 'UTF-8'}: {err}") from None
    return int(value)


def record_to_python(serialized, *, decode: bool = True) -> Dict[str, Any]:
    """One serialized example → dict of python/numpy values (see :func:`read_examples`).
    Raises :class:`SchemaError` for anything that is not a readable record of this
    schema.

    The bytes are first checked by the protobuf library: TensorFlow 2.21's
    ``ParseExampleV2`` kernel crashes the process (SIGSEGV) on some malformed wire formats
    (e.g. one corrupted length varint; tests/test_fuzz.py). Inside tf.data the TFRecord
    CRCs stop corrupted bytes before they reach the parser.
    """
    from google.protobuf.message import DecodeError
    data = serialized.numpy() if isinstance(serialized, tf.Tensor) else bytes(serialized)
    try:
        tf.train.Example.FromString(data)
    except DecodeError as err:
        raise SchemaError(f"not a tf.train.Example ({err})") from None
    try:
        parsed = parse_example(data)
        record = {name: _to_python(name, value) for name, value in parsed.items()}
        if decode:
            record["image_array"] = decode_image(parsed).numpy()
            record["mask_array"] = decode_mask(parsed).numpy()[..., 0]
    except tf.errors.OpError as err:
        raise SchemaError(err.message.strip()) from None
    except UnicodeDecodeError:  # TF's own message quoted undecodable bytes of the record
        raise SchemaError("not a tf.train.Example (TensorFlow could not parse it and its "
                          "error message is not text)") from None
    return record


def read_examples(path: str, *, decode: bool = True) -> Iterator[Dict[str, Any]]:
    """Eagerly reads a TFRecord file (for tools): yields dicts of python/numpy values; with
    ``decode`` also ``image_array`` (uint8 [H,W,3]) and ``mask_array`` (uint8 {0,1}
    [H,W]). Errors name the file and the record index."""
    for index, serialized in enumerate(iterate_records(path)):
        try:
            record = record_to_python(serialized, decode=decode)
        except SchemaError as err:
            raise SchemaError(f"{path}: record {index}: {err}") from None
        yield record


def iterate_records(path: str) -> Iterator[tf.Tensor]:
    """The serialized records of one TFRecord file (eager), undecoded. A truncated or
    corrupt file raises :class:`SchemaError` naming the file and the record index."""
    iterator = iter(tf.data.TFRecordDataset(path))
    index = 0
    while True:
        try:
            yield next(iterator)
        except StopIteration:
            return
        except tf.errors.OpError as err:
            raise SchemaError(f"{path}: cannot read record {index} (corrupt or truncated "
                              f"file): {err.message}") from None
        index += 1
