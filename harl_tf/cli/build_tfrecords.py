"""Builds harl-tf TFRecords (images + masks) from a folder, a TFDS dataset or the synthetic set.

Examples::

  # image + mask folders (the layout of ../shared/data/cutouts), both splits
  harl-build-tfrecords --source=folder --images_dir=../shared/data/cutouts \\
      --mask_method_name=ground_truth --output_dir=/tmp/cutouts_tfr

  # the embedded synthetic set, exact masks
  harl-build-tfrecords --source=synthetic --num_images=2000 --num_test_images=400 \\
      --image_size=96 --output_dir=/tmp/synthetic_tfr

  # a prepared TFDS dataset (never downloaded), masks computed on the fly
  harl-build-tfrecords --source=tfds --tfds_name=imagenette --tfds_data_dir=~/tfds \\
      --splits=train,validation --mask_method=conventional --output_dir=/tmp/inette

  # the same build as an Apache Beam pipeline (extra [beam]); any runner's options pass
  # through, e.g. --beam_pipeline_options="--runner=DataflowRunner --project=... ..."
  harl-build-tfrecords ... --runner=beam --beam_pipeline_options="--runner=DirectRunner \
      --direct_num_workers=2 --direct_running_mode=multi_processing"

  # machine 1 of 4 of one build without Beam (same flags on every machine)
  harl-build-tfrecords ... --num_shards=1024 --num_partitions=4 --partition_index=1

From a source checkout also ``python -m tools.build_tfrecords``. A rerun skips finished
shards. See ``harl_tf/data/builder.py`` for the rules.
"""
from __future__ import annotations

import json
import os

from absl import app, flags

from harl_tf import errors
from harl_tf.cli import beam_flags

FLAGS = flags.FLAGS

flags.DEFINE_enum("source", "folder", ["folder", "tfds", "synthetic"], "Where examples come from.")
flags.DEFINE_string("output_dir", None, "Folder for the shards, _shards/ sidecars and "
                    "manifest.json.")
flags.DEFINE_list("splits", [], "Splits to build (default: folder: train/validation/val/test "
                  "sub-folders that exist, else the whole folder as train; tfds: train; "
                  "synthetic: train, and test when --num_test_images > 0).")
# folder
flags.DEFINE_string("images_dir", None, "Root of the image tree (folder source).")
flags.DEFINE_string("masks_dir", None, "Root of a mask tree mirroring --images_dir (default: "
                    "each image's path with its last 'images' folder replaced by 'masks').")
flags.DEFINE_string("mask_suffix", ".png", "Extension of mask files (replaces the image's).")
flags.DEFINE_string("classes_file", None, "One class name per line; label = line number "
                    "(default: a classes.txt in the tree, else sorted class folder names).")
# tfds
flags.DEFINE_string("tfds_name", None, "TFDS dataset name (tfds source), e.g. cifar10.")
flags.DEFINE_string("tfds_data_dir", None, "TFDS data_dir holding the prepared dataset "
                    "(never downloaded).")
flags.DEFINE_string("tfds_image_key", "image", "Image feature of the TFDS dataset.")
flags.DEFINE_string("tfds_label_key", "label", "Label feature ('' for none: label -1).")
# synthetic
flags.DEFINE_integer("num_images", 1000, "Synthetic train images.")
flags.DEFINE_integer("num_test_images", 0, "Synthetic test images (after the train ones).")
flags.DEFINE_string("image_size", "64", "Synthetic image size: S or HxW (e.g. 375x500).")
flags.DEFINE_integer("seed", 0, "Synthetic set seed.")
flags.DEFINE_enum("image_format", "jpeg", ["jpeg", "png"], "Synthetic image encoding.")
flags.DEFINE_integer("jpeg_quality", 95, "Synthetic JPEG quality (1-100).")
flags.DEFINE_enum("object_colour", "random", ["random", "class"],
                  "Synthetic object colours: random (the default set) or one hue per class "
                  "(an easy variant whose labels a random encoder can read).")
flags.DEFINE_enum("synthetic_style", "shapes", ["shapes", "upright"],
                  "Synthetic set look: shapes (any rotation, textured objects, heavy "
                  "clutter) or upright (upright flat-coloured shapes, light clutter: what a "
                  "few minutes of pretraining learn; the quickstart's set).")
# masks
flags.DEFINE_string("mask_method", None, "Compute masks with this harl_tf.masks method "
                    "(e.g. conventional) instead of reading the source's masks.")
flags.DEFINE_string("mask_params", "{}", "JSON object of the mask method's parameters, "
                    "e.g. '{\"sigma\": 0.4}'.")
flags.DEFINE_string("mask_method_name", None, "mask/method recorded for masks read from the "
                    "source (default: ground_truth for synthetic, given otherwise).")
flags.DEFINE_bool("resize_masks", False, "Resize masks whose size differs from their image "
                  "(nearest neighbour) instead of stopping.")
# shards and workers
flags.DEFINE_integer("num_shards", None, "Shards per split (default: from "
                     "--target_shard_mb, at least --min_shards).")
flags.DEFINE_float("target_shard_mb", 128.0, "Target shard size when --num_shards is unset.")
flags.DEFINE_integer("min_shards", 8, "Least shards per split when --num_shards is unset.")
flags.DEFINE_integer("shuffle_seed", 0, "Permutation of the sorted examples before "
                     "sharding, so shards mix classes (-1: keep sorted order).")
