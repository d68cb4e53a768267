"""enhance and model files on hostile input (issue 23): a 1-px-high photo 2,000,000 px wide, a photo that cannot be
done even at the smallest tile, 255-byte names, a full disk and a read-only OUTDIR, model files whose metadata asks
for a huge build. Every file is made here by the test itself; memory is checked under an address-space limit in a
subprocess, so a regression fails in bounded memory instead of taking the machine's."""

from __future__ import annotations

import errno
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors import safe_open
from safetensors.torch import load_file, save_file

import srgan.enhance
from crappify.errors import ConfigError, CrappifyError
from srgan.checkpoint import load_generator, save_generator
from srgan.enhance import collect_inputs, enhance_files
from srgan.generators import build_generator
from srgan.inference import TiledInference, load_inference

ROOT = Path(__file__).resolve().parents[2]


def run_main(*args) -> tuple[int, str]:
    """`crappify ARGS` in this process: (exit code, stderr)."""
    import contextlib
    import io

    from crappify.cli import main

    err = io.StringIO()
    code = 0
    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(err):
        try:
            main([str(a) for a in args])
        except SystemExit as exc:
            code = exc.code if isinstance(exc.code, int) else 1
    return code, err.getvalue()


def errors(err: str) -> list[str]:
    return [ln for ln in err.splitlines() if ln.startswith("crappify: error:")]


def limited(script: str, *args, margin_mb: int) -> subprocess.CompletedProcess:
    """Run `script` in a fresh Python whose address space is limited, once it has imported what it needs and
    called `ready()`, to what it then maps plus `margin_mb`."""
    prelude = textwrap.dedent(f"""
        import resource, sys
        def ready():
            vm = next(int(ln.split()[1]) for ln in open("/proc/self/status") if ln.startswith("VmSize:")) * 1024
            resource.setrlimit(resource.RLIMIT_AS, (vm + ({margin_mb} << 20), resource.RLIM_INFINITY))
        """)
    env = {**os.environ, "MALLOC_ARENA_MAX": "2", "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    return subprocess.run([sys.executable, "-c", prelude + textwrap.dedent(script), *map(str, args)],
                          capture_output=True, text=True, timeout=300, env=env, cwd=ROOT)


# --------------------------------------------------------------------------------------------------------
# item 6: a photo 2,000,000 px wide; a photo that cannot be done


WIDE = """
    import numpy as np, torch
    from pathlib import Path
    from PIL import Image
    from torch import nn
    from srgan.enhance import collect_inputs, enhance_files
    from srgan.inference import TiledInference

    class Flat(nn.Module):  # a U-Net to the engine (32 px grid), at no cost: its output is its input
        crappify_spec = {"arch": "unet-flat", "scale": 1}
        def forward(self, x):
            return x

    torch.set_num_threads(1)
    src, out = Path(sys.argv[1]), Path(sys.argv[2])
    engine = TiledInference(Flat(), tile=1024)
    engine(np.zeros((40, 3000, 3), np.uint8))  # every lazy initialisation done before the limit
    ready()
    res = enhance_files(engine, collect_inputs([src], out), out, 1, progress=False, report=print)
    print("written", sorted(p.name for p in res.written), "failed", [(p.name, r) for p, r in res.failed])
    wide = np.asarray(Image.open(out / "wide.png"))
    assert np.abs(wide.astype(int) - np.asarray(Image.open(src / "wide.png")).astype(int)).max() <= 1
    print("ok")
"""


