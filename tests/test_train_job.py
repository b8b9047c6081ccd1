"""The distributed training job end to end on the real services (slow).

Generated data prepared into the SeaweedFS bucket, a two-worker Ray Train job (gloo) with
checkpoints in S3, one MLflow run on the MLflow server (artifacts in S3), registration
with the champion rule, a killed worker's restart from the checkpoint, and a clear error for
a class-count mismatch before any cluster work. (Resumption by rerunning the same job name,
extended by an epoch, is in tests/test_driver_kill.py.)
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from jobs import train
from tests.helpers import TINY, prepare_tiny_synthetic
from wsdan.config import ConfigError

pytestmark = pytest.mark.slow

BUCKET = "wsdan-jobs"


@pytest.fixture(scope="module")
def prepared(s3_server, tmp_path_factory):
    """A tiny generated data set (K=3, 64 px) prepared into s3://wsdan-jobs/data."""
    return prepare_tiny_synthetic(s3_server, tmp_path_factory.mktemp("synthetic"), BUCKET,
                                  n_train=48, n_val=18)


def _run(name: str, data: str, *extra: str, register: str | None = None, workers: int = 2):
    argv = ["--config", "jobs/configs/synthetic_cpu.yaml", "--name", name,
            "--storage-path", f"s3://{BUCKET}/runs", "--num-workers", str(workers),
            "--experiment", "wsdan-tests", *TINY, f"data.source={data}", *extra]
    if register:
        argv[4:4] = ["--register-as", register]
    return train.main(train.get_args_parser().parse_args(argv))


def _objects(s3_server, prefix: str) -> list[str]:
    pages = s3_server.client().get_paginator("list_objects_v2").paginate(
        Bucket=BUCKET, Prefix=prefix)
    return [o["Key"] for page in pages for o in page.get("Contents", [])]


def test_two_worker_job_tracks_checkpoints_and_registers(
        prepared, ray_cluster, s3_env, mlflow_env, s3_server):
    import mlflow
    from mlflow.tracking import MlflowClient

    out = _run("job-a", prepared, "optim.epochs=2", register="wsdan-e2e")
    assert out["epochs"] == 2 and 0.0 <= out["val_fused_top1"] <= 1.0
    # Checkpoints in S3, at most keep_checkpoints (2) of them.
    ckpts = {k.split("/")[2] for k in _objects(s3_server, "runs/job-a/")
             if k.split("/")[2].startswith("checkpoint_") and k.count("/") >= 3}  # folders
    assert 1 <= len(ckpts) <= 2
    # Exactly one MLflow run, with per-epoch metrics, params and artifacts.
    client = MlflowClient()
    exp = client.get_experiment_by_name("wsdan-tests")
    runs = client.search_runs([exp.experiment_id], "attributes.run_name = 'job-a'")
    assert len(runs) == 1
    run = runs[0]
    history = client.get_metric_history(run.info.run_id, "val_fused_top1")
    assert [m.step for m in history] == [1, 2]
    assert {"loss", "val_raw_top1", "val_crop_top1", "lr", "images_per_s",
            "data_wait_fraction", "val_attention_hit_rate"} <= set(run.data.metrics)
    assert run.data.params["model.num_attentions"] == "2"
    assert "AWS_SECRET_ACCESS_KEY" not in json.dumps(run.data.params)
    names = {a.path for a in client.list_artifacts(run.info.run_id)}
    assert {"config.yaml", "confusion_matrix.png", "attention"} <= names
    # Registered, and the first version is the champion.
    assert out["registered_version"] == 1 and out["champion"] is True
    model = mlflow.pyfunc.load_model("models:/wsdan-e2e@champion")
    assert model.metadata is not None
    # `wsdan evaluate` on the registered model and on the checkpoint agree on the test split.
    from jobs import evaluate

    args = ["--data", prepared, "--split", "test"]
    by_alias = evaluate.main(evaluate.get_args_parser().parse_args(
        ["--model", "models:/wsdan-e2e@champion", *args]))
    assert by_alias["n"] == 6 and 0.0 <= by_alias["fused_top1"] <= 1.0
    ckpt = sorted(ckpts)[-1]
    by_ckpt = evaluate.main(evaluate.get_args_parser().parse_args(
        ["--model", f"s3://{BUCKET}/runs/job-a/{ckpt}", *args]))
    assert by_ckpt["n"] == 6 and by_ckpt["skipped"] == 0
    # Read by Ray Data on the cluster (--ray) or in this process (the default): the same.
    by_ray = evaluate.main(evaluate.get_args_parser().parse_args(
        ["--model", f"s3://{BUCKET}/runs/job-a/{ckpt}", *args, "--ray"]))
    assert by_ray == pytest.approx(by_ckpt)
    # Evaluating on one machine needs no Ray at all: a RAY_ADDRESS where nothing answers
    # (a stack started with --no-ray) does not matter.
    import os
    import subprocess
    import sys

    done = subprocess.run(
        [sys.executable, "-m", "jobs.evaluate", "--model", f"s3://{BUCKET}/runs/job-a/{ckpt}",
         *args], env={**os.environ, "RAY_ADDRESS": "127.0.0.1:9"}, capture_output=True,
        text=True, timeout=300)
    assert done.returncode == 0, (done.stdout + done.stderr)[-3000:]
    assert json.loads(done.stdout.splitlines()[-1]) == pytest.approx(by_ckpt)
    # Artifacts went to the S3 bucket behind the MLflow server.
    assert _objects(s3_server, "") is not None


