"""Ray Data pipelines: Parquet shards (or raw class folders) in S3 → decoded model batches.

Shape of the stream (system.md)::

    read_parquet(shard files, per-epoch file shuffle)           one Ray task per shard file,
      └─ map_batches(decode_blocks: decode + resize)            fused into that task: the
           │  image uint8 N×3×R×R, label, boxes, image_id       encoded bytes never enter
           ▼                                                    the object store
    streaming_split / get_dataset_shard → iter_torch(...)       the training process:
         local shuffle buffer, dict of torch tensors            random crop/flip/jitter
                                                                (wsdan.transforms) there

Design decisions, measured on the two-core development machine (jobs/bench_ingest.py):

- *Decode in Ray tasks, augment in the trainer.* Decoding and resizing to ``resize_size``
  (512 for 448 px training) is the expensive, deterministic part and runs on the CPU
  workers, fused with the Parquet read. The random crop, flip and colour jitter run
  batch-wise in torch on the training worker (``wsdan.engine.train_one_epoch`` calls
  ``train_transform`` with a per-worker ``torch.Generator``), so augmentation is seeded
  per worker and does not depend on which Ray task decoded an image.
- *Channel-first uint8 over the wire.* N×3×R×R and N×R×R×3 are the same bytes in the
  object store; the difference is where the HWC→CHW copy happens. In the decode task it
  costs nothing measurable (it is the copy into the batch array anyway); in the training
  process ``permute(...).contiguous()`` cost ~0.5 ms per 512 px image, serially. uint8, not
  float: four times fewer bytes, and ``train_transform`` converts on the trainer's side.
  The consumer wraps the arrays without copying (see ``_tensor``).
- *Tasks, blocks, batch size.* Ray 2.60 fuses the decode into the read task only when
  the read is not split (``override_num_blocks`` = number of files) and the map takes
  whole blocks (``batch_size=None``); ``decode_blocks`` then slices each block into
  ``DECODE_BATCH_SIZE = 32`` images and yields each batch as its own output block
  (``target_max_block_size`` set to one batch: ~25 MB at 512 px), so the stream moves in
  steps of 32 images instead of whole 128 MB blocks. Parallelism: one task per free CPU
  (``num_cpus=1``: PIL decoding is single-threaded) up to the number of shard files; the
  CPUs Ray Train reserves for its workers are not used. ``concurrency`` caps it. Ray's
  new default Parquet reader (V2) is switched off for these reads: see `_read_context`.
- *Shuffling.* Per epoch, the order of the shard files is reshuffled
  (``FileShuffleConfig(seed, reseed_after_execution=True)``: each execution, i.e. each
  epoch, hashes ``(seed, execution index)`` into a new permutation), and rows are mixed
  across files in a local shuffle buffer at iteration (``iter_torch(shuffle_buffer=...)``;
  it holds *decoded* images, ~0.8 MB each at 512 px, so 256 images ≈ 200 MB per worker).
  A global row shuffle is not used: it would materialise the decoded data set. The
  shuffle quality thus depends on having many shard files (``wsdan data prepare`` writes
  64-256 MB shards: 1-5 k images each). With ``shuffle=False`` the order is deterministic
  (files in manifest order, ``preserve_order``).
- *Corrupt images* are dropped in the decode task, logged, and reported to one named
  actor (:class:`SkipLog`), which keeps the distinct image ids per (source, split):
  :func:`skipped_images` gives the count a training job logs as ``skipped_images``. The
  actor is only called when an image fails, so healthy data costs nothing.
- *Transient S3 errors* (throttling, 5xx, connection resets) are retried by Ray Data: the
  messages in :data:`TRANSIENT_S3_ERRORS` are added to ``retried_io_errors`` of the
  DataContext the dataset is created with (a private copy of the current one: a dataset
  keeps its creation context, so the caller's global context is not modified).
  A wrong endpoint, bucket or credentials is caught before any Ray work starts:
  :func:`read_manifest` reads ``dataset.json`` first and raises :class:`DataSourceError`
  naming the URI, endpoint and bucket, never a credential.

Credentials: the pyarrow S3 file system is pickled to the Ray workers *without*
credentials (only the endpoint travels), so each worker takes them from its own
environment, as on any cluster (AWS_* variables on the nodes, an instance role, or the
job's ``runtime_env``). The driver's check in :func:`read_manifest` uses the driver's.
"""

from __future__ import annotations

import contextlib
import json
import os
import posixpath
import warnings
import zlib
from collections.abc import Iterable, Iterator
from typing import Any

