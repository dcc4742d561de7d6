"""Per-view augmentations (SPEC §2, BYOL's recipe): small pure TensorFlow functions.

A view of an example is made, in this order (BYOL, Table 6):

1. Inception crop: a window of area fraction in ``crop_area`` (0.08–1) and aspect ratio
   (width / height) in ``crop_aspect`` (3/4–4/3), resized to ``S × S`` (bicubic, clipped).
2. Horizontal flip with probability ``flip_prob``.
3. Colour jitter with probability ``jitter_prob``: brightness, contrast, saturation and hue
   in a random order, each clipped to [0, 1].
4. Grayscale with probability ``grayscale_prob``.
5. Gaussian blur with probability ``blur_prob``, sigma uniform in ``blur_sigma``, a
   separable kernel of about ``blur_kernel_fraction`` of the side (23 taps at 224 px).
6. Solarize with probability ``solarize_prob``: x ↦ x if x < 0.5 else 1 − x.

Geometry (1–2) is shared by the image and its mask: the same window, the same coin. The
mask is resized with nearest neighbour, so it stays binary. Colour (3–6) never touches
the mask.

Randomness is stateless: every draw comes from ``tf.random.stateless_*`` with a seed
derived from a per-example seed (int32/int64 ``[2]``) by ``stateless_fold_in`` with a fixed
code per view and per purpose: the crop window, one vector of uniforms holding every coin
and the blur sigma, and the colour jitter's factors and order. Each coin and magnitude is
drawn whether or not its op is enabled, so switching the colour ops off leaves the crop
and flip of the same seed unchanged, and the same seed always gives the same view. (One
vector per purpose rather than one seed per draw: a seed derivation costs a random op of
its own, and per-draw seeds made up about 7 % of a view's CPU time.)

Images are ``float32`` in [0, 1] after the crop; decoded records are ``uint8``. The colour
ops themselves (steps 3–6, and the jitter's draws) are in :mod:`harl_tf.data.colour`.
"""
from __future__ import annotations

import dataclasses
from typing import Callable, Dict, List, Mapping, NamedTuple, Optional, Sequence, Tuple

import tensorflow as tf

from harl_tf.data import colour, geometry, schema

# Codes folded into a view's seed; fixed, so that a seed means the same view whatever
# else is enabled.
_CROP, _COINS, _JITTER = 1, 2, 3
# Slots of a view's vector of uniforms (_COINS): one per coin, and the blur sigma.
_FLIP_U, _JITTER_U, _GRAYSCALE_U, _BLUR_U, _SIGMA_U, _SOLARIZE_U = range(6)

RESIZE_METHODS = ("bicubic", "bilinear")


