"""What the connected Ray cluster is and can become, and the checks a job makes against it
before any work starts.

Two things differ between one machine and a real cluster, and both are checked here:

* **Paths.** On a cluster of several nodes (or one that can scale out) a local path is a
  different file on every node: checkpoints written to a node-local ``--storage-path`` are
  lost with the node, local weights or data exist only where they were put, and a tracking
  URI that is a local file gives every node its own MLflow store. Such a job is refused with
  what to use instead (``s3://`` URIs, a tracking server), unless the user says the local
  paths are on a file system that every node mounts (NFS).
* **Resources.** An autoscaling cluster (KubeRay with a ``num-cpus: 0`` head and worker
  groups that start at zero) holds almost nothing until asked. The job's needs are checked
  against what the cluster *can scale to*; if that suffices but the nodes are not up yet,
  the job asks the autoscaler for them and waits, with a timeout and a clear message.

The pure parts (:func:`node_local_problems`, :func:`plan_resources`) take plain values and
are tested with them; :func:`describe_cluster` reads the live cluster.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from wsdan import storage
from wsdan.config import ConfigError

Resources = Mapping[str, float]

# What a driver passes on to its workers when it connects to a cluster itself (not when it
# runs as a submitted job, whose runtime_env already carries what it needs): where S3 is,
# and *where* the credentials are (a profile, a credentials file on the nodes); never key
# values, which on a cluster come from the nodes' own role or a mounted Secret.
FORWARDED_ENV = ("AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3", "AWS_DEFAULT_REGION",
                 "AWS_REGION", "AWS_PROFILE", "AWS_SHARED_CREDENTIALS_FILE", "AWS_CONFIG_FILE")


def add_cluster_args(p: Any) -> None:
    """The command-line flags of the checks here, shared by the job and the sweep."""
    p.add_argument("--shared-filesystem", action="store_true",
                   help="local paths are on a file system that every node mounts (NFS): "
                        "allow them on a multi-node cluster")
    p.add_argument("--autoscaling-cluster", action="store_true",
                   help="the cluster adds nodes on demand (Ray's v1 autoscaler, which does "
                        "not publish its limits): wait for resources instead of failing")
    p.add_argument("--resource-timeout", type=float, default=900.0,
                   help="seconds to wait for an autoscaling cluster to add the nodes needed")


def driver_runtime_env(environ: Mapping[str, str] | None = None) -> dict[str, Any] | None:
    """The runtime_env for ``ray.init`` from a driver: :data:`FORWARDED_ENV` from its
    environment, and the cluster's address (``RAY_ADDRESS``), which Ray Train's
    placement-group cleaner needs when several Ray instances share a machine. Inside a
    submitted job only the address, unless the job's runtime_env sets it (Ray refuses env
    keys that both set; the job's own settings already reach every worker)."""
    import json
    import os

    env = os.environ if environ is None else environ
    address = env.get("RAY_ADDRESS", "")
    address = {"RAY_ADDRESS": address} if address and address != "auto" else {}
    job_config = env.get("RAY_JOB_CONFIG_JSON_ENV_VAR")  # set by Ray for a job's driver
    if job_config is not None:
        try:
            job_env = (json.loads(job_config).get("runtime_env") or {}).get("env_vars") or {}
        except (ValueError, AttributeError):
            job_env = {}
        forwarded = {} if "RAY_ADDRESS" in job_env else address
    else:
        forwarded = {**{k: env[k] for k in FORWARDED_ENV if env.get(k)}, **address}
    return {"env_vars": forwarded} if forwarded else None


def check_ray_address(address: str | None, *, timeout_s: float = 15.0) -> None:
    """Raise a :class:`ConfigError` within ``timeout_s`` when ``address`` (``host:port`` of
    a Ray head's GCS) does not accept connections: ``ray.init`` would otherwise retry for
    minutes, printing only GCS warnings. ``None``, ``auto``, ``local`` and ``ray://``
    addresses are left to Ray."""
    import socket
    import time

    if not address or address in ("auto", "local") or "://" in address:
        return
    host, _, port = address.rpartition(":")
    if not host or not port.isdigit():
        raise ConfigError(f"RAY_ADDRESS={address!r}: expected HOST:PORT of a Ray head "
                          "(its GCS port, 6379 by default)")
    deadline, error = time.monotonic() + timeout_s, None
    while True:
        try:
            with socket.create_connection((host, int(port)), timeout=3):
                return
        except OSError as e:
            error = e
        if time.monotonic() >= deadline:
            break
        time.sleep(1.0)
    raise ConfigError(
        f"RAY_ADDRESS={address}: no Ray head answers there ({error}). Start the cluster "
        "(locally: `wsdan stack up`), point RAY_ADDRESS at a running head, or unset it to "
        "run on a Ray started for this command alone")


