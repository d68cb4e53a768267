"""train-gen on tiny built datasets: outputs, rebuild from the file alone, resume after SIGKILL, NaN stop."""

from __future__ import annotations

import csv
import signal
import subprocess
import sys
import time
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch

from crappify.builder import BuildConfig, build_dataset
from crappify.errors import CrappifyError
from srgan.checkpoint import load_checkpoint, load_generator, read_generator_meta
from srgan.data import PairDataset, make_dataloaders, read_dataset
from srgan.normalize import Normalizer
from srgan.train_gen import Trainer, TrainGenConfig, plan_phases, resolve_precision

TINY = {"arch": "unet-resnet18", "pretrained": False, "size": 32, "bs": 2, "loss": "l1", "preview_items": 2}


@pytest.fixture(scope="module")
def dataset(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("data") / "ds"
    build_dataset(BuildConfig(src="samples", out=str(out), preset="flickr30k-restore", size=64, scale=4,
                              split=(0.6, 0.2, 0.2), workers=1), progress=False)
    return out


def history(run: Path) -> list[dict[str, str]]:
    with open(run / "history.csv", newline="") as fh:
        return list(csv.DictReader(fh))


def test_normalizer_round_trip_on_uint8():
    n = Normalizer()
    u = torch.randint(0, 256, (2, 3, 9, 7), dtype=torch.uint8)
    assert torch.equal(n.to_uint8(n.normalize(u)), u)


def test_sr_crops_are_aligned(sr_dataset):
    splits, config = read_dataset(sr_dataset)
    assert config["scale"] == 4
    ds = PairDataset(splits["train"], 32, scale=4, resize_lr=False, train=True, seed=3)
    for i in range(len(ds)):
        lr, hr = (t.permute(1, 2, 0).numpy() for t in ds[i])
        assert lr.shape == (8, 8, 3) and hr.shape == (32, 32, 3)
        down = cv2.resize(hr, (8, 8), interpolation=cv2.INTER_AREA).astype(float)
        shifted = cv2.resize(np.roll(hr, 8, axis=1), (8, 8), interpolation=cv2.INTER_AREA).astype(float)
        aligned_err = np.abs(down - lr).mean()
        assert aligned_err < 12, aligned_err
        assert aligned_err <= np.abs(shifted - lr).mean() + 1e-9


def test_crops_repeat_for_the_same_seed_and_epoch(dataset):
    splits, _ = read_dataset(dataset)
    a = PairDataset(splits["train"], 32, train=True, seed=1)
    b = PairDataset(splits["train"], 32, train=True, seed=1)
    assert all(torch.equal(a[i][1], b[i][1]) for i in range(len(a)))
    b.set_epoch(1)
    assert not all(torch.equal(a[i][1], b[i][1]) for i in range(len(a)))


def test_dataloaders_give_normalised_aligned_batches(dataset):
    dls = make_dataloaders(dataset, 32, 2, resize_lr=True, seed=0)
    x, y = dls.train.one_batch()
    assert x.shape == y.shape == (2, 3, 32, 32) and x.dtype == torch.float32
    assert -3 < float(y.mean()) < 3


def test_shuffled_order_follows_the_seed_and_epoch_not_the_global_random_state(dataset):
    import random

    def order(seed: int, epoch: int, global_state: int) -> list[int]:
        random.seed(global_state)  # fastai's own DataLoader drew its order from this
        dl = make_dataloaders(dataset, 32, 2, resize_lr=True, seed=seed).train
        dl.dataset.set_epoch(epoch)
        dl.randomize()
        return list(dl.get_idxs())

    assert order(0, 0, 1) == order(0, 0, 2) and order(0, 3, 1) == order(0, 3, 2)
    assert order(0, 0, 1) != order(0, 1, 1) and order(0, 0, 1) != order(1, 0, 1)


def test_the_same_seed_trains_the_same_weights(dataset, tmp_path):
    weights = []
    for name in ("a", "b"):
        Trainer(TrainGenConfig(data=str(dataset), out=str(tmp_path / name), epochs=1, precision="fp32", **TINY),
                progress=False).fit()
        weights.append(load_generator(tmp_path / name / "generator.safetensors").state_dict())
    assert all(torch.equal(weights[0][k], weights[1][k]) for k in weights[0])


def test_plan_freezes_only_pretrained_unets():
    cfg = TrainGenConfig(data="d", out="o", stages=[{"size": 64, "bs": 4, "epochs": 2}, {"size": 128, "bs": 2,
                                                                                       "epochs": 1}])
    phases = plan_phases(cfg, encoder_pretrained=True)
    assert [(p.stage, p.frozen, p.size, p.epochs) for p in phases] == [(0, True, 64, 2), (0, False, 64, 2),
                                                                       (1, True, 128, 1), (1, False, 128, 1)]
    assert [p.frozen for p in plan_phases(cfg, encoder_pretrained=False)] == [False, False]


def test_precision_auto_and_refusals():
    cpu = torch.device("cpu")
    assert resolve_precision("auto", cpu) in ("bf16", "fp32")
    assert resolve_precision("bf16", cpu) == "bf16"
    with pytest.raises(CrappifyError, match="fp16"):
        resolve_precision("fp16", cpu)


@pytest.mark.parametrize("env", [{"ATEN_CPU_CAPABILITY": "avx2"}, {"ONEDNN_MAX_CPU_ISA": "AVX2"},
                                 {"ONEDNN_MAX_CPU_ISA": "avx512_core"}])
def test_auto_is_fp32_when_torch_is_capped_below_native_bf16(env):
    """On a CPU with AVX512-BF16, torch capped to AVX2 (how an AVX2-only CPU is approximated) or oneDNN capped below
    its bf16 ISA runs bf16 on emulated kernels: auto means fp32 there, as on the CPU being approximated. Checked in
    a fresh process, since ATen reads its cap at start."""
    import os
    import subprocess
    import sys

    code = ("import torch; from srgan.train_gen import resolve_precision; "
            "print(resolve_precision('auto', torch.device('cpu')))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                         env={**os.environ, **env}, check=True)
    assert out.stdout.strip() == "fp32", out.stderr


def test_one_epoch_writes_outputs_and_the_file_alone_rebuilds_the_model(dataset, tmp_path):
    run = tmp_path / "run"
    final = Trainer(TrainGenConfig(data=str(dataset), out=str(run), epochs=1, **TINY), progress=False).fit()
    assert final == run / "generator.safetensors"
    for name in ("train-gen.yaml", "history.csv", "checkpoints/last.pt", "previews/epoch_001.png"):
        assert (run / name).is_file(), name
    rows = history(run)
    assert [r["epoch"] for r in rows] == ["1"] and float(rows[0]["psnr"]) > 0
    # the baseline on the same crops, side by side, and the flag derived from the two
    assert float(rows[0]["bicubic_psnr"]) > 0
    assert rows[0]["below_bicubic"] == str(float(rows[0]["psnr"]) < float(rows[0]["bicubic_psnr"]))
    assert "below_bicubic" in read_generator_meta(final)["extra"]
    meta = read_generator_meta(final)
    assert meta["spec"]["arch"] == "unet-resnet18" and meta["normalization"][0] == [0.485, 0.456, 0.406]
    model = load_generator(final)
    ref = load_generator(final)
    ref.load_state_dict(load_checkpoint(run / "checkpoints" / "last.pt")["model"])
    x = torch.randn(1, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(model(x), ref.eval()(x))
    assert not any("vgg" in k or "loss" in k for k in model.state_dict())


def test_srresnet_trains_on_small_lr(sr_dataset, tmp_path):
    run = tmp_path / "sr"
    cfg = TrainGenConfig(data=str(sr_dataset), out=str(run), arch="srresnet", options={"n_blocks": 2},
                         pretrained=False, size=32, bs=2, epochs=1, loss={"l1": 1.0, "tv": 1e-3}, preview_items=1)
    Trainer(cfg, progress=False).fit()
    model = load_generator(run / "generator.safetensors")
    assert model(torch.randn(1, 3, 8, 8)).shape == (1, 3, 32, 32)


def test_nan_loss_stops_and_keeps_the_last_checkpoint(dataset, tmp_path, monkeypatch):
    import srgan.losses

    real = srgan.losses.build_loss
    calls = {"n": 0}

    def poisoned(*args, **kwargs):
        loss = real(*args, **kwargs)

        class Poisoned(torch.nn.Module):
            def __init__(self):
                super().__init__()
                self.inner = loss

            def forward(self, pred, targ):
                calls["n"] += 1
                value = self.inner(pred, targ)
                return value * float("nan") if calls["n"] > 4 else value  # epoch 1 has 3 train + 1 valid batches

        return Poisoned()

    monkeypatch.setattr(srgan.losses, "build_loss", poisoned)
    run = tmp_path / "nan"
    with pytest.raises(CrappifyError, match="nan"):
        Trainer(TrainGenConfig(data=str(dataset), out=str(run), epochs=3, **TINY), progress=False).fit()
    state = load_checkpoint(run / "checkpoints" / "last.pt")
    assert state["epoch"] == 1
    assert not (run / "generator.safetensors").exists()


@pytest.mark.slow
def test_resume_after_sigkill_ends_at_the_same_epoch_count(dataset, tmp_path):
    run = tmp_path / "run"
    # unet-small: epochs of about a second here, so the kill lands mid-run with seconds to spare, and checkpoints
    # of 5 MB (unet-resnet18's were 180 MB each: 23 s a run instead of 10)
    cmd = [sys.executable, "-m", "crappify", "train-gen", str(dataset), "-o", str(run), "--arch", "unet-small",
           "--no-pretrained", "--size", "32", "--bs", "2", "--epochs", "4", "--loss", "l1", "--quiet"]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    ckpt = run / "checkpoints" / "last.pt"
    deadline = time.time() + 240
    while time.time() < deadline and proc.poll() is None:
        if ckpt.is_file() and load_checkpoint(ckpt)["epoch"] >= 1:
            break
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL, "the run finished before it could be killed"
    assert not (run / "generator.safetensors").exists()
    done = load_checkpoint(ckpt)["epoch"]
    assert 1 <= done < 4

    res = subprocess.run([*cmd, "--resume"], capture_output=True, text=True)
    assert res.returncode == 0, res.stderr[-2000:]
    assert [int(r["epoch"]) for r in history(run)] == [1, 2, 3, 4]
    assert load_checkpoint(ckpt)["epoch"] == 4
    assert (run / "generator.safetensors").is_file()
    before = load_generator(run / "generator.safetensors").state_dict()
    again = subprocess.run([*cmd, "--resume"], capture_output=True, text=True)  # finished: the same weights again
    assert again.returncode == 0, again.stderr[-2000:]
    after = load_generator(run / "generator.safetensors").state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)


def test_cli_offline_weights_error_is_one_fast_line(dataset, tmp_path):
    t0 = time.time()
    res = subprocess.run([sys.executable, "-m", "crappify", "train-gen", str(dataset), "-o", str(tmp_path / "r"),
                          "--arch", "unet-resnet34", "--size", "32"], capture_output=True, text=True)
    assert res.returncode != 0
    lines = [ln for ln in res.stderr.splitlines() if ln.strip() and "Warning" not in ln and "warn" not in ln]
    assert lines[-1].startswith("crappify: error:") and "--no-pretrained" in lines[-1], res.stderr
    assert "Traceback" not in res.stderr
    assert time.time() - t0 < 60


def test_cli_config_errors(dataset, tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("archh: srresnet\n")
    res = subprocess.run([sys.executable, "-m", "crappify", "train-gen", str(dataset), "-o", str(tmp_path / "r"),
                          "--config", str(bad)], capture_output=True, text=True)
    assert res.returncode == 2 and "archh" in res.stderr and "Traceback" not in res.stderr
    res = subprocess.run([sys.executable, "-m", "crappify", "train-gen", str(tmp_path), "-o", str(tmp_path / "r"),
                          "--no-pretrained"], capture_output=True, text=True)
    assert res.returncode != 0 and "manifest.csv" in res.stderr and "Traceback" not in res.stderr


def test_save_preds_writes_every_pair_at_full_size_once(dataset, sr_dataset, tmp_path):
    from srgan.predict import save_preds

    for data, kw in ((dataset, TINY), (sr_dataset, {**TINY, "arch": "srresnet", "options": {"n_blocks": 1}})):
        run = tmp_path / Path(data).name
        Trainer(TrainGenConfig(data=str(data), out=str(run), epochs=1, **kw), progress=False).fit()
        splits, _ = read_dataset(data)
        n = sum(len(v) for v in splits.values())
        assert save_preds(run, data) == n
        for split, pairs in splits.items():
            for pair in pairs:
                pred = cv2.imread(str(run / "preds" / split / f"{pair.id}.png"))
                hr = cv2.imread(str(pair.hr))
                assert pred.shape == hr.shape, pair.id
        assert save_preds(run, data) == 0  # already there: nothing redone
    from srgan.train_critic import ensure_preds

    # a new generator in the run: its predictions replace the old one's (train-critic would take those for its
    # own); what a user keeps in preds/ beside them stays
    mine = run / "preds" / "experiment1" / "table.csv"
    mine.parent.mkdir()
    mine.write_text("a,b\n")
    Trainer(TrainGenConfig(data=str(data), out=str(run), epochs=2, **kw), progress=False).fit()
    assert mine.read_text() == "a,b\n"
    assert ensure_preds(data, run, torch.device("cpu"), ("train", "valid", "test")) == n
    assert save_preds(run, data) == 0 and mine.read_text() == "a,b\n"


def test_a_preds_folder_the_tool_did_not_write_is_never_cleared(dataset, tmp_path, cli):
    run = tmp_path / "run"
    mine = run / "preds" / "experiment1" / "table.csv"
    mine.parent.mkdir(parents=True)
    mine.write_text("a,b\n")
    res = cli("train-gen", dataset, "-o", run, "--arch", "unet-small", "--no-pretrained", "--size", "32", "--bs",
              "4", "--loss", "l1", "--epochs", "1", "--precision", "fp32", "--quiet", "--save-preds")
    assert res.returncode != 0 and "Traceback" not in res.stderr, res.stderr
    line = res.stderr.strip().splitlines()[-1]
    assert line.startswith("crappify: error: ") and str(run / "preds") in line and "did not write" in line, line
    assert mine.read_text() == "a,b\n" and (run / "generator.safetensors").is_file()


def test_progressive_resizing_runs_each_stage_in_order(dataset, tmp_path):
    run = tmp_path / "stages"
    cfg = TrainGenConfig(data=str(dataset), out=str(run), **{**TINY, "size": 8},
                         stages=[{"size": 32, "bs": 2, "epochs": 1}, {"size": 64, "bs": 1, "epochs": 1, "lr": 1e-4}])
    Trainer(cfg, progress=False).fit()
    rows = history(run)
    got = [(r["epoch"], r["stage"], r["size"], r["bs"]) for r in rows]
    assert got == [("1", "0", "32", "2"), ("2", "1", "64", "1")]
    assert (run / "previews" / "epoch_002.png").is_file()


def test_optimizer_state_follows_its_parameters_device():
    """Checkpoints load on the CPU; resumed optimiser moments must live where the parameters do (GPU)."""
    from fastai.optimizer import Adam

    from srgan.checkpoint import load_optimizer_state

    param = torch.nn.Parameter(torch.empty(3, device="meta"))
    opt = Adam([param], lr=1e-3)
    saved = {"hypers": opt.state_dict()["hypers"], "state": [{"grad_avg": torch.zeros(3), "step": 4}]}
    load_optimizer_state(opt, saved)
    assert opt.state[param]["grad_avg"].device.type == "meta" and opt.state[param]["step"] == 4


def test_defaults_follow_where_training_starts():
    scratch = TrainGenConfig(data="d", out="o", arch="unet-resnet34", pretrained=False).resolved()
    assert (scratch.loss, scratch.size, scratch.bs, scratch.lr) == ("l1", 64, 16, 2e-3)
    assert scratch.options["residual"] is True
    course = TrainGenConfig(data="d", out="o", arch="unet-resnet34").resolved()
    assert (course.loss, course.size, course.bs, course.lr) == ("feature", 128, 8, 1e-3)
    assert course.options["residual"] is False
    # srresnet and unet-small never start from ImageNet weights: residual; the VGG loss stays when it has weights
    sr = TrainGenConfig(data="d", out="o", arch="srresnet").resolved()
    assert sr.options["residual"] is True and sr.loss == "feature" and sr.lr == 2e-3
    # what a config says wins, and stages inherit the run's lr
    mine = TrainGenConfig(data="d", out="o", arch="unet-small", pretrained=False, loss="mse", lr=5e-4,
                          options={"residual": False}, stages=[{"size": 32, "bs": 2, "epochs": 1}]).resolved()
    assert mine.loss == "mse" and mine.options["residual"] is False and mine.schedule()[0].lr == 5e-4


def test_perceptual_loss_on_random_weights_warns(dataset, tmp_path, capfd):
    cfg = TrainGenConfig(data=str(dataset), out=str(tmp_path / "run"), **{**TINY, "arch": "unet-small"})
    Trainer(cfg.model_copy(update={"loss": "feature"}), progress=False).fit()
    err = capfd.readouterr().err
    assert "warning: loss feature runs on a VGG with random weights" in err


def test_rrdb_trains_from_scratch_as_a_residual_sr_model(sr_dataset, tmp_path):
    run = tmp_path / "rrdb"
    cfg = TrainGenConfig(data=str(sr_dataset), out=str(run), arch="rrdb", options={"n_blocks": 1, "n_feats": 8,
                                                                                   "growth": 4},
                         pretrained=False, size=32, bs=2, epochs=1, preview_items=0, precision="fp32")
    assert cfg.resolved().options["residual"] is True  # random weights: starts as the bicubic baseline
    Trainer(cfg, progress=False).fit()
    model = load_generator(run / "generator.safetensors")
    assert model.crappify_spec["arch"] == "rrdb" and model.crappify_spec["scale"] == 4
    assert model(torch.randn(1, 3, 8, 8)).shape == (1, 3, 32, 32)
