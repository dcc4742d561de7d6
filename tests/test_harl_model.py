"""HARLModel: the training step, the EMA target and global-batch averaging (SPEC §4–6).

A tiny two-conv encoder (synchronised BatchNorm) stands in for the ResNet to keep these
tests fast; the real ResNet is exercised by tests/test_pretrain_binary.py.
"""
import numpy as np
import pytest
import keras
import tensorflow as tf

from harl_tf import distribute
from harl_tf.lars import LARS
from harl_tf.models.harl import HARLConfig, HARLModel, make_distributed_step

from _steps import assert_same_step

IMAGE = 32
BATCH = 8


class TinyEncoder(keras.Model):
    """conv(stride 2) → BN → ReLU → conv(stride 2) → BN → ReLU: [B,32,32,3] → [B,8,8,16]."""

    def __init__(self, sync, name):
        super().__init__(name=name)
        self.conv1 = keras.layers.Conv2D(8, 3, strides=2, padding="same", name="conv1")
        self.bn1 = keras.layers.BatchNormalization(synchronized=sync, name="bn1")
        self.conv2 = keras.layers.Conv2D(16, 3, strides=2, padding="same", name="conv2")
        self.bn2 = keras.layers.BatchNormalization(synchronized=sync, name="bn2")

    def call(self, x, training=False):
        x = tf.nn.relu(self.bn1(self.conv1(x), training=training))
        return tf.nn.relu(self.bn2(self.conv2(x), training=training))


def tiny_encoder(config, name):
    return TinyEncoder(config.sync_batchnorm, name)


def make_model(strategy=None, run_eagerly=False, **overrides):
    strategy = strategy or tf.distribute.get_strategy()
    kw = dict(encoder={}, projector_hidden_dim=32, projection_dim=16, predictor_hidden_dim=32,
              sync_batchnorm=True, total_steps=10, tau_base=0.9, num_classes=3)
    kw.update(overrides)
    with strategy.scope():
        model = HARLModel(HARLConfig(**kw), encoder_factory=tiny_encoder)
        model.compile(optimizer=LARS(0.5, weight_decay=1e-4), run_eagerly=run_eagerly)
        model.build_for(IMAGE)
    return model


def batch(seed=0, empty_fg=False):
    rng = np.random.default_rng(seed)
    masks = np.zeros((2, BATCH, IMAGE, IMAGE, 1), np.float32)
    if not empty_fg:
        masks[0, :, 4:20, 6:26] = 1
        masks[1, :, 10:30, 0:16] = 1
        masks[1, 1] = 1          # example 1: no background in view 2
        masks[0, 2] = 0          # example 2: no foreground in view 1
    return {"view1": rng.random((BATCH, IMAGE, IMAGE, 3), np.float32),
            "view2": rng.random((BATCH, IMAGE, IMAGE, 3), np.float32),
            "mask1": masks[0], "mask2": masks[1],
            "label": np.array([0, 1, 2, 0, 1, 2, -1, 0], np.int64)}


def copy_weights(src, dst):
    for a, b in zip(src.weights, dst.weights):
        b.assign(a.numpy())


def snapshot(variables):
    return [v.numpy().copy() for v in variables]


def test_target_gets_no_gradient_and_moves_by_the_ema_rule():
    model = make_model()
    data = {k: tf.constant(v) for k, v in batch().items()}
    with tf.GradientTape(persistent=True) as tape:
        loss, _, _ = model.loss_and_logs(data, 0.7, 0.7)
    target_grads = tape.gradient(loss, model.target_variables)
    assert all(g is None for g in target_grads)
    assert not {id(v) for v in model.target_variables} & {id(v) for v in model.online_variables}

    xi_before = snapshot(model.target_variables)
    metrics = make_distributed_step(model, tf.distribute.get_strategy(), compile=False)(data)
    theta_after = [o.numpy() for _, o in model._ema_pairs]
    tau = metrics["tau"].numpy()
    assert tau == pytest.approx(0.9, abs=1e-7)          # τ_0 = τ_base
    for xi0, th, xi in zip(xi_before, theta_after, model.target_variables):
        np.testing.assert_allclose(xi.numpy(), tau * xi0 + (1 - tau) * th, rtol=1e-6,
                                   atol=1e-7)
    # ...and the online network really moved, so the check above is not vacuous.
    assert any(np.abs(th - xi0).max() > 1e-4 for th, xi0 in zip(theta_after, xi_before))
    assert int(model.step_counter.numpy()) == 1
    # BatchNorm moving statistics are not EMA'd: the target's own forward passes move them.
    target_mean = model.target_encoder.bn1.moving_mean.numpy()
    assert np.abs(target_mean).max() > 0


