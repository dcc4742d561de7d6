"""ONNX export (the optional ``onnx`` extra): the ONNX graph computes what the encoder
computes, at image sizes other than the one checked during export."""
import json
import os

import numpy as np
import pytest

pytest.importorskip("tf2onnx")
onnxruntime = pytest.importorskip("onnxruntime")

from _export_helpers import TINY_CONFIG, randomize  # noqa: E402
from harl_tf import saved_encoder  # noqa: E402
from harl_tf.models import resnet  # noqa: E402


def test_onnx_export_matches_tensorflow_at_any_size(tmp_path):
    encoder = resnet.build_encoder(dict(TINY_CONFIG, name="encoder"))
    randomize(encoder, seed=3)
    export_dir = tmp_path / "harl"
    metadata = saved_encoder.export_encoder(encoder, str(export_dir), output_stride=32,
                                            encoder_config=encoder.config, onnx=True)
    assert metadata["onnx"]["max_abs_diff"] <= 1e-4
    with open(export_dir / "harl_export.json") as f:
        assert json.load(f)["onnx"]["file"] == "encoder.onnx"

    session = onnxruntime.InferenceSession(str(export_dir / "encoder.onnx"),
                                           providers=["CPUExecutionProvider"])
    assert [i.name for i in session.get_inputs()] == ["images"]
    assert sorted(o.name for o in session.get_outputs()) == ["embedding", "feature_map"]
    stride32 = resnet.build_encoder(dict(encoder.config, output_stride=32))
    saved_encoder.copy_weights(encoder, stride32)  # the stride the export converted to
    for shape in ((1, 40, 56, 3), (3, 32, 32, 3)):
        images = np.random.default_rng(shape[1]).random(shape, dtype=np.float32)
        got = dict(zip([o.name for o in session.get_outputs()],
                       session.run(None, {"images": images})))
        want = stride32(images, training=False).numpy()
        assert got["feature_map"].shape == want.shape
        assert np.max(np.abs(got["feature_map"] - want)) <= 1e-4
        assert np.max(np.abs(got["embedding"] - want.mean(axis=(1, 2)))) <= 1e-4
    assert not [n for n in os.listdir(export_dir) if n.endswith(".tmp")]
