r"""PNG contact sheet of images with their masks, or of the pipeline's augmented views.

    # images with their masks overlaid (red tint, yellow contour)
    python -m tools.preview --images_dir=data/test/images --output=/tmp/masks.png
    python -m tools.preview --records='records/train-*.tfrecord' --output=/tmp/masks.png
    # the two augmented views + masks per example, as the pretraining pipeline makes them
    python -m tools.preview --mode=views --records='records/train-*' --output=/tmp/views.png

``--masks_dir`` mirrors ``--images_dir`` (default: ``images`` → ``masks`` in the path, the
layout of ../shared/data/cutouts). See :mod:`harl_tf.viz`.
"""
import os

from absl import app, flags

from harl_tf import errors

FLAGS = flags.FLAGS

flags.DEFINE_enum("mode", "masks", ["masks", "views"],
                  "masks: image | mask overlay; views: view1 | mask1 | view2 | mask2 from "
                  "the pretraining input pipeline (needs --records).")
flags.DEFINE_string("images_dir", None, "Image folder (masks mode).")
flags.DEFINE_string("masks_dir", None, "Mask folder mirroring --images_dir (masks mode).")
flags.DEFINE_string("records", None, "TFRecord glob (comma-separated globs allowed).")
flags.DEFINE_string("output", None, "PNG file to write (atomically).")
flags.DEFINE_integer("rows", 8, "Rows of the sheet.")
flags.DEFINE_integer("per_row", 2, "Examples per row (masks mode).")
flags.DEFINE_integer("tile_size", 128, "Side of each tile in pixels.")
flags.DEFINE_integer("image_size", 128, "View size of the input pipeline (views mode).")
flags.DEFINE_integer("seed", 0, "Seed of the pipeline's views (views mode).")


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    if FLAGS.rows < 1 or FLAGS.per_row < 1 or FLAGS.tile_size < 8:
        raise app.UsageError("--rows and --per_row must be >= 1 and --tile_size >= 8.")
    if FLAGS.mode == "views" and not FLAGS.records:
        raise app.UsageError("--mode=views needs --records (the pipeline reads TFRecords).")
    if FLAGS.mode == "masks" and (FLAGS.images_dir is None) == (FLAGS.records is None):
        raise app.UsageError("--mode=masks needs exactly one of --images_dir or --records.")

    from harl_tf import viz  # heavy imports after flag validation

    # Records, folders or masks that are missing or do not fit: HarlError, one line.
    if FLAGS.mode == "views":
        batch = viz.pipeline_views(FLAGS.records, FLAGS.rows, FLAGS.image_size,
                                   seed=FLAGS.seed)
        rows, titles = viz.view_rows(batch, FLAGS.rows), viz.VIEW_TITLES
    else:
        examples = (viz.folder_examples(FLAGS.images_dir, FLAGS.masks_dir)
                    if FLAGS.images_dir else viz.record_examples(FLAGS.records))
        rows = viz.mask_rows(examples, FLAGS.rows, FLAGS.per_row)
        titles = viz.MASK_TITLES
    sheet = viz.contact_sheet(rows, tile_size=FLAGS.tile_size, titles=titles)
    viz.write_png(sheet, FLAGS.output)
    print(f"wrote {os.path.abspath(FLAGS.output)} ({sheet.shape[1]}x{sheet.shape[0]} px, "
          f"{len(rows)} rows)")


def run():
    """Console-script entry point (``harl-preview``)."""
    errors.run_binary("preview", main, required=["output"])


if __name__ == "__main__":
    run()
