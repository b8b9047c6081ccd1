"""A real multi-node Ray cluster on this machine: a head and two worker nodes, each its own
`ray start` (own temp dir and ports), inside a private network namespace so that nothing
leaves loopback. Run with ``make test`` (or ``tests/multinode/netns.sh python -m pytest -m
multinode tests/multinode``); outside such a namespace these tests skip, saying so.

The head has no CPUs for tasks (as a KubeRay head with ``num-cpus: 0``): the training
workers, Ray Data and the job's work all run on the worker nodes; the job's driver runs on
the head. None of the nodes knows S3 or MLflow: jobs bring them in their runtime_env.
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from tests.multinode.cluster import Cluster, in_private_netns, local_cluster


def pytest_collection_modifyitems(config, items):
    if in_private_netns():
        return
    skip = pytest.mark.skip(reason="multi-node tests run inside a private network namespace "
                                   "(make test does: tests/multinode/netns.sh python -m "
                                   "pytest -m multinode tests/multinode)")
    for item in items:
        if "multinode" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="module")
def multinode_cluster() -> Iterator[Cluster]:
    if not in_private_netns():
        pytest.skip("needs a private network namespace (tests/multinode/netns.sh)")
    with local_cluster(workers=2, cpus_per_worker=3, head_cpus=0) as cluster:
        yield cluster
