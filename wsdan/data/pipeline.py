"""Ray Data pipelines: Parquet shards (or raw class folders) in S3 → decoded model batches.

Shape of the stream (docs/architecture.md has the whole picture)::

    ShardDatasource(row groups, per-epoch order)                one Ray task per row group,
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
- *Tasks, blocks, batch size.* The read unit is a Parquet row group (`ShardDatasource`,
  ``wsdan data prepare`` writes 128 rows per group and lists them in the manifest): one
  read task per row group, so a split in three files is still decoded by every CPU the
  cluster lends (Ray's Parquet reader V1 makes at most one task per file, and asked for
  more it splits the task's *output*, which is then not fused with the decode; V2
  bin-packs row groups into 128 MiB tasks and starts slowly, see `_read_context`). Ray
  2.60 fuses the decode into the read task when the read is not split
  (``override_num_blocks`` = number of read units) and the map takes whole blocks
  (``batch_size=None``); ``decode_blocks`` then slices each block into
  ``DECODE_BATCH_SIZE = 32`` images and yields each batch as its own output block
  (``target_max_block_size`` set to one batch: ~25 MB at 512 px), so the stream moves in
  steps of 32 images instead of whole 128 MB blocks. Parallelism: one task per free CPU
  (``num_cpus=1``: PIL decoding is single-threaded) up to the number of row groups; the
  CPUs Ray Train reserves for its workers are not used. ``concurrency`` caps it.
- *Shuffling.* The shards hold each split in a seeded random order (``wsdan data
  prepare``), so any run of consecutive rows is a uniform sample of the split. Per
  epoch, the row groups are read in a new permutation seeded by ``(seed, epoch)``: the
  epoch is the one the consumer announces (``iter_torch(..., epoch=k)``, see
  `EpochClock`), so a job resumed at epoch k reads epoch k's order, not epoch 0's (Ray's
  ``FileShuffleConfig(reseed_after_execution=True)`` counts executions, and that count
  starts again at 0 in every new ``streaming_split`` coordinator). Rows are then mixed in
  a local shuffle buffer at iteration (``iter_torch(shuffle_buffer=...)``, seeded from
  ``(seed, epoch)`` too; it holds *decoded* images, ~0.8 MB each at 512 px, so 256 images
  ≈ 200 MB per worker). A global row shuffle is not used: it would materialise the
  decoded data set. ``preserve_order`` is on, so the stream follows the planned order
  and an epoch's sequence (for one consumer) is a function of the seeds and the epoch.
  With ``shuffle=False`` the order is the manifest's.
- *Corrupt images* are dropped in the decode task, logged, and reported to one named
  actor (:class:`SkipLog`, in ``wsdan.data.actors``), which keeps the distinct image ids
  per (source, split): :func:`skipped_images` gives the count a training job logs as
  ``skipped_images``. The actor is only called when an image fails, so healthy data
  costs nothing.
- *Transient S3 errors* (the server down or restarting, dropped connections, time-outs,
  5xx, throttling) are retried by the AWS SDK under pyarrow, request by request, with the
  project's one retry policy (``wsdan.storage``: exponential backoff, ~25 s without an
  answer ridden out by default). The file system that the read tasks receive is a
  ``wsdan.storage.RetryingS3FileSystem``, which keeps that policy when Ray pickles it to
  the workers (a plain pyarrow S3FileSystem would lose it there). No error text is
  matched. A wrong endpoint, bucket or credentials is caught before any Ray work starts:
  :func:`read_manifest` reads ``dataset.json`` first and raises :class:`DataSourceError`
  naming the URI, endpoint and bucket, never a credential.

Credentials: the pyarrow S3 file system is pickled to the Ray workers *without*
credentials (only the endpoint travels), so each worker takes them from its own
environment, as on any cluster (AWS_* variables on the nodes, an instance role, or the
job's ``runtime_env``). The driver's check in :func:`read_manifest` uses the driver's.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import posixpath
import uuid
import warnings
import zlib
from collections.abc import Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import TYPE_CHECKING, Any, NamedTuple

import numpy as np
import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq
import ray
import ray.data
from ray.data import DataContext, FileShuffleConfig
from ray.data.block import BlockMetadata
from ray.data.datasource import Datasource, ReadTask

from wsdan import storage
from wsdan.config import DataConfig
from wsdan.data.actors import (
    EPOCH_KEY_CONFIG,
    EpochClock,
    SkipLog,
    announce_epoch,
    epoch_clock,
    skip_log,
    skip_report,
    skipped_images,
    source_key,
)
from wsdan.data.decode import decode_blocks, decode_image
from wsdan.data.manifest import (
    FORMAT_VERSION,
    DataSourceError,
    _scrub,
    _shard_paths,
    _where,
    read_manifest,
)
from wsdan.data.reader import COLUMNS as SHARD_COLUMNS
from wsdan.data.reader import read_row_group

if TYPE_CHECKING:
    import torch

__all__ = [
    "DECODE_BATCH_SIZE",
    "FORMAT_VERSION",
    "IMAGE_EXTENSIONS",
    "DataSourceError",
    "EpochClock",
    "EpochShuffle",
    "ShardDatasource",
    "SkipLog",
    "announce_epoch",
    "build_dataset",
    "build_folder_dataset",
    "decode_image",
    "folder_split_of",
    "iter_torch",
    "read_manifest",
    "skip_report",
    "skipped_images",
]

DECODE_BATCH_SIZE = 32  # images per decode call: ~25 MB blocks at 512 px (see above)
IMAGE_EXTENSIONS = ("jpg", "jpeg", "png", "bmp", "gif", "tif", "tiff", "webp")
MAX_READ_TASKS = 2000  # row groups per read task grow beyond this (Ray warns at 5000 tasks)


def _epoch_seed(seed: int, epoch: int) -> int:
    return int(np.random.SeedSequence([0xF11E, seed % 2**64, epoch]).generate_state(1)[0])


@dataclasses.dataclass
class EpochShuffle(FileShuffleConfig):
    """A `FileShuffleConfig` whose seed is a function of ``(seed, epoch)``: the epoch that
    the dataset's consumers announced (`announce_epoch`), or, when none did, the number
    of earlier executions (Ray's ``reseed_after_execution`` behaviour)."""

    key: str = ""

    def get_seed(self, execution_idx: int = 0) -> int:
        epoch = ray.get(epoch_clock().epoch.remote(self.key)) if self.key else None
        return _epoch_seed(int(self.seed or 0), execution_idx if epoch is None else epoch)


# -- shard reading -------------------------------------------------------------------------


class RowGroup(NamedTuple):
    """The read unit: one row group of one shard file."""

    path: str
    index: int
    rows: int


def _row_groups(fs: pafs.FileSystem, paths: list[str], manifest: dict[str, Any], split: str,
                root_uri: str) -> list[RowGroup]:
    """Row groups of the split's shards, from the manifest (``wsdan data prepare`` lists
    them), else from the files' footers (read in parallel)."""
    listed = manifest.get("row_groups", {}).get(split)
    if isinstance(listed, list) and len(listed) == len(paths):
        sizes = listed
    else:
        def footer(path: str) -> list[int]:
            try:
                md = pq.read_metadata(path, filesystem=fs)
            except (OSError, ValueError) as e:
                raise DataSourceError(_scrub(f"cannot read the footer of {path} in "
                                             f"{_where(root_uri)}: {e}")) from None
            return [md.row_group(i).num_rows for i in range(md.num_row_groups)]

        with ThreadPoolExecutor(max_workers=min(32, len(paths))) as pool:
            sizes = list(pool.map(footer, paths))
    return [RowGroup(path, i, int(rows)) for path, groups in zip(paths, sizes)
            for i, rows in enumerate(groups) if rows > 0]


def _read_units(fs: pafs.FileSystem, units: list[RowGroup],
                columns: list[str]) -> Iterator[pa.Table]:
    # fs is a wsdan.storage.RetryingS3FileSystem (or a local one): each request is retried
    # by the SDK with the project's policy, here on the worker too.
    for unit in units:
        yield read_row_group(fs, unit.path, unit.index, columns)


class ShardDatasource(Datasource):
    """The row groups of a split's Parquet shards, one read task per row group (at most
    `MAX_READ_TASKS`), so the read and the decode fused into it spread over every CPU
    the cluster lends, however few files the split has. With ``shuffle``, the row
    groups are read in a permutation drawn at each execution from ``shuffle.get_seed``."""

    def __init__(self, fs: pafs.FileSystem, units: list[RowGroup], columns: list[str],
                 shuffle: EpochShuffle | None = None) -> None:
        super().__init__()
        self._fs, self._units, self._columns, self._shuffle = fs, units, columns, shuffle

    def get_name(self) -> str:
        return "Shards"

    def estimate_inmemory_data_size(self) -> int | None:
        return None

    def order(self, data_context: DataContext | None) -> list[int]:
        """The read order of the units for an execution planned with ``data_context``."""
        n = len(self._units)
        if self._shuffle is None or data_context is None:  # None: Ray only counts tasks
            return list(range(n))
        # What Ray's own file shuffle reads for the execution count (used when no
        # consumer announced an epoch).
        execution_idx = getattr(data_context, "_execution_idx", 0)
        rng = np.random.default_rng(self._shuffle.get_seed(execution_idx))
        return rng.permutation(n).tolist()

    def get_read_tasks(self, parallelism: int, per_task_row_limit: int | None = None,
                       data_context: DataContext | None = None) -> list[ReadTask]:
        order = self.order(data_context)
        n_tasks = min(len(order), parallelism if parallelism > 0 else MAX_READ_TASKS)
        tasks = []
        for group in np.array_split(np.asarray(order, dtype=np.int64), max(n_tasks, 1)):
            units = [self._units[i] for i in group.tolist()]
            if not units:
                continue
            meta = BlockMetadata(num_rows=sum(u.rows for u in units), size_bytes=None,
                                 input_files=sorted({u.path for u in units}), exec_stats=None)
            read = functools.partial(_read_units, self._fs, units, self._columns)
            tasks.append(ReadTask(read, meta, per_task_row_limit=per_task_row_limit))
        return tasks


# -- decode step (runs in Ray tasks) -------------------------------------------------------


@contextlib.contextmanager
def _read_context(size: int, seed: int | None) -> Iterator[tuple[DataContext, EpochShuffle | None]]:
    """A private copy of the current DataContext, current while the dataset is created
    (a dataset keeps the context it was created with; the caller's is left untouched),
    and, with a ``seed``, the dataset's `EpochShuffle` (its key is in the context).

    - ``use_datasource_v2 = False``: Ray 2.60's default V2 Parquet reader lists the files
      in a task that starts a footer-reader actor pool, and bin-packs row groups into
      128 MiB read tasks: a 120 MB split became one read task, i.e. one core, and cost
      2-7 s before the first row. (Shards are read by `ShardDatasource` now; this keeps
      any other Parquet read of the context on V1.)
    - ``target_max_block_size``: a task hands its output over in blocks of up to this
      size (128 MB by default, ~160 decoded 512 px images): the first batch waited for
      whole tasks. One block per decode batch streams.
    - ``preserve_order``, shuffled or not: the stream is the planned order of read units,
      whichever task finishes first, so an epoch's order is a function of the plan (and
      so of ``(seed, epoch)``). Tasks still run in parallel; a finished one waits for its
      predecessors (measured in jobs/bench_ingest.py: no loss at equal-sized row groups).
      Ray Train's DataConfig replaces the execution options with the driver's.
    """
    ctx = DataContext.get_current().copy()
    ctx.use_datasource_v2 = False
    ctx.target_max_block_size = max(DECODE_BATCH_SIZE * 3 * size * size, 1 << 20)
    ctx.execution_options.preserve_order = True
    order = None
    if seed is not None:
        order = EpochShuffle(seed=int(seed), key=uuid.uuid4().hex)
        ctx.set_config(EPOCH_KEY_CONFIG, order.key)
        epoch_clock()  # started now rather than at the first epoch
    with DataContext.current(ctx):
        yield ctx, order


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
                   "skip_log": skip_log(create=True), "classes": classes, "root": root},
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
    unknown), ``image_id`` str. ``shuffle`` (default: ``train``) reads the row groups in a
    new order each epoch, a function of ``(seed, epoch)`` when the consumer passes the
    epoch to :func:`iter_torch` (see `EpochClock`); without it the order is the manifest's
    (files, then row groups, then rows). Augmentation is the consumer's (``train`` only
    picks the shuffle default). One read + decode task per row group (`ShardDatasource`):
    as many run at once as there are free CPUs, capped by ``concurrency``. The manifest
    is read first, so a wrong URI, endpoint or credentials raise :class:`DataSourceError`.
    """
    shuffle = train if shuffle is None else shuffle
    manifest = read_manifest(root_uri)
    fs, paths = _shard_paths(root_uri, manifest, split)
    units = _row_groups(fs, paths, manifest, split, root_uri) if paths else []
    if not units:
        raise DataSourceError(f"split {split!r} of {_where(root_uri)} has no shards")
    with _read_context(cfg.resize_size, seed if shuffle else None) as (_, order):
        ds = ray.data.read_datasource(
            ShardDatasource(fs, units, SHARD_COLUMNS, order),  # only these columns are read
            concurrency=concurrency,
            # One task per row group: Ray then neither groups nor splits the reads (a split
            # read is not fused with the decode, and the encoded bytes would make a round
            # trip through the object store).
            override_num_blocks=min(len(units), MAX_READ_TASKS),
        )
        return _decoded(ds, size=cfg.resize_size, source=source_key(root_uri, split))


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
    with _read_context(cfg.resize_size, seed if shuffle else None) as (_, order):
        ds = ray.data.read_binary_files(
            paths,
            filesystem=fs,
            include_paths=True,
            shuffle=order,  # an EpochShuffle: per epoch, a function of (seed, epoch)
            concurrency=concurrency,
            # One read task per DECODE_BATCH_SIZE files: unsplit, so fused with the decode.
            override_num_blocks=-(-len(paths) // DECODE_BATCH_SIZE),
        )
        ds = _decoded(ds, size=cfg.resize_size, source=source_key(uri, split),
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
        import torch

        return torch.from_numpy(a)


def iter_torch(
    data: ray.data.Dataset | ray.data.DataIterator,
    batch_size: int,
    *,
    shuffle_buffer: int | None = None,
    seed: int | None = None,
    epoch: int | None = None,
    drop_last: bool = False,
    prefetch_batches: int = 2,
    with_ids: bool = False,
    pin_memory: bool = False,
) -> Iterator[dict[str, Any]]:
    """Batches for ``wsdan.engine``: ``image`` uint8 B×3×R×R, ``label`` int64 B,
    ``object_box`` / ``part_box`` float32 B×4 (and ``image_id``, a list of str, with
    ``with_ids``). ``data`` is a dataset or a shard (``ray.train.get_dataset_shard``).
    The tensors may share read-only memory with Ray's object store: do not modify them
    in place (move or convert them, which copies). Call once per epoch.

    ``epoch``: announced to a shuffled dataset (`announce_epoch`) before the first batch
    is asked for, so its read order is that of ``(its seed, epoch)``, however often it
    ran before in this process (a job resumed at epoch k reads epoch k's order).
    ``shuffle_buffer`` images are mixed locally (in decoded form, so mind the memory),
    seeded from ``(seed, epoch)``. Both together make the epoch's sequence of images a
    function of the seeds and the epoch for a single consumer; the consumers of a
    ``streaming_split`` share out the blocks in the order they ask for them.

    ``pin_memory``: the tensors are copied into page-locked host memory, so that
    ``.to("cuda", non_blocking=True)`` is an asynchronous copy that the host does not wait
    for (from pageable memory it would be a synchronous one). For GPU consumers only.
    """
    if epoch is not None:
        announce_epoch(data, epoch)
    local_seed = None
    if shuffle_buffer and seed is not None:
        local_seed = int(np.random.SeedSequence([seed, epoch or 0]).generate_state(1)[0])
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
        if pin_memory:
            out = {k: v.pin_memory() for k, v in out.items()}
        if with_ids:
            out["image_id"] = [str(x) for x in b["image_id"]]
        yield out
