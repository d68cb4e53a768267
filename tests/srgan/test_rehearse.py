"""`crappify run --rehearse`: every stage of a recipe at its real settings for a few steps, timed, with an estimate
of the full run, written only under the rehearsal's own folder; a stand-in of the real dataset's layout where the
source is not there; one line when there is neither."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from conftest import STOPS_BEFORE, recipe_structure, without_covered_stages

from crappify.errors import CrappifyError
from srgan.pipeline import PIPELINES_DIR, STAGES, load_pipeline
from srgan.rehearse import StageReport, _eta, _median_after_warmup, rehearse, table

TRAINING = ("train-gen", "train-critic", "train-gan")


def _check(result: dict, root: Path, stages: list[str]) -> dict[str, dict]:
    by_stage = {s["stage"]: s for s in result["stages"]}
    assert list(by_stage) == stages
    assert json.loads((root / "rehearsal.json").read_text()) == result
    for stage, rep in by_stage.items():
        assert rep["seconds"] > 0 and rep["eta_seconds"] is not None and rep["eta_seconds"] > 0, rep
        assert rep["peak_rss_mib"] is None or rep["peak_rss_mib"] > 50
        if stage in TRAINING:
            assert rep["resumed"] is True, rep  # stopped after its first step as SIGTERM stops it, then resumed
            assert rep["steps"] >= 1 and rep["step_seconds"] > 0 and rep["images_per_second"] > 0, rep
            assert 0 <= rep["loader_wait"] <= 1
    assert result["eta_seconds"] == pytest.approx(sum(s["eta_seconds"] for s in result["stages"]), abs=0.2)
    return by_stage


def test_the_demo_rehearses_every_stage_at_its_real_size(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # the recipe's own out (runs/demo) would land here: it must not appear
    lines: list[str] = []
    p = load_pipeline(PIPELINES_DIR / "demo.yaml")
    p.sample_crops.update(train=48)  # fewer crops (train-critic predicts them all first); sizes and batches as real
    result = rehearse(p, str(tmp_path / "r"), steps=2, report=lines.append)
    by_stage = _check(result, tmp_path / "r", list(STAGES))
    gen = by_stage["train-gen"]
    assert gen["steps"] == 1 + 2 and list(gen["shapes"]) == ["64 px x 16"] and not gen["warmup_only"]
    assert by_stage["train-critic"]["steps"] == 1 + 2
    gan = by_stage["train-gan"]
    assert gan["steps"] >= 2 and set(gan["shapes"]) == {"critic", "generator"}  # both networks trained
    assert not (tmp_path / "runs").exists()
    assert (tmp_path / "r" / "run" / "generator.safetensors").is_file()
    assert (tmp_path / "r" / "run" / "checkpoints" / "last.pt").is_file()  # a checkpoint was written
    assert "| **pipeline** |" in lines[-1] and "full stage" in lines[-1]
    import torch

    assert not torch.is_autocast_enabled("cpu")  # a phase cut short leaves no autocast entered (precision auto)


@pytest.mark.slow
def test_a_recipe_without_its_data_rehearses_on_a_stand_in_of_its_layout(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # data/celeba (the recipe's source) is not here
    p = load_pipeline(PIPELINES_DIR / "celeba-pytorch-gan.yaml")  # a joint GAN at 256 px: its real settings
    result = rehearse(p, str(tmp_path / "r"), {"pretrained": False}, steps=1)
    by_stage = _check(result, tmp_path / "r", ["build-dataset", "train-gan", "evaluate"])
    assert set(by_stage["train-gan"]["shapes"]) == {"generator + critic"}  # per-batch: both in every step
    assert "stand-in of CelebA aligned" in result["data"] and result["real_photos"] == 202_599
    assert (tmp_path / "r" / "standin" / "list_eval_partition.txt").is_file()
    assert not (tmp_path / "data").exists()  # neither the recipe's source nor its dataset folder was made


def test_no_source_and_no_stand_in_layout_is_one_line(tmp_path):
    p = load_pipeline(PIPELINES_DIR / "realesrgan-x4.yaml")
    p = p.model_copy(update={"standin": None, "build_dataset": {**p.build_dataset, "src": str(tmp_path / "none")}})
    with pytest.raises(CrappifyError, match="names no stand-in layout") as err:
        rehearse(p, str(tmp_path / "r"), steps=1)
    assert "\n" not in str(err.value)


def test_every_shipped_recipe_has_its_data_or_a_stand_in():
    from crappify.standins import STANDINS
    from srgan.rehearse import LAYOUT_OF_SOURCE

    for path in PIPELINES_DIR.glob("*.yaml"):
        p = load_pipeline(path)
        if p.sample_crops is None:
            assert (p.standin or LAYOUT_OF_SOURCE.get(p.build_dataset.get("source"))) in STANDINS, path.stem


def test_medians_leave_out_each_shapes_first_step():
    records = [("128 px x 8", 9.0, 0.5, 8, 0), ("128 px x 8", 1.0, 0.5, 8, 0), ("128 px x 8", 3.0, 0.5, 8, 0),
               ("256 px x 4", 5.0, 0.0, 4, 0)]  # (shape, seconds, wait for the batch, images, run)
    assert _median_after_warmup(records) == {"128 px x 8": 2.5, "256 px x 4": 5.0}
    # the resumed run (1) warms up again: its first step of each shape is left out too
    records = [("64 px x 16", 9.0, 0.0, 16, 0), ("64 px x 16", 8.0, 0.0, 16, 1), ("64 px x 16", 2.0, 0.0, 16, 1),
               ("64 px x 16", 4.0, 0.0, 16, 1)]
    assert _median_after_warmup(records) == {"64 px x 16": 3.0}


def test_the_estimate_counts_the_real_runs_steps():
    """train-gen: every phase's epochs x batches of the real dataset at the measured rate, plus validation."""
    from srgan.rehearse import Data
    from srgan.train_gen import TrainGenConfig

    class Timer:
        records = [("64 px x 16", 5.0, 0.0, 16, 0), ("64 px x 16", 0.4, 0.1, 16, 0)]
        valid = [(2.0, 10)]  # 0.2 s an item

    cfg = TrainGenConfig(data="d", out="o", arch="unet-small", pretrained=False, size=64, bs=16, epochs=3)
    data = Data("src", photos=100, real_photos=10_000, what="")
    built = {"train": 80, "valid": 10, "test": 10, "pairs": 100}  # every photo kept: 8,000 / 1,000 / 1,000 real
    eta = _eta("train-gen", cfg, Timer(), 60.0, data, built, {})
    assert eta == pytest.approx(3 * (8000 // 16 * 0.5 + 1000 * 0.2))
    assert _eta("build-dataset", None, Timer(), 20.0, data, built, {}) == pytest.approx(20.0 / 100 * 10_000)
    # evaluate: 4 pairs in 10 s, 1 pair in 4 s -> 2 s a pair after 2 s of start-up, counted once
    from srgan.evaluate import EvaluateConfig

    ev = EvaluateConfig(data="d", models=["m"], out="o")
    assert _eta("evaluate", ev, Timer(), 10.0, data, built, {"eval_one_pair": 4.0}) == pytest.approx(2 + 2 * 1000)


def test_the_table_names_every_stage_and_the_total():
    rep = StageReport("train-gen", 12.0, steps=3, step_seconds=2.0, images_per_second=8.0, loader_wait=0.1,
                      peak_rss_mib=900.0, eta_seconds=7200.0)
    text = table({"pipeline": "x", "device": "CPU", "steps": 3, "data": "d", "eta_seconds": 7200.0,
                  "stages": [rep.__dict__]})
    assert "| train-gen | 12.0 s | 2 | 8 | 10% | 900 MiB | - | 2.0 h |" in text and "**2.0 h**" in text


def test_a_checkpoint_that_cannot_be_resumed_fails_the_rehearsal(tmp_path, monkeypatch):
    """The rehearsal resumes each training stage from the checkpoint it wrote after its first step; one the
    stage cannot read back (here: every checkpoint judged unusable) ends it with one line, not a silent restart."""
    import srgan.checkpoint

    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(srgan.checkpoint, "checkpoint_problem", lambda state, required: "judged unusable")
    p = load_pipeline(PIPELINES_DIR / "demo.yaml")
    p.sample_crops.update(train=24, valid=8, test=8)
    with pytest.raises(CrappifyError, match="train-gen could not resume from the checkpoint it wrote") as err:
        rehearse(p, str(tmp_path / "r"), steps=1, report=lambda text: None)
    assert "\n" not in str(err.value)


@pytest.mark.parametrize("test_pairs, runs", [(1, 1), (3, 2)])
def test_evaluate_runs_once_more_with_one_pair_only_when_it_scores_more(test_pairs, runs, tmp_path, monkeypatch):
    """The one-pair run separates evaluate's start-up from its time per pair; with a single pair to score it would
    repeat the stage exactly (22 s of a 2-core CPU's time for realesrgan-x4's RRDB): then it is not run."""
    import srgan.rehearse

    monkeypatch.chdir(tmp_path)
    limits: list[int | None] = []
    real = srgan.rehearse._run_stage

    def counting(step, *args):
        if step.stage == "evaluate":
            limits.append(step.config.limit)
        return real(step, *args)

    monkeypatch.setattr(srgan.rehearse, "_run_stage", counting)
    p = load_pipeline(PIPELINES_DIR / "demo.yaml")
    p.sample_crops.update(train=24, valid=4, test=test_pairs)
    result = rehearse(p, str(tmp_path / "r"), steps=1, report=lambda text: None)
    assert limits == ([1] if runs == 2 else []) + [srgan.rehearse.EVAL_PAIRS]
    assert next(s for s in result["stages"] if s["stage"] == "evaluate")["eta_seconds"] > 0


# Every shipped recipe at its real geometry (stand-in layouts, crop sizes, networks, losses, phases, a checkpoint
# resumed) with batches capped at 1 and one step per phase: the full-batch rehearsal of each takes 1-4 minutes on
# a 2-core CPU (benchmarks/README.md has them), and a cap of 2 took a third longer than 1 for nothing more checked;
# the demo and celeba-pytorch-gan run at their real batches above, the smoke runs at batches over 1.
CAP = 1  # the batch every capped rehearsal runs at
CAPPED = ["celeba-hq-srgan-x4", "celeba-wgan-gp", "flickr30k-lesson7", "flickr30k-unet-mse", "realesrgan-x4",
          "srgan-keras-vgg16-tv"]


@pytest.mark.parametrize("name", list(STOPS_BEFORE))
def test_a_recipe_stops_before_the_stages_another_rehearses(name):
    """See STOPS_BEFORE (conftest.py): the stages left out are the other recipe's, apart from the keys named."""
    other, first, may_differ = STOPS_BEFORE[name]
    assert other in CAPPED and other not in STOPS_BEFORE  # the other is rehearsed (and smoke-run) whole
    mine, theirs = recipe_structure(name), recipe_structure(other)
    later = list(STAGES)[list(STAGES).index(first):]
    assert [s for s in later if s in mine] == [s for s in later if s in theirs] != []
    for stage in later:
        if stage in mine:
            differ = {k for k in mine[stage].keys() | theirs[stage].keys()
                      if mine[stage].get(k) != theirs[stage].get(k)}
            assert differ <= may_differ, (stage, differ)
    # what those stages read from the ones before: the generator's network and the HR crops' size
    for key in ("arch", "options", "pretrained", "weights", "init"):
        assert mine["train-gen"][key] == theirs["train-gen"][key], key
    assert mine["build-dataset"]["size"] == theirs["build-dataset"]["size"]


def test_every_shipped_recipe_is_rehearsed_in_the_suite():
    assert sorted([*CAPPED, "demo", "celeba-pytorch-gan"]) == sorted(p.stem for p in PIPELINES_DIR.glob("*.yaml"))


@pytest.mark.slow
@pytest.mark.parametrize("name", CAPPED)
def test_each_recipe_rehearses_on_a_stand_in_of_its_layout_at_its_real_crop_sizes(name, tmp_path, monkeypatch):
    from srgan.train_gen import plan_phases

    monkeypatch.chdir(tmp_path)  # no data/ here: every recipe makes a stand-in of its dataset
    p = without_covered_stages(load_pipeline(PIPELINES_DIR / f"{name}.yaml"))
    lines: list[str] = []
    result = rehearse(p, str(tmp_path / "r"), steps=1, max_batch=CAP, report=lines.append)
    stages = [s for s in STAGES if getattr(p, s.replace("-", "_"), None) is not None]
    by_stage = _check(result, tmp_path / "r", stages)
    assert (tmp_path / "r" / "standin").is_dir() and not (tmp_path / "data").exists()
    assert result["max_batch"] == CAP and f"batches capped at {CAP}" in lines[-1]
    if "train-gen" in by_stage:  # every phase ran, each at the recipe's own crop size
        cfg = load_pipeline(PIPELINES_DIR / f"{name}.yaml")
        from srgan.pipeline import stage_configs

        gen = stage_configs(cfg, {"pretrained": False})["train-gen"].resolved()
        sizes = {f"{ph.size} px x {min(ph.bs, CAP)}" for ph in plan_phases(gen, encoder_pretrained=False)}
        assert set(by_stage["train-gen"]["shapes"]) == sizes, by_stage["train-gen"]["shapes"]
    if name not in STOPS_BEFORE:
        gan = by_stage["train-gan"]["shapes"]
        assert set(gan) in ({"generator", "critic"}, {"generator + critic"}), gan  # both networks trained


def test_under_torchrun_the_rehearsal_says_to_run_it_in_one_process(tmp_path, monkeypatch):
    """Each rank would rehearse alone into one folder: refused in one line before anything is written."""
    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(CrappifyError, match="runs in one process") as err:
        rehearse(load_pipeline(PIPELINES_DIR / "demo.yaml"), str(tmp_path / "r"), steps=1)
    assert "\n" not in str(err.value) and not (tmp_path / "r").exists()
