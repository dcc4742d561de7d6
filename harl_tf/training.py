"""Pretraining: config → strategy, data, model, optimizer → resume → train → checkpoints.

One host: Keras ``fit`` (one epoch of ``total_steps - resumed_step`` steps, with
:class:`hooks.StepHooks` as a callback for logging, TensorBoard, checkpoints, the NaN
check and SIGTERM). Multi-worker: a ``strategy.run`` loop (Keras 3 ``fit`` fails under
MultiWorkerMirroredStrategy, keras-team/keras#20585). Both run the same
``HARLModel.train_step`` and the same hooks; ``--jit_compile`` compiles either with XLA.

The pieces, one concern each: :mod:`harl_tf.config` (the config and its checks),
:mod:`harl_tf.bootstrap` (synthetic records, the shared data seed), :mod:`harl_tf.build`
(model and optimizer), :mod:`harl_tf.hooks` (after every step), :mod:`harl_tf.summaries`
(TensorBoard). Their public names are importable from here too.

Files written to ``model_dir`` (chief only, all atomically): ``config.json`` (every flag of
the run and the derived step counts) at the start, ``model_config.json`` (checkpoints.py),
``train/`` TensorBoard events (every metric every ``log_every_steps`` steps, and an image
summary of a few view pairs with their masks overlaid at the start), ``checkpoints/``,
``data_seed.json`` (the data seed drawn when ``--seed`` is unset) and ``summary.json`` at
the end.
"""
from __future__ import annotations

import dataclasses
import logging
import os
import time

from harl_tf.bootstrap import DATA_SEED_FILE, data_seed, ensure_synthetic_records
from harl_tf.build import build_model, build_optimizer, weight_fingerprint
from harl_tf.config import ConfigError, PretrainConfig
from harl_tf.errors import HarlError
from harl_tf.hooks import StepHooks, TrainingDiverged, hooks_callback, save_or_diverged

# TensorFlow, Keras and the modules that import them are imported inside the functions that
# need them, so that the binary can validate its flags in a fraction of a second and fail
# before any heavy import.

__all__ = ["ConfigError", "DATA_SEED_FILE", "HarlError", "PretrainConfig", "StepHooks",
           "TrainingDiverged", "build_model", "build_optimizer", "ensure_synthetic_records",
           "run_pretraining", "save_or_diverged", "weight_fingerprint"]

log = logging.getLogger("harl_tf.training")


def run_pretraining(c: PretrainConfig) -> dict:
    """Pretrain as configured; returns the summary (also written to model_dir/summary.json)."""
    import keras
    from harl_tf import distribute
    c.validate(check_files=False)
    strategy = distribute.make_strategy(c.strategy, tpu_address=c.tpu_address,
                                        collective_timeout=c.collective_timeout_seconds)
    distribute.check_global_batch(c.batch_size, strategy, flag="batch_size")
    chief = distribute.is_chief(strategy)
    if chief:
        ensure_synthetic_records(c)
    c.validate()  # again: the files exist now that any synthetic records are written
    keras.config.set_dtype_policy(c.mixed_precision or "float32")
    try:
        return _run(c, strategy, chief)
    except distribute.peer_fault_types() as e:
        if not distribute.is_multi_worker(strategy):
            raise
        raise distribute.PeerLostError(_lost_peer_message(c, strategy, e)) from None
    finally:
        keras.config.set_dtype_policy("float32")


def _lost_peer_message(c: PretrainConfig, strategy, error) -> str:
    """The one line of a lost peer: which task, why, and the step a rerun resumes from (the
    latest complete checkpoint: saves are atomic, so one cut short does not count)."""
    from harl_tf import checkpoints, distribute
    steps = checkpoints.available_steps(c.model_dir)
    return distribute.lost_peer_message(
        error, strategy.cluster_resolver.cluster_spec().as_dict(),
        distribute.task_info(strategy), resume_step=steps[-1] if steps else 0,
        checkpoint_dir=checkpoints.checkpoint_dir(c.model_dir),
        collective_timeout=c.collective_timeout_seconds)