def test_metrics_of_a_step_match_their_definitions():
    model = make_model()
    data = {k: tf.constant(v) for k, v in batch().items()}
    m = make_distributed_step(model, tf.distribute.get_strategy(), compile=False)(data)
    # example 2 lacks foreground in view 1, example 1 background in view 2.
    assert m["valid_fg"].numpy() == pytest.approx(7 / 8)
    assert m["valid_bg"].numpy() == pytest.approx(7 / 8)
    a, lam = m["alpha"].numpy(), m["lambda"].numpy()
    assert a == pytest.approx(0.7) and lam == pytest.approx(0.7)
    want = lam * (a * m["loss_fg"] + (1 - a) * m["loss_bg"]) + (1 - lam) * m["loss_glob"]
    assert m["loss"].numpy() == pytest.approx(float(want), rel=1e-6)
    assert 0 <= m["loss"].numpy() <= 8          # two directions of 2 − 2cos
    assert m["labelled"].numpy() == pytest.approx(7 / 8)
    assert m["learning_rate"].numpy() == pytest.approx(0.5)


def test_byol_mode_equals_hybrid_with_lambda_zero():
    byol = make_model(loss_mode="byol")
    hybrid = make_model(loss_mode="hybrid", lambda_base=0.0, lambda_schedule="constant")
    copy_weights(byol, hybrid)
    before = snapshot(byol.online_variables + byol.target_variables)
    data = {k: tf.constant(v) for k, v in batch().items()}
    mb = make_distributed_step(byol, tf.distribute.get_strategy(), compile=False)(data)
    mh = make_distributed_step(hybrid, tf.distribute.get_strategy(), compile=False)(data)
    # Losses near 4: float32 rounding is ~5e-7 there; λ = 0.01 instead of 0 moves it ~1e-3.
    assert mb["loss"].numpy() == pytest.approx(mh["loss"].numpy(), abs=1e-5)
    assert mb["loss"].numpy() == pytest.approx(mb["loss_glob"].numpy(), abs=1e-5)
    # Hybrid runs its three regions through each head layer as one matrix product, BYOL
    # its one region alone: the same rows, summed in a different blocking, so the weights
    # agree to float32 rounding. λ = 0.01 instead of 0 (a region weighted 1 % wrongly)
    # moves the BatchNorm parameters by 1-2 % of their step, ~1e-3: the check fails then.
    assert_same_step(before, hybrid.online_variables + hybrid.target_variables,
                     byol.online_variables + byol.target_variables)


def test_batch_without_foreground_gives_finite_loss_and_no_gradient_from_it():
    model = make_model(loss_mode="mask", alpha_schedule="constant", alpha_base=0.7)
    data = {k: tf.constant(v) for k, v in batch(empty_fg=True).items()}
    with tf.GradientTape(persistent=True) as tape:
        loss, logs, _ = model.loss_and_logs(data, 0.7, 1.0)
    assert logs["valid_fg"].numpy() == 0 and np.isfinite(loss.numpy())
    assert logs["loss_fg"].numpy() == 0.0
    grads = tape.gradient(logs["loss_fg"], model.online_variables)
    assert all(g is None or not np.any(g.numpy()) for g in grads)
    np.testing.assert_allclose(loss.numpy(), 0.3 * logs["loss_bg"].numpy(), rtol=1e-6)
    metrics = make_distributed_step(model, tf.distribute.get_strategy(), compile=False)(data)
    assert metrics["valid_fg"].numpy() == 0.0
    assert all(np.all(np.isfinite(v.numpy())) for v in model.online_variables)


