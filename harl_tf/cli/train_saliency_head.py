r"""Train the deep mask method's 1×1 saliency head on a frozen encoder (SPEC §7).

    python -m tools.train_saliency_head --encoder=/exports/harl_r50 \
        --images_dir=data/train/images --pseudo_masks_dir=masks/conventional \
        --output=/masks/deep_r50 --image_size=224 --epochs=20 --self_training_rounds=1

Without ``--pseudo_masks_dir`` the pseudo-masks are computed on the fly with the
conventional method. ``--encoder_config`` (a JSON file or inline JSON, e.g.
``'{"depth": 18, "output_stride": 8}'``) uses a RANDOMLY INITIALISED ResNet instead of an
export; the mask model records this and stores that encoder inside ``--output``.
The mask model directory is used as ``get_method("deep", model_path=<output>)``.

Beyond the paper's configuration (one input size, no refinement, threshold 0.5, the
defaults): ``--input_sizes=64,128`` runs the encoder at several sizes (multi-scale
features on the finest grid); ``--fuse_conventional=sigma0.4,no_grabcut`` and
``--extra_pseudo_masks_dirs`` add pseudo-masks whose cells are kept only where all agree;
``--refine=segments|guided|grabcut`` makes the mask follow the image's edges;
``--self_training_labels=refined`` self-trains on the refined masks.
"""
import json
import os

from absl import app, flags

from harl_tf import errors

FLAGS = flags.FLAGS

flags.DEFINE_string("encoder", None, "Encoder SavedModel directory (harl_tf.export output).")
flags.DEFINE_string("encoder_config", None,
                    "Instead of --encoder: ResNet config as a JSON file or inline JSON; the "
                    "encoder is RANDOMLY INITIALISED (a baseline, not a pretrained encoder).")
flags.DEFINE_string("images_dir", None, "Folder of training images (searched recursively).")
flags.DEFINE_string("pseudo_masks_dir", None,
                    "Folder of pseudo-masks mirroring --images_dir (<rel>/<name>.png); "
                    "default: compute conventional masks on the fly.")
flags.DEFINE_string("conventional_params", None,
                    "JSON dict of conventional-method parameters (on-the-fly masks only).")
flags.DEFINE_string("output", None, "Mask model directory to write (atomically).")
flags.DEFINE_integer("image_size", 224, "Square encoder input size for training and use.")
flags.DEFINE_float("threshold", 0.5, "Mask threshold recorded in the model: foreground "
                   "where the upsampled probability is > threshold.")
flags.DEFINE_integer("epochs", 20, "Epochs over the labelled cells, per round.")
flags.DEFINE_integer("self_training_rounds", 0,
                     "Rounds of self-training on the head's confident predictions.")
flags.DEFINE_float("learning_rate", 0.01, "Adam learning rate.")
flags.DEFINE_float("ignore_low", 0.2, "Cells with pseudo-mask area fraction in "
                   "(ignore_low, ignore_high) are ignored.")
flags.DEFINE_float("ignore_high", 0.8, "See --ignore_low.")
flags.DEFINE_bool("balance_classes", True, "Weigh foreground and background cells "
                  "equally in the loss (--nobalance_classes: plain mean).")
flags.DEFINE_list("input_sizes", [], "Several encoder input sizes (multi-scale features, "
                  "e.g. 64,128); default: --image_size alone.")
flags.DEFINE_list("fuse_conventional", [], "Conventional settings (harl_tf.masks.deep."
                  "CONVENTIONAL_SETTINGS names) computed for the training images and fused "
                  "with the pseudo-masks: cells labelled only where all agree.")
flags.DEFINE_list("extra_pseudo_masks_dirs", [], "More pseudo-mask folders (same layout) "
                  "fused with --pseudo_masks_dir's.")
flags.DEFINE_enum("refine", "none", ["none", "segments", "guided", "grabcut"],
                  "Boundary refinement before the threshold (none = the paper's).")
flags.DEFINE_list("refine_scales", ["100", "300"], "segments: Felzenszwalb k (= min size) "
                  "at 400x300 px, one segmentation per value, averaged.")
flags.DEFINE_integer("refine_radius", 2, "guided: window radius (working px).")
flags.DEFINE_float("refine_eps", 0.01, "guided: regulariser.")
flags.DEFINE_integer("refine_iterations", 1, "grabcut: iterations.")
flags.DEFINE_float("refine_sure", 0.0, "grabcut: pixels with p < sure or p > 1 - sure are "
                   "fixed.")
flags.DEFINE_enum("self_training_labels", "confident",
                  ["confident", "refined", "refined_and_pseudo"],
                  "Self-training labels: the head's confident cells, its refined masks, or "
                  "the cells where its refined masks and the pseudo-masks agree.")
