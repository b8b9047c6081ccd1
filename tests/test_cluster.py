"""Cluster checks made before any work (wsdan.cluster): node-local locations on a cluster of
several nodes, and resources against what the cluster has now or can scale to."""

from __future__ import annotations

import pytest

from wsdan.cluster import (
    ClusterView,
    check_node_local,
    node_local_problems,
    plan_resources,
    wait_for_resources,
)
from wsdan.config import ConfigError

REMOTE = {"storage_path": "s3://b/runs", "weights": "s3://b/w.pt", "data_source": "s3://b/data",
          "tracking_uri": "http://mlflow:5000"}
ONE_NODE = ClusterView(nodes=[{"CPU": 8.0}])
THREE_NODES = ClusterView(nodes=[{"CPU": 2.0}, {"CPU": 4.0}, {"CPU": 4.0}])
# A KubeRay-style cluster: a head without CPUs; a GPU group that starts at zero (max 4 of
# 8 CPU + 1 GPU) and can scale to 32 CPU, 4 GPU.
KUBERAY = ClusterView(nodes=[{"CPU": 0.0}], max_total={"CPU": 32.0, "GPU": 4.0},
                      group_nodes=[{"CPU": 8.0, "GPU": 1.0}])


def test_remote_locations_have_no_problems():
    assert node_local_problems(**REMOTE) == []


@pytest.mark.parametrize(("key", "value", "named"), [
    ("storage_path", ".wsdan/runs", "--storage-path '.wsdan/runs'"),
    ("storage_path", "file:///mnt/runs", "--storage-path"),
    ("weights", "/data/w.pt", "model.weights '/data/w.pt'"),
    ("data_source", "data/cub", "data.source 'data/cub'"),
    ("tracking_uri", "sqlite:///x/mlflow.db", "MLflow tracking URI 'sqlite:///x/mlflow.db'"),
    ("tracking_uri", "file:///x/mlruns", "tracking URI"),
    ("tracking_uri", "", "MLFLOW_TRACKING_URI unset"),
])
def test_each_node_local_location_is_named_with_what_to_use(key, value, named):
    problems = node_local_problems(**{**REMOTE, key: value})
    assert len(problems) == 1 and named in problems[0]
    assert ("s3://" in problems[0]) or ("tracking server" in problems[0])


def test_unset_weights_are_not_a_problem():
    assert node_local_problems(**{**REMOTE, "weights": None}) == []


def test_one_node_allows_local_paths_and_several_refuse_them_all_at_once():
    local = {"storage_path": "runs", "weights": "w.pt", "data_source": "data",
             "tracking_uri": "sqlite:///m.db"}
    check_node_local(ONE_NODE, **local)  # nothing raised
    with pytest.raises(ConfigError) as e:
        check_node_local(THREE_NODES, **local)
    text = str(e.value)
    assert "3 nodes" in text and "--shared-filesystem" in text
    for what in ("--storage-path", "model.weights", "data.source", "tracking URI"):
        assert what in text
    with pytest.raises(ConfigError, match="autoscaling"):  # one node now, more to come
        check_node_local(KUBERAY, **local)


def test_shared_filesystem_allows_paths_but_not_a_local_tracking_store():
    local_paths = {**REMOTE, "storage_path": "/nfs/runs", "data_source": "/nfs/data"}
    check_node_local(THREE_NODES, shared_fs=True, **local_paths)
    with pytest.raises(ConfigError, match="tracking URI"):
        check_node_local(THREE_NODES, shared_fs=True,
                         **{**local_paths, "tracking_uri": "sqlite:///m.db"})


def _job(workers: int, per_worker: dict, data_cpus: float = 1.0) -> list[dict]:
    return [per_worker] * workers + [{"CPU": data_cpus}]


def test_fixed_cluster_ok_or_an_error_naming_the_flag():
    assert plan_resources(THREE_NODES, _job(4, {"CPU": 2.0}), what="job") == "ok"
    with pytest.raises(ConfigError, match=r"--num-workers: job need 11 CPU; the Ray cluster "
                                          r"has 10 CPU"):
        plan_resources(THREE_NODES, _job(5, {"CPU": 2.0}), what="job")


