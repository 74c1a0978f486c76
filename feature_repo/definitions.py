"""Feast definitions for htcl: entities, feature views over the offline sources, feature services.

Declarative, as Feast's templates are. The sources are Parquet files that the materialize job
(`ray_jobs/materialize.py`) writes into a run's feature data folder, and the embedding length is
the model's, so the objects are built by `definitions(data_dir, embed_dim)`; the module-level
objects (what `feast apply` in this folder finds) use HTCL_FEAST_DATA and HTCL_EMBED_DIM.

Keys: a song is `song_id`, a listener `user_id`, and embeddings are keyed by (song_id,
model_version), so a new model's embeddings are backfilled beside the old ones and readers switch
by asking for the other version: no gap, and never a mix of two models' vectors in one answer.
"""

from __future__ import annotations

import os
from datetime import datetime, timedelta, timezone
from pathlib import Path

from feast import Entity, FeatureService, FeatureView, Field, FileSource, ValueType
from feast.types import Array, Float32, Int64, String

from htcl import schema as S

# The event_timestamp of every embedding row: an embedding is valid at any time (see song_embedding).
EPOCH = datetime(1970, 1, 1, tzinfo=timezone.utc)
SONG_EMBEDDINGS = "song_embeddings"  # a folder: one file per embeddings part of each model version


def embedding_source_file(model_version: str, part: Path) -> str:
    """The name, in SONG_EMBEDDINGS, of the source file made from embeddings/<model_version>/<part>."""
    return f"{model_version}--{Path(part).stem}.parquet"


SONG_STATS = f"{S.SONG_STATS_VIEW}.parquet"
LISTENER_STATS = f"{S.LISTENER_STATS_VIEW}.parquet"

song = Entity(name="song", join_keys=[S.SONG_ID], value_type=ValueType.INT64, description="a catalog song")
listener = Entity(name="listener", join_keys=[S.USER_ID], value_type=ValueType.INT64, description="a listener")
model = Entity(
    name="model",
    join_keys=[S.MODEL_VERSION],
    value_type=ValueType.STRING,
    description="the embedding model version (checkpoint + config hash)",
)


def definitions(data_dir: str | Path, embed_dim: int) -> dict[str, object]:
    """Every Feast object of the repo, by name."""
    data_dir = Path(data_dir).resolve()

    def source(name: str, file: str) -> FileSource:
        return FileSource(
            name=f"{name}_source",
            path=str(data_dir / file),
            timestamp_field="event_timestamp",
            created_timestamp_column="created",
        )

    song_embedding = FeatureView(
        name="song_embedding",
        entities=[song, model],
        # An embedding is a function of the audio and the model version, valid at any time: its rows
        # carry event_timestamp 1970-01-01 (the time the embedding was made goes in `created`).
        ttl=timedelta(0),
        schema=[
            Field(
                name="embedding",
                dtype=Array(Float32),
                vector_index=True,
                vector_length=embed_dim,
                vector_search_metric="COSINE",
                description=f"L2-normalized audio embedding, {embed_dim} floats",
            ),
        ],
        source=source("song_embeddings", SONG_EMBEDDINGS),
        online=True,
        tags={"embed_dim": str(embed_dim)},
        description="HTCL audio embeddings per song and model version",
    )
    dtypes = {"int64": Int64, "float32": Float32, "string": String}
    song_stats = FeatureView(
        name=S.SONG_STATS_VIEW,
        entities=[song],
        # No expiry: a snapshot is written whenever a window changes, zeros included (htcl/features.py),
        # and Feast 0.67's file store drops training rows whose features fall outside a ttl.
        ttl=timedelta(0),
        schema=[Field(name=name, dtype=dtypes[kind]) for name, kind in S.song_stats_features().items()],
        source=source(S.SONG_STATS_VIEW, SONG_STATS),
        online=True,
        description=f"popularity, click and favor rates of a song as a candidate, trailing {S.STAT_WINDOWS} days",
    )
    listener_stats = FeatureView(
        name=S.LISTENER_STATS_VIEW,
        entities=[listener],
        ttl=timedelta(0),
        schema=[Field(name=name, dtype=dtypes[kind]) for name, kind in S.listener_stats_features().items()],
        source=source(S.LISTENER_STATS_VIEW, LISTENER_STATS),
        online=True,
        description=f"activity, click rate and genre-affinity summary of a listener, trailing {S.LISTENER_WINDOW} days",
    )
    # The ranker reads the candidate (song_id) and the trigger (trigger_song_id) side by side.
    # Both projections carry an alias: Feast 0.67 cannot sort a service's projections when one
    # alias is None and another is set (TypeError in FeatureService.__eq__).
    candidate_embedding = song_embedding.with_name("candidate_embedding")
    trigger_embedding = song_embedding.with_name("trigger_embedding").with_join_key_map({"song_id": "trigger_song_id"})
    ranker_v1 = FeatureService(
        name="ranker_v1",
        features=[candidate_embedding, trigger_embedding, song_stats, listener_stats],
        description="features of one (listener, trigger, candidate) impression for the CTR/CVR rankers",
    )
    matching_v1 = FeatureService(
        name="matching_v1", features=[song_embedding], description="embeddings for nearest-neighbour matching"
    )
    return {
        "song": song,
        "listener": listener,
        "model": model,
        "song_embedding": song_embedding,
        S.SONG_STATS_VIEW: song_stats,
        S.LISTENER_STATS_VIEW: listener_stats,
        "ranker_v1": ranker_v1,
        "matching_v1": matching_v1,
    }


_objects = definitions(
    os.environ.get("HTCL_FEAST_DATA", "outputs/demo/feast"), int(os.environ.get("HTCL_EMBED_DIM", "128"))
)
song_embedding = _objects["song_embedding"]
song_stats = _objects[S.SONG_STATS_VIEW]
listener_stats = _objects[S.LISTENER_STATS_VIEW]
ranker_v1 = _objects["ranker_v1"]
matching_v1 = _objects["matching_v1"]