def test_a_photo_two_million_px_wide_is_enhanced_in_memory_bounded_by_the_tile(tmp_path, photo_maker):
    """The float strip once spanned the photo's width: 768 MB here (7.7 GB at 20,000,000 px), then the out-of-memory
    back-off gave up and took the batch with it. Now the strip is a few tiles wide: within 300 MB beyond what the
    process holds at the start, both photos come out (the output itself is only 6 MB)."""
    src = tmp_path / "in"
    src.mkdir()
    row = np.arange(2_000_000, dtype=np.uint32)
    wide = np.stack([row % 251, row % 241, row % 239], axis=-1).astype(np.uint8)[None]
    Image.fromarray(wide).save(src / "wide.png", compress_level=1)
    Image.fromarray(photo_maker(0, 120)).save(src / "zz_normal.png")
    res = limited(WIDE, src, tmp_path / "out", margin_mb=300)
    assert res.returncode == 0 and res.stdout.rstrip().endswith("ok"), res.stdout[-2000:] + res.stderr[-3000:]
    assert "written ['wide.png', 'zz_normal.png'] failed []" in res.stdout


def test_a_photo_that_cannot_be_done_is_skipped_in_one_line_and_the_next_is_as_without_it(
        sr_file, tmp_path, photo_maker, monkeypatch):
    """Out of memory even at the smallest tile: that photo is skipped with one line naming it, the batch goes on,
    and the next photo is enhanced with the tile asked for (byte-identical to a run without the hostile one)."""
    src = tmp_path / "in"
    src.mkdir()
    Image.fromarray(np.full((1, 5000, 3), 120, np.uint8)).save(src / "a_wide.png")
    Image.fromarray(photo_maker(1, 100)).save(src / "b_normal.png")
    real = TiledInference._model

    def starved(self, x, precision):  # this machine cannot hold any tile of a 1-px-high photo
        if x.shape[-2] == 1:
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 7.68 GiB")
        return real(self, x, precision)

    monkeypatch.setattr(TiledInference, "_model", starved)
    code, err = run_main("enhance", src, "-m", sr_file, "-o", tmp_path / "out", "--tile", 64, "--quiet")
    assert code == 0 and "Traceback" not in err and not errors(err), err
    skips = [ln for ln in err.splitlines() if "skipped" in ln]
    assert len(skips) == 1 and str(src / "a_wide.png") in skips[0] and "out of memory" in skips[0], err
    (src / "a_wide.png").unlink()
    assert run_main("enhance", src, "-m", sr_file, "-o", tmp_path / "alone", "--tile", 64, "--quiet")[0] == 0
    assert (tmp_path / "out" / "b_normal.png").read_bytes() == (tmp_path / "alone" / "b_normal.png").read_bytes()
    assert not (tmp_path / "out" / "a_wide.png").exists()
    # and in the engine: the tile and batch asked for are back once it gives up on a photo
    engine = TiledInference(load_generator(sr_file), tile=64, batch=2, on_note=lambda _t: None)
    with pytest.raises(CrappifyError, match="out of memory"):
        engine(np.zeros((1, 300, 3), np.uint8))
    assert (engine.tile, engine.batch) == (64, 2)


def test_alpha_of_a_very_wide_photo_is_resized_in_blocks(monkeypatch):
    """The alpha plane is resized in blocks of rows and columns, never a whole row of a very wide photo at once,
    and a plane within one block is resized as before (one piece)."""
    import srgan.upsample
    from srgan.enhance import upscale_plane
    from srgan.inference import Upscaled

    plane = np.random.default_rng(0).integers(0, 256, (3, 20_000), dtype=np.uint8)
    sizes: list[int] = []
    real = srgan.upsample.resize_tensor
    monkeypatch.setattr(srgan.upsample, "resize_tensor", lambda x, size: sizes.append(size[1]) or real(x, size))
    out = upscale_plane(plane, 2)
    assert out.shape == (6, 40_000) and max(sizes) <= srgan.enhance.ALPHA_BLOCK + 64
    whole = Upscaled(plane, 2).region(0, 6, 0, 40_000)
    assert np.abs(out.astype(int) - whole.astype(int)).max() <= 1
    small = plane[:, :500]
    assert np.array_equal(upscale_plane(small, 2), Upscaled(small, 2).rows(0, 6))


