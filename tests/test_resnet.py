"""ResNet encoder (SPEC section 3): sizes, shapes, torchvision semantics, output strides."""
import json

import keras
import numpy as np
import pytest
import tensorflow as tf

from harl_tf.models import resnet
from harl_tf.models.resnet import ResNet, build_encoder, torchvision_key

# torchvision.models.resnet50(): 25,557,032 parameters; its fc layer has 2048 * 1000 + 1000.
TORCHVISION_RESNET50_NO_FC = 25_557_032 - (2048 * 1000 + 1000)  # = 23,508,032


@pytest.fixture(autouse=True)
def _seed():
    keras.utils.set_random_seed(0)  # initial weights are random; make failures repeatable


def _num(variables):
    return sum(int(np.prod(v.shape)) for v in variables)


# ---------------------------------------------------------------------------------------
# numpy reference of torchvision's ResNet forward pass (eval mode), NHWC


def _np_conv(x, w, stride=1, pad=0, dilation=1):
    """x [B,H,W,C], w [kh,kw,C,O]; torchvision Conv2d: symmetric zero padding ``pad``."""
    x = np.pad(x, ((0, 0), (pad, pad), (pad, pad), (0, 0)))
    kh, kw = w.shape[:2]
    out_h = (x.shape[1] - dilation * (kh - 1) - 1) // stride + 1
    out_w = (x.shape[2] - dilation * (kw - 1) - 1) // stride + 1
    out = np.zeros((x.shape[0], out_h, out_w, w.shape[3]))
    for i in range(kh):
        for j in range(kw):
            patch = x[:, i * dilation:i * dilation + stride * (out_h - 1) + 1:stride,
                      j * dilation:j * dilation + stride * (out_w - 1) + 1:stride, :]
            out += patch @ w[i, j]
    return out


def _np_maxpool_3x3_s2_p1(x):
    x = np.pad(x, ((0, 0), (1, 1), (1, 1), (0, 0)), constant_values=-np.inf)
    out_h, out_w = (x.shape[1] - 3) // 2 + 1, (x.shape[2] - 3) // 2 + 1
    return np.max([x[:, i:i + 2 * out_h - 1:2, j:j + 2 * out_w - 1:2]
                   for i in range(3) for j in range(3)], axis=0)


def _np_torchvision_resnet(model, images, depth):
    """Eval-mode torchvision ResNet (v1.5) at output stride 32, weights read by layer name."""
    relu = lambda t: np.maximum(t, 0)  # noqa: E731

    def conv(name, x, stride=1, pad=0):
        return _np_conv(x, model.get_layer(name).kernel.numpy().astype(np.float64), stride, pad)

    def bn(name, x):
        layer = model.get_layer(name)
        gamma, beta, mean, var = (v.numpy().astype(np.float64) for v in (
            layer.gamma, layer.beta, layer.moving_mean, layer.moving_variance))
        return (x - mean) / np.sqrt(var + 1e-5) * gamma + beta

    x = (images.astype(np.float64) - np.array(resnet.IMAGENET_MEAN)) / np.array(
        resnet.IMAGENET_STD)
    x = _np_maxpool_3x3_s2_p1(relu(bn("bn1", conv("conv1", x, stride=2, pad=3))))
    block_type, blocks = resnet._STAGES[depth]
    for s, n in enumerate(blocks, 1):
        for b in range(n):
            p = f"layer{s}_{b}_"
            stride = 2 if (s > 1 and b == 0) else 1
            if block_type == "basic":
                out = relu(bn(p + "bn1", conv(p + "conv1", x, stride, 1)))
                out = bn(p + "bn2", conv(p + "conv2", out, 1, 1))
            else:
                out = relu(bn(p + "bn1", conv(p + "conv1", x)))
                out = relu(bn(p + "bn2", conv(p + "conv2", out, stride, 1)))
                out = bn(p + "bn3", conv(p + "conv3", out))
            if b == 0 and (stride != 1 or x.shape[-1] != out.shape[-1]):
                x = bn(p + "downsample_1", conv(p + "downsample_0", x, stride))
            x = relu(out + x)
    return x


