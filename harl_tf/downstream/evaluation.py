"""One downstream evaluation run: encoder + labelled splits -> top-1 / top-5 (SPEC §8).

:func:`evaluate` is what ``python -m harl_tf.finetune`` calls. Modes:

- ``linear``: linear probe on the frozen encoder. Default: precomputed pooled features of
  centre crops, no augmentation (fast on CPU; BYOL's transfer protocol). With
  ``linear_augmentation``: random crop + flip training batches through the frozen
  encoder (BYOL / SimCLR ImageNet linear evaluation). Evaluation: centre crops.
- ``finetune``: encoder and linear head trained together on random crops + flips
  (semi-supervised 1 % / 10 %, transfer fine-tuning).
- ``knn``: weighted k-NN on frozen centre-crop features (:mod:`harl_tf.downstream.knn`).

With ``label_fraction < 1`` the training split is reduced to a deterministic,
class-balanced subset (:mod:`subsets`); training ids that also occur in the evaluation
split are never used, whatever the fraction. The ids trained on are written to
``output_dir/train_ids.txt``. Results go to ``output_dir/results.json``; trained modes
also write epoch metrics (``metrics.csv``; TensorBoard when installed), a per-epoch backup
(a rerun after an interruption resumes from it) and the final weights.
"""
from __future__ import annotations

import dataclasses
import os
import time
from typing import Any, Dict, Optional

import tensorflow as tf

from harl_tf.data import pipeline
from harl_tf.downstream import encoder_source, export_lib, knn, linear, subsets

MODES = ("linear", "finetune", "knn")
RESULTS_FILE = "results.json"
TRAIN_IDS_FILE = "train_ids.txt"


@dataclasses.dataclass
class EvaluationConfig:
    """Arguments of :func:`evaluate` (one field per ``harl_tf.finetune`` flag)."""
    mode: str
    encoder: str
    train_files: str
    eval_files: str
    output_dir: str
    encoder_config: Optional[Dict[str, Any]] = None
    step: Optional[int] = None
    output_stride: Optional[int] = None
    label_fraction: float = 1.0
    subset_seed: int = 0
    num_classes: int = 0
    image_size: int = 224
    crop_fraction: float = 0.875
    min_crop_area: float = 0.08
    batch_size: int = 256
    eval_batch_size: int = 256
    epochs: int = 90
    learning_rate: float = 0.1
    momentum: float = 0.9
    weight_decay: float = 0.0
    linear_augmentation: bool = False
    standardize_features: bool = True
    knn_k: int = 20
    knn_temperature: float = 0.07
    seed: int = 0
    verbose: int = 1

    def check(self) -> None:
        """Cheap checks, before any heavy work; errors name the flag."""
        if self.mode not in MODES:
            raise ValueError(f"--mode must be one of {', '.join(MODES)}, got {self.mode!r}.")
        if not 0.0 < self.label_fraction <= 1.0:
            raise ValueError(f"--label_fraction must be in (0, 1], got {self.label_fraction}.")
        for name in ("image_size", "batch_size", "eval_batch_size", "epochs", "knn_k"):
            if getattr(self, name) < 1:
                raise ValueError(f"--{name} must be >= 1, got {getattr(self, name)}.")
        if not 0.0 < self.crop_fraction <= 1.0:
            raise ValueError(f"--crop_fraction must be in (0, 1], got {self.crop_fraction}.")
        if not 0.0 < self.min_crop_area <= 1.0:
            raise ValueError(f"--min_crop_area must be in (0, 1], got {self.min_crop_area}.")
        if self.learning_rate <= 0:
            raise ValueError(f"--learning_rate must be > 0, got {self.learning_rate}.")
        if self.knn_temperature <= 0:
            raise ValueError(f"--knn_temperature must be > 0, got {self.knn_temperature}.")
        if self.num_classes < 0:
            raise ValueError(f"--num_classes must be >= 0 (0 = infer), got {self.num_classes}.")
        for flag in ("train_files", "eval_files"):
            pipeline.list_files(getattr(self, flag), caller=f"--{flag}")
        if self.encoder == encoder_source.RANDOM:
            if not self.encoder_config:
                raise ValueError("--encoder=random needs --encoder_config.")
        elif not tf.io.gfile.isdir(self.encoder):
            raise ValueError(f"--encoder={self.encoder!r} is neither 'random' nor an "
                             "existing export directory or pretraining model_dir.")


def evaluate(config: EvaluationConfig,
             strategy: Optional[tf.distribute.Strategy] = None) -> Dict[str, Any]:
    """Runs one evaluation (see the module docstring); returns and writes the results.
    A truncated or corrupt record file raises :class:`pipeline.CorruptRecordError` naming
    the file and the record."""
    config.check()
    with pipeline.naming_corrupt_files(f"{config.train_files},{config.eval_files}"):
        return _evaluate(config, strategy)


