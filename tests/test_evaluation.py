"""Evaluation: hit-rate@K, linear probes, point-in-time stats, the comparison table and report."""

import json

import numpy as np
import pandas as pd
import pytest

from htcl import schema as S
from htcl.evaluation import (
    HTCL, RANDOM_INIT, STAGE1, Embeddings, compare_variants, heldout_favor_pairs, hit_rate_at_k, linear_probe,
    mel_statistics, write_report,
)
from htcl.features import point_in_time_stats
from htcl.pairs import PairsError, split_time

T0 = pd.Timestamp("2026-01-01", tz="UTC")


def test_hit_rate_counts_rank_over_catalog_minus_trigger():
    angles = np.array([0.0, 0.1, 0.5, 1.0, 3.0])  # song i+1 at angle i on a circle
    emb = Embeddings([1, 2, 3, 4, 5], np.column_stack([np.cos(angles), np.sin(angles)]))
    # from song 1: nearest are 2 (rank 1), 3 (rank 2), 4, 5; the trigger itself never counts
    # from song 3 (angle 0.5): nearest is 2 (0.4 away), then 4 (0.5), 1 (0.5)
    got = hit_rate_at_k(emb, [1, 1, 1, 3, 1], [2, 4, 5, 2, 3], ks=(1, 2))
    assert got["pairs"] == 5
    assert got["hit_rate@1"] == pytest.approx(2 / 5)  # 1 -> 2, 3 -> 2
    assert got["hit_rate@2"] == pytest.approx(3 / 5)  # and 1 -> 3 at rank 2
    lo, hi = got["hit_rate@2_ci95"]  # bootstrap over the 5 pairs
    assert 0 <= lo <= 3 / 5 <= hi <= 1 and hi - lo > 0.2


def test_linear_probe_separable_vs_noise_with_artists_held_out():
    rng = np.random.default_rng(0)
    labels = np.repeat(["a", "b", "c"], 40)
    artists = np.array([f"{l}{i % 8}" for i, l in enumerate(labels)])
    centers = {"a": [3, 0, 0], "b": [0, 3, 0], "c": [0, 0, 3]}
    x = np.array([centers[l] for l in labels]) + rng.standard_normal((120, 3))
    good = linear_probe(np.hstack([x, rng.standard_normal((120, 5))]), labels, artists)
    noise = linear_probe(rng.standard_normal((120, 8)), labels, artists)
    assert good["accuracy"] > 0.9 and good["classes"] == 3
    assert noise["accuracy"] < good["chance"] + 0.2


def test_point_in_time_stats_see_only_earlier_days():
    log = pd.DataFrame({
        S.USER_ID: [1, 2, 1], S.TRIGGER_SONG_ID: [9, 9, 9], S.REC_SONG_ID: [5, 5, 5],
        S.CLICKED: [True, True, False], S.FAVORED: [True, False, False],
        S.EVENT_TIMESTAMP: [T0 + pd.Timedelta(hours=1), T0 + pd.Timedelta(hours=2), T0 + pd.Timedelta(days=1, hours=1)],
    })
    frame = point_in_time_stats(log, {5: "rock"})
    assert list(frame[S.SONG_ID]) == [5, 5, 5]
    # the same day's impressions are not yet in any snapshot; the next day sees both
    assert list(frame["song_stats__impressions_7d"]) == [0, 0, 2]
    assert list(frame["song_stats__clicks_7d"]) == [0, 0, 2]
    assert list(frame["listener_stats__clicks_30d"]) == [0, 0, 1]
    assert frame["listener_stats__top_genre_30d"].iloc[2] == "rock"


def test_split_time_is_a_midnight_inside_the_log():
    ts = pd.Series(T0 + pd.to_timedelta(np.linspace(0, 20 * 24, 100), unit="h"))
    cut = split_time(ts, 0.25)
    assert cut == T0 + pd.Timedelta(days=15)
    with pytest.raises(PairsError, match="holdout_fraction"):
        split_time(ts, 1.5)
    with pytest.raises(PairsError, match="too short"):
        split_time(pd.Series([T0, T0 + pd.Timedelta(minutes=5)]), 0.25)


