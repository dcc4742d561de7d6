"""The finetune flags are made from one declaration, ``eval_config.EvaluationConfig``: each
field is the flag of the same name with the declared default, help and choices; a bad value
ends the binary with one line naming the flag; a flag may spell its field's value
differently (``--output_stride=keep`` is None)."""
import dataclasses
import json
import os
import subprocess
import sys
from typing import Any, Dict, Optional

import pytest
from absl import flags

from harl_tf import config, distribute, eval_config
from harl_tf.eval_config import EvaluationConfig

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ENV = dict(os.environ, PYTHONPATH=ROOT, TF_CPP_MIN_LOG_LEVEL="3", CUDA_VISIBLE_DEVICES="")


def _fresh_flags(*argv):
    values = flags.FlagValues()
    config.define_flags(EvaluationConfig, values)
    values(["finetune", *argv])
    return values


# harl_tf.finetune defines its flags on the process's FLAGS when imported, which would
# clash with other binaries' flags (--output_dir) imported by other tests in the same
# worker: it is imported in a child process.
FINETUNE_FLAGS = """
import json
from absl import flags
from harl_tf.cli import finetune
F = flags.FLAGS
names = sorted(f.name for f in F.get_flags_for_module(finetune))
print(json.dumps({"required": list(finetune.REQUIRED), "flags": {
    n: {"default": F[n].default, "help": F[n].help,
        "enum": getattr(F[n].parser, "enum_values", None)} for n in names}}))
"""


def test_every_field_is_a_finetune_flag_with_its_declared_default_and_help():
    out = subprocess.run([sys.executable, "-c", FINETUNE_FLAGS], env=ENV, cwd=ROOT,
                         capture_output=True, text=True, check=True).stdout
    info = json.loads(out.strip().splitlines()[-1])
    defined = info["flags"]
    fields = {f.name: f for f in dataclasses.fields(EvaluationConfig)}
    assert set(defined) == set(fields) and "embedding" in fields
    assert defined["knn_k"]["default"] == fields["knn_k"].default == 20
    assert defined["knn_k"]["help"] == fields["knn_k"].metadata["help"] == \
        "k of the k-NN classifier."
    assert defined["label_fraction"]["default"] == 1.0
    assert defined["weight_decay_grid"]["default"] == "0,1e-4,1e-3,1e-2,1e-1,1"
    assert eval_config.parse_grid(defined["weight_decay_grid"]["default"]) == (
        0.0, 1e-4, 1e-3, 1e-2, 1e-1, 1.0) == eval_config.DEFAULT_GRID
    assert defined["mode"]["enum"][:3] == ["linear", "finetune", "knn"]
    assert defined["mode"]["enum"] == list(eval_config.MODES)
    assert defined["embedding"]["enum"] == ["global", "foreground", "background"]
    assert defined["embedding"]["default"] == "global"  # what every probe read before
    assert defined["eval_background"]["enum"] == list(eval_config.EVAL_BACKGROUNDS)
    assert defined["strategy"]["enum"] == list(distribute.STRATEGIES)
    assert defined["output_stride"]["enum"] == ["keep", "32", "16", "8"]
    # The required flags keep absl's None default (mark_flags_as_required needs it).
    assert info["required"] == ["encoder", "train_files", "eval_files", "output_dir"]
    assert all(defined[name]["default"] is None for name in info["required"])


def test_output_stride_keep_is_none_and_a_number_is_that_stride():
    assert config.from_flags(EvaluationConfig, _fresh_flags()).output_stride is None
    assert config.from_flags(EvaluationConfig,
                             _fresh_flags("--output_stride=keep")).output_stride is None
    assert config.from_flags(EvaluationConfig,
                             _fresh_flags("--output_stride=16")).output_stride == 16
    assert config.from_flags(EvaluationConfig,
                             _fresh_flags("--output_stride=8")).output_stride == 8
    with pytest.raises(flags.IllegalFlagValueError, match="keep|32|16|8"):
        _fresh_flags("--output_stride=4")


