"""Helpers shared by the managed local services: free ports, private files, process groups.

Nothing here knows which server it runs: `wsdan.services.seaweedfs` and
`wsdan.services.mlflow_server` start their processes with ``start_new_session=True`` (so
each leads its own process group) and record the pid in a private file under their data_dir.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
from pathlib import Path

__all__ = ["find_free_port", "find_free_ports", "port_in_use", "signal_group", "write_private"]


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
    with contextlib.suppress(ProcessLookupError):
        if os.getpgid(pid) == pid:  # started with start_new_session: it leads its own group
            os.killpg(pid, sig)
        else:
            os.kill(pid, sig)
