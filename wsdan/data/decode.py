"""Decode encoded images to fixed-size RGB arrays, and whole shard batches to model batches.

Pure PIL + numpy + pyarrow, no Ray and no torch (so Ray's decode workers import it in
~0.1 s): the Ray Data pipeline (``wsdan.data.pipeline``) runs :func:`decode_blocks` in its
read tasks, and the ``DataLoader`` baseline of ``jobs/bench_ingest.py`` runs the same
:func:`decode`, so the two are compared like for like.

Any PIL mode becomes RGB (:func:`to_rgb`): grey, palette, CMYK, 1-bit, 16-bit PNGs (scaled,
not clipped) and images with alpha (composited over white). The image is resized to a
square ``size``×``size`` (bilinear; PIL's resampling filters widen with the scale factor,
i.e. they are antialiased, like ``F.interpolate(..., antialias=True)`` in
``wsdan.transforms``). The aspect ratio is not kept, as in the reference recipe's
``Resize((512, 512))`` (docs/algorithm.md §5). EXIF orientation is ignored: box annotations of
the public data sets are in stored-pixel coordinates, so the network learns stored pixels.

The served model (``wsdan.tracking.pyfunc``) decodes with these same functions — `decode` for
encoded bytes, `decode_array` for pixel arrays — so a request sees the pixels validation saw:
the same RGB conversion, the same resize, and EXIF orientation ignored there too. ``wsdan data
prepare`` checks every image with `decode` too (``wsdan.data.shards.probe_image``), so what it
stores, the pipeline decodes.

Hostile input: an image whose header declares more than :data:`MAX_IMAGE_PIXELS` pixels is
refused from its header, before any pixel is decoded (a decompression bomb: a 400 KB PNG can
declare 50000×50000). The limit is this module's own, whatever PIL's global
``Image.MAX_IMAGE_PIXELS`` says (set lower, PIL refuses first; set to None, this still
holds). Anything PIL raises while reading one image's bytes (corrupt, truncated, empty,
unknown format, a plugin's bug on crafted input) becomes :class:`DecodeError` naming the
problem: the pipeline skips and counts that image, prepare skips and lists it, serving
answers HTTP 400 naming the row. Animated images give their first frame.
"""

from __future__ import annotations

import contextlib
import io
import logging
import posixpath
import re
from collections.abc import Iterator
from typing import Any, NamedTuple

import numpy as np
import pyarrow as pa
from PIL import Image, UnidentifiedImageError

__all__ = ["MAX_IMAGE_PIXELS", "DecodeError", "DecodedBatch", "Decoded", "check_size",
           "decode", "decode_array", "decode_batch", "decode_blocks", "decode_image",
           "decode_rgb", "folder_rows", "open_image", "rescale_boxes", "to_rgb"]

log = logging.getLogger(__name__)

# The largest image decoded, in pixels (width × height as its header declares them): 2**26,
# e.g. 8192×8192, or a 48-megapixel photo. Below PIL's own default (Image.MAX_IMAGE_PIXELS,
# 89,478,485, above which PIL warns and above twice which it refuses), and independent of
# it. Decoding one image at the limit holds up to ~0.6 GB, per decode task (measured with
# `decode` at 512 px, 8192×8192 PNG: RGBA 577 MiB, 16-bit grey 513 MiB, RGB 274 MiB; a JPEG
# less, read at reduced scale; `decode_rgb`, the full-size decode, up to 879 MiB). The photos
# of the public fine-grained data sets are far below it; downscale larger pictures first.
MAX_IMAGE_PIXELS = 2**26

_WHITE = (255, 255, 255)


class DecodeError(ValueError):
    """Bytes that are not a readable image (or an image over `MAX_IMAGE_PIXELS`)."""


def _too_large(what: str) -> DecodeError:
    return DecodeError(
        f"image of {what} is over the limit of {MAX_IMAGE_PIXELS:,} pixels "
        "(wsdan.data.decode.MAX_IMAGE_PIXELS), refused from its header before decoding: a "
        "decompression bomb, or a picture to downscale first"
    )


def check_size(width: int, height: int) -> None:
    """Raise :class:`DecodeError` for an empty size or one over :data:`MAX_IMAGE_PIXELS`."""
    if width <= 0 or height <= 0:
        raise DecodeError(f"image declares an empty size {width}×{height}")
    if width * height > MAX_IMAGE_PIXELS:
        raise _too_large(f"{width}×{height} pixels ({width * height:,})")


