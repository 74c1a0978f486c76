"""`htcl serve`: the Serve app on 127.0.0.1, and the demo's one recommendation.

    htcl serve --config configs/demo.yaml [k=v ...] [--port 8000] [--model-version V]
    python -m serving.run ...                       (the same)
    serve run serving/config.yaml                   (Ray's CLI, the same app from its YAML)

Ray: RAY_ADDRESS's cluster, else a local instance bound to 127.0.0.1 with token authentication
(ray_jobs.common.init_ray). HTTP: Serve's proxy on --host (127.0.0.1) and --port, with
serving/gate.py's body gate in it. With the environment variable HTCL_API_KEY set, every route but
/healthz wants `Authorization: Bearer <key>`: the ingress gets the key's SHA-256 and the Ray
processes this command starts never see the key.
Rolling out another model version: run the command again with --model-version (or
`serve deploy` / `serve run` with the new `model_version` arg); in-flight requests finish on the
old replicas.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import signal
import socket
import sys
import time
import urllib.error
import urllib.request

from htcl.arguments import add_config_args
from serving.app import API_KEY_ENV, APP_NAME, api_key_sha256, body_limits
from serving.gate import LIMITS_ENV, PROXY_CALLBACK, PROXY_CALLBACK_ENV

REQUEST_TIMEOUT_S = 10.0


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def http(
    method: str, url: str, body: dict | bytes | None = None, headers: dict | None = None, timeout: float = 30.0
) -> tuple[int, dict]:
    """A small JSON client on the standard library: (status, parsed body)."""
    data = body if isinstance(body, (bytes, type(None))) else json.dumps(body).encode()
    hdrs = {"Content-Type": "application/json"} if isinstance(body, dict) else {}
    key = os.environ.get(API_KEY_ENV)
    if key:
        hdrs["Authorization"] = f"Bearer {key}"
    hdrs.update(headers or {})
    req = urllib.request.Request(url, data=data, method=method, headers=hdrs)
    try:
        with urllib.request.urlopen(req, timeout=timeout) as r:
            return r.status, json.loads(r.read() or b"null")
    except urllib.error.HTTPError as e:
        raw = e.read()
        try:
            return e.code, json.loads(raw)
        except ValueError:
            return e.code, {"raw": raw.decode(errors="replace")}


def dashboard_url() -> str | None:
    try:
        from ray._private.worker import get_dashboard_url

        url = get_dashboard_url()
        return f"http://{url}" if url and not url.startswith("http") else url
    except Exception:  # an old/new Ray without it: the URL is only printed
        return None


@contextlib.contextmanager
def _environment_without(name: str):
    """`name` out of os.environ for the block: processes started in it (a local Ray's gcs, raylet,
    dashboard and, through the raylet, every worker and replica) do not inherit it."""
    value = os.environ.pop(name, None)
    try:
        yield
    finally:
        if value is not None:
            os.environ[name] = value


def start(
    args: dict,
    host: str = "127.0.0.1",
    port: int = 8000,
    num_cpus: int | None = None,
    request_timeout_s: float = REQUEST_TIMEOUT_S,
    wait_s: float = 120.0,
) -> dict:
    """Ray (joined or started), Serve's proxy on host:port, the htcl app; returns once /healthz answers."""
    # Serve's throughput-optimized mode (user code on each replica's event loop, no separate router
    # loop, buffered access logs); our deployments already keep blocking work on their own thread.
    # On 2 cores, 100k songs: /similar at 100/s p99 67 -> 31 ms, /recommend at 50/s 1028 ms with
    # 65 x 503 -> 54 ms, no error (benchmarks/bench_serve.py). It reaches the processes of a Ray
    # instance this call starts; on a cluster, export it before `ray start`. "0" opts out.
    os.environ.setdefault("RAY_SERVE_THROUGHPUT_OPTIMIZED", "1")
    # The body gate in Serve's proxy (bodies read, capped and timed before a request takes an
    # ingress slot; Serve's own errors as our JSON body), with this app's limits. Like the line
    # above, it reaches the proxy of a Ray instance this call starts; on a cluster, export both
    # before `ray start`.
    os.environ.setdefault(PROXY_CALLBACK_ENV, PROXY_CALLBACK)
    os.environ[LIMITS_ENV] = body_limits(args).to_env()
    from ray import serve

    from ray_jobs.common import init_ray
    from serving.app import build_app

    # The ingress gets the key's digest as an argument; the key stays in this process only (its
    # own client, `http`, sends it).
    key_env = args.get("api_key_env") or API_KEY_ENV
    args = {**args, "api_key_sha256": api_key_sha256(args)}
    with _environment_without(key_env):
        started = init_ray(num_cpus, quiet=True)
    serve.start(http_options={"host": host, "port": port, "request_timeout_s": request_timeout_s})
    serve.run(build_app(args), name=APP_NAME, route_prefix="/", blocking=False)
    url = f"http://{host}:{port}"
    deadline = time.time() + wait_s
    while True:
        try:
            status, body = http("GET", f"{url}/healthz", timeout=10)
            if status == 200:
                break
        except OSError:
            status, body = None, None
        if time.time() > deadline:
            raise TimeoutError(f"{url}/healthz did not answer 200 within {wait_s} s (last: {status} {body})")
        time.sleep(0.5)
    return {"url": url, "dashboard": dashboard_url(), "started_ray": started, "health": body}


