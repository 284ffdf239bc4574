"""The package's shape: no module imports one that imports it back (directly or through others), and the
dataset stages (research/data) and the training input path (research/inputs) stay apart: a stage never
imports the input path, the input path never imports a stage, a CLI or the trainer."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent / "research"


def module_name(path: Path) -> str:
    parts = path.relative_to(ROOT.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imports_of(path: Path, modules: set[str]) -> set[str]:
    """research.* modules that `path` imports anywhere (top level, functions, TYPE_CHECKING blocks)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module:
            names = [node.module] + [f"{node.module}.{a.name}" for a in node.names]
        else:
            continue
        found |= {n for n in names if n in modules}
    return found


def import_graph() -> dict[str, set[str]]:
    files = {module_name(p): p for p in ROOT.rglob("*.py")}
    modules = set(files)
    graph = {m: imports_of(p, modules) - {m} for m, p in files.items()}
    for m in graph:  # a package's __init__ is not a dependency of its own submodules' imports
        graph[m] = {d for d in graph[m] if not m.startswith(d + ".")}
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    found, state = [], {}

    def visit(node: str, stack: list[str]) -> None:
        state[node] = "open"
        for dep in sorted(graph.get(node, ())):
            if state.get(dep) == "open":
                found.append(stack[stack.index(dep):] + [dep])
            elif dep not in state:
                visit(dep, stack + [dep])
        state[node] = "done"

    for node in sorted(graph):
        if node not in state:
            visit(node, [node])
    return found


def test_no_import_cycles():
    graph = import_graph()
    assert len(graph) > 20, "the walk found the package"
    assert cycles(graph) == []


def test_the_checker_finds_a_cycle():
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == [["a", "b", "c", "a"]]


@pytest.mark.parametrize("module", ["research.schedules", "research.models", "research.errors"])
def test_low_level_modules_do_not_import_the_config(module):
    """Schedules and models take plain values (as timm's factories do); only errors is shared."""
    graph = import_graph()
    assert "research.config" not in graph[module]


# research/data: the dataset stages, and what they share with the rest of the package (the decode rule, the
# image grid, the parallel map, the output guard, reading a version). Anything that feeds the trainer (the decoded-image
# store, the loaders, stored trunk activations) lives in research/inputs instead.
DATA_STAGES = {"research.data.cli", "research.data.emoji", "research.data.make_classmap", "research.data.scan",
               "research.data.photo_features", "research.data.clean", "research.data.split", "research.data.sources",
               "research.data.offline_augment"}
DATA_SHARED = {"research.data", "research.data.image", "research.data.grid", "research.data.pool",
               "research.data.outputs", "research.data.versions"}
# what the input path must never reach, directly or through others: a stage, a command-line entry, the trainer
INPUTS_MUST_NOT_REACH = DATA_STAGES | {"research.__main__", "research.cli", "research.train"}


def reachable(graph: dict[str, set[str]], start: str) -> set[str]:
    seen, todo = set(), [start]
    while todo:
        for dep in graph.get(todo.pop(), ()):
            if dep not in seen:
                seen.add(dep)
                todo.append(dep)
    return seen


def in_package(module: str, package: str) -> bool:
    return module == package or module.startswith(package + ".")


def layering_violations(graph: dict[str, set[str]]) -> list[str]:
    """Every break of the data/inputs rule, one line each; [] when the rule holds."""
    found = []
    for m in sorted(graph):
        if in_package(m, "research.data") and m not in DATA_STAGES | DATA_SHARED:
            found.append(f"{m}: research/data holds only the dataset stages and what they share "
                         "(DATA_STAGES, DATA_SHARED); training input belongs in research/inputs")
        if in_package(m, "research.data"):
            found += [f"{m} -> {d}: a dataset stage must not import the training input path"
                      for d in sorted(reachable(graph, m)) if in_package(d, "research.inputs")]
        if in_package(m, "research.inputs"):
            found += [f"{m} -> {d}: the training input path must not import a stage, a CLI or the trainer"
                      for d in sorted(reachable(graph, m))
                      if d in INPUTS_MUST_NOT_REACH or d.endswith(".cli") or in_package(d, "research.sweep")]
    return found


def test_dataset_stages_and_training_inputs_stay_apart():
    graph = import_graph()
    assert {"research.inputs", "research.inputs.decoded", "research.inputs.loaders",
            "research.inputs.features"} <= set(graph), "the input path is where this test expects it"
    assert layering_violations(graph) == []


def test_the_layering_check_finds_a_loader_in_data():
    ok = {"research.data.split": {"research.data.image"}, "research.inputs.loaders": {"research.data.image"}}
    assert layering_violations(ok) == []
    loader_back_in_data = {**ok, "research.data.batches": {"research.data.image"}}
    assert [v.split(":")[0] for v in layering_violations(loader_back_in_data)] == ["research.data.batches"]
    stage_uses_inputs = {**ok, "research.data.split": {"research.inputs.loaders"}}
    assert layering_violations(stage_uses_inputs) == [
        "research.data.split -> research.inputs.loaders: a dataset stage must not import the training input path"]
    inputs_use_train = {**ok, "research.inputs.loaders": {"research.models"}, "research.models": {"research.train"}}
    assert layering_violations(inputs_use_train) == [
        "research.inputs.loaders -> research.train: the training input path must not import a stage, a CLI or "
        "the trainer"]


# The floors, lowest first. A module may import its own floor and those below, never one above. The ground floor
# is what every module may import: it imports nothing of the project above it. The store layer reads and locks the
# tracking store. Then the dataset stages (research/data), then everything else (the trainer's config included).
GROUND = {"research.errors", "research.locks", "research.progress", "research.configfile", "research.data.image",
          "research.data.grid"}
STORE = {"research.store", "research.runquery", "research.tracking", "research.checkpoints"}


def floor_of(module: str) -> int:
    if module in GROUND:
        return 0
    if module in STORE:
        return 1
    return 2 if in_package(module, "research.data") else 3


def imports_pointing_up(graph: dict[str, set[str]]) -> list[str]:
    return [f"{m} -> {d}" for m in sorted(graph) for d in sorted(graph[m]) if floor_of(d) > floor_of(m)]


def test_no_import_points_back_up_and_data_stages_do_not_import_the_trainers_config():
    graph = import_graph()
    assert GROUND | STORE <= set(graph), "the floors are where this test expects them"
    assert imports_pointing_up(graph) == []
    assert [m for m in sorted(graph) if in_package(m, "research.data") and "research.config" in graph[m]] == []


def test_the_floor_check_finds_an_import_pointing_up():
    assert imports_pointing_up({"research.store": {"research.data.pool"}, "research.data.clean": {"research.eda"},
                                "research.eda": {"research.data.grid"}}) == [
        "research.data.clean -> research.eda", "research.store -> research.data.pool"]


def test_no_private_name_is_imported_across_modules():
    found = []
    for path in sorted(ROOT.rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("research"):
                found += [f"{module_name(path)}: from {node.module} import {a.name}" for a in node.names
                          if a.name.startswith("_")]
    assert found == []
