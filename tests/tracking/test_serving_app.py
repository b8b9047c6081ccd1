"""The body guard in front of MLflow's scoring app (``wsdan.serving_app.BodyGuard``), driven
as ASGI directly: what reaches the app, what is answered, how much is held. The real server
(uvicorn, a served model, bodies of 50 MB) is in test_serving_load.py."""

from __future__ import annotations

import asyncio
import json

import pytest

from wsdan.serving_app import BodyGuard, body_limit


class App:
    """A stand-in for the scoring app: records the body it read, answers ``status`` with
    ``answer`` (sent in two chunks, as a streaming app may)."""

    def __init__(self, status: int = 200, answer: bytes = b'{"predictions": []}') -> None:
        self.status, self.answer, self.bodies = status, answer, []

    async def __call__(self, scope, receive, send) -> None:
        body, more = b"", True
        while more:
            message = await receive()
            body += message.get("body", b"")
            more = message.get("more_body", False)
        self.bodies.append(body)
        await send({"type": "http.response.start", "status": self.status,
                    "headers": [(b"content-type", b"application/json"),
                                (b"content-length", str(len(self.answer)).encode())]})
        half = len(self.answer) // 2
        await send({"type": "http.response.body", "body": self.answer[:half],
                    "more_body": True})
        await send({"type": "http.response.body", "body": self.answer[half:]})


def call(guard: BodyGuard, chunks: list[bytes], *, declared: int | None = None):
    """Send ``chunks`` as one request; (status, headers, body, chunks the guard read)."""
    headers = [] if declared is None else [(b"content-length", str(declared).encode())]
    scope = {"type": "http", "method": "POST", "path": "/invocations", "headers": headers}
    pending = [{"type": "http.request", "body": c, "more_body": i < len(chunks) - 1}
               for i, c in enumerate(chunks)]
    read = 0
    sent = []

    async def receive():
        nonlocal read
        if pending:
            read += 1
            return pending.pop(0)
        await asyncio.sleep(3600)  # the client waits for its answer

    async def send(message):
        sent.append(message)

    asyncio.run(guard(scope, receive, send))
    start = sent[0]
    assert start["type"] == "http.response.start"
    body = b"".join(m.get("body", b"") for m in sent[1:])
    headers = dict(start["headers"])
    assert int(headers[b"content-length"]) == len(body)
    return start["status"], headers, body, read


def test_the_limit_is_the_base64_of_the_images_plus_room_for_json() -> None:
    assert body_limit(20) == 20 * 4 // 3 * 10**6 + 666_666 + 1_000_000
    assert body_limit(0.75) == 2_000_000


def test_bodies_within_the_limit_reach_the_app_whole_and_answers_pass() -> None:
    app = App()
    guard = BodyGuard(app, limit=100)
    for chunks in ([b"x" * 100], [b"a" * 40, b"b" * 60], [b""]):
        status, _, body, _ = call(guard, chunks, declared=sum(map(len, chunks)))
        assert (status, body) == (200, b'{"predictions": []}')
        assert app.bodies[-1] == b"".join(chunks)
    status, _, _, _ = call(guard, [b"a" * 50, b"b" * 50])  # chunked, no length declared
    assert status == 200 and app.bodies[-1] == b"a" * 50 + b"b" * 50


@pytest.mark.parametrize("declared", [True, False])
def test_a_body_over_the_limit_is_413_and_never_reaches_the_app(declared) -> None:
    app = App()
    guard = BodyGuard(app, limit=100, max_request_mb=0.00005)
    chunks = [b"x" * 60, b"y" * 60, b"z" * 60]
    status, _, body, read = call(guard, chunks, declared=180 if declared else None)
    answer = json.loads(body)
    assert status == 413 and app.bodies == []
    assert answer["error_code"] == "REQUEST_LIMIT_EXCEEDED"
    assert answer["message"].startswith(
        "request too large: a body of 0.0 MB, over the limit of 5e-05 MB of images per "
        "request (max_request_mb)")
    assert read == 3  # read to its end (dropped as it came), so the client gets the answer


def test_a_body_declared_far_over_the_limit_is_not_read() -> None:
    app = App()
    guard = BodyGuard(app, limit=1_000_000)
    status, headers, body, read = call(guard, [b"x" * 10], declared=50_000_000)
    assert status == 413 and read == 0 and app.bodies == []
    assert headers[b"connection"] == b"close"
    assert json.loads(body)["message"].startswith(
        "request too large: a body of 50.0 MB, over the limit of 1.0 MB per request body")


def test_a_chunked_body_far_over_the_limit_stops_being_read() -> None:
    app = App()
    guard = BodyGuard(app, limit=10)
    status, _, body, read = call(guard, [b"x" * 30] * 10)
    assert status == 413 and read == 3 and app.bodies == []  # 90 > 8 limits: stop there
    assert "a body of over 0.0 MB" in json.loads(body)["message"]


def test_error_answers_are_cut_and_say_so_others_are_not() -> None:
    quoted = json.dumps({"error_code": "BAD_REQUEST",
                         "message": "Ensure that input is valid JSON. Input: " + "q" * 9000})
    guard = BodyGuard(App(400, quoted.encode()), limit=100, max_message=50)
    status, _, body, _ = call(guard, [b"{junk"])
    answer = json.loads(body)
    assert status == 400 and answer["error_code"] == "BAD_REQUEST"
    assert answer["message"] == ("Ensure that input is valid JSON. Input: qqqqqqqqqq... "
                                 "[message cut: 9,040 characters, the first 50 shown]")
    short = json.dumps({"error_code": "BAD_REQUEST", "message": "empty batch"}).encode()
    assert call(BodyGuard(App(400, short), limit=100, max_message=50), [b"{}"])[2] == short
    text = b"<html>" + b"e" * 500  # an error that is not JSON: cut as bytes
    status, _, body, _ = call(BodyGuard(App(502, text), limit=100, max_message=50), [b""])
    assert status == 502 and body == text[:50] + b"... [answer cut: 506 bytes]"
    big = b'{"predictions": [' + b"1," * 5000 + b"1]}"  # a long good answer is untouched
    assert call(BodyGuard(App(200, big), limit=100, max_message=50), [b"{}"])[2] == big
