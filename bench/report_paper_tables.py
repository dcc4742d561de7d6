r"""The paper's Tables 1-3 in miniature: every protocol on the same encoders, one JSON and one
Markdown table (issue 30, item 7).

    # once per machine: the fmnist-scenes records (bench.bench_learning --stages=build),
    # the second test split and the transfer sets (bench.make_unseen_backgrounds,
    # bench.make_transfer_sets), and the encoders (bench.bench_learning, then
    # bench.keep_encoders; bench/encoders/README.md records how each was trained).
    python -m bench.report_paper_tables --split=validation --write_flagfiles   # settings
    python -m bench.report_paper_tables                                         # the table

Encoders (never trained here): for each seed, HARL hybrid and BYOL are the exports
``--encoders`` names (``{run}`` = ``hybrid_conventional`` / ``byol``, bench_learning's run
names; an export directory or a pretraining model_dir), and ``random`` is a randomly
initialised encoder of HARL's architecture seeded by the seed. Every protocol is one
``python -m harl_tf.finetune`` run per (protocol, dataset, evaluation set, embedding,
method, seed), its settings a flagfile (:data:`PROTOCOLS`, ``flags/eval_*.cfg``) followed
by the encoder, the records, ``--embedding``, ``--seed`` and ``--output_dir``:

- ``knn``, ``linear``: frozen features; ``semi_1pct``, ``semi_10pct``: fine-tuning on a
  class-balanced 1 % / 10 % of the train labels (Table 1; random init = supervised
  training on the same labels); ``supervised``: random init on all labels, the reference;
  ``seg_probe``, ``seg_fcn``: segmentation mean IoU (frozen 1x1 probe / FCN decoder with
  the encoder fine-tuned; Table 3 in miniature); ``transfer_linear``,
  ``transfer_finetune``: the sets of bench.make_transfer_sets (Table 2).
- fmnist-scenes protocols are scored on its test split and on the unseen-backgrounds split
  (the same objects on photographs no training image shows) by the same trained model
  (``--extra_eval_files``), and the drop between the two is a row of its own (paired by
  seed; lower is better).
- Classification protocols run twice: ``--embedding=global`` (exact-mask records; the
  masks are unused) and ``--embedding=foreground`` (HARL's object embedding, on records
  whose masks are the label-free conventional ones, train and evaluation alike).
  Segmentation always reads the exact masks (they are its targets).

Settings are never chosen on a test split. ``--split=validation`` carves a fixed
validation split from each dataset's train records (class-balanced,
``--validation_fraction``, chosen by id hash as ``harl_tf.downstream.subsets``, the same
whatever the seed), runs each protocol's grid (:data:`PROTOCOLS`, one flag per protocol)
with the global embedding for ``--validation_methods`` at ``--validation_seeds``, and
chooses per protocol the value with the best mean validation score over those runs (and
the transfer datasets); ``--write_flagfiles`` writes it into the protocol's flagfile with
a ``# Validation:`` line saying what was compared. The test report says which flagfiles
carry such a line.

Statistics per row and method: mean and sample sd over seeds; HARL − BYOL with the pooled
sd ``sqrt((sd_HARL² + sd_BYOL²) / 2)`` (:func:`compare`); verdict "HARL leads" / "BYOL
leads" when the difference exceeds one pooled sd in that direction, else "level".

Resumable: a run whose ``results.json`` exists is not run again. Reports started side by
side on one machine (one thread each, say) share the runs: each claims a run before it
starts it (:func:`claim`) and passes over those another has claimed or finished.
Each run's folder is
``<work_dir>/evals/<split>/<protocol>/<dataset>/<eval set>/<embedding>/<method>_s<seed>``
plus a hash of its command (with the encoders, repository, records and work folders as
placeholders), its flagfile and the pretrained encoder's weights sha256 (from the weights,
or from the encoder's record, ``--encoder_records``, where the encoder is not on this
machine), so a changed flagfile, grid value or retrained encoder is a new run, never a
stale result. Each finished run's results.json is also copied into ``--store_dir``
(``bench/results/paper_tables_runs``, committed), where a later report on another machine
finds it: the evaluations accumulate across sessions. Failed runs are
listed and left out (``--keep_going``). Writes ``bench/results/<output_name>.json`` and
``.md``: a short table, one line per protocol and dataset (:func:`summary_markdown`, the
README's), then every row; for the validation split ``<output_name>_validation.json`` and
``.md``: every grid value's score per method and the value chosen
(:func:`validation_markdown`).
"""
from __future__ import annotations

import dataclasses
import glob
import hashlib
import json
import math
import os
import shlex
import socket
import sys
from typing import Callable, Dict, List, Optional, Sequence, Tuple

from absl import flags

from bench import common
from bench.common import summarise
from bench.keep_encoders import WEIGHTS_FILE
from harl_tf import atomic, errors
from harl_tf.data.shards import sha256_file

FLAGS = flags.FLAGS
PY = sys.executable
ROOT = common.ROOT

METHODS = ("harl", "byol", "random")
RUNS = {"harl": "hybrid_conventional", "byol": "byol"}   # bench_learning's run names
LABELS = {"harl": "HARL hybrid", "byol": "BYOL", "random": "random init"}
SCENES, TRANSFER = "fmnist_scenes", ("fashion_mnist", "digits_scenes")
EMBEDDINGS = ("global", "foreground")
LEARNING_RATES = (0.01, 0.03, 0.1)
VALIDATION_NOTE = "# Validation:"
DROP = "drop test → unseen"   # the eval set of a row of paired drops
VALIDATION_SEED = 0   # the carve's id hash seed: one validation split for every seed
# The encoders the tables evaluate (bench.keep_encoders keeps them) and their records in the
# repository (bench/encoders/README.md).
ENCODERS = "/work/runs/encoders/fmnist_scenes_8x8/s{seed}/{run}"
ENCODER_RECORDS = "bench/encoders/fmnist_scenes_8x8/s{seed}/{run}.json"
STORE = "bench/results/paper_tables_runs"                     # kept results.json files


