"""Open the htcl feature store for a run's feature data folder, with SQLite or Redis online.

    store = open_store("outputs/demo/feast")                      # SQLite online store
    store = open_store("outputs/demo/feast", "redis://127.0.0.1:6379/0")
    apply_definitions(store, "outputs/demo/feast", embed_dim=128)
    with publish_lock("outputs/demo/feast"): ...                  # one publish at a time

The online store is Redis when `online_store` (or the HTCL_ONLINE_STORE environment variable) is
a redis:// URL, else what feature_store.yaml says (SQLite). The offline sources live in the data
folder; relative paths in feature_store.yaml (registry, SQLite file) are resolved against the
online store's own state folder, `state_dir(data_dir, online_store)`.

Every file of a store is replaced whole (`htcl.files.write_atomically`: a unique temporary name, then a
rename), the local registry included (`AtomicFileRegistryStore`), so a reader or an interrupted
writer never meets a torn file; `publish_lock` makes publishes into one data folder take turns.
"""

from __future__ import annotations

import os
import sys
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from urllib.parse import urlparse

import yaml
from feast import FeatureStore
from feast.infra.registry.file import FileRegistryStore
from feast.repo_config import RepoConfig

from htcl.files import PARTIAL_SUFFIX, write_atomically

REPO_DIR = Path(__file__).resolve().parent
ONLINE_STORE_ENV = "HTCL_ONLINE_STORE"
ONLINE_STATES = "online"  # <data_dir>/online/<store>/: one state folder per online store
PUBLISH_LOCK = ".publish.lock"


class StoreConfigError(ValueError):
    pass


def redis_online_store(url: str) -> dict:
    """redis://[:password@]host:port[/db] -> Feast's Redis online store section."""
    parsed = urlparse(url)
    if parsed.scheme not in ("redis", "rediss") or not parsed.hostname:
        raise StoreConfigError(f"{ONLINE_STORE_ENV}={url!r}: expected redis://HOST:PORT[/DB]")
    parts = [f"{parsed.hostname}:{parsed.port or 6379}"]
    db = parsed.path.strip("/")
    if db:
        if not db.isdigit():
            raise StoreConfigError(f"{ONLINE_STORE_ENV}={url!r}: database must be a number, got {db!r}")
        parts.append(f"db={db}")
    if parsed.password:
        parts.append(f"password={parsed.password}")
    if parsed.scheme == "rediss":
        parts.append("ssl=true")
    return {"type": "redis", "connection_string": ",".join(parts)}


def remove_partial_files(folder: Path) -> list[str]:
    """Delete what killed writers left in `folder` (write_atomically's hidden *.partial files: never
    read, but not removed by the writer that died); only safe under `publish_lock`."""
    left = sorted(folder.glob(f"*{PARTIAL_SUFFIX}"))
    for path in left:
        path.unlink(missing_ok=True)
    return [p.name for p in left]


@contextmanager
def publish_lock(data_dir: str | Path) -> Iterator[Path]:
    """Exclusive while held, for every process that publishes into this feature data folder (its
    offline sources, and the registry, markers and SQLite file of each of its online stores).

    An OS lock (flock) on `<data_dir>/.publish.lock`: the kernel releases it when its holder
    exits, however it exits, so a killed publish never leaves the store locked. A filesystem
    without flock is an error rather than a weaker lock. It covers the processes that see this
    folder: one machine, or a shared filesystem whose flock works across machines."""
    from filelock import FileLock, Timeout

    path = Path(data_dir).resolve() / PUBLISH_LOCK
    path.parent.mkdir(parents=True, exist_ok=True)
    lock = FileLock(path, fallback_to_soft=False)
    try:
        lock.acquire(timeout=0)
    except Timeout:
        print(f"another publish holds {path}: waiting for it to finish", file=sys.stderr, flush=True)
        lock.acquire()
    try:
        yield path
    finally:
        lock.release()


class AtomicFileRegistryStore(FileRegistryStore):
    """Feast's local file registry, rewritten by rename instead of in place: Feast's own store
    truncates registry.db and writes it again, so a reader meanwhile, or a writer killed
    midway, finds a torn registry that every later open fails on."""

    def _write_registry(self, registry_proto) -> None:
        from feast.utils import _utc_now

        registry_proto.version_id = str(uuid.uuid4())
        registry_proto.last_updated.FromDatetime(_utc_now())
        self._filepath.parent.mkdir(parents=True, exist_ok=True)
        data = registry_proto.SerializeToString()
        write_atomically(self._filepath, lambda tmp: tmp.write_bytes(data), fsync=True)


ATOMIC_REGISTRY_STORE = f"{AtomicFileRegistryStore.__module__}.{AtomicFileRegistryStore.__name__}"


