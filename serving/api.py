"""The HTTP API (FastAPI), apart from Ray: routes, validation, auth and error bodies.

`create_api(backend, settings)` builds the app the Serve ingress deployment serves; the backend is
any object with the async methods of `Backend` (in Serve: calls to the other deployments), so the
API is tested with FastAPI's TestClient and a fake backend, without Ray.

Errors are JSON, always `{"error": {"field": <name or null>, "message": <text>}}`:
    400 malformed JSON          401 missing/wrong bearer key     404 unknown song or route
    408 body not in by its deadline                              413 body or upload over its cap
    415 not audio               422 a field out of range / wrong type (path ids and k: digits only)
    501 cold-start encoder not deployed   503 overloaded or a replica restarting (Retry-After)
    504 the request's deadline passed inside the app
A 500 is only ever a bug: bad input never reaches it. Bodies pass serving/gate.py's BodyGate first:
a route sees a request only once its whole body is in, under its cap and deadline.
"""

from __future__ import annotations

import hashlib
import hmac
from dataclasses import dataclass, field
from typing import Any, Protocol

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict
from starlette.exceptions import HTTPException as StarletteHTTPException

from serving.gate import BodyGate, BodyLimits, error_body

AUDIO_TYPES = ("audio/", "application/octet-stream")


class ApiError(Exception):
    """An answer with a status and the field at fault (None when no single field is)."""

    def __init__(self, status: int, field: str | None, message: str, headers: dict | None = None):
        super().__init__(message)
        self.status, self.field, self.message, self.headers = status, field, message, headers or {}


def key_digest(key: str) -> str:
    """What the app keeps of the API key: its SHA-256 (the key itself never enters Serve's state)."""
    return hashlib.sha256(key.encode()).hexdigest()


@dataclass(frozen=True)
class ApiSettings:
    api_key_sha256: str | None = None  # None: no auth
    max_k: int = 1000
    max_candidates: int = 1000
    max_upload_bytes: int = 20 * 1024 * 1024
    max_json_bytes: int = BodyLimits.max_json_bytes
    body_timeout_s: float = BodyLimits.body_timeout_s
    upload_timeout_s: float = BodyLimits.upload_timeout_s
    max_uploads: int = BodyLimits.max_uploads
    encoder: bool = True
    model_version: str = ""
    extra: dict = field(default_factory=dict)

    def body_limits(self) -> BodyLimits:
        return BodyLimits(
            max_json_bytes=self.max_json_bytes,
            max_upload_bytes=self.max_upload_bytes,
            body_timeout_s=self.body_timeout_s,
            upload_timeout_s=self.upload_timeout_s,
            max_uploads=self.max_uploads,
        )


class Backend(Protocol):
    async def embedding(self, song_id: int) -> dict: ...
    async def similar(self, song_id: int, k: int) -> dict: ...
    async def rank(self, user_id: int, trigger_song_id: int, candidates: list[int]) -> dict: ...
    async def recommend(self, user_id: int, trigger_song_id: int, k: int, candidates: int) -> dict: ...
    async def embed_audio(self, data: bytes, k: int) -> dict: ...
    async def health(self) -> dict: ...


class RankRequest(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)  # "5" is not a song id
    user_id: int
    trigger_song_id: int
    candidates: list[int]


class RecommendRequest(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)
    user_id: int
    trigger_song_id: int
    k: int = 10
    candidates: int = 100  # how many songs matching hands to the rankers


def _field(loc: tuple) -> str | None:
    """("body", "candidates", 3) -> "candidates[3]"; ("query", "k") -> "k"; ("body",) -> "body"."""
    parts = list(loc)
    if parts and parts[0] in ("body", "query", "path", "header") and len(parts) > 1:
        parts = parts[1:]
    if not parts:
        return None
    out = str(parts[0])
    for p in parts[1:]:
        out += f"[{p}]" if isinstance(p, int) else f".{p}"
    return out


def _in_range(name: str, value: int, low: int, high: int) -> int:
    if not low <= value <= high:
        raise ApiError(422, name, f"{name} must be between {low} and {high}, got {value}")
    return value


INT64_MAX = 2**63 - 1


def _digits(name: str, raw: str) -> int:
    """A path id or a query count: ASCII digits only. Python's int() (and a lax parser) would read
    `1_0` as 10 and `+1`, ` 1` or `1.0` as 1; and no 5000-digit string reaches int()."""
    if not (raw.isascii() and raw.isdigit()):
        raise ApiError(422, name, f"{name} must be written in digits only (0-9), got {raw[:40]!r}")
    significant = raw.lstrip("0") or "0"
    if len(significant) > 19:
        raise ApiError(422, name, f"{name} must fit in a signed 64-bit integer")
    return int(significant)


def _id(name: str, value: int) -> int:
    """Ids are int64 in every table: a larger number is a bad field, not a server error."""
    if not -INT64_MAX - 1 <= value <= INT64_MAX:
        raise ApiError(422, name, f"{name} must fit in a signed 64-bit integer")
    return value


