"""Column names and table schemas of the data contracts (the README's "Data contract" says what each means).

Every module that reads or writes a table uses these constants, so a renamed column is one edit.
"""

from __future__ import annotations

import pyarrow as pa

# --- catalog: one row per song -------------------------------------------------------------
SONG_ID = "song_id"
AUDIO_PATH = "audio_path"
TITLE = "title"
ARTIST = "artist"
LYRICS = "lyrics"
TAGS = "tags"
GENRE = "genre"  # optional evaluation label
LANGUAGE = "language"  # optional evaluation label
UPDATED_AT = "updated_at"

CATALOG_REQUIRED = (SONG_ID, AUDIO_PATH, TITLE, ARTIST, LYRICS, TAGS)
CATALOG_TEXT = (TITLE, ARTIST, LYRICS, TAGS)

CATALOG_SCHEMA = pa.schema(
    [
        (SONG_ID, pa.int64()),
        (AUDIO_PATH, pa.string()),
        (TITLE, pa.string()),
        (ARTIST, pa.string()),
        (LYRICS, pa.string()),
        (TAGS, pa.string()),
        (GENRE, pa.string()),
        (LANGUAGE, pa.string()),
        (UPDATED_AT, pa.timestamp("us", tz="UTC")),
    ]
)

# --- interactions: one row per impression in the similar-songs channel ---------------------
USER_ID = "user_id"
TRIGGER_SONG_ID = "trigger_song_id"
REC_SONG_ID = "rec_song_id"
CLICKED = "clicked"
FAVORED = "favored"
EVENT_TIMESTAMP = "event_timestamp"

INTERACTIONS_SCHEMA = pa.schema(
    [
        (USER_ID, pa.int64()),
        (TRIGGER_SONG_ID, pa.int64()),
        (REC_SONG_ID, pa.int64()),
        (CLICKED, pa.bool_()),
        (FAVORED, pa.bool_()),
        (EVENT_TIMESTAMP, pa.timestamp("us", tz="UTC")),
    ]
)

# --- sessions: listening sessions (HTCL_w_CF and analysis) ---------------------------------
SESSION_ID = "session_id"
POSITION = "position"

SESSIONS_SCHEMA = pa.schema(
    [
        (USER_ID, pa.int64()),
        (SESSION_ID, pa.int64()),
        (POSITION, pa.int32()),
        (SONG_ID, pa.int64()),
        (EVENT_TIMESTAMP, pa.timestamp("us", tz="UTC")),
    ]
)

# --- outputs ---------------------------------------------------------------------------------
N_FRAMES = "n_frames"
MEL = "mel"  # float16 bytes of a (n_mels, n_frames) array, C order

# The sha256 of the audio file a row was computed from (mels, quarantine, a backbone's features),
# carried into embeddings: a rerun on a grown or changed catalog recomputes only the songs whose
# hash is new or differs (htcl.delta).
INPUT_HASH = "input_hash"

MELS_SCHEMA = pa.schema([(SONG_ID, pa.int64()), (N_FRAMES, pa.int32()), (MEL, pa.binary()), (INPUT_HASH, pa.string())])

STAGE = "stage"
ERROR_TYPE = "error_type"
MESSAGE = "message"

QUARANTINE_SCHEMA = pa.schema(
    [
        (SONG_ID, pa.int64()),
        (AUDIO_PATH, pa.string()),
        (STAGE, pa.string()),
        (ERROR_TYPE, pa.string()),
        (MESSAGE, pa.string()),
        (INPUT_HASH, pa.string()),
    ]
)

EMBEDDING = "embedding"
MODEL_VERSION = "model_version"


def embeddings_schema(dim: int) -> pa.Schema:
    return pa.schema(
        [
            (SONG_ID, pa.int64()),
            (EMBEDDING, pa.list_(pa.float32(), dim)),
            (MODEL_VERSION, pa.string()),
            (EVENT_TIMESTAMP, pa.timestamp("us", tz="UTC")),
            (INPUT_HASH, pa.string()),
        ]
    )


# --- behaviour features: htcl.features computes them, feature_repo/definitions.py serves them ---
SONG_STATS_VIEW = "song_stats"  # the Feast feature views (and their offline sources' stems)
LISTENER_STATS_VIEW = "listener_stats"
STAT_WINDOWS = (7, 30)  # days, song_stats
LISTENER_WINDOW = 30  # days, listener_stats


def song_stats_features(windows=STAT_WINDOWS) -> dict[str, str]:
    """The song_stats view's features, name -> dtype ("int64" | "float32" | "string"), in column order."""
    out: dict[str, str] = {}
    for w in windows:
        out.update(
            {
                f"impressions_{w}d": "int64",
                f"clicks_{w}d": "int64",
                f"favors_{w}d": "int64",
                f"ctr_{w}d": "float32",
                f"cvr_{w}d": "float32",
            }
        )
    return out


def listener_stats_features(window: int = LISTENER_WINDOW) -> dict[str, str]:
    """The listener_stats view's features, name -> dtype, in column order."""
    w = window
    return {
        f"impressions_{w}d": "int64",
        f"clicks_{w}d": "int64",
        f"favors_{w}d": "int64",
        f"active_days_{w}d": "int64",
        f"ctr_{w}d": "float32",
        f"top_genre_{w}d": "string",
        f"top_genre_share_{w}d": "float32",
        f"genre_entropy_{w}d": "float32",
    }


def full_feature_name(view: str, feature: str) -> str:
    """How Feast names a feature with full_feature_names=True (the rankers' columns)."""
    return f"{view}__{feature}"


def missing_columns(columns, required) -> list[str]:
    """Required column names absent from `columns`, in contract order."""
    present = set(columns)
    return [c for c in required if c not in present]
