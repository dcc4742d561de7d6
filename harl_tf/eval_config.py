"""Every downstream-evaluation hyperparameter, written once: :class:`EvaluationConfig`, its
checks and (through :mod:`harl_tf.config`) the ``harl_tf.finetune`` flags made from it.
Nothing here imports TensorFlow.

Each field is declared with :func:`config.option` (default, help, accepted values) and is
the ``harl_tf.finetune`` flag of the same name; ``EvaluationConfig(mode="knn", knn_k=5,
...)`` is what :func:`harl_tf.downstream.evaluation.evaluate` takes. Three flags spell
their value differently: ``--encoder_config`` (a JSON object for a dict; a JSON file or
an export directory stays a path, read by ``downstream.encoder_source``),
``--output_stride`` (``keep`` for None) and ``--weight_decay_grid`` (a comma-separated
string for a tuple; the binary chooses whether it applies from which flags were given,
``cli.finetune.weight_decay_grid``). Enum choices come from the registries
that use them (:data:`MODES`, :data:`EVAL_BACKGROUNDS`, :data:`EMBEDDINGS` here;
``config.OUTPUT_STRIDES``, ``distribute.STRATEGIES``).

This is a module of its own, not a section of :mod:`harl_tf.config`: the finetune flags
are another binary's flags (``--batch_size``, ``--epochs``, ``--seed`` mean other things
there), and ``config.PretrainConfig`` holds one run's pretraining, ``config.json``.
"""
from __future__ import annotations

import dataclasses
import json
import math
import re
from typing import Any, Callable, Dict, List, Optional, Tuple, Union

from harl_tf import distribute
from harl_tf.config import OUTPUT_STRIDES, ConfigError, check_fields, option

MODES = ("linear", "finetune", "knn", "segmentation")
SEGMENTATION_HEADS = ("probe", "fcn", "aspp")  # --segmentation_head
EVAL_BACKGROUNDS = ("original", "mixed_rand", "both")
# --embedding: the pooled region of the feature map a classifier reads (SPEC section 4).
EMBEDDINGS = ("global", "foreground", "background")
RANDOM = "random"  # --encoder=random: a randomly initialised encoder (the baseline)
KEEP = "keep"      # --output_stride=keep: the stride the encoder was exported with
# What --output_dir holds (every mode).
RESULTS_FILE = "results.json"
TRAIN_IDS_FILE = "train_ids.txt"  # the labelled subset's record ids, one per line
SHIFTED_EVAL_DIR = "eval_mixed_rand"  # --eval_background: the shifted eval records
DEFAULT_VALIDATION_FRACTION = 0.2
_DEFAULT_GRID_TEXT = "0,1e-4,1e-3,1e-2,1e-1,1"
_SET_NAME = re.compile(r"[A-Za-z0-9_]+")


def parse_grid(text: str, *, flag: str = "weight_decay_grid") -> Tuple[float, ...]:
    """``"0,1e-5,1e-4"`` -> ``(0.0, 1e-05, 0.0001)`` (sorted, duplicates removed); ``""``
    -> ``()`` (no grid). Negative or non-numeric values are a ConfigError naming the flag."""
    values = []
    for item in (part.strip() for part in text.split(",")):
        if not item:
            continue
        try:
            value = float(item)
        except ValueError:
            raise ConfigError(f"--{flag}: {item!r} is not a number; expected a comma-separated "
                             "list such as 0,1e-5,1e-4,1e-3,1e-2.") from None
        if not value >= 0.0 or math.isinf(value):
            raise ConfigError(f"--{flag}: weight decays must be finite and >= 0, got {item}.")
        values.append(value)
    return tuple(sorted(set(values)))


DEFAULT_GRID = parse_grid(_DEFAULT_GRID_TEXT)


def _encoder_config_from_flag(text: str) -> Union[Dict[str, Any], str, None]:
    """None for ""; a JSON object for '{...}'; else the path as given (a JSON file or an
    export directory: read by ``encoder_source.encoder_config_from`` when the evaluation
    is checked, which needs TensorFlow's file system)."""
    text = (text or "").strip()
    if not text:
        return None
    if not text.startswith("{"):
        return text
    try:
        value = json.loads(text)
    except json.JSONDecodeError as e:
        raise ConfigError(f"--encoder_config is not valid JSON ({e}): {text!r}") from None
    if not isinstance(value, dict):
        raise ConfigError(f"--encoder_config must be a JSON object, got {text!r}")
    return value