import numpy as np
import pyarrow.fs as pafs
import ray
import ray.data
import torch
from ray.data import DataContext, FileShuffleConfig

from wsdan import storage
from wsdan.config import DataConfig
from wsdan.data.decode import decode_blocks, decode_image

__all__ = [
    "DECODE_BATCH_SIZE",
    "FORMAT_VERSION",
    "IMAGE_EXTENSIONS",
    "TRANSIENT_S3_ERRORS",
    "DataSourceError",
    "SkipLog",
    "build_dataset",
    "build_folder_dataset",
    "decode_image",
    "folder_split_of",
    "iter_torch",
    "read_manifest",
    "skip_report",
    "skipped_images",
]

FORMAT_VERSION = 1
DECODE_BATCH_SIZE = 32  # images per decode call: ~25 MB blocks at 512 px (see above)
IMAGE_EXTENSIONS = ("jpg", "jpeg", "png", "bmp", "gif", "tif", "tiff", "webp")
SKIP_LOG_NAME = "wsdan-skipped-images"

# Substrings of pyarrow/AWS SDK error messages worth retrying. Ray's defaults cover
# INTERNAL_FAILURE, NETWORK_CONNECTION, SLOW_DOWN, SERVICE_UNAVAILABLE and HTTP 503; S3
# servers also answer 500/502/504 under load, and a dropped or timed-out connection shows
# up as a curl error.
TRANSIENT_S3_ERRORS = (
    "AWS Error SLOW_DOWN",
    "AWS Error INTERNAL_FAILURE",
    "AWS Error NETWORK_CONNECTION",
    "AWS Error SERVICE_UNAVAILABLE",
    "AWS Error UNKNOWN (HTTP status 500)",
    "AWS Error UNKNOWN (HTTP status 502)",
    "AWS Error UNKNOWN (HTTP status 503)",
    "AWS Error UNKNOWN (HTTP status 504)",
    "AWS Error REQUEST_TIME_TOO_SKEWED",
    "RequestTimeout",
    "Connection reset by peer",
    "curlCode: 28",  # operation timed out
    "curlCode: 56",  # failure receiving network data
)

_SHARD_COLUMNS = ["image", "label", "image_id", "bbox", "part_bbox"]


class DataSourceError(RuntimeError):
    """The data set cannot be read: missing, unreachable, wrong credentials or bad manifest.

    The message names the URI and, for S3, the endpoint and bucket; never a credential.
    """


# -- manifest ------------------------------------------------------------------------------


def _scrub(text: str) -> str:
    """Remove the secret key from a message, should an error ever echo it."""
    secret = os.environ.get("AWS_SECRET_ACCESS_KEY")
    return text.replace(secret, "***") if secret and len(secret) >= 8 else text


def _where(uri: str) -> str:
    if not storage.is_remote(uri):
        return uri
    bucket = uri[len("s3://"):].partition("/")[0]
    endpoint = os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL")
    return f"{uri} (S3 endpoint {endpoint or 'AWS default'}, bucket {bucket!r})"


def _join(root_uri: str, rel: str) -> str:
    return f"{root_uri.rstrip('/')}/{rel}"


def read_manifest(root_uri: str) -> dict[str, Any]:
    """Read and check ``<root_uri>/dataset.json``. Raises :class:`DataSourceError` naming the
    URI (and for S3 the endpoint and bucket) when it is missing, unreachable, forbidden or
    malformed. Reading it first is the pipeline's check of endpoint and credentials."""
    uri = _join(root_uri, "dataset.json")
    # wsdan.storage's messages already name the URI and, for S3, endpoint and bucket.
    hint = ("; check the bucket and prefix, AWS_ENDPOINT_URL and the AWS credentials"
            if storage.is_remote(uri) else "")
    try:
        raw = storage.read_bytes(uri)
    except FileNotFoundError as e:
        raise DataSourceError(_scrub(f"no data set manifest: {e}; write the data set with "
                                     "`wsdan data prepare` first")) from None
    except (OSError, ValueError) as e:
        where = "" if storage.is_remote(uri) else f"{uri}: "
        raise DataSourceError(_scrub(f"{where}{e}{hint}")) from None
    try:
        manifest = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise DataSourceError(f"{_where(uri)} is not valid JSON: {e}") from None
    if not isinstance(manifest, dict):
        raise DataSourceError(f"{_where(uri)}: expected a JSON object")
    version = manifest.get("format_version")
    if version != FORMAT_VERSION:
        raise DataSourceError(f"{_where(uri)}: unsupported format_version {version!r} "
                              f"(this reader knows {FORMAT_VERSION})")
    missing = [k for k in ("classes", "num_classes", "counts", "shards") if k not in manifest]
    if missing:
        raise DataSourceError(f"{_where(uri)}: missing keys {missing}")
    return manifest


