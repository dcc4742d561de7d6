r"""Keep a benchmark's pretrained encoders out of their run folders, and record in the
repository how each was made.

    python -m bench.keep_encoders --work_dir=/work/runs/m8_s0 --seed=0 \
        --runs=hybrid_conventional,byol --commit=<commit that trained them>
    python -m bench.keep_encoders --restore_to=/work/runs/exports   # full SavedModels

An 8x8 fmnist-scenes pretraining costs about half an hour, so the encoders every
evaluation reads are trained once per machine and kept in ``--encoders_dir`` (default
``/work/runs/encoders``, outside the repository: weights are generated data and the
repository stays small): ``<encoders_dir>/<--recipe>/s<seed>/<run>/`` holds the export
that ``bench.bench_learning`` wrote to ``<work_dir>/exports/<run>`` without its SavedModel
(``harl_export.json`` and the Keras weights ``encoder.weights.h5``: 11 MB for the 8x8
recipe's encoder instead of 23; ``harl_tf.finetune --encoder=`` reads such a folder as it
is), copied atomically, plus ``provenance.json``:

- ``pretraining``: the run's ``config.json`` (every pretraining setting, seed included)
  and the last logged training metrics (step, loss, images/s);
- ``commit``: the code that trained it (``--commit``; the runs use a worktree pinned to
  it); ``machine``: this machine; ``files``: size and sha256 of every exported file.

The same provenance is written to the repository as
``bench/encoders/<recipe>/s<seed>/<run>.json``: the record of what the committed figures
were measured on, and what a retrained encoder is checked against: when its weights
(``variables/variables.data*``, ``encoder.weights.h5``) have the sha256 the record lists,
it is the same encoder and the record stays as it is; when they differ, the encoder is
kept but the record is left alone and the command fails, unless ``--replace_record``.

``--restore_to=DIR`` writes every kept encoder back as a full export
(``DIR/<recipe>/s<seed>/<run>``: the SavedModel rebuilt from the kept weights, through
``harl_tf.saved_encoder.export_encoder``), for what reads SavedModels (``TFSMLayer``).
``bench.report_paper_tables`` reads the kept folders by default. An encoder already kept
is replaced only with ``--overwrite``.
"""
from __future__ import annotations

import glob
import json
import os
import re
import shutil

from absl import app, flags

from bench import common
from harl_tf import atomic, errors
from harl_tf.data.shards import sha256_file

FLAGS = flags.FLAGS
RECORDS_DIR = os.path.join(common.ROOT, "bench", "encoders")   # provenance, in the repo
ENCODERS_DIR = "/work/runs/encoders"                            # weights, outside it
PROVENANCE = "provenance.json"
WEIGHTS_FILE = "encoder.weights.h5"   # saved_encoder's name for the Keras weights
KEPT_FILES = ("harl_export.json", WEIGHTS_FILE)


def define_flags() -> None:
    flags.DEFINE_string("work_dir", None, "bench.bench_learning's --work_dir of the runs "
                        "(exports/<run> and runs/<run> in it).")
    flags.DEFINE_string("restore_to", None, "Instead of keeping: write every kept encoder "
                        "of --recipe back as a full export under this folder.")
    flags.DEFINE_integer("seed", None, "The runs' pretraining seed.")
    flags.DEFINE_list("runs", ["hybrid_conventional", "byol"], "Run names to keep.")
    flags.DEFINE_string("recipe", "fmnist_scenes_8x8", "Folder under --encoders_dir and "
                        "bench/encoders.")
    flags.DEFINE_string("encoders_dir", ENCODERS_DIR, "Where the kept encoders go (outside "
                        "the repository).")
    flags.DEFINE_string("commit", None, "Commit of the code that trained the runs.")
    flags.DEFINE_bool("overwrite", False, "Replace an encoder already kept.")
    flags.DEFINE_bool("replace_record", False, "Replace a repository record whose weights "
                      "differ from the encoder kept now (the figures measured on the "
                      "recorded encoder then no longer name theirs).")


def file_table(root: str) -> dict:
    """``{relative path: {"bytes": n, "sha256": hex}}`` of every file under ``root``."""
    out = {}
    for folder, _, names in sorted(os.walk(root)):
        for name in sorted(names):
            path = os.path.join(folder, name)
            out[os.path.relpath(path, root)] = {"bytes": os.path.getsize(path),
                                                "sha256": sha256_file(path)}
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
        "files": file_table(export), "kept": list(KEPT_FILES)}
    with atomic.atomic_directory(destination, overwrite=True) as temporary:
        for name in KEPT_FILES:
            shutil.copy2(os.path.join(export, name), os.path.join(temporary, name))
        atomic.write_json_atomic(os.path.join(temporary, PROVENANCE), provenance)
    return provenance


