"""Deep masks (frozen encoder + saliency head) beside conventional masks, on the test split
of an image folder with exact masks (../shared/data/fmnist-scenes or ../shared/data/cutouts).

Nothing of the test split chooses anything. The train split is cut (seeded) into a head
part (``--train_limit`` images) and a disjoint SELECTION part (``--select_limit`` images):

1. Encoder: ``--encoder`` (an export SavedModel), or else a RANDOMLY INITIALISED ResNet
   (``--encoder_config``) exported to a temporary SavedModel (a baseline, labelled so).
2. Pseudo-masks of the head part: the CONVENTIONAL masks (``--pseudo_masks_dir``, a folder
   from tools/generate_masks.py, or computed here); no exact mask is used in training.
3. Settings: every combination of ``--input_sizes_grid`` × ``--fusion_grid`` (round-0
   1×1 heads), then ``--head_grid`` (the 1×1 or the context head) on the best, then
   ``--refine_grid`` × ``--threshold_grid``, then
   ``--self_training_grid`` (rounds on refined masks), each scored by mean IoU on the
   SELECTION part against its exact masks (``--select_against=exact``; held-out TRAIN
   images, never test) or against its conventional masks (``=conventional``, label-free).
4. The chosen settings are retrained through ``train_saliency_head`` (the saved model's
   code path) and scored on ``--test_limit`` TEST images (0 = all) beside the paper's
   configuration (``--paper_input_size``, no fusion, no refinement, no self-training,
   threshold 0.5) and the conventional masks of the same images; images/s for each
   (deep: JPEG decode, encoder, head, refinement, threshold through ``predict_files``).

Writes ``bench/results/<--results_name>.json``; prints the train_saliency_head flags of the
chosen settings.

    python -m bench.bench_masks_deep --data=../shared/data/fmnist-scenes \
        --encoder=/work/runs/m8_s0/exports/hybrid_conventional \
        --pseudo_masks_dir=/work/runs/records/fmnist_scenes_folders/conventional_masks/train \
        --results_name=bench_masks_deep_fmnist_scenes
"""
from __future__ import annotations

import dataclasses
import json
import os
import tempfile
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import numpy as np  # noqa: E402
from absl import app, flags  # noqa: E402

from bench import common  # noqa: E402
from bench.common.splits import object_groups, split_by_object  # noqa: E402
from harl_tf.masks import deep, folder, get_method, quality  # noqa: E402
from harl_tf.masks.deep import head_training, refine  # noqa: E402

FLAGS = flags.FLAGS
# Refinement presets of --refine_grid (guided: a window of 4 working px, eps 0.02;
# grabcut: 1 or 3 iterations, grabcut3_sure also fixes pixels with p < 0.05 or > 0.95).
REFINEMENTS = {"none": deep.RefineConfig("none"), "segments": deep.RefineConfig("segments"),
               "guided": deep.RefineConfig("guided", radius=4, eps=0.02),
               "grabcut": deep.RefineConfig("grabcut"),
               "grabcut3": deep.RefineConfig("grabcut", iterations=3),
               "grabcut3_sure": deep.RefineConfig("grabcut", iterations=3, sure=0.05)}
flags.DEFINE_string("data", "../shared/data/fmnist-scenes", "Dataset root (train/ and test/ "
                    "with images/ and masks/).")
flags.DEFINE_string("encoder", None, "Encoder SavedModel export dir (default: a randomly "
                    "initialised ResNet of --encoder_config).")
flags.DEFINE_string("encoder_config",
                    '{"depth": 18, "width_multiplier": 0.5, "output_stride": 8}',
                    "ResNet config (JSON) of the random encoder without --encoder.")
flags.DEFINE_string("pseudo_masks_dir", None, "Conventional masks of the TRAIN images "
                    "(default: computed here).")
flags.DEFINE_integer("train_limit", 1500, "Train images the head learns from (seeded).")
flags.DEFINE_integer("select_limit", 300, "Held-out train images scoring the settings.")
flags.DEFINE_enum("select_against", "exact", ["exact", "conventional"],
                  "What the selection images are scored against (both are train images).")
flags.DEFINE_bool("select_unseen_objects", False, "Selection images show objects none of "
                  "the head's images show (objects told apart by the shape of their exact "
                  "train masks; for cutouts, whose test objects are unseen).")
