"""Benchmark: the WS-DAN step on one GPU, in each precision and memory format.

The paper's setting (Inception-v3 cut at Mixed_6e, 448 px, M=32, K=200) at batch 12 (the
recipe's per-GPU batch) and 32, side by side in one process:

  images/s of the WS-DAN training step in fp32 / bf16 / bf16+channels_last /
  bf16+channels_last+compile, with peak GPU memory;
  the WS-DAN step divided by three bare-backbone train steps in the same mode
  (``overhead_vs_3x_backbone``, target ≤ 1.10, as on the CPU);
  the batched attention crop/drop against the public codes' per-sample loop with
  ``.item()`` host syncs (``augment_speedup_vs_loop``);
  the sync-debug check: one step and one prediction under
  ``torch.cuda.set_sync_debug_mode("error")`` (``sync_free``).

Sized to finish within 8 minutes on one GPU: compiled rows are skipped (and said so) once
``--budget-s`` is spent.

    python -m jobs.bench_gpu [--batches 12,32] [--modes fp32,bf16,bf16_cl,bf16_cl_compile]

On a CPU (no GPU) it runs the same code at whatever size you give, for a smoke test:

    python -m jobs.bench_gpu --device cpu --backbone resnet18_layer3 --size 64 \\
        --batches 4 --modes fp32,bf16 --steps 2
"""

from __future__ import annotations

import argparse
import copy
import json
import platform
import statistics
import time
from collections.abc import Callable

import torch
import torch.nn.functional as F

from jobs.bench_step import loop_augment
from wsdan.accel import Accel
from wsdan.augment import augment_batch
from wsdan.backbones import build_backbone
from wsdan.config import AugmentConfig, OptimConfig
from wsdan.inference import predict
from wsdan.model import WSDAN
from wsdan.optim import build_optimizer
from wsdan.plain import PlainClassifier
from wsdan.train_step import train_step

MODES = {
    "fp32": {"precision": "fp32"},
    "bf16": {"precision": "bf16"},
    "bf16_cl": {"precision": "bf16", "channels_last": True},
    "bf16_cl_compile": {"precision": "bf16", "channels_last": True, "compile": True},
}


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _median_time(fn: Callable[[], object], device: torch.device, steps: int) -> float:
    times = []
    for _ in range(steps):
        _sync(device)
        t = time.perf_counter()
        fn()
        _sync(device)
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def _accel(device: torch.device, mode: str) -> Accel:
    spec = MODES[mode]
    return Accel(device=device, precision=spec["precision"],
                 channels_last=spec.get("channels_last", False),
                 compile=spec.get("compile", False))


def _peak_reset(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)


def _peak_gib(device: torch.device) -> float | None:
    if device.type != "cuda":
        return None
    return torch.cuda.max_memory_allocated(device) / 2**30


def bench_mode(args: argparse.Namespace, device: torch.device, batch: int, mode: str,
               base: WSDAN, plain_base: PlainClassifier) -> dict:
    """images/s of the WS-DAN step and of the bare backbone in one mode and batch size."""
    g = torch.Generator(device=device).manual_seed(0)
    x = torch.rand(batch, 3, args.size, args.size, generator=g, device=device)
    y = torch.randint(0, args.num_classes, (batch,), generator=g, device=device)
    ocfg = OptimConfig(lr=1e-3)
    accel = _accel(device, mode)
    model = accel.prepare(copy.deepcopy(base).to(device))
    opt = build_optimizer(model, ocfg, 1e-3)
    plain_accel = _accel(device, mode)
    plain = plain_accel.prepare(copy.deepcopy(plain_base).to(device))
    opt_p = build_optimizer(plain, ocfg, 1e-3)

    def ws_step() -> None:
        train_step(model, opt, x, y, generator=g, augment=AugmentConfig(), optim=ocfg,
                   accel=accel)

    def plain_step() -> None:
        opt_p.zero_grad(set_to_none=True)
        with plain_accel.autocast():
            loss = F.cross_entropy(plain(plain_accel.inputs(x)), y)
        loss.backward()
        opt_p.step()

    _peak_reset(device)
    t0 = time.perf_counter()
    for _ in range(args.warmup):  # compilation, cuDNN autotuning, allocator warm-up
        ws_step()
    _sync(device)
    warm_s = time.perf_counter() - t0
    ws = _median_time(ws_step, device, args.steps)
    peak = _peak_gib(device)
    for _ in range(args.warmup):
        plain_step()
    pl = _median_time(plain_step, device, args.steps)
    return {"batch": batch, "mode": mode, "wsdan_step_s": ws, "images_per_s": batch / ws,
            "backbone_step_s": pl, "overhead_vs_3x_backbone": ws / (3 * pl),
            "peak_gib": peak, "warmup_s": warm_s}


