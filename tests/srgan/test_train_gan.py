"""train-gan with a tiny SRResNet and a tiny critic on CPU: switching, frozen networks, losses, precision,
EMA, resume, NaN stop, outputs and CLI errors."""

from __future__ import annotations

import copy
import csv
import shutil
from pathlib import Path

import pytest
import torch
import yaml

from crappify.errors import CrappifyError
from srgan.checkpoint import load_checkpoint, load_generator, read_generator_meta, save_critic, save_generator
from srgan.critics import build_critic
from srgan.generators import build_generator
from srgan.train_gan import TrainGanConfig, train_gan

TINY = {"size": 32, "bs": 2, "loss": "l1", "preview_items": 1, "precision": "fp32"}


@pytest.fixture
def dataset(sr_dataset) -> Path:
    return sr_dataset


@pytest.fixture(scope="module")
def pretrained(tmp_path_factory) -> Path:
    """A run directory with a tiny generator and critic, as train-gen and train-critic would leave them."""
    run = tmp_path_factory.mktemp("gan-run")
    torch.manual_seed(0)
    save_generator(build_generator("srresnet", scale=4, n_blocks=1, n_feats=8), run / "generator.safetensors",
                   data_scale=4, extra={"loss": "l1"})
    save_critic(build_critic("gan-critic", nf=8, n_blocks=1), run / "critic.safetensors")
    return run


@pytest.fixture
def run(pretrained, tmp_path) -> Path:
    out = tmp_path / "run"
    shutil.copytree(pretrained, out)
    return out


def history(run: Path) -> list[dict[str, str]]:
    with open(run / "gan" / "history.csv", newline="") as fh:
        return list(csv.DictReader(fh))


def watcher(log: list):
    """A fastai callback that, for every step, records which network trained and which parameters changed."""
    from fastai.callback.core import Callback

    def snapshot(module):
        return [p.detach().clone() for p in module.parameters()]

    def changed(before, module):
        return any(not torch.equal(b, p.detach()) for b, p in zip(before, module.parameters(), strict=True))

    class Watch(Callback):
        order = 0

        def before_batch(self):
            gan = self.learn.model
            self.gen_mode = bool(self.learn.gan_trainer.gen_mode)
            self.before = snapshot(gan.generator), snapshot(gan.critic)
            self.modes = gan.generator.training, gan.critic.training

        def after_step(self):
            gan = self.learn.model
            log.append({"gen_mode": self.gen_mode, "gen_changed": changed(self.before[0], gan.generator),
                        "crit_changed": changed(self.before[1], gan.critic), "train_modes": self.modes})

    return Watch()


def test_one_batch_steps_switch_both_ways_and_train_only_the_current_network(dataset, run):
    log: list[dict] = []
    cfg = TrainGanConfig(data=str(dataset), out=str(run), switching="fixed", n_crit=2, n_gen=1, iters=6,
                         checkpoint_every=3, **TINY)
    final = train_gan(cfg, progress=False, cbs=[watcher(log)])
    rows = history(run)
    assert [r["trained"] for r in rows] == ["critic", "critic", "generator"] * 2
    assert [int(r["step"]) for r in rows] == list(range(1, 7))
    last = rows[-1]
    assert (last["gen_steps"], last["crit_steps"], last["to_gen"], last["to_crit"]) == ("2", "4", "2", "2")
    for r in rows:
        assert torch.isfinite(torch.tensor(float(r["loss"])))
        key = "gen_loss" if r["trained"] == "generator" else "crit_loss"
        assert r["loss"] == r[key]
    # the critic's rate is x5 the generator's (GANDiscriminativeLR), and goes back after each critic step
    assert [float(r["lr"]) for r in rows] == pytest.approx([5e-4, 5e-4, 1e-4] * 2)
    # each step changes exactly the network it trains; the other one is in eval mode meanwhile
    assert len(log) == 6
    for entry in log:
        assert entry["gen_changed"] == entry["gen_mode"] and entry["crit_changed"] != entry["gen_mode"], entry
        assert entry["train_modes"] == ((True, False) if entry["gen_mode"] else (False, True)), entry
    # outputs: the final generator and per-N checkpoints in the generator format, previews, resolved config
    assert final == run / "gan" / "generator.safetensors"
    assert read_generator_meta(final)["spec"]["arch"] == "srresnet"
    model = load_generator(final)
    assert model(torch.randn(1, 3, 8, 8)).shape == (1, 3, 32, 32)
    for step in (3, 6):
        load_generator(run / "gan" / "checkpoints" / f"generator_{step:06d}.safetensors")
        assert (run / "gan" / "previews" / f"step_{step:06d}.png").is_file()
    saved = yaml.safe_load((run / "train-gan.yaml").read_text())
    assert saved.keys() == TrainGanConfig.model_fields.keys()
    assert TrainGanConfig.model_validate(saved) == cfg