flags.DEFINE_integer("test_limit", 0, "Test images scored (seeded subset; 0 = all).")
flags.DEFINE_integer("paper_input_size", 0, "Encoder input of the paper's configuration "
                     "(0 = the images' own size).")
flags.DEFINE_list("input_sizes_grid", ["64", "128", "64+128"], "Encoder input size(s) "
                  "candidates ('+' joins multi-scale sizes).")
flags.DEFINE_list("fusion_grid", ["none", "sigma0.4+no_grabcut"], "Pseudo-label fusion "
                  "candidates: conventional settings ('+'-joined) fused with the "
                  "pseudo-masks, or none.")
flags.DEFINE_list("refine_grid", list(REFINEMENTS),
                  "Refinement candidates (presets of harl_tf.masks.deep.refine methods: "
                  + ", ".join(REFINEMENTS) + ").")
flags.DEFINE_list("head_grid", ["linear", "context"], "Head candidates (TrainConfig.head: "
                  "the paper's 1x1, or the 3x3 context head).")
flags.DEFINE_list("threshold_grid", ["0.4", "0.5", "0.6", "0.7", "0.8"],
                  "Threshold candidates.")
flags.DEFINE_list("self_training_grid", ["0", "1", "2"], "Self-training rounds candidates.")
flags.DEFINE_list("self_training_labels_grid", ["refined", "refined_and_pseudo"],
                  "Self-training label candidates (TrainConfig.self_training_labels).")
flags.DEFINE_integer("epochs", 20, "Head training epochs per round.")
flags.DEFINE_integer("batch_size", 32, "Batch size (features and inference).")
flags.DEFINE_integer("seed", 0, "Seed of the subsets and the head.")
flags.DEFINE_string("results_name", "bench_masks_deep", "bench/results/<name>.json")
flags.DEFINE_string("save_model", "", "Also save the chosen saliency model there (a model "
                    "directory tools.generate_masks --method=deep reads; its encoder is "
                    "referenced by path, not copied).")


def split_train(relative, train_limit, select_limit, seed):
    """Disjoint seeded head / selection parts of the train split."""
    order = np.random.default_rng(seed).permutation(len(relative))
    head = sorted(relative[i] for i in order[:train_limit])
    select = sorted(relative[i] for i in order[train_limit:train_limit + select_limit])
    return head, select


def read(data, split, relative, masks_dir=None, masks_only=False):
    images = [] if masks_only else [folder.read_image(os.path.join(data, split, "images", rel))
                                    for rel in relative]
    masks_dir = masks_dir or os.path.join(data, split, "masks")
    masks = [quality.read_mask(os.path.join(masks_dir, folder.mask_relpath(rel)))
             for rel in relative]
    return images, masks


def sizes_of(text):
    return [int(v) for v in text.split("+")]


def mean_iou(predicted, reference):
    return quality.evaluate_arrays(predicted, reference).mean_iou


