"""`crappify evaluate`: PSNR / SSIM (and LPIPS when its weights are local) of generators on a built dataset, or on
a benchmark folder as BasicSR lays them out and scores them (`srgan.benchmarks`: `hr` with `scale` or `lr`).

Stated the way super-resolution papers state them: on 8-bit images, on RGB (mean over channels) and on
the Y channel (ITU-R BT.601, 16–235, MATLAB's `rgb2ycbcr`), with a border of `scale` pixels cropped on
every side; SSIM with an 11×11 Gaussian window (σ 1.5), as in Wang et al. and torchmetrics (on a benchmark
folder BasicSR's SSIM, whose map leaves out the edges the window does not fit); PSNR capped at 100 dB so
identical images stay finite. Always beside a baseline: the bicubic upscale of the LR
(`srgan.upsample`: MATLAB `imresize`'s bicubic, Keys a = −0.5, symmetric edges), or the LR itself when LR
and HR have the same size. Several models compare side by side.

Where the dataset's preset occluded rectangles (the `occlude` op, recorded in manifest.csv's `params`),
`psnr_occ` is the RGB PSNR over just those pixels (mapped to HR coordinates): what inpainting achieved,
which the whole-image metrics dilute. Images without occlusions leave it empty and out of its mean.

Writes REPORT/evaluate.yaml (the config that ran, its split resolved), REPORT/metrics.csv (one row per image
and method), REPORT/report.md (mean ± std per metric and method, the gain over the baseline, and with several
models how far their outputs lie from the first's), REPORT/summary.json (the same means, machine-readable) and
REPORT/grids/<id>.png (LR | baseline | model(s) | HR).
A pair whose files cannot be read is skipped with one line naming the file and its manifest row; the report
says how many were.
"""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
import yaml
from pydantic import BaseModel, ConfigDict, Field, model_validator

from crappify.chain import follow_record
from crappify.errors import ConfigError, CrappifyError
from crappify.imageio import ImageError, save_image_atomic, write_atomic, write_csv_atomic
from crappify.precision import Precision
from srgan.benchmarks import Item, TestSet, benchmark_test_set
from srgan.checkpoint import model_file
from srgan.metrics import WINDOW, ssim_reflect, ssim_valid
from srgan.runtime import MAX_BATCH, resolve_device

PSNR_CAP = 100.0
METRICS = ("psnr_y", "ssim_y", "psnr_rgb", "ssim_rgb", "psnr_occ", "lpips")
LABELS = {"psnr_y": "PSNR-Y (dB)", "ssim_y": "SSIM-Y", "psnr_rgb": "PSNR-RGB (dB)", "ssim_rgb": "SSIM-RGB",
          "psnr_occ": "PSNR-occ (dB)", "lpips": "LPIPS ↓"}
LPIPS_WEIGHTS = {"alex": ("alexnet", "AlexNet_Weights.IMAGENET1K_V1"), "vgg": ("vgg16", "VGG16_Weights.IMAGENET1K_V1"),
                 "squeeze": ("squeezenet1_1", "SqueezeNet1_1_Weights.IMAGENET1K_V1")}


