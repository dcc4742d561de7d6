r"""Benchmark of the conventional heuristic mask: quality on cutouts, and speed.

  python -m bench.bench_masks --data_dir=../shared/data/cutouts --split=test

Quality: mean IoU (and per class, precision, recall, F-measure β² = 0.3) against the exact
ground-truth masks of the cutouts split, for the conventional method and two baselines in
the same run: (a) the centred-ellipse prior (the method's own fallback mask) and (b)
OpenCV's spectral-residual static saliency (Hou & Zhang 2007) thresholded with Otsu.
The conventional parameters were tuned on the train split only; report on test.

Speed, on one core (``cv2.setNumThreads(1)``, one process): conventional masks per second
for 400×300 images (cutouts images upsampled), beside Felzenszwalb segmentation alone at
the same size and parameters (σ = 0.8, min_size = 1000, k = 1000 at 400×300 = the
reference area) in ``skimage.segmentation.felzenszwalb`` and in OpenCV.

Writes ``bench/results/bench_masks.json`` (atomically) and prints the figures with the
machine's description.
"""
import os
import time

import cv2
import numpy as np
from absl import app, flags

from bench import common
from harl_tf.masks import get_method
from harl_tf.masks.conventional import DEFAULT_PARAMS, centred_ellipse, segment
from harl_tf.masks.folder import list_images, read_image
from harl_tf.masks.quality import evaluate, read_mask
from harl_tf.progress import progress

FLAGS = flags.FLAGS
flags.DEFINE_string("data_dir", "../shared/data/cutouts", "cutouts dataset root.")
flags.DEFINE_string("split", "test", "Split to score (tune on train, report on test).")
flags.DEFINE_integer("limit", None, "Score only the first N images (sorted paths).")
flags.DEFINE_integer("speed_images", 40, "Images timed at 400x300 (0: skip speed).")
flags.DEFINE_bool("quality", True, "Score mask quality (false: speed only).")
flags.DEFINE_string("output_json", os.path.join(common.RESULTS_DIR, "bench_masks.json"),
                    "Where to write the results.")


def spectral_residual_mask(image: np.ndarray) -> np.ndarray:
    """Baseline (b): OpenCV spectral-residual saliency, Otsu threshold, uint8 {0, 1}."""
    detector = cv2.saliency.StaticSaliencySpectralResidual_create()
    ok, saliency = detector.computeSaliency(cv2.cvtColor(image, cv2.COLOR_RGB2BGR))
    if not ok:
        return np.zeros(image.shape[:2], np.uint8)
    saliency = cv2.normalize(saliency.astype(np.float32), None, 0, 255, cv2.NORM_MINMAX)
    _, mask = cv2.threshold(saliency.astype(np.uint8), 0, 1,
                            cv2.THRESH_BINARY + cv2.THRESH_OTSU)
    return mask.astype(np.uint8)


def quality(split_dir: str, limit):
    images_dir = os.path.join(split_dir, "images")
    paths = list_images(images_dir)[:limit]
    method = get_method("conventional")
    rows = {"conventional": [], "centre_ellipse": [], "spectral_residual": []}
    fallbacks = 0
    start = time.perf_counter()
    for rel in progress(paths, desc="quality", unit="img"):
        image = read_image(os.path.join(images_dir, rel))
        gt = read_mask(os.path.join(split_dir, "masks", os.path.splitext(rel)[0] + ".png"))
        class_name, example_id = rel.split("/")[0], os.path.splitext(rel)[0]
        result = method.compute(image)
        fallbacks += result.used_fallback
        rows["conventional"].append((example_id, class_name, result.mask, gt))
        prior = centred_ellipse(*gt.shape, DEFAULT_PARAMS["fallback_axes"])
        rows["centre_ellipse"].append((example_id, class_name, prior, gt))
        rows["spectral_residual"].append(
            (example_id, class_name, spectral_residual_mask(image), gt))
    seconds = time.perf_counter() - start
    out = {}
    for name, items in rows.items():
        report = evaluate(items)
        summary = report.summary()
        summary.pop("missing")
        out[name] = summary
        print(f"\n== {name} ({FLAGS.split}, {report.num_images} images)\n{report.table()}")
    out["conventional"]["fallbacks"] = int(fallbacks)
    out["conventional"]["params"] = method.params
    out["wall_seconds_all_three"] = round(seconds, 2)
    return out


def _rate(function, images):
    """Wall-clock and CPU-time rates; on a shared machine the CPU-time figure (this
    process's own CPU seconds, single-threaded) is the per-core speed."""
    function(images[0])  # warm-up
    start, cpu_start = time.perf_counter(), time.process_time()
    for image in images:
        function(image)
    seconds = time.perf_counter() - start
    cpu_seconds = time.process_time() - cpu_start
    return dict(images_per_second=round(len(images) / seconds, 2),
                ms_per_image=round(1000 * seconds / len(images), 2),
                images_per_cpu_second=round(len(images) / cpu_seconds, 2),
                cpu_ms_per_image=round(1000 * cpu_seconds / len(images), 2))


def speed(split_dir: str, count: int):
    from skimage.segmentation import felzenszwalb

    images_dir = os.path.join(split_dir, "images")
    paths = list_images(images_dir)[:count]
    images = [cv2.resize(read_image(os.path.join(images_dir, rel)), (400, 300),
                         interpolation=cv2.INTER_LINEAR) for rel in paths]
    p = DEFAULT_PARAMS
    method = get_method("conventional")
    results = {
        "conventional_mask": _rate(method, images),
        "conventional_mask_no_grabcut": _rate(get_method("conventional",
                                                         refine_iterations=0), images),
        "skimage_felzenszwalb_400x300": _rate(lambda im: felzenszwalb(
            im, scale=p["k"], sigma=p["sigma"], min_size=p["min_size"]), images),
        "opencv_felzenszwalb_400x300": _rate(lambda im: segment(
            im, sigma=p["sigma"], min_size=p["min_size"], k=p["k"]), images),
    }
    results["image_size"] = [300, 400]
    results["num_images"] = len(images)
    results["threads"] = "one process, cv2.setNumThreads(1)"
    for name, figures in results.items():
        if isinstance(figures, dict):
            print(f"{name:<30} wall {figures['images_per_second']:>7.1f} img/s "
                  f"{figures['ms_per_image']:>7.1f} ms | CPU "
                  f"{figures['images_per_cpu_second']:>7.1f} img/s "
                  f"{figures['cpu_ms_per_image']:>7.1f} ms")
    return results


def _main(argv):
    del argv
    cv2.setNumThreads(1)
    split_dir = os.path.join(FLAGS.data_dir, FLAGS.split)
    if not os.path.isdir(os.path.join(split_dir, "images")):
        raise app.UsageError(f"--data_dir/--split: {split_dir}/images does not exist")
    info = common.machine_info()
    print(common.describe_machine(info), flush=True)
    results = dict(machine=info, split=FLAGS.split, limit=FLAGS.limit,
                   command=common.command_line())
    if FLAGS.quality:
        results["quality"] = quality(split_dir, FLAGS.limit)
    if FLAGS.speed_images:
        print("\n== speed, one core, 400x300")
        results["speed"] = speed(split_dir, FLAGS.speed_images)
    results["machine"]["load_average_at_end"] = common.load_average()
    common.write_json_atomic(FLAGS.output_json, results)
    print(f"\nwrote {FLAGS.output_json}")


if __name__ == "__main__":
    app.run(_main)
