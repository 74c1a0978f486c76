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


def _save_figure(fig, png: str | Path) -> Path:
    import matplotlib.pyplot as plt

    fig.tight_layout()
    png = Path(png)
    png.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(png, dpi=110)
    plt.close(fig)
    return png


def plot_training_curves(metric_files: Sequence[str | Path], png: str | Path) -> Path:
    """Loss parts, in-batch top-1 and logit scale against step, one line per run and metric."""
    import matplotlib

    from htcl.training import read_jsonl

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(15, 4))
    for f in metric_files:
        records = read_jsonl(f)
        if not records:
            continue
        run = Path(f).parent.name
        steps = [r["step"] for r in records]
        for key in sorted({k for r in records for k in r}):
            values = [r.get(key) for r in records]
            if key.startswith("loss"):
                axes[0].plot(steps, values, label=f"{run}: {key}")
            elif key.startswith("top1"):
                axes[1].plot(steps, values, label=f"{run}: {key}")
        axes[2].plot(steps, [r["logit_scale"] for r in records], label=run)
    for ax, title in zip(axes, ("contrastive losses", "in-batch top-1", "logit scale")):
        ax.set_title(title)
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
        if ax.lines:
            ax.legend(fontsize=7)
    return _save_figure(fig, png)


@dataclass
class Embeddings:
    """One variant's vectors: song_ids (n,) and unit rows (n, D), aligned."""

    song_ids: np.ndarray
    vectors: np.ndarray

    def __post_init__(self):
        self.song_ids = np.asarray(self.song_ids, dtype=np.int64)
        v = np.asarray(self.vectors, dtype=np.float32)
        self.vectors = v / np.maximum(np.linalg.norm(v, axis=1, keepdims=True), 1e-12)
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


# --- semantics ------------------------------------------------------------------------------


def linear_probe(x: np.ndarray, labels, groups=None, folds: int = 5, seed: int = 0,
                 alphas: np.ndarray = np.logspace(-2, 4, 13), return_predictions: bool = False) -> dict:
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
    out = {"n": int(len(y)), "classes": int(len(classes)),
           "chance": float(counts.max() / len(y)) if len(y) else float("nan"), "accuracy": float("nan")}
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


def semantic_probes(emb: Embeddings, catalog: pd.DataFrame, folds: int, seed: int) -> dict:
    """Genre accuracy over every song; language accuracy over sung songs (instrumental left out)."""
    cat = catalog[catalog[S.SONG_ID].isin(emb.song_ids)]
    x = emb.lookup(cat[S.SONG_ID])
    out = {}
    if S.GENRE in cat:
        has = cat[S.GENRE].fillna("").astype(str) != ""
        out["genre"] = linear_probe(x[has.to_numpy()], cat.loc[has, S.GENRE].astype(str), cat.loc[has, S.ARTIST], folds, seed)
    if S.LANGUAGE in cat:
        lang = cat[S.LANGUAGE].fillna("").astype(str)
        sung = ((lang != "") & (lang != INSTRUMENTAL)).to_numpy()
        out["language"] = linear_probe(x[sung], lang[sung], cat.loc[sung, S.ARTIST], folds, seed)
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
            df = pd.read_csv(manifest, sep="," if suffix == ".csv" else "\t", dtype=str, keep_default_na=False,
                             na_values=[""])
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
    return pd.DataFrame({
        "path": [resolve(str(p)) for p in df[path_col]],
        "label": df[label_col].astype(str).str.strip().to_numpy(),
        "group": df[MANIFEST_GROUP_COLUMN].astype(str).str.strip().to_numpy() if has_group else [None] * len(df),
    })


def load_manifest_audio(manifest_df: pd.DataFrame, sample_rate: int = 16000, max_seconds: float | None = 30.0,
                        progress: bool = True) -> tuple[list[np.ndarray], list[dict]]:
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
        print(f"load_manifest_audio: {len(failed)} of {len(paths)} file(s) left out, e.g. "
              f"{failed[0]['path']}: {failed[0]['reason']}", file=sys.stderr, flush=True)
    return waves, failed


