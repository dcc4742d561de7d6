"""Bad flags end every binary with ONE error line on stderr and a non-zero status, fast.

For ``harl_tf.pretrain``, ``harl_tf.export``, ``harl_tf.finetune`` and
``tools.build_tfrecords``: an unknown flag, a value of the wrong type, a value out of
range, a file that does not exist, a flagfile that does not exist (and, for pretraining, a
global batch that does not split over the replicas). TensorFlow's own start-up log lines
are not the binary's output and are left out before counting lines. Every case must
finish well under the time of one training step (20 s, TensorFlow import included): the
checks come before any heavy work. (On a loaded machine the bound is three times what a
bare ``import tensorflow`` takes there.)
"""
import os
import re
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor


REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MAX_SECONDS = 20.0
# TF / absl C++ start-up lines and TF's python INFO log: not the binary's own output.
_TF_LOG = re.compile(r"^(WARNING: All log messages before absl::InitializeLog|"
                     r"[IWE]\d{4} \d\d:\d\d:\d\d|INFO:tensorflow:)")

# Runs pretrain with two logical CPUs, so --strategy=mirrored has two replicas.
_TWO_REPLICAS = (
    "import sys, tensorflow as tf\n"
    "cpu = tf.config.list_physical_devices('CPU')[0]\n"
    "tf.config.set_logical_device_configuration(cpu, [tf.config.LogicalDeviceConfiguration()] * 2)\n"
    "from harl_tf.cli import pretrain\n"
    "sys.argv = ['pretrain'] + sys.argv[1:]\n"
    "pretrain.run()\n")


def _cases(tmp):
    missing = os.path.join(tmp, "does-not-exist")
    records = os.path.join(tmp, "none-*.tfrecord")
    pretrain = ["-m", "harl_tf.pretrain"]
    export = ["-m", "harl_tf.export"]
    finetune = ["-m", "harl_tf.finetune"]
    build = ["-m", "tools.build_tfrecords"]
    ok_pretrain = [f"--train_files={records}", f"--model_dir={tmp}/m"]
    ok_finetune = ["--encoder=random", f"--train_files={records}", f"--eval_files={records}",
                   f"--output_dir={tmp}/ft"]
    return {
        # name: (argv after python, words the error line must contain)
        "pretrain-unknown": (pretrain + ["--bogus_flag=1"], ["bogus_flag"]),
        "pretrain-type": (pretrain + ["--batch_size=eight"], ["--batch_size", "eight"]),
        "pretrain-range": (pretrain + ok_pretrain + ["--momentum=1.5"], ["--momentum", "1.5"]),
        "pretrain-missing-file": (pretrain + ok_pretrain, ["--train_files", records]),
        "pretrain-flagfile": (pretrain + [f"--flagfile={missing}.cfg"], [missing]),
        "pretrain-replicas": (["-c", _TWO_REPLICAS, "--strategy=mirrored", "--batch_size=7",
                               "--train_files=" + os.path.join(REPO, "setup.py"),
                               f"--model_dir={tmp}/r", "--image_size=32", "--depth=18"],
                              ["--batch_size=7", "2 replicas"]),
        "export-unknown": (export + ["--bogus_flag"], ["bogus_flag"]),
        "export-type": (export + ["--step=last"], ["--step", "last"]),
        "export-range": (export + [f"--model_dir={tmp}", f"--export_dir={tmp}/e", "--step=-3"],
                         ["--step", "-3"]),
        "export-enum": (export + ["--output_stride=4"], ["--output_stride", "4"]),
        "export-missing-file": (export + [f"--model_dir={missing}", f"--export_dir={tmp}/e"],
                                ["--model_dir", missing]),
        "export-required": (export + [f"--model_dir={tmp}"], ["--export_dir"]),
        "export-flagfile": (export + [f"--flagfile={missing}.cfg"], [missing]),
        "finetune-unknown": (finetune + ["--bogus_flag=2"], ["bogus_flag"]),
        "finetune-type": (finetune + ["--batch_size=big"], ["--batch_size", "big"]),
        "finetune-range": (finetune + ok_finetune + ["--label_fraction=1.5"],
                           ["--label_fraction", "1.5"]),
        "finetune-missing-file": (finetune + ok_finetune, ["--train_files", records]),
        "finetune-flagfile": (finetune + [f"--flagfile={missing}.cfg"], [missing]),
        "build-unknown": (build + ["--bogus_flag"], ["bogus_flag"]),
        "build-type": (build + ["--num_shards=many"], ["--num_shards", "many"]),
        "build-range": (build + ["--source=synthetic", f"--output_dir={tmp}/b",
                                 "--num_partitions=2", "--partition_index=2"],
                        ["--partition_index", "2"]),
        "build-quality": (build + ["--source=synthetic", f"--output_dir={tmp}/b",
                                   "--jpeg_quality=0"], ["--jpeg_quality", "0"]),
        "build-json": (build + ["--source=synthetic", f"--output_dir={tmp}/b",
                                "--mask_method=conventional", "--mask_params={sigma"],
                       ["--mask_params"]),
        "build-missing-file": (build + ["--source=folder", f"--images_dir={missing}",
                                        f"--output_dir={tmp}/b"], ["--images_dir", missing]),
        "build-required": (build + ["--source=synthetic"], ["--output_dir"]),
        "build-flagfile": (build + [f"--flagfile={missing}.cfg"], [missing]),
        "masks-deep-model": (["-m", "tools.generate_masks", "--images_dir=docs/images",
                              f"--masks_dir={tmp}/dm", "--method=deep",
                              f"--mask_model={missing}"], ["mask model", missing]),
        "saliency-encoder": (["-m", "tools.train_saliency_head", f"--encoder={missing}",
                              "--images_dir=docs/images", f"--output={tmp}/sm"],
                             ["encoder", missing]),
    }


