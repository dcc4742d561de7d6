r"""Small-scale reproduction: does HARL's mask pooling beat BYOL at the same budget?

    # the learning benchmark: fmnist-scenes, the shipped CPU-scale recipe, one seed
    python -m bench.bench_learning --dataset=fmnist_scenes \
        --recipe_flagfile=flags/fmnist_scenes_base.cfg --linear_probe=grid \
        --eval_background=both --records_dir=/tmp/harl_bench_records \
        --work_dir=/tmp/harl_bench_fms_s0 --seed=0 --results_name=bench_learning_fmnist_scenes_s0
    python -m bench.bench_learning --work_dir=/tmp/harl_bench_learning     # cutouts, ~1 h
    python -m bench.bench_learning --dataset=fashion_mnist \
        --extra_pretrain_flags=--train_steps=300 --work_dir=/tmp/harl_bench_fmnist

The recipe (encoder, heads, views, optimiser, schedules, steps) is a ``harl_tf.pretrain``
flagfile, ``--recipe_flagfile`` (default ``flags/bench_cutouts_base.cfg``, the small budget
of the cutouts and Fashion-MNIST runs), with ``--extra_pretrain_flags`` after it: the same
flags, read by ``harl_tf.pretrain``'s own definitions, so nothing is declared twice.
Evaluation uses the recipe's encoder, image size and batch.

fmnist-scenes (../shared/data/fmnist-scenes): Fashion-MNIST items on photographs with exact
masks. Its conventional masks are computed once with ``tools.generate_masks`` and both mask
sources are built from symbolic-link trees. ``--eval_split=validation`` holds out 2,000
train images (fixed permutation) and scores on them: the split every recipe choice is
made on (``bench.sweep_learning``); ``--eval_split=test`` pretrains on all 10,000
train images and scores on the 2,000 test images. ``supervised`` trains the same encoder
with labels for the same number of images (the ceiling at this budget).

Data (cutouts, ../shared/data/cutouts): the train split's images pretrain (its labels
are never seen by the encoder: only by the online probe, which is stop-gradient, and by
the linear probe / k-NN afterwards); the test split is only scored. TFRecords are built
twice with the real ``tools.build_tfrecords``: masks from ``--mask_method=conventional``
(unsupervised saliency) and the folder's exact masks (``--mask_method_name=ground_truth``).
Fashion-MNIST: the idx files are written out as a PNG folder under the work dir (28 px,
grey → RGB, upsampled to 64 px) and built with conventional masks and ``pixel > 0`` masks.

Methods, all at an identical budget (same encoder, heads, batch, steps, augmentations,
optimiser, data order via ``--seed --deterministic``), each one ``harl_tf.pretrain``
subprocess, run one after the other:

- ``random``: randomly initialised encoder (no pretraining; ``--encoder=random``);
- ``byol``: ``--loss_mode=byol`` (λ = 0; the masks are read but weighted 0);
- ``mask_conventional``: ``--loss_mode=mask`` (α 0.7 cosine), conventional masks;
- ``hybrid_conventional``: ``--loss_mode=hybrid`` (SPEC §5 defaults α = λ = 0.7, cosine);
- ``hybrid_ground_truth``: the same with exact masks (upper bound for the mask source).

Each pretrained encoder is exported (``harl_tf.export --output_stride=keep``) and scored on
the test split by ``harl_tf.finetune``: ``--mode=linear`` (precomputed centre-crop features
standardised with the train split's statistics,
fixed recipe, never tuned on test) and ``--mode=knn`` (k = 20, cosine similarity,
exp(cos/0.07) votes). Plots: training curves (from the TensorBoard events each run writes
to ``model_dir/train``) and a t-SNE map of test embeddings, BYOL beside HARL hybrid.
Diagnosis (cutouts): how much of the mean background colour, object colour and class the
11 k-means clusters of each method's test embeddings explain (η²) — the backgrounds come
from 11 photographs, so an encoder that keys on the background shows η²(background) ≫
η²(object).

Stages are resumable: a stage whose output exists (records' manifest.json, a completed
run's summary.json with the same config, results.json) is not run again, so the script
can be re-invoked with more ``--methods`` and aggregates everything in ``--work_dir``.
Writes ``bench/results/bench_learning[_<dataset>].json``, and PNGs next to it (regenerated
by every report, not committed).
"""
from __future__ import annotations

import contextlib
import glob
import json
import os
import sys

import numpy as np
from absl import app, flags

from bench import common
from bench.common.data import write_fashion_mnist_folder

FLAGS = flags.FLAGS
flags.DEFINE_enum("dataset", "cutouts", ["cutouts", "fashion_mnist", "fmnist_scenes"],
                  "Dataset.")
flags.DEFINE_string("data_dir", "", "Dataset root (default: ../shared/data/<dataset>).")
flags.DEFINE_string("work_dir", "/tmp/harl_bench_learning", "Runs and evaluations.")
flags.DEFINE_string("deep_masks_dir", "", "fmnist_scenes: deep masks of its train and test "
                    "images (tools.generate_masks --method=deep, run on each split: "
                    "<dir>/train/<class>/<id>.png, <dir>/test/...), the mask source of the "
                    "*_deep methods (issue 26: HARL on deep masks).")
