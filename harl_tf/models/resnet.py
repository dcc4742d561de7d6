"""ResNet encoder f (SPEC section 3): images in [0, 1] -> feature map h.

``ResNet(depth=50)`` maps float32 images ``[B, H, W, 3]`` in ``[0, 1]`` to the last-stage
feature map ``[B, H/s, W/s, C]`` (float32), where s is the total stride and
``C = 512 * width_multiplier * expansion`` (expansion 4 for bottleneck depths 50-200,
1 for basic-block depths 18 and 34): 2048 for ResNet-50, 7x7 at 224 px.

Architecture: torchvision's ResNet v1.5 (stride on the 3x3 convolution of the bottleneck),
no global pooling, no classifier.

- The ImageNet mean/std normalisation happens inside (``IMAGENET_MEAN``/``IMAGENET_STD``),
  so callers and the exported SavedModel feed ``[0, 1]`` images and never normalise.
- Padding is torchvision's: every stride-2 convolution and the max-pool are preceded by an
  explicit symmetric ``ZeroPadding2D(k // 2)`` and use ``padding="valid"`` (TF's "same"
  would pad only bottom/right for even inputs and shift the sampling grid by one pixel);
  stride-1 convolutions use "same", which is symmetric for odd kernels. The max-pool
  follows a ReLU, so zero padding equals torchvision's -inf padding. Converted
  torchvision weights therefore give the same outputs.
- ``output_stride`` 32 / 16 / 8: the stride of the last one (16) or two (8) stages is set
  to 1 (SPEC section 3, paper section 5.1). Weight shapes do not change, so weights of any
  output stride load into any other. With ``dilate=True`` the convolutions of those stages
  are dilated instead, as torchvision's ``replace_stride_with_dilation`` (which has no
  basic-block version; here a basic block's second conv takes the new dilation). A
  dilated encoder computes the stride-32 feature map exactly at every 2nd (16) or 4th (8)
  position, with the same weights.
- ``small_stem=True`` (CIFAR-style, for 32-96 px inputs): ``conv1`` is a 3x3, stride-1
  convolution and there is no max-pool, so the total stride is ``output_stride / 4``
  (a 32-px image gives a 4x4 map at output_stride 32). The 3x3 ``conv1`` has no
  torchvision counterpart in the standard model.
- ``width_multiplier`` k multiplies every channel count, stem included (SimCLR / BYOL
  "ResNet-50 (kx)"; a 2x ResNet-50 has C = 4096). This is not torchvision's
  ``wide_resnet50_2``, which widens only the bottleneck's inner convolutions.
- BatchNorm uses torchvision's constants (momentum 0.9 in Keras' convention = 0.1 in
  PyTorch's, epsilon 1e-5); ``zero_init_residual=True`` initialises the gamma of the last
  BatchNorm of every residual block to 0 (as BYOL / SimCLR), so each block starts as the
  identity. ``sync_batchnorm=True`` synchronises statistics across replicas.
- Mixed precision: the layers follow the global dtype policy; normalisation is done in
  float32 and the output is cast to float32.

Layer names (all layers are direct children of the model, so ``model.get_layer(name)``
works and variable paths are ``<model name>/<layer name>/<variable>``):

=====================================  ===================================================
Keras layer                            torchvision module
=====================================  ===================================================
``conv1``, ``bn1``                     ``conv1``, ``bn1``
``layer{s}_{b}_conv{i}``               ``layer{s}.{b}.conv{i}``  (s = 1..4, b from 0)
``layer{s}_{b}_bn{i}``                 ``layer{s}.{b}.bn{i}``
``layer{s}_{b}_downsample_0``          ``layer{s}.{b}.downsample.0`` (1x1 conv)
``layer{s}_{b}_downsample_1``          ``layer{s}.{b}.downsample.1`` (BatchNorm)
``conv1_pad``, ``maxpool_pad``,        (no weights: explicit padding and pooling)
``maxpool``, ``layer{s}_{b}_conv{i}_pad``
=====================================  ===================================================

i.e. the torchvision module name is the Keras layer name with "_" replaced by ".".
Variables map as Conv2D ``kernel`` [kh, kw, in, out] <-> ``weight`` [out, in, kh, kw]
(transpose (3, 2, 0, 1)); BatchNormalization ``gamma``/``beta``/``moving_mean``/
``moving_variance`` <-> ``weight``/``bias``/``running_mean``/``running_var``.
Convolutions have no bias. :func:`torchvision_key` implements this mapping on a
variable path.
"""
import inspect

