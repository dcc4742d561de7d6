"""The encoder export: the contract every consumer of a pretrained encoder reads.

The pretrained ONLINE encoder f (no projector, predictor or target network) is exported by
``python -m harl_tf.export`` and read by the deep masks (:mod:`harl_tf.masks.deep`), the
downstream evaluation (:mod:`harl_tf.downstream`) and the weight conversion tools, so it
lives here, below all of them. An export directory holds:

====================  ==================================================================
``saved_model.pb``,   TensorFlow SavedModel. Signature ``serving_default``: input
``variables/``        ``images`` float32 ``[batch, height, width, 3]`` in ``[0, 1]`` (RGB,
                      any height and width; ImageNet normalisation happens inside) ->
                      ``embedding`` float32 ``[batch, C]`` (global average pool of the
                      feature map) and ``feature_map`` float32 ``[batch, h, w, C]``.
                      Variables keep their ``trainable`` flags (kernels, gamma, beta
                      trainable; BatchNorm moving statistics not), so the model can be
                      fine-tuned after ``tf.saved_model.load`` or through
                      ``keras.layers.TFSMLayer``.
                      Signature ``object_embeddings`` (HARL's object embedding): inputs
                      ``images`` as above and ``masks`` float32 ``[batch, height, width,
                      1]`` in ``[0, 1]`` (1 = foreground; the images' height and width)
                      -> ``foreground``, ``background``, ``global`` float32 ``[batch, C]``
                      and ``foreground_fraction`` float32 ``[batch]``
                      (:func:`region_embeddings`). The restored function
                      ``loaded.object_embeddings(images=..., masks=...)`` also takes
                      ``[batch, height, width]`` masks and uint8 ``{0, 1}`` masks.
``encoder.weights.h5``  Keras weights of :class:`harl_tf.models.resnet.ResNet`; rebuild
                      the encoder from ``harl_export.json`` and load them for Keras-native
                      fine-tuning (:mod:`harl_tf.downstream.encoder_source`).
``harl_export.json``  architecture config, input spec, normalisation, output stride,
                      source checkpoint path and step, versions (:data:`METADATA_FILE`).
``encoder.onnx``      optional (``onnx=True``), checked against TensorFlow with onnxruntime.
====================  ==================================================================

BatchNorm runs in inference mode in the serving signature (moving statistics) unless
``batchnorm_training=True``, in which case batch statistics are used (and the moving
statistics are updated on every call).

The output stride is chosen at export (SPEC section 3). By default it is the one the
encoder was pretrained at (its evaluation during training saw that feature map); another
stride is an explicit choice: the stride of the last stages only changes the sampling grid,
not the weight shapes, so an encoder pretrained at output stride 16 or 8 also exports as a
standard stride-32 one (``output_stride=32``), with a smaller feature map.

Writes are atomic (:mod:`harl_tf.atomic`): everything is written into a temporary sibling
directory which is renamed onto ``export_dir`` only when complete, so a half-written export
never looks like a complete one.
"""
from __future__ import annotations

import datetime
import json
import os
import platform
import time
from typing import Any, Dict, Optional

import keras
import numpy as np
import tensorflow as tf

import harl_tf
from harl_tf import atomic, checkpoints, onnx_export
from harl_tf.errors import DataError, HarlError
from harl_tf.models import pooling, resnet

METADATA_FILE = "harl_export.json"
WEIGHTS_FILE = "encoder.weights.h5"
ONNX_FILE = "encoder.onnx"
SIGNATURE = "serving_default"
INPUT_NAME = "images"
MASKED_SIGNATURE = "object_embeddings"
MASK_NAME = "masks"
FORMAT_VERSION = 1


class ExportError(HarlError):
    """An export cannot be written or read (names the directory and what is wrong)."""


class MaskError(DataError):
    """Masks that do not fit their images: another batch size, height or width (names
    both shapes), another rank, or values outside [0, 1]."""


def versions() -> Dict[str, str]:
    """Versions of the software that wrote an artifact."""
    return {"harl_tf": harl_tf.__version__, "tensorflow": tf.__version__,
            "keras": keras.__version__, "numpy": np.__version__,
            "python": platform.python_version()}


