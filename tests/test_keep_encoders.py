"""bench.keep_encoders: an export is kept whole with its provenance (pretraining config,
last logged metrics, sha256 of every file), never over another without --overwrite, and a
folder that is not an export is named in one error."""
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
    weights = "variables/variables.data-00000-of-00001"
    assert (destination / weights).read_bytes() == b"w" * 1000
    on_disk = json.loads((destination / keep_encoders.PROVENANCE).read_text())
    assert on_disk == json.loads(json.dumps(provenance))
    assert on_disk["commit"] == "abc123" and on_disk["pretraining"]["config"]["seed"] == 1
    assert on_disk["pretraining"]["final"] == {"step": 1000, "train_steps": 1000,
                                               "loss": 1.1256, "images_per_second": 74.6}
    assert on_disk["files"][weights] == {
        "bytes": 1000, "sha256": hashlib.sha256(b"w" * 1000).hexdigest()}
    assert sorted(os.listdir(tmp_path / "kept" / "s1")) == ["byol"]   # no temporary left


def test_a_kept_encoder_is_replaced_only_when_asked(tmp_path):
    destination = tmp_path / "kept" / "byol"
    keep_encoders.keep(str(_work_dir(tmp_path / "a")), "byol", str(destination), commit="a")
    again = _work_dir(tmp_path / "b", weights=b"v" * 10)
    with pytest.raises(errors.ConfigError, match="kept already; pass --overwrite"):
        keep_encoders.keep(str(again), "byol", str(destination), commit="b")
    keep_encoders.keep(str(again), "byol", str(destination), commit="b", overwrite=True)
    assert (destination / "variables" / "variables.data-00000-of-00001").read_bytes() == \
        b"v" * 10


def test_a_folder_that_is_not_an_export_is_named(tmp_path):
    work = _work_dir(tmp_path / "work")
    (work / "exports" / "byol" / "harl_export.json").unlink()
    with pytest.raises(errors.MissingPathError, match=r"exports/byol: not an export"):
        keep_encoders.keep(str(work), "byol", str(tmp_path / "kept"), commit="x")
    assert not (tmp_path / "kept").exists()