flags.DEFINE_string("records_dir", "", "Records (and fmnist_scenes' split folders and "
                    "conventional masks), shared by work dirs (default: work_dir/records).")
flags.DEFINE_enum("eval_split", "test", ["test", "validation"],
                  "fmnist_scenes: score on the test split (pretrain on all of train), or on "
                  "a validation split carved from train (pretrain and fit probes on the "
                  "rest): the split every recipe choice is made on.")
flags.DEFINE_integer("validation_size", 2000, "Train images held out by --eval_split="
                     "validation (a fixed permutation, seed 0, whatever --seed).")
flags.DEFINE_list("methods", ["random", "byol", "mask_conventional", "hybrid_conventional",
                              "hybrid_ground_truth"], "Methods (see the module docstring).")
flags.DEFINE_list("stages", ["build", "pretrain", "evaluate", "report"],
                  "Stages to run (each skips work already done).")
# The budget (identical for every method): a harl_tf.pretrain flagfile and extra flags.
flags.DEFINE_string("recipe_flagfile", "flags/bench_cutouts_base.cfg",
                    "The pretraining recipe, a harl_tf.pretrain flagfile (relative to the "
                    "repository root, or absolute; e.g. flags/fmnist_scenes_base.cfg): every "
                    "run passes it to harl_tf.pretrain, and evaluation reads the encoder, "
                    "image size, batch and steps from it. It must set --train_steps.")
flags.DEFINE_string("extra_pretrain_flags", "", "Space-separated harl_tf.pretrain flags "
                    "after the recipe, for every method's run (e.g. "
                    "'--train_steps=1000 --output_stride=8').")
flags.DEFINE_integer("seed", 0, "Seed of the views and data order (--deterministic).")
# Evaluation (a fixed recipe: never tuned on the test split).
flags.DEFINE_integer("linear_epochs", 50, "Linear probe epochs (precomputed features).")
flags.DEFINE_float("linear_learning_rate", 0.5, "Linear probe peak SGD learning rate.")
flags.DEFINE_integer("knn_k", 20, "k of the k-NN classifier.")
flags.DEFINE_enum("linear_probe", "fixed", ["fixed", "grid"],
                  "fixed: no weight decay, --linear_epochs at --linear_learning_rate; grid: "
                  "the same with the weight decay chosen by finetune's --weight_decay_grid "
                  "on a validation split of the train features (never the scored split).")
flags.DEFINE_enum("eval_background", "original", ["original", "both"],
                  "both: also score every encoder on mixed_rand backgrounds (Xiao et al. "
                  "2021: each object pasted on another class's background) and report the "
                  "gap.")
flags.DEFINE_integer("fashion_mnist_train", 10000, "Fashion-MNIST train images used.")
flags.DEFINE_integer("fashion_mnist_test", 2000, "Fashion-MNIST test images used.")
flags.DEFINE_integer("tsne_points", 1000, "Test embeddings in the t-SNE map.")
flags.DEFINE_string("results_name", "", "Results file stem (default bench_learning"
                    "[_fashion_mnist]).")
# Internal: child process that writes test embeddings (keeps TensorFlow out of the parent).
flags.DEFINE_string("_embed_encoder", "", "internal")
flags.DEFINE_string("_embed_files", "", "internal")
flags.DEFINE_string("_embed_out", "", "internal")

PY = sys.executable
ROOT = common.ROOT

# name → (loss_mode, mask source) ; loss_mode None = no pretraining.
METHODS = {
    "random": (None, None),
    "byol": ("byol", "conventional"),
    "mask_conventional": ("mask", "conventional"),
    "hybrid_conventional": ("hybrid", "conventional"),
    "mask_ground_truth": ("mask", "ground_truth"),
    "hybrid_ground_truth": ("hybrid", "ground_truth"),
    "mask_deep": ("mask", "deep"),
    "hybrid_deep": ("hybrid", "deep"),
    "supervised": (None, None),
}
# Trained with labels instead of pretrained: the ceiling at the same encoder and budget.
SUPERVISED = ("supervised",)


def _paths():
    w = FLAGS.work_dir
    return {"records": os.path.join(w, "records"), "runs": os.path.join(w, "runs"),
            "evals": os.path.join(w, "evals"), "exports": os.path.join(w, "exports"),
            "logs": os.path.join(w, "logs")}


# Data -------------------------------------------------------------------------------------

def _data_dir() -> str:
    if FLAGS.data_dir:
        return FLAGS.data_dir
    return os.path.join("../shared/data", {"cutouts": "cutouts", "fashion_mnist": "fashion-mnist",
                                           "fmnist_scenes": "fmnist-scenes"}[FLAGS.dataset])


def _records_root() -> str:
    return FLAGS.records_dir or _paths()["records"]