def _weight_files(files: dict) -> dict:
    """The entries of a file table that hold the weights themselves: the SavedModel's
    variables shards and the Keras weights file."""
    return {name: entry for name, entry in files.items()
            if name.startswith("variables/variables.data") or name == WEIGHTS_FILE}


def compare_with_record(provenance: dict, record_path: str) -> str:
    """``"new"`` when there is no record, ``"identical"`` when every weights file the
    record and ``provenance`` both list has the same sha256 (the encoder is bit-identical
    to the recorded one, whatever the machine or load it was retrained under), else
    ``"differs"``."""
    if not os.path.isfile(record_path):
        return "new"
    with open(record_path) as f:
        recorded = _weight_files(json.load(f).get("files", {}))
    current = _weight_files(provenance["files"])
    shared = sorted(set(recorded) & set(current))
    if shared and all(recorded[n]["sha256"] == current[n]["sha256"] for n in shared):
        return "identical"
    return "differs"


def record(provenance: dict, record_path: str, *, replace: bool = False) -> str:
    """Writes ``provenance`` as the repository record unless a record of the same weights
    is there already (kept as it is: it names the figures measured on them); a record of
    other weights is replaced only with ``replace``. Returns the comparison's result."""
    status = compare_with_record(provenance, record_path)
    if status == "new" or (status == "differs" and replace):
        atomic.write_json_atomic(record_path, provenance)
    return status


def restore(kept: str, export_dir: str) -> dict:
    """Writes the kept encoder ``kept`` as a full export at ``export_dir`` (SavedModel,
    weights, metadata; atomic, replacing an earlier restore); returns its metadata."""
    from harl_tf import saved_encoder
    from harl_tf.downstream import encoder_source
    loaded = encoder_source.load_from_export(kept)
    source = dict(saved_encoder.read_metadata(kept).get("source") or {}, restored_from=kept)
    return saved_encoder.export_encoder(loaded.encoder, export_dir,
                                        encoder_config=loaded.config, overwrite=True,
                                        source=source)


def main(argv) -> None:
    del argv
    root = os.path.join(FLAGS.encoders_dir, FLAGS.recipe)
    if FLAGS.restore_to:
        kept = sorted(os.path.dirname(os.path.relpath(path, root)) for path in
                      glob.glob(os.path.join(root, "s*", "*", KEPT_FILES[0])))
        for relative in kept:
            destination = os.path.join(FLAGS.restore_to, FLAGS.recipe, relative)
            restore(os.path.join(root, relative), destination)
            print(f"{destination}: restored", flush=True)
        return
    if FLAGS.work_dir is None or FLAGS.seed is None or FLAGS.commit is None:
        raise app.UsageError("--work_dir, --seed and --commit are required to keep "
                             "encoders (or give --restore_to).")
    differing = []
    for run in FLAGS.runs:
        destination = os.path.join(root, f"s{FLAGS.seed}", run)
        provenance = keep(FLAGS.work_dir, run, destination, commit=FLAGS.commit,
                          overwrite=FLAGS.overwrite)
        record_path = os.path.join(RECORDS_DIR, FLAGS.recipe, f"s{FLAGS.seed}", f"{run}.json")
        status = record(provenance, record_path, replace=FLAGS.replace_record)
        if status == "differs" and not FLAGS.replace_record:
            differing.append(record_path)
            outcome = "DIFFER from their record"
        else:
            outcome = {"new": "recorded", "identical": "identical to their record (kept as "
                       "it is)", "differs": "replace their record"}[status]
        size = sum(f["bytes"] for f in provenance["files"].values())
        print(f"{destination}: {len(provenance['files'])} files, {size / 1e6:.1f} MB, "
              f"final {provenance['pretraining']['final']}; weights {outcome} {record_path}",
              flush=True)
    if differing:
        raise errors.ConfigError(
            f"kept, but their weights differ from the records {differing}: the figures "
            "measured on the recorded encoders do not hold for these; pass "
            "--replace_record to record them instead.")


if __name__ == "__main__":
    define_flags()
    errors.run_binary("keep_encoders", main)
