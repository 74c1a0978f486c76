"""Evaluation: the paper's comparison of embedding variants, on held-out (later) data.

For each variant (a song -> vector map) it measures
- semantics: genre and sung-language accuracy of a linear probe on the frozen embeddings,
  cross-validated with whole artists held out per fold (`linear_probe`);
- matching: hit-rate@K of trigger -> favored song over the catalog minus the trigger, exact
  cosine ranking, on the favor pairs of the held-out period (`hit_rate_at_k`);
- ranking: CTR and CVR AUC of the XGBoost rankers (htcl/ranking.py) trained on the training
  period with that variant's embedding features, plus a ranker with no embedding features;
- the trigger-favored vs trigger-random cosine histograms (the paper's Figure 2);
- optionally, genre on real recordings: `read_audio_manifest` -> `load_manifest_audio` -> each
  variant's embeddings of those waveforms -> `real_audio_probe`, passed to
  `compare_variants(real_audio=...)` as a "Real-audio genre acc." column.
Two model families are compared: from scratch (STAGE1, HTCL, HTCL_CF) and on a pretrained
tagger backbone (BACKBONE_AS_IS, STAGE1_BACKBONE, HTCL_BACKBONE, HTCL_CF_BACKBONE); see
FAMILY_VARIANTS and `check_claims`.
`write_report` writes results.json, results.md (the paper's table shape) and the plots.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Mapping, Sequence

import numpy as np
import pandas as pd

from htcl import schema as S
from htcl.intervals import bootstrap_ci
from htcl.plots import plot_training_curves, save_figure
from htcl.ranking import CANDIDATE_EMBEDDING, TRIGGER_EMBEDDING, RankerParams, RankingError, ranker_auc, train_rankers

# Variant names, in the paper's table order. "no embedding" exists for the rankers only.
RANDOM_INIT = "random-init encoder"
MEL_STATS = "mel statistics"
STAGE1 = "stage 1 (CLAP-style)"
HTCL = "HTCL"
HTCL_CF = "HTCL_w_CF"
NO_EMBEDDING = "no embedding (stats only)"
INSTRUMENTAL = "instrumental"
# The backbone family: a pretrained music tagger (musicnn) as the audio front, as is and with the
# same stage 1 / HTCL / HTCL_w_CF training on top.
BACKBONE_AS_IS = "backbone as is (musicnn)"
STAGE1_BACKBONE = "stage 1 (backbone)"
HTCL_BACKBONE = "HTCL (backbone)"
HTCL_CF_BACKBONE = "HTCL_w_CF (backbone)"
# Each family's trained variants: (stage 1, HTCL, HTCL_w_CF).
FAMILY_VARIANTS = {"scratch": (STAGE1, HTCL, HTCL_CF), "backbone": (STAGE1_BACKBONE, HTCL_BACKBONE, HTCL_CF_BACKBONE)}
# Every row name htcl gives its own variants; an external table (`--embeddings NAME=PATH`) may not take one.
BUILTIN_VARIANTS = (
    RANDOM_INIT,
    MEL_STATS,
    STAGE1,
    HTCL,
    HTCL_CF,
    NO_EMBEDDING,
    BACKBONE_AS_IS,
    STAGE1_BACKBONE,
    HTCL_BACKBONE,
    HTCL_CF_BACKBONE,
)


@dataclass
class Embeddings:
    """One variant's vectors: song_ids (n,) and unit rows (n, D), aligned.

    covered (n,) bool, for an external table (`read_external_embeddings`): False where the table
    has no vector for a catalog song. Such a song keeps a zero row (cosine 0 with everything, the
    rankers' features of a zero vector, a zero vector in the probes) and every favor pair it is
    in counts as a miss. None = every row is a real vector."""

    song_ids: np.ndarray
    vectors: np.ndarray
    covered: np.ndarray | None = None

    def __post_init__(self):
        self.song_ids = np.asarray(self.song_ids, dtype=np.int64)
        v = np.asarray(self.vectors, dtype=np.float32)
        self.vectors = v / np.maximum(np.linalg.norm(v, axis=1, keepdims=True), 1e-12)
        if self.covered is not None:
            self.covered = np.asarray(self.covered, dtype=bool)
            if self.covered.shape != self.song_ids.shape:
                raise ValueError(f"covered {self.covered.shape} does not align with {len(self.song_ids)} songs")
        self._row = {int(s): i for i, s in enumerate(self.song_ids)}

    def rows(self, ids) -> np.ndarray:
        """Row positions of song ids; -1 where the variant has no vector for a song."""
        return np.array([self._row.get(int(i), -1) for i in ids], dtype=np.int64)

    def lookup(self, ids) -> np.ndarray:
        rows = self.rows(ids)
        if (rows < 0).any():
            raise KeyError(f"no embedding for song(s) {sorted(set(np.asarray(ids)[rows < 0].tolist()))[:5]}")
        return self.vectors[rows]


def mel_statistics(mels: Mapping[int, np.ndarray]) -> Embeddings:
    """The hand-crafted baseline: per-band mean and std of the log-Mel over time, (n, 2·M),
    standardized over the catalog so every band weighs the same in the cosine."""
    ids = np.array(sorted(mels), dtype=np.int64)
    feats = np.stack([np.concatenate([mels[i].mean(axis=1), mels[i].std(axis=1)]) for i in ids]).astype(np.float64)
    feats = (feats - feats.mean(axis=0)) / (feats.std(axis=0) + 1e-6)
    return Embeddings(ids, feats.astype(np.float32))


EXTERNAL_ID, EXTERNAL_VECTOR = "song_id", "embedding"


def _parse_vector(cell) -> np.ndarray:
    """One table cell -> float64 (D,): a list/array (Parquet), or text: a JSON-style list
    "[0.1, 0.2]" or whitespace-separated floats "0.1 0.2" (CSV)."""
    if cell is None or (isinstance(cell, float) and np.isnan(cell)):
        raise ValueError("empty embedding")
    if isinstance(cell, str):
        text = cell.strip()
        if text.startswith("["):
            if not text.endswith("]"):
                raise ValueError(f"unterminated list {text[:40]!r}")
            text = text[1:-1].replace(",", " ")
        elif "," in text:
            raise ValueError(f"commas outside a [...] list in {text[:40]!r}")
        try:
            values = [float(t) for t in text.split()]
        except ValueError as e:
            raise ValueError(f"not a list of numbers ({e})") from None
        return np.asarray(values, dtype=np.float64)
    try:
        return np.asarray(cell, dtype=np.float64).reshape(-1)
    except (TypeError, ValueError) as e:
        raise ValueError(f"not a list of numbers ({e})") from None


def read_external_embeddings(path: str | Path, catalog_ids) -> tuple[Embeddings, dict]:
    """An embedding table from outside htcl (a team's CF or item2vec vectors, a vendor's, an
    off-the-shelf model's) as a variant over the catalog, and its coverage.

    The table: Parquet (.parquet/.pq; `embedding` a list or fixed-size list of floats) or CSV
    (.csv; `embedding` a JSON-style list "[0.1, 0.2, ...]" or whitespace-separated floats
    "0.1 0.2 ..."), with an integer `song_id` and an `embedding` of the same length in every row;
    other columns are ignored, and so are songs not in the catalog. The vectors are L2-normalised
    like every variant's. A catalog song the table lacks keeps a zero row with covered False
    (see `Embeddings`): never dropped, scored as a miss.

    Returns (Embeddings over the sorted catalog ids, coverage {"file", "dim", "catalog_songs",
    "covered", "missing", "missing_song_ids" (the first 20), "not_in_catalog"}). Raises ValueError
    naming the file, and the row (1-based data row and song_id) where it applies, for: no such
    file, an unknown format, an unreadable file, a missing column, no rows, a song_id that is not
    an integer, an empty or unparsable embedding, a length that differs from the first row's,
    NaN or inf, a duplicate song_id, and a table sharing no song with the catalog.
    """
    path = Path(path).absolute()
    suffix = path.suffix.lower()
    if not path.is_file():
        raise ValueError(f"{path}: no such embeddings file")
    if suffix not in (".parquet", ".pq", ".csv"):
        raise ValueError(f"{path}: unknown embeddings format {suffix!r} (expected .parquet or .csv)")
    try:
        if suffix == ".csv":
            df = pd.read_csv(path, dtype={EXTERNAL_VECTOR: str}, keep_default_na=False, na_values=[""])
        else:
            df = pd.read_parquet(path)
    except Exception as e:  # noqa: BLE001 - pandas/pyarrow parse errors come in many types
        raise ValueError(f"{path}: cannot read the embeddings table: {type(e).__name__}: {e}") from None
    for col in (EXTERNAL_ID, EXTERNAL_VECTOR):
        if col not in df.columns:
            raise ValueError(f"{path}: no {col!r} column; columns are {list(df.columns)}")
    if df.empty:
        raise ValueError(f"{path}: no rows")
    df = df.reset_index(drop=True)

    def where(i: int, song=None) -> str:
        return f"{path}: data row {i + 1}" + ("" if song is None else f" (song_id {song})")

    ids = np.empty(len(df), dtype=np.int64)
    for i, v in enumerate(df[EXTERNAL_ID]):
        try:
            f = float(v)
            if not np.isfinite(f) or f != int(f):
                raise ValueError
        except (TypeError, ValueError):
            raise ValueError(f"{where(i)}: song_id {v!r} is not an integer") from None
        ids[i] = int(f)
    vectors = []
    for i, cell in enumerate(df[EXTERNAL_VECTOR]):
        try:
            v = _parse_vector(cell)
        except ValueError as e:
            raise ValueError(f"{where(i, ids[i])}: {e}") from None
        if len(v) == 0:
            raise ValueError(f"{where(i, ids[i])}: empty embedding")
        if vectors and len(v) != len(vectors[0]):
            raise ValueError(f"{where(i, ids[i])}: embedding has {len(v)} values, the first row has {len(vectors[0])}")
        if not np.isfinite(v).all():
            raise ValueError(f"{where(i, ids[i])}: embedding has NaN or inf")
        vectors.append(v)
    uniq, first, counts = np.unique(ids, return_index=True, return_counts=True)
    if (counts > 1).any():
        dup = uniq[counts > 1][0]
        rows = np.flatnonzero(ids == dup)[:2]
        raise ValueError(f"{where(rows[1], dup)}: duplicate song_id, first at data row {rows[0] + 1}")
    x = np.stack(vectors)
    catalog = np.unique(np.asarray(catalog_ids, dtype=np.int64))
    in_table = {int(s): i for i, s in enumerate(ids)}
    rows_of = np.array([in_table.get(int(s), -1) for s in catalog], dtype=np.int64)
    covered = rows_of >= 0
    if not covered.any():
        raise ValueError(
            f"{path}: none of its {len(ids)} song_id(s) is in the catalog of {len(catalog)} songs "
            f"(e.g. {ids[:3].tolist()} vs {catalog[:3].tolist()})"
        )
    full = np.zeros((len(catalog), x.shape[1]), dtype=np.float32)
    full[covered] = x[rows_of[covered]]
    coverage = {
        "file": str(path),
        "dim": int(x.shape[1]),
        "catalog_songs": int(len(catalog)),
        "covered": int(covered.sum()),
        "missing": int((~covered).sum()),
        "missing_song_ids": catalog[~covered][:20].tolist(),
        "not_in_catalog": int(len(ids) - covered.sum()),
    }
    return Embeddings(catalog, full, covered=covered), coverage


# --- semantics ------------------------------------------------------------------------------


def linear_probe(
    x: np.ndarray,
    labels,
    groups=None,
    folds: int = 5,
    seed: int = 0,
    alphas: np.ndarray = np.logspace(-2, 4, 13),
    return_predictions: bool = False,
) -> dict:
    """Cross-validated accuracy of a linear classifier on frozen features, against chance (the
    majority class's share of the songs scored).

    With `groups` (the artist of each song) whole groups are held out per fold, so a classifier
    cannot lean on recognising an artist it heard in training; groups=None splits songs at random
    (stratified). A class needs a song (artist) in training and in test: classes with fewer than
    two are left out. The sample world's structure figures use the same probe.

    return_predictions: also `out["predictions"]`, an object array aligned with `labels` holding
    each song's out-of-fold predicted label, None for the songs not scored (a class left out, or
    fewer than two classes). Not JSON: drop it before saving the dict.
    """
    from sklearn.linear_model import RidgeClassifierCV
    from sklearn.metrics import accuracy_score
    from sklearn.model_selection import StratifiedGroupKFold, StratifiedKFold, cross_val_predict
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    y = np.asarray(labels)
    g = np.arange(len(y)) if groups is None else np.asarray(groups)
    keep = np.ones(len(y), dtype=bool)
    for c in np.unique(y):
        if len(np.unique(g[y == c])) < 2:
            keep &= y != c
    x, y, g = x[keep], y[keep], g[keep]
    classes, counts = np.unique(y, return_counts=True)
    out = {
        "n": int(len(y)),
        "classes": int(len(classes)),
        "chance": float(counts.max() / len(y)) if len(y) else float("nan"),
        "accuracy": float("nan"),
    }
    if return_predictions:
        out["predictions"] = np.full(len(keep), None, dtype=object)
    if len(classes) < 2:
        return out
    n_splits = int(min(folds, min(len(np.unique(g[y == c])) for c in classes)))
    # Ridge classifier, penalty chosen inside each training fold: as accurate as logistic
    # regression on these sizes and far faster (300-song world: genre 0.38 vs 0.41 with artists
    # held out) where lbfgs on ~400 correlated features took minutes on 2,000 songs.
    model = make_pipeline(StandardScaler(), RidgeClassifierCV(alphas=alphas))
    if groups is None:
        cv = StratifiedKFold(n_splits=n_splits, shuffle=True, random_state=seed)
        pred = cross_val_predict(model, x, y, cv=cv)
    else:
        cv = StratifiedGroupKFold(n_splits=n_splits, shuffle=True, random_state=seed)
        pred = cross_val_predict(model, x, y, cv=cv, groups=g)
    out["accuracy"] = float(accuracy_score(y, pred))
    if return_predictions:
        out["predictions"][np.flatnonzero(keep)] = list(pred)
    return out


def _probe(
    x: np.ndarray, labels: pd.Series, groups, ids, folds: int, seed: int, per_song: dict | None, what: str
) -> dict:
    """linear_probe; with per_song, per_song[what] = (song ids, 1/0 correct, NaN where not scored)."""
    out = linear_probe(x, labels, groups, folds, seed, return_predictions=per_song is not None)
    if per_song is not None:
        pred = out.pop("predictions")
        y = np.asarray(labels).astype(str)
        scored = np.array([p is not None for p in pred], dtype=bool)
        correct = np.full(len(y), np.nan)
        correct[scored] = (pred[scored].astype(str) == y[scored]).astype(np.float64)
        per_song[what] = (np.asarray(ids, dtype=np.int64), correct)
    return out


def semantic_probes(
    emb: Embeddings, catalog: pd.DataFrame, folds: int, seed: int, per_song: dict | None = None
) -> dict:
    """Genre accuracy over every song; language accuracy over sung songs (instrumental left out).
    A song an external table lacks (emb.covered False) is probed with its zero vector.
    per_song: a dict to fill with each probe's per-song correct/incorrect ("genre", "language":
    (song ids, 1.0/0.0, NaN where not scored)), what the paired claims resample."""
    cat = catalog[catalog[S.SONG_ID].isin(emb.song_ids)]
    x = emb.lookup(cat[S.SONG_ID])
    out = {}
    if S.GENRE in cat:
        has = cat[S.GENRE].fillna("").astype(str) != ""
        out["genre"] = _probe(
            x[has.to_numpy()],
            cat.loc[has, S.GENRE].astype(str),
            cat.loc[has, S.ARTIST],
            cat.loc[has, S.SONG_ID],
            folds,
            seed,
            per_song,
            "genre",
        )
    if S.LANGUAGE in cat:
        lang = cat[S.LANGUAGE].fillna("").astype(str)
        sung = ((lang != "") & (lang != INSTRUMENTAL)).to_numpy()
        out["language"] = _probe(
            x[sung], lang[sung], cat.loc[sung, S.ARTIST], cat.loc[sung, S.SONG_ID], folds, seed, per_song, "language"
        )
    return out


# --- real recordings ------------------------------------------------------------------------

MANIFEST_PATH_COLUMNS = ("path", "file")  # the first one present is used
MANIFEST_LABEL_COLUMNS = ("label", "genre")
MANIFEST_GROUP_COLUMN = "group"


def _manifest_column(df: pd.DataFrame, names: Sequence[str], manifest: Path, what: str) -> str:
    for name in names:
        if name in df.columns:
            return name
    wanted = " or ".join(repr(n) for n in names)
    raise ValueError(f"{manifest}: no {what} column (expected {wanted}); columns are {list(df.columns)}")


def _blank(values: pd.Series) -> np.ndarray:
    """True where a manifest cell is missing or only whitespace."""
    return (values.isna() | (values.astype(str).str.strip() == "")).to_numpy()


def read_audio_manifest(path: str | Path) -> pd.DataFrame:
    """A labelled set of real recordings: columns path (absolute str), label (str), group (str, or
    None in every row when the manifest has no `group` column).

    The manifest is a TSV (.tsv/.tab), CSV (.csv) or Parquet (.parquet/.pq) table with a path
    column (`path`, or `file`), a label column (`label`, or `genre`) and optionally `group` (e.g.
    the artist: `real_audio_probe` then holds whole groups out per fold). Other columns are
    ignored. Relative paths resolve against the manifest's own folder; URIs (s3://...) are kept.
    Raises ValueError naming the manifest for an unknown format, a missing column, or a row
    with an empty path, label or group.
    """
    manifest = Path(path).absolute()
    suffix = manifest.suffix.lower()
    if not manifest.is_file():
        raise ValueError(f"{manifest}: no such manifest file")
    if suffix not in (".tsv", ".tab", ".csv", ".parquet", ".pq"):
        raise ValueError(f"{manifest}: unknown manifest format {suffix!r} (expected .tsv, .csv or .parquet)")
    text = suffix in (".tsv", ".tab", ".csv")
    try:
        if text:  # every cell as text, NaN only for empty cells (a genre named "NA" stays one)
            df = pd.read_csv(
                manifest, sep="," if suffix == ".csv" else "\t", dtype=str, keep_default_na=False, na_values=[""]
            )
        else:
            df = pd.read_parquet(manifest)
    except Exception as e:  # noqa: BLE001 - pandas/pyarrow parse errors come in many types
        raise ValueError(f"{manifest}: cannot read the manifest: {type(e).__name__}: {e}") from None
    row_name, first_row = ("line", 2) if text else ("row", 0)  # a text file's header is line 1
    df = df.reset_index(drop=True)
    path_col = _manifest_column(df, MANIFEST_PATH_COLUMNS, manifest, "path")
    label_col = _manifest_column(df, MANIFEST_LABEL_COLUMNS, manifest, "label")
    columns = [(path_col, "path"), (label_col, "label")]
    if MANIFEST_GROUP_COLUMN in df.columns:
        columns.append((MANIFEST_GROUP_COLUMN, "group"))
    for col, what in columns:
        blank = np.flatnonzero(_blank(df[col]))
        if len(blank):
            where = ", ".join(str(first_row + i) for i in blank[:5]) + (" ..." if len(blank) > 5 else "")
            raise ValueError(f"{manifest}: empty {what} ({col!r}) in {len(blank)} row(s), {row_name} {where}")
    if df.empty:
        raise ValueError(f"{manifest}: no rows")

    def resolve(p: str) -> str:
        p = p.strip()
        if "://" in p:
            return p
        return os.path.normpath(manifest.parent / Path(p).expanduser())

    has_group = MANIFEST_GROUP_COLUMN in df.columns
    return pd.DataFrame(
        {
            "path": [resolve(str(p)) for p in df[path_col]],
            "label": df[label_col].astype(str).str.strip().to_numpy(),
            "group": df[MANIFEST_GROUP_COLUMN].astype(str).str.strip().to_numpy() if has_group else [None] * len(df),
        }
    )


def load_manifest_audio(
    manifest_df: pd.DataFrame, sample_rate: int = 16000, max_seconds: float | None = 30.0, progress: bool = True
) -> tuple[list[np.ndarray], list[dict]]:
    """Decode every file of a manifest (`read_audio_manifest`) with `htcl.audio.load_audio`: the
    waveforms (T,) float32 of the files that decoded, in manifest order, and one dict per file
    that did not: {"row": position in manifest_df, "path", "reason", "cause"} (reason: the
    AudioDecodeError kind, e.g. missing, not_audio, truncated; "error" for anything else). A bad
    file is reported and left out, never fatal. The rows that loaded:

        waves, failed = load_manifest_audio(df)
        kept = df.drop(index=df.index[[f["row"] for f in failed]])   # aligned with waves
    """
    import sys

    from tqdm.auto import tqdm

    from htcl.audio import AudioDecodeError, load_audio

    waves: list[np.ndarray] = []
    failed: list[dict] = []
    paths = list(manifest_df["path"])
    for row, p in enumerate(tqdm(paths, desc="loading real audio", unit="file", file=sys.stderr, disable=not progress)):
        try:
            waves.append(load_audio(p, sample_rate=sample_rate, max_seconds=max_seconds))
        except AudioDecodeError as e:
            failed.append({"row": row, "path": str(p), "reason": e.reason, "cause": e.cause})
        except Exception as e:  # noqa: BLE001 - one odd file (resampler, permissions, ...) must not end the run
            failed.append({"row": row, "path": str(p), "reason": "error", "cause": f"{type(e).__name__}: {e}"})
    if failed and progress:
        print(
            f"load_manifest_audio: {len(failed)} of {len(paths)} file(s) left out, e.g. "
            f"{failed[0]['path']}: {failed[0]['reason']}",
            file=sys.stderr,
            flush=True,
        )
    return waves, failed


def real_audio_probe(
    features: np.ndarray, labels, groups=None, folds: int = 5, seed: int = 0, return_correct: bool = False
) -> dict:
    """Genre (label) accuracy of `linear_probe` on one variant's features of the real recordings
    (n, d), with `accuracy_ci95`, the 95% bootstrap interval over the songs (resampling the
    per-song correct/incorrect vector), and `per_class` accuracy. groups (e.g. the artists, n,)
    hold whole groups out per fold; None splits songs at random (stratified). JSON-ready; the
    value `compare_variants(real_audio={variant: ...})` expects.

    return_correct: also `out["_correct"]`, each recording's 1.0/0.0 (NaN where not scored), in
    the order of `labels`: compare_variants moves it out of the row (not JSON) and pairs the
    variants' real-audio claims over the recordings with it."""
    x = np.asarray(features, dtype=np.float64)
    y = np.asarray(labels).astype(str)
    if x.ndim != 2 or len(x) != len(y):
        raise ValueError(f"real_audio_probe: features {x.shape} and {len(y)} labels do not align (want (n, d) and n)")
    if groups is not None:
        groups = np.asarray(groups)
        if len(groups) != len(y):
            raise ValueError(f"real_audio_probe: {len(groups)} groups for {len(y)} labels")
    out = linear_probe(x, y, groups, folds, seed, return_predictions=True)
    pred = out.pop("predictions")
    scored = np.array([p is not None for p in pred], dtype=bool)
    correct = (pred[scored].astype(str) == y[scored]).astype(np.float64)
    out["accuracy_ci95"] = bootstrap_ci(correct, seed=seed) if scored.any() else [float("nan"), float("nan")]
    out["per_class"] = {str(c): float(correct[y[scored] == c].mean()) for c in np.unique(y[scored])}
    out["grouped"] = groups is not None
    if return_correct:
        out["_correct"] = np.full(len(y), np.nan)
        out["_correct"][scored] = correct
    return out


# --- matching -------------------------------------------------------------------------------


def heldout_favor_pairs(interactions: pd.DataFrame, cut: pd.Timestamp) -> pd.DataFrame:
    """Distinct (trigger, favored) pairs favored at or after the cut: the matching test set."""
    ts = pd.to_datetime(interactions[S.EVENT_TIMESTAMP], utc=True)
    fav = interactions[(ts >= cut) & interactions[S.FAVORED].astype(bool) & interactions[S.CLICKED].astype(bool)]
    fav = fav[fav[S.TRIGGER_SONG_ID] != fav[S.REC_SONG_ID]]
    return fav[[S.TRIGGER_SONG_ID, S.REC_SONG_ID]].drop_duplicates(ignore_index=True)


def _pair_rows(emb: Embeddings, triggers, targets) -> tuple[np.ndarray, np.ndarray]:
    """Row positions of the (trigger, target) pairs whose songs both have a vector."""
    t_rows, g_rows = emb.rows(triggers), emb.rows(targets)
    ok = (t_rows >= 0) & (g_rows >= 0)
    return t_rows[ok], g_rows[ok]


def pair_ranks(emb: Embeddings, triggers, targets) -> np.ndarray:
    """Each (trigger, target) pair's rank of the target among the trigger's nearest songs by
    cosine (0 = the nearest), over the whole catalog minus the trigger (exact ranking), aligned
    with the pairs, as floats: NaN where the variant has no row for the trigger or the target
    (the pair is left out, as for a song that failed preprocessing), inf where either is a song
    an external table lacks (emb.covered False): a miss at every K. Such songs stay candidates
    for the other triggers with their zero vectors (cosine 0)."""
    t_rows, g_rows = emb.rows(triggers), emb.rows(targets)
    ranks = np.full(len(t_rows), np.nan)
    ok = (t_rows >= 0) & (g_rows >= 0)
    if emb.covered is not None:
        lacks = ok & ~(emb.covered[np.maximum(t_rows, 0)] & emb.covered[np.maximum(g_rows, 0)])
        ranks[lacks] = np.inf
        ok &= ~lacks
    idx = np.flatnonzero(ok)
    t, g = t_rows[idx], g_rows[idx]
    sims = emb.vectors[t] @ emb.vectors.T  # (P, N)
    sims[np.arange(len(t)), t] = -np.inf  # never recommend the trigger itself
    target_sim = sims[np.arange(len(t)), g]
    ranks[idx] = (sims > target_sim[:, None]).sum(axis=1)
    return ranks


def pair_hits(ranks: np.ndarray, k: int) -> np.ndarray:
    """1.0 where a pair's target is in the top K (`pair_ranks`), 0.0 where not (a miss, or a song
    without a vector), NaN where the pair is left out."""
    ranks = np.asarray(ranks, dtype=np.float64)
    return np.where(np.isnan(ranks), np.nan, (ranks < k).astype(np.float64))


def hit_rate_at_k(
    emb: Embeddings, triggers, targets, ks: Sequence[int], ranks: np.ndarray | None = None
) -> dict[str, float]:
    """Share of (trigger, target) pairs whose target is among the trigger's K nearest songs by
    cosine, over the whole catalog minus the trigger itself (exact ranking). A pair with a song an
    external table lacks is a miss (counted in `pairs_without_vector`); median_rank is over the
    pairs with both vectors. ranks: `pair_ranks` of these pairs, when already computed."""
    ranks = pair_ranks(emb, triggers, targets) if ranks is None else np.asarray(ranks, dtype=np.float64)
    scored = ranks[~np.isnan(ranks)]
    out: dict = {}
    for k in ks:
        hits = (scored < k).astype(np.float64)
        out[f"hit_rate@{k}"] = float(hits.mean()) if len(scored) else float("nan")
        out[f"hit_rate@{k}_ci95"] = bootstrap_ci(hits)
    out["pairs"] = int(len(scored))
    if emb.covered is not None:
        out["pairs_without_vector"] = int(np.isinf(scored).sum())
    finite = scored[np.isfinite(scored)]
    out["median_rank"] = float(np.median(finite) + 1) if len(finite) else float("nan")
    return out


class _WeightedAUC:
    """ROC AUC of fixed labels and scores under item weights (a bootstrap resample's counts), a tie
    counting half as in roc_auc_score: the scores are sorted once, each resample costs O(n)."""

    def __init__(self, labels: np.ndarray, scores: np.ndarray):
        self.order = np.argsort(scores, kind="mergesort")
        s = np.asarray(scores, dtype=np.float64)[self.order]
        self.pos = np.asarray(labels, dtype=bool)[self.order].astype(np.float64)
        self.group = np.concatenate([[0], np.cumsum(s[1:] != s[:-1])]) if len(s) else np.zeros(0, dtype=np.int64)
        self.groups = int(self.group[-1]) + 1 if len(s) else 0

    def __call__(self, weights: np.ndarray) -> float:
        w = np.asarray(weights, dtype=np.float64)[self.order]
        pos = np.bincount(self.group, w * self.pos, self.groups)
        neg = np.bincount(self.group, w * (1 - self.pos), self.groups)
        n_pos, n_neg = pos.sum(), neg.sum()
        if n_pos == 0 or n_neg == 0:
            return float("nan")
        below = np.cumsum(neg) - neg  # negatives' weight strictly below each score
        return float(pos @ (below + 0.5 * neg) / (n_pos * n_neg))


def paired_difference(a, b, labels=None, resamples: int = 1000, seed: int = 0) -> tuple[float, list[float], int]:
    """The difference a − b of one figure between two variants measured on the same items, and
    its 95% percentile-bootstrap interval (`bootstrap_ci`), each resample drawing the item indices
    once and scoring both variants on them: what the items share (an easy pair, a hard
    impression) cancels out, so the interval is of the difference, not of either figure.

    labels None: a, b (n,) are per-item values (a pair's hit, a song's correct: 1.0/0.0) and the
    figure is their mean; an item NaN in either is left out. labels (n,) bool: a, b are the two
    rankers' scores of the same impressions and the figure is the ROC AUC.
    Returns (difference, [lo, hi], items paired); NaNs when fewer than two items pair.
    """
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    if a.shape != b.shape:
        raise ValueError(f"paired_difference: {a.shape} and {b.shape} values are not the same items")
    if labels is None:
        keep = ~(np.isnan(a) | np.isnan(b))
        d = a[keep] - b[keep]
        return (
            (float(d.mean()) if len(d) else float("nan")),
            bootstrap_ci(d, resamples=resamples, seed=seed),
            int(len(d)),
        )
    y = np.asarray(labels, dtype=bool)
    if y.shape != a.shape:
        raise ValueError(f"paired_difference: {len(y)} labels for {len(a)} scores")

    auc_a, auc_b = _WeightedAUC(y, a), _WeightedAUC(y, b)

    def diff(rows: np.ndarray) -> float:  # the resample as counts per impression, the same for both
        w = np.bincount(rows, minlength=len(y))
        return auc_a(w) - auc_b(w)

    return float(diff(np.arange(len(y)))), bootstrap_ci(np.arange(len(y)), diff, resamples, seed), int(len(y))


HOLDS, NOT_SIGNIFICANT, DOES_NOT_HOLD, NOT_AVAILABLE = "holds", "not significant", "does NOT hold", "n/a"


def claim_verdict(ci95, threshold: float = 0.0) -> str:
    """A claim "the difference (in its claimed direction) is above threshold" on the difference's
    interval: holds when the whole interval is above it, does NOT hold when the whole interval is
    below, not significant when it straddles; n/a without an interval. threshold 0 for "A > B";
    −N points for "A within N points of B"."""
    if ci95 is None or any(c is None or np.isnan(c) for c in ci95):
        return NOT_AVAILABLE
    lo, hi = ci95
    if lo > threshold:
        return HOLDS
    if hi < threshold:
        return DOES_NOT_HOLD
    return NOT_SIGNIFICANT


def pair_cosines(emb: Embeddings, triggers, targets, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Cosines trigger-favored, and trigger-random (a random other catalog song per pair)."""
    t_rows, g_rows = _pair_rows(emb, triggers, targets)
    rng = np.random.default_rng(seed)
    r_rows = rng.integers(0, len(emb.song_ids), len(t_rows))
    r_rows = np.where(r_rows == t_rows, (r_rows + 1) % len(emb.song_ids), r_rows)
    favored = np.sum(emb.vectors[t_rows] * emb.vectors[g_rows], axis=1)
    random = np.sum(emb.vectors[t_rows] * emb.vectors[r_rows], axis=1)
    return favored, random


# --- ranking --------------------------------------------------------------------------------


def with_variant_embeddings(frame: pd.DataFrame, emb: Embeddings) -> pd.DataFrame:
    """The ranker frame with the candidate and trigger embedding columns of another variant.

    An embedding is a function of the song alone (no time), so swapping it by song id keeps the
    frame point-in-time correct; the stats columns are untouched.
    """
    out = frame.copy()
    out[CANDIDATE_EMBEDDING] = list(emb.lookup(frame[S.SONG_ID]))
    out[TRIGGER_EMBEDDING] = list(emb.lookup(frame[S.TRIGGER_SONG_ID]))
    return out


def ranking_aucs(
    frame: pd.DataFrame, cut: pd.Timestamp, emb: Embeddings | None, seed: int = 0, per_item: dict | None = None
) -> dict:
    """Train CTR/CVR rankers before the cut, AUC at or after it. emb None = stats only.

    A song an external table lacks (emb.covered False) has the features of a zero vector
    (trigger-candidate cosine 0, the principal components of the origin); the PCA is fitted on the
    songs the table has. per_item: a dict to fill with "ctr_auc" (clicked, CTR score) over the
    held-out impressions and "cvr_auc" (favored, CVR score) over the clicked ones, what the
    paired claims resample."""
    ts = pd.to_datetime(frame[S.EVENT_TIMESTAMP], utc=True)
    if emb is not None:
        frame = with_variant_embeddings(frame, emb)
    train, test = frame[ts < cut], frame[ts >= cut]
    catalog = None
    if emb is not None:
        catalog = emb.vectors if emb.covered is None or not emb.covered.any() else emb.vectors[emb.covered]
    try:
        rankers = train_rankers(train, catalog, None, RankerParams(seed=seed))
    except RankingError as e:  # e.g. a log with no negative: report it, score the other columns
        return {"ctr_auc": float("nan"), "cvr_auc": float("nan"), "error": str(e)}
    out = ranker_auc(rankers, test)
    if per_item is not None:
        ctr, cvr = rankers.predict(test)
        clicked = test[S.CLICKED].to_numpy(dtype=bool)
        favored = test[S.FAVORED].to_numpy(dtype=bool)
        if not np.isnan(out["ctr_auc"]):
            per_item["ctr_auc"] = (clicked, ctr.astype(np.float64))
        if not np.isnan(out["cvr_auc"]):
            per_item["cvr_auc"] = (favored[clicked], cvr[clicked].astype(np.float64))
    return out


# --- the comparison -------------------------------------------------------------------------


def compare_variants(
    variants: Mapping[str, Embeddings],
    catalog: pd.DataFrame,
    interactions: pd.DataFrame,
    ranker_frame: pd.DataFrame | None,
    cut: pd.Timestamp,
    ks: Sequence[int] = (10, 100),
    folds: int = 5,
    seed: int = 0,
    real_audio: Mapping[str, dict] | None = None,
    coverage: Mapping[str, dict] | None = None,
) -> dict:
    """Every metric for every variant; ranker_frame None skips the AUC columns.

    ranker_frame: the impressions (song_id = candidate) with their point-in-time stats columns,
    e.g. the Feast `ranker_v1` backfill of the whole log.
    real_audio: variant name -> its `real_audio_probe` dict (genre on real recordings), stored as
    row["real_audio"]; a variant found only here (no sample-world embeddings) gets a row of its own.
    A probe's private "_correct" (`real_audio_probe(return_correct=True)`) is moved out of the row
    into the per-item data.
    coverage: variant name -> `read_external_embeddings`'s coverage dict, reported as
    results["coverage"] (and a note in results.md).

    Besides the figures, results["_per_item"] keeps what the paired claims (`check_claims`)
    resample, per variant and figure path (e.g. ("matching", "hit_rate@100")): ("mean", item ids,
    per-item values) for hit-rates (over the held-out pairs) and accuracies (over songs), ("auc",
    labels, scores) for the rankers (over the held-out impressions). Like "_cosines" it stays out
    of results.json.
    """
    real_audio = dict(real_audio or {})
    pairs = heldout_favor_pairs(interactions, cut)
    pair_ids = np.arange(len(pairs))
    n_catalog = len(next(iter(variants.values())).song_ids) if variants else 0
    rows: dict[str, dict] = {}
    cosines: dict[str, tuple[np.ndarray, np.ndarray]] = {}
    per_item: dict[str, dict[tuple, tuple]] = {}

    def add_ranking(name: str, emb: Embeddings | None) -> dict:
        found: dict = {}
        out = ranking_aucs(ranker_frame, cut, emb, seed, per_item=found)
        for metric, (labels, scores) in found.items():
            per_item[name][("ranking", metric)] = ("auc", labels, scores)
        return out

    def add_real_audio(name: str, probe: dict) -> dict:
        probe = dict(probe)
        correct = probe.pop("_correct", None)
        if correct is not None:
            correct = np.asarray(correct, dtype=np.float64)
            per_item[name][("real_audio", "accuracy")] = ("mean", np.arange(len(correct)), correct)
        return probe

    for name, emb in variants.items():
        per_item[name] = items = {}
        songs: dict = {}
        ranks = pair_ranks(emb, pairs[S.TRIGGER_SONG_ID], pairs[S.REC_SONG_ID])
        row = {
            "semantics": semantic_probes(emb, catalog, folds, seed, per_song=songs),
            "matching": hit_rate_at_k(emb, pairs[S.TRIGGER_SONG_ID], pairs[S.REC_SONG_ID], ks, ranks=ranks),
        }
        for k in ks:
            items[("matching", f"hit_rate@{k}")] = ("mean", pair_ids, pair_hits(ranks, k))
        for what, (ids, correct) in songs.items():
            items[("semantics", what, "accuracy")] = ("mean", ids, correct)
        fav, rnd = pair_cosines(emb, pairs[S.TRIGGER_SONG_ID], pairs[S.REC_SONG_ID], seed)
        cosines[name] = (fav, rnd)
        row["cosine"] = {
            "favored_mean": float(fav.mean()),
            "random_mean": float(rnd.mean()),
            "gap": float(fav.mean() - rnd.mean()),
        }
        if ranker_frame is not None:
            row["ranking"] = add_ranking(name, emb)
        if name in real_audio:
            row["real_audio"] = add_real_audio(name, real_audio[name])
        rows[name] = row
        print(f"evaluate: {name}: " + summary_line(row), flush=True)
    for name, probe in real_audio.items():
        if name not in rows:
            per_item[name] = {}
            rows[name] = {"real_audio": add_real_audio(name, probe)}
            print(f"evaluate: {name}: " + summary_line(rows[name]), flush=True)
    if ranker_frame is not None:
        per_item[NO_EMBEDDING] = {}
        rows[NO_EMBEDDING] = {"ranking": add_ranking(NO_EMBEDDING, None)}
        print(f"evaluate: {NO_EMBEDDING}: " + summary_line(rows[NO_EMBEDDING]), flush=True)
    results = {
        "split_time": str(cut),
        "catalog_songs": n_catalog,
        "heldout_favor_pairs": int(len(pairs)),
        "hit_rate_chance": {f"hit_rate@{k}": min(1.0, k / max(n_catalog - 1, 1)) for k in ks},
        "variants": rows,
        "claims": check_claims(rows, ks, per_item, seed=seed),
        "_cosines": cosines,
        "_per_item": per_item,
    }
    if coverage:
        results["coverage"] = {name: dict(c) for name, c in coverage.items()}
    return results


def _walk(row: dict, *path):
    """The value at a key path of nested dicts, None where the path is missing."""
    for p in path:
        if not isinstance(row, dict) or p not in row:
            return None
        row = row[p]
    return row


def _get(row: dict, *path) -> float:
    value = _walk(row, *path)
    return float("nan") if value is None else float(value)


def summary_line(row: dict) -> str:
    parts = []
    for label, path in (
        ("genre", ("semantics", "genre", "accuracy")),
        ("lang", ("semantics", "language", "accuracy")),
        ("real-audio genre", ("real_audio", "accuracy")),
        ("HR@10", ("matching", "hit_rate@10")),
        ("HR@100", ("matching", "hit_rate@100")),
        ("CTR AUC", ("ranking", "ctr_auc")),
        ("CVR AUC", ("ranking", "cvr_auc")),
    ):
        v = _get(row, *path)
        if not np.isnan(v):
            parts.append(f"{label} {v:.3f}")
    return ", ".join(parts)


PAIRED_OVER = {"matching": "favor pairs", "ranking": "impressions", "semantics": "songs", "real_audio": "recordings"}


def check_claims(
    rows: dict,
    ks: Sequence[int],
    per_item: Mapping[str, Mapping[tuple, tuple]] | None = None,
    resamples: int = 1000,
    seed: int = 0,
) -> dict[str, dict]:
    """The issue's expectations, each decided on the paired difference of the figures it compares.
    Reported, never tuned towards. The from-scratch family's claims come first, in their original
    wording; then the backbone family's (FAMILY_VARIANTS["backbone"], against BACKBONE_AS_IS).

    Every claim is "A − B > threshold" on one figure, the difference signed in the claim's
    direction (positive = as claimed; threshold 0 for "A > B", −N for "A within N points of B").
    The difference is measured on the same items for both variants (compare_variants'
    `_per_item`: hit-rate over the held-out favor pairs, CTR/CVR AUC over the held-out
    impressions, accuracies over the songs or recordings) and bootstrapped on them
    (`paired_difference`, `resamples` resamples, 95% percentile interval). Each claim is
    {"verdict": "holds" | "not significant" | "does NOT hold" | "n/a", "difference": points,
    "ci95": [lo, hi] points, "threshold": points, "paired_over": what was resampled, "n": items}
    (`claim_verdict`); n/a when a figure is missing or there is no per-item data to pair (then
    "difference" is the difference of the two figures, when both exist, and "ci95" None).
    Claims over several comparisons ("... on every figure", "every backbone variant above every
    from-scratch variant") hold when every comparison holds, do NOT hold when any does not hold,
    and report their weakest comparison (`weakest`)."""
    k = max(ks)
    per_item = per_item or {}
    cache: dict = {}

    def fig(name, *path) -> float:
        return _get(rows.get(name, {}), *path)

    def compare(a, b, path: tuple, threshold: float = 0.0) -> dict:
        """a − b on one figure against threshold (points)."""
        key = (a, b, path)
        x, y = fig(a, *path), fig(b, *path)
        if key not in cache:  # a figure missing from the rows: nothing to compare
            cache[key] = (None, None, 0) if np.isnan(x) or np.isnan(y) else _paired(a, b, path)
        diff, ci, n = cache[key]
        if diff is None:  # nothing to pair: the two figures' difference, when both exist
            diff = None if np.isnan(x) or np.isnan(y) else 100 * (x - y)
        return {
            "verdict": claim_verdict(ci, threshold),
            "difference": diff,
            "ci95": ci,
            "threshold": threshold,
            "paired_over": PAIRED_OVER.get(path[0], "items"),
            "n": n,
        }

    def _paired(a, b, path):
        ia, ib = per_item.get(a, {}).get(path), per_item.get(b, {}).get(path)
        if ia is None or ib is None or ia[0] != ib[0]:
            return None, None, 0
        if ia[0] == "auc":
            (ya, sa), (yb, sb) = ia[1:], ib[1:]
            if len(ya) != len(yb) or not np.array_equal(ya, yb):  # not the same impressions
                return None, None, 0
            diff, ci, n = paired_difference(sa, sb, ya, resamples, seed)
        else:
            (ids_a, va), (ids_b, vb) = ia[1:], ib[1:]
            _, pa, pb = np.intersect1d(np.asarray(ids_a), np.asarray(ids_b), return_indices=True)
            diff, ci, n = paired_difference(np.asarray(va, float)[pa], np.asarray(vb, float)[pb], None, resamples, seed)
        if np.isnan(diff) or any(np.isnan(ci)):
            return (None if np.isnan(diff) else 100 * diff), None, n
        return 100 * diff, [100 * ci[0], 100 * ci[1]], n

    def gt(a, b, *path) -> dict:
        return compare(a, b, tuple(path))

    def within(a, b, points, *path) -> dict:
        return compare(a, b, tuple(path), -float(points))

    def every(checks: dict[str, dict]) -> dict:
        """All of several comparisons (label -> claim dict), the n/a ones left out."""
        decided = {label: c for label, c in checks.items() if c["verdict"] != NOT_AVAILABLE}
        if not decided:
            return {
                "verdict": NOT_AVAILABLE,
                "difference": None,
                "ci95": None,
                "threshold": 0.0,
                "paired_over": None,
                "n": 0,
                "weakest": None,
            }
        failed = {label: c for label, c in decided.items() if c["verdict"] == DOES_NOT_HOLD}
        if failed:  # the clearest failure: the highest upper bound below its threshold
            label = min(failed, key=lambda lb: failed[lb]["ci95"][1] - failed[lb]["threshold"])
            verdict = DOES_NOT_HOLD
        else:  # the weakest comparison: the lowest lower bound over its threshold
            label = min(decided, key=lambda lb: decided[lb]["ci95"][0] - decided[lb]["threshold"])
            verdict = HOLDS if all(c["verdict"] == HOLDS for c in decided.values()) else NOT_SIGNIFICANT
        return {**decided[label], "verdict": verdict, "weakest": label}

    def family(stage1, htcl, cf, say_stage1, say_htcl, say_cf) -> dict:
        """HTCL vs its stage 1, and w_CF vs HTCL, within one family (`say_*`: the names in the text)."""
        out = {
            f"{say_htcl} > {say_stage1} on hit-rate@{k}": gt(htcl, stage1, "matching", f"hit_rate@{k}"),
            f"{say_htcl} > {say_stage1} on CTR AUC": gt(htcl, stage1, "ranking", "ctr_auc"),
            f"{say_htcl} > {say_stage1} on CVR AUC": gt(htcl, stage1, "ranking", "cvr_auc"),
            f"{say_cf} < {say_htcl} on genre accuracy": gt(htcl, cf, "semantics", "genre", "accuracy"),
        }
        for what in ("genre", "language"):
            out[f"{say_htcl} {what} accuracy within 3 points of {say_stage1}"] = within(
                htcl, stage1, 3, "semantics", what, "accuracy"
            )
        return out

    claims = family(STAGE1, HTCL, HTCL_CF, "stage 1", HTCL, HTCL_CF)
    for name in (MEL_STATS, STAGE1, HTCL, HTCL_CF):
        if name in rows and RANDOM_INIT in rows:
            # "above" on every figure the two share
            paths = {
                "genre accuracy": ("semantics", "genre", "accuracy"),
                "language accuracy": ("semantics", "language", "accuracy"),
                f"hit-rate@{k}": ("matching", f"hit_rate@{k}"),
                "CTR AUC": ("ranking", "ctr_auc"),
                "CVR AUC": ("ranking", "cvr_auc"),
            }
            claims[f"{name} above random-init on every figure"] = every(
                {label: gt(name, RANDOM_INIT, *p) for label, p in paths.items()}
            )

    # the backbone family: training on top keeps the tagger's genre knowledge and adds the
    # listening signal; every backbone variant beats every from-scratch one on real recordings
    real = ("real_audio", "accuracy")
    claims[f"{HTCL_BACKBONE} real-audio genre within 2 points of the backbone as is"] = within(
        HTCL_BACKBONE, BACKBONE_AS_IS, 2, *real
    )
    claims["every backbone variant above every from-scratch variant on real-audio genre"] = every(
        {
            f"{b} vs {s}": gt(b, s, *real)
            for b in (BACKBONE_AS_IS, *FAMILY_VARIANTS["backbone"])
            for s in (RANDOM_INIT, *FAMILY_VARIANTS["scratch"])
            if not np.isnan(fig(b, *real)) and not np.isnan(fig(s, *real))
        }
    )
    for what, path in ((f"hit-rate@{k}", ("matching", f"hit_rate@{k}")), ("CVR AUC", ("ranking", "cvr_auc"))):
        claims[f"{HTCL_BACKBONE} > backbone as is on {what}"] = gt(HTCL_BACKBONE, BACKBONE_AS_IS, *path)
    claims.update(family(*FAMILY_VARIANTS["backbone"], *FAMILY_VARIANTS["backbone"]))
    return claims


# --- the report -----------------------------------------------------------------------------


def _pct(v: float, ci: list | None = None) -> str:
    if v is None or np.isnan(v):
        return "–"
    if ci is None or any(c is None or np.isnan(c) for c in ci):
        return f"{100 * v:.2f}"
    return f"{100 * v:.2f} ±{50 * (ci[1] - ci[0]):.1f}"


def _ci(row: dict, *path) -> list | None:
    """The 95% interval stored beside a figure (`<name>_ci95`)."""
    return _walk(row, *path[:-1], path[-1] + "_ci95")


def results_markdown(results: dict, title: str = "HTCL evaluation") -> str:
    """The paper's table shape: semantics (genre, language), matching (hit-rate), ranking (AUC);
    with a "Real-audio genre acc." column after "Language acc." when a variant has a real-audio
    probe (`compare_variants(real_audio=...)`)."""
    ks = sorted(int(k.split("@")[1]) for k in results["hit_rate_chance"])
    variants = results["variants"]
    real = next((r["real_audio"] for r in variants.values() if isinstance(r.get("real_audio"), dict)), None)
    head = (
        ["Method", "Genre acc.", "Language acc."]
        + (["Real-audio genre acc."] if real is not None else [])
        + [f"Hit-rate@{k}" for k in ks]
        + ["CTR AUC", "CVR AUC", "cos gap"]
    )
    lines = [
        f"# {title}",
        "",
        f"Held out: events from {results['split_time']} on ({results['heldout_favor_pairs']} distinct favor pairs); "
        f"catalog {results['catalog_songs']} songs. All figures in %; ± is half the 95% bootstrap interval over the "
        "held-out pairs or impressions (the test sample's noise, not the training seed's); `cos gap` = mean "
        "cosine trigger-favored minus trigger-random.",
    ]
    if real is not None:
        lines.append(
            f"Real-audio genre acc.: a linear probe on each variant's embeddings of {real.get('n', '?')} real "
            f"recordings ({real.get('classes', '?')} genres), cross-validated"
            + (" with whole groups held out per fold" if real.get("grouped") else "")
            + "; its ± is over those songs."
        )
    lines += ["", "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for name, row in variants.items():
        cells = [
            name,
            _pct(_get(row, "semantics", "genre", "accuracy")),
            _pct(_get(row, "semantics", "language", "accuracy")),
        ]
        if real is not None:
            cells.append(_pct(_get(row, "real_audio", "accuracy"), _ci(row, "real_audio", "accuracy")))
        cells += [_pct(_get(row, "matching", f"hit_rate@{k}"), _ci(row, "matching", f"hit_rate@{k}")) for k in ks]
        cells += [_pct(_get(row, "ranking", m), _ci(row, "ranking", m)) for m in ("ctr_auc", "cvr_auc")]
        gap = _get(row, "cosine", "gap")
        cells.append("–" if np.isnan(gap) else f"{gap:+.3f}")
        lines.append("| " + " | ".join(cells) + " |")
    chance = results["hit_rate_chance"]
    first = next((r for r in variants.values() if "semantics" in r), {})
    sem = first.get("semantics", {})
    chance_cells = [
        _pct(sem.get("genre", {}).get("chance", float("nan"))),
        _pct(sem.get("language", {}).get("chance", float("nan"))),
    ]
    if real is not None:
        chance_cells.append(_pct(_get(real, "chance")))
    chance_cells += [_pct(chance[f"hit_rate@{k}"]) for k in ks] + ["50.00", "50.00", "0"]
    lines.append("| chance | " + " | ".join(chance_cells) + " |")
    for name, cov in (results.get("coverage") or {}).items():
        lines += [
            "",
            f"Coverage: {name} ({cov.get('file', '?')}) has vectors for {cov['covered']} of "
            f"{cov['catalog_songs']} catalog songs; the {cov['missing']} missing are scored as they would "
            "be with a zero vector: every held-out pair with one is a miss, the probes see a zero vector, "
            "the rankers the features of a zero vector.",
        ]
    lines += [
        "",
        "Expectations (from the paper; reported as measured, not tuned towards). Each is decided on the "
        "paired difference over the same held-out pairs, impressions or songs (in points, signed so that "
        "positive is as claimed; 95% bootstrap interval of the difference): holds when the interval is above "
        '0 (above -N for "within N points"), does NOT hold when below, not significant when it straddles.',
        "",
    ]
    for claim, c in results["claims"].items():
        lines.append(f"- {_claim_text(claim, c)}")
    return "\n".join(lines) + "\n"


def _claim_text(claim: str, c) -> str:
    """One claim's line: "holds: CLAIM (+4.2 points, 95% CI +1.0 to +7.5)"."""
    if not isinstance(c, dict):  # a bool or None, as results.json held them before the paired claims
        return f"{'holds' if c else ('n/a' if c is None else 'does NOT hold')}: {claim}"
    detail = []
    if c.get("difference") is not None:
        d = f"{c['difference']:+.1f} points"
        ci = c.get("ci95")
        d += f", 95% CI {ci[0]:+.1f} to {ci[1]:+.1f}" if ci else ", no interval"
        if c.get("threshold"):
            d += f"; threshold {c['threshold']:+.0f}"
        if c.get("weakest"):
            d = f"weakest: {c['weakest']}, {d}"
        detail.append(d)
    return f"{c['verdict']}: {claim}" + (f" ({'; '.join(detail)})" if detail else "")


def plot_cosine_histograms(cosines: Mapping[str, tuple[np.ndarray, np.ndarray]], png: str | Path) -> Path:
    """The paper's Figure 2: trigger-favored vs trigger-random cosine distributions, per variant."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    n = max(1, len(cosines))
    fig, axes = plt.subplots(1, n, figsize=(3.6 * n, 3.2), squeeze=False)
    for ax, (name, (fav, rnd)) in zip(axes[0], cosines.items()):
        bins = np.linspace(
            min(fav.min(initial=1), rnd.min(initial=1)), max(fav.max(initial=-1), rnd.max(initial=-1)), 30
        )
        ax.hist(rnd, bins=bins, alpha=0.6, density=True, label="trigger–random")
        ax.hist(fav, bins=bins, alpha=0.6, density=True, label="trigger–favored")
        ax.set_title(name, fontsize=9)
        ax.set_xlabel("cosine similarity")
    axes[0][0].legend(fontsize=7)
    return save_figure(fig, png)


def write_report(
    results: dict, out_dir: str | Path, metric_files: Sequence[str | Path] = (), title: str = "HTCL evaluation"
) -> dict[str, Path]:
    """results.json, results.md, cosine_histograms.png and training_curves.png in out_dir."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    cosines = results.get("_cosines", {})
    public = {k: v for k, v in results.items() if not k.startswith("_")}
    paths = {"json": out_dir / "results.json", "markdown": out_dir / "results.md"}
    paths["json"].write_text(json.dumps(public, indent=2, default=float))
    paths["markdown"].write_text(results_markdown(public, title))
    if cosines:
        paths["histograms"] = plot_cosine_histograms(cosines, out_dir / "cosine_histograms.png")
    files = [f for f in metric_files if Path(f).is_file()]
    if files:
        paths["curves"] = plot_training_curves(files, out_dir / "training_curves.png")
    return paths


# --- zero-shot retrieval --------------------------------------------------------------------


def zero_shot_retrieval(audio: np.ndarray, text: np.ndarray) -> dict:
    """Audio->text and text->audio retrieval among n songs: row i of `audio` (n, D) and row i of
    `text` (n, D) are the same song. Cosine ranking; the rank of the true match among all n
    candidates (1 = first; ties count against it). Returns n and, per direction ("audio_to_text",
    "text_to_audio"), r@1, r@10 (share of queries with the match at rank <= 1 / 10) and
    median_rank. Chance: r@k = k/n, median rank ~ (n+1)/2."""
    a = np.asarray(audio, dtype=np.float64)
    t = np.asarray(text, dtype=np.float64)
    if a.ndim != 2 or a.shape != t.shape:
        raise ValueError(f"zero_shot_retrieval expects two (n, D) arrays of one shape, got {a.shape} and {t.shape}")
    a = a / np.maximum(np.linalg.norm(a, axis=1, keepdims=True), 1e-12)
    t = t / np.maximum(np.linalg.norm(t, axis=1, keepdims=True), 1e-12)
    sim = a @ t.T  # (n, n): audio i against text j
    out: dict = {"n": int(len(a))}
    for direction, s in (("audio_to_text", sim), ("text_to_audio", sim.T)):
        if not len(s):
            out[direction] = {"r@1": float("nan"), "r@10": float("nan"), "median_rank": float("nan")}
            continue
        true = np.diag(s)[:, None]
        rank = (s >= true).sum(axis=1)  # the match itself, and every candidate scoring as high
        out[direction] = {
            "r@1": float(np.mean(rank <= 1)),
            "r@10": float(np.mean(rank <= 10)),
            "median_rank": float(np.median(rank)),
        }
    return out


def retrieval_markdown(retrieval: Mapping[str, dict], artists: int | None = None) -> str:
    """The second table of results.md: each variant's `zero_shot_retrieval` on the held-out
    artists' songs, R@ in %, with the chance row."""
    if not retrieval:
        return ""
    n = next(iter(retrieval.values()))["n"]
    who = f"{artists} artist{'' if artists == 1 else 's'}, " if artists is not None else ""
    lines = [
        f"## Zero-shot retrieval on held-out artists ({who}{n} songs)",
        "",
        "Songs of artists no training stage saw (`eval.retrieval_holdout_artists`); the true match's rank "
        "among the held-out songs' texts (audio → text) or audios (text → audio), by cosine.",
        "",
        "| Method | A→T R@1 | A→T R@10 | A→T median rank | T→A R@1 | T→A R@10 | T→A median rank |",
        "|---|---|---|---|---|---|---|",
    ]
    for name, r in retrieval.items():
        cells = [name]
        for d in ("audio_to_text", "text_to_audio"):
            cells += [_pct(r[d]["r@1"]), _pct(r[d]["r@10"]), f"{r[d]['median_rank']:g}"]
        lines.append("| " + " | ".join(cells) + " |")
    chance = [_pct(1 / n), _pct(min(1.0, 10 / n)), f"{(n + 1) / 2:g}"] if n else ["–"] * 3
    lines.append("| chance | " + " | ".join(chance * 2) + " |")
    return "\n".join(lines) + "\n"
