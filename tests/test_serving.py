"""Serving: the HTTP API's validation, auth and error bodies (FastAPI TestClient, a fake backend,
no Ray), then the real Ray Serve app over HTTP on 127.0.0.1: a synthetic world (real Feast SQLite
store, HNSW index, XGBoost rankers, a tiny HTCL checkpoint for the cold-start encoder), the
dashboard of the Ray instance serving starts refusing unauthenticated calls, every endpoint,
bad input answered 4xx with the field named, and a rollout to another model version while a
client keeps sending requests, none of which may fail."""

from __future__ import annotations

import io
import json
import threading
import time
from pathlib import Path

import numpy as np
import pytest
from fastapi.testclient import TestClient

from serving.api import ApiError, ApiSettings, create_api, key_digest

# --- the API alone ------------------------------------------------------------------------------


class FakeBackend:
    def __init__(self):
        self.calls = []

    async def embedding(self, song_id):
        if song_id != 1:
            raise ApiError(404, "song_id", "unknown song")
        return {"song_id": 1, "model_version": "v", "embedding": [0.0, 1.0]}

    async def similar(self, song_id, k):
        self.calls.append(("similar", song_id, k))
        return {"song_id": song_id, "k": k, "similar": []}

    async def rank(self, user_id, trigger_song_id, candidates):
        self.calls.append(("rank", user_id, trigger_song_id, candidates))
        return {"results": []}

    async def recommend(self, user_id, trigger_song_id, k, candidates):
        self.calls.append(("recommend", user_id, trigger_song_id, k, candidates))
        return {"recommendations": []}

    async def embed_audio(self, data, k):
        self.calls.append(("embed", len(data), k))
        return {"embedding": []}

    async def health(self):
        return {"status": "ok"}


@pytest.fixture
def client():
    backend = FakeBackend()
    app = create_api(backend, ApiSettings(max_k=500, max_candidates=300, max_upload_bytes=1000))
    return TestClient(app, raise_server_exceptions=False), backend


def field_of(r):
    body = r.json()
    assert set(body) == {"error"} and set(body["error"]) == {"field", "message"}, body
    return body["error"]["field"]


def test_validation_names_the_field(client):
    c, backend = client
    assert c.get("/v1/songs/1/similar", params={"k": 20}).status_code == 200 and backend.calls[-1] == ("similar", 1, 20)
    cases = [
        (c.get("/v1/songs/1/similar", params={"k": 0}), 422, "k"),
        (c.get("/v1/songs/1/similar", params={"k": 501}), 422, "k"),
        (c.get("/v1/songs/1/similar", params={"k": "ten"}), 422, "k"),
        (c.get("/v1/songs/abc/similar"), 422, "song_id"),
        (c.get(f"/v1/songs/{2**70}/embedding"), 422, "song_id"),
        (c.get("/v1/songs/7/embedding"), 404, "song_id"),
        (c.post("/v1/rank", content=b"{not json", headers={"content-type": "application/json"}), 400, "body"),
        (c.post("/v1/rank", json={"user_id": 1, "trigger_song_id": 2, "candidates": []}), 422, "candidates"),
        (
            c.post("/v1/rank", json={"user_id": 1, "trigger_song_id": 2, "candidates": list(range(301))}),
            422,
            "candidates",
        ),
        (c.post("/v1/rank", json={"user_id": 1, "trigger_song_id": 2, "candidates": [1, "x"]}), 422, "candidates[1]"),
        (c.post("/v1/rank", json={"user_id": 1, "candidates": [1]}), 422, "trigger_song_id"),
        (c.post("/v1/rank", json={"user_id": "1", "trigger_song_id": 2, "candidates": [1]}), 422, "user_id"),
        (c.post("/v1/rank", json={"user_id": 1, "trigger_song_id": 2, "candidates": [1], "extra": 1}), 422, "extra"),
        (c.post("/v1/rank"), 422, "body"),
        (c.post("/v1/recommend", json={"user_id": 1, "trigger_song_id": 2, "k": 0}), 422, "k"),
        (
            c.post("/v1/recommend", json={"user_id": 1, "trigger_song_id": 2, "k": 50, "candidates": 20}),
            422,
            "candidates",
        ),
        (c.post("/v1/recommend", json=[1, 2]), 422, "body"),
        (c.get("/v1/nothing/here"), 404, "path"),
    ]
    for r, status, name in cases:
        assert (r.status_code, field_of(r)) == (status, name), (r.request.url, r.text)
    assert c.post("/v1/recommend", json={"user_id": 1, "trigger_song_id": 2}).status_code == 200
    assert backend.calls[-1] == ("recommend", 1, 2, 10, 100)


