"""The Ray Data pipeline (wsdan.data.pipeline) and the decoder under it (wsdan.data.decode).

Decoder tests run without Ray. The ``slow`` tests upload a small generated set as Parquet
shards (the ``wsdan data prepare`` contract) to the session's SeaweedFS server and stream
it through a local Ray on loopback.
"""

from __future__ import annotations

import io
import json
import socket
import threading
import time

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from PIL import Image

from wsdan.config import DataConfig
from wsdan.data.decode import DecodeError, decode, decode_batch, decode_image, rescale_boxes
from wsdan.data.synthetic import SyntheticSpec, class_names, generate_arrays
from wsdan.transforms import train_transform

BUCKET = "wsdan-pipeline-test"
N_TRAIN, N_VAL, N_SHARDS = 80, 16, 5
SRC, R = 64, 48  # generated image side; resize_size of the pipeline
CFG = DataConfig(image_size=40, resize_size=R)
CORRUPT_ID = "00013"

SCHEMA = pa.schema([
    ("image", pa.binary()), ("label", pa.int64()), ("label_name", pa.string()),
    ("split", pa.string()), ("image_id", pa.string()),
    # Variable-size lists: pyarrow 25 cannot read back a *fixed*-size list column that
    # holds nulls from Parquet (apache/arrow#35692); see test_decode_batch_box_types.
    ("bbox", pa.list_(pa.float32())), ("part_bbox", pa.list_(pa.float32())),
    ("width", pa.int32()), ("height", pa.int32()),
])


def _jpeg(img: Image.Image, **kw) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format="JPEG", quality=kw.pop("quality", 95), **kw)
    return buf.getvalue()


def _png(img: Image.Image, **kw) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format="PNG", **kw)
    return buf.getvalue()


# -- decoder, no Ray -----------------------------------------------------------------------


@pytest.mark.parametrize("mode", ["L", "LA", "RGBA", "P", "CMYK", "1", "I;16", "I", "RGB"])
def test_decode_any_mode_to_rgb(mode: str) -> None:
    rgb = Image.fromarray(np.random.default_rng(0).integers(0, 256, (30, 40, 3), np.uint8))
    if mode in ("I;16", "I"):
        grey = np.linspace(0, 65535, 30 * 40).reshape(30, 40)
        img = Image.fromarray(grey.astype(np.uint16 if mode == "I;16" else np.int32))
    elif mode == "P":
        img = rgb.convert("P", palette=Image.Palette.ADAPTIVE)
    else:
        img = rgb.convert(mode)
    if mode in ("CMYK", "L", "RGB"):
        data = _jpeg(img)
    elif mode == "I":  # 32-bit grey: PNG cannot hold it, TIFF can
        buf = io.BytesIO()
        img.save(buf, format="TIFF")
        data = buf.getvalue()
    else:
        data = _png(img)
    with Image.open(io.BytesIO(data)) as check:
        assert check.mode == mode, "the encoded file keeps the mode under test"
    out = decode_image(data, 24)
    assert out.shape == (24, 24, 3) and out.dtype == np.uint8
    if mode in ("I;16", "I"):
        # Scaled to 8 bits, not clipped at 255 (PIL's own convert would turn it white).
        assert out[0, 0, 0] < 10 and out[-1, -1, 0] > 245 and 100 < out.mean() < 155
        assert (out[..., 0] == out[..., 1]).all()
    if mode in ("RGB", "P", "CMYK", "RGBA"):
        ref = np.asarray(rgb.resize((24, 24), Image.Resampling.BILINEAR), np.float32)
        assert np.abs(out.astype(np.float32) - ref).mean() < 25  # colours survive


def test_decode_alpha_composited_over_white() -> None:
    a = np.zeros((20, 20, 4), np.uint8)
    a[..., 0] = 200  # red where opaque, anything under the transparent half
    a[:, :10, 3] = 255
    out = decode_image(_png(Image.fromarray(a, "RGBA")), 20)
    assert (out[:, :8] == (200, 0, 0)).all()
    assert (out[:, 12:] == 255).all()
    pal = Image.fromarray(a[..., :3]).convert("P")
    pal.info["transparency"] = 0
    assert decode_image(_png(pal, transparency=0), 20).shape == (20, 20, 3)


