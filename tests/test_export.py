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
    outputs, info = {}, {}
    for key in inputs.files:
        images = tf.constant(inputs[key])
        for name, value in signature(images=images).items():
            outputs[f"saved_model/{key}/{name}"] = value.numpy()
        for name, value in layer(images).items():
            outputs[f"tfsm_layer/{key}/{name}"] = np.asarray(value)
    np.savez(outputs_path, **outputs)
    _, kwargs = signature.structured_input_signature
    info["signatures"] = sorted(loaded.signatures)
    info["inputs"] = {k: [v.shape.as_list(), v.dtype.name] for k, v in kwargs.items()}
    info["outputs"] = {k: [v.shape.as_list(), v.dtype.name]
                       for k, v in signature.structured_outputs.items()}
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
    assert on_disk["pretrain_output_stride"] == 16
    assert on_disk["output_stride"] == on_disk["encoder_config"]["output_stride"] == 32
    assert on_disk["feature_dim"] == 128 and on_disk["total_stride"] == 8  # small stem: 32/4
    assert on_disk["inputs"]["images"]["range"] == [0.0, 1.0]
    assert on_disk["normalization"]["mean"] == list(resnet.IMAGENET_MEAN)
    assert on_disk["versions"]["tensorflow"].startswith("2.")
    assert on_disk["batchnorm_training"] is False
    leftovers = [n for n in os.listdir(os.path.dirname(export_dir)) if n.startswith(".")]
    assert not leftovers


def test_fresh_process_loads_the_same_function_at_two_sizes(model_dir, exported, tmp_path):
    export_dir, _ = exported
    rng = np.random.default_rng(0)
    inputs = {f"{h}x{w}": rng.random((2, h, w, 3), dtype=np.float32) for h, w in SIZES}
    np.savez(tmp_path / "inputs.npz", **inputs)
    script = tmp_path / "load.py"
    script.write_text(FRESH_PROCESS)
    result = subprocess.run(
        [sys.executable, str(script), export_dir, str(tmp_path / "inputs.npz"),
         str(tmp_path / "outputs.npz")], capture_output=True, text=True, env=ENV, timeout=120)
    assert result.returncode == 0, result.stderr[-3000:]
    info = json.loads(result.stdout.strip().splitlines()[-1])
    outputs = np.load(tmp_path / "outputs.npz")

    encoder = trained_encoder(model_dir[1][12], output_stride=32)
    for key, images in inputs.items():
        feature_map = encoder(images, training=False).numpy()
        h, w = images.shape[1:3]
        assert feature_map.shape == (2, -(-h // 8), -(-w // 8), 128)
        for loader in ("saved_model", "tfsm_layer"):
            got_map = outputs[f"{loader}/{key}/feature_map"]
            got_embedding = outputs[f"{loader}/{key}/embedding"]
            assert got_map.shape == feature_map.shape
            assert np.max(np.abs(got_map - feature_map)) <= 1e-5, (loader, key)
            assert np.max(np.abs(got_embedding - feature_map.mean(axis=(1, 2)))) <= 1e-5

    assert info["signatures"] == ["serving_default"]
    assert info["inputs"] == {"images": [[None, None, None, 3], "float32"]}
    assert info["outputs"] == {"embedding": [[None, 128], "float32"],
                               "feature_map": [[None, None, None, 128], "float32"]}
    # Kernels, gammas and betas stay trainable; BatchNorm moving statistics do not.
    trainable = {v.path + ":0" for v in encoder.trainable_variables}
    assert set(info["trainable"]) == trainable and len(trainable) == 60
    assert all("moving" in name for name in info["non_trainable"])
    assert len(info["non_trainable"]) == 40
    assert info["layer_trainable"] == 60


def test_named_step_and_kept_output_stride(model_dir, tmp_path):
    export_dir = str(tmp_path / "step7")
    metadata = saved_encoder.export_from_model_dir(model_dir[0], export_dir, step=7,
                                                output_stride=None)
    assert metadata["source"]["step"] == 7
    assert metadata["output_stride"] == 16 and metadata["total_stride"] == 4
    import tensorflow as tf
    loaded = tf.saved_model.load(export_dir)
    images = np.random.default_rng(1).random((1, 32, 32, 3), dtype=np.float32)
    got = loaded.signatures["serving_default"](images=tf.constant(images))["feature_map"]
    want = trained_encoder(model_dir[1][7], output_stride=16)(images, training=False)
    assert got.shape == (1, 8, 8, 128)
    assert np.max(np.abs(got.numpy() - want.numpy())) <= 1e-5


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