def _eval_name() -> str:
    """The scored split's name in the records: 'val' for --eval_split=validation."""
    return "val" if FLAGS.dataset == "fmnist_scenes" and FLAGS.eval_split == "validation" \
        else "test"


def _records(masks: str) -> str:
    """Records directory of a mask source: 'conventional' or 'ground_truth'."""
    short = "gt" if masks == "ground_truth" else masks
    if FLAGS.dataset == "fmnist_scenes":
        short = f"{FLAGS.eval_split}_{short}"
    return os.path.join(_records_root(), f"{FLAGS.dataset}_{short}")


def _num_train() -> int:
    if FLAGS.dataset == "cutouts":
        return 3000
    if FLAGS.dataset == "fashion_mnist":
        return FLAGS.fashion_mnist_train
    manifest = os.path.join(_records("ground_truth"), "manifest.json")
    with open(manifest) as f:
        return int(json.load(f)["splits"]["train"]["num_records"])


def _fmnist_scenes_folders() -> dict:
    """fmnist_scenes as folders for the builder: {mask source: images root}.

    Conventional masks are computed once for every train and test image (the real
    ``tools.generate_masks``, no labels). Each mask source gets a tree of symbolic links,
    ``<split>/images/<class>/<id>.jpg`` + ``<split>/masks/...``, with the splits
    train/test (--eval_split=test) or train/val (--eval_split=validation: ``validation_size``
    train images, a fixed seed-0 permutation, held out; the test split is not linked at all).
    """
    src = os.path.abspath(_data_dir())
    root = os.path.join(_records_root(), "fmnist_scenes_folders")
    conv = os.path.join(root, "conventional_masks")
    for split in ("train", "test"):
        if not os.path.exists(os.path.join(conv, split, "summary.json")):
            common.run([PY, "-m", "tools.generate_masks",
                        f"--images_dir={src}/{split}/images", f"--masks_dir={conv}/{split}",
                        "--method=conventional", "--num_workers=2", "--noprogress"],
                       os.path.join(_paths()["logs"], f"masks_{split}.log"))
    images = sorted(glob.glob(os.path.join(src, "train", "images", "*", "*.jpg")))
    order = np.random.default_rng(0).permutation(len(images))
    held_out = set(order[:FLAGS.validation_size].tolist())
    layout = {"test": {"train": [(p, "train") for p in images],
                       "test": [(p, "test") for p in sorted(glob.glob(
                           os.path.join(src, "test", "images", "*", "*.jpg")))]},
              "validation": {"train": [(p, "train") for i, p in enumerate(images)
                                       if i not in held_out],
                             "val": [(p, "train") for i, p in enumerate(images)
                                     if i in held_out]}}[FLAGS.eval_split]
    out = {}
    for masks in _mask_sources():
        tree = os.path.join(root, f"{FLAGS.eval_split}_{masks}")
        out[masks] = tree
        if masks == "deep":  # one records_dir holds one set of deep masks, never two
            _check_deep_source(tree)
        if os.path.exists(os.path.join(tree, "classes.txt")):
            continue
        for split, entries in layout.items():
            for image, source_split in entries:
                rel = os.path.relpath(image, os.path.join(src, source_split, "images"))
                mask = {"ground_truth": os.path.join(src, source_split, "masks", rel),
                        "conventional": os.path.join(conv, source_split, rel),
                        "deep": os.path.join(FLAGS.deep_masks_dir, source_split, rel)}[masks]
                mask = os.path.splitext(mask)[0] + ".png"
                for kind, target in (("images", image), ("masks", mask)):
                    link = os.path.join(tree, split, kind, os.path.splitext(rel)[0]
                                        + os.path.splitext(target)[1])
                    os.makedirs(os.path.dirname(link), exist_ok=True)
                    if not os.path.lexists(link):
                        os.symlink(target, link)
        with open(os.path.join(src, "classes.txt")) as f:
            classes = f.read()
        with open(os.path.join(tree, "classes.txt.tmp"), "w") as f:
            f.write(classes)
        os.replace(os.path.join(tree, "classes.txt.tmp"), os.path.join(tree, "classes.txt"))
    return out


def _mask_sources() -> tuple:
    """The mask sources whose records fmnist_scenes builds: deep ones too with
    --deep_masks_dir (each of its masks checked to exist before any link is made)."""
    if not FLAGS.deep_masks_dir:
        return ("ground_truth", "conventional")
    src = os.path.abspath(_data_dir())
    for split in ("train", "test"):
        for image in glob.glob(os.path.join(src, split, "images", "*", "*.jpg")):
            rel = os.path.relpath(image, os.path.join(src, split, "images"))
            mask = os.path.join(FLAGS.deep_masks_dir, split, os.path.splitext(rel)[0] + ".png")
            if not os.path.exists(mask):
                raise app.UsageError(f"--deep_masks_dir: no mask {mask} for {image}; run "
                                     "tools.generate_masks --method=deep on that split.")
    return ("ground_truth", "conventional", "deep")


