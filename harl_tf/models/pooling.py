"""Foreground / background / global pooling of a feature map with a heuristic mask (SPEC §4).

Notation, for one example: a feature map h of shape [h, w, C] and a binary mask M at image
resolution [H, W]. The mask is brought to the feature grid by area averaging, giving a soft
mask m ∈ [0, 1]^{h×w} (the fraction of each feature cell's pixels that are foreground):

    h_fg   = Σ_ij h_ij · m_ij       / (Σ_ij m_ij       + ε)
    h_bg   = Σ_ij h_ij · (1 − m_ij) / (Σ_ij (1 − m_ij) + ε)
    h_glob = (1 / hw) Σ_ij h_ij

A region is *valid* when its area fraction a = (1/hw) Σ m (foreground) or 1 − a (background)
is at least ``min_fraction``; by default one feature cell, 1/(h·w). Invalid regions are
still pooled (to a finite vector, thanks to ε) but must not enter the loss.

``literal=True`` follows the paper's wording instead: multiply, then global-average-pool
over all positions, h_fg = (1/hw) Σ h·m (= the above times a, up to ε), and likewise for bg.

All math is float32, whatever the compute dtype of the encoder (mixed precision casts the
feature map up before pooling).
"""
from __future__ import annotations

from typing import NamedTuple, Optional

import tensorflow as tf

DEFAULT_EPSILON = 1e-6
# Relative slack on the validity floor: a region of exactly one feature cell must count as
# valid even though its float32 area fraction can round to just below 1/(h·w).
_FLOOR_TOLERANCE = 1e-4


class PooledRegions(NamedTuple):
    """Pooled features of one view.

    fg, bg, glob: float32 [B, C]. fg_valid, bg_valid: float32 [B] in {0, 1}.
    fg_fraction: float32 [B], foreground area fraction a ∈ [0, 1] on the feature grid.
    """
    fg: tf.Tensor
    bg: tf.Tensor
    glob: tf.Tensor
    fg_valid: tf.Tensor
    bg_valid: tf.Tensor
    fg_fraction: tf.Tensor


def downsample_mask(mask: tf.Tensor, size) -> tf.Tensor:
    """Area-average a mask to the feature grid.

    Args:
      mask: [B, H, W, 1] (or [B, H, W]) with values in [0, 1]; any dtype.
      size: (h, w) of the feature map.
    Returns:
      float32 [B, h, w, 1], m_ij = mean of the mask over the pixels of cell (i, j). Exact
      block means when H, W are multiples of h, w; otherwise TF's area interpolation.
    """
    mask = tf.cast(mask, tf.float32)
    if mask.shape.rank == 3:
        mask = mask[..., tf.newaxis]
    (height, width), (h, w) = mask.shape[1:3], size
    if height and width and height % int(h) == 0 and width % int(w) == 0:
        # Block means as an average pool: the same numbers as the area resize, and XLA
        # (--jit_compile) has a kernel for it (it has none for ResizeArea).
        window = (height // int(h), width // int(w))
        soft = tf.nn.avg_pool2d(mask, window, window, "VALID")
    else:
        soft = tf.image.resize(mask, size, method="area", antialias=False)
    return tf.clip_by_value(soft, 0.0, 1.0)


def region_pool(features: tf.Tensor, weights: tf.Tensor,
                epsilon: float = DEFAULT_EPSILON) -> tf.Tensor:
    """Weighted average pooling: Σ h·m / (Σ m + ε).

    Args:
      features: [B, h, w, C] (any float dtype; computed in float32).
      weights: float32 [B, h, w, 1], the soft region mask m.
    Returns:
      float32 [B, C].
    """
    features = tf.cast(features, tf.float32)
    weights = tf.cast(weights, tf.float32)
    total = tf.reduce_sum(features * weights, axis=[1, 2])
    area = tf.reduce_sum(weights, axis=[1, 2])  # [B, 1]
    return total / (area + epsilon)


def foreground_pool(features, soft_mask, epsilon: float = DEFAULT_EPSILON):
    """h_fg = Σ h·m / (Σ m + ε); float32 [B, C]."""
    return region_pool(features, soft_mask, epsilon)


def background_pool(features, soft_mask, epsilon: float = DEFAULT_EPSILON):
    """h_bg = Σ h·(1 − m) / (Σ (1 − m) + ε); float32 [B, C]."""
    return region_pool(features, 1.0 - tf.cast(soft_mask, tf.float32), epsilon)


def global_pool(features):
    """h_glob = mean of h over all positions; float32 [B, C]."""
    return tf.reduce_mean(tf.cast(features, tf.float32), axis=[1, 2])


def literal_region_pool(features, weights):
    """The paper's wording: h ⊙ m, then GAP over all positions, (1/hw) Σ h·m; float32 [B, C]."""
    features = tf.cast(features, tf.float32)
    return tf.reduce_mean(features * tf.cast(weights, tf.float32), axis=[1, 2])


def default_min_fraction(feature_height: int, feature_width: int) -> float:
    """The default validity floor: the area of one feature cell, 1 / (h·w)."""
    return 1.0 / float(feature_height * feature_width)


def region_valid(fraction: tf.Tensor, min_fraction: float) -> tf.Tensor:
    """1.0 where an area fraction reaches the floor (with a 1e-4 relative slack), else 0.0.

    fraction: float32 [B]; returns float32 [B].
    """
    threshold = min_fraction * (1.0 - _FLOOR_TOLERANCE)
    return tf.cast(fraction >= threshold, tf.float32)


def pool_regions(features: tf.Tensor, mask: tf.Tensor, *,
                 min_fraction: Optional[float] = None,
                 epsilon: float = DEFAULT_EPSILON,
                 literal: bool = False) -> PooledRegions:
    """Foreground, background and global features of one view, with validity flags.

    Args:
      features: [B, h, w, C] feature map (static h, w), any float dtype.
      mask: [B, H, W, 1] binary mask at image resolution (1 = foreground).
      min_fraction: validity floor on the region area fraction; None → 1/(h·w). Use 0.0 to
        treat every region as valid.
      epsilon: ε of the weighted average.
      literal: pool as the paper words it (multiply, then GAP over all positions).
    Returns:
      PooledRegions (all float32).
    """
    height, width = features.shape[1], features.shape[2]
    if height is None or width is None:
        raise ValueError(
            f"pool_regions needs a static feature-map size, got shape {features.shape}.")
    if min_fraction is None:
        min_fraction = default_min_fraction(height, width)
    soft = downsample_mask(mask, (height, width))
    fg_fraction = tf.reduce_mean(soft, axis=[1, 2, 3])
    if literal:
        fg = literal_region_pool(features, soft)
        bg = literal_region_pool(features, 1.0 - soft)
    else:
        fg = foreground_pool(features, soft, epsilon)
        bg = background_pool(features, soft, epsilon)
    return PooledRegions(
        fg=fg, bg=bg, glob=global_pool(features),
        fg_valid=region_valid(fg_fraction, min_fraction),
        bg_valid=region_valid(1.0 - fg_fraction, min_fraction),
        fg_fraction=fg_fraction)
