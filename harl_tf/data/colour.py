"""Colour ops of a view (SPEC §2, steps 3–6): small pure TensorFlow functions on float32
RGB images ``[..., 3]`` with values in [0, 1].

The colour jitter's four ops are TensorFlow's, computed more cheaply where a closed form
gives the same numbers up to float rounding (the same augmentation; issue 28):

* brightness x ↦ x·b and contrast ``tf.image.adjust_contrast``, as they are (a contrast
  from ``reduce_mean`` and ``bias_add`` measured 3× slower than TF's kernel);
* saturation: TF converts to HSV, multiplies S by f, clips S to [0, 1] and converts back;
  :func:`adjust_saturation` does the same in RGB, XLA-compiled (below);
* hue: ``tf.image.adjust_hue``. An exact RGB form exists (:func:`adjust_saturation`'s
  docstring has the idea, a rotation of the hue on the max / mid / min channels) and
  matched TF's kernel to 1e-6, but took 1.3× TF's time on a 224 px image (1.8× on a
  batch of 16), so TF's kernel stays.

The saturation and its clip run as one XLA-compiled function (``jit_compile``, the
default of :func:`jitter_in_order`): XLA fuses its dozen elementwise ops into one pass
over the image, with the same values to float rounding (``tests/test_colour.py``). Op by
op on one thread (``python -m bench.bench_input_stages``, ``colour_op/*`` rows) that
made the saturation 2.6× cheaper than TF's HSV kernel (0.42 against 1.05 ms per two-view
example; the closed form as separate TF kernels costs as much as TF's, 1.09), while XLA
left brightness and hue as they were and made the contrast dearer (0.50 against 0.39):
they stay TensorFlow's kernels. Compiling takes a second or two per image size, once per
process. One function for the whole random-order jitter was tried too: it compiles for
about a minute at 224 px (its 16 branches).

Grayscale is one matrix product with a 3 × 3 matrix of luma weights, which writes the
luma to all three channels at once (2.6× cheaper than ``tf.image.rgb_to_grayscale`` then
``grayscale_to_rgb``: 0.44 against 1.12 ms per two-view example).
"""
from __future__ import annotations

from typing import Tuple

import tensorflow as tf

# Luma weights of tf.image.rgb_to_grayscale (ITU-R BT.601).
LUMA_WEIGHTS = (0.2989, 0.5870, 0.1140)


def scaled_uniform(unit: tf.Tensor, low: float, high: float) -> tf.Tensor:
    """A uniform in [0, 1) mapped onto [low, high), as ``stateless_uniform`` maps it."""
    return unit * (high - low) + low


def _repeat_channels(plane: tf.Tensor) -> tf.Tensor:
    """float32 [..., 1] → [..., 3], the value on every channel.

    A product with a [1, 3] row of ones (exact: each output is one product by 1). TF's
    broadcasting along a last axis of 3 is slow, about 6× an elementwise op of the same
    size; the product is one fast pass.
    """
    shape = tf.concat([tf.shape(plane)[:-1], [3]], axis=0)
    return tf.reshape(tf.matmul(tf.reshape(plane, [-1, 1]), tf.ones([1, 3], plane.dtype)),
                      shape)


# --------------------------------------------------------------------------- blur


def gaussian_kernel(sigma: tf.Tensor, radius: int) -> tf.Tensor:
    """Normalised 1-D Gaussian: k_i ∝ exp(−i² / (2σ²)), i = −radius..radius, Σk = 1.
    Returns float32 [2·radius + 1]."""
    x = tf.range(-radius, radius + 1, dtype=tf.float32)
    sigma = tf.cast(sigma, tf.float32)
    kernel = tf.exp(-tf.square(x) / (2.0 * tf.square(sigma)))
    return kernel / tf.reduce_sum(kernel)


