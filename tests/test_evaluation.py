"""Evaluation: hit-rate@K, linear probes, point-in-time stats, the comparison table and report."""

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from htcl import schema as S
from htcl.evaluation import (
    BACKBONE_AS_IS,
    FAMILY_VARIANTS,
    HTCL,
    HTCL_BACKBONE,
    HTCL_CF,
    HTCL_CF_BACKBONE,
    RANDOM_INIT,
    STAGE1,
    STAGE1_BACKBONE,
    Embeddings,
    check_claims,
    compare_variants,
    heldout_favor_pairs,
    hit_rate_at_k,
    linear_probe,
    load_manifest_audio,
    mel_statistics,
    read_audio_manifest,
    real_audio_probe,
    results_markdown,
    summary_line,
    write_report,
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
    artists = np.array([f"{label}{i % 8}" for i, label in enumerate(labels)])
    centers = {"a": [3, 0, 0], "b": [0, 3, 0], "c": [0, 0, 3]}
    x = np.array([centers[label] for label in labels]) + rng.standard_normal((120, 3))
    good = linear_probe(np.hstack([x, rng.standard_normal((120, 5))]), labels, artists)
    noise = linear_probe(rng.standard_normal((120, 8)), labels, artists)
    assert good["accuracy"] > 0.9 and good["classes"] == 3
    assert noise["accuracy"] < good["chance"] + 0.2


def test_point_in_time_stats_see_only_earlier_days():
    log = pd.DataFrame(
        {
            S.USER_ID: [1, 2, 1],
            S.TRIGGER_SONG_ID: [9, 9, 9],
            S.REC_SONG_ID: [5, 5, 5],
            S.CLICKED: [True, True, False],
            S.FAVORED: [True, False, False],
            S.EVENT_TIMESTAMP: [
                T0 + pd.Timedelta(hours=1),
                T0 + pd.Timedelta(hours=2),
                T0 + pd.Timedelta(days=1, hours=1),
            ],
        }
    )
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
    catalog = pd.DataFrame(
        {
            S.SONG_ID: np.arange(1, n + 1),
            S.GENRE: genre,
            S.LANGUAGE: np.tile(["en", "fr"], 30),
            S.ARTIST: [f"artist{i % 12}" for i in range(n)],
        }
    )
    rows = []
    for k in range(3000):
        trig = int(rng.integers(1, n + 1))
        same = rng.random() < 0.5
        pool = np.flatnonzero(genre == genre[trig - 1]) + 1 if same else np.arange(1, n + 1)
        cand = int(rng.choice(pool))
        click = rng.random() < (0.6 if genre[cand - 1] == genre[trig - 1] else 0.15)
        rows.append(
            {
                S.USER_ID: int(rng.integers(1, 10)),
                S.TRIGGER_SONG_ID: trig,
                S.REC_SONG_ID: cand,
                S.CLICKED: click,
                S.FAVORED: click and rng.random() < (0.7 if genre[cand - 1] == genre[trig - 1] else 0.1),
                S.EVENT_TIMESTAMP: T0 + pd.Timedelta(minutes=20 * k),
            }
        )
    interactions = pd.DataFrame(rows)
    onehot = (genre[:, None] == np.array(["g0", "g1", "g2"])).astype(np.float32)
    good = Embeddings(catalog[S.SONG_ID], onehot + 0.3 * rng.standard_normal((n, 3)))
    noise = Embeddings(catalog[S.SONG_ID], rng.standard_normal((n, 3)))
    return catalog, interactions, good, noise


def test_compare_variants_report_and_claims(tmp_path):
    catalog, interactions, good, noise = synthetic_world()
    cut = split_time(interactions[S.EVENT_TIMESTAMP], 0.25)
    frame = point_in_time_stats(interactions, dict(zip(catalog[S.SONG_ID], catalog[S.GENRE])))
    results = compare_variants(
        {RANDOM_INIT: noise, STAGE1: noise, HTCL: good}, catalog, interactions, frame, cut, ks=(5, 20), folds=3
    )
    rows = results["variants"]
    assert results["heldout_favor_pairs"] == len(heldout_favor_pairs(interactions, cut)) > 0
    assert rows[HTCL]["semantics"]["genre"]["accuracy"] > 0.9
    assert rows[HTCL]["matching"]["hit_rate@20"] > rows[RANDOM_INIT]["matching"]["hit_rate@20"]
    assert rows[HTCL]["cosine"]["gap"] > 0.2 > abs(rows[RANDOM_INIT]["cosine"]["gap"])
    assert rows[HTCL]["ranking"]["ctr_auc"] > rows[RANDOM_INIT]["ranking"]["ctr_auc"]
    assert "no embedding (stats only)" in rows
    hr = results["claims"]["HTCL > stage 1 on hit-rate@20"]  # paired over the held-out favor pairs
    assert hr["verdict"] == "holds" and hr["paired_over"] == "favor pairs" and hr["n"] == results["heldout_favor_pairs"]
    assert hr["ci95"][0] > 0 and hr["difference"] == pytest.approx(
        100 * (rows[HTCL]["matching"]["hit_rate@20"] - rows[STAGE1]["matching"]["hit_rate@20"])
    )
    ctr = results["claims"]["HTCL > stage 1 on CTR AUC"]  # paired over the held-out impressions
    assert ctr["paired_over"] == "impressions" and ctr["difference"] == pytest.approx(
        100 * (rows[HTCL]["ranking"]["ctr_auc"] - rows[STAGE1]["ranking"]["ctr_auc"])
    )
    genre = results["claims"]["HTCL genre accuracy within 3 points of stage 1"]  # paired over the songs
    assert genre["verdict"] == "holds" and genre["paired_over"] == "songs" and genre["threshold"] == -3
    assert results["claims"]["HTCL_w_CF < HTCL on genre accuracy"]["verdict"] == "n/a"  # no w_CF variant given
    paths = write_report(results, tmp_path / "eval")
    saved = json.loads(paths["json"].read_text())
    assert set(saved["variants"]) == set(rows) and "_cosines" not in saved and "_per_item" not in saved
    assert saved["claims"]["HTCL > stage 1 on hit-rate@20"]["verdict"] == "holds"
    md = paths["markdown"].read_text()
    assert "| HTCL |" in md and "Hit-rate@20" in md and "chance" in md
    assert "Real-audio" not in md  # no real recordings given: no such column
    assert (
        f"- holds: HTCL > stage 1 on hit-rate@20 ({hr['difference']:+.1f} points, 95% CI "
        f"{hr['ci95'][0]:+.1f} to {hr['ci95'][1]:+.1f})"
    ) in md
    assert paths["histograms"].stat().st_size > 1000


def test_mel_statistics_baseline_shape():
    rng = np.random.default_rng(0)
    mels = {i: rng.standard_normal((8, 20 + i)).astype(np.float32) for i in (3, 1, 2)}
    emb = mel_statistics(mels)
    assert list(emb.song_ids) == [1, 2, 3] and emb.vectors.shape == (3, 16)
    np.testing.assert_allclose(np.linalg.norm(emb.vectors, axis=1), 1, atol=1e-5)


# --- real recordings ------------------------------------------------------------------------


def write_tones(folder, n: int, sr: int = 16000, seconds: float = 0.5) -> list[str]:
    import soundfile as sf

    folder.mkdir(parents=True, exist_ok=True)
    names = []
    for i in range(n):
        t = np.arange(int(seconds * sr)) / sr
        sf.write(folder / f"tone{i}.wav", (0.2 * np.sin(2 * np.pi * 220 * (i + 1) * t)).astype(np.float32), sr)
        names.append(f"tone{i}.wav")
    return names


def test_read_audio_manifest_aliases_and_relative_paths(tmp_path):
    (tmp_path / "set").mkdir()
    (tmp_path / "set" / "manifest.tsv").write_text(
        "file\tgenre\tseconds\nsub/a.mp3\trock\t30\n/abs/b.mp3\tNA\t30\n../c.mp3\tpop\t30\n"
    )
    df = read_audio_manifest(tmp_path / "set" / "manifest.tsv")
    assert list(df.columns) == ["path", "label", "group"]
    assert list(df["path"]) == [str(tmp_path / "set" / "sub" / "a.mp3"), "/abs/b.mp3", str(tmp_path / "c.mp3")]
    assert list(df["label"]) == ["rock", "NA", "pop"]  # a genre named "NA" is a label, not a missing cell
    assert df["group"].isna().all()
    pd.DataFrame({"path": ["x.flac", "y.flac"], "label": ["a", "b"], "group": ["artist1", "artist2"]}).to_csv(
        tmp_path / "m.csv", index=False
    )
    csv = read_audio_manifest(tmp_path / "m.csv")
    assert list(csv["path"]) == [str(tmp_path / "x.flac"), str(tmp_path / "y.flac")]
    assert list(csv["group"]) == ["artist1", "artist2"]
    pd.DataFrame({"path": ["x.flac", "s3://bucket/y.flac"], "genre": ["a", "b"]}).to_parquet(tmp_path / "m.parquet")
    pq = read_audio_manifest(tmp_path / "m.parquet")
    assert list(pq["path"]) == [str(tmp_path / "x.flac"), "s3://bucket/y.flac"] and list(pq["label"]) == ["a", "b"]


def test_read_audio_manifest_errors_name_the_file(tmp_path):
    bad = tmp_path / "nolabel.tsv"
    bad.write_text("file\tseconds\na.mp3\t30\n")
    with pytest.raises(ValueError, match=r"nolabel\.tsv: no label column \(expected 'label' or 'genre'\)"):
        read_audio_manifest(bad)
    nopath = tmp_path / "nopath.csv"
    nopath.write_text("name,label\na.mp3,rock\n")
    with pytest.raises(ValueError, match=r"nopath\.csv: no path column"):
        read_audio_manifest(nopath)
    empty = tmp_path / "empty_label.tsv"
    empty.write_text("path\tlabel\na.mp3\trock\nb.mp3\t\n")
    with pytest.raises(ValueError, match=r"empty_label\.tsv: empty label \('label'\) in 1 row\(s\), line 3"):
        read_audio_manifest(empty)
    (tmp_path / "m.json").write_text("{}")
    with pytest.raises(ValueError, match=r"m\.json: unknown manifest format '\.json'"):
        read_audio_manifest(tmp_path / "m.json")
    with pytest.raises(ValueError, match=r"gone\.tsv: no such manifest file"):
        read_audio_manifest(tmp_path / "gone.tsv")


def test_load_manifest_audio_leaves_bad_files_out(tmp_path):
    write_tones(tmp_path, 2)
    (tmp_path / "broken.wav").write_bytes(b"not audio at all" * 20)
    pd.DataFrame({"file": ["tone0.wav", "broken.wav", "gone.wav", "tone1.wav"], "genre": ["a", "b", "a", "b"]}).to_csv(
        tmp_path / "m.tsv", sep="\t", index=False
    )
    df = read_audio_manifest(tmp_path / "m.tsv")
    waves, failed = load_manifest_audio(df, sample_rate=8000, max_seconds=0.25, progress=False)
    assert [w.shape for w in waves] == [(2000,), (2000,)] and waves[0].dtype == np.float32
    assert [(f["row"], Path(f["path"]).name, f["reason"]) for f in failed] == [
        (1, "broken.wav", "not_audio"),
        (2, "gone.wav", "missing"),
    ]
    kept = df.drop(index=df.index[[f["row"] for f in failed]])
    assert list(kept["label"]) == ["a", "b"]  # aligned with waves


def separable(n_per: int = 30, seed: int = 0):
    rng = np.random.default_rng(seed)
    labels = np.repeat(["rock", "pop", "jazz", "folk"], n_per)
    groups = np.array([f"{label}-artist{i % 6}" for i, label in enumerate(labels)])
    centers = {c: rng.standard_normal(16) * 4 for c in ("rock", "pop", "jazz", "folk")}
    x = np.array([centers[label] for label in labels]) + rng.standard_normal((len(labels), 16))
    return x, labels, groups


def test_real_audio_probe_separable_vs_random():
    x, labels, groups = separable()
    good = real_audio_probe(x, labels, groups, folds=3)
    assert good["accuracy"] > 0.97 and good["n"] == 120 and good["classes"] == 4 and good["grouped"]
    lo, hi = good["accuracy_ci95"]
    assert lo <= good["accuracy"] <= hi and lo > 0.9
    assert set(good["per_class"]) == {"rock", "pop", "jazz", "folk"}
    json.dumps(good)  # JSON-ready: no predictions array left in
    noise = real_audio_probe(np.random.default_rng(1).standard_normal(x.shape), list(labels), folds=3)
    assert noise["chance"] == pytest.approx(0.25) and not noise["grouped"]
    assert abs(noise["accuracy"] - 0.25) < 0.15
    lo, hi = noise["accuracy_ci95"]
    assert lo < 0.25 + 0.05 and hi - lo > 0.05  # the interval over 120 songs is wide, and covers chance
    with pytest.raises(ValueError, match="do not align"):
        real_audio_probe(x[:10], labels)


def test_linear_probe_predictions_only_when_asked():
    x, labels, groups = separable(n_per=10)
    plain = linear_probe(x, labels, groups, folds=3)
    with_pred = linear_probe(x, labels, groups, folds=3, return_predictions=True)
    assert "predictions" not in plain
    pred = with_pred.pop("predictions")
    assert with_pred == plain and len(pred) == len(labels)
    assert np.mean(pred.astype(str) == labels) == pytest.approx(plain["accuracy"])
    # a class with one group is left out of the probe: its songs have no prediction
    one = linear_probe(x, labels, np.where(labels == "folk", "solo", groups), folds=3, return_predictions=True)
    assert one["classes"] == 3 and all(p is None for p in one["predictions"][labels == "folk"])


def test_compare_variants_real_audio_column_and_real_only_row(tmp_path):
    catalog, interactions, good, noise = synthetic_world()
    cut = split_time(interactions[S.EVENT_TIMESTAMP], 0.25)
    x, labels, _ = separable()
    real_good = real_audio_probe(x, labels, folds=3, return_correct=True)
    real_noise = real_audio_probe(
        np.random.default_rng(1).standard_normal(x.shape), labels, folds=3, return_correct=True
    )
    assert real_good["_correct"].shape == (len(labels),)
    real_good, real_noise = ({k: v for k, v in r.items() if k != "_correct"} for r in (real_good, real_noise))
    correct = {
        name: real_audio_probe(f, labels, folds=3, return_correct=True)["_correct"]
        for name, f in ((HTCL, np.random.default_rng(1).standard_normal(x.shape)), (BACKBONE_AS_IS, x))
    }
    results = compare_variants(
        {STAGE1: noise, HTCL: good},
        catalog,
        interactions,
        None,
        cut,
        ks=(5, 20),
        folds=3,
        real_audio={
            HTCL: {**real_noise, "_correct": correct[HTCL]},
            BACKBONE_AS_IS: {**real_good, "_correct": correct[BACKBONE_AS_IS]},
        },
    )
    rows = results["variants"]
    assert list(rows) == [STAGE1, HTCL, BACKBONE_AS_IS]
    assert "real_audio" not in rows[STAGE1] and rows[HTCL]["real_audio"] == real_noise
    assert rows[BACKBONE_AS_IS] == {"real_audio": real_good}  # only real recordings: a row all the same
    assert "real-audio genre 1.000" in summary_line(rows[BACKBONE_AS_IS])
    paths = write_report(results, tmp_path / "eval")
    saved = json.loads(paths["json"].read_text())
    assert set(saved) == {"split_time", "catalog_songs", "heldout_favor_pairs", "hit_rate_chance", "variants", "claims"}
    md = paths["markdown"].read_text().splitlines()
    head = next(line for line in md if line.startswith("| Method"))
    cols = [c.strip() for c in head.strip("|").split("|")]
    assert cols[:4] == ["Method", "Genre acc.", "Language acc.", "Real-audio genre acc."]
    table = [[c.strip() for c in line.strip("|").split("|")] for line in md if line.startswith("| ")]
    cells = {r[0]: r for r in table}
    assert all(len(c) == len(cols) for c in cells.values())
    assert cells[BACKBONE_AS_IS][3].startswith("100.00 ±") and cells[BACKBONE_AS_IS][1] == "–"
    assert cells[HTCL][3].startswith(f"{100 * real_noise['accuracy']:.2f} ±") and cells[STAGE1][3] == "–"
    assert cells["chance"][3] == "25.00"
    every = results["claims"]["every backbone variant above every from-scratch variant on real-audio genre"]
    assert every["verdict"] == "holds" and every["paired_over"] == "recordings" and every["n"] == len(labels)
    assert every["weakest"] == f"{BACKBONE_AS_IS} vs {HTCL}"  # the only pair with both figures


N_ITEMS = 2000


def mean_items(share: float) -> tuple:
    """Per-item 0/1 values whose mean is `share`; nested across variants (the first items are the
    hits), so one variant's hits contain the other's and the paired difference is decisive."""
    return ("mean", np.arange(N_ITEMS), (np.arange(N_ITEMS) < round(share * N_ITEMS)).astype(float))


def auc_items(auc: float) -> tuple:
    """Scores label·d + z with z shared by every variant: AUC ≈ auc, ordered by d on any resample."""
    from scipy.stats import norm

    rng = np.random.default_rng(0)
    y = np.arange(1000) % 2 == 0
    return ("auc", y, y * np.sqrt(2) * norm.ppf(auc) + rng.standard_normal(1000))


def test_backbone_family_claims():
    def row(genre, real, hit, cvr, ctr=0.6, lang=0.5):
        return {
            "semantics": {"genre": {"accuracy": genre}, "language": {"accuracy": lang}},
            "real_audio": {"accuracy": real},
            "matching": {"hit_rate@100": hit},
            "ranking": {"ctr_auc": ctr, "cvr_auc": cvr},
        }

    def items(genre, real, hit, cvr, ctr=0.6, lang=0.5):
        return {
            ("semantics", "genre", "accuracy"): mean_items(genre),
            ("semantics", "language", "accuracy"): mean_items(lang),
            ("real_audio", "accuracy"): mean_items(real),
            ("matching", "hit_rate@100"): mean_items(hit),
            ("ranking", "ctr_auc"): auc_items(ctr),
            ("ranking", "cvr_auc"): auc_items(cvr),
        }

    figures = {
        RANDOM_INIT: (0.3, 0.30, 0.05, 0.55),
        STAGE1: (0.6, 0.50, 0.10, 0.60),
        HTCL: (0.6, 0.52, 0.20, 0.65),
        BACKBONE_AS_IS: (0.7, 0.80, 0.08, 0.62),
        STAGE1_BACKBONE: (0.7, 0.79, 0.12, 0.63),
        HTCL_BACKBONE: (0.69, 0.79, 0.25, 0.61),
        HTCL_CF_BACKBONE: (0.65, 0.70, 0.26, 0.70),
    }
    rows = {name: row(*f) for name, f in figures.items()}
    per_item = {name: items(*f) for name, f in figures.items()}
    claims = check_claims(rows, ks=(10, 100), per_item=per_item)

    def verdict(name):
        return claims[name]["verdict"]

    # the from-scratch family keeps its wording
    assert verdict("HTCL > stage 1 on hit-rate@100") == "holds" and verdict("HTCL > stage 1 on CVR AUC") == "holds"
    assert claims["HTCL > stage 1 on hit-rate@100"]["difference"] == pytest.approx(10.0)
    assert verdict("HTCL genre accuracy within 3 points of stage 1") == "holds"  # 0 difference, CI [0, 0] > -3
    assert verdict("HTCL_w_CF < HTCL on genre accuracy") == "n/a"  # no from-scratch w_CF row
    # CTR AUC and language tie exactly: every figure but those holds
    above = claims["HTCL above random-init on every figure"]
    assert above["verdict"] == "not significant" and above["weakest"] in ("language accuracy", "CTR AUC")
    assert above["ci95"] == [0.0, 0.0]
    # the backbone family
    within = claims["HTCL (backbone) real-audio genre within 2 points of the backbone as is"]  # 79 vs 80
    assert within["verdict"] == "holds" and within["difference"] == pytest.approx(-1.0) and within["threshold"] == -2
    assert -2 < within["ci95"][0] < -1 < within["ci95"][1] < 0
    assert verdict("every backbone variant above every from-scratch variant on real-audio genre") == "holds"
    assert verdict("HTCL (backbone) > backbone as is on hit-rate@100") == "holds"
    assert verdict("HTCL (backbone) > backbone as is on CVR AUC") == "does NOT hold"
    assert verdict("HTCL (backbone) > stage 1 (backbone) on hit-rate@100") == "holds"
    assert verdict("HTCL (backbone) > stage 1 (backbone) on CVR AUC") == "does NOT hold"
    assert verdict("HTCL (backbone) > stage 1 (backbone) on CTR AUC") == "not significant"  # a tie
    assert verdict("HTCL_w_CF (backbone) < HTCL (backbone) on genre accuracy") == "holds"
    assert verdict("HTCL (backbone) genre accuracy within 3 points of stage 1 (backbone)") == "holds"
    assert verdict("HTCL (backbone) language accuracy within 3 points of stage 1 (backbone)") == "holds"
    assert FAMILY_VARIANTS["backbone"] == (STAGE1_BACKBONE, HTCL_BACKBONE, HTCL_CF_BACKBONE)
    assert FAMILY_VARIANTS["scratch"] == (STAGE1, HTCL, HTCL_CF)

    per_item[HTCL_CF_BACKBONE][("real_audio", "accuracy")] = mean_items(0.51)  # a backbone variant below HTCL (scratch)
    per_item[HTCL_BACKBONE][("real_audio", "accuracy")] = mean_items(0.77)
    for name in (HTCL_CF_BACKBONE, HTCL_BACKBONE):
        rows[name]["real_audio"]["accuracy"] = per_item[name][("real_audio", "accuracy")][2].mean()
    claims = check_claims(rows, ks=(100,), per_item=per_item, resamples=200)  # fewer resamples: clear-cut cases
    every = claims["every backbone variant above every from-scratch variant on real-audio genre"]
    assert every["verdict"] == "does NOT hold" and every["weakest"] == f"{HTCL_CF_BACKBONE} vs {HTCL}"
    assert every["difference"] == pytest.approx(-1.0)
    assert (
        verdict_of(claims, "HTCL (backbone) real-audio genre within 2 points of the backbone as is") == "does NOT hold"
    )

    scratch_only = check_claims(
        {k: rows[k] for k in (RANDOM_INIT, STAGE1, HTCL)}, ks=(100,), per_item=per_item, resamples=200
    )
    backbone_keys = [c for c in scratch_only if "backbone" in c]
    assert len(backbone_keys) == 10 and all(scratch_only[c]["verdict"] == "n/a" for c in backbone_keys)
    # without per-item data nothing can be paired: n/a, with the figures' difference and no interval
    unpaired = check_claims(rows, ks=(100,))
    assert all(c["verdict"] == "n/a" for c in unpaired.values())
    assert unpaired["HTCL > stage 1 on hit-rate@100"]["difference"] == pytest.approx(10.0)
    assert unpaired["HTCL > stage 1 on hit-rate@100"]["ci95"] is None
    md = results_markdown(
        {
            "split_time": "t",
            "heldout_favor_pairs": 1,
            "catalog_songs": 2,
            "hit_rate_chance": {"hit_rate@100": 1.0},
            "variants": rows,
            "claims": claims,
        }
    )
    assert (
        "- does NOT hold: every backbone variant above every from-scratch variant on real-audio genre "
        f"(weakest: {HTCL_CF_BACKBONE} vs {HTCL}, -1.0 points, 95% CI "
    ) in md
    hr = claims["HTCL > stage 1 on hit-rate@100"]
    assert 8 < hr["ci95"][0] < 10 < hr["ci95"][1] < 12  # 200 of 2000 pairs differ, all one way
    assert (
        f"- holds: HTCL > stage 1 on hit-rate@100 (+10.0 points, 95% CI {hr['ci95'][0]:+.1f} to {hr['ci95'][1]:+.1f})"
        in md
    )
    assert "HTCL genre accuracy within 3 points of stage 1 (+0.0 points, 95% CI +0.0 to +0.0; threshold -3)" in md
    json.dumps(claims)  # JSON-ready


def verdict_of(claims: dict, name: str) -> str:
    return claims[name]["verdict"]


# --- paired claims --------------------------------------------------------------------------


def test_paired_difference_by_hand():
    from sklearn.metrics import roc_auc_score

    from htcl.evaluation import paired_difference
    from htcl.intervals import bootstrap_ci

    # one pair of four differs, in A's favour: the difference is 1/4, and no resample can turn it round
    diff, ci, n = paired_difference([1, 1, 1, 0], [0, 1, 1, 0])
    assert diff == 0.25 and n == 4 and 0 <= ci[0] <= 0.25 <= ci[1] <= 1
    # an item NaN in either variant (a pair left out) is not paired
    diff, ci, n = paired_difference([1, np.nan, 1, 0], [0, 1, 1, np.nan])
    assert n == 2 and diff == 0.5
    # pairing matters: B's hits are A's minus 10 of 200; each figure's own interval overlaps the
    # other's, but every resample of the same pairs finds A ahead
    rng = np.random.default_rng(0)
    a = (rng.random(200) < 0.5).astype(float)
    b = a.copy()
    b[np.flatnonzero(a)[:10]] = 0
    assert bootstrap_ci(a)[0] < bootstrap_ci(b)[1]
    diff, ci, n = paired_difference(a, b)
    assert diff == pytest.approx(0.05) and ci[0] > 0
    assert paired_difference(b, a)[1][1] < 0  # and the other way round is below 0
    # AUC over the same impressions, ties counting half as in roc_auc_score
    y = np.array([0, 0, 1, 1, 0, 1, 0, 1], dtype=bool)
    s1 = np.array([0.1, 0.4, 0.35, 0.8, 0.2, 0.9, 0.5, 0.5])
    s2 = np.array([0.3, 0.3, 0.3, 0.3, 0.6, 0.2, 0.1, 0.9])
    diff, ci, n = paired_difference(s1, s2, y)
    assert n == 8 and diff == pytest.approx(roc_auc_score(y, s1) - roc_auc_score(y, s2))
    assert ci[0] <= diff <= ci[1]
    perfect, reversed_ = y.astype(float), 1 - y.astype(float)
    assert paired_difference(perfect, reversed_, y)[:2] == (1.0, [1.0, 1.0])
    with pytest.raises(ValueError, match="not the same items"):
        paired_difference([1, 0], [1, 0, 1])


def test_claim_verdicts_and_within_n_points():
    from htcl.evaluation import claim_verdict

    assert claim_verdict([1.0, 7.5]) == "holds"
    assert claim_verdict([-1.0, 2.0]) == "not significant"
    assert claim_verdict([-3.0, -0.5]) == "does NOT hold"
    assert claim_verdict([0.0, 0.0]) == "not significant"  # a tie is not "above"
    # "within 3 points": the difference's interval against -3
    assert claim_verdict([-2.5, 1.0], -3) == "holds"
    assert claim_verdict([-3.5, -1.0], -3) == "not significant"
    assert claim_verdict([-5.0, -3.5], -3) == "does NOT hold"
    assert claim_verdict(None) == claim_verdict([float("nan"), float("nan")]) == "n/a"

    # hand-made per-pair hits through check_claims: HTCL's hits contain stage 1's (holds), the other
    # way round (does NOT hold), and independent coin flips at one rate (not significant)
    rng = np.random.default_rng(0)
    ids = np.arange(400)
    better = (rng.random(400) < 0.4).astype(float)
    worse = better.copy()
    worse[np.flatnonzero(better)[:40]] = 0
    coin1, coin2 = (rng.random(400) < 0.3).astype(float), (rng.random(400) < 0.3).astype(float)
    path = ("matching", "hit_rate@10")
    for first, second, verdict in (
        (better, worse, "holds"),
        (worse, better, "does NOT hold"),
        (coin1, coin2, "not significant"),
    ):
        rows = {STAGE1: {"matching": {"hit_rate@10": second.mean()}}, HTCL: {"matching": {"hit_rate@10": first.mean()}}}
        per_item = {STAGE1: {path: ("mean", ids, second)}, HTCL: {path: ("mean", ids, first)}}
        claim = check_claims(rows, ks=(10,), per_item=per_item)["HTCL > stage 1 on hit-rate@10"]
        assert claim["verdict"] == verdict and claim["n"] == 400
        assert claim["difference"] == pytest.approx(100 * (first.mean() - second.mean()))
    # items are paired by id: stage 1 scored in another order, and on one song fewer
    rows = {STAGE1: {"semantics": {"genre": {"accuracy": 0.5}}}, HTCL: {"semantics": {"genre": {"accuracy": 0.5}}}}
    per_item = {
        HTCL: {("semantics", "genre", "accuracy"): ("mean", np.array([1, 2, 3, 4]), np.array([1.0, 0, 1, 0]))},
        STAGE1: {("semantics", "genre", "accuracy"): ("mean", np.array([3, 2, 1]), np.array([1.0, 0, 1]))},
    }
    claim = check_claims(rows, ks=(10,), per_item=per_item)["HTCL genre accuracy within 3 points of stage 1"]
    assert claim["n"] == 3 and claim["difference"] == 0 and claim["verdict"] == "holds"


# --- external embeddings --------------------------------------------------------------------


def test_external_embeddings_coverage_and_misses(tmp_path):
    from htcl.evaluation import pair_ranks, read_external_embeddings

    # ten catalog songs on a circle; the table lacks songs 9 and 10
    angles = np.linspace(0, 1, 10)
    table = pd.DataFrame(
        {"song_id": np.arange(1, 9), "embedding": [[np.cos(t), np.sin(t)] for t in angles[:8]], "other": "ignored"}
    )
    table.to_parquet(tmp_path / "cf.parquet")
    emb, cov = read_external_embeddings(tmp_path / "cf.parquet", np.arange(1, 11))
    assert {
        k: cov[k] for k in ("catalog_songs", "covered", "missing", "missing_song_ids", "not_in_catalog", "dim")
    } == {"catalog_songs": 10, "covered": 8, "missing": 2, "missing_song_ids": [9, 10], "not_in_catalog": 0, "dim": 2}
    assert list(emb.song_ids) == list(range(1, 11)) and emb.covered.tolist() == [True] * 8 + [False] * 2
    np.testing.assert_array_equal(emb.vectors[8:], 0)  # a zero vector for the probes and rankers
    # K = 9 is every other song: each pair with both vectors is a hit; a pair with song 9 or 10 a miss
    triggers, targets = [1, 1, 10, 3, 2], [2, 9, 3, 4, 10]
    got = hit_rate_at_k(emb, triggers, targets, ks=(9,))
    assert got["hit_rate@9"] == pytest.approx(2 / 5) and got["pairs"] == 5 and got["pairs_without_vector"] == 3
    assert np.isinf(pair_ranks(emb, triggers, targets)[[1, 2, 4]]).all()
    # a song outside the catalog is counted, not scored
    pd.DataFrame({"song_id": [1, 2, 99], "embedding": ["[1, 0]", "0 1", "[0.5, 0.5]"]}).to_csv(
        tmp_path / "v.csv", index=False
    )
    emb, cov = read_external_embeddings(tmp_path / "v.csv", [1, 2, 3])
    assert (cov["covered"], cov["missing"], cov["not_in_catalog"]) == (2, 1, 1)
    np.testing.assert_allclose(emb.vectors[:2], [[1, 0], [0, 1]])


def test_external_embeddings_as_a_row_of_the_comparison(tmp_path):
    from htcl.evaluation import pair_hits, pair_ranks, ranking_aucs, read_external_embeddings

    catalog, interactions, good, noise = synthetic_world()
    cut = split_time(interactions[S.EVENT_TIMESTAMP], 0.25)
    pairs = heldout_favor_pairs(interactions, cut)
    lacking = [int(pairs[S.TRIGGER_SONG_ID].iloc[0]), int(pairs[S.REC_SONG_ID].iloc[1])]
    keep = ~np.isin(good.song_ids, lacking)
    pd.DataFrame(
        {"song_id": good.song_ids[keep], "embedding": [" ".join(map(str, v)) for v in good.vectors[keep]]}
    ).to_csv(tmp_path / "team_cf.csv", index=False)
    ext, cov = read_external_embeddings(tmp_path / "team_cf.csv", catalog[S.SONG_ID])
    assert (cov["covered"], cov["missing"]) == (58, 2)
    results = compare_variants(
        {"team CF": ext}, catalog, interactions, None, cut, ks=(5, 20), folds=3, coverage={"team CF": cov}
    )
    rows = results["variants"]
    in_lacking = pairs[S.TRIGGER_SONG_ID].isin(lacking) | pairs[S.REC_SONG_ID].isin(lacking)
    assert rows["team CF"]["matching"]["pairs"] == len(pairs)  # none dropped
    assert rows["team CF"]["matching"]["pairs_without_vector"] == int(in_lacking.sum()) >= 2
    hits = results["_per_item"]["team CF"][("matching", "hit_rate@20")][2]
    assert (hits[in_lacking.to_numpy()] == 0).all()
    # elsewhere the hits of a table holding zero vectors for those songs
    zeros = Embeddings(good.song_ids, np.where(keep[:, None], good.vectors, 0))
    same = pair_hits(pair_ranks(zeros, pairs[S.TRIGGER_SONG_ID], pairs[S.REC_SONG_ID]), 20)
    np.testing.assert_array_equal(hits[~in_lacking.to_numpy()], same[~in_lacking.to_numpy()])
    assert rows["team CF"]["semantics"]["genre"]["n"] == 60  # missing songs probed with a zero vector
    # the rankers take the missing songs' zero vectors (half the log, to keep the test short)
    frame = point_in_time_stats(interactions, dict(zip(catalog[S.SONG_ID], catalog[S.GENRE]))).iloc[::2]
    assert frame[S.SONG_ID].isin(lacking).any() and frame[S.TRIGGER_SONG_ID].isin(lacking).any()
    found = {}
    ranking = ranking_aucs(frame, cut, ext, per_item=found)
    assert "error" not in ranking and ranking["ctr_auc"] > 0.5
    labels, scores = found["ctr_auc"]
    assert len(labels) == len(scores) == ranking["rows"]
    paths = write_report(results, tmp_path / "eval")
    saved = json.loads(paths["json"].read_text())
    assert saved["coverage"]["team CF"]["missing"] == 2
    md = paths["markdown"].read_text()
    assert "| team CF |" in md and "Coverage: team CF" in md and "has vectors for 58 of 60 catalog songs" in md


def test_read_external_embeddings_errors_name_file_and_row(tmp_path):
    from htcl.evaluation import read_external_embeddings

    def bad(name: str, text: str, match: str):
        (tmp_path / name).write_text(text)
        with pytest.raises(ValueError, match=match):
            read_external_embeddings(tmp_path / name, [1, 2, 3])

    bad(
        "length.csv",
        'song_id,embedding\n1,"[0.1, 0.2]"\n2,"[0.1, 0.2, 0.3]"\n',
        r"length\.csv: data row 2 \(song_id 2\): embedding has 3 values, the first row has 2",
    )
    bad(
        "nan.csv",
        "song_id,embedding\n1,0.1 0.2\n2,0.1 0.2\n3,0.3 nan\n",
        r"nan\.csv: data row 3 \(song_id 3\): embedding has NaN or inf",
    )
    bad("inf.csv", 'song_id,embedding\n1,"[inf, 0]"\n', r"inf\.csv: data row 1 \(song_id 1\): embedding has NaN or inf")
    bad(
        "dup.csv",
        "song_id,embedding\n1,1 0\n2,0 1\n1,1 1\n",
        r"dup\.csv: data row 3 \(song_id 1\): duplicate song_id, first at data row 1",
    )
    bad(
        "nocol.csv",
        "song_id,vector\n1,1 0\n",
        r"nocol\.csv: no 'embedding' column; columns are \['song_id', 'vector'\]",
    )
    bad("noid.csv", "id,embedding\n1,1 0\n", r"noid\.csv: no 'song_id' column")
    bad("empty.csv", "song_id,embedding\n", r"empty\.csv: no rows")
    bad("blank.csv", "song_id,embedding\n1,1 0\n2,\n", r"blank\.csv: data row 2 \(song_id 2\): empty embedding")
    bad("word.csv", "song_id,embedding\n1,one two\n", r"word\.csv: data row 1 \(song_id 1\): not a list of numbers")
    bad("id.csv", "song_id,embedding\n1,1 0\nx,0 1\n", r"id\.csv: data row 2: song_id 'x' is not an integer")
    bad("other.csv", "song_id,embedding\n7,1 0\n", r"other\.csv: none of its 1 song_id\(s\) is in the catalog")
    bad("t.json", "{}", r"t\.json: unknown embeddings format")
    with pytest.raises(ValueError, match=r"gone\.parquet: no such embeddings file"):
        read_external_embeddings(tmp_path / "gone.parquet", [1])
    # Parquet: a list column and a fixed-size list column read alike; a bad row is named the same way
    import pyarrow as pa
    import pyarrow.parquet as pq

    fixed = pa.table({"song_id": [1, 2], "embedding": pa.array([[1.0, 0.0], [0.0, 1.0]], pa.list_(pa.float32(), 2))})
    pq.write_table(fixed, tmp_path / "fixed.parquet")
    emb, cov = read_external_embeddings(tmp_path / "fixed.parquet", [1, 2, 3])
    assert cov["dim"] == 2 and cov["covered"] == 2
    pd.DataFrame({"song_id": [1, 2], "embedding": [[1.0, 0.0], [0.0, float("nan")]]}).to_parquet(tmp_path / "n.parquet")
    with pytest.raises(ValueError, match=r"n\.parquet: data row 2 \(song_id 2\): embedding has NaN or inf"):
        read_external_embeddings(tmp_path / "n.parquet", [1, 2])


def test_cli_embeddings_argument(capsys):
    from htcl.cli import build_parser, main
    from ray_jobs import evaluate as evaluate_job

    args = build_parser().parse_args(
        ["evaluate", "--local", "--embeddings", "team CF=a.parquet", "--embeddings", "item2vec=/x/b.csv"]
    )
    assert args.embeddings == [("team CF", "a.parquet"), ("item2vec", "/x/b.csv")]
    assert build_parser().parse_args(["evaluate", "--local"]).embeddings == []
    for form in ("no-equals.parquet", "=a.parquet", "name="):
        with pytest.raises(SystemExit) as e:
            build_parser().parse_args(["evaluate", "--local", "--embeddings", form])
        assert e.value.code == 2 and "expected NAME=PATH" in capsys.readouterr().err
    # the Ray job (what `htcl evaluate` without --local runs) parses it the same way
    with pytest.raises(SystemExit) as e:
        evaluate_job.main(["--config", "configs/demo.yaml", "--embeddings", "oops"])
    assert e.value.code == 2 and "expected NAME=PATH" in capsys.readouterr().err
    for argv, message in (
        (["--embeddings", "a=x.csv", "--embeddings", "a=y.csv"], "'a' given twice"),
        (["--embeddings", f"{HTCL}=x.csv"], "htcl's own variants"),
    ):
        with pytest.raises(SystemExit) as e:
            main(["evaluate", "--local", "--config", "configs/demo.yaml", *argv])
        assert e.value.code == 2 and message in capsys.readouterr().err
        with pytest.raises(SystemExit) as e:
            evaluate_job.main(["--config", "configs/demo.yaml", *argv])
        assert e.value.code == 2 and message in capsys.readouterr().err
        # `htcl demo` passes them to its evaluate step, and refuses a bad one before the first step
        with pytest.raises(SystemExit) as e:
            main(["demo", "--local", "--config", "configs/demo.yaml", *argv])
        assert e.value.code == 2 and message in capsys.readouterr().err
    assert build_parser().parse_args(["demo", "--embeddings", "cf=a.parquet"]).embeddings == [("cf", "a.parquet")]


def test_real_audio_probe_on_real_recordings(shared_data):
    """The benchmark's real set: 20 songs per genre decode, and mel statistics carry genre."""
    import torch

    from htcl.audio import LogMel

    manifest = shared_data / "emotify_real" / "manifest.tsv"
    if not manifest.is_file():
        pytest.skip(f"no {manifest}")
    df = read_audio_manifest(manifest)
    assert df["group"].isna().all() and df["label"].nunique() == 4
    sub = df.groupby("label").head(20).reset_index(drop=True)
    waves, failed = load_manifest_audio(sub, sample_rate=16000, max_seconds=30.0, progress=False)
    assert failed == [] and len(waves) == 80 and all(len(w) == 30 * 16000 for w in waves)
    logmel = LogMel()
    with torch.no_grad():
        mels = {i: logmel(torch.from_numpy(w))[0].numpy() for i, w in enumerate(waves)}
    feats = mel_statistics(mels).vectors
    probe = real_audio_probe(feats, sub["label"], folds=5)
    assert probe["n"] == 80 and probe["chance"] == pytest.approx(0.25)
    assert probe["accuracy_ci95"][0] > probe["chance"]  # 64% on this subset with mel statistics


def test_zero_shot_retrieval_by_hand():
    from htcl.evaluation import retrieval_markdown, zero_shot_retrieval

    eye = np.eye(12)
    r = zero_shot_retrieval(eye, eye)
    assert r["n"] == 12
    for d in ("audio_to_text", "text_to_audio"):
        assert r[d] == {"r@1": 1.0, "r@10": 1.0, "median_rank": 1.0}
    # text j = e_j + 2 e_{j+1}: every song's true match is second, behind its neighbour, both ways
    text = eye + 2 * np.roll(eye, 1, axis=1)
    r = zero_shot_retrieval(eye, text)
    for d in ("audio_to_text", "text_to_audio"):
        assert r[d] == {"r@1": 0.0, "r@10": 1.0, "median_rank": 2.0}
    # opposite vectors: the match is last of 12 (ties count against it)
    r = zero_shot_retrieval(eye, -eye)
    assert r["audio_to_text"] == {"r@1": 0.0, "r@10": 0.0, "median_rank": 12.0}
    # a permutation of the texts: the true match wherever the permutation sends it
    rng = np.random.default_rng(0)
    x = rng.standard_normal((30, 8))
    perm = rng.permutation(30)
    r = zero_shot_retrieval(x, x[perm])
    assert r["audio_to_text"]["r@1"] == pytest.approx(np.mean(perm == np.arange(30)))
    with pytest.raises(ValueError, match="one shape"):
        zero_shot_retrieval(eye, eye[:3])
    md = retrieval_markdown({"a": zero_shot_retrieval(eye, eye)}, artists=2)
    assert "held-out artists (2 artists, 12 songs)" in md and "| a | 100.00 | 100.00 | 1 |" in md
    assert "| chance | 8.33 | 83.33 | 6.5 |" in md
