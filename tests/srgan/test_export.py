"""export: ONNX (dynamic H and W) and TorchScript match PyTorch on non-square inputs."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

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
