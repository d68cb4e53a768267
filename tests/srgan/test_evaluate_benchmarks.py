"""evaluate on benchmark folders (BasicSR layouts): HR + scale, paired HR/LR folders, BasicSR's PSNR/SSIM-Y.

The reference metrics here are written independently of srgan (cv2.filter2D in 'valid' mode, as BasicSR's
`_ssim`; scikit-image for PSNR and for SSIM where its definition agrees), on the very outputs the report scored.
"""

from __future__ import annotations

import csv
import json
from pathlib import Path

import cv2
import numpy as np
import pytest
import yaml

from crappify.errors import ConfigError, CrappifyError
from srgan.benchmarks import benchmark_name, mod_crop, pair_scale
from srgan.evaluate import EvaluateConfig, evaluate, ssim
from srgan.metrics import ssim_valid
from srgan.upsample import resize_image

# odd sizes on purpose: none is a multiple of 2 or 4, so mod_crop has something to take off
SIZES = {"baby": (71, 0), "bird": (63, 1), "butterfly": (57, 2)}  # name: (long side, photo index)


def save_png(img: np.ndarray, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    cv2.imwrite(str(path), cv2.cvtColor(img, cv2.COLOR_RGB2BGR))
    return path


def read_png(path: Path) -> np.ndarray:
    return cv2.cvtColor(cv2.imread(str(path), cv2.IMREAD_COLOR), cv2.COLOR_BGR2RGB)


@pytest.fixture(scope="module")
def set5(tmp_path_factory, photo_maker) -> Path:
    """A tiny Set5-like benchmark: Set5/original/*.png, real photos of odd sizes."""
    root = tmp_path_factory.mktemp("bench") / "Set5" / "original"
    for name, (side, index) in SIZES.items():
        img = photo_maker(index, side)
        assert img.shape[0] % 2 or img.shape[1] % 2, img.shape
        save_png(img, root / f"{name}.png")
    return root


# --- the reference: BasicSR's calculate_psnr / calculate_ssim (test_y_channel=True), written independently -----


def ref_y(img: np.ndarray) -> np.ndarray:
    """BasicSR's to_y_channel on an RGB image: BT.601 Y in 16..235."""
    x = img.astype(np.float64) / 255.0
    return (x @ np.array([65.481, 128.553, 24.966]) + 16.0)


def ref_psnr(a: np.ndarray, b: np.ndarray) -> float:
    return float(10 * np.log10(255.0**2 / np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2)))


def ref_ssim(a: np.ndarray, b: np.ndarray) -> float:
    """BasicSR's _ssim: cv2.filter2D with an 11x11 Gaussian (sigma 1.5), kept only where the window fits."""
    c1, c2 = (0.01 * 255) ** 2, (0.03 * 255) ** 2
    k = cv2.getGaussianKernel(11, 1.5)
    win = k @ k.T

    def f(x: np.ndarray) -> np.ndarray:
        return cv2.filter2D(x, -1, win)[5:-5, 5:-5]

    a, b = a.astype(np.float64), b.astype(np.float64)
    mu_a, mu_b = f(a), f(b)
    va, vb, cov = f(a * a) - mu_a**2, f(b * b) - mu_b**2, f(a * b) - mu_a * mu_b
    m = ((2 * mu_a * mu_b + c1) * (2 * cov + c2)) / ((mu_a**2 + mu_b**2 + c1) * (va + vb + c2))
    return float(m.mean())


def ref_metrics(pred: np.ndarray, hr: np.ndarray, border: int) -> dict[str, float]:
    p, t = pred[border:-border, border:-border], hr[border:-border, border:-border]
    py, ty = ref_y(p), ref_y(t)
    return {"psnr_y": ref_psnr(py, ty), "ssim_y": ref_ssim(py, ty), "psnr_rgb": ref_psnr(p, t),
            "ssim_rgb": float(np.mean([ref_ssim(p[..., c], t[..., c]) for c in range(3)]))}


def read_rows(report: Path) -> dict[tuple[str, str], dict[str, str]]:
    with open(report.parent / "metrics.csv", newline="") as fh:
        return {(r["id"], r["method"]): r for r in csv.DictReader(fh)}


def model_output(model: Path, lr: np.ndarray) -> np.ndarray:
    from srgan.inference import load_inference

    return load_inference(model, "cpu")(lr)


# --- the metrics ----------------------------------------------------------------------------------------------


