"""The package's modules import each other one way: down an ordered list of layers, no cycle.

An import inside a function hides a cycle from Python (it runs late) but not from a reader: the
two modules still depend on each other. This walks every ``import`` statement of the package with
:mod:`ast` (inside functions too), fails on a cycle, naming it, and fails on an import that runs
up the layers of :data:`LAYERS` (e.g. ``graph`` importing ``splitting``, ``splitting`` importing
``serving``), naming the module, the module it imports and their layers. docs/architecture.md
draws the same layers.
"""

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parent.parent / "dsc_export"

# Bottom to top: a module may import its own layer and the layers below it, never one above.
# A name ending in "*" is the package and everything in it.
LAYERS = [
    ("leaves", ["dsc_export", "dsc_export.errors", "dsc_export.compare", "dsc_export.ort",
                "dsc_export.zoo", "dsc_export.plots", "dsc_export.codecs"]),
    ("records", ["dsc_export.artifacts"]),
    ("graph", ["dsc_export.graph*"]),
    ("contract", ["dsc_export.contract", "dsc_export.weight_store", "dsc_export.fidelity"]),
    ("samples", ["dsc_export.images", "dsc_export.inputs", "dsc_export.feeds"]),
    ("backends", ["dsc_export.backends", "dsc_export.backends.base", "dsc_export.backends.cuda",
                  "dsc_export.backends.onnxruntime", "dsc_export.backends.tensorrt"]),
    ("pipeline", ["dsc_export.weights", "dsc_export.export", "dsc_export.splitting", "dsc_export.split_check",
                  "dsc_export.calibration",
                  "dsc_export.offload", "dsc_export.engines*", "dsc_export.backends.tensorrt_tools",
                  "dsc_export.profiling", "dsc_export.planning", "dsc_export.fleet", "dsc_export.bundle",
                  "dsc_export.triton_repository", "dsc_export.session"]),
    ("serving", ["dsc_export.serving*"]),
    ("front", ["dsc_export.cli*", "dsc_export.demo", "dsc_export.__main__"]),
]
# (codecs, fidelity, calibration, offload, session: placed ahead of the branches that add them.)
# Imports allowed to run up the layers for now (none).
PENDING: set[tuple[str, str]] = set()


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def package_imports() -> dict[str, set[str]]:
    """module -> the package's modules it imports (anywhere in its body)."""
    modules = {module_name(p): p for p in PACKAGE.rglob("*.py")}
    graph = {}
    for name, path in modules.items():
        deps = set()
        for node in ast.walk(ast.parse(path.read_text())):
            targets = []
            if isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                targets = [node.module] + [f"{node.module}.{a.name}" for a in node.names]
            for t in targets:
                if t in modules and t != name and not name.startswith(t + "."):
                    deps.add(t)
        graph[name] = deps
    return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    state, stack = {}, []

    def visit(m):
        state[m] = "open"
        stack.append(m)
        for d in sorted(graph[m]):
            if state.get(d) == "open":
                return stack[stack.index(d):] + [d]
            if d not in state and (c := visit(d)):
                return c
        state[m] = "done"
        stack.pop()
        return None

    for m in sorted(graph):
        if m not in state and (c := visit(m)):
            return c
    return None


def layer_of(module: str, layers=LAYERS) -> int | None:
    """The index of the layer ``module`` belongs to (the most specific pattern wins), or None."""
    best = None
    for k, (_, names) in enumerate(layers):
        for n in names:
            stem = n[:-1] if n.endswith("*") else None
            hit = module == n or (stem is not None and (module == stem or module.startswith(stem + ".")))
            if hit and (best is None or len(n.rstrip("*")) > best[1]):
                best = (k, len(n.rstrip("*")))
    return None if best is None else best[0]


def upward(graph: dict[str, set[str]], layers=LAYERS, pending=frozenset()) -> list[str]:
    """Each import of a module from a layer above its own, as 'a (layer) imports b (layer)'."""
    found = []
    for a in sorted(graph):
        for b in sorted(graph[a]):
            la, lb = layer_of(a, layers), layer_of(b, layers)
            if la is not None and lb is not None and lb > la and (a, b) not in pending:
                found.append(f"{a} ({layers[la][0]}) imports {b} ({layers[lb][0]})")
    return found


def floors(graph: dict[str, set[str]]) -> int:
    """The number of floors of the import graph: the modules on its longest import chain (an
    acyclic graph; each module one floor above the highest module it imports)."""
    memo: dict[str, int] = {}

    def floor(m: str) -> int:
        if m not in memo:
            memo[m] = 1 + max((floor(d) for d in graph[m]), default=0)
        return memo[m]

    return max(map(floor, graph), default=0)


def test_the_walk_sees_imports_inside_functions():
    graph = package_imports()
    assert "dsc_export.errors" in graph["dsc_export.cli"]
    # imported inside a function only
    assert "dsc_export.backends.tensorrt" in graph["dsc_export.triton_repository"]
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set()}) is None
    assert floors({"a": {"b"}, "b": {"c"}, "c": set(), "d": {"c"}}) == 3


def test_the_layer_check_catches_an_import_up():
    assert (layer_of("dsc_export.graph.model") < layer_of("dsc_export.splitting")
            < layer_of("dsc_export.serving.client"))
    assert layer_of("dsc_export.backends.tensorrt_tools") > layer_of("dsc_export.backends.tensorrt")
    assert upward({"dsc_export.graph.model": {"dsc_export.splitting"}}) == [
        "dsc_export.graph.model (graph) imports dsc_export.splitting (pipeline)"]
    assert upward({"dsc_export.splitting": {"dsc_export.serving.protocol"}}) == [
        "dsc_export.splitting (pipeline) imports dsc_export.serving.protocol (serving)"]
    assert upward({"dsc_export.serving.client": {"dsc_export.splitting", "dsc_export.contract"}}) \
        == []


def test_no_import_cycle():
    cycle = find_cycle(package_imports())
    assert cycle is None, " -> ".join(cycle)


def test_every_module_has_a_layer():
    unplaced = sorted(m for m in package_imports() if layer_of(m) is None)
    assert unplaced == [], f"place these modules in LAYERS: {', '.join(unplaced)}"


def test_imports_run_down_the_layers():
    graph = package_imports()
    assert upward(graph, pending=PENDING) == []


def test_the_pipeline_and_graph_import_nothing_from_serving():
    """Issue 22's rule by name: splitting, engines, bundle and graph/ stand below the run time."""
    graph = package_imports()
    offline = [m for m in graph if m in ("dsc_export.splitting", "dsc_export.bundle")
               or m.startswith(("dsc_export.engines", "dsc_export.graph"))]
    assert len(offline) > 6
    assert [(m, d) for m in offline for d in graph[m] if d.startswith("dsc_export.serving")] == []
