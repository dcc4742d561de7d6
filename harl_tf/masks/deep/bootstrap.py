"""Mask bootstrapping: conventional masks → HARL pretraining → deep masks from that encoder →
HARL pretraining on the deep masks → … as one resumable plan of tool runs.

Round ``r`` (``0 .. rounds−1``) under ``work_dir/round<r>/``:

=============  =========================================================================
``masks``      round 0: the conventional masks (``conventional_masks_dir``, or computed
               by ``tools/generate_masks.py``); round r > 0: the deep masks of round
               r−1's saliency model, for every training image.
``quality``    mean IoU of those masks against exact masks (only with ``exact_masks_dir``;
               scoring only, never training).
``records``    TFRecords of the training images with those masks (``build_tfrecords``).
``pretrain``   ``harl_tf.pretrain --flagfile=<recipe>`` on those records.
``export``     the encoder SavedModel (``harl_tf.export``).
``knn``,       the encoder's k-NN and linear-probe top-1 (``harl_tf.finetune``) on the
``linear``     labelled evaluation records (built once from ``data_dir``'s train and test
               splits unless given).
``head``       ``train_saliency_head`` on the export (flags from ``saliency_flagfile``),
               pseudo-masks: the conventional masks (``head_labels="conventional"``) or
               this round's masks (``"round"``).
=============  =========================================================================

With ``round0_export`` (an encoder already pretrained on the conventional masks, e.g. one
kept by bench.keep_encoders), round 0 has no records, pretraining or export: it evaluates that
encoder and trains its saliency head. After the last round, ``round<rounds>/masks`` and
its ``quality`` record the last encoder's masks. Every step is a child process with its log in ``work_dir/logs/`` and a
*marker*, the file it writes last (``summary.json``, ``manifest.json``,
``harl_export.json``, ``results.json``, ``saliency_head.json``; for the pretraining, a
stamp written when it exits with status 0): a step whose marker exists is skipped, so a
stopped run resumes where it stopped (pretraining resumes from its own checkpoints).
:func:`summarize` collects every round's figures into ``work_dir/bootstrap.json``.
"""
from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
import time
from typing import Callable, Dict, List, Optional, Sequence

from harl_tf import atomic
from harl_tf.errors import ConfigError, MissingPathError

SUMMARY_FILE = "bootstrap.json"
PRETRAINED_STAMP = "bootstrap_pretrained.json"  # written when the pretraining exits with 0


@dataclasses.dataclass(frozen=True)
class BootstrapConfig:
    """Everything a bootstrapping run needs (paths are used as given)."""
    data_dir: str                      # dataset root: train/images/<class>/…, test/…
    work_dir: str
    recipe_flagfile: str               # HARL pretraining recipe (harl_tf.pretrain)
    rounds: int = 2
    saliency_flagfile: Optional[str] = None  # train_saliency_head settings
    conventional_masks_dir: Optional[str] = None  # round 0 masks (else computed)
    exact_masks_dir: Optional[str] = None    # train masks, for scoring only
    eval_train_files: Optional[str] = None   # labelled records for k-NN / linear
    eval_test_files: Optional[str] = None
    head_labels: str = "conventional"        # or "round"
    round0_export: Optional[str] = None      # an encoder export: round 0 is not pretrained
    head_limit: int = 2000                   # images the saliency head learns from
    pretrain_flags: Sequence[str] = ()       # extra flags for every pretraining
    eval_flags: Sequence[str] = ("--image_size=64", "--crop_fraction=1.0",
                                 "--eval_batch_size=128")
    linear_flags: Sequence[str] = ("--epochs=50", "--learning_rate=0.5",
                                   "--batch_size=128")
    knn_flags: Sequence[str] = ("--knn_k=20", "--knn_temperature=0.07")
    num_workers: int = 2
    seed: int = 0

    def __post_init__(self):
        if self.rounds < 1:
            raise ConfigError(f"bootstrap: rounds must be >= 1, got {self.rounds}")
        if self.head_labels not in ("conventional", "round"):
            raise ConfigError(f"bootstrap: head_labels must be 'conventional' or 'round', got "
                              f"{self.head_labels!r}")
        if (self.eval_train_files is None) != (self.eval_test_files is None):
            raise ConfigError("bootstrap: give both eval_train_files and eval_test_files, or "
                              "neither (then they are built from data_dir)")
        for name in ("data_dir", "recipe_flagfile", "saliency_flagfile",
                     "conventional_masks_dir", "exact_masks_dir", "round0_export"):
            path = getattr(self, name)
            if path is not None and not os.path.exists(path):
                raise MissingPathError(f"bootstrap: {name} {path} does not exist")
        if not os.path.isdir(os.path.join(self.data_dir, "train", "images")):
            raise MissingPathError(f"bootstrap: {self.data_dir} has no train/images folder")


