"""The encoder's weights, written for PyTorch, are a torchvision ResNet state_dict:
the right names, the right shapes, and the same function of the input."""
import pickle

import numpy as np
import pytest

from harl_tf.downstream import torchvision_weights
from harl_tf.models import resnet

BN_SUFFIXES = ("weight", "bias", "running_mean", "running_var", "num_batches_tracked")


def torchvision_resnet50_keys_and_shapes():
    """torchvision.models.resnet50().state_dict() keys and shapes minus fc.*, generated
    from its architecture: Bottleneck blocks (3, 4, 6, 3), width 64 * 2**(stage-1),
    expansion 4, a downsample on the first block of every stage."""
    shapes = {"conv1.weight": (64, 3, 7, 7)}

    def bn(name, channels):
        for suffix in BN_SUFFIXES:
            shapes[f"{name}.{suffix}"] = () if suffix == "num_batches_tracked" else (channels,)

    bn("bn1", 64)
    in_channels = 64
    for stage, blocks in enumerate((3, 4, 6, 3), 1):
        width = 64 * 2 ** (stage - 1)
        for block in range(blocks):
            prefix = f"layer{stage}.{block}"
            block_in = in_channels if block == 0 else 4 * width
            shapes[f"{prefix}.conv1.weight"] = (width, block_in, 1, 1)
            shapes[f"{prefix}.conv2.weight"] = (width, width, 3, 3)
            shapes[f"{prefix}.conv3.weight"] = (4 * width, width, 1, 1)
            bn(f"{prefix}.bn1", width)
            bn(f"{prefix}.bn2", width)
            bn(f"{prefix}.bn3", 4 * width)
            if block == 0:
                shapes[f"{prefix}.downsample.0.weight"] = (4 * width, block_in, 1, 1)
                bn(f"{prefix}.downsample.1", 4 * width)
        in_channels = 4 * width
    return shapes


@pytest.fixture(scope="module")
def resnet50_state():
    return torchvision_weights.torchvision_state_dict(resnet.build_encoder({"depth": 50}))


def test_resnet50_keys_are_torchvision_state_dict_keys_minus_fc(resnet50_state):
    expected = torchvision_resnet50_keys_and_shapes()
    assert len(expected) == 320 - 2  # torchvision resnet50: 320 keys, 2 of them fc.*
    assert set(resnet50_state) == set(expected)


def test_resnet50_shapes_and_parameter_count_match_torchvision(resnet50_state):
    expected = torchvision_resnet50_keys_and_shapes()
    wrong = {k: (v.shape, expected[k]) for k, v in resnet50_state.items()
             if v.shape != expected[k]}
    assert not wrong
    learnable = sum(v.size for k, v in resnet50_state.items()
                    if k.endswith((".weight", ".bias")))
    # torchvision resnet50: 25,557,032 parameters, of which fc has 2048 * 1000 + 1000.
    assert learnable == 25_557_032 - 2_049_000
    assert resnet50_state["layer1.0.bn1.num_batches_tracked"].dtype == np.int64


def conv2d_nchw(x, weight, stride, padding):
    """Plain numpy cross-correlation, NCHW input, OIHW weight (PyTorch's conv2d)."""
    x = np.pad(x, ((0, 0), (0, 0), (padding, padding), (padding, padding)))
    n, _, h, w = x.shape
    out_channels, _, kh, kw = weight.shape
    ho, wo = (h - kh) // stride + 1, (w - kw) // stride + 1
    out = np.zeros((n, out_channels, ho, wo), np.float64)
    for i in range(kh):
        for j in range(kw):
            patch = x[:, :, i:i + stride * ho:stride, j:j + stride * wo:stride]
            out += np.einsum("nchw,oc->nohw", patch, weight[:, :, i, j])
    return out


