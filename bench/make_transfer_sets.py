r"""Two labelled image folders to transfer fmnist-scenes encoders to (issue 30, item 3).

    apt-get install lomiri-wallpapers-16.04 lomiri-wallpapers-20.04   # digits_scenes' photos
    python -m bench.make_transfer_sets --output_dir=/work/runs/transfer_sets
    python -m tools.build_tfrecords --source=folder \
        --images_dir=/work/runs/transfer_sets/digits_scenes --splits=train,test \
        --output_dir=/work/runs/records/digits_scenes_gt --mask_method_name=ground_truth
    # heuristic masks instead of the exact ones: --mask_method=conventional

Each dataset is a folder ``<output_dir>/<name>/`` that ``tools.build_tfrecords
--source=folder`` reads: ``{train,test}/images/<class>/<id>.<ext>``, the exact binary
masks in the mirrored ``masks/`` tree (0 = background, 255 = object), ``classes.txt`` and a
``README.md`` saying how it was made. Nothing is downloaded:

- ``fashion_mnist``: plain Fashion-MNIST (``../shared/data/fashion-mnist``, the idx files)
  as ``bench.bench_learning`` writes it (``common.data.write_fashion_mnist_folder``): the
  first ``--fashion_mnist_train`` train and ``--fashion_mnist_test`` t10k images, 28 -> 64
  px bicubic, grey as RGB, mask = pixel > 0. The same items as fmnist-scenes' objects
  (its train images use Fashion-MNIST train items, its test images t10k items) without
  colour and without a photograph: a change of style, not of objects.
- ``digits_scenes``: scikit-learn's bundled handwritten digits (``load_digits``: 1,797
  8x8 images, 10 classes, 0-16 grey levels, read from the installed package's
  ``datasets/data/digits.csv.gz``), rendered like fmnist-scenes' objects (a random tint,
  soft alpha, random size and position) onto crops of the held-out photographs of
  ``bench.make_unseen_backgrounds`` (which no fmnist-scenes image shows). Each class's
  digits are split once, ``--digits_test_fraction`` to test (seed 0), so test digits are
  never seen in training; every train digit is rendered ``--digits_train_copies`` times
  and every test digit ``--digits_test_copies`` times, each time on a new crop.

A digit (:func:`render_digit`): grey ``g = v / 16`` resized bicubically so its box's side
is U(0.5, 0.9) x 64 px; colour ``hsv(U(0, 1), U(0.45, 1), U(0.65, 1)) x (0.35 + 0.65 g)``;
alpha ``a = clip((g - 0.1) / 0.3, 0, 1)`` (no halo from the faint grey levels around a
stroke); placed at a uniform position with at most 5 % of the box
beyond an edge; composite ``background x (1 - a) + digit x a``; mask = ``a > 0.5``
(``g > 0.25``). No flip: a mirrored digit is another
shape. Each image's draws come from a generator seeded by ``(--seed, split, i)``.

Written under temporary names and renamed when complete; an existing dataset folder is
kept unless ``--overwrite``.
"""
from __future__ import annotations

import colorsys
import json
import os
import shutil
import time
from typing import Dict

import cv2
import numpy as np
from absl import flags

from bench.common.data import (FASHION_MNIST_CLASSES, PHOTO_SHORT_SIDE, PHOTOS,
                               check_output_dir, check_photos, load_photos, random_crop,
                               write_fashion_mnist_folder)
from harl_tf import atomic, errors
from harl_tf.progress import progress

FLAGS = flags.FLAGS
DATASETS = ("fashion_mnist", "digits_scenes")

SIZE = 64
DIGIT_SIDE = (0.5, 0.9)      # box side / image side
MAX_OUTSIDE = 0.05           # share of the box allowed beyond an edge
ALPHA_RAMP = (0.1, 0.4)      # a = 0 below g = 0.1 (faint strokes, bicubic halo), 1 above 0.4
DIGIT_CLASSES = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight",
                 "nine")