class EvaluateConfig(BaseModel):
    """Options of `crappify evaluate` (also the keys of its `--config` YAML file)."""

    model_config = ConfigDict(extra="forbid")

    data: str | None = Field(None, description="a built dataset (manifest.csv); or give `hr` instead")
    hr: str | None = Field(None, description="a benchmark's folder of HR images (e.g. Set5/GTmod12), instead of data")
    lr: str | None = Field(None, description="its LR images, matched by stem (baby.png: baby.png or babyx4.png); "
                                             "default: made from the HR by bicubic at `scale`")
    scale: int | None = Field(None, ge=1, le=16, description="the benchmark's scale (with `lr`: inferred from the "
                                                             "sizes, checked when given)")
    models: list[str] = Field(min_length=1, description="generator.safetensors files (or run folders holding one)")
    out: str
    names: list[str] | None = Field(None, description="labels for the models (default: run folder or file name)")
    result: str | None = Field(None, description="the name of the model that is the recipe's result (a pipeline "
                                                 "sets it), marked in the report")
    split: str | None = Field(None, description="default: test, else valid")
    limit: int | None = Field(None, ge=1, description="evaluate the first N pairs only")
    grids: int = Field(4, ge=0, description="comparison grids for the first N pairs")
    grid_height: int | None = Field(None, ge=16, le=2048, description="height of each image in a grid, px "
                                    "(enlarged nearest-neighbour, so pixels stay visible); default: the HR's, "
                                    "kept within 64..256")
    tile: int | None = Field(None, ge=0)
    overlap: int | None = Field(None, ge=0)
    batch: int | None = Field(None, ge=1, le=MAX_BATCH)
    device: str = "auto"
    precision: Precision = "fp32"
    lpips: bool = True
    lpips_net: Literal["alex", "vgg", "squeeze"] = "alex"

    @model_validator(mode="after")
    def _one_test_set(self) -> EvaluateConfig:
        """A built dataset or a benchmark folder, never both; the benchmark options only with `hr`."""
        if self.data is None and self.hr is None:
            raise ValueError("nothing to evaluate on: give a built dataset (DATA, `data:`) or a benchmark folder "
                             "(--hr DIR, `hr:`)")
        if self.data is not None and self.hr is not None:
            raise ValueError(f"give a built dataset ({self.data}) or a benchmark folder (--hr {self.hr}), not both")
        if self.hr is None:
            for key, value in (("lr", self.lr), ("scale", self.scale)):
                if value is not None:
                    raise ValueError(f"--{key} goes with a benchmark folder (--hr DIR); a built dataset has its own")
        else:
            if self.lr is None and self.scale is None:
                raise ValueError(f"--hr {self.hr} needs --scale S (its LR made by bicubic) or --lr DIR (its LR "
                                 "images)")
            if self.split is not None:
                raise ValueError("--split picks a split of a built dataset; a benchmark folder (--hr) has none")
        return self


# -------------------------------------------------------------------------------------------------------
# metrics


def grid_name(item_id: str) -> str:
    """The file name of a pair's comparison grid in REPORT/grids/: ids of nested source folders hold '/', and the
    grids stay flat."""
    return item_id.replace("/", "__") + ".png"


def rgb_to_y(img: np.ndarray) -> np.ndarray:
    """ITU-R BT.601 luma of an 8-bit RGB image in 16..235 (float64), as MATLAB's rgb2ycbcr."""
    x = img.astype(np.float64) / 255.0
    return 16.0 + 65.481 * x[..., 0] + 128.553 * x[..., 1] + 24.966 * x[..., 2]


def _tensor(img: np.ndarray) -> torch.Tensor:
    t = torch.from_numpy(np.ascontiguousarray(img, dtype=np.float64))
    return (t[None, None] if t.ndim == 2 else t.permute(2, 0, 1)[None]).contiguous()


def psnr(a: np.ndarray, b: np.ndarray, data_range: float = 255.0) -> float:
    """PSNR in dB (torchmetrics), capped at PSNR_CAP for identical images; NaN for empty images (nothing measured:
    an image no larger than twice the border), which the report leaves out instead of counting a perfect score."""
    from torchmetrics.functional.image import peak_signal_noise_ratio

    if a.size == 0:
        return float("nan")
    return min(float(peak_signal_noise_ratio(_tensor(a), _tensor(b), data_range=data_range)), PSNR_CAP)


def ssim(a: np.ndarray, b: np.ndarray, data_range: float = 255.0) -> float:
    """SSIM as torchmetrics computes it (Gaussian 11×11, σ 1.5, K1 0.01, K2 0.03; the image reflect-padded and the
    whole map averaged, edges included, unlike BasicSR's `srgan.metrics.ssim_valid`), mean over channels; a
    separable filter makes it faster (`srgan.metrics`)."""
    return ssim_reflect(a, b, data_range)


def crop_border(img: np.ndarray, border: int) -> np.ndarray:
    return img[border:-border, border:-border] if border > 0 else img


def image_metrics(pred: np.ndarray, hr: np.ndarray, border: int,
                  convention: Literal["torchmetrics", "basicsr"] = "torchmetrics") -> dict[str, float]:
    """PSNR and SSIM on RGB and on Y, `border` px cropped from every side, of two 8-bit RGB images.

    SSIM by torchmetrics (edges reflect-padded, the whole map averaged), or by BasicSR's convention (`basicsr`:
    the map only where the window fits, `srgan.metrics.ssim_valid`), as benchmark tables report it."""
    if pred.shape != hr.shape:
        raise ValueError(f"prediction {pred.shape} and target {hr.shape} differ in size")
    p, t = crop_border(pred, border), crop_border(hr, border)
    py, ty = rgb_to_y(p), rgb_to_y(t)
    # BasicSR's SSIM is NaN under the window's size; torchmetrics' reflect padding needs over half the window a
    # side, so a smaller image is unscored rather than an error
    ssim_of = ssim_valid if convention == "basicsr" else ssim if min(p.shape[:2]) > WINDOW // 2 else _unscored
    return {"psnr_rgb": psnr(p, t), "ssim_rgb": ssim_of(p, t), "psnr_y": psnr(py, ty), "ssim_y": ssim_of(py, ty)}


