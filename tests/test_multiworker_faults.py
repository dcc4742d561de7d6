"""Losing a worker in multi-worker pretraining: two processes of ``python -m harl_tf.pretrain``
on 127.0.0.1 (TF_CONFIG, free ports), ResNet-18 at 32 px, 8 steps of 8, --deterministic.

(a) SIGKILL one worker mid-run: the other ends within --collective_timeout_seconds with ONE
    line ``pretrain: error: ...`` naming the lost worker and the step a rerun resumes from,
    and exit status 3 (``distribute.PEER_LOST_EXIT_STATUS``); rerunning both finishes with
    the same weights on both workers, those of an uninterrupted run.
(b) SIGTERM one worker: both save the same step and exit 0; the rerun ends with the weights
    of an uninterrupted run.
(c) A peer alive but hung: the survivor's collective fails after --collective_timeout_seconds;
    and a stop asked by one worker is seen by both (``distribute.stop_agreement``).

Each two-worker run starts TensorFlow and traces the step (1-2 min on 2 loaded cores), so
(a)-(c) are marked ``slow`` and left out of the default suite (pytest.ini):
``python -m pytest -q -m slow tests/test_multiworker_faults.py`` runs them, and
``python bench/fault_injection.py --parts multi_worker`` runs (a) and (b) repeatedly with
random victims and moments. The message test at the end is fast and always runs.
"""
import json
import os
import pathlib
import signal
import subprocess
import sys
import textwrap
import time

import numpy as np
import pytest
import tensorflow as tf

from harl_tf import bootstrap, checkpoints, distribute
from test_bad_flags import binary_lines
from test_pretrain_binary import REPO, _env, _free_ports, _tiny
from test_reliability_training import config_flags

STEPS = 8
TIMEOUT = 60            # --collective_timeout_seconds of these runs


def job_config(work, train_files):
    """The run every job here makes: two workers, synchronised BatchNorm (otherwise each
    worker keeps its own moving statistics), a checkpoint every 3 steps (so that a stop at
    4 or 5 is saved by the stop itself)."""
    return _tiny(pathlib.Path(work), train_files=train_files, strategy="multi_worker",
                 sync_batchnorm=True, deterministic=True, synthetic_records=40,
                 num_train_examples=40, train_steps=STEPS, checkpoint_every_steps=3,
                 log_every_steps=1, image_summaries=0, collective_timeout_seconds=TIMEOUT)


def make_records(work):
    """40 synthetic records (5 batches of 8: the 8 steps cross epoch boundaries); returns
    their glob."""
    config = _tiny(pathlib.Path(work), synthetic_records=40, num_train_examples=40)
    bootstrap.ensure_synthetic_records(config)
    return config.train_files


class Job:
    """Two workers of the pretraining binary on 127.0.0.1; their output goes to files."""

    def __init__(self, config, tag):
        self.config = config
        cluster = {"worker": [f"127.0.0.1:{p}" for p in _free_ports(2)]}
        os.makedirs(config.model_dir, exist_ok=True)
        self.out = [os.path.join(config.model_dir, f"{tag}-worker{i}.out") for i in range(2)]
        self.err = [os.path.join(config.model_dir, f"{tag}-worker{i}.err") for i in range(2)]
        self.procs = []
        for i in range(2):
            env = _env(TF_CONFIG=json.dumps({"cluster": cluster,
                                             "task": {"type": "worker", "index": i}}))
            with open(self.out[i], "w") as out, open(self.err[i], "w") as err:
                self.procs.append(subprocess.Popen(
                    [sys.executable, "-m", "harl_tf.pretrain", *config_flags(config)],
                    cwd=REPO, env=env, stdout=out, stderr=err))

    def stderr(self, i):
        return open(self.err[i]).read()

    def stdout(self, i):
        return open(self.out[i]).read()

    def wait_for_step(self, worker, step, timeout=900):
        """Wait until ``worker`` logged ``step``; False if a worker ended first."""
        line = f"step {step}/{self.config.total_steps} "
        deadline = time.time() + timeout
        while time.time() < deadline:
            if line in self.stderr(worker):
                return True
            if any(p.poll() is not None for p in self.procs):
                return False
            time.sleep(0.05)
        return False

    def wait(self, timeout=900):
        """Exit statuses of both workers (a worker still running after ``timeout`` is
        killed and reported as None)."""
        statuses = []
        for p in self.procs:
            try:
                statuses.append(p.wait(timeout=timeout))
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()
                statuses.append(None)
        return statuses

    def summaries(self):
        """summary.json of the chief (worker 0) and summary-worker-1.json."""
        names = ("summary.json", "summary-worker-1.json")
        return [json.load(open(os.path.join(self.config.model_dir, n))) for n in names]


