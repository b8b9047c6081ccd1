"""Secrets and access: the S3 keys stay out of reprs and error messages, wrong or missing keys
are refused with one clear line, `wsdan stack up` listens on loopback only, and `wsdan stack
down` ends every process it started.

The scan of a whole job's outputs for the keys (logs, Ray's session folder, MLflow, the
shards' metadata) runs inside the `ray job submit` test of tests/tuning/test_sweep.py, which
runs such a job anyway (see tests/secret_scan.py).
"""

from __future__ import annotations

import ipaddress
import json
import shutil
from pathlib import Path

import psutil
import pytest

from wsdan.cli import main
from wsdan.services import MlflowServer, MlflowServerConfig, S3Server, S3ServerConfig

SECRET = "sk-never-print-me-0123456789abcdefghijkl"


def test_reprs_and_environments_hold_no_secret(tmp_path):
    s3 = S3Server(S3ServerConfig(data_dir=tmp_path / "s3", access_key="AKWSDAN", secret_key=SECRET))
    ml = MlflowServer(MlflowServerConfig(data_dir=tmp_path / "ml", s3_access_key="AKWSDAN",
                                         s3_secret_key=SECRET))
    env, server_env = s3.aws_env(), ml.config.env({})
    shown = [repr(s3), str(s3), repr(s3.config), repr(ml), repr(ml.config), repr(env), str(env),
             repr(server_env), f"{env}", repr([env]), repr({"fixture": s3})]
    for text in shown:
        assert SECRET not in text, text
    assert "AKWSDAN" in repr(s3) and "'AWS_SECRET_ACCESS_KEY': '***'" in repr(env)
    # Still the values themselves where they are used: a child's environment, JSON.
    assert env["AWS_SECRET_ACCESS_KEY"] == SECRET == server_env["AWS_SECRET_ACCESS_KEY"]
    assert json.loads(json.dumps(env))["AWS_SECRET_ACCESS_KEY"] == SECRET
    assert not any(SECRET in arg for arg in [*s3.config.command("weed"), *ml.config.command()])


def test_the_stack_binds_every_service_to_loopback(tmp_path, monkeypatch):
    from wsdan import stack

    monkeypatch.setenv("WSDAN_STACK_DIR", str(tmp_path))
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "AKWSDAN")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", SECRET)
    paths = stack.stack_paths()
    s3 = stack.s3_server(paths)
    ml = stack.mlflow_server(paths, s3)
    head = stack.ray_head(paths)
    assert {s3.config.host, ml.config.host, head.config.host} == {"127.0.0.1"}
    weed = s3.config.command("weed")
    assert "-ip=127.0.0.1" in weed and "-ip.bind=127.0.0.1" in weed
    cmd = ml.config.command()
    assert cmd[cmd.index("--host") + 1] == "127.0.0.1"
    assert SECRET not in repr((s3, ml, head)) + " ".join(weed + cmd)


def _listening(procs: list[psutil.Process]) -> list[tuple[str, str, int]]:
    """(process, ip, port) of every TCP socket listening and UDP socket bound by ``procs``."""
    out = []
    for p in procs:
        try:
            name = p.name()
            conns = p.net_connections(kind="inet")
        except (psutil.NoSuchProcess, psutil.ZombieProcess):
            continue
        for c in conns:
            if c.status == psutil.CONN_LISTEN or (c.status == psutil.CONN_NONE and not c.raddr):
                out.append((name, c.laddr.ip, c.laddr.port))
    return out


def _is_loopback(ip: str) -> bool:
    addr = ipaddress.ip_address(ip.split("%")[0])
    mapped = getattr(addr, "ipv4_mapped", None)  # ::ffff:127.0.0.1, as Ray's gRPC servers show
    return addr.is_loopback or (mapped is not None and mapped.is_loopback)


def _tree(pid: int | None) -> list[psutil.Process]:
    assert pid is not None
    root = psutil.Process(pid)
    return [root, *root.children(recursive=True)]


