"""SIGTERM (a preempted machine, a cluster scheduler) and checkpoints inside an epoch.

SIGTERM makes a training stage write a checkpoint at the next batch boundary and stop with `Interrupted`
(exit status 143 from the command line); `--resume` then loses nothing. `checkpoint_every` N writes one every
N batches of an epoch. For train-gen, train-critic and train-gan (CPU, fp32, seeded) a run stopped in the
middle of its second epoch — by SIGTERM, or killed after a step checkpoint — and resumed ends with weights and
history identical to an uninterrupted run (the wall-clock columns aside). The in-process tests deliver a real
SIGTERM to this process from a fastai callback; one test sends it to a `crappify train-gen` subprocess.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from test_resume import (
    Killed,
    assert_same_critic,
    assert_same_gan,
    assert_same_gen,
    critic_setup,
    kill_on_call,
    rows,
)

from crappify.errors import Interrupted
from srgan.checkpoint import load_checkpoint
from srgan.train_critic import train_critic
from srgan.train_gan import TrainGanConfig, train_gan
from srgan.train_gen import Trainer, TrainGenConfig

# 7 training pairs: 3 batches an epoch for each stage (train-critic: 14 real/fake items in batches of 4)
GEN = {"arch": "unet-small", "pretrained": False, "size": 32, "bs": 2, "loss": "l1", "preview_items": 1,
       "precision": "fp32", "device": "cpu", "epochs": 2}
CRIT = {"arch": "patch", "options": {"nf": 8, "n_blocks": 2}, "size": 32, "bs": 4, "lr": 3e-3,
        "precision": "fp32", "device": "cpu", "epochs": 2}
GAN = {"size": 32, "bs": 2, "loss": "l1", "preview_items": 1, "precision": "fp32", "switching": "fixed",
       "iters": 7, "checkpoint_every": 100, "pretrained": False, "device": "cpu"}


def sigterm_at(epoch: int, batch: int, training: bool = True):
    """A fastai callback that sends SIGTERM to this process once, after batch `batch` (0-based) of `epoch`
    (0-based: epoch 1 is the second), in training or in validation."""
    from fastai.callback.core import Callback

    class SendSigterm(Callback):
        def __init__(self):
            self.sent = False

        def after_batch(self):
            if not self.sent and self.training == training and self.epoch == epoch and self.iter == batch:
                self.sent = True
                os.kill(os.getpid(), signal.SIGTERM)

    return SendSigterm()


def resume_quietly(capfd: pytest.CaptureFixture, folder: Path) -> None:
    """The resume just run took up its checkpoint: no 'starting from the beginning' note, nothing set aside
    (a restart from scratch ends at the same weights under a seed, so the weights alone cannot tell)."""
    assert "starting from the beginning" not in capfd.readouterr().err
    assert not list(folder.glob("stale-*.pt"))


def assert_one_line_naming_resume(exc: pytest.ExceptionInfo) -> None:
    text = str(exc.value)
    assert "\n" not in text and "SIGTERM" in text and "--resume" in text


# --------------------------------------------------------------------------------------------------------
# train-gen


def gen_cfg(data: Path, run: Path, **kw) -> TrainGenConfig:
    return TrainGenConfig(data=str(data), out=str(run), **{**GEN, **kw})


@pytest.fixture(scope="module")
def gen_reference(sr_dataset, tmp_path_factory) -> Path:
    run = tmp_path_factory.mktemp("gen-ref")
    Trainer(gen_cfg(sr_dataset, run), progress=False).fit()
    return run


@pytest.mark.parametrize("training", [True, False], ids=["mid-epoch", "during-validation"])
def test_gen_sigterm_checkpoints_where_it_is_and_resume_loses_nothing(training, sr_dataset, gen_reference,
                                                                     tmp_path, capfd):
    run = tmp_path / "run"
    before = signal.getsignal(signal.SIGTERM)
    with pytest.raises(Interrupted) as exc:
        Trainer(gen_cfg(sr_dataset, run), progress=False, cbs=[sigterm_at(1, 1 if training else 0, training)]).fit()
    assert_one_line_naming_resume(exc)
    assert signal.getsignal(signal.SIGTERM) is before  # the previous handler is back
    state = load_checkpoint(run / "checkpoints" / "last.pt")
    assert (state["epoch"], state["batch"]) == ((1, 2) if training else (1, 3))  # epoch 2, 2 (or all 3) batches
    assert len(state["epoch_loss"]) == 2 and state["epoch_loss"][1] == (4 if training else 6)
    assert [r["epoch"] for r in rows(run / "history.csv")] == ["1"]
    assert not (run / "generator.safetensors").exists()
    capfd.readouterr()
    Trainer(gen_cfg(sr_dataset, run), resume=True, progress=False).fit()
    resume_quietly(capfd, run / "checkpoints")
    assert_same_gen(run, gen_reference)


def test_gen_checkpoint_every_n_batches_then_killed_resumes_from_inside_the_epoch(sr_dataset, gen_reference,
                                                                                  tmp_path, monkeypatch, capfd):
    import srgan.train_gen

    run = tmp_path / "run"
    with monkeypatch.context() as m:  # checkpoints: e1 b2, e1 end, e2 b2, e2 end: killed writing the 4th
        kill_on_call(m, srgan.train_gen, "save_checkpoint", call=4)
        with pytest.raises(Killed, match="save_checkpoint call 4"):
            Trainer(gen_cfg(sr_dataset, run, checkpoint_every=2), progress=False).fit()
    state = load_checkpoint(run / "checkpoints" / "last.pt")
    assert (state["epoch"], state["batch"]) == (1, 2)
    capfd.readouterr()
    Trainer(gen_cfg(sr_dataset, run), resume=True, progress=False).fit()  # checkpoint_every: how to run only
    resume_quietly(capfd, run / "checkpoints")
    assert_same_gen(run, gen_reference)


def test_sigterm_after_the_last_batch_finishes_the_stage_then_stops(sr_dataset, gen_reference, tmp_path):
    from fastai.callback.core import Callback

    class SigtermAfterFit(Callback):
        def after_fit(self):
            os.kill(os.getpid(), signal.SIGTERM)

    run = tmp_path / "run"
    with pytest.raises(Interrupted, match="had finished"):  # a pipeline must not go on to its next stage
        Trainer(gen_cfg(sr_dataset, run), progress=False, cbs=[SigtermAfterFit()]).fit()
    assert_same_gen(run, gen_reference)


# --------------------------------------------------------------------------------------------------------
# train-critic


crit_base, crit_cfg, crit_reference = critic_setup(CRIT)


def test_critic_sigterm_mid_epoch_then_resume_loses_nothing(sr_dataset, crit_base, crit_reference, tmp_path,
                                                            capfd):
    run = shutil.copytree(crit_base, tmp_path / "run")
    with pytest.raises(Interrupted) as exc:
        train_critic(crit_cfg(sr_dataset, run), progress=False, cbs=[sigterm_at(1, 0)])
    assert_one_line_naming_resume(exc)
    state = load_checkpoint(run / "critic-checkpoints" / "last.pt")
    assert (state["epoch"], state["batch"]) == (1, 1)
    capfd.readouterr()
    train_critic(crit_cfg(sr_dataset, run), resume=True, progress=False)
    resume_quietly(capfd, run / "critic-checkpoints")
    assert_same_critic(run, crit_reference)


def test_critic_checkpoint_every_then_killed_resumes_from_inside_the_epoch(sr_dataset, crit_base, crit_reference,
                                                                           tmp_path, monkeypatch, capfd):
    import srgan.train_critic

    run = shutil.copytree(crit_base, tmp_path / "run")
    with monkeypatch.context() as m:  # checkpoints: e1 b1, b2, end, e2 b1, b2, end: killed writing the 5th
        kill_on_call(m, srgan.train_critic, "save_checkpoint", call=5)
        with pytest.raises(Killed, match="save_checkpoint call 5"):
            train_critic(crit_cfg(sr_dataset, run, checkpoint_every=1), progress=False)
    state = load_checkpoint(run / "critic-checkpoints" / "last.pt")
    assert (state["epoch"], state["batch"]) == (1, 1)
    capfd.readouterr()
    train_critic(crit_cfg(sr_dataset, run, checkpoint_every=1), resume=True, progress=False)
    resume_quietly(capfd, run / "critic-checkpoints")
    assert_same_critic(run, crit_reference)


# --------------------------------------------------------------------------------------------------------
# train-gan


def test_gan_sigterm_mid_epoch_saves_the_step_and_resume_loses_nothing(sr_dataset, gan_base, tmp_path, capfd):
    run, ref = shutil.copytree(gan_base, tmp_path / "run"), shutil.copytree(gan_base, tmp_path / "ref")
    cfg = TrainGanConfig(data=str(sr_dataset), out=str(run), **GAN)
    with pytest.raises(Interrupted) as exc:  # epoch 2 (steps 4-6), after its second step
        train_gan(cfg, progress=False, cbs=[sigterm_at(1, 1)])
    assert_one_line_naming_resume(exc)
    assert load_checkpoint(run / "gan" / "checkpoints" / "last.pt")["step"] == 5
    assert len(rows(run / "gan" / "history.csv")) == 5
    capfd.readouterr()
    train_gan(cfg, resume=True, progress=False)
    resume_quietly(capfd, run / "gan" / "checkpoints")
    train_gan(TrainGanConfig(data=str(sr_dataset), out=str(ref), **GAN), progress=False)
    assert_same_gan(run, ref)


# --------------------------------------------------------------------------------------------------------
# the command line and `crappify run`


def test_cli_sigterm_exits_143_with_one_line_then_resume_completes(sr_dataset, gen_reference, tmp_path):
    run = tmp_path / "run"
    # GEN on the command line (preview items and checkpoint frequency aside: they only say how to run)
    cmd = [sys.executable, "-m", "crappify", "train-gen", str(sr_dataset), "-o", str(run), "--arch", "unet-small",
           "--no-pretrained", "--size", "32", "--bs", "2", "--epochs", "2", "--loss", "l1", "--precision", "fp32",
           "--device", "cpu", "--checkpoint-every", "1", "--quiet"]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    ckpt = run / "checkpoints" / "last.pt"
    deadline = time.time() + 120
    while time.time() < deadline and proc.poll() is None and not ckpt.is_file():
        time.sleep(0.005)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 143, err[-2000:]
    lines = [line for line in err.splitlines() if line.strip()]
    assert "Traceback" not in err
    assert lines[-1].startswith("crappify: train-gen stopped by SIGTERM") and "--resume" in lines[-1]
    assert sum("--resume" in line for line in lines) == 1
    assert not (run / "generator.safetensors").exists()
    assert load_checkpoint(ckpt)["epoch"] < 2
    Trainer(gen_cfg(sr_dataset, run), resume=True, progress=False).fit()  # what `--resume` runs
    assert_same_gen(run, gen_reference)


def test_pipeline_stage_stopped_by_sigterm_stays_running_and_resumes(tmp_path, monkeypatch):
    from test_pipeline import write_pipeline

    import srgan.callbacks
    from srgan.pipeline import load_pipeline, read_state, run_pipeline

    path = write_pipeline(tmp_path, {"train-gen": {"arch": "unet-small", "epochs": 2}})
    real_add, calls = srgan.callbacks.EpochLoss.add, {"n": 0}

    def add(self, loss, yb):  # SIGTERM during the 5th training batch (one of epoch 2)
        calls["n"] += 1
        if calls["n"] == 5:
            os.kill(os.getpid(), signal.SIGTERM)
        real_add(self, loss, yb)

    with monkeypatch.context() as m:
        m.setattr(srgan.callbacks.EpochLoss, "add", add)
        with pytest.raises(Interrupted, match="run the same command again") as exc:
            run_pipeline(load_pipeline(path), stop="train-gen", progress=False)
    assert "pipeline tiny: train-gen stopped by SIGTERM" in str(exc.value)
    out = tmp_path / "out"
    assert read_state(out / ".pipeline", "train-gen")["status"] == "running"
    assert load_checkpoint(out / "run" / "checkpoints" / "last.pt").get("batch")
    steps = {s.stage: s.action for s in run_pipeline(load_pipeline(path), stop="train-gen", progress=False)}
    assert steps["train-gen"] == "resume"
    assert read_state(out / ".pipeline", "train-gen")["status"] == "done"
    assert [r["epoch"] for r in rows(out / "run" / "history.csv")] == ["1", "2"]