@dataclasses.dataclass(frozen=True)
class ViewConfig:
    """Parameters of one view (SPEC §2). Probabilities are in [0, 1].

    Brightness is multiplicative, as in SimCLR v2: x ↦ x·b, b ~ U[1 − brightness,
    1 + brightness] (SimCLR v1 and ``tf.image.random_brightness`` add an offset
    instead). Contrast: x ↦ (x − mean_c)·c + mean_c per channel, c ~ U[1 − contrast,
    1 + contrast]. Saturation: factor ~ U[1 − saturation, 1 + saturation] in HSV. Hue:
    shift ~ U[−hue, hue] of a full turn. Each is clipped to [0, 1].
    """
    crop_area: Tuple[float, float] = (0.08, 1.0)
    crop_aspect: Tuple[float, float] = (3 / 4, 4 / 3)
    crop_attempts: int = 100
    flip_prob: float = 0.5
    jitter_prob: float = 0.8
    brightness: float = 0.4
    contrast: float = 0.4
    saturation: float = 0.2
    hue: float = 0.1
    grayscale_prob: float = 0.2
    blur_prob: float = 1.0
    blur_sigma: Tuple[float, float] = (0.1, 2.0)
    blur_kernel_fraction: float = 0.1
    solarize_prob: float = 0.0
    solarize_threshold: float = 0.5
    resize_method: str = "bicubic"
    # How the jitter is computed, not what: its saturation XLA-compiled (colour.py), the
    # same values to float rounding.
    jit_compile: bool = True

    def __post_init__(self):
        for name in ("flip_prob", "jitter_prob", "grayscale_prob", "blur_prob",
                     "solarize_prob"):
            value = getattr(self, name)
            if not 0.0 <= value <= 1.0:
                raise ValueError(f"ViewConfig.{name} must be a probability in [0, 1], "
                                 f"got {value}")
        for name, low_bound in (("crop_area", 0.0), ("crop_aspect", 0.0),
                                ("blur_sigma", 0.0)):
            low, high = getattr(self, name)
            if not low_bound < low <= high:
                raise ValueError(f"ViewConfig.{name} must be (low, high) with "
                                 f"{low_bound} < low <= high, got {(low, high)}")
        if self.crop_area[1] > 1.0:
            raise ValueError(f"ViewConfig.crop_area upper bound must be <= 1, got "
                             f"{self.crop_area[1]}")
        for name in ("brightness", "contrast", "saturation"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise ValueError(f"ViewConfig.{name} must be in [0, 1], got "
                                 f"{getattr(self, name)}")
        if not 0.0 <= self.hue <= 0.5:
            raise ValueError(f"ViewConfig.hue must be in [0, 0.5], got {self.hue}")
        if self.resize_method not in RESIZE_METHODS:
            raise ValueError(f"ViewConfig.resize_method must be one of {RESIZE_METHODS}, "
                             f"got {self.resize_method!r}")

    def geometry_only(self) -> "ViewConfig":
        """The same crop and flip, with every colour op switched off."""
        return dataclasses.replace(self, jitter_prob=0.0, grayscale_prob=0.0,
                                   blur_prob=0.0, solarize_prob=0.0)


VIEW1 = ViewConfig(blur_prob=1.0, solarize_prob=0.0)  # BYOL's T
VIEW2 = ViewConfig(blur_prob=0.1, solarize_prob=0.2)  # BYOL's T'


def default_view_configs() -> Tuple[ViewConfig, ViewConfig]:
    """(view 1, view 2) of SPEC §2."""
    return VIEW1, VIEW2


def view_configs_from(config) -> Tuple[ViewConfig, ViewConfig]:
    """(view 1, view 2) of a pretraining config (``harl_tf.config.PretrainConfig``, read by
    attribute): SPEC §2 with its colour strength, grayscale probability, blur probability
    scale and smallest crop area (:func:`scaled_view_configs`)."""
    return scaled_view_configs(config.color_jitter_strength, config.grayscale_prob,
                               blur_prob_scale=config.blur_prob_scale,
                               min_crop_area=config.min_crop_area,
                               jit_compile=config.augment_jit_compile)


def scaled_view_configs(color_jitter_strength: float = 1.0,
                        grayscale_prob: float = 0.2, *, blur_prob_scale: float = 1.0,
                        min_crop_area: float = 0.08,
                        jit_compile: bool = True) -> Tuple[ViewConfig, ViewConfig]:
    """SPEC §2's views with the colour distortion scaled, as SimCLR's strength s does.

    Brightness, contrast, saturation and hue are BYOL's (0.4, 0.4, 0.2, 0.1) times
    ``color_jitter_strength`` (clipped to 1, and hue to 0.5); ``grayscale_prob`` replaces
    0.2; the blur probabilities (1.0 and 0.1) are multiplied by ``blur_prob_scale``; the
    crop's area range becomes (``min_crop_area``, 1); ``jit_compile`` is how the jitter
    runs (:class:`ViewConfig`). The defaults return
    :func:`default_view_configs` exactly. A small-image recipe may need other values:
    where every view of an image keeps its random tint, colour alone tells two views of
    one image from other images, and the encoder need not learn shape; at 32 px a blur
    of up to sigma 2 erases much of an object.
    """
    if color_jitter_strength < 0:
        raise ValueError(f"color_jitter_strength must be >= 0, got {color_jitter_strength}")
    if not 0.0 <= blur_prob_scale <= 1.0:
        raise ValueError(f"blur_prob_scale must be in [0, 1], got {blur_prob_scale}")
    if not 0.0 < min_crop_area <= 1.0:
        raise ValueError(f"min_crop_area must be in (0, 1], got {min_crop_area}")
    s = float(color_jitter_strength)
    return tuple(dataclasses.replace(
        view, brightness=min(1.0, view.brightness * s), contrast=min(1.0, view.contrast * s),
        saturation=min(1.0, view.saturation * s), hue=min(0.5, view.hue * s),
        grayscale_prob=grayscale_prob, blur_prob=view.blur_prob * float(blur_prob_scale),
        crop_area=(float(min_crop_area), view.crop_area[1]), jit_compile=bool(jit_compile))
        for view in default_view_configs())


class AugmentedView(NamedTuple):
    """One view. image: float32 [S, S, 3] in [0, 1]; mask: float32 [S, S, 1] in {0, 1}
    (None when no mask was given); record: what was drawn — ``crop_window`` int32 [4]
    (offset_y, offset_x, height, width in source pixels), bool scalars ``flip``,
    ``jitter``, ``grayscale``, ``blur``, ``solarize``, and float32 ``blur_sigma``."""
    image: tf.Tensor
    mask: Optional[tf.Tensor]
    record: Dict[str, tf.Tensor]


# --------------------------------------------------------------------------- seeds


def op_seed(seed: tf.Tensor, code: int) -> tf.Tensor:
    """A seed for one purpose: ``seed`` (int [2]) folded with the purpose's code."""
    return tf.random.experimental.stateless_fold_in(seed, code)


def view_coins(seed: tf.Tensor, config: "ViewConfig") -> Dict[str, tf.Tensor]:
    """Every coin of a view and its blur sigma, from one vector of uniforms.

    Args:
      seed: the view's seed, int32/int64 [2].
      config: probabilities and the sigma range.
    Returns:
      bool scalars ``flip``, ``jitter``, ``grayscale``, ``blur``, ``solarize`` (True with
      the configured probability) and float32 ``blur_sigma`` uniform in ``blur_sigma``.
    """
    u = tf.random.stateless_uniform([6], op_seed(seed, _COINS))
    return {"flip": u[_FLIP_U] < config.flip_prob,
            "jitter": u[_JITTER_U] < config.jitter_prob,
            "grayscale": u[_GRAYSCALE_U] < config.grayscale_prob,
            "blur": u[_BLUR_U] < config.blur_prob,
            "blur_sigma": colour.scaled_uniform(u[_SIGMA_U], *config.blur_sigma),
            "solarize": u[_SOLARIZE_U] < config.solarize_prob}


# --------------------------------------------------------------------------- geometry


def view_crop_window(image_shape: tf.Tensor, seed: tf.Tensor, config: ViewConfig
                     ) -> tf.Tensor:
    """The crop window of the view whose seed is ``seed``: :func:`sample_crop_window`
    with the view's crop seed. int32 [4] (offset_y, offset_x, height, width)."""
    return geometry.sample_crop_window(image_shape, op_seed(seed, _CROP), config)


# --------------------------------------------------------------------------- views


def _maybe(coin: tf.Tensor, probability: float, fn: Callable[[tf.Tensor], tf.Tensor],
           x: tf.Tensor) -> tf.Tensor:
    """fn(x) where ``coin`` (drawn with ``probability``) is True, else x. A probability
    of 0 or 1 decides in Python: the same result without a conditional, whose cost
    (about 0.1 ms for a blur or a jitter branch not taken) would buy nothing."""
    if probability <= 0.0:
        return x
    if probability >= 1.0:
        return fn(x)
    return tf.cond(coin, lambda: fn(x), lambda: tf.identity(x))


# Steps 3–6 of a view, in order. Each maps (image float32 [S, S, 3], the view's seed, its
# coins from view_coins, its config, S) to the next image; the stage benchmark
# (bench/bench_input_stages.py) times them one by one.
def view_jitter_draws(seed: tf.Tensor, config: ViewConfig) -> Tuple[tf.Tensor, tf.Tensor]:
    """The colour jitter's factors float32 [4] and order int32 [4] of the view whose seed
    is ``seed`` (:func:`colour.jitter_draws` with the view's jitter seed)."""
    return colour.jitter_draws(op_seed(seed, _JITTER), brightness=config.brightness,
                               contrast=config.contrast, saturation=config.saturation,
                               hue=config.hue)


def _jitter_step(image, seed, coins, config, image_size):
    return _maybe(coins["jitter"], config.jitter_prob, lambda x: colour.jitter_in_order(
        x, *view_jitter_draws(seed, config), jit_compile=config.jit_compile), image)


def _grayscale_step(image, seed, coins, config, image_size):
    return _maybe(coins["grayscale"], config.grayscale_prob, colour.to_grayscale, image)


def _blur_step(image, seed, coins, config, image_size):
    radius = colour.blur_radius(image_size, config.blur_kernel_fraction)
    return _maybe(coins["blur"], config.blur_prob,
                  lambda x: colour.gaussian_blur(x, coins["blur_sigma"], radius), image)


def _solarize_step(image, seed, coins, config, image_size):
    return _maybe(coins["solarize"], config.solarize_prob,
                  lambda x: colour.solarize(x, config.solarize_threshold), image)


COLOUR_STEPS = (("colour_jitter", _jitter_step), ("grayscale", _grayscale_step),
                ("blur", _blur_step), ("solarize", _solarize_step))


def finish_view(cropped: tf.Tensor, cropped_mask: Optional[tf.Tensor], seed: tf.Tensor,
                config: ViewConfig, image_size: int,
                window: Optional[tf.Tensor] = None) -> AugmentedView:
    """Steps 1 (resize) to 6 on an already cropped image (uint8 or float [h, w, 3]) and
    mask ([h, w, 1] or None). ``seed`` is the view's seed; ``window`` only goes to the
    record."""
    coins = view_coins(seed, config)
    image = geometry.resize_image(cropped, image_size, config.resize_method)
    image = _maybe(coins["flip"], config.flip_prob, geometry.flip_left_right, image)
    # The mask is resized and flipped in one gather.
    mask = None if cropped_mask is None else geometry.resize_mask(cropped_mask, image_size,
                                                                  coins["flip"])
    for _, step in COLOUR_STEPS:
        image = step(image, seed, coins, config, image_size)
    image = tf.clip_by_value(image, 0.0, 1.0)
    image.set_shape([image_size, image_size, 3])
    if mask is not None:
        mask.set_shape([image_size, image_size, 1])
    record = dict(coins)
    if window is not None:
        record["crop_window"] = window
    return AugmentedView(image, mask, record)


def augment_view(image: tf.Tensor, mask: Optional[tf.Tensor], seed: tf.Tensor,
                 config: ViewConfig, image_size: int) -> AugmentedView:
    """One view of a decoded image.

    Args:
      image: uint8 (or float in [0, 1]) [H, W, 3].
      mask: [H, W, 1] in {0, 1} (any numeric dtype), or None.
      seed: int32/int64 [2], the view's seed.
      config: the view's parameters.
      image_size: output side S.
    Returns:
      :class:`AugmentedView` with image float32 [S, S, 3] in [0, 1] and mask float32
      [S, S, 1] in {0, 1}, cropped with the same window and flipped with the same coin.
    """
    window = view_crop_window(tf.shape(image), seed, config)
    cropped_mask = None if mask is None else geometry.crop(mask, window)
    return finish_view(geometry.crop(image, window), cropped_mask, seed, config, image_size,
                       window)


def view_seeds(seed: tf.Tensor, count: int) -> List[tf.Tensor]:
    """Per-view seeds from a per-example seed int [2]: view v gets fold_in(seed, v)."""
    return [tf.random.experimental.stateless_fold_in(seed, v) for v in range(count)]


def record_views(parsed: Mapping[str, tf.Tensor], seed: tf.Tensor,
                 configs: Sequence[ViewConfig], image_size: int, *, fused_crop: bool,
                 with_mask: bool = True) -> List[AugmentedView]:
    """Views of one parsed record (:func:`schema.parse_example`), one per config.

    The crop windows are drawn from the image shape (the JPEG header when ``fused_crop``);
    the mask is decoded once and cropped with each view's window. A mask whose size
    differs from the image's fails with an error naming the record id.
    """
    seeds = view_seeds(seed, len(configs))
    window_fns = [(lambda shape, s=s, c=c: view_crop_window(shape, s, c))
                  for s, c in zip(seeds, configs)]
    crops, windows, shape = geometry.decode_and_crop(parsed["image"], window_fns,
                                                     fused=fused_crop)
    masks: List[Optional[tf.Tensor]] = [None] * len(configs)
    if with_mask:
        mask = schema.decode_mask(parsed)
        # The windows were drawn on the image's shape; the mask must have the same.
        check = tf.debugging.Assert(
            tf.reduce_all(tf.equal(tf.shape(mask)[:2], shape[:2])),
            ["harl-tf record: the mask and the image differ in size (rebuild the "
             "record); id, mask shape, image shape:", parsed["id"], tf.shape(mask), shape])
        with tf.control_dependencies([check]):
            masks = [geometry.crop(mask, w) for w in windows]
    return [finish_view(c, m, s, cfg, image_size, w)
            for c, m, s, cfg, w in zip(crops, masks, seeds, configs, windows)]


def two_views(parsed: Mapping[str, tf.Tensor], seed: tf.Tensor, image_size: int, *,
              view_configs: Optional[Sequence[ViewConfig]] = None,
              fused_crop: bool = True) -> Dict[str, tf.Tensor]:
    """The pretraining example: ``view1``, ``view2`` float32 [S, S, 3] in [0, 1],
    ``mask1``, ``mask2`` float32 [S, S, 1] in {0, 1}, ``label`` int64 []."""
    configs = tuple(view_configs or default_view_configs())
    if len(configs) != 2:
        raise ValueError(f"view_configs must hold two ViewConfig, got {len(configs)}")
    v1, v2 = record_views(parsed, seed, configs, image_size, fused_crop=fused_crop)
    return {"view1": v1.image, "view2": v2.image, "mask1": v1.mask, "mask2": v2.mask,
            "label": parsed["label"]}
