"""Train splits for choosing settings on images like the test split's: cutouts' test images
show objects no train image shows, so a selection part of train must show objects its head
part does not (``bench.bench_masks_deep --select_unseen_objects``). Objects are told apart
by the shape of their exact masks (the images carry no object id). NumPy only."""
from __future__ import annotations

import numpy as np


def object_signature(mask, side=24):
    """The mask cropped to its bounding box and resized to ``side`` x ``side`` (nearest):
    the same cut-out at another size or position gives nearly the same signature."""
    rows, cols = np.nonzero(mask)
    box = mask[rows.min():rows.max() + 1, cols.min():cols.max() + 1]
    r = (np.arange(side) * box.shape[0] / side).astype(int)
    c = (np.arange(side) * box.shape[1] / side).astype(int)
    return box[r][:, c] > 0


def object_groups(masks, classes, threshold=0.6):
    """Group id of each image: images of one class whose mask signatures (either way up
    left-right) overlap with IoU >= ``threshold`` show the same object (greedy, first
    representative wins). How cutouts' train images are split so that the selection
    images show objects the head never saw, as its test images do. The threshold errs
    towards merging look-alikes (a merged pair only coarsens the split; a split object
    would leak): cutouts' 3,000 train images give 107 groups for its 156 train objects
    (0.8 gave 354: 42 % of the objects are clipped by an edge, which changes their box)."""
    def iou(a, b):
        return np.logical_and(a, b).sum() / max(1, np.logical_or(a, b).sum())
    representatives, groups = [], []
    for mask, label in zip(masks, classes):
        signature = object_signature(mask)
        flipped = signature[:, ::-1]
        for index, (other_label, other) in enumerate(representatives):
            if other_label == label and max(iou(signature, other),
                                            iou(flipped, other)) >= threshold:
                groups.append(index)
                break
        else:
            groups.append(len(representatives))
            representatives.append((label, signature))
    return groups


def split_by_object(relative, groups, train_limit, select_limit, seed):
    """Head / selection parts of the train split that share no object: whole groups (in
    a seeded order) go to selection until it holds ``select_limit`` images; the head part
    is ``train_limit`` images (seeded) of the other groups."""
    rng = np.random.default_rng(seed)
    members = {}
    for rel, group in zip(relative, groups):
        members.setdefault(group, []).append(rel)
    order = rng.permutation(sorted(members))
    select, rest = [], []
    for group in order:
        (select if len(select) < select_limit else rest).extend(members[group])
    head = [rest[i] for i in rng.permutation(len(rest))[:train_limit]]
    return sorted(head), sorted(select)