#: The connected cluster's dashboard, as ``ray.init`` reported it (``connect``).
DASHBOARD_URL: str | None = None

# A notice every raylet sends to every driver when it starts more worker processes at once
# than it has CPUs (any job with a few actors on a small node): Ray's own logs keep it, a
# quiet driver does not print it. Other raylet messages (a worker died, memory pressure)
# are still printed.
RAYLET_STARTUP_NOTICE = "maximum expected startup concurrency"


def quiet_raylet_notices(print_fn: Callable[..., Any]) -> Callable[..., Any]:
    """``print_fn`` (Ray's ``print_to_stdstream``, which the driver's raylet-message thread
    calls) less the worker start-up notice (:data:`RAYLET_STARTUP_NOTICE`)."""
    if getattr(print_fn, "wsdan_quiet", False):
        return print_fn

    def printed(data: dict[str, Any], *args: Any, **kwargs: Any) -> Any:
        lines = [line for line in data.get("lines", []) if not (
            data.get("pid") == "raylet" and RAYLET_STARTUP_NOTICE in str(line))]
        if lines or not data.get("lines"):
            return print_fn({**data, "lines": lines}, *args, **kwargs)
        return None

    printed.wsdan_quiet = True  # type: ignore[attr-defined]
    return printed


def connect(*, quiet: bool = False) -> None:
    """``ray.init`` for the project's entry points: the cluster at ``RAY_ADDRESS`` (or a
    new local one), with :func:`driver_runtime_env`. An address where nothing answers is
    a clear error within seconds (:func:`check_ray_address`).

    ``quiet``: the workers' output (Ray Data's progress bars and plans, Ray Train's
    reports, third-party warnings) is not forwarded to this driver; it stays in the
    cluster's log files (the dashboard's Logs tab), and Ray's own INFO lines, the raylet's
    worker start-up notice (:func:`quiet_raylet_notices`), MLflow's run links and download
    bars (unless MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT / MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR
    are set) and Python's deprecation warnings are not printed here. The project's own
    progress and messages still are (``wsdan.progress``)."""
    import logging
    import os
    import warnings

    import ray

    global DASHBOARD_URL
    if ray.is_initialized():
        return
    address = os.environ.get("RAY_ADDRESS")
    check_ray_address(address)
    if quiet:
        for category in (DeprecationWarning, FutureWarning, PendingDeprecationWarning):
            warnings.filterwarnings("ignore", category=category)
        logging.getLogger("mlflow").setLevel(logging.WARNING)  # its run links: ours say them
        # MLflow writes its run and experiment links to stdout when a run ends, and a bar
        # for every artifact download (registering a model downloads two): the summary at
        # the end gives the deep links instead.
        os.environ.setdefault("MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT", "true")
        os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
        import ray._private.worker as ray_worker  # the raylet messages' printer

        if callable(getattr(ray_worker, "print_to_stdstream", None)):
            ray_worker.print_to_stdstream = quiet_raylet_notices(ray_worker.print_to_stdstream)
    ctx = ray.init(address=address, ignore_reinit_error=True, runtime_env=driver_runtime_env(),
                   log_to_driver=not quiet,
                   logging_level=logging.WARNING if quiet else logging.INFO)
    if quiet:
        from ray.data import DataContext

        DataContext.get_current().enable_progress_bars = False  # the driver's own, if any
    url = os.environ.get("RAY_DASHBOARD_URL") or getattr(ctx, "dashboard_url", None)
    if url and "://" not in url:
        url = f"http://{url}"
    DASHBOARD_URL = url or None


