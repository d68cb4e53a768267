"""Datasets across machines: `build-dataset --shard K/N` parts are disjoint, cover the whole build, hold its very
rows and bytes, resume like any build, and `merge-datasets` joins them into the single build byte for byte; parts
that do not make one dataset are refused with one line naming the offending part."""

from __future__ import annotations

import csv
import json
import os
import re
import shutil
from dataclasses import dataclass
from pathlib import Path

import pytest
import yaml
from test_builder import kill_after_journal_lines

from crappify.builder import JOURNAL, BuildConfig, build_dataset, parse_shard
from crappify.cli import main
from crappify.config import resolve
from crappify.errors import ConfigError, CrappifyError
from crappify.merge import merge_datasets
from crappify.sources import list_source

N = 3
OPTIONS = {"preset": "srgan-x4", "seed": 3, "split": (0.6, 0.2, 0.2)}
CLI_OPTIONS = ["--preset", "srgan-x4", "--seed", "3", "--split", "0.6,0.2,0.2", "--workers", "1", "--quiet"]
CAPTIONS = {0: 'A dog, running; "fast"', 3: "café — crème, déjà vu", 5: "two\ttabbed fields"}


def build(src: Path, out: Path, **kw):
    return build_dataset(BuildConfig(src=str(src), out=str(out), **{"workers": 1, **OPTIONS, **kw}), progress=False)


def rows(path: Path) -> list[dict[str, str]]:
    with open(path, newline="", encoding="utf-8") as fh:
        return list(csv.DictReader(fh))


def data_files(root: Path) -> set[str]:
    return {p.relative_to(root).as_posix() for d in ("hr", "lr") for p in (root / d).rglob("*") if p.is_file()}


def one_line(exc: pytest.ExceptionInfo, *fragments: str) -> str:
    text = str(exc.value)
    assert "\n" not in text, text
    for fragment in fragments:
        assert fragment in text, (fragment, text)
    return text


@pytest.fixture(scope="module")
def src(photo_dir, tmp_path_factory) -> Path:
    """A Flickr30k-like source: the small photos (some HRs re-encoded, some linked as they are), captions with
    commas, quotes, tabs and accents, two non-images (skipped while listing) and two unusable photos (skipped
    when built)."""
    root = tmp_path_factory.mktemp("shard-src")
    images = root / "flickr30k_images"
    images.mkdir()
    lines = ["image_name| comment_number| comment"]
    for i, photo in enumerate(sorted(photo_dir.rglob("*.*"))):
        shutil.copy(photo, images / f"img{i:02d}{photo.suffix}")
        if i in CAPTIONS:
            lines.append(f"img{i:02d}{photo.suffix}| 0| {CAPTIONS[i]}")
    (root / "results.csv").write_text("\n".join(lines) + "\n", encoding="utf-8")
    (images / "notes.txt").write_text("not a photo\n")
    (images / "readme.md").write_text("not a photo either\n")
    (images / "empty.jpg").write_bytes(b"")
    (images / "text.png").write_text("this is not a PNG\n")
    return root


@dataclass
class Built:
    whole: Path
    parts: list[Path]
    merged: Path


@pytest.fixture(scope="module")
def built(src, tmp_path_factory) -> Built:
    """The whole build, its 3 parts, and their merge."""
    root = tmp_path_factory.mktemp("shards")
    build(src, root / "whole")
    parts = [root / f"part{k}" for k in range(1, N + 1)]
    for k, part in enumerate(parts, 1):
        build(src, part, shard=f"{k}/{N}")
    merge_datasets(parts, root / "merged")
    return Built(root / "whole", parts, root / "merged")


