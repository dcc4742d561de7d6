r"""Training step time: HARL vs BYOL vs a supervised ResNet-50, float32 vs bfloat16, 1 vs 2
replicas — all in one process, on the same encoder, batch and image size.

    python -m bench.bench_training_speed                       # ResNet-50, 112 px, batch 16
    python -m bench.bench_training_speed --depth=18 --image_size=64 --batch_size=64 \
        --head_hidden_dim=1024 --projection_dim=256 --output_stride=16 \
        --results_name=bench_training_speed_small              # the bench_learning config

Configurations (each a compiled step on one fixed in-memory batch — the input pipeline is
not timed; ``bench.bench_input_pipeline`` covers it):

- ``harl``: ``HARLModel`` with ``--loss_mode=hybrid``, built as ``harl_tf.pretrain`` builds it
  (``training.build_model``: LARS, EMA, symmetrised loss), float32, default strategy;
- ``byol``: the same with ``--loss_mode=byol`` (the model skips the fg/bg head passes in
  this mode);
- ``byol_global_only``: a bench-only subclass whose heads run on the global feature only
  (fg/bg predictions are aliases of the global one): the cost of a plain BYOL step, a check
  that ``byol`` costs no more (earlier versions of ``harl.py`` ran the fg/bg passes with
  weight 0 in BYOL mode);
- ``supervised``: ``keras.applications.ResNet50(weights=None)`` (1000 classes), SGD with
  momentum, softmax cross-entropy: the reference of the "8/3" rule (HARL per image pair =
  2 views × (forward + backward ≈ 3 forwards) + 2 target forwards = 8 forward passes;
  supervised per image = 3);
- ``harl_bf16``, ``byol_bf16``: the same under the ``mixed_bfloat16`` policy;
- ``harl_mirrored2``: ``MirroredStrategy`` over two logical CPU devices made with
  ``tf.config.set_logical_device_configuration`` before TensorFlow initialises; same global
  batch. Both logical devices share the same two cores, so this measures the cost of
  replication (per-replica batch halved, all-reduce, merge_call for the EMA), not a speed-up.

Timing: after a warm-up (tracing + 2 steps) per configuration, ``--rounds`` rounds; in each
round every configuration runs ``--steps_per_round`` steps, the order rotating from round to
round (ABAB interleaving), each step timed to the host (a metric fetched). The machine is
shared, so the figures are medians, and ratios are taken per round (paired) then the median.
Writes ``bench/results/bench_training_speed.json``.
"""
from __future__ import annotations

import time

import numpy as np
from absl import app, flags

from bench import common

FLAGS = flags.FLAGS
flags.DEFINE_integer("depth", 50, "ResNet depth of the HARL/BYOL encoder.")
flags.DEFINE_float("width_multiplier", 1.0, "Channel width multiplier of the encoder.")
flags.DEFINE_integer("image_size", 112, "View side, px.")
flags.DEFINE_integer("batch_size", 16, "Global batch (image pairs for HARL/BYOL).")
flags.DEFINE_integer("output_stride", 32, "Encoder output stride.")
flags.DEFINE_integer("head_hidden_dim", 4096, "Projector / predictor hidden width.")
flags.DEFINE_integer("projection_dim", 512, "Projection size.")
flags.DEFINE_integer("rounds", 5, "Interleaved rounds.")
flags.DEFINE_integer("steps_per_round", 3, "Timed steps per configuration and round.")
flags.DEFINE_integer("warmup_steps", 2, "Untimed steps after tracing.")
flags.DEFINE_list("configs", ["harl", "byol", "byol_global_only", "supervised", "harl_bf16",
                              "byol_bf16", "harl_mirrored2"], "Configurations to time.")
flags.DEFINE_string("results_name", "bench_training_speed", "Results file stem.")


def _pretrain_config(loss_mode: str, precision: str = ""):
    from harl_tf.training import PretrainConfig
    return PretrainConfig(
        train_files="unused", model_dir="unused", num_train_examples=1281167,
        image_size=FLAGS.image_size, depth=FLAGS.depth, output_stride=FLAGS.output_stride,
        width_multiplier=FLAGS.width_multiplier,
        projector_hidden_dim=FLAGS.head_hidden_dim, projection_dim=FLAGS.projection_dim,
        predictor_hidden_dim=FLAGS.head_hidden_dim, loss_mode=loss_mode,
        batch_size=FLAGS.batch_size, epochs=100, mixed_precision=precision, num_classes=0)


