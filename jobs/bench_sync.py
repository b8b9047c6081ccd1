"""Benchmark: what the feature-centre synchronisation costs per training step.

Two CPU workers (torch.distributed, gloo, loopback) run WS-DAN steps with the real
Inception-v3 Mixed_6e width (C=768), M=32 and K=200: the centres are 200 × 24,576 floats
(19.7 MB), all-reduced once per step together with the per-class counts. Steps with and
without the collective alternate in blocks, so drift hits both alike; the all-reduce is
also timed alone.

    python -m jobs.bench_sync [--size 299] [--batch 4] [--steps 4]

With ``--ray-workers N`` the workers are Ray Train workers on the connected cluster, one
per node where possible (SPREAD), so the all-reduce crosses nodes:

    ray job submit --address http://HEAD:8265 --working-dir . -- \
        python -m jobs.bench_sync --ray-workers 4 [--use-gpu]
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
    result = _measure(rank, args, torch.device("cpu"))
    if rank == 0:
        out.update(result)
    dist.destroy_process_group()


def _ray_worker(config: dict) -> None:
    import ray
    import ray.train
    import ray.train.torch

    ctx = ray.train.get_context()
    device = ray.train.torch.get_device()
    inbox = config.pop("inbox")
    result = _measure(ctx.get_world_rank(), argparse.Namespace(**config), device)
    nodes: list = [None] * ctx.get_world_size()
    dist.all_gather_object(nodes, ray.get_runtime_context().get_node_id())
    if ctx.get_world_rank() == 0:
        # Straight to the driver: a report without a checkpoint keeps no metrics in the
        # Result, and a checkpoint would need storage that every node shares.
        ray.get(inbox.put.remote({**result, "nodes": nodes}))


def _inbox():
    import ray

    @ray.remote(num_cpus=0)
    class Inbox:
        def __init__(self) -> None:
            self.value = None

        def put(self, value: dict) -> None:
            self.value = value

        def get(self) -> dict | None:
            return self.value

    return Inbox.remote()


def _measure(rank: int, args: argparse.Namespace, device: torch.device) -> dict:
    """Steps with and without the centre all-reduce, and the all-reduce alone (the process
    group is up); the timings of rank 0."""
    from torch.nn.parallel import DistributedDataParallel as DDP

    from wsdan.config import AugmentConfig, OptimConfig
    from wsdan.model import build_model
    from wsdan.optim import build_optimizer
    from wsdan.raytrain import no_buffer_sync
    from wsdan.train_step import train_step

    torch.manual_seed(0)
    model = build_model(args.backbone, num_classes=args.num_classes,
                        num_attentions=args.num_attentions).to(device)
    ddp = DDP(model, **no_buffer_sync())  # as the training job: see wsdan/raytrain.py
    ocfg = OptimConfig(lr=1e-3)
    opt = build_optimizer(model, ocfg, 1e-3)
    gen = torch.Generator(device=device).manual_seed(rank)
    x = torch.rand(args.batch, 3, args.size, args.size, device=device)
    y = torch.randint(0, args.num_classes, (args.batch,), generator=gen, device=device)
    times: dict[str, list[float]] = {"sync": [], "nosync": []}

    def sync_device() -> None:
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    def step(sync: bool) -> float:
        dist.barrier()
        t = time.perf_counter()
        train_step(ddp, opt, x, y, generator=gen, augment=AugmentConfig(), optim=ocfg,
                   sync_centers=sync)
        sync_device()
        return time.perf_counter() - t

    step(True)  # warm-up
    for _ in range(args.steps):
        times["sync"].append(step(True))
        times["nosync"].append(step(False))
    packed = torch.zeros(model.feature_centers.shape[0], model.feature_centers.shape[1] + 1,
                         device=device)
    ar = []
    for _ in range(10):
        dist.barrier()
        t = time.perf_counter()
        dist.all_reduce(packed)
        sync_device()
        ar.append(time.perf_counter() - t)
    return {"sync": times["sync"], "nosync": times["nosync"], "allreduce": ar,
            "numel": packed.numel()}


def get_args_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description="cost of the feature-centre all-reduce per step",
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--backbone", default="inception_v3", help="registered backbone")
    p.add_argument("--size", type=int, default=299, help="input side in pixels")
    p.add_argument("--batch", type=int, default=4, help="per worker")
    p.add_argument("--steps", type=int, default=4, help="steps of each kind")
    p.add_argument("--num-attentions", type=int, default=32, help="M, attention maps")
    p.add_argument("--num-classes", type=int, default=200, help="K, classes")
    p.add_argument("--ray-workers", type=int, default=0,
                   help="run as N Ray Train workers on the connected cluster, spread over "
                        "its nodes (0: two local processes)")
    p.add_argument("--use-gpu", action="store_true", help="with --ray-workers: one GPU each")
    return p


def _run_on_ray(args: argparse.Namespace) -> dict:
    import ray
    from ray.train import RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    from wsdan.cluster import connect
    from wsdan.launcher import fit

    connect()
    inbox = _inbox()
    config = {**vars(args), "inbox": inbox}
    trainer = TorchTrainer(
        _ray_worker, train_loop_config=config,
        scaling_config=ScalingConfig(num_workers=args.ray_workers, use_gpu=args.use_gpu,
                                     placement_strategy="SPREAD"),
        run_config=RunConfig(name=f"bench-sync-{int(time.time())}",
                             storage_path=os.path.abspath(".wsdan/bench")))
    result = fit(trainer)
    if result.error:
        raise result.error
    out = ray.get(inbox.get.remote())
    if out is None:
        raise RuntimeError("the Ray Train workers finished without sending their timings")
    return out


def main(args: argparse.Namespace) -> dict:
    if args.ray_workers:
        out = _run_on_ray(args)
        where = (f"{args.ray_workers} Ray Train workers on {len(set(out['nodes']))} node(s) "
                 f"({'NCCL, GPU' if args.use_gpu else 'gloo, CPU'})")
    else:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        out = mp.Manager().dict()
        mp.start_processes(_worker, args=(2, port, args, out), nprocs=2, join=True,
                           start_method="spawn")
        out = dict(out)
        where = "2 workers (gloo, CPU)"
    sync, nosync = statistics.median(out["sync"]), statistics.median(out["nosync"])
    ar = statistics.median(out["allreduce"])
    overhead = sync / nosync - 1
    print(f"{where}, {args.backbone} at {args.size} px, batch {args.batch}/worker, "
          f"M={args.num_attentions}, K={args.num_classes}; centres {out['numel'] * 4 / 1e6:.1f} MB")
    print(f"{'step with sync':<22}{sync:>9.3f} s   (median of {args.steps})")
    print(f"{'step without sync':<22}{nosync:>9.3f} s")
    print(f"{'all-reduce alone':<22}{ar * 1e3:>9.1f} ms  = {ar / nosync:.2%} of a step")
    print(f"{'sync overhead':<22}{overhead:>9.2%}  (target < 3 %)")
    result = {"sync_overhead": round(overhead, 4), "allreduce_ms": round(ar * 1e3, 2),
              "allreduce_share_of_step": round(ar / nosync, 4), "step_s_sync": sync,
              "step_s_nosync": nosync, "centre_mb": round(out["numel"] * 4 / 1e6, 2),
              "workers": args.ray_workers or 2, "nodes": len(set(out.get("nodes", [0])))}
    print(json.dumps(result))
    return result


if __name__ == "__main__":
    import sys

    from wsdan.cli import run_main

    sys.exit(run_main(main, get_args_parser()))
