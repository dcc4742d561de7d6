"""Background reliance: the ``mixed_rand`` test of Xiao et al. (ICLR 2021, "Noise or
Signal: The Role of Image Backgrounds in Object Recognition").

Each object, cut out with its mask, is pasted at the same place onto the background of
another image of a random OTHER class (the "donor"), whose own object's hole has been
filled. A classifier that relies on the object keeps its accuracy; one that relies on the
background falls towards chance. The gap ``top-1(original) − top-1(mixed_rand)`` measures
the reliance.

Filling the donor's hole (:func:`fill_background`). Xiao et al. tile the background into
the object's bounding box; with pixel masks we inpaint instead: the hole (the mask,
dilated by one pixel so that a fringe of object colour along the mask's edge does not
survive) is filled by ``cv2.inpaint(..., INPAINT_TELEA)`` (Telea 2004, radius 3), which
propagates the surrounding background inward. Telea's first-order extrapolation can
overshoot the colours it starts from, so the result is clipped per channel to the range
of the background pixels around the hole: no colour appears that the nearby background
does not have.

Pasting (:func:`composite`). At the object image's own resolution; a donor of another size
is resized (bilinear, area when shrinking) to it after filling. The pasted image's mask is
the object's mask, unchanged, and its label and id are the object's.

Donors (:func:`choose_donors`) are drawn uniformly from the examples of other classes by a
generator seeded with ``seed``; the choice depends on the seed and the order of the
labels only.

:func:`shift_records` applies the test to TFRecords of :mod:`harl_tf.data.schema` (what
``python -m tools.shift_backgrounds`` and ``harl_tf.finetune --eval_background`` call).
"""
from __future__ import annotations

import os
from typing import Any, Dict, List, Optional, Sequence, Tuple

import cv2
import numpy as np

from harl_tf import atomic
from harl_tf.errors import ConfigError, DataError

MODES = ("mixed_rand",)
INPAINT_RADIUS = 3
SUMMARY_NAME = "shift_backgrounds.json"


class EmptyMaskError(DataError):
    """An object to paste has an empty mask (or a donor has no background)."""


def _binary(mask: np.ndarray) -> np.ndarray:
    mask = np.asarray(mask)
    if mask.ndim == 3 and mask.shape[-1] == 1:
        mask = mask[..., 0]
    return (mask > (127 if mask.max(initial=0) > 1 else 0)).astype(np.uint8)


def fill_background(image: np.ndarray, mask: np.ndarray, *,
                    radius: int = INPAINT_RADIUS) -> np.ndarray:
    """The image with its object removed: the hole (mask dilated by one pixel) inpainted
    from the surrounding background (Telea), clipped per channel to the colour range of
    the background pixels within ``radius + 1`` pixels of the hole.

    Args:
      image: ``uint8 [H, W, 3]``; mask: ``[H, W]`` or ``[H, W, 1]``, {0, 1} or {0, 255}.
    Returns:
      ``uint8 [H, W, 3]``; pixels outside the dilated mask are unchanged.
    Raises:
      EmptyMaskError: the mask covers the whole image (no background to fill from).
    """
    image = np.ascontiguousarray(image, np.uint8)
    mask = _binary(mask)
    if image.shape[:2] != mask.shape:
        raise DataError(f"fill_background: image {image.shape} and mask {mask.shape} "
                        "differ in height or width.")
    if not mask.any():
        return image.copy()
    hole = cv2.dilate(mask, np.ones((3, 3), np.uint8))
    if hole.all():
        raise EmptyMaskError("the mask covers the whole image: no background to fill from.")
    filled = cv2.inpaint(image, hole, radius, cv2.INPAINT_TELEA)
    inside = hole.astype(bool)
    ring = cv2.dilate(hole, np.ones((2 * radius + 3,) * 2, np.uint8)).astype(bool) & ~inside
    if not ring.any():  # the background is further away than the radius: use all of it
        ring = ~inside
    low, high = image[ring].min(axis=0), image[ring].max(axis=0)
    filled[inside] = np.clip(filled[inside], low, high)
    return filled