def _shard_paths(root_uri: str, manifest: dict[str, Any],
                 split: str) -> tuple[pafs.FileSystem, list[str]]:
    shards = manifest["shards"]
    if split not in shards:
        raise DataSourceError(f"split {split!r} not in {_where(root_uri)}: it has "
                              f"{sorted(shards)}")
    fs, base = storage.filesystem_and_path(root_uri)
    return fs, [posixpath.join(base, rel) for rel in shards[split]]


# -- corrupt-image accounting --------------------------------------------------------------


@ray.remote(num_cpus=0)
class SkipLog:
    """Distinct images that failed to decode, per source (``"<uri>#<split>"``).

    Distinct ids, not events: the same broken image seen again next epoch, or by a
    retried task, counts once. ``events`` counts every time one was dropped.
    """

    def __init__(self) -> None:
        self._ids: dict[str, dict[str, str]] = {}
        self._events: dict[str, int] = {}

    def add(self, source: str, skipped: list[tuple[str, str]]) -> None:
        ids = self._ids.setdefault(source, {})
        for image_id, reason in skipped:
            ids.setdefault(image_id, reason)
        self._events[source] = self._events.get(source, 0) + len(skipped)

    def report(self, source: str | None = None) -> dict[str, dict[str, Any]]:
        keys = [source] if source is not None else sorted(self._ids)
        return {k: {"images": len(self._ids.get(k, {})), "events": self._events.get(k, 0),
                    "examples": dict(list(self._ids.get(k, {}).items())[:20])} for k in keys}


def _source_key(uri: str, split: str) -> str:
    return f"{uri.rstrip('/')}#{split}"


def _skip_log(create: bool) -> Any:
    if create:
        return SkipLog.options(name=SKIP_LOG_NAME, get_if_exists=True).remote()
    try:
        return ray.get_actor(SKIP_LOG_NAME)
    except ValueError:
        return None


def skip_report(root_uri: str | None = None, split: str | None = None) -> dict[str, Any]:
    """``{"<uri>#<split>": {"images": n, "events": m, "examples": {id: reason}}}``."""
    actor = _skip_log(create=False) if ray.is_initialized() else None
    if actor is None:
        return {}
    source = _source_key(root_uri, split or "") if root_uri is not None else None
    return ray.get(actor.report.remote(source))


def skipped_images(root_uri: str, split: str) -> int:
    """Distinct images of ``split`` skipped as corrupt so far (log it as ``skipped_images``)."""
    return int(skip_report(root_uri, split).get(_source_key(root_uri, split), {}).get("images", 0))


# -- decode step (runs in Ray tasks) -------------------------------------------------------


def _retry_transient_errors(ctx: DataContext) -> None:
    for msg in TRANSIENT_S3_ERRORS:
        if msg not in ctx.retried_io_errors:
            ctx.retried_io_errors.append(msg)


@contextlib.contextmanager
def _read_context(size: int, shuffle: bool) -> Iterator[DataContext]:
    """A private copy of the current DataContext, current while the dataset is created
    (a dataset keeps the context it was created with; the caller's is left untouched).

    - ``use_datasource_v2 = False``: Ray 2.60's default V2 Parquet reader lists the files
      in a task that starts a footer-reader actor pool, and bin-packs row groups into
      128 MiB read tasks: a 120 MB split became one read task, i.e. one core, and cost
      2-7 s before the first row against 0.3-0.5 s for V1 on the same shards. The
      manifest already names every file, so V1's driver-side planning is all we need.
    - ``target_max_block_size``: a task hands its output over in blocks of up to this
      size (128 MB by default, ~160 decoded 512 px images): the first batch waited for
      whole tasks. One block per decode batch streams.
    - ``preserve_order`` without shuffling: a deterministic order; with shuffling, fast
      tasks may overtake slow ones.
    """
    ctx = DataContext.get_current().copy()
    ctx.use_datasource_v2 = False
    ctx.target_max_block_size = max(DECODE_BATCH_SIZE * 3 * size * size, 1 << 20)
    ctx.execution_options.preserve_order = not shuffle
    _retry_transient_errors(ctx)
    with DataContext.current(ctx):
        yield ctx


