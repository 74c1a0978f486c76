"""The body gate: a request is admitted only once its whole body is in, read under a size cap and a
deadline; and the project's JSON error body for the answers Serve's proxy writes itself.

A pure ASGI middleware, run in two places:
  - in Serve's HTTP proxy, before the request is routed (installed by Ray from
    RAY_SERVE_HTTP_PROXY_CALLBACK_IMPORT_PATH=serving.gate:proxy_middlewares, which `htcl serve`
    sets for the Ray instance it starts). Without it Serve routes a request to an ingress replica
    as soon as its headers are in, and the replica pulls the body from the proxy: a client sending
    its body at 2 bytes/s holds one of the ingress's slots the whole time, and 64 of them held every
    slot (issue 13). Behind the gate a slow body costs a socket and a coroutine in the proxy only.
    There it also turns Serve's own text/plain errors (backpressure 503, request-timeout 408, the
    500 of a failed call) into `{"error": {"field", "message"}}`, with Retry-After on a 503.
  - in the FastAPI app itself (serving/api.py), so the caps and the deadline hold wherever the app
    runs, proxy gate or not, and an oversized body is refused before any JSON parsing.

Errors: 413 body over the cap (a declared Content-Length over it is refused before a byte is read),
408 body not in within its deadline, 503 (Retry-After) more uploads than `max_uploads` buffered at once.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
from dataclasses import asdict, dataclass
from http import HTTPStatus

log = logging.getLogger("ray.serve")

PROXY_CALLBACK_ENV = "RAY_SERVE_HTTP_PROXY_CALLBACK_IMPORT_PATH"
PROXY_CALLBACK = "serving.gate:proxy_middlewares"
LIMITS_ENV = "HTCL_SERVE_BODY_LIMITS"  # JSON of BodyLimits for the proxy's gate


def error_body(field: str | None, message: str) -> dict:
    return {"error": {"field": field, "message": message}}


@dataclass(frozen=True)
class BodyLimits:
    # A /v1/rank body of 1000 candidates, every id 19 digits, pretty-printed, is ~26 kB.
    max_json_bytes: int = 64 * 1024
    max_upload_bytes: int = 20 * 1024 * 1024
    # JSON bodies are small: seconds are generous. An upload gets longer (20 MB in 30 s: 0.7 MB/s).
    body_timeout_s: float = 5.0
    upload_timeout_s: float = 30.0
    # Uploads held in memory at once, each up to max_upload_bytes; more are answered 503 at once.
    max_uploads: int = 8
    upload_paths: tuple[str, ...] = ("/v1/embed",)

    def to_env(self) -> str:
        return json.dumps(asdict(self))

    @classmethod
    def from_env(cls, raw: str | None) -> "BodyLimits":
        if not raw:
            return cls()
        values = json.loads(raw)
        values["upload_paths"] = tuple(values.get("upload_paths", cls.upload_paths))
        return cls(**values)


def proxy_middlewares() -> list:
    """Ray Serve's HTTP proxy callback: the middlewares its uvicorn app runs (limits: $HTCL_SERVE_BODY_LIMITS)."""
    from starlette.middleware import Middleware

    limits = BodyLimits.from_env(os.environ.get(LIMITS_ENV))
    log.info("htcl body gate in Serve's proxy: %s", limits)
    return [Middleware(BodyGate, limits=limits, serve_errors_as_json=True)]


class _TooLarge(Exception):
    pass


async def send_error(
    send, status: int, field: str | None, message: str, headers: list | tuple = (), close: bool = False
) -> None:
    body = json.dumps(error_body(field, message)).encode()
    extra = [(b"connection", b"close")] if close else []
    await send(
        {
            "type": "http.response.start",
            "status": status,
            "headers": [
                (b"content-type", b"application/json"),
                (b"content-length", str(len(body)).encode()),
                *headers,
                *extra,
            ],
        }
    )
    await send({"type": "http.response.body", "body": body})


