"""ONNX export's check, without the onnx extra (tf2onnx and onnxruntime are stood in for):
a model that disagrees with TensorFlow is an error and is not kept; one that agrees appears
under its final name only, with no temporary left."""
import os
import sys
import types

import numpy as np
import pytest
import tensorflow as tf

from harl_tf import onnx_export


def serve(images):
    feature_map = images[:, ::2, ::2, :] * 2.0
    return {"embedding": tf.reduce_mean(feature_map, axis=[1, 2]), "feature_map": feature_map}


def _fake_extra(monkeypatch, error: float):
    """tf2onnx writes a file; onnxruntime's session returns TensorFlow's outputs + error."""
    def from_function(function, input_signature, opset, output_path):
        with open(output_path, "wb") as f:
            f.write(b"onnx model")

    class Output:
        def __init__(self, name):
            self.name = name

    class Session:
        def __init__(self, path, providers):
            assert os.path.basename(path).startswith(".")  # checked under a hidden name
            self.function = tf.function(serve)

        def get_outputs(self):
            return [Output("embedding:0"), Output("feature_map:0")]

        def get_inputs(self):
            return [Output("images:0")]

        def run(self, names, feeds):
            out = self.function(tf.constant(feeds["images:0"]))
            return [out["embedding"].numpy() + error, out["feature_map"].numpy() + error]

    tf2onnx = types.ModuleType("tf2onnx")
    tf2onnx.convert = types.SimpleNamespace(from_function=from_function)
    monkeypatch.setitem(sys.modules, "tf2onnx", tf2onnx)
    monkeypatch.setitem(sys.modules, "onnxruntime",
                        types.SimpleNamespace(InferenceSession=Session))


def test_a_model_that_disagrees_is_an_error_and_is_not_kept(tmp_path, monkeypatch):
    _fake_extra(monkeypatch, error=1e-2)
    path = tmp_path / "encoder.onnx"
    with pytest.raises(ValueError, match=r"max abs diff 0\.01 > 0\.0001"):
        onnx_export.export_onnx(serve, str(path), check_shape=(2, 8, 6, 3))
    assert os.listdir(tmp_path) == []


def test_a_model_that_agrees_is_renamed_in_and_reports_the_difference(tmp_path, monkeypatch):
    _fake_extra(monkeypatch, error=1e-6)
    path = tmp_path / "encoder.onnx"
    info = onnx_export.export_onnx(serve, str(path), check_shape=(2, 8, 6, 3), opset=13)
    assert os.listdir(tmp_path) == ["encoder.onnx"] and path.read_bytes() == b"onnx model"
    assert info["opset"] == 13 and info["check_shape"] == [2, 8, 6, 3]
    assert 0 < info["max_abs_diff"] <= 1e-5
    assert np.isfinite(info["max_abs_diff"])
