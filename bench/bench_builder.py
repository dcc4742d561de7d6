"""TFRecord builder throughput and peak memory, masks given (no mask method).

Cases, each in a fresh child process (so peak RSS is the run's own):

- ``folder_500x375``: a folder of 500×375 JPEGs (quality 90) with PNG masks, made from
  synthetic images (a few unique renders, copied to N files: the builder's cost per file
  does not depend on the content; rendering 500×375 costs ~0.6 s, far more than building);
  N and 2N images with 1 and 2 workers — peak RSS at N vs 2N shows memory stays flat.
- ``cutouts``: ``../shared/data/cutouts`` (128×128 JPEGs + masks), one split, 1 and 2
  workers.
- ``synthetic_500x375``: the synthetic source itself (rendering included), a few images.

With ``--beam`` the script runs one other comparison instead: the Beam pipeline
(``harl_tf/data/beam_build.py``, DirectRunner, 2 workers, multi_processing) against the
local builder (2 workers) on the 4,000 cutouts (both splits) and on half of them (every
other image of each class: N = 2,000, 2N = 4,000), shards of ~1 MB in both (so a shard
holds as many images at N as at 2N), runs interleaved local / Beam and repeated
``--repeats`` times; writes ``bench/results/bench_builder_beam.json``. With
``--mask_method conventional`` both builders compute the conventional heuristic masks
instead of reading the given ones (HARL's own data preparation, where the per-image work
is the mask), written to ``bench_builder_beam_conventional.json``.

Reports wall images/s (listing + pool start-up + writing included, TF import excluded), CPU
milliseconds per image over the parent and its workers (robust to other load on a shared
machine), peak RSS of the parent (getrusage; mostly TensorFlow, which the parent imports to
write) and, sampled every 50 ms with psutil (``common.PeakRss``), of the largest worker and
of parent + workers (getrusage of children would count the parent's pages copied at fork).
Writes ``bench/results/bench_builder.json``.

    python -m bench.bench_builder [--n 300] [--cutouts_split test] [--synthetic_n 16]
    python -m bench.bench_builder --beam [--repeats 3] [--mask_method conventional]
"""
from __future__ import annotations

import json
import os
import resource
import shutil
import sys
import tempfile
import time

from absl import app, flags

from bench import common

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
CUTOUTS = "../shared/data/cutouts"

FLAGS = flags.FLAGS
flags.DEFINE_integer("n", 300, "N (the folder case runs N and 2N images).")
flags.DEFINE_string("cutouts_split", "test", "Split of the cutouts case ('': both).")
flags.DEFINE_integer("synthetic_n", 16, "Images of the synthetic case.")
flags.DEFINE_bool("beam", False, "Compare the Beam pipeline with the local builder on "
                  "cutouts instead.")
flags.DEFINE_integer("repeats", 3, "--beam: rounds of runs.")
flags.DEFINE_enum("mask_method", "", ["", "conventional"], "--beam: compute masks with this "
                  "method ('': read the given masks).")
# Internal: one build in a child process (so peak RSS is the run's own).
flags.DEFINE_string("_case", "", "internal")
flags.DEFINE_string("_root", "", "internal")
flags.DEFINE_string("_split", "train", "internal")
flags.DEFINE_integer("_count", 0, "internal")
flags.DEFINE_integer("_workers", 1, "internal")
flags.DEFINE_integer("_shards", 4, "internal")
flags.DEFINE_string("_out", "", "internal")
flags.DEFINE_string("_runner", "local", "internal")
flags.DEFINE_float("_target_shard_mb", 128.0, "internal")
flags.DEFINE_string("_figures", "", "internal: where the child writes its figures")


