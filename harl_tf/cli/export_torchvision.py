r"""Write the encoder's weights for PyTorch: torchvision names (.npz) and detectron2 (.pkl).

    python -m tools.export_torchvision --encoder=/exports/harl_r50 --output=/out/harl_r50
    # -> /out/harl_r50.npz  (torchvision resnet50 state_dict without fc.*, numpy arrays)
    #    /out/harl_r50.pkl  (detectron2: {"model": ..., "__author__": "harl-tf",
    #                        "matching_heuristics": True})

``--encoder`` is an export directory or a pretraining model_dir (latest checkpoint or
``--step``). Name and layout rules: harl_tf/downstream/torchvision_weights.py.
"""
import os
import sys

from absl import app, flags

from harl_tf import errors

FLAGS = flags.FLAGS

flags.DEFINE_string("encoder", None, "Export directory or pretraining model_dir.")
flags.DEFINE_integer("step", None, "Checkpoint step when --encoder is a model_dir.")
flags.DEFINE_string("output", None, "Output path prefix; .npz / .pkl are appended.")
flags.DEFINE_list("formats", ["torchvision", "detectron2"],
                  "Any of: torchvision (.npz), detectron2 (.pkl).")
flags.DEFINE_bool("overwrite", False, "Replace existing output files.")

_SUFFIX = {"torchvision": ".npz", "detectron2": ".pkl"}


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    if not os.path.isdir(FLAGS.encoder):
        raise app.UsageError(f"--encoder={FLAGS.encoder} is not a directory (expected an "
                             "export directory or a pretraining model_dir).")
    unknown = sorted(set(FLAGS.formats) - set(_SUFFIX))
    if unknown or not FLAGS.formats:
        raise app.UsageError(f"--formats must be a non-empty subset of {sorted(_SUFFIX)}, "
                             f"got {FLAGS.formats}.")
    paths = {fmt: FLAGS.output + _SUFFIX[fmt] for fmt in FLAGS.formats}
    existing = [p for p in paths.values() if os.path.exists(p)]
    if existing and not FLAGS.overwrite:
        raise app.UsageError(f"{existing[0]} exists; pass --overwrite to replace it.")

    from harl_tf.downstream import encoder_source, torchvision_weights

    # Neither an export nor a model_dir: a HarlError naming --encoder.
    source = encoder_source.load_encoder(FLAGS.encoder, step=FLAGS.step)
    for note in torchvision_weights.compatibility_notes(source.config):
        print(f"warning: {note}", file=sys.stderr)
    state = torchvision_weights.torchvision_state_dict(source.encoder)
    if "torchvision" in paths:
        torchvision_weights.save_npz(paths["torchvision"], state)
    if "detectron2" in paths:
        torchvision_weights.save_detectron2(paths["detectron2"], state)
    for fmt, path in paths.items():
        print(f"wrote {fmt}: {path} ({len(state)} tensors)")


def run():
    """Console-script entry point (``harl-export-torchvision``)."""
    errors.run_binary("export_torchvision", main, required=["encoder", "output"])


if __name__ == "__main__":
    run()