def _stack_ports() -> dict[str, str]:
    """WSDAN_*_PORT values for a stack of its own: free ports whose SeaweedFS gRPC twins
    (+10000) are free too."""
    from wsdan.services import find_free_ports
    from wsdan.services.seaweedfs import port_in_use

    names = ["S3", "S3_MASTER", "S3_VOLUME", "S3_FILER", "MLFLOW", "RAY", "RAY_DASHBOARD",
             "RAY_CLIENT", "RAY_AGENT"]
    while True:
        ports = find_free_ports(len(names))
        twins = [p + 10000 for p in ports[:4]]
        if max(twins) < 65536 and not any(port_in_use(p) for p in twins):
            return {f"WSDAN_{n}_PORT": str(p) for n, p in zip(names, ports, strict=True)}


@pytest.mark.slow
def test_the_stack_listens_on_loopback_only_and_down_ends_every_process(
        tmp_path, monkeypatch, capsys, mlflow_server):
    """`wsdan stack up` (S3 server and Ray head; its MLflow server is the same class as the
    session's ``mlflow_server``, checked in its place to save a start): every socket any of
    their processes listens on is bound to loopback. `wsdan stack down` then ends every
    process `up` started, Ray's dashboard and runtime-env agents included (one ignores
    SIGTERM), and nothing naming the head's temp dir is left."""
    from wsdan import stack

    for name in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("WSDAN_STACK_DIR", str(tmp_path / "stack"))
    monkeypatch.setenv("WSDAN_RAY_CPUS", "2")
    for name, value in _stack_ports().items():
        monkeypatch.setenv(name, value)
    paths = stack.stack_paths()
    s3, head = stack.s3_server(paths), stack.ray_head(paths)
    try:
        assert main(["stack", "up", "--no-mlflow"]) == 0
        s3_procs, ray_procs = _tree(s3.pid()), head.processes()
        ml_procs = _tree(mlflow_server.pid())
        names = {p.name() for p in ray_procs}
        assert {"gcs_server", "raylet", "ray::DashboardAgent", "ray::RuntimeEnvAgent"} <= names
        # Ray's client server names only the head's address, and has no parent once up.
        assert any("ray.util.client.server" in p.cmdline() for p in ray_procs), names
        for service, procs in (("s3", s3_procs), ("mlflow", ml_procs), ("ray", ray_procs)):
            sockets = _listening(procs)
            public = [s for s in sockets if not _is_loopback(s[1])]
            assert sockets and not public, f"{service} listens beyond loopback: {public}"
        # The ports the configs name are among them (the check saw the real servers).
        assert set(s3.config.ports.values()) <= {port for _, _, port in _listening(s3_procs)}
        assert mlflow_server.config.port in {port for _, _, port in _listening(ml_procs)}
        ray_ports = {port for _, _, port in _listening(ray_procs)}
        assert {head.config.port, head.config.dashboard_port} <= ray_ports
        # What pytest prints of these objects when a test fails holds no key.
        secret = stack.credentials(paths)[1]
        shown = repr(s3) + repr(mlflow_server) + repr(s3.aws_env()) + capsys.readouterr().out
        assert secret not in shown and mlflow_server.config.s3_secret_key not in shown

        assert main(["stack", "down"]) == 0
        started = s3_procs + ray_procs
        left = [p for p in started if p.is_running() and p.status() != psutil.STATUS_ZOMBIE]
        assert not left, [f"{p.pid} {p.name()}" for p in left]
        temp_dir = str(head.config.temp_dir)
        address = f"--address={head.config.address}"
        assert [p.pid for p in psutil.process_iter(["cmdline"])
                if any(temp_dir in part or part == address
                       for part in (p.info["cmdline"] or []))] == []
        assert head.processes() == [] and s3.pid() is None
    finally:
        stack.down(paths)
        shutil.rmtree(head.config.temp_dir, ignore_errors=True)


# -- wrong keys, no keys: refused, one line, exit 2, no secret -----------------------------

BUCKET = "wsdan-secrets"


@pytest.fixture(scope="module")
def small_data(s3_server, tmp_path_factory) -> tuple[Path, str]:
    """A tiny generated data set: its images folder, and its shards prepared into S3."""
    from tests.helpers import aws_environ
    from wsdan.data.synthetic import SyntheticSpec, write_synthetic_dataset

    src = tmp_path_factory.mktemp("secrets-src")
    write_synthetic_dataset(src, spec=SyntheticSpec(num_classes=2, image_size=32, seed=0),
                            n_train=4, n_val=2, n_test=0, progress=False)
    s3_server.ensure_bucket(BUCKET)
    with aws_environ(s3_server):
        assert main(["data", "prepare", "--format", "synthetic", "--src", str(src), "--dest",
                     f"s3://{BUCKET}/data", "--no-progress"]) == 0
    return src, f"s3://{BUCKET}/data"


