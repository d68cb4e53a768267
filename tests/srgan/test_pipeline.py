"""`crappify run`: shipped pipelines validate, plans, skip/resume/rerun, kill-and-resume, data checks.

The end-to-end runs use a tiny pipeline with every stage of `pipelines/demo.yaml` (sample crops, dataset,
generator, critic, GAN, evaluation) at toy sizes — the CI-sized equivalent of `crappify demo`.
"""

from __future__ import annotations

import json
import signal
import subprocess
import time
from pathlib import Path

import pytest
import yaml

from crappify.errors import ConfigError, CrappifyError
from srgan.pipeline import (
    PIPELINES_DIR,
    STAGES,
    load_pipeline,
    paths_of,
    plan,
    read_state,
    run_pipeline,
    stage_configs,
)

# unet-small: the ResNet-18 U-Net this used before (31 M parameters, 180 MB checkpoints) cost every test that runs
# the pipeline 5-13 s more for nothing more checked; the ResNet U-Nets run in test_train_gen and the rehearsals
TINY = {
    "name": "tiny",
    "out": "OUT",
    "sample-crops": {"size": 48, "train": 12, "valid": 4, "test": 4},
    "build-dataset": {"preset": "flickr30k-restore", "scale": 2, "workers": 1},
    "train-gen": {"arch": "unet-small", "pretrained": False, "loss": "l1", "size": 32, "bs": 4, "epochs": 1,
                  "preview_items": 1, "precision": "fp32"},
    "train-critic": {"options": {"nf": 8, "n_blocks": 1}, "size": 32, "bs": 4, "epochs": 1, "precision": "fp32"},
    "train-gan": {"pretrained": False, "switching": "fixed", "size": 32, "bs": 4, "iters": 2,
                  "checkpoint_every": 1, "preview_items": 1, "precision": "fp32"},
    "evaluate": {"grids": 1, "lpips": False, "precision": "fp32"},
}


def write_pipeline(tmp: Path, changes: dict | None = None, name: str = "tiny.yaml") -> Path:
    data = json.loads(json.dumps(TINY))
    data["out"] = str(tmp / "out")
    for stage, values in (changes or {}).items():
        data[stage].update(values)
    path = tmp / name
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return path


def actions(steps) -> dict[str, str]:
    return {s.stage: s.action for s in steps}


@pytest.mark.parametrize("path", sorted(PIPELINES_DIR.glob("*.yaml")), ids=lambda p: p.stem)
def test_every_shipped_pipeline_validates(path):
    p = load_pipeline(path)
    cfgs = stage_configs(p)
    assert next(iter(cfgs)) in ("sample-crops", "build-dataset") and "evaluate" in cfgs
    assert "train-gen" in cfgs or cfgs["train-gan"].generator_arch  # a joint GAN from scratch needs no train-gen
    assert [s for s in STAGES if s in cfgs] == list(cfgs)  # in pipeline order
    if p.sample_crops is None:
        assert p.data, "a real-size pipeline documents the data layout it expects"
        assert cfgs["build-dataset"].src.startswith("data/")
    preset = cfgs["build-dataset"].preset
    if preset.endswith(".yaml"):
        assert Path(preset).is_file()


@pytest.mark.parametrize("drop, gan, match", [
    (["train-gen"], {}, "train-critic needs a train-gen stage"),
    (["train-gen", "train-critic"], {}, "train-gan has no generator"),
    (["train-critic"], {}, "train-gan has no critic"),
    (["train-gen", "train-critic"], {"generator_arch": "srresnet"}, "train-gan has no critic"),
])
def test_a_training_stage_without_its_networks_is_refused(tmp_path, drop, gan, match):
    path = write_pipeline(tmp_path)
    data = yaml.safe_load(path.read_text())
    data.setdefault("train-critic", {"epochs": 1})
    data.setdefault("train-gan", {"iters": 2})
    data["train-gan"].update(gan)
    for stage in drop:
        data.pop(stage)
    path.write_text(yaml.safe_dump(data))
    with pytest.raises(ConfigError, match=match):
        stage_configs(load_pipeline(path))
    data["train-gan"].update({"generator_arch": "srresnet", "critic_arch": "patch"})
    data.pop("train-critic", None)
    path.write_text(yaml.safe_dump(data))
    assert "train-gan" in stage_configs(load_pipeline(path))


