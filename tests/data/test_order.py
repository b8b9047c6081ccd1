"""Order of the training stream (wsdan.data.shards, wsdan.data.pipeline).

- Shards hold each split in a seeded random order, so a data set numbered class by class
  (class folders, CUB, Dogs) still streams batches that look like uniform draws.
- A split in one shard file is read and decoded by one task per row group.
- An epoch's order is a function of (seed, epoch): a pipeline started at epoch k (a
  resumed job) reads what an uninterrupted one reads at epoch k.

The data set: K classes of tiny JPEGs in class folders (``folder`` format), whose image
ids ("class03/img017.jpg") sort class by class, prepared into SeaweedFS by
``prepare_dataset``.
"""

from __future__ import annotations

import io
import json
import math
import re
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from wsdan.config import DataConfig, TrainConfig
from wsdan.data import shards
from wsdan.data.formats import read_dataset
from wsdan.data.shards import carve_val_split, prepare_dataset, split_order

# Enough images that the split is much longer than the local shuffle buffer (Ray's
# batcher holds up to 2 x 128 rows at the CPU config's batch size of 16): with only a few
# hundred, the buffer alone mixes the whole split and even class order passes.
K, PER_CLASS, SIDE = 10, 100, 32
VAL_FRACTION = 0.1  # 10 of each class's 100 go to val: 900 train images, 90 per class
N_TRAIN = 900
CFG = DataConfig(image_size=32, resize_size=SIDE)
BUCKET = "wsdan-order-test"
TRAIN_CFG = Path(__file__).resolve().parents[2] / "jobs" / "configs" / "synthetic_cpu.yaml"


def make_class_folders(root: Path) -> Path:
    rng = np.random.default_rng(0)
    for k in range(K):
        for j in range(PER_CLASS):
            path = root / f"class{k:02d}" / f"img{j:03d}.jpg"
            path.parent.mkdir(parents=True, exist_ok=True)
            pixels = np.clip(rng.normal(25 * k, 20, (SIDE, SIDE, 3)), 0, 255).astype(np.uint8)
            Image.fromarray(pixels).save(path, format="JPEG", quality=80)
    return root


def expected_distinct(class_counts: list[int], batch: int) -> float:
    """E[number of distinct classes in ``batch`` images drawn uniformly without replacement]:
    the sum over classes of P(class present) = 1 - C(N - n_k, B) / C(N, B)."""
    n = sum(class_counts)
    return sum(1 - math.comb(n - c, batch) / math.comb(n, batch) for c in class_counts)


def mean_distinct(label_batches: list[list[int]]) -> float:
    return float(np.mean([len(set(b)) for b in label_batches]))


def chunks(seq: list, size: int) -> list[list]:
    return [seq[i:i + size] for i in range(0, len(seq) - size + 1, size)]


def looks_uniform(label_batches: list[list[int]], class_counts: list[int], batch: int) -> bool:
    """The check: mean distinct classes per batch within 3 % of the uniform expectation
    (the standard error of the mean is ~1 % over the 56 batches of one epoch here)."""
    want = expected_distinct(class_counts, batch)
    return abs(mean_distinct(label_batches) - want) <= 0.03 * want


@pytest.fixture(scope="module")
def folders(tmp_path_factory) -> Path:
    return make_class_folders(tmp_path_factory.mktemp("order") / "insects")


@pytest.fixture(scope="module")
def prepared(folders, tmp_path_factory) -> tuple[Path, dict]:
    dest = tmp_path_factory.mktemp("order-out") / "shards"
    manifest = prepare_dataset(read_dataset("folder", str(folders)), str(dest),
                               val_fraction=VAL_FRACTION, seed=0, progress=False)
    return dest, manifest


def _stored(dest: Path, manifest: dict, split: str) -> pa.Table:
    return pa.concat_tables([pq.read_table(dest / rel) for rel in manifest["shards"][split]])


# -- prepare, no Ray -----------------------------------------------------------------------


def test_ids_of_the_source_are_in_class_order(folders) -> None:
    """The premise: sorted by id, this data set is sorted by class."""
    records = sorted(read_dataset("folder", str(folders)).records, key=lambda r: r.image_id)
    labels = [r.label for r in records]
    assert labels == sorted(labels) and len(set(labels)) == K


