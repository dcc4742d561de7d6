"""Contact sheets of images and their masks: what a person looks at to trust the masks.

Two sheets (written by ``tools/preview.py``):

- **masks**: examples from an image + mask folder (:func:`folder_examples`) or from
  TFRecords (:func:`record_examples`); each row holds ``per_row`` examples as
  ``image | image with its mask overlaid``.
- **views**: the two augmented views of each example exactly as the pretraining input
  pipeline produces them (:func:`pipeline_views`); each row is
  ``view1 | view1 + mask1 | view2 | view2 + mask2``, so a crop or flip that moved the
  image but not its mask shows at once.

The overlay tints foreground pixels red (``(1 − α) · pixel + α · red``, α = 0.45) and draws
the mask's contour (foreground pixels with a background 4-neighbour) in yellow; background
pixels are untouched. Tiles are resized (nearest neighbour, so mask edges stay sharp) to
``tile_size`` squares, separated by ``gap`` pixels of dark grey, under an optional title
strip of ``TITLE_HEIGHT`` pixels. Sheets are written as PNG atomically.
"""
from __future__ import annotations

import io
from typing import Iterable, Iterator, List, Optional, Sequence, Tuple

import numpy as np
from PIL import Image, ImageDraw

from harl_tf.atomic import write_bytes_atomic
from harl_tf.errors import DataError
from harl_tf.masks import to_rgb_uint8

TINT = (255, 0, 0)
CONTOUR = (255, 255, 0)
ALPHA = 0.45
BACKGROUND = (32, 32, 32)
TITLE_HEIGHT = 14
MASK_TITLES = ("image", "mask")
VIEW_TITLES = ("view1", "mask1", "view2", "mask2")


def _binary_mask(mask: np.ndarray, shape: Tuple[int, int], name: str) -> np.ndarray:
    mask = np.asarray(mask)
    if mask.ndim == 3 and mask.shape[-1] == 1:
        mask = mask[..., 0]
    if mask.shape != tuple(shape):
        raise DataError(f"{name}: mask shape {mask.shape} differs from the image's "
                        f"{tuple(shape)}")
    return mask > (0.5 if mask.dtype.kind == "f" else 0)


def contour(mask: np.ndarray) -> np.ndarray:
    """Foreground pixels with at least one background 4-neighbour, ``bool [H, W]``
    (the image border does not count as background)."""
    mask = np.asarray(mask, bool)
    padded = np.pad(mask, 1, mode="edge")
    interior = (padded[:-2, 1:-1] & padded[2:, 1:-1] & padded[1:-1, :-2] & padded[1:-1, 2:])
    return mask & ~interior


def overlay(image: np.ndarray, mask: np.ndarray, *, alpha: float = ALPHA,
            tint: Sequence[int] = TINT, contour_colour: Optional[Sequence[int]] = CONTOUR,
            name: str = "image") -> np.ndarray:
    """``image`` (any layout :func:`~harl_tf.masks.to_rgb_uint8` accepts, or float in
    ``[0, 1]``) with ``mask`` (``{0, 1}`` ``[H, W]`` or ``[H, W, 1]``) tinted and outlined:
    ``uint8 [H, W, 3]``."""
    rgb = to_rgb_uint8(image, name=name)
    foreground = _binary_mask(mask, rgb.shape[:2], name)
    out = rgb.astype(np.float32)
    out[foreground] = (1 - alpha) * out[foreground] + alpha * np.float32(tint)
    out = np.clip(np.round(out), 0, 255).astype(np.uint8)
    if contour_colour is not None:
        out[contour(foreground)] = np.uint8(contour_colour)
    return out


def sheet_size(num_rows: int, num_columns: int, *, tile_size: int = 128, gap: int = 4,
               titled: bool = True) -> Tuple[int, int]:
    """``(height, width)`` in pixels of a :func:`contact_sheet`."""
    height = num_rows * tile_size + (num_rows + 1) * gap + (TITLE_HEIGHT if titled else 0)
    return height, num_columns * tile_size + (num_columns + 1) * gap


def _tile(image: np.ndarray, tile_size: int) -> np.ndarray:
    rgb = Image.fromarray(to_rgb_uint8(image))
    return np.asarray(rgb.resize((tile_size, tile_size), Image.NEAREST))


