"""Pretrained weights: found in torchvision's / timm's own caches or a local file, never waited for.

ImageNet weights for encoders and loss networks come through the libraries' weight APIs and caches
(`TORCH_HOME` → `<torch hub dir>/checkpoints/` for torchvision; the Hugging Face cache for timm). This
machine — and many users' — has no network, so instead of letting a download hang or time out, we
look in the cache first and fail at once with a message that names the file, where to put it, and
the `--no-pretrained` / `--weights` alternatives.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch

from crappify.errors import CrappifyError


class WeightsError(CrappifyError):
    """Pretrained weights are needed but not available locally."""


def read_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    """Tensors from a local weights file (.safetensors, or a torch file loaded with weights_only=True)."""
    path = Path(path)
    if not path.is_file():
        raise WeightsError(f"weights file not found: {path}")
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            return load_file(str(path))
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # corrupt or foreign file: one line for the user
        raise WeightsError(f"cannot read weights from {path}: {str(exc).splitlines()[0]}") from None
    if isinstance(state, dict) and "state_dict" in state and isinstance(state["state_dict"], dict):
        state = state["state_dict"]
    if not isinstance(state, dict):
        raise WeightsError(f"{path} does not hold a state dict")
    return state


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
    return weights.get_state_dict(progress=False, check_hash=False)


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
