"""Write a data-set listing (`wsdan.data.formats`) as Parquet shards and a manifest.

Layout under ``dest`` (a local folder or ``s3://bucket/prefix``)::

    train/part-00000.parquet, part-00001.parquet, ...   rows in a seeded random order
    val/...  test/...
    dataset.json                                        written last

Columns (`SCHEMA`): ``image`` (the source file's encoded bytes, copied as they are, except
FGVC-Aircraft's banner crop), ``label``, ``label_name``, ``split``, ``image_id``, ``bbox`` and
``part_bbox`` (``x0, y0, x1, y1`` in pixels of the stored image, null when unknown),
``width``, ``height`` (read from the image header).

Row order: each split's images are written in a random permutation seeded by ``(seed,
split)`` (`split_order`), not in image-id order. Public data sets number their images class
by class, and a streaming reader mixes only within a local shuffle buffer and the order of
its read units, so id order would hand out batches drawn from a few classes. The
permutation is drawn from the split's image ids sorted, so it depends on nothing else.

A shard closes before the image bytes in it would pass ``shard_mb``; row groups hold at most
`ROW_GROUP_ROWS` rows: a row group is the unit that ``wsdan.data.pipeline`` reads and decodes
in one Ray task, so even a split in a single file is decoded by as many CPUs as it has row
groups. The manifest lists the rows of every row group (``row_groups``), so readers plan
without opening footers. Everything depends only on the inputs, so a rerun writes
byte-identical files; shards of an earlier run that the
new manifest does not list are deleted. The old manifest is deleted before the first shard
is written and the new one written last, so a reader never sees a manifest that does not
match the shards.

Images that cannot be decoded are skipped and listed in the manifest (``skipped``: image id,
path, reason) and in the printed summary, never fatal: each image is checked with the
pipeline's own decoder (`probe_image`), so a corrupt, truncated or empty file, an unknown
format, or a decompression bomb (over ``wsdan.data.decode.MAX_IMAGE_PIXELS``, refused from
its header) is skipped, and whatever is stored, the pipeline decodes. Odd but readable
images (CMYK, 16-bit, palette with transparency, animated GIF, 1×1, long strips, EXIF
orientation) are stored as they are and converted at decode. Every other problem was raised
by the reader before anything was written; a read error (a vanished file, S3 down) is not
an image's fault and stops the run.
"""

from __future__ import annotations

import errno
import itertools
import json
import math
import os
import re
import shutil
import statistics
import zlib
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import replace
from typing import Any, NamedTuple

import numpy as np
import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from wsdan.data.decode import DecodeError, decode
from wsdan.data.formats import SPLITS, Box, DatasetListing, ImageRecord
from wsdan.data.manifest import FORMAT_VERSION, MANIFEST
from wsdan.storage import StorageFullError, filesystem_and_path, is_remote, write_bytes

# Side of the check decode of `probe_image`: small, so that a large JPEG is read at 1/8 scale.
_PROBE_SIZE = 8
# Rows per row group, the pipeline's read + decode unit (one Ray task): ~10 MB of CUB-sized
# JPEGs, ~1 s of decoding at 512 px. Smaller groups cost a request and a task per few images.
ROW_GROUP_ROWS = 128
# Mixed into the seed of the row order, so that it draws from other random streams than
# carve_val_split (which seeds with (seed, label)).
_ORDER_STREAM = 0x5EED0DE5
MAX_SHARD_MB = 1024  # a binary column chunk must stay under 2 GiB
_SHARD_NAME = re.compile(r"^part-\d{5}\.parquet$")