@dataclasses.dataclass(frozen=True)
class Protocol:
    """One evaluation protocol: its flagfile (relative to the repository root), the mode and
    segmentation head the flagfile must set, the metric read from results.json, where it
    runs, and the one flag chosen on the validation split with its candidates."""
    name: str
    title: str
    flagfile: str
    mode: str
    grid: Tuple[str, Tuple[float, ...]]
    metric: str = "top1"
    head: Optional[str] = None
    datasets: Tuple[str, ...] = (SCENES,)
    embeddings: Tuple[str, ...] = EMBEDDINGS
    methods: Tuple[str, ...] = METHODS


PROTOCOLS = (
    Protocol("knn", "k-NN", "flags/eval_knn.cfg", "knn", ("knn_k", (10, 20, 50))),
    Protocol("linear", "linear probe", "flags/eval_linear.cfg", "linear",
             ("learning_rate", (0.1, 0.3, 0.9))),
    # Grids widened where seed 0's validation runs found the best at an edge: 1 % / 10 %
    # first 0.01-0.1, then 0.3 (BYOL 0.1535 / 0.485, best again), now 1.0; the FCN
    # 0.01-0.1 (BYOL 0.188 / 0.266 / 0.340), now 0.3; transfer fine-tuning started where
    # every fine-tuning grid found its best, 0.03-0.3, and adds 1.0 (BYOL on fashion_mnist:
    # 0.7515 / 0.8105 / 0.845); the segmentation probe adds 1.0 (0.3 was best: mean
    # 0.159), 3.0 (1.0 best again: 0.167) and 10.0 (3.0 best again, 0.169: a plateau);
    # transfer linear 0.03 (0.1 was best, by 0.2 points over 0.3 and 0.5 over 0.9); the
    # supervised reference 0.3 (0.258 / 0.3945 / 0.659 at 0.01 / 0.03 / 0.1) and 1.0
    # (0.3 best again: 0.707).
    Protocol("semi_1pct", "fine-tune, 1 % labels", "flags/eval_semi_1pct.cfg", "finetune",
             ("learning_rate", LEARNING_RATES + (0.3, 1.0))),
    Protocol("semi_10pct", "fine-tune, 10 % labels", "flags/eval_semi_10pct.cfg", "finetune",
             ("learning_rate", LEARNING_RATES + (0.3, 1.0))),
    Protocol("supervised", "supervised, all labels (reference)", "flags/eval_supervised.cfg",
             "finetune", ("learning_rate", LEARNING_RATES + (0.3, 1.0)), embeddings=("global",),
             methods=("random",)),
    Protocol("seg_probe", "segmentation probe, mIoU", "flags/eval_segmentation_probe.cfg",
             "segmentation", ("learning_rate", (0.03, 0.1, 0.3, 1.0, 3.0, 10.0)),
             metric="mean_iou", head="probe", embeddings=("global",)),
    Protocol("seg_fcn", "segmentation fine-tune (FCN), mIoU",
             "flags/eval_segmentation_fcn.cfg", "segmentation",
             ("learning_rate", LEARNING_RATES + (0.3,)), metric="mean_iou", head="fcn",
             embeddings=("global",)),
    Protocol("transfer_linear", "transfer, linear", "flags/eval_transfer_linear.cfg", "linear",
             ("learning_rate", (0.03, 0.1, 0.3, 0.9)), datasets=TRANSFER),
    Protocol("transfer_finetune", "transfer, fine-tune", "flags/eval_transfer_finetune.cfg",
             "finetune", ("learning_rate", (0.03, 0.1, 0.3, 1.0)), datasets=TRANSFER),
)
BY_NAME = {p.name: p for p in PROTOCOLS}


def define_flags() -> None:
    """The report's flags, defined when it runs (the tests import its functions)."""
    flags.DEFINE_enum("split", "test", ["test", "validation"],
                      "test: the table (test and unseen-backgrounds splits); validation: "
                      "choose each protocol's setting on splits carved from train.")
    flags.DEFINE_string("encoders", ENCODERS,
                        "Export (or pretraining model_dir) of each pretrained encoder; "
                        "{seed} and {run} (hybrid_conventional, byol) are filled in; "
                        "relative to the repository root unless absolute. Default: where "
                        "bench.keep_encoders keeps them (bench/encoders/README.md).")
    flags.DEFINE_string("encoder_records", ENCODER_RECORDS,
                        "bench.keep_encoders' record of each encoder ({seed}, {run}; "
                        "relative to the repository root unless absolute): where an encoder "
                        "is not on this machine, its recorded weights sha256 identifies its "
                        "stored results ('' for none).")
    flags.DEFINE_list("seeds", ["0", "1", "2"], "Pretraining seeds (one encoder each).")
    flags.DEFINE_list("protocols", [p.name for p in PROTOCOLS], "Protocols to run.")
    flags.DEFINE_list("methods", list(METHODS), "Methods to run.")
    flags.DEFINE_string("records_dir", "/work/runs/records",
                        "fmnist-scenes records made by bench.bench_learning "
                        "(fmnist_scenes_test_gt, fmnist_scenes_test_conventional); read only.")
    flags.DEFINE_string("unseen_dir", "/work/runs/fmnist_scenes_unseen",
                        "The unseen-backgrounds split (bench.make_unseen_backgrounds).")
    flags.DEFINE_string("transfer_dir", "/work/runs/transfer_sets",
                        "The transfer sets (bench.make_transfer_sets).")
    flags.DEFINE_string("work_dir", "/work/runs/paper_tables",
                        "Records this report builds, every run, logs.")
    flags.DEFINE_string("store_dir", STORE,
                        "Each finished run's results.json is copied here and read from "
                        "here when its run folder is gone, so a report resumes on a new "
                        "machine (relative to the repository root; '' for none).")
    flags.DEFINE_float("validation_fraction", 0.2, "--split=validation: share of each "
                       "dataset's train records held out (class-balanced).")
    flags.DEFINE_list("validation_methods", ["harl", "byol"],
                      "--split=validation: methods whose mean score chooses a setting.")
    flags.DEFINE_list("validation_seeds", ["0"], "--split=validation: seeds run.")
    flags.DEFINE_bool("write_flagfiles", False, "--split=validation: write the chosen "
                      "values into flags/eval_*.cfg.")
    flags.DEFINE_bool("report_only", False, "Run nothing; tabulate the results present.")
    flags.DEFINE_bool("dry_run", False, "Print the runs that would start; run nothing.")
    flags.DEFINE_bool("keep_going", True, "A failed run is listed and left out of the table "
                      "instead of stopping the report.")
    flags.DEFINE_string("output_name", "paper_tables", "bench/results/<name>.json and .md.")


