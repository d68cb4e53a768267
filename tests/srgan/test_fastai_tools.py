"""fastai's own tools in train-gen and train-critic: gradient clipping (`grad_clip`, GradientClip), gradient
accumulation (`grad_accum`, GradientAccumulation counted in batches), EMA with accumulation, and
`train-gen --lr-find` (Learner.lr_find).

What is checked: the norm the optimiser sees is at most `grad_clip` (also behind an enabled GradScaler, so clipping
sees unscaled gradients); N accumulated batches make one optimiser step, and the EMA moves on steps only; the
accumulated step equals the step of an N times larger batch (a plain fastai Learner on a linear model: fp32, no
BatchNorm, a constant learning rate — through train-gen the one-cycle rate differs between the two runs' batches,
so the weights cannot be compared there); a run killed with a gradient group open at a step checkpoint resumes to
the uninterrupted run's weights and history; lr-find writes its plot and values and nothing else; out-of-range
values are one-line errors with exit status 2.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from fastai.callback.core import Callback
from safetensors.torch import load_file
from test_resume import Killed, kill_on_call, rows, same_weights

from crappify.errors import ConfigError
from srgan.callbacks import BatchGradientAccumulation, DeviceMixedPrecision, gradient_callbacks
from srgan.checkpoint import config_key, load_checkpoint, save_generator
from srgan.generators import build_generator
from srgan.train_critic import TrainCriticConfig, ensure_preds, train_critic
from srgan.train_gen import RUN_KEYS, Trainer, TrainGenConfig

# sr_dataset: 7 training pairs, so 3 batches of 2 an epoch (drop_last); the critic: 14 items, 3 batches of 4
GEN = {"arch": "unet-small", "pretrained": False, "size": 32, "bs": 2, "loss": "l1", "preview_items": 0,
       "precision": "fp32", "device": "cpu", "epochs": 2}
CRIT = {"arch": "patch", "options": {"nf": 8, "n_blocks": 2}, "size": 32, "bs": 4, "lr": 3e-3,
        "precision": "fp32", "device": "cpu", "epochs": 2}


def total_norm(model: torch.nn.Module) -> float:
    grads = [p.grad.detach().float().norm() for p in model.parameters() if p.grad is not None]
    return float(torch.stack(grads).norm())


class StepLog(Callback):
    """Records (epoch, batch) of every optimiser step, the gradient norm before clipping (order 10.5: after
    MixedPrecision unscales, before GradientClip) and the norm the optimiser is handed (order 50)."""

    def __init__(self) -> None:
        self.at: list[tuple[int, int]] = []
        self.raw: list[float] = []
        self.seen: list[float] = []
        self.start: dict[str, torch.Tensor] = {}
        self.weights: list[dict[str, torch.Tensor]] = []

    def before_fit(self):
        if not self.start:
            self.start = {k: v.detach().clone() for k, v in self.learn.model.named_parameters()}

    def after_step(self):
        self.at.append((self.epoch, self.iter))
        self.weights.append({k: v.detach().clone() for k, v in self.learn.model.named_parameters()})


class RawNorm(Callback):
    order = 10.5

    def __init__(self, steps: StepLog) -> None:
        self.log = steps

    def before_step(self):
        self.log.raw.append(total_norm(self.learn.model))


class SeenNorm(Callback):
    order = 50

    def __init__(self, steps: StepLog) -> None:
        self.log = steps

    def before_step(self):
        self.log.seen.append(total_norm(self.learn.model))


def spies() -> tuple[StepLog, list[Callback]]:
    steps = StepLog()
    return steps, [steps, RawNorm(steps), SeenNorm(steps)]


def gen_cfg(data: Path, run: Path, **kw) -> TrainGenConfig:
    return TrainGenConfig(data=str(data), out=str(run), **{**GEN, **kw})


# --------------------------------------------------------------------------------------------------------
# train-gen: clipping, accumulation, EMA, resume


@pytest.fixture(scope="module")
def accum_reference(sr_dataset, tmp_path_factory):
    """An uninterrupted train-gen run with grad_accum 2, a tiny grad_clip and EMA, and what its spies saw."""
    run = tmp_path_factory.mktemp("accum-ref")
    steps, cbs = spies()
    Trainer(gen_cfg(sr_dataset, run, grad_accum=2, grad_clip=1e-3, ema=True, ema_decay=0.5), progress=False,
            cbs=cbs).fit()
    return run, steps


def test_accumulation_steps_once_per_group_and_clipping_bounds_what_the_optimiser_sees(accum_reference):
    run, steps = accum_reference
    # 3 batches an epoch in groups of 2: a step after batch 2, and the short group of batch 3 at the epoch's end
    assert steps.at == [(0, 1), (0, 2), (1, 1), (1, 2)]
    assert len(steps.raw) == len(steps.seen) == 4
    assert max(steps.raw) > 1e-3  # clipping had something to do
    assert all(n <= 1e-3 * (1 + 1e-4) for n in steps.seen), steps.seen
    # torch divides by the norm + 1e-6: clipped norms fall short of the limit by that much
    assert all(abs(s - min(r, 1e-3)) <= 1e-3 * 1e-2 for r, s in zip(steps.raw, steps.seen, strict=True))
    assert "accum_grads" not in load_checkpoint(run / "checkpoints" / "last.pt")  # nothing open at an epoch end


def test_the_ema_moves_on_optimiser_steps_only(accum_reference):
    run, steps = accum_reference
    ema = load_file(str(run / "generator-ema.safetensors"))
    for name, w0 in steps.start.items():  # the recurrence over the 4 real steps, not the 6 batches
        expected = w0
        for w in steps.weights:
            expected = 0.5 * expected + 0.5 * w[name]
        assert torch.allclose(ema[name], expected, atol=1e-6), name


def test_a_group_open_at_a_step_checkpoint_resumes_to_the_uninterrupted_run(sr_dataset, accum_reference, tmp_path,
                                                                            monkeypatch):
    import srgan.train_gen

    ref, _ = accum_reference
    run = tmp_path / "run"
    cfg = gen_cfg(sr_dataset, run, grad_accum=2, grad_clip=1e-3, ema=True, ema_decay=0.5)
    with monkeypatch.context() as m:  # checkpoints: e1 b1, e1 b2, e1 end, e2 b1 (a group open), killed at e2 b2
        kill_on_call(m, srgan.train_gen, "save_checkpoint", call=5)
        with pytest.raises(Killed):
            Trainer(cfg.model_copy(update={"checkpoint_every": 1}), progress=False).fit()
    state = load_checkpoint(run / "checkpoints" / "last.pt")
    assert (state["epoch"], state["batch"], state["accum_count"]) == (1, 1, 2)
    assert state["accum_grads"] and all(torch.isfinite(g).all() for g in state["accum_grads"].values())
    Trainer(cfg, resume=True, progress=False).fit()
    assert same_weights(run / "generator.safetensors", ref / "generator.safetensors")
    assert same_weights(run / "generator-ema.safetensors", ref / "generator-ema.safetensors")
    assert rows(run / "history.csv") == rows(ref / "history.csv")


def test_grad_options_are_part_of_what_is_trained():
    base = TrainGenConfig(data="d", out="o")
    assert config_key(base, RUN_KEYS) == config_key(base.model_copy(update={"grad_accum": 1}), RUN_KEYS)
    for change in ({"grad_accum": 2}, {"grad_clip": 1.0}):
        assert config_key(base.model_copy(update=change), RUN_KEYS) != config_key(base, RUN_KEYS)
    for bad in ({"grad_accum": 0}, {"grad_accum": 10 ** 6}, {"grad_clip": 0}, {"grad_clip": float("nan")},
                {"grad_clip": float("inf")}):
        with pytest.raises(ValueError):
            TrainGenConfig(data="d", out="o", **bad)
        with pytest.raises(ValueError):
            TrainCriticConfig(data="d", out="o", **bad)


def test_a_pipeline_stage_takes_them(tmp_path):
    from srgan.pipeline import Pipeline, stage_configs

    def pipeline(gen: dict) -> Pipeline:
        return Pipeline.model_validate({"name": "p", "out": str(tmp_path), "build-dataset": {"src": "samples"},
                                        "train-gen": gen, "train-critic": {"grad_clip": 0.5}})

    cfgs = stage_configs(pipeline({"grad_accum": 4, "grad_clip": 1.0}))
    assert (cfgs["train-gen"].grad_accum, cfgs["train-gen"].grad_clip, cfgs["train-critic"].grad_clip) == (4, 1.0, 0.5)
    with pytest.raises(ConfigError, match="grad_accum"):
        stage_configs(pipeline({"grad_accum": 0}))


# --------------------------------------------------------------------------------------------------------
# fastai level: the accumulated step is a larger batch's; clipping after the GradScaler unscales


def _linear_learner(bs: int, cbs: list, seed: int = 0):
    from fastai.data.core import DataLoaders
    from fastai.data.load import DataLoader
    from fastai.learner import Learner

    from srgan.callbacks import adam

    g = torch.Generator().manual_seed(1)
    items = [(torch.randn(5, generator=g), torch.randn(2, generator=g)) for _ in range(6)]
    dls = DataLoaders(DataLoader(items, bs=bs, shuffle=False, drop_last=False), DataLoader(items[:2], bs=2))
    torch.manual_seed(seed)
    learn = Learner(dls, torch.nn.Linear(5, 2), loss_func=torch.nn.functional.mse_loss,
                    opt_func=adam(None, 1e-5, 0.0), wd=0.0, cbs=cbs)
    learn.remove_cbs([cb for cb in learn.cbs if type(cb).__name__ == "ProgressCallback"])
    learn.logger = lambda *_: None
    return learn


def test_accumulating_two_batches_of_two_is_one_batch_of_four():
    # 6 samples: steps on samples 0-3 and on the short group 4-5, as a loader of 4 that keeps its last batch of 2
    big = _linear_learner(4, [])
    big.fit(2, lr=0.05)
    small = _linear_learner(2, gradient_callbacks(2, None))
    small.fit(2, lr=0.05)
    for a, b in zip(big.model.parameters(), small.model.parameters(), strict=True):
        assert torch.allclose(a, b, atol=1e-6), (a, b)
    plain = _linear_learner(2, [])
    plain.fit(2, lr=0.05)
    assert not torch.allclose(plain.model.weight, big.model.weight, atol=1e-4)  # the comparison can tell


def test_clipping_sees_gradients_the_gradscaler_has_unscaled():
    class ScaledPrecision(DeviceMixedPrecision):  # an enabled loss scaler on the CPU, as fp16 has on CUDA
        def before_fit(self):
            super().before_fit()
            self.learn.scaler = torch.amp.GradScaler("cpu", init_scale=2.0 ** 10)

    steps, cbs = spies()
    learn = _linear_learner(2, [ScaledPrecision(amp_mode="bf16"), *gradient_callbacks(1, 1e-2), *cbs])
    learn.fit(1, lr=0.01)
    assert len(steps.seen) == 3 and min(steps.raw) > 1e-2  # unscaled norms, all above the limit
    assert all(abs(s - 1e-2) < 1e-5 for s in steps.seen), steps.seen  # clipped to it (not to 1e-2 / 1024)
    assert isinstance(gradient_callbacks(3, None)[0], BatchGradientAccumulation) and not gradient_callbacks(1, None)


# --------------------------------------------------------------------------------------------------------
# train-critic


def test_train_critic_accumulates_clips_and_resumes_inside_a_group(sr_dataset, tmp_path, monkeypatch):
    import srgan.train_critic

    base = tmp_path / "base"
    base.mkdir()
    torch.manual_seed(0)
    save_generator(build_generator("unet-small", scale=1, img_size=32, pretrained=False, residual=True),
                   base / "generator.safetensors", data_scale=4)
    ensure_preds(sr_dataset, base, torch.device("cpu"), ("train", "valid"))
    ref, run = shutil.copytree(base, tmp_path / "ref"), shutil.copytree(base, tmp_path / "run")
    cfg = {**CRIT, "grad_accum": 3, "grad_clip": 0.05, "data": str(sr_dataset)}
    steps, cbs = spies()
    train_critic(TrainCriticConfig(out=str(ref), **cfg), progress=False, cbs=cbs)
    assert steps.at == [(0, 2), (1, 2)]  # 3 batches an epoch: one step each
    assert all(n <= 0.05 * (1 + 1e-4) for n in steps.seen)
    with monkeypatch.context() as m:  # checkpoints: e1 b1, e1 b2 (a group of 2 open), killed at e1's end
        kill_on_call(m, srgan.train_critic, "save_checkpoint", call=3)
        with pytest.raises(Killed):
            train_critic(TrainCriticConfig(out=str(run), checkpoint_every=1, **cfg), progress=False)
    assert load_checkpoint(run / "critic-checkpoints" / "last.pt")["accum_count"] == 8
    train_critic(TrainCriticConfig(out=str(run), **cfg), resume=True, progress=False)
    assert same_weights(run / "critic.safetensors", ref / "critic.safetensors")
    assert rows(run / "critic-history.csv") == rows(ref / "critic-history.csv")


# --------------------------------------------------------------------------------------------------------
# lr-find


def test_lr_find_from_the_command_line_writes_its_plot_and_values_and_nothing_else(sr_dataset, tmp_path, cli,
                                                                                   read_tree):
    run = tmp_path / "run"
    run.mkdir()
    (run / "generator.safetensors").write_bytes(b"an earlier run's generator")
    (run / "train-gen.yaml").write_text("an earlier run's config\n")
    before = read_tree(run)
    res = cli("train-gen", sr_dataset, "-o", run, "--lr-find", "--arch", "unet-small", "--no-pretrained",
              "--loss", "l1", "--size", "32", "--bs", "2", "--precision", "fp32", "--device", "cpu", "--quiet",
              "--lr-find-steps", "16")
    assert res.returncode == 0, res.stderr
    line = res.stdout.strip()
    assert "\n" not in line and "suggested lr: valley" in line and "lr_find.png" in line, line
    after = read_tree(run)
    assert set(after) == set(before) | {"lr_find.png", "lr_find.json"}  # no generator, checkpoint, yaml or history
    assert all(after[k] == v for k, v in before.items())
    assert after["lr_find.png"].startswith(b"\x89PNG")
    found = json.loads(after["lr_find.json"])
    assert found["phase"] == "unfrozen" and len(found["lrs"]) == len(found["losses"]) == found["steps"] == 16
    assert found["lrs"] == sorted(found["lrs"]) and f"{found['suggestions']['valley']:.2e}" in line


@pytest.mark.slow  # builds a ResNet-18 U-Net
def test_lr_find_sweeps_the_frozen_phase_of_a_pretrained_encoder(sr_dataset, tmp_path):
    import torchvision

    weights = tmp_path / "resnet18.pth"
    torch.save(torchvision.models.resnet18(weights=None).state_dict(), weights)
    trainer = Trainer(TrainGenConfig(data=str(sr_dataset), out=str(tmp_path / "run"), arch="unet-resnet18",
                                     weights=str(weights), loss="l1", size=32, bs=2, precision="fp32", device="cpu",
                                     options={"self_attention": False}), progress=False)
    frozen: list[bool] = []

    class Frozen(Callback):
        def before_fit(self):  # the encoder's stem conv (fastai's freeze leaves BatchNorm trainable)
            frozen.append(not self.learn.model[0][0].weight.requires_grad)

    trainer.extra_cbs.append(Frozen())
    found = trainer.lr_find(num_it=8)
    assert frozen == [True] and found["phase"] == "frozen" and found["steps"] == 8
    assert sorted(p.name for p in (tmp_path / "run").iterdir()) == ["lr_find.json", "lr_find.png"]


# --------------------------------------------------------------------------------------------------------
# the command line's one-line errors


@pytest.mark.parametrize("args", [("train-gen", "--grad-accum", "0"), ("train-gen", "--grad-clip", "-1"),
                                  ("train-critic", "--grad-accum", "5000"), ("train-critic", "--grad-clip", "nan"),
                                  ("train-gen", "--lr-find", "--resume")],
                         ids=["accum-0", "clip-negative", "accum-huge", "clip-nan", "lr-find-resume"])
def test_out_of_range_values_are_one_line_errors(args, tmp_path, capsys):
    from crappify.cli import main

    with pytest.raises(SystemExit) as exc:  # the command line's own entry point, in this process
        main([args[0], str(tmp_path / "data"), "-o", str(tmp_path / "run"), *args[1:]])
    err = capsys.readouterr().err
    assert exc.value.code == 2, err
    assert err.count("\n") == 1 and err.startswith("crappify: error:"), err
    assert not (tmp_path / "run").exists()
