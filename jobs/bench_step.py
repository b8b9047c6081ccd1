"""Benchmark: one WS-DAN training step on the CPU, against its unavoidable work.

For each backbone (ResNet-18 at 224 px, Inception-v3/Mixed_6e at 299 px, batch 8, M=32,
K=200) it measures, interleaved in one process:
  (a) the WS-DAN step (raw + crop + drop passes, BAP, centre update, one backward, SGD)
      divided by three train steps of the bare backbone (backbone + GAP + linear) on the
      same batch: ``overhead_vs_3x_backbone`` (target ≤ 1.10);
  (b) our batched attention crop/drop against a per-sample loop with ``.item()`` host syncs
      (the way public WS-DAN code does it), same boxes and masks: ``augment_speedup_vs_loop``.

    python -m jobs.bench_step [--backbones resnet18:224,inception_v3:299] [--repeats 5]
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time

import torch
import torch.nn.functional as F

from wsdan.augment import augment_batch
from wsdan.backbones import build_backbone
from wsdan.config import AugmentConfig, OptimConfig
from wsdan.model import WSDAN
from wsdan.optim import build_optimizer
from wsdan.plain import PlainClassifier
from wsdan.train_step import train_step


def loop_augment(images, attentions, gen, crop_theta=(0.4, 0.6), drop_theta=(0.2, 0.5), pad=0.1):
    """Per-sample crop/drop the public-code way: a Python loop, .item() per image."""
    b, _, h, w = images.shape
    crops, drops = [], []
    for i in range(b):
        a = attentions[i].detach()
        wts = torch.sqrt(a.mean(dim=(1, 2)) + 1e-12)
        k_crop, k_drop = torch.multinomial(wts / wts.sum(), 2, replacement=True, generator=gen).tolist()
        tc = crop_theta[0] + (crop_theta[1] - crop_theta[0]) * torch.rand(1, generator=gen).item()
        td = drop_theta[0] + (drop_theta[1] - drop_theta[0]) * torch.rand(1, generator=gen).item()
        up = F.interpolate(a[k_crop][None, None], size=(h, w), mode="bilinear", align_corners=False)[0, 0]
        nz = torch.nonzero(up >= tc * up.max().item())
        if nz.numel() == 0:
            y0, y1, x0, x1 = 0, h, 0, w
        else:
            y0 = max(nz[:, 0].min().item() - int(pad * h), 0)
            y1 = min(nz[:, 0].max().item() + 1 + int(pad * h), h)
            x0 = max(nz[:, 1].min().item() - int(pad * w), 0)
            x1 = min(nz[:, 1].max().item() + 1 + int(pad * w), w)
        crops.append(F.interpolate(images[i : i + 1, :, y0:y1, x0:x1], size=(h, w),
                                   mode="bilinear", align_corners=False))
        up = F.interpolate(a[k_drop][None, None], size=(h, w), mode="bilinear", align_corners=False)[0, 0]
        drops.append(images[i : i + 1] * (up < td * up.max().item()).float())
    return torch.cat(crops), torch.cat(drops)


def _time(fn) -> float:
    t = time.perf_counter()
    fn()
    return time.perf_counter() - t


def bench_backbone(name: str, size: int, *, batch: int, repeats: int, m: int, k: int) -> dict:
    torch.manual_seed(0)
    x = torch.rand(batch, 3, size, size)
    y = torch.randint(0, k, (batch,))
    wsdan = WSDAN(build_backbone(name), num_classes=k, num_attentions=m).train()
    plain = PlainClassifier(build_backbone(name), k).train()
    ocfg = OptimConfig(lr=1e-3)
    opt_w = build_optimizer(wsdan, ocfg, 1e-3)
    opt_p = build_optimizer(plain, ocfg, 1e-3)
    gen = torch.Generator().manual_seed(0)

    def ws_step():
        train_step(wsdan, opt_w, x, y, generator=gen, augment=AugmentConfig(), optim=ocfg)

    def plain_step():
        opt_p.zero_grad(set_to_none=True)
        F.cross_entropy(plain(x), y).backward()
        opt_p.step()

    with torch.no_grad():
        attn = wsdan(x).attention_maps
    ws_step(), plain_step()  # warm-up
    t_ws, t_plain, t_aug, t_loop = [], [], [], []
    for _ in range(repeats):  # interleaved, so drift hits both sides alike
        t_ws.append(_time(ws_step))
        t_plain.append(_time(plain_step))
        for _ in range(5):
            t_aug.append(_time(lambda: augment_batch(x, attn, generator=gen)))
            t_loop.append(_time(lambda: loop_augment(x, attn, gen)))
    ws, pl = statistics.median(t_ws), statistics.median(t_plain)
    aug, loop = statistics.median(t_aug), statistics.median(t_loop)
    return {
        "backbone": name, "size": size, "batch": batch,
        "wsdan_step_s": ws, "backbone_step_s": pl,
        "overhead_vs_3x_backbone": ws / (3 * pl),
        "augment_batched_ms": aug * 1e3, "augment_loop_ms": loop * 1e3,
        "augment_speedup_vs_loop": loop / aug,
    }


def get_args_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description="WS-DAN step overhead and augmentation speed",
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--backbones", default="resnet18:224,inception_v3:299",
                   help="comma-separated name:size pairs")
    p.add_argument("--batch", type=int, default=8, help="images per step")
    p.add_argument("--repeats", type=int, default=5, help="timed rounds (median)")
    p.add_argument("--num-attentions", type=int, default=32, help="M, attention maps")
    p.add_argument("--num-classes", type=int, default=200, help="K, classes")
    p.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    return p


def main(args: argparse.Namespace) -> dict:
    if args.threads:
        torch.set_num_threads(args.threads)
    rows = []
    for item in args.backbones.split(","):
        name, size = item.split(":")
        rows.append(bench_backbone(name, int(size), batch=args.batch, repeats=args.repeats,
                                   m=args.num_attentions, k=args.num_classes))
    print(f"machine: {platform.machine()}, {torch.get_num_threads()} torch threads, "
          f"torch {torch.__version__}; batch {args.batch}, M={args.num_attentions}, "
          f"K={args.num_classes}, median of {args.repeats}")
    print(f"{'backbone':<14}{'px':>5}{'WS-DAN step':>13}{'3x backbone':>13}{'ratio':>8}"
          f"{'aug batched':>13}{'aug loop':>10}{'speed-up':>10}")
    for r in rows:
        print(f"{r['backbone']:<14}{r['size']:>5}{r['wsdan_step_s']:>12.3f}s"
              f"{3 * r['backbone_step_s']:>12.3f}s{r['overhead_vs_3x_backbone']:>8.3f}"
              f"{r['augment_batched_ms']:>11.1f}ms{r['augment_loop_ms']:>8.1f}ms"
              f"{r['augment_speedup_vs_loop']:>9.1f}x")
    result = {
        "overhead_vs_3x_backbone": {r["backbone"]: round(r["overhead_vs_3x_backbone"], 4) for r in rows},
        "augment_speedup_vs_loop": {r["backbone"]: round(r["augment_speedup_vs_loop"], 2) for r in rows},
        "rows": rows,
    }
    print(json.dumps(result))
    return result


if __name__ == "__main__":
    import sys

    from wsdan.cli import run_main

    sys.exit(run_main(main, get_args_parser()))
