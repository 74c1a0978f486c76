"""The Serve app under open-loop load over loopback, Feast's own feature server as the reference,
a replica killed under load, a model-version rollout under load, and an overload burst.

World: serving.synthetic.write_world, 100k songs x 128 floats by default, versions v1 (current)
and v2; Feast SQLite online store (or --online-store redis://127.0.0.1:6379/14, flushed), HNSW
index, XGBoost rankers. Reused from --world when it holds the same sizes.

Load: requests at fixed rates (open loop: each request leaves at its scheduled time whatever the
earlier ones do; latency is counted from the scheduled time, so a stalled server cannot hide
queueing), one aiohttp client process on the same machine, for each endpoint:
    embedding   GET /v1/songs/{id}/embedding           (Feast online, batched lookups)
    feast       POST /get-online-features on `feast serve` (the same lookup, Feast's own server)
    similar     GET /v1/songs/{id}/similar?k=100
    recommend   POST /v1/recommend, 100 candidates matched then ranked, k=10
    rank        POST /v1/rank, 100 random candidates
Goals: similar p99 < 50 ms at 100/s; recommend p99 < 100 ms at 50/s; embedding p99 <= feast p99.

    python benchmarks/bench_serve.py [--songs 100000] [--rates 50,100,200] [--seconds 10]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from serving import run  # noqa: E402

ENDPOINTS = ("embedding", "feast", "similar", "recommend", "rank")


# --- the world ---------------------------------------------------------------------------------


def world(path: Path, songs: int, dim: int, online_store: str) -> dict:
    from serving.synthetic import unit_vectors, write_world

    meta = path / "bench_world.json"
    if meta.is_file():
        info = json.loads(meta.read_text())
        if info["songs"] == songs and info["dim"] == dim and info.get("online_store", "") == online_store:
            print(f"world: reusing {path} ({songs} songs, built in {info['seconds']} s)")
            return {**info, "out": Path(info["out"]), "world": Path(info["world"])}
    shutil.rmtree(path, ignore_errors=True)
    if online_store:
        flush_redis(online_store)
    print(f"world: building {songs} songs x {dim} floats in {path} ...", flush=True)
    v1 = unit_vectors(songs, dim, 1)
    v2 = v1 + 0.3 * unit_vectors(songs, dim, 2)  # a retrained model: close to v1, not equal
    v2 /= np.linalg.norm(v2, axis=1, keepdims=True)
    info = write_world(
        path,
        {"v1": v1, "v2": v2},
        current="v1",
        users=5000,
        impressions=songs,
        online_store=online_store,
        ranker_rows=5000,
        n_estimators=100,
    )
    info = {**info, "out": str(info["out"]), "world": str(info["world"]), "online_store": online_store}
    meta.write_text(json.dumps(info, indent=2))
    print(f"world: built in {info['seconds']} s", flush=True)
    return {**info, "out": Path(info["out"]), "world": Path(info["world"])}


def flush_redis(url: str) -> None:
    from urllib.parse import urlparse

    import redis

    p = urlparse(url)
    redis.Redis(host=p.hostname, port=p.port or 6379, db=int(p.path.strip("/") or 0)).flushdb()


def start_feast_server(out: Path, online_store: str, port: int) -> tuple[subprocess.Popen, Path]:
    """`feast serve` over the same registry and online store the app reads."""
    import yaml

    from feature_repo.store import repo_config
    from htcl.layout import Layout

    cfg = repo_config(Layout(out).feast, online_store)
    repo = Path(tempfile.mkdtemp(prefix="htcl_feast_serve_"))
    raw = yaml.safe_load((REPO / "feature_repo" / "feature_store.yaml").read_text())
    raw["registry"] = cfg.registry.path if hasattr(cfg.registry, "path") else cfg.registry
    if online_store:
        from feature_repo.store import redis_online_store

        raw["online_store"] = redis_online_store(online_store)
    else:
        raw["online_store"] = {"type": "sqlite", "path": cfg.online_store.path}
    (repo / "feature_store.yaml").write_text(yaml.safe_dump(raw))
    log = (repo / "feast_serve.log").open("w")
    feast = Path(sys.executable).with_name("feast")  # the feast CLI of this Python's environment
    proc = subprocess.Popen(
        [str(feast), "-c", str(repo), "serve", "-h", "127.0.0.1", "-p", str(port), "--no-access-log", "-w", "1"],
        stdout=log,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    deadline = time.time() + 60
    body = {"features": ["song_embedding:embedding"], "entities": {"song_id": [1], "model_version": ["v1"]}}
    while time.time() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(
                f"feast serve exited {proc.returncode}: {(repo / 'feast_serve.log').read_text()[-2000:]}"
            )
        try:
            status, got = run.http("POST", f"http://127.0.0.1:{port}/get-online-features", body, timeout=5)
            if status == 200:
                return proc, repo
        except OSError:
            pass
        time.sleep(0.5)
    raise TimeoutError("feast serve did not answer within 60 s")


# --- load --------------------------------------------------------------------------------------


def summarize(latencies_ms: list[float], statuses: list, rate: float, seconds: float) -> dict:
    lat = np.asarray(latencies_ms)
    ok = np.asarray([s == 200 for s in statuses])
    codes: dict[str, int] = {}
    for s in statuses:
        if s != 200:
            codes[str(s)] = codes.get(str(s), 0) + 1
    q = (lambda p: round(float(np.percentile(lat, p)), 2)) if len(lat) else (lambda p: None)
    return {
        "rate": rate,
        "seconds": seconds,
        "requests": len(statuses),
        "ok": int(ok.sum()),
        "errors": int((~ok).sum()),
        "error_codes": codes,
        "p50_ms": q(50),
        "p95_ms": q(95),
        "p99_ms": q(99),
        "max_ms": round(float(lat.max()), 2) if len(lat) else None,
    }


async def open_loop(make, rate: float, seconds: float, retry_for_s: float = 0.0, on_result=None) -> dict:
    """make(i) -> (method, url, json body or None). Requests leave at t0 + i/rate. With
    retry_for_s, a failed attempt (non-200 or no connection) is retried with backoff until that
    many seconds after the request's scheduled time: a request is lost only when none succeeded."""
    import aiohttp

    n = int(rate * seconds)
    timeout = aiohttp.ClientTimeout(total=30)
    key = os.environ.get("HTCL_API_KEY")
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    async with aiohttp.ClientSession(
        timeout=timeout, headers=headers, connector=aiohttp.TCPConnector(limit=1000)
    ) as session:
        loop = asyncio.get_running_loop()
        t0 = loop.time() + 0.1
        attempts_failed = []

        async def one(i):
            at = t0 + i / rate
            await asyncio.sleep(max(0.0, at - loop.time()))
            method, url, body = make(i)
            status, attempt = None, 0
            while True:
                try:
                    async with session.request(method, url, json=body) as r:
                        payload = await r.read()
                        status = r.status
                except Exception as e:  # connection refused/reset, timeout: a failed attempt
                    status, payload = type(e).__name__, b""
                if status == 200:
                    break
                attempts_failed.append((loop.time() - t0, status))
                if loop.time() - at > retry_for_s:
                    break
                await asyncio.sleep(min(0.1 * 2**attempt, 1.0))
                attempt += 1
            if on_result is not None and status == 200:
                on_result(loop.time() - t0, payload)
            return (loop.time() - at) * 1000, status

        results = await asyncio.gather(*(one(i) for i in range(n)))
    out = summarize([r[0] for r in results], [r[1] for r in results], rate, seconds)
    out["failed_attempts"] = len(attempts_failed)
    if attempts_failed:
        out["failed_attempts_window_s"] = [round(attempts_failed[0][0], 2), round(attempts_failed[-1][0], 2)]
    return out