def render_digit(digit: np.ndarray, background: np.ndarray, rng: np.random.Generator):
    """One digit on a background (module docstring).

    Args:
      digit: ``[8, 8]`` grey levels 0-16 (sklearn's digits).
      background: ``uint8 [SIZE, SIZE, 3]`` RGB.
      rng: the image's generator.
    Returns:
      ``(image uint8 [SIZE, SIZE, 3], mask uint8 [SIZE, SIZE] 0/255)``.
    """
    side = int(round(rng.uniform(*DIGIT_SIDE) * SIZE))
    grey = np.clip(cv2.resize(np.asarray(digit, np.float32) / 16.0, (side, side),
                              interpolation=cv2.INTER_CUBIC), 0.0, 1.0)
    hue, saturation, value = rng.uniform(0, 1), rng.uniform(0.45, 1), rng.uniform(0.65, 1)
    colour = np.array(colorsys.hsv_to_rgb(hue, saturation, value), np.float32) * 255.0
    item = colour[None, None, :] * (0.35 + 0.65 * grey)[..., None]
    low, high = ALPHA_RAMP
    alpha = np.clip((grey - low) / (high - low), 0.0, 1.0)
    margin = int(MAX_OUTSIDE * side)
    y = int(rng.integers(-margin, SIZE - side + margin + 1))
    x = int(rng.integers(-margin, SIZE - side + margin + 1))
    # The part of the box inside the image.
    y0, x0, y1, x1 = max(y, 0), max(x, 0), min(y + side, SIZE), min(x + side, SIZE)
    a = np.zeros((SIZE, SIZE), np.float32)
    a[y0:y1, x0:x1] = alpha[y0 - y:y1 - y, x0 - x:x1 - x]
    layer = np.zeros((SIZE, SIZE, 3), np.float32)
    layer[y0:y1, x0:x1] = item[y0 - y:y1 - y, x0 - x:x1 - x]
    image = background.astype(np.float32) * (1.0 - a[..., None]) + layer * a[..., None]
    return (np.clip(np.round(image), 0, 255).astype(np.uint8),
            (a > 0.5).astype(np.uint8) * 255)


def split_digits(labels: np.ndarray, test_fraction: float, seed: int = 0):
    """``(train indices, test indices)``: per class, ``round(test_fraction x n)`` digits
    (at least 1) to test, drawn by a fixed permutation; both sorted."""
    rng = np.random.default_rng(seed)
    train, test = [], []
    for label in np.unique(labels):
        members = np.flatnonzero(labels == label)
        members = members[rng.permutation(len(members))]
        cut = max(1, int(round(test_fraction * len(members))))
        test += members[:cut].tolist()
        train += members[cut:].tolist()
    return np.sort(train), np.sort(test)


def write_digits_scenes(out: str, *, photos_dir: str, seed: int, test_fraction: float,
                        copies: Dict[str, int], limit: int = 0, overwrite: bool = False,
                        show_progress: bool = False) -> Dict[str, object]:
    """The digits_scenes folder (module docstring); returns its summary."""
    photos = load_photos(check_photos(photos_dir))
    from sklearn.datasets import load_digits  # the bench extra: pip install -e ".[bench]"
    digits = load_digits()
    images, labels = digits.images, digits.target.astype(np.int64)
    if limit:
        images, labels = images[:limit], labels[:limit]
    train, test = split_digits(labels, test_fraction)
    counts: Dict[str, Dict[str, int]] = {}
    photo_counts = np.zeros(len(photos), np.int64)
    with atomic.atomic_directory(out, overwrite=overwrite) as tmp:
        for split, indices in (("train", train), ("test", test)):
            counts[split] = {name: 0 for name in DIGIT_CLASSES}
            jobs = [(int(d), c) for d in indices for c in range(copies[split])]
            for i, (d, copy) in enumerate(progress(jobs, desc=f"digits_scenes {split}",
                                                   unit=" images",
                                                   disable=not show_progress)):
                rng = np.random.default_rng([seed, 0 if split == "train" else 1, i])
                k = int(rng.integers(len(photos)))
                photo_counts[k] += 1
                crop, _ = random_crop(photos[k], rng)
                background = cv2.resize(crop, (SIZE, SIZE), interpolation=cv2.INTER_AREA)
                image, mask = render_digit(images[d], background, rng)
                name = DIGIT_CLASSES[labels[d]]
                counts[split][name] += 1
                stem = f"d{d:04d}_{copy}"
                for kind, array, ext in (("images", cv2.cvtColor(image, cv2.COLOR_RGB2BGR),
                                          ".png"), ("masks", mask, ".png")):
                    path = os.path.join(tmp, split, kind, name, stem + ext)
                    os.makedirs(os.path.dirname(path), exist_ok=True)
                    if not cv2.imwrite(path, array):
                        raise OSError(f"cannot write {path}")
        with open(os.path.join(tmp, "classes.txt"), "w") as f:
            f.write("\n".join(DIGIT_CLASSES) + "\n")
        summary = {"digits": {"train": len(train), "test": len(test)},
                   "images": {s: sum(c.values()) for s, c in counts.items()},
                   "per_class": counts, "copies": copies, "seed": seed,
                   "per_photo": {p.name: int(n) for p, n in zip(PHOTOS, photo_counts)}}
        with open(os.path.join(tmp, "README.md"), "w") as f:
            f.write(_digits_readme(summary, test_fraction))
    return summary


