"""Files a training run leaves: self-describing generator weights and resumable checkpoints.

- `generator.safetensors`: the weights, plus in the metadata everything needed to rebuild the model
  (arch, options, scale, image size, normalisation), so later commands need only this one file.
  Loss networks are never inside it. Reading one checks its metadata's types and ranges and its spec against
  its tensors before building anything, so a crafted or foreign file gets one line naming it.
- `checkpoints/last.pt`: model + optimiser state + epoch + history, loaded with
  `torch.load(weights_only=True)` so no pickled code runs.
Both are written under a temporary name and renamed, so a kill never leaves half a file.
"""

from __future__ import annotations

import json
import math
import os
import random
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from crappify.errors import CrappifyError, brief
from crappify.imageio import replacing
from srgan.normalize import IMAGENET_STATS
from srgan.runtime import holding, is_oom

FORMAT = "crappify-generator/1"


def _save_model(model: nn.Module, path: str | Path, fmt: str, builder: str,
                extra: dict[str, Any] | None) -> None:
    """Weights + rebuild recipe (`model.crappify_spec`) + normalisation as one safetensors file, atomically."""
    from safetensors.torch import save

    spec = getattr(model, "crappify_spec", None)
    if spec is None:
        raise ValueError(f"model has no crappify_spec; build it with {builder}")
    meta = {"format": fmt, "spec": json.dumps(spec), "normalization": json.dumps(IMAGENET_STATS),
            "extra": json.dumps(extra or {})}
    state = {k: v.detach().float().contiguous().cpu() if v.is_floating_point() else v.detach().contiguous().cpu()
             for k, v in model.state_dict().items()}
    blob = save(state, metadata=meta)
    head, data_start = canonical_header(blob)
    with replacing(Path(path), durable=True) as tmp, open(tmp, "wb") as fh:
        fh.write(head)
        fh.write(memoryview(blob)[data_start:])  # the tensors' bytes as they are: no copy of a large model


def canonical_header(blob: bytes) -> tuple[bytes, int]:
    """A safetensors file's header with its metadata keys in sorted order, and where the tensors' bytes start
    in `blob`: safetensors writes the keys in a hash map's order, which changes from process to process, and
    later stages key their checkpoints on a model file's bytes. The tensor entries keep their order (the
    data's), and their offsets stay valid because they count from the end of the header, whose new length is
    padded to 8 bytes as the format asks. The file is the header followed by `blob[data_start:]`."""
    n = int.from_bytes(blob[:8], "little")
    header = json.loads(blob[8:8 + n])
    if isinstance(header.get("__metadata__"), dict):
        header["__metadata__"] = dict(sorted(header["__metadata__"].items()))
    text = json.dumps(header, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)
    return len(text).to_bytes(8, "little") + text, 8 + n


def _read_meta(path: str | Path, fmt: str, kind: str, missing: str) -> dict[str, Any]:
    """The metadata (spec, normalisation, extra) of a file `_save_model` wrote with format `fmt`."""
    from safetensors import safe_open

    path = Path(path)
    if not path.is_file():
        raise CrappifyError(missing.format(path=path))
    try:
        with safe_open(str(path), framework="pt") as fh:
            meta = fh.metadata() or {}
    except Exception as exc:
        raise CrappifyError(f"{path} is not a safetensors file: {_first_line(exc)}") from None
    if meta.get("format") != fmt:
        raise CrappifyError(f"{path} is not a crappify {kind} file (format {meta.get('format')!r})")
    out = {"spec": _json_meta(meta, "spec", path), "normalization": _json_meta(meta, "normalization", path),
           "extra": _json_meta(meta, "extra", path, "{}")}
    _check_meta(path, out, generator=fmt == FORMAT)
    return out