def test_upload_limits_and_types(client):
    c, backend = client
    ok = c.post("/v1/embed", content=b"x" * 1000, headers={"content-type": "audio/flac"})
    assert ok.status_code == 200 and backend.calls[-1] == ("embed", 1000, 10)
    r = c.post("/v1/embed", content=b"x" * 1001, headers={"content-type": "audio/flac"})
    assert (r.status_code, field_of(r)) == (413, "body")

    def chunks():  # no Content-Length: counted while streaming
        for _ in range(5):
            yield b"x" * 300

    r = c.post("/v1/embed", content=chunks(), headers={"content-type": "application/octet-stream"})
    assert (r.status_code, field_of(r)) == (413, "body")
    r = c.post("/v1/embed", content=b"", headers={"content-type": "audio/wav"})
    assert (r.status_code, field_of(r)) == (422, "body")
    r = c.post("/v1/embed", json={"audio": "..."})
    assert (r.status_code, field_of(r)) == (415, "content-type")


def test_bearer_key():
    app = create_api(FakeBackend(), ApiSettings(api_key_sha256=key_digest("s3cret")))
    c = TestClient(app, raise_server_exceptions=False)
    for headers in (
        {},
        {"Authorization": "Bearer wrong"},
        {"Authorization": "Basic s3cret"},
        {"Authorization": "Bearer "},
    ):
        r = c.get("/v1/songs/1/embedding", headers=headers)
        assert (r.status_code, field_of(r)) == (401, "authorization") and r.headers["www-authenticate"] == "Bearer"
    assert c.get("/v1/songs/1/embedding", headers={"Authorization": "Bearer s3cret"}).status_code == 200
    assert c.get("/healthz").status_code == 200  # probes stay open


def test_a_bug_is_a_json_500_without_internals():
    class Broken(FakeBackend):
        async def similar(self, song_id, k):
            raise KeyError("secret detail")

    c = TestClient(create_api(Broken(), ApiSettings()), raise_server_exceptions=False)
    r = c.get("/v1/songs/1/similar")
    assert r.status_code == 500 and "secret" not in r.text and field_of(r) is None


# --- the real app over HTTP ------------------------------------------------------------------------

SONGS = 60
KEY = "test-key-not-a-secret"


def flac_bytes(seconds=3.0, freq=330.0, sr=16000) -> bytes:
    import soundfile as sf

    t = np.arange(int(seconds * sr)) / sr
    buf = io.BytesIO()
    sf.write(buf, (0.3 * np.sin(2 * np.pi * freq * t)).astype(np.float32), sr, format="FLAC")
    return buf.getvalue()


@pytest.fixture(scope="module")
def served(tmp_path_factory, tiny_config):
    """The synthetic world (v1 = a tiny real checkpoint's embeddings, v2 = other vectors), served."""
    import os

    import torch
    from conftest import TINY_MODEL

    from htcl.model import HTCLModel
    from htcl.pipeline import embed_mels, model_version
    from htcl.training import TrainState, save_checkpoint
    from serving import run
    from serving.synthetic import unit_vectors, write_world

    t0 = time.perf_counter()
    out = tmp_path_factory.mktemp("serving") / "out"
    torch.manual_seed(0)
    model = HTCLModel(tiny_config.model, tiny_config.audio)
    ckpt = save_checkpoint(
        out / "finetune" / "model.pt",
        TrainState(model, torch.optim.SGD(model.parameters(), lr=0.1), 1),
        tiny_config,
        "finetune",
    )
    v1 = model_version(ckpt)
    rng = np.random.default_rng(0)
    mels = [rng.normal(-6, 3, (128, 40)).astype(np.float32) for _ in range(SONGS)]
    world = write_world(
        out,
        {v1: embed_mels(model, mels), "v2": unit_vectors(SONGS, tiny_config.model.embed_dim, 2)},
        current=v1,
        users=8,
        n_estimators=10,
    )
    built = time.perf_counter() - t0
    os.environ["HTCL_API_KEY"] = KEY
    args = {
        "config": "configs/demo.yaml",
        "overrides": [*TINY_MODEL, f"output_dir={out}", f"data.root={world['world']}"],
        "max_upload_mb": 0.25,
    }
    info = run.start(args, port=run.free_port(), num_cpus=2)
    print(f"\nserving test: world {built:.1f} s, Serve up {time.perf_counter() - t0 - built:.1f} s")
    yield {**world, **info, "v1": v1, "args": args, "ckpt": ckpt}
    t1 = time.perf_counter()
    run.stop(info["started_ray"])
    os.environ.pop("HTCL_API_KEY", None)
    print(f"serving test: teardown {time.perf_counter() - t1:.1f} s")