def choose(encoder, head_images, pseudo, select_images, reference):
    """The settings search of step 3; returns (chosen dict, every trial)."""
    trials, features, fused = [], {}, {}
    config = deep.TrainConfig(epochs=FLAGS.epochs, seed=FLAGS.seed)
    for fusion in FLAGS.fusion_grid:
        if fusion != "none":
            fused[fusion] = deep.conventional_mask_sets(head_images, fusion.split("+"))[0]
    best = None
    for sizes in FLAGS.input_sizes_grid:
        t0 = time.time()
        train_f = head_training.compute_features(encoder, head_images, sizes_of(sizes),
                                                 batch_size=FLAGS.batch_size, progress=False)
        select_f = head_training.compute_features(encoder, select_images, sizes_of(sizes),
                                                  batch_size=FLAGS.batch_size, progress=False)
        features[sizes] = (train_f, select_f)
        for fusion in FLAGS.fusion_grid:
            targets, weights = deep.fused_cell_targets(
                [pseudo] + fused.get(fusion, []), train_f.shape[1:3],
                ignore_low=config.ignore_low, ignore_high=config.ignore_high)
            head, _ = deep.fit_head(train_f, targets, weights, epochs=config.epochs,
                                    balance_classes=True, seed=config.seed)
            cells = head(select_f).numpy()
            score = mean_iou(refine.refined_masks(select_images, cells, REFINEMENTS["none"]),
                             reference)
            trials.append({"stage": "features", "input_sizes": sizes, "fusion": fusion,
                           "refine": "none", "threshold": 0.5, "self_training_rounds": 0,
                           "select_iou": score, "seconds": time.time() - t0})
            print(trials[-1], flush=True)
            if best is None or score > best[0]:
                best = (score, sizes, fusion, head, targets, weights)
    _, sizes, fusion, head, targets, weights = best
    train_f, select_f = features[sizes]
    best_head = (best[0], "linear", head)
    for kind in FLAGS.head_grid:
        if kind == "linear":
            continue
        t0 = time.time()
        candidate, _ = head_training.fit_any_head(
            train_f, targets, weights, dataclasses.replace(config, head=kind), seed=config.seed)
        score = mean_iou(refine.refined_masks(select_images, candidate(select_f).numpy(),
                                              REFINEMENTS["none"]), reference)
        trials.append({"stage": "head", "input_sizes": sizes, "fusion": fusion, "head": kind,
                       "refine": "none", "threshold": 0.5, "self_training_rounds": 0,
                       "select_iou": score, "seconds": time.time() - t0})
        print(trials[-1], flush=True)
        if score > best_head[0]:
            best_head = (score, kind, candidate)
    _, kind, head = best_head
    config = dataclasses.replace(config, head=kind)
    cells = head(select_f).numpy()
    best_refine = None
    for name in FLAGS.refine_grid:
        for threshold in map(float, FLAGS.threshold_grid):
            score = mean_iou(refine.refined_masks(select_images, cells, REFINEMENTS[name],
                                                  threshold), reference)
            trials.append({"stage": "refine", "input_sizes": sizes, "fusion": fusion,
                           "head": kind, "refine": name, "threshold": threshold,
                           "self_training_rounds": 0,
                           "select_iou": score})
            print(trials[-1], flush=True)
            if best_refine is None or score > best_refine[0]:
                best_refine = (score, name, threshold)
    score, name, threshold = best_refine
    chosen = {"input_sizes": sizes, "fusion": fusion, "head": kind, "refine": name,
              "threshold": threshold,
              "self_training_rounds": 0, "self_training_labels": "refined",
              "select_iou": score}
    # Self-training from the chosen head, labels from its refined masks of the head images
    # (alone, or where they agree with the pseudo-masks), as train_saliency_head does.
    rounds = sorted(int(r) for r in FLAGS.self_training_grid)
    for labels in FLAGS.self_training_labels_grid:
        current = head
        for round_index in range(1, max(rounds, default=0) + 1):
            masks = refine.refined_masks(head_images, current(train_f).numpy(),
                                         REFINEMENTS[name], threshold)
            sets = [masks] + ([pseudo] + fused.get(fusion, [])
                              if labels == "refined_and_pseudo" else [])
            targets, weights = deep.fused_cell_targets(sets, train_f.shape[1:3])
            current, _ = head_training.fit_any_head(train_f, targets, weights, config,
                                                    seed=config.seed + round_index,
                                                    init=current)
            if round_index not in rounds:
                continue
            score = mean_iou(refine.refined_masks(select_images, current(select_f).numpy(),
                                                  REFINEMENTS[name], threshold), reference)
            trials.append(dict(chosen, stage="self_training", self_training_rounds=round_index,
                               self_training_labels=labels, select_iou=score))
            print(trials[-1], flush=True)
            if score > chosen["select_iou"]:
                chosen.update(self_training_rounds=round_index, self_training_labels=labels,
                              select_iou=score)
    return chosen, trials


def score_test(method, paths, truth, classes):
    """Masks of the test images by ``method`` (a deep or conventional registry object):
    mean IoU, class-mean IoU, mean foreground and images/s."""
    t0 = time.time()
    if isinstance(method, deep.DeepSaliencyMasks):
        method.predict_arrays([folder.read_image(paths[0])])  # warm-up (tracing)
        t0 = time.time()
        predicted = [mask for _, mask in method.predict_files(paths)]
    else:
        predicted = [method(folder.read_image(path)) for path in paths]
    seconds = time.time() - t0
    report = quality.evaluate_arrays(predicted, truth, classes)
    return {"mean_iou": report.mean_iou, "class_mean_iou": report.class_mean_iou,
            "mean_foreground": float(np.mean([m.mean() for m in predicted])),
            "images_per_second": len(paths) / seconds,
            "per_class_iou": {c: v["iou"] for c, v in report.per_class().items()}}


