"""Open the htcl feature store for a run's feature data folder, with SQLite or Redis online.

    store = open_store("outputs/demo/feast")                      # SQLite online store
    store = open_store("outputs/demo/feast", "redis://127.0.0.1:6379/0")
    apply_definitions(store, "outputs/demo/feast", embed_dim=128)

The online store is Redis when `online_store` (or the HTCL_ONLINE_STORE environment variable) is
a redis:// URL, else what feature_store.yaml says (SQLite). The offline sources live in the data
folder; relative paths in feature_store.yaml (registry, SQLite file) are resolved against the
online store's own state folder, `state_dir(data_dir, online_store)`.
"""

from __future__ import annotations

import os
from pathlib import Path
from urllib.parse import urlparse

import yaml
from feast import FeatureStore
from feast.repo_config import RepoConfig

REPO_DIR = Path(__file__).resolve().parent
ONLINE_STORE_ENV = "HTCL_ONLINE_STORE"


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
    path = Path(data_dir).resolve() / "online" / name
    path.mkdir(parents=True, exist_ok=True)
    return path


def repo_config(data_dir: str | Path, online_store: str | None = None) -> RepoConfig:
    url = online_store_url(online_store)
    base = state_dir(data_dir, url)
    raw = yaml.safe_load(os.path.expandvars((REPO_DIR / "feature_store.yaml").read_text()))
    registry = raw.get("registry")
    if isinstance(registry, str):
        raw["registry"] = _local(registry, base)
    elif isinstance(registry, dict) and registry.get("registry_type", "file") == "file":
        registry["path"] = _local(registry["path"], base)
    if url:
        raw["online_store"] = redis_online_store(url)
    elif raw.get("online_store", {}).get("type") == "sqlite":
        raw["online_store"]["path"] = _local(raw["online_store"]["path"], base)
    config = RepoConfig(**raw)
    config.repo_path = REPO_DIR
    return config


def open_store(data_dir: str | Path, online_store: str | None = None) -> FeatureStore:
    return FeatureStore(repo_path=str(REPO_DIR), config=repo_config(data_dir, online_store))


def apply_definitions(store: FeatureStore, data_dir: str | Path, embed_dim: int) -> dict[str, object]:
    """Register entities, feature views and services whose sources live in data_dir."""
    from feature_repo.definitions import definitions

    objects = definitions(data_dir, embed_dim)
    store.apply(list(objects.values()))
    return objects
