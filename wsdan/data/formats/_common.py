"""What every format reader shares: the listing it returns, the source tree it reads from,
and the checks that turn bad annotation files into errors that name the file and line.

A reader only *lists* a data set (ids, paths, labels, splits, boxes); it reads annotation
files but not images, so a broken data set is reported before anything is written. Images
are read, checked and written by `wsdan.data.shards`.

Boxes are ``(x0, y0, x1, y1)`` in continuous pixel coordinates of the stored image, the
image spanning ``[0, W] x [0, H]`` (the generated data set's convention). A box given as
1-based inclusive pixel indices ``xmin..xmax`` (FGVC-Aircraft, Stanford Cars, PASCAL VOC)
covers ``[xmin - 1, xmax]`` in these coordinates.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import pyarrow.fs as pafs

from wsdan.storage import filesystem_and_path, is_remote

SPLITS = ("train", "val", "test")
Box = tuple[float, float, float, float]
MAX_REPORTED = 20  # problems listed in one error message; the rest are counted


class DatasetFormatError(ValueError):
    """A data set's files do not match its published layout. ``problems`` holds one
    ``"file:line: what"`` string per problem found (all of them, not only the reported)."""

    def __init__(self, message: str, problems: list[str] | None = None) -> None:
        super().__init__(message)
        self.problems = problems if problems is not None else [message]


@dataclass(frozen=True)
class ImageRecord:
    image_id: str  # unique across the data set
    path: str  # relative to the listing's source tree, "/"-separated
    label: int  # 0-based class index
    split: str  # one of SPLITS
    bbox: Box | None = None  # object box, see the module docstring
    part_bbox: Box | None = None  # discriminative-part box (generated data set only)


@dataclass
class DatasetListing:
    """A data set as its reader found it. ``transform`` (bytes -> bytes), when set, is applied
    to every image before it is stored (FGVC-Aircraft's banner crop); ``info`` holds extra
    manifest entries (how boxes were made, what was cropped)."""

    name: str
    source_format: str
    tree: SourceTree
    classes: list[str]
    records: list[ImageRecord]
    transform: Callable[[bytes], bytes] | None = None
    info: dict[str, Any] = field(default_factory=dict)

    @property
    def source(self) -> str:
        return self.tree.uri


class SourceTree:
    """A folder, local or ``s3://``, listed once (recursively) and read by relative path.

    One listing instead of a request per file: checking that 20 000 images exist is one
    paginated LIST on S3 rather than 20 000 HEAD requests.
    """

    def __init__(self, uri: str) -> None:
        self.remote = is_remote(uri)
        self.fs, self.base = filesystem_and_path(uri)
        self.uri = uri.rstrip("/") if self.remote else self.base
        self._files: dict[str, int] | None = None
        self._dirs: set[str] | None = None

    def where(self, rel: str) -> str:
        """The full path or URI of ``rel``, for messages."""
        return f"{self.uri}/{rel}" if self.remote else os.path.join(self.base, rel)

    def files(self) -> dict[str, int]:
        """Every file below the root: relative path -> size in bytes."""
        if self._files is None:
            is_folder = (
                self.remote or self.fs.get_file_info(self.base).type == pafs.FileType.Directory
            )
            if not is_folder:  # S3 has no folders: an empty listing says it below
                raise DatasetFormatError(f"source folder not found: {self.uri}")
            selector = pafs.FileSelector(self.base, recursive=True, allow_not_found=True)
            prefix = self.base.rstrip("/") + "/"
            self._files = {
                i.path[len(prefix) :]: i.size
                for i in self.fs.get_file_info(selector)
                if i.type == pafs.FileType.File
            }
            if not self._files:
                raise DatasetFormatError(f"no files under {self.uri}")
            self._dirs = set()
            for path in self._files:
                parts = path.split("/")[:-1]
                self._dirs.update("/".join(parts[: i + 1]) for i in range(len(parts)))
        return self._files

    def is_file(self, rel: str) -> bool:
        return rel in self.files()

    def is_dir(self, rel: str) -> bool:
        self.files()
        return rel.strip("/") in self._dirs

    def subdirs(self, rel: str) -> list[str]:
        """Names of the folders directly inside ``rel`` ("" = the root), sorted."""
        self.files()
        prefix = rel.strip("/") + "/" if rel.strip("/") else ""
        return sorted({d[len(prefix) :].split("/")[0] for d in self._dirs if d.startswith(prefix)})

    def read(self, rel: str) -> bytes:
        with self.fs.open_input_stream(f"{self.base.rstrip('/')}/{rel}") as f:
            return f.read()

    def read_many(self, rels: Iterable[str], workers: int = 8) -> Iterator[bytes]:
        """Contents of ``rels`` in order; reads overlap (many small objects on S3)."""
        with ThreadPoolExecutor(max_workers=workers) as pool:
            yield from pool.map(self.read, rels)

    def read_text(self, rel: str) -> str:
        data = self.read(rel)
        try:
            return data.decode("utf-8-sig")
        except UnicodeDecodeError as e:
            raise DatasetFormatError(f"{self.where(rel)}: not UTF-8 text ({e})") from e

    def require(self, candidates: Iterable[str], what: str) -> str:
        """The first of ``candidates`` (relative paths) that is a file; else an error naming
        what is missing and where it was looked for."""
        candidates = list(candidates)
        for rel in candidates:
            if self.is_file(rel):
                return rel
        looked = ", ".join(self.where(c) for c in candidates)
        raise DatasetFormatError(f"missing annotation file {what}: looked for {looked}")


class Problems:
    """Collects problems so that one error reports all of them (a user who lost 40 images
    learns that once, not 40 times)."""

    def __init__(self) -> None:
        self.items: list[str] = []

    def add(self, where: str, what: str) -> None:
        self.items.append(f"{where}: {what}")

    def __bool__(self) -> bool:
        return bool(self.items)

    def raise_if_any(self, dataset: str) -> None:
        if not self.items:
            return
        n = len(self.items)
        lines = "\n  ".join(self.items[:MAX_REPORTED])
        more = f"\n  ... and {n - MAX_REPORTED} more" if n > MAX_REPORTED else ""
        raise DatasetFormatError(
            f"{n} problem{'s' if n > 1 else ''} in the {dataset} files:\n  {lines}{more}",
            problems=list(self.items),
        )


def read_rows(
    tree: SourceTree, rel: str, problems: Problems, *, fields: int, rest: bool = False
) -> Iterator[tuple[str, list[str]]]:
    """Whitespace-separated rows of a text file as ``("file:line", fields)``; blank lines are
    skipped. ``rest=True``: the last field takes the rest of the line (names with spaces).
    A row with the wrong number of fields is a problem and is not yielded."""
    path = tree.where(rel)
    for lineno, line in enumerate(tree.read_text(rel).splitlines(), 1):
        if not line.strip():
            continue
        parts = line.split(maxsplit=fields - 1) if rest else line.split()
        if rest and len(parts) == fields:
            parts[-1] = parts[-1].strip()
        if len(parts) != fields:
            problems.add(f"{path}:{lineno}", f"expected {fields} fields, got {line.strip()!r}")
            continue
        yield f"{path}:{lineno}", parts


def parse_int(text: str, where: str, problems: Problems, what: str) -> int | None:
    try:
        return int(text)
    except ValueError:
        problems.add(where, f"{what} is not an integer: {text!r}")
        return None


def parse_floats(texts: Iterable[str], where: str, problems: Problems, what: str):
    try:
        values = [float(t) for t in texts]
    except ValueError:
        problems.add(where, f"{what} is not numeric: {' '.join(texts)!r}")
        return None
    if not all(v == v and abs(v) != float("inf") for v in values):
        problems.add(where, f"{what} is not finite: {values}")
        return None
    return values


def box_from_xywh(values: list[float], where: str, problems: Problems) -> Box | None:
    """``x y width height`` (CUB) -> ``(x0, y0, x1, y1)``."""
    x, y, w, h = values
    if w < 0 or h < 0:
        problems.add(where, f"box with negative size: {values}")
        return None
    return (x, y, x + w, y + h)


def box_from_one_based(values: list[float], where: str, problems: Problems) -> Box | None:
    """1-based inclusive ``xmin ymin xmax ymax`` -> ``(xmin - 1, ymin - 1, xmax, ymax)``."""
    xmin, ymin, xmax, ymax = values
    if xmax < xmin or ymax < ymin:
        problems.add(where, f"box with max < min: {values}")
        return None
    return (xmin - 1.0, ymin - 1.0, xmax, ymax)


def check_unique(records: Iterable[tuple[str, str]], problems: Problems) -> None:
    """``(image_id, where)`` pairs: an id seen twice is a problem naming both places."""
    first: dict[str, str] = {}
    for image_id, where in records:
        if image_id in first:
            problems.add(where, f"duplicate image id {image_id!r} (first at {first[image_id]})")
        else:
            first[image_id] = where


def find_root(tree: SourceTree, marker: str, subfolders: Iterable[str]) -> str:
    """The prefix ("" or "sub/") under which ``marker`` lies: users point --src at the
    extracted folder or at its parent."""
    for sub in ("", *subfolders):
        prefix = f"{sub}/" if sub else ""
        if tree.is_file(prefix + marker):
            return prefix
    return ""


def load_mat(tree: SourceTree, rel: str) -> dict[str, Any]:
    """A MATLAB v5 file's variables, squeezed (``squeeze_me``: 1 x N cells become arrays)."""
    import io

    try:
        import scipy.io
    except ImportError as e:  # scipy is only needed for the .mat-based formats
        raise ImportError("reading .mat annotation files needs scipy: pip install scipy") from e
    try:
        return scipy.io.loadmat(io.BytesIO(tree.read(rel)), squeeze_me=True)
    except (ValueError, TypeError, NotImplementedError, OSError) as e:
        raise DatasetFormatError(f"{tree.where(rel)}: cannot read as a MATLAB file ({e})") from e


def mat_field(mat: dict[str, Any], name: str, where: str):
    """Variable ``name`` of a loaded .mat file as a 1-D array (a single entry is squeezed to
    a 0-d array by loadmat; this undoes that)."""
    import numpy as np

    if name not in mat:
        raise DatasetFormatError(
            f"{where}: no variable {name!r} (found {sorted(k for k in mat if not k.startswith('__'))})"
        )
    return np.atleast_1d(mat[name]).reshape(-1)
