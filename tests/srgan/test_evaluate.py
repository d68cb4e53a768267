"""evaluate: metrics on known cases, LPIPS n/a offline, the report end to end on a tiny built dataset."""

from __future__ import annotations

import csv
import json
import math

import numpy as np
import pytest
import torch

from crappify.errors import ConfigError, CrappifyError
from srgan.checkpoint import save_generator
from srgan.evaluate import (
    EvaluateConfig,
    evaluate,
    image_metrics,
    lpips_model,
    masked_psnr,
    occlusion_mask,
    occlusion_rects,
    psnr,
    rgb_to_y,
    ssim,
    summarise,
)
from srgan.generators import build_generator


def test_identical_images_give_capped_psnr_and_ssim_one(photo_maker):
    img = photo_maker(0, 80)
    m = image_metrics(img, img.copy(), border=4)
    assert m["psnr_rgb"] == m["psnr_y"] == 100.0
    assert m["ssim_rgb"] == pytest.approx(1.0) and m["ssim_y"] == pytest.approx(1.0)


def test_an_image_no_larger_than_twice_the_border_is_unscored_not_perfect(photo_maker):
    """Nothing left after the border crop measured nothing: NaN (left out of the means), not the 100 dB cap; an
    image too small for torchmetrics' SSIM padding gets a PSNR and no SSIM instead of an error."""
    img = photo_maker(0, 80)
    other = np.ascontiguousarray(img[::-1])
    for convention in ("torchmetrics", "basicsr"):
        empty = image_metrics(img[:4, :5], other[:4, :5], border=2, convention=convention)
        assert all(math.isnan(v) for v in empty.values()), empty
        small = image_metrics(img[:8, :8], other[:8, :8], border=2, convention=convention)  # 4x4 left
        assert 0 < small["psnr_y"] < 100 and 0 < small["psnr_rgb"] < 100
        assert math.isnan(small["ssim_y"]) and math.isnan(small["ssim_rgb"])


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
    save_generator(build_generator("srresnet", scale=4, pretrained=False, n_blocks=1, n_feats=8), sr, data_scale=4)
    unet = tmp_path / "unet.safetensors"
    save_generator(build_generator("unet-resnet18", pretrained=False, self_attention=False), unet, data_scale=4)
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


def test_evaluate_saves_its_resolved_config_like_every_stage(sr_dataset, tmp_path):
    import yaml

    torch.manual_seed(0)
    model = tmp_path / "sr.safetensors"
    save_generator(build_generator("srresnet", scale=4, pretrained=False, n_blocks=1, n_feats=8), model, data_scale=4)
    out = tmp_path / "report"
    cfg = EvaluateConfig(data=str(sr_dataset), models=[str(model)], out=str(out), limit=1, grids=0, device="cpu",
                         lpips=False)
    evaluate(cfg, progress=False)
    saved = yaml.safe_load((out / "evaluate.yaml").read_text())
    assert saved == {**cfg.model_dump(mode="json"), "split": "test"}  # the split it ran on, resolved
    assert list(saved) == list(EvaluateConfig.model_fields)  # in the config's own order (sort_keys=False)
    assert EvaluateConfig(**saved).split == "test"  # a valid config: `--config REPORT/evaluate.yaml` reruns it


def test_evaluate_errors(sr_dataset, tmp_path):
    with pytest.raises(CrappifyError, match="model file not found"):
        evaluate(EvaluateConfig(data=str(sr_dataset), models=[str(tmp_path / "x")], out=str(tmp_path / "r")))
    with pytest.raises(CrappifyError, match="no pairs in split"):
        evaluate(EvaluateConfig(data=str(sr_dataset), models=[str(tmp_path / "x")], out=str(tmp_path / "r"),
                                split="nope"))
    torch.manual_seed(0)
    sr2 = tmp_path / "x2.safetensors"
    save_generator(build_generator("srresnet", scale=2, pretrained=False, n_blocks=1, n_feats=8), sr2, data_scale=2)
    with pytest.raises(CrappifyError, match="does not match"):
        evaluate(EvaluateConfig(data=str(sr_dataset), models=[str(sr2)], out=str(tmp_path / "r"), device="cpu"),
                 progress=False)


