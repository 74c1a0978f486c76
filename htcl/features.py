"""Behaviour features for rankers: song and listener statistics over trailing windows.

Pure pandas over the interaction logs (no Feast, no Ray): the materialize job maps these over
groups of songs / listeners with Ray Data and writes the results as Feast offline sources.

Every row is a snapshot "as of" its `event_timestamp`: it counts only events strictly before
that instant. Snapshots are taken at the end of each UTC day (timestamp = the next midnight), and
a row is written only when some value changed since the day before (including falling back to
zero when a window empties), so a point-in-time join never sees an event from later the same
day and never keeps a stale value past its window.
"""

from __future__ import annotations

from typing import Mapping, Sequence

import numpy as np
import pandas as pd

from htcl import schema as S

WINDOWS = S.STAT_WINDOWS
PRIOR_STRENGTH = 10.0  # pseudo-impressions of the global rate: smooths rates of rarely shown songs
DAY = pd.Timedelta(days=1)


class FeatureError(ValueError):
    pass


def _require(df: pd.DataFrame, columns: Sequence[str], table: str) -> None:
    missing = S.missing_columns(df.columns, columns)
    if missing:
        raise FeatureError(f"{table} table is missing column(s) {missing}; has {list(df.columns)}")


def _daily(
    df: pd.DataFrame, key: str, values: Mapping[str, pd.Series], start: pd.Timestamp, end: pd.Timestamp
) -> pd.DataFrame:
    """Per (key, day) sums of each value series -> a dense frame indexed by (key, day), from the
    day before `start` (all zeros: the "nothing seen yet" snapshot) to the day of `end`."""
    day = df[S.EVENT_TIMESTAMP].dt.floor("D")
    if (day < start.floor("D")).any() or (day > end.floor("D")).any():
        raise FeatureError(f"events outside [{start}, {end}]: pass the whole log's first and last timestamps")
    frame = pd.DataFrame(
        {key: df[key].to_numpy(), "day": day.to_numpy(), **{k: v.to_numpy() for k, v in values.items()}}
    )
    daily = frame.groupby([key, "day"], sort=True).sum()
    days = pd.date_range(start.floor("D") - DAY, end.floor("D"), freq="D", tz="UTC")
    full = pd.MultiIndex.from_product([daily.index.get_level_values(key).unique(), days], names=[key, "day"])
    return daily.reindex(full, fill_value=0)


def _trailing(daily: pd.DataFrame, key: str, window: int) -> pd.DataFrame:
    """Sum over the trailing `window` days (the day itself included), per key."""
    return daily.groupby(level=key, sort=False).transform(lambda s: s.rolling(window, min_periods=1).sum())


def _changed_rows(out: pd.DataFrame, key: str, count_cols: Sequence[str]) -> pd.DataFrame:
    """Each key's first snapshot (all zeros, as of the log's start) and every later one where a
    count differs from the day before (every other value is a function of the counts).

    The zero snapshot matters: Feast's file offline store drops an entity row whose key has
    feature rows, but all of them later than the row (feast 0.67, dask._filter_ttl), so every key
    needs a row at or before the first event."""
    cols = list(count_cols)
    prev = out.groupby(key, sort=False)[cols].shift(1)
    first = prev.isna().any(axis=1)
    changed = first | (out[cols] != prev).any(axis=1)
    return out[changed].reset_index(drop=True)


def global_rates(interactions: pd.DataFrame) -> tuple[float, float]:
    """(click rate, favor-given-click rate) over the whole log: the priors rates shrink towards."""
    _require(interactions, [S.CLICKED, S.FAVORED], "interactions")
    clicked = interactions[S.CLICKED].astype(bool)
    ctr = float(clicked.mean()) if len(clicked) else 0.0
    cvr = float(interactions.loc[clicked, S.FAVORED].astype(bool).mean()) if clicked.any() else 0.0
    return ctr, cvr


def _smoothed(hits: pd.Series, trials: pd.Series, prior: float) -> pd.Series:
    return ((hits + PRIOR_STRENGTH * prior) / (trials + PRIOR_STRENGTH)).astype("float32")


