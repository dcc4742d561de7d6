"""The deep heuristic mask: a frozen encoder and a 1×1 saliency head (SPEC §7; paper §3.2,
Appendix C.2).

**Model.** A frozen encoder ``f`` maps an image (float32 ``[0, 1]``, resized to
``input_size × input_size``) to a feature map ``h = f(x)`` ``[h, w, C]``. A 1×1 convolution
with a sigmoid predicts the foregroundness of every cell, ``p = σ(h · k + b)``
(``k`` ``[1, 1, C, 1]``, ``b`` ``[1]``). ``p`` is bilinearly upsampled to the image's own
``[H, W]`` and thresholded: foreground where ``p > threshold`` (0.5; "values greater than the
threshold are foreground", paper §3.2), so 0.49 → 0 and 0.51 → 1.

**Encoders.** Any SavedModel with the export contract — signature ``serving_default``
taking float32 ``images`` ``[B, H, W, 3]`` in ``[0, 1]`` and returning ``feature_map``
``[B, h, w, C]`` — or an in-memory Keras encoder (``ResNet`` or any model with that call).
An in-memory encoder is saved inside the mask model as such a SavedModel, so every mask
model loads the same way.

**Training without labels** (:func:`train_saliency_head`). Features are computed once
(the encoder is frozen). Targets live on the feature grid: a pseudo-mask (e.g. the
conventional mask) is area-averaged to ``[h, w]``, giving each cell its foreground fraction
``a``. A cell is labelled 1 when ``a >= ignore_high`` (0.8), 0 when ``a <= ignore_low``
(0.2), and is ignored in between: such cells straddle the pseudo-label's boundary, where the
pseudo-label is least trustworthy and the cell is genuinely mixed. (``ignore_low ==
ignore_high == 0.5`` labels every cell by majority.) The head minimises the mean binary
cross-entropy over labelled cells (foreground and background cells weighed equally by
default: objects cover a minority of the cells, and with weak features an unweighted head
stays below 0.5 almost everywhere) plus ``l2 / 2 · |k|²``, with Adam, on per-channel
standardised features; the standardisation is folded back into ``k`` and ``b``, so the saved
head is exactly a 1×1 convolution on the raw feature map.
**Self-training** (``self_training_rounds``): each round relabels every cell of the
training images with the head's own confident predictions (``p > confident_high`` → 1, ``p < confident_low`` → 0,
others ignored) and trains again from the current head.

**Saved model** (a directory, written atomically: a temporary sibling, then renamed):
``saliency_head.json`` (format, encoder path and config, input size, threshold, training
parameters and history), ``head_weights.npz`` (``kernel`` ``[1, 1, C, 1]``, ``bias``
``[1]``), and ``encoder/`` (a SavedModel) when the encoder was an in-memory model. An
encoder given by path is recorded by its absolute path and not copied.

**Inference.** :class:`DeepSaliencyMasks` (registry name ``"deep"``) masks one image per
call, or many: ``predict_arrays`` and ``predict_files`` batch through ``tf.data`` with a
progress bar; every image is resized to ``input_size`` (aspect ratio not kept, as in
training) and its mask is resized back to the image's own size. There is no fallback: an
image with no salient cell gets an empty mask (``MaskResult.fallback`` is always ``None``).
"""
from __future__ import annotations

import dataclasses
import json
import os
import shutil
from typing import Any, Callable, Dict, Iterator, List, Optional, Sequence, Tuple

import keras
import numpy as np
import tensorflow as tf
from tqdm import tqdm

from harl_tf import atomic
from harl_tf.downstream import export_lib
from harl_tf.masks import MaskResult, folder, quality, to_rgb_uint8
from harl_tf.models import resnet

FORMAT = "harl_tf.saliency_head"
FORMAT_VERSION = 1
CONFIG_FILE = "saliency_head.json"
WEIGHTS_FILE = "head_weights.npz"
ENCODER_DIR = "encoder"

__all__ = [
    "DeepSaliencyMasks", "FrozenEncoder", "SaliencyHead", "SaliencyModel", "TrainConfig",
    "cell_targets", "compute_features", "confident_targets", "encoder_input", "fit_head",
    "load_training_set", "train_saliency_head", "upsample",
]


# Encoder ------------------------------------------------------------------------------


