r"""Mask bootstrapping in one command: conventional masks → HARL pretraining → deep masks from
that encoder → HARL pretraining on the deep masks → … (harl_tf.masks.deep.bootstrap).

    python -m tools.bootstrap_masks --flagfile=flags/bootstrap_fmnist_scenes.cfg
    python -m tools.bootstrap_masks --flagfile=flags/bootstrap_fmnist_scenes.cfg --dry_run

Each round records its masks' mean IoU (with --exact_masks_dir, scoring only) and its
encoder's k-NN and linear-probe top-1 in --work_dir/bootstrap.json; every step is a child
process logged under --work_dir/logs/, and a rerun skips the steps already done.
"""
import os

from absl import flags

from harl_tf import errors

FLAGS = flags.FLAGS

flags.DEFINE_string("data_dir", None, "Dataset root: train/images/<class>/<id>.jpg and "
                    "test/images/... (fmnist-scenes layout); classes.txt if present.")
flags.DEFINE_string("work_dir", None, "Where every round's masks, records, model, export, "
                    "evaluations and saliency model go.")
flags.DEFINE_string("recipe_flagfile", None, "HARL pretraining recipe flagfile (its "
                    "--train_files and --model_dir are replaced per round).")
flags.DEFINE_integer("rounds", 2, "Pretrainings: round 0 on the conventional masks, round r "
                     "on the deep masks of round r-1's encoder.")
flags.DEFINE_string("saliency_flagfile", None, "train_saliency_head settings flagfile "
                    "(input sizes, refinement, threshold, ...; default: its defaults).")
flags.DEFINE_string("conventional_masks_dir", None, "Round 0 masks of the train images "
                    "(default: computed with tools/generate_masks.py).")
flags.DEFINE_string("exact_masks_dir", None, "Exact masks of the train images, used only to "
                    "score each round's masks.")
flags.DEFINE_string("eval_train_files", None, "Labelled train records for k-NN / linear "
                    "(default: built from --data_dir).")
flags.DEFINE_string("eval_test_files", None, "Labelled evaluation records (with "
                    "--eval_train_files).")
flags.DEFINE_enum("head_labels", "conventional", ["conventional", "round"],
                  "Pseudo-masks of each round's saliency head: the conventional masks, or "
                  "that round's masks.")
flags.DEFINE_string("round0_export", None, "An encoder export pretrained before on the "
                    "conventional masks (e.g. a kept one): round 0 evaluates it and trains its "
                    "saliency head instead of pretraining.")
flags.DEFINE_integer("head_limit", 2000, "Train images each saliency head learns from.")
flags.DEFINE_list("pretrain_flags", [], "Extra flags for every pretraining (e.g. "
                  "--train_steps=500).")
flags.DEFINE_integer("eval_image_size", 64, "Image side of the k-NN / linear evaluation.")
flags.DEFINE_integer("num_workers", 2, "Worker processes of mask generation and records.")
flags.DEFINE_integer("seed", 0, "Seed of pretraining, evaluation and the head's subset.")
flags.DEFINE_bool("dry_run", False, "Print the plan (done / to do) and stop.")


def main(argv):
    from absl import app
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    from harl_tf.masks.deep import bootstrap  # after flag validation

    config = bootstrap.BootstrapConfig(
        data_dir=FLAGS.data_dir, work_dir=FLAGS.work_dir,
        recipe_flagfile=FLAGS.recipe_flagfile, rounds=FLAGS.rounds,
        saliency_flagfile=FLAGS.saliency_flagfile,
        conventional_masks_dir=FLAGS.conventional_masks_dir,
        exact_masks_dir=FLAGS.exact_masks_dir, eval_train_files=FLAGS.eval_train_files,
        eval_test_files=FLAGS.eval_test_files, head_labels=FLAGS.head_labels,
        round0_export=FLAGS.round0_export,
        head_limit=FLAGS.head_limit, pretrain_flags=tuple(FLAGS.pretrain_flags),
        eval_flags=(f"--image_size={FLAGS.eval_image_size}", "--crop_fraction=1.0",
                    "--eval_batch_size=128"),
        num_workers=FLAGS.num_workers, seed=FLAGS.seed)
    if FLAGS.dry_run:
        for step in bootstrap.plan(config):
            state = "done" if step.done else "to do"
            print(f"round {step.round:>2} {step.name:<12} {state:<6} {' '.join(step.command)}")
        return
    try:
        summary = bootstrap.run(config)
    except bootstrap.StepFailed as e:
        raise errors.HarlError(str(e)) from None
    for entry in summary["rounds"]:
        figures = [f"mask IoU {entry['mask_mean_iou']}"]
        if "knn_top1" in entry:
            figures += [f"k-NN {entry['knn_top1']}", f"linear {entry['linear_top1']}"]
        print(f"round {entry['round']} ({entry['mask_method']}): " + ", ".join(figures))
    print(f"wrote {os.path.join(os.path.abspath(FLAGS.work_dir), bootstrap.SUMMARY_FILE)}")


def run():
    """Console-script entry point (``harl-bootstrap-masks``)."""
    errors.run_binary("bootstrap_masks", main,
                      required=["data_dir", "work_dir", "recipe_flagfile"])


if __name__ == "__main__":
    run()
