"""What the managed local services share: free ports, private files, process groups, and
:class:`ManagedProcess`, the one way a server runs in the background.

A managed server keeps all its state under one ``data_dir``, so the process that starts it
and the one that stops it need share nothing else::

    pid          pid of the running server (also its process-group id), mode 0600
    server.log   the server's stdout/stderr; appended, one ``====`` header per start

`wsdan.services.seaweedfs` (S3) and `wsdan.services.mlflow_server` (MLflow) subclass it with
what differs: the command line and its environment, the ports, the files to write first, how
to recognise their process, and what "ready" and "healthy" mean. (`wsdan.services.ray_head`
is not one: ``ray start`` daemonizes, so there is no process of ours to keep a pid of.)
"""

from __future__ import annotations

import contextlib
import logging
import os
import shlex
import signal
import socket
import subprocess
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, ClassVar, Generic, Protocol, TypeVar

import psutil

__all__ = [
    "ManagedProcess",
    "ManagedProcessError",
    "find_free_port",
    "find_free_ports",
    "port_in_use",
    "signal_group",
    "write_private",
]


def find_free_ports(count: int, host: str = "127.0.0.1") -> list[int]:
    """``count`` distinct TCP ports free on ``host`` now (chosen by the kernel; for tests).

    Another process may take one before it is used: a small race that tests accept.
    """
    with contextlib.ExitStack() as stack:
        socks = [stack.enter_context(socket.socket()) for _ in range(count)]
        for sock in socks:  # all bound at once, so the kernel hands out distinct ports
            sock.bind((host, 0))
        return [sock.getsockname()[1] for sock in socks]


def find_free_port(host: str = "127.0.0.1") -> int:
    """One TCP port free on ``host`` now (see :func:`find_free_ports`)."""
    return find_free_ports(1, host)[0]


def port_in_use(port: int, host: str = "127.0.0.1") -> bool:
    """Whether something listens on (or holds) ``host:port``."""
    with socket.socket() as sock:
        # Go's listeners set SO_REUSEADDR too: a port held only by TIME_WAIT counts as free.
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((host, port))
        except OSError:
            return True
        return False


