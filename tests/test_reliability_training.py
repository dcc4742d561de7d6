"""Faults during pretraining and export: SIGKILL, divergence, a full disk, concurrent export.

- ``python -m harl_tf.pretrain`` killed with SIGKILL at a random moment and rerun with the
  same ``--model_dir``: every checkpoint left is complete, the rerun restores exactly the
  latest one (step counter, optimizer slots and iterations, online and target networks,
  probe), its schedules go on from that step, and it finishes at the right step.
  (SIGTERM is tests/test_pretrain_binary.py; several kills, one of them inside a
  checkpoint write, are ``python -m bench.fault_injection``.)
- An absurd learning rate: training stops with a message naming the last good
  checkpoint, and no checkpoint holding NaN/Inf is ever written; weights that turn NaN
  while the step's loss is still finite are reported as divergence too.
- A full disk under the checkpoints or under the export: an error, and nothing
  half-written left looking complete.
- Export while checkpoints are being written and pruned: it reads one complete checkpoint.
"""
import glob
import json
import os
import random
import re
import signal
import subprocess
import sys
import threading
import time

import numpy as np
import pytest
import tensorflow as tf

from harl_tf import checkpoints, schedules, training
from harl_tf.data import builder, sources
from harl_tf import saved_encoder
from test_reliability_data import small_tmpfs, subprocess_env

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TOTAL_STEPS = 10


@pytest.fixture(scope="module")
def train_files(tmp_path_factory):
    output = str(tmp_path_factory.mktemp("records"))
    builder.build_dataset(sources.SyntheticSource(64, image_size=32), output, num_shards=2,
                          progress=False)
    return os.path.join(output, "train-*.tfrecord")


def tiny_config(train_files, model_dir, **overrides):
    """ResNet-18 at half width and 32 px, small heads, batch 8: the smallest real
    pretraining run."""
    kw = dict(train_files=train_files, num_train_examples=64, image_size=32, depth=18,
              width_multiplier=0.5, output_stride=16, projector_hidden_dim=64, projection_dim=32,
              predictor_hidden_dim=64, batch_size=8, train_steps=TOTAL_STEPS,
              base_learning_rate=1.0, warmup_epochs=0.5, tau_base=0.99, num_classes=8,
              shuffle_buffer=64, seed=0, deterministic=True, model_dir=model_dir,
              checkpoint_every_steps=2, keep_checkpoints=2, log_every_steps=1,
              image_summaries=0)
    kw.update(overrides)
    return training.PretrainConfig(**kw)


def config_flags(config):
    defaults = training.PretrainConfig().flag_values()
    out = []
    for name, value in config.flag_values().items():
        if value == defaults[name] or value is None:
            continue
        out.append(f"--{name}" if value is True else f"--{name}={value}")
    return out


def checkpoint_tensors(prefix):
    """{key: numpy value} of every tensor saved in a checkpoint (reads every byte)."""
    reader = tf.train.load_checkpoint(prefix)
    return {key: reader.get_tensor(key) for key in reader.get_variable_to_shape_map()
            if key != "_CHECKPOINTABLE_OBJECT_GRAPH"}


def assert_every_listed_checkpoint_is_complete(model_dir):
    """Each checkpoint the state file lists reads in full, holds its own step, is finite."""
    steps = checkpoints.available_steps(model_dir)
    for step in steps:
        values = checkpoint_tensors(checkpoints.find_checkpoint(model_dir, step))
        assert int(values["step/.ATTRIBUTES/VARIABLE_VALUE"]) == step
        for key, value in values.items():
            if np.issubdtype(np.asarray(value).dtype, np.floating):
                assert np.all(np.isfinite(value)), (step, key)
    return steps


def _logged(stderr, step, name):
    """A metric of the binary's log line for ``step``."""
    line = re.search(rf"step {step}/\d+ .*", stderr).group(0)
    return float(re.search(rf"  {name} ([-0-9.e]+)", line).group(1))


