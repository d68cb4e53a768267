"""`--log tensorboard`: train-gen, train-critic and train-gan write every history column, each loss term, the
learning rates and the preview grids as TensorBoard events (read back here), at a global step that a resumed run
continues; without the tensorboard package the option is one line before anything runs."""

from __future__ import annotations

import csv
import math
import shutil
import sys
import time
from pathlib import Path

import pytest

pytest.importorskip("tensorboard")

from crappify.cli import main
from srgan.callbacks import loss_terms
from srgan.train_critic import TrainCriticConfig, train_critic
from srgan.train_gan import TrainGanConfig, train_gan
from srgan.train_gen import Trainer, TrainGenConfig

# unet-small: two parameter groups (encoder, decoder), so per-group learning rates; l1 + tv: two loss terms
GEN = {"arch": "unet-small", "pretrained": False, "size": 32, "bs": 2, "loss": {"l1": 1.0, "tv": 1e-4},
       "preview_items": 1, "precision": "fp32", "log": "tensorboard"}
CRITIC = {"options": {"nf": 8, "n_blocks": 1}, "size": 32, "bs": 2, "epochs": 1, "precision": "fp32",
          "log": "tensorboard"}
# wgan-gp: the critic's loss has a gradient penalty term
GAN = {"size": 32, "bs": 2, "loss": "l1", "adv_loss": "wgan-gp", "iters": 4, "checkpoint_every": 2,
       "preview_items": 1, "precision": "fp32", "log": "tensorboard"}


def events(folder: Path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(folder), size_guidance={"scalars": 0, "images": 0, "tensors": 0})
    acc.Reload()
    return acc


def steps(acc, tag: str) -> list[int]:
    return [e.step for e in acc.Scalars(tag)]


def csv_rows(path: Path) -> list[dict[str, str]]:
    with open(path, newline="") as fh:
        return list(csv.DictReader(fh))


def history_tags(acc, rows: list[dict[str, str]]) -> None:
    """Every column of the history file is in the events: numbers as scalars at one step per row, words as text."""
    for column in rows[0]:
        values = [r[column] for r in rows if r[column] != ""]
        if not values:
            continue
        try:
            [float({"True": 1, "False": 0}.get(v, v)) for v in values]
        except ValueError:
            assert f"history/{column}/text_summary" in acc.Tags()["tensors"], column
            continue
        assert len(steps(acc, f"history/{column}")) == len(values), column


@pytest.fixture(scope="module")
def chain(sr_dataset, tmp_path_factory) -> Path:
    """One run folder through the three stages, each logging to TensorBoard: train-gen (2 epochs), train-critic
    (1 epoch, on the generator's outputs) and train-gan (4 per-batch steps: a generator and a critic step each)."""
    run = tmp_path_factory.mktemp("tb") / "run"
    Trainer(TrainGenConfig(data=str(sr_dataset), out=str(run), epochs=2, **GEN), progress=False).fit()
    train_critic(TrainCriticConfig(data=str(sr_dataset), out=str(run), **CRITIC), progress=False)
    train_gan(TrainGanConfig(data=str(sr_dataset), out=str(run), switching="per-batch", **GAN), progress=False)
    return run


def test_train_gen_logs_history_loss_terms_lr_per_group_and_previews(chain, sr_dataset):
    from srgan.data import make_dataloaders

    per_epoch = len(make_dataloaders(sr_dataset, 32, 2, resize_lr=True, scale=4).train)
    acc = events(chain / "tensorboard")
    total = 2 * per_epoch
    for tag in ("loss/total", "loss/l1", "loss/tv", "lr/encoder", "lr/decoder"):  # every training batch
        assert steps(acc, tag) == list(range(1, total + 1)), tag
    rows = csv_rows(chain / "history.csv")
    history_tags(acc, rows)
    assert steps(acc, "history/psnr") == [per_epoch, total]  # epoch ends, at the batch step
    assert [e.value for e in acc.Scalars("history/psnr")] == pytest.approx([float(r["psnr"]) for r in rows])
    assert [e.step for e in acc.Images("preview")] == [per_epoch, total]
    assert "history/phase/text_summary" in acc.Tags()["tensors"]