def _check_deep_source(tree: str) -> None:
    """Records the --deep_masks_dir a records_dir's deep tree links to; another one is a
    UsageError (its records would silently hold the first masks)."""
    source = os.path.join(tree, "deep_masks_dir.txt")
    wanted = os.path.abspath(FLAGS.deep_masks_dir)
    if os.path.exists(source):
        with open(source) as f:
            held = f.read().strip()
        if held != wanted:
            raise app.UsageError(f"--records_dir holds records of the deep masks in {held}, "
                                 f"not {wanted}; use another --records_dir.")
        return
    os.makedirs(tree, exist_ok=True)
    with open(source + ".tmp", "w") as f:
        f.write(wanted + "\n")
    os.replace(source + ".tmp", source)


def _fashion_mnist_folder() -> str:
    """The Fashion-MNIST subset as images/ + masks/ (pixel > 0) PNG folders
    (``common.data.write_fashion_mnist_folder``)."""
    return write_fashion_mnist_folder(_data_dir(), os.path.join(FLAGS.work_dir,
                                                                "fashion_mnist_folder"),
                                      num_train=FLAGS.fashion_mnist_train,
                                      num_test=FLAGS.fashion_mnist_test)


def build_records() -> dict:
    """Both record sets (skipped when their manifest exists); returns seconds per set."""
    seconds = {}
    if FLAGS.dataset == "fmnist_scenes":
        folders = _fmnist_scenes_folders()
        for masks in folders:  # its mask sources, deep masks checked once
            out = _records(masks)
            if os.path.exists(os.path.join(out, "manifest.json")):
                continue
            seconds[masks] = common.run(
                [PY, "-m", "tools.build_tfrecords", "--source=folder",
                 f"--images_dir={folders[masks]}", f"--splits=train,{_eval_name()}",
                 f"--output_dir={out}", f"--mask_method_name={masks}", "--num_workers=2",
                 "--noprogress"], os.path.join(_paths()["logs"], f"build_{masks}.log"))
        return seconds
    images_dir = _data_dir() if FLAGS.dataset == "cutouts" else _fashion_mnist_folder()
    for masks, extra, splits in (
            ("ground_truth", ["--mask_method_name=ground_truth"], "train,test"),
            ("conventional", ["--mask_method=conventional"], "train")):
        out = _records(masks)
        if os.path.exists(os.path.join(out, "manifest.json")):
            continue
        seconds[masks] = common.run([PY, "-m", "tools.build_tfrecords", "--source=folder",
                                     f"--images_dir={images_dir}", f"--splits={splits}",
                                     f"--output_dir={out}", "--num_workers=2", "--noprogress"]
                                    + extra,
                                    os.path.join(_paths()["logs"], f"build_{masks}.log"))
    return seconds


def mask_quality() -> dict:
    """Mean IoU of the conventional masks against the ground-truth ones, train split."""
    out = os.path.join(FLAGS.work_dir, "mask_quality_train.json")
    if not os.path.exists(out):
        common.run([PY, "-m", "tools.mask_quality",
                    f"--pred_records={_records('conventional')}/train-*.tfrecord",
                    f"--gt_records={_records('ground_truth')}/train-*.tfrecord",
                    f"--output_json={out}"], os.path.join(_paths()["logs"], "mask_quality.log"))
    with open(out) as f:
        return json.load(f)


# Pretraining ------------------------------------------------------------------------------

_RECIPE = {}


def recipe() -> dict:
    """``{harl_tf.pretrain flag: value}`` of the runs: --recipe_flagfile followed by
    --extra_pretrain_flags, parsed by harl_tf.pretrain's own flag definitions
    (``config.parse_argv``), nested flagfiles resolved from the repository root as the runs
    resolve them. Parsed once; UsageError for a bad recipe or one without --train_steps."""
    key = (FLAGS.recipe_flagfile, FLAGS.extra_pretrain_flags)
    if key not in _RECIPE:
        from harl_tf import config
        try:
            with contextlib.chdir(ROOT):
                values = config.parse_argv(config.PretrainConfig, [
                    f"--flagfile={FLAGS.recipe_flagfile}",
                    *FLAGS.extra_pretrain_flags.split()]).flag_values()
        except config.ConfigError as err:
            raise app.UsageError(f"--recipe_flagfile / --extra_pretrain_flags: {err}")
        if values["train_steps"] <= 0:
            raise app.UsageError(f"--recipe_flagfile={FLAGS.recipe_flagfile} must set "
                                 "--train_steps (the runs are compared at a step budget).")
        _RECIPE[key] = values
    return _RECIPE[key]


