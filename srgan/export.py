"""`crappify export`: a trained generator as ONNX (dynamic height and width) or TorchScript.

The exported graph is self-contained for use outside this project: it takes RGB in [0, 1] (N×3×H×W), applies the
generator's normalisation, pads to what the model needs (a multiple of 32 for U-Nets, by reflection, cropped back
afterwards) and returns RGB in [0, 1], N×3×(H·s)×(W·s) where s is the model's scale (1 for U-Nets, which expect the
image already resized to the output size). `dtype` fp32: float32 in, weights and out; fp16: float16 in, weights and
out (what chaiNNer and onnxruntime users take an fp16 model to be: chaiNNer feeds float16 when the input is), the
bicubic skip of residual generators still computed in float32 inside. Files are written under a temporary name,
checked there when asked (`verify`), then renamed; an existing file is replaced only with `overwrite`.
"""

from __future__ import annotations

import json
import warnings
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from crappify.errors import ConfigError, CrappifyError
from crappify.imageio import replacing
from crappify.runlock import clean_stale_temps
from srgan.checkpoint import load_generator, read_generator_meta
from srgan.generators import model_multiple, model_scale

ONNX_OPSET = 18
DTYPES = {"fp32": torch.float32, "fp16": torch.float16}
# --verify: the largest |exported − PyTorch fp32| allowed on [0, 1] outputs (1/255 is one 8-bit level). fp32 engines
# differ in summation order only (measured ~1e-6); fp16 rounds every activation to 11 significant bits.
TOLERANCE = {"fp32": 1e-3, "fp16": 2e-2}
VERIFY_SIZE = (45, 70)  # height, width: not square, not a multiple of 32 (a U-Net's padding) nor of 2, 4 or 8

Note = Callable[[str], None]


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
        # a residual generator's bicubic skip is float32 whatever the weights: the output is the input's type
        return (y * self.std + self.mean).clamp(0.0, 1.0).to(self.mean.dtype)


def exportable(path: str | Path, dtype: str = "fp32") -> Exportable:
    """The generator in `path` wrapped for export, on the CPU, in eval mode, weight norm folded in, in `dtype`."""
    meta = read_generator_meta(path)
    model = load_generator(path, "cpu")
    _remove_weight_norm(model)
    return Exportable(model, tuple(meta["normalization"])).eval().to(_dtype(dtype))


def _dtype(name: str) -> torch.dtype:
    if name not in DTYPES:
        raise ConfigError(f"dtype must be one of {', '.join(DTYPES)}, got {name!r}")
    return DTYPES[name]


def _remove_weight_norm(model: nn.Module) -> None:
    """Fold fastai's (old-style) weight norm into plain weights: the same function, a simpler graph."""
    for module in model.modules():
        for hook in list(getattr(module, "_forward_pre_hooks", {}).values()):
            if type(hook).__name__ == "WeightNorm":
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore", FutureWarning)
                    torch.nn.utils.remove_weight_norm(module, hook.name)


def _sample(wrapper: Exportable) -> torch.Tensor:
    """The input the graph is traced with: small, and neither square nor a multiple of what the model needs."""
    m = max(wrapper.multiple, 1)
    size = (2 * m + 3, 3 * m + 5) if m > 1 else (48, 40)
    return torch.rand(2, 3, *size).to(wrapper.mean.dtype)  # batch 2: torch.export specialises a batch of 1


def check_target(out: str | Path, overwrite: bool, model: str | Path | None = None) -> Path:
    """`out` as a Path, after refusing a folder, the model file itself, or an existing file without `overwrite`."""
    out = Path(out)
    if out.is_dir():
        raise ConfigError(f"{out} is a folder; give the file to write")
    if model is not None and out.exists() and out.resolve() == Path(model).resolve():
        raise ConfigError(f"{out} is the model file being exported; write the export to another file")
    if out.exists() and not overwrite:
        raise ConfigError(f"{out} already exists (--overwrite to replace it)")
    return out


def _quiet(_: str) -> None:
    pass