# What a model file's metadata may ask for: generous for anything trained here, bounded because a file may come
# from anyone. The model itself is bounded by `_rebuild`, which checks the spec against the file's tensors on
# the meta device before anything is allocated.
MAX_SCALE = 8
MAX_DATA_SCALE = 16
MAX_IMG_SIZE = 2048
MAX_INT_OPTION = 1024
MAX_LIST_OPTION = 16
# A U-Net's layers are the same for every img_size at which its encoder runs with the same strides; only fastai's
# dummy forward pass at build time grows with it (its self-attention over (img_size/8)^2 positions: 16 GiB at 2048
# px), so U-Nets are rebuilt at most this big (and `_rebuild` checks the result against the file's tensors). A timm
# encoder that will not run at that size (some only run at the size they were trained at) is rebuilt at its own
# img_size, which may then be at most MAX_BUILD_IMG_SIZE (64 MiB of attention; the encoder's activations besides).
BUILD_IMG_SIZE = 256
MAX_BUILD_IMG_SIZE = 512


def _bad(path: Path, what: str) -> CrappifyError:
    return CrappifyError(f"{path} has bad model metadata: {what}")


def _first_line(exc: BaseException) -> str:
    lines = str(exc).strip().splitlines()
    return lines[0] if lines else type(exc).__name__


def _json_meta(meta: dict[str, str], key: str, path: Path, default: str | None = None) -> Any:
    """One JSON entry of a model file's metadata, or a one-line error naming the file."""
    text = meta.get(key, default)
    if text is None:
        raise _bad(path, f"no {key!r} entry (a crappify model file records how to rebuild its model)")
    try:
        value = json.loads(text)
    except RecursionError:  # nested deeper than the parser's stack: a crafted file
        raise _bad(path, f"{key!r} is nested too deeply") from None
    except ValueError as exc:
        raise _bad(path, f"{key!r} is not valid JSON ({str(exc).splitlines()[0]})") from None
    if _depth(value) > MAX_META_DEPTH:  # before anything formats or walks it recursively
        raise _bad(path, f"{key!r} is nested too deeply")
    return value


MAX_META_DEPTH = 8  # a spec is a mapping of options holding at most lists of numbers


def _depth(value: Any) -> int:
    """How deeply lists and mappings nest in a JSON value, counted without recursion."""
    deepest, stack = 0, [(value, 0)]
    while stack:
        item, level = stack.pop()
        if isinstance(item, (list, dict)):
            if level + 1 > MAX_META_DEPTH:
                return level + 1
            deepest = max(deepest, level + 1)
            stack.extend((v, level + 1) for v in (item.values() if isinstance(item, dict) else item))
    return deepest


def _is_int(value: Any, low: int, high: int) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and low <= value <= high


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _check_option(path: Path, key: str, value: Any, nested: bool = False) -> None:
    """An option value: a JSON scalar or a short flat list of them, integers bounded, floats finite."""
    if isinstance(value, list) and not nested:
        if len(value) > MAX_LIST_OPTION:
            raise _bad(path, f"option {key} has {len(value)} items (at most {MAX_LIST_OPTION})")
        for item in value:
            _check_option(path, key, item, nested=True)
        return
    ok = (value is None or isinstance(value, bool) or (isinstance(value, str) and len(value) <= 64)
          or _is_int(value, -MAX_INT_OPTION, MAX_INT_OPTION) or (isinstance(value, float) and math.isfinite(value)))
    if not ok:
        raise _bad(path, f"option {key} = {brief(value)} is out of range")


def _check_meta(path: Path, meta: dict[str, Any], generator: bool) -> None:
    """Types and ranges of a model file's spec, normalisation and extra entries (one-line error naming the file)."""
    spec, stats, extra = meta["spec"], meta["normalization"], meta["extra"]
    if not isinstance(spec, dict):
        raise _bad(path, f"spec must be a mapping, got {brief(spec)}")
    arch, options = spec.get("arch"), spec.get("options")
    if not isinstance(arch, str) or not 0 < len(arch) <= 200:
        raise _bad(path, f"arch must be a model name, got {brief(arch)}")
    if not isinstance(options, dict):
        raise _bad(path, f"options must be a mapping, got {brief(options)}")
    for key, value in options.items():
        _check_option(path, key, value)
    if generator:
        if not _is_int(spec.get("scale"), 1, MAX_SCALE):
            raise _bad(path, f"scale must be an integer in 1..{MAX_SCALE}, got {brief(spec.get('scale'))}")
        if not _is_int(spec.get("img_size"), 1, MAX_IMG_SIZE):
            raise _bad(path, f"img_size must be an integer in 1..{MAX_IMG_SIZE}, got {brief(spec.get('img_size'))}")
    if not (isinstance(stats, list) and len(stats) == 2
            and all(isinstance(s, list) and len(s) == 3 and all(_is_number(v) for v in s) for s in stats)
            and all(v > 0 for v in stats[1])):
        raise _bad(path, f"normalization must be [[3 means], [3 positive stds]], got {brief(stats)}")
    if not isinstance(extra, dict):
        raise _bad(path, f"extra must be a mapping, got {brief(extra)}")
    if extra.get("data_scale") is not None and not _is_int(extra["data_scale"], 1, MAX_DATA_SCALE):
        raise _bad(path, f"data_scale must be an integer in 1..{MAX_DATA_SCALE}, got {brief(extra['data_scale'])}")


