"""CTR and CVR rankers: XGBoost over the features of one (listener, trigger, candidate) impression.

The input is the point-in-time frame of the `ranker_v1` feature service (Feast full feature
names, `view__feature`), offline from `get_historical_features` or online from
`get_online_features`; both name the columns the same way, so training and serving assemble
features with the one function, `ranker_matrix`.

Features (`feature_names`):
- `emb_cosine`: trigger-candidate cosine of the embeddings (the matching signal);
- `cand_pc_0..K-1`: the candidate's embedding reduced to K principal components, fitted on the
  catalog's embeddings of that model version (raw D-dim vectors overfit a tree model);
- the candidate's `song_stats__*` and the listener's numeric `listener_stats__*`.
With `use_embedding=False` only the stats: the reference ranker without embedding features.

CTR = P(clicked | impression); CVR = P(favored | clicked), trained on clicked impressions only.
Prediction goes through `Booster.inplace_predict` on a float32 matrix, never a DMatrix.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import numpy as np
import pandas as pd

from htcl import schema as S
from htcl.intervals import bootstrap_ci

CANDIDATE_EMBEDDING = "candidate_embedding__embedding"
TRIGGER_EMBEDDING = "trigger_embedding__embedding"
STATS_PREFIXES = (S.full_feature_name(S.SONG_STATS_VIEW, ""), S.full_feature_name(S.LISTENER_STATS_VIEW, ""))
BUNDLE_FILE = "rankers.json"


class RankingError(ValueError):
    pass


@dataclass(frozen=True)
class RankerParams:
    n_components: int = 8  # principal components of the candidate embedding
    n_estimators: int = 300
    max_depth: int = 4
    learning_rate: float = 0.05
    subsample: float = 0.8
    colsample_bytree: float = 0.8
    min_child_weight: float = 5.0
    reg_lambda: float = 1.0
    seed: int = 0
    n_jobs: int = 2


def stats_columns(frame: pd.DataFrame) -> list[str]:
    """The numeric stats columns of a ranker frame, in a fixed (sorted) order."""
    cols = [c for c in frame.columns if c.startswith(STATS_PREFIXES)]
    return sorted(
        c for c in cols if pd.api.types.is_numeric_dtype(frame[c]) and not pd.api.types.is_bool_dtype(frame[c])
    )


def stack_embeddings(column: pd.Series, what: str) -> np.ndarray:
    """A column of per-row vectors -> (n, D) float32; a missing vector is an error naming the row."""
    missing = column.isna() if column.dtype != object else column.map(lambda v: v is None or len(v) == 0)
    if missing.any():
        raise RankingError(
            f"{what}: no embedding for {int(missing.sum())} row(s), "
            f"first at row {int(np.flatnonzero(missing.to_numpy())[0])}"
        )
    return np.stack([np.asarray(v, dtype=np.float32) for v in column]).astype(np.float32, copy=False)


@dataclass
class Projection:
    """PCA of the catalog's embeddings: mean (D,), components (K, D)."""

    mean: np.ndarray
    components: np.ndarray

    @classmethod
    def fit(cls, embeddings: np.ndarray, n_components: int) -> "Projection":
        x = np.asarray(embeddings, dtype=np.float64)
        mean = x.mean(axis=0)
        # principal axes from the SVD of the centred matrix: rows of vt, by variance
        _, _, vt = np.linalg.svd(x - mean, full_matrices=False)
        k = min(n_components, vt.shape[0])
        return cls(mean.astype(np.float32), vt[:k].astype(np.float32))

    def __call__(self, x: np.ndarray) -> np.ndarray:
        return (x - self.mean) @ self.components.T  # (n, K)


def _unit(x: np.ndarray) -> np.ndarray:
    return x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)


def ranker_matrix(
    frame: pd.DataFrame, stats: Sequence[str], projection: Projection | None
) -> tuple[np.ndarray, list[str]]:
    """(n, F) float32 features and their names. projection None = no embedding features."""
    names: list[str] = []
    parts: list[np.ndarray] = []
    if projection is not None:
        cand = stack_embeddings(frame[CANDIDATE_EMBEDDING], CANDIDATE_EMBEDDING)  # (n, D)
        trig = stack_embeddings(frame[TRIGGER_EMBEDDING], TRIGGER_EMBEDDING)  # (n, D)
        parts.append(np.sum(_unit(cand) * _unit(trig), axis=1, keepdims=True))
        names.append("emb_cosine")
        parts.append(projection(cand))
        names += [f"cand_pc_{i}" for i in range(projection.components.shape[0])]
    missing = [c for c in stats if c not in frame.columns]
    if missing:
        raise RankingError(f"ranker frame lacks feature column(s) {missing}")
    if stats:
        # NaN (a listener or song with no snapshot yet) is left to XGBoost's missing-value branch.
        parts.append(frame[list(stats)].to_numpy(dtype=np.float32, na_value=np.nan))
        names += list(stats)
    if not parts:
        raise RankingError("no features: neither embeddings nor stats columns")
    return np.ascontiguousarray(np.concatenate(parts, axis=1), dtype=np.float32), names