@dataclass(frozen=True)
class ClusterView:
    """A snapshot of the cluster: alive nodes' resources now, and (autoscaling clusters) the
    largest node of each worker group and the totals the cluster may scale to."""

    nodes: Sequence[Resources]  # alive nodes, their total resources
    max_total: Resources | None = None  # None: the autoscaler published no limits
    group_nodes: Sequence[Resources] = field(default_factory=list)  # one node per group
    # An autoscaler runs, whether or not it published its limits (Ray's v1 autoscaler does
    # not; the user then says so: --autoscaling-cluster).
    autoscaler: bool = False

    @property
    def total(self) -> dict[str, float]:
        out: dict[str, float] = {}
        for node in self.nodes:
            for k, v in node.items():
                out[k] = out.get(k, 0.0) + float(v)
        return out

    @property
    def autoscaling(self) -> bool:
        return self.autoscaler or self.max_total is not None

    @property
    def limits_known(self) -> bool:
        """What the cluster can grow to is known (always, for a fixed cluster)."""
        return not self.autoscaling or self.max_total is not None

    @property
    def multi_node(self) -> bool:
        """More than one node now, or a cluster that can add nodes."""
        return len(self.nodes) > 1 or self.autoscaling

    def largest_nodes(self) -> list[Resources]:
        return [*self.nodes, *self.group_nodes]


def describe_cluster(*, autoscaling: bool = False) -> ClusterView:
    """The connected cluster (``ray.init`` done). Ray's v2 autoscaler publishes its limits
    and is found; ``autoscaling``: the user says the cluster adds nodes on demand (Ray's v1
    autoscaler publishes nothing that tells it apart from a fixed cluster)."""
    import ray

    nodes = [dict(n.get("Resources", {})) for n in ray.nodes() if n.get("Alive")]
    max_total, groups = _autoscaler_limits()
    return ClusterView(nodes=nodes, max_total=max_total, group_nodes=groups,
                       autoscaler=autoscaling or max_total is not None)


def _autoscaler_limits() -> tuple[dict[str, float] | None, list[dict[str, float]]]:
    """The autoscaler's cluster config (worker groups and their max counts), as Ray's v2
    autoscaler publishes it. Ray has no public API for it; Ray Data reads it the same way.
    None when there is none (or the call is unavailable)."""
    try:
        from ray._private.state import state  # no public equivalent in Ray 2.60

        config = state.get_cluster_config()
        if config is None or not config.node_group_configs:
            return None, []
        groups = [{k: float(v) for k, v in g.resources.items()}
                  for g in config.node_group_configs if g.max_count != 0]
        max_total = state.get_max_resources_from_cluster_config()
        return ({k: float(v) for k, v in max_total.items()} if max_total else None), groups
    except Exception:  # an older/newer Ray without it: behave as a fixed cluster
        return None, []


# -- node-local paths ------------------------------------------------------------------------


def _is_local_uri(uri: str) -> bool:
    try:
        return not storage.is_remote(uri)
    except ValueError:
        return False  # another scheme (gs://, hdfs://): not ours to judge here


def _is_local_tracking(uri: str | None) -> bool:
    if not uri:
        return True  # the embedded default: a sqlite file under .wsdan/
    scheme = uri.split(":", 1)[0].lower() if ":" in uri else ""
    return scheme in ("", "file", "sqlite") or (len(scheme) == 1)  # C:\ paths


def node_local_problems(*, storage_path: str | None, weights: str | None,
                        data_source: str | None, tracking_uri: str | None) -> list[str]:
    """Why each given location would break on a multi-node cluster (empty: none)."""
    problems = []
    if storage_path is not None and _is_local_uri(storage_path):
        problems.append(f"--storage-path {storage_path!r} is a local folder: checkpoints "
                        "written there stay on whichever node wrote them and a resumed job "
                        "cannot find them; use s3://bucket/prefix")
    if weights and _is_local_uri(weights):
        problems.append(f"model.weights {weights!r} is a local file: the other nodes do not "
                        "have it; upload it and give its s3:// URI")
    if data_source and _is_local_uri(data_source):
        problems.append(f"data.source {data_source!r} is a local path: Ray Data reads it on "
                        "every node; prepare the data set into s3:// (wsdan data prepare)")
    if tracking_uri is not None and _is_local_tracking(tracking_uri):
        shown = tracking_uri or "the default local sqlite file (MLFLOW_TRACKING_URI unset)"
        problems.append(f"MLflow tracking URI {shown!r} is a local file: the workers on "
                        "other nodes would log to stores of their own; set "
                        "MLFLOW_TRACKING_URI to a tracking server (http://...)")
    return problems