@pytest.mark.parametrize("critic_thresh, expected", [(100.0, ["critic", "generator"] * 2), (-1.0, ["critic"] * 4)])
def test_adaptive_switching_follows_the_critic_threshold(dataset, run, critic_thresh, expected):
    cfg = TrainGanConfig(data=str(dataset), out=str(run), critic_thresh=critic_thresh, iters=4, **TINY)
    train_gan(cfg, progress=False)
    assert [r["trained"] for r in history(run)] == expected


@pytest.mark.parametrize("adv_loss", ["bce", "lsgan", "hinge", "wgan-gp"])
def test_each_adversarial_loss_runs_in_bf16_channels_last(dataset, run, adv_loss):
    cfg = TrainGanConfig(data=str(dataset), out=str(run), adv_loss=adv_loss, switching="fixed", iters=2,
                         **{**TINY, "precision": "bf16"}, channels_last=True, weighting="srgan")
    train_gan(cfg, progress=False)
    rows = history(run)
    assert [r["trained"] for r in rows] == ["critic", "generator"]
    for r in rows:
        assert torch.isfinite(torch.tensor(float(r["loss"]))), r
    assert float(rows[1]["loss"]) == pytest.approx(float(rows[1]["content_loss"]) + 1e-3 * float(rows[1]["adv_loss"]),
                                                   rel=1e-4)
    assert not torch.is_autocast_enabled("cpu")
    out = load_generator(run / "gan" / "generator.safetensors")(torch.randn(1, 3, 8, 8))
    assert torch.isfinite(out).all()


def test_ema_is_the_running_average_of_the_generator_weights(dataset, run):
    start = load_generator(run / "generator.safetensors").state_dict()
    cfg = TrainGanConfig(data=str(dataset), out=str(run), switching="fixed", iters=2, ema=True, ema_decay=0.75,
                         **TINY)
    train_gan(cfg, progress=False)
    final = load_generator(run / "gan" / "generator.safetensors")
    ema = load_generator(run / "gan" / "generator-ema.safetensors").state_dict()
    params = dict(final.named_parameters())
    assert params
    for name, p in params.items():  # one generator step: ema = 0.75 start + 0.25 trained
        assert torch.allclose(ema[name], 0.75 * start[name] + 0.25 * p.detach(), atol=1e-6), name
    assert any(not torch.equal(ema[n], p.detach()) for n, p in params.items())
    assert (run / "gan" / "checkpoints" / "generator-ema_000002.safetensors").is_file()


