"""The mask PNG writer: single-channel 8-bit PNG (0/255), laid out for fast decoding.

Masks are decoded once per example every epoch, so their encoding is chosen for the
decoder. Every row but the first uses PNG's "Up" filter (the difference to the row above:
all zeros where a mask row repeats) and the data is deflated at zlib level 1. Any PNG
reader gives the same pixels as from any other writer; on 500×375 masks
``tf.io.decode_png`` takes 0.16 ms against 0.41 for ``tf.io.encode_png``'s output and 0.26
for OpenCV's at level 3, for 2.7 kB against 1.4–2.2 kB (bench/LOG.md, input pipeline).

NumPy and zlib only: the TFRecord builder's worker processes never import TensorFlow.
"""
from __future__ import annotations

import struct
import zlib

import numpy as np

SIGNATURE = b"\x89PNG\r\n\x1a\n"
_NONE, _UP = 0, 2          # PNG filter types (specification, section 9.2)


def encode(mask) -> bytes:
    """``{0,1}`` or ``{0,255}`` mask ``[H, W]`` or ``[H, W, 1]`` → PNG bytes, 0 = background,
    255 = foreground (with 0/1 input anything > 0 is foreground, with 0/255 anything >
    127). Raises ValueError for another shape or an empty one."""
    mask = np.asarray(mask)
    if mask.ndim == 3 and mask.shape[-1] == 1:
        mask = mask[..., 0]
    if mask.ndim != 2:
        raise ValueError(f"a mask must be [H, W] or [H, W, 1], got shape {mask.shape}")
    height, width = mask.shape
    if height == 0 or width == 0:
        raise ValueError(f"a mask must have at least one pixel, got shape {mask.shape}")
    binary = np.where(mask > (127 if mask.max() > 1 else 0), 255, 0).astype(np.uint8)
    filtered = binary.copy()
    filtered[1:] -= binary[:-1]               # modulo-256 difference to the row above
    filters = np.full((height, 1), _UP, np.uint8)
    filters[0] = _NONE                        # the first row has no row above
    scanlines = np.concatenate([filters, filtered], axis=1).tobytes()
    header = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)  # 8-bit grey
    return (SIGNATURE + _chunk(b"IHDR", header)
            + _chunk(b"IDAT", zlib.compress(scanlines, 1)) + _chunk(b"IEND", b""))


def _chunk(kind: bytes, data: bytes) -> bytes:
    """Length, type, data and the CRC-32 of type + data (specification, section 5.3)."""
    return (struct.pack(">I", len(data)) + kind + data
            + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF))
