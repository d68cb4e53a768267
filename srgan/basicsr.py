"""BasicSR's state-dict layout, the one Real-ESRGAN, OpenModelDB, spandrel and chaiNNer read, for `rrdb` and
`compact`: a generator trained here written in it (`export --pth/--safetensors`), and a released model read from
it to start training (`train-gen --init`, `train-gan --generator`).

The layout is a flat {name: tensor} (in a `.pth` optionally under `params_ema`, `params`, `state_dict` or with a
DataParallel `module.` prefix; in `.safetensors` flat) for a network that takes and returns RGB in [0, 1]. So
only a generator in that pixel convention (`normalize: none`, `srgan.generators.PixelSpace`) and without our
bicubic skip × gain (`residual`) has one; others are refused in one line that points to ONNX.

Names: `compact` uses Real-ESRGAN's own (`body.N`), so its state dict goes across unchanged; `rrdb` maps
`head`/`body.i.blocks.j.convs.k`/`body_tail`/`up.i`/`hr`/`tail` to RRDBNet's `conv_first`/`body.i.rdb{j+1}.conv{k+1}`/
`conv_body`/`conv_up{i+1}`/`conv_hr`/`conv_last`. Reading also takes ESRGAN's original numbering
(`model.0`, `model.1.sub.i.RDBj.convk.0`, ...), which most OpenModelDB ESRGAN files use.

Hand-written because spandrel's loaders build spandrel's classes, not ours, and spandrel is not a dependency:
the tests check what we write against spandrel itself. A file from anyone is a security boundary: tensors
only (`srgan.weights.read_state_dict`, never unpickled), every key and shape checked against the model its
keys describe before that model is allocated, sizes bounded by the generators' option limits.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import torch
from torch import nn

from crappify.errors import ConfigError, CrappifyError
from srgan.generators import OPTION_MAX, build_generator
from srgan.runtime import held_or_built

FORMATS = (".pth", ".safetensors")  # what `export` writes
TORCH_SUFFIXES = (".pth", ".pt", ".bin", ".ckpt")  # names under which trainers save torch files


class ForeignFile(CrappifyError):
    """A file that is neither ours nor a BasicSR-layout state dict of an architecture we train."""
WRAPPERS = ("params_ema", "params", "state_dict", "model", "net_g")  # where trainers nest the weights, in order
SPANDREL_GROWTH = 32  # spandrel (so chaiNNer) builds ESRGAN's RRDBNet with growth 32 only


# -----------------------------------------------------------------------------------------------------------
# what can be written


def basicsr_problem(spec: dict[str, Any]) -> str | None:
    """Why a generator of `spec` has no BasicSR layout, or None when it has one."""
    arch, options = spec["arch"], spec["options"]
    if arch not in ("rrdb", "compact"):
        return f"{arch} has no BasicSR/spandrel layout (rrdb and compact have)"
    if options.get("normalize") != "none":
        return ("it works on ImageNet-normalised tensors (generator option normalize: imagenet), where BasicSR models "
                "take RGB in [0, 1]; train it with normalize: none")
    if options.get("residual"):
        return "its bicubic skip x gain (generator option residual) has no place in BasicSR's RRDBNet"
    if arch == "rrdb" and options.get("growth") != SPANDREL_GROWTH:
        return f"its growth is {options.get('growth')}; spandrel and chaiNNer build RRDBNet with growth 32 only"
    return None


RRDB_NAMES = {"head": "conv_first", "body_tail": "conv_body", "hr": "conv_hr", "tail": "conv_last"}  # ours: BasicSR's


def _rrdb_to_basicsr(key: str) -> str:
    module, _, kind = key.rpartition(".")
    if module in RRDB_NAMES:
        return f"{RRDB_NAMES[module]}.{kind}"
    m = re.fullmatch(r"body\.(\d+)\.blocks\.(\d)\.convs\.(\d)", module)
    if m:
        return f"body.{m[1]}.rdb{int(m[2]) + 1}.conv{int(m[3]) + 1}.{kind}"
    m = re.fullmatch(r"up\.(\d)", module)
    if m:
        return f"conv_up{int(m[1]) + 1}.{kind}"
    raise KeyError(key)


def basicsr_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """`model`'s weights under BasicSR's names (float32, contiguous, on the CPU); ValueError when it has none."""
    problem = basicsr_problem(model.crappify_spec)
    if problem:
        raise ValueError(problem)
    rename = _rrdb_to_basicsr if model.crappify_spec["arch"] == "rrdb" else (lambda k: k)
    return {rename(k): v.detach().float().contiguous().cpu() for k, v in model.state_dict().items()}


def write_basicsr(state: dict[str, torch.Tensor], tmp: Path, suffix: str) -> None:
    """Write `state` as `.pth` ({"params": state}, BasicSR's default key, which Real-ESRGAN's scripts and spandrel
    read) or flat `.safetensors`."""
    if suffix == ".safetensors":
        from safetensors.torch import save_file

        save_file(state, str(tmp))
    else:
        torch.save({"params": state}, tmp)


# -----------------------------------------------------------------------------------------------------------
# what can be read


def unwrap(state: dict[str, Any], path: Path) -> dict[str, torch.Tensor]:
    """The flat tensor dict inside a trainer's checkpoint: the first of WRAPPERS present, `module.` removed."""
    for key in WRAPPERS:
        if isinstance(state.get(key), dict):
            state = state[key]
            break
    if state and all(k.startswith("module.") for k in state):
        state = {k[len("module."):]: v for k, v in state.items()}
    bad = [k for k, v in state.items() if not isinstance(k, str) or not isinstance(v, torch.Tensor)]
    if bad or not state:
        raise ForeignFile(f"{path}: not a state dict of tensors" + (f" ({bad[0]!r} is not a tensor)" if bad else ""))
    return state


