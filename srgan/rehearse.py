"""`crappify run PIPELINE --rehearse`: every stage of a recipe at its real settings for a few steps on this device,
with the time each step takes, the memory it needs and an estimate of the whole run — before a day of GPU time.

What runs is the recipe's own configuration (crop sizes and batches of every progressive stage, networks, losses,
precision, loader workers, frozen then unfrozen phases, EMA), changed only in length: each training phase stops
after `steps` batches (a fastai callback, `StepTimer`, which also times them), train-gan runs enough steps for
both networks to train (as `--smoke` picks them), evaluate scores a few pairs. Each training stage is stopped
after its first step the way SIGTERM stops it (a checkpoint written there) and resumed from that checkpoint, so a
checkpoint the real run cannot read back shows up now, not after a preemption. The data is the recipe's real
source when it is there (its first photos, through the real listing, split and size filter), else a stand-in in
the real dataset's layout and geometry (`crappify.standins`). Missing pretrained weights (offline, say) make a
stage rehearse with random weights, with one note. Everything is written under the rehearsal's own output
(default: the recipe's `out` + `-rehearse`), never into the recipe's output or dataset folders.

Per stage it reports the median seconds per step (the wait for its batch included) after the first (warm-up)
step of each shape, images per second, the share of time spent waiting for the data loader, the peak memory
(the process's resident set; on CUDA also `max_memory_allocated`), and the estimated wall time of the full stage
on this device: its steps at the measured rates (counted from the real dataset's size: the source's photos, or
the real dataset's published count for a stand-in), plus its validation passes; evaluate runs twice (1 pair, then
4) so that its start-up is counted once and only the per-pair time scales. `OUT/rehearsal.json` keeps it all.
"""

from __future__ import annotations

import contextlib
import json
import math
import signal
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from pydantic import BaseModel

from crappify.errors import ConfigError, CrappifyError, Interrupted
from crappify.imageio import write_atomic
from srgan.pipeline import STAGE_TABLE, Pipeline, Step, _run_stage, paths_of, stage_configs
from srgan.smoke import GAN_ITERS

DEFAULT_STEPS = 5  # 4 timed after the warm-up step: 2 gave estimates 40 % apart from run to run on a CPU
EVAL_PAIRS = 4
LAYOUT_OF_SOURCE = {"celeba": "celeba", "flickr30k": "flickr30k", "celeba-hq": "celeba-hq"}
CELEBA_TRAIN_SHARE = 162_770 / 202_599  # the official partition's train share (list_eval_partition.txt)


@dataclass
class StageReport:
    """One stage's rehearsal: what was measured, and the estimate for the full stage."""

    stage: str
    seconds: float  # the rehearsal's wall time for the stage
    steps: int = 0  # training steps timed
    step_seconds: float | None = None  # median s/step after warm-up, its batch's wait included (slowest shape)
    images_per_second: float | None = None
    loader_wait: float | None = None  # share of the training time spent waiting for batches
    peak_rss_mib: float | None = None
    peak_gpu_mib: float | None = None
    eta_seconds: float | None = None  # the full stage on this device
    resumed: bool | None = None  # a training stage: stopped after its first step, resumed from its checkpoint
    shapes: dict[str, float] = field(default_factory=dict)  # "size x bs (phase)" -> median s/step
    warmup_only: bool = False  # some shape was timed once only: its time includes warm-up (more --rehearse-steps)
    note: str = ""