def parse_extra_eval_files(text: str) -> Tuple[Tuple[str, str], ...]:
    """``"unseen=/d/unseen-*.tfrecord;other=/e/*"`` -> ``(("unseen", "/d/unseen-*..."),
    ("other", "/e/*"))``; ``""`` -> ``()``. Names are letters, digits and ``_``, unique,
    and not an eval background's name; a malformed item is a ConfigError naming the flag."""
    items = []
    for item in (part.strip() for part in (text or "").split(";")):
        if not item:
            continue
        name, sep, pattern = (part.strip() for part in item.partition("="))
        if not sep or not _SET_NAME.fullmatch(name) or not pattern:
            raise ConfigError(f"--extra_eval_files: {item!r} is not name=glob (name: "
                              "letters, digits, _); separate sets with ';'.")
        if name in EVAL_BACKGROUNDS or name in dict(items):
            raise ConfigError(f"--extra_eval_files: the name {name!r} is "
                              + ("taken by an eval background." if name in EVAL_BACKGROUNDS
                                 else "given twice."))
        items.append((name, pattern))
    return tuple(items)


def _output_stride_from_flag(text: str) -> Optional[int]:
    return None if text == KEEP else int(text)


@dataclasses.dataclass
class EvaluationConfig:
    """Arguments of ``evaluation.evaluate`` (one field per ``harl_tf.finetune`` flag)."""
    mode: str = option("linear", "linear: frozen encoder + linear head; finetune: train "
                       "everything; knn: weighted k-NN on frozen features; segmentation: "
                       "per-pixel classes from the records' masks and labels "
                       "(--segmentation_head).", choices=MODES)
    encoder: Optional[str] = option(None, "Export directory, pretraining model_dir, or "
                                    "'random'.", required="the encoder to evaluate")
    train_files: Optional[str] = option(None, "Glob(s) of labelled training TFRecords.",
                                        required="the labelled training records")
    eval_files: Optional[str] = option(None, "Glob(s) of labelled evaluation TFRecords.",
                                       required="the labelled evaluation records")
    output_dir: Optional[str] = option(None, "Results, TensorBoard logs, checkpoints.",
                                       required="where the results go")
    extra_eval_files: Tuple[Tuple[str, str], ...] = option(
        (), "More labelled evaluation sets scored by the same trained model, as "
        "'name=glob;name=glob' (e.g. unseen=/data/unseen/test-*.tfrecord): each set's "
        "scores go to results.json's extra_eval[name], on its own backgrounds. Their ids "
        "are kept out of training like --eval_files'.", flag_default="",
        from_flag=parse_extra_eval_files)
    encoder_config: Union[Dict[str, Any], str, None] = option(
        None, "For --encoder=random: JSON object (e.g. '{\"depth\": 50}'), JSON file, or an "
        "export directory whose architecture to copy.", flag_default="",
        from_flag=_encoder_config_from_flag)
    step: Optional[int] = option(None, "Checkpoint step when --encoder is a model_dir.")
    output_stride: Optional[int] = option(
        None, "Output stride of the encoder ('keep' = as exported / pretrained).",
        choices=OUTPUT_STRIDES, flag_default=KEEP,
        flag_choices=(KEEP,) + tuple(str(s) for s in sorted(OUTPUT_STRIDES, reverse=True)),
        from_flag=_output_stride_from_flag)
    label_fraction: float = option(1.0, "Fraction of training labels to use (class-balanced, "
                                   "deterministic, disjoint from --eval_files).",
                                   low=0, high=1, open_low=True)
    subset_seed: int = option(0, "Seed of the --label_fraction subset.")
    num_classes: int = option(0, "Number of classes (0 = max label + 1).", low=0)
    image_size: int = option(224, "Side of the square training / evaluation crops.", low=1)
    crop_fraction: float = option(0.875, "Evaluation centre crop (fraction of the short "
                                  "side).", low=0, high=1, open_low=True)
    min_crop_area: float = option(0.08, "Smallest random-crop area for training.",
                                  low=0, high=1, open_low=True)
    batch_size: int = option(256, "Global training batch size.", low=1)
    eval_batch_size: int = option(256, "Batch size for feature extraction / evaluation.",
                                  low=1)
    epochs: int = option(90, "Training epochs (linear / finetune).", low=1)
    learning_rate: float = option(0.1, "Peak learning rate (SGD, Nesterov, cosine decay).",
                                  low=0, open_low=True)
    momentum: float = option(0.9, "SGD momentum.")
    weight_decay: float = option(0.0, "Decoupled weight decay. In --mode=linear on "
                                 "precomputed features, giving it fixes the decay (no grid).")
    linear_augmentation: bool = option(
        False, "Linear mode: train on random crops + flips through the frozen encoder "
        "(paper protocol) instead of precomputed centre-crop features (fast).")
    standardize_features: bool = option(
        True, "Linear mode on precomputed features: standardise each feature channel with "
        "the train split's mean and std before the linear layer.")
    embedding: str = option(
        "global", "What linear, finetune and knn classify: global = the mean of the "
        "feature map; foreground / background = the feature map pooled over the records' "
        "masks, sum(h*m) / (sum(m) + 1e-6) with m the mask area-averaged to the feature "
        "grid (foreground: HARL's object embedding). The masks are the records' own: "
        "heuristic, or exact when the records were built with exact masks.",
        choices=EMBEDDINGS)
    knn_k: int = option(20, "k of the k-NN classifier.", low=1)
    knn_temperature: float = option(0.07, "Temperature T of the exp(cos / T) votes.",
                                    low=0, open_low=True)
    segmentation_head: str = option(
        "probe", "--mode=segmentation: probe (frozen encoder, 1x1 conv on the feature map), "
        "fcn (two 3x3 convs) or aspp (DeepLabv3 ASPP), fcn and aspp trained with the "
        "encoder.", choices=SEGMENTATION_HEADS)
    seed: int = option(0, "Random seed.")
    verbose: int = option(1, "Keras fit verbosity (0, 1, 2).")
    weight_decay_grid: Tuple[float, ...] = option(
        (), "--mode=linear on precomputed features: comma-separated weight decays; the one "
        "with the best top-1 on a validation split of the TRAIN features is used to retrain "
        "on all of them. Empty: the fixed --weight_decay. Not used when --weight_decay is "
        "given.", flag_default=_DEFAULT_GRID_TEXT, from_flag=parse_grid)  # () = fixed decay
    validation_fraction: float = option(
        DEFAULT_VALIDATION_FRACTION, "Share of each class of the train features held out to "
        "choose the weight decay (deterministic by --seed).")
    eval_background: str = option(
        "original", "Evaluate on the records as they are, on their mixed_rand variant (each "
        "object pasted on the filled background of an image of another class; needs masks) "
        "or on both, reporting the top-1 gap.", choices=EVAL_BACKGROUNDS)
    background_seed: int = option(0, "Seed of the mixed_rand background choice.")
    strategy: str = option("default", "Distribution strategy (harl_tf.distribute).",
                           choices=distribute.STRATEGIES)

    def validate(self, list_files: Optional[Callable[..., List[str]]] = None) -> None:
        """Each field's declared rule, then the rules between fields: ConfigError (a
        ValueError) with one line naming the flag.

        Args:
          list_files: ``pipeline.list_files`` (TensorFlow's glob, which reads gs:// too),
            to check that --train_files and --eval_files match files, after the values and
            before the encoder (``evaluation.check`` passes it, and then checks that the
            encoder directory exists); None: the files are not looked at.
        """
        check_fields(self)
        grid = tuple(self.weight_decay_grid)
        if grid and (self.mode != "linear" or self.linear_augmentation):
            raise ConfigError("--weight_decay_grid applies to --mode=linear on precomputed "
                              "features only (not --linear_augmentation); pass "
                              "--weight_decay_grid= and a fixed --weight_decay.")
        if any(not v >= 0 for v in grid):
            raise ConfigError(f"--weight_decay_grid values must be >= 0, got {list(grid)}.")
        if grid and self.learning_rate * max(grid) >= 1:
            raise ConfigError(f"--learning_rate × the largest --weight_decay_grid value must "
                              f"be < 1 (each step scales the weights by 1 − lr·wd), got "
                              f"{self.learning_rate} × {max(grid)}; drop the decays >= "
                              f"1 / learning_rate from the grid.")
        if grid and not 0.0 < self.validation_fraction < 1.0:
            raise ConfigError(f"--validation_fraction must be in (0, 1), got "
                              f"{self.validation_fraction}.")
        if list_files is not None:
            for flag in ("train_files", "eval_files"):
                list_files(getattr(self, flag), caller=f"--{flag}")
            for name, pattern in self.extra_eval_files:
                list_files(pattern, caller=f"--extra_eval_files ({name})")
        if self.embedding != "global" and self.mode not in ("linear", "finetune", "knn"):
            raise ConfigError(f"--embedding={self.embedding} applies to --mode=linear, "
                              f"finetune and knn, not --mode={self.mode}.")
        if self.encoder == RANDOM and not self.encoder_config:
            raise ConfigError("--encoder=random needs --encoder_config.")


def extra_scores(config: EvaluationConfig, scores: Dict[str, Dict[str, Any]],
                 counts: Optional[Dict[str, int]] = None) -> Optional[Dict[str, Any]]:
    """results.json's ``extra_eval``: each ``--extra_eval_files`` set's scores (and
    ``num_eval`` from ``counts``), None when there are none."""
    if not config.extra_eval_files:
        return None
    out = {}
    for name, _ in config.extra_eval_files:
        out[name] = dict(scores[name])
        if counts is not None:
            out[name]["num_eval"] = int(counts[name])
    return out