def request_makers(url: str, feast_url: str, songs: int, users: int, rng: np.random.Generator) -> dict:
    ids = rng.integers(1, songs + 1, 1_000_000)
    cands = rng.integers(1, songs + 1, (2000, 100))
    return {
        "embedding": lambda i: ("GET", f"{url}/v1/songs/{ids[i]}/embedding", None),
        "feast": lambda i: (
            "POST",
            f"{feast_url}/get-online-features",
            {"features": ["song_embedding:embedding"], "entities": {"song_id": [int(ids[i])], "model_version": ["v1"]}},
        ),
        "similar": lambda i: ("GET", f"{url}/v1/songs/{ids[i]}/similar?k=100", None),
        "recommend": lambda i: (
            "POST",
            f"{url}/v1/recommend",
            {"user_id": int(1 + i % users), "trigger_song_id": int(ids[i]), "k": 10, "candidates": 100},
        ),
        "rank": lambda i: (
            "POST",
            f"{url}/v1/rank",
            {
                "user_id": int(1 + i % users),
                "trigger_song_id": int(ids[i]),
                "candidates": cands[i % len(cands)].tolist(),
            },
        ),
    }


# --- scenarios -----------------------------------------------------------------------------------


def settle(url: str, seconds: float = 60.0) -> None:
    """Wait until the app answers /healthz within 100 ms again (a backlog has drained)."""
    deadline = time.time() + seconds
    while time.time() < deadline:
        t = time.perf_counter()
        try:
            if run.http("GET", f"{url}/healthz", timeout=10)[0] == 200 and time.perf_counter() - t < 0.1:
                time.sleep(1.0)
                return
        except OSError:
            pass
        time.sleep(0.5)


