"""The hostile and odd image matrix of issue 10: each case's encoded bytes and the outcome it
must have wherever an image is read: ``wsdan data prepare`` (``wsdan.data.shards``), the Ray
Data pipeline (``wsdan.data.decode.decode_batch`` in its tasks) and the served model
(``wsdan.tracking.pyfunc``). Used by tests/data/test_hostile_images.py and
tests/tracking/test_serving_hostile.py.

Two outcomes:

- *converted*: the image decodes to RGB, and resized to s×s it equals (mean absolute
  difference at most ``tolerance``, for JPEG loss) the resize of ``reference``: the RGB
  pixels the file means (alpha over white, 16-bit scaled, first frame, stored orientation:
  EXIF orientation is ignored everywhere, as documented in wsdan/data/decode.py).
- *refused*: ``DecodeError`` whose message holds ``reason``: skipped and counted by prepare
  and the pipeline, HTTP 400 naming the row in serving.

Everything is built in memory in milliseconds: the decompression bombs are valid PNGs whose
zlib stream is one compressed block of zeros repeated (`zeros_zlib`), so a 50000×50000 bomb
is ~400 KB and costs nothing to make, while decoding it would take 2.5 G pixels.
"""

from __future__ import annotations

import functools
import io
import struct
import zlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

ORIENTATION = 0x0112  # the EXIF tag
CLASSES = ("a", "b")  # the class folders `write_folder` spreads the cases over


@dataclass(frozen=True)
class Case:
    name: str  # also the file's name without extension
    ext: str
    data: bytes
    reference: np.ndarray | None = None  # converted: H×W×3 uint8, the pixels the file means
    reason: str | None = None  # refused: part of the error message
    tolerance: float = 1.0  # converted: mean absolute difference allowed, 0-255

    @property
    def converted(self) -> bool:
        return self.reference is not None

    @property
    def filename(self) -> str:
        return self.name + self.ext

    @property
    def size(self) -> tuple[int, int]:
        """(width, height) of a converted image, as stored."""
        assert self.reference is not None
        return self.reference.shape[1], self.reference.shape[0]

    def assert_reason(self, message: str) -> None:
        """``message`` (of a refused case's error) says why, in any case of letters."""
        assert self.reason is not None and self.reason.lower() in message.lower(), (
            self.name, message)

    def expected(self, size: int) -> np.ndarray:
        """``reference`` resized to size×size×3 (PIL bilinear, as the decoder resizes)."""
        assert self.reference is not None
        im = Image.fromarray(self.reference).resize((size, size), Image.Resampling.BILINEAR)
        return np.asarray(im, np.uint8)

    def assert_matches(self, image: np.ndarray, size: int) -> None:
        """``image`` (size×size×3 or 3×size×size uint8) is this case's reference, resized."""
        if image.shape == (3, size, size):
            image = image.transpose(1, 2, 0)
        assert image.shape == (size, size, 3) and image.dtype == np.uint8, (self.name, image.shape)
        diff = np.abs(image.astype(np.float32) - self.expected(size)).mean()
        assert diff <= self.tolerance, f"{self.name}: mean abs difference {diff:.2f}"


# -- building blocks -------------------------------------------------------------------------


def _save(im: Image.Image, fmt: str, **kw) -> bytes:
    buf = io.BytesIO()
    im.save(buf, format=fmt, **kw)
    return buf.getvalue()


def _photo(h: int, w: int, seed: int) -> np.ndarray:
    """H×W×3 uint8 like a photo: smooth gradients and a soft blob (compresses like one)."""
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    blob = np.exp(-(((xx - 0.6 * w) / (0.25 * w)) ** 2 + ((yy - 0.4 * h) / (0.3 * h)) ** 2))
    a = np.stack([40 + 150 * xx / w + 60 * blob, 60 + 120 * yy / h, 180 - 120 * blob], -1)
    a += np.random.default_rng(seed).normal(0, 2, a.shape)
    return np.clip(a, 0, 255).astype(np.uint8)


def _chunk(kind: bytes, body: bytes) -> bytes:
    return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))