def get(served, path, **kw):
    from serving.run import http

    return http("GET", served["url"] + path, **kw)


def post(served, path, body, **kw):
    from serving.run import http

    return http("POST", served["url"] + path, body, **kw)


@pytest.mark.slow
def test_ray_dashboard_of_the_serving_instance_wants_the_token(served):
    import requests

    if not served["started_ray"] or not served["dashboard"]:
        pytest.skip("Ray was already running in this process: not the instance serving starts")
    r = requests.get(f"{served['dashboard']}/api/jobs/", timeout=10)
    assert r.status_code == 401
    # and Serve's HTTP proxy listens on the loopback only
    assert served["url"].startswith("http://127.0.0.1:")


@pytest.mark.slow
def test_endpoints(served):
    import pyarrow.parquet as pq

    status, health = get(served, "/healthz")
    assert status == 200 and health["model_version"] == served["v1"] and "encoder" in health["deployments"]

    status, emb = get(served, "/v1/songs/5/embedding")
    stored = pq.read_table(served["out"] / "embeddings" / served["v1"]).to_pandas().set_index("song_id")
    assert status == 200 and emb["model_version"] == served["v1"]
    np.testing.assert_allclose(emb["embedding"], stored.loc[5, "embedding"], rtol=1e-6)

    status, sim = get(served, "/v1/songs/5/similar?k=7")
    assert status == 200 and len(sim["similar"]) == 7 and 5 not in [s["song_id"] for s in sim["similar"]]
    scores = [s["score"] for s in sim["similar"]]
    assert scores == sorted(scores, reverse=True)
    x = np.stack(stored["embedding"].to_numpy())
    exact = np.argsort(-(x @ x[4]))[1:8] + 1  # HNSW over 60 songs is exact
    assert [s["song_id"] for s in sim["similar"]] == exact.tolist()

    status, ranked = post(served, "/v1/rank", {"user_id": 3, "trigger_song_id": 5, "candidates": [1, 2, 3, 4]})
    assert status == 200 and sorted(r["song_id"] for r in ranked["results"]) == [1, 2, 3, 4]
    for r in ranked["results"]:
        assert 0 <= r["ctr"] <= 1 and 0 <= r["cvr"] <= 1 and r["score"] == pytest.approx(r["ctr"] * r["cvr"])
    # a listener with no history is no error (missing stats go to XGBoost's missing branch)
    assert post(served, "/v1/rank", {"user_id": 999, "trigger_song_id": 5, "candidates": [1]})[0] == 200

    status, rec = post(served, "/v1/recommend", {"user_id": 3, "trigger_song_id": 5, "k": 5, "candidates": 30})
    assert status == 200 and len(rec["recommendations"]) == 5 and rec["candidates"] == 30
    assert rec["model_version"] == rec["matching_model_version"] == served["v1"]
    recs = [r["score"] for r in rec["recommendations"]]
    assert recs == sorted(recs, reverse=True)

    # cold start: an uploaded FLAC -> the checkpoint's embedding (unit norm) and its nearest songs
    status, cold = post(served, "/v1/embed?k=3", flac_bytes(), headers={"Content-Type": "audio/flac"})
    assert status == 200 and cold["model_version"] == served["v1"] and len(cold["similar"]) == 3
    assert np.linalg.norm(cold["embedding"]) == pytest.approx(1.0, abs=1e-4)