def _randomise_batchnorm(model, seed):
    """Random gamma/beta/statistics, so that no BatchNorm is an identity or a zero map."""
    rng = np.random.default_rng(seed)
    for layer in model.layers:
        if isinstance(layer, keras.layers.BatchNormalization):
            c = layer.gamma.shape[0]
            layer.gamma.assign(rng.uniform(0.5, 1.5, c).astype(np.float32))
            layer.beta.assign(rng.normal(0, 0.1, c).astype(np.float32))
            layer.moving_mean.assign(rng.normal(0, 0.1, c).astype(np.float32))
            layer.moving_variance.assign(rng.uniform(0.5, 2.0, c).astype(np.float32))


# ---------------------------------------------------------------------------------------
# ResNet-50: sizes and shapes (construction only)


def test_resnet50_parameter_count_equals_torchvision_and_keras_applications():
    ours = build_encoder({"depth": 50})
    # Against torchvision (no conv biases): trainable parameters = conv kernels + BN affine.
    assert _num(ours.trainable_weights) == TORCHVISION_RESNET50_NO_FC == 23_508_032
    # Against keras.applications.ResNet50: identical except that every keras conv has a
    # bias; the counts must differ by exactly the number of those bias parameters.
    ref = keras.applications.ResNet50(include_top=False, weights=None)
    conv_bias = sum(int(np.prod(layer.bias.shape)) for layer in ref.layers
                    if isinstance(layer, keras.layers.Conv2D) and layer.use_bias)
    assert conv_bias == 26_560
    assert _num(ours.trainable_weights) == _num(ref.trainable_weights) - conv_bias
    assert _num(ours.non_trainable_weights) == _num(ref.non_trainable_weights)  # BN stats
    assert ours.count_params() == ref.count_params() - conv_bias
    assert ours.feature_dim == 2048


@pytest.mark.parametrize("output_stride, side", [(32, 7), (16, 14), (8, 28)])
def test_resnet50_feature_map_at_224_for_each_output_stride(output_stride, side):
    model = ResNet(depth=50, output_stride=output_stride)
    out = model(keras.KerasTensor((2, 224, 224, 3)))  # symbolic: shapes without compute
    assert tuple(out.shape) == (2, side, side, 2048)
    assert model.total_stride == output_stride


def test_torchvision_names_cover_resnet50_state_dict():
    model = build_encoder({"depth": 50})
    keys = [torchvision_key(v.path) for v in model.weights]
    # torchvision resnet50 state_dict without fc and num_batches_tracked:
    # 53 conv weights + 53 BatchNorms x (weight, bias, running_mean, running_var).
    assert len(keys) == len(set(keys)) == 53 + 53 * 4
    by_key = dict(zip(keys, model.weights))
    assert tuple(by_key["conv1.weight"].shape) == (7, 7, 3, 64)
    assert tuple(by_key["layer1.0.downsample.0.weight"].shape) == (1, 1, 64, 256)
    assert tuple(by_key["layer2.0.conv2.weight"].shape) == (3, 3, 128, 128)  # v1.5 stride
    assert tuple(by_key["layer4.2.bn3.running_var"].shape) == (2048,)
    assert "layer3.5.conv3.weight" in by_key and "layer3.6.conv1.weight" not in by_key
    with pytest.raises(ValueError, match="encoder variable path"):
        torchvision_key("encoder/conv1/bias")


# ---------------------------------------------------------------------------------------
# Semantics on tiny networks


@pytest.mark.parametrize("depth", [18, 50])
def test_forward_equals_numpy_torchvision_reference(depth):
    """Whole network, eval mode: normalisation inside, symmetric padding of stride-2 convs
    and the max-pool, v1.5 bottleneck and downsample wiring, as torchvision computes them."""
    model = ResNet(depth=depth, width_multiplier=0.25, zero_init_residual=False)
    images = np.random.default_rng(0).uniform(size=(2, 64, 64, 3)).astype(np.float32)
    model.build(images.shape)
    _randomise_batchnorm(model, seed=1)
    got = model(images, training=False).numpy()
    want = _np_torchvision_resnet(model, images, depth)
    assert got.shape == want.shape == (2, 2, 2, model.feature_dim)
    assert np.abs(want).max() > 0.1
    # float32 against float64 through 17-50 layers whose activations reach ~100s.
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5 * np.abs(want).max())


