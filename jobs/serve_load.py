"""The load side of ``jobs.bench_serve``: request bodies, good and bad, and the clients.

:func:`good_requests` and :func:`bad_requests` build the bodies (base64 images in a
``dataframe_split`` payload; one request of each bad kind with the substring its error must
contain); :func:`mixed` interleaves them; :func:`run_phase` sends them from threads, one
keep-alive connection each, and judges every answer (:func:`judge`): a good request needs
200 and one prediction per image, a bad one a 4xx naming the problem in at most
``MAX_ERROR_ANSWER`` bytes, without a stack trace.
"""

from __future__ import annotations

import base64
import http.client
import io
import json
import threading
import time
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from PIL import Image

__all__ = ["BAD_KINDS", "MAX_ERROR_ANSWER", "Outcome", "Phase", "Req", "bad_requests",
           "good_requests", "judge", "mixed", "run_phase"]

BAD_KINDS = ("wrong column", "not an image", "empty batch", "big body", "not JSON",
             "big junk", "long junk")
MAX_ERROR_ANSWER = 16_384  # bytes: an error answer never quotes a request back


@dataclass(frozen=True)
class Req:
    """One request: its body, how many images a good one holds, and for a bad one the
    substring its error message must contain."""

    kind: str  # "good" or one of BAD_KINDS
    body: bytes
    images: int = 0
    expect: str | None = None


@dataclass
class Outcome:
    kind: str
    status: int  # 0: no HTTP answer (connection error, timeout)
    latency: float
    message: str
    images: int
    held: bool


@dataclass
class Phase:
    name: str
    clients: int
    outcomes: list[Outcome] = field(default_factory=list)
    wall: float = 0.0
    probed: list[Any] = field(default_factory=list)

    def good(self) -> list[Outcome]:
        return [o for o in self.outcomes if o.kind == "good"]

    def summary(self) -> dict[str, Any]:
        good = self.good()
        lat = sorted(o.latency for o in good if o.held) or [float("nan")]
        images = sum(o.images for o in good if o.held)
        return {"clients": self.clients, "requests": len(self.outcomes),
                "good": len(good), "failed": sum(not o.held for o in good),
                "bad": len(self.outcomes) - len(good),
                "p50_ms": round(_percentile(lat, 50) * 1e3, 1),
                "p99_ms": round(_percentile(lat, 99) * 1e3, 1),
                "img_per_s": round(images / self.wall, 1) if self.wall else 0.0,
                "wall_s": round(self.wall, 2)}


def _percentile(values: list[float], q: float) -> float:
    """Nearest-rank percentile of sorted ``values``."""
    k = max(0, min(len(values) - 1, int(np.ceil(q / 100 * len(values))) - 1))
    return values[k]


# -- the payloads ----------------------------------------------------------------------------


