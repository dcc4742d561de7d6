"""bench.keep_encoders: an export is kept (metadata and Keras weights) with its provenance
(pretraining config, last logged metrics, sha256 of every file), never over another
without --overwrite; a folder that is not an export is named in one error; a kept encoder
restores to a full export that computes what the original did."""
import hashlib
import json
import os

import pytest

from bench import keep_encoders
from harl_tf import errors


def _work_dir(root, run="byol", weights=b"w" * 1000):
    export = root / "exports" / run
    (export / "variables").mkdir(parents=True)
    (export / "harl_export.json").write_text('{"output_stride": 8}')
    (export / "encoder.weights.h5").write_bytes(weights)
    (export / "variables" / "variables.data-00000-of-00001").write_bytes(weights)
    (root / "runs" / run).mkdir(parents=True)
    (root / "runs" / run / "config.json").write_text(json.dumps({"seed": 1, "loss_mode": run}))
    (root / "logs").mkdir()
    (root / "logs" / f"pretrain_{run}.log").write_text(
        "I1206 hooks.py:94] step 990/1000  loss 1.2000  alpha 0.7  75.0 images/s\n"
        "I1206 hooks.py:94] step 1000/1000  loss 1.1256  alpha 0.7  valid_fg 0.98  "
        "74.6 images/s\nsaved checkpoint\n")
    return root


def test_an_export_is_kept_whole_with_its_provenance(tmp_path):
    work = _work_dir(tmp_path / "work")
    destination = tmp_path / "kept" / "s1" / "byol"
    provenance = keep_encoders.keep(str(work), "byol", str(destination), commit="abc123")
    weights = "encoder.weights.h5"
    assert (destination / weights).read_bytes() == b"w" * 1000
    assert sorted(os.listdir(destination)) == ["encoder.weights.h5", "harl_export.json",
                                               keep_encoders.PROVENANCE]  # no SavedModel
    on_disk = json.loads((destination / keep_encoders.PROVENANCE).read_text())
    assert on_disk == json.loads(json.dumps(provenance))
    assert on_disk["commit"] == "abc123" and on_disk["pretraining"]["config"]["seed"] == 1
    assert on_disk["pretraining"]["final"] == {"step": 1000, "train_steps": 1000,
                                               "loss": 1.1256, "images_per_second": 74.6}
    assert on_disk["files"][weights] == {
        "bytes": 1000, "sha256": hashlib.sha256(b"w" * 1000).hexdigest()}
    assert "variables/variables.data-00000-of-00001" in on_disk["files"]  # listed, not kept
    assert sorted(os.listdir(tmp_path / "kept" / "s1")) == ["byol"]   # no temporary left


def test_a_kept_encoder_is_replaced_only_when_asked(tmp_path):
    destination = tmp_path / "kept" / "byol"
    keep_encoders.keep(str(_work_dir(tmp_path / "a")), "byol", str(destination), commit="a")
    again = _work_dir(tmp_path / "b", weights=b"v" * 10)
    with pytest.raises(errors.ConfigError, match="kept already; pass --overwrite"):
        keep_encoders.keep(str(again), "byol", str(destination), commit="b")
    keep_encoders.keep(str(again), "byol", str(destination), commit="b", overwrite=True)
    assert (destination / "encoder.weights.h5").read_bytes() == b"v" * 10


def test_a_folder_that_is_not_an_export_is_named(tmp_path):
    work = _work_dir(tmp_path / "work")
    (work / "exports" / "byol" / "harl_export.json").unlink()
    with pytest.raises(errors.MissingPathError, match=r"exports/byol: not an export"):
        keep_encoders.keep(str(work), "byol", str(tmp_path / "kept"), commit="x")
    assert not (tmp_path / "kept").exists()


def test_a_kept_encoder_restores_to_an_export_that_computes_the_same(tmp_path):
    import numpy as np
    import tensorflow as tf

    from harl_tf import saved_encoder
    from harl_tf.models import resnet

    config = {"depth": 18, "width_multiplier": 0.25, "small_stem": True, "output_stride": 16}
    encoder = resnet.build_encoder(config)
    work = tmp_path / "work"
    saved_encoder.export_encoder(encoder, str(work / "exports" / "byol"),
                                 encoder_config=encoder.config)
    (work / "runs" / "byol").mkdir(parents=True)
    (work / "runs" / "byol" / "config.json").write_text("{}")
    kept = tmp_path / "kept"
    keep_encoders.keep(str(work), "byol", str(kept), commit="c")
    restored = keep_encoders.restore(str(kept), str(tmp_path / "restored"))
    assert restored["source"]["restored_from"] == str(kept)
    images = tf.random.stateless_uniform([2, 32, 32, 3], seed=[1, 2])
    original = tf.saved_model.load(str(work / "exports" / "byol"))
    again = tf.saved_model.load(str(tmp_path / "restored"))
    want = original.signatures["serving_default"](images=images)["feature_map"].numpy()
    got = again.signatures["serving_default"](images=images)["feature_map"].numpy()
    assert want.shape[::3] == (2, encoder.feature_dim) and np.abs(want).max() > 0
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5 * np.abs(want).max())


def test_a_retrained_encoder_is_checked_against_its_record(tmp_path):
    record_path = str(tmp_path / "records" / "s1" / "byol.json")
    first = keep_encoders.keep(str(_work_dir(tmp_path / "a")), "byol",
                               str(tmp_path / "kept_a"), commit="a")
    assert keep_encoders.record(first, record_path) == "new"
    written = (tmp_path / "records" / "s1" / "byol.json").read_text()

    # The same weights retrained elsewhere (other log, commit, machine): the record stays.
    same = _work_dir(tmp_path / "b")
    (same / "logs" / "pretrain_byol.log").write_text("step 1000/1000  loss 9.0  3.0 images/s\n")
    again = keep_encoders.keep(str(same), "byol", str(tmp_path / "kept_b"), commit="b")
    assert keep_encoders.record(again, record_path) == "identical"
    assert (tmp_path / "records" / "s1" / "byol.json").read_text() == written

    # Other weights: the record is replaced only when asked.
    other = keep_encoders.keep(str(_work_dir(tmp_path / "c", weights=b"v" * 1000)), "byol",
                               str(tmp_path / "kept_c"), commit="c")
    assert keep_encoders.record(other, record_path) == "differs"
    assert (tmp_path / "records" / "s1" / "byol.json").read_text() == written
    assert keep_encoders.record(other, record_path, replace=True) == "differs"
    assert json.loads((tmp_path / "records" / "s1" / "byol.json").read_text())["commit"] == "c"