def _digits_readme(summary: dict, test_fraction: float) -> str:
    import sklearn
    photos = "\n".join(f"| {p.name} | {p.package} | {p.author} | {p.licence} | "
                       f"{summary['per_photo'][p.name]} |" for p in PHOTOS)
    per_class = "\n".join(f"| {name} | {summary['per_class']['train'][name]} | "
                          f"{summary['per_class']['test'][name]} |" for name in DIGIT_CLASSES)
    return f"""# digits_scenes: handwritten digits on photographs, with exact masks

{summary['images']['train']} train and {summary['images']['test']} test images, 64x64 RGB
PNG, of the 10 digit classes: scikit-learn's bundled digits (`sklearn.datasets.load_digits`,
scikit-learn {sklearn.__version__}, BSD-3-Clause; the UCI "Optical Recognition of
Handwritten Digits" test set, 1,797 8x8 images shipped inside the package) tinted and
pasted onto crops of photographs that no fmnist-scenes image shows. A transfer target for
fmnist-scenes encoders: other objects, other backgrounds, labels learnable from the shape.

## Layout

```
train/images/<class>/d<digit>_<copy>.png   64x64 RGB
train/masks/<class>/d<digit>_<copy>.png    0 = background, 255 = the digit
test/...                                   the same
classes.txt                                zero ... nine (label = 0-based line number)
```

## How each image was made

`python -m bench.make_transfer_sets --datasets=digits_scenes` (seed {summary['seed']}).

1. Split: per class, {test_fraction:.0%} of the digits to test by a fixed permutation
   (seed 0): {summary['digits']['train']} train and {summary['digits']['test']} test digits,
   disjoint (the set's 1,797 digits come from 43 writers, who may appear in both).
2. Each train digit rendered {summary['copies']['train']} times, each test digit
   {summary['copies']['test']} times; image i of a split draws from a generator seeded by
   (seed, split, i).
3. Background: a photograph uniformly among the {len(PHOTOS)} below (resized to a
   short side of {PHOTO_SHORT_SIDE} px), a random square crop of side 0.3-1 x the short
   side, resized to 64x64 (area).
4. Digit: grey g = v / 16 resized bicubically to a square box of side U(0.5, 0.9) x 64 px;
   colour hsv(U(0, 1), U(0.45, 1), U(0.65, 1)) x (0.35 + 0.65 g);
   alpha a = clip((g - 0.1) / 0.3, 0, 1); uniform position with at most 5 % of the box beyond an edge; no flip.
5. Composite `out = background x (1 - a) + digit x a`; mask = a > 0.5.

| class | train images | test images |
|---|---|---|
{per_class}

## Photographs

The held-out photographs of `bench.make_unseen_backgrounds` (Debian packages
lomiri-wallpapers-16.04 and lomiri-wallpapers-20.04; licences from their `debian/copyright`):

| photograph | package | author | licence | images |
|---|---|---|---|---|
{photos}
"""


def _fashion_mnist_readme(out: str, src: str, num_train: int, num_test: int) -> str:
    counts = {split: {name: len(os.listdir(os.path.join(out, split, "images", name)))
                      for name in sorted(os.listdir(os.path.join(out, split, "images")))}
              for split in ("train", "test")}
    rows = "\n".join(f"| {name} | {counts['train'].get(name, 0)} | "
                     f"{counts['test'].get(name, 0)} |" for name in FASHION_MNIST_CLASSES)
    return f"""# fashion_mnist: plain Fashion-MNIST as an image folder, with exact masks

{sum(counts['train'].values())} train and {sum(counts['test'].values())} test images of the 10
Fashion-MNIST classes (Zalando SE, MIT licence), from the idx files in {src}: the first
{num_train} train and {num_test} t10k images in file order. Written by
`common.data.write_fashion_mnist_folder` (`python -m bench.make_transfer_sets
--datasets=fashion_mnist`; `bench.bench_learning --dataset=fashion_mnist` writes the same).

- images: 28 -> 64 px bicubic, grey copied to RGB, PNG;
- masks: pixel > 0 at 28 px, nearest-neighbour to 64 px, 0/255 PNG;
- classes.txt: {', '.join(FASHION_MNIST_CLASSES)}.

The same items fmnist-scenes pastes on photographs (its train images use Fashion-MNIST
train items, its test images t10k items), here grey on black: a change of style and
background, not of objects.

| class | train | test |
|---|---|---|
{rows}
"""


