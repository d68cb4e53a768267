"""Online degradation (`degrade: online`, Real-ESRGAN's way): the training loader reads only each pair's HR and
degrades its crop with a chain seeded by (seed, epoch, index) — fresh every epoch, the same for the same run and
epoch with any number of workers, resumable; validation keeps the offline LR files; `sharpen_gt` sharpens the
target only."""

from __future__ import annotations

import csv
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from safetensors.torch import load_file

from crappify.errors import ConfigError
from crappify.functional import usm_sharpen
from srgan.checkpoint import config_key, load_checkpoint
from srgan.data import OnlinePairDataset, PairDataset, make_dataloaders, read_dataset
from srgan.train_gen import RUN_KEYS, Trainer, TrainGenConfig


@pytest.fixture(scope="module")
def realistic(tmp_path_factory) -> Path:
    """A `realistic` x4 dataset of the sample photos (HR 64 px): a random chain, so degradations vary."""
    from crappify.builder import BuildConfig, build_dataset

    out = tmp_path_factory.mktemp("data") / "realistic"
    build_dataset(BuildConfig(src="samples", out=str(out), preset="realistic", size=64, scale=4,
                              split=(0.6, 0.2, 0.2), workers=1), progress=False)
    return out


def online(data: Path, size: int = 32, bs: int = 2, resize_lr: bool = False, **kw):
    return make_dataloaders(data, size, bs, resize_lr=resize_lr, scale=4, degrade="online", **kw)


def batches(dl) -> list[tuple[torch.Tensor, torch.Tensor]]:
    return [tuple(t.clone() for t in b) for b in dl]


def same_batches(a, b) -> bool:
    return len(a) == len(b) and all(torch.equal(u, v) for x, y in zip(a, b, strict=True)
                                    for u, v in zip(x, y, strict=True))


def test_items_are_fresh_every_epoch_and_the_same_for_the_same_seed_epoch_and_index(realistic):
    ds = online(realistic).train.dataset
    assert isinstance(ds, OnlinePairDataset)
    again = online(realistic).train.dataset
    other_seed = online(realistic, seed=1).train.dataset
    first = [ds[i] for i in range(len(ds))]
    assert all(torch.equal(a, b) for i, pair in enumerate(first) for a, b in zip(pair, again[i], strict=True))
    ds.set_epoch(1)
    assert all(not torch.equal(first[i][0], ds[i][0]) for i in range(len(ds)))  # new LR every epoch
    again.set_epoch(1)
    assert all(torch.equal(ds[i][0], again[i][0]) for i in range(len(ds)))
    ds.set_epoch(0)  # back to epoch 0 (what a resume does): exactly what epoch 0 gave
    assert all(torch.equal(first[i][0], ds[i][0]) for i in range(len(ds)))
    assert not all(torch.equal(first[i][0], other_seed[i][0]) for i in range(len(ds)))


def test_the_hr_crop_is_the_offline_one_and_only_hr_files_are_read(realistic, tmp_path):
    data = shutil.copytree(realistic, tmp_path / "data")
    splits, _ = read_dataset(data)
    offline = PairDataset(splits["train"], 32, scale=4, resize_lr=False, train=True, seed=2)
    want = {}
    for epoch in (0, 3):
        offline.set_epoch(epoch)
        want[epoch] = [offline[i][1] for i in range(len(offline))]
    for pair in splits["train"]:
        pair.lr.unlink()  # never read: no warning, no substitute
    ds = online(data, seed=2).train.dataset
    for epoch in (0, 3):
        ds.set_epoch(epoch)
        assert all(torch.equal(ds[i][1], want[epoch][i]) for i in range(len(ds)))
    assert ds.unreadable.count() == 0


@pytest.mark.parametrize("resize_lr", [False, True])
def test_lr_is_the_crop_over_the_scale_or_the_crop_for_unets(realistic, resize_lr):
    dls = online(realistic, size=48, bs=2, resize_lr=resize_lr)
    lr, hr = dls.train.dataset[0]
    assert hr.shape == (3, 48, 48) and lr.dtype == hr.dtype == torch.uint8
    assert lr.shape == ((3, 48, 48) if resize_lr else (3, 12, 12))
    x, y = dls.train.one_batch()
    assert y.shape == (2, 3, 48, 48) and x.shape[-1] == (48 if resize_lr else 12)


