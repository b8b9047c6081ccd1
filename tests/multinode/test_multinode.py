"""The training job on a real multi-node Ray cluster (head + two worker nodes, see conftest):
submitted with `ray job submit`, data from S3, checkpoints to s3://, one MLflow run, a
registered model; workers on different nodes with identical replicas; a worker node killed
after the first checkpoint and the job finishing from it on the node that is left; local
paths refused before any work. (One job does all of it: each job costs minutes here.) And the
resource wait of an autoscaling cluster, with this test playing the autoscaler: a node that
fits joins while the driver waits, or none does and the wait times out."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import pytest

from tests.helpers import TINY, aws_environ, prepare_tiny_synthetic

pytestmark = [pytest.mark.slow, pytest.mark.multinode]

BUCKET = "wsdan-multinode"
RAY = str(Path(sys.executable).with_name("ray"))


@pytest.fixture(scope="module")
def data(s3_server, tmp_path_factory) -> str:
    """A tiny generated data set (K=3, 64 px) prepared into s3://wsdan-multinode/data."""
    return prepare_tiny_synthetic(s3_server, tmp_path_factory.mktemp("synthetic"), BUCKET,
                                  n_train=96, n_val=24)


def _train_argv(name: str, data: str, *extra: str) -> list[str]:
    return ["python", "-m", "jobs.train", "--config", "jobs/configs/synthetic_cpu.yaml",
            "--name", name, "--storage-path", f"s3://{BUCKET}/runs", "--num-workers", "2",
            "--summary-json", f"s3://{BUCKET}/summaries/{name}.json",
            "--placement", "SPREAD", "--experiment", "wsdan-multinode", *TINY,
            f"data.source={data}", *extra]


