"""Mask quality against ground truth: IoU, precision, recall and F-measure.

Per image, with ``tp``, ``fp``, ``fn`` the pixel counts of the binarised masks (any value
> 0 is foreground, so 0/1 and 0/255 masks both work):

- IoU = tp / (tp + fp + fn); precision = tp / (tp + fp); recall = tp / (tp + fn);
- F-measure F_β = (1 + β²)·P·R / (β²·P + R) with **β² = 0.3**, the saliency-literature
  convention (Achanta et al. 2009) that weights precision more than recall; 0 when P = R = 0.

Empty masks: when prediction and ground truth are both empty, every score is 1 (the
prediction is exactly right); when only one of them is empty, every score is 0.

Aggregates are plain means over images (``mean_iou``), per class (``per_class``), and the
mean of the class means (``class_mean_iou``, which weights classes equally).

The evaluation takes an iterator of ``(id, class_name, pred, gt)``, so folders
(``iter_mask_folder_pairs``), in-memory arrays (``evaluate_arrays``) and TFRecords can all
feed it. A ``pred`` of ``None`` marks a missing prediction: it is counted, listed, and left
out of the means.
"""
from __future__ import annotations

import dataclasses
import os
from typing import Any, Dict, Iterable, Iterator, List, Optional, Sequence, Tuple

import numpy as np

from harl_tf.errors import DataError, MissingPathError

F_BETA_SQUARED = 0.3
MASK_EXTENSIONS = (".png", ".bmp", ".tif", ".tiff", ".jpg", ".jpeg", ".webp")

SCORE_NAMES = ("iou", "precision", "recall", "f_measure")


def mask_scores(pred: np.ndarray, gt: np.ndarray, *, name: str = "mask") -> Dict[str, float]:
    """IoU, precision, recall and F-measure (β² = 0.3) of one predicted mask ``[H, W]``
    against its ground truth ``[H, W]`` (conventions in the module docstring)."""
    pred = _binary(pred, f"{name} (prediction)")
    gt = _binary(gt, f"{name} (ground truth)")
    if pred.shape != gt.shape:
        raise DataError(f"{name}: prediction shape {pred.shape} differs from ground truth "
                        f"shape {gt.shape}; masks must be at the image's resolution")
    tp = float(np.count_nonzero(pred & gt))
    fp = float(np.count_nonzero(pred & ~gt))
    fn = float(np.count_nonzero(~pred & gt))
    pred_empty, gt_empty = tp + fp == 0, tp + fn == 0
    if pred_empty and gt_empty:
        return dict(iou=1.0, precision=1.0, recall=1.0, f_measure=1.0)
    if pred_empty or gt_empty:
        return dict(iou=0.0, precision=0.0, recall=0.0, f_measure=0.0)
    precision, recall = tp / (tp + fp), tp / (tp + fn)
    denominator = F_BETA_SQUARED * precision + recall
    f_measure = (1 + F_BETA_SQUARED) * precision * recall / denominator if denominator else 0.0
    return dict(iou=tp / (tp + fp + fn), precision=precision, recall=recall,
                f_measure=f_measure)


def _binary(mask: np.ndarray, name: str) -> np.ndarray:
    mask = np.asarray(mask)
    if mask.ndim == 3 and mask.shape[-1] == 1:
        mask = mask[..., 0]
    if mask.ndim != 2:
        raise DataError(f"{name}: expected a mask [H, W] or [H, W, 1], got shape {mask.shape}")
    return mask > 0