def _rebuild(path: Path, build: Callable[[], nn.Module]) -> nn.Module:
    """The model `build()` makes, holding the file's weights.

    The spec is first built on the meta device (no memory, no compute) and its tensors' names and shapes compared
    with the file's header, so a spec that asks for another or a far larger model than the file holds is refused
    before anything is allocated. That meta model is then made real holding the file's weights
    (`runtime.holding`), with no time spent on a random initialisation the file would replace. A builder that
    cannot run on the meta device, or a model holding tensors the file cannot give, is built for real and loaded
    (strictly) instead (its options are bounded by `_check_meta`).
    """
    from safetensors import safe_open
    from safetensors.torch import load_file

    try:
        with safe_open(str(path), framework="pt") as fh:
            have = {k: tuple(fh.get_slice(k).get_shape()) for k in fh.keys()}  # noqa: SIM118 (not iterable)
    except Exception as exc:
        raise CrappifyError(f"{path} is not a safetensors file: {_first_line(exc)}") from None
    probe = None
    py_state, np_state = random.getstate(), np.random.get_state()
    try:  # random states kept as they were: a load draws no random numbers, whichever way it builds
        with torch.random.fork_rng(devices=[]), torch.device("meta"):
            probe = build()
    except CrappifyError as exc:
        raise _bad(path, str(exc)) from None
    except Exception:  # some builder cannot run on meta tensors: built for real below
        pass
    finally:
        random.setstate(py_state)
        np.random.set_state(np_state)
    model = None
    if probe is None:
        try:
            with torch.random.fork_rng(devices=[]):
                model = build()
        except CrappifyError as exc:
            raise _bad(path, str(exc)) from None
        except Exception as exc:  # e.g. an option the builder does not take: the file's fault, not a bug here
            raise _bad(path, f"its spec cannot be built ({type(exc).__name__}: {_first_line(exc)})") from None
    want = {k: tuple(v.shape) for k, v in (probe if probe is not None else model).state_dict().items()}
    if want != have:
        missing, unexpected = sorted(set(want) - set(have)), sorted(set(have) - set(want))
        wrong = [k for k in want if k in have and want[k] != have[k]]
        detail = "; ".join(part for part in (
            f"{len(missing)} tensor(s) missing, e.g. {missing[0]}" if missing else "",
            f"{len(unexpected)} unexpected, e.g. {unexpected[0]}" if unexpected else "",
            f"{wrong[0]} is {list(have[wrong[0]])}, the spec's model has {list(want[wrong[0]])}" if wrong else "")
            if part)
        raise CrappifyError(f"{path}: its weights do not match the model its metadata describes ({detail})")
    state = load_file(str(path))
    try:
        held = holding(probe, state) if probe is not None else None
    except Exception as exc:
        if not is_oom(exc):
            raise
        raise _bad(path, f"rebuilding its model ran out of memory ({_first_line(exc)})") from None
    if held is not None:
        return held  # no random initialisation spent on weights the file replaces
    if model is None:
        try:
            with torch.random.fork_rng(devices=[]):
                model = build()
        except CrappifyError as exc:  # e.g. timm's encoder check, which may have run out of memory
            raise _bad(path, str(exc)) from None
        except Exception as exc:
            if not is_oom(exc):
                raise
            raise _bad(path, f"rebuilding its model ran out of memory ({_first_line(exc)})") from None
    model.load_state_dict(state)
    return model


