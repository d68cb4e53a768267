"""Hostile YAML: a few hundred bytes of aliases of aliases ("billion laughs") in a --config file, a preset or a
pipeline is refused in one line at once, instead of expanding to gigabytes when a message formats it."""

from __future__ import annotations

import subprocess
import time
from pathlib import Path

import pytest
import yaml

from crappify.errors import brief
from crappify.yamlfile import MAX_NODES, TooLarge, safe_load

ROOT = Path(__file__).resolve().parents[2]


def alias_bomb(levels: int = 8) -> str:
    """A list whose last entry expands to 9**(levels+1) numbers, written in about 50 bytes per level."""
    rows = "".join(f"  - &{chr(98 + i)} [{', '.join(['*' + chr(97 + i)] * 9)}]\n" for i in range(levels))
    return f"  - &a [1, 1, 1, 1, 1, 1, 1, 1, 1]\n{rows}  - *{chr(97 + levels)}\n"


def test_a_bomb_is_refused_at_once_and_ordinary_aliases_still_load():
    start = time.monotonic()
    with pytest.raises(TooLarge, match="expands to more than"):
        safe_load("depths:\n" + alias_bomb())
    assert time.monotonic() - start < 1
    assert safe_load("a: &x [1, 2]\nb: *x\nc: {<<: {d: 1}}") == {"a": [1, 2], "b": [1, 2], "c": {"d": 1}}
    # a document right at the bound loads; one node more is refused
    assert len(safe_load("[" + ", ".join(["1"] * (MAX_NODES - 1)) + "]")) == MAX_NODES - 1
    with pytest.raises(TooLarge):
        safe_load("[" + ", ".join(["1"] * MAX_NODES) + "]")


def test_every_shipped_yaml_loads_as_pyyaml_loads_it():
    files = [*ROOT.glob("pipelines/**/*.yaml"), *ROOT.glob("crappify/presets/*.yaml")]
    assert len(files) > 10
    for path in files:
        text = path.read_text()
        assert safe_load(text) == yaml.safe_load(text), path


def test_brief_is_short_whatever_the_value():
    nested: list = []
    for _ in range(9):
        nested = [nested] * 9  # 9**9 leaves, shared: formatting it in full would take gigabytes
    start = time.monotonic()
    assert len(brief(nested)) <= 80 and len(brief("x" * 10 ** 6)) <= 80
    assert time.monotonic() - start < 1


def _one_line(proc: subprocess.CompletedProcess, *fragments: str) -> None:
    assert proc.returncode != 0 and "Traceback" not in proc.stderr, proc.stderr[-2000:]
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("crappify: error: "), proc.stderr[-2000:]
    assert all(f in lines[0] for f in fragments), lines[0]


@pytest.mark.parametrize("where", ["config", "preset", "pipeline"])
def test_a_bomb_from_the_command_line_is_one_line(where, tmp_path, cli):
    data = tmp_path / "data"
    data.mkdir()
    bomb = tmp_path / "bomb.yaml"
    if where == "config":  # under a model option, where the validation message used to format it
        bomb.write_text("arch: unet\noptions:\n  depths:\n" + alias_bomb())
        args = ("train-gen", data, "-o", tmp_path / "run", "--config", bomb)
    elif where == "preset":
        bomb.write_text("name: bomb\nscale: 2\nsteps:\n  - op: resize\n    size: lr\n    interpolation:\n"
                        + alias_bomb().replace("  - ", "      - "))
        args = ("build-dataset", data, tmp_path / "out", "--preset", bomb)
    else:
        bomb.write_text("stages:\n  build-dataset:\n    src:\n" + alias_bomb().replace("  - ", "      - "))
        args = ("run", bomb, "--dry-run")
    _one_line(cli(*args, timeout=60), str(bomb), "expands")


def _main(capsys, *args) -> tuple[int, str]:
    """`crappify ARGS` in this process: (exit status, stderr)."""
    from crappify.cli import main

    try:
        main([str(a) for a in args])
        code = 0
    except SystemExit as exc:
        code = exc.code if isinstance(exc.code, int) else 1
    return code, capsys.readouterr().err


@pytest.mark.parametrize("args, option", [
    (("train-gen", "{data}", "-o", "{run}", "--size", "100000"), "size"),
    (("train-gen", "{data}", "-o", "{run}", "--bs", "100000"), "bs"),
    (("train-gen", "{data}", "-o", "{run}", "--workers", "100000"), "num_workers"),
    (("train-critic", "{data}", "-o", "{run}", "--size", "100000"), "size"),
    (("train-gan", "{data}", "-o", "{run}", "--bs", "100000"), "bs"),
    (("build-dataset", "{data}", "{run}", "--square", "100000"), "square"),
])
def test_sizes_that_would_exhaust_memory_are_one_line(args, option, tmp_path, capsys):
    data = tmp_path / "data"
    data.mkdir()
    code, err = _main(capsys, *(a.format(data=data, run=tmp_path / "run") for a in args))
    lines = err.strip().splitlines()
    assert code != 0 and len(lines) == 1 and lines[0].startswith("crappify: error: "), err
    assert option in lines[0] and "less than or equal" in lines[0], lines[0]
    assert not (tmp_path / "run").exists()
