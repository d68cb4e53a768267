"""Data-parallel train-gen under torchrun: 2 CPU processes on the gloo backend, no code change."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from crappify.builder import BuildConfig, build_dataset
from srgan.checkpoint import load_generator

pytest.importorskip("accelerate")


def torchrun(*args: str | Path, timeout: float = 240) -> subprocess.CompletedProcess:
    """`torchrun --nproc_per_node 2 -m crappify.cli ARGS`; on a hang, the launcher and both ranks are killed."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", "-m",
           "crappify.cli", *map(str, args)]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        out, err = proc.communicate()
        pytest.fail(f"torchrun hung for {timeout} s: {err[-2000:]}")
    return subprocess.CompletedProcess(cmd, proc.returncode, out, err)


def test_training_stages_on_two_processes(tmp_path):
    data = tmp_path / "ds"
    build_dataset(BuildConfig(src="samples", out=str(data), preset="flickr30k-restore", size=64, scale=2,
                              split=(0.7, 0.3, 0.0), workers=1), progress=False)
    run = tmp_path / "run"
    res = torchrun("train-gen", data, "-o", run, "--arch", "unet-resnet18", "--no-pretrained", "--loss", "l1",
                   "--size", "32", "--bs", "2", "--epochs", "2", "--precision", "fp32", "--device", "cpu", "--quiet")
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

    # the critic too: rank 0 writes the generator's predictions first, then both ranks train on them
    config = tmp_path / "critic.yaml"
    config.write_text("options: {nf: 8, n_blocks: 1}\nsize: 32\nbs: 2\nepochs: 1\nprecision: fp32\n")
    res = torchrun("train-critic", data, "-o", run, "--config", config, "--device", "cpu", "--quiet")
    assert res.returncode == 0, res.stderr[-3000:]
    assert res.stdout.count("critic: ") == 1
    assert len((run / "critic-history.csv").read_text().splitlines()) == 2
    assert len(list((run / "preds" / "train").glob("*.png"))) == n_train
    # the GAN phase runs in one process and says so rather than training each rank alone
    res = torchrun("train-gan", data, "-o", run, "--device", "cpu", "--quiet")
    assert res.returncode != 0 and "launch it without torchrun" in res.stderr