# Boxes are variable-length list<float32> holding 4 values, not fixed_size_list<float32>[4]:
# pyarrow < 26 cannot read a null fixed-size list back from Parquet ("Expected all lists to
# be of size=4 but index 1 had size=0", apache/arrow#35692, fixed in 26.0), and part_bbox is
# null in every public data set. Switch to pa.list_(pa.float32(), 4) once pyarrow >= 26 is
# the floor of every reader.
BOX_TYPE = pa.list_(pa.float32())
SCHEMA = pa.schema(
    [
        pa.field("image", pa.binary(), nullable=False),
        pa.field("label", pa.int64(), nullable=False),
        pa.field("label_name", pa.string(), nullable=False),
        pa.field("split", pa.string(), nullable=False),
        pa.field("image_id", pa.string(), nullable=False),
        pa.field("bbox", BOX_TYPE),
        pa.field("part_bbox", BOX_TYPE),
        pa.field("width", pa.int32(), nullable=False),
        pa.field("height", pa.int32(), nullable=False),
    ]
)


class ImageRow(NamedTuple):
    record: ImageRecord
    data: bytes  # what is stored
    width: int
    height: int


class Skipped(NamedTuple):
    image_id: str
    path: str
    reason: str


# --- validation split ------------------------------------------------------------------
def carve_val_split(
    records: list[ImageRecord], *, num_classes: int, fraction: float, seed: int
) -> list[ImageRecord]:
    """Move ``round(fraction * n)`` of each class's ``n`` train images to ``val`` (at least one
    stays in train). Per class, the choice depends only on ``(seed, label)`` and the class's
    sorted image ids, so adding a class does not reshuffle the others. Test is never used."""
    if not 0.0 <= fraction < 1.0:
        raise ValueError(f"val fraction must be in [0, 1), got {fraction}")
    by_class: dict[int, list[str]] = {k: [] for k in range(num_classes)}
    for r in records:
        if r.split == "train":
            by_class[r.label].append(r.image_id)
    to_val: set[str] = set()
    for label, ids in by_class.items():
        ids.sort()
        n_val = min(len(ids) - 1, math.floor(fraction * len(ids) + 0.5)) if ids else 0
        rng = np.random.default_rng([seed, label])
        to_val.update(ids[i] for i in rng.choice(len(ids), size=max(n_val, 0), replace=False))
    return [replace(r, split="val") if r.image_id in to_val else r for r in records]


def split_order(records: list[ImageRecord], split: str, seed: int) -> list[ImageRecord]:
    """The images of ``split`` in the order they are written: a uniformly random permutation
    of the split's records sorted by image id, drawn from ``(seed, split)``. It depends on
    nothing but the seed, the split's name and its set of image ids."""
    ordered = sorted((r for r in records if r.split == split), key=lambda r: r.image_id)
    rng = np.random.default_rng([_ORDER_STREAM, seed % 2**64, zlib.crc32(split.encode())])
    return [ordered[i] for i in rng.permutation(len(ordered))]


# --- images ----------------------------------------------------------------------------
def probe_image(data: bytes) -> tuple[int, int]:
    """``(width, height)`` from the header, once the pipeline's own `decode` has read the whole
    image (a JPEG at 1/8 scale, which still reads every entropy-coded block but skips most
    of the work): what passes here, the pipeline decodes. Raises
    :class:`~wsdan.data.decode.DecodeError` for anything it cannot decode, including an image
    over ``MAX_IMAGE_PIXELS`` (refused from its header, before decoding)."""
    d = decode(data, _PROBE_SIZE)
    return d.width, d.height


def _clip(box: Box | None, width: int, height: int) -> Box | None:
    """Clip to the image; a box with nothing left inside becomes None."""
    if box is None:
        return None
    x0, y0 = min(max(box[0], 0.0), width), min(max(box[1], 0.0), height)
    x1, y1 = min(max(box[2], 0.0), width), min(max(box[3], 0.0), height)
    return (x0, y0, x1, y1) if x1 > x0 and y1 > y0 else None


def load_image(listing: DatasetListing, record: ImageRecord) -> ImageRow | Skipped:
    """Read, transform (if the format asks) and check one image. Read errors (a vanished
    file, S3 down) propagate; an image that does not decode is `Skipped`."""
    data = listing.tree.read(record.path)
    try:
        if listing.transform is not None:
            data = listing.transform(data)
        width, height = probe_image(data)
    except DecodeError as e:
        return Skipped(record.image_id, record.path, str(e))
    except (OSError, ValueError) as e:  # from a format's transform
        return Skipped(record.image_id, record.path, f"{type(e).__name__}: {e}")
    record = replace(
        record,
        bbox=_clip(record.bbox, width, height),
        part_bbox=_clip(record.part_bbox, width, height),
    )
    return ImageRow(record, data, width, height)