@pytest.mark.slow
def test_bad_input_is_4xx_naming_the_field(served):
    def err(status_body):
        status, body = status_body
        return status, body["error"]["field"]

    assert err(get(served, "/v1/songs/100000/embedding")) == (404, "song_id")
    assert err(get(served, "/v1/songs/100000/similar")) == (404, "song_id")
    assert err(get(served, "/v1/songs/1/similar?k=0")) == (422, "k")
    assert err(post(served, "/v1/rank", b"{oops", headers={"Content-Type": "application/json"})) == (400, "body")
    assert err(post(served, "/v1/rank", {"user_id": 1, "trigger_song_id": 5, "candidates": []})) == (422, "candidates")
    assert err(post(served, "/v1/rank", {"user_id": 1, "trigger_song_id": 5, "candidates": [1, 4242]})) == (
        404,
        "candidates",
    )
    assert err(post(served, "/v1/rank", {"user_id": 1, "trigger_song_id": 4242, "candidates": [1]})) == (
        404,
        "trigger_song_id",
    )
    assert err(post(served, "/v1/recommend", {"user_id": 1, "trigger_song_id": 4242})) == (404, "trigger_song_id")
    assert err(post(served, "/v1/recommend", {"user_id": 1, "trigger_song_id": 5, "k": 10**6})) == (422, "k")
    assert err(post(served, "/v1/embed", b"this is not audio" * 100, headers={"Content-Type": "audio/wav"})) == (
        415,
        "body",
    )
    assert err(post(served, "/v1/embed", b"\0" * 300_000, headers={"Content-Type": "audio/wav"})) == (413, "body")
    # auth: no key, a wrong key -> 401 with the JSON body; /healthz stays open
    assert err(get(served, "/v1/songs/1/embedding", headers={"Authorization": ""})) == (401, "authorization")
    assert err(get(served, "/v1/songs/1/embedding", headers={"Authorization": "Bearer nope"})) == (401, "authorization")
    assert get(served, "/healthz", headers={"Authorization": ""})[0] == 200


def _ray_processes_of_this_instance() -> dict[int, str]:
    """pid -> name of every process of the Ray instance this test process started: gcs, raylet,
    dashboard, ... and their children (the workers: Serve's controller, proxy and every replica)."""
    import ray

    own = {p.pid: name for name, p in ray._private.worker._global_node.live_processes()}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[1]) in own:  # ppid
            own[int(stat.parent.name)] = "worker"
    return own


@pytest.mark.slow
def test_the_api_key_is_in_no_ray_process(served):
    """Issue 13.7: the key sat in the environment of gcs, raylet, dashboard and every replica."""
    if not served["started_ray"]:
        pytest.skip("Ray was already running in this process: not the instance serving starts")
    processes = _ray_processes_of_this_instance()
    assert len(processes) > 5, processes  # gcs, raylet, ..., and the replicas
    holding = [
        name
        for pid, name in processes.items()
        if f"HTCL_API_KEY={KEY}".encode() in Path(f"/proc/{pid}/environ").read_bytes()
    ]
    assert not holding, f"the API key is in the environment of {holding}"
    assert (
        post(served, "/v1/recommend", {"user_id": 1, "trigger_song_id": 5}, headers={"Authorization": "Bearer nope"})[0]
        == 401
    )


@pytest.mark.slow
def test_slow_bodies_hold_no_slot_and_healthz_answers(served):
    """Issue 13.1: 64 clients sending a small /v1/recommend body at a crawl filled the ingress's
    slots and every other request got 503 for ~10 s. Now the proxy holds them until their body is in
    (it never is) and cuts them at the body deadline with the JSON 408; everything else is served."""
    import socket

    host, port = served["url"].removeprefix("http://").split(":")
    body = json.dumps({"user_id": 1, "trigger_song_id": 5, "k": 5, "candidates": 20}).encode()
    head = (
        f"POST /v1/recommend HTTP/1.1\r\nHost: {host}\r\nAuthorization: Bearer {KEY}\r\n"
        f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n\r\n"
    ).encode()
    slow = []
    try:
        for _ in range(80):
            s = socket.create_connection((host, int(port)), timeout=20)
            s.sendall(head + body[:1])
            slow.append(s)
        time.sleep(1.0)  # long enough for the proxy to route them, if it would
        t0 = time.perf_counter()
        assert get(served, "/healthz", timeout=10)[0] == 200
        assert get(served, "/v1/songs/5/similar?k=3", timeout=10)[0] == 200
        assert post(served, "/v1/recommend", json.loads(body), timeout=10)[0] == 200
        print(
            f"\n80 slow bodies open: /healthz, /similar and /recommend answered 200 in {time.perf_counter() - t0:.2f} s"
        )
        answer = b""
        while chunk := slow[0].recv(4096):  # the body deadline (5 s) passes; the answer closes the connection
            answer += chunk
        status_line, _, rest = answer.partition(b"\r\n")
        assert status_line.startswith(b"HTTP/1.1 408"), answer
        headers, _, payload = rest.partition(b"\r\n\r\n")
        assert json.loads(payload)["error"]["field"] == "body"
        # answered by the gate in the proxy, in front of Serve's request-id middleware (an answer
        # from the ingress passes through it and carries X-Request-ID)
        assert b"x-request-id" not in headers.lower(), headers
        print(f"a slow client answered {status_line.decode()} after {time.perf_counter() - t0:.1f} s")
    finally:
        for s in slow:
            s.close()


