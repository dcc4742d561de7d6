"""Beam data preparation (DirectRunner): the same records, manifests and masks as the local
tools, bad input counted and named, --strict failing on the file."""
import glob
import json
import os

import numpy as np
import pytest
from PIL import Image

pytest.importorskip("apache_beam")

from harl_tf import masks  # noqa: E402
from harl_tf.data import beam_build, builder, schema, sources, tfds_source  # noqa: E402
from harl_tf.masks import folder  # noqa: E402

TWO_PROCESSES = beam_build.DIRECT_TWO_WORKERS
IN_PROCESS = "--runner=DirectRunner"


def _save(path, array, **kwargs):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    Image.fromarray(array).save(path, **kwargs)


def _folder_dataset(root, train_per_class=6, test_per_class=2):
    """``root/<split>/images/<class>/<i>.jpg`` (24x32 noise) + box masks."""
    rng = np.random.default_rng(0)
    mask = np.zeros((24, 32), np.uint8)
    mask[6:18, 8:24] = 255
    for split, count in (("train", train_per_class), ("test", test_per_class)):
        for name in ("bird", "cat"):
            for i in range(count):
                stem = f"{split}/%s/{name}/{i:02d}"
                _save(str(root / (stem % "images")) + ".jpg",
                      rng.integers(0, 256, (24, 32, 3), dtype=np.uint8), quality=90)
                _save(str(root / (stem % "masks")) + ".png", mask)


def _corrupt(path):
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])  # truncated JPEG: PIL refuses it


def _records(output_dir, split):
    """``{id: (image bytes, mask PNG bytes, label)}`` of every record of a split."""
    found = {}
    for path in sorted(glob.glob(os.path.join(output_dir, f"{split}-*.tfrecord"))):
        for record in schema.read_examples(path, decode=False):
            found[record["id"]] = (record["image"], record["mask"], record["label"])
    return found


def _counts(manifest):
    return {split: {key: entry[key] for key in ("num_shards", "num_records", "num_skipped",
                                                 "class_counts", "counts", "missing_shards")}
            for split, entry in manifest["splits"].items()}


def _leftovers(output_dir):
    return glob.glob(os.path.join(output_dir, "**", ".*.tmp"), recursive=True)


def test_two_worker_beam_build_equals_the_local_build_and_names_the_corrupt_image(tmp_path):
    _folder_dataset(tmp_path / "data")
    corrupt = tmp_path / "data" / "train" / "images" / "cat" / "03.jpg"
    _corrupt(corrupt)
    source = sources.FolderSource(tmp_path / "data", mask_method_name="ground_truth")
    local = builder.build_dataset(source, str(tmp_path / "local"), num_shards=3,
                                  num_workers=1, progress=False)
    beam = beam_build.build_dataset_beam(source, str(tmp_path / "beam"), num_shards=3,
                                         pipeline_options=TWO_PROCESSES)
    for split, expected in (("train", 11), ("test", 4)):
        records = _records(tmp_path / "beam", split)
        assert len(records) == expected
        assert records == _records(tmp_path / "local", split)  # ids, bytes, labels
    assert _counts(beam) == _counts(local)
    assert beam["splits"]["train"]["num_records"] == 11
    assert beam["splits"]["train"]["class_counts"] == {"bird": 6, "cat": 5}
    (skipped,) = beam["skipped"]
    assert skipped["path"] == str(corrupt) and skipped["split"] == "train"
    assert "not a readable image" in skipped["reason"] and beam["skipped"] == local["skipped"]
    # the same plan, so the very same shard files (checksums) as the local build
    for split in ("train", "test"):
        assert beam["splits"][split]["shards"] == local["splits"][split]["shards"]
    assert beam["complete"] and beam["mask"] == local["mask"]
    assert beam["last_run"]["shards_built"] == 6 and beam["last_run"]["images_processed"] == 16
    assert _leftovers(tmp_path / "beam") == []