def _run(c: PretrainConfig, strategy, chief: bool) -> dict:
    import tensorflow as tf
    from harl_tf import atomic, checkpoints, distribute, summaries
    from harl_tf.data import augment
    from harl_tf.data.pipeline import distributed_pretrain_dataset, naming_corrupt_files
    from harl_tf.models.harl import make_distributed_step
    if c.seed is not None:  # weights too, not only views and order: a seeded run repeats
        import keras
        keras.utils.set_random_seed(c.seed)
    model = build_model(c, strategy)
    if chief:
        # before writing anything: a mistyped --model_dir must not clobber a run
        checkpoints.check_same_encoder(c.model_dir, model.online_encoder.config)
        os.makedirs(c.model_dir, exist_ok=True)
        atomic.write_json_atomic(os.path.join(c.model_dir, "config.json"), c.to_json())
        checkpoints.write_model_config(c.model_dir, model.online_encoder.config,
                                       dataclasses.asdict(model.harl_config), c.image_size)
    seed = data_seed(c, chief)
    _, task_id = distribute.task_info(strategy)
    manager = checkpoints.CheckpointManager(
        c.model_dir, model, every_n_steps=c.checkpoint_every_steps,
        max_to_keep=c.keep_checkpoints, is_chief=chief, worker_id=task_id)
    start_step = manager.restore_latest()
    if start_step:
        log.info("resumed from step %d of %s", start_step, manager.directory)
    writer = (tf.summary.create_file_writer(os.path.join(c.model_dir, "train")) if chief
              else tf.summary.create_noop_writer())
    if chief and start_step == 0:
        summaries.write_image_summary(c, writer, 0)

    remaining = c.total_steps - start_step
    t_start = time.time()
    with checkpoints.PreemptionGuard() as guard:
        # Multi-worker: a SIGTERM on any worker stops all of them after the same step.
        agree = (distribute.stop_agreement(strategy) if distribute.is_multi_worker(strategy)
                 else None)
        hooks = StepHooks(c, manager, writer, guard, model, agree_to_stop=agree)
        if remaining > 0:
            # A resumed run continues the data stream where the saved step left it (with
            # --deterministic: the batches the uninterrupted run would have seen).
            if start_step:
                log.info("continuing the data stream after %d steps (reading, not decoding, "
                         "the records of the current epoch already used)", start_step)
            dataset = distributed_pretrain_dataset(
                strategy, c.train_files, c.batch_size, c.image_size, seed=seed,
                deterministic=c.deterministic, shuffle_buffer=c.shuffle_buffer,
                start_step=start_step, view_configs=augment.view_configs_from(c))
            # A corrupt shard ends the run with an error naming the file and record.
            with naming_corrupt_files(c.train_files):
                if distribute.uses_custom_loop(strategy):
                    step_fn = make_distributed_step(model, strategy,
                                                    jit_compile=c.jit_compile)
                    iterator = iter(dataset)
                    try:
                        for _ in range(remaining):
                            if hooks.after_step(step_fn(next(iterator))):
                                break
                    except distribute.peer_fault_types():
                        writer.flush()    # the scalars so far: the binary then exits at once
                        raise
                else:
                    # shuffle=False: the dataset is shuffled already (fit's default
                    # shuffle=True is ignored for a tf.data.Dataset, with a warning).
                    model.fit(dataset, epochs=1, steps_per_epoch=remaining, verbose=0,
                              shuffle=False, callbacks=[hooks_callback(hooks)])
        final_step = int(model.step_counter.numpy())
        if final_step >= c.total_steps:
            save_or_diverged(manager.save)
    wall = time.time() - t_start
    writer.flush()
    summary = {
        "model_dir": c.model_dir, "start_step": start_step, "final_step": final_step,
        "total_steps": c.total_steps, "completed": final_step >= c.total_steps,
        "stopped_by_signal": hooks.stopped_by_signal, "data_seed": seed,
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
    atomic.write_json_atomic(os.path.join(c.model_dir, name), summary)
    return summary
