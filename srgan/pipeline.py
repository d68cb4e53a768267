"""`crappify run PIPELINE.yaml`: the whole chain as one reproducible, resumable command.

A pipeline file names an output root and, per stage, the same keys as that command's `--config` file
(the paths between stages are filled in here). Stages run in a fixed order:

    sample-crops → build-dataset → train-gen → train-critic → train-gan → evaluate

Each stage's resolved config is hashed together with the hash of the stage before it, so a changed
option invalidates that stage and every later one, and nothing earlier. `OUT/.pipeline/<stage>.json`
records the hash and whether the stage finished: a finished stage with the same hash is skipped; one
that was interrupted (killed) with the same hash is resumed from its own checkpoints; anything else
runs from the start. Keys that only say how to run (devices, worker counts) are left out of the hash.

Under `torchrun` (one machine or several): the data-parallel stages (train-gen, train-critic, train-gan) run
on every rank; the others (sample-crops, build-dataset, evaluate) on rank 0 while the other ranks wait, and if
one of those fails every rank stops. Rank 0 alone holds the output's lock and writes the stage states; every
rank reads the same plan (taken before anything is written), so a resumed pipeline resumes on every rank.

`--smoke` (`load_pipeline(..., smoke=True)`) runs every stage of the recipe at toy size on the sample photos
that installed packages ship, into OUT-smoke: see `srgan.smoke.smoke_overrides` for what it changes.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from crappify.config import describe, non_default
from crappify.errors import ConfigError, CrappifyError, Interrupted
from crappify.imageio import write_atomic
from crappify.yamlfile import read_mapping
from srgan.runtime import MAX_CROP
from srgan.smoke import critic_min_size, smoke_overrides

if TYPE_CHECKING:
    from crappify.builder import Needs

# how to run, not what to compute (a checkpoint's frequency: a resume from any checkpoint ends the same)
RUN_ONLY_KEYS = frozenset({"workers", "num_workers", "device", "batch", "checkpoint_every", "compile", "log"})


def _shipped_pipelines() -> Path:
    """The shipped pipelines folder: `srgan/pipelines/` in an installed wheel (pyproject.toml maps the top-level
    `pipelines/` folder there as package data), or `pipelines/` beside a source checkout."""
    here = Path(__file__).resolve().parent
    installed = here / "pipelines"
    return installed if installed.is_dir() else here.parent / "pipelines"


PIPELINES_DIR = _shipped_pipelines()


class SampleCrops(BaseModel):
    """Options of the `sample-crops` stage (see `crappify.samples`)."""

    model_config = ConfigDict(extra="forbid")
    size: int = Field(128, ge=16, le=MAX_CROP)
    train: int = Field(320, ge=1)
    valid: int = Field(16, ge=1)
    test: int = Field(32, ge=0)
    zoom: tuple[float, float] = (0.5, 1.0)
    seed: int = Field(0, ge=0)


class Pipeline(BaseModel):
    """A pipeline file: where outputs go, what data it needs, and each stage's options."""

    model_config = ConfigDict(extra="forbid", populate_by_name=True)
    name: str
    description: str = ""
    out: str = Field(description="output root: dataset/, run/, eval/ and .pipeline/ go under it")
    data: str | None = Field(None, description="what the source must look like (shown when it is missing)")
    sample_crops: dict[str, Any] | None = Field(None, alias="sample-crops")
    build_dataset: dict[str, Any] = Field(alias="build-dataset")
    train_gen: dict[str, Any] | None = Field(None, alias="train-gen")  # none: train-gan builds new networks
    train_critic: dict[str, Any] | None = Field(None, alias="train-critic")
    train_gan: dict[str, Any] | None = Field(None, alias="train-gan")
    evaluate: dict[str, Any] | None = None
    seed: int = Field(0, ge=0, description="the seed of every stage that does not set its own (`--seed`)")
    smoke: bool = Field(False, description="run every stage at toy size on the sample photos (srgan.smoke)")
    rehearse: bool = Field(False, description="a rehearsal (srgan.rehearse): its dataset goes inside its own out")
    standin: str | None = Field(None, description="the real source's layout, for a rehearsal without it "
                                                  "(crappify.standins: celeba, flickr30k, celeba-hq, df2k, coco)")


@dataclass(frozen=True)
class Step:
    """One stage of a loaded pipeline: its validated config and what to do with it."""

    stage: str
    config: BaseModel
    hash: str
    action: str  # skip | run | resume | rerun
    reason: str