def real_audio_probe(features: np.ndarray, labels, groups=None, folds: int = 5, seed: int = 0) -> dict:
    """Genre (label) accuracy of `linear_probe` on one variant's features of the real recordings
    (n, d), with `accuracy_ci95`, the 95% bootstrap interval over the songs (resampling the
    per-song correct/incorrect vector), and `per_class` accuracy. groups (e.g. the artists, n,)
    hold whole groups out per fold; None splits songs at random (stratified). JSON-ready; the
    value `compare_variants(real_audio={variant: ...})` expects."""
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


def hit_rate_at_k(emb: Embeddings, triggers, targets, ks: Sequence[int]) -> dict[str, float]:
    """Share of (trigger, target) pairs whose target is among the trigger's K nearest songs by
    cosine, over the whole catalog minus the trigger itself (exact ranking)."""
    t_rows, g_rows = _pair_rows(emb, triggers, targets)
    sims = emb.vectors[t_rows] @ emb.vectors.T  # (P, N)
    sims[np.arange(len(t_rows)), t_rows] = -np.inf  # never recommend the trigger itself
    target_sim = sims[np.arange(len(t_rows)), g_rows]
    rank = (sims > target_sim[:, None]).sum(axis=1)  # 0 = the target is the nearest song
    out: dict = {}
    for k in ks:
        hits = (rank < k).astype(np.float64)
        out[f"hit_rate@{k}"] = float(hits.mean()) if len(rank) else float("nan")
        out[f"hit_rate@{k}_ci95"] = bootstrap_ci(hits)
    out["pairs"] = int(len(rank))
    out["median_rank"] = float(np.median(rank) + 1) if len(rank) else float("nan")
    return out


def bootstrap_ci(values: np.ndarray, statistic=np.mean, resamples: int = 1000, seed: int = 0) -> list[float]:
    """95% percentile-bootstrap interval of a statistic over the rows (held-out pairs or
    impressions): how far the figure moves with the test sample alone, not with training seeds."""
    n = len(values)
    if n < 2:
        return [float("nan"), float("nan")]
    rng = np.random.default_rng(seed)
    stats = [statistic(values[rng.integers(0, n, n)]) for _ in range(resamples)]
    lo, hi = np.nanpercentile(stats, [2.5, 97.5])
    return [float(lo), float(hi)]


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
    from htcl.ranking import CANDIDATE_EMBEDDING, TRIGGER_EMBEDDING

    out = frame.copy()
    out[CANDIDATE_EMBEDDING] = list(emb.lookup(frame[S.SONG_ID]))
    out[TRIGGER_EMBEDDING] = list(emb.lookup(frame[S.TRIGGER_SONG_ID]))
    return out


