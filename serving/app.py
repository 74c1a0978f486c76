"""Ray Serve deployments of htcl, composed by `build_app(args)`.

    Ingress (FastAPI, serving/api.py) ──▶ EmbeddingLookup  Feast online `song_embedding` (song, version)
                                      ├─▶ Matcher          matching index of the version (htcl.retrieval)
                                      ├─▶ Ranker           XGBoost CTR/CVR: Feast online stats + the version's vectors
                                      └─▶ Encoder          optional: uploaded audio -> log-Mel -> model

One model version per app: `build_app` resolves it once (the `model_version` argument, else the
store's `current_model_version` pointer written by `htcl materialize`) and hands the same name to
every deployment, which loads that version's index, rankers and checkpoint in its constructor.
A new version is rolled out by deploying the app again with the new version (`serve deploy` /
`serve run` / `htcl serve`): Serve starts the new replicas, routes to them once they are healthy
and lets the old ones finish what they hold (graceful shutdown), so no in-flight request fails.

Overload: every deployment bounds `max_ongoing_requests` (per replica) and `max_queued_requests`
(per caller), so excess load is answered 503 at once instead of queueing without bound; the HTTP
proxy's `request_timeout_s` and the ingress's own per-call deadline bound a request's time. The
ingress's bounds are wide (it holds no real work; see Ingress) and a request reaches it with its
body in (serving/gate.py), so neither slow clients nor a crowd of /healthz probes fill it.
The ingress tries a call up to CALL_ATTEMPTS times when the replica it went to died (idempotent
reads), so a killed replica costs latency, not answers, while Serve replaces it.

Args (a dict: the `args:` of serving/config.yaml, or built by `htcl serve`):
    config: htcl YAML config (default configs/demo.yaml)   overrides: [dotted k=v, ...]
    model_version: default the store's current one
    online_store: redis://... (default $HTCL_ONLINE_STORE, else SQLite)
    encoder: auto | true | false (auto: when the checkpoint's version is the served one)
    checkpoint: default the config's stage-2 checkpoint (<output_dir>/finetune[_<backbone>]/model.pt)
    api_key_sha256: the SHA-256 (hex) of the API key: all the ingress gets (`htcl serve` computes it
        from $HTCL_API_KEY and starts Ray without the key); else api_key_env's variable, read where the
        app is built (default HTCL_API_KEY; neither = no auth)
    max_upload_mb (20), max_json_kb (64), body_timeout_s (5), upload_timeout_s (30), max_uploads (8):
        serving/gate.py's body limits; max_k (1000), max_candidates (1000), timeout_s (5)
    replicas: {ingress: 1, lookup: 1, matcher: 1, ranker: 1, encoder: 1}
"""

from __future__ import annotations

import asyncio
import logging
import os
import re
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from ray import serve
from ray.serve.config import BackpressureConfig

from htcl import schema as S
from htcl.layout import Layout
from serving.api import ApiError, ApiSettings, create_api, error_for_unknown, jsonable, key_digest
from serving.gate import BodyLimits

log = logging.getLogger("ray.serve")
REPO = Path(__file__).resolve().parents[1]
APP_NAME = "htcl"
API_KEY_ENV = "HTCL_API_KEY"


# --- arguments ---------------------------------------------------------------------------------


def _path(p: str | Path) -> Path:
    """A relative path from the caller's folder, else from the repo (Serve's build task may run elsewhere)."""
    p = Path(p).expanduser()
    if p.is_absolute() or p.exists():
        return p.resolve()
    return (REPO / p).resolve() if (REPO / p).exists() else p.resolve()


@dataclass(frozen=True)
class AppPlan:
    """Everything the deployments need, resolved once in the driver / build task."""

    model_version: str
    feast_dir: Path
    online_store: str
    index_dir: Path
    rankers_dir: Path
    checkpoint: Path | None  # None: no cold-start encoder
    api: ApiSettings
    timeout_s: float = 5.0
    replicas: dict = field(default_factory=dict)


