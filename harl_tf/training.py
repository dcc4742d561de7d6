"""Pretraining: config → strategy, data, model, optimizer → resume → train → checkpoints.

One host: Keras ``fit`` (one epoch of ``total_steps - resumed_step`` steps, callbacks for
logging, TensorBoard, checkpoints, the NaN check and SIGTERM). Multi-worker: a
``strategy.run`` loop (Keras 3 ``fit`` fails under MultiWorkerMirroredStrategy,
keras-team/keras#20585). Both run the same ``HARLModel.train_step`` and the same
:class:`_StepHooks`.

Files written to ``model_dir`` (chief only, all atomically): ``config.json`` (the full
PretrainConfig) at the start, ``model_config.json`` (checkpoints.py), ``train/`` TensorBoard
events (every metric every ``log_every_steps`` steps, and an image summary of a few view pairs
with their masks overlaid at the start), ``checkpoints/``, ``data_seed.json`` (the data
seed drawn when ``--seed`` is unset) and ``summary.json`` at the end.
"""
from __future__ import annotations

import dataclasses
import glob
import logging
import math
import os
import time
from typing import Dict, Optional

import numpy as np

from harl_tf.errors import HarlError

# TensorFlow, Keras and the modules that import them are imported inside the functions that
# need them, so that the binary can validate its flags (this module) in a fraction of a
# second and fail before any heavy import.

log = logging.getLogger("harl_tf.training")

DEPTHS = (18, 34, 50, 101, 152, 200)
OUTPUT_STRIDES = (8, 16, 32)
PRECISIONS = ("", "float32", "mixed_bfloat16", "mixed_float16")
LOSS_MODES = ("mask", "hybrid", "byol")           # = losses.LOSS_MODES (tested)
SCHEDULE_KINDS = ("constant", "cosine")           # = models.harl.SCHEDULE_KINDS (tested)
STRATEGIES = ("default", "one_device", "mirrored", "multi_worker", "tpu")  # = distribute's