def test_sigkill_mid_training_resumes_exactly_from_the_last_complete_checkpoint(
        train_files, tmp_path):
    config = tiny_config(train_files, str(tmp_path / "model"))
    command = [sys.executable, "-m", "harl_tf.pretrain", *config_flags(config)]
    proc = subprocess.Popen(command, cwd=REPO, env=subprocess_env(),
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    state = tmp_path / "model" / "checkpoints" / "checkpoint"
    deadline = time.time() + 600
    while time.time() < deadline and proc.poll() is None:
        if state.exists() and max(checkpoints.available_steps(config.model_dir)) >= 4:
            break
        time.sleep(0.02)
    time.sleep(random.Random(os.getpid()).uniform(0.0, 1.0))   # a random moment after
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL, "the run ended before it could be killed"

    steps = assert_every_listed_checkpoint_is_complete(config.model_dir)
    resume_step = steps[-1]
    assert 4 <= resume_step < TOTAL_STEPS
    saved = checkpoint_tensors(checkpoints.find_checkpoint(config.model_dir))

    # What the rerun will restore is exactly what was saved: every tensor of the
    # checkpoint (online + target networks, BN statistics, probe, LARS momentum,
    # iterations, step) comes back unchanged.
    model = training.build_model(config, tf.distribute.get_strategy())
    manager = checkpoints.CheckpointManager(config.model_dir, model, every_n_steps=0)
    assert manager.restore_latest() == resume_step
    assert int(model.optimizer.iterations.numpy()) == resume_step
    rewritten = manager.checkpoint.write(str(tmp_path / "restored" / "ckpt"))
    again = checkpoint_tensors(rewritten)
    assert sorted(again) == sorted(saved)
    momentum = [key for key in saved if key.startswith("optimizer/_variables/")]
    target = [key for key in saved if key.startswith("model/target_encoder/")]
    assert len(momentum) > 60 and len(target) > 60, sorted(saved)[:20]
    for key, value in saved.items():
        np.testing.assert_array_equal(again[key], value, err_msg=key)

    rerun = subprocess.run(command, cwd=REPO, env=subprocess_env(), capture_output=True,
                           text=True, timeout=600)
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    assert f"done: step {TOTAL_STEPS}/{TOTAL_STEPS}" in rerun.stdout
    summary = json.load(open(tmp_path / "model" / "summary.json"))
    assert summary["start_step"] == resume_step and summary["completed"]
    assert summary["final_step"] == TOTAL_STEPS
    assert assert_every_listed_checkpoint_is_complete(config.model_dir)[-1] == TOTAL_STEPS
    # The schedules go on from the resume step, not from 0: the first step after the
    # resume logs learning rate and tau at iteration `resume_step`.
    first = resume_step + 1
    lr = schedules.warmup_cosine_lr(resume_step, config.learning_rate, config.warmup_steps,
                                    config.total_steps)
    tau = schedules.ema_decay_at(resume_step, config.total_steps, config.model.tau_base)
    np.testing.assert_allclose(_logged(rerun.stderr, first, "learning_rate"), float(lr),
                               rtol=1e-3)
    np.testing.assert_allclose(_logged(rerun.stderr, first, "tau"), float(tau), rtol=1e-4)
    logged_steps = [int(s) for s in re.findall(rf"step (\d+)/{TOTAL_STEPS} ", rerun.stderr)]
    assert logged_steps == list(range(first, TOTAL_STEPS + 1)), logged_steps


@pytest.fixture(scope="module")
def diverged(train_files, tmp_path_factory):
    """One run with an absurd learning rate: (the exception it raised, its config). The
    warm-up starts at 0, so step 1 is always good and saved."""
    model_dir = str(tmp_path_factory.mktemp("diverged") / "model")
    config = tiny_config(train_files, model_dir, base_learning_rate=1e9, warmup_epochs=0.5,
                         checkpoint_every_steps=1, keep_checkpoints=100, deterministic=False)
    with pytest.raises(Exception) as info:
        training.run_pretraining(config)
    return info.value, config


def test_divergence_stops_training_and_keeps_the_last_good_checkpoint(diverged):
    error, config = diverged
    assert isinstance(error, (training.TrainingDiverged, checkpoints.NonFiniteStateError))
    steps = assert_every_listed_checkpoint_is_complete(config.model_dir)  # all finite
    assert steps, "no good checkpoint was written before the divergence"
    assert "last good checkpoint" in str(error) and f"step {steps[-1]}" in str(error)
    assert steps[-1] < TOTAL_STEPS
    assert not os.path.exists(os.path.join(config.model_dir, "summary.json"))


@pytest.fixture(scope="module")
def built(train_files, tmp_path_factory):
    """A built (not trained) tiny HARL model with one checkpoint and its model_config."""
    model_dir = str(tmp_path_factory.mktemp("built") / "model")
    config = tiny_config(train_files, model_dir)
    model = training.build_model(config, tf.distribute.get_strategy())
    checkpoints.write_model_config(model_dir, model.online_encoder.config, image_size=32)
    manager = checkpoints.CheckpointManager(model_dir, model, every_n_steps=0, max_to_keep=1)
    manager.save()  # the one checkpoint: tests must not depend on each other's order
    return model, manager, config


def _stamp(model, value):
    """Every online-encoder weight and the step set to ``value``: a torn read would show."""
    for v in model.online_encoder.weights:
        v.assign(tf.fill(v.shape, tf.cast(value, v.dtype)))
    model.step_counter.assign(value)


def test_export_during_checkpoint_writes_reads_one_complete_checkpoint(built, tmp_path):
    model, _, config = built
    manager = checkpoints.CheckpointManager(config.model_dir, model, every_n_steps=0,
                                            max_to_keep=2)
    _stamp(model, 1)
    manager.save()
    written, stop, failures = [1], threading.Event(), []

    def writer():   # saves 2, 3, ... every 1.5 s (faster than any real run), keeps two
        try:
            value = 1
            while not stop.is_set() and value < 60:
                stop.wait(1.5)
                value += 1
                _stamp(model, value)
                manager.save()
                written.append(value)
        except Exception as err:  # noqa: BLE001 - reported below
            failures.append(err)

    thread = threading.Thread(target=writer)
    thread.start()
    try:
        seen, deadline = [], time.time() + 60
        while len(set(seen)) < 3 and time.time() < deadline:   # reads across saves
            encoder, _, step, path = saved_encoder.restore_encoder_from_model_dir(config.model_dir)
            assert all(np.all(v.numpy() == step) for v in encoder.weights), step
            seen.append(step)
        metadata = saved_encoder.export_from_model_dir(config.model_dir,
                                                       str(tmp_path / "export"))
    finally:
        stop.set()
        thread.join()
    assert not failures, failures
    assert len(set(seen)) >= 3, seen             # the reads saw the run move on
    step = metadata["source"]["step"]
    loaded = tf.saved_model.load(str(tmp_path / "export"))
    assert all(np.all(v.numpy() == step) for v in loaded.variables
               if "encoder" in v.name), step


def test_full_disk_leaves_no_checkpoint_or_export_looking_complete(built, tmp_path):
    model, _, config = built
    _stamp(model, 3)
    with small_tmpfs("2m") as disk:
        model_dir = os.path.join(disk, "model")
        manager = checkpoints.CheckpointManager(model_dir, model, every_n_steps=0)
        with pytest.raises(checkpoints.CheckpointWriteError) as info:
            manager.save()
        message = str(info.value)
        assert "No space left on device" in message and "\n" not in message
        assert f"step 3 to {manager.directory}" in message
        assert tf.train.latest_checkpoint(checkpoints.checkpoint_dir(model_dir)) is None
        assert checkpoints.available_steps(model_dir) == []
        assert not glob.glob(os.path.join(model_dir, "checkpoints", "ckpt-*"))  # no _temp

        export_dir = os.path.join(disk, "export")
        with pytest.raises((saved_encoder.ExportError, OSError, tf.errors.OpError)) as info:
            saved_encoder.export_from_model_dir(config.model_dir, export_dir)
        assert "No space left on device" in str(info.value) or "space" in str(info.value)
        assert not os.path.exists(export_dir)
        assert os.listdir(disk) == ["model"] or sorted(os.listdir(disk)) == ["model"]


def test_nan_weights_with_a_finite_loss_are_reported_as_divergence(built, tmp_path):
    """The weights turn NaN in the step whose (pre-update) loss was still finite, and the
    step is a checkpoint step: the run must stop as diverged, not crash."""
    model, _, config = built
    model_dir = str(tmp_path / "model")
    manager = checkpoints.CheckpointManager(model_dir, model, every_n_steps=2)
    _stamp(model, 1)
    manager.save()
    weight = model.online_encoder.weights[0]
    weight.assign(tf.fill(weight.shape, float("nan")))
    model.step_counter.assign(2)
    hooks = training.StepHooks(config, manager, tf.summary.create_noop_writer(),
                               checkpoints.PreemptionGuard(), model)
    try:
        with pytest.raises(training.TrainingDiverged, match="last good checkpoint"):
            hooks.after_step({"loss": 1.5})
    finally:
        _stamp(model, 0)
    assert checkpoints.available_steps(model_dir) == [1]


def test_pretraining_on_a_corrupt_shard_stops_naming_the_file(train_files, tmp_path):
    """A shard with a flipped payload byte: pretraining stops with an error that names the
    file and the record (not TF's byte offset), before any checkpoint of bad data."""
    import shutil
    corrupt_dir = tmp_path / "records"
    corrupt_dir.mkdir()
    for path in sorted(glob.glob(train_files)):
        shutil.copy(path, corrupt_dir)
    victim = sorted(corrupt_dir.iterdir())[0]
    data = bytearray(victim.read_bytes())
    data[len(data) // 2] ^= 0xFF
    victim.write_bytes(bytes(data))
    config = tiny_config(str(corrupt_dir / "train-*.tfrecord"), str(tmp_path / "model"),
                         train_steps=40, checkpoint_every_steps=100)
    with pytest.raises(training.HarlError) as info:
        training.run_pretraining(config)
    assert victim.name in str(info.value) and "record" in str(info.value)
