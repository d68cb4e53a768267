"""Files a training run leaves: self-describing generator weights and resumable checkpoints.

- `generator.safetensors`: the weights, plus in the metadata everything needed to rebuild the model
  (arch, options, scale, image size, normalisation), so later commands need only this one file.
  Loss networks are never inside it.
- `checkpoints/last.pt`: model + optimiser state + epoch + history, loaded with
  `torch.load(weights_only=True)` so no pickled code runs.
Both are written under a temporary name and renamed, so a kill never leaves half a file.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from crappify.errors import CrappifyError
from crappify.imageio import replacing

FORMAT = "crappify-generator/1"
IMAGENET_STATS = ([0.485, 0.456, 0.406], [0.229, 0.224, 0.225])


def _save_model(model: nn.Module, path: str | Path, fmt: str, builder: str,
                extra: dict[str, Any] | None) -> None:
    """Weights + rebuild recipe (`model.crappify_spec`) + normalisation as one safetensors file, atomically."""
    from safetensors.torch import save_file

    spec = getattr(model, "crappify_spec", None)
    if spec is None:
        raise ValueError(f"model has no crappify_spec; build it with {builder}")
    meta = {"format": fmt, "spec": json.dumps(spec), "normalization": json.dumps(IMAGENET_STATS),
            "extra": json.dumps(extra or {})}
    state = {k: v.detach().float().contiguous().cpu() if v.is_floating_point() else v.detach().contiguous().cpu()
             for k, v in model.state_dict().items()}
    with replacing(Path(path)) as tmp:
        save_file(state, tmp, metadata=meta)


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
        raise CrappifyError(f"{path} is not a safetensors file: {str(exc).splitlines()[0]}") from None
    if meta.get("format") != fmt:
        raise CrappifyError(f"{path} is not a crappify {kind} file (format {meta.get('format')!r})")
    return {"spec": json.loads(meta["spec"]), "normalization": json.loads(meta["normalization"]),
            "extra": json.loads(meta.get("extra", "{}"))}


def save_generator(model: nn.Module, path: str | Path, extra: dict[str, Any] | None = None) -> None:
    """Write weights + rebuild recipe (`model.crappify_spec`) as one safetensors file, atomically."""
    _save_model(model, path, FORMAT, "srgan.models.build_generator", extra)


def read_generator_meta(path: str | Path) -> dict[str, Any]:
    """The metadata of a generator file (spec, normalisation, extra), without loading tensors."""
    return _read_meta(path, FORMAT, "generator", "model file not found: {path}")


def load_generator(path: str | Path, device: str | torch.device = "cpu") -> nn.Module:
    """Rebuild a generator from its file alone (no pretrained downloads, no loss network), in eval mode."""
    from safetensors.torch import load_file

    from srgan.models import build_generator

    meta = read_generator_meta(path)
    spec = meta["spec"]
    model = build_generator(spec["arch"], scale=spec["scale"], img_size=spec["img_size"], pretrained=False,
                            **spec["options"])
    model.load_state_dict(load_file(str(path)))
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
    """Atomically write a training checkpoint (tensors, numbers, strings, lists and dicts only)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with replacing(path) as tmp:
        torch.save(plain(state), tmp)


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
    from safetensors.torch import load_file

    from srgan.critics import build_critic

    spec = read_critic_meta(path)["spec"]
    model = build_critic(spec["arch"], **spec["options"])
    model.load_state_dict(load_file(str(path)))
    return model.to(device).eval()


def load_optimizer_state(opt: Any, state: dict[str, Any]) -> None:
    """Restore a fastai optimiser's state from a checkpoint, each tensor on its parameter's device.

    Checkpoints load onto the CPU; fastai's `Optimizer.load_state_dict` keeps tensors where they are
    (torch's moves them), so resuming on a GPU failed at the first step with 'found cuda:0 and cpu'.
    """
    opt.load_state_dict(state)
    for param, values in opt.state.items():
        for key, value in values.items():
            if isinstance(value, torch.Tensor):
                values[key] = value.to(param.device)
