"""harl_tf.atomic: a file or directory appears under its final name complete, or not at all."""
import json
import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest

from harl_tf import atomic


def _hidden_temporaries(directory):
    return sorted(n for n in os.listdir(directory) if n.startswith("."))


def test_write_bytes_and_json_replace_the_file_and_leave_nothing_else(tmp_path):
    path = tmp_path / "sub" / "out.json"
    atomic.write_bytes_atomic(str(path), b"old")
    assert atomic.write_json_atomic(str(path), {"b": np.float32(0.5), "a": np.arange(3),
                                                "n": np.int64(7)}) == str(path)
    assert path.read_text() == ('{\n  "a": [\n    0,\n    1,\n    2\n  ],\n  "b": 0.5,\n'
                                '  "n": 7\n}\n')
    assert os.listdir(path.parent) == ["out.json"]


def test_written_file_has_the_permissions_of_a_plain_open(tmp_path):
    plain = tmp_path / "plain"
    plain.write_bytes(b"")
    atomic.write_bytes_atomic(str(tmp_path / "atomic"), b"x")
    assert (os.stat(tmp_path / "atomic").st_mode & 0o777) == (os.stat(plain).st_mode & 0o777)


def test_an_exception_mid_write_keeps_the_old_file_and_removes_the_temporary(tmp_path):
    path = tmp_path / "summary.json"
    atomic.write_json_atomic(str(path), {"step": 1})
    with pytest.raises(RuntimeError, match="disk full"):
        with atomic.atomic_path(str(path)) as temporary, open(temporary, "w") as f:
            f.write('{"step": 2, "trunc')
            raise RuntimeError("disk full")
    assert json.loads(path.read_text()) == {"step": 1}
    assert os.listdir(tmp_path) == ["summary.json"]


def test_a_killed_process_leaves_the_old_file_and_only_a_hidden_temporary(tmp_path):
    path = tmp_path / "mask.png"
    path.write_bytes(b"old content")
    script = textwrap.dedent(f"""
        import os
        from harl_tf import atomic
        with atomic.atomic_path({str(path)!r}) as temporary, open(temporary, "wb") as f:
            f.write(b"half of the new")
            f.flush()
            os._exit(9)  # dies like kill -9: no cleanup, no rename
    """)
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, timeout=60)
    assert result.returncode == 9, result.stderr
    assert path.read_bytes() == b"old content"
    leftovers = _hidden_temporaries(tmp_path)
    assert len(leftovers) == 1  # the half-written temporary, under a hidden name
    assert leftovers[0].startswith(".mask.png.") and leftovers[0].endswith(".tmp")
    assert (tmp_path / leftovers[0]).read_bytes() == b"half of the new"


def test_directory_is_renamed_in_complete_and_an_existing_one_needs_overwrite(tmp_path):
    target = tmp_path / "model"
    with atomic.atomic_directory(str(target)) as temporary:
        with open(os.path.join(temporary, "a.txt"), "w") as f:
            f.write("first")
        assert not target.exists()  # nothing under the final name until complete
    assert (target / "a.txt").read_text() == "first"
    with pytest.raises(atomic.DestinationExistsError, match="already exists"):
        with atomic.atomic_directory(str(target)):
            pass
    with pytest.raises(OSError, match="disk full"):
        with atomic.atomic_directory(str(target), overwrite=True) as temporary:
            with open(os.path.join(temporary, "b.txt"), "w") as f:
                f.write("half")
            raise OSError("disk full")
    assert os.listdir(target) == ["a.txt"]  # the old directory is untouched
    with atomic.atomic_directory(str(target), overwrite=True) as temporary:
        with open(os.path.join(temporary, "b.txt"), "w") as f:
            f.write("second")
    assert os.listdir(target) == ["b.txt"]
    assert os.listdir(tmp_path) == ["model"]  # no temporary or old copy left


def test_atomic_module_does_not_import_tensorflow():
    result = subprocess.run(
        [sys.executable, "-c", "import sys, harl_tf.atomic; print('tensorflow' in sys.modules)"],
        capture_output=True, text=True, timeout=60)
    assert result.stdout.strip() == "False", result.stderr
