"""Helpers shared by the benchmarks: the machine's description, results files, tables, the
subprocess runner, peak memory of a process tree, synthetic records.

    from bench import common
    result = {"machine": common.machine_info(), ...}
    common.write_result("bench_x", result)     # bench/results/bench_x.json, atomically
    seconds = common.run([sys.executable, "-m", "harl_tf.pretrain", ...], "pretrain.log")

The benchmarks run from the repository root as modules (``python -m bench.<name>``), so
``bench`` and ``harl_tf`` import without any path set-up. Nothing here imports TensorFlow
at module level (``machine_info`` reads the installed versions from package metadata), so
a parent process that only starts children stays small.
"""
from __future__ import annotations

import importlib.abc
import importlib.util
import os
import platform
import shlex
import statistics
import subprocess
import sys
import threading
import time
from typing import Dict, Iterable, List, Mapping, Optional, Sequence

from harl_tf.atomic import write_json_atomic  # the scripts call common.write_json_atomic

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RESULTS_DIR = os.path.join(ROOT, "bench", "results")

# CPU features that decide how fast TensorFlow's CPU kernels can be (oneDNN picks its code
# path from these: AVX-512, VNNI for int8, BF16/AMX for bfloat16).
_INTERESTING_FLAGS = ("sse4_2", "avx", "avx2", "fma", "avx512f", "avx512bw", "avx512vl",
                      "avx512_vnni", "avx512_bf16", "amx_bf16", "amx_tile")

_PACKAGES = ("tensorflow-cpu", "tensorflow", "keras", "numpy", "scipy", "opencv-python",
             "opencv-python-headless", "pillow", "scikit-image", "scikit-learn", "matplotlib",
             "psutil")


def cpu_model() -> str:
    """'model name' of /proc/cpuinfo (or platform.processor())."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def cpu_flags() -> List[str]:
    """The performance-relevant subset of the CPU's flags (first processor)."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("flags"):
                    present = set(line.split(":", 1)[1].split())
                    return [flag for flag in _INTERESTING_FLAGS if flag in present]
    except OSError:
        pass
    return []


def load_average() -> List[float]:
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except OSError:
        return []