@dataclass
class Rankers:
    """The CTR and CVR boosters with what they need to score a frame."""

    ctr: object  # xgboost.Booster
    cvr: object  # xgboost.Booster
    stats: list[str]
    projection: Projection | None
    model_version: str | None
    feature_names: list[str] = field(default_factory=list)
    info: dict = field(default_factory=dict)

    @property
    def uses_embedding(self) -> bool:
        return self.projection is not None

    def predict_matrix(self, x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(n, F) float32 -> CTR (n,), CVR (n,) probabilities."""
        if x.shape[1] != len(self.feature_names):
            raise RankingError(f"{x.shape[1]} features given, the rankers take {len(self.feature_names)}")
        return (
            np.asarray(self.ctr.inplace_predict(x), dtype=np.float32),
            np.asarray(self.cvr.inplace_predict(x), dtype=np.float32),
        )

    def predict(self, frame: pd.DataFrame) -> tuple[np.ndarray, np.ndarray]:
        x, _ = ranker_matrix(frame, self.stats, self.projection)
        return self.predict_matrix(x)

    def save(self, directory: str | Path) -> Path:
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        self.ctr.save_model(str(directory / "ctr.ubj"))
        self.cvr.save_model(str(directory / "cvr.ubj"))
        if self.projection is not None:
            np.savez(directory / "projection.npz", mean=self.projection.mean, components=self.projection.components)
        meta = {
            "model_version": self.model_version,
            "feature_names": self.feature_names,
            "stats": self.stats,
            "uses_embedding": self.uses_embedding,
            "info": self.info,
        }
        (directory / BUNDLE_FILE).write_text(json.dumps(meta, indent=2, default=str))
        return directory

    @classmethod
    def load(cls, directory: str | Path) -> "Rankers":
        import xgboost as xgb

        directory = Path(directory)
        if not (directory / BUNDLE_FILE).is_file():
            raise FileNotFoundError(
                f"no rankers in {directory} (missing {BUNDLE_FILE}); run `htcl train-rankers` first"
            )
        meta = json.loads((directory / BUNDLE_FILE).read_text())
        boosters = []
        for name in ("ctr", "cvr"):
            b = xgb.Booster()
            b.load_model(str(directory / f"{name}.ubj"))
            boosters.append(b)
        projection = None
        if meta["uses_embedding"]:
            z = np.load(directory / "projection.npz")
            projection = Projection(z["mean"], z["components"])
        return cls(
            boosters[0],
            boosters[1],
            meta["stats"],
            projection,
            meta["model_version"],
            meta["feature_names"],
            meta.get("info", {}),
        )


def _fit_booster(x: np.ndarray, y: np.ndarray, names: list[str], params: RankerParams, what: str):
    import xgboost as xgb

    if len(np.unique(y)) < 2:
        raise RankingError(
            f"{what}: the training labels are all {bool(y[0]) if len(y) else 'missing'}; need both classes"
        )
    model = xgb.XGBClassifier(
        n_estimators=params.n_estimators,
        max_depth=params.max_depth,
        learning_rate=params.learning_rate,
        subsample=params.subsample,
        colsample_bytree=params.colsample_bytree,
        min_child_weight=params.min_child_weight,
        reg_lambda=params.reg_lambda,
        random_state=params.seed,
        n_jobs=params.n_jobs,
        tree_method="hist",
        eval_metric="auc",
    )
    model.fit(x, y.astype(np.int32))
    booster = model.get_booster()
    booster.feature_names = None  # inplace_predict on plain arrays; names live in rankers.json
    return booster


def train_rankers(
    train: pd.DataFrame,
    catalog_embeddings: np.ndarray | None,
    model_version: str | None,
    params: RankerParams = RankerParams(),
) -> Rankers:
    """CTR on every impression, CVR on clicked ones. catalog_embeddings None = stats only."""
    stats = stats_columns(train)
    projection = Projection.fit(catalog_embeddings, params.n_components) if catalog_embeddings is not None else None
    x, names = ranker_matrix(train, stats, projection)
    clicked = train[S.CLICKED].to_numpy(dtype=bool)
    favored = train[S.FAVORED].to_numpy(dtype=bool)
    ctr = _fit_booster(x, clicked, names, params, "CTR")
    cvr = _fit_booster(x[clicked], favored[clicked], names, params, "CVR")
    info = {
        "train_rows": len(train),
        "train_clicked": int(clicked.sum()),
        "train_favored": int((favored & clicked).sum()),
        "params": params.__dict__,
    }
    return Rankers(ctr, cvr, stats, projection, model_version, names, info)


def ranker_auc(rankers: Rankers, frame: pd.DataFrame) -> dict[str, float]:
    """ROC AUC of CTR over all impressions and of CVR over the clicked ones."""
    from sklearn.metrics import roc_auc_score

    ctr, cvr = rankers.predict(frame)
    clicked = frame[S.CLICKED].to_numpy(dtype=bool)
    favored = frame[S.FAVORED].to_numpy(dtype=bool)
    out = {"ctr_auc": float("nan"), "cvr_auc": float("nan"), "rows": len(frame), "clicked": int(clicked.sum())}
    if len(np.unique(clicked)) == 2:
        out["ctr_auc"] = float(roc_auc_score(clicked, ctr))
        out["ctr_auc_ci95"] = _auc_interval(clicked, ctr)
    if len(np.unique(favored[clicked])) == 2:
        out["cvr_auc"] = float(roc_auc_score(favored[clicked], cvr[clicked]))
        out["cvr_auc_ci95"] = _auc_interval(favored[clicked], cvr[clicked])
    return out


def _auc_interval(labels: np.ndarray, scores: np.ndarray) -> list[float]:
    """95% bootstrap interval of the AUC over the scored rows (a one-class resample is skipped)."""
    from sklearn.metrics import roc_auc_score

    def auc(rows: np.ndarray) -> float:
        y = labels[rows]
        return float(roc_auc_score(y, scores[rows])) if y.min() != y.max() else float("nan")

    return bootstrap_ci(np.arange(len(labels)), auc, resamples=200)
