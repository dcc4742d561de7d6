"""Deep masks (frozen encoder + 1×1 head) vs conventional masks on ../shared/data/cutouts.

1. Encoder: ``--encoder`` (an export SavedModel), or else a RANDOMLY INITIALISED ResNet
   (``--encoder_config``, default ResNet-18 at output stride 8) exported to a temporary
   SavedModel through :mod:`harl_tf.saved_encoder`, so both cases run the same
   SavedModel path. A random encoder is a baseline, labelled as such in the output.
2. Train the head on a seeded subset of ``--train_limit`` TRAIN images whose pseudo-masks
   are the CONVENTIONAL masks (``get_method("conventional")``, computed here; no labels).
3. On a seeded subset of ``--test_limit`` TEST images: mean IoU against the ground-truth
   masks of the deep masks after every training round and of the conventional masks of
   the same images; deep inference speed (images/s: JPEG decode, resize, encoder, head,
   upsampling, threshold; batched through ``predict_files``) and conventional speed.

Writes ``bench/results/bench_masks_deep.json``.

    python -m bench.bench_masks_deep [--train_limit 400] [--test_limit 400]
        [--image_size 128] [--epochs 20] [--self_training_rounds 1] [--encoder DIR]
"""
from __future__ import annotations

import json
import os
import tempfile
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import numpy as np  # noqa: E402
from absl import app, flags  # noqa: E402

from bench import common  # noqa: E402
from harl_tf.masks import deep, folder, get_method, quality  # noqa: E402

FLAGS = flags.FLAGS
flags.DEFINE_string("data", "../shared/data/cutouts", "cutouts dataset root.")
flags.DEFINE_string("encoder", None, "Encoder SavedModel export dir (default: a randomly "
                    "initialised ResNet of --encoder_config).")
flags.DEFINE_string("encoder_config", '{"depth": 18, "output_stride": 8}',
                    "ResNet config (JSON) of the random encoder without --encoder.")
flags.DEFINE_integer("train_limit", 400, "Train images the head learns from (seeded subset).")
flags.DEFINE_integer("test_limit", 400, "Test images scored (seeded subset).")
flags.DEFINE_integer("image_size", 128, "Head input side, px.")
flags.DEFINE_integer("epochs", 20, "Head training epochs per round.")
flags.DEFINE_integer("self_training_rounds", 1, "Self-training rounds (each relabels the cells "
                     "with the head's own masks, then trains again).")
flags.DEFINE_bool("balance_classes", True, "Weigh foreground and background cells "
                  "equally in the head's loss.")
flags.DEFINE_integer("batch_size", 32, "Batch size (training and inference).")
flags.DEFINE_integer("seed", 0, "Seed of the subsets and the head.")
flags.DEFINE_string("output", os.path.join(common.RESULTS_DIR, "bench_masks_deep.json"),
                    "Results file.")


def subset(paths, limit, seed):
    if 0 < limit < len(paths):
        chosen = np.random.default_rng(seed).choice(len(paths), limit, replace=False)
        paths = [paths[i] for i in sorted(chosen)]
    return paths


