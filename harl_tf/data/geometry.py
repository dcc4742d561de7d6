"""Geometry of a view (SPEC §2, steps 1–2): crop windows, decode-and-crop, resize, flip.

Shared by an image and its mask: the same window, the same flip; the mask is resized with
nearest neighbour on the image resize's half-pixel grid, so it stays binary and its edges
line up. Windows are int32 [4] (offset_y, offset_x, height, width). Images are uint8 as
decoded or float32 in [0, 1] after :func:`resize_image`.
"""
from __future__ import annotations

from typing import Callable, List, Optional, Sequence, Tuple

import tensorflow as tf

from harl_tf.data import schema


def sample_crop_window(image_shape: tf.Tensor, seed: tf.Tensor,
                       config) -> tf.Tensor:
    """Samples an Inception crop window.

    Args:
      image_shape: int32 [3] (height, width, channels) of the source image.
      seed: int32/int64 [2].
      config: an ``augment.ViewConfig`` (its ``crop_area``, ``crop_aspect`` and
        ``crop_attempts``).
    Returns:
      int32 [4] (offset_y, offset_x, height, width). Area fraction in ``crop_area`` and
      aspect (width / height) in ``crop_aspect`` up to rounding to whole pixels; after
      ``crop_attempts`` failures, the whole image (TF's fallback).

    TF draws the window's height uniformly for a drawn aspect ratio, not its area (as in
    SimCLR's and BYOL's TF code; torchvision draws the area), so areas lean small: median
    about 0.32 on a 500×375 image rather than 0.54.

    ``min_object_covered`` equals the lower area bound: the "object" is the whole image,
    so SimCLR's 0.1 would silently raise the 0.08 floor.
    """
    begin, size, _ = tf.image.stateless_sample_distorted_bounding_box(
        image_size=image_shape,
        bounding_boxes=tf.constant([[[0.0, 0.0, 1.0, 1.0]]]),
        seed=seed,
        min_object_covered=config.crop_area[0],
        aspect_ratio_range=config.crop_aspect,
        area_range=config.crop_area,
        max_attempts=config.crop_attempts,
        use_image_if_no_bounding_boxes=True)
    return tf.stack([begin[0], begin[1], size[0], size[1]])


def central_crop_window(image_shape: tf.Tensor, crop_fraction: float) -> tf.Tensor:
    """The central square of side ``floor(crop_fraction · min(H, W))`` (SimCLR / BYOL
    evaluation; 0.875 = 224/256). Returns int32 [4] (offset_y, offset_x, side, side)."""
    height, width = image_shape[0], image_shape[1]
    side = tf.cast(crop_fraction * tf.cast(tf.minimum(height, width), tf.float32),
                   tf.int32)
    side = tf.maximum(side, 1)
    return tf.stack([(height - side + 1) // 2, (width - side + 1) // 2, side, side])


def crop(image: tf.Tensor, window: tf.Tensor) -> tf.Tensor:
    """``image[y:y+h, x:x+w]`` for a window int32 [4] (y, x, h, w); any dtype, [H, W, C]."""
    out = tf.slice(image, tf.stack([window[0], window[1], 0]),
                   tf.stack([window[2], window[3], -1]))
    out.set_shape([None, None, image.shape[-1]])
    return out


def decode_and_crop(encoded: tf.Tensor,
                    window_fns: Sequence[Callable[[tf.Tensor], tf.Tensor]], *,
                    fused: bool) -> Tuple[List[tf.Tensor], List[tf.Tensor], tf.Tensor]:
    """Decodes an encoded image once per window, or once in all.

    Args:
      encoded: scalar string, JPEG or PNG bytes.
      window_fns: each maps the image shape int32 [3] to a window int32 [4].
      fused: for JPEG, read the shape from the header and decode only each window
        (``tf.image.decode_and_crop_jpeg``, once per window); otherwise (and always for
        PNG) decode the whole image once and slice.
    Returns:
      (crops: uint8 [h_i, w_i, 3] and windows: int32 [4], one of each per window_fn;
      the image's shape int32 [3]).
    """
    def full():
        image = schema.decode_image({"image": encoded})
        shape = tf.shape(image)
        windows = [fn(shape) for fn in window_fns]
        return [crop(image, w) for w in windows], windows, shape

    if not fused:
        return full()

    def partial():
        shape = tf.image.extract_jpeg_shape(encoded)
        windows = [fn(shape) for fn in window_fns]
        crops = [tf.image.decode_and_crop_jpeg(encoded, w, channels=3) for w in windows]
        return crops, windows, shape

    crops, windows, shape = tf.cond(tf.io.is_jpeg(encoded), partial, full)
    for c in crops:
        c.set_shape([None, None, 3])
    return crops, windows, shape


def resize_image(image: tf.Tensor, image_size: int, method: str = "bicubic") -> tf.Tensor:
    """uint8 or float [h, w, 3] (uint8 read as /255) → float32 [S, S, 3] in [0, 1]."""
    if image.dtype == tf.uint8:
        image = tf.cast(image, tf.float32) / 255.0
    image = tf.image.resize(image, [image_size, image_size], method=method)
    return tf.clip_by_value(image, 0.0, 1.0)


def nearest_indices(in_size: tf.Tensor, out_size: int) -> tf.Tensor:
    """Source index of each of ``out_size`` outputs for a nearest-neighbour resize from
    ``in_size``, on the half-pixel grid of ``tf.image.resize(method="nearest")``:
    ``min(floor((i + 0.5) · in / out), in − 1)`` in float32 as TF computes it, so a
    gather with these indices is that resize, bit for bit. Returns int32 [out_size]."""
    scale = tf.cast(in_size, tf.float32) / float(out_size)
    index = tf.floor((tf.range(out_size, dtype=tf.float32) + 0.5) * scale)
    return tf.minimum(tf.cast(index, tf.int32), tf.cast(in_size, tf.int32) - 1)


def resize_mask(mask: tf.Tensor, image_size: int, flip: Optional[tf.Tensor] = None
                ) -> tf.Tensor:
    """Binary mask [h, w, 1] (any numeric dtype) → float32 [S, S, 1] in {0, 1}, nearest
    neighbour (the same half-pixel grid as the image resize, so edges line up); mirrored
    along the width where ``flip`` (bool scalar) is True.

    Gathers of the mask's own values (rows, then columns, the columns reversed for a
    flip) and one cast of the S × S result: the same pixels as ``tf.image.resize(...,
    "nearest")`` then ``tf.reverse``, at a fraction of the cost, since nothing of the
    crop is converted or interpolated.
    """
    shape = tf.shape(mask)
    rows = nearest_indices(shape[0], image_size)
    columns = nearest_indices(shape[1], image_size)
    if flip is not None:
        columns = tf.where(flip, tf.reverse(columns, [0]), columns)
    # Whole rows are cheap to gather and single pixels are not: gather the rows, then
    # the columns as rows of the transpose.
    mask = tf.gather(mask[..., 0], rows)                                   # [S, w]
    mask = tf.transpose(tf.gather(tf.transpose(mask), columns))            # [S, S]
    return tf.cast(tf.cast(mask, tf.float32) >= 0.5, tf.float32)[..., tf.newaxis]


def flip_left_right(image: tf.Tensor) -> tf.Tensor:
    """Mirror [H, W, C] along the width."""
    return tf.reverse(image, axis=[1])
