"""Training the deep mask's 1×1 saliency head without labels (SPEC §7; paper Appendix C.2).

Features are computed once (the encoder is frozen). Targets live on the feature grid: a
pseudo-mask (e.g. the conventional mask) is area-averaged to ``[h, w]``, giving each cell
its foreground fraction ``a``. A cell is labelled 1 when ``a >= ignore_high`` (0.8), 0 when
``a <= ignore_low`` (0.2), and is ignored in between: such cells straddle the
pseudo-label's boundary, where the pseudo-label is least trustworthy and the cell is
genuinely mixed. (``ignore_low == ignore_high == 0.5`` labels every cell by majority.) The
head minimises the mean binary cross-entropy over labelled cells (foreground and background
cells weighed equally by default: objects cover a minority of the cells, and with weak
features an unweighted head stays below 0.5 almost everywhere) plus ``l2 / 2 · |k|²``,
with Adam, on per-channel standardised features; the standardisation is folded back into
``k`` and ``b``, so the saved head is exactly a 1×1 convolution on the raw feature map.

**Fused pseudo-labels** (``extra_pseudo_mask_sets``): with several pseudo-masks per image
(e.g. the conventional method at several settings) a cell is labelled only where every
set agrees (:func:`harl_tf.masks.deep.pseudo_labels.fused_cell_targets`).

**Self-training** (``self_training_rounds``): each round relabels every cell of the
training images and trains again from the current head. ``self_training_labels =
"confident"``: the head's own confident predictions (``p > confident_high`` → 1,
``p < confident_low`` → 0, others ignored). ``"refined"``: the head's masks after the
boundary refinement (:mod:`harl_tf.masks.deep.refine`), area-averaged to the grid with the
same ignore band as the pseudo-masks — the refinement follows the image's edges, so its
masks are sharper labels than the head's own cells. ``"refined_and_pseudo"``: only the
cells on which the refined masks and every pseudo-mask set agree (DeepUSPS's fusion, with
the head's own refined masks as one more method).
"""
from __future__ import annotations

import dataclasses
from typing import Any, Callable, Dict, Optional, Sequence, Tuple, Union

import keras
import numpy as np
import tensorflow as tf

from harl_tf.errors import ConfigError, DataError
from harl_tf.masks import quality, to_rgb_uint8
from harl_tf.masks.deep import context_head, data, pseudo_labels, refine
from harl_tf.masks.deep.encoder import FrozenEncoder
from harl_tf.masks.deep.saliency_model import (SaliencyHead, SaliencyModel, input_sizes_of,
                                               multiscale_features)
from harl_tf.progress import progress as progress_bar


SELF_TRAINING_LABELS = ("confident", "refined", "refined_and_pseudo")


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
    self_training_labels: str = "confident"  # see SELF_TRAINING_LABELS and the docstring
    head: str = "linear"           # the paper's 1×1 head, or "context" (ContextHead)
    hidden: int = 64               # context head: hidden channels
    context_kernel: int = 3        # context head: first layer's kernel size
    context_learning_rate: float = 1e-3
    seed: int = 0

    def __post_init__(self):
        if not 0.0 <= self.ignore_low <= self.ignore_high <= 1.0:
            raise ConfigError("need 0 <= ignore_low <= ignore_high <= 1, got "
                              f"{self.ignore_low}, {self.ignore_high}")
        if not 0.0 <= self.confident_low <= 0.5 <= self.confident_high <= 1.0:
            raise ConfigError("need 0 <= confident_low <= 0.5 <= confident_high <= 1, got "
                              f"{self.confident_low}, {self.confident_high}")
        if self.head not in ("linear", "context"):
            raise ConfigError(f"head must be 'linear' or 'context', got {self.head!r}")
        if self.hidden < 1 or self.context_kernel < 1 or self.context_kernel % 2 == 0:
            raise ConfigError(f"need hidden >= 1 and an odd context_kernel, got {self.hidden}, "
                              f"{self.context_kernel}")
        if self.self_training_labels not in SELF_TRAINING_LABELS:
            raise ConfigError(f"self_training_labels must be one of {SELF_TRAINING_LABELS}, "
                              f"got {self.self_training_labels!r}")
        if self.epochs < 1 or self.self_training_rounds < 0 or self.batch_cells < 1:
            raise ConfigError(f"need epochs >= 1, self_training_rounds >= 0, batch_cells >= 1;"
                              f" got {self.epochs}, {self.self_training_rounds}, "
                              f"{self.batch_cells}")


