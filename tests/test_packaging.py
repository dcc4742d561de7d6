"""Packaging: every install the README documents pulls in exactly one TensorFlow; only
``harl_tf`` is installed, and every program is reachable both as a console script and, from
a source checkout, as ``python -m tools.<name>``."""
import os
import pathlib
import re
import shutil
import subprocess
import sys
import zipfile
from concurrent.futures import ThreadPoolExecutor
from unittest import mock

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
TF_DISTRIBUTIONS = {"tensorflow", "tensorflow-cpu", "tensorflow-gpu", "tf-nightly"}
# TF / absl C++ start-up lines and TF's python INFO log: not the program's own output.
_TF_LOG = re.compile(r"^(WARNING: All log messages before absl::InitializeLog|"
                     r"[IWE]\d{4} \d\d:\d\d:\d\d|INFO:tensorflow:)")


def _setup_kwargs():
    captured = {}
    with mock.patch("setuptools.setup", side_effect=lambda **kw: captured.update(kw)):
        source = (ROOT / "setup.py").read_text()
        namespace = {"__file__": str(ROOT / "setup.py"), "__name__": "__main__"}
        cwd = pathlib.Path.cwd()
        try:
            import os
            os.chdir(ROOT)
            exec(compile(source, "setup.py", "exec"), namespace)
        finally:
            os.chdir(cwd)
    return captured


def _name(requirement):
    return re.split(r"[\[<>=!~; ]", requirement, maxsplit=1)[0].lower()


def _documented_extras():
    readme = (ROOT / "README.md").read_text()
    combos = set(re.findall(r'pip install[^\n]*?-e\s+"?\.\[([a-z,]+)\]"?', readme))
    return {tuple(combo.split(",")) for combo in combos}


def test_readme_documents_cpu_and_gpu_installs():
    combos = _documented_extras()
    assert any("cpu" in c for c in combos)
    assert any("gpu" in c for c in combos)


@pytest.mark.parametrize("combo", sorted(_documented_extras()))
def test_each_documented_install_has_exactly_one_tensorflow(combo):
    kwargs = _setup_kwargs()
    requirements = list(kwargs["install_requires"])
    for extra in combo:
        requirements += kwargs["extras_require"][extra]
    tensorflows = {_name(r) for r in requirements} & TF_DISTRIBUTIONS
    assert len(tensorflows) == 1, (combo, tensorflows)


def test_tensorflow_is_pinned_to_2_21():
    kwargs = _setup_kwargs()
    for extra in ("cpu", "gpu"):
        (requirement,) = kwargs["extras_require"][extra]
        assert requirement.endswith("==2.21.0"), requirement


def _console_scripts():
    """``{script name: (module, function)}`` from setup.py."""
    scripts = {}
    for script in _setup_kwargs()["entry_points"]["console_scripts"]:
        name, target = (part.strip() for part in script.split("="))
        scripts[name] = tuple(target.split(":"))
    return scripts


def _shims():
    """The tools/<name>.py entry points of a source checkout (the quickstart excepted: it
    is a checkout-only script of its own)."""
    return sorted(p.stem for p in (ROOT / "tools").glob("*.py")
                  if p.stem not in ("__init__", "quickstart"))


def test_console_scripts_point_at_existing_modules_inside_the_package():
    for name, (module, function) in _console_scripts().items():
        assert module.startswith("harl_tf."), f"{name}: {module} is outside harl_tf"
        path = ROOT / (module.replace(".", "/") + ".py")
        assert path.exists(), f"{name}: {path} is missing"
        assert re.search(rf"^def {function}\(", path.read_text(), re.M), f"{name}: no {function}()"


def test_every_tool_has_a_console_script_and_a_checkout_entry_point():
    targets = {module for module, _ in _console_scripts().values()}
    for tool in _shims():
        assert f"harl_tf.cli.{tool}" in targets, tool
        shim = (ROOT / "tools" / f"{tool}.py").read_text()
        assert f"from harl_tf.cli.{tool} import run" in shim, tool
        assert "sys.path" not in shim, tool


def test_only_harl_tf_is_installed():
    packages = _setup_kwargs()["packages"]
    assert "harl_tf" in packages and "harl_tf.cli" in packages and "harl_tf.masks.deep" in packages
    assert [p for p in packages if p != "harl_tf" and not p.startswith("harl_tf.")] == []


def test_the_wheel_holds_harl_tf_and_no_top_level_tools(tmp_path):
    source = tmp_path / "src"
    source.mkdir()
    for name in ("setup.py", "README.md"):
        shutil.copy(ROOT / name, source / name)
    shutil.copytree(ROOT / "harl_tf", source / "harl_tf",
                    ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
    shutil.copytree(ROOT / "tools", source / "tools",  # present, and must stay out
                    ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
    built = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q",
         "-w", str(tmp_path / "dist"), str(source)],
        capture_output=True, text=True, timeout=600)
    assert built.returncode == 0, built.stderr[-2000:]
    (wheel,) = (tmp_path / "dist").glob("harl_tf-*.whl")
    with zipfile.ZipFile(wheel) as archive:
        names = archive.namelist()
        info = next(n for n in names if n.endswith(".dist-info/top_level.txt"))
        top_level = archive.read(info).decode().split()
        entry_points = archive.read(info.replace("top_level.txt", "entry_points.txt")).decode()
    assert top_level == ["harl_tf"]
    assert {n.split("/")[0] for n in names} == {"harl_tf", info.split("/")[0]}
    assert "harl_tf/cli/build_tfrecords.py" in names and "harl_tf/masks/deep/encoder.py" in names
    for name, (module, _) in _console_scripts().items():
        assert f"{name} = {module}:" in entry_points
        assert module.replace(".", "/") + ".py" in names, name


def _first_line(argv):
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3", CUDA_VISIBLE_DEVICES="")
    done = subprocess.run([sys.executable, *argv], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=300)
    lines = [line for line in done.stderr.splitlines()
             if line.strip() and not _TF_LOG.match(line)]
    return done.returncode, lines, done.stderr


def test_console_scripts_and_checkout_entry_points_report_bad_flags_alike():
    """Each console script's target (run as the installed script runs it) and each
    ``python -m tools.<name>`` end a bad flag with ONE line ``<program>: error: …``."""
    runs = {}
    for name, (module, function) in _console_scripts().items():
        program = name[len("harl-"):].replace("-", "_")
        code = (f"import sys; sys.argv[0] = {name!r}; "
                f"from {module} import {function}; {function}()")
        runs[f"script {name}"] = (program, ["-c", code, "--bogus_flag=1"])
    for tool in _shims():
        runs[f"python -m tools.{tool}"] = (tool, ["-m", f"tools.{tool}", "--bogus_flag=1"])
    with ThreadPoolExecutor(max_workers=2) as pool:
        results = dict(zip(runs, pool.map(_first_line, [argv for _, argv in runs.values()])))
    problems = []
    for key, (status, lines, stderr) in results.items():
        program = runs[key][0]
        if (status != 2 or len(lines) != 1 or "Traceback" in stderr
                or not lines[0].startswith(f"{program}: error: ") or "bogus_flag" not in lines[0]):
            problems.append(f"{key}: status {status}, {lines!r}")
    assert not problems, "\n".join(problems)


def test_a_missing_required_flag_names_the_flag():
    status, lines, _ = _first_line(["-m", "tools.build_tfrecords", "--source=synthetic"])
    assert status == 2 and len(lines) == 1, lines
    assert lines[0].startswith("build_tfrecords: error: ") and "--output_dir" in lines[0]