def save_generator(model: nn.Module, path: str | Path, *, data_scale: int,
                   extra: dict[str, Any] | None = None) -> None:
    """Write weights + rebuild recipe (`model.crappify_spec`) as one safetensors file, atomically.

    Every stage that writes a generator (train-gen, train-gan, their EMA copies and checkpoints) goes through
    here, and `data_scale` — the HR/LR ratio of the data it was trained on, which `enhance` upscales by and
    `evaluate` checks — is required, so no file can leave it out (a U-Net's network is ×1: without it, enhance
    would not upscale at all)."""
    if not _is_int(data_scale, 1, MAX_DATA_SCALE):
        raise ValueError(f"data_scale must be an integer in 1..{MAX_DATA_SCALE}, got {data_scale!r}")
    _save_model(model, path, FORMAT, "srgan.generators.build_generator", {**(extra or {}), "data_scale": data_scale})


def model_file(path: str | Path) -> Path:
    """A generator file, or a run folder holding `generator.safetensors`."""
    path = Path(path)
    if path.is_dir():
        path = path / "generator.safetensors"
    if not path.is_file():
        raise CrappifyError(f"model file not found: {path}")
    return path


def read_generator_meta(path: str | Path) -> dict[str, Any]:
    """The metadata of a generator file (spec, normalisation, extra), without loading tensors."""
    return _read_meta(path, FORMAT, "generator", "model file not found: {path}")


def load_generator(path: str | Path, device: str | torch.device = "cpu") -> nn.Module:
    """Rebuild a generator from its file alone (no pretrained downloads, no loss network), in eval mode."""
    from srgan.generators import build_generator, is_unet_arch

    path = Path(path)
    spec = read_generator_meta(path)["spec"]
    arch, img_size = spec["arch"], spec["img_size"]

    def rebuild(size: int) -> nn.Module:
        return _rebuild(path, lambda: build_generator(arch, scale=spec["scale"], img_size=size, pretrained=False,
                                                      **spec["options"]))

    # U-Nets are rebuilt at most BUILD_IMG_SIZE px (see there); the other generators do not use img_size
    size = min(img_size, BUILD_IMG_SIZE) if is_unet_arch(arch) else img_size
    try:
        model = rebuild(size)
    except CrappifyError:
        if not (arch.startswith("unet-timm:") and size < img_size):
            raise
        if img_size > MAX_BUILD_IMG_SIZE:  # its own size then decides the memory the build takes
            raise _bad(path, f"img_size {img_size}: this timm U-Net does not rebuild at {size} px, and at its own "
                             f"size it may be at most {MAX_BUILD_IMG_SIZE}") from None
        model = rebuild(img_size)
    model.crappify_spec = {**model.crappify_spec, "img_size": img_size}
    return model.to(device).eval()


def plain(obj: Any) -> Any:
    """Tensors, numbers, strings, lists and dicts only (fastai's `L` and numpy scalars converted), so the
    checkpoint loads with `weights_only=True`."""
    if isinstance(obj, np.generic):  # before float: np.float64 is a float subclass torch won't unpickle
        return obj.item()
    if isinstance(obj, torch.Tensor) or obj is None or isinstance(obj, (bool, int, float, str)):
        return obj
    if isinstance(obj, dict):
        return {k: plain(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)) or type(obj).__name__ == "L":
        return [plain(v) for v in obj]
    raise TypeError(f"cannot store {type(obj).__name__} in a checkpoint")


