"""Simulated listeners: genre affinities and a taste over audible factors.

Genre affinities are either synthetic (a sparse Dirichlet draw: most people like a few genres) or
taken from real Last.fm users (HetRec 2011): a user's tag assignments are mapped onto the world's
genres with the keyword map in `genres.yaml`. The taste over audible factors (tempo, energy, mode,
vocal presence, instrument family) is always drawn, independently of the genre affinities, because
no public log records it; that independence is what makes preference differ from semantics.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import numpy as np
import pandas as pd
import yaml

from htcl.sample_world.artists import FAMILY_NAMES

GENRE_KEYWORDS_FILE = Path(__file__).with_name("genres.yaml")
AFFINITY_SMOOTHING = 0.05  # share of a Last.fm user's affinity spread evenly, so no genre is zero


@dataclass
class Listeners:
    """One row per listener; arrays are aligned on the row index (user_id = index + 1)."""

    user_id: np.ndarray  # (U,) int64
    origin: list[str]  # "synthetic" | "lastfm"
    lastfm_user_id: np.ndarray  # (U,) int64, -1 for synthetic listeners
    genres: tuple[str, ...]
    affinity: np.ndarray  # (U, G) rows sum to 1
    pref_tempo: np.ndarray  # (U,) preferred standardized log tempo
    pref_energy: np.ndarray  # (U,) preferred standardized energy
    pref_mode: np.ndarray  # (U,) > 0 likes major, < 0 likes minor
    pref_vocal: np.ndarray  # (U,) > 0 likes vocals
    pref_family: np.ndarray  # (U, len(FAMILY_NAMES))
    activity: np.ndarray  # (U,) expected sessions
    exploration: np.ndarray  # (U,) probability that the next song jumps anywhere

    def __len__(self) -> int:
        return len(self.user_id)

    def to_frame(self) -> pd.DataFrame:
        data = {
            "user_id": self.user_id.astype(np.int64),
            "origin": self.origin,
            "lastfm_user_id": self.lastfm_user_id.astype(np.int64),
        }
        for g, genre in enumerate(self.genres):
            data[f"affinity_{genre}"] = self.affinity[:, g].astype(np.float32)
        data.update(
            pref_tempo=self.pref_tempo.astype(np.float32),
            pref_energy=self.pref_energy.astype(np.float32),
            pref_mode=self.pref_mode.astype(np.float32),
            pref_vocal=self.pref_vocal.astype(np.float32),
        )
        for f, family in enumerate(FAMILY_NAMES):
            data[f"pref_family_{family}"] = self.pref_family[:, f].astype(np.float32)
        data.update(activity=self.activity.astype(np.float32), exploration=self.exploration.astype(np.float32))
        return pd.DataFrame(data)


def _draw_taste(rng: np.random.Generator, n: int) -> dict[str, np.ndarray]:
    return dict(
        pref_tempo=rng.normal(0.0, 1.0, n),
        pref_energy=rng.normal(0.0, 1.0, n),
        pref_mode=rng.normal(0.0, 1.0, n),
        pref_vocal=rng.normal(0.0, 1.0, n),
        pref_family=rng.normal(0.0, 1.0, (n, len(FAMILY_NAMES))),
        activity=np.exp(rng.normal(np.log(4.0), 0.6, n)),
        exploration=rng.beta(2.0, 8.0, n),
    )


def synthetic_listeners(rng: np.random.Generator, n: int, genres: tuple[str, ...]) -> Listeners:
    affinity = rng.dirichlet(np.full(len(genres), 0.5), size=n)
    return Listeners(
        user_id=np.arange(1, n + 1, dtype=np.int64),
        origin=["synthetic"] * n,
        lastfm_user_id=np.full(n, -1, dtype=np.int64),
        genres=genres,
        affinity=affinity,
        **_draw_taste(rng, n),
    )


@lru_cache(maxsize=1)
def genre_keywords() -> dict[str, list[str]]:
    return yaml.safe_load(GENRE_KEYWORDS_FILE.read_text())


def read_lastfm_tag_counts(folder: str | Path) -> pd.DataFrame:
    """(userID, tagValue, count) from HetRec 2011 Last.fm-2k (CRLF, tab-separated, two parts)."""
    folder = Path(folder)
    parts = sorted(folder.glob("user_taggedartists*.dat"))
    if not parts:
        raise FileNotFoundError(f"no user_taggedartists*.dat under {folder}")
    # read_csv strips the CR of CRLF with the default C engine; each part has its own header
    tagged = pd.concat([pd.read_csv(p, sep="\t", usecols=["userID", "tagID"]) for p in parts], ignore_index=True)
    tags = pd.read_csv(folder / "tags.dat", sep="\t", encoding="latin-1")
    tags["tagValue"] = tags["tagValue"].astype(str).str.strip().str.lower()
    merged = tagged.merge(tags, on="tagID", how="inner")
    return merged.groupby(["userID", "tagValue"]).size().rename("count").reset_index()


def lastfm_affinities(folder: str | Path, genres: tuple[str, ...]) -> tuple[np.ndarray, np.ndarray]:
    """(lastfm user ids, (users, G) affinities) for the users with at least one mapped tag."""
    keywords = genre_keywords()
    counts = read_lastfm_tag_counts(folder)
    unique_tags = counts["tagValue"].unique()
    hits = np.zeros((len(unique_tags), len(genres)))
    for g, genre in enumerate(genres):
        for k in keywords.get(genre, [genre.replace("_", " ")]):
            hits[:, g] += np.fromiter((k in t for t in unique_tags), bool, len(unique_tags))
    hits = np.minimum(hits, 1.0)
    tag_index = {t: i for i, t in enumerate(unique_tags)}
    rows = hits[counts["tagValue"].map(tag_index).to_numpy()] * counts["count"].to_numpy()[:, None]
    per_user = pd.DataFrame(rows, columns=list(genres)).groupby(counts["userID"].to_numpy()).sum()
    per_user = per_user[per_user.sum(axis=1) > 0].sort_index()
    raw = per_user.to_numpy()
    raw /= raw.sum(axis=1, keepdims=True)
    affinity = (1 - AFFINITY_SMOOTHING) * raw + AFFINITY_SMOOTHING / len(genres)
    return per_user.index.to_numpy(dtype=np.int64), affinity


def lastfm_listeners(rng: np.random.Generator, n: int, genres: tuple[str, ...], folder: str | Path) -> Listeners:
    """`n` listeners with the genre affinities of real Last.fm users (sampled with replacement
    only when `n` exceeds the users whose tags map onto the world's genres)."""
    ids, affinity = lastfm_affinities(folder, genres)
    if len(ids) == 0:
        raise ValueError(f"no Last.fm user under {folder} has a tag that maps onto the genres {genres}")
    pick = rng.choice(len(ids), size=n, replace=n > len(ids))
    return Listeners(
        user_id=np.arange(1, n + 1, dtype=np.int64),
        origin=["lastfm"] * n,
        lastfm_user_id=ids[pick],
        genres=genres,
        affinity=affinity[pick],
        **_draw_taste(rng, n),
    )


def make_listeners(rng: np.random.Generator, spec: str, n: int, genres: tuple[str, ...]) -> Listeners:
    if spec == "synthetic":
        return synthetic_listeners(rng, n, genres)
    if spec.startswith("lastfm:"):
        return lastfm_listeners(rng, n, genres, spec[len("lastfm:") :])
    raise ValueError(f"unknown listeners {spec!r}: use 'synthetic' or 'lastfm:PATH'")


def listeners_from_frame(frame: pd.DataFrame) -> Listeners:
    """Rebuild `Listeners` from listeners.parquet (the inverse of `Listeners.to_frame`)."""
    genres = tuple(c[len("affinity_") :] for c in frame.columns if c.startswith("affinity_"))
    return Listeners(
        user_id=frame["user_id"].to_numpy(np.int64),
        origin=list(frame["origin"]),
        lastfm_user_id=frame["lastfm_user_id"].to_numpy(np.int64),
        genres=genres,
        affinity=frame[[f"affinity_{g}" for g in genres]].to_numpy(np.float64),
        pref_tempo=frame["pref_tempo"].to_numpy(np.float64),
        pref_energy=frame["pref_energy"].to_numpy(np.float64),
        pref_mode=frame["pref_mode"].to_numpy(np.float64),
        pref_vocal=frame["pref_vocal"].to_numpy(np.float64),
        pref_family=frame[[f"pref_family_{f}" for f in FAMILY_NAMES]].to_numpy(np.float64),
        activity=frame["activity"].to_numpy(np.float64),
        exploration=frame["exploration"].to_numpy(np.float64),
    )
