r"""Keep a benchmark's pretrained encoders in the repository, with where they came from.

    python -m bench.keep_encoders --work_dir=/work/runs/m8_s0 --seed=0 \
        --runs=hybrid_conventional,byol --commit=<commit that trained them>

A session's machine does not outlive it, and an 8x8 fmnist-scenes pretraining costs about
half an hour, so the encoders every evaluation reads are trained once and kept here:
``bench/encoders/<--recipe>/s<seed>/<run>/`` is the export that
``bench.bench_learning`` wrote to ``<work_dir>/exports/<run>`` (SavedModel, Keras
weights, ``harl_export.json``), copied atomically, plus ``provenance.json``:

- ``pretraining``: the run's ``config.json`` (every pretraining setting, seed included)
  and the last logged training metrics (step, loss, images/s);
- ``commit``: the code that trained it (``--commit``; the runs use a worktree pinned to
  it); ``machine``: this machine; ``files``: size and sha256 of every exported file.

``bench.report_paper_tables`` and ``bench.bench_masks_deep`` read the kept exports by
default (bench/encoders/README.md lists them). An encoder already kept is replaced only
with ``--overwrite``.
"""
from __future__ import annotations

import hashlib
import json
import os
import re
import shutil

from absl import app, flags

from bench import common
from harl_tf import atomic, errors

FLAGS = flags.FLAGS
ENCODERS_DIR = os.path.join(common.ROOT, "bench", "encoders")
PROVENANCE = "provenance.json"


def define_flags() -> None:
    flags.DEFINE_string("work_dir", None, "bench.bench_learning's --work_dir of the runs "
                        "(exports/<run> and runs/<run> in it).")
    flags.DEFINE_integer("seed", None, "The runs' pretraining seed.")
    flags.DEFINE_list("runs", ["hybrid_conventional", "byol"], "Run names to keep.")
    flags.DEFINE_string("recipe", "fmnist_scenes_8x8", "Folder under bench/encoders.")
    flags.DEFINE_string("commit", None, "Commit of the code that trained the runs.")
    flags.DEFINE_bool("overwrite", False, "Replace an encoder already kept.")


def sha256(path: str) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def file_table(root: str) -> dict:
    """``{relative path: {"bytes": n, "sha256": hex}}`` of every file under ``root``."""
    out = {}
    for folder, _, names in sorted(os.walk(root)):
        for name in sorted(names):
            path = os.path.join(folder, name)
            out[os.path.relpath(path, root)] = {"bytes": os.path.getsize(path),
                                                "sha256": sha256(path)}
    return out


_METRIC = re.compile(r"step (\d+)/(\d+)\s+loss ([0-9.]+).*?([0-9.]+) images/s")


def last_metrics(log_path: str) -> dict:
    """The last ``step N/M loss L ... X images/s`` line of a pretraining log (empty when
    the log is missing or has none)."""
    found = {}
    if os.path.exists(log_path):
        with open(log_path, errors="replace") as f:
            for line in f:
                match = _METRIC.search(line)
                if match:
                    step, total, loss, speed = match.groups()
                    found = {"step": int(step), "train_steps": int(total),
                             "loss": float(loss), "images_per_second": float(speed)}
    return found


def keep(work_dir: str, run: str, destination: str, *, commit: str,
         overwrite: bool = False) -> dict:
    """Copies ``work_dir/exports/run`` to ``destination`` with its provenance.json, written
    into a temporary sibling that is renamed when complete. Returns the provenance."""
    export = os.path.join(work_dir, "exports", run)
    model_dir = os.path.join(work_dir, "runs", run)
    for path, what in ((os.path.join(export, "harl_export.json"), "an export"),
                       (os.path.join(model_dir, "config.json"), "a pretraining run")):
        if not os.path.isfile(path):
            raise errors.MissingPathError(f"{os.path.dirname(path)}: not {what} "
                                          f"({os.path.basename(path)} missing).")
    if os.path.exists(destination) and not overwrite:
        raise errors.ConfigError(f"{destination} is kept already; pass --overwrite to "
                                 "replace it.")
    with open(os.path.join(model_dir, "config.json")) as f:
        config = json.load(f)
    provenance = {
        "run": run, "commit": commit, "machine": common.machine_info(),
        "pretraining": {"config": config, "final": last_metrics(
            os.path.join(work_dir, "logs", f"pretrain_{run}.log"))},
        "files": file_table(export)}
    temporary = f"{destination}.tmp-{os.getpid()}"
    shutil.rmtree(temporary, ignore_errors=True)
    shutil.copytree(export, temporary)
    atomic.write_json_atomic(os.path.join(temporary, PROVENANCE), provenance)
    if os.path.exists(destination):
        shutil.rmtree(destination)
    os.makedirs(os.path.dirname(destination), exist_ok=True)
    os.rename(temporary, destination)
    return provenance


def main(argv) -> None:
    del argv
    for run in FLAGS.runs:
        destination = os.path.join(ENCODERS_DIR, FLAGS.recipe, f"s{FLAGS.seed}", run)
        provenance = keep(FLAGS.work_dir, run, destination, commit=FLAGS.commit,
                          overwrite=FLAGS.overwrite)
        size = sum(f["bytes"] for f in provenance["files"].values())
        print(f"{destination}: {len(provenance['files'])} files, {size / 1e6:.1f} MB, "
              f"final {provenance['pretraining']['final']}")


if __name__ == "__main__":
    define_flags()
    errors.run_binary("keep_encoders", main, required=["work_dir", "seed", "commit"])
