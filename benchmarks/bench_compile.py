"""torch.compile (`--compile`): train-gen steps/s and enhance tiles/s with and without it, compilation timed apart.

Run:  python benchmarks/bench_compile.py [--arch unet-resnet34] [--loss feature] [--size 128] [--bs 8] [--n 48]
                                         [--epochs 1] [--device cpu|cuda] [--precision auto]
                                         [--photo 1024] [--tile N] [--batch 1] [--photos 3]
                                         [--skip-train] [--skip-enhance] [--warm-cache]
                                         [--gan-iters N [--critic patch] [--skip-gen]]

train-gen: one built dataset (N JPEGs cut from the sample photos, `lesson7` preset, HR short side size+32), random
weights (`--no-pretrained`), the same config run without and then with `--compile`. Reported per run: steps/s and
images/s over the training steps after the first two (validation, which runs eagerly either way, is not timed),
and the first step's time beyond a steady step's — the compilation, which happens in the first step.

enhance: a random-weight generator of `--arch`, saved and loaded as `enhance` loads it (`load_inference`), on a
`--photo` px square photo (U-Nets at scale 1; SR models get photo/scale px, so the output is that size). Per engine:
the first call (compilation included, for the compiled one) timed apart, then `--photos` timed calls; tiles/s (the
photo's tiles, not the copies a compiled engine fills a short last batch up with) and output MP/s. Engines: eager
(the default tiling, tiles shrunk to fit the photo), eager with the compiled engine's fixed tiles, and compiled.

train-gan (`--gan-iters N`): a new generator of `--arch` and a new `--critic` on the same data, per-batch switching
(each step one generator and one critic step), without and then with `--compile`; steps/s after the first four
(the critic compiles, frozen then trained, in the first three, whose excess time is reported as the compilation).

Inductor's cache is a fresh folder unless `--warm-cache`, so the compilation times are those of a first run.
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(Path(__file__).parent))


def step_timer(cuda: bool):
    """A fastai callback recording each training step's wall time (CUDA synchronised at both ends)."""
    import torch
    from fastai.callback.core import Callback

    class StepTimer(Callback):
        order = -10

        def before_fit(self):
            self.steps: list[float] = []

        def before_batch(self):
            if self.training:
                if cuda:
                    torch.cuda.synchronize()
                self._start = time.perf_counter()

        def after_batch(self):
            if self.training:
                if cuda:
                    torch.cuda.synchronize()
                self.steps.append(time.perf_counter() - self._start)

    return StepTimer()


def train_run(args: argparse.Namespace, data: Path, run: Path, compile: bool) -> dict:
    from srgan.train_gen import Trainer, TrainGenConfig

    timer = step_timer(args.device.startswith("cuda"))
    cfg = TrainGenConfig(data=str(data), out=str(run), arch=args.arch, loss=args.loss, pretrained=False,
                         size=args.size, bs=args.bs, epochs=args.epochs, device=args.device, preview_items=0,
                         precision=args.precision, compile=compile)
    trainer = Trainer(cfg, progress=False, cbs=[timer])
    t0 = time.perf_counter()
    trainer.fit()
    total = time.perf_counter() - t0
    return {**_rates(timer.steps, 1, args.bs), "wall": total, "precision": trainer.precision}


def _rates(steps: list[float], first: int, bs: int) -> dict:
    """Steps/s and images/s over the steps after the first `first` (and one more, warm-up) — and the first steps'
    time beyond as many steady steps: the compilation, which happens in them."""
    timed = steps[first + 1:] or steps[1:]
    if not timed:
        return {"steps": len(steps), "timed": 0, "steps_s": float("nan"), "images_s": float("nan"),
                "first": float("nan"), "compile_s": float("nan")}
    steady = statistics.median(timed)
    head = sum(steps[:first])
    return {"steps": len(steps), "timed": len(timed), "steps_s": len(timed) / sum(timed),
            "images_s": bs * len(timed) / sum(timed), "first": head, "compile_s": head - first * steady}


