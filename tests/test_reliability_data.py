"""Faults on the data side: the builder killed mid-run, corrupt shards, a full disk.

- SIGKILL of ``tools.build_tfrecords`` in the middle of a shard, then a rerun: the result
  equals a clean build (same shards byte for byte, same ids, no duplicate, none missing),
  and nothing half-written ever looks like a finished shard.
- A truncated shard or one with a flipped byte: ``schema.read_examples``, the pretraining
  and the evaluation pipelines stop with an error (never a hang or a silent short epoch);
  the error names the file and the record index.
- No space left on the output folder (a 1 MB tmpfs): one clear error line, the shard being
  written removed, the finished shards intact, and a rerun with space completes.
"""
import contextlib
import glob
import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time

import pytest

from harl_tf.data import builder, pipeline, schema, sources
from test_bad_flags import binary_lines

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def subprocess_env(**extra):
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3", PYTHONPATH=REPO, CUDA_VISIBLE_DEVICES="")
    env.update(extra)
    return env


@contextlib.contextmanager
def small_tmpfs(size="1m"):
    """A fresh tmpfs of ``size`` (needs root and mount permission; else the test skips)."""
    directory = tempfile.mkdtemp(prefix="harl-tmpfs-")
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", directory],
                          capture_output=True, text=True)
    if done.returncode != 0:
        os.rmdir(directory)
        pytest.skip(f"cannot mount a tmpfs here: {done.stderr.strip()}")
    try:
        yield directory
    finally:
        subprocess.run(["umount", "-l", directory], capture_output=True)
        shutil.rmtree(directory, ignore_errors=True)


def _ids(output_dir):
    """Every example id in the shards of output_dir, in shard order (may repeat)."""
    ids = []
    for path in sorted(glob.glob(os.path.join(output_dir, "train-*.tfrecord"))):
        ids.extend(r["id"] for r in schema.read_examples(path, decode=False))
    return ids


def _sha(path):
    return hashlib.sha256(open(path, "rb").read()).hexdigest()


def _assert_no_shard_looks_complete_unless_it_is(output_dir):
    """Every visible shard has a sidecar whose size and sha256 match; temporaries are
    hidden (leading dot), so no glob of shards picks them up."""
    for path in glob.glob(os.path.join(output_dir, "train-*.tfrecord")):
        sidecar = os.path.join(output_dir, builder.SIDECAR_DIR,
                               os.path.basename(path) + ".json")
        if not os.path.exists(sidecar):     # renamed, sidecar not yet written: complete data
            assert sum(1 for _ in schema.iterate_records(path)) > 0
            continue
        info = json.load(open(sidecar))
        assert os.path.getsize(path) == info["bytes"] and _sha(path) == info["sha256"], path


BUILD = ["-m", "tools.build_tfrecords", "--source=synthetic", "--num_images=360",
         "--image_size=48", "--mask_method=conventional", "--num_shards=12",
         "--num_workers=1", "--noprogress"]


