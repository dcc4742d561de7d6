"""Every pretraining hyperparameter, written once: the config dataclasses, their checks and
the absl flags made from them; and that machinery (:func:`option`, :func:`check_fields`,
:func:`define_flags`, :func:`from_flags`), which ``harl_tf.eval_config`` uses for the
``harl_tf.finetune`` flags too. Nothing here imports TensorFlow.

    PretrainConfig                 the run: data, budget, distribution, bookkeeping
      .model: HARLConfig           what HARLModel needs (heads, loss, EMA, probe)
        .encoder: EncoderConfig    the ResNet (depth, width, output stride, stem)
      .optimizer: OptimizerConfig  LARS and its warm-up cosine learning rate

Each leaf field is declared with :func:`option` (default, help, and what values it
accepts) and is the ``harl_tf.pretrain`` flag of the same name; flag names are unique
across sections, so ``PretrainConfig(depth=18, loss_mode="byol", batch_size=8)`` builds a
config from flag names, as the binary does (:func:`define_flags`, :func:`from_flags`).
Enum choices come from the registries that use them (``losses.LOSS_MODES``,
``losses.WEIGHT_SCHEDULES``, ``distribute.STRATEGIES``).

Adding a hyperparameter: one ``option(...)`` line in the section that uses it; its flag,
its check and its place in ``config.json`` follow. A flag may spell its field's value
differently (``flag_default``, ``flag_choices``, ``from_flag``): a negative
``--min_region_fraction`` for None here, ``--output_stride=keep`` for None in finetune.
"""
from __future__ import annotations

import dataclasses
import glob
import math
import typing
from typing import Any, Dict, Iterator, Mapping, Optional, Tuple

from absl import flags as absl_flags

from harl_tf import distribute, losses
from harl_tf.errors import ConfigError

# The flags define_flags makes belong to the binary that calls it, not to this module.
absl_flags.disclaim_key_flags()

DEPTHS = (18, 34, 50, 101, 152, 200)          # models.resnet's depths
OUTPUT_STRIDES = (8, 16, 32)
PRECISIONS = ("", "float32", "mixed_bfloat16", "mixed_float16")


def option(default, help: str, *, choices: Optional[Tuple] = None, low: float = None,
           high: float = None, open_low: bool = False, open_high: bool = False,
           required: str = "", flag_default=None, from_flag=None,
           flag_choices: Optional[Tuple[str, ...]] = None):
    """A config field that is also a flag.

    Args:
      default: the value when nothing is set (SPEC defaults).
      help: the flag's help.
      choices: the accepted values (a str field with choices is an enum flag).
      low, high, open_low, open_high: the accepted range; open ends are excluded.
      required: non-empty: the field must be set; the text says what it is for.
      flag_default, from_flag: for fields whose flag spells a value differently (e.g. a
        negative --min_region_fraction for None, a JSON string for a dict): the flag's
        default, whose type is the flag's type, and the conversion of the flag's value.
      flag_choices: the flag is an enum of these strings (default ``flag_default``), e.g.
        ``("keep", "32", "16", "8")`` for an Optional[int] field; ``from_flag`` converts.
    """
    return dataclasses.field(default=default, metadata=dict(
        help=help, choices=choices, low=low, high=high, open_low=open_low,
        open_high=open_high, required=required, flag_default=flag_default,
        from_flag=from_flag, flag_choices=flag_choices))


def section(cls):
    """A nested config section (its fields are flags too)."""
    return dataclasses.field(default_factory=cls, metadata={"section": cls})


def _range_text(m) -> str:
    low, high = m["low"], m["high"]
    if high is None:
        return f"> {low:g}" if m["open_low"] else f">= {low:g}"
    if low is None:
        return f"< {high:g}" if m["open_high"] else f"<= {high:g}"
    return (f"in {'(' if m['open_low'] else '['}{low:g}, {high:g}"
            f"{')' if m['open_high'] else ']'}")