def run_straight(records, work):
    """An uninterrupted job: (statuses, summaries)."""
    job = Job(job_config(work, records), "straight")
    statuses = job.wait()
    return statuses, (job.summaries() if statuses == [0, 0] else None)


def same_weights(a, b):
    """Equal weight fingerprints ([Σw, Σ|w|] per variable, float64).

    Exact: two workers reduce the same two addends (a + b == b + a in IEEE arithmetic) and
    a --deterministic resumed run sees the batches of an uninterrupted one. All 18 pairs
    compared while writing these tests (2 runs of this file, 2 soak rounds: worker 0 vs.
    worker 1, uninterrupted vs. resumed after SIGKILL or SIGTERM of either worker) were
    bit-equal, so no tolerance is given: any difference means another state, not rounding."""
    return np.array_equal(np.asarray(a, np.float64), np.asarray(b, np.float64))


def sigkill_round(records, work, *, victim=1, at_step=5):
    """SIGKILL ``victim`` once it logged ``at_step``; observe the survivor; rerun both."""
    config = job_config(work, records)
    job = Job(config, "killed")
    survivor = 1 - victim
    observed = {"victim": victim, "at_step": at_step, "reached": job.wait_for_step(victim,
                                                                                   at_step)}
    killed = time.time()
    job.procs[victim].send_signal(signal.SIGKILL)
    try:
        observed["survivor_status"] = job.procs[survivor].wait(timeout=TIMEOUT + 300)
    except subprocess.TimeoutExpired:
        observed["survivor_status"] = None
    observed["seconds_to_exit"] = round(time.time() - killed, 1)
    job.wait()
    stderr = job.stderr(survivor)
    observed["traceback"] = "Traceback" in stderr
    observed["error_lines"] = [line for line in binary_lines(stderr) if "error" in line.lower()]
    steps = checkpoints.available_steps(config.model_dir)
    observed["resume_step"] = steps[-1] if steps else 0
    rerun = Job(config, "rerun")
    observed["rerun_statuses"] = rerun.wait()
    observed["rerun"] = rerun.summaries() if observed["rerun_statuses"] == [0, 0] else None
    return observed


def sigkill_problems(observed, straight):
    """What went wrong in a :func:`sigkill_round` (empty: all properties hold)."""
    problems = []
    victim, lines = observed["victim"], observed["error_lines"]
    if not observed["reached"]:
        return [f"worker {victim} never logged step {observed['at_step']}"]
    if observed["survivor_status"] != distribute.PEER_LOST_EXIT_STATUS:
        problems.append(f"survivor exit status {observed['survivor_status']}, expected "
                        f"{distribute.PEER_LOST_EXIT_STATUS}")
    if observed["seconds_to_exit"] >= TIMEOUT:
        problems.append(f"survivor took {observed['seconds_to_exit']} s to exit (bound: "
                        f"--collective_timeout_seconds={TIMEOUT})")
    if observed["traceback"] or len(lines) != 1 or not lines[0].startswith("pretrain: error: "):
        problems.append(f"expected one 'pretrain: error:' line and no traceback, got {lines}")
    else:
        step = observed["resume_step"]     # 0: killed before the first checkpoint
        where = f"resume from step {step} (" if step else "start again from step 0 (no "
        if f"worker {victim} (127.0.0.1:" not in lines[0] or where not in lines[0]:
            problems.append(f"the line does not name worker {victim} and step {step}: "
                            f"{lines[0]}")
    problems += rerun_problems(observed, observed["resume_step"], straight)
    return problems


def rerun_problems(observed, resume_step, straight):
    rerun = observed["rerun"]
    if rerun is None:
        return [f"rerun exit statuses {observed['rerun_statuses']}"]
    problems = []
    for s in rerun:
        if (s["start_step"], s["final_step"]) != (resume_step, STEPS):
            problems.append(f"task {s['task_id']} ran {s['start_step']} -> {s['final_step']}, "
                            f"expected {resume_step} -> {STEPS}")
    if not same_weights(rerun[0]["weights_fingerprint"], rerun[1]["weights_fingerprint"]):
        problems.append("the two workers end with different weights")
    if not same_weights(rerun[0]["weights_fingerprint"], straight[0]["weights_fingerprint"]):
        problems.append("the rerun's weights differ from the uninterrupted run's")
    return problems


