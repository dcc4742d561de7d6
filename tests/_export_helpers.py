"""Shared by the export / downstream tests: a tiny pretraining model_dir and TFRecords."""
import os

import numpy as np
import tensorflow as tf

from harl_tf import checkpoints
from harl_tf.data import schema, synthetic
from harl_tf.models import resnet

# ResNet-18, small stem, width 0.25 (C = 128), pretrained at output stride 16.
TINY_CONFIG = {"depth": 18, "width_multiplier": 0.25, "small_stem": True,
               "output_stride": 16, "name": "online_encoder"}


def randomize(encoder, seed):
    """Non-trivial weights AND BatchNorm statistics, so inference-mode outputs depend on
    every variable (zero-init residual gammas would hide half of the network)."""
    rng = np.random.default_rng(seed)
    for v in encoder.variables:
        shape = tuple(v.shape)
        if v.path.endswith("moving_variance"):
            v.assign(rng.uniform(0.5, 2.0, shape).astype(np.float32))
        elif v.path.endswith("gamma"):  # < 1 keeps activations O(1) through the residuals
            v.assign(rng.uniform(0.2, 0.6, shape).astype(np.float32))
        elif v.path.endswith(("beta", "moving_mean")):
            v.assign(rng.normal(0.0, 0.1, shape).astype(np.float32))
        else:
            fan_in = np.prod(shape[:-1])
            v.assign(rng.normal(0.0, np.sqrt(2.0 / fan_in), shape).astype(np.float32))


def make_model_dir(model_dir, steps=(7, 12)):
    """A pretraining model_dir in harl_tf.checkpoints' layout with one checkpoint per step
    (different weights each); returns {step: {variable path: array}}."""
    encoder = resnet.build_encoder(TINY_CONFIG)
    checkpoints.write_model_config(str(model_dir), encoder.config, {}, 32)
    step = tf.Variable(0, dtype=tf.int64)
    manager = tf.train.CheckpointManager(
        tf.train.Checkpoint(online_encoder=encoder, step=step),
        checkpoints.checkpoint_dir(str(model_dir)), max_to_keep=5,
        checkpoint_name=checkpoints.CHECKPOINT_NAME)
    weights = {}
    for s in steps:
        randomize(encoder, seed=s)
        step.assign(s)
        manager.save(checkpoint_number=s)
        weights[s] = {v.path.split("/", 1)[1]: v.numpy() for v in encoder.variables}
    return weights


def write_records(path, num_images, *, image_size=32, seed=0, labels=None):
    """TFRecords of the synthetic set (schema v1); ``labels`` overrides the labels."""
    data = synthetic.generate(num_images, image_size=image_size, seed=seed)
    with tf.io.TFRecordWriter(str(path)) as writer:
        for i in range(num_images):
            label = int(data.labels[i] if labels is None else labels[i])
            writer.write(schema.serialize_example(
                image_bytes=tf.io.encode_png(data.images[i]).numpy(), image_format="png",
                height=image_size, width=image_size,
                mask_png=schema.encode_mask_png(data.masks[i]), label=label,
                example_id=f"{os.path.basename(str(path))}/{i:05d}",
                mask_method="ground_truth"))
    return data