import keras
import numpy as np
from keras import ops

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
BN_MOMENTUM = 0.9
BN_EPSILON = 1e-5

# depth -> (block type, number of blocks per stage)
_STAGES = {
    18: ("basic", (2, 2, 2, 2)),
    34: ("basic", (3, 4, 6, 3)),
    50: ("bottleneck", (3, 4, 6, 3)),
    101: ("bottleneck", (3, 4, 23, 3)),
    152: ("bottleneck", (3, 8, 36, 3)),
    200: ("bottleneck", (3, 24, 36, 3)),
}
_EXPANSION = {"basic": 1, "bottleneck": 4}
_OUTPUT_STRIDES = (8, 16, 32)

_TORCHVISION_VARIABLES = {
    "kernel": "weight",
    "gamma": "weight",
    "beta": "bias",
    "moving_mean": "running_mean",
    "moving_variance": "running_var",
}


def stage_strides(output_stride):
    """Strides of stages layer1..layer4 for an output stride of 32, 16 or 8.

    The stem (conv1 + max-pool) has stride 4; the stages multiply it by 1 * 2 * 2 * 2 at
    output stride 32. Output stride 16 sets layer4's stride to 1, 8 also layer3's.
    """
    if output_stride not in _OUTPUT_STRIDES:
        raise ValueError(f"`output_stride` must be one of {_OUTPUT_STRIDES}, "
                         f"got {output_stride!r}.")
    return {32: (1, 2, 2, 2), 16: (1, 2, 2, 1), 8: (1, 2, 1, 1)}[output_stride]


def torchvision_key(variable_path):
    """torchvision ``state_dict`` key of a Keras encoder variable.

    ``"encoder/layer1_0_downsample_1/moving_mean"`` -> ``"layer1.0.downsample.1.running_mean"``,
    ``"encoder/conv1/kernel"`` -> ``"conv1.weight"`` (the kernel must also be transposed
    from [kh, kw, in, out] to [out, in, kh, kw]).
    """
    parts = variable_path.split("/")
    if len(parts) < 2 or parts[-1] not in _TORCHVISION_VARIABLES:
        raise ValueError(f"not an encoder variable path: {variable_path!r}; expected "
                         f"'<model>/<layer>/<one of {sorted(_TORCHVISION_VARIABLES)}>'.")
    return parts[-2].replace("_", ".") + "." + _TORCHVISION_VARIABLES[parts[-1]]


class _Block:
    """Layers of one residual block (plain container; the layers live on the model)."""

    def __init__(self, convs, bns, pads, downsample):
        self.convs = convs          # list of Conv2D
        self.bns = bns              # list of BatchNormalization, same length
        self.pads = pads            # list of ZeroPadding2D or None, same length
        self.downsample = downsample  # (Conv2D, BatchNormalization) or None