def pretrain_flags(method: str) -> list:
    """The full flag list of one method's run: identical except --loss_mode and records.

    The budget (encoder, heads, views, optimiser, schedules, steps) is --recipe_flagfile;
    the run's own paths, data and bookkeeping follow it, then --extra_pretrain_flags (the
    last word)."""
    loss_mode, masks = METHODS[method]
    num_train = _num_train()
    num_classes = 8 if FLAGS.dataset == "cutouts" else 10
    budget = [f"--flagfile={os.path.join(ROOT, FLAGS.recipe_flagfile)}"]
    return budget + [
        f"--train_files={_records(masks)}/train-*.tfrecord",
        f"--model_dir={os.path.join(_paths()['runs'], method)}",
        f"--loss_mode={loss_mode}", f"--num_train_examples={num_train}",
        # Online probe on the train labels: stop-gradient, for the training curves only.
        f"--num_classes={num_classes}",
        f"--shuffle_buffer={num_train}", f"--seed={FLAGS.seed}", "--deterministic",
        "--strategy=default", f"--checkpoint_every_steps={max(recipe()['train_steps'] // 2, 1)}",
        "--keep_checkpoints=1", "--log_every_steps=10", "--image_summaries=0",
    ] + FLAGS.extra_pretrain_flags.split()


def pretrain(method: str) -> dict:
    """Runs (or reuses) one method's pretraining; returns its summary.json."""
    model_dir = os.path.join(_paths()["runs"], method)
    summary_path = os.path.join(model_dir, "summary.json")
    if os.path.exists(summary_path):
        with open(summary_path) as f:
            summary = json.load(f)
        same_budget = summary.get("total_steps") == recipe()["train_steps"]
        if summary.get("completed") and same_budget:
            print(f"{method}: pretraining done before, reusing {model_dir}", flush=True)
            return summary
        if same_budget:
            # Stopped (SIGTERM, a lost worker): the same flags resume from its checkpoint;
            # harl_tf.pretrain refuses a model_dir whose encoder differs.
            print(f"{method}: resuming the stopped run in {model_dir} "
                  f"(step {summary.get('final_step')}/{summary['total_steps']})", flush=True)
        else:
            raise SystemExit(f"{model_dir} holds another run ({summary.get('final_step')}/"
                             f"{summary.get('total_steps')} steps); remove it or "
                             f"change --work_dir.")
    common.run([PY, "-m", "harl_tf.pretrain"] + pretrain_flags(method),
               os.path.join(_paths()["logs"], f"pretrain_{method}.log"),
               append=os.path.exists(summary_path))
    with open(summary_path) as f:
        return json.load(f)


# Evaluation -------------------------------------------------------------------------------

def _encoder_config() -> dict:
    return {name: recipe()[name]
            for name in ("depth", "width_multiplier", "output_stride", "small_stem")}


def _encoder_args(method: str) -> list:
    if METHODS[method][0] is None:
        return ["--encoder=random", f"--encoder_config={json.dumps(_encoder_config())}"]
    export_dir = os.path.join(_paths()["exports"], method)
    if not os.path.exists(os.path.join(export_dir, "harl_export.json")):
        common.run([PY, "-m", "harl_tf.export",
                    f"--model_dir={os.path.join(_paths()['runs'], method)}",
                    f"--export_dir={export_dir}", "--output_stride=keep", "--overwrite"],
                   os.path.join(_paths()["logs"], f"export_{method}.log"))
    return [f"--encoder={export_dir}"]


def supervised_epochs() -> int:
    """Epochs that give the supervised ceiling the pretraining budget (steps x batch)."""
    return max(1, round(recipe()["train_steps"] * recipe()["batch_size"] / _num_train()))


def evaluate(method: str) -> dict:
    """Linear probe and k-NN on the scored split; returns {mode: results.json}.

    ``supervised``: the same encoder trained from random init with labels
    (``finetune --mode=finetune``) for the pretraining budget's images; its own top-1.
    """
    out = {}
    gt = _records("ground_truth")
    files = [f"--train_files={gt}/train-*.tfrecord",
             f"--eval_files={gt}/{_eval_name()}-*.tfrecord"]
    if method in SUPERVISED:
        output_dir = os.path.join(_paths()["evals"], f"{method}_finetune")
        results_path = os.path.join(output_dir, "results.json")
        if not os.path.exists(results_path):
            common.run([PY, "-m", "harl_tf.finetune", "--mode=finetune", "--encoder=random",
                        f"--encoder_config={json.dumps(_encoder_config())}"] + files
                       + [f"--output_dir={output_dir}",
                          f"--image_size={recipe()['image_size']}", "--crop_fraction=1.0",
                          "--min_crop_area=0.2", f"--epochs={supervised_epochs()}",
                          f"--batch_size={recipe()['batch_size']}", "--learning_rate=0.1",
                          "--weight_decay=5e-4", "--eval_batch_size=128",
                          f"--seed={FLAGS.seed}", "--verbose=0"],
                       os.path.join(_paths()["logs"], f"finetune_{method}.log"))
        with open(results_path) as f:
            out["finetune"] = json.load(f)
        return out
    decay = ["--weight_decay=0.0"] if FLAGS.linear_probe == "fixed" else []
    background = [f"--eval_background={FLAGS.eval_background}"]
    for mode, extra in (("linear", [f"--epochs={FLAGS.linear_epochs}",
                                    f"--learning_rate={FLAGS.linear_learning_rate}",
                                    "--batch_size=128"] + decay + background),
                        ("knn", [f"--knn_k={FLAGS.knn_k}", "--knn_temperature=0.07"]
                         + background)):
        output_dir = os.path.join(_paths()["evals"], f"{method}_{mode}")
        results_path = os.path.join(output_dir, "results.json")
        if not os.path.exists(results_path):
            common.run([PY, "-m", "harl_tf.finetune", f"--mode={mode}"]
                       + _encoder_args(method) + files
                       + [f"--output_dir={output_dir}",
                          f"--image_size={recipe()['image_size']}", "--crop_fraction=1.0",
                          "--eval_batch_size=128", f"--seed={FLAGS.seed}", "--verbose=0"]
                       + extra, os.path.join(_paths()["logs"], f"finetune_{method}_{mode}.log"))
        with open(results_path) as f:
            out[mode] = json.load(f)
    return out