def test_parsed_flags_build_the_config_the_field_names_build():
    parsed = config.from_flags(EvaluationConfig, _fresh_flags(
        "--mode=knn", "--knn_k=5", '--encoder_config={"depth": 18}', "--step=7",
        "--weight_decay_grid=", "--eval_background=both", "--strategy=one_device"))
    assert parsed == EvaluationConfig(
        mode="knn", knn_k=5, encoder_config={"depth": 18}, step=7, eval_background="both",
        strategy="one_device")
    assert parsed.encoder is None and parsed.weight_decay_grid == ()


@pytest.mark.parametrize("change, message", [
    (dict(knn_k=0), "--knn_k must be >= 1, got 0."),
    (dict(label_fraction=1.5), "--label_fraction must be in (0, 1], got 1.5."),
    (dict(mode="bogus"), "--mode must be one of "
     f"{', '.join(repr(m) for m in eval_config.MODES)}; got 'bogus'."),
    (dict(output_stride=4), "--output_stride must be one of 8, 16, 32; got 4."),
    (dict(learning_rate=0.0), "--learning_rate must be positive, got 0.0."),
    (dict(encoder=""), "--encoder is required (the encoder to evaluate)."),
    (dict(encoder_config=None), "--encoder=random needs --encoder_config."),
    (dict(mode="knn", weight_decay_grid=(0.0, 0.1)), "--weight_decay_grid applies to "
     "--mode=linear on precomputed features only"),
    (dict(weight_decay_grid=(0.0, 20.0)), "--learning_rate × the largest --weight_decay_grid "
     "value must be < 1"),
    (dict(weight_decay_grid=(0.0,), validation_fraction=1.0),
     "--validation_fraction must be in (0, 1), got 1.0."),
    (dict(embedding="middle"),
     "--embedding must be one of 'global', 'foreground', 'background'; got 'middle'."),
    (dict(mode="segmentation", weight_decay_grid=(), embedding="foreground"),
     "--embedding=foreground applies to --mode=linear, finetune and knn, not "
     "--mode=segmentation."),
])
def test_validate_names_the_flag_in_one_line(change, message):
    good = dict(encoder="random", encoder_config={"depth": 18}, train_files="train",
                eval_files="eval", output_dir="out")
    EvaluationConfig(**good).validate()
    with pytest.raises(config.ConfigError) as e:
        EvaluationConfig(**{**good, **change}).validate()
    assert str(e.value).startswith(message) and "\n" not in str(e.value)


