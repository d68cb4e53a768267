"""The import graph points one way, checked statically (imports inside functions included, which a runtime
check of `sys.modules` cannot see):

- the command layer `crappify/cli/` is the top of the tree: no module of `crappify/` outside it imports
  `srgan` or `crappify.cli` (except `crappify/__main__.py`, which runs the app, and the deprecated
  `crappify.cli_gan`, `cli_infer`, `cli_run`, which only re-export from `crappify.cli`);
- `srgan` never imports the command layer;
- `srgan`'s lower layer (models, losses, data, checkpoints, runtime helpers) never imports a stage module
  (train-gen, train-critic, train-gan, evaluate, enhance, export, pipeline, predict, inspection, demo);
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
SRGAN_STAGES = {"srgan.train", "srgan.critic", "srgan.gan", "srgan.gan_loop", "srgan.evaluate", "srgan.enhance",
                "srgan.export", "srgan.pipeline", "srgan.predict", "srgan.inspection", "srgan.demo"}


def module_name(path: Path) -> str:
    rel = path.relative_to(ROOT).with_suffix("")
    parts = list(rel.parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def imports_of(path: Path) -> set[str]:
    """Every module `path` imports, at any depth of its code (absolute names; relative ones resolved)."""
    tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
    package = module_name(path).rsplit(".", 1)[0] if path.name != "__init__.py" else module_name(path)
    found: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
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


@pytest.mark.parametrize("path", [p for p in modules("srgan") if module_name(p) not in SRGAN_STAGES],
                         ids=lambda p: module_name(p))
def test_srgan_lower_layer_never_imports_a_stage(path):
    bad = sorted(n for n in imports_of(path) if within(n, SRGAN_STAGES))
    assert not bad, f"{module_name(path)} imports {bad}"


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


def test_the_scan_sees_imports_inside_functions():
    sample = ROOT / "crappify" / "cli" / "run.py"  # imports srgan only inside its command functions
    assert within_any(imports_of(sample), {"srgan.pipeline", "srgan.demo"})
    assert not within_any(top_level_imports(sample), {"srgan"})  # ... so the scan found them inside functions


def within_any(names: set[str], prefixes: set[str]) -> bool:
    return any(within(n, prefixes) for n in names)