def test_three_parts_merge_to_the_single_build_byte_for_byte(built, read_tree):
    whole, merged = read_tree(built.whole), read_tree(built.merged)
    assert sorted(merged) == sorted(whole)
    for name in whole:
        assert merged[name] == whole[name], name
    # the fixture exercises what matters: captions needing CSV quoting, skips of both kinds, linked HRs
    manifest = rows(built.whole / "manifest.csv")
    assert {CAPTIONS[0], CAPTIONS[3]} <= {r["caption"] for r in manifest}
    reasons = {r["source"]: r["reason"] for r in rows(built.whole / "skipped.csv")}
    assert {"flickr30k_images/notes.txt", "flickr30k_images/readme.md", "flickr30k_images/empty.jpg",
            "flickr30k_images/text.png"} == set(reasons)
    assert {r["split"] for r in manifest} == {"train", "valid", "test"}
    # no work twice: every file is the part's own file (a hard link), never re-encoded
    for k, part in enumerate(built.parts):
        for rel in data_files(part):
            assert os.path.samefile(part / rel, built.merged / rel), (k, rel)


def test_parts_are_disjoint_cover_the_build_and_follow_the_round_robin_rule(built, src):
    whole_rows = {r["id"]: r for r in rows(built.whole / "manifest.csv")}
    whole_skips = rows(built.whole / "skipped.csv")
    _, listing = list_source(src, "auto", OPTIONS["seed"], OPTIONS["split"])
    ids = [it.id for it in listing.items]
    item_sources = {it.source for it in listing.items}
    listing_skips = [s for s, _ in listing.skipped]
    seen_ids, seen_skips, seen_files = set(), [], set()
    for k, part in enumerate(built.parts, 1):
        part_rows = rows(part / "manifest.csv")
        assert [r["id"] for r in part_rows] == [i for i in ids[k - 1::N] if i in whole_rows]
        for row in part_rows:  # the same row, seed, split and params as the whole build's
            assert row == whole_rows[row["id"]]
        skips = rows(part / "skipped.csv")
        built_skips = {r["source"] for r in skips if r["source"] in item_sources}
        assert built_skips == {it.source for it in listing.items[k - 1::N]} & {r["source"] for r in whole_skips}
        assert {r["source"] for r in skips} - item_sources == set(listing_skips[k - 1::N])
        files = data_files(part)
        assert not seen_ids & {r["id"] for r in part_rows} and not seen_files & files
        seen_ids |= {r["id"] for r in part_rows}
        seen_files |= files
        seen_skips += skips
    assert seen_ids == set(whole_rows)
    assert seen_files == data_files(built.whole)
    assert sorted(seen_skips, key=lambda r: (r["source"], r["reason"])) == whole_skips
    assert all(rows(p / "manifest.csv") for p in built.parts)  # 14 items over 3 parts: none is empty


def test_a_part_records_its_shard_and_otherwise_the_whole_builds_config(built):
    whole = yaml.safe_load((built.whole / "config.yaml").read_text())
    records = []
    for k, part in enumerate(built.parts, 1):
        config = yaml.safe_load((part / "config.yaml").read_text())
        record = config.pop("shard")
        assert config == whole
        assert (record["index"], record["count"]) == (k, N)
        records.append(record["listing"])
    assert len(set(records)) == 1 and re.fullmatch(r"[0-9a-f]{32}", records[0])


def test_merging_again_does_no_work_twice(built, read_tree):
    before = read_tree(built.merged)
    res = merge_datasets(built.parts, built.merged)
    assert (res.linked, res.copied) == (0, 0) and res.kept == len(data_files(built.merged))
    assert read_tree(built.merged) == before


def test_an_interrupted_merge_is_finished_by_running_it_again(built, tmp_path, read_tree):
    out = shutil.copytree(built.merged, tmp_path / "out", copy_function=os.link)
    for name in ("manifest.csv", "skipped.csv"):
        (out / name).unlink()
    victims = sorted(data_files(out))[::3]
    for rel in victims:
        (out / rel).unlink()
    cut = out / sorted(data_files(out))[0]
    cut.unlink()  # a hard link to the part's file: never write through it
    cut.write_bytes(b"")  # a file cut short (no fsync before a power loss)
    res = merge_datasets(built.parts, out)
    assert res.linked == len(victims) + 1
    assert read_tree(out) == read_tree(built.whole)


