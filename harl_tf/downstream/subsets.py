"""Labelled subsets for semi-supervised evaluation (SPEC section 8: 1 % and 10 % of labels).

A subset is a deterministic function of (record ids, labels, fraction, seed): every class
gets the same number of examples, ``k = max(1, round(fraction * N / num_classes))`` (all of
a class's examples when it has fewer), chosen as the ``k`` ids with the smallest
``sha256("<seed>/<id>")``. The choice therefore does not depend on file order or
sharding, and the subset for a smaller fraction is contained in the one for a larger
fraction. Ids that also occur in the evaluation split are never chosen, so the labelled
subset is disjoint from what it is evaluated on. The chosen ids are written next to the
results (:func:`write_ids`), one per line, sorted.
"""
from __future__ import annotations

import collections
import hashlib
import os
from typing import Dict, Iterable, List, Sequence, Tuple

import numpy as np
import tensorflow as tf

from harl_tf import atomic
from harl_tf.data import pipeline
from harl_tf.errors import DataError
from harl_tf.progress import progress

_ID_LABEL = {
    "id": tf.io.FixedLenFeature([], tf.string, default_value=b""),
    "label": tf.io.FixedLenFeature([], tf.int64, default_value=-1),
}


_MASK_FIELDS = {
    "id": tf.io.FixedLenFeature([], tf.string, default_value=b""),
    "mask/encoded": tf.io.FixedLenFeature([], tf.string, default_value=b""),
    "mask/method": tf.io.FixedLenFeature([], tf.string, default_value=b""),
}


class MissingLabelsError(DataError):
    """A split used for supervised evaluation has records without a label (-1)."""


class MissingMasksError(DataError):
    """An evaluation that needs the records' masks (a foreground or background embedding,
    segmentation) on records without one."""


def read_mask_methods(file_pattern: str, *, flag: str, why: str) -> Dict[str, int]:
    """``{mask/method: number of records}`` of the records matching ``file_pattern``
    (heuristic methods such as ``conventional``, exact ones such as ``ground_truth``;
    ``unnamed`` when none is recorded), sorted, reading no image. A record without a mask
    is a :class:`MissingMasksError` naming the flag, the file and the record, then ``why``
    (what needs the masks and what to do)."""
    counts: Dict[str, int] = collections.Counter()
    for path in pipeline.list_files(file_pattern, caller=f"--{flag}"):
        dataset = tf.data.TFRecordDataset(path).batch(4096).map(
            lambda s: tf.io.parse_example(s, _MASK_FIELDS))
        for batch in dataset:
            missing = (tf.strings.length(batch["mask/encoded"]) == 0).numpy()
            if missing.any():
                bad = batch["id"].numpy()[int(missing.argmax())].decode()
                raise MissingMasksError(f"--{flag}: {path} has records without a mask (e.g. "
                                        f"id {bad!r}); {why}")
            counts.update(m.decode() or "unnamed" for m in batch["mask/method"].numpy())
    return dict(sorted(counts.items()))


def read_ids_and_labels(file_pattern: str, *, flag: str = "train_files",
                        require_labels: bool = True) -> Tuple[np.ndarray, np.ndarray]:
    """``(ids [N] str, labels [N] int64)`` of every record matching ``file_pattern``, in
    file order, without decoding images.

    With ``require_labels``, records labelled -1 are a :class:`MissingLabelsError` naming
    the flag, the file and an example id.
    """
    ids: List[str] = []
    labels: List[int] = []
    for path in pipeline.list_files(file_pattern, caller=f"--{flag}"):
        dataset = tf.data.TFRecordDataset(path).batch(4096).map(
            lambda s: tf.io.parse_example(s, _ID_LABEL))
        for batch in dataset:
            batch_ids = [b.decode() for b in batch["id"].numpy()]
            batch_labels = batch["label"].numpy()
            if require_labels and np.any(batch_labels < 0):
                bad = batch_ids[int(np.argmax(batch_labels < 0))]
                raise MissingLabelsError(
                    f"--{flag}: {path} has records without a label (label -1, e.g. id "
                    f"{bad!r}); supervised evaluation needs labelled records. Rebuild them "
                    "with labels (tools/build_tfrecords.py) or pass a labelled split.")
            ids.extend(batch_ids)
            labels.extend(int(v) for v in batch_labels)
    return np.asarray(ids, dtype=object), np.asarray(labels, dtype=np.int64)


