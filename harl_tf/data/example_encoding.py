"""A ``tf.train.Example`` of the harl-tf schema serialised without TensorFlow.

The builder's worker processes never import TensorFlow (``spawn`` start-up stays fast and
light), so they serialise records with this small protobuf encoder. It writes the fields
of :mod:`harl_tf.data.schema` byte for byte as ``schema.serialize_example`` does with
sorted map keys (tests/test_builder.py checks it).
"""
from __future__ import annotations

import json
from typing import Any, Mapping


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
