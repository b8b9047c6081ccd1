"""Convert a public data set's own layout (or a class-folder tree) to Parquet shards.

    python -m jobs.prepare_data --format cub --src /data/CUB_200_2011 --dest s3://bucket/cub

Reads the data set's published annotation files, checks them before writing anything
(a problem is reported with its file and line), then writes ``<dest>/<split>/part-*.parquet``
and ``<dest>/dataset.json`` (see wsdan/data/shards.py for the columns and the manifest).
``--src`` and ``--dest`` are local folders or ``s3://bucket/prefix``; the S3 endpoint comes
from ``--endpoint`` or ``AWS_ENDPOINT_URL``, credentials from the usual AWS variables.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from typing import Any

from wsdan.data.formats import FORMATS, DatasetFormatError, read_dataset
from wsdan.data.shards import MAX_SHARD_MB, prepare_dataset, summarize


def get_args_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--format", required=True, choices=list(FORMATS), help="source layout")
    p.add_argument("--src", required=True, help="the extracted data set: folder or s3:// URI")
    p.add_argument("--dest", required=True, help="output folder or s3://bucket/prefix")
    p.add_argument(
        "--val-fraction",
        type=float,
        default=0.1,
        help="share of each class's train images moved to val when the data set has no "
        "val split (0: no val split)",
    )
    p.add_argument(
        "--shard-mb",
        type=float,
        default=128.0,
        help=f"target shard size in MB of image bytes (max {MAX_SHARD_MB})",
    )
    p.add_argument("--seed", type=int, default=0, help="seed of the val split")
    p.add_argument("--endpoint", default=None, help="S3 endpoint URL (default: AWS_ENDPOINT_URL)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    return p


def main(args: argparse.Namespace) -> dict[str, Any]:
    if not 0.0 <= args.val_fraction < 1.0:
        raise SystemExit(f"--val-fraction must be in [0, 1), got {args.val_fraction}")
    if not 0.0 < args.shard_mb <= MAX_SHARD_MB:
        raise SystemExit(f"--shard-mb must be in (0, {MAX_SHARD_MB}], got {args.shard_mb}")
    if args.endpoint:
        # wsdan.storage reads the service-specific variable first, as boto3 does.
        os.environ["AWS_ENDPOINT_URL_S3"] = os.environ["AWS_ENDPOINT_URL"] = args.endpoint
    t0 = time.perf_counter()
    try:
        listing = read_dataset(args.format, args.src)
    except DatasetFormatError as e:
        print(f"error: {e}", file=sys.stderr)
        raise SystemExit(2) from e
    except OSError as e:  # an unreachable or forbidden --src: one line, exit 2
        raise _source_error(args.src, e, "reading") from None
    print(f"{listing.name}: {len(listing.records)} images listed in {listing.source}")
    try:
        manifest = prepare_dataset(
            listing,
            args.dest,
            val_fraction=args.val_fraction,
            seed=args.seed,
            shard_mb=args.shard_mb,
            progress=not args.no_progress,
        )
    except OSError as e:  # a forbidden or unreachable --dest (wrong keys, no keys, ...)
        raise _source_error(args.dest, e, "writing") from None
    print(summarize(manifest, args.dest))
    print(f"done in {time.perf_counter() - t0:.1f}s")
    return manifest


def _source_error(uri: str, err: OSError, doing: str) -> Exception:
    """A user-facing error (one line, exit 2) for ``err`` at ``uri``; one that already is
    one (a full disk names its path) is kept."""
    from wsdan.cli import user_errors
    from wsdan.data.manifest import access_error

    return err if isinstance(err, user_errors()) else access_error(uri, err, doing)


if __name__ == "__main__":
    import sys

    from wsdan.cli import run_main

    sys.exit(run_main(main, get_args_parser()))