def _check_field(name: str, value, m) -> None:
    """ConfigError naming --name when ``value`` breaks the field's declared rule."""
    if m["required"] and not value:
        raise ConfigError(f"--{name} is required ({m['required']}).")
    if value is None:
        return
    if m["choices"] is not None and value not in m["choices"]:
        choices = ", ".join(repr(c) if isinstance(c, str) else str(c) for c in m["choices"])
        raise ConfigError(f"--{name} must be one of {choices}; got {value!r}.")
    low, high = m["low"], m["high"]
    if low is None and high is None:
        return
    bad = ((low is not None and (value < low or (m["open_low"] and value == low)))
           or (high is not None and (value > high or (m["open_high"] and value == high)))
           or (isinstance(value, float) and math.isnan(value)))
    if bad:
        text = _range_text(m)
        text = "positive" if text == "> 0" else text
        raise ConfigError(f"--{name} must be {text}, got {value}.")


def check_fields(config) -> None:
    """The declared rules of every field of ``config``, sections included, in order."""
    for f in dataclasses.fields(config):
        value = getattr(config, f.name)
        if "section" in f.metadata:
            check_fields(value)
        elif "help" in f.metadata:
            _check_field(f.name, value, f.metadata)


# The sections ------------------------------------------------------------------------------

@dataclasses.dataclass
class EncoderConfig:
    """The ResNet encoder (``models.resnet.ResNet`` keyword arguments)."""
    depth: int = option(50, "ResNet depth: 18, 34, 50, 101, 152, 200.", choices=DEPTHS)
    width_multiplier: float = option(1.0, "ResNet width multiplier (channels scale, e.g. 0.5 "
                                     "for small CPU runs).", low=0, open_low=True)
    output_stride: int = option(32, "Encoder output stride: 32 (7x7 at 224 px), 16 (14x14) "
                                "or 8.", choices=OUTPUT_STRIDES)
    small_stem: bool = option(False, "3x3 stride-1 stem, no max-pool (small images).")


def _none_if_negative(value):
    return None if value is not None and value < 0 else value


@dataclasses.dataclass
class HARLConfig:
    """Everything HARLModel needs (not the optimizer, data or strategy).

    ``encoder`` may be given as a dict of EncoderConfig fields. ``total_steps`` (K of the
    τ, α and λ schedules) is the run's length, set by ``PretrainConfig.harl_config()``.
    """
    encoder: EncoderConfig = section(EncoderConfig)
    projector_hidden_dim: int = option(4096, "Projector hidden width (paper's '4960' read "
                                       "as 4096).", low=0, open_low=True)
    projection_dim: int = option(512, "Projection / prediction size.", low=0, open_low=True)
    predictor_hidden_dim: int = option(4096, "Predictor hidden width.", low=0, open_low=True)
    sync_batchnorm: bool = option(False, "Synchronise BatchNorm statistics across replicas "
                                  "(as BYOL).")
    loss_mode: str = option("hybrid", losses.loss_mode_help(), choices=tuple(losses.LOSS_MODES))
    alpha_base: float = option(0.7, "Foreground weight alpha (at step 0).", low=0, high=1)
    alpha_schedule: str = option("cosine", "alpha constant, or cosine rise from alpha_base "
                                 "to 1.", choices=losses.WEIGHT_SCHEDULES)
    lambda_base: float = option(0.7, "Object-level weight lambda (step 0).", low=0, high=1)
    lambda_schedule: str = option("cosine", "lambda constant, or cosine rise from "
                                  "lambda_base to 1.", choices=losses.WEIGHT_SCHEDULES)
    tau_base: float = option(0.996, "EMA decay at step 0 (cosine rise to 1).", low=0, high=1)
    total_steps: int = 1
    min_region_fraction: Optional[float] = option(
        None, "Validity floor of a region's area fraction; negative: one feature cell, "
        "1/(h*w).", low=0, high=1, flag_default=-1.0, from_flag=_none_if_negative)
    pooling_epsilon: float = option(1e-6, "Epsilon of region pooling.", low=0, open_low=True)
    literal_pooling: bool = option(False, "Paper wording: multiply, then global average "
                                   "pool over all positions.")
    # Head BatchNorm statistics of the fg / bg groups from the rows where that region is
    # present in the view (heads.MLPHead.call_groups' row_weights), not the zero vectors
    # pooled for absent regions.
    valid_region_batchnorm: bool = option(
        False, "Projector/predictor BatchNorm statistics of the fg and bg groups from the "
        "examples where that region is present in the view only.")
    num_classes: int = option(0, "Classes of the online linear probe (0: no probe; labels "
                              "< 0 are ignored).", low=0)
    probe_learning_rate: float = option(1e-3, "Probe Adam lr.", low=0, open_low=True)

    def __post_init__(self):
        if isinstance(self.encoder, Mapping):
            self.encoder = EncoderConfig(**self.encoder)

    def validate(self) -> None:
        """ConfigError (a ValueError) naming the offending flag."""
        check_fields(self)
        if self.total_steps <= 0:
            raise ConfigError(f"total_steps must be positive, got {self.total_steps}.")