def test_strict_beam_build_fails_with_one_line_naming_the_file(tmp_path):
    from absl import flags
    from harl_tf import errors
    from harl_tf.cli import build_tfrecords
    _folder_dataset(tmp_path / "data", test_per_class=0)
    corrupt = tmp_path / "data" / "train" / "images" / "bird" / "04.jpg"
    corrupt.write_bytes(b"not an image")
    out = tmp_path / "out"
    argv = ["build_tfrecords", "--source=folder", f"--images_dir={tmp_path / 'data'}",
            f"--output_dir={out}", "--num_shards=2", "--runner=beam", "--strict",
            f"--beam_pipeline_options={TWO_PROCESSES}", "--noprogress"]
    flags.FLAGS.unparse_flags()
    try:
        flags.FLAGS(argv)
        with pytest.raises(builder.BuildError) as failure:  # run_binary prints it, one line
            build_tfrecords.main([argv[0]])
    finally:
        flags.FLAGS.unparse_flags()
    assert str(failure.value) == errors.one_line(failure.value)
    assert str(failure.value).startswith(f"{corrupt}: not a readable image")
    assert "--strict" in str(failure.value)
    assert not (out / builder.MANIFEST_NAME).exists()  # nothing claims to be complete
    assert _leftovers(out) == []  # the failed shard left no partial file


def test_synthetic_beam_build_equals_local_and_a_rerun_only_verifies(tmp_path):
    source = sources.SyntheticSource(10, image_size=(24, 32), seed=3, num_test_images=4)
    local = builder.build_dataset(source, str(tmp_path / "local"), num_shards=2,
                                  progress=False)
    out = tmp_path / "beam"
    first = beam_build.build_dataset_beam(source, str(out), num_shards=2,
                                          pipeline_options=IN_PROCESS)
    assert _records(out, "train") == _records(tmp_path / "local", "train")
    assert len(_records(out, "test")) == 4 and _counts(first) == _counts(local)
    assert first["mask"] == {"method": "ground_truth", "params": {}}
    # a crash mid-shard: one shard gone, its temporary file left behind
    name = first["splits"]["train"]["shards"][1]["file"]
    (out / name).unlink()
    (out / f".{name}.tmp").write_bytes(b"half a record")
    second = beam_build.build_dataset_beam(source, str(out), num_shards=2,
                                           pipeline_options=IN_PROCESS)
    assert second["last_run"]["shards_built"] == 1
    assert second["splits"] == first["splits"] and _leftovers(out) == []
    third = beam_build.build_dataset_beam(source, str(out), num_shards=2,
                                          pipeline_options=IN_PROCESS)
    assert third["last_run"]["shards_built"] == 0 and third["complete"]


def _red_detector(path):
    """A saved deep mask model: mean-colour 'encoder' (stride 2) and a 1x1 head that calls
    a cell foreground when its red exceeds its green and blue."""
    import keras
    from harl_tf.masks import deep
    encoder = keras.Sequential([keras.Input((None, None, 3)), keras.layers.AveragePooling2D(2)])
    head = deep.SaliencyHead(kernel=np.array([20.0, -10.0, -10.0]).reshape(1, 1, 3, 1),
                             bias=[-1.0])
    deep.SaliencyModel(deep.FrozenEncoder.from_keras(encoder, note="test: mean colour"),
                       head, input_size=32).save(path)


def test_deep_mask_beam_build_matches_the_local_deep_mask_build(tmp_path):
    model = str(tmp_path / "mask_model")
    _red_detector(model)
    source = sources.SyntheticSource(6, image_size=32, seed=1, image_format="png")  # lossless
    params = {"model_path": model, "progress": False}
    local = builder.build_dataset(source, str(tmp_path / "local"), num_shards=2,
                                  mask_method="deep", mask_params=params, progress=False)
    beam = beam_build.build_dataset_beam(source, str(tmp_path / "beam"), num_shards=2,
                                         mask_method="deep", mask_params=params,
                                         pipeline_options=IN_PROCESS)
    records = _records(tmp_path / "beam", "train")
    assert len(records) == 6 and records == _records(tmp_path / "local", "train")
    assert beam["mask"] == local["mask"] and beam["mask"]["method"] == "deep"
    assert beam["mask"]["params"]["model_path"] == os.path.abspath(model)
    # the stored masks are the method's own masks, and not trivial ones
    method = masks.get_method("deep", model_path=model, progress=False)
    fractions = []
    for path in glob.glob(str(tmp_path / "beam" / "train-*.tfrecord")):
        for record in schema.read_examples(path):
            np.testing.assert_array_equal(record["mask_array"],
                                          method(record["image_array"]))
            fractions.append(record["mask_array"].mean())
    assert 0.0 < np.mean(fractions) < 0.9