@dataclasses.dataclass(frozen=True)
class Step:
    """One tool run: ``command`` (argv) is skipped when ``marker`` exists. ``stamp``: the
    tool writes no file of its own at the end, so :func:`run` writes ``marker`` after the
    command succeeds."""
    round: int
    name: str
    command: List[str]
    marker: str
    log: str
    stamp: bool = False

    @property
    def done(self) -> bool:
        return os.path.exists(self.marker)


def round_dir(config: BootstrapConfig, index: int) -> str:
    return os.path.join(config.work_dir, f"round{index}")


def _paths(config: BootstrapConfig, index: int) -> Dict[str, str]:
    base = round_dir(config, index)
    return {name: os.path.join(base, name) for name in (
        "masks", "records", "model", "export", "knn", "linear", "saliency_model")} | {
        "quality": os.path.join(base, "mask_quality.json")}


def _python(module: str, *args: str) -> List[str]:
    return [sys.executable, "-m", module, *args]


def _mask_steps(config: BootstrapConfig, index: int, log) -> List[Step]:
    """The masks of round ``index`` and their quality."""
    p = _paths(config, index)
    images = os.path.join(config.data_dir, "train", "images")
    steps = []
    if index == 0 and config.conventional_masks_dir:
        masks_dir = config.conventional_masks_dir
    else:
        masks_dir = p["masks"]
        method = (["--method=conventional", f"--num_workers={config.num_workers}"]
                  if index == 0 else
                  ["--method=deep", f"--mask_model={_paths(config, index - 1)['saliency_model']}",
                   "--num_workers=1"])
        steps.append(Step(index, "masks", _python(
            "harl_tf.cli.generate_masks", f"--images_dir={images}", f"--masks_dir={masks_dir}",
            *method, "--noprogress"), os.path.join(masks_dir, "summary.json"), log("masks")))
    if config.exact_masks_dir:
        steps.append(Step(index, "quality", _python(
            "harl_tf.cli.mask_quality", f"--pred_dir={masks_dir}",
            f"--gt_dir={config.exact_masks_dir}", f"--output_json={p['quality']}"),
            p["quality"], log("quality")))
    return steps


def masks_dir_of(config: BootstrapConfig, index: int) -> str:
    if index == 0 and config.conventional_masks_dir:
        return config.conventional_masks_dir
    return _paths(config, index)["masks"]


def eval_files(config: BootstrapConfig) -> Dict[str, str]:
    if config.eval_train_files:
        return {"train": config.eval_train_files, "test": config.eval_test_files}
    records = os.path.join(config.work_dir, "eval_records")
    return {"train": os.path.join(records, "train-*.tfrecord"),
            "test": os.path.join(records, "test-*.tfrecord")}


def _pretraining_steps(config: BootstrapConfig, index: int, p: Dict[str, str],
                       classes_flag: List[str], log) -> List[Step]:
    """Round ``index``'s records of its masks, its pretraining and its export."""
    method_name = "conventional" if index == 0 else f"deep_round{index}"
    return [
        Step(index, "records", _python(
            "harl_tf.cli.build_tfrecords", "--source=folder",
            f"--images_dir={os.path.join(config.data_dir, 'train', 'images')}",
            f"--masks_dir={masks_dir_of(config, index)}", *classes_flag,
            f"--mask_method_name={method_name}", f"--output_dir={p['records']}",
            f"--num_workers={config.num_workers}", "--noprogress"),
            os.path.join(p["records"], "manifest.json"), log("records")),
        # A stopped pretraining resumes from its own checkpoints.
        Step(index, "pretrain", _python(
            "harl_tf.pretrain", f"--flagfile={config.recipe_flagfile}",
            f"--train_files={os.path.join(p['records'], 'train-*.tfrecord')}",
            f"--model_dir={p['model']}", f"--seed={config.seed}", *config.pretrain_flags),
            os.path.join(p["model"], PRETRAINED_STAMP), log("pretrain"), stamp=True),
        Step(index, "export", _python(
            "harl_tf.export", f"--model_dir={p['model']}", f"--export_dir={p['export']}",
            "--overwrite"), os.path.join(p["export"], "harl_export.json"), log("export"))]


