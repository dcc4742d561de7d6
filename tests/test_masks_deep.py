"""The deep mask method: frozen encoder + 1×1 saliency head trained on pseudo-masks."""
import json
import os
import subprocess
import sys

import keras
import numpy as np
import pytest
import tensorflow as tf
from PIL import Image

from harl_tf import masks
from harl_tf.data import synthetic
from harl_tf.masks import deep, quality

SIZE = 48
RED = (1.0, 0.1, 0.1)

if "deep" not in masks.available_methods():  # until masks/__init__.py registers it
    masks.register_method("deep", "harl_tf.masks.deep:DeepSaliencyMasks")


def _mean_iou(predicted, reference):
    return quality.evaluate_arrays(predicted, reference).mean_iou


def _red_objects(indices):
    """Synthetic scenes whose object is painted flat red: a colour feature separates the
    object from its cluttered background, so a linear 1×1 head *can* fit the masks."""
    images, object_masks = [], []
    for i in indices:
        image, mask, _ = synthetic.render(i, SIZE, seed=0, object_fill=RED)
        images.append(image)
        object_masks.append(mask)
    return images, object_masks


def _colour_encoder():
    """A fixed stand-in encoder: 2×2 average colour, stride 2 (feature map 24×24×3)."""
    model = keras.Sequential([keras.Input((None, None, 3)), keras.layers.AveragePooling2D(2)],
                             name="colour")
    return deep.FrozenEncoder.from_keras(model, note="test stand-in: mean colour")


@pytest.fixture(scope="module")
def trained():
    images, pseudo = _red_objects(range(40))
    model = deep.train_saliency_head(
        _colour_encoder(), images, pseudo, input_size=SIZE,
        config=deep.TrainConfig(epochs=30, learning_rate=0.05, self_training_rounds=1),
        progress=False, provenance={"pseudo_masks": "synthetic ground truth"})
    return model, images, pseudo


def _constant_model(probability, input_size=SIZE):
    logit = float(np.log(probability / (1 - probability)))
    head = deep.SaliencyHead(kernel=np.zeros((1, 1, 3, 1)), bias=[logit])
    return deep.SaliencyModel(_colour_encoder(), head, input_size=input_size)


def test_head_fits_its_pseudo_labels(trained):
    model, images, pseudo = trained
    method = masks.get_method("deep", model=model, progress=False)
    predicted = method.predict_arrays(images)
    train_iou = _mean_iou(predicted, pseudo)
    assert train_iou >= 0.8
    history = model.training["history"]
    assert [h["labels"] for h in history] == ["pseudo_masks", "self_training_confident"]
    assert history[-1]["pseudo_mask_iou"] == pytest.approx(train_iou, abs=1e-6)
    # and it generalises to unseen scenes of the same kind
    held_out, held_out_masks = _red_objects(range(100, 120))
    assert _mean_iou(method.predict_arrays(held_out), held_out_masks) >= 0.75
    # a head that predicts nothing would score far lower: the IoU measures real fitting
    empty = [np.zeros_like(m) for m in pseudo]
    assert _mean_iou(empty, pseudo) == 0.0


def test_threshold_is_strictly_above_half():
    image = np.full((20, 30, 3), 128, np.uint8)
    above = masks.get_method("deep", model=_constant_model(0.51))
    below = masks.get_method("deep", model=_constant_model(0.49))
    assert above.params["threshold"] == 0.5
    np.testing.assert_array_equal(above(image), np.ones((20, 30), np.uint8))
    np.testing.assert_array_equal(below(image), np.zeros((20, 30), np.uint8))
    strict = masks.get_method("deep", model=_constant_model(0.51), threshold=0.6)
    assert strict.params["threshold"] == 0.6 and not strict(image).any()
    trained_strict = _constant_model(0.51)
    trained_strict.threshold = 0.6  # a model's own threshold is the method's default
    assert not masks.get_method("deep", model=trained_strict)(image).any()


def test_cell_targets_ignore_the_uncertain_band():
    mask = np.zeros((8, 8), np.uint8)
    mask[:4, :4] = 1            # cell (0, 0): fraction 1
    mask[:4, 4:6] = 1           # cell (0, 1): fraction 0.5 -> ignored
    mask[4:7, 4] = 1            # cell (1, 1): fraction 3/16 <= 0.2 -> background
    targets, weights = deep.cell_targets([mask], (2, 2))
    np.testing.assert_array_equal(targets[0], [[1, 1], [0, 0]])
    np.testing.assert_array_equal(weights[0], [[1, 0], [1, 1]])
    _, all_labelled = deep.cell_targets([mask], (2, 2), ignore_low=0.5, ignore_high=0.5)
    assert all_labelled.min() == 1


