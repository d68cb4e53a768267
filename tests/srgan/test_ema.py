"""EMA generators: train-gen's (`ema: true`, Real-ESRNet's net_g_ema), resumed with the model, written beside the
generator with everything enhance needs; a pipeline hands it to the GAN stage and evaluates every EMA file."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from fastai.callback.core import Callback
from safetensors.torch import load_file

from srgan.callbacks import ema_update
from srgan.checkpoint import load_checkpoint, read_generator_meta
from srgan.pipeline import generator_files, load_pipeline, paths_of, result_file, stage_configs
from srgan.train_gen import Trainer, TrainGenConfig

GEN = {"arch": "unet-small", "pretrained": False, "size": 32, "bs": 4, "loss": "l1", "preview_items": 0,
       "precision": "fp32", "epochs": 2, "ema": True, "ema_decay": 0.5}


def test_ema_update_is_the_moving_average_and_copies_buffers():
    model, ema = torch.nn.BatchNorm2d(3), torch.nn.BatchNorm2d(3)
    with torch.no_grad():
        model.weight.fill_(2.0)
        ema.weight.fill_(1.0)
        model.running_mean.fill_(7.0)
    ema_update(ema, model, 0.75)
    assert torch.allclose(ema.weight, torch.full((3,), 0.75 * 1.0 + 0.25 * 2.0))
    assert torch.equal(ema.running_mean, model.running_mean)


class Record(Callback):
    """The model's weights when training starts (what the EMA copy starts from) and after every optimiser step."""

    order = 70  # after WeightEMA

    def __init__(self) -> None:
        self.start: dict[str, torch.Tensor] = {}
        self.weights: list[dict[str, torch.Tensor]] = []

    def _params(self) -> dict[str, torch.Tensor]:
        return {k: v.detach().clone() for k, v in self.learn.model.named_parameters()}

    def before_fit(self):
        self.start = self._params()

    def after_step(self):
        self.weights.append(self._params())


@pytest.fixture(scope="module")
def ema_run(sr_dataset, tmp_path_factory):
    run = tmp_path_factory.mktemp("ema-run")
    record = Record()
    Trainer(TrainGenConfig(data=str(sr_dataset), out=str(run), **GEN), progress=False, cbs=[record]).fit()
    return run, record


def test_train_gen_writes_the_ema_of_every_step(ema_run):
    run, record = ema_run
    last = load_file(str(run / "generator.safetensors"))
    ema = load_file(str(run / "generator-ema.safetensors"))
    decay = GEN["ema_decay"]
    assert len(record.weights) >= 2
    for name, w0 in record.start.items():  # the same recurrence by hand, from the weights training started with
        expected = w0
        for w in record.weights:
            expected = decay * expected + (1 - decay) * w[name]
        assert torch.allclose(ema[name], expected, atol=1e-6), name
    assert any(not torch.equal(ema[k], last[k]) for k in ema)  # an average, not the last weights
    meta = read_generator_meta(run / "generator-ema.safetensors")
    assert meta["extra"]["data_scale"] == 4 and meta["extra"]["ema_decay"] == decay
    assert meta["spec"] == read_generator_meta(run / "generator.safetensors")["spec"]


def test_a_resumed_run_resumes_the_ema_too(sr_dataset, ema_run, tmp_path, monkeypatch):
    run = tmp_path / "run"
    calls = {"n": 0}
    real = Trainer.write_history

    def killed(self):  # call 1 starts the file; call 2 follows epoch 1's checkpoint
        calls["n"] += 1
        if calls["n"] == 2:
            raise KeyboardInterrupt("killed after epoch 1's checkpoint")
        return real(self)

    monkeypatch.setattr(Trainer, "write_history", killed)
    with pytest.raises(KeyboardInterrupt):
        Trainer(TrainGenConfig(data=str(sr_dataset), out=str(run), **GEN), progress=False).fit()
    monkeypatch.setattr(Trainer, "write_history", real)
    assert "ema" in load_checkpoint(run / "checkpoints" / "last.pt")
    Trainer(TrainGenConfig(data=str(sr_dataset), out=str(run), **GEN), resume=True, progress=False).fit()
    ref = load_file(str(ema_run[0] / "generator-ema.safetensors"))
    got = load_file(str(run / "generator-ema.safetensors"))
    assert ref.keys() == got.keys() and all(torch.equal(ref[k], got[k]) for k in ref)


def test_pipelines_evaluate_every_ema_file_and_name_the_result(tmp_path):
    """Real-ESRGAN: four generators, the GAN starting from Real-ESRNet's EMA, the GAN's EMA the result."""
    p = load_pipeline("pipelines/realesrgan-x4.yaml", str(tmp_path / "out"))
    cfgs = stage_configs(p)
    run = paths_of(p).run
    assert cfgs["train-gen"].ema and cfgs["train-gan"].ema
    assert Path(cfgs["train-gan"].generator) == run / "generator-ema.safetensors"
    made = generator_files(cfgs, paths_of(p))
    assert list(made) == ["train-gen", "train-gen-ema", "train-gan", "train-gan-ema"]
    assert cfgs["evaluate"].names == list(made) and cfgs["evaluate"].result == "train-gan-ema"
    assert [Path(m) for m in cfgs["evaluate"].models] == list(made.values())
    assert result_file(p) == run / "gan" / "generator-ema.safetensors"
    # a recipe without EMA: its GAN generator is the result, and the GAN starts from train-gen's file
    demo = stage_configs(load_pipeline("pipelines/demo.yaml", str(tmp_path / "demo")))
    assert demo["evaluate"].names == ["train-gen", "train-gan"] and demo["evaluate"].result == "train-gan"
    assert demo["train-gan"].generator is None
