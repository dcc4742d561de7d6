"""Fault-injection soak (slow; the fast versions are tests/test_reliability_*.py, test_fuzz.py).

1. ``pretrain``: ``python -m harl_tf.pretrain`` on a tiny ResNet-18 run is killed with
   SIGKILL ``--kills`` times (at least 3) at random moments — one of them while a checkpoint
   is being written (a ``ckpt-N_temp`` folder exists) — then stopped once with SIGTERM
   (it must save and exit 0), then run to the end. After every interruption: every listed
   checkpoint reads in full, holds its own step and only finite values, and the next run
   restores exactly the latest one (``start_step`` in summary.json, every tensor equal).
   The last run must finish at ``--train_steps``.
2. ``builder``: ``tools.build_tfrecords`` killed ``--kills`` times at random moments, then
   finished; shards, ids and counts must equal a clean build's, byte for byte.
3. ``fuzz``: ``--fuzz_cases`` mutated records and image / mask files (tests/test_fuzz.py's
   loops, other seeds).
4. ``binary_faults``: the pretraining binary with an absurd learning rate, on a truncated
   shard, and with its ``--model_dir`` on a full 2 MB tmpfs (needs root): each must end
   with one error line (naming the file for the shard) and a non-zero status; reports
   what is left in the model_dir.
5. ``multi_worker``: the rounds of tests/test_multiworker_faults.py (two workers of the
   binary on 127.0.0.1), ``--mw_rounds`` times each with a random victim (chief or not)
   and moment: SIGKILL one worker (the other exits within --collective_timeout_seconds,
   status 3, one line naming the lost worker and the resume step; the rerun of both
   ends with the weights of an uninterrupted run on both workers), and SIGTERM one (both
   save the same step and exit 0; the rerun ends with the uninterrupted run's weights).
   Reports the seconds from each SIGKILL to the survivor's exit.

Writes ``bench/results/fault_injection.json`` (a run of some ``--parts`` only:
``fault_injection_<parts>.json``); exits 1 when a property fails.

    python -m bench.fault_injection [--kills 3] [--train_steps 24] [--fuzz_cases 20000]
        [--mw_rounds 2] [--parts pretrain,builder,fuzz,binary_faults,multi_worker]
        [--work_dir /tmp/harl_faults]
"""
from __future__ import annotations

import glob
import hashlib
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import time

from absl import app, flags

from bench import common

ROOT = common.ROOT
common.import_test_helpers()  # the soak reuses tests/*.py (test_reliability_training, ...)
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

ENV = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3", PYTHONPATH=ROOT, CUDA_VISIBLE_DEVICES="")


PARTS = ("pretrain", "builder", "fuzz", "binary_faults", "multi_worker")

FLAGS = flags.FLAGS
flags.DEFINE_integer("kills", 3, "Kills per soak (one during a checkpoint write, the rest at "
                     "random).", lower_bound=3)
flags.DEFINE_integer("train_steps", 24, "Steps of the soaked pretraining.", lower_bound=1)
flags.DEFINE_integer("fuzz_cases", 20000, "Fuzzed records and images.", lower_bound=3)
flags.DEFINE_integer("seed", 0, "Seed of the kill times and the fuzz.")
flags.DEFINE_integer("mw_rounds", 2, "multi_worker: rounds of (SIGKILL, SIGTERM).",
                     lower_bound=1)
flags.DEFINE_list("parts", list(PARTS), f"Parts to run, of {PARTS}.")
flags.DEFINE_string("work_dir", "", "Scratch folder (default: a new temporary one).")


def log(message):
    print(f"[{time.strftime('%H:%M:%S')}] {message}", flush=True)


def _checkpoint_tensors(prefix):
    import tensorflow as tf
    reader = tf.train.load_checkpoint(prefix)
    return {k: reader.get_tensor(k) for k in reader.get_variable_to_shape_map()
            if k != "_CHECKPOINTABLE_OBJECT_GRAPH"}