def train_chosen(encoder, images, pseudo, chosen, pseudo_provenance):
    fusion = [] if chosen["fusion"] == "none" else chosen["fusion"].split("+")
    extra = deep.conventional_mask_sets(images, fusion)[0] if fusion else []
    return deep.train_saliency_head(
        encoder, images, pseudo, input_size=sizes_of(chosen["input_sizes"]),
        config=deep.TrainConfig(epochs=FLAGS.epochs, seed=FLAGS.seed,
                                self_training_rounds=chosen["self_training_rounds"],
                                self_training_labels=chosen["self_training_labels"],
                                head=chosen["head"]),
        threshold=chosen["threshold"], refinement=REFINEMENTS[chosen["refine"]],
        extra_pseudo_mask_sets=extra, batch_size=FLAGS.batch_size, progress=False,
        provenance=pseudo_provenance)


def flags_line(chosen, refinement) -> str:
    parts = [f"--input_sizes={chosen['input_sizes'].replace('+', ',')}",
             f"--head={chosen['head']}",
             f"--threshold={chosen['threshold']}", f"--refine={refinement.method}",
             f"--self_training_rounds={chosen['self_training_rounds']}",
             f"--self_training_labels={chosen['self_training_labels']}",
             f"--epochs={FLAGS.epochs}", f"--limit={FLAGS.train_limit}"]
    if chosen["fusion"] != "none":
        parts.append(f"--fuse_conventional={chosen['fusion'].replace('+', ',')}")
    if refinement.method == "guided":
        parts += [f"--refine_radius={refinement.radius}", f"--refine_eps={refinement.eps}"]
    if refinement.method == "segments":
        parts.append("--refine_scales=" + ",".join(f"{s:g}" for s in refinement.scales))
    if refinement.method == "grabcut":
        parts += [f"--refine_iterations={refinement.iterations}",
                  f"--refine_sure={refinement.sure:g}"]
    return " ".join(parts)