def write_private(path: Path, text: str) -> None:
    """Write ``text`` to ``path`` atomically, readable by the owner only (mode 0600)."""
    tmp = path.with_name(path.name + ".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(text)
    os.chmod(tmp, 0o600)  # O_CREAT's mode does not apply to a file left by an earlier run
    os.replace(tmp, path)


def signal_group(pid: int, sig: signal.Signals) -> None:
    """Send ``sig`` to ``pid``'s process group if it leads one, else to ``pid`` alone."""
    with contextlib.suppress(ProcessLookupError, PermissionError):
        if os.getpgid(pid) == pid:  # started with start_new_session: it leads its own group
            os.killpg(pid, sig)
        else:
            os.kill(pid, sig)


class ManagedProcessError(RuntimeError):
    """A managed server could not be started, reached or stopped; the message says why and
    where to look. Each service raises its own subclass."""


class ServiceConfig(Protocol):
    """What :class:`ManagedProcess` reads of a service's config."""

    @property
    def data_dir(self) -> Path: ...
    @property
    def host(self) -> str: ...
    @property
    def pid_file(self) -> Path: ...
    @property
    def server_log(self) -> Path: ...


class DataDirFiles:
    """The files a managed server keeps in its config's ``data_dir``: its pid file and its
    log. Mixed into each service's config dataclass."""

    data_dir: Path

    @property
    def pid_file(self) -> Path:
        return self.data_dir / "pid"

    @property
    def server_log(self) -> Path:
        return self.data_dir / "server.log"


ConfigT = TypeVar("ConfigT", bound=ServiceConfig)
_Self = TypeVar("_Self", bound="ManagedProcess[Any]")


class ManagedProcess(Generic[ConfigT]):
    """One server run in the background from ``config.data_dir``.

    Any process can start, stop or query it: the state is the pid file, not this object.
    The server leads its own process group (``start_new_session``), so it outlives the CLI
    that started it and one signal reaches all its processes.

    A subclass sets the class attributes and implements the hooks below the public methods.
    """

    name: ClassVar[str]  # in logs and messages: "S3 server"
    executable: ClassVar[str]  # in "the weed process exited"
    error: ClassVar[type[ManagedProcessError]]
    # Why start/wait_ready gave up, formatted with ``timeout`` and ``last`` (the probe's last
    # answer).
    not_ready: ClassVar[str]
    log_lines: ClassVar[int] = 25  # lines of server.log shown in a failure message

    def __init__(self, config: ConfigT) -> None:
        self.config = config
        self._proc: subprocess.Popen[bytes] | None = None  # set when this object started it
        self._log = logging.getLogger(type(self).__module__)

    def __repr__(self) -> str:
        # The config's own repr: its secrets are fields with repr=False.
        return f"{type(self).__name__}({self.config!r})"

    def __enter__(self: _Self) -> _Self:
        self.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.stop()

    @property
    def address(self) -> str:
        """Where clients reach the server (``http://HOST:PORT``)."""
        raise NotImplementedError

    def pid(self) -> int | None:
        """Pid of the server recorded in ``data_dir/pid`` if it is alive and serves data_dir."""
        proc = self._process()
        return None if proc is None else proc.pid

    def start(self, wait: bool = True, timeout: float = 90.0) -> None:
        """Start the server, or do nothing when the one recorded in data_dir is alive.

        With ``wait``, return once it is ready, or raise (and stop what was started) after
        ``timeout`` seconds or when the process exits.
        """
        cfg = self.config
        running = self._process()
        if running is not None:
            self._check_running_matches(running)
            self._when_running(running, wait, timeout)
            return
        command = self._command()
        busy = {name: port for name, port in self._ports().items() if port_in_use(port, cfg.host)}
        if busy:
            raise self.error(self._ports_taken(busy))
        cfg.data_dir.mkdir(mode=0o700, parents=True, exist_ok=True)  # keys and data inside
        self._prepare()
        env = self._env()
        started = time.monotonic()
        with open(cfg.server_log, "ab") as out:
            out.write(f"==== {time.strftime('%Y-%m-%d %H:%M:%S')} {shlex.join(command)}\n".encode())
            out.flush()
            self._proc = subprocess.Popen(
                command,
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
                cwd=cfg.data_dir,  # anything the server writes relative to the cwd stays here
                env=env,
                start_new_session=True,  # outlives the CLI that started it; one group to signal
            )
        write_private(cfg.pid_file, f"{self._proc.pid}\n")
        self._log.info("%s started, pid %d, %s", self.name, self._proc.pid, self.address)
        if not wait:
            return
        why = self._wait_ready(timeout)
        if why is not None:
            self.stop()  # leave nothing half-started behind
            raise self.error(self._failure_message(f"failed to start: {why}"))
        self._log.info("%s ready at %s in %.1f s", self.name, self.address,
                       time.monotonic() - started)

    def wait_ready(self, timeout: float = 90.0) -> None:
        """Block until the server is ready; raise after ``timeout`` seconds."""
        why = self._wait_ready(timeout)
        if why is not None:
            raise self.error(self._failure_message(f"not ready: {why}"))

    def stop(self, timeout: float = 30.0) -> None:
        """Stop the server if it runs: SIGTERM to its process group, SIGKILL after ``timeout``
        (at once with ``timeout=0``); then SIGKILL to what is left of the group."""
        proc = self._process()
        if proc is not None:
            self._log.info("stopping %s pid %d", self.name, proc.pid)
            leader = False
            with contextlib.suppress(ProcessLookupError):
                leader = os.getpgid(proc.pid) == proc.pid
            signal_group(proc.pid, signal.SIGTERM)
            if not self._wait_gone(proc, timeout):
                if timeout > 0:
                    self._log.warning("%s pid %d up %g s after SIGTERM: SIGKILL", self.name,
                                      proc.pid, timeout)
                signal_group(proc.pid, signal.SIGKILL)
                if not self._wait_gone(proc, 10.0):
                    raise self.error(f"{self.name} pid {proc.pid} survived SIGKILL")
            if leader:  # a worker that outlived the main process is still in its group
                with contextlib.suppress(ProcessLookupError, PermissionError):
                    os.killpg(proc.pid, signal.SIGKILL)
            self._after_stop()
        self.config.pid_file.unlink(missing_ok=True)
        self._proc = None

    def status(self) -> dict[str, Any]:
        """{"running", "pid", "healthy", then the service's own fields (see _describe)}."""
        proc = self._process()
        return {
            "running": proc is not None,
            "pid": None if proc is None else proc.pid,
            "healthy": proc is not None and self._health() is None,
            **self._describe(),
        }

    # -- hooks: what a subclass says about its server ------------------------------------

    def _command(self) -> list[str]:
        """The command line (no secret in it); may raise (e.g. no binary)."""
        raise NotImplementedError

    def _env(self) -> dict[str, str]:
        """The server's environment."""
        return dict(os.environ)

    def _ports(self) -> dict[str, int]:
        """Every port the server will listen on, by name; all must be free to start."""
        raise NotImplementedError

    def _ports_taken(self, busy: dict[str, int]) -> str:
        """The error message when the ports ``busy`` are in use."""
        raise NotImplementedError

    def _prepare(self) -> None:
        """Write what the server needs before it starts (data_dir exists)."""

    def _is_ours(self, cmdline: list[str]) -> bool:
        """Whether a live process with this command line is this service on data_dir (a pid
        file can outlive its process and the pid be reused)."""
        raise NotImplementedError

    def _check_running_matches(self, proc: psutil.Process) -> None:
        """Raise when the server running from data_dir listens elsewhere than the config says."""

    def _when_running(self, proc: psutil.Process, wait: bool, timeout: float) -> None:
        """start() found the server running (and matching the config)."""
        if wait:
            self.wait_ready(timeout)

    def _health(self) -> str | None:
        """None when the server answers as it should, else why not."""
        raise NotImplementedError

    def _readiness_probe(self) -> Callable[[], str | None]:
        """A check repeated until it returns None (ready), else why not; default: _health."""
        return self._health

    def _describe(self) -> dict[str, Any]:
        """status()'s fields after running, pid and healthy."""
        return {"data_dir": str(self.config.data_dir), "log_file": str(self.config.server_log)}

    def _after_stop(self) -> None:
        """Clean up after the server stopped (it ran, and is gone now)."""

    def _excerpt(self, section: list[str]) -> list[str]:
        """What a failure message shows of this start's log lines: the last non-blank ones
        (a Python traceback ends there)."""
        return [ln for ln in section if ln.strip()][-self.log_lines :]

    # -- internals -----------------------------------------------------------------------

    def _process(self) -> psutil.Process | None:
        if self._proc is not None and self._proc.poll() is None:  # poll reaps it if it exited
            # Our own child is the server whatever its cmdline says: between fork and exec it
            # still shows this process's command line, and _is_ours would miss it.
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
        return proc if self._is_ours(cmdline) else None

    def _wait_ready(self, timeout: float) -> str | None:
        """None once the readiness probe passes, else why not."""
        deadline = time.monotonic() + timeout
        probe = self._readiness_probe()
        while True:
            if self._process() is None:
                code = None if self._proc is None else self._proc.poll()
                return f"the {self.executable} process exited" + (
                    "" if code is None else f" with code {code}"
                )
            why = probe()
            if why is None:
                return None
            if time.monotonic() >= deadline:
                return self.not_ready.format(timeout=timeout, last=why)
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
            f"{self.name} ({self.address}, data in {cfg.data_dir}) {what}\n"
            f"--- {cfg.server_log} (last lines of this start) ---\n{self._log_excerpt()}\n"
            f"--- full log: {cfg.server_log}"
        )

    def _log_excerpt(self) -> str:
        """This start's lines of server.log (after the latest header), as _excerpt picks them."""
        try:
            text = self.config.server_log.read_text(errors="replace")
        except OSError as err:
            return f"(cannot read: {err})"
        section = text.rsplit("\n==== ", 1)[-1].splitlines()[1:]  # drop the header line
        shown = self._excerpt(section)
        return "\n".join(shown) if shown else "(empty)"
