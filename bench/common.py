"""Helpers shared by the benchmark scripts: the machine's description, atomic JSON, tables.

    from bench import common            # or, run as a script: sys.path gets the repo root
    result = {"machine": common.machine_info(), ...}
    common.write_result("bench_x", result)     # bench/results/bench_x.json, atomically

Nothing here imports TensorFlow unless asked (``machine_info(tensorflow=True)`` reads the
installed versions from package metadata, not by importing), so a parent process that only
starts children stays small.
"""
from __future__ import annotations

import os
import platform
import statistics
import sys
from typing import Dict, Iterable, List, Sequence

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


def write_result(name: str, payload: dict) -> str:
    """``bench/results/<name>.json`` (atomic); adds the end load average and the command."""
    payload.setdefault("benchmark", name)
    payload.setdefault("command", " ".join(["python"] + sys.argv))
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