def main(argv) -> None:
    del argv
    started = time.time()
    data = FLAGS.data
    with tempfile.TemporaryDirectory() as workdir:
        if FLAGS.encoder:
            encoder_path, encoder_label = FLAGS.encoder, "export " + os.path.abspath(FLAGS.encoder)
        else:
            config = json.loads(FLAGS.encoder_config)
            encoder_path = os.path.join(workdir, "random_encoder")
            deep.FrozenEncoder.from_config(config).save(encoder_path)
            encoder_label = f"RANDOMLY INITIALISED ResNet {config} (not pretrained)"
        encoder = deep.FrozenEncoder.from_export(encoder_path)

        # Head and selection parts of TRAIN; their conventional (pseudo-)masks.
        t0 = time.time()
        train_rel = folder.list_images(os.path.join(data, "train", "images"))
        if FLAGS.select_unseen_objects:
            groups = object_groups(read(data, "train", train_rel, masks_only=True)[1],
                                   [rel.split("/")[0] for rel in train_rel])
            head_rel, select_rel = split_by_object(train_rel, groups, FLAGS.train_limit,
                                                   FLAGS.select_limit, FLAGS.seed)
            print(f"{len(set(groups))} objects in {len(train_rel)} train images; "
                  f"{len(select_rel)} selection images of objects the head never sees",
                  flush=True)
        else:
            head_rel, select_rel = split_train(train_rel, FLAGS.train_limit,
                                               FLAGS.select_limit, FLAGS.seed)
        if FLAGS.pseudo_masks_dir:
            head_images, pseudo = read(data, "train", head_rel, FLAGS.pseudo_masks_dir)
            select_images, select_conventional = read(data, "train", select_rel,
                                                      FLAGS.pseudo_masks_dir)
            provenance = {"pseudo_masks_dir": os.path.abspath(FLAGS.pseudo_masks_dir)}
        else:
            conventional = get_method("conventional")
            head_images, _ = read(data, "train", head_rel)
            select_images, _ = read(data, "train", select_rel)
            pseudo = [conventional(image) for image in head_images]
            select_conventional = [conventional(image) for image in select_images]
            provenance = {"pseudo_masks": "conventional (computed)",
                          "conventional_params": conventional.params}
        select_exact = read(data, "train", select_rel)[1]
        reference = select_exact if FLAGS.select_against == "exact" else select_conventional
        pseudo_seconds = time.time() - t0

        t0 = time.time()
        chosen, trials = choose(encoder, head_images, pseudo, select_images, reference)
        select_seconds = time.time() - t0
        t0 = time.time()
        model = train_chosen(encoder, head_images, pseudo, chosen, provenance)
        train_seconds = time.time() - t0
        if FLAGS.save_model:
            model.save(FLAGS.save_model)
        paper_size = FLAGS.paper_input_size or int(head_images[0].shape[0])
        paper = deep.train_saliency_head(
            encoder, head_images, pseudo, input_size=paper_size,
            config=deep.TrainConfig(epochs=FLAGS.epochs, seed=FLAGS.seed),
            batch_size=FLAGS.batch_size, progress=False, provenance=provenance)

        # TEST split: deep (chosen), deep (paper's configuration), conventional.
        test_rel = folder.list_images(os.path.join(data, "test", "images"))
        if 0 < FLAGS.test_limit < len(test_rel):
            chosen_index = np.random.default_rng(FLAGS.seed).choice(
                len(test_rel), FLAGS.test_limit, replace=False)
            test_rel = [test_rel[i] for i in sorted(chosen_index)]
        paths = [os.path.join(data, "test", "images", rel) for rel in test_rel]
        truth = [
            quality.read_mask(os.path.join(data, "test", "masks", folder.mask_relpath(rel)))
            for rel in test_rel]
        classes = [rel.split("/")[0] for rel in test_rel]
        test = {
            "images": len(paths),
            "deep": score_test(deep.DeepSaliencyMasks(model=model, batch_size=FLAGS.batch_size,
                                                      progress=False), paths, truth, classes),
            "deep_paper": score_test(deep.DeepSaliencyMasks(
                model=paper, batch_size=FLAGS.batch_size, progress=False), paths, truth,
                classes),
            "conventional": score_test(get_method("conventional"), paths, truth, classes),
        }
    test["deep_minus_conventional"] = test["deep"]["mean_iou"] - test["conventional"]["mean_iou"]
    result = {
        "benchmark": FLAGS.results_name,
        "command": common.command_line(),
        "data": os.path.abspath(data),
        "encoder": encoder_label,
        "encoder_random_init": not FLAGS.encoder,
        "args": {name: FLAGS[name].value for name in (
            "data", "encoder", "encoder_config", "pseudo_masks_dir", "train_limit",
            "select_limit", "select_against", "select_unseen_objects", "test_limit", "paper_input_size",
            "input_sizes_grid", "fusion_grid", "head_grid", "refine_grid", "threshold_grid",
            "self_training_grid", "self_training_labels_grid", "epochs", "batch_size",
            "seed")},
        "selection": {"train_images": len(head_images), "select_images": len(select_images),
                      "against": FLAGS.select_against, "chosen": chosen, "trials": trials,
                      "select_conventional_iou": mean_iou(select_conventional, select_exact),
                      "seconds": select_seconds},
        "train_saliency_head_flags": flags_line(chosen, model.refinement),
        "train": {"pseudo_mask_seconds": pseudo_seconds, "train_seconds": train_seconds,
                  "feature_grid": model.training["feature_grid"],
                  "history": model.training["history"],
                  "paper_feature_grid": paper.training["feature_grid"]},
        "test": test,
        "paper_reference": {"deep": 0.485, "conventional": 0.398,
                            "note": "Pixel-ImageNet subset, pretrained ResNet-50"},
        "machine": common.machine_info(),
        "seconds": time.time() - started,
    }
    print(json.dumps({k: result[k] for k in ("encoder", "train_saliency_head_flags")}, indent=2))
    for name in ("deep", "deep_paper", "conventional"):
        row = test[name]
        print(f"{name:14s} mean IoU {row['mean_iou']:.4f}  {row['images_per_second']:.1f} img/s")
    common.write_result(FLAGS.results_name, result)


if __name__ == "__main__":
    app.run(main)
