"""The import graph of harl_tf: no circle, and every import runs down the layer table.

Every ``import`` / ``from ... import`` of a harl_tf module in every module of the package is
an edge, the ones inside functions included (a function-local import hides an edge from
the reader, not from this test). The layers are the documented architecture
(docs/ARCHITECTURE.md): a module may import modules of its own layer or of lower layers,
never of a higher one; within a layer the imports must not form a circle. A new module
gets its line in :data:`LAYERS` (the test fails until it has one).
"""
import ast
import fnmatch
import os
import re

import pytest

ROOT = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "harl_tf")

# (layer, what it is, modules). A name ending in ".*" is a whole package (its __init__
# too); an exact name takes precedence over a package pattern.
LAYERS = [
    (0, "foundations", ["harl_tf", "harl_tf.errors", "harl_tf.atomic", "harl_tf.progress"]),
    (1, "formulas, formats, strategy: no configuration, no pipeline",
     ["harl_tf.schedules", "harl_tf.losses", "harl_tf.lars", "harl_tf.distribute",
      "harl_tf.data", "harl_tf.data.colour", "harl_tf.data.mask_png",
      "harl_tf.data.example_encoding", "harl_tf.data.schema", "harl_tf.data.synthetic"]),
    (2, "configurations (TensorFlow-free)", ["harl_tf.config", "harl_tf.eval_config"]),
    (3, "heuristic masks", ["harl_tf.masks", "harl_tf.masks.conventional",
                            "harl_tf.masks.quality", "harl_tf.masks.folder"]),
    (4, "records: sources, building, views, input pipelines", ["harl_tf.data.*"]),
    (5, "models", ["harl_tf.models.*"]),
    (6, "pretraining and export",
     ["harl_tf.build", "harl_tf.bootstrap", "harl_tf.checkpoints", "harl_tf.summaries",
      "harl_tf.hooks", "harl_tf.training", "harl_tf.saved_encoder", "harl_tf.onnx_export"]),
    (7, "users of a trained encoder or of records",
     ["harl_tf.downstream.*", "harl_tf.masks.deep.*", "harl_tf.viz"]),
    (8, "binaries", ["harl_tf.cli.*", "harl_tf.pretrain", "harl_tf.export",
                     "harl_tf.finetune"]),
]

# Imports that still run upward, each waiting for a change in a module another change is
# editing now. The test fails when one disappears too, so that the list only shrinks.
KNOWN_UPWARD = set()


def module_files():
    """{module name: path} of every .py file of the package."""
    found = {}
    for directory, _, files in os.walk(ROOT):
        for name in files:
            if not name.endswith(".py"):
                continue
            path = os.path.join(directory, name)
            parts = os.path.relpath(path, os.path.dirname(ROOT))[:-3].split(os.sep)
            if parts[-1] == "__init__":
                parts = parts[:-1]
            found[".".join(parts)] = path
    return found


def import_graph(modules):
    """{module: {imported harl_tf module}}, function-local imports included."""
    def resolve(name):
        while name and name not in modules:
            name = name.rpartition(".")[0]
        return name

    graph = {}
    for module, path in modules.items():
        with open(path, encoding="utf-8") as f:
            tree = ast.parse(f.read(), path)
        package = module if path.endswith("__init__.py") else module.rpartition(".")[0]
        edges = set()
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                edges.update(resolve(a.name) for a in node.names
                             if a.name.split(".")[0] == "harl_tf")
            elif isinstance(node, ast.ImportFrom):
                if node.level:
                    base = package.split(".")[:len(package.split(".")) - node.level + 1]
                    source = ".".join(base + ([node.module] if node.module else []))
                else:
                    source = node.module or ""
                if source.split(".")[0] != "harl_tf":
                    continue
                for alias in node.names:  # `from harl_tf.data import schema`: the module
                    full = f"{source}.{alias.name}"
                    edges.add(full if full in modules else resolve(source))
        edges.discard(module)
        graph[module] = edges
    return graph


def layer_of(module):
    for layer, _, names in LAYERS:
        if module in names:
            return layer
    for layer, _, names in LAYERS:
        if any(n.endswith(".*") and (fnmatch.fnmatch(module, n) or module == n[:-2])
               for n in names):
            return layer
    return None


def cycles(graph):
    """Strongly connected components with more than one module (Tarjan)."""
    index, low, stack, on_stack, found = {}, {}, [], set(), []

    def visit(v):
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph.get(v, ())):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return found


@pytest.fixture(scope="module")
def graph():
    return import_graph(module_files())


def test_the_graph_sees_function_local_and_package_imports(graph):
    # saved_encoder imports checkpoints at the top, masks.quality imports the schema
    # inside a function (TensorFlow only when records are read), and masks.deep's
    # package imports its modules: all are edges.
    assert "harl_tf.checkpoints" in graph["harl_tf.saved_encoder"]
    assert "harl_tf.data.schema" in graph["harl_tf.masks.quality"]
    assert "harl_tf.masks.deep.inference" in graph["harl_tf.masks.deep"]
    assert sum(map(len, graph.values())) > 150  # 218 edges among 77 modules today


def test_every_module_has_a_layer(graph):
    assert [m for m in sorted(graph) if layer_of(m) is None] == []


def test_no_import_circle(graph):
    assert cycles(graph) == []
    # The check finds one: an edge back from a module's import to it closes a circle.
    looped = dict(graph, **{"harl_tf.data.schema": graph["harl_tf.data.schema"]
                            | {"harl_tf.masks.quality"}})
    assert ["harl_tf.data.schema", "harl_tf.masks.quality"] in cycles(looped)


def test_every_import_runs_to_the_same_or_a_lower_layer(graph):
    upward = {(a, b) for a, targets in graph.items() for b in targets
              if layer_of(b) > layer_of(a)}
    described = sorted(f"{a} (layer {layer_of(a)}) imports {b} (layer {layer_of(b)})"
                       for a, b in upward - KNOWN_UPWARD)
    assert described == []
    assert upward & KNOWN_UPWARD == KNOWN_UPWARD, "fixed: remove it from KNOWN_UPWARD"


def test_every_module_is_named_in_the_architecture_page(graph):
    """docs/ARCHITECTURE.md lists the package one line per module: every module file's name
    (``context_head``, ``beam_flags``, ...) appears in its Modules block, so a new module
    cannot land unexplained."""
    with open(os.path.join(os.path.dirname(ROOT), "docs", "ARCHITECTURE.md"),
              encoding="utf-8") as f:
        page = f.read()
    block = page[page.index("## Modules"):page.index("## Layers")]
    words = set(re.findall(r"[A-Za-z_][A-Za-z0-9_]*", block))
    stems = {name.rsplit(".", 1)[-1] for name in graph if "." in name}
    assert len(stems) > 60
    assert sorted(stems - words) == []