def _submit(cluster, runtime_env: dict, argv: list[str]) -> str:
    from wsdan.services.ray_head import ray_env

    cmd = [RAY, "job", "submit", "--address", cluster.dashboard_url, "--working-dir", ".",
           "--no-wait", "--runtime-env-json", json.dumps(runtime_env), "--", *argv]
    done = subprocess.run(cmd, env=ray_env(), capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, (done.stdout + done.stderr)[-3000:]
    import re

    return re.search(r"raysubmit_\w+", done.stdout + done.stderr).group(0)


def _wait(cluster, job_id: str, timeout: float = 600) -> tuple[str, str]:
    from ray.job_submission import JobStatus, JobSubmissionClient

    client = JobSubmissionClient(cluster.dashboard_url)
    deadline = time.monotonic() + timeout
    while (status := client.get_job_status(job_id)) not in (
            JobStatus.SUCCEEDED, JobStatus.FAILED, JobStatus.STOPPED):
        assert time.monotonic() < deadline, f"job {job_id} still {status} after {timeout}s"
        time.sleep(2)
    return status, client.get_job_logs(job_id)


def _summary(s3_server, name: str) -> dict:
    """The job's --summary-json, written to S3 by the driver (not the logs' last line, which
    Ray's forwarded worker log lines can follow)."""
    body = s3_server.client().get_object(Bucket=BUCKET, Key=f"summaries/{name}.json")["Body"]
    return json.loads(body.read())


def _alive_nodes(cluster) -> dict[str, dict]:
    import urllib.request

    with urllib.request.urlopen(f"{cluster.dashboard_url}/api/v0/nodes?limit=100") as r:
        nodes = json.loads(r.read())["data"]["result"]["result"]
    return {n["node_id"]: n for n in nodes if n["state"] == "ALIVE"}


def test_job_spreads_over_nodes_survives_a_node_loss_and_registers(
        multinode_cluster, data, job_runtime_env, mlflow_env, s3_server):
    """One submitted job, 3 epochs, workers SPREAD over the two worker nodes (the head has
    no CPUs). Once epoch 1's checkpoint is in S3 (recording each rank's node and a digest of
    its weights and centres), worker node w2's raylet is SIGKILLed: a node crash. Ray Train
    restarts the worker group on w1 from that checkpoint and the job finishes: every epoch
    logged once to one MLflow run, the centres restored (not reset), replicas identical, a
    registered model, and no key value in the logs, params or tags."""
    import io

    import torch
    from mlflow import MlflowClient

    from wsdan import storage

    epochs = 3
    job = _submit(multinode_cluster, job_runtime_env,
                  _train_argv("mn-job", data, f"optim.epochs={epochs}",
                              "--register-as", "wsdan-mn"))
    nodes = _alive_nodes(multinode_cluster)
    node_of = {name: nid for nid, n in nodes.items() for name in ("w1", "w2")
               if f"wsdan_node_{name}" in n["resources_total"]}
    assert len(node_of) == 2
    victim = multinode_cluster.workers[1]
    deadline = time.monotonic() + 900  # start-up and one epoch: ~1 min idle, far more loaded
    first = None
    while first is None and time.monotonic() < deadline:
        keys = [o["Key"] for o in s3_server.client().list_objects_v2(
            Bucket=BUCKET, Prefix="runs/mn-job/").get("Contents", [])]
        done = [k for k in keys if k.endswith("state.pt")]
        if done:
            raylet = victim.raylet()
            assert raylet is not None
            raylet.kill()
            with aws_environ(s3_server):
                first = torch.load(io.BytesIO(storage.read_bytes(f"s3://{BUCKET}/{done[0]}")),
                                   weights_only=True, map_location="cpu")
        time.sleep(0.5)
    assert first is not None, "no checkpoint within 900 s"
    # Before the loss: one worker on each worker node, the same model on both.
    assert sorted(first["worker_nodes"]) == sorted(node_of.values())
    assert len(set(first["replica_digests"])) == 1
    status, logs = _wait(multinode_cluster, job)
    assert status == "SUCCEEDED", logs[-5000:]
    out = _summary(s3_server, "mn-job")
    assert out["epochs"] == epochs
    # Both ranks on the nodes left: w1 (and any node another test added), never the lost w2.
    alive = _alive_nodes(multinode_cluster)
    where = f"ranks on {out['worker_nodes']}; w1/w2 = {node_of}; alive now: {sorted(alive)}"
    assert len(out["worker_nodes"]) == 2 and node_of["w2"] not in out["worker_nodes"], where
    assert set(out["worker_nodes"]) <= set(alive), where
    assert out["replicas_identical"] is True
    client = MlflowClient()
    exp = client.get_experiment_by_name("wsdan-multinode")
    runs = client.search_runs([exp.experiment_id], "attributes.run_name = 'mn-job'")
    assert len(runs) == 1 and runs[0].info.run_id == out["run_id"]
    history = client.get_metric_history(out["run_id"], "epoch")
    assert sorted(m.step for m in history) == list(range(1, epochs + 1))  # each once
    resumed = client.get_metric_history(out["run_id"], "resumed_center_norm")
    assert resumed, "the job did not resume from a checkpoint: " + logs[-3000:]
    norms = {m.step: m.value for m in client.get_metric_history(out["run_id"], "center_norm")}
    for r in resumed:
        assert r.value > 0 and r.value == pytest.approx(norms[r.step], rel=1e-6)
    assert out["registered_version"] == 1
    assert client.get_model_version("wsdan-mn", "1").run_id == out["run_id"]
    secret = s3_server.config.secret_key
    for text in (logs, json.dumps(runs[0].data.params), json.dumps(runs[0].data.tags)):
        assert secret not in text


def test_local_paths_are_refused_on_a_multi_node_cluster(multinode_cluster, data, tmp_path,
                                                         s3_env):
    """A driver on this machine, connected to the cluster: local storage, weights, data and
    tracking store are each named, with what to use instead, before any work (exit 2)."""
    from wsdan.services.ray_head import ray_env

    env = ray_env(multi_node=True)
    env.update({"RAY_ADDRESS": multinode_cluster.address, "MLFLOW_TRACKING_URI":
                f"sqlite:///{tmp_path}/mlflow.db"})
    local_data = tmp_path / "data"
    local_data.mkdir()
    weights = tmp_path / "w.pt"
    weights.write_bytes(b"")
    argv = [sys.executable, "-m", "jobs.train", "--config", "jobs/configs/synthetic_cpu.yaml",
            "--storage-path", str(tmp_path / "runs"), *TINY, f"model.weights={weights}",
            f"data.source={data}"]
    done = subprocess.run(argv, env=env, capture_output=True, text=True, timeout=180)
    assert done.returncode == 2, done.stdout[-2000:] + done.stderr[-2000:]
    err = done.stderr
    # 2 or 3 nodes: the node-loss test before this one may have taken w2 down.
    assert re.search(r"this Ray cluster has [23] nodes", err), err[-2000:]
    for what in ("--storage-path", "model.weights", "MLflow tracking URI", "s3://",
                 "--shared-filesystem"):
        assert what in err
    assert not (tmp_path / "runs").exists()  # nothing written


@pytest.fixture
def driver(multinode_cluster, monkeypatch):
    """This process as a driver of the cluster, connected as the jobs connect
    (``wsdan.cluster.connect`` with RAY_ADDRESS), and disconnected after the test, so that
    no test depends on another's connection."""
    import ray

    from wsdan.cluster import connect

    if ray.is_initialized():
        pytest.skip("this process is already a driver of another Ray cluster")
    monkeypatch.setenv("RAY_ADDRESS", multinode_cluster.address)
    connect()
    try:
        yield multinode_cluster
    finally:
        ray.shutdown()


def _recording_request(asked: list):
    """What ``wait_for_resources`` does by default (the autoscaler SDK's request_resources),
    recording what reached the cluster: the request as the head's GCS stores it for Ray's v1
    autoscaler (this cluster has no autoscaler: the test plays its part)."""
    from ray._private.ray_constants import AUTOSCALER_RESOURCE_REQUEST_CHANNEL
    from ray.autoscaler.sdk import request_resources
    from ray.experimental.internal_kv import _internal_kv_get

    def request(bundles: list[dict[str, float]]) -> None:
        request_resources(bundles=bundles)
        asked.append(json.loads(_internal_kv_get(AUTOSCALER_RESOURCE_REQUEST_CHANNEL)))

    return request


def _describe():
    from wsdan.cluster import describe_cluster

    return describe_cluster(autoscaling=True)  # as with --autoscaling-cluster (v1 autoscaler)


def test_resource_wait_returns_once_a_node_that_fits_joins(driver):
    """A worker of 4 CPUs (plus 1 for Ray Data) fits none of the nodes (the head has none,
    w1 and w2 have 3 each, w2 may be down), though they hold 6 CPUs in all: the driver asks
    for the bundles and waits. A few seconds later a node of 4 CPUs (w3, its own `ray start`)
    joins, as an autoscaler would add it; the wait returns once it is in, and withdraws its
    request."""
    from wsdan.cluster import wait_for_resources
    from wsdan.services import find_free_ports
    from wsdan.services.ray_head import RayWorker, RayWorkerConfig, without_job_settings

    bundles = [{"CPU": 4.0}, {"CPU": 1.0}]
    assert not any(n.get("CPU", 0.0) >= 4 for n in _describe().nodes)
    agent, metrics = find_free_ports(2)
    root = Path(tempfile.mkdtemp(prefix="wsdan-mn-w3-", dir="/tmp"))
    w3 = RayWorker(RayWorkerConfig(
        head=driver.head.config, name="w3", temp_dir=root, num_cpus=4,
        dashboard_agent_listen_port=agent, metrics_export_port=metrics,
        min_worker_port=22400, max_worker_port=22599))  # w1, w2: 22000-22399
    started, errors = [], []

    def scale_up() -> None:
        time.sleep(3)
        started.append(time.monotonic())
        try:
            w3.start(environ=without_job_settings(), timeout=300)
        except Exception as e:  # reported by the test below
            errors.append(e)

    asked, notes = [], []
    adder = threading.Thread(target=scale_up, daemon=True)
    try:
        adder.start()
        wait_for_resources(bundles, what="1 job of 1 worker (4 CPU per worker, 1 CPU for Ray "
                           "Data)", timeout_s=300, describe=_describe,
                           request=_recording_request(asked), log=notes.append, poll_s=1)
        returned = time.monotonic()
        adder.join(timeout=300)
        assert not errors, errors
        assert started and returned > started[0]  # it waited for the node
        assert asked == [bundles, []]  # asked for the bundles, then withdrew the ask
        assert "waiting up to 300s" in notes[0] and "4 CPU + 1 CPU, each on one node" in notes[0]
        assert "cluster ready" in notes[-1] and "1 with 4 CPU" in notes[-1], notes
        assert any(n.get("wsdan_node_w3") and n.get("CPU") == 4.0 for n in _describe().nodes)
    finally:
        adder.join(timeout=300)
        w3.stop()
        # Gone from the cluster before the next test counts its nodes.
        deadline = time.monotonic() + 60
        while w3.alive() and time.monotonic() < deadline:
            time.sleep(0.5)
        shutil.rmtree(root, ignore_errors=True)
    assert not w3.alive(), "node w3 still listed as alive 60 s after it was stopped"


def test_resource_wait_times_out_naming_what_it_waited_for(driver):
    """Nothing joins: after the timeout the error names the flag, the job, the bundles it
    waited for, the time and the nodes there are, and withdraws the request."""
    from wsdan.cluster import wait_for_resources
    from wsdan.config import ConfigError

    bundles = [{"CPU": 8.0}]  # no node here has 8 CPUs, and this test adds none
    asked = []
    t0 = time.monotonic()
    with pytest.raises(ConfigError) as e:
        wait_for_resources(bundles, what="1 job of 1 worker (8 CPU per worker)", timeout_s=3,
                           describe=_describe, request=_recording_request(asked),
                           log=lambda _: None, poll_s=1)
    assert time.monotonic() - t0 >= 3
    msg = str(e.value)
    assert msg.startswith("--num-workers: 1 job of 1 worker (8 CPU per worker) need 8 CPU, "
                          "each on one node; after waiting 3s for the autoscaler the cluster "
                          "has "), msg
    assert re.search(r"has [23] node\(s\): [^.]*with 3 CPU[^.]*\. It did not add nodes in "
                     r"time: .*raise --resource-timeout$", msg), msg
    assert "memory" not in msg  # only the resources the job asks for
    assert asked == [bundles, []]
