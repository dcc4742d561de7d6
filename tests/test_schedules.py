"""Schedules of SPEC sections 5-6 against their formulas, evaluated with numpy."""
import math

import keras
import numpy as np
import pytest
import tensorflow as tf

from harl_tf import schedules


def _np_warmup_cosine(k, base_lr, warmup, total):
    k = min(max(k, 0), total)
    if k < warmup:
        return base_lr * k / warmup
    return base_lr * 0.5 * (1 + math.cos(math.pi * (k - warmup) / (total - warmup)))


def test_warmup_cosine_matches_formula_at_every_step():
    base_lr, warmup, total = 0.8, 10, 50
    got = [float(schedules.warmup_cosine_lr(k, base_lr, warmup, total)) for k in range(total + 1)]
    want = [_np_warmup_cosine(k, base_lr, warmup, total) for k in range(total + 1)]
    np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-7)


def test_warmup_cosine_landmarks():
    lr = lambda k: float(schedules.warmup_cosine_lr(k, 1.6, 100, 1000))  # noqa: E731
    assert lr(0) == 0.0
    assert lr(50) == pytest.approx(0.8)            # half-way through the linear warm-up
    assert lr(100) == pytest.approx(1.6)           # peak at the end of warm-up
    assert lr(550) == pytest.approx(0.8, rel=1e-5)  # cosine half-way point
    assert lr(1000) == pytest.approx(0.0, abs=1e-7)
    assert lr(5000) == pytest.approx(0.0, abs=1e-7)  # clipped past the end
    assert lr(-3) == 0.0                              # clipped before the start


def test_warmup_cosine_without_warmup_starts_at_peak():
    assert float(schedules.warmup_cosine_lr(0, 0.3, 0, 10)) == pytest.approx(0.3)


def test_schedules_accept_int64_tensors_inside_tf_function():
    @tf.function
    def f(step):
        return (schedules.warmup_cosine_lr(step, 1.0, 4, 20),
                schedules.ema_decay_at(step, 20, 0.99))

    lr, tau = f(tf.constant(12, tf.int64))
    assert float(lr) == pytest.approx(_np_warmup_cosine(12, 1.0, 4, 20), rel=1e-6)
    assert float(tau) == pytest.approx(1 - 0.01 * (math.cos(math.pi * 12 / 20) + 1) / 2,
                                       rel=1e-6)


def test_cosine_rise_formula_and_clipping():
    base, total = 0.7, 30
    for k in [-5, 0, 7, 15, 29, 30, 100]:
        kc = min(max(k, 0), total)
        want = 1 - (1 - base) * (math.cos(math.pi * kc / total) + 1) / 2
        assert float(schedules.cosine_rise(k, total, base)) == pytest.approx(want, rel=1e-6)
    assert float(schedules.cosine_rise(0, total, base)) == pytest.approx(base)
    assert float(schedules.cosine_rise(total, total, base)) == pytest.approx(1.0)
    assert float(schedules.cosine_rise(total // 2, total, base)) == pytest.approx(0.85)


def test_ema_decay_rises_from_base_to_one_monotonically():
    taus = np.array([float(schedules.ema_decay_at(k, 100, 0.996)) for k in range(101)])
    assert taus[0] == pytest.approx(0.996)
    assert taus[-1] == pytest.approx(1.0)
    assert np.all(np.diff(taus) >= -1e-7)


def test_scaled_learning_rate_is_linear_in_batch():
    assert schedules.scaled_learning_rate(0.2, 4096) == pytest.approx(3.2)
    assert schedules.scaled_learning_rate(0.2, 256) == pytest.approx(0.2)
    with pytest.raises(ValueError, match="global_batch_size"):
        schedules.scaled_learning_rate(0.2, 0)


def test_warmup_cosine_schedule_serialises_and_drives_an_optimizer():
    schedule = schedules.WarmupCosine(base_lr=0.4, warmup_steps=5, total_steps=25)
    clone = schedules.WarmupCosine.from_config(schedule.get_config())
    for k in [0, 3, 5, 17, 25]:
        assert float(clone(k)) == pytest.approx(_np_warmup_cosine(k, 0.4, 5, 25), abs=1e-7)
    restored = keras.optimizers.deserialize(
        keras.optimizers.serialize(keras.optimizers.SGD(learning_rate=schedule)))
    restored.iterations.assign(3)  # the optimizer reads its rate from its step counter
    assert float(restored.learning_rate) == pytest.approx(_np_warmup_cosine(3, 0.4, 5, 25))


def test_invalid_arguments_are_named():
    with pytest.raises(ValueError, match="warmup_steps"):
        schedules.WarmupCosine(0.1, warmup_steps=30, total_steps=20)
    with pytest.raises(ValueError, match="total_steps"):
        schedules.cosine_rise(0, 0, 0.9)
