"""HARL / BYOL pretraining binary.

    python -m harl_tf.pretrain --flagfile=flags/quickstart.cfg
    python -m harl_tf.pretrain --flagfile=flags/imagenet_harl_r50_100ep.cfg --model_dir=...

Every hyperparameter is a flag with the SPEC default (see training.PretrainConfig). Flags are
validated before any heavy work: a bad value prints one line naming the flag and exits with
status 2. Relative --train_files / --model_dir are taken relative to --work_dir when given.
"""
from __future__ import annotations

import dataclasses
import logging
import os
import sys

from absl import app, flags

from harl_tf.errors import HarlError

FLAGS = flags.FLAGS


def _define_flags():
    from harl_tf.training import PretrainConfig
    d = PretrainConfig()
    # Data
    flags.DEFINE_string("train_files", d.train_files, "Glob(s), comma-separated, of "
                        "pretraining TFRecords (schema of harl_tf.data.schema).")
    flags.DEFINE_string("work_dir", "", "Base for relative --train_files and --model_dir.")
    flags.DEFINE_integer("num_train_examples", d.num_train_examples,
                         "Examples per epoch (for epoch-based schedules).")
    flags.DEFINE_integer("image_size", d.image_size, "Side of the square views, px.")
    flags.DEFINE_integer("shuffle_buffer", d.shuffle_buffer,
                         "Records permuted together per block (a block as large as the "
                         "dataset: a full shuffle each epoch).")
    flags.DEFINE_integer("seed", None, "Random seed (views, order); unset: random.")
    flags.DEFINE_bool("deterministic", d.deterministic, "Reproducible batch order "
                      "(needs --seed; slower).")
    flags.DEFINE_integer("synthetic_records", d.synthetic_records,
                         "If > 0 and --train_files matches nothing, first build this many "
                         "examples of the embedded synthetic set there.")
    flags.DEFINE_float("color_jitter_strength", d.color_jitter_strength,
                       "Colour distortion strength: BYOL's jitter (brightness 0.4, contrast "
                       "0.4, saturation 0.2, hue 0.1) times this (clipped to 1, hue to 0.5).")
    flags.DEFINE_float("grayscale_prob", d.grayscale_prob, "Grayscale probability of both "
                       "views.")
    # Encoder and heads
    flags.DEFINE_integer("depth", d.depth, "ResNet depth: 18, 34, 50, 101, 152, 200.")
    flags.DEFINE_float("width_multiplier", d.width_multiplier, "ResNet width multiplier "
                       "(channels scale, e.g. 0.5 for small CPU runs).")
    flags.DEFINE_integer("output_stride", d.output_stride,
                         "Encoder output stride: 32 (7x7 at 224 px), 16 (14x14) or 8.")
    flags.DEFINE_bool("small_stem", d.small_stem, "3x3 stride-1 stem, no max-pool (small "
                      "images).")
    flags.DEFINE_integer("projector_hidden_dim", d.projector_hidden_dim,
                         "Projector hidden width (paper's '4960' read as 4096).")
    flags.DEFINE_integer("projection_dim", d.projection_dim, "Projection / prediction size.")
    flags.DEFINE_integer("predictor_hidden_dim", d.predictor_hidden_dim,
                         "Predictor hidden width.")
    flags.DEFINE_bool("sync_batchnorm", d.sync_batchnorm, "Synchronise BatchNorm statistics "
                      "across replicas (as BYOL).")
    # Loss
    flags.DEFINE_enum("loss_mode", d.loss_mode, ["mask", "hybrid", "byol"],
                      "mask: Eq. 1; hybrid: Eq. 4; byol: lambda = 0.")
    flags.DEFINE_float("alpha_base", d.alpha_base, "Foreground weight alpha (at step 0).")
    flags.DEFINE_enum("alpha_schedule", d.alpha_schedule, ["constant", "cosine"],
                      "alpha constant, or cosine rise from alpha_base to 1.")
    flags.DEFINE_float("lambda_base", d.lambda_base, "Object-level weight lambda (step 0).")
    flags.DEFINE_enum("lambda_schedule", d.lambda_schedule, ["constant", "cosine"],
                      "lambda constant, or cosine rise from lambda_base to 1.")
    flags.DEFINE_float("min_region_fraction", -1.0, "Validity floor of a region's area "
                       "fraction; negative: one feature cell, 1/(h*w).")
    flags.DEFINE_float("pooling_epsilon", d.pooling_epsilon, "Epsilon of region pooling.")
    flags.DEFINE_bool("literal_pooling", d.literal_pooling, "Paper wording: multiply, then "
                      "global average pool over all positions.")
    flags.DEFINE_bool("valid_region_batchnorm", d.valid_region_batchnorm,
                      "Projector/predictor BatchNorm statistics of the fg and bg groups "
                      "from the examples where that region is present in the view only.")
    # Optimisation
    flags.DEFINE_integer("batch_size", d.batch_size, "Global batch size (all replicas).")
    flags.DEFINE_integer("epochs", d.epochs, "Training epochs.")
    flags.DEFINE_integer("train_steps", d.train_steps, "If > 0, steps (overrides --epochs).")
    flags.DEFINE_float("base_learning_rate", d.base_learning_rate,
                       "Learning rate per 256 examples (lr = base * batch / 256).")
    flags.DEFINE_float("warmup_epochs", d.warmup_epochs, "Linear warm-up epochs.")
    flags.DEFINE_float("weight_decay", d.weight_decay, "LARS weight decay (paper 5e-7).")
    flags.DEFINE_float("momentum", d.momentum, "LARS momentum.")
    flags.DEFINE_float("trust_coefficient", d.trust_coefficient, "LARS trust coefficient.")
    flags.DEFINE_float("tau_base", d.tau_base, "EMA decay at step 0 (cosine rise to 1).")
    flags.DEFINE_enum("mixed_precision", "", ["", "float32", "mixed_bfloat16",
                                              "mixed_float16"],
                      "Keras dtype policy; mixed_float16 adds dynamic loss scaling.")
    # Probe
    flags.DEFINE_integer("num_classes", d.num_classes, "Classes of the online linear probe "
                         "(0: no probe; labels < 0 are ignored).")
    flags.DEFINE_float("probe_learning_rate", d.probe_learning_rate, "Probe Adam lr.")
    # Distribution and bookkeeping
    flags.DEFINE_enum("strategy", d.strategy, ["default", "one_device", "mirrored",
                                               "multi_worker", "tpu"],
                      "Distribution strategy (multi_worker reads TF_CONFIG).")
    flags.DEFINE_string("tpu_address", d.tpu_address, "TPU name or address for "
                        "--strategy=tpu.")
    flags.DEFINE_string("model_dir", d.model_dir, "Run directory: checkpoints, logs, JSON.")
    flags.DEFINE_integer("checkpoint_every_steps", d.checkpoint_every_steps,
                         "Checkpoint period in steps (also at the end and on SIGTERM).")
    flags.DEFINE_integer("keep_checkpoints", d.keep_checkpoints, "Checkpoints kept.")
    flags.DEFINE_integer("log_every_steps", d.log_every_steps, "Logging / TensorBoard period.")
    flags.DEFINE_integer("image_summaries", d.image_summaries,
                         "View pairs written to TensorBoard at the start.")


