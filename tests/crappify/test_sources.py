"""crappify.sources: layout detection, listing, ids, splits and limits."""

from __future__ import annotations

import csv
import shutil
from collections import Counter
from pathlib import Path

import pytest
from PIL import Image

from crappify.builder import BuildConfig, build_dataset
from crappify.errors import ConfigError, CrappifyError
from crappify.sources import (
    SOURCES,
    SPLITS,
    Item,
    assign_splits,
    detect,
    limit_items,
    list_source,
    sample_id,
    sample_photos,
    split_counts,
)


def _photo(path: Path, photo_maker, index: int = 0, long_side: int = 100) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(photo_maker(index, long_side)).save(path, quality=90)
    return path


def _manifest(out: Path) -> list[dict[str, str]]:
    with open(out / "manifest.csv", newline="", encoding="utf-8") as fh:
        return list(csv.DictReader(fh))


def _skipped(out: Path) -> list[dict[str, str]]:
    with open(out / "skipped.csv", newline="", encoding="utf-8") as fh:
        return list(csv.DictReader(fh))


# --- detection ----------------------------------------------------------------------------------------


@pytest.fixture
def flickr_dir(tmp_path, photo_maker) -> Path:
    src = tmp_path / "flickr"
    names = ["1000092795.jpg", "10002456.jpg", "1000268201.jpg", "1000344755.jpg"]
    for i, name in enumerate(names):
        _photo(src / "flickr30k_images" / name, photo_maker, i)
    lines = ["image_name| comment_number| comment"]
    for i, name in enumerate(names[:3]):  # the last image has no caption
        lines.append(f"{name}| 0| A caption number zero for image {i} , with a comma .")
        lines.append(f"{name}| 1| Another caption {i} .")
        lines.append(f"{name}| 2| Yet another {i} .")
    (src / "results.csv").write_text("\n".join(lines) + "\n", encoding="utf-8")
    return src


@pytest.fixture
def celeba_dir(tmp_path, photo_maker) -> Path:
    src = tmp_path / "celeba"
    for i in range(1, 8):
        _photo(src / "img_align_celeba" / f"{i:06d}.jpg", photo_maker, i, long_side=90)
    # official split: 1-3 train, 4-5 valid, 6 test; 7 is not listed
    parts = {1: 0, 2: 0, 3: 0, 4: 1, 5: 1, 6: 2}
    (src / "list_eval_partition.txt").write_text("".join(f"{i:06d}.jpg {p}\n" for i, p in parts.items()))
    return src


def test_detect_folder(photo_dir):
    assert detect(photo_dir) == "folder"


def test_detect_flickr30k(flickr_dir):
    assert detect(flickr_dir) == "flickr30k"


def test_detect_celeba(celeba_dir):
    assert detect(celeba_dir) == "celeba"


@pytest.mark.parametrize("name", ["celeba_hq", "CelebA-HQ", "celebahq"])
def test_detect_celeba_hq_by_folder_name(tmp_path, name):
    (tmp_path / name).mkdir()
    assert detect(tmp_path / name) == "celeba-hq"


def test_detect_celebamask_hq(tmp_path):
    (tmp_path / "CelebAMask-HQ" / "CelebA-HQ-img").mkdir(parents=True)
    assert detect(tmp_path / "CelebAMask-HQ") == "celeba-hq"