def _step_timer(limit: int | None, resume: bool = False) -> Any:
    """A fastai callback timing every training batch (and the loader's wait before it) and every validation pass;
    with `limit`, each fit's training stops after that many batches (`CancelTrainException` at the next batch's
    start, so every callback has seen the last one: validation, the epoch's end and its checkpoint still run).
    train-gan counts its own steps (and ends the fit after its last one, at order 55): its steps are not cut.
    With `resume`, the stage is stopped after its first step as SIGTERM stops it (a checkpoint written there),
    to be resumed from that checkpoint by the rehearsal (`part` 1); the resumed fit counts its steps afresh."""
    import torch
    from fastai.callback.core import Callback, CancelTrainException

    from srgan.runtime import StopRequest

    class StepTimer(Callback):
        # before fastai's MixedPrecision (10) enters autocast in before_batch, so a cancelled batch leaves none
        # entered; and it sees each batch's end before train-gan's Progress (55) may end the fit there
        order = 5

        def __init__(self) -> None:
            # (shape, seconds, loader wait, images, part): part 1 is the resumed run (its first step warms up again)
            self.records: list[tuple[str, float, float, int, int]] = []
            self.valid: list[tuple[float, int]] = []  # (seconds, items)
            self._n, self._last, self._t0, self._wait, self._v0 = 0, 0.0, 0.0, 0.0, None
            self.part = 0  # 1: the resumed run (not `run`: fastai reads that to switch a callback off)
            self.stop_after = 1 if resume else 0  # ask the stage to stop (as SIGTERM does) after this many steps
            self.stopped = False  # the stage was asked to stop by this timer (so its `Interrupted` is ours)

        def before_train(self) -> None:
            self._n, self._last = 0, time.perf_counter()

        def before_batch(self) -> None:
            if not self.training:
                return
            if limit and self._n >= limit and not hasattr(self.learn, "gan_trainer"):
                raise CancelTrainException()
            now = time.perf_counter()
            self._t0, self._wait = now, now - self._last

        def after_batch(self) -> None:
            if not self.training:
                return
            target = self.yb[0] if self.yb else self.xb[0]
            if target.is_cuda:
                torch.cuda.synchronize(target.device)
            now = time.perf_counter()
            self.records.append((self._shape(target), now - self._t0, self._wait, len(target), self.part))
            self._last, self._n = now, self._n + 1
            if self.part == 0 and self.stop_after and len(self.records) == self.stop_after:
                self._request_stop()

        def _request_stop(self) -> None:
            """What SIGTERM does (the stage's handler is a `StopRequest`): at this batch's end the stage writes a
            checkpoint where it is and stops with `Interrupted`; the rehearsal then resumes it from that file."""
            handler = signal.getsignal(signal.SIGTERM)
            if isinstance(handler, StopRequest):  # not installed outside the main thread: no resume rehearsed
                handler.requested, self.stopped = True, True

        def _shape(self, target: torch.Tensor) -> str:
            gan = getattr(self.learn, "gan_trainer", None)
            if gan is not None:  # per-batch switching: the critic steps inside the generator's batch
                both = any(type(cb).__name__ == "PerBatchCritic" for cb in self.learn.cbs)
                return "generator + critic" if both else "generator" if gan.gen_mode else "critic"
            phase = getattr(self.learn, "crappify_phase", None)
            side = self.xb[0].shape[-1] if target.ndim < 4 else target.shape[-1]
            frozen = " frozen" if phase is not None and phase.frozen else ""
            return f"{side} px x {len(target)}{frozen}"

        def before_validate(self) -> None:
            self._v0 = time.perf_counter()

        def after_validate(self) -> None:
            if self._v0 is not None:
                self.valid.append((time.perf_counter() - self._v0, len(self.dl.dataset)))
            self._v0 = None

    return StepTimer()


# ------------------------------------------------------------------------------------------------------
# memory


def _reset_peaks(device: Any) -> None:
    with contextlib.suppress(OSError):  # Linux: reset the resident-set high-water mark (VmHWM)
        Path("/proc/self/clear_refs").write_text("5")
    if getattr(device, "type", "cpu") == "cuda":
        import torch

        torch.cuda.reset_peak_memory_stats(device)


def _peaks(device: Any) -> tuple[float | None, float | None]:
    rss = None
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                rss = int(line.split()[1]) / 1024
    except OSError:
        import resource

        rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    gpu = None
    if getattr(device, "type", "cpu") == "cuda":
        import torch

        gpu = torch.cuda.max_memory_allocated(device) / 2 ** 20
    return rss, gpu


# ------------------------------------------------------------------------------------------------------
# the rehearsal's data and configs


def rehearsal_out(out: str) -> str:
    """Where a rehearsal of a pipeline whose output root is `out` goes by default: beside it, never in it."""
    return f"{out.rstrip('/')}-rehearse"


def _largest_batch(cfgs: dict[str, BaseModel]) -> int:
    sizes = [1]
    for stage in ("train-gen", "train-critic", "train-gan"):
        cfg = cfgs.get(stage)
        if cfg is None:
            continue
        if stage == "train-gen":
            cfg = cfg.resolved()
            sizes += [st.bs for st in cfg.schedule() if isinstance(st.bs, int)]
        elif isinstance(cfg.bs, int):
            sizes.append(cfg.bs)
    return max(sizes)