def export_onnx(path: str | Path, out: str | Path, opset: int = ONNX_OPSET, *, dtype: str = "fp32",
                verify: bool = False, tolerance: float | None = None, overwrite: bool = True,
                note: Note | None = None, report: Note | None = None, exporter: str = "auto") -> Path:
    """Write ONNX with dynamic batch, height and width; metadata records arch, scale and the I/O contract.
    `exporter`: "auto" (the trace exporter, else torch.export), "trace" or "dynamo" (`_onnx_proto`).

    `verify`: before the file takes its name, run it with onnxruntime against PyTorch (fp32) on a random
    VERIFY_SIZE image and fail if the largest difference is over `tolerance` (default TOLERANCE[dtype]).
    `note` gets a line per phase (tracing a ResNet-34 U-Net takes tens of seconds on a small CPU), `report` the
    verification's result."""
    note = note or _quiet
    try:
        import onnx
    except ImportError:
        raise CrappifyError("ONNX export needs the onnx and onnxscript packages: pip install onnx onnxscript") from None
    if verify:
        _need_onnxruntime()
    out = check_target(out, overwrite, path)
    note(f"export: loading {path}")
    wrapper = exportable(path, dtype)
    out.parent.mkdir(parents=True, exist_ok=True)
    clean_stale_temps(out.parent, [out.name])  # left by a killed export
    meta = read_generator_meta(path)
    kind = "float16" if dtype == "fp16" else "float32"
    props = {"crappify.spec": json.dumps(meta["spec"]), "crappify.scale": str(wrapper.scale),
             # the HR/LR ratio of the training data: a U-Net (scale 1) takes the photo resized by it, bicubic
             "crappify.data_scale": str(int(meta["extra"].get("data_scale") or 1)), "crappify.dtype": dtype,
             "crappify.io": f"{kind} RGB NCHW in [0,1] -> {kind} RGB NCHW in [0,1], H,W x scale"}
    with replacing(out) as tmp:
        proto = _onnx_proto(wrapper, _sample(wrapper), opset, note, exporter)
        for key, value in props.items():
            proto.metadata_props.add(key=key, value=value)
        note(f"export: writing {out}")
        onnx.save_model(proto, tmp)
        del proto
        if verify:
            _verify(path, lambda x: _run_onnx(tmp, x), dtype, tolerance, "onnxruntime", report or _quiet)
    return out


def _onnx_proto(wrapper: Exportable, sample: torch.Tensor, opset: int, note: Note, exporter: str = "auto"):
    """The ONNX ModelProto of `wrapper`, dynamic in batch, height and width.

    Where the time went (a ResNet-34 U-Net, 2-core CPU, benchmarks/README.md): torch.onnx.export's default
    (dynamo) exporter spends minutes in torch.export's symbolic-shape reasoning over every fastai layer, then
    in translation; the TorchScript-trace exporter gives a graph that computes the same in about 5 s, its
    shapes (the pad to 32, the crop back, the sub-pixel sizes) recorded as graph ops, so any size runs. It is
    deprecated in torch, so `exporter` "auto" falls back to the dynamo path where it is gone or fails; --verify
    checks whichever ran."""
    if exporter in ("auto", "trace"):
        try:
            return _onnx_trace(wrapper, sample, opset, note)
        except Exception as exc:  # no legacy exporter in this torch, or an op it cannot express
            if exporter == "trace":
                raise
            note(f"export: the trace exporter failed ({type(exc).__name__}); using torch.export, which takes minutes")
    return _onnx_dynamo(wrapper, sample, opset, note)


def _onnx_trace(wrapper: Exportable, sample: torch.Tensor, opset: int, note: Note):
    import io

    import onnx

    buffer = io.BytesIO()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        note("export: tracing the network (TorchScript trace exporter)")
        torch.onnx.export(wrapper, (sample,), buffer, input_names=["image"], output_names=["output"],
                          dynamic_axes={"image": {0: "batch", 2: "height", 3: "width"},
                                        "output": {0: "batch", 2: "out_height", 3: "out_width"}},
                          opset_version=opset, dynamo=False)
    return onnx.load_from_string(buffer.getvalue())


def _onnx_dynamo(wrapper: Exportable, sample: torch.Tensor, opset: int, note: Note):
    # Dim.DYNAMIC with size-oblivious 0/1 reasoning and deferred runtime asserts keeps batch, height and width
    # symbolic through the U-Net's pad-to-32 and the sub-pixel shapes, where named Dims fail torch.export's
    # constraint check; the asserts become checks in the graph, not specialisations. The non-strict trace skips
    # the strict mode's bytecode tracing, which torch.onnx.export would try first.
    import torch.fx.experimental._config

    dynamic = {"x": {0: torch.export.Dim.DYNAMIC, 2: torch.export.Dim.DYNAMIC, 3: torch.export.Dim.DYNAMIC}}
    with warnings.catch_warnings(), torch.fx.experimental._config.patch(backed_size_oblivious=True):
        warnings.simplefilter("ignore")
        note("export: tracing the network (torch.export, non-strict)")
        program = torch.export.export(wrapper, (sample,), dynamic_shapes=dynamic, strict=False,
                                      prefer_deferred_runtime_asserts_over_guards=True)
        note("export: translating to ONNX")
        onnx_program = torch.onnx.export(program, (sample,), input_names=["image"], output_names=["output"],
                                         opset_version=opset, dynamo=True, external_data=False, optimize=False,
                                         verbose=False)
        note("export: optimising the graph")
        onnx_program.optimize()
    return onnx_program.model_proto


def _need_onnxruntime() -> None:
    try:
        import onnxruntime  # noqa: F401
    except ImportError:
        raise CrappifyError("--verify runs the file with onnxruntime: pip install onnxruntime") from None


def _run_onnx(file: str | Path, x: torch.Tensor) -> torch.Tensor:
    import onnxruntime as ort

    session = ort.InferenceSession(str(file), providers=["CPUExecutionProvider"])
    return torch.from_numpy(session.run(None, {"image": x.numpy()})[0])