def body_limits(args: dict) -> BodyLimits:
    """The body gate's limits from the app's args (the same in the ingress and, via `htcl serve`, the proxy)."""
    d = BodyLimits()
    return BodyLimits(
        max_json_bytes=int(float(args.get("max_json_kb", d.max_json_bytes / 1024)) * 1024),
        max_upload_bytes=int(float(args.get("max_upload_mb", d.max_upload_bytes / 2**20)) * 2**20),
        body_timeout_s=float(args.get("body_timeout_s", d.body_timeout_s)),
        upload_timeout_s=float(args.get("upload_timeout_s", d.upload_timeout_s)),
        max_uploads=int(args.get("max_uploads", d.max_uploads)),
    )


def api_key_sha256(args: dict) -> str | None:
    """The key's digest: the `api_key_sha256` arg, else the SHA-256 of api_key_env's variable, else None."""
    given = args.get("api_key_sha256")
    if given:
        if not re.fullmatch(r"[0-9a-f]{64}", str(given)):
            raise ValueError("api_key_sha256 must be 64 lowercase hex digits (the SHA-256 of the key), not the key")
        return str(given)
    key = os.environ.get(args.get("api_key_env") or API_KEY_ENV) or None
    return key_digest(key) if key else None


def plan(args: dict | None = None) -> AppPlan:
    from htcl.config import load_config

    args = dict(args or {})
    cfg = load_config(str(_path(args.get("config") or "configs/demo.yaml")), list(args.get("overrides") or []))
    layout = Layout(_path(cfg.output_dir))
    from feature_repo.store import online_store_url  # the argument, else $HTCL_ONLINE_STORE, else "" (SQLite)

    feast_dir = layout.feast

    online_store = online_store_url(None if args.get("online_store") is None else str(args["online_store"]))
    version = args.get("model_version")
    if not version:
        from feature_repo.store import read_current_version

        version = read_current_version(feast_dir, online_store)
        if not version:
            raise FileNotFoundError(
                f"no current model version in {feast_dir}: run `htcl materialize` first (or pass model_version)"
            )
    index_dir = layout.index(version)
    if not (index_dir / "index.json").is_file():
        emb = layout.embeddings(version)
        if not any(emb.glob("part-*.parquet")):
            raise FileNotFoundError(f"no ANN index in {index_dir} and no embeddings in {emb}: run `htcl embed` first")
        from htcl.retrieval import build_index_from_embeddings

        log.info("no ANN index for %s: building it from %s", version, emb)
        build_index_from_embeddings(emb, layout.index_root, cfg.index)
    rankers_dir = layout.rankers(version)
    if not (rankers_dir / "rankers.json").is_file():
        raise FileNotFoundError(
            f"no rankers for model version {version} in {rankers_dir}: run `htcl train-rankers` first"
        )

    encoder = str(args.get("encoder", "auto")).lower()
    from htcl.pipeline import run_dir_name

    checkpoint = _path(args.get("checkpoint") or layout.checkpoint(run_dir_name(cfg, "finetune")))
    if encoder in ("false", "0", "no", "off"):
        checkpoint = None
    else:
        from htcl.pipeline import model_version as version_of

        found = version_of(checkpoint) if checkpoint.is_file() else None
        if found != version:
            if encoder != "auto":
                raise ValueError(f"encoder: checkpoint {checkpoint} is model version {found}, the app serves {version}")
            log.info("cold-start encoder off: %s is version %s, the app serves %s", checkpoint, found, version)
            checkpoint = None
    limits = body_limits(args)
    api = ApiSettings(
        api_key_sha256=api_key_sha256(args),
        max_k=int(args.get("max_k", 1000)),
        max_candidates=int(args.get("max_candidates", 1000)),
        max_upload_bytes=limits.max_upload_bytes,
        max_json_bytes=limits.max_json_bytes,
        body_timeout_s=limits.body_timeout_s,
        upload_timeout_s=limits.upload_timeout_s,
        max_uploads=limits.max_uploads,
        encoder=checkpoint is not None,
        model_version=version,
    )
    return AppPlan(
        version,
        feast_dir,
        online_store,
        index_dir,
        rankers_dir,
        checkpoint,
        api,
        float(args.get("timeout_s", 5.0)),
        dict(args.get("replicas") or {}),
    )


