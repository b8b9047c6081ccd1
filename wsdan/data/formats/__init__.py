"""Readers for public fine-grained data-set layouts: each lists a data set (ids, paths,
labels, splits, boxes) from its own published annotation files and checks them, so that a
broken copy fails before anything is written. `wsdan.data.shards` turns a listing into
Parquet shards.

    listing = read_dataset("cub", "/data/CUB_200_2011")   # or s3://bucket/CUB_200_2011
"""

from __future__ import annotations

from collections.abc import Callable

from ._common import SPLITS, Box, DatasetFormatError, DatasetListing, ImageRecord, SourceTree
from .aircraft import crop_banner, read_aircraft
from .cars import read_cars
from .cub import read_cub
from .dogs import read_dogs
from .folder import IMAGE_EXTENSIONS, read_folder
from .synthetic import read_synthetic

__all__ = [
    "FORMATS",
    "IMAGE_EXTENSIONS",
    "SPLITS",
    "Box",
    "DatasetFormatError",
    "DatasetListing",
    "ImageRecord",
    "SourceTree",
    "crop_banner",
    "read_dataset",
]

# --format name -> reader
FORMATS: dict[str, Callable[[SourceTree], DatasetListing]] = {
    "cub": read_cub,
    "aircraft": read_aircraft,
    "cars": read_cars,
    "dogs": read_dogs,
    "folder": read_folder,
    "synthetic": read_synthetic,
}


def read_dataset(source_format: str, src: str) -> DatasetListing:
    """List and check the data set at ``src`` (a local folder or ``s3://bucket/prefix``).

    Raises `DatasetFormatError` (a ValueError) naming the file and line of every problem:
    a missing annotation file, a malformed line, a label out of range, a duplicate id, an
    image listed but absent. Images are not opened here.
    """
    if source_format not in FORMATS:
        raise ValueError(f"unknown format {source_format!r}; choose from {', '.join(FORMATS)}")
    listing = FORMATS[source_format](SourceTree(src))
    listing.records.sort(key=lambda r: r.image_id)
    return listing
