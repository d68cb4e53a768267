"""Look inside a run: the `show_*` helpers the inspection notebook calls, and the demo's closing summary.

Each helper reads what the stages wrote (pipeline root with `dataset/`, `run/`, `eval/`, or the
folders named explicitly) and returns a matplotlib Figure or a pandas DataFrame, so a notebook only
calls and displays. Nothing here trains or writes, except `demo_results`' results grid.
"""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path
from typing import Any

import numpy as np

from crappify.errors import CrappifyError
from crappify.yamlfile import safe_load


def _rows(path: Path) -> list[dict[str, str]]:
    if not path.is_file():
        raise CrappifyError(f"not found: {path}")
    with open(path, newline="", encoding="utf-8") as fh:
        return list(csv.DictReader(fh))


def _float(v: Any) -> float:
    try:
        return float(v)
    except (TypeError, ValueError):
        return math.nan


def _layout(root: str | Path) -> tuple[Path, Path, Path]:
    """(dataset, run, eval) folders of a pipeline root."""
    root = Path(root)
    if not root.is_dir():
        raise CrappifyError(f"run folder not found: {root} (run `crappify demo` first?)")
    from srgan.pipeline import read_state

    dataset = root / "dataset"
    state = read_state(root / ".pipeline", "build-dataset")
    if state.get("config", {}).get("out"):
        dataset = Path(state["config"]["out"])
    return dataset, root / "run", root / "eval"


# ------------------------------------------------------------------------------------------------------
# degradations


def show_preset_ops(root: str | Path, index: int = 0, height: int = 160):
    """The preset's ops applied step by step to one training HR image (the exact LR the builder made)."""
    import matplotlib.pyplot as plt

    from crappify.chain import Chain
    from crappify.imageio import decode
    from crappify.preview import preview

    dataset, _, _ = _layout(root)
    config = safe_load((dataset / "config.yaml").read_text())
    rows = _rows(dataset / "manifest.csv")
    row = rows[index % len(rows)]
    chain = Chain.from_dict(config["preset"])
    # The item's own seed, as the builder derived it: the grid ends in the LR that was built for it.
    img = preview(decode(dataset / row["hr"]), chain, int(config.get("seed", 0)), None, config.get("scale"),
                  row["id"], height=height)
    fig, ax = plt.subplots(figsize=(min(16, img.shape[1] / 60), img.shape[0] / 60 + 0.6))
    ax.imshow(img)
    ax.set_axis_off()
    ax.set_title(f"{config['preset'].get('name', 'preset')}: {row['id']}")
    fig.tight_layout()
    return fig


def degradation_params(root: str | Path):
    """Every numeric parameter the preset sampled, one row per pair and op (a pandas DataFrame)."""
    import pandas as pd

    dataset, _, _ = _layout(root)
    records = []
    for row in _rows(dataset / "manifest.csv"):
        params = json.loads(row["params"])
        for i, step in enumerate(params.get("steps", [])):
            for k, v in step.items():
                if k not in ("op", "applied", "seed") and isinstance(v, (int, float)) and not isinstance(v, bool):
                    records.append({"id": row["id"], "split": row["split"], "step": i, "op": step["op"],
                                    "param": k, "value": float(v)})
            records.append({"id": row["id"], "split": row["split"], "step": i, "op": step["op"],
                            "param": "applied", "value": float(step.get("applied", True))})
    return pd.DataFrame.from_records(records)