def versions() -> Dict[str, str]:
    """Installed versions (package metadata; nothing heavy is imported)."""
    from importlib import metadata
    found = {"python": platform.python_version()}
    for name in _PACKAGES:
        try:
            found[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            pass
    return found


def machine_info() -> dict:
    """Cores, CPU model and flags, memory, platform, load average and versions."""
    memory_gb = None
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemTotal"):
                    memory_gb = round(int(line.split()[1]) / 2**20, 1)
                    break
    except OSError:
        pass
    try:
        usable = len(os.sched_getaffinity(0))
    except AttributeError:
        usable = os.cpu_count()
    return {"cores": os.cpu_count(), "usable_cores": usable, "cpu_model": cpu_model(),
            "cpu_flags": cpu_flags(), "memory_gb": memory_gb, "platform": platform.platform(),
            "load_average_at_start": load_average(), "versions": versions()}


def describe_machine(machine: dict) -> str:
    """One line for the console."""
    v = machine.get("versions", {})
    tf = v.get("tensorflow-cpu") or v.get("tensorflow")
    return (f"machine: {machine['cores']} cores ({machine['cpu_model']}; "
            f"{' '.join(machine['cpu_flags'])}), {machine['memory_gb']} GB, load "
            f"{machine['load_average_at_start']}; python {v.get('python')}, tensorflow {tf}, "
            f"keras {v.get('keras')}, numpy {v.get('numpy')}")


def background_fields(mode: str, result: dict) -> dict:
    """``{mode}_mixed_rand_top1`` and ``{mode}_background_gap`` from a ``harl_tf.finetune``
    results.json scored with ``--eval_background=both``; empty when it was not."""
    background = result.get("background")
    if not background:
        return {}
    return {f"{mode}_mixed_rand_top1": background["mixed_rand"]["top1"],
            f"{mode}_background_gap": background["gap_top1"]}


def command_line() -> str:
    """This process's command as typed from the repository root (``python -m bench.x ...``
    for a module)."""
    spec = getattr(sys.modules.get("__main__"), "__spec__", None)
    head = ["python", "-m", spec.name] if spec is not None else ["python", sys.argv[0]]
    return shlex.join(head + sys.argv[1:])


def write_result(name: str, payload: dict) -> str:
    """``bench/results/<name>.json`` (atomic); adds the end load average and the command."""
    payload.setdefault("benchmark", name)
    payload.setdefault("command", command_line())
    machine = payload.get("machine")
    if isinstance(machine, dict):
        machine["load_average_at_end"] = load_average()
    path = write_json_atomic(os.path.join(RESULTS_DIR, f"{name}.json"), payload)
    print(f"wrote {path}", flush=True)
    return path


def chosen_configs(requested: Sequence[str], known: Sequence[str]) -> List[str]:
    """The configurations a sweep runs: ``requested`` (a ``--configs`` list), or all of
    ``known`` when it is empty. Raises absl's UsageError naming any unknown one."""
    names = list(requested) or list(known)
    unknown = [name for name in names if name not in known]
    if unknown:
        from absl import app
        raise app.UsageError(f"--configs: unknown {unknown}; choose from {list(known)}")
    return names


def run(command: Sequence[str], log_path: str, *,
        env: Optional[Mapping[str, str]] = None) -> float:
    """Runs ``command`` (an argv list) from the repository root, its stdout and stderr in
    ``log_path``, after echoing it. Returns the wall seconds; a non-zero exit raises
    SystemExit naming the command, with the log's last 3,000 characters."""
    os.makedirs(os.path.dirname(os.path.abspath(log_path)), exist_ok=True)
    print(f"$ {shlex.join(command)}", flush=True)
    started = time.time()
    with open(log_path, "w") as log:
        code = subprocess.run(list(command), stdout=log, stderr=subprocess.STDOUT, cwd=ROOT,
                              env=None if env is None else dict(env)).returncode
    if code != 0:
        with open(log_path) as log:
            tail = log.read()[-3000:]
        raise SystemExit(f"failed ({code}): {shlex.join(command)}\n--- {log_path}\n{tail}")
    return time.time() - started


class PeakRss:
    """Peak resident memory of a process and its descendants, sampled every ``interval``
    seconds on a thread (psutil) while the ``with`` block runs.

    ``tree``: the largest sum of RSS over the descendants, plus the process itself unless
    ``include_self=False`` (shared pages count in each process, so an upper bound when
    workers fork); ``largest_child``: the largest RSS of one descendant. Both in bytes.
    A process that exits between listing and reading is skipped for that sample.
    """

    def __init__(self, pid: Optional[int] = None, *, include_self: bool = True,
                 interval: float = 0.05):
        self.pid, self.include_self, self.interval = pid or os.getpid(), include_self, interval
        self.tree = self.largest_child = 0
        self._done = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)

    def __enter__(self) -> "PeakRss":
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._done.set()
        self._thread.join()

    def _sample(self) -> None:
        import psutil
        try:
            root = psutil.Process(self.pid)
        except psutil.Error:
            return
        while not self._done.is_set():
            try:
                children = root.children(recursive=True)
                own = root.memory_info().rss if self.include_self else 0
            except psutil.Error:
                children, own = [], 0
            sizes = []
            for child in children:
                try:
                    sizes.append(child.memory_info().rss)
                except psutil.Error:
                    pass
            self.tree = max(self.tree, own + sum(sizes))
            self.largest_child = max(self.largest_child, max(sizes, default=0))
            self._done.wait(self.interval)


def write_example_records(path: str, examples: Iterable, *, jpeg_quality: int) -> str:
    """One TFRecord file (written atomically) of ``(example_id, image, mask, label)``
    tuples: image uint8 RGB ``[H, W, 3]`` stored as a JPEG of ``jpeg_quality``, mask
    ``[H, W]`` in {0, 1} stored as a PNG (mask method ``ground_truth``). Returns ``path``."""
    import tensorflow as tf
    from harl_tf.atomic import atomic_path
    from harl_tf.data import schema
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with atomic_path(path) as temporary, tf.io.TFRecordWriter(temporary) as writer:
        for example_id, image, mask, label in examples:
            height, width = image.shape[:2]
            writer.write(schema.serialize_example(
                image_bytes=tf.io.encode_jpeg(image, quality=jpeg_quality).numpy(),
                image_format="jpeg", height=height, width=width,
                mask_png=schema.encode_mask_png(mask), label=label, example_id=example_id,
                mask_method="ground_truth"))
    return path


