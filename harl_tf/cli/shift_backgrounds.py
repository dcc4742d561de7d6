r"""Background-shifted copies of labelled TFRecords with masks (Xiao et al. 2021).

  python -m tools.shift_backgrounds --input_files='records/test-*' \
      --output_dir=records_mixed_rand --mode=mixed_rand --seed=0

Every record's object (cut out with its mask) is pasted onto the inpainted background of a
record of another class. The outputs have the same schema, file names, ids, labels and
masks as the inputs (images stored as PNG), plus ``shift_backgrounds.json`` (counts, the
donor of each id, skipped ids). Evaluate them like any records, e.g.
``python -m harl_tf.finetune --eval_files='records_mixed_rand/test-*' ...``, or let
``harl_tf.finetune --eval_background=both`` do it. A record with an empty mask is an
error naming it, unless ``--skip_empty_masks``. The library code is
``harl_tf.data.background_shift.shift_records``.
"""
import json

from absl import app, flags

from harl_tf import errors

FLAGS = flags.FLAGS

flags.DEFINE_string("input_files", None, "Glob(s) of labelled TFRecords with masks.")
flags.DEFINE_string("output_dir", None, "Folder for the shifted records (one file per input "
                    "file, same base name) and shift_backgrounds.json.")
flags.DEFINE_enum("mode", "mixed_rand", ["mixed_rand"],
                  "mixed_rand: each object on the filled background of a random image of "
                  "another class.")
flags.DEFINE_integer("seed", 0, "Seed of the background choice.")
flags.DEFINE_bool("skip_empty_masks", False, "Leave out (and count) records whose mask is "
                  "empty instead of stopping with an error.")


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    from harl_tf.data import background_shift  # TensorFlow after the cheap checks

    summary = background_shift.shift_records(  # no records, an empty mask, one class:
        FLAGS.input_files, FLAGS.output_dir, mode=FLAGS.mode, seed=FLAGS.seed,  # HarlError
        skip_empty_masks=FLAGS.skip_empty_masks)
    print(json.dumps({k: summary[k] for k in ("mode", "seed", "num_records",
                                              "num_skipped_empty_masks", "outputs")}))


def run():
    """Console-script entry point (``harl-shift-backgrounds``)."""
    errors.run_binary("shift_backgrounds", main, required=["input_files", "output_dir"])


if __name__ == "__main__":
    run()