def test_class_count_mismatch_fails_before_cluster_work(prepared, s3_env, tmp_path):
    with pytest.raises(ConfigError, match=r"model\.num_classes is 5 .* has 3 classes"):
        train.main(train.get_args_parser().parse_args(
            ["--config", "jobs/configs/synthetic_cpu.yaml", "--storage-path", str(tmp_path),
             *TINY, "model.num_classes=5", f"data.source={prepared}"]))
    with pytest.raises(Exception, match="dataset.json"):
        train.main(train.get_args_parser().parse_args(
            ["--config", "jobs/configs/synthetic_cpu.yaml", "--storage-path", str(tmp_path),
             *TINY, f"data.source=s3://{BUCKET}/nothing-here"]))


def _job_argv(name: str, data: str, *extra: str) -> list[str]:
    return ["-m", "jobs.train", "--config", "jobs/configs/synthetic_cpu.yaml", "--name", name,
            "--storage-path", f"s3://{BUCKET}/runs", "--num-workers", "2",
            "--experiment", "wsdan-tests", *TINY, f"data.source={data}", *extra]


@pytest.mark.faults
def test_killed_worker_restarts_from_checkpoint(prepared, ray_cluster, s3_env, mlflow_env,
                                                s3_server, tmp_path):
    """A separate driver process runs a 3-epoch job on the session cluster; once the first
    checkpoint is in S3, one training worker is SIGKILLed; the job restarts the worker group
    from that checkpoint (FailureConfig) and finishes all 3 epochs."""
    import os
    import subprocess
    import sys
    import time

    import psutil
    from ray.util.state import list_actors

    env = {**os.environ, "RAY_ADDRESS": ray_cluster["gcs_address"]}
    summary_path = tmp_path / "summary.json"
    proc = subprocess.Popen([sys.executable, *_job_argv("job-kill", prepared, "optim.epochs=3",
                                                        "--summary-json", str(summary_path))],
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    killed = None
    deadline = time.monotonic() + 900  # the first checkpoint: ~1 min idle, far more loaded
    while killed is None and time.monotonic() < deadline and proc.poll() is None:
        if any("checkpoint_" in k and k.endswith(".pt") for k in
               _objects(s3_server, "runs/job-kill/")):
            # This session's workers only (other Rays may train on the machine): by the
            # State API of the session's cluster.
            workers = list_actors(filters=[("class_name", "=", "RayTrainWorker"),
                                           ("state", "=", "ALIVE")],
                                  address=ray_cluster["gcs_address"])
            if workers:
                killed = workers[0].pid
                psutil.Process(killed).kill()
        time.sleep(0.5)
    out, _ = proc.communicate(timeout=600)
    assert killed is not None, out[-3000:]
    assert proc.returncode == 0, out[-3000:]
    # The summary file, not the output's last line: Ray forwards worker log lines
    # asynchronously, and they may come after it.
    summary = json.loads(summary_path.read_text())
    assert summary["epochs"] == 3
    # What the person who started it saw: each epoch's line once (the driver prints them;
    # the workers' own output stays in Ray's logs), an epoch redone after the kill marked as
    # such, then what happened and where to look.
    lines = out.splitlines()
    for k in (1, 2, 3):
        assert sum(ln.startswith(f"[wsdan] epoch {k}/3 |") for ln in lines) == 1, out[-3000:]
    again = [ln for ln in lines if "(again, after a restart)" in ln]
    assert all(ln.startswith(("[wsdan] epoch 1/3 (again", "[wsdan] epoch 2/3 (again"))
               for ln in again), out[-3000:]
    assert any(ln.startswith("[wsdan] done: 3 epochs in ") for ln in lines), out[-3000:]
    assert any("MLflow run:    http://127.0.0.1:" in ln and ln.endswith(f"/runs/{summary['run_id']}")
               for ln in lines), out[-3000:]
    assert "(RayTrainWorker" not in out  # no forwarded worker log lines by default
    from mlflow import MlflowClient

    logged = MlflowClient().download_artifacts(summary["run_id"], "summary.json", str(tmp_path))
    assert json.loads(Path(logged).read_text()) == summary
    assert not psutil.pid_exists(killed) or psutil.Process(killed).status() == "zombie"


# `ray job submit` of this job, with its runtime_env and the secret scan, is tested on a
# multi-node cluster in tests/multinode; the sweep's is in tests/tuning.