def write_fashion_mnist(out: str, *, src: str, num_train: int, num_test: int,
                        overwrite: bool = False) -> Dict[str, object]:
    """The fashion_mnist folder with its README.md; returns its summary."""
    if overwrite and os.path.exists(out):
        shutil.rmtree(out)
    write_fashion_mnist_folder(src, out, num_train=num_train, num_test=num_test)
    readme = _fashion_mnist_readme(out, src, num_train, num_test)
    atomic.write_bytes_atomic(os.path.join(out, "README.md"), readme.encode())
    return {"images": {s: sum(len(files) for _, _, files in os.walk(
        os.path.join(out, s, "images"))) for s in ("train", "test")}}


def define_flags() -> None:
    """The binary's flags, defined when it runs (not on import: the tests import its
    functions next to other binaries' flags of the same names)."""
    flags.DEFINE_string("output_dir", "/work/runs/transfer_sets",
                        "Parent folder of the datasets (outside ../shared and the repository).")
    flags.DEFINE_list("datasets", list(DATASETS), "Which datasets to write.")
    flags.DEFINE_string("fashion_mnist_dir", "../shared/data/fashion-mnist",
                        "Fashion-MNIST idx files.")
    flags.DEFINE_integer("fashion_mnist_train", 10000, "Fashion-MNIST train images used.")
    flags.DEFINE_integer("fashion_mnist_test", 2000, "Fashion-MNIST test (t10k) images used.")
    flags.DEFINE_string("photos_dir", "/usr/share/backgrounds",
                        "The held-out photographs (bench.make_unseen_backgrounds).")
    flags.DEFINE_float("digits_test_fraction", 0.3, "Share of each class's digits in test.")
    flags.DEFINE_integer("digits_train_copies", 4, "Renderings of each train digit.")
    flags.DEFINE_integer("digits_test_copies", 2, "Renderings of each test digit.")
    flags.DEFINE_integer("digits_limit", 0, "Use only this many digits (0 = all; for tests).")
    flags.DEFINE_integer("seed", 0, "Seed of the renderings.")
    flags.DEFINE_bool("overwrite", False, "Replace existing dataset folders.")
    flags.DEFINE_bool("show_progress", True, "Progress bar on stderr.")


def main(argv) -> None:
    del argv
    unknown = sorted(set(FLAGS.datasets) - set(DATASETS))
    if unknown:
        raise errors.ConfigError(f"--datasets: unknown {unknown}; choose from {list(DATASETS)}")
    check_output_dir(FLAGS.output_dir, FLAGS.fashion_mnist_dir)
    summaries = {}
    for name in FLAGS.datasets:
        start = time.time()
        out = os.path.join(FLAGS.output_dir, name)
        if os.path.exists(os.path.join(out, "README.md")) and not FLAGS.overwrite:
            print(f"{out}: present, kept (--overwrite replaces it)", flush=True)
            continue
        if name == "fashion_mnist":
            summaries[name] = write_fashion_mnist(
                out, src=FLAGS.fashion_mnist_dir, num_train=FLAGS.fashion_mnist_train,
                num_test=FLAGS.fashion_mnist_test, overwrite=FLAGS.overwrite)
        else:
            summaries[name] = write_digits_scenes(
                out, photos_dir=FLAGS.photos_dir, seed=FLAGS.seed,
                test_fraction=FLAGS.digits_test_fraction,
                copies={"train": FLAGS.digits_train_copies, "test": FLAGS.digits_test_copies},
                limit=FLAGS.digits_limit, overwrite=True,  # absent, or --overwrite
                show_progress=FLAGS.show_progress)
        summaries[name]["seconds"] = round(time.time() - start, 1)
    print(json.dumps(summaries, indent=1))


if __name__ == "__main__":
    define_flags()
    errors.run_binary("make_transfer_sets", main)