def test_prepare_writes_each_split_in_a_seeded_permutation(folders, prepared, tmp_path) -> None:
    dest, manifest = prepared
    batch = TrainConfig.from_yaml(TRAIN_CFG).optim.batch_size
    train = _stored(dest, manifest, "train")
    labels = train["label"].to_pylist()
    counts = manifest["class_counts"]["train"]
    assert counts == [90] * K and sum(counts) == len(labels) == N_TRAIN

    # Consecutive rows as stored look like uniform draws; the id (= class) order does not.
    stored = chunks(labels, batch)
    by_id = chunks(train.sort_by("image_id")["label"].to_pylist(), batch)
    assert looks_uniform(stored, counts, batch), (mean_distinct(stored), counts)
    assert not looks_uniform(by_id, counts, batch)
    assert mean_distinct(by_id) < 0.5 * expected_distinct(counts, batch)

    # The order is split_order's: (seed, split) only; the val carve-out is as before.
    listing = read_dataset("folder", str(folders))
    records = carve_val_split(sorted(listing.records, key=lambda r: r.image_id),
                              num_classes=K, fraction=VAL_FRACTION, seed=0)
    for split in ("train", "val"):
        ids = _stored(dest, manifest, split)["image_id"].to_pylist()
        assert ids == [r.image_id for r in split_order(records, split, 0)]
        assert sorted(ids) == sorted(r.image_id for r in records if r.split == split)
    assert manifest["row_groups"]["train"] == [[128] * 7 + [4]]

    # Deterministic: the same seed writes the same bytes; another seed another order
    # (the carve-out too, as before: it has always followed the seed).
    again = tmp_path / "again"
    assert prepare_dataset(listing, str(again), val_fraction=VAL_FRACTION, seed=0,
                           progress=False) == manifest
    for rel in manifest["shards"]["train"] + manifest["shards"]["val"]:
        assert (again / rel).read_bytes() == (dest / rel).read_bytes()
    other = prepare_dataset(listing, str(tmp_path / "other"), val_fraction=VAL_FRACTION,
                            seed=1, progress=False)
    assert _stored(tmp_path / "other", other, "train")["image_id"].to_pylist() != \
        train["image_id"].to_pylist()


def test_split_order_depends_on_seed_and_split_only() -> None:
    from wsdan.data.formats import ImageRecord

    records = [ImageRecord(f"{i:03d}", "p", i % 4, "train") for i in range(40)]
    ids = [r.image_id for r in split_order(records, "train", 7)]
    assert sorted(ids) == [r.image_id for r in records] and ids != sorted(ids)
    assert [r.image_id for r in split_order(records[::-1], "train", 7)] == ids  # input order
    assert [r.image_id for r in split_order(records, "train", 8)] != ids
    as_test = [r.__class__(r.image_id, r.path, r.label, "test") for r in records]
    assert [r.image_id for r in split_order(as_test, "test", 7)] != ids
    assert split_order(records, "val", 7) == []


def test_read_tasks_are_row_groups_each_row_once(prepared) -> None:
    """Without Ray: the datasource plans one read task per row group of the one train file
    (and fewer when asked), and the tasks together return every row exactly once."""
    import pyarrow.fs as pafs

    from wsdan.data.pipeline import ShardDatasource, _row_groups
    from wsdan.data.reader import COLUMNS as _SHARD_COLUMNS

    dest, manifest = prepared
    paths = [str(dest / rel) for rel in manifest["shards"]["train"]]
    fs = pafs.LocalFileSystem()
    units = _row_groups(fs, paths, manifest, "train", str(dest))
    assert units == _row_groups(fs, paths, {}, "train", str(dest))  # manifest == footers
    assert [u.rows for u in units] == [128] * 7 + [4] and len(paths) == 1
    source = ShardDatasource(fs, units, _SHARD_COLUMNS)
    for parallelism, n_tasks in ((len(units), 8), (3, 3), (100, 8)):
        tasks = source.get_read_tasks(parallelism)
        assert len(tasks) == n_tasks
        assert sum(t.metadata.num_rows for t in tasks) == N_TRAIN
        ids = [i for t in tasks for block in t() for i in block["image_id"].to_pylist()]
        assert ids == _stored(dest, manifest, "train")["image_id"].to_pylist()  # once each
    block = next(iter(tasks[0]()))
    assert block.column_names == _SHARD_COLUMNS  # the other columns are not read


# -- the training stream, Ray --------------------------------------------------------------


def _upload(s3_server, dest: Path, manifest: dict, prefix: str) -> str:
    """Copy a prepared data set to the bucket."""
    client = s3_server.client()
    for rels in manifest["shards"].values():
        for rel in rels:
            client.put_object(Bucket=BUCKET, Key=f"{prefix}/{rel}", Body=(dest / rel).read_bytes())
    client.put_object(Bucket=BUCKET, Key=f"{prefix}/dataset.json", Body=json.dumps(manifest))
    return f"s3://{BUCKET}/{prefix}"