_define_flags()


def _resolve(path: str, work_dir: str) -> str:
    if not path or not work_dir:
        return path
    return ",".join(p if os.path.isabs(p) else os.path.join(work_dir, p)
                    for p in path.split(","))


def config_from_flags(f=FLAGS):
    """PretrainConfig from parsed flags (paths resolved against --work_dir)."""
    from harl_tf.training import PretrainConfig
    values = {}
    for field in dataclasses.fields(PretrainConfig):
        values[field.name] = getattr(f, field.name)
    values["min_region_fraction"] = (None if f.min_region_fraction < 0
                                     else f.min_region_fraction)
    values["train_files"] = _resolve(f.train_files, f.work_dir)
    values["model_dir"] = _resolve(f.model_dir, f.work_dir)
    return PretrainConfig(**values)


def _fail(message: str) -> None:
    print(f"pretrain: error: {message}", file=sys.stderr)
    sys.exit(2)


def main_with_flags(argv):
    del argv
    from harl_tf import training
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    try:
        config = config_from_flags()
        training.validate_config(config, check_files=config.synthetic_records == 0)
    except ValueError as e:
        _fail(str(e))
    try:
        summary = training.run_pretraining(config)
    except (HarlError, training.TrainingDiverged) as e:  # ConfigError, corrupt data, disk
        _fail(str(e).splitlines()[0] if str(e) else repr(e))
    state = "done" if summary["completed"] else "stopped"
    print(f"pretrain: {state}: step {summary['final_step']}/{summary['total_steps']}, "
          f"{summary['images_per_second']:.1f} images/s, model_dir {config.model_dir}")


def _parse_flags(argv):
    """absl parsing with a one-line error (flag name, value, reason) and exit status 2."""
    try:
        return FLAGS(argv)
    except flags.Error as e:
        _fail(str(e).splitlines()[0])


def main():
    """Console-script entry point."""
    app.run(main_with_flags, flags_parser=_parse_flags)


if __name__ == "__main__":
    main()