def ranking_aucs(frame: pd.DataFrame, cut: pd.Timestamp, emb: Embeddings | None, seed: int = 0) -> dict:
    """Train CTR/CVR rankers before the cut, AUC at or after it. emb None = stats only."""
    from htcl.ranking import RankerParams, RankingError, ranker_auc, train_rankers

    ts = pd.to_datetime(frame[S.EVENT_TIMESTAMP], utc=True)
    if emb is not None:
        frame = with_variant_embeddings(frame, emb)
    train, test = frame[ts < cut], frame[ts >= cut]
    try:
        rankers = train_rankers(train, emb.vectors if emb is not None else None, None, RankerParams(seed=seed))
    except RankingError as e:  # e.g. a log with no negative: report it, score the other columns
        return {"ctr_auc": float("nan"), "cvr_auc": float("nan"), "error": str(e)}
    return ranker_auc(rankers, test)


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
) -> dict:
    """Every metric for every variant; ranker_frame None skips the AUC columns.

    ranker_frame: the impressions (song_id = candidate) with their point-in-time stats columns,
    e.g. the Feast `ranker_v1` backfill of the whole log.
    real_audio: variant name -> its `real_audio_probe` dict (genre on real recordings), stored as
    row["real_audio"]; a variant found only here (no sample-world embeddings) gets a row of its own.
    """
    real_audio = dict(real_audio or {})
    pairs = heldout_favor_pairs(interactions, cut)
    n_catalog = len(next(iter(variants.values())).song_ids) if variants else 0
    rows: dict[str, dict] = {}
    cosines: dict[str, tuple[np.ndarray, np.ndarray]] = {}
    for name, emb in variants.items():
        row = {"semantics": semantic_probes(emb, catalog, folds, seed),
               "matching": hit_rate_at_k(emb, pairs[S.TRIGGER_SONG_ID], pairs[S.REC_SONG_ID], ks)}
        fav, rnd = pair_cosines(emb, pairs[S.TRIGGER_SONG_ID], pairs[S.REC_SONG_ID], seed)
        cosines[name] = (fav, rnd)
        row["cosine"] = {"favored_mean": float(fav.mean()), "random_mean": float(rnd.mean()),
                         "gap": float(fav.mean() - rnd.mean())}
        if ranker_frame is not None:
            row["ranking"] = ranking_aucs(ranker_frame, cut, emb, seed)
        if name in real_audio:
            row["real_audio"] = dict(real_audio[name])
        rows[name] = row
        print(f"evaluate: {name}: " + summary_line(row), flush=True)
    for name, probe in real_audio.items():
        if name not in rows:
            rows[name] = {"real_audio": dict(probe)}
            print(f"evaluate: {name}: " + summary_line(rows[name]), flush=True)
    if ranker_frame is not None:
        rows[NO_EMBEDDING] = {"ranking": ranking_aucs(ranker_frame, cut, None, seed)}
        print(f"evaluate: {NO_EMBEDDING}: " + summary_line(rows[NO_EMBEDDING]), flush=True)
    return {
        "split_time": str(cut),
        "catalog_songs": n_catalog,
        "heldout_favor_pairs": int(len(pairs)),
        "hit_rate_chance": {f"hit_rate@{k}": min(1.0, k / max(n_catalog - 1, 1)) for k in ks},
        "variants": rows,
        "claims": check_claims(rows, ks),
        "_cosines": cosines,
    }


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
    for label, path in (("genre", ("semantics", "genre", "accuracy")), ("lang", ("semantics", "language", "accuracy")),
                        ("real-audio genre", ("real_audio", "accuracy")),
                        ("HR@10", ("matching", "hit_rate@10")), ("HR@100", ("matching", "hit_rate@100")),
                        ("CTR AUC", ("ranking", "ctr_auc")), ("CVR AUC", ("ranking", "cvr_auc"))):
        v = _get(row, *path)
        if not np.isnan(v):
            parts.append(f"{label} {v:.3f}")
    return ", ".join(parts)