# --- deployments -------------------------------------------------------------------------------

# Queue bounds: a replica holds max_ongoing_requests, each caller queues at most
# max_queued_requests more, then answers 503 (BackPressureError). They are sized to the work:
# the single-threaded Ranker (~10 ms of work a request: Feast stats of 100 rows, two boosters) holds 4 and queues 16,
# i.e. about half a second of work, not an unbounded backlog that would time out anyway.
# Batches (lookup, matcher) start at once with what is queued (batch_wait_timeout_s=0): under
# load the next batch fills while one runs, so waiting would only add latency at low load.
# Shared by every deployment: health checks, graceful drains, surge during rollouts.
COMMON = dict(
    health_check_period_s=10,
    health_check_timeout_s=30,
    graceful_shutdown_wait_loop_s=1,
    graceful_shutdown_timeout_s=15,
    max_surge_percent=100,
)  # a new version: old replicas serve until the new ones are ready


class _Worker:
    """One thread per replica for blocking work (Feast's SQLite connection, faiss, XGBoost, torch),
    so the replica's event loop stays free to collect batches and answer health checks."""

    def _init_worker(self):
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix=type(self).__name__)

    async def _run(self, fn, *args):
        return await asyncio.get_running_loop().run_in_executor(self._pool, fn, *args)


@serve.deployment(max_ongoing_requests=64, max_queued_requests=64, ray_actor_options={"num_cpus": 0.2}, **COMMON)
class EmbeddingLookup(_Worker):
    """song id -> its embedding of the served version, from the Feast online store.

    Batched: concurrent lookups become one `get_online_features` call (Feast's per-call overhead,
    not the per-row cost, dominates a one-song read)."""

    def __init__(self, feast_dir: str, online_store: str, model_version: str):
        from feature_repo.store import open_store

        self._init_worker()
        self.version = model_version
        self.store = open_store(feast_dir, online_store)
        self._read([0])  # load the registry and open the connection now, not on the first request

    def _read(self, song_ids: list[int]) -> list:
        rows = [{"song_id": int(s), "model_version": self.version} for s in song_ids]
        return self.store.get_online_features(features=["song_embedding:embedding"], entity_rows=rows).to_dict()[
            "embedding"
        ]

    @serve.batch(max_batch_size=32, batch_wait_timeout_s=0.0)
    async def _lookup(self, song_ids: list[int]) -> list:
        return await self._run(self._read, song_ids)

    async def get(self, song_id: int) -> dict | None:
        vec = await self._lookup(int(song_id))
        return None if vec is None else {"song_id": int(song_id), "model_version": self.version, "embedding": vec}

    async def ping(self) -> dict:
        return {"model_version": self.version}

    async def check_health(self):
        await asyncio.wait_for(self._run(self._read, [0]), 20)


@serve.deployment(max_ongoing_requests=32, max_queued_requests=32, ray_actor_options={"num_cpus": 0.2}, **COMMON)
class Matcher(_Worker):
    """Nearest songs by cosine in the version's matching index. Batched: one faiss search per batch."""

    def __init__(self, index_dir: str, model_version: str, threads: int = 1):
        import faiss

        from htcl.retrieval import AnnIndex

        self._init_worker()
        faiss.omp_set_num_threads(threads)  # one core per replica: no OpenMP fan-out per query
        self.index = AnnIndex.load(index_dir, model_version)
        self.version = model_version

    def _search(self, queries: np.ndarray, k: int):
        return self.index.search(queries, k)

    @serve.batch(max_batch_size=16, batch_wait_timeout_s=0.0)
    async def _batch(self, items: list[tuple[np.ndarray, int]]) -> list:
        k = max(kk for _, kk in items)
        ids, scores = await self._run(self._search, np.stack([q for q, _ in items]), k)
        return [(ids[i, :kk], scores[i, :kk]) for i, (_, kk) in enumerate(items)]

    async def similar(self, song_id: int, k: int) -> dict | None:
        """The k nearest songs, the song itself left out; None for a song the index lacks."""
        if int(song_id) not in self.index:
            return None
        ids, scores = await self._batch((self.index.vector(song_id), int(k) + 1))
        keep = (ids != int(song_id)) & np.isfinite(scores)
        return {"model_version": self.version, "ids": ids[keep][:k], "scores": scores[keep][:k]}

    async def search(self, vector: np.ndarray, k: int) -> dict:
        ids, scores = await self._batch((np.asarray(vector, dtype=np.float32), int(k)))
        keep = np.isfinite(scores)
        return {"model_version": self.version, "ids": ids[keep], "scores": scores[keep]}

    async def ping(self) -> dict:
        return {"model_version": self.version, "songs": len(self.index), "dim": self.index.dim}

    def check_health(self):
        if len(self.index) == 0:
            raise RuntimeError("empty index")


