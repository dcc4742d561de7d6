r"""fmnist-scenes' test items on photographs that no training image shows: a second test split.

    apt-get install lomiri-wallpapers-16.04 lomiri-wallpapers-20.04   # the photographs, once
    python -m bench.make_unseen_backgrounds --output_dir=/work/runs/fmnist_scenes_unseen
    python -m tools.build_tfrecords --source=folder \
        --images_dir=/work/runs/fmnist_scenes_unseen --splits=test \
        --output_dir=/work/runs/records/fmnist_scenes_unseen_gt --mask_method_name=ground_truth

Every fmnist-scenes image (``../shared/data/fmnist-scenes``) has its background cut from
one of 11 wallpaper photographs (Debian packages mate-backgrounds and
plasma-workspace-wallpapers), shared by the train and test splits, so an encoder can key on
them; mixed_rand (``harl_tf.data.background_shift``) moves objects onto other images'
backgrounds but still those photographs. Here each test image's object, cut out with its
exact mask, is pasted onto a random crop of one of 14 other photographs, from the Debian
packages lomiri-wallpapers-16.04 and lomiri-wallpapers-20.04 (CC-BY-4.0, CC-BY-SA-3.0/4.0,
CC0-1.0; ``bench.common.data.PHOTOS``), which neither pretraining nor a probe's training ever sees.

For test image i (the builder's order, sorted by path), with a generator seeded by
``(--seed, i)``, so an image does not depend on the others:

1. a photograph, uniformly among the 14 (each first resized, area interpolation, so that
   its short side is 512 px, as the cutouts generator's backgrounds);
2. a random square crop whose side is 0.3-1 times the photograph's short side, at a
   uniform position (fmnist-scenes' background rule);
3. ``background_shift.composite``: the crop resized to 64 x 64 (area interpolation), the
   test image's pixels where its mask is set, the crop elsewhere; stored as JPEG quality
   90 (the object's pixels are thus JPEG-compressed twice). The mask file is copied
   unchanged, so ids, labels and masks equal the test split's.

Output (written under a temporary name and renamed when complete; never into
``../shared`` or the repository)::

    test/images/<class>/<id>.jpg   test/masks/<class>/<id>.png   classes.txt
    backgrounds.json               photograph and crop box of every image
    README.md                      how it was made: packages, versions, licences, photos

The photographs are checked before any work: a missing one stops the run with the
``apt-get install`` line that provides it.
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import time
from typing import Dict, List, Sequence

import cv2
import numpy as np
from absl import flags

from bench import common
from bench.common.data import (CROP_SIDE, PHOTO_SHORT_SIDE, PHOTOS, TRAINING_PACKAGES,
                               check_output_dir, check_photos, load_photos, random_crop)
from harl_tf import atomic, errors
from harl_tf.data import background_shift
from harl_tf.progress import progress

FLAGS = flags.FLAGS

SPLIT = "test"
SIZE = 64                 # fmnist-scenes' image side
JPEG_QUALITY = 90


def unseen_background_images(images: Sequence[np.ndarray], masks: Sequence[np.ndarray],
                             photos: Sequence[np.ndarray], seed: int, *,
                             show_progress: bool = False):
    """Each object (``images[i]`` where ``masks[i]`` is set) on a crop of a photograph.

    Args:
      images: N ``uint8 [H, W, 3]`` RGB; masks: N ``[H, W]``, {0, 1} or {0, 255}.
      photos: the held-out photographs, ``uint8 [h, w, 3]`` RGB.
      seed: with the index i, seeds image i's draws (independent of the other images).
    Returns:
      ``(composited, draws)``: N ``uint8 [H, W, 3]``, and per image ``(photo index,
      (x, y, side))`` of the crop in the resized photograph.
    """
    background_shift.check_masks(masks)
    out, draws = [], []
    for i in progress(range(len(images)), desc="unseen backgrounds", unit=" images",
                      disable=not show_progress):
        rng = np.random.default_rng([seed, i])
        k = int(rng.integers(len(photos)))
        crop, box = random_crop(photos[k], rng)
        out.append(background_shift.composite(images[i], masks[i], crop))
        draws.append((k, box))
    return out, draws


def _package_versions(packages: Sequence[str]) -> Dict[str, str]:
    versions = {}
    for package in packages:
        try:
            versions[package] = subprocess.run(
                ["dpkg-query", "-W", "-f=${Version}", package], capture_output=True,
                text=True, check=True).stdout.strip() or "unknown"
        except (OSError, subprocess.CalledProcessError):
            versions[package] = "unknown (dpkg-query failed)"
    return versions


def readme(*, src: str, seed: int, counts: Dict[str, int], photo_counts: List[int],
           versions: Dict[str, str], command: str) -> str:
    """The output folder's README.md."""
    rows = "\n".join(f"| {p.name} | {p.package} | {p.author} | {p.licence} | {n} |"
                     for p, n in zip(PHOTOS, photo_counts))
    classes = ", ".join(f"{name} {n}" for name, n in counts.items())
    packages = ", ".join(f"{k} {v}" for k, v in versions.items())
    return f"""# fmnist-scenes, test split on unseen backgrounds

The {sum(counts.values())} test images of fmnist-scenes ({src}), each object pasted onto
a photograph that no fmnist-scenes image shows (neither train nor test): a second test
split for whether an encoder's accuracy depends on the training photographs. Ids,
labels and masks are those of the fmnist-scenes test split; only the background differs.
fmnist-scenes' own backgrounds come from 11 photographs of the Debian packages
{' and '.join(TRAINING_PACKAGES)}; none is used here.

## Layout

```
test/images/<class>/<id>.jpg   64x64 RGB, JPEG quality 90
test/masks/<class>/<id>.png    the fmnist-scenes test mask, copied unchanged
classes.txt                    the fmnist-scenes classes (label = 0-based line number)
backgrounds.json               per image id: photograph and crop box (x, y, side) in it
```

Per class: {classes}.

## How each image was made

`python -m bench.make_unseen_backgrounds` (seed {seed}); for test image i, in path order,
a generator seeded with (seed, i):

1. a photograph, uniformly among the {len(PHOTOS)} below, resized (area) to a short side of
   {PHOTO_SHORT_SIDE} px;
2. a random square crop, side {CROP_SIDE[0]}-{CROP_SIDE[1]} x the short side, uniform
   position (fmnist-scenes' background rule);
3. the crop resized to 64 x 64 (area); the test image's pixels where its mask is 255, the
   crop elsewhere (`harl_tf.data.background_shift.composite`: a hard paste, so the
   item's anti-aliased fringe outside the mask is replaced by the new background);
   written as JPEG quality 90 (the object's pixels are compressed a second time).

Command: `{command}`

## Photographs

Debian packages: {packages}. Licences as in each package's `debian/copyright`.

| photograph (file in /usr/share/backgrounds) | package | author | licence | images |
|---|---|---|---|---|
{rows}

Left out of those packages: umang (abstract gradient), Fossa, Infinite-Sea and
Painting-Colors (computer-made pictures), analogpattern (a colour-graded texture).
Sources: Fashion-MNIST items (MIT, Zalando SE) as in fmnist-scenes.
"""


