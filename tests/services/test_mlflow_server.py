"""wsdan.services.mlflow_server: a real MLflow server (slow test), and the configuration and
error paths without one (fast tests)."""

from __future__ import annotations

import socket
import time
import urllib.request

import psutil
import pytest

from wsdan.services import find_free_port
from wsdan.services.mlflow_server import MlflowServer, MlflowServerConfig, MlflowServerError
from wsdan.services.seaweedfs import port_in_use

# -- configuration (no server) ------------------------------------------------------------


def test_command_and_environment(tmp_path):
    config = MlflowServerConfig(
        data_dir=tmp_path / "m",
        port=5123,
        artifacts_destination="s3://bucket/prefix",
        s3_endpoint="http://127.0.0.1:8333",
        s3_access_key="AKEXAMPLE",
        s3_secret_key="sk-do-not-show",
    )
    assert config.tracking_uri == "http://127.0.0.1:5123"
    assert config.backend_store_uri == f"sqlite:///{(tmp_path / 'm').resolve()}/mlflow.db"
    command = config.command()
    assert command[1:4] == ["-m", "mlflow", "server"]
    for flag, value in [("--backend-store-uri", config.backend_store_uri),
                        ("--artifacts-destination", "s3://bucket/prefix"),
                        ("--host", "127.0.0.1"), ("--port", "5123"), ("--workers", "1")]:
        assert command[command.index(flag) + 1] == value
    assert "sk-do-not-show" not in repr(config)
    assert not any("sk-do-not-show" in arg for arg in command)

    caller = {"PATH": "/usr/bin", "AWS_ENDPOINT_URL": "http://elsewhere",
              "MLFLOW_TRACKING_URI": "http://127.0.0.1:1", "AWS_ACCESS_KEY_ID": "caller"}
    env = config.env(caller)
    assert env["MLFLOW_SERVER_ENABLE_JOB_EXECUTION"] == "false"
    assert env["MLFLOW_S3_ENDPOINT_URL"] == "http://127.0.0.1:8333"
    assert env["AWS_ACCESS_KEY_ID"] == "AKEXAMPLE"
    assert env["AWS_SECRET_ACCESS_KEY"] == "sk-do-not-show"
    assert env["AWS_DEFAULT_REGION"] == "us-east-1"
    assert "AWS_ENDPOINT_URL" not in env and "MLFLOW_TRACKING_URI" not in env
    assert env["PATH"] == "/usr/bin"


def test_local_destination_defaults_to_data_dir(tmp_path):
    config = MlflowServerConfig(data_dir=tmp_path)
    assert config.destination == str(tmp_path.resolve() / "mlartifacts")
    assert "MLFLOW_S3_ENDPOINT_URL" not in config.env({})
    relative = MlflowServerConfig(data_dir=tmp_path, artifacts_destination="file://" + str(tmp_path / "a"))
    assert relative.destination == str((tmp_path / "a").resolve())


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"port": 0}, "port out of range"),
        ({"workers": 0}, "workers"),
        ({"s3_access_key": "AK"}, "both"),
        ({"artifacts_destination": "gs://bucket"}, "s3://"),
    ],
)
def test_invalid_config(tmp_path, kwargs, match):
    with pytest.raises(ValueError, match=match):
        MlflowServerConfig(data_dir=tmp_path, **kwargs)


def test_port_in_use_is_refused(tmp_path):
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        sock.listen()
        port = sock.getsockname()[1]
        server = MlflowServer(MlflowServerConfig(data_dir=tmp_path, port=port))
        with pytest.raises(MlflowServerError, match=f"port {port} .* already in use"):
            server.start()
    assert not (tmp_path / "pid").exists()


def test_process_that_dies_reports_its_log(tmp_path, monkeypatch):
    # A fake ``mlflow`` package first on the path: ``python -m mlflow server`` runs it.
    fake = tmp_path / "fake" / "mlflow"
    fake.mkdir(parents=True)
    (fake / "__init__.py").write_text("")
    (fake / "__main__.py").write_text(
        "import sys\nprint('Traceback: the backend store is broken', flush=True)\nsys.exit(3)\n"
    )
    monkeypatch.setenv("PYTHONPATH", str(tmp_path / "fake"))
    server = MlflowServer(MlflowServerConfig(data_dir=tmp_path / "data", port=find_free_port()))
    with pytest.raises(MlflowServerError) as info:
        server.start(timeout=20)
    message = str(info.value)
    assert "exited with code 3" in message
    assert "the backend store is broken" in message
    assert str(tmp_path / "data" / "server.log") in message
    assert server.status()["running"] is False
    assert not (tmp_path / "data" / "pid").exists()


def test_stale_pid_file_is_not_a_server(tmp_path):
    server = MlflowServer(MlflowServerConfig(data_dir=tmp_path, port=find_free_port()))
    (tmp_path / "pid").write_text(f"{psutil.Process().pid}\n")  # this pytest, not a server
    assert server.pid() is None
    assert server.status()["running"] is False


# -- a real server ------------------------------------------------------------------------


@pytest.mark.slow
def test_start_status_idempotent_start_and_stop(tmp_path):
    port = find_free_port()
    config = MlflowServerConfig(data_dir=tmp_path / "mlflow", port=port)
    server = MlflowServer(config)
    try:
        started = time.monotonic()
        server.start()
        first_start = time.monotonic() - started
        status = server.status()
        assert status["running"] and status["healthy"]
        assert status["tracking_uri"] == f"http://127.0.0.1:{port}"
        assert (tmp_path / "mlflow" / "mlflow.db").is_file()
        pid = status["pid"]
        # --workers 1 and no job runner: the CLI process and one uvicorn worker.
        assert len(psutil.Process(pid).children(recursive=True)) == 1

        # Idempotent, also from another object (another CLI process would do the same).
        again = MlflowServer(config)
        started = time.monotonic()
        again.start()
        assert time.monotonic() - started < 2.0
        assert again.pid() == pid

        # The same data_dir on another port: refused, naming the running one.
        other = MlflowServer(MlflowServerConfig(data_dir=tmp_path / "mlflow", port=port + 1))
        with pytest.raises(MlflowServerError, match=f"--port {port} instead of {port + 1}"):
            other.start()

        opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
        with opener.open(f"{server.tracking_uri}/health", timeout=5) as response:
            assert response.read() == b"OK"

        again.stop()  # stops the server started by `server`
        status = server.status()
        assert not status["running"] and not status["healthy"] and status["pid"] is None
        assert not psutil.pid_exists(pid) or psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
        assert not port_in_use(port)
        server.stop()  # nothing to stop: no error
        print(f"mlflow server: ready in {first_start:.1f} s on a fresh data_dir")
    finally:
        server.stop()