def test_self_training_labels_only_confident_cells():
    p = np.array([[0.1, 0.3, 0.5, 0.7, 0.9]])
    targets, weights = deep.confident_targets(p, low=0.2, high=0.8)
    np.testing.assert_array_equal(targets, [[0, 0, 0, 1, 1]])
    np.testing.assert_array_equal(weights, [[1, 0, 0, 0, 1]])


def test_fit_head_is_a_conv_on_raw_features():
    rng = np.random.default_rng(0)
    z = rng.normal(size=(16, 4, 4, 2)).astype(np.float32)
    labels = (z[..., 0] - 0.5 * z[..., 1] > 0.2).astype(np.float32)
    raw = z * np.float32([1000.0, 0.01]) + np.float32([500.0, -3.0])  # badly scaled
    head, _ = deep.fit_head(raw, labels, np.ones_like(labels), epochs=60,
                            learning_rate=0.05, batch_cells=64)
    accuracy = ((head(raw).numpy() > 0.5) == (labels > 0)).mean()
    assert accuracy >= 0.97


def test_save_load_round_trip_gives_identical_masks(trained, tmp_path):
    model, images, _ = trained
    path = str(tmp_path / "mask_model")
    model.save(path)
    model.save(path)  # overwriting a saved model is allowed
    assert sorted(os.listdir(tmp_path)) == ["mask_model"]  # no temporary left behind
    assert sorted(os.listdir(path)) == ["encoder", "head_weights.npz", "saliency_head.json"]
    with open(os.path.join(path, deep.CONFIG_FILE)) as f:
        config = json.load(f)
    assert config["threshold"] == 0.5 and config["input_size"] == SIZE
    assert config["encoder"]["path"] == "encoder" and config["encoder"]["kind"] == "keras"
    assert config["training"]["config"]["self_training_rounds"] == 1
    assert config["training"]["provenance"] == {"pseudo_masks": "synthetic ground truth"}

    loaded = masks.get_method("deep", model_path=path, progress=False)
    assert loaded.params["model_path"] == os.path.abspath(path)
    in_memory = masks.get_method("deep", model=model, progress=False)
    for a, b in zip(loaded.predict_arrays(images[:8]), in_memory.predict_arrays(images[:8])):
        np.testing.assert_array_equal(a, b)

    # a loaded model saves again (its embedded encoder is copied along)
    resaved = str(tmp_path / "resaved")
    loaded.model.save(resaved)
    again = masks.get_method("deep", model_path=resaved, progress=False)
    np.testing.assert_array_equal(again(images[0]), in_memory(images[0]))

    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "keep.txt").write_text("x")
    with pytest.raises(FileExistsError, match="other"):
        model.save(str(tmp_path / "other"))


def test_accepts_an_exported_encoder_savedmodel(tmp_path):
    from harl_tf.models.resnet import build_encoder
    resnet = build_encoder(dict(depth=18, width_multiplier=0.125, small_stem=True,
                                output_stride=8))
    export = str(tmp_path / "export")
    deep.FrozenEncoder.from_keras(resnet, random_init=True).save(export)  # saved_encoder
    encoder = deep.FrozenEncoder.from_saved_model(export)
    images = tf.random.uniform((2, 32, 40, 3), seed=1)
    np.testing.assert_allclose(encoder(images).numpy(),
                               resnet(images, training=False).numpy(), atol=1e-5)
    assert encoder.description["export_config"]["encoder_config"] == resnet.config
    with pytest.raises(FileNotFoundError, match="no saved_model.pb"):
        deep.FrozenEncoder.from_saved_model(str(tmp_path))


def test_an_export_kept_without_its_savedmodel_gives_the_same_features(tmp_path):
    """bench.keep_encoders keeps exports as metadata + Keras weights: from_export rebuilds the
    encoder from them, with the SavedModel's features; a mask model refers to it by path
    (nothing copied) and loads back with identical masks."""
    import shutil
    from harl_tf.models.resnet import build_encoder
    resnet = build_encoder(dict(depth=18, width_multiplier=0.125, small_stem=True,
                                output_stride=8))
    export, kept = str(tmp_path / "export"), tmp_path / "kept"
    deep.FrozenEncoder.from_keras(resnet, random_init=True).save(export)
    kept.mkdir()
    for name in ("harl_export.json", "encoder.weights.h5"):
        shutil.copy(os.path.join(export, name), kept / name)
    images = tf.random.uniform((2, 32, 40, 3), seed=1)
    full, weights_only = deep.FrozenEncoder.from_export(export), \
        deep.FrozenEncoder.from_export(str(kept))
    assert full.description["kind"] == "saved_model"
    assert weights_only.description["kind"] == "export_weights"
    np.testing.assert_allclose(weights_only(images).numpy(), full(images).numpy(), atol=1e-5)
    channels = int(full(images).shape[-1])
    head = deep.SaliencyHead(kernel=np.linspace(-1, 1, channels).reshape(1, 1, channels, 1),
                             bias=[0.1])
    model = deep.SaliencyModel(weights_only, head, input_size=32)
    model.save(str(tmp_path / "mask_model"))
    assert sorted(os.listdir(tmp_path / "mask_model")) == ["head_weights.npz",
                                                          "saliency_head.json"]
    again = deep.SaliencyModel.load(str(tmp_path / "mask_model"))
    square = images[:, :, :32]
    np.testing.assert_array_equal(again.probabilities(square).numpy(),
                                  model.probabilities(square).numpy())
    assert again.encoder.description["kind"] == "export_weights"
    with pytest.raises(FileNotFoundError, match="not an export directory"):
        deep.FrozenEncoder.from_export(str(tmp_path))


