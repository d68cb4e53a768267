"""Shared fixtures: small real photos (made from the photos installed packages ship) and odd/bad files.

Everything is written once per session into pytest's temporary folders and kept tiny (long side
120-160 px) so the whole suite stays fast on a small CPU. Session folders are read-only by
convention: a test that needs to change a source folder copies it first.
"""

from __future__ import annotations

import io
import os
import shutil
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

import cv2
import numpy as np
import pytest
from PIL import Image

# tests/crappify/ (a folder without __init__.py) would otherwise be taken for a namespace package named
# `crappify` ahead of the editable install's import hook whenever tests/ is first on sys.path (pytest puts
# it there for this conftest); with the repository root on sys.path the real package always wins.
_REPO_ROOT = str(Path(__file__).resolve().parents[1])
if _REPO_ROOT not in sys.path:
    sys.path.insert(1, _REPO_ROOT)

from crappify.sources import sample_photos  # noqa: E402

# The suite never reaches the internet: pretrained weights are only ever looked up in the local caches (the
# download tests unset these for their own loopback mirror). Set here, so commands run in subprocesses inherit it.
os.environ["CRAPPIFY_OFFLINE"] = "1"
os.environ["HF_HUB_OFFLINE"] = "1"

# pytest-xdist runs the suite in parallel worker processes (`-n` in pyproject.toml): each worker, and every
# command it starts in a subprocess, then computes on one thread, so that the workers share the cores instead of
# fighting over them (torch would start as many threads as there are cores in each).
if os.environ.get("PYTEST_XDIST_WORKER"):
    os.environ["OMP_NUM_THREADS"] = "1"
    os.environ["MKL_NUM_THREADS"] = "1"
    import torch

    torch.set_num_threads(1)
    cv2.setNumThreads(1)

CRAPPIFY = [sys.executable, "-m", "crappify.cli"]  # the command line, as `crappify` runs it


def memory_temproot(shm: Path = Path("/dev/shm"), environ: dict[str, str] = os.environ) -> str | None:
    """Where tmp_path folders go: a memory filesystem (`shm`) on a machine with room for it, else None (pytest's
    own choice, the system's temporary folder). The suite writes and reads back several GB of checkpoints and model
    files (a ResNet-34 GAN checkpoint alone is 1.2 GB, fsynced); on a VM's disk that I/O took up to a tenth of the
    slowest tests' time (benchmarks/README.md). Only with at least 16 GiB free there and 20 GiB of memory (two
    workers each hold up to 4 GB of files and as much again in memory), and never over a choice already made
    (PYTEST_DEBUG_TEMPROOT, pytest's setting; `--basetemp` wins over both). Passing tests' folders are removed as
    they finish (tmp_path_retention_policy, pyproject.toml)."""
    if "PYTEST_DEBUG_TEMPROOT" in environ or not shm.is_dir() or not os.access(shm, os.W_OK):
        return None
    try:
        free = shutil.disk_usage(shm).free
        memory = os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError):
        return None
    return str(shm) if free >= 16 << 30 and memory >= 20 << 30 else None


if (_temproot := memory_temproot()) is not None:
    os.environ["PYTEST_DEBUG_TEMPROOT"] = _temproot


def run_cli(*args: str | Path, timeout: float = 120, cwd: str | Path | None = None) -> subprocess.CompletedProcess:
    """Run `crappify ARGS` in a subprocess; returns the completed process (text mode)."""
    return subprocess.run([*CRAPPIFY, *map(str, args)], capture_output=True, text=True, timeout=timeout,
                          cwd=cwd)


def run_main(*args: str | Path) -> tuple[int, str, str]:
    """`crappify ARGS` in this process (imports already paid for): (exit code, stdout, stderr). Test modules import
    it (`from conftest import run_main`)."""
    import contextlib
    import io

    from crappify.cli import main

    out, err = io.StringIO(), io.StringIO()
    code = 0
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            main([str(a) for a in args])
        except SystemExit as exc:
            code = exc.code if isinstance(exc.code, int) else 1
    return code, out.getvalue(), err.getvalue()