# Encoder manipulation ------------------------------------------------------------------------


def copy_weights(source: keras.Model, target: keras.Model) -> None:
    """Assigns every variable of ``source`` to the variable of ``target`` with the same
    path below the model name (e.g. ``layer4_0_conv2/kernel``); raises naming the
    variables that are missing or of another shape."""
    def by_path(model):
        return {v.path.split("/", 1)[1]: v for v in model.variables}
    src, dst = by_path(source), by_path(target)
    if set(src) != set(dst):
        raise ExportError(f"encoders differ: only in source {sorted(set(src) - set(dst))[:5]}, "
                          f"only in target {sorted(set(dst) - set(src))[:5]}.")
    for path, variable in dst.items():
        if tuple(variable.shape) != tuple(src[path].shape):
            raise ExportError(f"variable {path}: source shape {tuple(src[path].shape)}, "
                              f"target shape {tuple(variable.shape)}.")
        variable.assign(src[path])


def with_output_stride(encoder: keras.Model, config: Dict[str, Any],
                       output_stride: Optional[int]) -> tuple:
    """(encoder, config) with the requested output stride (``None`` keeps it).

    A new :class:`ResNet` is built when the stride changes and the weights are copied
    (they keep their shapes). Synchronised BatchNorm is switched off in the copy: it only
    matters while training across replicas.
    """
    config = dict(config)
    wanted = dict(config, sync_batchnorm=False)
    if output_stride is not None:
        wanted["output_stride"] = int(output_stride)
    if wanted == config:
        return encoder, config
    rebuilt = resnet.build_encoder(wanted)
    copy_weights(encoder, rebuilt)
    return rebuilt, wanted


def pooled(feature_map: tf.Tensor) -> tf.Tensor:
    """Global average pool: ``[B, h, w, C]`` -> ``[B, C]``."""
    return tf.reduce_mean(feature_map, axis=[1, 2])


def serving_function(encoder: keras.Model, *, batchnorm_training: bool = False):
    """The ``serving_default`` computation: ``images`` -> {"embedding", "feature_map"}."""
    def serve(images):
        feature_map = encoder(images, training=batchnorm_training)
        return {"embedding": pooled(feature_map), "feature_map": feature_map}
    return serve


INPUT_SIGNATURE = [tf.TensorSpec([None, None, None, 3], tf.float32, name=INPUT_NAME)]


# The object embedding: the feature map pooled over a mask ---------------------------------


def checked_masks(images: tf.Tensor, masks) -> tf.Tensor:
    """``masks`` ([B, H, W, 1] or [B, H, W], float or integer, values in [0, 1]) as
    float32 [B, H, W, 1], checked against ``images`` [B, H, W, 3].

    Where the shapes are static (eager calls) a batch size, height or width that differs
    from the images' is a :class:`MaskError` naming both shapes, and so are values outside
    [0, 1] (a 0/255 mask); inside a graph of unknown sizes (the served signature) the same
    checks are ``tf.debugging`` assertions with the same message.
    """
    masks = tf.convert_to_tensor(masks)
    layout = "masks must be [batch, height, width] or [batch, height, width, 1]"
    size = ("masks must have the batch size, height and width of the images (masks "
            "[B, H, W, 1] or [B, H, W] for images [B, H, W, 3])")
    values = "masks must hold values in [0, 1] (1 = foreground); divide a 0/255 mask by 255"
    rank = masks.shape.rank
    if rank == 3:
        masks = masks[..., tf.newaxis]
    elif rank is not None and (rank != 4 or masks.shape[-1] not in (1, None)):
        raise MaskError(f"{layout}, got shape {masks.shape}.")
    if masks.shape.rank is not None:
        known = masks.shape[:3].is_fully_defined() and images.shape[:3].is_fully_defined()
        if known and masks.shape[:3] != images.shape[:3]:
            raise MaskError(f"{size}; got masks {masks.shape} for images {images.shape}.")
    masks = tf.cast(masks, tf.float32)
    if tf.executing_eagerly():
        if tf.size(masks) > 0 and not (tf.reduce_min(masks) >= 0.0
                                       and tf.reduce_max(masks) <= 1.0):
            raise MaskError(values + ".")
        return masks
    checks = []
    if rank is None:  # the restored function's any-rank trace
        shape = tf.shape(masks)
        checks.append(tf.debugging.Assert(
            tf.logical_and(tf.logical_or(tf.rank(masks) == 3, tf.rank(masks) == 4),
                           tf.size(masks) == tf.reduce_prod(shape[:3])),
            [layout + "; got shape", shape]))
        with tf.control_dependencies(checks):
            masks = tf.reshape(masks, tf.concat([shape[:3], [1]], axis=0))
        masks.set_shape([None, None, None, 1])
    checks += [tf.debugging.assert_equal(
                   tf.shape(masks)[:3], tf.shape(images)[:3],
                   message=f"{size}; [B, H, W] of the masks (x) and of the images (y):"),
               tf.debugging.assert_greater_equal(masks, 0.0, message=values),
               tf.debugging.assert_less_equal(masks, 1.0, message=values)]
    with tf.control_dependencies(checks):
        return tf.identity(masks)