class FrozenEncoder:
    """A frozen feature extractor: ``encoder(images float32 [B, H, W, 3] in [0, 1])`` →
    feature map float32 ``[B, h, w, C]``.

    Build with :meth:`from_saved_model` (the export contract) or :meth:`from_keras`.
    ``description`` is a JSON-able dict recorded in the mask model (kind, path, config,
    whether the weights are a random initialisation).
    """

    def __init__(self, function, description: Dict[str, Any], *, keras_model=None,
                 resource=None):
        self._function = function
        self.description = dict(description)
        self.keras_model = keras_model
        self.saved_model_path: Optional[str] = None  # set when loaded from a SavedModel
        self._resource = resource  # keeps a loaded SavedModel's variables alive

    @classmethod
    def from_saved_model(cls, path: str) -> "FrozenEncoder":
        """Loads an encoder SavedModel (signature ``serving_default``: ``images`` →
        ``feature_map``). ``harl_export.json`` next to it, if any, is recorded."""
        path = os.path.abspath(path)
        if not os.path.isfile(os.path.join(path, "saved_model.pb")):
            raise FileNotFoundError(
                f"encoder {path}: not a SavedModel directory (no saved_model.pb); expected "
                "the output directory of harl_tf.export")
        loaded = tf.saved_model.load(path)
        signature = loaded.signatures.get("serving_default")
        if signature is None:
            raise ValueError(f"encoder {path}: the SavedModel has no 'serving_default' "
                             f"signature (found {sorted(loaded.signatures)})")
        _, inputs = signature.structured_input_signature
        if len(inputs) != 1:
            raise ValueError(f"encoder {path}: 'serving_default' must take one input "
                             f"(images), found {sorted(inputs)}")
        if "feature_map" not in signature.structured_outputs:
            raise ValueError(f"encoder {path}: 'serving_default' has no 'feature_map' output "
                             f"(found {sorted(signature.structured_outputs)})")
        input_name = next(iter(inputs))

        def function(images):
            return signature(**{input_name: images})["feature_map"]

        export_config = None
        config_path = os.path.join(path, export_lib.METADATA_FILE)
        if os.path.isfile(config_path):
            with open(config_path) as f:
                export_config = json.load(f)
        description = {"kind": "saved_model", "path": path, "export_config": export_config}
        encoder = cls(function, description, resource=loaded)
        encoder.saved_model_path = path
        return encoder

    @classmethod
    def from_keras(cls, model, *, random_init: bool = False,
                   note: Optional[str] = None) -> "FrozenEncoder":
        """Wraps an in-memory Keras encoder (called with ``training=False``).
        ``random_init=True`` labels its weights as a random initialisation."""
        function = tf.function(lambda images: model(images, training=False),
                               reduce_retracing=True)
        config = getattr(model, "config", None)
        description = {"kind": "keras", "model": model.name,
                       "config": config if isinstance(config, dict) else None,
                       "random_init": bool(random_init)}
        if note:
            description["note"] = note
        return cls(function, description, keras_model=model)

    @classmethod
    def from_config(cls, config: Dict[str, Any]) -> "FrozenEncoder":
        """A RANDOMLY INITIALISED :class:`~harl_tf.models.resnet.ResNet` built from a config
        dict (as ``ResNet.config``), labelled ``random_init`` in every record."""
        model = resnet.build_encoder(config)
        return cls.from_keras(model, random_init=True,
                              note="randomly initialised ResNet, not pretrained")

    def __call__(self, images) -> tf.Tensor:
        features = self._function(tf.convert_to_tensor(images, tf.float32))
        return tf.cast(features, tf.float32)

    def save(self, path: str) -> None:
        """Saves an in-memory Keras encoder as a SavedModel with the export contract
        (:mod:`harl_tf.downstream.export_lib`): a ``ResNet`` as a full export (with
        ``harl_export.json`` and ``encoder.weights.h5``), any other model as the
        SavedModel alone."""
        model = self.keras_model
        if model is None:
            raise ValueError("only an in-memory Keras encoder can be saved; an encoder "
                             "loaded from a SavedModel is recorded by its path")
        if isinstance(model, resnet.ResNet):
            export_lib.export_encoder(model, path, encoder_config=model.config,
                                      output_stride=None, source=dict(self.description))
            return
        with atomic.atomic_directory(path) as temporary:
            archive = keras.export.ExportArchive()
            archive.track(model)
            archive.add_endpoint(export_lib.SIGNATURE, export_lib.serving_function(model),
                                 input_signature=export_lib.INPUT_SIGNATURE)
            archive.write_out(temporary, verbose=False)


# Image plumbing shared by training and inference ---------------------------------------