def _global_only_model_class():
    """HARLModel whose heads run once per view, on the global feature (plain BYOL cost)."""
    import tensorflow as tf
    from harl_tf import losses
    from harl_tf.models.harl import HARLModel

    class GlobalOnlyModel(HARLModel):
        def target_projections(self, images, masks):
            regions = self._regions(self.target_encoder, images, masks, training=True)
            z = tf.stop_gradient(tf.cast(self.target_projector(regions.glob, training=True),
                                         tf.float32))
            return {r: z for r in losses.REGIONS}

        def online_predictions(self, images, masks, training=True):
            regions = self._regions(self.online_encoder, images, masks, training=training)
            p = tf.cast(self.predictor(self.online_projector(regions.glob, training=training),
                                       training=training), tf.float32)
            return {r: p for r in losses.REGIONS}, regions

    return GlobalOnlyModel


def _batch(seed: int = 0):
    """One fixed batch: random views, masks = a random box per example (~20-60 % area)."""
    import tensorflow as tf
    rng = np.random.default_rng(seed)
    b, s = FLAGS.batch_size, FLAGS.image_size
    masks = np.zeros((2, b, s, s, 1), np.float32)
    for v in range(2):
        for i in range(b):
            h, w = rng.integers(s // 2, int(s * 0.8), size=2)
            y, x = rng.integers(0, s - h), rng.integers(0, s - w)
            masks[v, i, y:y + h, x:x + w] = 1.0
    return {"view1": tf.constant(rng.random((b, s, s, 3), np.float32)),
            "view2": tf.constant(rng.random((b, s, s, 3), np.float32)),
            "mask1": tf.constant(masks[0]), "mask2": tf.constant(masks[1]),
            "label": tf.constant(rng.integers(0, 1000, b), tf.int64)}


def _harl_step(loss_mode: str, precision: str = "", strategy=None, model_class=None):
    """A ``() -> metric`` closure running one compiled HARL train_step."""
    import keras
    import tensorflow as tf
    from harl_tf import training
    from harl_tf.models.harl import make_distributed_step
    strategy = strategy or tf.distribute.get_strategy()
    c = _pretrain_config(loss_mode, precision)
    keras.config.set_dtype_policy(precision or "float32")
    try:
        if model_class is None:
            model = training.build_model(c, strategy)
        else:
            with strategy.scope():
                model = model_class(c.harl_config())
                model.compile(optimizer=training.build_optimizer(c), auto_scale_loss=False)
                model.build_for(c.image_size)
    finally:
        keras.config.set_dtype_policy("float32")
    step = make_distributed_step(model, strategy)
    batch = _batch()
    if strategy.num_replicas_in_sync > 1:
        dataset = tf.data.Dataset.from_tensors(batch).unbatch().batch(
            FLAGS.batch_size, drop_remainder=True).repeat()
        iterator = iter(strategy.experimental_distribute_dataset(dataset))
        return lambda: float(step(next(iterator))["loss"])
    return lambda: float(step(batch)["loss"])


def _supervised_step():
    """One compiled step of keras.applications.ResNet50 (weights=None), SGD + momentum."""
    import keras
    import tensorflow as tf
    model = keras.applications.ResNet50(weights=None, classes=1000,
                                        input_shape=(FLAGS.image_size, FLAGS.image_size, 3))
    optimizer = keras.optimizers.SGD(0.1, momentum=0.9)
    optimizer.build(model.trainable_variables)
    batch = _batch()
    images, labels = batch["view1"] * 255.0, batch["label"]

    @tf.function
    def step():
        with tf.GradientTape() as tape:
            probabilities = model(images, training=True)
            loss = tf.reduce_mean(keras.losses.sparse_categorical_crossentropy(
                labels, probabilities))
        grads = tape.gradient(loss, model.trainable_variables)
        optimizer.apply(grads, model.trainable_variables)
        return loss

    return lambda: float(step())


def build(name: str):
    import tensorflow as tf
    if name == "harl":
        return _harl_step("hybrid")
    if name == "byol":
        return _harl_step("byol")
    if name == "byol_global_only":
        return _harl_step("byol", model_class=_global_only_model_class())
    if name == "supervised":
        return _supervised_step()
    if name == "harl_bf16":
        return _harl_step("hybrid", "mixed_bfloat16")
    if name == "byol_bf16":
        return _harl_step("byol", "mixed_bfloat16")
    if name == "harl_mirrored2":
        strategy = tf.distribute.MirroredStrategy(["/cpu:0", "/cpu:1"])
        return _harl_step("hybrid", strategy=strategy)
    raise app.UsageError(f"--configs: unknown {name!r}")


def _paired(times: dict, a: str, b: str):
    """Median over rounds of (median step time of a) / (median step time of b)."""
    if a not in times or b not in times:
        return None
    ratios = [np.median(x) / np.median(y) for x, y in zip(times[a], times[b])]
    return {"median_of_round_ratios": float(np.median(ratios)),
            "ratio_of_medians": float(np.median(np.concatenate(times[a]))
                                      / np.median(np.concatenate(times[b]))),
            "round_ratios": [round(float(r), 4) for r in ratios]}


def main(argv) -> None:
    del argv
    import tensorflow as tf
    # Two logical CPU devices for the mirrored configuration; must precede TF's start.
    cpus = tf.config.list_physical_devices("CPU")
    tf.config.set_logical_device_configuration(
        cpus[0], [tf.config.LogicalDeviceConfiguration()] * 2)
    machine = common.machine_info()
    print(common.describe_machine(machine), flush=True)
    print(f"intra-op threads {tf.config.threading.get_intra_op_parallelism_threads()} "
          f"(0 = all cores), logical CPUs {len(tf.config.list_logical_devices('CPU'))}",
          flush=True)

    steps, build_seconds = {}, {}
    for name in FLAGS.configs:
        started = time.time()
        steps[name] = build(name)
        for _ in range(1 + FLAGS.warmup_steps):      # tracing, then warm-up
            steps[name]()
        build_seconds[name] = round(time.time() - started, 1)
        print(f"{name}: built, traced and warmed up in {build_seconds[name]} s", flush=True)

    names = list(steps)
    times = {n: [] for n in names}
    for r in range(FLAGS.rounds):
        order = names[r % len(names):] + names[:r % len(names)]
        for name in order:
            round_times = []
            for _ in range(FLAGS.steps_per_round):
                t0 = time.perf_counter()
                value = steps[name]()
                round_times.append(time.perf_counter() - t0)
                if not np.isfinite(value):
                    raise SystemExit(f"{name}: loss {value}")
            times[name].append(np.asarray(round_times))
        print(f"round {r + 1}/{FLAGS.rounds}: " + ", ".join(
            f"{n} {np.median(times[n][-1]):.3f}s" for n in names), flush=True)

    b = FLAGS.batch_size
    per_config = {}
    for name in names:
        all_times = np.concatenate(times[name])
        per_config[name] = {
            "median_step_seconds": float(np.median(all_times)),
            "min_step_seconds": float(np.min(all_times)),
            "max_step_seconds": float(np.max(all_times)),
            "median_ms_per_example": float(np.median(all_times) / b * 1000),
            "examples_per_second": float(b / np.median(all_times)),
            "steps_timed": int(all_times.size), "build_and_trace_seconds": build_seconds[name]}
    ratios = {
        "harl_over_byol": _paired(times, "harl", "byol"),
        "harl_over_byol_global_only": _paired(times, "harl", "byol_global_only"),
        "byol_over_byol_global_only": _paired(times, "byol", "byol_global_only"),
        "harl_pair_over_supervised_image": _paired(times, "harl", "supervised"),
        "byol_global_only_pair_over_supervised_image": _paired(times, "byol_global_only",
                                                               "supervised"),
        "harl_bf16_over_float32": _paired(times, "harl_bf16", "harl"),
        "byol_bf16_over_float32": _paired(times, "byol_bf16", "byol"),
        "harl_bf16_over_byol_bf16": _paired(times, "harl_bf16", "byol_bf16"),
        "harl_mirrored2_over_1replica": _paired(times, "harl_mirrored2", "harl"),
    }
    ratios = {k: v for k, v in ratios.items() if v is not None}
    rows = [[n, per_config[n]["median_step_seconds"], per_config[n]["median_ms_per_example"],
             per_config[n]["examples_per_second"], per_config[n]["steps_timed"]]
            for n in names]
    print(common.table(rows, ["config", "median step s", "ms / example (pair)",
                              "examples/s", "steps"]))
    print(common.table([[k, v["median_of_round_ratios"], v["ratio_of_medians"]]
                        for k, v in ratios.items()],
                       ["ratio", "median of paired round ratios", "ratio of medians"]))
    result = {
        "setup": {"encoder": f"ResNet-{FLAGS.depth}", "image_size": FLAGS.image_size,
                  "width_multiplier": FLAGS.width_multiplier,
                  "batch_size": FLAGS.batch_size, "output_stride": FLAGS.output_stride,
                  "head_hidden_dim": FLAGS.head_hidden_dim,
                  "projection_dim": FLAGS.projection_dim,
                  "supervised_reference": f"keras.applications.ResNet50(weights=None), "
                                          f"{FLAGS.image_size} px, batch {FLAGS.batch_size}",
                  "rounds": FLAGS.rounds, "steps_per_round": FLAGS.steps_per_round,
                  "ideal_harl_pair_over_supervised_image": 8 / 3,
                  "input_pipeline": "not timed (one fixed in-memory batch)"},
        "configs": per_config, "ratios": ratios,
        "step_seconds": {n: [t.round(4).tolist() for t in times[n]] for n in names},
        "machine": machine,
    }
    common.write_result(FLAGS.results_name, result)


if __name__ == "__main__":
    app.run(main)
