"""One trial of a sweep: a distributed training job under Ray Tune, and its MLflow child run.

The trial is a Ray Tune function trainable that runs the same job code as ``jobs/train.py``
(:func:`wsdan.launcher.run_job`), with Ray Train's ``TuneReportCallback`` forwarding every
epoch's metrics and checkpoint path to Tune (the Train V2 pattern: Tune does not wrap the
``TorchTrainer`` itself).

MLflow: the sweep driver owns the parent run. Each trial finds or creates its child run
(tagged with the parent and the trial id, so a restored trial continues the same run), and
rank 0 of its workers logs the per-epoch metrics there, as for a training job. The driver's
:class:`TrialRunStatus` callback closes each child run as FINISHED, KILLED (stopped early by
the scheduler) or FAILED (with the error), in one place.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from ray import tune

from tuning.space import SweepConfig

TRIAL_TAG = "wsdan.trial_id"
SWEEP_TAG = "wsdan.sweep"
ERROR_TAG = "wsdan.error"
PARENT_TAG = "mlflow.parentRunId"


@dataclass(frozen=True)
class TrialSetup:
    """What every trial needs besides its parameters (passed with ``tune.with_parameters``)."""

    sweep_name: str
    sweep: SweepConfig
    jobs_storage: str  # where each trial's Ray Train run keeps its checkpoints
    tracking_uri: str
    experiment_id: str
    parent_run_id: str
    max_failures: int = 1  # worker-group restarts inside one trial (Ray Train)

    def job_name(self, trial_id: str) -> str:
        return f"trial-{trial_id}"


def train_trial(params: dict[str, Any], setup: TrialSetup) -> None:
    """Ray Tune function trainable: one training job with this trial's parameters."""
    import ray.data
    from ray.tune.integration.ray_train import TuneReportCallback

    from wsdan.launcher import JobSpec, preflight, run_job

    # Many trials at once: their data progress bars would bury the sweep's own table.
    ray.data.DataContext.get_current().enable_progress_bars = False
    ctx = tune.get_context()
    trial_id, trial_name = ctx.get_trial_id(), ctx.get_trial_name()
    cfg = setup.sweep.trial_config(params)
    res = setup.sweep.resources
    spec = JobSpec(name=setup.job_name(trial_id), storage_path=setup.jobs_storage,
                   num_workers=res.num_workers, use_gpu=res.use_gpu,
                   resources_per_worker=res.per_worker(), data_cpus=res.data_cpus,
                   max_failures=setup.max_failures, keep_checkpoints=2)
    manifest, _ = preflight(cfg, spec)  # a restored trial resumes its own job
    run_id = trial_run(setup, trial_id, trial_name, params, cfg)
    run_job(cfg, spec, manifest=manifest, callbacks=[TuneReportCallback()], figures=False,
            mlflow_spec={"tracking_uri": setup.tracking_uri, "run_id": run_id})


def _client(setup: TrialSetup):
    from mlflow import MlflowClient

    return MlflowClient(tracking_uri=setup.tracking_uri)


def find_trial_run(setup: TrialSetup, trial_id: str) -> str | None:
    """The child run of ``trial_id`` under the sweep's parent run, if one was made."""
    runs = _client(setup).search_runs(
        [setup.experiment_id],
        f"tags.`{PARENT_TAG}` = '{setup.parent_run_id}' and tags.`{TRIAL_TAG}` = '{trial_id}'",
        max_results=2)
    return runs[0].info.run_id if runs else None


def trial_run(setup: TrialSetup, trial_id: str, trial_name: str, params: Mapping[str, Any],
              cfg: Any) -> str:
    """Find or create the trial's child run; a new one gets the trial's config as params
    and the searched parameters as ``search.<name>``."""
    from mlflow.entities import Param

    from wsdan.tracking.runs import config_params

    existing = find_trial_run(setup, trial_id)
    if existing is not None:
        return existing
    client = _client(setup)
    run = client.create_run(setup.experiment_id, run_name=trial_name,
                            tags={PARENT_TAG: setup.parent_run_id, TRIAL_TAG: trial_id,
                                  SWEEP_TAG: setup.sweep_name})
    logged = config_params(cfg)
    logged.update({f"search.{k}": str(_plain(v)) for k, v in params.items()})
    client.log_batch(run.info.run_id, params=[Param(k, v) for k, v in logged.items()])
    return run.info.run_id


def _plain(v: Any) -> Any:
    return v.item() if hasattr(v, "item") else v


def trial_outcome(last_result: Mapping[str, Any] | None, epochs: int, *, failed: bool) -> str:
    """MLflow status of a trial's child run: FAILED, KILLED (stopped before its last epoch,
    i.e. by the scheduler) or FINISHED. Uses the epoch, not Tune's iteration counter: a
    restarted worker group re-reports from its checkpoint."""
    if failed:
        return "FAILED"
    done = int((last_result or {}).get("epoch", 0) or 0)
    return "FINISHED" if done >= epochs else "KILLED"


class TrialRunStatus(tune.Callback):
    """Driver-side Tune callback: closes each trial's child run with its outcome."""

    def __init__(self, setup: TrialSetup) -> None:
        self.trial_setup = setup  # not "setup": that is a Callback hook

    def on_trial_complete(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        self._close(trial, trial_outcome(trial.last_result, self.trial_setup.sweep.epochs,
                                         failed=False))

    def on_trial_error(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        self._close(trial, "FAILED", error=_error_text(trial))

    def _close(self, trial: Any, status: str, error: str | None = None) -> None:
        from wsdan.tracking.runs import redact

        client = _client(self.trial_setup)
        run_id = find_trial_run(self.trial_setup, trial.trial_id)
        if run_id is None:  # failed before it could make its run: make one to show it
            run_id = trial_run(self.trial_setup, trial.trial_id, str(trial), trial.config,
                               self.trial_setup.sweep.train)
        if error:
            client.set_tag(run_id, ERROR_TAG, redact("error", error)[-4000:])
        client.set_terminated(run_id, status=status)


def _error_text(trial: Any) -> str:
    """The trial's error as Tune wrote it, from the driver's local copy (the copy under the
    storage path is uploaded later)."""
    from pathlib import Path

    try:
        path = trial.error_file and Path(trial.error_file)
        if path and path.is_file():
            return path.read_text()
        err = trial.get_pickled_error() or trial.get_error()
    except Exception as e:  # noqa: BLE001 - the error file may be gone; say so
        return f"(error not readable: {e})"
    return f"{type(err).__name__}: {err}" if err is not None else "unknown error"