def _unscored(a: np.ndarray, b: np.ndarray) -> float:
    return float("nan")


def too_small_to_score(rows: list[dict[str, Any]]) -> list[str]:
    """The images no metric could score (no larger than twice the border cropped: PSNR-Y is NaN), once each."""
    return list(dict.fromkeys(r["id"] for r in rows if math.isnan(r.get("psnr_y", float("nan")))))


def masked_psnr(pred: np.ndarray, hr: np.ndarray, mask: np.ndarray) -> float:
    """PSNR in dB of two 8-bit RGB images over the pixels where `mask` (H×W bool) is set, all three channels
    pooled into one MSE; capped at PSNR_CAP like `psnr`, NaN for an empty mask."""
    if pred.shape != hr.shape or mask.shape != hr.shape[:2]:
        raise ValueError(f"prediction {pred.shape}, target {hr.shape} and mask {mask.shape} differ in size")
    if not mask.any():
        return float("nan")
    return psnr(pred[mask], hr[mask])  # the masked pixels as one (N, 3) array: one MSE, the same cap


def _walk_steps(records: Any, size: tuple[int, int] | None,
                found: list[tuple[list[int], tuple[int, int] | None]]) -> tuple[int, int] | None:
    """Follow recorded steps (`crappify.chain.follow_record`: each op says what it does to the size): collect
    (rect, size of the image it was painted on) of every applied occlusion into `found`; returns the size after
    the steps (None once an op of unknown effect on size ran)."""

    def visit(rec: dict[str, Any], at: tuple[int, int] | None) -> None:
        if rec.get("op") == "occlude":
            found.extend((list(r), at) for r in rec["rects"])

    return follow_record(records, size, visit)


