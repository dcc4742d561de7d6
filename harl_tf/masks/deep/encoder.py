"""The frozen encoder of the deep mask: a SavedModel with the export contract, or an
in-memory Keras model.

``FrozenEncoder(images float32 [B, H, W, 3] in [0, 1])`` → feature map float32
``[B, h, w, C]``. The contract (signature ``serving_default`` taking ``images`` and
returning ``feature_map``) is :mod:`harl_tf.saved_encoder`'s, so any encoder export works.
"""
from __future__ import annotations

import json
import os
from typing import Any, Dict, Optional

import keras
import tensorflow as tf

from harl_tf import atomic, saved_encoder
from harl_tf.errors import DataError, MissingPathError
from harl_tf.models import resnet


class FrozenEncoder:
    """A frozen feature extractor: ``encoder(images float32 [B, H, W, 3] in [0, 1])`` →
    feature map float32 ``[B, h, w, C]``.

    Build with :meth:`from_saved_model` (the export contract) or :meth:`from_keras`.
    ``description`` is a JSON-able dict recorded in the mask model (kind, path, config,
    whether the weights are a random initialisation).
    """

    def __init__(self, function, description: Dict[str, Any], *, keras_model=None,
                 resource=None):
        self._function = function
        self.description = dict(description)
        self.keras_model = keras_model
        self.saved_model_path: Optional[str] = None  # set when loaded from a SavedModel
        self._resource = resource  # keeps a loaded SavedModel's variables alive

    @classmethod
    def from_saved_model(cls, path: str) -> "FrozenEncoder":
        """Loads an encoder SavedModel (signature ``serving_default``: ``images`` →
        ``feature_map``). ``harl_export.json`` next to it, if any, is recorded."""
        path = os.path.abspath(path)
        if not os.path.isfile(os.path.join(path, "saved_model.pb")):
            raise MissingPathError(
                f"encoder {path}: not a SavedModel directory (no saved_model.pb); expected "
                "the output directory of harl_tf.export")
        loaded = tf.saved_model.load(path)
        signature = loaded.signatures.get("serving_default")
        if signature is None:
            raise DataError(f"encoder {path}: the SavedModel has no 'serving_default' "
                            f"signature (found {sorted(loaded.signatures)})")
        _, inputs = signature.structured_input_signature
        if len(inputs) != 1:
            raise DataError(f"encoder {path}: 'serving_default' must take one input "
                            f"(images), found {sorted(inputs)}")
        if "feature_map" not in signature.structured_outputs:
            raise DataError(f"encoder {path}: 'serving_default' has no 'feature_map' output "
                            f"(found {sorted(signature.structured_outputs)})")
        input_name = next(iter(inputs))

        def function(images):
            return signature(**{input_name: images})["feature_map"]

        export_config = None
        config_path = os.path.join(path, saved_encoder.METADATA_FILE)
        if os.path.isfile(config_path):
            with open(config_path) as f:
                export_config = json.load(f)
        description = {"kind": "saved_model", "path": path, "export_config": export_config}
        encoder = cls(function, description, resource=loaded)
        encoder.saved_model_path = path
        return encoder

    @classmethod
    def from_export(cls, path: str) -> "FrozenEncoder":
        """An export directory: its SavedModel (:meth:`from_saved_model`), or, for an
        export kept without one (``harl_export.json`` and the Keras weights, as
        ``bench.keep_encoders`` keeps them), the ResNet rebuilt from its metadata with those
        weights, recorded by its path (a mask model refers to it, never copies it)."""
        path = os.path.abspath(path)
        if os.path.isfile(os.path.join(path, "saved_model.pb")):
            return cls.from_saved_model(path)
        if not os.path.isfile(os.path.join(path, saved_encoder.METADATA_FILE)):
            raise MissingPathError(
                f"encoder {path}: not an export directory (neither saved_model.pb nor "
                f"{saved_encoder.METADATA_FILE}); expected the output of harl_tf.export")
        metadata = saved_encoder.read_metadata(path)
        weights = os.path.join(path, metadata.get("weights_file", saved_encoder.WEIGHTS_FILE))
        if not os.path.isfile(weights):
            raise MissingPathError(f"encoder {path}: weights file {weights} is missing")
        model = resnet.build_encoder(metadata["encoder_config"])
        model.load_weights(weights)
        function = tf.function(lambda images: model(images, training=False),
                               reduce_retracing=True)
        description = {"kind": "export_weights", "path": path, "export_config": metadata}
        return cls(function, description, resource=model)

    @classmethod
    def from_keras(cls, model, *, random_init: bool = False,
                   note: Optional[str] = None) -> "FrozenEncoder":
        """Wraps an in-memory Keras encoder (called with ``training=False``).
        ``random_init=True`` labels its weights as a random initialisation."""
        function = tf.function(lambda images: model(images, training=False),
                               reduce_retracing=True)
        config = getattr(model, "config", None)
        description = {"kind": "keras", "model": model.name,
                       "config": config if isinstance(config, dict) else None,
                       "random_init": bool(random_init)}
        if note:
            description["note"] = note
        return cls(function, description, keras_model=model)

    @classmethod
    def from_config(cls, config: Dict[str, Any]) -> "FrozenEncoder":
        """A RANDOMLY INITIALISED :class:`~harl_tf.models.resnet.ResNet` built from a config
        dict (as ``ResNet.config``), labelled ``random_init`` in every record."""
        model = resnet.build_encoder(config)
        return cls.from_keras(model, random_init=True,
                              note="randomly initialised ResNet, not pretrained")

    def __call__(self, images) -> tf.Tensor:
        features = self._function(tf.convert_to_tensor(images, tf.float32))
        return tf.cast(features, tf.float32)

    def save(self, path: str) -> None:
        """Saves an in-memory Keras encoder as a SavedModel with the export contract
        (:mod:`harl_tf.saved_encoder`): a ``ResNet`` as a full export (with
        ``harl_export.json`` and ``encoder.weights.h5``), any other model as the
        SavedModel alone."""
        model = self.keras_model
        if model is None:
            raise ValueError("only an in-memory Keras encoder can be saved; an encoder "
                             "loaded from a SavedModel is recorded by its path")
        if isinstance(model, resnet.ResNet):
            saved_encoder.export_encoder(model, path, encoder_config=model.config,
                                         output_stride=None, source=dict(self.description))
            return
        with atomic.atomic_directory(path) as temporary:
            archive = keras.export.ExportArchive()
            archive.track(model)
            archive.add_endpoint(saved_encoder.SIGNATURE,
                                 saved_encoder.serving_function(model),
                                 input_signature=saved_encoder.INPUT_SIGNATURE)
            archive.write_out(temporary, verbose=False)
