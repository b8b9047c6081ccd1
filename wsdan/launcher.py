"""Driver side of the distributed job: input checks, the TorchTrainer, the best checkpoint.

Everything that can be wrong with the inputs (config, data location, class counts, a
resumed job's class count) is checked here, before any cluster work starts.
"""

from __future__ import annotations

import os
import signal
import threading
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from wsdan import storage
from wsdan.config import ConfigError, TrainConfig
from wsdan.job_state import (  # noqa: F401 - part of the launcher's interface
    JOB_FILE,
    RAY_SNAPSHOT,
    check_resume,
    job_file,
    record_job,
    repair_snapshot,
    resume_epoch,
)
from wsdan.model import WSDAN, build_model

PLACEMENTS = ("PACK", "SPREAD", "STRICT_PACK", "STRICT_SPREAD")


@dataclass(frozen=True)
class JobSpec:
    name: str
    storage_path: str  # local path or s3:// URI
    num_workers: int = 2
    use_gpu: bool = False
    max_failures: int = 2
    keep_checkpoints: int = 2
    # Ray resources of one training worker, e.g. {"CPU": 4, "GPU": 1}; None: Ray Train's
    # default (one CPU, or one GPU with use_gpu).
    resources_per_worker: Mapping[str, float] | None = None
    # Upper bound on the CPUs this job's Ray Data reads and decodes may hold at once; None:
    # no bound. Jobs that share a cluster (the trials of a sweep) set it so one job's
    # decoding cannot take the CPUs another job's training workers wait for.
    data_cpus: float | None = None
    # Local paths are on a file system every node mounts (NFS): allow them on a multi-node
    # cluster (wsdan.cluster.check_node_local).
    shared_fs: bool = False
    # How long to wait for an autoscaling cluster to add the nodes the job needs.
    resource_timeout_s: float = 900.0
    # Ray placement of the training workers: PACK (fewest nodes: least network traffic),
    # SPREAD (one per node where possible: a lost node takes fewer workers with it),
    # STRICT_PACK / STRICT_SPREAD (or fail to place).
    placement: str = "PACK"
    # The cluster adds nodes on demand although its autoscaler publishes no limits (Ray's
    # v1 autoscaler): wait for resources instead of refusing (wsdan.cluster).
    autoscaling: bool = False

    def __post_init__(self) -> None:
        if self.num_workers < 1:
            raise ConfigError(f"num_workers: must be >= 1, got {self.num_workers}")
        if not self.name or "/" in self.name:
            raise ConfigError(f"name: must be a non-empty name without '/', got {self.name!r}")
        for key, value in (self.resources_per_worker or {}).items():
            if not isinstance(value, (int, float)) or isinstance(value, bool) or value < 0:
                raise ConfigError(f"resources_per_worker.{key}: must be a number >= 0, "
                                  f"got {value!r}")
        if self.placement not in PLACEMENTS:
            raise ConfigError(f"placement: one of {', '.join(PLACEMENTS)}, got "
                              f"{self.placement!r}")
        if self.data_cpus is not None and not self.data_cpus > 0:
            raise ConfigError(f"data_cpus: must be > 0 or unset, got {self.data_cpus!r}")

    def worker_resources(self) -> dict[str, float]:
        """What one training worker holds (Ray Train's defaults filled in)."""
        res = dict(self.resources_per_worker or {})
        res.setdefault("CPU", 1.0)
        if self.use_gpu:
            res.setdefault("GPU", 1.0)
        return res


@dataclass
class JobResult:
    """What one training job produced (:func:`run_job`)."""

    model: WSDAN  # the best checkpoint's model, on the CPU, in eval mode
    state: dict[str, Any]  # that checkpoint's contents (epoch, metrics, config, ...)
    checkpoint: Any  # ray.train.Checkpoint of the best epoch
    metrics: dict[str, float]  # the best checkpoint's metrics
    epochs: int  # epochs completed in all (a resumed job counts the earlier ones)
    best_epoch: int
    wall_s: float
    datasets: dict[str, Any] = field(repr=False)
    class_names: list[str] = field(default_factory=list)
    # Where the last epoch ran, and whether its replicas agreed (from the latest checkpoint,
    # which is not the best one when an earlier epoch scored higher).
    last_worker_nodes: list[str] | None = None
    last_replica_digests: list[str] | None = None
    # The epoch of the checkpoint this run resumed from (0: it started from scratch).
    resumed_from_epoch: int = 0

    def summary(self) -> dict[str, Any]:
        digests = self.last_replica_digests or self.state.get("replica_digests") or []
        return {"epochs": self.epochs, "best_epoch": self.best_epoch,
                "resumed_from_epoch": self.resumed_from_epoch,
                "wall_s": round(self.wall_s, 1),
                "worker_nodes": self.last_worker_nodes or self.state.get("worker_nodes"),
                "replicas_identical": len(set(digests)) == 1 if digests else None,
                **{k: self.metrics[k] for k in self.metrics if k.startswith("val_")}}