def test_unknown_keys_and_fixed_paths_are_errors(tmp_path):
    bad = write_pipeline(tmp_path)
    data = yaml.safe_load(bad.read_text())
    data["train-gen"]["bogus"] = 1
    bad.write_text(yaml.safe_dump(data))
    with pytest.raises(ConfigError, match="stage train-gen: unknown option 'bogus'"):
        stage_configs(load_pipeline(bad))
    data["train-gen"].pop("bogus")
    data["train-gen"]["out"] = "elsewhere"
    bad.write_text(yaml.safe_dump(data))
    with pytest.raises(ConfigError, match="set by the pipeline"):
        stage_configs(load_pipeline(bad))
    data["train-gen"].pop("out")
    data["stage-x"] = {}
    bad.write_text(yaml.safe_dump(data))
    with pytest.raises(ConfigError, match="unknown option 'stage-x'"):
        load_pipeline(bad)


def test_plan_of_a_fresh_pipeline_and_bad_stage_names(tmp_path):
    p = load_pipeline(write_pipeline(tmp_path))
    assert actions(plan(p)) == dict.fromkeys(STAGES, "run")
    assert list(actions(plan(p, stop="train-gen"))) == ["sample-crops", "build-dataset", "train-gen"]
    with pytest.raises(ConfigError, match="unknown stage 'train'"):
        plan(p, start="train")
    with pytest.raises(CrappifyError, match="cannot start at train-gan"):
        plan(p, start="train-gan")


@pytest.fixture(scope="module")
def finished(tmp_path_factory) -> Path:
    """The tiny pipeline, run once to the end."""
    tmp = tmp_path_factory.mktemp("pipe")
    path = write_pipeline(tmp)
    run_pipeline(load_pipeline(path), progress=False)
    return path


def test_tiny_pipeline_runs_every_stage(finished):
    out = finished.parent / "out"
    for f in ("crops/train", "dataset/manifest.csv", "run/generator.safetensors", "run/critic.safetensors",
              "run/gan/generator.safetensors", "eval/metrics.csv", "eval/report.md", "pipeline.yaml"):
        assert (out / f).exists(), f
    for stage in STAGES:
        assert read_state(load_pipeline_paths(finished).state, stage)["status"] == "done"
    rows = (out / "eval" / "metrics.csv").read_text().splitlines()
    methods = {r.split(",")[1] for r in rows[1:]}
    assert {"train-gen", "train-gan"} <= methods and len(methods) == 3  # plus the baseline


def load_pipeline_paths(path: Path):
    from srgan.pipeline import paths_of

    return paths_of(load_pipeline(path))


def test_dry_run_prints_the_plan(finished, cli):
    res = cli("run", finished, "--dry-run")
    assert res.returncode == 0, res.stderr
    lines = [line.split() for line in res.stdout.splitlines()[1:]]
    assert [(w[0], w[1]) for w in lines] == [(s, "skip") for s in STAGES]


