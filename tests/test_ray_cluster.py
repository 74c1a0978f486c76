"""A real Ray cluster, really submitted to: `ray start --head` with token authentication, then
`ray job submit --working-dir . -- python -m ray_jobs.<step>` for preprocess, pretrain (Ray Train,
when ray_jobs/pretrain.py is there) and embed.

The head is this test's own: its own process group, free ports, its own --temp-dir, started as the
README documents (--node-ip-address and --dashboard-host 127.0.0.1, ray_jobs.common.LOOPBACK_RAY_ENV
exported: every listener on 127.0.0.1 but what Ray cannot bind, no Prometheus exporter),
RAY_AUTH_MODE=token with a fresh RAY_AUTH_TOKEN (nothing written to ~/.ray). It is stopped by killing
that process group; then no process of it may remain.
"""

from __future__ import annotations

import json
import os
import re
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow.parquet as pq
import pytest
import soundfile as sf
from conftest import REPO, TINY_MODEL
from test_ray_binding import exposed, fmt, grpc_refuses_without_token, is_loopback, listeners, metrics_ports

from ray_jobs.common import LOOPBACK_RAY_ENV, WORKING_DIR_EXCLUDES

psutil = pytest.importorskip("psutil")
requests = pytest.importorskip("requests")

pytestmark = pytest.mark.slow

VENV_BIN = Path(sys.executable).parent
RAY = VENV_BIN / "ray"


def free_ports(n: int) -> list[int]:
    socks = []
    try:
        for _ in range(n):
            s = socket.socket()
            s.bind(("127.0.0.1", 0))
            socks.append(s)
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


