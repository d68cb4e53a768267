"""The import graph points one way, checked statically (imports inside functions included, which a runtime
check of `sys.modules` cannot see):

- `crappify`'s core (everything but its command modules) never imports `srgan`;
- `srgan` never imports `crappify`'s command modules;
- `srgan`'s lower layer (models, losses, data, checkpoints, runtime helpers) never imports a stage module
  (train-gen, train-critic, train-gan, evaluate, enhance, export, pipeline, predict, inspection).
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
COMMAND_MODULES = {"crappify.cli", "crappify.cli_gan", "crappify.cli_infer", "crappify.cli_run", "crappify.__main__"}
SRGAN_STAGES = {"srgan.train", "srgan.critic", "srgan.gan", "srgan.evaluate", "srgan.enhance", "srgan.export",
                "srgan.pipeline", "srgan.predict", "srgan.inspection"}


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


@pytest.mark.parametrize("path", modules("crappify"), ids=lambda p: module_name(p))
def test_crappify_core_never_imports_srgan(path):
    if module_name(path) in COMMAND_MODULES:
        return
    bad = sorted(n for n in imports_of(path) if within(n, {"srgan"}))
    assert not bad, f"{module_name(path)} imports {bad}"


@pytest.mark.parametrize("path", modules("srgan"), ids=lambda p: module_name(p))
def test_srgan_never_imports_the_command_layer(path):
    bad = sorted(n for n in imports_of(path) if within(n, COMMAND_MODULES))
    assert not bad, f"{module_name(path)} imports {bad}"


@pytest.mark.parametrize("path", [p for p in modules("srgan") if module_name(p) not in SRGAN_STAGES],
                         ids=lambda p: module_name(p))
def test_srgan_lower_layer_never_imports_a_stage(path):
    bad = sorted(n for n in imports_of(path) if within(n, SRGAN_STAGES))
    assert not bad, f"{module_name(path)} imports {bad}"


def test_the_scan_sees_imports_inside_functions():
    sample = ROOT / "crappify" / "cli_run.py"  # imports srgan only inside its command functions
    assert within_any(imports_of(sample), {"srgan.pipeline"})


def within_any(names: set[str], prefixes: set[str]) -> bool:
    return any(within(n, prefixes) for n in names)