def region_embeddings(feature_map: tf.Tensor, masks: tf.Tensor) -> Dict[str, tf.Tensor]:
    """HARL's pooled regions of a feature map (SPEC section 4, :mod:`harl_tf.models.pooling`).

    The mask is area-averaged to the feature grid, m ∈ [0, 1]^{h×w}, then
    h_fg = Σ h·m / (Σ m + ε), h_bg = Σ h·(1 − m) / (Σ (1 − m) + ε), h_glob = mean of h.

    Args:
      feature_map: [B, h, w, C] (any float dtype; pooled in float32).
      masks: float32 [B, H, W, 1] in [0, 1] at image resolution (:func:`checked_masks`).
    Returns:
      {"foreground", "background", "global": float32 [B, C], "foreground_fraction":
      float32 [B], the area fraction (1/hw) Σ m}. An empty region pools to the zero vector
      (foreground_fraction 0 or 1 says which).
    """
    size = tuple(feature_map.shape[1:3])
    if None in size:  # served at any image size
        size = (tf.shape(feature_map)[1], tf.shape(feature_map)[2])
    soft = pooling.downsample_mask(masks, size)
    return {"foreground": pooling.foreground_pool(feature_map, soft),
            "background": pooling.background_pool(feature_map, soft),
            "global": pooling.global_pool(feature_map),
            "foreground_fraction": tf.reduce_mean(soft, axis=[1, 2, 3])}


def object_embeddings(encoder: keras.Model, images, masks, *,
                      training: bool = False) -> Dict[str, tf.Tensor]:
    """``encoder(images)`` pooled over ``masks`` (:func:`region_embeddings`); ``images``
    float32 [B, H, W, 3] in [0, 1], ``masks`` as :func:`checked_masks` takes them. The
    computation of the export's ``object_embeddings`` signature."""
    images = tf.convert_to_tensor(images, tf.float32)
    masks = checked_masks(images, masks)
    return region_embeddings(encoder(images, training=training), masks)


MASKED_INPUT_SIGNATURE = [
    tf.TensorSpec([None, None, None, 3], tf.float32, name=INPUT_NAME),
    tf.TensorSpec([None, None, None, 1], tf.float32, name=MASK_NAME)]
# Also traced for the restored function: masks of any rank (3 or 4), float32 or uint8 (a
# signature has a single spec).
_OTHER_MASK_SPECS = [tf.TensorSpec(None, tf.float32), tf.TensorSpec(None, tf.uint8)]


