"""Pretrained weights: found in torchvision's / timm's own caches or a local file, never waited for.

ImageNet weights for encoders and loss networks come through the libraries' weight APIs and caches
(`TORCH_HOME` → `<torch hub dir>/checkpoints/` for torchvision; the Hugging Face cache for timm). This
machine — and many users' — has no network, so instead of letting a download hang or time out, we
look in the cache first and fail at once with a message that names the file, where to put it, and
the `--no-pretrained` / `--weights` alternatives.

Every weights file — a local `--weights` file, torchvision's cache (where the offline message tells users to
drop a downloaded file), the Hugging Face cache — is read by `read_state_dict`: safetensors, or
`torch.load(weights_only=True)`, never torchvision's / torch.hub's loader, which unpickles with
`weights_only=False`. A file holding pickled objects other than tensors (which could run code when
unpickled) is refused with a one-line WeightsError naming it.
"""

from __future__ import annotations

import os
import pickle
from pathlib import Path

import torch

from crappify.errors import CrappifyError


class WeightsError(CrappifyError):
    """Pretrained weights are needed but not available locally."""


def read_state_dict(path: str | Path, hint: str = "") -> dict[str, torch.Tensor]:
    """Tensors from a local weights file: safetensors, or a torch file loaded with weights_only=True.

    No pickled code ever runs: a file that holds other Python objects is refused with one line naming it
    (`hint` is added to the message, e.g. where the genuine file comes from).
    """
    path = Path(path)
    if not path.is_file():
        raise WeightsError(f"weights file not found: {path}")
    try:
        if path.suffix == ".safetensors" or _is_safetensors(path):
            from safetensors.torch import load_file

            return load_file(str(path))
        state = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        if "weights only" not in str(exc).lower():  # a corrupt pickle, not a refused one
            raise WeightsError(f"cannot read weights from {path}: {_first_line(exc)}" + hint) from None
        raise WeightsError(f"refusing to load {path}: it holds pickled Python objects, not only tensors (they could "
                           "run code when unpickled); use a plain state dict or a .safetensors file" + hint) from None
    except Exception as exc:  # corrupt or foreign file: one line for the user
        raise WeightsError(f"cannot read weights from {path}: {_first_line(exc)}" + hint) from None
    if isinstance(state, dict) and "state_dict" in state and isinstance(state["state_dict"], dict):
        state = state["state_dict"]
    if not isinstance(state, dict):
        raise WeightsError(f"{path} does not hold a state dict" + hint)
    return state


def _first_line(exc: BaseException) -> str:
    lines = str(exc).strip().splitlines()
    return lines[0] if lines else type(exc).__name__


def _is_safetensors(path: Path) -> bool:
    """Whether a file starts like safetensors (an 8-byte header length, then a JSON object), whatever its name."""
    with open(path, "rb") as fh:
        head = fh.read(9)
    return len(head) == 9 and head[8:9] == b"{" and int.from_bytes(head[:8], "little") < path.stat().st_size


def torchvision_cache_path(weights_name: str) -> Path:
    """Where torchvision keeps the file for e.g. 'ResNet34_Weights.IMAGENET1K_V1'."""
    import torchvision

    weights = torchvision.models.get_weight(weights_name)
    return Path(torch.hub.get_dir()) / "checkpoints" / os.path.basename(weights.url)


def torchvision_state_dict(weights_name: str, local: str | Path | None = None) -> dict[str, torch.Tensor]:
    """ImageNet weights for a torchvision model, from `local` or torchvision's cache; no download."""
    if local is not None:
        return read_state_dict(local)
    import torchvision

    weights = torchvision.models.get_weight(weights_name)
    cached = torchvision_cache_path(weights_name)
    if not cached.is_file():
        raise WeightsError(
            f"pretrained weights {weights_name} are not in the local cache: download {weights.url} and put it at "
            f"{cached} (or set TORCH_HOME), pass --weights PATH, or use --no-pretrained")
    # not weights.get_state_dict(): torch.hub's loader unpickles with weights_only=False
    return read_state_dict(cached, hint=f" (delete it; the genuine file is {weights.url})")


def timm_pretrained_file(model_name: str) -> Path:
    """The cached pretrained-weights file of a timm model, or WeightsError saying how to provide it."""
    import timm
    from huggingface_hub import try_to_load_from_cache

    cfg = timm.models.get_pretrained_cfg(model_name) or timm.create_model(model_name, pretrained=False).pretrained_cfg
    cfg = cfg.to_dict() if hasattr(cfg, "to_dict") else dict(cfg)
    if cfg.get("file") and Path(cfg["file"]).is_file():
        return Path(cfg["file"])
    repo = cfg.get("hf_hub_id")
    if repo:
        for filename in ("model.safetensors", "pytorch_model.bin"):
            found = try_to_load_from_cache(repo, filename)
            if isinstance(found, str) and Path(found).is_file():
                return Path(found)
    where = f"the Hugging Face cache (repo {repo})" if repo else "the local cache"
    raise WeightsError(f"pretrained weights for timm model {model_name!r} are not in {where}: fetch them on a machine "
                       "with network (huggingface-cli download), pass --weights PATH, or use --no-pretrained")
