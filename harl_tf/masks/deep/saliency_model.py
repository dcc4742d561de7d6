"""The trained deep mask model: a frozen encoder and a 1×1 saliency head, and the
directory it is saved as.

**Saved model** (a directory, written atomically: a temporary sibling, then renamed):
``saliency_head.json`` (format, encoder path and config, input size, threshold, training
parameters and history), ``head_weights.npz`` (``kernel`` ``[1, 1, C, 1]``, ``bias``
``[1]``), and ``encoder/`` (a SavedModel) when the encoder was an in-memory model. An
encoder given by path is recorded by its absolute path and not copied.
"""
from __future__ import annotations

import dataclasses
import json
import os
import shutil
from typing import Any, Dict, Optional

import numpy as np
import tensorflow as tf

from harl_tf import atomic
from harl_tf.masks.deep.encoder import FrozenEncoder

FORMAT = "harl_tf.saliency_head"
FORMAT_VERSION = 1
CONFIG_FILE = "saliency_head.json"
WEIGHTS_FILE = "head_weights.npz"
ENCODER_DIR = "encoder"


@dataclasses.dataclass
class SaliencyHead:
    """The 1×1 convolution: ``kernel`` float32 ``[1, 1, C, 1]``, ``bias`` float32 ``[1]``."""
    kernel: np.ndarray
    bias: np.ndarray

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


class SaliencyModel:
    """Frozen encoder + 1×1 head, at a fixed square encoder ``input_size``, with its default
    mask ``threshold``.

    ``probabilities(images float32 [B, S, S, 3])`` → cell foregroundness ``[B, h, w]``.
    """

    def __init__(self, encoder: FrozenEncoder, head: SaliencyHead, *, input_size: int,
                 threshold: float = 0.5, training: Optional[Dict[str, Any]] = None,
                 path: Optional[str] = None):
        if int(input_size) < 1:
            raise ValueError(f"input_size must be >= 1, got {input_size}")
        if not 0.0 <= float(threshold) <= 1.0:
            raise ValueError(f"threshold must be in [0, 1], got {threshold!r}")
        self.encoder = encoder
        self.head = head
        self.input_size = int(input_size)
        self.threshold = float(threshold)
        self.training = dict(training or {})
        self.path = path

    def probabilities(self, images) -> tf.Tensor:
        features = self.encoder(images)
        if features.shape[-1] != self.head.feature_dim:
            raise ValueError(
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
                raise FileExistsError(
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
            np.savez(os.path.join(temporary, WEIGHTS_FILE), kernel=self.head.kernel,
                     bias=self.head.bias)
            config = {
                "format": FORMAT, "version": FORMAT_VERSION,
                "encoder": encoder,
                "feature_dim": self.head.feature_dim,
                "input_size": self.input_size,
                "threshold": self.threshold,
                "head": {"weights": WEIGHTS_FILE, "kernel_shape": list(self.head.kernel.shape)},
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
            raise FileNotFoundError(f"mask model {path}: no {CONFIG_FILE}; expected a "
                                    "directory written by tools/train_saliency_head.py")
        with open(config_path) as f:
            config = json.load(f)
        if config.get("format") != FORMAT or config.get("version") != FORMAT_VERSION:
            raise ValueError(f"{config_path}: format {config.get('format')!r} version "
                             f"{config.get('version')!r}; expected {FORMAT!r} version "
                             f"{FORMAT_VERSION}")
        with np.load(os.path.join(path, config["head"]["weights"])) as weights:
            head = SaliencyHead(weights["kernel"], weights["bias"])
        if encoder is None:
            recorded = config["encoder"]
            encoder_path = os.path.join(path, recorded["path"])  # absolute paths stay
            if not os.path.isdir(encoder_path):
                raise FileNotFoundError(
                    f"{config_path}: encoder {encoder_path} not found; pass the encoder "
                    "explicitly if the export directory moved")
            encoder = FrozenEncoder.from_saved_model(encoder_path)
            encoder.description = dict(recorded, path=recorded["path"])
        return cls(encoder, head, input_size=config["input_size"],
                   threshold=config["threshold"], training=config.get("training"), path=path)