# Statistics ---------------------------------------------------------------------------------

def pooled_sd(a: Optional[dict], b: Optional[dict]) -> Optional[float]:
    """``sqrt((sd_a² + sd_b²) / 2)`` of two :func:`summarise` results; None unless both
    have an sd (two seeds or more)."""
    if a is None or b is None or a["sd"] is None or b["sd"] is None:
        return None
    return math.sqrt((a["sd"] ** 2 + b["sd"] ** 2) / 2.0)


def verdict(difference: Optional[float], pooled: Optional[float], *,
            higher_is_better: bool = True) -> str:
    """Plain words for HARL − BYOL: "HARL leads" / "BYOL leads" when the difference is more
    than one pooled sd in that direction (for a drop, lower is better), else "level"."""
    if difference is None:
        return "–"
    if pooled is None:
        return "no verdict (fewer than 2 seeds)"
    lead = difference if higher_is_better else -difference
    if lead > pooled:
        return "HARL leads"
    if lead < -pooled:
        return "BYOL leads"
    return "level"


def compare(stats: Dict[str, Optional[dict]], *, higher_is_better: bool = True) -> dict:
    """HARL − BYOL for one row: ``{difference, pooled_sd, verdict}``."""
    a, b = stats.get("harl"), stats.get("byol")
    difference = a["mean"] - b["mean"] if a is not None and b is not None else None
    pooled = pooled_sd(a, b)
    return {"difference": difference, "pooled_sd": pooled,
            "verdict": verdict(difference, pooled, higher_is_better=higher_is_better)}


def paired_drops(test: Dict[int, float], shifted: Dict[int, float]) -> List[float]:
    """``test − shifted`` for each seed present in both (seed order)."""
    return [test[s] - shifted[s] for s in sorted(test) if s in shifted]


# The plan -----------------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class Run:
    """One harl_tf.finetune run. ``candidate``: (flag, value) of a validation grid."""
    protocol: str
    dataset: str
    eval_set: str
    embedding: str
    method: str
    seed: int
    candidate: Optional[Tuple[str, float]] = None

    @property
    def row(self) -> Tuple[str, str, str, str]:
        return (self.protocol, self.dataset, self.eval_set, self.embedding)


def eval_sets(split: str, dataset: str) -> Tuple[str, ...]:
    if split == "validation":
        return ("val",)
    return ("test", "unseen") if dataset == SCENES else ("test",)


def scored_in(run: Run) -> str:
    """The eval set of the run that scores ``run``: the unseen backgrounds are scored by the
    test run's model (``--extra_eval_files=unseen=...``), so one training serves both."""
    return "test" if run.eval_set == "unseen" else run.eval_set


def plan(split: str, protocols: Sequence[str], methods: Sequence[str],
         seeds: Sequence[int]) -> List[Run]:
    """Every run of the report, in table order. Validation: the global embedding only, one
    run per grid value, and a protocol none of whose methods is in ``methods`` (the
    supervised reference) with its own methods."""
    runs = []
    validation = split == "validation"
    for protocol in (BY_NAME[name] for name in protocols):
        flag, values = protocol.grid
        candidates = [(flag, v) for v in values] if validation else [None]
        embeddings = ("global",) if validation else protocol.embeddings
        chosen = [m for m in protocol.methods if m in methods]
        if validation and not chosen:
            chosen = list(protocol.methods)
        for dataset in protocol.datasets:
            for eval_set in eval_sets(split, dataset):
                for embedding in embeddings:
                    for candidate in candidates:
                        for method in chosen:
                            for seed in seeds:
                                runs.append(Run(protocol.name, dataset, eval_set, embedding,
                                                method, int(seed), candidate))
    return runs


@dataclasses.dataclass
class Layout:
    """Where things are (the report's flags)."""
    encoders: str
    records_dir: str
    unseen_dir: str
    transfer_dir: str
    work_dir: str
    split: str = "test"
    store_dir: Optional[str] = None   # results.json of finished runs, kept (committed)
    encoder_records: Optional[str] = None   # bench.keep_encoders' records ({seed}, {run})
    identities: Dict[str, str] = dataclasses.field(default_factory=dict)   # path -> sha256

    def encoder(self, method: str, seed: int) -> str:
        return self.encoders.format(seed=seed, run=RUNS[method])

    def identity(self, method: str, seed: int) -> Optional[str]:
        """What identifies a pretrained encoder's weights, part of each run's hash so that a
        result measured on one encoder is never reused for a retrained one: the sha256 of
        its ``encoder.weights.h5`` (byte-identical for identical weights; for other
        layouts, of its weights files' digests: :func:`encoder_weights`), or, where the
        encoder is not on this machine, the sha256 its ``--encoder_records`` record lists
        (so the stored results tabulate anywhere). None for random init: the seed fixes
        its weights."""
        if method == "random":
            return None
        path = self.encoder(method, seed)
        if path not in self.identities:
            self.identities[path] = _weights_identity(path, self.record(method, seed))
        return self.identities[path]

    def record(self, method: str, seed: int) -> Optional[str]:
        return self.encoder_records.format(seed=seed, run=RUNS[method]) \
            if self.encoder_records else None

    def built(self, name: str) -> str:
        return os.path.join(self.work_dir, "records", name)

    def records(self, dataset: str, masks: str, part: str) -> str:
        """File pattern of a dataset's ``part`` (train, test, unseen, val) with ``masks``
        (gt or conventional)."""
        if self.split == "validation":
            return os.path.join(self.built("validation"), f"{dataset}_{masks}", part,
                                "subset.tfrecord")
        if part == "unseen":
            return os.path.join(self.built(f"{SCENES}_unseen_{masks}"), "test-*.tfrecord")
        if dataset == SCENES:
            return os.path.join(self.records_dir, f"{SCENES}_test_{masks}", f"{part}-*.tfrecord")
        return os.path.join(self.built(f"{dataset}_{masks}"), f"{part}-*.tfrecord")

    def output_dir(self, run: Run, command: Sequence[str]) -> str:
        """The run's folder: readable names and a hash of the command, the flagfile's
        settings (comments left out; for a grid run, the grid flag too, which the command
        overrides) and the encoder's weights (:meth:`identity`), so that writing the chosen
        values or a note changes no validation run's folder, and a changed setting or a
        retrained encoder never reuses an old result."""
        settings = [line.strip() for line in _flagfile_text(run.protocol).splitlines()
                    if line.strip() and not line.lstrip().startswith("#")
                    and not (run.candidate and line.startswith(f"--{run.candidate[0]}="))]
        # Not the interpreter's path nor where the repository or the records are: only what
        # the run does (a store of results stays valid on another machine).
        argv = list(command[1:])
        for place, name in self.placeholders():
            argv = [a.replace(place, name) for a in argv]
        identity = self.identity(run.method, run.seed)
        hashed = [argv, settings] + ([identity] if identity else [])
        key = hashlib.sha256(json.dumps(hashed).encode()).hexdigest()[:8]
        leaf = f"{run.method}_s{run.seed}"
        if run.candidate:
            leaf += f"_{run.candidate[0]}={run.candidate[1]:g}"
        return os.path.join(self.work_dir, "evals", self.split, run.protocol, run.dataset,
                            scored_in(run), run.embedding, f"{leaf}-{key}")

    def placeholders(self) -> List[Tuple[str, str]]:
        """(folder, placeholder) pairs for the run hash, longest folder first: where the
        encoders, records, work folder and repository are is not what a run does."""
        encoders = self.encoders.split("{", 1)[0].rstrip("/")
        places = [(encoders, "<encoders>"), (self.work_dir, "<work>"),
                  (self.records_dir, "<records>"), (self.unseen_dir, "<unseen>"),
                  (self.transfer_dir, "<transfer>"), (ROOT, "<root>")]
        return sorted((p for p in places if p[0]), key=lambda p: -len(p[0]))

    def stored(self, output_dir: str) -> Optional[str]:
        """Where the store keeps the results.json of ``output_dir`` (None: no store)."""
        if not self.store_dir:
            return None
        return os.path.join(self.store_dir, os.path.relpath(output_dir, self.work_dir),
                            "results.json")


