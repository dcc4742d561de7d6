r"""Heuristic masks for an image folder, written into a mirrored mask folder.

  python -m tools.generate_masks --images_dir=data/train/images \
      --masks_dir=data/train/masks --method=conventional --num_workers=8

``images_dir/a/x.jpg`` → ``masks_dir/a/x.png`` (0/255). Existing masks are skipped (resume);
``--shard_index/--num_shards`` split one dataset across machines (or ``--runner=beam``
runs it as an Apache Beam pipeline, any runner); a summary JSON (counts,
fallbacks, parameters) is written next to the masks. Every parameter of the conventional
method is a flag (``--sigma``, ``--min_size``, …); unset flags keep the library defaults,
and the values used are recorded in the summary. The library code is
``harl_tf.masks.folder.generate_mask_folder``.
"""
import json
import sys

from absl import app, flags

from harl_tf import errors
from harl_tf.cli import beam_flags
from harl_tf.masks import available_methods
from harl_tf.masks.conventional import DEFAULT_PARAMS
from harl_tf.masks.folder import generate_mask_folder

FLAGS = flags.FLAGS

flags.DEFINE_string("images_dir", None, "Root folder of the input images (searched "
                    "recursively for .jpg/.jpeg/.png/.bmp/.webp/.tif).")
flags.DEFINE_string("masks_dir", None, "Root folder of the output masks (mirrors "
                    "--images_dir; extension .png, values 0/255).")
flags.DEFINE_string("method", "conventional", "Mask method; one of the names in "
                    "harl_tf.masks.available_methods().")
flags.DEFINE_string("mask_model", None, "Model directory for the 'deep' method (passed as "
                    "model_path=...).")
flags.DEFINE_integer("num_workers", 1, "Worker processes (use 1 for the 'deep' method).")
flags.DEFINE_integer("shard_index", 0, "This machine's shard, in [0, --num_shards).")
flags.DEFINE_integer("num_shards", 1, "Number of shards the sorted file list is split into "
                     "(round-robin).")
flags.DEFINE_bool("overwrite", False, "Recompute masks that already exist.")
flags.DEFINE_bool("strict", False, "Stop at the first image that cannot be decoded.")
flags.DEFINE_bool("progress", True, "Show a progress bar.")
flags.DEFINE_string("summary_path", None, "Summary JSON path (default: in --masks_dir).")
beam_flags.define("--num_workers processes on this machine")

_HELP = {
    "sigma": "FH Gaussian smoothing, working pixels (paper: 0.8).",
    "min_size": "FH minimum component size in pixels at --reference_area (paper: 1000).",
    "k": "FH scale k at --reference_area (larger: bigger segments).",
    "reference_area": "Pixel area at which --min_size and --k are given (400*300).",
    "max_side": "Long side of the working copy; larger images are downscaled.",
    "geodesic_sigma": "Lab-distance scale of the geodesic region similarity.",
    "boundary_sigma": "Scale of the boundary-connectivity background prior.",
    "contrast_sigma": "Spatial scale (image units) of the colour contrast.",
    "centre_sigma": "Width (image units) of the centre prior.",
    "smoothness_floor": "Constant added to neighbour smoothness weights.",
    "threshold": "'otsu', 'mean' (2x mean) or a number in [0, 1].",
    "refine_iterations": "GrabCut refinement iterations (0: off).",
    "open_fraction": "Opening radius as a fraction of the long side.",
    "min_object_fraction": "Foreground components below this image fraction are dropped.",
    "max_hole_fraction": "Holes below this image fraction are filled.",
    "max_foreground_fraction": "Masks above this fraction use the fallback.",
    "fallback_axes": "Fallback ellipse semi-axes as a fraction of half the image size.",
}
for _name, _default in DEFAULT_PARAMS.items():
    _help = f"[conventional] {_HELP.get(_name, '')} Default {_default}."
    if isinstance(_default, str):
        flags.DEFINE_string(_name, None, _help)
    elif isinstance(_default, int) and _name not in ("k",):
        flags.DEFINE_integer(_name, None, _help)
    else:
        flags.DEFINE_float(_name, None, _help)


def method_params_from_flags() -> dict:
    """The method's keyword parameters from the flags that were set."""
    if FLAGS.method == "conventional":
        params = {}
        for name in DEFAULT_PARAMS:
            value = FLAGS[name].value
            if value is None:
                continue
            if name == "threshold" and value not in ("otsu", "mean"):
                try:
                    value = float(value)
                except ValueError:
                    raise app.UsageError(f"--threshold must be 'otsu', 'mean' or a number, "
                                         f"got {value!r}") from None
            params[name] = value
        return params
    params = {}
    if FLAGS.mask_model:
        params["model_path"] = FLAGS.mask_model
    return params


def _generate_with_beam(common: dict) -> dict:
    try:
        from harl_tf.data import beam_build
    except ImportError as error:
        raise app.UsageError(f"--runner=beam needs Apache Beam ({error}): pip install -e "
                             f"\".[cpu,beam]\"") from None
    return beam_build.generate_mask_folder_beam(  # a failed step: PipelineError (HarlError)
        FLAGS.images_dir, FLAGS.masks_dir, pipeline_options=FLAGS.beam_pipeline_options,
        **common)


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    if FLAGS.method not in available_methods():
        raise app.UsageError(f"--method={FLAGS.method!r}; expected one of "
                             f"{list(available_methods())}")
    common = dict(method=FLAGS.method, method_params=method_params_from_flags(),
                  shard_index=FLAGS.shard_index, num_shards=FLAGS.num_shards,
                  overwrite=FLAGS.overwrite, strict=FLAGS.strict,
                  summary_path=FLAGS.summary_path)
    # Bad flags or folders, CorruptImageError (--strict), a failed Beam step: HarlError.
    if FLAGS.runner == "beam":
        summary = _generate_with_beam(common)
    else:
        summary = generate_mask_folder(FLAGS.images_dir, FLAGS.masks_dir,
                                       num_workers=FLAGS.num_workers,
                                       progress=FLAGS.progress, **common)
    short = {k: summary[k] for k in ("num_images", "written", "skipped_existing", "corrupt",
                                     "fallbacks", "images_per_second")}
    print(json.dumps(short))
    for path in summary["corrupt_paths"]:
        print(f"corrupt: {path}", file=sys.stderr)


def run():
    """Console-script entry point (``harl-generate-masks``)."""
    errors.run_binary("generate_masks", main, required=["images_dir", "masks_dir"])


if __name__ == "__main__":
    run()