def test_conv_bn_relu_block_is_the_same_function_in_torchvision_layout():
    rng = np.random.default_rng(0)
    encoder = resnet.build_encoder({"depth": 18, "width_multiplier": 0.25})
    conv, bn = encoder.get_layer("layer2_0_conv1"), encoder.get_layer("layer2_0_bn1")
    pad = encoder.get_layer("layer2_0_conv1_pad")
    channels = bn.gamma.shape[0]
    # Non-trivial BatchNorm statistics, so that every BN tensor matters.
    bn.gamma.assign(rng.uniform(0.5, 1.5, channels))
    bn.beta.assign(rng.normal(size=channels))
    bn.moving_mean.assign(rng.normal(size=channels))
    bn.moving_variance.assign(rng.uniform(0.5, 2.0, channels))
    in_channels = conv.kernel.shape[2]
    x_nhwc = rng.normal(size=(2, 9, 10, in_channels)).astype(np.float32)

    keras_out = np.maximum(bn(conv(pad(x_nhwc)), training=False).numpy(), 0.0)

    state = torchvision_weights.torchvision_state_dict(encoder)
    w = state["layer2.0.conv1.weight"]
    assert w.shape == (channels, in_channels, 3, 3)
    y = conv2d_nchw(x_nhwc.transpose(0, 3, 1, 2).astype(np.float64), w, stride=2, padding=1)
    scale = state["layer2.0.bn1.weight"] / np.sqrt(state["layer2.0.bn1.running_var"] + 1e-5)
    y = (y - state["layer2.0.bn1.running_mean"][None, :, None, None]) * scale[None, :, None, None]
    y = np.maximum(y + state["layer2.0.bn1.bias"][None, :, None, None], 0.0)

    assert keras_out.shape == (2, 5, 5, channels)
    np.testing.assert_allclose(keras_out, y.transpose(0, 2, 3, 1), atol=1e-4, rtol=1e-4)


def test_stem_conv_matches_torchvision_padding_3_stride_2():
    rng = np.random.default_rng(1)
    encoder = resnet.build_encoder({"depth": 18, "width_multiplier": 0.25})
    x = rng.normal(size=(1, 12, 14, 3)).astype(np.float32)
    keras_out = encoder.get_layer("conv1")(encoder.get_layer("conv1_pad")(x)).numpy()
    w = torchvision_weights.torchvision_state_dict(encoder)["conv1.weight"]
    torch_out = conv2d_nchw(x.transpose(0, 3, 1, 2).astype(np.float64), w, 2, 3)
    np.testing.assert_allclose(keras_out, torch_out.transpose(0, 2, 3, 1), atol=1e-4)


def test_detectron2_pickle_uses_converter_names_and_same_arrays(tmp_path, resnet50_state):
    path = tmp_path / "harl.pkl"
    torchvision_weights.save_detectron2(str(path), resnet50_state)
    with open(path, "rb") as f:
        checkpoint = pickle.load(f)
    assert checkpoint["__author__"] == "harl-tf"
    assert checkpoint["matching_heuristics"] is True
    model = checkpoint["model"]
    renames = {
        "conv1.weight": "stem.conv1.weight",
        "bn1.running_mean": "stem.conv1.norm.running_mean",
        "layer1.0.conv1.weight": "res2.0.conv1.weight",
        "layer1.0.bn2.bias": "res2.0.conv2.norm.bias",
        "layer1.0.downsample.0.weight": "res2.0.shortcut.weight",
        "layer1.0.downsample.1.running_var": "res2.0.shortcut.norm.running_var",
        "layer4.2.bn3.weight": "res5.2.conv3.norm.weight",
    }
    for torchvision_key, d2_key in renames.items():
        np.testing.assert_array_equal(model[d2_key], resnet50_state[torchvision_key])
    assert not any(k.endswith("num_batches_tracked") for k in model)
    assert len(model) == len(resnet50_state) - 53  # one num_batches_tracked per BatchNorm


def test_npz_round_trip(tmp_path, resnet50_state):
    path = tmp_path / "harl.npz"
    torchvision_weights.save_npz(str(path), resnet50_state)
    loaded = np.load(path)
    assert set(loaded.files) == set(resnet50_state)
    np.testing.assert_array_equal(loaded["layer3.5.conv2.weight"],
                                  resnet50_state["layer3.5.conv2.weight"])
