"""Pretrained weights: from torchvision's / timm's own caches, fetched into them on first use, or a local file.

ImageNet weights for encoders and loss networks come through the libraries' weight APIs and caches
(`TORCH_HOME` → `<torch hub dir>/checkpoints/` for torchvision; the Hugging Face cache for timm). A file not
in the cache is downloaded on first use, as fastai, torchvision and timm do: torchvision's from its URL (or
the same file name under the mirror `CRAPPIFY_WEIGHTS_URL`) to a temporary name, renamed into the cache only
once its SHA-256 matches the prefix in its name (torch.hub's convention), so an interrupted or corrupted
transfer leaves nothing there; timm's through `huggingface_hub` (which honours `HF_ENDPOINT`). Offline
(`--offline`, `CRAPPIFY_OFFLINE=1` or `HF_HUB_OFFLINE=1`) nothing connects, and a network that does not
answer gives up after `CONNECT_TIMEOUT` seconds; either way the one-line message names the file, where to
put it, and the `--no-pretrained` / `--weights` alternatives.

Every weights file — a local `--weights` file, torchvision's cache (where the offline message tells users to
drop a downloaded file), the Hugging Face cache — is read by `read_state_dict`: safetensors, or
`torch.load(weights_only=True)`, never torchvision's / torch.hub's loader, which unpickles with
`weights_only=False`. A file holding pickled objects other than tensors (which could run code when
unpickled) is refused with a one-line WeightsError naming it.
"""

from __future__ import annotations

import hashlib
import os
import pickle
import re
import sys
from pathlib import Path

import torch

from crappify.errors import CrappifyError

OFFLINE_ENV = "CRAPPIFY_OFFLINE"
MIRROR_ENV = "CRAPPIFY_WEIGHTS_URL"
CONNECT_TIMEOUT = 15.0  # seconds without an answer (connecting, or between two reads) before giving up
_HASH_IN_NAME = re.compile(r"-([a-f0-9]{8,64})\.")  # torch.hub's: resnet34-b627a593.pth


def offline() -> bool:
    """Whether the network must not be touched (`--offline` sets CRAPPIFY_OFFLINE; HF_HUB_OFFLINE too)."""
    return any(os.environ.get(k, "").strip().lower() in ("1", "true", "yes", "on") for k in (OFFLINE_ENV,
                                                                                               "HF_HUB_OFFLINE"))


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
    """ImageNet weights for a torchvision model, from `local` or torchvision's cache (downloaded into it on
    first use unless offline)."""
    if local is not None:
        return read_state_dict(local)
    import torchvision

    url = torchvision.models.get_weight(weights_name).url
    cached = torchvision_cache_path(weights_name)
    if not cached.is_file():
        source = _mirrored(url)
        how = (f"download {source} and put it at {cached} (or set TORCH_HOME), pass --weights PATH, or use "
               "--no-pretrained")
        if offline():
            raise WeightsError(f"pretrained weights {weights_name} are not in the local cache and the network is off "
                               f"({OFFLINE_ENV}/--offline): {how}")
        download(source, cached, f"pretrained weights {weights_name}", how)
    # not weights.get_state_dict(): torch.hub's loader unpickles with weights_only=False
    return read_state_dict(cached, hint=f" (delete it; the genuine file is {url})")


def _mirrored(url: str) -> str:
    """`url`, or the same file name under the mirror CRAPPIFY_WEIGHTS_URL when it is set."""
    base = os.environ.get(MIRROR_ENV, "").strip()
    return f"{base.rstrip('/')}/{os.path.basename(url)}" if base else url


