"""Pretrained weights fetched on first use, from a mirror served on 127.0.0.1 (never the internet): downloaded
once into torchvision's cache and loaded, checked against the hash in the file name, nothing kept from a
corrupted or interrupted transfer, offline mode never connecting, a dead port failing fast."""

from __future__ import annotations

import hashlib
import http.server
import io
import socket
import subprocess
import threading
import time
from pathlib import Path

import pytest
import torch
import torchvision

from srgan.weights import WeightsError, torchvision_cache_path, torchvision_state_dict

NAME = "ResNet34_Weights.IMAGENET1K_V1"


class Mirror:
    """A weights mirror on 127.0.0.1: `files` maps a file name to its bytes; `cut` names files whose transfer
    stops half-way (the full length announced); `requests` counts what was asked for."""

    def __init__(self) -> None:
        self.files: dict[str, bytes] = {}
        self.cut: set[str] = set()
        self.requests: list[str] = []
        mirror = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                name = self.path.rsplit("/", 1)[-1]
                mirror.requests.append(name)
                data = mirror.files.get(name)
                if data is None:
                    self.send_error(404)
                    return
                self.send_response(200)
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data[:len(data) // 2] if name in mirror.cut else data)
                if name in mirror.cut:
                    self.wfile.flush()
                    self.connection.shutdown(socket.SHUT_RDWR)

            def log_message(self, *args) -> None:
                pass

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/models"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def mirror(monkeypatch, tmp_path):
    """A mirror serving nothing yet, named by CRAPPIFY_WEIGHTS_URL; an empty TORCH_HOME; the network allowed."""
    served = Mirror()
    monkeypatch.setenv("CRAPPIFY_WEIGHTS_URL", served.url)
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    monkeypatch.delenv("CRAPPIFY_OFFLINE", raising=False)
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    yield served
    served.close()


def state_file(state: dict[str, torch.Tensor]) -> tuple[bytes, str]:
    """A state dict saved as torch.save does, and its torch.hub-style name with the SHA-256 prefix."""
    buf = io.BytesIO()
    torch.save(state, buf)
    data = buf.getvalue()
    return data, f"resnet34-{hashlib.sha256(data).hexdigest()[:8]}.pth"


def use_file_name(monkeypatch, name: str) -> None:
    """torchvision's ResNet-34 weights entry pointing at `name` (the real one's hash cannot match our file)."""
    real = torchvision.models.get_weight

    class Entry:
        url = f"https://download.pytorch.org/models/{name}"

    monkeypatch.setattr(torchvision.models, "get_weight", lambda n: Entry() if n == NAME else real(n))


def cache_files(tmp_path: Path) -> list[str]:
    folder = tmp_path / "torch" / "hub" / "checkpoints"
    return sorted(p.name for p in folder.iterdir()) if folder.is_dir() else []


def test_first_use_downloads_once_and_the_unet_is_built_from_it(mirror, monkeypatch, tmp_path):
    from srgan.generators import build_generator

    torch.manual_seed(1)
    served = torchvision.models.resnet34().state_dict()  # a real ResNet-34 state dict, 87 MB
    data, name = state_file(served)
    mirror.files[name] = data
    use_file_name(monkeypatch, name)
    model = build_generator("unet-resnet34", scale=1, img_size=64, pretrained=True)
    assert mirror.requests == [name] and cache_files(tmp_path) == [name]
    assert torchvision_cache_path(NAME).read_bytes() == data
    encoder = model.layers[0] if hasattr(model, "layers") else model[0]
    first_conv = next(v for k, v in encoder.state_dict().items() if v.ndim == 4)
    assert torch.equal(first_conv, served["conv1.weight"])
    build_generator("unet-resnet34", scale=1, img_size=64, pretrained=True)
    assert mirror.requests == [name]  # the second use reads the cache


def test_a_wrong_hash_keeps_nothing(mirror, monkeypatch, tmp_path):
    data, name = state_file({"w": torch.ones(3)})
    wrong = name.replace(name.split("-")[1][:8], "00000000")
    mirror.files[wrong] = data
    use_file_name(monkeypatch, wrong)
    with pytest.raises(WeightsError) as err:
        torchvision_state_dict(NAME)
    message = str(err.value)
    assert "does not match" in message and "--no-pretrained" in message and "\n" not in message, message
    assert cache_files(tmp_path) == []


def test_a_transfer_cut_half_way_keeps_nothing(mirror, monkeypatch, tmp_path):
    data, name = state_file({"w": torch.ones(100_000)})
    mirror.files[name] = data
    mirror.cut.add(name)
    use_file_name(monkeypatch, name)
    with pytest.raises(WeightsError) as err:
        torchvision_state_dict(NAME)
    assert "could not download" in str(err.value) and "\n" not in str(err.value)
    assert cache_files(tmp_path) == []
    mirror.cut.clear()  # the next try completes
    assert torch.equal(torchvision_state_dict(NAME)["w"], torch.ones(100_000))


def test_offline_never_connects(mirror, monkeypatch, tmp_path):
    data, name = state_file({"w": torch.ones(3)})
    mirror.files[name] = data
    use_file_name(monkeypatch, name)
    for env in ("CRAPPIFY_OFFLINE", "HF_HUB_OFFLINE"):
        monkeypatch.setenv(env, "1")
        with pytest.raises(WeightsError, match="not in the local cache and the network is off"):
            torchvision_state_dict(NAME)
        monkeypatch.delenv(env)
    assert mirror.requests == [] and cache_files(tmp_path) == []


def test_a_port_with_nothing_listening_fails_fast(monkeypatch, tmp_path):
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    monkeypatch.setenv("CRAPPIFY_WEIGHTS_URL", f"http://127.0.0.1:{port}/models")
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    monkeypatch.delenv("CRAPPIFY_OFFLINE", raising=False)
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    start = time.monotonic()
    with pytest.raises(WeightsError) as err:
        torchvision_state_dict(NAME)
    assert time.monotonic() - start < 5
    message = str(err.value)
    assert "could not download" in message and str(torchvision_cache_path(NAME)) in message, message
    assert cache_files(tmp_path) == []


def test_cli_offline_flag_is_one_line_and_connects_to_nothing(mirror, monkeypatch, tmp_path, sr_dataset, cli):
    data, name = state_file({"w": torch.ones(3)})
    mirror.files[name] = data
    res = cli("train-gen", sr_dataset, "-o", tmp_path / "run", "--arch", "unet-resnet34", "--size", "32",
              "--epochs", "1", "--offline")
    assert res.returncode != 0 and "Traceback" not in res.stderr, res.stderr
    line = res.stderr.strip().splitlines()[-1]
    assert line.startswith("crappify: error: ") and "network is off" in line and "--no-pretrained" in line, line
    assert mirror.requests == []


def test_timm_weights_offline_are_one_line_without_connecting(monkeypatch, tmp_path):
    from srgan.weights import timm_pretrained_file

    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hf"))
    monkeypatch.setenv("CRAPPIFY_OFFLINE", "1")
    with pytest.raises(WeightsError) as err:
        timm_pretrained_file("resnet18.a1_in1k")
    message = str(err.value)
    assert "network is off" in message and "--no-pretrained" in message and "\n" not in message, message


def test_the_cli_and_the_library_read_one_variable():
    from crappify.cli.options import OFFLINE_ENV
    from srgan import weights

    assert OFFLINE_ENV == weights.OFFLINE_ENV == "CRAPPIFY_OFFLINE"


class HubMirror:
    """A Hugging Face hub mirror on 127.0.0.1 (what HF_ENDPOINT names): `files` maps 'repo/filename' to bytes,
    served at /{repo}/resolve/{revision}/{filename} with the headers huggingface_hub reads (commit, ETag, size);
    `cut` names files whose transfer stops half-way; `requests` records (method, path)."""

    def __init__(self) -> None:
        self.files: dict[str, bytes] = {}
        self.cut: set[str] = set()
        self.requests: list[tuple[str, str]] = []
        hub = self

        class Handler(http.server.BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def _file(self) -> tuple[str, bytes | None]:
                hub.requests.append((self.command, self.path))
                parts = self.path.split("?")[0].strip("/").split("/")
                if len(parts) < 5 or parts[2] != "resolve":
                    return "", None
                key = f"{parts[0]}/{parts[1]}/{'/'.join(parts[4:])}"
                return key, hub.files.get(key)

            def _headers(self, data: bytes) -> None:
                self.send_response(200)
                self.send_header("X-Repo-Commit", "a" * 40)
                self.send_header("ETag", f'"{hashlib.sha256(data).hexdigest()}"')
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()

            def do_HEAD(self) -> None:
                _key, data = self._file()
                if data is None:
                    self.send_response(404)
                    self.send_header("X-Error-Code", "EntryNotFound")
                    self.send_header("Content-Length", "0")
                    self.end_headers()
                    return
                self._headers(data)

            def do_GET(self) -> None:
                key, data = self._file()
                if data is None:
                    self.send_error(404)
                    return
                self._headers(data)
                self.wfile.write(data[:len(data) // 2] if key in hub.cut else data)
                if key in hub.cut:
                    self.wfile.flush()
                    self.connection.shutdown(socket.SHUT_RDWR)

            def log_message(self, *args) -> None:
                pass

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


TIMM_MODEL = "resnet18.a1_in1k"  # its pretrained weights live in the hub repo timm/resnet18.a1_in1k


def _timm_file_in_a_fresh_process(hub_url: str, cache: Path) -> subprocess.CompletedProcess:
    """`timm_pretrained_file` in a new interpreter: huggingface_hub reads HF_ENDPOINT and its cache when imported."""
    import os
    import sys

    env = {k: v for k, v in os.environ.items() if k not in ("HF_HUB_OFFLINE", "CRAPPIFY_OFFLINE", "HF_TOKEN")}
    env.update(HF_ENDPOINT=hub_url, HF_HUB_CACHE=str(cache), HF_HUB_DISABLE_TELEMETRY="1")
    code = ("import sys\nfrom crappify.errors import CrappifyError\nfrom srgan.weights import timm_pretrained_file\n"
            f"try:\n    print(timm_pretrained_file({TIMM_MODEL!r}))\n"
            "except CrappifyError as exc:\n    print(exc, file=sys.stderr)\n    sys.exit(1)\n")
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, env=env)


@pytest.mark.slow  # three fresh interpreters importing timm
def test_timm_weights_come_from_the_hub_mirror_once_and_a_cut_transfer_is_not_used(tmp_path):
    """timm's weights through the Hugging Face hub as HF_ENDPOINT names it (an air-gapped cluster's mirror):
    fetched into the hub's cache on first use and read from there afterwards without a request; a transfer cut
    half-way is one line and leaves no usable file behind."""
    from safetensors.torch import load_file, save

    state = {"conv1.weight": torch.arange(27, dtype=torch.float32).reshape(1, 3, 3, 3)}
    data = save(state)
    hub = HubMirror()
    try:
        key = f"timm/{TIMM_MODEL}/model.safetensors"
        hub.cut.add(key)
        hub.files[key] = data
        cut = _timm_file_in_a_fresh_process(hub.url, tmp_path / "hf")
        assert cut.returncode == 1 and "Traceback" not in cut.stderr, cut.stderr
        line = cut.stderr.strip().splitlines()[-1]
        assert "could not download pretrained weights for timm model" in line and "--no-pretrained" in line, line
        assert not [p for p in (tmp_path / "hf").rglob("model.safetensors")]  # nothing usable in the cache

        hub.cut.clear()
        first = _timm_file_in_a_fresh_process(hub.url, tmp_path / "hf")
        assert first.returncode == 0, first.stderr
        path = Path(first.stdout.strip().splitlines()[-1])
        assert path.is_file() and str(path).startswith(str(tmp_path / "hf"))
        assert torch.equal(load_file(path)["conv1.weight"], state["conv1.weight"])
        assert any(method == "GET" for method, _ in hub.requests)

        hub.requests.clear()
        again = _timm_file_in_a_fresh_process(hub.url, tmp_path / "hf")
        assert again.returncode == 0 and Path(again.stdout.strip().splitlines()[-1]) == path
        assert hub.requests == []  # read from the cache: not a single request
    finally:
        hub.close()