# --------------------------------------------------------------------------------------------------------
# item 13: names too long to write


def test_255_byte_names_are_written_or_skipped_in_one_line(sr_file, tmp_path, photo_maker):
    """A 255-byte name keeps its name (the temporary name fits too); a 255-byte name without an extension would
    get `.png` added (259 bytes, which no file system takes): skipped with one line naming it, the batch goes on."""
    src = tmp_path / "in"
    src.mkdir()
    fits, too_long = "f" * 251 + ".png", "n" * 255
    for i, name in enumerate((fits, too_long, "normal.png")):
        Image.fromarray(photo_maker(i, 60)).save(src / name, format="PNG")
    out = tmp_path / "out"
    code, err = run_main("enhance", src / fits, src / too_long, src / "normal.png", "-m", sr_file, "-o", out,
                         "--quiet")
    assert code == 0 and "Traceback" not in err and not errors(err), err
    skips = [ln for ln in err.splitlines() if "skipped" in ln]
    assert len(skips) == 1 and str(src / too_long) in skips[0] and "longer than a file name" in skips[0], err
    assert sorted(p.name for p in out.iterdir()) == sorted([fits, "normal.png"])


def test_any_write_error_of_one_output_skips_it_and_the_batch_goes_on(engine_items, monkeypatch):
    engine, items, out = engine_items
    real = srgan.enhance.write_atomic

    def refuse_first(path, data, *a, **kw):
        if Path(path).name == items[0][1].name:
            raise OSError(errno.ENAMETOOLONG, "File name too long", str(path))
        return real(path, data, *a, **kw)

    monkeypatch.setattr(srgan.enhance, "write_atomic", refuse_first)
    messages: list[str] = []
    res = enhance_files(engine, items, out, 2, progress=False, report=messages.append)
    assert [p.name for p in res.written] == [rel.name for _s, rel in items[1:]]
    assert len(messages) == 1 and str(items[0][0]) in messages[0] and "File name too long" in messages[0]


# --------------------------------------------------------------------------------------------------------
# item 15: a full disk, a read-only OUTDIR


@pytest.fixture
def engine_items(sr_file, tmp_path, photo_maker):
    src = tmp_path / "in"
    src.mkdir()
    for i in range(3):
        Image.fromarray(photo_maker(i, 50)).save(src / f"p{i}.png")
    return load_inference(sr_file, tile=0), collect_inputs([src], tmp_path / "out"), tmp_path / "out"


@pytest.mark.parametrize("code, cause", [(errno.ENOSPC, "No space left on device"),
                                         (errno.EROFS, "Read-only file system"),
                                         (errno.EACCES, "Permission denied")])
def test_a_full_disk_or_read_only_outdir_stops_in_one_line_and_a_rerun_ends_identical(
        sr_file, engine_items, tmp_path, monkeypatch, code, cause):
    _engine, items, out = engine_items
    src = items[0][0].parent
    real = srgan.enhance.write_atomic
    calls = []

    def full_after_one(path, data, *a, **kw):
        calls.append(path)
        if len(calls) > 1:
            raise OSError(code, os.strerror(code), str(path))
        return real(path, data, *a, **kw)

    monkeypatch.setattr(srgan.enhance, "write_atomic", full_after_one)
    status, err = run_main("enhance", src, "-m", sr_file, "-o", out, "--quiet")
    lines = errors(err)
    assert status != 0 and "Traceback" not in err and len(lines) == 1, err
    assert str(out / "p1.png") in lines[0] and cause in lines[0], lines
    assert len(calls) == 2  # stopped at once: every later write would fail the same way
    assert sorted(p.name for p in out.iterdir()) == ["p0.png"]
    monkeypatch.setattr(srgan.enhance, "write_atomic", real)
    assert run_main("enhance", src, "-m", sr_file, "-o", out, "--quiet")[0] == 0
    assert run_main("enhance", src, "-m", sr_file, "-o", tmp_path / "whole", "--quiet")[0] == 0
    assert {p.name: p.read_bytes() for p in out.iterdir()} == {p.name: p.read_bytes()
                                                              for p in (tmp_path / "whole").iterdir()}


