"""Faults during a job: the S3 server and the MLflow server going away and coming back.

- One S3 retry policy (``wsdan.storage``): what the AWS SDK under pyarrow retries (5xx, no
  connection) and what it does not (4xx), counted against a loopback HTTP endpoint; the
  policy travels with the file system when Ray pickles it; boto3 gets the same attempts.
- MLflow down at the start of a job: one clear line and exit code 2, before any work.
- Rank 0's MLflow logger (``wsdan.tracking.sender.RankZeroLogger``): it never waits for the
  server, keeps what the server has not taken (also in the checkpoint), delivers it in
  order, repeats nothing on resume, and drops only what the server refuses for good.
- One real job on the session's S3 server, MLflow server and Ray: S3 killed for ~10 s
  after the first checkpoint (while the job reads epoch 2 and, alongside it, while Ray
  Train's own code persists a checkpoint and the test reads a split), MLflow stopped from
  then until the third checkpoint is stored. The job finishes, no epoch is redone, every
  image of every epoch is counted once, and every epoch's metrics are in the run.
"""

from __future__ import annotations

import http.server
import json
import os
import pickle
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from tests.helpers import TINY, prepare_tiny_synthetic

BUCKET = "wsdan-faults"
SECRET = "faults-secret-never-pickled-0123456789"
N_TRAIN, N_VAL = 48, 18  # 48 = 3 steps of 2 workers x 8: every train image is used


def _closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture
def fake_aws(monkeypatch):
    monkeypatch.delenv("AWS_ENDPOINT_URL_S3", raising=False)
    monkeypatch.delenv("WSDAN_S3_RETRIES", raising=False)
    monkeypatch.setenv("AWS_ENDPOINT_URL", f"http://127.0.0.1:{_closed_port()}")
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "faults-key-id")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", SECRET)
    monkeypatch.setenv("AWS_DEFAULT_REGION", "us-east-1")


# -- the S3 retry policy ---------------------------------------------------------------------


def test_one_s3_retry_policy_travels_with_the_file_system(fake_aws, monkeypatch):
    from wsdan import storage
    from wsdan.services.mlflow_server import MlflowServerConfig
    from wsdan.services.s3_access import boto_retries, s3_client

    fs, path = storage.filesystem_and_path("s3://bucket/runs/job/checkpoint_000001")
    assert isinstance(fs, storage.RetryingS3FileSystem) and fs.retries == storage.S3_RETRIES
    assert path == "bucket/runs/job/checkpoint_000001"
    blob = pickle.dumps(fs)  # what Ray ships to read tasks and Train workers
    assert SECRET.encode() not in blob
    shipped = pickle.loads(blob)
    assert type(shipped) is storage.RetryingS3FileSystem and shipped.retries == 10
    assert shipped.equals(fs)  # same endpoint, scheme and timeouts
    # boto3: the standard mode, the same number of requests (the first and 10 retries).
    assert boto_retries() == {"mode": "standard", "total_max_attempts": 11}
    client = s3_client(os.environ["AWS_ENDPOINT_URL"], "k", "s")
    assert client.meta.config.retries == {"mode": "standard", "total_max_attempts": 11}
    assert MlflowServerConfig(data_dir=Path("/nonexistent"), port=1,
                              artifacts_destination="s3://b/a",
                              s3_endpoint="http://127.0.0.1:1").env(base={}).get(
        "AWS_MAX_ATTEMPTS") == "11"
    # Set once, by one variable, which travels too.
    monkeypatch.setenv("WSDAN_S3_RETRIES", "3")
    fs3, _ = storage.filesystem_and_path("s3://bucket/key")
    assert pickle.loads(pickle.dumps(fs3)).retries == 3
    assert boto_retries()["total_max_attempts"] == 4
    monkeypatch.setenv("WSDAN_S3_RETRIES", "lots")
    with pytest.raises(ValueError, match="WSDAN_S3_RETRIES='lots'"):
        storage.filesystem_and_path("s3://bucket/key")