def encoder_weights(path: str) -> List[str]:
    """The weights files of an encoder as harl_tf.finetune --encoder reads it: a kept or
    exported encoder's ``encoder.weights.h5`` (byte-identical for identical weights), else
    an export's ``variables/variables.data-*``, else a pretraining model_dir's latest
    checkpoint's data files. MissingPathError when there are none."""
    h5 = os.path.join(path, WEIGHTS_FILE)
    if os.path.isfile(h5):
        return [h5]
    files = sorted(glob.glob(os.path.join(path, "variables", "variables.data-*")))
    state = os.path.join(path, "checkpoints", "checkpoint")
    if not files and os.path.isfile(state):
        with open(state) as f:
            latest = next((line.split(":", 1)[1].strip().strip('"') for line in f
                           if line.startswith("model_checkpoint_path:")), None)
        if latest:
            files = sorted(glob.glob(os.path.join(path, "checkpoints",
                                                  os.path.basename(latest) + ".data-*")))
    if not files:
        raise errors.MissingPathError(f"{path}: no encoder weights ({WEIGHTS_FILE}, "
                                      "variables/ or checkpoints/) to identify the encoder by.")
    return files


def _weights_identity(path: str, record: Optional[str]) -> str:
    """:meth:`Layout.identity` of the encoder at ``path`` (its record when it is absent)."""
    if not os.path.exists(path) and record and os.path.isfile(record):
        with open(record) as f:
            listed = json.load(f).get("files", {}).get(WEIGHTS_FILE, {})
        if "sha256" not in listed:
            raise errors.ConfigError(f"{record}: lists no {WEIGHTS_FILE} sha256.")
        return listed["sha256"]
    if not os.path.exists(path):
        raise errors.MissingPathError(
            f"{path}: no encoder there{f' and no record {record}' if record else ''}; the "
            "run hash needs its weights' sha256 (bench/encoders/README.md).")
    files = encoder_weights(path)
    if len(files) == 1 and files[0].endswith(".h5"):
        return sha256_file(files[0])
    digest = hashlib.sha256()
    for name in files:
        digest.update(sha256_file(name).encode())
    return digest.hexdigest()


def _flagfile_text(protocol: str) -> str:
    with open(os.path.join(ROOT, BY_NAME[protocol].flagfile)) as f:
        return f.read()


def command(run: Run, layout: Layout) -> List[str]:
    """The run's harl_tf.finetune argv, without --output_dir."""
    protocol = BY_NAME[run.protocol]
    masks = "conventional" if run.embedding == "foreground" else "gt"
    train = layout.records(run.dataset, masks, "train")
    evaluate = layout.records(run.dataset, masks, scored_in(run))
    if run.method == "random":
        encoder = ["--encoder=random", f"--encoder_config={layout.encoder('harl', run.seed)}"]
    else:
        encoder = [f"--encoder={layout.encoder(run.method, run.seed)}"]
    argv = [PY, "-m", "harl_tf.finetune",
            f"--flagfile={os.path.join(ROOT, protocol.flagfile)}", *encoder,
            f"--train_files={train}", f"--eval_files={evaluate}", f"--seed={run.seed}",
            "--verbose=0"]
    if run.dataset == SCENES and layout.split == "test":
        argv.append(f"--extra_eval_files=unseen={layout.records(SCENES, masks, 'unseen')}")
    if protocol.mode != "segmentation":
        argv.append(f"--embedding={run.embedding}")
    if run.candidate:
        argv.append(f"--{run.candidate[0]}={run.candidate[1]:g}")
    return argv


def found(output_dir: str, layout: Layout) -> str:
    """The results.json of the run folder ``output_dir``: in the folder, else in the store
    when kept there (in neither: the run has not run; the folder's path is returned)."""
    path = os.path.join(output_dir, "results.json")
    stored = layout.stored(output_dir)
    if not os.path.exists(path) and stored and os.path.exists(stored):
        return stored
    return path


def results_path(run: Run, layout: Layout) -> str:
    """The run's results.json (:func:`found`)."""
    return found(layout.output_dir(run, command(run, layout)), layout)


