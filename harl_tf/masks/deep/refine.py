"""Boundary refinement of the deep mask: the head's coarse probability map made to follow
the image's own edges.

The saliency head predicts one foregroundness ``p`` per feature-map cell (8×8 to 32×32
cells); bilinear upsampling gives a blurred map whose 0.5 contour cuts straight through
the object's outline. Refinement happens at the conventional method's working resolution
(long side ≤ ``max_side``, INTER_AREA), and the binary mask is resized back to the image
with nearest neighbours, exactly as :mod:`harl_tf.masks.conventional` does:

- ``"none"``: the paper's configuration, ``mask = upsample(p) > threshold``.
- ``"segments"``: Felzenszwalb–Huttenlocher over-segmentations of the image
  (:func:`harl_tf.masks.conventional.segment`) at the scales ``scales`` (each a ``k`` at
  ``reference_area``, with ``min_size = k``); every pixel gets the mean upsampled
  probability of its segment, ``p̄_s = Σ_{i∈s} p_i / |s|``, averaged over the scales. A
  segment rarely straddles the object's outline, so its mean is decided by the side it
  lies on, and the mask's boundary moves onto the segments' (image) edges.
- ``"guided"``: the guided filter (He et al. 2013, OpenCV ``ximgproc``) of ``upsample(p)``
  with the image as guide, radius ``radius`` pixels and regulariser ``eps`` (on ``[0, 1]``
  intensities): a locally linear map of the image's colours, so edges of ``p`` snap to
  colour edges.

Refinement is per image and uses one CPU core (about 1–3 ms for a 64×64 image).
"""
from __future__ import annotations

import dataclasses
from typing import Any, Dict, Sequence, Tuple

import cv2
import numpy as np

from harl_tf.errors import ConfigError
from harl_tf.masks import conventional, to_rgb_uint8

METHODS = ("none", "segments", "guided", "grabcut")


@dataclasses.dataclass(frozen=True)
class RefineConfig:
    """How the probability map is refined before the threshold (recorded in the model)."""
    method: str = "none"                     # "none" | "segments" | "guided" | "grabcut"
    scales: Tuple[float, ...] = (100.0, 300.0)   # segments: FH k (= min_size) at reference_area
    sigma: float = 0.5                       # segments: FH Gaussian smoothing, working px
    radius: int = 2                          # guided: window radius, working px
    eps: float = 0.01                        # guided: regulariser
    max_side: int = 160                      # working resolution (as the conventional mask)
    iterations: int = 1                      # grabcut: iterations
    sure: float = 0.0                        # grabcut: p > 1 - sure or p < sure is fixed

    def __post_init__(self):
        if self.method not in METHODS:
            raise ConfigError(f"refinement method must be one of {METHODS}, got "
                              f"{self.method!r}")
        object.__setattr__(self, "scales", tuple(float(s) for s in self.scales))
        if self.method == "segments" and (not self.scales or min(self.scales) <= 0):
            raise ConfigError(f"segments refinement needs scales > 0, got {self.scales}")
        if self.sigma <= 0 or self.radius < 1 or self.eps <= 0 or self.max_side < 8:
            raise ConfigError("refinement needs sigma > 0, radius >= 1, eps > 0, max_side >= 8;"
                              f" got {self.sigma}, {self.radius}, {self.eps}, {self.max_side}")

    def to_json(self) -> Dict[str, Any]:
        return dict(dataclasses.asdict(self), scales=list(self.scales))

    @classmethod
    def from_json(cls, value: Dict[str, Any]) -> "RefineConfig":
        unknown = sorted(set(value) - {f.name for f in dataclasses.fields(cls)})
        if unknown:
            raise ConfigError(f"refinement: unknown parameter(s) {unknown}")
        return cls(**{k: tuple(v) if k == "scales" else v for k, v in value.items()})


def segment_average(probability: np.ndarray, labels: np.ndarray) -> np.ndarray:
    """Mean of ``probability`` (float ``[H, W]``) within each segment of ``labels`` (int
    ``[H, W]``, values ``0 .. n−1``), broadcast back: float32 ``[H, W]``, constant on every
    segment, ``p̄_s = Σ_{i∈s} p_i / |s|``."""
    probability = np.asarray(probability, np.float64)
    labels = np.asarray(labels)
    if probability.shape != labels.shape:
        raise ValueError(f"probability {probability.shape} and labels {labels.shape} differ")
    flat = labels.ravel()
    sums = np.bincount(flat, probability.ravel())
    counts = np.maximum(np.bincount(flat, minlength=sums.size), 1)
    return (sums / counts).astype(np.float32)[labels]


