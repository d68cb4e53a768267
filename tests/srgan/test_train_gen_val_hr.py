"""train-gen --val-hr: each epoch scored on a benchmark folder as `evaluate --hr` scores it; --keep-best."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import cv2
import pytest

from crappify.errors import ConfigError
from srgan.checkpoint import read_generator_meta
from srgan.evaluate import EvaluateConfig, evaluate
from srgan.train_gen import Trainer, TrainGenConfig

TINY_SR = {"arch": "srresnet", "options": {"n_blocks": 1, "n_feats": 8}, "pretrained": False, "size": 32, "bs": 2,
           "loss": "l1", "lr": 3e-3, "preview_items": 0}


@pytest.fixture(scope="module")
def val_folder(tmp_path_factory, photo_maker) -> Path:
    """Three real photos of odd sizes (mod_crop at x4 takes 1-3 px off)."""
    root = tmp_path_factory.mktemp("val") / "Set3" / "HR"
    root.mkdir(parents=True)
    for k, side in enumerate((61, 70, 67)):
        cv2.imwrite(str(root / f"img{k}.png"), cv2.cvtColor(photo_maker(k + 2, side), cv2.COLOR_RGB2BGR))
    return root


def history(run: Path) -> list[dict[str, str]]:
    with open(run / "history.csv", newline="") as fh:
        return list(csv.DictReader(fh))


def evaluated_psnr_y(model: Path, folder: Path, out: Path) -> float:
    evaluate(EvaluateConfig(hr=str(folder), scale=4, models=[str(model)], names=["m"], out=str(out), device="cpu",
                            lpips=False, grids=0), progress=False)
    return json.loads((out / "summary.json").read_text())["means"]["m"]["psnr_y"]


def test_val_hr_scores_each_epoch_as_evaluate_does_and_keeps_the_best(sr_dataset, val_folder, tmp_path):
    run = tmp_path / "run"
    cfg = TrainGenConfig(data=str(sr_dataset), out=str(run), epochs=3, val_hr=str(val_folder),
                         keep_best="val_psnr_y", **TINY_SR)
    Trainer(cfg, progress=False).fit()
    rows = history(run)
    assert [int(r["epoch"]) for r in rows] == [1, 2, 3]
    scores = [float(r["val_psnr_y"]) for r in rows]
    assert all(10 < v < 60 for v in scores) and all(0 < float(r["val_ssim_y"]) <= 1 for r in rows)
    # the last epoch's generator is generator.safetensors: evaluate --hr gives the number the history recorded
    assert evaluated_psnr_y(run / "generator.safetensors", val_folder, tmp_path / "e1") == pytest.approx(
        scores[-1], abs=1e-5)
    best = run / "generator-best.safetensors"
    extra = read_generator_meta(best)["extra"]
    best_epoch = max(range(3), key=lambda i: scores[i]) + 1
    assert extra["epoch"] == best_epoch and extra["best"] == "val_psnr_y"
    assert extra["val_psnr_y"] == pytest.approx(max(scores), abs=1e-6)
    assert evaluated_psnr_y(best, val_folder, tmp_path / "e2") == pytest.approx(max(scores), abs=1e-5)


def test_keep_best_on_the_crop_validation_needs_no_folder(sr_dataset, tmp_path):
    run = tmp_path / "run"
    Trainer(TrainGenConfig(data=str(sr_dataset), out=str(run), epochs=2, keep_best="psnr", **TINY_SR),
            progress=False).fit()
    rows = history(run)
    assert "val_psnr_y" not in rows[0]  # no --val-hr: the history keeps its columns
    psnrs = [float(r["psnr"]) for r in rows]
    extra = read_generator_meta(run / "generator-best.safetensors")["extra"]
    assert extra["epoch"] == max(range(2), key=lambda i: psnrs[i]) + 1


def test_val_options_are_checked_before_training(sr_dataset, val_folder, tmp_path):
    from crappify.config import resolve

    with pytest.raises(ConfigError, match="needs --val-hr"):
        resolve(TrainGenConfig, None, data="d", out="o", keep_best="val_ssim_y")
    with pytest.raises(ConfigError, match="--val-lr goes with --val-hr"):
        resolve(TrainGenConfig, None, data="d", out="o", val_lr="x")
    with pytest.raises(ConfigError, match="HR folder not found"):
        Trainer(TrainGenConfig(data=str(sr_dataset), out=str(tmp_path / "r"), val_hr=str(tmp_path / "nope"),
                               **TINY_SR), progress=False)
    assert not (tmp_path / "r").exists()