def show_param_histograms(root: str | Path, bins: int = 20):
    """Histograms of the sampled degradation parameters in `manifest.csv` (one panel per op.param)."""
    import matplotlib.pyplot as plt

    df = degradation_params(root)
    keys = sorted({(int(s), o, p) for s, o, p in zip(df["step"], df["op"], df["param"], strict=True)})
    keys = [k for k in keys if df[(df.step == k[0]) & (df.param == k[2])]["value"].nunique() > 1]
    cols = 4
    nrows = max(1, math.ceil(len(keys) / cols))
    fig, axes = plt.subplots(nrows, cols, figsize=(4 * cols, 2.6 * nrows), squeeze=False)
    for ax, (step, op, param) in zip(axes.flat, keys, strict=False):
        ax.hist(df[(df.step == step) & (df.param == param)]["value"], bins=bins)
        ax.set_title(f"{step}: {op}.{param}", fontsize=9)
    for ax in list(axes.flat)[len(keys):]:
        ax.set_axis_off()
    fig.tight_layout()
    return fig


# ------------------------------------------------------------------------------------------------------
# training


def show_training_curves(root: str | Path):
    """Generator pretraining (loss, PSNR, SSIM per epoch), critic pretraining and the GAN phase."""
    import matplotlib.pyplot as plt

    _, run, _ = _layout(root)
    fig, axes = plt.subplots(1, 4, figsize=(18, 3.4))
    gen = _rows(run / "history.csv") if (run / "history.csv").is_file() else []
    ep = [_float(r["epoch"]) for r in gen]
    for key in ("train_loss", "valid_loss"):
        axes[0].plot(ep, [_float(r[key]) for r in gen], marker="o", label=key)
    axes[0].set_title("train-gen loss")
    axes[1].plot(ep, [_float(r["psnr"]) for r in gen], marker="o", label="PSNR (dB)")
    ax_ssim = axes[1].twinx()
    ax_ssim.plot(ep, [_float(r["ssim"]) for r in gen], marker="s", color="tab:orange", label="SSIM")
    axes[1].set_title("train-gen validation PSNR / SSIM")
    crit = _rows(run / "critic-history.csv") if (run / "critic-history.csv").is_file() else []
    for key in [k for k in (crit[0] if crit else {}) if k not in ("epoch", "seconds")]:
        axes[2].plot([_float(r["epoch"]) for r in crit], [_float(r[key]) for r in crit], marker="o", label=key)
    axes[2].set_title("train-critic")
    gan = _rows(run / "gan" / "history.csv") if (run / "gan" / "history.csv").is_file() else []
    for key in [k for k in (gan[0] if gan else {}) if "loss" in k]:
        axes[3].plot([_float(r.get("step")) for r in gan], [_float(r[key]) for r in gan], label=key)
    axes[3].set_title("train-gan (per iteration)")
    for ax in axes:
        ax.set_xlabel("epoch" if ax is not axes[3] else "iteration")
        if ax.lines:
            ax.legend(fontsize=8)
    fig.tight_layout()
    return fig


def _valid_pairs(dataset: Path, n: int) -> list[dict[str, str]]:
    rows = _rows(dataset / "manifest.csv")
    for split in ("valid", "test", "train"):
        chosen = [r for r in rows if r["split"] == split]
        if chosen:
            return chosen[:n]
    raise CrappifyError(f"{dataset} has no pairs")


def show_outputs(root: str | Path, n: int = 4, model: str | Path | None = None, device: str = "cpu"):
    """Generator outputs beside the LR and HR on validation items: LR | output | HR per row."""
    import matplotlib.pyplot as plt

    from crappify.imageio import decode
    from crappify.preview import grid
    from srgan.checkpoint import load_generator
    from srgan.predict import predict

    dataset, run, _ = _layout(root)
    path = Path(model) if model else _final_generator(run)
    gen = load_generator(path, device)
    tiles = []
    for row in _valid_pairs(dataset, n):
        lr, hr = decode(dataset / row["lr"]), decode(dataset / row["hr"])
        out = predict(gen, lr, (hr.shape[1], hr.shape[0]))
        tiles += [("LR", lr), (path.parent.name if path.parent != run else "generator", out), ("HR", hr)]
    img = grid(tiles, height=160, columns=3)
    fig, ax = plt.subplots(figsize=(img.shape[1] / 70, img.shape[0] / 70))
    ax.imshow(img)
    ax.set_axis_off()
    fig.tight_layout()
    return fig


