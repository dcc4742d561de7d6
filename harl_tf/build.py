"""PretrainConfig → the compiled HARLModel and its optimizer (LARS, warm-up cosine rate)."""
from __future__ import annotations

from harl_tf.config import PretrainConfig


def build_optimizer(c: PretrainConfig):
    """LARS with the warm-up cosine schedule (peak base·B/256); LossScaleOptimizer for fp16."""
    import keras
    from harl_tf import schedules
    from harl_tf.lars import LARS
    o = c.optimizer
    schedule = schedules.WarmupCosine(c.learning_rate, c.warmup_steps, c.total_steps)
    optimizer = LARS(schedule, momentum=o.momentum, weight_decay=o.weight_decay,
                     trust_coefficient=o.trust_coefficient)
    if c.mixed_precision == "mixed_float16":
        optimizer = keras.optimizers.LossScaleOptimizer(optimizer)
    return optimizer


def build_model(c: PretrainConfig, strategy):
    """HARLModel built and compiled inside the strategy scope (XLA with --jit_compile)."""
    from harl_tf.models.harl import HARLModel
    with strategy.scope():
        model = HARLModel(c.harl_config())
        model.compile(optimizer=build_optimizer(c), auto_scale_loss=False,
                      jit_compile=c.jit_compile)
        model.build_for(c.image_size)
    return model


def weight_fingerprint(model):
    """[Σw, Σ|w|] (float64) of every online and target weight: equal weights ⇔ (almost
    surely) equal fingerprints; used to compare workers and runs without shipping weights."""
    import numpy as np
    out = []
    for v in (model.online_encoder.weights + model.online_projector.weights
              + model.predictor.weights + model.target_encoder.weights
              + model.target_projector.weights):
        w = np.asarray(v.numpy(), np.float64)
        out += [float(w.sum()), float(np.abs(w).sum())]
    return out