def song_stats(
    interactions: pd.DataFrame,
    start: pd.Timestamp,
    end: pd.Timestamp,
    priors: tuple[float, float] | None = None,
    windows: Sequence[int] = WINDOWS,
) -> pd.DataFrame:
    """Candidate-side statistics per song (the song as `rec_song_id` in the similar-songs channel).

    Columns: song_id, event_timestamp, and for each window w in days: impressions_{w}d,
    clicks_{w}d, favors_{w}d (int64), ctr_{w}d = smoothed clicks/impressions, cvr_{w}d = smoothed
    favors/clicks (float32). `priors` = global (ctr, cvr); pass the whole log's so that every
    group of songs shrinks towards the same numbers, as `start` and `end` are the whole log's
    first and last event times: each song gets an all-zero snapshot at the midnight starting
    `start`'s day, and the last snapshot covers events before the midnight after `end`.
    """
    _require(interactions, [S.REC_SONG_ID, S.CLICKED, S.FAVORED, S.EVENT_TIMESTAMP], "interactions")
    if interactions.empty:
        return pd.DataFrame(columns=song_stats_columns(windows))
    ctr0, cvr0 = priors if priors is not None else global_rates(interactions)
    clicked = interactions[S.CLICKED].astype(bool)
    daily = _daily(
        interactions.rename(columns={S.REC_SONG_ID: S.SONG_ID}),
        S.SONG_ID,
        {
            "impressions": pd.Series(1, index=interactions.index),
            "clicks": clicked.astype(int),
            "favors": (clicked & interactions[S.FAVORED].astype(bool)).astype(int),
        },
        start,
        end,
    )
    out = pd.DataFrame(index=daily.index)
    value_cols = []
    for w in windows:
        t = _trailing(daily, S.SONG_ID, w)
        out[f"impressions_{w}d"] = t["impressions"].astype("int64")
        out[f"clicks_{w}d"] = t["clicks"].astype("int64")
        out[f"favors_{w}d"] = t["favors"].astype("int64")
        out[f"ctr_{w}d"] = _smoothed(t["clicks"], t["impressions"], ctr0)
        out[f"cvr_{w}d"] = _smoothed(t["favors"], t["clicks"], cvr0)
        value_cols += [f"impressions_{w}d", f"clicks_{w}d", f"favors_{w}d"]
    out = out.reset_index()
    out[S.EVENT_TIMESTAMP] = out.pop("day") + DAY  # as of the end of that day
    out = _changed_rows(out, S.SONG_ID, value_cols)
    return out[song_stats_columns(windows)]


def song_stats_columns(windows: Sequence[int] = WINDOWS) -> list[str]:
    return [S.SONG_ID, S.EVENT_TIMESTAMP, *S.song_stats_features(windows)]


LISTENER_WINDOW = S.LISTENER_WINDOW


