"""Serving under hostile but honest clients (issue 13), without Ray: bodies read with a size cap and
a deadline before a request is admitted (in the FastAPI app and in Serve's proxy, where the same
gate runs), Serve's own error answers turned into our JSON error body, strict path ids, a /healthz
that a crowd of probes cannot multiply, and the API key kept out of the Ray processes."""

from __future__ import annotations

import asyncio
import json
import os
import time

import pytest
from fastapi.testclient import TestClient

from serving.api import ApiSettings, create_api, key_digest

# --- helpers -------------------------------------------------------------------------------------


class FakeBackend:
    def __init__(self):
        self.calls = []

    async def embedding(self, song_id):
        self.calls.append(("embedding", song_id))
        return {"song_id": song_id}

    async def similar(self, song_id, k):
        self.calls.append(("similar", song_id, k))
        return {"song_id": song_id, "k": k, "similar": []}

    async def rank(self, user_id, trigger_song_id, candidates):
        self.calls.append(("rank", user_id, trigger_song_id, len(candidates)))
        return {"results": []}

    async def recommend(self, user_id, trigger_song_id, k, candidates):
        self.calls.append(("recommend", user_id, trigger_song_id, k, candidates))
        return {"recommendations": []}

    async def embed_audio(self, data, k):
        self.calls.append(("embed", len(data), k))
        return {"embedding": []}

    async def health(self):
        return {"status": "ok"}


def error_of(r) -> tuple[int, str | None]:
    body = r.json()
    assert r.headers["content-type"].startswith("application/json"), r.headers
    assert set(body) == {"error"} and set(body["error"]) == {"field", "message"}, body
    return r.status_code, body["error"]["field"]


def scope(method: str, path: str, headers: list[tuple[bytes, bytes]]) -> dict:
    return {
        "type": "http",
        "asgi": {"version": "3.0"},
        "http_version": "1.1",
        "method": method,
        "scheme": "http",
        "path": path,
        "raw_path": path.encode(),
        "query_string": b"",
        "root_path": "",
        "headers": headers,
        "client": ("127.0.0.1", 50000),
        "server": ("127.0.0.1", 8000),
        "state": {},
    }


async def drive(
    app,
    method: str,
    path: str,
    chunks: list[bytes],
    every_s: float,
    content_length: int | None = None,
    content_type: bytes = b"application/json",
    limit_s: float = 10.0,
) -> dict:
    """Call an ASGI app as a slow client would: one body chunk every `every_s` seconds, then silence
    until the answer. Returns the status, headers, body and when the answer started."""
    headers = [(b"content-type", content_type)]
    if content_length is not None:
        headers.append((b"content-length", str(content_length).encode()))
    queue = list(chunks)
    answer = {"status": None, "headers": {}, "body": b"", "asked_for_body_after_end": False}
    t0 = time.perf_counter()

    async def receive():
        if not queue:
            answer["asked_for_body_after_end"] = True
            await asyncio.sleep(3600)  # no more data: the client waits for its answer
        await asyncio.sleep(every_s)
        chunk = queue.pop(0)
        return {"type": "http.request", "body": chunk, "more_body": bool(queue)}

    async def send(message):
        if message["type"] == "http.response.start":
            answer["status"], answer["at_s"] = message["status"], time.perf_counter() - t0
            answer["headers"] = {k.decode().lower(): v.decode() for k, v in message["headers"]}
        elif message["type"] == "http.response.body":
            answer["body"] += message.get("body", b"")

    await asyncio.wait_for(app(scope(method, path, headers), receive, send), limit_s)
    return answer


RECOMMEND = json.dumps({"user_id": 1, "trigger_song_id": 2, "k": 5, "candidates": 20}).encode()


# --- 1. slow bodies ------------------------------------------------------------------------------


def test_a_slow_body_gets_408_at_its_deadline_and_never_reaches_the_backend():
    """Issue 13.1: a /v1/recommend body sent at ~20 bytes/s (65 bytes: 3 s) is cut at the body
    deadline with a JSON 408; the route never runs."""
    backend = FakeBackend()
    app = create_api(backend, ApiSettings(body_timeout_s=0.3))
    one_byte_chunks = [RECOMMEND[i : i + 1] for i in range(len(RECOMMEND))]
    got = asyncio.run(drive(app, "POST", "/v1/recommend", one_byte_chunks, every_s=0.05, content_length=len(RECOMMEND)))
    assert got["status"] == 408 and got["at_s"] < 1.5, got
    assert json.loads(got["body"])["error"]["field"] == "body"
    assert got["headers"]["connection"] == "close"
    assert backend.calls == []
    # the same body at full speed is served
    fast = asyncio.run(drive(app, "POST", "/v1/recommend", [RECOMMEND], every_s=0.0, content_length=len(RECOMMEND)))
    assert fast["status"] == 200 and backend.calls == [("recommend", 1, 2, 5, 20)]


