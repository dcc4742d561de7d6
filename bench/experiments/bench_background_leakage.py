r"""How much of the background reaches HARL's foreground-pooled features (issue #15, point 4).

HARL pools the encoder's feature map over the foreground mask, expecting a foreground
embedding that describes the object. That only holds when each feature cell describes
mostly its own pixels. This script measures it on fmnist-scenes, whose masks are exact:
each test object is pasted onto the background of a test image of another class (the
``mixed_rand`` images of :mod:`harl_tf.data.background_shift`, so only the background
changes), and for every encoder it reports, over the test images:

- **cell purity**: the mean, over foreground weight, of the soft mask on the feature grid,
  Σ m² / Σ m (1 when every foreground cell is wholly object; the object's area share when
  the grid is a single cell). A property of the grid, not of the weights;
- **centred cosine** between the embedding of the original image and of its
  background-swapped twin, for the global, foreground and background poolings (features
  centred on their mean over the original images): 1 = the background change did not
  reach the embedding, 0 = as different as two unrelated images;
- the same for the **foreground pooling of unrelated pairs** (image i against image i+1:
  different objects, different backgrounds) as the floor.

A foreground embedding that isolates the object keeps a cosine near 1 under the swap
while the global one drops; equal cosines mean the foreground pooling sees the
background as much as global pooling does, and HARL's foreground term then asks little
that BYOL's global term does not.

Encoders: ``--encoder=NAME,SOURCE,SIZE`` (repeatable): SOURCE a pretraining model_dir
(its online encoder at its pretraining output stride), an export directory, or
``random:MODEL_DIR`` (a random init with that model_dir's encoder config, seed 0); SIZE the
side the 64 px images are resized to (bicubic; the view size the encoder was trained at).

    python -m bench.experiments.bench_background_leakage \
        --data_dir=../shared/data/fmnist-scenes \
        --encoder=byol_32px,/tmp/hb/nb1000_s0/runs/byol,32 ...

Writes ``bench/results/bench_background_leakage.json`` (or ``--results_name``).
"""
from __future__ import annotations

import json
import os
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402
from absl import app, flags  # noqa: E402

from bench import common  # noqa: E402
from harl_tf import checkpoints  # noqa: E402
from harl_tf.data import background_shift, geometry  # noqa: E402
from harl_tf.downstream import encoder_source  # noqa: E402
from harl_tf.models import pooling  # noqa: E402

FLAGS = flags.FLAGS
flags.DEFINE_string("data_dir", os.path.join(common.ROOT, "..", "shared", "data",
                                             "fmnist-scenes"), "The fmnist-scenes folder.")
flags.DEFINE_string("split", "test", "Split scored.")
flags.DEFINE_integer("examples", 0, "Images scored (0: the whole split).")
flags.DEFINE_integer("seed", 0, "Seed of the mixed_rand donor choice.")
flags.DEFINE_multi_string("encoder", [], "NAME,SOURCE,SIZE of an encoder (repeatable; see "
                          "the module docstring).")
flags.DEFINE_string("results_name", "bench_background_leakage", "Results file stem.")


def read_split(data_dir: str, split: str, limit: int):
    """(images uint8 [N, H, W, 3] RGB, masks uint8 [N, H, W] in {0, 1}, labels int64 [N])
    of ``split`` (``common.read_labelled_split``: the builder's folder source); with
    ``limit``, that many images in a fixed random order (seed 0), so every class is there."""
    images, masks, labels, _ = common.read_labelled_split(data_dir, split, limit=limit)
    return (np.stack(images), np.stack([(m > 127).astype(np.uint8) for m in masks]),
            labels)


def load(source: str):
    if source.startswith("random:"):
        config = checkpoints.read_model_config(source[len("random:"):])["encoder"]
        return encoder_source.random_encoder(config, seed=0)
    return encoder_source.load_encoder(source)


