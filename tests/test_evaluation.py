"""Evaluation: hit-rate@K, linear probes, point-in-time stats, the comparison table and report."""

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from htcl import schema as S
from htcl.evaluation import (
    BACKBONE_AS_IS, FAMILY_VARIANTS, HTCL, HTCL_BACKBONE, HTCL_CF, HTCL_CF_BACKBONE, RANDOM_INIT, STAGE1,
    STAGE1_BACKBONE, Embeddings, check_claims, compare_variants, heldout_favor_pairs, hit_rate_at_k, linear_probe,
    load_manifest_audio, mel_statistics, read_audio_manifest, real_audio_probe, results_markdown, summary_line,
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
    assert "Real-audio" not in md  # no real recordings given: no such column
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
        "file\tgenre\tseconds\nsub/a.mp3\trock\t30\n/abs/b.mp3\tNA\t30\n../c.mp3\tpop\t30\n")
    df = read_audio_manifest(tmp_path / "set" / "manifest.tsv")
    assert list(df.columns) == ["path", "label", "group"]
    assert list(df["path"]) == [str(tmp_path / "set" / "sub" / "a.mp3"), "/abs/b.mp3", str(tmp_path / "c.mp3")]
    assert list(df["label"]) == ["rock", "NA", "pop"]  # a genre named "NA" is a label, not a missing cell
    assert df["group"].isna().all()
    pd.DataFrame({"path": ["x.flac", "y.flac"], "label": ["a", "b"], "group": ["artist1", "artist2"]}).to_csv(
        tmp_path / "m.csv", index=False)
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
        tmp_path / "m.tsv", sep="\t", index=False)
    df = read_audio_manifest(tmp_path / "m.tsv")
    waves, failed = load_manifest_audio(df, sample_rate=8000, max_seconds=0.25, progress=False)
    assert [w.shape for w in waves] == [(2000,), (2000,)] and waves[0].dtype == np.float32
    assert [(f["row"], Path(f["path"]).name, f["reason"]) for f in failed] == [(1, "broken.wav", "not_audio"),
                                                                              (2, "gone.wav", "missing")]
    kept = df.drop(index=df.index[[f["row"] for f in failed]])
    assert list(kept["label"]) == ["a", "b"]  # aligned with waves


def separable(n_per: int = 30, seed: int = 0):
    rng = np.random.default_rng(seed)
    labels = np.repeat(["rock", "pop", "jazz", "folk"], n_per)
    groups = np.array([f"{l}-artist{i % 6}" for i, l in enumerate(labels)])
    centers = {c: rng.standard_normal(16) * 4 for c in ("rock", "pop", "jazz", "folk")}
    x = np.array([centers[l] for l in labels]) + rng.standard_normal((len(labels), 16))
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
    real_good = real_audio_probe(x, labels, folds=3)
    real_noise = real_audio_probe(np.random.default_rng(1).standard_normal(x.shape), labels, folds=3)
    results = compare_variants({STAGE1: noise, HTCL: good}, catalog, interactions, None, cut, ks=(5, 20), folds=3,
                               real_audio={HTCL: real_noise, BACKBONE_AS_IS: real_good})
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
    assert results["claims"]["every backbone variant above every from-scratch variant on real-audio genre"] is True


def test_backbone_family_claims():
    def row(genre, real, hit, cvr, ctr=0.6, lang=0.5):
        return {"semantics": {"genre": {"accuracy": genre}, "language": {"accuracy": lang}},
                "real_audio": {"accuracy": real}, "matching": {"hit_rate@100": hit},
                "ranking": {"ctr_auc": ctr, "cvr_auc": cvr}}

    rows = {RANDOM_INIT: row(0.3, 0.30, 0.05, 0.55), STAGE1: row(0.6, 0.50, 0.10, 0.60), HTCL: row(0.6, 0.52, 0.20, 0.65),
            BACKBONE_AS_IS: row(0.7, 0.80, 0.08, 0.62), STAGE1_BACKBONE: row(0.7, 0.79, 0.12, 0.63),
            HTCL_BACKBONE: row(0.69, 0.785, 0.25, 0.61), HTCL_CF_BACKBONE: row(0.65, 0.70, 0.26, 0.70)}
    claims = check_claims(rows, ks=(10, 100))
    # the from-scratch family keeps its wording
    assert claims["HTCL > stage 1 on hit-rate@100"] is True and claims["HTCL > stage 1 on CVR AUC"] is True
    assert claims["HTCL genre accuracy within 3 points of stage 1"] is True
    assert claims["HTCL_w_CF < HTCL on genre accuracy"] is None  # no from-scratch w_CF row
    assert claims["HTCL above random-init on every figure"] is False  # CTR AUC ties
    # the backbone family
    assert claims["HTCL (backbone) real-audio genre within 2 points of the backbone as is"] is True  # 78.5 vs 80
    assert claims["every backbone variant above every from-scratch variant on real-audio genre"] is True
    assert claims["HTCL (backbone) > backbone as is on hit-rate@100"] is True
    assert claims["HTCL (backbone) > backbone as is on CVR AUC"] is False
    assert claims["HTCL (backbone) > stage 1 (backbone) on hit-rate@100"] is True
    assert claims["HTCL (backbone) > stage 1 (backbone) on CVR AUC"] is False
    assert claims["HTCL (backbone) > stage 1 (backbone) on CTR AUC"] is False
    assert claims["HTCL_w_CF (backbone) < HTCL (backbone) on genre accuracy"] is True
    assert claims["HTCL (backbone) genre accuracy within 3 points of stage 1 (backbone)"] is True
    assert claims["HTCL (backbone) language accuracy within 3 points of stage 1 (backbone)"] is True
    assert FAMILY_VARIANTS["backbone"] == (STAGE1_BACKBONE, HTCL_BACKBONE, HTCL_CF_BACKBONE)
    assert FAMILY_VARIANTS["scratch"] == (STAGE1, HTCL, HTCL_CF)

    rows[HTCL_CF_BACKBONE]["real_audio"]["accuracy"] = 0.51  # one backbone variant below HTCL (scratch)
    rows[HTCL_BACKBONE]["real_audio"]["accuracy"] = 0.77
    claims = check_claims(rows, ks=(100,))
    assert claims["every backbone variant above every from-scratch variant on real-audio genre"] is False
    assert claims["HTCL (backbone) real-audio genre within 2 points of the backbone as is"] is False

    scratch_only = check_claims({k: rows[k] for k in (RANDOM_INIT, STAGE1, HTCL)}, ks=(100,))
    backbone_keys = [c for c in scratch_only if "backbone" in c]
    assert len(backbone_keys) == 10 and all(scratch_only[c] is None for c in backbone_keys)
    md = results_markdown({"split_time": "t", "heldout_favor_pairs": 1, "catalog_songs": 2,
                           "hit_rate_chance": {"hit_rate@100": 1.0}, "variants": rows, "claims": claims})
    assert "- does NOT hold: every backbone variant above every from-scratch variant on real-audio genre" in md


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
