"""`crappify demo`: the shipped `demo` pipeline (or another whose data are sample crops) end to end, then the
degradation preview of one sample photo, the results grid and the closing table.

`run_demo` does the work and reports through a callback, so the command is a thin wrapper and a notebook or
script can run the same thing.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from crappify.chain import load_preset
from crappify.errors import ConfigError
from crappify.imageio import decode, save_image_atomic
from crappify.preview import preview
from crappify.sources import sample_id, sample_photos
from srgan.inspection import demo_results
from srgan.pipeline import Step, find_pipeline, load_pipeline, run_pipeline

DEMO_OUT = Path("runs") / "demo"


@dataclass
class DemoResult:
    """What a demo run left behind: its output root, the pipeline's steps, the degradation preview (op by op,
    of sample photo `photo` under `preset`), the closing table and the results grid (LR | bicubic | generated |
    HR)."""

    out: Path
    steps: list[Step]
    photo: str
    preset: str
    preview: Path
    table: str
    results: Path

    def summary(self) -> str:
        return "\n".join([self.table,
                          f"degradation, op by op ({self.photo}, preset {self.preset}): {self.preview}",
                          f"results grid (LR | bicubic | generated | HR): {self.results}"])


def run_demo(pipeline: str | Path = "demo", out: str | Path | None = DEMO_OUT, *, device: str | None = None,
             precision: str | None = None, progress: bool = True,
             report: Callable[[str], None] = print) -> DemoResult:
    """Run `pipeline` (a shipped name or a YAML file with a sample-crops stage) into `out`, skipping finished
    stages; write OUT/preview.png and the results grid; `report` gets a header, one line per stage and the
    summary. `device`/`precision` override every training and evaluation stage (None: each stage's own)."""
    p = load_pipeline(find_pipeline(pipeline), None if out is None else str(out))
    if p.sample_crops is None:
        raise ConfigError(f"pipeline {p.name} has no sample-crops stage; use `crappify run` for it")
    report(f"crappify demo -> {p.out} (pipeline {pipeline}; device {device or 'auto'}, "
           f"precision {precision or 'per stage'})")
    steps = run_pipeline(p, progress=progress, overrides={"device": device, "precision": precision},
                         on_stage=lambda s: report(f"[{s.stage}] {s.action}: {s.reason}"))
    build = next(s.config for s in steps if s.stage == "build-dataset")
    name, path = sample_photos()[0]
    grid_path = Path(p.out) / "preview.png"
    save_image_atomic(grid_path, preview(decode(path), load_preset(build.preset), build.seed, None, build.scale,
                                         sample_id(name)))
    table, results = demo_results(Path(p.out))
    result = DemoResult(Path(p.out), steps, name, build.preset, grid_path, table, results)
    report(result.summary())
    return result