@serve.deployment(max_ongoing_requests=4, max_queued_requests=16, ray_actor_options={"num_cpus": 0.2}, **COMMON)
class Ranker(_Worker):
    """CTR/CVR of each candidate for (listener, trigger), on the features the rankers were trained
    on (the `ranker_v1` service, same column names): song and listener stats read online from
    Feast, and the version's embeddings from its index, which holds the same vectors
    (embeddings/<V>/, what Feast materialized). Reading the 100 x D embedding arrays through
    Feast's protobuf conversion was 40% of a request (10.8 ms of Feast for ranker_v1 against 4.5 ms
    for song_stats alone, 0.2 ms from the index; 100k-song world).

    Not batched across requests: a request already brings its ~100 rows, and Feast's and XGBoost's
    cost is per row, so merging requests would add waiting and save little."""

    def __init__(self, feast_dir: str, online_store: str, rankers_dir: str, index_dir: str, model_version: str):
        from feature_repo.store import open_store
        from htcl.ranking import Rankers
        from htcl.retrieval import AnnIndex

        self._init_worker()
        self.rankers = Rankers.load(rankers_dir)
        if self.rankers.model_version not in (None, model_version):
            raise ValueError(f"{rankers_dir} holds rankers of {self.rankers.model_version}, not {model_version}")
        for booster in (self.rankers.ctr, self.rankers.cvr):
            booster.set_param({"nthread": 1})
        self.version = model_version
        self.index = AnnIndex.load(index_dir, model_version)
        self.store = open_store(feast_dir, online_store)
        service = self.store.get_feature_service("ranker_v1")
        self.song_refs = [
            f"{v.name}:{f.name}"
            for v in service.feature_view_projections
            if v.name == S.SONG_STATS_VIEW
            for f in v.features
        ]
        self.listener_refs = [
            f"{v.name}:{f.name}"
            for v in service.feature_view_projections
            if v.name == S.LISTENER_STATS_VIEW
            for f in v.features
        ]
        self._stats(0, [0])  # warm the registry and connection

    def _stats(self, user_id: int, candidates: list[int]):
        import pandas as pd

        songs = self.store.get_online_features(
            features=self.song_refs, entity_rows=[{"song_id": int(c)} for c in candidates], full_feature_names=True
        ).to_dict()
        listener = self.store.get_online_features(
            features=self.listener_refs, entity_rows=[{"user_id": int(user_id)}], full_feature_names=True
        ).to_dict()
        frame = pd.DataFrame(songs)
        for name, values in listener.items():
            if name.startswith(S.full_feature_name(S.LISTENER_STATS_VIEW, "")):
                frame[name] = [values[0]] * len(frame)  # one listener for every candidate row
        return frame

    def _rank(self, user_id: int, trigger: int, candidates: list[int]) -> dict:
        from htcl.ranking import CANDIDATE_EMBEDDING, TRIGGER_EMBEDDING

        if trigger not in self.index:
            return {"unknown": "trigger_song_id", "ids": [int(trigger)]}
        missing = [int(c) for c in candidates if c not in self.index]
        if missing:
            return {"unknown": "candidates", "ids": missing}
        frame = self._stats(user_id, candidates)
        frame[CANDIDATE_EMBEDDING] = [self.index.vector(c) for c in candidates]
        frame[TRIGGER_EMBEDDING] = [self.index.vector(trigger)] * len(candidates)
        ctr, cvr = self.rankers.predict(frame)
        return {"model_version": self.version, "ctr": ctr, "cvr": cvr}

    async def rank(self, user_id: int, trigger: int, candidates: list[int]) -> dict:
        return await self._run(self._rank, user_id, trigger, list(candidates))

    async def ping(self) -> dict:
        return {"model_version": self.version, "features": len(self.rankers.feature_names)}

    async def check_health(self):
        await asyncio.wait_for(self._run(self._stats, 0, [0]), 20)


