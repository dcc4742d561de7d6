"""Semantic-segmentation metrics from a confusion matrix accumulated over a whole split.

The confusion matrix ``C [K, K]`` counts pixels: ``C[t, p]`` = pixels of target class t
predicted as class p (rows: targets, columns: predictions), summed over every image of the
split before any ratio is taken, so large and small images weigh by their pixels (the
PASCAL VOC / Cityscapes convention), not by image. Nothing here imports TensorFlow.
"""
from __future__ import annotations

from typing import Any, Dict, List, Optional

import numpy as np


def confusion_matrix(targets: np.ndarray, predictions: np.ndarray,
                     num_classes: int) -> np.ndarray:
    """``C [K, K]`` int64 with ``C[t, p] = #{pixels: target = t, prediction = p}``.

    ``targets`` and ``predictions`` are integer arrays of one shape (any, e.g. ``[B, H,
    W]``) with values in ``[0, K)``; a value outside is a ValueError (not silently
    dropped: a pixel missing from C would change every ratio)."""
    targets = np.asarray(targets, np.int64).ravel()
    predictions = np.asarray(predictions, np.int64).ravel()
    if targets.shape != predictions.shape:
        raise ValueError(f"confusion_matrix: {targets.size} targets but "
                         f"{predictions.size} predictions.")
    for name, values in (("targets", targets), ("predictions", predictions)):
        if values.size and (values.min() < 0 or values.max() >= num_classes):
            raise ValueError(f"confusion_matrix: {name} must be in [0, {num_classes}), got "
                             f"values in [{values.min()}, {values.max()}].")
    counts = np.bincount(targets * num_classes + predictions, minlength=num_classes ** 2)
    return counts.reshape(num_classes, num_classes)


def segmentation_scores(confusion: np.ndarray) -> Dict[str, Any]:
    """Mean IoU, per-class IoU and pixel accuracy of a confusion matrix ``C [K, K]``.

    For class c: ``IoU_c = C[c, c] / (Σ_p C[c, p] + Σ_t C[t, c] − C[c, c])`` (true
    positives over target ∪ prediction). A class absent from both the targets and the
    predictions of the whole split (its row and column are zero) has no IoU (0 / 0): it
    is ``None`` in ``per_class_iou`` and left out of the mean, so a split that happens
    to hold no example of a class is not scored as if the class were missed. A class
    present in the targets but never predicted (or predicted but never present) has IoU
    0 and counts. ``mean_iou = mean of IoU_c over the classes that have one``;
    ``pixel_accuracy = Σ_c C[c, c] / Σ C``.

    Returns:
      ``{"mean_iou": float, "per_class_iou": [K] float or None, "pixel_accuracy": float,
      "classes_in_mean": int, "num_pixels": int}``.
    Raises:
      ValueError: C is not square, or holds no pixel.
    """
    confusion = np.asarray(confusion, np.int64)
    if confusion.ndim != 2 or confusion.shape[0] != confusion.shape[1]:
        raise ValueError(f"segmentation_scores: the confusion matrix must be [K, K], got "
                         f"{confusion.shape}.")
    total = int(confusion.sum())
    if total == 0:
        raise ValueError("segmentation_scores: the confusion matrix holds no pixel.")
    hits = np.diag(confusion).astype(np.float64)
    union = confusion.sum(axis=1) + confusion.sum(axis=0) - hits
    per_class: List[Optional[float]] = [
        float(h / u) if u > 0 else None for h, u in zip(hits, union)]
    present = [v for v in per_class if v is not None]
    return {"mean_iou": float(np.mean(present)),
            "per_class_iou": per_class,
            "pixel_accuracy": float(hits.sum() / total),
            "classes_in_mean": len(present),
            "num_pixels": total}
