"""The `crappify` command, run as a user runs it: the installed console script in a subprocess."""

from __future__ import annotations

import csv
import re
from pathlib import Path

import pytest
import yaml
from PIL import Image

from crappify.chain import PRESETS, Chain, load_preset

PRESET_NAMES = ["bicubic-x2", "flickr30k-restore", "lesson7", "realesrgan", "realistic", "srgan-x4"]


def assert_one_line_error(proc, *fragments: str, code: int | None = None) -> str:
    """A user error: non-zero exit, one stderr line 'crappify: error: ...', no traceback."""
    assert proc.returncode != 0, proc.stdout
    if code is not None:
        assert proc.returncode == code, proc.stderr
    assert "Traceback" not in proc.stderr and "Traceback" not in proc.stdout
    lines = proc.stderr.splitlines()
    assert len(lines) == 1, proc.stderr
    assert lines[0].startswith("crappify: error: "), proc.stderr
    for fragment in fragments:
        assert fragment in lines[0], (fragment, lines[0])
    return lines[0]


def read_csv(path: Path) -> list[dict[str, str]]:
    with open(path, newline="", encoding="utf-8") as fh:
        return list(csv.DictReader(fh))


@pytest.fixture(scope="module")
def one_photo(photo_dir) -> Path:
    return sorted(photo_dir.rglob("*.jpg"))[0]


# --- help, listings -------------------------------------------------------------------------------------


@pytest.mark.parametrize("command", [[], ["build-dataset"], ["preview"], ["presets"], ["ops"], ["demo"]])
def test_help(cli, command):
    proc = cli(*command, "--help")
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.startswith("Usage: crappify")
    assert proc.stderr == ""
    if not command:
        for name in ("build-dataset", "preview", "presets", "ops", "demo"):
            assert name in proc.stdout
    if command == ["build-dataset"]:
        for option in ("--preset", "--size", "--scale", "--workers", "--seed", "--split", "--max-pixels", "--max-bytes",
                       "--overwrite", "--config", "--source", "--limit", "--hr-format"):
            assert option in proc.stdout


def test_console_script_and_python_dash_m(one_photo):
    import subprocess
    import sys

    script = Path(sys.executable).parent / "crappify"
    runs = [[sys.executable, "-m", "crappify", "presets"]]
    if script.exists():  # installed into the same environment as this Python
        runs.append([str(script), "presets"])
    for argv in runs:
        proc = subprocess.run(argv, capture_output=True, text=True, timeout=60)
        assert proc.returncode == 0, (argv, proc.stderr)
        assert [line.split()[0] for line in proc.stdout.splitlines()] == PRESET_NAMES


def test_the_app_freezes_the_garbage_collector_once_when_the_process_exits(monkeypatch, capsys):
    """Tearing down torch's and fastai's objects took ~0.5 s of every command's exit: the app registers
    gc.freeze as an exit handler, once however often main() runs in a process."""
    import gc

    import crappify.cli as cli_module

    registered: list = []
    monkeypatch.setattr(cli_module.atexit, "register", registered.append)
    monkeypatch.setattr(cli_module._quick_exit, "registered", False, raising=False)
    for _ in range(2):
        cli_module.main(["presets"])
    assert registered == [gc.freeze]
    assert capsys.readouterr().out.split()[0] == PRESET_NAMES[0]


