"""The Adam each training stage steps with is the one its config names: `betas`, `eps` and `wd` of train-gen,
train-critic and train-gan reach fastai's optimiser (with `betas` given, beta1 holds through the one-cycle
schedule); left out, they are fastai's defaults, as every run had before they were options (and a checkpoint's
config key is unchanged); out of range, they are one-line errors at the edge (`--config`)."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from crappify.config import resolve
from crappify.errors import ConfigError
from srgan.checkpoint import config_key
from srgan.train_critic import TrainCriticConfig, train_critic
from srgan.train_gan import TrainGanConfig, train_gan
from srgan.train_gen import Trainer, TrainGenConfig

TINY_GEN = {"arch": "srresnet", "options": {"n_blocks": 1, "n_feats": 8}, "pretrained": False, "loss": "l1",
            "size": 32, "bs": 2, "epochs": 1, "preview_items": 0, "precision": "fp32", "device": "cpu"}
SOURCE_ADAM = {"betas": (0.5, 0.999), "eps": 1e-8, "wd": 0.0}  # PyTorch-GAN's: none of them fastai's defaults


def recorder(seen: list):
    """A fastai callback that records, at every optimiser step, each parameter group's Adam settings."""
    from fastai.callback.core import Callback

    class Hypers(Callback):
        def before_step(self):
            seen.append([(h["mom"], h["sqr_mom"], h["eps"], h["wd"]) for h in self.learn.opt.hypers])

    return Hypers()


def assert_every_step(seen: list, mom: float, sqr_mom: float, eps: float, wd: float) -> None:
    assert seen, "no optimiser step was recorded"
    for groups in seen:
        for got in groups:
            assert got == pytest.approx((mom, sqr_mom, eps, wd), rel=1e-9, abs=0), got


@pytest.fixture
def critic_run(gan_base, tmp_path) -> Path:
    run = tmp_path / "run"
    run.mkdir()
    shutil.copy(gan_base / "generator.safetensors", run / "generator.safetensors")
    return run


def test_train_gen_steps_with_the_configured_adam(sr_dataset, tmp_path):
    seen: list = []
    cfg = TrainGenConfig(data=str(sr_dataset), out=str(tmp_path / "run"), **TINY_GEN, **SOURCE_ADAM)
    Trainer(cfg, progress=False, cbs=[recorder(seen)]).fit()
    assert_every_step(seen, 0.5, 0.999, 1e-8, 0.0)  # beta1 held, not cycled by fit_one_cycle


def test_train_gen_defaults_are_fastais_adam_with_the_one_cycle_momentum(sr_dataset, tmp_path):
    seen: list = []
    cfg = TrainGenConfig(data=str(sr_dataset), out=str(tmp_path / "run"), **TINY_GEN)
    assert (cfg.betas, cfg.eps, cfg.wd) == (None, 1e-5, 1e-3)
    Trainer(cfg, progress=False, cbs=[recorder(seen)]).fit()
    moms = [groups[0][0] for groups in seen]
    assert moms[0] == pytest.approx(0.95) and len(set(moms)) > 1  # fastai's 0.95 -> 0.85 -> 0.95
    assert {g[1:] for groups in seen for g in groups} == {(0.99, 1e-5, 1e-3)}


def test_train_critic_steps_with_the_configured_adam(sr_dataset, critic_run):
    seen: list = []
    cfg = TrainCriticConfig(data=str(sr_dataset), out=str(critic_run), arch="patch", options={"nf": 8, "n_blocks": 2},
                            size=32, bs=2, epochs=1, precision="fp32", device="cpu", **SOURCE_ADAM)
    train_critic(cfg, progress=False, cbs=[recorder(seen)])
    assert_every_step(seen, 0.5, 0.999, 1e-8, 0.0)


def test_train_gan_steps_with_the_configured_adam(sr_dataset, gan_base, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(gan_base, run)
    seen: list = []
    cfg = TrainGanConfig(data=str(sr_dataset), out=str(run), size=32, bs=2, loss="l1", preview_items=0,
                         precision="fp32", device="cpu", switching="fixed", iters=2, checkpoint_every=2,
                         **SOURCE_ADAM)
    train_gan(cfg, progress=False, cbs=[recorder(seen)])
    assert_every_step(seen, 0.5, 0.999, 1e-8, 0.0)


@pytest.mark.parametrize("model", [TrainGenConfig, TrainCriticConfig, TrainGanConfig])
def test_adam_settings_at_their_defaults_leave_the_config_key_as_it_was(model):
    """A checkpoint written before the options existed is still this config's (`config_key` drops defaults)."""
    base = model(data="/d", out="/o")
    explicit = model(data="/d", out="/o", betas=base.betas, eps=1e-5, wd=1e-3)
    assert config_key(explicit) == config_key(base)
    assert config_key(model(data="/d", out="/o", eps=1e-8)) != config_key(base)


@pytest.mark.parametrize("model", [TrainGenConfig, TrainCriticConfig, TrainGanConfig])
@pytest.mark.parametrize(("yaml_line", "key"), [
    ("betas: [1.0, 0.999]", "betas.0"), ("betas: [0.9, -0.1]", "betas.1"), ("betas: [0.9]", "betas.1"),
    ("eps: 0", "eps"), ("wd: -1.0e-3", "wd")])
def test_out_of_range_adam_settings_in_a_config_file_are_one_line_errors(model, yaml_line, key, tmp_path):
    path = tmp_path / "stage.yaml"
    path.write_text(f"{yaml_line}\n")
    with pytest.raises(ConfigError) as err:
        resolve(model, path, data="d", out="o")
    assert f"option {key!r}" in str(err.value) and "\n" not in str(err.value)


def test_adam_settings_from_a_config_file(tmp_path):
    path = tmp_path / "stage.yaml"
    path.write_text("betas: [0.9, 0.999]\neps: 1.0e-8\nwd: 0.0\n")
    for model in (TrainGenConfig, TrainCriticConfig, TrainGanConfig):
        cfg = resolve(model, path, data="d", out="o")
        assert (cfg.betas, cfg.eps, cfg.wd) == ((0.9, 0.999), 1e-8, 0.0)


def test_train_gen_cli_refuses_a_bad_eps_in_its_config_with_one_line(cli, sr_dataset, tmp_path):
    path = tmp_path / "gen.yaml"
    path.write_text("eps: 0\n")
    proc = cli("train-gen", sr_dataset, "-o", tmp_path / "run", "--config", path)
    assert proc.returncode != 0 and "Traceback" not in proc.stderr
    assert proc.stderr.splitlines() == [proc.stderr.strip()] and "option 'eps'" in proc.stderr
    assert not (tmp_path / "run").exists()