def test_beam_mask_folder_equals_the_local_one_and_strict_names_the_file(tmp_path):
    rng = np.random.default_rng(5)
    images = tmp_path / "images"
    for i in range(6):
        image = np.full((48, 48, 3), 40, np.uint8)
        image[12:36, 10 + i:34 + i] = rng.integers(150, 255, 3, dtype=np.uint8)
        _save(str(images / ("a" if i < 3 else "b") / f"{i}.png"), image)
    (images / "b" / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 truncated")
    local = folder.generate_mask_folder(str(images), str(tmp_path / "local"),
                                        progress=False)
    beam = beam_build.generate_mask_folder_beam(str(images), str(tmp_path / "beam"),
                                                pipeline_options=IN_PROCESS)
    for key in ("num_images", "written", "corrupt", "corrupt_paths", "fallbacks",
                "fallback_reasons", "params", "skipped_existing"):
        assert beam[key] == local[key], key
    assert beam["written"] == 6 and beam["corrupt_paths"] == [str(images / "b" / "broken.jpg")]
    written = sorted(glob.glob(str(tmp_path / "beam" / "*" / "*.png")))
    assert [os.path.relpath(p, tmp_path / "beam") for p in written] == [
        f"{'a' if i < 3 else 'b'}/{i}.png" for i in range(6)]
    for path in written:  # byte-identical PNGs
        twin = tmp_path / "local" / os.path.relpath(path, tmp_path / "beam")
        assert open(path, "rb").read() == twin.read_bytes()
    saved = json.loads((tmp_path / "beam" / "summary.json").read_text())
    assert saved["written"] == 6 and saved["corrupt"] == 1
    # a rerun keeps the existing masks
    again = beam_build.generate_mask_folder_beam(str(images), str(tmp_path / "beam"),
                                                 pipeline_options=IN_PROCESS)
    assert again["skipped_existing"] == 6 and again["written"] == 0
    with pytest.raises(beam_build.PipelineError, match=r"broken\.jpg.*--strict"):
        beam_build.generate_mask_folder_beam(str(images), str(tmp_path / "strict"),
                                             strict=True, pipeline_options=IN_PROCESS)


def test_tfds_beam_build_equals_local(tmp_path, monkeypatch):
    tfds = pytest.importorskip("tensorflow_datasets")
    from test_builder import _HalfMask  # the builder tests' mask method, reused
    monkeypatch.setitem(masks._REGISTRY, "left_half", _HalfMask)
    with tfds.testing.mock_data(num_examples=7):  # patches this process: in-process runner
        source = tfds_source.TFDSSource("mnist", data_dir=str(tmp_path / "absent"))
        options = dict(num_shards=3, mask_method="left_half", mask_params={"margin": 1})
        local = builder.build_dataset(source, str(tmp_path / "local"), progress=False,
                                      **options)
        beam = beam_build.build_dataset_beam(source, str(tmp_path / "beam"),
                                             pipeline_options=IN_PROCESS, **options)
    records = _records(tmp_path / "beam", "train")
    assert sorted(records) == [f"mnist/train/{i:08d}" for i in range(7)]
    assert records == _records(tmp_path / "local", "train")
    assert _counts(beam) == _counts(local) and beam["splits"]["train"]["num_records"] == 7
    assert beam["mask"] == {"method": "left_half", "params": {"margin": 1}}


def test_a_runners_error_text_gives_back_the_one_line_message():
    remote = RuntimeError(
        "Traceback (most recent call last):\n  File \"x.py\", line 1, in process\n"
        "harl_tf.data.builder.BuildError: /d/cat/01.jpg: not a readable image (--strict "
        "stops the build) [while running 'WriteShards']\n\nDuring handling ...\n"
        "harl_tf.data.builder.BuildError: /d/cat/01.jpg: not a readable image (--strict "
        "stops the build) [while running 'WriteShards']")
    assert beam_build.own_error_message(remote) == (
        "/d/cat/01.jpg: not a readable image (--strict stops the build)")
    assert beam_build.own_error_message(RuntimeError("KeyError: 'x'")) is None


def test_partitions_are_refused_with_the_beam_runner(tmp_path):
    from absl import app, flags
    from harl_tf.cli import build_tfrecords
    argv = ["build_tfrecords", "--source=synthetic", "--num_images=4", "--runner=beam",
            "--num_partitions=2", f"--output_dir={tmp_path}"]
    flags.FLAGS.unparse_flags()
    try:
        flags.FLAGS(argv)
        with pytest.raises(app.UsageError, match="--num_partitions is for --runner=local"):
            build_tfrecords.main([argv[0]])
    finally:
        flags.FLAGS.unparse_flags()
