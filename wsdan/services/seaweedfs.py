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
import os
import re
import stat
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from pathlib import Path
from typing import Any

import psutil
from botocore.config import Config
from botocore.exceptions import BotoCoreError, ClientError

from wsdan.services._process import (
    ManagedProcess,
    find_free_port,
    find_free_ports,
    port_in_use,
    write_private,
)
from wsdan.services.s3_access import (
    CREDENTIAL_ENV_PAIRS,
    REGION,
    S3ServerError,
    SecretEnv,
    check_bucket_name,
    credentials_from_env,
    ensure_bucket,
    error_code,
    generate_credentials,
    s3_client,
    write_credentials_file,
)
from wsdan.services.s3_config import (
    GRPC_PORT_OFFSET,
    SERVICES,
    WEED_BINARY_ENV,
    S3ServerConfig,
    find_weed_binary,
    identities,
)

# The port helpers (wsdan.services._process), the client side (credentials, buckets, the
# region: wsdan.services.s3_access) and the config (wsdan.services.s3_config) stay
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
    "write_credentials_file",
]

_AUTH_ERRORS = ("InvalidAccessKeyId", "SignatureDoesNotMatch", "AccessDenied")
# weed opens these unix sockets in /tmp (not configurable for gRPC) and leaves them behind.
_SOCKET_DIR = Path("/tmp")


class S3Server(ManagedProcess[S3ServerConfig]):
    """One SeaweedFS S3 server run from ``config.data_dir``.

    Any process can start, stop or query it: the state is the pid file, not this object.
    start() waits until a put and a delete succeed; status() is {"running", "pid",
    "healthy", "endpoint", "data_dir", "log_file", "log_dir"}, healthy meaning that /healthz
    answers and these credentials can list the buckets.
    """

    name = "S3 server"
    executable = "weed"
    error = S3ServerError
    not_ready = "no successful write after {timeout:g} s (last error: {last})"
    log_lines = 20

    @property
    def endpoint(self) -> str:
        """``http://HOST:PORT`` of the S3 API."""
        return self.config.endpoint

    @property
    def address(self) -> str:
        return self.endpoint

    def stop(self, timeout: float = 60.0) -> None:
        """Stop the server if it runs: SIGTERM to its process group, SIGKILL after ``timeout``.

        SeaweedFS needs ~15 s to stop on SIGTERM. ``timeout=0`` kills it at once, skipping its
        clean shutdown: for throw-away data (tests).
        """
        super().stop(timeout)

    def client(self, config: Config | None = None) -> Any:
        """A boto3 S3 client for this server: its credentials, path-style addressing, us-east-1.

        ``config`` (a botocore Config) is merged over those defaults, e.g. for timeouts.
        """
        cfg = self.config
        return s3_client(self.endpoint, cfg.access_key, cfg.secret_key, config)

    def aws_env(self) -> SecretEnv:
        """Environment variables that point AWS SDKs (boto3, pyarrow's from_uri, MLflow) here.

        Holds the secret key: pass it to child processes, never log it (its repr masks it).
        """
        return SecretEnv({
            "AWS_ENDPOINT_URL": self.endpoint,
            "AWS_ACCESS_KEY_ID": self.config.access_key,
            "AWS_SECRET_ACCESS_KEY": self.config.secret_key,
            "AWS_DEFAULT_REGION": REGION,
        })

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
        ensure_bucket(self.client(), name)

    # -- the ManagedProcess hooks ------------------------------------------------------

    def _command(self) -> list[str]:
        return self.config.command(find_weed_binary(self.config.weed_binary))

    def _env(self) -> dict[str, str]:
        # The child needs no secret in its environment (it reads identities_file).
        secret_names = {secret for _, secret in CREDENTIAL_ENV_PAIRS}
        return {k: v for k, v in os.environ.items() if k not in secret_names}

    def _ports(self) -> dict[str, int]:
        return self.config.ports

    def _ports_taken(self, busy: dict[str, int]) -> str:
        taken = ", ".join(f"{port} ({name})" for name, port in busy.items())
        return (
            f"cannot start the S3 server: port(s) {taken} on {self.config.host} already in use "
            "by another process; stop it or configure other ports"
        )

    def _prepare(self) -> None:
        cfg = self.config
        for directory in (cfg.log_dir, cfg.store_dir):
            directory.mkdir(exist_ok=True)
        write_private(cfg.identities_file, json.dumps(identities(cfg), indent=2) + "\n")

    def _is_ours(self, cmdline: list[str]) -> bool:
        # A weed server on this data directory.
        return "server" in cmdline and f"-dir={self.config.store_dir}" in cmdline

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

    def _when_running(self, proc: psutil.Process, wait: bool, timeout: float) -> None:
        why = self._health()
        if why is None or not wait:
            return
        if why in _AUTH_ERRORS:
            raise S3ServerError(
                f"the S3 server already running from {self.config.data_dir} (pid {proc.pid}) "
                f"rejects these credentials ({why}): it was started with others; stop it "
                "and start it again"
            )
        self.wait_ready(timeout)

    def _probe_client(self) -> Any:
        return self.client(Config(connect_timeout=2, read_timeout=5, retries={"max_attempts": 1}))

    def _health(self) -> str | None:
        """None when /healthz answers and the credentials can list the buckets, else why not
        (an S3 error code such as InvalidAccessKeyId, or a connection error)."""
        opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))  # no proxy
        try:
            with opener.open(f"{self.endpoint}/healthz", timeout=2) as response:
                if response.status != 200:
                    return f"/healthz answered {response.status}"
        except (OSError, urllib.error.URLError) as err:
            return f"/healthz: {err}"
        try:
            self._probe_client().list_buckets()
        except ClientError as err:
            return error_code(err)
        except BotoCoreError as err:
            return str(err)
        return None

    def _readiness_probe(self) -> Callable[[], str | None]:
        """A put and a delete in the probe bucket: /healthz answers seconds before writes work."""
        client = self._probe_client()
        bucket = self.config.probe_bucket

        def probe() -> str | None:
            try:
                ensure_bucket(client, bucket)
                key = f"probe/{os.getpid()}-{time.time_ns()}"
                client.put_object(Bucket=bucket, Key=key, Body=b"ok")
                client.delete_object(Bucket=bucket, Key=key)
                return None
            except ClientError as err:
                return f"{error_code(err)}: {err}"
            except BotoCoreError as err:
                return str(err)

        return probe

    def _describe(self) -> dict[str, Any]:
        return {
            "endpoint": self.endpoint,
            **super()._describe(),  # data_dir, log_file
            "log_dir": str(self.config.log_dir),
        }

    def _after_stop(self) -> None:
        # weed opens unix sockets in /tmp and leaves them behind.
        ports = self.config.ports
        names = [f"seaweedfs-{s}-{ports[s]}.sock" for s in ("filer", "s3")]
        names += [f"seaweedfs-{s}-grpc-{ports[s + '.grpc']}.sock" for s in SERVICES]
        for name in names:
            path = _SOCKET_DIR / name
            with contextlib.suppress(OSError):
                if stat.S_ISSOCK(path.lstat().st_mode):
                    path.unlink()

    def _excerpt(self, section: list[str]) -> list[str]:
        """The last lines, after this start's fatal errors if any (a fatal error or a panic is
        followed by a long goroutine dump)."""
        n = self.log_lines
        fatal = [ln for ln in section[:-n] if re.match(r"F\d{4} ", ln) or ln.startswith("panic")]
        shown = [*fatal[-5:], "..."] if fatal else []
        return shown + section[-n:]
