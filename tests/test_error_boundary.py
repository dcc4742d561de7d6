"""One error boundary: the user's faults end a binary with one line, a bug keeps its traceback.

``errors.run_binary`` turns a :class:`HarlError` (and absl's flag errors, ``UsageError``)
into ``<program>: error: <message>`` and exit status 2; any other exception — a
TensorFlow ``ValueError`` from a shape mismatch inside a step above all — is a bug and must
reach the user with its traceback (exit status 1), not as a one-line "usage" error.
"""
import os
import subprocess
import sys
import time

import pytest
from absl import app

from harl_tf import errors

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ENV = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3", CUDA_VISIBLE_DEVICES="-1")

# A ValueError TensorFlow raises for a shape mismatch while tracing a step (as a broken
# train_step would): reshaping 6 values to [4].
TF_BUG = ("import tensorflow as tf\n"
          "def tf_bug(*args, **kwargs):\n"
          "    return tf.function(lambda x: tf.reshape(x, [4]))(tf.ones([6]))\n")


def _run_binary_in_process(monkeypatch, capsys, main):
    monkeypatch.setattr(sys, "argv", ["prog"])
    with pytest.raises(SystemExit) as exit_info:
        errors.run_binary("prog", main)
    return exit_info.value.code, capsys.readouterr().err


@pytest.mark.parametrize("error", [
    errors.ConfigError("--batch_size must be positive, got 0.\nmore detail"),
    errors.MissingPathError("--train_files='x-*' matches no file"),
    errors.DataError("eval.tfrecord: record 'a/1' has no label"),
    app.UsageError("unexpected arguments: ['x']"),
])
def test_the_users_faults_end_in_one_line_and_status_2(monkeypatch, capsys, error):
    def main(argv):
        raise error

    status, stderr = _run_binary_in_process(monkeypatch, capsys, main)
    assert status == errors.USAGE_EXIT_STATUS == 2
    first_line = str(error).splitlines()[0]
    assert stderr.splitlines() == [f"prog: error: {first_line}"]


def test_a_missing_path_is_still_a_file_not_found_error():
    error = errors.MissingPathError("--images_dir 'x' does not exist")
    assert isinstance(error, FileNotFoundError) and isinstance(error, errors.HarlError)


@pytest.mark.parametrize("bug", [ValueError("Input 0 of layer dense is incompatible"),
                                 FileNotFoundError("/tmp/internal.cache"),
                                 KeyError("step")])
def test_a_bug_is_not_caught(monkeypatch, bug):
    """Plain ValueError / FileNotFoundError (what TensorFlow and Python raise) leave
    run_binary as they are: the interpreter prints their traceback, exit status 1."""
    def main(argv):
        raise bug

    monkeypatch.setattr(sys, "argv", ["prog"])
    with pytest.raises(type(bug)) as raised:
        errors.run_binary("prog", main)
    assert raised.value is bug


def test_a_tensorflow_bug_inside_each_binary_keeps_its_traceback(tmp_path):
    """pretrain, export and finetune, run as users run them (``python -m harl_tf.<name>``)
    with the library call replaced by a TensorFlow shape-mismatch ValueError: exit status
    1, the traceback and TensorFlow's message on stderr, and no ``<binary>: error:`` line."""
    existing = os.path.join(REPO, "setup.py")  # any file satisfies the path checks
    (tmp_path / "run").mkdir()
    cases = {
        "pretrain": ("from harl_tf import training\ntraining.run_pretraining = tf_bug\n",
                     [f"--train_files={existing}", f"--model_dir={tmp_path / 'model'}",
                      "--image_size=32", "--depth=18", "--batch_size=8"]),
        "export": ("from harl_tf import saved_encoder\n"
                   "saved_encoder.export_from_model_dir = tf_bug\n",
                   [f"--model_dir={tmp_path / 'run'}", f"--export_dir={tmp_path / 'e'}"]),
        "finetune": ("from harl_tf.downstream import evaluation\nevaluation.evaluate = tf_bug\n",
                     ["--mode=knn", "--encoder=random", '--encoder_config={"depth": 18}',
                      f"--train_files={existing}", f"--eval_files={existing}",
                      f"--output_dir={tmp_path / 'ft'}"]),
    }
    started = time.time()
    procs = {}
    for name, (patch, args) in cases.items():
        script = (TF_BUG + patch + "import runpy, sys\n"
                  f"sys.argv = [{name!r}] + sys.argv[1:]\n"
                  f"runpy.run_module('harl_tf.{name}', run_name='__main__')\n")
        procs[name] = subprocess.Popen([sys.executable, "-c", script, *args], cwd=REPO,
                                       env=ENV, stdout=subprocess.PIPE,
                                       stderr=subprocess.PIPE, text=True)
    for name, proc in procs.items():
        _, stderr = proc.communicate(timeout=300)
        assert proc.returncode == 1, (name, stderr[-2000:])
        assert "Traceback (most recent call last)" in stderr, (name, stderr[-2000:])
        assert "Cannot reshape a tensor with 6 elements to shape [4]" in stderr, name
        assert f"{name}: error:" not in stderr, name
    print(f"three binaries in {time.time() - started:.1f} s")
