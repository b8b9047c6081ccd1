"""Reaching the local S3 store as a client: its region, credentials (from the environment,
generated, or in a shared-credentials file), bucket names and creation, boto3 clients.

`wsdan.services.seaweedfs` runs the server and re-exports all of this; the MLflow server only
needs the region.
"""

from __future__ import annotations

import os
import re
import secrets
import string
from pathlib import Path
from typing import Any

import boto3
from botocore.config import Config
from botocore.exceptions import ClientError

from wsdan.services._process import ManagedProcessError

__all__ = [
    "CREDENTIAL_ENV_PAIRS",
    "REGION",
    "S3ServerError",
    "boto_retries",
    "boto_retry_env",
    "SecretEnv",
    "check_bucket_name",
    "credentials_from_env",
    "ensure_bucket",
    "error_code",
    "generate_credentials",
    "s3_client",
    "write_credentials_file",
]

# Credentials are read from the first pair that is set; the WSDAN pair lets a user keep the
# local store's keys apart from real AWS keys in the same shell.
CREDENTIAL_ENV_PAIRS = (
    ("WSDAN_S3_ACCESS_KEY", "WSDAN_S3_SECRET_KEY"),
    ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"),
)
# SeaweedFS ignores the region, but SigV4 signs one and boto3/pyarrow want one.
REGION = "us-east-1"
_BUCKET_NAME = re.compile(r"^[a-z0-9][a-z0-9.-]{1,61}[a-z0-9]$")


class S3ServerError(ManagedProcessError):
    """The S3 server could not be started, reached or stopped; the message says why and where
    to look."""


class SecretEnv(dict[str, str]):
    """Environment variables, some of them secret: a plain ``dict`` (``os.environ.update``,
    ``subprocess``'s ``env=``, ``json.dumps`` see every value) whose ``repr`` and ``str``
    show ``***`` for the values of secret names (``*SECRET*``, ``*TOKEN*``, ``*PASSWORD*``),
    so that printing it (a log line, pytest's report of a failing test's fixture values)
    leaks nothing."""

    _SECRET_PARTS = ("SECRET", "TOKEN", "PASSWORD")

    @classmethod
    def is_secret(cls, name: str) -> bool:
        return any(part in name.upper() for part in cls._SECRET_PARTS)

    def __repr__(self) -> str:
        shown = {k: "***" if self.is_secret(k) else v for k, v in self.items()}
        return f"{type(self).__name__}({shown!r})"

    __str__ = __repr__


def generate_credentials() -> tuple[str, str]:
    """A random (access key, secret key) pair in AWS's shapes (20 and 40 characters)."""
    alphabet = string.ascii_uppercase + string.digits
    access_key = "WSDAN" + "".join(secrets.choice(alphabet) for _ in range(15))
    return access_key, secrets.token_urlsafe(30)


def credentials_from_env(environ: dict[str, str] | None = None) -> tuple[str, str]:
    """(access key, secret key) from ``WSDAN_S3_ACCESS_KEY``/``WSDAN_S3_SECRET_KEY``, else from
    ``AWS_ACCESS_KEY_ID``/``AWS_SECRET_ACCESS_KEY``; a half-set pair is an error."""
    env = os.environ if environ is None else environ
    for access_name, secret_name in CREDENTIAL_ENV_PAIRS:
        access_key, secret_key = env.get(access_name), env.get(secret_name)
        if access_key and secret_key:
            return access_key, secret_key
        if access_key or secret_key:
            missing = secret_name if access_key else access_name
            raise S3ServerError(f"S3 credentials half set: {missing} is missing")
    names = " or ".join(f"{a} and {s}" for a, s in CREDENTIAL_ENV_PAIRS)
    raise S3ServerError(f"no S3 credentials in the environment: set {names}")


def write_credentials_file(path: str | os.PathLike[str], access_key: str, secret_key: str, *,
                           profile: str = "wsdan") -> None:
    """An AWS shared-credentials file with one profile, created 0600 (never world-readable,
    not even for an instant)."""
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(p, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(f"[{profile}]\naws_access_key_id = {access_key}\n"
                f"aws_secret_access_key = {secret_key}\n")
    os.chmod(p, 0o600)  # an existing file keeps its mode through O_TRUNC


def check_bucket_name(name: str) -> None:
    """Raise ValueError unless ``name`` is a valid S3 bucket name (3–63 of a-z 0-9 . -)."""
    if not _BUCKET_NAME.match(name):
        raise ValueError(f"invalid bucket name {name!r}: 3-63 characters of a-z, 0-9, '.', '-'")


def s3_client(endpoint: str, access_key: str, secret_key: str,
              config: Config | None = None) -> Any:
    """A boto3 S3 client for ``endpoint``: these credentials, path-style addressing, us-east-1,
    and the project's retry policy (:func:`boto_retries`).

    ``config`` (a botocore Config) is merged over those defaults, e.g. for timeouts.
    """
    base = Config(
        s3={"addressing_style": "path"},
        signature_version="s3v4",
        retries=boto_retries(),
    )
    return boto3.client(
        "s3",
        endpoint_url=endpoint,
        aws_access_key_id=access_key,
        aws_secret_access_key=secret_key,
        region_name=REGION,
        config=base if config is None else base.merge(config),
    )


def boto_retries() -> dict[str, Any]:
    """botocore's ``retries`` setting for every boto3 client of the project: the standard
    mode (it retries connection errors, time-outs, 5xx and throttling, never other 4xx) with
    as many attempts as pyarrow's S3 file systems make: the first and
    ``wsdan.storage.s3_retries()`` retries (the one place the policy is set). Its backoff
    is random (0-1 s * 2^k, capped at 20 s), about a minute in all on average at 10
    retries."""
    from wsdan.storage import s3_retries

    # botocore's Config counts retries in "max_attempts" and every request in
    # "total_max_attempts" (as AWS_MAX_ATTEMPTS does): the latter, to say it once.
    return {"mode": "standard", "total_max_attempts": s3_retries() + 1}


def boto_retry_env() -> dict[str, str]:
    """The same policy as environment variables, for boto3 in processes we start (the
    MLflow server's artifact proxy)."""
    retries = boto_retries()
    return {"AWS_RETRY_MODE": retries["mode"],
            "AWS_MAX_ATTEMPTS": str(retries["total_max_attempts"])}


def ensure_bucket(client: Any, name: str) -> None:
    """Create bucket ``name`` with ``client`` unless it exists."""
    try:
        client.head_bucket(Bucket=name)
        return
    except ClientError as err:
        if error_code(err) not in ("404", "NoSuchBucket", "NotFound"):
            raise
    try:
        client.create_bucket(Bucket=name)
    except ClientError as err:
        if error_code(err) not in ("BucketAlreadyOwnedByYou", "BucketAlreadyExists"):
            raise


def error_code(err: ClientError) -> str:
    """The S3 error code of ``err`` ("404", "NoSuchBucket", "InvalidAccessKeyId", ...)."""
    return str(err.response.get("Error", {}).get("Code", "unknown"))
