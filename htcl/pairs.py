"""Stage-2 training pairs from behaviour logs.

- `favor_triplets`: the paper's ⟨trigger, recommended⟩ pairs — impressions in the similar-songs
  channel that the listener favored. The recommended song's text completes the triplet.
- `cooccurrence_pairs`: the HTCL_w_CF control — songs adjacent in listening sessions.
"""

from __future__ import annotations

import pandas as pd

from htcl import schema as S


class PairsError(ValueError):
    pass


def _require(df: pd.DataFrame, columns, table: str) -> None:
    missing = S.missing_columns(df.columns, columns)
    if missing:
        raise PairsError(f"{table} table is missing column(s) {missing}; has {list(df.columns)}")


def favor_triplets(interactions: pd.DataFrame) -> pd.DataFrame:
    """Rows with favored = true (and clicked: a favor needs a click), self-pairs dropped.

    Returns columns user_id, trigger_song_id, rec_song_id, event_timestamp, in time order.
    A pair favored several times stays several times: repeated favor is a stronger signal.
    """
    cols = [S.USER_ID, S.TRIGGER_SONG_ID, S.REC_SONG_ID, S.CLICKED, S.FAVORED, S.EVENT_TIMESTAMP]
    _require(interactions, cols, "interactions")
    fav = interactions[interactions[S.FAVORED].astype(bool) & interactions[S.CLICKED].astype(bool)]
    fav = fav[fav[S.TRIGGER_SONG_ID] != fav[S.REC_SONG_ID]]
    return (
        fav[[S.USER_ID, S.TRIGGER_SONG_ID, S.REC_SONG_ID, S.EVENT_TIMESTAMP]]
        .sort_values(S.EVENT_TIMESTAMP, kind="stable")
        .reset_index(drop=True)
    )


def cooccurrence_pairs(sessions: pd.DataFrame, window: int = 1) -> pd.DataFrame:
    """(song, a song played within `window` positions after it in the same session).

    Returns trigger_song_id, rec_song_id (same column names as favor_triplets, so stage 2 reads
    either), event_timestamp of the later play; self-pairs (repeats) dropped.
    """
    _require(sessions, [S.USER_ID, S.SESSION_ID, S.POSITION, S.SONG_ID, S.EVENT_TIMESTAMP], "sessions")
    if window < 1:
        raise PairsError(f"window must be >= 1, got {window}")
    ordered = sessions.sort_values([S.USER_ID, S.SESSION_ID, S.POSITION], kind="stable")
    out = []
    for lag in range(1, window + 1):
        nxt = ordered.groupby([S.USER_ID, S.SESSION_ID], sort=False)[[S.SONG_ID, S.EVENT_TIMESTAMP]].shift(-lag)
        pairs = pd.DataFrame(
            {
                S.USER_ID: ordered[S.USER_ID],
                S.TRIGGER_SONG_ID: ordered[S.SONG_ID],
                S.REC_SONG_ID: nxt[S.SONG_ID],
                S.EVENT_TIMESTAMP: nxt[S.EVENT_TIMESTAMP],
            }
        ).dropna(subset=[S.REC_SONG_ID])
        out.append(pairs)
    pairs = pd.concat(out, ignore_index=True)
    pairs[S.REC_SONG_ID] = pairs[S.REC_SONG_ID].astype("int64")
    pairs = pairs[pairs[S.TRIGGER_SONG_ID] != pairs[S.REC_SONG_ID]]
    return pairs.sort_values(S.EVENT_TIMESTAMP, kind="stable").reset_index(drop=True)


def stage2_pairs(variant: str, interactions: pd.DataFrame | None, sessions: pd.DataFrame | None) -> pd.DataFrame:
    if variant == "favor":
        if interactions is None:
            raise PairsError("variant 'favor' needs the interactions table")
        return favor_triplets(interactions)
    if variant == "cf":
        if sessions is None:
            raise PairsError("variant 'cf' needs the sessions table")
        return cooccurrence_pairs(sessions)
    raise PairsError(f"finetune.variant={variant!r}: expected 'favor' or 'cf'")


def split_time(timestamps: pd.Series, holdout_fraction: float) -> pd.Timestamp:
    """The UTC midnight that starts the held-out period: the last `holdout_fraction` of the span.

    Everything before it trains (stage 2, rankers); everything at or after it evaluates. A
    midnight, so the daily feature snapshots (htcl/features.py) of the two periods never mix.
    """
    if not 0.0 < holdout_fraction < 1.0:
        raise PairsError(f"eval.holdout_fraction must be in (0, 1), got {holdout_fraction}")
    ts = pd.to_datetime(timestamps, utc=True)
    if ts.empty:
        raise PairsError("no timestamps to split")
    start, end = ts.min(), ts.max()
    cut = (start + (end - start) * (1.0 - holdout_fraction)).ceil("D")
    if cut <= start or cut > end:
        raise PairsError(f"log from {start} to {end} is too short to hold out {holdout_fraction:.0%} at a midnight")
    return cut


def before(frame: pd.DataFrame, cut: pd.Timestamp) -> pd.DataFrame:
    """Rows with event_timestamp < cut (the training period)."""
    return frame[pd.to_datetime(frame[S.EVENT_TIMESTAMP], utc=True) < cut]
