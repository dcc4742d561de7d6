"""HARLModel: online and target networks, the training step and the EMA update (SPEC §3–6).

Online network θ: encoder f → pooled regions (fg, bg, glob) → projector g → predictor q.
Target network ξ: encoder f_ξ → pooled regions → projector g_ξ (no predictor). ξ starts as a
copy of θ and is never trained by gradients.

One training step on a batch {view1, view2, mask1, mask2, label} (:meth:`train_step`; steps
1–3 are :meth:`HARLModel.loss_and_logs`, which returns ``(loss, logs, features)``):

1. target forward on both views (training mode, stop-gradient; the tape watches only θ, so
   it keeps none of the target's activations);
2. online forward on both views;
3. L = L(v1 → v2) + L(v2 → v1) (``losses.harl_loss``), each averaged over the GLOBAL batch:
   every replica computes Σ_local / N_global (counts all-reduced), the optimizer sums the
   replicas' gradients, so 1 replica and n replicas at the same global batch take the same
   step;
4. optimizer step on θ (the loss is scaled by a LossScaleOptimizer under mixed_float16);
5. EMA of the trainable weights, ξ ← τ_k ξ + (1 − τ_k) θ, with the freshly updated θ;
6. the online linear probe (if ``num_classes`` > 0): softmax cross-entropy of a linear
   layer on the standardised (BatchNorm without affine) stop-gradient global features of
   both views, examples with label < 0 ignored, its own optimizer (Adam), so it never
   influences θ;
7. the step counter k advances.

BatchNorm statistics (SPEC §10): moving means/variances are NOT averaged by the EMA. The
target's own forward passes run in training mode (batch statistics, as in BYOL) and update
the target's moving statistics themselves; they matter only if someone evaluates the target.

Schedules (step k of K = ``total_steps``): τ_k = 1 − (1 − τ_base)(cos(πk/K) + 1)/2;
α_k, λ_k either constant or the same cosine rise from α_base, λ_base (``losses.weight_at``).
Loss modes (``losses.LOSS_MODES``): "mask" (λ = 1; the whole-image head pass is skipped),
"hybrid" (all three regions), "byol" (λ = 0; the fg/bg head passes are skipped, so a BYOL
step costs exactly a BYOL step). A skipped region reports 0 for its loss metric.

Metrics returned by a step (global values, identical on every replica): loss, loss_fg,
loss_bg, loss_glob (each the sum of both directions), valid_fg, valid_bg (fraction of
examples whose region is valid in both views), tau, alpha, lambda, learning_rate and, with
a probe, probe_loss, probe_top1 (over labelled examples of both views; 0 when a batch has
no labels) and labelled (fraction of labelled examples). Each replica computes its
contribution to every batch metric (local sum / global count); one all-reduce of the dict
sums them.

Custom loops (multi-worker; Keras 3 ``fit`` fails under MultiWorkerMirroredStrategy,
keras-team/keras#20585) use :func:`make_distributed_step`, which runs the very same
``train_step`` through ``strategy.run``.
"""
from __future__ import annotations

import dataclasses
from typing import Callable, Optional

import keras
import tensorflow as tf

from harl_tf import losses, schedules
from harl_tf.config import HARLConfig
from harl_tf.models import pooling

__all__ = ["HARLConfig", "HARLModel", "make_distributed_step"]


def _default_encoder_factory(config: HARLConfig, name: str) -> keras.Model:
    from harl_tf.models.resnet import ResNet
    return ResNet(**dataclasses.asdict(config.encoder), sync_batchnorm=config.sync_batchnorm,
                  name=name)


def _default_head_factory(hidden_dim: int, output_dim: int, sync_batchnorm: bool,
                          name: str) -> keras.layers.Layer:
    from harl_tf.models.heads import MLPHead
    return MLPHead(hidden_dim=hidden_dim, output_dim=output_dim,
                   sync_batchnorm=sync_batchnorm, name=name)


def _replica_sum(values):
    """Σ over the replicas of a dict (any tf.nest structure) of float32 tensors."""
    return tf.distribute.get_replica_context().all_reduce(tf.distribute.ReduceOp.SUM, values)


def _strip_root(path: str) -> str:
    return path.split("/", 1)[-1]


