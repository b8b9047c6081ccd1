"""``wsdan serve NAME[@ALIAS|/VERSION]``: serve a registered model over HTTP on loopback.

``mlflow models serve`` with the project's defaults: the model comes from the registry of
``MLFLOW_TRACKING_URI`` (``@champion`` unless an alias or version is given), the server binds
127.0.0.1, and the model runs in this environment (``--env-manager local``: the project is
installed here already). In this environment the server is MLflow's own scoring app (the
same routes and answers) run by uvicorn behind a guard on request bodies
(:mod:`wsdan.serving_app`): a body too large for the limits below is answered 413 and never
held whole in memory, and no error answer quotes the request back. Requests are the
pyfunc model's (``wsdan.tracking.pyfunc``): a JSON ``dataframe_split`` with an ``image``
column of base64-encoded files. A request of more than ``--max-images`` images or
``--max-request-mb`` MB of images is refused with HTTP 400 naming the limit, before any image
is decoded (the server's environment variables ``WSDAN_SERVE_MAX_IMAGES`` and
``WSDAN_SERVE_MAX_REQUEST_MB``, which the model reads at load); other bad
requests (no ``image`` column, an empty batch, a value that is not an image) get a 400 naming
the problem too. ``python -m jobs.bench_serve`` load-tests the server.

    eval "$(wsdan stack env)"          # the local stack's tracking server and S3
    wsdan serve synthetic-wsdan        # models:/synthetic-wsdan@champion on 127.0.0.1:5001
"""

from __future__ import annotations

import argparse
import os
import re
import shlex
import shutil
import sys
from collections.abc import Mapping

from wsdan.config import ConfigError

# The served model's request limits, checked before any image is decoded, and the variables
# of the server's environment that set them (read by wsdan.tracking.pyfunc at load; not a
# model_config: MLflow drops the keys a model was not logged with). Here, where --help needs
# no torch.
DEFAULT_MAX_IMAGES = 256
DEFAULT_MAX_REQUEST_MB = 20.0
MAX_IMAGES_ENV = "WSDAN_SERVE_MAX_IMAGES"
MAX_REQUEST_MB_ENV = "WSDAN_SERVE_MAX_REQUEST_MB"
MODEL_URI_ENV = "WSDAN_SERVE_MODEL_URI"  # the model wsdan.serving_app serves


def request_limits(environ: Mapping[str, str] | None = None) -> tuple[int, float]:
    """(max_images, max_request_mb) from ``environ`` (default ``os.environ``): the variables
    ``WSDAN_SERVE_MAX_IMAGES`` and ``WSDAN_SERVE_MAX_REQUEST_MB``, else the defaults. A value
    that is not a positive number is a ValueError naming the variable."""
    environ = os.environ if environ is None else environ
    limits: list[float] = []
    for name, kind, default in ((MAX_IMAGES_ENV, int, DEFAULT_MAX_IMAGES),
                                (MAX_REQUEST_MB_ENV, float, DEFAULT_MAX_REQUEST_MB)):
        text = environ.get(name, "").strip()
        try:
            value = kind(text) if text else default
        except ValueError:
            value = 0
        if not value > 0:
            raise ValueError(f"{name}={text!r}: expected a positive "
                             f"{'whole number' if kind is int else 'number'}")
        limits.append(value)
    return int(limits[0]), float(limits[1])


_NAME = re.compile(r"^(?P<name>[^@/]+)(?:@(?P<alias>[A-Za-z0-9_\-]+)|/(?P<version>\d+))?$")


def model_uri(spec: str, default_alias: str = "champion") -> str:
    """``NAME`` → ``models:/NAME@champion``; ``NAME@ALIAS`` and ``NAME/VERSION`` as given;
    a ``models:/``, ``runs:/`` or ``s3://`` URI is passed through."""
    if re.match(r"^[a-z][a-z0-9+]*:/", spec):
        return spec
    m = _NAME.match(spec)
    if not m:
        raise ConfigError(f"model {spec!r}: expected NAME, NAME@ALIAS, NAME/VERSION or a "
                          "models:/ URI")
    if m["version"]:
        return f"models:/{m['name']}/{m['version']}"
    return f"models:/{m['name']}@{m['alias'] or default_alias}"