@pytest.mark.skipif(not hasattr(os, "geteuid") or os.geteuid() == 0, reason="root writes into read-only folders")
def test_read_only_outdir_for_real(sr_file, engine_items):
    _engine, items, out = engine_items
    out.mkdir()
    (out / "sub").mkdir()
    out.chmod(0o555)
    try:
        status, err = run_main("enhance", items[0][0].parent, "-m", sr_file, "-o", out, "--quiet")
    finally:
        out.chmod(0o755)
    lines = errors(err)
    assert status != 0 and "Traceback" not in err and len(lines) == 1 and str(out) in lines[0], err


# --------------------------------------------------------------------------------------------------------
# item 7: model files whose metadata asks for a huge build


def crafted(src: Path, dst: Path, **spec_changes) -> Path:
    """`src`'s tensors under metadata whose spec has `spec_changes` (options merged)."""
    with safe_open(str(src), framework="pt") as fh:
        meta = dict(fh.metadata())
    spec = json.loads(meta["spec"])
    options = {**spec["options"], **spec_changes.pop("options", {})}
    meta["spec"] = json.dumps({**spec, **spec_changes, "options": options})
    save_file(load_file(str(src)), str(dst), metadata=meta)
    return dst


@pytest.fixture(scope="module")
def timm_file(tmp_path_factory) -> Path:
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("timm") / "timm.safetensors"
    save_generator(build_generator("unet-timm:resnet18", img_size=64, self_attention=True), path, data_scale=1)
    return path


LOAD = """
    import numpy as np
    from srgan.checkpoint import load_generator
    from srgan.inference import load_inference
    load_generator(sys.argv[2])  # imports and lazy initialisation paid for before the limit
    ready()
    model = load_generator(sys.argv[1])
    print("img_size", model.crappify_spec["img_size"])
    print(load_inference(sys.argv[1], tile=64)(np.zeros((40, 50, 3), np.uint8)).shape)
"""


def test_a_timm_unet_file_claiming_img_size_2048_is_rebuilt_small(timm_file, tmp_path):
    """Self-attention at img_size 2048 meant a 16 GiB attention map in fastai's dummy pass when the U-Net was rebuilt;
    the layers are the same at any size, so it is rebuilt at 256 px, within 1.5 GB of what the process holds, and
    keeps its recorded size."""
    huge = crafted(timm_file, tmp_path / "huge.safetensors", img_size=2048)
    res = limited(LOAD, huge, timm_file, margin_mb=1500)
    assert res.returncode == 0, res.stderr[-3000:]
    assert "img_size 2048" in res.stdout and "(40, 50, 3)" in res.stdout, res.stdout


def test_a_timm_unet_that_rebuilds_only_at_its_own_size_is_bounded(timm_file, tmp_path, monkeypatch):
    """Where the small rebuild fails (simulated: a rebuild size below a U-Net's minimum), the recorded size is used
    only up to MAX_BUILD_IMG_SIZE; above it, one line naming the file."""
    import srgan.checkpoint
    import srgan.generators

    real = srgan.generators.build_generator

    def guarded(*args, img_size, **kwargs):  # a real build (not the shape probe) over the bound would take GBs
        assert img_size <= 512 or torch.empty(0).device.type == "meta", f"a real build at img_size {img_size}"
        return real(*args, img_size=img_size, **kwargs)

    monkeypatch.setattr(srgan.generators, "build_generator", guarded)
    monkeypatch.setattr(srgan.checkpoint, "BUILD_IMG_SIZE", 16)
    assert load_generator(timm_file).crappify_spec["img_size"] == 64
    huge = crafted(timm_file, tmp_path / "huge.safetensors", img_size=2048)
    with pytest.raises(CrappifyError) as err:
        load_generator(huge)
    assert str(huge) in str(err.value) and "at most 512" in str(err.value) and "\n" not in str(err.value)