class HARLModel(keras.Model):
    """Online + target networks with the HARL training step. Build inside ``strategy.scope()``.

    Args:
      config: HARLConfig, checked where it was made (``HARLConfig.validate``,
        ``PretrainConfig.validate`` in the binary): the model does not check flags.
      encoder_factory: ``(config, name) -> keras.Model`` mapping images [B,H,W,3] in [0,1]
        to a feature map [B,h,w,C]; default ``resnet.ResNet``.
      head_factory: ``(hidden_dim, output_dim, sync_batchnorm, name) -> layer``; default
        ``heads.MLPHead``.
    After construction call :meth:`build_for` (creates every variable, copies θ → ξ and
    builds the optimizers), then ``compile(optimizer=...)`` before it if the optimizer's
    slots must exist (for checkpoint restore); :meth:`build_for` builds them when present.
    """

    def __init__(self, config: HARLConfig, *,
                 encoder_factory: Optional[Callable] = None,
                 head_factory: Optional[Callable] = None, name: str = "harl", **kwargs):
        super().__init__(name=name, **kwargs)
        self.harl_config = config
        encoder_factory = encoder_factory or _default_encoder_factory
        head_factory = head_factory or _default_head_factory
        sync = config.sync_batchnorm
        self.online_encoder = encoder_factory(config, "online_encoder")
        self.target_encoder = encoder_factory(config, "target_encoder")
        self.online_projector = head_factory(config.projector_hidden_dim,
                                             config.projection_dim, sync, "online_projector")
        self.target_projector = head_factory(config.projector_hidden_dim,
                                             config.projection_dim, sync, "target_projector")
        self.predictor = head_factory(config.predictor_hidden_dim, config.projection_dim,
                                      sync, "predictor")
        if config.num_classes > 0:
            # float32 whatever the policy: its inputs are stop-gradient float32 features,
            # so it needs no loss scaling.
            # Standardise the features (BatchNorm without scale/offset, as MAE's linear
            # probe) so one learning rate suits any feature scale as the encoder drifts.
            self.probe = keras.Sequential([
                keras.layers.BatchNormalization(center=False, scale=False,
                                                synchronized=sync, dtype="float32",
                                                name="probe_bn"),
                keras.layers.Dense(config.num_classes, dtype="float32", name="probe_linear"),
            ], name="probe")
            self.probe_optimizer = keras.optimizers.Adam(config.probe_learning_rate,
                                                         name="probe_adam")
        else:
            self.probe = None
            self.probe_optimizer = None
        self.step_counter = self.add_weight(
            shape=(), dtype="int64", initializer="zeros", trainable=False,
            aggregation="only_first_replica", name="step")
        self._ema_pairs = None

    # Construction ----------------------------------------------------------------------

    def call(self, images, training=False):
        """Online global feature h_glob: images [B,H,W,3] in [0,1] → float32 [B, C]."""
        return pooling.global_pool(self.online_encoder(images, training=training))

    def build_for(self, image_size: int):
        """Create every variable for ``image_size`` px views, copy θ → ξ, build optimizers."""
        images = tf.zeros([2, image_size, image_size, 3], tf.float32)
        for encoder, projector in ((self.online_encoder, self.online_projector),
                                   (self.target_encoder, self.target_projector)):
            features = pooling.global_pool(encoder(images, training=False))
            projection = projector(features, training=False)
        self.predictor(projection, training=False)
        if self.probe is not None:
            self.probe(features, training=False)
            self.probe_optimizer.build(self.probe.trainable_variables)
        online = self.online_encoder.weights + self.online_projector.weights
        target = self.target_encoder.weights + self.target_projector.weights
        if len(online) != len(target):
            raise ValueError(f"online and target networks differ: {len(online)} vs "
                             f"{len(target)} weights.")
        pairs = []
        for o, t in zip(online, target):
            if tuple(o.shape) != tuple(t.shape) or _strip_root(o.path) != _strip_root(t.path):
                raise ValueError(f"online weight {o.path} {o.shape} does not match target "
                                 f"weight {t.path} {t.shape}.")
            t.assign(o)  # ξ starts equal to θ (moving statistics included)
            if o.trainable:
                pairs.append((t, o))
        self._ema_pairs = pairs
        if getattr(self, "optimizer", None) is not None and not self.optimizer.built:
            self.optimizer.build(self.online_variables)
        self.built = True
        return self

    @property
    def online_variables(self):
        """Variables trained by gradients: online encoder, projector, predictor (θ)."""
        return (self.online_encoder.trainable_variables
                + self.online_projector.trainable_variables
                + self.predictor.trainable_variables)

    @property
    def target_variables(self):
        """Target weights updated by the EMA (ξ), paired with ``online`` ones, in order."""
        return [t for t, _ in self._ema_pairs]

    # Schedules ------------------------------------------------------------------------

    def schedule_values(self, step):
        """(τ_k, α_k, λ_k) as float32 scalars, λ and α as used by the loss mode."""
        c = self.harl_config
        tau = schedules.ema_decay_at(step, c.total_steps, c.tau_base)
        alpha = losses.weight_at(c.alpha_schedule, c.alpha_base, step, c.total_steps)
        lam = losses.weight_at(c.lambda_schedule, c.lambda_base, step, c.total_steps)
        alpha, lam = losses.mode_weights(c.loss_mode, alpha, lam)
        return tau, tf.cast(alpha, tf.float32), tf.cast(lam, tf.float32)

    # Forward passes -------------------------------------------------------------------

    def _regions(self, encoder, images, masks, training):
        c = self.harl_config
        return pooling.pool_regions(encoder(images, training=training), masks,
                                    min_fraction=c.min_region_fraction,
                                    epsilon=c.pooling_epsilon, literal=c.literal_pooling)

    def target_projections(self, images, masks):
        """z_r = g_ξ(pool_r(f_ξ(images))), stop-gradient; dict of float32 [B, D]."""
        regions = self._regions(self.target_encoder, images, masks, training=True)
        names = losses.regions_for_mode(self.harl_config.loss_mode)
        projections = self._head_groups(self.target_projector,
                                        [getattr(regions, r) for r in names], True,
                                        self._row_weights(regions, names))
        return {r: tf.stop_gradient(tf.cast(z, tf.float32))
                for r, z in zip(names, projections)}

    def online_predictions(self, images, masks, training=True):
        """(p_r = q(g(pool_r(f(images)))) dict of float32 [B, D], PooledRegions)."""
        regions = self._regions(self.online_encoder, images, masks, training=training)
        names = losses.regions_for_mode(self.harl_config.loss_mode)
        weights = self._row_weights(regions, names)
        projections = self._head_groups(self.online_projector,
                                        [getattr(regions, r) for r in names], training,
                                        weights)
        predictions = self._head_groups(self.predictor, projections, training, weights)
        return {r: tf.cast(p, tf.float32) for r, p in zip(names, predictions)}, regions

    def _row_weights(self, regions, names):
        """Per-region BatchNorm row weights for the heads (None: every row counts)."""
        if not self.harl_config.valid_region_batchnorm:
            return None
        valid = {"fg": regions.fg_valid, "bg": regions.bg_valid, "glob": None}
        return [valid[r] for r in names]

    @staticmethod
    def _head_groups(head, inputs, training, row_weights=None):
        """``[head(x) for x in inputs]``, batched through ``call_groups`` when the head has
        it (``heads.MLPHead``: one matrix product per layer, BatchNorm per region)."""
        if hasattr(head, "call_groups"):
            return head.call_groups(inputs, training=training, row_weights=row_weights)
        return [head(x, training=training) for x in inputs]

    # The step -------------------------------------------------------------------------

    def loss_and_logs(self, data, alpha, lam):
        """Targets, online predictions and the symmetrised loss (steps 1–3), per replica.

        Must run in a replica context (or without a strategy). Returns (loss, logs,
        features): ``loss``, this replica's float32 contribution to the global-batch loss
        L(v1 → v2) + L(v2 → v1); ``logs``, its contributions to loss, loss_fg, loss_bg,
        loss_glob, valid_fg and valid_bg (their sums over the replicas are the global
        values); ``features``, the online h_glob of view 1 and view 2 (for the probe).
        """
        z1 = self.target_projections(data["view1"], data["mask1"])
        z2 = self.target_projections(data["view2"], data["mask2"])
        p1, regions1 = self.online_predictions(data["view1"], data["mask1"])
        p2, regions2 = self.online_predictions(data["view2"], data["mask2"])
        fg_valid = regions1.fg_valid * regions2.fg_valid        # valid in both views
        bg_valid = regions1.bg_valid * regions2.bg_valid
        local = {"batch": tf.cast(tf.shape(fg_valid)[0], tf.float32),
                 "fg": tf.reduce_sum(fg_valid), "bg": tf.reduce_sum(bg_valid)}
        counts = _replica_sum(tf.nest.map_structure(tf.stop_gradient, local))
        kw = dict(alpha=alpha, lam=lam, fg_count=counts["fg"], bg_count=counts["bg"],
                  batch_count=counts["batch"])
        terms = (losses.harl_loss(p1, z2, fg_valid, bg_valid, **kw)
                 + losses.harl_loss(p2, z1, fg_valid, bg_valid, **kw))
        logs = {"loss": terms.loss, "loss_fg": terms.fg, "loss_bg": terms.bg,
                "loss_glob": terms.glob, "valid_fg": local["fg"] / counts["batch"],
                "valid_bg": local["bg"] / counts["batch"]}
        return terms.loss, logs, (regions1.glob, regions2.glob)

    def train_step(self, data):
        """One HARL step (module docstring); runs per replica. Returns global metrics."""
        step = tf.identity(self.step_counter.value)
        tau, alpha, lam = self.schedule_values(step)
        learning_rate = tf.cast(self.optimizer.learning_rate, tf.float32)   # at step k
        variables = self.online_variables
        with tf.GradientTape(watch_accessed_variables=False) as tape:
            tape.watch([v.value for v in variables])       # the tf.Variables of θ
            loss, logs, features = self.loss_and_logs(data, alpha, lam)
            scaled = self.optimizer.scale_loss(loss)
        self.optimizer.apply(tape.gradient(scaled, variables), variables)
        self._ema_update(tau)
        if self.probe is not None and "label" in data:
            logs.update(self._probe_step(features, data["label"]))
        self.step_counter.assign_add(1)
        logs = _replica_sum({k: tf.cast(v, tf.float32) for k, v in logs.items()})
        logs.update({"tau": tau, "alpha": alpha, "lambda": lam,
                     "learning_rate": learning_rate})
        return logs

    def _probe_step(self, features, labels):
        """Softmax-CE probe on stop-gradient h_glob of both views; its own optimizer.

        ``features``: (h_glob of view 1, of view 2), [B, C] each; ``labels``: [B], < 0 for
        unlabelled. Returns this replica's contributions to probe_loss, probe_top1 (means
        over the labelled examples of the global batch) and labelled (their fraction).
        """
        features = tf.stop_gradient(tf.concat(list(features), axis=0))
        labels = tf.cast(tf.concat([labels, labels], axis=0), tf.int32)
        labelled = tf.cast(labels >= 0, tf.float32)
        local_labelled = tf.reduce_sum(labelled)
        counts = _replica_sum({"labelled": local_labelled,
                               "examples": tf.cast(tf.size(labels), tf.float32)})
        safe_labels = tf.maximum(labels, 0)
        with tf.GradientTape() as tape:
            logits = tf.cast(self.probe(features, training=True), tf.float32)
            ce = tf.nn.sparse_softmax_cross_entropy_with_logits(labels=safe_labels,
                                                                logits=logits)
            loss = losses.masked_mean_contribution(ce, labelled, counts["labelled"])
        grads = tape.gradient(loss, self.probe.trainable_variables)
        self.probe_optimizer.apply(grads, self.probe.trainable_variables)
        correct = tf.cast(tf.equal(tf.argmax(logits, axis=-1, output_type=tf.int32),
                                   safe_labels), tf.float32)
        return {"probe_loss": loss,
                "probe_top1": losses.masked_mean_contribution(correct, labelled,
                                                              counts["labelled"]),
                "labelled": local_labelled / counts["examples"]}

    def _ema_update(self, tau):
        """ξ ← τ·ξ + (1 − τ)·θ for every trainable weight pair, in cross-replica context."""
        pairs = self._ema_pairs

        def update(strategy, tau):
            def ema(target, online, tau):
                return target.assign(tau * target + (1.0 - tau) * online)
            for target, online in pairs:
                strategy.extended.update(target.value, ema, args=(online.value, tau),
                                         group=False)

        tf.distribute.get_replica_context().merge_call(update, args=(tau,))


def make_distributed_step(model: HARLModel, strategy: tf.distribute.Strategy, *,
                          compile: bool = True, jit_compile: bool = False):
    """``step(batch) -> metrics`` running ``model.train_step`` via ``strategy.run``.

    ``batch`` is a per-replica value from a distributed dataset (or a plain batch with the
    default strategy). Metrics are global (all-reduced inside the step), so the first local
    replica's values are returned as float32 scalars. ``compile=False`` runs eagerly (for
    debugging and tiny tests, where tracing costs more than the step); ``jit_compile``
    compiles the step with XLA (``--jit_compile``).
    """
    def step(batch):
        outputs = strategy.run(model.train_step, args=(batch,))
        return {k: strategy.experimental_local_results(v)[0] for k, v in outputs.items()}
    return tf.function(step, jit_compile=jit_compile) if compile else step