def _child() -> None:
    """One build; writes its figures to --_figures (JSON)."""
    from harl_tf.data import builder, sources
    import tensorflow as tf  # noqa: F401  (imported before timing: not the builder's cost)
    if FLAGS._runner == "beam":
        from harl_tf.data import beam_build  # imports apache_beam, also before timing
    if FLAGS._case == "synthetic":
        source = sources.SyntheticSource(FLAGS._count, image_size=(375, 500),
                                         image_format="jpeg", jpeg_quality=90)
        splits = None
    else:
        source = sources.FolderSource(FLAGS._root, mask_method_name="ground_truth")
        splits = [FLAGS._split] if FLAGS._split else None  # "": every split
    before = resource.getrusage(resource.RUSAGE_SELF)
    started = time.time()
    shards = dict(num_shards=FLAGS._shards or None, target_shard_mb=FLAGS._target_shard_mb,
                  min_shards=1 if not FLAGS._shards else 8,
                  mask_method=FLAGS.mask_method or None)
    with common.PeakRss() as peaks:  # this process and its workers
        if FLAGS._runner == "beam":
            manifest = beam_build.build_dataset_beam(
                source, FLAGS._out, splits=splits,
                pipeline_options=beam_build.DIRECT_TWO_WORKERS, **shards)
        else:
            manifest = builder.build_dataset(source, FLAGS._out, splits=splits,
                                             num_workers=FLAGS._workers, progress=False,
                                             **shards)
        seconds = time.time() - started
    own = resource.getrusage(resource.RUSAGE_SELF)
    kids = resource.getrusage(resource.RUSAGE_CHILDREN)
    images = manifest["last_run"]["images_processed"]
    cpu = (own.ru_utime - before.ru_utime + own.ru_stime - before.ru_stime
           + kids.ru_utime + kids.ru_stime)
    common.write_json_atomic(FLAGS._figures, {
        "images": images, "seconds": round(seconds, 3),
        "images_per_second": round(images / seconds, 1),
        "cpu_ms_per_image": round(1000 * cpu / max(images, 1), 2),
        "peak_rss_parent_mb": round(own.ru_maxrss / 1024, 1),
        "peak_rss_largest_worker_mb": round(peaks.largest_child / 2 ** 20, 1),
        "peak_rss_parent_plus_workers_mb": round(peaks.tree / 2 ** 20, 1),
        "bytes_written": sum(s["bytes"] for e in manifest["splits"].values()
                             for s in e["shards"]),
        "num_shards": sum(e["num_shards"] for e in manifest["splits"].values()),
        "shard_sha256": sorted(s["sha256"] for e in manifest["splits"].values()
                               for s in e["shards"]),
    })


def _make_folder(root: str, count: int, unique: int = 12) -> None:
    import numpy as np
    from PIL import Image
    from harl_tf.data import synthetic
    renders = [synthetic.render(i, (375, 500), 0) for i in range(unique)]
    for i in range(count):
        image, mask, label = renders[i % unique]
        name = synthetic.CLASS_NAMES[label]
        for kind in ("images", "masks"):
            os.makedirs(os.path.join(root, kind, name), exist_ok=True)
        Image.fromarray(image).save(os.path.join(root, "images", name, f"{i:06d}.jpg"),
                                    quality=90)
        Image.fromarray((mask * np.uint8(255))).save(
            os.path.join(root, "masks", name, f"{i:06d}.png"))


def _half_of_cutouts(root: str) -> None:
    """Every other image of each class folder of both cutouts splits, with its mask
    (symbolic links), and the class list."""
    for split in ("train", "test"):
        images = os.path.join(CUTOUTS, split, "images")
        for name in sorted(os.listdir(images)):
            for kind in ("images", "masks"):
                os.makedirs(os.path.join(root, split, kind, name), exist_ok=True)
            for file in sorted(os.listdir(os.path.join(images, name)))[::2]:
                stem = os.path.splitext(file)[0]
                for kind, leaf in (("images", file), ("masks", stem + ".png")):
                    os.symlink(os.path.abspath(os.path.join(CUTOUTS, split, kind, name, leaf)),
                               os.path.join(root, split, kind, name, leaf))
    shutil.copy(os.path.join(CUTOUTS, "classes.txt"), root)


def _run(case, root, split, count, workers, shards, work, runner="local",
         target_shard_mb=128.0, mask_method="") -> dict:
    out = tempfile.mkdtemp(dir=work)
    figures_path = os.path.join(work, "figures.json")
    command = [sys.executable, "-m", "bench.bench_builder", f"--_case={case}",
               f"--_root={root or ''}", f"--_split={split}", f"--_count={count}",
               f"--_workers={workers}", f"--_shards={shards}", f"--_out={out}",
               f"--_runner={runner}", f"--_target_shard_mb={target_shard_mb}",
               f"--mask_method={mask_method}", f"--_figures={figures_path}"]
    try:
        common.run(command, os.path.join(work, "child.log"))
    finally:
        shutil.rmtree(out, ignore_errors=True)
    with open(figures_path) as f:
        figures = json.load(f)
    figures.update(case=case, workers=workers, runner=runner,
                   load_average_1min=round(os.getloadavg()[0], 2))
    print(json.dumps({k: v for k, v in figures.items() if k != "shard_sha256"}), flush=True)
    return figures