@serve.deployment(max_ongoing_requests=2, max_queued_requests=8, ray_actor_options={"num_cpus": 0.2}, **COMMON)
class Encoder(_Worker):
    """Cold start: an audio file's bytes -> log-Mel (as preprocessing makes it), or a backbone
    model's patch features (as `htcl features` makes them) -> audio embedding."""

    def __init__(self, checkpoint: str, model_version: str):
        import torch

        from htcl.mels import MelExtractor
        from htcl.training import model_from_checkpoint

        self._init_worker()
        torch.set_num_threads(1)
        self.model, cfg, _ = model_from_checkpoint(checkpoint)
        self.cfg = cfg
        self.extractor = MelExtractor(cfg.audio)
        self.n_mels = cfg.audio.n_mels
        self.version = model_version

    def _encode(self, data: bytes) -> dict:
        from htcl.audio import load_audio
        from htcl.mels import mel_from_bytes
        from htcl.pipeline import embed_mels
        from htcl.towers import audio_input

        with tempfile.NamedTemporaryFile(prefix="htcl_upload_") as f:
            f.write(data)
            f.flush()
            row, bad = self.extractor.extract_one(0, f.name)  # decodes and validates the upload
            if row is not None and self.model.audio.backbone is not None:
                # a backbone model reads the locked tagger's patch features, computed as training's cache was
                wave = load_audio(f.name, self.cfg.audio.sample_rate, self.cfg.audio.max_seconds)
                x = audio_input(self.model, self.cfg.audio, wave)
        if row is None:
            return {"error": bad["error_type"], "message": bad["message"].replace(f.name, "upload")}
        if self.model.audio.backbone is None:
            x = mel_from_bytes(row["mel"], self.n_mels, row["n_frames"])
        vec = embed_mels(self.model, [x])[0]
        return {"model_version": self.version, "embedding": vec, "frames": row["n_frames"]}

    async def encode(self, data: bytes) -> dict:
        return await self._run(self._encode, data)

    async def ping(self) -> dict:
        return {"model_version": self.version}


# --- ingress -----------------------------------------------------------------------------------


CALL_ATTEMPTS = 3  # a replica's death is retried twice: Serve routes the retry to a live replica


class Overloaded(ApiError):
    """A deployment's queue is full (Serve's BackPressureError): 503, retry later."""

    def __init__(self):
        super().__init__(503, None, "overloaded: retry later", {"Retry-After": "1"})


# How long one round of health pings answers /healthz: a crowd of probes costs one round, not one each.
HEALTH_TTL_S = 1.0


