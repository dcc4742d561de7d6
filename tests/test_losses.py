"""Regression loss and the mask / hybrid / BYOL objective (SPEC §5) against numpy."""
import numpy as np
import pytest
import tensorflow as tf

from harl_tf import losses


def _np_reg(p, z):
    p = p / np.linalg.norm(p, axis=-1, keepdims=True)
    z = z / np.linalg.norm(z, axis=-1, keepdims=True)
    return ((p - z) ** 2).sum(-1)


def _fixed(seed=0, b=6, d=8):
    rng = np.random.default_rng(seed)
    pred = {r: rng.normal(size=(b, d)).astype(np.float32) for r in losses.REGIONS}
    targ = {r: rng.normal(size=(b, d)).astype(np.float32) for r in losses.REGIONS}
    return pred, targ


def test_regression_loss_is_two_minus_two_cos():
    pred, targ = _fixed()
    got = losses.regression_loss(pred["fg"], targ["fg"]).numpy()
    np.testing.assert_allclose(got, _np_reg(pred["fg"], targ["fg"]), rtol=1e-5, atol=1e-6)
    p = pred["fg"]
    np.testing.assert_allclose(losses.regression_loss(p, 3.0 * p).numpy(), 0.0, atol=1e-5)
    np.testing.assert_allclose(losses.regression_loss(p, -p).numpy(), 4.0, atol=1e-5)


def test_harl_loss_matches_numpy_with_validity():
    pred, targ = _fixed()
    fg_valid = np.array([1, 0, 1, 1, 0, 1], np.float32)
    bg_valid = np.array([1, 1, 1, 0, 1, 1], np.float32)
    alpha, lam = 0.7, 0.6
    out = losses.harl_loss(pred, targ, fg_valid, bg_valid, alpha=alpha, lam=lam)
    l = {r: _np_reg(pred[r], targ[r]) for r in losses.REGIONS}
    fg = (l["fg"] * fg_valid).sum() / fg_valid.sum()
    bg = (l["bg"] * bg_valid).sum() / bg_valid.sum()
    glob = l["glob"].mean()
    want = lam * (alpha * fg + (1 - alpha) * bg) + (1 - lam) * glob
    np.testing.assert_allclose([out.loss, out.fg, out.bg, out.glob], [want, fg, bg, glob],
                               rtol=1e-5)


def test_byol_mode_is_hybrid_with_lambda_zero():
    pred, targ = _fixed(1)
    valid = np.ones(6, np.float32)
    a, lam_byol = losses.mode_weights("byol", 0.7, 0.7)
    byol = losses.harl_loss(pred, targ, valid, valid, alpha=a, lam=lam_byol)
    hybrid0 = losses.harl_loss(pred, targ, valid, valid, alpha=0.7, lam=0.0)
    np.testing.assert_allclose(byol.loss.numpy(), hybrid0.loss.numpy(), rtol=0)
    np.testing.assert_allclose(byol.loss.numpy(), _np_reg(pred["glob"], targ["glob"]).mean(),
                               rtol=1e-5)
    assert losses.mode_weights("mask", 0.3, 0.5) == (0.3, 1.0)
    with pytest.raises(ValueError, match="loss mode"):
        losses.mode_weights("simclr", 0.3, 0.5)


def test_empty_foreground_drops_out_finite_and_without_gradient():
    pred, targ = _fixed(2)
    pred_vars = {r: tf.Variable(v) for r, v in pred.items()}
    no_fg = np.zeros(6, np.float32)
    bg_valid = np.ones(6, np.float32)
    with tf.GradientTape() as tape:
        out = losses.harl_loss(pred_vars, targ, no_fg, bg_valid, alpha=0.7, lam=1.0)
    grads = tape.gradient(out.loss, pred_vars)
    assert np.isfinite(out.loss.numpy()) and out.fg.numpy() == 0.0
    # α is not renormalised: the mask loss is (1 − α)·ℓ̄_bg.
    np.testing.assert_allclose(out.loss.numpy(),
                               0.3 * _np_reg(pred["bg"], targ["bg"]).mean(), rtol=1e-5)
    assert np.all(grads["fg"].numpy() == 0.0)
    assert np.all(np.isfinite(grads["bg"].numpy())) and np.any(grads["bg"].numpy() != 0)


def test_nan_in_an_invalid_term_does_not_leak():
    values = tf.constant([1.0, np.nan, 3.0])
    weights = tf.constant([1.0, 0.0, 1.0])
    assert losses.masked_mean_contribution(values, weights).numpy() == pytest.approx(2.0)


def test_replica_contributions_sum_to_the_global_average():
    pred, targ = _fixed(3, b=8)
    fg_valid = np.array([1, 0, 0, 0, 1, 1, 0, 1], np.float32)
    bg_valid = np.ones(8, np.float32)
    whole = losses.harl_loss(pred, targ, fg_valid, bg_valid, alpha=0.7, lam=0.7)
    counts = dict(fg_count=fg_valid.sum(), bg_count=bg_valid.sum(), batch_count=8.0)
    halves = [losses.harl_loss({r: v[s] for r, v in pred.items()},
                               {r: v[s] for r, v in targ.items()},
                               fg_valid[s], bg_valid[s], alpha=0.7, lam=0.7, **counts)
              for s in (slice(0, 4), slice(4, 8))]
    summed = halves[0] + halves[1]
    np.testing.assert_allclose(np.array(summed), np.array(whole), rtol=1e-6)


@pytest.mark.parametrize("mode", list(losses.LOSS_MODES))
def test_a_loss_mode_skips_only_regions_its_weights_zero(mode):
    """A mode runs the heads only for its regions; every region it skips must get weight 0
    in λ·(α·fg + (1 − α)·bg) + (1 − λ)·glob, whatever the scheduled α and λ."""
    entry = losses.LOSS_MODES[mode]
    assert entry.regions and set(entry.regions) <= set(losses.REGIONS)
    for alpha, lam in ((0.7, 0.7), (0.3, 0.9), (1.0, 0.5)):
        a, l = losses.mode_weights(mode, alpha, lam)
        weights = {"fg": l * a, "bg": l * (1 - a), "glob": 1 - l}
        for region in set(losses.REGIONS) - set(entry.regions):
            assert weights[region] == 0.0, (mode, region, alpha, lam)
    assert losses.regions_for_mode(mode) == entry.regions
    assert f"{mode}: {entry.summary}" in losses.loss_mode_help()
