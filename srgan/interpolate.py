"""`crappify interpolate`: ESRGAN's network interpolation, a blend of two generator files of one architecture.

C = alpha·A + (1 − alpha)·B, parameter by parameter (Wang et al. 2018, section 3.4): with A the GAN generator and
B the pretrained one of the same run, alpha trades the GAN's sharper texture against the pretrained model's
smoother, more faithful output without training anything. Both files must rebuild the same network (spec), were
trained on data of the same scale and normalise the same way; anything else is refused in one line naming the
files. C is an ordinary generator file (`save_generator`) whose metadata records what it blends.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import torch

from crappify.errors import ConfigError, CrappifyError
from crappify.runlock import clean_stale_temps
from srgan.checkpoint import file_digest, load_generator, read_generator_meta, save_generator
from srgan.normalize import IMAGENET_STATS


def blend_states(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor], alpha: float) -> dict[str, torch.Tensor]:
    """alpha·a + (1 − alpha)·b for every floating-point entry (computed in float64, so alpha 1 gives `a` and 0
    gives `b` bit for bit); integer entries (BatchNorm's batch counter) are taken from the nearer end."""
    if a.keys() != b.keys():
        raise ValueError("the two state dicts hold different entries")
    out = {}
    for key, ta in a.items():
        tb = b[key]
        if ta.shape != tb.shape:
            raise ValueError(f"{key} is {list(ta.shape)} in one and {list(tb.shape)} in the other")
        if ta.is_floating_point():
            mixed = alpha * ta.double() + (1.0 - alpha) * tb.double()
            out[key] = mixed.to(ta.dtype)
        else:
            out[key] = (ta if alpha >= 0.5 else tb).clone()
    return out


def _refresh_spectral_norm(model: torch.nn.Module, steps: int = 200) -> None:
    """Re-estimate the singular vectors of every spectral-normed weight (norm_type 'spectral') for the blended
    weight: a blend of each side's vectors is neither unit length nor the blend's, and in eval mode the weight is
    divided by u·Wv as stored. Power iteration from the blended vectors, as training would continue it."""
    for module in model.modules():
        for hook in list(getattr(module, "_forward_pre_hooks", {}).values()):
            if type(hook).__name__ != "SpectralNorm":
                continue
            name = hook.name
            with torch.no_grad():
                w = hook.reshape_weight_to_matrix(getattr(module, name + "_orig"))
                u, v = getattr(module, name + "_u"), getattr(module, name + "_v")
                for _ in range(steps):
                    v.copy_(torch.nn.functional.normalize(w.t() @ u, dim=0, eps=hook.eps))
                    u.copy_(torch.nn.functional.normalize(w @ v, dim=0, eps=hook.eps))


def check_alpha(alpha: Any) -> float:
    """alpha as a float in [0, 1], or a one-line error."""
    if isinstance(alpha, bool) or not isinstance(alpha, (int, float)) or not (
            math.isfinite(alpha) and 0.0 <= alpha <= 1.0):
        raise ConfigError(f"--alpha must be a number from 0 to 1 (the weight of the first model), got {alpha!r}")
    return float(alpha)


def _data_scale(meta: dict[str, Any]) -> int:
    return int(meta["extra"].get("data_scale") or 1)  # files from before data_scale was recorded: x1, as enhance


def check_compatible(a: Path, b: Path) -> tuple[dict[str, Any], dict[str, Any]]:
    """The metadata of both files, after checking they can be blended: same spec (architecture, scale, image
    size, options), same data scale, same normalisation. One line naming both files and the first difference."""
    ma, mb = read_generator_meta(a), read_generator_meta(b)
    sa, sb = ma["spec"], mb["spec"]
    why = None
    if sa["arch"] != sb["arch"]:
        why = f"architecture {sa['arch']} vs {sb['arch']}"
    elif sa["scale"] != sb["scale"]:
        why = f"model scale x{sa['scale']} vs x{sb['scale']}"
    elif sa["options"] != sb["options"]:
        keys = sorted(set(sa["options"]) | set(sb["options"]))
        key = next(k for k in keys if sa["options"].get(k) != sb["options"].get(k))
        why = f"option {key} = {sa['options'].get(key)!r} vs {sb['options'].get(key)!r}"
    elif sa["img_size"] != sb["img_size"]:
        why = f"img_size {sa['img_size']} vs {sb['img_size']}"
    elif _data_scale(ma) != _data_scale(mb):
        why = f"trained on data of scale x{_data_scale(ma)} vs x{_data_scale(mb)}"
    elif ma["normalization"] != mb["normalization"]:
        why = f"normalisation {ma['normalization']} vs {mb['normalization']}"
    if why is not None:
        raise CrappifyError(f"cannot blend {a} and {b}: they are not the same kind of model ({why})")
    if ma["normalization"] != [list(s) for s in IMAGENET_STATS]:  # what save_generator records for every file
        raise CrappifyError(f"cannot blend {a} and {b}: their normalisation {ma['normalization']} is not the ImageNet "
                            "statistics a generator file written here records")
    return ma, mb


def interpolate(a: str | Path, b: str | Path, alpha: float, out: str | Path, overwrite: bool = False) -> Path:
    """Write the blend alpha·A + (1 − alpha)·B of generator files `a` and `b` to `out` (atomically).

    An existing `out` is replaced only with `overwrite`, and never when it is one of the two inputs."""
    alpha = check_alpha(alpha)
    a, b, out = Path(a), Path(b), Path(out)
    if out.is_dir():
        raise ConfigError(f"{out} is a folder; give the blended model's file name "
                          f"(e.g. {out / 'generator.safetensors'})")
    for given in (a, b):
        if out.exists() and given.exists() and out.resolve() == given.resolve():
            raise ConfigError(f"{out} is one of the models to blend; write the blend to another file")
    if out.exists() and not overwrite:
        raise ConfigError(f"{out} already exists (--overwrite to replace it)")
    ma, mb = check_compatible(a, b)
    model = load_generator(a, "cpu")
    state_b = load_generator(b, "cpu").state_dict()
    model.load_state_dict(blend_states(model.state_dict(), state_b, alpha))
    if 0.0 < alpha < 1.0:
        _refresh_spectral_norm(model)
    extra: dict[str, Any] = {"stage": "interpolate", "alpha": alpha,
                             "blend_of": [str(a.resolve()), str(b.resolve())],
                             "blend_digests": [file_digest(a), file_digest(b)]}
    if ma["extra"].get("loss") is not None and ma["extra"].get("loss") == mb["extra"].get("loss"):
        extra["loss"] = ma["extra"]["loss"]  # train-gan's content loss default, if the blend is trained further
    out.parent.mkdir(parents=True, exist_ok=True)
    clean_stale_temps(out.parent, [out.name])  # left by a killed run
    save_generator(model, out, data_scale=_data_scale(ma), extra=extra)
    return out
