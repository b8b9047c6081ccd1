"""A local Ray head node (``ray start --head``) on loopback, managed like the other services.

Single-node and bound to 127.0.0.1 (``RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0``), with its own
``--temp-dir`` and ports, so stopping it never touches another Ray on the machine (no
``ray stop``): we end exactly the processes whose command line names our temp dir.
Token authentication is set explicitly (``RAY_AUTH_MODE``) for every process we start, so a
stray ``~/.ray/auth_token`` cannot silently turn it on.
"""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import sys
import time
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import psutil

from wsdan.services._process import ManagedProcessError


class RayHeadError(ManagedProcessError):
    """A Ray node could not be started or stopped; the message says why and where to look."""


DASHBOARD_TIMEOUT_ENV = "RAY_DASHBOARD_STARTUP_TIMEOUT_S"


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
    # Several nodes may join (RayWorker). Only inside a private network namespace: without
    # the single-node setting Ray takes the machine's interface address and listens on it.
    multi_node: bool = False

    @property
    def address(self) -> str:
        return f"{self.host}:{self.port}"

    @property
    def dashboard_url(self) -> str:
        return f"http://{self.host}:{self.dashboard_port}"


def ray_env(auth_mode: str = "disabled", environ: dict[str, str] | None = None, *,
            multi_node: bool = False) -> dict[str, str]:
    """Environment for any Ray process this project starts (head, driver, job submit):
    ``environ`` (default: ours) with Ray's settings for this project."""
    env = dict(os.environ if environ is None else environ)
    if multi_node:
        env.pop("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", None)
    else:
        env["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"  # single node, bound to 127.0.0.1
    env["RAY_AUTH_MODE"] = auth_mode
    env["RAY_USAGE_STATS_ENABLED"] = "0"
    # `python` in a job's entrypoint is this environment's interpreter (the venv's).
    env["PATH"] = os.pathsep.join([str(Path(sys.executable).parent), env.get("PATH", "")])
    return env


def without_job_settings(environ: dict[str, str] | None = None) -> dict[str, str]:
    """``environ`` (default: ours) less the S3/AWS and MLflow settings: what a head node the
    project starts inherits, so that jobs must bring those in their runtime_env, and a node
    never holds keys from the shell that started it."""
    env = os.environ if environ is None else environ
    return {k: v for k, v in env.items() if not k.startswith(("AWS_", "MLFLOW_"))}


def _ray_cli() -> str:
    exe = Path(sys.executable).with_name("ray")
    return str(exe) if exe.exists() else "ray"


def _processes_matching(match: Callable[[list[str]], bool]) -> list[psutil.Process]:
    """Processes whose command line ``match`` accepts (this process and its parents aside:
    the caller may name a node's temp dir too)."""
    me = psutil.Process()
    skip = {me.pid, *(q.pid for q in me.parents())}
    found = []
    for p in psutil.process_iter(["cmdline"]):
        if p.pid in skip:
            continue
        try:
            if match(p.info["cmdline"] or []):
                found.append(p)
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            continue
    return found


def _processes_naming(marker: str) -> list[psutil.Process]:
    """Processes whose command line names ``marker`` (a node's own temp dir)."""
    return _processes_matching(lambda cmd: any(marker in part for part in cmd))


def _with_descendants(procs: list[psutil.Process]) -> list[psutil.Process]:
    """``procs`` and every process below them. The raylet's agents (``ray::DashboardAgent``,
    ``ray::RuntimeEnvAgent``) and the dashboard's module processes rename themselves and no
    longer name the temp dir: they are found as children."""
    found = {p.pid: p for p in procs}
    for p in procs:
        with contextlib.suppress(psutil.NoSuchProcess, psutil.AccessDenied):
            for child in p.children(recursive=True):
                found.setdefault(child.pid, child)
    return list(found.values())


def _recorded(pid_file: Path) -> list[psutil.Process]:
    """The processes listed in ``pid_file`` (pid and start time, written once the node was
    up) that still run: an agent whose raylet died is nobody's child any more."""
    try:
        entries = json.loads(pid_file.read_text())
    except (OSError, ValueError):
        return []
    alive = []
    for pid, created in entries:
        with contextlib.suppress(psutil.NoSuchProcess, psutil.AccessDenied):
            p = psutil.Process(pid)
            if abs(p.create_time() - created) < 1e-3:  # not a reused pid
                alive.append(p)
    return alive


def _record(pid_file: Path, procs: list[psutil.Process]) -> None:
    entries = []
    for p in procs:
        with contextlib.suppress(psutil.NoSuchProcess, psutil.AccessDenied):
            entries.append((p.pid, p.create_time()))
    pid_file.write_text(json.dumps(entries))


def _terminate(procs: list[psutil.Process], timeout: float) -> None:
    """SIGTERM to all, SIGKILL to those still up after ``timeout`` (one of Ray's agents
    ignores SIGTERM)."""
    for p in procs:
        with contextlib.suppress(psutil.NoSuchProcess, psutil.AccessDenied):
            p.terminate()
    _, alive = psutil.wait_procs(procs, timeout=timeout)
    for p in alive:
        with contextlib.suppress(psutil.NoSuchProcess, psutil.AccessDenied):
            p.kill()
    psutil.wait_procs(alive, timeout=10)


class RayHead:
    def __init__(self, config: RayHeadConfig) -> None:
        self.config = config

    def _ray(self) -> str:
        return _ray_cli()

    @property
    def pid_file(self) -> Path:
        return self.config.temp_dir / "wsdan-pids.json"

    def processes(self) -> list[psutil.Process]:
        """Processes of *this* head: those whose command line names our temp dir, Ray's
        client server (``ray.util.client.server``: it names only the head's address, and
        ``ray start`` leaves it without a parent), the processes below them (Ray's agents
        rename themselves), and any process recorded when the head came up that still runs."""
        temp_dir, address = str(self.config.temp_dir), f"--address={self.config.address}"
        found = _with_descendants(_processes_matching(lambda cmd: any(
            temp_dir in part or (part == address and "ray.util.client.server" in cmd)
            for part in cmd)))
        pids = {p.pid for p in found}
        return found + [p for p in _recorded(self.pid_file) if p.pid not in pids]

    def healthy(self) -> bool:
        try:
            with urllib.request.urlopen(f"{self.config.dashboard_url}/api/version", timeout=2) as r:
                return r.status == 200 and "ray_version" in json.loads(r.read())
        except Exception:
            return False

    def start(self, timeout: float = 300, environ: dict[str, str] | None = None) -> None:
        """Idempotent: a running head of this config is left alone.

        ``environ`` (default: ours) is inherited by every Ray process of the node (workers,
        job drivers). The project's own heads get no S3 or MLflow settings this way: jobs
        bring them in their ``runtime_env``.

        ``timeout`` bounds ``ray start`` and the dashboard's start (Ray's own limit, 60 s,
        is raised to it unless RAY_DASHBOARD_STARTUP_TIMEOUT_S is set): on a fresh install
        on two cores the dashboard's first start, which compiles its modules, took longer
        than 60 s, and ``ray start`` gave up. A failed start leaves no process behind."""
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
        env = ray_env(c.auth_mode, environ, multi_node=c.multi_node)
        env.setdefault(DASHBOARD_TIMEOUT_ENV, str(int(timeout)))
        try:
            limit = max(timeout, float(env[DASHBOARD_TIMEOUT_ENV])) + 30
        except ValueError:
            raise RayHeadError(f"{DASHBOARD_TIMEOUT_ENV}={env[DASHBOARD_TIMEOUT_ENV]!r}: "
                               "give a number of seconds") from None
        try:
            with open(log, "ab") as out:
                proc = subprocess.run(cmd, stdout=out, stderr=subprocess.STDOUT, env=env,
                                      timeout=limit)
        except subprocess.TimeoutExpired:
            self.stop()
            raise RayHeadError(f"ray start did not finish within {limit:.0f}s; "
                               f"see {log}") from None
        if proc.returncode != 0:
            self.stop()
            raise RayHeadError(f"ray start failed (exit {proc.returncode}); see {log}:\n"
                               + log.read_text()[-2000:])
        deadline = time.monotonic() + timeout
        while not self.healthy():
            if time.monotonic() > deadline:
                raise RayHeadError(f"Ray dashboard at {c.dashboard_url} not up after "
                                   f"{timeout:.0f}s; see {log}")
            time.sleep(0.5)
        _record(self.pid_file, self.processes())

    def stop(self, timeout: float = 10) -> None:
        """End every process of this head (see :meth:`processes`): SIGTERM, then SIGKILL
        after ``timeout`` seconds."""
        _terminate(self.processes(), timeout)
        self.pid_file.unlink(missing_ok=True)

    def status(self) -> dict:
        procs = self.processes()
        return {"running": bool(procs), "healthy": self.healthy() if procs else False,
                "address": self.config.address, "dashboard": self.config.dashboard_url,
                "processes": len(procs)}


@dataclass(frozen=True)
class RayWorkerConfig:
    """A worker node joining a head started with ``multi_node=True`` (same machine, its own
    temp dir and ports). ``name`` becomes a custom resource ``wsdan_node_<name>: 1``, by
    which the node is found (and can be targeted)."""

    head: RayHeadConfig
    name: str
    temp_dir: Path
    num_cpus: int = 2
    dashboard_agent_listen_port: int | None = None  # must differ between nodes of a machine
    metrics_export_port: int | None = None
    min_worker_port: int = 22000
    max_worker_port: int = 22199

    @property
    def resource(self) -> str:
        return f"wsdan_node_{self.name}"


class RayWorker:
    def __init__(self, config: RayWorkerConfig) -> None:
        self.config = config

    def processes(self) -> list[psutil.Process]:
        return _with_descendants(_processes_naming(str(self.config.temp_dir)))

    def raylet(self) -> psutil.Process | None:
        """This node's raylet (kill it to take the node down as a crash would)."""
        for p in self.processes():
            with contextlib.suppress(psutil.NoSuchProcess):
                if Path((p.cmdline() or [""])[0]).name == "raylet":
                    return p
        return None

    def alive(self) -> bool:
        """Whether the cluster lists this node as alive (the head's State API)."""
        url = f"{self.config.head.dashboard_url}/api/v0/nodes?limit=1000"
        try:
            with urllib.request.urlopen(url, timeout=5) as r:
                nodes = json.loads(r.read())["data"]["result"]["result"]
        except Exception:
            return False
        return any(n.get("state") == "ALIVE"
                   and self.config.resource in (n.get("resources_total") or {})
                   for n in nodes)

    def start(self, timeout: float = 120, environ: dict[str, str] | None = None) -> None:
        c = self.config
        c.temp_dir.mkdir(parents=True, exist_ok=True)
        cmd = [_ray_cli(), "start", f"--address={c.head.address}", f"--num-cpus={c.num_cpus}",
               f"--resources={json.dumps({c.resource: 1})}", f"--temp-dir={c.temp_dir}",
               f"--min-worker-port={c.min_worker_port}",
               f"--max-worker-port={c.max_worker_port}", "--disable-usage-stats"]
        for flag, value in (("dashboard-agent-listen-port", c.dashboard_agent_listen_port),
                            ("metrics-export-port", c.metrics_export_port)):
            if value is not None:
                cmd.append(f"--{flag}={value}")
        log = c.temp_dir / "ray-start.log"
        for attempt in (1, 2):
            with open(log, "ab") as out:
                proc = subprocess.run(cmd, stdout=out, stderr=subprocess.STDOUT, timeout=timeout,
                                      env=ray_env(c.head.auth_mode, environ,
                                                  multi_node=c.head.multi_node))
            # On a loaded machine a node's start can miss Ray's own startup deadline ("timed
            # out during startup", the GCS did not answer in time): clean up, try once more.
            if proc.returncode == 0 or attempt == 2 or "timed out during startup" not in \
                    log.read_text()[-4000:]:
                break
            self.stop()
        if proc.returncode != 0:
            raise RayHeadError(f"ray start (worker {c.name}) failed (exit {proc.returncode}); "
                               f"see {log}:\n" + log.read_text()[-2000:])
        deadline = time.monotonic() + timeout
        while not self.alive():
            if time.monotonic() > deadline:
                raise RayHeadError(f"worker node {c.name} did not join {c.head.address} in "
                                   f"{timeout:.0f}s; see {log}")
            time.sleep(0.5)

    def stop(self, timeout: float = 10) -> None:
        _terminate(self.processes(), timeout)