@dataclass
class Data:
    """Where the rehearsal's photos come from, and how many photos the real run will read."""

    src: str | None  # the build's source (None: the recipe's own, sample crops)
    photos: int  # photos the rehearsal builds from
    real_photos: int  # photos the real run's source holds
    what: str


def _data(p: Pipeline, cfgs: dict[str, BaseModel], root: Path, steps: int, report: Callable[[str], None],
          max_batch: int | None = None) -> Data:
    """The rehearsal's source: the recipe's, limited to enough photos for `steps` batches of the largest batch
    (and a few for validation and evaluation), or a stand-in of the real layout with that many photos."""
    from crappify.sources import SOURCES, detect
    from crappify.standins import STANDINS, make_standin

    build = cfgs["build-dataset"]
    if "sample-crops" in cfgs:  # the recipe cuts its own data from the sample photos: the real thing, run whole
        crops = cfgs["sample-crops"]
        return Data(None, crops.train + crops.valid + crops.test, crops.train + crops.valid + crops.test,
                    "the recipe's own sample crops")
    train_share = build.split[0] if build.source != "celeba" else CELEBA_TRAIN_SHARE
    # the first phase runs steps + 1 batches of one epoch (stopped after its first, then resumed)
    need = math.ceil(_capped(_largest_batch(cfgs), max_batch) * (steps + 1) / max(train_share, 0.5) * 1.1) + 6
    src = Path(build.src)
    if build.src == "samples" or src.is_dir():
        kind = "samples" if build.src == "samples" else (detect(src) if build.source == "auto" else build.source)
        try:
            listing = SOURCES.get(kind)(src)
        except CrappifyError as exc:
            raise CrappifyError(f"pipeline {p.name}: {exc}") from None
        if listing.items:
            return Data(build.src, min(need, len(listing.items)), len(listing.items),
                        f"the recipe's source {build.src} ({len(listing.items)} photos; the first {need} or so)")
    layout = p.standin or LAYOUT_OF_SOURCE.get(build.source)
    if layout is None:
        raise CrappifyError(f"pipeline {p.name}: its source {build.src} is not there and it names no stand-in layout "
                            f"to rehearse on: add `standin:` ({', '.join(STANDINS)}) to the pipeline file")
    if layout not in STANDINS:
        raise ConfigError(f"pipeline {p.name}: unknown stand-in {layout!r}; valid: {', '.join(STANDINS)}")
    folder = root / "standin"
    if not folder.is_dir() or not any(folder.iterdir()):
        report(f"rehearse: {build.src} is not here; making a stand-in of {STANDINS[layout].what}, {need} photos, "
               f"in {folder}")
        tmp = root / ".standin-partial"
        import shutil

        shutil.rmtree(tmp, ignore_errors=True)  # ours: a stand-in interrupted half-way
        make_standin(layout, tmp, need)
        tmp.rename(folder)
    return Data(str(folder), need, STANDINS[layout].photos,
                f"a stand-in of {STANDINS[layout].what} ({need} photos; the real one has {STANDINS[layout].photos})")


def _capped(bs: Any, max_batch: int | None) -> Any:
    return min(bs, max_batch) if max_batch and isinstance(bs, int) else bs


def _shortened(stage: str, cfg: BaseModel, steps: int, max_batch: int | None = None) -> BaseModel:
    """`cfg` at its real settings, only shorter: one epoch per phase (the step timer cuts it), train-gan's steps as
    `--smoke` picks them (both networks train) but at least `steps`, evaluate on a few pairs. `max_batch` caps
    every batch (a structural check: crop sizes, networks, losses and phases stay the recipe's)."""
    values = cfg.model_dump()
    changes: dict[str, Any] = {}
    if "bs" in values and stage != "evaluate":
        changes["bs"] = _capped(values["bs"], max_batch)
    if stage == "train-gen":
        if values.get("stages"):
            changes["stages"] = [{**st, "epochs": 1, "bs": _capped(st.get("bs"), max_batch)}
                                 for st in values["stages"]]
        else:
            changes["epochs"] = 1
    elif stage == "train-critic":
        changes["epochs"] = 1
    elif stage == "train-gan":
        switching = values.get("switching")
        iters = (values.get("n_crit", 1) + values.get("n_gen", 1) if switching == "fixed"
                 else GAN_ITERS.get(switching, 2))
        iters = max(iters, steps + 2)  # resumed after step 1, each network's first step then warms up again
        changes.update(iters=iters, checkpoint_every=iters)
        if switching == "adaptive":
            changes["gen_first"] = True  # a critic at chance may never hand over to the generator in a few steps
    elif stage == "evaluate":
        changes.update(limit=min(values.get("limit") or EVAL_PAIRS, EVAL_PAIRS), grids=min(values.get("grids", 1), 1))
    return type(cfg).model_validate({**values, **changes})