@dataclasses.dataclass
class QualityReport:
    """Result of ``evaluate``: per-image rows ``{"id", "class", "iou", "precision",
    "recall", "f_measure"}``, and the ids whose prediction was missing."""
    rows: List[Dict[str, Any]]
    missing: List[str]

    @property
    def num_images(self) -> int:
        return len(self.rows)

    def mean(self, score: str = "iou") -> float:
        """Mean of ``score`` over all evaluated images (NaN when there are none)."""
        return float(np.mean([r[score] for r in self.rows])) if self.rows else float("nan")

    @property
    def mean_iou(self) -> float:
        return self.mean("iou")

    def per_class(self) -> Dict[str, Dict[str, float]]:
        """``{class: {"count", "iou", "precision", "recall", "f_measure"}}`` (class means)."""
        groups: Dict[str, List[Dict[str, Any]]] = {}
        for row in self.rows:
            groups.setdefault(row["class"], []).append(row)
        return {cls: dict(count=len(rows), **{s: float(np.mean([r[s] for r in rows]))
                                               for s in SCORE_NAMES})
                for cls, rows in sorted(groups.items())}

    @property
    def class_mean_iou(self) -> float:
        """Mean over classes of the per-class mean IoU (classes weigh equally)."""
        classes = self.per_class()
        return (float(np.mean([c["iou"] for c in classes.values()])) if classes
                else float("nan"))

    def summary(self) -> Dict[str, Any]:
        """JSON-able summary: counts, overall means, class-mean IoU, per-class table."""
        return dict(num_images=self.num_images, num_missing=len(self.missing),
                    f_beta_squared=F_BETA_SQUARED,
                    **{f"mean_{s}": self.mean(s) for s in SCORE_NAMES},
                    class_mean_iou=self.class_mean_iou, per_class=self.per_class(),
                    missing=list(self.missing))

    def table(self) -> str:
        """A fixed-width text table: one line per class, then the overall line."""
        lines = [f"{'class':<20} {'n':>6} {'IoU':>7} {'P':>7} {'R':>7} {'F0.3':>7}"]
        for cls, c in self.per_class().items():
            lines.append(f"{cls or '-':<20} {c['count']:>6d} {c['iou']:>7.4f} "
                         f"{c['precision']:>7.4f} {c['recall']:>7.4f} {c['f_measure']:>7.4f}")
        lines.append(f"{'all':<20} {self.num_images:>6d} {self.mean('iou'):>7.4f} "
                     f"{self.mean('precision'):>7.4f} {self.mean('recall'):>7.4f} "
                     f"{self.mean('f_measure'):>7.4f}")
        lines.append(f"class-mean IoU {self.class_mean_iou:.4f}; missing predictions "
                     f"{len(self.missing)}")
        return "\n".join(lines)


def evaluate(items: Iterable[Tuple[str, str, Optional[np.ndarray], np.ndarray]]
             ) -> QualityReport:
    """Scores an iterable of ``(id, class_name, pred, gt)``; ``pred`` may be ``None``
    (missing). Returns a ``QualityReport``."""
    rows, missing = [], []
    for example_id, class_name, pred, gt in items:
        if pred is None:
            missing.append(str(example_id))
            continue
        scores = mask_scores(pred, gt, name=str(example_id))
        rows.append({"id": str(example_id), "class": str(class_name), **scores})
    return QualityReport(rows, missing)


def evaluate_arrays(preds: Sequence[np.ndarray], gts: Sequence[np.ndarray],
                    class_names: Optional[Sequence[str]] = None) -> QualityReport:
    """``evaluate`` for parallel sequences of masks; ids are the indices as strings."""
    if len(preds) != len(gts):
        raise ValueError(f"evaluate_arrays: {len(preds)} predictions but {len(gts)} "
                         "ground-truth masks")
    classes = class_names if class_names is not None else [""] * len(gts)
    if len(classes) != len(gts):
        raise ValueError(f"evaluate_arrays: {len(classes)} class names for {len(gts)} masks")
    return evaluate((str(i), c, p, g) for i, (p, g, c) in enumerate(zip(preds, gts, classes)))


def read_mask(path: str) -> np.ndarray:
    """Reads a single-channel mask image as ``uint8 {0, 1} [H, W]`` (values > 0 → 1;
    multi-channel files use their first channel)."""
    from PIL import Image  # local: keeps the import of this module light

    with Image.open(path) as image:
        array = np.asarray(image)
    if array.ndim == 3:
        array = array[..., 0]
    return (array > 0).astype(np.uint8)


def list_masks(root: str) -> List[str]:
    """Sorted relative paths (``/``-separated, no extension) of mask files under ``root``."""
    if not os.path.isdir(root):
        raise MissingPathError(f"mask folder {root!r} does not exist or is not a directory")
    found = []
    for directory, _, files in os.walk(root):
        for filename in files:
            stem, ext = os.path.splitext(filename)
            if ext.lower() in MASK_EXTENSIONS:
                rel = os.path.relpath(os.path.join(directory, stem), root)
                found.append(rel.replace(os.sep, "/"))
    return sorted(found)