def test_the_proxy_gate_admits_a_request_only_once_its_body_is_in():
    """In Serve's proxy the same gate runs before the request is routed to the ingress, so a slow body
    holds a socket in the proxy, never one of the ingress's slots."""
    from serving.gate import BodyGate, BodyLimits

    admitted = []

    async def ingress(scope, receive, send):  # what Serve's proxy would route to a replica
        message = await receive()
        admitted.append((message["body"], message["more_body"]))
        await send({"type": "http.response.start", "status": 200, "headers": [(b"content-type", b"application/json")]})
        await send({"type": "http.response.body", "body": b"{}"})

    gate = BodyGate(ingress, BodyLimits(body_timeout_s=1.0))
    slow = asyncio.run(drive(gate, "POST", "/v1/recommend", [RECOMMEND[:10], RECOMMEND[10:]], every_s=0.2))
    assert slow["status"] == 200 and admitted == [(RECOMMEND, False)]  # in, within its deadline, as one message
    admitted.clear()
    too_slow = asyncio.run(drive(gate, "POST", "/v1/recommend", [b"{"] * 10, every_s=0.15))
    assert too_slow["status"] == 408 and admitted == []
    assert json.loads(too_slow["body"])["error"]["field"] == "body"


def test_the_proxy_callback_is_what_ray_serve_accepts():
    """RAY_SERVE_HTTP_PROXY_CALLBACK_IMPORT_PATH=serving.gate:proxy_middlewares: the callback
    returns Starlette middlewares (Ray validates exactly this) whose limits come from the environment."""
    from ray.serve._private.http_util import validate_http_proxy_callback_return

    from serving.gate import LIMITS_ENV, BodyGate, BodyLimits, proxy_middlewares

    os.environ[LIMITS_ENV] = BodyLimits(max_json_bytes=1234, max_upload_bytes=5678).to_env()
    try:
        (middleware,) = validate_http_proxy_callback_return(proxy_middlewares())
    finally:
        os.environ.pop(LIMITS_ENV)
    assert middleware.cls is BodyGate
    assert middleware.kwargs["limits"].max_json_bytes == 1234 and middleware.kwargs["limits"].max_upload_bytes == 5678
    assert middleware.kwargs["serve_errors_as_json"] is True


# --- 2. body size caps, before parsing ------------------------------------------------------------


def test_json_bodies_are_capped_before_parsing():
    """Issue 13.2: a 50 MB whitespace-padded /v1/recommend body was accepted (200 in 1 s), a
    33 MB candidate list parsed before its 422. Both are 413 now, without reading them through."""
    backend = FakeBackend()
    c = TestClient(create_api(backend, ApiSettings()), raise_server_exceptions=False)
    padded = RECOMMEND[:-1] + b" " * (50 * 1024 * 1024) + b"}"
    t0 = time.perf_counter()
    assert error_of(c.post("/v1/recommend", content=padded, headers={"content-type": "application/json"})) == (
        413,
        "body",
    )
    huge_list = b'{"user_id": 1, "trigger_song_id": 2, "candidates": [' + b"1, " * 700_000 + b"1]}"
    assert error_of(c.post("/v1/rank", content=huge_list, headers={"content-type": "application/json"})) == (
        413,
        "body",
    )

    def chunked():  # no Content-Length: counted as it arrives
        yield RECOMMEND[:-1]
        for _ in range(100):
            yield b" " * 1024
        yield b"}"

    assert error_of(c.post("/v1/recommend", content=chunked(), headers={"content-type": "application/json"})) == (
        413,
        "body",
    )
    assert time.perf_counter() - t0 < 5 and backend.calls == []
    # the largest legitimate body fits: max_candidates ids of 19 digits, loosely spaced
    biggest = {"user_id": 2**63 - 1, "trigger_song_id": 2**63 - 1, "candidates": [2**63 - 1] * 1000}
    r = c.post("/v1/rank", content=json.dumps(biggest, indent=2).encode(), headers={"content-type": "application/json"})
    assert r.status_code == 200 and backend.calls == [("rank", 2**63 - 1, 2**63 - 1, 1000)]


