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


class SweepLog(tune.Callback):
    """Driver-side Tune callback: the sweep's own progress, one line per event, in place of
    Tune's status tables (which ``--verbose`` brings back).

    - each reported epoch of each trial: its validation accuracy and searched parameters
      (an epoch reported again after a worker-group restart is marked);
    - a trial's end: finished, stopped early by the scheduler, or failed (its error's last
      line; the whole error is in the trial's MLflow run), and how many of the sweep's
      trials have ended, with the best accuracy so far.
    """

    def __init__(self, setup: TrialSetup, *, out: Any = None) -> None:
        self.trial_setup = setup
        self._out = out
        self._seen: dict[str, int] = {}  # trial id -> last epoch printed
        self._ended = 0
        self._best: tuple[float, str] | None = None

    def _print(self, line: str) -> None:
        import sys

        print(line, file=self._out or sys.stdout, flush=True)

    def on_trial_result(self, iteration: int, trials: list, trial: Any, result: dict,
                        **info: Any) -> None:
        epoch = int(result.get("epoch") or 0)
        if epoch < 1:
            return
        again = epoch <= self._seen.get(trial.trial_id, 0)
        self._seen[trial.trial_id] = max(epoch, self._seen.get(trial.trial_id, 0))
        acc = result.get("val_fused_top1")
        if isinstance(acc, (int, float)) and (self._best is None or acc > self._best[0]):
            self._best = (float(acc), trial.trial_id)
        self._print(f"[wsdan] trial {trial.trial_id} epoch {epoch}/{self.trial_setup.sweep.epochs}"
                    + (" (again, after a restart)" if again else "")
                    + (f" | val fused top-1 {acc:.4f}" if isinstance(acc, (int, float)) else "")
                    + f" | {format_params(trial.config)}")

    def on_trial_complete(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        done = int((trial.last_result or {}).get("epoch", 0) or 0)
        status = trial_outcome(trial.last_result, self.trial_setup.sweep.epochs, failed=False)
        self._end(trial, "finished" if status == "FINISHED"
                  else f"stopped early by the scheduler after epoch {done}")

    def on_trial_error(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        lines = [ln for ln in _error_text(trial).strip().splitlines() if ln.strip()]
        self._end(trial, "failed: " + (lines[-1][-300:] if lines else "unknown error")
                  + " (the whole error is in its MLflow run)")

    def _end(self, trial: Any, what: str) -> None:
        self._ended += 1
        best = (f"; best so far {self._best[0]:.4f} (trial {self._best[1]})"
                if self._best else "")
        self._print(f"[wsdan] trial {trial.trial_id} {what} "
                    f"[{self._ended}/{self.trial_setup.sweep.trials} trials ended{best}]")


def format_params(params: Mapping[str, Any]) -> str:
    """``key=value`` for each searched parameter, numbers with 4 significant digits."""
    parts = []
    for key, value in params.items():
        value = _plain(value)
        shown = f"{value:.4g}" if isinstance(value, float) else str(value)
        parts.append(f"{key}={shown}")
    return " ".join(parts)