def _one_step_fit(strategy, reference, run_eagerly=False, **overrides):
    model = make_model(strategy, run_eagerly=run_eagerly, **overrides)
    copy_weights(reference, model)
    dataset = tf.data.Dataset.from_tensors(batch(3)).repeat()
    history = model.fit(dataset, epochs=1, steps_per_epoch=1, verbose=0, shuffle=False)
    return model, history.history


def test_one_and_two_replicas_take_the_same_step():
    """fit on 1 replica, fit on 2 replicas and the strategy.run loop on 2 replicas agree."""
    strategy = distribute.make_strategy("mirrored", devices=["/cpu:0", "/cpu:1"])
    reference = make_model()
    one, h1 = _one_step_fit(tf.distribute.get_strategy(), reference, run_eagerly=True)
    two, h2 = _one_step_fit(strategy, reference, run_eagerly=True)
    for key in ("loss", "loss_fg", "loss_bg", "loss_glob", "valid_fg", "probe_loss"):
        assert h1[key][0] == pytest.approx(h2[key][0], abs=1e-5), key
    assert h1["valid_fg"][0] == pytest.approx(7 / 8)
    assert len(one.weights) == len(two.weights)
    # Two replicas sum the global batch in another order: the same step to rounding. A
    # per-replica mean in place of the global one would double the SGD-updated steps.
    before = snapshot(reference.weights)
    assert_same_step(before, two.weights, one.weights)

    looped = make_model(strategy)
    copy_weights(reference, looped)
    dist = strategy.experimental_distribute_dataset(tf.data.Dataset.from_tensors(batch(3)))
    metrics = make_distributed_step(looped, strategy, compile=False)(next(iter(dist)))
    assert metrics["loss"].numpy() == pytest.approx(h1["loss"][0], abs=1e-5)
    assert_same_step(before, looped.weights, one.weights)


def test_valid_region_batchnorm_changes_the_step_and_agrees_across_replicas():
    """Head BatchNorm over present regions only (the batch has a view without foreground
    and one without background): a different step from the plain statistics, and 1 and 2
    replicas (synchronised sums of the weighted moments) still take the same step."""
    strategy = distribute.make_strategy("mirrored", devices=["/cpu:0", "/cpu:1"])
    reference = make_model(valid_region_batchnorm=True)
    one, h1 = _one_step_fit(tf.distribute.get_strategy(), reference, run_eagerly=True,
                            valid_region_batchnorm=True)
    two, h2 = _one_step_fit(strategy, reference, run_eagerly=True,
                            valid_region_batchnorm=True)
    plain, h0 = _one_step_fit(tf.distribute.get_strategy(), reference, run_eagerly=True)
    for key in ("loss", "loss_fg", "loss_bg", "loss_glob"):
        assert h1[key][0] == pytest.approx(h2[key][0], abs=1e-5), key
    # The weighted moments over present regions lose more to rounding when their sums are
    # split across replicas than plain ones: a BatchNorm gamma's two steps once differed
    # by 1.9e-3 of the step. Per-replica moments (sync_batchnorm off) differ by 2.2 times
    # the step, so 1 % still catches them.
    assert_same_step(snapshot(reference.weights), two.weights, one.weights, step_rtol=1e-2)
    assert h1["loss_glob"][0] == pytest.approx(h0["loss_glob"][0], abs=1e-6)
    assert abs(h1["loss_fg"][0] - h0["loss_fg"][0]) > 1e-4