def test_stride2_conv_pads_symmetrically_unlike_tf_same():
    model = ResNet(depth=18, width_multiplier=0.25)
    model.build((None, None, None, 3))
    x = np.random.default_rng(3).normal(size=(1, 8, 8, 16)).astype(np.float32)
    conv = model.get_layer("layer2_0_conv1")
    got = conv(model.get_layer("layer2_0_conv1_pad")(x)).numpy()
    kernel = conv.kernel.numpy()
    want = tf.nn.conv2d(x, kernel, 2, [[0, 0], [1, 1], [1, 1], [0, 0]]).numpy()
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(got, _np_conv(x, kernel, stride=2, pad=1), rtol=1e-4, atol=1e-4)
    tf_same = tf.nn.conv2d(x, kernel, 2, "SAME").numpy()  # pads bottom/right only
    assert np.abs(got - tf_same).max() > 1e-2


def test_normalisation_is_inside_the_model():
    """The ImageNet-mean image normalises to exactly 0, so with fresh BatchNorm statistics
    and zero betas every activation is 0; the all-zero image is not."""
    model = ResNet(depth=18, width_multiplier=0.25)
    mean_image = np.broadcast_to(np.array(resnet.IMAGENET_MEAN, np.float32),
                                 (1, 64, 64, 3)).copy()
    np.testing.assert_array_equal(model(mean_image, training=False).numpy(), 0.0)
    assert np.abs(model(np.zeros_like(mean_image), training=False).numpy()).max() > 1e-3


def test_small_stem_shapes():
    model = ResNet(depth=18, small_stem=True)
    assert tuple(model(np.zeros((2, 32, 32, 3), np.float32)).shape) == (2, 4, 4, 512)
    assert model.total_stride == 8
    assert model.maxpool is None and tuple(model.get_layer("conv1").kernel.shape) == (3, 3, 3, 64)
    model16 = ResNet(depth=18, width_multiplier=0.25, small_stem=True, output_stride=16)
    assert tuple(model16(np.zeros((1, 96, 96, 3), np.float32)).shape) == (1, 24, 24, 128)


def test_width_multiplier_scales_every_channel_count():
    one = build_encoder({"depth": 18, "width_multiplier": 1})
    two = build_encoder({"depth": 18, "width_multiplier": 2})
    assert (one.feature_dim, two.feature_dim) == (512, 1024)
    for a, b in zip(one.weights, two.weights):
        assert a.path == b.path
        if a.path.endswith("/kernel"):
            kh, kw, cin, cout = a.shape
            assert tuple(b.shape) == (kh, kw, cin if cin == 3 else 2 * cin, 2 * cout)
        else:
            assert tuple(b.shape) == (2 * a.shape[0],)
    # Conv kernels dominate: the 2x network has ~4x the parameters.
    assert 3.9 < _num(two.trainable_weights) / _num(one.trainable_weights) < 4.0