def saved_model_root(encoder: keras.Model, serve, *,
                     batchnorm_training: bool = False
                     ) -> tf.__internal__.tracking.AutoTrackable:
    """The object written by ``tf.saved_model.save``: the encoder, its variable lists (as
    Keras' ExportArchive has them, so ``loaded.trainable_variables`` works after
    ``tf.saved_model.load``), the ``serving_default`` tf.function and the
    ``object_embeddings`` one (traced for float32 / uint8 masks with and without the
    channel axis)."""
    root = tf.__internal__.tracking.AutoTrackable()
    root.encoder = encoder
    root.variables = list(encoder.variables)
    root.trainable_variables = list(encoder.trainable_variables)
    root.non_trainable_variables = list(encoder.non_trainable_variables)
    root.serving_default = tf.function(serve, input_signature=INPUT_SIGNATURE)

    def masked(images, masks):
        return object_embeddings(encoder, images, masks, training=batchnorm_training)
    root.object_embeddings = tf.function(masked)
    root.object_embeddings.get_concrete_function(*MASKED_INPUT_SIGNATURE)
    for spec in _OTHER_MASK_SPECS:
        root.object_embeddings.get_concrete_function(MASKED_INPUT_SIGNATURE[0], spec)
    return root


def signatures_of(root) -> Dict[str, Any]:
    """The SavedModel signatures of a :func:`saved_model_root`."""
    return {SIGNATURE: root.serving_default,
            MASKED_SIGNATURE: root.object_embeddings.get_concrete_function(
                *MASKED_INPUT_SIGNATURE)}


# Export --------------------------------------------------------------------------------------