def occlusion_rects(params: Any, hr_size: tuple[int, int],
                    lr_size: tuple[int, int] | None = None) -> list[tuple[int, int, int, int]] | None:
    """The applied `occlude` rectangles of one pair's recorded params, as (x0, y0, x1, y1) HR pixel bounds
    (end exclusive, clipped to the image); [] when none were applied.

    A rect `[x, y, w, h]` is in the coordinates of the image the op painted on (after any earlier resize):
    it is scaled by HR size / that size, its bounds rounded outward. None when that cannot be told for
    certain — params not of the builder's shape, an op of unknown effect on size before it, a chain that
    ran on a DCT-reduced decode (`reduced`) before its first resize, or steps whose final size is not
    `lr_size` (when given) — so no metric is guessed.
    """
    if not isinstance(params, dict):
        return None
    reduced = params.get("reduced", 1)
    size: tuple[int, int] | None = hr_size if reduced in (None, 1) else None
    found: list[tuple[list[int], tuple[int, int] | None]] = []
    try:
        final = _walk_steps(params.get("steps"), size, found)
        if lr_size is not None and final is not None and tuple(final) != tuple(lr_size):
            return None
        rects = []
        for (x, y, w, h), at in found:
            if at is None:
                return None
            (hw, hh), (aw, ah) = hr_size, at
            x0, y0 = max(0, int(x) * hw // aw), max(0, int(y) * hh // ah)
            x1, y1 = min(hw, -(-(int(x) + int(w)) * hw // aw)), min(hh, -(-(int(y) + int(h)) * hh // ah))
            if x1 > x0 and y1 > y0:
                rects.append((x0, y0, x1, y1))
    except (KeyError, TypeError, ValueError, ZeroDivisionError):
        return None
    return rects


def occlusion_mask(params: Any, hr_size: tuple[int, int],
                   lr_size: tuple[int, int] | None = None) -> np.ndarray | None:
    """H×W bool mask of the union of a pair's occluded pixels in HR coordinates (`hr_size` is (width,
    height)); None when nothing was occluded or the rectangles cannot be mapped (see `occlusion_rects`)."""
    return _rects_mask(occlusion_rects(params, hr_size, lr_size), hr_size)


def _rects_mask(rects: list[tuple[int, int, int, int]] | None, size: tuple[int, int]) -> np.ndarray | None:
    if not rects:
        return None
    mask = np.zeros((size[1], size[0]), dtype=bool)
    for x0, y0, x1, y1 in rects:
        mask[y0:y1, x0:x1] = True
    return mask


def manifest_params(root: str | Path, split: str) -> dict[str, Any]:
    """id → the params the builder recorded (manifest.csv's `params` JSON) for the pairs of `split`; rows
    without params or with invalid JSON are left out (`srgan.data.read_dataset` does not keep them)."""
    out: dict[str, Any] = {}
    try:
        with open(Path(root) / "manifest.csv", newline="", encoding="utf-8") as fh:
            for row in csv.DictReader(fh):
                if row.get("split") != split or not row.get("params"):
                    continue
                try:
                    out[row["id"]] = json.loads(row["params"])
                except ValueError:
                    continue
    except (OSError, csv.Error):
        return {}
    return out


def lpips_model(net: str = "alex", device: torch.device | str = "cpu") -> tuple[Any | None, str | None]:
    """(LPIPS network, None) when the backbone's ImageNet weights are in torchvision's cache, else (None, reason).

    The linear heads ship inside torchmetrics; the backbone (AlexNet by default) comes from the local cache
    only — nothing is downloaded. Both are read with `weights_only=True` (`srgan.weights.read_state_dict`): a
    cached file holding pickled code is refused, and the reason names it.
    """
    from srgan.weights import WeightsError, read_state_dict, torchvision_cache_path, torchvision_state_dict

    tv_name, weights_name = LPIPS_WEIGHTS[net]
    path = torchvision_cache_path(weights_name)
    if not path.is_file():
        return None, (f"{weights_name} weights not found at {path} (put the file there to enable LPIPS; "
                      "nothing is downloaded)")
    try:
        import torchmetrics.functional.image.lpips as tm_lpips
        import torchvision

        backbone = getattr(torchvision.models, tv_name)(weights=None)
        backbone.load_state_dict(torchvision_state_dict(weights_name))
        # linear heads: torchmetrics' own file, read here rather than by its unguarded torch.load
        model = tm_lpips._LPIPS(pretrained=False, net=net, pnet_rand=True)
        heads = Path(tm_lpips.__file__).parent / "lpips_models" / f"{net}.pth"
        model.load_state_dict(read_state_dict(heads), strict=False)
        # the backbone's `features` layers sit in slices, Sequentials keyed by their index there (slice1..5 for
        # alex/vgg, a ModuleList of them for squeeze)
        slices = [m for m in model.net.modules() if isinstance(m, torch.nn.Sequential) and len(m)
                  and all(name.isdigit() for name, _ in m.named_children())]
        for sl in slices:
            for idx, sub in sl.named_children():
                sub.load_state_dict(backbone.features[int(idx)].state_dict())
    except WeightsError as exc:
        return None, str(exc)
    except Exception as exc:  # corrupt weights file, torchmetrics internals changed
        return None, f"LPIPS could not be built: {str(exc).splitlines()[0] if str(exc) else type(exc).__name__}"
    return model.to(device).eval(), None


@torch.inference_mode()
def lpips_distance(model: Any, a: np.ndarray, b: np.ndarray, device: torch.device | str = "cpu") -> float:
    """LPIPS between two 8-bit RGB images (lower is closer)."""
    def prep(img: np.ndarray) -> torch.Tensor:
        return torch.from_numpy(np.ascontiguousarray(img)).permute(2, 0, 1)[None].float().to(device) / 127.5 - 1.0

    return float(model(prep(a), prep(b)).mean())


# -------------------------------------------------------------------------------------------------------
# the command


def model_names(paths: list[Path], names: list[str] | None) -> list[str]:
    """Labels for models: given names, else the run folder's name (or the file's stem), made unique."""
    if names is not None:
        if len(names) != len(paths):
            raise ConfigError(f"{len(names)} names for {len(paths)} models")
        return list(names)
    out: list[str] = []
    for p in paths:
        base = p.parent.name if p.name == "generator.safetensors" and p.parent.name else p.stem
        name, k = base, 2
        while name in out or name in ("bicubic", "input"):
            name, k = f"{base}-{k}", k + 1
        out.append(name)
    return out


def bicubic(lr: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """The baseline: `srgan.upsample.resize_image` (MATLAB imresize's bicubic), the resize a U-Net's input gets
    and a residual generator's skip computes, so an untrained residual generator scores exactly this."""
    from srgan.upsample import resize_image

    return resize_image(lr, size)


def _stats(values: list[float]) -> tuple[float, float]:
    arr = np.asarray(values, dtype=np.float64)
    return float(arr.mean()), float(arr.std(ddof=1)) if len(arr) > 1 else 0.0


def dataset_test_set(cfg: EvaluateConfig) -> TestSet:
    """The pairs of `cfg.data`'s split (test, else valid), the first `limit` of them."""
    from srgan.data import describe, read_dataset, read_image

    assert cfg.data is not None
    pairs_by_split, data_cfg = read_dataset(cfg.data)
    split = cfg.split or ("test" if pairs_by_split.get("test") else "valid")
    pairs = pairs_by_split.get(split, [])
    if not pairs:
        raise CrappifyError(f"{cfg.data} has no pairs in split {split!r} (has: {', '.join(sorted(pairs_by_split))})")
    pairs = pairs[: cfg.limit] if cfg.limit else pairs

    def item(pair: Any) -> Item:
        return Item(pair.id, lambda: (read_image(pair.lr, describe(pair)), read_image(pair.hr, describe(pair))))

    scale = data_cfg.get("scale")
    return TestSet(cfg.data, split, [item(p) for p in pairs], int(scale) if scale else None,
                   manifest_params(cfg.data, split))


def score(engine: Any, ts: TestSet) -> dict[str, float]:
    """Mean PSNR-Y and SSIM-Y of a generator (a `TiledInference`) over a test set, as `evaluate` reports them
    (BasicSR's convention on a benchmark folder); what `train-gen --val-hr` records each epoch. Unreadable pairs
    are left out, each with one line; NaN when none could be read."""
    from srgan.data import warn
    from srgan.generators import model_input

    psnrs, ssims = [], []
    convention = "basicsr" if ts.benchmark else "torchmetrics"
    for item in ts.items:
        try:
            lr, hr = item.load()
        except ImageError as exc:
            warn(f"validation: {exc}: skipped")
            continue
        h, w = hr.shape[:2]
        pred = engine(model_input(lr, (w, h), engine.model))
        if pred.shape != hr.shape:
            raise CrappifyError(f"output {pred.shape[1]}x{pred.shape[0]} for {item.id} does not match the HR {w}x{h} "
                                f"of {ts.name}")
        m = image_metrics(pred, hr, ts.scale or max(1, round(w / lr.shape[1])), convention)
        psnrs.append(m["psnr_y"])
        ssims.append(m["ssim_y"])
    return {"psnr_y": _mean(psnrs), "ssim_y": _mean(ssims)}


def _mean(values: list[float]) -> float:
    kept = [v for v in values if not math.isnan(v)]
    return float(np.mean(kept)) if kept else float("nan")


def evaluate(cfg: EvaluateConfig, progress: bool = True) -> Path:
    """Run the evaluation `cfg` describes; returns the path of REPORT/report.md."""
    from tqdm.auto import tqdm

    from crappify.preview import grid
    from srgan.data import warn
    from srgan.generators import model_input
    from srgan.inference import load_inference

    device = resolve_device(cfg.device)
    ts = (benchmark_test_set(cfg.hr, cfg.lr, cfg.scale, cfg.limit) if cfg.hr is not None
          else dataset_test_set(cfg))
    paths = [model_file(m) for m in cfg.models]
    names = model_names(paths, cfg.names)
    if cfg.result is not None and cfg.result not in names:
        raise ConfigError(f"result {cfg.result!r} is none of the models' names ({', '.join(names)})")
    engines = [load_inference(p, device, precision=cfg.precision, tile=cfg.tile, overlap=cfg.overlap,
                              batch=cfg.batch, on_note=lambda _t: None) for p in paths]
    lpips_net, lpips_reason = (lpips_model(cfg.lpips_net, device) if cfg.lpips
                               else (None, "switched off (--no-lpips)"))
    out = Path(cfg.out)
    (out / "grids").mkdir(parents=True, exist_ok=True)
    # the config that ran, its split (or a benchmark's scale) resolved, as every stage leaves it beside its results
    resolved = {"scale": ts.scale} if ts.benchmark else {"split": ts.split}
    write_atomic(out / "evaluate.yaml", yaml.safe_dump(cfg.model_copy(update=resolved).model_dump(mode="json"),
                                                       sort_keys=False))
    convention = "basicsr" if ts.benchmark else "torchmetrics"
    rows: list[dict[str, Any]] = []
    borders: set[int] = set()
    baseline_names: set[str] = set()
    grid_files: list[str] = []
    occluded, unknown = 0, 0
    abs_diff = dict.fromkeys(names[1:], 0.0)  # sum of |output - first model's output| per later model
    n_values = 0
    skipped: list[str] = []  # ids of pairs that could not be read
    for item in tqdm(ts.items, unit="img", disable=not progress, dynamic_ncols=True):
        try:
            lr, hr = item.load()
        except ImageError as exc:
            warn(f"evaluate: {exc}: skipped")
            skipped.append(item.id)
            continue
        h, w = hr.shape[:2]
        if not ts.benchmark:
            rects = (occlusion_rects(ts.params[item.id], (w, h), (lr.shape[1], lr.shape[0]))
                     if item.id in ts.params else None)
            mask = _rects_mask(rects, (w, h))
            occluded += mask is not None
            unknown += rects is None
        else:
            mask = None
        same = lr.shape[:2] == hr.shape[:2]
        border = ts.scale or max(1, round(w / lr.shape[1]))
        borders.add(border)
        base_name = "input" if same else "bicubic"
        baseline_names.add(base_name)
        results = [(base_name, lr if same else bicubic(lr, (w, h)))]
        for name, engine, path in zip(names, engines, paths, strict=True):
            pred = engine(model_input(lr, (w, h), engine.model))
            if pred.shape != hr.shape:
                raise CrappifyError(f"{path}: output {pred.shape[1]}x{pred.shape[0]} for {item.id} does not match the "
                                    f"HR {w}x{h} (the model upsamples by {engine.model_scale}; is it for this "
                                    + ("scale?)" if ts.benchmark else "dataset?)"))
            results.append((name, pred))
        if len(engines) > 1:
            first = results[1][1].astype(np.int16)
            for name, pred in results[2:]:
                abs_diff[name] += float(np.abs(pred.astype(np.int16) - first).sum())
            n_values += first.size
        for name, pred in results:
            row: dict[str, Any] = {"id": item.id, "method": name, **image_metrics(pred, hr, border, convention)}
            row["psnr_occ"] = masked_psnr(pred, hr, mask) if mask is not None else float("nan")
            row["lpips"] = lpips_distance(lpips_net, pred, hr, device) if lpips_net is not None else float("nan")
            rows.append(row)
        if len(grid_files) < cfg.grids:
            tiles = [(f"LR {lr.shape[1]}x{lr.shape[0]}", lr), *results, (f"HR {w}x{h}", hr)]
            name = grid_name(item.id)
            save_image_atomic(out / "grids" / name, grid(tiles, height=cfg.grid_height or min(256, max(64, h)),
                                                             columns=len(tiles)))
            grid_files.append(name)
    if not rows:
        where = f"benchmark {cfg.hr}" if ts.benchmark else f"split {ts.split!r} in {cfg.data}"
        raise CrappifyError(f"none of the {len(ts.items)} pairs of {where} could be read")
    _write_csv(out / "metrics.csv", rows)
    baseline = "bicubic" if "bicubic" in baseline_names else sorted(baseline_names)[0]
    differences = {name: total / n_values for name, total in abs_diff.items()} if n_values else {}
    occlusions = {"images": occluded, "unknown": unknown}
    extra = {"benchmark": ts.name, "scale": ts.scale, "ssim": "basicsr"} if ts.benchmark else {}
    write_atomic(out / "summary.json", summary_json(rows, baseline, ts.split, names, differences, occlusions, skipped,
                                                    cfg.result, extra))
    report = out / "report.md"
    evaluated = len(ts.items) - len(skipped)
    write_atomic(report, _report_md(cfg, ts, evaluated, names, paths, engines, rows, sorted(borders),
                                    sorted(baseline_names), lpips_reason, grid_files, differences, occlusions,
                                    skipped))
    return report


def summary_json(rows: list[dict[str, Any]], baseline: str, split: str, names: list[str],
                 differences: dict[str, float], occlusions: dict[str, int], skipped: list[str] | None = None,
                 result: str | None = None, extra: dict[str, Any] | None = None) -> str:
    """REPORT/summary.json: per method the mean of each metric (NaN ones left out), the occlusion counts, the
    pairs skipped as unreadable, the recipe's result (`result`, when a pipeline names it), `extra` keys (a
    benchmark's name, scale and SSIM convention) and, with several
    models, each later model's mean |output − first model's output| in grey levels (0-255)."""
    summary, _ = summarise(rows, baseline)
    data: dict[str, Any] = {
        "split": split, "images": len({r["id"] for r in rows}), "baseline": baseline, "models": names,
        "means": {m: {k: round(v[0], 6) for k, v in stats.items()} for m, stats in summary.items()},
        "occluded_images": occlusions["images"], "occlusions_unknown": occlusions["unknown"],
        "skipped": len(skipped or []), "skipped_ids": list(skipped or []), **(extra or {})}
    if result is not None:
        data["result"] = result
    if differences:
        data["output_difference"] = {"reference": names[0],
                                     "mean_abs_diff": {k: round(v, 6) for k, v in differences.items()}}
    return json.dumps(data, indent=1) + "\n"


def _write_csv(path: Path, rows: list[dict[str, Any]]) -> None:
    write_csv_atomic(path, ["id", "method", *METRICS],
                     ({k: ("" if isinstance(v, float) and math.isnan(v) else round(v, 6) if isinstance(v, float)
                           else v) for k, v in row.items()} for row in rows))


def summarise(rows: list[dict[str, Any]], baseline: str) -> tuple[dict[str, dict[str, tuple[float, float]]],
                                                                 dict[str, dict[str, tuple[float, float]]]]:
    """Per method and metric: (mean, std); and per method the gain over `baseline` (mean, std of per-image
    differences). NaN or absent metrics (LPIPS when unavailable, PSNR-occ without occlusions) are left out."""
    methods = list(dict.fromkeys(r["method"] for r in rows))
    by = {(r["id"], r["method"]): r for r in rows}
    ids = list(dict.fromkeys(r["id"] for r in rows))
    summary: dict[str, dict[str, tuple[float, float]]] = {}
    gains: dict[str, dict[str, tuple[float, float]]] = {}
    nan = float("nan")
    for m in methods:
        summary[m], gains[m] = {}, {}
        for k in METRICS:
            vals = [v for v in (by[(i, m)].get(k, nan) for i in ids if (i, m) in by) if not math.isnan(v)]
            if vals:
                summary[m][k] = _stats(vals)
            diffs = [by[(i, m)].get(k, nan) - by[(i, baseline)].get(k, nan) for i in ids
                     if (i, m) in by and (i, baseline) in by]
            diffs = [d for d in diffs if not math.isnan(d)]
            if diffs and m != baseline:
                gains[m][k] = _stats(diffs)
    return summary, gains


def _fmt(k: str, v: tuple[float, float] | None, signed: bool = False) -> str:
    if v is None:
        return "n/a"
    digits = 2 if k.startswith("psnr") else 4
    sign = "+" if signed else ""
    return f"{v[0]:{sign}.{digits}f} ± {v[1]:.{digits}f}"


def _test_set_lines(cfg: EvaluateConfig, ts: TestSet, n: int, crop: str) -> list[str]:
    """The report's lines on what was measured, and by which convention."""
    if not ts.benchmark:
        return [f"- split: `{ts.split}`, {n} image pairs",
                f"- metrics on 8-bit images, border of **{crop} px** (the scale) cropped on every side; "
                "**Y** = ITU-R BT.601 luma (16–235, MATLAB `rgb2ycbcr`), **RGB** = mean over the 3 channels; "
                "SSIM with an 11×11 Gaussian window (σ 1.5), torchmetrics' (edges reflect-padded); "
                f"PSNR capped at {PSNR_CAP:.0f} dB"]
    lr = (f"LR from `{cfg.lr}` (matched by stem)" if cfg.lr else
          f"LR made from each HR, cropped to a multiple of {ts.scale} (`mod_crop`), by MATLAB `imresize`'s bicubic")
    return [f"- benchmark **{ts.name}**: {n} images, ×{ts.scale}; HR from `{cfg.hr}`, {lr}",
            f"- metrics as BasicSR's `calculate_psnr` / `calculate_ssim` (`test_y_channel=True`, "
            f"`crop_border={ts.scale}`): 8-bit images, border of **{crop} px** cropped; **Y** = ITU-R BT.601 luma "
            "(16–235, `rgb2ycbcr`, float64), **RGB** = all 3 channels; SSIM with an 11×11 Gaussian window (σ 1.5) "
            f"only where it fits inside the image (BasicSR's convention), the mean of its map; PSNR capped at "
            f"{PSNR_CAP:.0f} dB (BasicSR: inf)"]


def _report_md(cfg: EvaluateConfig, ts: TestSet, n_pairs: int, names: list[str], paths: list[Path], engines: list,
               rows: list[dict[str, Any]], borders: list[int], baselines: list[str], lpips_reason: str | None,
               grids: list[str], differences: dict[str, float] | None = None,
               occlusions: dict[str, int] | None = None, skipped: list[str] | None = None) -> str:
    baseline = "bicubic" if "bicubic" in baselines else baselines[0]
    summary, gains = summarise(rows, baseline)
    crop = ", ".join(str(b) for b in borders)
    lines = [f"# Evaluation of {', '.join(names)} on {ts.name}", "", *_test_set_lines(cfg, ts, n_pairs, crop)]
    if skipped:
        lines[2] += (f"; **{len(skipped)} skipped**, could not be read: {', '.join(skipped[:5])}"
                     + (", …" if len(skipped) > 5 else ""))
    lines += ["- baseline: " + ("bicubic upscale of the LR (MATLAB `imresize` bicubic: a = −0.5, symmetric edges)"
                                if "bicubic" in baselines else "") +
              (" / " if len(baselines) > 1 else "") +
              ("the LR itself (same size as the HR)" if "input" in baselines else ""),
              "- LPIPS: " + (f"{cfg.lpips_net} backbone, lower is better" if lpips_reason is None
                             else f"n/a — {lpips_reason}")]
    occ = occlusions or {"images": 0, "unknown": 0}
    if not ts.benchmark:
        lines.append(f"- occlusions: **{occ['images']} of {n_pairs} images** have occluding rectangles; "
                     "**PSNR-occ** = PSNR on RGB over the union of their pixels (scaled to HR coordinates, no border "
                     "crop), mean over those images only" if occ["images"] else
                     f"- occlusions: none in these {n_pairs} images (PSNR-occ n/a)")
    small = too_small_to_score(rows)
    if small:
        lines.append(f"- **{len(small)} of {n_pairs} images left out of every mean**: no larger than twice the "
                     f"{crop} px border, so nothing was left to measure ({', '.join(small[:5])}"
                     + (", …)" if len(small) > 5 else ")"))
    if occ["unknown"]:
        lines.append(f"- {occ['unknown']} images left out of PSNR-occ: no readable params in manifest.csv, or "
                     "rectangles that cannot be mapped to HR coordinates")
    lines.append("")
    for name, path, engine in zip(names, paths, engines, strict=True):
        spec = getattr(engine.model, "crappify_spec", {})
        lines.append(f"- `{name}`: {path} ({spec.get('arch', '?')}, model scale ×{engine.model_scale}, "
                     f"tile {engine.tile or 'none'}, {engine.precision})"
                     + (" — **the recipe's result**" if name == cfg.result else ""))
    header = "| method | " + " | ".join(LABELS[k] for k in METRICS) + " |"
    rule = "| --- |" + " --- |" * len(METRICS)
    lines += ["", "## Mean ± std over images", "", header, rule]
    for m, stats in summary.items():
        lines.append(f"| {m} | " + " | ".join(_fmt(k, stats.get(k)) for k in METRICS) + " |")
    lines += ["", f"## Gain over {baseline} (mean ± std of per-image differences)", "", header, rule]
    for m, stats in gains.items():
        if m != baseline:
            lines.append(f"| {m} | " + " | ".join(_fmt(k, stats.get(k), signed=True) for k in METRICS) + " |")
    if differences:
        lines += ["", f"## Outputs compared with {names[0]}'s", "",
                  "Mean |difference| over all pixels and channels of every evaluated image, in grey levels (0-255).",
                  "", "| model | mean abs. difference |", "| --- | --- |"]
        lines += [f"| {m} vs {names[0]} | {v:.2f} |" for m, v in differences.items()]
    if grids:
        lines += ["", "## Comparison grids", "", f"LR | {baseline} | {' | '.join(names)} | HR: "
                  + ", ".join(f"[{g}](grids/{g})" for g in grids)]
    return "\n".join(lines) + "\n"
