"""Imports run one way (issue 33): gptq < component < utils < methods < pipeline < the top-level
modules (compress.py, evaluater.py, lora.py, ...), with no cycle anywhere and nothing importing
compress.py. Every import counts, at the top of a module or inside a function, relative or not;
only importlib's string imports (a task config's `!function`) are out of sight.
"""
from __future__ import annotations

import ast
import os
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
# lowest first; top-level modules above them all. component/ (the nn.Modules a compressed model is made
# of: LowRankLinear, QuantLinear, which packs with gptq/) sits below utils/ because the model plumbing
# (utils.model, utils.io, utils.hf_remote) builds, loads and saves models made of them.
LAYERS = ("gptq", "component", "utils", "methods", "pipeline")
TOP_LEVEL = len(LAYERS)
# consumers and data, not modules; vllm_plugin/ is a package of its own, installed into vLLM's venv
NOT_PROJECT = {"tests", "scripts", "docs", "data", "tasks", "shared", "out", "vllm_plugin"}
ENTRY_POINT = "compress"  # the CLI: the top of the graph


def project_modules(root: Path) -> dict[str, Path]:
    """Dotted module name -> file, for every .py file of the project (packages as their name)."""
    modules = {}
    for directory, subdirectories, files in os.walk(root):
        relative = Path(directory).relative_to(root)
        subdirectories[:] = sorted(d for d in subdirectories if not d.startswith((".", "__"))
                                   and not (relative == Path(".") and d in NOT_PROJECT))
        for file in sorted(f for f in files if f.endswith(".py")):
            parts = (*relative.parts, file[:-3])
            modules[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = Path(directory) / file
    return modules


def _resolve(name: str, modules: dict[str, Path]) -> str | None:
    """The project module `name` is or lies in (its longest dotted prefix that is one), else None."""
    while name:
        if name in modules:
            return name
        name = name.rpartition(".")[0]
    return None


def imports_of(name: str, path: Path, modules: dict[str, Path]) -> set[str]:
    """The project modules `name` imports anywhere in its file (functions included)."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"), str(path))):
        if isinstance(node, ast.Import):
            found.update(_resolve(alias.name, modules) for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:  # relative: from the package, level - 1 packages up
                anchor = package.split(".") if package else []
                anchor = anchor[:len(anchor) - (node.level - 1)]
                base = ".".join([*anchor, base] if base else anchor)
            for alias in node.names:  # `from pkg import submodule` imports the submodule
                found.add(_resolve(f"{base}.{alias.name}", modules) if f"{base}.{alias.name}" in modules
                          else _resolve(base, modules))
    found.discard(None)
    found.discard(name)
    return found


def import_graph(root: Path = ROOT) -> dict[str, set[str]]:
    modules = project_modules(root)
    return {name: imports_of(name, path, modules) for name, path in modules.items()}


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """One cycle (a -> b -> ... -> a) through every group of modules that reach each other."""
    return [_cycle_in(group, graph) for group in loops(graph)]


def loops(graph: dict[str, set[str]]) -> list[set[str]]:
    """The strongly connected groups of modules (Tarjan) that hold a cycle."""
    index, low, stack, on_stack, groups = {}, {}, [], set(), []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for target in sorted(graph.get(node, ())):
            if target not in index:
                visit(target)
                low[node] = min(low[node], low[target])
            elif target in on_stack:
                low[node] = min(low[node], index[target])
        if low[node] == index[node]:
            group = set()
            while True:
                member = stack.pop()
                on_stack.discard(member)
                group.add(member)
                if member == node:
                    break
            if len(group) > 1 or node in graph.get(node, ()):
                groups.append(group)

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return groups


def _cycle_in(group: set[str], graph: dict[str, set[str]]) -> list[str]:
    """A path from the group's first module back to itself inside the group (breadth first: shortest)."""
    start = min(group)
    paths, seen = [[start]], set()
    while paths:
        path = paths.pop(0)
        for target in sorted(graph.get(path[-1], ()) & group):
            if target == start:
                return [*path, start]
            if target not in seen:
                seen.add(target)
                paths.append([*path, target])
    raise AssertionError(f"no cycle through {start} in {sorted(group)}")


def layer_of(module: str) -> int:
    package = module.split(".")[0]
    if "." not in module and package not in LAYERS:
        return TOP_LEVEL
    if package not in LAYERS:
        raise ValueError(f"{module}: package {package!r} has no place in the layer order {LAYERS}: "
                         f"add it to tests/test_imports.py's LAYERS")
    return LAYERS.index(package)


def upward_imports(graph: dict[str, set[str]]) -> list[str]:
    """Every import of a higher layer than the importer's own, and every import of the CLI."""
    found = []
    for module in sorted(graph):
        for target in sorted(graph[module]):
            if target == ENTRY_POINT:
                found.append(f"{module} imports {ENTRY_POINT} (the CLI: nothing imports it)")
            elif layer_of(target) > layer_of(module):
                found.append(f"{module} ({_layer_name(module)}) imports {target} ({_layer_name(target)}), "
                             f"a layer above it")
    return found


def _layer_name(module: str) -> str:
    return (LAYERS + ("top-level",))[layer_of(module)]


# ---------------------------------------------------------------------------------------- the project

def test_the_project_has_no_import_cycle():
    graph = import_graph()
    found = [f"{' -> '.join(_cycle_in(group, graph))} (in one loop: {', '.join(sorted(group))})"
             for group in loops(graph)]
    assert not found, "import cycles: " + "; ".join(found)


def test_no_module_imports_a_layer_above_it_or_the_cli():
    assert not upward_imports(import_graph()), "\n".join(upward_imports(import_graph()))


def test_the_graph_sees_the_project_and_imports_inside_functions():
    graph = import_graph()
    # modules of every layer, and no consumer (tests, scripts) among them
    assert {layer_of(m) for m in graph} == set(range(TOP_LEVEL + 1))
    assert not any(m.startswith(("tests", "scripts")) for m in graph)
    # compress.py imports these only inside its functions (its --help loads no torch)
    assert {"evaluater", "lora", "pipeline.steps", "utils.model"} <= graph["compress"]
    assert "pipeline.session" in graph["evaluater"]  # evaluater.load_step_model's import inside the function


def test_the_vllm_plugin_imports_nothing_of_the_project():
    # it is pip-installed into vLLM's own venv, where none of this project's modules can be imported
    modules = project_modules(ROOT)
    plugin = ROOT / "vllm_plugin"
    files = sorted(plugin.rglob("*.py"))
    assert len(files) >= 2
    for path in files:
        name = ".".join(path.relative_to(plugin).with_suffix("").parts)
        assert not imports_of(name, path, modules), f"{path} imports {imports_of(name, path, modules)}"


# ---------------------------------------------------------------------------------------- the checker

def test_the_checker_names_a_cycle_and_an_upward_import():
    graph = {"utils.a": {"utils.b"}, "utils.b": {"methods.c"}, "methods.c": {"utils.a", "gptq.d"},
             "gptq.d": set(), "pipeline.e": {"methods.c"}, "evaluater": {"compress", "pipeline.e"},
             "compress": {"evaluater"}, "lora": {"lora"}}
    found = cycles(graph)
    assert sorted(found) == [["compress", "evaluater", "compress"], ["lora", "lora"],
                             ["methods.c", "utils.a", "utils.b", "methods.c"]]
    assert upward_imports(graph) == ["evaluater imports compress (the CLI: nothing imports it)",
                                     "utils.b (utils) imports methods.c (methods), a layer above it"]
    assert cycles({k: v - {"utils.a", "compress", "lora"} for k, v in graph.items()}) == []
    with pytest.raises(ValueError, match="add it to"):
        layer_of("newpackage.module")


def test_the_parser_finds_imports_in_functions_relative_and_from_packages(tmp_path):
    files = {
        "utils/__init__.py": "",
        "utils/low.py": "import os\n\ndef f():\n    from methods.high import g  # upward, hidden in a function\n",
        "utils/sibling.py": "from . import low\nfrom .low import f\n",
        "methods/__init__.py": "from methods.high import g\n",
        "methods/high.py": "import utils.low\n",
        "api.py": "from methods import g\nimport utils\n",
        "tests/test_x.py": "import compress\n",  # a consumer: not a module of the graph
    }
    for name, text in files.items():
        (tmp_path / name).parent.mkdir(exist_ok=True)
        (tmp_path / name).write_text(text)
    graph = import_graph(tmp_path)
    assert graph == {"utils": set(), "utils.low": {"methods.high"}, "utils.sibling": {"utils.low"},
                     "methods": {"methods.high"}, "methods.high": {"utils.low"}, "api": {"methods", "utils"}}
    assert cycles(graph) == [["methods.high", "utils.low", "methods.high"]]
    assert upward_imports(graph) == ["utils.low (utils) imports methods.high (methods), a layer above it"]
