"""Helpers shared by the real-service tests."""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from pathlib import Path


@contextlib.contextmanager
def aws_environ(s3_server) -> Iterator[None]:
    """This process's environment points at ``s3_server`` (keys included) for the block."""
    saved = dict(os.environ)
    os.environ.update(s3_server.aws_env())
    try:
        yield
    finally:
        os.environ.clear()
        os.environ.update(saved)


def prepare_tiny_synthetic(s3_server, src: Path, bucket: str, *, n_train: int,
                           n_val: int) -> str:
    """A tiny generated data set (K=3, 64 px) prepared into ``s3://bucket/data``."""
    from jobs import prepare_data
    from wsdan.data.synthetic import SyntheticSpec, write_synthetic_dataset

    s3_server.ensure_bucket(bucket)
    write_synthetic_dataset(src, spec=SyntheticSpec(num_classes=3, image_size=64, seed=0),
                            n_train=n_train, n_val=n_val, n_test=6, progress=False)
    with aws_environ(s3_server):
        prepare_data.main(prepare_data.get_args_parser().parse_args(
            ["--format", "synthetic", "--src", str(src), "--dest", f"s3://{bucket}/data",
             "--no-progress"]))
    return f"s3://{bucket}/data"
