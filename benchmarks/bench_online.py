"""Online degradation (`degrade: online`) throughput: does the training loader keep up with training?

Run:  python benchmarks/bench_online.py [--n 96] [--crops 128 256] [--workers 0 2] [--steps 2] [--rrdb-bs 4]

On a built x4 dataset (N Flickr-sized JPEGs cut from the sample photos, `realistic` preset, HR kept at
500x372 / 372x500), for each HR crop size and loader worker count it times one epoch of the training loader
(bs 16, uint8 batches, before normalisation):
  - offline: `make_dataloaders(...)` reading the LR and HR files (the default);
  - online: `degrade="online"` with the `realistic` preset and, when it exists, `realesrgan` (also with
    `sharpen_gt`), degrading every HR crop in the loader.
"first" is the time to the first batch (worker start-up included: fastai starts workers anew each epoch);
items/s counts the whole epoch, "steady" the batches after the first.
Then it times generator training steps (forward, L1 loss, backward, Adam step; fp32, CPU) of `srresnet` and
`rrdb` (x4, default options) on LR crop/4 inputs, batch 16 — rrdb at `--rrdb-bs` and scaled to 16 (CPU steps
scale linearly with the batch), to stay within a few minutes on a 2-core machine.
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from bench_crappify import make_sources

from crappify.builder import BuildConfig, build_dataset
from crappify.chain import PRESETS
from srgan.data import make_dataloaders

BS = 16


def time_loader(data: Path, crop: int, workers: int, **kw) -> dict[str, float]:
    dls = make_dataloaders(data, crop, BS, resize_lr=False, scale=4, num_workers=workers, seed=0, **kw)
    dl = dls.train
    dl.after_batch = lambda b: b  # uint8 as the loader makes them; normalisation runs on the device
    dl.dataset.set_epoch(1)
    start = time.perf_counter()
    first, n, n_first = None, 0, 0
    for x, _ in dl:
        n += x.shape[0]
        if first is None:
            first, n_first = time.perf_counter() - start, x.shape[0]
    total = time.perf_counter() - start
    return {"first": first, "items_s": n / total, "steady": (n - n_first) / max(1e-9, total - first), "n": n}


def time_steps(arch: str, crop: int, bs: int, steps: int) -> float:
    """Seconds per training step at batch `bs`."""
    from srgan.generators import build_generator

    torch.manual_seed(0)
    model = build_generator(arch, scale=4, img_size=crop)
    opt = torch.optim.Adam(model.parameters(), lr=1e-4)
    x, y = torch.randn(bs, 3, crop // 4, crop // 4), torch.randn(bs, 3, crop, crop)

    def step(xb, yb):
        loss = (model(xb) - yb).abs().mean()
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    step(x[:1], y[:1])  # warm-up
    start = time.perf_counter()
    for _ in range(steps):
        step(x, y)
    return (time.perf_counter() - start) / steps


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=96, help="source photos (90%% train)")
    ap.add_argument("--crops", type=int, nargs="+", default=[128, 256])
    ap.add_argument("--workers", type=int, nargs="+", default=[0, 2])
    ap.add_argument("--steps", type=int, default=1, help="timed training steps per model")
    ap.add_argument("--rrdb-bs", type=int, default=4, help="rrdb's measured batch (scaled to 16)")
    ap.add_argument("--no-models", action="store_true")
    ap.add_argument("--workdir")
    args = ap.parse_args()

    work = Path(args.workdir or tempfile.mkdtemp(prefix="bench-online-"))
    try:
        t0 = time.perf_counter()
        make_sources(work / "src", args.n)
        data = work / "data"
        build_dataset(BuildConfig(src=str(work / "src"), out=str(data), preset="realistic", scale=4,
                                  split=(0.9, 0.1, 0.0), workers=os.cpu_count() or 1), progress=False)
        print(f"dataset: {args.n} photos, built in {time.perf_counter() - t0:.1f} s; cpus: {os.cpu_count()}, "
              f"torch threads: {torch.get_num_threads()}", flush=True)

        variants: list[tuple[str, dict]] = [("offline", {})]
        presets = ["realistic"] + (["realesrgan"] if "realesrgan" in PRESETS else [])
        for p in presets:
            variants.append((f"online {p}", {"degrade": "online", "degrade_preset": p}))
        variants.append((f"online {presets[-1]} +sharpen_gt",
                         {"degrade": "online", "degrade_preset": presets[-1], "sharpen_gt": True}))

        loader: dict[tuple[str, int, int], dict[str, float]] = {}
        print("\n| loader | crop | workers | first batch s | items/s | steady items/s |")
        print("| --- | --- | --- | --- | --- | --- |")
        for crop in args.crops:
            for name, kw in variants:
                for w in args.workers:
                    r = loader[name, crop, w] = time_loader(data, crop, w, **kw)
                    print(f"| {name} | {crop} | {w} | {r['first']:.2f} | {r['items_s']:.0f} | {r['steady']:.0f} |",
                          flush=True)

        if args.no_models:
            return
        print(f"\n| train step (CPU, fp32, {torch.get_num_threads()} threads) | crop | s/step at bs 16 | items/s |")
        print("| --- | --- | --- | --- |")
        for crop in args.crops:
            for arch, bs in (("srresnet", BS), ("rrdb", args.rrdb_bs)):
                s = time_steps(arch, crop, bs, args.steps) * BS / bs
                note = "" if bs == BS else f" (measured at bs {bs}, x{BS // bs})"
                print(f"| {arch}{note} | {crop} | {s:.2f} | {BS / s:.1f} |", flush=True)
    finally:
        if not args.workdir:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