class _Answer(http.server.BaseHTTPRequestHandler):
    def _answer(self) -> None:
        self.server.requests.append(self.command)  # type: ignore[attr-defined]
        self.send_response(self.server.status)  # type: ignore[attr-defined]
        self.send_header("Content-Length", "0")
        self.end_headers()

    do_HEAD = do_GET = do_PUT = do_POST = _answer

    def log_message(self, *args) -> None:
        pass


@pytest.mark.parametrize("status,requests", [(503, 4), (500, 4), (403, 1), (400, 1)])
def test_sdk_retries_server_errors_not_client_errors(fake_aws, status, requests):
    """What the AWS SDK classifies as retryable decides, no error text: a 5xx is asked
    again (1 + 3 retries here), a 4xx is not. An HTTP endpoint that answers every request
    with ``status`` counts them."""
    from wsdan.storage import RetryingS3FileSystem

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Answer)
    server.status, server.requests = status, []
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        fs = RetryingS3FileSystem(retries=3, endpoint_override=f"127.0.0.1:{server.server_port}",
                                  scheme="http")
        with pytest.raises(OSError, match=f"HeadObject|{status}"):
            fs.get_file_info("bucket/key")
    finally:
        server.shutdown()
        server.server_close()
    assert server.requests == ["HEAD"] * requests


# -- MLflow at the start of a job ------------------------------------------------------------


def test_mlflow_down_at_start_is_one_clear_line_before_any_work(monkeypatch, tmp_path, capsys):
    from jobs import train
    from wsdan import cluster
    from wsdan.cli import run_main

    uri = f"http://127.0.0.1:{_closed_port()}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    connected: list[bool] = []  # Ray may already run in this test session: watch the call
    monkeypatch.setattr(cluster, "connect", lambda **kw: connected.append(True))
    storage_path = tmp_path / "runs"
    # The data set does not exist either: the tracking server is checked first, and the
    # data would be read next; Ray is never started.
    code = run_main(train.main, train.get_args_parser(), [
        "--config", "jobs/configs/synthetic_cpu.yaml", "--storage-path", str(storage_path),
        *TINY, f"data.source={tmp_path / 'no-data'}"])
    err = capsys.readouterr().err
    assert code == 2
    assert err.count("\n") == 1 and err.startswith(
        f"error: MLFLOW_TRACKING_URI={uri}: no MLflow tracking server answers there "
        "(Connection refused). Start it")
    assert not storage_path.exists() and not connected


# -- rank 0's MLflow logger ------------------------------------------------------------------


@pytest.fixture
def worker_mlflow_env(monkeypatch):
    """The MLflow client settings the logger gives rank 0's process (restored afterwards)."""
    from wsdan.tracking.sender import MLFLOW_WORKER_ENV

    for name, value in MLFLOW_WORKER_ENV.items():
        monkeypatch.setenv(name, value)


def test_logger_keeps_what_a_down_server_did_not_take(worker_mlflow_env, capsys):
    """Nothing answers at the tracking URI: every call returns (training goes on), the
    epochs stay listed for the checkpoint in order, the sender keeps trying, and the end
    of training says which epochs were not delivered and where they are kept."""
    from wsdan.tracking.sender import RankZeroLogger

    uri = f"http://127.0.0.1:{_closed_port()}"
    logger = RankZeroLogger({"tracking_uri": uri, "run_id": "0123abcd"})
    for epoch in (1, 2, 3):
        logger.log_epoch({"loss": 1.0 / epoch, "epoch": epoch, "not_a_number": float("nan"),
                          "label": "skipped"}, epoch)
    logger.log_value("resumed_center_norm", 2.5, 3)
    assert logger.unlogged() == [{"epoch": e, "metrics": {"loss": 1.0 / e, "epoch": float(e)}}
                                 for e in (1, 2, 3)]
    deadline = time.monotonic() + 60
    while logger.failures < 2 and time.monotonic() < deadline:
        time.sleep(0.2)
    assert logger.failures >= 2 and logger.delivered == 0  # retried, not dropped
    assert logger.close(timeout_s=0.5) is False
    out = capsys.readouterr().out
    assert f"the MLflow server at {uri} cannot take what rank 0 logs" in out
    assert "epoch(s) [1, 2, 3] are kept in the job's last checkpoint" in out
    assert [e["epoch"] for e in logger.unlogged()] == [1, 2, 3]


