"""Checkpoints: atomic writes, keep-last-k, resume, SIGTERM, and restore of the online encoder.

Layout of a model directory::

    model_dir/
      model_config.json        written (atomically) at the start of training:
                               {"format": 1, "encoder": <ResNet config, name "encoder">,
                                "harl": <HARLConfig>, "image_size": S}
      flags.json / config.json / summary.json   (training.py)
      checkpoints/
        checkpoint             TF's state file: the latest pointer + the kept list
        ckpt-<step>.index      one checkpoint per saved step (the number IS the step)
        ckpt-<step>.data-00000-of-00001

Each checkpoint is a ``tf.train.Checkpoint`` with the children
``model`` (HARLModel: online + target networks, probe, step counter),
``online_encoder`` (the same encoder object, a second path so it can be restored alone),
``optimizer`` (LARS, or the LossScaleOptimizer around it: momentum, iterations, loss scale),
``probe_optimizer`` (when there is a probe) and ``step`` (int64, the training step).

Atomicity (verified against TF 2.21 sources and by tests/test_checkpoints.py):
``tf.train.CheckpointManager.save`` first writes the tensors (SaveV2 writes shards into a
temporary ``ckpt-N_temp`` directory, MergeV2Checkpoints then moves them into place and
writes ``ckpt-N.index`` last), and only afterwards rewrites the ``checkpoint`` state file
with ``atomic_write_string_to_file`` (temp file + rename). A crash at any point therefore
leaves the ``checkpoint`` pointer on the previous, complete checkpoint; a half-written
``ckpt-N`` is ignored and overwritten by the next save of step N.

NaN guard: :meth:`CheckpointManager.save` refuses to write a state whose weights are not all
finite (raises :class:`NonFiniteStateError`), so the last good checkpoint survives a
diverged run.

SIGTERM: :class:`PreemptionGuard` turns SIGTERM into a flag; the training loop checks it after
each step, saves and exits cleanly (TF cannot save safely from inside a signal handler while a
step is running).

Multi-worker: every worker must call ``save`` (variables may need collective reads); only the
chief writes to ``model_dir/checkpoints``, the others write to a private temporary directory
that is deleted right away (the TF multi-worker recipe).
"""
from __future__ import annotations

import glob
import json
import os
import shutil
import signal
from typing import Optional

import tensorflow as tf

from harl_tf.atomic import write_json_atomic
from harl_tf.errors import ConfigError, DataError, HarlError, MissingPathError
from harl_tf.models.resnet import build_encoder

MODEL_CONFIG_FILE = "model_config.json"
CHECKPOINT_DIR = "checkpoints"
CHECKPOINT_NAME = "ckpt"
CONFIG_FORMAT = 1


class CheckpointWriteError(HarlError):
    """A checkpoint could not be written (disk full, read-only); nothing partial is left
    and the message names the last complete checkpoint."""


class NonFiniteStateError(HarlError, RuntimeError):
    """The model holds NaN/Inf weights; saving it would overwrite a good checkpoint."""


# JSON ---------------------------------------------------------------------------------------

def read_json(path: str, what: str) -> dict:
    """Read a JSON file, with an error that names the file and what it should hold."""
    if not os.path.exists(path):
        raise MissingPathError(f"{what}: {path} does not exist.")
    with open(path) as f:
        try:
            return json.load(f)
        except json.JSONDecodeError as e:
            raise DataError(f"{what}: {path} is not valid JSON ({e}).") from None


def export_encoder_config(encoder_config: dict) -> dict:
    """The encoder config recorded for export: same architecture, named "encoder", plain BN."""
    return {**encoder_config, "name": "encoder", "sync_batchnorm": False}


def write_model_config(model_dir: str, encoder_config: dict, harl_config: Optional[dict] = None,
                       image_size: Optional[int] = None) -> str:
    """Write ``model_dir/model_config.json`` (atomically); returns its path."""
    path = os.path.join(model_dir, MODEL_CONFIG_FILE)
    write_json_atomic(path, {"format": CONFIG_FORMAT,
                             "encoder": export_encoder_config(encoder_config),
                             "harl": harl_config or {}, "image_size": image_size})
    return path


