"""HARLModel: online and target networks, the training step and the EMA update (SPEC §3–6).

Online network θ: encoder f → pooled regions (fg, bg, glob) → projector g → predictor q.
Target network ξ: encoder f_ξ → pooled regions → projector g_ξ (no predictor). ξ starts as a
copy of θ and is never trained by gradients.

One training step on a batch {view1, view2, mask1, mask2, label}:

1. target forward on both views (training mode, outside the tape, stop-gradient);
2. online forward on both views under the tape;
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
α_k, λ_k either constant or the same cosine rise from α_base, λ_base (``schedules``).
Loss modes: "mask" (λ = 1; the whole-image head pass is skipped), "hybrid" (all three
regions), "byol" (λ = 0; the fg/bg head passes are skipped, so a BYOL step costs exactly a
BYOL step). A skipped region reports 0 for its loss metric.

Metrics returned by a step (global values, identical on every replica): loss, loss_fg,
loss_bg, loss_glob (each the sum of both directions), valid_fg, valid_bg (fraction of
examples whose region is valid in both views), tau, alpha, lambda, learning_rate and, with
a probe, probe_loss, probe_top1 (over labelled examples of both views; 0 when a batch has
no labels) and labelled (fraction of labelled examples).

Custom loops (multi-worker; Keras 3 ``fit`` fails under MultiWorkerMirroredStrategy,
keras-team/keras#20585) use :func:`make_distributed_step`, which runs the very same
``train_step`` through ``strategy.run``.
"""
from __future__ import annotations

import dataclasses
from typing import Callable, Dict, Optional

import keras
import tensorflow as tf

from harl_tf import losses, schedules
from harl_tf.models import pooling

SCHEDULE_KINDS = ("constant", "cosine")


@dataclasses.dataclass
class HARLConfig:
    """Everything the model needs (not the optimizer, data or strategy).

    encoder: keyword arguments of ``resnet.ResNet`` (depth, width_multiplier,
      output_stride, small_stem, ...); ``sync_batchnorm`` below is added.
    """
    encoder: Dict = dataclasses.field(default_factory=lambda: {"depth": 50})
    projector_hidden_dim: int = 4096
    projection_dim: int = 512
    predictor_hidden_dim: int = 4096
    sync_batchnorm: bool = False
    loss_mode: str = "hybrid"
    alpha_base: float = 0.7
    alpha_schedule: str = "cosine"
    lambda_base: float = 0.7
    lambda_schedule: str = "cosine"
    tau_base: float = 0.996
    total_steps: int = 1
    min_region_fraction: Optional[float] = None   # None: one feature cell
    pooling_epsilon: float = pooling.DEFAULT_EPSILON
    literal_pooling: bool = False
    # Head BatchNorm statistics of the fg / bg groups from the rows where that region is
    # present in the view (heads.MLPHead.call_groups' row_weights), not the zero vectors
    # pooled for absent regions.
    valid_region_batchnorm: bool = False
    num_classes: int = 0                            # 0: no online probe
    probe_learning_rate: float = 1e-3

    def validate(self):
        """Raise ValueError naming the offending field."""
        if self.loss_mode not in losses.LOSS_MODES:
            raise ValueError(f"--loss_mode must be one of {losses.LOSS_MODES}, "
                             f"got {self.loss_mode!r}.")
        for name in ("alpha_schedule", "lambda_schedule"):
            if getattr(self, name) not in SCHEDULE_KINDS:
                raise ValueError(f"--{name} must be one of {SCHEDULE_KINDS}, "
                                 f"got {getattr(self, name)!r}.")
        for name in ("alpha_base", "lambda_base", "tau_base"):
            value = getattr(self, name)
            if not 0.0 <= value <= 1.0:
                raise ValueError(f"--{name} must be in [0, 1], got {value}.")
        if self.total_steps <= 0:
            raise ValueError(f"total_steps must be positive, got {self.total_steps}.")
        if self.num_classes < 0:
            raise ValueError(f"--num_classes must be >= 0, got {self.num_classes}.")


def _default_encoder_factory(config: HARLConfig, name: str) -> keras.Model:
    from harl_tf.models.resnet import ResNet
    return ResNet(**{**config.encoder, "sync_batchnorm": config.sync_batchnorm, "name": name})


def _default_head_factory(hidden_dim: int, output_dim: int, sync_batchnorm: bool,
                          name: str) -> keras.layers.Layer:
    from harl_tf.models.heads import MLPHead
    return MLPHead(hidden_dim=hidden_dim, output_dim=output_dim,
                   sync_batchnorm=sync_batchnorm, name=name)


def schedule_value(kind: str, base, step, total_steps) -> tf.Tensor:
    """α_k or λ_k: ``base`` (constant) or the cosine rise from ``base`` to 1; float32."""
    if kind == "constant":
        return tf.constant(float(base), tf.float32)
    return schedules.cosine_rise(step, total_steps, base)


def _strip_root(path: str) -> str:
    return path.split("/", 1)[-1]