class BodyGate:
    """ASGI middleware: read the body (cap, deadline), then call the app with it as one message."""

    def __init__(self, app, limits: BodyLimits | None = None, serve_errors_as_json: bool = False):
        self.app, self.limits, self.serve_errors_as_json = app, limits or BodyLimits(), serve_errors_as_json
        self._uploads = asyncio.Semaphore(self.limits.max_uploads)

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        if self.serve_errors_as_json:
            send = _JsonErrors(send)
        try:
            await self._gated(scope, receive, send)
        except Exception:
            if not self.serve_errors_as_json or send.started:
                raise
            log.exception("request failed in front of the app")
        if self.serve_errors_as_json and not send.started:
            if send.held is not None:  # an error whose body never came
                await send.send_held()
            else:  # Serve's proxy answers nothing at all on some failures
                await send_error(send, 500, None, "internal error: the request failed inside Serve")

    async def _gated(self, scope, receive, send):
        limits = self.limits
        upload = scope.get("path", "").rstrip("/") in limits.upload_paths
        cap = limits.max_upload_bytes if upload else limits.max_json_bytes
        timeout = limits.upload_timeout_s if upload else limits.body_timeout_s
        what = "upload" if upload else "JSON body"
        declared = _header(scope, b"content-length")
        if declared is not None and declared.strip().isdigit() and int(declared) > cap:
            return await send_error(
                send, 413, "body", f"{what} of {int(declared)} bytes exceeds the limit of {cap} bytes", close=True
            )
        if upload:
            if self._uploads.locked():
                return await send_error(
                    send,
                    503,
                    None,
                    f"{limits.max_uploads} uploads in progress: retry later",
                    [(b"retry-after", b"1")],
                    close=True,
                )
            await self._uploads.acquire()
        try:
            try:
                body, disconnect = await asyncio.wait_for(_read_body(receive, cap), timeout)
            except asyncio.TimeoutError:
                return await send_error(
                    send, 408, "body", f"the request body did not arrive within {timeout:g} s", close=True
                )
            except _TooLarge:
                return await send_error(send, 413, "body", f"{what} exceeds the limit of {cap} bytes", close=True)
            if disconnect is not None:  # the client left: nobody to answer
                return None
            await self.app(scope, _replay(body, receive), send)
        finally:
            if upload:
                self._uploads.release()


def _header(scope, name: bytes) -> str | None:
    for key, value in scope.get("headers", ()):
        if key.lower() == name:
            return value.decode("latin-1")
    return None


async def _read_body(receive, cap: int) -> tuple[bytes, dict | None]:
    """The whole body (counted as it arrives, so a chunked body is capped too), or the disconnect."""
    chunks, size = [], 0
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            return b"", message
        chunk = message.get("body", b"")
        size += len(chunk)
        if size > cap:
            raise _TooLarge()
        chunks.append(chunk)
        if not message.get("more_body", False):
            return b"".join(chunks), None


def _replay(body: bytes, receive):
    """The app's receive: the body as one message, then the client's own (its disconnect)."""
    sent = False

    async def replayed():
        nonlocal sent
        if not sent:
            sent = True
            return {"type": "http.request", "body": body, "more_body": False}
        return await receive()

    return replayed


class _JsonErrors:
    """Wraps `send`: an error answer that is not JSON (Serve's own, text/plain) becomes the project's
    error body with the same status and Retry-After; everything else passes as is."""

    def __init__(self, send):
        self.send, self.started = send, False
        self.held: dict | None = None
        self.held_body = bytearray()

    async def __call__(self, message):
        kind = message["type"]
        if kind == "http.response.start":
            ctype = dict((k.lower(), v) for k, v in message.get("headers", ())).get(b"content-type", b"")
            if message["status"] >= 400 and not ctype.startswith(b"application/json"):
                self.held = message
                return None
            self.started = True
            return await self.send(message)
        if kind == "http.response.body" and self.held is not None:
            self.held_body += message.get("body", b"")
            if message.get("more_body", False):
                return None
            return await self.send_held()
        return await self.send(message)

    async def send_held(self):
        status = self.held["status"]
        kept = [(k, v) for k, v in self.held.get("headers", ()) if k.lower() in (b"retry-after", b"x-request-id")]
        if status in (429, 503) and not any(k.lower() == b"retry-after" for k, _ in kept):
            kept.append((b"retry-after", b"1"))
        text = self.held_body.decode("utf-8", "replace").strip() or HTTPStatus(status).phrase
        self.started = True
        self.held = None
        await send_error(self.send, status, "path" if status == 404 else None, text, kept)
