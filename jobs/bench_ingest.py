"""Benchmark: images/s that the Ray Data pipeline delivers from S3, against a local DataLoader.

In one run, for each training size (448 px → decode to 512, 224 → 256):
  (a) Ray Data: Parquet shards in a SeaweedFS S3 server (started here, loopback, free
      ports) → ``wsdan.data.pipeline.build_dataset`` → ``iter_torch`` in this process;
  (b) ``torch.utils.data.DataLoader`` with the same number of worker processes and the
      same decode + resize (``wsdan.data.decode``), reading the same JPEGs from local disk;
  (c) the decode-only ceiling: decode + resize in one process, bytes already in memory.
The consumer only receives batches (uint8 B×3×R×R, labels, boxes). Steady state counts
from the end of batch ``--warmup-batches`` to the last batch; end to end counts from the
start (dataset build and worker start-up included; the Ray cluster's own start is shown
apart). Runs alternate (a)/(b) ``--repeats`` times; the ratio is the median of the paired
(back-to-back) ratios, which resists the load of other processes on shared cores better
than a ratio of bests. The target is ≥ 0.9 of the DataLoader in steady state.

Images: generated birds, upscaled to 500×375 (CUB's typical size) with per-image noise
so that JPEG sizes (~60-90 KB at quality 90) and decode costs are photo-like.

    python -m jobs.bench_ingest [--n-images 2000] [--sizes 448,224] [--workers 2]

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
import torch
from PIL import Image


def get_args_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--n-images", type=int, default=2000)
    p.add_argument("--sizes", default="448,224", help="training sizes; decode to 8/7 of each")
    p.add_argument("--workers", type=int, default=os.cpu_count() or 2,
                   help="DataLoader workers = Ray CPUs (default: the machine's cores)")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--shard-images", type=int, default=256, help="images per Parquet shard")
    p.add_argument("--warmup-batches", type=int, default=10)
    p.add_argument("--repeats", type=int, default=2)
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
                 per_shard: int) -> str:
    """The ``wsdan data prepare`` layout: train/part-NNNNN.parquet + dataset.json."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    rels = []
    for k, start in enumerate(range(0, len(blobs), per_shard)):
        sl = slice(start, start + per_shard)
        n = len(blobs[sl])
        table = pa.table({
            "image": pa.array(blobs[sl], pa.binary()), "label": pa.array(labels[sl]),
            "label_name": pa.array([f"c{x}" for x in labels[sl]]),
            "split": pa.array(["train"] * n), "image_id": pa.array(
                [f"{i:07d}" for i in range(start, start + n)]),
            "bbox": pa.array(list(boxes[sl]), pa.list_(pa.float32())),
            "part_bbox": pa.nulls(n, pa.list_(pa.float32())),
            "width": pa.array([width] * n, pa.int32()), "height": pa.array([height] * n, pa.int32()),
        })
        buf = io.BytesIO()
        pq.write_table(table, buf, row_group_size=64)
        rel = f"train/part-{k:05d}.parquet"
        client.put_object(Bucket=bucket, Key=f"{prefix}/{rel}", Body=buf.getvalue())
        rels.append(rel)
    manifest = {"format_version": 1, "classes": [f"c{i}" for i in range(20)], "num_classes": 20,
                "counts": {"train": len(blobs)}, "shards": {"train": rels}, "skipped": []}
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
    # Before ray is imported: loopback only, explicit auth mode (environment.md).
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
    result: dict = {"ratio_vs_local_dataloader": {}, "ray_data_img_s": {},
                    "dataloader_img_s": {}, "decode_ceiling_img_s": {}}
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
            uri = write_shards(server.client(), "bench", "ingest", blobs, labels, boxes, width,
                               height, args.shard_images)
            os.environ.update(server.aws_env())  # before ray.init: the workers inherit it
            t = time.perf_counter()
            ray.init(num_cpus=args.workers, include_dashboard=False, _temp_dir=f"{tmp}/ray",
                     log_to_driver=False)
            ray_init_s = time.perf_counter() - t
            ray.data.DataContext.get_current().enable_progress_bars = False
            for size in sizes:
                cfg = DataConfig(image_size=size, resize_size=round(size * 8 / 7))
                r = cfg.resize_size
                ceiling = decode_ceiling(blobs, r)
                pairs = []
                for rep in range(args.repeats):
                    loader = torch.utils.data.DataLoader(
                        JpegFiles(files, labels, boxes, r), batch_size=args.batch_size,
                        num_workers=args.workers, shuffle=True)
                    dl = {"size": size, "method": "dataloader", "rep": rep,
                          **timed(iter(loader), args.warmup_batches)}
                    t = time.perf_counter()
                    ds = build_dataset(uri, "train", cfg=cfg, train=True, seed=rep)
                    build_s = time.perf_counter() - t
                    rd = {"size": size, "method": "ray", "rep": rep,
                          **timed(iter_torch(ds, args.batch_size), args.warmup_batches)}
                    rd["e2e"] = rd["images"] / (rd["images"] / rd["e2e"] + build_s)
                    runs += [dl, rd]
                    pairs.append((rd, dl))
                key_ = str(size)
                # Paired ratios (each pair ran back to back) resist the load of other
                # processes better than a ratio of two bests.
                result["ratio_vs_local_dataloader"][key_] = round(statistics.median(
                    rd["steady"] / dl["steady"] for rd, dl in pairs), 3)
                for name, i in (("ray_data_img_s", 0), ("dataloader_img_s", 1)):
                    result[name][key_] = {
                        "steady": round(statistics.median(p[i]["steady"] for p in pairs), 1),
                        "steady_best": round(max(p[i]["steady"] for p in pairs), 1),
                        "e2e": round(statistics.median(p[i]["e2e"] for p in pairs), 1),
                        "e2e_first_run": round(pairs[0][i]["e2e"], 1),
                        "consumer_cpu_ms_per_img": round(statistics.median(
                            p[i]["consumer_cpu_ms_per_img"] for p in pairs), 3)}
                result["decode_ceiling_img_s"][key_] = {
                    "one_process": round(ceiling, 1),
                    "all_workers_ideal": round(ceiling * args.workers, 1)}
        finally:
            ray.shutdown()
            server.stop(timeout=0)

    print(f"\nRay start {ray_init_s:.1f} s (not in e2e); {args.workers} workers / Ray CPUs on "
          f"{os.cpu_count()} cores; batch {args.batch_size}; {args.n_images} images\n")
    print(f"{'size':>5} {'decode':>6} {'method':<10} {'rep':>3} {'steady img/s':>12} "
          f"{'e2e img/s':>9} {'1st batch s':>11} {'consumer CPU ms/img':>19}")
    for run in runs:
        print(f"{run['size']:>5} {round(run['size'] * 8 / 7):>6} {run['method']:<10} "
              f"{run['rep']:>3} {run['steady']:>12.1f} {run['e2e']:>9.1f} "
              f"{run['first_batch_s']:>11.2f} {run['consumer_cpu_ms_per_img']:>19.2f}")
    print()
    for size in sizes:
        k, c = str(size), result["decode_ceiling_img_s"][str(size)]
        print(f"{size:>5}: median steady img/s Ray {result['ray_data_img_s'][k]['steady']:.0f}, "
              f"DataLoader {result['dataloader_img_s'][k]['steady']:.0f}; median paired ratio "
              f"{result['ratio_vs_local_dataloader'][k]:.2f} (target >= 0.9); decode ceiling "
              f"{c['one_process']:.0f} img/s in one process, {c['all_workers_ideal']:.0f} ideal "
              f"on {args.workers}")
    result.update({"n_images": args.n_images, "workers": args.workers,
                   "batch_size": args.batch_size, "source_size": args.source_size,
                   "shard_images": args.shard_images, "ray_init_s": round(ray_init_s, 1),
                   "cpu": platform.processor() or platform.machine(),
                   "cores": os.cpu_count(), "ray": ray.__version__})
    print(json.dumps(result))
    return result


if __name__ == "__main__":
    main(get_args_parser().parse_args())
