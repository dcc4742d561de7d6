"""Data the benchmarks make or read: synthetic records, JPEG bytes, SimCLR's data_util, a
labelled image folder."""
from __future__ import annotations

import importlib.util
import os
import time
from typing import Iterable


def write_example_records(path: str, examples: Iterable, *, jpeg_quality: int) -> str:
    """One TFRecord file (written atomically) of ``(example_id, image, mask, label)``
    tuples: image uint8 RGB ``[H, W, 3]`` stored as a JPEG of ``jpeg_quality``, mask
    ``[H, W]`` in {0, 1} stored as a PNG (mask method ``ground_truth``). Returns ``path``."""
    import tensorflow as tf
    from harl_tf.atomic import atomic_path
    from harl_tf.data import schema
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with atomic_path(path) as temporary, tf.io.TFRecordWriter(temporary) as writer:
        for example_id, image, mask, label in examples:
            height, width = image.shape[:2]
            writer.write(schema.serialize_example(
                image_bytes=tf.io.encode_jpeg(image, quality=jpeg_quality).numpy(),
                image_format="jpeg", height=height, width=width,
                mask_png=schema.encode_mask_png(mask), label=label, example_id=example_id,
                mask_method="ground_truth"))
    return path


def ensure_synthetic_records(directory: str, examples: int, shards: int,
                             height: int = 375, width: int = 500) -> str:
    """The input-pipeline benchmarks' records: ``examples`` synthetic ``height`` x
    ``width`` images (JPEG quality 90, PNG masks) in ``shards`` files
    ``bench-SSSSS-of-NNNNN.tfrecord`` of ``directory``, written unless ``shards`` such
    files are there already. Returns their glob."""
    import tensorflow as tf
    from harl_tf.data import synthetic
    pattern = os.path.join(directory, "bench-*.tfrecord")
    if len(tf.io.gfile.glob(pattern)) != shards:
        start = time.perf_counter()
        per_shard = -(-examples // shards)
        for shard in range(shards):
            indices = range(shard * per_shard, min(examples, (shard + 1) * per_shard))
            write_example_records(
                os.path.join(directory, f"bench-{shard:05d}-of-{shards:05d}.tfrecord"),
                ((f"synthetic/{i}", image, mask, label) for i, image, mask, label
                 in synthetic.iterate(indices, (height, width))), jpeg_quality=90)
        print(f"wrote {examples} examples in {shards} shards "
              f"({time.perf_counter() - start:.1f} s)", flush=True)
    return pattern


def jpeg_bytes(pattern: str) -> list:
    """The image bytes of every record of ``pattern``, in file order."""
    import tensorflow as tf
    from harl_tf.data import schema
    return [schema.parse_example(r)["image"].numpy() for r in
            tf.data.TFRecordDataset(sorted(tf.io.gfile.glob(pattern)))]


def load_simclr_data_util(simclr_dir: str):
    """google-research/simclr ``tf2/data_util.py`` from the checkout ``simclr_dir``,
    imported as a module of its own. It reads no absl flag (``data.py`` does; it is not
    needed here), so none is set."""
    path = os.path.join(simclr_dir, "tf2", "data_util.py")
    if not os.path.isfile(path):
        raise FileNotFoundError(
            f"--simclr_dir {simclr_dir!r}: no tf2/data_util.py there; pass the root of a "
            f"google-research/simclr checkout")
    spec = importlib.util.spec_from_file_location("simclr_tf2_data_util", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def read_labelled_split(data_dir: str, split: str, *, limit: int = 0,
                        by_class: bool = False):
    """One split of an image folder with mirrored masks and class sub-folders (the layout
    of ../shared/data/fmnist-scenes), read through the TFRecord builder's folder source, so
    file order, mask paths and classes.txt labels are the builder's.

    Returns ``(images, masks, labels, paths)``: uint8 RGB ``[H, W, 3]`` arrays, the mask
    files as decoded (uint8 ``[H, W]``, 0/255), int64 ``[N]`` class indices and
    ``(image_path, mask_path)`` pairs. Order: the builder's (sorted by path), or with
    ``by_class`` by class in classes.txt order, then path; ``limit`` keeps that many
    examples, drawn in a fixed random order (seed 0) from that order.
    Raises ValueError naming the file that cannot be decoded.
    """
    import cv2
    import numpy as np
    from harl_tf.data import sources

    source = sources.FolderSource(data_dir)
    refs = source.list_refs(split)
    if by_class:
        refs = sorted(refs, key=lambda r: (r.label, r.id))
    if limit:
        refs = [refs[i] for i in np.random.default_rng(0).permutation(len(refs))[:limit]]
    images, masks, labels, paths = [], [], [], []
    for ref in refs:
        raw = source.load(ref)
        image = cv2.imdecode(np.frombuffer(raw.image_bytes, np.uint8), cv2.IMREAD_COLOR)
        mask = cv2.imdecode(np.frombuffer(raw.mask_bytes, np.uint8), cv2.IMREAD_GRAYSCALE)
        if image is None or mask is None:
            raise ValueError(f"cannot decode {raw.image_name} or its mask {raw.mask_name}")
        images.append(cv2.cvtColor(image, cv2.COLOR_BGR2RGB))
        masks.append(mask)
        labels.append(ref.label)
        paths.append((raw.image_name, raw.mask_name))
    return images, masks, np.asarray(labels, np.int64), paths
