"""The manifest as untrusted input, and unreadable pairs: rows that lead outside the dataset or the run are
refused with one line; a pair that cannot be read is named, skipped and replaced the same way every time, with
or without loader workers, until too many fail."""

from __future__ import annotations

import csv
import os
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from crappify.errors import CrappifyError
from crappify.imageio import ImageError
from srgan.data import (
    DecodeCache,
    PairDataset,
    Unreadable,
    make_dataloaders,
    read_dataset,
    read_or_substitute,
    too_many_unreadable,
)

COLUMNS = ["id", "split", "hr", "lr"]


def write_manifest(root: Path, rows: list[dict[str, str]]) -> Path:
    with open(root / "manifest.csv", "w", newline="", encoding="utf-8") as fh:
        writer = csv.DictWriter(fh, fieldnames=COLUMNS, lineterminator="\n")
        writer.writeheader()
        writer.writerows(rows)
    return root / "manifest.csv"


def tiny_dataset(root: Path, n_train: int = 30, n_valid: int = 4, size: int = 32, scale: int = 2) -> Path:
    """A dataset in build-dataset's layout (without params): random size×size HR PNGs and their LR / scale."""
    rng = np.random.default_rng(0)
    rows = []
    for split, n in (("train", n_train), ("valid", n_valid)):
        for i in range(n):
            pid = f"p{i:03d}"
            hr = rng.integers(0, 256, (size, size, 3), dtype=np.uint8)
            lr = hr[::scale, ::scale]
            for kind, img in (("hr", hr), ("lr", lr)):
                path = root / kind / split / f"{pid}.png"
                path.parent.mkdir(parents=True, exist_ok=True)
                Image.fromarray(np.ascontiguousarray(img)).save(path)
            rows.append({"id": pid, "split": split, "hr": f"hr/{split}/{pid}.png", "lr": f"lr/{split}/{pid}.png"})
    write_manifest(root, rows)
    (root / "config.yaml").write_text(f"scale: {scale}\n")
    return root


def rows_of(root: Path) -> list[dict[str, str]]:
    with open(root / "manifest.csv", newline="", encoding="utf-8") as fh:
        return list(csv.DictReader(fh))


def corrupt(path: Path) -> None:
    path.write_bytes(b"\x89PNG\r\n\x1a\n this is not the rest of a PNG")


@pytest.fixture
def data(tmp_path) -> Path:
    return tiny_dataset(tmp_path / "data", n_train=6, n_valid=2)


# --- item 9: the manifest cannot lead outside the dataset or the run -------------------------------------------


def _one_line_refusal(root: Path, line: int) -> str:
    with pytest.raises(CrappifyError) as info:
        read_dataset(root)
    msg = str(info.value)
    assert "\n" not in msg and f"manifest.csv line {line}" in msg, msg
    return msg


@pytest.mark.parametrize("column, value", [
    ("hr", "../outside.png"),
    ("lr", "lr/train/../../../outside.png"),
    ("lr", "ABSOLUTE"),
])
def test_manifest_paths_outside_the_dataset_are_refused(data, column, value):
    outside = data.parent / "outside.png"
    outside.write_bytes((data / "hr" / "train" / "p000.png").read_bytes())
    rows = rows_of(data)
    rows[2][column] = str(outside) if value == "ABSOLUTE" else value
    write_manifest(data, rows)
    msg = _one_line_refusal(data, 4)  # header, then rows 0, 1, 2
    assert column in msg


def test_symlinks_leading_outside_the_dataset_are_refused(data):
    outside = data.parent / "elsewhere"
    outside.mkdir()
    (outside / "p001.png").write_bytes((data / "lr" / "train" / "p001.png").read_bytes())
    (data / "lr" / "train" / "p001.png").unlink()
    (data / "lr" / "train" / "p001.png").symlink_to(outside / "p001.png")
    msg = _one_line_refusal(data, 3)
    assert "lr" in msg and "outside" in msg

    (data / "lr" / "train" / "p001.png").unlink()  # a linked folder leads outside as well
    (data / "lr" / "train" / "p001.png").symlink_to(data / "hr" / "train" / "p001.png")  # inside: fine
    read_dataset(data)
    os.rename(data / "hr" / "valid", outside / "valid")
    (data / "hr" / "valid").symlink_to(outside / "valid", target_is_directory=True)
    _one_line_refusal(data, 8)