def test_resume_restores_step_networks_optimiser_and_switcher(dataset, run):
    from fastai.callback.core import Callback

    class Interrupt(Callback):
        order = 60

        steps = 0

        def after_batch(self):  # after step 3 ran, before it was checkpointed
            Interrupt.steps += self.training
            if Interrupt.steps == 3:
                raise KeyboardInterrupt

    cfg = TrainGanConfig(data=str(dataset), out=str(run), switching="fixed", n_crit=2, n_gen=1, iters=6,
                         checkpoint_every=2, **TINY)
    with pytest.raises(KeyboardInterrupt):
        train_gan(cfg, progress=False, cbs=[Interrupt()])
    saved = load_checkpoint(run / "gan" / "checkpoints" / "last.pt")
    assert saved["step"] == 2 and saved["switcher"] == {"n_c": 0, "n_g": 0} and saved["gen_mode"] is True
    assert not (run / "gan" / "generator.safetensors").exists()

    seen = {}

    class Check(Callback):
        order = 60  # after the GAN callbacks have restored their state

        def before_fit(self):
            seen["gen_mode"] = bool(self.learn.gan_trainer.gen_mode)
            seen["opt"] = copy.deepcopy(self.learn.opt.state_dict())  # Adam updates its moments in place
            seen["generator"] = {k: v.cpu().clone() for k, v in self.learn.model.generator.state_dict().items()}
            seen["critic"] = {k: v.cpu().clone() for k, v in self.learn.model.critic.state_dict().items()}

    train_gan(cfg, resume=True, progress=False, cbs=[Check()])
    assert seen["gen_mode"] is True
    for part in ("generator", "critic"):
        assert all(torch.equal(seen[part][k], v) for k, v in saved[part].items()), part
    assert sum("sqr_avg" in s for s in saved["opt"]["state"]) > 10  # Adam moments of both networks were saved
    for got, want in zip(seen["opt"]["state"], saved["opt"]["state"], strict=True):
        for key, value in want.items():
            assert torch.equal(torch.as_tensor(got[key]).cpu(), torch.as_tensor(value)), key
    rows = history(run)
    assert [int(r["step"]) for r in rows] == list(range(1, 7))  # the un-checkpointed step 3 was dropped and redone
    assert [r["trained"] for r in rows] == ["critic", "critic", "generator"] * 2
    assert load_checkpoint(run / "gan" / "checkpoints" / "last.pt")["step"] == 6
    final = run / "gan" / "generator.safetensors"
    before = load_generator(final).state_dict()
    train_gan(cfg, resume=True, progress=False)  # at the end already: writes the same weights, trains nothing
    after = load_generator(final).state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before) and len(history(run)) == 6


def test_a_resumed_run_sees_the_batches_the_uninterrupted_one_saw(dataset, pretrained, tmp_path):
    from fastai.callback.core import Callback

    def batches(log: dict):
        class Record(Callback):
            order = 60

            def before_batch(self):
                if self.training:
                    log[len(log) + self.learn.crappify_first_step] = hash(self.xb[0].cpu().numpy().tobytes())

            def before_fit(self):
                self.learn.crappify_first_step = int(load_checkpoint(ckpt)["step"]) if ckpt.is_file() else 0
        return Record()

    whole, resumed = tmp_path / "whole", tmp_path / "resumed"
    for out in (whole, resumed):
        shutil.copytree(pretrained, out)
    kw = {"data": str(dataset), "switching": "fixed", "n_crit": 1, "n_gen": 1, "iters": 7, "checkpoint_every": 2,
          **TINY}
    ckpt = whole / "gan" / "checkpoints" / "last.pt"
    ref: dict[int, int] = {}
    train_gan(TrainGanConfig(out=str(whole), **kw), progress=False, cbs=[batches(ref)])

    class Interrupt(Callback):
        order = 61

        steps = 0

        def after_batch(self):
            Interrupt.steps += self.training
            if Interrupt.steps == 5:  # mid-epoch (3 batches an epoch), one step after checkpoint 4
                raise KeyboardInterrupt

    ckpt = resumed / "gan" / "checkpoints" / "last.pt"
    first: dict[int, int] = {}
    with pytest.raises(KeyboardInterrupt):
        train_gan(TrainGanConfig(out=str(resumed), **kw), progress=False, cbs=[batches(first), Interrupt()])
    again: dict[int, int] = {}
    train_gan(TrainGanConfig(out=str(resumed), **kw), resume=True, progress=False, cbs=[batches(again)])
    assert sorted(ref) == list(range(7)) and sorted(again) == [4, 5, 6]
    assert all(first[i] == ref[i] for i in first) and all(again[i] == ref[i] for i in again)