@dataclass(frozen=True)
class Paths:
    root: Path
    dataset: Path
    run: Path
    eval: Path
    crops: Path
    state: Path


def paths_of(p: Pipeline) -> Paths:
    root = Path(p.out)
    # a smoke run or a rehearsal builds its dataset inside its own output root, never where the recipe's goes
    dataset = root / "dataset" if p.smoke or p.rehearse else Path(p.build_dataset.get("out") or root / "dataset")
    return Paths(root, dataset, root / "run", root / "eval", root / "crops", root / ".pipeline")


def find_pipeline(name: str | Path) -> Path:
    """A pipeline file by path, or by name from the shipped `pipelines/` folder ('demo' → demo.yaml)."""
    path = Path(name)
    if path.is_file():
        return path
    shipped = PIPELINES_DIR / f"{name}.yaml"
    if shipped.is_file():
        return shipped
    names = sorted(p.stem for p in PIPELINES_DIR.glob("*.yaml")) if PIPELINES_DIR.is_dir() else []
    raise ConfigError(f"pipeline not found: {name} (a YAML file, or one of: {', '.join(names) or 'none shipped'})")


def load_pipeline(path: str | Path, out: str | None = None, smoke: bool = False, seed: int | None = None) -> Pipeline:
    """Read and validate a pipeline file (unknown keys are errors); `out` overrides its output root, `seed` its
    seed. `smoke`: the toy-size run of it (srgan.smoke), into `out` when given, else into the file's out + '-smoke'."""
    raw = dict(read_mapping(Path(path), "pipeline file"))
    if seed is not None:
        raw["seed"] = seed
    if smoke:
        raw["smoke"] = True
        if out is None and isinstance(raw.get("out"), str):
            out = smoke_out(raw["out"])
    if out is not None:
        raw["out"] = out
    try:
        p = Pipeline.model_validate(raw)
    except ValidationError as exc:
        raise ConfigError(f"{path}: {describe(exc, Pipeline)}") from None
    preset = p.build_dataset.get("preset")
    if isinstance(preset, str) and preset.endswith((".yaml", ".yml")) and not Path(preset).is_absolute():
        beside = Path(path).resolve().parent / preset  # a preset file named relative to the pipeline file
        if beside.is_file():
            p.build_dataset["preset"] = str(beside)
    return p


def smoke_out(out: str) -> str:
    """Where a smoke run of a pipeline whose output root is `out` goes by default: beside it, never in it."""
    return f"{out.rstrip('/')}-smoke"


def as_smoke(p: Pipeline) -> Pipeline:
    """`p` as a smoke run (into its out + '-smoke'); `p` itself when it already is one."""
    return p if p.smoke else p.model_copy(update={"smoke": True, "out": smoke_out(p.out)})


# ------------------------------------------------------------------------------------------------------
# stage configs: the pipeline's section for a stage plus the paths that connect the stages


def _validate(stage: str, cls: type[BaseModel], values: dict[str, Any]) -> BaseModel:
    try:
        return cls.model_validate(values)
    except ValidationError as exc:
        raise ConfigError(f"stage {stage}: {describe(exc, cls)}") from None


def _reject(stage: str, section: dict[str, Any], keys: tuple[str, ...]) -> None:
    given = sorted(set(section) & set(keys))
    if given:
        raise ConfigError(f"stage {stage}: {', '.join(given)} set by the pipeline (it connects the stages)")


