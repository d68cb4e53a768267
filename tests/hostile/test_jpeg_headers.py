"""Lying JPEG headers: the fast marker parser must never report another size than the decoders use.

The files are crafted here from the sample photos: a decompression bomb whose RST marker hides its real
32768x32768 frame from a parser that gives standalone markers a length, and a few hundred seeded mutations
of real JPEGs (standalone markers, fill bytes, fake frame headers and changed lengths inserted). Invariant:
whenever `crappify.imageio._jpeg_header` accepts a file, Pillow opens it with the same size, and whatever
OpenCV decodes from it has that size too.
"""

from __future__ import annotations

import io
import os
import subprocess
import sys
import time

import cv2
import numpy as np
import pytest
from PIL import Image

from crappify.imageio import DEFAULT_MAX_PIXELS, ImageError, Photo, _jpeg_header, decode

STANDALONE = [b"\xff\xd0", b"\xff\xd3", b"\xff\xd7", b"\xff\x01", b"\xff\x00", b"\xff\xd8", b"\xff\xd9",
              b"\xff\xff", b"\xff\xff\xff"]


def _jpeg(img: np.ndarray, **kw) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(img).save(buf, "JPEG", **kw)
    return buf.getvalue()


@pytest.fixture(scope="module")
def corpus(photo_maker) -> list[bytes]:
    """Small real JPEGs of every plain kind: baseline, progressive, restart markers, grey, comment, ICC,
    OpenCV's encoder."""
    a, b = photo_maker(0, 64), photo_maker(5, 56, portrait=True)
    grey = np.asarray(Image.fromarray(a).convert("L"))
    ok, cv_bytes = cv2.imencode(".jpg", cv2.cvtColor(b, cv2.COLOR_RGB2BGR))
    assert ok
    return [_jpeg(a, quality=80), _jpeg(b, quality=60, progressive=True),
            _jpeg(a, quality=70, restart_marker_blocks=2), _jpeg(grey, quality=75),
            _jpeg(b, quality=90, comment=b"\xff\xc0\x00\x11\x08\x40\x00\x40\x00\x03"),
            _jpeg(a, quality=50, icc_profile=b"\0" * 300), cv_bytes.tobytes()]


def _segments(data: bytes) -> list[tuple[int, int]]:
    """(offset, marker) of every segment before the first scan of a well-formed JPEG (SOS included)."""
    out, i = [], 2
    while i + 4 <= len(data):
        marker = data[i + 1]
        out.append((i, marker))
        if marker == 0xDA:
            break
        i += 2 + int.from_bytes(data[i + 2:i + 4], "big")
    return out


def _fake_sof(rng: np.random.Generator) -> bytes:
    w, h = (int(x) for x in rng.integers(1, 65536, 2))
    components = b"\x03\x01\x22\x00\x02\x11\x01\x03\x11\x01"
    return b"\xff\xc0\x00\x11\x08" + h.to_bytes(2, "big") + w.to_bytes(2, "big") + components


def _mutate(data: bytes, rng: np.random.Generator) -> bytes:
    """One to three random mutations of the markers before the scan."""
    for _ in range(int(rng.integers(1, 4))):
        segs = _segments(data)
        at = int(segs[int(rng.integers(len(segs)))][0]) if segs else 2
        kind = int(rng.integers(7))
        if kind == 0:  # a standalone marker, a stray 0xFF00 or fill bytes between segments
            data = data[:at] + STANDALONE[int(rng.integers(len(STANDALONE)))] + data[at:]
        elif kind == 1:  # a fake frame header
            data = data[:at] + _fake_sof(rng) + data[at:]
        elif kind == 2 and segs:  # a segment's length changed, slightly or wildly
            off = int(segs[int(rng.integers(len(segs)))][0]) + 2
            old = int.from_bytes(data[off:off + 2], "big")
            new = old + int(rng.integers(-4, 5)) if rng.random() < 0.6 else int(rng.integers(0, 65536))
            data = data[:off] + (new % 65536).to_bytes(2, "big") + data[off + 2:]
        elif kind == 3:  # an RST marker right before the real frame header: the old parser's blind spot
            sof = next((o for o, m in segs if m in (0xC0, 0xC1, 0xC2)), at)
            data = data[:sof] + b"\xff" + bytes([0xD0 + int(rng.integers(8))]) + data[sof:]
        elif kind == 4:  # an APP/COM segment holding a fake frame header
            payload = _fake_sof(rng) * int(rng.integers(1, 3))
            marker = bytes([0xFE if rng.random() < 0.5 else int(rng.integers(0xE2, 0xEE))])
            data = data[:at] + b"\xff" + marker + (len(payload) + 2).to_bytes(2, "big") + payload + data[at:]
        elif kind == 5:  # a byte of the header flipped
            pos = int(rng.integers(2, min(len(data), 400)))
            data = data[:pos] + bytes([int(rng.integers(256))]) + data[pos + 1:]
        else:  # cut short
            data = data[:int(rng.integers(2, len(data)))]
    return data


def _pillow_header(data: bytes) -> tuple[int, int, str] | None:
    try:
        with Image.open(io.BytesIO(data)) as img:
            return (*img.size, img.mode)
    except Exception:
        return None


