"""What the deep mask's encoder sees: image preprocessing, tf.data pipelines over arrays
and files, the upsampling of cell maps, and the training set (images + pseudo-masks).

Training and inference share :func:`encoder_input`: every image is resized to
``input_size × input_size`` (aspect ratio not kept) and scaled to float32 ``[0, 1]``; a
cell map is resized back to the image's own size with :func:`upsample`.
"""
from __future__ import annotations

import os
from typing import Any, Dict, Optional, Sequence

import numpy as np
import tensorflow as tf

from harl_tf.errors import DataError, MissingPathError
from harl_tf.masks import folder, get_method, quality, to_rgb_uint8
from harl_tf.progress import progress as progress_bar


def encoder_input(image_uint8: tf.Tensor, input_size: int) -> tf.Tensor:
    """``uint8 [H, W, 3]`` → float32 ``[input_size, input_size, 3]`` in ``[0, 1]``
    (bilinear, antialiased when shrinking). Training and inference both use this."""
    image = tf.image.convert_image_dtype(image_uint8, tf.float32)
    image = tf.image.resize(image, (input_size, input_size), method="bilinear",
                            antialias=True)
    return tf.clip_by_value(image, 0.0, 1.0)


def upsample(probabilities: np.ndarray, height: int, width: int) -> np.ndarray:
    """Bilinear resize (half-pixel centres) of a cell map ``[h, w]`` to ``[height, width]``."""
    resized = tf.image.resize(np.asarray(probabilities, np.float32)[..., None],
                              (height, width), method="bilinear")
    return resized.numpy()[..., 0]


def arrays_dataset(images: Sequence[np.ndarray], input_size: int) -> tf.data.Dataset:
    """Images (uint8 RGB, grey / RGBA accepted, any sizes) → ``(encoder_input,
    original [H, W])`` pairs."""
    def generate():
        for image in images:
            yield to_rgb_uint8(image)

    @tf.autograph.experimental.do_not_convert  # plain tf ops; tracing stays fast
    def prepare(image):
        return encoder_input(image, input_size), tf.shape(image)[:2]

    dataset = tf.data.Dataset.from_generator(
        generate, output_signature=tf.TensorSpec([None, None, 3], tf.uint8))
    return dataset.map(prepare)


TF_DECODABLE = (".jpg", ".jpeg", ".png", ".gif", ".bmp")


def files_dataset(paths: Sequence[str], input_size: int) -> tf.data.Dataset:
    """Image files → ``(encoder_input, original [H, W])`` pairs, decoded in parallel by
    tf.io (formats it cannot decode are read with PIL)."""
    if not all(path.lower().endswith(TF_DECODABLE) for path in paths):
        # e.g. TIFF or WebP, which tf.io cannot decode: read with PIL in a generator
        return arrays_dataset(_LazyImages(paths), input_size)

    @tf.autograph.experimental.do_not_convert
    def load(path):
        # channels=3 turns grey into RGB and drops alpha; 16-bit PNGs are scaled to 8 bits.
        image = tf.io.decode_image(tf.io.read_file(path), channels=3, dtype=tf.uint8,
                                   expand_animations=False)
        return encoder_input(image, input_size), tf.shape(image)[:2]

    return tf.data.Dataset.from_tensor_slices(list(paths)).map(
        load, num_parallel_calls=tf.data.AUTOTUNE)


class _LazyImages:
    """A sequence of image files decoded on access (:func:`harl_tf.masks.folder.read_image`)."""

    def __init__(self, paths: Sequence[str]):
        self.paths = list(paths)

    def __len__(self) -> int:
        return len(self.paths)

    def __iter__(self):
        return (folder.read_image(path) for path in self.paths)


def batches(dataset: tf.data.Dataset, batch_size: int) -> tf.data.Dataset:
    return dataset.batch(batch_size).prefetch(1)


def load_training_set(images_dir: str, *, pseudo_masks_dir: Optional[str] = None,
                      limit: int = 0, seed: int = 0,
                      conventional_params: Optional[Dict[str, Any]] = None,
                      progress: bool = True):
    """Images and pseudo-masks for :func:`train_saliency_head`.

    The images are every image file under ``images_dir`` (:func:`harl_tf.masks.folder.
    list_images`), or a seeded random subset of ``limit`` of them, in sorted order.
    Pseudo-masks are read from ``pseudo_masks_dir`` (``a/b/x.jpg`` → ``a/b/x.png``, the
    layout ``tools/generate_masks.py`` writes), or computed with the conventional method
    (``conventional_params``) when no folder is given. Returns ``(paths, images, masks,
    provenance)``.
    """
    relative = folder.list_images(images_dir)
    if not relative:
        raise MissingPathError(f"images directory {images_dir} holds no image files "
                               f"({', '.join(folder.IMAGE_EXTENSIONS)})")
    if 0 < limit < len(relative):
        chosen = np.random.default_rng(seed).choice(len(relative), limit, replace=False)
        relative = [relative[i] for i in sorted(chosen)]
    paths = [os.path.join(images_dir, rel) for rel in relative]
    method, mask_paths = None, []
    if pseudo_masks_dir is not None:
        mask_paths = [os.path.join(pseudo_masks_dir, folder.mask_relpath(rel))
                      for rel in relative]
        missing = [(p, m) for p, m in zip(paths, mask_paths) if not os.path.isfile(m)]
        if missing:
            raise MissingPathError(f"{len(missing)} image(s) have no pseudo-mask, e.g. "
                                   f"{missing[0][0]} needs {missing[0][1]}")
        provenance = {"images_dir": os.path.abspath(images_dir),
                      "pseudo_masks_dir": os.path.abspath(pseudo_masks_dir)}
    else:
        method = get_method("conventional", **(conventional_params or {}))
        provenance = {"images_dir": os.path.abspath(images_dir),
                      "pseudo_masks": "conventional (computed on the fly)",
                      "conventional_params": method.params}
    images, pseudo = [], []
    for index, path in enumerate(progress_bar(paths, desc="images + pseudo-masks",
                                              unit="image", disable=not progress)):
        image = folder.read_image(path)
        if method is None:
            mask = quality.read_mask(mask_paths[index])
            if mask.shape != image.shape[:2]:
                raise DataError(f"{mask_paths[index]}: mask size {mask.shape} differs from "
                                f"its image's {image.shape[:2]} ({path})")
        else:
            mask = method(image)
        images.append(image)
        pseudo.append(mask)
    provenance["num_images"] = len(paths)
    return paths, images, pseudo, provenance