@keras.saving.register_keras_serializable(package="harl_tf")
class ResNet(keras.Model):
    """ResNet encoder returning the feature map (see module docstring).

    Args:
      depth: 18, 34 (basic blocks), 50, 101, 152 or 200 (bottleneck v1.5 blocks).
      width_multiplier: k > 0, multiplies every channel count (64 * k must be an integer;
        fractions such as 0.25 give the tiny networks used in tests).
      output_stride: 32, 16 or 8 (with the standard stem).
      small_stem: 3x3 stride-1 ``conv1`` and no max-pool, for 32-96 px images.
      dilate: dilate the stages whose stride was set to 1 (torchvision's
        ``replace_stride_with_dilation``) instead of only removing their stride.
      zero_init_residual: initialise the last BatchNorm gamma of every block to 0.
      sync_batchnorm: synchronised BatchNorm across replicas.
      name: model name, the first component of every variable path.

    Call: ``model(images, training=...)`` with ``images`` float32 ``[B, H, W, 3]`` in
    ``[0, 1]`` -> float32 ``[B, ceil(H / s), ceil(W / s), feature_dim]`` where
    ``s = total_stride``.
    """

    def __init__(self, depth=50, width_multiplier=1, output_stride=32, small_stem=False,
                 dilate=False, zero_init_residual=True, sync_batchnorm=False,
                 name="encoder", **kwargs):
        super().__init__(name=name, **kwargs)
        if depth not in _STAGES:
            raise ValueError(f"`depth` must be one of {sorted(_STAGES)}, got {depth!r}.")
        if not width_multiplier > 0 or float(64 * width_multiplier) != int(64 * width_multiplier):
            raise ValueError("`width_multiplier` must be positive with 64 * width_multiplier "
                             f"an integer, got {width_multiplier!r}.")
        strides = stage_strides(output_stride)
        self._config = {
            "depth": int(depth),
            "width_multiplier": width_multiplier,
            "output_stride": int(output_stride),
            "small_stem": bool(small_stem),
            "dilate": bool(dilate),
            "zero_init_residual": bool(zero_init_residual),
            "sync_batchnorm": bool(sync_batchnorm),
            "name": name,
        }
        self._sync_batchnorm = bool(sync_batchnorm)
        block_type, blocks_per_stage = _STAGES[depth]
        expansion = _EXPANSION[block_type]
        stem_width = int(64 * width_multiplier)
        self.feature_dim = int(512 * width_multiplier) * expansion
        self.total_stride = output_stride // 4 if small_stem else output_stride

        # Stem.
        if small_stem:
            self.conv1_pad = None
            self.conv1 = self._conv(stem_width, 3, 1, "conv1")
            self.maxpool_pad = self.maxpool = None
        else:
            self.conv1_pad = keras.layers.ZeroPadding2D(3, name="conv1_pad")
            self.conv1 = self._conv(stem_width, 7, 2, "conv1")
            self.maxpool_pad = keras.layers.ZeroPadding2D(1, name="maxpool_pad")
            self.maxpool = keras.layers.MaxPooling2D(3, 2, padding="valid", name="maxpool")
        self.bn1 = self._bn("bn1")

        # Stages layer1..layer4, block by block, as torchvision's _make_layer.
        self._blocks = []
        in_channels = stem_width
        dilation = 1
        for stage, (num_blocks, stride) in enumerate(zip(blocks_per_stage, strides), 1):
            width = int(64 * width_multiplier) * 2 ** (stage - 1)
            nominal_stride = 1 if stage == 1 else 2
            previous_dilation = dilation
            if dilate and stride == 1 and nominal_stride == 2:
                dilation *= nominal_stride
            for index in range(num_blocks):
                prefix = f"layer{stage}_{index}"
                block = self._make_block(
                    prefix, block_type, in_channels, width,
                    stride=stride if index == 0 else 1,
                    first_dilation=previous_dilation if index == 0 else dilation,
                    dilation=dilation, zero_init_residual=zero_init_residual)
                self._blocks.append(block)
                in_channels = width * expansion

    # Layer factories --------------------------------------------------------------------

    def _conv(self, filters, kernel_size, stride, name, dilation=1):
        conv = keras.layers.Conv2D(
            filters, kernel_size, strides=stride,
            padding="valid" if stride > 1 or kernel_size == 1 else "same",
            dilation_rate=dilation, use_bias=False,
            # torchvision: kaiming_normal_(mode="fan_out", nonlinearity="relu")
            kernel_initializer=keras.initializers.VarianceScaling(
                2.0, mode="fan_out", distribution="untruncated_normal"),
            name=name)
        setattr(self, name, conv)
        return conv

    def _bn(self, name, zero_gamma=False):
        bn = keras.layers.BatchNormalization(
            momentum=BN_MOMENTUM, epsilon=BN_EPSILON,
            gamma_initializer="zeros" if zero_gamma else "ones",
            synchronized=self._sync_batchnorm, name=name)
        setattr(self, name, bn)
        return bn

    def _pad(self, amount, name):
        pad = keras.layers.ZeroPadding2D(amount, name=name)
        setattr(self, name, pad)
        return pad

    def _make_block(self, prefix, block_type, in_channels, width, stride, first_dilation,
                    dilation, zero_init_residual):
        """One residual block. ``first_dilation`` is that of the conv carrying the
        (possibly removed) stride: the previous stage's dilation in a stage's first block,
        as torchvision; the convs after it use the stage's ``dilation``."""
        if block_type == "basic":
            kernels, filters, strides = (3, 3), (width, width), (stride, 1)
            dilations = (first_dilation, dilation)
        else:  # bottleneck v1.5: the stride sits on the 3x3 convolution
            kernels, filters, strides = (1, 3, 1), (width, width, width * 4), (1, stride, 1)
            dilations = (1, first_dilation, 1)
        convs, bns, pads = [], [], []
        last = len(kernels)
        for i, (k, f, s, d) in enumerate(zip(kernels, filters, strides, dilations), 1):
            name = f"{prefix}_conv{i}"
            pads.append(self._pad(k // 2, name + "_pad") if s > 1 else None)
            convs.append(self._conv(f, k, s, name, dilation=d))
            bns.append(self._bn(f"{prefix}_bn{i}", zero_gamma=zero_init_residual and i == last))
        downsample = None
        out_channels = filters[-1]
        if stride != 1 or in_channels != out_channels:
            downsample = (self._conv(out_channels, 1, stride, f"{prefix}_downsample_0"),
                          self._bn(f"{prefix}_downsample_1"))
        return _Block(convs, bns, pads, downsample)

    # Forward ----------------------------------------------------------------------------

    def build(self, input_shape):
        """Create all variables by a symbolic pass; H and W may be None."""
        if self.built:
            return
        self.call(keras.KerasTensor(tuple(input_shape), dtype="float32"))
        self.built = True

    def call(self, images, training=None):
        x = ops.cast(images, "float32")
        mean = np.asarray(IMAGENET_MEAN, np.float32)
        std = np.asarray(IMAGENET_STD, np.float32)
        x = (x - mean) / std
        if self.conv1_pad is not None:
            x = self.conv1_pad(x)
        x = ops.relu(self.bn1(self.conv1(x), training=training))
        if self.maxpool is not None:
            x = self.maxpool(self.maxpool_pad(x))
        for block in self._blocks:
            x = self._block_forward(block, x, training)
        return ops.cast(x, "float32")

    @staticmethod
    def _block_forward(block, x, training):
        out = x
        last = len(block.convs) - 1
        for i, (conv, bn, pad) in enumerate(zip(block.convs, block.bns, block.pads)):
            if pad is not None:
                out = pad(out)
            out = bn(conv(out), training=training)
            if i < last:
                out = ops.relu(out)
        shortcut = x
        if block.downsample is not None:
            conv, bn = block.downsample
            shortcut = bn(conv(x), training=training)
        return ops.relu(out + ops.cast(shortcut, out.dtype))

    # Configuration ----------------------------------------------------------------------

    @property
    def config(self):
        """JSON-able dict of the constructor arguments; ``build_encoder(config)`` rebuilds."""
        return dict(self._config)

    def get_config(self):
        return dict(self._config)

    @classmethod
    def from_config(cls, config):
        return cls(**config)


def build_encoder(config):
    """Build a :class:`ResNet` from a config dict (as ``ResNet.config``), with its weights.

    Unknown keys raise a ``ValueError`` naming them. The model is built (variables
    created) for images of any size.
    """
    known = [p for p in inspect.signature(ResNet.__init__).parameters
             if p not in ("self", "kwargs")]
    unknown = sorted(set(config) - set(known))
    if unknown:
        raise ValueError(f"unknown encoder config keys {unknown}; expected a subset of "
                         f"{sorted(known)}.")
    model = ResNet(**config)
    model.build((None, None, None, 3))
    return model