def _verify(path: str | Path, run: Callable[[torch.Tensor], torch.Tensor], dtype: str, tolerance: float | None,
            engine: str, report: Note) -> float:
    """The largest |run(x) − PyTorch fp32(x)| on a random VERIFY_SIZE image; a one-line error over `tolerance`."""
    tolerance = TOLERANCE[dtype] if tolerance is None else tolerance
    x = torch.rand(1, 3, *VERIFY_SIZE, generator=torch.Generator().manual_seed(0)).to(DTYPES[dtype])
    with torch.no_grad():
        want = exportable(path, "fp32")(x.float())
        got = run(x)
    shape = f"{VERIFY_SIZE[0]}x{VERIFY_SIZE[1]}"
    if got.shape != want.shape:
        raise CrappifyError(f"--verify: {engine} returned {list(got.shape)} for a {shape} image where PyTorch returns "
                            f"{list(want.shape)}")
    diff = float((got.float() - want).abs().max())
    report(f"verify: {engine} on a {shape} image: largest difference from PyTorch fp32 {diff:.2e} "
           f"(tolerance {tolerance:g})")
    if not diff <= tolerance:  # NaN fails too
        raise CrappifyError(f"--verify: {engine}'s output differs from PyTorch's by up to {diff:.2e} on a {shape} "
                            f"image (tolerance {tolerance:g}); the file was not written")
    return diff


def export_torchscript(path: str | Path, out: str | Path, *, verify: bool = False, tolerance: float | None = None,
                       overwrite: bool = True, note: Note | None = None, report: Note | None = None) -> Path:
    """Write a traced TorchScript module (`torch.jit.load` it; same I/O contract as the ONNX file, float32)."""
    note = note or _quiet
    out = check_target(out, overwrite, path)
    note(f"export: loading {path}")
    wrapper = exportable(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    note("export: tracing the network (torch.jit.trace)")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        traced = torch.jit.trace(wrapper, _sample(wrapper), check_trace=False)
    clean_stale_temps(out.parent, [out.name])  # left by a killed export
    with replacing(out) as tmp:
        note(f"export: writing {out}")
        traced.save(tmp, _extra_files={"crappify.json": json.dumps(read_generator_meta(path))})
        if verify:
            loaded = torch.jit.load(tmp)
            _verify(path, loaded, "fp32", tolerance, "TorchScript", report or _quiet)
    return out


def export_basicsr(path: str | Path, out: str | Path, *, verify: bool = False, tolerance: float | None = None,
                   overwrite: bool = True, note: Note | None = None, report: Note | None = None) -> Path:
    """Write the generator in BasicSR's state-dict layout (`srgan.basicsr`): `.pth` ({"params": ...}) or
    `.safetensors` (flat), what spandrel, chaiNNer and Real-ESRGAN's scripts load. A model without that layout is
    refused in one line pointing to ONNX. `verify`: spandrel loads the written file and runs it against ours."""
    from srgan.basicsr import FORMATS, basicsr_state, write_basicsr

    note = note or _quiet
    out = check_target(out, overwrite, path)
    if out.suffix not in FORMATS:
        raise ConfigError(f"{out}: a BasicSR-layout file is .pth or .safetensors")
    check_basicsr(path)
    if verify:
        _need_spandrel()
    note(f"export: loading {path}")
    model = load_generator(path, "cpu").eval()
    out.parent.mkdir(parents=True, exist_ok=True)
    clean_stale_temps(out.parent, [out.name])  # left by a killed export
    with replacing(out) as tmp:
        note(f"export: writing {out} (BasicSR layout)")
        write_basicsr(basicsr_state(model), Path(tmp), out.suffix)
        if verify:
            run = lambda x: _run_spandrel(tmp, out.suffix, x)  # noqa: E731
            _verify(path, run, "fp32", tolerance, "spandrel", report or _quiet)
    return out


def check_basicsr(path: str | Path) -> None:
    """One line when the generator in `path` has no BasicSR layout (before anything is written)."""
    from srgan.basicsr import basicsr_problem

    problem = basicsr_problem(read_generator_meta(path)["spec"])
    if problem:
        raise CrappifyError(f"{path} cannot be written in BasicSR's layout: {problem}; export it as ONNX instead "
                            "(--onnx), which chaiNNer also runs")


def _need_spandrel() -> None:
    try:
        import spandrel  # noqa: F401
    except ImportError:
        raise CrappifyError("--verify of a BasicSR-layout file loads it with spandrel: pip install spandrel") from None


def _run_spandrel(file: str | Path, suffix: str, x: torch.Tensor) -> torch.Tensor:
    """The file as spandrel (chaiNNer's loader) reads and builds it, on [0, 1] RGB, clamped as our graph is.
    spandrel picks its reader by the file's extension, which the temporary name lacks: it reads a link to it."""
    import os
    import tempfile

    import spandrel

    with tempfile.TemporaryDirectory() as folder, warnings.catch_warnings():
        warnings.simplefilter("ignore")
        named = Path(folder) / f"model{suffix}"
        os.symlink(Path(file).resolve(), named)
        descriptor = spandrel.ModelLoader().load_from_file(str(named))
    with torch.no_grad():
        return descriptor.model.eval()(x).clamp(0.0, 1.0)