_PIL_BOMB = re.compile(r"Image size \((\d+) pixels\)")


def _pil_refused(err: Image.DecompressionBombError) -> DecodeError:
    """PIL's own refusal in ``Image.open`` (over twice its global ``Image.MAX_IMAGE_PIXELS``,
    before we see the size): our message when the image is over our limit too (always, with
    PIL's default), else PIL's (its global was lowered in this process)."""
    found = _PIL_BOMB.search(str(err))
    if found and int(found.group(1)) > MAX_IMAGE_PIXELS:
        return _too_large(f"{int(found.group(1)):,} pixels")
    return DecodeError(f"DecompressionBombError (PIL's Image.MAX_IMAGE_PIXELS): {err}")


class Decoded(NamedTuple):
    image: np.ndarray  # (size, size, 3) uint8 RGB
    width: int  # original size in pixels, the frame of the box annotations
    height: int


def _wide_to_uint8(im: Image.Image) -> Image.Image:
    """16-bit and 32-bit single-channel images → 8-bit "L" by scaling, not clipping.

    PIL's own ``convert("L")`` clips 16-bit values at 255, which turns a 16-bit PNG white.
    ``I;16*`` is scaled by 1/257 (65535 → 255). Mode ``I`` (what PIL makes of some 16-bit
    PNGs and TIFFs) is treated as 16-bit when any value exceeds 255, else as 8-bit; mode
    ``F`` as [0, 1] when its maximum is at most 1, else as 0-255.
    """
    a = np.asarray(im)
    if im.mode.startswith("I;16"):
        scale = 1 / 257.0
    elif im.mode == "I":
        scale = 1 / 257.0 if a.max(initial=0) > 255 else 1.0
    else:  # "F"
        scale = 255.0 if a.max(initial=0.0) <= 1.0 else 1.0
    a = a.astype(np.float32)  # one float copy, then in place: a large image stays affordable
    a *= np.float32(scale)
    np.rint(a, out=a)
    np.clip(a, 0, 255, out=a)
    return Image.fromarray(a.astype(np.uint8), mode="L")


def to_rgb(im: Image.Image) -> Image.Image:
    """Any PIL image → mode RGB. Alpha is composited over white; wide greys are scaled."""
    if im.mode == "RGB":
        return im
    if im.mode.startswith("I") or im.mode == "F":
        im = _wide_to_uint8(im)
    if im.mode == "P":
        # Palette transparency lives in im.info; convert to RGBA first so it is honoured.
        im = im.convert("RGBA" if "transparency" in im.info else "RGB")
    elif im.mode in ("PA", "LA", "La", "RGBa") or "transparency" in im.info:
        im = im.convert("RGBA")  # alpha channel, or a transparent grey/colour value
    if im.mode == "RGBA":
        background = Image.new("RGB", im.size, _WHITE)
        background.paste(im, mask=im.getchannel("A"))
        return background
    return im.convert("RGB")  # L, 1, CMYK, YCbCr, LAB, HSV, RGBX


def _resized(rgb: Image.Image, size: int) -> np.ndarray:
    """The one resize, of the pipeline and of serving: RGB → ``size``×``size``×3 uint8."""
    if rgb.size != (size, size):
        rgb = rgb.resize((size, size), Image.Resampling.BILINEAR)
    return np.asarray(rgb, dtype=np.uint8)


@contextlib.contextmanager
def open_image(data: bytes) -> Iterator[Image.Image]:
    """``Image.open`` of ``data`` (its header only), refused by `check_size` before any pixel
    is decoded; anything raised in the block becomes :class:`DecodeError`.

    Everything, not a list of types: the bytes are untrusted, and PIL's format plugins
    raise more than OSError on crafted input (struct.error, IndexError, ZeroDivisionError...).
    Whatever fails while reading one image fails that image, not the job that read it.
    """
    if not data:
        raise DecodeError("empty: 0 bytes")
    try:
        with Image.open(io.BytesIO(data)) as im:
            check_size(*im.size)
            yield im
    except DecodeError:
        raise
    except UnidentifiedImageError as e:
        raise DecodeError("not an image in a format PIL reads (UnidentifiedImageError)") from e
    except Image.DecompressionBombError as e:
        raise _pil_refused(e) from e
    except Exception as e:  # noqa: BLE001 - see the docstring
        raise DecodeError(f"{type(e).__name__}: {e}") from e


