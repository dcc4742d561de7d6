"""Projector / predictor MLP (SPEC section 3): Linear -> BatchNorm -> ReLU -> Linear."""
import keras
import numpy as np
import pytest
import tensorflow as tf

from harl_tf.models.heads import MLPHead


def _np_head(head, x, batch_statistics):
    """numpy MLP -> (output [B, out], BatchNorm mean used); BatchNorm uses the batch's mean
    and biased variance, or the moving statistics."""
    w1, b1 = head.linear1.kernel.numpy(), head.linear1.bias.numpy()
    w2, b2 = head.linear2.kernel.numpy(), head.linear2.bias.numpy()
    gamma, beta = head.bn.gamma.numpy(), head.bn.beta.numpy()
    h = x.astype(np.float64) @ w1 + b1
    if batch_statistics:
        mean, var = h.mean(0), h.var(0)
    else:
        mean, var = head.bn.moving_mean.numpy(), head.bn.moving_variance.numpy()
    h = (h - mean) / np.sqrt(var + 1e-5) * gamma + beta
    return np.maximum(h, 0) @ w2 + b2, mean


def _head_and_input(seed=0, **kwargs):
    keras.utils.set_random_seed(seed)
    head = MLPHead(hidden_dim=32, output_dim=8, **kwargs)
    x = np.random.default_rng(seed).normal(size=(16, 12)).astype(np.float32)
    head.build(x.shape)
    rng = np.random.default_rng(seed + 1)
    head.bn.gamma.assign(rng.uniform(0.5, 1.5, 32).astype(np.float32))
    head.bn.beta.assign(rng.normal(0, 0.5, 32).astype(np.float32))
    return head, x


def test_training_forward_uses_batch_statistics_and_updates_moving_mean():
    head, x = _head_and_input()
    want, batch_mean = _np_head(head, x, batch_statistics=True)
    got = head(x, training=True)
    assert got.shape == (16, 8) and got.dtype == tf.float32
    np.testing.assert_allclose(got.numpy(), want, rtol=1e-4, atol=1e-5)
    # Keras momentum 0.9 (torchvision's 0.1): moving = 0.9 * 0 + 0.1 * batch mean.
    np.testing.assert_allclose(head.bn.moving_mean.numpy(), 0.1 * batch_mean,
                               rtol=1e-4, atol=1e-6)


def test_inference_forward_uses_moving_statistics():
    head, x = _head_and_input(seed=3)
    head.bn.moving_mean.assign(np.linspace(-1, 1, 32).astype(np.float32))
    head.bn.moving_variance.assign(np.linspace(0.5, 2, 32).astype(np.float32))
    want, _ = _np_head(head, x, batch_statistics=False)
    np.testing.assert_allclose(head(x, training=False).numpy(), want, rtol=1e-4, atol=1e-5)


def test_parameter_count_of_paper_sized_projector():
    head = MLPHead(hidden_dim=4096, output_dim=512, name="projector")
    head.build((None, 2048))
    # 2048*4096 + 4096 (linear1) + 2*4096 (BN affine) + 4096*512 + 512 (linear2)
    trainable = sum(int(np.prod(v.shape)) for v in head.trainable_weights)
    assert trainable == 2048 * 4096 + 4096 + 2 * 4096 + 4096 * 512 + 512
    assert {v.path for v in head.trainable_weights} == {
        "projector/linear1/kernel", "projector/linear1/bias", "projector/bn/gamma",
        "projector/bn/beta", "projector/linear2/kernel", "projector/linear2/bias"}


def test_mixed_precision_output_is_float32():
    keras.mixed_precision.set_global_policy("mixed_float16")
    try:
        head = MLPHead(hidden_dim=32, output_dim=8)
        out = head(np.ones((4, 12), np.float32), training=True)
    finally:
        keras.mixed_precision.set_global_policy("float32")
    assert head.linear1.compute_dtype == "float16"
    assert out.dtype == tf.float32


def test_config_round_trip_and_argument_errors():
    head = MLPHead(hidden_dim=64, output_dim=16, sync_batchnorm=True, name="predictor")
    clone = MLPHead.from_config(head.get_config())
    assert (clone.hidden_dim, clone.output_dim, clone.sync_batchnorm, clone.name) == (
        64, 16, True, "predictor")
    with pytest.raises(ValueError, match="hidden_dim"):
        MLPHead(hidden_dim=0)
    with pytest.raises(ValueError, match="output_dim"):
        MLPHead(output_dim=4.5)


