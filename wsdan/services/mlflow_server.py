"""The MLflow tracking server (tracking + model registry) on loopback, as a managed process.

Everything lives under one ``data_dir`` (project-local, e.g. ``.wsdan/stack/mlflow``), so the
process that starts the server and the one that stops it need share nothing else::

    mlflow.db       the sqlite backend store (runs, logged models, registry)
    pid             pid of the running ``mlflow server`` (also its process-group id)
    server.log      the server's stdout/stderr; appended, one ``====`` header per start
    mlartifacts/    the artifacts, when artifacts_destination is not an s3:// URI

Artifacts are proxied: clients talk HTTP to the server (``mlflow-artifacts:/``) and only the
server reads and writes the destination, so the S3 endpoint and credentials are set in the
server's environment alone (``MLFLOW_S3_ENDPOINT_URL``, ``AWS_ACCESS_KEY_ID``, ...).

Measured on two busy cores with MLflow 3.17: ``/health`` answers 7-12 s after launch on a
fresh data_dir (the schema migrations run first), ~4.5 s on a used one; SIGTERM takes ~1 s. With
``--workers 1`` and ``MLFLOW_SERVER_ENABLE_JOB_EXECUTION=false`` it runs 2 processes and
~0.5 GiB (the defaults: 10 processes, 2.3 GiB).

Security: the server has no authentication here; it binds to ``host`` (loopback by default).
"""

from __future__ import annotations

import os
import sys
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import psutil

from wsdan.services._process import DataDirFiles, ManagedProcess, ManagedProcessError
from wsdan.services.s3_access import REGION, SecretEnv, boto_retry_env

# Variables the server must not inherit from the caller: they would point its S3 client
# elsewhere than artifacts_destination's endpoint, or at the caller's tracking server.
_OVERRIDDEN_ENV = (
    "AWS_ENDPOINT_URL",
    "AWS_ENDPOINT_URL_S3",
    "AWS_PROFILE",
    "AWS_SESSION_TOKEN",
    "MLFLOW_TRACKING_URI",
)


class MlflowServerError(ManagedProcessError):
    """The MLflow server could not be started, reached or stopped; the message says why and
    where to look."""


@dataclass(frozen=True, kw_only=True)
class MlflowServerConfig(DataDirFiles):
    """Where and how to run one MLflow tracking server.

    artifacts_destination: ``s3://bucket/prefix`` (the bucket must exist) or a local path;
        None: ``data_dir/mlartifacts``.
    s3_endpoint: the S3 endpoint for an s3:// destination (``MLFLOW_S3_ENDPOINT_URL``); None:
        AWS S3 itself.
    s3_access_key / s3_secret_key: credentials for the destination, given to the server only;
        None: the server inherits the caller's AWS credential chain.
    workers: uvicorn worker processes. One is plenty for a team's tracking traffic and keeps
        the server at ~0.5 GiB; sqlite allows one writer at a time anyway.
    """

    data_dir: Path
    port: int = 5000
    host: str = "127.0.0.1"
    artifacts_destination: str | None = None
    s3_endpoint: str | None = None
    s3_access_key: str | None = None
    s3_secret_key: str | None = field(default=None, repr=False)
    s3_region: str = REGION
    workers: int = 1

    def __post_init__(self) -> None:
        object.__setattr__(self, "data_dir", Path(self.data_dir).expanduser().resolve())
        if not 0 < self.port < 65536:
            raise ValueError(f"port out of range: {self.port}")
        if self.workers < 1:
            raise ValueError(f"workers must be >= 1, got {self.workers}")
        if (self.s3_access_key is None) != (self.s3_secret_key is None):
            raise ValueError("give both s3_access_key and s3_secret_key, or neither")
        dest = self.artifacts_destination
        if dest is not None and not dest.startswith("s3://"):
            if "://" in dest and not dest.startswith("file://"):
                raise ValueError(f"artifacts_destination must be s3://... or a local path: {dest}")
            local = Path(dest.removeprefix("file://")).expanduser().resolve()
            object.__setattr__(self, "artifacts_destination", str(local))

    @property
    def tracking_uri(self) -> str:
        return f"http://{self.host}:{self.port}"

    @property
    def backend_store_uri(self) -> str:
        return f"sqlite:///{self.db_file}"

    @property
    def destination(self) -> str:
        """The artifacts destination as given to the server."""
        return self.artifacts_destination or str(self.data_dir / "mlartifacts")

    @property
    def db_file(self) -> Path:
        return self.data_dir / "mlflow.db"

    def command(self) -> list[str]:
        """The ``mlflow server`` command line. It holds no secret (those go in env())."""
        return [
            sys.executable,
            "-m",
            "mlflow",
            "server",
            "--backend-store-uri",
            self.backend_store_uri,
            "--artifacts-destination",
            self.destination,
            "--host",
            self.host,
            "--port",
            str(self.port),
            "--workers",
            str(self.workers),
        ]

    def env(self, base: dict[str, str] | None = None) -> SecretEnv:
        """The server's environment: ``base`` (default os.environ) with the S3 settings.

        Holds the secret key when one is configured: never log it (its repr masks it).
        """
        env = SecretEnv({k: v for k, v in (os.environ if base is None else base).items()
                         if k not in _OVERRIDDEN_ENV})
        # The job runner (used by MLflow's GenAI features) adds ~8 processes and ~1.8 GiB.
        env["MLFLOW_SERVER_ENABLE_JOB_EXECUTION"] = "false"
        env["PYTHONUNBUFFERED"] = "1"  # the log file shows what happened up to a crash
        if self.s3_endpoint is not None:
            env["MLFLOW_S3_ENDPOINT_URL"] = self.s3_endpoint
        if self.s3_access_key is not None and self.s3_secret_key is not None:
            env["AWS_ACCESS_KEY_ID"] = self.s3_access_key
            env["AWS_SECRET_ACCESS_KEY"] = self.s3_secret_key
        if self.destination.startswith("s3://"):
            env.setdefault("AWS_DEFAULT_REGION", self.s3_region)
            for name, value in boto_retry_env().items():  # the project's one S3 retry policy
                env.setdefault(name, value)
        return env


