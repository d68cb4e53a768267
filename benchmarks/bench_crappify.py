"""Throughput of `crappify build-dataset --preset lesson7` against a plain-PIL lesson-7 crappifier.

Run:  python benchmarks/bench_crappify.py [--n 600] [--repeat 3]

It makes N Flickr-sized JPEGs (500x375 and 375x500, quality 90) from the real sample photos that
installed packages ship, then measures on the same files, in one run:
  (a) baseline: the fastai lesson-7 crappifier re-implemented with PIL, single process (open, bilinear
      resize to 96 px short side, draw the quality number, save JPEG at a random quality 10-70);
  (b) `crappify build-dataset SRC OUT --preset lesson7 --workers 1` (wall time of the whole command,
      interpreter start-up included; it also copies each HR and writes the manifest);
  (c) the same with `--workers 2`.
Each is run `--repeat` times and the best time kept. Targets on the 2-core machine: (b)/(a) >= 2.0,
(c)/(b) >= 1.7. Two rates are printed for (b) and (c): the whole command's wall time (interpreter
start-up, ~0.3 s, included) and the steady-state rate the command itself reports (its build phase),
which is what a 31k-photo Flickr30k build sees.
"""

from __future__ import annotations

import argparse
import os
import random
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from crappify.imageio import decode
from crappify.sources import sample_photos


def make_sources(dst: Path, n: int, seed: int = 0) -> None:
    """N Flickr-sized JPEGs cut from the sample photos (random crops, resized to 500x375 / 375x500)."""
    rng = np.random.default_rng(seed)
    photos = [decode(p) for _, p in sample_photos()]
    dst.mkdir(parents=True, exist_ok=True)
    for i in range(n):
        img = photos[i % len(photos)]
        h, w = img.shape[:2]
        portrait = i % 2 == 1
        ar = 375 / 500 if not portrait else 500 / 375  # height / width
        cw = int(rng.integers(int(w * 0.6), w + 1))
        ch = min(h, int(cw * ar))
        cw = int(ch / ar)
        x, y = int(rng.integers(0, w - cw + 1)), int(rng.integers(0, h - ch + 1))
        crop = Image.fromarray(img[y:y + ch, x:x + cw])
        size = (375, 500) if portrait else (500, 375)
        crop.resize(size, Image.Resampling.BICUBIC).save(dst / f"{i:05d}.jpg", quality=90)


def lesson7_baseline(src: Path, dst: Path, seed: int = 0) -> int:
    """The course's crappifier, written plainly with PIL (the thing people would otherwise run)."""
    rnd = random.Random(seed)
    dst.mkdir(parents=True, exist_ok=True)
    n = 0
    for fn in sorted(src.iterdir()):
        img = Image.open(fn)
        w, h = img.size
        ratio = 96 / min(w, h)
        img = img.resize((round(w * ratio), round(h * ratio)), resample=Image.Resampling.BILINEAR).convert("RGB")
        w, h = img.size
        q = rnd.randint(10, 70)
        ImageDraw.Draw(img).text((rnd.randint(0, w // 2), rnd.randint(0, h // 2)), str(q), fill=(255, 255, 255))
        img.save(dst / fn.name, quality=q)
        n += 1
    return n


def crappify_cmd() -> list[str]:
    exe = Path(sys.executable).with_name("crappify")
    return [str(exe)] if exe.exists() else [sys.executable, "-m", "crappify.cli"]


def time_build(src: Path, out: Path, workers: int) -> tuple[float, float]:
    """(wall seconds of the command, seconds of its build phase as it reports them)."""
    shutil.rmtree(out, ignore_errors=True)
    t0 = time.perf_counter()
    run = subprocess.run([*crappify_cmd(), "build-dataset", str(src), str(out), "--preset", "lesson7",
                          "--workers", str(workers), "--quiet"], check=True, capture_output=True, text=True)
    wall = time.perf_counter() - t0
    phase = float(re.search(r" in ([0-9.]+) s", run.stdout).group(1))
    return wall, phase


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=600, help="number of source JPEGs (>= 200)")
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--workdir", type=Path, default=None, help="where to put files (default: a temp dir)")
    args = ap.parse_args()
    n = max(200, args.n)
    work = args.workdir or Path(tempfile.mkdtemp(prefix="bench_crappify_"))
    src = work / "src"
    if not src.is_dir() or len(list(src.iterdir())) != n:
        shutil.rmtree(src, ignore_errors=True)
        make_sources(src, n)

    inf = float("inf")
    best = {"a": inf, "b": inf, "c": inf, "b_phase": inf, "c_phase": inf}
    for _ in range(args.repeat):  # interleaved, so all three see the same machine state
        shutil.rmtree(work / "baseline", ignore_errors=True)
        t0 = time.perf_counter()
        lesson7_baseline(src, work / "baseline")
        best["a"] = min(best["a"], time.perf_counter() - t0)
        for key, workers in (("b", 1), ("c", 2)):
            wall, phase = time_build(src, work / f"w{workers}", workers)
            best[key], best[key + "_phase"] = min(best[key], wall), min(best[key + "_phase"], phase)

    rate = {k: n / v for k, v in best.items()}
    print(f"images: {n} Flickr-sized JPEGs in {work}; cpu cores: {os.cpu_count()}; best of {args.repeat}")
    print(f"{'':38s} {'wall':>10s} {'build phase':>12s}")
    print(f"(a) PIL lesson-7 baseline, 1 process : {rate['a']:7.1f} img/s")
    print(f"(b) build-dataset lesson7, 1 worker  : {rate['b']:7.1f} img/s {rate['b_phase']:7.1f} img/s")
    print(f"(c) build-dataset lesson7, 2 workers : {rate['c']:7.1f} img/s {rate['c_phase']:7.1f} img/s")
    print(f"(b)/(a) = {rate['b'] / rate['a']:.2f} wall, {rate['b_phase'] / rate['a']:.2f} build phase  (target >= 2.0)")
    c_over_b = rate["c_phase"] / rate["b_phase"]
    print(f"(c)/(b) = {rate['c'] / rate['b']:.2f} wall, {c_over_b:.2f} build phase  (target >= 1.7)")
    if args.workdir is None:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
