"""Dense evaluation: semantic segmentation on a pretrained (or random) encoder.

What ``python -m harl_tf.finetune --mode=segmentation`` runs. A record of
:mod:`harl_tf.data.schema` holds one labelled object: a binary mask (0 = background, 255 =
the object) and the image's class label. Its target has ``num_classes + 1`` classes:

    target[y, x] = label + 1   where mask[y, x] = 1 (the object),
                   0           elsewhere (background).

Binary masks only: the schema stores one 0/255 mask per image and nothing in a record
says that a mask holds per-pixel class ids instead, so several labelled objects in one
image cannot be expressed. Records without a mask are a ``subsets.MissingMasksError``
naming the flag, the file and a record id; the results name the splits' mask methods
(a score against heuristic masks measures agreement with the heuristic).

Two protocols, by ``--segmentation_head``:

- ``probe``: the frozen encoder (BatchNorm in inference mode) and a 1×1 convolution on
  its feature map (MaskContrast's probe), after a per-channel standardisation
  (BatchNorm without scale and offset, as MAE's linear probe), so that one learning
  rate probes encoders whose feature scales differ.
- ``fcn`` / ``aspp``: a light decoder trained together with the encoder (BatchNorm in
  training mode): two 3×3 convolutions (FCN), or a DeepLabv3 ASPP head whose atrous
  rates are DeepLabv3's (6, 12, 18 on a 33×33 map) scaled to this feature map's side.

Every head's logits ``[B, h, w, K]`` are upsampled bilinearly to the image ``[B, S, S,
K]`` and trained with per-pixel softmax cross-entropy (SGD, Nesterov, cosine decay, as
:mod:`linear`) on random crops + flips of image and mask. Evaluation: centre crops, the
argmax class per pixel, one confusion matrix over the whole split
(:mod:`segmentation_metrics`): mean IoU over the background and the object classes
(classes absent from both targets and predictions of the split left out), per-class IoU,
pixel accuracy.
"""
from __future__ import annotations

import dataclasses
import logging
import math
import os
import time
from typing import Any, Dict, Optional, Sequence

import keras
import numpy as np
import tensorflow as tf

from harl_tf import atomic, saved_encoder
from harl_tf.data import pipeline
from harl_tf.downstream import encoder_source, linear, subsets
from harl_tf.downstream.segmentation_metrics import confusion_matrix, segmentation_scores
from harl_tf.eval_config import SEGMENTATION_HEADS as HEADS
from harl_tf.eval_config import (EVAL_BACKGROUNDS, RESULTS_FILE, SHIFTED_EVAL_DIR,
                                 TRAIN_IDS_FILE, EvaluationConfig, extra_scores)
from harl_tf.progress import keras_verbose, progress

DECODER_CHANNELS = 256            # width of the fcn / aspp decoder (DeepLabv3's)
DEEPLAB_RATES, DEEPLAB_MAP_SIDE = (6, 12, 18), 33  # DeepLabv3: 513 px at output stride 16
EXACT_MASK_METHODS = ("ground_truth", "given")  # the builder's names for masks it was given
def segmentation_target(mask: tf.Tensor, label: tf.Tensor) -> tf.Tensor:
    """``mask`` {0, 1} ``[..., H, W, 1]`` (any numeric dtype), ``label`` int ``[...]`` ->
    int32 ``[..., H, W]``: ``label + 1`` inside the mask, 0 (background) outside."""
    inside = tf.cast(mask[..., 0] > 0, tf.int32)
    return inside * (tf.cast(label, tf.int32)[..., tf.newaxis, tf.newaxis] + 1)


def _with_targets(dataset: tf.data.Dataset) -> tf.data.Dataset:
    """Batches of {"image", "mask", "label", ...} -> {"image", "target" int32 [B, S, S]}."""
    return dataset.map(lambda b: {"image": b["image"],
                                  "target": segmentation_target(b["mask"], b["label"])})


def train_segmentation_dataset(file_pattern: str, batch_size: int, image_size: int, *,
                               seed: int, crop_area=(0.08, 1.0)) -> tf.data.Dataset:
    """Endless training batches {"image" [B, S, S, 3], "target" int32 [B, S, S]}: the
    random crop + flip of ``pipeline.train_classifier_dataset``, the mask cut with the
    image's window and coin (nearest neighbour)."""
    return _with_targets(pipeline.train_classifier_dataset(
        file_pattern, batch_size, image_size, seed=seed, crop_area=crop_area,
        with_mask=True))


