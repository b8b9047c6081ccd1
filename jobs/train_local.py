"""Train WS-DAN in one process on the generated data set (no Ray, no services).

The distributed job on Ray is ``jobs.train``; this is the one-machine path used by the
demo until then and by the learning benchmark. It writes the generated data set once under
``data.source``, fine-tunes from ``model.weights`` and saves a checkpoint.

    python -m jobs.train_local --config jobs/configs/synthetic_cpu.yaml [key=value ...]
"""

from __future__ import annotations

import argparse
import io
import json
import time

import torch

from wsdan import storage
from wsdan.config import TrainConfig
from wsdan.data.synthetic import SyntheticSpec
from wsdan.engine import evaluate
from wsdan.local import fit_wsdan, load_synthetic


def get_args_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--config", default="jobs/configs/synthetic_cpu.yaml",
                   help="training config (YAML)")
    p.add_argument("--n-train", type=int, default=2000, help="generated training images")
    p.add_argument("--n-val", type=int, default=400, help="generated validation images")
    p.add_argument("--n-test", type=int, default=400, help="generated test images")
    p.add_argument("--checkpoint", default=".wsdan/checkpoints/synthetic_cpu.pt",
                   help="where to save the final model (local path or s3:// URI)")
    p.add_argument("overrides", nargs="*", help="config overrides, key=value")
    return p


def main(args: argparse.Namespace) -> dict:
    cfg = TrainConfig.from_yaml(args.config, args.overrides)
    if cfg.model.weights and not storage.exists(cfg.model.weights):
        raise SystemExit(f"model.weights: {cfg.model.weights} not found; make it with "
                         "`python -m jobs.pretrain` or set model.weights=null")
    spec = SyntheticSpec(num_classes=cfg.model.num_classes, image_size=128, seed=0)
    data = load_synthetic(cfg.data.source, spec=spec, resize_size=cfg.data.resize_size,
                          counts={"train": args.n_train, "val": args.n_val, "test": args.n_test})
    t0 = time.perf_counter()
    model, hist = fit_wsdan(cfg, data["train"], data["val"], log_fn=print)
    test = evaluate(model, data["test"].batches(64), cfg=cfg)
    wall = time.perf_counter() - t0
    buf = io.BytesIO()
    torch.save({"model": model.state_dict(), "config": cfg.to_dict(),
                "epoch": cfg.optim.epochs}, buf)
    storage.write_bytes(args.checkpoint, buf.getvalue())
    result = {
        "test_fused_top1": test["fused_top1"], "test_raw_top1": test["raw_top1"],
        "test_crop_top1": test["crop_top1"],
        "attention_hit_rate": test.get("attention_hit_rate"),
        "part_hit_rate": test.get("part_hit_rate"), "box_iou": test.get("box_iou"),
        "chance": 1 / cfg.model.num_classes, "wall_s": round(wall, 1),
        "checkpoint": args.checkpoint,
    }
    print(f"test: fused {test['fused_top1']:.3f} raw {test['raw_top1']:.3f} "
          f"crop {test['crop_top1']:.3f} (chance {1 / cfg.model.num_classes:.3f}); "
          f"attention peak in object {test.get('attention_hit_rate', float('nan')):.2f}, "
          f"in part {test.get('part_hit_rate', float('nan')):.2f}; {wall:.0f}s")
    print(json.dumps(result))
    return result


if __name__ == "__main__":
    import sys

    from wsdan.cli import run_main

    sys.exit(run_main(main, get_args_parser()))