def _load_in_order(
    listing: DatasetListing, records: list[ImageRecord], pool: ThreadPoolExecutor, chunk: int = 64
) -> Iterator[ImageRow | Skipped]:
    """`load_image` over ``records`` in order, ``chunk`` at a time in ``pool`` (reads and
    Pillow's decoding release the GIL), holding at most one chunk of images in memory."""
    for start in range(0, len(records), chunk):
        yield from pool.map(lambda r: load_image(listing, r), records[start : start + chunk])


# --- shards ----------------------------------------------------------------------------
def encode_shard(rows: list[ImageRow], classes: list[str]) -> bytes:
    """One Parquet file of ``rows`` (already in order). Images are stored uncompressed
    (they are compressed already) and without min/max statistics (which would copy image
    bytes into the footer); the small columns use Snappy."""
    table = pa.table(
        {
            "image": pa.array([r.data for r in rows], pa.binary()),
            "label": pa.array([r.record.label for r in rows], pa.int64()),
            "label_name": pa.array([classes[r.record.label] for r in rows], pa.string()),
            "split": pa.array([r.record.split for r in rows], pa.string()),
            "image_id": pa.array([r.record.image_id for r in rows], pa.string()),
            "bbox": pa.array([r.record.bbox for r in rows], BOX_TYPE),
            "part_bbox": pa.array([r.record.part_bbox for r in rows], BOX_TYPE),
            "width": pa.array([r.width for r in rows], pa.int32()),
            "height": pa.array([r.height for r in rows], pa.int32()),
        },
        schema=SCHEMA,
    )
    flat = ["label", "label_name", "split", "image_id", "width", "height"]
    codecs = {name: "snappy" for name in [*flat, "bbox.list.element", "part_bbox.list.element"]}
    sink = pa.BufferOutputStream()
    pq.write_table(
        table,
        sink,
        row_group_size=ROW_GROUP_ROWS,
        compression=codecs | {"image": "none"},
        use_dictionary=["label_name", "split"],
        write_statistics=flat,
    )
    return sink.getvalue().to_pybytes()


def _join(dest: str, rel: str) -> str:
    return f"{dest.rstrip('/')}/{rel}"


def row_group_sizes(num_rows: int) -> list[int]:
    """Rows of each row group of a shard of ``num_rows`` rows, as `encode_shard` writes them."""
    return [min(ROW_GROUP_ROWS, num_rows - i) for i in range(0, num_rows, ROW_GROUP_ROWS)]


def _write_shard(
    dest: str, split: str, index: int, rows: list[ImageRow], listing: DatasetListing
) -> str:
    rel = f"{split}/part-{index:05d}.parquet"
    write_bytes(_join(dest, rel), encode_shard(rows, listing.classes))
    return rel


def _existing_shards(fs: pafs.FileSystem, base: str, split: str) -> list[str]:
    selector = pafs.FileSelector(f"{base}/{split}", allow_not_found=True)
    names = [i.base_name for i in fs.get_file_info(selector) if i.type == pafs.FileType.File]
    return sorted(f"{split}/{n}" for n in names if _SHARD_NAME.match(n))


def _delete(fs: pafs.FileSystem, path: str) -> None:
    if fs.get_file_info(path).type == pafs.FileType.File:
        fs.delete_file(path)


def _mib(n: float) -> str:
    return f"{n / 2**20:.1f} MiB"