def eval_segmentation_dataset(file_pattern: str, batch_size: int, image_size: int, *,
                              crop_fraction: float = 0.875) -> tf.data.Dataset:
    """One pass, in file order: the centre crops of ``pipeline.eval_dataset`` with their
    targets, {"image" [B, S, S, 3], "target" int32 [B, S, S]}."""
    return _with_targets(pipeline.eval_dataset(file_pattern, batch_size, image_size,
                                               crop_fraction=crop_fraction, with_mask=True))


def aspp_rates(map_side: int) -> Sequence[int]:
    """DeepLabv3's atrous rates scaled to a feature map of side ``map_side``:
    ``max(1, round(r · map_side / 33))`` for r in (6, 12, 18) (e.g. 8 -> (1, 3, 4)),
    so each branch sees the same share of the map as in DeepLabv3."""
    return tuple(max(1, round(r * map_side / DEEPLAB_MAP_SIDE)) for r in DEEPLAB_RATES)


def _conv_bn_relu(channels: int, kernel: int, name: str, dilation: int = 1):
    return keras.Sequential([
        keras.layers.Conv2D(channels, kernel, padding="same", dilation_rate=dilation,
                            use_bias=False, name="conv"),
        keras.layers.BatchNormalization(name="bn"),
        keras.layers.ReLU()], name=name)


class ASPP(keras.layers.Layer):
    """DeepLabv3's atrous spatial pyramid pooling: a 1×1 branch, one 3×3 branch per rate,
    and global average pooling (1×1 conv, broadcast back), concatenated and fused by a
    1×1 conv; each conv followed by BatchNorm and ReLU. ``[B, h, w, C] -> [B, h, w, D]``."""

    def __init__(self, rates: Sequence[int], channels: int = DECODER_CHANNELS, **kwargs):
        super().__init__(**kwargs)
        self.rates = tuple(int(r) for r in rates)
        self.branches = [_conv_bn_relu(channels, 1, "branch_1x1")] + [
            _conv_bn_relu(channels, 3, f"branch_rate{r}_{i}", dilation=r)
            for i, r in enumerate(self.rates)]
        self.pooled = _conv_bn_relu(channels, 1, "image_pooling")
        self.fuse = _conv_bn_relu(channels, 1, "fuse")

    def call(self, features, training=None):
        outputs = [branch(features, training=training) for branch in self.branches]
        pooled = self.pooled(tf.reduce_mean(features, axis=[1, 2], keepdims=True),
                             training=training)
        outputs.append(tf.broadcast_to(pooled, tf.concat(
            [tf.shape(features)[:3], tf.shape(pooled)[3:]], axis=0)))
        return self.fuse(tf.concat(outputs, axis=-1), training=training)


class SegmentationModel(keras.Model):
    """``logits [B, S, S, K] = upsample_bilinear(head(encoder(images)))``, K =
    ``num_segmentation_classes`` (background included).

    ``head``: ``probe`` (frozen encoder, standardisation + 1×1 conv), ``fcn`` or ``aspp``
    (trained with the encoder; see the module docstring). ``map_side``: the encoder's
    feature-map side at the training image size (sets the ASPP rates)."""

    def __init__(self, encoder: keras.Model, num_segmentation_classes: int, *,
                 head: str = "probe", map_side: int = 8, name: str = "segmentation",
                 **kwargs):
        super().__init__(name=name, **kwargs)
        if head not in HEADS:
            raise ValueError(f"--segmentation_head must be one of {HEADS}, got {head!r}.")
        self.encoder = encoder
        self.head_kind = head
        self.freeze_encoder = head == "probe"
        self.encoder.trainable = not self.freeze_encoder
        if head == "probe":
            decoder = [keras.layers.BatchNormalization(center=False, scale=False,
                                                       name="standardize")]
        elif head == "fcn":
            decoder = [_conv_bn_relu(DECODER_CHANNELS, 3, f"fcn_conv{i}") for i in (1, 2)]
        else:
            decoder = [ASPP(aspp_rates(map_side), name="aspp")]
        self.decoder = decoder
        self.classifier = keras.layers.Conv2D(num_segmentation_classes, 1,
                                              kernel_initializer="zeros", name="classifier")

    def call(self, images, training=None):
        features = self.encoder(images, training=False if self.freeze_encoder else training)
        for layer in self.decoder:
            features = layer(features, training=training)
        logits = self.classifier(features)
        return tf.image.resize(logits, tf.shape(images)[1:3], method="bilinear")


