"""Supervised heads on a pretrained encoder: linear probe and full fine-tuning (SPEC §8).

Two ways to train a linear probe on the frozen encoder (BatchNorm in inference mode):

- **precomputed** (the default, and the fast one on CPU): the pooled features of the
  centre-cropped images are computed once (:func:`extract_features`) and a linear
  classifier is trained on them (:func:`train_linear_on_features`). No augmentation.
  This is also the transfer protocol of BYOL (logistic regression on frozen features).
  The features are standardised per channel with the train split's mean and standard
  deviation (fixed, part of the saved model, as MAE's BatchNorm-without-affine probe), so
  one learning rate probes encoders whose feature scales differ by orders of magnitude
  (a random-init encoder and a pretrained one, or two pretraining methods) equally.
- **augmented** (the ImageNet linear-evaluation protocol of BYOL / SimCLR): a
  :class:`Classifier` with a frozen encoder is trained on random crops + flips
  (``pipeline.train_classifier_dataset``) and evaluated on centre crops.

Full fine-tuning (semi-supervised 1 % / 10 %, transfer fine-tuning) trains the same
:class:`Classifier` with a trainable encoder (BatchNorm in training mode).

Optimiser everywhere: SGD with Nesterov momentum 0.9 and a cosine-decayed learning rate
(no warm-up), optional decoupled weight decay. The classifier is ``logits = W x + b``
on the pooled feature map x ``[B, C]``: its global average, or (``embedding``) its
foreground or background pooled over the records' masks (:func:`pooled_embedding`).
"""
from __future__ import annotations

import dataclasses
import logging
import math
import os
from typing import Dict, Optional, Sequence, Tuple

import keras
import numpy as np
import tensorflow as tf

from harl_tf import saved_encoder
from harl_tf.errors import DataError
from harl_tf.eval_config import EMBEDDINGS
from harl_tf.progress import progress


def topk_accuracy(scores: np.ndarray, labels: np.ndarray,
                  ks: Sequence[int] = (1, 5)) -> Dict[str, float]:
    """Fraction of rows whose true class is among the k highest scores.

    A row counts as correct at k when fewer than k classes score strictly higher than the
    true class. ``scores`` ``[N, num_classes]``, ``labels`` ``[N]`` -> ``{"top1": ..,
    "top5": ..}`` (k larger than the number of classes is always correct).
    """
    scores = np.asarray(scores)
    labels = np.asarray(labels, np.int64)
    if len(scores) == 0:
        raise ValueError("topk_accuracy: no examples to evaluate.")
    true = scores[np.arange(len(scores)), labels][:, None]
    rank = np.sum(scores > true, axis=1)  # 0 = best
    return {f"top{k}": float(np.mean(rank < k)) for k in ks}


@dataclasses.dataclass
class Features:
    """Pooled features ``[N, C]`` float32, labels ``[N]`` int64 and ids ``[N]`` str;
    ``region_fractions`` ``[N]``: the area fraction of the pooled mask region (foreground
    or background embeddings; None for global ones), 0 where the region is empty."""
    features: np.ndarray
    labels: np.ndarray
    ids: np.ndarray
    region_fractions: Optional[np.ndarray] = None

    def __len__(self):
        return len(self.labels)


def check_embedding(embedding: str) -> None:
    """ValueError naming --embedding unless it is one of ``eval_config.EMBEDDINGS``."""
    if embedding not in EMBEDDINGS:
        raise ValueError(f"--embedding must be one of {', '.join(EMBEDDINGS)}; got "
                         f"{embedding!r}.")


def pooled_embedding(feature_map: tf.Tensor, masks: Optional[tf.Tensor],
                     embedding: str = "global") -> Tuple[tf.Tensor, Optional[tf.Tensor]]:
    """``(features [B, C], region fraction [B] or None)`` of a feature map ``[B, h, w, C]``.

    ``global``: the mean over all positions. ``foreground`` / ``background``: HARL's
    pooling over ``masks`` float32 ``[B, H, W, 1]`` in [0, 1] at image resolution
    (:func:`harl_tf.saved_encoder.region_embeddings`: m = the mask area-averaged to the
    feature grid, Σ h·m / (Σ m + ε), and 1 − m for the background); the fraction is the
    region's area, (1/hw) Σ m or 1 − that.
    """
    check_embedding(embedding)
    if embedding == "global":
        return tf.reduce_mean(feature_map, axis=[1, 2]), None
    if masks is None:
        raise ValueError(f"--embedding={embedding} pools over masks, but the batches have "
                         "none (make them with with_mask=True).")
    regions = saved_encoder.region_embeddings(feature_map, masks)
    fraction = regions["foreground_fraction"]
    return regions[embedding], fraction if embedding == "foreground" else 1.0 - fraction