def test_sync_batchnorm_over_two_replicas_equals_full_batch():
    """With synchronised BatchNorm, two replicas holding half a batch each produce what one
    device produces on the whole batch; without it each half uses its own statistics."""
    devices = [d.name for d in tf.config.list_logical_devices("CPU")][:2]
    # ReductionToOneDevice: no collective ops, whose instance keys clash between the
    # MirroredStrategy objects that different test modules create in one process.
    strategy = tf.distribute.MirroredStrategy(
        devices, cross_device_ops=tf.distribute.ReductionToOneDevice())
    reference, x = _head_and_input(seed=5)
    # Halves with very different statistics, so per-replica BatchNorm would differ.
    x[8:] = 3.0 * x[8:] + 2.0
    want, _ = _np_head(reference, x, batch_statistics=True)

    def run(sync):
        with strategy.scope():
            head = MLPHead(hidden_dim=32, output_dim=8, sync_batchnorm=sync)
            head.build(x.shape)
            head.set_weights(reference.get_weights())
        halves = strategy.experimental_distribute_values_from_function(
            lambda ctx: x[8 * ctx.replica_id_in_sync_group:8 * (ctx.replica_id_in_sync_group + 1)])
        out = strategy.run(tf.function(lambda xb: head(xb, training=True)), args=(halves,))
        return np.concatenate([t.numpy() for t in strategy.experimental_local_results(out)])

    np.testing.assert_allclose(run(sync=True), want, rtol=1e-4, atol=1e-4)
    assert np.abs(run(sync=False) - want).max() > 1e-2


def test_call_groups_equals_separate_calls_with_per_group_batchnorm():
    """One matrix product for all groups, BatchNorm statistics per group: outputs equal
    separate calls, and the moving statistics see the same updates in the same order."""
    import numpy as np
    import tensorflow as tf
    rng = np.random.default_rng(0)
    groups = [tf.constant(rng.normal(loc=shift, size=(6, 12)), tf.float32)
              for shift in (0.0, 3.0, -1.0)]
    grouped = MLPHead(hidden_dim=16, output_dim=5, name="grouped")
    separate = MLPHead(hidden_dim=16, output_dim=5, name="separate")
    grouped.build((None, 12))
    separate.build((None, 12))
    for a, b in zip(separate.weights, grouped.weights):
        a.assign(b)
    outs = grouped.call_groups(groups, training=True)
    wants = [separate(x, training=True) for x in groups]
    assert len(outs) == 3
    for out, want in zip(outs, wants):
        np.testing.assert_allclose(out.numpy(), want.numpy(), rtol=1e-5, atol=1e-5)
    for a, b in zip(grouped.bn.weights, separate.bn.weights):
        np.testing.assert_allclose(a.numpy(), b.numpy(), rtol=1e-5, atol=1e-6)
    # Per-group statistics: normalising the groups as one batch would give other outputs.
    pooled = separate(tf.concat(groups, 0), training=True)
    assert np.abs(pooled[:6].numpy() - outs[0].numpy()).max() > 1e-2


def test_row_weights_take_batchnorm_statistics_from_present_rows_only():
    """A region absent from a view pools to a zero vector. With row weights, a group's
    BatchNorm statistics are those of its rows of weight 1 alone: the present rows come out
    exactly as if the absent ones were not in the batch, and the moving statistics see
    the same update; a group with no present row leaves the moving statistics alone."""
    rng = np.random.default_rng(3)
    fg = rng.normal(loc=2.0, size=(8, 12)).astype(np.float32)
    fg[[1, 4, 6]] = 0.0                       # three views without a foreground
    weights = np.ones(8, np.float32)
    weights[[1, 4, 6]] = 0.0
    glob = rng.normal(size=(8, 12)).astype(np.float32)
    grouped = MLPHead(hidden_dim=16, output_dim=5, name="grouped")
    separate = MLPHead(hidden_dim=16, output_dim=5, name="separate")
    for head in (grouped, separate):
        head.build((None, 12))
    for a, b in zip(separate.weights, grouped.weights):
        a.assign(b)
    out_fg, out_glob = grouped.call_groups([tf.constant(fg), tf.constant(glob)],
                                           training=True, row_weights=[weights, None])
    present = weights > 0
    want_fg = separate(tf.constant(fg[present]), training=True).numpy()
    want_glob = separate(tf.constant(glob), training=True).numpy()
    np.testing.assert_allclose(out_fg.numpy()[present], want_fg, rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(out_glob.numpy(), want_glob, rtol=1e-4, atol=1e-4)
    for a, b in zip(grouped.bn.non_trainable_weights, separate.bn.non_trainable_weights):
        np.testing.assert_allclose(a.numpy(), b.numpy(), rtol=1e-4, atol=1e-5)
    # Unweighted statistics include the zero rows and give other outputs.
    plain_fg, _ = grouped.call_groups([tf.constant(fg), tf.constant(glob)], training=True)
    assert np.abs(plain_fg.numpy()[present] - want_fg).max() > 1e-2

    # A group with no present row: its moving statistics are not touched.
    empty = MLPHead(hidden_dim=16, output_dim=5, name="empty")
    empty.build((None, 12))
    before = [w.numpy().copy() for w in empty.bn.non_trainable_weights]
    empty.call_groups([tf.zeros((4, 12)), tf.zeros((4, 12))], training=True,
                      row_weights=[np.zeros(4, np.float32), np.zeros(4, np.float32)])
    for a, b in zip(empty.bn.non_trainable_weights, before):
        np.testing.assert_array_equal(a.numpy(), b)
