"""The regression loss and the mask / hybrid / BYOL objective (SPEC §5).

For a prediction p and a target projection z (stop-gradient):

    ℓ(p, z) = ‖p/‖p‖ − z/‖z‖‖² = 2 − 2·cos(p, z)

One direction v → v' of the objective, averaged over the global batch:

    ℓ̄_r    = Σ_i valid_r,i · ℓ(p_r,i, z_r,i) / N_r            r ∈ {fg, bg}
    ℓ̄_glob = Σ_i ℓ(p_glob,i, z_glob,i) / N
    L_mask = α · ℓ̄_fg + (1 − α) · ℓ̄_bg                         (paper Eq. 1)
    L      = λ · L_mask + (1 − λ) · ℓ̄_glob                      (paper Eq. 4; BYOL: λ = 0)

where valid_r,i = 1 when region r is valid in BOTH views of example i, N_r = Σ_i valid_r,i
and N the number of examples, both counted over the GLOBAL batch. The training step adds
both directions: L(v → v') + L(v' → v).

Empty regions. When no example of the global batch has a valid foreground (N_fg = 0), the
term ℓ̄_fg is defined as 0: it drops out, the loss stays finite and the term sends no
gradient. α is NOT renormalised: the background keeps its weight (1 − α), so the loss
weights are the schedule's, whatever a batch contains (at realistic batch sizes N_fg = 0
never happens; renormalising would let rare batches change the effective objective).
Likewise for the background.

Distribution. Every function here returns a *contribution*: the sum over the local examples
divided by the GLOBAL count. Pass the global counts (all-reduced by the caller); summing the
contributions of all replicas then gives exactly the global-batch average, so one replica
and several replicas at the same global batch compute the same loss and gradients (the
optimizer sums gradients across replicas). Counts default to the local ones, which is right
on a single replica.
"""
from __future__ import annotations

from typing import Mapping, NamedTuple, Optional, Tuple

# TensorFlow is imported inside the functions: the loss-mode registry below is read by the
# config (harl_tf.config) and the flags, which must not wait for TensorFlow.

REGIONS = ("fg", "bg", "glob")


class LossMode(NamedTuple):
    """A loss mode: the regions whose heads it runs and the weights it fixes.

    regions: the regions of :data:`REGIONS` it needs; the others get weight 0 and the step
      skips their head passes (so BYOL costs what BYOL costs).
    alpha, lam: α and λ forced by the mode; None keeps the scheduled value.
    summary: what it is, for the --loss_mode help.
    """
    regions: Tuple[str, ...]
    alpha: Optional[float]
    lam: Optional[float]
    summary: str


# THE loss modes (the --loss_mode choices). Adding one is adding an entry here.
LOSS_MODES = {
    "mask": LossMode(("fg", "bg"), alpha=None, lam=1.0, summary="Eq. 1"),
    "hybrid": LossMode(REGIONS, alpha=None, lam=None, summary="Eq. 4"),
    "byol": LossMode(("glob",), alpha=None, lam=0.0, summary="lambda = 0"),
}

# How α_k and λ_k move over the run (the --alpha_schedule / --lambda_schedule choices):
# constant, or the cosine rise from the base value to 1 (schedules.cosine_rise).
WEIGHT_SCHEDULES = ("constant", "cosine")


def loss_mode(mode: str) -> LossMode:
    """The registry entry of ``mode``; ValueError naming --loss_mode if there is none."""
    if mode not in LOSS_MODES:
        raise ValueError(f"loss mode (--loss_mode) must be one of {', '.join(LOSS_MODES)}; "
                         f"got {mode!r}.")
    return LOSS_MODES[mode]


def loss_mode_help() -> str:
    """The --loss_mode help, from the registry: "mask: Eq. 1; hybrid: Eq. 4; ..."."""
    return "; ".join(f"{name}: {mode.summary}" for name, mode in LOSS_MODES.items()) + "."


def regions_for_mode(mode: str) -> tuple:
    """The regions whose heads a loss mode needs: byol only the whole image, mask only
    foreground and background (λ = 1), hybrid all three."""
    return loss_mode(mode).regions


def mode_weights(mode: str, alpha, lam):
    """(α, λ) actually used by a loss mode: mask → λ = 1, byol → λ = 0, hybrid → as given."""
    entry = loss_mode(mode)
    return (alpha if entry.alpha is None else entry.alpha,
            lam if entry.lam is None else entry.lam)


def weight_at(kind: str, base, step, total_steps):
    """α_k or λ_k, float32 scalar: ``base`` (constant) or the cosine rise from ``base`` at
    step 0 to 1 at step K = ``total_steps`` (``schedules.cosine_rise``)."""
    import tensorflow as tf
    from harl_tf import schedules
    if kind not in WEIGHT_SCHEDULES:
        raise ValueError(f"a loss weight schedule must be one of {WEIGHT_SCHEDULES}; "
                         f"got {kind!r}.")
    if kind == "constant":
        return tf.constant(float(base), tf.float32)
    return schedules.cosine_rise(step, total_steps, base)


