"""One split of a prepared data set, read in this process without Ray.

For commands that need no cluster: ``wsdan evaluate`` on one machine reads its split with
this (``--ray`` uses the Ray Data pipeline instead). The bytes, the decode and the order are
the pipeline's without shuffle (:func:`wsdan.data.pipeline.build_dataset` with
``shuffle=False``): the manifest's files, then their row groups, then their rows, each
image decoded by :func:`wsdan.data.decode.decode_batch` to ``resize_size`` pixels; images
that do not decode are left out and counted (:attr:`SplitReader.skipped`).

Row groups are read and decoded by a few threads (the Parquet reader and PIL's decoders
release the GIL), at most ``lookahead`` row groups ahead of the consumer, so memory stays
bounded by that many decoded row groups.
"""

from __future__ import annotations

import os
from collections import deque
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from wsdan.data.decode import decode_batch
from wsdan.data.manifest import DataSourceError, _shard_paths, _where, read_manifest

__all__ = ["SplitReader", "read_row_group"]

COLUMNS = ["image", "label", "image_id", "bbox", "part_bbox"]  # what is read of a shard


def read_row_group(fs: Any, path: str, index: int, columns: list[str]) -> pa.Table:
    """Row group ``index`` of the shard at ``path``: the ``columns`` it has, in one ranged
    request (also the Ray Data pipeline's read step)."""
    with fs.open_input_file(path) as f:
        pf = pq.ParquetFile(f, pre_buffer=True)
        names = set(pf.schema_arrow.names)
        return pf.read_row_group(index, columns=[c for c in columns if c in names])


class SplitReader:
    """Batches of one split: ``image`` uint8 B×3×R×R, ``label`` int64 B, ``object_box`` /
    ``part_box`` float32 B×4 (torch tensors, as :func:`wsdan.data.pipeline.iter_torch`
    gives them), and with ``with_ids`` ``image_id`` (a list of str). Iterate once per pass; ``skipped`` lists ``(image_id, reason)`` of the
    images the last pass left out. The manifest is read at once, so a wrong path, endpoint
    or credentials, or a missing split, raise :class:`DataSourceError` here."""

    def __init__(self, root_uri: str, split: str, *, resize_size: int, batch_size: int,
                 threads: int | None = None, lookahead: int | None = None,
                 with_ids: bool = False) -> None:
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        self.root_uri, self.split = root_uri, split
        self.size, self.batch_size = int(resize_size), int(batch_size)
        manifest = read_manifest(root_uri)
        self.fs, self.paths = _shard_paths(root_uri, manifest, split)
        if not self.paths:
            raise DataSourceError(f"split {split!r} of {_where(root_uri)} has no shards")
        self.threads = threads or max(1, min(4, os.cpu_count() or 1))
        self.lookahead = lookahead or 2 * self.threads
        self.keys = ["image", "label", "object_box", "part_box"] + (["image_id"] if with_ids
                                                                     else [])
        self.skipped: list[tuple[str, str]] = []

    def _units(self) -> Iterator[tuple[str, int]]:
        for path in self.paths:
            try:
                md = pq.read_metadata(path, filesystem=self.fs)
            except (OSError, ValueError) as e:
                raise DataSourceError(f"cannot read the shard {path} of "
                                      f"{_where(self.root_uri)}: {e}") from None
            for i in range(md.num_row_groups):
                if md.row_group(i).num_rows:
                    yield path, i

    def _decode(self, path: str, index: int) -> Any:
        try:
            table = read_row_group(self.fs, path, index, COLUMNS)
        except (OSError, ValueError, pa.ArrowException) as e:
            raise DataSourceError(f"cannot read row group {index} of {path} in "
                                  f"{_where(self.root_uri)}: {e}") from None
        return decode_batch(table, self.size)

    def __iter__(self) -> Iterator[dict[str, Any]]:
        self.skipped = []
        pending: dict[str, list[np.ndarray]] = {}
        held = 0
        with ThreadPoolExecutor(self.threads, thread_name_prefix="wsdan-read") as pool:
            queue: deque[Future] = deque()
            units = self._units()
            for unit in units:
                queue.append(pool.submit(self._decode, *unit))
                if len(queue) >= self.lookahead:
                    break
            while queue:
                out = queue.popleft().result()
                for unit in units:  # keep the look-ahead full
                    queue.append(pool.submit(self._decode, *unit))
                    break
                self.skipped.extend(out.skipped)
                cols = out.columns
                for key in self.keys:
                    pending.setdefault(key, []).append(cols[key])
                held += len(cols["label"])
                while held >= self.batch_size:
                    batch, held = _take(pending, self.batch_size), held - self.batch_size
                    yield _tensors(batch)
        if held:
            yield _tensors(_take(pending, held))


def _tensors(batch: dict[str, np.ndarray]) -> dict[str, Any]:
    import torch

    return {k: [str(x) for x in v] if k == "image_id" else torch.from_numpy(v)
            for k, v in batch.items()}


def _take(pending: dict[str, list[np.ndarray]], n: int) -> dict[str, np.ndarray]:
    """The first ``n`` rows of the pending arrays (removed from them)."""
    out = {}
    for key, parts in pending.items():
        whole = np.concatenate(parts) if len(parts) > 1 else parts[0]
        out[key] = np.array(whole[:n])  # a writable copy: torch warns on read-only views
        pending[key] = [whole[n:]] if len(whole) > n else []
    return out