def test_train_critic_logs_into_its_own_folder(chain):
    acc = events(chain / "critic-tensorboard")
    rows = csv_rows(chain / "critic-history.csv")
    history_tags(acc, rows)
    n = steps(acc, "history/epoch")[-1]  # the batches of its one epoch
    assert n > 0 and steps(acc, "loss/total") == steps(acc, "lr") == list(range(1, n + 1))
    # train-gen's events, in the same run folder, are left whole
    assert len(steps(events(chain / "tensorboard"), "loss/total")) == 2 * steps(
        events(chain / "tensorboard"), "history/epoch")[0]


def test_train_gan_logs_each_loss_term_both_rates_and_previews(chain):
    acc = events(chain / "gan" / "tensorboard")
    history_tags(acc, csv_rows(chain / "gan" / "history.csv"))
    for tag in ("loss/generator", "loss/content", "loss/content/l1", "loss/adversarial", "loss/critic",
                "loss/critic/adversarial", "loss/critic/gradient_penalty", "lr/generator", "lr/critic",
                "history/gen_loss", "history/crit_loss"):
        assert steps(acc, tag) == [1, 2, 3, 4], tag
    rates = {tag: acc.Scalars(tag)[0].value for tag in ("lr/generator", "lr/critic")}
    assert rates["lr/critic"] == pytest.approx(5 * rates["lr/generator"])  # the critic's x 5
    terms = {tag: acc.Scalars(tag)[0].value for tag in ("loss/critic", "loss/critic/adversarial",
                                                        "loss/critic/gradient_penalty")}
    assert terms["loss/critic"] == pytest.approx(terms["loss/critic/adversarial"]
                                                 + terms["loss/critic/gradient_penalty"], rel=1e-5)
    assert [e.step for e in acc.Images("preview")] == [2, 4]


def test_a_resumed_gan_continues_the_steps_and_hides_what_a_killed_run_wrote_past_its_checkpoint(
        chain, sr_dataset, tmp_path):
    from torch.utils.tensorboard import SummaryWriter

    run = tmp_path / "run"
    shutil.copytree(chain, run, ignore=shutil.ignore_patterns("gan"))
    # fixed switching: the critic's terms come from its own steps (not the per-batch critic's)
    cfg = {**GAN, "switching": "fixed", "iters": 2}
    train_gan(TrainGanConfig(data=str(sr_dataset), out=str(run), **cfg), progress=False)
    with SummaryWriter(str(run / "gan" / "tensorboard")) as w:  # a run killed after its checkpoint at step 2
        for step in (3, 4, 5):
            w.add_scalar("loss/generator", 1e6, step)
    time.sleep(1.1)  # event files are read in name order, and their names hold the second they were made
    train_gan(TrainGanConfig(data=str(sr_dataset), out=str(run), **{**cfg, "iters": 4}), resume=True,
              progress=False)
    acc = events(run / "gan" / "tensorboard")
    assert steps(acc, "history/step") == [1, 2, 3, 4]
    assert [e.value for e in acc.Scalars("history/step")] == [1, 2, 3, 4]
    gen_steps = steps(acc, "loss/generator")
    assert gen_steps == sorted(set(gen_steps)) and all(e.value < 1e6 for e in acc.Scalars("loss/generator"))
    trained = [r["trained"] for r in csv_rows(run / "gan" / "history.csv")]
    assert gen_steps == [i + 1 for i, t in enumerate(trained) if t == "generator"]
    assert steps(acc, "loss/critic/gradient_penalty") == [i + 1 for i, t in enumerate(trained) if t == "critic"]
    assert [e.step for e in acc.Images("preview")] == [2, 4]