def encoder_input(image_uint8: tf.Tensor, input_size: int) -> tf.Tensor:
    """``uint8 [H, W, 3]`` → float32 ``[input_size, input_size, 3]`` in ``[0, 1]``
    (bilinear, antialiased when shrinking). Training and inference both use this."""
    image = tf.image.convert_image_dtype(image_uint8, tf.float32)
    image = tf.image.resize(image, (input_size, input_size), method="bilinear",
                            antialias=True)
    return tf.clip_by_value(image, 0.0, 1.0)


def upsample(probabilities: np.ndarray, height: int, width: int) -> np.ndarray:
    """Bilinear resize (half-pixel centres) of a cell map ``[h, w]`` to ``[height, width]``."""
    resized = tf.image.resize(np.asarray(probabilities, np.float32)[..., None],
                              (height, width), method="bilinear")
    return resized.numpy()[..., 0]


def _arrays_dataset(images: Sequence[np.ndarray], input_size: int) -> tf.data.Dataset:
    def generate():
        for image in images:
            yield to_rgb_uint8(image)

    @tf.autograph.experimental.do_not_convert  # plain tf ops; tracing stays fast
    def prepare(image):
        return encoder_input(image, input_size), tf.shape(image)[:2]

    dataset = tf.data.Dataset.from_generator(
        generate, output_signature=tf.TensorSpec([None, None, 3], tf.uint8))
    return dataset.map(prepare)


TF_DECODABLE = (".jpg", ".jpeg", ".png", ".gif", ".bmp")


def _files_dataset(paths: Sequence[str], input_size: int) -> tf.data.Dataset:
    if not all(path.lower().endswith(TF_DECODABLE) for path in paths):
        # e.g. TIFF or WebP, which tf.io cannot decode: read with PIL in a generator
        return _arrays_dataset(_LazyImages(paths), input_size)

    @tf.autograph.experimental.do_not_convert
    def load(path):
        # channels=3 turns grey into RGB and drops alpha; 16-bit PNGs are scaled to 8 bits.
        image = tf.io.decode_image(tf.io.read_file(path), channels=3, dtype=tf.uint8,
                                   expand_animations=False)
        return encoder_input(image, input_size), tf.shape(image)[:2]

    return tf.data.Dataset.from_tensor_slices(list(paths)).map(
        load, num_parallel_calls=tf.data.AUTOTUNE)


class _LazyImages:
    """A sequence of image files decoded on access (:func:`harl_tf.masks.folder.read_image`)."""

    def __init__(self, paths: Sequence[str]):
        self.paths = list(paths)

    def __len__(self) -> int:
        return len(self.paths)

    def __iter__(self):
        return (folder.read_image(path) for path in self.paths)


def _batches(dataset: tf.data.Dataset, batch_size: int):
    return dataset.batch(batch_size).prefetch(1)


# Head ---------------------------------------------------------------------------------


@dataclasses.dataclass
class SaliencyHead:
    """The 1×1 convolution: ``kernel`` float32 ``[1, 1, C, 1]``, ``bias`` float32 ``[1]``."""
    kernel: np.ndarray
    bias: np.ndarray

    def __post_init__(self):
        self.kernel = np.asarray(self.kernel, np.float32).reshape(1, 1, -1, 1)
        self.bias = np.asarray(self.bias, np.float32).reshape(1)

    @property
    def feature_dim(self) -> int:
        return int(self.kernel.shape[2])

    def __call__(self, feature_map) -> tf.Tensor:
        """feature map ``[B, h, w, C]`` → foregroundness ``σ(conv1x1)`` ``[B, h, w]``."""
        logits = tf.nn.conv2d(tf.convert_to_tensor(feature_map, tf.float32), self.kernel,
                              strides=1, padding="VALID") + self.bias
        return tf.sigmoid(logits)[..., 0]


# Training -----------------------------------------------------------------------------


