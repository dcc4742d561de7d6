r"""Downstream evaluation of a pretrained encoder: linear probe, fine-tuning, k-NN,
segmentation.

    python -m harl_tf.finetune --flagfile=flags/linear_eval_imagenet.cfg \
        --encoder=/exports/harl_r50 --output_dir=/evals/harl_r50_linear
    python -m harl_tf.finetune --mode=knn --encoder=/runs/harl_r50 \
        --train_files='/data/train-*' --eval_files='/data/val-*' --output_dir=/evals/knn
    python -m harl_tf.finetune --mode=finetune --encoder=random \
        --encoder_config='{"depth": 50}' ...          # supervised-from-scratch baseline
    python -m harl_tf.finetune --mode=segmentation --segmentation_head=fcn ...  # mean IoU

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

Every field of ``harl_tf.eval_config.EvaluationConfig`` is a flag of the same name, made
from its declaration (``config.define_flags``); the declared-required ones (``--encoder``,
``--train_files``, ``--eval_files``, ``--output_dir``) must be given. Flags are checked
before any heavy work: a bad value prints one line naming the flag and exits with status
2 (``errors.run_binary``). Whether ``--weight_decay_grid`` applies depends on which flags
were given (:func:`weight_decay_grid`).
"""
import dataclasses
import json

from absl import app, flags

from harl_tf import config, errors
from harl_tf.eval_config import EvaluationConfig, parse_grid

FLAGS = flags.FLAGS

config.define_flags(EvaluationConfig)

# The declared-required fields (their flags default to None, as absl's required flags must).
REQUIRED = tuple(f.name for f in dataclasses.fields(EvaluationConfig)
                 if f.metadata.get("required"))


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    from harl_tf.downstream import evaluation  # heavy imports after the flags parsed

    c = evaluation_config()
    evaluation.check(c)  # the declared rules, then the files and the encoder exist
    results = evaluation.evaluate(c)  # on the --strategy the config names
    summary = ("mode", "top1", "top5", "mean_iou", "pixel_accuracy", "num_train",
               "num_eval", "weight_decay", "background")  # segmentation: no top-k
    print(json.dumps({k: results[k] for k in summary if k in results}))


def evaluation_config() -> EvaluationConfig:
    """The EvaluationConfig of the parsed flags (each flag's declared conversion), with
    the weight decay grid chosen by which flags were given (:func:`weight_decay_grid`)."""
    return config.from_flags(EvaluationConfig, FLAGS, weight_decay_grid=weight_decay_grid())


def weight_decay_grid():
    """The grid to choose the weight decay from: only for the linear probe on
    precomputed features, and only when --weight_decay is not given (an explicit
    --weight_decay keeps the fixed recipe, as before the grid existed)."""
    grid = parse_grid(FLAGS.weight_decay_grid)
    if FLAGS["weight_decay"].present:
        if FLAGS["weight_decay_grid"].present and grid:
            raise config.ConfigError("give either --weight_decay (fixed) or --weight_decay_grid "
                             "(chosen on a validation split), not both.")
        return ()
    if FLAGS["weight_decay_grid"].present:
        return grid  # explicit: the library says when it does not apply
    return grid if FLAGS.mode == "linear" and not FLAGS.linear_augmentation else ()


def run():
    """Entry point (``harl-finetune``, ``python -m harl_tf.finetune``): the project's
    errors (HarlError: a bad flag, missing or unlabelled records, a bad export) end in one
    line; anything else is a bug and keeps its traceback."""
    errors.run_binary("finetune", main, required=REQUIRED)


if __name__ == "__main__":
    run()
