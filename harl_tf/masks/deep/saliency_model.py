"""The trained deep mask model: a frozen encoder and a 1×1 saliency head, and the
directory it is saved as.

**Features.** The encoder runs on the image resized to each of ``input_sizes`` (one size:
the paper's configuration; several: a multi-scale hypercolumn). The feature map of every
size is bilinearly resized to the grid of the largest and the maps are concatenated along
channels, ``C = Σ_s C_s``; images are given at the largest size and shrunk (antialiased)
for the others.

**Saved model** (a directory, written atomically: a temporary sibling, then renamed):
``saliency_head.json`` (format, encoder path and config, input sizes, threshold,
refinement, head kind, training parameters and history), ``head_weights.npz`` (the 1×1
head: ``kernel`` ``[1, 1, C, 1]``, ``bias`` ``[1]``; the context head: the arrays of
:class:`~harl_tf.masks.deep.context_head.ContextHead`), and ``encoder/`` (a SavedModel)
when the encoder was an in-memory model. An encoder given by path is recorded by its
absolute path and not copied.
Version 1 directories (one input size, no refinement) load unchanged.
"""
from __future__ import annotations

import dataclasses
import json
import os
import shutil
from typing import Any, Dict, Optional, Sequence, Union

import numpy as np
import tensorflow as tf

from harl_tf import atomic
from harl_tf.errors import ConfigError, DataError, MissingPathError, OutputExistsError
from harl_tf.masks.deep.context_head import ContextHead
from harl_tf.masks.deep.encoder import FrozenEncoder
from harl_tf.masks.deep.refine import RefineConfig

FORMAT = "harl_tf.saliency_head"
FORMAT_VERSION = 2
READABLE_VERSIONS = (1, 2)
CONFIG_FILE = "saliency_head.json"
WEIGHTS_FILE = "head_weights.npz"
ENCODER_DIR = "encoder"


@dataclasses.dataclass
class SaliencyHead:
    """The 1×1 convolution: ``kernel`` float32 ``[1, 1, C, 1]``, ``bias`` float32 ``[1]``."""
    kernel: np.ndarray
    bias: np.ndarray

    kind = "linear"

    def __post_init__(self):
        self.kernel = np.asarray(self.kernel, np.float32).reshape(1, 1, -1, 1)
        self.bias = np.asarray(self.bias, np.float32).reshape(1)

    @property
    def feature_dim(self) -> int:
        return int(self.kernel.shape[2])

    def __call__(self, feature_map) -> tf.Tensor:
        """feature map ``[B, h, w, C]`` → foregroundness ``σ(conv1x1)`` ``[B, h, w]``."""
        logits = tf.nn.conv2d(tf.convert_to_tensor(feature_map, tf.float32), self.kernel,
                              strides=1, padding="VALID") + self.bias
        return tf.sigmoid(logits)[..., 0]

    def arrays(self) -> Dict[str, np.ndarray]:
        return {"kernel": self.kernel, "bias": self.bias}


HEADS = {"linear": SaliencyHead, "context": ContextHead}


def input_sizes_of(input_size: Union[int, Sequence[int]]) -> tuple:
    """An input size or several → the sorted tuple of distinct sizes (each >= 1)."""
    sizes = (input_size,) if isinstance(input_size, (int, np.integer)) else tuple(input_size)
    if not sizes or any(int(s) < 1 for s in sizes):
        raise ConfigError(f"input sizes must be >= 1, got {input_size!r}")
    return tuple(sorted({int(s) for s in sizes}))


def multiscale_features(encoder: FrozenEncoder, images, input_sizes: Sequence[int]
                        ) -> tf.Tensor:
    """Images float32 ``[B, S, S, 3]`` (``S = max(input_sizes)``) → the encoder's feature
    maps at every input size, resized (bilinear) to the largest size's grid and concatenated:
    float32 ``[B, h, w, Σ C_s]`` (one size: the feature map itself)."""
    images = tf.convert_to_tensor(images, tf.float32)
    largest = encoder(images)
    maps = []
    for size in input_sizes:
        if size == images.shape[1]:
            maps.append(largest)
            continue
        small = tf.image.resize(images, (size, size), method="bilinear", antialias=True)
        features = encoder(tf.clip_by_value(small, 0.0, 1.0))
        maps.append(tf.image.resize(features, tf.shape(largest)[1:3], method="bilinear"))
    return maps[0] if len(maps) == 1 else tf.concat(maps, axis=-1)