def make(src: str, output_dir: str, *, photos_dir: str, seed: int, overwrite: bool = False,
         show_progress: bool = False) -> Dict[str, object]:
    """Writes the split (module docstring) to ``output_dir``; returns its summary."""
    start = time.time()
    if not os.path.isfile(os.path.join(src, "classes.txt")):
        raise errors.MissingPathError(f"--src={src} is not an fmnist-scenes folder (no "
                                      "classes.txt).")
    check_output_dir(output_dir, src)
    photos = load_photos(check_photos(photos_dir))
    if os.path.exists(output_dir) and not overwrite:
        raise errors.ConfigError(f"--output_dir={output_dir} exists; pass --overwrite to "
                                 "replace it.")
    images, masks, labels, paths = common.read_labelled_split(src, SPLIT)
    composited, draws = unseen_background_images(images, masks, photos, seed,
                                                  show_progress=show_progress)
    with open(os.path.join(src, "classes.txt")) as f:
        classes = [line.strip() for line in f if line.strip()]
    images_root = os.path.join(os.path.abspath(src), SPLIT, "images")
    backgrounds = {}
    with atomic.atomic_directory(output_dir, overwrite=overwrite) as tmp:
        for (image_path, mask_path), image, (k, box) in zip(paths, composited, draws):
            rel = os.path.relpath(image_path, images_root)
            target = os.path.join(tmp, SPLIT, "images", os.path.splitext(rel)[0] + ".jpg")
            os.makedirs(os.path.dirname(target), exist_ok=True)
            if not cv2.imwrite(target, cv2.cvtColor(image, cv2.COLOR_RGB2BGR),
                               [cv2.IMWRITE_JPEG_QUALITY, JPEG_QUALITY]):
                raise OSError(f"cannot write {target}")
            mask_target = os.path.join(tmp, SPLIT, "masks", os.path.splitext(rel)[0] + ".png")
            os.makedirs(os.path.dirname(mask_target), exist_ok=True)
            shutil.copyfile(mask_path, mask_target)
            backgrounds[rel] = {"photo": PHOTOS[k].name, "crop_xys": list(box)}
        shutil.copyfile(os.path.join(src, "classes.txt"), os.path.join(tmp, "classes.txt"))
        counts = {name: int((labels == i).sum()) for i, name in enumerate(classes)}
        photo_counts = [sum(k == j for k, _ in draws) for j in range(len(PHOTOS))]
        versions = _package_versions(sorted({p.package for p in PHOTOS}))
        with open(os.path.join(tmp, "backgrounds.json"), "w") as f:
            json.dump({"seed": seed, "photo_short_side": PHOTO_SHORT_SIDE,
                       "crop_side": list(CROP_SIDE), "images": backgrounds}, f, indent=1)
        with open(os.path.join(tmp, "README.md"), "w") as f:
            f.write(readme(src=src, seed=seed, counts=counts, photo_counts=photo_counts,
                           versions=versions, command=common.command_line()))
    return {"output_dir": os.path.abspath(output_dir), "images": len(composited),
            "per_class": counts, "per_photo": dict(zip((p.name for p in PHOTOS),
                                                       photo_counts)),
            "packages": versions, "seconds": round(time.time() - start, 1)}