def test_an_out_holding_anything_else_is_refused_and_left_alone(built, tmp_path, read_tree):
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "keep.txt").write_text("mine\n")
    with pytest.raises(CrappifyError) as exc:
        merge_datasets(built.parts, foreign)
    one_line(exc, str(foreign), "not empty")
    assert read_tree(foreign) == {"keep.txt": b"mine\n"}
    before = read_tree(built.parts[0])
    with pytest.raises(CrappifyError):  # a part is a dataset, but not this one
        merge_datasets(built.parts, built.parts[0])
    assert read_tree(built.parts[0]) == before


@pytest.mark.parametrize("change, differs", [({"seed": 4}, "differs in: seed"),
                                             ({"preset": "bicubic-x2"}, "differs in: preset")])
def test_a_part_with_another_config_is_refused_naming_it(built, src, tmp_path, change, differs):
    odd = tmp_path / "odd"
    build(src, odd, shard=f"2/{N}", **change)
    for order in ([built.parts[0], odd, built.parts[2]], [odd, built.parts[0], built.parts[2]]):
        with pytest.raises(ConfigError) as exc:
            merge_datasets(order, tmp_path / "out")
        one_line(exc, f"part {odd} ", differs)
    assert not (tmp_path / "out").exists()


def _edited_copy(part: Path, dst: Path, old: str, new: str) -> Path:
    shutil.copytree(part, dst, copy_function=os.link)
    text = (dst / "config.yaml").read_text()
    assert old in text
    (dst / "config.yaml").unlink()  # a hard link: write a new file, never through the link
    (dst / "config.yaml").write_text(text.replace(old, new, 1))
    return dst


def test_parts_built_with_other_library_versions_are_refused(built, tmp_path):
    config = yaml.safe_load((built.parts[2] / "config.yaml").read_text())
    opencv = config["versions"]["opencv"]
    odd = _edited_copy(built.parts[2], tmp_path / "odd", f"opencv: {opencv}", "opencv: 0.0.1")
    with pytest.raises(ConfigError) as exc:
        merge_datasets([*built.parts[:2], odd], tmp_path / "out")
    one_line(exc, f"part {odd} ", "versions.opencv")


def test_a_missing_or_duplicate_shard_is_refused(built, tmp_path):
    p1, p2, p3 = built.parts
    with pytest.raises(ConfigError) as exc:
        merge_datasets([p1, p2], tmp_path / "out")
    one_line(exc, f"shard 3/{N} is missing")
    with pytest.raises(ConfigError) as exc:
        merge_datasets([p2], tmp_path / "out")
    one_line(exc, f"shard 1/{N} is missing (and 1 more)")
    twin = shutil.copytree(p2, tmp_path / "twin", copy_function=os.link)
    with pytest.raises(ConfigError) as exc:
        merge_datasets([p1, p2, twin, p3], tmp_path / "out")
    one_line(exc, f"part {twin} is shard 2/{N}, as is part {p2}")
    with pytest.raises(ConfigError) as exc:
        merge_datasets([p1, p2, p2, p3], tmp_path / "out")
    one_line(exc, f"part {p2} is given twice")
    with pytest.raises(ConfigError) as exc:
        merge_datasets([p1, p2, built.whole], tmp_path / "out")
    one_line(exc, f"{built.whole} is not a part")
    assert not (tmp_path / "out").exists()


def test_parts_of_different_n_are_refused(built, tmp_path):
    odd = _edited_copy(built.parts[2], tmp_path / "odd", f"count: {N}", f"count: {N + 1}")
    with pytest.raises(ConfigError) as exc:
        merge_datasets([*built.parts[:2], odd], tmp_path / "out")
    one_line(exc, f"part {odd} is shard 3/{N + 1}", "share N")