def sigterm_round(records, work, *, victim=1, at_step=3):
    """SIGTERM ``victim`` once it logged ``at_step``; both must save one step; rerun."""
    config = job_config(work, records)
    job = Job(config, "stopped")
    observed = {"victim": victim, "at_step": at_step,
                "reached": job.wait_for_step(victim, at_step)}
    job.procs[victim].send_signal(signal.SIGTERM)
    observed["statuses"] = job.wait()
    observed["stopped"] = job.summaries() if observed["statuses"] == [0, 0] else None
    observed["saved_lines"] = [[line for line in job.stderr(i).splitlines()
                                if "and stopping" in line] for i in range(2)]
    observed["stdout"] = [job.stdout(i).strip() for i in range(2)]
    observed["checkpoints"] = checkpoints.available_steps(config.model_dir)
    rerun = Job(config, "rerun")
    observed["rerun_statuses"] = rerun.wait()
    observed["rerun"] = rerun.summaries() if observed["rerun_statuses"] == [0, 0] else None
    return observed


def sigterm_problems(observed, straight):
    """What went wrong in a :func:`sigterm_round` (empty: all properties hold)."""
    if not observed["reached"]:
        return [f"worker {observed['victim']} never logged step {observed['at_step']}"]
    if observed["stopped"] is None:
        return [f"exit statuses {observed['statuses']}, expected [0, 0]"]
    problems = []
    steps = [s["final_step"] for s in observed["stopped"]]
    if steps[0] != steps[1] or not all(s["stopped_by_signal"] for s in observed["stopped"]):
        problems.append(f"the workers stopped at steps {steps} (by signal: "
                        f"{[s['stopped_by_signal'] for s in observed['stopped']]})")
    step = steps[0]
    if not observed["checkpoints"] or observed["checkpoints"][-1] != step:
        problems.append(f"checkpoints {observed['checkpoints']}, the last must be {step}")
    for i, lines in enumerate(observed["saved_lines"]):
        if len(lines) != 1 or f"saving step {step} and stopping" not in lines[0]:
            problems.append(f"worker {i} did not log saving step {step}: {lines}")
    for i, out in enumerate(observed["stdout"]):
        if f"pretrain: stopped: step {step}/{STEPS}" not in out:
            problems.append(f"worker {i} printed {out!r}")
    if not 0 < step < STEPS:
        problems.append(f"stopped at step {step}, not mid-run")
    return problems + rerun_problems(observed, step, straight)


@pytest.fixture(scope="module")
def records(tmp_path_factory):
    return make_records(tmp_path_factory.mktemp("records"))


@pytest.fixture(scope="module")
def straight(records, tmp_path_factory):
    statuses, summaries = run_straight(records, tmp_path_factory.mktemp("straight"))
    assert statuses == [0, 0], statuses
    return summaries


@pytest.mark.slow
def test_sigkill_of_a_worker_stops_the_other_with_one_line_and_status_3(records, straight,
                                                                        tmp_path):
    observed = sigkill_round(records, tmp_path, victim=1, at_step=5)
    assert not sigkill_problems(observed, straight), observed
    assert same_weights(straight[0]["weights_fingerprint"], straight[1]["weights_fingerprint"])
    assert observed["resume_step"] in (3, 6)      # a checkpoint every 3 steps, killed after 5


@pytest.mark.slow
def test_sigterm_on_one_worker_saves_one_common_step_and_resumes_exactly(records, straight,
                                                                         tmp_path):
    observed = sigterm_round(records, tmp_path, victim=1, at_step=4)
    assert not sigterm_problems(observed, straight), observed
    # Stopped at 4 or 5, between the periodic checkpoints (3, 6): the stop saved it.
    assert observed["stopped"][0]["final_step"] in (4, 5), observed["stopped"][0]


