"""The embedded default dataset: procedural shapes on cluttered backgrounds.

Every image shows one object of one of eight shape classes, drawn with a random colour,
texture, scale, rotation and position over a background made of a colour gradient, a
texture and a few irregular "distractor" blobs that belong to no class. The mask is exactly
the set of pixels where the object was drawn (objects have hard edges and are drawn last,
so they occlude the distractors), which makes it an exact ground truth for mask methods.

The clutter is deliberate: a whole-image embedding can separate many images by their
backgrounds alone, while the label depends only on the object's shape. That is the setting
in which HARL's foreground/background split is supposed to help.

``object_colour="class"`` gives an easy variant: each class is painted in its own hue
(:data:`CLASS_COLOURS`, jittered), so the label is readable from colour statistics that
even a randomly initialised encoder's pooled features carry. It exists to check that
pretraining keeps information rather than collapsing (a probe stays above chance), not to
measure representation quality, which the default ``"random"`` colours are for.

Nothing is downloaded or read from disk. Image ``i`` of a set depends only on ``(seed,
i)`` and the image size, so ``generate(100)`` is a prefix of ``generate(2000)``.
"""
from __future__ import annotations

import colorsys
import dataclasses
from typing import Sequence, Tuple, Union

import numpy as np

CLASS_NAMES: Tuple[str, ...] = (
    "circle", "square", "triangle", "cross", "ring", "star", "crescent", "tee")
NUM_CLASSES = len(CLASS_NAMES)

Size = Union[int, Tuple[int, int]]

OBJECT_COLOURS = ("random", "class")

# "shapes": the cluttered set described above. "upright": the same eight shapes, upright
# (within +-10 degrees) and in one flat colour (random hue, drawn light or dark) over a
# low-contrast gradient with a faint texture and 1-3 distractor blobs. In "upright" the
# only changes within a class are position, scale and colours, which the pretraining
# augmentations (crops, colour distortion) cover, so a few minutes of pretraining learn
# it measurably (python -m bench.experiments.bench_quickstart_variants); the quickstart uses it.
STYLES = ("shapes", "upright")


# One saturated hue per class, evenly spaced on the colour wheel (object_colour="class").
CLASS_COLOURS = np.array([colorsys.hsv_to_rgb(k / NUM_CLASSES, 0.85, 0.9)
                          for k in range(NUM_CLASSES)])


@dataclasses.dataclass(frozen=True)
class SyntheticSet:
    """Images ``uint8 [N, H, W, 3]``, masks ``uint8 {0, 1} [N, H, W]``, labels
    ``int64 [N]`` in ``[0, NUM_CLASSES)``, and the class names indexed by label."""
    images: np.ndarray
    masks: np.ndarray
    labels: np.ndarray
    class_names: Tuple[str, ...] = CLASS_NAMES

    def __len__(self) -> int:
        return len(self.labels)


def _height_width(image_size: Size) -> Tuple[int, int]:
    if isinstance(image_size, (int, np.integer)):
        height = width = int(image_size)
    else:
        height, width = (int(v) for v in image_size)
    if height < 8 or width < 8:
        raise ValueError(f"image_size must be at least 8 pixels per side, got {image_size!r}")
    return height, width


def label_for(index: int, seed: int) -> int:
    """The label of image ``index``: each consecutive block of NUM_CLASSES images holds
    every class once, in an order drawn from ``(seed, block)``, so labels are balanced
    (counts differ by at most one) without being periodic."""
    block, offset = divmod(index, NUM_CLASSES)
    order = np.random.default_rng([seed, block, 0x1ABE1]).permutation(NUM_CLASSES)
    return int(order[offset])


def shape_mask(label: int, u: np.ndarray, v: np.ndarray) -> np.ndarray:
    """Boolean membership of the canonical shape ``label`` at object coordinates ``(u, v)``
    (the object fills roughly the unit disc)."""
    r = np.hypot(u, v)
    theta = np.arctan2(v, u)
    name = CLASS_NAMES[label]
    if name == "circle":
        return r <= 1.0
    if name == "square":
        return np.maximum(np.abs(u), np.abs(v)) <= 0.78
    if name == "triangle":  # equilateral, inscribed in the unit circle
        inside = v >= -0.5
        for angle in (np.pi / 6, 5 * np.pi / 6):
            inside &= (np.cos(angle) * u + np.sin(angle) * v) <= 0.5
        return inside
    if name == "cross":
        return ((np.abs(u) <= 0.3) & (np.abs(v) <= 1.0)) | (
            (np.abs(v) <= 0.3) & (np.abs(u) <= 1.0))
    if name == "ring":
        return (r <= 1.0) & (r >= 0.55)
    if name == "star":  # five points, inner radius 0.45
        spoke = np.abs(((theta + np.pi / 2) % (2 * np.pi / 5)) - np.pi / 5) / (np.pi / 5)
        return r <= 0.45 + 0.55 * (1.0 - spoke) ** 1.5
    if name == "crescent":
        return (r <= 1.0) & (np.hypot(u - 0.45, v) > 0.8)
    if name == "tee":
        return ((np.abs(u) <= 1.0) & (v >= 0.45) & (v <= 1.0)) | (
            (np.abs(u) <= 0.28) & (v >= -1.0) & (v <= 1.0))
    raise ValueError(f"unknown label {label}")