def test_a_worker_that_fits_no_node_is_refused_even_if_the_total_suffices():
    # 10 CPUs in all, but no node has 6.
    with pytest.raises(ConfigError, match="no node of this cluster .* largest has 4 CPU"):
        plan_resources(THREE_NODES, _job(1, {"CPU": 6.0}), what="job")


def test_totals_are_not_enough_each_worker_needs_room_on_one_node():
    two = [{"CPU": 0.0}, {"CPU": 3.0}, {"CPU": 3.0}]  # the multi-node tests' cluster
    job = [{"CPU": 4.0}, {"CPU": 1.0}]  # 5 of its 6 CPUs, but a worker of 4 fits no node
    # An autoscaler (limits unknown): wait for a node that holds the worker.
    assert plan_resources(ClusterView(nodes=two, autoscaler=True), job, what="job") == "wait"
    grown = ClusterView(nodes=[*two, {"CPU": 4.0}], autoscaler=True)
    assert plan_resources(grown, job, what="job") == "ok"
    # A fixed cluster whose nodes each fit one worker, but not all workers at once.
    with pytest.raises(ConfigError, match=r"need 3 × \(3 CPU\) \+ 1 CPU, each on one node; "
                       r"the Ray cluster has 10 CPU in all, but its nodes cannot hold them all "
                       r"at once \(3 node\(s\): 1 with 2 CPU, 2 with 4 CPU\)"):
        plan_resources(THREE_NODES, _job(3, {"CPU": 3.0}), what="job")
    # KubeRay: 11 CPU and a GPU are up, but no node up holds 4 CPU with the GPU: wait for
    # the group's node.
    mixed = ClusterView(nodes=[{"CPU": 0.0}, {"CPU": 3.0, "GPU": 1.0}, {"CPU": 8.0}],
                        max_total=KUBERAY.max_total, group_nodes=KUBERAY.group_nodes)
    assert plan_resources(mixed, _job(1, {"CPU": 4.0, "GPU": 1.0}), what="job") == "wait"


def test_autoscaling_cluster_waits_when_it_can_scale_and_refuses_when_it_cannot():
    gpu = {"CPU": 4.0, "GPU": 1.0}
    assert plan_resources(KUBERAY, _job(4, gpu), what="job") == "wait"
    with pytest.raises(ConfigError, match=r"--use-gpu: job need .*5 GPU.*can scale to .*4 GPU"):
        plan_resources(KUBERAY, _job(5, gpu), what="job")
    with pytest.raises(ConfigError, match="one worker needs 1 CPU, 2 GPU on one node"):
        plan_resources(KUBERAY, _job(1, {"CPU": 1.0, "GPU": 2.0}), what="job")


def test_wait_for_resources_returns_once_nodes_join_and_times_out_clearly():
    grown = ClusterView(nodes=[{"CPU": 0.0}, {"CPU": 8.0, "GPU": 1.0}, {"CPU": 8.0, "GPU": 1.0}],
                        max_total=KUBERAY.max_total, group_nodes=KUBERAY.group_nodes)
    views = iter([KUBERAY, KUBERAY, grown])
    requests, notes = [], []
    bundles = _job(2, {"CPU": 4.0, "GPU": 1.0})
    wait_for_resources(bundles, what="job", timeout_s=60, describe=lambda: next(views),
                       request=requests.append, log=notes.append, poll_s=0)
    assert requests == [bundles, []]  # asked for the job's bundles, then withdrew the ask
    assert "waiting up to 60s" in notes[0] and "cluster ready: 3 node(s)" in notes[-1]
    requests.clear()
    with pytest.raises(ConfigError, match=r"job need 2 × \(4 CPU, 1 GPU\) \+ 1 CPU, each on "
                       r"one node; after waiting 0s for the autoscaler the cluster has "
                       r"1 node\(s\): 1 with nothing\. .*raise --resource-timeout"):
        wait_for_resources(bundles, what="job", timeout_s=0, describe=lambda: KUBERAY,
                           request=requests.append, log=notes.append, poll_s=0)
    assert requests[-1] == []  # the request is withdrawn on timeout too