def preflight(cfg: TrainConfig, spec: JobSpec, *,
              tracking_uri: str | None = None) -> tuple[dict[str, Any], dict[str, Any] | None]:
    """Every check that needs no cluster: the config against the job spec, the tracking
    server (:func:`check_tracking_server`: ``tracking_uri``, default MLFLOW_TRACKING_URI),
    the data set's manifest against the config, and a resumed job's identity. Returns the
    manifest and the resumed job's record (None for a new job). Raises
    :class:`ConfigError` naming the key or the server."""
    if cfg.model.sync_batchnorm and not spec.use_gpu:
        raise ConfigError("model.sync_batchnorm: needs --use-gpu (torch's SyncBatchNorm has "
                          "no CPU path)")
    if not cfg.data.source:
        raise ConfigError("data.source: give the prepared data set (local path or s3:// URI)")
    check_tracking_server(tracking_uri)
    from wsdan.data.pipeline import read_manifest

    manifest = read_manifest(cfg.data.source)
    check_data(cfg, manifest)
    return manifest, check_resume(cfg, spec)


def check_tracking_server(tracking_uri: str | None = None, *, timeout_s: float = 10.0) -> None:
    """An MLflow tracking server named by ``tracking_uri`` (default ``MLFLOW_TRACKING_URI``)
    must answer before the job starts: otherwise a :class:`ConfigError` (one line, exit code
    2 from the command line) naming it, instead of MLflow's own retries (~4 min) and a
    traceback after them. Any HTTP answer below 500 counts (a server behind
    authentication answers 401); no answer within ``timeout_s`` or a 5xx does not. Other
    URIs (a local sqlite or file store, Databricks) are not checked here.

    Later outages are not fatal: rank 0 buffers what it logs while the server is away
    (``wsdan.tracking.sender.RankZeroLogger``)."""
    uri = (os.environ.get("MLFLOW_TRACKING_URI", "") if tracking_uri is None
           else tracking_uri).strip()
    if not uri.lower().startswith(("http://", "https://")):
        return
    import requests

    from wsdan.tracking.runs import redact

    try:
        # /health is the tracking server's own liveness endpoint (it answers "OK").
        answer = requests.get(f"{uri.rstrip('/')}/health", timeout=timeout_s,
                              allow_redirects=False)
    except requests.Timeout:
        reason = f"no answer within {timeout_s:g} s"
    except requests.RequestException as e:
        reason = _root_reason(e)
    else:
        if answer.status_code < 500:
            return
        reason = f"it answers HTTP {answer.status_code}"
    raise ConfigError(
        f"MLFLOW_TRACKING_URI={redact('tracking_uri', uri)}: no MLflow tracking server answers "
        f"there ({reason}). Start it (locally: `wsdan stack up`), point MLFLOW_TRACKING_URI "
        "at a running server, or unset it to track in .wsdan/mlflow.db")


def _root_reason(error: BaseException) -> str:
    """The innermost OS error under a requests/urllib3 exception ("Connection refused"),
    else the exception's type: the whole chain is several lines of pool internals."""
    seen: set[int] = set()
    todo: list[BaseException] = [error]
    reason = type(error).__name__
    while todo:
        e = todo.pop()
        if id(e) in seen:
            continue
        seen.add(id(e))
        if isinstance(e, OSError) and e.strerror:
            reason = e.strerror
        for nxt in (e.__cause__, e.__context__, getattr(e, "reason", None), *e.args):
            if isinstance(nxt, BaseException):
                todo.append(nxt)
    return reason


