"""THE strategy factory, and the small facts about a strategy the rest of the code needs.

    make_strategy("default")        # tf.distribute default strategy (whatever device TF picks)
    make_strategy("one_device")     # OneDeviceStrategy on the first GPU, else the CPU
    make_strategy("mirrored")       # all local GPUs; without GPUs, all logical CPUs
    make_strategy("multi_worker")   # MultiWorkerMirroredStrategy from the TF_CONFIG env var
    make_strategy("tpu", tpu_address="grpc://...")

Keras 3 ``fit`` does not run under MultiWorkerMirroredStrategy (keras-team/keras#20585);
``training.py`` uses its custom ``strategy.run`` loop there (:func:`uses_custom_loop`).

Faults of a multi-worker run (tests/test_multiworker_faults.py):
- A lost peer (killed, crashed, unreachable, or hung past ``collective_timeout``) fails the
  collective a survivor is in: a dead process at once (its connection resets), a frozen
  one when it misses the coordination service's heartbeats (about 10 s), a live but stuck
  one after ``collective_timeout`` seconds (``CommunicationOptions(timeout_seconds=...)``
  on every all-reduce of the strategy; the initial broadcast of variables has none).
  :func:`peer_fault_types` are those errors; :func:`lost_peer_message` turns one into a
  line naming the task and the step a rerun resumes from (:class:`PeerLostError`; the
  binary exits with :data:`PEER_LOST_EXIT_STATUS`).
- Preemption (SIGTERM on any worker): :func:`stop_agreement` all-reduces each worker's
  "signal received" flag after every step, so all workers save the same step and stop.
  ``tf.distribute.experimental.PreemptionCheckpointHandler`` does the same through the
  coordination service, but does not fit here (TF 2.21, failure_handling.py): its
  behaviour depends on a platform probe (an HTTP request to the GCE metadata server at
  start; on a GCE CPU VM it does nothing, on a GCE GPU VM it watches maintenance events
  instead of SIGTERM), it restores checkpoints itself and adds its own run counter to
  them beside our step, and the preempted worker waits for every peer's acknowledgement
  without a timeout. One scalar all-reduce per step costs milliseconds against a step.

TensorFlow is imported inside the functions that need it: :data:`STRATEGIES` (the
``--strategy`` choices) is read by the flags and the config before any heavy import.
"""
from __future__ import annotations

import json
import os
import re
from typing import Optional, Sequence

from harl_tf.errors import ConfigError

STRATEGIES = ("default", "one_device", "mirrored", "multi_worker", "tpu")

# Exit status of the pretraining binary when a peer worker is lost (2 is a usage error):
# a scheduler restarts the whole job on it; the rerun resumes from the last checkpoint.
PEER_LOST_EXIT_STATUS = 3


class PeerLostError(RuntimeError):
    """A multi-worker run cannot go on: a peer worker is gone, unreachable or hung. The
    message is one line naming the peer (when known) and the step a rerun resumes from."""