def _rank_key(seed: int, example_id: str) -> bytes:
    return hashlib.sha256(f"{seed}/{example_id}".encode()).digest()


def label_subset(ids: Sequence[str], labels: Sequence[int], fraction: float, *,
                 exclude_ids: Iterable[str] = (), seed: int = 0) -> List[str]:
    """The sorted ids of a deterministic, class-balanced ``fraction`` of the examples.

    Args:
      ids, labels: every candidate example (e.g. :func:`read_ids_and_labels`).
      fraction: in (0, 1]; 1 selects every eligible example.
      exclude_ids: ids that must not be chosen (the evaluation split's).
      seed: changes which examples are chosen.
    Raises:
      ValueError: fraction outside (0, 1], or a class left with no eligible example.
    """
    if not 0.0 < fraction <= 1.0:
        raise ValueError(f"--label_fraction must be in (0, 1], got {fraction}.")
    excluded = set(exclude_ids)
    by_class: Dict[int, List[str]] = collections.defaultdict(list)
    all_classes = set()
    for example_id, label in zip(ids, labels):
        all_classes.add(int(label))
        if example_id not in excluded:
            by_class[int(label)].append(example_id)
    empty = sorted(all_classes - set(by_class))
    if empty:
        raise DataError(f"classes {empty[:10]} have no training example outside the "
                        "evaluation split; use disjoint --train_files and --eval_files.")
    if fraction == 1.0:
        return sorted(i for members in by_class.values() for i in members)
    per_class = max(1, int(round(fraction * len(ids) / len(all_classes))))
    chosen = []
    for members in by_class.values():
        chosen += sorted(members, key=lambda i: _rank_key(seed, i))[:per_class]
    return sorted(chosen)


def write_ids(path: str, ids: Iterable[str]) -> None:
    """Writes ids one per line (atomically)."""
    with atomic.atomic_path(path) as tmp, open(tmp, "w") as f:
        for example_id in ids:
            f.write(f"{example_id}\n")


def read_ids(path: str) -> List[str]:
    with open(path) as f:
        return [line.rstrip("\n") for line in f if line.strip()]


def write_subset_records(file_pattern: str, ids: Iterable[str], out_dir: str, *,
                         flag: str = "train_files") -> str:
    """Copies the records whose id is in ``ids`` (serialized bytes, unchanged) to
    ``out_dir/subset.tfrecord``; returns its path. Written atomically; an existing file
    is reused only when it was written for the same ids (``out_dir/subset_ids.txt``).
    """
    wanted = sorted(set(ids))
    path = os.path.join(out_dir, "subset.tfrecord")
    ids_path = os.path.join(out_dir, "subset_ids.txt")
    if os.path.exists(path) and os.path.exists(ids_path) and read_ids(ids_path) == wanted:
        return path
    wanted_set = set(wanted)
    found = 0
    with atomic.atomic_path(path) as tmp:
        with tf.io.TFRecordWriter(tmp) as writer:
            files = pipeline.list_files(file_pattern, caller=f"--{flag}")
            records = tf.data.TFRecordDataset(files).map(
                lambda s: (s, tf.io.parse_single_example(s, _ID_LABEL)["id"]))
            for serialized, example_id in progress(records.as_numpy_iterator(), leave=False,
                                                   desc="label subset", unit=" records"):
                if example_id.decode() in wanted_set:
                    writer.write(serialized)
                    found += 1
        if found < len(wanted):
            raise DataError(f"--{flag}: found {found} of the {len(wanted)} subset ids.")
    write_ids(ids_path, wanted)
    return path

