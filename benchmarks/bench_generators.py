"""Generators side by side on this machine: training step time, whole-image inference speed, ONNX fp32 vs fp16.

Run:  python benchmarks/bench_generators.py [--archs unet-small,compact] [--scale 4] [--steps 6]
                                            [--size 64] [--bs 16] [--image 512] [--onnx]

For each generator (random weights; speed does not depend on them), as train-gen builds it for data of `--scale`
(a U-Net at x1 on the LR resized to the HR size; an SR generator at x`scale` on the LR itself):
- a training step: forward, L1 loss on HR crops of `--size` px, backward, Adam step, fp32, batch `--bs`; the
  minimum of `--steps` timed steps after 2 warm-up steps;
- inference: megapixels of output per second through `srgan.inference.TiledInference` (what `enhance` runs),
  on an `--image`² output, fp32, the median of 3 calls after a warm-up;
- with `--onnx`: the same image through onnxruntime's CPU provider from `crappify export` files in fp32 and
  fp16 (the export's own time too), and the largest difference of each from PyTorch fp32.
Prints a markdown table; the figures go to benchmarks/README.md with the CPU named (`lscpu`).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from srgan.checkpoint import save_generator
from srgan.generators import build_generator, is_unet_arch

OPTIONS = {"unet-small": {"residual": True}, "srresnet": {"residual": True}, "rrdb": {"residual": True}}


def build(arch: str, scale: int, size: int) -> torch.nn.Module:
    torch.manual_seed(0)
    return build_generator(arch, scale=1 if is_unet_arch(arch) else scale, img_size=size, pretrained=False,
                           **OPTIONS.get(arch, {}))


def step_time(model: torch.nn.Module, arch: str, scale: int, size: int, bs: int, steps: int) -> float:
    lr_size = size if is_unet_arch(arch) else size // scale
    x, y = torch.randn(bs, 3, lr_size, lr_size), torch.randn(bs, 3, size, size)
    opt = torch.optim.Adam(model.parameters(), lr=1e-4)
    model.train()
    times = []
    for i in range(steps + 2):
        t0 = time.perf_counter()
        opt.zero_grad()
        torch.nn.functional.l1_loss(model(x), y).backward()
        opt.step()
        if i >= 2:
            times.append(time.perf_counter() - t0)
    return min(times)


def photo(side: int) -> np.ndarray:
    from skimage import data

    from srgan.upsample import resize_image

    return resize_image(data.astronaut(), (side, side))


def inference_speed(path: Path, image: int) -> tuple[float, str]:
    from srgan.enhance import Loaded, enhance_image
    from srgan.inference import load_inference

    engine = load_inference(path, torch.device("cpu"), precision="fp32")
    img = photo(image // engine.model_scale)
    enhance_image(engine, Loaded(photo(max(64, 256 // engine.model_scale))), 1)
    times = []
    for _ in range(3):
        t0 = time.perf_counter()
        out, _ = enhance_image(engine, Loaded(img), 1)
        times.append(time.perf_counter() - t0)
    return out.shape[0] * out.shape[1] / 1e6 / statistics.median(times), f"tile {engine.tile}"


def onnx_speed(path: Path, image: int, folder: Path) -> dict[str, str]:
    import onnxruntime as ort

    from srgan.export import export_onnx, exportable

    wrapper = exportable(path)
    x = torch.rand(1, 3, image // wrapper.scale, image // wrapper.scale)
    with torch.no_grad():
        want = wrapper(x).numpy()
    out = {}
    for dtype in ("fp32", "fp16"):
        t0 = time.perf_counter()
        file = export_onnx(path, folder / f"{path.stem}-{dtype}.onnx", dtype=dtype)
        export_s = time.perf_counter() - t0
        options = ort.SessionOptions()
        options.intra_op_num_threads = torch.get_num_threads()
        session = ort.InferenceSession(str(file), options, providers=["CPUExecutionProvider"])
        feed = {"image": x.numpy().astype(np.float16 if dtype == "fp16" else np.float32)}
        session.run(None, feed)
        times = []
        for _ in range(3):
            t0 = time.perf_counter()
            got = session.run(None, feed)[0]
            times.append(time.perf_counter() - t0)
        mpx = got.shape[2] * got.shape[3] / 1e6 / statistics.median(times)
        diff = float(np.abs(got.astype(np.float32) - want).max())
        size = file.stat().st_size / 2**20
        out[dtype] = f"{mpx:.2f} MP/s, export {export_s:.1f} s, max diff {diff:.1e}, {size:.1f} MiB"
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--archs", default="unet-small,compact")
    ap.add_argument("--scale", type=int, default=4)
    ap.add_argument("--steps", type=int, default=6)
    ap.add_argument("--size", type=int, default=64)
    ap.add_argument("--bs", type=int, default=16)
    ap.add_argument("--image", type=int, default=512)
    ap.add_argument("--onnx", action="store_true")
    args = ap.parse_args()
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, fp32; HR {args.size} px, batch {args.bs},"
          f" x{args.scale} data; inference on a {args.image}² output")
    print("| generator | parameters | train step | enhance | ONNX fp32 (onnxruntime CPU) | ONNX fp16 |")
    print("| --- | --- | --- | --- | --- | --- |")
    with tempfile.TemporaryDirectory() as tmp:
        for arch in args.archs.split(","):
            model = build(arch, args.scale, args.size)
            params = sum(p.numel() for p in model.parameters())
            step = step_time(model, arch, args.scale, args.size, args.bs, args.steps)
            path = Path(tmp) / f"{arch}.safetensors"
            save_generator(model, path, data_scale=args.scale)
            mpx, tile = inference_speed(path, args.image)
            onnx = onnx_speed(path, args.image, Path(tmp)) if args.onnx else {"fp32": "-", "fp16": "-"}
            print(f"| `{arch}` | {params / 1e6:.2f} M | {step:.3f} s | {mpx:.2f} MP/s ({tile}) | {onnx['fp32']} | "
                  f"{onnx['fp16']} |", flush=True)


if __name__ == "__main__":
    main()
