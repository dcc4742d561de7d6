r"""A folder of binary mask PNGs packed into one small file, and back.

    python -m bench.mask_archive --pack=/work/runs/deep_masks \
        --archive=bench/results/masks/fmnist_scenes_deep_round1.npz
    python -m bench.mask_archive --unpack=bench/results/masks/fmnist_scenes_deep_round1.npz \
        --masks_dir=/work/runs/deep_masks

A comparison that pretrains several seeds on the same heuristic masks needs those exact
masks on every machine that trains one of them; the deep masks cost an encoder, a saliency
head and GrabCut to remake, and a remade set is not the same set. Packed (one bit per
pixel, compressed) the 12,000 64×64 fmnist-scenes masks take about 0.6 MB, so a set the
figures depend on is kept in the repository beside those figures.

The archive holds every mask's relative path (without extension), its shape, the packed
bits and a sha256 of the unpacked content; ``--unpack`` writes each mask as the 0/255 PNG
``tools.generate_masks`` writes (``harl_tf.masks.folder.write_mask_png``, atomic), checks
the content hash first, and leaves masks already on disk with the same pixels alone.
"""
from __future__ import annotations

import hashlib
import os
from typing import Dict

import numpy as np
from absl import app, flags

from harl_tf import atomic, errors
from harl_tf.masks import quality
from harl_tf.masks.folder import write_mask_png

FLAGS = flags.FLAGS


def _digest(names, shapes, bits) -> str:
    digest = hashlib.sha256()
    for name, shape in zip(names, shapes):
        digest.update(f"{name}:{shape[0]}x{shape[1]};".encode())
    digest.update(bits.tobytes())
    return digest.hexdigest()


def pack(masks_dir: str, archive: str) -> Dict[str, object]:
    """Packs every mask under ``masks_dir`` (``quality.list_masks``: PNGs, values > 0 are
    foreground) into ``archive`` (.npz, written atomically); returns its summary."""
    names = quality.list_masks(masks_dir)
    if not names:
        raise errors.MissingPathError(f"--pack: no masks under {masks_dir}")
    masks = [quality.read_mask(os.path.join(masks_dir, name + ".png")) for name in names]
    shapes = np.array([m.shape for m in masks], np.int32)
    bits = np.packbits(np.concatenate([m.reshape(-1) for m in masks]).astype(bool))
    sha = _digest(names, shapes, bits)
    with atomic.atomic_path(archive) as temporary:
        with open(temporary, "wb") as f:
            np.savez_compressed(f, names=np.array(names), shapes=shapes, bits=bits,
                                sha256=np.array(sha))
    return {"masks": len(names), "bytes": os.path.getsize(archive), "sha256": sha}


def unpack(archive: str, masks_dir: str) -> Dict[str, int]:
    """Writes every mask of ``archive`` under ``masks_dir`` as a 0/255 PNG; a mask already
    there with the same pixels is left alone. Returns ``{"written": n, "kept": n}``."""
    if not os.path.isfile(archive):
        raise errors.MissingPathError(f"--unpack: no archive {archive}")
    with np.load(archive) as data:
        names, shapes, bits = list(data["names"]), data["shapes"], data["bits"]
        recorded = str(data["sha256"])
    if _digest(names, shapes, bits) != recorded:
        raise errors.ConfigError(f"{archive}: content does not match its sha256; the file is "
                                 "damaged")
    flat = np.unpackbits(bits)
    counts = {"written": 0, "kept": 0}
    start = 0
    for name, (height, width) in zip(names, shapes):
        mask = flat[start:start + height * width].reshape(height, width)
        start += height * width
        path = os.path.join(masks_dir, str(name) + ".png")
        if os.path.isfile(path) and np.array_equal(quality.read_mask(path), mask):
            counts["kept"] += 1
            continue
        write_mask_png(path, mask)   # atomic; makes the mask's folder
        counts["written"] += 1
    return counts


def main(argv) -> None:
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    if bool(FLAGS.pack) == bool(FLAGS.unpack):
        raise app.UsageError("give one of --pack=MASKS_DIR (with --archive) or "
                             "--unpack=ARCHIVE (with --masks_dir)")
    if FLAGS.pack:
        if not FLAGS.archive:
            raise app.UsageError("--pack needs --archive")
        print(pack(FLAGS.pack, FLAGS.archive))
    else:
        if not FLAGS.masks_dir:
            raise app.UsageError("--unpack needs --masks_dir")
        print(unpack(FLAGS.unpack, FLAGS.masks_dir))


if __name__ == "__main__":
    flags.DEFINE_string("pack", None, "Mask folder to pack.")
    flags.DEFINE_string("archive", None, "--pack: the archive (.npz) to write.")
    flags.DEFINE_string("unpack", None, "Archive to unpack.")
    flags.DEFINE_string("masks_dir", None, "--unpack: the folder to write the masks into.")
    errors.run_binary("mask_archive", main)
