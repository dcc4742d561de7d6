"""Example sources: folder layout rules, the synthetic source, TFDS on mock data."""
import io
import os

import numpy as np
import pytest
from PIL import Image

from harl_tf.data import shards, sources, synthetic, tfds_source


def _jpeg(path, height=12, width=16, value=100):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    Image.fromarray(np.full((height, width, 3), value, np.uint8)).save(path, quality=90)


def _mask(path, height=12, width=16):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    mask = np.zeros((height, width), np.uint8)
    mask[3:9, 4:12] = 255
    Image.fromarray(mask).save(path)


def _cutouts_like(root, classes=("zebra", "apple"), per_class=2, splits=("train", "test")):
    for split in splits:
        for c in classes:
            for i in range(per_class):
                _jpeg(root / split / "images" / c / f"{i:03d}.jpg")
                _mask(str(root / split / "masks" / c / f"{i:03d}.png"))


def test_class_folders_give_sorted_labels_shared_by_all_splits(tmp_path):
    _cutouts_like(tmp_path)
    source = sources.FolderSource(tmp_path)
    assert source.split_names() == ["train", "test"]
    assert source.class_names() == ["apple", "zebra"]
    refs = source.list_refs("test")
    assert [r.id for r in refs] == ["test/images/apple/000.jpg", "test/images/apple/001.jpg",
                                    "test/images/zebra/000.jpg", "test/images/zebra/001.jpg"]
    assert [r.label for r in refs] == [0, 0, 1, 1]


def test_classes_txt_sets_the_label_order(tmp_path):
    _cutouts_like(tmp_path)
    (tmp_path / "classes.txt").write_text("zebra\napple\n")
    source = sources.FolderSource(tmp_path, splits=["train"])
    assert source.class_names() == ["zebra", "apple"]
    labels = {r.id.split("/")[2]: r.label for r in source.list_refs("train")}
    assert labels == {"zebra": 0, "apple": 1}


def test_class_folder_missing_from_classes_txt_is_an_error(tmp_path):
    _cutouts_like(tmp_path)
    (tmp_path / "classes.txt").write_text("zebra\n")
    with pytest.raises(sources.SourceError, match=r"apple.*classes\.txt"):
        sources.FolderSource(tmp_path)


def test_default_mask_rule_replaces_images_by_masks_and_the_extension(tmp_path):
    _cutouts_like(tmp_path)
    source = sources.FolderSource(tmp_path)
    image = str(tmp_path / "train" / "images" / "apple" / "000.jpg")
    assert source.mask_path(image) == str(tmp_path / "train" / "masks" / "apple" / "000.png")


def test_masks_dir_mirrors_images_dir(tmp_path):
    _jpeg(tmp_path / "pics" / "a.jpg")
    _mask(str(tmp_path / "m" / "a_mask.png"))
    source = sources.FolderSource(tmp_path / "pics", masks_dir=tmp_path / "m",
                                  mask_suffix="_mask.png")
    assert source.split_names() == ["train"] and source.class_names() == []
    (ref,) = source.list_refs("train")
    assert (ref.id, ref.label) == ("a.jpg", -1)  # flat folder: label unknown
    raw = source.load(ref)
    assert raw.mask_name == str(tmp_path / "m" / "a_mask.png")
    assert raw.image_bytes == (tmp_path / "pics" / "a.jpg").read_bytes()


def test_missing_mask_is_an_error_naming_both_files(tmp_path):
    _cutouts_like(tmp_path, splits=("train",))
    os.remove(tmp_path / "train" / "masks" / "zebra" / "001.png")
    source = sources.FolderSource(tmp_path)
    with pytest.raises(sources.SourceError) as err:
        source.list_refs("train")
    message = str(err.value)
    assert str(tmp_path / "train" / "images" / "zebra" / "001.jpg") in message
    assert str(tmp_path / "train" / "masks" / "zebra" / "001.png") in message
    assert "1 of 4" in message
    assert len(source.list_refs("train", need_masks=False)) == 4  # a mask method needs none


def test_empty_folder_is_an_error(tmp_path):
    (tmp_path / "train").mkdir()
    (tmp_path / "train" / "notes.txt").write_text("no images here")
    with pytest.raises(sources.SourceError, match="no images"):
        sources.FolderSource(tmp_path).list_refs("train")


def test_unknown_split_folder_is_an_error(tmp_path):
    _cutouts_like(tmp_path, splits=("train",))
    with pytest.raises(sources.SourceError, match="validation"):
        sources.FolderSource(tmp_path, splits=["train", "validation"])


def test_synthetic_source_matches_the_embedded_set(tmp_path):
    source = sources.SyntheticSource(5, image_size=32, seed=3, num_test_images=2,
                                     image_format="png")
    train, test = source.list_refs("train"), source.list_refs("test")
    assert [r.key for r in train] == [0, 1, 2, 3, 4] and [r.key for r in test] == [5, 6]
    assert [r.label for r in train] == [synthetic.label_for(i, 3) for i in range(5)]
    raw = source.load(test[1])
    image, mask, label = synthetic.render(6, 32, 3)
    np.testing.assert_array_equal(np.asarray(Image.open(io.BytesIO(raw.image_bytes))), image)
    np.testing.assert_array_equal(raw.mask, mask)
    assert raw.label == label == test[1].label
    assert source.default_mask_method == "ground_truth"


def test_synthetic_source_style_reaches_the_images_and_the_build_options():
    upright = sources.SyntheticSource(3, image_size=32, seed=3, image_format="png",
                                      style="upright")
    raw = upright.load(upright.list_refs("train")[2])
    image, mask, _ = synthetic.render(2, 32, 3, style="upright")
    np.testing.assert_array_equal(np.asarray(Image.open(io.BytesIO(raw.image_bytes))), image)
    np.testing.assert_array_equal(raw.mask, mask)
    # A build of one style never resumes as the other; the default keeps older builds' key.
    assert upright.content_options()["style"] == "upright"
    assert "style" not in sources.SyntheticSource(3, image_size=32).content_options()
    with pytest.raises(sources.SourceError, match="--synthetic_style.*'tilted'"):
        sources.SyntheticSource(3, style="tilted")


def test_tfds_source_reads_mock_mnist_without_download(tmp_path):
    tfds = pytest.importorskip("tensorflow_datasets")
    with tfds.testing.mock_data(num_examples=6):
        source = tfds_source.TFDSSource("mnist", data_dir=str(tmp_path / "absent"))
        refs = source.list_refs("train", need_masks=False)
        assert [r.id for r in refs] == [f"mnist/train/{i:08d}" for i in range(6)]
        assert source.class_names() == [str(i) for i in range(10)]
        examples = list(source.read("train", refs[2:5]))
        assert [e.id for e in examples] == [r.id for r in refs[2:5]]
        for example in examples:
            assert example.image_bytes.startswith(b"\x89PNG")  # stored bytes, undecoded
            assert 0 <= example.label < 10
        with pytest.raises(sources.SourceError, match="mask_method"):
            source.list_refs("train")  # TFDS has no masks


def test_shard_bounds_cover_every_example_once():
    bounds = shards.shard_bounds(10, 3)
    assert bounds == [(0, 3), (3, 6), (6, 10)]
    assert shards.estimate_num_shards(1 << 20, 1000, target_shard_mb=100, min_shards=1) == 10
    assert shards.estimate_num_shards(10, 5, target_shard_mb=100, min_shards=8) == 5