def test_a_declared_length_over_the_cap_is_413_without_reading_a_byte():
    app = create_api(FakeBackend(), ApiSettings())
    got = asyncio.run(drive(app, "POST", "/v1/recommend", [], every_s=0.0, content_length=10**9, limit_s=2))
    assert got["status"] == 413 and not got["asked_for_body_after_end"]
    assert json.loads(got["body"])["error"]["field"] == "body"
    # uploads keep their own, larger cap
    upload = create_api(FakeBackend(), ApiSettings(max_upload_bytes=1000))
    c = TestClient(upload, raise_server_exceptions=False)
    assert c.post("/v1/embed", content=b"x" * 1000, headers={"content-type": "audio/wav"}).status_code == 200
    assert error_of(c.post("/v1/embed", content=b"x" * 1001, headers={"content-type": "audio/wav"})) == (413, "body")


# --- 7. Serve's own errors, strict ids, /healthz, the key ---------------------------------------


def serve_answers(status: int, message: str, headers=None):
    """An ASGI app answering as Serve's proxy itself does (its own code builds the messages)."""
    from ray.serve._private.http_util import convert_object_to_asgi_messages

    async def app(scope, receive, send):
        for m in convert_object_to_asgi_messages(message, status_code=status, extra_headers=headers):
            await send(m)

    return app


def test_serve_own_errors_become_the_json_error_body():
    """Issue 13.7: Serve's backpressure 503s were text/plain without Retry-After."""
    from serving.gate import BodyGate, BodyLimits

    def through_gate(app):
        return TestClient(BodyGate(app, BodyLimits(), serve_errors_as_json=True), raise_server_exceptions=False)

    r = through_gate(
        serve_answers(503, "Request dropped due to backpressure (num_queued_requests=32, max_queued_requests=32).")
    ).get("/v1/songs/1/similar")
    assert (
        error_of(r) == (503, None)
        and r.headers["retry-after"] == "1"
        and "backpressure" in r.json()["error"]["message"]
    )
    r = through_gate(serve_answers(503, "dropped", [(b"retry-after", b"7")])).get("/healthz")
    assert error_of(r) == (503, None) and r.headers["retry-after"] == "7"
    r = through_gate(serve_answers(408, "Request abc timed out after 10.0s.")).get("/v1/songs/1/similar")
    assert error_of(r) == (408, None) and "timed out" in r.json()["error"]["message"]

    async def silent(scope, receive, send):  # Serve's proxy answers nothing on an unexpected error
        return None

    assert error_of(through_gate(silent).get("/v1/songs/1/similar")) == (500, None)
    # our own JSON answers and successes pass through untouched
    ok = through_gate(create_api(FakeBackend(), ApiSettings()))
    assert ok.get("/v1/songs/1/similar").status_code == 200
    assert error_of(ok.get("/v1/songs/1/similar?k=0")) == (422, "k")


def test_the_ingress_sheds_with_retry_after_when_no_proxy_gate_rewrites_it():
    from serving.app import Ingress

    assert Ingress.backpressure_config.retry_after_s == 1
    # A crowd of 200 /healthz probes must find room (tests/test_serving.py sends it), yet an
    # overload must be shed at the door: at 1024/256 a 1000/s burst on /recommend flooded the one
    # ingress's event loop (580 x 408, slowest answer 23 s against 10.8 s at 32/32)
    assert Ingress.max_ongoing_requests + Ingress.max_queued_requests >= 256
    assert Ingress.max_ongoing_requests <= 128


@pytest.mark.parametrize("raw", ["1_0", "+1", "1.0", "-1", " 1", "1 ", "0x1", "١", "1e3", "9" * 5000, "9" * 20])
def test_path_ids_are_digits_only(raw):
    """Issue 13.7: `1_0` was song 10, `+1` and `1.0` song 1; a 5000-digit id must not reach int()."""
    from urllib.parse import quote

    backend = FakeBackend()
    c = TestClient(create_api(backend, ApiSettings()), raise_server_exceptions=False)
    for path in (f"/v1/songs/{quote(raw)}/similar", f"/v1/songs/{quote(raw)}/embedding"):
        assert error_of(c.get(path)) == (422, "song_id"), path
    assert error_of(c.get("/v1/songs/1/similar", params={"k": raw})) == (422, "k")
    assert backend.calls == []


def test_strict_ids_still_accept_every_int64_id():
    backend = FakeBackend()
    c = TestClient(create_api(backend, ApiSettings()), raise_server_exceptions=False)
    assert c.get(f"/v1/songs/{2**63 - 1}/similar", params={"k": "7"}).status_code == 200
    assert c.get("/v1/songs/007/embedding").status_code == 200
    assert backend.calls == [("similar", 2**63 - 1, 7), ("embedding", 7)]
    assert error_of(c.get(f"/v1/songs/{2**63}/embedding")) == (422, "song_id")