def decode(data: bytes, size: int) -> Decoded:
    """Decode ``data`` to a ``size``×``size``×3 uint8 RGB array and the original size.

    A JPEG at least twice as large as ``size`` on both sides is decoded at a reduced scale
    (PIL ``draft``: 1/2, 1/4 or 1/8 in the DCT, never below ``size``), which is several
    times faster than a full decode followed by a large downscale. Raises
    :class:`DecodeError` for bytes that are not a readable image.
    """
    with open_image(data) as im:
        width, height = im.size
        if im.format == "JPEG" and im.mode in ("RGB", "L"):
            # draft() keeps the result >= the requested size, so quality is kept.
            im.draft(im.mode, (size, size))
        out = _resized(to_rgb(im), size)  # to_rgb forces the (possibly reduced) decode
    if out.shape != (size, size, 3):  # pragma: no cover - to_rgb guarantees RGB
        raise DecodeError(f"decoded to shape {out.shape}, expected {(size, size, 3)}")
    return Decoded(out, width, height)


def decode_image(data: bytes, size: int) -> np.ndarray:
    """Encoded bytes (JPEG, PNG, ... any mode) → uint8 ``size``×``size``×3 RGB (see `decode`)."""
    return decode(data, size).image


def decode_rgb(data: bytes) -> np.ndarray:
    """Encoded bytes → their full-size H×W×3 uint8 RGB pixels (`to_rgb`, no resize, no
    reduced-scale JPEG decode; EXIF orientation ignored). Raises :class:`DecodeError`."""
    with open_image(data) as im:
        return np.array(to_rgb(im), dtype=np.uint8)  # a writable copy


def decode_array(pixels: np.ndarray, size: int | None) -> np.ndarray:
    """Decoded pixels, H×W×3 RGB or H×W grey uint8 → ``size``×``size``×3 uint8 RGB with the
    resize of `decode` (``size`` None: H×W×3, not resized). For pixels of decoded bytes,
    ``decode_array(decode_rgb(b), s)`` equals ``decode_image(b, s)`` except where `decode`
    reads a large JPEG at reduced scale. Raises :class:`DecodeError` for other dtypes or
    shapes."""
    if not isinstance(pixels, np.ndarray) or pixels.dtype != np.uint8:
        raise DecodeError(f"image arrays must be uint8, got {getattr(pixels, 'dtype', None)}")
    if not (pixels.ndim == 2 or (pixels.ndim == 3 and pixels.shape[2] == 3)) or 0 in pixels.shape:
        raise DecodeError(f"image arrays must be H×W×3 (or H×W), got shape {pixels.shape}")
    check_size(pixels.shape[1], pixels.shape[0])
    rgb = to_rgb(Image.fromarray(np.ascontiguousarray(pixels)))
    return np.array(rgb, dtype=np.uint8) if size is None else _resized(rgb, size)


def rescale_boxes(boxes: np.ndarray, width: float, height: float, size: int) -> np.ndarray:
    """Boxes (…, 4) ``x0, y0, x1, y1`` in original pixels → pixels of the ``size``×``size``
    resized image (x scaled by size/width, y by size/height). NaN stays NaN."""
    scale = np.array([size / width, size / height, size / width, size / height], np.float32)
    return (np.asarray(boxes, np.float32) * scale).astype(np.float32)


class DecodedBatch(NamedTuple):
    columns: dict[str, np.ndarray]  # image N×3×S×S uint8, label, object_box, part_box, image_id
    skipped: list[tuple[str, str]]  # (image_id, reason) of rows that did not decode


def _boxes(table: pa.Table, name: str) -> np.ndarray:
    """A nullable box column → float32 N×4, NaN rows where null (or absent).

    Accepts ``list<float>`` and ``fixed_size_list<float>[4]``. Writers: pyarrow 25 cannot
    read back from Parquet a *fixed*-size list column that holds nulls ("Expected all
    lists to be of size=4", apache/arrow#35692), so nullable boxes must be written as
    variable-size lists (or fixed-size without nulls)."""
    n = table.num_rows
    if name not in table.column_names:
        return np.full((n, 4), np.nan, np.float32)
    col = table.column(name).combine_chunks()
    out = np.full((n, 4), np.nan, np.float32)
    valid = ~np.asarray(col.is_null().to_numpy(zero_copy_only=False), dtype=bool)
    if valid.any():
        values = col.filter(pa.array(valid)).flatten().to_numpy(zero_copy_only=False)
        out[valid] = np.asarray(values, np.float32).reshape(-1, 4)
    return out