def contact_sheet(rows: Sequence[Sequence[np.ndarray]], *, tile_size: int = 128,
                  gap: int = 4, titles: Optional[Sequence[str]] = None) -> np.ndarray:
    """Lays out ``rows`` of images (each resized to ``tile_size``²) on a grid:
    ``uint8 [H, W, 3]`` of :func:`sheet_size`. ``titles`` label the columns."""
    if not rows:
        raise ValueError("contact_sheet: no rows to draw")
    columns = max(len(row) for row in rows)
    height, width = sheet_size(len(rows), columns, tile_size=tile_size, gap=gap,
                               titled=titles is not None)
    sheet = np.empty((height, width, 3), np.uint8)
    sheet[:] = BACKGROUND
    top = TITLE_HEIGHT if titles is not None else 0
    for r, row in enumerate(rows):
        for c, image in enumerate(row):
            y = top + gap + r * (tile_size + gap)
            x = gap + c * (tile_size + gap)
            sheet[y:y + tile_size, x:x + tile_size] = _tile(image, tile_size)
    if titles is not None:
        picture = Image.fromarray(sheet)
        draw = ImageDraw.Draw(picture)
        for c in range(columns):
            text = titles[c % len(titles)]
            draw.text((gap + c * (tile_size + gap) + 2, 1), text, fill=(230, 230, 230))
        sheet = np.asarray(picture).copy()
    return sheet


def write_png(array: np.ndarray, path: str) -> None:
    """Writes an RGB ``uint8`` array as PNG atomically (:mod:`harl_tf.atomic`)."""
    buffer = io.BytesIO()
    Image.fromarray(np.asarray(array, np.uint8)).save(buffer, format="PNG")
    write_bytes_atomic(path, buffer.getvalue())


# Sheets --------------------------------------------------------------------------------


def mask_rows(examples: Iterable[Tuple[np.ndarray, np.ndarray]], rows: int,
              per_row: int = 2) -> List[List[np.ndarray]]:
    """Rows of ``image | overlay`` pairs, ``per_row`` examples a row, from the first
    ``rows * per_row`` examples ``(image, mask)``."""
    tiles: List[np.ndarray] = []
    for index, (image, mask) in enumerate(examples):
        if index >= rows * per_row:
            break
        tiles += [to_rgb_uint8(image), overlay(image, mask, name=f"example {index}")]
    if not tiles:
        raise DataError("no examples to preview")
    width = 2 * per_row
    return [tiles[i:i + width] for i in range(0, len(tiles), width)]


def view_rows(batch, rows: int) -> List[List[np.ndarray]]:
    """Rows ``view1 | view1 + mask1 | view2 | view2 + mask2`` from a pretraining batch
    (``view*`` float ``[B, S, S, 3]`` in ``[0, 1]``, ``mask*`` ``[B, S, S, 1]``)."""
    arrays = {key: np.asarray(batch[key]) for key in ("view1", "mask1", "view2", "mask2")}
    out = []
    for i in range(min(rows, len(arrays["view1"]))):
        out.append([arrays["view1"][i],
                    overlay(arrays["view1"][i], arrays["mask1"][i], name=f"view1 {i}"),
                    arrays["view2"][i],
                    overlay(arrays["view2"][i], arrays["mask2"][i], name=f"view2 {i}")])
    return out


# Example sources -----------------------------------------------------------------------


def folder_examples(images_dir: str, masks_dir: Optional[str] = None
                    ) -> Iterator[Tuple[np.ndarray, np.ndarray]]:
    """``(image uint8 [H, W, 3], mask {0, 1} [H, W])`` of an image folder, with masks by
    the folder rule of :class:`harl_tf.data.sources.FolderSource` (``masks_dir`` mirroring
    ``images_dir``, or ``images`` → ``masks`` in the path), in sorted order over every
    split found."""
    from harl_tf.data.sources import FolderSource
    from harl_tf.masks import quality

    source = FolderSource(images_dir, masks_dir=masks_dir)
    for split in source.split_names():
        for ref in source.list_refs(split, need_masks=True):
            path = source.image_path(ref)
            with Image.open(path) as image:
                rgb = to_rgb_uint8(np.asarray(image), name=path)
            yield rgb, quality.read_mask(source.mask_path(path))


def record_examples(file_pattern: str) -> Iterator[Tuple[np.ndarray, np.ndarray]]:
    """``(image, mask)`` of TFRecord files (glob or comma-separated globs), in file order,
    via :func:`harl_tf.data.schema.read_examples`."""
    from harl_tf.data import pipeline, schema

    for path in pipeline.list_files(file_pattern, caller="preview"):
        for record in schema.read_examples(path):
            yield record["image_array"], record["mask_array"]


def pipeline_views(file_pattern: str, rows: int, image_size: int, *, seed: int = 0):
    """One batch of ``rows`` examples from :func:`harl_tf.data.pipeline.pretrain_dataset`
    (deterministic, seeded): the views and masks the model would be trained on."""
    from harl_tf.data import pipeline

    dataset = pipeline.pretrain_dataset(file_pattern, rows, image_size, seed=seed,
                                        deterministic=True, shuffle_buffer=max(rows, 64))
    for batch in dataset.take(1):
        return {key: value.numpy() for key, value in batch.items()}
    raise DataError(f"preview: {file_pattern} gave no batch of {rows} examples "
                    "(fewer records than --rows?)")