def make_strategy(name: str, *, devices: Optional[Sequence[str]] = None,
                  tpu_address: str = "",
                  communication: str = "auto",
                  collective_timeout: float = 0.0) -> tf.distribute.Strategy:
    """Build a tf.distribute strategy by name.

    Args:
      name: one of STRATEGIES (the ``--strategy`` flag).
      devices: for "mirrored", explicit device names (default: all GPUs, else all logical
        CPUs); for "one_device", the device (default: first GPU, else "/cpu:0").
      tpu_address: for "tpu", the TPU name or grpc address ("" = local / from environment).
      communication: for "multi_worker", collective implementation "auto", "ring" or "nccl".
      collective_timeout: for "multi_worker", seconds an all-reduce waits for the other
        workers before it fails with DeadlineExceededError (0: no limit).
    Returns:
      the strategy.
    Raises:
      ConfigError: unknown name, or "multi_worker" without a usable TF_CONFIG.
    """
    import tensorflow as tf
    if name == "default":
        return tf.distribute.get_strategy()
    if name == "one_device":
        if devices:
            device = devices[0]
        else:
            gpus = tf.config.list_logical_devices("GPU")
            device = gpus[0].name if gpus else "/cpu:0"
        return tf.distribute.OneDeviceStrategy(device)
    if name == "mirrored":
        if not devices:
            gpus = tf.config.list_logical_devices("GPU")
            devices = [d.name for d in (gpus or tf.config.list_logical_devices("CPU"))]
        if all("CPU" in d.upper() for d in devices):
            # CPU replicas reduce through one device: no collective ops, whose instance
            # keys clash between MirroredStrategy objects created in one process.
            return tf.distribute.MirroredStrategy(
                list(devices), cross_device_ops=tf.distribute.ReductionToOneDevice())
        return tf.distribute.MirroredStrategy(list(devices))
    if name == "multi_worker":
        describe_tf_config()  # validates TF_CONFIG, with a readable error
        implementations = {
            "auto": tf.distribute.experimental.CommunicationImplementation.AUTO,
            "ring": tf.distribute.experimental.CommunicationImplementation.RING,
            "nccl": tf.distribute.experimental.CommunicationImplementation.NCCL,
        }
        if communication not in implementations:
            raise ConfigError(f"--communication must be one of {sorted(implementations)}, "
                              f"got {communication!r}.")
        options = tf.distribute.experimental.CommunicationOptions(
            implementation=implementations[communication],
            timeout_seconds=float(collective_timeout) or None)
        return tf.distribute.MultiWorkerMirroredStrategy(communication_options=options)
    if name == "tpu":
        resolver = tf.distribute.cluster_resolver.TPUClusterResolver(tpu=tpu_address)
        tf.config.experimental_connect_to_cluster(resolver)
        tf.tpu.experimental.initialize_tpu_system(resolver)
        return tf.distribute.TPUStrategy(resolver)
    raise ConfigError(f"--strategy must be one of {', '.join(STRATEGIES)}; got {name!r}.")


def describe_tf_config() -> dict:
    """Parse and check the TF_CONFIG environment variable of a multi-worker job.

    Returns the parsed dict. Raises ConfigError naming TF_CONFIG when it is missing, not JSON,
    or lacks ``cluster`` / ``task``.
    """
    raw = os.environ.get("TF_CONFIG", "")
    if not raw:
        raise ConfigError("--strategy=multi_worker needs the TF_CONFIG environment variable "
                          "(cluster and task); it is not set.")
    try:
        config = json.loads(raw)
    except json.JSONDecodeError as e:
        raise ConfigError(f"TF_CONFIG is not valid JSON ({e}): {raw[:200]!r}") from None
    if "cluster" not in config or "task" not in config:
        raise ConfigError(f"TF_CONFIG must have 'cluster' and 'task' entries; found keys "
                          f"{sorted(config)}.")
    return config


def num_replicas(strategy: tf.distribute.Strategy) -> int:
    """Number of replicas in sync (all workers together)."""
    return int(strategy.num_replicas_in_sync)


def check_global_batch(global_batch_size: int, strategy_or_replicas,
                       flag: str = "batch_size") -> int:
    """Check that the global batch splits evenly over the replicas; return the per-replica size.

    Raises ConfigError naming the flag, e.g.
    "--batch_size=10 must be divisible by the 4 replicas of the strategy".
    """
    replicas = (strategy_or_replicas if isinstance(strategy_or_replicas, int)
                else num_replicas(strategy_or_replicas))
    if global_batch_size <= 0:
        raise ConfigError(f"--{flag} must be positive, got {global_batch_size}.")
    if global_batch_size % replicas:
        raise ConfigError(f"--{flag}={global_batch_size} must be divisible by the {replicas} "
                          f"replicas of the strategy (try "
                          f"{max(replicas, global_batch_size // replicas * replicas)}).")
    return global_batch_size // replicas


def is_multi_worker(strategy: tf.distribute.Strategy) -> bool:
    """True for a MultiWorkerMirroredStrategy (collective ops across processes)."""
    import tensorflow as tf
    return isinstance(strategy, tf.distribute.MultiWorkerMirroredStrategy)


def uses_custom_loop(strategy: tf.distribute.Strategy) -> bool:
    """True when training must use the ``strategy.run`` loop instead of Keras ``fit``."""
    return is_multi_worker(strategy)