def read_value(run: Run, layout: Layout) -> Optional[float]:
    """The run's metric from its results.json (the unseen backgrounds' from its
    ``extra_eval``), None when it has not run."""
    path = results_path(run, layout)
    if not os.path.exists(path):
        return None
    with open(path) as f:
        results = json.load(f)
    if run.eval_set != scored_in(run):
        results = results["extra_eval"][run.eval_set]
    return float(results[BY_NAME[run.protocol].metric])


def keep(output_dir: str, layout: Layout) -> None:
    """Copies a finished run's results.json into the store (atomically)."""
    stored = layout.stored(output_dir)
    if stored:
        with open(os.path.join(output_dir, "results.json"), "rb") as f:
            atomic.write_bytes_atomic(stored, f.read())


def claim(output_dir: str) -> bool:
    """Takes the run folder ``output_dir`` for this process (``<output_dir>.claim``, created
    exclusively, holding host and pid), so reports started side by side on one machine
    share the runs instead of repeating them. False while another live process holds it; a
    claim whose process on this host has died is taken over."""
    path = output_dir + ".claim"
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    host = socket.gethostname()
    for _ in range(2):
        try:
            fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
        except FileExistsError:
            try:
                with open(path) as f:
                    holder, pid = f.read().split()
            except (OSError, ValueError):
                return False         # being written by its owner, or unreadable: not ours
            if holder != host or _alive(int(pid)):
                return False
            try:
                os.remove(path)      # its process died: the run is free again
            except FileNotFoundError:
                pass
            continue
        with os.fdopen(fd, "w") as f:
            f.write(f"{host} {os.getpid()}")
        return True
    return False


def release(output_dir: str) -> None:
    try:
        os.remove(output_dir + ".claim")
    except FileNotFoundError:
        pass


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass                         # it exists, as another user's process
    return True


Runner = Callable[[Sequence[str], str], float]


def execute(runs: Sequence[Run], layout: Layout, *, runner: Runner = common.run,
            keep_going: bool = True, dry_run: bool = False) -> dict:
    """Runs every run whose results.json is missing (``runner(argv, log_path)``, which
    raises SystemExit on failure), once for runs that one training scores (test and unseen
    backgrounds), and keeps each finished run's results in the store. Returns ``{"ran":
    [...], "skipped": n, "failed": [...], "elsewhere": [...]}`` (run folders; skipped: done
    before; elsewhere: run, or being run, by another report side by side, :func:`claim`)."""
    from harl_tf.progress import progress
    done = {"ran": [], "skipped": 0, "failed": [], "elsewhere": []}
    unique = {}
    for run in runs:
        argv = command(run, layout)
        unique.setdefault(layout.output_dir(run, argv), argv)
    todo = [(folder, argv) for folder, argv in unique.items()
            if not os.path.exists(found(folder, layout))]
    done["skipped"] = len(unique) - len(todo)
    print(f"{len(unique)} runs: {done['skipped']} done before, {len(todo)} to run",
          flush=True)
    for output_dir, argv in progress(todo, desc="paper tables", unit=" runs",
                                     disable=dry_run):
        argv = argv + [f"--output_dir={output_dir}"]
        if dry_run:
            print(shlex.join(argv))
            continue
        if not claim(output_dir):
            done["elsewhere"].append(output_dir)
            continue
        try:
            if os.path.exists(found(output_dir, layout)):   # finished by another report
                done["elsewhere"].append(output_dir)
                continue
            runner(argv, os.path.join(output_dir + ".log"))
            keep(output_dir, layout)
            done["ran"].append(output_dir)
        except SystemExit as failure:
            if not keep_going:
                raise
            print(f"FAILED {output_dir}: {str(failure).splitlines()[0]}", flush=True)
            done["failed"].append(output_dir)
        finally:
            release(output_dir)
    return done


# Tables -------------------------------------------------------------------------------------

def collect(runs: Sequence[Run], layout: Layout) -> Dict[tuple, Dict[str, Dict[int, float]]]:
    """``{row: {method: {seed: value}}}`` of the runs that have results (test split)."""
    table: Dict[tuple, Dict[str, Dict[int, float]]] = {}
    for run in runs:
        value = read_value(run, layout)
        row = table.setdefault(run.row, {})
        if value is not None:
            row.setdefault(run.method, {})[run.seed] = value
    return table


def rows(values: Dict[tuple, Dict[str, Dict[int, float]]]) -> List[dict]:
    """One row per (protocol, dataset, eval set, embedding), each test row followed by its
    unseen-backgrounds row and the drop test − unseen (paired by seed; lower is better):
    statistics per method and the HARL − BYOL comparison."""
    def row(key, by_method, eval_set=None, lower_is_better=False):
        protocol, dataset, own_set, embedding = key
        stats = {m: summarise(by_method.get(m, [])) if eval_set else
                 summarise(list(by_method.get(m, {}).values())) for m in METHODS}
        out = {"protocol": protocol, "dataset": dataset, "eval_set": eval_set or own_set,
               "embedding": embedding, "metric": BY_NAME[protocol].metric,
               "statistics": stats, **compare(stats, higher_is_better=not lower_is_better)}
        if eval_set:
            out["lower_is_better"] = lower_is_better
        else:
            out["values"] = by_method
        return out

    out, placed = [], set()
    for key, by_method in values.items():
        if key in placed:
            continue
        out.append(row(key, by_method))
        shifted_key = key[:2] + ("unseen",) + key[3:]
        if key[2] == "test" and shifted_key in values:
            shifted = values[shifted_key]
            out.append(row(shifted_key, shifted))
            drops = {m: paired_drops(by_method.get(m, {}), shifted.get(m, {}))
                     for m in METHODS}
            out.append(row(key, drops, eval_set=DROP, lower_is_better=True))
            placed.add(shifted_key)
    return out


def _cell(stat: Optional[dict], seeds: int) -> str:
    if stat is None:
        return "–"
    text = f"{stat['mean']:.3f}" + (f" ± {stat['sd']:.3f}" if stat["sd"] is not None else "")
    return text + (f" (n={stat['n']})" if stat["n"] != seeds else "")