def _http_error(status: int):
    import requests

    response = requests.Response()
    response.status_code = status
    return requests.HTTPError(f"{status}", response=response)


def test_what_the_logger_retries():
    """Decided by type and status code, no error text: no answer, 5xx and 429 are retried;
    another 4xx (no such run, forbidden) or a non-I/O error (a bug) is not."""
    import requests
    from mlflow.exceptions import MlflowException
    from mlflow.protos.databricks_pb2 import (
        INTERNAL_ERROR,
        PERMISSION_DENIED,
        REQUEST_LIMIT_EXCEEDED,
        RESOURCE_DOES_NOT_EXIST,
        TEMPORARILY_UNAVAILABLE,
    )

    from wsdan.tracking.sender import is_permanent

    transient = [requests.ConnectionError("refused"), requests.Timeout("slow"), _http_error(503),
                 _http_error(429), MlflowException("x", error_code=INTERNAL_ERROR),
                 MlflowException("x", error_code=TEMPORARILY_UNAVAILABLE),
                 MlflowException("x", error_code=REQUEST_LIMIT_EXCEEDED)]
    permanent = [_http_error(403), MlflowException("x", error_code=RESOURCE_DOES_NOT_EXIST),
                 MlflowException("x", error_code=PERMISSION_DENIED), TypeError("a bug")]
    assert [is_permanent(e) for e in transient] == [False] * len(transient)
    assert [is_permanent(e) for e in permanent] == [True] * len(permanent)


@pytest.mark.slow
def test_logger_delivers_in_order_and_repeats_nothing_on_resume(worker_mlflow_env, mlflow_env,
                                                                capsys):
    """The session's MLflow server: epochs arrive with their steps; a resumed job sends only
    the epochs the run lacks; an item the server refuses for good (no such run) is
    reported and dropped, and the queue behind it still goes through."""
    from mlflow.tracking import MlflowClient

    from wsdan.tracking.sender import RankZeroLogger

    uri = mlflow_env
    client = MlflowClient(uri)
    exp = client.get_experiment_by_name("wsdan-faults")
    exp_id = exp.experiment_id if exp else client.create_experiment("wsdan-faults")
    run_id = client.create_run(exp_id).info.run_id
    logger = RankZeroLogger({"tracking_uri": uri, "run_id": run_id})
    for epoch in (1, 2):
        logger.log_epoch({"loss": 1.0 / epoch, "epoch": epoch}, epoch)
    assert logger.close(timeout_s=120) is True and logger.unlogged() == []
    # A resumed job: epoch 2 is in the run already, epoch 3 (its checkpoint's) is not.
    resumed = RankZeroLogger({"tracking_uri": uri, "run_id": run_id})
    resumed.ensure_logged({2: {"loss": 0.5, "epoch": 2.0}, 3: {"loss": 0.25, "epoch": 3.0}})
    assert resumed.close(timeout_s=120) is True
    history = client.get_metric_history(run_id, "loss")
    assert [(m.step, m.value) for m in history] == [(1, 1.0), (2, 0.5), (3, 0.25)]
    assert [m.step for m in client.get_metric_history(run_id, "epoch")] == [1, 2, 3]
    # A run that does not exist: refused for good, reported, not retried for ever.
    gone = RankZeroLogger({"tracking_uri": uri, "run_id": "f" * 32})
    gone.log_epoch({"loss": 9.0, "epoch": 4}, 4)
    gone.log_epoch({"loss": 8.0, "epoch": 5}, 5)
    assert gone.close(timeout_s=120) is True
    assert gone.dropped == ["metrics of epoch 4", "metrics of epoch 5"]
    assert gone.failures == 0 and gone.unlogged() == []
    assert "MLflow refused the metrics of epoch 4" in capsys.readouterr().out


