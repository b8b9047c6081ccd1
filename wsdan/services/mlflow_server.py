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

import contextlib
import logging
import os
import re
import shlex
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import psutil

from wsdan.services._process import port_in_use
from wsdan.services.seaweedfs import REGION

log = logging.getLogger(__name__)

# Variables the server must not inherit from the caller: they would point its S3 client
# elsewhere than artifacts_destination's endpoint, or at the caller's tracking server.
_OVERRIDDEN_ENV = (
    "AWS_ENDPOINT_URL",
    "AWS_ENDPOINT_URL_S3",
    "AWS_PROFILE",
    "AWS_SESSION_TOKEN",
    "MLFLOW_TRACKING_URI",
)


class MlflowServerError(RuntimeError):
    """The MLflow server could not be started, reached or stopped; the message says why and
    where to look."""


@dataclass(frozen=True, kw_only=True)
class MlflowServerConfig:
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

    @property
    def pid_file(self) -> Path:
        return self.data_dir / "pid"

    @property
    def server_log(self) -> Path:
        return self.data_dir / "server.log"

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

    def env(self, base: dict[str, str] | None = None) -> dict[str, str]:
        """The server's environment: ``base`` (default os.environ) with the S3 settings.

        Holds the secret key when one is configured: never log it.
        """
        env = {k: v for k, v in (os.environ if base is None else base).items()
               if k not in _OVERRIDDEN_ENV}
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
        return env