def extract_features(encoder: keras.Model, dataset: tf.data.Dataset, *,
                     desc: str = "features", embedding: str = "global") -> Features:
    """Pooled features (:func:`pooled_embedding`) of every batch of ``dataset`` ({"image",
    "label", "id"} and, for a foreground or background ``embedding``, "mask", as
    ``pipeline.eval_dataset``), with the encoder in inference mode."""
    @tf.function(reduce_retracing=True)
    def embed(images, masks):
        return pooled_embedding(encoder(images, training=False), masks, embedding)

    check_embedding(embedding)
    features, labels, ids, fractions = [], [], [], []
    for batch in progress(dataset, desc=desc, unit=" batches", leave=False):
        pooled, fraction = embed(batch["image"], batch.get("mask"))
        features.append(pooled.numpy())
        if fraction is not None:
            fractions.append(fraction.numpy())
        labels.append(batch["label"].numpy())
        ids.append(batch["id"].numpy() if "id" in batch else
                   np.full(len(labels[-1]), b""))
    if not features:
        raise DataError(f"{desc}: the dataset is empty.")
    return Features(np.concatenate(features).astype(np.float32),
                    np.concatenate(labels).astype(np.int64),
                    np.asarray([i.decode() for i in np.concatenate(ids)], dtype=object),
                    np.concatenate(fractions) if fractions else None)


class Classifier(keras.Model):
    """``logits = Dense(num_classes)(pooled(encoder(images)))``, pooled as
    :func:`pooled_embedding` with ``embedding`` (global: the mean of the feature map; a
    foreground or background embedding takes ``(images, masks)`` as its input, see
    :meth:`inputs_of`, and the gradient flows through the mask pooling into the encoder).

    With ``freeze_encoder`` the encoder's weights are not trained and it always runs in
    inference mode (linear probe); otherwise it is fine-tuned with BatchNorm in training
    mode.
    """

    def __init__(self, encoder: keras.Model, num_classes: int, *,
                 freeze_encoder: bool = True, embedding: str = "global",
                 name: str = "classifier", **kwargs):
        super().__init__(name=name, **kwargs)
        check_embedding(embedding)
        self.encoder = encoder
        self.freeze_encoder = bool(freeze_encoder)
        self.embedding = embedding
        self.encoder.trainable = not self.freeze_encoder
        self.head = keras.layers.Dense(num_classes, kernel_initializer="zeros", name="head")

    def inputs_of(self, batch):
        """The model's input from a batch {"image", "mask", ...}: the images, or
        ``(images, masks)`` for a foreground or background embedding."""
        if self.embedding == "global":
            return batch["image"]
        return batch["image"], batch["mask"]

    def build(self, input_shape=(None, None, None, 3)):
        """Creates the head's variables (the encoder is built already)."""
        if self.built:
            return
        self.head.build((None, self.encoder.feature_dim))
        self.built = True

    def call(self, inputs, training=None):
        images, masks = (inputs, None) if self.embedding == "global" else inputs
        encoder_training = False if self.freeze_encoder else training
        features = self.encoder(images, training=encoder_training)
        return self.head(pooled_embedding(features, masks, self.embedding)[0])


def sgd(learning_rate: float, total_steps: int, *, momentum: float = 0.9,
        weight_decay: float = 0.0) -> keras.optimizers.Optimizer:
    """SGD, Nesterov momentum, learning rate cosine-decayed to 0 over ``total_steps``."""
    schedule = keras.optimizers.schedules.CosineDecay(learning_rate, max(1, total_steps))
    return keras.optimizers.SGD(schedule, momentum=momentum, nesterov=True,
                                weight_decay=weight_decay or None)


def tensorboard_available() -> bool:
    """TensorFlow 2.21 no longer depends on TensorBoard; summaries need the package."""
    try:
        import tensorboard  # noqa: F401
    except ImportError:
        return False
    return True


def training_callbacks(output_dir: Optional[str]):
    """The Keras callbacks of every trained evaluation (linear, fine-tune, segmentation):
    resume of an interrupted epoch and a metrics log in ``output_dir`` (none without it)."""
    if not output_dir:
        return []
    callbacks = [
        # Resume: the state of the interrupted epoch is restored on the next run.
        keras.callbacks.BackupAndRestore(os.path.join(output_dir, "backup")),
        keras.callbacks.CSVLogger(os.path.join(output_dir, "metrics.csv"), append=True),
    ]
    if tensorboard_available():
        callbacks.append(keras.callbacks.TensorBoard(os.path.join(output_dir, "tensorboard"),
                                                     update_freq="epoch"))
    else:
        logging.warning("TensorBoard is not installed (pip install tensorboard); epoch "
                        "metrics go to %s only.", os.path.join(output_dir, "metrics.csv"))
    return callbacks


def compile_classifier(model: keras.Model, optimizer: keras.optimizers.Optimizer,
                       num_classes: int) -> None:
    """Cross-entropy on logits; top-1 / top-5 training metrics (for TensorBoard)."""
    model.compile(
        optimizer=optimizer,
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
        metrics=[keras.metrics.SparseCategoricalAccuracy(name="top1"),
                 keras.metrics.SparseTopKCategoricalAccuracy(min(5, num_classes),
                                                             name="top5")])


