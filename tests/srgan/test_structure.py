"""srgan's layers, checked statically: every import of every module (inside functions too) parsed with `ast`.

Data goes down the layers and never climbs back: the bottom layer (where and how things run, normalisation,
fastai callbacks, model files, the bicubic resize, the data loader class, weight files, distributed helpers)
imports no stage; the model layer (generators, critics, losses, adversarial losses) imports neither the data
layer nor a stage.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

SRGAN = Path(__file__).resolve().parents[2] / "srgan"

# The layers, bottom first. A new module must be placed in one (test_every_module_has_a_layer).
# checkpoint is bottom although it rebuilds models from their files: it imports srgan.models / srgan.critics
# inside its loaders, which the model layer allows (those never import it back).
BOTTOM = frozenset({"runtime", "normalize", "callbacks", "checkpoint", "upsample", "loader", "weights",
                    "distributed"})
MODELS = frozenset({"models", "critics", "losses", "adversarial"})
DATA = frozenset({"data"})
# Stages and what runs them: training (train, critic, gan), inference and its users (predict, enhance, evaluate,
# export), and the pipeline with its helpers (smoke, inspection) and the demo that runs one.
STAGES = frozenset({"train", "critic", "gan", "gan_loop", "inference", "predict", "enhance", "evaluate", "export",
                    "pipeline", "smoke", "inspection", "demo"})


def srgan_imports(path: Path) -> set[str]:
    """The srgan modules `path` imports anywhere (module level, functions, methods), by their short name."""
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names = [node.module] + ([f"{node.module}.{a.name}" for a in node.names] if node.module == "srgan" else [])
        else:
            continue
        for name in names:
            parts = name.split(".")
            if parts[0] == "srgan" and len(parts) > 1:
                found.add(parts[1])
    return found


def modules() -> list[str]:
    return sorted(p.stem for p in SRGAN.glob("*.py") if p.stem != "__init__")


def test_every_module_has_a_layer():
    layers = [BOTTOM, MODELS, DATA, STAGES]
    for a in layers:
        for b in layers:
            assert a is b or not a & b
    unplaced = set(modules()) - BOTTOM - MODELS - DATA - STAGES
    assert not unplaced, f"srgan modules in no layer (add them to a set above): {sorted(unplaced)}"
    assert not (BOTTOM | MODELS | DATA | STAGES) - set(modules()), "a layer names a module that does not exist"


def test_the_scan_sees_imports_inside_functions(tmp_path):
    src = tmp_path / "m.py"
    src.write_text("import srgan.runtime\n\ndef f():\n    from srgan.train import Trainer\n\n"
                   "class C:\n    def g(self):\n        import srgan.gan as g\n        from srgan import pipeline\n")
    assert srgan_imports(src) == {"runtime", "train", "gan", "pipeline"}


@pytest.mark.parametrize("name", sorted(BOTTOM))
def test_the_bottom_layer_imports_no_stage_and_no_data(name):
    bad = srgan_imports(SRGAN / f"{name}.py") & (STAGES | DATA)
    assert not bad, f"srgan/{name}.py (bottom layer) imports {sorted(bad)}"


@pytest.mark.parametrize("name", sorted(MODELS))
def test_the_model_layer_imports_no_stage_and_no_data(name):
    bad = srgan_imports(SRGAN / f"{name}.py") & (STAGES | DATA)
    assert not bad, f"srgan/{name}.py (model layer) imports {sorted(bad)}"


def test_the_data_layer_imports_no_stage():
    bad = srgan_imports(SRGAN / "data.py") & STAGES
    assert not bad, f"srgan/data.py imports {sorted(bad)}"