def test_an_autoscaler_without_published_limits_is_waited_for_not_refused():
    v1 = ClusterView(nodes=[{"CPU": 0.0}], autoscaler=True)  # a v1 autoscaler's cluster
    assert v1.multi_node and not v1.limits_known
    assert plan_resources(v1, _job(64, {"CPU": 4.0, "GPU": 1.0}), what="job") == "wait"
    grown = ClusterView(nodes=[{"CPU": 0.0}, {"CPU": 8.0}], autoscaler=True)
    assert plan_resources(grown, _job(2, {"CPU": 2.0}), what="job") == "ok"
    with pytest.raises(ConfigError, match="autoscaling"):
        check_node_local(v1, storage_path="runs", weights=None, data_source=None,
                         tracking_uri="http://m")


def test_a_driver_forwards_where_s3_and_its_keys_are_never_the_keys():
    from wsdan.cluster import driver_runtime_env

    env = {"AWS_ENDPOINT_URL": "http://s3:8333", "AWS_PROFILE": "p",
           "AWS_SHARED_CREDENTIALS_FILE": "/etc/aws/creds", "AWS_ACCESS_KEY_ID": "AKIAX",
           "AWS_SECRET_ACCESS_KEY": "s3cr3t", "AWS_SESSION_TOKEN": "tok",
           "MLFLOW_TRACKING_URI": "http://u:pw@mlflow", "HOME": "/root"}
    assert driver_runtime_env(env) == {"env_vars": {
        "AWS_ENDPOINT_URL": "http://s3:8333", "AWS_PROFILE": "p",
        "AWS_SHARED_CREDENTIALS_FILE": "/etc/aws/creds"}}
    assert driver_runtime_env({"HOME": "/root"}) is None
    # The cluster's address travels too (Train's placement-group cleaner needs it when
    # several Rays share a machine), but "auto" is no address.
    assert driver_runtime_env({"RAY_ADDRESS": "10.0.0.1:6379"}) == {
        "env_vars": {"RAY_ADDRESS": "10.0.0.1:6379"}}
    assert driver_runtime_env({"RAY_ADDRESS": "auto"}) is None
    # A submitted job's driver adds only the address, and not when its job sets it.
    job = {**env, "RAY_ADDRESS": "127.0.0.1:6380",
           "RAY_JOB_CONFIG_JSON_ENV_VAR": '{"runtime_env": {"env_vars": {"AWS_PROFILE": "p"}}}'}
    assert driver_runtime_env(job) == {"env_vars": {"RAY_ADDRESS": "127.0.0.1:6380"}}
    job["RAY_JOB_CONFIG_JSON_ENV_VAR"] = '{"runtime_env": {"env_vars": {"RAY_ADDRESS": "x"}}}'
    assert driver_runtime_env(job) is None


def test_quiet_driver_drops_only_the_raylet_startup_notice():
    import inspect

    import ray._private.worker as ray_worker

    from wsdan.cluster import quiet_raylet_notices

    # What the quiet driver wraps: Ray's printer of raylet messages, called as (data, flag).
    assert list(inspect.signature(ray_worker.print_to_stdstream).parameters)[:2] == [
        "data", "ignore_prefix"]
    printed = []
    quiet = quiet_raylet_notices(lambda data, ignore_prefix: printed.append(data["lines"]))
    notice = ("WARNING: 10 PYTHON worker processes have been started on node: abc with address: "
              "127.0.0.1, which is 5x the maximum expected startup concurrency (2).")
    died = "A worker died or was killed while executing a task by an unexpected system error."
    quiet({"lines": [notice], "pid": "raylet", "is_err": False}, ignore_prefix=False)
    quiet({"lines": [died], "pid": "raylet", "is_err": False}, ignore_prefix=False)
    quiet({"lines": [notice, "(train) epoch 1"], "pid": 4242, "is_err": False}, False)
    assert printed == [[died], [notice, "(train) epoch 1"]]  # a worker's own lines are kept
    assert quiet_raylet_notices(quiet) is quiet  # wrapped once, however often connect runs
