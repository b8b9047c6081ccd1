"""Benchmark: the served model under load, with bad requests mixed in.

Serves a model as ``wsdan serve`` does (MLflow's scoring app behind its body guard, with
the command line and environment of ``wsdan.serving``) on a free port of 127.0.0.1, warms
it up, then sends a bounded number of requests: first from one client (the baseline), then
from ``--clients`` threads, each with its own keep-alive connection. In both, every
``--bad-every``-th request is a bad one, the kinds in turn: a wrong column, a value that is
not an image, an empty batch, a body of ``--big-mb`` MB (one huge "image"), a body that is
not JSON, a ``--big-mb`` MB body that is not JSON, a 5 MB one. Each bad request must get a
4xx whose message names the problem, in an answer of at most 16 KiB (none quotes the
request back); the good requests around them must all succeed.

Figures: failed requests, p50/p99 latency of the good requests, images/s (good images over
the phase's wall time), and the RSS of the server's process tree (uvicorn and its workers)
after the warm-up and after the run; the run holds if it grew by at most
``--rss-margin-mb`` (also sampled after each quarter of the load phase: a leak climbs
quarter by quarter, the allocator's churn does not). The warm-up sends every kind of
request, bad ones included, from ``--clients`` clients, so the server has reached its
working set (threads, allocator arenas) before the first measurement: what grows after it
is what the requests leave behind.

    python -m jobs.bench_serve                      # a tiny fresh model, no services needed
    python -m jobs.bench_serve --model NAME@champion   # a registered model (MLFLOW_TRACKING_URI)

By default the model is a small random WS-DAN (resnet18_layer3, 3 classes) logged to an
MLflow store (SQLite) in a temporary folder, so the bench runs without any stack.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
import urllib.request
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import psutil

from jobs.serve_load import (  # noqa: F401 - the bench's interface (tests use it)
    BAD_KINDS,
    MAX_ERROR_ANSWER,
    Phase,
    Req,
    bad_requests,
    good_requests,
    mixed,
    run_phase,
)
from wsdan.serving import DEFAULT_MAX_IMAGES, DEFAULT_MAX_REQUEST_MB

# -- the server ------------------------------------------------------------------------------


def tiny_model(folder: Path, image_size: int) -> tuple[str, dict[str, str]]:
    """A small random WS-DAN logged to an MLflow store (SQLite, artifacts in ``folder``):
    its ``models:/`` URI and the environment that reaches it. The process's own tracking
    URI is left as it was."""
    import mlflow
    import torch
    from mlflow import MlflowClient
    from mlflow.tracking._tracking_service.utils import _use_tracking_uri

    from wsdan.config import TrainConfig
    from wsdan.model import build_model
    from wsdan.tracking.pyfunc import log_wsdan_model

    uri = f"sqlite:///{folder / 'mlflow.db'}"
    cfg = TrainConfig.from_dict({
        "model": {"backbone": "resnet18_layer3", "num_classes": 3, "num_attentions": 2},
        "data": {"image_size": image_size, "resize_size": image_size + image_size // 8},
    })  # fmt: skip
    torch.manual_seed(0)
    model = build_model("resnet18_layer3", num_classes=3, num_attentions=2).eval()
    experiment = MlflowClient(uri).create_experiment(
        "bench-serve", artifact_location=(folder / "artifacts").as_uri())
    with _use_tracking_uri(uri), warnings.catch_warnings():
        warnings.simplefilter("ignore")  # no input example: MLflow warns about it
        with mlflow.start_run(experiment_id=experiment):
            info = log_wsdan_model(model, cfg, ["a", "b", "c"], input_example=None)
    return info.model_uri, {"MLFLOW_TRACKING_URI": uri}


def server_rss(pid: int) -> int:
    """Resident bytes of the process ``pid`` and all its descendants."""
    proc = psutil.Process(pid)
    total = 0
    for p in [proc, *proc.children(recursive=True)]:
        with contextlib.suppress(psutil.NoSuchProcess):
            total += p.memory_info().rss
    return total


@dataclass
class Server:
    url: str
    port: int
    pid: int
    log: Path


@contextlib.contextmanager
def served(model: str, env: dict[str, str], folder: Path, args: argparse.Namespace,
           ready_timeout: float = 300) -> Iterator[Server]:
    """``wsdan serve`` of ``model`` on a free loopback port (its command line and environment:
    MLflow's scoring app behind the body guard), until the block ends; then its process
    group is stopped."""
    from wsdan.services import find_free_port
    from wsdan.serving import serve_command, serve_env

    port = find_free_port()
    serve_args = argparse.Namespace(model=model, host="127.0.0.1", port=port,
                                    workers=args.workers, timeout=None, env_manager="local",
                                    max_images=args.max_images,
                                    max_request_mb=args.max_request_mb)
    cmd = serve_command(serve_args)  # this Python's uvicorn and MLflow
    log_path = folder / "serve.log"
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT,
                                env=serve_env(serve_args, {**os.environ, **env}), cwd=folder,
                                start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    try:
        _wait_ready(url, proc, log_path, ready_timeout)
        yield Server(url, port, proc.pid, log_path)
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGTERM)  # serve and its uvicorn worker
        try:
            proc.wait(20)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


def _wait_ready(url: str, proc: subprocess.Popen, log_path: Path, timeout: float) -> None:
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"the model server exited with {proc.returncode}:\n"
                               f"{log_path.read_text(errors='replace')[-3000:]}")
        with contextlib.suppress(OSError), opener.open(f"{url}/ping", timeout=2) as response:
            if response.status == 200:
                return
        time.sleep(0.25)
    raise RuntimeError(f"the model server: no /ping after {timeout:.0f} s:\n"
                       f"{log_path.read_text(errors='replace')[-3000:]}")


# -- the bench -------------------------------------------------------------------------------


def bench(args: argparse.Namespace) -> dict[str, Any]:
    """Serve, warm up, run the baseline and the load phase; the figures (see module doc)."""
    with tempfile.TemporaryDirectory(prefix="wsdan-bench-serve-") as tmp:
        folder = Path(tmp)
        if args.model:
            from wsdan.serving import model_uri

            model, env, what = model_uri(args.model), {}, args.model
        else:
            model, env = tiny_model(folder, args.image_size)
            what = f"tiny resnet18_layer3 WS-DAN at {args.image_size} px"
        good = good_requests(64, args.images_per_request, args.image_px)
        bad = bad_requests(args.big_mb, args.image_px)
        t = time.perf_counter()
        with served(model, env, folder, args) as server:
            startup = time.perf_counter() - t
            rss_ready = server_rss(server.pid)
            warm = run_phase(server.url, "warm-up",
                             mixed(good, {}, args.warmup, 0) + list(bad.values()), args.clients)
            rss_before = server_rss(server.pid)
            base = run_phase(server.url, "baseline",
                             mixed(good, bad, args.baseline_requests, args.bad_every), 1)
            load = run_phase(server.url, "load",
                             mixed(good, bad, args.requests, args.bad_every), args.clients,
                             probe=lambda: server_rss(server.pid), probes=4)
            rss_after = server_rss(server.pid)
    growth = (rss_after - rss_before) / 2**20
    bad_rows = {}
    for kind in bad:
        outs = [o for o in warm.outcomes + base.outcomes + load.outcomes if o.kind == kind]
        bad_rows[kind] = {"sent": len(outs), "held": sum(o.held for o in outs),
                          "statuses": sorted({o.status for o in outs}),
                          "message": next((o.message for o in outs if not o.held),
                                          outs[0].message if outs else "")}
    warm_failed = [o for o in warm.good() if not o.held]
    result = {
        "model": what, "workers": args.workers, "startup_s": round(startup, 1),
        "images_per_request": args.images_per_request,
        "baseline": base.summary(), "load": load.summary(), "bad": bad_rows,
        "warmup_failed": len(warm_failed),
        "rss_ready_mb": round(rss_ready / 2**20, 1),
        "rss_before_mb": round(rss_before / 2**20, 1),
        "rss_load_quarters_mb": [round(v / 2**20, 1) for v in load.probed], "rss_after_mb": round(rss_after / 2**20, 1),
        "rss_growth_mb": round(growth, 1), "rss_margin_mb": args.rss_margin_mb,
    }
    result["rss_held"] = growth <= args.rss_margin_mb
    result["ok"] = (not warm_failed and result["baseline"]["failed"] == 0
                    and result["load"]["failed"] == 0 and result["rss_held"]
                    and all(r["held"] == r["sent"] > 0 for r in bad_rows.values()))
    result["speedup"] = round(result["load"]["img_per_s"]
                              / max(result["baseline"]["img_per_s"], 1e-9), 2)
    if warm_failed:
        result["warmup_error"] = warm_failed[0].message
    return result


def print_report(r: dict[str, Any]) -> None:
    print(f"mlflow models serve of {r['model']}, {r['workers']} worker(s), on 127.0.0.1 "
          f"(ready after {r['startup_s']} s); {r['images_per_request']} image(s) per good "
          "request")
    print(f"{'phase':<10}{'clients':>8}{'requests':>10}{'bad':>6}{'failed':>8}"
          f"{'p50 ms':>9}{'p99 ms':>9}{'img/s':>9}")
    for name in ("baseline", "load"):
        s = r[name]
        print(f"{name:<10}{s['clients']:>8}{s['requests']:>10}{s['bad']:>6}{s['failed']:>8}"
              f"{s['p50_ms']:>9.1f}{s['p99_ms']:>9.1f}{s['img_per_s']:>9.1f}")
    print(f"throughput {r['load']['clients']} clients / 1 client: {r['speedup']:.2f}x")
    print(f"{'bad request':<14}{'sent':>5}{'held':>5}  status  message")
    for kind, b in r["bad"].items():
        statuses = ",".join(map(str, b["statuses"]))
        message = " ".join(b["message"].split())
        print(f"{kind:<14}{b['sent']:>5}{b['held']:>5}  {statuses:<6}  {message[-110:]}")
    print(f"server RSS (process tree): {r['rss_ready_mb']:.0f} MB when ready, "
          f"{r['rss_before_mb']:.0f} MB after warm-up, "
          f"{r['rss_after_mb']:.0f} MB after the run: {r['rss_growth_mb']:+.1f} MB "
          f"(margin {r['rss_margin_mb']} MB: {'held' if r['rss_held'] else 'NOT held'})")
    quarters = ", ".join(f"{v:.0f}" for v in r["rss_load_quarters_mb"])
    print(f"  during the load, after each quarter of its requests: {quarters} MB")
    if r.get("warmup_error"):
        print(f"warm-up failed: {r['warmup_error']}")
    print("all held" if r["ok"] else "NOT all held")


def get_args_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        description="load test of the served model (mlflow models serve on loopback): "
                    "latency, images/s, server memory, bad requests mixed in",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--model", default=None,
                   help="NAME, NAME@ALIAS, NAME/VERSION or a models:/ URI of the registry "
                        "at MLFLOW_TRACKING_URI (default: a tiny fresh model in a temp dir)")
    p.add_argument("--requests", type=int, default=2000, help="requests of the load phase")
    p.add_argument("--clients", type=int, default=8,
                   help="concurrent clients of the warm-up and load phases")
    p.add_argument("--baseline-requests", type=int, default=200,
                   help="requests of the one-client baseline")
    p.add_argument("--warmup", type=int, default=64,
                   help="good requests of the warm-up (plus one of each bad kind)")
    p.add_argument("--bad-every", type=int, default=50,
                   help="every Nth request of the baseline and load phases is a bad one, the "
                        "kinds in turn (0: none)")
    p.add_argument("--images-per-request", type=int, default=2, help="images in a good request")
    p.add_argument("--image-px", type=int, default=96, help="side of the sent images")
    p.add_argument("--image-size", type=int, default=64,
                   help="input side of the tiny default model")
    p.add_argument("--big-mb", type=float, default=50.0, help="size of the big bad body")
    p.add_argument("--workers", type=int, default=1, help="server worker processes")
    p.add_argument("--max-images", type=int, default=DEFAULT_MAX_IMAGES,
                   help="the server's limit of images per request (wsdan serve)")
    p.add_argument("--max-request-mb", type=float, default=DEFAULT_MAX_REQUEST_MB,
                   help="the server's limit of MB of images per request (wsdan serve)")
    p.add_argument("--rss-margin-mb", type=float, default=64.0,
                   help="most the server's RSS may grow from after the warm-up to the end")
    return p


def main(args: argparse.Namespace) -> dict[str, Any]:
    from wsdan.config import ConfigError

    if args.requests < 1 or args.clients < 1 or args.images_per_request < 1:
        raise ConfigError("--requests, --clients and --images-per-request must be positive")
    result = bench(args)
    print_report(result)
    print(json.dumps(result))
    if not result["ok"]:
        raise SystemExit(1)
    return result


if __name__ == "__main__":
    from wsdan.cli import run_main

    sys.exit(run_main(main, get_args_parser()))