class ServeBackend:
    """The API's backend inside the ingress replica: calls to the other deployments' handles."""

    def __init__(self, lookup, matcher, ranker, encoder, timeout_s: float, model_version: str = ""):
        self.lookup, self.matcher, self.ranker, self.encoder = lookup, matcher, ranker, encoder
        self.timeout_s, self.model_version = timeout_s, model_version
        self._health: dict | None = None
        self._health_at = 0.0
        self._health_round: asyncio.Future | None = None

    async def _call(self, handle, method: str, *args):
        """One deployment call with a deadline; tried again (CALL_ATTEMPTS in all, a short pause
        between) when its replica died under it."""
        from ray.exceptions import ActorDiedError, ActorUnavailableError, RayActorError
        from ray.serve.exceptions import BackPressureError, DeploymentUnavailableError

        for attempt in range(CALL_ATTEMPTS):
            response = getattr(handle, method).remote(*args)
            try:
                return await asyncio.wait_for(_wait(response), self.timeout_s)
            except BackPressureError:
                raise Overloaded() from None
            except asyncio.TimeoutError:
                response.cancel()
                raise ApiError(504, None, f"no answer within {self.timeout_s} s") from None
            except (ActorDiedError, ActorUnavailableError, RayActorError, DeploymentUnavailableError):
                if attempt == CALL_ATTEMPTS - 1:
                    raise ApiError(503, None, "a replica is restarting: retry", {"Retry-After": "1"}) from None
                await asyncio.sleep(0.05 * (attempt + 1))

    async def embedding(self, song_id: int) -> dict:
        got = await self._call(self.lookup, "get", song_id)
        if got is None:
            raise error_for_unknown("song_id", [song_id])
        return got

    async def similar(self, song_id: int, k: int) -> dict:
        got = await self._call(self.matcher, "similar", song_id, k)
        if got is None:
            raise error_for_unknown("song_id", [song_id])
        return {
            "song_id": song_id,
            "model_version": got["model_version"],
            "k": k,
            "similar": [{"song_id": int(i), "score": round(float(s), 6)} for i, s in zip(got["ids"], got["scores"])],
        }

    async def _scores(self, user_id: int, trigger: int, candidates: list[int]) -> dict:
        got = await self._call(self.ranker, "rank", user_id, trigger, candidates)
        if "unknown" in got:
            raise error_for_unknown(got["unknown"], got["ids"])
        return got

    async def rank(self, user_id: int, trigger_song_id: int, candidates: list[int]) -> dict:
        got = await self._scores(user_id, trigger_song_id, candidates)
        results = [
            {"song_id": int(c), "ctr": float(a), "cvr": float(b), "score": float(a * b)}
            for c, a, b in zip(candidates, got["ctr"], got["cvr"])
        ]
        results.sort(key=lambda r: -r["score"])
        return {
            "user_id": user_id,
            "trigger_song_id": trigger_song_id,
            "model_version": got["model_version"],
            "results": results,
        }

    async def recommend(self, user_id: int, trigger_song_id: int, k: int, candidates: int) -> dict:
        """Matching (the trigger's `candidates` nearest songs), then ranking by CTR x CVR; top k."""
        matched = await self._call(self.matcher, "similar", trigger_song_id, candidates)
        if matched is None:
            raise error_for_unknown("trigger_song_id", [trigger_song_id])
        ids = [int(i) for i in matched["ids"]]
        if not ids:
            return {
                "user_id": user_id,
                "trigger_song_id": trigger_song_id,
                "model_version": matched["model_version"],
                "recommendations": [],
            }
        got = await self._scores(user_id, trigger_song_id, ids)
        recs = [
            {"song_id": i, "similarity": round(float(s), 6), "ctr": float(a), "cvr": float(b), "score": float(a * b)}
            for i, s, a, b in zip(ids, matched["scores"], got["ctr"], got["cvr"])
        ]
        recs.sort(key=lambda r: -r["score"])
        return {
            "user_id": user_id,
            "trigger_song_id": trigger_song_id,
            "model_version": got["model_version"],
            "matching_model_version": matched["model_version"],
            "candidates": len(ids),
            "recommendations": recs[:k],
        }

    async def embed_audio(self, data: bytes, k: int) -> dict:
        got = await self._call(self.encoder, "encode", data)
        if "error" in got:
            status = 415 if got["error"] in ("not_audio", "unsupported") else 422
            raise ApiError(status, "body", f"{got['error']}: {got['message']}")
        out = {"model_version": got["model_version"], "embedding": jsonable(got["embedding"])}
        if k:
            near = await self._call(self.matcher, "search", got["embedding"], k)
            out["similar"] = [
                {"song_id": int(i), "score": round(float(s), 6)} for i, s in zip(near["ids"], near["scores"])
            ]
        return out

    async def health(self) -> dict:
        """Every deployment answers a ping (or is busy shedding load: alive). Concurrent probes share
        one round of pings, and a round's answer serves for HEALTH_TTL_S."""
        if self._health is not None and time.monotonic() - self._health_at < HEALTH_TTL_S:
            return self._health
        if self._health_round is None:
            self._health_round = asyncio.ensure_future(self._ping_all())
            self._health_round.add_done_callback(self._round_done)
        return await asyncio.shield(self._health_round)

    def _round_done(self, round_: asyncio.Future) -> None:
        self._health_round = None
        if not round_.cancelled() and round_.exception() is None:
            self._health, self._health_at = round_.result(), time.monotonic()

    async def _ping_all(self) -> dict:
        parts = {"lookup": self.lookup, "matcher": self.matcher, "ranker": self.ranker}
        if self.encoder is not None:
            parts["encoder"] = self.encoder
        answers = await asyncio.gather(*(self._ping(h) for h in parts.values()))
        got = dict(zip(parts, answers))
        version = got["matcher"].get("model_version", self.model_version)
        return {"status": "ok", "model_version": version, "deployments": jsonable(got)}

    async def _ping(self, handle) -> dict:
        try:
            return await self._call(handle, "ping")
        except Overloaded:  # its queue is full: busy serving, not down
            return {"busy": True}