@dataclasses.dataclass
class OptimizerConfig:
    """LARS (SPEC §6) and its learning rate: linear warm-up, then cosine decay to 0."""
    base_learning_rate: float = option(0.2, "Learning rate per 256 examples (lr = base * "
                                       "batch / 256).", low=0, open_low=True)
    warmup_epochs: float = option(10.0, "Linear warm-up epochs.", low=0)
    weight_decay: float = option(5e-7, "LARS weight decay (paper 5e-7).", low=0)
    momentum: float = option(0.9, "LARS momentum.", low=0, high=1, open_high=True)
    trust_coefficient: float = option(1e-3, "LARS trust coefficient.", low=0, open_low=True)


@dataclasses.dataclass(init=False)
class PretrainConfig:
    """Every pretraining hyperparameter, SPEC defaults (ImageNet, ResNet-50, 1000 epochs).

    Built from sections, from flag names, or both (flag names override the sections)::

        PretrainConfig(depth=18, loss_mode="byol", batch_size=8, train_steps=100)
        PretrainConfig(model=HARLConfig(...), optimizer=OptimizerConfig(...), seed=0)
    """
    model: HARLConfig = section(HARLConfig)
    optimizer: OptimizerConfig = section(OptimizerConfig)
    # Data
    train_files: str = option("", "Glob(s), comma-separated, of pretraining TFRecords "
                              "(schema of harl_tf.data.schema).",
                              required="a glob of TFRecord files")
    num_train_examples: int = option(1281167, "Examples per epoch (for epoch-based "
                                     "schedules).", low=0, open_low=True)
    image_size: int = option(224, "Side of the square views, px.", low=0, open_low=True)
    shuffle_buffer: int = option(10000, "Records permuted together per block (a block as "
                                 "large as the dataset: a full shuffle each epoch).", low=0)
    seed: Optional[int] = option(None, "Random seed (views, order); unset: random.")
    deterministic: bool = option(False, "Reproducible batch order (needs --seed; slower).")
    synthetic_records: int = option(0, "If > 0 and --train_files matches nothing, first "
                                    "build this many examples of the embedded synthetic "
                                    "set there.", low=0)
    color_jitter_strength: float = option(
        1.0, "Colour distortion strength: BYOL's jitter (brightness 0.4, contrast 0.4, "
        "saturation 0.2, hue 0.1) times this (clipped to 1, hue to 0.5).", low=0)
    grayscale_prob: float = option(0.2, "Grayscale probability of both views.", low=0, high=1)
    blur_prob_scale: float = option(
        1.0, "Gaussian blur probabilities of the two views (BYOL: 1.0 and 0.1) times this; "
        "0 turns the blur off (solo-learn's CIFAR recipes blur nothing at 32 px).",
        low=0, high=1)
    min_crop_area: float = option(0.08, "Smallest area fraction of the random crop "
                                  "(BYOL: 0.08).", low=0, high=1, open_low=True)
    augment_jit_compile: bool = option(
        True, "XLA-compile the colour jitter's saturation in the input pipeline: the same "
        "values to float rounding, 2.6x cheaper than TensorFlow's kernel; a second or two of "
        "compiling once.")
    # Budget
    batch_size: int = option(4096, "Global batch size (all replicas).", low=0, open_low=True)
    epochs: int = option(1000, "Training epochs.", low=0)
    train_steps: int = option(0, "If > 0, steps (overrides --epochs).", low=0)
    mixed_precision: str = option("", "Keras dtype policy; mixed_float16 adds dynamic loss "
                                  "scaling.", choices=PRECISIONS)
    jit_compile: bool = option(False, "XLA-compile the training step (off by default: "
                               "slower on CPU; try it on GPU and TPU).")
    # Distribution
    strategy: str = option("default", "Distribution strategy (multi_worker reads TF_CONFIG).",
                           choices=distribute.STRATEGIES)
    tpu_address: str = option("", "TPU name or address for --strategy=tpu.")
    collective_timeout_seconds: float = option(
        300.0, "multi_worker: seconds an all-reduce waits for the other workers before the "
        "run stops as if a peer were lost (exit status 3); 0: no limit.", low=0)
    # Bookkeeping
    model_dir: str = option("", "Run directory: checkpoints, logs, JSON.",
                            required="where checkpoints and logs go")
    checkpoint_every_steps: int = option(1000, "Checkpoint period in steps (also at the end "
                                         "and on SIGTERM).", low=0)
    keep_checkpoints: int = option(3, "Checkpoints kept.", low=0, open_low=True)
    log_every_steps: int = option(100, "Logging / TensorBoard period.", low=0, open_low=True)
    image_summaries: int = option(4, "View pairs written to TensorBoard at the start.", low=0)

    def __init__(self, **values):
        for f in dataclasses.fields(PretrainConfig):
            if f.name in values:
                setattr(self, f.name, values.pop(f.name))
            elif "section" in f.metadata:
                setattr(self, f.name, f.metadata["section"]())
            else:
                setattr(self, f.name, f.default)
        # The remaining values are flag names of a section: set them on copies.
        paths = flag_paths(PretrainConfig)
        unknown = sorted(set(values) - set(paths))
        if unknown:
            raise TypeError(f"PretrainConfig has no field or flag {unknown}.")
        for name, value in values.items():
            _set_path(self, paths[name], value)

    # Derived values

    @property
    def steps_per_epoch(self) -> int:
        return max(1, self.num_train_examples // self.batch_size)

    @property
    def total_steps(self) -> int:
        return self.train_steps if self.train_steps > 0 else self.epochs * self.steps_per_epoch

    @property
    def warmup_steps(self) -> int:
        return min(self.total_steps,
                   int(round(self.optimizer.warmup_epochs * self.steps_per_epoch)))

    @property
    def learning_rate(self) -> float:
        """Peak learning rate, base · B / 256 (the linear scaling rule)."""
        return self.optimizer.base_learning_rate * self.batch_size / 256.0

    def harl_config(self) -> HARLConfig:
        """The model section with this run's schedule length (``total_steps``)."""
        return dataclasses.replace(self.model, total_steps=self.total_steps)

    def flag_values(self) -> Dict[str, Any]:
        """{flag name: value} of every field (the run's flags, as config.json holds them)."""
        return {name: _get_path(self, path) for name, path in flag_paths(PretrainConfig).items()}

    def to_json(self) -> dict:
        d = self.flag_values()
        d.update(total_steps=self.total_steps, steps_per_epoch=self.steps_per_epoch,
                 warmup_steps=self.warmup_steps, learning_rate=self.learning_rate)
        return d

    def validate(self, *, check_files: bool = True) -> None:
        """Cheap checks before any heavy work; ConfigError (a ValueError) with a one-line
        message naming the flag. ``check_files``: --train_files must match a file (unless
        --synthetic_records will build them)."""
        check_fields(self)
        if not (self.train_steps > 0 or self.epochs > 0):
            raise ConfigError("--epochs or --train_steps must be positive.")
        if self.deterministic and self.seed is None:
            raise ConfigError("--deterministic needs --seed (a fixed seed makes the batches "
                              "reproducible).")
        encoder = self.model.encoder
        stride = encoder.output_stride if not encoder.small_stem else min(encoder.output_stride, 8)
        if self.image_size < stride:
            raise ConfigError(f"--image_size={self.image_size} is smaller than the encoder's "
                              f"output stride.")
        if check_files and self.synthetic_records == 0 and not matching_files(self.train_files):
            raise ConfigError(f"--train_files={self.train_files!r} matches no file (build "
                              f"records with tools/build_tfrecords, or set "
                              f"--synthetic_records=N to make some).")


def matching_files(patterns: str):
    """Sorted files matching comma-separated glob ``patterns``."""
    return sorted(f for p in patterns.split(",") if p for f in glob.glob(p))


# Flag names ↔ fields -----------------------------------------------------------------------

def _leaves(cls, path=()) -> Iterator[Tuple[str, Tuple[str, ...], dataclasses.Field, type]]:
    """(flag name, attribute path, field, the section class declaring it) of every leaf."""
    for f in dataclasses.fields(cls):
        if "section" in f.metadata:
            yield from _leaves(f.metadata["section"], path + (f.name,))
        elif "help" in f.metadata:
            yield f.name, path + (f.name,), f, cls


def flag_paths(cls) -> Dict[str, Tuple[str, ...]]:
    """{flag name: attribute path}, e.g. {"depth": ("model", "encoder", "depth"), ...}."""
    return {name: path for name, path, _, _ in _leaves(cls)}


def _get_path(obj, path):
    for name in path:
        obj = getattr(obj, name)
    return obj


def _set_path(obj, path, value):
    """Set ``obj.a.b.c = value`` on copies of the sections ``a``, ``a.b`` (never on a
    section the caller passed in)."""
    if len(path) > 1:
        child = dataclasses.replace(getattr(obj, path[0]))
        _set_path(child, path[1:], value)
        value = child
    setattr(obj, path[0], value)


def _flag_type(cls, name: str):
    """int, float, bool or str: the field's type, Optional[...] unwrapped."""
    hint = typing.get_type_hints(cls)[name]
    args = [a for a in typing.get_args(hint) if a is not type(None)]
    return args[0] if typing.get_origin(hint) is typing.Union else hint


_DEFINE = {bool: absl_flags.DEFINE_bool, int: absl_flags.DEFINE_integer,
           float: absl_flags.DEFINE_float, str: absl_flags.DEFINE_string}


def define_flags(cls, flag_values=None) -> None:
    """Define an absl flag for every leaf field of ``cls`` (name, default, help; an enum for
    a str field with choices, or for ``flag_choices``). A field with a ``flag_default``
    gets a flag of that default's type. The flags belong to the module calling this
    function."""
    flag_values = absl_flags.FLAGS if flag_values is None else flag_values
    for name, _, f, owner in _leaves(cls):
        m = f.metadata
        if m["flag_default"] is None:
            default, kind, choices = f.default, _flag_type(owner, name), m["choices"]
        else:
            default, kind, choices = m["flag_default"], type(m["flag_default"]), None
        if m["flag_choices"] is not None:
            kind, choices = str, m["flag_choices"]
        if kind is str and choices is not None:
            absl_flags.DEFINE_enum(name, default, list(choices), m["help"],
                                   flag_values=flag_values)
        else:
            _DEFINE[kind](name, default, m["help"], flag_values=flag_values)


def parse_argv(cls, argv, **overrides):
    """``cls`` built from a command line of its flags (``--flagfile=`` nests as in the
    binary), parsed on a private FlagValues: what ``harl_tf.pretrain`` would run with,
    without defining anything on the process's flags. Unknown flags are an error."""
    flag_values = absl_flags.FlagValues()
    define_flags(cls, flag_values)
    try:
        flag_values(["parse_argv", *argv])
    except absl_flags.Error as err:
        raise ConfigError(str(err)) from None
    return from_flags(cls, flag_values, **overrides)


def from_flags(cls, flag_values=None, **overrides):
    """``cls`` built from parsed flags (each flag's ``from_flag`` applied); ``overrides``
    replace flag values (e.g. paths resolved by the binary; an overridden flag is not
    converted)."""
    flag_values = absl_flags.FLAGS if flag_values is None else flag_values
    values = {}
    for name, _, f, _ in _leaves(cls):
        if name in overrides:
            continue
        value = getattr(flag_values, name)
        convert = f.metadata["from_flag"]
        values[name] = convert(value) if convert else value
    values.update(overrides)
    return cls(**values)
