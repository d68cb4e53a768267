"""export: ONNX (dynamic H and W) and TorchScript match PyTorch on non-square inputs."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import run_main

from srgan.checkpoint import save_generator
from srgan.export import export_onnx, export_torchscript, exportable
from srgan.generators import build_generator


@pytest.fixture(scope="module")
def sr_file(tmp_path_factory) -> Path:
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("models") / "sr.safetensors"
    save_generator(build_generator("srresnet", scale=4, pretrained=False, n_blocks=1, n_feats=8), path, data_scale=4)
    return path


def test_onnx_round_trip_matches_pytorch_on_non_square_inputs(sr_file, tmp_path):
    ort = pytest.importorskip("onnxruntime")
    pytest.importorskip("onnxscript")
    out = export_onnx(sr_file, tmp_path / "g.onnx")
    session = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"])
    wrapper = exportable(sr_file)
    for shape in [(1, 3, 21, 34), (2, 3, 40, 17)]:
        x = torch.rand(*shape)
        with torch.no_grad():
            ref = wrapper(x).numpy()
        got = session.run(None, {"image": x.numpy()})[0]
        assert got.shape == (shape[0], 3, shape[2] * 4, shape[3] * 4)
        assert np.abs(got - ref).max() < 1e-4
    meta = {p.key: p.value for p in __import__("onnx").load(str(out)).metadata_props}
    assert meta["crappify.scale"] == "4" and "srresnet" in meta["crappify.spec"]


@pytest.mark.parametrize("exporter", ["trace", "dynamo"])
def test_both_onnx_exporters_give_a_graph_of_any_size_for_each_generator_kind(sr_file, unet_file, tmp_path,
                                                                              exporter):
    """The trace exporter (the fast default) and torch.export (its fallback) both keep batch, height and width
    dynamic through the U-Net's pad-to-32 and crop and the sub-pixel shapes."""
    ort = pytest.importorskip("onnxruntime")
    pytest.importorskip("onnxscript")
    # torch.export of the U-Net takes about a minute on 2 cores (measured by hand, benchmarks/README.md): the
    # fallback is checked on the SR generator only
    for path, scale in ((sr_file, 4), (unet_file, 1))[: 2 if exporter == "trace" else 1]:
        out = export_onnx(path, tmp_path / f"{path.stem}-{exporter}.onnx", exporter=exporter)
        session = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"])
        wrapper = exportable(path)
        for shape in [(1, 3, 45, 70), (2, 3, 33, 64)]:
            x = torch.rand(*shape)
            with torch.no_grad():
                ref = wrapper(x).numpy()
            got = session.run(None, {"image": x.numpy()})[0]
            assert got.shape == (shape[0], 3, shape[2] * scale, shape[3] * scale)
            assert np.abs(got - ref).max() < 1e-4


def test_onnx_residual_generator_matches_pytorch(tmp_path):
    """The residual skip (bicubic inside the model) exports with dynamic H and W and gives the same pixels."""
    ort = pytest.importorskip("onnxruntime")
    pytest.importorskip("onnxscript")
    torch.manual_seed(0)
    model = build_generator("srresnet", scale=2, pretrained=False, n_blocks=1, n_feats=8, residual=True)
    with torch.no_grad():
        model.gain.fill_(0.5)  # a trained-looking mix of skip and correction
    save_generator(model, tmp_path / "res.safetensors", data_scale=2)
    out = export_onnx(tmp_path / "res.safetensors", tmp_path / "res.onnx")
    session = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"])
    wrapper = exportable(tmp_path / "res.safetensors")
    for shape in [(1, 3, 19, 30), (2, 3, 8, 41)]:
        x = torch.rand(*shape)
        with torch.no_grad():
            ref = wrapper(x).numpy()
        got = session.run(None, {"image": x.numpy()})[0]
        assert got.shape == ref.shape == (shape[0], 3, shape[2] * 2, shape[3] * 2)
        assert np.abs(got - ref).max() < 1e-4


def test_torchscript_unet_pads_any_size(tmp_path):
    torch.manual_seed(0)
    path = tmp_path / "unet.safetensors"
    save_generator(build_generator("unet-resnet18", pretrained=False), path, data_scale=1)
    out = export_torchscript(path, tmp_path / "g.pt")
    loaded = torch.jit.load(str(out))
    wrapper = exportable(path)
    with torch.no_grad():
        for shape in [(1, 3, 45, 70), (1, 3, 64, 33)]:
            x = torch.rand(*shape)
            y = loaded(x)
            assert y.shape == shape and (y - wrapper(x)).abs().max() < 1e-4


def test_cli_export_needs_a_target(tmp_path, sr_file):
    from crappify.cli import main

    with pytest.raises(SystemExit) as exc:
        main(["export", "-m", str(sr_file)])
    assert exc.value.code == 2


@pytest.fixture(scope="module")
def unet_file(tmp_path_factory) -> Path:
    """A residual unet-small (its bicubic skip stays float32 in an fp16 export) with a trained-looking gain."""
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("models") / "unet.safetensors"
    model = build_generator("unet-small", pretrained=False, img_size=64, residual=True)
    with torch.no_grad():
        model.layers[-1].gain.fill_(0.5)
    save_generator(model, path, data_scale=2)
    return path


