"""The import graph points one way, checked statically (imports inside functions included, which a runtime
check of `sys.modules` cannot see):

- the command layer `crappify/cli/` is the top of the tree: no module of `crappify/` outside it imports
  `srgan` or `crappify.cli` (except `crappify/__main__.py`, which runs the app);
- `srgan` never imports the command layer;
- inside `srgan`, data goes down `SRGAN_LAYERS` and never climbs back: a module imports only modules of its own
  layer or of a lower one (the bottom imports no model, the models no data, the data no stage, ...);
- the command layer imports `srgan`, torch and fastai only inside its command bodies (`crappify --help` stays fast);
- inside each package (`crappify`, `srgan`) no two modules import each other, directly or through others.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
COMMAND_LAYER = "crappify.cli"  # a package: every crappify.cli.* module
COMMAND_MODULES = {COMMAND_LAYER}  # what srgan must never import (prefixes)
ENTRY_POINTS = {"crappify.__main__"}  # runs the app: imports crappify.cli, nothing else
# srgan's layers, bottom first; the one definition of them. A new module must be placed in one
# (test_every_srgan_module_has_a_layer).
SRGAN_LAYERS: list[tuple[str, frozenset[str]]] = [
    # where and how things run, normalisation, the bicubic resize, the seeded loader, weight files, callbacks, SSIM
    ("bottom", frozenset({"runtime", "normalize", "upsample", "loader", "weights", "distributed", "callbacks",
                         "metrics"})),
    # networks, losses and the files they are saved in (checkpoint rebuilds generators and critics)
    ("models", frozenset({"generators", "critics", "losses", "adversarial", "checkpoint", "basicsr"})),
    ("data", frozenset({"data"})),  # paired crops from a built dataset
    ("inference", frozenset({"inference"})),  # tiled inference of a generator file
    # what runs a trained generator (and blends two)
    ("running", frozenset({"predict", "enhance", "evaluate", "benchmarks", "export", "interpolate"})),
    ("training", frozenset({"train_gen", "train_critic", "train_gan", "gan_loop"})),  # the training stages
    # the chain from one YAML, its smoke run and rehearsal, and the demo
    ("pipeline", frozenset({"pipeline", "smoke", "rehearse", "inspection", "demo"})),
]


def module_name(path: Path) -> str:
    rel = path.relative_to(ROOT).with_suffix("")
    parts = list(rel.parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def imports_of(path: Path) -> set[str]:
    """Every module `path` imports, at any depth of its code (absolute names; relative ones resolved)."""
    tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
    found: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                package = module_name(path) if path.name == "__init__.py" else module_name(path).rsplit(".", 1)[0]
                anchor = package.split(".")[: len(package.split(".")) - (node.level - 1)]
                base = ".".join([*anchor, base] if base else anchor)
            found.add(base)
            found.update(f"{base}.{alias.name}" for alias in node.names)
    return found


def modules(package: str) -> list[Path]:
    return sorted((ROOT / package).rglob("*.py"))


def within(name: str, prefixes: set[str]) -> bool:
    return any(name == p or name.startswith(p + ".") for p in prefixes)


def is_command_layer(name: str) -> bool:
    return within(name, {COMMAND_LAYER})


@pytest.mark.parametrize("path", modules("crappify"), ids=lambda p: module_name(p))
def test_crappify_core_never_imports_srgan(path):
    name = module_name(path)
    if is_command_layer(name):
        return
    bad = sorted(n for n in imports_of(path) if within(n, {"srgan"}))
    assert not bad, f"{name} imports {bad}"


@pytest.mark.parametrize("path", modules("crappify"), ids=lambda p: module_name(p))
def test_crappify_core_never_imports_the_command_layer(path):
    name = module_name(path)
    if is_command_layer(name) or name in ENTRY_POINTS:
        return
    bad = sorted(n for n in imports_of(path) if within(n, COMMAND_MODULES))
    assert not bad, f"{name} imports {bad}"


@pytest.mark.parametrize("name", sorted(ENTRY_POINTS))
def test_entry_points_only_import_the_command_layer(name):
    path = ROOT.joinpath(*name.split(".")).with_suffix(".py")
    found = {n for n in imports_of(path) if n.split(".")[0] in {"crappify", "srgan"}}
    assert found and all(is_command_layer(n) for n in found), f"{name} imports {sorted(found)}"


def test_the_command_layer_is_a_package_of_stage_groups():
    names = {module_name(p) for p in modules("crappify/cli")}
    assert {"crappify.cli", "crappify.cli.data", "crappify.cli.train", "crappify.cli.infer", "crappify.cli.run",
            "crappify.cli.options"} <= names
    assert not (ROOT / "crappify" / "cli.py").exists()


@pytest.mark.parametrize("path", modules("srgan"), ids=lambda p: module_name(p))
def test_srgan_never_imports_the_command_layer(path):
    bad = sorted(n for n in imports_of(path) if within(n, COMMAND_MODULES))
    assert not bad, f"{module_name(path)} imports {bad}"


def srgan_layer(short: str) -> int:
    return next(i for i, (_, members) in enumerate(SRGAN_LAYERS) if short in members)


def test_every_srgan_module_has_a_layer():
    placed = [m for _, members in SRGAN_LAYERS for m in members]
    assert len(placed) == len(set(placed)), "a module is in two layers"
    present = {p.stem for p in (ROOT / "srgan").glob("*.py")} - {"__init__"}
    unplaced = sorted(present - set(placed))
    assert not unplaced, f"srgan modules in no layer (add them to SRGAN_LAYERS): {unplaced}"
    assert not set(placed) - present, f"a layer names a module that does not exist: {sorted(set(placed) - present)}"


@pytest.mark.parametrize("short", sorted(m for _, members in SRGAN_LAYERS for m in members))
def test_srgan_modules_import_only_their_layer_or_lower(short):
    layer = srgan_layer(short)
    found = {n.split(".")[1] for n in imports_of(ROOT / "srgan" / f"{short}.py")
             if n.startswith("srgan.") and n.split(".")[1] != "__init__"}
    up = sorted(m for m in found if srgan_layer(m) > layer)
    assert not up, f"srgan/{short}.py ({SRGAN_LAYERS[layer][0]} layer) imports {up} from a higher layer"


def top_level_imports(path: Path) -> set[str]:
    """The modules `path` imports when it is imported (module level, `if`/`try` blocks included)."""
    found: set[str] = set()
    todo = list(ast.parse(path.read_text(encoding="utf-8")).body)
    while todo:
        node = todo.pop()
        if isinstance(node, ast.Import):
            found.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            found.add(node.module or "")
        elif isinstance(node, (ast.If, ast.Try, ast.ExceptHandler, ast.With)):
            todo.extend(ast.iter_child_nodes(node))
    return found


@pytest.mark.parametrize("path", modules("crappify/cli"), ids=lambda p: module_name(p))
def test_the_command_layer_imports_heavy_modules_only_in_command_bodies(path):
    bad = sorted(n for n in top_level_imports(path) if within(n, {"srgan", "torch", "torchvision", "fastai"}))
    assert not bad, f"{module_name(path)} imports {bad} at module level"


def test_the_scan_sees_imports_inside_functions(tmp_path):
    src = tmp_path / "m.py"
    src.write_text("import srgan.runtime\n\ndef f():\n    from srgan.train_gen import Trainer\n\n"
                   "class C:\n    def g(self):\n        import srgan.train_gan as g\n"
                   "        from srgan import pipeline\n")
    found = {n for n in imports_of(src) if n.startswith("srgan.")}
    assert {"srgan.runtime", "srgan.train_gen", "srgan.train_gan", "srgan.pipeline"} <= found
    sample = ROOT / "crappify" / "cli" / "run.py"  # imports srgan only inside its command functions
    assert within_any(imports_of(sample), {"srgan.pipeline", "srgan.demo"})
    assert not within_any(top_level_imports(sample), {"srgan"})  # ... so the scan found them inside functions


def within_any(names: set[str], prefixes: set[str]) -> bool:
    return any(within(n, prefixes) for n in names)


def import_graph(package: str) -> dict[str, set[str]]:
    """Module -> the modules of `package` it imports, at any depth of its code (`imports_of`). An imported name
    counts as the longest module it names (`from srgan.callbacks import EpochEnd` is srgan.callbacks); a
    module's own enclosing packages are left out (Python imports them before the module in any case, and
    `from srgan import gan_loop` names the package `srgan` only to reach `srgan.gan_loop`)."""
    paths = {module_name(p): p for p in modules(package)}
    graph: dict[str, set[str]] = {}
    for name, path in paths.items():
        found = set()
        for imported in imports_of(path):
            parts = imported.split(".")
            target = next((".".join(parts[:i]) for i in range(len(parts), 0, -1) if ".".join(parts[:i]) in paths),
                          None)
            if target is not None and target != name and not name.startswith(target + "."):
                found.add(target)
        graph[name] = found
    return graph


def import_cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The import cycles of `graph`: its strongly connected components of more than one module (Tarjan's
    algorithm), each sorted, with one cycle through them spelt out as its first element's path back to itself."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(v: str) -> None:
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
    return sorted(found)


def a_cycle(graph: dict[str, set[str]], component: list[str]) -> list[str]:
    """One cycle inside `component` (a strongly connected one), from its first module back to it."""
    start, members = component[0], set(component)
    paths = {start: [start]}
    todo = [start]
    while todo:  # breadth first, so the cycle shown is a shortest one through `start`
        v = todo.pop(0)
        for w in sorted(graph[v] & members):
            if w == start:
                return [*paths[v], start]
            if w not in paths:
                paths[w] = [*paths[v], w]
                todo.append(w)
    raise AssertionError(f"{component} is not strongly connected")


@pytest.mark.parametrize("package", ["crappify", "srgan"])
def test_no_import_cycles_inside_a_package(package):
    """No module imports (at any depth, imports inside functions included) a module that imports it back,
    directly or through others: the layers order the packages, this orders the modules inside one."""
    graph = import_graph(package)
    cycles = [" -> ".join(a_cycle(graph, c)) for c in import_cycles(graph)]
    assert not cycles, "import cycles: " + "; ".join(cycles)


def test_the_cycle_finder_finds_cycles():
    graph = {"a": {"b"}, "b": {"c"}, "c": {"a", "d"}, "d": set(), "e": {"f"}, "f": {"e"}, "g": {"g"}}
    assert import_cycles(graph) == [["a", "b", "c"], ["e", "f"]]
    assert a_cycle(graph, ["a", "b", "c"]) == ["a", "b", "c", "a"]
    assert import_cycles({"a": {"b"}, "b": {"c"}, "c": set()}) == []
    srgan = import_graph("srgan")  # imports inside functions count: pipeline imports the stages only on use
    assert "srgan.train_gen" in srgan["srgan.pipeline"] and "srgan.runtime" in srgan["srgan.train_gen"]
    assert not any(m == "srgan" for deps in srgan.values() for m in deps)  # no edge to the enclosing package