def test_nan_loss_stops_with_a_message_and_keeps_the_last_checkpoint(dataset, run, monkeypatch):
    import srgan.losses

    real = srgan.losses.build_loss
    calls = {"n": 0}

    def poisoned(*args, **kwargs):
        loss = real(*args, **kwargs)

        class Poisoned(torch.nn.Module):
            def forward(self, pred, targ):
                calls["n"] += 1
                value = loss(pred, targ)
                return value * float("nan") if calls["n"] >= 2 else value

        return Poisoned()

    monkeypatch.setattr(srgan.losses, "build_loss", poisoned)
    cfg = TrainGanConfig(data=str(dataset), out=str(run), switching="fixed", iters=10, checkpoint_every=2,
                         **{**TINY, "precision": "bf16"})
    with pytest.raises(CrappifyError, match=r"generator loss became nan at GAN step 4; the last good checkpoint"):
        train_gan(cfg, progress=False)
    assert not torch.is_autocast_enabled("cpu")  # the error left no autocast state behind
    state = load_checkpoint(run / "gan" / "checkpoints" / "last.pt")
    assert state["step"] == 2
    model = load_generator(run / "gan" / "checkpoints" / "generator_000002.safetensors")
    assert torch.isfinite(model(torch.randn(1, 3, 8, 8))).all()
    assert not (run / "gan" / "generator.safetensors").exists()


def test_length_defaults_to_a_fraction_of_an_epoch(dataset, run):
    cfg = TrainGanConfig(data=str(dataset), out=str(run), epochs=0.5, **TINY)  # 3 batches per epoch → 2 steps
    train_gan(cfg, progress=False)
    assert len(history(run)) == 2


def test_weighting_presets():
    base = {"data": "d", "out": "o"}
    assert TrainGanConfig(**base).content_adv_weights() == (50.0, 1.0)
    assert TrainGanConfig(**base, weighting="srgan").content_adv_weights() == (1.0, 1e-3)
    assert TrainGanConfig(**base, weighting="srgan", w_adv=0.1).content_adv_weights() == (1.0, 0.1)


def cli(capsys, *args) -> tuple[int, str]:
    """Run the command line in this process (torch is already imported): exit status and stderr."""
    from crappify.cli import main

    capsys.readouterr()
    with pytest.raises(SystemExit) as exc:
        main([str(a) for a in args])
    return exc.value.code, capsys.readouterr().err


def one_error_line(result: tuple[int, str]) -> str:
    code, err = result
    assert code != 0 and "Traceback" not in err, err
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("crappify: error:"), err
    return lines[0]


def test_cli_errors_are_one_line(dataset, tmp_path, pretrained, capsys):
    empty = tmp_path / "empty"
    assert "critic file not found" in one_error_line(cli(capsys, "train-gan", dataset, "-o", pretrained, "--critic",
                                                         tmp_path / "none.safetensors", "--quiet"))
    bad = tmp_path / "bad.yaml"
    bad.write_text("adv_los: hinge\n")
    res = cli(capsys, "train-gan", dataset, "-o", empty, "--config", bad)
    assert res[0] == 2 and "adv_los" in one_error_line(res)
    line = one_error_line(cli(capsys, "train-critic", dataset, "-o", empty, "--arch", "patchgan"))
    assert "unknown critic 'patchgan'" in line
    line = one_error_line(cli(capsys, "train-critic", dataset, "-o", empty))
    assert "no generator.safetensors" in line and "train-gen" in line
    assert not empty.exists()  # a refused run leaves nothing behind


