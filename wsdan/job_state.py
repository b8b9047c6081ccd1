"""A job's state beside its checkpoints: its identity record and Ray Train's snapshot.

Under ``<storage_path>/<name>/`` a job keeps ``wsdan_job.json`` (what a resume must match,
and its MLflow run id, so a rerun continues that run) next to Ray Train's checkpoints and
Ray Train's own record of them (``checkpoint_manager_snapshot.json``), whose latest entry is
where a rerun resumes. The driver (``wsdan.launcher``) reads and checks these before any
cluster work, and repairs a snapshot that a full disk left unreadable.
"""

from __future__ import annotations

import json
from typing import Any, Protocol

from wsdan import storage
from wsdan.config import ConfigError, TrainConfig

__all__ = ["JOB_FILE", "RAY_SNAPSHOT", "check_resume", "job_file", "record_job", "repair_snapshot",
           "resume_epoch"]

JOB_FILE = "wsdan_job.json"
# Ray Train's own record of a run's reported checkpoints, beside them: the latest one in it
# is where a rerun of the job resumes (a checkpoint not yet in it is not resumed from).
RAY_SNAPSHOT = "checkpoint_manager_snapshot.json"


class JobSpec(Protocol):
    """What these functions read of a job (``wsdan.launcher.JobSpec``): where it keeps its
    checkpoints, and its name there."""

    @property
    def storage_path(self) -> str: ...

    @property
    def name(self) -> str: ...


def job_file(spec: JobSpec) -> str:
    return f"{spec.storage_path.rstrip('/')}/{spec.name}/{JOB_FILE}"


def check_resume(cfg: TrainConfig, spec: JobSpec) -> dict[str, Any] | None:
    """If a job of this name already ran under storage_path, it will be resumed: its class
    count and backbone must match. Returns its record (None for a new job); writes nothing
    (:func:`record_job` does, once the job starts)."""
    uri = job_file(spec)
    if not storage.exists(uri):
        return None
    previous = json.loads(storage.read_bytes(uri))
    for key in ("num_classes", "backbone", "num_attentions"):
        if previous.get(key) != getattr(cfg.model, key):
            raise ConfigError(
                f"model.{key} is {getattr(cfg.model, key)!r} but job {spec.name!r} under "
                f"{spec.storage_path} was started with {previous.get(key)!r}: resuming "
                "it would load mismatched weights (use another --name)")
    return previous


def resume_epoch(spec: JobSpec) -> int:
    """The epoch of the checkpoint a run of this job resumes from: the latest one in Ray
    Train's snapshot under the job's folder; 0 when there is none (a new job, or one that
    stopped before its first checkpoint was taken in). A snapshot that cannot be read
    counts as none: Ray Train reports that itself when it restores."""
    uri = f"{spec.storage_path.rstrip('/')}/{spec.name}/{RAY_SNAPSHOT}"
    try:
        if not storage.exists(uri):
            return 0
        latest = json.loads(storage.read_bytes(uri)).get("latest_checkpoint_result") or {}
        return int((latest.get("metrics") or {}).get("epoch", 0))
    except (OSError, ValueError, TypeError, AttributeError):
        return 0


def repair_snapshot(spec: JobSpec) -> str | None:
    """Rebuild Ray Train's snapshot of this job when it is there but unreadable; returns a
    line saying what was done, None when there was nothing to do.

    Ray Train rewrites the snapshot in place after each checkpoint; on a local storage path
    a device that fills up at that moment leaves it empty (seen: 0 bytes after ENOSPC), and
    Ray Train then refuses to start the rerun ("Expecting value: line 1 column 1"), although
    the checkpoints beside it are whole. Each of our checkpoints holds its epoch and its
    reported metrics, so the snapshot is rebuilt from those whose ``state.pt`` loads
    (``weights_only``; a checkpoint cut short by the full disk does not and is left out),
    the latest epoch last, which is where the rerun resumes. The broken file is kept as
    ``<snapshot>.broken``."""
    job = f"{spec.storage_path.rstrip('/')}/{spec.name}"
    uri = f"{job}/{RAY_SNAPSHOT}"
    if not storage.exists(uri):
        return None
    raw = storage.read_bytes(uri)
    try:
        if isinstance(json.loads(raw), dict):
            return None
    except ValueError:
        pass
    import io

    import pyarrow.fs as pafs
    import ray
    import torch

    fs, base = storage.filesystem_and_path(job)
    names = sorted(i.base_name for i in fs.get_file_info(pafs.FileSelector(base))
                   if i.type == pafs.FileType.Directory and i.base_name.startswith("checkpoint_"))
    found = []
    for name in names:
        try:
            state = torch.load(io.BytesIO(storage.read_bytes(f"{job}/{name}/state.pt")),
                               map_location="cpu", weights_only=True)
            found.append((int(state["epoch"]), name, {k: float(v) for k, v in
                                                      state["metrics"].items()}))
        except Exception:  # noqa: BLE001 - cut short, or not one of ours: not resumable
            continue
    found.sort()
    results = [{"version": 0, "checkpoint_dir_name": n, "metrics": m} for _, n, m in found]
    snapshot = {"ray_version": ray.__version__, "checkpoint_results": results,
                "checkpoint_report_indices": [e - 1 for e, _, _ in found],
                "latest_checkpoint_result": results[-1] if results else None,
                "pending_training_results": [], "pending_validation_specs": [],
                "current_report_index": found[-1][0] if found else 0,
                "validated_checkpoint_dir_names": [],
                "timed_out_validation_checkpoint_dir_names": [],
                "failed_validation_checkpoint_dir_names": []}
    storage.write_bytes(f"{uri}.broken", raw)
    storage.write_bytes(uri, json.dumps(snapshot).encode())
    return (f"Ray Train's checkpoint snapshot {uri} was unreadable ({len(raw)} bytes; kept as "
            f"{RAY_SNAPSHOT}.broken): rebuilt from {len(found)} whole checkpoint(s) of "
            f"{len(names)}" + (f", resuming from epoch {found[-1][0]}" if found else
                               ", starting from scratch"))


def record_job(cfg: TrainConfig, spec: JobSpec, *, run_id: str | None = None,
               tracking_uri: str | None = None) -> None:
    """Keep the job's identity (what a resume must match) and its MLflow run id with its
    checkpoints, so that rerunning the job continues that run instead of opening another."""
    uri = job_file(spec)
    record = json.loads(storage.read_bytes(uri)) if storage.exists(uri) else {}
    record.update({"num_classes": cfg.model.num_classes, "backbone": cfg.model.backbone,
                   "num_attentions": cfg.model.num_attentions})
    if run_id is not None:
        record.update({"mlflow_run_id": run_id, "tracking_uri": tracking_uri})
    storage.write_bytes(uri, json.dumps(record).encode())