def test_second_run_skips_everything_and_a_change_reruns_only_what_it_affects(finished, tmp_path):
    p = load_pipeline(finished)
    assert actions(plan(p)) == dict.fromkeys(STAGES, "skip")
    # a run-only key (device) does not invalidate anything
    assert actions(plan(p, overrides={"device": "cpu"})) == dict.fromkeys(STAGES, "skip")
    changed = load_pipeline(write_pipeline(finished.parent, {"train-critic": {"lr": 5e-4}}, "changed.yaml"))
    assert actions(plan(changed)) == {"sample-crops": "skip", "build-dataset": "skip", "train-gen": "skip",
                                      "train-critic": "rerun", "train-gan": "rerun", "evaluate": "rerun"}
    changed = load_pipeline(write_pipeline(finished.parent, {"evaluate": {"grids": 2}}, "changed2.yaml"))
    steps = run_pipeline(changed, progress=False)
    assert actions(steps)["evaluate"] == "rerun" and actions(steps)["train-gan"] == "skip"
    assert len(list((finished.parent / "out" / "eval" / "grids").glob("*.png"))) == 2
    # a finished stage whose output was deleted runs again (and so do the ones after it)
    report = finished.parent / "out" / "eval" / "report.md"
    report.rename(report.with_suffix(".bak"))
    assert plan(changed)[-1].reason == "its outputs are missing"
    report.with_suffix(".bak").rename(report)
    # --from re-runs that stage and the later ones, keeping the earlier ones
    assert actions(plan(changed, start="train-gan")) == {
        "sample-crops": "skip", "build-dataset": "skip", "train-gen": "skip", "train-critic": "skip",
        "train-gan": "rerun", "evaluate": "rerun"}


