"""`crappify run`: a build-dataset stage that made nothing usable fails like `crappify build-dataset` does (one
line naming the dataset's skipped.csv, non-zero exit) and is not recorded as finished, so the next run tries it
again; so does one that left empty a split that a later stage of the pipeline reads."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from crappify.errors import CrappifyError
from crappify.standins import photo, write
from srgan.pipeline import load_pipeline, paths_of, plan, read_state, run_pipeline


def celeba(root: Path, partition: list[int]) -> Path:
    """A CelebA folder of 178x218 JPEGs, the i-th in split partition[i] (0 train, 1 valid, 2 test)."""
    for i in range(len(partition)):
        write(root / "img_align_celeba" / f"{i + 1:06d}.jpg", photo(i, 178, 218))
    (root / "list_eval_partition.txt").write_text("".join(f"{i + 1:06d}.jpg {p}\n" for i, p in enumerate(partition)))
    return root


def pipeline(tmp: Path, src: Path, build: dict | None = None, evaluate: dict | None = None) -> Path:
    data = {"name": "celeba-check", "out": str(tmp / "run"), "data": "a CelebA folder",
            "build-dataset": {"src": str(src), "source": "celeba", "out": str(tmp / "dataset"),
                              "preset": "srgan-x4", "size": 128, "workers": 1, **(build or {})},
            "train-gan": {"generator_arch": "srresnet", "critic_arch": "patch", "pretrained": False},
            "evaluate": evaluate or {}}
    path = tmp / "pipeline.yaml"
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return path


def test_a_build_stage_that_built_nothing_fails_and_is_retried(tmp_path, cli):
    """CelebA's 178x218 photos with an HR short side of 256 (never upscaled): every photo is skipped."""
    path = pipeline(tmp_path, celeba(tmp_path / "celeba", [0, 0, 1, 2]), {"size": 256})
    skipped = tmp_path / "dataset" / "skipped.csv"
    for _ in range(2):  # the second run does not skip the stage: it was not recorded as finished
        res = cli("run", path, "--to", "build-dataset", "--quiet")
        assert res.returncode == 1, res.stdout
        assert "Traceback" not in res.stderr and len(res.stderr.splitlines()) == 1, res.stderr
        assert "no pairs could be built" in res.stderr and str(skipped) in res.stderr
        assert read_state(paths_of(load_pipeline(path)).state, "build-dataset")["status"] == "running"
    assert [s.action for s in plan(load_pipeline(path), stop="build-dataset")] == ["resume"]


@pytest.mark.parametrize("partition, evaluate, missing", [
    ([0, 0, 2, 2], {}, "no valid pairs, which stage train-gan needs"),
    ([0, 0, 1, 1], {"split": "test"}, "no test pairs, which stage evaluate needs"),
    ([1, 1, 2, 2], {}, "no train pairs, which stage train-gan needs"),
])
def test_a_split_a_later_stage_reads_left_empty_fails_the_build_stage(tmp_path, partition, evaluate, missing):
    p = load_pipeline(pipeline(tmp_path, celeba(tmp_path / "celeba", partition), evaluate=evaluate))
    with pytest.raises(CrappifyError, match=missing) as exc:
        run_pipeline(p, stop="build-dataset", progress=False)  # the stages after --to count too
    assert "\n" not in str(exc.value) and str(tmp_path / "dataset" / "skipped.csv") in str(exc.value)
    assert read_state(paths_of(p).state, "build-dataset")["status"] == "running"


def test_evaluate_by_default_takes_valid_when_there_is_no_test_split(tmp_path):
    p = load_pipeline(pipeline(tmp_path, celeba(tmp_path / "celeba", [0, 0, 1, 1])))
    run_pipeline(p, stop="build-dataset", progress=False)
    assert read_state(paths_of(p).state, "build-dataset")["status"] == "done"