flags.DEFINE_enum("head", "linear", ["linear", "context"], "linear: the paper's 1x1 "
                  "convolution; context: a 3x3 + 1x1 two-layer head (each cell sees its "
                  "neighbours).")
flags.DEFINE_integer("head_hidden", 64, "context head: hidden channels.")
flags.DEFINE_integer("limit", 0, "Train on a seeded random subset of this many images "
                     "(0 = all).")
flags.DEFINE_integer("batch_size", 32, "Images per encoder call.")
flags.DEFINE_integer("seed", 0, "Seed of --limit's subset and of the head's shuffling.")


def _json_flag(name):
    text = getattr(FLAGS, name)
    if text is None:
        return None
    try:
        if os.path.isfile(text):
            with open(text) as f:
                return json.load(f)
        return json.loads(text)
    except (OSError, json.JSONDecodeError) as e:
        raise app.UsageError(f"--{name}: not a JSON file or inline JSON object: {e}")


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    if (FLAGS.encoder is None) == (FLAGS.encoder_config is None):
        raise app.UsageError("give exactly one of --encoder (SavedModel export) or "
                             "--encoder_config (randomly initialised ResNet).")
    if FLAGS.pseudo_masks_dir and FLAGS.conventional_params:
        raise app.UsageError("--conventional_params applies only without --pseudo_masks_dir "
                             "(masks computed on the fly).")
    encoder_config = _json_flag("encoder_config")
    conventional_params = _json_flag("conventional_params")

    from harl_tf.masks import deep  # heavy imports after flag validation

    config = deep.TrainConfig(
        epochs=FLAGS.epochs, self_training_rounds=FLAGS.self_training_rounds,
        learning_rate=FLAGS.learning_rate, ignore_low=FLAGS.ignore_low,
        ignore_high=FLAGS.ignore_high, balance_classes=FLAGS.balance_classes,
        self_training_labels=FLAGS.self_training_labels, head=FLAGS.head,
        hidden=FLAGS.head_hidden, seed=FLAGS.seed)
    refinement = deep.RefineConfig(
        method=FLAGS.refine, scales=[float(v) for v in FLAGS.refine_scales],
        radius=FLAGS.refine_radius, eps=FLAGS.refine_eps,
        iterations=FLAGS.refine_iterations, sure=FLAGS.refine_sure)
    input_sizes = [int(v) for v in FLAGS.input_sizes] or FLAGS.image_size
    if FLAGS.encoder is not None:
        encoder = deep.FrozenEncoder.from_export(FLAGS.encoder)
    else:
        encoder = deep.FrozenEncoder.from_config(encoder_config)
        print("NOTE: --encoder_config: the encoder is RANDOMLY INITIALISED, not "
              "pretrained; the masks are a baseline.")
    _, images, pseudo, provenance = deep.load_training_set(
        FLAGS.images_dir, pseudo_masks_dir=FLAGS.pseudo_masks_dir, limit=FLAGS.limit,
        seed=FLAGS.seed, conventional_params=conventional_params)
    extra = []
    for masks_dir in FLAGS.extra_pseudo_masks_dirs:
        extra.append(deep.load_training_set(
            FLAGS.images_dir, pseudo_masks_dir=masks_dir, limit=FLAGS.limit,
            seed=FLAGS.seed, progress=False)[2])
    if FLAGS.fuse_conventional:
        sets, params = deep.conventional_mask_sets(images, FLAGS.fuse_conventional)
        extra.extend(sets)
        provenance["fused_conventional"] = params
    if FLAGS.extra_pseudo_masks_dirs:
        provenance["fused_pseudo_masks_dirs"] = [
            os.path.abspath(d) for d in FLAGS.extra_pseudo_masks_dirs]
    model = deep.train_saliency_head(
        encoder, images, pseudo, input_size=input_sizes, config=config,
        threshold=FLAGS.threshold, refinement=refinement, extra_pseudo_mask_sets=extra,
        batch_size=FLAGS.batch_size, provenance=provenance)
    model.save(FLAGS.output)
    for entry in model.training["history"]:
        print(f"round {entry['round']} ({entry['labels']}): loss {entry['loss']:.4f}, "
              f"labelled cells {entry['labelled_cell_fraction']:.1%}, IoU vs pseudo-masks "
              f"{entry['pseudo_mask_iou']:.4f}")
    print(f"wrote {os.path.abspath(FLAGS.output)} ({len(images)} images, grid "
          f"{model.training['feature_grid']}, input {'+'.join(map(str, model.input_sizes))} "
          f"px, refinement {model.refinement.method})")


def run():
    """Console-script entry point (``harl-train-saliency-head``)."""
    errors.run_binary("train_saliency_head", main, required=["images_dir", "output"])


if __name__ == "__main__":
    run()