def bench_augment(args: argparse.Namespace, device: torch.device, batch: int,
                  base: WSDAN) -> dict:
    """Batched crop/drop against the per-sample `.item()` loop, same maps and images."""
    g = torch.Generator(device=device).manual_seed(1)
    x = torch.rand(batch, 3, args.size, args.size, generator=g, device=device)
    model = copy.deepcopy(base).to(device).eval()
    with torch.no_grad():
        attn = model(x).attention_maps
    fill = model.input_mean
    batched = _median_time(lambda: augment_batch(x, attn, generator=g, fill=fill), device,
                           max(args.steps, 5))
    loop = _median_time(lambda: loop_augment(x, attn, g), device, max(args.steps, 5))
    return {"batch": batch, "augment_batched_ms": batched * 1e3,
            "augment_loop_ms": loop * 1e3, "augment_speedup_vs_loop": loop / batched}


def sync_check(args: argparse.Namespace, device: torch.device, base: WSDAN) -> dict:
    """One train step and one prediction (bf16, channels_last) with host syncs made errors."""
    if device.type != "cuda":
        return {"sync_free": None, "sync_check": "skipped: not a CUDA device"}
    accel = _accel(device, "bf16_cl")
    model = accel.prepare(copy.deepcopy(base).to(device))
    ocfg = OptimConfig(lr=1e-3, grad_clip_norm=10.0)
    opt = build_optimizer(model, ocfg, 1e-3)
    g = torch.Generator(device=device).manual_seed(2)
    x = torch.rand(4, 3, args.size, args.size, generator=g, device=device)
    y = torch.randint(0, args.num_classes, (4,), generator=g, device=device)

    def step() -> None:
        train_step(model, opt, x, y, generator=g, augment=AugmentConfig(), optim=ocfg,
                   accel=accel)

    step()  # lazy initialisation may sync once
    torch.cuda.synchronize(device)
    torch.cuda.set_sync_debug_mode("error")
    try:
        step()
        model.eval()
        with accel.autocast():
            predict(model, accel.inputs(x))
        torch.cuda.set_sync_debug_mode("default")
        return {"sync_free": True, "sync_check": "train_step and predict: no host sync"}
    except RuntimeError as e:
        torch.cuda.set_sync_debug_mode("default")
        return {"sync_free": False, "sync_check": str(e).splitlines()[0][:200]}


def get_args_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description="WS-DAN step speed on one GPU, per precision",
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu",
                   help="torch device")
    p.add_argument("--backbone", default="inception_v3", help="registered backbone")
    p.add_argument("--size", type=int, default=448, help="input side in pixels")
    p.add_argument("--batches", default="12,32", help="comma-separated batch sizes")
    p.add_argument("--modes", default=",".join(MODES), help=f"of {', '.join(MODES)}")
    p.add_argument("--num-attentions", type=int, default=32, help="M, attention maps")
    p.add_argument("--num-classes", type=int, default=200, help="K, classes")
    p.add_argument("--warmup", type=int, default=3, help="steps before timing")
    p.add_argument("--steps", type=int, default=10, help="timed steps (median)")
    p.add_argument("--budget-s", type=float, default=420.0,
                   help="compiled rows are skipped once this much time is spent")
    return p


