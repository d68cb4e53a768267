"""crappify.imageio: decoding every kind of photo to upright 8-bit RGB, DCT-reduced decoding, atomic writes."""

from __future__ import annotations

import io
import os

import cv2
import numpy as np
import pytest
from PIL import Image, ImageOps

from crappify.errors import CrappifyError
from crappify.imageio import (
    ImageError,
    Photo,
    decode,
    encode,
    is_temp_name,
    link_or_copy_atomic,
    save_image_atomic,
    write_atomic,
)
from crappify.sources import sample_photos

CONVERTIBLE = ["cmyk", "grey16", "rgb16", "grey8", "palette", "palette_t", "rgba", "exif6"]


@pytest.mark.parametrize("kind", CONVERTIBLE)
def test_decode_converts_every_kind_to_upright_rgb8(odd_files, kind):
    img = decode(odd_files.paths[kind])
    expected = odd_files.expected[kind]
    assert img.dtype == np.uint8
    assert img.ndim == 3 and img.shape[2] == 3
    assert img.flags["C_CONTIGUOUS"]
    assert img.shape == expected.shape
    np.testing.assert_array_equal(img, expected)


@pytest.mark.parametrize("kind", CONVERTIBLE)
def test_converted_kinds_are_not_native(odd_files, kind):
    with Photo(odd_files.paths[kind]) as photo:
        assert photo.native is False
        # anything that is not copied keeps the lossless PNG extension unless the format is copyable
        assert photo.extension in (".jpg", ".png")


def test_sixteen_bit_values_are_scaled_not_clipped(odd_files):
    grey = decode(odd_files.paths["grey16"])
    assert tuple(grey[0, 0]) == (255, 255, 255)  # 65535
    assert tuple(grey[0, 1]) == (128, 128, 128)  # 32896
    assert tuple(grey[0, 2]) == (0, 0, 0)
    # a photo's mid-tones survive: not everything saturates to 255
    assert 40 < grey.mean() < 220
    rgb = decode(odd_files.paths["rgb16"])
    assert tuple(rgb[0, 0]) == (255, 128, 0)


def test_greyscale_is_replicated_on_three_channels(odd_files):
    img = decode(odd_files.paths["grey8"])
    np.testing.assert_array_equal(img[..., 0], img[..., 1])
    np.testing.assert_array_equal(img[..., 0], img[..., 2])
    with Image.open(odd_files.paths["grey8"]) as src:
        assert src.mode == "L"
        np.testing.assert_array_equal(img[..., 0], np.asarray(src))


