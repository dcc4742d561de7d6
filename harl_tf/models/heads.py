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

    def compute_output_shape(self, input_shape):
        return tuple(input_shape[:-1]) + (self.output_dim,)

    def get_config(self):
        config = super().get_config()
        config.update({"hidden_dim": self.hidden_dim, "output_dim": self.output_dim,
                       "sync_batchnorm": self.sync_batchnorm})
        return config
