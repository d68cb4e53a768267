"""Regenerate the README's picture (docs/demo.png) and its caption from a finished `crappify demo` run.

The crop shown is chosen by a rule, not by eye: among the held-out crops with occluding rectangles (where the
demo's gain is; else all of them) that have a comparison grid, the one whose train-gen gain over
bicubic is the median. That grid (LR | bicubic | train-gen | train-gan | HR, written by the demo's evaluate
stage) is scaled to `--height` and saved as a small PNG; the caption (printed, for the README) gives that crop's
PSNR-Y and the run's means.

    python docs/make_readme_figure.py --run runs/demo --out docs/demo.png
"""

from __future__ import annotations

import argparse
import csv
import statistics
import sys
from pathlib import Path

import cv2

from crappify.imageio import decode, save_image_atomic
from srgan.evaluate import grid_name


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--run", default="runs/demo", help="the demo's output root (eval/ inside)")
    ap.add_argument("--out", default="docs/demo.png")
    ap.add_argument("--height", type=int, default=192, help="height of the picture's row, px")
    args = ap.parse_args()
    eval_dir = Path(args.run) / "eval"
    try:
        with open(eval_dir / "metrics.csv", newline="") as fh:
            rows = list(csv.DictReader(fh))
    except OSError as exc:
        print(f"make_readme_figure: cannot read {eval_dir / 'metrics.csv'}: {exc.strerror}; run `crappify demo` first",
              file=sys.stderr)
        return 1
    psnr = {(r["id"], r["method"]): float(r["psnr_y"]) for r in rows}
    ids = sorted({r["id"] for r in rows})
    occluded = sorted({r["id"] for r in rows if r.get("psnr_occ") not in (None, "", "nan")})
    with_grid = [i for i in ids if (eval_dir / "grids" / grid_name(i)).is_file()]
    if not with_grid:
        print(f"make_readme_figure: {eval_dir / 'grids'} has no comparison grids", file=sys.stderr)
        return 1
    occluded_with_grid = [i for i in with_grid if i in occluded]
    pool = occluded_with_grid or with_grid
    what = f"{len(pool)} {'occluded ' if occluded_with_grid else ''}held-out crops with a grid"
    gains = sorted((psnr[(i, "train-gen")] - psnr[(i, "bicubic")], i) for i in pool)
    _gain, crop = gains[(len(gains) - 1) // 2]
    grid = decode(eval_dir / "grids" / grid_name(crop))
    scale = args.height / grid.shape[0]
    small = cv2.resize(grid, (round(grid.shape[1] * scale), args.height), interpolation=cv2.INTER_AREA)
    save_image_atomic(Path(args.out), small)
    methods = list(dict.fromkeys(r["method"] for r in rows))
    means = {m: statistics.mean(float(r["psnr_y"]) for r in rows if r["method"] == m) for m in methods}
    print(f"Held-out crop `{crop}` (the median train-gen gain of the {what}): "
          + ", ".join(f"{m} {psnr[(crop, m)]:.2f} dB" for m in methods)
          + f" PSNR-Y. Over all {len(ids)} held-out crops: "
          + ", ".join(f"{m} {v:.2f} dB" for m, v in means.items()) + ".")
    return 0


if __name__ == "__main__":
    sys.exit(main())