# ------------------------------------------------------------------------------------------------------
# estimates


def _median_after_warmup(records: list[tuple[str, float, float, int, int]]) -> dict[str, float]:
    """Median seconds per step of each shape, the wait for its batch included (a step of the real run waits
    too), leaving out each shape's first step in each run (the resumed run warms up again) when there are more."""
    firsts: dict[str, list[float]] = {}
    timed: dict[str, list[float]] = {}
    seen: set[tuple[str, int]] = set()
    for shape, seconds, wait, _n, run in records:
        if (shape, run) in seen:
            timed.setdefault(shape, []).append(seconds + wait)
        else:
            seen.add((shape, run))
            firsts.setdefault(shape, []).append(seconds + wait)
    return {shape: statistics.median(timed.get(shape) or times) for shape, times in firsts.items()}


def _gan_steps(records: list[tuple[str, float, float, int, int]]) -> list[float]:
    """train-gan's step times after each run's first two (each network's first step warms up)."""
    runs: dict[int, list[float]] = {}
    for _shape, seconds, wait, _n, run in records:
        runs.setdefault(run, []).append(seconds + wait)
    timed = [t for times in runs.values() for t in times[2:]]
    return timed or [t for times in runs.values() for t in times]


def _scored(built: dict[str, int]) -> int:
    """The pairs the rehearsal's evaluate scores: the test split's (else the validation split's), at most
    EVAL_PAIRS."""
    return max(1, min(EVAL_PAIRS, built.get("test") or built.get("valid", 1)))


