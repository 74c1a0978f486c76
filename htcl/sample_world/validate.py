"""Does the world have the intended structure? Shown with simple models, not asserted by construction.

- genre and sung language are predictable from plain audio features (above chance);
- the hidden taste factors (tempo, energy, mode, vocal presence, instrument family) are
  predictable from the same features;
- favor is predicted better from the true taste factors than from genre alone (AUC).

All figures are cross-validated with fixed seeds, so they are reproducible and honest on small
worlds. `validate_world(dir)` recomputes everything from the written files.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
from sklearn.linear_model import LogisticRegression, RidgeCV
from sklearn.metrics import r2_score, roc_auc_score
from sklearn.model_selection import GroupKFold, KFold, StratifiedKFold, cross_val_predict
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler

from htcl import schema
from htcl.evaluation import linear_probe
from htcl.sample_world.artists import FAMILY_NAMES
from htcl.sample_world.behaviour import SongFactors, TasteModel
from htcl.sample_world.features import audio_features
from htcl.sample_world.listeners import listeners_from_frame

SEED = 0


def classification_figure(X: np.ndarray, labels, groups=None, seed: int = SEED) -> dict:
    """Cross-validated accuracy against chance: htcl.evaluation.linear_probe (songs split at random
    with groups=None, whole artists held out with `groups`), ridge penalty from 1e-1 to 1e4."""
    return linear_probe(X, labels, groups, folds=5, seed=seed, alphas=np.logspace(-1, 4, 12))


def regression_figure(X: np.ndarray, target, groups=None, seed: int = SEED) -> dict:
    """Cross-validated R² of a ridge regression (songs at random, or whole artists held out)."""
    y = np.asarray(target, dtype=np.float64)
    model = make_pipeline(StandardScaler(), RidgeCV(alphas=np.logspace(-1, 4, 12)))
    if groups is None:
        pred = cross_val_predict(model, X, y, cv=KFold(n_splits=5, shuffle=True, random_state=seed))
    else:
        g = np.asarray(groups)
        cv = GroupKFold(n_splits=int(min(5, len(np.unique(g)))))
        pred = cross_val_predict(model, X, y, cv=cv, groups=g)
    return {"n": int(len(y)), "r2": float(r2_score(y, pred))}


def songs_from_truth(truth: pd.DataFrame, genres: tuple[str, ...]) -> SongFactors:
    truth = truth.sort_values(schema.SONG_ID)
    return SongFactors(
        genre=truth[schema.GENRE].map({g: i for i, g in enumerate(genres)}).to_numpy(np.int64),
        popularity=truth["popularity"].to_numpy(np.float64),
        tempo=truth["taste_tempo"].to_numpy(np.float64),
        energy=truth["taste_energy"].to_numpy(np.float64),
        mode=np.where(truth["mode"] == "major", 1.0, -1.0),
        vocal=np.where(truth["vocal"], 1.0, -1.0),
        family=truth["instrument_family"].map({f: i for i, f in enumerate(FAMILY_NAMES)}).to_numpy(np.int64),
        n_families=len(FAMILY_NAMES),
        duration_s=truth["duration_s"].to_numpy(np.float64),
    )


def favor_figures(
    interactions: pd.DataFrame, truth: pd.DataFrame, listeners_frame: pd.DataFrame, seed: int = SEED
) -> dict:
    """Favor AUC (cross-validated logistic regression) from taste factors vs from genre alone.

    taste: trigger-candidate similarity in the hidden taste space, and the listener's taste match.
    genre: same genre as the trigger, the listener's affinity for the candidate's genre, and the
    candidate's genre (one-hot): everything genre can tell.
    """
    listeners = listeners_from_frame(listeners_frame)
    songs = songs_from_truth(truth, listeners.genres)
    taste = TasteModel(songs, listeners, np.random.default_rng(seed))
    u = interactions[schema.USER_ID].to_numpy() - 1
    trig = interactions[schema.TRIGGER_SONG_ID].to_numpy() - 1
    rec = interactions[schema.REC_SONG_ID].to_numpy() - 1
    y = interactions[schema.FAVORED].to_numpy().astype(int)
    out = {"impressions": int(len(y)), "favors": int(y.sum()), "clicks": int(interactions[schema.CLICKED].sum())}
    match = np.empty(len(u))
    affinity = np.empty(len(u))
    for user in np.unique(u):
        rows = np.flatnonzero(u == user)
        match[rows] = taste.match(int(user), rec[rows])
        affinity[rows] = taste.affinity(int(user), rec[rows])
    X_taste = np.column_stack([taste.similarity(trig, rec), match])
    genre_onehot = np.eye(len(listeners.genres))[songs.genre[rec]]
    X_genre = np.column_stack([songs.genre[trig] == songs.genre[rec], affinity, genre_onehot])
    clicked = interactions[schema.CLICKED].to_numpy(bool)
    # favor over all impressions (CTR x CVR), and favor given click (the CVR label)
    for suffix, rows in (("", np.ones(len(y), dtype=bool)), ("_given_click", clicked)):
        n_pos = int(y[rows].sum())
        if min(n_pos, int(rows.sum()) - n_pos) < 5:
            out.update({f"auc_taste{suffix}": float("nan"), f"auc_genre{suffix}": float("nan")})
            continue
        folds = StratifiedKFold(n_splits=5, shuffle=True, random_state=seed)
        for name, X in (("taste", X_taste), ("genre", X_genre)):
            model = make_pipeline(StandardScaler(), LogisticRegression(max_iter=2000))
            p = cross_val_predict(model, X[rows], y[rows], cv=folds, method="predict_proba")[:, 1]
            out[f"auc_{name}{suffix}"] = float(roc_auc_score(y[rows], p))
    return out


# (key, truth column, kind): the audible factors checked against the audio features
AUDIO_TARGETS = (
    ("genre", schema.GENRE, "class"),
    ("language", schema.LANGUAGE, "class"),  # sung songs only
    ("vocal", "vocal", "class"),
    ("mode", "mode", "class"),
    ("family", "instrument_family", "class"),
    ("tempo", "taste_tempo", "regression"),
    ("energy", "taste_energy", "regression"),
)


def structure_figures(
    features: np.ndarray,
    truth: pd.DataFrame,
    interactions: pd.DataFrame,
    listeners_frame: pd.DataFrame,
    seed: int = SEED,
) -> dict:
    """All structure figures; `features` rows align with `truth` sorted by song_id.

    Each audio figure is computed twice: songs split at random, and whole artists held out
    (the honest one: an artist's persistent sound cannot carry the label across the split).
    """
    order = np.argsort(truth[schema.SONG_ID].to_numpy(), kind="stable")
    truth = truth.iloc[order].reset_index(drop=True)
    X = np.asarray(features, dtype=np.float64)
    vocal = truth["vocal"].to_numpy(bool)
    artist = truth["artist_id"].to_numpy()
    figures: dict = {}
    for key, column, kind in AUDIO_TARGETS:
        rows = vocal if key == "language" else np.ones(len(truth), dtype=bool)
        target = truth.loc[rows, column].to_numpy()
        figure = classification_figure if kind == "class" else regression_figure
        figures[f"{key}_from_audio"] = {
            "songs_split": figure(X[rows], target, None, seed),
            "artists_held_out": figure(X[rows], target, artist[rows], seed),
        }
    figures["favor"] = favor_figures(interactions, truth, listeners_frame, seed)
    return figures


def validate_world(out_dir: str | Path, seed: int = SEED) -> dict:
    """Recompute the structure figures from a written world (decodes every audio file)."""
    from htcl.audio import load_audio

    out_dir = Path(out_dir)
    from htcl.mels import read_catalog

    catalog = read_catalog(out_dir / "catalog.parquet").sort_values(schema.SONG_ID)  # audio paths resolved
    truth = pd.read_parquet(out_dir / "truth.parquet").sort_values(schema.SONG_ID)
    sr = 16000
    features = np.stack([audio_features(load_audio(p, sample_rate=sr), sr) for p in catalog[schema.AUDIO_PATH]])
    return structure_figures(
        features,
        truth,
        pd.read_parquet(out_dir / "interactions.parquet"),
        pd.read_parquet(out_dir / "listeners.parquet"),
        seed,
    )


def figures_table(figures: dict) -> list[tuple[str, ...]]:
    """(figure, songs split at random, artists held out, baseline) rows for the card and the CLI."""

    def cls(f: dict) -> str:
        if f["classes"] < 2:
            return "n/a (too few artists per class)"
        return f"{f['accuracy']:.3f} (chance {f['chance']:.3f}; n={f['n']}, {f['classes']} classes)"

    rows = []
    for key, label in (
        ("genre_from_audio", "genre accuracy"),
        ("language_from_audio", "sung-language accuracy (sung songs)"),
        ("vocal_from_audio", "vocal presence accuracy"),
        ("mode_from_audio", "mode (major/minor) accuracy"),
        ("family_from_audio", "instrument family accuracy"),
    ):
        f = figures[key]
        rows.append((label, cls(f["songs_split"]), cls(f["artists_held_out"]), "majority-class share"))
    for key, label in (("tempo_from_audio", "tempo (log bpm) R²"), ("energy_from_audio", "energy R²")):
        f = figures[key]
        rows.append(
            (label, f"{f['songs_split']['r2']:.3f}", f"{f['artists_held_out']['r2']:.3f}", "0 (predicting the mean)")
        )
    fav = figures["favor"]
    for key, label in (("auc_taste", "true taste factors"), ("auc_genre", "genre alone")):
        rows.append(
            (
                f"favor AUC from {label} (all impressions / clicked only)",
                f"{fav[key]:.3f} / {fav.get(key + '_given_click', float('nan')):.3f}",
                "",
                "0.5",
            )
        )
    return rows
