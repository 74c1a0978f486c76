"""What a Ray instance of this project listens on: 127.0.0.1 only, and no metrics for the asking.

The local instance `htcl <step>` / `htcl serve` start (ray_jobs.common.init_ray), with a task run and
a Serve app deployed, is started in a child process as a user's command would, in its own session;
every TCP/UDP socket of that process tree that listens is listed with psutil. `ray start --head` as
the README documents it is checked the same way in tests/test_ray_cluster.py (same helpers).
"""

from __future__ import annotations

import ipaddress
import os
import re
import secrets
import select
import signal
import socket
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor

import pytest
from conftest import REPO

psutil = pytest.importorskip("psutil")

# Listeners Ray 2.60 opens that cannot be bound to 127.0.0.1 (kept in step with the README's
# "What listens where"): (process name pattern, reason). Each must refuse a call without the token.
NOT_ON_LOOPBACK: list[tuple[str, str]] = [
    (
        r"^ray::ServeReplica:",
        "Serve's inter-deployment gRPC server: ray/serve/_private/replica.py binds "
        "it to [::]:0 unconditionally (no option, no environment variable); Ray attaches its token "
        "interceptor, so without RAY_AUTH_TOKEN a call gets UNAUTHENTICATED",
    ),
]
# Not exercised here (it takes a Ray Train run), in the README too: while a TorchTrainer runs, rank 0's
# torch.distributed TCPStore listens on [::]:MASTER_PORT (torch 2.13 binds it there whatever host it
# is given; no option, no authentication), until the run ends.


def is_loopback(ip: str) -> bool:
    addr = ipaddress.ip_address(ip.split("%", 1)[0])
    if isinstance(addr, ipaddress.IPv6Address) and addr.ipv4_mapped is not None:
        addr = addr.ipv4_mapped  # ::ffff:127.0.0.1, an IPv6 socket bound to the IPv4 loopback
    return addr.is_loopback


def listeners(pids: set[int]) -> list[dict]:
    """Every listening TCP socket and every bound, unconnected UDP socket of these processes."""
    found = []
    for c in psutil.net_connections("inet"):
        if c.pid not in pids or not c.laddr:
            continue
        tcp = c.type == socket.SOCK_STREAM
        if (tcp and c.status != psutil.CONN_LISTEN) or (not tcp and c.raddr):
            continue
        try:
            p = psutil.Process(c.pid)
            # The whole command line: a deep checkout path pushes the script name (dashboard.py)
            # past any fixed cut.
            name = " ".join(p.cmdline()) or p.name()
        except psutil.Error:
            name = "?"
        found.append(
            {"ip": c.laddr.ip, "port": c.laddr.port, "proto": "tcp" if tcp else "udp", "pid": c.pid, "process": name}
        )
    return found


def exposed(socks: list[dict]) -> list[dict]:
    """The listeners that are not on the loopback and not in NOT_ON_LOOPBACK."""
    return [
        s
        for s in socks
        if not is_loopback(s["ip"]) and not any(re.search(pat, s["process"]) for pat, _ in NOT_ON_LOOPBACK)
    ]


def serves_metrics(port: int, timeout: float = 2.0) -> bool:
    """Does 127.0.0.1:port answer an unauthenticated `GET /metrics` with Prometheus text?"""
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=timeout) as s:
            s.settimeout(timeout)
            s.sendall(b"GET /metrics HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n")
            data = b""
            while len(data) < 65536:
                chunk = s.recv(8192)
                if not chunk:
                    break
                data += chunk
    except OSError:
        return False
    return (
        data.startswith(b"HTTP/1.")
        and b" 200 " in data.split(b"\r\n", 1)[0]
        and (b"# TYPE " in data or b"# HELP " in data)
    )


def grpc_refuses_without_token(port: int, method: str = "/ray.serve.ASGIService/HandleRequest") -> bool:
    """A call to a Serve replica's gRPC server with no token and with a wrong one: UNAUTHENTICATED?"""
    import grpc

    with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
        call = channel.unary_unary(method, request_serializer=None, response_deserializer=None)
        for metadata in (None, (("authorization", "Bearer " + secrets.token_hex(32)),)):
            try:
                call(b"", timeout=10, metadata=metadata)
                return False
            except grpc.RpcError as e:
                if e.code() != grpc.StatusCode.UNAUTHENTICATED:
                    return False
    return True


def metrics_ports(socks: list[dict]) -> list[int]:
    ports = sorted({s["port"] for s in socks if s["proto"] == "tcp"})
    with ThreadPoolExecutor(8) as pool:
        return [p for p, yes in zip(ports, pool.map(serves_metrics, ports)) if yes]