def main(args: argparse.Namespace) -> dict:
    device = torch.device(args.device)
    t_start = time.perf_counter()
    torch.manual_seed(0)
    base = WSDAN(build_backbone(args.backbone), num_classes=args.num_classes,
                 num_attentions=args.num_attentions).train()
    plain_base = PlainClassifier(build_backbone(args.backbone), args.num_classes).train()
    batches = [int(b) for b in args.batches.split(",")]
    modes = args.modes.split(",")
    unknown = [m for m in modes if m not in MODES]
    if unknown:
        raise SystemExit(f"--modes: unknown {', '.join(unknown)} (known: {', '.join(MODES)})")
    rows, skipped, augs = [], [], []
    for batch in batches:
        for mode in modes:
            if MODES[mode].get("compile") and time.perf_counter() - t_start > args.budget_s:
                skipped.append(f"{mode}@{batch}")
                continue
            rows.append(bench_mode(args, device, batch, mode, base, plain_base))
        augs.append(bench_augment(args, device, batch, base))
    check = sync_check(args, device, base)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor()
    print(f"device: {name or device.type}; torch {torch.__version__}; {args.backbone} at "
          f"{args.size} px, M={args.num_attentions}, K={args.num_classes}; median of "
          f"{args.steps} steps after {args.warmup} warm-up")
    print(f"{'batch':>5} {'mode':<17}{'img/s':>9}{'step':>10}{'3x backbone':>13}{'ratio':>8}"
          f"{'peak GiB':>10}{'warm-up':>9}")
    for r in rows:
        peak = f"{r['peak_gib']:.2f}" if r["peak_gib"] is not None else "-"
        print(f"{r['batch']:>5} {r['mode']:<17}{r['images_per_s']:>9.1f}"
              f"{r['wsdan_step_s'] * 1e3:>8.1f}ms{3 * r['backbone_step_s'] * 1e3:>11.1f}ms"
              f"{r['overhead_vs_3x_backbone']:>8.3f}{peak:>10}{r['warmup_s']:>8.1f}s")
    for a in augs:
        print(f"crop/drop, batch {a['batch']}: batched {a['augment_batched_ms']:.2f} ms, "
              f"per-sample loop {a['augment_loop_ms']:.2f} ms: "
              f"{a['augment_speedup_vs_loop']:.1f}x")
    if skipped:
        print(f"skipped (time budget {args.budget_s:.0f} s spent): {', '.join(skipped)}")
    print(f"sync check: {check['sync_check']}")
    total = time.perf_counter() - t_start
    print(f"total {total:.0f} s")
    fp32 = {r["batch"]: r["images_per_s"] for r in rows if r["mode"] == "fp32"}
    result = {
        "device": name or device.type,
        "images_per_s": {f"{r['mode']}@{r['batch']}": round(r["images_per_s"], 1) for r in rows},
        "speedup_vs_fp32": {f"{r['mode']}@{r['batch']}": round(r["images_per_s"] / fp32[r["batch"]], 3)
                            for r in rows if r["batch"] in fp32},
        "overhead_vs_3x_backbone": {f"{r['mode']}@{r['batch']}": round(r["overhead_vs_3x_backbone"], 4)
                                    for r in rows},
        "peak_gib": {f"{r['mode']}@{r['batch']}": (round(r["peak_gib"], 2)
                                                   if r["peak_gib"] is not None else None)
                     for r in rows},
        "augment_speedup_vs_loop": {str(a["batch"]): round(a["augment_speedup_vs_loop"], 2)
                                    for a in augs},
        "skipped": skipped, **check, "total_s": round(total, 1),
    }
    print(json.dumps(result))
    return result


if __name__ == "__main__":
    import sys

    from wsdan.cli import run_main

    sys.exit(run_main(main, get_args_parser()))
