"""The registry method ``"deep"``: masks from a trained saliency model.

:class:`DeepSaliencyMasks` masks one image per call, or many: ``predict_arrays`` and
``predict_files`` batch through ``tf.data`` with a progress bar; every image is resized to
``input_size`` (aspect ratio not kept, as in training); its cell map is refined as the
model says (:mod:`harl_tf.masks.deep.refine`: none, Felzenszwalb segments, guided filter or
GrabCut, at the conventional working resolution) and the mask is resized back to the
image's own size. There is no fallback: an image with no salient cell gets an empty mask
(``MaskResult.fallback`` is always ``None``).
"""
from __future__ import annotations

import os
from typing import Any, Dict, Iterator, List, Optional, Sequence, Tuple

import numpy as np
import tensorflow as tf

from harl_tf.errors import ConfigError, MissingPathError
from harl_tf.masks import MaskResult, to_rgb_uint8
from harl_tf.masks import folder
from harl_tf.masks.deep import data, refine
from harl_tf.masks.deep.saliency_model import SaliencyModel
from harl_tf.progress import progress as progress_bar


class DeepSaliencyMasks:
    """Registry object for ``get_method("deep", model_path=...)``.

    ``model_path``: a directory written by :meth:`SaliencyModel.save` (or pass an in-memory
    ``model``). ``threshold``: foreground where the upsampled probability is ``>``
    threshold; ``None`` takes the model's (0.5 unless trained with another). ``batch_size``:
    images per encoder call in ``predict_arrays`` / ``predict_files``. ``params`` records the
    model path, encoder path, input size and threshold.
    """
    name = "deep"

    def __init__(self, model_path: Optional[str] = None, *, threshold: Optional[float] = None,
                 batch_size: int = 32, model: Optional[SaliencyModel] = None,
                 progress: bool = True):
        if (model_path is None) == (model is None):
            raise ConfigError("deep mask: give exactly one of model_path (a directory from "
                              "tools/train_saliency_head.py) or model")
        if threshold is not None and not 0.0 <= float(threshold) <= 1.0:
            raise ConfigError(f"deep mask: threshold must be in [0, 1], got {threshold!r}")
        if int(batch_size) < 1:
            raise ConfigError(f"deep mask: batch_size must be >= 1, got {batch_size!r}")
        self.model = model if model is not None else SaliencyModel.load(model_path)
        self.threshold = self.model.threshold if threshold is None else float(threshold)
        self.batch_size = int(batch_size)
        self.progress = bool(progress)
        self.params: Dict[str, Any] = {
            "model_path": self.model.path,
            "threshold": self.threshold,
            "input_size": self.model.input_size,
            "input_sizes": list(self.model.input_sizes),
            "refinement": self.model.refinement.to_json(),
            "encoder": self.model.encoder.description.get("path"),
        }
        self.last_fallback: Optional[str] = None

    def _mask(self, image: np.ndarray, cells: np.ndarray) -> np.ndarray:
        return refine.refined_mask(image, cells, self.model.refinement, self.threshold)

    def compute(self, image: np.ndarray) -> MaskResult:
        image = to_rgb_uint8(image)
        batch = data.encoder_input(image, self.model.input_size)[None]
        probabilities = self.model.probabilities(batch).numpy()
        mask = self._mask(image, probabilities[0])
        self.last_fallback = None
        return MaskResult(mask, None, {"foreground_fraction": float(mask.mean()),
                                       "max_probability": float(probabilities.max())})

    def __call__(self, image: np.ndarray) -> np.ndarray:
        return self.compute(image).mask

    def _run(self, dataset: tf.data.Dataset, originals: Iterator[np.ndarray],
             count: int) -> Iterator[np.ndarray]:
        """``originals``: the images at their own size, in the dataset's order (the
        refinement follows their edges)."""
        total = -(-count // self.batch_size)
        for images, _ in progress_bar(data.batches(dataset, self.batch_size), total=total,
                                      desc="deep masks", unit="batch",
                                      disable=not self.progress):
            for cells in self.model.probabilities(images).numpy():
                yield self._mask(next(originals), cells)

    def predict_arrays(self, images: Sequence[np.ndarray]) -> List[np.ndarray]:
        """Masks ``uint8 {0, 1} [H_i, W_i]`` of many images (any sizes), batched."""
        originals = (to_rgb_uint8(image) for image in images)
        return list(self._run(data.arrays_dataset(images, self.model.input_size), originals,
                              len(images)))

    def predict_files(self, paths: Sequence[str]) -> Iterator[Tuple[str, np.ndarray]]:
        """Yields ``(path, mask uint8 {0, 1} [H, W])`` for image files, in order, batched
        through tf.data (decoding in parallel)."""
        missing = [p for p in paths if not os.path.isfile(p)]
        if missing:
            raise MissingPathError(f"deep mask: {len(missing)} image file(s) not found, "
                                   f"e.g. {missing[0]}")
        # The files are read twice (tf.data for the encoder, here for the refinement):
        # decoding a small image costs far less than the encoder.
        originals = (folder.read_image(path) for path in paths)
        masks = self._run(data.files_dataset(paths, self.model.input_size), originals,
                          len(paths))
        yield from zip(paths, masks)

    def __repr__(self) -> str:
        return f"DeepSaliencyMasks({self.params})"