def test_odd_inputs_give_masks_at_the_image_size(trained):
    model, images, _ = trained
    method = masks.get_method("deep", model=model, progress=False)
    rgb = images[0]
    grey = rgb.mean(axis=-1).astype(np.uint8)
    rgba = np.concatenate([rgb, np.full(rgb.shape[:2] + (1,), 7, np.uint8)], axis=-1)
    np.testing.assert_array_equal(method(rgba), method(rgb))
    np.testing.assert_array_equal(method(grey), method(np.repeat(grey[..., None], 3, -1)))
    np.testing.assert_array_equal(method(grey[..., None]), method(grey))
    wide = np.asarray(Image.fromarray(rgb).resize((70, 30)))
    result = method.compute(wide)
    assert result.mask.shape == (30, 70) and result.mask.dtype == np.uint8
    assert set(np.unique(result.mask)) <= {0, 1} and result.fallback is None


def test_files_are_batched_and_match_single_calls(trained, tmp_path):
    model, images, _ = trained
    method = masks.get_method("deep", model=model, batch_size=3, progress=False)
    paths = []
    for i, image in enumerate(images[:5]):
        if i == 1:
            image = np.asarray(Image.fromarray(image).resize((60, 36)))
        if i == 2:
            image = image.mean(axis=-1).astype(np.uint8)  # a grey PNG
        path = str(tmp_path / f"{i}.png")
        Image.fromarray(image).save(path)
        paths.append(path)
    results = list(method.predict_files(paths))
    assert [p for p, _ in results] == paths
    Image.fromarray(images[0]).save(tmp_path / "0.tif")  # TF cannot decode TIFF: PIL path
    tiff = dict(method.predict_files([str(tmp_path / "0.tif"), paths[2]]))
    np.testing.assert_array_equal(tiff[str(tmp_path / "0.tif")], results[0][1])
    np.testing.assert_array_equal(tiff[paths[2]], results[2][1])
    for path, mask in results:
        expected = method(np.asarray(Image.open(path)))
        np.testing.assert_array_equal(mask, expected)
    assert results[1][1].shape == (36, 60)
    with pytest.raises(FileNotFoundError, match="missing.png"):
        list(method.predict_files([str(tmp_path / "missing.png")]))


def test_training_tool_on_an_exported_encoder_and_mask_folders(tmp_path):
    images, object_masks = _red_objects(range(24))
    for i, (image, mask) in enumerate(zip(images, object_masks)):
        for kind, array in (("images", image), ("masks", mask * 255)):
            folder = tmp_path / kind / f"class{i % 2}"
            folder.mkdir(parents=True, exist_ok=True)
            Image.fromarray(array).save(folder / f"{i:03d}.png")
    export = str(tmp_path / "export")
    _colour_encoder().save(export)  # any SavedModel with the export signature will do
    output = str(tmp_path / "deep_model")
    tool = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                        "tools", "train_saliency_head.py")
    done = subprocess.run(  # a subprocess: another tool may define the same absl flags
        [sys.executable, tool, f"--encoder={export}", f"--images_dir={tmp_path / 'images'}",
         f"--pseudo_masks_dir={tmp_path / 'masks'}", f"--output={output}",
         f"--image_size={SIZE}", "--epochs=30", "--learning_rate=0.05"],
        capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "round 0 (pseudo_masks)" in done.stdout
    with open(os.path.join(output, deep.CONFIG_FILE)) as f:
        config = json.load(f)
    assert config["encoder"]["path"] == os.path.abspath(export)  # referenced, not copied
    assert config["training"]["provenance"]["pseudo_masks_dir"] == str(tmp_path / "masks")
    assert config["training"]["num_images"] == 24
    method = masks.get_method("deep", model_path=output, progress=False)
    assert _mean_iou(method.predict_arrays(images), object_masks) >= 0.8


def test_mask_generation_does_not_import_downstream_evaluation():
    """The encoder contract lives in harl_tf.saved_encoder, below both masks and downstream."""
    code = ("import sys; from harl_tf.masks import deep; deep.DeepSaliencyMasks; "
            "print(sorted(m for m in sys.modules if m.startswith('harl_tf.downstream')))")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.strip() == "[]"