def main(argv) -> None:
    del argv
    started = time.time()

    with tempfile.TemporaryDirectory() as workdir:
        if FLAGS.encoder:
            encoder_path, encoder_label = FLAGS.encoder, "export " + os.path.abspath(FLAGS.encoder)
        else:
            config = json.loads(FLAGS.encoder_config)
            encoder_path = os.path.join(workdir, "random_encoder")
            deep.FrozenEncoder.from_config(config).save(encoder_path)
            encoder_label = f"RANDOMLY INITIALISED ResNet {config} (not pretrained)"
        encoder = deep.FrozenEncoder.from_saved_model(encoder_path)

        # Train on conventional pseudo-masks of TRAIN images.
        t0 = time.time()
        _, train_images, pseudo, provenance = deep.load_training_set(
            os.path.join(FLAGS.data, "train", "images"), limit=FLAGS.train_limit,
            seed=FLAGS.seed)
        pseudo_seconds = time.time() - t0
        heads = {}
        t0 = time.time()
        model = deep.train_saliency_head(
            encoder, train_images, pseudo, input_size=FLAGS.image_size,
            config=deep.TrainConfig(epochs=FLAGS.epochs,
                                    self_training_rounds=FLAGS.self_training_rounds,
                                    balance_classes=FLAGS.balance_classes, seed=FLAGS.seed),
            batch_size=FLAGS.batch_size, provenance=provenance,
            on_round=lambda r, head: heads.__setitem__(r, head))
        train_seconds = time.time() - t0

        # Evaluate on TEST images against ground truth.
        images_dir = os.path.join(FLAGS.data, "test", "images")
        masks_dir = os.path.join(FLAGS.data, "test", "masks")
        relative = subset(folder.list_images(images_dir), FLAGS.test_limit, FLAGS.seed)
        paths = [os.path.join(images_dir, rel) for rel in relative]
        truth = [quality.read_mask(os.path.join(masks_dir, folder.mask_relpath(rel)))
                 for rel in relative]
        classes = [rel.split("/")[0] for rel in relative]
        method = deep.DeepSaliencyMasks(model=model, batch_size=FLAGS.batch_size)
        method.predict_arrays([folder.read_image(paths[0])])  # warm-up (tracing)
        rounds = []
        for r, head in sorted(heads.items()):
            method.model.head = head
            t0 = time.time()
            predicted = [mask for _, mask in method.predict_files(paths)]
            seconds = time.time() - t0
            report = quality.evaluate_arrays(predicted, truth, classes)
            rounds.append({"round": r, "test_mean_iou": report.mean_iou,
                           "test_class_mean_iou": report.class_mean_iou,
                           "test_mean_foreground": float(np.mean([m.mean() for m in predicted])),
                           "train_pseudo_mask_iou": model.training["history"][r]["pseudo_mask_iou"],
                           "inference_images_per_second": len(paths) / seconds})
        conventional = get_method("conventional")
        t0 = time.time()
        conventional_masks = [conventional(folder.read_image(p)) for p in paths]
        conventional_seconds = time.time() - t0
        conventional_report = quality.evaluate_arrays(conventional_masks, truth, classes)

    final = rounds[-1]
    result = {
        "benchmark": "bench_masks_deep",
        "command": common.command_line(),
        "encoder": encoder_label,
        "encoder_random_init": not FLAGS.encoder,
        "args": {name: FLAGS[name].value for name in (
            "data", "encoder", "encoder_config", "train_limit", "test_limit", "image_size",
            "epochs", "self_training_rounds", "balance_classes", "batch_size", "seed",
            "output")},
        "train": {"images": len(train_images), "pseudo_masks": "conventional",
                  "pseudo_mask_seconds": pseudo_seconds, "train_seconds": train_seconds,
                  "feature_grid": model.training["feature_grid"],
                  "history": model.training["history"]},
        "test": {"images": len(paths), "rounds": rounds,
                 "deep_mean_iou": final["test_mean_iou"],
                 "conventional_mean_iou": conventional_report.mean_iou,
                 "conventional_class_mean_iou": conventional_report.class_mean_iou,
                 "conventional_mean_foreground": float(np.mean([m.mean()
                                                                for m in conventional_masks])),
                 "deep_images_per_second": final["inference_images_per_second"],
                 "conventional_images_per_second": len(paths) / conventional_seconds,
                 "deep_per_class_iou": {c: v["iou"] for c, v in quality.evaluate_arrays(
                     predicted, truth, classes).per_class().items()},
                 "conventional_per_class_iou": {c: v["iou"] for c, v in
                                                conventional_report.per_class().items()}},
        "paper_reference": {"deep": 0.485, "conventional": 0.398,
                            "note": "Pixel-ImageNet subset, pretrained ResNet-50"},
        "machine": common.machine_info(),
        "seconds": time.time() - started,
    }
    print(json.dumps({k: result[k] for k in ("encoder", "test", "machine")}, indent=2))
    common.write_json_atomic(FLAGS.output, result)


if __name__ == "__main__":
    app.run(main)
