"""The whole job driver killed mid-job (slow: real S3, MLflow and Ray).

A separate ``python -m jobs.train`` process runs a 2-epoch job on the session cluster; once
Ray Train has taken in a checkpoint (its snapshot beside the checkpoints lists one), the
driver is SIGKILLed. The job's controller and workers (non-detached actors of that driver)
must go and give their CPUs back; rerunning the command (with one epoch more: a job is
extended by rerunning it) resumes from that checkpoint, trains only the epochs after it and
continues the same MLflow run, every epoch logged once.
(A killed training worker is tests/test_train_job.py::test_killed_worker_restarts_from_checkpoint.)
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import pytest

from tests.helpers import TINY, prepare_tiny_synthetic

BUCKET = "wsdan-driver-kill"
NAME = "job-driver-kill"
# The job's controller and workers, and Ray Train's detached placement-group cleaner, which
# must notice the dead controller, remove the workers' placement group and exit.
TRAIN_ACTORS = ("TrainController", "RayTrainWorker", "PlacementGroupCleaner")
EPOCHS = 2
WORKERS = 1  # the driver, not the workers, is what dies here: one keeps the test short


def _argv(data: str, summary: str, epochs: int = EPOCHS) -> list[str]:
    return [sys.executable, "-m", "jobs.train", "--config", "jobs/configs/synthetic_cpu.yaml",
            "--name", NAME, "--storage-path", f"s3://{BUCKET}/runs", "--num-workers", str(WORKERS),
            "--experiment", "wsdan-tests", "--summary-json", summary, *TINY,
            f"data.source={data}", f"optim.epochs={epochs}"]


def _snapshot_epoch(s3_server) -> int:
    """The latest epoch in Ray Train's checkpoint snapshot of the job (0: none yet)."""
    client = s3_server.client()
    try:
        body = client.get_object(Bucket=BUCKET,
                                 Key=f"runs/{NAME}/checkpoint_manager_snapshot.json")
    except client.exceptions.NoSuchKey:
        return 0
    latest = json.loads(body["Body"].read()).get("latest_checkpoint_result") or {}
    return int(latest.get("metrics", {}).get("epoch", 0))


def _train_leftovers(address: str) -> list[str]:
    """What the killed job could still hold on the cluster at ``address`` (this session's,
    named: other Rays may run on the machine): live Train actors, placement groups not
    removed, and CPUs not given back."""
    import ray
    from ray.util.state import list_actors, list_placement_groups

    actors = list_actors(filters=[("state", "!=", "DEAD")], limit=1000, address=address)
    left = [f"actor {a.class_name} ({a.state})" for a in actors if a.class_name in TRAIN_ACTORS]
    groups = list_placement_groups(limit=1000, address=address)
    left += [f"placement group {g.placement_group_id} ({g.state})" for g in groups
             if g.state != "REMOVED"]
    free, total = ray.available_resources().get("CPU", 0.0), ray.cluster_resources()["CPU"]
    if free < total:
        left.append(f"{total - free:g} of {total:g} CPUs held")
    return left


def _wait_clean(address: str, baseline: list[str], timeout_s: float) -> list[str]:
    """Wait until nothing but ``baseline`` is left; returns what is left past it."""
    deadline = time.monotonic() + timeout_s
    while (left := sorted(set(_train_leftovers(address)) - set(baseline))) and \
            time.monotonic() < deadline:
        time.sleep(1)
    return left


