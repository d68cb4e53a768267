"""Tiled inference (`crappify enhance`): peak memory and megapixels/s on large inputs, tiled vs untiled.

Run:  python benchmarks/bench_enhance.py [--device cpu|cuda] [--arch unet-resnet34] [--sizes 1024,4096]
                                          [--untiled 1024] [--tile N] [--precision fp32|bf16|fp16|auto]

A generator with random weights (`--arch`, ImageNet weights not needed; speed and memory do not depend on
the weights) is saved as `generator.safetensors` and loaded through `srgan.inference.load_inference`, as
`enhance` does. Each measurement runs in a fresh subprocess: a warm-up on a 256 px image, then one timed
call of `srgan.enhance.enhance_image` on a size×size photo (a sample photo resized; U-Nets at scale 1,
SR models on a size/scale input so the output is size×size). Peak memory: on CUDA,
`torch.cuda.max_memory_allocated` (model included); on the CPU, the process's peak RSS
(`resource.getrusage`), and the same minus the RSS after the model was loaded and warmed up ("over base").
Targets: peak memory on the largest input ≤ 1.5× that on the smallest (default tile); tiled throughput
≥ 0.8× untiled on the `--untiled` size.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def _rss_bytes() -> int:
    """Current resident set size (Linux /proc), in bytes."""
    with open("/proc/self/statm") as fh:
        return int(fh.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def _photo(size: int) -> np.ndarray:
    import cv2

    from crappify.imageio import decode
    from crappify.sources import sample_photos

    img = decode(sample_photos()[0][1])
    return cv2.resize(img, (size, size), interpolation=cv2.INTER_CUBIC)


def child(args: argparse.Namespace) -> dict:
    """One measurement (runs in its own process)."""
    import torch

    from srgan.enhance import Loaded, enhance_image
    from srgan.inference import load_inference

    device = torch.device(args.device)
    tile = None if args.child_tile < 0 else args.child_tile
    engine = load_inference(args.model, device, precision=args.precision, tile=tile, batch=args.batch,
                            on_note=lambda t: print(f"note: {t}", file=sys.stderr))
    scale = engine.model_scale
    img = _photo(args.child_size // scale)
    enhance_image(engine, Loaded(_photo(max(64, 256 // scale))), 1)  # warm-up (allocator, kernels)
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
    base = _rss_bytes()
    times = []
    for _ in range(args.repeat):  # the median of a few calls: one call of ~0.1 s on a GPU is noisy
        t0 = time.perf_counter()
        out, _ = enhance_image(engine, Loaded(img), 1)
        if device.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    seconds = sorted(times)[len(times) // 2]
    peak_rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    result = {"size": args.child_size, "tile": engine.tile, "seconds": seconds,
              "mpx_s": out.shape[0] * out.shape[1] / 1e6 / seconds, "precision": engine.precision,
              "peak_rss": peak_rss, "over_base": max(0, peak_rss - base)}
    if device.type == "cuda":
        result["peak_cuda"] = torch.cuda.max_memory_allocated(device)
    return result


def measure(args: argparse.Namespace, model: Path, size: int, tile: int) -> dict:
    cmd = [sys.executable, __file__, "--child-size", str(size), "--child-tile", str(tile), "--model", str(model),
           "--device", args.device, "--precision", args.precision, "--batch", str(args.batch or 0),
           "--repeat", str(args.repeat)]
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=args.timeout)
    if res.returncode != 0:
        tail = res.stderr.strip().splitlines()[-1] if res.stderr.strip() else f"exit {res.returncode}"
        return {"size": size, "tile": tile, "error": tail}
    return json.loads(res.stdout.strip().splitlines()[-1])


def fmt_mem(r: dict) -> str:
    if "peak_cuda" in r:
        return f"{r['peak_cuda'] / 2**20:,.0f} MiB (CUDA)"
    return f"{r['peak_rss'] / 2**20:,.0f} MiB RSS ({r['over_base'] / 2**20:,.0f} over base)"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--arch", default="unet-resnet34")
    ap.add_argument("--sizes", default="1024,4096", help="output sizes (square), comma-separated")
    ap.add_argument("--untiled", type=int, default=1024, help="size for the untiled comparison (0: skip)")
    ap.add_argument("--tile", type=int, default=-1, help="tile (input px); -1: the default")
    ap.add_argument("--batch", type=int, default=0, help="tiles per batch; 0: the default")
    ap.add_argument("--precision", default="fp32")
    ap.add_argument("--repeat", type=int, default=1, help="timed calls per measurement (median); 5 on a GPU")
    ap.add_argument("--timeout", type=int, default=3000)
    ap.add_argument("--child-size", type=int, help=argparse.SUPPRESS)
    ap.add_argument("--child-tile", type=int, default=-1, help=argparse.SUPPRESS)
    ap.add_argument("--model", help=argparse.SUPPRESS)
    args = ap.parse_args()
    args.batch = args.batch or None
    if args.child_size:
        print(json.dumps(child(args)))
        return

    import torch

    from srgan.checkpoint import save_generator
    from srgan.generators import build_generator

    torch.manual_seed(0)
    kwargs = {"scale": 4} if args.arch == "srresnet" else {}
    with tempfile.TemporaryDirectory() as tmp:
        model = Path(tmp) / "generator.safetensors"
        save_generator(build_generator(args.arch, pretrained=False, **kwargs), model, data_scale=4)
        name = torch.cuda.get_device_name() if args.device.startswith("cuda") else f"CPU ({os.cpu_count()} cores)"
        print(f"# bench_enhance: {args.arch}, device {args.device} [{name}], torch {torch.__version__}, "
              f"precision {args.precision}")
        results = []
        for size in [int(s) for s in args.sizes.split(",")]:
            r = measure(args, model, size, args.tile)
            results.append(r)
            print(json.dumps(r))
        untiled = tiled = None
        if args.untiled:
            untiled = measure(args, model, args.untiled, 0)
            print(json.dumps(untiled))
            tiled = next((r for r in results if r["size"] == args.untiled), None) or measure(
                args, model, args.untiled, args.tile)
        print()
        print("| input | tile | seconds | MP/s | peak memory |")
        print("| --- | --- | --- | --- | --- |")
        for r in [*results, *([untiled] if untiled else [])]:
            if "error" in r:
                print(f"| {r['size']}² | {r['tile'] or 'none'} | — | — | failed: {r['error']} |")
            else:
                print(f"| {r['size']}² | {r['tile'] or 'none'} | {r['seconds']:.2f} | {r['mpx_s']:.3f} "
                      f"| {fmt_mem(r)} |")
        ok = [r for r in results if "error" not in r]
        if len(ok) >= 2:
            key = "peak_cuda" if "peak_cuda" in ok[0] else "peak_rss"
            ratio = ok[-1][key] / ok[0][key]
            print(f"\npeak memory {ok[-1]['size']}² / {ok[0]['size']}²: {ratio:.2f} (target <= 1.5)")
            if key == "peak_rss" and ok[0]["over_base"]:
                print(f"  (over-base memory ratio: {ok[-1]['over_base'] / max(ok[0]['over_base'], 1):.2f})")
        if untiled and tiled and "error" not in untiled and "error" not in tiled:
            print(f"tiled / untiled throughput at {args.untiled}²: {tiled['mpx_s'] / untiled['mpx_s']:.2f} "
                  "(target >= 0.8)")


if __name__ == "__main__":
    main()
