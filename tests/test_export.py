"""Export of the online encoder: a SavedModel that any TensorFlow process can load and that
computes exactly what the trained encoder computes, at any image size."""
import json
import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest

from _export_helpers import make_model_dir
from harl_tf import saved_encoder
from harl_tf.models import resnet

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SIZES = ((32, 32), (40, 56))  # two image sizes, one not square
ENV = dict(os.environ, PYTHONPATH=ROOT, TF_CPP_MIN_LOG_LEVEL="3", CUDA_VISIBLE_DEVICES="")

FRESH_PROCESS = textwrap.dedent("""
    import json, sys
    import numpy as np, tensorflow as tf, keras
    export_dir, inputs_path, outputs_path = sys.argv[1:]
    inputs = np.load(inputs_path)
    loaded = tf.saved_model.load(export_dir)
    signature = loaded.signatures["serving_default"]
    layer = keras.layers.TFSMLayer(export_dir, call_endpoint="serving_default")
    masked = loaded.signatures["object_embeddings"]
    outputs, info = {}, {}
    for key in (k for k in inputs.files if not k.startswith("mask/")):
        images = tf.constant(inputs[key])
        for name, value in signature(images=images).items():
            outputs[f"saved_model/{key}/{name}"] = value.numpy()
        for name, value in layer(images).items():
            outputs[f"tfsm_layer/{key}/{name}"] = np.asarray(value)
        masks = inputs["mask/" + key]  # float32 [B, H, W, 1]
        for name, value in masked(images=images, masks=tf.constant(masks)).items():
            outputs[f"masked/{key}/{name}"] = value.numpy()
        uint8 = tf.constant(masks[..., 0].astype(np.uint8))  # [B, H, W] uint8 {0, 1}
        for name, value in loaded.object_embeddings(images=images, masks=uint8).items():
            outputs[f"masked_uint8/{key}/{name}"] = value.numpy()
    try:
        masked(images=images, masks=tf.constant(masks[:, :-8]))
        info["wrong_size"] = None
    except tf.errors.InvalidArgumentError as e:
        info["wrong_size"] = e.message
    np.savez(outputs_path, **outputs)
    _, kwargs = signature.structured_input_signature
    info["signatures"] = sorted(loaded.signatures)
    info["inputs"] = {k: [v.shape.as_list(), v.dtype.name] for k, v in kwargs.items()}
    info["outputs"] = {k: [v.shape.as_list(), v.dtype.name]
                       for k, v in signature.structured_outputs.items()}
    _, kwargs = masked.structured_input_signature
    info["masked_inputs"] = {k: [v.shape.as_list(), v.dtype.name] for k, v in kwargs.items()}
    info["trainable"] = sorted(v.name for v in loaded.trainable_variables)
    info["non_trainable"] = sorted(v.name for v in loaded.non_trainable_variables)
    info["layer_trainable"] = len(layer.trainable_weights)
    print(json.dumps(info))
""")


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("pretrain")
    weights = make_model_dir(path, steps=(7, 12))
    return str(path), weights


@pytest.fixture(scope="module")
def exported(model_dir, tmp_path_factory):
    export_dir = str(tmp_path_factory.mktemp("exports") / "harl")
    metadata = saved_encoder.export_from_model_dir(model_dir[0], export_dir)
    return export_dir, metadata


def trained_encoder(weights, output_stride):
    """The encoder as training knows it (pretraining config, checkpoint weights), at the
    export's output stride."""
    encoder = resnet.build_encoder({"depth": 18, "width_multiplier": 0.25, "small_stem": True,
                                    "output_stride": output_stride})
    for v in encoder.variables:
        v.assign(weights[v.path.split("/", 1)[1]])
    return encoder