flags.DEFINE_integer("num_partitions", 1, "Machines building this dataset together.")
flags.DEFINE_integer("partition_index", 0, "This machine's index: it builds shards k with "
                     "k % num_partitions == partition_index.")
flags.DEFINE_integer("num_workers", os.cpu_count() or 1, "Worker processes (1: no pool; "
                     "--runner=local only).")
beam_flags.define("this machine's worker processes")
# bad input
flags.DEFINE_bool("strict", False, "Stop at the first unreadable/corrupt/oversized image "
                  "instead of skipping and counting it.")
flags.DEFINE_integer("max_pixels", 89_478_485, "Reject images with more pixels "
                     "(decompression-bomb guard).")
flags.DEFINE_bool("progress", True, "Show a progress bar.")


def _image_size(text: str):
    parts = text.lower().replace(",", "x").split("x")
    try:
        values = [int(p) for p in parts]
    except ValueError:
        raise app.UsageError(f"--image_size must be S or HxW, got {text!r}") from None
    if len(values) == 1:
        return values[0]
    if len(values) == 2:
        return tuple(values)
    raise app.UsageError(f"--image_size must be S or HxW, got {text!r}")


def _mask_params(text: str):
    try:
        params = json.loads(text or "{}")
    except json.JSONDecodeError as err:
        raise app.UsageError(f"--mask_params must be a JSON object, got {text!r}: {err}") \
            from None
    if not isinstance(params, dict):
        raise app.UsageError(f"--mask_params must be a JSON object, got {text!r}")
    return params


def make_source_from_flags():
    from harl_tf.data import sources, tfds_source
    splits = FLAGS.splits or None
    if FLAGS.source == "folder":
        if not FLAGS.images_dir:
            raise app.UsageError("--images_dir is required with --source=folder")
        return sources.FolderSource(
            FLAGS.images_dir, masks_dir=FLAGS.masks_dir, mask_suffix=FLAGS.mask_suffix,
            classes_file=FLAGS.classes_file, splits=splits,
            mask_method_name=FLAGS.mask_method_name or "given")
    if FLAGS.source == "tfds":
        return tfds_source.TFDSSource(
            FLAGS.tfds_name, data_dir=FLAGS.tfds_data_dir, splits=splits or ["train"],
            image_key=FLAGS.tfds_image_key, label_key=FLAGS.tfds_label_key)
    return sources.SyntheticSource(
        FLAGS.num_images, image_size=_image_size(FLAGS.image_size), seed=FLAGS.seed,
        num_test_images=FLAGS.num_test_images, image_format=FLAGS.image_format,
        jpeg_quality=FLAGS.jpeg_quality, object_colour=FLAGS.object_colour,
        style=FLAGS.synthetic_style)


def _build_with_beam(source, common):
    if FLAGS.num_partitions != 1:
        raise app.UsageError("--num_partitions is for --runner=local; a Beam runner "
                             "spreads one build over its own workers")
    try:
        from harl_tf.data import beam_build
    except ImportError as err:
        raise app.UsageError(f"--runner=beam needs Apache Beam ({err}): pip install -e "
                             f"\".[cpu,beam]\"") from None
    try:
        return beam_build.build_dataset_beam(source, FLAGS.output_dir, pipeline_options=(
            FLAGS.beam_pipeline_options), **common)
    except beam_build.PipelineError as err:
        from harl_tf.data import builder
        raise builder.BuildError(str(err)) from None


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    from harl_tf.data import builder
    common = dict(
        splits=FLAGS.splits or None, mask_method=FLAGS.mask_method,
        mask_params=_mask_params(FLAGS.mask_params), given_mask_method=FLAGS.mask_method_name,
        num_shards=FLAGS.num_shards, target_shard_mb=FLAGS.target_shard_mb,
        min_shards=FLAGS.min_shards,
        shuffle_seed=None if FLAGS.shuffle_seed < 0 else FLAGS.shuffle_seed,
        resize_masks=FLAGS.resize_masks, strict=FLAGS.strict, max_pixels=FLAGS.max_pixels)
    source = make_source_from_flags()  # BuildError, SourceError: one line (run_binary)
    if FLAGS.runner == "beam":
        manifest = _build_with_beam(source, common)
    else:
        manifest = builder.build_dataset(
            source, FLAGS.output_dir, num_partitions=FLAGS.num_partitions,
            partition_index=FLAGS.partition_index, num_workers=FLAGS.num_workers,
            progress=FLAGS.progress, **common)
    for split, entry in manifest["splits"].items():
        print(f"{split}: {entry['num_records']} records in {entry['num_shards']} shards, "
              f"{entry['num_skipped']} skipped, missing shards: {len(entry['missing_shards'])}")
    run = manifest["last_run"]
    print(f"{run['images_processed']} images in {run['seconds']} s "
          f"({run['images_per_second']} images/s); complete: {manifest['complete']}; "
          f"manifest: {os.path.join(FLAGS.output_dir, builder.MANIFEST_NAME)}")
    return 0


def run():
    """Console-script entry point (``harl-build-tfrecords``)."""
    errors.run_binary("build_tfrecords", main, required=["output_dir"])


if __name__ == "__main__":
    run()