class SaliencyModel:
    """Frozen encoder + 1×1 head at square encoder ``input_size`` (or several
    ``input_sizes``: a multi-scale hypercolumn), with its default mask ``threshold`` and its
    boundary ``refinement`` (:class:`RefineConfig`; ``"none"``: the paper's configuration).

    ``probabilities(images float32 [B, S, S, 3])`` (``S = input_size``, the largest) → cell
    foregroundness ``[B, h, w]``.
    """

    def __init__(self, encoder: FrozenEncoder, head: SaliencyHead, *,
                 input_size: Union[int, Sequence[int]], threshold: float = 0.5,
                 training: Optional[Dict[str, Any]] = None, path: Optional[str] = None,
                 refinement: Optional[RefineConfig] = None):
        if not 0.0 <= float(threshold) <= 1.0:
            raise ConfigError(f"threshold must be in [0, 1], got {threshold!r}")
        self.encoder = encoder
        self.head = head
        self.input_sizes = input_sizes_of(input_size)
        self.input_size = self.input_sizes[-1]  # what images are resized to
        self.threshold = float(threshold)
        self.refinement = refinement or RefineConfig()
        self.training = dict(training or {})
        self.path = path

    def features(self, images) -> tf.Tensor:
        """``[B, S, S, 3]`` → the head's input ``[B, h, w, C]`` (:func:`multiscale_features`)."""
        return multiscale_features(self.encoder, images, self.input_sizes)

    def probabilities(self, images) -> tf.Tensor:
        features = self.features(images)
        if features.shape[-1] != self.head.feature_dim:
            raise DataError(
                f"the encoder gives {features.shape[-1]} channels but the saliency head "
                f"{self.path or '(in memory)'} expects {self.head.feature_dim}: the head was "
                "trained on another encoder")
        return self.head(features)

    # Persistence.

    def save(self, path: str) -> None:
        """Writes the model directory atomically (temporary sibling, then rename). An
        existing directory is replaced only if it holds a saliency model."""
        path = os.path.abspath(path)
        if os.path.exists(path) and not os.path.isfile(os.path.join(path, CONFIG_FILE)):
            if not os.path.isdir(path) or os.listdir(path):
                raise OutputExistsError(
                    f"mask model output {path} exists and is not a saliency model "
                    f"(no {CONFIG_FILE}); choose another path or remove it")
        with atomic.atomic_directory(path, overwrite=True) as temporary:
            encoder = dict(self.encoder.description)
            if self.encoder.keras_model is not None:
                self.encoder.save(os.path.join(temporary, ENCODER_DIR))
                encoder["path"] = ENCODER_DIR  # relative: inside the model directory
            elif not os.path.isabs(encoder["path"]):  # inside the model it was loaded from
                shutil.copytree(self.encoder.saved_model_path,
                                os.path.join(temporary, ENCODER_DIR))
                encoder["path"] = ENCODER_DIR
            np.savez(os.path.join(temporary, WEIGHTS_FILE), **self.head.arrays())
            config = {
                "format": FORMAT, "version": FORMAT_VERSION,
                "encoder": encoder,
                "feature_dim": self.head.feature_dim,
                "input_size": self.input_size,
                "input_sizes": list(self.input_sizes),
                "threshold": self.threshold,
                "refinement": self.refinement.to_json(),
                "head": {"kind": self.head.kind, "weights": WEIGHTS_FILE,
                         "shapes": {k: list(v.shape) for k, v in self.head.arrays().items()}},
                "training": self.training,
            }
            atomic.write_json_atomic(os.path.join(temporary, CONFIG_FILE), config)
        self.path = path

    @classmethod
    def load(cls, path: str, *, encoder: Optional[FrozenEncoder] = None) -> "SaliencyModel":
        """Loads a model directory written by :meth:`save`. ``encoder`` overrides the
        recorded one (e.g. after the export directory moved)."""
        path = os.path.abspath(path)
        config_path = os.path.join(path, CONFIG_FILE)
        if not os.path.isfile(config_path):
            raise MissingPathError(f"mask model {path}: no {CONFIG_FILE}; expected a "
                                   "directory written by tools/train_saliency_head.py")
        try:
            with open(config_path) as f:
                config = json.load(f)
        except (OSError, ValueError) as e:
            raise DataError(f"mask model {config_path}: not readable JSON ({e})") from None
        if (not isinstance(config, dict) or config.get("format") != FORMAT
                or config.get("version") not in READABLE_VERSIONS):
            found = config if not isinstance(config, dict) else (
                config.get("format"), config.get("version"))
            raise DataError(f"{config_path}: format/version {found!r}; expected {FORMAT!r} "
                            f"version {' or '.join(map(str, READABLE_VERSIONS))}")
        try:
            weights_path = os.path.join(path, config["head"]["weights"])
            head_class = HEADS[config["head"].get("kind", "linear")]
            with np.load(weights_path) as weights:
                head = head_class(**{k: weights[k] for k in weights.files})
            input_sizes = config.get("input_sizes", config["input_size"])
            refinement = RefineConfig.from_json(config.get("refinement", {}))
        except (OSError, KeyError, TypeError, ValueError) as e:
            raise DataError(f"mask model {path}: incomplete or corrupt ({type(e).__name__}: "
                            f"{e}); retrain it with tools/train_saliency_head.py") from None
        if head.feature_dim != config.get("feature_dim", head.feature_dim):
            raise DataError(f"mask model {path}: {WEIGHTS_FILE} has {head.feature_dim} "
                            f"channels but {CONFIG_FILE} says {config['feature_dim']}")
        if encoder is None:
            recorded = config["encoder"]
            encoder_path = os.path.join(path, recorded["path"])  # absolute paths stay
            if not os.path.isdir(encoder_path):
                raise MissingPathError(
                    f"{config_path}: encoder {encoder_path} not found; pass the encoder "
                    "explicitly if the export directory moved")
            encoder = FrozenEncoder.from_export(encoder_path)
            encoder.description = dict(recorded, path=recorded["path"])
        return cls(encoder, head, input_size=input_sizes, threshold=config["threshold"],
                   training=config.get("training"), path=path, refinement=refinement)