def numpy_regions(feature_map, masks):
    """Plain numpy HARL pooling (SPEC section 4) of ``feature_map`` [B, h, w, C] over
    binary ``masks`` [B, H, W, 1] (H, W multiples of h, w): soft mask m = block means,
    fg = Σ h·m / (Σ m + 1e-6), bg likewise with 1 − m, global = mean."""
    b, h, w, _ = feature_map.shape
    soft = masks.reshape(b, h, masks.shape[1] // h, w, masks.shape[2] // w).mean(axis=(2, 4))
    soft = soft[..., None].astype(np.float64)
    fm = feature_map.astype(np.float64)
    return {"foreground": (fm * soft).sum(axis=(1, 2)) / (soft.sum(axis=(1, 2)) + 1e-6),
            "background": (fm * (1 - soft)).sum(axis=(1, 2)) / ((1 - soft).sum(axis=(1, 2))
                                                                 + 1e-6),
            "global": fm.mean(axis=(1, 2)), "foreground_fraction": soft.mean(axis=(1, 2, 3))}


def test_export_writes_savedmodel_weights_and_metadata(model_dir, exported):
    export_dir, metadata = exported
    for name in ("saved_model.pb", "variables", "encoder.weights.h5", "harl_export.json"):
        assert os.path.exists(os.path.join(export_dir, name)), name
    with open(os.path.join(export_dir, "harl_export.json")) as f:
        on_disk = json.load(f)
    assert on_disk == json.loads(json.dumps(metadata))
    assert on_disk["source"]["step"] == 12  # the latest checkpoint
    assert on_disk["source"]["checkpoint"].endswith(os.path.join("checkpoints", "ckpt-12"))
    assert on_disk["source"]["model_dir"] == os.path.abspath(model_dir[0])
    # By default the stride it was pretrained at: small stem, output stride 16 = 4 x 4.
    assert on_disk["pretrain_output_stride"] == 16
    assert on_disk["output_stride"] == on_disk["encoder_config"]["output_stride"] == 16
    assert on_disk["feature_dim"] == 128 and on_disk["total_stride"] == 4
    assert on_disk["inputs"]["images"]["range"] == [0.0, 1.0]
    assert on_disk["object_embeddings"]["inputs"]["masks"]["shape"] == [None, None, None, 1]
    assert on_disk["normalization"]["mean"] == list(resnet.IMAGENET_MEAN)
    assert on_disk["versions"]["tensorflow"].startswith("2.")
    assert on_disk["batchnorm_training"] is False
    leftovers = [n for n in os.listdir(os.path.dirname(export_dir)) if n.startswith(".")]
    assert not leftovers


def test_fresh_process_loads_the_same_function_at_two_sizes(model_dir, exported, tmp_path):
    """Both signatures after ``tf.saved_model.load`` in a new process: ``serving_default``
    computes the trained encoder, ``object_embeddings`` its HARL pooling over the masks
    (equal to a numpy pooling), and a mask of another size is one clear error."""
    export_dir, _ = exported
    rng = np.random.default_rng(0)
    inputs = {f"{h}x{w}": rng.random((2, h, w, 3), dtype=np.float32) for h, w in SIZES}
    for key, images in list(inputs.items()):  # an object in a box, and random pixels
        masks = np.zeros(images.shape[:3] + (1,), np.float32)
        masks[0, 4:21, 6:30] = 1.0
        masks[1] = rng.random(masks.shape[1:]) < 0.3
        inputs["mask/" + key] = masks
    np.savez(tmp_path / "inputs.npz", **inputs)
    script = tmp_path / "load.py"
    script.write_text(FRESH_PROCESS)
    result = subprocess.run(
        [sys.executable, str(script), export_dir, str(tmp_path / "inputs.npz"),
         str(tmp_path / "outputs.npz")], capture_output=True, text=True, env=ENV, timeout=120)
    assert result.returncode == 0, result.stderr[-3000:]
    info = json.loads(result.stdout.strip().splitlines()[-1])
    outputs = np.load(tmp_path / "outputs.npz")

    encoder = trained_encoder(model_dir[1][12], output_stride=16)
    for h, w in SIZES:
        key = f"{h}x{w}"
        images = inputs[key]
        feature_map = encoder(images, training=False).numpy()
        assert feature_map.shape == (2, h // 4, w // 4, 128)
        for loader in ("saved_model", "tfsm_layer"):
            got_map = outputs[f"{loader}/{key}/feature_map"]
            got_embedding = outputs[f"{loader}/{key}/embedding"]
            assert got_map.shape == feature_map.shape
            assert np.max(np.abs(got_map - feature_map)) <= 1e-5, (loader, key)
            assert np.max(np.abs(got_embedding - feature_map.mean(axis=(1, 2)))) <= 1e-5
        want = numpy_regions(feature_map, inputs["mask/" + key])
        assert 0.05 < want["foreground_fraction"].min() < 0.5  # both regions non-trivial
        # The regions differ by 1000x the tolerance, so pooling the wrong one would fail.
        assert np.max(np.abs(want["foreground"] - want["background"])) > 0.01
        for loader in ("masked", "masked_uint8"):
            for name, value in want.items():
                got = outputs[f"{loader}/{key}/{name}"]
                assert got.shape == value.shape, (loader, name)
                assert np.max(np.abs(got - value)) <= 1e-5, (loader, key, name)

    assert info["signatures"] == ["object_embeddings", "serving_default"]
    assert info["inputs"] == {"images": [[None, None, None, 3], "float32"]}
    assert info["outputs"] == {"embedding": [[None, 128], "float32"],
                               "feature_map": [[None, None, None, 128], "float32"]}
    assert info["masked_inputs"] == {"images": [[None, None, None, 3], "float32"],
                                     "masks": [[None, None, None, 1], "float32"]}
    assert "masks must have the batch size, height and width of the images" in info["wrong_size"]
    # Kernels, gammas and betas stay trainable; BatchNorm moving statistics do not.
    trainable = {v.path + ":0" for v in encoder.trainable_variables}
    assert set(info["trainable"]) == trainable and len(trainable) == 60
    assert all("moving" in name for name in info["non_trainable"])
    assert len(info["non_trainable"]) == 40
    assert info["layer_trainable"] == 60


def test_named_step_and_a_converted_output_stride(model_dir, tmp_path):
    """A stride is converted only when asked: the stride-16 encoder exported at 32 has the
    same weights and a feature map of a quarter of the cells."""
    export_dir = str(tmp_path / "step7")
    metadata = saved_encoder.export_from_model_dir(model_dir[0], export_dir, step=7,
                                                   output_stride=32)
    assert metadata["source"]["step"] == 7
    assert metadata["output_stride"] == 32 and metadata["total_stride"] == 8
    assert metadata["pretrain_output_stride"] == 16
    import tensorflow as tf
    loaded = tf.saved_model.load(export_dir)
    images = np.random.default_rng(1).random((1, 32, 32, 3), dtype=np.float32)
    got = loaded.signatures["serving_default"](images=tf.constant(images))["feature_map"]
    want = trained_encoder(model_dir[1][7], output_stride=32)(images, training=False)
    assert got.shape == (1, 4, 4, 128)
    assert np.max(np.abs(got.numpy() - want.numpy())) <= 1e-5


def test_the_binary_keeps_the_pretraining_stride_by_default(tmp_path, monkeypatch):
    """``python -m harl_tf.export`` without --output_stride exports a stride-8 model_dir
    (the fmnist-scenes 8x8 recipe's stride) at stride 8: its feature map has the cells
    evaluation saw during training, not the 4x fewer of a stride-32 conversion."""
    import _export_helpers
    import tensorflow as tf
    monkeypatch.setattr(_export_helpers, "TINY_CONFIG",
                        dict(_export_helpers.TINY_CONFIG, output_stride=8))
    weights = make_model_dir(tmp_path / "run", steps=(3,))
    export_dir = tmp_path / "export"
    result = subprocess.run(
        [sys.executable, "-m", "harl_tf.export", f"--model_dir={tmp_path / 'run'}",
         f"--export_dir={export_dir}"], capture_output=True, text=True, env=ENV, timeout=120)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "output stride 8," in result.stdout
    with open(export_dir / "harl_export.json") as f:
        assert json.load(f)["output_stride"] == 8
    images = np.random.default_rng(2).random((1, 32, 32, 3), dtype=np.float32)
    loaded = tf.saved_model.load(str(export_dir))
    got = loaded.signatures["serving_default"](images=tf.constant(images))["feature_map"]
    assert got.shape == (1, 16, 16, 128)  # small stem: 32 px / (8 / 4); stride 32: 4 x 4
    want = trained_encoder(weights[3], output_stride=8)(images, training=False)
    assert np.max(np.abs(got.numpy() - want.numpy())) <= 1e-5


def test_mask_of_another_size_is_one_clear_error(exported):
    """At the Python API a mask that does not fit its images is a MaskError naming both
    shapes (inside the SavedModel: the assertion of the fresh-process test)."""
    import tensorflow as tf
    from harl_tf.downstream import encoder_source
    encoder = encoder_source.load_encoder(exported[0]).encoder
    images = np.zeros((2, 32, 32, 3), np.float32)
    with pytest.raises(saved_encoder.MaskError,
                       match=r"batch size, height and width of the images.*masks "
                             r"\(2, 24, 32, 1\) for images \(2, 32, 32, 3\)"):
        saved_encoder.object_embeddings(encoder, images, np.ones((2, 24, 32, 1), np.float32))
    with pytest.raises(saved_encoder.MaskError, match=r"values in \[0, 1\].*255"):
        saved_encoder.object_embeddings(encoder, images,
                                        np.full((2, 32, 32), 255, np.uint8))
    with pytest.raises(saved_encoder.MaskError, match=r"\[batch, height, width, 1\]"):
        saved_encoder.object_embeddings(encoder, images, np.ones((2, 32, 32, 3)))
    assert issubclass(saved_encoder.MaskError, saved_encoder.HarlError)
    got = saved_encoder.object_embeddings(encoder, images, tf.ones((2, 32, 32)))
    assert set(got) == {"foreground", "background", "global", "foreground_fraction"}


def test_existing_export_dir_is_refused_unless_overwrite(model_dir, exported):
    export_dir, _ = exported
    with pytest.raises(saved_encoder.ExportError, match="already exists.*--overwrite"):
        saved_encoder.export_from_model_dir(model_dir[0], export_dir)
    result = subprocess.run(
        [sys.executable, "-m", "harl_tf.export", f"--model_dir={model_dir[0]}",
         f"--export_dir={export_dir}"], capture_output=True, text=True, env=ENV, timeout=60)
    assert result.returncode != 0
    message = result.stderr.strip().splitlines()
    assert len(message) == 1 and "--export_dir" in message[0] and "--overwrite" in message[0]


def test_failed_overwrite_keeps_the_old_export_and_overwrite_replaces_it(
        model_dir, tmp_path, monkeypatch):
    export_dir = tmp_path / "harl"
    export_dir.mkdir()
    (export_dir / "old.txt").write_text("previous export")

    def crash_half_way(obj, directory, signatures=None):
        with open(os.path.join(directory, "saved_model.pb"), "wb") as f:
            f.write(b"half written")
        raise OSError("disk full")
    with monkeypatch.context() as patch:
        patch.setattr(saved_encoder.tf.saved_model, "save", crash_half_way)
        with pytest.raises(OSError, match="disk full"):
            saved_encoder.export_from_model_dir(model_dir[0], str(export_dir), overwrite=True)
    assert sorted(os.listdir(tmp_path)) == ["harl"]  # the half-written copy is gone
    assert os.listdir(export_dir) == ["old.txt"]  # and the old export is untouched

    metadata = saved_encoder.export_from_model_dir(model_dir[0], str(export_dir), step=7,
                                                overwrite=True)
    with open(export_dir / "harl_export.json") as f:
        assert json.load(f)["source"]["step"] == metadata["source"]["step"] == 7
    assert not (export_dir / "old.txt").exists()
    assert sorted(os.listdir(tmp_path)) == ["harl"]  # no temporary or old copies left


def test_missing_checkpoint_names_the_model_dir(tmp_path):
    empty = tmp_path / "run"
    empty.mkdir()
    with pytest.raises(saved_encoder.ExportError, match=f"--model_dir={empty}"):
        saved_encoder.export_from_model_dir(str(empty), str(tmp_path / "out"))
    assert not (tmp_path / "out").exists()
    result = subprocess.run(
        [sys.executable, "-m", "harl_tf.export", f"--model_dir={tmp_path / 'nope'}",
         f"--export_dir={tmp_path / 'out'}"], capture_output=True, text=True, env=ENV,
        timeout=60)
    assert result.returncode != 0
    assert f"--model_dir={tmp_path / 'nope'} does not exist" in result.stderr


def test_missing_step_lists_available_steps(model_dir, tmp_path):
    with pytest.raises(saved_encoder.ExportError, match=r"step 99.*\[7, 12\]"):
        saved_encoder.export_from_model_dir(model_dir[0], str(tmp_path / "out"), step=99)


def test_batchnorm_training_export_uses_batch_statistics(tmp_path):
    import tensorflow as tf
    from _export_helpers import TINY_CONFIG, randomize
    encoder = resnet.build_encoder(dict(TINY_CONFIG, name="encoder"))
    randomize(encoder, seed=4)
    images = np.random.default_rng(2).random((4, 32, 32, 3), dtype=np.float32)
    inference = encoder(images, training=False).numpy()
    metadata = saved_encoder.export_encoder(encoder, str(tmp_path / "bn"),
                                         encoder_config=encoder.config, output_stride=None,
                                         batchnorm_training=True)
    assert metadata["batchnorm_training"] is True
    loaded = tf.saved_model.load(str(tmp_path / "bn"))
    got = loaded.signatures["serving_default"](images=tf.constant(images))["feature_map"]
    # Batch statistics: each channel of the last BatchNorm is normalised over the batch,
    # which the moving statistics (random here) do not do.
    assert np.max(np.abs(got.numpy() - inference)) > 1e-2
    want = encoder(images, training=True).numpy()
    assert np.max(np.abs(got.numpy() - want)) <= 1e-5


def test_restore_retries_once_when_checkpoint_files_vanish(model_dir, monkeypatch):
    import tensorflow as tf
    from harl_tf import checkpoints
    real = checkpoints.restore_online_encoder
    calls = []

    def vanishing_once(directory, step=None):
        calls.append(step)
        if len(calls) == 1:  # the manager deleted the files between lookup and read
            raise tf.errors.NotFoundError(None, None, "ckpt-12.data-00000-of-00001 not found")
        return real(directory, step)
    monkeypatch.setattr(checkpoints, "restore_online_encoder", vanishing_once)
    encoder, config, step, path = saved_encoder.restore_encoder_from_model_dir(model_dir[0])
    assert calls == [12, 12] and step == 12 and path.endswith("ckpt-12")

    calls.clear()

    def always_gone(directory, step=None):
        calls.append(step)
        raise tf.errors.NotFoundError(None, None, "gone")
    monkeypatch.setattr(checkpoints, "restore_online_encoder", always_gone)
    with pytest.raises(saved_encoder.ExportError, match=f"--model_dir={model_dir[0]}.*gone"):
        saved_encoder.restore_encoder_from_model_dir(model_dir[0])
    assert len(calls) == 2  # one retry, then a clear error