def _upload_sorted(s3_server, dest: Path, manifest: dict, prefix: str) -> str:
    """The same train split written the old way: rows sorted by image id, same row groups."""
    table = _stored(dest, manifest, "train").sort_by("image_id")
    buf = io.BytesIO()
    pq.write_table(table, buf, row_group_size=shards.ROW_GROUP_ROWS)
    s3_server.client().put_object(Bucket=BUCKET, Key=f"{prefix}/train/part-00000.parquet",
                                  Body=buf.getvalue())
    sorted_manifest = dict(manifest, shards={"train": ["train/part-00000.parquet"]},
                           row_groups={"train": [shards.row_group_sizes(table.num_rows)]})
    s3_server.client().put_object(Bucket=BUCKET, Key=f"{prefix}/dataset.json",
                                  Body=json.dumps(sorted_manifest))
    return f"s3://{BUCKET}/{prefix}"


@pytest.fixture(scope="module")
def uploaded(s3_server, prepared, folders, tmp_path_factory) -> dict[str, str]:
    s3_server.ensure_bucket(BUCKET)
    dest, manifest = prepared
    out = {"shuffled": _upload(s3_server, dest, manifest, "shuffled"),
           "sorted": _upload_sorted(s3_server, dest, manifest, "sorted")}
    # Row groups of 100 rows (9 in the one train file) for the order tests.
    small = tmp_path_factory.mktemp("order-small") / "shards"
    mp = pytest.MonkeyPatch()
    mp.setattr(shards, "ROW_GROUP_ROWS", 100)
    try:
        small_manifest = prepare_dataset(read_dataset("folder", str(folders)), str(small),
                                         val_fraction=VAL_FRACTION, seed=0, progress=False)
    finally:
        mp.undo()
    assert len(small_manifest["shards"]["train"]) == 1
    assert len(small_manifest["row_groups"]["train"][0]) == 9
    out["small_groups"] = _upload(s3_server, small, small_manifest, "small-groups")
    out["small_manifest"] = small_manifest
    return out


def _training_label_batches(uri: str, epochs: int) -> list[list[int]]:
    """Label batches as the training loop gets them: wsdan.raytrain's per-epoch iterator
    (local shuffle buffer of 8 batches, drop_last), batch size and seed of the CPU config."""
    from wsdan.data.pipeline import build_dataset
    from wsdan.raytrain import _batches

    cfg = TrainConfig.from_yaml(TRAIN_CFG)
    ds = build_dataset(uri, "train", cfg=CFG, train=True, seed=cfg.seed)
    return [b["label"].tolist() for epoch in range(epochs)
            for b in _batches(ds, cfg.optim.batch_size, train=True, seed=cfg.seed * 7919,
                              epoch=epoch)]