def create_api(backend: Backend, settings: ApiSettings) -> FastAPI:
    app = FastAPI(title="htcl", version="1", docs_url=None, redoc_url=None, openapi_url=None)

    @app.exception_handler(ApiError)
    async def _api_error(request: Request, exc: ApiError):
        return JSONResponse(error_body(exc.field, exc.message), status_code=exc.status, headers=exc.headers)

    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, exc: RequestValidationError):
        first = exc.errors()[0]
        if first.get("type") == "json_invalid":
            return JSONResponse(error_body("body", f"malformed JSON: {first.get('msg')}"), status_code=400)
        name = _field(tuple(first.get("loc", ())))
        if first.get("type") == "missing" and name is None:
            name = "body"
        return JSONResponse(error_body(name, first.get("msg", "invalid")), status_code=422)

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, exc: StarletteHTTPException):
        return JSONResponse(
            error_body("path" if exc.status_code == 404 else None, str(exc.detail)), status_code=exc.status_code
        )

    @app.exception_handler(Exception)
    async def _bug(request: Request, exc: Exception):  # never bad input: that is answered above
        return JSONResponse(error_body(None, f"internal error: {type(exc).__name__}"), status_code=500)

    # Added before the auth middleware, so it runs after it: a request without the key is refused
    # on its headers, before its body is read.
    app.add_middleware(BodyGate, limits=settings.body_limits())

    if settings.api_key_sha256:
        expected = settings.api_key_sha256.encode()

        @app.middleware("http")
        async def _auth(request: Request, call_next):
            if request.url.path != "/healthz":  # probes stay open; they reveal nothing
                header = request.headers.get("authorization", "")
                scheme, _, token = header.partition(" ")
                given = key_digest(token.strip()).encode() if scheme.lower() == "bearer" and token.strip() else b""
                if not hmac.compare_digest(given, expected):
                    return JSONResponse(
                        error_body("authorization", "missing or wrong bearer key"),
                        status_code=401,
                        headers={"WWW-Authenticate": "Bearer"},
                    )
            return await call_next(request)

    @app.get("/healthz")
    async def healthz():
        return await backend.health()

    @app.get("/v1/songs/{song_id}/embedding")
    async def embedding(song_id: str):
        return await backend.embedding(_id("song_id", _digits("song_id", song_id)))

    @app.get("/v1/songs/{song_id}/similar")
    async def similar(song_id: str, k: str = "100"):
        return await backend.similar(
            _id("song_id", _digits("song_id", song_id)), _in_range("k", _digits("k", k), 1, settings.max_k)
        )

    @app.post("/v1/rank")
    async def rank(body: RankRequest):
        if not body.candidates:
            raise ApiError(422, "candidates", "candidates must hold at least one song id")
        if len(body.candidates) > settings.max_candidates:
            raise ApiError(
                422, "candidates", f"at most {settings.max_candidates} candidates, got {len(body.candidates)}"
            )
        for i, c in enumerate(body.candidates):
            _id(f"candidates[{i}]", c)
        return await backend.rank(
            _id("user_id", body.user_id), _id("trigger_song_id", body.trigger_song_id), body.candidates
        )

    @app.post("/v1/recommend")
    async def recommend(body: RecommendRequest):
        k = _in_range("k", body.k, 1, settings.max_k)
        n = _in_range("candidates", body.candidates, 1, settings.max_candidates)
        if n < k:
            raise ApiError(422, "candidates", f"candidates ({n}) must be at least k ({k})")
        return await backend.recommend(_id("user_id", body.user_id), _id("trigger_song_id", body.trigger_song_id), k, n)

    @app.post("/v1/embed")
    async def embed(request: Request, k: str = "10"):
        """Cold start: the raw bytes of an audio file in the body -> its embedding and nearest songs."""
        k = _in_range("k", _digits("k", k), 0, settings.max_k)
        if not settings.encoder:
            raise ApiError(501, None, "the cold-start encoder is not deployed for this model version")
        ctype = request.headers.get("content-type", "application/octet-stream").lower()
        if not ctype.startswith(AUDIO_TYPES):
            raise ApiError(
                415, "content-type", f"send the audio file's bytes as audio/* or application/octet-stream, not {ctype}"
            )
        limit = settings.max_upload_bytes
        declared = request.headers.get("content-length")
        if declared is not None and declared.isdigit() and int(declared) > limit:
            raise ApiError(413, "body", f"upload of {int(declared)} bytes exceeds the limit of {limit} bytes")
        data = bytearray()
        async for chunk in request.stream():  # chunked uploads are counted as they arrive
            data += chunk
            if len(data) > limit:
                raise ApiError(413, "body", f"upload exceeds the limit of {limit} bytes")
        if not data:
            raise ApiError(422, "body", "empty upload: send the audio file's bytes as the body")
        return await backend.embed_audio(bytes(data), k)

    return app


def error_for_unknown(field: str, ids: list[int]) -> ApiError:
    shown = ", ".join(str(i) for i in ids[:10]) + (" ..." if len(ids) > 10 else "")
    return ApiError(404, field, f"unknown song id(s) for this model version: {shown}")


def jsonable(x: Any) -> Any:
    """numpy scalars/arrays -> plain Python (FastAPI's encoder does not know numpy)."""
    import numpy as np

    if isinstance(x, dict):
        return {k: jsonable(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [jsonable(v) for v in x]
    if isinstance(x, np.ndarray):
        return x.tolist()
    if isinstance(x, np.generic):
        return x.item()
    return x