def _find_with_any_extension(root: str, rel_stem: str) -> Optional[str]:
    base = os.path.join(root, *rel_stem.split("/"))
    for ext in MASK_EXTENSIONS:
        for candidate in (base + ext, base + ext.upper()):
            if os.path.isfile(candidate):
                return candidate
    return None


def iter_mask_folder_pairs(pred_dir: str, gt_dir: str
                           ) -> Iterator[Tuple[str, str, Optional[np.ndarray], np.ndarray]]:
    """Yields ``(id, class, pred, gt)`` for every ground-truth mask under ``gt_dir``.

    ``id`` is the relative path without extension (``"cat/0001"``); ``class`` is its first
    directory (``""`` for files at the top level); ``pred`` is the mask with the same
    relative path under ``pred_dir`` (any mask extension), or ``None`` if there is none.
    """
    if not os.path.isdir(pred_dir):
        raise MissingPathError(f"prediction folder {pred_dir!r} does not exist")
    for rel in list_masks(gt_dir):
        gt = read_mask(_find_with_any_extension(gt_dir, rel))
        pred_path = _find_with_any_extension(pred_dir, rel)
        pred = read_mask(pred_path) if pred_path else None
        class_name = rel.split("/")[0] if "/" in rel else ""
        yield rel, class_name, pred, gt


def evaluate_folders(pred_dir: str, gt_dir: str) -> QualityReport:
    """Scores every mask under ``gt_dir`` against the mirrored one under ``pred_dir``."""
    return evaluate(iter_mask_folder_pairs(pred_dir, gt_dir))


def _record_masks(file_pattern: str) -> Iterator[Tuple[str, int, np.ndarray]]:
    """``(id, label, mask uint8 {0,1} [H, W])`` of every record matching ``file_pattern``
    (comma-separated globs), in file order."""
    import glob

    from harl_tf.data import schema  # local: keeps TensorFlow out of folder-only use

    files = sorted({f for pattern in file_pattern.split(",") for f in glob.glob(pattern)})
    if not files:
        raise MissingPathError(f"no TFRecord file matches {file_pattern!r}")
    for path in files:
        for record in schema.read_examples(path, decode=False):
            mask = schema.decode_mask({"mask": record["mask"]}).numpy()[..., 0]
            yield record["id"], record["label"], mask


def iter_record_pairs(pred_records: str, *, gt_records: Optional[str] = None,
                      gt_dir: Optional[str] = None,
                      class_names: Optional[Sequence[str]] = None
                      ) -> Iterator[Tuple[str, str, Optional[np.ndarray], np.ndarray]]:
    """Yields ``(id, class, pred, gt)`` for the masks stored in TFRecords.

    Ground truth comes either from other records (matched by record id: e.g. the same
    source built once with ground-truth masks) or from a mask folder: a record id is the
    image's path relative to the builder's ``--images_dir``; its mask is looked up under
    ``gt_dir`` at that path with ``images/`` replaced by ``masks/`` and any mask extension
    (the layout of the cut-outs data). The class is ``class_names[label]`` when given, else
    the label. Every ground-truth mask is yielded; a missing prediction is ``None``.
    """
    if (gt_records is None) == (gt_dir is None):
        raise ValueError("iter_record_pairs: give exactly one of gt_records and gt_dir")

    def class_of(label: int) -> str:
        if class_names is not None and 0 <= label < len(class_names):
            return str(class_names[label])
        return str(label)

    preds = {example_id: (label, mask) for example_id, label, mask
             in _record_masks(pred_records)}
    if gt_records is not None:
        for example_id, label, gt in _record_masks(gt_records):
            pred = preds.get(example_id)
            yield example_id, class_of(label), (pred[1] if pred else None), gt
        return
    if not os.path.isdir(gt_dir):
        raise MissingPathError(f"ground-truth folder {gt_dir!r} does not exist")
    for example_id, (label, pred) in sorted(preds.items()):
        stem = os.path.splitext(example_id.replace("images/", "masks/", 1))[0]
        path = _find_with_any_extension(gt_dir, stem)
        if path is None:
            raise MissingPathError(
                f"record {example_id!r}: no ground-truth mask {stem}.* under {gt_dir!r}")
        yield example_id, class_of(label), pred, read_mask(path)