def test_decode_large_jpeg_at_reduced_scale() -> None:
    small = generate_arrays(SyntheticSpec(image_size=SRC, num_classes=5), [0])["images"][0]
    big = Image.fromarray(small).resize((1600, 1200), Image.Resampling.BICUBIC)
    data = _jpeg(big)
    d = decode(data, 96)  # 1600/96 and 1200/96 >= 8: draft decodes at 1/8 scale
    assert (d.width, d.height) == (1600, 1200) and d.image.shape == (96, 96, 3)
    full = np.asarray(Image.open(io.BytesIO(data)).convert("RGB").resize(
        (96, 96), Image.Resampling.BILINEAR), np.float32)
    assert np.abs(d.image.astype(np.float32) - full).mean() < 4


def test_decode_rejects_garbage() -> None:
    with pytest.raises(DecodeError):
        decode_image(b"\xff\xd8\xff garbage", 32)
    jpeg = _jpeg(Image.new("RGB", (64, 64), (10, 200, 30)))
    with pytest.raises(DecodeError):
        decode_image(jpeg[: len(jpeg) // 2], 32)  # truncated


def test_decode_batch_box_types() -> None:
    img = _jpeg(Image.new("RGB", (80, 40), (90, 90, 90)))
    box = [8.0, 4.0, 40.0, 20.0]
    fixed = pa.array([box, box, box], pa.list_(pa.float32(), 4))  # fixed size, no nulls
    var = pa.array([box, None, box], pa.list_(pa.float32()))  # variable size with a null
    table = pa.table({"image": [img, img, b"not an image"], "label": [1, 2, 3],
                      "image_id": ["a", "b", "c"], "bbox": fixed, "part_bbox": var})
    out = decode_batch(table, 20)
    assert [i for i, _ in out.skipped] == ["c"]
    cols = out.columns
    assert cols["image"].shape == (2, 3, 20, 20) and cols["image"].flags.c_contiguous
    assert cols["label"].tolist() == [1, 2] and list(cols["image_id"]) == ["a", "b"]
    want = rescale_boxes(np.array(box), 80, 40, 20)
    np.testing.assert_allclose(cols["object_box"], [want, want])
    np.testing.assert_allclose(want, [2, 2, 10, 10])
    assert np.isnan(cols["part_box"][1]).all() and not np.isnan(cols["part_box"][0]).any()


def test_read_manifest_missing(tmp_path) -> None:
    from wsdan.data.pipeline import DataSourceError, read_manifest

    with pytest.raises(DataSourceError, match=str(tmp_path)):
        read_manifest(str(tmp_path))


# -- shards in S3 ---------------------------------------------------------------------------


class Source:
    """What was uploaded: per image id, label and box in the resized image's pixels."""

    def __init__(self) -> None:
        spec = SyntheticSpec(image_size=SRC, num_classes=5, seed=3)
        self.arrays = generate_arrays(spec, range(N_TRAIN + N_VAL))
        self.classes = class_names(5)
        self.train_ids = [f"{i:05d}" for i in range(N_TRAIN)]
        self.val_ids = [f"{i:05d}" for i in range(N_TRAIN, N_TRAIN + N_VAL)]
        a = self.arrays
        self.label = {f"{i:05d}": int(a["labels"][i]) for i in range(N_TRAIN + N_VAL)}
        s = R / SRC
        self.object_box = {f"{i:05d}": (a["object_boxes"][i] * s if i % 5 else np.full(4, np.nan))
                           for i in range(N_TRAIN + N_VAL)}
        self.part_box = {f"{i:05d}": a["part_boxes"][i] * s for i in range(N_TRAIN + N_VAL)}

    def row(self, i: int) -> dict:
        """Every 4th image is stored at 96×64 (not square) with its boxes in those pixels."""
        a = self.arrays
        img = Image.fromarray(a["images"][i])
        w, h = (96, 64) if i % 4 == 0 else (SRC, SRC)
        scale = np.array([w / SRC, h / SRC] * 2, np.float32)
        return {"image": _jpeg(img.resize((w, h), Image.Resampling.BICUBIC)),
                "label": int(a["labels"][i]), "label_name": self.classes[int(a["labels"][i])],
                "image_id": f"{i:05d}",
                "bbox": (a["object_boxes"][i] * scale).tolist() if i % 5 else None,
                "part_bbox": (a["part_boxes"][i] * scale).tolist(), "width": w, "height": h}


def _upload(client, prefix: str, src: Source, corrupt: str | None = None) -> str:
    shards = {"train": [], "val": []}
    groups = {"train": [list(range(N_TRAIN))[k::N_SHARDS] for k in range(N_SHARDS)],
              "val": [list(range(N_TRAIN, N_TRAIN + N_VAL))]}
    for split, parts in groups.items():
        for k, idx in enumerate(parts):
            rows = [dict(src.row(i), split=split) for i in idx]
            for r in rows:
                if r["image_id"] == corrupt:
                    r["image"] = b"\x00garbage" * 50
            table = pa.Table.from_pylist(rows, schema=SCHEMA)
            buf = io.BytesIO()
            pq.write_table(table, buf, row_group_size=8)
            rel = f"{split}/part-{k:05d}.parquet"
            client.put_object(Bucket=BUCKET, Key=f"{prefix}/{rel}", Body=buf.getvalue())
            shards[split].append(rel)
    manifest = {"format_version": 1, "classes": src.classes, "num_classes": 5,
                "counts": {"train": N_TRAIN, "val": N_VAL}, "shards": shards, "skipped": []}
    client.put_object(Bucket=BUCKET, Key=f"{prefix}/dataset.json",
                      Body=json.dumps(manifest).encode())
    return f"s3://{BUCKET}/{prefix}"


@pytest.fixture(scope="module")
def source() -> Source:
    return Source()


@pytest.fixture(scope="module")
def uploaded(s3_server, source: Source) -> dict[str, str]:
    s3_server.ensure_bucket(BUCKET)
    client = s3_server.client()
    return {"clean": _upload(client, "clean", source),
            "corrupt": _upload(client, "corrupt", source, corrupt=CORRUPT_ID)}


def _consume(it, batch_size: int = 8) -> tuple[list[str], list[dict]]:
    from wsdan.data.pipeline import iter_torch

    ids, batches = [], []
    for b in iter_torch(it, batch_size, with_ids=True):
        ids += b["image_id"]
        batches.append(b)
    return ids, batches


def _consume_split(shards: list) -> list[tuple[list[str], list[dict]]]:
    """Iterate the splits concurrently, as Train workers do (one alone would stall)."""
    out: list = [None] * len(shards)

    def work(r: int) -> None:
        try:
            out[r] = _consume(shards[r])
        except BaseException as e:  # re-raised in the test's thread below
            out[r] = e

    threads = [threading.Thread(target=work, args=(r,)) for r in range(len(shards))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    for r in out:
        if isinstance(r, BaseException) or r is None:
            raise AssertionError(f"a consumer failed: {r!r}")
    return out


def _check_rows(batches: list[dict], src: Source) -> None:
    for b in batches:
        assert b["image"].dtype == torch.uint8 and b["image"].shape[1:] == (3, R, R)
        assert b["label"].dtype == torch.int64 and b["object_box"].dtype == torch.float32
        for j, image_id in enumerate(b["image_id"]):
            assert int(b["label"][j]) == src.label[image_id]
            np.testing.assert_allclose(b["object_box"][j].numpy(), src.object_box[image_id],
                                       atol=1e-3)
            np.testing.assert_allclose(b["part_box"][j].numpy(), src.part_box[image_id],
                                       atol=1e-3)
    # Pixels: the decoded image matches the generated one, resized (JPEG q95 noise only).
    b = batches[0]
    i = int(b["image_id"][0])
    ref = np.asarray(Image.fromarray(source_image(src, i)).resize((R, R)), np.float32)
    got = b["image"][0].permute(1, 2, 0).numpy().astype(np.float32)
    assert np.abs(got - ref).mean() < 8


def source_image(src: Source, i: int) -> np.ndarray:
    return src.arrays["images"][i]


@pytest.mark.slow
def test_split_delivers_each_image_once_per_epoch_reshuffled(ray_cluster, s3_env, uploaded,
                                                             source) -> None:
    """Two consumers, as two Train workers: every image once per epoch, new order per epoch.

    ``equal=True`` is what Ray Train's default DataConfig uses and what DDP needs (every
    rank must run the same number of steps, or a collective hangs); it may drop up to n-1
    rows per epoch, none here as 80 is even (the corrupt-row test shows a drop)."""
    from wsdan.data.pipeline import build_dataset

    ds = build_dataset(uploaded["clean"], "train", cfg=CFG, train=True, seed=7)
    shards = ds.streaming_split(2, equal=True)
    epochs = []
    for _ in range(2):
        (ids0, b0), (ids1, b1) = _consume_split(shards)
        assert len(ids0) == len(ids1) == N_TRAIN // 2
        assert sorted(ids0 + ids1) == source.train_ids
        _check_rows(b0 + b1, source)
        epochs.append(ids0 + ids1)
    assert epochs[0] != epochs[1], "file order is reshuffled every epoch"


@pytest.mark.slow
def test_unshuffled_order_is_deterministic_and_feeds_engine(ray_cluster, s3_env, uploaded,
                                                            source) -> None:
    from wsdan.data.pipeline import build_dataset, iter_torch

    ds = build_dataset(uploaded["clean"], "val", cfg=CFG, train=False, seed=0)
    first, batches = _consume(ds, batch_size=6)
    second, _ = _consume(ds, batch_size=6)
    assert first == second == source.val_ids  # manifest order, row order
    _check_rows(batches, source)
    mixed = [i for b in iter_torch(ds, 6, shuffle_buffer=16, seed=0, with_ids=True)
             for i in b["image_id"]]
    assert sorted(mixed) == source.val_ids and mixed != source.val_ids  # local shuffle
    g = torch.Generator().manual_seed(0)
    x = train_transform(batches[0]["image"], CFG.image_size, generator=g)
    assert x.shape == (6, 3, CFG.image_size, CFG.image_size) and x.dtype == torch.float32


@pytest.mark.slow
def test_corrupt_image_skipped_and_counted(ray_cluster, s3_env, uploaded, source) -> None:
    from wsdan.data.pipeline import build_dataset, skip_report, skipped_images

    root = uploaded["corrupt"]
    ds = build_dataset(root, "train", cfg=CFG, train=True, seed=1)
    orders = []
    for _ in range(2):
        ids, _ = _consume(ds)
        assert sorted(ids) == [i for i in source.train_ids if i != CORRUPT_ID]
        orders.append(ids)
    assert orders[0] != orders[1]  # one consumer too: a new file order each epoch
    deadline = time.monotonic() + 120  # sent without waiting for it: slow on a busy machine
    while skip_report(root, "train").get(f"{root}#train", {}).get("events", 0) < 2:
        assert time.monotonic() < deadline, skip_report()
        time.sleep(0.2)
    assert skipped_images(root, "train") == 1  # one distinct image, seen in two epochs
    assert list(skip_report(root, "train")[f"{root}#train"]["examples"]) == [CORRUPT_ID]
    # With two equal consumers, 79 rows become 39 + 39: equal=True drops one.
    (ids0, _), (ids1, _) = _consume_split(ds.streaming_split(2, equal=True))
    assert len(ids0) == len(ids1) == 39


@pytest.mark.slow
def test_wrong_endpoint_or_secret_named_without_secret(s3_env, uploaded, monkeypatch) -> None:
    from wsdan.data.pipeline import DataSourceError, build_dataset, read_manifest

    secret = s3_env["AWS_SECRET_ACCESS_KEY"]
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        dead = f"http://127.0.0.1:{s.getsockname()[1]}"  # nothing listens there
    monkeypatch.setenv("AWS_ENDPOINT_URL", dead)
    # One retry, not the default ten (~25 s of retries, tests/test_faults.py): only the
    # message is checked here.
    monkeypatch.setenv("WSDAN_S3_RETRIES", "1")
    t0 = time.monotonic()
    with pytest.raises(DataSourceError) as e:
        read_manifest(uploaded["clean"])
    assert time.monotonic() - t0 < 30
    assert dead in str(e.value) and f"'{BUCKET}'" in str(e.value) and secret not in str(e.value)

    monkeypatch.setenv("AWS_ENDPOINT_URL", s3_env["AWS_ENDPOINT_URL"])
    wrong = "Wr0ngSecretKeyThatMustNotBeEchoed1234567"
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", wrong)
    with pytest.raises(DataSourceError) as e:
        build_dataset(uploaded["clean"], "train", cfg=CFG, train=True)
    msg = str(e.value)
    assert s3_env["AWS_ENDPOINT_URL"] in msg and f"'{BUCKET}'" in msg
    assert wrong not in msg and secret not in msg

    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", secret)
    with pytest.raises(DataSourceError, match="no data set manifest"):
        read_manifest(f"s3://{BUCKET}/nothing-here")


@pytest.mark.slow
def test_folder_dataset(ray_cluster, s3_env, s3_server, source) -> None:
    from wsdan.data.pipeline import build_folder_dataset, folder_split_of

    s3_server.ensure_bucket(BUCKET)
    client = s3_server.client()
    names = {}
    for i in range(30):
        label = source.label[f"{i:05d}"]
        key = f"{source.classes[label]}/img{i:03d}.jpg"
        client.put_object(Bucket=BUCKET, Key=f"folders/{key}",
                          Body=_jpeg(Image.fromarray(source_image(source, i))))
        names[key] = label
    client.put_object(Bucket=BUCKET, Key="folders/README.txt", Body=b"not an image")
    uri = f"s3://{BUCKET}/folders"
    got = {}
    for split in ("train", "val"):
        ds, classes = build_folder_dataset(uri, split, cfg=CFG, train=split == "train",
                                           val_fraction=0.3)
        assert classes == sorted({source.classes[v] for v in names.values()})
        ids, batches = _consume(ds)
        for b in batches:
            assert torch.isnan(b["object_box"]).all()
            for j, image_id in enumerate(b["image_id"]):
                assert classes[int(b["label"][j])] == image_id.split("/")[0]
                assert folder_split_of(image_id, val_fraction=0.3, test_fraction=0) == split
        got[split] = ids
    assert sorted(got["train"] + got["val"]) == sorted(names)
    assert got["train"] and got["val"]


@pytest.mark.slow
def test_reader_without_ray_matches_the_pipeline(ray_cluster, s3_env, uploaded, source) -> None:
    """`SplitReader` (what `wsdan evaluate` uses without --ray) gives the unshuffled
    pipeline's batches: the same images in the same order, the same tensors; a corrupt
    image is left out and counted by name."""
    from wsdan.data.pipeline import build_dataset
    from wsdan.data.reader import SplitReader

    ds = build_dataset(uploaded["clean"], "val", cfg=CFG, train=False, shuffle=False)
    ids, batches = _consume(ds, batch_size=6)
    reader = SplitReader(uploaded["clean"], "val", resize_size=CFG.resize_size, batch_size=6,
                         with_ids=True, lookahead=2)
    got = list(reader)
    assert [i for b in got for i in b["image_id"]] == ids == source.val_ids
    assert [len(b["label"]) for b in got] == [len(b["label"]) for b in batches]
    for mine, theirs in zip(got, batches):
        for key in ("image", "label", "object_box", "part_box"):
            assert mine[key].dtype == theirs[key].dtype
            torch.testing.assert_close(mine[key], theirs[key], equal_nan=True, rtol=0, atol=0)
    assert reader.skipped == []

    reader = SplitReader(uploaded["corrupt"], "train", resize_size=CFG.resize_size,
                         batch_size=7, with_ids=True)
    for _ in range(2):  # a second pass starts afresh
        got_ids = [i for b in reader for i in b["image_id"]]
        assert sorted(got_ids) == [i for i in source.train_ids if i != CORRUPT_ID]
        assert [i for i, _ in reader.skipped] == [CORRUPT_ID]
    from wsdan.data.manifest import DataSourceError

    with pytest.raises(DataSourceError, match="split 'test' not in"):
        SplitReader(uploaded["clean"], "test", resize_size=CFG.resize_size, batch_size=4)