def _local(path: str, base: Path) -> str:
    return path if "://" in path or Path(path).is_absolute() else str(base / path)


def online_store_url(online_store: str | None = None) -> str:
    """The Redis URL in effect ("" = the feature_store.yaml online store, SQLite by default)."""
    return online_store if online_store is not None else os.environ.get(ONLINE_STORE_ENV, "")


def state_dir(data_dir: str | Path, online_store: str | None = None) -> Path:
    """Where the state of one online store lives: the registry (with its materialization
    intervals), the SQLite file, and htcl's markers (materialized versions, current version).
    One folder per online store, so publishing to Redis after SQLite starts from scratch."""
    url = online_store_url(online_store)
    if not url:
        name = "sqlite"
    else:
        p = urlparse(url)
        name = f"redis-{p.hostname}-{p.port or 6379}-{p.path.strip('/') or '0'}"
    path = Path(data_dir).resolve() / ONLINE_STATES / name
    path.mkdir(parents=True, exist_ok=True)
    return path


CURRENT_VERSION = "current_model_version"  # in a state folder: the version readers of that store use


def read_current_version(data_dir: str | Path, online_store: str | None = None) -> str | None:
    """The model version readers of this online store use (None before the first publish)."""
    path = state_dir(data_dir, online_store) / CURRENT_VERSION
    return path.read_text().strip() if path.is_file() else None


def write_current_version(data_dir: str | Path, online_store: str | None, version: str) -> None:
    """Name `version` current for this online store, by rename: a reader sees the old or the new
    name, never a torn one. The one writer of the pointer (publishes, and serving's synthetic world)."""
    pointer = state_dir(data_dir, online_store) / CURRENT_VERSION
    write_atomically(pointer, lambda tmp: tmp.write_text(version + "\n"), fsync=True)


def state_dirs(data_dir: str | Path) -> list[Path]:
    """The state folders of every online store this data folder has published to."""
    return sorted(p for p in (Path(data_dir).resolve() / ONLINE_STATES).glob("*") if p.is_dir())


def set_aside_unreadable_registry(config: RepoConfig) -> Path | None:
    """A local registry file that does not parse (torn by a writer killed midway, before
    AtomicFileRegistryStore) is renamed `<name>.unreadable-<time>`, so that opening the store
    starts an empty registry for the publish to fill again; returns the new name."""
    from feast.protos.feast.core.Registry_pb2 import Registry as RegistryProto
    from google.protobuf.message import DecodeError

    path = Path(config.registry.path)
    if "://" in config.registry.path or not path.is_file():
        return None
    try:
        RegistryProto().ParseFromString(path.read_bytes())
        return None
    except DecodeError:
        aside = path.with_name(f"{path.name}.unreadable-{int(time.time())}")
        os.replace(path, aside)
        return aside


def repo_config(data_dir: str | Path, online_store: str | None = None) -> RepoConfig:
    url = online_store_url(online_store)
    base = state_dir(data_dir, url)
    raw = yaml.safe_load(os.path.expandvars((REPO_DIR / "feature_store.yaml").read_text()))
    registry = raw.get("registry")
    if isinstance(registry, str):
        registry = raw["registry"] = {"path": registry}
    if isinstance(registry, dict) and registry.get("registry_type", "file") == "file":
        registry["path"] = _local(registry["path"], base)
        if "://" not in registry["path"] and not registry.get("registry_store_type"):
            registry["registry_store_type"] = ATOMIC_REGISTRY_STORE
    if url:
        raw["online_store"] = redis_online_store(url)
    elif raw.get("online_store", {}).get("type") == "sqlite":
        raw["online_store"]["path"] = _local(raw["online_store"]["path"], base)
    config = RepoConfig(**raw)
    config.repo_path = REPO_DIR
    # A publish marks a view MATERIALIZING while it writes (Feast 0.67), and Feast refuses to
    # serve such a view: a reader that reloads the registry then would fail until the publish
    # ends. Its last-materialized rows are whole (each version of an embedding is a key of its
    # own), so keep serving them. Set here, after validation: Feast warns about the option on any
    # registry but SQL, though its file registry honours it too.
    config.registry.serve_features_while_materializing = True
    return config


def open_store(data_dir: str | Path, online_store: str | None = None) -> FeatureStore:
    return FeatureStore(repo_path=str(REPO_DIR), config=repo_config(data_dir, online_store))


def apply_definitions(store: FeatureStore, data_dir: str | Path, embed_dim: int) -> dict[str, object]:
    """Register entities, feature views and services whose sources live in data_dir."""
    from feature_repo.definitions import definitions

    objects = definitions(data_dir, embed_dim)
    store.apply(list(objects.values()))
    return objects
