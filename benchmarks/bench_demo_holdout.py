"""The demo's generators on real photos it never saw: do they still beat bicubic?

Run:  python benchmarks/bench_demo_holdout.py [--run runs/demo] [--photos DIR] [--size 128] [--crops N]

`crappify demo` scores its generators on crops of two photos it never trained on; this check takes other
photos — a folder of your own (`--photos`), or by default the photographs scikit-image ships that the demo
does not use (retina, immunohistochemistry, brick, grass, gravel, coins, moon, text, page, cell,
microaneurysms; the grey ones as RGB) — degrades them the way the demo's dataset was degraded (its preset and
scale, read from the run's dataset), at `--size` px on the short side (the whole photo, area-resized), plus
`--crops` random square crops of `--size` px per photo at the photo's own resolution, and evaluates every
generator of the run against bicubic with `crappify evaluate` (PSNR/SSIM on Y and RGB, scale-pixel border).
Nothing here is tuned on these photos: the demo's recipe was set on its own held-out crops.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

import numpy as np
import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

SKIMAGE_PHOTOS = ("retina.jpg", "ihc.png", "brick.png", "grass.png", "gravel.png", "coins.png", "moon.png",
                  "text.png", "page.png", "cell.png", "microaneurysms.png")


def default_photos(folder: Path, size: int, crops: int, seed: int) -> int:
    """Write the scikit-image photos the demo does not use into `folder` (RGB PNG), each whole and as `crops`
    random `size`-px crops; returns how many files were written."""
    import skimage

    from crappify.imageio import decode, save_image_atomic

    base = Path(skimage.__file__).parent / "data"
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    n = 0
    for name in SKIMAGE_PHOTOS:
        path = base / name
        if not path.is_file():
            continue
        img = decode(path)
        stem = Path(name).stem
        save_image_atomic(folder / f"{stem}.png", img)
        n += 1
        h, w = img.shape[:2]
        for k in range(crops if min(h, w) >= 2 * size else 0):
            y, x = int(rng.integers(0, h - size + 1)), int(rng.integers(0, w - size + 1))
            save_image_atomic(folder / f"{stem}-crop{k}.png", img[y:y + size, x:x + size])
            n += 1
    return n


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--run", default="runs/demo", help="the demo's output root (dataset/, run/)")
    ap.add_argument("--photos", help="a folder of photos (default: scikit-image's photos the demo does not use)")
    ap.add_argument("--size", type=int, default=128, help="HR short side, px")
    ap.add_argument("--crops", type=int, default=2, help="with the default photos: crops per photo, besides it whole")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", help="where the dataset and the report go (default: a temporary folder)")
    args = ap.parse_args()

    from crappify.builder import BuildConfig, build_dataset, check_built
    from srgan.evaluate import EvaluateConfig, evaluate
    from srgan.pipeline import find_pipeline, generator_files, load_pipeline, paths_of, stage_configs

    root = Path(args.run)
    data_cfg = yaml.safe_load((root / "dataset" / "config.yaml").read_text())
    p = load_pipeline(find_pipeline("demo"), str(root))
    made = {k: v for k, v in generator_files(stage_configs(p), paths_of(p)).items() if v.is_file()}
    if not made:
        sys.exit(f"no generator files under {root / 'run'}: run `crappify demo` first")
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(args.out or tmp)
        photos = Path(args.photos) if args.photos else out / "photos"
        if not args.photos:
            print(f"{default_photos(photos, args.size, args.crops, args.seed)} photos and crops -> {photos}")
        preset = out / "preset.yaml"  # the run's dataset's preset, as its config.yaml inlines it
        preset.write_text(yaml.safe_dump(data_cfg["preset"], sort_keys=False))
        build = BuildConfig(src=str(photos), out=str(out / "dataset"), source="folder",
                            preset=str(preset), scale=data_cfg["scale"], size=args.size,
                            seed=args.seed, split=(0.0, 0.0, 1.0), workers=1)
        check_built(build_dataset(build, progress=False), build, [(("test",), "the evaluation")])
        report = evaluate(EvaluateConfig(data=build.out, models=[str(f) for f in made.values()], names=list(made),
                                         out=str(out / "eval"), split="test", grids=4, lpips=False, device="cpu",
                                         precision="fp32"), progress=False)
        summary = json.loads((report.parent / "summary.json").read_text())
        means = summary["means"]
        print(f"{summary['images']} images (preset {data_cfg['preset']['name']} x{data_cfg['scale']}, "
              f"HR short side {args.size}); PSNR-Y / SSIM-Y / PSNR-RGB")
        base = means["bicubic"]["psnr_y"]
        for name, m in means.items():
            gain = "" if name == "bicubic" else f"  ({m['psnr_y'] - base:+.2f} dB)"
            print(f"  {name:<14} {m['psnr_y']:.2f}  {m['ssim_y']:.4f}  {m['psnr_rgb']:.2f}{gain}")
        if args.out:
            print(f"report: {report}")


if __name__ == "__main__":
    main()