@pytest.mark.slow
def test_200_simultaneous_health_probes_all_answer(served):
    """Issue 13.7: under 200 simultaneous /healthz, 91 got 503."""
    from collections import Counter
    from concurrent.futures import ThreadPoolExecutor

    start = threading.Barrier(200)

    def probe(_):
        start.wait()
        return get(served, "/healthz", timeout=30)[0]

    t0 = time.perf_counter()
    with ThreadPoolExecutor(200) as pool:
        statuses = Counter(pool.map(probe, range(200)))
    print(f"\n200 simultaneous /healthz: {dict(statuses)} in {time.perf_counter() - t0:.2f} s")
    assert statuses == {200: 200}


@pytest.mark.slow
def test_rollout_to_a_new_model_version_fails_no_request(served):
    """Deploy v2 (serve.run again, as `htcl serve --model-version v2` / `serve deploy` do) while a
    client sends /similar and /recommend back to back: every answer is a 200, first v1, then v2."""
    from ray import serve

    from serving.app import APP_NAME, build_app

    seen, failures, stop = [], [], threading.Event()

    def client():
        i = 0
        while not stop.is_set():
            i += 1
            if i % 2:
                status, body = get(served, f"/v1/songs/{1 + i % SONGS}/similar?k=10", timeout=30)
            else:
                status, body = post(
                    served,
                    "/v1/recommend",
                    {"user_id": 2, "trigger_song_id": 1 + i % SONGS, "k": 5, "candidates": 20},
                    timeout=30,
                )
            (seen if status == 200 else failures).append(body.get("model_version") if status == 200 else (status, body))

    thread = threading.Thread(target=client, daemon=True)
    thread.start()
    time.sleep(1.0)
    t0 = time.perf_counter()
    serve.run(build_app({**served["args"], "model_version": "v2"}), name=APP_NAME, route_prefix="/", blocking=False)
    deadline = time.time() + 60
    while time.time() < deadline and (not seen or seen[-1] != "v2"):
        time.sleep(0.2)
    rollout_s = time.perf_counter() - t0
    time.sleep(1.0)
    stop.set()
    thread.join(timeout=35)
    print(
        f"\nrollout v1 -> v2: {len(seen)} requests answered, {len(failures)} failed, "
        f"{rollout_s:.1f} s until v2 answered"
    )
    assert not failures, failures[:3]
    assert seen[0] == served["v1"] and seen[-1] == "v2"
    # v2 has no checkpoint of its own: the cold-start encoder is off (501), the rest serves v2
    status, body = post(served, "/v1/embed", flac_bytes(), headers={"Content-Type": "audio/flac"})
    assert status == 501 and body["error"]["message"]
    assert get(served, "/healthz")[1]["model_version"] == "v2"


def test_serve_config_yaml_names_the_builder():
    """serving/config.yaml is a valid Serve config whose import path is build_app."""
    import yaml
    from conftest import REPO
    from ray.serve.schema import ServeDeploySchema

    raw = yaml.safe_load((REPO / "serving" / "config.yaml").read_text())
    schema = (
        ServeDeploySchema.model_validate(raw)
        if hasattr(ServeDeploySchema, "model_validate")
        else ServeDeploySchema.parse_obj(raw)
    )
    app = schema.applications[0]
    assert app.import_path == "serving.app:build_app" and schema.http_options.host == "127.0.0.1"
    assert json.dumps(app.args)  # plain data


def test_htcl_serve_is_dispatched_to_serving_run(capsys):
    from htcl.cli import main

    with pytest.raises(SystemExit) as e:
        main(["serve", "--help"])
    assert e.value.code == 0 and "--model-version" in capsys.readouterr().out