@pytest.mark.slow
def test_training_batches_look_like_uniform_draws(ray_cluster, s3_env, uploaded,
                                                  prepared) -> None:
    """Three epochs of training batches: the mean number of distinct classes per batch is
    within 3 % of the exact expectation for uniform draws. The same images stored in id
    (class) order, through the same pipeline, fail that check by far."""
    _, manifest = prepared
    counts = manifest["class_counts"]["train"]
    batch = TrainConfig.from_yaml(TRAIN_CFG).optim.batch_size
    want = expected_distinct(counts, batch)
    assert 8.0 < want < 8.3  # 10 classes of 90, 16 per batch: ~8.17 (a sanity check)

    got = _training_label_batches(uploaded["shuffled"], epochs=3)
    assert len(got) == 3 * (N_TRAIN // batch) and all(len(b) == batch for b in got)
    assert looks_uniform(got, counts, batch), (mean_distinct(got), want)

    old = _training_label_batches(uploaded["sorted"], epochs=3)
    assert not looks_uniform(old, counts, batch)
    assert mean_distinct(old) < 0.75 * want, (mean_distinct(old), want)


def _read_tasks(stats: str) -> int:
    """Tasks of the fused read + decode operator, from ``Dataset.stats()``."""
    match = re.search(r"Operator \d+ ReadShards->MapBatches\(decode_blocks\): (\d+) tasks", stats)
    assert match, stats
    return int(match.group(1))


@pytest.mark.slow
def test_one_shard_file_is_decoded_by_one_task_per_row_group(ray_cluster, s3_env,
                                                            uploaded) -> None:
    """Nine row groups in one file: nine read + decode tasks, each image once per epoch."""
    from wsdan.data.pipeline import build_dataset, iter_torch

    manifest = uploaded["small_manifest"]
    ds = build_dataset(uploaded["small_groups"], "train", cfg=CFG, train=True, seed=3)
    for epoch in range(2):
        ids = [i for b in iter_torch(ds, 16, with_ids=True, epoch=epoch) for i in b["image_id"]]
        assert len(ids) == len(set(ids)) == manifest["counts"]["train"]
    assert _read_tasks(ds.stats()) == 9


def _ids(data, epoch: int | None, shuffle_buffer: int | None = 64) -> list[str]:
    from wsdan.data.pipeline import iter_torch

    return [i for b in iter_torch(data, 16, shuffle_buffer=shuffle_buffer, seed=11, epoch=epoch,
                                  with_ids=True) for i in b["image_id"]]


@pytest.mark.slow
def test_epoch_order_is_a_function_of_seed_and_epoch(ray_cluster, s3_env, uploaded) -> None:
    """An uninterrupted run of epochs 0, 1, 2 and a fresh pipeline started at epoch 2 (a
    resumed job) read the same sequence of images in epoch 2: on the dataset itself and
    through ``streaming_split`` (the shard a Train worker gets)."""
    from wsdan.data.pipeline import build_dataset

    uri, manifest = uploaded["small_groups"], uploaded["small_manifest"]
    ds = build_dataset(uri, "train", cfg=CFG, train=True, seed=5)
    run = [_ids(ds, epoch) for epoch in range(3)]
    ids = sorted(run[0])
    assert len(ids) == len(set(ids)) == manifest["counts"]["train"]
    assert all(sorted(r) == ids for r in run) and len({tuple(r) for r in run}) == 3

    fresh = build_dataset(uri, "train", cfg=CFG, train=True, seed=5)
    assert _ids(fresh, 2) == run[2]
    assert _ids(fresh, 0) == run[0]  # and back: any epoch, any time
    other_seed = build_dataset(uri, "train", cfg=CFG, train=True, seed=6)
    assert _ids(other_seed, 2) != run[2]

    # The shard a Train worker iterates: plans in the streaming_split coordinator.
    split = build_dataset(uri, "train", cfg=CFG, train=True, seed=5).streaming_split(1)[0]
    assert [_ids(split, e) for e in range(3)] == run
    resumed = build_dataset(uri, "train", cfg=CFG, train=True, seed=5).streaming_split(1)[0]
    assert _ids(resumed, 2) == run[2]


@pytest.mark.slow
def test_row_group_order_is_drawn_from_seed_and_epoch(ray_cluster, s3_env, uploaded) -> None:
    """Without the local shuffle the stream is the row groups in the permutation drawn from
    (seed, epoch), rows in stored order. A consumer that announces no epoch gets Ray's
    execution count instead (0 in a fresh pipeline): the resume bug the epoch fixes."""
    import pyarrow.fs as pafs

    from wsdan.data.pipeline import _epoch_seed, build_dataset
    from wsdan.storage import filesystem_and_path

    uri, manifest = uploaded["small_groups"], uploaded["small_manifest"]
    fs, base = filesystem_and_path(uri)
    with fs.open_input_file(f"{base}/{manifest['shards']['train'][0]}") as f:
        pf = pq.ParquetFile(f)
        groups = [pf.read_row_group(i, columns=["image_id"])["image_id"].to_pylist()
                  for i in range(pf.num_row_groups)]
    assert isinstance(fs, pafs.S3FileSystem) and len(groups) == 9

    def expected(seed: int, epoch: int) -> list[str]:
        perm = np.random.default_rng(_epoch_seed(seed, epoch)).permutation(len(groups))
        return [i for g in perm for i in groups[g]]

    ds = build_dataset(uri, "train", cfg=CFG, train=True, seed=5)
    for epoch in (0, 1, 4):
        assert _ids(ds, epoch, shuffle_buffer=None) == expected(5, epoch)
    fresh = build_dataset(uri, "train", cfg=CFG, train=True, seed=5)
    assert _ids(fresh, None, shuffle_buffer=None) == expected(5, 0) != expected(5, 4)
    unshuffled = build_dataset(uri, "train", cfg=CFG, train=False, seed=5)
    assert _ids(unshuffled, 4, shuffle_buffer=None) == [i for g in groups for i in g]