def decode_batch(table: pa.Table, size: int, *, image_column: str = "image") -> DecodedBatch:
    """Decode a batch of shard rows into model inputs, dropping rows that do not decode.

    ``table`` has the shard columns (``image`` bytes, ``label``, ``image_id``, nullable
    ``bbox`` / ``part_bbox``). Returns ``image`` uint8 N×3×S×S, ``label`` int64 N,
    ``object_box`` / ``part_box`` float32 N×4 in the resized image's pixels (NaN when
    unknown), ``image_id`` str N; ``skipped`` lists the rows left out and why.

    The images are written channel-first here, in the decode workers, because the
    transpose is parallel here and serial in the training process, and the bytes on the
    wire are the same either way (see ``wsdan.data.pipeline``).
    """
    n = table.num_rows
    blobs = table.column(image_column).to_pylist()
    ids = [str(x) for x in table.column("image_id").to_pylist()]
    labels = table.column("label").to_numpy().astype(np.int64, copy=False)
    obj, part = _boxes(table, "bbox"), _boxes(table, "part_bbox")
    images = np.empty((n, 3, size, size), np.uint8)
    keep = np.zeros(n, bool)
    skipped: list[tuple[str, str]] = []
    for i, blob in enumerate(blobs):
        if blob is None:
            skipped.append((ids[i], "no image bytes"))
            continue
        try:
            d = decode(blob, size)
        except DecodeError as e:
            skipped.append((ids[i], str(e)))
            continue
        images[i] = d.image.transpose(2, 0, 1)  # HWC → CHW copy into the batch array
        obj[i] = rescale_boxes(obj[i], d.width, d.height, size)
        part[i] = rescale_boxes(part[i], d.width, d.height, size)
        keep[i] = True
    for image_id, reason in skipped:
        log.warning("skipped image %s: %s", image_id, reason)
    if not keep.all():
        images, labels, obj, part = images[keep], labels[keep], obj[keep], part[keep]
        ids = [x for x, k in zip(ids, keep) if k]
    return DecodedBatch(
        {"image": images, "label": labels, "object_box": obj, "part_box": part,
         "image_id": np.array(ids, dtype=object)},
        skipped,
    )


def folder_rows(table: pa.Table, classes: list[str], root: str) -> pa.Table:
    """``read_binary_files`` rows (``bytes``, ``path`` = ``root/<class>/<file>``) → shard-like
    rows: ``image``, ``label`` (index of the class folder in ``classes``), ``image_id``
    (the path relative to ``root``)."""
    index = {c: i for i, c in enumerate(classes)}
    rel = [posixpath.relpath(p, root) for p in table.column("path").to_pylist()]
    labels = [index[r.split("/")[0]] for r in rel]
    return pa.table({"image": table.column("bytes"), "label": pa.array(labels, pa.int64()),
                     "image_id": pa.array(rel, pa.string())})


def decode_blocks(table: pa.Table, *, size: int, batch_size: int, source: str = "",
                  skip_log: Any = None, classes: list[str] | None = None,
                  root: str = "") -> Iterator[dict[str, np.ndarray]]:
    """The Ray Data map step: one block as read → decoded batches of ``batch_size`` rows
    (each becomes an output block, so the stream moves in small steps). Rows that do not
    decode are dropped and sent to ``skip_log.add.remote(source, [(id, reason), ...])``,
    a Ray actor handle (duck-typed: this module imports no Ray). With ``classes``, the
    rows are class-folder files (see `folder_rows`)."""
    if classes is not None:
        table = folder_rows(table, classes, root)
    for start in range(0, table.num_rows, batch_size):
        out = decode_batch(table.slice(start, batch_size), size)
        if out.skipped and skip_log is not None:
            skip_log.add.remote(source, out.skipped)  # fire and forget: only on failures
        yield out.columns