def _decoded(ds: ray.data.Dataset, *, size: int, source: str,
             classes: list[str] | None = None, root: str = "") -> ray.data.Dataset:
    # batch_size=None: the function takes whole read blocks and slices them itself. With a
    # batch_size, Ray 2.60 does not fuse the map into the read task, and the encoded bytes
    # would make a round trip through the object store (measured: one decode task then
    # took the whole split).
    # decode_blocks lives in wsdan.data.decode, which imports neither torch nor ray: the
    # decode workers stay small (~0.1 s to import instead of ~2 s with torch).
    return ds.map_batches(
        decode_blocks,
        batch_size=None,
        batch_format="pyarrow",
        fn_kwargs={"size": size, "batch_size": DECODE_BATCH_SIZE, "source": source,
                   "skip_log": _skip_log(create=True), "classes": classes, "root": root},
    )


def build_dataset(
    root_uri: str,
    split: str,
    *,
    cfg: DataConfig,
    train: bool,
    seed: int = 0,
    shuffle: bool | None = None,
    concurrency: int | None = None,
) -> ray.data.Dataset:
    """A streaming dataset of one split of a sharded data set (``wsdan data prepare``).

    Columns: ``image`` uint8 N×3×R×R (R = ``cfg.resize_size``), ``label`` int64,
    ``object_box`` / ``part_box`` float32 N×4 in the resized image's pixels (NaN when
    unknown), ``image_id`` str. ``shuffle`` (default: ``train``) reshuffles the shard files
    each epoch from ``seed``; without it the order is the manifest's. Augmentation is the
    consumer's (``train`` only picks the shuffle default). ``concurrency`` caps the read +
    decode tasks (default: as many as there are free CPUs and shard files). The manifest
    is read first, so a wrong URI, endpoint or credentials raise :class:`DataSourceError`.
    """
    shuffle = train if shuffle is None else shuffle
    manifest = read_manifest(root_uri)
    fs, paths = _shard_paths(root_uri, manifest, split)
    if not paths:
        raise DataSourceError(f"split {split!r} of {_where(root_uri)} has no shards")
    with _read_context(cfg.resize_size, shuffle):
        ds = ray.data.read_parquet(
            paths,
            filesystem=fs,
            columns=_SHARD_COLUMNS,  # the other columns are not read at all
            shuffle=FileShuffleConfig(seed=seed, reseed_after_execution=True) if shuffle else None,
            partitioning=None,  # shard paths are not hive-partitioned: no extra columns
            concurrency=concurrency,
            # One read task per shard file. Left to itself, Ray aims at >= 200 blocks and
            # splits each file's output to get there; a split read is not fused with the
            # decode, so the encoded bytes made a round trip through the object store.
            override_num_blocks=len(paths),
        )
        return _decoded(ds, size=cfg.resize_size, source=_source_key(root_uri, split))


# -- raw class folders ---------------------------------------------------------------------


def folder_split_of(rel_path: str, *, val_fraction: float, test_fraction: float) -> str:
    """Stable split of one file by a hash of its path relative to the root: the same
    file lands in the same split on every run and machine, whatever else is added."""
    u = zlib.crc32(rel_path.encode("utf-8")) / 2**32
    if u < test_fraction:
        return "test"
    if u < test_fraction + val_fraction:
        return "val"
    return "train"


def _list_class_folders(uri: str) -> tuple[pafs.FileSystem, str, list[str], list[str]]:
    """Classes (sorted sub-folder names) and image files ``base/<class>/<file>``."""
    fs, base = storage.filesystem_and_path(uri)
    try:
        infos = fs.get_file_info(pafs.FileSelector(base, recursive=True))
    except OSError as e:
        raise DataSourceError(_scrub(f"cannot list {_where(uri)}: {e}")) from None
    files = []
    for info in infos:
        if info.type != pafs.FileType.File:
            continue
        rel = posixpath.relpath(info.path, base)
        parts = rel.split("/")
        if len(parts) == 2 and info.extension.lower() in IMAGE_EXTENSIONS:
            files.append(info.path)
    classes = sorted({posixpath.basename(posixpath.dirname(p)) for p in files})
    if len(classes) < 2:
        raise DataSourceError(f"{_where(uri)}: expected class folders <class>/<image>, "
                              f"found {len(classes)} class(es) with images")
    return fs, base, classes, sorted(files)