OOM = RuntimeError("DefaultCPUAllocator: can't allocate memory: you tried to allocate 17179869184 bytes")


@pytest.mark.parametrize("where,error", [
    ("allocating", OOM),  # the meta-built model made real (the usual way, srgan.runtime.holding)
    ("building", OOM),  # a real build, where only one gives the model whole
    ("building", ConfigError("timm model 'resnet18' does not work as a U-Net encoder at img_size 2048: [enforce fail "
                             "at alloc_cpu.cpp:127] DefaultCPUAllocator: can't allocate memory"))])
def test_running_out_of_memory_rebuilding_a_model_names_the_file(sr_file, monkeypatch, where, error):
    """However the rebuild reports it (torch's allocator, or timm's encoder check wrapping it), one line naming the
    file."""
    import srgan.checkpoint
    import srgan.generators

    if where == "allocating":
        def starved_to_empty(self, *args, **kwargs):
            raise error

        monkeypatch.setattr(torch.nn.Module, "to_empty", starved_to_empty)
    else:
        real = srgan.generators.build_generator

        def starved(*args, **kwargs):
            if torch.empty(0).device.type != "meta":  # the real build, not the shape probe
                raise error
            return real(*args, **kwargs)

        monkeypatch.setattr(srgan.generators, "build_generator", starved)
        monkeypatch.setattr(srgan.checkpoint, "holding", lambda model, state: None)
    code, err = run_main("export", "-m", sr_file, "--torchscript", sr_file.with_suffix(".pt"))
    lines = errors(err)
    assert code != 0 and "Traceback" not in err and len(lines) == 1, err
    assert str(sr_file) in lines[0] and "allocate memory" in lines[0]


MEMORY_OPTIONS = {  # every metadata value that sizes a model, per arch: far beyond what its tensors hold
    "srresnet": ({"scale": 2, "n_blocks": 1, "n_feats": 8}, [{"options": {"n_feats": 1024}},
                                                              {"options": {"n_blocks": 1024}}, {"scale": 8},
                                                              {"img_size": 2048}]),
    "rrdb": ({"scale": 2, "n_blocks": 1, "n_feats": 8, "growth": 4}, [{"options": {"n_feats": 1024}},
                                                                       {"options": {"growth": 1024}},
                                                                       {"options": {"n_blocks": 1024}}, {"scale": 4},
                                                                       {"img_size": 2048}]),
    "unet-small": ({"width": 4}, [{"options": {"width": 1024}}, {"options": {"depths": [1024] * 4}},
                                  {"img_size": 2048}]),
}


@pytest.mark.parametrize("arch", sorted(MEMORY_OPTIONS))
def test_memory_sizing_metadata_is_refused_or_harmless_for_every_arch(arch, tmp_path):
    """Options that size a model are checked against the file's tensors before anything is built (one line naming
    the file); img_size sizes nothing these archs rebuild (not used, or rebuilt at 256 px at most)."""
    import time

    torch.manual_seed(0)
    built, cases = MEMORY_OPTIONS[arch]
    good = tmp_path / "good.safetensors"
    save_generator(build_generator(arch, img_size=64, **built), good, data_scale=2)
    for i, changes in enumerate(cases):
        path = crafted(good, tmp_path / f"bad{i}.safetensors", **changes)
        start = time.monotonic()
        if changes == {"img_size": 2048}:
            assert load_generator(path).crappify_spec["img_size"] == 2048
        else:
            with pytest.raises(CrappifyError) as err:
                load_generator(path)
            assert str(path) in str(err.value) and "\n" not in str(err.value), (changes, str(err.value))
        assert time.monotonic() - start < 5, changes