class Head:
    """`ray start --head --block` in its own session; stop() kills the group and any stragglers."""

    def __init__(self, log_dir: Path):
        (
            self.gcs,
            self.dashboard,
            self.client,
            self.agent_http,
            self.agent_grpc,
            self.runtime_env,
            self.metrics,
            self.node_manager,
            self.object_manager,
        ) = free_ports(9)
        # Short path: Ray's unix sockets live under it (108-byte limit on socket paths).
        self.temp_dir = tempfile.mkdtemp(prefix="htclray", dir="/tmp")
        self.token = secrets.token_hex(32)
        self.env = {
            k: v
            for k, v in os.environ.items()
            if (not k.startswith("RAY_") or k in ("RAY_DEDUP_LOGS",)) and k not in LOOPBACK_RAY_ENV
        }
        self.env.update(LOOPBACK_RAY_ENV)  # as the README's `ray start --head` has them exported
        # Draining at stop() has no work left to protect (the jobs are done): 5 s, not 30.
        self.env.update(
            RAY_AUTH_MODE="token",
            RAY_AUTH_TOKEN=self.token,
            RAY_GRACEFUL_SHUTDOWN_DRAIN_TIMEOUT_S="5",
            PATH=f"{VENV_BIN}{os.pathsep}{os.environ.get('PATH', '')}",
        )
        self.log = (log_dir / "ray_head.log").open("w")
        self.url = f"http://127.0.0.1:{self.dashboard}"
        self.proc: subprocess.Popen | None = None

    def start(self, timeout: float = 180.0) -> None:
        cmd = [
            str(RAY),
            "start",
            "--head",
            "--block",
            "--disable-usage-stats",
            "--node-ip-address=127.0.0.1",
            f"--port={self.gcs}",
            "--include-dashboard=true",
            "--dashboard-host=127.0.0.1",
            f"--dashboard-port={self.dashboard}",
            f"--ray-client-server-port={self.client}",
            f"--dashboard-agent-listen-port={self.agent_http}",
            f"--dashboard-agent-grpc-port={self.agent_grpc}",
            f"--runtime-env-agent-port={self.runtime_env}",
            f"--metrics-export-port={self.metrics}",
            f"--node-manager-port={self.node_manager}",
            f"--object-manager-port={self.object_manager}",
            "--num-cpus=2",
            "--num-gpus=0",
            f"--object-store-memory={400 * 1024**2}",
            f"--temp-dir={self.temp_dir}",
        ]
        self.proc = subprocess.Popen(
            cmd, env=self.env, stdout=self.log, stderr=subprocess.STDOUT, start_new_session=True, cwd=self.temp_dir
        )
        deadline = time.time() + timeout
        while time.time() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"ray start exited with {self.proc.returncode}; see {self.log.name}")
            try:
                r = requests.get(f"{self.url}/api/jobs/", headers=self.auth, timeout=5)
                if r.status_code == 200:
                    return
            except requests.RequestException:
                pass
            time.sleep(0.5)
        raise TimeoutError(f"dashboard not up at {self.url} after {timeout} s; see {self.log.name}")

    @property
    def auth(self) -> dict:
        return {"Authorization": f"Bearer {self.token}"}

    def ours(self) -> list:
        """Live processes of this cluster: they name its temp dir or GCS port, or were started
        inside its process group, or carry its RAY_ADDRESS (job drivers)."""
        marks = (self.temp_dir, f"127.0.0.1:{self.gcs}")
        found = []
        for p in psutil.process_iter(["pid", "cmdline"]):
            if p.pid == os.getpid():
                continue
            try:
                cmd = " ".join(p.info["cmdline"] or [])
                mine = any(m in cmd for m in marks)
                if not mine and self.proc is not None:
                    mine = os.getpgid(p.pid) == self.proc.pid
                if not mine:
                    mine = p.environ().get("RAY_ADDRESS", "").endswith(f":{self.gcs}")
                if mine and p.status() != psutil.STATUS_ZOMBIE:
                    found.append(p)
            except (psutil.Error, ProcessLookupError, PermissionError):
                continue
        return found

    def stop(self) -> list[str]:
        """Kill the process group, then anything of this cluster left outside it; returns what had
        to be killed by pid (for the report), and raises if anything survives."""
        if self.proc is not None and self.proc.poll() is None:
            # SIGTERM to `ray start` first: it drains the node through the GCS and stops what it
            # started. (SIGTERM to the whole group at once kills the GCS under it, and the drain
            # then waits 30 s for a GCS that is gone.) Then the group, for anything left in it.
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=45)
            except subprocess.TimeoutExpired:
                pass
            for sig in (signal.SIGTERM, signal.SIGKILL):
                try:
                    os.killpg(self.proc.pid, sig)
                except ProcessLookupError:
                    break
                deadline = time.time() + 2  # up to 2 s for the group to go, not 2 s whatever
                while time.time() < deadline:
                    try:
                        os.killpg(self.proc.pid, 0)
                    except ProcessLookupError:
                        break
                    time.sleep(0.1)
            if self.proc.poll() is None:
                self.proc.wait(timeout=10)
        deadline = time.time() + 20
        while self.ours() and time.time() < deadline:  # give children time to follow
            time.sleep(0.5)
        strays = self.ours()
        for p in strays:
            try:
                p.kill()
            except psutil.Error:
                pass
        psutil.wait_procs(strays, timeout=10)
        left = self.ours()
        self.log.close()
        shutil.rmtree(self.temp_dir, ignore_errors=True)
        if left:
            raise AssertionError(f"processes of the test cluster survived: {[p.pid for p in left]}")
        return [" ".join(p.info["cmdline"] or [])[:120] for p in strays]

    def submit(self, submission_id: str, entrypoint: list[str], timeout: float = 300.0) -> tuple[str, str, str]:
        """`ray job submit --working-dir .` from the repo root; returns (status, job logs, CLI output)."""
        runtime_env = {"excludes": WORKING_DIR_EXCLUDES}  # what a user's `ray job submit` leaves out
        cmd = [
            str(RAY),
            "job",
            "submit",
            f"--address={self.url}",
            f"--submission-id={submission_id}",
            "--no-wait",
            "--working-dir",
            ".",
            "--runtime-env-json",
            json.dumps(runtime_env),
            "--",
            *entrypoint,
        ]
        t_submit = time.time()
        agent_deadline = time.time() + 120
        while True:
            cli = subprocess.run(cmd, cwd=REPO, env=self.env, capture_output=True, text=True, timeout=120)
            # A head that has just started may not have its job agent yet: Ray answers 500 "No
            # available agent to submit job, please try again" (seen on a loaded machine).
            if cli.returncode == 0 or "No available agent" not in cli.stderr or time.time() > agent_deadline:
                break
            time.sleep(2)
        assert cli.returncode == 0, cli.stdout + cli.stderr
        deadline = time.time() + timeout
        status = None
        while time.time() < deadline:
            r = requests.get(f"{self.url}/api/jobs/{submission_id}", headers=self.auth, timeout=10)
            r.raise_for_status()
            info = r.json()
            status = info["status"]
            if status in ("SUCCEEDED", "FAILED", "STOPPED"):
                if info.get("start_time") and info.get("end_time"):
                    print(
                        f"{submission_id}: {status} in {(info['end_time'] - info['start_time']) / 1000:.1f} s "
                        f"(submit to done {time.time() - t_submit:.1f} s)"
                    )
                break
            time.sleep(0.5)
        logs = requests.get(f"{self.url}/api/jobs/{submission_id}/logs", headers=self.auth, timeout=10).json()["logs"]
        return status, logs, cli.stdout + cli.stderr


