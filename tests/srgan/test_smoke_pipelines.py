"""`crappify run PIPELINE --smoke`: every shipped pipeline runs every stage end to end at toy size.

Parametrized over the pipelines/ folder, so a pipeline added there is covered without a change here. Each
run checks that smoke mode changed nothing but the keys `srgan.smoke.SMOKE_KEYS` lists (architecture,
losses, critic, adversarial loss, switching, optimiser settings, preset and scale stay the recipe's), that
every stage finished with its outputs, and that nothing was written outside the run's own folder. A recipe
whose later stages another runs with the same settings stops before them (STOPS_BEFORE, conftest.py).
"""

from __future__ import annotations

import csv
import json
import time
from pathlib import Path

import pytest
import yaml
from conftest import without_covered_stages

from srgan.pipeline import (
    PIPELINES_DIR,
    as_smoke,
    generator_files,
    load_pipeline,
    paths_of,
    read_state,
    result_file,
    run_pipeline,
    stage_configs,
)
from srgan.smoke import SMOKE_KEYS

PIPELINES = sorted(PIPELINES_DIR.glob("*.yaml"))
PATH_KEYS = {"data", "out", "src", "models"}  # where things are: the smoke run's own folder
SECONDS: dict[str, float] = {}


def changed_keys(before, after) -> set[str]:
    a, b = before.model_dump(mode="json"), after.model_dump(mode="json")
    return {k for k in a.keys() | b.keys() if a.get(k) != b.get(k)} - PATH_KEYS


@pytest.mark.parametrize("path", PIPELINES, ids=lambda p: p.stem)
def test_smoke_keeps_the_recipe(path, tmp_path):
    """Only the keys smoke_overrides documents change; what they resolve to keeps the recipe's model."""
    recipe = stage_configs(load_pipeline(path, str(tmp_path / "out")))
    smoke = stage_configs(load_pipeline(path, str(tmp_path / "out"), smoke=True))
    assert list(recipe) == list(smoke)
    for stage in recipe:
        extra = changed_keys(recipe[stage], smoke[stage]) - set(SMOKE_KEYS[stage])
        assert not extra, f"{stage}: smoke changed {sorted(extra)}"
    gen = smoke.get("train-gen")
    if gen is not None and hasattr(gen, "resolved"):  # defaults that follow `pretrained` stay the recipe's
        want, got = recipe["train-gen"].resolved(), gen.resolved()
        for key in ("arch", "options", "loss", "lr"):
            assert getattr(got, key) == getattr(want, key), key
        assert len(got.schedule()) == len(want.schedule())  # the same number of train-gen stages
        assert [st.lr for st in got.schedule()] == [st.lr for st in want.schedule()]
    build, recipe_build = smoke["build-dataset"], recipe["build-dataset"]
    assert (build.preset, build.scale, build.split, build.seed) == (recipe_build.preset, recipe_build.scale,
                                                                    recipe_build.split, recipe_build.seed)
    for stage, cfg in smoke.items():
        values = cfg.model_dump()
        if "pretrained" in values:
            assert values["pretrained"] is False, stage
        if "precision" in values:
            assert values["precision"] == "fp32", stage
        for key in PATH_KEYS & values.keys():  # everything is read and written under the run's folder
            for where in values[key] if isinstance(values[key], list) else [values[key]]:
                assert where == "samples" or Path(where).is_relative_to(tmp_path), (stage, key, where)


def test_overrides_win_and_the_default_out_is_beside_the_recipes(tmp_path):
    path = PIPELINES_DIR / "celeba-wgan-gp.yaml"
    p = load_pipeline(path, smoke=True)
    assert p.smoke and p.out == load_pipeline(path).out + "-smoke"
    assert as_smoke(load_pipeline(path)).out == p.out and as_smoke(p) is p
    cfgs = stage_configs(load_pipeline(path, str(tmp_path), smoke=True), {"precision": "bf16", "device": "cpu"})
    assert cfgs["train-gan"].precision == "bf16" and cfgs["train-gan"].device == "cpu"
    assert cfgs["train-gan"].pretrained is False and cfgs["train-gan"].iters == 6  # fixed: 5 critic + 1 gen