def cell_targets(masks: Sequence[np.ndarray], grid: Tuple[int, int], *, ignore_low: float = 0.2,
                 ignore_high: float = 0.8) -> Tuple[np.ndarray, np.ndarray]:
    """Pseudo-masks (``{0, 1}`` ``[H_i, W_i]``, any sizes) → cell targets on the feature grid.

    Each mask is area-averaged to ``grid = (h, w)``, giving every cell its foreground
    fraction ``a``. Returns ``targets`` float32 ``[N, h, w]`` (``a >= 0.5``) and ``weights``
    float32 ``[N, h, w]``: 0 for ignored cells (``ignore_low < a < ignore_high``), else 1.
    """
    fractions = pseudo_labels.cell_fractions(masks, grid)
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
        raise DataError("no labelled cells to train the saliency head on: every cell is "
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
    for _ in progress_bar(range(epochs), desc="saliency head", unit="epoch",
                          disable=not progress):
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


def compute_features(encoder: FrozenEncoder, images: Sequence[np.ndarray],
                     input_size: Union[int, Sequence[int]], *, batch_size: int = 32,
                     progress: bool = True) -> np.ndarray:
    """Frozen-encoder features of many images: float32 ``[N, h, w, C]`` (computed once,
    so the head can train for many epochs without touching the encoder). Several input
    sizes give the multi-scale features of :func:`~harl_tf.masks.deep.saliency_model.
    multiscale_features`."""
    sizes = input_sizes_of(input_size)
    chunks = []
    batched = data.batches(data.arrays_dataset(images, sizes[-1]), batch_size)
    total = -(-len(images) // batch_size)
    for batch, _ in progress_bar(batched, total=total, desc="encoder features", unit="batch",
                                 disable=not progress):
        chunks.append(multiscale_features(encoder, batch, sizes).numpy())
    if not chunks:
        raise DataError("no images to compute features of")
    return np.concatenate(chunks)


def train_saliency_head(encoder: FrozenEncoder, images: Sequence[np.ndarray],
                        pseudo_masks: Sequence[np.ndarray], *,
                        input_size: Union[int, Sequence[int]],
                        config: Optional[TrainConfig] = None, threshold: float = 0.5,
                        refinement: Optional[refine.RefineConfig] = None,
                        extra_pseudo_mask_sets: Sequence[Sequence[np.ndarray]] = (),
                        batch_size: int = 32,
                        progress: bool = True,
                        provenance: Optional[Dict[str, Any]] = None,
                        on_round: Optional[Callable[[int, SaliencyHead], None]] = None
                        ) -> SaliencyModel:
    """Trains the 1×1 head on pseudo-masks, then ``config.self_training_rounds`` rounds of
    self-training (see the module docstring).

    ``images``: uint8 RGB (grey / RGBA accepted) of any sizes; ``pseudo_masks``: ``{0, 1}``
    ``[H_i, W_i]`` at each image's size; ``extra_pseudo_mask_sets``: more pseudo-masks of
    the same images, fused with them (cells where all agree). ``input_size``: one encoder
    input size, or several (multi-scale features). ``refinement`` (default none, the
    paper's) is recorded in the model and used by ``"refined"`` self-training.
    ``provenance`` (JSON-able, e.g. where the pseudo-masks came from) is recorded. The
    returned model's ``training["history"]`` holds, per round, the loss, the labelled
    fraction of cells, and the mean IoU of the model's (refined) masks against the
    pseudo-masks. ``on_round(round, head)`` is called after every round (e.g. to evaluate
    each round's head).
    """
    config = config or TrainConfig()
    refinement = refinement or refine.RefineConfig()
    for masks in [pseudo_masks, *extra_pseudo_mask_sets]:
        if len(images) != len(masks):
            raise DataError(f"{len(images)} images but {len(masks)} pseudo-masks")
        for index, (image, mask) in enumerate(zip(images, masks)):
            if np.shape(image)[:2] != np.shape(mask)[:2]:
                raise DataError(f"image {index}: size {np.shape(image)[:2]} but its "
                                f"pseudo-mask is {np.shape(mask)[:2]}")
    features = compute_features(encoder, images, input_size, batch_size=batch_size,
                                progress=progress)
    grid = features.shape[1:3]
    targets, weights = pseudo_labels.fused_cell_targets(
        [pseudo_masks, *extra_pseudo_mask_sets], grid, ignore_low=config.ignore_low,
        ignore_high=config.ignore_high)
    images = [to_rgb_uint8(image) for image in images]
    head, history, masks = None, [], None
    for round_index in range(config.self_training_rounds + 1):
        if round_index > 0 and config.self_training_labels != "confident":
            sets = [masks] + ([pseudo_masks, *extra_pseudo_mask_sets]
                              if config.self_training_labels == "refined_and_pseudo" else [])
            targets, weights = pseudo_labels.fused_cell_targets(
                sets, grid, ignore_low=config.ignore_low, ignore_high=config.ignore_high)
        elif round_index > 0:
            targets, weights = confident_targets(
                _cell_probabilities(head, features), low=config.confident_low,
                high=config.confident_high)
        head, loss = fit_any_head(features, targets, weights, config,
                                  seed=config.seed + round_index, init=head, progress=progress)
        masks = refine.refined_masks(images, _cell_probabilities(head, features), refinement,
                                     threshold)
        history.append({
            "round": round_index,
            "labels": ("pseudo_masks" if round_index == 0
                       else "self_training_" + config.self_training_labels),
            "loss": loss,
            "labelled_cell_fraction": float(weights.mean()),
            "pseudo_mask_iou": quality.evaluate_arrays(masks, pseudo_masks).mean_iou,
        })
        if on_round is not None:
            on_round(round_index, head)
    training = {"config": dataclasses.asdict(config), "num_images": len(images),
                "feature_grid": list(grid), "history": history,
                "pseudo_mask_sets": 1 + len(extra_pseudo_mask_sets)}
    if provenance:
        training["provenance"] = dict(provenance)
    return SaliencyModel(encoder, head, input_size=input_size, threshold=threshold,
                         training=training, refinement=refinement)


def fit_any_head(features: np.ndarray, targets: np.ndarray, weights: np.ndarray,
                 config: TrainConfig, *, seed: int, init=None, progress: bool = False):
    """:func:`fit_head` (``config.head == "linear"``) or :func:`~harl_tf.masks.deep.
    context_head.fit_context_head` (``"context"``) with ``config``'s parameters."""
    if config.head == "context":
        return context_head.fit_context_head(
            features, targets, weights, hidden=config.hidden,
            kernel_size=config.context_kernel, epochs=config.epochs,
            learning_rate=config.context_learning_rate,
            balance_classes=config.balance_classes, seed=seed, init=init, progress=progress)
    return fit_head(features, targets, weights, epochs=config.epochs,
                    learning_rate=config.learning_rate, batch_cells=config.batch_cells,
                    l2=config.l2, balance_classes=config.balance_classes, seed=seed,
                    init=init, progress=progress)


def _cell_probabilities(head: SaliencyHead, features: np.ndarray,
                        chunk: int = 64) -> np.ndarray:
    return np.concatenate([head(features[i:i + chunk]).numpy()
                           for i in range(0, len(features), chunk)])