def task_info(strategy: tf.distribute.Strategy):
    """(task_type, task_id) of this process; ("chief", 0) outside multi-worker training."""
    if not is_multi_worker(strategy):
        return "chief", 0
    resolver = strategy.cluster_resolver
    return resolver.task_type or "worker", int(resolver.task_id or 0)


def is_chief(strategy: tf.distribute.Strategy) -> bool:
    """True for the process that owns checkpoints and summaries.

    The chief is the "chief" task when the cluster has one, else worker 0.
    """
    if not is_multi_worker(strategy):
        return True
    task_type, task_id = task_info(strategy)
    has_chief = "chief" in strategy.cluster_resolver.cluster_spec().as_dict()
    return task_type == "chief" or (not has_chief and task_type == "worker" and task_id == 0)


# Faults of a multi-worker run -----------------------------------------------------------------

def peer_fault_types() -> tuple:
    """The TensorFlow errors a lost or hung peer raises in a survivor's collectives: a reset
    connection or missed heartbeats (Unavailable), the collective timeout (DeadlineExceeded),
    an aborted collective (Aborted)."""
    import tensorflow as tf
    return (tf.errors.UnavailableError, tf.errors.DeadlineExceededError,
            tf.errors.AbortedError)


_TASK = re.compile(r"/job:(\w+)/replica:\d+/task:(\d+)")
_REASON = re.compile(r"aborted by: (?:Error reported from \S+: )?(.+)")


def lost_peer_message(error: Exception, cluster: dict, this_task, *, resume_step: int,
                      checkpoint_dir: str, collective_timeout: float) -> str:
    """One line for a peer fault: which task was lost, why, and where a rerun resumes.

    Args:
      error: the TensorFlow error (one of :func:`peer_fault_types`).
      cluster: the cluster spec as a dict, ``{"worker": ["host:port", ...], ...}``.
      this_task: (task_type, task_id) of this process (never named as the lost one).
      resume_step: the latest complete checkpoint's step (0: none yet).
      checkpoint_dir: where that checkpoint is.
      collective_timeout: the run's ``--collective_timeout_seconds``.
    """
    import tensorflow as tf
    text = str(getattr(error, "message", "") or error)
    peers = []
    for job, task in _TASK.findall(text):
        key = (job, int(task))
        if key != tuple(this_task) and key not in peers:
            peers.append(key)
    names = []
    for job, task in peers:
        addresses = cluster.get(job, [])
        address = (addresses.get(task) if isinstance(addresses, dict)
                   else addresses[task] if task < len(addresses) else None)
        names.append(f"{job} {task}" + (f" ({address})" if address else ""))
    if isinstance(error, tf.errors.DeadlineExceededError):
        what = (f"a peer worker did not join a collective within --collective_timeout_seconds="
                f"{collective_timeout:g} (hung, or slower than that: raise the flag)")
    else:
        reason = _REASON.search(text)
        why = reason.group(1).strip().rstrip(":") if reason else type(error).__name__
        what = (f"lost {' and '.join(names) if names else 'a peer worker'} of the "
                f"multi-worker job ({why})")
    if resume_step:
        where = f"to resume from step {resume_step} ({checkpoint_dir})"
    else:
        where = f"to start again from step 0 (no checkpoint in {checkpoint_dir} yet)"
    return f"{what}; rerun every worker with the same flags {where}."


def stop_agreement(strategy: tf.distribute.Strategy):
    """``agree(requested: bool) -> bool``: True on every worker when any worker passes True.

    One all-reduce of a 0/1 flag per call (a sum over replicas; > 0 means some worker asked).
    Every worker calls it at the same point of the loop, after each step, so that all of
    them save the same step and stop together.
    """
    import tensorflow as tf

    @tf.function
    def total(flag):
        per_replica = strategy.run(lambda: tf.identity(flag))
        return strategy.reduce(tf.distribute.ReduceOp.SUM, per_replica, axis=None)

    def agree(requested: bool) -> bool:
        return bool(total(tf.constant(1.0 if requested else 0.0)) > 0)
    return agree