def save_checkpoint(path: str | Path, state: dict[str, Any]) -> None:
    """Atomically and durably (fsynced) write a training checkpoint (tensors, numbers, strings, lists and
    dicts only)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with replacing(path, durable=True) as tmp:
        torch.save(plain(state), tmp)


def config_key(cfg: Any, ignore: frozenset[str] | set[str] = frozenset()) -> str:
    """A stage config's identity for its checkpoints: a hash of the resolved options, without `ignore` (how
    to run — device, workers, precision — and the run's length, which a resume may extend). A checkpoint
    records it; one with another key belongs to another config and is never resumed from."""
    import hashlib

    from crappify.config import non_default

    # options left at their defaults are left out, so an option added in a later version (with a default that
    # keeps the old behaviour) does not orphan the checkpoints of runs that could not have set it (the path
    # options' defaults are None: resolving the others below cannot make one equal its default)
    dump = non_default(cfg, {*ignore, "out"})
    for key in ("data", "generator", "critic", "weights"):  # paths: compare where they point
        if isinstance(dump.get(key), str):
            dump[key] = str(Path(dump[key]).resolve())
    preset = dump.get("degrade_preset")
    if isinstance(preset, str) and Path(preset).is_file():  # a preset file: what it says, not where it is
        dump["degrade_preset"] = "file:" + file_digest(preset)
    return hashlib.sha256(json.dumps(dump, sort_keys=True).encode()).hexdigest()[:16]


def file_digest(path: str | Path) -> str:
    """A short content hash of a file ("-" when there is none), for keys that depend on an input file."""
    import hashlib

    path = Path(path)
    if not path.is_file():
        return "-"
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()[:16]


def resume_state(path: str | Path, key: str, resume: bool, what: str, move: bool = True,
                 required: tuple[str, ...] = ("epoch", "history")) -> dict[str, Any] | None:
    """The checkpoint at `path` to continue from, or None to start from the beginning.

    Without `resume`, an existing checkpoint (an earlier config's, or an earlier run's) is moved aside to
    `stale-<key>.pt`, so that a kill before this run's first checkpoint can never resume from it. With
    `resume`: no checkpoint → None with a one-line note; a checkpoint of another config (its key differs, or
    it predates keys), or one that is not a checkpoint of this stage (`checkpoint_problem`: a crafted or foreign
    file) → moved aside, None and a note; else the state. `move` False (ranks other than 0 under torchrun): the
    same answer, but neither files nor notes."""
    import sys

    path = Path(path)
    if not path.is_file():
        if resume and move:
            print(f"crappify: note: {what}: nothing to resume from at {path}; starting from the beginning",
                  file=sys.stderr, flush=True)
        return None
    state, why = None, "belongs to another configuration"
    if resume:
        try:
            state = load_checkpoint(path)
            problem = checkpoint_problem(state, required)
        except CrappifyError as exc:  # not a checkpoint torch can read safely
            problem = str(exc).removeprefix(f"cannot read checkpoint {path}: ")
        if problem is not None:
            state, why = None, f"is not a usable {what} checkpoint ({problem})"
    if state is not None and state.get("config_key") == key:
        return state
    if not move:
        return None
    old = state.get("config_key") if state is not None else None
    aside = path.with_name(f"stale-{old if isinstance(old, str) and old.isalnum() else 'previous'}.pt")
    os.replace(path, aside)
    if resume:
        print(f"crappify: note: {what}: the checkpoint at {path} {why}; moved it to {aside.name} and starting "
              "from the beginning", file=sys.stderr, flush=True)
    return None


# What each entry of a checkpoint must be, whichever stage wrote it (`save_checkpoint` callers); weights are
# mappings of names to tensors. Checked before a stage reads any of it, since the file may be anyone's.
_NONE = type(None)
_WEIGHTS = ("model", "generator", "critic", "ema", "accum_grads")
_TYPES: dict[str, tuple[type, ...]] = {
    "model": (dict,), "generator": (dict,), "critic": (dict,), "ema": (dict, _NONE), "opt": (dict,),
    "accum_grads": (dict, _NONE), "accum_count": (int, _NONE),  # a gradient group open at a step checkpoint
    "epoch": (int,), "step": (int,), "steps": (int,), "batch": (int, _NONE), "history": (list,), "counts": (dict,),
    "switcher": (dict,), "gen_mode": (bool,), "config_key": (str,), "penalty_rng": (torch.Tensor,),
    "epoch_loss": (list, _NONE), "epoch_seconds": (float, int, _NONE)}


def checkpoint_problem(state: Any, required: tuple[str, ...]) -> str | None:
    """Why `state` (a loaded checkpoint) cannot be resumed from, or None: its `required` entries present and
    every known entry of the right type, counters non-negative, weights a mapping of names to tensors."""
    if not isinstance(state, dict):
        return f"it holds a {type(state).__name__}, not a mapping"
    missing = [k for k in required if k not in state]
    if missing:
        return f"no {', '.join(missing)}"
    for key, types in _TYPES.items():
        if key not in state:
            continue
        value = state[key]
        if not isinstance(value, types) or (isinstance(value, bool) and bool not in types):
            return f"{key} is a {type(value).__name__}"
        if isinstance(value, int) and not isinstance(value, bool) and value < 0:
            return f"{key} is negative"
        if key == "epoch_loss" and value is not None and not (  # [total, count] of the epoch so far (mid-epoch)
                len(value) == 2 and all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in value)):
            return "epoch_loss is not [total, count]"
        if key == "history" and not all(isinstance(row, dict) for row in value):
            return "history is not a list of rows"
        if key in _WEIGHTS and value is not None and not all(
                isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in value.items()):
            return f"{key} is not a mapping of names to tensors"
    return None


def restore(module: nn.Module, weights: dict[str, Any], path: str | Path, what: str = "model") -> None:
    """Load a checkpoint's `weights` into `module`; one line naming the file when they do not fit it (a
    checkpoint with this config's key always fits, unless the file was made by hand)."""
    try:
        module.load_state_dict(weights)
    except (RuntimeError, ValueError, TypeError) as exc:
        raise CrappifyError(f"checkpoint {path}: its {what} weights do not fit the model "
                            f"({_first_line(exc)[:200]}); move the file away to start from the beginning") from None


