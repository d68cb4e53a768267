"""evaluate: metrics on known cases, LPIPS n/a offline, the report end to end on a tiny built dataset."""

from __future__ import annotations

import csv
import math

import numpy as np
import pytest
import torch

from crappify.errors import ConfigError, CrappifyError
from srgan.checkpoint import save_generator
from srgan.evaluate import EvaluateConfig, evaluate, image_metrics, lpips_model, psnr, rgb_to_y, ssim, summarise
from srgan.models import build_generator


def test_identical_images_give_capped_psnr_and_ssim_one(photo_maker):
    img = photo_maker(0, 80)
    m = image_metrics(img, img.copy(), border=4)
    assert m["psnr_rgb"] == m["psnr_y"] == 100.0
    assert m["ssim_rgb"] == pytest.approx(1.0) and m["ssim_y"] == pytest.approx(1.0)


def test_known_gaussian_noise_gives_the_expected_psnr():
    rng = np.random.default_rng(0)
    clean = np.full((256, 256, 3), 128.0)
    noisy = clean + rng.normal(0, 10.0, clean.shape)  # sigma 10, no clipping at mid-grey
    expected = 10 * math.log10(255**2 / 100.0)  # 28.13 dB
    assert psnr(noisy, clean) == pytest.approx(expected, abs=0.05)
    assert ssim(noisy, clean) < 0.9
    y = rgb_to_y(np.array([[[0, 0, 0], [255, 255, 255]]], np.uint8))
    assert y[0, 0] == pytest.approx(16.0) and y[0, 1] == pytest.approx(235.0)


def test_summarise_gives_mean_std_and_gain():
    rows = [{"id": i, "method": m, "psnr_y": v, "ssim_y": 0.5, "psnr_rgb": v, "ssim_rgb": 0.5, "lpips": float("nan")}
            for i, (a, b) in enumerate([(20.0, 22.0), (24.0, 27.0)]) for m, v in (("bicubic", a), ("net", b))]
    summary, gains = summarise(rows, "bicubic")
    assert summary["bicubic"]["psnr_y"][0] == pytest.approx(22.0)
    assert summary["bicubic"]["psnr_y"][1] == pytest.approx(math.sqrt(8))
    assert gains["net"]["psnr_y"][0] == pytest.approx(2.5) and "lpips" not in summary["net"]


def test_lpips_is_na_with_a_reason_when_weights_are_not_local(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    model, reason = lpips_model("alex")
    assert model is None and "AlexNet_Weights" in reason and str(tmp_path) in reason


def test_config_forbids_unknown_keys():
    from crappify.config import resolve

    with pytest.raises(ConfigError, match="modles"):
        resolve(EvaluateConfig, None, data="d", models=["m"], out="o", modles=["x"])


def test_evaluate_end_to_end(sr_dataset, tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "no-weights"))
    torch.manual_seed(0)
    sr = tmp_path / "sr" / "generator.safetensors"
    sr.parent.mkdir()
    save_generator(build_generator("srresnet", scale=4, pretrained=False, n_blocks=1, n_feats=8), sr)
    unet = tmp_path / "unet.safetensors"
    save_generator(build_generator("unet-resnet18", pretrained=False, self_attention=False), unet)
    cfg = EvaluateConfig(data=str(sr_dataset), models=[str(sr.parent), str(unet)], out=str(tmp_path / "report"),
                         grids=2, device="cpu")
    report = evaluate(cfg, progress=False)
    out = tmp_path / "report"
    assert report == out / "report.md"
    with open(out / "metrics.csv", newline="") as fh:
        rows = list(csv.DictReader(fh))
    n_test = sum(1 for _ in (sr_dataset / "hr" / "test").iterdir())
    assert len(rows) == 3 * n_test and {r["method"] for r in rows} == {"bicubic", "sr", "unet"}
    assert all(float(r["psnr_y"]) > 5 and 0 < float(r["ssim_y"]) <= 1 and r["lpips"] == "" for r in rows)
    text = report.read_text()
    for needle in ("bicubic", "| sr |", "| unet |", "Y", "border of **4 px**", "n/a", "Gain over bicubic", "± "):
        assert needle in text, needle
    assert len(list((out / "grids").glob("*.png"))) == min(2, n_test)


def test_evaluate_errors(sr_dataset, tmp_path):
    with pytest.raises(CrappifyError, match="model file not found"):
        evaluate(EvaluateConfig(data=str(sr_dataset), models=[str(tmp_path / "x")], out=str(tmp_path / "r")))
    with pytest.raises(CrappifyError, match="no pairs in split"):
        evaluate(EvaluateConfig(data=str(sr_dataset), models=[str(tmp_path / "x")], out=str(tmp_path / "r"),
                                split="nope"))
    torch.manual_seed(0)
    sr2 = tmp_path / "x2.safetensors"
    save_generator(build_generator("srresnet", scale=2, pretrained=False, n_blocks=1, n_feats=8), sr2)
    with pytest.raises(CrappifyError, match="does not match"):
        evaluate(EvaluateConfig(data=str(sr_dataset), models=[str(sr2)], out=str(tmp_path / "r"), device="cpu"),
                 progress=False)


def test_evaluate_command_names_missing_flags(cli, sr_dataset, tmp_path):
    res = cli("evaluate", sr_dataset)
    assert res.returncode == 2
    assert res.stderr.strip() == "crappify: error: evaluate needs -m MODEL (or `models:` in --config)"
    res = cli("evaluate", sr_dataset, "-m", tmp_path / "x")
    assert res.returncode == 2 and "needs -o REPORT" in res.stderr