def check_space(listing: DatasetListing, dest: str, *, shard_mb: float) -> None:
    """A local ``dest`` must hold the shards before anything is written (S3 has no "free
    space"): the source images' bytes (they are stored as they are), plus a shard of
    headroom (a shard replaces its old file only once written whole), against the free
    space plus the shards already there, which this run replaces. Too little raises
    :class:`StorageFullError` and leaves the data set there, if any, as it was."""
    if is_remote(dest):
        return
    _, base = filesystem_and_path(dest)
    sizes = listing.tree.files()
    needed = sum(sizes.get(r.path, 0) for r in listing.records)
    needed += 256 * len(listing.records) + min(int(shard_mb * 2**20), needed)  # footers
    existing = 0
    for split in SPLITS:
        folder = os.path.join(base, split)
        if os.path.isdir(folder):
            existing += sum(e.stat().st_size for e in os.scandir(folder)
                            if e.is_file() and _SHARD_NAME.match(e.name))
    probe = base
    while not os.path.isdir(probe) and os.path.dirname(probe) != probe:
        probe = os.path.dirname(probe)
    free = shutil.disk_usage(probe).free
    if free + existing < needed:
        raise StorageFullError(
            errno.ENOSPC, f"not enough space at {base}: the data set needs about "
            f"{_mib(needed)}, there are {_mib(free)} free"
            + (f" and {_mib(existing)} in the shards there now" if existing else "")
            + "; nothing was written (the data set there, if any, is unchanged): free space "
            "or choose another --dest", base)


def prepare_dataset(
    listing: DatasetListing,
    dest: str,
    *,
    val_fraction: float = 0.1,
    seed: int = 0,
    shard_mb: float = 128.0,
    progress: bool = True,
    workers: int = 4,
) -> dict[str, Any]:
    """Write ``listing`` to ``dest`` as shards + ``dataset.json``; returns the manifest.

    A validation split is carved from train (`carve_val_split`) when the data set has none
    and ``val_fraction > 0``. A local ``dest`` without room for the shards is refused before
    anything is written (`check_space`); a device that fills up part-way raises
    :class:`StorageFullError` naming the file, no partial file left, no manifest written.
    """
    if not 0 < shard_mb <= MAX_SHARD_MB:
        raise ValueError(f"shard_mb must be in (0, {MAX_SHARD_MB}], got {shard_mb}")
    if not 0.0 <= val_fraction < 1.0:
        raise ValueError(f"val_fraction must be in [0, 1), got {val_fraction}")
    records = sorted(listing.records, key=lambda r: r.image_id)
    val_from_train = val_fraction > 0 and not any(r.split == "val" for r in records)
    if val_from_train:
        records = carve_val_split(
            records, num_classes=len(listing.classes), fraction=val_fraction, seed=seed
        )
    target = int(shard_mb * 2**20)
    check_space(listing, dest, shard_mb=shard_mb)
    fs, base = filesystem_and_path(dest)
    base = base.rstrip("/")
    try:
        return _write_all(listing, dest, fs, base, records, val_from_train=val_from_train,
                          val_fraction=val_fraction, seed=seed, shard_mb=shard_mb,
                          target=target, progress=progress, workers=workers)
    except StorageFullError as e:
        # The device filled up part-way (another writer, or more than estimated): say what
        # state the destination is in. Every shard written is whole (atomic writes).
        raise StorageFullError(
            e.errno, f"{e}; {dest} is incomplete: the shards written so far are whole, but "
            f"{MANIFEST} was not written, so readers refuse it until `wsdan data prepare` "
            "completes there", e.filename) from e


