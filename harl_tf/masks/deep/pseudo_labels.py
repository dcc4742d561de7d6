"""Pseudo-labels for the saliency head, fused from several unsupervised masks (DeepUSPS,
Nguyen et al. 2019, the paper's reference [42]: several handcrafted saliency methods, only
where they are confident).

Each setting ``s`` gives a mask of every image (the conventional method at other
parameters, or a mask folder). Each mask is area-averaged to the feature grid, giving every
cell its foreground fraction ``a_s``. A cell is labelled

- 1 when every setting calls it foreground: ``min_s a_s >= ignore_high``,
- 0 when every setting calls it background: ``max_s a_s <= ignore_low``,
- and is ignored otherwise (weight 0): the settings disagree, or the cell straddles a
  boundary.

With one setting this is :func:`harl_tf.masks.deep.head_training.cell_targets`.
"""
from __future__ import annotations

from typing import Any, Dict, List, Sequence, Tuple

import numpy as np
import tensorflow as tf

from harl_tf.errors import ConfigError, DataError
from harl_tf.masks import get_method

# Conventional settings for fusion: the paper's FH sweep (sigma in {0.2, 0.4, 0.8}, minimum
# size in {1000, 1500}; SPEC §7) around the defaults, and one without the GrabCut step.
CONVENTIONAL_SETTINGS: Dict[str, Dict[str, Any]] = {
    "default": {},
    "sigma0.4": {"sigma": 0.4},
    "sigma0.2_size1500": {"sigma": 0.2, "min_size": 1500, "k": 1500.0},
    "no_grabcut": {"refine_iterations": 0},
}


def cell_fractions(masks: Sequence[np.ndarray], grid: Tuple[int, int]) -> np.ndarray:
    """Masks ``{0, 1}`` ``[H_i, W_i]`` (any sizes) → foreground fraction of every cell of
    ``grid = (h, w)`` (area averaging): float32 ``[N, h, w]`` in ``[0, 1]``."""
    fractions = np.zeros((len(masks),) + tuple(grid), np.float32)
    for index, mask in enumerate(masks):
        binary = (np.asarray(mask) > 0).astype(np.float32)[..., None]
        fractions[index] = tf.image.resize(binary, grid, method="area").numpy()[..., 0]
    return fractions


def fused_cell_targets(mask_sets: Sequence[Sequence[np.ndarray]], grid: Tuple[int, int], *,
                       ignore_low: float = 0.2, ignore_high: float = 0.8
                       ) -> Tuple[np.ndarray, np.ndarray]:
    """Cell targets on which every setting agrees (see the module docstring).

    ``mask_sets[s][i]``: setting ``s``'s mask of image ``i``. Returns ``targets`` float32
    ``[N, h, w]`` ({0, 1}) and ``weights`` float32 ``[N, h, w]`` (1 labelled, 0 ignored).
    """
    if not mask_sets:
        raise DataError("no pseudo-mask sets to fuse")
    counts = {len(masks) for masks in mask_sets}
    if len(counts) != 1:
        raise DataError(f"pseudo-mask sets differ in length: {sorted(counts)}")
    if not 0.0 <= ignore_low <= ignore_high <= 1.0:
        raise ConfigError(f"need 0 <= ignore_low <= ignore_high <= 1, got {ignore_low}, "
                          f"{ignore_high}")
    fractions = np.stack([cell_fractions(masks, grid) for masks in mask_sets])  # [S, N, h, w]
    foreground = fractions.min(axis=0) >= ignore_high
    background = fractions.max(axis=0) <= ignore_low
    if ignore_low == ignore_high:  # majority labels: a cell at exactly 0.5 is foreground
        background &= ~foreground
    return foreground.astype(np.float32), (foreground | background).astype(np.float32)


def conventional_mask_sets(images: Sequence[np.ndarray], settings: Sequence[str]
                           ) -> Tuple[List[List[np.ndarray]], Dict[str, Dict[str, Any]]]:
    """Conventional masks of ``images`` at each named setting of
    :data:`CONVENTIONAL_SETTINGS`. Returns the mask sets and the full parameters used."""
    unknown = [name for name in settings if name not in CONVENTIONAL_SETTINGS]
    if unknown:
        raise ConfigError(f"unknown conventional setting(s) {unknown}; expected some of "
                          f"{sorted(CONVENTIONAL_SETTINGS)}")
    sets, params = [], {}
    for name in settings:
        method = get_method("conventional", **CONVENTIONAL_SETTINGS[name])
        sets.append([method(image) for image in images])
        params[name] = method.params
    return sets, params