def check_same_encoder(model_dir: str, encoder_config: dict) -> None:
    """Refuse to resume a run directory with a different encoder (ValueError naming keys)."""
    path = os.path.join(model_dir, MODEL_CONFIG_FILE)
    if not os.path.exists(path):
        return
    saved = read_model_config(model_dir)["encoder"]
    wanted = export_encoder_config(encoder_config)
    differ = sorted(k for k in set(saved) | set(wanted) if saved.get(k) != wanted.get(k))
    if differ:
        details = ", ".join(f"{k}: {saved.get(k)!r} -> {wanted.get(k)!r}" for k in differ)
        raise ConfigError(f"--model_dir={model_dir} holds a run with another encoder ({details}); "
                          f"use a new --model_dir or the original flags.")


def read_model_config(model_dir: str) -> dict:
    """Read ``model_dir/model_config.json``."""
    config = read_json(os.path.join(model_dir, MODEL_CONFIG_FILE),
                       "model config of a pretraining run")
    if "encoder" not in config:
        raise DataError(f"{os.path.join(model_dir, MODEL_CONFIG_FILE)} has no 'encoder' "
                        f"entry; found keys {sorted(config)}.")
    return config


# Finding checkpoints -----------------------------------------------------------------------

def checkpoint_dir(model_dir: str) -> str:
    return os.path.join(model_dir, CHECKPOINT_DIR)


def checkpoint_step(path: str) -> int:
    """Step of a checkpoint prefix ``.../ckpt-<step>``."""
    return int(os.path.basename(path).rsplit("-", 1)[1])


def available_steps(model_dir: str):
    """Steps of the complete checkpoints listed in the state file, oldest first."""
    state = tf.train.get_checkpoint_state(checkpoint_dir(model_dir))
    if state is None:
        return []
    return [checkpoint_step(p) for p in state.all_model_checkpoint_paths]


def find_checkpoint(model_dir: str, step: Optional[int] = None) -> str:
    """Prefix of the latest checkpoint (``step=None``) or of the one at ``step``."""
    directory = checkpoint_dir(model_dir)
    if step is None:
        path = tf.train.latest_checkpoint(directory)
        if path is None:
            raise MissingPathError(f"no checkpoint in {directory} (is --model_dir the "
                                   f"directory of a pretraining run?).")
        return path
    path = os.path.join(directory, f"{CHECKPOINT_NAME}-{int(step)}")
    if not tf.io.gfile.exists(path + ".index"):
        raise MissingPathError(f"no checkpoint for step {step} in {directory}; available "
                               f"steps: {available_steps(model_dir)}.")
    return path


# The manager -------------------------------------------------------------------------------

def weights_are_finite(variables) -> bool:
    """True when every floating-point variable holds only finite values."""
    for v in variables:
        if tf.as_dtype(v.dtype).is_floating:
            if not bool(tf.reduce_all(tf.math.is_finite(tf.convert_to_tensor(v)))):
                return False
    return True