def _random_colour(rng: np.random.Generator) -> np.ndarray:
    return rng.uniform(0.0, 1.0, size=3)


def _texture(rng: np.random.Generator, y: np.ndarray, x: np.ndarray,
             side: float) -> np.ndarray:
    """A texture in [-1, 1] over the pixel grid: flat, stripes, checker or smooth noise."""
    kind = rng.integers(4)
    if kind == 0:
        return np.zeros_like(x)
    angle = rng.uniform(0, np.pi)
    period = side * rng.uniform(0.06, 0.2)
    if kind == 1:
        return np.sin(2 * np.pi * (np.cos(angle) * x + np.sin(angle) * y) / period)
    if kind == 2:
        return np.sign(np.sin(2 * np.pi * x / period) * np.sin(2 * np.pi * y / period))
    coarse = rng.uniform(-1, 1, size=(6, 6))
    rows = np.clip((y / side * 5).astype(int), 0, 5)
    cols = np.clip((x / side * 5).astype(int), 0, 5)
    return coarse[rows, cols]


def _distractor(rng: np.random.Generator, y: np.ndarray, x: np.ndarray,
                side: float) -> np.ndarray:
    """An irregular blob (union of a few overlapping ellipses) that is no class's shape."""
    centre = rng.uniform(0.1, 0.9, size=2) * np.array(x.shape)[::-1]
    blob = np.zeros(x.shape, bool)
    for _ in range(rng.integers(2, 5)):
        cx, cy = centre + rng.normal(0, 0.08 * side, size=2)
        ax, ay = rng.uniform(0.03, 0.12, size=2) * side
        angle = rng.uniform(0, np.pi)
        du, dv = x - cx, y - cy
        u = (np.cos(angle) * du + np.sin(angle) * dv) / ax
        v = (-np.sin(angle) * du + np.cos(angle) * dv) / ay
        blob |= u * u + v * v <= 1.0
    return blob


def _check_object_colour(object_colour: str) -> None:
    if object_colour not in OBJECT_COLOURS:
        raise ValueError(f"object_colour must be one of {OBJECT_COLOURS}, "
                         f"got {object_colour!r}")


def _check_style(style: str) -> None:
    if style not in STYLES:
        raise ValueError(f"style must be one of {STYLES}, got {style!r}")


def _hsv(h: float, s: float, v: float) -> np.ndarray:
    return np.array(colorsys.hsv_to_rgb(h, s, v))


def _render_upright(index: int, height: int, width: int, seed: int, object_fill,
                    object_colour: str, clutter: bool = True):
    """The ``"upright"`` style (see :data:`STYLES`). ``clutter=False`` leaves out the
    background texture and blobs (and their random draws): the plain-gradient variant
    that ``bench.experiments.bench_quickstart_variants`` compares against."""
    side = float(min(height, width))
    label = label_for(index, seed)
    rng = np.random.default_rng([seed, index, 77])
    y, x = np.mgrid[0:height, 0:width].astype(np.float32) + 0.5
    c0 = _hsv(rng.uniform(), rng.uniform(0.2, 0.6), rng.uniform(0.3, 0.8))
    c1 = np.clip(c0 + rng.uniform(-0.2, 0.2, 3), 0, 1)
    angle = rng.uniform(0, 2 * np.pi)
    ramp = np.cos(angle) * x + np.sin(angle) * y
    ramp = (ramp - ramp.min()) / max(float(ramp.max() - ramp.min()), 1e-6)
    image = c0 + (c1 - c0) * ramp[..., None]
    if clutter:
        image = image + 0.08 * _texture(rng, y, x, side)[..., None]
        for _ in range(rng.integers(1, 4)):
            blob = _distractor(rng, y, x, side)
            shade = _hsv(rng.uniform(), rng.uniform(0.2, 0.8), rng.uniform(0.3, 0.9))
            image = np.where(blob[..., None], shade, image)
    radius = side * rng.uniform(0.22, 0.38)
    cx = rng.uniform(radius * 0.8, width - radius * 0.8)
    cy = rng.uniform(radius * 0.8, height - radius * 0.8)
    turn = np.deg2rad(10) * rng.uniform(-1, 1)
    du, dv = (x - cx) / radius, (y - cy) / radius
    mask = shape_mask(label, np.cos(turn) * du + np.sin(turn) * dv,
                      -np.sin(turn) * du + np.cos(turn) * dv)
    if not mask.any():
        mask[int(min(cy, height - 1)), int(min(cx, width - 1))] = True
    colour = _hsv(rng.uniform(), rng.uniform(0.6, 1.0), rng.uniform(0.8, 1.0))
    if rng.uniform() < 0.5:  # drawn in every mode, so the stream is shared
        colour = colour * 0.25
    if object_colour == "class":
        colour = CLASS_COLOURS[label]
    if object_fill is not None:
        colour = np.asarray(object_fill, np.float64)
    image = np.where(mask[..., None], colour, image)
    image = np.clip(image * 255.0 + 0.5, 0, 255).astype(np.uint8)
    return image, mask.astype(np.uint8), label