def stage_configs(p: Pipeline, overrides: dict[str, Any] | None = None) -> dict[str, BaseModel]:
    """Each present stage's validated config, in order. A stage that does not set its own `seed` takes the
    pipeline's. `overrides` (e.g. device) apply to every stage that has the key. A smoke pipeline's configs are
    shrunk by `srgan.smoke.smoke_overrides` (overrides still win)."""
    from crappify.builder import BuildConfig
    from srgan.evaluate import EvaluateConfig
    from srgan.train_critic import TrainCriticConfig
    from srgan.train_gan import TrainGanConfig
    from srgan.train_gen import TrainGenConfig

    paths = paths_of(p)
    overrides = {k: v for k, v in (overrides or {}).items() if v is not None}

    def section(cls: type[BaseModel], values: dict[str, Any]) -> dict[str, Any]:
        seeded = {"seed": p.seed} if "seed" in cls.model_fields and "seed" not in values else {}
        return {**seeded, **values, **{k: v for k, v in overrides.items() if k in cls.model_fields}}

    cfgs: dict[str, BaseModel] = {}
    if p.sample_crops is not None:
        cfgs["sample-crops"] = _validate("sample-crops", SampleCrops, section(SampleCrops, p.sample_crops))
    build = dict(p.build_dataset)
    if p.sample_crops is not None:
        _reject("build-dataset", build, ("src",))
        build["src"] = str(paths.crops)
    build["out"] = str(paths.dataset)
    cfgs["build-dataset"] = _validate("build-dataset", BuildConfig, section(BuildConfig, build))
    for stage, cls, values in (("train-gen", TrainGenConfig, p.train_gen),
                               ("train-critic", TrainCriticConfig, p.train_critic),
                               ("train-gan", TrainGanConfig, p.train_gan)):
        if values is None:
            continue
        _reject(stage, values, ("data", "out"))
        values = {**values, "data": str(paths.dataset), "out": str(paths.run)}
        gen = cfgs.get("train-gen")
        if stage == "train-gan" and getattr(gen, "ema", False) and not (values.get("generator")
                                                                        or values.get("generator_arch")):
            # the GAN starts from train-gen's EMA weights, as Real-ESRGAN starts from Real-ESRNet's params_ema
            values["generator"] = str(paths.run / "generator-ema.safetensors")
        cfgs[stage] = _validate(stage, cls, section(cls, values))
    _check_inputs(cfgs)
    if p.evaluate is not None:
        _reject("evaluate", p.evaluate, ("data", "out", "models", "result"))
        made = generator_files(cfgs, paths)
        values = {"names": list(made), **p.evaluate, "data": str(paths.dataset),
                  "models": [str(f) for f in made.values()], "out": str(paths.eval),
                  "result": list(made)[-1] if made else None}
        cfgs["evaluate"] = _validate("evaluate", EvaluateConfig, section(EvaluateConfig, values))
    if p.smoke:  # toy sizes (the run-wide overrides applied again on top: they win)
        critic = cfgs.get("train-critic")
        critic_min = critic_min_size(critic.arch, critic.options) if critic is not None else 0
        for stage, cfg in cfgs.items():
            small = smoke_overrides(stage, cfg, critic_min=critic_min, crops="sample-crops" in cfgs)
            cfgs[stage] = _validate(stage, type(cfg), section(type(cfg), small.model_dump()))
    return cfgs


def dataset_needs(p: Pipeline) -> list[tuple[tuple[str, ...], str]]:
    """The splits the pipeline's later stages read from its dataset, as `crappify.builder.check_built` takes them:
    the training stages train on `train` and validate on `valid`; evaluate scores its `split` (default test,
    else valid, as `srgan.evaluate` picks)."""
    needs: list[tuple[tuple[str, ...], str]] = []
    training = [s for s in ("train-gen", "train-critic", "train-gan") if getattr(p, s.replace("-", "_")) is not None]
    if training:
        needs += [(("train",), f"stage {training[0]}"), (("valid",), f"stage {training[0]}")]
    if p.evaluate is not None:
        split = p.evaluate.get("split")
        needs.append(((split,) if isinstance(split, str) else ("test", "valid"), "stage evaluate"))
    return needs


def generator_files(cfgs: dict[str, BaseModel], paths: Paths) -> dict[str, Path]:
    """The generator files the pipeline's training stages write, by the name evaluate reports them under, in
    order: train-gen's, then its EMA copy (`ema: true`), then the GAN's and its EMA copy. The last one is the
    recipe's result: what a recipe with EMA hands on is its EMA generator, as in Real-ESRGAN (`params_ema`)."""
    files: dict[str, Path] = {}
    for stage, folder in (("train-gen", paths.run), ("train-gan", paths.run / "gan")):
        cfg = cfgs.get(stage)
        if cfg is None:
            continue
        files[stage] = folder / "generator.safetensors"
        if getattr(cfg, "ema", False):
            files[f"{stage}-ema"] = folder / "generator-ema.safetensors"
    return files


def result_file(p: Pipeline) -> Path | None:
    """The file a pipeline's recipe produces (see `generator_files`); None when it trains no generator."""
    made = generator_files(stage_configs(p), paths_of(p))
    return list(made.values())[-1] if made else None