@dataclasses.dataclass
class TrainConfig:
    """Head training parameters (all recorded in ``saliency_head.json``)."""
    epochs: int = 20               # passes over the labelled cells, per round
    self_training_rounds: int = 0
    learning_rate: float = 0.01    # Adam, on standardised features
    batch_cells: int = 4096        # feature-map cells per step
    l2: float = 1e-4
    ignore_low: float = 0.2        # pseudo-label cells with area fraction in
    ignore_high: float = 0.8       # (ignore_low, ignore_high) are ignored
    confident_low: float = 0.2     # self-training: p < confident_low → 0,
    confident_high: float = 0.8    # p > confident_high → 1, others ignored
    balance_classes: bool = True   # weigh foreground and background cells equally
    seed: int = 0

    def __post_init__(self):
        if not 0.0 <= self.ignore_low <= self.ignore_high <= 1.0:
            raise ValueError("need 0 <= ignore_low <= ignore_high <= 1, got "
                             f"{self.ignore_low}, {self.ignore_high}")
        if not 0.0 <= self.confident_low <= 0.5 <= self.confident_high <= 1.0:
            raise ValueError("need 0 <= confident_low <= 0.5 <= confident_high <= 1, got "
                             f"{self.confident_low}, {self.confident_high}")
        if self.epochs < 1 or self.self_training_rounds < 0 or self.batch_cells < 1:
            raise ValueError(f"need epochs >= 1, self_training_rounds >= 0, batch_cells >= 1;"
                             f" got {self.epochs}, {self.self_training_rounds}, "
                             f"{self.batch_cells}")


def cell_targets(masks: Sequence[np.ndarray], grid: Tuple[int, int], *, ignore_low: float = 0.2,
                 ignore_high: float = 0.8) -> Tuple[np.ndarray, np.ndarray]:
    """Pseudo-masks (``{0, 1}`` ``[H_i, W_i]``, any sizes) → cell targets on the feature grid.

    Each mask is area-averaged to ``grid = (h, w)``, giving every cell its foreground
    fraction ``a``. Returns ``targets`` float32 ``[N, h, w]`` (``a >= 0.5``) and ``weights``
    float32 ``[N, h, w]``: 0 for ignored cells (``ignore_low < a < ignore_high``), else 1.
    """
    fractions = np.zeros((len(masks),) + tuple(grid), np.float32)
    for index, mask in enumerate(masks):
        binary = (np.asarray(mask) > 0).astype(np.float32)[..., None]
        fractions[index] = tf.image.resize(binary, grid, method="area").numpy()[..., 0]
    targets = (fractions >= 0.5).astype(np.float32)
    ignored = (fractions > ignore_low) & (fractions < ignore_high)
    return targets, (~ignored).astype(np.float32)


def confident_targets(probabilities: np.ndarray, *, low: float = 0.2,
                      high: float = 0.8) -> Tuple[np.ndarray, np.ndarray]:
    """Self-training labels from the head's own predictions ``[N, h, w]``:
    ``p > high`` → 1, ``p < low`` → 0, others ignored (weight 0)."""
    probabilities = np.asarray(probabilities)
    targets = (probabilities > 0.5).astype(np.float32)
    weights = ((probabilities > high) | (probabilities < low)).astype(np.float32)
    return targets, weights