def pooled_embeddings(encoder, images: np.ndarray, masks: np.ndarray, size: int,
                      batch: int = 100):
    """{"global", "foreground", "background": float32 [N, C]} and the cell purity [N]."""
    out = {"global": [], "foreground": [], "background": []}
    purity = []
    for start in range(0, len(images), batch):
        x = geometry.resize_image(tf.constant(images[start:start + batch]), size, "bicubic")
        features = encoder(x, training=False)
        soft = pooling.downsample_mask(masks[start:start + batch, :, :, None],
                                       features.shape[1:3])
        out["global"].append(pooling.global_pool(features).numpy())
        out["foreground"].append(pooling.foreground_pool(features, soft).numpy())
        out["background"].append(pooling.background_pool(features, soft).numpy())
        # Σ m² / Σ m: the soft mask pooled with itself as the weights.
        purity.append(pooling.region_pool(soft, soft).numpy()[:, 0])
    grid = tuple(int(d) for d in features.shape[1:3])
    return {k: np.concatenate(v) for k, v in out.items()}, np.concatenate(purity), grid


def centred_cosines(a: np.ndarray, b: np.ndarray, centre: np.ndarray) -> np.ndarray:
    a, b = a - centre, b - centre
    return np.sum(a * b, 1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1) + 1e-12)


def encoder_spec(spec: str):
    """``NAME,SOURCE,SIZE`` → (name, source, size); SOURCE may hold commas."""
    head, _, size = spec.rpartition(",")
    name, _, source = head.partition(",")
    if not (name and source and size.isdigit()):
        raise app.UsageError(f"--encoder={spec}: expected NAME,SOURCE,SIZE (SIZE in px)")
    return name, source, int(size)


def main(argv) -> None:
    del argv
    if not FLAGS.encoder:
        raise app.UsageError("--encoder=NAME,SOURCE,SIZE is required (repeatable)")
    encoders = [encoder_spec(spec) for spec in FLAGS.encoder]
    start = time.time()
    images, masks, labels = read_split(FLAGS.data_dir, FLAGS.split, FLAGS.examples)
    shifted, _ = background_shift.mixed_rand(images, masks, labels, FLAGS.seed)
    shifted = np.stack(shifted)
    print(f"{len(images)} {FLAGS.split} images and their mixed_rand twins "
          f"({time.time() - start:.0f} s)", flush=True)

    rows = []
    for name, source, size in encoders:
        loaded = load(source)
        original, purity, grid = pooled_embeddings(loaded.encoder, images, masks, int(size))
        swapped, _, _ = pooled_embeddings(loaded.encoder, shifted, masks, int(size))
        row = {"encoder": name, "source": source, "view_size": int(size),
               "feature_grid": list(grid), "cell_purity": round(float(purity.mean()), 3),
               "object_area": round(float(masks.mean()), 3)}
        for pool in ("global", "foreground", "background"):
            centre = original[pool].mean(0)
            row[f"{pool}_swap_cosine"] = round(float(
                centred_cosines(original[pool], swapped[pool], centre).mean()), 3)
        centre = original["foreground"].mean(0)
        row["foreground_unrelated_cosine"] = round(float(centred_cosines(
            original["foreground"], np.roll(original["foreground"], 1, 0), centre).mean()), 3)
        rows.append(row)
        print(json.dumps(row), flush=True)

    table = common.table(
        [[r["encoder"], "×".join(map(str, r["feature_grid"])), r["cell_purity"],
          r["global_swap_cosine"], r["foreground_swap_cosine"], r["background_swap_cosine"],
          r["foreground_unrelated_cosine"]] for r in rows],
        ["encoder", "grid", "cell purity", "global: swap cos", "foreground: swap cos",
         "background: swap cos", "foreground: unrelated cos"])
    print(table)
    result = {"benchmark": "background leakage into foreground-pooled features "
                           "(mixed_rand background swap, exact masks)",
              "split": FLAGS.split, "examples": int(len(images)), "seed": FLAGS.seed,
              "rows": rows, "table_markdown": table, "machine": common.machine_info(),
              "seconds": round(time.time() - start, 1)}
    common.write_result(FLAGS.results_name, result)


if __name__ == "__main__":
    app.run(main)