class HARLModel(keras.Model):
    """Online + target networks with the HARL training step. Build inside ``strategy.scope()``.

    Args:
      config: HARLConfig.
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
        config.validate()
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
        alpha = schedule_value(c.alpha_schedule, c.alpha_base, step, c.total_steps)
        lam = schedule_value(c.lambda_schedule, c.lambda_base, step, c.total_steps)
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

    def compute_loss_terms(self, data, alpha, lam, targets=None):
        """Symmetrised loss contributions of this replica and the global counts.

        Must run in a replica context (or without a strategy). ``targets``: (z1, z2) from
        :meth:`target_projections` of both views, computed here when None. Returns
        (LossTerms, counts dict of float32 scalars: batch, fg, bg — global),
        (regions1, regions2).
        """
        ctx = tf.distribute.get_replica_context()
        if targets is None:
            targets = (self.target_projections(data["view1"], data["mask1"]),
                       self.target_projections(data["view2"], data["mask2"]))
        z1, z2 = targets
        p1, regions1 = self.online_predictions(data["view1"], data["mask1"])
        p2, regions2 = self.online_predictions(data["view2"], data["mask2"])
        fg_valid = regions1.fg_valid * regions2.fg_valid
        bg_valid = regions1.bg_valid * regions2.bg_valid
        local = tf.stack([tf.cast(tf.shape(fg_valid)[0], tf.float32),
                          tf.reduce_sum(fg_valid), tf.reduce_sum(bg_valid)])
        total = ctx.all_reduce(tf.distribute.ReduceOp.SUM, tf.stop_gradient(local))
        counts = {"batch": total[0], "fg": total[1], "bg": total[2]}
        kw = dict(alpha=alpha, lam=lam, fg_count=counts["fg"], bg_count=counts["bg"],
                  batch_count=counts["batch"])
        terms = (losses.harl_loss(p1, z2, fg_valid, bg_valid, **kw)
                 + losses.harl_loss(p2, z1, fg_valid, bg_valid, **kw))
        return terms, counts, (regions1, regions2)

    def train_step(self, data):
        """One HARL step (module docstring); runs per replica. Returns global metrics."""
        ctx = tf.distribute.get_replica_context()
        step = tf.identity(self.step_counter.value)
        tau, alpha, lam = self.schedule_values(step)
        learning_rate = tf.cast(self.optimizer.learning_rate, tf.float32)
        variables = self.online_variables
        # Target forward outside the tape: it needs no gradient, so the tape keeps none of
        # its activations.
        targets = (self.target_projections(data["view1"], data["mask1"]),
                   self.target_projections(data["view2"], data["mask2"]))
        with tf.GradientTape() as tape:
            terms, counts, (regions1, regions2) = self.compute_loss_terms(
                data, alpha, lam, targets=targets)
            scaled = self.optimizer.scale_loss(terms.loss)
        grads = tape.gradient(scaled, variables)
        self.optimizer.apply(grads, variables)
        self._ema_update(tau)

        local_sums = [terms.loss, terms.fg, terms.bg, terms.glob]
        probe_metrics = {}
        if self.probe is not None and "label" in data:
            probe_sums, labelled = self._probe_step(data["label"], regions1, regions2, ctx)
            local_sums += probe_sums
        totals = ctx.all_reduce(tf.distribute.ReduceOp.SUM,
                                tf.stack([tf.cast(v, tf.float32) for v in local_sums]))
        if self.probe is not None and "label" in data:
            probe_metrics = {"probe_loss": totals[4], "probe_top1": totals[5],
                             "labelled": labelled}
        self.step_counter.assign_add(1)
        metrics = {
            "loss": totals[0], "loss_fg": totals[1], "loss_bg": totals[2],
            "loss_glob": totals[3],
            "valid_fg": counts["fg"] / counts["batch"],
            "valid_bg": counts["bg"] / counts["batch"],
            "tau": tau, "alpha": alpha, "lambda": lam, "learning_rate": learning_rate,
        }
        metrics.update(probe_metrics)
        return metrics

    def _probe_step(self, labels, regions1, regions2, ctx):
        """Softmax-CE probe on stop-gradient h_glob of both views; own optimizer.

        Returns ([loss contribution, top-1 contribution], global labelled fraction).
        """
        features = tf.stop_gradient(tf.concat([regions1.glob, regions2.glob], axis=0))
        labels = tf.cast(tf.concat([labels, labels], axis=0), tf.int32)
        labelled = tf.cast(labels >= 0, tf.float32)
        local = tf.stack([tf.reduce_sum(labelled), tf.cast(tf.size(labels), tf.float32)])
        total = ctx.all_reduce(tf.distribute.ReduceOp.SUM, local)
        safe_labels = tf.maximum(labels, 0)
        with tf.GradientTape() as tape:
            logits = tf.cast(self.probe(features, training=True), tf.float32)
            ce = tf.nn.sparse_softmax_cross_entropy_with_logits(labels=safe_labels,
                                                                logits=logits)
            loss = losses.masked_mean_contribution(ce, labelled, total[0])
        grads = tape.gradient(loss, self.probe.trainable_variables)
        self.probe_optimizer.apply(grads, self.probe.trainable_variables)
        correct = tf.cast(tf.equal(tf.argmax(logits, axis=-1, output_type=tf.int32),
                                   safe_labels), tf.float32)
        top1 = losses.masked_mean_contribution(correct, labelled, total[0])
        return [loss, top1], total[0] / total[1]

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
                          compile: bool = True):
    """``step(batch) -> metrics`` running ``model.train_step`` via ``strategy.run``.

    ``batch`` is a per-replica value from a distributed dataset (or a plain batch with the
    default strategy). Metrics are global (all-reduced inside the step), so the first local
    replica's values are returned as float32 scalars. ``compile=False`` runs eagerly (for
    debugging and tiny tests, where tracing costs more than the step).
    """
    def step(batch):
        outputs = strategy.run(model.train_step, args=(batch,))
        return {k: strategy.experimental_local_results(v)[0] for k, v in outputs.items()}
    return tf.function(step) if compile else step