def _evaluate(config: EvaluationConfig,
              strategy: Optional[tf.distribute.Strategy]) -> Dict[str, Any]:
    strategy = strategy or tf.distribute.get_strategy()
    started = time.time()
    os.makedirs(config.output_dir, exist_ok=True)

    # Labels and ids first: cheap, and missing labels fail before the encoder is loaded.
    train_ids, train_labels = subsets.read_ids_and_labels(config.train_files, flag="train_files")
    eval_ids, eval_labels = subsets.read_ids_and_labels(config.eval_files, flag="eval_files")
    num_classes = config.num_classes or int(max(train_labels.max(), eval_labels.max())) + 1
    if max(train_labels.max(), eval_labels.max()) >= num_classes:
        raise ValueError(f"--num_classes={num_classes} but the records have label "
                         f"{int(max(train_labels.max(), eval_labels.max()))}.")
    chosen = subsets.label_subset(train_ids, train_labels, config.label_fraction,
                                  exclude_ids=eval_ids, seed=config.subset_seed)
    subsets.write_ids(os.path.join(config.output_dir, TRAIN_IDS_FILE), chosen)
    train_files = config.train_files
    if len(chosen) < len(train_ids):
        train_files = subsets.write_subset_records(
            config.train_files, chosen, os.path.join(config.output_dir, "label_subset"))

    with strategy.scope():
        source = encoder_source.load_encoder(
            config.encoder, encoder_config=config.encoder_config, step=config.step,
            output_stride=config.output_stride, seed=config.seed)
    encoder = source.encoder

    def centre_crops(files):
        return pipeline.eval_dataset(files, config.eval_batch_size, config.image_size,
                                     crop_fraction=config.crop_fraction)

    details: Dict[str, Any] = {}
    if config.mode == "knn" or (config.mode == "linear" and not config.linear_augmentation):
        train_features = linear.extract_features(encoder, centre_crops(train_files),
                                                 desc="train features")
        eval_features = linear.extract_features(encoder, centre_crops(config.eval_files),
                                                desc="eval features")
        if config.mode == "knn":
            metrics = knn.knn_evaluate(
                train_features.features, train_features.labels, eval_features.features,
                eval_features.labels, num_classes, k=config.knn_k,
                temperature=config.knn_temperature)
            details = {"k": config.knn_k, "temperature": config.knn_temperature,
                       "weighting": "exp(cosine / temperature)"}
        else:
            model = linear.train_linear_on_features(
                train_features, num_classes, epochs=config.epochs,
                batch_size=config.batch_size, learning_rate=config.learning_rate,
                momentum=config.momentum, weight_decay=config.weight_decay,
                seed=config.seed, standardize=config.standardize_features,
                output_dir=config.output_dir, strategy=strategy,
                verbose=config.verbose)
            metrics = linear.topk_accuracy(model.predict(eval_features.features, verbose=0),
                                           eval_features.labels)
            details = {"training": "precomputed centre-crop features, no augmentation",
                       "standardized": config.standardize_features}
        num_train, num_eval = len(train_features), len(eval_features)
    else:
        with strategy.scope():
            model = linear.Classifier(encoder, num_classes,
                                      freeze_encoder=config.mode == "linear")
        train_dataset = pipeline.train_classifier_dataset(
            train_files, config.batch_size, config.image_size, seed=config.seed,
            crop_area=(config.min_crop_area, 1.0))
        steps_per_epoch = max(1, len(chosen) // config.batch_size)
        linear.fit_classifier(model, train_dataset, epochs=config.epochs,
                              steps_per_epoch=steps_per_epoch,
                              learning_rate=config.learning_rate, momentum=config.momentum,
                              weight_decay=config.weight_decay,
                              output_dir=config.output_dir, verbose=config.verbose)
        logits, labels = linear.predict_scores(model, centre_crops(config.eval_files))
        metrics = linear.topk_accuracy(logits, labels)
        details = {"training": "random crop + flip", "steps_per_epoch": steps_per_epoch}
        num_train, num_eval = len(chosen), len(labels)

    results = {
        "mode": config.mode,
        "top1": metrics["top1"],
        "top5": metrics["top5"],
        "num_classes": num_classes,
        "num_train": int(num_train),
        "num_eval": int(num_eval),
        "label_fraction": config.label_fraction,
        "train_ids_file": TRAIN_IDS_FILE,
        "encoder": {"kind": source.kind, "config": source.config, **source.description},
        "details": details,
        "config": dataclasses.asdict(config),
        "seconds": round(time.time() - started, 1),
        "versions": export_lib.versions(),
    }
    export_lib.write_json_atomic(os.path.join(config.output_dir, RESULTS_FILE), results)
    return results