def fit_head(features: np.ndarray, targets: np.ndarray, weights: np.ndarray, *,
             epochs: int = 20, learning_rate: float = 0.01, batch_cells: int = 4096,
             l2: float = 1e-4, balance_classes: bool = False, seed: int = 0,
             init: Optional[SaliencyHead] = None,
             progress: bool = False) -> Tuple[SaliencyHead, float]:
    """Fits the 1×1 head by weighted logistic regression on feature-map cells.

    ``features`` float ``[N, h, w, C]``; ``targets``, ``weights`` ``[N, h, w]`` (weight 0 =
    ignored). Minimises ``mean_{labelled} BCE(σ(z · v + c), y) + l2 / 2 · |v|²`` over
    standardised features ``z = (x − μ) / s`` (per-channel mean and std over all cells), then
    folds the standardisation back: ``k = v / s``, ``b = c − Σ v μ / s``.
    ``balance_classes`` weighs each cell by ``1 / (2 · fraction of its class)`` among the
    labelled cells, so foreground and background count equally (p = 0.5 then means equal
    evidence rather than the pseudo-labels' prior). Returns the head and the final epoch's
    mean loss.
    """
    channels = features.shape[-1]
    cells = features.reshape(-1, channels)  # a view: the features are not copied
    labels = np.asarray(targets, np.float32).reshape(-1)
    labelled = np.flatnonzero(np.asarray(weights).reshape(-1) > 0)
    if labelled.size == 0:
        raise ValueError("no labelled cells to train the saliency head on: every cell is "
                         "in the ignored band; lower ignore_low / raise ignore_high")
    mean = cells.mean(axis=0, dtype=np.float64).astype(np.float32)
    std = (cells.std(axis=0, dtype=np.float64) + 1e-6).astype(np.float32)

    foreground = float(np.clip(labels[labelled].mean(), 1e-3, 1 - 1e-3))
    class_weight = (np.float32([0.5 / (1 - foreground), 0.5 / foreground]) if balance_classes
                    else np.float32([1.0, 1.0]))
    if init is None:
        prior = 0.5 if balance_classes else foreground
        v0, c0 = np.zeros(channels, np.float32), np.float32(np.log(prior / (1 - prior)))
    else:  # unfold the saved head into the standardised space
        k = init.kernel.reshape(-1)
        v0, c0 = k * std, np.float32(init.bias[0] + np.sum(k * mean))
    v = tf.Variable(v0[:, None], name="kernel")
    c = tf.Variable([c0], name="bias", dtype=tf.float32)
    optimizer = keras.optimizers.Adam(learning_rate)
    optimizer.build([v, c])

    @tf.function(reduce_retracing=True, autograph=False)  # plain tf ops
    def step(z, y, w):
        with tf.GradientTape() as tape:
            logits = tf.matmul(z, v)[:, 0] + c[0]
            loss = tf.reduce_mean(w * tf.nn.sigmoid_cross_entropy_with_logits(y, logits))
            total = loss + 0.5 * l2 * tf.reduce_sum(tf.square(v))
        optimizer.apply(tape.gradient(total, [v, c]), [v, c])
        return loss

    rng = np.random.default_rng(seed)
    epoch_loss = float("nan")
    for _ in tqdm(range(epochs), desc="saliency head", unit="epoch", disable=not progress):
        order = labelled[rng.permutation(labelled.size)]
        losses, sizes = [], []
        for start in range(0, order.size, batch_cells):
            index = np.sort(order[start:start + batch_cells])
            z = (cells[index] - mean) / std
            y = labels[index]
            losses.append(float(step(z, y, class_weight[y.astype(np.int64)])))
            sizes.append(index.size)
        epoch_loss = float(np.average(losses, weights=sizes))
    v1, c1 = v.numpy()[:, 0], float(c.numpy()[0])
    head = SaliencyHead(kernel=v1 / std, bias=[c1 - float(np.sum(v1 * mean / std))])
    return head, epoch_loss


# The trained model ---------------------------------------------------------------------