def embeddings(method: str) -> dict:
    """Test-split embeddings (global-average-pooled, centre crop) from a child process."""
    path = os.path.join(_paths()["evals"], f"{method}_embeddings.npz")
    if not os.path.exists(path):
        encoder = _encoder_args(method)[0].split("=", 1)[1]
        common.run([PY, "-m", "bench.bench_learning", f"--_embed_encoder={encoder}",
                    f"--_embed_files={_records('ground_truth')}/{_eval_name()}-*.tfrecord",
                    f"--_embed_out={path}", f"--recipe_flagfile={FLAGS.recipe_flagfile}",
                    f"--extra_pretrain_flags={FLAGS.extra_pretrain_flags}"],
                   os.path.join(_paths()["logs"], f"embed_{method}.log"))
    data = np.load(path)
    return {"features": data["features"], "labels": data["labels"]}


def _embed_child() -> None:
    from harl_tf.data import pipeline
    from harl_tf.downstream import encoder_source, linear
    source = encoder_source.load_encoder(FLAGS._embed_encoder, encoder_config=_encoder_config(),
                                         seed=FLAGS.seed)
    dataset = pipeline.eval_dataset(FLAGS._embed_files, 128, recipe()["image_size"],
                                    crop_fraction=1.0)
    features = linear.extract_features(source.encoder, dataset, desc="test embeddings")
    np.savez(FLAGS._embed_out + ".tmp.npz", features=features.features, labels=features.labels)
    os.replace(FLAGS._embed_out + ".tmp.npz", FLAGS._embed_out)


# Report -----------------------------------------------------------------------------------

def read_curves(model_dir: str) -> dict:
    """{tag: (steps, values)} from the run's TensorBoard events (model_dir/train)."""
    import tensorflow as tf
    curves = {}
    for path in sorted(glob.glob(os.path.join(model_dir, "train", "events.out.tfevents.*"))):
        for event in tf.compat.v1.train.summary_iterator(path):
            for value in event.summary.value:
                if value.HasField("tensor") and value.tensor.dtype == tf.float32.as_datatype_enum:
                    number = float(tf.make_ndarray(value.tensor))
                elif value.HasField("simple_value"):
                    number = float(value.simple_value)
                else:
                    continue
                curves.setdefault(value.tag, []).append((int(event.step), number))
    return {tag: [list(x) for x in zip(*sorted(points))] for tag, points in curves.items()}


