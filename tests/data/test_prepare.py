"""End-to-end tests of `wsdan data prepare` (jobs/prepare_data.py, wsdan/data/shards.py):
tiny copies of each layout -> Parquet shards + dataset.json, read back with pyarrow."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from jobs.prepare_data import get_args_parser, main
from tests.data.test_formats import (
    AH,
    AW,
    CARS_CLASSES,
    H,
    W,
    make_aircraft,
    make_cars,
    make_cub,
    make_dogs,
    make_folder,
    make_synthetic,
)
from wsdan.data import shards
from wsdan.data.formats import read_dataset
from wsdan.data.shards import SCHEMA, carve_val_split, prepare_dataset


def _prepare(fmt: str, src: Path, dest: Path, **kw) -> dict:
    return prepare_dataset(read_dataset(fmt, str(src)), str(dest), progress=False, **kw)


def _read_split(dest: Path, manifest: dict, split: str, *, by_id: bool = True) -> pa.Table:
    """The rows of ``split``, sorted by image id (``by_id``) or in the order stored."""
    tables = [pq.read_table(dest / rel) for rel in manifest["shards"][split]]
    table = pa.concat_tables(tables) if tables else SCHEMA.empty_table()
    return table.sort_by("image_id") if by_id else table


def _hashes(dest: Path) -> dict[str, str]:
    return {
        str(p.relative_to(dest)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(dest.rglob("*"))
        if p.is_file()
    }


def test_cub_end_to_end(tmp_path):
    src = make_cub(tmp_path / "src")
    dest = tmp_path / "out"
    manifest = _prepare("cub", src, dest, val_fraction=0.34, seed=3)

    assert manifest["format_version"] == 1 and manifest["source_format"] == "cub"
    assert manifest["name"] == "CUB-200-2011" and manifest["source"] == str(src)
    assert manifest["classes"] == ["Black_footed_Albatross", "Laysan_Albatross", "Sooty_Albatross"]
    assert manifest["num_classes"] == 3
    # 3 train images per class; round(0.34 * 3) = 1 of them goes to val; test untouched
    assert manifest["counts"] == {"train": 6, "val": 3, "test": 3}
    assert manifest["class_counts"] == {"train": [2, 2, 2], "val": [1, 1, 1], "test": [1, 1, 1]}
    assert manifest["val_from_train"] is True and manifest["banner_cropped"] is False
    assert (manifest["val_fraction"], manifest["seed"], manifest["skipped"]) == (0.34, 3, [])
    assert manifest["shards"] == {s: [f"{s}/part-00000.parquet"] for s in ("train", "val", "test")}
    assert json.loads((dest / "dataset.json").read_text()) == manifest

    for split in ("train", "val", "test"):
        table = _read_split(dest, manifest, split)
        assert table.schema.equals(SCHEMA)
        assert pq.ParquetFile(dest / manifest["shards"][split][0]).schema_arrow.equals(SCHEMA)
        assert set(table["split"].to_pylist()) == {split}
        stored = _read_split(dest, manifest, split, by_id=False)["image_id"].to_pylist()
        assert sorted(stored) == table["image_id"].to_pylist()
        listing = read_dataset("cub", str(src))
        records = carve_val_split(listing.records, num_classes=3, fraction=0.34, seed=3)
        assert stored == [r.image_id for r in shards.split_order(records, split, 3)]
        assert manifest["row_groups"][split] == [[len(stored)]]
    test = _read_split(dest, manifest, "test").to_pylist()
    assert [r["image_id"] for r in test] == ["12", "4", "8"]
    row = test[1]  # CUB id 4: class 1, box x=4 y=2 w=10 h=20
    assert (row["label"], row["label_name"]) == (0, "Black_footed_Albatross")
    assert row["bbox"] == [4.0, 2.0, 14.0, 22.0] and row["part_bbox"] is None
    assert (row["width"], row["height"]) == (W, H)
    path = src / "images" / "001.Black_footed_Albatross" / "Black_footed_Albatross_0004_104.jpg"
    assert row["image"] == path.read_bytes()  # the original bytes, not re-encoded

    # val: one image of each class, stratified; the choice follows the seed
    val = _read_split(dest, manifest, "val")
    assert sorted(val["label"].to_pylist()) == [0, 1, 2]
    assert set(val["image_id"].to_pylist()).isdisjoint({"4", "8", "12"})


def test_val_split_is_stratified_seeded_and_never_from_test():
    from wsdan.data.formats import ImageRecord

    records = [
        ImageRecord(f"{k}-{i:03d}", "p", k, "train" if i < 40 else "test")
        for k, n in enumerate((50, 20, 3, 1))
        for i in range(n)
    ]
    a = carve_val_split(records, num_classes=4, fraction=0.1, seed=0)
    val = [r for r in a if r.split == "val"]
    # per class: round(0.1 * train count) of train images -> 4, 2, 0, 0
    assert [sum(r.label == k for r in val) for k in range(4)] == [4, 2, 0, 0]
    assert all(r.image_id.split("-")[1] < "040" for r in val)  # test images stay put
    assert carve_val_split(records, num_classes=4, fraction=0.1, seed=0) == a
    picks = {
        tuple(
            r.image_id
            for r in carve_val_split(records, num_classes=4, fraction=0.1, seed=s)
            if r.split == "val"
        )  # fmt: skip
        for s in range(5)
    }
    assert len(picks) == 5  # each seed its own choice
    half = carve_val_split(records, num_classes=4, fraction=0.5, seed=0)
    # a one-image class keeps it in train; 3 images -> 2 to val (round(1.5) = 2)
    assert [sum(r.label == k and r.split == "val" for r in half) for k in range(4)] == [
        20,
        10,
        2,
        0,
    ]
    with pytest.raises(ValueError, match="val fraction"):
        carve_val_split(records, num_classes=4, fraction=1.0, seed=0)


def test_rerun_is_byte_identical_and_stale_shards_are_removed(tmp_path, monkeypatch):
    src = make_cub(tmp_path / "src", per_class=8)
    dest = tmp_path / "out"
    image_bytes = [p.stat().st_size for p in sorted((src / "images").rglob("*.jpg"))]
    shard_mb = 2.5 * max(image_bytes) / 2**20  # two or three images per shard
    monkeypatch.setattr(shards, "ROW_GROUP_ROWS", 2)
    first = _prepare("cub", src, dest, shard_mb=shard_mb)
    assert len(first["shards"]["train"]) >= 5
    before = _hashes(dest)

    # shards stay under the target and are full (the next image would not have fitted);
    # row groups hold at most ROW_GROUP_ROWS rows
    target, total = shard_mb * 2**20, 0
    for rels in first["shards"].values():
        sizes = []
        for rel in rels:
            f = pq.ParquetFile(dest / rel)
            sizes.append([len(b) for b in f.read(columns=["image"])["image"].to_pylist()])
            assert all(f.metadata.row_group(i).num_rows <= 2 for i in range(f.num_row_groups))
            assert f.num_row_groups == (len(sizes[-1]) + 1) // 2
        assert all(sum(s) <= target for s in sizes)
        assert all(sum(s) + nxt[0] > target for s, nxt in zip(sizes, sizes[1:]))
        total += sum(map(len, sizes))
    assert total == sum(first["counts"].values()) == 24

    second = _prepare("cub", src, dest, shard_mb=shard_mb)
    assert second == first and _hashes(dest) == before

    # bigger shards: fewer files, the old extra shards are gone, no row twice
    third = _prepare("cub", src, dest)
    assert third["shards"]["train"] == ["train/part-00000.parquet"]
    assert sorted(p.name for p in (dest / "train").iterdir()) == ["part-00000.parquet"]
    rows = sum(_read_split(dest, third, s).num_rows for s in ("train", "val", "test"))
    assert rows == 24 and third["counts"] == first["counts"]


def test_aircraft_banner_is_cropped_and_boxes_clipped(tmp_path):
    dest = tmp_path / "out"
    manifest = _prepare("aircraft", make_aircraft(tmp_path / "src"), dest)
    assert manifest["counts"] == {"train": 3, "val": 3, "test": 3}
    assert manifest["val_from_train"] is False and manifest["banner_cropped"] is True
    assert manifest["banner_px"] == 20 and "reencoded" in manifest
    assert manifest["classes"] == ["707-320", "Boeing 717", "F/A-18"]
    val = _read_split(dest, manifest, "val").to_pylist()
    row = val[1]  # image n = 5, variant "Boeing 717", 1-based box (5, 3, 40, 60)
    assert (row["image_id"], row["label_name"], row["label"]) == ("1000005", "Boeing 717", 1)
    assert (row["width"], row["height"]) == (AW, AH - 20)
    assert row["bbox"] == [4.0, 2.0, 40.0, AH - 20]  # clipped at the banner


def test_cars_dogs_folder_synthetic_end_to_end(tmp_path):
    cars = _prepare("cars", make_cars(tmp_path / "cars"), tmp_path / "cars_out", val_fraction=0.25)
    assert cars["classes"] == CARS_CLASSES
    assert cars["class_counts"] == {"train": [3] * 3, "val": [1] * 3, "test": [1] * 3}
    test = _read_split(tmp_path / "cars_out", cars, "test").to_pylist()
    assert [r["image_id"] for r in test] == [
        "cars_test/00001",
        "cars_test/00002",
        "cars_test/00003",
    ]
    assert test[1]["bbox"] == [1.0, 1.0, 30.0, 35.0] and test[1]["label"] == 1

    dogs = _prepare("dogs", make_dogs(tmp_path / "dogs"), tmp_path / "dogs_out", val_fraction=0.25)
    assert dogs["counts"] == {"train": 9, "val": 3, "test": 3}
    rows = {
        r["image_id"]: r
        for s in ("train", "val", "test")
        for r in _read_split(tmp_path / "dogs_out", dogs, s).to_pylist()
    }
    assert rows["n02085620_1000"]["bbox"] == [1.0, 2.0, 30.0, 25.0]
    assert rows["n02085620_1000"]["label_name"] == "Chihuahua"

    folder_src = make_folder(tmp_path / "f", split_folders=True)
    folder = _prepare("folder", folder_src, tmp_path / "f_out", val_fraction=0.34)
    assert folder["counts"] == {"train": 6, "val": 3, "test": 3}
    table = _read_split(tmp_path / "f_out", folder, "test")
    assert table["bbox"].null_count == 3 and table["part_bbox"].null_count == 3
    assert table["label_name"].to_pylist() == ["beetle", "moth", "wasp"]

    syn_src = make_synthetic(tmp_path / "syn")
    syn = _prepare("synthetic", syn_src, tmp_path / "syn_out")
    assert syn["counts"] == {"train": 6, "val": 3, "test": 3} and syn["val_from_train"] is False
    val = _read_split(tmp_path / "syn_out", syn, "val").to_pylist()
    assert all(r["part_bbox"] is not None and r["bbox"] is not None for r in val)
    part = np.array([r["part_bbox"] for r in val])
    obj = np.array([r["bbox"] for r in val])
    assert (part[:, :2] >= obj[:, :2] - 0.5).all() and (part[:, 2:] <= obj[:, 2:] + 0.5).all()
    assert syn["synthetic_spec"]["image_size"] == 32 and val[0]["width"] == 32


def test_corrupt_image_is_skipped_and_listed(tmp_path):
    src = make_cub(tmp_path / "src")
    path = src / "images" / "002.Laysan_Albatross" / "Laysan_Albatross_0005_105.jpg"
    path.write_bytes(path.read_bytes()[: len(path.read_bytes()) // 2])  # truncated
    garbage = src / "images" / "003.Sooty_Albatross" / "Sooty_Albatross_0012_112.jpg"
    garbage.write_bytes(b"not a jpeg at all")
    manifest = _prepare("cub", src, tmp_path / "out", val_fraction=0.0)
    assert [s["image_id"] for s in manifest["skipped"]] == ["12", "5"]
    assert (
        manifest["skipped"][1]["path"]
        == "images/002.Laysan_Albatross/Laysan_Albatross_0005_105.jpg"
    )
    assert "truncated" in manifest["skipped"][1]["reason"].lower()
    assert "UnidentifiedImageError" in manifest["skipped"][0]["reason"]
    assert manifest["counts"] == {"train": 8, "val": 0, "test": 2}
    assert manifest["class_counts"]["train"] == [3, 2, 3] and manifest["shards"]["val"] == []
    ids = _read_split(tmp_path / "out", manifest, "train")["image_id"].to_pylist()
    assert "5" not in ids and len(ids) == 8


def test_cli_prints_summary_and_bad_input_writes_nothing(tmp_path, capsys):
    src = make_cub(tmp_path / "src")
    dest = tmp_path / "out"
    args = ["--format", "cub", "--src", str(src), "--dest", str(dest), "--no-progress"]
    manifest = main(get_args_parser().parse_args([*args, "--shard-mb", "1", "--seed", "1"]))
    out = capsys.readouterr().out
    assert "train" in out and "per class min / median / max" in out and "skipped" in out
    assert "smallest classes in train: Black_footed_Albatross (3)" in out
    assert manifest["counts"] == {"train": 9, "val": 0, "test": 3}  # round(0.1 * 3) = 0

    (src / "images.txt").write_text((src / "images.txt").read_text() + "13 nowhere/x.jpg\n")
    bad = tmp_path / "bad"
    with pytest.raises(SystemExit) as exit_info:
        main(
            get_args_parser().parse_args(["--format", "cub", "--src", str(src), "--dest", str(bad)])
        )
    assert exit_info.value.code == 2
    assert f"{src / 'images.txt'}:13: image listed but absent" in capsys.readouterr().err
    assert not bad.exists()


@pytest.mark.slow
def test_s3_source_and_destination(tmp_path, s3_server, s3_env):
    import pyarrow.fs as pafs

    from wsdan.storage import filesystem_and_path

    s3_server.ensure_bucket("prepare-test")
    src = make_cub(tmp_path / "src")
    fs, _ = filesystem_and_path("s3://prepare-test/raw")
    pafs.copy_files(str(src), "prepare-test/raw/CUB_200_2011", destination_filesystem=fs)

    dest = "s3://prepare-test/shards/cub"
    args = ["--format", "cub", "--src", "s3://prepare-test/raw", "--dest", dest, "--no-progress",
            "--val-fraction", "0.34"]  # fmt: skip
    manifest = main(get_args_parser().parse_args([*args, "--shard-mb", "0.002"]))
    assert manifest["source"] == "s3://prepare-test/raw"
    assert manifest["counts"] == {"train": 6, "val": 3, "test": 3}
    assert len(manifest["shards"]["train"]) > 1
    stored = json.loads(fs.open_input_stream("prepare-test/shards/cub/dataset.json").read())
    assert stored == manifest
    tables = [
        pq.read_table(f"prepare-test/shards/cub/{rel}", filesystem=fs)
        for split in ("train", "val", "test")
        for rel in manifest["shards"][split]
    ]
    rows = {r["image_id"]: r for r in pa.concat_tables(tables).to_pylist()}
    assert len(rows) == 12 and rows["4"]["bbox"] == [4.0, 2.0, 14.0, 22.0]
    original = src / "images" / "001.Black_footed_Albatross" / "Black_footed_Albatross_0004_104.jpg"
    assert rows["4"]["image"] == original.read_bytes()

    # a rerun with bigger shards replaces the small ones and leaves no stale object behind
    main(get_args_parser().parse_args([*args, "--endpoint", s3_env["AWS_ENDPOINT_URL"]]))
    listed = fs.get_file_info(pafs.FileSelector("prepare-test/shards/cub", recursive=True))
    names = sorted(i.path for i in listed if i.type == pafs.FileType.File)
    assert names == [f"prepare-test/shards/cub/{p}" for p in (
        "dataset.json", "test/part-00000.parquet", "train/part-00000.parquet", "val/part-00000.parquet"
    )]  # fmt: skip