@pytest.mark.skipif(not torch.cuda.is_available(), reason="fp16 mixed precision needs a CUDA device")
@pytest.mark.parametrize("adv_loss", ["bce", "wgan-gp"])
def test_fp16_gan_steps_on_cuda(dataset, run, adv_loss):
    cfg = TrainGanConfig(data=str(dataset), out=str(run), adv_loss=adv_loss, switching="fixed", iters=4,
                         device="cuda", **{**TINY, "precision": "fp16"}, ema=True)
    train_gan(cfg, progress=False)
    rows = history(run)
    assert [r["trained"] for r in rows] == ["critic", "generator"] * 2
    assert all(torch.isfinite(torch.tensor(float(r["loss"]))) for r in rows), rows
    for name in ("generator.safetensors", "generator-ema.safetensors"):
        out = load_generator(run / "gan" / name)(torch.randn(1, 3, 8, 8))
        assert torch.isfinite(out).all()


def test_joint_gan_from_scratch_builds_both_networks(dataset, tmp_path):
    run = tmp_path / "scratch"  # no generator.safetensors, no critic.safetensors
    cfg = TrainGanConfig(data=str(dataset), out=str(run), generator_arch="srresnet",
                         generator_options={"n_blocks": 1, "n_feats": 8}, critic_arch="patch",
                         critic_options={"nf": 8, "n_blocks": 2}, switching="fixed", iters=4, checkpoint_every=2,
                         size=32, bs=2, preview_items=1, precision="fp32", pretrained=False,
                         adv_loss="lsgan", betas=(0.5, 0.999), lr=2e-4)
    final = train_gan(cfg, progress=False)
    model = load_generator(final)
    assert model.crappify_spec["arch"] == "srresnet" and model.crappify_spec["scale"] == 4  # the data's scale
    assert model.crappify_spec["options"]["n_blocks"] == 1
    rows = history(run)
    assert len(rows) == 4 and {r["trained"] for r in rows} == {"generator", "critic"}
    assert float(rows[-1]["content_loss"] or rows[-2]["content_loss"]) > 0  # l1 by default for a new generator
    # resuming it rebuilds the same networks from the config, not from files
    train_gan(cfg.model_copy(update={"iters": 6}), resume=True, progress=False)
    assert [int(r["step"]) for r in history(run)] == list(range(1, 7))
    with pytest.raises(CrappifyError, match="not both"):
        train_gan(cfg.model_copy(update={"generator": str(final)}), progress=False)