# Binaries run through harl_tf.errors.run_binary: the line is "<program>: error: ...".
_PROGRAM = {"export": "export", "build": "build_tfrecords", "masks": "generate_masks",
            "saliency": "train_saliency_head"}


def binary_lines(stderr):
    """The non-empty stderr lines a binary wrote itself (TF's start-up log left out)."""
    return [line for line in stderr.splitlines() if line.strip() and not _TF_LOG.match(line)]


def _run(argv):
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3", PYTHONPATH=REPO, CUDA_VISIBLE_DEVICES="")
    started = time.time()
    done = subprocess.run([sys.executable, *argv], cwd=REPO, env=env, capture_output=True,
                          text=True, timeout=120)
    return done, time.time() - started


def test_every_bad_flag_ends_with_one_error_line_quickly(tmp_path):
    cases = _cases(str(tmp_path))
    # On a loaded machine even the import is slow: the bound scales with it.
    _, import_seconds = _run(["-c", "import tensorflow"])
    limit = max(MAX_SECONDS, 3.0 * import_seconds)
    with ThreadPoolExecutor(max_workers=2) as pool:
        results = dict(zip(cases, pool.map(_run, [argv for argv, _ in cases.values()])))
    problems = []
    for name, (done, seconds) in results.items():
        lines = binary_lines(done.stderr)
        words = cases[name][1]
        if done.returncode == 0:
            problems.append(f"{name}: exit status 0")
        elif len(lines) != 1 or "error" not in lines[0] or "Traceback" in done.stderr:
            problems.append(f"{name}: expected one error line, got {lines!r}")
        elif not all(word in lines[0] for word in words):
            problems.append(f"{name}: {lines[0]!r} does not name {words}")
        elif name.split("-")[0] in _PROGRAM and not lines[0].startswith(
                f"{_PROGRAM[name.split('-')[0]]}: error: "):
            problems.append(f"{name}: {lines[0]!r} is not '<program>: error: ...'")
        if seconds > limit:
            problems.append(f"{name}: took {seconds:.1f} s (import tensorflow: "
                            f"{import_seconds:.1f} s)")
    assert not problems, "\n".join(problems)
    # Nothing was built or trained on the way to the error.
    assert not os.path.exists(tmp_path / "b" / "manifest.json")
    assert not os.path.exists(tmp_path / "r" / "checkpoints")