@pytest.mark.parametrize("column, value", [
    ("id", "../../escape"), ("id", "/tmp/escape"), ("id", "a/../../b"), ("id", "a\\..\\b"), ("id", "a\0b"),
    ("id", "."), ("id", "a//b"), ("id", ""), ("split", "../train"), ("split", "a/b"),
])
def test_unsafe_ids_and_splits_are_refused(data, column, value):
    rows = rows_of(data)
    rows[0][column] = value
    write_manifest(data, rows)
    _one_line_refusal(data, 2)


def test_nested_ids_and_paths_that_stay_inside_are_accepted(data):
    rows = rows_of(data)
    rows[0]["id"] = "folder/sub/p000"  # build-dataset keeps a source's sub-folders in ids
    rows[1]["hr"] = "hr/../hr/train/p001.png"
    write_manifest(data, rows)
    splits, config = read_dataset(data)
    assert config == {"scale": 2} and [p.id for p in splits["train"]][:2] == ["folder/sub/p000", "p001"]
    assert splits["train"][1].hr == data / "hr/../hr/train/p001.png" and splits["train"][1].hr.is_file()
    assert splits["train"][1].row == f"{data / 'manifest.csv'} line 3"


def _tiny_generator(run: Path, scale: int = 2) -> None:
    from srgan.checkpoint import save_generator
    from srgan.generators import build_generator

    torch.manual_seed(0)
    run.mkdir(parents=True, exist_ok=True)
    save_generator(build_generator("srresnet", scale=scale, pretrained=False, n_blocks=1, n_feats=8),
                   run / "generator.safetensors", data_scale=scale)


def test_save_preds_never_writes_outside_the_run(data, tmp_path):
    from srgan.predict import save_preds

    rows = rows_of(data)
    rows[0]["id"] = "../../../escape"
    write_manifest(data, rows)
    run = tmp_path / "runs" / "r"
    _tiny_generator(run)
    with pytest.raises(CrappifyError, match=r"manifest\.csv line 2:"):
        save_preds(run, data)
    assert not list(tmp_path.rglob("escape*"))


def test_cli_refuses_a_hostile_manifest_with_one_line(cli, data, tmp_path):
    rows = rows_of(data)
    rows[3]["lr"] = "../../../../../etc/passwd"
    write_manifest(data, rows)
    _tiny_generator(tmp_path / "run")
    res = cli("evaluate", data, "-m", tmp_path / "run", "-o", tmp_path / "report", "--device", "cpu")
    assert res.returncode == 1, res.stderr
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("crappify: error: "), res.stderr
    assert "manifest.csv line 5" in lines[0] and "lr" in lines[0]


# --- item 13: unreadable pairs are named, skipped, replaced deterministically, and counted ----------------------


def test_an_unreadable_pair_is_named_once_and_replaced_the_same_way(data, capfd):
    corrupt(data / "lr" / "train" / "p002.png")
    splits, _ = read_dataset(data)
    a = PairDataset(splits["train"], 16, scale=2, resize_lr=False, train=True, seed=5)
    first = [a[i] for i in range(len(a))]
    again = [a[i] for i in range(len(a))]  # known bad now: replaced without another message
    err = capfd.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("crappify: warning: "), err
    assert str(data / "lr" / "train" / "p002.png") in err[0] and "manifest.csv line 4" in err[0]
    assert "'p002'" in err[0] and a.unreadable.count() == 1
    b = PairDataset(read_dataset(data)[0]["train"], 16, scale=2, resize_lr=False, train=True, seed=5)
    for x, y, z in zip(first, again, (b[i] for i in range(len(b))), strict=True):
        assert all(torch.equal(u, v) and torch.equal(u, w) for u, v, w in zip(x, y, z, strict=True))
    assert first[2][0].shape == (3, 8, 8) and first[2][1].shape == (3, 16, 16)


def test_substitutes_follow_the_seed_and_cover_every_other_item():
    bad = Unreadable(7)
    order = list(bad.substitutes(3, seed=1, epoch=0))
    assert sorted(order) == [0, 1, 2, 4, 5, 6] and order == list(Unreadable(7).substitutes(3, seed=1, epoch=0))
    assert {tuple(bad.substitutes(3, seed=s, epoch=e)) for s in range(4) for e in range(4)} != {tuple(order)}

    def read(j: int) -> int:
        if j in (3, order[0]):
            raise ImageError(f"item {j}: corrupt")
        return j

    assert read_or_substitute(3, read, bad, seed=1, epoch=0) == (order[1], order[1])
    assert bad.count() == 2 and 3 in bad and order[0] in bad