def test_evaluate_skips_an_unreadable_pair_with_one_line_and_reports_it(sr_dataset, tmp_path, capfd):
    import shutil

    data = shutil.copytree(sr_dataset, tmp_path / "data")
    with open(data / "manifest.csv", newline="") as fh:
        rows = list(csv.DictReader(fh))
    bad_line, bad = next((n, r) for n, r in enumerate(rows, start=2) if r["split"] == "test")
    (data / bad["lr"]).write_bytes(b"GIF89a truncated")
    torch.manual_seed(0)
    model = tmp_path / "sr.safetensors"
    save_generator(build_generator("srresnet", scale=4, pretrained=False, n_blocks=1, n_feats=8), model, data_scale=4)
    out = tmp_path / "report"
    evaluate(EvaluateConfig(data=str(data), models=[str(model)], out=str(out), grids=1, device="cpu", lpips=False),
             progress=False)
    err = capfd.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("crappify: warning: evaluate: "), err
    assert str(data / bad["lr"]) in err[0] and f"manifest.csv line {bad_line}" in err[0]
    n_test = sum(r["split"] == "test" for r in rows)
    with open(out / "metrics.csv", newline="") as fh:
        ids = {r["id"] for r in csv.DictReader(fh)}
    assert len(ids) == n_test - 1 and bad["id"] not in ids
    summary = json.loads((out / "summary.json").read_text())
    assert summary["skipped"] == 1 and summary["skipped_ids"] == [bad["id"]] and summary["images"] == n_test - 1
    assert f"{n_test - 1} image pairs; **1 skipped**, could not be read: {bad['id']}" in (out / "report.md").read_text()
    assert len(list((out / "grids").glob("*.png"))) == 1


def test_evaluate_command_names_missing_flags(cli, sr_dataset, tmp_path):
    res = cli("evaluate", sr_dataset)
    assert res.returncode == 2
    assert res.stderr.strip() == "crappify: error: evaluate needs -m MODEL (or `models:` in --config)"
    res = cli("evaluate", sr_dataset, "-m", tmp_path / "x")
    assert res.returncode == 2 and "needs -o REPORT" in res.stderr


# --- occlusions: PSNR inside the occluded rectangles ------------------------------------------------------


def flickr_params(rects, *, occlude_applied=True, lr=(48, 48)):
    """Params as flickr30k-restore records them: blur (skipped), resize to the LR, JPEG, occlude on the LR."""
    occlude = ({"op": "occlude", "rects": rects, "fill": "black", "seed": 5}
               if occlude_applied else {"op": "occlude", "applied": False})
    return {"vars": {}, "steps": [{"op": "gaussian_blur", "applied": False},
                                  {"op": "resize", "width": lr[0], "height": lr[1], "interpolation": "area",
                                   "antialias": True},
                                  {"op": "jpeg", "quality": 63}, occlude]}


def test_occlusion_mask_scales_lr_rects_to_hr_coordinates():
    mask = occlusion_mask(flickr_params([[18, 29, 9, 4]]), (96, 96), (48, 48))
    expected = np.zeros((96, 96), bool)
    expected[58:66, 36:54] = True  # x 18..27 -> 36..54, y 29..33 -> 58..66
    assert mask is not None and mask.shape == (96, 96) and (mask == expected).all()
    # several rects: their union; a non-square HR keeps x and y ratios apart
    mask = occlusion_mask(flickr_params([[0, 0, 2, 2], [1, 1, 2, 2]], lr=(30, 20)), (90, 40), (30, 20))
    assert mask.sum() == 6 * 4 + 6 * 4 - 3 * 2 and mask[0:4, 0:6].all() and mask[2:6, 3:9].all()
    # non-integer ratio: the bounds are rounded outward, clipped to the image
    assert occlusion_rects(flickr_params([[47, 0, 1, 1]]), (100, 100), (48, 48)) == [(97, 0, 100, 3)]


