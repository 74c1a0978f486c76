"""XGBoost CTR/CVR rankers: features, learning a real signal, save/load, inplace_predict only."""

import numpy as np
import pandas as pd
import pytest

from htcl import schema as S
from htcl.ranking import (
    CANDIDATE_EMBEDDING,
    TRIGGER_EMBEDDING,
    Rankers,
    RankingError,
    ranker_auc,
    ranker_matrix,
    train_rankers,
)

T0 = pd.Timestamp("2026-01-01", tz="UTC")


def synthetic_frame(n: int = 3000, dim: int = 16, seed: int = 0) -> tuple[pd.DataFrame, np.ndarray]:
    """Impressions whose click depends on trigger-candidate cosine, and favor on the candidate's
    cosine too; the stats columns carry a weak popularity signal."""
    rng = np.random.default_rng(seed)
    songs = rng.standard_normal((100, dim)).astype(np.float32)
    songs /= np.linalg.norm(songs, axis=1, keepdims=True)
    trig, cand = rng.integers(0, 100, n), rng.integers(0, 100, n)
    cos = np.sum(songs[trig] * songs[cand], axis=1)
    pop = rng.standard_normal(100)
    p_click = 1 / (1 + np.exp(-(8 * cos + 0.3 * pop[cand] - 1)))
    click = rng.random(n) < p_click
    p_favor = 1 / (1 + np.exp(-(6 * cos - 0.5)))
    favor = click & (rng.random(n) < p_favor)
    frame = pd.DataFrame(
        {
            S.USER_ID: rng.integers(1, 20, n),
            S.TRIGGER_SONG_ID: trig + 1,
            S.SONG_ID: cand + 1,
            S.CLICKED: click,
            S.FAVORED: favor,
            S.EVENT_TIMESTAMP: T0 + pd.to_timedelta(np.arange(n), unit="min"),
            CANDIDATE_EMBEDDING: list(songs[cand]),
            TRIGGER_EMBEDDING: list(songs[trig]),
            "song_stats__ctr_7d": (pop[cand] + rng.standard_normal(n)).astype(np.float32),
            "song_stats__impressions_7d": rng.integers(0, 50, n),
            "listener_stats__top_genre_30d": "rock",  # a string: not a numeric feature
            "p_click": p_click,
            "p_favor": p_favor,  # the truth, for the oracle AUCs
        }
    )
    return frame, songs


def test_features_and_learned_signal_and_stats_only_reference():
    frame, songs = synthetic_frame()
    train, test = frame.iloc[:2000], frame.iloc[2000:]
    rankers = train_rankers(train, songs, "v1")
    x, names = ranker_matrix(test, rankers.stats, rankers.projection)
    assert names[0] == "emb_cosine" and "cand_pc_0" in names and "listener_stats__top_genre_30d" not in names
    assert x.dtype == np.float32 and x.shape == (len(test), len(names))
    with_emb = ranker_auc(rankers, test)
    stats_only = ranker_auc(train_rankers(train, None, None), test)
    from sklearn.metrics import roc_auc_score

    clicked = test[test[S.CLICKED]]
    oracle_ctr = roc_auc_score(test[S.CLICKED], test["p_click"])  # the best any ranker can do
    oracle_cvr = roc_auc_score(clicked[S.FAVORED], clicked["p_favor"])
    assert with_emb["ctr_auc"] > oracle_ctr - 0.05 and with_emb["cvr_auc"] > oracle_cvr - 0.1
    assert stats_only["ctr_auc"] < with_emb["ctr_auc"] - 0.1


def test_save_load_predicts_the_same_without_a_dmatrix(tmp_path, monkeypatch):
    import xgboost

    frame, songs = synthetic_frame(800)
    rankers = train_rankers(frame, songs, "finetune-80-abc")
    before = rankers.predict(frame)
    loaded = Rankers.load(rankers.save(tmp_path / "r"))
    assert loaded.model_version == "finetune-80-abc" and loaded.feature_names == rankers.feature_names

    def no_dmatrix(*a, **k):
        raise AssertionError("prediction must use inplace_predict, not a DMatrix")

    monkeypatch.setattr(xgboost, "DMatrix", no_dmatrix)
    monkeypatch.setattr(xgboost.core, "DMatrix", no_dmatrix)
    after = loaded.predict(frame)
    np.testing.assert_allclose(before[0], after[0], atol=1e-6)
    np.testing.assert_allclose(before[1], after[1], atol=1e-6)


def test_bad_frames_are_named():
    frame, songs = synthetic_frame(300)
    rankers = train_rankers(frame, songs, "v")
    broken = frame.copy()
    broken.at[5, CANDIDATE_EMBEDDING] = None
    with pytest.raises(RankingError, match="candidate_embedding__embedding.*row 5"):
        rankers.predict(broken)
    with pytest.raises(RankingError, match="song_stats__ctr_7d"):
        rankers.predict(frame.drop(columns="song_stats__ctr_7d"))
    with pytest.raises(RankingError, match="CTR.*both classes"):
        train_rankers(frame.assign(**{S.CLICKED: False}), songs, "v")
