"""Checkpoints: round trip, keep-last-k, NaN refusal, crash safety, SIGTERM, encoder restore."""
import os
import signal
import subprocess
import sys
import textwrap
import time

import numpy as np
import pytest
import tensorflow as tf

from harl_tf import checkpoints
from harl_tf.models.harl import HARLConfig, HARLModel, make_distributed_step
from harl_tf.lars import LARS
from test_harl_model import batch, make_model


def _step(model, seed=0):
    data = {k: tf.constant(v) for k, v in batch(seed).items()}
    return make_distributed_step(model, tf.distribute.get_strategy(), compile=False)(data)


def test_round_trip_restores_everything_and_keeps_last_k(tmp_path):
    model = make_model()
    manager = checkpoints.CheckpointManager(str(tmp_path), model, every_n_steps=1,
                                            max_to_keep=2)
    for i in range(3):
        _step(model, i)
        assert manager.maybe_save() is not None
    assert checkpoints.available_steps(str(tmp_path)) == [2, 3]
    assert not tf.io.gfile.glob(str(tmp_path / "checkpoints" / "ckpt-1.*"))

    fresh = make_model()
    resumed = checkpoints.CheckpointManager(str(tmp_path), fresh)
    assert resumed.restore_latest() == 3
    for a, b in zip(model.weights, fresh.weights):      # online, target, BN stats, probe
        np.testing.assert_array_equal(a.numpy(), b.numpy(), err_msg=a.path)
    for a, b in zip(model.optimizer.variables, fresh.optimizer.variables):  # momentum, step
        np.testing.assert_array_equal(a.numpy(), b.numpy(), err_msg=a.path)
    # The resumed model continues exactly like the original.
    np.testing.assert_allclose(_step(model, 7)["loss"].numpy(), _step(fresh, 7)["loss"].numpy(),
                               rtol=1e-6)


def test_nan_state_is_never_written(tmp_path):
    model = make_model()
    manager = checkpoints.CheckpointManager(str(tmp_path), model, every_n_steps=1)
    _step(model)
    manager.save()
    _step(model, 1)
    weight = model.online_variables[0]
    weight.assign(np.full(weight.shape, np.nan, np.float32))
    with pytest.raises(checkpoints.NonFiniteStateError, match="last good checkpoint .* step 1"):
        manager.save()
    assert checkpoints.available_steps(str(tmp_path)) == [1]
    assert tf.train.latest_checkpoint(str(tmp_path / "checkpoints")).endswith("ckpt-1")


def test_partial_write_never_moves_the_latest_pointer(tmp_path):
    model = make_model()
    manager = checkpoints.CheckpointManager(str(tmp_path), model, every_n_steps=1)
    _step(model)
    manager.save()
    # What a crash in the middle of saving step 5 can leave behind.
    directory = tmp_path / "checkpoints"
    (directory / "ckpt-5_temp").mkdir()
    (directory / "ckpt-5_temp" / "part-00000-of-00001.data-00000-of-00001").write_bytes(b"x")
    (directory / "ckpt-5.data-00000-of-00001").write_bytes(b"\0" * 10)
    fresh = make_model()
    assert checkpoints.CheckpointManager(str(tmp_path), fresh).restore_latest() == 1


KILLER = textwrap.dedent("""
    import sys, tensorflow as tf
    v = tf.Variable(tf.zeros([4_000_000]))
    m = tf.train.CheckpointManager(tf.train.Checkpoint(v=v), sys.argv[1], max_to_keep=2)
    for step in range(1, 100000):
        v.assign(tf.fill([4_000_000], float(step)))
        m.save(checkpoint_number=step)
        print(step, flush=True)
""")


def test_sigkill_during_saves_leaves_a_complete_latest_checkpoint(tmp_path):
    """A process saving 16 MB checkpoints in a loop is killed at a random moment; the
    latest pointer must name a complete checkpoint whose content is its own step."""
    proc = subprocess.Popen([sys.executable, "-c", KILLER, str(tmp_path)],
                            stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    for _ in range(3):               # let a few saves complete, then kill mid-stream
        proc.stdout.readline()
    time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    latest = tf.train.latest_checkpoint(str(tmp_path))
    step = checkpoints.checkpoint_step(latest)
    v = tf.Variable(tf.zeros([4_000_000]))
    tf.train.Checkpoint(v=v).read(latest).expect_partial().assert_existing_objects_matched()
    assert step >= 3 and np.all(v.numpy() == step)


def test_sigterm_becomes_a_flag_and_handlers_are_restored():
    previous = signal.getsignal(signal.SIGTERM)
    with checkpoints.PreemptionGuard() as guard:
        assert not guard.requested
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(0.01)
        assert guard.requested and guard.signal_received == signal.SIGTERM
    assert signal.getsignal(signal.SIGTERM) is previous


def test_restore_online_encoder_rebuilds_the_resnet(tmp_path):
    config = HARLConfig(encoder=dict(depth=18, output_stride=32), projector_hidden_dim=16,
                        projection_dim=8, predictor_hidden_dim=16, total_steps=4)
    model = HARLModel(config)
    model.compile(optimizer=LARS(0.1))
    model.build_for(32)
    checkpoints.write_model_config(str(tmp_path), model.online_encoder.config,
                                   image_size=32)
    manager = checkpoints.CheckpointManager(str(tmp_path), model, every_n_steps=0)
    model.step_counter.assign(7)
    manager.save()
    # Make online and target differ, so restoring the wrong network would show.
    for v in model.online_encoder.trainable_variables:
        v.assign(v + 0.5)
    model.step_counter.assign(9)
    manager.save()

    encoder, encoder_config, step = checkpoints.restore_online_encoder(str(tmp_path))
    assert step == 9 and encoder.name == "encoder" and encoder_config["depth"] == 18
    for a, b in zip(model.online_encoder.weights, encoder.weights):
        np.testing.assert_array_equal(a.numpy(), b.numpy())
    images = tf.random.stateless_uniform([2, 32, 32, 3], seed=[1, 2])
    np.testing.assert_allclose(encoder(images, training=False).numpy(),
                               model.online_encoder(images, training=False).numpy(),
                               rtol=1e-5, atol=1e-5)
    older, _, step7 = checkpoints.restore_online_encoder(str(tmp_path), step=7)
    assert step7 == 7
    assert not np.array_equal(older.weights[0].numpy(), encoder.weights[0].numpy())
    with pytest.raises(FileNotFoundError, match=r"no checkpoint for step 8 .* \[7, 9\]"):
        checkpoints.restore_online_encoder(str(tmp_path), step=8)
    with pytest.raises(FileNotFoundError, match="model_config.json does not exist"):
        checkpoints.restore_online_encoder(str(tmp_path / "elsewhere"))


def test_resuming_with_another_encoder_is_refused(tmp_path):
    encoder = dict(depth=18, width_multiplier=1, output_stride=32, small_stem=False,
                   name="online_encoder", sync_batchnorm=True)
    checkpoints.write_model_config(str(tmp_path), encoder)
    checkpoints.check_same_encoder(str(tmp_path), encoder)            # same: fine
    with pytest.raises(ValueError, match=r"another encoder \(depth: 18 -> 50\)"):
        checkpoints.check_same_encoder(str(tmp_path), {**encoder, "depth": 50})
    written = checkpoints.read_model_config(str(tmp_path))
    assert written["encoder"]["name"] == "encoder" and not written["encoder"]["sync_batchnorm"]