def plot_curves(curves: dict, path: str) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    panels = [("loss", "training loss (each method's own objective)"),
              ("loss_glob", "global term ℓ(p_glob, z_glob), both directions"),
              ("loss_fg", "foreground term ℓ(p_fg, z_fg)"),
              ("probe_top1", "online linear probe top-1 (train batches)")]
    fig, axes = plt.subplots(1, len(panels), figsize=(5 * len(panels), 4))
    for ax, (tag, title) in zip(axes, panels):
        for method, tags in curves.items():
            if tag in tags:
                ax.plot(*tags[tag], label=method)
        ax.set_title(title, fontsize=10)
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_tsne(panels: dict, class_names, path: str, seed: int) -> dict:
    """t-SNE of each method's test embeddings (L2-normalised: the k-NN's geometry)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from sklearn.manifold import TSNE
    fig, axes = plt.subplots(1, len(panels), figsize=(6 * len(panels), 5.6))
    axes = np.atleast_1d(axes)
    cmap = plt.get_cmap("tab10")
    for ax, (title, data) in zip(axes, panels.items()):
        features, labels = data["features"], data["labels"]
        rng = np.random.default_rng(seed)
        keep = np.sort(rng.permutation(len(labels))[:FLAGS.tsne_points])
        x = features[keep] / (np.linalg.norm(features[keep], axis=1, keepdims=True) + 1e-12)
        points = TSNE(n_components=2, init="pca", perplexity=30, random_state=seed,
                      metric="cosine").fit_transform(x)
        for label in np.unique(labels):
            sel = labels[keep] == label
            ax.scatter(points[sel, 0], points[sel, 1], s=6, color=cmap(int(label) % 10),
                       label=class_names[int(label)] if class_names else str(label))
        ax.set_title(title, fontsize=10)
        ax.set_xticks([]), ax.set_yticks([])
    axes[-1].legend(fontsize=7, markerscale=2, loc="center left", bbox_to_anchor=(1, 0.5))
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return {"points": int(min(FLAGS.tsne_points, len(labels))), "perplexity": 30,
            "metric": "cosine", "init": "pca"}


def background_diagnosis(methods, seed: int) -> dict:
    """Does an embedding encode the background photograph or the object?

    k-means (11 clusters: the cutouts backgrounds come from 11 photographs) of each
    method's L2-normalised test embeddings; η² = share of the variance of a per-image
    quantity explained by the clusters, for the mean background colour, the mean object
    colour (exact masks) and the one-hot class. A diagnosis, not a choice: nothing is tuned.
    """
    from sklearn.cluster import KMeans
    from harl_tf.data import schema
    files = sorted(glob.glob(f"{_records('ground_truth')}/test-*.tfrecord"))
    labels, background, foreground = [], [], []
    for path in files:
        for example in schema.read_examples(path):
            image = example["image_array"].astype(np.float32) / 255.0
            mask = example["mask_array"] > 0
            labels.append(example["label"])
            background.append(image[~mask].mean(0) if (~mask).any() else np.zeros(3))
            foreground.append(image[mask].mean(0) if mask.any() else np.zeros(3))
    labels, background, foreground = map(np.asarray, (labels, background, foreground))

    def eta2(x, clusters):
        total = ((x - x.mean(0)) ** 2).sum()
        within = sum(((x[clusters == k] - x[clusters == k].mean(0)) ** 2).sum()
                     for k in np.unique(clusters))
        return float(1.0 - within / total)

    out = {}
    for method in methods:
        data = embeddings(method)
        if len(data["labels"]) != len(labels) or (data["labels"] != labels).any():
            print(f"{method}: embedding order differs from the records; diagnosis skipped")
            continue
        x = data["features"] / (np.linalg.norm(data["features"], axis=1, keepdims=True)
                                + 1e-12)
        clusters = KMeans(11, n_init=4, random_state=seed).fit_predict(x)
        out[method] = {"eta2_background_colour": round(eta2(background, clusters), 3),
                       "eta2_object_colour": round(eta2(foreground, clusters), 3),
                       "eta2_class": round(eta2(np.eye(labels.max() + 1)[labels], clusters), 3)}
    return out


def _class_names():
    path = os.path.join(_data_dir(), "classes.txt")
    if FLAGS.dataset == "fashion_mnist":
        path = os.path.join(FLAGS.work_dir, "fashion_mnist_folder", "classes.txt")
    if os.path.exists(path):
        with open(path) as f:
            return [line.strip() for line in f if line.strip()]
    return None


def main(argv) -> None:
    del argv
    if FLAGS._embed_out:
        return _embed_child()
    budget = recipe()  # a bad recipe stops here, before any work
    unknown = [m for m in FLAGS.methods if m not in METHODS]
    if unknown:
        raise app.UsageError(f"--methods: unknown {unknown}; choose from {list(METHODS)}")
    deep = [m for m in FLAGS.methods if METHODS[m][1] == "deep"]
    if deep and not (FLAGS.deep_masks_dir and FLAGS.dataset == "fmnist_scenes"):
        raise app.UsageError(f"--methods: {deep} pretrain on deep masks: give "
                             "--deep_masks_dir (fmnist_scenes only).")
    machine = common.machine_info()
    print(common.describe_machine(machine), flush=True)
    name = FLAGS.results_name or ("bench_learning" if FLAGS.dataset == "cutouts"
                                  else f"bench_learning_{FLAGS.dataset}")
    stages = set(FLAGS.stages)
    build_seconds = build_records() if "build" in stages else {}

    summaries, evaluations = {}, {}
    for method in FLAGS.methods:
        if METHODS[method][0] is not None and "pretrain" in stages:
            summaries[method] = pretrain(method)
        if "evaluate" in stages:
            evaluations[method] = evaluate(method)
    if "report" not in stages:
        return

    # Aggregate every method with results in the work dir (earlier invocations included).
    rows, methods = [], {}
    for method in METHODS:
        supervised_path = os.path.join(_paths()["evals"], f"{method}_finetune",
                                       "results.json")
        if method in SUPERVISED and os.path.exists(supervised_path):
            with open(supervised_path) as f:
                sup = json.load(f)
            methods[method] = {"loss_mode": None, "masks": None, "supervised_top1": sup["top1"],
                               "epochs": supervised_epochs(), "num_eval": sup["num_eval"]}
            rows.append([f"{method} (own classifier)", sup["top1"], None, None])
            continue
        linear_path = os.path.join(_paths()["evals"], f"{method}_linear", "results.json")
        knn_path = os.path.join(_paths()["evals"], f"{method}_knn", "results.json")
        if not (os.path.exists(linear_path) and os.path.exists(knn_path)):
            continue
        with open(linear_path) as f:
            lin = json.load(f)
        with open(knn_path) as f:
            knn = json.load(f)
        entry = {"loss_mode": METHODS[method][0], "masks": METHODS[method][1],
                 "linear_top1": lin["top1"], "linear_top5": lin["top5"],
                 "knn_top1": knn["top1"], "num_train": lin["num_train"],
                 "num_eval": lin["num_eval"], "eval_seconds": lin["seconds"] + knn["seconds"],
                 "linear_weight_decay": lin.get("weight_decay"),
                 "linear_weight_decay_selection": lin.get("weight_decay_selection")}
        for mode, res in (("linear", lin), ("knn", knn)):
            entry.update(common.background_fields(mode, res))
        summary_path = os.path.join(_paths()["runs"], method, "summary.json")
        if os.path.exists(summary_path):
            with open(summary_path) as f:
                s = json.load(f)
            entry.update(pretrain_minutes=round(s["wall_seconds"] / 60, 2),
                         images_per_second=round(s["images_per_second"], 2),
                         steps=s["final_step"], first_metrics=s.get("first_metrics"),
                         final_metrics=s.get("final_metrics"),
                         pretrain_flags=pretrain_flags(method))
        methods[method] = entry
        rows.append([method, entry["linear_top1"], entry["knn_top1"],
                     entry.get("pretrain_minutes")])

    curves = {m: read_curves(os.path.join(_paths()["runs"], m)) for m in methods
              if METHODS[m][0] is not None}
    results_dir = common.RESULTS_DIR
    os.makedirs(results_dir, exist_ok=True)
    figures = {}
    if curves:
        figures["curves"] = os.path.join(results_dir, f"{name}_curves.png")
        plot_curves(curves, figures["curves"])
    tsne_methods = [m for m in ("byol", "hybrid_conventional", "hybrid_ground_truth")
                    if m in methods]
    tsne = None
    if len(tsne_methods) >= 2:
        figures["tsne"] = os.path.join(results_dir, f"{name}_tsne.png")
        panels = {f"{m} (linear {methods[m]['linear_top1']:.3f}, k-NN "
                  f"{methods[m]['knn_top1']:.3f})": embeddings(m) for m in tsne_methods[:2]}
        tsne = plot_tsne(panels, _class_names(), figures["tsne"], FLAGS.seed)

    quality = None
    try:
        q = mask_quality()
        quality = {k: q[k] for k in ("mean_iou", "mean_precision", "mean_recall",
                                     "mean_f_measure") if k in q} or q
    except SystemExit as e:  # the table matters more than this figure
        print(f"mask quality skipped: {e}", flush=True)

    diagnosis = None
    if FLAGS.dataset == "cutouts":
        diagnosis = background_diagnosis(list(methods), FLAGS.seed)
        print(common.table([[m, d["eta2_background_colour"], d["eta2_object_colour"],
                             d["eta2_class"]] for m, d in diagnosis.items()],
                           ["method", "η² background colour", "η² object colour",
                            "η² class"]))
    table = common.table(rows, ["method", "linear top-1", "k-NN top-1 (k=20)",
                                "pretrain min"])
    print(table)
    result = {
        "dataset": FLAGS.dataset, "data_dir": _data_dir(), "work_dir": FLAGS.work_dir,
        "budget": {"steps": budget["train_steps"], "batch_size": budget["batch_size"],
                   "image_size": budget["image_size"], "encoder": _encoder_config(),
                   "feature_map": budget["image_size"] // budget["output_stride"],
                   "head_hidden_dim": budget["projector_hidden_dim"],
                   "projection_dim": budget["projection_dim"],
                   "base_learning_rate": budget["base_learning_rate"],
                   "warmup_epochs": budget["warmup_epochs"], "tau_base": budget["tau_base"],
                   "trust_coefficient": budget["trust_coefficient"],
                   "weight_decay": budget["weight_decay"],
                   "extra_pretrain_flags": FLAGS.extra_pretrain_flags,
                   "alpha_base": budget["alpha_base"], "lambda_base": budget["lambda_base"],
                   "recipe_flagfile": FLAGS.recipe_flagfile,
                   "seed": FLAGS.seed},
        "evaluation": {"linear": {"epochs": FLAGS.linear_epochs, "probe": FLAGS.linear_probe,
                                  "eval_background": FLAGS.eval_background,
                                  "learning_rate": FLAGS.linear_learning_rate,
                                  "features": "precomputed centre crop, crop_fraction 1.0, "
                                              "standardised with train statistics"},
                       "knn": {"k": FLAGS.knn_k, "temperature": 0.07, "similarity": "cosine"},
                       "split": ("validation (carved from train; the split recipe "
                                 "choices are made on)" if _eval_name() == "val" else
                                 "test (never used for any choice)")},
        "methods": methods, "table_markdown": table,
        "conventional_mask_quality_train": quality, "build_seconds": build_seconds,
        "background_diagnosis_11_clusters": diagnosis,
        "tsne": tsne, "figures": {k: os.path.relpath(v, ROOT) for k, v in figures.items()},
        "machine": machine,
    }
    common.write_result(name, result)


if __name__ == "__main__":
    app.run(main)
