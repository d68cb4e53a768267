"""`--bs auto` and the batch defaults per device: the course's batch for a crop size, the largest-batch probe with
out-of-memory back-off (on CUDA; exercised here with a step that runs out of memory above a set batch), and
train-gen recording the batch it used."""

from __future__ import annotations

import pytest
import torch
import yaml

from crappify.errors import ConfigError
from srgan.runtime import COURSE_BATCH, course_batch, is_oom, largest_batch
from srgan.train_gen import Trainer, TrainGenConfig


def test_the_course_batch_and_its_rule_for_other_sizes():
    assert (course_batch(128), course_batch(256)) == (32, 12) == (COURSE_BATCH[128], COURSE_BATCH[256])
    assert (course_batch(64), course_batch(512), course_batch(4096)) == (128, 2, 1)


def fake_device(limit: int, error: type[BaseException] = torch.OutOfMemoryError):
    """A training step that runs out of memory above `limit`; records the batches it was asked for."""
    asked: list[int] = []

    def step(bs: int) -> None:
        asked.append(bs)
        if bs > limit:
            raise error("CUDA out of memory. Tried to allocate 2.00 GiB")

    return step, asked


@pytest.mark.parametrize(("limit", "start"), [(100, 32), (37, 32), (32, 32), (5, 32), (1, 12), (4096, 32),
                                              (700, 1)])
def test_the_probe_finds_the_largest_batch_that_fits_within_a_sixteenth(limit, start):
    step, asked = fake_device(limit)
    found = largest_batch(step, start)
    assert found <= limit and limit - found <= max(1, found // 16)
    assert len(asked) <= 16  # a few training steps, not a scan


def test_a_runtime_error_saying_out_of_memory_backs_off_too_and_other_errors_propagate():
    step, _ = fake_device(20, RuntimeError)
    assert 19 <= largest_batch(step, 32) <= 20
    assert is_oom(RuntimeError("CUDA out of memory")) and not is_oom(RuntimeError("shape mismatch"))

    def broken(bs: int) -> None:
        raise ValueError("a bug")

    with pytest.raises(ValueError, match="a bug"):
        largest_batch(broken, 8)


def test_when_nothing_fits_it_says_so():
    step, _ = fake_device(0)
    with pytest.raises(ConfigError, match="not even a batch of 1 fits"):
        largest_batch(step, 32)


def test_defaults_per_device_and_auto():
    base = {"data": "d", "out": "o", "arch": "unet-resnet34"}
    assert TrainGenConfig(**base).resolved("cpu").bs == 8  # the CPU's default: a batch it can run
    assert TrainGenConfig(**base).resolved("cuda").bs == 32  # the course's at 128 px
    assert TrainGenConfig(**base, size=256).resolved("cuda").bs == 12
    assert TrainGenConfig(**base, bs="auto").resolved("cpu").bs == 32  # no probe on the CPU: the course's
    assert TrainGenConfig(**base, bs="auto").resolved("cuda").bs == "auto"  # probed by the trainer
    assert TrainGenConfig(**base, bs=5).resolved("cuda").bs == 5  # given: kept
    with pytest.raises(ValueError):
        TrainGenConfig(**base, bs="most")
    with pytest.raises(ValueError):
        TrainGenConfig(**base, bs=0)


def test_train_gen_with_bs_auto_on_the_cpu_records_the_batch_it_used(sr_dataset, tmp_path):
    cfg = TrainGenConfig(data=str(sr_dataset), out=str(tmp_path / "run"), arch="unet-small", pretrained=False,
                         loss="l1", size=32, bs="auto", epochs=1, preview_items=0, precision="fp32")
    Trainer(cfg, progress=False).fit()
    saved = yaml.safe_load((tmp_path / "run" / "train-gen.yaml").read_text())
    assert saved["bs"] == course_batch(32) == 512


def test_the_probe_restores_the_generators_weights_and_statistics(monkeypatch, sr_dataset, tmp_path):
    """The CUDA path's probe, run on the CPU: it must leave the generator as it found it (a probe step updates
    batch-norm statistics) and record the batch it found less a tenth."""
    import srgan.train_gen as train_gen

    monkeypatch.setattr(torch.cuda, "synchronize", lambda device=None: None)
    monkeypatch.setattr(torch.cuda, "empty_cache", lambda: None)
    monkeypatch.setattr(train_gen, "largest_batch", lambda step, start: (step(2), 21)[1])
    cfg = TrainGenConfig(data=str(sr_dataset), out=str(tmp_path / "run"), arch="unet-small", pretrained=False,
                         loss="l1", size=32, bs=4, epochs=1, precision="fp32")
    trainer = Trainer(cfg, progress=False)
    model, unet = trainer._model()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    assert trainer._probe_batch(model, unet) == 18  # 21 less a tenth
    after = model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert all(p.grad is None for p in model.parameters())