class SaliencyModel:
    """Frozen encoder + 1×1 head, at a fixed square encoder ``input_size``, with its default
    mask ``threshold``.

    ``probabilities(images float32 [B, S, S, 3])`` → cell foregroundness ``[B, h, w]``.
    """

    def __init__(self, encoder: FrozenEncoder, head: SaliencyHead, *, input_size: int,
                 threshold: float = 0.5, training: Optional[Dict[str, Any]] = None,
                 path: Optional[str] = None):
        if int(input_size) < 1:
            raise ValueError(f"input_size must be >= 1, got {input_size}")
        if not 0.0 <= float(threshold) <= 1.0:
            raise ValueError(f"threshold must be in [0, 1], got {threshold!r}")
        self.encoder = encoder
        self.head = head
        self.input_size = int(input_size)
        self.threshold = float(threshold)
        self.training = dict(training or {})
        self.path = path

    def probabilities(self, images) -> tf.Tensor:
        features = self.encoder(images)
        if features.shape[-1] != self.head.feature_dim:
            raise ValueError(
                f"the encoder gives {features.shape[-1]} channels but the saliency head "
                f"{self.path or '(in memory)'} expects {self.head.feature_dim}: the head was "
                "trained on another encoder")
        return self.head(features)

    # Persistence.

    def save(self, path: str) -> None:
        """Writes the model directory atomically (temporary sibling, then rename). An
        existing directory is replaced only if it holds a saliency model."""
        path = os.path.abspath(path)
        if os.path.exists(path) and not os.path.isfile(os.path.join(path, CONFIG_FILE)):
            if not os.path.isdir(path) or os.listdir(path):
                raise FileExistsError(
                    f"mask model output {path} exists and is not a saliency model "
                    f"(no {CONFIG_FILE}); choose another path or remove it")
        with atomic.atomic_directory(path, overwrite=True) as temporary:
            encoder = dict(self.encoder.description)
            if self.encoder.keras_model is not None:
                self.encoder.save(os.path.join(temporary, ENCODER_DIR))
                encoder["path"] = ENCODER_DIR  # relative: inside the model directory
            elif not os.path.isabs(encoder["path"]):  # inside the model it was loaded from
                shutil.copytree(self.encoder.saved_model_path,
                                os.path.join(temporary, ENCODER_DIR))
                encoder["path"] = ENCODER_DIR
            np.savez(os.path.join(temporary, WEIGHTS_FILE), kernel=self.head.kernel,
                     bias=self.head.bias)
            config = {
                "format": FORMAT, "version": FORMAT_VERSION,
                "encoder": encoder,
                "feature_dim": self.head.feature_dim,
                "input_size": self.input_size,
                "threshold": self.threshold,
                "head": {"weights": WEIGHTS_FILE, "kernel_shape": list(self.head.kernel.shape)},
                "training": self.training,
            }
            with open(os.path.join(temporary, CONFIG_FILE), "w") as f:
                json.dump(config, f, indent=2, sort_keys=True, default=_json_default)
                f.write("\n")
        self.path = path

    @classmethod
    def load(cls, path: str, *, encoder: Optional[FrozenEncoder] = None) -> "SaliencyModel":
        """Loads a model directory written by :meth:`save`. ``encoder`` overrides the
        recorded one (e.g. after the export directory moved)."""
        path = os.path.abspath(path)
        config_path = os.path.join(path, CONFIG_FILE)
        if not os.path.isfile(config_path):
            raise FileNotFoundError(f"mask model {path}: no {CONFIG_FILE}; expected a "
                                    "directory written by tools/train_saliency_head.py")
        with open(config_path) as f:
            config = json.load(f)
        if config.get("format") != FORMAT or config.get("version") != FORMAT_VERSION:
            raise ValueError(f"{config_path}: format {config.get('format')!r} version "
                             f"{config.get('version')!r}; expected {FORMAT!r} version "
                             f"{FORMAT_VERSION}")
        with np.load(os.path.join(path, config["head"]["weights"])) as weights:
            head = SaliencyHead(weights["kernel"], weights["bias"])
        if encoder is None:
            recorded = config["encoder"]
            encoder_path = os.path.join(path, recorded["path"])  # absolute paths stay
            if not os.path.isdir(encoder_path):
                raise FileNotFoundError(
                    f"{config_path}: encoder {encoder_path} not found; pass the encoder "
                    "explicitly if the export directory moved")
            encoder = FrozenEncoder.from_saved_model(encoder_path)
            encoder.description = dict(recorded, path=recorded["path"])
        return cls(encoder, head, input_size=config["input_size"],
                   threshold=config["threshold"], training=config.get("training"), path=path)


def _json_default(value):
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, np.ndarray):
        return value.tolist()
    raise TypeError(f"not JSON-serialisable: {type(value).__name__}")


