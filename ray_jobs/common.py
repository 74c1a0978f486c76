"""What every Ray job shares: arguments, config, connecting to Ray, saving the resolved config.

Connecting (`init_ray`):
- RAY_ADDRESS set (as under `ray job submit`, or by hand): `ray.init()` joins that cluster.
- otherwise: a new local Ray instance for this process only (`address="local"`, so it never
  attaches to some other `ray start` cluster found in /tmp/ray), every listener of it on 127.0.0.1
  and its Prometheus exporters off (LOOPBACK_RAY_ENV, below; the README's "What listens where").
  Ray 2.60 turns token authentication on by default for such a local instance
  (RAY_AUTH_MODE unset -> token; the token comes from RAY_AUTH_TOKEN, RAY_AUTH_TOKEN_PATH or
  ~/.ray/auth_token, generated there when missing). Set RAY_AUTH_MODE=disabled to opt out.
- already connected in this process (tests share one instance per module): reused, and left
  running when the job ends.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys
from pathlib import Path
from typing import Any, Sequence

from htcl.arguments import config_overrides
from htcl.config import Config, ConfigError, load_config, save_config

REPO = Path(__file__).resolve().parents[1]

# What `ray job submit --working-dir .` must not upload (gitignore syntax; Ray also honours
# .gitignore): the virtualenv, outputs, git objects, caches.
WORKING_DIR_EXCLUDES = [
    ".venv",
    ".git",
    "outputs",
    "runs",
    "data",
    "**/__pycache__",
    "*.egg-info",
    ".pytest_cache",
    "benchmarks/results",
    ".whl",
    ".gl",
]


# What keeps a single-node Ray 2.60 on 127.0.0.1 with no metrics served, for the processes of a
# local instance (init_ray sets them while Ray starts; a value already in the environment wins) and
# exported before `ray start --head` (README, "Running on a Ray cluster"; tests/test_ray_cluster.py).
LOOPBACK_RAY_ENV = {
    # On Linux Ray rewrites a node IP of 127.0.0.1 to the host's address
    # (services.resolve_ip_for_localhost, for `ray start --node-ip-address`, `ray.init(
    # _node_ip_address=...)` and a RAY_ADDRESS of 127.0.0.1:PORT), and gRPC servers bind 127.0.0.1
    # only when the node IP *is* 127.0.0.1, else 0.0.0.0/[::]. With this flag off (its only effects:
    # that rewrite and refusing `ray start --address` of a second node) the node IP stays 127.0.0.1:
    # GCS, raylet, object manager, every worker's and driver's gRPC server, dashboard agent,
    # runtime-env agent and Ray Client server then listen on 127.0.0.1.
    "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0",
    # The per-node Prometheus exporter (dashboard agent, --metrics-export-port): not started.
    "RAY_enable_metrics_collection": "0",
    # The dashboard's and the autoscaler's own Prometheus servers (fixed ports 44227, 44217) have no
    # switch: on a port that cannot be bound they log one exception and serve nothing.
    "DASHBOARD_METRIC_PORT": "-1",
    "AUTOSCALER_METRIC_PORT": "-1",
}


def add_ray_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--workers",
        type=int,
        default=None,
        help="parallel Ray Data actors (default: the cluster's CPUs, or its GPUs for GPU work)",
    )
    parser.add_argument(
        "--num-cpus",
        type=int,
        default=None,
        help="CPUs for a local Ray instance (default: all); ignored when joining a cluster",
    )


def parse_args(parser: argparse.ArgumentParser, argv: Sequence[str] | None) -> tuple[argparse.Namespace, Config]:
    """Parse argv, then load the config; a bad config is a one-line error and exit status 2."""
    # Intermixed: overrides may come before or after the options (`k=v --catalog P k2=v2`).
    args = parser.parse_intermixed_args(list(sys.argv[1:] if argv is None else argv))
    try:
        cfg = load_config(args.config, config_overrides(args))
    except ConfigError as e:
        parser.exit(2, f"{parser.prog}: {e}\n")
    return args, cfg


def init_ray(num_cpus: int | None = None, quiet: bool = False) -> bool:
    """Connect to Ray (see the module docstring). True when this call started a local instance,
    which the caller then shuts down."""
    import ray

    if ray.is_initialized():
        return False
    address = os.environ.get("RAY_ADDRESS")
    if address:
        # A head on 127.0.0.1 (the README's `ray start`) is reached at 127.0.0.1, not at the
        # host's address Ray would rewrite it to (harmless for a head on every interface).
        with loopback_ray(env=False):
            ray.init(address=address, log_to_driver=not quiet)
        return False
    with loopback_ray():
        ray.init(
            address="local",
            num_cpus=num_cpus,
            _node_ip_address="127.0.0.1",
            dashboard_host="127.0.0.1",
            log_to_driver=not quiet,
            # Workers import ray_jobs/htcl from this checkout as the driver does.
            runtime_env={"env_vars": {"PYTHONPATH": _pythonpath()}},
        )
    return True


@contextlib.contextmanager
def ray_connection(num_cpus: int | None = None, quiet: bool = False):
    """init_ray for the length of a with block; a local instance it started is shut down after."""
    started = init_ray(num_cpus, quiet)
    try:
        yield
    finally:
        if started:
            import ray

            ray.shutdown()


@contextlib.contextmanager
def loopback_ray(env: bool = True):
    """While Ray starts or connects: LOOPBACK_RAY_ENV in the environment its processes inherit
    (env), and this process's Ray told not to rewrite 127.0.0.1 (the flag is read once, when ray is
    imported, so it is set on the module). Both are restored afterwards; RAY_ENABLE_WINDOWS_OR_OSX_
    CLUSTER=1 in the environment opts out."""
    from ray._private import ray_constants

    saved = {k: os.environ.get(k) for k in LOOPBACK_RAY_ENV}
    flag = "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"
    saved_flag = getattr(ray_constants, "ENABLE_RAY_CLUSTER", None)
    try:
        if env:
            for k, v in LOOPBACK_RAY_ENV.items():
                os.environ.setdefault(k, v)
        if saved_flag is not None:
            ray_constants.ENABLE_RAY_CLUSTER = os.environ.get(flag, "0").lower() in ("1", "true")
        yield
    finally:
        if saved_flag is not None:
            ray_constants.ENABLE_RAY_CLUSTER = saved_flag
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def _pythonpath() -> str:
    parts = [str(REPO)] + [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p]
    return os.pathsep.join(dict.fromkeys(parts))


def cluster_resources() -> dict[str, float]:
    import ray

    return ray.cluster_resources()


def default_workers(requested: int | None, use_gpu: bool = False) -> int:
    """Actor pool size: what was asked for, else one per GPU (GPU work) or per CPU."""
    if requested:
        return max(1, int(requested))
    res = cluster_resources()
    return max(1, int(res.get("GPU", 0) if use_gpu else res.get("CPU", 1)))


def limit_torch_threads(n: int = 1) -> None:
    """One intra-op thread per actor: N single-threaded actors on N cores, not N x N threads."""
    import torch

    torch.set_num_threads(max(1, n))
    try:
        torch.set_num_interop_threads(1)
    except RuntimeError:  # already set, or parallel work already ran in this process
        pass


def save_resolved_config(cfg: Config, directory: str | Path, name: str = "config.yaml") -> Path:
    """The resolved config (file + overrides) beside an output, as the local pipeline does."""
    return save_config(cfg, Path(directory) / name)


def job_banner(name: str) -> None:
    """One line saying which python and which copy of the code run this job, and on which Ray."""
    import ray

    ctx = ray.get_runtime_context()
    print(
        f"htcl job {name}: python={sys.executable} code={REPO} ray={ctx.gcs_address} "
        f"cpus={cluster_resources().get('CPU', 0):g} gpus={cluster_resources().get('GPU', 0):g}",
        flush=True,
    )


def print_summary(summary: dict[str, Any]) -> None:
    print(json.dumps(summary, indent=2), flush=True)


NODE_ID = "node_id"  # a result column that names the Ray node a row was computed on


def current_node_id() -> str:
    """The hex id of the Ray node this task or actor runs on ("" outside Ray)."""
    import ray

    return ray.get_runtime_context().get_node_id() if ray.is_initialized() else ""


def count_by_node(node_ids) -> dict[str, int]:
    """{node id: rows} of a result's node_id column: which nodes did the work (job summaries)."""
    counts: dict[str, int] = {}
    for node in node_ids:
        counts[node] = counts.get(node, 0) + 1
    return counts


