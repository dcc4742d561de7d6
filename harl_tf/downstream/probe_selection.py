"""The linear probe's weight decay, chosen on a validation split of the TRAIN features.

A fixed probe recipe favours some encoders over others (issue #15: the recipe moved the
results as much as the pretraining method did). Careful SSL evaluations therefore choose
the probe's regularisation per encoder on held-out training data, never on the test set.
Here:

1. :func:`validation_split` carves a class-stratified, seeded, disjoint validation part
   out of the training features.
2. :func:`train_linear_grid` trains one probe per weight decay of the grid on the other
   part, all at once (one ``[G, C, K]`` weight tensor, the same minibatches for every
   grid value), with exactly the recipe of ``linear.train_linear_on_features``: features
   standardised with the (fitting part's) mean and std, zero-initialised ``W x̂ + b``,
   mean cross-entropy, SGD with Nesterov momentum, learning rate cosine-decayed per step
   to 0, and Keras' decoupled weight decay ``θ ← θ − lr·wd·θ`` on W and b before each
   step. Batched, it costs about as much as one Keras ``fit`` of a single probe.
3. :func:`select_weight_decay` scores each probe's top-1 on the validation part and picks
   the best (ties: the smaller decay). The caller then retrains on all training features
   with the chosen decay and evaluates once on the evaluation split.

With standardised features, decoupled weight decay ``wd`` on SGD is L2-regularised
multinomial logistic regression, ``mean CE + (wd / 2)·‖θ‖²`` (scikit-learn's
``C = 1 / (wd · N)``), fitted by SGD for a fixed number of epochs.
"""
from __future__ import annotations

import logging
import math
from typing import Any, Dict, Sequence, Tuple

import numpy as np
import tensorflow as tf

from harl_tf.downstream import linear
from harl_tf.errors import DataError


def validation_split(labels: np.ndarray, fraction: float, *, seed: int = 0
                     ) -> Tuple[np.ndarray, np.ndarray]:
    """``(fit_indices, validation_indices)``, sorted int64 arrays partitioning
    ``range(len(labels))``.

    Per class with ``n`` examples, ``round(fraction · n)`` go to validation, at least 1 and
    at most ``n − 1`` (a class with one example stays in the fitting part), chosen by a
    permutation drawn from ``seed`` and the class. Raises ValueError when fraction is
    outside (0, 1) or no class has two examples.
    """
    if not 0.0 < fraction < 1.0:
        raise ValueError(f"--validation_fraction must be in (0, 1), got {fraction}.")
    labels = np.asarray(labels, np.int64)
    held_out = []
    for label in np.unique(labels):
        members = np.flatnonzero(labels == label)
        count = min(max(1, int(round(fraction * len(members)))), len(members) - 1)
        order = np.random.default_rng([seed, int(label), 0x7A1]).permutation(len(members))
        held_out.append(members[order[:count]])
    validation = np.sort(np.concatenate(held_out)) if held_out else np.zeros(0, np.int64)
    if len(validation) == 0:
        raise DataError("the training split has no class with two examples; there is "
                        "nothing to hold out for choosing the weight decay (pass "
                        "--weight_decay_grid= and a fixed --weight_decay).")
    fit = np.setdiff1d(np.arange(len(labels)), validation)
    return fit.astype(np.int64), validation.astype(np.int64)


def _standardiser(features: np.ndarray, standardize: bool):
    if not standardize:
        return lambda x: np.asarray(x, np.float32)
    mean, variance = linear.feature_statistics(features)
    # keras.layers.Normalization: (x - mean) / max(sqrt(variance), epsilon).
    scale = np.maximum(np.sqrt(variance), 1e-7).astype(np.float32)
    return lambda x: ((np.asarray(x, np.float32) - mean) / scale).astype(np.float32)