def png(width: int, height: int, bit_depth: int, colour_type: int, idat: bytes) -> bytes:
    """A PNG from its parts (PIL cannot write 16-bit RGB, nor a bomb without the pixels)."""
    ihdr = struct.pack(">IIBBBBB", width, height, bit_depth, colour_type, 0, 0, 0)
    return (b"\x89PNG\r\n\x1a\n" + _chunk(b"IHDR", ihdr) + _chunk(b"IDAT", idat)
            + _chunk(b"IEND", b""))


def zeros_zlib(n_bytes: int, block: int = 1 << 16) -> bytes:
    """A valid zlib stream of ``n_bytes`` zero bytes, without compressing them: one block
    compressed and full-flushed (so it is byte-aligned and refers to nothing before it),
    repeated. The Adler-32 of zeros is ``(n mod 65521) << 16 | 1``."""
    c = zlib.compressobj(9, zlib.DEFLATED, -15)
    one = c.compress(b"\0" * block) + c.flush(zlib.Z_FULL_FLUSH)
    whole, rest = divmod(n_bytes, block)
    c = zlib.compressobj(9, zlib.DEFLATED, -15)
    tail = c.compress(b"\0" * rest) + c.flush(zlib.Z_FINISH)
    return b"\x78\xda" + one * whole + tail + struct.pack(">I", ((n_bytes % 65521) << 16) | 1)


def bomb_png(width: int, height: int) -> bytes:
    """A valid black 1-bit PNG of width×height: a few hundred KB that decode to width·height
    pixels (×3 bytes once converted to RGB)."""
    row = 1 + (width + 7) // 8  # filter byte + packed bits
    return png(width, height, 1, 0, zeros_zlib(row * height))


# -- the matrix ------------------------------------------------------------------------------


def _converted() -> list[Case]:
    photo = _photo(40, 48, 1)
    one = np.array([[[200, 30, 90]]], np.uint8)
    ramp = np.linspace(0, 255, 20000).astype(np.uint8)
    wide = np.stack([np.tile(ramp, (20, 1)), np.tile(ramp[::-1], (20, 1)),
                     np.full((20, 20000), 90, np.uint8)], -1)  # 20000×20: a gradient along x
    tall = np.ascontiguousarray(wide.transpose(1, 0, 2))  # 20×20000

    grey16 = (np.linspace(0, 1, 40 * 56).reshape(40, 56) ** 2 * 65535).astype(np.uint16)
    grey16_ref = np.repeat(np.rint(grey16 / 257.0).astype(np.uint8)[..., None], 3, -1)

    rgb16 = np.stack(np.broadcast_arrays(*np.ogrid[0:24, 0:32, 0:1]), -1)[..., 0, :]
    rgb16 = (np.stack([rgb16[..., 0] * 2700, rgb16[..., 1] * 2000,
                       np.full((24, 32), 40000)], -1)).astype(">u2")  # 48-bit RGB
    raw = b"".join(b"\0" + row.tobytes() for row in rgb16)
    rgb16_ref = (rgb16.astype(np.uint32) >> 8).astype(np.uint8)  # PIL keeps the high byte

    # Palette with transparency: index 0 fully transparent (white), 1 opaque blue, 2 red at
    # alpha 128 (composited over white: 255, 127, 127).
    idx = np.zeros((30, 36), np.uint8)
    idx[:, 12:24], idx[:, 24:] = 1, 2
    pal = Image.fromarray(idx, "P")
    pal.putpalette([0, 255, 0, 0, 0, 255, 255, 0, 0] + [0] * (256 * 3 - 9))
    pal_ref = np.zeros((30, 36, 3), np.uint8)
    pal_ref[:, :12], pal_ref[:, 12:24], pal_ref[:, 24:] = (255, 255, 255), (0, 0, 255), (255, 127, 127)

    # Animated GIF: three frames of different colours; the first one counts.
    frame0 = np.zeros((20, 24, 3), np.uint8)
    frame0[:, :12], frame0[:, 12:] = (255, 0, 0), (255, 255, 0)
    frames = [Image.fromarray(frame0)] + [Image.new("RGB", (24, 20), c) for c in
                                          ((0, 255, 0), (0, 0, 255))]

    stored = np.zeros((40, 60, 3), np.uint8)  # landscape pixels, "portrait" per EXIF
    stored[:, :30], stored[:, 30:] = (220, 40, 40), (40, 40, 220)
    exif = Image.Exif()
    exif[ORIENTATION] = 6  # rotate 90° clockwise to display

    return [
        Case("photo_control", ".jpg", _save(Image.fromarray(photo), "JPEG", quality=95),
             photo, tolerance=3.0),
        Case("one_by_one", ".png", _save(Image.fromarray(one), "PNG"), one),
        Case("strip_wide", ".png", _save(Image.fromarray(wide), "PNG"), wide),
        Case("strip_tall", ".jpg", _save(Image.fromarray(tall), "JPEG", quality=95), tall,
             tolerance=3.0),
        Case("cmyk", ".jpg", _save(Image.fromarray(photo).convert("CMYK"), "JPEG", quality=95),
             photo, tolerance=4.0),
        Case("grey16", ".png", _save(Image.fromarray(grey16), "PNG"), grey16_ref),
        Case("rgb16", ".png", png(32, 24, 16, 2, zlib.compress(raw)), rgb16_ref),
        Case("palette_alpha", ".png", _save(pal, "PNG", transparency=bytes([0, 255, 128])),
             pal_ref),
        Case("animated", ".gif", _save(frames[0], "GIF", save_all=True,
                                       append_images=frames[1:], duration=50, loop=0), frame0),
        Case("exif_rotated", ".jpg", _save(Image.fromarray(stored), "JPEG", quality=95,
                                           exif=exif.tobytes()), stored, tolerance=3.0),
    ]