def check_node_local(view: ClusterView, *, shared_fs: bool = False, **locations: Any) -> None:
    """Refuse node-local locations on a multi-node (or autoscaling) cluster; with
    ``shared_fs`` the user vouches that local paths are on a file system every node mounts,
    so only the tracking URI is still checked. ``locations``: as :func:`node_local_problems`.
    """
    if not view.multi_node:
        return
    if shared_fs:
        locations = {k: (v if k == "tracking_uri" else None) for k, v in locations.items()}
    problems = node_local_problems(**locations)
    if problems:
        what = (f"{len(view.nodes)} nodes" if not view.autoscaling
                else f"{len(view.nodes)} node(s) now, autoscaling")
        raise ConfigError(
            f"this Ray cluster has {what}, and the job names node-local locations:\n  - "
            + "\n  - ".join(problems)
            + "\n(if these paths are on a file system that every node mounts, pass "
              "--shared-filesystem)")


# -- resources -------------------------------------------------------------------------------


def _fits(bundle: Resources, node: Resources) -> bool:
    return all(node.get(k, 0.0) >= v for k, v in bundle.items() if v > 0)


def _fmt(res: Resources, keys: Sequence[str] | None = None) -> str:
    """``res`` as "4 CPU, 1 GPU"; with ``keys`` only those (a live node also lists memory,
    object store, ``node:<ip>`` and custom resources, which a message about a job's CPUs and
    GPUs does not need)."""
    if keys is not None:
        res = {k: res.get(k, 0.0) for k in keys}
    return ", ".join(f"{v:g} {k}" for k, v in sorted(res.items()) if v) or "nothing"


def _counted(items: Sequence[str]) -> list[tuple[str, int]]:
    counts: dict[str, int] = {}
    for s in items:
        counts[s] = counts.get(s, 0) + 1
    return list(counts.items())


def _fmt_bundles(bundles: Sequence[Resources]) -> str:
    """"2 × (4 CPU, 1 GPU) + 1 CPU": the bundles, alike ones counted."""
    return " + ".join(f"{n} × ({s})" if n > 1 else s
                      for s, n in _counted([_fmt(b) for b in bundles]))


def _fmt_nodes(nodes: Sequence[Resources], keys: Sequence[str]) -> str:
    """"3 node(s): 1 with nothing, 2 with 3 CPU", counting only ``keys``."""
    return f"{len(nodes)} node(s): " + ", ".join(
        f"{n} with {s}" for s, n in _counted([_fmt(node, keys) for node in nodes]))


def _packs(bundles: Sequence[Resources], nodes: Sequence[Resources]) -> bool:
    """Whether ``nodes`` hold all ``bundles`` at once, each bundle on one node (first fit,
    largest bundle first: exact for the identical worker bundles of a job)."""
    free = [{k: float(v) for k, v in n.items()} for n in nodes]
    for b in sorted(bundles, key=lambda b: (b.get("GPU", 0.0), b.get("CPU", 0.0)),
                    reverse=True):
        node = next((n for n in free if _fits(b, n)), None)
        if node is None:
            return False
        for k, v in b.items():
            node[k] = node.get(k, 0.0) - float(v)
    return True


