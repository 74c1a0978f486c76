"""Listening sessions and the similar-songs channel (impressions, clicks, favors).

The hidden taste space of a song is its audible factors (standardized log tempo, energy, mode,
vocal presence, instrument family). Two songs are similar in taste when they are close there.

- Sessions follow a listener's genre affinity, with exploration jumps to any popular song, so
  songs that co-occur are not the same as songs that are semantically alike (HTCL_w_CF control).
- The similar-songs channel shows, for a trigger song the listener played, candidates from the
  same genre, popular songs and random songs. Click depends on genre affinity, taste similarity
  to the trigger, the listener's own taste, popularity and noise; favor given click leans harder
  on taste. Favor rows are the stage-2 triplets.

Timestamps are a fixed base date plus seeded offsets, never the wall clock.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pandas as pd

from htcl import schema
from htcl.sample_world.listeners import Listeners

BASE_TIME = pd.Timestamp("2026-01-01", tz="UTC")
SPAN_DAYS = 56  # eight weeks of logs: room for time-based splits and point-in-time joins
CANDIDATES = {"same_genre": 4, "popular": 3, "random": 3}  # slots shown per trigger

# logit weights (each input standardized over random pairs, so weights compare)
CLICK = dict(bias=-1.6, affinity=0.6, similarity=0.7, taste=0.6, popularity=0.4, noise=0.7)
FAVOR = dict(bias=-0.6, affinity=0.2, similarity=1.2, taste=1.0, popularity=0.0, noise=0.5)


@dataclass
class SongFactors:
    """Per-song arrays aligned on the row index (song_id = index + 1)."""

    genre: np.ndarray  # (N,) int genre index
    popularity: np.ndarray  # (N,) standardized log popularity
    tempo: np.ndarray  # (N,) standardized log bpm
    energy: np.ndarray  # (N,) standardized energy
    mode: np.ndarray  # (N,) +1 major, -1 minor
    vocal: np.ndarray  # (N,) +1 sung, -1 instrumental
    family: np.ndarray  # (N,) int instrument family index
    n_families: int
    duration_s: np.ndarray  # (N,)

    def taste_vectors(self) -> np.ndarray:
        """(N, 4 + families): the hidden audible-taste space."""
        onehot = np.eye(self.n_families)[self.family]
        return np.column_stack([self.tempo, self.energy, 0.8 * self.mode, 0.8 * self.vocal, onehot])


def _standardizer(values: np.ndarray) -> tuple[float, float]:
    return float(values.mean()), float(values.std() + 1e-9)


class TasteModel:
    """Similarity between songs and match between a listener and songs, both standardized."""

    def __init__(self, songs: SongFactors, listeners: Listeners, rng: np.random.Generator):
        self.songs = songs
        self.listeners = listeners
        self.vectors = songs.taste_vectors()
        n = len(songs.genre)
        a, b = rng.integers(0, n, 4000), rng.integers(0, n, 4000)
        self._sim_norm = _standardizer(self._raw_similarity(a, b))
        u = rng.integers(0, len(listeners), 4000)
        self._match_norm = _standardizer(
            np.array([self._raw_match(int(i), np.array([int(s)]))[0] for i, s in zip(u, a)])
        )

    def _raw_similarity(self, a: np.ndarray, b: np.ndarray) -> np.ndarray:
        return -((self.vectors[a] - self.vectors[b]) ** 2).sum(axis=1)

    def similarity(self, a: np.ndarray, b: np.ndarray) -> np.ndarray:
        mean, std = self._sim_norm
        return (self._raw_similarity(a, b) - mean) / std

    def _raw_match(self, user: int, songs: np.ndarray) -> np.ndarray:
        L, S = self.listeners, self.songs
        return (
            -0.5 * (S.tempo[songs] - L.pref_tempo[user]) ** 2
            - 0.5 * (S.energy[songs] - L.pref_energy[user]) ** 2
            + 0.5 * L.pref_mode[user] * S.mode[songs]
            + 0.5 * L.pref_vocal[user] * S.vocal[songs]
            + 0.7 * L.pref_family[user, S.family[songs]]
        )

    def match(self, user: int, songs: np.ndarray) -> np.ndarray:
        mean, std = self._match_norm
        return (self._raw_match(user, songs) - mean) / std

    def affinity(self, user: int, songs: np.ndarray) -> np.ndarray:
        """log of the listener's affinity for each song's genre, relative to uniform."""
        aff = self.listeners.affinity[user, self.songs.genre[songs]] * self.listeners.affinity.shape[1]
        return np.log(np.clip(aff, 0.05, None))


def _sample(
    rng: np.random.Generator, items: np.ndarray, weights: np.ndarray, k: int, distinct: bool = False
) -> np.ndarray:
    """k items drawn by weight; `distinct` avoids repeats while there are enough items."""
    p = weights / weights.sum()
    return rng.choice(items, size=k, p=p, replace=not distinct or k > np.count_nonzero(p))


def simulate_sessions(
    rng: np.random.Generator, songs: SongFactors, listeners: Listeners, taste: TasteModel
) -> pd.DataFrame:
    n_genres = listeners.affinity.shape[1]
    all_songs = np.arange(len(songs.genre))
    by_genre = [np.flatnonzero(songs.genre == g) for g in range(n_genres)]
    pop_weight = np.exp(songs.popularity)
    rows = []
    session_id = 0
    for u in range(len(listeners)):
        # a listener plays what they like within a genre: popularity and their own taste
        weight = pop_weight * np.exp(0.5 * taste.match(u, all_songs))
        affinity = listeners.affinity[u] * np.array([len(s) > 0 for s in by_genre])
        affinity = affinity / affinity.sum()
        for _ in range(1 + rng.poisson(listeners.activity[u])):
            session_id += 1
            length = int(min(1 + rng.geometric(0.15), 30))
            genre_seq = np.empty(length, dtype=np.int64)
            jump = rng.random(length) < listeners.exploration[u]
            genre = rng.choice(n_genres, p=affinity)
            for i in range(length):
                if i and rng.random() > 0.75:  # drift to another liked genre
                    genre = rng.choice(n_genres, p=affinity)
                genre_seq[i] = genre
            picks = np.empty(length, dtype=np.int64)
            if jump.any():  # exploration: any song, by popularity only
                picks[jump] = _sample(rng, all_songs, pop_weight, int(jump.sum()))
            for g in np.unique(genre_seq[~jump]):
                slots = np.flatnonzero((genre_seq == g) & ~jump)
                picks[slots] = _sample(rng, by_genre[g], weight[by_genre[g]], len(slots), distinct=True)
            day = rng.integers(0, SPAN_DAYS)
            start = day * 86400.0 + ((18.0 + rng.normal(0, 3.5)) % 24) * 3600.0
            offsets = np.concatenate([[0.0], np.cumsum(songs.duration_s[picks[:-1]] + 2.0)])
            for pos in range(length):
                rows.append((u + 1, session_id, pos, int(picks[pos]) + 1, start + offsets[pos]))
    frame = pd.DataFrame(rows, columns=[schema.USER_ID, schema.SESSION_ID, schema.POSITION, schema.SONG_ID, "t"])
    frame[schema.EVENT_TIMESTAMP] = BASE_TIME + pd.to_timedelta(
        np.round(frame.pop("t") * 1e6).astype(np.int64), unit="us"
    )
    return frame.astype(
        {schema.USER_ID: "int64", schema.SESSION_ID: "int64", schema.POSITION: "int32", schema.SONG_ID: "int64"}
    )


def _logit(weights: dict, parts: dict[str, np.ndarray], noise: np.ndarray) -> np.ndarray:
    return weights["bias"] + sum(weights[k] * v for k, v in parts.items()) + weights["noise"] * noise


def simulate_impressions(
    rng: np.random.Generator, songs: SongFactors, listeners: Listeners, taste: TasteModel, sessions: pd.DataFrame
) -> pd.DataFrame:
    """Impressions of the similar-songs channel, each triggered by a song the listener played."""
    n = len(songs.genre)
    all_songs = np.arange(n)
    by_genre = [np.flatnonzero(songs.genre == g) for g in range(listeners.affinity.shape[1])]
    popular_weight = np.exp(2.0 * songs.popularity)  # the "popular" slot favours the head
    plays = sessions.groupby(schema.USER_ID)
    song_rows = sessions[schema.SONG_ID].to_numpy() - 1
    play_songs = {u: song_rows[idx] for u, idx in plays.indices.items()}
    play_seconds = (sessions[schema.EVENT_TIMESTAMP] - BASE_TIME).dt.total_seconds().to_numpy()
    play_times = {u: play_seconds[idx] for u, idx in plays.indices.items()}
    out = []
    for u in range(len(listeners)):
        history = play_songs.get(u + 1)
        if history is None:
            continue
        n_triggers = 1 + rng.poisson(1.5 * listeners.activity[u])
        for _ in range(n_triggers):
            i = int(rng.integers(len(history)))
            trigger = int(history[i])
            same = by_genre[songs.genre[trigger]]
            cands = np.concatenate(
                [
                    _sample(rng, same, np.exp(songs.popularity[same]), CANDIDATES["same_genre"], distinct=True),
                    _sample(rng, all_songs, popular_weight, CANDIDATES["popular"], distinct=True),
                    rng.integers(0, n, CANDIDATES["random"]),
                ]
            )
            cands = np.array(list(dict.fromkeys(int(c) for c in cands if c != trigger)), dtype=np.int64)
            if len(cands) == 0:
                continue
            parts = dict(
                affinity=taste.affinity(u, cands),
                similarity=taste.similarity(np.full(len(cands), trigger), cands),
                taste=taste.match(u, cands),
                popularity=songs.popularity[cands],
            )
            clicked = rng.random(len(cands)) < 1 / (1 + np.exp(-_logit(CLICK, parts, rng.normal(size=len(cands)))))
            favored = clicked & (
                rng.random(len(cands)) < 1 / (1 + np.exp(-_logit(FAVOR, parts, rng.normal(size=len(cands)))))
            )
            t0 = play_times[u + 1][i] + float(rng.integers(5, 120))
            for k, c in enumerate(cands):
                out.append((u + 1, trigger + 1, int(c) + 1, bool(clicked[k]), bool(favored[k]), t0 + k))
    frame = pd.DataFrame(
        out,
        columns=[
            schema.USER_ID,
            schema.TRIGGER_SONG_ID,
            schema.REC_SONG_ID,
            schema.CLICKED,
            schema.FAVORED,
            schema.EVENT_TIMESTAMP,
        ],
    )
    seconds = frame.pop(schema.EVENT_TIMESTAMP).to_numpy()
    frame[schema.EVENT_TIMESTAMP] = BASE_TIME + pd.to_timedelta(np.round(seconds * 1e6).astype(np.int64), unit="us")
    return frame.sort_values([schema.EVENT_TIMESTAMP, schema.USER_ID, schema.REC_SONG_ID], kind="stable").reset_index(
        drop=True
    )
