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
from pathlib import Path

from wsdan.cluster import add_cluster_args
from wsdan.config import TrainConfig
from wsdan.launcher import JobSpec, preflight


def get_args_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--config", required=True, help="YAML config (jobs/configs/*.yaml)")
    p.add_argument("--name", default=None, help="job name (default: config file stem)")
    p.add_argument("--storage-path", default=os.environ.get("WSDAN_STORAGE_PATH", ".wsdan/runs"),
                   help="checkpoints: local folder or s3://bucket/prefix")
    p.add_argument("--num-workers", type=int, default=2,
                   help="Ray Train workers (DDP ranks); one GPU each with --use-gpu")
    p.add_argument("--use-gpu", action="store_true", help="one GPU per worker (NCCL)")
    p.add_argument("--max-failures", type=int, default=2,
                   help="worker-group failures survived by restarting from the last checkpoint")
    p.add_argument("--keep-checkpoints", type=int, default=2,
                   help="checkpoints kept: the best by val_fused_top1 (Ray Train also keeps "
                        "the latest, which a rerun resumes from)")
    p.add_argument("--register-as", default=None, help="registered model name in MLflow")
    p.add_argument("--experiment", default="wsdan", help="MLflow experiment of the run")
    p.add_argument("--placement", default="PACK",
                   choices=["PACK", "SPREAD", "STRICT_PACK", "STRICT_SPREAD"],
                   help="where Ray puts the training workers: PACK (fewest nodes) or SPREAD "
                        "(one per node where possible)")
    p.add_argument("--summary-json", default=None, metavar="PATH",
                   help="also write the job's summary (run id, metrics, registered version) "
                        "as JSON to PATH (local or s3://); it is logged to the MLflow run as "
                        "summary.json too. Scripts read this, not the log's last line, which "
                        "Ray's forwarded worker logs can follow")
    p.add_argument("--verbose", action="store_true",
                   help="also show Ray's own output here (worker logs, Ray Data progress, "
                        "Ray Train reports); by default it stays in the cluster's log files "
                        "and this output shows the job's progress bar and epoch lines")
    add_cluster_args(p)
    p.add_argument("overrides", nargs="*", help="config overrides, key=value")
    return p


def main(args: argparse.Namespace) -> dict:
    # 1. Everything checkable before touching the cluster.
    cfg = TrainConfig.from_yaml(args.config, args.overrides)
    spec = JobSpec(name=args.name or Path(args.config).stem, storage_path=args.storage_path,
                   num_workers=args.num_workers, use_gpu=args.use_gpu,
                   max_failures=args.max_failures, keep_checkpoints=args.keep_checkpoints,
                   shared_fs=args.shared_filesystem, resource_timeout_s=args.resource_timeout,
                   placement=args.placement, autoscaling=args.autoscaling_cluster)
    manifest, resumed = preflight(cfg, spec)

    import mlflow

    from wsdan.cluster import connect
    from wsdan.launcher import check_cluster, log_final_figures, record_job, run_job
    from wsdan.tracking.card import log_run_provenance
    from wsdan.tracking.runs import log_config, resolve_tracking_uri, setup_experiment

    # 2. The cluster: no node-local paths on several nodes, room for the workers.
    tracking_uri = resolve_tracking_uri()
    experiment_id = setup_experiment(args.experiment, tracking_uri=tracking_uri)
    connect(quiet=not args.verbose)
    if not args.verbose:
        print("[wsdan] Ray's own logs stay in the cluster's log files (the dashboard's Logs "
              "tab); --verbose shows them here", flush=True)
    check_cluster(spec, cfg=cfg, tracking_uri=tracking_uri)

    # 3. One MLflow run per job, created here (never by the workers); a resumed job
    # continues the run it started.
    run_id = _resumable_run(resumed, tracking_uri, experiment_id)
    with mlflow.start_run(run_id=run_id, run_name=None if run_id else spec.name,
                          log_system_metrics=True) as run:
        if run_id is None:
            log_config(cfg)
            mlflow.log_params({"job.num_workers": spec.num_workers, "job.name": spec.name})
            mlflow.log_text(cfg.to_yaml(), "config.yaml")
            log_run_provenance(cfg.data.source, manifest)  # git commit, dataset inputs
            record_job(cfg, spec, run_id=run.info.run_id, tracking_uri=tracking_uri)
        else:
            mlflow.set_tag("wsdan.resumed", "true")
            print(f"[wsdan] resuming job {spec.name!r}: continuing MLflow run {run_id}",
                  flush=True)
        job = run_job(cfg, spec, manifest=manifest, progress=True,
                      mlflow_spec={"tracking_uri": tracking_uri, "run_id": run.info.run_id})
        log_final_figures(job.state, job.class_names)
        summary = {"run_id": run.info.run_id, **job.summary()}
        if args.register_as:
            summary.update(_register(job.model, cfg, manifest, job.metrics, args.register_as,
                                     run_id=run.info.run_id))
        mlflow.log_dict(summary, "summary.json")
    if args.summary_json:
        from wsdan import storage

        storage.write_bytes(args.summary_json, (json.dumps(summary, indent=1) + "\n").encode())
    print(closing_lines(summary, tracking_uri=tracking_uri, experiment_id=experiment_id,
                        registered=args.register_as), flush=True)
    print(json.dumps(summary))
    return summary


def closing_lines(summary: dict, *, tracking_uri: str, experiment_id: str,
                  registered: str | None) -> str:
    """What happened and what to open next: accuracy, time, the MLflow run and model
    version (deep links when the tracking URI is a server), the dashboard, how to serve."""
    from wsdan.cluster import DASHBOARD_URL

    metrics = summary.get("metrics") or {}
    acc = metrics.get("val_fused_top1", summary.get("val_fused_top1"))
    wall = float(summary.get("wall_s") or 0.0)
    lines = [f"[wsdan] done: {summary.get('epochs')} epochs in {wall / 60:.1f} min; "
             + (f"val fused top-1 {acc:.4f}" if isinstance(acc, (int, float)) else
                "no val accuracy")
             + (f" (best epoch {summary['best_epoch']})" if summary.get("best_epoch") else "")]
    web = tracking_uri.rstrip("/") if tracking_uri.startswith(("http://", "https://")) else None
    run_id = summary.get("run_id")
    lines.append(f"  MLflow run:    {web}/#/experiments/{experiment_id}/runs/{run_id}" if web
                 else f"  MLflow run:    {run_id} in {tracking_uri}")
    if registered and summary.get("registered_version"):
        version = summary["registered_version"]
        where = (f"{web}/#/models/{registered}/versions/{version}" if web
                 else f"models:/{registered}/{version}")
        champion = "now @champion" if summary.get("champion") else "not champion"
        lines.append(f"  model:         {where} ({champion})")
        lines.append(f"  serve it:      wsdan serve {registered}"
                     + ("" if summary.get("champion") else f"/{version}"))
    if DASHBOARD_URL:
        lines.append(f"  Ray dashboard: {DASHBOARD_URL}")
    return "\n".join(lines)


def _resumable_run(resumed: dict | None, tracking_uri: str, experiment_id: str) -> str | None:
    """The MLflow run a resumed job started, if it is still there (same tracking server,
    same experiment, not deleted); None: start a new run."""
    if not resumed or not resumed.get("mlflow_run_id"):
        return None
    if resumed.get("tracking_uri") != tracking_uri:
        print(f"[wsdan] the job's earlier MLflow run is on {resumed.get('tracking_uri')!r}, "
              "not this tracking server: starting a new run", flush=True)
        return None
    from mlflow import MlflowClient
    from mlflow.exceptions import MlflowException

    try:
        run = MlflowClient(tracking_uri).get_run(resumed["mlflow_run_id"])
    except MlflowException:
        return None
    if run.info.lifecycle_stage != "active" or run.info.experiment_id != experiment_id:
        return None
    return run.info.run_id


def _register(model, cfg: TrainConfig, manifest: dict, metrics: dict, name: str, *,
              run_id: str) -> dict:
    from wsdan.tracking.card import apply_card, model_card
    from wsdan.tracking.pyfunc import log_wsdan_model
    from wsdan.tracking.registry import register_if_better

    info = log_wsdan_model(model, cfg, list(manifest["classes"]), name="model")
    reg = register_if_better(info.model_uri, name, "val_fused_top1", metrics["val_fused_top1"])
    apply_card(name, reg.version, *model_card(cfg, manifest, metrics, run_id=run_id))
    print(f"registered {name} version {reg.version}: "
          + ("now @champion" if reg.became_champion else f"not champion ({reg.reason})"))
    return {"registered_version": int(reg.version), "champion": reg.became_champion}


if __name__ == "__main__":
    from wsdan.cli import run_main

    sys.exit(run_main(main, get_args_parser()))