@dataclasses.dataclass
class PretrainConfig:
    """Every pretraining hyperparameter, SPEC defaults (ImageNet, ResNet-50, 1000 epochs).

    Each field is the flag of the same name in ``harl_tf.pretrain``.
    """
    # Data
    train_files: str = ""
    num_train_examples: int = 1281167
    image_size: int = 224
    shuffle_buffer: int = 10000
    seed: Optional[int] = None
    deterministic: bool = False
    synthetic_records: int = 0     # >0: build this many synthetic examples if no file matches
    color_jitter_strength: float = 1.0   # x BYOL's colour jitter (augment.scaled_view_configs)
    grayscale_prob: float = 0.2
    # Encoder and heads
    depth: int = 50
    width_multiplier: float = 1.0
    output_stride: int = 32
    small_stem: bool = False
    projector_hidden_dim: int = 4096
    projection_dim: int = 512
    predictor_hidden_dim: int = 4096
    sync_batchnorm: bool = False
    # Loss
    loss_mode: str = "hybrid"
    alpha_base: float = 0.7
    alpha_schedule: str = "cosine"
    lambda_base: float = 0.7
    lambda_schedule: str = "cosine"
    min_region_fraction: Optional[float] = None   # None: one feature cell
    pooling_epsilon: float = 1e-6
    literal_pooling: bool = False
    valid_region_batchnorm: bool = False
    # Optimisation
    batch_size: int = 4096        # global
    epochs: int = 1000
    train_steps: int = 0          # >0 overrides epochs
    base_learning_rate: float = 0.2   # per 256 examples
    warmup_epochs: float = 10.0
    weight_decay: float = 5e-7
    momentum: float = 0.9
    trust_coefficient: float = 1e-3
    tau_base: float = 0.996
    mixed_precision: str = ""
    # Online probe
    num_classes: int = 0
    probe_learning_rate: float = 1e-3
    # Distribution
    strategy: str = "default"
    tpu_address: str = ""
    # Bookkeeping
    model_dir: str = ""
    checkpoint_every_steps: int = 1000
    keep_checkpoints: int = 3
    log_every_steps: int = 100
    image_summaries: int = 4

    @property
    def steps_per_epoch(self) -> int:
        return max(1, self.num_train_examples // self.batch_size)

    @property
    def total_steps(self) -> int:
        return self.train_steps if self.train_steps > 0 else self.epochs * self.steps_per_epoch

    @property
    def warmup_steps(self) -> int:
        return min(self.total_steps, int(round(self.warmup_epochs * self.steps_per_epoch)))

    @property
    def learning_rate(self) -> float:
        """Peak learning rate, base · B / 256 (the linear scaling rule)."""
        return self.base_learning_rate * self.batch_size / 256.0

    def view_configs(self):
        """(view 1, view 2) augment.ViewConfig: SPEC §2 with the colour distortion scaled."""
        from harl_tf.data import augment
        return augment.scaled_view_configs(self.color_jitter_strength, self.grayscale_prob)

    def encoder_config(self) -> dict:
        return {"depth": self.depth, "width_multiplier": self.width_multiplier,
                "output_stride": self.output_stride, "small_stem": self.small_stem}

    def harl_config(self):
        """The models.harl.HARLConfig of this run."""
        from harl_tf.models.harl import HARLConfig
        return HARLConfig(
            encoder=self.encoder_config(), projector_hidden_dim=self.projector_hidden_dim,
            projection_dim=self.projection_dim, predictor_hidden_dim=self.predictor_hidden_dim,
            sync_batchnorm=self.sync_batchnorm, loss_mode=self.loss_mode,
            alpha_base=self.alpha_base, alpha_schedule=self.alpha_schedule,
            lambda_base=self.lambda_base, lambda_schedule=self.lambda_schedule,
            tau_base=self.tau_base, total_steps=self.total_steps,
            min_region_fraction=self.min_region_fraction,
            pooling_epsilon=self.pooling_epsilon, literal_pooling=self.literal_pooling,
            valid_region_batchnorm=self.valid_region_batchnorm,
            num_classes=self.num_classes, probe_learning_rate=self.probe_learning_rate)

    def to_json(self) -> dict:
        d = dataclasses.asdict(self)
        d.update(total_steps=self.total_steps, steps_per_epoch=self.steps_per_epoch,
                 warmup_steps=self.warmup_steps, learning_rate=self.learning_rate)
        return d


# Validation ---------------------------------------------------------------------------------

def _require(condition: bool, message: str):
    if not condition:
        raise ValueError(message)


def validate_config(c: PretrainConfig, *, check_files: bool = True) -> None:
    """Cheap checks before any heavy work; ValueError with a one-line message naming the flag."""
    _require(bool(c.model_dir), "--model_dir is required (where checkpoints and logs go).")
    _require(c.color_jitter_strength >= 0,
             f"--color_jitter_strength must be >= 0, got {c.color_jitter_strength}.")
    _require(0 <= c.grayscale_prob <= 1,
             f"--grayscale_prob must be in [0, 1], got {c.grayscale_prob}.")
    _require(bool(c.train_files), "--train_files is required (a glob of TFRecord files).")
    _require(c.depth in DEPTHS, f"--depth must be one of {DEPTHS}, got {c.depth}.")
    _require(c.output_stride in OUTPUT_STRIDES,
             f"--output_stride must be one of {OUTPUT_STRIDES}, got {c.output_stride}.")
    _require(c.width_multiplier > 0,
             f"--width_multiplier must be > 0, got {c.width_multiplier}.")
    for name in ("image_size", "batch_size", "projector_hidden_dim", "projection_dim",
                 "predictor_hidden_dim", "num_train_examples", "keep_checkpoints",
                 "log_every_steps"):
        _require(getattr(c, name) > 0, f"--{name} must be positive, got {getattr(c, name)}.")
    for name in ("epochs", "train_steps", "checkpoint_every_steps", "image_summaries",
                 "synthetic_records", "num_classes", "shuffle_buffer"):
        _require(getattr(c, name) >= 0, f"--{name} must be >= 0, got {getattr(c, name)}.")
    _require(c.train_steps > 0 or c.epochs > 0, "--epochs or --train_steps must be positive.")
    for name in ("base_learning_rate", "trust_coefficient", "probe_learning_rate",
                 "pooling_epsilon"):
        _require(getattr(c, name) > 0, f"--{name} must be positive, got {getattr(c, name)}.")
    _require(c.weight_decay >= 0, f"--weight_decay must be >= 0, got {c.weight_decay}.")
    _require(0 <= c.momentum < 1, f"--momentum must be in [0, 1), got {c.momentum}.")
    _require(c.warmup_epochs >= 0, f"--warmup_epochs must be >= 0, got {c.warmup_epochs}.")
    _require(c.min_region_fraction is None or 0 <= c.min_region_fraction <= 1,
             f"--min_region_fraction must be in [0, 1], got {c.min_region_fraction}.")
    _require(c.mixed_precision in PRECISIONS,
             f"--mixed_precision must be one of {PRECISIONS[1:]} or empty, "
             f"got {c.mixed_precision!r}.")
    _require(c.strategy in STRATEGIES,
             f"--strategy must be one of {', '.join(STRATEGIES)}, got {c.strategy!r}.")
    _require(c.loss_mode in LOSS_MODES,
             f"--loss_mode must be one of {LOSS_MODES}, got {c.loss_mode!r}.")
    for name in ("alpha_schedule", "lambda_schedule"):
        _require(getattr(c, name) in SCHEDULE_KINDS, f"--{name} must be one of "
                 f"{SCHEDULE_KINDS}, got {getattr(c, name)!r}.")
    for name in ("alpha_base", "lambda_base", "tau_base"):
        _require(0.0 <= getattr(c, name) <= 1.0,
                 f"--{name} must be in [0, 1], got {getattr(c, name)}.")
    _require(not (c.deterministic and c.seed is None),
             "--deterministic needs --seed (a fixed seed makes the batches reproducible).")
    stride = c.output_stride if not c.small_stem else min(c.output_stride, 8)
    _require(c.image_size >= stride,
             f"--image_size={c.image_size} is smaller than the encoder's output stride.")
    if check_files and c.synthetic_records == 0:
        _require(bool(_match(c.train_files)),
                 f"--train_files={c.train_files!r} matches no file (build records with "
                 f"tools/build_tfrecords, or set --synthetic_records=N to make some).")


def _match(pattern: str):
    return sorted(f for p in pattern.split(",") if p for f in glob.glob(p))


def ensure_synthetic_records(c: PretrainConfig) -> None:
    """If ``--synthetic_records`` > 0 and nothing matches ``--train_files``, build them there.

    The pattern's directory receives ``train-*-of-*.tfrecord`` shards of the embedded
    synthetic set (exact masks, labels) at ``max(64, image_size)`` px.
    """
    if c.synthetic_records <= 0 or _match(c.train_files):
        return
    from harl_tf.data.builder import build_dataset
    from harl_tf.data.sources import SyntheticSource
    output_dir = os.path.dirname(c.train_files.split(",")[0]) or "."
    log.info("building %d synthetic examples in %s", c.synthetic_records, output_dir)
    build_dataset(SyntheticSource(c.synthetic_records, image_size=max(64, c.image_size),
                                  seed=0), output_dir, splits=["train"],
                  min_shards=2, progress=False)
    if not _match(c.train_files):
        raise ValueError(f"--train_files={c.train_files!r} matches none of the synthetic "
                         f"records written to {output_dir} (use a pattern like "
                         f"{os.path.join(output_dir, 'train-*.tfrecord')}).")


# Building -----------------------------------------------------------------------------------

def build_optimizer(c: PretrainConfig):
    """LARS with the warm-up cosine schedule (peak base·B/256); LossScaleOptimizer for fp16."""
    import keras
    from harl_tf import schedules
    from harl_tf.lars import LARS
    schedule = schedules.WarmupCosine(c.learning_rate, c.warmup_steps, c.total_steps)
    optimizer = LARS(schedule, momentum=c.momentum, weight_decay=c.weight_decay,
                     trust_coefficient=c.trust_coefficient)
    if c.mixed_precision == "mixed_float16":
        optimizer = keras.optimizers.LossScaleOptimizer(optimizer)
    return optimizer


def build_model(c: PretrainConfig, strategy):
    """HARLModel built and compiled inside the strategy scope."""
    from harl_tf.models.harl import HARLModel
    with strategy.scope():
        model = HARLModel(c.harl_config())
        model.compile(optimizer=build_optimizer(c), auto_scale_loss=False)
        model.build_for(c.image_size)
    return model


def _summary_metadata(plugin: str, display_name: str = ""):
    from tensorflow.core.framework import summary_pb2  # core TF, no tensorboard package
    return summary_pb2.SummaryMetadata(
        display_name=display_name,
        plugin_data=summary_pb2.SummaryMetadata.PluginData(plugin_name=plugin)).SerializeToString()


def scalar_summary(name: str, value: float, step: int) -> None:
    """A TensorBoard scalar written with core TF only (the tensorboard package is optional)."""
    import tensorflow as tf
    tf.summary.write(name, tf.constant(float(value), tf.float32), step=step,
                     metadata=_summary_metadata("scalars"))


def image_summary(name: str, images, step: int) -> None:
    """TensorBoard images (float [N,H,W,3] in [0,1]) in the "images" plugin format, core TF."""
    import tensorflow as tf
    images = tf.convert_to_tensor(images)
    height, width = int(images.shape[1]), int(images.shape[2])
    pngs = [tf.io.encode_png(tf.image.convert_image_dtype(im, tf.uint8, saturate=True))
            for im in tf.unstack(images)]
    tensor = tf.stack([tf.as_string(width), tf.as_string(height)] + pngs)
    tf.summary.write(name, tensor, step=step, metadata=_summary_metadata("images"))


def _overlay(views, masks):
    """Views with the foreground kept and the background darkened and tinted red."""
    import tensorflow as tf
    tint = tf.constant([0.6, 0.0, 0.0], tf.float32)
    return views * masks + (0.35 * views + tint * 0.4) * (1.0 - masks)


def write_image_summary(c: PretrainConfig, writer, step: int) -> None:
    """A few view pairs (view 1 | view 2) with masks overlaid, to check the inputs by eye."""
    import tensorflow as tf
    from harl_tf.data.pipeline import pretrain_dataset
    if c.image_summaries <= 0:
        return
    batch = next(iter(pretrain_dataset(c.train_files, c.image_summaries, c.image_size,
                                       seed=c.seed, shuffle_buffer=16,
                                       view_configs=c.view_configs())))
    pairs = tf.concat([_overlay(batch["view1"], batch["mask1"]),
                       _overlay(batch["view2"], batch["mask2"])], axis=2)
    with writer.as_default():
        image_summary("views_with_masks", pairs, step)
    writer.flush()


# The loop -----------------------------------------------------------------------------------

class TrainingDiverged(FloatingPointError):
    """The loss became NaN/Inf."""


class ConfigError(HarlError):
    """A flag, file or run directory problem found before training; the message is one line
    naming the flag. (Other exceptions are bugs and keep their traceback.)"""


def _save_or_diverged(save):
    """Run a checkpoint save; NaN/Inf weights (with a still finite loss) become
    TrainingDiverged, whose message names the last good checkpoint."""
    from harl_tf.checkpoints import NonFiniteStateError
    try:
        return save()
    except NonFiniteStateError as e:
        raise TrainingDiverged(str(e)) from None


class _StepHooks:
    """After every step: NaN check, logging + TensorBoard, checkpoints, SIGTERM.

    Returns True from :meth:`after_step` when training must stop (SIGTERM received; the state
    has been saved).
    """

    def __init__(self, c: PretrainConfig, manager, writer, guard, model):
        self.c, self.manager, self.writer, self.guard, self.model = c, manager, writer, guard, model
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
            # Logged values are means over the steps since the last log.
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
        _save_or_diverged(self.manager.maybe_save)
        if self.guard.requested:
            log.warning("signal %s received: saving step %d and stopping",
                        self.guard.signal_received, step)
            _save_or_diverged(self.manager.save)
            self.stopped_by_signal = True
            return True
        return False


def _hooks_callback(hooks: _StepHooks):
    """A Keras callback running the hooks after every batch of ``fit``."""
    import keras

    class HooksCallback(keras.callbacks.Callback):
        def on_train_batch_end(self, batch, logs=None):
            if hooks.after_step(logs or {}):
                self.model.stop_training = True

    return HooksCallback()


def weight_fingerprint(model):
    """[Σw, Σ|w|] (float64) of every online and target weight: equal weights ⇔ (almost
    surely) equal fingerprints; used to compare workers and runs without shipping weights."""
    out = []
    for v in (model.online_encoder.weights + model.online_projector.weights
              + model.predictor.weights + model.target_encoder.weights
              + model.target_projector.weights):
        w = np.asarray(v.numpy(), np.float64)
        out += [float(w.sum()), float(np.abs(w).sum())]
    return out


DATA_SEED_FILE = "data_seed.json"
_DATA_SEED_WAIT_SECONDS = 300


def _data_seed(c: PretrainConfig, chief: bool) -> int:
    """The seed of the data stream: ``--seed`` when set; otherwise one drawn by the chief on
    the first start and kept in ``model_dir/data_seed.json``, so a resumed run continues the
    same epochs (each example once per epoch across preemptions). Other workers read the
    chief's file (waiting for it on a first start)."""
    if c.seed is not None:
        return int(c.seed)
    from harl_tf import checkpoints
    path = os.path.join(c.model_dir, DATA_SEED_FILE)
    if chief and not os.path.exists(path):
        import random
        checkpoints.write_json_atomic(path, {"data_seed": random.SystemRandom().randrange(2**31)})
    deadline = time.time() + _DATA_SEED_WAIT_SECONDS
    while not os.path.exists(path):
        if time.time() > deadline:
            raise ConfigError(f"--seed is unset and the chief has not written {path} within "
                              f"{_DATA_SEED_WAIT_SECONDS} s; is --model_dir shared by all "
                              f"workers? Set --seed to the same value on every worker instead.")
        time.sleep(0.5)
    try:
        return int(checkpoints.read_json(path, "the data seed")["data_seed"])
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise ConfigError(f"{path} is unreadable ({e}); delete it (the data order starts "
                          f"afresh) or set --seed") from None


def run_pretraining(c: PretrainConfig) -> dict:
    """Pretrain as configured; returns the summary (also written to model_dir/summary.json)."""
    import keras
    from harl_tf import distribute
    try:
        validate_config(c, check_files=False)
        strategy = distribute.make_strategy(c.strategy, tpu_address=c.tpu_address)
        distribute.check_global_batch(c.batch_size, strategy, flag="batch_size")
        chief = distribute.is_chief(strategy)
        if chief:
            ensure_synthetic_records(c)
        validate_config(c)
    except ValueError as e:
        raise ConfigError(str(e)) from None
    keras.config.set_dtype_policy(c.mixed_precision or "float32")
    try:
        return _run(c, strategy, chief)
    finally:
        keras.config.set_dtype_policy("float32")


def _run(c: PretrainConfig, strategy, chief: bool) -> dict:
    import tensorflow as tf
    from harl_tf import checkpoints, distribute
    from harl_tf.data.pipeline import distributed_pretrain_dataset, naming_corrupt_files
    from harl_tf.models.harl import make_distributed_step
    if c.seed is not None:  # weights too, not only views and order: a seeded run repeats
        import keras
        keras.utils.set_random_seed(c.seed)
    model = build_model(c, strategy)
    if chief:
        try:  # before writing anything: a mistyped --model_dir must not clobber a run
            checkpoints.check_same_encoder(c.model_dir, model.online_encoder.config)
        except ValueError as e:
            raise ConfigError(str(e)) from None
        os.makedirs(c.model_dir, exist_ok=True)
        checkpoints.write_json_atomic(os.path.join(c.model_dir, "config.json"), c.to_json())
        checkpoints.write_model_config(c.model_dir, model.online_encoder.config,
                                       dataclasses.asdict(model.harl_config), c.image_size)
    data_seed = _data_seed(c, chief)
    _, task_id = distribute.task_info(strategy)
    manager = checkpoints.CheckpointManager(
        c.model_dir, model, every_n_steps=c.checkpoint_every_steps,
        max_to_keep=c.keep_checkpoints, is_chief=chief, worker_id=task_id)
    try:
        start_step = manager.restore_latest()
    except ValueError as e:
        raise ConfigError(str(e)) from None
    if start_step:
        log.info("resumed from step %d of %s", start_step, manager.directory)
    writer = (tf.summary.create_file_writer(os.path.join(c.model_dir, "train")) if chief
              else tf.summary.create_noop_writer())
    if chief and start_step == 0:
        write_image_summary(c, writer, 0)

    remaining = c.total_steps - start_step
    t_start = time.time()
    with checkpoints.PreemptionGuard() as guard:
        hooks = _StepHooks(c, manager, writer, guard, model)
        if remaining > 0:
            # A resumed run continues the data stream where the saved step left it (with
            # --deterministic: the batches the uninterrupted run would have seen).
            if start_step:
                log.info("continuing the data stream after %d steps (reading, not decoding, "
                         "the records of the current epoch already used)", start_step)
            dataset = distributed_pretrain_dataset(
                strategy, c.train_files, c.batch_size, c.image_size, seed=data_seed,
                deterministic=c.deterministic, shuffle_buffer=c.shuffle_buffer,
                start_step=start_step, view_configs=c.view_configs())
            # A corrupt shard ends the run with an error naming the file and record.
            with naming_corrupt_files(c.train_files):
                if distribute.uses_custom_loop(strategy):
                    step_fn = make_distributed_step(model, strategy)
                    iterator = iter(dataset)
                    for _ in range(remaining):
                        if hooks.after_step(step_fn(next(iterator))):
                            break
                else:
                    model.fit(dataset, epochs=1, steps_per_epoch=remaining, verbose=0,
                              callbacks=[_hooks_callback(hooks)])
        final_step = int(model.step_counter.numpy())
        if final_step >= c.total_steps:
            _save_or_diverged(manager.save)
    wall = time.time() - t_start
    writer.flush()
    summary = {
        "model_dir": c.model_dir, "start_step": start_step, "final_step": final_step,
        "total_steps": c.total_steps, "completed": final_step >= c.total_steps,
        "stopped_by_signal": hooks.stopped_by_signal, "data_seed": data_seed,
        "first_loss": hooks.first_loss,
        "first_metrics": hooks.first_metrics,
        "final_metrics": hooks.last_metrics, "images_per_second_last": hooks.images_per_second,
        "images_per_second": (final_step - start_step) * c.batch_size / max(wall, 1e-9),
        "wall_seconds": wall, "replicas": strategy.num_replicas_in_sync,
        "checkpoint_steps": checkpoints.available_steps(c.model_dir) if chief else [],
        "weights_fingerprint": weight_fingerprint(model),
    }
    task_type, task_id = distribute.task_info(strategy)
    summary.update(task_type=task_type, task_id=task_id)
    # The chief writes summary.json; other workers leave their own (throughput, fingerprint).
    name = "summary.json" if chief else f"summary-{task_type}-{task_id}.json"
    checkpoints.write_json_atomic(os.path.join(c.model_dir, name), summary)
    return summary