def bench_train(args: argparse.Namespace, work: Path) -> None:
    from bench_crappify import make_sources

    from crappify.builder import BuildConfig, build_dataset

    make_sources(work / "src", args.n + 8)
    data = work / "data"
    build_dataset(BuildConfig(src=str(work / "src"), out=str(data), preset="lesson7", size=args.size + 32,
                              split=(args.n / (args.n + 8), 8 / (args.n + 8), 0.0), workers=2), progress=False)
    if args.gan_iters:
        bench_gan(args, data)
    if args.skip_gen:
        return
    rows = {c: train_run(args, data, work / f"run-{c}", c) for c in (False, True)}
    print(f"train-gen: {args.arch}, loss {args.loss}, size {args.size}, bs {args.bs}, {args.n} training photos, "
          f"{args.epochs} epoch(s), precision {rows[False]['precision']}")
    _report(rows, "first step")


def gan_run(args: argparse.Namespace, data: Path, run: Path, compile: bool) -> dict:
    from srgan.train_gan import TrainGanConfig, train_gan

    timer = step_timer(args.device.startswith("cuda"))
    cfg = TrainGanConfig(data=str(data), out=str(run), generator_arch=args.arch, critic_arch=args.critic,
                         loss=args.loss, pretrained=False, switching="per-batch", size=args.size, bs=args.bs,
                         iters=args.gan_iters, checkpoint_every=10**6, preview_items=0, device=args.device,
                         precision=args.precision, compile=compile)
    t0 = time.perf_counter()
    train_gan(cfg, progress=False, cbs=[timer])
    total = time.perf_counter() - t0
    return {**_rates(timer.steps, 3, args.bs), "wall": total}  # the critic compiles frozen, then trained


def bench_gan(args: argparse.Namespace, data: Path) -> None:
    rows = {c: gan_run(args, data, data.parent / f"gan-{c}", c) for c in (False, True)}
    print(f"train-gan: {args.arch} from scratch + {args.critic} critic, per-batch (a generator and a critic step "
          f"each), loss {args.loss}, size {args.size}, bs {args.bs}, {args.gan_iters} steps")
    _report(rows, "first 3 steps")


def _report(rows: dict, first: str) -> None:
    """The eager and compiled runs' lines (`_rates` plus the wall time) and their ratio."""
    for c, r in rows.items():
        name = "--compile   " if c else "no --compile"
        print(f"  {name}: {r['steps_s']:7.3f} steps/s, {r['images_s']:7.2f} img/s over {r['timed']} steps "
              f"(of {r['steps']}); {first} {r['first']:7.2f} s, of which compilation ≈ {r['compile_s']:7.2f} s; "
              f"whole run {r['wall']:7.1f} s")
    print(f"  compiled / eager: {rows[True]['steps_s'] / rows[False]['steps_s']:.2f}x steps/s; compilation pays "
          f"off after ≈ {_break_even(rows):.0f} steps")


def _break_even(rows: dict) -> float:
    saved = 1 / rows[False]["steps_s"] - 1 / rows[True]["steps_s"]
    return rows[True]["compile_s"] / saved if saved > 0 else float("inf")


def enhance_run(args: argparse.Namespace, model: Path, photo, compile: bool, fixed: bool) -> dict:
    import torch

    from srgan.inference import load_inference

    cuda = args.device.startswith("cuda")
    engine = load_inference(model, torch.device(args.device), precision=args.precision, tile=args.tile,
                            batch=args.batch, compile=compile, fixed_tiles=fixed or None,
                            on_note=lambda t: print(f"note: {t}", file=sys.stderr))
    seen = {"tiles": 0, "pixels": 0}

    def progress(done: int, total: int) -> None:  # the engine reports tiles done of the photo's total
        seen["tiles"] = total

    def call() -> float:
        if cuda:
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        out = engine(photo, progress)
        if cuda:
            torch.cuda.synchronize()
        seen["pixels"] = out.shape[0] * out.shape[1]
        return time.perf_counter() - t0

    first = call()
    times = [call() for _ in range(args.photos)]
    seconds = sum(times)
    return {"first": first, "steady": statistics.median(times), "tiles": seen["tiles"],
            "tiles_s": seen["tiles"] * args.photos / seconds, "mpx_s": seen["pixels"] * args.photos / 1e6 / seconds,
            "tile": engine.tile, "precision": engine.precision}