class FakeHandle:
    """A deployment handle whose `ping` counts its calls (and can be overloaded)."""

    def __init__(self, name, overloaded=False):
        self.name, self.overloaded, self.pings = name, overloaded, 0
        self.ping = self

    def remote(self, *args):
        self.pings += 1
        handle = self

        class Response:
            def __await__(self):
                return self._answer().__await__()

            async def _answer(self):
                from ray.serve.exceptions import BackPressureError

                await asyncio.sleep(0.05)
                if handle.overloaded:
                    raise BackPressureError(num_queued_requests=8, max_queued_requests=8)
                return {"model_version": "v1", "name": handle.name}

            def cancel(self):
                pass

        return Response()


def test_a_crowd_of_health_probes_costs_one_round_of_pings():
    """Issue 13.7: under 200 simultaneous /healthz, 91 got 503 (each probe pinged every deployment).
    Concurrent probes share one round of pings; a deployment shedding load is busy, not down."""
    from serving.app import ServeBackend

    async def crowd():
        handles = [FakeHandle(n) for n in ("lookup", "matcher", "ranker")] + [FakeHandle("encoder", overloaded=True)]
        backend = ServeBackend(*handles, timeout_s=2.0, model_version="v1")
        answers = await asyncio.gather(*(backend.health() for _ in range(200)))
        return handles, answers

    handles, answers = asyncio.run(crowd())
    assert [h.pings for h in handles] == [1, 1, 1, 1]
    assert all(a == answers[0] for a in answers)
    assert answers[0]["status"] == "ok" and answers[0]["model_version"] == "v1"
    assert answers[0]["deployments"]["encoder"] == {"busy": True}


def test_the_api_key_stays_out_of_the_ray_processes_serve_starts(monkeypatch):
    """Issue 13.7: HTCL_API_KEY sat in the environment of every Ray process (gcs, raylet, dashboard,
    each replica). `htcl serve` hands the ingress the key's SHA-256 and starts Ray without the key;
    the driver (the user's own process) keeps it for its own client."""
    from ray import serve

    import ray_jobs.common
    import serving.app
    from serving import run
    from serving.gate import PROXY_CALLBACK, PROXY_CALLBACK_ENV

    seen = {}
    monkeypatch.setattr(os, "environ", dict(os.environ))  # what start() sets stays in this test

    def fake_init_ray(num_cpus=None, quiet=False):
        seen["key_while_ray_starts"] = os.environ.get("HTCL_API_KEY")
        seen["proxy_callback"] = os.environ.get(PROXY_CALLBACK_ENV)
        return True

    monkeypatch.setenv("HTCL_API_KEY", "s3cret")
    monkeypatch.delenv(PROXY_CALLBACK_ENV, raising=False)
    monkeypatch.setattr(ray_jobs.common, "init_ray", fake_init_ray)
    monkeypatch.setattr(serve, "start", lambda **kw: None)
    monkeypatch.setattr(serve, "run", lambda *a, **kw: None)
    monkeypatch.setattr(serving.app, "build_app", lambda args: seen.setdefault("args", args))
    monkeypatch.setattr(run, "http", lambda *a, **kw: (200, {"status": "ok"}))
    run.start({"config": "configs/demo.yaml"}, port=1)
    assert seen["key_while_ray_starts"] is None
    assert seen["args"]["api_key_sha256"] == key_digest("s3cret") and "s3cret" not in json.dumps(seen["args"])
    assert seen["proxy_callback"] == PROXY_CALLBACK
    assert os.environ["HTCL_API_KEY"] == "s3cret"


def test_the_ingress_gets_the_key_digest_never_a_raw_key(monkeypatch):
    """The `api_key_sha256` arg (what `htcl serve` passes, what serving/config.yaml may hold) wins
    over the environment; a value that is not a SHA-256 (the key itself, pasted there) is refused."""
    from serving.app import api_key_sha256

    monkeypatch.setenv("HTCL_API_KEY", "env-key")
    assert api_key_sha256({}) == key_digest("env-key")
    assert api_key_sha256({"api_key_sha256": key_digest("other")}) == key_digest("other")
    with pytest.raises(ValueError, match="SHA-256"):
        api_key_sha256({"api_key_sha256": "the-key-itself"})
    monkeypatch.delenv("HTCL_API_KEY")
    assert api_key_sha256({"api_key_sha256": None}) is None