HUNG_WORKER = textwrap.dedent("""
    import json, os, sys, time
    import tensorflow as tf
    from harl_tf import distribute
    strategy = distribute.make_strategy("multi_worker", collective_timeout=float(sys.argv[1]))
    task = json.loads(os.environ["TF_CONFIG"])["task"]["index"]
    agree = distribute.stop_agreement(strategy)
    print("AGREED", agree(task == 1), flush=True)      # only worker 1 asks to stop
    if task == 1:
        time.sleep(float(sys.argv[2]))                 # alive, but never joins again
    started = time.time()
    try:
        agree(False)
    except distribute.peer_fault_types() as e:
        line = distribute.lost_peer_message(
            e, strategy.cluster_resolver.cluster_spec().as_dict(),
            distribute.task_info(strategy), resume_step=0, checkpoint_dir="ckpt",
            collective_timeout=float(sys.argv[1]))
        print("FAILED", round(time.time() - started, 1), line, flush=True)
""")


@pytest.mark.slow
def test_a_hung_peer_fails_the_collective_after_the_timeout_and_stops_agree(tmp_path):
    timeout, hang = 5.0, 60.0
    cluster = {"worker": [f"127.0.0.1:{p}" for p in _free_ports(2)]}
    procs = [subprocess.Popen(
        [sys.executable, "-c", HUNG_WORKER, str(timeout), str(hang)], cwd=REPO,
        env=_env(TF_CONFIG=json.dumps({"cluster": cluster,
                                       "task": {"type": "worker", "index": i}})),
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) for i in range(2)]
    out0 = procs[0].communicate(timeout=600)[0]
    procs[1].kill()
    procs[1].communicate()
    assert "AGREED True" in out0, out0[-2000:]       # worker 1's stop reached worker 0
    failed = [line for line in out0.splitlines() if line.startswith("FAILED")]
    assert len(failed) == 1, out0[-2000:]
    seconds = float(failed[0].split()[1])
    # The collective gives up after the timeout, well before the hung peer would wake up.
    assert timeout - 0.5 <= seconds < timeout + 15, failed[0]
    assert "did not join a collective within --collective_timeout_seconds=5" in failed[0]


# Fast: the line made from the errors TensorFlow 2.21 raised in these runs.

_RESET = ("Graph execution error:\n\nDetected at node CollectiveReduceV2 defined at (most "
          "recent call last):\nCollective ops is aborted by: recvmsg:Connection reset by "
          "peer\nAdditional GRPC error information from remote target /job:worker/replica:0/"
          "task:1 while calling /tensorflow.WorkerService/RecvBuf:\n:UNKNOWN:Error received "
          "from peer  {grpc_status:14}\nThe error could be from a previous operation. "
          "Restart your program to reset.")
_HEARTBEAT = ("Graph execution error:\n\nCollective ops is aborted by: Error reported from "
              "/job:worker/task:1: The following tasks are unhealthy (stopped sending "
              "heartbeats):\n/job:worker/replica:0/task:0\nThe tasks have crashed.")


def test_the_lost_peer_line_names_the_task_its_address_and_the_resume_step():
    cluster = {"worker": ["127.0.0.1:5000", "127.0.0.1:5001"]}

    def line(error, this_task, step):
        return distribute.lost_peer_message(error, cluster, this_task, resume_step=step,
                                            checkpoint_dir="/m/checkpoints",
                                            collective_timeout=300)
    reset = line(tf.errors.UnavailableError(None, None, _RESET), ("worker", 0), 6)
    assert reset == ("lost worker 1 (127.0.0.1:5001) of the multi-worker job (recvmsg:"
                     "Connection reset by peer); rerun every worker with the same flags to "
                     "resume from step 6 (/m/checkpoints).")
    frozen = line(tf.errors.UnavailableError(None, None, _HEARTBEAT), ("worker", 1), 0)
    assert frozen.startswith("lost worker 0 (127.0.0.1:5000) of the multi-worker job (The "
                             "following tasks are unhealthy (stopped sending heartbeats))")
    assert frozen.endswith("start again from step 0 (no checkpoint in /m/checkpoints yet).")
    hung = line(tf.errors.DeadlineExceededError(
        None, None, "Collective has timed out during execution."), ("worker", 0), 4)
    assert hung.startswith("a peer worker did not join a collective within "
                           "--collective_timeout_seconds=300 ")
    # Nothing names another task: the line says so rather than guessing.
    unknown = line(tf.errors.AbortedError(None, None, "aborted"), ("worker", 0), 4)
    assert unknown.startswith("lost a peer worker of the multi-worker job (AbortedError)")
    for text in (reset, frozen, hung, unknown):
        assert "\n" not in text