class CheckpointManager:
    """Save every ``every_n_steps`` steps and at the end, keep the last ``max_to_keep``, resume.

    Args:
      model_dir: run directory; checkpoints go to ``model_dir/checkpoints``.
      model: a built HARLModel (compiled: its optimizer's slots must exist before restore).
      every_n_steps: save period in steps (0: only explicit/final saves).
      max_to_keep: number of checkpoints kept.
      is_chief: False on non-chief multi-worker tasks (they save to a throw-away directory).
    """

    def __init__(self, model_dir: str, model, *, every_n_steps: int = 1000,
                 max_to_keep: int = 3, is_chief: bool = True, worker_id: int = 0):
        self.model_dir = model_dir
        self.model = model
        self.every_n_steps = int(every_n_steps)
        self.is_chief = is_chief
        children = {"model": model, "online_encoder": model.online_encoder,
                    "optimizer": model.optimizer, "step": model.step_counter}
        if getattr(model, "probe_optimizer", None) is not None:
            children["probe_optimizer"] = model.probe_optimizer
        self.checkpoint = tf.train.Checkpoint(**children)
        if is_chief:
            directory = checkpoint_dir(model_dir)
        else:
            directory = os.path.join(model_dir, f".worker-{worker_id}-tmp")
        self.directory = directory
        self.manager = tf.train.CheckpointManager(
            self.checkpoint, directory, max_to_keep=max_to_keep,
            checkpoint_name=CHECKPOINT_NAME)
        self.last_saved_step = None

    @property
    def step(self) -> int:
        return int(self.model.step_counter.numpy())

    def restore_latest(self) -> int:
        """Restore the newest complete checkpoint of ``model_dir``; return its step (0: none)."""
        path = tf.train.latest_checkpoint(checkpoint_dir(self.model_dir))
        if path is None:
            return 0
        status = self.checkpoint.restore(path)
        try:
            status.assert_existing_objects_matched()
        except AssertionError as e:
            raise ConfigError(
                f"checkpoint {path} does not match the model built from the flags (was "
                f"--model_dir used with other model flags?): {str(e).splitlines()[0]}"
            ) from None
        self.last_saved_step = self.step
        return self.step

    def should_save(self, step: int) -> bool:
        return self.every_n_steps > 0 and step > 0 and step % self.every_n_steps == 0

    def save(self, force: bool = False) -> Optional[str]:
        """Save the current state under its step number; returns the prefix (None if skipped).

        Skips a step already saved (unless ``force``). Raises NonFiniteStateError, writing
        nothing, when any weight is NaN/Inf.
        """
        step = self.step
        if step == self.last_saved_step and not force:
            return None
        variables = list(self.model.weights)
        if not weights_are_finite(variables):
            raise NonFiniteStateError(
                f"refusing to checkpoint step {step}: the model has NaN/Inf weights; the "
                f"last good checkpoint in {checkpoint_dir(self.model_dir)} is step "
                f"{self.last_saved_step}.")
        try:
            path = self.manager.save(checkpoint_number=step)
        except (tf.errors.ResourceExhaustedError, tf.errors.PermissionDeniedError,
                OSError) as err:
            # Disk full / read-only: remove the partial files (the `checkpoint` pointer was
            # never moved to them) and say which complete checkpoint remains.
            for partial in glob.glob(os.path.join(self.directory, f"ckpt-{step}_temp*")):
                shutil.rmtree(partial, ignore_errors=True)
            reason = getattr(err, "message", None) or str(err)
            raise CheckpointWriteError(
                f"cannot write checkpoint step {step} to {self.directory}: "
                f"{reason.splitlines()[0] if reason else type(err).__name__}; the last "
                f"complete checkpoint is step {self.last_saved_step}.") from None
        if not self.is_chief:
            shutil.rmtree(self.directory, ignore_errors=True)
        self.last_saved_step = step
        return path

    def maybe_save(self) -> Optional[str]:
        """Save when the current step is a multiple of ``every_n_steps``."""
        return self.save() if self.should_save(self.step) else None


class PreemptionGuard:
    """Turn SIGTERM (and optionally SIGINT) into a flag the training loop polls.

    Use as a context manager; the previous handlers are restored on exit. Only works in the
    main thread (elsewhere it is a no-op and ``requested`` stays False).
    """

    def __init__(self, signals=(signal.SIGTERM,)):
        self.signals = tuple(signals)
        self.requested = False
        self.signal_received = None
        self._previous = {}

    def _handle(self, signum, frame):
        self.requested = True
        self.signal_received = signum

    def __enter__(self):
        for s in self.signals:
            try:
                self._previous[s] = signal.signal(s, self._handle)
            except ValueError:  # not the main thread
                pass
        return self

    def __exit__(self, *exc):
        for s, previous in self._previous.items():
            signal.signal(s, previous)
        self._previous.clear()
        return False


# Export --------------------------------------------------------------------------------------

def restore_online_encoder(model_dir: str, step: Optional[int] = None):
    """Rebuild the online encoder of a pretraining run and load its weights.

    Args:
      model_dir: the run's ``--model_dir`` (holds model_config.json and checkpoints/).
      step: checkpoint step; None → the latest.
    Returns:
      (encoder: resnet.ResNet named "encoder" with plain BatchNorm, in inference use
       ``encoder(images_in_[0,1], training=False)``; encoder_config: dict for
       ``resnet.build_encoder``; step: int).
    """
    config = read_model_config(model_dir)
    encoder_config = export_encoder_config(config["encoder"])
    # Build first, then find and read at once: a running pretraining may prune old
    # checkpoints, so the gap between choosing a checkpoint and reading it stays short.
    encoder = build_encoder(encoder_config)
    path = find_checkpoint(model_dir, step)
    step_var = tf.Variable(0, dtype=tf.int64)
    status = tf.train.Checkpoint(online_encoder=encoder, step=step_var).read(path)
    status.expect_partial()
    status.assert_existing_objects_matched()
    return encoder, encoder_config, int(step_var.numpy())
