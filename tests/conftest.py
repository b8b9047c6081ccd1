"""Shared fixtures. Real services are session-scoped and start only when a test asks for them."""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Iterator
from typing import Any

import pytest

from wsdan.services import S3Server, S3ServerConfig, generate_credentials

# Ray reads RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER once, when it is imported (a module constant of
# ray._private.ray_constants), so it is set here, before any test module imports ray. With
# it at 0, a local Ray is single-node and binds every service to 127.0.0.1 (Ray 2.60:
# ray._private.services). RAY_AUTH_MODE is set explicitly: unset, a new local cluster turns token
# auth on (and would pick up a stray ~/.ray/auth_token); "disabled" ignores that file.
# No usage-stats reporting: nothing leaves this machine.
os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"
os.environ["RAY_AUTH_MODE"] = "disabled"
os.environ["RAY_USAGE_STATS_ENABLED"] = "0"
# The tests start their own clusters: never attach to one named by the caller's shell (for
# example after `eval "$(wsdan stack env)"`).
os.environ.pop("RAY_ADDRESS", None)
# Nor log to a tracking server named there: tests that track use their own (mlflow_env).
for _name in ("MLFLOW_TRACKING_URI", "MLFLOW_REGISTRY_URI", "RAY_DASHBOARD_URL"):
    os.environ.pop(_name, None)

# -- object store (SeaweedFS S3) -------------------------------------------------------------


@pytest.fixture(scope="session")
def s3_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[S3Server]:
    """One SeaweedFS S3 server for the session: loopback, free ports, random credentials.

    Tests that use it are real-service tests: mark them ``@pytest.mark.slow``.
    """
    access_key, secret_key = generate_credentials()
    config = S3ServerConfig.with_free_ports(
        tmp_path_factory.mktemp("s3"), access_key=access_key, secret_key=secret_key
    )
    server = S3Server(config)
    server.start()
    try:
        yield server
    finally:
        server.stop(timeout=0)  # the data is thrown away: skip SeaweedFS's ~15 s clean stop


@pytest.fixture
def s3_env(s3_server: S3Server, monkeypatch: pytest.MonkeyPatch) -> dict[str, str]:
    """Point AWS SDKs (boto3, pyarrow's from_uri, MLflow) at ``s3_server`` for one test.

    Sets AWS_ENDPOINT_URL, AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY and AWS_DEFAULT_REGION,
    clears variables that would override them, and returns what it set.
    """
    for name in ("AWS_ENDPOINT_URL_S3", "AWS_PROFILE", "AWS_SESSION_TOKEN", "AWS_REGION"):
        monkeypatch.delenv(name, raising=False)
    env = s3_server.aws_env()
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    return env


# -- Ray -------------------------------------------------------------------------------------


@pytest.fixture(scope="session")
def ray_cluster(s3_server: S3Server) -> Iterator[dict[str, Any]]:
    """One local Ray for the session: 4 logical CPUs (more than the cores, so a read task, a
    decode task and two consumers can run at once), loopback only, with the dashboard, as
    every real cluster has it: Ray Train's placement-group cleaner asks its State API
    whether a controller is still alive, and without it the placement groups of trials
    stopped early by a sweep would stay reserved.

    Its worker processes see ``s3_server``'s AWS_* variables, as the nodes of a real cluster
    carry their own credentials: the pyarrow S3 file system that Ray Data ships to the
    workers holds the endpoint but no keys. The driver's own environment is left as it
    was (tests use ``s3_env``). Ray-using tests are slow tests: mark them. Returns
    ``ray.init``'s address info.
    """
    import ray
    import ray.data

    # A short private temp dir: Ray's socket paths must stay under 108 characters, and a
    # dir of our own keeps this cluster apart from any other Ray on the machine.
    temp_dir = tempfile.mkdtemp(prefix="ray-", dir="/tmp")
    from wsdan.services import find_free_ports

    gcs_port, dashboard_port = find_free_ports(2)
    address = f"127.0.0.1:{gcs_port}"
    # The GCS port chosen here, so that the session's workers can be told their cluster's
    # address (RAY_ADDRESS in the job's runtime_env, as wsdan.cluster.connect does for a
    # driver): Ray Train's placement-group cleaner looks its cluster up through the State
    # API, and with another Ray on the machine (a demo stack, a test's own head) it cannot
    # choose, its monitor dies, and the cleaner actor is left behind, one per Train run.
    env = {**s3_server.aws_env(), "RAY_GCS_SERVER_PORT": str(gcs_port)}
    saved = {name: os.environ.get(name) for name in env}
    os.environ.update(env)  # inherited by the raylet, hence by every worker it starts
    try:
        info = ray.init(num_cpus=4, include_dashboard=True, dashboard_host="127.0.0.1",
                        dashboard_port=dashboard_port, _temp_dir=temp_dir,
                        runtime_env={"env_vars": {"RAY_ADDRESS": address}})
    finally:
        for name, value in saved.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value
    assert info.address_info["gcs_address"] == address, info.address_info
    ray.data.DataContext.get_current().enable_progress_bars = False
    try:
        yield dict(info.address_info)
    finally:
        ray.shutdown()
        shutil.rmtree(temp_dir, ignore_errors=True)