class LossTerms(NamedTuple):
    """Scalar float32 contributions of one direction (or the sum of two).

    loss = λ·(α·fg + (1−α)·bg) + (1−λ)·glob; fg, bg, glob are the averaged region terms
    ℓ̄_fg, ℓ̄_bg, ℓ̄_glob (unweighted).
    """
    loss: tf.Tensor
    fg: tf.Tensor
    bg: tf.Tensor
    glob: tf.Tensor

    def __add__(self, other):  # symmetrisation: L(v→v') + L(v'→v)
        return LossTerms(*(a + b for a, b in zip(self, other)))


def regression_loss(p: tf.Tensor, z: tf.Tensor) -> tf.Tensor:
    """ℓ(p, z) = 2 − 2·cos(p, z) per example.

    Args:
      p, z: [B, D] (any float dtype; computed in float32). Zero vectors normalise to zero
        (TF's l2_normalize guards the norm), giving ℓ = 2 and a finite gradient.
    Returns:
      float32 [B] in [0, 4].
    """
    import tensorflow as tf
    p = tf.math.l2_normalize(tf.cast(p, tf.float32), axis=-1)
    z = tf.math.l2_normalize(tf.cast(z, tf.float32), axis=-1)
    return 2.0 - 2.0 * tf.reduce_sum(p * z, axis=-1)


def masked_mean_contribution(values: tf.Tensor, weights: tf.Tensor,
                             global_count: Optional[tf.Tensor] = None) -> tf.Tensor:
    """Σ_i w_i·v_i / max(N, 1), with N the global count of w_i = 1 (default: local Σ w).

    Entries with w_i = 0 are removed with tf.where, so even a NaN there cannot leak into the
    value or the gradient. values, weights: float32 [B]; returns a float32 scalar.
    """
    import tensorflow as tf
    values = tf.cast(values, tf.float32)
    weights = tf.cast(weights, tf.float32)
    if global_count is None:
        global_count = tf.reduce_sum(weights)
    kept = tf.where(weights > 0, values * weights, tf.zeros_like(values))
    return tf.reduce_sum(kept) / tf.maximum(tf.cast(global_count, tf.float32), 1.0)


def combine(fg, bg, glob, *, alpha, lam) -> tf.Tensor:
    """λ·(α·fg + (1 − α)·bg) + (1 − λ)·glob, with α, λ float scalars."""
    import tensorflow as tf
    alpha = tf.cast(alpha, tf.float32)
    lam = tf.cast(lam, tf.float32)
    return lam * (alpha * fg + (1.0 - alpha) * bg) + (1.0 - lam) * glob


def harl_loss(predictions: Mapping[str, tf.Tensor], targets: Mapping[str, tf.Tensor],
              fg_valid: tf.Tensor, bg_valid: tf.Tensor, *, alpha, lam,
              fg_count: Optional[tf.Tensor] = None, bg_count: Optional[tf.Tensor] = None,
              batch_count: Optional[tf.Tensor] = None) -> LossTerms:
    """One direction v → v' of the hybrid objective (mask: λ = 1, BYOL: λ = 0).

    Args:
      predictions: {"fg", "bg", "glob"}: online predictions p_r, [B, D]. A region left out
        (see :func:`regions_for_mode`) contributes 0: its weight must be 0.
      targets: the target projections z_r of the same regions, [B, D]; stop-gradient is
        applied.
      fg_valid, bg_valid: float32 [B], 1 where the region is valid in both views.
      alpha, lam: α and λ (python floats or scalar tensors).
      fg_count, bg_count, batch_count: global Σ fg_valid, Σ bg_valid and number of examples;
        default to the local ones (single replica).
    Returns:
      LossTerms of float32 scalar contributions (see module docstring).
    """
    import tensorflow as tf
    ones = tf.ones_like(tf.cast(fg_valid, tf.float32))
    if batch_count is None:
        batch_count = tf.reduce_sum(ones)
    terms = {}
    for region, valid, count in (("fg", fg_valid, fg_count), ("bg", bg_valid, bg_count),
                                 ("glob", ones, batch_count)):
        if region not in predictions:
            terms[region] = tf.constant(0.0, tf.float32)
            continue
        per_example = regression_loss(predictions[region],
                                      tf.stop_gradient(targets[region]))
        terms[region] = masked_mean_contribution(per_example, valid, count)
    loss = combine(terms["fg"], terms["bg"], terms["glob"], alpha=alpha, lam=lam)
    return LossTerms(loss=loss, fg=terms["fg"], bg=terms["bg"], glob=terms["glob"])