def test_builder_killed_mid_shard_resumes_to_the_clean_result(tmp_path):
    clean, killed = str(tmp_path / "clean"), str(tmp_path / "killed")
    proc = subprocess.Popen([sys.executable, *BUILD, f"--output_dir={killed}"], cwd=REPO,
                            env=subprocess_env(), stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    sidecars = os.path.join(killed, builder.SIDECAR_DIR)
    deadline = time.time() + 180
    # Kill while a shard is being written, after at least two shards are finished.
    while time.time() < deadline and proc.poll() is None:
        finished = glob.glob(os.path.join(sidecars, "*.json"))
        writing = glob.glob(os.path.join(killed, ".train-*.tmp"))
        if len(finished) >= 2 and writing:
            break
        time.sleep(0.01)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL, "the build ended before it could be killed"
    assert not os.path.exists(os.path.join(killed, builder.MANIFEST_NAME))
    _assert_no_shard_looks_complete_unless_it_is(killed)
    assert len(glob.glob(os.path.join(killed, "train-*.tfrecord"))) < 12

    rerun = subprocess.run([sys.executable, *BUILD, f"--output_dir={killed}"], cwd=REPO,
                           env=subprocess_env(), capture_output=True, text=True, timeout=300)
    assert rerun.returncode == 0, rerun.stderr[-2000:]
    source = sources.SyntheticSource(360, image_size=48)
    builder.build_dataset(source, clean, mask_method="conventional", num_shards=12,
                          progress=False)
    a = json.load(open(os.path.join(clean, builder.MANIFEST_NAME)))
    b = json.load(open(os.path.join(killed, builder.MANIFEST_NAME)))
    assert b["complete"] and b["last_run"]["shards_built"] < 12   # finished shards kept
    assert a["splits"]["train"]["num_records"] == b["splits"]["train"]["num_records"] == 360
    assert a["splits"]["train"]["class_counts"] == b["splits"]["train"]["class_counts"]
    ids_clean, ids_killed = _ids(clean), _ids(killed)
    assert len(set(ids_killed)) == len(ids_killed) == 360          # no duplicate
    assert set(ids_killed) == set(ids_clean) == {r.id for r in source.list_refs("train")}
    for shard in a["splits"]["train"]["shards"]:                   # byte for byte
        assert _sha(os.path.join(killed, shard["file"])) == shard["sha256"], shard["file"]
    assert not glob.glob(os.path.join(killed, ".*.tmp"))


@pytest.fixture(scope="module")
def records(tmp_path_factory):
    """Three clean shards of 8 synthetic examples each."""
    output = str(tmp_path_factory.mktemp("records"))
    builder.build_dataset(sources.SyntheticSource(24, image_size=32), output, num_shards=3,
                          progress=False)
    return sorted(glob.glob(os.path.join(output, "train-*.tfrecord")))


def _record_offsets(path):
    """Byte offset of each record's frame (length u64, crc u32, data, crc u32)."""
    data, offsets, position = open(path, "rb").read(), [], 0
    while position < len(data):
        offsets.append(position)
        position += 16 + int.from_bytes(data[position:position + 8], "little")
    return offsets


def _damage(records, tmp_path, how):
    """Copies of the shards, the middle one damaged inside record 5; returns its path."""
    folder = tmp_path / how
    folder.mkdir()
    for path in records:
        shutil.copy(path, folder)
    bad = str(folder / os.path.basename(records[1]))
    data = bytearray(open(bad, "rb").read())
    start = _record_offsets(bad)[5]
    if how == "truncated":
        data = data[:start + 40]
    elif how == "flipped_payload":
        data[start + 100] ^= 0x10
    elif how == "flipped_length":
        data[start + 1] ^= 0x01
    open(bad, "wb").write(bytes(data))
    return str(folder / "train-*.tfrecord"), bad


@pytest.mark.parametrize("how", ["truncated", "flipped_payload", "flipped_length"])
def test_corrupt_shard_stops_every_reader_with_the_file_and_record(records, tmp_path, how):
    pattern, bad = _damage(records, tmp_path, how)
    with pytest.raises(schema.SchemaError, match=rf"{bad}: cannot read record 5 "):
        list(schema.read_examples(bad))

    # The training pipeline (endless) and the evaluation pipeline (one pass) both stop;
    # naming_corrupt_files turns TF's offset-only message into one naming file and record.
    datasets = {
        "pretrain": pipeline.pretrain_dataset(pattern, 4, 32, seed=0, deterministic=True,
                                              shuffle_buffer=4),
        "eval": pipeline.eval_dataset(pattern, 4, 32),
    }
    for name, dataset in datasets.items():
        seen = 0
        with pytest.raises(pipeline.CorruptRecordError, match=rf"{bad}: cannot read record 5"):
            with pipeline.naming_corrupt_files(pattern):
                for batch in dataset.take(100):       # 100 batches > 3 epochs: no hang
                    seen += 1
        assert seen < 24 / 4 * 3, name               # it stopped in the first epoch


def test_full_disk_stops_the_builder_with_one_line_and_no_half_shard(tmp_path):
    args = [sys.executable, "-m", "tools.build_tfrecords", "--source=synthetic",
            "--num_images=400", "--image_size=96", "--image_format=png", "--num_shards=6",
            "--num_workers=1", "--noprogress"]
    with small_tmpfs("1m") as disk:
        output = os.path.join(disk, "records")
        done = subprocess.run(args + [f"--output_dir={output}"], cwd=REPO,
                              env=subprocess_env(), capture_output=True, text=True, timeout=300)
        lines = binary_lines(done.stderr)
        assert done.returncode != 0 and "Traceback" not in done.stderr, done.stderr[-2000:]
        assert len(lines) == 1 and "No space left on device" in lines[0], lines
        assert output in lines[0]
        assert not glob.glob(os.path.join(output, ".*.tmp"))            # no half shard
        assert not glob.glob(os.path.join(output, builder.SIDECAR_DIR, ".*.tmp"))
        assert not os.path.exists(os.path.join(output, builder.MANIFEST_NAME))
        finished = sorted(glob.glob(os.path.join(output, "train-*.tfrecord")))
        assert 0 < len(finished) < 6
        _assert_no_shard_looks_complete_unless_it_is(output)
        kept = {p: _sha(p) for p in finished}
        # With space, the same command finishes the build and keeps the finished shards.
        roomy = str(tmp_path / "records")
        shutil.copytree(output, roomy)
    done = subprocess.run(args + [f"--output_dir={roomy}"], cwd=REPO, env=subprocess_env(),
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    manifest = json.load(open(os.path.join(roomy, builder.MANIFEST_NAME)))
    assert manifest["complete"] and manifest["splits"]["train"]["num_records"] == 400
    assert manifest["last_run"]["shards_built"] == 6 - len(kept)
    for path, sha in kept.items():
        assert _sha(os.path.join(roomy, os.path.basename(path))) == sha


def test_finetune_on_a_corrupt_shard_ends_with_one_line_naming_it(records, tmp_path):
    pattern, bad = _damage(records, tmp_path, "truncated")
    done = subprocess.run(
        [sys.executable, "-m", "harl_tf.finetune", "--encoder=random",
         '--encoder_config={"depth": 18}', f"--train_files={pattern}",
         f"--eval_files={pattern}", f"--output_dir={tmp_path / 'eval'}", "--image_size=32"],
        cwd=REPO, env=subprocess_env(), capture_output=True, text=True, timeout=300)
    lines = binary_lines(done.stderr)
    assert done.returncode != 0 and "Traceback" not in done.stderr, done.stderr[-2000:]
    assert len(lines) == 1 and f"{bad}: cannot read record 5" in lines[0], lines
