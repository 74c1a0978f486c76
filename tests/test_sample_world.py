"""The sample world (htcl/sample_world): tables in the data contracts, coverage, decodable audio,
determinism whatever the worker count, the real-data sources, and the intended structure shown by
simple cross-validated models (figures computed from the written audio and logs at generation).

The 40-song world is generated once per module (about a minute on 2 cores); the determinism check
renders a 4-song world with 1 and with 2 workers, and with another seed.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow.parquet as pq
import pytest
import soundfile as sf

from htcl import schema
from htcl.audio import load_audio
from htcl.sample_world import midi
from htcl.sample_world.artists import INSTRUMENTAL, LANGUAGES
from htcl.sample_world.cli import main as sample_data_main
from htcl.sample_world.lyrics import word_lists
from htcl.sample_world.world import generate_world

SONGS = 40


@pytest.fixture(scope="module")
def world(tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("sample_world") / "w40"
    paths = generate_world(root, songs=SONGS, seed=0, seconds=30.0, workers=2, progress=False)
    tables = {
        name: pd.read_parquet(paths[name]) for name in ("catalog", "interactions", "sessions", "listeners", "truth")
    }
    return {"paths": paths, "root": root, **tables, "meta": json.loads(paths["world_json"].read_text())}


# --- contracts ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "name, contract",
    [
        ("catalog", schema.CATALOG_SCHEMA),
        ("interactions", schema.INTERACTIONS_SCHEMA),
        ("sessions", schema.SESSIONS_SCHEMA),
    ],
)
def test_tables_follow_the_data_contracts(world, name, contract):
    written = pq.read_schema(world["paths"][name])
    assert written.names == contract.names
    for field in contract:
        assert written.field(field.name).type == field.type, field.name
    assert len(world[name]) > 0


def test_tables_are_consistent(world):
    catalog, interactions, sessions = world["catalog"], world["interactions"], world["sessions"]
    listeners, truth = world["listeners"], world["truth"]
    songs = set(catalog[schema.SONG_ID])
    assert len(catalog) == SONGS and catalog[schema.SONG_ID].is_unique
    assert sorted(truth[schema.SONG_ID]) == sorted(songs)
    for col in (schema.TRIGGER_SONG_ID, schema.REC_SONG_ID):
        assert set(interactions[col]) <= songs
    assert set(sessions[schema.SONG_ID]) <= songs
    users = set(listeners["user_id"])
    assert set(interactions[schema.USER_ID]) <= users and set(sessions[schema.USER_ID]) <= users
    assert (interactions[schema.TRIGGER_SONG_ID] != interactions[schema.REC_SONG_ID]).all()
    # favor is only possible after a click; both happen, neither always
    assert not (interactions[schema.FAVORED] & ~interactions[schema.CLICKED]).any()
    assert 0.05 < interactions[schema.CLICKED].mean() < 0.8
    assert 0.05 < interactions[schema.FAVORED].sum() / interactions[schema.CLICKED].sum() < 0.95
    # sessions: positions 0..n-1, time moves forward inside a session
    for _, s in sessions.groupby(schema.SESSION_ID):
        assert list(s[schema.POSITION]) == list(range(len(s)))
        assert s[schema.EVENT_TIMESTAMP].is_monotonic_increasing
    # truth carries the hidden factors the checks need
    for col in ("artist_id", "instrument_family", "tempo_bpm", "energy", "mode", "vocal", "popularity", "audio_sha256"):
        assert col in truth.columns
    affinity = listeners[[c for c in listeners.columns if c.startswith("affinity_")]].to_numpy()
    np.testing.assert_allclose(affinity.sum(axis=1), 1.0, atol=1e-4)


def test_world_covers_genres_and_languages(world):
    catalog = world["catalog"]
    languages = set(catalog[schema.LANGUAGE]) - {INSTRUMENTAL}
    assert catalog[schema.GENRE].nunique() >= 4
    assert len(languages) >= 3 and languages <= set(LANGUAGES)
    sung = (catalog[schema.LANGUAGE] != INSTRUMENTAL).mean()
    assert 0.2 < sung < 0.8  # a share of songs is sung, the rest instrumental


def test_text_is_informative_but_imperfect(world):
    catalog = world["catalog"]
    words = word_lists()
    for _, row in catalog.iterrows():
        assert row[schema.TITLE].strip() and row[schema.ARTIST].strip()
        if row[schema.LANGUAGE] == INSTRUMENTAL:
            assert row[schema.LYRICS] == ""
        else:  # lyrics are real words of the sung language
            vocabulary = set(words[row[schema.LANGUAGE]])
            lyric_words = row[schema.LYRICS].lower().split()
            assert lyric_words and set(lyric_words) <= vocabulary
    genre_tagged = [
        g.replace("_", " ") in [t.strip() for t in tags.split(",")]
        for g, tags in zip(catalog[schema.GENRE], catalog[schema.TAGS])
    ]
    assert 0.3 < np.mean(genre_tagged) < 0.95  # informative, yet missing or wrong for some songs
    assert (catalog[schema.TAGS] == "").any() or not all(genre_tagged)


def test_every_audio_file_decodes_with_load_audio(world):
    from htcl.mels import read_catalog

    catalog, truth = read_catalog(world["paths"]["catalog"]), world["truth"].set_index(schema.SONG_ID)
    for song_id, path in zip(catalog[schema.SONG_ID], catalog[schema.AUDIO_PATH]):
        assert sf.info(path).format == "FLAC"
        wave = load_audio(path, sample_rate=16000, max_seconds=None)
        assert wave.dtype == np.float32 and wave.ndim == 1
        assert abs(len(wave) / 16000 - truth.loc[song_id, "duration_s"]) < 0.01
        assert 5.0 <= len(wave) / 16000 <= 30.0
        assert np.isfinite(wave).all() and np.sqrt(np.mean(wave**2)) > 1e-3
        assert hashlib.sha256(Path(path).read_bytes()).hexdigest() == truth.loc[song_id, "audio_sha256"]


def test_artists_keep_their_sound(world):
    truth = world["truth"]
    per_artist = truth.groupby("artist_id")
    assert (per_artist["instrument_family"].nunique() == 1).all()
    assert (per_artist["programs"].nunique() == 1).all()
    assert (per_artist["transpose"].nunique() == 1).all()
    assert truth["artist_id"].nunique() < len(truth)  # some artists have several songs


def test_sessions_follow_affinity_with_exploration(world):
    """Co-occurrence is not semantic similarity: adjacent plays share a genre more often than
    chance (affinity), but far from always (exploration jumps, drift)."""
    genre = world["catalog"].set_index(schema.SONG_ID)[schema.GENRE]
    s = world["sessions"].sort_values([schema.SESSION_ID, schema.POSITION])
    same_session = s[schema.SESSION_ID].to_numpy()[1:] == s[schema.SESSION_ID].to_numpy()[:-1]
    g = genre.loc[s[schema.SONG_ID]].to_numpy()
    adjacent_same = (g[1:] == g[:-1])[same_session].mean()
    shares = genre.value_counts(normalize=True).to_numpy()
    chance = float((shares**2).sum())
    assert chance + 0.1 < adjacent_same < 0.95


def test_card_describes_the_world(world):
    card = world["paths"]["card"].read_text()
    for text in ("--songs 40", "--seed 0", "catalog.parquet", "truth.parquet", "artists held out", "favor AUC"):
        assert text in card
    assert world["meta"]["params"]["songs"] == SONGS and world["meta"]["timing"]["total_seconds"] > 0


# --- structure, shown by simple cross-validated models ----------------------------------------


def test_genre_and_language_are_audible(world):
    """On 40 songs (two or three artists per genre, one per language) only the random split has
    the data to learn from: it may lean on an artist's sound, so the artist-held-out figures of
    larger worlds (the card, README "Sample world") are the stronger evidence."""
    figures = world["meta"]["figures"]
    genre = figures["genre_from_audio"]["songs_split"]
    assert genre["classes"] >= 4
    assert genre["accuracy"] > genre["chance"] + 0.3, genre
    language = figures["language_from_audio"]["songs_split"]
    assert language["classes"] >= 3
    assert language["accuracy"] > language["chance"] + 0.15, language
    assert figures["genre_from_audio"]["artists_held_out"]["n"] == SONGS  # computed, reported in the card


def test_taste_factors_are_audible(world):
    figures = world["meta"]["figures"]
    vocal = figures["vocal_from_audio"]["artists_held_out"]
    assert vocal["accuracy"] > vocal["chance"] + 0.15, vocal
    assert figures["energy_from_audio"]["artists_held_out"]["r2"] > 0.3
    assert figures["tempo_from_audio"]["songs_split"]["r2"] > 0.1


def test_favor_follows_taste_more_than_genre(world):
    favor = world["meta"]["figures"]["favor"]
    assert favor["auc_taste"] > 0.65
    assert favor["auc_taste"] > favor["auc_genre"] + 0.03, favor
    assert favor["auc_taste_given_click"] > favor["auc_genre_given_click"] + 0.03, favor


# --- determinism ---------------------------------------------------------------------------------


def _relative(frame: pd.DataFrame) -> pd.DataFrame:
    out = frame.copy()
    if schema.AUDIO_PATH in out:
        out[schema.AUDIO_PATH] = [Path(p).name for p in out[schema.AUDIO_PATH]]
    return out


def test_same_seed_same_world_whatever_the_workers(tmp_path):
    """4 five-second songs: enough for 2 workers to share the rendering, with sung and
    instrumental songs (both render paths), at a fraction of the cost of a bigger world."""
    kw = dict(songs=4, seconds=5.0, progress=False, validate=False)
    a = generate_world(tmp_path / "a", seed=3, workers=1, **kw)
    b = generate_world(tmp_path / "b", seed=3, workers=2, **kw)
    for name in ("catalog", "interactions", "sessions", "listeners", "truth"):
        pd.testing.assert_frame_equal(_relative(pd.read_parquet(a[name])), _relative(pd.read_parquet(b[name])))
    assert set(pd.read_parquet(a["truth"])["vocal"]) == {True, False}  # both render paths compared
    files_a = sorted(a["audio"].glob("*.flac"))
    assert len(files_a) == 4
    for f in files_a:
        assert f.read_bytes() == (b["audio"] / f.name).read_bytes(), f.name
    assert a["card"].read_text() == b["card"].read_text()
    # and the seed matters (same arguments otherwise; 1 worker: the pool start-up proves nothing here)
    c = generate_world(tmp_path / "c", seed=4, workers=1, **kw)
    assert set(pd.read_parquet(a["truth"])["audio_sha256"]).isdisjoint(pd.read_parquet(c["truth"])["audio_sha256"])


# --- pieces of the machinery ------------------------------------------------------------------


def test_restyle_closes_notes_at_the_cut():
    """fluidsynth renders until every voice ends: a note left on at the cut would render forever."""
    on = [(0, 0x90, bytes([60, 100])), (0, 0x91, bytes([64, 100])), (480 * 8, 0x80, bytes([60, 0]))]
    mf = midi.MidiFile(ticks_per_beat=480, tracks=[on])
    styled = midi.restyle(mf, midi.Restyle(programs=(19,), max_seconds=1.0))  # 120 bpm: the cut is at beat 2
    events = styled.tracks[0]
    for channel, pitch in ((0, 60), (1, 64)):
        ons = [t for t, s, d in events if s == 0x90 | channel and d[0] == pitch and d[1] > 0]
        offs = [
            t for t, s, d in events if (s == 0x80 | channel or (s == 0x90 | channel and d[1] == 0)) and d[0] == pitch
        ]
        assert len(ons) == len(offs) == 1 and offs[0] == 960
    assert midi.midi_seconds(midi.write_midi(styled)) == pytest.approx(1.0)


def test_score_to_midi_merges_ties():
    from music21 import note, stream, tie

    from htcl.sample_world.corpus import score_to_midi

    part = stream.Part()
    first, second = note.Note("C4", quarterLength=1.0), note.Note("C4", quarterLength=1.0)
    first.tie, second.tie = tie.Tie("start"), tie.Tie("stop")
    part.append([first, second, note.Rest(quarterLength=1.0), note.Note("E4", quarterLength=0.5)])
    notes = midi.notes(midi.read_midi(score_to_midi(stream.Score([part]))))
    assert [(n.pitch, n.start, n.end) for n in notes] == [(60, 0.0, 1.0), (64, 1.5, 1.75)]


def test_cli_reports_bad_arguments(tmp_path, capsys):
    assert sample_data_main(["--out", str(tmp_path / "x"), "--songs", "0"]) == 1
    assert "songs" in capsys.readouterr().err
    assert sample_data_main(["--out", str(tmp_path / "x"), "--songs", "2", "--source", "nope"]) == 1


# --- the real-data sources (skipped without ../shared/data) -----------------------------------


def test_midi_source_with_lastfm_listeners(shared_data, tmp_path):
    midi_dir, lastfm_dir = shared_data / "midi_genres", shared_data / "lastfm_hetrec2011"
    paths = generate_world(
        tmp_path / "m",
        songs=8,
        seed=1,
        seconds=5.0,
        workers=2,
        progress=False,
        validate=False,
        source=f"midi:{midi_dir}",
        listeners=f"lastfm:{lastfm_dir}",
    )
    catalog = pd.read_parquet(paths["catalog"])
    manifest = pd.read_csv(midi_dir / "manifest.tsv", sep="\t")
    assert set(catalog[schema.GENRE]) <= set(manifest["genre"]) and catalog[schema.GENRE].nunique() >= 4
    listeners = pd.read_parquet(paths["listeners"])
    assert (listeners["origin"] == "lastfm").all() and (listeners["lastfm_user_id"] > 0).all()
    for path in catalog[schema.AUDIO_PATH]:
        assert len(load_audio(paths["catalog"].parent / path, max_seconds=None)) > 16000
    # the listeners' genre affinities come from their Last.fm tags: they differ between people
    affinity = listeners[[c for c in listeners.columns if c.startswith("affinity_")]].to_numpy()
    assert affinity.std(axis=0).max() > 0.05


def test_catalog_paths_are_relative_so_a_world_can_move(tmp_path, monkeypatch):
    """audio_path is relative to the catalog's folder: the world still works moved elsewhere and
    read from another working directory (as `ray job submit --working-dir` gives a job)."""
    from htcl.mels import read_catalog

    paths = generate_world(tmp_path / "w", songs=2, seed=5, seconds=5.0, workers=1, progress=False, validate=False)
    stored = pd.read_parquet(paths["catalog"])[schema.AUDIO_PATH].tolist()
    assert stored == ["audio/000001.flac", "audio/000002.flac"]
    (tmp_path / "moved").mkdir()
    (tmp_path / "w").rename(tmp_path / "moved" / "w")
    monkeypatch.chdir(tmp_path / "moved")
    catalog = read_catalog("w/catalog.parquet")
    assert catalog[schema.AUDIO_PATH].tolist() == [str(tmp_path / "moved" / "w" / p) for p in stored]
    for path in catalog[schema.AUDIO_PATH]:
        assert len(load_audio(path, max_seconds=None)) > 16000