# -- one job through both outages (real services) -------------------------------------------


@pytest.fixture(scope="module")
def prepared(s3_server, tmp_path_factory):
    return prepare_tiny_synthetic(s3_server, tmp_path_factory.mktemp("faults-data"), BUCKET,
                                  n_train=N_TRAIN, n_val=N_VAL)


def _objects(s3_server, prefix: str) -> list[str]:
    try:
        pages = s3_server.client().get_paginator("list_objects_v2").paginate(
            Bucket=BUCKET, Prefix=prefix)
        return [o["Key"] for page in pages for o in page.get("Contents", [])]
    except Exception:  # noqa: BLE001 - the server is being restarted
        return []


def _wait_for(what, deadline: float, proc: subprocess.Popen) -> bool:
    while time.monotonic() < deadline and proc.poll() is None:
        if what():
            return True
        time.sleep(0.2)
    return what()


@pytest.mark.slow
@pytest.mark.faults
def test_job_rides_out_s3_and_mlflow_outages(prepared, ray_cluster, s3_env, mlflow_env,
                                             s3_server, mlflow_server, tmp_path):
    import ray
    from mlflow import MlflowClient
    from ray.train import Checkpoint
    from ray.train.v2._internal.execution.storage import StorageContext

    from wsdan import storage
    from wsdan.config import ConfigError, DataConfig
    from wsdan.data.pipeline import build_dataset, iter_torch
    from wsdan.launcher import check_tracking_server

    name = "job-faults"
    summary_path = tmp_path / "summary.json"
    log_path = tmp_path / "job.log"
    env = {**os.environ, "RAY_ADDRESS": ray_cluster["gcs_address"]}
    argv = [sys.executable, "-m", "jobs.train", "--config", "jobs/configs/synthetic_cpu.yaml",
            "--name", name, "--storage-path", f"s3://{BUCKET}/runs", "--num-workers", "2",
            "--experiment", "wsdan-tests", "--summary-json", str(summary_path), "--verbose",
            *TINY, f"data.source={prepared}", "optim.epochs=3"]
    # Prepared while S3 is up: a val split to read and a Ray Train storage context (the file
    # system the launcher gives Ray Train) to persist a checkpoint through, both in the
    # outage.
    val = build_dataset(prepared, "val", cfg=DataConfig(image_size=40, resize_size=48),
                        train=False)
    fs, path = storage.filesystem_and_path(f"s3://{BUCKET}/runs")
    context = StorageContext(path, "outage-checkpoint", storage_filesystem=fs)
    ckpt_dir = tmp_path / "ckpt"
    ckpt_dir.mkdir()
    payload = os.urandom(12 << 20)  # 12 MiB: a multipart upload
    (ckpt_dir / "state.pt").write_bytes(payload)

    @ray.remote(num_cpus=0)
    def persist(ctx, directory: str) -> tuple[str, int]:
        ctx.persist_current_checkpoint(Checkpoint.from_directory(directory), "checkpoint_x")
        return type(ctx.storage_filesystem).__name__, ctx.storage_filesystem.retries

    seen: set[str] = set()  # checkpoint folders stored so far (older ones get deleted)

    def ckpt(k: int):
        def stored() -> bool:
            seen.update(key.split("/")[2] for key in _objects(s3_server, f"runs/{name}/")
                        if key.split("/")[2].startswith("checkpoint_") and key.endswith(".pt"))
            return len(seen) >= k + 1
        return stored

    figures: dict[str, float] = {}
    with open(log_path, "w") as log:
        proc = subprocess.Popen(argv, env=env, stdout=log, stderr=subprocess.STDOUT)
    try:
        # 1. S3 killed once epoch 1's checkpoint is stored: epoch 2's reads (and Ray
        #    Train's records of it) meet no server for 10 s, then one on the same ports
        #    with the same data. MLflow is stopped in that time too: epoch 2 cannot end
        #    (its val reads and checkpoint need S3) before it is down, so epoch 2's metrics
        #    are logged while it is down, and so are epoch 3's: it comes back only once
        #    epoch 3's checkpoint is stored.
        assert _wait_for(ckpt(0), time.monotonic() + 900, proc), log_path.read_text()[-3000:]
        s3_server.stop(timeout=0)
        down = time.monotonic()
        uploaded = persist.remote(context, str(ckpt_dir))
        ids: list[str] = []
        reader = threading.Thread(target=lambda: ids.extend(
            i for b in iter_torch(val, 8, with_ids=True) for i in b["image_id"]))
        reader.start()
        mlflow_server.stop()
        stopped = time.monotonic()
        stopped_ms = time.time() * 1000
        with pytest.raises(ConfigError, match=f"MLFLOW_TRACKING_URI={mlflow_server.tracking_uri}"
                                              ": no MLflow tracking server answers there"):
            check_tracking_server(mlflow_server.tracking_uri)  # a job started now: refused
        time.sleep(max(0.0, 10 - (time.monotonic() - down)))
        s3_server.start()
        figures["s3_unavailable_s"] = time.monotonic() - down
        reader.join(timeout=300)
        fs_type, retries = ray.get(uploaded, timeout=300)
        # 2. MLflow started again once epoch 3's checkpoint is stored.
        assert _wait_for(ckpt(2), time.monotonic() + 600, proc), log_path.read_text()[-3000:]
        mlflow_server.start(timeout=300)
        figures["mlflow_unavailable_s"] = time.monotonic() - stopped
        back_ms = time.time() * 1000
        proc.wait(timeout=600)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        s3_server.start()  # the session's servers stay up for the tests after this one
        mlflow_server.start(timeout=300)
    out = log_path.read_text()
    assert proc.returncode == 0, out[-3000:]

    # The checkpoint persisted by Ray Train's code on a Ray worker during the S3 outage: the
    # file system arrived there with the policy, and the upload completed, byte for byte.
    assert (fs_type, retries) == ("RetryingS3FileSystem", storage.S3_RETRIES)
    stored = storage.read_bytes(f"s3://{BUCKET}/runs/outage-checkpoint/checkpoint_x/state.pt")
    assert stored == payload
    # The split read during the outage: every image once.
    assert len(ids) == N_VAL and len(set(ids)) == N_VAL

    # The job: 3 epochs, none redone (no worker-group restart), every train image counted
    # once per epoch and every val image evaluated once per epoch.
    summary = json.loads(summary_path.read_text())
    assert summary["epochs"] == 3
    assert "(again, after a restart)" not in out
    client = MlflowClient()
    run_id = summary["run_id"]
    history = {key: client.get_metric_history(run_id, key)
               for key in ("epoch", "train_images", "val_n", "loss", "val_fused_top1")}
    for key, points in history.items():
        assert sorted(m.step for m in points) == [1, 2, 3], (key, points)
    assert [m.value for m in sorted(history["train_images"], key=lambda m: m.step)] == [N_TRAIN] * 3
    assert [m.value for m in sorted(history["val_n"], key=lambda m: m.step)] == [N_VAL] * 3
    # Epochs 2 and 3 were logged while MLflow was down (a metric's time is when rank 0
    # logged it), kept, and sent once it was back; and rank 0 said so.
    logged_ms = {m.step: m.timestamp for m in history["epoch"]}
    assert stopped_ms <= logged_ms[2] <= back_ms and stopped_ms <= logged_ms[3]
    assert "cannot take what rank 0 logs" in out and "takes it again after" in out
    artifacts = {a.path for a in client.list_artifacts(run_id, "attention")}
    assert {"attention/epoch_001.png", "attention/epoch_003.png"} <= artifacts
    figures.update({f"epoch_time_s.{m.step}": m.value
                    for m in client.get_metric_history(run_id, "epoch_time_s")})
    print(f"[faults] {json.dumps({k: round(v, 1) for k, v in figures.items()})}")