class MlflowServer(ManagedProcess[MlflowServerConfig]):
    """One MLflow tracking server run from ``config.data_dir``.

    Any process can start, stop or query it: the state is the pid file, not this object.
    start() waits for ``GET /health``; status() is {"running", "pid", "healthy",
    "tracking_uri", "artifacts_destination", "data_dir", "log_file"}.
    """

    name = "MLflow server"
    executable = "mlflow"
    error = MlflowServerError
    not_ready = "no answer on /health after {timeout:g} s (last: {last})"

    @property
    def tracking_uri(self) -> str:
        """``http://HOST:PORT``: the value for ``MLFLOW_TRACKING_URI``."""
        return self.config.tracking_uri

    @property
    def address(self) -> str:
        return self.tracking_uri

    # -- the ManagedProcess hooks ------------------------------------------------------

    def _command(self) -> list[str]:
        return self.config.command()

    def _env(self) -> dict[str, str]:
        return self.config.env()

    def _ports(self) -> dict[str, int]:
        return {"mlflow": self.config.port}

    def _ports_taken(self, busy: dict[str, int]) -> str:
        cfg = self.config
        return (
            f"cannot start the MLflow server: port {cfg.port} on {cfg.host} is already in "
            "use by another process; stop it or configure another port"
        )

    def _prepare(self) -> None:
        if not self.config.destination.startswith("s3://"):
            Path(self.config.destination).mkdir(parents=True, exist_ok=True)

    def _is_ours(self, cmdline: list[str]) -> bool:
        # An MLflow server on this data directory.
        return "server" in cmdline and self.config.backend_store_uri in cmdline

    def _check_running_matches(self, proc: psutil.Process) -> None:
        cmdline = proc.cmdline()
        wanted = self.config.command()
        for flag in ("--host", "--port", "--artifacts-destination"):
            want = wanted[wanted.index(flag) + 1]
            have = cmdline[cmdline.index(flag) + 1] if flag in cmdline[:-1] else None
            if have != want:
                raise MlflowServerError(
                    f"an MLflow server already runs from {self.config.data_dir} (pid "
                    f"{proc.pid}) with {flag} {have} instead of {want}; stop it first"
                )

    def _health(self) -> str | None:
        """None when ``GET /health`` answers 200 "OK", else why not."""
        opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))  # no proxy
        try:
            with opener.open(f"{self.tracking_uri}/health", timeout=2) as response:
                body = response.read(100)
                if response.status != 200:
                    return f"/health answered {response.status}"
                return None if body.strip() == b"OK" else f"/health answered {body!r}"
        except (OSError, urllib.error.URLError) as err:
            return f"/health: {err}"

    def _describe(self) -> dict[str, Any]:
        return {
            "tracking_uri": self.tracking_uri,
            "artifacts_destination": self.config.destination,
            **super()._describe(),  # data_dir, log_file
        }