def define_flags() -> None:
    """The binary's flags, defined when it runs (not on import: the tests import its
    functions next to other binaries' flags of the same names)."""
    flags.DEFINE_string("src", "../shared/data/fmnist-scenes", "The fmnist-scenes folder.")
    flags.DEFINE_string("output_dir", "/work/runs/fmnist_scenes_unseen",
                        "Output folder (outside ../shared and the repository; replaced only "
                        "when complete, and only with --overwrite).")
    flags.DEFINE_string("photos_dir", "/usr/share/backgrounds",
                        "Where the lomiri-wallpapers packages install their photographs.")
    flags.DEFINE_integer("seed", 0, "Seed of the photograph and crop draws.")
    flags.DEFINE_bool("overwrite", False, "Replace an existing --output_dir.")
    flags.DEFINE_bool("show_progress", True, "Progress bar on stderr.")


def main(argv) -> None:
    del argv
    summary = make(FLAGS.src, FLAGS.output_dir, photos_dir=FLAGS.photos_dir, seed=FLAGS.seed,
                   overwrite=FLAGS.overwrite, show_progress=FLAGS.show_progress)
    print(json.dumps(summary, indent=1))


if __name__ == "__main__":
    define_flags()
    errors.run_binary("make_unseen_backgrounds", main)