# -- tracking server (MLflow) ----------------------------------------------------------------


@pytest.fixture(scope="session")
def mlflow_server(s3_server: S3Server, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Any]:
    """One MLflow tracking server for the session: sqlite backend, loopback, a free port, and
    artifacts proxied to the bucket ``wsdan-mlflow`` (prefix ``artifacts/``) of ``s3_server``.

    Only the server holds the S3 endpoint and keys: clients need nothing but the tracking URI
    (see ``mlflow_env``). Tests that use it are real-service tests: mark them slow.
    """
    from wsdan.services import find_free_port
    from wsdan.services.mlflow_server import MlflowServer, MlflowServerConfig

    bucket = "wsdan-mlflow"
    s3_server.ensure_bucket(bucket)
    config = MlflowServerConfig(
        data_dir=tmp_path_factory.mktemp("mlflow"),
        port=find_free_port(),
        artifacts_destination=f"s3://{bucket}/artifacts",
        s3_endpoint=s3_server.endpoint,
        s3_access_key=s3_server.config.access_key,
        s3_secret_key=s3_server.config.secret_key,
    )
    server = MlflowServer(config)
    server.start(timeout=300)  # ~10 s when idle; minutes on a loaded two-core machine
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture
def mlflow_env(mlflow_server: Any, monkeypatch: pytest.MonkeyPatch) -> Iterator[str]:
    """Point MLflow (this process and its children) at ``mlflow_server`` for one test; returns
    the tracking URI. Ends a run the test left active."""
    import mlflow

    monkeypatch.delenv("MLFLOW_REGISTRY_URI", raising=False)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", mlflow_server.tracking_uri)
    mlflow.set_tracking_uri(mlflow_server.tracking_uri)
    try:
        yield mlflow_server.tracking_uri
    finally:
        while mlflow.active_run() is not None:
            mlflow.end_run()
        # Clears MLflow's global URI (and the variable, which monkeypatch then restores).
        mlflow.set_tracking_uri(None)


@pytest.fixture
def ray_head_node() -> Iterator[Any]:
    """A `ray start --head` cluster of its own (temp dir, free ports, 4 logical CPUs, the
    dashboard and job server). Its node knows nothing of S3 or MLflow: what is submitted to
    it brings those in its runtime_env (``job_runtime_env``), as on a real cluster. Stopped
    afterwards."""
    from pathlib import Path

    from wsdan.services import find_free_ports
    from wsdan.services.ray_head import RayHead, RayHeadConfig, without_job_settings

    gcs, dash, client, agent, metrics = find_free_ports(5)
    head = RayHead(RayHeadConfig(temp_dir=Path(tempfile.mkdtemp(prefix="wsdan-rh-", dir="/tmp")),
                                 port=gcs, dashboard_port=dash, num_cpus=4,
                                 client_server_port=client, dashboard_agent_listen_port=agent,
                                 metrics_export_port=metrics))
    head.start(environ=without_job_settings())
    try:
        yield head
    finally:
        head.stop()


@pytest.fixture
def job_runtime_env(s3_server: S3Server, mlflow_server: Any, tmp_path) -> dict[str, Any]:
    """The ``runtime_env`` of a job submitted to ``ray_head_node``: the S3 endpoint, a
    reference to the keys (a 0600 credentials file) and the MLflow URI; no secret value."""
    env = s3_server.job_env(tmp_path / "aws_credentials", profile="wsdan-tests")
    env["MLFLOW_TRACKING_URI"] = mlflow_server.tracking_uri
    return {"env_vars": env}
