"""Pretrain a plain backbone on the generated glyph task (stand-in for ImageNet).

No ImageNet weights can be downloaded on the machines this project is developed on; WS-DAN
fine-tunes a pretrained backbone and its attention means little on random features. This
job makes the stand-in: a plain classifier (backbone + GAP + linear) learns the
object-centric glyph task of ``wsdan.data.synthetic_pretrain`` (glyph shape × pattern, 30
classes, no birds; see that module for why and what it does not teach), and the
backbone's state dict is written to a local path or ``s3://`` URI, to be loaded with
``model.weights=`` like a user's ImageNet weights.

    python -m jobs.pretrain --config jobs/configs/pretrain_synthetic.yaml \
        --out .wsdan/weights/resnet18_layer3_glyphs.pt
"""

from __future__ import annotations

import argparse
import json
import time

from wsdan import storage
from wsdan.config import TrainConfig
from wsdan.data.synthetic import SyntheticSpec
from wsdan.data.synthetic_pretrain import generate_pretrain_arrays, pretrain_class_names
from wsdan.local import InMemoryData, fit_plain, save_backbone_weights


def get_args_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--config", default="jobs/configs/pretrain_synthetic.yaml",
                   help="training config (YAML) of the stand-in pretraining")
    p.add_argument("--out", default=".wsdan/weights/resnet18_layer3_glyphs.pt",
                   help="local path or s3:// URI of the backbone state dict")
    p.add_argument("--n-train", type=int, default=4000, help="generated training images")
    p.add_argument("--n-val", type=int, default=500, help="generated validation images")
    p.add_argument("--data-seed", type=int, default=1000,
                   help="generator seed (the fine-grained set uses 0)")
    p.add_argument("--force", action="store_true", help="retrain even if --out exists")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    p.add_argument("overrides", nargs="*", help="config overrides, key=value")
    return p


def main(args: argparse.Namespace) -> dict:
    if storage.exists(args.out) and not args.force:
        print(f"pretrained backbone already at {args.out} (use --force to retrain)")
        return {"out": args.out, "reused": True}
    cfg = TrainConfig.from_yaml(args.config, args.overrides)
    n_classes = len(pretrain_class_names())
    if cfg.model.num_classes != n_classes:
        raise SystemExit(f"{args.config}: model.num_classes must be {n_classes}")
    spec = SyntheticSpec(image_size=128, seed=args.data_seed)
    t0 = time.perf_counter()
    train = InMemoryData.from_arrays(generate_pretrain_arrays(spec, range(args.n_train)),
                                     cfg.data.resize_size)
    val = InMemoryData.from_arrays(
        generate_pretrain_arrays(spec, range(args.n_train, args.n_train + args.n_val)),
        cfg.data.resize_size)
    print(f"generated {args.n_train} + {args.n_val} pretraining images "
          f"({time.perf_counter() - t0:.1f}s)")
    t0 = time.perf_counter()

    def line(h: dict) -> None:
        print(f"epoch {h['epoch']}/{cfg.optim.epochs}: train loss {h['loss']:.3f} top1 "
              f"{h['train_top1']:.3f} | val top1 {h['val_top1']:.3f} | "
              f"{h['epoch_time_s']:.0f}s", flush=True)

    model, hist = fit_plain(cfg, train, val, num_classes=n_classes,
                            progress=not args.no_progress, on_epoch=line)
    save_backbone_weights(model, args.out)
    result = {"out": args.out, "val_top1": hist[-1]["val_top1"],
              "chance": 1 / n_classes, "wall_s": round(time.perf_counter() - t0, 1)}
    print(f"saved backbone to {args.out}")
    print(json.dumps(result))
    return result


if __name__ == "__main__":
    import sys

    from wsdan.cli import run_main

    sys.exit(run_main(main, get_args_parser()))
