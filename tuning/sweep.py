"""Ray Tune sweep over WS-DAN's M, β, crop/drop thresholds and learning rate.

Each trial is one distributed training job (the job code of ``jobs/train.py``); ASHA stops
weak trials early on ``val_fused_top1`` per epoch; Optuna's TPE (seeded) proposes the next
parameters. One MLflow parent run per sweep holds the sweep config, a results table and
figures, and the best model, registered with the champion rule; one child run per trial.

    python -m tuning.sweep --config tuning/configs/synthetic_cpu.yaml [key=value ...]
    ray job submit --address http://HEAD:8265 --working-dir . --no-wait -- \
        python -m tuning.sweep --config tuning/configs/synthetic_cpu.yaml --register-as NAME
    python -m tuning.sweep --resume NAME      # a sweep whose driver died: carry on

key=value items override the base training config of every trial (as ``jobs.train`` takes
them). Sweep state and trial checkpoints live under --storage-path (local or s3://).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path
from typing import Any

from wsdan import storage
from wsdan.cluster import add_cluster_args
from wsdan.config import ConfigError

STATE_FILE = "wsdan_sweep.json"
TRAINABLE_CPU = 0.01


def get_args_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    what = p.add_mutually_exclusive_group(required=True)
    what.add_argument("--config", help="sweep YAML (tuning/configs/*.yaml)")
    what.add_argument("--resume", metavar="NAME", help="resume the sweep NAME under --storage-path")
    p.add_argument("--name", default=None, help="sweep name (default: the file's name: or its stem)")
    p.add_argument("--storage-path",
                   default=os.environ.get("WSDAN_SWEEP_STORAGE_PATH", ".wsdan/sweeps"),
                   help="sweep state and trial checkpoints: local folder or s3://bucket/prefix")
    p.add_argument("--experiment", default="wsdan-sweeps", help="MLflow experiment")
    p.add_argument("--register-as", default=None,
                   help="register the best trial's model under this name (champion rule)")
    p.add_argument("--max-failures", type=int, default=1,
                   help="worker-group restarts within one trial before it counts as failed")
    p.add_argument("--sync-period", type=int, default=30,
                   help="seconds between uploads of the sweep state to a remote storage path: "
                        "a driver that dies loses at most this much of the sweep's record")
    p.add_argument("--summary-json", default=None, metavar="PATH",
                   help="also write the sweep's summary (parent run, trials, best trial, "
                        "registered version) as JSON to PATH (local or s3://); scripts read "
                        "this, not the output's last line")
    p.add_argument("--verbose", action="store_true",
                   help="also show Ray's own output here (Tune's status tables, worker logs); "
                        "by default it stays in the cluster's log files and this output "
                        "shows one line per trial epoch and per finished trial")
    add_cluster_args(p)
    p.add_argument("overrides", nargs="*", help="base config overrides, key=value")
    return p


def _root(storage_path: str) -> str:
    if storage.is_remote(storage_path):
        return storage_path.rstrip("/")
    return os.path.abspath(storage_path)


def _state_uri(storage_path: str, name: str) -> str:
    return f"{_root(storage_path)}/{name}/{STATE_FILE}"


def load(args: argparse.Namespace) -> tuple[str, Any, dict[str, Any] | None]:
    """The sweep's name, its validated config and (when resuming) its saved state. Nothing
    here touches Ray or MLflow."""
    from tuning.space import load_sweep, parse_sweep
    from wsdan.config import TrainConfig

    if args.resume:
        uri = _state_uri(args.storage_path, args.resume)
        if not storage.exists(uri):
            raise ConfigError(f"--resume {args.resume}: no sweep of that name under "
                              f"{args.storage_path} ({uri} not found)")
        state = json.loads(storage.read_bytes(uri))
        if args.overrides:
            raise ConfigError("--resume: a resumed sweep keeps its config; overrides are not "
                              "allowed")
        sweep = parse_sweep(state["sweep"], base_config=TrainConfig.from_dict(state["train"]))
        return args.resume, sweep, state
    sweep = load_sweep(args.config, args.overrides)
    name = args.name or sweep.name or Path(args.config).stem
    if not name or "/" in name:
        raise ConfigError(f"--name: must be a non-empty name without '/', got {name!r}")
    if storage.exists(_state_uri(args.storage_path, name)):
        raise ConfigError(f"--name {name}: a sweep of that name exists under "
                          f"{args.storage_path}; resume it with --resume {name} or pick "
                          "another --name")
    return name, sweep, None


def main(args: argparse.Namespace) -> dict[str, Any]:
    from wsdan.data.pipeline import read_manifest
    from wsdan.launcher import check_data

    # 1. Everything checkable before touching the cluster or MLflow.
    if args.max_failures < 0:
        raise ConfigError(f"--max-failures: must be >= 0, got {args.max_failures}")
    if not args.sync_period > 0:
        raise ConfigError(f"--sync-period: must be > 0 seconds, got {args.sync_period}")
    name, sweep, state = load(args)
    if not sweep.train.data.source:
        raise ConfigError("data.source: give the prepared data set (local path or s3:// URI)")
    manifest = read_manifest(sweep.train.data.source)
    check_data(sweep.train, manifest)

    import mlflow

    from tuning.trial import TrialSetup
    from wsdan.cluster import connect
    from wsdan.tracking.runs import log_config, resolve_tracking_uri, setup_experiment

    # 2. Cluster and tracking.
    # The sweep state is small: write it often (and upload it every --sync-period).
    os.environ.setdefault("TUNE_GLOBAL_CHECKPOINT_S", str(min(5.0, args.sync_period)))
    tracking_uri = resolve_tracking_uri()
    from wsdan.launcher import check_tracking_server

    check_tracking_server(tracking_uri)  # one clear line, not MLflow's ~4 min of retries
    experiment_id = setup_experiment(args.experiment, tracking_uri=tracking_uri)
    connect(quiet=not args.verbose)
    if not args.verbose:
        print("[wsdan] Ray's own logs stay in the cluster's log files (the dashboard's Logs "
              "tab); --verbose shows them here", flush=True)
    concurrent = _check_cluster(sweep, args, tracking_uri)
    _check_state_api()
    root = _root(args.storage_path)

    # 3. The parent run (reopened on resume) and the sweep's state file.
    if state is None:
        parent = mlflow.start_run(run_name=name, tags={"wsdan.sweep": name})
        _log_sweep(sweep, name, concurrent, log_config)
        from wsdan.tracking.card import log_run_provenance

        log_run_provenance(sweep.train.data.source, manifest)  # git commit, dataset inputs
        state = {"name": name, "sweep": sweep.raw, "train": sweep.train.to_dict(),
                 "parent_run_id": parent.info.run_id, "experiment": args.experiment}
        storage.write_bytes(_state_uri(args.storage_path, name),
                            json.dumps(state, indent=1).encode())
    else:
        parent = mlflow.start_run(run_id=state["parent_run_id"])
        mlflow.set_tag("wsdan.resumed", "true")
    setup = TrialSetup(sweep_name=name, sweep=sweep, jobs_storage=f"{root}/{name}/jobs",
                       tracking_uri=tracking_uri, experiment_id=experiment_id,
                       parent_run_id=parent.info.run_id, max_failures=args.max_failures)
    where = (f"{tracking_uri.rstrip('/')}/#/experiments/{experiment_id}/runs/"
             f"{parent.info.run_id}" if tracking_uri.startswith("http")
             else f"run {parent.info.run_id} in {tracking_uri}")
    print(f"[wsdan] sweep {name}: {sweep.trials} trials, {concurrent} at a time, "
          f"{sweep.epochs} epochs each; MLflow: {where}", flush=True)
    try:
        t0 = time.perf_counter()
        grid = _tuner(sweep, setup, name, root, concurrent, resume=args.resume is not None,
                      sync_period=args.sync_period, verbose=args.verbose).fit()
        summary = _finish(grid, sweep, name, args.register_as, manifest)
        summary["wall_s"] = round(time.perf_counter() - t0, 1)
        mlflow.log_metric("sweep_wall_s", summary["wall_s"])
    except BaseException:
        mlflow.end_run(status="FAILED")
        raise
    mlflow.end_run()
    if args.summary_json:
        storage.write_bytes(args.summary_json, (json.dumps(summary, indent=1) + "\n").encode())
    print(json.dumps(summary), flush=True)
    return summary


def _check_cluster(sweep, args: argparse.Namespace, tracking_uri: str) -> int:
    """No node-local locations on a multi-node cluster; room for one trial now or after the
    autoscaler scales up; returns how many trials run at once (what the cluster holds, or
    can scale to)."""
    from tuning.space import max_concurrent
    from wsdan.cluster import check_node_local, describe_cluster, wait_for_resources

    view = describe_cluster(autoscaling=args.autoscaling_cluster)
    check_node_local(view, shared_fs=args.shared_filesystem, storage_path=args.storage_path,
                     weights=sweep.train.model.weights, data_source=sweep.train.data.source,
                     tracking_uri=tracking_uri)
    res = sweep.resources
    concurrent = max_concurrent(sweep, view.max_total if view.autoscaling else view.total)
    wait_for_resources([res.per_worker()] * res.num_workers + [{"CPU": res.data_cpus}],
                       what=f"one trial of {res.num_workers} worker(s)", flag="resources",
                       timeout_s=args.resource_timeout, view=view,
                       describe=lambda: describe_cluster(autoscaling=args.autoscaling_cluster))
    return concurrent


def _check_state_api() -> None:
    """Ray Train frees a stopped trial's placement group only when it can see, through the
    State API (served by the dashboard), that the trial's controller has gone."""
    try:
        from ray.util.state import list_nodes

        list_nodes(limit=1, timeout=15, raise_on_missing_output=False)
    except Exception as e:  # noqa: BLE001 - any failure means the same to the user
        print("[wsdan] warning: the Ray State API is not answering "
              f"({type(e).__name__}); is the dashboard running on the head (ray[default])? "
              "Without it, the CPUs and GPUs of trials stopped early stay reserved until "
              "the sweep ends.", file=sys.stderr, flush=True)