class MlflowServer:
    """One MLflow tracking server run from ``config.data_dir``.

    Any process can start, stop or query it: the state is the pid file, not this object.
    """

    def __init__(self, config: MlflowServerConfig) -> None:
        self.config = config
        self._proc: subprocess.Popen[bytes] | None = None  # set when this object started it

    def __enter__(self) -> MlflowServer:
        self.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.stop()

    @property
    def tracking_uri(self) -> str:
        """``http://HOST:PORT``: the value for ``MLFLOW_TRACKING_URI``."""
        return self.config.tracking_uri

    def pid(self) -> int | None:
        """Pid of the server recorded in ``data_dir/pid`` if it is alive and serves data_dir."""
        proc = self._process()
        return None if proc is None else proc.pid

    def start(self, wait: bool = True, timeout: float = 90.0) -> None:
        """Start the server, or do nothing when the one recorded in data_dir is alive.

        With ``wait``, return once ``GET /health`` answers, or raise MlflowServerError (and
        stop what was started) after ``timeout`` seconds or when the process exits.
        """
        cfg = self.config
        running = self._process()
        if running is not None:
            self._check_running_matches(running)
            if wait:
                self.wait_ready(timeout)
            return
        if port_in_use(cfg.port, cfg.host):
            raise MlflowServerError(
                f"cannot start the MLflow server: port {cfg.port} on {cfg.host} is already in "
                "use by another process; stop it or configure another port"
            )
        cfg.data_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
        if not cfg.destination.startswith("s3://"):
            Path(cfg.destination).mkdir(parents=True, exist_ok=True)
        command = cfg.command()
        started = time.monotonic()
        with open(cfg.server_log, "ab") as out:
            out.write(f"==== {time.strftime('%Y-%m-%d %H:%M:%S')} {shlex.join(command)}\n".encode())
            out.flush()
            self._proc = subprocess.Popen(
                command,
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
                cwd=cfg.data_dir,  # anything MLflow writes relative to the cwd stays here
                env=cfg.env(),
                start_new_session=True,  # outlives the CLI that started it; one group to signal
            )
        _write_private(cfg.pid_file, f"{self._proc.pid}\n")
        log.info("MLflow server started, pid %d, %s", self._proc.pid, self.tracking_uri)
        if not wait:
            return
        why = self._wait_ready(timeout)
        if why is not None:
            self.stop()  # leave nothing half-started behind
            raise MlflowServerError(self._failure_message(f"failed to start: {why}"))
        log.info("MLflow server ready at %s in %.1f s", self.tracking_uri,
                 time.monotonic() - started)

    def wait_ready(self, timeout: float = 90.0) -> None:
        """Block until ``/health`` answers; MlflowServerError after ``timeout`` seconds."""
        why = self._wait_ready(timeout)
        if why is not None:
            raise MlflowServerError(self._failure_message(f"not ready: {why}"))

    def stop(self, timeout: float = 30.0) -> None:
        """Stop the server if it runs: SIGTERM to its process group, SIGKILL after ``timeout``."""
        proc = self._process()
        if proc is not None:
            log.info("stopping MLflow server pid %d", proc.pid)
            with contextlib.suppress(ProcessLookupError):
                leader = os.getpgid(proc.pid) == proc.pid
            _signal_group(proc.pid, signal.SIGTERM)
            if not self._wait_gone(proc, timeout):
                log.warning("MLflow server pid %d up %g s after SIGTERM: SIGKILL", proc.pid,
                            timeout)
                _signal_group(proc.pid, signal.SIGKILL)
                if not self._wait_gone(proc, 10.0):
                    raise MlflowServerError(f"MLflow server pid {proc.pid} survived SIGKILL")
            if leader:  # a worker that outlived the main process is still in its group
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(proc.pid, signal.SIGKILL)
        self.config.pid_file.unlink(missing_ok=True)
        self._proc = None

    def status(self) -> dict[str, Any]:
        """{"running", "pid", "healthy", "tracking_uri", "artifacts_destination", "data_dir",
        "log_file"}."""
        proc = self._process()
        return {
            "running": proc is not None,
            "pid": None if proc is None else proc.pid,
            "healthy": proc is not None and self._health() is None,
            "tracking_uri": self.tracking_uri,
            "artifacts_destination": self.config.destination,
            "data_dir": str(self.config.data_dir),
            "log_file": str(self.config.server_log),
        }

    # -- internals ---------------------------------------------------------------------

    def _process(self) -> psutil.Process | None:
        if self._proc is not None and self._proc.poll() is None:  # poll reaps it if it exited
            # Our own child is the server whatever its cmdline says: between fork and exec it
            # still shows this process's command line, and the check below would miss it.
            with contextlib.suppress(psutil.NoSuchProcess):
                return psutil.Process(self._proc.pid)
        try:
            pid = int(self.config.pid_file.read_text().strip())
        except (FileNotFoundError, ValueError):
            return None
        try:
            proc = psutil.Process(pid)
            if proc.status() == psutil.STATUS_ZOMBIE:
                return None
            cmdline = proc.cmdline()
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            return None
        # A pid file can outlive its process and the pid be reused: check it is an MLflow
        # server on this data directory.
        if "server" not in cmdline or self.config.backend_store_uri not in cmdline:
            return None
        return proc

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

    def _wait_ready(self, timeout: float) -> str | None:
        deadline = time.monotonic() + timeout
        while True:
            if self._process() is None:
                code = None if self._proc is None else self._proc.poll()
                return "the mlflow process exited" + ("" if code is None else f" with code {code}")
            why = self._health()
            if why is None:
                return None
            if time.monotonic() >= deadline:
                return f"no answer on /health after {timeout:g} s (last: {why})"
            time.sleep(0.25)

    def _wait_gone(self, proc: psutil.Process, timeout: float) -> bool:
        if self._proc is not None and self._proc.pid == proc.pid:
            try:
                self._proc.wait(timeout)  # our child: wait() also reaps it
            except subprocess.TimeoutExpired:
                return False
            return True
        try:
            proc.wait(timeout)
        except psutil.TimeoutExpired:
            return False
        return True

    def _failure_message(self, what: str) -> str:
        cfg = self.config
        return (
            f"MLflow server ({self.tracking_uri}, data in {cfg.data_dir}) {what}\n"
            f"--- {cfg.server_log} (last lines of this start) ---\n{_log_excerpt(cfg.server_log)}\n"
            f"--- full log: {cfg.server_log}"
        )


def _write_private(path: Path, text: str) -> None:
    """Write ``text`` to ``path`` atomically, readable by the owner only (mode 0600)."""
    tmp = path.with_name(path.name + ".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(text)
    os.replace(tmp, path)


def _signal_group(pid: int, sig: signal.Signals) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        if os.getpgid(pid) == pid:  # started with start_new_session: it leads its own group
            os.killpg(pid, sig)
        else:
            os.kill(pid, sig)


def _log_excerpt(path: Path, lines: int = 25) -> str:
    """The last lines written since the latest start header (a Python traceback ends there)."""
    try:
        text = path.read_text(errors="replace")
    except OSError as err:
        return f"(cannot read: {err})"
    section = text.rsplit("\n==== ", 1)[-1].splitlines()[1:]  # drop the header line
    section = [ln for ln in section if not re.fullmatch(r"\s*", ln)]
    return "\n".join(section[-lines:]) if section else "(empty)"