def test_detect_samples_only_when_no_such_folder(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert detect(Path("samples")) == "samples"
    (tmp_path / "samples").mkdir()
    assert detect(Path("samples")) == "folder"


# --- folder -------------------------------------------------------------------------------------------


def test_folder_lists_images_recursively_and_skips_other_files(odd_files):
    kind, listing = list_source(odd_files.root)
    assert kind == "folder"
    sources = {it.source for it in listing.items}
    # every file with an image extension is listed (decoding problems show up later, in the build)
    assert {p.relative_to(odd_files.root).as_posix() for p in odd_files.paths.values()} <= sources
    assert {"empty.jpg", "text.jpg", "sub/truncated.jpg"} <= sources
    assert listing.skipped == [("notes.txt", "not an image file (extension .txt)")]
    for it in listing.items:
        assert it.path == odd_files.root / it.source
        assert it.id == Path(it.source).with_suffix("").as_posix()
        assert it.split in SPLITS


def test_folder_ignores_hidden_files_and_folders(tmp_path, photo_maker):
    _photo(tmp_path / "a.jpg", photo_maker)
    _photo(tmp_path / ".hidden.jpg", photo_maker)
    _photo(tmp_path / ".cache" / "b.jpg", photo_maker)
    _, listing = list_source(tmp_path)
    assert [it.id for it in listing.items] == ["a"]
    assert listing.skipped == []


def test_ids_are_unique_when_names_differ_only_by_extension(tmp_path, photo_maker):
    _photo(tmp_path / "a.jpg", photo_maker, 0)
    _photo(tmp_path / "a.png", photo_maker, 1)
    _photo(tmp_path / "b.jpg", photo_maker, 2)
    _photo(tmp_path / "sub" / "a.jpg", photo_maker, 3)
    _, listing = list_source(tmp_path)
    ids = [it.id for it in listing.items]
    assert len(ids) == len(set(ids)) == 4
    by_source = {it.source: it.id for it in listing.items}
    assert by_source == {"a.jpg": "a_jpg", "a.png": "a_png", "b.jpg": "b", "sub/a.jpg": "sub/a"}


def test_ids_unique_builds_two_pairs(tmp_path, photo_maker):
    src = tmp_path / "src"
    _photo(src / "a.jpg", photo_maker, 0)
    _photo(src / "a.png", photo_maker, 1)
    res = build_dataset(BuildConfig(src=str(src), out=str(tmp_path / "out"), preset="lesson7", workers=1),
                        progress=False)
    assert res.built == 2
    rows = _manifest(tmp_path / "out")
    assert sorted(r["id"] for r in rows) == ["a_jpg", "a_png"]
    assert len({r["hr"] for r in rows}) == 2 and len({r["lr"] for r in rows}) == 2


# --- flickr30k ------------------------------------------------------------------------------------------


def test_flickr30k_captions(flickr_dir):
    kind, listing = list_source(flickr_dir)
    assert kind == "flickr30k"
    assert len(listing.items) == 4
    caps = {it.path.name: it.caption for it in listing.items}
    assert caps["1000092795.jpg"] == "A caption number zero for image 0 , with a comma ."
    assert caps["1000268201.jpg"] == "A caption number zero for image 2 , with a comma ."
    assert caps["1000344755.jpg"] == ""
    assert all(it.source.startswith("flickr30k_images/") for it in listing.items)
    assert all(it.id == it.path.stem for it in listing.items)
    assert "results.csv" not in {Path(s).name for s, _ in listing.skipped}


def test_flickr30k_caption_lands_in_the_manifest(flickr_dir, tmp_path):
    out = tmp_path / "out"
    res = build_dataset(BuildConfig(src=str(flickr_dir), out=str(out), preset="lesson7", workers=1), progress=False)
    assert res.built == 4
    rows = {r["id"]: r for r in _manifest(out)}
    assert rows["10002456"]["caption"] == "A caption number zero for image 1 , with a comma ."
    assert rows["1000344755"]["caption"] == ""
    assert rows["10002456"]["source"] == "flickr30k_images/10002456.jpg"


def test_flickr30k_kaggle_double_folder(tmp_path, photo_maker):
    src = tmp_path / "flickr"
    _photo(src / "flickr30k_images" / "flickr30k_images" / "1.jpg", photo_maker)
    (src / "flickr30k_images" / "results.csv").write_text("image_name| comment_number| comment\n1.jpg| 0| cap\n")
    _, listing = list_source(src)
    assert [(it.id, it.caption) for it in listing.items] == [("1", "cap")]


def test_flickr30k_forced_on_a_plain_folder_is_an_error(photo_dir):
    with pytest.raises(CrappifyError, match="Flickr30k"):
        list_source(photo_dir, "flickr30k")


# --- celeba ---------------------------------------------------------------------------------------------


def test_celeba_official_split_and_unlisted_image(celeba_dir):
    kind, listing = list_source(celeba_dir)
    assert kind == "celeba"
    assert listing.official_split
    splits = {it.id: it.split for it in listing.items}
    assert splits == {"000001": "train", "000002": "train", "000003": "train", "000004": "valid",
                      "000005": "valid", "000006": "test"}
    assert listing.skipped == [("img_align_celeba/000007.jpg", "not listed in list_eval_partition.txt")]


def test_celeba_split_is_kept_whatever_the_seed_and_ratios(celeba_dir):
    _, a = list_source(celeba_dir, seed=0)
    _, b = list_source(celeba_dir, seed=99, ratios=(0.2, 0.4, 0.4))
    assert [(it.id, it.split) for it in a.items] == [(it.id, it.split) for it in b.items]


def test_celeba_build_respects_the_official_split(celeba_dir, tmp_path):
    out = tmp_path / "out"
    res = build_dataset(BuildConfig(src=str(celeba_dir), out=str(out), preset="lesson7", workers=1), progress=False)
    assert res.built == 6 and res.skipped == 1
    assert res.per_split == {"train": 3, "valid": 2, "test": 1}
    rows = {r["id"]: r for r in _manifest(out)}
    assert rows["000004"]["split"] == "valid" and rows["000004"]["hr"].startswith("hr/valid/")
    assert rows["000006"]["split"] == "test" and rows["000006"]["lr"].startswith("lr/test/")
    assert _skipped(out) == [{"source": "img_align_celeba/000007.jpg",
                              "reason": "not listed in list_eval_partition.txt"}]


def test_celeba_kaggle_csv_partition(tmp_path, photo_maker):
    src = tmp_path / "celeba"
    for i in (1, 2, 3):
        _photo(src / "img_align_celeba" / "img_align_celeba" / f"{i:06d}.jpg", photo_maker, i, 80)
    (src / "list_eval_partition.csv").write_text("image_id,partition\n000001.jpg,0\n000002.jpg,2\n000003.jpg,1\n")
    _, listing = list_source(src)
    assert {it.id: it.split for it in listing.items} == {"000001": "train", "000002": "test", "000003": "valid"}


def test_celeba_without_partition_file_is_an_error(tmp_path, photo_maker):
    _photo(tmp_path / "c" / "img_align_celeba" / "000001.jpg", photo_maker)
    with pytest.raises(CrappifyError, match="list_eval_partition"):
        list_source(tmp_path / "c")


def test_celeba_limit_is_proportional_across_splits(tmp_path, photo_maker):
    src = tmp_path / "celeba"
    img = src / "img_align_celeba"
    img.mkdir(parents=True)
    first = _photo(img / "000001.jpg", photo_maker, 0, 40)
    lines = []
    for i in range(1, 101):  # 80 train, 10 valid, 10 test, interleaved
        if i > 1:
            shutil.copyfile(first, img / f"{i:06d}.jpg")
        lines.append(f"{i:06d}.jpg {0 if i % 10 < 8 else 1 if i % 10 == 8 else 2}")
    (src / "list_eval_partition.txt").write_text("\n".join(lines) + "\n")
    _, listing = list_source(src, limit=20)
    assert len(listing.items) == 20
    assert Counter(it.split for it in listing.items) == {"train": 16, "valid": 2, "test": 2}
    ids = [it.id for it in listing.items]
    assert ids == sorted(ids)


# --- celeba-hq ------------------------------------------------------------------------------------------


def test_celeba_hq_folder(tmp_path, photo_maker):
    src = tmp_path / "celeba_hq"
    for i in range(5):
        _photo(src / f"{i}.jpg", photo_maker, i, 80)
    kind, listing = list_source(src)
    assert kind == "celeba-hq"
    assert not listing.official_split
    assert sorted(it.id for it in listing.items) == ["0", "1", "2", "3", "4"]


def test_celebamask_hq_images_subfolder(tmp_path, photo_maker):
    src = tmp_path / "CelebAMask-HQ"
    for i in range(3):
        _photo(src / "CelebA-HQ-img" / f"{i}.jpg", photo_maker, i, 80)
    (src / "README.txt").write_text("not listed: outside CelebA-HQ-img\n")
    kind, listing = list_source(src)
    assert kind == "celeba-hq"
    assert [it.source for it in listing.items] == ["CelebA-HQ-img/0.jpg", "CelebA-HQ-img/1.jpg",
                                                   "CelebA-HQ-img/2.jpg"]
    assert [it.id for it in listing.items] == ["0", "1", "2"]


# --- samples --------------------------------------------------------------------------------------------


def test_samples_listing():
    kind, listing = list_source(Path("samples"), "samples")
    assert kind == "samples"
    photos = sample_photos()
    assert len(listing.items) == len(photos) >= 3
    assert all(it.path.is_file() for it in listing.items)
    assert sample_id("skimage/astronaut.png") == "skimage-astronaut"
    assert {it.id for it in listing.items} == {sample_id(n) for n, _ in photos}


# --- splits and limits ----------------------------------------------------------------------------------


@pytest.mark.parametrize("n, ratios, expected", [
    (100, (0.9, 0.05, 0.05), (90, 5, 5)),
    (1000, (0.8, 0.1, 0.1), (800, 100, 100)),
    (10, (0.9, 0.05, 0.05), (8, 1, 1)),  # small non-zero ratios still get one item each
    (3, (0.9, 0.05, 0.05), (1, 1, 1)),
    (2, (0.9, 0.05, 0.05), (2, 0, 0)),
    (1, (0.5, 0.25, 0.25), (1, 0, 0)),
    (0, (0.9, 0.05, 0.05), (0, 0, 0)),
    (10, (1.0, 0.0, 0.0), (10, 0, 0)),
    (10, (0.0, 0.5, 0.5), (0, 5, 5)),
    (10, (0.5, 0.5, 0.0), (5, 5, 0)),
])
def test_split_counts(n, ratios, expected):
    counts = split_counts(n, ratios)
    assert counts == expected
    assert sum(counts) == n


def _items(n: int) -> list[Item]:
    return [Item(f"img{i:03d}", f"img{i:03d}.jpg", Path(f"img{i:03d}.jpg")) for i in range(n)]


def test_assign_splits_is_deterministic_for_a_seed_and_differs_across_seeds():
    items = _items(60)
    a = [it.split for it in assign_splits(items, (0.8, 0.1, 0.1), seed=0)]
    b = [it.split for it in assign_splits(items, (0.8, 0.1, 0.1), seed=0)]
    c = [it.split for it in assign_splits(items, (0.8, 0.1, 0.1), seed=1)]
    assert a == b
    assert a != c
    assert Counter(a) == Counter(c) == {"train": 48, "valid": 6, "test": 6}


def test_assign_splits_keeps_everything_but_the_split():
    items = [Item("x", "x.jpg", Path("x.jpg"), caption="cap"), *_items(5)]
    out = assign_splits(items, (0.6, 0.2, 0.2), seed=3)
    assert [(it.id, it.source, it.path, it.caption) for it in out] == \
        [(it.id, it.source, it.path, it.caption) for it in items]
    assert all(it.split in SPLITS for it in out)


def test_ratio_split_in_list_source_follows_seed(photo_dir):
    _, a = list_source(photo_dir, seed=0, ratios=(0.5, 0.25, 0.25))
    _, b = list_source(photo_dir, seed=0, ratios=(0.5, 0.25, 0.25))
    _, c = list_source(photo_dir, seed=7, ratios=(0.5, 0.25, 0.25))
    sa, sb, sc = ([(it.id, it.split) for it in x.items] for x in (a, b, c))
    assert sa == sb and sa != sc
    n = len(a.items)
    assert Counter(s for _, s in sa) == dict(zip(SPLITS, split_counts(n, (0.5, 0.25, 0.25)), strict=True))


def test_limit_on_a_ratio_split_source(photo_dir):
    _, full = list_source(photo_dir)
    _, limited = list_source(photo_dir, limit=5)
    assert len(limited.items) == 5
    assert {it.id for it in limited.items} <= {it.id for it in full.items}


def test_limit_items_proportional():
    items = [Item(f"{s}{i:02d}", "", Path("x"), s) for s, n in (("train", 40), ("valid", 5), ("test", 5))
             for i in range(n)]
    picked = limit_items(items, 10)
    assert Counter(it.split for it in picked) == {"train": 8, "valid": 1, "test": 1}
    assert [it.id for it in picked] == sorted(it.id for it in picked)
    assert len(limit_items(items, 1000)) == 50


# --- errors ---------------------------------------------------------------------------------------------


def test_unknown_source_lists_valid_names(photo_dir):
    with pytest.raises(ConfigError) as info:
        list_source(photo_dir, "nope")
    msg = str(info.value)
    assert "nope" in msg
    for name in ("folder", "flickr30k", "celeba", "celeba-hq", "samples"):
        assert name in msg
    assert set(SOURCES.names()) == {"folder", "flickr30k", "celeba", "celeba-hq", "samples"}


def test_missing_folder_is_a_crappify_error(tmp_path):
    with pytest.raises(CrappifyError, match="source folder not found"):
        list_source(tmp_path / "missing")
    with pytest.raises(CrappifyError, match="source folder not found"):
        list_source(tmp_path / "missing", "folder")


def test_a_file_as_source_is_a_crappify_error(tmp_path):
    (tmp_path / "f.jpg").write_bytes(b"x")
    with pytest.raises(CrappifyError):
        list_source(tmp_path / "f.jpg")


# --- known bugs -----------------------------------------------------------------------------------------


@pytest.mark.parametrize("names", [("a.jpg", "a.JPG"), ("b.jpg", "b.png", "b_jpg.png")])
def test_ids_are_unique_whatever_the_names(tmp_path, photo_maker, names):
    for i, name in enumerate(names):
        _photo(tmp_path / name, photo_maker, i)
    _, listing = list_source(tmp_path)
    assert len(listing.items) == len(names)
    ids = [it.id for it in listing.items]
    assert len(set(ids)) == len(ids), ids


def test_symlink_loop_lists_each_photo_once(tmp_path, photo_maker):
    src = tmp_path / "src"
    _photo(src / "x.jpg", photo_maker)
    (src / "sub").mkdir()
    (src / "sub" / "up").symlink_to(src, target_is_directory=True)
    _, listing = list_source(src)
    assert [it.id for it in listing.items] == ["x"]


def test_symlinked_subfolder_is_followed(tmp_path, photo_maker):
    elsewhere = tmp_path / "elsewhere"
    _photo(elsewhere / "y.jpg", photo_maker)
    src = tmp_path / "src"
    _photo(src / "x.jpg", photo_maker)
    (src / "more").symlink_to(elsewhere, target_is_directory=True)
    _, listing = list_source(src)
    assert sorted(it.id for it in listing.items) == ["more/y", "x"]