def markdown(table_rows: Sequence[dict], seeds: int) -> str:
    """The Markdown table: means ± sd over seeds, HARL − BYOL (pooled sd), verdict."""
    body = []
    for row in table_rows:
        protocol = BY_NAME[row["protocol"]]
        data = {"test": "test", "unseen": "unseen backgrounds"}.get(row["eval_set"],
                                                                     row["eval_set"])
        body.append([protocol.title, f"{row['dataset']}, {data}", row["embedding"],
                     *(_cell(row["statistics"][m], seeds) for m in METHODS),
                     _difference(row), row["verdict"]])
    return common.table(body, ["protocol", "data", "embedding",
                               *(LABELS[m] for m in METHODS), "HARL − BYOL (pooled sd)",
                               "verdict"])


def _difference(row: dict) -> str:
    """HARL − BYOL of a row: the difference and its pooled sd, "–" without one."""
    if row["difference"] is None:
        return "–"
    pooled = f" ({row['pooled_sd']:.3f})" if row["pooled_sd"] is not None else ""
    return f"{row['difference']:+.3f}{pooled}"


def _versus(row: Optional[dict], seeds: Optional[int] = None) -> str:
    """HARL − BYOL of a row in one cell: :func:`_difference` and the verdict; given
    ``seeds``, a side with fewer runs is named (``(BYOL n=2)``), since the cell shows no
    means that would say so."""
    if row is None or row["difference"] is None:
        return "–"
    short = [f"{LABELS[m].split()[0]} n={row['statistics'][m]['n']}" for m in ("harl", "byol")
             if seeds is not None and row["statistics"][m]["n"] != seeds]
    return f"{_difference(row)} {row['verdict']}" + (f" ({', '.join(short)})" if short else "")


def summary_markdown(table_rows: Sequence[dict], seeds: int) -> str:
    """The short table (the README's): one line per protocol and dataset, its test split
    on the global embedding (each method's mean ± sd, HARL − BYOL and the verdict), then
    HARL − BYOL on the unseen backgrounds, the drop to them (each method's mean, the
    supervised reference's too, and the verdict; lower is better) and with the foreground
    embedding. :func:`markdown` has every row."""
    by_key = {(r["protocol"], r["dataset"], r["eval_set"], r["embedding"]): r
              for r in table_rows}
    body = []
    for row in table_rows:
        if row["eval_set"] != "test" or row["embedding"] != "global":
            continue
        protocol, dataset = row["protocol"], row["dataset"]
        drop = by_key.get((protocol, dataset, DROP, "global"))
        if drop is None:
            drops = "–"
        else:
            means = [f"{drop['statistics'][m]['mean']:.3f}" if drop["statistics"][m]
                     else "–" for m in METHODS]
            verdict = "" if drop["difference"] is None else f" {drop['verdict']}"
            drops = " / ".join(means) + verdict
        title = BY_NAME[protocol].title + ("" if dataset == SCENES else f" ({dataset})")
        body.append([title, *(_cell(row["statistics"][m], seeds) for m in METHODS),
                     _versus(row), _versus(by_key.get((protocol, dataset, "unseen", "global")),
                                           seeds),
                     drops, _versus(by_key.get((protocol, dataset, "test", "foreground")),
                                    seeds)])
    return common.table(body, [
        "protocol", *(LABELS[m] for m in METHODS), "HARL − BYOL (pooled sd)",
        "unseen backgrounds: HARL − BYOL", "drop to unseen: " + " / ".join(
            LABELS[m].split()[0] for m in METHODS), "foreground embedding: HARL − BYOL"])


def preamble(seeds: Sequence[int], failed: Sequence[str]) -> str:
    """The Markdown file's opening: what its tables are and how to read them."""
    text = (f"# The paper's evaluations in miniature\n\n"
            f"HARL hybrid, BYOL and random init, the 8×8 fmnist-scenes encoders of seeds "
            f"{', '.join(map(str, seeds))}: mean ± sd over seeds ((n=…) where fewer runs "
            f"finished). Top-1 accuracy; mean IoU for segmentation. HARL − BYOL with its "
            f"pooled sd √((sd_H² + sd_B²)/2): \"HARL leads\" or \"BYOL leads\" beyond one "
            f"pooled sd, else \"level\"; a drop from the test split to the unseen "
            f"backgrounds is better lower. Settings: `flags/eval_*.cfg`, chosen on "
            f"validation splits; how it was made: docs/results.md.\n")
    if failed:
        text += f"\n**{len(failed)} runs failed** and are left out: {', '.join(failed)}.\n"
    return text


# Validation ---------------------------------------------------------------------------------

def validation_scores(runs: Sequence[Run], layout: Layout
                      ) -> Dict[str, Dict[float, Dict[str, List[Optional[float]]]]]:
    """Protocol -> grid value -> method -> its runs' validation scores (one per seed, None
    for a run that has not finished), in plan order."""
    scores: Dict[str, Dict[float, Dict[str, List[Optional[float]]]]] = {}
    for run in runs:
        per_value = scores.setdefault(run.protocol, {}).setdefault(run.candidate[1], {})
        per_value.setdefault(run.method, []).append(read_value(run, layout))
    return scores


def choose(scores: Dict[str, Dict[float, Dict[str, List[Optional[float]]]]]
           ) -> Dict[str, dict]:
    """Per protocol of :func:`validation_scores`: each grid value's mean validation score
    over its runs, the methods those runs are of, the best (the first listed on a tie) and
    whether it is the grid's smallest or largest value (``at_edge``: the best may lie
    beyond; extend the grid). A protocol with a grid value that has no result is left out
    (not chosen on part of the grid)."""
    chosen = {}
    for name, per_value in scores.items():
        flat = {value: [v for vs in by_method.values() for v in vs]
                for value, by_method in per_value.items()}
        if any(v is None for values in flat.values() for v in values):
            continue
        means = {value: sum(vs) / len(vs) for value, vs in flat.items()}
        best = max(means, key=lambda v: (means[v], -list(means).index(v)))
        chosen[name] = {"flag": BY_NAME[name].grid[0], "value": best, "means": means,
                        "methods": list(next(iter(per_value.values()))),
                        "runs_per_value": len(next(iter(flat.values()))),
                        "at_edge": len(means) > 1 and best in (min(means), max(means))}
    return chosen


