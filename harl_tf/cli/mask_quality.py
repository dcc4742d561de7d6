r"""Mean IoU (overall and per class), precision, recall and F-measure (β² = 0.3) of a
predicted mask folder, or of the masks inside TFRecords, against ground truth.

  python -m tools.mask_quality --pred_dir=out/masks --gt_dir=data/test/masks \
      --output_json=out/mask_quality.json
  python -m tools.mask_quality --pred_records='out/records/test-*.tfrecord' \
      --gt_dir=data/cutouts      # record id test/images/x/1.jpg -> test/masks/x/1.png
  python -m tools.mask_quality --pred_records='conv/train-*' --gt_records='gt/train-*'

Masks are matched by relative path without extension; the class of a mask is its first
folder. Prints a table and writes the summary (and per-image rows) as JSON. Exits with an
error when predictions are missing, unless ``--allow_missing``. The library code is
``harl_tf.masks.quality``.
"""
import json
import os

from absl import app, flags

from harl_tf import errors
from harl_tf.atomic import write_json_atomic
from harl_tf.masks.quality import evaluate, evaluate_folders, iter_record_pairs

FLAGS = flags.FLAGS

flags.DEFINE_string("pred_dir", None, "Folder of predicted masks (0/255 or 0/1 PNGs).")
flags.DEFINE_string("gt_dir", None, "Folder of ground-truth masks, same relative paths.")
flags.DEFINE_string("pred_records", None, "Glob(s), comma-separated, of TFRecords whose "
                    "masks are scored (instead of --pred_dir).")
flags.DEFINE_string("gt_records", None, "Glob(s) of TFRecords holding the ground-truth "
                    "masks, matched to --pred_records by record id (instead of --gt_dir).")
flags.DEFINE_list("class_names", [], "Class names indexed by label, for the per-class "
                  "table of --pred_records (default: the builder manifest's, else labels).")
flags.DEFINE_string("output_json", None, "Where to write the JSON summary (optional).")
flags.DEFINE_bool("per_image", False, "Include one row per image in the JSON.")
flags.DEFINE_bool("allow_missing", False, "Score the masks present instead of failing when "
                  "some predictions are missing.")


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    if bool(FLAGS.pred_dir) == bool(FLAGS.pred_records):
        raise app.UsageError("give exactly one of --pred_dir and --pred_records")
    if bool(FLAGS.gt_dir) == bool(FLAGS.gt_records):
        raise app.UsageError("give exactly one of --gt_dir and --gt_records")
    if FLAGS.pred_dir and FLAGS.gt_records:
        raise app.UsageError("--gt_records goes with --pred_records, not --pred_dir")
    # Folders or records that are missing or do not match: HarlError, one line.
    if FLAGS.pred_dir:
        report = evaluate_folders(FLAGS.pred_dir, FLAGS.gt_dir)
    else:
        report = evaluate(iter_record_pairs(
            FLAGS.pred_records, gt_records=FLAGS.gt_records, gt_dir=FLAGS.gt_dir,
            class_names=FLAGS.class_names or _manifest_classes(FLAGS.pred_records)))
    print(report.table())
    summary = report.summary()
    summary.update(pred=os.path.abspath(FLAGS.pred_dir) if FLAGS.pred_dir
                   else FLAGS.pred_records,
                   gt=os.path.abspath(FLAGS.gt_dir) if FLAGS.gt_dir else FLAGS.gt_records)
    if FLAGS.per_image:
        summary["per_image"] = report.rows
    if FLAGS.output_json:
        write_json_atomic(FLAGS.output_json, summary)
    if report.missing and not FLAGS.allow_missing:
        shown = ", ".join(report.missing[:5])
        raise errors.HarlError(
            f"{len(report.missing)} ground-truth masks have no prediction in "
            f"--pred_dir={FLAGS.pred_dir} (e.g. {shown}); pass --allow_missing to score "
            "the rest")


def _manifest_classes(pattern):
    """Class names from the builder's manifest.json next to the first matching shard."""
    import glob
    files = sorted(glob.glob(pattern.split(",")[0]))
    path = os.path.join(os.path.dirname(files[0]), "manifest.json") if files else ""
    if not os.path.isfile(path):
        return None
    with open(path, encoding="utf-8") as f:
        return json.load(f).get("class_names")


def run():
    """Console-script entry point (``harl-mask-quality``)."""
    errors.run_binary("mask_quality", main)


if __name__ == "__main__":
    run()