def synthetic_world(seed: int = 0):
    """60 songs in 3 genres; favors go to songs of the trigger's genre."""
    rng = np.random.default_rng(seed)
    n = 60
    genre = np.repeat(["g0", "g1", "g2"], 20)
    catalog = pd.DataFrame({S.SONG_ID: np.arange(1, n + 1), S.GENRE: genre, S.LANGUAGE: np.tile(["en", "fr"], 30),
                            S.ARTIST: [f"artist{i % 12}" for i in range(n)]})
    rows = []
    for k in range(3000):
        trig = int(rng.integers(1, n + 1))
        same = rng.random() < 0.5
        pool = np.flatnonzero(genre == genre[trig - 1]) + 1 if same else np.arange(1, n + 1)
        cand = int(rng.choice(pool))
        click = rng.random() < (0.6 if genre[cand - 1] == genre[trig - 1] else 0.15)
        rows.append({S.USER_ID: int(rng.integers(1, 10)), S.TRIGGER_SONG_ID: trig, S.REC_SONG_ID: cand, S.CLICKED: click,
                     S.FAVORED: click and rng.random() < (0.7 if genre[cand - 1] == genre[trig - 1] else 0.1),
                     S.EVENT_TIMESTAMP: T0 + pd.Timedelta(minutes=20 * k)})
    interactions = pd.DataFrame(rows)
    onehot = (genre[:, None] == np.array(["g0", "g1", "g2"])).astype(np.float32)
    good = Embeddings(catalog[S.SONG_ID], onehot + 0.3 * rng.standard_normal((n, 3)))
    noise = Embeddings(catalog[S.SONG_ID], rng.standard_normal((n, 3)))
    return catalog, interactions, good, noise


def test_compare_variants_report_and_claims(tmp_path):
    catalog, interactions, good, noise = synthetic_world()
    cut = split_time(interactions[S.EVENT_TIMESTAMP], 0.25)
    frame = point_in_time_stats(interactions, dict(zip(catalog[S.SONG_ID], catalog[S.GENRE])))
    results = compare_variants({RANDOM_INIT: noise, STAGE1: noise, HTCL: good}, catalog, interactions, frame, cut,
                               ks=(5, 20), folds=3)
    rows = results["variants"]
    assert results["heldout_favor_pairs"] == len(heldout_favor_pairs(interactions, cut)) > 0
    assert rows[HTCL]["semantics"]["genre"]["accuracy"] > 0.9
    assert rows[HTCL]["matching"]["hit_rate@20"] > rows[RANDOM_INIT]["matching"]["hit_rate@20"]
    assert rows[HTCL]["cosine"]["gap"] > 0.2 > abs(rows[RANDOM_INIT]["cosine"]["gap"])
    assert rows[HTCL]["ranking"]["ctr_auc"] > rows[RANDOM_INIT]["ranking"]["ctr_auc"]
    assert "no embedding (stats only)" in rows
    assert results["claims"]["HTCL > stage 1 on hit-rate@20"] is True
    assert results["claims"]["HTCL_w_CF < HTCL on genre accuracy"] is None  # no w_CF variant given
    paths = write_report(results, tmp_path / "eval")
    saved = json.loads(paths["json"].read_text())
    assert set(saved["variants"]) == set(rows) and "_cosines" not in saved
    md = paths["markdown"].read_text()
    assert "| HTCL |" in md and "Hit-rate@20" in md and "chance" in md
    assert paths["histograms"].stat().st_size > 1000


def test_mel_statistics_baseline_shape():
    rng = np.random.default_rng(0)
    mels = {i: rng.standard_normal((8, 20 + i)).astype(np.float32) for i in (3, 1, 2)}
    emb = mel_statistics(mels)
    assert list(emb.song_ids) == [1, 2, 3] and emb.vectors.shape == (3, 16)
    np.testing.assert_allclose(np.linalg.norm(emb.vectors, axis=1), 1, atol=1e-5)
