"""The package's import graph, read from the source (every ``import`` / ``from ... import``
statement, at module level or inside a function), has no cycle and only runs downward
through the layers of docs/style.md:

    leaves < the paper's matrices < the stack (model) < services < entry points

Imports within a layer are allowed (as long as there is no cycle). A new module must be
given its layer here; every module opens with a docstring saying what it owns."""

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
# installed name -> folder in the checkout (pyproject's package-dir)
PACKAGES = {"cheems_mlx": ROOT / "cheems_mlx", "cheems_mlx.convert": ROOT / "convert",
            "cheems_mlx.metal_kernels": ROOT / "metal_kernels"}

LAYERS = [
    ("leaves", ["cheems_mlx.blas", "cheems_mlx.fastmath", "cheems_mlx.rope", "cheems_mlx.projections", "cheems_mlx.kernels", "cheems_mlx.metal_kernels", "cheems_mlx.io",
                "cheems_mlx.plots", "cheems_mlx.quantize", "cheems_mlx.sharding", "cheems_mlx.synthetic",
                "cheems_mlx.convert", "cheems_mlx.convert.formats"]),
    ("matrices", ["cheems_mlx.ssd", "cheems_mlx.dma", "cheems_mlx.cdmoe"]),
    ("model", ["cheems_mlx.model"]),
    ("services", ["cheems_mlx", "cheems_mlx.loading", "cheems_mlx.adapters", "cheems_mlx.numerics",
                  "cheems_mlx.distributed",
                  "cheems_mlx.speculative", "cheems_mlx.training", "cheems_mlx.cli", "cheems_mlx.convert.checkpoint"]),
    ("entry points", ["cheems_mlx.generate", "cheems_mlx.server", "cheems_mlx.convert.convert",
                      "cheems_mlx.convert.__main__", "cheems_mlx.train", "cheems_mlx.lora", "cheems_mlx.fuse",
                      "cheems_mlx.evaluate", "cheems_mlx.bench", "cheems_mlx.doctor"]),
]


def modules(packages):
    """{module name: source file} for every .py file of ``packages`` ({name: folder})."""
    found = {}
    for pkg, folder in packages.items():
        for f in sorted(folder.glob("*.py")):
            found[pkg if f.stem == "__init__" else f"{pkg}.{f.stem}"] = f
    return found


def import_graph(packages):
    """{module: {modules of the packages it imports}}, from every import statement in its
    source (module level, functions, classes, conditionals)."""
    found = modules(packages)
    graph = {}
    for name, path in found.items():
        package = name if path.stem == "__init__" else name.rsplit(".", 1)[0]
        targets = set()
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                targets.update(a.name for a in node.names)
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    parts = package.split(".")
                    anchor = ".".join(parts[: len(parts) - node.level + 1])
                    base = f"{anchor}.{base}" if base else anchor
                for a in node.names:  # `from pkg import submodule` imports the submodule
                    targets.add(f"{base}.{a.name}" if f"{base}.{a.name}" in found else base)
        graph[name] = {t for t in targets if t in found and t != name}
    return graph


def find_cycle(graph):
    """One import cycle as a list [a, b, ..., a], or None."""
    state, stack = {}, []

    def visit(m):
        state[m] = "open"
        stack.append(m)
        for t in sorted(graph[m]):
            if state.get(t) == "open":
                return stack[stack.index(t):] + [t]
            if t not in state:
                cycle = visit(t)
                if cycle:
                    return cycle
        state[m] = "done"
        stack.pop()
        return None

    for m in sorted(graph):
        if m not in state:
            cycle = visit(m)
            if cycle:
                return cycle
    return None


def upward_imports(graph, layers):
    """The imports from a lower layer into a higher one: [(module, its layer, target, layer)]."""
    rank = {m: (i, layer) for i, (layer, names) in enumerate(layers) for m in names}
    return sorted((m, rank[m][1], t, rank[t][1]) for m, ts in graph.items() for t in ts if rank[t][0] > rank[m][0])


def test_every_module_has_a_layer():
    listed = [m for _, names in LAYERS for m in names]
    assert len(listed) == len(set(listed))
    found = set(modules(PACKAGES))
    assert not found - set(listed), f"give these modules a layer in LAYERS: {sorted(found - set(listed))}"
    assert not set(listed) - found, f"LAYERS lists modules that do not exist: {sorted(set(listed) - found)}"


def test_the_import_graph_has_no_cycle():
    cycle = find_cycle(import_graph(PACKAGES))
    assert cycle is None, "import cycle: " + " -> ".join(cycle)


def test_imports_only_run_down_the_layers():
    assert upward_imports(import_graph(PACKAGES), LAYERS) == []


def test_the_model_imports_no_runtime():
    graph = import_graph(PACKAGES)
    below = set()
    todo = ["cheems_mlx.model"]
    while todo:  # everything the model reaches, directly or not
        for t in graph[todo.pop()] - below:
            below.add(t)
            todo.append(t)
    services = {m for layer, names in LAYERS if layer in ("services", "entry points") for m in names}
    assert not below & services, sorted(below & services)
    assert "cheems_mlx.sharding" in graph["cheems_mlx.model"]  # Model.shard: building blocks only


def test_every_module_opens_with_a_docstring():
    for name, path in modules(PACKAGES).items():
        doc = ast.get_docstring(ast.parse(path.read_text()))
        assert doc and len(doc.split()) >= 5, f"{name} ({path.relative_to(ROOT)}) needs an opening docstring"


def test_the_checks_catch_a_cycle_and_an_upward_import(tmp_path):
    """The functions above on a made-up package: a cycle through a function-level import,
    and a leaf importing the layer above it."""
    pkg = tmp_path / "pkg"
    pkg.mkdir()
    (pkg / "__init__.py").write_text('"""p."""\n')
    (pkg / "leaf.py").write_text("def f():\n    from .mid import g\n")
    (pkg / "mid.py").write_text("from . import top\n")
    (pkg / "top.py").write_text("import os\n\ndef h():\n    from pkg.leaf import f\n")
    graph = import_graph({"pkg": pkg})
    assert graph == {"pkg": set(), "pkg.leaf": {"pkg.mid"}, "pkg.mid": {"pkg.top"}, "pkg.top": {"pkg.leaf"}}
    assert find_cycle(graph) == ["pkg.leaf", "pkg.mid", "pkg.top", "pkg.leaf"]
    layers = [("low", ["pkg.leaf"]), ("high", ["pkg", "pkg.mid", "pkg.top"])]
    assert upward_imports(graph, layers) == [("pkg.leaf", "low", "pkg.mid", "high")]