def bench_enhance(args: argparse.Namespace, work: Path) -> None:
    import cv2
    import torch

    from crappify.imageio import decode
    from crappify.sources import sample_photos
    from srgan.checkpoint import save_generator
    from srgan.generators import build_generator, model_scale

    torch.manual_seed(0)
    unet = args.arch.startswith("unet")
    generator = build_generator(args.arch, scale=1 if unet else 4, pretrained=False)
    model = work / "generator.safetensors"
    save_generator(generator, model, data_scale=4)
    side = args.photo // model_scale(generator)
    photo = cv2.resize(decode(sample_photos()[0][1]), (side, side), interpolation=cv2.INTER_CUBIC)
    rows = {name: enhance_run(args, model, photo, c, f) for name, c, f in
            (("eager", False, False), ("eager, fixed tiles", False, True), ("--compile", True, True))}
    print(f"enhance: {args.arch}, {args.photo}² output px, precision {rows['eager']['precision']}, "
          f"batch {args.batch or 1}, {args.photos} timed photo(s)")
    for name, r in rows.items():
        print(f"  {name:18s}: tile {r['tile']} px, {r['tiles']} tiles/photo, {r['tiles_s']:7.2f} tiles/s, "
              f"{r['mpx_s']:6.3f} MP/s; first photo {r['first']:7.2f} s (steady {r['steady']:.2f} s)")
    ratio = rows["--compile"]["tiles_s"] / rows["eager, fixed tiles"]["tiles_s"]
    print(f"  compiled / eager (same tiles): {ratio:.2f}x tiles/s; compilation ≈ "
          f"{rows['--compile']['first'] - rows['--compile']['steady']:.1f} s")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--arch", default="unet-resnet34")
    ap.add_argument("--loss", default="feature", help="train-gen loss (feature: the course's VGG16-bn loss)")
    ap.add_argument("--size", type=int, default=128)
    ap.add_argument("--bs", type=int, default=8)
    ap.add_argument("--n", type=int, default=48, help="training photos")
    ap.add_argument("--epochs", type=int, default=1)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--precision", default="auto")
    ap.add_argument("--photo", type=int, default=1024, help="enhance: output side in px")
    ap.add_argument("--tile", type=int, default=None, help="enhance: tile side in input px (default: enhance's)")
    ap.add_argument("--batch", type=int, default=None, help="enhance: tiles per forward pass (default 1)")
    ap.add_argument("--photos", type=int, default=3, help="enhance: timed calls after the first")
    ap.add_argument("--skip-train", action="store_true", help="neither train-gen nor train-gan")
    ap.add_argument("--skip-gen", action="store_true", help="no train-gen (train-gan still, with --gan-iters)")
    ap.add_argument("--gan-iters", type=int, default=0, help="also train-gan, this many per-batch steps")
    ap.add_argument("--critic", default="patch", help="train-gan's new critic")
    ap.add_argument("--skip-enhance", action="store_true")
    ap.add_argument("--warm-cache", action="store_true", help="keep inductor's usual cache (compilation may be cached)")
    args = ap.parse_args()
    work = Path(tempfile.mkdtemp(prefix="bench_compile_"))
    if not args.warm_cache:
        os.environ["TORCHINDUCTOR_CACHE_DIR"] = str(work / "inductor-cache")
    try:
        import torch

        name = torch.cuda.get_device_name() if args.device.startswith("cuda") else f"CPU ({os.cpu_count()} cores)"
        print(f"# bench_compile: device {args.device} [{name}], torch {torch.__version__}, "
              f"inductor cache {'warm' if args.warm_cache else 'cold'}")
        if not args.skip_train:
            bench_train(args, work)
        if not args.skip_enhance:
            bench_enhance(args, work)
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