def _check_inputs(cfgs: dict[str, BaseModel]) -> None:
    """Each training stage's networks come from an earlier stage, a file named in its config, or its arch
    options (a joint GAN from scratch): a pipeline that leaves one without is refused before anything runs."""
    gen, gan = "train-gen" in cfgs, cfgs.get("train-gan")
    if "train-critic" in cfgs and not gen:
        raise ConfigError("stage train-critic needs a train-gen stage (it learns from the generator's outputs)")
    if gan is not None and not gen and not (gan.generator_arch or gan.generator):
        raise ConfigError("stage train-gan has no generator: add a train-gen stage, or generator_arch "
                          "(a new generator) or generator (a file) to train-gan")
    if gan is not None and "train-critic" not in cfgs and not (gan.critic_arch or gan.critic):
        raise ConfigError("stage train-gan has no critic: add a train-critic stage, or critic_arch "
                          "(a new critic) or critic (a file) to train-gan")


def stage_hash(stage: str, cfg: BaseModel, upstream: str) -> str:
    """What a stage computes: its config (less run-only keys, and options left at their defaults, so that an
    option added later with a default that keeps the old behaviour does not re-run finished stages) chained to
    the stage before it."""
    values = non_default(cfg, RUN_ONLY_KEYS)
    blob = json.dumps({"stage": stage, "config": values, "upstream": upstream}, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


# ------------------------------------------------------------------------------------------------------
# planning and running


def read_state(state_dir: Path, stage: str) -> dict[str, Any]:
    """What `OUT/.pipeline/<stage>.json` records (empty when the stage never started)."""
    f = state_dir / f"{stage}.json"
    try:
        return json.loads(f.read_text())
    except (OSError, ValueError):
        return {}


def _write_state(paths: Paths, stage: str, state: dict[str, Any]) -> None:
    paths.state.mkdir(parents=True, exist_ok=True)
    write_atomic(paths.state / f"{stage}.json", json.dumps(state, indent=1, sort_keys=True) + "\n")


def plan(p: Pipeline, start: str | None = None, stop: str | None = None,
         overrides: dict[str, Any] | None = None) -> list[Step]:
    """What `run` would do, stage by stage. `start` re-runs from that stage on (the stages before it must
    be finished); `stop` ends after that stage."""
    for name in (start, stop):
        if name is not None and name not in STAGES:
            raise ConfigError(f"unknown stage {name!r}; valid: {', '.join(STAGES)}")
    cfgs = stage_configs(p, overrides)
    for name in (start, stop):
        if name is not None and name not in cfgs:
            raise ConfigError(f"stage {name!r} is not in pipeline {p.name}; it has: {', '.join(cfgs)}")
    paths = paths_of(p)
    steps: list[Step] = []
    upstream, invalid, started, stopped = "", False, start is None, False
    for stage, cfg in cfgs.items():
        h = stage_hash(stage, cfg, upstream)
        upstream = h
        if stopped:
            break
        started = started or stage == start
        state = read_state(paths.state, stage)
        same = state.get("hash") == h
        missing = state.get("status") == "done" and not _outputs_exist(stage, paths)
        done = same and state.get("status") == "done" and not invalid and not missing
        if not started:
            if not done:
                raise CrappifyError(f"cannot start at {start}: stage {stage} has not finished with this config "
                                    "(run without --from first)")
            action, reason = "skip", "finished earlier (before --from)"
        elif done and start is None:
            action, reason = "skip", "finished earlier with the same config"
        elif same and not invalid and state.get("status") == "running" and start != stage:
            action, reason = "resume", "interrupted earlier; continues from its checkpoints"
        elif state:
            action = "rerun"
            reason = ("--from" if started and start is not None and done else
                      "an earlier stage changed" if invalid else
                      "its outputs are missing" if missing and same else "its config changed")
        else:
            action, reason = "run", "not run yet"
        invalid = invalid or action in ("run", "rerun")
        steps.append(Step(stage, cfg, h, action, reason))
        stopped = stage == stop
    return steps


def _outputs_exist(stage: str, paths: Paths) -> bool:
    """Whether what a finished stage made is still there (a deleted output means running it again)."""
    return STAGE_TABLE[stage].output(paths).exists()


def _run_stage(step: Step, paths: Paths, progress: bool, needs: Needs = (), cbs: list | None = None) -> None:
    """Run one stage (resuming where asked and where the stage left a checkpoint). A dataset without pairs, or
    without those of a split that `needs` (`dataset_needs`) names, fails the stage, so it is not recorded done.
    `cbs`: extra fastai callbacks for a training stage (the rehearsal's step timer)."""
    kind = STAGE_TABLE[step.stage]
    checkpoint = kind.checkpoint(paths) if kind.checkpoint is not None else None
    resume = step.action == "resume" and checkpoint is not None and checkpoint.is_file()
    kind.run(step, paths, resume, progress, needs, cbs)


def _sample_crops(step: Step, paths: Paths, resume: bool, progress: bool, needs: Needs, cbs: list | None) -> None:
    from crappify.samples import CropPlan, cut_sample_crops

    cut_sample_crops(paths.crops, CropPlan(**step.config.model_dump()))


def _build_dataset(step: Step, paths: Paths, resume: bool, progress: bool, needs: Needs, cbs: list | None) -> None:
    from crappify.builder import build_dataset, check_built

    # Only a dataset this pipeline built before is rebuilt over; any other OUT is reused when it was
    # built with the same config and refused otherwise (it may be the user's).
    check_built(build_dataset(step.config, overwrite=step.action == "rerun", progress=progress), step.config, needs)


def _train_gen(step: Step, paths: Paths, resume: bool, progress: bool, needs: Needs, cbs: list | None) -> None:
    from srgan.train_gen import Trainer

    Trainer(step.config, resume=resume, progress=progress, cbs=cbs).fit()


def _train_critic(step: Step, paths: Paths, resume: bool, progress: bool, needs: Needs, cbs: list | None) -> None:
    from srgan.train_critic import train_critic

    train_critic(step.config, resume=resume, progress=progress, cbs=cbs)


def _train_gan(step: Step, paths: Paths, resume: bool, progress: bool, needs: Needs, cbs: list | None) -> None:
    from srgan.train_gan import train_gan

    train_gan(step.config, resume=resume, progress=progress, cbs=cbs)


def _evaluate(step: Step, paths: Paths, resume: bool, progress: bool, needs: Needs, cbs: list | None) -> None:
    from srgan.evaluate import evaluate

    evaluate(step.config, progress=progress)


@dataclass(frozen=True)
class StageKind:
    """What the pipeline knows of a stage: how to run it, what a finished one leaves, where it checkpoints, and
    whether it runs on every rank under torchrun (the data-parallel training stages) or on rank 0 alone."""

    name: str
    run: Callable[[Step, Paths, bool, bool, Needs, list | None], None]  # (step, paths, resume, progress, needs, cbs)
    output: Callable[[Paths], Path]
    checkpoint: Callable[[Paths], Path] | None = None
    data_parallel: bool = False


STAGE_TABLE: dict[str, StageKind] = {kind.name: kind for kind in (
    StageKind("sample-crops", _sample_crops, lambda p: p.crops / "train"),
    StageKind("build-dataset", _build_dataset, lambda p: p.dataset / "manifest.csv"),
    StageKind("train-gen", _train_gen, lambda p: p.run / "generator.safetensors",
              lambda p: p.run / "checkpoints" / "last.pt", True),
    StageKind("train-critic", _train_critic, lambda p: p.run / "critic.safetensors",
              lambda p: p.run / "critic-checkpoints" / "last.pt", True),
    StageKind("train-gan", _train_gan, lambda p: p.run / "gan" / "generator.safetensors",
              lambda p: p.run / "gan" / "checkpoints" / "last.pt", True),
    StageKind("evaluate", _evaluate, lambda p: p.eval / "report.md"),
)}
STAGES = tuple(STAGE_TABLE)  # the order they run in
DATA_PARALLEL = frozenset(name for name, kind in STAGE_TABLE.items() if kind.data_parallel)


def run_pipeline(p: Pipeline, start: str | None = None, stop: str | None = None, progress: bool = True,
                 overrides: dict[str, Any] | None = None,
                 on_stage: Callable[[Step], None] | None = None, smoke: bool = False) -> list[Step]:
    """Run the planned stages in order; returns the plan that was carried out. `smoke`: run `as_smoke(p)`
    (toy sizes, into p.out + '-smoke'; load the pipeline with `smoke=True` to choose the folder). Under torchrun:
    see the module docstring."""
    from crappify.runlock import folder_lock
    from srgan.distributed import barrier, hold_group, is_distributed, is_main, join, local_device
    from srgan.runtime import resolve_device

    if smoke:
        p = as_smoke(p)
    steps = plan(p, start, stop, overrides)
    paths = paths_of(p)
    check_data(p, steps)
    if is_distributed():  # one process group for every stage, on the first training stage's device
        training = next((s for s in steps if s.stage in DATA_PARALLEL and s.action != "skip"), None)
        join(local_device(resolve_device(training.config.device if training else "auto")))
    with hold_group():  # the stages share one process group, left when the pipeline ends
        barrier()  # every rank has read the plan before rank 0 writes a state
        # a second `crappify run` on OUT fails with one line (rank 0 holds the lock for all)
        with folder_lock(paths.root, "pipeline run") if is_main() else contextlib.nullcontext():
            _run_steps(p, steps, paths, progress, on_stage)
    return steps


def _run_steps(p: Pipeline, steps: list[Step], paths: Paths, progress: bool,
               on_stage: Callable[[Step], None] | None) -> None:
    from srgan.distributed import is_main

    main = is_main()
    recipe = p.model_dump(by_alias=True)
    for key in ("smoke", "rehearse", "standin"):  # unchanged for ordinary runs; a smoke run records `smoke: true`
        if not recipe.get(key):
            recipe.pop(key, None)
    if main:
        write_atomic(paths.root / "pipeline.yaml", yaml.safe_dump(recipe, sort_keys=False))
    smoke = {"smoke": True} if p.smoke else {}
    needs = dataset_needs(p)
    for step in steps:
        if on_stage is not None and main:
            on_stage(step)
        if step.action == "skip":
            continue
        config = step.config.model_dump(mode="json")
        if main:
            _write_state(paths, step.stage, {"hash": step.hash, "status": "running", "config": config,
                                             "started": time.strftime("%Y-%m-%dT%H:%M:%S"), **smoke})
        t0 = time.perf_counter()
        try:
            if step.stage in DATA_PARALLEL:
                _run_stage(step, paths, progress and main)
            else:
                _on_rank_zero(step, paths, progress, needs)
        except Interrupted as exc:  # SIGTERM: the stage saved where it was and stays "running", to be resumed
            raise Interrupted(f"pipeline {p.name}: {exc.where}", "run the same command again to continue") from None
        if main:
            _write_state(paths, step.stage, {"hash": step.hash, "status": "done", "config": config,
                                             "seconds": round(time.perf_counter() - t0, 2),
                                             "finished": time.strftime("%Y-%m-%dT%H:%M:%S"), **smoke})


def _on_rank_zero(step: Step, paths: Paths, progress: bool, needs: Needs) -> None:
    """A stage that runs in one process: rank 0 runs it while the others wait; a failure stops every rank."""
    from srgan.distributed import any_rank, is_main, joined

    if not joined():
        _run_stage(step, paths, progress, needs)
        return
    error: BaseException | None = None
    if is_main():
        try:
            _run_stage(step, paths, progress, needs)
        except BaseException as exc:  # re-raised below, once the other ranks know
            error = exc
    if any_rank(error is not None):  # also the barrier the other ranks wait at
        if error is not None:
            raise error
        raise CrappifyError(f"stage {step.stage} failed on rank 0 (its message is in rank 0's output)")


def check_data(p: Pipeline, steps: list[Step]) -> None:
    """Before anything runs: the source a pending build-dataset needs must be there, in its layout."""
    from crappify.sources import SOURCES, detect

    step = next((s for s in steps if s.stage == "build-dataset" and s.action != "skip"), None)
    if step is None or p.sample_crops is not None:
        return
    cfg = step.config
    src = Path(cfg.src)
    if cfg.src == "samples" and cfg.source in ("auto", "samples"):
        return
    hint = f" (expected: {p.data})" if p.data else " (see data/README.md)"
    if not src.is_dir():
        raise CrappifyError(f"pipeline {p.name} needs its source data at {src}{hint}")
    kind = detect(src) if cfg.source == "auto" else cfg.source
    try:
        listing = SOURCES.get(kind)(src)
    except CrappifyError as exc:
        raise CrappifyError(f"pipeline {p.name}: {exc}{hint}") from None
    if not listing.items:
        raise CrappifyError(f"pipeline {p.name}: no images found in {src}{hint}")
