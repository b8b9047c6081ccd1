"""Tests for wsdan.storage on local paths, and S3 URI parsing without a server."""

from __future__ import annotations

import os
import socket

import pyarrow.fs as pafs
import pytest

from wsdan import storage


def test_is_remote():
    assert storage.is_remote("s3://bucket/key")
    assert storage.is_remote("S3://bucket/key")
    assert not storage.is_remote("/tmp/x")
    assert not storage.is_remote("relative/x.pt")
    assert not storage.is_remote("file:///tmp/x")
    with pytest.raises(ValueError, match="unsupported URI scheme 'gs'"):
        storage.is_remote("gs://bucket/key")


def test_local_round_trip_creates_parents(tmp_path):
    path = tmp_path / "a" / "b" / "c.bin"
    assert not storage.exists(str(path))
    storage.write_bytes(str(path), b"\x00hello")
    assert storage.exists(str(path))
    assert storage.read_bytes(str(path)) == b"\x00hello"
    storage.write_bytes(str(path), b"second")  # replaces
    assert storage.read_bytes(str(path)) == b"second"
    assert os.listdir(path.parent) == ["c.bin"]  # no temporary files left behind
    umask = os.umask(0)
    os.umask(umask)
    assert path.stat().st_mode & 0o777 == 0o666 & ~umask


def test_local_write_is_atomic_on_failure(tmp_path):
    path = tmp_path / "keep.bin"
    storage.write_bytes(str(path), b"original")
    with pytest.raises(TypeError):
        storage.write_bytes(str(path), object())  # type: ignore[arg-type]
    assert path.read_bytes() == b"original"
    assert os.listdir(tmp_path) == ["keep.bin"]


def test_file_uri_and_relative_paths(tmp_path, monkeypatch):
    path = tmp_path / "f.bin"
    storage.write_bytes(f"file://{path}", b"x")
    assert path.read_bytes() == b"x"
    monkeypatch.chdir(tmp_path)
    assert storage.read_bytes("f.bin") == b"x"
    fs, resolved = storage.filesystem_and_path("f.bin")
    assert isinstance(fs, pafs.LocalFileSystem)
    assert resolved == str(path)
    assert fs.get_file_info(resolved).type == pafs.FileType.File


def test_missing_local_file_names_the_path(tmp_path):
    path = tmp_path / "missing.bin"
    with pytest.raises(FileNotFoundError, match="missing.bin"):
        storage.read_bytes(str(path))


@pytest.fixture
def s3_env(monkeypatch):
    monkeypatch.delenv("AWS_ENDPOINT_URL_S3", raising=False)
    monkeypatch.setenv("AWS_ENDPOINT_URL", "http://127.0.0.1:9")
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "test-key-id")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "test-secret-do-not-print")


# Timeouts a loaded S3 server needs (the SDK's defaults are 1 s / 3 s); part of equality.
T = {"connect_timeout": 10.0, "request_timeout": 120.0}


def test_s3_uri_parsing_with_http_endpoint(s3_env):
    """Building the file system makes no request; the endpoint and scheme come from
    AWS_ENDPOINT_URL, the key is taken literally."""
    fs, path = storage.filesystem_and_path("s3://bucket/runs/exp 1/model#3.pt")
    assert isinstance(fs, pafs.S3FileSystem)
    assert path == "bucket/runs/exp 1/model#3.pt"
    assert fs.equals(pafs.S3FileSystem(endpoint_override="127.0.0.1:9", scheme="http", **T))
    assert not fs.equals(pafs.S3FileSystem(endpoint_override="127.0.0.1:9", scheme="https", **T))

    assert storage.filesystem_and_path("s3://bucket")[1] == "bucket"
    assert storage.filesystem_and_path("s3://bucket/prefix/")[1] == "bucket/prefix"


def test_s3_endpoint_variables(monkeypatch, s3_env):
    monkeypatch.setenv("AWS_ENDPOINT_URL_S3", "https://objects.example:8443")
    fs, _ = storage.filesystem_and_path("s3://bucket/key")
    assert fs.equals(pafs.S3FileSystem(endpoint_override="objects.example:8443", scheme="https", **T))
    monkeypatch.setenv("AWS_ENDPOINT_URL_S3", "objects.example")  # no scheme: https
    fs, _ = storage.filesystem_and_path("s3://bucket/key")
    assert fs.equals(pafs.S3FileSystem(endpoint_override="objects.example", scheme="https", **T))
    monkeypatch.setenv("AWS_ENDPOINT_URL_S3", "http://host:1/some/path")
    with pytest.raises(ValueError, match="has a path"):
        storage.filesystem_and_path("s3://bucket/key")


def test_s3_uri_errors(s3_env):
    with pytest.raises(ValueError, match="no bucket"):
        storage.filesystem_and_path("s3:///key")
    with pytest.raises(ValueError, match="credentials") as info:
        storage.filesystem_and_path("s3://AKID:hunter2@bucket/key")
    assert "hunter2" not in str(info.value)


def test_s3_error_names_uri_endpoint_bucket_not_credentials(monkeypatch, s3_env):
    """Refused connections on loopback: the message says where, and never carries the
    secret. One retry: the default policy would retry for ~25 s (tests/test_faults.py)."""
    monkeypatch.setenv("WSDAN_S3_RETRIES", "1")
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))  # bound, not listening: connections are refused
        port = sock.getsockname()[1]
        monkeypatch.setenv("AWS_ENDPOINT_URL", f"http://127.0.0.1:{port}")
        with pytest.raises(OSError) as info:
            storage.read_bytes("s3://weights-bucket/models/r18.pt")
    message = str(info.value)
    assert "s3://weights-bucket/models/r18.pt" in message
    assert f"http://127.0.0.1:{port}" in message and "'weights-bucket'" in message
    assert "test-secret-do-not-print" not in message
