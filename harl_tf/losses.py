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

from typing import Mapping, NamedTuple, Optional

import tensorflow as tf

REGIONS = ("fg", "bg", "glob")
LOSS_MODES = ("mask", "hybrid", "byol")


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
    p = tf.math.l2_normalize(tf.cast(p, tf.float32), axis=-1)
    z = tf.math.l2_normalize(tf.cast(z, tf.float32), axis=-1)
    return 2.0 - 2.0 * tf.reduce_sum(p * z, axis=-1)


def masked_mean_contribution(values: tf.Tensor, weights: tf.Tensor,
                             global_count: Optional[tf.Tensor] = None) -> tf.Tensor:
    """Σ_i w_i·v_i / max(N, 1), with N the global count of w_i = 1 (default: local Σ w).

    Entries with w_i = 0 are removed with tf.where, so even a NaN there cannot leak into the
    value or the gradient. values, weights: float32 [B]; returns a float32 scalar.
    """
    values = tf.cast(values, tf.float32)
    weights = tf.cast(weights, tf.float32)
    if global_count is None:
        global_count = tf.reduce_sum(weights)
    kept = tf.where(weights > 0, values * weights, tf.zeros_like(values))
    return tf.reduce_sum(kept) / tf.maximum(tf.cast(global_count, tf.float32), 1.0)


def combine(fg, bg, glob, *, alpha, lam) -> tf.Tensor:
    """λ·(α·fg + (1 − α)·bg) + (1 − λ)·glob, with α, λ float scalars."""
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


def regions_for_mode(mode: str) -> tuple:
    """The regions whose heads a loss mode needs: byol only the whole image, mask only
    foreground and background (λ = 1), hybrid all three. A mode skips the head passes of
    the regions it gives zero weight, so BYOL costs what BYOL costs."""
    if mode == "byol":
        return ("glob",)
    if mode == "mask":
        return ("fg", "bg")
    if mode == "hybrid":
        return REGIONS
    raise ValueError(f"loss mode must be one of {LOSS_MODES}, got {mode!r}.")


def mode_weights(mode: str, alpha, lam):
    """(α, λ) actually used by a loss mode: mask → λ = 1, byol → λ = 0, hybrid → as given."""
    if mode == "mask":
        return alpha, 1.0
    if mode == "byol":
        return alpha, 0.0
    if mode == "hybrid":
        return alpha, lam
    raise ValueError(f"loss mode must be one of {LOSS_MODES}, got {mode!r}.")
