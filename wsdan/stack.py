"""The local stack on loopback: S3 server (SeaweedFS), MLflow server, Ray head.

``wsdan stack up|down|status|env|runtime-env|logs``. State lives under ``.wsdan/stack`` (override with
``WSDAN_STACK_DIR``): data, logs, pid files, and — only when none are given in the
environment — generated S3 credentials in a 0600 file, so that ``up`` in one shell and
``down`` in another find the same services. Ports come from ``WSDAN_*_PORT`` variables.

Every service listens on 127.0.0.1 only (tests/test_secrets.py checks the sockets of the
processes started), and ``down`` ends every process ``up`` started, Ray's agents included.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path

from wsdan.config import ConfigError
from wsdan.services import S3Server, S3ServerConfig, generate_credentials
from wsdan.services.ray_head import RayHead, RayHeadConfig, without_job_settings

BUCKET = "wsdan"


@dataclass(frozen=True)
class StackPaths:
    root: Path

    @property
    def s3(self) -> Path:
        return self.root / "s3"

    @property
    def mlflow(self) -> Path:
        return self.root / "mlflow"

    @property
    def credentials(self) -> Path:
        return self.root / "credentials.json"

    @property
    def ray_temp(self) -> Path:
        # Ray's socket paths must stay short: a /tmp dir keyed by the stack's location.
        digest = hashlib.sha1(str(self.root.resolve()).encode()).hexdigest()[:8]
        return Path("/tmp") / f"wsdan-ray-{digest}"


def stack_paths() -> StackPaths:
    return StackPaths(Path(os.environ.get("WSDAN_STACK_DIR", ".wsdan/stack")).resolve())


def _port(name: str, default: int) -> int:
    return int(os.environ.get(f"WSDAN_{name}_PORT", default))


def credentials(paths: StackPaths) -> tuple[str, str]:
    """S3 credentials: from the environment when set, else generated once into a 0600 file."""
    key, secret = os.environ.get("AWS_ACCESS_KEY_ID"), os.environ.get("AWS_SECRET_ACCESS_KEY")
    if key and secret:
        return key, secret
    if paths.credentials.exists():
        d = json.loads(paths.credentials.read_text())
        return d["access_key"], d["secret_key"]
    key, secret = generate_credentials()
    paths.root.mkdir(parents=True, exist_ok=True)
    fd = os.open(paths.credentials, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        json.dump({"access_key": key, "secret_key": secret}, f)
    return key, secret


def s3_server(paths: StackPaths) -> S3Server:
    key, secret = credentials(paths)
    base = _port("S3", 8333)
    return S3Server(S3ServerConfig(
        data_dir=paths.s3, access_key=key, secret_key=secret, s3_port=base,
        master_port=_port("S3_MASTER", 9333), volume_port=_port("S3_VOLUME", 8334),
        filer_port=_port("S3_FILER", 8335)))


def ray_head(paths: StackPaths) -> RayHead:
    # Logical CPUs = cores + 2: training workers take one CPU each, and Ray Data's read and
    # decode tasks need CPUs of their own, or a 2-worker job on a 2-core machine would wait
    # for data forever. WSDAN_RAY_CPUS overrides.
    cpus = int(os.environ.get("WSDAN_RAY_CPUS", (os.cpu_count() or 2) + 2))
    return RayHead(RayHeadConfig(temp_dir=paths.ray_temp, port=_port("RAY", 6380),
                                 dashboard_port=_port("RAY_DASHBOARD", 8265), num_cpus=cpus,
                                 client_server_port=_port("RAY_CLIENT", 10001),
                                 dashboard_agent_listen_port=_port("RAY_AGENT", 52365)))


def mlflow_server(paths: StackPaths, s3: S3Server):
    from wsdan.services.mlflow_server import MlflowServer, MlflowServerConfig

    key, secret = credentials(paths)
    return MlflowServer(MlflowServerConfig(
        data_dir=paths.mlflow, port=_port("MLFLOW", 5000),
        artifacts_destination=f"s3://{BUCKET}/mlartifacts", s3_endpoint=s3.endpoint,
        s3_access_key=key, s3_secret_key=secret))


def client_env(paths: StackPaths) -> dict[str, str]:
    """What a client (a driver, a notebook, `ray job submit`) needs to use the stack. The S3
    keys by reference (the stack's 0600 credentials file and its profile), so that a driver
    can pass them on to the workers without ever handling a key value."""
    return {
        **job_runtime_env(paths)["env_vars"],  # S3 endpoint, key reference, MLflow URI
        "RAY_ADDRESS": ray_head(paths).config.address,  # ray.init(); GCS host:port
        "RAY_DASHBOARD_URL": ray_head(paths).config.dashboard_url,  # ray job submit --address
        "RAY_AUTH_MODE": "disabled",
        "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0",
    }


def running_client_env(paths: StackPaths) -> tuple[dict[str, str], list[str]]:
    """:func:`client_env` without the variables of services that are not running (a
    RAY_ADDRESS where no head listens makes every Ray command wait), and their names."""
    env, off = client_env(paths), []
    st = status(paths)
    if not st["ray"]["running"]:
        off.append("ray")
        for k in ("RAY_ADDRESS", "RAY_DASHBOARD_URL"):
            env.pop(k)
    if not st["mlflow"]["running"]:
        off.append("mlflow")
        env.pop("MLFLOW_TRACKING_URI")
    if not st["s3"]["running"]:
        off.append("s3")
        env = {k: v for k, v in env.items() if not k.startswith("AWS_")}
    return env, off


def job_runtime_env(paths: StackPaths) -> dict[str, dict[str, str]]:
    """The ``runtime_env`` a job submitted to the stack needs (``ray job submit
    --runtime-env-json "$(wsdan stack runtime-env)"``): the S3 endpoint, a reference to the
    S3 keys (a 0600 shared-credentials file under the stack's folder, and its profile) and
    the MLflow tracking URI. No secret value: a real cluster's nodes get their keys from an
    instance role or a Kubernetes Secret in the same way, by reference."""
    s3 = s3_server(paths)
    env = s3.job_env(paths.root / "aws_credentials", profile="wsdan-stack")
    env["MLFLOW_TRACKING_URI"] = f"http://127.0.0.1:{_port('MLFLOW', 5000)}"
    return {"env_vars": env}


def up(paths: StackPaths, *, with_mlflow: bool = True, with_ray: bool = True) -> dict:
    s3 = s3_server(paths)
    s3.start()
    s3.ensure_bucket(BUCKET)
    out = {"s3": s3.endpoint, "bucket": f"s3://{BUCKET}"}
    if with_mlflow:
        ml = mlflow_server(paths, s3)
        ml.start()
        out["mlflow"] = ml.tracking_uri
    if with_ray:
        # The head's processes get no S3 or MLflow settings of their own: a job brings them
        # in its runtime_env (job_runtime_env), as it must on any real cluster.
        head = ray_head(paths)
        head.start(environ=without_job_settings())
        job_runtime_env(paths)  # writes the credentials file the runtime_env refers to
        out["ray_dashboard"] = head.config.dashboard_url
    return out


def down(paths: StackPaths) -> None:
    ray_head(paths).stop()
    s3 = s3_server(paths)
    mlflow_server(paths, s3).stop()
    s3.stop()


def status(paths: StackPaths) -> dict:
    s3 = s3_server(paths)
    return {"s3": s3.status(), "mlflow": mlflow_server(paths, s3).status(),
            "ray": ray_head(paths).status()}


def log_files(paths: StackPaths) -> dict[str, Path]:
    """Each service's log: the S3 server's and the MLflow server's whole output, and the Ray
    head's start output (its own logs are under the session folder beside it)."""
    s3 = s3_server(paths)
    return {"s3": s3.config.server_log, "mlflow": mlflow_server(paths, s3).config.server_log,
            "ray": ray_head(paths).config.temp_dir / "ray-start.log"}


def show_logs(paths: StackPaths, service: str | None, *, lines: int = 40,
              follow: bool = False, out=None, poll_s: float = 0.5) -> None:
    """Print the last ``lines`` lines of a service's log (every service's, when ``service``
    is None); with ``follow``, keep printing what is appended until interrupted."""
    import sys
    import time

    out = out or sys.stdout
    files = log_files(paths)
    names = [service] if service else list(files)
    for name in names:
        path = files[name]
        header = f"==> {name}: {path} <=="
        if not path.exists():
            print(f"{header}\n(no log yet: the service has not been started here)", file=out)
            continue
        text = path.read_text(errors="replace").splitlines()
        print(header, *text[-lines:], sep="\n", file=out)
        if name == "ray":
            print(f"(Ray's own logs: {path.parent / 'session_latest' / 'logs'})", file=out)
    if not follow:
        return
    if len(names) != 1 or not files[names[0]].exists():
        raise ConfigError("--follow needs one service whose log exists (s3, mlflow or ray)")
    with open(files[names[0]], errors="replace") as f:
        f.seek(0, 2)
        try:
            while True:
                chunk = f.read()
                if chunk:
                    out.write(chunk)
                    out.flush()
                else:
                    time.sleep(poll_s)
        except KeyboardInterrupt:
            pass


def get_args_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description="The local stack on loopback: S3, MLflow, Ray head",
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("action", choices=["up", "down", "status", "env", "runtime-env", "logs"],
                   help="up/down: start/stop the services; status: their state as JSON; "
                        "env: exports for your shell; runtime-env: the JSON for `ray job "
                        "submit --runtime-env-json`; logs: a service's log")
    p.add_argument("service", nargs="?", choices=["s3", "mlflow", "ray"],
                   help="with logs: the service (default: all)")
    p.add_argument("--lines", "-n", type=int, default=40, help="with logs: lines to show")
    p.add_argument("--follow", "-f", action="store_true",
                   help="with logs: keep printing what the service appends (Ctrl-C stops)")
    p.add_argument("--no-mlflow", action="store_true", help="with up: no MLflow server")
    p.add_argument("--no-ray", action="store_true", help="with up: no Ray head")
    return p


def main(args: argparse.Namespace) -> None:
    if args.service and args.action != "logs":
        raise ConfigError(f"a service ({args.service}) is only taken by `wsdan stack logs`")
    paths = stack_paths()
    if args.action == "up":
        info = up(paths, with_mlflow=not args.no_mlflow, with_ray=not args.no_ray)
        for k, v in info.items():
            print(f"{k:>14}: {v}")
        print(f"credentials for clients: eval \"$(wsdan stack env)\" (kept in {paths.root})")
    elif args.action == "down":
        down(paths)
        print("stack stopped")
    elif args.action == "status":
        print(json.dumps(status(paths), indent=2, default=str))
    elif args.action == "runtime-env":
        print(json.dumps(job_runtime_env(paths)))
    elif args.action == "logs":
        show_logs(paths, args.service, lines=args.lines, follow=args.follow)
    else:  # env: for `eval "$(wsdan stack env)"`, on the user's own terminal
        env, off = running_client_env(paths)
        if off:  # a shell comment: harmless under eval, visible when printed
            print(f"# not running: {', '.join(off)} (its variables are left out; "
                  "`wsdan stack up` starts the stack)")
        for k, v in env.items():
            print(f"export {k}={v}")
