r"""fmnist-scenes with class-correlated training backgrounds (a benchmark variant).

    python -m bench.experiments.make_correlated_scenes --out=/tmp/hb/fmnist-scenes-correlated
    python -m bench.bench_learning --dataset=fmnist_scenes \
        --data_dir=/tmp/hb/fmnist-scenes-correlated --records_dir=/tmp/hb/records_corr ...

The train split of ``../shared/data/fmnist-scenes`` with each object re-pasted, with
probability ``--correlation``, onto a background whose appearance group is assigned to its
class (:mod:`harl_tf.data.correlated_backgrounds`); the test split is the original one,
linked, whose backgrounds say nothing about the class. Pretraining and probe fitting see
the shortcut, scoring does not: the gap to the same method trained on the original train
split is how much the encoder leaned on backgrounds. Same folder layout as fmnist-scenes
(exact masks, classes.txt), plus ``manifest.json``: parameters, group sizes, and how well
the background group alone predicts the class on each split (the shortcut's strength).
"""
import json
import os
import shutil
import time

import cv2
import numpy as np
from absl import app, flags

from bench import common
from harl_tf import atomic
from harl_tf.data import background_shift, correlated_backgrounds, sources

FLAGS = flags.FLAGS
flags.DEFINE_string("src", "../shared/data/fmnist-scenes", "The fmnist-scenes folder.")
flags.DEFINE_string("out", "/tmp/fmnist-scenes-correlated", "Output folder (replaced only "
                    "when complete).")
flags.DEFINE_float("correlation", 0.8, "Probability that a train object is moved onto a "
                   "background of its class's group.")
flags.DEFINE_integer("seed", 0, "Seed of the grouping and the draws.")


def _read(split):
    """The split's images, masks (0/255), labels and (image, mask) paths, by class in
    classes.txt order, then path (``common.read_labelled_split``)."""
    source = sources.FolderSource(FLAGS.src)
    images, masks, labels, paths = common.read_labelled_split(FLAGS.src, split,
                                                              by_class=True)
    return source.class_names(), paths, images, masks, labels


def _group_accuracy(descriptors, labels, mean, std, centres, class_of_group):
    """Top-1 of predicting the class from the nearest background group alone."""
    z = (descriptors - mean) / std
    nearest = np.argmin(((z[:, None] - centres[None]) ** 2).sum(-1), axis=1)
    return float(np.mean([class_of_group[int(g)] for g in nearest] == labels))


def main(argv):
    del argv
    if not os.path.isfile(os.path.join(FLAGS.src, "classes.txt")):
        raise SystemExit(f"make_correlated_scenes: --src={FLAGS.src} is not an fmnist-scenes "
                         "folder (no classes.txt).")
    start = time.time()
    classes, paths, images, masks, labels = _read("train")
    print(f"train: {len(images)} images, {len(classes)} classes; grouping backgrounds...",
          flush=True)
    new, donors, info = correlated_backgrounds.class_correlated(
        images, masks, labels, FLAGS.correlation, FLAGS.seed)

    # The shortcut's strength: the class predicted from the background group alone.
    def descriptors_of(imgs, msks):
        return correlated_backgrounds.background_descriptors(
            [background_shift.fill_background(i, m) for i, m in zip(imgs, msks)])
    original = info["descriptors"]
    mean, std = original.mean(0), np.where(original.std(0) > 0, original.std(0), 1.0)
    z = (original - mean) / std
    centres = np.array([z[info["groups"] == g].mean(0) for g in range(len(classes))])
    _, _, test_images, test_masks, test_labels = _read("test")
    shortcut = {
        "train_original": _group_accuracy(original, labels, mean, std, centres,
                                          info["class_of_group"]),
        "train_correlated": _group_accuracy(descriptors_of(new, masks), labels, mean, std,
                                            centres, info["class_of_group"]),
        "test": _group_accuracy(descriptors_of(test_images, test_masks), test_labels, mean,
                                std, centres, info["class_of_group"]),
    }

    manifest = {
        "source": os.path.abspath(FLAGS.src), "correlation": FLAGS.correlation,
        "seed": FLAGS.seed, "num_train": len(new),
        "moved": int((donors >= 0).sum()),
        "group_sizes": info["group_sizes"],
        "class_of_group": {classes[c]: g for g, c in info["class_of_group"].items()},
        "class_from_background_group_top1": {k: round(v, 3) for k, v in shortcut.items()},
        "test": "the source's test split, linked (backgrounds independent of the class)",
    }
    with atomic.atomic_directory(FLAGS.out, overwrite=True) as tmp:
        for (path, mask_path), image in zip(paths, new):
            rel = os.path.relpath(path, os.path.join(FLAGS.src, "train", "images"))
            target = os.path.join(tmp, "train", "images", rel)
            os.makedirs(os.path.dirname(target), exist_ok=True)
            cv2.imwrite(target, cv2.cvtColor(image, cv2.COLOR_RGB2BGR),
                        [cv2.IMWRITE_JPEG_QUALITY, 90])
            mask_target = os.path.join(tmp, "train", "masks",
                                       os.path.splitext(rel)[0] + ".png")
            os.makedirs(os.path.dirname(mask_target), exist_ok=True)
            shutil.copyfile(mask_path, mask_target)
        os.symlink(os.path.abspath(os.path.join(FLAGS.src, "test")), os.path.join(tmp, "test"))
        shutil.copyfile(os.path.join(FLAGS.src, "classes.txt"),
                        os.path.join(tmp, "classes.txt"))
        manifest["seconds"] = round(time.time() - start, 1)
        with open(os.path.join(tmp, "manifest.json"), "w") as f:
            json.dump(manifest, f, indent=2)
    print(json.dumps(manifest, indent=2))


if __name__ == "__main__":
    app.run(main)