def check_cluster(spec: JobSpec, *, concurrent_jobs: int = 1, cfg: TrainConfig | None = None,
                  tracking_uri: str | None = None, view: Any = None) -> None:
    """Checks against the connected Ray cluster (``wsdan.cluster``), before any work:

    * on a cluster of several nodes, or one that can scale out, no node-local locations
      (``spec.storage_path``, and with ``cfg`` its weights and data, and ``tracking_uri``);
    * room for ``concurrent_jobs`` such jobs: their training workers (each on one node) and
      ``spec.data_cpus`` CPUs each for Ray Data (one when unset); an autoscaling cluster is
      asked to scale up and waited for, up to ``spec.resource_timeout_s``.
    """
    from wsdan.cluster import check_node_local, describe_cluster, wait_for_resources

    view = view or describe_cluster(autoscaling=spec.autoscaling)
    check_node_local(view, shared_fs=spec.shared_fs, storage_path=spec.storage_path,
                     weights=cfg.model.weights if cfg else None,
                     data_source=cfg.data.source if cfg else None, tracking_uri=tracking_uri)
    data = spec.data_cpus if spec.data_cpus is not None else 1.0
    bundles = [spec.worker_resources()] * spec.num_workers + [{"CPU": data}]
    wait_for_resources(bundles * concurrent_jobs, timeout_s=spec.resource_timeout_s,
                       what=f"{concurrent_jobs} job(s) of {spec.num_workers} worker(s) "
                            f"({_fmt_bundle(spec.worker_resources())} per worker, "
                            f"{data:g} CPU for Ray Data)", view=view,
                       describe=lambda: describe_cluster(autoscaling=spec.autoscaling))


def _fmt_bundle(res: Mapping[str, float]) -> str:
    return ", ".join(f"{v:g} {k}" for k, v in sorted(res.items()))


def check_data(cfg: TrainConfig, manifest: dict[str, Any]) -> None:
    """The data set must match the config: class count, non-empty train and val splits."""
    source = cfg.data.source
    n = int(manifest.get("num_classes", len(manifest.get("classes", []))))
    if n != cfg.model.num_classes:
        raise ConfigError(
            f"model.num_classes is {cfg.model.num_classes} but the data set at {source} has "
            f"{n} classes (dataset.json)")
    counts = manifest.get("counts", {})
    for split in ("train", "val"):
        if not counts.get(split):
            raise ConfigError(f"data set at {source} has no {split!r} images (dataset.json counts:"
                              f" {counts})")


def build_trainer(
    cfg: TrainConfig,
    spec: JobSpec,
    *,
    datasets: dict[str, Any],
    num_train_rows: int,
    class_names: list[str],
    figures: bool = True,
    mlflow_spec: dict[str, str] | None = None,
    callbacks: Sequence[Any] = (),
    progress: Any = None,
):
    """A TorchTrainer running ``wsdan.raytrain.train_loop_per_worker``.

    callbacks: extra ``ray.train.UserCallback`` objects for the run (a sweep passes Tune's
    ``TuneReportCallback``)."""
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    from wsdan.raytrain import ExactEvalDataConfig, train_loop_per_worker

    if storage.is_remote(spec.storage_path):
        fs, path = storage.filesystem_and_path(spec.storage_path)
    else:
        fs, path = None, os.path.abspath(spec.storage_path)
    return TorchTrainer(
        train_loop_per_worker,
        train_loop_config={"train": cfg.to_dict(), "num_train_rows": num_train_rows,
                           "class_names": class_names, "mlflow": mlflow_spec,
                           "figures": figures, "progress": progress},
        scaling_config=ScalingConfig(
            num_workers=spec.num_workers, use_gpu=spec.use_gpu,
            resources_per_worker=dict(spec.resources_per_worker)
            if spec.resources_per_worker else None,
            placement_strategy=spec.placement),
        run_config=RunConfig(
            name=spec.name,
            storage_path=path,
            storage_filesystem=fs,
            failure_config=FailureConfig(max_failures=spec.max_failures),
            callbacks=list(callbacks),
            checkpoint_config=CheckpointConfig(
                num_to_keep=spec.keep_checkpoints,
                checkpoint_score_attribute="val_fused_top1",
                checkpoint_score_order="max",
            ),
        ),
        datasets=datasets,
        dataset_config=ExactEvalDataConfig(data_cpus=spec.data_cpus),
    )


def fit(trainer: Any) -> Any:
    """``trainer.fit()``, then this process's SIGINT handler as it was before.

    Ray Train installs a Ctrl-C handler that holds its controller actor; left in place it
    keeps the finished run's controller, dataset manager and split coordinators alive (and
    their memory, ~2 GB) for as long as the driver goes on: registering, evaluating, or the
    next job of the same process."""
    main = threading.current_thread() is threading.main_thread()
    before = signal.getsignal(signal.SIGINT) if main else None
    try:
        return trainer.fit()
    finally:
        if before is not None:  # None: not set from Python; nothing to put back
            signal.signal(signal.SIGINT, before)