def compute_features(encoder: FrozenEncoder, images: Sequence[np.ndarray], input_size: int,
                     *, batch_size: int = 32, progress: bool = True) -> np.ndarray:
    """Frozen-encoder features of many images: float32 ``[N, h, w, C]`` (computed once,
    so the head can train for many epochs without touching the encoder)."""
    chunks = []
    batches = _batches(_arrays_dataset(images, input_size), batch_size)
    total = -(-len(images) // batch_size)
    for batch, _ in tqdm(batches, total=total, desc="encoder features", unit="batch",
                         disable=not progress):
        chunks.append(encoder(batch).numpy())
    if not chunks:
        raise ValueError("no images to compute features of")
    return np.concatenate(chunks)


def train_saliency_head(encoder: FrozenEncoder, images: Sequence[np.ndarray],
                        pseudo_masks: Sequence[np.ndarray], *, input_size: int,
                        config: Optional[TrainConfig] = None, threshold: float = 0.5,
                        batch_size: int = 32,
                        progress: bool = True,
                        provenance: Optional[Dict[str, Any]] = None,
                        on_round: Optional[Callable[[int, SaliencyHead], None]] = None
                        ) -> SaliencyModel:
    """Trains the 1×1 head on pseudo-masks, then ``config.self_training_rounds`` rounds of
    self-training (see the module docstring).

    ``images``: uint8 RGB (grey / RGBA accepted) of any sizes; ``pseudo_masks``: ``{0, 1}``
    ``[H_i, W_i]`` at each image's size. ``provenance`` (JSON-able, e.g. where the
    pseudo-masks came from) is recorded. The returned model's ``training["history"]`` holds,
    per round, the loss, the labelled fraction of cells, and the mean IoU of the model's
    masks against the pseudo-masks. ``on_round(round, head)`` is called after every round
    (e.g. to evaluate each round's head).
    """
    config = config or TrainConfig()
    if len(images) != len(pseudo_masks):
        raise ValueError(f"{len(images)} images but {len(pseudo_masks)} pseudo-masks")
    for index, (image, mask) in enumerate(zip(images, pseudo_masks)):
        if np.shape(image)[:2] != np.shape(mask)[:2]:
            raise ValueError(f"image {index}: size {np.shape(image)[:2]} but its pseudo-mask "
                             f"is {np.shape(mask)[:2]}")
    features = compute_features(encoder, images, input_size, batch_size=batch_size,
                                progress=progress)
    grid = features.shape[1:3]
    targets, weights = cell_targets(pseudo_masks, grid, ignore_low=config.ignore_low,
                                    ignore_high=config.ignore_high)
    head, history = None, []
    for round_index in range(config.self_training_rounds + 1):
        if round_index > 0:
            targets, weights = confident_targets(
                _cell_probabilities(head, features), low=config.confident_low,
                high=config.confident_high)
        head, loss = fit_head(features, targets, weights, epochs=config.epochs,
                              learning_rate=config.learning_rate,
                              batch_cells=config.batch_cells, l2=config.l2,
                              balance_classes=config.balance_classes,
                              seed=config.seed + round_index, init=head, progress=progress)
        probabilities = _cell_probabilities(head, features)
        masks = [upsample(p, *np.shape(m)[:2]) > threshold
                 for p, m in zip(probabilities, pseudo_masks)]
        history.append({
            "round": round_index,
            "labels": "pseudo_masks" if round_index == 0 else "self_training",
            "loss": loss,
            "labelled_cell_fraction": float(weights.mean()),
            "pseudo_mask_iou": quality.evaluate_arrays(masks, pseudo_masks).mean_iou,
        })
        if on_round is not None:
            on_round(round_index, head)
    training = {"config": dataclasses.asdict(config), "num_images": len(images),
                "feature_grid": list(grid), "history": history}
    if provenance:
        training["provenance"] = dict(provenance)
    return SaliencyModel(encoder, head, input_size=input_size, threshold=threshold,
                         training=training)


def _cell_probabilities(head: SaliencyHead, features: np.ndarray,
                        chunk: int = 64) -> np.ndarray:
    return np.concatenate([head(features[i:i + chunk]).numpy()
                           for i in range(0, len(features), chunk)])


def load_training_set(images_dir: str, *, pseudo_masks_dir: Optional[str] = None,
                      limit: int = 0, seed: int = 0,
                      conventional_params: Optional[Dict[str, Any]] = None,
                      progress: bool = True):
    """Images and pseudo-masks for :func:`train_saliency_head`.

    The images are every image file under ``images_dir`` (:func:`harl_tf.masks.folder.
    list_images`), or a seeded random subset of ``limit`` of them, in sorted order.
    Pseudo-masks are read from ``pseudo_masks_dir`` (``a/b/x.jpg`` → ``a/b/x.png``, the
    layout ``tools/generate_masks.py`` writes), or computed with the conventional method
    (``conventional_params``) when no folder is given. Returns ``(paths, images, masks,
    provenance)``.
    """
    from harl_tf.masks import get_method

    relative = folder.list_images(images_dir)
    if not relative:
        raise ValueError(f"images directory {images_dir} holds no image files "
                         f"({', '.join(folder.IMAGE_EXTENSIONS)})")
    if 0 < limit < len(relative):
        chosen = np.random.default_rng(seed).choice(len(relative), limit, replace=False)
        relative = [relative[i] for i in sorted(chosen)]
    paths = [os.path.join(images_dir, rel) for rel in relative]
    method, mask_paths = None, []
    if pseudo_masks_dir is not None:
        mask_paths = [os.path.join(pseudo_masks_dir, folder.mask_relpath(rel))
                      for rel in relative]
        missing = [(p, m) for p, m in zip(paths, mask_paths) if not os.path.isfile(m)]
        if missing:
            raise FileNotFoundError(f"{len(missing)} image(s) have no pseudo-mask, e.g. "
                                    f"{missing[0][0]} needs {missing[0][1]}")
        provenance = {"images_dir": os.path.abspath(images_dir),
                      "pseudo_masks_dir": os.path.abspath(pseudo_masks_dir)}
    else:
        method = get_method("conventional", **(conventional_params or {}))
        provenance = {"images_dir": os.path.abspath(images_dir),
                      "pseudo_masks": "conventional (computed on the fly)",
                      "conventional_params": method.params}
    images, pseudo = [], []
    for index, path in enumerate(tqdm(paths, desc="images + pseudo-masks", unit="image",
                                      disable=not progress)):
        image = folder.read_image(path)
        if method is None:
            mask = quality.read_mask(mask_paths[index])
            if mask.shape != image.shape[:2]:
                raise ValueError(f"{mask_paths[index]}: mask size {mask.shape} differs from "
                                 f"its image's {image.shape[:2]} ({path})")
        else:
            mask = method(image)
        images.append(image)
        pseudo.append(mask)
    provenance["num_images"] = len(paths)
    return paths, images, pseudo, provenance


# The registry method -------------------------------------------------------------------


class DeepSaliencyMasks:
    """Registry object for ``get_method("deep", model_path=...)``.

    ``model_path``: a directory written by :meth:`SaliencyModel.save` (or pass an in-memory
    ``model``). ``threshold``: foreground where the upsampled probability is ``>``
    threshold; ``None`` takes the model's (0.5 unless trained with another). ``batch_size``:
    images per encoder call in ``predict_arrays`` / ``predict_files``. ``params`` records the
    model path, encoder path, input size and threshold.
    """
    name = "deep"

    def __init__(self, model_path: Optional[str] = None, *, threshold: Optional[float] = None,
                 batch_size: int = 32, model: Optional[SaliencyModel] = None,
                 progress: bool = True):
        if (model_path is None) == (model is None):
            raise ValueError("deep mask: give exactly one of model_path (a directory from "
                             "tools/train_saliency_head.py) or model")
        if threshold is not None and not 0.0 <= float(threshold) <= 1.0:
            raise ValueError(f"deep mask: threshold must be in [0, 1], got {threshold!r}")
        if int(batch_size) < 1:
            raise ValueError(f"deep mask: batch_size must be >= 1, got {batch_size!r}")
        self.model = model if model is not None else SaliencyModel.load(model_path)
        self.threshold = self.model.threshold if threshold is None else float(threshold)
        self.batch_size = int(batch_size)
        self.progress = bool(progress)
        self.params: Dict[str, Any] = {
            "model_path": self.model.path,
            "threshold": self.threshold,
            "input_size": self.model.input_size,
            "encoder": self.model.encoder.description.get("path"),
        }
        self.last_fallback: Optional[str] = None

    def _masks(self, probabilities: np.ndarray, sizes) -> List[np.ndarray]:
        return [(upsample(p, int(h), int(w)) > self.threshold).astype(np.uint8)
                for p, (h, w) in zip(probabilities, sizes)]

    def compute(self, image: np.ndarray) -> MaskResult:
        image = to_rgb_uint8(image)
        batch = encoder_input(image, self.model.input_size)[None]
        probabilities = self.model.probabilities(batch).numpy()
        mask = self._masks(probabilities, [image.shape[:2]])[0]
        self.last_fallback = None
        return MaskResult(mask, None, {"foreground_fraction": float(mask.mean()),
                                       "max_probability": float(probabilities.max())})

    def __call__(self, image: np.ndarray) -> np.ndarray:
        return self.compute(image).mask

    def _run(self, dataset: tf.data.Dataset, count: int) -> Iterator[np.ndarray]:
        total = -(-count // self.batch_size)
        for images, sizes in tqdm(_batches(dataset, self.batch_size), total=total,
                                  desc="deep masks", unit="batch", disable=not self.progress):
            yield from self._masks(self.model.probabilities(images).numpy(), sizes.numpy())

    def predict_arrays(self, images: Sequence[np.ndarray]) -> List[np.ndarray]:
        """Masks ``uint8 {0, 1} [H_i, W_i]`` of many images (any sizes), batched."""
        return list(self._run(_arrays_dataset(images, self.model.input_size), len(images)))

    def predict_files(self, paths: Sequence[str]) -> Iterator[Tuple[str, np.ndarray]]:
        """Yields ``(path, mask uint8 {0, 1} [H, W])`` for image files, in order, batched
        through tf.data (decoding in parallel)."""
        missing = [p for p in paths if not os.path.isfile(p)]
        if missing:
            raise FileNotFoundError(f"deep mask: {len(missing)} image file(s) not found, "
                                    f"e.g. {missing[0]}")
        masks = self._run(_files_dataset(paths, self.model.input_size), len(paths))
        yield from zip(paths, masks)

    def __repr__(self) -> str:
        return f"DeepSaliencyMasks({self.params})"