def _final_generator(run: Path) -> Path:
    for path in (run / "gan" / "generator.safetensors", run / "generator.safetensors"):
        if path.is_file():
            return path
    raise CrappifyError(f"no generator.safetensors in {run}")


def critic_scores(root: str | Path, n: int = 16, device: str = "cpu") -> dict[str, list[float]]:
    """The pretrained critic's mean logit on real HR images and on the generator's outputs (validation)."""
    import torch

    from crappify.imageio import decode
    from srgan.checkpoint import load_critic, load_generator
    from srgan.normalize import Normalizer
    from srgan.predict import predict

    dataset, run, _ = _layout(root)
    critic = load_critic(run / "critic.safetensors", device)
    gen = load_generator(_final_generator(run), device)
    norm = Normalizer()
    scores: dict[str, list[float]] = {"real": [], "generated": []}
    with torch.no_grad():
        for row in _valid_pairs(dataset, n):
            lr, hr = decode(dataset / row["lr"]), decode(dataset / row["hr"])
            fake = predict(gen, lr, (hr.shape[1], hr.shape[0]))
            for key, img in (("real", hr), ("generated", fake)):
                x = norm.normalize(torch.from_numpy(np.ascontiguousarray(img)).permute(2, 0, 1)[None].to(device))
                scores[key].append(float(critic(x).float().mean()))
    return scores


def show_critic_scores(root: str | Path, n: int = 16, device: str = "cpu"):
    """Histogram of the critic's scores (logits; higher = 'real') on real vs generated images."""
    import matplotlib.pyplot as plt

    scores = critic_scores(root, n, device)
    fig, ax = plt.subplots(figsize=(6, 3.2))
    for key, values in scores.items():
        ax.hist(values, bins=12, alpha=0.6, label=f"{key} (mean {np.mean(values):.2f})")
    ax.set_xlabel("critic logit")
    ax.legend()
    ax.set_title("critic on validation images")
    fig.tight_layout()
    return fig


# ------------------------------------------------------------------------------------------------------
# evaluation


def evaluation_table(eval_dir: str | Path):
    """Mean ± std per metric and method from an evaluation's `metrics.csv` (a pandas DataFrame)."""
    import pandas as pd

    rows = _rows(Path(eval_dir) / "metrics.csv")
    df = pd.DataFrame.from_records(rows)
    metrics = [c for c in df.columns if c not in ("id", "method")]
    df[metrics] = df[metrics].apply(pd.to_numeric, errors="coerce")
    table = df.groupby("method", sort=False)[metrics].agg(["mean", "std"])
    return table.dropna(axis=1, how="all")


def show_evaluation(root: str | Path):
    """The evaluation table of a pipeline root (see `evaluation_table`)."""
    _, _, eval_dir = _layout(root)
    return evaluation_table(eval_dir)


def _mean(values: list[float]) -> float:
    """Mean of the finite values; NaN (without numpy's empty-slice warning) when there are none."""
    finite = [v for v in values if not math.isnan(v)]
    return float(np.mean(finite)) if finite else math.nan


def _duration(seconds: float) -> str:
    """12.3 s, 5 min 12 s, 1 h 02 min."""
    if seconds < 60:
        return f"{seconds:.1f} s"
    minutes, sec = divmod(round(seconds), 60)
    return f"{minutes} min {sec} s" if minutes < 60 else f"{minutes // 60} h {minutes % 60:02d} min"


