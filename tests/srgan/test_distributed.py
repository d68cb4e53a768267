"""Data-parallel stages and pipelines under torchrun: 2 CPU processes on the gloo backend, no code change; train-gan
kept in step by hand (same decisions, same weights on every rank); two "machines" rendezvousing on localhost."""

from __future__ import annotations

import csv
import json
import os
import re
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from test_pipeline import write_pipeline

from srgan.checkpoint import load_generator
from srgan.pipeline import STAGES, load_pipeline, paths_of, read_state

pytest.importorskip("accelerate")
pytestmark = pytest.mark.slow  # each test starts torchrun with 2 processes


SCRIPT = Path(__file__).with_name("gan_rank_script.py")


def torchrun(*args: str | Path, timeout: float = 240, nproc: int = 2, script: Path | None = None,
             launcher: tuple[str, ...] = ("--standalone",)) -> subprocess.CompletedProcess:
    """`torchrun --nproc_per_node 2 -m crappify.cli ARGS` (or SCRIPT ARGS); on a hang, the launcher and every rank
    are killed."""
    target = [str(script)] if script else ["-m", "crappify.cli"]
    cmd = [sys.executable, "-m", "torch.distributed.run", *launcher, "--nproc_per_node", str(nproc), *target,
           *map(str, args)]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        out, err = proc.communicate()
        pytest.fail(f"torchrun hung for {timeout} s: {err[-2000:]}")
    return subprocess.CompletedProcess(cmd, proc.returncode, out, err)


GAN = {"generator_arch": "srresnet", "generator_options": {"n_blocks": 1, "n_feats": 8},
       "critic_arch": "patch", "critic_options": {"nf": 8, "n_blocks": 2}, "loss": "l1", "pretrained": False,
       "size": 32, "bs": 2, "iters": 6, "checkpoint_every": 3, "precision": "fp32", "device": "cpu",
       "preview_items": 1}


def gan_ranks(out: Path, cfg: dict, nproc: int = 2, resume: bool = False) -> list[list[dict]]:
    out.mkdir(parents=True, exist_ok=True)
    for old in out.glob("rank*.json"):
        old.unlink()
    res = torchrun(json.dumps(cfg), out, *(["--resume"] if resume else []), nproc=nproc, script=SCRIPT)
    assert res.returncode == 0, res.stderr[-3000:]
    return [json.loads((out / f"rank{r}.json").read_text()) for r in range(nproc)]


@pytest.mark.parametrize("setting", [
    {"switching": "adaptive", "adv_loss": "bce", "critic_thresh": 1.386},  # decisions on the averaged loss
    {"switching": "per-batch", "adv_loss": "wgan-gp"},  # the gradient penalty's double backward, synchronised
])
def test_train_gan_on_two_processes_keeps_the_ranks_in_step(sr_dataset, tmp_path, setting):
    run = tmp_path / "run"
    cfg = {**GAN, **setting, "data": str(sr_dataset), "out": str(run)}
    ranks = gan_ranks(tmp_path / "rec", cfg)
    assert [len(r) for r in ranks] == [6, 6]  # both ranks took every step
    for a, b in zip(*ranks, strict=True):
        # the same switch decision from the same (averaged) loss, and the same weights after every step...
        assert (a["trained"], a["next_gen"], a["generator"], a["critic"]) == \
            (b["trained"], b["next_gen"], b["generator"], b["critic"])
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-6)
        assert a["batch"] != b["batch"]  # ... from different shares of the batch
    trained = [r["trained"] for r in ranks[0]]
    if setting["switching"] == "adaptive":
        assert {"generator", "critic"} <= set(trained), trained  # it switched
    # rank 0 alone wrote: one generator file, one history with a row per step, its checkpoints and previews
    gan = run / "gan"
    assert (gan / "generator.safetensors").is_file() and not list(run.rglob("*.tmp*"))
    history = list(csv.DictReader((gan / "history.csv").open()))
    assert [int(h["step"]) for h in history] == list(range(1, 7))
    assert [h["trained"] for h in history] == (trained if setting["switching"] == "adaptive" else ["both"] * 6)
    assert [float(h["loss"]) for h in history] == pytest.approx([r["loss"] for r in ranks[0]], rel=1e-5)
    assert sorted(p.name for p in (gan / "checkpoints").glob("generator_*")) == [
        "generator_000003.safetensors", "generator_000006.safetensors"]


def test_averaged_gradients_are_ddps_and_work_through_a_double_backward(tmp_path):
    res = torchrun("--ddp-check", tmp_path, script=SCRIPT)
    for rank in (0, 1):
        found = json.loads((tmp_path / f"ddp{rank}.json").read_text())
        assert found == {"plain": True, "penalty": True, "ranks_differ": True}, found
    if res.returncode != 0 and "exitcode: -6" in res.stderr:
        # Both ranks wrote their results and then one aborted while the process tore down gloo and DDP's threads
        # ("terminate called without an active exception"): seen about once in ten suite runs under load, never
        # in 28 runs alone. Reported as an expected failure, so it stays visible without hiding a wrong gradient.
        pytest.xfail("a rank aborted (SIGABRT) at teardown after both had written correct results")
    assert res.returncode == 0, res.stderr[-3000:]


