r"""Export the pretrained online encoder as a SavedModel (+ Keras weights, + JSON).

    python -m harl_tf.export --model_dir=/runs/harl_r50 --export_dir=/exports/harl_r50
    python -m harl_tf.export --model_dir=... --export_dir=... --step=100000 --onnx
    python -m harl_tf.export --model_dir=... --export_dir=... --output_stride=32

Reads the latest complete checkpoint of the pretraining ``--model_dir`` (or ``--step``) and
writes ``--export_dir`` atomically; see :mod:`harl_tf.saved_encoder` for the
layout and the ``serving_default`` signature (float32 ``images`` [batch, height, width, 3]
in [0, 1] -> ``embedding`` [batch, C], ``feature_map`` [batch, h, w, C]; and
``object_embeddings``: ``images`` + ``masks`` -> foreground / background / global
embeddings).

The encoder is exported at the output stride it was pretrained at, so the export computes
the feature map its evaluation during training saw (a stride-8 encoder at 64 px: 8x8).
``--output_stride=32`` (or 16, 8) converts it explicitly: the weights keep their shapes and
only the sampling grid of the last stages changes, which can cost accuracy (the stride-8
fmnist-scenes encoder converted to 32 has a 2x2 map; its k-NN top-1 fell from 0.28 to 0.18).
"""
import os

from absl import app, flags, logging

from harl_tf import errors

FLAGS = flags.FLAGS

flags.DEFINE_string("model_dir", None, "Pretraining model_dir (checkpoints + config).")
flags.DEFINE_string("export_dir", None, "Directory to create for the export.")
flags.DEFINE_integer("step", None, "Checkpoint step to export (default: the latest).")
flags.DEFINE_enum("output_stride", "keep", ["keep", "32", "16", "8"],
                  "Output stride of the exported encoder: 'keep' = the stride it was "
                  "pretrained at (its feature map, as evaluated); 32, 16 or 8 converts it "
                  "(same weights, another sampling grid), e.g. 32 for a standard ResNet.")
flags.DEFINE_bool("batchnorm_training", False,
                  "Serve with BatchNorm in training mode (batch statistics).")
flags.DEFINE_bool("overwrite", False, "Replace an existing --export_dir.")
flags.DEFINE_bool("onnx", False, "Also write encoder.onnx (needs the onnx extra) and check "
                  "it against TensorFlow with onnxruntime.")


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    if not os.path.isdir(FLAGS.model_dir):
        raise app.UsageError(f"--model_dir={FLAGS.model_dir} does not exist.")
    if os.path.exists(FLAGS.export_dir) and not FLAGS.overwrite:
        raise app.UsageError(f"--export_dir={FLAGS.export_dir} already exists; pass "
                             "--overwrite to replace it.")
    if FLAGS.step is not None and FLAGS.step < 0:
        raise app.UsageError(f"--step must be >= 0, got {FLAGS.step}.")

    if not FLAGS["verbosity"].present:  # TF's SavedModel writer is chatty at INFO
        logging.set_verbosity(logging.WARNING)
    from harl_tf import saved_encoder  # heavy imports after validation
    from harl_tf import onnx_export

    if FLAGS.onnx and not onnx_export.onnx_available():
        raise app.UsageError(f"--onnx needs tf2onnx and onnxruntime: "
                             f"{onnx_export.INSTALL_HINT}")
    output_stride = None if FLAGS.output_stride == "keep" else int(FLAGS.output_stride)
    metadata = saved_encoder.export_from_model_dir(  # ExportError: one line (run_binary)
        FLAGS.model_dir, FLAGS.export_dir, step=FLAGS.step, output_stride=output_stride,
        batchnorm_training=FLAGS.batchnorm_training, overwrite=FLAGS.overwrite,
        onnx=FLAGS.onnx)
    source = metadata["source"]
    print(f"exported step {source.get('step')} of {source.get('model_dir')} "
          f"(output stride {metadata['output_stride']}, C = {metadata['feature_dim']}) "
          f"to {os.path.abspath(FLAGS.export_dir)}")


def run():
    """Entry point (``harl-export``, ``python -m harl_tf.export``)."""
    errors.run_binary("export", main, required=["model_dir", "export_dir"])


if __name__ == "__main__":
    run()