def ray_start_on_loopback(argv: Sequence[str]) -> None:
    """Ray's own `ray start ARGV` for one more node on this machine, every listener of it on 127.0.0.1.

    Ray 2.60 refuses `ray start --address` (any node but the head) while
    RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0, the LOOPBACK_RAY_ENV setting that keeps a node's IP at
    127.0.0.1; with the flag on it rewrites 127.0.0.1, both the node's and the head's address, to the
    host's (services.resolve_ip_for_localhost), and the node then binds every interface and looks for
    the head there. Here only the refusal is lifted: `ray start` reads the flag for its check from
    its own module's `ray_constants`, replaced by a view with the flag on, while the address
    handling (ray._private.services) reads the real module, where it stays off. Everything else is
    `ray start` unchanged: the same options, the same `--block`, the same process tree.
    LOOPBACK_RAY_ENV is set for the node's processes (a value already exported wins); with the flag
    exported as 1 this is plain `ray start`.
    """
    import types

    for k, v in LOOPBACK_RAY_ENV.items():
        os.environ.setdefault(k, v)  # before ray is imported: ray_constants reads them then
    import ray._private.ray_constants as ray_constants
    import ray.scripts.scripts as ray_scripts

    class _JoinAllowed(types.ModuleType):
        def __getattr__(self, name: str) -> Any:
            return getattr(ray_constants, name)

    view = _JoinAllowed("ray_constants_join_allowed")
    view.ENABLE_RAY_CLUSTER = True
    ray_scripts.ray_constants = view
    sys.argv = ["ray", "start", *argv]
    ray_scripts.main()


if __name__ == "__main__":
    # python -m ray_jobs.common ray-start --address=127.0.0.1:PORT [ray start options]
    if sys.argv[1:2] != ["ray-start"]:
        sys.exit(
            "usage: python -m ray_jobs.common ray-start --address=127.0.0.1:PORT [ray start options]\n"
            "(`ray start` of one more node on this machine, on 127.0.0.1; see ray_start_on_loopback)"
        )
    ray_start_on_loopback(sys.argv[2:])