def _verify_checkpoints(model_dir):
    """Steps listed; raises AssertionError if one is incomplete, mislabelled or non-finite."""
    import numpy as np
    from harl_tf import checkpoints
    steps = checkpoints.available_steps(model_dir)
    for step in steps:
        values = _checkpoint_tensors(checkpoints.find_checkpoint(model_dir, step))
        assert int(values["step/.ATTRIBUTES/VARIABLE_VALUE"]) == step, step
        for key, value in values.items():
            if np.issubdtype(np.asarray(value).dtype, np.floating):
                assert np.all(np.isfinite(value)), (step, key)
    return steps


def pretrain_soak(args, work):
    from harl_tf import checkpoints
    from harl_tf.data import builder, sources
    from test_reliability_training import config_flags, tiny_config
    records = os.path.join(work, "records")
    builder.build_dataset(sources.SyntheticSource(64, image_size=32), records, num_shards=2,
                          progress=False)
    model_dir = os.path.join(work, "model")
    config = tiny_config(os.path.join(records, "train-*.tfrecord"), model_dir,
                         train_steps=args.train_steps, checkpoint_every_steps=2,
                         keep_checkpoints=2, log_every_steps=4)
    command = [sys.executable, "-m", "harl_tf.pretrain", *config_flags(config)]
    ckpt_dir = checkpoints.checkpoint_dir(model_dir)
    rng = random.Random(args.seed)
    events, ok = [], True

    def check_after(kind, proc_status):
        steps = _verify_checkpoints(model_dir)
        event = {"interruption": kind, "status": proc_status, "checkpoints": steps}
        log(f"{kind}: status {proc_status}, complete checkpoints {steps}")
        return event, steps

    kills = ["during_write"] + ["random"] * (args.kills - 1)
    rng.shuffle(kills)
    plans = kills + ["sigterm"]
    previous_latest = None
    for plan in plans + ["finish"]:
        proc = subprocess.Popen(command, cwd=ROOT, env=ENV, stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, text=True)
        started = time.time()
        if plan == "finish":
            out, err = proc.communicate(timeout=3600)
            summary = json.load(open(os.path.join(model_dir, "summary.json")))
            steps = _verify_checkpoints(model_dir)
            passed = (proc.returncode == 0 and summary["final_step"] == args.train_steps
                      and summary["start_step"] == previous_latest
                      and steps[-1] == args.train_steps)
            events.append({"interruption": "none (final run)", "status": proc.returncode,
                           "start_step": summary["start_step"],
                           "final_step": summary["final_step"], "checkpoints": steps,
                           "passed": passed})
            ok &= passed
            log(f"final run: status {proc.returncode}, {summary['start_step']} -> "
                f"{summary['final_step']}, checkpoints {steps}")
            break
        # Wait until this run has saved past where it started, then pick the moment.
        base = previous_latest or 0
        target = None
        while proc.poll() is None and time.time() - started < 3600:
            steps = checkpoints.available_steps(model_dir)
            if plan == "during_write":
                if glob.glob(os.path.join(ckpt_dir, "ckpt-*_temp*")) and steps and \
                        steps[-1] > base:
                    target = "temp folder present"
                    break
                time.sleep(0.001)
                continue
            if steps and steps[-1] >= base + 2:
                time.sleep(rng.uniform(0.0, 2.0))
                target = "random moment"
                break
            time.sleep(0.02)
        if proc.poll() is not None:
            log(f"{plan}: the run ended before it could be interrupted; use more --train_steps")
            ok = False
            break
        proc.send_signal(signal.SIGTERM if plan == "sigterm" else signal.SIGKILL)
        out, err = proc.communicate(timeout=600)
        event, steps = check_after(plan, proc.returncode)
        event["moment"] = target
        if plan == "sigterm":
            # Preemption: saves the step it stopped at and exits cleanly.
            summary = json.load(open(os.path.join(model_dir, "summary.json")))
            passed = (proc.returncode == 0 and summary["stopped_by_signal"]
                      and steps[-1] == summary["final_step"] and "stopped" in out)
            event.update(final_step=summary["final_step"], passed=passed)
        else:
            passed = proc.returncode == -signal.SIGKILL and bool(steps)
            event["passed"] = passed
        ok &= passed
        # The next run restores exactly the latest checkpoint (checked in-process).
        if steps:
            event["restore_exact"] = _restore_is_exact(config, model_dir, work)
            ok &= event["restore_exact"]
        events.append(event)
        previous_latest = steps[-1] if steps else 0
    return {"passed": bool(ok), "events": events, "train_steps": args.train_steps}