def _log_sweep(sweep, name: str, concurrent: int, log_config) -> None:
    import mlflow
    import yaml

    from wsdan.tracking.runs import redact

    r, s = sweep.resources, sweep.scheduler
    mlflow.log_params({
        "sweep.name": name, "sweep.trials": sweep.trials, "sweep.seed": sweep.seed,
        "sweep.searcher": sweep.searcher, "sweep.max_concurrent": concurrent,
        "sweep.num_workers": r.num_workers, "sweep.use_gpu": r.use_gpu,
        "sweep.data_cpus": r.data_cpus, "sweep.grace_period": s.grace_period,
        "sweep.reduction_factor": s.reduction_factor, "sweep.base": redact("base", sweep.base),
        "sweep.searched": ",".join(sweep.space.domains)})
    log_config(sweep.train)  # the base config every trial starts from
    mlflow.log_text(yaml.safe_dump(sweep.raw, sort_keys=False), "sweep.yaml")
    mlflow.log_text(json.dumps({k: {"kind": d.kind, "args": list(d.args)}
                                for k, d in sweep.space.domains.items()}, indent=1),
                    "search_space.json")
    mlflow.log_text(sweep.train.to_yaml(), "base_config.yaml")


def _tuner(sweep, setup, name: str, root: str, concurrent: int, *, resume: bool,
           sync_period: float, verbose: bool = False):
    from ray import tune
    from ray.tune.schedulers import ASHAScheduler
    from ray.tune.search import ConcurrencyLimiter
    from ray.tune.search.basic_variant import BasicVariantGenerator

    from tuning.space import METRIC, MODE
    from tuning.trial import SweepLog, TrialRunStatus, train_trial

    # The trainable itself only waits on its TorchTrainer (whose workers hold the CPUs and
    # GPUs), so it holds a token share of a CPU (Tune refuses an empty request); the
    # number of trials at once is bounded by max_concurrent_trials instead.
    trainable = tune.with_resources(tune.with_parameters(train_trial, setup=setup),
                                    {"cpu": TRAINABLE_CPU})
    fs, path = _tune_storage(root)
    if resume:
        return tune.Tuner.restore(f"{path}/{name}", trainable=trainable, storage_filesystem=fs,
                                  resume_unfinished=True, resume_errored=False,
                                  restart_errored=False)
    if sweep.searcher == "optuna":
        import optuna
        from ray.tune.search.optuna import OptunaSearch

        search = ConcurrencyLimiter(
            OptunaSearch(sampler=optuna.samplers.TPESampler(seed=sweep.seed)),
            max_concurrent=concurrent)
    else:
        search = BasicVariantGenerator(random_state=sweep.seed, max_concurrent=concurrent)
    scheduler = ASHAScheduler(time_attr="epoch", max_t=sweep.epochs,
                              grace_period=sweep.scheduler.grace_period,
                              reduction_factor=sweep.scheduler.reduction_factor)
    return tune.Tuner(
        trainable,
        param_space=sweep.space.param_space(),
        tune_config=tune.TuneConfig(metric=METRIC, mode=MODE, search_alg=search,
                                    scheduler=scheduler, num_samples=sweep.trials),
        run_config=tune.RunConfig(
            name=name, storage_path=path, storage_filesystem=fs,
            failure_config=tune.FailureConfig(max_failures=0, fail_fast=False),
            callbacks=[TrialRunStatus(setup), SweepLog(setup)], verbose=1 if verbose else 0,
            sync_config=tune.SyncConfig(sync_period=sync_period)),
    )