@pytest.mark.slow
def test_kill_during_train_gen_then_run_again_resumes(tmp_path, cli_command):
    # a ResNet-18 U-Net: epochs long enough (seconds) that the kill lands before train-gen ends
    path = write_pipeline(tmp_path, {"train-gen": {"epochs": 3, "arch": "unet-resnet18"}}, "kill.yaml")
    out = tmp_path / "out"
    proc = subprocess.Popen([*cli_command, "run", str(path), "--quiet", "--to", "train-gen"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    ckpt = out / "run" / "checkpoints" / "last.pt"
    deadline = time.time() + 240
    while not ckpt.is_file() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.2)
    assert ckpt.is_file() and proc.poll() is None, "train-gen should still be running after its first epoch"
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    state = json.loads((out / ".pipeline" / "train-gen.json").read_text())
    assert state["status"] == "running"
    p = load_pipeline(path)
    assert actions(plan(p, stop="train-gen"))["train-gen"] == "resume"
    steps = run_pipeline(p, stop="train-gen", progress=False)
    assert actions(steps) == {"sample-crops": "skip", "build-dataset": "skip", "train-gen": "resume"}
    history = (out / "run" / "history.csv").read_text().splitlines()
    assert [line.split(",")[0] for line in history[1:]] == ["1", "2", "3"]


def test_real_pipelines_say_which_data_they_need(tmp_path, cli):
    res = cli("run", "flickr30k-lesson7", "-o", tmp_path / "out", cwd=tmp_path)
    assert res.returncode == 1
    assert res.stderr.count("\n") == 1 and "Traceback" not in res.stderr
    assert "needs its source data at data/flickr30k" in res.stderr and "flickr30k_images" in res.stderr
    (tmp_path / "data" / "celeba").mkdir(parents=True)
    res = cli("run", "celeba-wgan-gp", "-o", tmp_path / "out2", cwd=tmp_path)
    assert res.returncode == 1 and "not a CelebA folder" in res.stderr
    res = cli("run", "no-such-pipeline")
    assert res.returncode == 2 and "pipeline not found" in res.stderr and "demo" in res.stderr


def test_inspection_notebook_runs_headless_on_a_tiny_run(finished):
    nbformat = pytest.importorskip("nbformat")
    from nbclient import NotebookClient

    notebook = Path(__file__).resolve().parents[2] / "notebooks" / "inspect.ipynb"
    nb = nbformat.read(notebook, as_version=4)
    params = next(c for c in nb.cells if "parameters" in c.metadata.get("tags", []))
    assert params.source.startswith('RUN = "runs/demo"')
    params.source = f"RUN = {str(finished.parent / 'out')!r}\nDEVICE = 'cpu'"
    NotebookClient(nb, timeout=300, kernel_name="python3", resources={"metadata": {"path": str(finished.parent)}},
                   ).execute()  # raises CellExecutionError on any failing cell
    outputs = [o for c in nb.cells if c.cell_type == "code" for o in c.get("outputs", [])]
    assert not [o for o in outputs if o.get("output_type") == "error"]
    images = [o for o in outputs if "image/png" in o.get("data", {})]
    assert len(images) >= 5  # ops grid, histograms, curves, outputs, critic scores


def test_demo_results_table_and_grid(finished):
    from srgan.inspection import demo_results

    table, grid = demo_results(finished.parent / "out")
    lines = table.splitlines()
    assert lines[1].split()[:2] == ["method", "PSNR-Y"]
    assert {line.split()[0] for line in lines[2:]} >= {"train-gen", "train-gan"}
    assert grid.is_file() and grid.suffix == ".png"


def cli_script(script: str, *args) -> subprocess.CompletedProcess:
    """A script of the repository run as a user runs it, from the repository's root."""
    import sys

    root = Path(__file__).resolve().parents[2]
    return subprocess.run([sys.executable, str(root / script), *map(str, args)], capture_output=True, text=True,
                          cwd=root, timeout=120)


@pytest.mark.slow
def test_demo_command_on_a_tiny_pipeline(tmp_path, cli):
    """`crappify demo` end to end (the CI-sized pipeline): table, preview and results grid; then all skipped."""
    from PIL import Image

    path = write_pipeline(tmp_path, {"train-gen": {"epochs": 1}}, "tiny-demo.yaml")
    out = tmp_path / "demo"
    res = cli("demo", "-o", out, "--pipeline", path, "--quiet", timeout=280)
    assert res.returncode == 0, res.stderr[-2000:]
    assert "Traceback" not in res.stderr
    lines = res.stdout.splitlines()
    table = lines[lines.index(next(x for x in lines if x.startswith("method"))):]
    assert {row.split()[0] for row in table[1:4]} == {"bicubic", "train-gen", "train-gan"}
    for png in (out / "preview.png", out / "results.png"):
        with Image.open(png) as img:
            assert img.format == "PNG" and min(img.size) > 64
        assert str(png) in res.stdout
    again = cli("demo", "-o", out, "--pipeline", path, "--quiet", timeout=120)
    assert again.returncode == 0 and again.stdout.count("] skip: finished earlier") == len(STAGES)
    # the README's picture is made from such a run by docs/make_readme_figure.py
    fig = cli_script("docs/make_readme_figure.py", "--run", out, "--out", tmp_path / "fig.png", "--height", "96")
    assert fig.returncode == 0, fig.stderr[-2000:]
    assert "median train-gen gain" in fig.stdout and "Over all" in fig.stdout
    with Image.open(tmp_path / "fig.png") as img:
        assert img.size[1] == 96 and img.size[0] > 2 * 96  # the row of LR, bicubic, generators and HR
    res = cli("demo", "--pipeline", "flickr30k-lesson7", "-o", tmp_path / "x")
    assert res.returncode == 2 and "no sample-crops stage" in res.stderr


def test_every_shipped_pipeline_file_goes_into_the_wheel():
    """pyproject.toml maps pipelines/ to the package `srgan.pipelines`; its data globs must cover every file."""
    tomllib = pytest.importorskip("tomllib")
    root = Path(__file__).resolve().parents[2]
    setup = tomllib.loads((root / "pyproject.toml").read_text())["tool"]["setuptools"]
    assert "srgan.pipelines" in setup["packages"] and setup["package-dir"]["srgan.pipelines"] == "pipelines"
    globs = setup["package-data"]["srgan.pipelines"]
    files = [p.relative_to(root / "pipelines") for p in (root / "pipelines").rglob("*") if p.is_file()]
    assert files and all(any(f.match(g) and len(f.parts) == len(Path(g).parts) for g in globs) for f in files), files


def test_precision_override_reaches_every_training_and_evaluation_stage(tmp_path):
    from srgan.pipeline import find_pipeline

    p = load_pipeline(find_pipeline("demo"), out=str(tmp_path / "out"))
    steps = {s.stage: s for s in plan(p, overrides={"precision": "fp32", "device": None})}
    for stage in ("train-gen", "train-critic", "train-gan", "evaluate"):
        assert steps[stage].config.precision == "fp32", stage
    for stage in ("sample-crops", "build-dataset"):  # no precision there: the override leaves them alone
        assert "precision" not in type(steps[stage].config).model_fields, stage
    bf16 = {s.stage: getattr(s.config, "precision", None) for s in plan(p, overrides={"precision": "bf16"})}
    assert bf16 == {"sample-crops": None, "build-dataset": None, "train-gen": "bf16", "train-critic": "bf16",
                    "train-gan": "bf16", "evaluate": "bf16"}
    defaults = {s.stage: s for s in plan(p, overrides={"precision": None})}
    assert defaults["evaluate"].config.precision == "fp32" and defaults["train-gen"].config.precision == "auto"


@pytest.mark.parametrize("command", ["demo", "run"])
def test_a_bad_precision_in_the_environment_is_a_one_line_error(command, tmp_path, cli, monkeypatch):
    monkeypatch.setenv("CRAPPIFY_PRECISION", "bogus")
    args = ["demo", "-o", tmp_path / "out"] if command == "demo" else ["run", "demo", "-o", tmp_path / "out"]
    res = cli(*args)
    assert res.returncode == 2 and "Traceback" not in res.stderr
    assert res.stderr.splitlines() == ["crappify: error: CRAPPIFY_PRECISION='bogus' is not a precision; valid: "
                                       "auto, fp32, bf16, fp16"]
    assert not (tmp_path / "out").exists()


def test_precision_override_prefers_the_flag_then_the_environment(monkeypatch):
    from crappify.precision import precision_override

    monkeypatch.delenv("CRAPPIFY_PRECISION", raising=False)
    assert precision_override(None) is None and precision_override("fp16") == "fp16"
    monkeypatch.setenv("CRAPPIFY_PRECISION", "bf16")
    assert precision_override(None) == "bf16" and precision_override("fp32") == "fp32"
    monkeypatch.setenv("CRAPPIFY_PRECISION", "")
    assert precision_override(None) is None


def test_demo_results_on_a_hand_made_run(tmp_path):
    import numpy as np

    from crappify.imageio import save_image_atomic
    from srgan.inspection import demo_results

    root = tmp_path / "out"
    eval_dir = root / "eval"
    rows = ["id,method,psnr_y,ssim_y,psnr_rgb,ssim_rgb,psnr_occ,lpips"]
    for i, occ in (("a", True), ("b", False), ("c", True)):
        for m, base in (("bicubic", 20.0), ("train-gen", 22.0), ("train-gan", 21.0)):
            value = base + {"a": 0, "b": 1, "c": 2}[i]
            rows.append(f"{i},{m},{value},0.8,{value - 1},0.7,{value - 10 if occ else ''},")
    (eval_dir / "grids").mkdir(parents=True)
    (eval_dir / "metrics.csv").write_text("\n".join(rows) + "\n")
    for i in "abc":
        save_image_atomic(eval_dir / "grids" / f"{i}.png", np.full((8, 12, 3), 128, np.uint8))
    (eval_dir / "summary.json").write_text(json.dumps(
        {"output_difference": {"reference": "train-gen", "mean_abs_diff": {"train-gan": 1.8321}}}))
    (root / ".pipeline").mkdir()
    for stage, seconds in zip(STAGES, (1.24, 2.0, 150.31, 20.0, 130.5, 8.0), strict=True):
        (root / ".pipeline" / f"{stage}.json").write_text(json.dumps({"status": "done", "seconds": seconds}))
    (root / "run").mkdir()
    (root / "run" / "critic-history.csv").write_text(
        "epoch,train_loss,valid_loss,accuracy,seconds\n1,0.7,0.69,0.61,3.0\n2,0.5,0.52,0.8734,3.1\n")
    table, grid = demo_results(root)
    lines = table.splitlines()
    assert lines[1].split() == ["method", "PSNR-Y", "dB", "SSIM-Y", "PSNR-RGB", "SSIM-RGB", "PSNR-occ"]
    assert lines[2].split() == ["bicubic", "21.00", "0.8000", "20.00", "0.7000", "11.00"]
    assert lines[3].split() == ["train-gen", "23.00", "0.8000", "22.00", "0.7000", "13.00"]
    assert lines[5:] == [
        "PSNR-occ: RGB PSNR inside the occluding rectangles, over the 2 of 3 crops that have them",
        "stage times: sample-crops 1.2 s, build-dataset 2.0 s, train-gen 150.3 s, train-critic 20.0 s, "
        "train-gan 130.5 s, evaluate 8.0 s; total 5 min 12 s",
        "critic's final validation accuracy: 87.3% (epoch 2)",
        "train-gan vs train-gen outputs: mean |difference| 1.83 grey levels"]
    assert grid == root / "results.png" and grid.is_file()
    # an older run: no psnr_occ column, no summary.json, no stage times or critic history
    (eval_dir / "metrics.csv").write_text("\n".join(",".join(r.split(",")[:6]) for r in rows) + "\n")
    for f in [eval_dir / "summary.json", root / "run" / "critic-history.csv", *(root / ".pipeline").iterdir()]:
        f.unlink()
    lines = demo_results(root)[0].splitlines()
    assert lines[2].split()[-1] == "n/a" and lines[5:] == ["PSNR-occ: no held-out crop has occluding rectangles"]


@pytest.mark.skipif(__import__("torch").cuda.is_available(), reason="needs a machine without CUDA")
def test_an_unavailable_device_fails_at_the_stage_that_uses_it(tmp_path):
    """In one process the pipeline resolves no device up front (only under torchrun, for its process group): the
    stages before train-gen run, and train-gen stops with the device's one-line error."""
    p = load_pipeline(write_pipeline(tmp_path))
    with pytest.raises(ConfigError, match="no CUDA device is available"):
        run_pipeline(p, progress=False, overrides={"device": "cuda"})
    state = paths_of(p).state
    assert read_state(state, "build-dataset")["status"] == "done"
    assert read_state(state, "train-gen")["status"] == "running"


def test_stage_hash_leaves_out_options_at_their_defaults():
    """An option written out at its default hashes as if left out, so an option added later (with a default that
    keeps the old behaviour) does not re-run finished stages; another value changes the hash."""
    from srgan.pipeline import stage_hash
    from srgan.train_gen import TrainGenConfig

    plain = TrainGenConfig(data="d", out="o", arch="unet-small")
    explicit = TrainGenConfig(data="d", out="o", arch="unet-small", ema=False, eps=plain.eps, betas=None)
    other = TrainGenConfig(data="d", out="o", arch="unet-small", ema=True)
    assert stage_hash("train-gen", plain, "up") == stage_hash("train-gen", explicit, "up")
    assert stage_hash("train-gen", plain, "up") != stage_hash("train-gen", other, "up")
    assert stage_hash("train-gen", plain, "up") != stage_hash("train-gen", plain, "other upstream")


def test_the_pipeline_seed_seeds_every_stage_that_sets_none(tmp_path):
    from srgan.pipeline import PIPELINES_DIR, stage_configs

    path = PIPELINES_DIR / "demo.yaml"
    base = load_pipeline(path, out=str(tmp_path / "o"))
    assert base.seed == 0
    assert all(getattr(c, "seed", 0) == 0 for c in stage_configs(base).values())
    same = load_pipeline(path, out=str(tmp_path / "o"), seed=0)  # the default changes no stage's hash
    assert [s.hash for s in plan(base)] == [s.hash for s in plan(same)]
    seeded = load_pipeline(path, out=str(tmp_path / "o"), seed=7)
    cfgs = stage_configs(seeded)
    seeds = {stage: cfg.seed for stage, cfg in cfgs.items() if "seed" in type(cfg).model_fields}
    assert set(seeds) == {"sample-crops", "build-dataset", "train-gen", "train-critic", "train-gan"}
    assert set(seeds.values()) == {7}
    assert all(a.hash != b.hash for a, b in zip(plan(base), plan(seeded), strict=True))
    seeded.train_gen["seed"] = 3  # a stage's own seed wins
    assert stage_configs(seeded)["train-gen"].seed == 3 and stage_configs(seeded)["train-critic"].seed == 7