def test_fast_header_parser_agrees_with_pillow_and_opencv_on_mutated_jpegs(corpus):
    rng = np.random.default_rng(20240612)
    accepted = rejected = 0
    for n in range(600):
        original = corpus[n % len(corpus)]
        data = _mutate(original, rng)
        head = _jpeg_header(data)
        if head is None:
            rejected += 1
            continue
        accepted += 1
        w, h, comps = head
        assert _pillow_header(data) == (w, h, "RGB" if comps == 3 else "L"), (n, head, data[:120])
        try:
            out = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_UNCHANGED)
        except cv2.error:
            out = None
        if out is not None:
            assert out.shape[:2] == (h, w), (n, head, out.shape)
    # the mutations exercise both sides: many files stay plain, many must go to Pillow
    print(f"accepted {accepted}, rejected {rejected}")
    assert accepted > 60 and rejected > 200, (accepted, rejected)
    for data in corpus:  # unmutated photos all take the fast path, with Pillow's size
        head = _jpeg_header(data)
        assert head is not None and _pillow_header(data)[:2] == head[:2]


def rst_bomb() -> bytes:
    """A 65 KB JPEG whose frame header says 32768x32768, preceded by an RST0 marker; a parser that reads a
    length after RST0 takes the real frame header's first bytes (0xFFC0 = 65472) for one and lands on a
    16x16 frame header hidden in the comment that follows."""
    real = b"\xff\xc0\x00\x11\x08\x80\x00\x80\x00\x03\x01\x22\x00\x02\x11\x01\x03\x11\x01"
    fake = b"\xff\xc0\x00\x11\x08\x00\x10\x00\x10\x03\x01\x22\x00\x02\x11\x01\x03\x11\x01"
    head = b"\xff\xd8" + b"\xff\xd0" + real  # the lying parser jumps from offset 2 to 2 + 2 + 65472
    com_start = len(head)
    fake_at = 2 + 2 + 0xFFC0
    com_len = fake_at + len(fake) + 64 - (com_start + 2)
    payload = bytearray(com_len - 2)
    payload[fake_at - (com_start + 4):fake_at - (com_start + 4) + len(fake)] = fake
    qt = b"\xff\xdb\x00\x43\x00" + bytes([1] * 64)
    sos = b"\xff\xda\x00\x0c\x03\x01\x00\x02\x11\x03\x11\x00\x3f\x00"
    return head + b"\xff\xfe" + com_len.to_bytes(2, "big") + bytes(payload) + qt + sos + b"\x00" * 64 + b"\xff\xd9"


def test_rst_marker_bomb_is_refused_from_the_header(tmp_path, monkeypatch):
    data = rst_bomb()
    assert 60_000 < len(data) < 70_000
    with monkeypatch.context() as m:
        m.setattr(Image, "MAX_IMAGE_PIXELS", None)
        with Image.open(io.BytesIO(data)) as img:  # what the file really is
            assert img.size == (32768, 32768)
    assert _jpeg_header(data) is None
    path = tmp_path / "bomb.jpg"
    path.write_bytes(data)
    start = time.perf_counter()
    with pytest.raises(ImageError, match="decompression bomb"):
        Photo(path)
    with pytest.raises(ImageError, match="decompression bomb"):
        decode(path)
    assert time.perf_counter() - start < 1.0  # refused from the header, nothing decoded


def test_decoded_shape_must_match_the_header(tmp_path, photo_maker, monkeypatch):
    """A decoder that reads a larger frame than the header announced fails the file (no pixels returned)."""
    path = tmp_path / "a.jpg"
    path.write_bytes(_jpeg(photo_maker(1, 64)))
    real = cv2.imdecode

    def bigger(buf, flags):
        out = real(buf, flags)
        return np.zeros((out.shape[0] * 4, out.shape[1] * 4, *out.shape[2:]), out.dtype)

    monkeypatch.setattr(cv2, "imdecode", bigger)
    with pytest.raises(ImageError, match="differs from the header"):
        decode(path)


def test_opencv_pixel_cap_is_set_before_cv2_loads():
    """Importing crappify sets OPENCV_IO_MAX_IMAGE_PIXELS before cv2 loads, so OpenCV itself refuses a
    header over the cap (it would otherwise try to allocate it); a value the user set is kept."""
    code = (
        "import os, struct, zlib\n"
        "import crappify.imageio\n"
        "import cv2, numpy as np\n"
        "def chunk(t, d): return struct.pack('>I', len(d)) + t + d + struct.pack('>I', zlib.crc32(t + d))\n"
        "png = (b'\\x89PNG\\r\\n\\x1a\\n' + chunk(b'IHDR', struct.pack('>IIBBBBB', 10000, 9500, 8, 2, 0, 0, 0))\n"
        "       + chunk(b'IDAT', zlib.compress(b'\\0' * 100)) + chunk(b'IEND', b''))\n"
        "print(os.environ['OPENCV_IO_MAX_IMAGE_PIXELS'])\n"
        "try:\n"
        "    cv2.imdecode(np.frombuffer(png, np.uint8), cv2.IMREAD_COLOR)\n"
        "    print('decoded')\n"
        "except cv2.error as exc:\n"
        "    print('refused' if 'CV_IO_MAX_IMAGE_PIXELS' in str(exc) else exc)\n"
    )
    env = {k: v for k, v in os.environ.items() if k != "OPENCV_IO_MAX_IMAGE_PIXELS"}
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120)
    assert proc.stdout.split() == [str(DEFAULT_MAX_PIXELS), "refused"], proc.stdout + proc.stderr
    env["OPENCV_IO_MAX_IMAGE_PIXELS"] = str(200_000_000)
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120)
    assert proc.stdout.split()[0] == "200000000", proc.stdout + proc.stderr
