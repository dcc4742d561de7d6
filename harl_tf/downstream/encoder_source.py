"""Where a downstream encoder comes from: an export, a pretraining model_dir, or nothing.

    load_encoder("/exports/harl_r50")  # export directory (python -m harl_tf.export)
    load_encoder("/runs/harl_r50")     # pretraining model_dir: online encoder, latest ckpt
    load_encoder("random", encoder_config={"depth": 50})  # random init (baselines)

Every source gives a Keras :class:`harl_tf.models.resnet.ResNet` with trainable weights,
so the same code does linear probes (frozen, BatchNorm in inference mode) and full
fine-tuning. From an export the ResNet is rebuilt from ``harl_export.json`` and
``encoder.weights.h5`` is loaded: ``keras.layers.TFSMLayer`` over the SavedModel
(:func:`saved_model_layer`) also works for frozen features, but cannot switch BatchNorm to
training mode, so it is not used for fine-tuning.
"""
from __future__ import annotations

import dataclasses
import json
import os
from typing import Any, Dict, Optional, Union

import keras
import tensorflow as tf

from harl_tf import saved_encoder
from harl_tf.errors import ConfigError, MissingPathError
from harl_tf.eval_config import RANDOM  # --encoder=random
from harl_tf.models import resnet


@dataclasses.dataclass
class LoadedEncoder:
    """An encoder and where it came from.

    Attributes:
      encoder: built ResNet; ``encoder(images [B,H,W,3] in [0,1], training)`` ->
        ``[B, h, w, feature_dim]``.
      config: its ``.config``.
      kind: "export", "model_dir" or "random".
      description: JSON-able provenance (path, checkpoint step, ...), for results files.
    """
    encoder: keras.Model
    config: Dict[str, Any]
    kind: str
    description: Dict[str, Any]


def is_export_dir(path: str) -> bool:
    return tf.io.gfile.exists(os.path.join(path, saved_encoder.METADATA_FILE))


def encoder_config_from(value: Union[Dict[str, Any], str, None]) -> Dict[str, Any]:
    """An encoder config from a dict (as is), a JSON object string, a JSON file, or an
    export directory (its ``harl_export.json``'s ``encoder_config``): what
    ``EvaluationConfig.encoder_config`` holds."""
    if isinstance(value, dict):
        return dict(value)
    text = (value or "").strip()
    if not text:
        raise ConfigError("--encoder_config is empty; give a JSON object such as "
                          '\'{"depth": 50}\', a JSON file, or an export directory.')
    if text.startswith("{"):
        try:
            return json.loads(text)
        except json.JSONDecodeError as e:
            raise ConfigError(f"--encoder_config is not valid JSON ({e}): {text!r}") from None
    if tf.io.gfile.isdir(text):
        return saved_encoder.read_metadata(text)["encoder_config"]
    if tf.io.gfile.exists(text):
        try:
            with tf.io.gfile.GFile(text) as f:
                payload = json.load(f)
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise ConfigError(f"--encoder_config={text!r} is not a JSON file ({e}).") from None
        return payload.get("encoder_config", payload)
    raise MissingPathError(f"--encoder_config={text!r} is neither a JSON object, an existing "
                           "JSON file nor an export directory.")


def load_from_export(export_dir: str, *, output_stride: Optional[int] = None) -> LoadedEncoder:
    """Rebuilds the exported ResNet from ``harl_export.json`` and loads
    ``encoder.weights.h5`` (optionally at another output stride; weights are the same)."""
    metadata = saved_encoder.read_metadata(export_dir)
    config = dict(metadata["encoder_config"])
    if output_stride is not None:
        config["output_stride"] = int(output_stride)
    encoder = resnet.build_encoder(config)
    weights = os.path.join(export_dir,
                           metadata.get("weights_file", saved_encoder.WEIGHTS_FILE))
    if not tf.io.gfile.exists(weights):
        raise saved_encoder.ExportError(f"{export_dir}: weights file {weights} is missing; "
                                        "re-export the encoder.")
    encoder.load_weights(weights)
    description = {"export_dir": os.path.abspath(export_dir), "source": metadata.get("source"),
                   "export_output_stride": metadata.get("output_stride")}
    return LoadedEncoder(encoder, encoder.config, "export", description)


def load_from_model_dir(model_dir: str, *, step: Optional[int] = None,
                        output_stride: Optional[int] = None) -> LoadedEncoder:
    """The online encoder of a pretraining ``model_dir`` (latest checkpoint or ``step``),
    by default at its pretraining output stride."""
    encoder, config, restored_step, path = saved_encoder.restore_encoder_from_model_dir(
        model_dir, step)
    encoder, config = saved_encoder.with_output_stride(encoder, config, output_stride)
    description = {"model_dir": os.path.abspath(model_dir), "checkpoint": path,
                   "step": None if restored_step is None else int(restored_step)}
    return LoadedEncoder(encoder, config, "model_dir", description)


def random_encoder(config: Dict[str, Any], *, seed: Optional[int] = None) -> LoadedEncoder:
    """A randomly initialised ResNet of ``config`` (baseline); ``seed`` makes it
    reproducible."""
    if seed is not None:
        keras.utils.set_random_seed(int(seed))
    encoder = resnet.build_encoder(dict(config, sync_batchnorm=False))
    return LoadedEncoder(encoder, encoder.config, RANDOM, {"random_seed": seed})


def load_encoder(source: str, *, encoder_config: Union[Dict[str, Any], str, None] = None,
                 step: Optional[int] = None, output_stride: Optional[int] = None,
                 seed: Optional[int] = None) -> LoadedEncoder:
    """Dispatches on ``source``: "random" (needs ``encoder_config``, anything
    :func:`encoder_config_from` reads), an export directory (has ``harl_export.json``) or a
    pretraining model_dir."""
    if source == RANDOM:
        if not encoder_config:
            raise ConfigError("--encoder=random needs --encoder_config (a JSON object such "
                              'as \'{"depth": 50}\', or an export directory to copy it from).')
        config = encoder_config_from(encoder_config)
        if output_stride is not None:
            config["output_stride"] = int(output_stride)
        return random_encoder(config, seed=seed)
    if not tf.io.gfile.isdir(source):
        raise MissingPathError(f"--encoder={source!r} is neither 'random' nor an existing "
                               "directory (an export directory or a pretraining model_dir).")
    if is_export_dir(source):
        return load_from_export(source, output_stride=output_stride)
    return load_from_model_dir(source, step=step, output_stride=output_stride)


def saved_model_layer(export_dir: str, *, trainable: bool = False) -> keras.layers.Layer:
    """The export's ``serving_default`` as a Keras layer: ``layer(images)`` ->
    {"embedding": [B, C], "feature_map": [B, h, w, C]}. BatchNorm stays in the mode it was
    exported with (inference unless exported with ``--batchnorm_training``)."""
    saved_encoder.read_metadata(export_dir)  # clear error when it is not an export
    return keras.layers.TFSMLayer(export_dir, call_endpoint=saved_encoder.SIGNATURE,
                                  trainable=trainable)
