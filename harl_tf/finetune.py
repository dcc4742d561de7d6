r"""Downstream evaluation of a pretrained encoder: linear probe, fine-tuning, k-NN.

    python -m harl_tf.finetune --flagfile=flags/linear_eval_imagenet.cfg \
        --encoder=/exports/harl_r50 --output_dir=/evals/harl_r50_linear
    python -m harl_tf.finetune --mode=knn --encoder=/runs/harl_r50 \
        --train_files='/data/train-*' --eval_files='/data/val-*' --output_dir=/evals/knn
    python -m harl_tf.finetune --mode=finetune --encoder=random \
        --encoder_config='{"depth": 50}' ...          # supervised-from-scratch baseline

``--encoder`` is an export directory (python -m harl_tf.export), a pretraining model_dir
(online encoder of the latest checkpoint, or ``--step``) or ``random``. Training and
evaluation records are TFRecords of harl_tf.data.schema with labels (label -1 is an
error). Writes ``results.json`` (top-1 / top-5), ``train_ids.txt`` and, for the trained
modes, epoch metrics (TensorBoard when installed), a resumable backup and the final weights
to ``--output_dir``.

``--mode=linear`` (precomputed features) chooses its weight decay from
``--weight_decay_grid`` on a ``--validation_fraction`` of the train features unless
``--weight_decay`` is given. ``--eval_background=both`` also evaluates on the mixed_rand
variant of the eval records (records with masks) and reports the top-1 gap.
See harl_tf/downstream/evaluation.py for the protocols.
"""
import dataclasses
import json

from absl import app, flags

from harl_tf import distribute, errors

FLAGS = flags.FLAGS

flags.DEFINE_enum("mode", "linear", ["linear", "finetune", "knn"],
                  "linear: frozen encoder + linear head; finetune: train everything; "
                  "knn: weighted k-NN on frozen features.")
flags.DEFINE_string("encoder", None, "Export directory, pretraining model_dir, or 'random'.")
flags.DEFINE_string("encoder_config", "",
                    "For --encoder=random: JSON object (e.g. '{\"depth\": 50}'), JSON file, "
                    "or an export directory whose architecture to copy.")
flags.DEFINE_integer("step", None, "Checkpoint step when --encoder is a model_dir.")
flags.DEFINE_enum("output_stride", "keep", ["keep", "32", "16", "8"],
                  "Output stride of the encoder ('keep' = as exported / pretrained).")
flags.DEFINE_string("train_files", None, "Glob(s) of labelled training TFRecords.")
flags.DEFINE_string("eval_files", None, "Glob(s) of labelled evaluation TFRecords.")
flags.DEFINE_string("output_dir", None, "Results, TensorBoard logs, checkpoints.")
flags.DEFINE_float("label_fraction", 1.0, "Fraction of training labels to use "
                   "(class-balanced, deterministic, disjoint from --eval_files).")
flags.DEFINE_integer("subset_seed", 0, "Seed of the --label_fraction subset.")
flags.DEFINE_integer("num_classes", 0, "Number of classes (0 = max label + 1).")
flags.DEFINE_integer("image_size", 224, "Side of the square training / evaluation crops.")
flags.DEFINE_float("crop_fraction", 0.875, "Evaluation centre crop (fraction of the short side).")
flags.DEFINE_float("min_crop_area", 0.08, "Smallest random-crop area for training.")
flags.DEFINE_integer("batch_size", 256, "Global training batch size.")
flags.DEFINE_integer("eval_batch_size", 256, "Batch size for feature extraction / evaluation.")
flags.DEFINE_integer("epochs", 90, "Training epochs (linear / finetune).")
flags.DEFINE_float("learning_rate", 0.1, "Peak learning rate (SGD, Nesterov, cosine decay).")
flags.DEFINE_float("momentum", 0.9, "SGD momentum.")
flags.DEFINE_float("weight_decay", 0.0, "Decoupled weight decay. In --mode=linear on "
                   "precomputed features, giving it fixes the decay (no grid).")
flags.DEFINE_string("weight_decay_grid", "0,1e-4,1e-3,1e-2,1e-1,1",
                    "--mode=linear on precomputed features: comma-separated weight decays; "
                    "the one with the best top-1 on a validation split of the TRAIN "
                    "features is used to retrain on all of them. Empty: the fixed "
                    "--weight_decay. Not used when --weight_decay is given.")