def _esrgan_old_to_new(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """ESRGAN's original numbering (`model.0`, `model.1.sub.i.RDBj.convk.0`, `model.3` ...) to BasicSR's names."""
    trunk = [int(m[1]) for k in state if (m := re.match(r"model\.1\.sub\.(\d+)\.RDB", k))]
    n_blocks = max(trunk) + 1 if trunk else 0
    tail = sorted({int(m[1]) for k in state if (m := re.fullmatch(r"model\.(\d+)\.(weight|bias)", k))} - {0})
    if len(tail) < 3:
        raise KeyError("model.N")
    names = {tail[-1]: "conv_last", tail[-2]: "conv_hr"} | {i: f"conv_up{n + 1}" for n, i in enumerate(tail[:-2])}
    out = {}
    for key, value in state.items():
        if m := re.fullmatch(r"model\.0\.(weight|bias)", key):
            out[f"conv_first.{m[1]}"] = value
        elif m := re.fullmatch(r"model\.1\.sub\.(\d+)\.RDB(\d)\.conv(\d)\.0\.(weight|bias)", key):
            out[f"body.{m[1]}.rdb{m[2]}.conv{m[3]}.{m[4]}"] = value
        elif m := re.fullmatch(rf"model\.1\.sub\.{n_blocks}\.(weight|bias)", key):
            out[f"conv_body.{m[1]}"] = value
        elif (m := re.fullmatch(r"model\.(\d+)\.(weight|bias)", key)) and int(m[1]) in names:
            out[f"{names[int(m[1])]}.{m[2]}"] = value
        else:
            raise KeyError(key)
    return out


def _shape(state: dict[str, torch.Tensor], key: str, path: Path, ndim: int) -> tuple[int, ...]:
    if key not in state:
        raise CrappifyError(f"{path}: no {key} in it; not a complete {'RRDBNet' if 'conv' in key else 'compact'} "
                            "state dict")
    shape = tuple(state[key].shape)
    if len(shape) != ndim:
        raise CrappifyError(f"{path}: {key} has shape {list(shape)}")
    return shape


def _bounded(path: Path, what: str, value: int, key: str) -> int:
    if not 1 <= value <= OPTION_MAX[key]:
        raise CrappifyError(f"{path}: {what} {value} is out of range (1..{OPTION_MAX[key]})")
    return value


def detect(state: dict[str, torch.Tensor], path: Path) -> tuple[str, int, dict[str, Any], dict[str, torch.Tensor]]:
    """(arch, scale, options, state under our names) of a BasicSR-layout state dict, from its keys and shapes
    alone; one line naming the file when it is no architecture we train."""
    if "model.0.weight" in state and any(k.startswith("model.1.sub.") for k in state):
        try:
            state = _esrgan_old_to_new(state)
        except KeyError as exc:
            raise CrappifyError(f"{path}: an ESRGAN-style state dict with an unexpected entry {exc}") from None
    if "conv_first.weight" in state and "body.0.rdb1.conv1.weight" in state:
        first = _shape(state, "conv_first.weight", path, 4)
        if first[1] != 3:  # Real-ESRGAN x2plus / x1: pixel-unshuffled input
            raise CrappifyError(f"{path}: an RRDBNet on {first[1]} input channels (pixel-unshuffled, as "
                                "RealESRGAN_x2plus); crappify's rrdb takes the RGB image itself (x2 and x4 models "
                                "of 3 channels)")
        blocks = {int(m[1]) for k in state if (m := re.match(r"body\.(\d+)\.", k))}
        ups = sorted(int(m[1]) for k in state if (m := re.fullmatch(r"conv_up(\d)\.weight", k)))
        if ups not in ([1], [1, 2]):
            raise CrappifyError(f"{path}: an RRDBNet with {len(ups)} upsampling convs; crappify's rrdb is x2 (one) "
                                "or x4 (two)")
        options = {"n_blocks": _bounded(path, "blocks", len(blocks), "n_blocks"),
                   "n_feats": _bounded(path, "features", first[0], "n_feats"),
                   "growth": _bounded(path, "growth", _shape(state, "body.0.rdb1.conv1.weight", path, 4)[0], "growth"),
                   "residual": False, "normalize": "none"}
        ours = {}
        for key in state:
            m = re.fullmatch(r"body\.(\d+)\.rdb(\d)\.conv(\d)\.(weight|bias)", key)
            if m:
                ours[f"body.{m[1]}.blocks.{int(m[2]) - 1}.convs.{int(m[3]) - 1}.{m[4]}"] = state[key]
                continue
            m = re.fullmatch(r"(conv_first|conv_body|conv_hr|conv_last|conv_up(\d))\.(weight|bias)", key)
            if not m:
                raise CrappifyError(f"{path}: an RRDBNet state dict with an unexpected entry {key!r}")
            name = {v: k for k, v in RRDB_NAMES.items()}.get(m[1], f"up.{int(m[2] or 1) - 1}")
            ours[f"{name}.{m[3]}"] = state[key]
        return "rrdb", 2 ** len(ups), options, ours
    if "body.0.weight" in state and "body.1.weight" in state:
        convs = sorted(int(m[1]) for k in state if (m := re.fullmatch(r"body\.(\d+)\.bias", k)))
        first, last = _shape(state, "body.0.weight", path, 4), _shape(state, f"body.{convs[-1]}.weight", path, 4)
        n_conv = (convs[-1] - 2) // 2
        squares = {3 * s * s: s for s in (1, 2, 3, 4)}
        if first[1] != 3 or last[0] not in squares or convs[-1] % 2:
            raise CrappifyError(f"{path}: a compact (SRVGGNet) state dict of {first[1]} input and {last[0]} output "
                                "channels; crappify's compact is RGB in and out, x1 to x4")
        options = {"n_feats": _bounded(path, "features", first[0], "n_feats"),
                   "n_conv": _bounded(path, "convs", n_conv, "n_conv"), "normalize": "none"}
        return "compact", squares[last[0]], options, state
    raise ForeignFile(f"{path}: not an architecture crappify trains (BasicSR/Real-ESRGAN RRDBNet or compact "
                      "SRVGGNet): its keys start " + ", ".join(list(state)[:3]))


def is_crappify_file(path: Path) -> bool:
    """Whether `path` is a generator file written here (safetensors with our format tag)."""
    from safetensors import safe_open

    from srgan.checkpoint import FORMAT

    try:
        with safe_open(str(path), framework="pt") as fh:
            return (fh.metadata() or {}).get("format") == FORMAT
    except Exception:
        return False


def read_basicsr(path: str | Path) -> tuple[str, int, dict[str, Any], dict[str, torch.Tensor]]:
    """(arch, scale, options, weights under our names) of a BasicSR-layout file, checked (see `detect`)."""
    from srgan.weights import WeightsError, read_state_dict

    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{path}: model file not found")
    try:
        raw = read_state_dict(path)
    except WeightsError as exc:
        raise ForeignFile(str(exc)) from None
    return detect(unwrap(raw, path), path)


def load_basicsr(path: str | Path, device: torch.device | str = "cpu", img_size: int = 64) -> nn.Module:
    """A generator of ours holding a BasicSR-layout file's weights: its keys and shapes are compared with the
    model they describe, built on the meta device, before the model is allocated; then that model is made real
    holding them (`runtime.holding`, as `checkpoint.load_generator` does), drawing no random numbers."""
    return _build(Path(path), read_basicsr(path), device, img_size)


def _build(path: Path, read: tuple[str, int, dict[str, Any], dict[str, torch.Tensor]],
           device: torch.device | str = "cpu", img_size: int = 64) -> nn.Module:
    arch, scale, options, state = read
    with torch.device("meta"):
        probe = build_generator(arch, scale=scale, img_size=img_size, **options)
    want = {k: tuple(v.shape) for k, v in probe.state_dict().items()}
    have = {k: tuple(v.shape) for k, v in state.items()}
    if want != have:
        odd = sorted(set(want) ^ set(have)) or [k for k in want if want[k] != have[k]]
        raise CrappifyError(f"{path}: its tensors do not make a whole {arch} (first difference: {odd[0]})")
    # no random initialisation spent on weights the file replaces (compact, with a non-persistent buffer, is built)
    return held_or_built(probe, state, lambda: build_generator(arch, scale=scale, img_size=img_size, **options)
                         ).to(device)


def start_spec(path: str | Path) -> tuple[str, int, dict[str, Any]]:
    """(arch, scale, options) of the generator in a crappify or BasicSR-layout file (`load_start_generator`'s)."""
    from srgan.checkpoint import read_generator_meta

    path = Path(path)
    if not path.is_file() or is_crappify_file(path):
        spec = read_generator_meta(path)["spec"]
        return spec["arch"], spec["scale"], spec["options"]
    key = (str(path.resolve()), path.stat().st_mtime_ns, path.stat().st_size)
    if key not in _SPECS:  # a config resolves itself several times; a released .pth is tens of MB
        arch, scale, options, _ = _read_foreign(path)
        _SPECS[key] = (arch, scale, options)
    arch, scale, options = _SPECS[key]
    return arch, scale, dict(options)


_SPECS: dict[tuple[str, int, int], tuple[str, int, dict[str, Any]]] = {}


def load_start_generator(path: str | Path, device: torch.device | str = "cpu") -> nn.Module:
    """A generator to start training from: a crappify generator file, or a BasicSR/Real-ESRGAN/OpenModelDB one."""
    from srgan.checkpoint import load_generator

    path = Path(path)
    if not path.is_file() or is_crappify_file(path):
        return load_generator(path, device)
    return _build(path, _read_foreign(path), device)


def _read_foreign(path: Path) -> tuple[str, int, dict[str, Any], dict[str, torch.Tensor]]:
    """`read_basicsr` of a file that is not ours. When it is no BasicSR file either, a torch file (.pth ...) says
    what is wrong with it as a BasicSR one, anything else why it is not a generator file of ours."""
    from srgan.checkpoint import read_generator_meta

    try:
        return read_basicsr(path)
    except ForeignFile:
        if path.suffix.lower() in TORCH_SUFFIXES:
            raise
        read_generator_meta(path)  # raises its one line (not a safetensors / not a crappify generator file)
        raise