@pytest.mark.parametrize("policy", ["mixed_float16", "mixed_bfloat16"])
def test_mixed_precision_step_is_finite_and_close_to_float32(policy):
    reference = make_model()
    data = {k: tf.constant(v) for k, v in batch(4).items()}
    keras.config.set_dtype_policy(policy)
    try:
        kw = dict(encoder={}, projector_hidden_dim=32, projection_dim=16,
                  predictor_hidden_dim=32, sync_batchnorm=True, total_steps=10, num_classes=3)
        model = HARLModel(HARLConfig(**kw), encoder_factory=tiny_encoder)
        optimizer = LARS(0.5, weight_decay=1e-4)
        if policy == "mixed_float16":
            optimizer = keras.optimizers.LossScaleOptimizer(optimizer)
        model.compile(optimizer=optimizer)
        model.build_for(IMAGE)
        copy_weights(reference, model)
        m = make_distributed_step(model, tf.distribute.get_strategy(), compile=False)(data)
    finally:
        keras.config.set_dtype_policy("float32")
    m32 = make_distributed_step(reference, tf.distribute.get_strategy(), compile=False)(data)
    assert np.isfinite(m["loss"].numpy())
    assert m["loss"].numpy() == pytest.approx(m32["loss"].numpy(), abs=0.05)
    assert all(v.dtype == "float32" for v in model.online_variables)
    # Kernels take the same step. (Biases in front of a BatchNorm have a zero gradient in
    # exact arithmetic; in half precision that zero is rounding noise, so skip rank-1.)
    for a, b in zip(model.online_variables, reference.online_variables):
        if len(a.shape) > 1:
            np.testing.assert_allclose(a.numpy(), b.numpy(), atol=0.02, err_msg=a.path)


def test_online_probe_learns_only_from_labelled_examples_and_leaves_theta_alone():
    """Features that carry the label: the probe must beat chance (1/3) within a few steps."""
    model = make_model(probe_learning_rate=0.05)
    rng = np.random.default_rng(5)
    labels = np.tile(np.array([0, 1, 2, -1], np.int64), 4)           # 16, a quarter unlabelled
    theta = snapshot(model.online_variables)
    accuracies = []
    for _ in range(30):
        feats = rng.normal(size=(16, 16)).astype(np.float32)
        feats[np.arange(16), np.maximum(labels, 0)] += 3.0 * (labels >= 0)
        logs = model._probe_step((tf.constant(feats),) * 2, tf.constant(labels))
        accuracies.append(float(logs["probe_top1"]))
    assert logs["labelled"].numpy() == pytest.approx(0.75)
    assert np.mean(accuracies[-5:]) > 0.9 > 1 / 3
    for before, v in zip(theta, model.online_variables):
        np.testing.assert_array_equal(before, v.numpy())


def test_an_xla_compiled_step_takes_the_same_step_as_the_plain_one():
    """--jit_compile changes how the step runs, not what it computes: two steps compiled
    with XLA give the plain graph's metrics and weights up to float32 rounding (XLA fuses
    and reorders sums; seen: up to 1e-5 relative on the losses and 6e-5 on the weights, each
    under 1 % of what the steps moved it)."""
    keras.utils.set_random_seed(0)
    plain, xla = make_model(), make_model()
    copy_weights(plain, xla)
    initial = snapshot(plain.weights)
    strategy = tf.distribute.get_strategy()
    steps = {"plain": make_distributed_step(plain, strategy),
             "xla": make_distributed_step(xla, strategy, jit_compile=True)}
    metrics = {name: [step({k: tf.constant(v) for k, v in batch(seed).items()})
                      for seed in (1, 2)] for name, step in steps.items()}
    for m_plain, m_xla in zip(metrics["plain"], metrics["xla"]):
        assert sorted(m_plain) == sorted(m_xla)
        for key in m_plain:
            np.testing.assert_allclose(m_xla[key].numpy(), m_plain[key].numpy(), rtol=1e-4,
                                       atol=1e-6, err_msg=key)
    assert metrics["plain"][1]["loss"].numpy() != metrics["plain"][0]["loss"].numpy()
    for before, a, b in zip(initial, plain.weights, xla.weights):
        moved, apart = np.abs(a.numpy() - before).max(), np.abs(b.numpy() - a.numpy()).max()
        assert apart <= 1e-4, a.path
        # Biases in front of a BatchNorm have a zero gradient, up to rounding noise.
        assert moved < 1e-5 or apart < 0.01 * moved, (a.path, moved, apart)