def load_checkpoint(path: str | Path) -> dict[str, Any]:
    """A checkpoint written by `save_checkpoint`, loaded without executing pickled code."""
    try:
        return torch.load(Path(path), map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise CrappifyError(f"no checkpoint to resume from at {path}") from None
    except Exception as exc:
        raise CrappifyError(f"cannot read checkpoint {path}: {str(exc).splitlines()[0]}") from None


# --------------------------------------------------------------------------------------------------------
# critics: the same self-describing safetensors layout, with their own format tag

CRITIC_FORMAT = "crappify-critic/1"


def save_critic(model: nn.Module, path: str | Path, extra: dict[str, Any] | None = None) -> None:
    """Write a critic's weights + rebuild recipe (`model.crappify_spec` from `srgan.critics.build_critic`)."""
    _save_model(model, path, CRITIC_FORMAT, "srgan.critics.build_critic", extra)


def read_critic_meta(path: str | Path) -> dict[str, Any]:
    """The metadata of a critic file (spec, normalisation, extra), without loading tensors."""
    return _read_meta(path, CRITIC_FORMAT, "critic",
                      "critic file not found: {path} (train one with `crappify train-critic`)")


def load_critic(path: str | Path, device: str | torch.device = "cpu") -> nn.Module:
    """Rebuild a critic from its file alone, in eval mode."""
    from srgan.critics import build_critic

    spec = read_critic_meta(path)["spec"]
    return _rebuild(Path(path), lambda: build_critic(spec["arch"], **spec["options"])).to(device).eval()


def load_optimizer_state(opt: Any, state: dict[str, Any], path: str | Path = "checkpoint") -> None:
    """Restore a fastai optimiser's state from a checkpoint, each tensor on its parameter's device.

    Checkpoints load onto the CPU; fastai's `Optimizer.load_state_dict` keeps tensors where they are
    (torch's moves them), so resuming on a GPU failed at the first step with 'found cuda:0 and cpu'.
    """
    try:
        opt.load_state_dict(state)
    except (KeyError, IndexError, TypeError, ValueError, RuntimeError, AssertionError) as exc:  # made by hand
        raise CrappifyError(f"{path}: its optimiser state does not fit this run ({_first_line(exc)[:200]}); move "
                            "the file away to start from the beginning") from None
    for param, values in opt.state.items():
        for key, value in values.items():
            if isinstance(value, torch.Tensor):
                values[key] = value.to(param.device)