def run_job(
    cfg: TrainConfig,
    spec: JobSpec,
    *,
    manifest: Mapping[str, Any],
    mlflow_spec: dict[str, str] | None = None,
    callbacks: Sequence[Any] = (),
    figures: bool = True,
    progress: bool = False,
) -> JobResult:
    """Run one training job on the connected Ray cluster and return its best model.

    The caller has run :func:`preflight` (which gives ``manifest``), connected to Ray and
    made its checks (:func:`check_cluster`); the job's record is written here unless the
    caller did (:func:`record_job`). Creating the MLflow run and registering the model
    are the caller's too. mlflow_spec
    (``tracking_uri``, ``run_id``): rank 0 logs per-epoch metrics (and, with ``figures``,
    attention heat-maps) to that existing run. callbacks: extra ``ray.train.UserCallback``
    objects. With ``progress``, the driver shows a bar per epoch and one line per epoch
    (``wsdan.progress``). Raises the training error if the run failed after its retries.
    """
    from wsdan.data.pipeline import build_dataset

    if not storage.exists(job_file(spec)):
        record_job(cfg, spec)
    repaired = repair_snapshot(spec)
    if repaired:
        print(f"[wsdan] {repaired}", flush=True)
    resumed_from = resume_epoch(spec)
    if progress and resumed_from:
        left = cfg.optim.epochs - resumed_from
        print(f"[wsdan] resuming from the checkpoint of epoch {resumed_from}: "
              + (f"{left} more epoch(s) to train" if left > 0 else "no epoch left to train"),
              flush=True)
    datasets = {
        "train": build_dataset(cfg.data.source, "train", cfg=cfg.data, train=True,
                               seed=cfg.seed, shuffle=True),
        "val": build_dataset(cfg.data.source, "val", cfg=cfg.data, train=False,
                             seed=cfg.seed, shuffle=False),
    }
    class_names = [str(c) for c in manifest["classes"]]
    board = None
    if progress:
        from wsdan.progress import create_board

        board = create_board()
    trainer = build_trainer(
        cfg, spec, datasets=datasets, num_train_rows=int(manifest["counts"]["train"]),
        class_names=class_names, figures=figures, mlflow_spec=mlflow_spec,
        callbacks=callbacks, progress=board)
    t0 = time.perf_counter()
    if board is not None:
        from wsdan.progress import DriverProgress

        with DriverProgress(board, epochs=cfg.optim.epochs):
            result = fit(trainer)
    else:
        result = fit(trainer)
    wall = time.perf_counter() - t0
    if result.error:
        raise result.error
    checkpoint = best_checkpoint(result)
    model, state = model_from_checkpoint(checkpoint)
    last = result.metrics or {}
    last_state = state
    if result.checkpoint is not None and result.checkpoint.path != checkpoint.path:
        from wsdan.raytrain import load_checkpoint

        with result.checkpoint.as_directory() as d:
            last_state = load_checkpoint(d)
    return JobResult(model=model, state=state, checkpoint=checkpoint,
                     metrics=dict(state["metrics"]),
                     epochs=int(last.get("epoch", state["epoch"])),
                     best_epoch=int(state["epoch"]), wall_s=wall, datasets=datasets,
                     class_names=class_names,
                     last_worker_nodes=last_state.get("worker_nodes"),
                     last_replica_digests=last_state.get("replica_digests"),
                     resumed_from_epoch=resumed_from)


def best_checkpoint(result) -> Any:
    """The checkpoint with the highest val fused top-1 (falls back to the latest)."""
    best = getattr(result, "best_checkpoints", None) or []
    scored = [(m.get("val_fused_top1", float("-inf")), c) for c, m in best]
    if scored:
        return max(scored, key=lambda t: t[0])[1]
    return result.checkpoint


def model_from_checkpoint(checkpoint) -> tuple[WSDAN, dict[str, Any]]:
    """Rebuild the WS-DAN model (random backbone init, then the checkpoint, strictly)."""
    from wsdan.raytrain import load_checkpoint, load_model_state

    with checkpoint.as_directory() as d:
        state = load_checkpoint(d)
    cfg = TrainConfig.from_dict(state["config"])
    m = cfg.model
    model = build_model(m.backbone, num_classes=m.num_classes, num_attentions=m.num_attentions,
                        logit_scale=m.logit_scale, sqrt_grad_eps=m.sqrt_grad_eps)
    load_model_state(model, state, checkpoint.path)
    model.eval()
    return model, state


def log_final_figures(state: Mapping[str, Any], class_names: list[str]) -> None:
    """Confusion matrix of the selected model on the whole val split, to the active run: the
    counts were summed over all ranks by the distributed evaluation and kept in the
    checkpoint (the driver reads no data)."""
    from wsdan.tracking.runs import confusion_figure, log_figure

    confusion = state.get("confusion")
    if confusion is None:  # a checkpoint written before the counts were kept
        return
    log_figure(confusion_figure(confusion, class_names), "confusion_matrix.png")
