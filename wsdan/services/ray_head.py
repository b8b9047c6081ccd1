"""A local Ray head node (``ray start --head``) on loopback, managed like the other services.

Single-node and bound to 127.0.0.1 (``RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0``), with its own
``--temp-dir`` and ports, so stopping it never touches another Ray on the machine (no
``ray stop``): we end exactly the processes whose command line names our temp dir.
Token authentication is set explicitly (``RAY_AUTH_MODE``) for every process we start, so a
stray ``~/.ray/auth_token`` cannot silently turn it on (environment.md, 'Token auth').
"""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import sys
import time
import urllib.request
from dataclasses import dataclass
from pathlib import Path

import psutil


class RayHeadError(RuntimeError):
    pass


@dataclass(frozen=True)
class RayHeadConfig:
    temp_dir: Path  # keep it short: Ray's unix socket paths must stay under ~107 characters
    port: int = 6380  # GCS
    dashboard_port: int = 8265  # dashboard + job server (ray job submit)
    host: str = "127.0.0.1"
    num_cpus: int | None = None
    # Outside SeaweedFS's gRPC ports (18333...) and Ray's default 10002-19999 range.
    min_worker_port: int = 21000
    max_worker_port: int = 21999
    auth_mode: str = "disabled"
    # Ray's other fixed ports; None keeps Ray's default (set them to run two heads at once).
    client_server_port: int | None = None  # Ray's default 10001
    dashboard_agent_listen_port: int | None = None  # 52365
    metrics_export_port: int | None = None

    @property
    def address(self) -> str:
        return f"{self.host}:{self.port}"

    @property
    def dashboard_url(self) -> str:
        return f"http://{self.host}:{self.dashboard_port}"


def ray_env(auth_mode: str = "disabled") -> dict[str, str]:
    """Environment for any Ray process this project starts (head, driver, job submit)."""
    env = dict(os.environ)
    env["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"  # single node, bound to 127.0.0.1
    env["RAY_AUTH_MODE"] = auth_mode
    env["RAY_USAGE_STATS_ENABLED"] = "0"
    # `python` in a job's entrypoint is this environment's interpreter (the venv's).
    env["PATH"] = os.pathsep.join([str(Path(sys.executable).parent), env.get("PATH", "")])
    return env


class RayHead:
    def __init__(self, config: RayHeadConfig) -> None:
        self.config = config

    def _ray(self) -> str:
        exe = Path(sys.executable).with_name("ray")
        return str(exe) if exe.exists() else "ray"

    def processes(self) -> list[psutil.Process]:
        """Processes of *this* head: their command line names our temp dir."""
        marker = str(self.config.temp_dir)
        me = psutil.Process()
        skip = {me.pid, *(q.pid for q in me.parents())}  # the caller may name the dir too
        found = []
        for p in psutil.process_iter(["cmdline"]):
            if p.pid in skip:
                continue
            try:
                if any(marker in part for part in (p.info["cmdline"] or [])):
                    found.append(p)
            except (psutil.NoSuchProcess, psutil.AccessDenied):
                continue
        return found

    def healthy(self) -> bool:
        try:
            with urllib.request.urlopen(f"{self.config.dashboard_url}/api/version", timeout=2) as r:
                return r.status == 200 and "ray_version" in json.loads(r.read())
        except Exception:
            return False

    def start(self, timeout: float = 120, extra_env: dict[str, str] | None = None) -> None:
        """Idempotent: a running head of this config is left alone.

        ``extra_env`` reaches every Ray process of the node (workers, job drivers): how the
        local stack hands its S3 endpoint and credentials to jobs without putting them in a
        job submission, as a cluster's nodes would carry their own credentials."""
        c = self.config
        if self.processes() and self.healthy():
            return
        if self.processes():
            self.stop()
        c.temp_dir.mkdir(parents=True, exist_ok=True)
        cmd = [self._ray(), "start", "--head", f"--port={c.port}",
               f"--node-ip-address={c.host}", f"--dashboard-host={c.host}",
               f"--dashboard-port={c.dashboard_port}", "--include-dashboard=true",
               f"--temp-dir={c.temp_dir}", f"--min-worker-port={c.min_worker_port}",
               f"--max-worker-port={c.max_worker_port}", "--disable-usage-stats"]
        if c.num_cpus is not None:
            cmd.append(f"--num-cpus={c.num_cpus}")
        for flag, value in (("ray-client-server-port", c.client_server_port),
                            ("dashboard-agent-listen-port", c.dashboard_agent_listen_port),
                            ("metrics-export-port", c.metrics_export_port)):
            if value is not None:
                cmd.append(f"--{flag}={value}")
        log = c.temp_dir / "ray-start.log"
        with open(log, "ab") as out:
            proc = subprocess.run(cmd, stdout=out, stderr=subprocess.STDOUT,
                                  env={**ray_env(c.auth_mode), **(extra_env or {})},
                                  timeout=timeout)
        if proc.returncode != 0:
            raise RayHeadError(f"ray start failed (exit {proc.returncode}); see {log}:\n"
                               + log.read_text()[-2000:])
        deadline = time.monotonic() + timeout
        while not self.healthy():
            if time.monotonic() > deadline:
                raise RayHeadError(f"Ray dashboard at {c.dashboard_url} not up after "
                                   f"{timeout:.0f}s; see {log}")
            time.sleep(0.5)

    def stop(self, timeout: float = 10) -> None:
        procs = self.processes()
        for p in procs:
            with contextlib.suppress(psutil.NoSuchProcess):
                p.terminate()
        _, alive = psutil.wait_procs(procs, timeout=timeout)
        for p in alive:
            with contextlib.suppress(psutil.NoSuchProcess):
                p.kill()

    def status(self) -> dict:
        procs = self.processes()
        return {"running": bool(procs), "healthy": self.healthy() if procs else False,
                "address": self.config.address, "dashboard": self.config.dashboard_url,
                "processes": len(procs)}