def ensure_synthetic_records(directory: str, examples: int, shards: int,
                             height: int = 375, width: int = 500) -> str:
    """The input-pipeline benchmarks' records: ``examples`` synthetic ``height`` x
    ``width`` images (JPEG quality 90, PNG masks) in ``shards`` files
    ``bench-SSSSS-of-NNNNN.tfrecord`` of ``directory``, written unless ``shards`` such
    files are there already. Returns their glob."""
    import tensorflow as tf
    from harl_tf.data import synthetic
    pattern = os.path.join(directory, "bench-*.tfrecord")
    if len(tf.io.gfile.glob(pattern)) != shards:
        start = time.perf_counter()
        per_shard = -(-examples // shards)
        for shard in range(shards):
            indices = range(shard * per_shard, min(examples, (shard + 1) * per_shard))
            write_example_records(
                os.path.join(directory, f"bench-{shard:05d}-of-{shards:05d}.tfrecord"),
                ((f"synthetic/{i}", image, mask, label) for i, image, mask, label
                 in synthetic.iterate(indices, (height, width))), jpeg_quality=90)
        print(f"wrote {examples} examples in {shards} shards "
              f"({time.perf_counter() - start:.1f} s)", flush=True)
    return pattern


def jpeg_bytes(pattern: str) -> list:
    """The image bytes of every record of ``pattern``, in file order."""
    import tensorflow as tf
    from harl_tf.data import schema
    return [schema.parse_example(r)["image"].numpy() for r in
            tf.data.TFRecordDataset(sorted(tf.io.gfile.glob(pattern)))]


def load_simclr_data_util(simclr_dir: str):
    """google-research/simclr ``tf2/data_util.py`` from the checkout ``simclr_dir``,
    imported as a module of its own. It reads no absl flag (``data.py`` does; it is not
    needed here), so none is set."""
    path = os.path.join(simclr_dir, "tf2", "data_util.py")
    if not os.path.isfile(path):
        raise FileNotFoundError(
            f"--simclr_dir {simclr_dir!r}: no tf2/data_util.py there; pass the root of a "
            f"google-research/simclr checkout")
    spec = importlib.util.spec_from_file_location("simclr_tf2_data_util", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


class _TestsFinder(importlib.abc.MetaPathFinder):
    """Resolves a top-level name to ``tests/<name>.py`` when nothing else provides it."""

    def find_spec(self, fullname, path=None, target=None):
        file = os.path.join(ROOT, "tests", fullname + ".py")
        if path is None and "." not in fullname and os.path.isfile(file):
            return importlib.util.spec_from_file_location(fullname, file)
        return None


def import_test_helpers() -> None:
    """Lets ``import test_reliability_training`` (and the test modules it imports in turn)
    load ``tests/*.py`` as pytest loads them: by file name, tests/ not being a package.
    For the soak (``bench.fault_injection``), which reuses the tests' helpers and loops."""
    if not any(isinstance(finder, _TestsFinder) for finder in sys.meta_path):
        sys.meta_path.append(_TestsFinder())


def median(values: Iterable[float]) -> float:
    values = [float(v) for v in values]
    return statistics.median(values) if values else float("nan")


def table(rows: Sequence[Sequence], headers: Sequence[str]) -> str:
    """A Markdown table (also readable in a terminal)."""
    cells = [[str(h) for h in headers]] + [[_cell(v) for v in row] for row in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(headers))]
    lines = ["| " + " | ".join(c.ljust(w) for c, w in zip(r, widths)) + " |" for r in cells]
    lines.insert(1, "|" + "|".join("-" * (w + 2) for w in widths) + "|")
    return "\n".join(lines)


def _cell(value) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    return "" if value is None else str(value)


def read_labelled_split(data_dir: str, split: str, *, limit: int = 0,
                        by_class: bool = False):
    """One split of an image folder with mirrored masks and class sub-folders (the layout
    of ../shared/data/fmnist-scenes), read through the TFRecord builder's folder source, so
    file order, mask paths and classes.txt labels are the builder's.

    Returns ``(images, masks, labels, paths)``: uint8 RGB ``[H, W, 3]`` arrays, the mask
    files as decoded (uint8 ``[H, W]``, 0/255), int64 ``[N]`` class indices and
    ``(image_path, mask_path)`` pairs. Order: the builder's (sorted by path), or with
    ``by_class`` by class in classes.txt order, then path; ``limit`` keeps that many
    examples, drawn in a fixed random order (seed 0) from that order.
    Raises ValueError naming the file that cannot be decoded.
    """
    import cv2
    import numpy as np
    from harl_tf.data import sources

    source = sources.FolderSource(data_dir)
    refs = source.list_refs(split)
    if by_class:
        refs = sorted(refs, key=lambda r: (r.label, r.id))
    if limit:
        refs = [refs[i] for i in np.random.default_rng(0).permutation(len(refs))[:limit]]
    images, masks, labels, paths = [], [], [], []
    for ref in refs:
        raw = source.load(ref)
        image = cv2.imdecode(np.frombuffer(raw.image_bytes, np.uint8), cv2.IMREAD_COLOR)
        mask = cv2.imdecode(np.frombuffer(raw.mask_bytes, np.uint8), cv2.IMREAD_GRAYSCALE)
        if image is None or mask is None:
            raise ValueError(f"cannot decode {raw.image_name} or its mask {raw.mask_name}")
        images.append(cv2.cvtColor(image, cv2.COLOR_BGR2RGB))
        masks.append(mask)
        labels.append(ref.label)
        paths.append((raw.image_name, raw.mask_name))
    return images, masks, np.asarray(labels, np.int64), paths