async def _wait(response):
    return await response


# The ingress only validates and waits on the other deployments, which bound the real work with
# their own queues (and shed it with our JSON 503); a request reaches it with its body already in
# (serving/gate.py in the proxy). So its bounds are wider than the work's: a crowd of 200 /healthz
# probes must find room. Not wider: at 1024/256 a 1000/s burst on /recommend filled its one event
# loop, and answers came as 408s after 23 s instead of 503s at once. Serve's own 503 past them carries
# Retry-After (backpressure_config); the proxy gate turns its text/plain body into our JSON one.
@serve.deployment(
    max_ongoing_requests=128,
    max_queued_requests=128,
    ray_actor_options={"num_cpus": 0.2},
    backpressure_config=BackpressureConfig(retry_after_s=1),
    **COMMON,
)
@serve.ingress()
class Ingress:
    """The HTTP front (serving/api.py) over the other deployments."""

    def __init__(self, lookup, matcher, ranker, encoder, api: ApiSettings, timeout_s: float = 5.0):
        self.api = api
        self.backend = ServeBackend(lookup, matcher, ranker, encoder, timeout_s, api.model_version)

    def __serve_build_asgi_app__(self):
        return create_api(self.backend, self.api)

    async def check_health(self):
        return None


# The Ranker does the most work per request (Feast stats of ~100 rows + two boosters, one thread):
# two replicas keep /rank and /recommend off a single replica's queue.
DEFAULT_REPLICAS = {"ranker": 2}


def _options(p: AppPlan, name: str) -> dict[str, Any]:
    n = int(p.replicas.get(name, DEFAULT_REPLICAS.get(name, 1)))
    return {"num_replicas": n}


def build_app(args: dict | None = None):
    """The htcl Serve application: `serve.run(build_app({...}))`, or `import_path: serving.app:build_app`."""
    p = plan(args)
    lookup = EmbeddingLookup.options(**_options(p, "lookup")).bind(str(p.feast_dir), p.online_store, p.model_version)
    matcher = Matcher.options(**_options(p, "matcher")).bind(str(p.index_dir), p.model_version)
    ranker = Ranker.options(**_options(p, "ranker")).bind(
        str(p.feast_dir), p.online_store, str(p.rankers_dir), str(p.index_dir), p.model_version
    )
    encoder = None
    if p.checkpoint is not None:
        encoder = Encoder.options(**_options(p, "encoder")).bind(str(p.checkpoint), p.model_version)
    log.info(
        "htcl app: model_version %s, encoder %s, auth %s",
        p.model_version,
        "on" if encoder else "off",
        "on" if p.api.api_key_sha256 else "off",
    )
    return Ingress.options(**_options(p, "ingress")).bind(lookup, matcher, ranker, encoder, p.api, p.timeout_s)
