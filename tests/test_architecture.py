"""The import structure: one-way layers, no cycles between sdtune's modules or packages.

The graph is built from the source text (the AST), not by importing: every `import` and `from ...
import` of an sdtune module counts, at module level and inside functions alike (an import moved into
a function still couples the two modules; it only hides the cycle from the interpreter).
"""

from __future__ import annotations

import ast
from pathlib import Path

import sdtune

SRC = Path(sdtune.__file__).resolve().parent


def _module_names() -> dict[str, Path]:
    names = {}
    for path in SRC.rglob("*.py"):
        parts = list(path.relative_to(SRC.parent).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts.pop()
        names[".".join(parts)] = path
    return names


def _imported(node: ast.Import | ast.ImportFrom, module: str, is_package: bool, known: dict[str, Path]) -> set[str]:
    """The sdtune modules an import statement names: `from a import b` is module a.b when that
    exists, else a (b is then a name defined in a)."""
    def known_prefix(name: str) -> str | None:
        while name and name not in known:
            name = name.rpartition(".")[0]
        return name or None

    if isinstance(node, ast.Import):
        return {m for m in (known_prefix(a.name) for a in node.names if a.name.split(".")[0] == "sdtune") if m}
    if node.level:  # relative: `.` is the module's own package
        package = module.split(".") if is_package else module.split(".")[:-1]
        base = ".".join(package[:len(package) - node.level + 1] + ([node.module] if node.module else []))
    else:
        base = node.module or ""
    if base.split(".")[0] != "sdtune":
        return set()
    found = set()
    for alias in node.names:
        target = f"{base}.{alias.name}" if f"{base}.{alias.name}" in known else known_prefix(base)
        if target:
            found.add(target)
    return found


def import_graph() -> dict[str, set[str]]:
    """module -> the sdtune modules it imports anywhere in its source."""
    known = _module_names()
    graph = {}
    for module, path in known.items():
        is_package = path.name == "__init__.py"
        edges: set[str] = set()
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"), str(path))):
            if isinstance(node, (ast.Import, ast.ImportFrom)):
                edges |= _imported(node, module, is_package, known)
        edges.discard(module)
        graph[module] = edges
    return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One cycle as [a, b, ..., a], or None (depth-first search, white/grey/black)."""
    state: dict[str, int] = {}  # 1 = on the current path, 2 = done
    path: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        path.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                return path[path.index(nxt):] + [nxt]
            if nxt not in state and (cycle := visit(nxt)):
                return cycle
        path.pop()
        state[node] = 2
        return None

    for start in sorted(graph):
        if start not in state and (cycle := visit(start)):
            return cycle
    return None


def layer(module: str) -> str:
    """The first level below `sdtune`: a subpackage (`sdtune.data`) or a top-level module (`sdtune.config`)."""
    return ".".join(module.split(".")[:2])


def package_graph(graph: dict[str, set[str]]) -> dict[str, set[str]]:
    layers: dict[str, set[str]] = {}
    for module, targets in graph.items():
        # the root package's __init__ is not a layer of its own
        if module == "sdtune":
            continue
        layers.setdefault(layer(module), set()).update(
            layer(t) for t in targets if t != "sdtune" and layer(t) != layer(module))
    return layers


def _edges_between(graph: dict[str, set[str]], source: str, target: str) -> list[str]:
    return sorted(f"{m} -> {t}" for m, ts in graph.items() if layer(m) == source for t in ts if layer(t) == target)


# --------------------------------------------------------------------------------------------- the graph itself


def test_the_graph_sees_function_level_and_relative_imports():
    graph = import_graph()
    # `from sdtune.data import build_plan` inside dry_run(): a function-level import of a package
    assert "sdtune.data" in graph["sdtune.train.plan"]
    # `from .header import ...`: relative, module level
    assert "sdtune.checkpoint.header" in graph["sdtune.checkpoint.detect"]
    # `from sdtune.prep import deepdanbooru, wd14`: the submodules, not only the package
    assert {"sdtune.prep.deepdanbooru", "sdtune.prep.wd14"} <= graph["sdtune.prep.tagger"]


def test_find_cycle_finds_a_cycle_and_only_a_cycle():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": set()}) is None
    assert find_cycle({"a": {"b", "c"}, "b": {"c"}, "c": set()}) is None  # a diamond is no cycle
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"b"}}) == ["b", "c", "b"]


# --------------------------------------------------------------------------------------------- the rules


def test_no_import_cycle_between_modules():
    cycle = find_cycle(import_graph())
    assert cycle is None, "import cycle: " + " -> ".join(cycle)


def test_no_import_cycle_between_packages():
    graph = import_graph()
    cycle = find_cycle(package_graph(graph))
    if cycle is not None:
        detail = "; ".join(", ".join(_edges_between(graph, a, b)) for a, b in zip(cycle, cycle[1:]))
        raise AssertionError(f"packages import each other: {' -> '.join(cycle)} ({detail})")


def test_prep_and_data_do_not_import_each_other():
    # both read and write the metadata files through sdtune.metadata, below them both
    graph = import_graph()
    edges = _edges_between(graph, "sdtune.prep", "sdtune.data") + _edges_between(graph, "sdtune.data", "sdtune.prep")
    assert not edges, "prep and data import each other: " + ", ".join(edges)


def test_one_family_detector():
    # A Family is chosen from flags and evidence only in checkpoint/detect.py, whose detector loading,
    # --dry_run and the cache command all call: a second decision elsewhere could disagree with it.
    deciders = set()
    for module, path in _module_names().items():
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.Call) and getattr(node.func, "id", getattr(node.func, "attr", None)) == "family_from_flags":
                deciders.add(module)
    assert deciders == {"sdtune.checkpoint.detect"}
    assert "sdtune.checkpoint.detect" in import_graph()["sdtune.train.plan"]  # the dry run asks that detector


def _functions():
    """(module, qualified name, lines) of every function and method in src."""
    for module, path in _module_names().items():
        tree = ast.parse(path.read_text(encoding="utf-8"))
        for parent in ast.walk(tree):
            for node in ast.iter_child_nodes(parent):
                if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                    yield module, node.name, node, node.end_lineno - node.lineno + 1


def test_no_function_over_80_lines():
    # Long functions were where closures and flags piled up (the old 490-line training loop); a
    # function that outgrows a screen is split into named steps.
    long = sorted(f"{module}.{name} ({lines} lines)" for module, name, _n, lines in _functions() if lines > 80)
    assert not long, "functions over 80 lines: " + ", ".join(long)


def _calls_a_denoiser(node: ast.Call) -> bool:
    """`unet(...)`, `self.unet(...)` or any call passing encoder_hidden_states: a U-Net forward pass.

    A wrapper's pass-through, `self.unet(*args, **kwargs)`, is not a call site of its own: it forms
    no inputs, so what `denoise` passes reaches the U-Net unchanged."""
    func = node.func
    name = func.id if isinstance(func, ast.Name) else func.attr if isinstance(func, ast.Attribute) else None
    passes_through = (len(node.args) == 1 and isinstance(node.args[0], ast.Starred) and len(node.keywords) == 1
                      and node.keywords[0].arg is None)
    return (name == "unet" and not passes_through) or any(k.arg == "encoder_hidden_states" for k in node.keywords)


def test_one_call_site_for_the_unet():
    # Training, validation, sampling and the family probe all ask sdtune.model.denoise, so a model
    # with other inputs or a target that wraps the U-Net (a hypernetwork) changes one function.
    sites = sorted({f"{module}.{name}" for module, name, fn, _l in _functions()
                    for node in ast.walk(fn) if isinstance(node, ast.Call) and _calls_a_denoiser(node)})
    assert sites == ["sdtune.model.denoise"]
    # and the check does see a U-Net call where one is written
    call = ast.parse("unet(x, t, c).sample").body[0].value.value
    assert _calls_a_denoiser(call)
    assert not _calls_a_denoiser(ast.parse("self.unet(*args, **kwargs)").body[0].value)