def serve_command(args: argparse.Namespace) -> list[str]:
    """The server's command line for ``args``. In this environment (``--env-manager local``):
    uvicorn running :mod:`wsdan.serving_app`, MLflow's scoring server behind the request-body
    guard. Otherwise ``mlflow models serve``, which builds the model's environment (its
    scoring server then reads whole bodies, whatever their size)."""
    if args.env_manager == "local":
        return [sys.executable, "-m", "uvicorn", "--host", args.host, "--port",
                str(args.port), "--workers", str(args.workers), "wsdan.serving_app:app"]
    mlflow = shutil.which("mlflow") or os.path.join(os.path.dirname(sys.executable), "mlflow")
    cmd = [mlflow, "models", "serve", "-m", model_uri(args.model), "--env-manager",
           args.env_manager, "-h", args.host, "-p", str(args.port), "-w", str(args.workers)]
    if args.timeout is not None:
        cmd += ["-t", str(args.timeout)]
    return cmd


def serve_env(args: argparse.Namespace, environ: dict[str, str] | None = None) -> dict[str, str]:
    """The server's environment: ``environ`` (default ``os.environ``) with the request limits
    in ``WSDAN_SERVE_MAX_IMAGES`` and ``WSDAN_SERVE_MAX_REQUEST_MB`` (the model reads them in
    ``load_context``, the body guard the second), the model's URI in
    ``WSDAN_SERVE_MODEL_URI``, and this Python's ``bin/`` on PATH (``mlflow models serve``
    runs ``uvicorn`` from it)."""
    env = dict(os.environ if environ is None else environ)
    if args.max_images < 1 or args.max_request_mb <= 0:
        raise ConfigError(f"--max-images ({args.max_images}) and --max-request-mb "
                          f"({args.max_request_mb}) must be positive")
    env[MAX_IMAGES_ENV] = str(args.max_images)
    env[MAX_REQUEST_MB_ENV] = f"{args.max_request_mb:g}"
    env[MODEL_URI_ENV] = model_uri(args.model)  # what wsdan.serving_app loads
    if args.timeout is not None:
        env["MLFLOW_SCORING_SERVER_REQUEST_TIMEOUT"] = str(args.timeout)
    bin_dir = os.path.dirname(sys.executable)
    env["PATH"] = os.pathsep.join([bin_dir, env.get("PATH", "")]).rstrip(os.pathsep)
    return env


def get_args_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        description="Serve a registered model with MLflow's scoring server, on loopback by "
                    "default, behind a request-size guard. Needs MLFLOW_TRACKING_URI (and the S3 variables) pointing at "
                    "the tracking server: eval \"$(wsdan stack env)\" for the local stack.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("model", help="NAME (its @champion), NAME@ALIAS, NAME/VERSION or a "
                                 "models:/ URI")
    p.add_argument("--host", default="127.0.0.1",
                   help="address to bind (0.0.0.0 exposes the model to the network)")
    p.add_argument("--port", type=int, default=5001, help="port to bind")
    p.add_argument("--workers", type=int, default=1, help="server worker processes")
    p.add_argument("--timeout", type=int, default=None,
                   help="request timeout in seconds (MLflow's default when unset)")
    p.add_argument("--max-images", type=int, default=DEFAULT_MAX_IMAGES,
                   help="images per request; more is refused with HTTP 400")
    p.add_argument("--max-request-mb", type=float, default=DEFAULT_MAX_REQUEST_MB,
                   help="MB of encoded images per request (checked before decoding); more "
                        "is refused with HTTP 400, and a body too large for it with 413 "
                        "before it is held in memory")
    p.add_argument("--env-manager", default="local", choices=["local", "virtualenv", "uv"],
                   help="where the model runs: this environment, or one MLflow builds from "
                        "the model's requirements (then `mlflow models serve` runs as it is, "
                        "without the body guard)")
    p.add_argument("--dry-run", action="store_true",
                   help="print the command instead of running it")
    return p


def main(args: argparse.Namespace) -> None:
    cmd = serve_command(args)
    env = serve_env(args)
    if args.dry_run:  # the variables the server reads, then its command line
        shown = [f"{k}={shlex.quote(env[k])}" for k in sorted(env)
                 if k.startswith("WSDAN_SERVE_") or k == "MLFLOW_SCORING_SERVER_REQUEST_TIMEOUT"]
        print(" ".join([*shown, *map(shlex.quote, cmd)]))
        return
    if not os.environ.get("MLFLOW_TRACKING_URI") and not args.model.startswith(("s3:", "runs:")):
        raise ConfigError("MLFLOW_TRACKING_URI is not set: point it at the tracking server "
                          "that holds the registry (for the local stack: "
                          "eval \"$(wsdan stack env)\")")
    print(f"[wsdan] serving {model_uri(args.model)} on http://{args.host}:{args.port} "
          "(POST /invocations; Ctrl-C stops)", flush=True)
    os.execve(cmd[0], cmd, env)


if __name__ == "__main__":
    from wsdan.cli import run_main

    sys.exit(run_main(main, get_args_parser()))