@pytest.fixture(scope="module")
def head(tmp_path_factory):
    h = Head(tmp_path_factory.mktemp("ray_head"))
    try:
        h.start()
        yield h
    finally:
        h.stop()


@pytest.fixture
def tiny_catalog(tmp_path):
    audio = tmp_path / "audio"
    audio.mkdir()
    rows = []
    sr = 16000
    for i in range(1, 13):
        t = np.arange(3 * sr) / sr
        wave = 0.3 * np.sin(2 * np.pi * (110 * i) * t) * (1 + 0.5 * np.sin(2 * np.pi * i * t))
        sf.write(audio / f"{i}.flac", wave.astype(np.float32), sr)
        rows.append(
            {
                "song_id": i,
                "audio_path": str(audio / f"{i}.flac"),
                "title": f"tone {i}",
                "artist": "a",
                "lyrics": "",
                "tags": "",
            }
        )
    (audio / "13.wav").write_bytes(b"this is not audio at all" * 10)
    rows.append({**rows[0], "song_id": 13, "audio_path": str(audio / "13.wav")})
    pd.DataFrame(rows).to_parquet(tmp_path / "catalog.parquet")
    return tmp_path / "catalog.parquet"


def test_dashboard_refuses_unauthenticated_requests(head):
    assert requests.get(f"{head.url}/api/jobs/", timeout=10).status_code == 401
    wrong = {"Authorization": f"Bearer {secrets.token_hex(32)}"}
    assert requests.get(f"{head.url}/api/jobs/", headers=wrong, timeout=10).status_code in (401, 403)
    assert requests.get(f"{head.url}/api/jobs/", headers=head.auth, timeout=10).status_code == 200
    # Bound to loopback only: nothing listens on the dashboard port of another interface.
    conns = [
        c
        for c in psutil.net_connections("tcp")
        if c.laddr and c.laddr.port == head.dashboard and c.status == psutil.CONN_LISTEN
    ]
    assert conns and all(c.laddr.ip == "127.0.0.1" for c in conns)


def test_head_listens_on_loopback_only_and_serves_no_metrics(head):
    """`ray start --head` as the README has it: every listener of the cluster's processes on
    127.0.0.1 (tests/test_ray_binding.py lists what Ray cannot bind; none of those runs on a bare
    head), and no port answers `GET /metrics` without the token."""
    expected = ("gcs_server", "raylet", "dashboard.py", "DashboardAgent", "RuntimeEnvAgent", "ray.util.client.server")
    deadline = time.time() + 60  # the agents may still be starting when the job API answers
    while True:
        socks = listeners({p.pid for p in head.ours()})
        missing = [w for w in expected if w not in " ".join(s["process"] for s in socks)]
        if not missing or time.time() > deadline:
            break
        time.sleep(1)
    assert not missing, f"no listener of {missing} found:\n{fmt(socks)}"
    assert not exposed(socks), f"listening beyond the loopback:\n{fmt(exposed(socks))}"
    beyond = [s for s in socks if not is_loopback(s["ip"])]
    assert all(grpc_refuses_without_token(s["port"]) for s in beyond), fmt(beyond)
    ports = {s["port"] for s in socks}
    assert {head.gcs, head.dashboard, head.client, head.node_manager, head.object_manager} <= ports
    assert head.metrics not in ports  # --metrics-export-port: the exporter is off
    served = metrics_ports(socks)
    assert not served, f"Prometheus metrics answer without a token on {served}:\n{fmt(socks)}"