def build_folder_dataset(
    uri: str,
    split: str,
    *,
    cfg: DataConfig,
    train: bool,
    seed: int = 0,
    shuffle: bool | None = None,
    val_fraction: float = 0.1,
    test_fraction: float = 0.0,
    concurrency: int | None = None,
) -> tuple[ray.data.Dataset, list[str]]:
    """Raw mode: images in class folders ``<uri>/<class>/<file>`` (local or S3), no
    conversion. Labels are indices into the sorted folder names (returned with the
    dataset); the split is :func:`folder_split_of` of each file's relative path. Same
    output columns as :func:`build_dataset`, boxes NaN. Slower per image than shards
    (one request per file), and the file shuffle is then a full shuffle of the images.
    """
    if split not in ("train", "val", "test"):
        raise ValueError(f"split must be train, val or test, got {split!r}")
    if not (0 <= val_fraction < 1 and 0 <= test_fraction < 1 and val_fraction + test_fraction < 1):
        raise ValueError("val_fraction and test_fraction must be >= 0 and sum to < 1")
    shuffle = train if shuffle is None else shuffle
    fs, base, classes, files = _list_class_folders(uri)
    paths = [p for p in files if folder_split_of(posixpath.relpath(p, base),
                                                 val_fraction=val_fraction,
                                                 test_fraction=test_fraction) == split]
    if not paths:
        raise DataSourceError(f"split {split!r} of {_where(uri)} is empty")
    with _read_context(cfg.resize_size, shuffle):
        ds = ray.data.read_binary_files(
            paths,
            filesystem=fs,
            include_paths=True,
            shuffle=FileShuffleConfig(seed=seed, reseed_after_execution=True) if shuffle else None,
            concurrency=concurrency,
            # One read task per DECODE_BATCH_SIZE files: unsplit, so fused with the decode.
            override_num_blocks=-(-len(paths) // DECODE_BATCH_SIZE),
        )
        ds = _decoded(ds, size=cfg.resize_size, source=_source_key(uri, split),
                      classes=classes, root=base)
    return ds, classes


# -- consumer side -------------------------------------------------------------------------


def _tensor(a: np.ndarray) -> torch.Tensor:
    """Zero-copy tensor of a batch column.

    A batch that lies inside one block is a read-only view of the object store; torch
    warns when it wraps one (writing would be undefined), so that one warning is silenced
    here, as Ray's own ``iter_torch_batches`` does. Copying instead cost ~5-10 ms per
    batch of 32 at 512 px in the consumer. Nothing in wsdan.engine writes to the uint8
    images in place (``train_transform`` and ``center_crop`` make new tensors).
    """
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="The given NumPy array is not writable")
        return torch.from_numpy(a)


def iter_torch(
    data: ray.data.Dataset | ray.data.DataIterator,
    batch_size: int,
    *,
    shuffle_buffer: int | None = None,
    seed: int | None = None,
    epoch: int = 0,
    drop_last: bool = False,
    prefetch_batches: int = 2,
    with_ids: bool = False,
) -> Iterator[dict[str, Any]]:
    """Batches for ``wsdan.engine``: ``image`` uint8 B×3×R×R, ``label`` int64 B,
    ``object_box`` / ``part_box`` float32 B×4 (and ``image_id``, a list of str, with
    ``with_ids``). ``data`` is a dataset or a shard (``ray.train.get_dataset_shard``).
    The tensors may share read-only memory with Ray's object store: do not modify them
    in place (move or convert them, which copies).

    ``shuffle_buffer`` images are mixed locally (in decoded form, so mind the memory);
    its seed is derived from ``(seed, epoch)`` so each epoch mixes differently.
    Call once per epoch.
    """
    local_seed = None
    if shuffle_buffer and seed is not None:
        local_seed = int(np.random.SeedSequence([seed, epoch]).generate_state(1)[0])
    batches: Iterable[dict[str, np.ndarray]] = data.iter_batches(
        batch_size=batch_size,
        batch_format="numpy",
        drop_last=drop_last,
        prefetch_batches=prefetch_batches,
        local_shuffle_buffer_size=shuffle_buffer or None,
        local_shuffle_seed=local_seed,
    )
    for b in batches:
        out: dict[str, Any] = {
            "image": _tensor(b["image"]),
            "label": _tensor(b["label"].astype(np.int64, copy=False)),
            "object_box": _tensor(b["object_box"].astype(np.float32, copy=False)),
            "part_box": _tensor(b["part_box"].astype(np.float32, copy=False)),
        }
        if with_ids:
            out["image_id"] = [str(x) for x in b["image_id"]]
        yield out