def listener_stats(
    interactions: pd.DataFrame,
    start: pd.Timestamp,
    end: pd.Timestamp,
    song_genre: Mapping[int, str] | None = None,
    priors: tuple[float, float] | None = None,
    window: int = LISTENER_WINDOW,
) -> pd.DataFrame:
    """Per listener, over the trailing `window` days: activity and a summary of genre affinity.

    Columns: user_id, event_timestamp, impressions_30d, clicks_30d, favors_30d, active_days_30d
    (int64), ctr_30d (smoothed, float32), top_genre_30d (the genre of most clicked songs, "" when
    none or no genre labels), top_genre_share_30d and genre_entropy_30d (float32, over clicked
    songs' genres; entropy in nats). `song_genre` maps song_id -> genre (the catalog's labels).
    `start`, `end`, `priors`: as in song_stats.
    """
    _require(interactions, [S.USER_ID, S.REC_SONG_ID, S.CLICKED, S.FAVORED, S.EVENT_TIMESTAMP], "interactions")
    if interactions.empty:
        return pd.DataFrame(columns=listener_stats_columns(window))
    ctr0, _ = priors if priors is not None else global_rates(interactions)
    clicked = interactions[S.CLICKED].astype(bool)
    genres = sorted({g for g in (song_genre or {}).values() if isinstance(g, str) and g})
    genre_of = interactions[S.REC_SONG_ID].map(song_genre or {}).fillna("")
    values = {
        "impressions": pd.Series(1, index=interactions.index),
        "clicks": clicked.astype(int),
        "favors": (clicked & interactions[S.FAVORED].astype(bool)).astype(int),
        **{f"g:{g}": (clicked & (genre_of == g)).astype(int) for g in genres},
    }
    daily = _daily(interactions, S.USER_ID, values, start, end)
    daily["active"] = (daily["impressions"] > 0).astype(int)
    t = _trailing(daily, S.USER_ID, window)
    w = window
    out = pd.DataFrame(index=daily.index)
    out[f"impressions_{w}d"] = t["impressions"].astype("int64")
    out[f"clicks_{w}d"] = t["clicks"].astype("int64")
    out[f"favors_{w}d"] = t["favors"].astype("int64")
    out[f"active_days_{w}d"] = t["active"].astype("int64")
    out[f"ctr_{w}d"] = _smoothed(t["clicks"], t["impressions"], ctr0)
    if genres:
        counts = t[[f"g:{g}" for g in genres]].to_numpy(dtype=np.float64)  # (rows, G)
        total = counts.sum(1, keepdims=True)
        share = np.divide(counts, total, out=np.zeros_like(counts), where=total > 0)
        with np.errstate(divide="ignore", invalid="ignore"):
            entropy = np.abs((np.where(share > 0, share * np.log(share), 0.0)).sum(1))  # abs: no -0.0
        top = np.array(genres, dtype=object)[counts.argmax(1)]
        out[f"top_genre_{w}d"] = np.where(total[:, 0] > 0, top, "")
        out[f"top_genre_share_{w}d"] = share.max(1).astype("float32")
        out[f"genre_entropy_{w}d"] = entropy.astype("float32")
    else:
        out[f"top_genre_{w}d"] = ""
        out[f"top_genre_share_{w}d"] = np.float32(0)
        out[f"genre_entropy_{w}d"] = np.float32(0)
    out = out.reset_index()
    out[S.EVENT_TIMESTAMP] = out.pop("day") + DAY
    count_cols = [f"impressions_{w}d", f"clicks_{w}d", f"favors_{w}d", f"active_days_{w}d"]
    count_cols += [f"g:{g}" for g in genres]
    out = pd.concat([out, t[[f"g:{g}" for g in genres]].reset_index(drop=True)], axis=1)
    out = _changed_rows(out, S.USER_ID, count_cols)
    return out[listener_stats_columns(window)]


def listener_stats_columns(window: int = LISTENER_WINDOW) -> list[str]:
    return [S.USER_ID, S.EVENT_TIMESTAMP, *S.listener_stats_features(window)]


def point_in_time_stats(interactions: pd.DataFrame, song_genre: Mapping[int, str] | None = None) -> pd.DataFrame:
    """Each impression with the candidate's song_stats and the listener's listener_stats as of its
    timestamp (the latest snapshot at or before it), named as Feast's full feature names
    (`song_stats__ctr_7d`, ...). In log order, with `song_id` = the candidate.

    The in-process twin of the Feast `ranker_v1` backfill (ray_jobs/backfill.py), for `--local`
    runs without a feature store; tests check the two agree.
    """
    log = interactions.reset_index(drop=True)
    ts = pd.to_datetime(log[S.EVENT_TIMESTAMP], utc=True).astype("datetime64[ns, UTC]")  # one unit for the as-of join
    start, end, priors = ts.min(), ts.max(), global_rates(log)
    songs = song_stats(log, start, end, priors)
    users = listener_stats(log, start, end, song_genre, priors)
    frame = log.rename(columns={S.REC_SONG_ID: S.SONG_ID}).assign(
        **{S.EVENT_TIMESTAMP: ts, "_row": np.arange(len(log))}
    )
    for table, key, view in ((songs, S.SONG_ID, S.SONG_STATS_VIEW), (users, S.USER_ID, S.LISTENER_STATS_VIEW)):
        table = table.rename(
            columns={c: S.full_feature_name(view, c) for c in table.columns if c not in (key, S.EVENT_TIMESTAMP)}
        )
        table = table.assign(
            **{S.EVENT_TIMESTAMP: pd.to_datetime(table[S.EVENT_TIMESTAMP], utc=True).astype("datetime64[ns, UTC]")}
        )
        frame = pd.merge_asof(
            frame.sort_values(S.EVENT_TIMESTAMP),
            table.sort_values(S.EVENT_TIMESTAMP),
            on=S.EVENT_TIMESTAMP,
            by=key,
            direction="backward",
            allow_exact_matches=True,
        )
    return frame.sort_values("_row").drop(columns="_row").reset_index(drop=True)
