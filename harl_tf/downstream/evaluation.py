"""One downstream evaluation run: encoder + labelled splits -> top-1 / top-5 (SPEC §8).

:func:`evaluate` is what ``python -m harl_tf.finetune`` calls, with an
:class:`EvaluationConfig` (declared, with its checks, in ``harl_tf.eval_config``). Modes:

- ``linear``: linear probe on the frozen encoder. Default: precomputed pooled features of
  centre crops, no augmentation (fast on CPU; BYOL's transfer protocol). With
  ``linear_augmentation``: random crop + flip training batches through the frozen
  encoder (BYOL / SimCLR ImageNet linear evaluation). Evaluation: centre crops.
- ``finetune``: encoder and linear head trained together on random crops + flips
  (semi-supervised 1 % / 10 %, transfer fine-tuning).
- ``knn``: weighted k-NN on frozen centre-crop features (:mod:`harl_tf.downstream.knn`).
- ``segmentation``: per-pixel classes from the records' masks and labels, a frozen-encoder
  probe or a fine-tuned decoder; mean IoU (:mod:`harl_tf.downstream.segmentation`).

``weight_decay_grid`` (linear mode on precomputed features): the probe's weight decay is
chosen on a validation split of the training features (:mod:`probe_selection`), then the
probe is retrained on all training features with it; the evaluation split is read only
for the final score. ``eval_background``: ``original`` (the records as they are),
``mixed_rand`` (every evaluation object pasted on the filled background of an image of
another class, :mod:`harl_tf.data.background_shift`; the shifted records are written to
``output_dir/eval_mixed_rand``) or ``both`` (and the gap between the two top-1s).

``embedding`` (linear, finetune, knn): what the classifier reads, the global average of
the feature map or its foreground / background pooled over the records' masks with the
same crop (HARL's object embedding; :func:`linear.pooled_embedding`). The masks are the
records' own, heuristic unless the records were built with exact ones; the results name
the records' mask methods and how many examples had an empty region (pooled to zero).

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

import numpy as np
import tensorflow as tf

from harl_tf import atomic, distribute, saved_encoder
from harl_tf.config import ConfigError
from harl_tf.data import background_shift, pipeline
from harl_tf.downstream import (encoder_source, knn, linear, probe_selection, segmentation,
                                subsets)
# The config is declared TensorFlow-free in eval_config (the finetune flags are made from
# it); evaluate() takes it, so evaluation.EvaluationConfig names it here too.
from harl_tf.eval_config import (EVAL_BACKGROUNDS, RANDOM, RESULTS_FILE, SHIFTED_EVAL_DIR,
                                 TRAIN_IDS_FILE, EvaluationConfig, extra_scores)
from harl_tf.progress import keras_verbose



def check(config: EvaluationConfig) -> None:
    """Cheap checks, before any heavy work: ``config.validate()`` with the record files
    looked up, then the encoder directory exists and a --encoder_config path reads.
    Errors name the flag."""
    config.validate(list_files=pipeline.list_files)
    if config.encoder != RANDOM and not tf.io.gfile.isdir(config.encoder):
        raise ConfigError(f"--encoder={config.encoder!r} is neither 'random' nor an "
                          "existing export directory or pretraining model_dir.")
    if config.encoder == RANDOM:
        encoder_source.encoder_config_from(config.encoder_config)


def evaluate(config: EvaluationConfig,
             strategy: Optional[tf.distribute.Strategy] = None) -> Dict[str, Any]:
    """Runs one evaluation (see the module docstring); returns and writes the results.
    A truncated or corrupt record file raises :class:`pipeline.CorruptRecordError` naming
    the file and the record."""
    check(config)
    patterns = [config.train_files, config.eval_files,
                *(pattern for _, pattern in config.extra_eval_files)]
    with pipeline.naming_corrupt_files(",".join(patterns)):
        return _evaluate(config, strategy)


def _evaluate(config: EvaluationConfig,
              strategy: Optional[tf.distribute.Strategy]) -> Dict[str, Any]:
    strategy = strategy or distribute.make_strategy(config.strategy)
    started = time.time()
    os.makedirs(config.output_dir, exist_ok=True)

    # Labels and ids first: cheap, and missing labels fail before the encoder is loaded.
    train_ids, train_labels = subsets.read_ids_and_labels(config.train_files, flag="train_files")
    eval_ids, eval_labels = subsets.read_ids_and_labels(config.eval_files, flag="eval_files")
    for name, pattern in config.extra_eval_files:  # kept out of training too
        ids, labels = subsets.read_ids_and_labels(pattern, flag=f"extra_eval_files ({name})")
        eval_ids, eval_labels = (np.concatenate([eval_ids, ids]),
                                 np.concatenate([eval_labels, labels]))
    largest = int(max(train_labels.max(), eval_labels.max()))
    num_classes = config.num_classes or largest + 1
    if largest >= num_classes:
        raise ConfigError(f"--num_classes={num_classes} but the records have label "
                          f"{largest}.")
    chosen = subsets.label_subset(train_ids, train_labels, config.label_fraction,
                                  exclude_ids=eval_ids, seed=config.subset_seed)
    subsets.write_ids(os.path.join(config.output_dir, TRAIN_IDS_FILE), chosen)
    train_files = config.train_files
    if len(chosen) < len(train_ids):
        train_files = subsets.write_subset_records(
            config.train_files, chosen, os.path.join(config.output_dir, "label_subset"))

    # The shifted evaluation records come before the encoder: an empty mask fails fast.
    eval_sets = _evaluation_sets(config)
    if config.mode == "segmentation":  # dense: its own model, metrics and results
        return segmentation.evaluate(config, strategy, train_files=train_files,
                                     eval_sets=eval_sets, num_classes=num_classes,
                                     num_train=len(chosen), started=started)

    masked = config.embedding != "global"
    mask_methods = None
    if masked:  # every split has masks, checked before the encoder loads
        splits = {"train": (train_files, "train_files"),
                  **{f"eval_{k}": (v, "eval_files") for k, v in eval_sets.items()}}
        why = (f"--embedding={config.embedding} pools the feature map over the records' "
               "masks: build them with a mask method (tools/build_tfrecords.py) or use "
               "--embedding=global.")
        mask_methods = {name: subsets.read_mask_methods(files, flag=flag, why=why)
                        for name, (files, flag) in splits.items()}

    with strategy.scope():
        source = encoder_source.load_encoder(
            config.encoder, encoder_config=config.encoder_config, step=config.step,
            output_stride=config.output_stride, seed=config.seed)
    encoder = source.encoder

    def centre_crops(files):
        return pipeline.eval_dataset(files, config.eval_batch_size, config.image_size,
                                     crop_fraction=config.crop_fraction, with_mask=masked)

    def features_of(files, desc):
        return linear.extract_features(encoder, centre_crops(files), desc=desc,
                                       embedding=config.embedding)

    def eval_features(name, files):
        queries = features_of(files, f"eval features ({name})")
        empty_regions[f"eval_{name}"] = _empty_regions(queries)
        return queries

    details: Dict[str, Any] = {}
    selection = None
    weight_decay = config.weight_decay
    scores: Dict[str, Dict[str, float]] = {}  # eval background -> {"top1", "top5"}
    empty_regions: Dict[str, Optional[int]] = {}  # split -> examples pooled over no pixel
    counts: Dict[str, int] = {}  # eval set -> examples scored
    if config.mode == "knn" or (config.mode == "linear" and not config.linear_augmentation):
        train_features = features_of(train_files, "train features")
        empty_regions["train"] = _empty_regions(train_features)
        if config.mode == "knn":
            for name, files in eval_sets.items():
                queries = eval_features(name, files)
                scores[name] = knn.knn_evaluate(
                    train_features.features, train_features.labels, queries.features,
                    queries.labels, num_classes, k=config.knn_k,
                    temperature=config.knn_temperature)
                counts[name] = len(queries)
            details = {"k": config.knn_k, "temperature": config.knn_temperature,
                       "weighting": "exp(cosine / temperature)"}
        else:
            if config.weight_decay_grid:
                # Chosen on a split of the train features only; eval files are not read.
                selection = probe_selection.select_weight_decay(
                    train_features, num_classes, config.weight_decay_grid,
                    validation_fraction=config.validation_fraction, epochs=config.epochs,
                    batch_size=config.batch_size, learning_rate=config.learning_rate,
                    momentum=config.momentum, seed=config.seed,
                    standardize=config.standardize_features)
                weight_decay = selection["chosen_weight_decay"]
            model = linear.train_linear_on_features(
                train_features, num_classes, epochs=config.epochs,
                batch_size=config.batch_size, learning_rate=config.learning_rate,
                momentum=config.momentum, weight_decay=weight_decay,
                seed=config.seed, standardize=config.standardize_features,
                output_dir=config.output_dir, strategy=strategy,
                verbose=keras_verbose(config.verbose))
            for name, files in eval_sets.items():
                queries = eval_features(name, files)
                scores[name] = linear.topk_accuracy(
                    model.predict(queries.features, verbose=0), queries.labels)
                counts[name] = len(queries)
            details = {"training": "precomputed centre-crop features, no augmentation",
                       "standardized": config.standardize_features}
        num_train = len(train_features)
    else:
        with strategy.scope():
            model = linear.Classifier(encoder, num_classes,
                                      freeze_encoder=config.mode == "linear",
                                      embedding=config.embedding)
        train_dataset = pipeline.train_classifier_dataset(
            train_files, config.batch_size, config.image_size, seed=config.seed,
            crop_area=(config.min_crop_area, 1.0), with_mask=masked)
        steps_per_epoch = max(1, len(chosen) // config.batch_size)
        linear.fit_classifier(model, train_dataset, epochs=config.epochs,
                              steps_per_epoch=steps_per_epoch,
                              learning_rate=config.learning_rate, momentum=config.momentum,
                              weight_decay=config.weight_decay,
                              output_dir=config.output_dir,
                              verbose=keras_verbose(config.verbose))
        for name, files in eval_sets.items():
            logits, labels = linear.predict_scores(model, centre_crops(files),
                                                   desc=f"evaluate ({name})")
            scores[name] = linear.topk_accuracy(logits, labels)
            counts[name] = len(labels)
        details = {"training": "random crop + flip", "steps_per_epoch": steps_per_epoch}
        num_train = len(chosen)
    primary = "original" if "original" in scores else "mixed_rand"
    metrics, num_eval = scores[primary], counts[primary]

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
        "embedding": {"name": config.embedding, "mask_methods": mask_methods,
                      "empty_regions": empty_regions or None},
        "weight_decay": weight_decay,
        "weight_decay_selection": selection,
        "background": _background_summary(config, scores),
        "extra_eval": extra_scores(config, scores, counts),
        "config": dataclasses.asdict(config),
        "seconds": round(time.time() - started, 1),
        "versions": saved_encoder.versions(),
    }
    atomic.write_json_atomic(os.path.join(config.output_dir, RESULTS_FILE), results)
    return results


def _empty_regions(features: linear.Features) -> Optional[int]:
    """Examples whose pooled region covers no pixel (they pool to the zero vector)."""
    if features.region_fractions is None:
        return None
    return int(np.sum(features.region_fractions <= 0.0))


def _evaluation_sets(config: EvaluationConfig) -> Dict[str, str]:
    """Eval background name -> file pattern; writes the mixed_rand records when needed."""
    sets = {}
    if config.eval_background in ("original", "both"):
        sets["original"] = config.eval_files
    if config.eval_background in ("mixed_rand", "both"):
        summary = background_shift.shift_records(
            config.eval_files, os.path.join(config.output_dir, SHIFTED_EVAL_DIR),
            mode="mixed_rand", seed=config.background_seed, flag="eval_files")
        sets["mixed_rand"] = ",".join(summary["outputs"])
    sets.update(config.extra_eval_files)
    return sets


def _background_summary(config: EvaluationConfig,
                        scores: Dict[str, Dict[str, float]]) -> Optional[Dict[str, Any]]:
    """None for the original records only; else each background's top-1 / top-5 and, with
    both, ``gap_top1 = original − mixed_rand``."""
    if config.eval_background == "original":
        return None
    summary: Dict[str, Any] = {"eval_background": config.eval_background,
                               "seed": config.background_seed,
                               "shifted_eval_dir": SHIFTED_EVAL_DIR,
                               **{k: v for k, v in scores.items() if k in EVAL_BACKGROUNDS}}
    if "original" in scores and "mixed_rand" in scores:
        summary["gap_top1"] = scores["original"]["top1"] - scores["mixed_rand"]["top1"]
    return summary