def plan(config: BootstrapConfig) -> List[Step]:
    """Every step of the run, in order (done or not)."""
    logs = os.path.join(config.work_dir, "logs")
    steps: List[Step] = []
    classes = os.path.join(config.data_dir, "classes.txt")
    classes_flag = [f"--classes_file={classes}"] if os.path.isfile(classes) else []
    if not config.eval_train_files:
        # Labelled records of both splits for the probes; they read images and labels only.
        records = os.path.join(config.work_dir, "eval_records")
        steps.append(Step(-1, "eval_records", _python(
            "harl_tf.cli.build_tfrecords", "--source=folder", f"--images_dir={config.data_dir}",
            "--splits=train,test", f"--output_dir={records}", "--mask_method_name=exact",
            f"--num_workers={config.num_workers}", "--noprogress"),
            os.path.join(records, "manifest.json"), os.path.join(logs, "eval_records.log")))
    files = eval_files(config)
    for index in range(config.rounds + 1):
        def log(name, index=index):
            return os.path.join(logs, f"round{index}_{name}.log")
        steps += _mask_steps(config, index, log)
        if index == config.rounds:
            break
        p = _paths(config, index)
        if index == 0 and config.round0_export:  # an encoder pretrained before: evaluate it
            p["export"] = config.round0_export
        else:
            steps += _pretraining_steps(config, index, p, classes_flag, log)
        for mode, extra in (("knn", config.knn_flags), ("linear", config.linear_flags)):
            steps.append(Step(index, mode, _python(
                "harl_tf.finetune", f"--mode={mode}", f"--encoder={p['export']}",
                f"--train_files={files['train']}", f"--eval_files={files['test']}",
                f"--output_dir={p[mode]}", f"--seed={config.seed}", "--verbose=0",
                *config.eval_flags, *extra),
                os.path.join(p[mode], "results.json"), log(mode)))
        labels = masks_dir_of(config, 0 if config.head_labels == "conventional" else index)
        saliency = [f"--flagfile={config.saliency_flagfile}"] if config.saliency_flagfile else []
        steps.append(Step(index, "head", _python(
            "harl_tf.cli.train_saliency_head", *saliency, f"--encoder={p['export']}",
            f"--images_dir={os.path.join(config.data_dir, 'train', 'images')}",
            f"--pseudo_masks_dir={labels}", f"--output={p['saliency_model']}",
            f"--limit={config.head_limit}", f"--seed={config.seed}"),
            os.path.join(p["saliency_model"], "saliency_head.json"), log("head")))
    return steps


class StepFailed(RuntimeError):
    """A tool run ended with a non-zero exit status."""


def run_step(step: Step) -> None:
    """Runs one step's command, its output appended to its log."""
    os.makedirs(os.path.dirname(step.log), exist_ok=True)
    with open(step.log, "a") as log:
        log.write("$ " + " ".join(step.command) + "\n")
        log.flush()
        status = subprocess.call(step.command, stdout=log, stderr=subprocess.STDOUT)
    if status != 0:
        raise StepFailed(f"round {step.round} {step.name}: exit status {status}; see {step.log}")


def run(config: BootstrapConfig, *, runner: Callable[[Step], None] = run_step,
        echo: Callable[[str], None] = print) -> dict:
    """Runs every step not yet done, in order, then writes and returns the summary."""
    for step in plan(config):
        if step.done:
            echo(f"round {step.round} {step.name}: done ({step.marker})")
            continue
        echo(f"round {step.round} {step.name}: running (log {step.log})")
        started = time.time()
        runner(step)
        if step.stamp:
            atomic.write_json_atomic(step.marker, {"command": step.command,
                                                   "seconds": time.time() - started})
        if not step.done:
            raise StepFailed(f"round {step.round} {step.name}: finished without writing "
                             f"{step.marker}; see {step.log}")
        echo(f"round {step.round} {step.name}: {time.time() - started:.0f} s")
    return summarize(config)


def _read(path: str) -> Optional[dict]:
    if not os.path.isfile(path):
        return None
    with open(path) as f:
        return json.load(f)


def summarize(config: BootstrapConfig) -> dict:
    """Every round's figures (mask IoU, k-NN and linear top-1), written to
    ``work_dir/bootstrap.json``; missing figures are ``None``."""
    rounds = []
    for index in range(config.rounds + 1):
        p = _paths(config, index)
        quality = _read(p["quality"]) or {}
        entry = {"round": index, "masks": masks_dir_of(config, index),
                 "mask_method": "conventional" if index == 0 else f"deep (round {index - 1} "
                                                                   "encoder)",
                 "mask_mean_iou": quality.get("mean_iou")}
        if index < config.rounds:
            knn, linear = _read(os.path.join(p["knn"], "results.json")), _read(
                os.path.join(p["linear"], "results.json"))
            entry.update(export=p["export"], knn_top1=(knn or {}).get("top1"),
                         linear_top1=(linear or {}).get("top1"))
        rounds.append(entry)
    summary = {"config": dataclasses.asdict(config), "rounds": rounds}
    os.makedirs(config.work_dir, exist_ok=True)
    atomic.write_json_atomic(os.path.join(config.work_dir, SUMMARY_FILE), summary)
    return summary
