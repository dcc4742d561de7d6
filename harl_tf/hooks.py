"""What happens after every training step, in ``fit`` and in the custom loop alike: the
NaN check, logging and TensorBoard scalars, checkpoints, and stopping on SIGTERM."""
from __future__ import annotations

import logging
import math
import time
from typing import Dict

import numpy as np

from harl_tf.errors import HarlError
from harl_tf.summaries import scalar_summary

log = logging.getLogger("harl_tf.training")


class TrainingDiverged(HarlError, FloatingPointError):
    """The loss became NaN/Inf."""


def save_or_diverged(save):
    """Run a checkpoint save; NaN/Inf weights (with a still finite loss) become
    TrainingDiverged, whose message names the last good checkpoint."""
    from harl_tf.checkpoints import NonFiniteStateError
    try:
        return save()
    except NonFiniteStateError as e:
        raise TrainingDiverged(str(e)) from None


class StepHooks:
    """After every step: NaN check, logging + TensorBoard, checkpoints, SIGTERM.

    Returns True from :meth:`after_step` when training must stop (SIGTERM received; the state
    has been saved). ``c`` is the run's PretrainConfig. ``agree_to_stop`` (multi-worker:
    ``distribute.stop_agreement``) turns this worker's "SIGTERM received" into "received by
    any worker", the same on all of them, so that all save the same step and stop.
    """

    def __init__(self, c, manager, writer, guard, model, agree_to_stop=None):
        self.c, self.manager, self.writer, self.guard, self.model = c, manager, writer, guard, model
        self.agree_to_stop = agree_to_stop
        self.last_metrics: Dict[str, float] = {}
        self.images_per_second = float("nan")
        self.stopped_by_signal = False
        self._t0 = time.time()
        self._steps_since = 0
        self._sums: Dict[str, float] = {}
        self.first_loss = None
        self.first_metrics = None

    def after_step(self, metrics) -> bool:
        step = int(self.model.step_counter.numpy())
        self._steps_since += 1
        values = {k: float(np.asarray(v)) for k, v in metrics.items()}
        loss = values.get("loss", float("nan"))
        if not math.isfinite(loss):
            raise TrainingDiverged(
                f"loss is {loss} at step {step}: training diverged; the last good checkpoint "
                f"is step {self.manager.last_saved_step} in {self.manager.directory} (lower "
                f"--base_learning_rate, raise --warmup_epochs, or drop --mixed_precision).")
        if self.first_loss is None:
            self.first_loss = loss
        for k, v in values.items():
            self._sums[k] = self._sums.get(k, 0.0) + v
        if step % self.c.log_every_steps == 0 or step == self.c.total_steps:
            self._log(step)
        save_or_diverged(self.manager.maybe_save)
        requested = self.guard.requested
        if self.agree_to_stop is not None:
            requested = self.agree_to_stop(requested)
        if requested:
            log.warning("%s: saving step %d and stopping",
                        f"signal {self.guard.signal_received} received" if self.guard.requested
                        else "a peer worker received a stop signal", step)
            save_or_diverged(self.manager.save)
            self.stopped_by_signal = True
            return True
        return False

    def _log(self, step: int) -> None:
        """Log and write the means over the steps since the last log."""
        means = {k: v / self._steps_since for k, v in self._sums.items()}
        elapsed = max(time.time() - self._t0, 1e-9)
        self.images_per_second = self._steps_since * self.c.batch_size / elapsed
        means["images_per_second"] = self.images_per_second
        self.last_metrics = means
        if self.first_metrics is None:
            self.first_metrics = means
        with self.writer.as_default():
            for k, v in means.items():
                scalar_summary(k, v, step)
        log.info("step %d/%d  loss %.4f  %s  %.1f images/s", step, self.c.total_steps,
                 means["loss"], "  ".join(f"{k} {v:.4g}" for k, v in sorted(means.items())
                                         if k not in ("loss", "images_per_second")),
                 self.images_per_second)
        self._t0, self._steps_since, self._sums = time.time(), 0, {}


def hooks_callback(hooks: StepHooks):
    """A Keras callback running the hooks after every batch of ``fit``."""
    import keras

    class HooksCallback(keras.callbacks.Callback):
        def on_train_batch_end(self, batch, logs=None):
            if hooks.after_step(logs or {}):
                self.model.stop_training = True

    return HooksCallback()