def test_occlusion_mask_before_a_resize_is_already_in_hr_coordinates():
    params = {"vars": {}, "steps": [{"op": "occlude", "rects": [[10, 20, 5, 6]], "fill": "mean", "seed": 1},
                                    {"op": "resize", "width": 48, "height": 48, "interpolation": "bicubic",
                                     "antialias": True},
                                    {"op": "repeat", "rounds": [[{"op": "occlude", "rects": [[1, 2, 3, 4]],
                                                                  "fill": "black", "seed": 2}]]}]}
    assert occlusion_rects(params, (96, 96), (48, 48)) == [(10, 20, 15, 26), (2, 4, 8, 12)]


def test_occlusion_mask_follows_every_op_that_keeps_the_size():
    """What keeps the size is each op's own declaration (`crappify.ops`), not a list here: an occlusion after
    any of them (Real-ESRGAN's `blur` and `sinc`, a `random_order` of them) is still mapped to the HR."""
    from crappify import OPS

    keeping = [n for n in OPS.names() if OPS.get(n).keeps_size is True]
    assert {"gaussian_blur", "blur", "sinc", "jpeg", "noise", "occlude"} <= set(keeping)
    assert "resize" not in keeping
    shuffled = {"op": "random_order", "order": [1, 0],
                "rounds": [[{"op": "jpeg", "quality": 50}], [{"op": "sinc", "omega_c": 1.0, "size": 7}]]}
    before = [*({"op": n} for n in keeping if n != "occlude"), shuffled]
    params = {"vars": {}, "steps": [{"op": "resize", "width": 48, "height": 48}, *before,
                                    {"op": "occlude", "rects": [[18, 29, 9, 4]], "fill": "black", "seed": 5}]}
    assert occlusion_rects(params, (96, 96), (48, 48)) == [(36, 58, 54, 66)]


@pytest.mark.parametrize("params", [
    flickr_params([], occlude_applied=False),  # skipped (p < 1)
    flickr_params([]),  # applied with count 0
    {"vars": {}, "steps": [{"op": "resize", "width": 48, "height": 48}]},  # no occlude step
    {"vars": {}, "steps": [{"op": "mystery"}, {"op": "occlude", "rects": [[1, 1, 2, 2]]}]},  # size unknown
    {"reduced": 4, "steps": [{"op": "occlude", "rects": [[1, 1, 2, 2]]}]},  # ran on a DCT-reduced decode
    flickr_params([[1, 1, 2, 2]], lr=(40, 40)),  # steps end at 40x40 but the LR file is 48x48
    {"steps": [{"op": "occlude", "rects": [[1, 1]]}]},  # malformed rect
    "not a dict", None,
])
def test_occlusion_mask_is_none_when_nothing_was_occluded_or_it_cannot_be_mapped(params):
    assert occlusion_mask(params, (96, 96), (48, 48)) is None


def test_masked_psnr_counts_only_the_masked_pixels():
    rng = np.random.default_rng(0)
    hr = rng.integers(20, 200, (32, 32, 3), dtype=np.uint8)
    pred = hr.copy()
    mask = np.zeros((32, 32), bool)
    mask[4:12, 8:20] = True
    pred[mask] += 10  # MSE 100 inside the mask
    pred[20:, 20:] = 0  # outside the mask: ignored
    assert masked_psnr(pred, hr, mask) == pytest.approx(10 * math.log10(255**2 / 100.0))
    assert masked_psnr(hr, hr.copy(), mask) == 100.0
    assert math.isnan(masked_psnr(pred, hr, np.zeros((32, 32), bool)))
    with pytest.raises(ValueError, match="differ in size"):
        masked_psnr(pred, hr, mask[:-1])


OCCLUDE_PRESET = """\
name: occlude-x2
scale: 2
steps:
  - {op: resize, size: lr, interpolation: bicubic}
  - {op: occlude, p: 0.5, count: [1, 2], size: [0.15, 0.3], fill: black}
"""


