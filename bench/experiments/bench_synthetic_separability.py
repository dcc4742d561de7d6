r"""How much class information the embedded synthetic set gives a randomly initialised encoder.

    python -m bench.experiments.bench_synthetic_separability

For each variant of ``harl_tf.data.synthetic`` — the default set (random object colours),
the same images with every object painted white (``object_fill``: shape on clutter, no
colour), and the easy ``object_colour="class"`` variant — the pooled features of a
randomly initialised ResNet-18 (the quickstart's encoder, inference mode) are fitted by a
logistic regression (standardised features, C = 0.1) on the first ``--num_train`` images
and scored on the next ``--num_test``. All variants share shapes, poses, backgrounds and
labels. Chance is 1/8. Writes ``bench/results/bench_synthetic_separability.json``.
"""
from __future__ import annotations

import time

import numpy as np
from absl import app, flags

from bench import common

FLAGS = flags.FLAGS
flags.DEFINE_integer("image_size", 32, "Image side, px.")
flags.DEFINE_integer("depth", 18, "ResNet depth.")
flags.DEFINE_integer("output_stride", 16, "Encoder output stride.")
flags.DEFINE_integer("num_train", 800, "Images fitting the logistic regression.")
flags.DEFINE_integer("num_test", 400, "Images scoring it.")
flags.DEFINE_integer("seed", 0, "Seed of the weights and of the synthetic set.")


def variants(n: int, size: int, seed: int):
    """{name: (images uint8 [n, size, size, 3], labels)}, same shapes and poses."""
    from harl_tf.data import synthetic
    default = synthetic.generate(n, size, seed=seed)
    white = np.stack([synthetic.render(i, size, seed, object_fill=(1.0, 1.0, 1.0))[0]
                      for i in range(n)])
    easy = synthetic.generate(n, size, seed=seed, object_colour="class")
    return {"default (random colours)": (default.images, default.labels),
            "white objects (shape only)": (white, default.labels),
            "object_colour=class": (easy.images, easy.labels)}


def score(features: np.ndarray, labels: np.ndarray, num_train: int) -> float:
    from sklearn.linear_model import LogisticRegression
    from sklearn.preprocessing import StandardScaler
    scaler = StandardScaler().fit(features[:num_train])
    classifier = LogisticRegression(max_iter=2000, C=0.1).fit(
        scaler.transform(features[:num_train]), labels[:num_train])
    return float(classifier.score(scaler.transform(features[num_train:]),
                                  labels[num_train:]))


def main(argv):
    del argv
    machine = common.machine_info()
    print(common.describe_machine(machine), flush=True)
    import keras
    import tensorflow as tf
    from harl_tf.models import pooling
    from harl_tf.models.resnet import ResNet
    keras.utils.set_random_seed(FLAGS.seed)
    encoder = ResNet(depth=FLAGS.depth, output_stride=FLAGS.output_stride, name="encoder")

    def features(images):
        out = []
        for start in range(0, len(images), 200):
            batch = tf.constant(images[start:start + 200], tf.float32) / 255.0
            out.append(pooling.global_pool(encoder(batch, training=False)).numpy())
        return np.concatenate(out)

    started = time.time()
    n = FLAGS.num_train + FLAGS.num_test
    rows, results = [], {}
    for name, (images, labels) in variants(n, FLAGS.image_size, FLAGS.seed).items():
        top1 = score(features(images), labels, FLAGS.num_train)
        results[name] = top1
        rows.append((name, top1))
    print(common.table(rows, ["variant", "logistic-regression top-1 (chance 0.125)"]))
    common.write_result("bench_synthetic_separability", {
        "machine": machine, "seconds": time.time() - started,
        "config": {k: getattr(FLAGS, k) for k in ("image_size", "depth", "output_stride",
                                                   "num_train", "num_test", "seed")},
        "encoder": "randomly initialised ResNet (inference mode), global average pool",
        "top1": results, "chance": 1 / 8})


if __name__ == "__main__":
    app.run(main)