def replica_actors(deployment: str) -> list[str]:
    import ray

    return sorted(
        a["name"]
        for a in ray.util.list_named_actors(all_namespaces=True)
        if a["namespace"] == "serve" and a["name"].startswith("SERVE_REPLICA::") and f"#{deployment}#" in a["name"]
    )


def kill_replica_under_load(makers: dict, deployment: str, rate: float, seconds: float, kill_at: float) -> dict:
    """Load `similar` with a retrying client; kill the deployment's replica at kill_at s."""
    import ray
    from ray import serve

    before = replica_actors(deployment)
    state = {}

    def killer():
        time.sleep(kill_at)
        name = before[0]
        state["killed"] = name
        t = time.perf_counter()
        ray.kill(ray.get_actor(name, namespace="serve"), no_restart=True)
        # recovered = a new replica of the deployment is up and Serve reports the deployment healthy
        while time.perf_counter() - t < 120:
            now = replica_actors(deployment)
            dep = serve.status().applications[run.APP_NAME].deployments[deployment]
            if [n for n in now if n not in before] and dep.status == "HEALTHY":
                state["recovery_s"] = round(time.perf_counter() - t, 2)
                break
            time.sleep(0.1)

    thread = threading.Thread(target=killer)
    thread.start()
    out = asyncio.run(open_loop(makers["similar"], rate, seconds, retry_for_s=30.0))
    thread.join()
    return {
        "deployment": deployment,
        "killed": state.get("killed"),
        "replica_recovery_s": state.get("recovery_s"),
        "kill_at_s": kill_at,
        "lost_requests": out["errors"],
        **out,
    }


def rollout_under_load(makers: dict, app_args: dict, rate: float, seconds: float, at: float) -> dict:
    """Alternate similar/recommend at `rate` (no retries) while serve.run deploys v2."""
    from ray import serve

    from serving.app import build_app

    versions = []
    state = {}

    def mixed(i):
        return makers["similar"](i) if i % 2 else makers["recommend"](i)

    def record(t, payload):
        versions.append((t, json.loads(payload).get("model_version")))

    def deployer():
        time.sleep(at)
        t = time.perf_counter()
        serve.run(build_app({**app_args, "model_version": "v2"}), name=run.APP_NAME, route_prefix="/", blocking=False)
        state["deploy_call_s"] = round(time.perf_counter() - t, 2)

    thread = threading.Thread(target=deployer)
    thread.start()
    out = asyncio.run(open_loop(mixed, rate, seconds, on_result=record))
    thread.join()
    versions.sort()
    first_v2 = next((t for t, v in versions if v == "v2"), None)
    last_v1 = max((t for t, v in versions if v == "v1"), default=None)
    return {
        "from": "v1",
        "to": "v2",
        "started_at_s": at,
        **state,
        "first_v2_answer_s": round(first_v2, 2) if first_v2 else None,
        "last_v1_answer_s": round(last_v1, 2) if last_v1 else None,
        "answers": {v: sum(1 for _, x in versions if x == v) for v in ("v1", "v2")},
        **out,
    }