def _eta(stage: str, cfg: BaseModel, timer: Any, wall: float, data: Data, built: dict[str, int],
         extra: dict[str, float]) -> float | None:
    """The full stage's estimated seconds on this device (see the module docstring)."""
    if stage == "sample-crops":  # runs whole in the rehearsal
        return wall
    kept = built["pairs"] / max(1, data.photos)  # the share of photos the build keeps (size filter, skips)
    share = {s: built.get(s, 0) / max(1, built["pairs"]) for s in ("train", "valid", "test")}
    real = {s: data.real_photos * kept * share[s] for s in share}
    if stage == "build-dataset":
        return wall / max(1, data.photos) * data.real_photos
    if stage == "evaluate":
        scored = _scored(built)
        one = extra.get("eval_one_pair")
        per_pair = (wall - one) / (scored - 1) if one is not None and scored > 1 and wall > one else wall / scored
        start = max(0.0, wall - per_pair * scored)
        limit = getattr(cfg, "limit", None)
        pairs = real["test"] or real["valid"]
        return start + per_pair * (min(pairs, limit) if limit else pairs)
    medians = _median_after_warmup(timer.records)
    cap = int(extra["max_batch"]) if extra.get("max_batch") else None
    valid_per_item = (sum(s for s, _ in timer.valid) / max(1, sum(n for _, n in timer.valid))) if timer.valid else 0.0
    if stage == "train-gen":
        from srgan.train_gen import plan_phases

        resolved = cfg.resolved()
        total = 0.0
        for phase in plan_phases(resolved, encoder_pretrained=resolved.encoder_pretrained()):
            ran = _capped(phase.bs, cap)  # with a capped batch: its time per image, at the real batch
            shape = f"{phase.size} px x {ran}{' frozen' if phase.frozen else ''}"
            per_step = (medians.get(shape) or max(medians.values(), default=0.0)) * phase.bs / ran
            total += phase.epochs * (max(1, int(real["train"] // phase.bs)) * per_step + real["valid"] * valid_per_item)
        return total
    if stage == "train-critic":
        per_step = max(medians.values(), default=0.0) * cfg.bs / _capped(cfg.bs, cap)
        per_pred = extra.get("pred_seconds_per_image", 0.0)
        epoch = max(1, int(2 * real["train"] // cfg.bs)) * per_step + 2 * real["valid"] * valid_per_item
        return per_pred * (real["train"] + real["valid"]) + cfg.epochs * epoch
    if stage == "train-gan":
        steps = _gan_steps(timer.records)
        per_step = (statistics.median(steps) if steps else 0.0) * cfg.bs / _capped(cfg.bs, cap)
        iters = cfg.iters or math.ceil(cfg.epochs * max(1, int(real["train"] // cfg.bs)))
        return iters * per_step
    return None


# ------------------------------------------------------------------------------------------------------
# the rehearsal


def rehearse(p: Pipeline, out: str | None = None, overrides: dict[str, Any] | None = None, *,
             steps: int = DEFAULT_STEPS, progress: bool = False, max_batch: int | None = None,
             report: Callable[[str], None] = lambda text: print(text, file=sys.stderr)) -> dict[str, Any]:
    """Rehearse pipeline `p` (see the module docstring); returns what `OUT/rehearsal.json` records.

    `max_batch` caps every stage's batch: a structural check of the recipe (its data layout and geometry, crop
    sizes, networks, losses, phases, checkpoints) that fits a small machine, as the test suite runs every shipped
    recipe; the times per step and the memory are then not the real run's, and the estimates scale the time per
    image to the real batches. The table says so."""
    if steps < 1:
        raise ConfigError(f"--rehearse needs at least 1 step per stage, got {steps}")
    if p.smoke:
        raise ConfigError("--rehearse and --smoke are two different runs: choose one")
    from srgan.distributed import world_size

    if world_size() > 1:  # every rank would rehearse alone into one folder; the estimate is per device anyway
        raise ConfigError(f"--rehearse runs in one process ({world_size()} were started by torchrun): run it "
                          "without torchrun on one of the devices; the real run's data-parallel stages then take "
                          "about the estimate divided by the number of devices")
    from crappify.runlock import folder_lock

    root = Path(out or rehearsal_out(p.out))
    with folder_lock(root, "rehearsal"):  # a second rehearsal into the same folder fails with one line
        return _rehearse(p, root, overrides, steps, progress, report, max_batch)


def _rehearse(p: Pipeline, root: Path, overrides: dict[str, Any] | None, steps: int, progress: bool,
              report: Callable[[str], None], max_batch: int | None) -> dict[str, Any]:
    import torch

    from srgan.runtime import resolve_device
    from srgan.weights import WeightsError

    r = p.model_copy(update={"out": str(root), "rehearse": True, "build_dataset": dict(p.build_dataset)})
    real_cfgs = stage_configs(p, overrides)
    data = _data(r, real_cfgs, root, steps, report, max_batch)
    if data.src is not None:
        r.build_dataset.update(src=data.src, limit=data.photos)
    cfgs = stage_configs(r, overrides)
    paths = paths_of(r)
    device = resolve_device(next((c.device for c in cfgs.values() if hasattr(c, "device")), "auto"))
    report(f"rehearse {p.name} on {_device_name(device)}: data from {data.what}; {steps} step(s) per training "
           f"phase; into {root}")
    reports: list[StageReport] = []
    built: dict[str, int] = {}
    extra: dict[str, float] = {"max_batch": max_batch} if max_batch else {}
    for stage, cfg in cfgs.items():
        short = _shortened(stage, cfg, steps, max_batch)
        checkpointed = STAGE_TABLE[stage].checkpoint is not None  # the training stages: rehearse their resume
        timer = _step_timer(steps, checkpointed)
        note, resumed = "", None
        _reset_peaks(device)
        t0 = time.perf_counter()
        for attempt in (0, 1):
            try:
                if stage == "train-critic":
                    extra.update(_time_preds(short, device))
                if stage == "evaluate" and _scored(built) > 1:  # once with 1 pair: the start-up apart from
                    # the time per pair (with 1 pair to score the second run would be the same: not run twice)
                    one = type(short).model_validate({**short.model_dump(), "limit": 1})
                    t1 = time.perf_counter()
                    _run_stage(Step(stage, one, "", "rerun", "rehearsal"), paths, progress, (), None)
                    extra["eval_one_pair"] = time.perf_counter() - t1
                    t0 = time.perf_counter()
                resumed = _run_and_resume(stage, short, paths, progress, timer)
                break
            except WeightsError as exc:
                if attempt or not _has_pretrained(short):
                    raise
                note = f"random weights: {str(exc)[:160]}"
                report(f"rehearse: note: stage {stage}: pretrained weights unavailable; rehearsing it with random "
                       "weights (the time per step is the same; the results are not)")
                short = type(short).model_validate({**short.model_dump(), **_random_weights(short)})
                timer = _step_timer(steps, checkpointed)
                t0 = time.perf_counter()
        wall = time.perf_counter() - t0
        if stage == "build-dataset":
            built = _split_counts(paths.dataset)
        rss, gpu = _peaks(device)
        rep = StageReport(stage, round(wall, 2), note=note, peak_rss_mib=_round(rss), peak_gpu_mib=_round(gpu),
                          resumed=resumed)
        if timer.records:
            medians = _median_after_warmup(timer.records)
            waits = sum(r[2] for r in timer.records)
            busy = sum(r[1] for r in timer.records)
            slowest = max(medians, key=medians.get)
            images = statistics.median(r[3] for r in timer.records if r[0] == slowest)
            rep.steps, rep.step_seconds = len(timer.records), round(medians[slowest], 4)
            rep.images_per_second = round(images / medians[slowest], 2) if medians[slowest] > 0 else None
            rep.loader_wait = round(waits / (waits + busy), 3) if waits + busy > 0 else None
            rep.shapes = {k: round(v, 4) for k, v in medians.items()}
            firsts = {(r[0], r[4]) for r in timer.records}  # each shape's first step of each run: warm-up
            counts = [sum(1 for r in timer.records if r[0] == k) - sum(1 for f in firsts if f[0] == k) for k in medians]
            rep.warmup_only = min(counts) < 1
        rep.eta_seconds = _round(_eta(stage, cfg, timer, wall, data, built, extra) if built or stage == "sample-crops"
                                 else None)
        reports.append(rep)
        report(_line(rep))
    total = sum(r.eta_seconds or 0.0 for r in reports)
    result = {"pipeline": p.name, "device": _device_name(device), "torch": torch.__version__, "steps": steps,
              "data": data.what, "real_photos": data.real_photos, "eta_seconds": round(total, 1),
              "max_batch": max_batch,
              "stages": [asdict(r) for r in reports]}
    write_atomic(root / "rehearsal.json", json.dumps(result, indent=1) + "\n")
    report(table(result))
    return result


def _run_and_resume(stage: str, cfg: BaseModel, paths: Any, progress: bool, timer: Any) -> bool | None:
    """Run a stage; a training stage is stopped by `timer` after its first step as SIGTERM stops it, and is then
    resumed from the checkpoint it wrote there (the path a preempted real run takes). Returns whether it was
    resumed (None: a stage that does not checkpoint)."""
    try:
        _run_stage(Step(stage, cfg, "", "rerun", "rehearsal"), paths, progress, (), [timer])
    except Interrupted:
        if not timer.stopped:  # a real SIGTERM: the rehearsal stops
            raise
    else:
        return None if STAGE_TABLE[stage].checkpoint is None else timer.stopped
    checkpoint = STAGE_TABLE[stage].checkpoint(paths)
    if not checkpoint.is_file():
        raise CrappifyError(f"rehearse: {stage} stopped after its first step but wrote no checkpoint {checkpoint}")
    timer.part = 1
    before = set(checkpoint.parent.glob("stale-*.pt"))
    _run_stage(Step(stage, cfg, "", "resume", "rehearsal"), paths, progress, (), [timer])
    if set(checkpoint.parent.glob("stale-*.pt")) - before:  # `resume_state` set it aside and started over
        raise CrappifyError(f"rehearse: {stage} could not resume from the checkpoint it wrote ({checkpoint}): a "
                            "preempted real run would start over; see the note above")
    return True


def _time_preds(cfg: BaseModel, device: Any) -> dict[str, float]:
    """Write the generator's predictions train-critic needs, timed per image (they are part of its real cost)."""
    from srgan.data import read_dataset
    from srgan.train_critic import ensure_preds

    splits = read_dataset(cfg.data)[0]
    valid_split = "valid" if splits.get("valid") else "test"
    t0 = time.perf_counter()
    n = ensure_preds(cfg.data, cfg.out, device, ("train", valid_split))
    return {"pred_seconds_per_image": (time.perf_counter() - t0) / n} if n else {}


def _has_pretrained(cfg: BaseModel) -> bool:
    return bool(getattr(cfg, "pretrained", False) or getattr(cfg, "lpips", False))


def _random_weights(cfg: BaseModel) -> dict[str, Any]:
    changes: dict[str, Any] = {}
    if "pretrained" in type(cfg).model_fields:
        changes["pretrained"] = False
        resolve = getattr(cfg, "resolved", None)
        if callable(resolve):  # train-gen: keep what the recipe resolves to with its weights (as --smoke does)
            recipe = resolve().model_dump()
            changes.update({k: recipe[k] for k in ("options", "loss", "lr", "stages") if k in recipe})
    if "lpips" in type(cfg).model_fields:
        changes["lpips"] = False
    return changes


def _split_counts(dataset: Path) -> dict[str, int]:
    from srgan.data import read_dataset

    splits = read_dataset(dataset)[0]
    counts = {s: len(v) for s, v in splits.items()}
    return {**counts, "pairs": sum(counts.values())}


def _device_name(device: Any) -> str:
    import torch

    if getattr(device, "type", "cpu") == "cuda":
        return torch.cuda.get_device_name(device)
    import platform

    name = platform.machine()
    with contextlib.suppress(OSError, StopIteration):
        name = next(line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                    if line.startswith("model name"))
    return f"CPU: {name}, {torch.get_num_threads()} threads"


def _round(value: float | None) -> float | None:
    return None if value is None else round(value, 1)


def _duration(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    if seconds < 120:
        return f"{seconds:.0f} s"
    if seconds < 7200:
        return f"{seconds / 60:.0f} min"
    if seconds < 172800:
        return f"{seconds / 3600:.1f} h"
    return f"{seconds / 86400:.1f} d"


def _line(rep: StageReport) -> str:
    warm = ", with warm-up: an over-estimate" if rep.warmup_only else ""
    step = f", {rep.step_seconds:.3g} s/step ({rep.steps} timed{warm})" if rep.step_seconds is not None else ""
    resumed = {True: "; stopped after its first step and resumed from its checkpoint",
               False: "; its resume was not rehearsed (not in the main thread)"}.get(rep.resumed, "")
    return (f"rehearse: {rep.stage}: {rep.seconds:.1f} s{step}{resumed}; full stage ~{_duration(rep.eta_seconds)}"
            + (f" ({rep.note})" if rep.note else ""))


def table(result: dict[str, Any]) -> str:
    """The rehearsal as a Markdown table (the CLI prints it; benchmarks/README.md keeps them)."""
    rows = ["| stage | rehearsal | s/step | images/s | loader wait | peak RSS | peak GPU | full stage (est.) |",
            "|---|---|---|---|---|---|---|---|"]
    for s in result["stages"]:
        def fmt(v: Any, spec: str = "{:.3g}") -> str:
            return "-" if v is None else spec.format(v)

        rows.append(f"| {s['stage']} | {s['seconds']:.1f} s | {fmt(s['step_seconds'])} | "
                    f"{fmt(s['images_per_second'])} | {fmt(s['loader_wait'], '{:.0%}')} | "
                    f"{fmt(s['peak_rss_mib'], '{:.0f} MiB')} | {fmt(s['peak_gpu_mib'], '{:.0f} MiB')} | "
                    f"{_duration(s['eta_seconds'])} |")
    rows.append(f"| **pipeline** | | | | | | | **{_duration(result['eta_seconds'])}** |")
    head = (f"{result['pipeline']} on {result['device']}, {result['steps']} step(s) per phase, data: "
            f"{result['data']}")
    if result.get("max_batch"):
        head += (f"; batches capped at {result['max_batch']}: the times and memory are not the real run's, the "
                 "estimates scale the time per image")
    return head + "\n" + "\n".join(rows)