def test_transparency_is_composited_on_white(odd_files):
    rgba = decode(odd_files.paths["rgba"])
    w = rgba.shape[1]
    assert (rgba[:, : w // 3] == 255).all(), "fully transparent pixels must become white"
    with Image.open(odd_files.paths["rgba"]) as src:
        opaque = np.asarray(src)[..., 3] == 255
        np.testing.assert_array_equal(rgba[opaque], np.asarray(src)[..., :3][opaque])
    pal = decode(odd_files.paths["palette_t"])
    h, w = pal.shape[:2]
    assert (pal[: h // 2, : w // 2] == 255).all()
    assert not (pal[h // 2:, w // 2:] == 255).all()


def test_cmyk_jpeg_converts_close_to_the_original_colours(odd_files, photo_maker):
    img = decode(odd_files.paths["cmyk"])
    original = photo_maker(3, 96)
    assert img.shape == original.shape
    assert np.abs(img.astype(int) - original).mean() < 10


def test_exif_orientation_6_is_applied(odd_files):
    path = odd_files.paths["exif6"]
    with Image.open(path) as stored:
        sw, sh = stored.size
        assert stored.getexif()[0x0112] == 6
        stored_px = np.asarray(stored.convert("RGB"))
        upright = np.asarray(ImageOps.exif_transpose(stored).convert("RGB"))
    with Photo(path) as photo:
        assert photo.orientation == 6 and photo.rotated
        assert photo.size == (sh, sw)  # upright (width, height): swapped
        assert photo.native is False
        px, reduced = photo.pixels()
    assert reduced == 1
    assert px.shape == (sw, sh, 3)
    np.testing.assert_array_equal(px, upright)
    np.testing.assert_array_equal(px, np.rot90(stored_px, k=-1))
    # the red block stored at the top-left is at the top-right once upright (a clockwise turn) ...
    assert tuple(px[2, -3]) == pytest.approx((255, 0, 0), abs=40)
    # ... and the blue bar stored along the bottom runs down the left side
    assert px[:, 3, 2].mean() > 200 and px[:, 3, 0].mean() < 60


@pytest.mark.parametrize("ext", [".jpg", ".png"])
def test_plain_rgb_jpeg_and_png_are_native(tmp_path, ext, photo_maker):
    img = photo_maker(1, 100)
    path = tmp_path / f"plain{ext}"
    Image.fromarray(img).save(path)
    with Photo(path) as photo:
        assert photo.native is True
        assert photo.orientation == 1
        assert photo.size == (img.shape[1], img.shape[0])
        assert photo.extension == ext
        px, reduced = photo.pixels()
    assert reduced == 1 and px.shape == img.shape
    if ext == ".png":
        np.testing.assert_array_equal(px, img)


def test_other_formats_and_transparent_rgb_are_not_native(tmp_path, photo_maker):
    img = photo_maker(1, 80)
    Image.fromarray(img).save(tmp_path / "plain.bmp")
    with Photo(tmp_path / "plain.bmp") as photo:
        assert photo.native is False and photo.extension == ".png"
    Image.fromarray(img).save(tmp_path / "trns.png", transparency=(0, 0, 0))
    with Photo(tmp_path / "trns.png") as photo:
        assert photo.native is False
    exif = Image.Exif()
    exif[0x0112] = 1
    Image.fromarray(img).save(tmp_path / "upright.jpg", exif=exif.tobytes())
    with Photo(tmp_path / "upright.jpg") as photo:
        assert photo.native is True


def test_greyscale_jpeg(tmp_path, photo_maker):
    grey = np.asarray(Image.fromarray(photo_maker(3, 96)).convert("L"))
    path = tmp_path / "grey.jpg"
    Image.fromarray(grey).save(path, quality=90)
    with Photo(path) as photo:
        assert photo.native is False
        px, _ = photo.pixels()
    with Image.open(path) as ref:
        np.testing.assert_array_equal(px, np.repeat(np.asarray(ref)[..., None], 3, axis=2))


def test_jpeg_with_bytes_after_the_end_marker(tmp_path, photo_maker):
    Image.fromarray(photo_maker(3, 96)).save(tmp_path / "a.jpg", quality=90)
    (tmp_path / "b.jpg").write_bytes((tmp_path / "a.jpg").read_bytes() + b"camera trailer \x00\x01")
    np.testing.assert_array_equal(decode(tmp_path / "b.jpg"), decode(tmp_path / "a.jpg"))


def test_png_with_exif_orientation(tmp_path, photo_maker):
    img = photo_maker(3, 96)
    exif = Image.Exif()
    exif[0x0112] = 6
    Image.fromarray(img).save(tmp_path / "r.png", exif=exif.tobytes())
    with Photo(tmp_path / "r.png") as photo:
        assert photo.orientation == 6 and photo.native is False
        assert photo.size == (img.shape[0], img.shape[1])
        np.testing.assert_array_equal(photo.pixels()[0], np.rot90(img, k=-1))


def test_progressive_jpeg_reduced_decode(tmp_path, photo_maker):
    img = photo_maker(3, 160)
    Image.fromarray(img).save(tmp_path / "p.jpg", quality=90, progressive=True)
    with Photo(tmp_path / "p.jpg") as photo:
        assert photo.native is True
        px, reduced = photo.pixels(30)
    assert reduced == 2 and min(px.shape[:2]) >= 30 and px.shape[1] == 80


def test_decompression_bomb_from_a_plain_jpeg_header(tmp_path, photo_maker):
    Image.fromarray(photo_maker(3, 96)).save(tmp_path / "a.jpg")
    with pytest.raises(ImageError, match="decompression bomb: 96x64 = 6144 pixels"):
        Photo(tmp_path / "a.jpg", max_pixels=6143)
    with Photo(tmp_path / "a.jpg", max_pixels=6144) as photo:
        assert photo.size == (96, 64)


@pytest.fixture(scope="module")
def sample_jpeg():
    """A real JPEG that ships with scikit-image / scikit-learn / matplotlib, with short side >= 400."""
    for _, path in sample_photos():
        if path.suffix == ".jpg":
            with Image.open(path) as img:
                if img.mode == "RGB" and min(img.size) >= 400:
                    return path
    pytest.skip("no sample JPEG with a short side of 400 px")


@pytest.mark.parametrize("need_short", [50, 100, 150, 200])
def test_dct_reduced_decode_is_smaller_but_big_enough(sample_jpeg, need_short):
    full = decode(sample_jpeg)
    with Photo(sample_jpeg) as photo:
        px, reduced = photo.pixels(need_short)
    assert reduced > 1
    assert min(px.shape[:2]) >= need_short
    assert px.shape[0] < full.shape[0] and px.shape[1] < full.shape[1]
    assert px.shape[0] == pytest.approx(full.shape[0] / reduced, abs=1)
    assert px.shape[1] == pytest.approx(full.shape[1] / reduced, abs=1)
    # the reduced decode is the same picture: compare with an area-downscale of the full decode
    small = cv2.resize(full, (px.shape[1], px.shape[0]), interpolation=cv2.INTER_AREA)
    assert np.abs(small.astype(int) - px).mean() < 6


def test_dct_reduction_is_not_used_when_it_would_go_below_need(sample_jpeg):
    full = decode(sample_jpeg)
    short = min(full.shape[:2])
    with Photo(sample_jpeg) as photo:
        px, reduced = photo.pixels(-(-short // 2) + 1)  # one more than a 1/2-size decode gives
    assert reduced == 1
    np.testing.assert_array_equal(px, full)


def test_need_short_has_no_effect_on_png(odd_files):
    with Photo(odd_files.paths["rgba"]) as photo:
        px, reduced = photo.pixels(8)
    assert reduced == 1
    np.testing.assert_array_equal(px, odd_files.expected["rgba"])


@pytest.mark.parametrize("name, reason", [("empty.jpg", "empty file"),
                                          ("sub/truncated.jpg", "truncated"),
                                          ("text.jpg", "not a recognised image format"),
                                          ("notes.txt", "not a recognised image format")])
def test_bad_files_raise_image_error_with_a_reason(odd_files, name, reason):
    with pytest.raises(ImageError, match=reason) as info:
        decode(odd_files.root / name)
    assert isinstance(info.value, CrappifyError)
    assert "\n" not in str(info.value)


def test_file_gone_before_decoding_is_an_image_error_naming_the_cause(tmp_path):
    # a file listed but removed before it is processed must be skipped, not crash a build
    with pytest.raises(ImageError, match="file not found"):
        Photo(tmp_path / "nope.jpg")


def test_decompression_bomb_is_refused_from_the_header(odd_files):
    path = odd_files.paths["grey8"]  # 100 x 100
    with pytest.raises(ImageError, match="decompression bomb"):
        Photo(path, max_pixels=100 * 100 - 1)
    with Photo(path, max_pixels=100 * 100) as photo:
        assert photo.size == (100, 100)


def test_decode_accepts_need_short_and_max_pixels(sample_jpeg):
    with pytest.raises(ImageError, match="decompression bomb"):
        decode(sample_jpeg, max_pixels=1000)
    assert min(decode(sample_jpeg, need_short=60).shape[:2]) >= 60


def test_write_atomic_replaces_content_and_leaves_no_temp_file(tmp_path):
    target = tmp_path / "file.bin"
    write_atomic(target, b"first")
    assert target.read_bytes() == b"first"
    write_atomic(target, "second, as text")
    assert target.read_text() == "second, as text"
    assert sorted(os.listdir(tmp_path)) == ["file.bin"]


def test_write_atomic_failure_keeps_the_old_file_and_cleans_up(tmp_path):
    target = tmp_path / "file.bin"
    write_atomic(target, b"old")
    with pytest.raises(TypeError):
        write_atomic(target, 12345)  # type: ignore[arg-type]
    assert target.read_bytes() == b"old"
    assert sorted(os.listdir(tmp_path)) == ["file.bin"]


def test_link_or_copy_atomic_puts_the_same_bytes_in_place(tmp_path, odd_files):
    src = odd_files.paths["exif6"]
    dst = tmp_path / "copy.jpg"
    dst.write_bytes(b"an older file")
    linked = link_or_copy_atomic(src, dst)
    assert dst.read_bytes() == src.read_bytes()
    assert linked == os.path.samefile(src, dst)
    assert sorted(os.listdir(tmp_path)) == ["copy.jpg"]


def test_link_or_copy_atomic_copies_when_linking_fails(tmp_path, odd_files, monkeypatch):
    src = odd_files.paths["exif6"]

    def no_link(*_args):
        raise OSError("cross-device link")

    monkeypatch.setattr(os, "link", no_link)
    assert link_or_copy_atomic(src, tmp_path / "a.jpg") is False
    assert (tmp_path / "a.jpg").read_bytes() == src.read_bytes()
    assert link_or_copy_atomic(src, tmp_path / "b.jpg", data=b"given bytes") is False
    assert (tmp_path / "b.jpg").read_bytes() == b"given bytes"
    assert not os.path.samefile(src, tmp_path / "a.jpg")
    assert sorted(os.listdir(tmp_path)) == ["a.jpg", "b.jpg"]


def test_is_temp_name():
    assert is_temp_name(".a.png.crappify-tmp-123")
    assert not is_temp_name(".a.png.tmp-123")  # another program's (or the user's): never ours to delete
    assert not is_temp_name(".a.png.crappify-tmp-12x") and not is_temp_name(".crappify-tmp-1")
    assert not is_temp_name("a.png")
    assert not is_temp_name(".hidden")
    assert not is_temp_name("a.tmp-1")


def test_png_encode_round_trip_is_lossless(odd_files):
    img = odd_files.expected["rgba"]
    data = encode(img, "png")
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    back = cv2.cvtColor(cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_UNCHANGED), cv2.COLOR_BGR2RGB)
    np.testing.assert_array_equal(back, img)
    with Image.open(io.BytesIO(data)) as pil:
        assert pil.mode == "RGB"
        np.testing.assert_array_equal(np.asarray(pil), img)


def test_jpeg_encode_gives_jpeg_bytes_of_the_right_size_and_quality_matters(odd_files):
    img = odd_files.expected["palette"]
    hi, lo = encode(img, "jpg", quality=95), encode(img, "jpeg", quality=10)
    assert hi[:2] == b"\xff\xd8" and lo[:2] == b"\xff\xd8"
    assert len(lo) < len(hi)
    with Image.open(io.BytesIO(hi)) as pil:
        assert pil.size == (img.shape[1], img.shape[0])
        assert np.abs(np.asarray(pil).astype(int) - img).mean() < 6  # channel order kept (RGB in, RGB out)


def test_encode_rejects_unknown_format(odd_files):
    with pytest.raises(ValueError, match="png, jpg"):
        encode(odd_files.expected["grey8"], "gif")


def test_save_image_atomic_uses_the_extension(tmp_path, odd_files):
    img = odd_files.expected["grey16"]
    save_image_atomic(tmp_path / "x.png", img)
    np.testing.assert_array_equal(decode(tmp_path / "x.png"), img)
    save_image_atomic(tmp_path / "x.JPG", img)
    assert (tmp_path / "x.JPG").read_bytes()[:2] == b"\xff\xd8"
    assert sorted(os.listdir(tmp_path)) == ["x.JPG", "x.png"]


def test_sixteen_bit_rgb_is_scaled_not_truncated(tmp_path):
    """v/257 rounded, as for 16-bit grey: 200 -> 1 (keeping the high byte would give 0), 65279 -> 254."""
    arr = np.zeros((4, 4, 3), np.uint16)
    arr[0, 0] = (200, 65279, 32896)  # RGB
    path = tmp_path / "rgb16.png"
    assert cv2.imwrite(str(path), cv2.cvtColor(arr, cv2.COLOR_RGB2BGR))
    assert tuple(decode(path)[0, 0]) == (1, 254, 128)


@pytest.mark.parametrize("kind", CONVERTIBLE)
def test_pixels_and_alpha_keep_transparency_apart_and_agree_with_decode(odd_files, kind):
    """enhance's reader: the same RGB as `decode` where there is no transparency; where there is, the alpha plane
    apart and RGB not composited, so compositing it on white gives `decode`'s pixels (±1 for rounding)."""
    with Photo(odd_files.paths[kind]) as photo:
        rgb, alpha = photo.pixels_and_alpha()
        transparent, grey = photo.transparent, photo.grey
    expected = odd_files.expected[kind]
    assert rgb.dtype == np.uint8 and rgb.shape == expected.shape and rgb.flags["C_CONTIGUOUS"]
    assert transparent == (kind in ("palette_t", "rgba"))
    assert grey == (kind in ("grey16", "grey8"))
    if alpha is None:
        assert not transparent
        np.testing.assert_array_equal(rgb, expected)
        return
    assert alpha.shape == rgb.shape[:2] and alpha.dtype == np.uint8 and 0 in alpha and 255 in alpha
    a = alpha[..., None].astype(np.float32) / 255.0
    composited = np.rint(rgb * a + 255.0 * (1.0 - a))
    assert np.abs(composited - expected.astype(np.float32)).max() <= 1


def test_sixteen_bit_rgba_png_alpha_is_scaled_not_clipped(tmp_path):
    arr = np.zeros((4, 6, 4), np.uint16)  # BGRA for OpenCV
    arr[..., 2] = 65535  # red
    arr[..., 3] = np.array([0, 32896, 65535, 65535, 65535, 65535], np.uint16)
    path = tmp_path / "deep.png"
    cv2.imwrite(str(path), arr)
    with Photo(path) as photo:
        rgb, alpha = photo.pixels_and_alpha()
    assert tuple(rgb[0, 0]) == (255, 0, 0)
    assert alpha[0].tolist() == [0, 128, 255, 255, 255, 255]


def test_a_png_wider_than_libpngs_limit_decodes_without_its_warnings(tmp_path):
    """libpng refuses a side over 1,000,000 px after printing two warnings on stderr: Pillow decodes it instead."""
    import struct
    import subprocess
    import sys
    import zlib

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    width = 1_200_000
    png = (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", width, 1, 8, 0, 0, 0, 0))
           + chunk(b"IDAT", zlib.compress(b"\0" + bytes(range(256)) * (width // 256) + bytes(width % 256)))
           + chunk(b"IEND", b""))
    path = tmp_path / "wide.png"
    path.write_bytes(png)
    script = f"from crappify.imageio import decode; print(decode({str(path)!r}).shape)"
    res = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60)
    assert res.stdout.strip() == f"(1, {width}, 3)" and res.stderr == "", res.stderr
