"""Packaging: every install the README documents pulls in exactly one TensorFlow."""
import pathlib
import re
from unittest import mock

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
TF_DISTRIBUTIONS = {"tensorflow", "tensorflow-cpu", "tensorflow-gpu", "tf-nightly"}


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


def test_console_scripts_point_at_existing_modules():
    kwargs = _setup_kwargs()
    for script in kwargs["entry_points"]["console_scripts"]:
        name, target = (part.strip() for part in script.split("="))
        module, function = target.split(":")
        path = ROOT / (module.replace(".", "/") + ".py")
        assert path.exists(), f"{name}: {path} is missing"
        assert re.search(rf"^def {function}\(", path.read_text(), re.M), f"{name}: no {function}()"
