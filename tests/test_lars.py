"""LARS (SPEC section 6) against a plain numpy implementation of its update rule."""
import keras
import numpy as np
import pytest
import tensorflow as tf

from harl_tf.lars import LARS


def _np_lars(w, grads, lr, momentum, wd, eta, excluded):
    """Reference: g += wd w; trust = eta |w| / |g| (1 if a norm is 0); v = m v + lr trust g;
    w -= v. Excluded variables skip the first two lines. Returns w after every step."""
    w = np.array(w, np.float64)
    v = np.zeros_like(w)
    history = []
    for g in grads:
        g = np.array(g, np.float64)
        trust = 1.0
        if not excluded:
            g = g + wd * w
            w_norm, g_norm = np.linalg.norm(w), np.linalg.norm(g)
            if w_norm > 0 and g_norm > 0:
                trust = eta * w_norm / g_norm
        v = momentum * v + lr * trust * g
        w = w - v
        history.append(w.copy())
    return history


@pytest.mark.parametrize("eta", [1e-3, 0.5])
def test_update_matches_numpy_over_several_steps(eta):
    rng = np.random.default_rng(0)
    kernel0 = rng.normal(size=(3, 4)).astype(np.float32)   # rank 2: adapted and decayed
    bias0 = rng.normal(size=(4,)).astype(np.float32)       # rank 1: excluded
    zero0 = np.zeros((2, 2), np.float32)                    # rank 2, |w| = 0 -> trust 1
    kernel = keras.Variable(kernel0, name="kernel")
    bias = keras.Variable(bias0, name="bias")
    zero = keras.Variable(zero0, name="zero_kernel")
    lr, momentum, wd = 0.3, 0.9, 0.1
    opt = LARS(learning_rate=lr, momentum=momentum, weight_decay=wd, trust_coefficient=eta)
    steps = 4
    g_kernel = rng.normal(size=(steps, 3, 4)).astype(np.float32)
    g_bias = rng.normal(size=(steps, 4)).astype(np.float32)
    g_zero = rng.normal(size=(steps, 2, 2)).astype(np.float32)
    got_k, got_b, got_z = [], [], []
    for s in range(steps):
        opt.apply_gradients([(g_kernel[s], kernel), (g_bias[s], bias), (g_zero[s], zero)])
        got_k.append(kernel.numpy()), got_b.append(bias.numpy()), got_z.append(zero.numpy())
    want_k = _np_lars(kernel0, g_kernel, lr, momentum, wd, eta, excluded=False)
    want_b = _np_lars(bias0, g_bias, lr, momentum, wd, eta, excluded=True)
    want_z = _np_lars(zero0, g_zero, lr, momentum, wd, eta, excluded=False)
    np.testing.assert_allclose(got_k, want_k, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(got_b, want_b, rtol=1e-5, atol=1e-6)
    # Step 1 of the zero variable: trust = 1 and wd * 0 = 0, so w = -lr * g exactly.
    np.testing.assert_allclose(got_z[0], -lr * g_zero[0], rtol=1e-6)
    np.testing.assert_allclose(got_z, want_z, rtol=1e-5, atol=1e-6)


def test_excluded_variable_is_plain_momentum_sgd():
    rng = np.random.default_rng(1)
    bias0 = rng.normal(size=(5,)).astype(np.float32)
    grads = rng.normal(size=(3, 5)).astype(np.float32)
    bias = keras.Variable(bias0)
    sgd_bias = keras.Variable(bias0)
    lars = LARS(learning_rate=0.2, momentum=0.9, weight_decay=0.5)
    sgd = keras.optimizers.SGD(learning_rate=0.2, momentum=0.9)
    for g in grads:
        lars.apply_gradients([(g, bias)])
        sgd.apply_gradients([(g, sgd_bias)])
    np.testing.assert_allclose(bias.numpy(), sgd_bias.numpy(), rtol=1e-6)


def test_exclusion_rule_on_keras_variable_paths():
    model = keras.Sequential([
        keras.Input((6,)),
        keras.layers.Dense(4, name="linear1"),
        keras.layers.BatchNormalization(name="bn"),
        keras.layers.Dense(2, name="head"),
    ], name="net")
    by_path = {v.path: v for v in model.trainable_variables}
    assert set(by_path) == {"net/linear1/kernel", "net/linear1/bias", "net/bn/gamma",
                            "net/bn/beta", "net/head/kernel", "net/head/bias"}
    default = LARS()
    assert [p for p in sorted(by_path) if not default.is_excluded(by_path[p])] == [
        "net/head/kernel", "net/linear1/kernel"]
    patterned = LARS(exclude_patterns=[r"^net/head/"])
    assert patterned.is_excluded(by_path["net/head/kernel"])
    assert not patterned.is_excluded(by_path["net/linear1/kernel"])
    rank_only_off = LARS(exclude_rank1=False, exclude_patterns=[r"/bn/"])
    assert rank_only_off.is_excluded(by_path["net/bn/gamma"])
    assert not rank_only_off.is_excluded(by_path["net/linear1/bias"])
    with pytest.raises(TypeError, match="exclude_patterns"):
        LARS(exclude_patterns=r"bias$")


def test_config_round_trip_keeps_lars_weight_decay():
    opt = LARS(learning_rate=0.1, momentum=0.8, weight_decay=5e-7, trust_coefficient=2e-3,
               exclude_patterns=[r"bias$"])
    config = opt.get_config()
    assert config["weight_decay"] == 5e-7
    clone = LARS.from_config(config)
    assert (clone.momentum, clone.lars_weight_decay, clone.trust_coefficient,
            clone.exclude_patterns) == (0.8, 5e-7, 2e-3, (r"bias$",))
    # The Keras base class's decoupled decay must stay off, or decay would apply twice.
    assert clone.weight_decay is None


def test_two_replica_mirrored_step_equals_single_device_numpy():
    """Keras sums the per-replica gradients; with the loss scaled by 1/global batch the
    result equals one full-batch step."""
    devices = [d.name for d in tf.config.list_logical_devices("CPU")][:2]
    assert len(devices) == 2, "tests/conftest.py should create two logical CPU devices"
    # ReductionToOneDevice: no collective ops, whose instance keys clash between the
    # MirroredStrategy objects that different test modules create in one process.
    strategy = tf.distribute.MirroredStrategy(
        devices, cross_device_ops=tf.distribute.ReductionToOneDevice())
    rng = np.random.default_rng(2)
    x = rng.normal(size=(8, 4)).astype(np.float32)
    y = rng.normal(size=(8, 3)).astype(np.float32)
    w0 = rng.normal(size=(4, 3)).astype(np.float32)
    b0 = rng.normal(size=(3,)).astype(np.float32)
    lr, momentum, wd, eta = 0.5, 0.9, 0.01, 0.1
    with strategy.scope():
        w = keras.Variable(w0, name="kernel")
        b = keras.Variable(b0, name="bias")
        opt = LARS(learning_rate=lr, momentum=momentum, weight_decay=wd,
                   trust_coefficient=eta)
        opt.build([w, b])
    global_batch = x.shape[0]

    def shard(ctx):
        half = global_batch // ctx.num_replicas_in_sync
        i = ctx.replica_id_in_sync_group
        return x[i * half:(i + 1) * half], y[i * half:(i + 1) * half]

    data = strategy.experimental_distribute_values_from_function(shard)

    @tf.function
    def train_step(batch):
        def step(xb, yb):
            with tf.GradientTape() as tape:
                residual = tf.matmul(xb, w.value) + b.value - yb
                loss = tf.reduce_sum(tf.square(residual)) / global_batch
            grads = tape.gradient(loss, [w.value, b.value])
            opt.apply_gradients(zip(grads, [w, b]))
        strategy.run(step, args=batch)

    for _ in range(3):
        train_step(data)

    # numpy: full-batch gradient of mean_n |x_n W + b - y_n|^2, 3 LARS steps.
    wr, br = w0.astype(np.float64), b0.astype(np.float64)
    vw, vb = np.zeros_like(wr), np.zeros_like(br)
    for _ in range(3):
        r = x @ wr + br - y
        gw = 2 * x.T @ r / global_batch + wd * wr
        gb = 2 * r.sum(0) / global_batch
        vw = momentum * vw + lr * eta * np.linalg.norm(wr) / np.linalg.norm(gw) * gw
        vb = momentum * vb + lr * gb
        wr, br = wr - vw, br - vb
    np.testing.assert_allclose(w.numpy(), wr, rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(b.numpy(), br, rtol=1e-4, atol=1e-5)
