"""The HTTP app that ``wsdan serve`` runs: MLflow's scoring server for one model (the app
``mlflow models serve`` runs, same routes and answers) behind a guard on request bodies.

MLflow's scoring server reads a whole request into memory before looking at it, and its
answer to a body that is not JSON quotes the body in full: a 50 MB upload of junk costs
50 MB to receive and 50 MB more to answer. The guard:

- refuses a body over the limit with HTTP 413 and a message naming the limit; the model
  never sees it, and what comes past the limit is dropped as it arrives (memory stays
  bounded by the limit). A body declared larger than 8 limits is not read at all;
- shortens the message of an error answer (4xx/5xx) to :data:`MAX_ERROR_MESSAGE` characters,
  so that no answer quotes a request back.

The limit is derived from the served model's ``--max-request-mb`` (encoded images as base64
in JSON: 4/3 of the image bytes, plus room for the JSON): a request the model would refuse
for its size with a 400 naming ``max_request_mb`` is refused here already, with the same
words. The model and its limits come from the environment set by :mod:`wsdan.serving`
(``WSDAN_SERVE_MODEL_URI``, ``WSDAN_SERVE_MAX_REQUEST_MB``); uvicorn imports this module's
``app``: ``uvicorn wsdan.serving_app:app``.
"""

from __future__ import annotations

import json
import os
from collections.abc import Awaitable, Callable, MutableMapping
from typing import Any

MAX_ERROR_MESSAGE = 2000  # characters of an error message that are sent back
_JSON_ROOM = 1_000_000  # bytes of a body allowed beyond the base64 of max_request_mb
DRAIN_FACTOR = 8  # a body over the limit is read (and dropped) up to this many limits

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]


def body_limit(max_request_mb: float) -> int:
    """Bytes of a request body allowed for ``max_request_mb`` MB of encoded images."""
    return int(max_request_mb * 1e6 * 4 / 3) + _JSON_ROOM


class BodyGuard:
    """ASGI middleware: request bodies of at most ``limit`` bytes, error messages of at most
    ``max_message`` characters (see the module's doc)."""

    def __init__(self, app: ASGIApp, limit: int, *, max_request_mb: float | None = None,
                 max_message: int = MAX_ERROR_MESSAGE) -> None:
        self.app, self.limit, self.max_message = app, int(limit), int(max_message)
        self.max_request_mb = max_request_mb

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        declared = _content_length(scope)
        if declared is not None and declared > DRAIN_FACTOR * self.limit:
            await self._too_large(send, declared, exact=True)  # not read; the line closes
            return
        # Read to the end even when it is too large (what is over the limit is dropped as it
        # comes): a client still sending would otherwise lose the answer to a reset line.
        chunks: list[bytes] = []
        size, more = 0, True
        while more:
            message = await receive()
            if message["type"] == "http.disconnect":
                return
            chunk = message.get("body", b"")
            size += len(chunk)
            more = message.get("more_body", False)
            if size <= self.limit:
                chunks.append(chunk)
            elif size > DRAIN_FACTOR * self.limit:
                break
        if size > self.limit:
            await self._too_large(send, declared if declared is not None else size,
                                  exact=declared is not None or not more)
            return
        body = b"".join(chunks)
        replayed = False

        async def replay() -> Message:
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": body, "more_body": False}
            return await receive()  # after the body: wait for the client to go

        await self.app(scope, replay, _ShortErrors(send, self.max_message))

    async def _too_large(self, send: Send, size: int, *, exact: bool) -> None:
        what = f"{size / 1e6:.1f} MB" if exact else f"over {size / 1e6:.1f} MB"
        limit = (f"the limit of {self.max_request_mb:g} MB of images per request "
                 "(max_request_mb)" if self.max_request_mb is not None else
                 f"the limit of {self.limit / 1e6:.1f} MB per request body")
        message = (f"request too large: a body of {what}, over {limit}: send fewer or "
                   "smaller images")
        await _send_json(send, 413, {"error_code": "REQUEST_LIMIT_EXCEEDED",
                                     "message": message})


class _ShortErrors:
    """Wraps ``send``: an error answer's JSON ``message`` is cut to ``max_message``
    characters (with a note saying how long it was); other answers pass unchanged."""

    def __init__(self, send: Send, max_message: int) -> None:
        self.send, self.max_message = send, max_message
        self.start: Message | None = None
        self.body: list[bytes] = []

    async def __call__(self, message: Message) -> None:
        if message["type"] == "http.response.start" and message["status"] >= 400:
            self.start = message  # held until the body is complete
            return
        if self.start is None or message["type"] != "http.response.body":
            await self.send(message)
            return
        self.body.append(message.get("body", b""))
        if message.get("more_body", False):
            return
        body = _shorten(b"".join(self.body), self.max_message)
        headers = [(k, v) for k, v in self.start.get("headers", [])
                   if k.lower() != b"content-length"]
        headers.append((b"content-length", str(len(body)).encode()))
        await self.send(dict(self.start, headers=headers))
        await self.send({"type": "http.response.body", "body": body, "more_body": False})


def _shorten(body: bytes, max_message: int) -> bytes:
    try:
        answer = json.loads(body)
    except ValueError:
        answer = None
    if isinstance(answer, dict) and isinstance(answer.get("message"), str):
        text = answer["message"]
        if len(text) <= max_message:
            return body
        answer["message"] = (f"{text[:max_message]}... [message cut: {len(text):,} characters, "
                             f"the first {max_message:,} shown]")
        return json.dumps(answer).encode()
    if len(body) <= max_message:
        return body
    return body[:max_message] + f"... [answer cut: {len(body):,} bytes]".encode()


def _content_length(scope: Scope) -> int | None:
    for key, value in scope.get("headers", []):
        if key.lower() == b"content-length":
            try:
                return int(value)
            except ValueError:
                return None
    return None


async def _send_json(send: Send, status: int, answer: dict[str, Any]) -> None:
    body = json.dumps(answer).encode()
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", b"application/json"),
                            (b"content-length", str(len(body)).encode()),
                            (b"connection", b"close")]})
    await send({"type": "http.response.body", "body": body, "more_body": False})


def build_app(model_uri: str, max_request_mb: float) -> ASGIApp:
    """MLflow's scoring app for ``model_uri`` (loaded here, as ``mlflow models serve`` loads
    it) behind :class:`BodyGuard`."""
    from mlflow.pyfunc import scoring_server

    model = scoring_server.load_model_with_mlflow_config(model_uri)
    return BodyGuard(scoring_server.init(model), body_limit(max_request_mb),
                     max_request_mb=max_request_mb)


def _app_from_environment() -> ASGIApp:
    from wsdan.serving import MODEL_URI_ENV, request_limits

    uri = os.environ.get(MODEL_URI_ENV)
    if not uri:
        raise RuntimeError(f"{MODEL_URI_ENV} is not set: start the server with `wsdan serve`")
    return build_app(uri, request_limits()[1])


def __getattr__(name: str) -> Any:  # `app` is built when uvicorn asks for it
    if name == "app":
        app = _app_from_environment()
        globals()["app"] = app
        return app
    raise AttributeError(name)