def test_a_pipeline_runs_under_torchrun_every_stage_once(tmp_path):
    """train-gen, train-critic and train-gan on both ranks (each its share of every batch order), sample-crops,
    build-dataset and evaluate on rank 0 alone, one set of outputs, rank 0 alone reporting."""
    path = write_pipeline(tmp_path)
    res = torchrun("run", path, "--device", "cpu", "--quiet")
    assert res.returncode == 0, res.stderr[-3000:]
    assert res.stdout.count("pipeline tiny: done") == 1 and res.stdout.count("[train-gen] run") == 1
    batches = dict(re.findall(r"rank (\d)/2: trained (\d+) batches", res.stderr))  # train-gen's own count
    n_train, bs = 12, 4  # the tiny pipeline's train crops and batch: 6 crops a rank, 1 whole batch (drop_last)
    assert set(batches) == {"0", "1"} and int(batches["0"]) == int(batches["1"]) == n_train // 2 // bs
    assert len(list((tmp_path / "out" / "run" / "preds" / "train").rglob("*.png"))) == n_train  # by rank 0
    assert len((tmp_path / "out" / "run" / "critic-history.csv").read_text().splitlines()) == 2
    out = tmp_path / "out"
    state = load_pipeline(path)
    for stage in STAGES:
        assert read_state(paths_of(state).state, stage)["status"] == "done", stage
    # one set of outputs: one dataset (rank 0 built it), one generator, critic, GAN generator and report
    assert len((out / "dataset" / "manifest.csv").read_text().splitlines()) == 1 + 20
    for f in ("run/generator.safetensors", "run/critic.safetensors", "run/gan/generator.safetensors",
              "eval/report.md"):
        assert (out / f).is_file(), f
    gan_rows = (out / "run" / "gan" / "history.csv").read_text().splitlines()
    assert len(gan_rows) == 1 + state.train_gan["iters"]
    assert not list(out.rglob("*.tmp*"))
    # run again: every stage is skipped on every rank
    res = torchrun("run", path, "--device", "cpu", "--quiet")
    assert res.returncode == 0, res.stderr[-3000:]
    assert res.stdout.count("skip:") == len(STAGES)


def test_a_stage_failing_on_rank_zero_stops_every_rank(tmp_path):
    path = write_pipeline(tmp_path, {"build-dataset": {"preset": "no-such-preset"}})
    res = torchrun("run", path, "--device", "cpu", "--quiet", timeout=120)
    assert res.returncode != 0
    assert "no-such-preset" in res.stderr


def test_two_nodes_on_localhost_train_together_then_resume_on_one_process(sr_dataset, tmp_path):
    """Two "machines" of one process each, joined by torchrun's c10d rendezvous on localhost, train 2 steps in
    step; the run then resumes on one process (another world size) to 4 steps."""
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    run = tmp_path / "run"
    cfg = {**GAN, "switching": "fixed", "iters": 2, "data": str(sr_dataset), "out": str(run)}
    (tmp_path / "rec").mkdir()
    procs = []
    for node in (0, 1):
        launcher = ("--nnodes", "2", "--node_rank", str(node), "--rdzv_backend", "c10d",
                    "--rdzv_endpoint", f"127.0.0.1:{port}", "--rdzv_id", "crappify-test")
        cmd = [sys.executable, "-m", "torch.distributed.run", *launcher, "--nproc_per_node", "1", str(SCRIPT),
               json.dumps(cfg), str(tmp_path / "rec")]
        procs.append(subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                      start_new_session=True))
    try:
        outs = [p.communicate(timeout=240) for p in procs]
    except subprocess.TimeoutExpired:
        for p in procs:
            os.killpg(p.pid, signal.SIGKILL)
        pytest.fail("the two-node run hung")
    for p, (_, err) in zip(procs, outs, strict=True):
        assert p.returncode == 0, err[-3000:]
    ranks = [json.loads((tmp_path / "rec" / f"rank{r}.json").read_text()) for r in (0, 1)]
    assert [r["generator"] for r in ranks[0]] == [r["generator"] for r in ranks[1]]
    assert [r["batch"] for r in ranks[0]] != [r["batch"] for r in ranks[1]]
    assert torch.load(run / "gan" / "checkpoints" / "last.pt", weights_only=False)["step"] == 2
    (one,) = gan_ranks(tmp_path / "rec", {**cfg, "iters": 4}, nproc=1, resume=True)
    assert len(one) == 2  # steps 3 and 4
    history = list(csv.DictReader((run / "gan" / "history.csv").open()))
    assert [int(h["step"]) for h in history] == [1, 2, 3, 4]
    load_generator(run / "gan" / "generator.safetensors")
