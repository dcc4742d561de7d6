"""LARS optimiser (You et al. 2017) as a Keras 3 optimizer, in the BYOL / SimCLR form.

Update for one variable w with gradient g, learning rate lr, momentum m, weight decay wd
and trust coefficient eta (SPEC section 6), for a variable that is *not excluded*:

    g     <- g + wd * w
    trust <- eta * ||w|| / ||g||   if ||w|| > 0 and ||g|| > 0,   else 1
    v     <- m * v + lr * trust * g
    w     <- w - v

For an *excluded* variable (biases and BatchNorm parameters) the first two lines are
skipped: no weight decay and trust = 1, i.e. plain heavy-ball momentum SGD
``v <- m * v + lr * g; w <- w - v``. The velocity v starts at 0. Norms are Frobenius norms
over the whole variable. This is exactly SimCLR's ``LARSOptimizer`` (tf2/lars_optimizer.py)
and BYOL's ``lars`` (optax ``add_decayed_weights`` + ``scale_by_trust_ratio`` + momentum).

Exclusion rule (works with Keras 3 variable paths such as ``encoder/bn1/gamma``): a
variable is excluded when

- ``exclude_rank1=True`` (default) and the variable has rank <= 1: this catches every bias
  and every BatchNorm gamma/beta, and no convolution or dense kernel; or
- its ``variable.path`` matches (``re.search``) one of ``exclude_patterns``, e.g.
  ``(r"bias$", r"/bn\\d*/")``.

The decision is taken once per variable in ``build`` and is static in the graph.

Weight decay here is LARS's coupled decay (added to the gradient before the trust ratio).
The decoupled decay of the Keras base class is deliberately not used: ``weight_decay`` is
consumed by this class and never passed on.

Distribution: under ``tf.distribute`` strategies Keras all-reduces (sums) the per-replica
gradients before ``update_step``; scale the per-replica loss by 1 / global batch size as
usual.
"""
import re

import keras
from keras import ops


@keras.saving.register_keras_serializable(package="harl_tf")
class LARS(keras.optimizers.Optimizer):
    """Layer-wise adaptive rate scaling with momentum (see module docstring for the rule).

    Args:
      learning_rate: float or ``LearningRateSchedule`` (e.g. ``schedules.WarmupCosine``).
      momentum: m in [0, 1), 0.9 by default.
      weight_decay: coupled L2 coefficient wd >= 0 (paper: 5e-7).
      trust_coefficient: eta > 0, 1e-3 by default.
      exclude_rank1: exclude variables of rank <= 1 (biases, BatchNorm) from weight decay
        and trust-ratio adaptation.
      exclude_patterns: iterable of regular expressions; a variable whose ``path`` matches
        any of them is also excluded.
      name: optimizer name.
      **kwargs: other Keras optimizer arguments (clipnorm, global_clipnorm,
        loss_scale_factor, gradient_accumulation_steps...). ``weight_decay`` of the base
        class is not available (see module docstring).
    """

    def __init__(self, learning_rate=0.001, momentum=0.9, weight_decay=0.0,
                 trust_coefficient=1e-3, exclude_rank1=True, exclude_patterns=(),
                 name="lars", **kwargs):
        super().__init__(learning_rate=learning_rate, name=name, **kwargs)
        if not 0.0 <= momentum < 1.0:
            raise ValueError(f"`momentum` must be in [0, 1), got {momentum}.")
        if weight_decay < 0.0:
            raise ValueError(f"`weight_decay` must be >= 0, got {weight_decay}.")
        if trust_coefficient <= 0.0:
            raise ValueError(f"`trust_coefficient` must be > 0, got {trust_coefficient}.")
        if isinstance(exclude_patterns, str):
            raise TypeError("`exclude_patterns` must be a list of regular expressions, "
                            f"got the single string {exclude_patterns!r}; wrap it in a list.")
        self.momentum = float(momentum)
        self.lars_weight_decay = float(weight_decay)
        self.trust_coefficient = float(trust_coefficient)
        self.exclude_rank1 = bool(exclude_rank1)
        self.exclude_patterns = tuple(exclude_patterns)
        self._exclude_regexes = [re.compile(p) for p in self.exclude_patterns]

    def is_excluded(self, variable):
        """True when ``variable`` gets neither weight decay nor trust-ratio scaling."""
        if self.exclude_rank1 and len(variable.shape) <= 1:
            return True
        path = getattr(variable, "path", None) or getattr(variable, "name", "")
        return any(r.search(path) for r in self._exclude_regexes)

    def build(self, variables):
        if self.built:
            return
        super().build(variables)
        self.velocities = self.add_optimizer_variables(variables, "velocity")
        self._excluded = [self.is_excluded(v) for v in variables]

    def update_step(self, gradient, variable, learning_rate):
        index = self._get_variable_index(variable)
        velocity = self.velocities[index]
        dtype = variable.dtype
        lr = ops.cast(learning_rate, dtype)
        grad = ops.cast(gradient, dtype)
        if not self._excluded[index]:
            grad = grad + ops.cast(self.lars_weight_decay, dtype) * variable
            w_norm = ops.sqrt(ops.sum(ops.square(variable)))
            g_norm = ops.sqrt(ops.sum(ops.square(grad)))
            trust = ops.where(
                ops.logical_and(w_norm > 0, g_norm > 0),
                ops.cast(self.trust_coefficient, dtype) * w_norm
                / ops.maximum(g_norm, ops.cast(1e-30, dtype)),
                ops.cast(1.0, dtype))
            lr = lr * trust
        self.assign(velocity, ops.cast(self.momentum, dtype) * velocity + lr * grad)
        self.assign_sub(variable, velocity)

    def get_config(self):
        config = super().get_config()
        config.pop("weight_decay", None)  # the base class's decoupled decay, unused
        config.update({
            "momentum": self.momentum,
            "weight_decay": self.lars_weight_decay,
            "trust_coefficient": self.trust_coefficient,
            "exclude_rank1": self.exclude_rank1,
            "exclude_patterns": list(self.exclude_patterns),
        })
        return config
