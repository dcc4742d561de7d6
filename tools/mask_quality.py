r"""Mean IoU (overall and per class), precision, recall and F-measure (β² = 0.3) of a
predicted mask folder against a ground-truth mask folder.

  python tools/mask_quality.py --pred_dir=out/masks --gt_dir=data/test/masks \
      --output_json=out/mask_quality.json

Masks are matched by relative path without extension; the class of a mask is its first
folder. Prints a table and writes the summary (and per-image rows) as JSON. Exits with an
error when predictions are missing, unless ``--allow_missing``. The library code is
``harl_tf.masks.quality``.
"""
import json
import os
import sys

if __package__ in (None, ""):  # `python tools/mask_quality.py` from a source checkout
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from absl import app, flags  # noqa: E402

from harl_tf.masks.folder import write_bytes_atomic  # noqa: E402
from harl_tf.masks.quality import evaluate_folders  # noqa: E402

FLAGS = flags.FLAGS

flags.DEFINE_string("pred_dir", None, "Folder of predicted masks (0/255 or 0/1 PNGs).")
flags.DEFINE_string("gt_dir", None, "Folder of ground-truth masks, same relative paths.")
flags.DEFINE_string("output_json", None, "Where to write the JSON summary (optional).")
flags.DEFINE_bool("per_image", False, "Include one row per image in the JSON.")
flags.DEFINE_bool("allow_missing", False, "Score the masks present instead of failing when "
                  "some predictions are missing.")


def _main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    if not FLAGS.pred_dir or not FLAGS.gt_dir:
        raise app.UsageError("--pred_dir and --gt_dir are required")
    report = evaluate_folders(FLAGS.pred_dir, FLAGS.gt_dir)
    print(report.table())
    summary = report.summary()
    summary.update(pred_dir=os.path.abspath(FLAGS.pred_dir),
                   gt_dir=os.path.abspath(FLAGS.gt_dir))
    if FLAGS.per_image:
        summary["per_image"] = report.rows
    if FLAGS.output_json:
        write_bytes_atomic(FLAGS.output_json,
                           (json.dumps(summary, indent=2) + "\n").encode("utf-8"))
    if report.missing and not FLAGS.allow_missing:
        shown = ", ".join(report.missing[:5])
        sys.exit(f"error: {len(report.missing)} ground-truth masks have no prediction in "
                 f"--pred_dir={FLAGS.pred_dir} (e.g. {shown}); pass --allow_missing to score "
                 "the rest")


def main():
    app.run(_main)


if __name__ == "__main__":
    main()