def validation_markdown(scores: Dict[str, Dict[float, Dict[str, List[Optional[float]]]]],
                        chosen: Dict[str, dict]) -> str:
    """The validation runs as a Markdown table: per protocol and grid value, each method's
    mean score over its seeds (and a transfer protocol's datasets; "–" until every run has
    finished), the mean that chooses, and which value was chosen (at the grid's edge, or
    not yet: the grid is incomplete)."""
    methods = [m for m in METHODS
               if any(m in by_method for per_value in scores.values()
                      for by_method in per_value.values())]
    body = []
    for name, per_value in scores.items():
        choice = chosen.get(name)
        for value, by_method in per_value.items():
            cells = []
            for method in methods:
                values = by_method.get(method)
                cells.append("–" if not values or None in values
                             else f"{sum(values) / len(values):.4f}")
            if choice is None:
                mean, verdict = "–", "grid incomplete"
            else:
                mean = f"{choice['means'][value]:.4f}"
                verdict = ("" if value != choice["value"] else
                           "**chosen**, at the grid's edge" if choice["at_edge"]
                           else "**chosen**")
            body.append([BY_NAME[name].title, f"--{BY_NAME[name].grid[0]}={value:g}",
                         *cells, mean, verdict])
    return common.table(body, ["protocol", "setting", *(LABELS[m] for m in methods),
                               "mean", ""])


def update_flagfile(text: str, flag: str, value: float, note: str) -> str:
    """``text`` with its ``--flag=`` line set to ``value`` and a ``# Validation: <note>``
    line above it (replacing any earlier such line). ConfigError when the flag is not set
    in the text (the report only changes values the flagfile already holds)."""
    lines = [line for line in text.splitlines() if not line.startswith(VALIDATION_NOTE)]
    index = next((i for i, line in enumerate(lines) if line.startswith(f"--{flag}=")), None)
    if index is None:
        raise errors.ConfigError(f"the flagfile sets no --{flag}; add the line --{flag}=... "
                                 "for the validation split to choose it.")
    lines[index:index + 1] = [f"{VALIDATION_NOTE} {note}", f"--{flag}={value:g}"]
    return "\n".join(lines) + "\n"


# Set-up -------------------------------------------------------------------------------------

def check_flagfiles(protocols: Sequence[str]) -> None:
    """Each protocol's flagfile parses as harl_tf.finetune flags, sets the mode (and head)
    the protocol needs and its grid flag: a ConfigError naming the file otherwise."""
    from harl_tf import config
    from harl_tf.eval_config import EvaluationConfig
    for protocol in (BY_NAME[name] for name in protocols):
        path = os.path.join(ROOT, protocol.flagfile)
        try:
            parsed = config.parse_argv(EvaluationConfig, [
                f"--flagfile={path}", "--encoder=x", "--train_files=x", "--eval_files=x",
                "--output_dir=x"])
        except config.ConfigError as err:
            raise errors.ConfigError(f"{protocol.flagfile}: {err}") from None
        head = parsed.segmentation_head if protocol.mode == "segmentation" else None
        if parsed.mode != protocol.mode or head != protocol.head:
            raise errors.ConfigError(
                f"{protocol.flagfile}: protocol {protocol.name} needs --mode={protocol.mode}"
                + (f" --segmentation_head={protocol.head}" if protocol.head else "")
                + f", the file sets --mode={parsed.mode}.")
        if f"--{protocol.grid[0]}=" not in _flagfile_text(protocol.name):
            raise errors.ConfigError(f"{protocol.flagfile}: sets no --{protocol.grid[0]}, "
                                     "the flag its validation grid chooses.")


def build_records(layout: Layout, datasets: Sequence[str], *, dry_run: bool) -> None:
    """The records the report builds itself (skipped when their manifest.json exists):
    the unseen-backgrounds split and the transfer sets, each with exact and conventional
    masks, via ``tools.build_tfrecords --source=folder``."""
    folders = {}
    if SCENES in datasets and layout.split == "test":
        folders[f"{SCENES}_unseen"] = (layout.unseen_dir, "test",
                                       "python -m bench.make_unseen_backgrounds")
    for name in TRANSFER:
        if name in datasets:
            folders[name] = (os.path.join(layout.transfer_dir, name), "train,test",
                             "python -m bench.make_transfer_sets")
    for name, (folder, splits, maker) in folders.items():
        if not os.path.isfile(os.path.join(folder, "classes.txt")):
            raise errors.MissingPathError(f"{folder}: no dataset there (no classes.txt); "
                                          f"make it with `{maker}`.")
        for masks, extra in (("gt", ["--mask_method_name=ground_truth"]),
                             ("conventional", ["--mask_method=conventional"])):
            out = layout.built(f"{name}_{masks}")
            if os.path.exists(os.path.join(out, "manifest.json")):
                continue
            argv = [PY, "-m", "tools.build_tfrecords", "--source=folder",
                    f"--images_dir={folder}", f"--splits={splits}", f"--output_dir={out}",
                    "--num_workers=2", "--noprogress", *extra]
            if dry_run:
                print(shlex.join(argv))
            else:
                common.run(argv, os.path.join(layout.work_dir, "logs", f"build_{name}_"
                                              f"{masks}.log"))


def carve_validation(layout: Layout, datasets: Sequence[str], fraction: float) -> dict:
    """``--split=validation``: for each dataset and mask source, the train records split
    into ``val`` (a class-balanced ``fraction`` chosen by id hash, seed
    :data:`VALIDATION_SEED`: ``subsets.label_subset``) and ``train`` (the rest), copied
    unchanged (``subsets.write_subset_records``, reused when the ids match). Returns
    ``{dataset: {"train": n, "val": n}}``."""
    from harl_tf.downstream import subsets
    counts = {}
    test_layout = dataclasses.replace(layout, split="test")
    for dataset in datasets:
        for masks in ("gt", "conventional"):
            pattern = test_layout.records(dataset, masks, "train")
            ids, labels = subsets.read_ids_and_labels(pattern)
            val = subsets.label_subset(ids, labels, fraction, seed=VALIDATION_SEED)
            chosen = set(val)
            train = sorted(i for i in ids if i not in chosen)
            for part, part_ids in (("val", val), ("train", train)):
                out = os.path.dirname(layout.records(dataset, masks, part))
                subsets.write_subset_records(pattern, part_ids, out)
            counts[dataset] = {"train": len(train), "val": len(val)}
    return counts