def test_a_command_s_whole_output_arrives_through_a_pipe_with_the_quick_exit(capsys):
    """The frozen objects are left to the operating system; what the command printed is still flushed."""
    import subprocess
    import sys

    from crappify.cli import main

    main(["ops"])
    expected = capsys.readouterr().out
    proc = subprocess.run([sys.executable, "-m", "crappify", "ops"], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0 and proc.stdout == expected and len(expected) > 1000


def test_version(cli):
    proc = cli("--version")
    assert proc.returncode == 0
    assert "0.1.0" in proc.stdout


def test_presets_lists_every_preset(cli):
    proc = cli("presets")
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.splitlines()
    assert [line.split()[0] for line in lines] == PRESET_NAMES == list(PRESETS)
    by_name = {line.split()[0]: line for line in lines}
    assert by_name["srgan-x4"].split()[1] == "x4"
    assert by_name["lesson7"].split()[1:3] == ["fixed", "LR"]
    assert by_name["flickr30k-restore"].split()[1] == "--scale"
    for name in PRESET_NAMES:
        assert load_preset(name).description[:20] in by_name[name]


@pytest.mark.parametrize("name", PRESET_NAMES)
def test_presets_name_prints_yaml_that_loads_back(cli, name, tmp_path):
    proc = cli("presets", name)
    assert proc.returncode == 0, proc.stderr
    data = yaml.safe_load(proc.stdout)
    assert data == load_preset(name).to_dict()
    assert data["name"] == name
    # the printed YAML is a working preset file
    path = tmp_path / "mine.yaml"
    path.write_text(proc.stdout)
    assert load_preset(path).to_dict() == data
    assert Chain.from_dict(data).to_dict() == data


def test_presets_unknown_name(cli):
    assert_one_line_error(cli("presets", "nope"), "unknown preset 'nope'", "lesson7", code=2)


def test_ops_lists_ops_with_parameters(cli):
    proc = cli("ops")
    assert proc.returncode == 0, proc.stderr
    names = [line.split(":")[0] for line in proc.stdout.splitlines() if not line.startswith(" ")]
    for op in ("resize", "gaussian_blur", "jpeg", "noise", "occlude", "text", "repeat"):
        assert op in names
    assert re.search(r"^    quality \(int\)", proc.stdout, re.M)


# --- build-dataset --------------------------------------------------------------------------------------


def test_build_dataset_cli(cli, photo_dir, tmp_path):
    out = tmp_path / "out"
    proc = cli("build-dataset", photo_dir, out, "--preset", "srgan-x4", "--size", "64", "--workers", "2",
               "--seed", "4", "--split", "0.5,0.25,0.25", "--quiet")
    assert proc.returncode == 0, proc.stderr
    rows = read_csv(out / "manifest.csv")
    n = len(list(photo_dir.rglob("*.*")))
    assert len(rows) == n
    counts = {s: sum(r["split"] == s for r in rows) for s in ("train", "valid", "test")}
    assert proc.stdout.startswith(f"built {n} pairs (train {counts['train']} / valid {counts['valid']} / "
                                  f"test {counts['test']})")
    assert counts["valid"] == counts["test"] == round(n * 0.25)
    cfg = yaml.safe_load((out / "config.yaml").read_text())
    assert (cfg["seed"], cfg["size"], cfg["split"]) == (4, 64, [0.5, 0.25, 0.25])
    assert proc.stderr == ""  # --quiet: no progress bar

    again = cli("build-dataset", photo_dir, out, "--preset", "srgan-x4", "--size", "64", "--seed", "4",
                "--split", "0.5,0.25,0.25", "--quiet")
    assert again.returncode == 0
    assert f"{n} reused from an earlier run" in again.stdout

    other = cli("build-dataset", photo_dir, out, "--preset", "srgan-x4", "--size", "64", "--seed", "5",
                "--split", "0.5,0.25,0.25", "--quiet")
    assert_one_line_error(other, "--overwrite", "seed", code=1)
    forced = cli("build-dataset", photo_dir, out, "--preset", "srgan-x4", "--size", "64", "--seed", "5",
                 "--split", "0.5,0.25,0.25", "--quiet", "--overwrite")
    assert forced.returncode == 0, forced.stderr
    assert yaml.safe_load((out / "config.yaml").read_text())["seed"] == 5


def test_build_dataset_with_config_file_and_flag_override(cli, photo_dir, tmp_path):
    config = tmp_path / "build.yaml"
    config.write_text("preset: lesson7\nseed: 7\nlimit: 3\nmax-pixels: 1000000\nworkers: 1\n")
    out = tmp_path / "out"
    proc = cli("build-dataset", photo_dir, out, "--config", config, "--seed", "8", "--quiet")
    assert proc.returncode == 0, proc.stderr
    cfg = yaml.safe_load((out / "config.yaml").read_text())
    assert cfg["preset"]["name"] == "lesson7"
    assert (cfg["seed"], cfg["limit"], cfg["max_pixels"]) == (8, 3, 1_000_000)
    assert len(read_csv(out / "manifest.csv")) == 3


def test_build_dataset_with_a_preset_file(cli, photo_dir, tmp_path):
    preset = tmp_path / "mine.yaml"
    preset.write_text("name: mine\nscale: 2\nsteps:\n  - {op: resize, size: lr, interpolation: area}\n")
    out = tmp_path / "out"
    proc = cli("build-dataset", photo_dir, out, "--preset", preset, "--size", "64", "--limit", "2", "--quiet")
    assert proc.returncode == 0, proc.stderr
    for r in read_csv(out / "manifest.csv"):
        assert int(r["lr_width"]) * 2 == int(r["hr_width"])


def test_build_dataset_reports_skipped_files(cli, odd_files, tmp_path):
    out = tmp_path / "out"
    proc = cli("build-dataset", odd_files.root, out, "--preset", "lesson7", "--quiet", "--workers", "1")
    assert proc.returncode == 0, proc.stderr
    assert f"{len(odd_files.bad)} skipped (see {out / 'skipped.csv'})" in proc.stdout
    assert {r["source"] for r in read_csv(out / "skipped.csv")} == set(odd_files.bad)


def test_build_dataset_decompression_bomb(cli, photo_dir, tmp_path):
    out = tmp_path / "out"
    proc = cli("build-dataset", photo_dir, out, "--preset", "lesson7", "--max-pixels", "100", "--quiet")
    assert_one_line_error(proc, "no pairs could be built", code=1)
    reasons = read_csv(out / "skipped.csv")
    assert len(reasons) == len(list(photo_dir.rglob("*.*")))
    assert all("decompression bomb" in r["reason"] for r in reasons)


def test_build_dataset_only_bad_files(cli, bad_only_dir, tmp_path):
    out = tmp_path / "out"
    proc = cli("build-dataset", bad_only_dir, out, "--preset", "lesson7", "--quiet")
    assert_one_line_error(proc, "no pairs could be built", "3 file(s) skipped", code=1)
    reasons = {r["source"]: r["reason"] for r in read_csv(out / "skipped.csv")}
    assert reasons == {"empty.jpg": "empty file", "notes.txt": "not an image file (extension .txt)",
                       "text.jpg": "not a recognised image format"}
    assert read_csv(out / "manifest.csv") == []


@pytest.mark.parametrize("args, fragments, code", [
    (["--preset", "nope"], ["unknown preset 'nope'", "lesson7", "srgan-x4"], 2),
    (["--preset", "missing.yaml"], ["preset file not found"], 2),
    (["--preset", "lesson7", "--scale", "4"], ["lesson7", "--scale"], 2),
    (["--preset", "srgan-x4", "--scale", "2"], ["fixes scale 4", "--scale 2"], 2),
    (["--split", "0.5,0.5"], ["--split expects three ratios"], 2),
    (["--split", "a,b,c"], ["--split expects three ratios"], 2),
    (["--split", "0.5,0.5,0.5"], ["split", "sum to 1"], 2),
    (["--size", "2"], ["size"], 2),
    (["--workers", "0"], ["workers"], 2),
])
def test_build_dataset_config_errors(cli, photo_dir, tmp_path, args, fragments, code):
    out = tmp_path / "out"
    proc = cli("build-dataset", photo_dir, out, *args, "--quiet")
    assert_one_line_error(proc, *fragments, code=code)
    assert not out.exists()


def test_build_dataset_missing_src(cli, tmp_path):
    proc = cli("build-dataset", tmp_path / "missing", tmp_path / "out", "--quiet")
    assert_one_line_error(proc, "source folder not found", code=1)
    assert not (tmp_path / "out").exists()


def test_build_dataset_unknown_config_key(cli, photo_dir, tmp_path):
    config = tmp_path / "build.yaml"
    config.write_text("preset: lesson7\ncolour: red\n")
    proc = cli("build-dataset", photo_dir, tmp_path / "out", "--config", config)
    line = assert_one_line_error(proc, "unknown option 'colour'", "valid:", "preset", code=2)
    assert "seed" in line


@pytest.mark.parametrize("text, fragment", [("- a\n- b\n", "must hold a mapping"),
                                            ("a: [1, 2\n", "not valid YAML")])
def test_build_dataset_bad_config_file(cli, photo_dir, tmp_path, text, fragment):
    config = tmp_path / "build.yaml"
    config.write_text(text)
    assert_one_line_error(cli("build-dataset", photo_dir, tmp_path / "out", "--config", config), fragment, code=2)


def test_build_dataset_missing_config_file(cli, photo_dir, tmp_path):
    proc = cli("build-dataset", photo_dir, tmp_path / "out", "--config", tmp_path / "nope.yaml")
    assert_one_line_error(proc, "config file not found", code=2)


def test_build_dataset_refuses_a_non_dataset_folder(cli, photo_dir, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    proc = cli("build-dataset", photo_dir, out, "--preset", "lesson7", "--overwrite", "--quiet")
    assert_one_line_error(proc, "not a crappify dataset", code=1)
    assert [p.name for p in out.iterdir()] == ["keep.txt"]


def test_click_usage_errors_have_no_traceback(cli, photo_dir, tmp_path):
    for args in (["build-dataset"], ["build-dataset", photo_dir, tmp_path / "o", "--source", "nope"],
                 ["build-dataset", photo_dir, tmp_path / "o", "--size", "big"], ["nope"]):
        proc = cli(*args)
        assert proc.returncode == 2, proc.stderr
        assert "Traceback" not in proc.stderr
        assert "Error:" in proc.stderr


# --- preview --------------------------------------------------------------------------------------------


def test_preview_grid(cli, one_photo, tmp_path):
    grid = tmp_path / "sub" / "grid.png"
    proc = cli("preview", one_photo, "--preset", "lesson7", "-o", grid, "--height", "64")
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == f"wrote {grid}"
    assert grid.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    with Image.open(grid) as img:
        w, h = img.size
        assert img.mode == "RGB"
    assert h > 0
    assert w > 64 * 2
    # HR, text, resize and jpeg steps, final LR: 5 tiles, so two rows of up to 4 tiles
    assert h > 2 * 64


def test_preview_is_deterministic_and_depends_on_seed(cli, one_photo, tmp_path):
    a, b, c = tmp_path / "a.png", tmp_path / "b.png", tmp_path / "c.png"
    for path, seed in ((a, "1"), (b, "1"), (c, "2")):
        proc = cli("preview", one_photo, "--preset", "flickr30k-restore", "-o", path, "--seed", seed,
                   "--size", "64", "--height", "48")
        assert proc.returncode == 0, proc.stderr
    assert a.read_bytes() == b.read_bytes()
    assert a.read_bytes() != c.read_bytes()


def test_preview_default_tile_height_is_capped_by_the_image(cli, one_photo, tmp_path):
    from crappify.preview import LABEL_HEIGHT, PAD

    grid = tmp_path / "grid.png"
    assert cli("preview", one_photo, "-o", grid, "--preset", "srgan-x4").returncode == 0
    with Image.open(one_photo) as src, Image.open(grid) as img:
        w, h = src.size
        hr_w, hr_h = w - w % 4, h - h % 4
        # one row (HR, the resize step, final LR) at the HR's own height, never enlarged to 256
        assert img.size[1] == hr_h + LABEL_HEIGHT + 2 * PAD
        assert img.size[0] == 3 * (hr_w + PAD) + PAD


@pytest.mark.parametrize("case", ["missing", "bad-image", "bad-preset", "bad-suffix", "too-small", "bad-scale"])
def test_preview_errors(cli, one_photo, odd_files, tmp_path, case):
    out = tmp_path / "grid.png"
    args, fragment, code = {
        "missing": ([tmp_path / "nope.jpg", "-o", out], "image not found", 1),
        "bad-image": ([odd_files.root / "text.jpg", "-o", out], "cannot read", 1),
        "bad-preset": ([one_photo, "--preset", "nope", "-o", out], "unknown preset", 2),
        "bad-suffix": ([one_photo, "-o", tmp_path / "grid.gif"], "--output must end in .png or .jpg", 2),
        "too-small": ([one_photo, "--size", "5000", "-o", out], "smaller than --size 5000", 1),
        "bad-scale": ([one_photo, "--preset", "lesson7", "--scale", "4", "-o", out], "--scale", 2),
    }[case]
    assert_one_line_error(cli("preview", *args), fragment, code=code)
    assert not out.exists()


# --- demo -----------------------------------------------------------------------------------------------


# --- the command layer: choices from registries, old module paths --------------------------------------


def _literal(config: type, field: str) -> tuple:
    from typing import get_args

    return get_args(config.model_fields[field].annotation)


def test_choice_lists_match_their_registries_and_config_types():
    """The CLI writes out the choices `srgan` owns (importing its registries would import torch and slow
    `--help`); each list must equal the registry or the config field's Literal it stands for."""
    from crappify.builder import BuildConfig
    from crappify.cli import options
    from crappify.cli import run as cli_run
    from crappify.precision import PRECISIONS
    from crappify.sources import SOURCES
    from srgan.adversarial import ADVERSARIAL
    from srgan.critics import CRITICS
    from srgan.data import DEGRADE_MODES
    from srgan.demo import DEMO_OUT
    from srgan.evaluate import EvaluateConfig
    from srgan.train_critic import TrainCriticConfig
    from srgan.train_gan import TrainGanConfig
    from srgan.train_gen import TrainGenConfig

    assert sorted(options.ADV_LOSSES) == ADVERSARIAL.names()  # the config field checks names against ADVERSARIAL
    for name in ADVERSARIAL:
        assert TrainGanConfig(data="d", out="o", adv_loss=name).adv_loss == name
    with pytest.raises(ValueError, match="unknown adversarial loss 'nope'; valid: bce, hinge, lsgan, wgan-gp"):
        TrainGanConfig(data="d", out="o", adv_loss="nope")
    assert _literal(TrainGanConfig, "weighting") == options.WEIGHTINGS
    assert _literal(TrainGanConfig, "switching") == options.SWITCHINGS
    for degrade in (DEGRADE_MODES, _literal(TrainGenConfig, "degrade"), _literal(TrainGanConfig, "degrade")):
        assert degrade == options.DEGRADE_MODES
    assert sorted(options.CRITIC_ARCHS) == CRITICS.names()
    assert options.PRECISIONS == PRECISIONS
    for config in (TrainGenConfig, TrainCriticConfig, TrainGanConfig, EvaluateConfig):
        assert _literal(config, "precision") == options.PRECISIONS, config
    for config in (TrainGenConfig, TrainCriticConfig, TrainGanConfig):
        assert _literal(config, "log") == options.LOG_FORMATS, config
    assert Path(cli_run.DEMO_OUT) == DEMO_OUT
    # sources come from the registry itself: the CLI's choices lazily, the build config's check when it is read
    assert options.SOURCE_CHOICE.choices == ("auto", *SOURCES)
    for name in options.SOURCE_CHOICE.choices:
        assert BuildConfig(src="s", out="o", source=name).source == name
    with pytest.raises(ValueError, match="unknown source 'nope'; valid: auto, celeba, celeba-hq, flickr30k, folder"):
        BuildConfig(src="s", out="o", source="nope")


def test_help_shows_the_registry_choices(cli):
    from crappify.cli import options

    proc = cli("build-dataset", "--help")
    assert f"[{'|'.join(options.SOURCE_CHOICE.choices)}]" in proc.stdout
    proc = cli("train-gan", "--help")
    assert f"[{'|'.join(options.ADV_LOSSES)}]" in proc.stdout and f"[{'|'.join(options.SWITCHINGS)}]" in proc.stdout
    proc = cli("train-critic", "--help")
    assert all(name in " ".join(proc.stdout.split()) for name in options.CRITIC_ARCHS)


def test_help_imports_neither_torch_nor_srgan():
    import subprocess
    import sys

    code = ("import sys\nfrom crappify.cli import main\n"
            "for argv in ([], ['build-dataset'], ['train-gan'], ['enhance'], ['run'], ['demo']):\n"
            "    try:\n        main([*argv, '--help'])\n    except SystemExit:\n        pass\n"
            "print(sorted(m for m in sys.modules if m.split('.')[0] in ('torch', 'fastai', 'srgan')))\n")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip().splitlines()[-1] == "[]"


def test_importing_the_app_warns_about_nothing():
    import subprocess
    import sys

    proc = subprocess.run([sys.executable, "-W", "error::DeprecationWarning", "-c", "import crappify.cli"],
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr


def test_every_stage_command_reads_the_precision_from_the_environment_unless_given(monkeypatch):
    """One rule for every command: --precision, else $CRAPPIFY_PRECISION, else the option's (or config's) default;
    `run` and `demo` read it the same way (tests/srgan/test_pipeline.py)."""
    import click
    from click.testing import CliRunner

    from crappify.cli.options import stage_precision_option
    from crappify.errors import ConfigError

    @click.command()
    @stage_precision_option(default="auto")
    def show(precision):
        click.echo(precision)

    runner = CliRunner()
    monkeypatch.delenv("CRAPPIFY_PRECISION", raising=False)
    assert runner.invoke(show, []).output.strip() == "auto"
    monkeypatch.setenv("CRAPPIFY_PRECISION", "bf16")
    assert runner.invoke(show, []).output.strip() == "bf16"
    assert runner.invoke(show, ["--precision", "fp32"]).output.strip() == "fp32"  # the flag wins
    monkeypatch.setenv("CRAPPIFY_PRECISION", "bogus")
    res = runner.invoke(show, [])  # the app prints a ConfigError as one line and exits 2 (the next test)
    assert isinstance(res.exception, ConfigError) and "CRAPPIFY_PRECISION='bogus'" in str(res.exception)


@pytest.mark.parametrize("command", ["enhance", "evaluate", "train-gen"])
def test_a_bad_precision_in_the_environment_stops_a_stage_command_in_one_line(command, cli, tmp_path, monkeypatch):
    monkeypatch.setenv("CRAPPIFY_PRECISION", "bogus")
    args = {"enhance": ["enhance", tmp_path, "-m", tmp_path / "g.safetensors", "-o", tmp_path / "out"],
            "evaluate": ["evaluate", tmp_path, "-m", tmp_path / "g.safetensors", "-o", tmp_path / "r.md"],
            "train-gen": ["train-gen", tmp_path, "-o", tmp_path / "out"]}[command]
    res = cli(*args)
    assert res.returncode == 2 and "Traceback" not in res.stderr, res.stderr
    assert [line for line in res.stderr.splitlines() if "CRAPPIFY_PRECISION" in line] == [
        "crappify: error: CRAPPIFY_PRECISION='bogus' is not a precision; valid: auto, fp32, bf16, fp16"], res.stderr
    assert not (tmp_path / "out").exists()