@pytest.mark.parametrize("depth, output_stride", [(18, 16), (18, 8), (50, 16)])
def test_dilated_encoder_reproduces_stride32_map_on_its_subgrid(depth, output_stride):
    """Weights keep their shapes across output strides; with dilation the stride-16 (8)
    map sampled every 2nd (4th) position equals the stride-32 map exactly."""
    base = ResNet(depth=depth, width_multiplier=0.25, zero_init_residual=False)
    dense = ResNet(depth=depth, width_multiplier=0.25, output_stride=output_stride,
                   dilate=True, zero_init_residual=False)
    images = np.random.default_rng(4).uniform(size=(1, 64, 64, 3)).astype(np.float32)
    base.build(images.shape)
    dense.build(images.shape)
    _randomise_batchnorm(base, seed=5)
    dense.set_weights(base.get_weights())
    want = base(images, training=False).numpy()
    got = dense(images, training=False).numpy()
    step = 32 // output_stride
    assert got.shape[1:3] == (64 // output_stride,) * 2
    np.testing.assert_allclose(got[:, ::step, ::step], want, rtol=1e-4,
                               atol=1e-5 * np.abs(want).max())


def test_stride16_weights_load_into_stride32_model(tmp_path):
    stride16 = build_encoder({"depth": 18, "width_multiplier": 0.25, "output_stride": 16})
    _randomise_batchnorm(stride16, seed=6)
    path = str(tmp_path / "encoder.weights.h5")
    stride16.save_weights(path)
    stride32 = build_encoder({"depth": 18, "width_multiplier": 0.25})
    stride32.load_weights(path)
    for a, b in zip(stride16.weights, stride32.weights):
        assert a.path == b.path
        np.testing.assert_array_equal(a.numpy(), b.numpy())
    assert tuple(stride32(np.zeros((1, 64, 64, 3), np.float32)).shape) == (1, 2, 2, 128)


def test_config_is_json_and_rebuilds_the_same_network(tmp_path):
    model = build_encoder({"depth": 18, "width_multiplier": 0.5, "output_stride": 16,
                           "small_stem": True})
    _randomise_batchnorm(model, seed=7)
    config = json.loads(json.dumps(model.config))
    clone = build_encoder(config)
    clone.set_weights(model.get_weights())
    x = np.random.default_rng(7).uniform(size=(1, 32, 32, 3)).astype(np.float32)
    want = model(x, training=False).numpy()
    np.testing.assert_allclose(clone(x, training=False), want, atol=1e-6)
    model.save(tmp_path / "encoder.keras")  # whole-model Keras format, config + weights
    loaded = keras.saving.load_model(tmp_path / "encoder.keras")
    assert isinstance(loaded, ResNet) and loaded.config == model.config
    np.testing.assert_allclose(loaded(x, training=False), want, atol=1e-6)
    with pytest.raises(ValueError, match="unknown encoder config keys"):
        build_encoder({"depth": 18, "widht_multiplier": 2})
    with pytest.raises(ValueError, match="depth"):
        ResNet(depth=20)
    with pytest.raises(ValueError, match="output_stride"):
        ResNet(depth=18, output_stride=4)


@pytest.mark.parametrize("zero_init", [True, False])
def test_last_batchnorm_of_each_block_is_zero_initialised(zero_init):
    model = build_encoder({"depth": 50, "width_multiplier": 0.25,
                           "zero_init_residual": zero_init})
    for layer in model.layers:
        if isinstance(layer, keras.layers.BatchNormalization):
            last = layer.name.endswith("_bn3")
            expected = 0.0 if (zero_init and last) else 1.0
            np.testing.assert_array_equal(layer.gamma.numpy(), expected, err_msg=layer.name)


def test_sync_batchnorm_flag_reaches_every_batchnorm():
    model = ResNet(depth=18, width_multiplier=0.25, sync_batchnorm=True)
    bns = [layer for layer in model.layers
           if isinstance(layer, keras.layers.BatchNormalization)]
    assert len(bns) == 20 and all(bn.synchronized for bn in bns)


def test_mixed_precision_computes_in_float16_returns_float32():
    images = np.random.default_rng(8).uniform(size=(2, 32, 32, 3)).astype(np.float32)
    full = ResNet(depth=18, width_multiplier=0.25, small_stem=True, zero_init_residual=False)
    full.build(images.shape)
    keras.mixed_precision.set_global_policy("mixed_float16")
    try:
        half = ResNet(depth=18, width_multiplier=0.25, small_stem=True,
                      zero_init_residual=False)
        half.build(images.shape)
    finally:
        keras.mixed_precision.set_global_policy("float32")
    half.set_weights(full.get_weights())
    assert half.get_layer("conv1").compute_dtype == "float16"
    assert half.get_layer("conv1").kernel.dtype == "float32"
    out = half(images, training=True)
    assert out.dtype == tf.float32
    want = full(images, training=True).numpy()
    np.testing.assert_allclose(out.numpy(), want, atol=0.05 * np.abs(want).max())