def test_run_command_takes_smoke(cli, tmp_path):
    res = cli("run", "celeba-hq-srgan-x4", "--smoke", "--dry-run", "-o", tmp_path / "out", cwd=tmp_path)
    assert res.returncode == 0, res.stderr
    assert "(smoke)" in res.stdout.splitlines()[0] and "data:" not in res.stdout  # needs no data/
    assert [line.split()[:2] for line in res.stdout.splitlines()[1:]] == [
        [s, "run"] for s in ("build-dataset", "train-gen", "train-critic", "train-gan", "evaluate")]
    assert not (tmp_path / "data").exists()


@pytest.mark.slow
@pytest.mark.parametrize("path", PIPELINES, ids=lambda p: p.stem)
def test_smoke_run_finishes_every_stage(path, tmp_path):
    out = tmp_path / "out"
    p = without_covered_stages(load_pipeline(path, str(out), smoke=True))  # see STOPS_BEFORE (conftest.py)
    t0 = time.perf_counter()
    steps = run_pipeline(p, progress=False, overrides={"precision": "fp32"})
    SECONDS[path.stem] = time.perf_counter() - t0
    print(f"\nsmoke {path.stem}: {SECONDS[path.stem]:.1f} s")
    stages = [s.stage for s in steps]
    for stage in stages:
        state = read_state(out / ".pipeline", stage)
        assert state["status"] == "done" and state["smoke"] is True, stage
    assert yaml.safe_load((out / "pipeline.yaml").read_text())["smoke"] is True
    run = out / "run"
    if "train-gen" in stages:
        assert (run / "generator.safetensors").is_file()
    if "train-critic" in stages:
        assert (run / "critic.safetensors").is_file()
    if "train-gan" in stages:
        gan = run / "gan"
        assert (gan / "generator.safetensors").is_file() and (gan / "checkpoints" / "last.pt").is_file()
        assert list((gan / "checkpoints").glob("generator_*.safetensors"))
        with open(gan / "history.csv", newline="") as fh:
            last = list(csv.DictReader(fh))[-1]
        # both networks step in every recipe (adaptive switching too: smoke starts it on the generator), so the
        # adversarial term, its weighting and the EMA update run here
        assert int(last["crit_steps"]) >= 1 and int(last["gen_steps"]) >= 1
    # the dataset: sample photos, built inside the run's folder at the recipe's scale
    from crappify.builder import effective_scale, load_preset

    recipe_build = stage_configs(load_pipeline(path, str(out)))["build-dataset"]
    dataset = yaml.safe_load((out / "dataset" / "config.yaml").read_text())
    assert dataset["scale"] == effective_scale(load_preset(recipe_build.preset), recipe_build.scale)
    assert (out / "dataset" / "manifest.csv").is_file()
    if "evaluate" in stages:
        with open(out / "eval" / "metrics.csv", newline="") as fh:
            rows = list(csv.DictReader(fh))
        # each generator scored, EMA copies included, and the recipe's result named
        made = generator_files(stage_configs(p), paths_of(p))
        assert {r["method"] for r in rows} == {"bicubic", *made}
        assert json.loads((out / "eval" / "summary.json").read_text())["result"] == list(made)[-1]
        assert 1 <= len({r["id"] for r in rows}) <= 2 and (out / "eval" / "report.md").is_file()
    # every generator file the run wrote (train-gen's, the GAN's, EMA copies, checkpoints) records the data's
    # scale, which enhance upscales by without --scale: run for every file of the demo (a small U-Net, whose
    # network is x1, so the record is all enhance has), and for the recipe's result of the others
    files = sorted(run.rglob("generator*.safetensors"))
    assert files
    check_generator_files(files, dataset["scale"] or 1, tmp_path,
                          enhanced=files if path.stem == "demo" else [result_file(p)])


def check_generator_files(files: list[Path], scale: int, tmp_path: Path, enhanced: list[Path]) -> None:
    """Each file records `data_scale`; `enhance` without --scale writes a photo `scale` times its size with each
    of `enhanced`."""
    import numpy as np

    from crappify.imageio import decode, save_image_atomic
    from srgan.checkpoint import read_generator_meta
    from srgan.enhance import enhance

    for f in files:
        assert read_generator_meta(f)["extra"]["data_scale"] == scale, f
    photo = tmp_path / "in.png"
    save_image_atomic(photo, np.random.default_rng(0).integers(0, 256, (40, 56, 3), dtype=np.uint8))
    for i, f in enumerate(enhanced):
        out = tmp_path / "enhanced" / str(i)
        enhance([str(photo)], str(f), str(out), device="cpu", precision="fp32", progress=False)
        assert decode(out / "in.png").shape[:2] == (40 * scale, 56 * scale), f