def download(url: str, dest: Path, what: str, how: str) -> Path:
    """Fetch `url` into `dest` (a torch.hub-style name, `NAME-<sha256 prefix>.EXT`): streamed to a temporary
    name beside it and renamed only once complete with a matching hash; WeightsError (one line, `how` to go on
    by hand) on any failure, leaving nothing at `dest`."""
    import http.client
    import urllib.error
    import urllib.request

    from tqdm.auto import tqdm

    from crappify.imageio import replacing
    from crappify.runlock import clean_stale_temps

    match = _HASH_IN_NAME.search(dest.name)
    dest.parent.mkdir(parents=True, exist_ok=True)
    clean_stale_temps(dest.parent, [dest.name])  # an earlier, killed download of this file
    try:
        with replacing(dest, durable=True) as tmp:
            request = urllib.request.Request(url, headers={"User-Agent": "crappify"})
            with urllib.request.urlopen(request, timeout=CONNECT_TIMEOUT) as resp, open(tmp, "wb") as fh:
                total = int(resp.headers.get("Content-Length") or 0) or None
                digest, size = hashlib.sha256(), 0
                with tqdm(total=total, unit="B", unit_scale=True, unit_divisor=1024, file=sys.stderr,
                          desc=f"downloading {dest.name}", disable=None, leave=False) as bar:
                    while chunk := resp.read(1 << 20):
                        digest.update(chunk)
                        fh.write(chunk)
                        size += len(chunk)
                        bar.update(len(chunk))
            if total is not None and size != total:
                raise WeightsError(f"the transfer stopped after {size} of {total} bytes")
            if match and not digest.hexdigest().startswith(match.group(1)):
                raise WeightsError(f"its SHA-256 {digest.hexdigest()[:16]}... does not match {match.group(1)} "
                                   "in its name (a corrupted or substituted file)")
    except WeightsError as exc:
        raise WeightsError(f"could not download {what} from {url}: {exc}; nothing was kept. {how}") from None
    except urllib.error.HTTPError as exc:
        raise WeightsError(f"could not download {what} from {url}: HTTP {exc.code} {exc.reason}; {how}") from None
    except (OSError, http.client.HTTPException, ValueError) as exc:  # refused, unreachable, timed out, cut
        reason = getattr(exc, "reason", None) or exc  # URLError wraps the socket's error
        text = _first_line(reason) if isinstance(reason, BaseException) else str(reason)
        raise WeightsError(f"could not download {what} from {url} ({text}); {how}") from None
    return dest


def timm_pretrained_file(model_name: str) -> Path:
    """The pretrained-weights file of a timm model from the Hugging Face cache (fetched into it on first use
    unless offline), or WeightsError saying how to provide it."""
    import timm
    from huggingface_hub import try_to_load_from_cache

    cfg = timm.models.get_pretrained_cfg(model_name) or timm.create_model(model_name, pretrained=False).pretrained_cfg
    cfg = cfg.to_dict() if hasattr(cfg, "to_dict") else dict(cfg)
    if cfg.get("file") and Path(cfg["file"]).is_file():
        return Path(cfg["file"])
    repo = cfg.get("hf_hub_id")
    names = ("model.safetensors", "pytorch_model.bin")
    if repo:
        for filename in names:
            found = try_to_load_from_cache(repo, filename)
            if isinstance(found, str) and Path(found).is_file():
                return Path(found)
    where = f"the Hugging Face cache (repo {repo})" if repo else "the local cache"
    how = "fetch them on a machine with network (hf download), pass --weights PATH, or use --no-pretrained"
    if not repo or offline():
        off = " and the network is off (--offline, CRAPPIFY_OFFLINE or HF_HUB_OFFLINE)" if repo else ""
        raise WeightsError(f"pretrained weights for timm model {model_name!r} are not in {where}{off}: {how}")
    return _hub_download(repo, names, f"pretrained weights for timm model {model_name!r}", how)


def _hub_download(repo: str, names: tuple[str, ...], what: str, how: str) -> Path:
    """The first of `names` that the Hugging Face hub (HF_ENDPOINT) has in `repo`, downloaded into its cache
    (it writes to an `.incomplete` name and checks the size and hash before moving a file in)."""
    from huggingface_hub import hf_hub_download
    from huggingface_hub.errors import EntryNotFoundError

    last: Exception | None = None
    for filename in names:
        try:
            return Path(hf_hub_download(repo, filename, etag_timeout=CONNECT_TIMEOUT))
        except EntryNotFoundError as exc:  # this repo keeps its weights under the other name
            last = exc
        except Exception as exc:  # unreachable, refused, offline, bad repo: one line
            last = exc
            break
    text = _first_line(last) if last is not None else "not found"
    raise WeightsError(f"could not download {what} from the Hugging Face hub (repo {repo}: {text[:200]}); {how}")