def _tune_storage(root: str):
    if storage.is_remote(root):
        return storage.filesystem_and_path(root)
    return None, root


def _finish(grid, sweep, name: str, register_as: str | None, manifest: dict) -> dict[str, Any]:
    """Results table, figures and the best model, in the parent run."""
    import mlflow

    from tuning.report import (
        best_row,
        compute_saved,
        curves_figure,
        params_figure,
        rows_from_results,
        table_csv,
        table_markdown,
    )
    from wsdan.tracking.runs import log_figure

    rows = rows_from_results(grid, sweep)
    saved = compute_saved(rows, sweep.epochs)
    mlflow.log_text(table_csv(rows), "results.csv")
    mlflow.log_text(table_markdown(rows), "results.md")
    log_figure(params_figure(rows, sweep), "accuracy_vs_params.png")
    log_figure(curves_figure(rows, sweep), "accuracy_per_epoch.png")
    mlflow.log_metrics({k: float(v) for k, v in saved.items()})
    print(table_markdown(rows), flush=True)
    for r in rows:
        if r.error:
            print(f"[wsdan] trial {r.trial_id} failed: {r.error[-500:]}", file=sys.stderr)
    best = best_row(rows)
    summary: dict[str, Any] = {"sweep": name, "parent_run_id": mlflow.active_run().info.run_id,
                               "trials": len(rows), **saved,
                               "statuses": {r.trial_id: r.status for r in rows}}
    if best is None:
        raise RuntimeError(f"sweep {name}: no trial produced a checkpoint "
                           f"({saved['trials_failed']} of {len(rows)} failed)")
    model, state = _best_model(best)
    mlflow.log_metric("best_val_fused_top1", best.best)
    mlflow.set_tags({"wsdan.best_trial": best.trial_id})
    mlflow.log_text(json.dumps(best.params, indent=1), "best_params.json")
    from wsdan.config import TrainConfig

    best_cfg = TrainConfig.from_dict(state["config"])
    mlflow.log_text(best_cfg.to_yaml(), "best_config.yaml")
    summary.update({"best_trial": best.trial_id, "best_val_fused_top1": best.best,
                    "best_epoch": best.best_epoch, "best_params": best.params})
    if register_as:
        from wsdan.tracking.card import apply_card, model_card
        from wsdan.tracking.pyfunc import log_wsdan_model
        from wsdan.tracking.registry import register_if_better

        info = log_wsdan_model(model, best_cfg, list(manifest["classes"]), name="model")
        reg = register_if_better(info.model_uri, register_as, "val_fused_top1", best.best)
        card_metrics = {**(state.get("metrics") or {}), "val_fused_top1": best.best}
        apply_card(register_as, reg.version, *model_card(
            best_cfg, manifest, card_metrics, run_id=mlflow.active_run().info.run_id,
            extra={"wsdan.sweep": name, "wsdan.best_trial": best.trial_id}))
        print(f"[wsdan] registered {register_as} version {reg.version}: "
              + ("now @champion" if reg.became_champion else f"not champion ({reg.reason})"),
              flush=True)
        summary.update({"registered_version": int(reg.version),
                        "champion": reg.became_champion})
    return summary


def _best_model(row):
    """The best trial's best checkpoint (kept by its job: checkpoints are ranked by score)."""
    from ray.train import Checkpoint

    from wsdan.launcher import model_from_checkpoint

    return model_from_checkpoint(Checkpoint(row.best_checkpoint,
                                            filesystem=_checkpoint_fs(row.best_checkpoint)))


def _checkpoint_fs(path: str):
    """Tune reports checkpoint paths without a scheme: an absolute path is local, anything
    else is a bucket key of the S3 store the job wrote to."""
    if path.startswith("/"):
        return None
    fs, _ = storage.filesystem_and_path(f"s3://{path}")
    return fs


if __name__ == "__main__":
    from wsdan.cli import run_main

    sys.exit(run_main(main, get_args_parser()))