def test_the_stop_rule_is_more_than_ten_and_more_than_one_percent():
    assert not too_many_unreadable(10, 20) and too_many_unreadable(11, 20)
    assert not too_many_unreadable(20, 2000) and too_many_unreadable(21, 2000)
    bad = Unreadable(30, "training pairs")
    for j in range(10):
        bad.add(j, f"f{j}.png: corrupt")
    with pytest.raises(CrappifyError, match=r"^11 of 30 training pairs could not be read: .*last: f10\.png: corrupt$"):
        bad.add(10, "f10.png: corrupt")


def _batches(dl) -> list[tuple[torch.Tensor, torch.Tensor]]:
    return [tuple(t.clone() for t in b) for b in dl]


@pytest.mark.parametrize("workers", [0, 2])
def test_loaders_with_and_without_workers_skip_and_count_alike(tmp_path, workers, capfd):
    data = tiny_dataset(tmp_path / "data", n_train=12, n_valid=2)
    corrupt(data / "hr" / "train" / "p004.png")  # one: two workers never try the same bad file at once
    reference = make_dataloaders(data, 16, 4, resize_lr=False, scale=2, seed=3, num_workers=0)
    dls = make_dataloaders(data, 16, 4, resize_lr=False, scale=2, seed=3, num_workers=workers)
    for epoch in (0, 1):
        reference.train.dataset.set_epoch(epoch)
        dls.train.dataset.set_epoch(epoch)
        want, got = _batches(reference.train), _batches(dls.train)
        assert len(got) == 3 and all(torch.equal(u, v) for a, b in zip(want, got, strict=True)
                                     for u, v in zip(a, b, strict=True))
    assert dls.train.dataset.unreadable.count() == 1  # seen in the main process, from the workers too
    err = [line for line in capfd.readouterr().err.splitlines() if "crappify: warning" in line]
    assert len(err) == 2 and all("hr/train/p004.png" in e for e in err)  # once per pair and dataset


@pytest.mark.parametrize("workers", [0, 2])
def test_too_many_unreadable_pairs_stop_with_one_line(tmp_path, workers):
    data = tiny_dataset(tmp_path / "data", n_train=24, n_valid=2)
    for i in range(11):
        corrupt(data / "lr" / "train" / f"p{i * 2:03d}.png")
    dls = make_dataloaders(data, 16, 4, resize_lr=False, scale=2, seed=0, num_workers=workers)
    with pytest.raises(CrappifyError) as info:
        _batches(dls.train)
    msg = str(info.value)
    assert "\n" not in msg and "Traceback" not in msg and "Caught" not in msg, msg
    assert msg.startswith("11 of 24 training pairs could not be read") and "manifest.csv line" in msg


def test_a_pair_whose_lr_does_not_fit_its_hr_is_skipped_by_name(data, capfd):
    lr = data / "lr" / "train" / "p001.png"
    Image.fromarray(np.zeros((5, 7, 3), np.uint8)).save(lr)
    ds = PairDataset(read_dataset(data)[0]["train"], 16, scale=2, resize_lr=False, train=False)
    assert ds[1][1].shape == (3, 16, 16) and ds.unreadable.count() == 1
    assert f"{lr}: LR 7x5 is not HR 32x32 / 2" in capfd.readouterr().err


def test_cli_train_gen_with_too_many_bad_pairs_in_workers_says_one_line(cli, tmp_path):
    data = tiny_dataset(tmp_path / "data", n_train=16, n_valid=2)
    for i in range(11):
        corrupt(data / "lr" / "train" / f"p{i:03d}.png")
    res = cli("train-gen", data, "-o", tmp_path / "run", "--arch", "srresnet", "--no-pretrained", "--loss", "l1",
              "--size", "16", "--bs", "4", "--epochs", "1", "--workers", "2", "--device", "cpu", "--precision",
              "fp32", "--quiet")
    assert res.returncode == 1, res.stderr
    assert "Traceback" not in res.stderr and "Caught" not in res.stderr, res.stderr
    last = res.stderr.strip().splitlines()[-1]
    assert last.startswith("crappify: error: 11 of 16 training pairs could not be read"), res.stderr


