"""Projector g and predictor q (SPEC section 3, paper section 4.1).

Both are the BYOL MLP: Linear(hidden_dim) -> BatchNorm -> ReLU -> Linear(output_dim),

    y = W2 relu(BN(W1 x + b1)) + b2,   x: [B, D_in] -> y: [B, output_dim] (float32).

The paper's "4960" hidden units are read as BYOL's 4096; both sizes are arguments.
BatchNorm uses the encoder's constants (momentum 0.9, epsilon 1e-5) and can be
synchronised across replicas. Both linear layers have a bias (as BYOL's haiku Linear).
Under a mixed-precision policy the layers compute in float16/bfloat16 and the output is
cast to float32 so the loss is computed in float32.
"""
import keras
import tensorflow as tf
from keras import ops

from harl_tf.models.resnet import BN_EPSILON, BN_MOMENTUM


@keras.saving.register_keras_serializable(package="harl_tf")
class MLPHead(keras.layers.Layer):
    """Linear -> BatchNorm -> ReLU -> Linear.

    Args:
      hidden_dim: width of the hidden layer (4096).
      output_dim: width of the output (512 in the paper, 256 in BYOL).
      sync_batchnorm: synchronise BatchNorm statistics across replicas.
      name: layer name (e.g. "projector", "predictor"); sub-layers are ``linear1``,
        ``bn``, ``linear2``, so variable paths read ``projector/linear1/kernel``.

    Call: ``head(x, training=...)`` with ``x`` ``[B, D_in]`` -> float32 ``[B, output_dim]``.
    """

    def __init__(self, hidden_dim=4096, output_dim=512, sync_batchnorm=False,
                 name="mlp_head", **kwargs):
        super().__init__(name=name, **kwargs)
        for arg, value in (("hidden_dim", hidden_dim), ("output_dim", output_dim)):
            if not isinstance(value, int) or value <= 0:
                raise ValueError(f"`{arg}` must be a positive int, got {value!r}.")
        self.hidden_dim = hidden_dim
        self.output_dim = output_dim
        self.sync_batchnorm = bool(sync_batchnorm)
        self.linear1 = keras.layers.Dense(hidden_dim, name="linear1")
        self.bn = keras.layers.BatchNormalization(
            momentum=BN_MOMENTUM, epsilon=BN_EPSILON, synchronized=self.sync_batchnorm,
            name="bn")
        self.linear2 = keras.layers.Dense(output_dim, name="linear2")

    def build(self, input_shape):
        if self.built:
            return
        self.linear1.build(input_shape)
        hidden_shape = tuple(input_shape[:-1]) + (self.hidden_dim,)
        self.bn.build(hidden_shape)
        self.linear2.build(hidden_shape)
        self.built = True

    def call(self, x, training=None):
        h = ops.relu(self.bn(self.linear1(x), training=training))
        return ops.cast(self.linear2(h), "float32")

    def call_groups(self, xs, training=None, row_weights=None):
        """``[call(x) for x in xs]`` with each layer run once on the concatenation.

        ``row_weights``: optional list (one entry per group, ``None`` for "every row") of
        float32 ``[B]`` in {0, 1}. In training mode a group's BatchNorm statistics are then
        the mean and variance of its rows of weight 1 only,
        μ = Σ_i w_i x_i / Σ_i w_i,  σ² = Σ_i w_i (x_i − μ)² / Σ_i w_i,
        so the zero vectors that pooling gives a region absent from a view (weight 0) do not
        shift the statistics the present regions are normalised with. Rows of weight 0 are
        still normalised (with those statistics); their outputs are masked out of the loss.
        A group with no row of weight 1 leaves the moving statistics unchanged.

        Every group is normalised with its own batch statistics (synchronised across
        replicas when ``sync_batchnorm``), and the moving statistics receive the updates
        that separate calls would make, in the same order (folded into one assignment), so
        the result equals separate calls up to float rounding. One matrix product and one
        normalisation per layer instead of ``len(xs)`` small ones is what makes HARL's
        fg/bg/global head passes cost little more than BYOL's single one.
        """
        xs = list(xs)
        sizes = [x.shape[0] for x in xs]
        weighted = row_weights is not None and any(w is not None for w in row_weights)
        if not weighted and (len(xs) == 1 or None in sizes or len(set(sizes)) != 1):
            return [self(x, training=training) for x in xs]
        hidden = self.linear1(tf.concat(xs, axis=0))
        if training and self.bn.trainable:
            weights = None
            if weighted:
                weights = tf.concat([tf.ones([tf.shape(x)[0]], tf.float32) if w is None
                                     else tf.cast(w, tf.float32)
                                     for x, w in zip(xs, row_weights)], axis=0)
            hidden = self._grouped_batchnorm(hidden, len(xs), weights)
        else:
            hidden = self.bn(hidden, training=False)
        out = ops.cast(self.linear2(ops.relu(hidden)), "float32")
        return tf.split(out, len(xs), axis=0)

    def _grouped_batchnorm(self, hidden, groups: int, weights=None):
        """Training-mode BatchNorm of ``groups`` equal consecutive row blocks, each with
        its own statistics; the same arithmetic as ``keras.layers.BatchNormalization``.
        ``weights`` (float32 [G·B] in {0, 1}, optional): statistics over rows of weight 1."""
        bn = self.bn
        compute_dtype = keras.backend.result_type(hidden.dtype, "float32")
        x = ops.cast(hidden, compute_dtype)
        x = ops.reshape(x, (groups, -1, x.shape[-1]))                   # [G, B, H]
        if weights is None:
            mean, variance = ops.moments(x, axes=[1], synchronized=bn.synchronized)
            present = [None] * groups
        else:
            mean, variance, counts = _weighted_moments(
                x, ops.reshape(ops.cast(weights, compute_dtype), (groups, -1, 1)),
                bn.synchronized)
            present = [counts[g] > 0 for g in range(groups)]
        momentum = bn.momentum
        moving_mean = ops.cast(bn.moving_mean, compute_dtype)
        moving_variance = ops.cast(bn.moving_variance, compute_dtype)
        for g in range(groups):  # the updates of `groups` successive calls, in order
            new_mean = moving_mean * momentum + mean[g] * (1.0 - momentum)
            new_variance = moving_variance * momentum + variance[g] * (1.0 - momentum)
            if present[g] is not None:  # an absent group leaves the statistics alone
                new_mean = tf.where(present[g], new_mean, moving_mean)
                new_variance = tf.where(present[g], new_variance, moving_variance)
            moving_mean, moving_variance = new_mean, new_variance
        bn.moving_mean.assign(moving_mean)
        bn.moving_variance.assign(moving_variance)
        inv = ops.rsqrt(variance + bn.epsilon) * ops.cast(bn.gamma, compute_dtype)
        out = x * inv[:, None, :] + (ops.cast(bn.beta, compute_dtype)
                                     - mean * inv)[:, None, :]
        return ops.cast(ops.reshape(out, (-1, out.shape[-1])), bn.compute_dtype)

    def compute_output_shape(self, input_shape):
        return tuple(input_shape[:-1]) + (self.output_dim,)

    def get_config(self):
        config = super().get_config()
        config.update({"hidden_dim": self.hidden_dim, "output_dim": self.output_dim,
                       "sync_batchnorm": self.sync_batchnorm})
        return config


def _weighted_moments(x, w, synchronized: bool):
    """Per-group mean and variance of the rows of ``x`` [G, B, H] weighted by ``w``
    [G, B, 1]; sums are all-reduced across replicas when ``synchronized``. Returns
    (mean [G, H], variance [G, H], Σw [G])."""
    sums = tf.concat([tf.reduce_sum(w, axis=1), tf.reduce_sum(w * x, axis=1),
                      tf.reduce_sum(w * tf.square(x), axis=1)], axis=-1)     # [G, 1 + 2H]
    if synchronized:
        ctx = tf.distribute.get_replica_context()
        if ctx is not None and ctx.num_replicas_in_sync > 1:
            sums = ctx.all_reduce(tf.distribute.ReduceOp.SUM, sums)
    width = x.shape[-1]
    count = sums[:, :1]
    safe = tf.maximum(count, 1.0)
    mean = sums[:, 1:1 + width] / safe
    variance = tf.maximum(sums[:, 1 + width:] / safe - tf.square(mean), 0.0)
    return mean, variance, count[:, 0]