def export_encoder(encoder: keras.Model, export_dir: str, *,
                   encoder_config: Dict[str, Any], output_stride: Optional[int] = None,
                   batchnorm_training: bool = False, overwrite: bool = False,
                   source: Optional[Dict[str, Any]] = None, onnx: bool = False,
                   onnx_opset: int = 17) -> Dict[str, Any]:
    """Writes ``encoder`` to ``export_dir`` (see the module docstring); returns the
    metadata written to ``harl_export.json``.

    Args:
      encoder: a built :class:`ResNet`.
      export_dir: target directory; must not exist unless ``overwrite``.
      encoder_config: the encoder's ``.config``.
      output_stride: output stride of the exported encoder: ``None`` (default) keeps the
        pretraining one; 32, 16 or 8 converts it.
      batchnorm_training: serve with BatchNorm in training mode (batch statistics).
      source: where the weights came from (``model_dir``, ``checkpoint``, ``step``).
      onnx: also write ``encoder.onnx`` and check it with onnxruntime (needs the
        ``onnx`` extra: tf2onnx and onnxruntime).
    """
    export_dir = os.path.abspath(export_dir)
    if os.path.exists(export_dir) and not overwrite:
        raise ExportError(f"--export_dir={export_dir} already exists; choose another "
                          "directory or pass --overwrite to replace it.")
    if onnx:
        onnx_export.require_onnx()  # fail before the slow part
    pretrain_stride = encoder_config.get("output_stride")
    encoder, config = with_output_stride(encoder, encoder_config, output_stride)
    serve = serving_function(encoder, batchnorm_training=batchnorm_training)
    metadata = {
        "format": "harl-tf encoder export",
        "format_version": FORMAT_VERSION,
        "encoder_config": config,
        "feature_dim": int(encoder.feature_dim),
        "total_stride": int(encoder.total_stride),
        "output_stride": int(config["output_stride"]),
        "pretrain_output_stride": pretrain_stride,
        "signature": SIGNATURE,
        "inputs": {INPUT_NAME: {"dtype": "float32", "shape": [None, None, None, 3],
                                "range": [0.0, 1.0], "layout": "NHWC", "channels": "RGB"}},
        "outputs": {"embedding": {"dtype": "float32", "shape": [None, encoder.feature_dim],
                                  "pooling": "global average"},
                    "feature_map": {"dtype": "float32",
                                    "shape": [None, None, None, encoder.feature_dim]}},
        MASKED_SIGNATURE: {  # inputs: images as above, masks [B, H, W, 1] in [0, 1]
            "inputs": {MASK_NAME: {"dtype": "float32", "shape": [None, None, None, 1],
                                   "range": [0.0, 1.0], "foreground": 1}},
            "outputs": ["foreground", "background", "global", "foreground_fraction"],
            "pooling": "m = mask area-averaged to the feature grid; foreground = "
                       "sum(h*m) / (sum(m) + 1e-6), background with 1 - m, global = mean(h)"},
        "normalization": {"mean": list(resnet.IMAGENET_MEAN), "std": list(resnet.IMAGENET_STD),
                          "applied_inside": True,
                          "note": "feed [0, 1] RGB images; do not normalise"},
        "batchnorm_training": bool(batchnorm_training),
        "weights_file": WEIGHTS_FILE,
        "source": dict(source or {}),
        "versions": versions(),
        "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    }
    with atomic.atomic_directory(export_dir, overwrite=overwrite) as tmp:
        root = saved_model_root(encoder, serve, batchnorm_training=batchnorm_training)
        tf.saved_model.save(root, tmp, signatures=signatures_of(root))
        encoder.save_weights(os.path.join(tmp, WEIGHTS_FILE))
        if onnx:
            metadata["onnx"] = onnx_export.export_onnx(
                serve, os.path.join(tmp, ONNX_FILE), opset=onnx_opset)
            metadata["onnx"]["file"] = ONNX_FILE
        atomic.write_json_atomic(os.path.join(tmp, METADATA_FILE), metadata)
    return metadata


def restore_encoder_from_model_dir(model_dir: str, step: Optional[int] = None):
    """``(encoder, config, step, checkpoint_path)`` of the online encoder in a pretraining
    ``model_dir`` (the latest complete checkpoint, or ``step``).

    Pretraining may be writing a new checkpoint at the same time. The checkpoint state
    file's latest pointer only ever names complete checkpoints (``harl_tf.checkpoints``),
    and when the files of the checkpoint we picked vanish under us (the manager deleted it
    after a newer save) we look up the latest pointer again and retry once.
    """
    if not tf.io.gfile.isdir(model_dir):
        raise ExportError(f"--model_dir={model_dir} does not exist (expected a pretraining "
                          "model_dir with model_config.json and checkpoints/).")
    for attempt in range(2):
        try:
            path = checkpoints.find_checkpoint(model_dir, step)
            encoder, config, restored_step = checkpoints.restore_online_encoder(
                model_dir, step=checkpoints.checkpoint_step(path))
            return encoder, config, restored_step, path
        except (tf.errors.NotFoundError, FileNotFoundError, ValueError) as e:
            vanished = isinstance(e, tf.errors.NotFoundError)
            if attempt == 0 and vanished and step is None:
                time.sleep(0.5)
                continue
            raise ExportError(f"--model_dir={model_dir}: cannot restore a pretraining "
                              f"checkpoint: {getattr(e, 'message', None) or e}") from None
    raise AssertionError("unreachable")


def export_from_model_dir(model_dir: str, export_dir: str, *, step: Optional[int] = None,
                          output_stride: Optional[int] = None,
                          batchnorm_training: bool = False,
                          overwrite: bool = False, onnx: bool = False) -> Dict[str, Any]:
    """Restores the online encoder of a pretraining ``model_dir`` (latest checkpoint or
    ``step``) and exports it with :func:`export_encoder`; returns the metadata."""
    export_dir = os.path.abspath(export_dir)
    if os.path.exists(export_dir) and not overwrite:  # before the restore
        raise ExportError(f"--export_dir={export_dir} already exists; choose another "
                          "directory or pass --overwrite to replace it.")
    encoder, config, restored_step, path = restore_encoder_from_model_dir(model_dir, step)
    source = {"model_dir": os.path.abspath(model_dir), "checkpoint": path,
              "step": None if restored_step is None else int(restored_step)}
    return export_encoder(encoder, export_dir, encoder_config=config,
                          output_stride=output_stride, batchnorm_training=batchnorm_training,
                          overwrite=overwrite, source=source, onnx=onnx)


def read_metadata(export_dir: str) -> Dict[str, Any]:
    """The ``harl_export.json`` of an export directory (clear error when absent)."""
    path = os.path.join(export_dir, METADATA_FILE)
    if not tf.io.gfile.exists(path):
        raise ExportError(f"{export_dir} is not a harl-tf export: {METADATA_FILE} is missing "
                          "(write one with python -m harl_tf.export).")
    with tf.io.gfile.GFile(path) as f:
        metadata = json.load(f)
    if metadata.get("format_version") != FORMAT_VERSION:
        raise ExportError(f"{path}: format_version {metadata.get('format_version')!r}, this "
                          f"code reads {FORMAT_VERSION}.")
    return metadata