def _refused() -> list[Case]:
    good = _save(Image.fromarray(_photo(64, 64, 2)), "JPEG", quality=90)
    corrupt = bytearray(_save(Image.fromarray(_photo(32, 32, 3)), "PNG"))
    corrupt[corrupt.index(b"IDAT") + 20] ^= 0xFF  # a flipped byte in the pixel stream
    return [
        Case("zero_byte", ".jpg", b"", reason="empty: 0 bytes"),
        Case("garbage", ".png", b"<html><body>404 Not Found</body></html>\n",  # a failed download
             reason="not an image"),
        Case("truncated", ".jpg", good[: len(good) // 2], reason="truncated"),
        Case("corrupt", ".png", bytes(corrupt), reason="broken data stream"),
        # Far over PIL's own limit (PIL would refuse it too) ...
        Case("bomb_50000", ".png", bomb_png(50000, 50000), reason="2,500,000,000 pixels"),
        # ... and over ours but under the one PIL refuses (2 × 89.5 M pixels; PIL only warns).
        Case("bomb_10000", ".png", bomb_png(10000, 10000), reason="100,000,000"),
    ]


@functools.cache
def cases() -> tuple[Case, ...]:
    """The whole matrix: converted cases first, then refused ones. The files are checked to
    be what they mean to be (mode, frames, EXIF, declared size)."""
    out = (*_converted(), *_refused())
    for case in out:
        if case.name.startswith("bomb_"):  # the IHDR's size (PIL would warn or refuse)
            side = int(case.name.split("_")[1])
            assert struct.unpack(">II", case.data[16:24]) == (side, side)
            continue
        if not case.converted:
            continue
        with Image.open(io.BytesIO(case.data)) as im:
            want = {"cmyk": "CMYK", "grey16": "I;16", "palette_alpha": "P", "animated": "P",
                    "rgb16": "RGB"}.get(case.name)
            assert want is None or im.mode == want, (case.name, im.mode)
            if case.name == "animated":
                assert getattr(im, "n_frames", 1) == 3
            if case.name == "palette_alpha":
                assert "transparency" in im.info
            if case.name == "exif_rotated":
                assert im.getexif()[ORIENTATION] == 6
            assert im.size == case.size, (case.name, im.size)
    return out


def converted() -> list[Case]:
    return [c for c in cases() if c.converted]


def refused() -> list[Case]:
    return [c for c in cases() if not c.converted]


def by_name() -> dict[str, Case]:
    return {c.name: c for c in cases()}


def write_folder(root: Path) -> dict[str, Case]:
    """Every case as a file in a class folder, ``root/<a|b>/<name><ext>`` (alternating), the
    layout of ``wsdan data prepare --format folder`` and of the raw-folder pipeline. Returns
    the cases by relative path (the image id both use)."""
    out = {}
    for i, case in enumerate(cases()):
        rel = f"{CLASSES[i % 2]}/{case.filename}"
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_bytes(case.data)
        out[rel] = case
    return out
