"""bench.mask_archive: a folder of mask PNGs packs into one file and unpacks to the same
pixels at the same paths; masks already there are left alone; a damaged archive and an
empty folder are named in one error."""
import os

import numpy as np
import pytest

from bench import mask_archive
from harl_tf import errors
from harl_tf.masks import quality
from harl_tf.masks.folder import write_mask_png


def _masks(root, rng):
    made = {}
    for name, shape in (("bag/a1", (64, 64)), ("bag/a2", (64, 64)), ("coat/b", (30, 47))):
        mask = (rng.random(shape) > 0.6).astype(np.uint8)
        write_mask_png(os.path.join(root, name + ".png"), mask)
        made[name] = mask
    return made


def test_masks_round_trip_through_the_archive(tmp_path):
    made = _masks(str(tmp_path / "masks"), np.random.default_rng(0))
    archive = str(tmp_path / "a" / "masks.npz")
    summary = mask_archive.pack(str(tmp_path / "masks"), archive)
    assert summary["masks"] == 3
    # One bit per pixel before compression: far below the PNGs' bytes for random masks.
    assert summary["bytes"] < sum(m.size for m in made.values()) / 8 + 2000

    out = tmp_path / "out"
    assert mask_archive.unpack(archive, str(out)) == {"written": 3, "kept": 0}
    for name, mask in made.items():
        assert np.array_equal(quality.read_mask(str(out / (name + ".png"))), mask)
    # Unpacking again writes nothing; a changed mask is put back.
    assert mask_archive.unpack(archive, str(out)) == {"written": 0, "kept": 3}
    write_mask_png(str(out / "coat" / "b.png"), 1 - made["coat/b"])
    assert mask_archive.unpack(archive, str(out)) == {"written": 1, "kept": 2}
    assert np.array_equal(quality.read_mask(str(out / "coat" / "b.png")), made["coat/b"])


def test_a_damaged_archive_and_an_empty_folder_are_named(tmp_path):
    _masks(str(tmp_path / "masks"), np.random.default_rng(1))
    archive = str(tmp_path / "masks.npz")
    mask_archive.pack(str(tmp_path / "masks"), archive)
    with np.load(archive) as data:
        parts = {key: data[key] for key in data.files}
    parts["bits"] = parts["bits"].copy()
    parts["bits"][0] ^= 1
    np.savez_compressed(archive, **parts)
    with pytest.raises(errors.ConfigError, match="masks.npz: content does not match"):
        mask_archive.unpack(archive, str(tmp_path / "out"))
    assert not (tmp_path / "out").exists()

    (tmp_path / "empty").mkdir()
    with pytest.raises(errors.MissingPathError, match="no masks under"):
        mask_archive.pack(str(tmp_path / "empty"), str(tmp_path / "e.npz"))
    assert not (tmp_path / "e.npz").exists()
