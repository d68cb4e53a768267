"""The README's two quick-start commands are what CI runs and what a new user types."""

from __future__ import annotations

import os
import re
import subprocess
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def quick_start_commands() -> list[str]:
    text = (ROOT / "README.md").read_text()
    section = text.split("## Quick start", 1)[1].split("\n## ", 1)[0]
    blocks = re.findall(r"```bash\n(.*?)```", section, flags=re.S)
    return [line for block in blocks for line in block.splitlines() if line and not line.startswith("#")]


def test_readme_has_exactly_two_quick_start_commands():
    commands = quick_start_commands()
    assert len(commands) == 2, commands
    assert commands[0].endswith("crappify demo")
    assert "pytest" in commands[1]


def test_ci_runs_the_readme_test_command_verbatim():
    ci_lines = (ROOT / ".ci" / "run").read_text().splitlines()
    assert quick_start_commands()[1] in ci_lines


def test_the_cpu_check_runs_the_readme_test_command_in_its_two_halves():
    """benchmarks/cpu_check.sh times the install and the suite apart; together they are the README's line."""
    script = ROOT / "benchmarks" / "cpu_check.sh"
    done = subprocess.run(["bash", str(script), "--print-commands"], capture_output=True, text=True, timeout=30)
    assert done.returncode == 0, done.stderr
    install, test = done.stdout.splitlines()
    assert f"{install} && {test}" == quick_start_commands()[1]
    bad = subprocess.run(["bash", str(script), "--nope"], capture_output=True, text=True, timeout=30)
    assert bad.returncode == 2 and bad.stderr.count("\n") == 1 and "--nope" in bad.stderr


def test_the_cpu_check_never_writes_over_a_folder_already_there(tmp_path):
    """Its report goes into a new folder named by the time; one already there (a user's) stops it in one line."""
    fake = tmp_path / "bin"
    fake.mkdir()
    (fake / "date").write_text("#!/bin/sh\necho 20260101-000000\n")
    (fake / "date").chmod(0o755)
    mine = tmp_path / "out" / "cpu-check-20260101-000000"
    mine.mkdir(parents=True)
    (mine / "cpu_check.md").write_text("a user's notes\n")
    env = {**os.environ, "PATH": f"{fake}:{os.environ['PATH']}", "OUT": str(tmp_path / "out"),
           "TMPDIR": str(tmp_path)}
    done = subprocess.run(["bash", str(ROOT / "benchmarks" / "cpu_check.sh")], capture_output=True, text=True,
                          timeout=30, env=env)
    assert done.returncode == 1 and done.stderr.count("\n") == 1 and "already there" in done.stderr
    assert (mine / "cpu_check.md").read_text() == "a user's notes\n" and len(list(mine.iterdir())) == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bin", "out"]  # its work folder removed too