def test_unfinished_or_damaged_parts_are_refused(built, tmp_path):
    running = shutil.copytree(built.parts[0], tmp_path / "running", copy_function=os.link)
    (running / JOURNAL).write_text("")
    with pytest.raises(CrappifyError) as exc:
        merge_datasets([running, *built.parts[1:]], tmp_path / "out")
    one_line(exc, f"part {running} (shard 1/{N}) is not finished")
    damaged = shutil.copytree(built.parts[1], tmp_path / "damaged", copy_function=os.link)
    lost = rows(damaged / "manifest.csv")[0]["lr"]
    (damaged / lost).unlink()
    with pytest.raises(CrappifyError) as exc:
        merge_datasets([built.parts[0], damaged, built.parts[2]], tmp_path / "out")
    one_line(exc, f"part {damaged} lacks {lost}")


def test_parts_cut_from_different_listings_are_refused(src, tmp_path):
    copy = shutil.copytree(src, tmp_path / "src")
    build(copy, tmp_path / "p1", shard="1/2")
    next((copy / "flickr30k_images").glob("img*.png")).unlink()  # the source changed between the two builds
    build(copy, tmp_path / "p2", shard="2/2")
    with pytest.raises(ConfigError) as exc:
        merge_datasets([tmp_path / "p1", tmp_path / "p2"], tmp_path / "out")
    one_line(exc, f"part {tmp_path / 'p2'} was cut from another listing")


def test_a_folder_keeps_its_shard_a_build_with_another_needs_overwrite(built, src, tmp_path, read_tree):
    part = shutil.copytree(built.parts[0], tmp_path / "part", copy_function=os.link)
    for other in ({"shard": f"2/{N}"}, {}):  # another part, or the whole build
        with pytest.raises(CrappifyError) as exc:
            build(src, part, **other)
        one_line(exc, "differs in: shard", "--overwrite")
    res = build(src, part, shard=f"1/{N}")  # the same part: everything reused
    assert res.reused == res.built + res.skipped - 1  # the listing-time skip is not an item
    assert read_tree(part) == read_tree(built.parts[0])


def test_a_part_with_no_items_is_an_ordinary_empty_dataset(src, tmp_path):
    res = build(src, tmp_path / "empty", shard="20/20")
    assert (res.built, res.skipped) == (0, 0)
    assert rows(tmp_path / "empty" / "manifest.csv") == []


@pytest.mark.parametrize("value", ["0/3", "4/3", "x", "3", "1/0", "-1/3", "1/3/3", "²/3"])
def test_a_bad_shard_is_a_one_line_config_error(value, tmp_path, capsys):
    with pytest.raises(ValueError):
        parse_shard(value)
    with pytest.raises(ConfigError) as exc:
        resolve(BuildConfig, None, src="samples", out=str(tmp_path / "out"), shard=value)
    one_line(exc, "option 'shard'", "K/N")
    with pytest.raises(SystemExit) as info:
        main(["build-dataset", "samples", str(tmp_path / "out"), "--shard", value, "--quiet"])
    assert info.value.code == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("crappify: error: option 'shard': ") and value in err
    assert not (tmp_path / "out").exists()


def test_shard_from_a_yaml_config_and_left_out_of_dumps_when_unset(tmp_path):
    config = tmp_path / "build.yaml"
    config.write_text("preset: srgan-x4\nshard: 2/8\n")
    cfg = resolve(BuildConfig, config, src="samples", out=str(tmp_path / "out"))
    assert cfg.shard == "2/8" and cfg.model_dump()["shard"] == "2/8"
    assert BuildConfig.model_validate(cfg.model_dump()) == cfg
    assert resolve(BuildConfig, None, src="samples", out="o", shard=" 2 / 8 ").shard == "2/8"
    assert "shard" not in BuildConfig(src="samples", out="o").model_dump()  # pipeline hashes stay as they were