def _images(count: int, px: int) -> list[bytes]:
    """``count`` distinct encoded images of about px×px: noise, gradients and blocks, as PNG
    and JPEG, sizes varying a little."""
    rng = np.random.default_rng(0)
    out = []
    for i in range(count):
        h, w = px - (i % 5) * px // 16, px + (i % 3) * px // 16
        yy, xx = np.mgrid[0:h, 0:w]
        base = np.stack([xx * 255 // w, yy * 255 // h, np.full((h, w), 40 * (i % 6))], -1)
        noise = rng.integers(0, 60, (h, w, 3))
        arr = np.clip(base + noise, 0, 255).astype(np.uint8)
        buf = io.BytesIO()
        Image.fromarray(arr).save(buf, format="PNG" if i % 2 else "JPEG", quality=90)
        out.append(buf.getvalue())
    return out


def _split(values: list[str], column: str = "image") -> bytes:
    return json.dumps({"dataframe_split": {"columns": [column],
                                           "data": [[v] for v in values]}}).encode()


def good_requests(count: int, per_request: int, px: int) -> list[Req]:
    """``count`` distinct good bodies of ``per_request`` base64 images each."""
    texts = [base64.b64encode(b).decode("ascii") for b in _images(max(8, per_request * 4), px)]
    return [Req("good", _split([texts[(i + j) % len(texts)] for j in range(per_request)]),
                images=per_request) for i in range(count)]


def bad_requests(big_mb: float, px: int) -> dict[str, Req]:
    """One request of each bad kind, with what its error message must say."""
    good = base64.b64encode(_images(1, px)[0]).decode("ascii")
    text = base64.b64encode(b"this is plain text, not an image").decode("ascii")
    # One "image" of random bytes after a PNG signature, sized so the body is big_mb MB.
    raw = b"\x89PNG\r\n\x1a\n" + np.random.default_rng(1).bytes(int(big_mb * 1e6 * 3 / 4))
    return {
        "wrong column": Req("wrong column", _split([good], column="picture"),
                            expect="missing inputs ['image']"),
        "not an image": Req("not an image", _split([text]),
                            expect="row 0: cannot decode image (32 bytes)"),
        "empty batch": Req("empty batch", _split([]),
                           expect="empty batch: no rows in the 'image' column"),
        "big body": Req("big body", _split([base64.b64encode(raw).decode("ascii")]),
                        expect="request too large"),
        "not JSON": Req("not JSON", b"{this is not json",
                        expect="Ensure that input is a valid JSON formatted string"),
        # Not JSON either: big_mb MB (refused for its size, before the server holds it), and
        # 5 MB, under the size limit (refused by MLflow's parser, which quotes the body: the
        # answer must come back short).
        "big junk": Req("big junk", b"x" * int(big_mb * 1e6), expect="request too large"),
        "long junk": Req("long junk", b"{" + b"x" * 5_000_000,
                         expect="Ensure that input is a valid JSON formatted string"),
    }


# -- the clients -----------------------------------------------------------------------------


def _send(conn: http.client.HTTPConnection, req: Req) -> tuple[int, bytes]:
    conn.request("POST", "/invocations", body=req.body,
                 headers={"Content-Type": "application/json"})
    response = conn.getresponse()
    return response.status, response.read()


def judge(req: Req, status: int, body: bytes) -> tuple[bool, str]:
    """Whether the answer is the right one, and its message (errors) or a summary."""
    try:
        answer = json.loads(body)
    except ValueError:
        answer = None
    if req.kind == "good":
        rows = answer.get("predictions") if isinstance(answer, dict) else None
        ok = status == 200 and isinstance(rows, list) and len(rows) == req.images
        return ok, f"{len(rows)} predictions" if ok else body[:300].decode(errors="replace")
    message = answer.get("message", "") if isinstance(answer, dict) else ""
    message = message or body[:300].decode(errors="replace")
    ok = (400 <= status < 500 and isinstance(answer, dict) and req.expect in message
          and "stack_trace" not in answer and len(body) <= MAX_ERROR_ANSWER)
    return ok, message


def run_phase(url: str, name: str, requests: list[Req], clients: int,
              timeout: float = 120, probe: Any = None, probes: int = 0) -> Phase:
    """Send ``requests`` (in order, as the clients take them) from ``clients`` threads, one
    keep-alive connection each (a new one after a connection error). ``probe()``, if given,
    runs each time another 1/``probes`` of the requests has been answered; its values are
    in ``phase.probed``."""
    host, port = url.removeprefix("http://").split(":")
    phase = Phase(name, clients)
    marks = {len(requests) * k // probes for k in range(1, probes + 1)} if probe else set()
    lock = threading.Lock()
    taken = iter(range(len(requests)))

    def client() -> None:
        conn = http.client.HTTPConnection(host, int(port), timeout=timeout)
        try:
            while True:
                with lock:
                    i = next(taken, None)
                if i is None:
                    return
                req = requests[i]
                t = time.perf_counter()
                try:
                    status, body = _send(conn, req)
                    held, message = judge(req, status, body)
                except (OSError, http.client.HTTPException) as err:
                    status, held, message = 0, False, f"{type(err).__name__}: {err}"
                    conn.close()
                    conn = http.client.HTTPConnection(host, int(port), timeout=timeout)
                outcome = Outcome(req.kind, status, time.perf_counter() - t, message,
                                  req.images, held)
                with lock:
                    phase.outcomes.append(outcome)
                    if len(phase.outcomes) in marks:
                        phase.probed.append(probe())
        finally:
            conn.close()

    threads = [threading.Thread(target=client, name=f"client-{k}") for k in range(clients)]
    t0 = time.perf_counter()
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    phase.wall = time.perf_counter() - t0
    return phase


def mixed(good: list[Req], bad: dict[str, Req], total: int, bad_every: int) -> list[Req]:
    """``total`` requests: every ``bad_every``-th a bad one (the kinds in turn), else good."""
    out, kinds = [], list(bad.values())
    for i in range(total):
        if bad_every and i % bad_every == bad_every - 1:
            out.append(kinds[(i // bad_every) % len(kinds)])
        else:
            out.append(good[i % len(good)])
    return out