# --- main --------------------------------------------------------------------------------------


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--songs", type=int, default=100_000)
    ap.add_argument("--dim", type=int, default=128)
    ap.add_argument("--rates", default="50,100,200")
    ap.add_argument("--seconds", type=float, default=10.0)
    ap.add_argument("--endpoints", default=",".join(ENDPOINTS))
    ap.add_argument("--world", default=str(Path(tempfile.gettempdir()) / "htcl_bench_serve_world"))
    ap.add_argument("--online-store", default="", help="redis://127.0.0.1:6379/14 (flushed) instead of SQLite")
    ap.add_argument("--skip", default="", help="comma list of: kill, rollout, overload")
    ap.add_argument(
        "--scenario-rate",
        type=float,
        default=20.0,
        help="requests/s during the replica kill and the rollout (default: %(default)s)",
    )
    ap.add_argument("--out", default=str(REPO / "benchmarks" / "results" / "bench_serve.json"))
    args = ap.parse_args(argv)
    rates = [float(r) for r in args.rates.split(",")]
    endpoints = [e for e in args.endpoints.split(",") if e]
    skip = set(filter(None, args.skip.split(",")))
    t_all = time.perf_counter()
    w = world(Path(args.world), args.songs, args.dim, args.online_store)

    app_args = {
        "config": "configs/demo.yaml",
        "overrides": [f"output_dir={w['out']}", f"data.root={w['world']}"],
        "encoder": "false",
        "online_store": args.online_store,
    }
    t0 = time.perf_counter()
    info = run.start(app_args, port=run.free_port(), num_cpus=2)
    startup_s = round(time.perf_counter() - t0, 1)
    print(f"serve: up at {info['url']} in {startup_s} s", flush=True)
    feast_port = run.free_port()
    feast_proc, feast_repo = start_feast_server(w["out"], args.online_store, feast_port)
    makers = request_makers(
        info["url"], f"http://127.0.0.1:{feast_port}", w["songs"], w["users"], np.random.default_rng(0)
    )
    rows, extra = [], {}
    try:
        for name in endpoints:
            asyncio.run(open_loop(makers[name], 20, 1.0))  # warm-up: connections, caches
            for rate in rates:
                r = asyncio.run(open_loop(makers[name], rate, args.seconds))
                rows.append({"endpoint": name, **r})
                print(
                    f"{name:<10} {rate:>5.0f}/s  p50 {r['p50_ms']:>8} p95 {r['p95_ms']:>8} p99 {r['p99_ms']:>8} ms  "
                    f"errors {r['errors']} {r['error_codes'] or ''}",
                    flush=True,
                )
                # An overloaded phase leaves a backlog (ours, or `feast serve`'s unbounded queue in its
                # own process): let it drain so it does not land in the next phase's tail.
                settle(info["url"])
                time.sleep(5.0 if r["errors"] or r["p99_ms"] > 1000 else 0.5)
        if "overload" not in skip:
            r = asyncio.run(open_loop(makers["recommend"], 1000, 3.0))
            extra["overload"] = {"endpoint": "recommend", **r}
            print(
                f"overload   1000/s x 3 s on /recommend: {r['ok']} ok, codes {r['error_codes']}, max {r['max_ms']} ms",
                flush=True,
            )
            settle(info["url"])
        if "kill" not in skip:
            r = kill_replica_under_load(makers, "Matcher", args.scenario_rate, 20.0, kill_at=5.0)
            extra["replica_kill"] = r
            settle(info["url"])
            print(
                f"kill       Matcher replica at 5 s under {args.scenario_rate:g}/s /similar "
                "(client retries for up to 30 s): "
                f"lost {r['lost_requests']}"
                f" of {r['requests']}, failed attempts {r['failed_attempts']} {r.get('failed_attempts_window_s', '')}, "
                f"replica back in {r['replica_recovery_s']} s, p99 {r['p99_ms']} ms",
                flush=True,
            )
        if "rollout" not in skip:
            r = rollout_under_load(makers, app_args, args.scenario_rate, 30.0, at=3.0)
            extra["rollout"] = r
            print(
                f"rollout    v1 -> v2 under {args.scenario_rate:g}/s similar+recommend (no retries): "
                f"{r['errors']} failed of {r['requests']} "
                f"{r['error_codes'] or ''}, first v2 answer at {r['first_v2_answer_s']} s (deploy started at 3 s), "
                f"last v1 at {r['last_v1_answer_s']} s, p99 {r['p99_ms']} ms",
                flush=True,
            )
    finally:
        os.killpg(feast_proc.pid, signal.SIGTERM)
        feast_proc.wait(timeout=30)
        shutil.rmtree(feast_repo, ignore_errors=True)
        run.stop(info["started_ray"])

    def p99(name, rate):
        return next((r["p99_ms"] for r in rows if r["endpoint"] == name and r["rate"] == rate), None)

    goals = {}
    if p99("similar", 100) is not None:
        goals["similar k=100 p99 < 50 ms at 100/s"] = p99("similar", 100) < 50
    if p99("recommend", 50) is not None:
        goals["recommend (100 candidates) p99 < 100 ms at 50/s"] = p99("recommend", 50) < 100
    for rate in rates:
        if p99("embedding", rate) is not None and p99("feast", rate) is not None:
            goals[f"embedding p99 <= feast serve p99 at {rate:g}/s"] = p99("embedding", rate) <= p99("feast", rate)
    if "replica_kill" in extra:
        goals["replica kill: no request lost with retries"] = extra["replica_kill"]["lost_requests"] == 0
    if "rollout" in extra:
        goals["rollout: no failed request"] = extra["rollout"]["errors"] == 0
    if "overload" in extra:
        # 503 = shed at a full queue; 408 = the proxy's request_timeout_s (10 s) ended a request that
        # was admitted but starved: both are bounded answers, neither a 500 nor a hang.
        o = extra["overload"]
        goals["overload: only 200/503/408, none unanswered, max latency <= 12 s"] = (
            set(o["error_codes"]) <= {"503", "408"} and o["max_ms"] <= 12_000
        )

    load = os.getloadavg()
    print(
        f"\nbench_serve: {w['songs']} songs x {w['dim']} floats, online store {args.online_store or 'SQLite'}, "
        f"{args.seconds:g} s per rate, open loop over loopback (load average {load[0]:.1f} on {os.cpu_count()} CPUs)"
    )
    print(f"{'endpoint':<10}{'rate/s':>7}{'p50 ms':>9}{'p95 ms':>9}{'p99 ms':>9}{'errors':>8}")
    for r in rows:
        print(f"{r['endpoint']:<10}{r['rate']:>7.0f}{r['p50_ms']:>9}{r['p95_ms']:>9}{r['p99_ms']:>9}{r['errors']:>8}")
    for goal, ok in goals.items():
        print(f"goal {goal}: {'met' if ok else 'NOT met'}")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(
        json.dumps(
            {
                "benchmark": "bench_serve",
                "machine": platform.machine(),
                "cpus": os.cpu_count(),
                "load_average_end": load[0],
                "songs": w["songs"],
                "dim": w["dim"],
                "online_store": args.online_store or "sqlite",
                "seconds_per_rate": args.seconds,
                "serve_startup_s": startup_s,
                "world_build_s": w["seconds"],
                "rows": rows,
                **extra,
                "goals": goals,
                "total_s": round(time.perf_counter() - t_all, 1),
                "command": "python benchmarks/bench_serve.py " + " ".join(sys.argv[1:] if argv is None else argv),
            },
            indent=2,
        )
    )
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