def train_linear_grid(features: np.ndarray, labels: np.ndarray, num_classes: int,
                      weight_decays: Sequence[float], *, epochs: int, batch_size: int,
                      learning_rate: float, momentum: float = 0.9, seed: int = 0,
                      standardize: bool = True):
    """Trains one linear probe per weight decay at once (recipe in the module docstring).

    Args:
      features: ``[N, C]``; labels: ``[N]`` ints in ``[0, num_classes)``.
      weight_decays: the G decoupled weight decays.
    Returns:
      ``scores(x [M, C]) -> logits [G, M, num_classes]`` (raw features in).
    """
    features = np.asarray(features, np.float32)
    labels = np.asarray(labels, np.int64)
    num, dim = features.shape
    batch_size = min(int(batch_size), num)
    steps_per_epoch = math.ceil(num / batch_size)
    total_steps = max(1, steps_per_epoch * epochs)
    standardise = _standardiser(features, standardize)
    x = tf.constant(standardise(features))
    onehot = tf.one_hot(labels, num_classes, dtype=tf.float32)
    decay = tf.constant(np.asarray(weight_decays, np.float32))
    grid = len(weight_decays)
    kernel = tf.Variable(tf.zeros([grid, dim, num_classes]))
    bias = tf.Variable(tf.zeros([grid, num_classes]))
    kernel_velocity = tf.Variable(tf.zeros_like(kernel))
    bias_velocity = tf.Variable(tf.zeros_like(bias))

    @tf.function
    def train():
        step = tf.constant(0, tf.int64)
        for epoch in tf.range(epochs):
            order = tf.random.experimental.stateless_shuffle(
                tf.range(num), seed=tf.stack([tf.cast(seed, tf.int32), epoch]))
            for start in tf.range(0, num, batch_size):
                index = order[start:tf.minimum(start + batch_size, num)]
                xb, yb = tf.gather(x, index), tf.gather(onehot, index)
                logits = tf.einsum("bc,gck->gbk", xb, kernel) + bias[:, None, :]
                delta = (tf.nn.softmax(logits) - yb) / tf.cast(tf.shape(xb)[0], tf.float32)
                kernel_grad = tf.einsum("bc,gbk->gck", xb, delta)
                bias_grad = tf.reduce_sum(delta, axis=1)
                progress = tf.cast(tf.minimum(step, total_steps), tf.float32) / total_steps
                lr = learning_rate * 0.5 * (1.0 + tf.cos(math.pi * progress))
                for variable, velocity, grad, shape in (
                        (kernel, kernel_velocity, kernel_grad, [grid, 1, 1]),
                        (bias, bias_velocity, bias_grad, [grid, 1])):
                    variable.assign(variable - variable * tf.reshape(decay, shape) * lr)
                    velocity.assign(momentum * velocity - lr * grad)
                    variable.assign_add(momentum * velocity - lr * grad)
                step += 1

    train()
    kernel_value, bias_value = kernel.numpy(), bias.numpy()

    def scores(query: np.ndarray) -> np.ndarray:
        return np.einsum("mc,gck->gmk", standardise(query), kernel_value) + bias_value[:, None]
    return scores


def select_weight_decay(train: linear.Features, num_classes: int,
                        weight_decays: Sequence[float], *, validation_fraction: float,
                        epochs: int, batch_size: int, learning_rate: float,
                        momentum: float = 0.9, seed: int = 0, standardize: bool = True
                        ) -> Dict[str, Any]:
    """Chooses the weight decay with the best validation top-1 (ties: the smaller).

    Only ``train`` is read: the validation part is :func:`validation_split` of it.
    Returns ``{"weight_decay_grid": [...], "validation_top1": [...] (one per grid value),
    "chosen_weight_decay": float, "validation_fraction": float, "num_fit": int,
    "num_validation": int}``.
    """
    if not weight_decays:
        raise ValueError("select_weight_decay: the weight-decay grid is empty.")
    grid = sorted(float(v) for v in weight_decays)
    fit, held_out = validation_split(train.labels, validation_fraction, seed=seed)
    scores = train_linear_grid(train.features[fit], train.labels[fit], num_classes, grid,
                               epochs=epochs, batch_size=batch_size,
                               learning_rate=learning_rate, momentum=momentum, seed=seed,
                               standardize=standardize)(train.features[held_out])
    top1 = [linear.topk_accuracy(s, train.labels[held_out], ks=(1,))["top1"] for s in scores]
    best = int(np.argmax(top1))  # argmax takes the first maximum: the smallest decay
    if len(grid) > 1 and best == len(grid) - 1:
        logging.warning("the largest weight decay of the grid (%g) scored best on the "
                        "validation split; a larger one might score better still "
                        "(extend --weight_decay_grid, keeping learning_rate x decay < 1).",
                        grid[best])
    return {"weight_decay_grid": grid, "validation_top1": top1,
            "chosen_weight_decay": grid[best], "validation_fraction": validation_fraction,
            "num_fit": int(len(fit)), "num_validation": int(len(held_out))}
