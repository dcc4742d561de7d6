"""TFRecord builder: byte-exact round trip, bad input, resume, partitions, mask methods."""
import glob
import json
import os

import numpy as np
import pytest
import tensorflow as tf
from PIL import Image

from harl_tf import masks
from harl_tf.data import builder, example_encoding, schema, sources, synthetic, tfds_source
from harl_tf.data.shards import sha256_file


def _write_image(path, array, **save_kwargs):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    Image.fromarray(array).save(path, **save_kwargs)


def _pattern(height, width, seed):
    rng = np.random.default_rng(seed)
    return rng.integers(0, 256, size=(height, width, 3), dtype=np.uint8)


def _box_mask(height, width, values=(0, 255)):
    mask = np.full((height, width), values[0], np.uint8)
    mask[height // 4: 3 * height // 4, width // 4: 3 * width // 4] = values[1]
    return mask


def _dataset(root, per_class=3, height=12, width=16, split="train"):
    """``root/<split>/images/<class>/<i>.jpg`` + ``masks/<class>/<i>.png``."""
    for c, name in enumerate(("bird", "cat")):
        for i in range(per_class):
            stem = f"{split}/%s/{name}/{i:02d}"
            _write_image(str(root / (stem % "images")) + ".jpg",
                         _pattern(height, width, 10 * c + i), quality=90)
            _write_image(str(root / (stem % "masks")) + ".png", _box_mask(height, width))


def _records(output_dir, split="train"):
    records = []
    for path in sorted(glob.glob(os.path.join(output_dir, f"{split}-*.tfrecord"))):
        records.extend(schema.read_examples(path))
    return records


def _build(source, output_dir, **kwargs):
    kwargs.setdefault("num_shards", 2)
    kwargs.setdefault("progress", False)
    return builder.build_dataset(source, str(output_dir), **kwargs)


def test_encoder_bytes_equal_tensorflows_and_parse_back():
    fields = dict(image_bytes=b"\xff\xd8jpeg", image_format="jpeg", height=7, width=9,
                  mask_png=b"\x89PNGmask", label=-1, example_id="a/b.jpg",
                  mask_method="conventional", mask_params={"sigma": 0.8, "k": 3})
    ours = example_encoding.encode_example(**fields, schema_version=schema.SCHEMA_VERSION)
    theirs = tf.train.Example.FromString(schema.serialize_example(**fields))
    assert ours == theirs.SerializeToString(deterministic=True)
    parsed = schema.parse_example(tf.constant(ours))
    assert int(parsed["label"]) == -1 and int(parsed["width"]) == 9
    assert parsed["id"].numpy() == b"a/b.jpg" and parsed["image"].numpy() == b"\xff\xd8jpeg"
    assert json.loads(parsed["mask_params"].numpy()) == {"k": 3, "sigma": 0.8}


def test_folder_round_trip_keeps_the_original_jpeg_bytes(tmp_path):
    _dataset(tmp_path / "data")
    manifest = _build(sources.FolderSource(tmp_path / "data", mask_method_name="ground_truth"),
                      tmp_path / "out")
    records = _records(tmp_path / "out")
    assert len(records) == 6 and manifest["splits"]["train"]["num_records"] == 6
    assert manifest["splits"]["train"]["class_counts"] == {"bird": 3, "cat": 3}
    assert manifest["complete"] and manifest["mask"] == {"method": "ground_truth", "params": {}}
    for record in records:
        image_path = tmp_path / "data" / record["id"]
        assert record["image"] == image_path.read_bytes()  # byte-exact, not re-encoded
        assert record["image_format"] == "jpeg" and (record["height"], record["width"]) == (12, 16)
        assert record["label"] == ("bird", "cat").index(record["id"].split("/")[2])
        np.testing.assert_array_equal(record["mask_array"], _box_mask(12, 16, (0, 1)))
    shards = manifest["splits"]["train"]["shards"]
    assert [s["file"] for s in shards] == ["train-00000-of-00002.tfrecord",
                                           "train-00001-of-00002.tfrecord"]
    for shard in shards:
        assert shard["sha256"] == sha256_file(str(tmp_path / "out" / shard["file"]))


def test_corrupt_images_are_skipped_and_counted_or_stop_a_strict_build(tmp_path):
    _dataset(tmp_path / "data")
    images = tmp_path / "data" / "train" / "images" / "cat"
    (images / "00.jpg").write_bytes(b"this is not a jpeg")
    truncated = (images / "01.jpg").read_bytes()
    (images / "01.jpg").write_bytes(truncated[: len(truncated) // 2])
    source = sources.FolderSource(tmp_path / "data")
    manifest = _build(source, tmp_path / "out")
    assert manifest["splits"]["train"]["num_records"] == 4
    assert manifest["splits"]["train"]["num_skipped"] == 2
    assert sorted(s["path"] for s in manifest["skipped"]) == [
        str(images / "00.jpg"), str(images / "01.jpg")]
    assert all("not a readable image" in s["reason"] for s in manifest["skipped"])
    assert len(_records(tmp_path / "out")) == 4

    with pytest.raises(builder.BuildError, match=r"cat/0[01]\.jpg.*--strict"):
        _build(source, tmp_path / "strict", strict=True)
    assert glob.glob(str(tmp_path / "strict" / ".*.tmp")) == []  # no half-written shard


def test_wrong_size_mask_is_an_error_naming_both_files_unless_resized(tmp_path):
    _dataset(tmp_path / "data")
    mask = tmp_path / "data" / "train" / "masks" / "bird" / "02.png"
    _write_image(str(mask), _box_mask(6, 8))
    source = sources.FolderSource(tmp_path / "data")
    with pytest.raises(builder.BuildError) as err:
        _build(source, tmp_path / "out")
    message = str(err.value)
    assert str(mask) in message and "8x6" in message and "16x12" in message
    assert str(tmp_path / "data" / "train" / "images" / "bird" / "02.jpg") in message
    assert glob.glob(str(tmp_path / "out" / ".*.tmp")) == []

    manifest = _build(source, tmp_path / "resized", resize_masks=True)
    assert manifest["splits"]["train"]["counts"] == {"resized_masks": 1}
    record = next(r for r in _records(tmp_path / "resized") if r["id"].endswith("bird/02.jpg"))
    nearest = np.kron(_box_mask(6, 8, (0, 1)), np.ones((2, 2), np.uint8))  # exact 2x
    np.testing.assert_array_equal(record["mask_array"], nearest)


def test_non_binary_mask_is_thresholded_at_128_and_counted(tmp_path):
    _dataset(tmp_path / "data", per_class=1)
    grey = np.tile(np.arange(0, 256, 16, dtype=np.uint8), (12, 1))  # 0..240 across
    _write_image(str(tmp_path / "data" / "train" / "masks" / "cat" / "00.png"), grey)
    manifest = _build(sources.FolderSource(tmp_path / "data"), tmp_path / "out", num_shards=1)
    assert manifest["splits"]["train"]["counts"] == {"thresholded_masks": 1}
    record = next(r for r in _records(tmp_path / "out") if "cat" in r["id"])
    np.testing.assert_array_equal(record["mask_array"], (grey >= 128).astype(np.uint8))


def test_rerun_skips_finished_shards_and_replaces_a_half_written_one(tmp_path):
    _dataset(tmp_path / "data")
    source = sources.FolderSource(tmp_path / "data")
    out = tmp_path / "out"
    first = _build(source, out, num_shards=3)
    names = [s["file"] for s in first["splits"]["train"]["shards"]]
    sidecars = {n: (out / "_shards" / (n + ".json")).stat().st_mtime_ns for n in names}
    # A crash mid-shard: shard 1 gone, its half-written temporary file left behind.
    (out / names[1]).unlink()
    (out / f".{names[1]}.tmp").write_bytes(b"half a record")
    # Shard 2 damaged after it was finished: its checksum no longer matches.
    with open(out / names[2], "ab") as handle:
        handle.write(b"garbage")
    second = _build(source, out, num_shards=3)
    assert second["last_run"]["shards_built"] == 2
    assert (out / "_shards" / (names[0] + ".json")).stat().st_mtime_ns == sidecars[names[0]]
    assert not (out / f".{names[1]}.tmp").exists()
    assert second["splits"]["train"]["shards"] == first["splits"]["train"]["shards"]
    third = _build(source, out, num_shards=3)
    assert third["last_run"]["shards_built"] == 0 and third["complete"]
    # Other options change the bytes, so every shard is rebuilt instead of reused.
    fourth = _build(source, out, num_shards=3, given_mask_method="ground_truth")
    assert fourth["last_run"]["shards_built"] == 3


def test_two_partitions_build_the_single_machine_dataset_without_overlap(tmp_path):
    _dataset(tmp_path / "data", per_class=4)
    source = sources.FolderSource(tmp_path / "data")
    single = _build(source, tmp_path / "single", num_shards=5)
    part0 = _build(source, tmp_path / "shared", num_shards=5, num_partitions=2,
                   partition_index=0)
    assert not part0["complete"]
    assert part0["splits"]["train"]["missing_shards"] == [
        "train-00001-of-00005.tfrecord", "train-00003-of-00005.tfrecord"]
    ids0 = {r["id"] for r in _records(tmp_path / "shared")}
    part1 = _build(source, tmp_path / "shared", num_shards=5, num_partitions=2,
                   partition_index=1)
    ids1 = {r["id"] for r in _records(tmp_path / "shared")} - ids0
    ids_single = {r["id"] for r in _records(tmp_path / "single")}
    assert len(ids0) == 4 and len(ids1) == 4  # shards 0, 2, 4 hold 1+1+2; 1, 3 hold 2+2
    assert ids0 & ids1 == set() and ids0 | ids1 == ids_single and len(ids_single) == 8
    assert part1["complete"]
    assert part1["splits"]["train"]["shards"] == single["splits"]["train"]["shards"]


def test_two_workers_write_the_same_bytes_as_one(tmp_path):
    _dataset(tmp_path / "data", per_class=20, height=24, width=32)
    source = sources.FolderSource(tmp_path / "data")
    one = _build(source, tmp_path / "one", num_shards=3, num_workers=1)
    two = _build(source, tmp_path / "two", num_shards=3, num_workers=2)
    assert two["splits"]["train"]["shards"] == one["splits"]["train"]["shards"]
    assert two["splits"]["train"]["num_records"] == 40


def test_synthetic_source_masks_equal_ground_truth(tmp_path):
    source = sources.SyntheticSource(6, image_size=(24, 32), seed=1, image_format="jpeg",
                                     jpeg_quality=80)
    manifest = _build(source, tmp_path / "out")
    assert manifest["mask"]["method"] == "ground_truth"
    records = _records(tmp_path / "out")
    assert len(records) == 6
    for record in records:
        index = int(record["id"].rsplit("/", 1)[1])
        image, mask, label = synthetic.render(index, (24, 32), 1)
        np.testing.assert_array_equal(record["mask_array"], mask)
        assert record["label"] == label and record["image_format"] == "jpeg"
        assert record["image"] == sources.encode_image(image, "jpeg", 80)


def test_empty_source_is_an_error(tmp_path):
    (tmp_path / "data").mkdir()
    with pytest.raises(ValueError, match="no images"):
        _build(sources.FolderSource(tmp_path / "data"), tmp_path / "out")


def test_pixel_cap_rejects_big_images(tmp_path):
    _dataset(tmp_path / "data", per_class=1)
    big = tmp_path / "data" / "train" / "images" / "cat" / "00.jpg"
    _write_image(str(big), _pattern(40, 50, 0))
    _write_image(str(tmp_path / "data" / "train" / "masks" / "cat" / "00.png"), _box_mask(40, 50))
    manifest = _build(sources.FolderSource(tmp_path / "data"), tmp_path / "out", num_shards=1,
                      max_pixels=1000)
    (skipped,) = manifest["skipped"]
    assert skipped["path"] == str(big) and "2000 pixels" in skipped["reason"]
    assert "max_pixels=1000" in skipped["reason"]
    assert manifest["splits"]["train"]["num_records"] == 1


def test_other_formats_are_stored_as_rgb_png_and_grey_jpeg_is_kept(tmp_path):
    root = tmp_path / "data" / "images"
    rgba = np.dstack([_pattern(12, 16, 1), np.full((12, 16), 7, np.uint8)])
    grey16 = (np.arange(12 * 16, dtype=np.uint16).reshape(12, 16) * 300)
    grey = _pattern(12, 16, 2)[..., 0]
    _write_image(str(root / "a_rgba.png"), rgba)
    _write_image(str(root / "b_grey16.png"), grey16)
    _write_image(str(root / "c.bmp"), _pattern(12, 16, 3))
    _write_image(str(root / "d_grey.jpg"), grey, quality=95)
    for name in ("a_rgba", "b_grey16", "c", "d_grey"):
        _write_image(str(tmp_path / "data" / "masks" / name) + ".png", _box_mask(12, 16))
    manifest = _build(sources.FolderSource(tmp_path / "data"), tmp_path / "out", num_shards=1)
    assert manifest["splits"]["train"]["counts"] == {"reencoded_images": 3}
    records = {r["id"]: r for r in _records(tmp_path / "out")}
    assert records["images/a_rgba.png"]["image_format"] == "png"
    np.testing.assert_array_equal(records["images/a_rgba.png"]["image_array"], rgba[..., :3])
    np.testing.assert_array_equal(records["images/b_grey16.png"]["image_array"],
                                  masks.to_rgb_uint8(grey16))
    np.testing.assert_array_equal(records["images/c.bmp"]["image_array"], _pattern(12, 16, 3))
    assert records["images/d_grey.jpg"]["image"] == (root / "d_grey.jpg").read_bytes()
    assert records["images/d_grey.jpg"]["image_array"].shape == (12, 16, 3)


class _HalfMask:
    """A test mask method: the left half of the image is foreground."""
    name = "left_half"

    def __init__(self, margin=0):
        self.params = {"margin": margin}

    def __call__(self, image):
        mask = np.zeros(image.shape[:2], np.uint8)
        mask[:, : image.shape[1] // 2] = 1
        return mask


def test_tfds_mock_dataset_with_a_mask_method(tmp_path, monkeypatch):
    tfds = pytest.importorskip("tensorflow_datasets")
    monkeypatch.setitem(masks._REGISTRY, "left_half", _HalfMask)
    with tfds.testing.mock_data(num_examples=5):
        source = tfds_source.TFDSSource("mnist", data_dir=str(tmp_path / "absent"))
        with pytest.raises(builder.BuildError, match="mask_method"):
            _build(source, tmp_path / "none")
        manifest = _build(source, tmp_path / "out", mask_method="left_half",
                          mask_params={"margin": 2})
    assert manifest["mask"] == {"method": "left_half", "params": {"margin": 2}}
    records = _records(tmp_path / "out")
    assert [r["id"] for r in records] == [f"mnist/train/{i:08d}" for i in range(5)]
    for record in records:
        assert record["image_format"] == "png" and record["mask_method"] == "left_half"
        assert record["mask_params"] == {"margin": 2}
        expected = np.zeros((28, 28), np.uint8)
        expected[:, :14] = 1
        np.testing.assert_array_equal(record["mask_array"], expected)
    assert sum(manifest["splits"]["train"]["class_counts"].values()) == 5


def test_cli_builds_the_synthetic_set(tmp_path):
    from absl import flags
    from harl_tf.cli import build_tfrecords
    argv = ["build_tfrecords", "--source=synthetic", "--num_images=4", "--image_size=16",
            "--num_shards=2", f"--output_dir={tmp_path}", "--num_workers=1", "--noprogress"]
    flags.FLAGS.unparse_flags()
    try:
        flags.FLAGS(argv)
        assert build_tfrecords.main([argv[0]]) == 0
    finally:
        flags.FLAGS.unparse_flags()
    manifest = json.loads((tmp_path / "manifest.json").read_text())
    assert manifest["splits"]["train"]["num_records"] == 4 and manifest["complete"]