def _keys(case: str, s3_server) -> dict[str, str]:
    access, secret = s3_server.config.access_key, s3_server.config.secret_key
    return {"wrong secret": {"AWS_ACCESS_KEY_ID": access, "AWS_SECRET_ACCESS_KEY": SECRET},
            "unknown key": {"AWS_ACCESS_KEY_ID": "AKUNKNOWN" + access[9:],
                            "AWS_SECRET_ACCESS_KEY": secret},
            "anonymous": {}}[case]


@pytest.mark.slow
@pytest.mark.parametrize("case", ["wrong secret", "unknown key", "anonymous"])
def test_wrong_or_missing_keys_are_refused_in_one_line_without_the_secret(
        case, small_data, s3_server, monkeypatch, capsys, tmp_path):
    """`wsdan data prepare` (writing), `wsdan evaluate` and `wsdan train` (reading the data
    set before anything else) with wrong keys or none: exit 2, one ``error: access denied``
    line naming the endpoint, the bucket and which credentials were used, never a key."""
    src, data = small_data
    for name in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN",
                 "AWS_PROFILE", "AWS_ENDPOINT_URL_S3", "WSDAN_S3_ACCESS_KEY",
                 "WSDAN_S3_SECRET_KEY"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("AWS_ENDPOINT_URL", s3_server.endpoint)
    monkeypatch.setenv("AWS_DEFAULT_REGION", "us-east-1")
    # No credentials file and no instance metadata: "anonymous" means none at all.
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(tmp_path / "none"))
    monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "none"))
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")
    for name, value in _keys(case, s3_server).items():
        monkeypatch.setenv(name, value)
    commands = {
        "data prepare": ["data", "prepare", "--format", "synthetic", "--src", str(src),
                         "--dest", f"s3://{BUCKET}/again", "--no-progress"],
        "evaluate": ["evaluate", "--model", "models:/none@champion", "--data", data],
        "train": ["train", "--config", "jobs/configs/synthetic_cpu.yaml", f"data.source={data}",
                  "model.num_classes=2"],
    }
    secrets = (s3_server.config.secret_key, SECRET)
    for command, argv in commands.items():
        assert main(argv) == 2, command
        out = capsys.readouterr()
        err = out.err.strip()
        assert len(err.splitlines()) == 1 and err.startswith("error: access denied"), (command,
                                                                                      err)
        assert s3_server.endpoint in err and repr(BUCKET) in err, err
        used = ("no credentials" if case == "anonymous"
                else "AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY")
        assert used in err, err
        assert not any(s in out.out + out.err for s in secrets), command
    # The data set was not touched: nothing written under the refused prefix.
    keys = s3_server.client().list_objects_v2(Bucket=BUCKET, Prefix="again/").get("KeyCount")
    assert keys == 0


def test_the_secret_scan_finds_what_it_looks_for(tmp_path):
    """tests/secret_scan.py (run on a whole job in tests/tuning/test_sweep.py) reports a
    secret in a text, a log file deep in a folder and a data set's object, and nothing where
    there is none."""
    from tests.secret_scan import find_secrets

    (tmp_path / "logs" / "session").mkdir(parents=True)
    (tmp_path / "logs" / "session" / "worker.err").write_bytes(b"x" * 1000 + SECRET.encode())
    (tmp_path / "logs" / "clean.log").write_text("nothing here")
    (tmp_path / "data" / "train").mkdir(parents=True)
    (tmp_path / "data" / "dataset.json").write_text("{}")
    (tmp_path / "data" / "train" / "part-00000.parquet").write_bytes(b"PAR1" + SECRET.encode())
    scan = find_secrets([SECRET], texts={"job output": f"a {SECRET} b", "clean": "ok"},
                        dirs=[tmp_path / "logs"], datasets=[str(tmp_path / "data")])
    assert scan["found"] == ["text job output", str(tmp_path / "logs/session/worker.err"),
                             f"data set object {tmp_path / 'data/train/part-00000.parquet'}"]
    assert scan["checked"] == {"texts": 2, "files": 2, "params": 0, "tags": 0, "artifacts": 0,
                               "objects": 2}
    assert find_secrets(["other-secret-value"], dirs=[tmp_path])["found"] == []
