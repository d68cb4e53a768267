"""The import graph points one way, checked statically (imports inside functions included, which a runtime
check of `sys.modules` cannot see):

- the command layer `crappify/cli/` is the top of the tree: no module of `crappify/` outside it imports
  `srgan` or `crappify.cli` (except `crappify/__main__.py`, which runs the app, and the deprecated
  `crappify.cli_gan`, `cli_infer`, `cli_run`, which only re-export from `crappify.cli`);
- `srgan` never imports the command layer;
- inside `srgan`, data goes down `SRGAN_LAYERS` and never climbs back: a module imports only modules of its own
  layer or of a lower one (the bottom imports no model, the models no data, the data no stage, ...);
- the command layer imports `srgan`, torch and fastai only inside its command bodies (`crappify --help` stays fast).
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
COMMAND_LAYER = "crappify.cli"  # a package: every crappify.cli.* module
DEPRECATED_SHIMS = {"crappify.cli_gan", "crappify.cli_infer", "crappify.cli_run"}
COMMAND_MODULES = {COMMAND_LAYER, *DEPRECATED_SHIMS}  # what srgan must never import (prefixes)
ENTRY_POINTS = {"crappify.__main__"}  # runs the app: imports crappify.cli, nothing else
# srgan's layers, bottom first; the one definition of them. A new module must be placed in one
# (test_every_srgan_module_has_a_layer); the deprecated modules only forward to their new names.
SRGAN_LAYERS: list[tuple[str, frozenset[str]]] = [
    # where and how things run, normalisation, the bicubic resize, the seeded loader, weight files, callbacks
    ("bottom", frozenset({"runtime", "normalize", "upsample", "loader", "weights", "distributed", "callbacks"})),
    # networks, losses and the files they are saved in (checkpoint rebuilds generators and critics)
    ("models", frozenset({"generators", "critics", "losses", "adversarial", "checkpoint"})),
    ("data", frozenset({"data"})),  # paired crops from a built dataset
    ("inference", frozenset({"inference"})),  # tiled inference of a generator file
    ("running", frozenset({"predict", "enhance", "evaluate", "export"})),  # what runs a trained generator
    ("training", frozenset({"train_gen", "train_critic", "train_gan", "gan_loop"})),  # the training stages
    ("pipeline", frozenset({"pipeline", "smoke", "inspection", "demo"})),  # the chain from one YAML, and the demo
]
SRGAN_DEPRECATED = {"train": "train_gen", "critic": "train_critic", "gan": "train_gan", "models": "generators"}


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
    if is_command_layer(name) or name in DEPRECATED_SHIMS | ENTRY_POINTS:
        return
    bad = sorted(n for n in imports_of(path) if within(n, COMMAND_MODULES))
    assert not bad, f"{name} imports {bad}"


@pytest.mark.parametrize("name", sorted(DEPRECATED_SHIMS | ENTRY_POINTS))
def test_shims_and_entry_points_only_import_the_command_layer(name):
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
    unplaced = sorted(present - set(placed) - set(SRGAN_DEPRECATED))
    assert not unplaced, f"srgan modules in no layer (add them to SRGAN_LAYERS): {unplaced}"
    assert not set(placed) - present, f"a layer names a module that does not exist: {sorted(set(placed) - present)}"


@pytest.mark.parametrize("short", sorted(m for _, members in SRGAN_LAYERS for m in members))
def test_srgan_modules_import_only_their_layer_or_lower(short):
    layer = srgan_layer(short)
    found = {n.split(".")[1] for n in imports_of(ROOT / "srgan" / f"{short}.py")
             if n.startswith("srgan.") and n.split(".")[1] != "__init__"}
    up = sorted(m for m in found if m in SRGAN_DEPRECATED or srgan_layer(m) > layer)
    assert not up, f"srgan/{short}.py ({SRGAN_LAYERS[layer][0]} layer) imports {up} from a higher layer"


@pytest.mark.parametrize(("old", "new"), sorted(SRGAN_DEPRECATED.items()))
def test_deprecated_srgan_modules_forward_to_their_new_names(old, new):
    import importlib
    import sys
    import warnings

    sys.modules.pop(f"srgan.{old}", None)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        importlib.import_module(f"srgan.{old}")
    assert any(issubclass(w.category, DeprecationWarning) and f"srgan.{new}" in str(w.message) for w in caught)
    shim, target = importlib.import_module(f"srgan.{old}"), importlib.import_module(f"srgan.{new}")
    public = [n for n in dir(target) if not n.startswith("_") and callable(getattr(target, n))]
    assert public and all(getattr(shim, n) is getattr(target, n) for n in public)


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