@pytest.mark.slow
@pytest.mark.faults
def test_killed_driver_rerun_resumes_without_redoing_an_epoch(
        ray_cluster, s3_server, s3_env, mlflow_env, tmp_path):
    data = prepare_tiny_synthetic(s3_server, tmp_path / "src", BUCKET, n_train=24, n_val=6)
    address = ray_cluster["gcs_address"]
    baseline = _train_leftovers(address)  # what earlier tests left, if anything: not this job's
    env = {**os.environ, "RAY_ADDRESS": address}
    first_summary = tmp_path / "first.json"
    proc = subprocess.Popen(_argv(data, str(first_summary)), env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    deadline = time.monotonic() + 900  # the first checkpoint: ~1 min idle, far more loaded
    while proc.poll() is None and time.monotonic() < deadline and not _snapshot_epoch(s3_server):
        time.sleep(0.5)
    assert proc.poll() is None, proc.communicate()[0][-3000:]
    held = set(_train_leftovers(address)) - set(baseline)  # the job, seen by the check below
    assert {"actor TrainController (ALIVE)", "actor RayTrainWorker (ALIVE)"} <= held, held
    proc.send_signal(signal.SIGKILL)
    out, _ = proc.communicate(timeout=60)
    assert proc.returncode == -signal.SIGKILL and not first_summary.exists(), out[-3000:]

    # The driver's non-detached actors die with it: the controller and the workers go, the
    # placement group is removed (Ray Train's detached cleaner) and every CPU comes back.
    assert not (left := _wait_clean(address, baseline, 180)), left
    resume_at = _snapshot_epoch(s3_server)  # what Ray Train had taken in when it died
    assert resume_at == 1, resume_at

    # The rerun also asks for one epoch more than the killed run (a job is extended by
    # rerunning it with more epochs): it continues the epoch count.
    total = EPOCHS + 1
    summary_path = tmp_path / "rerun.json"
    rerun = subprocess.run(_argv(data, str(summary_path), total), env=env,
                           stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                           timeout=900)
    out = rerun.stdout
    assert rerun.returncode == 0, out[-3000:]
    summary = json.loads(summary_path.read_text())
    assert summary["epochs"] == total and summary["resumed_from_epoch"] == 1, summary
    lines = out.splitlines()
    assert "[wsdan] resuming from the checkpoint of epoch 1: 2 more epoch(s) to train" in lines, \
        out[-3000:]
    # The rerun trains only the epochs after the checkpoint, each once.
    for k, times in ((1, 0), (2, 1), (3, 1)):
        assert sum(ln.startswith(f"[wsdan] epoch {k}/{total}") for ln in lines) == times, \
            out[-3000:]

    from mlflow import MlflowClient

    client = MlflowClient()
    exp = client.get_experiment_by_name("wsdan-tests")
    runs = client.search_runs([exp.experiment_id], f"attributes.run_name = '{NAME}'")
    # One run, continued (its id kept beside the checkpoints), each epoch logged once: the
    # epochs of the killed driver's run that were checkpointed are not logged again.
    assert [r.info.run_id for r in runs] == [summary["run_id"]]
    run = runs[0]
    assert run.data.tags["wsdan.resumed"] == "true"
    for key in ("loss", "val_fused_top1", "epoch"):
        assert sorted(m.step for m in client.get_metric_history(run.info.run_id, key)) == \
            [1, 2, 3], key
    # The rerun's rank 0 restored the centres of epoch 1's checkpoint.
    assert [m.step for m in client.get_metric_history(run.info.run_id,
                                                      "resumed_center_norm")] == [1]
    assert not (left := _wait_clean(address, baseline, 180)), left


@pytest.mark.parametrize(("content", "epoch"), [
    (None, 0),  # a new job
    (json.dumps({"latest_checkpoint_result": None}), 0),  # died before its first checkpoint
    (json.dumps({"latest_checkpoint_result": {"checkpoint_dir_name": "checkpoint_x",
                                              "metrics": {"epoch": 4, "loss": 0.5}}}), 4),
    ("{not json", 0),  # unreadable: Ray Train says so itself when it restores
])
def test_resume_epoch_reads_ray_trains_snapshot(tmp_path, content, epoch):
    from wsdan.launcher import RAY_SNAPSHOT, JobSpec, resume_epoch

    spec = JobSpec(name="job", storage_path=str(tmp_path / "runs"))
    if content is not None:
        (tmp_path / "runs" / "job").mkdir(parents=True)
        (tmp_path / "runs" / "job" / RAY_SNAPSHOT).write_text(content)
    assert resume_epoch(spec) == epoch
