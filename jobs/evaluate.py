"""Evaluate a registered model or a training checkpoint on one split of a prepared data set:
raw, crop and fused top-1/top-5 and, where boxes exist, the refinement-box IoU and the
attention-peak hit rates (object and part).

    python -m jobs.evaluate --model models:/wsdan-synthetic@champion \
        --data s3://wsdan/data/synthetic-k10 --split test [--log-to-mlflow]
    python -m jobs.evaluate --model .wsdan/runs/NAME/checkpoint_.../ --data DIR --split val
"""

from __future__ import annotations

import argparse
import json
import os

from wsdan.config import ConfigError, TrainConfig


def get_args_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--model", required=True,
                   help="models:/NAME@ALIAS, models:/NAME/VERSION, runs:/..., or a checkpoint "
                        "folder (local or s3://) written by the training job")
    p.add_argument("--data", required=True, help="prepared data set (local path or s3:// URI)")
    p.add_argument("--split", default="test", choices=["train", "val", "test"],
                   help="split of the data set to score")
    p.add_argument("--batch-size", type=int, default=64, help="images per forward pass")
    p.add_argument("--ray", action="store_true",
                   help="read and decode the split with Ray Data on the cluster at RAY_ADDRESS "
                        "(or a new local Ray); by default it is read in this process, with "
                        "no Ray at all")
    p.add_argument("--log-to-mlflow", action="store_true",
                   help="log the metrics to a new run of --experiment")
    p.add_argument("--experiment", default="wsdan-eval",
                   help="MLflow experiment for --log-to-mlflow")
    return p


def load_model(uri: str):
    """(WS-DAN torch module in eval mode, TrainConfig-like settings) from a registry URI or
    a checkpoint folder."""
    if uri.startswith(("models:/", "runs:/", "mlflow-artifacts:/")):
        import mlflow

        from wsdan.tracking.runs import resolve_tracking_uri

        mlflow.set_tracking_uri(resolve_tracking_uri())
        py = mlflow.pyfunc.load_model(uri, model_config={"device": "cpu"}).unwrap_python_model()
        cfg = TrainConfig.from_dict({
            "model": {"backbone": py.model.backbone.name, "num_classes": py.model.num_classes,
                      "num_attentions": py.model.num_attentions},
            "data": {"image_size": py.image_size, "resize_size": py.resize_size},
            "inference": {"refine_theta": py.theta, "refine_padding": py.padding},
        })
        return py.model.eval(), cfg
    from ray.train import Checkpoint

    from wsdan import storage
    from wsdan.launcher import model_from_checkpoint

    if storage.is_remote(uri):
        fs, path = storage.filesystem_and_path(uri.rstrip("/"))
        checkpoint = Checkpoint(path, filesystem=fs)
    else:
        checkpoint = Checkpoint.from_directory(os.path.abspath(uri))
    model, state = model_from_checkpoint(checkpoint)
    return model, TrainConfig.from_dict(state["config"])


def main(args: argparse.Namespace) -> dict:
    from wsdan.data.manifest import read_manifest
    from wsdan.engine import evaluate
    from wsdan.launcher import check_data

    manifest = read_manifest(args.data)  # before the model: a wrong split fails at once
    have = {k: n for k, n in (manifest.get("counts") or {}).items() if n}
    if args.split not in have:
        raise ConfigError(f"--split {args.split}: {args.data} has no {args.split!r} images; "
                          f"its splits: {', '.join(f'{k} ({n})' for k, n in have.items()) or 'none'}")
    model, cfg = load_model(args.model)
    cfg = TrainConfig.from_dict({**cfg.to_dict(), "data": {**cfg.to_dict()["data"],
                                                            "source": args.data}})
    check_data(cfg, {**manifest, "counts": {"train": 1, "val": 1}})  # class count only
    if args.ray:
        from wsdan.cluster import connect
        from wsdan.data.pipeline import build_dataset, iter_torch, skipped_images

        connect(quiet=True)
        ds = build_dataset(args.data, args.split, cfg=cfg.data, train=False, shuffle=False)
        metrics = evaluate(model, iter_torch(ds, args.batch_size), cfg=cfg)
        skipped = skipped_images(args.data, args.split)
    else:
        from wsdan.data.reader import SplitReader

        reader = SplitReader(args.data, args.split, resize_size=cfg.data.resize_size,
                             batch_size=args.batch_size)
        metrics = evaluate(model, reader, cfg=cfg)
        skipped = len(reader.skipped)
    if skipped:
        print(f"[wsdan] {skipped} image(s) of {args.split} did not decode and were left out")
    metrics["skipped"] = skipped
    print(f"{args.split} ({int(metrics['n'])} images): fused {metrics['fused_top1']:.4f}  "
          f"raw {metrics['raw_top1']:.4f}  crop {metrics['crop_top1']:.4f}  "
          f"(top-5 fused {metrics['fused_top5']:.4f})")
    if "box_iou" in metrics:
        print(f"localisation: refinement-box IoU {metrics['box_iou']:.3f}, attention peak in "
              f"object {metrics['attention_hit_rate']:.3f}"
              + (f", in part {metrics['part_hit_rate']:.3f}" if "part_hit_rate" in metrics
                 else ""))
    if args.log_to_mlflow:
        import mlflow

        from wsdan.tracking.runs import setup_experiment

        setup_experiment(args.experiment)
        with mlflow.start_run(run_name=f"eval-{args.split}"):
            mlflow.log_params({"model": args.model, "data": args.data, "split": args.split})
            mlflow.log_metrics({f"{args.split}_{k}": v for k, v in metrics.items()})
    print(json.dumps(metrics))
    return metrics


if __name__ == "__main__":
    import sys

    from wsdan.cli import run_main

    sys.exit(run_main(main, get_args_parser()))