def test_loaders_with_0_and_2_workers_give_the_same_batches(realistic):
    ref, dls = online(realistic, num_workers=0, seed=5), online(realistic, num_workers=2, seed=5)
    for epoch in (0, 1):
        ref.train.dataset.set_epoch(epoch)
        dls.train.dataset.set_epoch(epoch)
        assert same_batches(batches(ref.train), batches(dls.train))


def test_the_validation_loader_reads_the_offline_files(realistic):
    off = make_dataloaders(realistic, 32, 2, resize_lr=False, scale=4)
    on = online(realistic, sharpen_gt=True)
    assert type(on.valid.dataset) is PairDataset and not on.valid.dataset.sharpen_gt
    assert same_batches(batches(off.valid), batches(on.valid))


@pytest.mark.parametrize("degrade", ["online", "offline"])
def test_sharpen_gt_sharpens_the_target_and_online_degrades_the_sharpened_crop(realistic, degrade):
    """Real-ESRGAN trains towards the USM-sharpened crop and degrades that same sharpened crop; offline, the LR
    files stay what they are."""
    from srgan.data import degrade_rng

    plain = make_dataloaders(realistic, 32, 2, resize_lr=False, scale=4, degrade=degrade).train.dataset
    sharp = make_dataloaders(realistic, 32, 2, resize_lr=False, scale=4, degrade=degrade,
                             sharpen_gt=True).train.dataset
    for i in range(len(plain)):
        (lr0, hr0), (lr1, hr1) = plain[i], sharp[i]
        want = usm_sharpen(hr0.permute(1, 2, 0).numpy().copy(), weight=0.5, radius=50, threshold=10)
        assert not torch.equal(hr0, hr1) and np.array_equal(hr1.permute(1, 2, 0).numpy(), want)
        if degrade == "offline":
            assert torch.equal(lr0, lr1)
        else:
            lr = sharp.degrade(want, degrade_rng(sharp.seed, sharp.epoch, i), "a crop")
            assert np.array_equal(lr1.permute(1, 2, 0).numpy(), lr)


def test_the_datasets_own_preset_is_the_default(sr_dataset):
    """srgan-x4 (bicubic only): the online LR is the HR crop's bicubic x4 downscale."""
    from crappify.functional import resize

    ds = online(sr_dataset).train.dataset
    assert ds.chain.name == "srgan-x4"
    lr, hr = (t.permute(1, 2, 0).numpy() for t in ds[0])
    assert np.array_equal(lr, resize(np.ascontiguousarray(hr), 8, 8, "bicubic", True))


def test_a_preset_yaml_file_is_accepted(realistic, tmp_path):
    path = tmp_path / "mine.yaml"
    path.write_text("name: mine\nscale: 4\nsteps:\n  - {op: resize, size: lr, interpolation: area}\n")
    assert online(realistic, degrade_preset=str(path)).train.dataset.chain.name == "mine"


def one_line(exc: pytest.ExceptionInfo) -> str:
    text = str(exc.value)
    assert "\n" not in text and "Traceback" not in text
    return text


def test_a_preset_of_another_scale_fails_with_one_line(realistic):
    with pytest.raises(ConfigError) as info:
        online(realistic, degrade_preset="bicubic-x2")
    assert "fixes scale 2" in one_line(info) and "scale 4" in one_line(info)


def test_an_unknown_preset_name_lists_the_valid_ones(realistic):
    with pytest.raises(ConfigError) as info:
        online(realistic, degrade_preset="nope")
    assert one_line(info).startswith("unknown preset 'nope'; valid: ") and "realistic" in one_line(info)