# fp16 against PyTorch fp32 on [0, 1] outputs: measured at most ~2e-3 on these models; 1e-2 is 2.5 8-bit levels
FP16_TOLERANCE = 1e-2


@pytest.mark.parametrize("which", ["sr", "unet"])
def test_fp16_onnx_takes_and_returns_float16_and_is_close_to_fp32(sr_file, unet_file, tmp_path, which):
    ort = pytest.importorskip("onnxruntime")
    pytest.importorskip("onnxscript")
    path = sr_file if which == "sr" else unet_file
    out = export_onnx(path, tmp_path / "g16.onnx", dtype="fp16")
    session = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"])
    assert session.get_inputs()[0].type == session.get_outputs()[0].type == "tensor(float16)"
    assert session.get_inputs()[0].shape[1] == 3  # N×3×H×W: what chaiNNer reads as BCHW
    scale = 4 if which == "sr" else 1
    x = torch.rand(1, 3, 45, 70)
    got = session.run(None, {"image": x.half().numpy()})[0]
    with torch.no_grad():
        ref = exportable(path)(x.half().float()).numpy()
    assert got.dtype == np.float16 and got.shape == (1, 3, 45 * scale, 70 * scale)
    diff = np.abs(got.astype(np.float32) - ref).max()
    assert 0 < diff < FP16_TOLERANCE, diff  # not zero: it really ran in half precision
    meta = {p.key: p.value for p in __import__("onnx").load(str(out)).metadata_props}
    assert meta["crappify.dtype"] == "fp16" and meta["crappify.io"].startswith("float16")


def test_cli_verify_prints_the_difference_and_phases(sr_file, tmp_path):
    pytest.importorskip("onnxruntime")
    pytest.importorskip("onnxscript")
    code, out, err = run_main("export", "-m", sr_file, "--onnx", tmp_path / "g.onnx", "--torchscript",
                              tmp_path / "g.pt", "--verify")
    assert code == 0, err
    lines = [ln for ln in out.splitlines() if ln.startswith("verify:")]
    assert len(lines) == 2 and "onnxruntime" in lines[0] and "TorchScript" in lines[1], out
    assert all("largest difference from PyTorch fp32" in ln and "45x70" in ln for ln in lines)
    assert float(lines[0].split("fp32 ")[1].split()[0]) < 1e-3
    for phase in ("export: loading", "export: tracing", "export: writing"):
        assert phase in err, err
    code, _, err = run_main("export", "-m", sr_file, "--torchscript", tmp_path / "q.pt", "--quiet")
    assert code == 0 and "export:" not in err


def test_verify_over_the_tolerance_is_one_line_and_writes_nothing(sr_file, tmp_path, monkeypatch):
    pytest.importorskip("onnxruntime")
    pytest.importorskip("onnxscript")
    import srgan.export

    real = srgan.export._run_onnx
    monkeypatch.setattr(srgan.export, "_run_onnx", lambda file, x: real(file, x) + 0.01)  # a wrong runtime
    target = tmp_path / "g.onnx"
    code, out, err = run_main("export", "-m", sr_file, "--onnx", target, "--verify", "--quiet")
    errors = [ln for ln in err.splitlines() if ln.startswith("crappify: error:")]
    assert code == 1 and len(errors) == 1 and "differs from PyTorch's by up to 1.00e-02" in errors[0], err
    assert "Traceback" not in err and "verify: onnxruntime" in out
    assert not target.exists() and list(tmp_path.iterdir()) == []  # neither the file nor a temporary
    code, _, err = run_main("export", "-m", sr_file, "--onnx", target, "--verify", "--tolerance", "0.02", "--quiet")
    assert code == 0 and target.is_file(), err


def test_cli_export_never_replaces_a_file_unasked(sr_file, tmp_path):
    pytest.importorskip("onnxscript")
    mine = tmp_path / "g.onnx"
    mine.write_bytes(b"the user's")
    code, _, err = run_main("export", "-m", sr_file, "--torchscript", tmp_path / "g.pt", "--onnx", mine, "--quiet")
    assert code == 2 and "already exists" in err and mine.read_bytes() == b"the user's"
    assert not (tmp_path / "g.pt").exists()  # refused before anything was made
    code, _, err = run_main("export", "-m", sr_file, "--onnx", mine, "--overwrite", "--quiet")
    assert code == 0 and mine.read_bytes() != b"the user's", err
    code, _, err = run_main("export", "-m", sr_file, "--torchscript", sr_file, "--overwrite", "--quiet")
    assert code == 2 and "is the model file" in err


def test_cli_fp16_needs_onnx(sr_file, tmp_path):
    code, _, err = run_main("export", "-m", sr_file, "--torchscript", tmp_path / "g.pt", "--dtype", "fp16")
    assert code == 2 and "--dtype applies to the ONNX file" in err and not (tmp_path / "g.pt").exists()
