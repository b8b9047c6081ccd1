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


# Overrides for a training job small enough for two cores: K=3, 40 px, batch 8.
TINY = [
    "model.backbone=resnet18_layer3", "model.num_classes=3", "model.num_attentions=2",
    "model.weights=null", "optim.batch_size=8", "optim.base_batch_size=8", "optim.lr=0.01",
    "optim.head_lr_mult=0.1", "optim.warmup_epochs=0", "data.image_size=40",
    "data.resize_size=48",
]


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