def fit_segmentation(model: SegmentationModel, train_dataset: tf.data.Dataset, *,
                     image_size: int, epochs: int, steps_per_epoch: int,
                     learning_rate: float, momentum: float = 0.9, weight_decay: float = 0.0,
                     output_dir: Optional[str] = None,
                     verbose: int = 1) -> keras.callbacks.History:
    """Trains ``model`` (created under its strategy's scope) with per-pixel softmax
    cross-entropy (mean over pixels) on batches of {"image", "target"}
    (:func:`train_segmentation_dataset`). With ``output_dir``: epoch metrics
    (``metrics.csv``, TensorBoard when installed), per-epoch backup (resume), final
    ``segmentation.weights.h5``."""
    with model.distribute_strategy.scope():
        model(tf.zeros([1, image_size, image_size, 3]))  # variables before BackupAndRestore
        model.compile(
            optimizer=linear.sgd(learning_rate, steps_per_epoch * epochs, momentum=momentum,
                                 weight_decay=weight_decay),
            loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
            metrics=[keras.metrics.SparseCategoricalAccuracy(name="pixel_accuracy")])
    pairs = train_dataset.map(lambda b: (b["image"], b["target"]))
    history = model.fit(pairs, epochs=epochs, steps_per_epoch=steps_per_epoch,
                        shuffle=False,  # the input pipeline shuffles
                        callbacks=linear.training_callbacks(output_dir),
                        verbose=verbose)
    if output_dir:
        model.save_weights(os.path.join(output_dir, "segmentation.weights.h5"))
    return history


def evaluation_confusion(model: keras.Model, dataset: tf.data.Dataset,
                         num_segmentation_classes: int, *, desc: str = "evaluate"):
    """``(C [K, K] int64, images)``: the confusion matrix of the per-pixel argmax of
    ``model`` (inference mode) against the targets, summed over every batch of
    ``dataset`` ({"image", "target"}, one pass), and the number of images."""
    @tf.function(reduce_retracing=True)
    def predict(images):
        return tf.argmax(model(images, training=False), axis=-1, output_type=tf.int32)

    confusion = np.zeros((num_segmentation_classes,) * 2, np.int64)
    images = 0
    for batch in progress(dataset, desc=desc, unit=" batches", leave=False):
        confusion += confusion_matrix(batch["target"].numpy(),
                                      predict(batch["image"]).numpy(),
                                      num_segmentation_classes)
        images += int(batch["target"].shape[0])
    return confusion, images