def _real_rgb(index: int) -> Image.Image:
    """The index-th (cyclically) sample photo as an 8-bit RGB PIL image."""
    photos = sample_photos()
    assert len(photos) >= 3, "the tests need the photos scikit-image / scikit-learn / matplotlib ship"
    _, path = photos[index % len(photos)]
    with Image.open(path) as img:
        return img.convert("RGB")


def _fit(img: Image.Image, long_side: int, portrait: bool = False) -> Image.Image:
    """Crop to a portrait (3:4) frame if asked, then resize so the long side is `long_side`."""
    w, h = img.size
    if portrait and w >= h:
        cw = h * 3 // 4
        img = img.crop(((w - cw) // 2, 0, (w - cw) // 2 + cw, h))
        w, h = img.size
    s = long_side / max(w, h)
    return img.resize((max(1, round(w * s)), max(1, round(h * s))), Image.Resampling.LANCZOS)


def small_photo(index: int, long_side: int = 140, portrait: bool = False) -> np.ndarray:
    """A small real photo as HWC uint8 RGB."""
    return np.asarray(_fit(_real_rgb(index), long_side, portrait))


def save(img: np.ndarray | Image.Image, path: Path, **kw) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    pil = img if isinstance(img, Image.Image) else Image.fromarray(img)
    if path.suffix.lower() in (".jpg", ".jpeg"):
        kw.setdefault("quality", 90)
    pil.save(path, **kw)
    return path


@pytest.fixture(scope="session")
def photo_dir(tmp_path_factory) -> Path:
    """~12 plain 8-bit RGB photos (JPEG and PNG, portrait and landscape) in nested folders.

    Short sides lie between 80 and 120 px, long sides between 120 and 160 px.
    """
    root = tmp_path_factory.mktemp("photos")
    n = len(sample_photos())
    for i in range(max(12, n)):
        long_side = 120 + (i * 7) % 41
        img = _fit(_real_rgb(i), long_side, portrait=i % 3 == 1)
        sub = ("", "a", "a/b", "c")[i % 4]
        ext = ".jpg" if i % 2 == 0 else ".png"
        save(img, root / sub / f"photo{i:02d}{ext}")
    return root


@pytest.fixture(scope="session")
def big_photo_dir(tmp_path_factory) -> Path:
    """Four larger plain RGB photos (short side 240-300 px): JPEGs and one PNG."""
    root = tmp_path_factory.mktemp("big")
    for i, (long_side, ext, portrait) in enumerate([(360, ".jpg", False), (400, ".jpg", True),
                                                    (330, ".png", False), (420, ".jpg", False)]):
        save(_fit(_real_rgb(i + 3), long_side, portrait), root / f"big{i}{ext}")
    return root


@pytest.fixture(scope="module")
def sr_file(tmp_path_factory) -> Path:
    """A tiny x2 SRResNet generator file (seeded), for tests that load, enhance or craft model files."""
    import torch

    from srgan.checkpoint import save_generator
    from srgan.generators import build_generator

    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("models") / "sr.safetensors"
    save_generator(build_generator("srresnet", scale=2, n_blocks=1, n_feats=8), path, data_scale=2)
    return path


@pytest.fixture(scope="module")
def gan_base(tmp_path_factory) -> Path:
    """A run folder as train-gen and train-critic leave it: a tiny SRResNet (x4, l1) and a tiny patch critic."""
    import torch

    from srgan.checkpoint import save_critic, save_generator
    from srgan.critics import build_critic
    from srgan.generators import build_generator

    run = tmp_path_factory.mktemp("gan-base")
    torch.manual_seed(0)
    save_generator(build_generator("srresnet", scale=4, n_blocks=1, n_feats=8), run / "generator.safetensors",
                   data_scale=4, extra={"loss": "l1"})
    save_critic(build_critic("patch", nf=8, n_blocks=2), run / "critic.safetensors")
    return run


@pytest.fixture(scope="session")
def sr_dataset(tmp_path_factory) -> Path:
    """A built `srgan-x4` dataset of the sample photos (HR 64 px, split 0.6/0.2/0.2), read-only for the tests."""
    from crappify.builder import BuildConfig, build_dataset

    out = tmp_path_factory.mktemp("data") / "sr"
    build_dataset(BuildConfig(src="samples", out=str(out), preset="srgan-x4", size=64, split=(0.6, 0.2, 0.2),
                              workers=1), progress=False)
    return out


@pytest.fixture(scope="session")
def many_photo_dir(tmp_path_factory) -> Path:
    """160 JPEGs of 180-260 px (crops and flips of the sample photos) for the kill-and-resume test."""
    root = tmp_path_factory.mktemp("many")
    sources = [np.asarray(_fit(_real_rgb(i), 480)) for i in range(len(sample_photos()))]
    rng = np.random.default_rng(1234)
    for i in range(160):
        src = sources[i % len(sources)]
        h, w = src.shape[:2]
        ch, cw = int(rng.integers(180, min(h, 260))), int(rng.integers(180, min(w, 260)))
        y, x = int(rng.integers(0, h - ch + 1)), int(rng.integers(0, w - cw + 1))
        crop = src[y:y + ch, x:x + cw]
        if i % 2:
            crop = crop[:, ::-1]
        save(np.ascontiguousarray(crop), root / f"d{i % 4}" / f"img{i:03d}.jpg")
    return root


@dataclass
class OddFiles:
    """Files of every awkward kind, with what decoding them must give."""

    root: Path
    paths: dict[str, Path] = field(default_factory=dict)  # kind -> file
    expected: dict[str, np.ndarray] = field(default_factory=dict)  # kind -> upright RGB pixels
    bad: dict[str, str] = field(default_factory=dict)  # source (relative to root) -> reason fragment


def _exif_rotated_jpeg(path: Path) -> np.ndarray:
    """A JPEG whose stored pixels are landscape with EXIF orientation 6; returns the stored pixels.

    The pattern is asymmetric: a red block at the stored top-left, a blue bar along the stored bottom.
    """
    img = small_photo(5, 128).copy()  # 128 x 85 landscape
    h = img.shape[0]
    img[:24, :32] = (255, 0, 0)
    img[h - 12:, :] = (0, 0, 255)
    exif = Image.Exif()
    exif[0x0112] = 6
    Image.fromarray(img).save(path, quality=95, exif=exif.tobytes())
    with Image.open(path) as stored:
        return np.asarray(stored.convert("RGB"))


def make_odd_files(root: Path) -> OddFiles:
    odd = OddFiles(root)
    base = small_photo(3, 96)  # rocket.jpg: landscape, 96 x 64
    h, w = base.shape[:2]

    # --- convertible kinds -------------------------------------------------------------------------
    p = save(Image.fromarray(base).convert("CMYK"), root / "cmyk.jpg")
    with Image.open(p) as img:
        assert img.mode == "CMYK"
        odd.expected["cmyk"] = np.asarray(img.convert("RGB"))
    odd.paths["cmyk"] = p

    grey8 = cv2.cvtColor(small_photo(4, 100), cv2.COLOR_RGB2GRAY)  # camera.png: a real greyscale photo
    grey16 = grey8.astype(np.uint16) * 257
    grey16[0, 0], grey16[0, 1], grey16[0, 2] = 65535, 32896, 0
    p = root / "grey16.png"
    assert cv2.imwrite(str(p), grey16)
    g = grey8.copy()
    g[0, 0], g[0, 1], g[0, 2] = 255, 128, 0
    odd.paths["grey16"], odd.expected["grey16"] = p, np.repeat(g[..., None], 3, axis=2)

    rgb16 = base.astype(np.uint16) * 257
    rgb16[0, 0] = (65535, 32896, 0)  # RGB
    p = root / "rgb16.png"
    assert cv2.imwrite(str(p), cv2.cvtColor(rgb16, cv2.COLOR_RGB2BGR))
    e = base.copy()
    e[0, 0] = (255, 128, 0)
    odd.paths["rgb16"], odd.expected["rgb16"] = p, e

    p = save(Image.fromarray(grey8, "L"), root / "sub" / "grey8.png")
    odd.paths["grey8"], odd.expected["grey8"] = p, np.repeat(grey8[..., None], 3, axis=2)

    pal = Image.fromarray(base).quantize(64)
    p = save(pal, root / "sub" / "palette.png")
    odd.paths["palette"], odd.expected["palette"] = p, np.asarray(pal.convert("RGB"))

    pal_t = Image.fromarray(base).quantize(64)
    idx = np.asarray(pal_t).copy()
    idx[: h // 2, : w // 2] = 63  # the transparent index: top-left quarter
    pal_t = Image.fromarray(idx, "P")
    pal_t.putpalette(Image.fromarray(base).quantize(64).getpalette())
    p = save(pal_t, root / "sub" / "palette_t.png", transparency=63)
    with Image.open(p) as check:
        assert check.mode == "P" and check.info.get("transparency") == 63
    e = np.asarray(pal_t.convert("RGB")).copy()
    e[idx == 63] = 255
    odd.paths["palette_t"], odd.expected["palette_t"] = p, e

    alpha = np.full((h, w), 255, np.uint8)
    alpha[:, : w // 3] = 0  # left third fully transparent
    alpha[:, w // 3: w // 2] = 128  # then half transparent
    p = save(Image.fromarray(np.dstack([base, alpha]), "RGBA"), root / "rgba.png")
    a = alpha[..., None].astype(np.float32) / 255.0
    odd.paths["rgba"] = p
    odd.expected["rgba"] = np.clip(np.rint(base * a + 255.0 * (1 - a)), 0, 255).astype(np.uint8)

    p = root / "rotated.jpg"
    stored = _exif_rotated_jpeg(p)
    odd.paths["exif6"], odd.expected["exif6"] = p, np.ascontiguousarray(np.rot90(stored, k=-1))  # clockwise

    # --- bad files -------------------------------------------------------------------------------
    (root / "empty.jpg").write_bytes(b"")
    odd.bad["empty.jpg"] = "empty file"
    buf = io.BytesIO()
    Image.fromarray(small_photo(2, 120)).save(buf, "JPEG", quality=90)
    (root / "sub" / "truncated.jpg").write_bytes(buf.getvalue()[: len(buf.getvalue()) // 3])
    odd.bad["sub/truncated.jpg"] = "truncated"
    (root / "text.jpg").write_text("this is not a JPEG, just text with a .jpg name\n")
    odd.bad["text.jpg"] = "not a recognised image format"
    (root / "notes.txt").write_text("some notes\n")
    odd.bad["notes.txt"] = "not an image file"
    return odd


@pytest.fixture(scope="session")
def odd_files(tmp_path_factory) -> OddFiles:
    return make_odd_files(tmp_path_factory.mktemp("odd"))


@pytest.fixture(scope="session")
def bad_only_dir(tmp_path_factory) -> Path:
    """A folder holding only unusable files."""
    root = tmp_path_factory.mktemp("bad")
    (root / "empty.jpg").write_bytes(b"")
    (root / "text.jpg").write_text("not an image\n")
    (root / "notes.txt").write_text("notes\n")
    return root


def copy_tree(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def tree_bytes(root: Path) -> dict[str, bytes]:
    """Every file under `root` (relative posix path -> bytes)."""
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.fixture(scope="session")
def cli_command() -> list[str]:
    """The argv prefix that runs the command line (for Popen)."""
    return list(CRAPPIFY)


@pytest.fixture(scope="session")
def cli():
    """`cli("build-dataset", src, out, ...)` runs the installed `crappify` command in a subprocess."""
    return run_cli


@pytest.fixture(scope="session")
def read_tree():
    """`read_tree(root)`: every file under root as {relative path: bytes}."""
    return tree_bytes


@pytest.fixture(scope="session")
def photo_maker():
    """`photo_maker(index, long_side=140, portrait=False)`: a small real photo as HWC uint8 RGB."""
    return small_photo


def spread_slow_first(flags: list[bool], workers: int) -> list[int]:
    """An order of test indices (`flags[i]`: test i is slow) in which each of `workers` xdist workers starts with its
    share of the slow tests. xdist's worksteal scheduler hands worker k the next len(pending) // (workers - k)
    tests in order, then lets an idle worker steal from the end of another's queue; so with every slow test first
    in the list, worker 0 alone would run all of them while the others, their fast tests done, could steal only
    fast ones. Here the slow tests are dealt round-robin to the front of each worker's block; within each group the
    collection order stays."""
    slow = [i for i, f in enumerate(flags) if f]
    fast = [i for i, f in enumerate(flags) if not f]
    if workers <= 1:
        return slow + fast
    order, left, rest = [], len(flags), iter(fast)
    for k in range(workers):
        size = left // (workers - k)
        mine = slow[k::workers][:size]
        order += mine + [next(rest, None) for _ in range(size - len(mine))]
        left -= size
    order = [i for i in order if i is not None]
    placed = set(order)
    return order + [i for i in slow if i not in placed] + list(rest)


def pytest_collection_modifyitems(config, items):
    """The `slow` tests first, spread over the xdist workers (`spread_slow_first`): a minute-long test collected
    last, or all of them on one worker, would otherwise run alone while the other workers wait."""
    workers = int(getattr(config, "workerinput", {}).get("workercount", 1))
    order = spread_slow_first([item.get_closest_marker("slow") is not None for item in items], workers)
    items[:] = [items[i] for i in order]


def convs_without_channels_last(model: torch.nn.Module, x: torch.Tensor) -> list[str]:
    """The 2-D convolutions of `model` (moved to channels-last) that see a plain-layout input when the model's input
    is channels-last: each of them runs the slower, plain-layout kernel (test_generators, test_critics)."""
    import torch
    from torch import nn

    from srgan.runtime import is_channels_last

    plain: list[str] = []
    hooks = [m.register_forward_hook(lambda m, args, out, name=name: None if is_channels_last(args[0])
                                     else plain.append(name))
             for name, m in model.named_modules() if isinstance(m, nn.Conv2d)]
    try:
        model.to(memory_format=torch.channels_last)(x.contiguous(memory_format=torch.channels_last))
    finally:
        for h in hooks:
            h.remove()
    return plain


# A shipped recipe whose later stages another recipe runs with the same settings stops before them in the capped
# rehearsals (test_rehearse) and the smoke runs (test_smoke_pipelines): recipe -> (the other recipe, the first
# stage left out, keys that may differ besides the run's length, batch and paths). flickr30k-unet-mse trains its
# own generator (MSE, one phase), then the same critic and GAN as flickr30k-lesson7 with EMA off (the plain path of
# every recipe without `ema`): rehearsed twice, they took about 60 s more of a 2-core CPU capped at AVX2, and
# smoke-run twice about 30 s more, for nothing more checked.
# test_rehearse.test_a_recipe_stops_before_the_stages_another_rehearses fails as soon as the two recipes part.
STOPS_BEFORE = {"flickr30k-unet-mse": ("flickr30k-lesson7", "train-critic", {"ema"})}
RUN_LENGTH = frozenset({"epochs", "iters", "checkpoint_every", "bs", "preview_items", "grids", "data", "out",
                        "generator", "critic", "models", "names", "result"})


def recipe_structure(name: str) -> dict[str, dict]:
    """Each stage of shipped recipe `name`, resolved, without the run's length, batch and paths."""
    from srgan.pipeline import PIPELINES_DIR, load_pipeline, stage_configs

    cfgs = stage_configs(load_pipeline(PIPELINES_DIR / f"{name}.yaml"), {"pretrained": False})
    return {stage: {k: v for k, v in cfg.model_dump(mode="json").items() if k not in RUN_LENGTH}
            for stage, cfg in cfgs.items()}


def without_covered_stages(p):
    """Pipeline `p` without the stages STOPS_BEFORE says another recipe runs for it (`p` itself if none)."""
    from srgan.pipeline import STAGES

    if p.name not in STOPS_BEFORE:
        return p
    first = list(STAGES).index(STOPS_BEFORE[p.name][1])
    return p.model_copy(update={stage.replace("-", "_"): None for stage in list(STAGES)[first:]})