def test_bad_combinations_fail_with_one_line(realistic, tmp_path):
    with pytest.raises(ConfigError, match="degrade_preset applies to degrade: online only"):
        make_dataloaders(realistic, 32, 2, resize_lr=False, scale=4, degrade_preset="realistic")
    with pytest.raises(ConfigError, match="degrade must be one of offline, online"):
        make_dataloaders(realistic, 32, 2, resize_lr=False, scale=4, degrade="sometimes")
    with pytest.raises(ConfigError) as info:  # a fixed-size chain cannot give crop / scale for an SR generator
        online(realistic, degrade_preset="lesson7")
    assert "no `resize size: lr` step" in one_line(info)
    assert online(realistic, resize_lr=True, degrade_preset="lesson7").train.dataset[0][0].shape == (3, 32, 32)
    bare = shutil.copytree(realistic, tmp_path / "bare")
    (bare / "config.yaml").write_text("scale: 4\n")  # a dataset that records no preset
    with pytest.raises(ConfigError) as info:
        online(bare)
    assert "records no preset" in one_line(info)


# --------------------------------------------------------------------------------------------------------
# train-gen

GEN = {"arch": "srresnet", "pretrained": False, "options": {"n_blocks": 1, "n_feats": 8}, "size": 32, "bs": 2,
       "loss": "l1", "preview_items": 1, "precision": "fp32", "epochs": 2, "degrade": "online", "sharpen_gt": True}


def gen_cfg(data: Path, run: Path, **kw) -> TrainGenConfig:
    return TrainGenConfig(data=str(data), out=str(run), **{**GEN, **kw})


def history(run: Path) -> list[dict[str, str]]:
    with open(run / "history.csv", newline="") as fh:
        return [{k: v for k, v in r.items() if k not in ("seconds", "data_wait")} for r in csv.DictReader(fh)]


@pytest.fixture(scope="module")
def gen_reference(realistic, tmp_path_factory) -> Path:
    run = tmp_path_factory.mktemp("online-ref")
    Trainer(gen_cfg(realistic, run, degrade_preset="realistic"), progress=False).fit()
    return run


def test_train_gen_online_runs_and_records_its_options(gen_reference):
    saved = yaml.safe_load((gen_reference / "train-gen.yaml").read_text())
    assert (saved["degrade"], saved["degrade_preset"], saved["sharpen_gt"]) == ("online", "realistic", True)
    assert (gen_reference / "generator.safetensors").is_file() and len(history(gen_reference)) == 2


def test_the_options_are_part_of_the_config_key(realistic):
    assert not {"degrade", "degrade_preset", "sharpen_gt"} & RUN_KEYS
    base = gen_cfg(realistic, Path("run"), degrade="offline", sharpen_gt=False).resolved()
    keys = {config_key(base.model_copy(update=u), RUN_KEYS) for u in
            ({}, {"degrade": "online"}, {"degrade": "online", "degrade_preset": "realistic"}, {"sharpen_gt": True})}
    assert len(keys) == 4
    with pytest.raises(ValueError):
        gen_cfg(realistic, Path("run"), degrade="sometimes")


def test_a_run_resumed_mid_epoch_ends_as_the_uninterrupted_one(realistic, gen_reference, tmp_path, monkeypatch):
    import srgan.train_gen

    class Killed(BaseException):
        pass

    real = srgan.train_gen.save_checkpoint

    def save_then_die(path, state, *args, **kwargs):
        real(path, state, *args, **kwargs)
        if (state["epoch"], state.get("batch")) == (1, 1):  # after batch 1 of the second epoch
            raise Killed

    run = tmp_path / "run"
    cfg = gen_cfg(realistic, run, degrade_preset="realistic", checkpoint_every=1)
    with monkeypatch.context() as m:
        m.setattr(srgan.train_gen, "save_checkpoint", save_then_die)
        with pytest.raises(Killed):
            Trainer(cfg, progress=False).fit()
    state = load_checkpoint(run / "checkpoints" / "last.pt")
    assert (state["epoch"], state.get("batch")) == (1, 1)
    Trainer(cfg, resume=True, progress=False).fit()
    a, b = load_file(str(run / "generator.safetensors")), load_file(str(gen_reference / "generator.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert history(run) == history(gen_reference)


def test_cli_unknown_degrade_preset_says_one_line(cli, realistic, tmp_path):
    config = tmp_path / "cfg.yaml"
    config.write_text(yaml.safe_dump({**GEN, "degrade_preset": "nope", "epochs": 1}))
    proc = cli("train-gen", realistic, "-o", tmp_path / "run", "--config", config, "--quiet")
    assert proc.returncode != 0
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and "unknown preset 'nope'; valid:" in lines[0], proc.stderr
