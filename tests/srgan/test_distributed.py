"""Data-parallel train-gen under torchrun: 2 CPU processes on the gloo backend, no code change."""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from crappify.builder import BuildConfig, build_dataset
from srgan.checkpoint import load_generator

pytest.importorskip("accelerate")


def test_train_gen_on_two_processes(tmp_path):
    data = tmp_path / "ds"
    build_dataset(BuildConfig(src="samples", out=str(data), preset="flickr30k-restore", size=64, scale=2,
                              split=(0.7, 0.3, 0.0), workers=1), progress=False)
    run = tmp_path / "run"
    torchrun = [sys.executable, "-m", "torch.distributed.run"]
    assert shutil.which(sys.executable)
    res = subprocess.run([*torchrun, "--standalone", "--nproc_per_node", "2", "-m", "crappify.cli",
                          "train-gen", str(data), "-o", str(run), "--arch", "unet-resnet18", "--no-pretrained",
                          "--loss", "l1", "--size", "32", "--bs", "2", "--epochs", "2", "--precision", "fp32",
                          "--device", "cpu", "--quiet"], capture_output=True, text=True, timeout=280)
    assert res.returncode == 0, res.stderr[-3000:]
    batches = dict(re.findall(r"rank (\d)/2: trained (\d+) batches", res.stderr))
    assert set(batches) == {"0", "1"} and int(batches["0"]) == int(batches["1"]) > 0  # both ranks took part
    n_train = 8  # of the 11 sample photos, 0.7 → 8 train (3 valid); bs 2 → 4 batches per epoch, split over 2
    assert int(batches["0"]) == n_train // 2 // 2 * 2
    assert res.stdout.count("generator: ") == 1  # rank 0 alone reports and writes
    assert sorted(p.name for p in run.iterdir()) == ["checkpoints", "generator.safetensors", "history.csv",
                                                     "previews", "train-gen.yaml"]
    assert len((run / "history.csv").read_text().splitlines()) == 1 + 2
    load_generator(run / "generator.safetensors")
    assert not list(Path(run).rglob("*.tmp*"))