def stage_times(root: str | Path) -> str | None:
    """'stage times: sample-crops 1.2 s, ...; total 5 min 12 s' from `ROOT/.pipeline/<stage>.json` (each
    stage's own run, also when this run skipped it); None when no stage recorded a time."""
    from srgan.pipeline import STAGES, read_state

    times = [(stage, _float(read_state(Path(root) / ".pipeline", stage).get("seconds"))) for stage in STAGES]
    times = [(stage, t) for stage, t in times if not math.isnan(t)]
    if not times:
        return None
    return ("stage times: " + ", ".join(f"{stage} {t:.1f} s" for stage, t in times)
            + f"; total {_duration(sum(t for _, t in times))}")


def demo_results(root: str | Path, n_grids: int = 4) -> tuple[str, Path]:
    """The demo's closing words: a PSNR/SSIM table (held-out crops, PSNR-occ inside the occluded rectangles),
    stage times, the critic's last validation accuracy, how far the GAN moved the generator's outputs, and
    one stacked results grid PNG. Files an older run did not write (summary.json, psnr_occ) are left out."""
    from crappify.imageio import decode, save_image_atomic

    root = Path(root)
    eval_dir = root / "eval"
    rows = _rows(eval_dir / "metrics.csv")
    methods = list(dict.fromkeys(r["method"] for r in rows))
    n_img = len({r["id"] for r in rows})
    occluded = {r["id"] for r in rows if not math.isnan(_float(r.get("psnr_occ")))}
    lines = [f"held-out crops: {n_img} (photos never trained on); PSNR/SSIM on Y and RGB, see {eval_dir}/report.md",
             f"{'method':<14} {'PSNR-Y dB':>10} {'SSIM-Y':>8} {'PSNR-RGB':>9} {'SSIM-RGB':>9} {'PSNR-occ':>9}"]
    for m in methods:
        vals = {k: _mean([_float(r.get(k)) for r in rows if r["method"] == m])
                for k in ("psnr_y", "ssim_y", "psnr_rgb", "ssim_rgb", "psnr_occ")}
        occ = "n/a" if math.isnan(vals["psnr_occ"]) else f"{vals['psnr_occ']:.2f}"
        lines.append(f"{m:<14} {vals['psnr_y']:>10.2f} {vals['ssim_y']:>8.4f} {vals['psnr_rgb']:>9.2f} "
                     f"{vals['ssim_rgb']:>9.4f} {occ:>9}")
    lines.append(f"PSNR-occ: RGB PSNR inside the occluding rectangles, over the {len(occluded)} of {n_img} crops "
                 "that have them" if occluded else "PSNR-occ: no held-out crop has occluding rectangles")
    times = stage_times(root)
    if times:
        lines.append(times)
    critic = root / "run" / "critic-history.csv"
    crit_rows = _rows(critic) if critic.is_file() else []
    accuracy = _float(crit_rows[-1].get("accuracy")) if crit_rows else math.nan
    if not math.isnan(accuracy):
        lines.append(f"critic's final validation accuracy: {accuracy:.1%} (epoch {crit_rows[-1].get('epoch', '?')})")
    try:
        diff = json.loads((eval_dir / "summary.json").read_text()).get("output_difference") or {}
        for name, value in diff.get("mean_abs_diff", {}).items():
            lines.append(f"{name} vs {diff['reference']} outputs: mean |difference| {float(value):.2f} grey levels")
    except (OSError, ValueError, TypeError, AttributeError, KeyError):
        pass  # an evaluation from before summary.json, or a damaged one: the line is left out
    every = sorted((eval_dir / "grids").glob("*.png"))
    grids = [every[round(i * (len(every) - 1) / max(1, n_grids - 1))] for i in range(min(n_grids, len(every)))]
    if not grids:
        raise CrappifyError(f"no comparison grids in {eval_dir / 'grids'}")
    images = [decode(g) for g in grids]
    width = max(i.shape[1] for i in images)
    stacked = np.concatenate([np.pad(i, ((0, 0), (0, width - i.shape[1]), (0, 0)), constant_values=255)
                              for i in images])
    out = root / "results.png"
    save_image_atomic(out, stacked)
    return "\n".join(lines), out
