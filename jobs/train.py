"""The distributed WS-DAN training job: Ray Train DDP over Ray Data shards, MLflow tracking,
checkpoints under a storage path (local or s3://), registration in the MLflow registry.

    ray job submit --address http://127.0.0.1:8265 --working-dir . -- \
        python -m jobs.train --config jobs/configs/synthetic_cpu.yaml --register-as wsdan-synthetic
    python -m jobs.train --config FILE [key=value ...] [--register-as NAME]

Rerunning with the same --name and --storage-path resumes from the latest checkpoint.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

from wsdan.config import ConfigError, TrainConfig
from wsdan.launcher import JobSpec, check_data, check_resume


def get_args_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--config", required=True, help="YAML config (jobs/configs/*.yaml)")
    p.add_argument("--name", default=None, help="job name (default: config file stem)")
    p.add_argument("--storage-path", default=os.environ.get("WSDAN_STORAGE_PATH", ".wsdan/runs"),
                   help="checkpoints: local folder or s3://bucket/prefix")
    p.add_argument("--num-workers", type=int, default=2)
    p.add_argument("--use-gpu", action="store_true")
    p.add_argument("--max-failures", type=int, default=2)
    p.add_argument("--keep-checkpoints", type=int, default=2)
    p.add_argument("--register-as", default=None, help="registered model name in MLflow")
    p.add_argument("--experiment", default="wsdan")
    p.add_argument("overrides", nargs="*", help="config overrides, key=value")
    return p


def main(args: argparse.Namespace) -> dict:
    # 1. Everything checkable before touching the cluster.
    cfg = TrainConfig.from_yaml(args.config, args.overrides)
    spec = JobSpec(name=args.name or Path(args.config).stem, storage_path=args.storage_path,
                   num_workers=args.num_workers, use_gpu=args.use_gpu,
                   max_failures=args.max_failures, keep_checkpoints=args.keep_checkpoints)
    if cfg.model.sync_batchnorm and not spec.use_gpu:
        raise ConfigError("model.sync_batchnorm: needs --use-gpu (torch's SyncBatchNorm has "
                          "no CPU path)")
    if not cfg.data.source:
        raise ConfigError("data.source: give the prepared data set (local path or s3:// URI)")
    from wsdan.data.pipeline import build_dataset, iter_torch, read_manifest

    manifest = read_manifest(cfg.data.source)
    check_data(cfg, manifest)
    resumed = check_resume(cfg, spec)

    import mlflow
    import ray

    from wsdan.launcher import (
        best_checkpoint,
        build_trainer,
        log_final_figures,
        model_from_checkpoint,
    )
    from wsdan.tracking.runs import log_config, resolve_tracking_uri, setup_experiment

    # 2. One MLflow run per job, created here (never by the workers).
    tracking_uri = resolve_tracking_uri()
    setup_experiment(args.experiment, tracking_uri=tracking_uri)
    ray.init(address=os.environ.get("RAY_ADDRESS"), ignore_reinit_error=True)
    cpus = ray.cluster_resources().get("CPU", 0)
    if cpus < spec.num_workers + 1:
        raise ConfigError(
            f"--num-workers {spec.num_workers}: the Ray cluster has {cpus:g} CPUs; training "
            "workers take one each and Ray Data needs at least one more to read and decode")
    with mlflow.start_run(run_name=spec.name, log_system_metrics=True) as run:
        log_config(cfg)
        mlflow.log_params({"job.num_workers": spec.num_workers, "job.name": spec.name,
                           "job.resumed": resumed is not None})
        mlflow.log_text(cfg.to_yaml(), "config.yaml")
        datasets = {
            "train": build_dataset(cfg.data.source, "train", cfg=cfg.data, train=True,
                                   seed=cfg.seed, shuffle=True),
            "val": build_dataset(cfg.data.source, "val", cfg=cfg.data, train=False,
                                 seed=cfg.seed, shuffle=False),
        }
        class_names = list(manifest["classes"])
        figure_batch = next(iter_torch(datasets["val"], 8))  # fixed: val is not shuffled
        trainer = build_trainer(
            cfg, spec, datasets=datasets, num_train_rows=int(manifest["counts"]["train"]),
            class_names=class_names, figure_batch=figure_batch,
            mlflow_spec={"tracking_uri": tracking_uri, "run_id": run.info.run_id})
        t0 = time.perf_counter()
        result = trainer.fit()
        wall = time.perf_counter() - t0
        if result.error:
            raise result.error
        model, state = model_from_checkpoint(best_checkpoint(result))
        metrics = state["metrics"]
        log_final_figures(model, cfg, datasets["val"], class_names)
        last = result.metrics or {}
        summary = {"run_id": run.info.run_id, "epochs": int(last.get("epoch", state["epoch"])),
                   "best_epoch": int(state["epoch"]), "wall_s": round(wall, 1),
                   **{k: metrics[k] for k in metrics if k.startswith("val_")}}
        if args.register_as:
            summary.update(_register(model, cfg, manifest, metrics, args.register_as))
    print(json.dumps(summary))
    return summary


def _register(model, cfg: TrainConfig, manifest: dict, metrics: dict, name: str) -> dict:
    from wsdan.tracking.pyfunc import log_wsdan_model
    from wsdan.tracking.registry import register_if_better

    info = log_wsdan_model(model, cfg, list(manifest["classes"]), name="model")
    reg = register_if_better(info.model_uri, name, "val_fused_top1", metrics["val_fused_top1"])
    print(f"registered {name} version {reg.version}: "
          + ("now @champion" if reg.became_champion else f"not champion ({reg.reason})"))
    return {"registered_version": int(reg.version), "champion": reg.became_champion}


if __name__ == "__main__":
    try:
        main(get_args_parser().parse_args())
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