def plan_resources(view: ClusterView, bundles: Sequence[Resources], *,
                   what: str, flag: str = "--num-workers") -> str:
    """``"ok"`` (the cluster holds ``bundles`` now) or ``"wait"`` (it can scale to them);
    raises :class:`ConfigError` naming ``flag`` when it never can: one bundle fits no node
    (of now or of any worker group), or the totals exceed what the cluster can become."""
    need = _sum(bundles)
    nodes = view.largest_nodes()
    total = view.total
    # "ok" means the nodes up now hold every bundle, each on one node: totals alone are not
    # enough (two nodes of 3 CPUs cannot place a worker of 4).
    if not view.limits_known:
        # An autoscaler whose limits are unknown: what it cannot do shows only as a timeout.
        return "ok" if _packs(bundles, view.nodes) else "wait"
    for b in bundles:
        if not any(_fits(b, n) for n in nodes):
            biggest = max(nodes, key=lambda n: (n.get("GPU", 0), n.get("CPU", 0)), default={})
            raise ConfigError(
                f"{flag}: {what}: one worker needs {_fmt(b)} on one node, and no node of this "
                f"cluster (or of its worker groups) has that; the largest has "
                f"{_fmt(biggest, list(b))}")
    if _packs(bundles, view.nodes):
        return "ok"
    ceiling = view.max_total if view.max_total is not None else total
    short = {k: v for k, v in need.items() if ceiling.get(k, 0.0) < v}
    if short:
        key = "GPU" if "GPU" in short else next(iter(short))
        limit = "can scale to" if view.autoscaling else "has"
        raise ConfigError(
            f"{'--use-gpu' if key == 'GPU' else flag}: {what} need {_fmt(need)}; the Ray "
            f"cluster {limit} {_fmt({k: ceiling.get(k, 0.0) for k in need})}"
            + ("" if view.autoscaling else " (if it adds nodes on demand, pass "
               "--autoscaling-cluster to wait for them)"))
    if not view.autoscaling:
        raise ConfigError(
            f"{flag}: {what} need {_fmt_bundles(bundles)}, each on one node; the Ray cluster "
            f"has {_fmt(total, list(need))} in all, but its nodes cannot hold them all at once "
            f"({_fmt_nodes(view.nodes, list(need))}). If it adds nodes on demand, pass "
            "--autoscaling-cluster to wait for them")
    return "wait"


def wait_for_resources(bundles: Sequence[Resources], *, what: str, timeout_s: float,
                       flag: str = "--num-workers", view: ClusterView | None = None,
                       describe: Callable[[], ClusterView] = describe_cluster,
                       request: Callable[[list[dict[str, float]]], None] | None = None,
                       log: Callable[[str], None] = print, poll_s: float = 5.0) -> None:
    """Check ``bundles`` against the cluster; on an autoscaling cluster that must grow,
    ask the autoscaler for them and wait up to ``timeout_s`` for the nodes to join.
    ``view``: the cluster as already described (else ``describe()`` is called);
    ``request``: how to ask for resources (default: Ray's autoscaler SDK)."""
    view = view or describe()
    if plan_resources(view, bundles, what=what, flag=flag) == "ok":
        return
    if request is None:
        from ray.autoscaler.sdk import request_resources

        def request(b: list[dict[str, float]]) -> None:
            request_resources(bundles=b)

    keys = list(_sum(bundles))
    need = f"{_fmt_bundles(bundles)}, each on one node"
    log(f"[wsdan] waiting up to {timeout_s:.0f}s for the cluster to scale up: {what} need "
        f"{need}; it has {_fmt_nodes(view.nodes, keys)}")
    request([dict(b) for b in bundles])
    deadline = time.monotonic() + timeout_s
    next_note = time.monotonic() + 60
    try:
        while True:
            time.sleep(poll_s)
            view = describe()
            if plan_resources(view, bundles, what=what, flag=flag) == "ok":
                log(f"[wsdan] cluster ready: {_fmt_nodes(view.nodes, keys)}")
                return
            if time.monotonic() > deadline:
                raise ConfigError(
                    f"{flag}: {what} need {need}; after waiting {timeout_s:.0f}s for the "
                    f"autoscaler the cluster has {_fmt_nodes(view.nodes, keys)}. It did not "
                    "add nodes in time: check its logs and node quotas, or raise "
                    "--resource-timeout")
            if time.monotonic() > next_note:
                log(f"[wsdan] still waiting: {_fmt_nodes(view.nodes, keys)}")
                next_note += 60
    finally:
        request([])  # the job's own placement group holds them from here


def _sum(bundles: Sequence[Resources]) -> dict[str, float]:
    out: dict[str, float] = {}
    for b in bundles:
        for k, v in b.items():
            out[k] = out.get(k, 0.0) + float(v)
    return out
