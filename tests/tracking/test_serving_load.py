"""The served model under load (``jobs.bench_serve``): a real ``mlflow models serve`` of a tiny
model takes concurrent keep-alive clients with bad requests mixed in (a wrong column, a value
that is not an image, an empty batch, a 50 MB body, a body that is not JSON); every good
request succeeds, every bad one gets a 4xx naming its problem, and the server's memory after
the run is within the bench's margin of what it was after the warm-up. The request-size
limits and their plumbing into the server are checked without a server too."""

from __future__ import annotations

import argparse
import json

import numpy as np
import pytest
from mlflow.exceptions import MlflowException

from jobs import bench_serve
from wsdan import serving
from wsdan.tracking import pyfunc


def test_request_limits_are_client_errors_naming_the_limit() -> None:
    pyfunc.check_request_size([b"x" * 1000] * 3, max_images=3, max_request_mb=0.003)  # at it
    with pytest.raises(MlflowException) as info:
        pyfunc.check_request_size([b"x"] * 4, max_images=3, max_request_mb=1)
    assert info.value.get_http_status_code() == 400
    assert info.value.message.startswith("request too large: 4 images, over the limit of 3 ")
    cases = {  # each holds 3,000,001 bytes of images before decoding
        "bytes": [b"x" * 3_000_001],
        "base64 text": ["A" * 4_000_000, "AAAA"],
        "arrays": [np.zeros((1000, 1000, 3), np.uint8), np.zeros(1, np.uint8)],
    }
    for name, values in cases.items():
        with pytest.raises(MlflowException) as info:
            pyfunc.check_request_size(values, max_images=10, max_request_mb=3)
        assert info.value.message.startswith(
            "request too large: 3.0 MB of images, over the limit of 3 MB per request "
            "(max_request_mb)"), (name, info.value.message)


def test_serve_passes_the_limits_to_the_model() -> None:
    args = serving.get_args_parser().parse_args(["m", "--max-images", "9",
                                                 "--max-request-mb", "2.5"])
    env = serving.serve_env(args, {"PATH": "/x", "OTHER": "kept"})
    assert (env["WSDAN_SERVE_MAX_IMAGES"], env["WSDAN_SERVE_MAX_REQUEST_MB"]) == ("9", "2.5")
    assert env["PATH"].endswith(":/x") and env["OTHER"] == "kept"
    assert pyfunc.request_limits is serving.request_limits  # what load_context reads
    assert serving.request_limits(env) == (9, 2.5)
    assert serving.request_limits({}) == (256, 20.0)
    with pytest.raises(serving.ConfigError, match="must be positive"):
        serving.serve_env(argparse.Namespace(max_images=0, max_request_mb=1.0), {})
    for bad in ("0", "-1", "ten", "nan"):
        with pytest.raises(ValueError, match=f"WSDAN_SERVE_MAX_REQUEST_MB='{bad}': expected"):
            serving.request_limits({"WSDAN_SERVE_MAX_REQUEST_MB": bad})
    with pytest.raises(ValueError, match="WSDAN_SERVE_MAX_IMAGES='2.5': expected a positive"):
        serving.request_limits({"WSDAN_SERVE_MAX_IMAGES": "2.5"})


def test_bad_requests_are_mixed_in_turn() -> None:
    good = [bench_serve.Req("good", b"g", images=1)]
    bad = {k: bench_serve.Req(k, k.encode(), expect=k) for k in bench_serve.BAD_KINDS}
    n = len(bench_serve.BAD_KINDS)
    kinds = [r.kind for r in bench_serve.mixed(good, bad, 6 * n, 3)]
    assert kinds[2::3] == [*bench_serve.BAD_KINDS, *bench_serve.BAD_KINDS]
    assert kinds.count("good") == 4 * n


@pytest.mark.slow
def test_served_model_under_load_with_bad_requests() -> None:
    args = bench_serve.get_args_parser().parse_args([
        "--requests", "200", "--clients", "4", "--bad-every", "20", "--baseline-requests", "20",
        "--warmup", "16", "--image-px", "64", "--image-size", "32", "--big-mb", "50",
        "--max-request-mb", "30",  # reaches the served model through wsdan serve's env
    ])  # fmt: skip
    r = bench_serve.bench(args)
    summary = json.dumps({k: v for k, v in r.items() if k != "bad"})
    # Every good request succeeded, with one prediction per image.
    assert r["warmup_failed"] == 0, r.get("warmup_error")
    assert r["baseline"]["failed"] == 0 and r["load"]["failed"] == 0, summary
    assert (r["load"]["requests"], r["load"]["bad"], r["load"]["good"]) == (200, 10, 190)
    assert (r["baseline"]["clients"], r["load"]["clients"]) == (1, 4)
    assert r["load"]["p50_ms"] > 0 and r["load"]["p99_ms"] >= r["load"]["p50_ms"]
    assert r["load"]["img_per_s"] > 0
    # Every bad request got its 4xx naming the problem, in a short answer: once in the
    # warm-up, once in the baseline's 20 requests (the first kind), once or twice among the
    # load's 10 (the kinds in turn).
    sent = {kind: 1 for kind in bench_serve.BAD_KINDS}
    for i in range(10):
        sent[bench_serve.BAD_KINDS[i % len(bench_serve.BAD_KINDS)]] += 1
    sent["wrong column"] += 1
    too_large = {"big body", "big junk"}  # refused for their size by the body guard: 413
    for kind, row in r["bad"].items():
        assert row["sent"] == sent[kind] and row["held"] == row["sent"], (kind, row)
        assert row["statuses"] == [413 if kind in too_large else 400], (kind, row)
    messages = {kind: row["message"] for kind, row in r["bad"].items()}
    assert "Model is missing inputs ['image']" in messages["wrong column"]
    assert "row 0: cannot decode image (32 bytes): not an image" in messages["not an image"]
    assert "empty batch: no rows in the 'image' column" in messages["empty batch"]
    for kind in too_large:  # 50 MB bodies; 30 MB of images allowed (40 MB + 1 of base64 JSON)
        assert messages[kind].startswith(
            "request too large: a body of 50.0 MB, over the limit of 30 MB of images per "
            "request (max_request_mb)"), messages[kind]
    assert "Ensure that input is a valid JSON formatted string" in messages["not JSON"]
    # MLflow's parser quotes what it cannot parse: the 5 MB of junk come back cut short.
    assert "[message cut: 5,0" in messages["long junk"] and len(messages["long junk"]) < 2200
    # No leak: the server's memory after the run is within the margin of after the warm-up.
    assert min(r["rss_ready_mb"], r["rss_before_mb"], r["rss_after_mb"]) > 100  # the tree
    assert len(r["rss_load_quarters_mb"]) == 4 and min(r["rss_load_quarters_mb"]) > 100
    assert r["rss_growth_mb"] <= r["rss_margin_mb"] == 64.0, summary
    assert r["rss_held"] and r["ok"]