def _restore_is_exact(config, model_dir, work):
    import numpy as np
    import tensorflow as tf
    from harl_tf import checkpoints, training
    saved = _checkpoint_tensors(checkpoints.find_checkpoint(model_dir))
    model = training.build_model(config, tf.distribute.get_strategy())
    manager = checkpoints.CheckpointManager(model_dir, model, every_n_steps=0)
    step = manager.restore_latest()
    again = _checkpoint_tensors(manager.checkpoint.write(
        os.path.join(tempfile.mkdtemp(dir=work), "ckpt")))
    return (sorted(again) == sorted(saved)
            and int(model.optimizer.iterations.numpy()) == step
            and all(np.array_equal(again[k], v) for k, v in saved.items()))


def _sha(path):
    return hashlib.sha256(open(path, "rb").read()).hexdigest()


def builder_soak(args, work):
    from harl_tf.data import builder, schema, sources
    command = [sys.executable, "-m", "tools.build_tfrecords", "--source=synthetic",
               "--num_images=600", "--image_size=48", "--mask_method=conventional",
               "--num_shards=20", "--num_workers=2", "--noprogress"]
    killed = os.path.join(work, "killed")
    rng = random.Random(args.seed + 1)
    events, events_ok = [], []
    for i in range(args.kills):
        proc = subprocess.Popen(command + [f"--output_dir={killed}"], cwd=ROOT, env=ENV,
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        # Wait until a shard is being written, then kill at a random moment after.
        while proc.poll() is None and not glob.glob(os.path.join(killed, ".train-*.tmp")):
            time.sleep(0.01)
        time.sleep(rng.uniform(0.0, 3.0))
        if proc.poll() is not None:
            events.append({"kill": i, "note": "build finished before the kill"})
            continue
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        shards = glob.glob(os.path.join(killed, "train-*.tfrecord"))
        for shard in shards:     # every visible shard is complete (its sidecar matches)
            sidecar = os.path.join(killed, "_shards", os.path.basename(shard) + ".json")
            if os.path.exists(sidecar):
                ok_shard = json.load(open(sidecar))["sha256"] == _sha(shard)
                events_ok.append(ok_shard)
        events.append({"kill": i, "shards_present": len(shards)})
        log(f"builder kill {i}: {len(shards)} shards present")
    done = subprocess.run(command + [f"--output_dir={killed}"], cwd=ROOT, env=ENV,
                          capture_output=True, text=True)
    clean = os.path.join(work, "clean")
    builder.build_dataset(sources.SyntheticSource(600, image_size=48), clean,
                          mask_method="conventional", num_shards=20, num_workers=2,
                          progress=False)
    a = json.load(open(os.path.join(clean, "manifest.json")))
    b = json.load(open(os.path.join(killed, "manifest.json")))
    ids = []
    for path in sorted(glob.glob(os.path.join(killed, "train-*.tfrecord"))):
        ids.extend(r["id"] for r in schema.read_examples(path, decode=False))
    same_bytes = all(_sha(os.path.join(killed, s["file"])) == s["sha256"]
                     for s in a["splits"]["train"]["shards"])
    passed = (done.returncode == 0 and b["complete"] and len(ids) == len(set(ids)) == 600
              and a["splits"]["train"]["num_records"] == b["splits"]["train"]["num_records"]
              and same_bytes and all(events_ok))
    log(f"builder: rerun status {done.returncode}, {len(ids)} ids, {len(set(ids))} unique, "
        f"same bytes as a clean build: {same_bytes}")
    return {"passed": bool(passed), "events": events, "ids": len(ids),
            "unique_ids": len(set(ids)), "same_bytes_as_clean": same_bytes}


def fuzz(args):
    import test_fuzz
    started = time.time()
    per = max(1, args.fuzz_cases // 3)
    parse = test_fuzz.parse_fuzz(per, seed=args.seed + 100)
    jpeg = test_fuzz.load_fuzz("jpeg", per, seed=args.seed + 200)
    png = test_fuzz.load_fuzz("png", per, seed=args.seed + 300)
    log(f"fuzz: parser {dict(parse)}, jpeg {dict(jpeg)}, png {dict(png)}")
    return {"passed": True, "cases": 3 * per, "seconds": round(time.time() - started, 1),
            "parser": dict(parse), "jpeg": dict(jpeg), "png": dict(png)}


def _error_lines(stderr):
    from test_bad_flags import binary_lines
    return binary_lines(stderr)


def binary_faults(args, work):
    """Observed behaviour of the binary (reported, and judged: one error line expected)."""
    from harl_tf.data import builder, sources
    from test_reliability_data import small_tmpfs
    from test_reliability_training import config_flags, tiny_config
    records = os.path.join(work, "records_bf")
    builder.build_dataset(sources.SyntheticSource(64, image_size=32), records, num_shards=2,
                          progress=False)
    files = os.path.join(records, "train-*.tfrecord")
    out = {}
    cases = {"absurd_learning_rate": dict(base_learning_rate=1e9, warmup_epochs=0.5,
                                          checkpoint_every_steps=1, deterministic=False)}
    for name, overrides in cases.items():
        model_dir = os.path.join(work, name)
        config = tiny_config(files, model_dir, **overrides)
        done = subprocess.run([sys.executable, "-m", "harl_tf.pretrain",
                               *config_flags(config)], cwd=ROOT, env=ENV,
                              capture_output=True, text=True)
        lines = [line for line in _error_lines(done.stderr) if "error" in line.lower()]
        steps = _verify_checkpoints(model_dir)
        out[name] = {"status": done.returncode, "stderr_tail": done.stderr[-600:],
                     "one_error_line": "Traceback" not in done.stderr and len(lines) == 1,
                     "error_lines": lines, "complete_finite_checkpoints": steps}
        log(f"{name}: status {done.returncode}, traceback: {'Traceback' in done.stderr}, "
            f"good checkpoints {steps}")
    # A truncated shard: the error must name the file (pipeline.naming_corrupt_files).
    corrupt = os.path.join(work, "records_corrupt")
    shutil.copytree(records, corrupt)
    shard = sorted(glob.glob(os.path.join(corrupt, "train-*.tfrecord")))[1]
    with open(shard, "r+b") as handle:
        handle.truncate(os.path.getsize(shard) // 2)
    config = tiny_config(os.path.join(corrupt, "train-*.tfrecord"),
                         os.path.join(work, "corrupt_model"))
    done = subprocess.run([sys.executable, "-m", "harl_tf.pretrain", *config_flags(config)],
                          cwd=ROOT, env=ENV, capture_output=True, text=True)
    lines = [line for line in _error_lines(done.stderr) if "error" in line.lower()]
    out["corrupt_shard"] = {
        "status": done.returncode, "stderr_tail": done.stderr[-600:], "error_lines": lines,
        "one_error_line": "Traceback" not in done.stderr and len(lines) == 1
        and shard in lines[0]}
    log(f"corrupt_shard: status {done.returncode}, lines {lines}")
    try:
        with small_tmpfs("2m") as disk:
            config = tiny_config(files, os.path.join(disk, "model"))
            done = subprocess.run([sys.executable, "-m", "harl_tf.pretrain",
                                   *config_flags(config)], cwd=ROOT, env=ENV,
                                  capture_output=True, text=True)
            out["full_disk"] = {
                "status": done.returncode, "stderr_tail": done.stderr[-600:],
                "one_error_line": "Traceback" not in done.stderr,
                "latest_checkpoint_files": sorted(os.listdir(os.path.join(disk, "model",
                                                                         "checkpoints")))
                if os.path.isdir(os.path.join(disk, "model", "checkpoints")) else []}
            log(f"full_disk: status {done.returncode}, traceback: "
                f"{'Traceback' in done.stderr}")
    except BaseException as err:  # pytest.skip outside pytest raises Skipped
        out["full_disk"] = {"skipped": str(err)}
    out["passed"] = all(v.get("one_error_line", True) and v.get("status", 1) != 0
                        for v in out.values() if isinstance(v, dict))
    return out


def multi_worker_soak(args, work):
    """The SIGKILL and SIGTERM rounds of tests/test_multiworker_faults.py, repeated with a
    random victim and moment, against one uninterrupted run."""
    import test_multiworker_faults as mw
    rng = random.Random(args.seed + 2)
    records = mw.make_records(os.path.join(work, "records"))
    statuses, straight = mw.run_straight(records, os.path.join(work, "straight"))
    log(f"multi_worker: uninterrupted run: statuses {statuses}")
    if straight is None:
        return {"passed": False, "straight_statuses": statuses}
    events, ok = [], True
    for i in range(args.mw_rounds):
        for kind in ("sigkill", "sigterm"):
            victim = rng.randrange(2)
            # SIGTERM no later than step STEPS - 3: the agreed stop must fall before the end.
            at_step = rng.randint(3, mw.STEPS - (2 if kind == "sigkill" else 3))
            folder = os.path.join(work, f"{kind}-{i}")
            if kind == "sigkill":
                observed = mw.sigkill_round(records, folder, victim=victim, at_step=at_step)
                problems = mw.sigkill_problems(observed, straight)
                event = {k: observed[k] for k in ("survivor_status", "seconds_to_exit",
                                                  "error_lines", "resume_step")}
            else:
                observed = mw.sigterm_round(records, folder, victim=victim, at_step=at_step)
                problems = mw.sigterm_problems(observed, straight)
                event = {"statuses": observed["statuses"],
                         "stopped_at": [s["final_step"] for s in observed["stopped"] or []]}
            event.update(kind=kind, victim=victim, at_step=at_step,
                         rerun_statuses=observed["rerun_statuses"], problems=problems)
            events.append(event)
            ok &= not problems
            log(f"multi_worker {kind} round {i}: worker {victim} after step {at_step}: "
                f"{'ok' if not problems else problems} "
                f"{event.get('seconds_to_exit', '')}")
    exits = sorted(e["seconds_to_exit"] for e in events if e["kind"] == "sigkill")
    return {"passed": bool(ok), "events": events, "steps": mw.STEPS,
            "collective_timeout_seconds": mw.TIMEOUT,
            "sigkill_to_survivor_exit_seconds": {"min": exits[0], "max": exits[-1],
                                                 "all": exits} if exits else {}}


def main(argv):
    del argv
    args = FLAGS
    work = args.work_dir or tempfile.mkdtemp(prefix="harl-faults-")
    os.makedirs(work, exist_ok=True)
    started = time.time()
    results = {"benchmark": "fault_injection", "command": common.command_line()}
    parts = [p.strip() for p in args.parts if p.strip()]
    for part in parts:
        log(f"--- {part}")
        folder = os.path.join(work, part)
        shutil.rmtree(folder, ignore_errors=True)
        os.makedirs(folder)
        if part == "pretrain":
            results[part] = pretrain_soak(args, folder)
        elif part == "builder":
            results[part] = builder_soak(args, folder)
        elif part == "fuzz":
            results[part] = fuzz(args)
        elif part == "binary_faults":
            results[part] = binary_faults(args, folder)
        elif part == "multi_worker":
            results[part] = multi_worker_soak(args, folder)
        else:
            raise app.UsageError(f"--parts: unknown part {part!r}; choose from {PARTS}")
    results["seconds"] = round(time.time() - started, 1)
    results["passed"] = all(results[p]["passed"] for p in parts)
    os.makedirs(os.path.join(ROOT, "bench", "results"), exist_ok=True)
    # A run of some parts only does not replace the record of a full run.
    name = ("fault_injection" if set(parts) >= set(PARTS)
            else "fault_injection_" + "_".join(parts))
    with open(os.path.join(ROOT, "bench", "results", name + ".json"), "w") as handle:
        json.dump(results, handle, indent=1, default=str)
    log(f"passed: {results['passed']} ({results['seconds']} s)")
    sys.exit(0 if results["passed"] else 1)


if __name__ == "__main__":
    app.run(main)
