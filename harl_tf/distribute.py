"""THE strategy factory, and the small facts about a strategy the rest of the code needs.

    make_strategy("default")        # tf.distribute default strategy (whatever device TF picks)
    make_strategy("one_device")     # OneDeviceStrategy on the first GPU, else the CPU
    make_strategy("mirrored")       # all local GPUs; without GPUs, all logical CPUs
    make_strategy("multi_worker")   # MultiWorkerMirroredStrategy from the TF_CONFIG env var
    make_strategy("tpu", tpu_address="grpc://...")

Keras 3 ``fit`` does not run under MultiWorkerMirroredStrategy (keras-team/keras#20585);
``training.py`` uses its custom ``strategy.run`` loop there (:func:`uses_custom_loop`).

TensorFlow is imported inside the functions that need it: :data:`STRATEGIES` (the
``--strategy`` choices) is read by the flags and the config before any heavy import.
"""
from __future__ import annotations

import json
import os
from typing import Optional, Sequence

STRATEGIES = ("default", "one_device", "mirrored", "multi_worker", "tpu")


def make_strategy(name: str, *, devices: Optional[Sequence[str]] = None,
                  tpu_address: str = "",
                  communication: str = "auto") -> tf.distribute.Strategy:
    """Build a tf.distribute strategy by name.

    Args:
      name: one of STRATEGIES (the ``--strategy`` flag).
      devices: for "mirrored", explicit device names (default: all GPUs, else all logical
        CPUs); for "one_device", the device (default: first GPU, else "/cpu:0").
      tpu_address: for "tpu", the TPU name or grpc address ("" = local / from environment).
      communication: for "multi_worker", collective implementation "auto", "ring" or "nccl".
    Returns:
      the strategy.
    Raises:
      ValueError: unknown name, or "multi_worker" without a usable TF_CONFIG.
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
            raise ValueError(f"--communication must be one of {sorted(implementations)}, "
                             f"got {communication!r}.")
        options = tf.distribute.experimental.CommunicationOptions(
            implementation=implementations[communication])
        return tf.distribute.MultiWorkerMirroredStrategy(communication_options=options)
    if name == "tpu":
        resolver = tf.distribute.cluster_resolver.TPUClusterResolver(tpu=tpu_address)
        tf.config.experimental_connect_to_cluster(resolver)
        tf.tpu.experimental.initialize_tpu_system(resolver)
        return tf.distribute.TPUStrategy(resolver)
    raise ValueError(f"--strategy must be one of {', '.join(STRATEGIES)}; got {name!r}.")


def describe_tf_config() -> dict:
    """Parse and check the TF_CONFIG environment variable of a multi-worker job.

    Returns the parsed dict. Raises ValueError naming TF_CONFIG when it is missing, not JSON,
    or lacks ``cluster`` / ``task``.
    """
    raw = os.environ.get("TF_CONFIG", "")
    if not raw:
        raise ValueError("--strategy=multi_worker needs the TF_CONFIG environment variable "
                         "(cluster and task); it is not set.")
    try:
        config = json.loads(raw)
    except json.JSONDecodeError as e:
        raise ValueError(f"TF_CONFIG is not valid JSON ({e}): {raw[:200]!r}") from None
    if "cluster" not in config or "task" not in config:
        raise ValueError(f"TF_CONFIG must have 'cluster' and 'task' entries; found keys "
                         f"{sorted(config)}.")
    return config


def num_replicas(strategy: tf.distribute.Strategy) -> int:
    """Number of replicas in sync (all workers together)."""
    return int(strategy.num_replicas_in_sync)


def check_global_batch(global_batch_size: int, strategy_or_replicas,
                       flag: str = "batch_size") -> int:
    """Check that the global batch splits evenly over the replicas; return the per-replica size.

    Raises ValueError naming the flag, e.g.
    "--batch_size=10 must be divisible by the 4 replicas of the strategy".
    """
    replicas = (strategy_or_replicas if isinstance(strategy_or_replicas, int)
                else num_replicas(strategy_or_replicas))
    if global_batch_size <= 0:
        raise ValueError(f"--{flag} must be positive, got {global_batch_size}.")
    if global_batch_size % replicas:
        raise ValueError(f"--{flag}={global_batch_size} must be divisible by the {replicas} "
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