def blur_radius(image_size: int, kernel_fraction: float = 0.1) -> int:
    """Kernel radius for a side of ``image_size``: taps = 2·(⌊fraction·S⌋ // 2) + 1 (BYOL:
    23 taps at 224 px)."""
    return max(int(kernel_fraction * image_size) // 2, 1)


def symmetric_indices(size: tf.Tensor, radius: int) -> tf.Tensor:
    """Indices of ``size`` samples padded by ``radius`` on each side with edge-repeating
    (symmetric) padding: −r..−1 → r−1..0, size..size+r−1 → size−1..size−r. int32
    [size + 2·radius]; needs radius <= size, as ``tf.pad(mode="SYMMETRIC")`` does."""
    index = tf.range(-radius, size + radius)
    index = tf.where(index < 0, -index - 1, index)
    return tf.where(index >= size, 2 * size - 1 - index, index)


# Output rows per block of the blur's matrix product: 16 (with 22 rows of context) was
# the fastest of 8, 16, 32 and 56 at 224 px.
_BLUR_BLOCK = 16


def _blur_rows(rows: tf.Tensor, kernel: tf.Tensor, radius: int) -> tf.Tensor:
    """1-D blur along the first axis of [n, d], symmetric padding.

    Each block of ``_BLUR_BLOCK`` output rows is one small matrix product: a banded
    [block, block + 2r] matrix of kernel taps (the same for every block) times the
    block's padded input rows [block + 2r, d]. The products hold the same terms in the
    same order as a direct convolution, plus exact zeros, and a batched matrix product
    runs about twice as fast as TF's depthwise convolution on the same layout.
    """
    n, d = tf.shape(rows)[0], tf.shape(rows)[1]
    block = _BLUR_BLOCK
    blocks = (n + block - 1) // block
    # Pad symmetrically, then with edge rows up to whole blocks (cut off at the end).
    index = symmetric_indices(n, radius)
    index = tf.concat([index, tf.fill([blocks * block - n], n - 1)], axis=0)
    padded = tf.gather(rows, index)                                # [blocks·b + 2r, d]
    windows = tf.gather(padded, tf.range(blocks)[:, tf.newaxis] * block
                        + tf.range(block + 2 * radius)[tf.newaxis, :])  # [blocks, b+2r, d]
    offset = tf.range(block + 2 * radius)[tf.newaxis, :] - tf.range(block)[:, tf.newaxis]
    band = tf.where((offset >= 0) & (offset <= 2 * radius),
                    tf.gather(kernel, tf.clip_by_value(offset, 0, 2 * radius)), 0.0)
    out = tf.matmul(tf.broadcast_to(band, tf.stack([blocks, block, block + 2 * radius])),
                    windows)                                       # [blocks, b, d]
    return tf.reshape(out, tf.stack([blocks * block, d]))[:n]


def gaussian_blur(image: tf.Tensor, sigma: tf.Tensor, radius: int) -> tf.Tensor:
    """Separable Gaussian blur of float [H, W, C] (each channel on its own), with
    symmetric (edge-repeating) padding, so a constant image stays constant — zero
    padding would darken the border. Equals ``scipy.ndimage.convolve1d(..., mode=
    'reflect')`` along height then width with :func:`gaussian_kernel`.

    Each pass runs on [rows, W·C] (the image transposed for the width pass) as blocked
    matrix products (:func:`_blur_rows`): at 224 px a third of the CPU time of a
    depthwise convolution on [H, W, 3], which vectorises over three channels only.
    """
    shape = tf.shape(image)
    height, width, channels = shape[0], shape[1], shape[2]
    kernel = gaussian_kernel(sigma, radius)
    out = _blur_rows(tf.reshape(image, tf.stack([height, width * channels])), kernel, radius)
    out = tf.transpose(tf.reshape(out, shape), [1, 0, 2])
    out = _blur_rows(tf.reshape(out, tf.stack([width, height * channels])), kernel, radius)
    out = tf.transpose(tf.reshape(out, tf.stack([width, height, channels])), [1, 0, 2])
    out.set_shape(image.shape)
    return out


# --------------------------------------------------------------------------- pixels


def solarize(image: tf.Tensor, threshold: float = 0.5) -> tf.Tensor:
    """x ↦ x where x < threshold, else 1 − x (float [0, 1] pixels)."""
    if threshold == 0.5:
        # The same values: below 0.5, 1 − x > x; from 0.5 on, 1 − x (exact) <= x. One
        # minimum costs a seventh of a select.
        return tf.minimum(image, 1.0 - image)
    return tf.where(image < threshold, image, 1.0 - image)


def to_grayscale(image: tf.Tensor) -> tf.Tensor:
    """Luma Y = 0.2989 R + 0.5870 G + 0.1140 B (``tf.image.rgb_to_grayscale``'s weights),
    repeated on three channels. float32 [..., 3] → same.

    One product [pixels, 3] × [3, 3] whose every column holds the weights: the luma lands
    on all three channels in one pass.
    """
    weights = tf.constant([[w] * 3 for w in LUMA_WEIGHTS], image.dtype)
    return tf.reshape(tf.matmul(tf.reshape(image, [-1, 3]), weights), tf.shape(image))


def adjust_saturation(image: tf.Tensor, factor: tf.Tensor) -> tf.Tensor:
    """``tf.image.adjust_saturation`` in closed form on RGB: the same values up to float
    rounding, for float32 [..., 3] with values >= 0 and any ``factor`` (a scalar).

    TF converts a pixel to HSV (V = M = max channel, S = s = (M − m)/M with m the min
    channel), multiplies S by f, clips it to [0, 1] and converts back. The round trip
    keeps the hue and V, so the max channel stays M, and every channel's distance to it
    scales with S: the pixel's channels c become

        c' = M − (M − c)·s'/s,   s' = min(f·s, 1),   i.e.   c' = c·k + M·(1 − k),
        k = min(f, M/(M − m))    (f clipped to >= 0, as S is at 0).

    A grey pixel (M = m, black included) has c = M and stays as it is (k = 0 here; TF's
    S is 0 there and any factor leaves it). f = 0 gives M on every channel (S = 0),
    and f >= M/(M − m) gives the fully saturated colour, min channel 0 (S = 1).

    One difference, TF's: where red is the max and blue exceeds green by less than about
    2e-7 of the range, TF's hue rounds to 1.0, falls in no sextant, and its kernel returns
    the min channel on all three ((1, 0, 1e-9) turns black even at f = 1). Here such a
    pixel keeps its colour. Decoded 8-bit images never have one.

    Hue rotation has a closed form on RGB as well (the max and min channels stay, the
    mid one moves, and the channels' roles permute as the hue crosses a sextant); it was
    measured slower than TF's kernel and is not used (module docstring).
    """
    factor = tf.maximum(tf.cast(factor, image.dtype), 0.0)
    red, green, blue = image[..., 0:1], image[..., 1:2], image[..., 2:3]
    high = tf.maximum(tf.maximum(red, green), blue)                          # M
    low = tf.minimum(tf.minimum(red, green), blue)                           # m
    # divide_no_nan: 0 for a grey pixel, where M − c = 0 on every channel anyway.
    k = tf.minimum(factor, tf.math.divide_no_nan(high, high - low))
    return image * _repeat_channels(k) + _repeat_channels(high - high * k)


def jitter_draws(seed: tf.Tensor, *, brightness: float, contrast: float,
                 saturation: float, hue: float) -> Tuple[tf.Tensor, tf.Tensor]:
    """The colour jitter's factors and order, from one vector of eight uniforms.

    Returns (float32 [4]: brightness factor b ~ U[1 − brightness, 1 + brightness],
    contrast c ~ U[1 − contrast, 1 + contrast], saturation s ~ U[1 − saturation,
    1 + saturation], hue shift h ~ U[−hue, hue]; int32 [4]: :func:`jitter_order`).
    """
    u = tf.random.stateless_uniform([8], seed)
    factors = tf.stack([scaled_uniform(u[0], 1.0 - brightness, 1.0 + brightness),
                        scaled_uniform(u[1], 1.0 - contrast, 1.0 + contrast),
                        scaled_uniform(u[2], 1.0 - saturation, 1.0 + saturation),
                        scaled_uniform(u[3], -hue, hue)])
    return factors, tf.argsort(u[4:])


def jitter_order(seed: tf.Tensor) -> tf.Tensor:
    """The order of the colour-jitter ops for a jitter seed: a uniformly random
    permutation, int32 [4], of 0 brightness, 1 contrast, 2 saturation, 3 hue."""
    return tf.argsort(tf.random.stateless_uniform([8], seed)[4:])


def _brightness(image: tf.Tensor, factor: tf.Tensor) -> tf.Tensor:
    return image * factor


# The jitter's ops by code: 0 brightness, 1 contrast, 2 saturation, 3 hue.
_JITTER_OPS = (_brightness, tf.image.adjust_contrast, adjust_saturation,
               tf.image.adjust_hue)


def _clipped(op):
    def clipped(image: tf.Tensor, factor: tf.Tensor) -> tf.Tensor:
        return tf.clip_by_value(op(image, factor), 0.0, 1.0)
    clipped.__name__ = f"clipped_{getattr(op, '__name__', 'op')}"
    return clipped


# Each op then its clip, by code: (image, factor) -> image.
CLIPPED_JITTER_OPS = tuple(_clipped(op) for op in _JITTER_OPS)
# What the pipeline runs: the saturation XLA-compiled (module docstring). Module-level, so
# a process compiles it once per image shape, whatever the number of datasets it builds.
COMPILED_JITTER_OPS = tuple(tf.function(op, jit_compile=True) if code == 2 else op
                            for code, op in enumerate(CLIPPED_JITTER_OPS))


def jitter_ops(factors: tf.Tensor, *, jit_compile: bool = True):
    """The jitter's four ops with ``factors`` [4] (b, c, s, h), by code: 0 brightness
    x·b, 1 contrast (``tf.image.adjust_contrast``), 2 saturation
    (:func:`adjust_saturation`), 3 hue (``tf.image.adjust_hue``), each followed by a
    clip to [0, 1]. Each maps float32 [..., 3] in [0, 1] to the same; with ``jit_compile``
    the saturation and its clip run as one XLA-compiled function (module docstring)."""
    ops = COMPILED_JITTER_OPS if jit_compile else CLIPPED_JITTER_OPS
    return [lambda x, op=op, k=k: op(x, factors[k]) for k, op in enumerate(ops)]


def jitter_in_order(image: tf.Tensor, factors: tf.Tensor, order: tf.Tensor, *,
                    jit_compile: bool = True) -> tf.Tensor:
    """The ops of :func:`jitter_ops` with ``factors`` [4] (b, c, s, h), in ``order``
    [4], each result clipped to [0, 1]. float32 [H, W, 3] in [0, 1] → same."""
    branches = jitter_ops(factors, jit_compile=jit_compile)
    for position in range(4):
        image = tf.switch_case(order[position],
                               [lambda f=f, x=image: f(x) for f in branches])
    return image


def color_jitter(image: tf.Tensor, seed: tf.Tensor, *, brightness: float,
                 contrast: float, saturation: float, hue: float,
                 jit_compile: bool = True) -> tf.Tensor:
    """Brightness, contrast, saturation, hue in an order drawn from ``seed``, with
    factors drawn from it too (:func:`jitter_draws`), each result clipped to [0, 1] (see
    ``augment.ViewConfig``). float32 [H, W, 3] in [0, 1] → same."""
    factors, order = jitter_draws(seed, brightness=brightness, contrast=contrast,
                                  saturation=saturation, hue=hue)
    return jitter_in_order(image, factors, order, jit_compile=jit_compile)