def test_ssim_valid_is_basicsrs_and_skimage_agrees_where_its_definition_does(photo_maker):
    from skimage.metrics import peak_signal_noise_ratio, structural_similarity

    hr = photo_maker(3, 90)
    h, w = hr.shape[:2]
    pred = resize_image(resize_image(hr, (w // 3, h // 3)), (w, h))  # a real SR-like error, not noise
    y_hr, y_pred = ref_y(hr[4:-4, 4:-4]), ref_y(pred[4:-4, 4:-4])
    assert ssim_valid(y_pred, y_hr) == pytest.approx(ref_ssim(y_pred, y_hr), abs=1e-10)
    # skimage pads by reflection but drops a 5-px border of its SSIM map before the mean: the same pixels
    sk = structural_similarity(y_pred, y_hr, gaussian_weights=True, sigma=1.5, use_sample_covariance=False,
                               data_range=255)
    assert ssim_valid(y_pred, y_hr) == pytest.approx(sk, abs=1e-6)
    assert ref_psnr(y_pred, y_hr) == pytest.approx(peak_signal_noise_ratio(y_hr, y_pred, data_range=255), abs=1e-9)
    # torchmetrics' SSIM averages its map over the reflect-padded edges too: not the papers' number
    assert abs(ssim(y_pred, y_hr) - ref_ssim(y_pred, y_hr)) > 1e-4


def test_mod_crop_and_the_scale_of_a_pair():
    img = np.zeros((23, 30, 3), np.uint8)
    assert mod_crop(img, 4).shape == (20, 28, 3) and mod_crop(img, 1).shape == img.shape
    assert pair_scale((128, 96), (32, 24)) == 4
    assert pair_scale((131, 99), (32, 24)) == 4  # up to scale-1 px more: cropped, as BasicSR's paired test set
    assert pair_scale((132, 96), (32, 24)) is None  # 4.125: not a whole number
    assert pair_scale((100, 100), (40, 40)) is None  # 2.5
    assert pair_scale((64, 96), (32, 24)) is None  # x2 across, x4 down
    assert benchmark_name("/x/Set14/GTmod12") == "Set14" and benchmark_name("/x/Urban100") == "Urban100"


# --- --hr DIR --scale S ---------------------------------------------------------------------------------------


def test_hr_and_scale_mod_crops_makes_lr_by_bicubic_and_scores_as_basicsr(set5, sr_file, tmp_path):
    from skimage.metrics import peak_signal_noise_ratio, structural_similarity

    out = tmp_path / "report"
    report = evaluate(EvaluateConfig(hr=str(set5), scale=2, models=[str(sr_file)], names=["net"], out=str(out),
                                     device="cpu", lpips=False, grids=1), progress=False)
    rows = read_rows(report)
    assert set(rows) == {(n, m) for n in SIZES for m in ("bicubic", "net")}
    for name in SIZES:
        full = read_png(set5 / f"{name}.png")
        hr = full[: full.shape[0] // 2 * 2, : full.shape[1] // 2 * 2]  # BasicSR's mod_crop, bottom and right
        assert hr.shape != full.shape  # every size here is odd on one side
        h, w = hr.shape[:2]
        lr = resize_image(hr, (w // 2, h // 2))
        for method, pred in (("bicubic", resize_image(lr, (w, h))), ("net", model_output(sr_file, lr))):
            row, ref = rows[(name, method)], ref_metrics(pred, hr, border=2)
            for key, value in ref.items():
                assert float(row[key]) == pytest.approx(value, abs=2e-6), (name, method, key)
            py, ty = ref_y(pred[2:-2, 2:-2]), ref_y(hr[2:-2, 2:-2])
            assert float(row["psnr_y"]) == pytest.approx(peak_signal_noise_ratio(ty, py, data_range=255), abs=2e-6)
            assert float(row["ssim_y"]) == pytest.approx(
                structural_similarity(py, ty, gaussian_weights=True, sigma=1.5, use_sample_covariance=False,
                                      data_range=255), abs=1e-5)
    text = report.read_text()
    assert text.startswith("# Evaluation of net on Set5\n")  # named by its folder (`original` is only a layout's)
    for needle in ("benchmark **Set5**: 3 images, ×2", "`crop_border=2`", "border of **2 px**",
                   "BasicSR's convention", "Gain over bicubic", "| net |"):
        assert needle in text, needle
    assert "occlusions" not in text
    summary = json.loads((out / "summary.json").read_text())
    assert summary["benchmark"] == "Set5" and summary["scale"] == 2 and summary["ssim"] == "basicsr"
    assert set(summary["means"]) == {"bicubic", "net"} and summary["images"] == 3
    saved = yaml.safe_load((out / "evaluate.yaml").read_text())
    assert saved["hr"] == str(set5) and saved["scale"] == 2 and saved["split"] is None
    assert EvaluateConfig(**saved).hr == str(set5)  # `--config REPORT/evaluate.yaml` reruns it
    assert len(list((out / "grids").glob("*.png"))) == 1


def test_an_image_too_small_to_score_is_named_and_left_out_of_the_means(set5, sr_file, tmp_path):
    """A 5x4 photo at x2 keeps nothing inside the 2 px border: the report says so and its means are the other
    images' (before, its empty crop counted as a perfect 100 dB)."""
    import shutil

    hr = tmp_path / "hr"
    shutil.copytree(set5, hr)
    save_png(read_png(set5 / "baby.png")[:5, :4], hr / "speck.png")
    cfgs = {name: EvaluateConfig(hr=str(folder), scale=2, models=[str(sr_file)], names=["net"],
                                 out=str(tmp_path / name), device="cpu", lpips=False, grids=0)
            for name, folder in (("with", hr), ("without", set5))}
    reports = {name: evaluate(cfg, progress=False) for name, cfg in cfgs.items()}
    rows = read_rows(reports["with"])
    assert rows[("speck", "net")]["psnr_y"] == "" and rows[("speck", "bicubic")]["psnr_y"] == ""
    text = reports["with"].read_text()
    assert "1 of 4 images left out of every mean" in text and "(speck)" in text
    means = {name: json.loads((tmp_path / name / "summary.json").read_text())["means"] for name in reports}
    assert means["with"] == means["without"]


# --- --hr DIR --lr DIR ----------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def paired(set5, tmp_path_factory) -> Path:
    """BasicSR's paired layout of the same photos: Set5/GTmod12 (HR cropped to x4, one left 3 px too large, as an
    original HR is) and Set5/LRbicx4, the LR named `babyx4.png` or by the bare stem."""
    root = tmp_path_factory.mktemp("paired") / "Set5"
    for k, name in enumerate(SIZES):
        full = read_png(set5 / f"{name}.png")
        hr = mod_crop(full, 4)
        h, w = hr.shape[:2]
        save_png(full[: h + 3, : w + 3] if k == 0 else hr, root / "GTmod12" / f"{name}.png")
        save_png(resize_image(hr, (w // 4, h // 4)), root / "LRbicx4" / (f"{name}x4.png" if k < 2 else f"{name}.png"))
    return root


def test_paired_folders_match_x4_names_infer_the_scale_and_equal_the_generated_lr(paired, gan_base, tmp_path):
    model = str(gan_base / "generator.safetensors")
    common = {"models": [model], "names": ["gan"], "device": "cpu", "lpips": False, "grids": 0}
    a = evaluate(EvaluateConfig(hr=str(paired / "GTmod12"), lr=str(paired / "LRbicx4"), out=str(tmp_path / "a"),
                                **common), progress=False)
    b = evaluate(EvaluateConfig(hr=str(paired / "GTmod12"), scale=4, out=str(tmp_path / "b"), **common),
                 progress=False)
    rows_a, rows_b = read_rows(a), read_rows(b)
    assert set(rows_a) == {(n, m) for n in SIZES for m in ("bicubic", "gan")}
    assert rows_a == rows_b  # the LR files hold what --scale 4 makes: the same numbers, the 3 px cropped too
    summary = json.loads((tmp_path / "a" / "summary.json").read_text())
    assert summary["benchmark"] == "Set5" and summary["scale"] == 4
    assert "LR from `" in a.read_text() and "(matched by stem)" in a.read_text()
    hr = read_png(paired / "GTmod12" / "bird.png")
    lr = read_png(paired / "LRbicx4" / "birdx4.png")
    ref = ref_metrics(model_output(gan_base / "generator.safetensors", lr), hr, border=4)
    assert float(rows_a[("bird", "gan")]["ssim_y"]) == pytest.approx(ref["ssim_y"], abs=2e-6)
    assert float(rows_a[("bird", "gan")]["psnr_y"]) == pytest.approx(ref["psnr_y"], abs=2e-6)


def _copy(paired: Path, dst: Path) -> tuple[Path, Path]:
    import shutil

    shutil.copytree(paired, dst)
    return dst / "GTmod12", dst / "LRbicx4"


def test_paired_folder_errors_are_one_line_naming_the_file(paired, tmp_path):
    def run(hr: Path, lr: Path | None = None, scale: int | None = None) -> str:
        with pytest.raises(ConfigError) as exc:
            evaluate(EvaluateConfig(hr=str(hr), lr=str(lr) if lr else None, scale=scale, models=["none"],
                                    out=str(tmp_path / "r"), device="cpu"), progress=False)
        assert "\n" not in str(exc.value)
        return str(exc.value)

    hr, lr = _copy(paired, tmp_path / "missing")
    (lr / "birdx4.png").unlink()
    msg = run(hr, lr)
    assert msg.startswith(str(hr / "bird.png")) and "no LR image" in msg
    hr, lr = _copy(paired, tmp_path / "mixed")
    img = read_png(hr / "butterfly.png")
    save_png(resize_image(img, (img.shape[1] // 2, img.shape[0] // 2)), lr / "butterfly.png")  # x2 among x4
    msg = run(hr, lr)
    assert msg.startswith(str(hr / "butterfly.png")) and "scale x2" in msg and "differs from baby.png's x4" in msg
    hr, lr = _copy(paired, tmp_path / "fraction")
    save_png(np.zeros((40, 40, 3), np.uint8), hr / "bird.png")
    save_png(np.zeros((16, 16, 3), np.uint8), lr / "birdx4.png")  # 40 / 16 = 2.5
    msg = run(hr, lr)
    assert msg.startswith(str(hr / "bird.png")) and "not a whole-number multiple" in msg
    hr, lr = _copy(paired, tmp_path / "given")
    assert "differs from --scale 2" in run(hr, lr, scale=2)
    assert "HR folder not found" in run(tmp_path / "nope", scale=4)
    (tmp_path / "empty").mkdir()
    assert "no images in this HR folder" in run(tmp_path / "empty", scale=4)


def test_config_takes_a_dataset_or_a_benchmark_folder(sr_dataset, set5):
    from crappify.config import resolve

    def err(**kw) -> str:
        with pytest.raises(ConfigError) as exc:
            resolve(EvaluateConfig, None, models=["m"], out="o", **kw)
        return str(exc.value)

    assert "not both" in err(data=str(sr_dataset), hr=str(set5), scale=2)
    assert "nothing to evaluate on" in err()
    assert "needs --scale S" in err(hr=str(set5))
    assert "--lr goes with a benchmark folder" in err(data=str(sr_dataset), lr="x")
    assert "--scale goes with a benchmark folder" in err(data=str(sr_dataset), scale=4)
    assert "--split" in err(hr=str(set5), scale=2, split="test")
    assert EvaluateConfig(hr=str(set5), scale=2, models=["m"], out="o").data is None


def test_command_line_benchmark_and_its_one_line_errors(cli, set5, sr_file, sr_dataset, tmp_path):
    res = cli("evaluate", "--hr", set5, "--scale", "2", "-m", sr_file, "-o", tmp_path / "r", "--no-lpips",
              "--device", "cpu", "--quiet")
    assert res.returncode == 0, res.stderr
    assert "| bicubic |" in res.stdout and "| sr |" in res.stdout
    res = cli("evaluate", sr_dataset, "--hr", set5, "--scale", "2", "-m", sr_file, "-o", tmp_path / "r2")
    assert res.returncode != 0 and "Traceback" not in res.stderr
    assert res.stderr.strip().splitlines() == [res.stderr.strip()] and "not both" in res.stderr
    res = cli("evaluate", "--hr", tmp_path / "nope", "--scale", "4", "-m", sr_file, "-o", tmp_path / "r3")
    assert res.returncode != 0 and res.stderr.strip() == f"crappify: error: {tmp_path / 'nope'}: HR folder not found"


def test_a_model_of_another_scale_is_one_line(set5, sr_file, tmp_path):
    with pytest.raises(CrappifyError, match="is it for this scale"):
        evaluate(EvaluateConfig(hr=str(set5), scale=4, models=[str(sr_file)], out=str(tmp_path / "r"), device="cpu",
                                lpips=False), progress=False)