def feature_statistics(features: np.ndarray, *, min_std: float = 1e-6):
    """Per-channel ``(mean, variance)`` of ``features [N, C]`` (float64 accumulation), the
    variance floored at ``min_std²`` so that a constant channel maps to 0, not to NaN."""
    features = np.asarray(features, np.float64)
    mean = features.mean(axis=0)
    variance = np.maximum(features.var(axis=0), min_std ** 2)
    return mean.astype(np.float32), variance.astype(np.float32)


def train_linear_on_features(train: Features, num_classes: int, *, epochs: int = 90,
                             batch_size: int = 1024, learning_rate: float = 0.1,
                             momentum: float = 0.9, weight_decay: float = 0.0,
                             seed: int = 0, standardize: bool = True,
                             output_dir: Optional[str] = None,
                             strategy: Optional[tf.distribute.Strategy] = None,
                             verbose: int = 0) -> keras.Model:
    """Trains ``logits = W x̂ + b`` on precomputed features; returns the Keras model
    (``model(features [N, C]) -> logits [N, num_classes]``, raw features in).

    ``standardize``: ``x̂ = (x − μ) / σ`` per channel with the TRAIN features' μ, σ (a fixed
    ``Normalization`` layer inside the model, so evaluation features go through the same
    map); without it ``x̂ = x``. With ``output_dir``: epoch metrics (``metrics.csv``, and
    TensorBoard when installed), per-epoch backup for resume, final weights
    ``linear.weights.h5``."""
    strategy = strategy or tf.distribute.get_strategy()
    keras.utils.set_random_seed(seed)
    if len(train) == 0:
        raise ValueError("train_linear_on_features: no training features.")
    batch_size = min(batch_size, len(train))
    steps = math.ceil(len(train) / batch_size)
    dim = train.features.shape[1]
    with strategy.scope():
        layers = [keras.Input((dim,))]
        if standardize:
            mean, variance = feature_statistics(train.features)
            layers.append(keras.layers.Normalization(mean=mean, variance=variance,
                                                     name="standardize"))
        layers.append(keras.layers.Dense(num_classes, kernel_initializer="zeros",
                                         name="head"))
        model = keras.Sequential(layers, name="linear")
        compile_classifier(model, sgd(learning_rate, steps * epochs, momentum=momentum,
                                      weight_decay=weight_decay), num_classes)
    model.fit(train.features, train.labels, batch_size=batch_size, epochs=epochs,
              shuffle=True, callbacks=training_callbacks(output_dir), verbose=verbose)
    if output_dir:
        model.save_weights(os.path.join(output_dir, "linear.weights.h5"))
    return model


def fit_classifier(model: Classifier, train_dataset: tf.data.Dataset, *, epochs: int,
                   steps_per_epoch: int, learning_rate: float, momentum: float = 0.9,
                   weight_decay: float = 0.0, output_dir: Optional[str] = None,
                   verbose: int = 1) -> keras.callbacks.History:
    """Trains a :class:`Classifier` (created under the strategy's scope) on batches of
    {"image", "label"} (``pipeline.train_classifier_dataset``, repeating). With
    ``output_dir``: epoch metrics (``metrics.csv``, TensorBoard when installed), per-epoch
    backup (resume), final ``classifier.weights.h5``.
    """
    with model.distribute_strategy.scope():
        model.build()  # BackupAndRestore needs the variables before fit
        compile_classifier(model, sgd(learning_rate, steps_per_epoch * epochs,
                                      momentum=momentum, weight_decay=weight_decay),
                           model.head.units)
    pairs = train_dataset.map(lambda b: (model.inputs_of(b), b["label"]))
    history = model.fit(pairs, epochs=epochs, steps_per_epoch=steps_per_epoch,
                        shuffle=False,  # the input pipeline shuffles
                        callbacks=training_callbacks(output_dir), verbose=verbose)
    if output_dir:
        model.save_weights(os.path.join(output_dir, "classifier.weights.h5"))
    return history


def predict_scores(model: keras.Model, dataset: tf.data.Dataset, *,
                   desc: str = "evaluate"):
    """``(logits [N, num_classes], labels [N])`` of a :class:`Classifier` over
    ``dataset`` ({"image", "label", ...}, and "mask" for a foreground or background
    embedding; one pass), in inference mode."""
    @tf.function(reduce_retracing=True)
    def logits_of(inputs):
        return model(inputs, training=False)

    logits, labels = [], []
    for batch in progress(dataset, desc=desc, unit=" batches", leave=False):
        logits.append(logits_of(model.inputs_of(batch)).numpy())
        labels.append(batch["label"].numpy())
    return np.concatenate(logits), np.concatenate(labels).astype(np.int64)
