"""What a run sets up before its first step, once: synthetic records when none exist yet,
and the data seed every worker shares (``model_dir/data_seed.json``)."""
from __future__ import annotations

import logging
import os
import time

from harl_tf.config import ConfigError, PretrainConfig, matching_files

log = logging.getLogger("harl_tf.training")

DATA_SEED_FILE = "data_seed.json"
DATA_SEED_WAIT_SECONDS = 300


def ensure_synthetic_records(c: PretrainConfig) -> None:
    """If ``--synthetic_records`` > 0 and nothing matches ``--train_files``, build them there.

    The pattern's directory receives ``train-*-of-*.tfrecord`` shards of the embedded
    synthetic set (exact masks, labels) at ``max(64, image_size)`` px.
    """
    if c.synthetic_records <= 0 or matching_files(c.train_files):
        return
    from harl_tf.data.builder import build_dataset
    from harl_tf.data.sources import SyntheticSource
    output_dir = os.path.dirname(c.train_files.split(",")[0]) or "."
    log.info("building %d synthetic examples in %s", c.synthetic_records, output_dir)
    build_dataset(SyntheticSource(c.synthetic_records, image_size=max(64, c.image_size),
                                  seed=0), output_dir, splits=["train"],
                  min_shards=2, progress=False)
    if not matching_files(c.train_files):
        raise ConfigError(f"--train_files={c.train_files!r} matches none of the synthetic "
                          f"records written to {output_dir} (use a pattern like "
                          f"{os.path.join(output_dir, 'train-*.tfrecord')}).")


def data_seed(c: PretrainConfig, chief: bool) -> int:
    """The seed of the data stream: ``--seed`` when set; otherwise one drawn by the chief on
    the first start and kept in ``model_dir/data_seed.json``, so a resumed run continues the
    same epochs (each example once per epoch across preemptions). Other workers read the
    chief's file (waiting for it on a first start)."""
    if c.seed is not None:
        return int(c.seed)
    from harl_tf import checkpoints
    from harl_tf.atomic import write_json_atomic
    path = os.path.join(c.model_dir, DATA_SEED_FILE)
    if chief and not os.path.exists(path):
        import random
        write_json_atomic(path, {"data_seed": random.SystemRandom().randrange(2**31)})
    deadline = time.time() + DATA_SEED_WAIT_SECONDS
    while not os.path.exists(path):
        if time.time() > deadline:
            raise ConfigError(f"--seed is unset and the chief has not written {path} within "
                              f"{DATA_SEED_WAIT_SECONDS} s; is --model_dir shared by all "
                              f"workers? Set --seed to the same value on every worker instead.")
        time.sleep(0.5)
    try:
        return int(checkpoints.read_json(path, "the data seed")["data_seed"])
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise ConfigError(f"{path} is unreadable ({e}); delete it (the data order starts "
                          f"afresh) or set --seed") from None