def test_submitted_preprocess_pretrain_embed_jobs_succeed(head, tiny_catalog, tmp_path):
    import torch

    from htcl.config import config_from_dict
    from htcl.model import HTCLModel
    from htcl.pipeline import model_version
    from htcl.training import TrainState, build_optimizer, save_checkpoint

    out = tmp_path / "out"
    ov = [*TINY_MODEL, "audio.max_seconds=3", f"output_dir={out}"]
    status, logs, cli = head.submit(
        "htcl_preprocess_" + secrets.token_hex(4),
        ["python", "-m", "ray_jobs.preprocess", "--config", "configs/demo.yaml", *ov, "--catalog", str(tiny_catalog)],
    )
    assert status == "SUCCEEDED", logs[-4000:]
    # The job ran the venv's python on the uploaded copy of the repo, not on this checkout.
    # (`ray job submit` shell-quotes each entrypoint word, so no `&&` chains there.)
    banner = re.search(r"^htcl job preprocess: python=(\S+) code=(\S+) ray=(\S+)", logs, re.MULTILINE)
    assert banner, logs[-3000:]
    assert Path(banner[1]).parent == VENV_BIN  # `python` on the job's PATH is the venv's
    assert banner[2].startswith(head.temp_dir)  # the uploaded copy, not this checkout
    # Ray's address of this node: 127.0.0.1 (with LOOPBACK_RAY_ENV, `ray start` keeps
    # --node-ip-address=127.0.0.1 instead of rewriting it to the host's IP).
    assert banner[3] == f"127.0.0.1:{head.gcs}"
    assert re.search(r"^preprocess: 12 processed, 1 quarantined, [0-9.]+ songs/s", logs, re.MULTILINE), logs[-2000:]
    mels = pq.read_table(sorted((out / "mels").glob("*.parquet"))).to_pandas()
    assert sorted(mels.song_id) == list(range(1, 13))
    q = pq.read_table(sorted((out / "quarantine").glob("*.parquet"))).to_pandas()
    assert q.song_id.tolist() == [13] and q.error_type.tolist() == ["not_audio"]

    # What was uploaded: the repo without .venv, .git or outputs (small).
    pkgs = {
        p.resolve() for p in Path(head.temp_dir).glob("session_*/runtime_resources/working_dir_files/*") if p.is_dir()
    }
    assert pkgs, "no unpacked working_dir found"
    for pkg in pkgs:
        names = {p.name for p in pkg.iterdir()}
        assert {"htcl", "ray_jobs", "configs"} <= names and not names & {".venv", ".git", "outputs"}
        size = sum(f.stat().st_size for f in pkg.rglob("*") if f.is_file())
        assert size < 30 * 1024**2, f"uploaded working dir is {size / 1e6:.1f} MB"

    if (REPO / "ray_jobs" / "pretrain.py").is_file():
        # Stage 1 on Ray Train, submitted the same way, at tiny sizes: its checkpoint feeds embed.
        status, logs, cli = head.submit(
            "htcl_pretrain_" + secrets.token_hex(4),
            [
                "python",
                "-m",
                "ray_jobs.pretrain",
                "--config",
                "configs/demo.yaml",
                *ov,
                f"data.root={tiny_catalog.parent}",
                "pretrain.batch_size=4",
                "pretrain.max_steps=2",
                "pretrain.num_workers=1",
                "pretrain.log_every=1",
                "pretrain.checkpoint_every=2",
                "pretrain.warmup_steps=1",
            ],
        )
        assert status == "SUCCEEDED", logs[-4000:]
        ckpt = out / "pretrain" / "model.pt"
        assert ckpt.is_file()
    else:  # no Ray Train job in this checkout: a freshly initialised checkpoint
        cfg = config_from_dict({}, ov)
        torch.manual_seed(0)
        model = HTCLModel(cfg.model, cfg.audio)
        ckpt = save_checkpoint(
            out / "pretrain" / "model.pt", TrainState(model, build_optimizer(model, cfg.pretrain)), cfg, "pretrain"
        )
    status, logs, cli = head.submit(
        "htcl_embed_" + secrets.token_hex(4),
        ["python", "-m", "ray_jobs.embed", "--config", "configs/demo.yaml", *ov, "--checkpoint", str(ckpt)],
    )
    assert status == "SUCCEEDED", logs[-4000:]
    emb_dir = out / "embeddings" / model_version(ckpt)
    emb = pq.read_table(sorted(emb_dir.glob("*.parquet"))).to_pandas()
    assert sorted(emb.song_id) == list(range(1, 13))
    vectors = np.stack(emb.embedding.to_numpy())
    assert vectors.shape == (12, 32) and np.allclose(np.linalg.norm(vectors, axis=1), 1, atol=1e-5)
    assert (emb_dir / "_config.yaml").is_file()