def evaluate(config: EvaluationConfig, strategy: tf.distribute.Strategy, *,
             train_files: str, eval_sets: Dict[str, str], num_classes: int, num_train: int,
             started: float) -> Dict[str, Any]:
    """Trains the ``config.segmentation_head`` protocol on ``train_files`` and scores it on
    each of ``eval_sets`` (eval background name -> file pattern); writes and returns the
    results (``output_dir/results.json``, atomically). ``num_classes``: object classes
    (labels ``0 .. num_classes − 1``); ``num_train``: training images. Called by
    ``evaluation.evaluate``, which has read the labels, chosen the label subset and
    written any shifted evaluation records."""
    why = ("--mode=segmentation takes its targets from each record's object mask. Rebuild "
           "the records with masks (tools/build_tfrecords.py).")
    mask_methods = {"train": subsets.read_mask_methods(train_files, flag="train_files",
                                                       why=why)}
    for name, files in eval_sets.items():
        mask_methods[name] = subsets.read_mask_methods(files, flag="eval_files", why=why)
        heuristic = sorted(set(mask_methods[name]) - set(EXACT_MASK_METHODS))
        if heuristic:  # a score against a heuristic is agreement with it, not accuracy
            logging.warning("--eval_files: masks made by %s, not given ones: the scores "
                            "measure agreement with those masks.", ", ".join(heuristic))
    with strategy.scope():
        source = encoder_source.load_encoder(
            config.encoder, encoder_config=config.encoder_config, step=config.step,
            output_stride=config.output_stride, seed=config.seed)
        keras.utils.set_random_seed(config.seed)  # the decoder's initial weights
        map_side = math.ceil(config.image_size / source.encoder.total_stride)
        model = SegmentationModel(source.encoder, num_classes + 1,
                                  head=config.segmentation_head, map_side=map_side)
    train_dataset = train_segmentation_dataset(
        train_files, config.batch_size, config.image_size, seed=config.seed,
        crop_area=(config.min_crop_area, 1.0))
    steps_per_epoch = max(1, num_train // config.batch_size)
    fit_segmentation(model, train_dataset, image_size=config.image_size,
                     epochs=config.epochs, steps_per_epoch=steps_per_epoch,
                     learning_rate=config.learning_rate, momentum=config.momentum,
                     weight_decay=config.weight_decay, output_dir=config.output_dir,
                     verbose=keras_verbose(config.verbose))
    scores: Dict[str, Dict[str, Any]] = {}
    for name, files in eval_sets.items():
        confusion, num_eval = evaluation_confusion(
            model, eval_segmentation_dataset(
                files, config.eval_batch_size, config.image_size,
                crop_fraction=config.crop_fraction),
            num_classes + 1, desc=f"evaluate ({name})")
        scores[name] = dict(segmentation_scores(confusion),
                            confusion_matrix=confusion.tolist(), num_eval=num_eval)
    metrics = scores["original" if "original" in scores else "mixed_rand"]

    decoder: Dict[str, Any] = {"head": config.segmentation_head,
                               "encoder_trainable": not model.freeze_encoder,
                               "feature_map_side": map_side}
    if config.segmentation_head != "probe":
        decoder["channels"] = DECODER_CHANNELS
    if config.segmentation_head == "aspp":
        decoder["aspp_rates"] = list(aspp_rates(map_side))
    results = {
        "mode": config.mode,
        "segmentation_head": config.segmentation_head,
        "mean_iou": metrics["mean_iou"],
        "pixel_accuracy": metrics["pixel_accuracy"],
        "per_class_iou": metrics["per_class_iou"],
        "classes_in_mean": metrics["classes_in_mean"],
        "confusion_matrix": metrics["confusion_matrix"],
        "class_index": "0 = background, label + 1 = the object of that label; IoU null "
                       "(and out of the mean) for a class absent from targets and "
                       "predictions; confusion rows = targets, columns = predictions",
        "num_classes": num_classes,
        "num_train": int(num_train),
        "num_eval": metrics["num_eval"],
        "num_eval_pixels": metrics["num_pixels"],
        "label_fraction": config.label_fraction,
        "train_ids_file": TRAIN_IDS_FILE,
        "mask_methods": mask_methods,
        "encoder": {"kind": source.kind, "config": source.config, **source.description},
        "details": {"training": "random crop + flip of image and mask, per-pixel softmax "
                                "cross-entropy", "evaluation": "centre crop, logits "
                                "upsampled bilinearly, argmax per pixel",
                    "steps_per_epoch": steps_per_epoch, **decoder},
        "weight_decay": config.weight_decay,
        "background": _background_summary(config, scores),
        "extra_eval": extra_scores(config, scores),
        "config": dataclasses.asdict(config),
        "seconds": round(time.time() - started, 1),
        "versions": saved_encoder.versions(),
    }
    atomic.write_json_atomic(os.path.join(config.output_dir, RESULTS_FILE),
                             results)
    return results


def _background_summary(config: EvaluationConfig,
                        scores: Dict[str, Dict[str, Any]]) -> Optional[Dict[str, Any]]:
    """None for the original records only; else each background's mean IoU and pixel
    accuracy and, with both, ``gap_mean_iou = original − mixed_rand``."""
    if config.eval_background == "original":
        return None
    summary: Dict[str, Any] = {"eval_background": config.eval_background,
                               "seed": config.background_seed,
                               "shifted_eval_dir": SHIFTED_EVAL_DIR}
    for name, values in scores.items():
        if name in EVAL_BACKGROUNDS:
            summary[name] = {k: values[k] for k in ("mean_iou", "pixel_accuracy",
                                                    "per_class_iou")}
    if "original" in scores and "mixed_rand" in scores:
        summary["gap_mean_iou"] = (scores["original"]["mean_iou"]
                                   - scores["mixed_rand"]["mean_iou"])
    return summary