def main(argv) -> None:
    del argv
    if FLAGS._case:
        return _child()
    if FLAGS.beam:
        return _beam_comparison()

    machine = common.machine_info()
    print(common.describe_machine(machine), flush=True)
    runs = []
    with tempfile.TemporaryDirectory() as work:
        for count in (FLAGS.n, 2 * FLAGS.n):
            root = os.path.join(work, f"folder{count}")
            _make_folder(root, count)
            for workers in (1, 2):
                runs.append(_run("folder_500x375", root, "train", count, workers, 4, work))
        if os.path.isdir(CUTOUTS):
            for workers in (1, 2):
                runs.append(_run("cutouts", CUTOUTS, FLAGS.cutouts_split, 0, workers, 4, work))
        runs.append(_run("synthetic", None, "train", FLAGS.synthetic_n, 2, 2, work))
    for run in runs:
        run.pop("shard_sha256")
    common.write_result("bench_builder", {"machine": machine, "runs": runs})


def _beam_comparison() -> None:
    """Beam DirectRunner (2 workers) vs the local builder (2 workers) at N and 2N cutouts."""
    if not os.path.isdir(CUTOUTS):
        raise SystemExit(f"{CUTOUTS} is missing: the Beam comparison runs on the cutouts")
    machine = common.machine_info()
    print(common.describe_machine(machine), flush=True)
    runs = []
    with tempfile.TemporaryDirectory() as work:
        half = os.path.join(work, "half")
        _half_of_cutouts(half)
        for _ in range(FLAGS.repeats):
            for label, root in (("N", half), ("2N", CUTOUTS)):
                for runner in ("local", "beam"):
                    figures = _run("cutouts", root, "", 0, 2, 0, work, runner=runner,
                                   target_shard_mb=1.0, mask_method=FLAGS.mask_method)
                    figures["size"] = label
                    runs.append(figures)
    summary = _beam_summary(runs)
    for r in runs:
        r.pop("shard_sha256")
    print(json.dumps(summary, indent=1), flush=True)
    name = "bench_builder_beam" + (f"_{FLAGS.mask_method}" if FLAGS.mask_method else "")
    common.write_result(name, {"benchmark": "bench_builder --beam",
                               "mask_method": FLAGS.mask_method or "given",
                               "machine": machine, "summary": summary, "runs": runs})


def _beam_summary(runs: list) -> dict:
    """Medians per size and runner; wall throughput ratio and peak memory at N and 2N; CPU
    per image split into a fixed part and a per-image part (CPU time hardly depends on
    the other load of a shared machine, wall time does)."""
    import statistics

    def median(size, runner, key):
        return statistics.median(r[key] for r in runs
                                 if r["size"] == size and r["runner"] == runner)

    summary = {}
    for size in ("N", "2N"):
        local, beam = (median(size, r, "images_per_second") for r in ("local", "beam"))
        summary[size] = {
            "images": median(size, "local", "images"),
            "local_images_per_second": local, "beam_images_per_second": beam,
            "throughput_ratio_beam_over_local": round(beam / local, 3),
            **{f"{r}_peak_rss_parent_plus_workers_mb": median(size, r,
                                                              "peak_rss_parent_plus_workers_mb")
               for r in ("local", "beam")},
            **{f"{r}_peak_rss_largest_worker_mb": median(size, r, "peak_rss_largest_worker_mb")
               for r in ("local", "beam")}}
    for runner in ("local", "beam"):
        key = f"{runner}_peak_rss_parent_plus_workers_mb"
        summary[f"{runner}_peak_memory_ratio_2N_over_N"] = round(
            summary["2N"][key] / summary["N"][key], 3)
        # CPU seconds = fixed + per_image * images, through the N and 2N medians.
        cpu = {size: median(size, runner, "cpu_ms_per_image") * median(size, runner, "images")
               / 1000 for size in ("N", "2N")}
        extra = median("2N", runner, "images") - median("N", runner, "images")
        per_image = (cpu["2N"] - cpu["N"]) / extra
        summary[f"{runner}_cpu_ms_per_extra_image"] = round(1000 * per_image, 3)
        summary[f"{runner}_fixed_cpu_seconds"] = round(
            cpu["N"] - per_image * median("N", runner, "images"), 2)
    same = {r["size"]: r["shard_sha256"] for r in runs if r["runner"] == "local"}
    summary["beam_shards_identical_to_local"] = all(
        r["shard_sha256"] == same[r["size"]] for r in runs if r["runner"] == "beam")
    return summary


if __name__ == "__main__":
    app.run(main)