def composite(object_image: np.ndarray, object_mask: np.ndarray,
              background: np.ndarray) -> np.ndarray:
    """``object_image`` where the mask is 1, ``background`` elsewhere.

    Args:
      object_image: ``uint8 [H, W, 3]``; object_mask: ``[H, W]`` (as :func:`fill_background`).
      background: ``uint8 [h, w, 3]``, resized to ``H × W`` when it differs.
    Returns: ``uint8 [H, W, 3]``.
    """
    object_image = np.asarray(object_image, np.uint8)
    height, width = object_image.shape[:2]
    background = np.asarray(background, np.uint8)
    if background.shape[:2] != (height, width):
        shrinking = background.shape[0] * background.shape[1] > height * width
        interpolation = cv2.INTER_AREA if shrinking else cv2.INTER_LINEAR
        background = cv2.resize(background, (width, height), interpolation=interpolation)
    return np.where(_binary(object_mask)[..., None].astype(bool), object_image, background)


def choose_donors(labels: Sequence[int], seed: int) -> np.ndarray:
    """For each example i, the index ``j`` of a uniformly drawn example with
    ``labels[j] != labels[i]``: ``int64 [N]``. Raises ValueError with fewer than two
    classes."""
    labels = np.asarray(labels, np.int64)
    if len(np.unique(labels)) < 2:
        raise DataError("mixed_rand needs examples of at least two classes, got "
                        f"{len(np.unique(labels))}.")
    order = np.argsort(labels, kind="stable")       # examples grouped by class
    classes, starts, counts = np.unique(labels[order], return_index=True, return_counts=True)
    slot = np.searchsorted(classes, labels)
    start, count = starts[slot], counts[slot]
    # A uniform position among the N - n_c examples of other classes, then skip the
    # block of the example's own class.
    position = np.floor(np.random.default_rng(seed).random(len(labels))
                        * (len(labels) - count)).astype(np.int64)
    position = np.where(position >= start, position + count, position)
    return order[position]


def check_masks(masks: Sequence[np.ndarray], ids: Optional[Sequence[str]] = None) -> None:
    """Raises :class:`EmptyMaskError` naming the first example whose mask is empty."""
    for index, mask in enumerate(masks):
        if not np.any(_binary(mask)):
            name = f"record {ids[index]!r}" if ids is not None else f"example {index}"
            raise EmptyMaskError(
                f"{name} has an empty mask: there is no object to paste onto another "
                "background. Skip such records (tools.shift_backgrounds "
                "--skip_empty_masks) or give them masks.")


def mixed_rand(images: Sequence[np.ndarray], masks: Sequence[np.ndarray],
               labels: Sequence[int], seed: int, *, ids: Optional[Sequence[str]] = None
               ) -> Tuple[List[np.ndarray], np.ndarray]:
    """The mixed_rand variant of a labelled set (module docstring).

    Args:
      images: N arrays ``uint8 [H_i, W_i, 3]`` (or one ``[N, H, W, 3]`` array).
      masks: N object masks ``[H_i, W_i]``, {0, 1} or {0, 255}.
      labels: ``[N]`` class indices (at least two classes).
      seed: donor choice.
      ids: optional record ids, used in error messages.
    Returns:
      ``(shifted, donors)``: N arrays ``uint8 [H_i, W_i, 3]`` (example i's object on
      example ``donors[i]``'s filled background; its mask is ``masks[i]``), and
      ``donors`` ``int64 [N]``.
    Raises:
      EmptyMaskError: an empty mask (named by id when ``ids`` is given).
    """
    check_masks(masks, ids)
    donors = choose_donors(labels, seed)
    backgrounds: Dict[int, np.ndarray] = {}
    shifted = []
    for index, donor in enumerate(donors):
        if donor not in backgrounds:
            backgrounds[donor] = _donor_background(images[donor], masks[donor], donor, ids)
        shifted.append(composite(images[index], masks[index], backgrounds[donor]))
    return shifted, donors


def _donor_background(image, mask, index, ids):
    try:
        return fill_background(image, mask)
    except EmptyMaskError as err:
        name = f"record {ids[index]!r}" if ids is not None else f"example {index}"
        raise EmptyMaskError(f"{name}: {err}") from None


# ---------------------------------------------------------------------- TFRecords


