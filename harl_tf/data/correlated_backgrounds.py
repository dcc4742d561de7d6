"""A training set whose backgrounds predict the class: the shortcut HARL is built to resist.

On ImageNet, backgrounds correlate with classes (boats on water, birds in the sky), and
Xiao et al. (ICLR 2021, "Noise or Signal") show that classifiers learn to lean on them.
A benchmark whose backgrounds are drawn independently of the class (fmnist-scenes) cannot
show whether an encoder resists that shortcut. :func:`class_correlated` makes it
measurable: it re-pastes each labelled object onto a background chosen to carry its class.

1. Every image's own object is removed (:func:`background_shift.fill_background`, the
   inpainting of the mixed_rand test).
2. The filled backgrounds are grouped by appearance: k-means (k = number of classes,
   k-means++ start, seeded) on six numbers per background, the mean and standard deviation
   of each CIELAB channel, standardised. Backgrounds cut from the same photograph mostly
   share a group.
3. Group ``g`` is assigned to the ``g``-th class (groups ordered by mean lightness, so the
   assignment depends on the seed and the data only).
4. With probability ``correlation`` an example's object is pasted, at its own place, onto
   the filled background of a uniformly drawn example of its class's group; otherwise the
   example is kept as it is.

Objects, masks, labels and ids are unchanged; only backgrounds move. Train on the result,
evaluate on the untouched (uncorrelated) test split: an encoder whose features describe
the object keeps its accuracy, one that describes the background loses it.
"""
from __future__ import annotations

from typing import Dict, Optional, Sequence, Tuple

import cv2
import numpy as np

from harl_tf.data import background_shift


def background_descriptors(backgrounds: Sequence[np.ndarray]) -> np.ndarray:
    """``float64 [N, 6]``: mean and standard deviation of the L, a, b channels of each
    ``uint8 [H, W, 3]`` RGB background."""
    out = np.empty((len(backgrounds), 6), np.float64)
    for i, background in enumerate(backgrounds):
        lab = cv2.cvtColor(np.ascontiguousarray(background, np.uint8),
                           cv2.COLOR_RGB2LAB).reshape(-1, 3).astype(np.float64)
        out[i, :3], out[i, 3:] = lab.mean(0), lab.std(0)
    return out


def kmeans(x: np.ndarray, k: int, seed: int, *, iterations: int = 100) -> np.ndarray:
    """Lloyd's k-means with a k-means++ start on standardised ``x [N, D]``; ``int64 [N]``
    group of each row (groups 0..k-1, none empty). Deterministic for a seed."""
    x = np.asarray(x, np.float64)
    if not 1 <= k <= len(x):
        raise ValueError(f"kmeans: k = {k} groups for {len(x)} points.")
    scale = x.std(0)
    x = (x - x.mean(0)) / np.where(scale > 0, scale, 1.0)
    rng = np.random.default_rng(seed)
    centres = [x[rng.integers(len(x))]]
    for _ in range(1, k):
        d2 = np.min(((x[:, None] - np.array(centres)[None]) ** 2).sum(-1), axis=1)
        total = d2.sum()
        centres.append(x[rng.choice(len(x), p=d2 / total)] if total > 0
                       else x[rng.integers(len(x))])
    centres = np.array(centres)
    groups = np.full(len(x), -1)
    for _ in range(iterations):
        new = np.argmin(((x[:, None] - centres[None]) ** 2).sum(-1), axis=1)
        for g in range(k):              # an emptied group takes the point furthest away
            if not np.any(new == g):
                far = np.argmax(((x - centres[new]) ** 2).sum(-1))
                new[far] = g
        if np.array_equal(new, groups):
            break
        groups = new
        centres = np.array([x[groups == g].mean(0) for g in range(k)])
    return groups.astype(np.int64)


def class_correlated(images: Sequence[np.ndarray], masks: Sequence[np.ndarray],
                     labels: Sequence[int], correlation: float, seed: int, *,
                     ids: Optional[Sequence[str]] = None
                     ) -> Tuple[list, np.ndarray, Dict[str, object]]:
    """The class-correlated variant of a labelled set (module docstring).

    Args:
      images: N ``uint8 [H, W, 3]`` RGB arrays; masks: N object masks ``[H, W]``.
      labels: ``[N]`` class indices (at least two classes).
      correlation: probability in [0, 1] that an example gets a background of its
        class's group.
      seed: the grouping and the draws.
      ids: record ids for error messages.
    Returns:
      ``(images, donors, info)``: the N new images; ``donors[i]`` the example whose filled
      background example i now has (``-1``: kept as it was); ``info`` with
      ``descriptors`` (:func:`background_descriptors` of each original filled
      background), ``groups`` (``int64 [N]``, their groups), ``class_of_group`` and
      ``group_sizes``.
    Raises:
      EmptyMaskError: an empty mask, named.
      ValueError: ``correlation`` outside [0, 1], fewer than two classes.
    """
    if not 0.0 <= correlation <= 1.0:
        raise ValueError(f"correlation must be in [0, 1], got {correlation}.")
    labels = np.asarray(labels, np.int64)
    classes = np.unique(labels)
    if len(classes) < 2:
        raise ValueError(f"class_correlated needs at least two classes, got {len(classes)}.")
    background_shift.check_masks(masks, ids)
    backgrounds = [background_shift.fill_background(image, mask)
                   for image, mask in zip(images, masks)]
    descriptors = background_descriptors(backgrounds)
    groups = kmeans(descriptors, len(classes), seed)
    lightness = [descriptors[groups == g, 0].mean() for g in range(len(classes))]
    class_of_group = {int(g): int(classes[rank])
                      for rank, g in enumerate(np.argsort(lightness, kind="stable"))}
    group_of_class = {c: g for g, c in class_of_group.items()}
    members = {g: np.flatnonzero(groups == g) for g in range(len(classes))}
    rng = np.random.default_rng(seed + 1)
    out, donors = [], np.full(len(labels), -1, np.int64)
    for i, label in enumerate(labels):
        if rng.random() < correlation:
            pool = members[group_of_class[int(label)]]
            donors[i] = pool[rng.integers(len(pool))]
            out.append(background_shift.composite(images[i], masks[i], backgrounds[donors[i]]))
        else:
            out.append(np.asarray(images[i], np.uint8).copy())
    info = {"descriptors": descriptors, "groups": groups, "class_of_group": class_of_group,
            "group_sizes": [int(len(members[g])) for g in range(len(classes))]}
    return out, donors, info
