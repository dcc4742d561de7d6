"""Schedules: the warm-up cosine learning rate and the cosine rise of tau, alpha and lambda.

SPEC section 6 (BYOL protocol):

- learning rate: ``base_lr = 0.2 * global_batch / 256`` (:func:`scaled_learning_rate`),
  linear warm-up from 0 over the first ``warmup_steps`` steps, then cosine decay to 0 at
  ``total_steps`` (:func:`warmup_cosine_lr`, :class:`WarmupCosine`);
- EMA decay ``tau_k = 1 - (1 - tau_base) (cos(pi k / K) + 1) / 2`` (:func:`ema_decay_at`);
  the same cosine rise drives the loss weights alpha and lambda (SPEC section 5,
  :func:`cosine_rise`).

All step arguments may be python ints or tf tensors of any integer or float dtype
(``optimizer.iterations`` is an int64 variable); the step is clipped to ``[0, K]``, so a
schedule queried past its end stays at its final value. The functions return float32
scalar tensors and are safe to call inside ``tf.function``.
"""
import math

import keras
import tensorflow as tf


def _as_float(value):
    return tf.cast(tf.convert_to_tensor(value), tf.float32)


def _check_non_negative(name, value):
    if isinstance(value, (int, float)) and value < 0:
        raise ValueError(f"`{name}` must be >= 0, got {value}.")


def warmup_cosine_lr(step, base_lr, warmup_steps, total_steps):
    """Learning rate at ``step``: linear warm-up, then cosine decay to 0.

    With k = clip(step, 0, K), K = total_steps, W = warmup_steps:

        lr(k) = base_lr * k / W                                          if k < W
        lr(k) = base_lr * (1 + cos(pi * (k - W) / (K - W))) / 2          otherwise

    so lr(0) = 0, lr(W) = base_lr and lr(K) = 0. With W = 0 there is no warm-up.

    Args:
      step: current optimiser step (python int or scalar tensor, any numeric dtype).
      base_lr: peak learning rate, reached at the end of the warm-up.
      warmup_steps: number of warm-up steps W, 0 <= W <= K.
      total_steps: total number of steps K > 0.

    Returns:
      float32 scalar tensor.
    """
    _check_non_negative("warmup_steps", warmup_steps)
    if isinstance(total_steps, int) and total_steps <= 0:
        raise ValueError(f"`total_steps` must be > 0, got {total_steps}.")
    if (isinstance(total_steps, int) and isinstance(warmup_steps, int)
            and warmup_steps > total_steps):
        raise ValueError(f"`warmup_steps` ({warmup_steps}) must not exceed `total_steps` "
                         f"({total_steps}).")
    total = _as_float(total_steps)
    warmup = _as_float(warmup_steps)
    k = tf.clip_by_value(_as_float(step), 0.0, total)
    base = _as_float(base_lr)
    warmup_lr = base * k / tf.maximum(warmup, 1.0)
    progress = (k - warmup) / tf.maximum(total - warmup, 1.0)
    cosine_lr = base * 0.5 * (1.0 + tf.cos(math.pi * progress))
    return tf.where(k < warmup, warmup_lr, cosine_lr)


def cosine_rise(step, total_steps, base):
    """Cosine rise from ``base`` at step 0 to 1 at step K.

        v(k) = 1 - (1 - base) * (cos(pi * k / K) + 1) / 2,   k = clip(step, 0, K)

    Used for the EMA decay tau (SPEC section 6) and the loss weights alpha, lambda
    (SPEC section 5).

    Args:
      step: current step (python int or scalar tensor, any numeric dtype).
      total_steps: K > 0.
      base: value at step 0 (e.g. 0.996 for tau, 0.7 for alpha and lambda).

    Returns:
      float32 scalar tensor in [min(base, 1), max(base, 1)].
    """
    if isinstance(total_steps, int) and total_steps <= 0:
        raise ValueError(f"`total_steps` must be > 0, got {total_steps}.")
    total = _as_float(total_steps)
    k = tf.clip_by_value(_as_float(step), 0.0, total)
    base = _as_float(base)
    return 1.0 - (1.0 - base) * (tf.cos(math.pi * k / total) + 1.0) / 2.0


def ema_decay_at(step, total_steps, base=0.996):
    """EMA decay tau_k of the target network (SPEC section 6).

        tau_k = 1 - (1 - tau_base) * (cos(pi * k / K) + 1) / 2

    The target update is xi <- tau_k * xi + (1 - tau_k) * theta. Same as
    :func:`cosine_rise`; returns a float32 scalar tensor.
    """
    return cosine_rise(step, total_steps, base)


def scaled_learning_rate(base_lr, global_batch_size):
    """Linear scaling rule: ``lr = base_lr * global_batch_size / 256`` (a python float).

    Args:
      base_lr: learning rate for a batch of 256 (0.2 in the paper).
      global_batch_size: batch size summed over all replicas (> 0).
    """
    if global_batch_size <= 0:
        raise ValueError(f"`global_batch_size` must be > 0, got {global_batch_size}.")
    return float(base_lr) * float(global_batch_size) / 256.0


@keras.saving.register_keras_serializable(package="harl_tf")
class WarmupCosine(keras.optimizers.schedules.LearningRateSchedule):
    """Keras learning-rate schedule wrapping :func:`warmup_cosine_lr`.

    Args:
      base_lr: peak learning rate (already scaled by the batch size).
      warmup_steps: number of linear warm-up steps.
      total_steps: total number of optimiser steps; the rate is 0 from here on.
    """

    def __init__(self, base_lr, warmup_steps, total_steps, name="warmup_cosine"):
        super().__init__()
        if total_steps <= 0:
            raise ValueError(f"`total_steps` must be > 0, got {total_steps}.")
        if not 0 <= warmup_steps <= total_steps:
            raise ValueError(f"`warmup_steps` must be in [0, total_steps={total_steps}], "
                             f"got {warmup_steps}.")
        self.base_lr = float(base_lr)
        self.warmup_steps = int(warmup_steps)
        self.total_steps = int(total_steps)
        self.name = name

    def __call__(self, step):
        return warmup_cosine_lr(step, self.base_lr, self.warmup_steps, self.total_steps)

    def get_config(self):
        return {"base_lr": self.base_lr, "warmup_steps": self.warmup_steps,
                "total_steps": self.total_steps, "name": self.name}