flags.DEFINE_float("validation_fraction", 0.2,
                   "Share of each class of the train features held out to choose the "
                   "weight decay (deterministic by --seed).")
flags.DEFINE_enum("eval_background", "original", ["original", "mixed_rand", "both"],
                  "Evaluate on the records as they are, on their mixed_rand variant (each "
                  "object pasted on the filled background of an image of another class; "
                  "needs masks) or on both, reporting the top-1 gap.")
flags.DEFINE_integer("background_seed", 0, "Seed of the mixed_rand background choice.")
flags.DEFINE_bool("linear_augmentation", False,
                  "Linear mode: train on random crops + flips through the frozen encoder "
                  "(paper protocol) instead of precomputed centre-crop features (fast).")
flags.DEFINE_bool("standardize_features", True,
                  "Linear mode on precomputed features: standardise each feature channel "
                  "with the train split's mean and std before the linear layer.")
flags.DEFINE_integer("knn_k", 20, "k of the k-NN classifier.")
flags.DEFINE_float("knn_temperature", 0.07, "Temperature T of the exp(cos / T) votes.")
flags.DEFINE_integer("seed", 0, "Random seed.")
flags.DEFINE_enum("strategy", "default", list(distribute.STRATEGIES),
                  "Distribution strategy (harl_tf.distribute).")
flags.DEFINE_integer("verbose", 1, "Keras fit verbosity (0, 1, 2).")


REQUIRED = ("encoder", "train_files", "eval_files", "output_dir")


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    from harl_tf.config import ConfigError  # heavy imports after the flags parsed
    from harl_tf.data import pipeline
    from harl_tf.downstream import evaluation, subsets

    try:  # problems of the flags themselves: one line each
        config = evaluation_config()
        config.check()
        for flag in ("train_files", "eval_files"):
            pipeline.list_files(getattr(config, flag), caller=f"--{flag}")
    except (ValueError, FileNotFoundError) as e:
        raise ConfigError(str(e)) from None
    strategy = distribute.make_strategy(FLAGS.strategy)
    try:
        results = evaluation.evaluate(config, strategy)
    except subsets.MissingLabelsError as e:   # the records' problem, not a bug
        raise ConfigError(str(e)) from None
    print(json.dumps({k: results[k] for k in ("mode", "top1", "top5", "num_train",
                                              "num_eval", "weight_decay", "background")}))


def evaluation_config():
    """The EvaluationConfig of the parsed flags: every field is the flag of the same name,
    except three the flags spell differently (a JSON --encoder_config, --output_stride
    'keep', the --weight_decay_grid string)."""
    from harl_tf.downstream import encoder_source, evaluation
    values = {f.name: FLAGS[f.name].value
              for f in dataclasses.fields(evaluation.EvaluationConfig)}
    values.update(
        encoder_config=(encoder_source.parse_encoder_config(FLAGS.encoder_config)
                        if FLAGS.encoder_config else None),
        output_stride=None if FLAGS.output_stride == "keep" else int(FLAGS.output_stride),
        weight_decay_grid=weight_decay_grid())
    return evaluation.EvaluationConfig(**values)


def weight_decay_grid():
    """The grid to choose the weight decay from: only for the linear probe on
    precomputed features, and only when --weight_decay is not given (an explicit
    --weight_decay keeps the fixed recipe, as before the grid existed)."""
    from harl_tf.downstream import probe_selection

    grid = probe_selection.parse_grid(FLAGS.weight_decay_grid)
    if FLAGS["weight_decay"].present:
        if FLAGS["weight_decay_grid"].present and grid:
            raise ValueError("give either --weight_decay (fixed) or --weight_decay_grid "
                             "(chosen on a validation split), not both.")
        return ()
    if FLAGS["weight_decay_grid"].present:
        return grid  # explicit: the library says when it does not apply
    return grid if FLAGS.mode == "linear" and not FLAGS.linear_augmentation else ()


def run():
    """Console-script entry point: the project's errors (HarlError: ConfigError, bad
    records, a bad export) end in one line; anything else is a bug and keeps its
    traceback."""
    errors.run_binary("finetune", main, required=REQUIRED)


if __name__ == "__main__":
    run()
