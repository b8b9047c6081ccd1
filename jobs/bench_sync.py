"""Benchmark: what the feature-centre synchronisation costs per training step.

Two CPU workers (torch.distributed, gloo, loopback) run WS-DAN steps with the real
Inception-v3 Mixed_6e width (C=768), M=32 and K=200: the centres are 200 × 24,576 floats
(19.7 MB), all-reduced once per step together with the per-class counts. Steps with and
without the collective alternate in blocks, so drift hits both alike; the all-reduce is
also timed alone.

    python -m jobs.bench_sync [--size 299] [--batch 4] [--steps 4]
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import time

import torch
import torch.distributed as dist
import torch.multiprocessing as mp


def _worker(rank: int, world: int, port: int, args: argparse.Namespace, out: dict) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)  # two workers on two cores
    dist.init_process_group("gloo", rank=rank, world_size=world)
    from torch.nn.parallel import DistributedDataParallel as DDP

    from wsdan.config import AugmentConfig, OptimConfig
    from wsdan.model import build_model
    from wsdan.optim import build_optimizer
    from wsdan.raytrain import no_buffer_sync
    from wsdan.train_step import train_step

    torch.manual_seed(0)
    model = build_model(args.backbone, num_classes=args.num_classes,
                        num_attentions=args.num_attentions)
    ddp = DDP(model, **no_buffer_sync())  # as the training job: see wsdan/raytrain.py
    ocfg = OptimConfig(lr=1e-3)
    opt = build_optimizer(model, ocfg, 1e-3)
    gen = torch.Generator().manual_seed(rank)
    x = torch.rand(args.batch, 3, args.size, args.size)
    y = torch.randint(0, args.num_classes, (args.batch,), generator=gen)
    times: dict[str, list[float]] = {"sync": [], "nosync": []}

    def step(sync: bool) -> float:
        dist.barrier()
        t = time.perf_counter()
        train_step(ddp, opt, x, y, generator=gen, augment=AugmentConfig(), optim=ocfg,
                   sync_centers=sync)
        return time.perf_counter() - t

    step(True)  # warm-up
    for _ in range(args.steps):
        times["sync"].append(step(True))
        times["nosync"].append(step(False))
    packed = torch.zeros(model.feature_centers.shape[0], model.feature_centers.shape[1] + 1)
    ar = []
    for _ in range(10):
        dist.barrier()
        t = time.perf_counter()
        dist.all_reduce(packed)
        ar.append(time.perf_counter() - t)
    if rank == 0:
        out.update(sync=times["sync"], nosync=times["nosync"], allreduce=ar,
                   numel=packed.numel())
    dist.destroy_process_group()


def get_args_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description="cost of the feature-centre all-reduce per step")
    p.add_argument("--backbone", default="inception_v3")
    p.add_argument("--size", type=int, default=299)
    p.add_argument("--batch", type=int, default=4, help="per worker")
    p.add_argument("--steps", type=int, default=4, help="steps of each kind")
    p.add_argument("--num-attentions", type=int, default=32)
    p.add_argument("--num-classes", type=int, default=200)
    return p


def main(args: argparse.Namespace) -> dict:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    out = mp.Manager().dict()
    mp.start_processes(_worker, args=(2, port, args, out), nprocs=2, join=True,
                       start_method="spawn")
    sync, nosync = statistics.median(out["sync"]), statistics.median(out["nosync"])
    ar = statistics.median(out["allreduce"])
    overhead = sync / nosync - 1
    print(f"2 workers (gloo, CPU), {args.backbone} at {args.size} px, batch {args.batch}/worker, "
          f"M={args.num_attentions}, K={args.num_classes}; centres {out['numel'] * 4 / 1e6:.1f} MB")
    print(f"{'step with sync':<22}{sync:>9.3f} s   (median of {args.steps})")
    print(f"{'step without sync':<22}{nosync:>9.3f} s")
    print(f"{'all-reduce alone':<22}{ar * 1e3:>9.1f} ms  = {ar / nosync:.2%} of a step")
    print(f"{'sync overhead':<22}{overhead:>9.2%}  (target < 3 %)")
    result = {"sync_overhead": round(overhead, 4), "allreduce_ms": round(ar * 1e3, 2),
              "allreduce_share_of_step": round(ar / nosync, 4), "step_s_sync": sync,
              "step_s_nosync": nosync, "centre_mb": round(out["numel"] * 4 / 1e6, 2)}
    print(json.dumps(result))
    return result


if __name__ == "__main__":
    main(get_args_parser().parse_args())
