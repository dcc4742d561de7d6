"""The mask PNG writer: any PNG reader gets the mask back, bit for bit."""
import io

import cv2
import numpy as np
import pytest
import tensorflow as tf
from PIL import Image

from harl_tf.data import mask_png, schema


def _masks():
    rng = np.random.default_rng(0)
    yield np.ones((1, 1), np.uint8)
    yield np.zeros((3, 5), np.uint8)                       # an empty mask is still a mask
    yield (rng.random((7, 2)) < 0.5).astype(np.uint8)
    noise = rng.random((375, 500)) < 0.3                   # every row differs
    yield noise.astype(np.uint8) * 255
    blob = np.zeros((375, 500), np.uint8)                  # long runs of repeated rows
    yy, xx = np.mgrid[:375, :500]
    blob[(yy - 180) ** 2 + (xx - 260) ** 2 < 120 ** 2] = 1
    yield blob[..., None]


@pytest.mark.parametrize("mask", list(_masks()), ids=lambda m: "x".join(map(str, m.shape)))
def test_every_reader_decodes_the_exact_mask(mask):
    expected = np.where(np.squeeze(mask, -1) if mask.ndim == 3 else mask, 255, 0)
    encoded = mask_png.encode(mask)
    from_tf = tf.io.decode_png(encoded, channels=1).numpy()[..., 0]
    from_cv2 = cv2.imdecode(np.frombuffer(encoded, np.uint8), cv2.IMREAD_UNCHANGED)
    image = Image.open(io.BytesIO(encoded))
    assert (image.mode, image.size) == ("L", expected.shape[::-1])
    Image.open(io.BytesIO(encoded)).verify()               # chunk CRCs and structure
    for decoded in (from_tf, from_cv2, np.asarray(image)):
        np.testing.assert_array_equal(decoded, expected)
    # The schema's reader: foreground is 1.
    parsed = {"mask": tf.constant(encoded)}
    np.testing.assert_array_equal(schema.decode_mask(parsed).numpy()[..., 0], expected // 255)


def test_thresholds_as_the_schema_says():
    # 0/1 input: anything above 0 is foreground; 0..255 input: anything above 127.
    grey = np.array([[0, 1, 127, 128, 255]], np.uint8)
    decoded = tf.io.decode_png(mask_png.encode(grey)).numpy()[..., 0]
    np.testing.assert_array_equal(decoded, [[0, 0, 0, 255, 255]])
    ones = np.array([[0, 1, 1, 0]], np.uint8)
    np.testing.assert_array_equal(tf.io.decode_png(mask_png.encode(ones)).numpy()[..., 0],
                                  [[0, 255, 255, 0]])


def test_masks_stay_compact():
    # Up-filtered repeated rows deflate to little: a 500x375 mask of one rectangle takes
    # about 1% of its raw 188 kB, within twice what OpenCV's slower-to-decode level-3
    # PNG takes.
    mask = np.zeros((375, 500), np.uint8)
    mask[100:300, 50:450] = 1
    size = len(mask_png.encode(mask))
    opencv = len(cv2.imencode(".png", mask * 255, [cv2.IMWRITE_PNG_COMPRESSION, 3])[1])
    assert size < 0.012 * mask.size
    assert size < 2 * opencv


@pytest.mark.parametrize("shape", [(0, 4), (4, 0), (2, 3, 2), (5,)])
def test_bad_shapes_are_refused_with_the_shape(shape):
    with pytest.raises(ValueError, match=r"shape"):
        mask_png.encode(np.zeros(shape, np.uint8))
    with pytest.raises(schema.SchemaError, match=r"shape"):
        schema.encode_mask_png(np.zeros(shape, np.uint8))
