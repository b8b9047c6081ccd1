"""Benchmark: images/s that the Ray Data pipeline delivers from S3, against a local DataLoader.

In one run, for each training size (448 px → decode to 512, 224 → 256):
  (a) Ray Data: Parquet shards in a SeaweedFS S3 server (started here, loopback, free
      ports) → ``wsdan.data.pipeline.build_dataset`` → ``iter_torch`` in this process,
      the images in many small shards (``--shard-images`` each);
  (a') the same, the same images in ``--few-shards`` files (default 1: fewer files than
      decode CPUs), which must not cap the decode parallelism;
  (b) ``torch.utils.data.DataLoader`` with the same number of worker processes and the
      same decode + resize (``wsdan.data.decode``), reading the same JPEGs from local disk;
  (c) the decode-only ceiling: decode + resize in one process, bytes already in memory.
Shards are written by ``wsdan data prepare``'s writer (``wsdan.data.shards.encode_shard``,
its row groups). The consumer only receives batches (uint8 B×3×R×R, labels, boxes). Steady
state counts from the end of batch ``--warmup-batches`` to the last batch; end to end
counts from the start (dataset build and worker start-up included; the Ray cluster's own
start is shown apart). Runs alternate (b)/(a)/(a') ``--repeats`` times; a ratio is the
median of the paired (back-to-back) ratios, which resists the load of other processes on
shared cores better than a ratio of bests. Targets, in steady state: (a) ≥ 0.9 of (b),
and (a') ≥ 0.9 of (a).

Images: generated birds, upscaled to 500×375 (CUB's typical size) with per-image noise
so that JPEG sizes (~60-90 KB at quality 90) and decode costs are photo-like.

    python -m jobs.bench_ingest [--n-images 2000] [--sizes 448,224] [--workers 2] [--few-shards 1]

Prints a table, and as its last line one JSON object.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import platform
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import torch
from PIL import Image


def get_args_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--n-images", type=int, default=2000, help="images in the generated set")
    p.add_argument("--sizes", default="448,224", help="training sizes; decode to 8/7 of each")
    p.add_argument("--workers", type=int, default=os.cpu_count() or 2,
                   help="DataLoader workers = Ray CPUs (default: the machine's cores)")
    p.add_argument("--batch-size", type=int, default=32, help="images per batch")
    p.add_argument("--shard-images", type=int, default=256,
                   help="images per Parquet shard in the many-shard layout")
    p.add_argument("--few-shards", type=int, default=1,
                   help="shard files of the few-shard layout (fewer than --workers)")
    p.add_argument("--warmup-batches", type=int, default=10,
                   help="batches before the steady-state clock starts")
    p.add_argument("--repeats", type=int, default=2, help="alternating runs of each case")
    p.add_argument("--source-size", default="500x375", help="WxH of the stored JPEGs")
    return p


def make_images(n: int, width: int, height: int) -> tuple[list[bytes], np.ndarray, np.ndarray]:
    """n JPEGs (q90, 4:2:0 as most photos) from 128 distinct generated birds + noise."""
    from wsdan.data.synthetic import SyntheticSpec, generate_arrays

    base = generate_arrays(SyntheticSpec(image_size=128, num_classes=20), range(min(n, 128)))
    rng = np.random.default_rng(0)
    blobs, labels, boxes = [], [], []
    scale = np.array([width / 128, height / 128] * 2, np.float32)
    for i in range(n):
        j = i % len(base["labels"])
        big = np.asarray(Image.fromarray(base["images"][j]).resize(
            (width, height), Image.Resampling.BICUBIC), np.int16)
        big = np.clip(big + rng.normal(0, 6, big.shape), 0, 255).astype(np.uint8)
        buf = io.BytesIO()
        Image.fromarray(big).save(buf, format="JPEG", quality=90)
        blobs.append(buf.getvalue())
        labels.append(int(base["labels"][j]))
        boxes.append(base["object_boxes"][j] * scale)
    return blobs, np.array(labels, np.int64), np.array(boxes, np.float32)


def write_shards(client, bucket: str, prefix: str, blobs, labels, boxes, width, height,
                 n_shards: int) -> str:
    """The ``wsdan data prepare`` layout, written by its own writer (row groups included):
    train/part-NNNNN.parquet (the images in ``n_shards`` equal files) + dataset.json."""
    from wsdan.data.formats import ImageRecord
    from wsdan.data.shards import ImageRow, encode_shard

    classes = [f"c{i}" for i in range(20)]
    rels, row_groups = [], []
    for k, idx in enumerate(np.array_split(np.arange(len(blobs)), n_shards)):
        rows = [ImageRow(ImageRecord(f"{i:07d}", f"{i:07d}.jpg", int(labels[i]), "train",
                                     tuple(float(v) for v in boxes[i])), blobs[i], width, height)
                for i in idx]
        data = encode_shard(rows, classes)
        md = pq.ParquetFile(io.BytesIO(data)).metadata
        row_groups.append([md.row_group(g).num_rows for g in range(md.num_row_groups)])
        rel = f"train/part-{k:05d}.parquet"
        client.put_object(Bucket=bucket, Key=f"{prefix}/{rel}", Body=data)
        rels.append(rel)
    manifest = {"format_version": 1, "classes": classes, "num_classes": len(classes),
                "counts": {"train": len(blobs)}, "shards": {"train": rels},
                "row_groups": {"train": row_groups}, "skipped": []}
    client.put_object(Bucket=bucket, Key=f"{prefix}/dataset.json", Body=json.dumps(manifest))
    return f"s3://{bucket}/{prefix}"


class JpegFiles(torch.utils.data.Dataset):
    """The DataLoader baseline: one JPEG file per sample, same decode as the pipeline."""

    def __init__(self, files: list[str], labels: np.ndarray, boxes: np.ndarray, size: int):
        self.files, self.labels, self.boxes, self.size = files, labels, boxes, size

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        from wsdan.data.decode import decode, rescale_boxes

        with open(self.files[i], "rb") as f:
            d = decode(f.read(), self.size)
        box = rescale_boxes(self.boxes[i], d.width, d.height, self.size)
        return {"image": torch.from_numpy(np.ascontiguousarray(d.image.transpose(2, 0, 1))),
                "label": torch.tensor(self.labels[i]), "object_box": torch.from_numpy(box),
                "part_box": torch.full((4,), float("nan"))}


def timed(batches, warmup: int) -> dict[str, float]:
    """Consume ``batches`` (a generator that starts its work when first pulled)."""
    t0, cpu0 = time.perf_counter(), time.process_time()
    stamps, counts, n = [], [], 0
    for b in batches:
        n += b["image"].shape[0]
        stamps.append(time.perf_counter())
        counts.append(n)
    k = min(warmup, len(stamps) - 2)
    return {"images": n, "e2e": n / (stamps[-1] - t0),
            "steady": (counts[-1] - counts[k - 1]) / (stamps[-1] - stamps[k - 1]),
            "first_batch_s": stamps[0] - t0,
            # CPU of the consuming process itself (all its threads), not of its workers.
            "consumer_cpu_ms_per_img": 1e3 * (time.process_time() - cpu0) / n}


def decode_ceiling(blobs: list[bytes], size: int, n: int = 400) -> float:
    from wsdan.data.decode import decode

    out = np.empty((3, size, size), np.uint8)
    t0 = time.perf_counter()
    for data in blobs[:n]:
        out[...] = decode(data, size).image.transpose(2, 0, 1)
    return min(n, len(blobs)) / (time.perf_counter() - t0)


def main(args: argparse.Namespace) -> dict:
    # Before ray is imported: loopback only, explicit auth mode (see tests/conftest.py).
    os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    import ray
    import ray.data

    from wsdan.config import DataConfig
    from wsdan.data.pipeline import build_dataset, iter_torch
    from wsdan.services import S3Server, S3ServerConfig, generate_credentials

    sizes = [int(s) for s in args.sizes.split(",")]
    width, height = (int(v) for v in args.source_size.split("x"))
    t = time.perf_counter()
    blobs, labels, boxes = make_images(args.n_images, width, height)
    print(f"{len(blobs)} JPEGs {width}x{height}, mean {np.mean([len(b) for b in blobs]) / 1e3:.0f}"
          f" KB, made in {time.perf_counter() - t:.0f} s", flush=True)
    runs: list[dict] = []
    result: dict = {"ratio_vs_local_dataloader": {}, "ratio_few_vs_many_shards": {},
                    "ray_data_img_s": {}, "ray_data_few_shards_img_s": {},
                    "dataloader_img_s": {}, "decode_ceiling_img_s": {}}
    many = max(1, -(-args.n_images // args.shard_images))
    with tempfile.TemporaryDirectory(prefix="bench-ingest-") as tmp:
        files = []
        for i, data in enumerate(blobs):
            files.append(str(Path(tmp) / f"{i:07d}.jpg"))
            Path(files[-1]).write_bytes(data)
        key, secret = generate_credentials()
        server = S3Server(S3ServerConfig.with_free_ports(Path(tmp) / "s3", access_key=key,
                                                         secret_key=secret))
        server.start()
        try:
            server.ensure_bucket("bench")
            uris = {n: write_shards(server.client(), "bench", f"ingest-{n}", blobs, labels,
                                    boxes, width, height, n)
                    for n in (many, args.few_shards)}
            os.environ.update(server.aws_env())  # before ray.init: the workers inherit it
            t = time.perf_counter()
            ray.init(num_cpus=args.workers, include_dashboard=False, _temp_dir=f"{tmp}/ray",
                     log_to_driver=False)
            ray_init_s = time.perf_counter() - t
            ray.data.DataContext.get_current().enable_progress_bars = False

            def ray_run(size: int, cfg: DataConfig, rep: int, n_shards: int) -> dict:
                t = time.perf_counter()
                ds = build_dataset(uris[n_shards], "train", cfg=cfg, train=True, seed=rep)
                build_s = time.perf_counter() - t
                rd = {"size": size, "method": f"ray {n_shards} shards", "rep": rep,
                      **timed(iter_torch(ds, args.batch_size), args.warmup_batches)}
                rd["e2e"] = rd["images"] / (rd["images"] / rd["e2e"] + build_s)
                return rd

            for size in sizes:
                cfg = DataConfig(image_size=size, resize_size=round(size * 8 / 7))
                r = cfg.resize_size
                ceiling = decode_ceiling(blobs, r)
                triples = []
                for rep in range(args.repeats):
                    loader = torch.utils.data.DataLoader(
                        JpegFiles(files, labels, boxes, r), batch_size=args.batch_size,
                        num_workers=args.workers, shuffle=True)
                    dl = {"size": size, "method": "dataloader", "rep": rep,
                          **timed(iter(loader), args.warmup_batches)}
                    rd = ray_run(size, cfg, rep, many)
                    few = ray_run(size, cfg, rep, args.few_shards)
                    runs += [dl, rd, few]
                    triples.append((rd, dl, few))
                key_ = str(size)
                # Paired ratios (each pair ran back to back) resist the load of other
                # processes better than a ratio of two bests.
                result["ratio_vs_local_dataloader"][key_] = round(statistics.median(
                    rd["steady"] / dl["steady"] for rd, dl, _ in triples), 3)
                result["ratio_few_vs_many_shards"][key_] = round(statistics.median(
                    few["steady"] / rd["steady"] for rd, _, few in triples), 3)
                for name, i in (("ray_data_img_s", 0), ("dataloader_img_s", 1),
                                ("ray_data_few_shards_img_s", 2)):
                    result[name][key_] = {
                        "steady": round(statistics.median(p[i]["steady"] for p in triples), 1),
                        "steady_best": round(max(p[i]["steady"] for p in triples), 1),
                        "e2e": round(statistics.median(p[i]["e2e"] for p in triples), 1),
                        "e2e_first_run": round(triples[0][i]["e2e"], 1),
                        "consumer_cpu_ms_per_img": round(statistics.median(
                            p[i]["consumer_cpu_ms_per_img"] for p in triples), 3)}
                result["decode_ceiling_img_s"][key_] = {
                    "one_process": round(ceiling, 1),
                    "all_workers_ideal": round(ceiling * args.workers, 1)}
        finally:
            ray.shutdown()
            server.stop(timeout=0)

    print(f"\nRay start {ray_init_s:.1f} s (not in e2e); {args.workers} workers / Ray CPUs on "
          f"{os.cpu_count()} cores; batch {args.batch_size}; {args.n_images} images in "
          f"{many} shards of <= {args.shard_images} or in {args.few_shards}\n")
    print(f"{'size':>5} {'decode':>6} {'method':<15} {'rep':>3} {'steady img/s':>12} "
          f"{'e2e img/s':>9} {'1st batch s':>11} {'consumer CPU ms/img':>19}")
    for run in runs:
        print(f"{run['size']:>5} {round(run['size'] * 8 / 7):>6} {run['method']:<15} "
              f"{run['rep']:>3} {run['steady']:>12.1f} {run['e2e']:>9.1f} "
              f"{run['first_batch_s']:>11.2f} {run['consumer_cpu_ms_per_img']:>19.2f}")
    print()
    for size in sizes:
        k, c = str(size), result["decode_ceiling_img_s"][str(size)]
        print(f"{size:>5}: median steady img/s: Ray {many} shards "
              f"{result['ray_data_img_s'][k]['steady']:.0f} | Ray {args.few_shards} shard(s) "
              f"{result['ray_data_few_shards_img_s'][k]['steady']:.0f} | DataLoader "
              f"{result['dataloader_img_s'][k]['steady']:.0f}")
        print(f"       median paired ratios: Ray / DataLoader "
              f"{result['ratio_vs_local_dataloader'][k]:.2f}, {args.few_shards} / {many} shards "
              f"{result['ratio_few_vs_many_shards'][k]:.2f} (targets >= 0.9); decode ceiling "
              f"{c['one_process']:.0f} img/s in one process, {c['all_workers_ideal']:.0f} ideal "
              f"on {args.workers}")
    result.update({"n_images": args.n_images, "workers": args.workers,
                   "batch_size": args.batch_size, "source_size": args.source_size,
                   "shard_images": args.shard_images, "many_shards": many,
                   "few_shards": args.few_shards, "ray_init_s": round(ray_init_s, 1),
                   "cpu": platform.processor() or platform.machine(),
                   "cores": os.cpu_count(), "ray": ray.__version__})
    print(json.dumps(result))
    return result


if __name__ == "__main__":
    import sys

    from wsdan.cli import run_main

    sys.exit(run_main(main, get_args_parser()))
