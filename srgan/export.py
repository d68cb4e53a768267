"""`crappify export`: a trained generator as ONNX (dynamic height and width) or TorchScript.

The exported graph is self-contained for use outside this project: it takes float32 RGB in [0, 1]
(N×3×H×W), applies the generator's normalisation, pads to what the model needs (a multiple of 32 for
U-Nets, by reflection, cropped back afterwards) and returns float32 RGB in [0, 1], N×3×(H·s)×(W·s)
where s is the model's scale (1 for U-Nets, which expect the image already resized to the output size).
Files are written under a temporary name and renamed.
"""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from crappify.errors import CrappifyError
from crappify.imageio import replacing
from crappify.runlock import clean_stale_temps
from srgan.checkpoint import load_generator, read_generator_meta
from srgan.generators import model_multiple, model_scale

ONNX_OPSET = 18


class Exportable(nn.Module):
    """Generator + normalisation + padding: [0, 1] RGB in, [0, 1] RGB out (see the module docstring)."""

    def __init__(self, model: nn.Module, stats: tuple[list[float], list[float]]) -> None:
        super().__init__()
        self.model = model
        self.multiple = model_multiple(model)
        self.scale = model_scale(model)
        self.register_buffer("mean", torch.tensor(stats[0]).view(1, 3, 1, 1))
        self.register_buffer("std", torch.tensor(stats[1]).view(1, 3, 1, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h, w = x.shape[-2], x.shape[-1]
        x = (x - self.mean) / self.std
        if self.multiple > 1:
            m = self.multiple
            x = F.pad(x, (0, (m - w % m) % m, 0, (m - h % m) % m), mode="reflect")
        y = self.model(x)[..., : h * self.scale, : w * self.scale]
        return (y * self.std + self.mean).clamp(0.0, 1.0)


def exportable(path: str | Path) -> Exportable:
    """The generator in `path` wrapped for export, on the CPU, in eval mode, weight norm folded in."""
    meta = read_generator_meta(path)
    model = load_generator(path, "cpu")
    _remove_weight_norm(model)
    return Exportable(model, tuple(meta["normalization"])).eval()


def _remove_weight_norm(model: nn.Module) -> None:
    """Fold fastai's (old-style) weight norm into plain weights: the same function, a simpler graph."""
    for module in model.modules():
        for hook in list(getattr(module, "_forward_pre_hooks", {}).values()):
            if type(hook).__name__ == "WeightNorm":
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore", FutureWarning)
                    torch.nn.utils.remove_weight_norm(module, hook.name)


def _sample(wrapper: Exportable) -> torch.Tensor:
    m = max(wrapper.multiple, 1)
    return torch.rand(1, 3, 2 * m + 3 if m > 1 else 48, 3 * m + 5 if m > 1 else 40)


def export_onnx(path: str | Path, out: str | Path, opset: int = ONNX_OPSET) -> Path:
    """Write ONNX with dynamic batch, height and width; metadata records arch, scale and the I/O contract."""
    try:
        import onnx
    except ImportError:
        raise CrappifyError("ONNX export needs the onnx and onnxscript packages: pip install onnx onnxscript") from None
    wrapper = exportable(path)
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    sample = _sample(wrapper)
    batch, height, width = torch.export.Dim("batch"), torch.export.Dim("height"), torch.export.Dim("width")
    clean_stale_temps(out.parent, [out.name])  # left by a killed export
    with replacing(out) as tmp, warnings.catch_warnings():
        warnings.simplefilter("ignore")
        program = torch.onnx.export(wrapper, (sample,), input_names=["image"], output_names=["output"],
                                    dynamic_shapes={"x": {0: batch, 2: height, 3: width}}, opset_version=opset,
                                    dynamo=True, external_data=False, verbose=False)
        proto = program.model_proto
        spec = read_generator_meta(path)["spec"]
        for key, value in {"crappify.spec": json.dumps(spec), "crappify.scale": str(wrapper.scale),
                           "crappify.io": "float32 RGB NCHW in [0,1] -> float32 RGB NCHW in [0,1], H,W x scale"
                           }.items():
            proto.metadata_props.add(key=key, value=value)
        onnx.save_model(proto, tmp)
    return out


def export_torchscript(path: str | Path, out: str | Path) -> Path:
    """Write a traced TorchScript module (`torch.jit.load` it; same I/O contract as the ONNX file)."""
    wrapper = exportable(path)
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        traced = torch.jit.trace(wrapper, _sample(wrapper), check_trace=False)
    clean_stale_temps(out.parent, [out.name])  # left by a killed export
    with replacing(out) as tmp:
        traced.save(tmp, _extra_files={"crappify.json": json.dumps(read_generator_meta(path))})
    return out
