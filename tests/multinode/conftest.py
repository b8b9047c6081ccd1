"""A real multi-node Ray cluster on this machine: a head and two worker nodes, each its own
`ray start` (own temp dir and ports), inside a private network namespace so that nothing
leaves loopback. Run with ``make test`` (or ``tests/multinode/netns.sh python -m pytest -m
multinode tests/multinode``); outside such a namespace these tests skip, saying so.

The head has no CPUs for tasks (as a KubeRay head with ``num-cpus: 0``): the training
workers, Ray Data and the job's work all run on the worker nodes; the job's driver runs on
the head. None of the nodes knows S3 or MLflow: jobs bring them in their runtime_env.
"""

from __future__ import annotations

import shutil
import socket
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest


def in_private_netns() -> bool:
    """True when loopback is the only network interface of this process's namespace."""
    return [name for _, name in socket.if_nameindex()] == ["lo"]


def pytest_collection_modifyitems(config, items):
    if in_private_netns():
        return
    skip = pytest.mark.skip(reason="multi-node tests run inside a private network namespace "
                                   "(make test does: tests/multinode/netns.sh python -m "
                                   "pytest -m multinode tests/multinode)")
    for item in items:
        if "multinode" in item.keywords:
            item.add_marker(skip)


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


@pytest.fixture(scope="module")
def multinode_cluster() -> Iterator[Cluster]:
    from wsdan.services import find_free_ports
    from wsdan.services.ray_head import (
        RayHead,
        RayHeadConfig,
        RayWorker,
        RayWorkerConfig,
        without_job_settings,
    )

    if not in_private_netns():
        pytest.skip("needs a private network namespace (tests/multinode/netns.sh)")
    root = Path(tempfile.mkdtemp(prefix="wsdan-mn-", dir="/tmp"))
    gcs, dash, client, agent, metrics, *ports = find_free_ports(9)
    head = RayHead(RayHeadConfig(temp_dir=root / "head", port=gcs, dashboard_port=dash,
                                 num_cpus=0, client_server_port=client,
                                 dashboard_agent_listen_port=agent,
                                 metrics_export_port=metrics, multi_node=True))
    env = without_job_settings()
    head.start(environ=env)
    workers = []
    try:
        for i in range(2):
            w = RayWorker(RayWorkerConfig(
                head=head.config, name=f"w{i + 1}", temp_dir=root / f"w{i + 1}", num_cpus=3,
                dashboard_agent_listen_port=ports[2 * i],
                metrics_export_port=ports[2 * i + 1],
                min_worker_port=22000 + 200 * i, max_worker_port=22199 + 200 * i))
            w.start(environ=env)
            workers.append(w)
        yield Cluster(head=head, workers=workers)
    finally:
        for w in workers:
            w.stop()
        head.stop()
        shutil.rmtree(root, ignore_errors=True)