def test_per_batch_switching_matches_a_hand_written_loop(dataset, gan_base, tmp_path):
    """`per-batch`: on every batch one generator step, then one critic step on the same batch and the same fakes
    (PyTorch-GAN's SRGAN loop) — checked against that loop written out with the same optimiser settings."""
    from fastai.optimizer import Adam

    from srgan.adversarial import build_adversarial
    from srgan.checkpoint import load_critic
    from srgan.data import make_dataloaders
    from srgan.losses import build_loss
    from srgan.normalize import Normalizer

    run = tmp_path / "run"
    shutil.copytree(gan_base, run)
    lr, mult, betas, wd, w_adv = 2e-4, 3.0, (0.5, 0.999), 1e-3, 0.1
    cfg = TrainGanConfig(data=str(dataset), out=str(run), switching="per-batch", adv_loss="lsgan", iters=3,
                         checkpoint_every=3, lr=lr, critic_lr_mult=mult, betas=betas, wd=wd, w_content=1.0,
                         w_adv=w_adv, **TINY)
    train_gan(cfg, progress=False)
    rows = history(run)
    assert [r["trained"] for r in rows] == ["both"] * 3
    assert (rows[-1]["gen_steps"], rows[-1]["crit_steps"], rows[-1]["to_gen"], rows[-1]["to_crit"]) == \
        ("3", "3", "0", "0")
    assert all(r["gen_loss"] and r["crit_loss"] for r in rows)
    state = load_checkpoint(run / "gan" / "checkpoints" / "last.pt")

    # the same three batches, by hand
    gen = load_generator(gan_base / "generator.safetensors").train()
    critic = load_critic(gan_base / "critic.safetensors")
    opt_g = Adam(list(gen.parameters()), lr=lr, mom=betas[0], sqr_mom=betas[1], wd=wd)
    opt_d = Adam(list(critic.parameters()), lr=lr * mult, mom=betas[0], sqr_mom=betas[1], wd=wd)
    content, adv = build_loss("l1"), build_adversarial("lsgan", 10.0)
    dls = make_dataloaders(dataset, cfg.size, cfg.bs, resize_lr=False, scale=4, seed=cfg.seed, normalizer=Normalizer())
    dls.train.dataset.set_epoch(0)
    crit_losses = []
    for _, (lr_img, hr_img) in zip(range(3), dls.train, strict=False):
        critic.eval().requires_grad_(False)
        fake = gen(lr_img)
        loss_g = content(fake, hr_img) + w_adv * adv.generator(critic(fake))
        loss_g.backward()
        opt_g.step()
        opt_g.zero_grad()
        critic.train().requires_grad_(True)
        loss_d = adv.critic(critic(hr_img), critic(fake.detach()))  # the fakes made before the generator's step
        loss_d.backward()
        opt_d.step()
        opt_d.zero_grad()
        crit_losses.append(loss_d.item())
    for name, model in (("generator", gen), ("critic", critic)):
        for key, value in model.state_dict().items():
            torch.testing.assert_close(state[name][key], value, rtol=1e-4, atol=1e-6, msg=f"{name}.{key}")
    assert [float(r["crit_loss"]) for r in rows] == pytest.approx(crit_losses, rel=1e-4)


def test_per_batch_wgan_gp_in_bf16_resumes_to_the_same_weights(dataset, gan_base, tmp_path):
    runs = {}
    for name, lengths in (("straight", [4]), ("resumed", [2, 4])):
        run = tmp_path / name
        shutil.copytree(gan_base, run)
        for i, iters in enumerate(lengths):
            cfg = TrainGanConfig(data=str(dataset), out=str(run), switching="per-batch", adv_loss="wgan-gp",
                                 iters=iters, checkpoint_every=2, **{**TINY, "precision": "bf16"})
            train_gan(cfg, progress=False, resume=i > 0)
        runs[name] = load_checkpoint(run / "gan" / "checkpoints" / "last.pt")
        assert [r["trained"] for r in history(run)] == ["both"] * 4
        assert all(torch.isfinite(torch.tensor(float(r["crit_loss"]))) for r in history(run))
    for name in ("generator", "critic"):
        for key, value in runs["straight"][name].items():
            torch.testing.assert_close(runs["resumed"][name][key], value, msg=f"{name}.{key}")
    assert not torch.is_autocast_enabled("cpu")


def test_train_gan_degrades_online_through_the_cli(dataset, gan_base, tmp_path, capsys):
    """The Real-ESRGAN GAN stage: online degradations of sharpened crops, per-batch steps, from the CLI."""
    run = tmp_path / "run"
    shutil.copytree(gan_base, run)
    from crappify.cli import main

    args = ["train-gan", dataset, "-o", run, "--degrade", "online", "--degrade-preset", "realesrgan", "--sharpen-gt",
            "--switching", "per-batch", "--iters", "2", "--size", "32", "--bs", "2", "--loss", "l1", "--precision",
            "fp32", "--quiet"]
    try:
        main([str(a) for a in args])
    except SystemExit as exc:
        assert exc.code in (0, None), capsys.readouterr().err
    saved = yaml.safe_load((run / "train-gan.yaml").read_text())
    assert (saved["degrade"], saved["degrade_preset"], saved["sharpen_gt"]) == ("online", "realesrgan", True)
    assert [r["trained"] for r in history(run)] == ["both", "both"]