def test_the_command_line_builds_a_part_and_merges_end_to_end(built, src, tmp_path, cli, read_tree):
    part2 = tmp_path / "part2"
    proc = cli("build-dataset", src, part2, "--shard", f"2/{N}", *CLI_OPTIONS)
    assert proc.returncode == 0, proc.stderr
    assert f"shard 2/{N}: join the parts with `crappify merge-datasets`" in proc.stdout
    assert read_tree(part2) == read_tree(built.parts[1])

    out = tmp_path / "merged"
    proc = cli("merge-datasets", built.parts[0], part2, built.parts[2], "-o", out)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.startswith(f"merged {N} parts: ") and "4 skipped" in proc.stdout, proc.stdout
    assert read_tree(out) == read_tree(built.whole)

    proc = cli("merge-datasets", built.parts[0], part2, "-o", tmp_path / "other")
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.splitlines() == [f"crappify: error: shard 3/{N} is missing: give all {N} parts"]
    proc = cli("build-dataset", src, tmp_path / "bad", "--shard", "0/3", "--quiet")
    assert proc.returncode == 2 and len(proc.stderr.splitlines()) == 1, proc.stderr
    assert proc.stderr.startswith("crappify: error: option 'shard': ")


def test_an_interrupted_part_resumes_to_the_same_bytes(built, src, tmp_path, read_tree, monkeypatch):
    import crappify.builder as builder_module

    real, calls = builder_module.process_item, []

    def crash_on_third(item, job):  # the part's build dies after journaling two items
        calls.append(item.id)
        if len(calls) == 3:
            raise KeyboardInterrupt
        return real(item, job)

    monkeypatch.setattr(builder_module, "process_item", crash_on_third)
    out = tmp_path / "part2"
    with pytest.raises(KeyboardInterrupt):
        build(src, out, shard=f"2/{N}")
    assert (out / JOURNAL).is_file() and not (out / "manifest.csv").exists()
    with pytest.raises(CrappifyError) as exc:  # an unfinished part is not merged
        merge_datasets([built.parts[0], out, built.parts[2]], tmp_path / "merged")
    one_line(exc, "is not finished")
    monkeypatch.undo()

    res = build(src, out, shard=f"2/{N}")
    assert res.reused == 2
    assert read_tree(out) == read_tree(built.parts[1])


def test_a_killed_part_resumes_and_merges_to_the_same_bytes(many_photo_dir, tmp_path, cli, cli_command, read_tree):
    """SIGKILL mid-build of part 2/2 of 160 photos (80 items, about a second of work), resumed from the command
    line; the parts merge into the single build's bytes."""
    base = ["build-dataset", str(many_photo_dir), "--preset", "realistic", "--seed", "7", "--quiet", "--workers", "1"]
    out = tmp_path / "part2"
    kill_after_journal_lines([*cli_command, *base[:2], str(out), *base[2:], "--shard", "2/2"], out / JOURNAL)
    assert not (out / "manifest.csv").exists()
    done = {json.loads(line)["id"] for line in (out / JOURNAL).read_text().splitlines()[:-1]}  # last: maybe cut
    again = cli(*base[:2], out, *base[2:], "--shard", "2/2")
    assert again.returncode == 0, again.stderr
    assert 80 > int(re.search(r"; (\d+) reused", again.stdout)[1]) >= len(done) >= 2, again.stdout

    cfg = {"preset": "realistic", "seed": 7, "split": (0.9, 0.05, 0.05)}
    build(many_photo_dir, tmp_path / "part1", shard="1/2", **cfg)
    merge_datasets([tmp_path / "part1", out], tmp_path / "merged")
    build(many_photo_dir, tmp_path / "whole", **cfg)
    whole, merged = read_tree(tmp_path / "whole"), read_tree(tmp_path / "merged")
    assert sorted(merged) == sorted(whole) and len([k for k in whole if k.startswith("lr/")]) == 160
    for name in whole:
        assert merged[name] == whole[name], name