def fmt(socks: list[dict]) -> str:
    return "\n".join(f"  {s['proto']} {s['ip']}:{s['port']}  pid {s['pid']}  {short(s['process'])}" for s in socks)


def short(cmdline: str, width: int = 140) -> str:
    """A command line cut for reading: the executable's base name and the start of its arguments."""
    head, _, rest = cmdline.partition(" ")
    return f"{head.rsplit('/', 1)[-1]} {rest}"[:width]


CHILD = r"""
import sys, time, urllib.request
from ray_jobs.common import init_ray
import ray
from ray import serve

init_ray(num_cpus=2, quiet=True)

@ray.remote
def ping():
    return "pong"

assert ray.get(ping.remote()) == "pong"

@serve.deployment
class Hello:
    def __call__(self, request):
        return "hello"

port = int(sys.argv[1])
serve.start(http_options={"host": "127.0.0.1", "port": port})
serve.run(Hello.bind(), name="hello", route_prefix="/", blocking=False)
deadline = time.time() + 90
while True:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/", timeout=5) as r:
            if r.status == 200:
                break
    except OSError:
        if time.time() > deadline:
            raise
        time.sleep(0.5)
print("READY", flush=True)
sys.stdin.readline()
serve.shutdown()
ray.shutdown()
"""


@pytest.mark.slow
def test_local_ray_instance_listens_on_loopback_only_and_serves_no_metrics(tmp_path):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    # As a user's shell would have it, minus any Ray settings of ours: the defaults are under test.
    env = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith("RAY_") and k not in ("DASHBOARD_METRIC_PORT", "AUTOSCALER_METRIC_PORT")
    }
    env.update(
        RAY_AUTH_MODE="token",
        RAY_AUTH_TOKEN=secrets.token_hex(32),
        PYTHONPATH=str(REPO),
        RAY_GRACEFUL_SHUTDOWN_DRAIN_TIMEOUT_S="5",
    )
    log = (tmp_path / "child.log").open("w")
    child = subprocess.Popen(
        [sys.executable, "-c", CHILD, str(port)],
        cwd=REPO,
        env=env,
        text=True,
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=log,
        start_new_session=True,
    )
    try:
        deadline, line = time.time() + 150, ""
        while line.strip() != "READY":
            assert child.poll() is None, (
                f"child exited {child.returncode}: {(tmp_path / 'child.log').read_text()[-3000:]}"
            )
            assert time.time() < deadline, "local Ray + Serve not up in 150 s"
            if select.select([child.stdout], [], [], 1.0)[0]:
                line = child.stdout.readline()
        root = psutil.Process(child.pid)
        pids = {child.pid} | {p.pid for p in root.children(recursive=True)}
        socks = listeners(pids)
        names = " ".join(s["process"] for s in socks)
        # What was started, so that the check below covers it: GCS, raylet, a worker, Serve.
        for what in ("gcs_server", "raylet", "ServeController", "ProxyActor", "Hello"):
            assert what in names, f"no listener of {what} found:\n{fmt(socks)}"
        assert not exposed(socks), f"listening beyond the loopback:\n{fmt(exposed(socks))}"
        assert any(s["port"] == port for s in socks)  # the Serve proxy, on 127.0.0.1
        # What Ray cannot bind to the loopback wants the token.
        beyond = [s for s in socks if not is_loopback(s["ip"])]
        assert beyond and all(grpc_refuses_without_token(s["port"]) for s in beyond), fmt(beyond)
        served = metrics_ports(socks)
        assert not served, f"Prometheus metrics answer without a token on {served}:\n{fmt(socks)}"
    finally:
        try:
            child.stdin.write("\n")
            child.stdin.close()
            child.wait(timeout=60)
        except (OSError, subprocess.TimeoutExpired):
            pass
        for sig in (signal.SIGTERM, signal.SIGKILL):  # the child's own session: what is left of it
            try:
                os.killpg(child.pid, sig)
                time.sleep(1)
            except ProcessLookupError:
                break
        child.wait(timeout=10)
        log.close()


def test_readme_documents_the_loopback_environment():
    """The README's `ray start --head` exports exactly what a local instance gets."""
    from ray_jobs.common import LOOPBACK_RAY_ENV

    readme = (REPO / "README.md").read_text()
    exports = dict(re.findall(r"\b(\w+)=(\S+)", " ".join(re.findall(r"^export (.*)$", readme, re.MULTILINE))))
    assert {k: exports.get(k) for k in LOOPBACK_RAY_ENV} == LOOPBACK_RAY_ENV
    assert re.search(
        r"^ray start --head --node-ip-address 127\.0\.0\.1 .*--dashboard-host 127\.0\.0\.1", readme, re.MULTILINE
    )