def check_scenes_records(layout: Layout) -> None:
    """MissingPathError unless bench.bench_learning's fmnist-scenes records are there."""
    test_layout = dataclasses.replace(layout, split="test")
    for masks in ("gt", "conventional"):
        for part in ("train", "test"):
            pattern = test_layout.records(SCENES, masks, part)
            if not glob.glob(pattern):
                raise errors.MissingPathError(
                    f"--records_dir: no records match {pattern}; build them with python -m "
                    "bench.bench_learning --dataset=fmnist_scenes --stages=build "
                    f"--records_dir={layout.records_dir}")


def check_encoders(layout: Layout, runs: Sequence[Run]) -> None:
    """MissingPathError listing every pretrained encoder the runs read that is not there
    (random init copies HARL's architecture, so it reads HARL's export too)."""
    needed = sorted({("harl" if r.method == "random" else r.method, r.seed) for r in runs})
    missing = [layout.encoder(m, s) for m, s in needed
               if not os.path.exists(layout.encoder(m, s))]
    if missing:
        raise errors.MissingPathError(
            f"--encoders: {len(missing)} encoders missing ({', '.join(missing[:4])}"
            f"{', ...' if len(missing) > 4 else ''}); pretrain and export them with "
            "python -m bench.bench_learning --dataset=fmnist_scenes "
            "--recipe_flagfile=flags/fmnist_scenes_8x8_base.cfg --work_dir=<dir of seed> "
            "--seed=<seed> --methods=byol,hybrid_conventional, then keep them with "
            "python -m bench.keep_encoders (bench/encoders/README.md).")


def main(argv) -> None:
    del argv
    unknown = sorted(set(FLAGS.protocols) - set(BY_NAME)) + sorted(set(FLAGS.methods)
                                                                    - set(METHODS))
    if unknown:
        raise errors.ConfigError(f"--protocols / --methods: unknown {unknown}; protocols "
                                 f"{list(BY_NAME)}, methods {list(METHODS)}")
    check_flagfiles(FLAGS.protocols)
    in_repo = lambda path: path and os.path.join(ROOT, path)  # noqa: E731 (abs stays)
    layout = Layout(in_repo(FLAGS.encoders), FLAGS.records_dir, FLAGS.unseen_dir,
                    FLAGS.transfer_dir, FLAGS.work_dir, FLAGS.split,
                    store_dir=in_repo(FLAGS.store_dir) or None,
                    encoder_records=in_repo(FLAGS.encoder_records) or None)
    validation = FLAGS.split == "validation"
    seeds = [int(s) for s in (FLAGS.validation_seeds if validation else FLAGS.seeds)]
    methods = FLAGS.validation_methods if validation else FLAGS.methods
    runs = plan(FLAGS.split, FLAGS.protocols, methods, seeds)
    datasets = sorted({r.dataset for r in runs})
    progress_of_runs, carved = {}, None
    if not FLAGS.report_only:
        check_encoders(layout, runs)
        if SCENES in datasets:
            check_scenes_records(layout)
        build_records(layout, datasets, dry_run=FLAGS.dry_run)
        if validation and not FLAGS.dry_run:
            carved = carve_validation(layout, datasets, FLAGS.validation_fraction)
        progress_of_runs = execute(runs, layout, keep_going=FLAGS.keep_going,
                                   dry_run=FLAGS.dry_run)
        if FLAGS.dry_run:
            return
    settings = {p: {"flagfile": BY_NAME[p].flagfile, "text": _flagfile_text(p),
                    "chosen_on_validation": VALIDATION_NOTE in _flagfile_text(p)}
                for p in FLAGS.protocols}
    weights = {m: {s: layout.identity(m, s) for s in seeds} for m in methods if m != "random"}
    payload = {"split": FLAGS.split, "seeds": seeds, "methods": methods,
               "encoders": FLAGS.encoders, "encoder_weights_sha256": weights,
               "work_dir": FLAGS.work_dir, "settings": settings,
               "failed": progress_of_runs.get("failed", []), "machine": common.machine_info()}
    if validation:
        scores = validation_scores(runs, layout)   # every results.json, read once
        chosen = choose(scores)
        table = validation_markdown(scores, chosen)
        print(table)
        for name, choice in chosen.items():
            print(f"{name}: --{choice['flag']}={choice['value']:g} "
                  f"(mean validation score {json.dumps(choice['means'])})"
                  + (" AT THE GRID'S EDGE: the best may lie beyond it" if choice["at_edge"]
                     else ""))
            if FLAGS.write_flagfiles:
                path = os.path.join(ROOT, BY_NAME[name].flagfile)
                note = (f"--{choice['flag']} from {sorted(choice['means'])}, best mean "
                        f"validation {BY_NAME[name].metric} over {', '.join(choice['methods'])} at "
                        f"seeds {seeds} ({FLAGS.validation_fraction:g} of train held out): "
                        + ", ".join(f"{v:g}: {m:.3f}" for v, m in choice["means"].items()))
                with open(path) as f:
                    text = update_flagfile(f.read(), choice["flag"], choice["value"], note)
                atomic.write_bytes_atomic(path, text.encode())
        payload.update(carved=carved, chosen=chosen, table_markdown=table)
        common.write_result(f"{FLAGS.output_name}_validation", payload)
        atomic.write_bytes_atomic(
            os.path.join(common.RESULTS_DIR, f"{FLAGS.output_name}_validation.md"),
            f"{table}\n".encode())
        return
    table_rows = rows(collect(runs, layout))
    summary, table = summary_markdown(table_rows, len(seeds)), markdown(table_rows, len(seeds))
    print(summary + "\n\n" + table)
    payload.update(rows=table_rows, summary_markdown=summary, table_markdown=table)
    common.write_result(FLAGS.output_name, payload)
    atomic.write_bytes_atomic(os.path.join(common.RESULTS_DIR, f"{FLAGS.output_name}.md"),
                              f"{preamble(seeds, payload['failed'])}\n{summary}\n\n"
                              f"Every row:\n\n{table}\n".encode())


if __name__ == "__main__":
    define_flags()
    errors.run_binary("report_paper_tables", main)