def test_a_resumed_train_gen_continues_the_global_step(chain, sr_dataset, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(chain, run, ignore=shutil.ignore_patterns("gan", "critic*"))
    n = steps(events(run / "tensorboard"), "history/epoch")[0]  # batches per epoch
    Trainer(TrainGenConfig(data=str(sr_dataset), out=str(run), epochs=3, **GEN), resume=True, progress=False).fit()
    acc = events(run / "tensorboard")
    assert steps(acc, "loss/total") == steps(acc, "loss/tv") == list(range(1, 3 * n + 1))
    assert steps(acc, "history/epoch") == [n, 2 * n, 3 * n]
    assert [e.value for e in acc.Scalars("history/epoch")] == [1, 2, 3]
    assert [e.step for e in acc.Images("preview")] == [n, 2 * n, 3 * n]


def test_the_step_whose_loss_went_nan_is_written_term_by_term(chain, sr_dataset, tmp_path, monkeypatch):
    import torch

    import srgan.losses
    from crappify.errors import CrappifyError

    real, calls = srgan.losses.build_loss, {"n": 0}

    def poisoned(*args, **kwargs):  # the content loss turns NaN at its second call: generator step 4
        loss = real(*args, **kwargs)

        class Poisoned(torch.nn.Module):
            def forward(self, pred, targ):
                calls["n"] += 1
                return loss(pred, targ) * (float("nan") if calls["n"] >= 2 else 1.0)

        return Poisoned()

    monkeypatch.setattr(srgan.losses, "build_loss", poisoned)
    run = tmp_path / "run"
    shutil.copytree(chain, run, ignore=shutil.ignore_patterns("gan", "*tensorboard"))
    cfg = {**GAN, "switching": "fixed", "iters": 10, "checkpoint_every": 2}
    with pytest.raises(CrappifyError, match="generator loss became nan at GAN step 4"):
        train_gan(TrainGanConfig(data=str(sr_dataset), out=str(run), **cfg), progress=False)
    acc = events(run / "gan" / "tensorboard")
    last = {tag: acc.Scalars(tag)[-1] for tag in ("loss/content", "loss/adversarial", "loss/generator")}
    assert {e.step for e in last.values()} == {4}
    assert math.isnan(last["loss/content"].value) and math.isnan(last["loss/generator"].value)
    assert math.isfinite(last["loss/adversarial"].value)


def test_loss_terms_name_each_part_and_the_feature_losss_own_terms():
    import torch

    from srgan.losses import build_loss

    loss = build_loss({"feature": 1.0, "tv": 1e-4}, pretrained=False)
    x = torch.rand(1, 3, 32, 32)
    total = loss(x, torch.rand(1, 3, 32, 32))
    terms = loss_terms(loss)
    assert {"loss/feature", "loss/tv", "loss/feature/pixel", "loss/feature/feat_0", "loss/feature/gram_0"} <= set(terms)
    assert float(total) == pytest.approx(terms["loss/feature"] + 1e-4 * terms["loss/tv"], rel=1e-5)
    assert all(math.isfinite(v) for v in terms.values())
    assert loss_terms(torch.nn.functional.l1_loss) == {}


@pytest.mark.parametrize("command", ["train-gen", "train-critic", "train-gan"])
def test_without_the_package_log_tensorboard_is_one_line(command, monkeypatch, tmp_path, capsys):
    monkeypatch.setitem(sys.modules, "tensorboard", None)  # `import tensorboard` fails as if not installed
    with pytest.raises(SystemExit) as exit_:
        main([command, str(tmp_path / "data"), "-o", str(tmp_path / "run"), "--log", "tensorboard"])
    err = capsys.readouterr().err
    assert exit_.value.code == 2 and err.count("\n") == 1, err
    assert "pip install 'crappify[tensorboard]'" in err and "Traceback" not in err
    assert not (tmp_path / "run").exists()  # nothing ran