def _write_all(listing: DatasetListing, dest: str, fs: pafs.FileSystem, base: str,
               records: list[ImageRecord], *, val_from_train: bool, val_fraction: float,
               seed: int, shard_mb: float, target: int, progress: bool,
               workers: int) -> dict[str, Any]:
    """`prepare_dataset` once its inputs are checked: remove the old manifest, write the
    shards split by split, delete stale shards, write the manifest."""
    from tqdm import tqdm

    _delete(fs, f"{base}/{MANIFEST}")

    shards: dict[str, list[str]] = {}
    row_groups: dict[str, list[list[int]]] = {}
    class_counts: dict[str, list[int]] = {}
    skipped: list[Skipped] = []
    with (
        ThreadPoolExecutor(max_workers=workers) as pool,
        tqdm(
            total=len(records),
            desc=f"prepare {listing.source_format}",
            unit="img",
            disable=not progress,
        ) as bar,
    ):
        for split in SPLITS:
            bar.set_postfix(split=split)
            shards[split], class_counts[split] = [], [0] * len(listing.classes)
            row_groups[split] = []
            batch: list[ImageRow] = []
            size = 0
            loaded = _load_in_order(listing, split_order(records, split, seed), pool)
            for item in itertools.chain(loaded, [None]):  # None: the end, write the last shard
                if isinstance(item, Skipped):
                    bar.update()
                    skipped.append(item)
                    continue
                if batch and (item is None or size + len(item.data) > target):
                    shards[split].append(
                        _write_shard(dest, split, len(shards[split]), batch, listing)
                    )
                    row_groups[split].append(row_group_sizes(len(batch)))
                    batch, size = [], 0
                if item is None:
                    break
                bar.update()
                batch.append(item)
                size += len(item.data)
                class_counts[split][item.record.label] += 1

    for split in SPLITS:
        for rel in _existing_shards(fs, base, split):
            if rel not in shards[split]:
                fs.delete_file(f"{base}/{rel}")
    manifest = {
        "format_version": FORMAT_VERSION,
        "name": listing.name,
        "source_format": listing.source_format,
        "source": listing.source,
        "classes": list(listing.classes),
        "num_classes": len(listing.classes),
        "counts": {s: sum(class_counts[s]) for s in SPLITS},
        "class_counts": class_counts,
        "shards": shards,
        "row_groups": row_groups,
        "row_order": "a random permutation of each split, seeded by (seed, split)",
        "skipped": [s._asdict() for s in sorted(skipped)],
        "val_from_train": val_from_train,
        "val_fraction": float(val_fraction),
        "seed": int(seed),
        "shard_mb": float(shard_mb),
        "banner_cropped": bool(listing.info.get("banner_cropped", False)),
        "bbox_format": "x0, y0, x1, y1 in pixels of the stored image, which spans [0, width] x "
        "[0, height]; null when unknown",
        **{k: v for k, v in listing.info.items() if k != "banner_cropped"},
    }
    write_bytes(_join(dest, MANIFEST), (json.dumps(manifest, indent=2) + "\n").encode())
    return manifest


def summarize(manifest: dict[str, Any], dest: str, *, smallest: int = 5) -> str:
    """A few lines for the terminal: images and shards per split, images per class
    (min / median / max and the smallest classes), skipped images."""
    classes = manifest["classes"]
    lines = [
        f"{manifest['name']} ({manifest['source_format']}): {len(classes)} classes, "
        f"{sum(manifest['counts'].values())} images -> {dest}",
        f"  {'split':<6} {'images':>8} {'shards':>7}   per class min / median / max",
    ]
    for split in SPLITS:
        per_class = manifest["class_counts"][split]
        spread = (
            f"{min(per_class)} / {statistics.median(per_class):g} / {max(per_class)}"
            if manifest["counts"][split]
            else "-"
        )
        lines.append(
            f"  {split:<6} {manifest['counts'][split]:>8} {len(manifest['shards'][split]):>7}   {spread}"
        )
    if manifest["val_from_train"]:
        lines.append(
            f"  val carved from train: fraction {manifest['val_fraction']:g} of each class, "
            f"seed {manifest['seed']}"
        )
    train = manifest["class_counts"]["train"]
    order = sorted(range(len(classes)), key=lambda k: (train[k], k))[:smallest]
    lines.append(
        "  smallest classes in train: " + ", ".join(f"{classes[k]} ({train[k]})" for k in order)
    )
    skipped = manifest["skipped"]
    lines.append(f"  skipped (undecodable): {len(skipped)}")
    lines += [f"    {s['image_id']} ({s['path']}): {s['reason']}" for s in skipped[:10]]
    if len(skipped) > 10:
        lines.append(f"    ... and {len(skipped) - 10} more, listed in {MANIFEST}")
    return "\n".join(lines)