def stop(started_ray: bool) -> None:
    import ray
    from ray import serve

    serve.shutdown()
    if started_ray:
        ray.shutdown()


def app_args(
    config: str,
    overrides: list[str],
    model_version: str | None = None,
    online_store: str | None = None,
    encoder: str = "auto",
) -> dict:
    args = {"config": config, "overrides": list(overrides), "encoder": encoder}
    if model_version:
        args["model_version"] = model_version
    if online_store is not None:
        args["online_store"] = online_store
    return args


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="htcl serve", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    add_config_args(p)
    p.add_argument("--host", default="127.0.0.1", help="HTTP bind address (default: %(default)s)")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--model-version", help="default: the store's current_model_version")
    p.add_argument(
        "--online-store", default=None, help="redis://HOST:PORT[/DB] (default: $HTCL_ONLINE_STORE, else SQLite)"
    )
    p.add_argument(
        "--encoder",
        choices=["auto", "true", "false"],
        default="auto",
        help="cold-start encoder (auto: when the checkpoint is the served version)",
    )
    p.add_argument("--num-cpus", type=int, default=None, help="CPUs of a local Ray instance (default: all)")
    return p


def main(argv=None) -> int:
    args = build_parser().parse_intermixed_args(list(sys.argv[1:] if argv is None else argv))
    stopping = []
    # Both set explicitly (a shell's background job starts Python with SIGINT ignored), before the
    # start, so a stop asked for while the app deploys is honoured once it is up.
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stopping.append(1))
    try:
        info = start(
            app_args(args.config, args.overrides, args.model_version, args.online_store, args.encoder),
            args.host,
            args.port,
            args.num_cpus,
        )
    except (FileNotFoundError, ValueError) as e:
        print(f"htcl serve: {e}", file=sys.stderr)
        return 2
    print(
        json.dumps(
            {
                "serving": info["url"],
                "model_version": info["health"].get("model_version"),
                "ray_dashboard": info["dashboard"],
                "auth": bool(os.environ.get(API_KEY_ENV)),
            },
            indent=2,
        ),
        flush=True,
    )
    print(f"try: curl {info['url']}/v1/songs/<song_id>/similar?k=10   (Ctrl-C stops)", flush=True)
    try:
        while not stopping:
            time.sleep(0.5)
    finally:
        stop(info["started_ray"])
    return 0


def demo_recommend(config_path: str, overrides: list[str] | tuple = (), port: int | None = None) -> dict:
    """The end of `htcl demo`: serve the demo's outputs, send one /v1/recommend, print it, shut down."""
    import numpy as np
    import pandas as pd

    from htcl.config import load_config
    from serving.app import plan

    p = plan(app_args(config_path, list(overrides)))
    songs = np.load(p.index_dir / "song_ids.npy")
    cfg = load_config(config_path, list(overrides))
    log = os.path.join(cfg.data.root, "interactions.parquet")
    user = int(pd.read_parquet(log, columns=["user_id"])["user_id"].iloc[0]) if os.path.exists(log) else 1
    request = {"user_id": user, "trigger_song_id": int(songs[0]), "k": 10, "candidates": min(100, len(songs) - 1)}
    info = start(app_args(config_path, list(overrides)), port=port or free_port())
    try:
        t0 = time.perf_counter()
        status, answer = http("POST", f"{info['url']}/v1/recommend", request)
        ms = (time.perf_counter() - t0) * 1000
    finally:
        stop(info["started_ray"])
    print(f"POST /v1/recommend {json.dumps(request)} -> {status} in {ms:.0f} ms")
    print(json.dumps(answer, indent=2))
    if status != 200:
        raise RuntimeError(f"/v1/recommend answered {status}: {answer}")
    return answer


if __name__ == "__main__":
    raise SystemExit(main())