def test_save_preds_skips_an_unreadable_pair_with_one_line(data, tmp_path, capfd):
    from srgan.predict import save_preds

    corrupt(data / "lr" / "valid" / "p001.png")
    (data / "hr" / "train" / "p003.png").write_bytes(b"")
    run = tmp_path / "run"
    _tiny_generator(run)
    assert save_preds(run, data) == 6
    err = capfd.readouterr().err.strip().splitlines()
    assert len(err) == 2 and all(e.startswith("crappify: warning: save-preds: ") for e in err), err
    assert "lr/valid/p001.png" in err[1] and "manifest.csv line 9" in err[1] and "hr/train/p003.png" in err[0]
    assert not (run / "preds" / "valid" / "p001.png").exists() and (run / "preds" / "valid" / "p000.png").is_file()


# --------------------------------------------------------------------------------------------------------
# decoded once: the pairs' pixels kept across epochs (DecodeCache)


def _counting(ds: PairDataset) -> list[int]:
    reads: list[int] = []
    real = ds.read_pair

    def read_pair(i):
        reads.append(i)
        return real(i)

    ds.read_pair = read_pair
    return reads


@pytest.mark.parametrize("resize_lr", [True, False])
def test_each_pair_is_decoded_once_and_the_crops_are_those_of_a_fresh_read(tmp_path, resize_lr):
    root = tiny_dataset(tmp_path, n_train=6, size=32, scale=2)
    pairs = read_dataset(root)[0]["train"]
    ds = PairDataset(pairs, 16, 2, resize_lr=resize_lr, train=True, seed=3)
    reads = _counting(ds)
    items = {}
    for epoch in range(3):
        ds.set_epoch(epoch)
        items[epoch] = [ds[i] for i in range(len(ds))]
    assert sorted(reads) == list(range(len(pairs)))  # every pair read in the first epoch only
    for epoch, got in items.items():  # the same crops as a dataset that keeps nothing
        fresh = PairDataset(pairs, 16, 2, resize_lr=resize_lr, train=True, seed=3)
        fresh.cache = DecodeCache(budget=0)
        fresh.set_epoch(epoch)
        for i, (lr, hr) in enumerate(got):
            want_lr, want_hr = fresh[i]
            assert torch.equal(lr, want_lr) and torch.equal(hr, want_hr)
    lr, hr = ds.cache.items[0]
    assert not lr.flags.writeable and not hr.flags.writeable  # a crop of a kept array cannot be written to
    lr_t, _ = ds[0]
    lr_t += 1  # the items handed out are the caller's own
    assert torch.equal(ds[0][0], lr_t - 1)


def test_the_cache_keeps_no_more_than_its_budget_and_stays_behind_when_pickled(tmp_path):
    import pickle

    root = tiny_dataset(tmp_path, n_train=6, size=32, scale=2)
    pairs = read_dataset(root)[0]["train"]
    ds = PairDataset(pairs, 16, 2, resize_lr=True, train=True)
    one = sum(a.nbytes for a in ds.read_pair(0))
    ds.cache = DecodeCache(budget=2 * one)
    reads = _counting(ds)
    for _ in range(2):
        for i in range(len(ds)):
            ds[i]
    assert len(ds.cache.items) == 2 and ds.cache.used == 2 * one
    assert len(reads) == 2 * len(pairs) - 2  # the two kept pairs read once, the others every pass
    copy = pickle.loads(pickle.dumps(ds.cache))  # what a spawned loader worker gets: the budget, not the pixels
    assert copy.items == {} and copy.used == 0 and copy.budget == 2 * one


def test_loader_workers_keep_nothing(tmp_path, monkeypatch):
    root = tiny_dataset(tmp_path, n_train=4, size=32, scale=2)
    ds = PairDataset(read_dataset(root)[0]["train"], 16, 2, resize_lr=True, train=True)
    monkeypatch.setattr(torch.utils.data, "get_worker_info", lambda: object())  # as inside a worker process
    for i in range(len(ds)):
        ds[i]
    assert ds.cache.items == {} and ds.cache.used == 0