def shift_records(input_files: str, output_dir: str, *, mode: str = "mixed_rand",
                  seed: int = 0, skip_empty_masks: bool = False,
                  flag: str = "input_files") -> Dict[str, Any]:
    """Writes the ``mode`` variant of every record matching ``input_files`` to
    ``output_dir``, one output file per input file with the same base name, and a summary
    ``output_dir/shift_backgrounds.json``; returns the summary.

    Records keep their id, label and mask (mask/method and mask/params too); the image is
    stored as PNG (lossless, so the object's pixels are exact). Donors are drawn over all
    input files together (in sorted file order). Each output file is written under a
    temporary name and renamed when complete. The encoded records are held in memory
    (about the size of the input files); decoded images only two at a time.

    Raises:
      EmptyMaskError: a record with an empty mask, named by id (unless
        ``skip_empty_masks``: then it is left out and listed in the summary).
      ValueError: unknown mode, two input files with the same base name, fewer than two
        classes, or an unlabelled record.
    """
    import tensorflow as tf

    from harl_tf.data import pipeline, schema

    if mode not in MODES:
        raise ConfigError(f"--mode must be one of {', '.join(MODES)}, got {mode!r}.")
    files = pipeline.list_files(input_files, caller=f"--{flag}")
    names = [os.path.basename(f) for f in files]
    if len(set(names)) < len(names):
        raise ConfigError(f"--{flag}: two input files share a base name; the outputs would "
                          "overwrite each other. Shift them into separate --output_dirs.")
    if any(os.path.abspath(os.path.join(output_dir, n)) == os.path.abspath(f)
           for n, f in zip(names, files)):
        raise ConfigError(f"--output_dir {output_dir} would overwrite the input files; "
                          "choose another folder.")

    # Pass 1: every record's bytes, id, label and whether its mask is empty.
    records: List[Tuple[int, Dict[str, Any]]] = []
    skipped: List[str] = []
    for file_index, path in enumerate(files):
        for record in schema.read_examples(path, decode=False):
            if record["label"] < 0:
                raise DataError(f"--{flag}: {path}: record {record['id']!r} has no label "
                                "(-1); mixed_rand pairs objects with other classes.")
            mask = schema.decode_mask({"mask": tf.constant(record["mask"])}).numpy()
            if not mask.any():
                if not skip_empty_masks:
                    check_masks([mask], [record["id"]])
                skipped.append(record["id"])
                continue
            records.append((file_index, record))

    labels = np.array([r["label"] for _, r in records], np.int64)
    donors = choose_donors(labels, seed)

    def decoded(record):
        parsed = {"image": tf.constant(record["image"]), "mask": tf.constant(record["mask"])}
        return (schema.decode_image(parsed).numpy(),
                schema.decode_mask(parsed).numpy()[..., 0])

    os.makedirs(output_dir, exist_ok=True)
    outputs = []
    counts = [0] * len(files)
    position = 0
    for file_index, name in enumerate(names):
        path = os.path.join(output_dir, name)
        with atomic.atomic_path(path) as tmp:
            with tf.io.TFRecordWriter(tmp) as writer:
                while position < len(records) and records[position][0] == file_index:
                    record = records[position][1]
                    donor = records[donors[position]][1]
                    image, mask = decoded(record)
                    donor_image, donor_mask = decoded(donor)
                    try:
                        background = fill_background(donor_image, donor_mask)
                    except EmptyMaskError as err:
                        raise EmptyMaskError(f"record {donor['id']!r}: {err}") from None
                    shifted = composite(image, mask, background)
                    writer.write(schema.serialize_example(
                        image_bytes=tf.io.encode_png(shifted).numpy(), image_format="png",
                        height=shifted.shape[0], width=shifted.shape[1],
                        mask_png=record["mask"], label=record["label"],
                        example_id=record["id"], mask_method=record["mask_method"],
                        mask_params=record["mask_params"]))
                    counts[file_index] += 1
                    position += 1
        outputs.append(path)

    summary = {
        "mode": mode, "seed": seed, "inputs": files, "outputs": outputs,
        "records_per_output": counts, "num_records": len(records),
        "num_skipped_empty_masks": len(skipped), "skipped_ids": skipped,
        "donor_of": {r["id"]: records[d][1]["id"] for (_, r), d in zip(records, donors)},
        "fill": f"cv2.inpaint INPAINT_TELEA, radius {INPAINT_RADIUS}, mask dilated by 1 px, "
                "clipped to the surrounding background's colour range",
    }
    atomic.write_json_atomic(os.path.join(output_dir, SUMMARY_NAME), summary)
    return summary
