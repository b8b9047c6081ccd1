"""A Ray head and worker nodes on this machine, each its own `ray start` with its own temp
dir and ports: the multi-node cluster of the tests, also usable by hand for benchmarks.
Inside a private network namespace only (``netns.sh``): there, loopback is the only
interface, so the nodes cannot bind the machine's real ones.

    tests/multinode/netns.sh .venv/bin/python -m tests.multinode.cluster [--workers 2] \\
        [--cpus-per-worker 3] -- COMMAND ...

runs COMMAND with RAY_ADDRESS and RAY_DASHBOARD_URL set to the cluster, then stops it.
"""

from __future__ import annotations

import argparse
import contextlib
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path


def in_private_netns() -> bool:
    """True when loopback is the only network interface of this process's namespace."""
    return [name for _, name in socket.if_nameindex()] == ["lo"]


@dataclass
class Cluster:
    head: object  # wsdan.services.ray_head.RayHead
    workers: list  # RayWorker, one per worker node

    @property
    def dashboard_url(self) -> str:
        return self.head.config.dashboard_url

    @property
    def address(self) -> str:
        return self.head.config.address


@contextlib.contextmanager
def local_cluster(workers: int = 2, cpus_per_worker: int = 3,
                  head_cpus: int = 0) -> Iterator[Cluster]:
    """Head (``head_cpus`` CPUs: 0, as a KubeRay head) and ``workers`` worker nodes. The
    nodes get no S3 or MLflow settings: jobs bring those in their runtime_env."""
    from wsdan.services import find_free_ports
    from wsdan.services.ray_head import (
        RayHead,
        RayHeadConfig,
        RayWorker,
        RayWorkerConfig,
        without_job_settings,
    )

    if not in_private_netns():
        raise RuntimeError("a multi-node cluster on one machine runs only inside a private "
                           "network namespace: use tests/multinode/netns.sh")
    root = Path(tempfile.mkdtemp(prefix="wsdan-mn-", dir="/tmp"))
    gcs, dash, client, agent, metrics, *ports = find_free_ports(5 + 2 * workers)
    head = RayHead(RayHeadConfig(temp_dir=root / "head", port=gcs, dashboard_port=dash,
                                 num_cpus=head_cpus, client_server_port=client,
                                 dashboard_agent_listen_port=agent,
                                 metrics_export_port=metrics, multi_node=True))
    env = without_job_settings()
    nodes = []
    try:
        head.start(environ=env, timeout=300)  # seconds idle; minutes on a loaded machine
        for i in range(workers):
            w = RayWorker(RayWorkerConfig(
                head=head.config, name=f"w{i + 1}", temp_dir=root / f"w{i + 1}",
                num_cpus=cpus_per_worker, dashboard_agent_listen_port=ports[2 * i],
                metrics_export_port=ports[2 * i + 1],
                min_worker_port=22000 + 200 * i, max_worker_port=22199 + 200 * i))
            w.start(environ=env, timeout=300)
            nodes.append(w)
        yield Cluster(head=head, workers=nodes)
    finally:
        for w in nodes:
            w.stop()
        head.stop()
        shutil.rmtree(root, ignore_errors=True)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--cpus-per-worker", type=int, default=3)
    p.add_argument("command", nargs=argparse.REMAINDER)
    args = p.parse_args(argv)
    command = args.command[1:] if args.command[:1] == ["--"] else args.command
    if not command:
        p.error("give a command after --")
    # SIGTERM (timeout, kill) unwinds through local_cluster's cleanup like Ctrl-C does.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    with local_cluster(args.workers, args.cpus_per_worker) as cluster:
        from wsdan.services.ray_head import ray_env

        env = ray_env(multi_node=True)
        env.update(RAY_ADDRESS=cluster.address, RAY_DASHBOARD_URL=cluster.dashboard_url)
        print(f"[cluster] head {cluster.address}, dashboard {cluster.dashboard_url}, "
              f"{args.workers} worker node(s) of {args.cpus_per_worker} CPUs", flush=True)
        return subprocess.run(command, env=env).returncode


if __name__ == "__main__":
    sys.exit(main())