def test_the_binary_rejects_bad_values_with_one_line_naming_the_flag(tmp_path):
    """Through finetune.run (flag parsing, the config, its checks, errors.run_binary), all
    cases in one process: exit status 2 and one stderr line, before any record is read."""
    script = (
        "import contextlib, io, json, sys\n"
        "from absl import flags\n"
        "from harl_tf.cli import finetune\n"
        "out = []\n"
        "for args in json.loads(sys.argv[1]):\n"
        "    flags.FLAGS.unparse_flags()\n"
        "    sys.argv = ['finetune'] + args\n"
        "    err = io.StringIO()\n"
        "    with contextlib.redirect_stderr(err):\n"
        "        try:\n"
        "            finetune.run()\n"
        "            out.append([0, err.getvalue()])\n"
        "        except SystemExit as e:\n"
        "            out.append([e.code, err.getvalue()])\n"
        "print(json.dumps(out))\n")
    (tmp_path / "records.tfrecord").write_bytes(b"")  # checks only look the files up
    ok = ["--encoder=random", '--encoder_config={"depth": 18}',
          f"--train_files={tmp_path}/records.tfrecord",
          f"--eval_files={tmp_path}/records.tfrecord", f"--output_dir={tmp_path}/out"]
    cases = {
        "--knn_k must be >= 1, got 0.": ok + ["--mode=knn", "--knn_k=0"],
        "--label_fraction must be in (0, 1], got 1.5.": ok + ["--label_fraction=1.5"],
        f"flag --mode=bogus: value should be one of <{'|'.join(eval_config.MODES)}>":
            ok + ["--mode=bogus"],
        "flag --output_stride=4: value should be one of <keep|32|16|8>":
            ok + ["--output_stride=4"],
        "flag --embedding=middle: value should be one of <global|foreground|background>":
            ok + ["--embedding=middle"],
        "--weight_decay_grid applies to --mode=linear on precomputed features only (not "
        "--linear_augmentation); pass --weight_decay_grid= and a fixed --weight_decay.":
            ok + ["--mode=knn", "--weight_decay_grid=0,1e-3"],
        "--encoder=random needs --encoder_config.": ok[:1] + ok[2:],
        f"--eval_files: no file matches file_pattern '{tmp_path}/none-*.tfrecord'; build "
        "records with tools/build_tfrecords.py or fix the pattern":
            ok[:3] + [f"--eval_files={tmp_path}/none-*.tfrecord"] + ok[4:],
    }
    result = subprocess.run([sys.executable, "-c", script, json.dumps(list(cases.values()))],
                            capture_output=True, text=True, env=ENV, cwd=ROOT, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    outcomes = json.loads(result.stdout.strip().splitlines()[-1])
    for message, (status, stderr) in zip(cases, outcomes):
        assert status == 2, (message, stderr)
        assert stderr.strip().splitlines() == [f"finetune: error: {message}"]
    assert not os.path.exists(tmp_path / "out")  # nothing was started


def test_extra_eval_files_parse_name_glob_pairs_and_reject_malformed_ones():
    parsed = config.from_flags(EvaluationConfig, _fresh_flags(
        "--extra_eval_files=unseen=/d/a-*.tfrecord,/d/b-*; other_2 = /e/*"))
    assert parsed.extra_eval_files == (("unseen", "/d/a-*.tfrecord,/d/b-*"),
                                       ("other_2", "/e/*"))
    assert eval_config.parse_extra_eval_files(" ; ") == ()
    for text, message in (("unseen", "is not name=glob"), ("a b=/x", "is not name=glob"),
                          ("unseen=", "is not name=glob"),
                          ("original=/x", "taken by an eval background"),
                          ("u=/x;u=/y", "given twice")):
        with pytest.raises(config.ConfigError, match=message) as e:
            eval_config.parse_extra_eval_files(text)
        assert str(e.value).startswith("--extra_eval_files: ")


def test_a_flag_may_spell_its_field_differently():
    """config.option's flag_default (the flag's type), flag_choices (an enum flag) and
    from_flag, on a config of its own; an overridden flag is not converted."""
    @dataclasses.dataclass
    class Spelled:
        stride: Optional[int] = config.option(
            None, "Stride.", choices=(8, 16), flag_default="keep",
            flag_choices=("keep", "16", "8"), from_flag=lambda v: None if v == "keep" else int(v))
        spec: Optional[Dict[str, Any]] = config.option(
            None, "A JSON object.", flag_default="",
            from_flag=lambda t: json.loads(t) if t else None)
        fraction: Optional[float] = config.option(
            None, "Negative: None.", low=0, high=1, flag_default=-1.0,
            from_flag=lambda v: None if v < 0 else v)

    values = flags.FlagValues()
    config.define_flags(Spelled, values)
    assert values["stride"].parser.enum_values == ["keep", "16", "8"]
    assert values["stride"].default == "keep"
    assert (values["spec"].flag_type(), values["spec"].default) == ("string", "")
    assert (values["fraction"].flag_type(), values["fraction"].default) == ("float", -1.0)
    values(["prog"])
    assert config.from_flags(Spelled, values) == Spelled(None, None, None)
    values(["prog", "--stride=16", '--spec={"depth": 18}', "--fraction=0.25"])
    assert config.from_flags(Spelled, values) == Spelled(16, {"depth": 18}, 0.25)
    values["spec"].value = "{not json"
    assert config.from_flags(Spelled, values, spec={"a": 1}).spec == {"a": 1}
    with pytest.raises(json.JSONDecodeError):
        config.from_flags(Spelled, values)
    with pytest.raises(config.ConfigError, match=r"--stride must be one of 8, 16; got 32"):
        config.check_fields(Spelled(stride=32))