def check_claims(rows: dict, ks: Sequence[int]) -> dict[str, bool | None]:
    """The issue's expectations, each True/False (None when a figure is missing). Reported, never
    tuned towards. The from-scratch family's claims come first, in their original wording; then
    the backbone family's (FAMILY_VARIANTS["backbone"], against BACKBONE_AS_IS)."""
    k = max(ks)

    def fig(name, *path) -> float:
        return _get(rows.get(name, {}), *path)

    def gt(a, b, *path):
        x, y = fig(a, *path), fig(b, *path)
        return None if np.isnan(x) or np.isnan(y) else bool(x > y)

    def within(a, b, points, *path):
        x, y = fig(a, *path), fig(b, *path)
        return None if np.isnan(x) or np.isnan(y) else bool(x >= y - points / 100)

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
                htcl, stage1, 3, "semantics", what, "accuracy")
        return out

    claims = family(STAGE1, HTCL, HTCL_CF, "stage 1", HTCL, HTCL_CF)
    for name in (MEL_STATS, STAGE1, HTCL, HTCL_CF):
        if name in rows and RANDOM_INIT in rows:
            # "above" on every figure the two share
            checks = [gt(name, RANDOM_INIT, *p) for p in (("semantics", "genre", "accuracy"), ("semantics", "language", "accuracy"),
                                                          ("matching", f"hit_rate@{k}"), ("ranking", "ctr_auc"), ("ranking", "cvr_auc"))]
            checks = [c for c in checks if c is not None]
            claims[f"{name} above random-init on every figure"] = bool(all(checks)) if checks else None

    # the backbone family: training on top keeps the tagger's genre knowledge and adds the
    # listening signal; every backbone variant beats every from-scratch one on real recordings
    real = ("real_audio", "accuracy")
    claims[f"{HTCL_BACKBONE} real-audio genre within 2 points of the backbone as is"] = within(
        HTCL_BACKBONE, BACKBONE_AS_IS, 2, *real)
    backbone = [fig(n, *real) for n in (BACKBONE_AS_IS, *FAMILY_VARIANTS["backbone"])]
    scratch = [fig(n, *real) for n in (RANDOM_INIT, *FAMILY_VARIANTS["scratch"])]
    backbone, scratch = [v for v in backbone if not np.isnan(v)], [v for v in scratch if not np.isnan(v)]
    claims["every backbone variant above every from-scratch variant on real-audio genre"] = (
        bool(min(backbone) > max(scratch)) if backbone and scratch else None)
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
    head = (["Method", "Genre acc.", "Language acc."] + (["Real-audio genre acc."] if real is not None else [])
            + [f"Hit-rate@{k}" for k in ks] + ["CTR AUC", "CVR AUC", "cos gap"])
    lines = [f"# {title}", "",
             f"Held out: events from {results['split_time']} on ({results['heldout_favor_pairs']} distinct favor pairs); "
             f"catalog {results['catalog_songs']} songs. All figures in %; ± is half the 95% bootstrap interval over the "
             "held-out pairs or impressions (the test sample's noise, not the training seed's); `cos gap` = mean "
             "cosine trigger-favored minus trigger-random."]
    if real is not None:
        lines.append(f"Real-audio genre acc.: a linear probe on each variant's embeddings of {real.get('n', '?')} real "
                     f"recordings ({real.get('classes', '?')} genres), cross-validated"
                     + (" with whole groups held out per fold" if real.get("grouped") else "")
                     + "; its ± is over those songs.")
    lines += ["", "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for name, row in variants.items():
        cells = [name, _pct(_get(row, "semantics", "genre", "accuracy")), _pct(_get(row, "semantics", "language", "accuracy"))]
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
    chance_cells = [_pct(sem.get("genre", {}).get("chance", float("nan"))),
                    _pct(sem.get("language", {}).get("chance", float("nan")))]
    if real is not None:
        chance_cells.append(_pct(_get(real, "chance")))
    chance_cells += [_pct(chance[f"hit_rate@{k}"]) for k in ks] + ["50.00", "50.00", "0"]
    lines.append("| chance | " + " | ".join(chance_cells) + " |")
    lines += ["", "Expectations (from the paper; reported as measured, not tuned towards):", ""]
    for claim, ok in results["claims"].items():
        lines.append(f"- {'holds' if ok else ('n/a' if ok is None else 'does NOT hold')}: {claim}")
    return "\n".join(lines) + "\n"


def plot_cosine_histograms(cosines: Mapping[str, tuple[np.ndarray, np.ndarray]], png: str | Path) -> Path:
    """The paper's Figure 2: trigger-favored vs trigger-random cosine distributions, per variant."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    n = max(1, len(cosines))
    fig, axes = plt.subplots(1, n, figsize=(3.6 * n, 3.2), squeeze=False)
    for ax, (name, (fav, rnd)) in zip(axes[0], cosines.items()):
        bins = np.linspace(min(fav.min(initial=1), rnd.min(initial=1)), max(fav.max(initial=-1), rnd.max(initial=-1)), 30)
        ax.hist(rnd, bins=bins, alpha=0.6, density=True, label="trigger–random")
        ax.hist(fav, bins=bins, alpha=0.6, density=True, label="trigger–favored")
        ax.set_title(name, fontsize=9)
        ax.set_xlabel("cosine similarity")
    axes[0][0].legend(fontsize=7)
    return _save_figure(fig, png)


def write_report(results: dict, out_dir: str | Path, metric_files: Sequence[str | Path] = (), title: str = "HTCL evaluation") -> dict[str, Path]:
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