def guided_filter(image: np.ndarray, probability: np.ndarray, *, radius: int = 2,
                  eps: float = 0.01) -> np.ndarray:
    """Guided filter of ``probability`` (float ``[H, W]``) with ``image`` (uint8 RGB
    ``[H, W, 3]``, scaled to ``[0, 1]``) as guide; float32 ``[H, W]`` clipped to ``[0, 1]``."""
    guide = image.astype(np.float32) / 255.0
    out = cv2.ximgproc.guidedFilter(guide, np.asarray(probability, np.float32), int(radius),
                                    float(eps))
    return np.clip(out, 0.0, 1.0)


def working_image(image: np.ndarray, max_side: int) -> np.ndarray:
    """The image at the working resolution (long side ≤ ``max_side``, INTER_AREA)."""
    return conventional.resize_to_max_side(to_rgb_uint8(image), int(max_side))


def upsample_cells(cells: np.ndarray, height: int, width: int) -> np.ndarray:
    """Bilinear resize (half-pixel centres, as ``tf.image.resize``) of a cell map
    ``[h, w]`` to ``[height, width]``; float32."""
    cells = np.asarray(cells, np.float32)
    return cv2.resize(cells, (int(width), int(height)), interpolation=cv2.INTER_LINEAR)


def refined_probability(image: np.ndarray, cells: np.ndarray,
                        config: RefineConfig) -> np.ndarray:
    """The refined foregroundness of ``image`` (uint8 RGB ``[H, W, 3]``) from the head's
    cell map ``cells`` ``[h, w]``: float32 at the working resolution ``[h', w']`` (the
    image's size when its long side is ≤ ``config.max_side``)."""
    small = working_image(image, config.max_side)
    height, width = small.shape[:2]
    probability = upsample_cells(cells, height, width)
    if config.method == "segments":
        averaged = [segment_average(probability, conventional.segment(
            small, sigma=config.sigma, min_size=scale, k=scale)) for scale in config.scales]
        probability = np.mean(averaged, axis=0).astype(np.float32)
    elif config.method == "guided":
        probability = guided_filter(small, probability, radius=config.radius, eps=config.eps)
    return probability


def grabcut(image: np.ndarray, probability: np.ndarray, threshold: float, *,
            iterations: int = 1, sure: float = 0.0) -> np.ndarray:
    """GrabCut started from ``probability > threshold`` as probable foreground / background,
    pixels with ``p > 1 − sure`` / ``p < sure`` fixed; uint8 {0, 1}. Seeded (deterministic);
    the thresholded map stands when GrabCut empties or fills the image."""
    mask = (probability > threshold).astype(np.uint8)
    if mask.min() == mask.max():
        return mask
    trimap = np.where(mask > 0, cv2.GC_PR_FGD, cv2.GC_PR_BGD).astype(np.uint8)
    if sure > 0:
        trimap[probability > 1.0 - sure] = cv2.GC_FGD
        trimap[probability < sure] = cv2.GC_BGD
    cv2.setRNGSeed(0)
    models = np.zeros((1, 65), np.float64), np.zeros((1, 65), np.float64)
    cv2.grabCut(image, trimap, None, models[0], models[1], int(iterations),
                cv2.GC_INIT_WITH_MASK)
    refined = ((trimap == cv2.GC_FGD) | (trimap == cv2.GC_PR_FGD)).astype(np.uint8)
    return refined if 0 < refined.mean() < 1 else mask


def refined_mask(image: np.ndarray, cells: np.ndarray, config: RefineConfig,
                 threshold: float = 0.5) -> np.ndarray:
    """The deep mask of one image: ``uint8 {0, 1} [H, W]`` at the image's size, foreground
    where the refined probability is ``> threshold``."""
    image = to_rgb_uint8(image)
    height, width = image.shape[:2]
    if config.method == "none":  # the paper's: threshold the map upsampled to the image
        return (upsample_cells(cells, height, width) > threshold).astype(np.uint8)
    if config.method == "grabcut":
        small = working_image(image, config.max_side)
        probability = upsample_cells(cells, *small.shape[:2])
        mask = grabcut(small, probability, threshold, iterations=config.iterations,
                       sure=config.sure)
    else:
        mask = (refined_probability(image, cells, config) > threshold).astype(np.uint8)
    if mask.shape != (height, width):
        mask = cv2.resize(mask, (width, height), interpolation=cv2.INTER_NEAREST)
    return mask


def refined_masks(images: Sequence[np.ndarray], cells: Sequence[np.ndarray],
                  config: RefineConfig, threshold: float = 0.5):
    """:func:`refined_mask` of many images (a list, in order)."""
    return [refined_mask(image, c, config, threshold) for image, c in zip(images, cells)]
