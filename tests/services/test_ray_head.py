"""A Ray head that cannot start: one clear error naming its log, and no process left behind.

The real failure this guards: on a fresh install on two cores the dashboard's first start
took longer than Ray's 60 s and ``ray start`` gave up half-way, leaving a traceback and the
node's GCS running. Here the dashboard is given 0 s (the user's own
RAY_DASHBOARD_STARTUP_TIMEOUT_S, which the head must respect), so ``ray start`` fails the
same way, at once.
"""

from __future__ import annotations

import tempfile
from pathlib import Path

import pytest

from wsdan.cli import user_errors
from wsdan.services import find_free_ports
from wsdan.services.ray_head import (
    DASHBOARD_TIMEOUT_ENV,
    RayHead,
    RayHeadConfig,
    RayHeadError,
    without_job_settings,
)

pytestmark = pytest.mark.slow


def test_failed_ray_start_is_a_user_error_and_leaves_nothing_running():
    gcs, dash, client, agent, metrics = find_free_ports(5)
    temp_dir = Path(tempfile.mkdtemp(prefix="wsdan-rf-", dir="/tmp"))
    head = RayHead(RayHeadConfig(temp_dir=temp_dir, port=gcs, dashboard_port=dash, num_cpus=1,
                                 client_server_port=client, dashboard_agent_listen_port=agent,
                                 metrics_export_port=metrics))
    environ = without_job_settings()
    environ[DASHBOARD_TIMEOUT_ENV] = "0"
    try:
        with pytest.raises(RayHeadError) as caught:
            head.start(timeout=60, environ=environ)
        assert "ray start failed" in str(caught.value)
        assert str(temp_dir / "ray-start.log") in str(caught.value)
        assert isinstance(caught.value, user_errors())  # the CLI prints it as one error line
        assert head.processes() == []
        assert not head.pid_file.exists()
    finally:
        head.stop()
