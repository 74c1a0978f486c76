"""Point-in-time reads of the htcl feature store: impressions as Feast entity rows, joined with
the ranker_v1 feature service as of each impression's timestamp (`get_historical_features`).

Used by `htcl backfill` (a time window), and by `htcl train-rankers` and `htcl evaluate` (the whole
log, which they split in time themselves).
"""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import pandas as pd

from feature_repo.store import read_current_version
from htcl import schema as S
from htcl.layout import Layout

IMPRESSION_ID = "impression_id"


def entity_frame(
    interactions: pd.DataFrame, start: pd.Timestamp, end: pd.Timestamp, model_version: str
) -> pd.DataFrame:
    """Impressions in [start, end) as Feast entity rows: the candidate is `song_id`.

    `impression_id` (the row's position in the log) keeps repeated identical impressions apart:
    Feast 0.67 drops entity rows that are exact duplicates of each other.
    """
    ts = pd.to_datetime(interactions[S.EVENT_TIMESTAMP], utc=True)
    keep = (ts >= start) & (ts < end)
    rows = interactions[keep].rename(columns={S.REC_SONG_ID: S.SONG_ID})
    rows = rows.assign(**{IMPRESSION_ID: np.flatnonzero(keep.to_numpy()), S.MODEL_VERSION: model_version})
    return rows.reset_index(drop=True)


def historical_frame(store, entities: pd.DataFrame, service: str = "ranker_v1") -> pd.DataFrame:
    """Feast's point-in-time join of the service's features onto every entity row, in log order.

    One get_historical_features call per feature view of the service, each over the distinct
    (join keys, timestamp) of that view, merged back onto every impression. Asking for the whole
    service at once loses rows in Feast 0.67's file store: it de-duplicates after each view on
    the join keys seen so far, so two impressions of one song at the same instant by different
    listeners collapse into one (dask.py, _drop_duplicates).
    """
    frame = entities.assign(**{S.EVENT_TIMESTAMP: pd.to_datetime(entities[S.EVENT_TIMESTAMP], utc=True)})
    for projection in store.get_feature_service(service).feature_view_projections:
        view = store.get_feature_view(projection.name)
        own_keys = [entity_column.name for entity_column in view.entity_columns]
        keys = [projection.join_key_map.get(k, k) for k in own_keys]  # columns of the entity frame
        distinct = frame[keys + [S.EVENT_TIMESTAMP]].drop_duplicates(ignore_index=True)
        asked = distinct.rename(columns=dict(zip(keys, own_keys)))
        refs = [f"{projection.name}:{f.name}" for f in projection.features]
        got = store.get_historical_features(entity_df=asked, features=refs, full_feature_names=True).to_df()
        got[S.EVENT_TIMESTAMP] = pd.to_datetime(got[S.EVENT_TIMESTAMP], utc=True)
        alias = projection.name_to_use()
        got = got.rename(
            columns={
                **dict(zip(own_keys, keys)),
                **{f"{projection.name}__{f.name}": f"{alias}__{f.name}" for f in projection.features},
            }
        )
        before = len(frame)
        frame = frame.merge(got, on=keys + [S.EVENT_TIMESTAMP], how="left", validate="many_to_one", indicator=True)
        lost = frame["_merge"] != "both"
        if lost.any() or len(frame) != before:
            # Losing training rows silently would bias the rankers: fail and say which.
            raise RuntimeError(
                f"{alias}: get_historical_features returned no row for {int(lost.sum())} of {before} impressions, "
                f"e.g. {frame.loc[lost, keys + [S.EVENT_TIMESTAMP]].head(3).to_dict('records')}"
            )
        frame = frame.drop(columns="_merge")
    return frame.sort_values(IMPRESSION_ID, ignore_index=True)


def whole_log_frame(cfg, online_store: str | None = None, model_version: str | None = None) -> tuple[pd.DataFrame, str]:
    """Every impression of the log with its ranker_v1 features from Feast, and the model version.

    What train-rankers and evaluate read; they split it in time themselves.
    """
    from feature_repo.store import open_store

    data_dir = Layout.of(cfg).feast
    version = model_version or read_current_version(data_dir, online_store)
    if not version:
        raise SystemExit(f"no current model version in {data_dir}; run `htcl materialize` first")
    interactions = pd.read_parquet(Path(cfg.data.root) / "interactions.parquet")
    ts = pd.to_datetime(interactions[S.EVENT_TIMESTAMP], utc=True)
    entities = entity_frame(interactions, ts.min(), ts.max() + pd.Timedelta(microseconds=1), version)
    t0 = time.perf_counter()
    frame = historical_frame(open_store(data_dir, online_store), entities)
    print(
        f"backfill: {len(frame)} impressions with ranker_v1 features from Feast in {time.perf_counter() - t0:.1f} s",
        flush=True,
    )
    return frame, version