def test_evaluate_writes_psnr_occ_for_occluded_pairs_only(tmp_path, monkeypatch):
    from crappify.builder import BuildConfig, build_dataset
    from crappify.imageio import decode
    from srgan.evaluate import bicubic

    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "no-weights"))
    preset = tmp_path / "occlude-x2.yaml"
    preset.write_text(OCCLUDE_PRESET)
    data = tmp_path / "data"
    build_dataset(BuildConfig(src="samples", out=str(data), preset=str(preset), size=48, split=(0.2, 0.2, 0.6),
                              workers=1), progress=False)
    with open(data / "manifest.csv", newline="") as fh:
        manifest = {r["id"]: r for r in csv.DictReader(fh) if r["split"] == "test"}
    occluded = {i for i, r in manifest.items() if "rects" in json.loads(r["params"])["steps"][1]}
    assert occluded and set(manifest) - occluded, "the seed should give both kinds of test pair"
    models = []
    for seed in (0, 1):
        torch.manual_seed(seed)
        models.append(tmp_path / f"m{seed}.safetensors")
        save_generator(build_generator("srresnet", scale=2, pretrained=False, n_blocks=1, n_feats=8), models[-1],
                       data_scale=2)
    out = tmp_path / "report"
    evaluate(EvaluateConfig(data=str(data), models=[str(m) for m in models], out=str(out), grids=0, device="cpu",
                            lpips=False), progress=False)
    with open(out / "metrics.csv", newline="") as fh:
        rows = list(csv.DictReader(fh))
    assert {r["id"] for r in rows} == set(manifest) and "psnr_occ" in rows[0]
    for r in rows:
        assert (r["psnr_occ"] != "") == (r["id"] in occluded), r
    # the baseline's value, recomputed by hand: the LR rects doubled, MSE over the three channels
    pid = sorted(occluded)[0]
    hr, lr = decode(data / manifest[pid]["hr"]), decode(data / manifest[pid]["lr"])
    mask = np.zeros(hr.shape[:2], bool)
    for x, y, w, h in json.loads(manifest[pid]["params"])["steps"][1]["rects"]:
        mask[2 * y:2 * (y + h), 2 * x:2 * (x + w)] = True
    err = (bicubic(lr, (hr.shape[1], hr.shape[0])).astype(float) - hr)[mask]
    row = next(r for r in rows if r["id"] == pid and r["method"] == "bicubic")
    assert float(row["psnr_occ"]) == pytest.approx(10 * math.log10(255**2 / np.mean(err**2)), abs=1e-4)
    report = (out / "report.md").read_text()
    assert f"occlusions: **{len(occluded)} of {len(manifest)} images**" in report and "PSNR-occ (dB)" in report
    assert "## Outputs compared with m0's" in report and "| m1 vs m0 |" in report
    summary = json.loads((out / "summary.json").read_text())
    assert summary["occluded_images"] == len(occluded) and summary["occlusions_unknown"] == 0
    occ_values = [float(r["psnr_occ"]) for r in rows if r["method"] == "m1" and r["psnr_occ"]]
    assert summary["means"]["m1"]["psnr_occ"] == pytest.approx(np.mean(occ_values), abs=1e-5)
    assert summary["output_difference"]["reference"] == "m0"
    assert 0 < summary["output_difference"]["mean_abs_diff"]["m1"] < 255


def test_grid_height_and_the_recipe_s_result(sr_dataset, tmp_path):
    """`grid_height` sets each image's height in a grid (nearest-neighbour enlargement); `result` marks the
    recipe's result in the report and summary.json, and must be one of the models' names."""
    import json

    from crappify.imageio import decode
    from crappify.preview import LABEL_HEIGHT, PAD

    torch.manual_seed(0)
    model = tmp_path / "sr.safetensors"
    save_generator(build_generator("srresnet", scale=4, pretrained=False, n_blocks=1, n_feats=8), model, data_scale=4)
    cfg = EvaluateConfig(data=str(sr_dataset), models=[str(model)], names=["mine"], result="mine",
                         out=str(tmp_path / "r"), grids=1, grid_height=200, lpips=False, device="cpu")
    report = evaluate(cfg, progress=False)
    (grid_file,) = (tmp_path / "r" / "grids").glob("*.png")
    assert decode(grid_file).shape[0] == 200 + LABEL_HEIGHT + 2 * PAD
    assert "`mine`" in report.read_text() and "the recipe's result" in report.read_text()
    assert json.loads((tmp_path / "r" / "summary.json").read_text())["result"] == "mine"
    with pytest.raises(ConfigError, match="result 'other' is none of the models' names"):
        evaluate(cfg.model_copy(update={"result": "other"}), progress=False)
