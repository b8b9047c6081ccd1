"""Shared fixtures. Real services are session-scoped and start only when a test asks for them."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from wsdan.services import S3Server, S3ServerConfig, generate_credentials

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