def render(index: int, image_size: Size = 64, seed: int = 0, object_fill=None,
           object_colour: str = "random", max_rotation: float = 180.0,
           style: str = "shapes"):
    """Draws image ``index`` of the set ``seed``: returns ``(image uint8 [H,W,3], mask uint8
    {0,1} [H,W], label int)``.

    ``object_fill`` (RGB in [0, 1]) paints the object in one flat colour instead of its
    random colour and texture, everything else unchanged: it shows which pixels the object
    covers (used to check that the mask is exactly those pixels). ``object_colour="class"``
    paints it in its class's hue (:data:`CLASS_COLOURS` ± 0.05 per channel) with the same
    texture; background, shape, pose and mask are the same as with ``"random"``.
    ``max_rotation`` (degrees) limits the object's rotation to ``+-max_rotation``; 180 (the
    default) is any rotation, 0 the canonical upright pose. The random stream is the same
    either way, so only the object's pose changes. ``style`` picks the set's look
    (:data:`STYLES`); ``max_rotation`` applies to ``"shapes"`` only."""
    _check_object_colour(object_colour)
    _check_style(style)
    height, width = _height_width(image_size)
    if style == "upright":
        return _render_upright(index, height, width, seed, object_fill, object_colour)
    side = float(min(height, width))
    label = label_for(index, seed)
    rng = np.random.default_rng([seed, index, 0x5EED])
    y, x = np.mgrid[0:height, 0:width].astype(np.float32) + 0.5

    # Background: a gradient between two colours, a texture, then distractor blobs.
    c0, c1 = _random_colour(rng), _random_colour(rng)
    angle = rng.uniform(0, 2 * np.pi)
    ramp = (np.cos(angle) * x + np.sin(angle) * y)
    ramp = (ramp - ramp.min()) / max(float(ramp.max() - ramp.min()), 1e-6)
    image = c0 + (c1 - c0) * ramp[..., None]
    image += 0.12 * _texture(rng, y, x, side)[..., None]
    for _ in range(rng.integers(2, 5)):
        blob = _distractor(rng, y, x, side)
        shade = _random_colour(rng) + 0.1 * _texture(rng, y, x, side)[..., None]
        image = np.where(blob[..., None], shade, image)

    # Object: canonical shape, rotated, scaled and placed mostly inside the frame.
    radius = side * rng.uniform(0.18, 0.36)
    cx = rng.uniform(radius * 0.8, width - radius * 0.8)
    cy = rng.uniform(radius * 0.8, height - radius * 0.8)
    turn = rng.uniform(0, 1)
    angle = (2 * np.pi * turn if max_rotation >= 180.0
             else np.deg2rad(max_rotation) * (2.0 * turn - 1.0))
    du, dv = (x - cx) / radius, (y - cy) / radius
    u = np.cos(angle) * du + np.sin(angle) * dv
    v = -np.sin(angle) * du + np.cos(angle) * dv
    mask = shape_mask(label, u, v)
    if not mask.any():  # a tiny image can miss every pixel centre; mark the centre pixel
        mask[int(min(cy, height - 1)), int(min(cx, width - 1))] = True
    if object_fill is None:
        colour = _random_colour(rng)  # drawn in both modes: the texture stream is shared
        if object_colour == "class":
            colour = CLASS_COLOURS[label] + rng.uniform(-0.05, 0.05, size=3)
        fill = colour + 0.2 * _texture(rng, y, x, side)[..., None]
    else:
        fill = np.asarray(object_fill, np.float64)
    image = np.where(mask[..., None], fill, image)

    image = np.clip(image * 255.0 + 0.5, 0, 255).astype(np.uint8)
    return image, mask.astype(np.uint8), label


def generate(num_images: int, image_size: Size = 64, seed: int = 0,
             object_colour: str = "random", style: str = "shapes") -> SyntheticSet:
    """Generates ``num_images`` images of ``image_size`` (int, or ``(height, width)``).

    The same ``(num_images, image_size, seed, object_colour, style)`` always gives
    byte-identical arrays.
    """
    _check_object_colour(object_colour)
    _check_style(style)
    if num_images < 0:
        raise ValueError(f"num_images must be >= 0, got {num_images}")
    height, width = _height_width(image_size)
    images = np.empty((num_images, height, width, 3), np.uint8)
    masks = np.empty((num_images, height, width), np.uint8)
    labels = np.empty((num_images,), np.int64)
    for i in range(num_images):
        images[i], masks[i], labels[i] = render(i, (height, width), seed,
                                                object_colour=object_colour, style=style)
    return SyntheticSet(images, masks, labels)


def iterate(indices: Sequence[int], image_size: Size = 64, seed: int = 0,
            object_colour: str = "random", style: str = "shapes"):
    """Yields ``(index, image, mask, label)`` for the given indices without holding the set
    in memory (the TFRecord builder's source)."""
    _check_style(style)
    for i in indices:
        image, mask, label = render(int(i), image_size, seed, object_colour=object_colour,
                                    style=style)
        yield int(i), image, mask, label
